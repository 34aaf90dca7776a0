//! Layer norm over the last axis, with optional affine weight and bias.

use super::{lane_sum, numel, rows_per_task};
use ecdit_engine::error::{check_len, Result};
use rayon::prelude::*;

/// Rows per partial sum of `dweight`/`dbias`. Fixed (not per thread) so the
/// partials, and therefore the result bits, do not depend on the thread count.
const DPARAM_CHUNK_ROWS: usize = 64;

fn check_affine(op: &str, what: &str, p: Option<&[f32]>, cols: usize) -> Result<()> {
    match p {
        Some(p) => check_len(op, what, p.len(), cols),
        None => Ok(()),
    }
}

/// The mean and the reciprocal standard deviation of one non-empty row.
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    // Two passes: the centred variance loses less precision. Each sum runs
    // in independent lanes (a single running sum is a chain of dependent
    // adds, most of a layer norm's time).
    let m = lane_sum(x, |v| v) / x.len() as f32;
    let var = lane_sum(x, |v| (v - m) * (v - m)) / x.len() as f32;
    (m, 1.0 / (var + eps).sqrt())
}

/// `out = (inp - mean) * rstd * weight + bias` per row, caching mean and rstd.
/// out, inp: [rows, cols]; mean, rstd: [rows]; weight, bias: [cols].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let op = "layer_norm";
    let len = numel(op, &[rows, cols])?;
    check_len(op, "out", out.len(), len)?;
    check_len(op, "inp", inp.len(), len)?;
    check_len(op, "mean", mean.len(), rows)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    check_affine(op, "weight", weight, cols)?;
    check_affine(op, "bias", bias, cols)?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        mean.fill(0.0);
        rstd.fill(1.0 / eps.sqrt());
        return Ok(());
    }
    let task_rows = rows_per_task(rows, cols);
    out.par_chunks_mut(task_rows * cols)
        .zip(mean.par_chunks_mut(task_rows))
        .zip(rstd.par_chunks_mut(task_rows))
        .zip(inp.par_chunks(task_rows * cols))
        .for_each(|(((out, mean), rstd), inp)| {
            for (((o, x), mu), rs) in out
                .chunks_exact_mut(cols)
                .zip(inp.chunks_exact(cols))
                .zip(mean.iter_mut())
                .zip(rstd.iter_mut())
            {
                let (m, s) = row_stats(x, eps);
                match (weight, bias) {
                    (None, None) => o.iter_mut().zip(x).for_each(|(o, v)| *o = (v - m) * s),
                    _ => {
                        for (c, (o, v)) in o.iter_mut().zip(x).enumerate() {
                            let norm = (v - m) * s;
                            *o = norm * weight.map_or(1.0, |w| w[c]) + bias.map_or(0.0, |b| b[c]);
                        }
                    }
                }
                *mu = m;
                *rs = s;
            }
        });
    Ok(())
}

/// Backward of [`layer_norm`]: overwrites `dinp`, accumulates into `dweight` and `dbias`.
/// dinp, dout, inp: [rows, cols]; mean, rstd: [rows]; dweight, dbias, weight: [cols].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dinp: &mut [f32],
    dweight: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[f32]>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let op = "layer_norm_backward";
    let len = numel(op, &[rows, cols])?;
    check_len(op, "dinp", dinp.len(), len)?;
    check_len(op, "dout", dout.len(), len)?;
    check_len(op, "inp", inp.len(), len)?;
    check_len(op, "mean", mean.len(), rows)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    check_affine(op, "weight", weight, cols)?;
    check_affine(op, "dweight", dweight.as_deref(), cols)?;
    check_affine(op, "dbias", dbias.as_deref(), cols)?;
    if len == 0 {
        return Ok(());
    }
    let want_dparams = dweight.is_some() || dbias.is_some();
    let chunk = DPARAM_CHUNK_ROWS * cols;
    // Each chunk of rows returns its partial [dweight | dbias] sums.
    let partials: Vec<Vec<f32>> = dinp
        .par_chunks_mut(chunk)
        .zip(dout.par_chunks(chunk))
        .zip(inp.par_chunks(chunk))
        .zip(mean.par_chunks(DPARAM_CHUNK_ROWS))
        .zip(rstd.par_chunks(DPARAM_CHUNK_ROWS))
        .map(|((((dinp, dout), inp), mean), rstd)| {
            let mut part = if want_dparams {
                vec![0.0f32; 2 * cols]
            } else {
                Vec::new()
            };
            for ((((di, d), x), &mu), &rs) in dinp
                .chunks_exact_mut(cols)
                .zip(dout.chunks_exact(cols))
                .zip(inp.chunks_exact(cols))
                .zip(mean)
                .zip(rstd)
            {
                // Forward: norm = (x - mu) * rs; out = norm * w + b.
                let w = |c: usize| weight.map_or(1.0, |w| w[c]);
                let (mut dnorm_mean, mut dnorm_norm_mean) = (0.0f32, 0.0f32);
                for c in 0..cols {
                    let norm = (x[c] - mu) * rs;
                    let dnorm = d[c] * w(c);
                    dnorm_mean += dnorm;
                    dnorm_norm_mean += dnorm * norm;
                    if want_dparams {
                        part[c] += d[c] * norm;
                        part[cols + c] += d[c];
                    }
                }
                dnorm_mean /= cols as f32;
                dnorm_norm_mean /= cols as f32;
                for c in 0..cols {
                    let norm = (x[c] - mu) * rs;
                    di[c] = (d[c] * w(c) - dnorm_mean - norm * dnorm_norm_mean) * rs;
                }
            }
            part
        })
        .collect();
    if let Some(dw) = dweight {
        for part in &partials {
            dw.iter_mut().zip(&part[..cols]).for_each(|(a, p)| *a += p);
        }
    }
    if let Some(db) = dbias {
        for part in &partials {
            db.iter_mut().zip(&part[cols..]).for_each(|(a, p)| *a += p);
        }
    }
    Ok(())
}
