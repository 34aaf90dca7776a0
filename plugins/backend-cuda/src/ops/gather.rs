//! Row gather, scatter-add and gather-dot (MoE dispatch, combine, gate gradient).

use crate::backend::CudaBackend;
use crate::device::{dev_ptr, f32_ptr, numel};
use cudarc::driver::PushKernelArg;
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
            f32_ptr(op, "out", out.as_ref())?,
            f32_ptr(op, "inp", inp)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
        );
        if out.numel() == 0 {
            return Ok(());
        }
        self.check_indices(op, idx, rows)?;
        let (n64, c64, r64) = (n_idx as u64, cols as u64, rows as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().gather_rows);
            args.arg(&o).arg(&i).arg(&ix).arg(&n64).arg(&c64).arg(&r64);
            self.launch(op, n_idx * cols, args)
        })
    }

    /// `out[idx[i], :] += scale[i] * inp[i, :]`, indices in order.
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
            f32_ptr(op, "out", out.as_ref())?,
            f32_ptr(op, "inp", inp)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
        );
        // The kernel always takes a scale pointer; unused when absent.
        let (sp, has_scale) = match scale {
            Some(s) => (f32_ptr(op, "scale", s)?, 1i32),
            None => (0u64, 0i32),
        };
        if inp.numel() == 0 {
            return Ok(());
        }
        self.check_indices(op, idx, rows)?;
        let (n64, c64, r64) = (n_idx as u64, cols as u64, rows as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().scatter_add_rows);
            args.arg(&o)
                .arg(&i)
                .arg(&ix)
                .arg(&sp)
                .arg(&has_scale)
                .arg(&n64)
                .arg(&c64)
                .arg(&r64);
            self.launch(op, cols, args)
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
            f32_ptr(op, "out", out.as_ref())?,
            f32_ptr(op, "a", a)?,
            dev_ptr(op, "idx", idx, DType::U32)?,
            f32_ptr(op, "b", b)?,
        );
        if n == 0 {
            return Ok(());
        }
        if cols > 0 {
            self.check_indices(op, idx, rows)?;
        }
        let (n64, c64, r64) = (n as u64, cols as u64, rows as u64);
        self.run(op, || {
            if cols == 0 {
                // Empty dot products: zeros, whatever the indices.
                let mut args = self.stream().launch_builder(&self.kernels().scale_in_place);
                args.arg(&o).arg(&n64).arg(&0.0f32);
                return self.launch(op, n, args);
            }
            let mut args = self.stream().launch_builder(&self.kernels().gather_dot);
            args.arg(&o).arg(&ap).arg(&ix).arg(&bp).arg(&n64).arg(&c64).arg(&r64);
            self.launch(op, n, args)
        })
    }
}
