/*
 * Alloc-T's selection over a few tokens (batched decode) in one call: each token's candidates sorted by score,
 * and the keep mask that gives every real token its first k_base and the rest of the forward's pairs to the
 * best remaining candidates of real tokens.
 *
 * It is runtime/routing_rules.py's sort_few_tokens followed by alloc_t_keep_few, decision for decision: the same
 * stable descending sort (ties keep their slot order), the same pool order (score descending, then token, then
 * slot), the same count of kept pairs. It only orders and selects (float comparisons, no arithmetic), so the
 * weights that follow from it are the Python form's bit for bit. Scalar C: the decision is over a few hundred
 * numbers; what it saves is the Python form's cost per number and its two tensors built from lists.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    float score;
    int32_t position; /* t * k + j: token-major, so ordering by it orders by token, then slot */
} pool_entry;

static int better_first(const void* a, const void* b) {
    const pool_entry* x = (const pool_entry*)a;
    const pool_entry* y = (const pool_entry*)b;
    if (x->score > y->score) return -1;
    if (x->score < y->score) return 1;
    return (x->position > y->position) - (x->position < y->position);
}

/*
 * tokens x k scores, weights and indices (row-major; float32, float32, int64), real[t] nonzero for real tokens
 * (NULL: all real). Writes each token's weights and indices sorted by score (stable, descending) to
 * sorted_weights and sorted_indices, and keep[t * k + j] (1 or 0) for each sorted position. Returns the pairs
 * kept, -1 where a score is not finite (nothing is written then: the general form's order of NaN is torch's to
 * define), -2 without memory.
 */
int64_t allocplan_alloc_t_few(int64_t tokens, int64_t k, const float* scores, const float* weights,
                              const int64_t* indices, const uint8_t* real, int64_t total_pairs, int64_t k_base,
                              float* sorted_weights, int64_t* sorted_indices, uint8_t* keep) {
    for (int64_t i = 0; i < tokens * k; i++)
        if (!isfinite(scores[i])) return -1;
    float* sorted = (float*)malloc(sizeof(float) * (size_t)(tokens * k));
    int64_t* slots = (int64_t*)malloc(sizeof(int64_t) * (size_t)k);
    pool_entry* pool = (pool_entry*)malloc(sizeof(pool_entry) * (size_t)(tokens * k));
    if (!sorted || !slots || !pool) {
        free(sorted); free(slots); free(pool);
        return -2;
    }
    int64_t real_tokens = 0;
    for (int64_t t = 0; t < tokens; t++) {
        const float* row = scores + t * k;
        /* Insertion sort, descending; a candidate moves only past strictly lower scores, so it is stable. */
        for (int64_t j = 0; j < k; j++) {
            int64_t i = j;
            while (i > 0 && row[slots[i - 1]] < row[j]) {
                slots[i] = slots[i - 1];
                i--;
            }
            slots[i] = j;
        }
        const int is_real = real == NULL || real[t] != 0;
        real_tokens += is_real;
        for (int64_t j = 0; j < k; j++) {
            sorted[t * k + j] = row[slots[j]];
            sorted_weights[t * k + j] = weights[t * k + slots[j]];
            sorted_indices[t * k + j] = indices[t * k + slots[j]];
            keep[t * k + j] = (uint8_t)(is_real && j < k_base);
        }
    }
    int64_t base = 0;
    for (int64_t i = 0; i < tokens * k; i++) base += keep[i];
    const int64_t extra = total_pairs - k_base * real_tokens;
    int64_t kept = base;
    if (extra > 0) {
        int64_t size = 0;
        for (int64_t t = 0; t < tokens; t++) {
            if (real != NULL && real[t] == 0) continue;
            for (int64_t j = k_base; j < k; j++) {
                pool[size].score = sorted[t * k + j];
                pool[size].position = (int32_t)(t * k + j);
                size++;
            }
        }
        /* A total order (score, then position): any sort gives the one sequence the Python form's gives. */
        qsort(pool, (size_t)size, sizeof(pool_entry), better_first);
        const int64_t take = extra < size ? extra : size;
        for (int64_t i = 0; i < take; i++) keep[pool[i].position] = 1;
        kept = k_base * real_tokens + take;
    }
    free(sorted); free(slots); free(pool);
    return kept;
}

/*
 * The routing a few tokens' experts receive (runtime/routing.py, LayerRouting.rewrite), from the keep mask and
 * the normalised weights (float32), both in sorted order: a kept slot keeps its expert and its weight times gain;
 * a dropped slot of a real token becomes, compensated, expert index + num_experts with its weight (its stand-in's
 * share), else the sentinel num_experts with weight 0; every slot of a padding token that is not kept gets
 * weight 0. The one product is a float32 multiply by the float32 gain, as torch multiplies a float32 tensor by a
 * Python float, so the weights are the torch form's bit for bit.
 */
void allocplan_rewrite_few(int64_t tokens, int64_t k, const uint8_t* keep, const float* normalized,
                           const int64_t* indices, const uint8_t* real, float gain, int64_t compensated,
                           int64_t num_experts, float* new_weights, int64_t* new_indices) {
    for (int64_t t = 0; t < tokens; t++) {
        const int is_real = real == NULL || real[t] != 0;
        for (int64_t j = 0; j < k; j++) {
            const int64_t i = t * k + j;
            if (keep[i]) {
                new_weights[i] = gain == 1.0f ? normalized[i] : normalized[i] * gain;
                new_indices[i] = indices[i];
            } else if (compensated) {
                new_weights[i] = is_real ? normalized[i] : 0.0f;
                new_indices[i] = indices[i] + num_experts;
            } else {
                new_weights[i] = 0.0f;
                new_indices[i] = num_experts;
            }
        }
    }
}
