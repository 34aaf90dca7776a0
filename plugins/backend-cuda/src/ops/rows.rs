//! Row ops: column sums, row softmax and its backward, the router softmax,
//! layer norm and its backward.

use crate::backend::CudaBackend;
use crate::device::{f32_ptr, numel, opt_ten, ten};
use cudarc::driver::{DevicePtr, PushKernelArg};
use ecdit_engine::error::check_len;
use ecdit_engine::{Result, TensorMut, TensorRef};

/// Rows per partial sum of the layer-norm parameter gradients: the CPU
/// backend's chunking, so the sums round the same way.
const DPARAM_CHUNK_ROWS: u64 = 64;

/// Threads of a half-warp-per-row kernel (softmax, layer norm) for `rows` rows.
fn half_warps(rows: usize) -> usize {
    rows.saturating_mul(16)
}

fn check_opt(op: &str, what: &str, v: Option<TensorRef<'_>>, len: usize) -> Result<()> {
    match v {
        Some(v) => check_len(op, what, v.numel(), len),
        None => Ok(()),
    }
}

impl CudaBackend {
    /// `out[c] (+)= sum_r inp[r, c]`.
    pub(crate) fn sum_rows_impl(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let op = "sum_rows";
        check_len(op, "out", out.numel(), cols)?;
        check_len(op, "inp", inp.numel(), numel(op, &[rows, cols])?)?;
        let (o, i) = (ten(op, "out", out.as_ref())?, ten(op, "inp", inp)?);
        let (r, c, acc) = (rows as u64, cols as u64, accumulate as i32);
        self.run(op, || {
            // rows = 0 runs too: the kernel writes 0 (or keeps out when accumulating).
            let mut args = self.stream().launch_builder(&self.kernels().sum_rows);
            args.arg(&o).arg(&i).arg(&r).arg(&c).arg(&acc);
            self.launch(op, cols, args)
        })
    }

