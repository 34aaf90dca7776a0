//! Patchify (images to patch rows) and unpatchify (patch rows back to
//! images), inverse permutations of each other, so each is the other's
//! backward.
//!
//! Tokens are patches in row-major order, token `row * (W/p) + col`. Within a
//! patch row, pixel `(row * p + pi, col * p + qi)` of channel `ch` sits at
//! `ch * p * p + pi * p + qi` (channel-major: the flattening of the conv
//! weight `[d, C, p, p]`, the patch embedding) or, with `channels_fastest`,
//! at `(pi * p + qi) * C + ch` (upstream's final-layer `unpatchify`).

use super::{numel, rows_per_task};
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::PatchDims;
use rayon::prelude::*;

/// Checks the patch size and returns the element count (the same for images
/// and patch rows).
fn check(op: &str, d: &PatchDims) -> Result<usize> {
    if d.patch == 0 || !d.height.is_multiple_of(d.patch) || !d.width.is_multiple_of(d.patch) {
        return Err(EngineError::shape(
            format!("{op} (patch)"),
            format!("a patch size dividing height {} and width {}", d.height, d.width),
            d.patch,
        ));
    }
    numel(op, &[d.batch, d.channels, d.height, d.width])
}

/// Position of channel `ch`, patch pixel `(pi, qi)` within a patch row.
#[inline(always)]
fn in_patch(d: &PatchDims, ch: usize, pi: usize, qi: usize) -> usize {
    let p = d.patch;
    if d.channels_fastest {
        (pi * p + qi) * d.channels + ch
    } else {
        (ch * p + pi) * p + qi
    }
}

/// out: [B, (H/p)(W/p), C p p]; inp: [B, C, H, W].
pub fn patchify(out: &mut [f32], inp: &[f32], d: PatchDims) -> Result<()> {
    let op = "patchify";
    let len = check(op, &d)?;
    check_len(op, "out", out.len(), len)?;
    check_len(op, "inp", inp.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let (c, h, w, p) = (d.channels, d.height, d.width, d.patch);
    let (gh, gw, patch) = (h / p, w / p, c * p * p);
    // One task per row of patches of one image.
    out.par_chunks_mut(gw * patch).enumerate().for_each(|(bi_row, out)| {
        let (b, row) = (bi_row / gh, bi_row % gh);
        let img = &inp[b * c * h * w..][..c * h * w];
        for (col, out) in out.chunks_exact_mut(patch).enumerate() {
            for ch in 0..c {
                for pi in 0..p {
                    let src = &img[(ch * h + row * p + pi) * w + col * p..][..p];
                    if d.channels_fastest {
                        for (qi, &x) in src.iter().enumerate() {
                            out[in_patch(&d, ch, pi, qi)] = x;
                        }
                    } else {
                        out[in_patch(&d, ch, pi, 0)..][..p].copy_from_slice(src);
                    }
                }
            }
        }
    });
    Ok(())
}

/// out: [B, C, H, W]; inp: [B, (H/p)(W/p), C p p].
pub fn unpatchify(out: &mut [f32], inp: &[f32], d: PatchDims) -> Result<()> {
    let op = "unpatchify";
    let len = check(op, &d)?;
    check_len(op, "out", out.len(), len)?;
    check_len(op, "inp", inp.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let (c, h, w, p) = (d.channels, d.height, d.width, d.patch);
    let (gh, gw, patch) = (h / p, w / p, c * p * p);
    let image_rows = d.batch * c * h;
    let task_rows = rows_per_task(image_rows, w);
    // Tasks own runs of image rows (b, ch, y).
    out.par_chunks_mut(task_rows * w).enumerate().for_each(|(t, out)| {
        for (j, out_row) in out.chunks_exact_mut(w).enumerate() {
            let r = t * task_rows + j;
            let (b, ch, y) = (r / (c * h), r / h % c, r % h);
            let (row, pi) = (y / p, y % p);
            let tokens = &inp[(b * gh + row) * gw * patch..][..gw * patch];
            for (x, o) in out_row.iter_mut().enumerate() {
                let (col, qi) = (x / p, x % p);
                *o = tokens[col * patch + in_patch(&d, ch, pi, qi)];
            }
        }
    });
    Ok(())
}
