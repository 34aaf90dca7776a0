//! Row gather, scatter-add and gather-dot (MoE dispatch, combine, gate
//! gradient). Indices stay on the device: an index out of range is skipped by
//! the kernels and reported at the next download ([`crate::status`]), so
//! none of these ops waits for the host.

use crate::backend::CudaBackend;
use crate::device::{dev_ptr, numel, opt_ten, ten};
use crate::probe::cuda_error;
use cudarc::driver::{DevicePtr, PushKernelArg};
use ecdit_engine::error::check_len;
use ecdit_engine::{DType, EngineError, Result, TensorMut, TensorRef};

/// Rows of a `[rows, cols]` tensor of `len` elements.
fn rows_of(op: &str, what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        if len != 0 {
            return Err(EngineError::shape(
                format!("{op} ({what})"),
                "0 elements when cols = 0",
                len,
            ));
        }
        return Ok(0);
    }
    if !len.is_multiple_of(cols) {
        return Err(EngineError::shape(
            format!("{op} ({what})"),
            format!("a multiple of cols = {cols} elements"),
            len,
        ));
    }
    Ok(len / cols)
}

impl CudaBackend {
    /// `out[i, :] = inp[idx[i], :]`.
    pub(crate) fn gather_rows_impl(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        let op = "gather_rows";
        let n_idx = idx.numel();
        check_len(op, "out", out.numel(), numel(op, &[n_idx, cols])?)?;
        let rows = rows_of(op, "inp", inp.numel(), cols)?;
        let (o, i, ix) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "inp", inp)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
        );
        if out.numel() == 0 {
            return Ok(());
        }
        let (n64, c64, r64, st) = (n_idx as u64, cols as u64, rows as u64, self.status_ptr());
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().gather_rows);
            args.arg(&o).arg(&i).arg(&ix).arg(&n64).arg(&c64).arg(&r64).arg(&st);
            self.launch(op, n_idx * cols, args)
        })
    }

    /// `out[idx[i], :] += scale[i] * inp[i, :]`, each row's sources in
    /// increasing `i`: a stable counting sort of the sources by destination
    /// row (count, scan, place, sort each row's run), then one thread per
    /// output element. Deterministic, parallel over rows and columns.
    pub(crate) fn scatter_add_rows_impl(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        let n_idx = idx.numel();
        check_len(op, "inp", inp.numel(), numel(op, &[n_idx, cols])?)?;
        if let Some(s) = scale {
            check_len(op, "scale", s.numel(), n_idx)?;
        }
        let rows = rows_of(op, "out", out.numel(), cols)?;
        let (o, i, ix) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "inp", inp)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
        );
        let (sp, has_scale) = opt_ten(op, "scale", scale)?;
        if inp.numel() == 0 {
            return Ok(());
        }
        if u32::try_from(n_idx).is_err() {
            return Err(EngineError::shape(op, "at most 2^32 - 1 indices", n_idx));
        }
        let (n64, c64, r64, st) = (n_idx as u64, cols as u64, rows as u64, self.status_ptr());
        self.run(op, || {
            let scratch = |n: usize| {
                self.stream()
                    .alloc_zeros::<u32>(n.max(1))
                    .map_err(|e| cuda_error(format!("{op}: scratch of {n} u32: {e}")))
            };
            let (count, start, fill, order) = (scratch(rows)?, scratch(rows + 1)?, scratch(rows)?, scratch(n_idx)?);
            let s = self.stream();
            let (cp, sp0, fp, op_) = (
                count.device_ptr(s).0,
                start.device_ptr(s).0,
                fill.device_ptr(s).0,
                order.device_ptr(s).0,
            );
            let mut args = s.launch_builder(&self.kernels().scatter_count);
            args.arg(&cp).arg(&ix).arg(&n64).arg(&r64).arg(&st);
            self.launch(op, n_idx, args)?;
            // One block scans the counts.
            let mut args = s.launch_builder(&self.kernels().scatter_scan);
            args.arg(&sp0).arg(&cp).arg(&r64);
            self.launch(op, 1, args)?;
            let mut args = s.launch_builder(&self.kernels().scatter_place);
            args.arg(&op_).arg(&fp).arg(&sp0).arg(&ix).arg(&n64).arg(&r64);
            self.launch(op, n_idx, args)?;
            let mut args = s.launch_builder(&self.kernels().scatter_sort);
            args.arg(&op_).arg(&sp0).arg(&r64);
            self.launch(op, rows, args)?;
            let mut args = s.launch_builder(&self.kernels().scatter_apply);
            args.arg(&o)
                .arg(&i)
                .arg(&op_)
                .arg(&sp0)
                .arg(&sp)
                .arg(&has_scale)
                .arg(&r64)
                .arg(&c64);
            self.launch(op, rows * cols, args)
        })
    }

    /// `out[i] = <a[idx[i], :], b[i, :]>`.
    pub(crate) fn gather_dot_impl(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        let op = "gather_dot";
        let n = idx.numel();
        check_len(op, "out", out.numel(), n)?;
        check_len(op, "b", b.numel(), numel(op, &[n, cols])?)?;
        let rows = rows_of(op, "a", a.numel(), cols)?;
        let (o, ap, ix, bp) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "a", a)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
            ten(op, "b", b)?,
        );
        if n == 0 {
            return Ok(());
        }
        let (n64, c64, r64, st) = (n as u64, cols as u64, rows as u64, self.status_ptr());
        self.run(op, || {
            if cols == 0 {
                // Empty dot products: zeros, whatever the indices.
                let mut args = self.stream().launch_builder(&self.kernels().scale_in_place);
                args.arg(&o).arg(&n64).arg(&0.0f32);
                return self.launch(op, n, args);
            }
            let mut args = self.stream().launch_builder(&self.kernels().gather_dot);
            args.arg(&o)
                .arg(&ap)
                .arg(&ix)
                .arg(&bp)
                .arg(&n64)
                .arg(&c64)
                .arg(&r64)
                .arg(&st);
            self.launch(op, n, args)
        })
    }
}
