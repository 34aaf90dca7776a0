// Grouped-query attention. q, out, dq, dout: [B, Tq, H, Dh]; k, v, dk, dv:
// [B, Tk, Hkv, Dh]; probs: [B, H, Tq, Tk]; key_mask: [B, Tk] (u8, nonzero =
// attend). Query head h reads kv head h / (H / Hkv). Scores are scale <q, k>
// and the exponentials the CPU backend's (exp_cpu); a query whose keys are all
// masked gets zero probabilities and output.
//
// Forward kernels run one warp per query row (b, h, t): the warp's lanes take
// the keys 32 at a time (lane j scores key j0 + j); sums over lanes are xor
// butterflies, so every lane holds the same, deterministic total.

struct AttnDims {
    u64 batch, heads, kv_heads, q_len, kv_len, head_dim;
};

// Head-dim channels a lane of the inference kernel keeps in registers (8 x 32
// lanes: head_dim <= 256; the backend uses the probability path beyond).
#define ATTN_LANE_CHANNELS 8

__device__ __forceinline__ u64 q_at(AttnDims d, u64 b, u64 t, u64 h) {
    return ((b * d.q_len + t) * d.heads + h) * d.head_dim;
}

__device__ __forceinline__ u64 kv_at(AttnDims d, u64 b, u64 j, u64 hk) {
    return ((b * d.kv_len + j) * d.kv_heads + hk) * d.head_dim;
}

