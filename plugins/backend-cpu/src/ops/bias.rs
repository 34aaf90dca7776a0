//! Bias add and its backward, the column sum.

use super::{numel, rows_per_task, PAR_MIN_ELEMS};
use ecdit_engine::error::{check_len, Result};
use rayon::prelude::*;

/// `out[r, c] += bias[c]`.
/// out: [rows, cols]; bias: [cols].
pub fn add_bias(out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
    check_len("add_bias", "out", out.len(), numel("add_bias", &[rows, cols])?)?;
    check_len("add_bias", "bias", bias.len(), cols)?;
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(rows_per_task(rows, cols) * cols).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(cols) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    });
    Ok(())
}

/// Backward of [`add_bias`]: `out[c] (+)= sum_r inp[r, c]`.
/// out: [cols]; inp: [rows, cols].
///
/// Threads split the columns, and every column is summed over the rows in
/// order, so the result is the same bits for any thread count.
pub fn sum_rows(out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
    check_len("sum_rows", "inp", inp.len(), numel("sum_rows", &[rows, cols])?)?;
    check_len("sum_rows", "out", out.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    let sum_cols = |c0: usize, acc: &mut [f32]| {
        if !accumulate {
            acc.fill(0.0);
        }
        let width = acc.len();
        for row in inp.chunks_exact(cols) {
            acc.iter_mut().zip(&row[c0..c0 + width]).for_each(|(a, x)| *a += x);
        }
    };
    // Column blocks of at least 64 floats keep each row read contiguous.
    let threads = rayon::current_num_threads();
    let block = if inp.len() < PAR_MIN_ELEMS {
        cols
    } else {
        cols.div_ceil(threads).max(64)
    };
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, acc)| sum_cols(i * block, acc));
    Ok(())
}
