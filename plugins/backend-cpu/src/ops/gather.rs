//! Row gather and its adjoint, the scatter-add (also the MoE combine).

use super::{numel, rows_per_task, LANES};
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
pub(crate) fn check_indices(op: &str, idx: &[u32], rows: usize) -> Result<()> {
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

/// Rows at least this long (a whole tensor as one row: the trainer's
/// gradient norm) are summed in [`LONG_ROW_BLOCK`]s side by side.
const LONG_ROW: usize = 1 << 15;
/// Columns per block of a long row: a fixed split (never the thread count),
/// so the sum is the same bits on any pool.
const LONG_ROW_BLOCK: usize = 1 << 13;

/// `<a, b>` of a long row: each block summed in `LANES` independent
/// accumulators (a single running sum is a chain of dependent additions,
/// scalar and one thread), blocks in parallel, their sums added in order.
fn long_dot<T: Stored>(a: &[T], b: &[T]) -> f32 {
    let blocks: Vec<f32> = a
        .par_chunks(LONG_ROW_BLOCK)
        .zip(b.par_chunks(LONG_ROW_BLOCK))
        .map_init(
            // Widening buffers, one pair per task split (f32 rows never use them).
            || (vec![0.0f32; LONG_ROW_BLOCK], vec![0.0f32; LONG_ROW_BLOCK]),
            |(wide_a, wide_b), (a, b)| {
                let (a, b) = (T::read(a, &mut wide_a[..a.len()]), T::read(b, &mut wide_b[..b.len()]));
                let mut lanes = [0.0f32; LANES];
                let (pairs_a, pairs_b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
                let tail: f32 = pairs_a
                    .remainder()
                    .iter()
                    .zip(pairs_b.remainder())
                    .map(|(x, y)| x * y)
                    .sum();
                for (ca, cb) in pairs_a.zip(pairs_b) {
                    for ((l, x), y) in lanes.iter_mut().zip(ca).zip(cb) {
                        *l += x * y;
                    }
                }
                lanes.into_iter().sum::<f32>() + tail
            },
        )
        .collect();
    blocks.into_iter().sum()
}

/// `out[i] = <a[idx[i], :], b[i, :]>` (the MoE gate gradient: the combine's
/// output gradient against each expert row), summed over the columns in
/// order; rows of [`LONG_ROW`] columns or more in fixed blocks (`long_dot`).
/// bf16 rows are widened one at a time (exact): the f32 op's bits.
/// out: [n]; a: [rows, cols]; idx: [n]; b: [n, cols].
pub fn gather_dot<T: Stored>(out: &mut [f32], a: &[T], idx: &[u32], b: &[T], cols: usize) -> Result<()> {
    let op = "gather_dot";
    check_len(op, "idx", idx.len(), out.len())?;
    check_len(op, "b", b.len(), numel(op, &[idx.len(), cols])?)?;
    let rows = rows_of(op, "a", a.len(), cols)?;
    if cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    check_indices(op, idx, rows)?;
    if cols >= LONG_ROW {
        for ((o, &i), b) in out.iter_mut().zip(idx).zip(b.chunks_exact(cols)) {
            *o = long_dot(&a[i as usize * cols..][..cols], b);
        }
        return Ok(());
    }
    let task_rows = rows_per_task(idx.len(), cols);
    out.par_chunks_mut(task_rows)
        .zip(idx.par_chunks(task_rows))
        .zip(b.par_chunks(task_rows * cols))
        .for_each(|((out, idx), b)| {
            let (mut wide_a, mut wide_b) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            for ((o, &i), b) in out.iter_mut().zip(idx).zip(b.chunks_exact(cols)) {
                let a = T::read(&a[i as usize * cols..][..cols], &mut wide_a);
                let b = T::read(b, &mut wide_b);
                *o = a.iter().zip(b).map(|(x, y)| x * y).sum();
            }
        });
    Ok(())
}
