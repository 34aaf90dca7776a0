//! Top-k selections: per row (`top_k_rows`), and expert choice's per-(group,
//! expert) selection over rows (`top_k_tokens`).

use ecdit_engine::backend::{check_top_k_rows, check_top_k_tokens};
use ecdit_engine::error::Result;
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
    check_top_k_rows(idx.len(), val.len(), inp.len(), rows, cols, k)?;
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
    let out_len = check_top_k_tokens(idx.len(), val.len(), probs.len(), (groups, group_rows, experts, k))?;
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
