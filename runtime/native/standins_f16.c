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

/* Pairs of one expert that share each read of its factor rows in the grouped form below: one per register lane
 * group of the micro-kernels, which keep LANES x 2 vectors of accumulators in registers. */
#define LANES 4

/* z_q[j0 .. j0 + 8 * V) = x_q @ down_e[:, j0 .. j0 + 8 * V) for the LANES pairs of a block (V = 1 or 2 vectors). */
#define DOWN_PASS(V)                                                                                              \
    do {                                                                                                          \
        __m256 acc[LANES][2];                                                                                     \
        for (int q = 0; q < LANES; q++) acc[q][0] = acc[q][1] = _mm256_setzero_ps();                              \
        for (int64_t h = 0; h < hidden; h++) {                                                                    \
            const uint16_t* row = down_e + h * rank + j0;                                                         \
            const __m256 v0 = load8_half(row);                                                                    \
            const __m256 v1 = (V) == 2 ? load8_half(row + 8) : _mm256_setzero_ps();                               \
            for (int q = 0; q < LANES; q++) {                                                                     \
                const __m256 xq = _mm256_broadcast_ss(xs[q] + h);                                                 \
                acc[q][0] = _mm256_fmadd_ps(xq, v0, acc[q][0]);                                                   \
                if ((V) == 2) acc[q][1] = _mm256_fmadd_ps(xq, v1, acc[q][1]);                                     \
            }                                                                                                     \
        }                                                                                                         \
        for (int q = 0; q < LANES; q++) {                                                                         \
            _mm256_storeu_ps(z + q * stride + j0, acc[q][0]);                                                     \
            if ((V) == 2) _mm256_storeu_ps(z + q * stride + j0 + 8, acc[q][1]);                                   \
        }                                                                                                         \
    } while (0)

/* out_q[h0 .. h0 + 8 * V) += w_q bias_e + z_q @ up_e[:, h0 .. h0 + 8 * V) for the LANES pairs of a block. */
#define UP_PASS(V)                                                                                                \
    do {                                                                                                          \
        __m256 acc[LANES][2];                                                                                     \
        const __m256 b0 = _mm256_loadu_ps(bias_e + h0);                                                           \
        const __m256 b1 = (V) == 2 ? _mm256_loadu_ps(bias_e + h0 + 8) : _mm256_setzero_ps();                      \
        for (int q = 0; q < LANES; q++) {                                                                         \
            const __m256 wq = _mm256_set1_ps(ws[q]);                                                              \
            acc[q][0] = _mm256_fmadd_ps(wq, b0, _mm256_loadu_ps(outs[q] + h0));                                   \
            acc[q][1] = (V) == 2 ? _mm256_fmadd_ps(wq, b1, _mm256_loadu_ps(outs[q] + h0 + 8)) : _mm256_setzero_ps(); \
        }                                                                                                         \
        for (int64_t j = 0; j < rank; j++) {                                                                      \
            const uint16_t* row = up_e + j * hidden + h0;                                                         \
            const __m256 u0 = load8_half(row);                                                                    \
            const __m256 u1 = (V) == 2 ? load8_half(row + 8) : _mm256_setzero_ps();                               \
            for (int q = 0; q < LANES; q++) {                                                                     \
                const __m256 zq = _mm256_broadcast_ss(z + q * stride + j);                                        \
                acc[q][0] = _mm256_fmadd_ps(zq, u0, acc[q][0]);                                                   \
                if ((V) == 2) acc[q][1] = _mm256_fmadd_ps(zq, u1, acc[q][1]);                                     \
            }                                                                                                     \
        }                                                                                                         \
        for (int q = 0; q < LANES; q++) {                                                                         \
            _mm256_storeu_ps(outs[q] + h0, acc[q][0]);                                                            \
            if ((V) == 2) _mm256_storeu_ps(outs[q] + h0 + 8, acc[q][1]);                                          \
        }                                                                                                         \
    } while (0)

/*
 * Pairs grouped by expert: pair p is token tokens[p] of expert experts[p] (non-decreasing, every one within the
 * tables) with weight weights[p] (nonzero); x and out are [T, hidden]. Per block of up to LANES pairs of one
 * expert, each row of its factors is read once for the whole block, where the per-token form above reads
 * every pair's factors again:
 *   z_p = w_p (x_{t_p} @ down_e)                   (rows h of down_e)
 *   out_{t_p} += w_p bias_e + z_p @ up_e           (rows j of up_e)
 * A block never holds one token twice (its output row is read once and written once per block); a block of
 * fewer than LANES pairs fills its other lanes with a zero input, weight 0 and a scratch output. Returns 0, or
 * -2 when scratch memory cannot be had.
 */
