// Grouped-query attention, the plainest correct version. q, out, dq, dout:
// [B, Tq, H, Dh]; k, v, dk, dv: [B, Tk, Hkv, Dh]; probs: [B, H, Tq, Tk];
// key_mask: [B, Tk] (u8, nonzero = attend). Query head h reads kv head
// h / (H / Hkv). Scores are scale * <q, k>; a query whose keys are all masked
// gets zero probabilities and output.

struct AttnDims {
    u64 batch, heads, kv_heads, q_len, kv_len, head_dim;
};

__device__ __forceinline__ const float* q_row(const float* q, AttnDims d, u64 b, u64 t, u64 h) {
    return q + ((b * d.q_len + t) * d.heads + h) * d.head_dim;
}

__device__ __forceinline__ const float* kv_row(const float* k, AttnDims d, u64 b, u64 t, u64 hk) {
    return k + ((b * d.kv_len + t) * d.kv_heads + hk) * d.head_dim;
}

__device__ __forceinline__ float dot(const float* a, const float* b, u64 n) {
    float acc = 0.0f;
    for (u64 i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

__device__ __forceinline__ bool attends(const unsigned char* mask, int has_mask, AttnDims d, u64 b, u64 j) {
    return !has_mask || mask[b * d.kv_len + j] != 0;
}

// One thread per (b, h, tq) row of probs: scores, masked softmax.
extern "C" __global__ void attention_probs(float* probs, const float* q, const float* k,
                                           const unsigned char* mask, int has_mask, AttnDims d, float scale) {
    u64 i = thread_index();
    if (i >= d.batch * d.heads * d.q_len) return;
    u64 b = i / (d.heads * d.q_len), h = i / d.q_len % d.heads, t = i % d.q_len;
    u64 hk = h / (d.heads / d.kv_heads);
    const float* qr = q_row(q, d, b, t, h);
    float* p = probs + i * d.kv_len;
    float mx = NEG_INF;
    for (u64 j = 0; j < d.kv_len; ++j) {
        p[j] = scale * dot(qr, kv_row(k, d, b, j, hk), d.head_dim);
        if (attends(mask, has_mask, d, b, j)) mx = fmaxf(mx, p[j]);
    }
    if (mx == NEG_INF) {
        for (u64 j = 0; j < d.kv_len; ++j) p[j] = 0.0f;
        return;
    }
    float sum = 0.0f;
    for (u64 j = 0; j < d.kv_len; ++j) {
        p[j] = attends(mask, has_mask, d, b, j) ? expf(p[j] - mx) : 0.0f;
        sum += p[j];
    }
    float inv = 1.0f / sum;
    for (u64 j = 0; j < d.kv_len; ++j) p[j] *= inv;
}

// One thread per element of out: out[b, t, h, :] = sum_j probs[b, h, t, j] v[b, j, hk, :].
extern "C" __global__ void attention_apply(float* out, const float* probs, const float* v, AttnDims d) {
    u64 i = thread_index();
    if (i >= d.batch * d.q_len * d.heads * d.head_dim) return;
    u64 c = i % d.head_dim, h = i / d.head_dim % d.heads, t = i / (d.head_dim * d.heads) % d.q_len;
    u64 b = i / (d.head_dim * d.heads * d.q_len);
    u64 hk = h / (d.heads / d.kv_heads);
    const float* p = probs + ((b * d.heads + h) * d.q_len + t) * d.kv_len;
    float acc = 0.0f;
    for (u64 j = 0; j < d.kv_len; ++j) acc += p[j] * kv_row(v, d, b, j, hk)[c];
    out[i] = acc;
}

// Inference: one thread per (b, tq, h) query row; scores are recomputed in
// each of three passes (max, sum, weighted values), so no probability is kept.
extern "C" __global__ void attention_infer(float* out, const float* q, const float* k, const float* v,
                                           const unsigned char* mask, int has_mask, AttnDims d, float scale) {
    u64 i = thread_index();
    if (i >= d.batch * d.q_len * d.heads) return;
    u64 b = i / (d.q_len * d.heads), t = i / d.heads % d.q_len, h = i % d.heads;
    u64 hk = h / (d.heads / d.kv_heads);
    const float* qr = q_row(q, d, b, t, h);
    float* o = out + i * d.head_dim;
    for (u64 c = 0; c < d.head_dim; ++c) o[c] = 0.0f;
    float mx = NEG_INF;
    for (u64 j = 0; j < d.kv_len; ++j)
        if (attends(mask, has_mask, d, b, j)) mx = fmaxf(mx, scale * dot(qr, kv_row(k, d, b, j, hk), d.head_dim));
    if (mx == NEG_INF) return;
    float sum = 0.0f;
    for (u64 j = 0; j < d.kv_len; ++j)
        if (attends(mask, has_mask, d, b, j)) sum += expf(scale * dot(qr, kv_row(k, d, b, j, hk), d.head_dim) - mx);
    float inv = 1.0f / sum;
    for (u64 j = 0; j < d.kv_len; ++j) {
        if (!attends(mask, has_mask, d, b, j)) continue;
        float p = expf(scale * dot(qr, kv_row(k, d, b, j, hk), d.head_dim) - mx) * inv;
        const float* vr = kv_row(v, d, b, j, hk);
        for (u64 c = 0; c < d.head_dim; ++c) o[c] += p * vr[c];
    }
}

// Backward, step 1: one thread per (b, h, tq) row. delta = sum_j p_j dp_j with
// dp_j = <dout, v_j> (kept for step 2), and dq = scale sum_j p_j (dp_j - delta) k_j.
extern "C" __global__ void attention_backward_dq(float* dq, float* delta, const float* dout, const float* probs,
                                                 const float* k, const float* v, AttnDims d, float scale) {
    u64 i = thread_index();
    if (i >= d.batch * d.heads * d.q_len) return;
    u64 b = i / (d.heads * d.q_len), h = i / d.q_len % d.heads, t = i % d.q_len;
    u64 hk = h / (d.heads / d.kv_heads);
    const float* g = q_row(dout, d, b, t, h);
    const float* p = probs + i * d.kv_len;
    float dl = 0.0f;
    for (u64 j = 0; j < d.kv_len; ++j) dl += p[j] * dot(g, kv_row(v, d, b, j, hk), d.head_dim);
    delta[i] = dl;
    float* o = dq + ((b * d.q_len + t) * d.heads + h) * d.head_dim;
    for (u64 c = 0; c < d.head_dim; ++c) o[c] = 0.0f;
    for (u64 j = 0; j < d.kv_len; ++j) {
        float ds = p[j] * (dot(g, kv_row(v, d, b, j, hk), d.head_dim) - dl) * scale;
        const float* kr = kv_row(k, d, b, j, hk);
        for (u64 c = 0; c < d.head_dim; ++c) o[c] += ds * kr[c];
    }
}

// Backward, step 2: one thread per (b, tk, hk) key row, owning its dk and dv
// rows: the query heads of its group and their queries summed in order.
extern "C" __global__ void attention_backward_dkv(float* dk, float* dv, const float* delta, const float* dout,
                                                  const float* probs, const float* q, const float* v,
                                                  AttnDims d, float scale) {
    u64 i = thread_index();
    if (i >= d.batch * d.kv_len * d.kv_heads) return;
    u64 b = i / (d.kv_len * d.kv_heads), j = i / d.kv_heads % d.kv_len, hk = i % d.kv_heads;
    u64 group = d.heads / d.kv_heads;
    float* dkr = dk + i * d.head_dim;
    float* dvr = dv + i * d.head_dim;
    for (u64 c = 0; c < d.head_dim; ++c) {
        dkr[c] = 0.0f;
        dvr[c] = 0.0f;
    }
    const float* vr = kv_row(v, d, b, j, hk);
    for (u64 h = hk * group; h < (hk + 1) * group; ++h) {
        for (u64 t = 0; t < d.q_len; ++t) {
            u64 row = (b * d.heads + h) * d.q_len + t;
            float p = probs[row * d.kv_len + j];
            const float* g = q_row(dout, d, b, t, h);
            float ds = p * (dot(g, vr, d.head_dim) - delta[row]) * scale;
            const float* qr = q_row(q, d, b, t, h);
            for (u64 c = 0; c < d.head_dim; ++c) {
                dvr[c] += p * g[c];
                dkr[c] += ds * qr[c];
            }
        }
    }
}
