//! [`CudaBackend`]: the engine's op set on one CUDA device, over device-resident
//! buffers.
//!
//! Tensors live in device memory this backend allocated ([`crate::storage`]);
//! `upload` and `download` are the only transfers, and every op works on the
//! device addresses of its views. Everything runs in order on one stream, so an
//! op returns once its work is queued; `download` waits for it.

use crate::device::guarded;
use crate::kernels::Kernels;
use crate::probe::{cuda_error, probe_all};
use crate::status;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use ecdit_engine::{
    AdamW, AttnDims, Backend, Buffer, DType, EngineError, GemmDims, ModChunks, PatchDims, Result, RmsProp, RowDims,
    TensorMut, TensorRef, Unary,
};
use std::sync::Arc;

/// The CUDA backend: cuBLAS for products, NVRTC-compiled kernels for the rest.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    device: usize,
    tf32: bool,
    dtype: DType,
    // The status words (crate::status), and their device address.
    _status: CudaSlice<u32>,
    status_ptr: u64,
}

impl CudaBackend {
    /// Opens device `device`; `tf32` lets cuBLAS use TF32 tensor cores for
    /// large f32 products (see [`crate::gemm::tf32_allowed`]). Probes the
    /// driver, cuBLAS and NVRTC first, so a machine without them gets an error.
    pub fn new(device: usize, tf32: bool) -> Result<Self> {
        Self::with_dtype(device, tf32, DType::F32)
    }

    /// [`CudaBackend::new`] with the storage dtype models should prefer on it
    /// (`dtype` parameter; f32 and bf16 storage are both supported either way).
    pub fn with_dtype(device: usize, tf32: bool, dtype: DType) -> Result<Self> {
        probe_all()?;
        guarded("opening the device", || {
            let count = CudaContext::device_count().map_err(|e| cuda_error(format!("counting devices: {e}")))?;
            if device >= count.max(0) as usize {
                return Err(EngineError::param(
                    "backend 'cuda'",
                    "device",
                    device,
                    format!("this machine has {count} CUDA device(s)"),
                ));
            }
            let ctx = CudaContext::new(device)
                .map_err(|e| cuda_error(format!("creating a context on device {device}: {e}")))?;
            // SAFETY: every op of this backend runs on its one stream, in order,
            // so cudarc's per-allocation events (for multi-stream use) are not needed.
            unsafe { ctx.disable_event_tracking() };
            keep_pool_memory(&ctx);
            let stream = ctx.default_stream();
            let blas =
                CudaBlas::new(stream.clone()).map_err(|e| cuda_error(format!("creating the cuBLAS handle: {e}")))?;
            // TF32 is chosen per product through the compute type (gemm.rs), never
            // by the handle's math mode.
            let mode = cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH;
            // SAFETY: the handle is live and owned by `blas`.
            let st = unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) };
            if st != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(cuda_error(format!("cublasSetMathMode({mode:?}): {st:?}")));
            }
            let kernels = Kernels::compile(&ctx)?;
            let status_words = stream
                .alloc_zeros::<u32>(status::WORDS)
                .map_err(|e| cuda_error(format!("allocating the status words: {e}")))?;
            let status_ptr = {
                let (ptr, _record) = status_words.device_ptr(&stream);
                ptr
            };
            tracing::info!(device, tf32, %dtype, name = ?ctx.name().ok(), "cuda backend ready");
            Ok(Self {
                ctx,
                stream,
                blas,
                kernels,
                device,
                tf32,
                dtype,
                _status: status_words,
                status_ptr,
            })
        })
    }

    /// The device ordinal.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Whether large f32 products may use TF32.
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// The storage dtype models should prefer on this backend (the `dtype`
    /// parameter); both f32 and bf16 are supported.
    pub fn preferred_dtype(&self) -> DType {
        self.dtype
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_error(format!("device name: {e}")))
    }

    /// The device's compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(|e| cuda_error(format!("compute capability: {e}")))
    }

    /// Waits until every queued op has finished (ops return once queued), and
    /// reports a bad index flagged since the last download ([`crate::status`]).
    pub fn synchronize(&self) -> Result<()> {
        self.run("synchronize", || self.check_status("synchronize"))
    }

    pub(crate) fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub(crate) fn status_ptr(&self) -> u64 {
        self.status_ptr
    }
}

