//! adaLN element-wise ops and their backward: `modulate` (`x (1 + scale) +
//! shift`) and the gated residual (`x += gate y`), reading per-sample chunks
//! of a modulation `[B, chunks * d]` (chunk `j` of sample `b` is
//! `modulation[(b * chunks + j) * d..][..d]`).

use super::{numel, rows_per_task};
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::{ModChunks, RowDims};
use rayon::prelude::*;

/// Checked element counts of one adaLN op.
struct Lens {
    /// `[B, T, d]`.
    act: usize,
    /// `[B, chunks * d]`.
    modulation: usize,
}

/// Checks the chunk indices (`second` too when the op reads it) and returns
/// the element counts.
fn lens(op: &str, which: ModChunks, dims: RowDims, second: bool) -> Result<Lens> {
    let bad = |what: &str, i: usize| {
        EngineError::shape(
            format!("{op} ({what} chunk)"),
            format!("an index below chunks = {}", which.chunks),
            i,
        )
    };
    if which.first >= which.chunks {
        return Err(bad("first", which.first));
    }
    if second && which.second >= which.chunks {
        return Err(bad("second", which.second));
    }
    Ok(Lens {
        act: numel(op, &[dims.batch, dims.tokens, dims.d])?,
        modulation: numel(op, &[dims.batch, which.chunks, dims.d])?,
    })
}

/// Chunk `index` of sample `b`.
fn chunk(modulation: &[f32], which: ModChunks, index: usize, b: usize, d: usize) -> &[f32] {
    &modulation[(b * which.chunks + index) * d..][..d]
}

/// Runs `f(sample, out_row, i)` for every `[d]` row of a `[B, T, d]` output,
/// rows split over the current pool; `i` is the global row index.
fn for_rows(out: &mut [f32], dims: RowDims, f: impl Fn(usize, &mut [f32], usize) + Sync) {
    let (rows, d) = (dims.batch * dims.tokens, dims.d);
    if rows == 0 || d == 0 {
        return;
    }
    let task_rows = rows_per_task(rows, d);
    out.par_chunks_mut(task_rows * d).enumerate().for_each(|(t, chunk)| {
        for (j, row) in chunk.chunks_exact_mut(d).enumerate() {
            let i = t * task_rows + j;
            f(i / dims.tokens, row, i);
        }
    });
}

/// `out[b, t, :] = inp[b, t, :] * (1 + scale[b, :]) + shift[b, :]`, shift and
/// scale the chunks `which.first` and `which.second`.
/// out, inp: [B, T, d]; modulation: [B, chunks * d].
pub fn modulate(out: &mut [f32], inp: &[f32], modulation: &[f32], which: ModChunks, dims: RowDims) -> Result<()> {
    let op = "modulate";
    let n = lens(op, which, dims, true)?;
    check_len(op, "out", out.len(), n.act)?;
    check_len(op, "inp", inp.len(), n.act)?;
    check_len(op, "modulation", modulation.len(), n.modulation)?;
    let d = dims.d;
    for_rows(out, dims, |b, o, i| {
        let (sh, sc) = (
            chunk(modulation, which, which.first, b, d),
            chunk(modulation, which, which.second, b, d),
        );
        // The model's operation order: x * (1 + s) + h.
        for (((o, &x), &s), &h) in o.iter_mut().zip(&inp[i * d..][..d]).zip(sc).zip(sh) {
            *o = x * (1.0 + s) + h;
        }
    });
    Ok(())
}

/// Adds `sum_t f(t, c)` into `acc[c]`, over the tokens in order (the same bits
/// for any thread count).
fn accumulate_tokens(acc: &mut [f32], tokens: usize, f: impl Fn(usize, usize) -> f32) {
    for t in 0..tokens {
        for (c, a) in acc.iter_mut().enumerate() {
            *a += f(t, c);
        }
    }
}

