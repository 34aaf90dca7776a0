//! Top-k selections: per row, and expert choice's per-(expert, group) selection.

use crate::backend::CudaBackend;
use crate::device::{dev_ptr, f32_ptr, ten};
use cudarc::driver::PushKernelArg;
use ecdit_engine::backend::{check_top_k_rows, check_top_k_tokens};
use ecdit_engine::{DType, Result, TensorMut, TensorRef};

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
        check_top_k_rows(idx.numel(), val.numel(), inp.numel(), rows, cols, k)?;
        let (ip, vp, x) = (
            dev_ptr(op, "idx", idx.as_ref(), DType::U32)?,
            ten(op, "val", val.as_ref())?,
            ten(op, "inp", inp)?,
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
        let out_len = check_top_k_tokens(
            idx.numel(),
            val.numel(),
            probs.numel(),
            (groups, group_rows, experts, k),
        )?;
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
