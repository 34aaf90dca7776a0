// Top-k selections by insertion, one thread per selection: the plainest
// correct version. The working list holds indices only (values are read back
// from the input, so bf16 outputs are rounded once, at the end). Candidates
// are visited in index order and a candidate moves up only past strictly
// worse ones, so ties keep the lower index first.

// Larger value first; NaN ranks below every number (the CPU backend's order).
__device__ __forceinline__ bool value_better(float a, float b) {
    if (isnan(a)) return false;
    return isnan(b) || a > b;
}

// idx: [rows, k] (u32); val: [rows, k]; inp: [rows, cols].
extern "C" __global__ void top_k_rows(u32* idx, Ten val, Ten inp, u64 rows, u64 cols, u64 k) {
    FOR_EACH(r, rows) {
        u64 row = r * cols;
        u32* oi = idx + r * k;
        u64 filled = 0;
        for (u64 c = 0; c < cols; ++c) {
            float v = ld(inp, row + c);
            if (filled == k && !value_better(v, ld(inp, row + oi[k - 1]))) continue;
            u64 j = filled < k ? filled++ : k - 1;
            while (j > 0 && value_better(v, ld(inp, row + oi[j - 1]))) {
                oi[j] = oi[j - 1];
                --j;
            }
            oi[j] = (u32)c;
        }
        for (u64 j = 0; j < k; ++j) st(val, r * k + j, ld(inp, row + oi[j]));
    }
}

// routing_math::rank_key: ascending keys = larger value first, ties to the
// lower row; NaN last.
__device__ __forceinline__ u64 rank_key(float v, u32 index) {
    u32 top = isnan(v) ? 0xffffffffu : ~__float_as_uint(__fadd_rn(v, 0.0f));
    return ((u64)top << 32) | (u64)index;
}

// idx, val: [E, groups, k] (u32, f32); probs: [groups * group_rows, E] (f32).
// One thread per (expert, group); keys are unique, so the order is total.
// val is routing_math::key_value of the key (the value, -0 as +0, NaN as 0).
extern "C" __global__ void top_k_tokens(u32* idx, float* val, const float* probs, u64 groups, u64 group_rows,
                                        u64 experts, u64 k) {
    FOR_EACH(i, experts * groups) {
        u64 e = i / groups, g = i % groups;
        u32* oi = idx + i * k;
        u64 filled = 0;
        for (u64 r = g * group_rows; r < (g + 1) * group_rows; ++r) {
            u64 key = rank_key(probs[r * experts + e], (u32)r);
            if (filled == k && key >= rank_key(probs[(u64)oi[k - 1] * experts + e], oi[k - 1])) continue;
            u64 j = filled < k ? filled++ : k - 1;
            while (j > 0 && key < rank_key(probs[(u64)oi[j - 1] * experts + e], oi[j - 1])) {
                oi[j] = oi[j - 1];
                --j;
            }
            oi[j] = (u32)r;
        }
        for (u64 j = 0; j < k; ++j) {
            u64 key = rank_key(probs[(u64)oi[j] * experts + e], oi[j]);
            val[i * k + j] = __uint_as_float(~(u32)(key >> 32));
        }
    }
}
