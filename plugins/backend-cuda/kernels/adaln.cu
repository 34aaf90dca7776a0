// adaLN: chunk j of sample b of a modulation [B, chunks * d] starts at
// (b * chunks + j) * d. Activations [B, T, d]. Element-wise parts: one thread
// per element; the parameter gradients: one thread per (sample, channel),
// tokens summed in order into the existing value (the CPU backend's order).

__device__ __forceinline__ u64 chunk_at(u64 b, u64 chunks, u64 j, u64 d, u64 c) {
    return (b * chunks + j) * d + c;
}

// out = x * (1 + scale) + shift
extern "C" __global__ void modulate(Ten out, Ten inp, Ten mod, u64 batch, u64 tokens, u64 d, u64 chunks,
                                    u64 first, u64 second) {
    FOR_EACH(i, batch * tokens * d) {
        u64 b = i / (tokens * d), c = i % d;
        float h = ld(mod, chunk_at(b, chunks, first, d, c));
        float s = ld(mod, chunk_at(b, chunks, second, d, c));
        st(out, i, __fadd_rn(__fmul_rn(ld(inp, i), __fadd_rn(1.0f, s)), h));
    }
}

// dinp = dout * (1 + scale)
extern "C" __global__ void modulate_backward_input(Ten dinp, Ten dout, Ten mod, u64 batch, u64 tokens, u64 d,
                                                   u64 chunks, u64 second) {
    FOR_EACH(i, batch * tokens * d) {
        u64 b = i / (tokens * d), c = i % d;
        st(dinp, i, __fmul_rn(ld(dout, i), __fadd_rn(1.0f, ld(mod, chunk_at(b, chunks, second, d, c)))));
    }
}

// dshift += sum_t dout; dscale += sum_t dout * inp
extern "C" __global__ void modulate_backward_params(Ten dmod, Ten dout, Ten inp, u64 batch, u64 tokens, u64 d,
                                                    u64 chunks, u64 first, u64 second) {
    FOR_EACH(i, batch * d) {
        u64 b = i / d, c = i % d;
        u64 base = b * tokens * d + c;
        float sh = ld(dmod, chunk_at(b, chunks, first, d, c));
        for (u64 t = 0; t < tokens; ++t) sh = __fadd_rn(sh, ld(dout, base + t * d));
        st(dmod, chunk_at(b, chunks, first, d, c), sh);
        float sc = ld(dmod, chunk_at(b, chunks, second, d, c));
        for (u64 t = 0; t < tokens; ++t) sc = __fadd_rn(sc, __fmul_rn(ld(dout, base + t * d), ld(inp, base + t * d)));
        st(dmod, chunk_at(b, chunks, second, d, c), sc);
    }
}

// x += gate * y
extern "C" __global__ void gated_residual(Ten x, Ten y, Ten mod, u64 batch, u64 tokens, u64 d, u64 chunks,
                                          u64 first) {
    FOR_EACH(i, batch * tokens * d) {
        u64 b = i / (tokens * d), c = i % d;
        st(x, i, __fadd_rn(ld(x, i), __fmul_rn(ld(mod, chunk_at(b, chunks, first, d, c)), ld(y, i))));
    }
}

// dy = gate * dx
extern "C" __global__ void gated_residual_backward_input(Ten dy, Ten dx, Ten mod, u64 batch, u64 tokens, u64 d,
                                                         u64 chunks, u64 first) {
    FOR_EACH(i, batch * tokens * d) {
        u64 b = i / (tokens * d), c = i % d;
        st(dy, i, __fmul_rn(ld(mod, chunk_at(b, chunks, first, d, c)), ld(dx, i)));
    }
}

// dgate += sum_t dx * y
extern "C" __global__ void gated_residual_backward_params(Ten dmod, Ten dx, Ten y, u64 batch, u64 tokens, u64 d,
                                                          u64 chunks, u64 first) {
    FOR_EACH(i, batch * d) {
        u64 b = i / d, c = i % d;
        u64 base = b * tokens * d + c;
        float acc = ld(dmod, chunk_at(b, chunks, first, d, c));
        for (u64 t = 0; t < tokens; ++t) acc = __fadd_rn(acc, __fmul_rn(ld(dx, base + t * d), ld(y, base + t * d)));
        st(dmod, chunk_at(b, chunks, first, d, c), acc);
    }
}
