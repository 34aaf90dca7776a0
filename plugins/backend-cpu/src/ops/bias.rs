//! Broadcast add (bias, position table) and the bias backward, the column sum.

use super::{numel, rows_per_task, PAR_MIN_ELEMS};
use ecdit_engine::dtype::bf16;
use ecdit_engine::error::{check_len, EngineError, Result};
use rayon::prelude::*;

/// `out[i] += inp[i % inp.len()]`: a bias over rows, or a position table
/// over samples. out: [n * len]; inp: [len].
pub fn add_broadcast(out: &mut [f32], inp: &[f32]) -> Result<()> {
    let op = "add_broadcast";
    let cols = inp.len();
    if out.is_empty() {
        return Ok(());
    }
    if cols == 0 || !out.len().is_multiple_of(cols) {
        return Err(EngineError::shape(
            format!("{op} (out)"),
            format!("a multiple of inp's {cols} elements"),
            format!("{} elements", out.len()),
        ));
    }
    let rows = out.len() / cols;
    out.par_chunks_mut(rows_per_task(rows, cols) * cols).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(cols) {
            row.iter_mut().zip(inp).for_each(|(o, b)| *o += b);
        }
    });
    Ok(())
}

/// Backward of a bias [`add_broadcast`]: `out[c] (+)= sum_r inp[r, c]`.
/// out: [cols]; inp: [rows, cols].
///
/// Threads split the columns, and every column is summed over the rows in
/// order, so the result is the same bits for any thread count.
pub fn sum_rows(out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
    sum_rows_of(out, inp, rows, cols, accumulate, |x| x)
}

/// [`sum_rows`] of bf16 values, each widened as it is read (the same bits as
/// widening the whole input first, without its tensor-sized copy).
pub fn sum_rows_bf16(out: &mut [f32], inp: &[bf16], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
    sum_rows_of(out, inp, rows, cols, accumulate, bf16::to_f32)
}

fn sum_rows_of<T: Copy + Sync>(
    out: &mut [f32],
    inp: &[T],
    rows: usize,
    cols: usize,
    accumulate: bool,
    widen: impl Fn(T) -> f32 + Sync,
) -> Result<()> {
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
            acc.iter_mut()
                .zip(&row[c0..c0 + width])
                .for_each(|(a, &x)| *a += widen(x));
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
