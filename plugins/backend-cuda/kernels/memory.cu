// dst, src: [n]. Storage conversions of `copy` between f32 and bf16.
extern "C" __global__ void f32_to_bf16_copy(u16* dst, const float* src, u64 n) {
    FOR_EACH(i, n) dst[i] = f32_to_bf16(src[i]);
}

extern "C" __global__ void bf16_to_f32_copy(float* dst, const u16* src, u64 n) {
    FOR_EACH(i, n) dst[i] = bf16_to_f32(src[i]);
}

// y: [n]. y = beta * y, with beta = 0 overwriting (BLAS: even NaN), for
// products with an empty contracted dimension.
extern "C" __global__ void scale_in_place(Ten y, u64 n, float beta) {
    FOR_EACH(i, n) st(y, i, beta == 0.0f ? 0.0f : __fmul_rn(beta, ld(y, i)));
}