__device__ __forceinline__ bool attends(const u8* mask, int has_mask, AttnDims d, u64 b, u64 j) {
    return !has_mask || mask[b * d.kv_len + j] != 0;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// scale <q[b, t, h], k[b, j, hk]>, or -inf for a masked or missing key.
__device__ __forceinline__ float score(Ten q, Ten k, const u8* mask, int has_mask, AttnDims d, u64 b, u64 t,
                                       u64 h, u64 hk, u64 j, float scale) {
    if (j >= d.kv_len || !attends(mask, has_mask, d, b, j)) return NEG_INF;
    u64 qa = q_at(d, b, t, h), ka = kv_at(d, b, j, hk);
    float acc = 0.0f;
    for (u64 c = 0; c < d.head_dim; ++c) acc += ld(q, qa + c) * ld(k, ka + c);
    return scale * acc;
}

// The warps of a launch walk the query rows (b, h, t) in a grid-stride loop.
#define FOR_EACH_WARP_ROW(row, n)                                                          \
    for (u64 row = (thread_index() / 32); row < (n); row += grid_stride() / 32)

// Training forward, step 1: the probabilities of every row (scores recomputed
// in each of three passes: max, sum, write; every element written once).
extern "C" __global__ void attention_probs(Ten probs, Ten q, Ten k, const u8* mask, int has_mask, AttnDims d,
                                           float scale) {
    u64 lane = threadIdx.x % 32;
    FOR_EACH_WARP_ROW(row, d.batch * d.heads * d.q_len) {
        u64 b = row / (d.heads * d.q_len), h = row / d.q_len % d.heads, t = row % d.q_len;
        u64 hk = h / (d.heads / d.kv_heads);
        float mx = NEG_INF;
        for (u64 j0 = 0; j0 < d.kv_len; j0 += 32)
            mx = fmaxf(mx, score(q, k, mask, has_mask, d, b, t, h, hk, j0 + lane, scale));
        mx = warp_max(mx);
        if (mx == NEG_INF) {
            for (u64 j = lane; j < d.kv_len; j += 32) st(probs, row * d.kv_len + j, 0.0f);
            continue;
        }
        float sum = 0.0f;
        for (u64 j0 = 0; j0 < d.kv_len; j0 += 32) {
            float s = score(q, k, mask, has_mask, d, b, t, h, hk, j0 + lane, scale);
            if (s != NEG_INF) sum += exp_cpu(s - mx);
        }
        float inv = 1.0f / warp_sum(sum);
        for (u64 j = lane; j < d.kv_len; j += 32) {
            float s = score(q, k, mask, has_mask, d, b, t, h, hk, j, scale);
            st(probs, row * d.kv_len + j, s == NEG_INF ? 0.0f : exp_cpu(s - mx) * inv);
        }
    }
}

// Training forward, step 2: one thread per element of out:
// out[b, t, h, c] = sum_j probs[b, h, t, j] v[b, j, hk, c].
extern "C" __global__ void attention_apply(Ten out, Ten probs, Ten v, AttnDims d) {
    FOR_EACH(i, d.batch * d.q_len * d.heads * d.head_dim) {
        u64 c = i % d.head_dim, h = i / d.head_dim % d.heads, t = i / (d.head_dim * d.heads) % d.q_len;
        u64 b = i / (d.head_dim * d.heads * d.q_len);
        u64 hk = h / (d.heads / d.kv_heads);
        u64 p = ((b * d.heads + h) * d.q_len + t) * d.kv_len;
        float acc = 0.0f;
        for (u64 j = 0; j < d.kv_len; ++j) acc += ld(probs, p + j) * ld(v, kv_at(d, b, j, hk) + c);
        st(out, i, acc);
    }
}

// Inference: fused, no probability kept. One warp per query row with an
// online softmax over tiles of 32 keys; lane l accumulates the output channels
// l, l + 32, ... (head_dim <= 32 * ATTN_LANE_CHANNELS).
extern "C" __global__ void attention_infer(Ten out, Ten q, Ten k, Ten v, const u8* mask, int has_mask, AttnDims d,
                                           float scale) {
    u64 lane = threadIdx.x % 32;
    FOR_EACH_WARP_ROW(row, d.batch * d.heads * d.q_len) {
        u64 b = row / (d.heads * d.q_len), h = row / d.q_len % d.heads, t = row % d.q_len;
        u64 hk = h / (d.heads / d.kv_heads);
        float acc[ATTN_LANE_CHANNELS];
        for (int i = 0; i < ATTN_LANE_CHANNELS; ++i) acc[i] = 0.0f;
        float m = NEG_INF, l = 0.0f;
        for (u64 j0 = 0; j0 < d.kv_len; j0 += 32) {
            float s = score(q, k, mask, has_mask, d, b, t, h, hk, j0 + lane, scale);
            float tile_max = warp_max(s);
            if (tile_max == NEG_INF) continue;  // the whole tile masked (the same in every lane)
            float m_new = fmaxf(m, tile_max);
            float corr = exp_cpu(m - m_new);
            float p = s == NEG_INF ? 0.0f : exp_cpu(s - m_new);
            l = l * corr + warp_sum(p);
            for (int i = 0; i < ATTN_LANE_CHANNELS; ++i) acc[i] *= corr;
            u64 keys = d.kv_len - j0 < 32 ? d.kv_len - j0 : 32;
            for (u64 jj = 0; jj < keys; ++jj) {
                float pj = __shfl_sync(0xffffffffu, p, (int)jj);
                if (pj == 0.0f) continue;  // the same in every lane
                u64 va = kv_at(d, b, j0 + jj, hk);
                for (int i = 0; i < ATTN_LANE_CHANNELS; ++i) {
                    u64 c = lane + 32 * i;
                    if (c < d.head_dim) acc[i] += pj * ld(v, va + c);
                }
            }
            m = m_new;
        }
        u64 oa = q_at(d, b, t, h);
        float inv = m == NEG_INF ? 0.0f : 1.0f / l;
        for (int i = 0; i < ATTN_LANE_CHANNELS; ++i) {
            u64 c = lane + 32 * i;
            if (c < d.head_dim) st(out, oa + c, acc[i] * inv);
        }
    }
}

// Backward, step 1: one thread per (b, h, t) row of the f32 scratch ds
// [B, H, Tq, Tk]: dp_j = <dout, v_j>, delta = sum_j p_j dp_j, then
// ds_j = scale p_j (dp_j - delta), the score gradient.
extern "C" __global__ void attention_backward_ds(float* ds, Ten dout, Ten probs, Ten v, AttnDims d, float scale) {
    FOR_EACH(row, d.batch * d.heads * d.q_len) {
        u64 b = row / (d.heads * d.q_len), h = row / d.q_len % d.heads, t = row % d.q_len;
        u64 hk = h / (d.heads / d.kv_heads);
        u64 ga = q_at(d, b, t, h);
        float* dsr = ds + row * d.kv_len;
        float delta = 0.0f;
        for (u64 j = 0; j < d.kv_len; ++j) {
            u64 va = kv_at(d, b, j, hk);
            float dp = 0.0f;
            for (u64 c = 0; c < d.head_dim; ++c) dp += ld(dout, ga + c) * ld(v, va + c);
            dsr[j] = dp;
            delta += ld(probs, row * d.kv_len + j) * dp;
        }
        for (u64 j = 0; j < d.kv_len; ++j) dsr[j] = scale * ld(probs, row * d.kv_len + j) * (dsr[j] - delta);
    }
}

// Backward, step 2: one thread per element of dq: dq[b, t, h, c] = sum_j ds_j k[b, j, hk, c].
extern "C" __global__ void attention_backward_dq(Ten dq, const float* ds, Ten k, AttnDims d) {
    FOR_EACH(i, d.batch * d.q_len * d.heads * d.head_dim) {
        u64 c = i % d.head_dim, h = i / d.head_dim % d.heads, t = i / (d.head_dim * d.heads) % d.q_len;
        u64 b = i / (d.head_dim * d.heads * d.q_len);
        u64 hk = h / (d.heads / d.kv_heads);
        const float* dsr = ds + ((b * d.heads + h) * d.q_len + t) * d.kv_len;
        float acc = 0.0f;
        for (u64 j = 0; j < d.kv_len; ++j) acc += dsr[j] * ld(k, kv_at(d, b, j, hk) + c);
        st(dq, i, acc);
    }
}

// Backward, step 3: one thread per element of dk and dv, summing the query
// heads of its group and their queries in order:
// dk[b, j, hk, c] = sum ds q[b, t, h, c], dv[b, j, hk, c] = sum p dout[b, t, h, c].
extern "C" __global__ void attention_backward_dkv(Ten dk, Ten dv, const float* ds, Ten dout, Ten probs, Ten q,
                                                  AttnDims d) {
    u64 group = d.heads / d.kv_heads;
    FOR_EACH(i, d.batch * d.kv_len * d.kv_heads * d.head_dim) {
        u64 c = i % d.head_dim, hk = i / d.head_dim % d.kv_heads, j = i / (d.head_dim * d.kv_heads) % d.kv_len;
        u64 b = i / (d.head_dim * d.kv_heads * d.kv_len);
        float gk = 0.0f, gv = 0.0f;
        for (u64 h = hk * group; h < (hk + 1) * group; ++h) {
            for (u64 t = 0; t < d.q_len; ++t) {
                u64 row = (b * d.heads + h) * d.q_len + t;
                u64 qa = q_at(d, b, t, h) + c;
                gk += ds[row * d.kv_len + j] * ld(q, qa);
                gv += ld(probs, row * d.kv_len + j) * ld(dout, qa);
            }
        }
        st(dk, i, gk);
        st(dv, i, gv);
    }
}
