//! DiT's sinusoidal timestep features.

use super::{numel, rows_per_task};
use ecdit_engine::error::{check_len, EngineError, Result};
use rayon::prelude::*;

/// `out[b] = [cos(t_b f_i) | sin(t_b f_i)]` with `f_i = exp(-ln(max_period) i / half)`,
/// `half = dim / 2`; an odd `dim` pads one 0 at the end (upstream).
/// Computed in f32 in upstream's operation order, so whole-number timesteps
/// near 1000 round as PyTorch does. out: [B, dim]; t: [B].
pub fn timestep_features(out: &mut [f32], t: &[f32], dim: usize, max_period: f32) -> Result<()> {
    let op = "timestep_features";
    check_len(op, "out", out.len(), numel(op, &[t.len(), dim])?)?;
    if !(max_period.is_finite() && max_period > 0.0) {
        return Err(EngineError::param(
            op,
            "max_period",
            max_period,
            "must be a positive finite number",
        ));
    }
    if out.is_empty() {
        return Ok(());
    }
    let half = dim / 2;
    let scale = -((max_period as f64).ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (scale * i as f32 / half as f32).exp()).collect();
    let task_rows = rows_per_task(t.len(), dim);
    out.par_chunks_mut(task_rows * dim)
        .zip(t.par_chunks(task_rows))
        .for_each(|(out, t)| {
            for (row, &tb) in out.chunks_exact_mut(dim).zip(t) {
                for (i, &f) in freqs.iter().enumerate() {
                    let arg = tb * f;
                    row[i] = arg.cos();
                    row[half + i] = arg.sin();
                }
                if dim % 2 == 1 {
                    row[dim - 1] = 0.0;
                }
            }
        });
    Ok(())
}
