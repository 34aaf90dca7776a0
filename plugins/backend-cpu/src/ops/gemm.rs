//! Matrix products on the `gemm` crate (pure Rust, runtime SIMD dispatch up to
//! AVX-512), plain and batched, plus the strided form attention builds on.
//!
//! `gemm` computes `dst = alpha_g * dst + beta_g * lhs @ rhs` over arbitrary
//! strides; our convention is BLAS's `out = alpha * op(a) @ op(b) + beta * out`,
//! so the two scalars swap at the call. Its `Parallelism::Rayon(n)` splits work
//! on rayon's current pool, which is the backend's pool inside `install`.

use super::bias::add_broadcast;
use super::gemm_few_rows::{gemm_few_rows, FEW_ROWS};
use super::{numel, rows_per_task};
use crate::onednn::OneDnnMode;
use ecdit_engine::backend::check_grouped;
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::{DType, GemmDims};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Per-product flops below which a batched gemm runs its products side by side
/// (one thread each) instead of one after the other on all threads.
const BATCH_PAR_MAX_FLOPS: f64 = (1u64 << 25) as f64;

/// A grouped product cuts a group into pieces of at least this many rows.
/// A piece this tall never takes the `gemm` crate's small-matrix or gemv paths
/// (those start at 64 and 1 rows), and its blocking depends on `k` alone, so
/// every row gets the same bits as in the whole-group product.
const GROUP_PIECE_MIN_ROWS: usize = 128;

/// Grouped products cut groups only when `n` and `k` are at least this: the
/// `gemm` crate computes thin products (n or k of 1 or 2) on gemv-like paths
/// whose bits depend on the row count.
const GROUP_SPLIT_MIN_DIM: usize = 8;

/// Chunks of equal rows per thread in a grouped product: 2 lets the pool
/// even out a thread slowed by other load, and keeps pieces large (every
/// piece packs its group's weights again; on the bench's dense FFN 256-row
/// pieces measured a few % slower than 512-row ones).
const GROUP_CHUNKS_PER_THREAD: usize = 2;

/// Whether a product of `dims` (one of a batch, or one group of a grouped
/// product) goes to oneDNN when the backend has it.
///
/// Never the nn products of at most [`FEW_ROWS`] rows: their rows promise the
/// bits of a product of their own (`gemm_rows_alone`). Otherwise the rule
/// looks at `n`, `k` and the dtypes, never at `m`: a row's kernel, and so its
/// bits, must not depend on how many rows share the product, or a sample's
/// output would depend on its batch.
pub(crate) fn onednn_takes(mode: OneDnnMode, dims: GemmDims, inputs: (DType, DType)) -> bool {
    let GemmDims { m, n, k, .. } = dims;
    if m == 0 || n == 0 || k == 0 || (m <= FEW_ROWS && !dims.trans_a && !dims.trans_b) {
        return false;
    }
    match (mode, inputs) {
        (OneDnnMode::Off, _) => false,
        (OneDnnMode::Always, _) => true,
        (OneDnnMode::Auto, (DType::BF16, DType::BF16)) => k >= ONEDNN_BF16_MIN_K && n >= ONEDNN_BF16_MIN_N,
        (OneDnnMode::Auto, (DType::F32, DType::F32)) => {
            crate::onednn::f32_faster_here() && k >= ONEDNN_F32_MIN_K && n >= ONEDNN_BF16_MIN_N
        }
        (OneDnnMode::Auto, _) => false,
    }
}

/// Smallest `k` of a bf16 product oneDNN takes in `Auto` mode. Measured on 2
/// threads (AMX, loaded machine, bf16 inputs, f32 output, medians of 5):
/// from k = 32 oneDNN runs its AMX kernel at 275-1050 GFLOP/s against the
/// `gemm` crate's 45-165 on widened inputs, at every n from 8 and m from 16;
/// at k = 8 and 16 it picks an AVX-512-BF16 kernel that is slower (64 and 97
/// against 73 and 123 at 2048x384). f32 products stay on the `gemm` crate:
/// oneDNN's f32 kernel (`brg:avx512_core`) measured 0.85-1.1x of it on the
/// DiT-S shapes.
pub(crate) const ONEDNN_BF16_MIN_K: usize = 32;

