//! `ecdit bench forward`: the whole model forward at a batch size, in images
//! per second and MFU (model FLOP utilisation).
//!
//! The model has random weights (fixed seed) and reads random text tokens of
//! a fixed length (16 by default, as `benches/reference/forward_torch.py`),
//! all real (no padding). The FLOPs of one image are
//! [`info::flops_per_image`] with the text length the benchmark uses, and MFU
//! is the achieved FLOP/s over the matrix-product peak measured in the same
//! run: the best GFLOP/s of the backend's GEMM on the model's two largest
//! products, `(B*T, 4d, d)` and `(B*T, d, 4d)`, at the same thread count and
//! with the model's dtype (a bf16 model against the bf16 matrix engine).
//!
//! Timing: one untimed forward (buffers sized, pool started), then `reps`
//! inference forwards ([`Model::forward`] with [`ForwardOptions::inference`]:
//! inputs uploaded, output downloaded, no routing statistics) into the same
//! reused [`ModelActs`], as a sampler runs them; the median is reported.
//! Weights and activations are stored in the chosen dtype (f32 or bf16).

use crate::config::{Conditioning, ModelConfig};
use crate::info;
use crate::model::{Condition, ForwardOptions, Model, ModelActs, ModelResult, TextInput};
use ecdit_engine::{
    AdamW, AttnDims, Backend, Buffer, DType, EngineError, GemmDims, ModChunks, PatchDims, Registry, Result as EResult,
    RowDims, TensorMut, TensorRef, Unary,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// What a forward benchmark runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardBenchOptions {
    /// Images per forward.
    pub batch: usize,
    /// Text tokens per prompt (text-conditioned models).
    pub text_len: usize,
    /// Timed forwards (median reported); at least 1.
    pub reps: usize,
    /// Timed repetitions of each GEMM peak shape.
    pub peak_reps: usize,
    /// Seed of the weights and inputs.
    pub seed: u64,
    /// Time each backend op (adds a little overhead per op call).
    pub profile: bool,
    /// Storage dtype of weights and activations (f32 or bf16).
    pub dtype: DType,
}

impl Default for ForwardBenchOptions {
    /// Batch 8, 16 text tokens, 5 timed forwards.
    fn default() -> Self {
        Self {
            batch: 8,
            text_len: 16,
            reps: 5,
            peak_reps: 5,
            seed: 0,
            profile: false,
            dtype: DType::F32,
        }
    }
}

/// One forward benchmark's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForwardBenchRecord {
    /// Config name.
    pub config: String,
    /// Images per forward.
    pub batch: usize,
    /// Backend threads.
    pub threads: usize,
    /// Text tokens per prompt (0 for class-conditional models).
    pub text_len: usize,
    /// Median milliseconds of one forward.
    pub ms: f64,
    /// Fastest forward, milliseconds.
    pub min_ms: f64,
    /// `batch / ms`.
    pub images_per_s: f64,
    /// Forward matmul FLOPs of one image at `text_len` text tokens.
    pub flops_per_image: f64,
    /// `flops_per_image * batch / median time`, GFLOP/s.
    pub achieved_gflops: f64,
    /// Best GEMM GFLOP/s on the model's largest products, same threads.
    pub peak_gflops: f64,
    /// `achieved_gflops / peak_gflops`.
    pub mfu: f64,
    /// The GEMM shapes `(m, n, k)` the peak was measured on.
    pub peak_shapes: Vec<(usize, usize, usize)>,
    /// Storage dtype of weights and activations.
    pub dtype: String,
    /// Weights in `dtype`, bytes (`ecdit info`'s `weights f32` or `weights bf16`).
    pub weight_bytes: u64,
    /// `ecdit info`'s inference activation estimate at this batch, bytes.
    pub activation_bytes: u64,
    /// Bytes the inference forward's reused buffers hold (activations and
    /// scratch, not the weights).
    pub buffer_bytes: u64,
    /// Peak resident memory of the process after the timed forwards, before
    /// the GEMM peak is measured (`VmHWM`; absent where not reported).
    pub peak_rss_bytes: Option<u64>,
    /// With `profile`: time per backend op over the timed forwards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<OpTime>,
}

