//! [`CudaBackend`]: the engine's op set on one CUDA device.
//!
//! The `Backend` trait takes host slices, so every op copies its inputs to the device,
//! runs, copies its outputs back and waits for the stream. That is correct but slow;
//! device-resident buffers (an op set over device handles) are future work.

use crate::gemm::cublas_config;
use crate::kernels::Kernels;
use crate::probe::{cuda_error, probe_all};
use cudarc::cublas::{CudaBlas, Gemm, StridedBatchedConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use ecdit_engine::error::check_len;
use ecdit_engine::{AdamW, AttnDims, Backend, EngineError, GemmDims, Result, Unary};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

const BLOCK: u32 = 256;

/// The CUDA backend: cuBLAS for products, NVRTC-compiled kernels for the rest.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    device: usize,
    tf32: bool,
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol, say) into an error.
fn guarded<T>(op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(cuda_error(format!("{op}: cudarc panicked: {msg}")))
    })
}

fn not_implemented(op: &str) -> EngineError {
    cuda_error(format!("op {op} not yet implemented on cuda"))
}

/// One thread per item, [`BLOCK`] threads per block.
fn launch_config(op: &str, items: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(items.div_ceil(BLOCK as usize))
        .map_err(|_| cuda_error(format!("{op}: {items} threads exceed one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn unary_code(op: Unary) -> i32 {
    match op {
        Unary::GeluTanh => 0,
        Unary::Silu => 1,
    }
}

impl CudaBackend {
    /// Opens device `device`; `tf32` lets cuBLAS use TF32 tensor cores for f32 products.
    /// Probes the driver, cuBLAS and NVRTC first, so a machine without them gets an error.
    pub fn new(device: usize, tf32: bool) -> Result<Self> {
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
            let stream = ctx.default_stream();
            let blas =
                CudaBlas::new(stream.clone()).map_err(|e| cuda_error(format!("creating the cuBLAS handle: {e}")))?;
            let mode = if tf32 {
                cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle is live and owned by `blas`.
            let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) };
            if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(cuda_error(format!("cublasSetMathMode({mode:?}): {status:?}")));
            }
            let kernels = Kernels::compile(&ctx)?;
            tracing::info!(device, tf32, name = ?ctx.name().ok(), "cuda backend ready");
            Ok(Self {
                ctx,
                stream,
                blas,
                kernels,
                device,
                tf32,
            })
        })
    }

    /// The device ordinal.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Whether f32 products may use TF32.
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_error(format!("device name: {e}")))
    }

    fn upload<T: DeviceRepr>(&self, op: &str, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| cuda_error(format!("{op}: host-to-device copy: {e}")))
    }

    fn download(&self, op: &str, dev: &CudaSlice<f32>, host: &mut [f32]) -> Result<()> {
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(|e| cuda_error(format!("{op}: device-to-host copy: {e}")))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error(format!("{op}: synchronize: {e}")))
    }

    /// Launches a kernel whose arguments are already pushed onto `args`.
    fn launch(&self, op: &str, items: usize, mut args: LaunchArgs<'_>) -> Result<()> {
        let cfg = launch_config(op, items)?;
        // SAFETY: the argument lists match the kernel signatures in kernels::SOURCE and
        // every buffer was length-checked against the dimensions passed.
        unsafe { args.launch(cfg) }.map_err(|e| cuda_error(format!("{op}: launch: {e}")))?;
        Ok(())
    }

    fn check_rows(op: &str, idx: &[u32], rows: usize) -> Result<()> {
        match idx.iter().position(|&i| i as usize >= rows) {
            None => Ok(()),
            Some(p) => Err(EngineError::shape(
                format!("{op} (idx[{p}])"),
                format!("a row index < {rows}"),
                idx[p],
            )),
        }
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

    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], dims: GemmDims, alpha: f32, beta: f32) -> Result<()> {
        self.gemm_batched(out, a, b, 1, dims, alpha, beta)
    }

    fn gemm_batched(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (m, n, k) = (dims.m, dims.n, dims.k);
        check_len("gemm", "out", out.len(), batch * m * n)?;
        check_len("gemm", "a", a.len(), batch * m * k)?;
        check_len("gemm", "b", b.len(), batch * k * n)?;
        if out.is_empty() {
            return Ok(());
        }
        if k == 0 {
            // An empty sum: out = beta * out (BLAS: beta = 0 overwrites, even NaN).
            out.iter_mut()
                .for_each(|o| *o = if beta == 0.0 { 0.0 } else { beta * *o });
            return Ok(());
        }
        guarded("gemm", || {
            let cfg = cublas_config(dims, alpha, beta)?;
            let batch_c = i32::try_from(batch).map_err(|_| cuda_error(format!("gemm: batch {batch} too large")))?;
            let a_dev = self.upload("gemm", a)?;
            let b_dev = self.upload("gemm", b)?;
            let mut out_dev = self.upload("gemm", out)?;
            let strided = StridedBatchedConfig {
                gemm: cfg,
                batch_size: batch_c,
                // cuBLAS's A is our b, its B our a (see gemm.rs).
                stride_a: (k * n) as i64,
                stride_b: (m * k) as i64,
                stride_c: (m * n) as i64,
            };
            // SAFETY: buffer lengths were checked against batch, m, n, k above, and the
            // leading dimensions come from cublas_config.
            unsafe { self.blas.gemm_strided_batched(strided, &b_dev, &a_dev, &mut out_dev) }
                .map_err(|e| cuda_error(format!("gemm: cuBLAS sgemm: {e}")))?;
            self.download("gemm", &out_dev, out)
        })
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
        check_len("add_bias", "out", out.len(), rows * cols)?;
        check_len("add_bias", "bias", bias.len(), cols)?;
        if out.is_empty() {
            return Ok(());
        }
        guarded("add_bias", || {
            let mut out_dev = self.upload("add_bias", out)?;
            let bias_dev = self.upload("add_bias", bias)?;
            let (r, c) = (rows as u64, cols as u64);
            let mut args = self.stream.launch_builder(&self.kernels.add_bias);
            args.arg(&mut out_dev).arg(&bias_dev).arg(&r).arg(&c);
            self.launch("add_bias", rows * cols, args)?;
            self.download("add_bias", &out_dev, out)
        })
    }

    fn sum_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        check_len("sum_rows", "out", out.len(), cols)?;
        check_len("sum_rows", "inp", inp.len(), rows * cols)?;
        if cols == 0 {
            return Ok(());
        }
        if rows == 0 {
            if !accumulate {
                out.fill(0.0);
            }
            return Ok(());
        }
        guarded("sum_rows", || {
            let mut out_dev = self.upload("sum_rows", out)?;
            let inp_dev = self.upload("sum_rows", inp)?;
            let (r, c, acc) = (rows as u64, cols as u64, accumulate as i32);
            let mut args = self.stream.launch_builder(&self.kernels.sum_rows);
            args.arg(&mut out_dev).arg(&inp_dev).arg(&r).arg(&c).arg(&acc);
            self.launch("sum_rows", cols, args)?;
            self.download("sum_rows", &out_dev, out)
        })
    }

    fn softmax_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
        check_len("softmax_rows", "out", out.len(), rows * cols)?;
        check_len("softmax_rows", "inp", inp.len(), rows * cols)?;
        if out.is_empty() {
            return Ok(());
        }
        guarded("softmax_rows", || {
            let mut out_dev = self.upload("softmax_rows", out)?;
            let inp_dev = self.upload("softmax_rows", inp)?;
            let (r, c) = (rows as u64, cols as u64);
            let mut args = self.stream.launch_builder(&self.kernels.softmax_rows);
            args.arg(&mut out_dev).arg(&inp_dev).arg(&r).arg(&c);
            self.launch("softmax_rows", rows, args)?;
            self.download("softmax_rows", &out_dev, out)
        })
    }

    fn softmax_rows_backward(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "softmax_rows_backward";
        check_len(op, "dinp", dinp.len(), rows * cols)?;
        check_len(op, "dout", dout.len(), rows * cols)?;
        check_len(op, "out", out.len(), rows * cols)?;
        if dinp.is_empty() {
            return Ok(());
        }
        guarded(op, || {
            let mut dinp_dev = self.upload(op, dinp)?;
            let dout_dev = self.upload(op, dout)?;
            let out_dev = self.upload(op, out)?;
            let (r, c) = (rows as u64, cols as u64);
            let mut args = self.stream.launch_builder(&self.kernels.softmax_rows_backward);
            args.arg(&mut dinp_dev).arg(&dout_dev).arg(&out_dev).arg(&r).arg(&c);
            self.launch(op, rows, args)?;
            self.download(op, &dinp_dev, dinp)
        })
    }

    fn layer_norm(
        &self,
        _out: &mut [f32],
        _mean: &mut [f32],
        _rstd: &mut [f32],
        _inp: &[f32],
        _weight: Option<&[f32]>,
        _bias: Option<&[f32]>,
        _rows: usize,
        _cols: usize,
        _eps: f32,
    ) -> Result<()> {
        Err(not_implemented("layer_norm"))
    }

    fn layer_norm_backward(
        &self,
        _dinp: &mut [f32],
        _dweight: Option<&mut [f32]>,
        _dbias: Option<&mut [f32]>,
        _dout: &[f32],
        _inp: &[f32],
        _mean: &[f32],
        _rstd: &[f32],
        _weight: Option<&[f32]>,
        _rows: usize,
        _cols: usize,
    ) -> Result<()> {
        Err(not_implemented("layer_norm_backward"))
    }

    fn unary(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
        check_len("unary", "out", out.len(), inp.len())?;
        if out.is_empty() {
            return Ok(());
        }
        guarded("unary", || {
            let mut out_dev = self.upload("unary", out)?;
            let inp_dev = self.upload("unary", inp)?;
            let (n, code) = (inp.len() as u64, unary_code(op));
            let mut args = self.stream.launch_builder(&self.kernels.unary_forward);
            args.arg(&mut out_dev).arg(&inp_dev).arg(&n).arg(&code);
            self.launch("unary", inp.len(), args)?;
            self.download("unary", &out_dev, out)
        })
    }

    fn unary_backward(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        check_len("unary_backward", "dinp", dinp.len(), inp.len())?;
        check_len("unary_backward", "dout", dout.len(), inp.len())?;
        if dinp.is_empty() {
            return Ok(());
        }
        guarded("unary_backward", || {
            let mut dinp_dev = self.upload("unary_backward", dinp)?;
            let dout_dev = self.upload("unary_backward", dout)?;
            let inp_dev = self.upload("unary_backward", inp)?;
            let (n, code) = (inp.len() as u64, unary_code(op));
            let mut args = self.stream.launch_builder(&self.kernels.unary_backward);
            args.arg(&mut dinp_dev).arg(&dout_dev).arg(&inp_dev).arg(&n).arg(&code);
            self.launch("unary_backward", inp.len(), args)?;
            self.download("unary_backward", &dinp_dev, dinp)
        })
    }

    fn attention(
        &self,
        _out: &mut [f32],
        _probs: &mut [f32],
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _key_mask: Option<&[u8]>,
        _dims: AttnDims,
    ) -> Result<()> {
        Err(not_implemented("attention"))
    }

    fn attention_backward(
        &self,
        _dq: &mut [f32],
        _dk: &mut [f32],
        _dv: &mut [f32],
        _dout: &[f32],
        _probs: &[f32],
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _dims: AttnDims,
    ) -> Result<()> {
        Err(not_implemented("attention_backward"))
    }

    fn gather_rows(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()> {
        check_len("gather_rows", "out", out.len(), idx.len() * cols)?;
        if cols == 0 && !inp.is_empty() {
            return Err(EngineError::shape(
                "gather_rows (inp)",
                "0 elements when cols = 0",
                inp.len(),
            ));
        }
        let rows = inp.len().checked_div(cols).unwrap_or(0);
        check_len("gather_rows", "inp", inp.len(), rows * cols)?;
        Self::check_rows("gather_rows", idx, rows)?;
        if out.is_empty() {
            return Ok(());
        }
        guarded("gather_rows", || {
            let mut out_dev = self.upload("gather_rows", out)?;
            let inp_dev = self.upload("gather_rows", inp)?;
            let idx_dev = self.upload("gather_rows", idx)?;
            let (n_idx, c) = (idx.len() as u64, cols as u64);
            let mut args = self.stream.launch_builder(&self.kernels.gather_rows);
            args.arg(&mut out_dev).arg(&inp_dev).arg(&idx_dev).arg(&n_idx).arg(&c);
            self.launch("gather_rows", idx.len() * cols, args)?;
            self.download("gather_rows", &out_dev, out)
        })
    }

    fn scatter_add_rows(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        check_len(op, "inp", inp.len(), idx.len() * cols)?;
        if let Some(s) = scale {
            check_len(op, "scale", s.len(), idx.len())?;
        }
        if cols == 0 && !out.is_empty() {
            return Err(EngineError::shape(
                "scatter_add_rows (out)",
                "0 elements when cols = 0",
                out.len(),
            ));
        }
        let rows = out.len().checked_div(cols).unwrap_or(0);
        check_len(op, "out", out.len(), rows * cols)?;
        Self::check_rows(op, idx, rows)?;
        if inp.is_empty() {
            return Ok(());
        }
        guarded(op, || {
            let mut out_dev = self.upload(op, out)?;
            let inp_dev = self.upload(op, inp)?;
            let idx_dev = self.upload(op, idx)?;
            // The kernel always takes a scale pointer; a one-element dummy when absent.
            let scale_dev = self.upload(op, scale.unwrap_or(&[1.0]))?;
            let (has_scale, n_idx, c) = (scale.is_some() as i32, idx.len() as u64, cols as u64);
            let mut args = self.stream.launch_builder(&self.kernels.scatter_add_rows);
            args.arg(&mut out_dev)
                .arg(&inp_dev)
                .arg(&idx_dev)
                .arg(&scale_dev)
                .arg(&has_scale)
                .arg(&n_idx)
                .arg(&c);
            self.launch(op, cols, args)?;
            self.download(op, &out_dev, out)
        })
    }

    fn top_k_rows(
        &self,
        _idx: &mut [u32],
        _val: &mut [f32],
        _inp: &[f32],
        _rows: usize,
        _cols: usize,
        _k: usize,
    ) -> Result<()> {
        Err(not_implemented("top_k_rows"))
    }

    fn adamw_step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        let op = "adamw_step";
        check_len(op, "grad", grad.len(), param.len())?;
        check_len(op, "m", m.len(), param.len())?;
        check_len(op, "v", v.len(), param.len())?;
        if step == 0 {
            return Err(EngineError::Other(format!("{op}: step must count from 1, got 0")));
        }
        if param.is_empty() {
            return Ok(());
        }
        guarded(op, || {
            let mut param_dev = self.upload(op, param)?;
            let mut m_dev = self.upload(op, m)?;
            let mut v_dev = self.upload(op, v)?;
            let grad_dev = self.upload(op, grad)?;
            let n = param.len() as u64;
            // Bias corrections in f64 on the host: beta^step underflows gracefully there.
            let exp = i32::try_from(step).unwrap_or(i32::MAX);
            let bc1 = (1.0 - (hp.beta1 as f64).powi(exp)) as f32;
            let bc2 = (1.0 - (hp.beta2 as f64).powi(exp)) as f32;
            let mut args = self.stream.launch_builder(&self.kernels.adamw_step);
            args.arg(&mut param_dev)
                .arg(&mut m_dev)
                .arg(&mut v_dev)
                .arg(&grad_dev)
                .arg(&n)
                .arg(&hp.lr)
                .arg(&hp.beta1)
                .arg(&hp.beta2)
                .arg(&hp.eps)
                .arg(&hp.weight_decay)
                .arg(&bc1)
                .arg(&bc2);
            self.launch(op, param.len(), args)?;
            self.download(op, &param_dev, param)?;
            self.download(op, &m_dev, m)?;
            self.download(op, &v_dev, v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_config_covers_every_item() {
        let cfg = launch_config("t", 1000).unwrap();
        assert_eq!(cfg.grid_dim.0 * cfg.block_dim.0, 1024);
        assert_eq!(launch_config("t", 256).unwrap().grid_dim.0, 1);
        assert!(launch_config("t", usize::MAX).is_err());
    }

    #[test]
    fn guarded_turns_a_panic_into_a_cuda_error() {
        let e = guarded::<()>("probe", || panic!("Missing symbol cuFoo"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backend cuda") && e.contains("probe") && e.contains("cuFoo"),
            "{e}"
        );
    }
}
