/*
 * Batch-1 decode's linear stand-ins from half-precision factors (runtime/native.py builds and loads this).
 *
 * For one token with input x [H], add to out [H] the weighted stand-ins of its dropped slots:
 *
 *     out += sum over dropped slots d of  w_d * (bias[e_d] + (x @ down[e_d]) @ up[e_d])
 *
 * down [E, H, r] and up [E, r, H] are IEEE half, bias [E, H] and everything else float32; down must be
 * followed by 8 readable halves (the down pass reads whole vectors of 8). At batch 1
 * the cost is reading the factors from memory: half precision reads half the bytes of float32, and
 * all dropped slots' factors stream together (one pass over h for every slot's down, one pass over
 * j for every slot's up), so the memory system has several streams in flight rather than one.
 *
 * The caller puts the factors on the half grid when they are fitted, so the products here use the
 * very values the float32 paths use; only the order of the float additions differs.
 *
 * Needs AVX2, FMA and F16C (the Python side checks the CPU before it builds this).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* How far ahead of the current row to prefetch, in bytes: a few rows of the next stretch. */
#define PREFETCH_AHEAD 2048

static inline __m256 load8_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

/*
 * slots [k]: the token's slot indices (a kept expert e < num_experts, a dropped one num_experts + e);
 * weights [k]: their weights (0 for the plain sentinel, which adds nothing).
 * Returns the number of dropped slots added, -1 when a dropped slot names no expert of the tables
 * (nothing is added then), -2 when scratch memory cannot be had.
 */
int64_t allocplan_add_dropped_f16(int64_t k, const int64_t* slots, const float* weights, int64_t num_experts,
                                  const float* x, float* out, const uint16_t* down, const uint16_t* up,
                                  const float* bias, int64_t table_experts, int64_t hidden, int64_t rank) {
    int64_t n = 0;
    for (int64_t i = 0; i < k; i++) {
        if (slots[i] < num_experts || weights[i] == 0.0f) continue;
        if (slots[i] - num_experts >= table_experts) return -1;
        n++;
    }
    if (n == 0) return 0;
    /* Per dropped slot: its factors, bias, weight and inner product z = x @ down [r]. */
    /* Each z_d padded to whole vectors of 8, so the down pass needs no scalar tail (see there). */
    const int64_t stride = (rank + 7) / 8 * 8;
    const uint16_t** downs = malloc(n * sizeof(*downs));
    const uint16_t** ups = malloc(n * sizeof(*ups));
    const float** biases = malloc(n * sizeof(*biases));
    float* w = malloc(n * sizeof(*w));
    float* z = calloc(n * stride, sizeof(*z));
    if (!downs || !ups || !biases || !w || !z) {
        free(downs); free(ups); free(biases); free(w); free(z);
        return -2;
    }
    int64_t d = 0;
    for (int64_t i = 0; i < k; i++) {
        if (slots[i] < num_experts || weights[i] == 0.0f) continue;
        const int64_t e = slots[i] - num_experts;
        downs[d] = down + e * hidden * rank;
        ups[d] = up + e * rank * hidden;
        biases[d] = bias + e * hidden;
        w[d] = weights[i];
        d++;
    }
    const int64_t hidden8 = hidden - hidden % 8;

    /* z_d = x @ down_d: rows h of every slot's down, in step. A rank that is not a multiple of 8 is read in
     * whole vectors too: the last one runs into the next row (or, for the table's last row, into the slack
     * of 8 halves the caller allocates after it), and what it adds lands in z_d's padding, never read. */
    for (int64_t h = 0; h < hidden; h++) {
        const __m256 xh = _mm256_set1_ps(x[h]);
        for (d = 0; d < n; d++) {
            const uint16_t* row = downs[d] + h * rank;  /* [r] */
            float* zd = z + d * stride;
            _mm_prefetch((const char*)row + PREFETCH_AHEAD, _MM_HINT_T0);
            for (int64_t j = 0; j < rank; j += 8)
                _mm256_storeu_ps(zd + j, _mm256_fmadd_ps(xh, load8_half(row + j), _mm256_loadu_ps(zd + j)));
        }
    }
    /* out += w_d bias_d */
    for (d = 0; d < n; d++) {
        const __m256 wd = _mm256_set1_ps(w[d]);
        int64_t h = 0;
        for (; h < hidden8; h += 8)
            _mm256_storeu_ps(out + h, _mm256_fmadd_ps(wd, _mm256_loadu_ps(biases[d] + h), _mm256_loadu_ps(out + h)));
        for (; h < hidden; h++) out[h] += w[d] * biases[d][h];
    }
    /* out += (w_d z_d) @ up_d: rows j of every slot's up, in step. */
    for (int64_t j = 0; j < rank; j++) {
        for (d = 0; d < n; d++) {
            const float scale = w[d] * z[d * stride + j];
            const __m256 s = _mm256_set1_ps(scale);
            const uint16_t* row = ups[d] + j * hidden;  /* [H] */
            int64_t h = 0;
            for (; h < hidden8; h += 8) {
                if (h % 32 == 0) _mm_prefetch((const char*)(row + h) + PREFETCH_AHEAD, _MM_HINT_T0);
                _mm256_storeu_ps(out + h, _mm256_fmadd_ps(s, load8_half(row + h), _mm256_loadu_ps(out + h)));
            }
            for (; h < hidden; h++) out[h] += scale * _cvtsh_ss(row[h]);
        }
    }
    free(downs); free(ups); free(biases); free(w); free(z);
    return n;
}

/*
 * allocplan_add_dropped_f16 for each of `tokens` rows: row t's slots and weights at t * k, its input and
 * output at t * hidden. Every row's slots are checked before any is added, so -1 leaves out untouched.
 * Returns the dropped slots added over all rows, or the first negative code.
 */
int64_t allocplan_add_dropped_f16_rows(int64_t tokens, int64_t k, const int64_t* slots, const float* weights,
                                       int64_t num_experts, const float* x, float* out, const uint16_t* down,
                                       const uint16_t* up, const float* bias, int64_t table_experts,
                                       int64_t hidden, int64_t rank) {
    for (int64_t i = 0; i < tokens * k; i++)
        if (slots[i] >= num_experts && weights[i] != 0.0f && slots[i] - num_experts >= table_experts) return -1;
    int64_t total = 0;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t added = allocplan_add_dropped_f16(k, slots + t * k, weights + t * k, num_experts,
                                                        x + t * hidden, out + t * hidden, down, up, bias,
                                                        table_experts, hidden, rank);
        if (added < 0) return added;
        total += added;
    }
    return total;
}
