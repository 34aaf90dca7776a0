// out: [cols]; inp: [rows, cols]. One thread per column, rows summed in order.
extern "C" __global__ void sum_rows(float* out, const float* inp, u64 rows, u64 cols, int accumulate) {
    u64 c = thread_index();
    if (c >= cols) return;
    float acc = 0.0f;
    for (u64 r = 0; r < rows; ++r) acc = __fadd_rn(acc, inp[r * cols + c]);
    out[c] = accumulate ? __fadd_rn(out[c], acc) : acc;
}

// out, inp: [rows, cols]. One thread per row, max-subtracted.
extern "C" __global__ void softmax_rows(float* out, const float* inp, u64 rows, u64 cols) {
    u64 r = thread_index();
    if (r >= rows) return;
    const float* x = inp + r * cols;
    float* y = out + r * cols;
    float mx = x[0];
    for (u64 c = 1; c < cols; ++c) mx = fmaxf(mx, x[c]);
    float sum = 0.0f;
    for (u64 c = 0; c < cols; ++c) {
        float e = expf(x[c] - mx);
        y[c] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (u64 c = 0; c < cols; ++c) y[c] *= inv;
}

// dinp, dout, out: [rows, cols]. dinp = out * (dout - sum(dout * out)).
extern "C" __global__ void softmax_rows_backward(float* dinp, const float* dout, const float* out, u64 rows, u64 cols) {
    u64 r = thread_index();
    if (r >= rows) return;
    u64 base = r * cols;
    float dot = 0.0f;
    for (u64 c = 0; c < cols; ++c) dot += dout[base + c] * out[base + c];
    for (u64 c = 0; c < cols; ++c) dinp[base + c] = out[base + c] * (dout[base + c] - dot);
}

// out, inp: [rows, cols]; mean, rstd: [rows]; weight, bias: [cols] (has_* = 0:
// absent, the pointer unused). One thread per row, two passes in the CPU
// backend's order: mean, centred variance, then the affine map.
extern "C" __global__ void layer_norm(float* out, float* mean, float* rstd, const float* inp,
                                      const float* weight, int has_weight, const float* bias, int has_bias,
                                      u64 rows, u64 cols, float eps) {
    u64 r = thread_index();
    if (r >= rows) return;
    if (cols == 0) {
        mean[r] = 0.0f;
        rstd[r] = 1.0f / sqrtf(eps);
        return;
    }
    const float* x = inp + r * cols;
    float* y = out + r * cols;
    float sum = 0.0f;
    for (u64 c = 0; c < cols; ++c) sum = __fadd_rn(sum, x[c]);
    float m = __fdiv_rn(sum, (float)cols);
    float var = 0.0f;
    for (u64 c = 0; c < cols; ++c) {
        float d = __fsub_rn(x[c], m);
        var = __fadd_rn(var, __fmul_rn(d, d));
    }
    var = __fdiv_rn(var, (float)cols);
    float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for (u64 c = 0; c < cols; ++c) {
        float norm = __fmul_rn(__fsub_rn(x[c], m), s);
        float w = has_weight ? weight[c] : 1.0f;
        float b = has_bias ? bias[c] : 0.0f;
        y[c] = __fadd_rn(__fmul_rn(norm, w), b);
    }
    mean[r] = m;
    rstd[r] = s;
}

// dinp, dout, inp: [rows, cols]; mean, rstd: [rows]; weight: [cols]. One thread
// per row; overwrites dinp.
extern "C" __global__ void layer_norm_backward_input(float* dinp, const float* dout, const float* inp,
                                                     const float* mean, const float* rstd,
                                                     const float* weight, int has_weight, u64 rows, u64 cols) {
    u64 r = thread_index();
    if (r >= rows) return;
    const float* d = dout + r * cols;
    const float* x = inp + r * cols;
    float* di = dinp + r * cols;
    float mu = mean[r], rs = rstd[r];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (u64 c = 0; c < cols; ++c) {
        float norm = __fmul_rn(__fsub_rn(x[c], mu), rs);
        float dnorm = __fmul_rn(d[c], has_weight ? weight[c] : 1.0f);
        dnorm_mean = __fadd_rn(dnorm_mean, dnorm);
        dnorm_norm_mean = __fadd_rn(dnorm_norm_mean, __fmul_rn(dnorm, norm));
    }
    dnorm_mean = __fdiv_rn(dnorm_mean, (float)cols);
    dnorm_norm_mean = __fdiv_rn(dnorm_norm_mean, (float)cols);
    for (u64 c = 0; c < cols; ++c) {
        float norm = __fmul_rn(__fsub_rn(x[c], mu), rs);
        float dnorm = __fmul_rn(d[c], has_weight ? weight[c] : 1.0f);
        di[c] = __fmul_rn(__fsub_rn(__fsub_rn(dnorm, dnorm_mean), __fmul_rn(norm, dnorm_norm_mean)), rs);
    }
}

// dweight, dbias: [cols] (accumulated; has_* = 0: absent); dout, inp: [rows, cols].
// One thread per column; partial sums over fixed chunks of `chunk_rows` rows,
// added in order, as the CPU backend does (the same bits).
extern "C" __global__ void layer_norm_backward_params(float* dweight, int has_dweight, float* dbias, int has_dbias,
                                                      const float* dout, const float* inp,
                                                      const float* mean, const float* rstd,
                                                      u64 rows, u64 cols, u64 chunk_rows) {
    u64 c = thread_index();
    if (c >= cols) return;
    float dw = has_dweight ? dweight[c] : 0.0f;
    float db = has_dbias ? dbias[c] : 0.0f;
    for (u64 r0 = 0; r0 < rows; r0 += chunk_rows) {
        float pw = 0.0f, pb = 0.0f;
        u64 r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
        for (u64 r = r0; r < r1; ++r) {
            float g = dout[r * cols + c];
            float norm = __fmul_rn(__fsub_rn(inp[r * cols + c], mean[r]), rstd[r]);
            pw = __fadd_rn(pw, __fmul_rn(g, norm));
            pb = __fadd_rn(pb, g);
        }
        dw = __fadd_rn(dw, pw);
        db = __fadd_rn(db, pb);
    }
    if (has_dweight) dweight[c] = dw;
    if (has_dbias) dbias[c] = db;
}
