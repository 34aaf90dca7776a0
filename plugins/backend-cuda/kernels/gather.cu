// Gather, scatter-add and gather-dot over rows. An index out of range is
// never read or written through: it is flagged in the status words (read at
// the next download) and its output is zero (gather) or left out (scatter).

// Status bits of the ops that check row indices (crate::status).
#define BAD_GATHER 1u
#define BAD_SCATTER 2u
#define BAD_GATHER_DOT 4u

// out: [n_idx, cols]; inp: [rows, cols]; idx: [n_idx]. One thread per element.
extern "C" __global__ void gather_rows(Ten out, Ten inp, const u32* idx, u64 n_idx, u64 cols, u64 rows,
                                       u32* status) {
    FOR_EACH(i, n_idx * cols) {
        u64 r = i / cols, c = i % cols;
        u32 src = idx[r];
        if (src < rows) {
            st(out, i, ld(inp, (u64)src * cols + c));
        } else {
            if (c == 0) flag_bad_index(status, BAD_GATHER, src);
            st(out, i, 0.0f);
        }
    }
}

// The scatter-add runs in four steps over u32 scratch, so that every output
// element is computed by one thread, its sources added in increasing i (the
// CPU backend's order, deterministic for repeated indices), in parallel over
// rows and columns:
// 1. count[r] = sources of row r;
extern "C" __global__ void scatter_count(u32* count, const u32* idx, u64 n_idx, u64 rows, u32* status) {
    FOR_EACH(i, n_idx) {
        u32 r = idx[i];
        if (r < rows) {
            atomicAdd(count + r, 1u);
        } else {
            flag_bad_index(status, BAD_SCATTER, r);
        }
    }
}

// 2. start[r] = sum of count[..r] (start: [rows + 1]), one block of BLOCK
//    threads, each owning a contiguous run of rows;
extern "C" __global__ void scatter_scan(u32* start, const u32* count, u64 rows) {
    __shared__ u32 part[BLOCK];
    u64 per = (rows + BLOCK - 1) / BLOCK;
    u64 r0 = threadIdx.x * per < rows ? threadIdx.x * per : rows;
    u64 r1 = r0 + per < rows ? r0 + per : rows;
    u32 own = 0;
    for (u64 r = r0; r < r1; ++r) own += count[r];
    part[threadIdx.x] = own;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 acc = 0;
        for (u32 t = 0; t < BLOCK; ++t) {
            u32 c = part[t];
            part[t] = acc;
            acc += c;
        }
        start[rows] = acc;
    }
    __syncthreads();
    u32 acc = part[threadIdx.x];
    for (u64 r = r0; r < r1; ++r) {
        start[r] = acc;
        acc += count[r];
    }
}

// 3. each source i put in its row's run of `order` (in any order: fill is a
//    zeroed cursor per row);
extern "C" __global__ void scatter_place(u32* order, u32* fill, const u32* start, const u32* idx, u64 n_idx,
                                         u64 rows) {
    FOR_EACH(i, n_idx) {
        u32 r = idx[i];
        if (r < rows) order[start[r] + atomicAdd(fill + r, 1u)] = (u32)i;
    }
}

// 4. each row's run sorted (insertion: runs are a few sources long), then
//    out[r, c] += scale[i] * inp[i, c] for the run's sources in order, each
//    output element read and written once.
extern "C" __global__ void scatter_sort(u32* order, const u32* start, u64 rows) {
    FOR_EACH(r, rows) {
        u32 s0 = start[r], s1 = start[r + 1];
        for (u32 j = s0 + 1; j < s1; ++j) {
            u32 v = order[j];
            u32 k = j;
            while (k > s0 && order[k - 1] > v) {
                order[k] = order[k - 1];
                --k;
            }
            order[k] = v;
        }
    }
}

// out: [rows, cols]; inp: [n_idx, cols]; scale: [n_idx] (has_scale = 0: absent).
extern "C" __global__ void scatter_apply(Ten out, Ten inp, const u32* order, const u32* start, Ten scale,
                                         int has_scale, u64 rows, u64 cols) {
    FOR_EACH(i, rows * cols) {
        u64 r = i / cols, c = i % cols;
        u32 s0 = start[r], s1 = start[r + 1];
        if (s0 == s1) continue;
        float acc = ld(out, i);
        for (u32 j = s0; j < s1; ++j) {
            u64 src = order[j];
            float s = has_scale ? ld(scale, src) : 1.0f;
            acc = __fadd_rn(acc, __fmul_rn(s, ld(inp, src * cols + c)));
        }
        st(out, i, acc);
    }
}

// out: [n]; a: [rows, cols]; idx: [n]; b: [n, cols]. out[i] = <a[idx[i]], b[i]>,
// summed over the columns in order (Rust's `sum`, from -0.0).
extern "C" __global__ void gather_dot(Ten out, Ten a, const u32* idx, Ten b, u64 n, u64 cols, u64 rows,
                                      u32* status) {
    FOR_EACH(i, n) {
        u32 src = idx[i];
        if (src >= rows) {
            flag_bad_index(status, BAD_GATHER_DOT, src);
            st(out, i, 0.0f);
            continue;
        }
        float acc = -0.0f;
        for (u64 c = 0; c < cols; ++c)
            acc = __fadd_rn(acc, __fmul_rn(ld(a, (u64)src * cols + c), ld(b, i * cols + c)));
        st(out, i, acc);
    }
}
