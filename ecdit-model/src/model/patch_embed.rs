//! The patch embedding `x_embedder.proj`: a stride-p conv written as a linear
//! map on each `C x p x p` patch that the backend's `patchify` cuts out.
//!
//! Tokens are patches in row-major order; a patch row is laid out
//! `ch * p * p + pi * p + qi` (channel-major), the flattening of the conv
//! weight `[d, C, p, p]`, so the weight is used as stored: `[d, C*p*p]`, read
//! transposed by the gemm (its upstream shape has no `[out, in]` pair to swap).

use super::linear::{xavier, Linear};
use ecdit_engine::{Backend, DType, PatchDims, Result};

/// `x_embedder.proj`: weight [d, C, p, p], bias [d].
pub fn patch_embedder(backend: &dyn Backend, d: usize, channels: usize, p: usize, dtype: DType) -> Result<Linear> {
    let patch = channels * p * p;
    // DiT initialises the conv weight as xavier over its [d, C*p*p] view.
    Linear::as_stored(
        backend,
        "x_embedder.proj",
        &[d, channels, p, p],
        d,
        patch,
        xavier(patch, d),
        dtype,
    )
}

/// Patch dims of `batch` square images of `size`, `channels` channels, patch `p`.
pub fn patch_dims(batch: usize, channels: usize, size: usize, p: usize, channels_fastest: bool) -> PatchDims {
    PatchDims {
        batch,
        channels,
        height: size,
        width: size,
        patch: p,
        channels_fastest,
    }
}
