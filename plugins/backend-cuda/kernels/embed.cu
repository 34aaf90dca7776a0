// Patchify, unpatchify and timestep features. Tokens are patches in row-major
// order (token row * (W/p) + col); patchify and unpatchify are pure copies.

// The position within a patch row of channel ch at patch pixel (pi, qi):
// channel-major (ch, pi, qi) as a stride-p convolution reads it, or
// channel-fastest (pi, qi, ch) as DiT's final layer writes it.
__device__ __forceinline__ u64 patch_elem(int channels_fastest, u64 ch_n, u64 p, u64 ch, u64 pi, u64 qi) {
    return channels_fastest ? (pi * p + qi) * ch_n + ch : (ch * p + pi) * p + qi;
}

// out: [B, (H/p)(W/p), C p p]; inp: [B, C, H, W]. One thread per image element.
extern "C" __global__ void patchify(float* out, const float* inp, u64 batch, u64 ch_n, u64 h, u64 w, u64 p,
                                    int channels_fastest) {
    u64 i = thread_index();
    if (i >= batch * ch_n * h * w) return;
    u64 b = i / (ch_n * h * w), ch = i / (h * w) % ch_n, y = i / w % h, x = i % w;
    u64 patch = ch_n * p * p, gw = w / p, gh = h / p;
    u64 tok = (b * gh + y / p) * gw + x / p;
    out[tok * patch + patch_elem(channels_fastest, ch_n, p, ch, y % p, x % p)] = inp[i];
}

// The inverse permutation: out: [B, C, H, W]; inp: [B, (H/p)(W/p), C p p].
extern "C" __global__ void unpatchify(float* out, const float* inp, u64 batch, u64 ch_n, u64 h, u64 w, u64 p,
                                      int channels_fastest) {
    u64 i = thread_index();
    if (i >= batch * ch_n * h * w) return;
    u64 b = i / (ch_n * h * w), ch = i / (h * w) % ch_n, y = i / w % h, x = i % w;
    u64 patch = ch_n * p * p, gw = w / p, gh = h / p;
    u64 tok = (b * gh + y / p) * gw + x / p;
    out[i] = inp[tok * patch + patch_elem(channels_fastest, ch_n, p, ch, y % p, x % p)];
}

// out: [B, dim]; t: [B]; freqs: [half] (computed on the host as the CPU backend
// does). out[b] = [cos(t f) | sin(t f)] (| 0 for an odd dim).
extern "C" __global__ void timestep_features(float* out, const float* t, const float* freqs,
                                             u64 batch, u64 dim, u64 half) {
    u64 i = thread_index();
    if (i >= batch * dim) return;
    u64 b = i / dim, c = i % dim;
    if (c >= 2 * half) {
        out[i] = 0.0f;
        return;
    }
    float arg = __fmul_rn(t[b], freqs[c % half]);
    out[i] = c < half ? cosf(arg) : sinf(arg);
}
