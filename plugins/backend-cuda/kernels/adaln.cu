// adaLN: chunk j of sample b of a modulation [B, chunks * d] starts at
// (b * chunks + j) * d. Activations [B, T, d]. Element-wise parts: one thread
// per element; the parameter gradients: one thread per (sample, channel),
// tokens summed in order into the existing value (the CPU backend's order).

__device__ __forceinline__ u64 chunk_at(u64 b, u64 chunks, u64 j, u64 d, u64 c) {
    return (b * chunks + j) * d + c;
}

// out = x * (1 + scale) + shift
extern "C" __global__ void modulate(float* out, const float* inp, const float* mod,
                                    u64 batch, u64 tokens, u64 d, u64 chunks, u64 first, u64 second) {
    u64 i = thread_index();
    if (i >= batch * tokens * d) return;
    u64 b = i / (tokens * d), c = i % d;
    float h = mod[chunk_at(b, chunks, first, d, c)];
    float s = mod[chunk_at(b, chunks, second, d, c)];
    out[i] = __fadd_rn(__fmul_rn(inp[i], __fadd_rn(1.0f, s)), h);
}

// dinp = dout * (1 + scale)
extern "C" __global__ void modulate_backward_input(float* dinp, const float* dout, const float* mod,
                                                   u64 batch, u64 tokens, u64 d, u64 chunks, u64 second) {
    u64 i = thread_index();
    if (i >= batch * tokens * d) return;
    u64 b = i / (tokens * d), c = i % d;
    dinp[i] = __fmul_rn(dout[i], __fadd_rn(1.0f, mod[chunk_at(b, chunks, second, d, c)]));
}

// dshift += sum_t dout; dscale += sum_t dout * inp
extern "C" __global__ void modulate_backward_params(float* dmod, const float* dout, const float* inp,
                                                    u64 batch, u64 tokens, u64 d, u64 chunks, u64 first, u64 second) {
    u64 i = thread_index();
    if (i >= batch * d) return;
    u64 b = i / d, c = i % d;
    const float* g = dout + b * tokens * d;
    const float* x = inp + b * tokens * d;
    float sh = dmod[chunk_at(b, chunks, first, d, c)];
    for (u64 t = 0; t < tokens; ++t) sh = __fadd_rn(sh, g[t * d + c]);
    dmod[chunk_at(b, chunks, first, d, c)] = sh;
    float sc = dmod[chunk_at(b, chunks, second, d, c)];
    for (u64 t = 0; t < tokens; ++t) sc = __fadd_rn(sc, __fmul_rn(g[t * d + c], x[t * d + c]));
    dmod[chunk_at(b, chunks, second, d, c)] = sc;
}

// x += gate * y
extern "C" __global__ void gated_residual(float* x, const float* y, const float* mod,
                                          u64 batch, u64 tokens, u64 d, u64 chunks, u64 first) {
    u64 i = thread_index();
    if (i >= batch * tokens * d) return;
    u64 b = i / (tokens * d), c = i % d;
    x[i] = __fadd_rn(x[i], __fmul_rn(mod[chunk_at(b, chunks, first, d, c)], y[i]));
}

// dy = gate * dx
extern "C" __global__ void gated_residual_backward_input(float* dy, const float* dx, const float* mod,
                                                         u64 batch, u64 tokens, u64 d, u64 chunks, u64 first) {
    u64 i = thread_index();
    if (i >= batch * tokens * d) return;
    u64 b = i / (tokens * d), c = i % d;
    dy[i] = __fmul_rn(mod[chunk_at(b, chunks, first, d, c)], dx[i]);
}

// dgate += sum_t dx * y
extern "C" __global__ void gated_residual_backward_params(float* dmod, const float* dx, const float* y,
                                                          u64 batch, u64 tokens, u64 d, u64 chunks, u64 first) {
    u64 i = thread_index();
    if (i >= batch * d) return;
    u64 b = i / d, c = i % d;
    const float* g = dx + b * tokens * d;
    const float* v = y + b * tokens * d;
    float acc = dmod[chunk_at(b, chunks, first, d, c)];
    for (u64 t = 0; t < tokens; ++t) acc = __fadd_rn(acc, __fmul_rn(g[t * d + c], v[t * d + c]));
    dmod[chunk_at(b, chunks, first, d, c)] = acc;
}