    /// Row softmax.
    pub(crate) fn softmax_rows_impl(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "softmax_rows";
        let len = numel(op, &[rows, cols])?;
        check_len(op, "out", out.numel(), len)?;
        check_len(op, "inp", inp.numel(), len)?;
        let (o, i) = (ten(op, "out", out.as_ref())?, ten(op, "inp", inp)?);
        if len == 0 {
            return Ok(());
        }
        let (r, c) = (rows as u64, cols as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().softmax_rows);
            args.arg(&o).arg(&i).arg(&r).arg(&c);
            self.launch(op, half_warps(rows), args)
        })
    }

    /// `dinp = out * (dout - sum(dout * out))` per row.
    pub(crate) fn softmax_rows_backward_impl(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "softmax_rows_backward";
        let len = numel(op, &[rows, cols])?;
        check_len(op, "dinp", dinp.numel(), len)?;
        check_len(op, "dout", dout.numel(), len)?;
        check_len(op, "out", out.numel(), len)?;
        let (di, d, o) = (
            ten(op, "dinp", dinp.as_ref())?,
            ten(op, "dout", dout)?,
            ten(op, "out", out)?,
        );
        if len == 0 {
            return Ok(());
        }
        let (r, c) = (rows as u64, cols as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().softmax_rows_backward);
            args.arg(&di).arg(&d).arg(&o).arg(&r).arg(&c);
            self.launch(op, rows, args)
        })
    }

    /// The router softmax, f32, the host routers' bits.
    pub(crate) fn router_softmax_impl(
        &self,
        out: TensorMut<'_>,
        scores: TensorRef<'_>,
        rows: usize,
        experts: usize,
    ) -> Result<()> {
        let op = "router_softmax";
        let len = numel(op, &[rows, experts])?;
        check_len(op, "out", out.numel(), len)?;
        check_len(op, "scores", scores.numel(), len)?;
        let (o, s) = (f32_ptr(op, "out", out.as_ref())?, f32_ptr(op, "scores", scores)?);
        if len == 0 {
            return Ok(());
        }
        let (r, e, fma) = (rows as u64, experts as u64, crate::exact::host_uses_fma() as i32);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().router_softmax);
            args.arg(&o).arg(&s).arg(&r).arg(&e).arg(&fma);
            self.launch(op, rows, args)
        })
    }

    /// Layer norm with optional affine parameters, caching mean and rstd.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_norm_impl(
        &self,
        out: TensorMut<'_>,
        mean: TensorMut<'_>,
        rstd: TensorMut<'_>,
        inp: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        bias: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "layer_norm";
        let len = numel(op, &[rows, cols])?;
        check_len(op, "out", out.numel(), len)?;
        check_len(op, "inp", inp.numel(), len)?;
        check_len(op, "mean", mean.numel(), rows)?;
        check_len(op, "rstd", rstd.numel(), rows)?;
        check_opt(op, "weight", weight, cols)?;
        check_opt(op, "bias", bias, cols)?;
        let (o, mu, rs, i) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "mean", mean.as_ref())?,
            ten(op, "rstd", rstd.as_ref())?,
            ten(op, "inp", inp)?,
        );
        let ((w, has_w), (b, has_b)) = (opt_ten(op, "weight", weight)?, opt_ten(op, "bias", bias)?);
        let (r, c) = (rows as u64, cols as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().layer_norm);
            args.arg(&o)
                .arg(&mu)
                .arg(&rs)
                .arg(&i)
                .arg(&w)
                .arg(&has_w)
                .arg(&b)
                .arg(&has_b)
                .arg(&r)
                .arg(&c)
                .arg(&eps);
            self.launch(op, half_warps(rows), args)
        })
    }

    /// Backward of layer norm: overwrites dinp, accumulates dweight and dbias.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_norm_backward_impl(
        &self,
        dinp: TensorMut<'_>,
        dweight: Option<TensorMut<'_>>,
        dbias: Option<TensorMut<'_>>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        mean: TensorRef<'_>,
        rstd: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layer_norm_backward";
        let len = numel(op, &[rows, cols])?;
        check_len(op, "dinp", dinp.numel(), len)?;
        check_len(op, "dout", dout.numel(), len)?;
        check_len(op, "inp", inp.numel(), len)?;
        check_len(op, "mean", mean.numel(), rows)?;
        check_len(op, "rstd", rstd.numel(), rows)?;
        check_opt(op, "weight", weight, cols)?;
        check_opt(op, "dweight", dweight.as_ref().map(|v| v.as_ref()), cols)?;
        check_opt(op, "dbias", dbias.as_ref().map(|v| v.as_ref()), cols)?;
        let (di, d, i, mu, rs) = (
            ten(op, "dinp", dinp.as_ref())?,
            ten(op, "dout", dout)?,
            ten(op, "inp", inp)?,
            ten(op, "mean", mean)?,
            ten(op, "rstd", rstd)?,
        );
        let (w, has_w) = opt_ten(op, "weight", weight)?;
        let (dw, has_dw) = opt_ten(op, "dweight", dweight.as_ref().map(|v| v.as_ref()))?;
        let (db, has_db) = opt_ten(op, "dbias", dbias.as_ref().map(|v| v.as_ref()))?;
        if len == 0 {
            return Ok(());
        }
        let (r, c, chunk) = (rows as u64, cols as u64, DPARAM_CHUNK_ROWS);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().layer_norm_backward_input);
            args.arg(&di)
                .arg(&d)
                .arg(&i)
                .arg(&mu)
                .arg(&rs)
                .arg(&w)
                .arg(&has_w)
                .arg(&r)
                .arg(&c);
            self.launch(op, rows, args)?;
            if has_dw + has_db == 0 {
                return Ok(());
            }
            // Partial sums per chunk of rows in parallel, then added in chunk order.
            let chunks = rows.div_ceil(DPARAM_CHUNK_ROWS as usize);
            let part = self.scratch_f32(op, 2 * chunks * cols)?;
            let pp = part.device_ptr(self.stream()).0;
            let mut args = self.stream().launch_builder(&self.kernels().layer_norm_dparams_partial);
            args.arg(&pp)
                .arg(&d)
                .arg(&i)
                .arg(&mu)
                .arg(&rs)
                .arg(&r)
                .arg(&c)
                .arg(&chunk);
            self.launch(op, chunks * cols, args)?;
            let chunks64 = chunks as u64;
            let mut args = self.stream().launch_builder(&self.kernels().layer_norm_dparams_fold);
            args.arg(&dw)
                .arg(&has_dw)
                .arg(&db)
                .arg(&has_db)
                .arg(&pp)
                .arg(&chunks64)
                .arg(&c);
            self.launch(op, cols, args)
        })
    }
}