/// Smallest `k` of an f32 product oneDNN takes in `Auto` mode, on CPUs where
/// its f32 kernel is the faster (`onednn::f32_faster_here`), with n >= 32 as
/// for bf16. Measured on an AMD EPYC (AVX-512, 2 threads): at k = 64 (256 x 256)
/// the `gemm` crate was faster (138 against 96 GFLOP/s); from k = 256 oneDNN
/// won at every shape (105-356 against 50-238).
pub(crate) const ONEDNN_F32_MIN_K: usize = 128;

/// Smallest `n` of a bf16 product oneDNN takes in `Auto` mode: at n = 8
/// oneDNN 2.6 computes products of up to 32 rows with other bits than the
/// same rows inside a taller product (measured; n >= 32 keeps them).
pub(crate) const ONEDNN_BF16_MIN_N: usize = 32;

/// The `gemm` crate's parallelism for a thread count.
pub(crate) fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// A strided matrix view into a buffer: element `(i, j)` lives at
/// `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Strided {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    /// A contiguous row-major `[rows, cols]` block starting at `offset`.
    pub fn row_major(offset: usize, rows: usize, cols: usize) -> Self {
        Self {
            offset,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same storage read transposed.
    pub fn t(self) -> Self {
        Self {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Errors unless every element of the view lies inside a buffer of `len`.
    fn check_inside(&self, op: &str, what: &str, len: usize) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (self.cols - 1).checked_mul(self.cs).and_then(|c| r.checked_add(c)))
            .and_then(|rc| rc.checked_add(self.offset));
        match last {
            Some(last) if last < len => Ok(()),
            _ => Err(EngineError::shape(
                format!("{op} ({what})"),
                format!("a view inside {len} elements"),
                format!("{self:?}"),
            )),
        }
    }
}

/// A mutable buffer that several threads write through disjoint views.
pub(crate) struct SharedMut<T = f32> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedMut<T> {}

// SAFETY: a `SharedMut` is only written through `gemm_shared` and `block`,
// whose callers guarantee that concurrent views never overlap.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps a buffer; the borrow must outlive every use of the wrapper.
    pub fn new(buf: &mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// The elements `[offset, offset + len)` as a slice.
    ///
    /// # Safety
    /// Nothing else may access those elements while the slice lives, and the
    /// buffer must outlive it.
    pub unsafe fn block<'a>(&self, offset: usize, len: usize) -> Result<&'a mut [T]> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(std::slice::from_raw_parts_mut(self.ptr.add(offset), len)),
            _ => Err(EngineError::shape(
                "block",
                format!("a block inside {} elements", self.len),
                format!("[{offset}, +{len})"),
            )),
        }
    }
}

/// `dst = alpha * lhs @ rhs + beta * dst` over strided views; with `beta == 0`
/// the old `dst` is never read (NaN there does not leak through).
/// dst: [m, n]; lhs: [m, k]; rhs: [k, n].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    op: &str,
    dst: &mut [f32],
    dv: Strided,
    lhs: &[f32],
    lv: Strided,
    rhs: &[f32],
    rv: Strided,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) -> Result<()> {
    // SAFETY: `dst` is borrowed mutably for the whole call, so no one else
    // touches it.
    unsafe { gemm_shared(op, SharedMut::new(dst), dv, lhs, lv, rhs, rv, alpha, beta, par) }
}

