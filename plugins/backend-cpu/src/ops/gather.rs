//! Row gather and its adjoint, the scatter-add (also the MoE combine).

use super::{numel, rows_per_task};
use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use ecdit_engine::error::{check_len, EngineError, Result};
use rayon::prelude::*;

/// Rows of `[?, cols]` in a buffer of `len`, or an error when `len` is not a
/// whole number of rows.
fn rows_of(op: &str, what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        return Ok(0);
    }
    if !len.is_multiple_of(cols) {
        return Err(EngineError::shape(
            format!("{op} ({what})"),
            format!("a multiple of cols = {cols} elements"),
            format!("{len} elements"),
        ));
    }
    Ok(len / cols)
}

/// Errors on the first index that is not a row of a `rows`-row buffer.
fn check_indices(op: &str, idx: &[u32], rows: usize) -> Result<()> {
    match idx.iter().position(|&i| i as usize >= rows) {
        None => Ok(()),
        Some(p) => Err(EngineError::shape(
            format!("{op} (idx[{p}])"),
            format!("a row index below {rows}"),
            idx[p],
        )),
    }
}

/// `out[i, :] = inp[idx[i], :]`, of any element type (a bf16 gather copies
/// bf16 rows: no conversion).
/// out: [idx.len(), cols]; inp: [rows, cols].
pub fn gather_rows<T: Copy + Send + Sync>(out: &mut [T], inp: &[T], idx: &[u32], cols: usize) -> Result<()> {
    let op = "gather_rows";
    check_len(op, "out", out.len(), numel(op, &[idx.len(), cols])?)?;
    let rows = rows_of(op, "inp", inp.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    check_indices(op, idx, rows)?;
    let task_rows = rows_per_task(idx.len(), cols);
    out.par_chunks_mut(task_rows * cols)
        .zip(idx.par_chunks(task_rows))
        .for_each(|(out, idx)| {
            for (o, &i) in out.chunks_exact_mut(cols).zip(idx) {
                let i = i as usize;
                o.copy_from_slice(&inp[i * cols..(i + 1) * cols]);
            }
        });
    Ok(())
}

/// `out[idx[i], :] += scale[i] * inp[i, :]`, the adjoint of [`gather_rows`].
/// out: [rows, cols]; inp: [idx.len(), cols]; scale: [idx.len()].
///
/// Deterministic: the sources of each destination row are added in increasing
/// `i`, exactly as the sequential loop would, for any thread count. In f32
/// whatever the storage: a bf16 destination row is widened, summed into and
/// rounded once, with the bits of the f32 op on widened tensors.
pub fn scatter_add_rows<T: Stored>(
    out: &mut [T],
    inp: &[T],
    idx: &[u32],
    scale: Option<&[f32]>,
    cols: usize,
) -> Result<()> {
    let op = "scatter_add_rows";
    check_len(op, "inp", inp.len(), numel(op, &[idx.len(), cols])?)?;
    if let Some(s) = scale {
        check_len(op, "scale", s.len(), idx.len())?;
    }
    let rows = rows_of(op, "out", out.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    check_indices(op, idx, rows)?;
    // Counting sort of sources by destination, stable so each row keeps `i` order.
    let mut start = vec![0usize; rows + 1];
    for &r in idx {
        start[r as usize + 1] += 1;
    }
    for r in 0..rows {
        start[r + 1] += start[r];
    }
    let mut fill = start.clone();
    let mut sources = vec![0usize; idx.len()];
    for (i, &r) in idx.iter().enumerate() {
        sources[fill[r as usize]] = i;
        fill[r as usize] += 1;
    }
    let task_rows = rows_per_task(rows, cols);
    out.par_chunks_mut(task_rows * cols).enumerate().for_each(|(t, out)| {
        let (mut acc, mut src) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        for (j, o) in out.chunks_exact_mut(cols).enumerate() {
            let r = t * task_rows + j;
            let sources = &sources[start[r]..start[r + 1]];
            if sources.is_empty() {
                continue;
            }
            T::update(o, &mut acc, |o| {
                for &i in sources {
                    let s = scale.map_or(1.0, |s| s[i]);
                    let x = T::read(&inp[i * cols..(i + 1) * cols], &mut src);
                    o.iter_mut().zip(x).for_each(|(o, x)| *o += s * x);
                }
            });
        }
    });
    Ok(())
}

/// Float storage a row op reads and updates in place, computing in f32:
/// f32 as it is, bf16 widened row by row (exact) and rounded once.
pub trait Stored: Copy + Send + Sync {
    /// `src` as f32: itself, or widened into `buf` (of `src.len()`).
    fn read<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// Runs `f` on `dst` as f32: in place, or on a widened copy in `buf`
    /// rounded back after.
    fn update(dst: &mut [Self], buf: &mut [f32], f: impl FnOnce(&mut [f32]));
}

impl Stored for f32 {
    fn read<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }

    fn update(dst: &mut [f32], _: &mut [f32], f: impl FnOnce(&mut [f32])) {
        f(dst)
    }
}

impl Stored for bf16 {
    fn read<'a>(src: &'a [bf16], buf: &'a mut [f32]) -> &'a [f32] {
        bf16_to_f32(buf, src);
        buf
    }

    fn update(dst: &mut [bf16], buf: &mut [f32], f: impl FnOnce(&mut [f32])) {
        bf16_to_f32(buf, dst);
        f(buf);
        f32_to_bf16(dst, buf);
    }
}

/// `out[i] = <a[idx[i], :], b[i, :]>`, summed over the columns in order (the
/// MoE gate gradient: the combine's output gradient against each expert row).
/// out: [n]; a: [rows, cols]; idx: [n]; b: [n, cols].
pub fn gather_dot(out: &mut [f32], a: &[f32], idx: &[u32], b: &[f32], cols: usize) -> Result<()> {
    let op = "gather_dot";
    check_len(op, "idx", idx.len(), out.len())?;
    check_len(op, "b", b.len(), numel(op, &[idx.len(), cols])?)?;
    let rows = rows_of(op, "a", a.len(), cols)?;
    if cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    check_indices(op, idx, rows)?;
    let task_rows = rows_per_task(idx.len(), cols);
    out.par_chunks_mut(task_rows)
        .zip(idx.par_chunks(task_rows))
        .zip(b.par_chunks(task_rows * cols))
        .for_each(|((out, idx), b)| {
            for ((o, &i), b) in out.iter_mut().zip(idx).zip(b.chunks_exact(cols)) {
                let a = &a[i as usize * cols..][..cols];
                *o = a.iter().zip(b).map(|(x, y)| x * y).sum();
            }
        });
    Ok(())
}
