//! Top-k selections: per row (`top_k_rows`), and expert choice's per-(group,
//! expert) selection over rows (`top_k_tokens`).

use super::numel;
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::routing_math::{key_index, key_value, rank_key, select_best};
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

/// Expert choice's selection: for each group `g` of `group_rows` consecutive
/// rows of `probs` and each expert `e`, the `k` rows with the largest
/// `probs[r, e]`, best first (ties: lower row first), expert-major:
/// `idx[e, g, j]` the global row, `val[e, g, j]` its value.
/// idx, val: [E, groups, k]; probs: [groups * group_rows, E].
///
/// The ranking is the host router's (`routing_math::rank_key` keys, a
/// `select_best` partial sort, then the chosen keys sorted), so the result is
/// bit-identical to host expert-choice routing. One task per expert.
pub fn top_k_tokens(
    idx: &mut [u32],
    val: &mut [f32],
    probs: &[f32],
    groups: usize,
    group_rows: usize,
    experts: usize,
    k: usize,
) -> Result<()> {
    let op = "top_k_tokens";
    let rows = numel(op, &[groups, group_rows])?;
    check_len(op, "probs", probs.len(), numel(op, &[rows, experts])?)?;
    let out_len = numel(op, &[experts, groups, k])?;
    check_len(op, "idx", idx.len(), out_len)?;
    check_len(op, "val", val.len(), out_len)?;
    if k > group_rows {
        return Err(EngineError::shape(
            op,
            format!("k <= group_rows = {group_rows}"),
            format!("k = {k}"),
        ));
    }
    if u32::try_from(rows).is_err() {
        return Err(EngineError::shape(op, "rows that fit in u32", rows));
    }
    if out_len == 0 {
        return Ok(());
    }
    idx.par_chunks_mut(groups * k)
        .zip(val.par_chunks_mut(groups * k))
        .enumerate()
        .for_each_init(Vec::new, |column, (e, (idx, val))| {
            for (g, (idx, val)) in idx.chunks_exact_mut(k).zip(val.chunks_exact_mut(k)).enumerate() {
                column.clear();
                column
                    .extend((g * group_rows..(g + 1) * group_rows).map(|r| rank_key(probs[r * experts + e], r as u32)));
                select_best(column, k);
                let chosen = &mut column[..k];
                chosen.sort_unstable();
                for ((i, v), &key) in idx.iter_mut().zip(val.iter_mut()).zip(chosen.iter()) {
                    *i = key_index(key);
                    *v = key_value(key);
                }
            }
        });
    Ok(())
}