/// The products a matmul peak is measured on: the FFN's two, `(B*T, 4d, d)`
/// and `(B*T, d, 4d)`, the largest of the model.
pub fn peak_shapes(cfg: &ModelConfig, batch: usize) -> Vec<(usize, usize, usize)> {
    let (m, d, h) = (batch * cfg.tokens(), cfg.hidden, cfg.mlp_hidden());
    vec![(m, h, d), (m, d, h)]
}

/// Best GFLOP/s of the CPU backend's GEMM over `shapes` at `threads` threads with
/// `dtype` inputs (the matrix engine the model's products run on: bf16 for a
/// bf16 model).
pub fn matmul_peak_gflops(
    shapes: &[(usize, usize, usize)],
    threads: usize,
    reps: usize,
    dtype: DType,
) -> ModelResult<f64> {
    let records = ecdit_backend_cpu::bench::bench_gemm(shapes, &[threads], reps, dtype)?;
    Ok(records.iter().map(|r| r.gflops).fold(0.0, f64::max))
}

/// `cfg` as the benchmark runs it: text-conditioned configs read `text_len`
/// tokens, so the FLOP count uses that length, not `max_tokens`.
pub(crate) fn with_text_len(cfg: &ModelConfig, text_len: usize) -> ModelConfig {
    let mut cfg = cfg.clone();
    if let Conditioning::Text { max_tokens, .. } = &mut cfg.conditioning {
        *max_tokens = text_len;
    }
    cfg
}

/// Random inputs of one benchmark forward.
struct Inputs {
    x: Vec<f32>,
    t: Vec<f32>,
    labels: Vec<u32>,
    tokens: Vec<f32>,
    mask: Vec<u8>,
    pooled: Vec<f32>,
    text_dim: usize,
}

impl Inputs {
    fn new(cfg: &ModelConfig, batch: usize, text_len: usize, rng: &mut StdRng) -> Self {
        let per_image = cfg.in_channels * cfg.input_size * cfg.input_size;
        let (text_dim, classes) = match cfg.conditioning {
            Conditioning::Text { text_dim, .. } => (text_dim, 1),
            Conditioning::Class { num_classes, .. } => (0, num_classes.max(1)),
        };
        let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let x = uniform(batch * per_image);
        let tokens = uniform(batch * text_len * text_dim);
        let pooled = uniform(batch * text_dim);
        Self {
            x,
            t: (0..batch).map(|i| (i as f32 + 0.5) / batch as f32).collect(),
            labels: (0..batch).map(|i| (i % classes) as u32).collect(),
            tokens,
            mask: vec![1; batch * text_len],
            pooled,
            text_dim,
        }
    }

    fn condition(&self, cfg: &ModelConfig, batch: usize, text_len: usize) -> Condition<'_> {
        match cfg.conditioning {
            Conditioning::Text { .. } => Condition::Text(TextInput {
                tokens: &self.tokens,
                mask: &self.mask,
                pooled: &self.pooled,
                batch,
                len: text_len,
                dim: self.text_dim,
            }),
            Conditioning::Class { .. } => Condition::Class(&self.labels),
        }
    }
}