/// Keeps freed stream-ordered allocations in the device's memory pool instead
/// of returning them to the driver at every synchronisation (the default), so
/// scratch buffers cost no driver call after the first forward. Best effort.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
    let ok = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .and_then(|()| {
            let mut threshold = u64::MAX;
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                )
            }
            .result()
        });
    if let Err(e) = ok {
        tracing::debug!(%e, "could not keep pool memory; scratch allocations may be slower");
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    /// Host threads driving the device: one.
    fn threads(&self) -> usize {
        1
    }

    /// f32 and bf16 storage for every float op (f32 arithmetic); u32 indices, u8 masks.
    fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::BF16 | DType::U32 | DType::U8)
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        self.alloc_impl(bytes)
    }

    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        self.upload_impl(dst, src)
    }

    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        self.download_bytes("download", dst, src)
    }

    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        self.copy_impl(dst, src)
    }

    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        self.fill_impl(dst, value)
    }

    fn gemm(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_impl(out, a, b, bias, dims, alpha, beta)
    }

    fn gemm_batched(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_batched_impl("gemm_batched", out, a, b, batch, dims, alpha, beta)
    }

    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.add_broadcast_impl(out, inp)
    }

    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        self.axpby_impl(y, a, x, b)
    }

    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.sum_rows_impl(out, inp, rows, cols, accumulate)
    }

    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
        self.softmax_rows_impl(out, inp, rows, cols)
    }

    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.softmax_rows_backward_impl(dinp, dout, out, rows, cols)
    }

    fn layer_norm(
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
        self.layer_norm_impl(out, mean, rstd, inp, weight, bias, rows, cols, eps)
    }

    fn layer_norm_backward(
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
        self.layer_norm_backward_impl(dinp, dweight, dbias, dout, inp, mean, rstd, weight, rows, cols)
    }

    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.unary_impl(op, out, inp)
    }

    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.unary_backward_impl(op, dinp, dout, inp)
    }

    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.modulate_impl(out, inp, modulation, which, dims)
    }

    fn modulate_backward(
        &self,
        dinp: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.modulate_backward_impl(dinp, dmodulation, dout, inp, modulation, which, dims)
    }

    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.gated_residual_impl(x, y, modulation, which, dims)
    }

    fn gated_residual_backward(
        &self,
        dy: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dx: TensorRef<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.gated_residual_backward_impl(dy, dmodulation, dx, y, modulation, which, dims)
    }

    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.patch_impl(true, out, inp, dims)
    }

    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.patch_impl(false, out, inp, dims)
    }

    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()> {
        self.timestep_features_impl(out, t, dim, max_period)
    }

    fn attention(
        &self,
        out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        dims: AttnDims,
    ) -> Result<()> {
        self.attention_impl(out, probs, q, k, v, key_mask, dims)
    }

    fn attention_backward(
        &self,
        dq: TensorMut<'_>,
        dk: TensorMut<'_>,
        dv: TensorMut<'_>,
        dout: TensorRef<'_>,
        probs: TensorRef<'_>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        dims: AttnDims,
    ) -> Result<()> {
        self.attention_backward_impl(dq, dk, dv, dout, probs, q, k, v, dims)
    }

    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()> {
        self.gather_rows_impl(out, inp, idx, cols)
    }

    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        self.scatter_add_rows_impl(out, inp, idx, scale, cols)
    }

    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        self.gather_dot_impl(out, a, idx, b, cols)
    }

    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        self.top_k_rows_impl(idx, val, inp, rows, cols, k)
    }

    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()> {
        self.router_softmax_impl(out, scores, rows, experts)
    }

    fn top_k_tokens(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        probs: TensorRef<'_>,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()> {
        self.top_k_tokens_impl(idx, val, probs, groups, group_rows, experts, k)
    }

    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        self.adamw_impl(param, grad, m, v, hp, step)
    }

    fn rmsprop_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        v: TensorMut<'_>,
        buf: TensorMut<'_>,
        hp: RmsProp,
    ) -> Result<()> {
        self.rmsprop_impl(param, grad, v, buf, hp)
    }
}
