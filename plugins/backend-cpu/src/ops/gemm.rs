//! Matrix products on the `gemm` crate (pure Rust, runtime SIMD dispatch up to
//! AVX-512), plain and batched, plus the strided form attention builds on.
//!
//! `gemm` computes `dst = alpha_g * dst + beta_g * lhs @ rhs` over arbitrary
//! strides; our convention is BLAS's `out = alpha * op(a) @ op(b) + beta * out`,
//! so the two scalars swap at the call. Its `Parallelism::Rayon(n)` splits work
//! on rayon's current pool, which is the backend's pool inside `install`.

use super::numel;
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::GemmDims;
use gemm::Parallelism;
use rayon::prelude::*;

/// Per-product flops below which a batched gemm runs its products side by side
/// (one thread each) instead of one after the other on all threads.
const BATCH_PAR_MAX_FLOPS: f64 = (1u64 << 25) as f64;

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
#[derive(Clone, Copy)]
pub(crate) struct SharedMut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a `SharedMut` is only written through `gemm_shared`, whose callers
// guarantee that concurrent views never overlap.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Wraps a buffer; the borrow must outlive every use of the wrapper.
    pub fn new(buf: &mut [f32]) -> Self {
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
    pub unsafe fn block<'a>(&self, offset: usize, len: usize) -> Result<&'a mut [f32]> {
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

/// `out = alpha * op(a) @ op(b) + beta * out`.
/// out: [m, n]; a: [m, k] or [k, m] (trans_a); b: [k, n] or [n, k] (trans_b).
pub fn gemm(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> Result<()> {
    gemm_blocks("gemm", out, a, b, 1, dims, alpha, beta, threads)
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
    let (out_len, a_len, b_len) = (
        numel(op, &[batch, m, n])?,
        numel(op, &[batch, m, k])?,
        numel(op, &[batch, k, n])?,
    );
    check_len(op, "out", out.len(), out_len)?;
    check_len(op, "a", a.len(), a_len)?;
    check_len(op, "b", b.len(), b_len)?;
    if out_len == 0 {
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