/// Times the forward of `cfg` on `backend` and measures the GEMM peak on the
/// CPU backend at the same thread count.
pub fn bench_forward(
    registry: &Registry,
    cfg: &ModelConfig,
    backend: Arc<dyn Backend>,
    opts: &ForwardBenchOptions,
) -> ModelResult<ForwardBenchRecord> {
    let (batch, reps) = (opts.batch, opts.reps.max(1));
    if batch == 0 {
        return Err(EngineError::Other("bench forward: --batch must be at least 1".into()).into());
    }
    let text_len = match cfg.conditioning {
        Conditioning::Text { .. } if opts.text_len == 0 => {
            return Err(EngineError::Other("bench forward: --text-len must be at least 1".into()).into())
        }
        Conditioning::Text { .. } => opts.text_len,
        Conditioning::Class { .. } => 0,
    };
    let threads = backend.threads();
    let profiled = opts.profile.then(|| Arc::new(ProfiledBackend::new(backend.clone())));
    let model_backend = match &profiled {
        Some(p) => p.clone() as Arc<dyn Backend>,
        None => backend,
    };
    let mut model = Model::new(cfg.clone(), registry, model_backend, opts.seed)?;
    model.to_dtype(opts.dtype)?;
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let inputs = Inputs::new(cfg, batch, text_len, &mut rng);
    let cond = inputs.condition(cfg, batch, text_len);

    let mut acts = ModelActs::default();
    let run = ForwardOptions::inference();
    let _span = tracing::info_span!("bench forward", config = %cfg.name, batch, threads).entered();
    model.forward(&mut acts, &inputs.x, &inputs.t, cond, run)?;
    if let Some(p) = &profiled {
        p.reset();
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        model.forward(&mut acts, &inputs.x, &inputs.t, cond, run)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let median = crate::bench_moe::median(&mut times);
    let peak_rss = peak_rss_bytes();

    let counted = with_text_len(cfg, text_len.max(1));
    let flops_per_image = info::flops_per_image(registry, &counted)?.total();
    let shapes = peak_shapes(cfg, batch);
    let peak_gflops = matmul_peak_gflops(&shapes, threads, opts.peak_reps, opts.dtype)?;
    let achieved_gflops = flops_per_image * batch as f64 / median / 1e9;
    let report = info::report(registry, &counted, batch)?;
    Ok(ForwardBenchRecord {
        config: cfg.name.clone(),
        batch,
        threads,
        text_len,
        ms: median * 1e3,
        min_ms: times[0] * 1e3,
        images_per_s: batch as f64 / median,
        flops_per_image,
        achieved_gflops,
        peak_gflops,
        mfu: achieved_gflops / peak_gflops,
        peak_shapes: shapes,
        dtype: opts.dtype.to_string(),
        weight_bytes: match opts.dtype {
            DType::BF16 => report.weight_bytes_bf16,
            _ => report.weight_bytes_f32,
        },
        activation_bytes: report.activation_memory.inference_bytes,
        buffer_bytes: acts.bytes() as u64,
        peak_rss_bytes: peak_rss,
        profile: profiled.map(|p| p.times()).unwrap_or_default(),
    })
}

/// Time and FLOPs spent in one backend op during a profiled forward.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpTime {
    /// Op name (`gemm`, `attention`, `unary`, ...).
    pub op: String,
    /// Calls.
    pub calls: u64,
    /// Total milliseconds.
    pub ms: f64,
    /// Matmul FLOPs (gemm and attention's two products), else 0.
    pub flops: f64,
}

/// A [`Backend`] that forwards every op (allocations and transfers included)
/// to `inner` and adds up the wall time of each, for `ecdit bench forward
/// --profile`. Time outside the backend (host-side routing of routers without
/// a device path, bookkeeping) is the forward's time minus the sum.
pub struct ProfiledBackend {
    inner: Arc<dyn Backend>,
    times: std::sync::Mutex<Vec<OpTime>>,
}

impl ProfiledBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            times: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Per-op totals so far, most expensive first.
    pub fn times(&self) -> Vec<OpTime> {
        let mut times = self.times.lock().map(|t| t.clone()).unwrap_or_default();
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        times
    }

    /// Forgets the totals (after warm-up).
    pub fn reset(&self) {
        if let Ok(mut t) = self.times.lock() {
            t.clear();
        }
    }

    fn timed<R>(&self, op: &str, flops: f64, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if let Ok(mut times) = self.times.lock() {
            match times.iter_mut().find(|t| t.op == op) {
                Some(t) => {
                    t.calls += 1;
                    t.ms += ms;
                    t.flops += flops;
                }
                None => times.push(OpTime {
                    op: op.to_string(),
                    calls: 1,
                    ms,
                    flops,
                }),
            }
        }
        r
    }
}

