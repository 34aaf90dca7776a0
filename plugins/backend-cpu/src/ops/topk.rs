//! Per-row top-k (expert-choice routing picks each expert's tokens with it).

use super::numel;
use ecdit_engine::error::{check_len, EngineError, Result};
use rayon::prelude::*;
use std::cmp::Ordering;

/// The selection order: larger value first, then lower column; NaN ranks
/// below every number so it is picked last.
fn rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    let by_value = match (a.0.is_nan(), b.0.is_nan()) {
        (false, false) => b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => Ordering::Equal,
    };
    by_value.then(a.1.cmp(&b.1))
}

/// Per row, the `k` largest values in descending order, ties to the lower column.
/// idx, val: [rows, k]; inp: [rows, cols].
pub fn top_k_rows(idx: &mut [u32], val: &mut [f32], inp: &[f32], rows: usize, cols: usize, k: usize) -> Result<()> {
    let op = "top_k_rows";
    check_len(op, "inp", inp.len(), numel(op, &[rows, cols])?)?;
    check_len(op, "idx", idx.len(), numel(op, &[rows, k])?)?;
    check_len(op, "val", val.len(), numel(op, &[rows, k])?)?;
    if k > cols {
        return Err(EngineError::shape(
            op,
            format!("k <= cols = {cols}"),
            format!("k = {k}"),
        ));
    }
    if u32::try_from(cols).is_err() {
        return Err(EngineError::shape(op, "cols that fit in u32", cols));
    }
    if k == 0 || rows == 0 {
        return Ok(());
    }
    idx.par_chunks_mut(k)
        .zip(val.par_chunks_mut(k))
        .zip(inp.par_chunks(cols))
        .for_each_init(Vec::new, |cand, ((idx, val), row)| {
            cand.clear();
            cand.extend(row.iter().enumerate().map(|(c, &v)| (v, c as u32)));
            if k < cols {
                cand.select_nth_unstable_by(k - 1, rank);
            }
            let best = &mut cand[..k];
            best.sort_unstable_by(rank);
            for ((i, v), &(bv, bi)) in idx.iter_mut().zip(val.iter_mut()).zip(best.iter()) {
                *i = bi;
                *v = bv;
            }
        });
    Ok(())
}
