// Row ops. Where the CPU backend sums a row in 16 independent lanes (its
// `lane_wise` / `lane_sum`: softmax, layer norm), a half-warp does the same:
// lane l of 16 sums elements 16 j + l, the lanes are folded in order, then the
// tail; so the bits are the CPU's. Sequential sums of the CPU stay sequential
// here (one thread per row or column).

// Rows handled by the half-warps of a block: half-warp h of block b starts at
// row 16 b + h and strides by 16 * gridDim.x. Every lane of a warp runs the
// loop the same number of times (the shuffles need the whole warp), so rows
// past the end are computed on nothing and not stored.
#define FOR_EACH_ROW16(base) for (u64 base = (u64)blockIdx.x * 16; base < rows; base += (u64)gridDim.x * 16)

// out: [cols]; inp: [rows, cols]. One thread per column, rows summed in order
// into the old value when accumulating (the CPU's order).
extern "C" __global__ void sum_rows(Ten out, Ten inp, u64 rows, u64 cols, int accumulate) {
    FOR_EACH(c, cols) {
        float acc = accumulate ? ld(out, c) : 0.0f;
        for (u64 r = 0; r < rows; ++r) acc = __fadd_rn(acc, ld(inp, r * cols + c));
        st(out, c, acc);
    }
}

// out, inp: [rows, cols]. Max-subtracted softmax with the CPU's exp; every
// output written once (exponentials recomputed for the final pass).
extern "C" __global__ void softmax_rows(Ten out, Ten inp, u64 rows, u64 cols) {
    u64 lane = threadIdx.x % 16, full = cols / 16;
    FOR_EACH_ROW16(base) {
        u64 r = base + threadIdx.x / 16;
        bool active = r < rows;
        u64 row = (active ? r : 0) * cols;
        float mx = NEG_INF;
        for (u64 j = 0; active && j < full; ++j) {
            float x = ld(inp, row + 16 * j + lane);
            if (x > mx) mx = x;
        }
        mx = max_lanes16(mx);
        for (u64 c = 16 * full; active && c < cols; ++c) {
            float x = ld(inp, row + c);
            if (x > mx) mx = x;
        }
        float acc = 0.0f;
        for (u64 j = 0; active && mx != NEG_INF && j < full; ++j)
            acc = __fadd_rn(acc, exp_cpu(__fsub_rn(ld(inp, row + 16 * j + lane), mx)));
        float sum = fold_lanes16(acc, 0.0f);
        if (!active) continue;
        if (mx == NEG_INF) {
            for (u64 c = lane; c < cols; c += 16) st(out, row + c, 0.0f);
            continue;
        }
        for (u64 c = 16 * full; c < cols; ++c) sum = __fadd_rn(sum, exp_cpu(__fsub_rn(ld(inp, row + c), mx)));
        float inv = __fdiv_rn(1.0f, sum);
        for (u64 c = lane; c < cols; c += 16) st(out, row + c, __fmul_rn(exp_cpu(__fsub_rn(ld(inp, row + c), mx)), inv));
    }
}

// dinp, dout, out: [rows, cols]. dinp = out * (dout - sum(dout * out)), the
// sum in order (Rust's `sum` starts at -0.0). One thread per row.
extern "C" __global__ void softmax_rows_backward(Ten dinp, Ten dout, Ten out, u64 rows, u64 cols) {
    FOR_EACH(r, rows) {
        u64 base = r * cols;
        float dot = -0.0f;
        for (u64 c = 0; c < cols; ++c) dot = __fadd_rn(dot, __fmul_rn(ld(dout, base + c), ld(out, base + c)));
        for (u64 c = 0; c < cols; ++c)
            st(dinp, base + c, __fmul_rn(ld(out, base + c), __fsub_rn(ld(dout, base + c), dot)));
    }
}

// out, scores: [rows, experts], f32. The host routers' softmax
// (routing_math::softmax_row) to the bit: max, exp(x - max) with the host's
// exp (exp_fma: its build), a sequential sum, one reciprocal. One thread per row.
extern "C" __global__ void router_softmax(float* out, const float* scores, u64 rows, u64 experts, int exp_fma) {
    FOR_EACH(r, rows) {
        const float* x = scores + r * experts;
        float* p = out + r * experts;
        float mx = NEG_INF;
        for (u64 e = 0; e < experts; ++e) mx = fmaxf(mx, x[e]);
        float sum = 0.0f;
        for (u64 e = 0; e < experts; ++e) {
            p[e] = exp_exact(__fsub_rn(x[e], mx), exp_fma);
            sum = __fadd_rn(sum, p[e]);
        }
        float inv = __fdiv_rn(1.0f, sum);
        for (u64 e = 0; e < experts; ++e) p[e] = __fmul_rn(p[e], inv);
    }
}