/// `out = LN(inp) * (1 + scale) + shift` per row in one pass: the layer
/// norm without affine of [`super::norm::layer_norm`] (the same row
/// statistics, bit for bit) and then [`modulate`]'s arithmetic on the
/// unrounded normalised values. Writes LN(inp) into `ln` when given, and the
/// row mean and rstd. out, ln, inp: [B, T, d]; mean, rstd: [B*T];
/// modulation: [B, chunks * d].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_modulate(
    out: &mut [f32],
    ln: Option<&mut [f32]>,
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    modulation: &[f32],
    which: ModChunks,
    dims: RowDims,
    eps: f32,
) -> Result<()> {
    let op = "layer_norm_modulate";
    let n = lens(op, which, dims, true)?;
    let (rows, d) = (dims.batch * dims.tokens, dims.d);
    check_len(op, "out", out.len(), n.act)?;
    if let Some(ln) = &ln {
        check_len(op, "ln", ln.len(), n.act)?;
    }
    check_len(op, "inp", inp.len(), n.act)?;
    check_len(op, "mean", mean.len(), rows)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    check_len(op, "modulation", modulation.len(), n.modulation)?;
    if rows == 0 {
        return Ok(());
    }
    if d == 0 {
        mean.fill(0.0);
        rstd.fill(1.0 / eps.sqrt());
        return Ok(());
    }
    let task_rows = rows_per_task(rows, d);
    // Rows `t * task_rows ..` of every buffer.
    let task = |t: usize, out: &mut [f32], mut ln: Option<&mut [f32]>, mean: &mut [f32], rstd: &mut [f32]| {
        for (j, o) in out.chunks_exact_mut(d).enumerate() {
            let i = t * task_rows + j;
            let x = &inp[i * d..][..d];
            let (m, s) = super::norm::row_stats(x, eps);
            (mean[j], rstd[j]) = (m, s);
            let b = i / dims.tokens;
            let (sh, sc) = (
                chunk(modulation, which, which.first, b, d),
                chunk(modulation, which, which.second, b, d),
            );
            match ln.as_deref_mut() {
                Some(ln) => {
                    let l = &mut ln[j * d..][..d];
                    for c in 0..d {
                        let norm = (x[c] - m) * s;
                        l[c] = norm;
                        o[c] = norm * (1.0 + sc[c]) + sh[c];
                    }
                }
                None => {
                    for c in 0..d {
                        o[c] = (x[c] - m) * s * (1.0 + sc[c]) + sh[c];
                    }
                }
            }
        }
    };
    let (out, mean, rstd) = (
        out.par_chunks_mut(task_rows * d),
        mean.par_chunks_mut(task_rows),
        rstd.par_chunks_mut(task_rows),
    );
    match ln {
        Some(ln) => out
            .zip(ln.par_chunks_mut(task_rows * d))
            .zip(mean)
            .zip(rstd)
            .enumerate()
            .for_each(|(t, (((o, l), mu), rs))| task(t, o, Some(l), mu, rs)),
        None => out
            .zip(mean)
            .zip(rstd)
            .enumerate()
            .for_each(|(t, ((o, mu), rs))| task(t, o, None, mu, rs)),
    }
    Ok(())
}

