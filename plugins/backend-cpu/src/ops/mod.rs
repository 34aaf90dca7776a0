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
pub mod norm;
pub mod optim;
pub mod patch;
pub mod router;
pub mod softmax;
pub mod timestep;
pub mod topk;

use ecdit_engine::error::{EngineError, Result};

/// Below this many elements an op runs on one thread: splitting costs more
/// than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// The product of `dims`, or an error naming the op if it overflows.
pub(crate) fn numel(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| EngineError::shape(op, "dimensions whose product fits in usize", format!("{dims:?}")))
}

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
