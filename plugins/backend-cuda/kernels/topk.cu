// Top-k selections by insertion, one thread per selection: the plainest
// correct version. Candidates are visited in index order and a candidate moves
// up only past strictly worse ones, so ties keep the lower index first.

// Larger value first; NaN ranks below every number (the CPU backend's order).
__device__ __forceinline__ bool value_better(float a, float b) {
    if (isnan(a)) return false;
    return isnan(b) || a > b;
}

// idx, val: [rows, k]; inp: [rows, cols].
extern "C" __global__ void top_k_rows(u32* idx, float* val, const float* inp, u64 rows, u64 cols, u64 k) {
    u64 r = thread_index();
    if (r >= rows) return;
    const float* x = inp + r * cols;
    u32* oi = idx + r * k;
    float* ov = val + r * k;
    u64 filled = 0;
    for (u64 c = 0; c < cols; ++c) {
        float v = x[c];
        if (filled == k && !value_better(v, ov[k - 1])) continue;
        u64 j = filled < k ? filled++ : k - 1;
        while (j > 0 && value_better(v, ov[j - 1])) {
            ov[j] = ov[j - 1];
            oi[j] = oi[j - 1];
            --j;
        }
        ov[j] = v;
        oi[j] = (u32)c;
    }
}

// routing_math::rank_key: ascending keys = larger value first, ties to the lower row.
__device__ __forceinline__ u64 rank_key(float v, u32 index) {
    return ((u64)(~__float_as_uint(v + 0.0f)) << 32) | (u64)index;
}

// idx, val: [E, groups, k]; probs: [groups * group_rows, E]. One thread per
// (expert, group); keys are unique, so the order is total.
extern "C" __global__ void top_k_tokens(u32* idx, float* val, const float* probs,
                                        u64 groups, u64 group_rows, u64 experts, u64 k) {
    u64 i = thread_index();
    if (i >= experts * groups) return;
    u64 e = i / groups, g = i % groups;
    u32* oi = idx + i * k;
    float* ov = val + i * k;
    u64 filled = 0;
    u64 last = 0;
    for (u64 r = g * group_rows; r < (g + 1) * group_rows; ++r) {
        u64 key = rank_key(probs[r * experts + e], (u32)r);
        if (filled == k && key >= last) continue;
        u64 j = filled < k ? filled++ : k - 1;
        while (j > 0) {
            u64 prev = ((u64)(~__float_as_uint(ov[j - 1])) << 32) | (u64)oi[j - 1];
            if (key >= prev) break;
            ov[j] = ov[j - 1];
            oi[j] = oi[j - 1];
            --j;
        }
        ov[j] = __uint_as_float(~(u32)(key >> 32));
        oi[j] = (u32)r;
        last = ((u64)(~__float_as_uint(ov[filled - 1])) << 32) | (u64)oi[filled - 1];
    }
}
