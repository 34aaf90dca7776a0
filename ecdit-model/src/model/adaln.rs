//! adaLN-Zero: the conditioning vector `c` becomes per-sample shift, scale and
//! gate vectors through `Linear(SiLU(c)) -> k * d` (zero-initialised, so every
//! block starts as the identity); the backend's `modulate` and
//! `gated_residual` apply them.
//!
//! A modulation is [B, k * d]; chunk `j` of sample `b` is its columns
//! `j * d..(j + 1) * d`. Block chunks are `shift_msa, scale_msa, gate_msa,
//! shift_mlp, scale_mlp, gate_mlp`; the final layer's are `shift, scale`.

use super::linear::Linear;
use ecdit_engine::{Backend, DType, Init, ModChunks, Result, RowDims, TensorMut, TensorRef};

/// The LayerNorm epsilon of every adaLN-modulated norm (no affine parameters).
pub const LN_EPS: f32 = 1e-6;

/// `<prefix>.adaLN_modulation.1`: [chunks * d, d], zero weight and bias.
pub fn adaln_modulation(backend: &dyn Backend, prefix: &str, d: usize, chunks: usize, dtype: DType) -> Result<Linear> {
    Linear::new(
        backend,
        &format!("{prefix}.adaLN_modulation.1"),
        chunks * d,
        d,
        Init::Zeros,
        dtype,
    )
}

/// `shift, scale` chunks `first`, `second` of a `chunks`-chunk modulation.
pub fn chunks(chunks: usize, first: usize, second: usize) -> ModChunks {
    ModChunks { chunks, first, second }
}

/// out = `LN(x) * (1 + scale) + shift` (no affine LN, [`LN_EPS`]) in one
/// backend op; `ln` receives LN(x) when given (kept for a backward); mean,
/// rstd (f32): [B*T]; x, out, ln: [B, T, d]; modulation: [B, k*d].
#[allow(clippy::too_many_arguments)]
pub(crate) fn ln_modulate(
    backend: &dyn Backend,
    out: TensorMut<'_>,
    ln: Option<TensorMut<'_>>,
    mean: TensorMut<'_>,
    rstd: TensorMut<'_>,
    x: TensorRef<'_>,
    modulation: TensorRef<'_>,
    which: ModChunks,
    dims: RowDims,
) -> Result<()> {
    backend.layer_norm_modulate(out, ln, mean, rstd, x, modulation, which, dims, LN_EPS)
}
