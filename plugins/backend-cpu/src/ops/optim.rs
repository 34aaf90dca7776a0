//! The optimiser steps: AdamW (PyTorch `torch.optim.AdamW` semantics) and
//! RMSProp with momentum (the paper's).

use super::PAR_MIN_ELEMS;
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::{AdamW, RmsProp};
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

/// One RMSProp-with-momentum step ([`RmsProp::update`] per element).
/// param, grad, v, buf: [n].
pub fn rmsprop_step(param: &mut [f32], grad: &[f32], v: &mut [f32], buf: &mut [f32], hp: RmsProp) -> Result<()> {
    let op = "rmsprop_step";
    check_len(op, "grad", grad.len(), param.len())?;
    check_len(op, "v", v.len(), param.len())?;
    check_len(op, "buf", buf.len(), param.len())?;
    let task = PAR_MIN_ELEMS / 2;
    param
        .par_chunks_mut(task)
        .zip(grad.par_chunks(task))
        .zip(v.par_chunks_mut(task))
        .zip(buf.par_chunks_mut(task))
        .for_each(|(((p, g), v), b)| {
            for (((p, &g), v), b) in p.iter_mut().zip(g).zip(v.iter_mut()).zip(b.iter_mut()) {
                hp.update(p, g, v, b);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against PyTorch's RMSprop(momentum) written out as the
    /// documented recurrence in f64, over three steps.
    #[test]
    fn rmsprop_follows_pytorch_recurrence() {
        let hp = RmsProp {
            lr: 0.01,
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.9,
            weight_decay: 0.1,
        };
        let n = 5000; // more than one parallel task
        let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut v, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut v64, mut b64) = (vec![0.0f64; n], vec![0.0f64; n]);
        for step in 0..3 {
            let g: Vec<f32> = (0..n).map(|i| ((i + step) as f32 * 0.11).cos()).collect();
            rmsprop_step(&mut p, &g, &mut v, &mut b, hp).unwrap();
            for i in 0..n {
                let g = g[i] as f64;
                p64[i] *= 1.0 - 0.01 * 0.1;
                v64[i] = 0.99 * v64[i] + 0.01 * g * g;
                b64[i] = 0.9 * b64[i] + g / (v64[i].sqrt() + 1e-8);
                p64[i] -= 0.01 * b64[i];
            }
        }
        for i in 0..n {
            assert!((p[i] as f64 - p64[i]).abs() < 1e-5, "p[{i}] {} vs {}", p[i], p64[i]);
        }
        let short = rmsprop_step(&mut p, &[0.0; 3], &mut v, &mut b, hp);
        assert!(short.is_err(), "a short gradient is an error");
    }
}
