//! Matrix products on cuBLAS, through the device addresses of the views.
//!
//! bf16 x bf16 runs as one `cublasGemmStridedBatchedEx` on bf16 operands with
//! f32 accumulation, writing a bf16 or f32 output directly. Any other mix runs
//! in f32: bf16 operands are widened into f32 scratch first, and a bf16 output
//! of an f32 product is computed in f32 scratch and rounded once (the CPU
//! backend's arithmetic). Scratch is stream-ordered device memory, so nothing
//! waits for the host.

use crate::backend::CudaBackend;
use crate::device::{numel, raw_ptr, ten};
use crate::gemm::{cublas_config, tf32_allowed};
use crate::probe::cuda_error;
use cudarc::cublas::result::gemm_strided_batched_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use ecdit_engine::error::check_len;
use ecdit_engine::{DType, GemmDims, Result, TensorMut, TensorRef};

/// One operand of a cuBLAS call: address and element type.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    ty: cudaDataType,
}

fn data_type(dtype: DType) -> cudaDataType {
    match dtype {
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        _ => cudaDataType::CUDA_R_32F,
    }
}

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
            ten("gemm", "bias", bias)?;
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
        // Float views of this backend (the dtype check of every operand).
        let ot = ten(op, "out", out.as_ref())?;
        ten(op, "a", a)?;
        ten(op, "b", b)?;
        let len = out.numel();
        if len == 0 {
            return Ok(());
        }
        self.run(op, || {
            if k == 0 {
                // An empty sum: out = beta * out (BLAS: beta = 0 overwrites, even NaN).
                let n64 = len as u64;
                let mut args = self.stream().launch_builder(&self.kernels().scale_in_place);
                args.arg(&ot).arg(&n64).arg(&beta);
                return self.launch(op, len, args);
            }
            let operand = |t: TensorRef<'_>| -> Result<Operand> {
                Ok(Operand {
                    ptr: raw_ptr(op, t)?,
                    ty: data_type(t.dtype()),
                })
            };
            let (ao, bo) = (operand(a)?, operand(b)?);
            if a.dtype() == DType::BF16 && b.dtype() == DType::BF16 {
                let oo = operand(out.as_ref())?;
                return self.cublas(op, oo, ao, bo, batch, dims, alpha, beta, false);
            }
            // An f32 product: widen bf16 operands.
            let a32 = self.widened(op, a)?;
            let b32 = self.widened(op, b)?;
            let f32_operand = |orig: Operand, wide: &Option<CudaSlice<f32>>| match wide {
                Some(s) => Operand {
                    ptr: s.device_ptr(self.stream()).0,
                    ty: cudaDataType::CUDA_R_32F,
                },
                None => orig,
            };
            let (ao, bo) = (f32_operand(ao, &a32), f32_operand(bo, &b32));
            let tf32 = self.tf32() && tf32_allowed(dims);
            if out.dtype() == DType::F32 {
                let oo = operand(out.as_ref())?;
                return self.cublas(op, oo, ao, bo, batch, dims, alpha, beta, tf32);
            }
            // bf16 output of an f32 product: compute in f32, round once.
            let o32 = if beta == 0.0 {
                self.scratch_f32(op, len)?
            } else {
                self.widened(op, out.as_ref())?
                    .ok_or_else(|| cuda_error(format!("{op}: a bf16 output did not widen")))?
            };
            let op32 = o32.device_ptr(self.stream()).0;
            let oo = Operand {
                ptr: op32,
                ty: cudaDataType::CUDA_R_32F,
            };
            self.cublas(op, oo, ao, bo, batch, dims, alpha, beta, tf32)?;
            let (dst, n64) = (ot.ptr, len as u64);
            let mut args = self.stream().launch_builder(&self.kernels().f32_to_bf16_copy);
            args.arg(&dst).arg(&op32).arg(&n64);
            self.launch(op, len, args)
        })
    }

    /// `len` f32 of uninitialised stream-ordered scratch.
    pub(crate) fn scratch_f32(&self, op: &str, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller writes the scratch before reading it.
        unsafe { self.stream().alloc::<f32>(len.max(1)) }
            .map_err(|e| cuda_error(format!("{op}: scratch of {len} floats: {e}")))
    }

    /// An f32 copy of a bf16 view in scratch; `None` for an f32 view.
    fn widened(&self, op: &str, t: TensorRef<'_>) -> Result<Option<CudaSlice<f32>>> {
        if t.dtype() != DType::BF16 {
            return Ok(None);
        }
        let n = t.numel();
        let wide = self.scratch_f32(op, n)?;
        let (dst, src, n64) = (wide.device_ptr(self.stream()).0, raw_ptr(op, t)?, n as u64);
        let mut args = self.stream().launch_builder(&self.kernels().bf16_to_f32_copy);
        args.arg(&dst).arg(&src).arg(&n64);
        self.launch(op, n, args)?;
        Ok(Some(wide))
    }

    /// One strided-batched cuBLAS product with f32 accumulation (TF32 when `tf32`).
    #[allow(clippy::too_many_arguments)]
    fn cublas(
        &self,
        op: &str,
        out: Operand,
        a: Operand,
        b: Operand,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
        tf32: bool,
    ) -> Result<()> {
        let (m, n, k) = (dims.m, dims.n, dims.k);
        let cfg = cublas_config(dims, alpha, beta)?;
        let batch_c = i32::try_from(batch).map_err(|_| cuda_error(format!("{op}: batch {batch} too large")))?;
        let compute = if tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // SAFETY: the views were length-checked against batch, m, n, k; the
        // leading dimensions come from cublas_config; cuBLAS's A is our b, its B
        // our a (see gemm.rs). alpha and beta are f32 host scalars, as the
        // 32F compute types take (the handle's default pointer mode).
        unsafe {
            gemm_strided_batched_ex(
                *self.blas().handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                &cfg.alpha as *const f32 as *const _,
                b.ptr as *const _,
                b.ty,
                cfg.lda,
                (k * n) as i64,
                a.ptr as *const _,
                a.ty,
                cfg.ldb,
                (m * k) as i64,
                &cfg.beta as *const f32 as *const _,
                out.ptr as *mut _,
                out.ty,
                cfg.ldc,
                (m * n) as i64,
                batch_c,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            cuda_error(format!(
                "{op}: cuBLAS GemmStridedBatchedEx ({:?} x {:?} -> {:?}): {e}",
                a.ty, b.ty, out.ty
            ))
        })
    }
}
