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
    for b in 0..batch {
        let (sh, sc) = (shift.of(modulation, b, d), scale.of(modulation, b, d));
        let rows = b * tokens * d..(b + 1) * tokens * d;
        for (o, x) in out[rows.clone()].chunks_mut(d).zip(xn[rows].chunks(d)) {
            for c in 0..d {
                o[c] = x[c] * (1.0 + sc[c]) + sh[c];
            }
        }
    }
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
    for b in 0..batch {
        let g = gate.of(modulation, b, d);
        let rows = b * tokens * d..(b + 1) * tokens * d;
        for (xr, yr) in x[rows.clone()].chunks_mut(d).zip(y[rows].chunks(d)) {
            for c in 0..d {
                xr[c] += g[c] * yr[c];
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
