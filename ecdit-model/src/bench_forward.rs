//! `ecdit bench forward`: the whole model forward at a batch size, in images
//! per second and MFU (model FLOP utilisation).
//!
//! The model has random weights (fixed seed) and reads random text tokens of
//! a fixed length (16 by default, as `benches/reference/forward_torch.py`),
//! all real (no padding). The FLOPs of one image are
//! [`info::flops_per_image`] with the text length the benchmark uses, and MFU
//! is the achieved FLOP/s over the matrix-product peak measured in the same
//! run: the best GFLOP/s of the backend's GEMM on the model's two largest
//! products, `(B*T, 4d, d)` and `(B*T, d, 4d)`, at the same thread count.
//!
//! Timing: one untimed forward (buffers sized, pool started), then `reps`
//! forwards into the same reused activation buffers, as a sampler runs them;
//! the median is reported.

use crate::config::{Conditioning, ModelConfig};
use crate::info;
use crate::model::{Condition, Model, ModelActs, ModelResult, TextInput};
use ecdit_engine::{Backend, EngineError, Registry};
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
    /// f32 weights, bytes (`ecdit info`'s `weights f32`).
    pub weight_bytes: u64,
    /// `ecdit info`'s inference activation estimate at this batch, bytes.
    pub activation_bytes: u64,
}

/// The products a matmul peak is measured on: the FFN's two, `(B*T, 4d, d)`
/// and `(B*T, d, 4d)`, the largest of the model.
pub fn peak_shapes(cfg: &ModelConfig, batch: usize) -> Vec<(usize, usize, usize)> {
    let (m, d, h) = (batch * cfg.tokens(), cfg.hidden, cfg.mlp_hidden());
    vec![(m, h, d), (m, d, h)]
}

/// Best GFLOP/s of the CPU backend's GEMM over `shapes` at `threads` threads.
pub fn matmul_peak_gflops(shapes: &[(usize, usize, usize)], threads: usize, reps: usize) -> ModelResult<f64> {
    let records = ecdit_backend_cpu::bench::bench_gemm(shapes, &[threads], reps)?;
    Ok(records.iter().map(|r| r.gflops).fold(0.0, f64::max))
}

/// `cfg` as the benchmark runs it: text-conditioned configs read `text_len`
/// tokens, so the FLOP count uses that length, not `max_tokens`.
fn with_text_len(cfg: &ModelConfig, text_len: usize) -> ModelConfig {
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
    let model = Model::new(cfg.clone(), registry, backend, opts.seed)?;
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let inputs = Inputs::new(cfg, batch, text_len, &mut rng);
    let cond = inputs.condition(cfg, batch, text_len);

    let mut acts = ModelActs::default();
    let _span = tracing::info_span!("bench forward", config = %cfg.name, batch, threads).entered();
    model.forward_into(&mut acts, false, &inputs.x, &inputs.t, cond)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        model.forward_into(&mut acts, false, &inputs.x, &inputs.t, cond)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];

    let counted = with_text_len(cfg, text_len.max(1));
    let flops_per_image = info::flops_per_image(registry, &counted)?.total();
    let shapes = peak_shapes(cfg, batch);
    let peak_gflops = matmul_peak_gflops(&shapes, threads, opts.peak_reps)?;
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
        weight_bytes: report.weight_bytes_f32,
        activation_bytes: report.activation_memory.inference_bytes,
    })
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
        };
        let r = bench_forward(&registry, &cfg, backend, &opts).unwrap();
        assert_eq!((r.config.as_str(), r.batch, r.threads, r.text_len), ("tiny-ec", 2, 1, 4));
        assert!(r.ms > 0.0 && r.min_ms <= r.ms && r.peak_gflops > 0.0);
        assert!((r.images_per_s - 2.0 / (r.ms / 1e3)).abs() < 1e-6 * r.images_per_s);
        assert!((r.mfu - r.achieved_gflops / r.peak_gflops).abs() < 1e-12);
        assert!((r.achieved_gflops - r.flops_per_image * 2.0 / (r.ms / 1e3) / 1e9).abs() < 1e-6 * r.achieved_gflops);
        assert!(peak_rss_bytes().is_none_or(|b| b > 0));
    }
}
