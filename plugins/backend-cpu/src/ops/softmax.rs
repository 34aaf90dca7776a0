//! Row softmax and its backward.

use super::exp::exp_shifted_inplace;
use super::{lane_wise, numel, rows_per_task};
use ecdit_engine::error::{check_len, Result};
use rayon::prelude::*;

/// Softmax of one row in place, over the entries whose `key_mask` byte is
/// nonzero (the rest get probability 0; no mask keeps all). A row with nothing
/// kept becomes all zeros.
pub(crate) fn softmax_row_masked(row: &mut [f32], key_mask: Option<&[u8]>) {
    let Some(mask) = key_mask else {
        return softmax_row(row);
    };
    let max = row
        .iter()
        .zip(mask)
        .filter(|&(_, &m)| m != 0)
        .fold(f32::NEG_INFINITY, |m, (&x, _)| m.max(x));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Exponentiate the whole row in one vectorised pass, then zero the
    // entries left out and sum in order.
    exp_shifted_inplace(row, max);
    let mut sum = 0.0f32;
    for (x, &m) in row.iter_mut().zip(mask) {
        if m == 0 {
            *x = 0.0;
        }
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Softmax of a whole row in place (all entries kept).
fn softmax_row(row: &mut [f32]) {
    let max = lane_wise(row, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    exp_shifted_inplace(row, max);
    let inv = 1.0 / lane_wise(row, 0.0, |s, x| s + x);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Backward of one softmax row: `dinp = out * (dout - sum(dout * out))`.
pub(crate) fn softmax_row_backward(dinp: &mut [f32], dout: &[f32], out: &[f32]) {
    let dot: f32 = dout.iter().zip(out).map(|(d, o)| d * o).sum();
    for ((di, d), o) in dinp.iter_mut().zip(dout).zip(out) {
        *di = o * (d - dot);
    }
}

/// [`softmax_row_backward`] in place: `d` holds `dout` and becomes `dinp`
/// (attention's backward turns dP into dS this way), same bits.
pub(crate) fn softmax_row_backward_inplace(d: &mut [f32], out: &[f32]) {
    let dot: f32 = d.iter().zip(out).map(|(d, o)| d * o).sum();
    d.iter_mut().zip(out).for_each(|(d, o)| *d = o * (*d - dot));
}

/// Row softmax (max-subtracted).
/// out, inp: [rows, cols].
pub fn softmax_rows(out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
    let len = numel("softmax_rows", &[rows, cols])?;
    check_len("softmax_rows", "out", out.len(), len)?;
    check_len("softmax_rows", "inp", inp.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let chunk = rows_per_task(rows, cols) * cols;
    out.par_chunks_mut(chunk).zip(inp.par_chunks(chunk)).for_each(|(o, i)| {
        o.copy_from_slice(i);
        o.chunks_exact_mut(cols).for_each(softmax_row);
    });
    Ok(())
}

/// Backward of [`softmax_rows`] given its output.
/// dinp, dout, out: [rows, cols].
pub fn softmax_rows_backward(dinp: &mut [f32], dout: &[f32], out: &[f32], rows: usize, cols: usize) -> Result<()> {
    let op = "softmax_rows_backward";
    let len = numel(op, &[rows, cols])?;
    check_len(op, "dinp", dinp.len(), len)?;
    check_len(op, "dout", dout.len(), len)?;
    check_len(op, "out", out.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let chunk = rows_per_task(rows, cols) * cols;
    dinp.par_chunks_mut(chunk)
        .zip(dout.par_chunks(chunk))
        .zip(out.par_chunks(chunk))
        .for_each(|((di, d), o)| {
            for ((di, d), o) in di
                .chunks_exact_mut(cols)
                .zip(d.chunks_exact(cols))
                .zip(o.chunks_exact(cols))
            {
                softmax_row_backward(di, d, o);
            }
        });
    Ok(())
}