/// [`gemm_strided`] writing through a [`SharedMut`].
///
/// # Safety
/// No other thread may read or write the elements of `dst` that `dv` covers
/// while this runs, and the buffer behind `dst` must still be alive.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_shared(
    op: &str,
    dst: SharedMut,
    dv: Strided,
    lhs: &[f32],
    lv: Strided,
    rhs: &[f32],
    rv: Strided,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) -> Result<()> {
    let (m, n, k) = (dv.rows, dv.cols, lv.cols);
    if lv.rows != m || rv.cols != n || rv.rows != k {
        return Err(EngineError::shape(
            op,
            format!("lhs [{m}, k] and rhs [k, {n}] for dst [{m}, {n}]"),
            format!("lhs [{}, {}], rhs [{}, {}]", lv.rows, lv.cols, rv.rows, rv.cols),
        ));
    }
    dv.check_inside(op, "out", dst.len)?;
    lv.check_inside(op, "lhs", lhs.len())?;
    rv.check_inside(op, "rhs", rhs.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let d = dst.ptr.add(dv.offset);
    if k == 0 {
        // An empty sum: only the `beta * dst` term is left.
        for i in 0..m {
            for j in 0..n {
                let e = d.add(i * dv.rs + j * dv.cs);
                *e = if beta == 0.0 { 0.0 } else { beta * *e };
            }
        }
        return Ok(());
    }
    gemm::gemm(
        m,
        n,
        k,
        d,
        dv.cs as isize,
        dv.rs as isize,
        beta != 0.0,
        lhs.as_ptr().add(lv.offset),
        lv.cs as isize,
        lv.rs as isize,
        rhs.as_ptr().add(rv.offset),
        rv.cs as isize,
        rv.rs as isize,
        beta,
        alpha,
        false,
        false,
        false,
        par,
    );
    Ok(())
}

/// The views of `op(a)` and `op(b)` for one product starting at the given offsets.
fn operand_views(dims: GemmDims, a_off: usize, b_off: usize) -> (Strided, Strided) {
    let GemmDims { m, n, k, .. } = dims;
    let a = if dims.trans_a {
        Strided::row_major(a_off, k, m).t()
    } else {
        Strided::row_major(a_off, m, k)
    };
    let b = if dims.trans_b {
        Strided::row_major(b_off, n, k).t()
    } else {
        Strided::row_major(b_off, k, n)
    };
    (a, b)
}

/// `out = alpha * op(a) @ op(b) + beta * out (+ bias)`, the bias `[n]` added
/// to every row after the product (not scaled by alpha).
/// out: [m, n]; a: [m, k] or [k, m] (trans_a); b: [k, n] or [n, k] (trans_b).
///
/// With `beta == 0` the bias is fused: `out` starts as the bias rows and the
/// product accumulates onto them (`beta = 1`), one pass over `out` instead of
/// two. Otherwise the bias is added after the product. Either way the result
/// equals a product followed by a bias add up to one rounding.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> Result<()> {
    const OP: &str = "gemm";
    if dims.m <= FEW_ROWS && !dims.trans_a && !dims.trans_b {
        check_blocks(OP, out.len(), a.len(), b.len(), 1, dims)?;
        if let Some(bias) = bias {
            check_len(OP, "bias", bias.len(), dims.n)?;
        }
        gemm_few_rows(out, a, b, bias, (dims.m, dims.n, dims.k), alpha, beta);
        return Ok(());
    }
    let Some(bias) = bias else {
        return gemm_blocks(OP, out, a, b, 1, dims, alpha, beta, threads);
    };
    check_blocks(OP, out.len(), a.len(), b.len(), 1, dims)?;
    check_len(OP, "bias", bias.len(), dims.n)?;
    if out.is_empty() {
        return Ok(());
    }
    if beta == 0.0 {
        out.par_chunks_mut(rows_per_task(dims.m, dims.n) * dims.n)
            .for_each(|rows| rows.chunks_exact_mut(dims.n).for_each(|r| r.copy_from_slice(bias)));
        gemm_blocks(OP, out, a, b, 1, dims, alpha, 1.0, threads)
    } else {
        gemm_blocks(OP, out, a, b, 1, dims, alpha, beta, threads)?;
        add_broadcast(out, bias)
    }
}

/// `batch` independent products over contiguous blocks of `out`, `a`, `b`.
/// out: [batch, m, n]; a: [batch, m, k] (or [batch, k, m]); b: [batch, k, n] (or [batch, n, k]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    batch: usize,
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> Result<()> {
    gemm_blocks("gemm_batched", out, a, b, batch, dims, alpha, beta, threads)
}

/// Checks the buffer lengths of `batch` products of `dims`.
pub(crate) fn check_blocks(op: &str, out: usize, a: usize, b: usize, batch: usize, dims: GemmDims) -> Result<()> {
    let GemmDims { m, n, k, .. } = dims;
    check_len(op, "out", out, numel(op, &[batch, m, n])?)?;
    check_len(op, "a", a, numel(op, &[batch, m, k])?)?;
    check_len(op, "b", b, numel(op, &[batch, k, n])?)
}

