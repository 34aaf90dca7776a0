//! Matrix products on cuBLAS, through the device addresses of the views.

use crate::backend::CudaBackend;
use crate::device::{f32_ptr, numel};
use crate::gemm::cublas_config;
use crate::probe::cuda_error;
use cudarc::cublas::result::sgemm_strided_batched;
use cudarc::driver::PushKernelArg;
use ecdit_engine::error::check_len;
use ecdit_engine::{GemmDims, Result, TensorMut, TensorRef};

impl CudaBackend {
    /// `out = alpha op(a) op(b) + beta out (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_impl(
        &self,
        mut out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if let Some(bias) = bias {
            check_len("gemm", "bias", bias.numel(), dims.n)?;
            f32_ptr("gemm", "bias", bias)?;
        }
        self.gemm_batched_impl("gemm", out.reborrow(), a, b, 1, dims, alpha, beta)?;
        match bias {
            // The bias after the product, not scaled by alpha.
            Some(bias) => self.add_broadcast_impl(out, bias),
            None => Ok(()),
        }
    }

    /// `batch` gemms over contiguous blocks, one strided-batched cuBLAS call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_batched_impl(
        &self,
        op: &str,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (m, n, k) = (dims.m, dims.n, dims.k);
        check_len(op, "out", out.numel(), numel(op, &[batch, m, n])?)?;
        check_len(op, "a", a.numel(), numel(op, &[batch, m, k])?)?;
        check_len(op, "b", b.numel(), numel(op, &[batch, k, n])?)?;
        let (o, ap, bp) = (
            f32_ptr(op, "out", out.as_ref())?,
            f32_ptr(op, "a", a)?,
            f32_ptr(op, "b", b)?,
        );
        let len = out.numel();
        if len == 0 {
            return Ok(());
        }
        self.run(op, || {
            if k == 0 {
                // An empty sum: out = beta * out (BLAS: beta = 0 overwrites, even NaN).
                let n64 = len as u64;
                let mut args = self.stream().launch_builder(&self.kernels().scale_in_place);
                args.arg(&o).arg(&n64).arg(&beta);
                return self.launch(op, len, args);
            }
            let cfg = cublas_config(dims, alpha, beta)?;
            let batch_c = i32::try_from(batch).map_err(|_| cuda_error(format!("{op}: batch {batch} too large")))?;
            // SAFETY: the views were length-checked against batch, m, n, k above;
            // the leading dimensions come from cublas_config; cuBLAS's A is our b,
            // its B our a (see gemm.rs). alpha and beta are host scalars (the
            // handle's default pointer mode).
            unsafe {
                sgemm_strided_batched(
                    *self.blas().handle(),
                    cfg.transa,
                    cfg.transb,
                    cfg.m,
                    cfg.n,
                    cfg.k,
                    &cfg.alpha,
                    bp as *const f32,
                    cfg.lda,
                    (k * n) as i64,
                    ap as *const f32,
                    cfg.ldb,
                    (m * k) as i64,
                    &cfg.beta,
                    o as *mut f32,
                    cfg.ldc,
                    (m * n) as i64,
                    batch_c,
                )
            }
            .map_err(|e| cuda_error(format!("{op}: cuBLAS sgemm: {e}")))
        })
    }
}
