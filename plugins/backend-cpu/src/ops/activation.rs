//! Element-wise activations (GELU tanh approximation, SiLU) and their backward.

use super::exp::exp_approx;
use super::PAR_MIN_ELEMS;
use ecdit_engine::error::{check_len, Result};
use ecdit_engine::Unary;
use rayon::prelude::*;

/// sqrt(2 / pi), the GELU tanh-approximation constant.
const GELU_SCALE: f32 = 0.797_884_6;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_CUBE: f32 = 0.044715;

/// `sigmoid(x) = 1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `u = sqrt(2/pi) (x + 0.044715 x^3)`, the tanh argument of GELU.
#[inline(always)]
fn gelu_arg(x: f32) -> f32 {
    GELU_SCALE * (x + GELU_CUBE * x * x * x)
}

/// `0.5 x (1 + tanh(u)) = x sigmoid(2u)`: the same function without tanh.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * sigmoid(2.0 * gelu_arg(x))
}

/// d/dx of [`gelu`]; with `s = sigmoid(2u)`, `1 + tanh u = 2s` and
/// `1 - tanh^2 u = 4 s (1 - s)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let s = sigmoid(2.0 * gelu_arg(x));
    s + 2.0 * x * s * (1.0 - s) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * x * x)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `out[i] = f(inp[i])` and `dinp[i] = dout[i] * g(inp[i])`, each compiled
/// three times (AVX-512, AVX2+FMA, baseline) and picked at run time. No FMA
/// contraction happens (Rust does not contract), so every path gives the same
/// bits.
macro_rules! simd_maps {
    ($($name:ident => $feature:literal),*) => {
        $(
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $name(out: &mut [f32], a: &[f32], b: &[f32], op: Unary, backward: bool) {
                map_plain(out, a, b, op, backward)
            }
        )*
    };
}
simd_maps!(map_avx512 => "avx512f", map_avx2 => "avx2,fma");

/// Forward: `out = f(a)` (b unused). Backward: `out = a * f'(b)` (a = dout, b = inp).
#[inline(always)]
fn map_plain(out: &mut [f32], a: &[f32], b: &[f32], op: Unary, backward: bool) {
    match (op, backward) {
        (Unary::GeluTanh, false) => out.iter_mut().zip(a).for_each(|(o, &x)| *o = gelu(x)),
        (Unary::Silu, false) => out.iter_mut().zip(a).for_each(|(o, &x)| *o = silu(x)),
        (Unary::GeluTanh, true) => {
            for ((o, &d), &x) in out.iter_mut().zip(a).zip(b) {
                *o = d * gelu_grad(x);
            }
        }
        (Unary::Silu, true) => {
            for ((o, &d), &x) in out.iter_mut().zip(a).zip(b) {
                *o = d * silu_grad(x);
            }
        }
    }
}

fn map(out: &mut [f32], a: &[f32], b: &[f32], op: Unary, backward: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { map_avx512(out, a, b, op, backward) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { map_avx2(out, a, b, op, backward) };
        }
    }
    map_plain(out, a, b, op, backward)
}

/// Elements per parallel task.
const TASK_ELEMS: usize = PAR_MIN_ELEMS / 2;

/// Element-wise activation. out, inp: [n].
pub fn unary(op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("unary", "out", out.len(), inp.len())?;
    out.par_chunks_mut(TASK_ELEMS)
        .zip(inp.par_chunks(TASK_ELEMS))
        .for_each(|(o, i)| map(o, i, &[], op, false));
    Ok(())
}

/// [`unary`] in place: `x[i] = op(x[i])`, the same bits. x: [n].
pub fn unary_in_place(op: Unary, x: &mut [f32]) {
    /// Elements copied aside at a time (the kernel reads one slice and writes another).
    const BLOCK: usize = 1024;
    x.par_chunks_mut(TASK_ELEMS).for_each(|chunk| {
        let mut copy = [0.0f32; BLOCK];
        for block in chunk.chunks_mut(BLOCK) {
            let c = &mut copy[..block.len()];
            c.copy_from_slice(block);
            map(block, c, &[], op, false);
        }
    });
}

/// Backward of [`unary`]: `dinp = dout * op'(inp)`. dinp, dout, inp: [n].
pub fn unary_backward(op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    check_len("unary_backward", "dinp", dinp.len(), inp.len())?;
    check_len("unary_backward", "dout", dout.len(), inp.len())?;
    dinp.par_chunks_mut(TASK_ELEMS)
        .zip(dout.par_chunks(TASK_ELEMS))
        .zip(inp.par_chunks(TASK_ELEMS))
        .for_each(|((di, d), i)| map(di, d, i, op, true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_paths_give_the_same_bits_as_the_plain_loop() {
        let x: Vec<f32> = (0..4099)
            .map(|i| (i as f32 * 0.618_034).sin() * 12.0 - (i % 7) as f32)
            .collect();
        let d: Vec<f32> = x.iter().map(|v| v.cos()).collect();
        for op in [Unary::GeluTanh, Unary::Silu] {
            for backward in [false, true] {
                let (a, b) = if backward { (&d[..], &x[..]) } else { (&x[..], &[][..]) };
                let (mut fast, mut plain) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                map(&mut fast, a, b, op, backward);
                map_plain(&mut plain, a, b, op, backward);
                assert!(
                    fast.iter().zip(&plain).all(|(f, p)| f.to_bits() == p.to_bits()),
                    "{op:?} {backward}"
                );
            }
        }
    }
}