/// Backward of [`modulate`]: `dinp = dout * (1 + scale)` (overwrites);
/// `dshift += sum_t dout`, `dscale += sum_t dout * inp` into their chunks of
/// `dmodulation`. dinp, dout, inp: [B, T, d]; dmodulation, modulation: [B, chunks * d].
#[allow(clippy::too_many_arguments)]
pub fn modulate_backward(
    dinp: &mut [f32],
    dmodulation: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    modulation: &[f32],
    which: ModChunks,
    dims: RowDims,
) -> Result<()> {
    let op = "modulate_backward";
    let n = lens(op, which, dims, true)?;
    check_len(op, "dinp", dinp.len(), n.act)?;
    check_len(op, "dmodulation", dmodulation.len(), n.modulation)?;
    check_len(op, "dout", dout.len(), n.act)?;
    check_len(op, "inp", inp.len(), n.act)?;
    check_len(op, "modulation", modulation.len(), n.modulation)?;
    let (tokens, d) = (dims.tokens, dims.d);
    for_rows(dinp, dims, |b, di, i| {
        let sc = chunk(modulation, which, which.second, b, d);
        for ((di, &g), &s) in di.iter_mut().zip(&dout[i * d..][..d]).zip(sc) {
            *di = g * (1.0 + s);
        }
    });
    if d == 0 || dims.batch == 0 {
        return Ok(());
    }
    // One task per sample: it owns that sample's row of dmodulation.
    dmodulation
        .par_chunks_mut(which.chunks * d)
        .enumerate()
        .for_each(|(b, row)| {
            let (g, x) = (&dout[b * tokens * d..], &inp[b * tokens * d..]);
            let shift = &mut row[which.first * d..][..d];
            accumulate_tokens(shift, tokens, |t, c| g[t * d + c]);
            let scale = &mut row[which.second * d..][..d];
            accumulate_tokens(scale, tokens, |t, c| g[t * d + c] * x[t * d + c]);
        });
    Ok(())
}

/// `x[b, t, :] += gate[b, :] * y[b, t, :]`, gate the chunk `which.first`.
/// x, y: [B, T, d]; modulation: [B, chunks * d].
pub fn gated_residual(x: &mut [f32], y: &[f32], modulation: &[f32], which: ModChunks, dims: RowDims) -> Result<()> {
    let op = "gated_residual";
    let n = lens(op, which, dims, false)?;
    check_len(op, "x", x.len(), n.act)?;
    check_len(op, "y", y.len(), n.act)?;
    check_len(op, "modulation", modulation.len(), n.modulation)?;
    let d = dims.d;
    for_rows(x, dims, |b, xr, i| {
        let g = chunk(modulation, which, which.first, b, d);
        for ((x, &y), &g) in xr.iter_mut().zip(&y[i * d..][..d]).zip(g) {
            *x += g * y;
        }
    });
    Ok(())
}

/// Backward of [`gated_residual`] given `dx`: `dy = gate * dx` (overwrites);
/// `dgate += sum_t dx * y` into the gate chunk of `dmodulation`.
/// dy, dx, y: [B, T, d]; dmodulation, modulation: [B, chunks * d].
#[allow(clippy::too_many_arguments)]
pub fn gated_residual_backward(
    dy: &mut [f32],
    dmodulation: &mut [f32],
    dx: &[f32],
    y: &[f32],
    modulation: &[f32],
    which: ModChunks,
    dims: RowDims,
) -> Result<()> {
    let op = "gated_residual_backward";
    let n = lens(op, which, dims, false)?;
    check_len(op, "dy", dy.len(), n.act)?;
    check_len(op, "dmodulation", dmodulation.len(), n.modulation)?;
    check_len(op, "dx", dx.len(), n.act)?;
    check_len(op, "y", y.len(), n.act)?;
    check_len(op, "modulation", modulation.len(), n.modulation)?;
    let (tokens, d) = (dims.tokens, dims.d);
    for_rows(dy, dims, |b, dyr, i| {
        let g = chunk(modulation, which, which.first, b, d);
        for ((dy, &dx), &g) in dyr.iter_mut().zip(&dx[i * d..][..d]).zip(g) {
            *dy = g * dx;
        }
    });
    if d == 0 || dims.batch == 0 {
        return Ok(());
    }
    dmodulation
        .par_chunks_mut(which.chunks * d)
        .enumerate()
        .for_each(|(b, row)| {
            let (g, v) = (&dx[b * tokens * d..], &y[b * tokens * d..]);
            let gate = &mut row[which.first * d..][..d];
            accumulate_tokens(gate, tokens, |t, c| g[t * d + c] * v[t * d + c]);
        });
    Ok(())
}