/// [`gemm_batched`] with the op name its errors carry.
#[allow(clippy::too_many_arguments)]
fn gemm_blocks(
    op: &str,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    batch: usize,
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> Result<()> {
    let GemmDims { m, n, k, .. } = dims;
    check_blocks(op, out.len(), a.len(), b.len(), batch, dims)?;
    if out.is_empty() {
        return Ok(());
    }
    let (mn, mk, kn) = (m * n, m * k, k * n);
    let one = |i: usize, out_i: &mut [f32], par: Parallelism| -> Result<()> {
        let (av, bv) = operand_views(dims, i * mk, i * kn);
        gemm_strided(op, out_i, Strided::row_major(0, m, n), a, av, b, bv, alpha, beta, par)
    };
    if threads > 1 && batch > 1 && dims.flops() < BATCH_PAR_MAX_FLOPS {
        // Many small products (attention heads): one thread per product.
        out.par_chunks_mut(mn)
            .enumerate()
            .try_for_each(|(i, out_i)| one(i, out_i, Parallelism::None))
    } else {
        out.chunks_mut(mn)
            .enumerate()
            .try_for_each(|(i, out_i)| one(i, out_i, parallelism(threads)))
    }
}

/// Grouped products, one weight matrix per group (stacked MoE experts):
/// `out[rows of g] = alpha * a[rows of g] @ op(b[g]) + beta * out[rows of g]`.
/// out: [R, n]; a: [R, k]; b: [G, n, k] (trans_b) or [G, k, n]; `R = sum(group_rows)`.
///
/// With several threads, groups (split into row tiles) run side by side, each
/// tile a single-threaded product: one level of parallelism and no per-product
/// barriers. The bits equal those of one [`gemm`] per group.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    group_rows: &[usize],
    n: usize,
    k: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> Result<()> {
    const OP: &str = "gemm_grouped";
    let rows = check_grouped(OP, out.len(), a.len(), b.len(), group_rows, n, k)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let split = n >= GROUP_SPLIT_MIN_DIM && k >= GROUP_SPLIT_MIN_DIM;
    let chunks = group_chunks(group_rows, if split { threads } else { 1 });
    let dst = SharedMut::new(out);
    let one = |piece: &GroupPiece, par: Parallelism| -> Result<()> {
        let dims = GemmDims {
            m: piece.rows,
            n,
            k,
            trans_a: false,
            trans_b,
        };
        if piece.rows <= FEW_ROWS && !trans_b {
            // A whole group of a few rows (cut pieces are taller): the kernel
            // `gemm` uses for it, so the bits equal the per-group loop's.
            // SAFETY: as below.
            let o = unsafe { dst.block(piece.row0 * n, piece.rows * n)? };
            let (a, b) = (
                &a[piece.row0 * k..][..piece.rows * k],
                &b[piece.group * n * k..][..n * k],
            );
            gemm_few_rows(o, a, b, None, (piece.rows, n, k), alpha, beta);
            return Ok(());
        }
        let (av, bv) = operand_views(dims, piece.row0 * k, piece.group * n * k);
        let dv = Strided::row_major(piece.row0 * n, piece.rows, n);
        // SAFETY: pieces cover disjoint row ranges of `out`, which stays
        // mutably borrowed (through `dst`) until every piece is done.
        unsafe { gemm_shared(OP, dst, dv, a, av, b, bv, alpha, beta, par) }
    };
    if threads > 1 && chunks.len() > 1 {
        let next = AtomicUsize::new(0);
        let failed = Mutex::new(None);
        // Each worker takes the next chunk not yet started until none is left.
        (0..threads.min(chunks.len())).into_par_iter().for_each(|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(i) else { break };
            if let Err(e) = chunk.iter().try_for_each(|p| one(p, Parallelism::None)) {
                next.store(chunks.len(), Ordering::Relaxed);
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                break;
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    } else {
        chunks.iter().flatten().try_for_each(|p| one(p, parallelism(threads)))
    }
}

/// One single-threaded product of a grouped gemm: `rows` rows of group
/// `group` starting at global row `row0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GroupPiece {
    group: usize,
    row0: usize,
    rows: usize,
}

/// Cuts the rows of all groups, in order, into about
/// `threads * GROUP_CHUNKS_PER_THREAD` chunks of near-equal rows, each a list
/// of pieces (a group, or part of one, within the chunk). A cut inside a group
/// leaves at least [`GROUP_PIECE_MIN_ROWS`] rows on each side or moves to the
/// nearer group boundary; with one thread every group is one piece.
fn group_chunks(group_rows: &[usize], threads: usize) -> Vec<Vec<GroupPiece>> {
    let whole = || -> Vec<Vec<GroupPiece>> {
        let mut row0 = 0;
        let mut chunks = Vec::new();
        for (group, &rows) in group_rows.iter().enumerate() {
            if rows > 0 {
                chunks.push(vec![GroupPiece { group, row0, rows }]);
            }
            row0 += rows;
        }
        chunks
    };
    let total: usize = group_rows.iter().sum();
    // Chunks of at least 3 minimum pieces, so two snapped cuts inside one
    // group still leave a minimum piece between them.
    let count = (threads * GROUP_CHUNKS_PER_THREAD).min(total / (3 * GROUP_PIECE_MIN_ROWS));
    if threads <= 1 || count <= 1 {
        return whole();
    }
    let starts: Vec<usize> = group_rows
        .iter()
        .scan(0, |acc, &m| {
            let s = *acc;
            *acc += m;
            Some(s)
        })
        .collect();
    // The group holding row `r` (the last non-empty one starting at or before it).
    let group_at = |r: usize| starts.partition_point(|&s| s <= r).saturating_sub(1);
    let snap = |r: usize| {
        let g = group_at(r);
        let (lo, hi) = (r - starts[g], starts[g] + group_rows[g] - r);
        if lo == 0 || hi == 0 || (lo >= GROUP_PIECE_MIN_ROWS && hi >= GROUP_PIECE_MIN_ROWS) {
            r
        } else if lo < hi {
            starts[g]
        } else {
            starts[g] + group_rows[g]
        }
    };
    let mut cuts: Vec<usize> = (0..=count).map(|c| snap(total * c / count)).collect();
    cuts.dedup();
    let mut chunks = Vec::with_capacity(cuts.len());
    for w in cuts.windows(2) {
        let (c0, c1) = (w[0], w[1]);
        let mut pieces = Vec::new();
        for g in group_at(c0)..group_rows.len() {
            let (g0, g1) = (starts[g], starts[g] + group_rows[g]);
            if g0 >= c1 {
                break;
            }
            let (r0, r1) = (g0.max(c0), g1.min(c1));
            if r1 > r0 {
                if r1 - r0 < group_rows[g] && r1 - r0 < GROUP_PIECE_MIN_ROWS {
                    return whole(); // cannot happen with chunks of >= 3 minimum pieces
                }
                pieces.push(GroupPiece {
                    group: g,
                    row0: r0,
                    rows: r1 - r0,
                });
            }
        }
        if !pieces.is_empty() {
            chunks.push(pieces);
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_chunks_cover_every_row_once_in_near_equal_chunks() {
        for (groups, threads) in [
            (vec![512usize; 8], 2usize),
            (vec![0, 300, 0, 700, 1, 129, 256, 257], 2),
            (vec![2048], 2),
            (vec![512], 2),
            (vec![100, 0, 5000], 3),
            (vec![350, 700, 420, 600, 480, 520, 460, 566], 2),
            (vec![700, 10], 1),
            (vec![], 2),
        ] {
            let chunks = group_chunks(&groups, threads);
            let mut next = 0;
            let mut per_group = vec![0usize; groups.len()];
            for p in chunks.iter().flatten() {
                assert_eq!(p.row0, next, "{groups:?}: pieces are consecutive");
                assert!(p.rows > 0);
                next += p.rows;
                per_group[p.group] += p.rows;
                if groups[p.group] != p.rows {
                    assert!(p.rows >= GROUP_PIECE_MIN_ROWS, "{groups:?}: piece {p:?} too short");
                }
            }
            assert_eq!(per_group, groups);
            let total: usize = groups.iter().sum();
            if threads == 1 {
                assert_eq!(chunks.len(), groups.iter().filter(|&&m| m > 0).count());
            } else if total >= 3 * GROUP_PIECE_MIN_ROWS * threads * GROUP_CHUNKS_PER_THREAD {
                // A cut moves by less than a minimum piece.
                let even = total / (threads * GROUP_CHUNKS_PER_THREAD);
                for c in &chunks {
                    let rows: usize = c.iter().map(|p| p.rows).sum();
                    assert!(
                        rows.abs_diff(even) < 2 * GROUP_PIECE_MIN_ROWS,
                        "{groups:?}: chunk of {rows} rows"
                    );
                }
            }
        }
        // Uneven experts (token choice) on two threads: cuts at 1024, 2048 and
        // 3072 rows, the first two moved to group ends 26 and 22 rows away.
        let uneven = group_chunks(&[350, 700, 420, 600, 480, 520, 460, 566], 2);
        let rows: Vec<usize> = uneven.iter().map(|c| c.iter().map(|p| p.rows).sum()).collect();
        assert_eq!(rows, [1050, 1020, 1000, 1026]);
        // One 2048-row group: four pieces of 512; eight 512-row experts: two each.
        let dense = group_chunks(&[2048], 2);
        assert_eq!(dense.iter().flatten().map(|p| p.rows).collect::<Vec<_>>(), [512; 4]);
        assert!(group_chunks(&[512; 8], 2)
            .iter()
            .all(|c| c.len() == 2 && c[0].rows == 512));
    }
}
