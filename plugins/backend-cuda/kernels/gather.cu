// Gather, scatter-add and gather-dot over rows. Indices are bounds-checked on
// the host before the launch and again here (an index out of range is skipped,
// never read or written).

// out: [n_idx, cols]; inp: [rows, cols]; idx: [n_idx].
extern "C" __global__ void gather_rows(float* out, const float* inp, const u32* idx, u64 n_idx, u64 cols, u64 rows) {
    u64 i = thread_index();
    if (i >= n_idx * cols) return;
    u64 r = i / cols, c = i % cols;
    u64 src = idx[r];
    if (src < rows) out[i] = inp[src * cols + c];
}

// out: [rows, cols]; inp: [n_idx, cols]; idx, scale: [n_idx]. One thread per
// column, indices visited in order, so repeated indices add up deterministically.
extern "C" __global__ void scatter_add_rows(float* out, const float* inp, const u32* idx,
                                           const float* scale, int has_scale, u64 n_idx, u64 cols, u64 rows) {
    u64 c = thread_index();
    if (c >= cols) return;
    for (u64 i = 0; i < n_idx; ++i) {
        u64 dst = idx[i];
        if (dst >= rows) continue;
        float s = has_scale ? scale[i] : 1.0f;
        out[dst * cols + c] = __fadd_rn(out[dst * cols + c], __fmul_rn(s, inp[i * cols + c]));
    }
}

// out: [n]; a: [rows, cols]; idx: [n]; b: [n, cols]. out[i] = <a[idx[i]], b[i]>,
// summed over the columns in order.
extern "C" __global__ void gather_dot(float* out, const float* a, const u32* idx, const float* b,
                                      u64 n, u64 cols, u64 rows) {
    u64 i = thread_index();
    if (i >= n) return;
    u64 src = idx[i];
    if (src >= rows) return;
    float acc = 0.0f;
    for (u64 c = 0; c < cols; ++c) acc = __fadd_rn(acc, __fmul_rn(a[src * cols + c], b[i * cols + c]));
    out[i] = acc;
}
