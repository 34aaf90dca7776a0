//! The router softmax: the host routers' exact row softmax
//! ([`ecdit_engine::routing_math::softmax_rows`]), rows split over the pool,
//! so routing on this backend and on the host agree to the bit.

use super::{numel, rows_per_task};
use ecdit_engine::error::{check_len, Result};
use ecdit_engine::routing_math;
use rayon::prelude::*;

/// out, scores: [rows, experts].
pub fn router_softmax(out: &mut [f32], scores: &[f32], rows: usize, experts: usize) -> Result<()> {
    let op = "router_softmax";
    let len = numel(op, &[rows, experts])?;
    check_len(op, "out", out.len(), len)?;
    check_len(op, "scores", scores.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let chunk = rows_per_task(rows, experts) * experts;
    out.par_chunks_mut(chunk)
        .zip(scores.par_chunks(chunk))
        .for_each(|(o, s)| routing_math::softmax_rows(o, s, experts));
    Ok(())
}
