//! Element-wise activations (GELU tanh approximation, SiLU) and their backward.

use super::PAR_MIN_ELEMS;
use ecdit_engine::error::{check_len, Result};
use ecdit_engine::Unary;
use rayon::prelude::*;

/// sqrt(2 / pi), the GELU tanh-approximation constant.
const GELU_SCALE: f32 = 0.797_884_6;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_CUBE: f32 = 0.044715;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_SCALE * (x + GELU_CUBE * x * x * x)).tanh())
}

fn gelu_grad(x: f32) -> f32 {
    let t = (GELU_SCALE * (x + GELU_CUBE * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * x * x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// Elements per parallel task.
const TASK_ELEMS: usize = PAR_MIN_ELEMS / 2;

/// Element-wise activation. out, inp: [n].
pub fn unary(op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("unary", "out", out.len(), inp.len())?;
    let f = match op {
        Unary::GeluTanh => gelu,
        Unary::Silu => silu,
    };
    out.par_chunks_mut(TASK_ELEMS)
        .zip(inp.par_chunks(TASK_ELEMS))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &x)| *o = f(x)));
    Ok(())
}

/// Backward of [`unary`]: `dinp = dout * op'(inp)`. dinp, dout, inp: [n].
pub fn unary_backward(op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    check_len("unary_backward", "dinp", dinp.len(), inp.len())?;
    check_len("unary_backward", "dout", dout.len(), inp.len())?;
    let g = match op {
        Unary::GeluTanh => gelu_grad,
        Unary::Silu => silu_grad,
    };
    dinp.par_chunks_mut(TASK_ELEMS)
        .zip(dout.par_chunks(TASK_ELEMS))
        .zip(inp.par_chunks(TASK_ELEMS))
        .for_each(|((di, d), i)| {
            for ((di, &d), &x) in di.iter_mut().zip(d).zip(i) {
                *di = d * g(x);
            }
        });
    Ok(())
}