// out, inp: [rows, cols]; mean, rstd: [rows]; weight, bias: [cols] (has_* = 0:
// absent, unused). The CPU's two passes in 16 lanes: mean, centred variance,
// then the affine map.
extern "C" __global__ void layer_norm(Ten out, Ten mean, Ten rstd, Ten inp, Ten weight, int has_weight,
                                      Ten bias, int has_bias, u64 rows, u64 cols, float eps) {
    u64 lane = threadIdx.x % 16, full = cols / 16;
    float fcols = (float)cols;
    FOR_EACH_ROW16(base) {
        u64 r = base + threadIdx.x / 16;
        bool active = r < rows;
        u64 row = (active ? r : 0) * cols;
        float acc = 0.0f;
        for (u64 j = 0; active && j < full; ++j) acc = __fadd_rn(acc, ld(inp, row + 16 * j + lane));
        float sum = fold_lanes16(acc, 0.0f);
        for (u64 c = 16 * full; active && c < cols; ++c) sum = __fadd_rn(sum, ld(inp, row + c));
        float m = __fdiv_rn(sum, fcols);
        acc = 0.0f;
        for (u64 j = 0; active && j < full; ++j) {
            float d = __fsub_rn(ld(inp, row + 16 * j + lane), m);
            acc = __fadd_rn(acc, __fmul_rn(d, d));
        }
        float var = fold_lanes16(acc, 0.0f);
        if (!active) continue;
        if (cols == 0) {
            if (lane == 0) {
                st(mean, r, 0.0f);
                st(rstd, r, __fdiv_rn(1.0f, __fsqrt_rn(eps)));
            }
            continue;
        }
        for (u64 c = 16 * full; c < cols; ++c) {
            float d = __fsub_rn(ld(inp, row + c), m);
            var = __fadd_rn(var, __fmul_rn(d, d));
        }
        var = __fdiv_rn(var, fcols);
        float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
        for (u64 c = lane; c < cols; c += 16) {
            float norm = __fmul_rn(__fsub_rn(ld(inp, row + c), m), s);
            if (has_weight || has_bias) {
                float w = has_weight ? ld(weight, c) : 1.0f;
                float b = has_bias ? ld(bias, c) : 0.0f;
                norm = __fadd_rn(__fmul_rn(norm, w), b);
            }
            st(out, row + c, norm);
        }
        if (lane == 0) {
            st(mean, r, m);
            st(rstd, r, s);
        }
    }
}

// dinp, dout, inp: [rows, cols]; mean, rstd: [rows]; weight: [cols]. One
// thread per row, sums in order (the CPU's); overwrites dinp.
extern "C" __global__ void layer_norm_backward_input(Ten dinp, Ten dout, Ten inp, Ten mean, Ten rstd,
                                                     Ten weight, int has_weight, u64 rows, u64 cols) {
    float fcols = (float)cols;
    FOR_EACH(r, rows) {
        u64 row = r * cols;
        float mu = ld(mean, r), rs = ld(rstd, r);
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (u64 c = 0; c < cols; ++c) {
            float norm = __fmul_rn(__fsub_rn(ld(inp, row + c), mu), rs);
            float dnorm = __fmul_rn(ld(dout, row + c), has_weight ? ld(weight, c) : 1.0f);
            dnorm_mean = __fadd_rn(dnorm_mean, dnorm);
            dnorm_norm_mean = __fadd_rn(dnorm_norm_mean, __fmul_rn(dnorm, norm));
        }
        dnorm_mean = __fdiv_rn(dnorm_mean, fcols);
        dnorm_norm_mean = __fdiv_rn(dnorm_norm_mean, fcols);
        for (u64 c = 0; c < cols; ++c) {
            float norm = __fmul_rn(__fsub_rn(ld(inp, row + c), mu), rs);
            float dnorm = __fmul_rn(ld(dout, row + c), has_weight ? ld(weight, c) : 1.0f);
            st(dinp, row + c, __fmul_rn(__fsub_rn(__fsub_rn(dnorm, dnorm_mean), __fmul_rn(norm, dnorm_norm_mean)), rs));
        }
    }
}

// part: [chunks, 2, cols] (f32 scratch); dout, inp: [rows, cols]; mean, rstd:
// [rows]. The layer-norm parameter gradients of each chunk of `chunk_rows`
// rows, rows in order: part[k, 0] = sum dout * norm, part[k, 1] = sum dout.
// One thread per (chunk, column).
extern "C" __global__ void layer_norm_dparams_partial(float* part, Ten dout, Ten inp, Ten mean, Ten rstd,
                                                      u64 rows, u64 cols, u64 chunk_rows) {
    u64 chunks = (rows + chunk_rows - 1) / chunk_rows;
    FOR_EACH(i, chunks * cols) {
        u64 k = i / cols, c = i % cols;
        u64 r1 = (k + 1) * chunk_rows < rows ? (k + 1) * chunk_rows : rows;
        float pw = 0.0f, pb = 0.0f;
        for (u64 r = k * chunk_rows; r < r1; ++r) {
            float g = ld(dout, r * cols + c);
            float norm = __fmul_rn(__fsub_rn(ld(inp, r * cols + c), ld(mean, r)), ld(rstd, r));
            pw = __fadd_rn(pw, __fmul_rn(g, norm));
            pb = __fadd_rn(pb, g);
        }
        part[(2 * k) * cols + c] = pw;
        part[(2 * k + 1) * cols + c] = pb;
    }
}

// dweight, dbias: [cols] (accumulated; has_* = 0: absent); part as above. The
// chunks' partial sums added in chunk order, as the CPU backend does.
extern "C" __global__ void layer_norm_dparams_fold(Ten dweight, int has_dweight, Ten dbias, int has_dbias,
                                                   const float* part, u64 chunks, u64 cols) {
    FOR_EACH(c, cols) {
        if (has_dweight) {
            float acc = ld(dweight, c);
            for (u64 k = 0; k < chunks; ++k) acc = __fadd_rn(acc, part[(2 * k) * cols + c]);
            st(dweight, c, acc);
        }
        if (has_dbias) {
            float acc = ld(dbias, c);
            for (u64 k = 0; k < chunks; ++k) acc = __fadd_rn(acc, part[(2 * k + 1) * cols + c]);
            st(dbias, c, acc);
        }
    }
}
