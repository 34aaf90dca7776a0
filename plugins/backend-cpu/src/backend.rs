//! [`CpuBackend`]: the [`Backend`] op set on the CPU, on a thread pool it owns.

use crate::ops;
use ecdit_engine::error::{EngineError, Result};
use ecdit_engine::{AdamW, AttnDims, Backend, GemmDims, Unary};
use rayon::{ThreadPool, ThreadPoolBuilder};

/// The CPU backend. It owns a rayon pool of `threads` threads and runs every
/// op inside it: row-wise ops split rows over the pool and the GEMM splits its
/// tiles over the same pool, never both nested (one level of parallelism).
pub struct CpuBackend {
    pool: ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend").field("threads", &self.threads).finish()
    }
}

impl CpuBackend {
    /// A backend computing with `threads` threads; 0 means every core
    /// (`std::thread::available_parallelism`).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ecdit-cpu-{i}"))
            .build()
            .map_err(|e| EngineError::Backend {
                backend: "cpu".into(),
                reason: format!("cannot start a pool of {threads} threads: {e}"),
            })?;
        Ok(Self { pool, threads })
    }

    /// Runs `f` on this backend's pool, so rayon work inside it (a model's own
    /// per-sample or per-expert loops) shares the op threads instead of
    /// nesting a second pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], dims: GemmDims, alpha: f32, beta: f32) -> Result<()> {
        self.pool
            .install(|| ops::gemm::gemm(out, a, b, dims, alpha, beta, self.threads))
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
        self.pool
            .install(|| ops::gemm::gemm_batched(out, a, b, batch, dims, alpha, beta, self.threads))
    }

    fn gemm_grouped(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.pool
            .install(|| ops::gemm::gemm_grouped(out, a, b, group_rows, n, k, trans_b, alpha, beta, self.threads))
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.pool.install(|| ops::bias::add_bias(out, bias, rows, cols))
    }

    fn sum_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        self.pool
            .install(|| ops::bias::sum_rows(out, inp, rows, cols, accumulate))
    }

    fn softmax_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.pool.install(|| ops::softmax::softmax_rows(out, inp, rows, cols))
    }

    fn softmax_rows_backward(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.pool
            .install(|| ops::softmax::softmax_rows_backward(dinp, dout, out, rows, cols))
    }

    fn layer_norm(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: Option<&[f32]>,
        bias: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        self.pool
            .install(|| ops::norm::layer_norm(out, mean, rstd, inp, weight, bias, rows, cols, eps))
    }

    fn layer_norm_backward(
        &self,
        dinp: &mut [f32],
        dweight: Option<&mut [f32]>,
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        weight: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.pool
            .install(|| ops::norm::layer_norm_backward(dinp, dweight, dbias, dout, inp, mean, rstd, weight, rows, cols))
    }

    fn unary(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.pool.install(|| ops::activation::unary(op, out, inp))
    }

    fn unary_backward(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        self.pool
            .install(|| ops::activation::unary_backward(op, dinp, dout, inp))
    }

    fn attention(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&[u8]>,
        dims: AttnDims,
    ) -> Result<()> {
        self.pool
            .install(|| ops::attention::attention(out, probs, q, k, v, key_mask, dims, self.threads))
    }

    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttnDims,
    ) -> Result<()> {
        self.pool
            .install(|| ops::attention::attention_backward(dq, dk, dv, dout, probs, q, k, v, dims, self.threads))
    }

    fn gather_rows(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()> {
        self.pool.install(|| ops::gather::gather_rows(out, inp, idx, cols))
    }

    fn scatter_add_rows(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()> {
        self.pool
            .install(|| ops::gather::scatter_add_rows(out, inp, idx, scale, cols))
    }

    fn top_k_rows(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        self.pool
            .install(|| ops::topk::top_k_rows(idx, val, inp, rows, cols, k))
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
        self.pool
            .install(|| ops::optim::adamw_step(param, grad, m, v, hp, step))
    }
}
