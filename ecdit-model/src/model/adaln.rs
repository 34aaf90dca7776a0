//! adaLN-Zero: the conditioning vector `c` becomes per-sample shift, scale and
//! gate vectors through `Linear(SiLU(c)) -> k * d` (zero-initialised, so every
//! block starts as the identity), and the two element-wise ops that use them.
//!
//! A modulation buffer is [B, k * d]; chunk `j` of sample `b` is
//! `modulation[b * k * d + j * d..][..d]`. Block chunks are
//! `shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp`; the final
//! layer's are `shift, scale`.

use super::linear::Linear;
use super::param::Init;
use ecdit_engine::{Backend, Result};

/// The LayerNorm epsilon of every adaLN-modulated norm (no affine parameters).
pub const LN_EPS: f32 = 1e-6;

/// `<prefix>.adaLN_modulation.1`: [chunks * d, d], zero weight and bias.
pub fn adaln_modulation(prefix: &str, d: usize, chunks: usize) -> Linear {
    Linear::new(&format!("{prefix}.adaLN_modulation.1"), chunks * d, d, Init::Zeros)
}

/// Where a chunk lives in a `[B, chunks * d]` modulation buffer.
#[derive(Clone, Copy, Debug)]
pub struct Chunk {
    /// Chunk index.
    pub index: usize,
    /// Chunks per sample.
    pub chunks: usize,
}

impl Chunk {
    fn of<'m>(&self, modulation: &'m [f32], b: usize, d: usize) -> &'m [f32] {
        &modulation[(b * self.chunks + self.index) * d..][..d]
    }
}

/// out: [B, T, d] = `xn * (1 + scale) + shift`; xn: [B, T, d]; modulation: [B, k*d].
#[allow(clippy::too_many_arguments)]
pub fn modulate(
    out: &mut [f32],
    xn: &[f32],
    modulation: &[f32],
    shift: Chunk,
    scale: Chunk,
    batch: usize,
    tokens: usize,
    d: usize,
) {
    out.copy_from_slice(xn);
    modulate_in_place(out, modulation, shift, scale, batch, tokens, d);
}

/// x: [B, T, d] `= x * (1 + scale) + shift` in place (the same bits as [`modulate`]).
pub fn modulate_in_place(
    x: &mut [f32],
    modulation: &[f32],
    shift: Chunk,
    scale: Chunk,
    batch: usize,
    tokens: usize,
    d: usize,
) {
    for (b, sample) in x.chunks_exact_mut(tokens * d).take(batch).enumerate() {
        let (sh, sc) = (shift.of(modulation, b, d), scale.of(modulation, b, d));
        // Zipped slices of one length: no bounds checks, so the loop vectorises.
        for row in sample.chunks_exact_mut(d) {
            for ((o, &s), &h) in row.iter_mut().zip(sc).zip(sh) {
                *o = *o * (1.0 + s) + h;
            }
        }
    }
}

/// out: [B, T, d] = `LN(x) * (1 + scale) + shift` (no affine LN, [`LN_EPS`]).
/// `ln`: [B, T, d] keeps `LN(x)` for a backward; without it LN writes `out`
/// and is modulated in place (the same bits). mean, rstd: [B*T]; x: [B, T, d].
#[allow(clippy::too_many_arguments)]
pub(crate) fn ln_modulate(
    backend: &dyn Backend,
    out: &mut [f32],
    ln: Option<&mut [f32]>,
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    modulation: &[f32],
    shift: Chunk,
    scale: Chunk,
    batch: usize,
    tokens: usize,
    d: usize,
) -> Result<()> {
    let rows = batch * tokens;
    match ln {
        Some(ln) => {
            backend.layer_norm(ln, mean, rstd, x, None, None, rows, d, LN_EPS)?;
            modulate(out, ln, modulation, shift, scale, batch, tokens, d);
        }
        None => {
            backend.layer_norm(out, mean, rstd, x, None, None, rows, d, LN_EPS)?;
            modulate_in_place(out, modulation, shift, scale, batch, tokens, d);
        }
    }
    Ok(())
}

/// x: [B, T, d] `+= gate * y`; y: [B, T, d]; modulation: [B, k*d].
pub fn gated_residual(
    x: &mut [f32],
    y: &[f32],
    modulation: &[f32],
    gate: Chunk,
    batch: usize,
    tokens: usize,
    d: usize,
) {
    for (b, (xs, ys)) in x
        .chunks_exact_mut(tokens * d)
        .zip(y.chunks_exact(tokens * d))
        .take(batch)
        .enumerate()
    {
        let g = gate.of(modulation, b, d);
        for (xr, yr) in xs.chunks_exact_mut(d).zip(ys.chunks_exact(d)) {
            for ((x, &y), &g) in xr.iter_mut().zip(yr).zip(g) {
                *x += g * y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulate_and_gate_pick_their_chunks() {
        // B = 1, T = 2, d = 2, chunks = 3: [shift | scale | gate].
        let m = [1.0, 2.0, 0.5, -1.0, 10.0, 0.0];
        let xn = [1.0, 1.0, 2.0, 3.0];
        let mut out = [0.0; 4];
        let ch = |index| Chunk { index, chunks: 3 };
        modulate(&mut out, &xn, &m, ch(0), ch(1), 1, 2, 2);
        assert_eq!(out, [1.0 * 1.5 + 1.0, 0.0 + 2.0, 2.0 * 1.5 + 1.0, 0.0 + 2.0]);
        let mut x = [1.0; 4];
        gated_residual(&mut x, &[1.0, 1.0, 2.0, 2.0], &m, ch(2), 1, 2, 2);
        assert_eq!(x, [11.0, 1.0, 21.0, 1.0]);
    }
}
