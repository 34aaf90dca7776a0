//! Top-k selections: per row, and expert choice's per-(expert, group) selection.

use crate::backend::CudaBackend;
use crate::device::{dev_ptr, f32_ptr, numel};
use cudarc::driver::PushKernelArg;
use ecdit_engine::error::check_len;
use ecdit_engine::{DType, EngineError, Result, TensorMut, TensorRef};

impl CudaBackend {
    /// Per row, the `k` largest values, best first (ties: lower column).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn top_k_rows_impl(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        let op = "top_k_rows";
        check_len(op, "inp", inp.numel(), numel(op, &[rows, cols])?)?;
        check_len(op, "idx", idx.numel(), numel(op, &[rows, k])?)?;
        check_len(op, "val", val.numel(), numel(op, &[rows, k])?)?;
        if k > cols {
            return Err(EngineError::shape(
                op,
                format!("k <= cols = {cols}"),
                format!("k = {k}"),
            ));
        }
        if u32::try_from(cols).is_err() {
            return Err(EngineError::shape(op, "cols that fit in u32", cols));
        }
        let (ip, vp, x) = (
            dev_ptr(op, "idx", idx.as_ref(), DType::U32)?,
            f32_ptr(op, "val", val.as_ref())?,
            f32_ptr(op, "inp", inp)?,
        );
        if k == 0 || rows == 0 {
            return Ok(());
        }
        let (r, c, k64) = (rows as u64, cols as u64, k as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().top_k_rows);
            args.arg(&ip).arg(&vp).arg(&x).arg(&r).arg(&c).arg(&k64);
            self.launch(op, rows, args)
        })
    }

    /// Expert choice's selection, expert-major `[E, groups, k]`, ranked by
    /// `routing_math::rank_key` (the host routers' order, to the bit).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn top_k_tokens_impl(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        probs: TensorRef<'_>,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()> {
        let op = "top_k_tokens";
        let rows = numel(op, &[groups, group_rows])?;
        check_len(op, "probs", probs.numel(), numel(op, &[rows, experts])?)?;
        let out_len = numel(op, &[experts, groups, k])?;
        check_len(op, "idx", idx.numel(), out_len)?;
        check_len(op, "val", val.numel(), out_len)?;
        if k > group_rows {
            return Err(EngineError::shape(
                op,
                format!("k <= group_rows = {group_rows}"),
                format!("k = {k}"),
            ));
        }
        if u32::try_from(rows).is_err() {
            return Err(EngineError::shape(op, "rows that fit in u32", rows));
        }
        let (ip, vp, p) = (
            dev_ptr(op, "idx", idx.as_ref(), DType::U32)?,
            f32_ptr(op, "val", val.as_ref())?,
            f32_ptr(op, "probs", probs)?,
        );
        if out_len == 0 {
            return Ok(());
        }
        let (g, gr, e, k64) = (groups as u64, group_rows as u64, experts as u64, k as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().top_k_tokens);
            args.arg(&ip).arg(&vp).arg(&p).arg(&g).arg(&gr).arg(&e).arg(&k64);
            self.launch(op, experts * groups, args)
        })
    }
}
