/*
 * A few tokens' routed experts (batched decode) in one call, for float32 SwiGLU experts: each (token, expert)
 * pair's silu(x W_gate^T) * (x W_up^T) W_down^T, weighted and summed into its token.
 *
 * Why: on CPU, torch's grouped_mm runs one matmul per expert whether or not the expert has rows, and with a
 * few tokens each of those calls, and each of the dozen ops around them (grouping, gathering, the gate,
 * the weighted scatter), costs its fixed dispatch time rather than its arithmetic. Here the arithmetic is
 * what is paid: a pair reads its expert's two weight matrices once, and an expert no pair uses costs nothing.
 *
 * It is runtime/experts.py's general form (active_pairs, grouped matmuls, _default_apply_gate, combine) up to
 * float rounding: the same pairs, each output added to its token in the same order (experts ascending, then
 * slots in token-major order), but its dot products sum in another order and silu uses libm's expf.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float sum8(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(low, high);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[j] = rows[j, :] . v for j < count, with rows row-major of width n: four rows share each load of v. */
static void matvec(const float* rows, const float* v, int64_t count, int64_t n, float* out) {
    const int64_t wide = n - n % 8;
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *r0 = rows + j * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < wide; i += 8) {
            const __m256 x = _mm256_loadu_ps(v + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i), x, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i), x, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i), x, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i), x, a3);
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (int64_t i = wide; i < n; i++) {
            s0 += r0[i] * v[i];
            s1 += r1[i] * v[i];
            s2 += r2[i] * v[i];
            s3 += r3[i] * v[i];
        }
        out[j] = s0;
        out[j + 1] = s1;
        out[j + 2] = s2;
        out[j + 3] = s3;
    }
    for (; j < count; j++) {
        const float* r = rows + j * n;
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < wide; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(v + i), a);
        float s = sum8(a);
        for (int64_t i = wide; i < n; i++) s += r[i] * v[i];
        out[j] = s;
    }
}

/*
 * tokens x k expert indices and weights (row-major; int64, float32): an index of num_experts or more runs
 * nothing (the "no expert" and dropped slots). x is [tokens, hidden]; gate_up is [num_experts, 2 * inter,
 * hidden] with the gate's rows first, down is [num_experts, hidden, inter], all float32 and contiguous. Writes
 * out [tokens, hidden] (overwritten: tokens without a pair get zeros). Returns the pairs run, or -2 without memory.
 */
int64_t allocplan_experts_few(int64_t tokens, int64_t k, const int64_t* indices, const float* weights,
                              int64_t num_experts, int64_t hidden, int64_t inter, const float* x,
                              const float* gate_up, const float* down, float* out) {
    const int64_t slots = tokens * k;
    /* The slots that run, by expert ascending and in slot order within an expert (a counting sort, stable as
       the general form's sort by expert); starts[e] is where expert e's slots begin, starts[E] their count. */
    int64_t* starts = (int64_t*)calloc((size_t)(2 * num_experts + 1), sizeof(int64_t));
    int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    if (!starts || !order) {
        free(starts); free(order);
        return -2;
    }
    for (int64_t s = 0; s < slots; s++)
        if (indices[s] >= 0 && indices[s] < num_experts) starts[indices[s] + 1]++;
    int64_t most = 0; /* the most pairs one expert has: the scratch holds that many */
    for (int64_t e = 0; e < num_experts; e++) {
        most = starts[e + 1] > most ? starts[e + 1] : most;
        starts[e + 1] += starts[e];
    }
    const int64_t pairs = starts[num_experts];
    int64_t* cursor = starts + num_experts + 1; /* where each expert's next slot goes */
    for (int64_t e = 0; e < num_experts; e++) cursor[e] = starts[e];
    for (int64_t s = 0; s < slots; s++)
        if (indices[s] >= 0 && indices[s] < num_experts) order[cursor[indices[s]]++] = s;
    /* Per pair of one expert: its input [H], its projections [2I], its gated inner [I] and its output [H]. */
    float* scratch = (float*)malloc(sizeof(float) * (size_t)((most > 0 ? most : 1) * (2 * hidden + 3 * inter)));
    if (!scratch) {
        free(starts); free(order);
        return -2;
    }
    for (int64_t i = 0; i < tokens * hidden; i++) out[i] = 0.0f;
    float *inputs = scratch, *projected = inputs + most * hidden, *inner = projected + most * 2 * inter,
          *outputs = inner + most * inter;
    for (int64_t expert = 0; expert < num_experts; expert++) {
        const int64_t n = starts[expert + 1] - starts[expert];
        if (n == 0) continue;
        const int64_t* mine = order + starts[expert];
        for (int64_t r = 0; r < n; r++) {
            const float* row = x + (mine[r] / k) * hidden;
            for (int64_t h = 0; h < hidden; h++) inputs[r * hidden + h] = row[h];
        }
        /* Each weight row is read once for all n pairs: the bytes read are the expert's weights, as one matmul's. */
        const float* w_in = gate_up + expert * 2 * inter * hidden;
        for (int64_t j = 0; j < 2 * inter; j += 4) {
            const int64_t rows = 2 * inter - j < 4 ? 2 * inter - j : 4;
            float result[4];
            for (int64_t r = 0; r < n; r++) {
                matvec(w_in + j * hidden, inputs + r * hidden, rows, hidden, result);
                for (int64_t q = 0; q < rows; q++) projected[r * 2 * inter + j + q] = result[q];
            }
        }
        for (int64_t r = 0; r < n; r++)
            for (int64_t i = 0; i < inter; i++) {
                const float gate = projected[r * 2 * inter + i];
                inner[r * inter + i] = gate / (1.0f + expf(-gate)) * projected[r * 2 * inter + inter + i];
            }
        const float* w_out = down + expert * hidden * inter;
        for (int64_t h = 0; h < hidden; h += 4) {
            const int64_t rows = hidden - h < 4 ? hidden - h : 4;
            float result[4];
            for (int64_t r = 0; r < n; r++) {
                matvec(w_out + h * inter, inner + r * inter, rows, inter, result);
                for (int64_t q = 0; q < rows; q++) outputs[r * hidden + h + q] = result[q];
            }
        }
        /* combine's order: each pair's output weighted, then added to its token, pairs in slot order. */
        for (int64_t r = 0; r < n; r++) {
            const float weight = weights[mine[r]];
            float* target = out + (mine[r] / k) * hidden;
            for (int64_t h = 0; h < hidden; h++) {
                const float weighted = outputs[r * hidden + h] * weight;
                target[h] = target[h] + weighted;
            }
        }
    }
    free(starts);
    free(order);
    free(scratch);
    return pairs;
}
