// Patchify, unpatchify and timestep features. Tokens are patches in row-major
// order (token row * (W/p) + col); patchify and unpatchify are pure copies.

// The position within a patch row of channel ch at patch pixel (pi, qi):
// channel-major (ch, pi, qi) as a stride-p convolution reads it, or
// channel-fastest (pi, qi, ch) as DiT's final layer writes it.
__device__ __forceinline__ u64 patch_elem(int channels_fastest, u64 ch_n, u64 p, u64 ch, u64 pi, u64 qi) {
    return channels_fastest ? (pi * p + qi) * ch_n + ch : (ch * p + pi) * p + qi;
}

// The patch-row index of image element i of [B, C, H, W].
__device__ __forceinline__ u64 patch_index(u64 i, u64 ch_n, u64 h, u64 w, u64 p, int channels_fastest) {
    u64 b = i / (ch_n * h * w), ch = i / (h * w) % ch_n, y = i / w % h, x = i % w;
    u64 tok = (b * (h / p) + y / p) * (w / p) + x / p;
    return tok * (ch_n * p * p) + patch_elem(channels_fastest, ch_n, p, ch, y % p, x % p);
}

// out: [B, (H/p)(W/p), C p p]; inp: [B, C, H, W]. One thread per image element.
extern "C" __global__ void patchify(Ten out, Ten inp, u64 batch, u64 ch_n, u64 h, u64 w, u64 p,
                                    int channels_fastest) {
    FOR_EACH(i, batch * ch_n * h * w) st(out, patch_index(i, ch_n, h, w, p, channels_fastest), ld(inp, i));
}

// The inverse permutation: out: [B, C, H, W]; inp: [B, (H/p)(W/p), C p p].
extern "C" __global__ void unpatchify(Ten out, Ten inp, u64 batch, u64 ch_n, u64 h, u64 w, u64 p,
                                      int channels_fastest) {
    FOR_EACH(i, batch * ch_n * h * w) st(out, i, ld(inp, patch_index(i, ch_n, h, w, p, channels_fastest)));
}

// out: [B, dim]; t: [B]. out[b] = [cos(t f) | sin(t f)] (| 0 for an odd dim)
// with f_i = exp(scale * i / half), scale = -ln(max_period) (from the host),
// the exp the host's (so the frequencies are the CPU backend's bits); cos and
// sin in double, rounded once.
extern "C" __global__ void timestep_features(Ten out, Ten t, u64 batch, u64 dim, u64 half, float scale,
                                             int exp_fma) {
    FOR_EACH(i, batch * dim) {
        u64 b = i / dim, c = i % dim;
        if (c >= 2 * half) {
            st(out, i, 0.0f);
            continue;
        }
        u64 k = c % half;
        float f = exp_exact(__fdiv_rn(__fmul_rn(scale, (float)k), (float)half), exp_fma);
        double arg = (double)__fmul_rn(ld(t, b), f);
        st(out, i, __double2float_rn(c < half ? cos(arg) : sin(arg)));
    }
}