/// The profile's row name of a `gemm_grouped_bias` (`gathered`: its
/// gathered-rows form).
fn grouped_bias_label(act: Option<Unary>, gathered: bool) -> &'static str {
    match (act.is_some(), gathered) {
        (false, false) => "gemm_grouped + bias",
        (true, false) => "gemm_grouped + bias + activation",
        (false, true) => "gemm_grouped + bias, rows gathered",
        (true, true) => "gemm_grouped + bias + activation, rows gathered",
    }
}

impl Backend for ProfiledBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    fn supports(&self, dtype: DType) -> bool {
        self.inner.supports(dtype)
    }
    fn gemm_rows_alone(&self) -> usize {
        self.inner.gemm_rows_alone()
    }
    fn alloc(&self, bytes: usize) -> EResult<Buffer> {
        self.timed("alloc", 0.0, || self.inner.alloc(bytes))
    }
    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> EResult<()> {
        self.timed("upload", 0.0, || self.inner.upload(dst, src))
    }
    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> EResult<()> {
        self.timed("download", 0.0, || self.inner.download(dst, src))
    }
    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> EResult<()> {
        self.timed("copy", 0.0, || self.inner.copy(dst, src))
    }
    fn fill(&self, dst: TensorMut<'_>, value: f32) -> EResult<()> {
        self.timed("fill", 0.0, || self.inner.fill(dst, value))
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
    ) -> EResult<()> {
        let op = if dims.m < 16 { "gemm (m < 16)" } else { "gemm" };
        self.timed(op, dims.flops(), || self.inner.gemm(out, a, b, bias, dims, alpha, beta))
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
    ) -> EResult<()> {
        self.timed("gemm_batched", batch as f64 * dims.flops(), || {
            self.inner.gemm_batched(out, a, b, batch, dims, alpha, beta)
        })
    }
    fn gemm_grouped(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> EResult<()> {
        let flops = 2.0 * group_rows.iter().sum::<usize>() as f64 * n as f64 * k as f64;
        self.timed("gemm_grouped", flops, || {
            self.inner
                .gemm_grouped(out, a, b, group_rows, n, k, trans_b, alpha, beta)
        })
    }
    fn gemm_act(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        act: Unary,
    ) -> EResult<()> {
        self.timed("gemm + activation", dims.flops(), || {
            self.inner.gemm_act(out, a, b, bias, dims, act)
        })
    }
    fn gemm_grouped_bias(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        act: Option<Unary>,
    ) -> EResult<()> {
        let flops = 2.0 * group_rows.iter().sum::<usize>() as f64 * n as f64 * k as f64;
        let op = grouped_bias_label(act, false);
        self.timed(op, flops, || {
            self.inner
                .gemm_grouped_bias(out, a, b, bias, group_rows, n, k, trans_b, act)
        })
    }
    fn gemm_grouped_bias_gathered(
        &self,
        out: TensorMut<'_>,
        x: TensorRef<'_>,
        rows: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        act: Option<Unary>,
    ) -> EResult<()> {
        let flops = 2.0 * group_rows.iter().sum::<usize>() as f64 * n as f64 * k as f64;
        let op = grouped_bias_label(act, true);
        self.timed(op, flops, || {
            self.inner
                .gemm_grouped_bias_gathered(out, x, rows, b, bias, group_rows, n, k, trans_b, act)
        })
    }
    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> EResult<()> {
        self.timed("add_broadcast", 0.0, || self.inner.add_broadcast(out, inp))
    }
    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> EResult<()> {
        self.timed("axpby", 0.0, || self.inner.axpby(y, a, x, b))
    }
    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> EResult<()> {
        self.timed("sum_rows", 0.0, || {
            self.inner.sum_rows(out, inp, rows, cols, accumulate)
        })
    }
    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> EResult<()> {
        self.timed("softmax_rows", 0.0, || self.inner.softmax_rows(out, inp, rows, cols))
    }
    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> EResult<()> {
        self.timed("softmax_rows_backward", 0.0, || {
            self.inner.softmax_rows_backward(dinp, dout, out, rows, cols)
        })
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
    ) -> EResult<()> {
        self.timed("layer_norm", 0.0, || {
            self.inner
                .layer_norm(out, mean, rstd, inp, weight, bias, rows, cols, eps)
        })
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
    ) -> EResult<()> {
        self.timed("layer_norm_backward", 0.0, || {
            self.inner
                .layer_norm_backward(dinp, dweight, dbias, dout, inp, mean, rstd, weight, rows, cols)
        })
    }
    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> EResult<()> {
        let name = match op {
            Unary::GeluTanh => "unary gelu",
            Unary::Silu => "unary silu",
        };
        self.timed(name, 0.0, || self.inner.unary(op, out, inp))
    }
    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> EResult<()> {
        self.timed("unary_backward", 0.0, || self.inner.unary_backward(op, dinp, dout, inp))
    }
    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> EResult<()> {
        self.timed("modulate", 0.0, || {
            self.inner.modulate(out, inp, modulation, which, dims)
        })
    }
    fn layer_norm_modulate(
        &self,
        out: TensorMut<'_>,
        ln: Option<TensorMut<'_>>,
        mean: TensorMut<'_>,
        rstd: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
        eps: f32,
    ) -> EResult<()> {
        self.timed("layer_norm_modulate", 0.0, || {
            self.inner
                .layer_norm_modulate(out, ln, mean, rstd, inp, modulation, which, dims, eps)
        })
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
    ) -> EResult<()> {
        self.timed("modulate_backward", 0.0, || {
            self.inner
                .modulate_backward(dinp, dmodulation, dout, inp, modulation, which, dims)
        })
    }
    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> EResult<()> {
        self.timed("gated_residual", 0.0, || {
            self.inner.gated_residual(x, y, modulation, which, dims)
        })
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
    ) -> EResult<()> {
        self.timed("gated_residual_backward", 0.0, || {
            self.inner
                .gated_residual_backward(dy, dmodulation, dx, y, modulation, which, dims)
        })
    }
    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> EResult<()> {
        self.timed("patchify", 0.0, || self.inner.patchify(out, inp, dims))
    }
    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> EResult<()> {
        self.timed("unpatchify", 0.0, || self.inner.unpatchify(out, inp, dims))
    }
    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> EResult<()> {
        self.timed("timestep_features", 0.0, || {
            self.inner.timestep_features(out, t, dim, max_period)
        })
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
    ) -> EResult<()> {
        let flops = 4.0 * (dims.batch * dims.heads * dims.q_len * dims.kv_len * dims.head_dim) as f64;
        let name = if key_mask.is_some() {
            "attention (masked)"
        } else {
            "attention"
        };
        self.timed(name, flops, || {
            self.inner.attention(out, probs, q, k, v, key_mask, dims)
        })
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
    ) -> EResult<()> {
        self.timed("attention_backward", 0.0, || {
            self.inner.attention_backward(dq, dk, dv, dout, probs, q, k, v, dims)
        })
    }
    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> EResult<()> {
        self.timed("gather_rows", 0.0, || self.inner.gather_rows(out, inp, idx, cols))
    }
    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> EResult<()> {
        self.timed("scatter_add_rows", 0.0, || {
            self.inner.scatter_add_rows(out, inp, idx, scale, cols)
        })
    }
    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> EResult<()> {
        self.timed("gather_dot", 0.0, || self.inner.gather_dot(out, a, idx, b, cols))
    }
    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> EResult<()> {
        self.timed("top_k_rows", 0.0, || {
            self.inner.top_k_rows(idx, val, inp, rows, cols, k)
        })
    }
    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> EResult<()> {
        self.timed("router_softmax", 0.0, || {
            self.inner.router_softmax(out, scores, rows, experts)
        })
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
    ) -> EResult<()> {
        self.timed("top_k_tokens", 0.0, || {
            self.inner.top_k_tokens(idx, val, probs, groups, group_rows, experts, k)
        })
    }
    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> EResult<()> {
        self.timed("adamw_step", 0.0, || self.inner.adamw_step(param, grad, m, v, hp, step))
    }
}