static int64_t add_grouped_pairs(int64_t pairs, const int64_t* tokens, const int64_t* experts, const float* weights,
                                 const float* x, float* out, const uint16_t* down, const uint16_t* up,
                                 const float* bias, int64_t hidden, int64_t rank) {
    /* z rows padded to whole pairs of vectors: the down pass writes 16 ranks at a time, reading a rank that is
     * not a multiple of 8 into the padding (the last row's overrun lands in the caller's 8 halves of slack). */
    const int64_t stride = (rank + 15) / 16 * 16;
    float* z = malloc(LANES * stride * sizeof(*z));  /* [LANES, stride] */
    float* idle = calloc(2 * hidden + 16, sizeof(*idle));  /* a zero input row and a scratch output row */
    if (!z || !idle) { free(z); free(idle); return -2; }
    const int64_t hidden8 = hidden - hidden % 8, hidden16 = hidden - hidden % 16;
    int64_t start = 0;
    while (start < pairs) {
        const int64_t e = experts[start];
        const float* xs[LANES];
        float* outs[LANES];
        float ws[LANES];
        int64_t n = 0, next = start;
        while (next < pairs && experts[next] == e && n < LANES) {
            int repeated = 0;
            for (int64_t q = 0; q < n; q++) repeated |= outs[q] == out + tokens[next] * hidden;
            if (repeated) break;
            xs[n] = x + tokens[next] * hidden;
            outs[n] = out + tokens[next] * hidden;
            ws[n++] = weights[next];
            next++;
        }
        for (int64_t q = n; q < LANES; q++) { xs[q] = idle; outs[q] = idle + hidden + 8; ws[q] = 0.0f; }
        const uint16_t* down_e = down + e * hidden * rank;  /* [H, r] */
        const uint16_t* up_e = up + e * rank * hidden;  /* [r, H] */
        const float* bias_e = bias + e * hidden;
        int64_t j0 = 0;
        for (; j0 + 8 < rank; j0 += 16) DOWN_PASS(2);
        if (j0 < rank) DOWN_PASS(1);
        for (int q = 0; q < LANES; q++)
            for (int64_t j = 0; j < rank; j++) z[q * stride + j] *= ws[q];
        int64_t h0 = 0;
        for (; h0 < hidden16; h0 += 16) UP_PASS(2);
        for (; h0 < hidden8; h0 += 8) UP_PASS(1);
        for (int64_t h = hidden8; h < hidden; h++) {
            for (int q = 0; q < LANES; q++) {
                float sum = outs[q][h] + ws[q] * bias_e[h];
                for (int64_t j = 0; j < rank; j++) sum += z[q * stride + j] * _cvtsh_ss(up_e[j * hidden + h]);
                outs[q][h] = sum;
            }
        }
        start = next;
    }
    free(z);
    free(idle);
    return 0;
}

/*
 * The many-token form (prefill), arguments as allocplan_add_dropped_f16_rows: every row's dropped slots of
 * nonzero weight, sorted by expert here (a counting sort, tokens in order within an expert), then added by
 * add_grouped_pairs. Every slot is checked before any is added, so -1 leaves out untouched. Returns the
 * dropped slots added, or -1 / -2 as the one-token form.
 */
int64_t allocplan_add_dropped_f16_grouped(int64_t tokens, int64_t k, const int64_t* slots, const float* weights,
                                          int64_t num_experts, const float* x, float* out, const uint16_t* down,
                                          const uint16_t* up, const float* bias, int64_t table_experts,
                                          int64_t hidden, int64_t rank) {
    int64_t* starts = calloc(table_experts + 1, sizeof(*starts));  /* [E + 1]: counts, then first positions */
    if (!starts) return -2;
    int64_t pairs = 0;
    for (int64_t i = 0; i < tokens * k; i++) {
        if (slots[i] < num_experts || weights[i] == 0.0f) continue;
        if (slots[i] - num_experts >= table_experts) { free(starts); return -1; }
        starts[slots[i] - num_experts + 1]++;
        pairs++;
    }
    if (pairs == 0) { free(starts); return 0; }
    for (int64_t e = 0; e < table_experts; e++) starts[e + 1] += starts[e];
    int64_t* pair_tokens = malloc(pairs * sizeof(*pair_tokens));
    int64_t* pair_experts = malloc(pairs * sizeof(*pair_experts));
    float* pair_weights = malloc(pairs * sizeof(*pair_weights));
    int64_t status = -2;
    if (pair_tokens && pair_experts && pair_weights) {
        for (int64_t i = 0; i < tokens * k; i++) {
            if (slots[i] < num_experts || weights[i] == 0.0f) continue;
            const int64_t e = slots[i] - num_experts, at = starts[e]++;
            pair_tokens[at] = i / k;
            pair_experts[at] = e;
            pair_weights[at] = weights[i];
        }
        status = add_grouped_pairs(pairs, pair_tokens, pair_experts, pair_weights, x, out, down, up, bias, hidden,
                                   rank);
    }
    free(starts); free(pair_tokens); free(pair_experts); free(pair_weights);
    return status < 0 ? status : pairs;
}
