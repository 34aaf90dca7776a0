//! The CPU op families, one file each, forward and backward side by side.
//!
//! Every op takes plain row-major f32 slices (the backend hands them out of
//! tensor views, widening bf16 storage, see `slices.rs`) in the llm.c argument order
//! (outputs, caches, inputs, weights, dimensions), checks the buffer lengths
//! first and returns an error on a mismatch. Ops that split work over rows use
//! rayon's *current* pool, so they run on the backend's pool when called inside
//! `pool.install` (one level of parallelism) and sequentially elsewhere.

pub mod activation;
pub mod adaln;
pub mod attention;
pub mod axpby;
pub mod bias;
pub(crate) mod exp;
pub mod gather;
pub mod gemm;
pub(crate) mod gemm_few_rows;
pub mod norm;
pub mod optim;
pub mod patch;
pub mod router;
pub mod softmax;
pub mod timestep;
pub mod topk;

/// Below this many elements an op runs on one thread: splitting costs more
/// than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

pub(crate) use ecdit_engine::error::numel;

/// Rows per parallel task for a `[rows, cols]` row-wise op: all rows in one
/// task when the op is small, else about four tasks per thread of the current
/// pool, each at least a few thousand elements. Results never depend on it:
/// each row is computed by one task in one fixed order.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    let rows = rows.max(1);
    let elems = rows.saturating_mul(cols);
    if elems < PAR_MIN_ELEMS {
        return rows;
    }
    let tasks = 4 * rayon::current_num_threads();
    let min_rows = 4096usize.div_ceil(cols.max(1));
    rows.div_ceil(tasks).max(min_rows).max(1)
}

/// Lanes of [`lane_wise`]: one AVX-512 register, two AVX2 ones.
pub(crate) const LANES: usize = 16;

/// Folds `row` with `f` in `LANES` independent accumulators, then folds those
/// and the tail in order. A single running max or sum is a chain of dependent
/// instructions (attention's softmax spent most of its time there); separate
/// lanes vectorise. The order is fixed, so results stay deterministic.
#[inline(always)]
pub(crate) fn lane_wise(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &x| f(a, x))
}

/// `sum_i g(row[i])` in `LANES` independent accumulators (see [`lane_wise`]),
/// then the lanes and the tail in order: deterministic, and vectorised.
#[inline(always)]
pub(crate) fn lane_sum(row: &[f32], g: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += g(x);
        }
    }
    let lanes = acc.into_iter().fold(0.0, |a, b| a + b);
    tail.iter().fold(lanes, |a, &x| a + g(x))
}