/// The process's peak resident memory so far (`VmHWM` of /proc/self/status),
/// in bytes; `None` where the kernel does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_length_sets_the_counted_cross_attention() {
        let registry = crate::registry().unwrap();
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let cfg = crate::config_files::load_config(&dir.join("tiny-ec.json")).unwrap();
        let short = info::flops_per_image(&registry, &with_text_len(&cfg, 4)).unwrap();
        let long = info::flops_per_image(&registry, &with_text_len(&cfg, 8)).unwrap();
        assert!(long.cross_attention > short.cross_attention);
        assert_eq!(long.attention_proj, short.attention_proj);
        assert_eq!(peak_shapes(&cfg, 2), vec![(128, 256, 64), (128, 64, 256)]);
    }

    #[test]
    fn a_tiny_forward_bench_reports_consistent_numbers() {
        let registry = crate::registry().unwrap();
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let cfg = crate::config_files::load_config(&dir.join("tiny-ec.json")).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(ecdit_backend_cpu::CpuBackend::new(1).unwrap());
        let opts = ForwardBenchOptions {
            batch: 2,
            text_len: 4,
            reps: 1,
            peak_reps: 1,
            seed: 1,
            profile: true,
            dtype: DType::F32,
        };
        let r = bench_forward(&registry, &cfg, backend, &opts).unwrap();
        assert_eq!(
            (r.config.as_str(), r.batch, r.threads, r.text_len),
            ("tiny-ec", 2, 1, 4)
        );
        assert!(r.ms > 0.0 && r.min_ms <= r.ms && r.peak_gflops > 0.0);
        assert!((r.images_per_s - 2.0 / (r.ms / 1e3)).abs() < 1e-6 * r.images_per_s);
        assert!((r.mfu - r.achieved_gflops / r.peak_gflops).abs() < 1e-12);
        assert!((r.achieved_gflops - r.flops_per_image * 2.0 / (r.ms / 1e3) / 1e9).abs() < 1e-6 * r.achieved_gflops);
        assert!(r.peak_rss_bytes.is_none_or(|b| b > r.weight_bytes + r.buffer_bytes));
        assert!(r.buffer_bytes > 0 && r.buffer_bytes <= 2 * r.activation_bytes);
        // The profile saw the products: gemm FLOPs of one timed forward are
        // at most the counted FLOPs (which also count attention).
        let gemm = r.profile.iter().find(|t| t.op == "gemm").expect("gemm profiled");
        assert!(gemm.calls > 0 && gemm.flops > 0.0 && gemm.flops < 2.0 * r.flops_per_image);
        assert_eq!(r.dtype, "f32");
        // bf16 storage: same work, half the weight bytes.
        let backend: Arc<dyn Backend> = Arc::new(ecdit_backend_cpu::CpuBackend::new(1).unwrap());
        if backend.supports(DType::BF16) {
            let opts = ForwardBenchOptions {
                dtype: DType::BF16,
                profile: false,
                ..opts
            };
            let h = bench_forward(&registry, &cfg, backend, &opts).unwrap();
            assert_eq!((h.dtype.as_str(), h.flops_per_image), ("bf16", r.flops_per_image));
            assert_eq!(2 * h.weight_bytes, r.weight_bytes);
            assert!(h.ms > 0.0 && h.buffer_bytes > 0);
        }
    }
}
