//! The AdamW optimiser step (PyTorch `torch.optim.AdamW` semantics).

use super::PAR_MIN_ELEMS;
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::AdamW;
use rayon::prelude::*;

/// One AdamW step; `step` counts from 1.
/// param, grad, m, v: [n].
///
/// As PyTorch: `param *= 1 - lr * wd`; `m = b1 m + (1 - b1) g`;
/// `v = b2 v + (1 - b2) g^2`; `param -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW, step: u64) -> Result<()> {
    let op = "adamw_step";
    check_len(op, "grad", grad.len(), param.len())?;
    check_len(op, "m", m.len(), param.len())?;
    check_len(op, "v", v.len(), param.len())?;
    if step == 0 {
        return Err(EngineError::param("adamw_step", "step", step, "steps count from 1"));
    }
    // Bias corrections in f64, as PyTorch computes them on the host.
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt();
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2_sqrt as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let (b1, b2) = (hp.beta1, hp.beta2);
    let task = PAR_MIN_ELEMS / 2;
    param
        .par_chunks_mut(task)
        .zip(grad.par_chunks(task))
        .zip(m.par_chunks_mut(task))
        .zip(v.par_chunks_mut(task))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *p *= decay;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + hp.eps;
                *p -= step_size * *m / denom;
            }
        });
    Ok(())
}
