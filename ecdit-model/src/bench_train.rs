//! `ecdit bench train`: one full training step (forward with cached
//! activations, loss, backward of the model and the text encoder, gradient
//! clipping, AdamW, EMA) at a batch size, in images per second and MFU.
//!
//! Inputs: random normal images of the config's shape with captions of the
//! built-in data world (a dozen tokens or so, as
//! `benches/reference/train_torch.py`'s 12), fresh times and noise each step.
//! Training FLOPs are 3x the forward's ([`info::flops_per_image`] at 12 text
//! tokens); MFU is over the matrix-product peak measured in the same run, as
//! `ecdit bench forward` does. Timing: one untimed step, then `reps` steps,
//! the median reported.

use crate::bench_forward::{matmul_peak_gflops, peak_rss_bytes, peak_shapes, with_text_len, OpTime, ProfiledBackend};
use crate::config::ModelConfig;
use crate::data::{DataError, Dataset, Sample, ShapesConfig, ShapesWorld};
use crate::info;
use crate::limits::training_estimate;
use crate::model::ModelResult;
use crate::train::config::TrainConfig;
use crate::train::trainer::{TrainError, Trainer};
use ecdit_engine::{Backend, DType, EngineError, Registry};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Text tokens per prompt the FLOPs are counted at (the PyTorch reference's length).
pub const TEXT_LEN: usize = 12;

/// One training-step benchmark's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainBenchRecord {
    /// Config name.
    pub config: String,
    /// Images per step.
    pub batch: usize,
    /// Backend threads.
    pub threads: usize,
    /// The DiT's dtype in the forward and backward (`bf16`: mixed precision).
    pub dtype: String,
    /// Median milliseconds of one step.
    pub ms: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
    /// `batch / ms`.
    pub images_per_sec: f64,
    /// Training FLOPs of one image (3x the forward's).
    pub flops_per_image: f64,
    /// Achieved GFLOP/s.
    pub achieved_gflops: f64,
    /// Best GEMM GFLOP/s on the model's largest products, same threads.
    pub peak_gflops: f64,
    /// `achieved_gflops / peak_gflops`.
    pub mfu: f64,
    /// Peak resident memory of the process after the timed steps (`VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// `ecdit train`'s memory estimate for this config and batch.
    pub estimate_bytes: u64,
    /// With `profile`: time per backend op over the timed steps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<OpTime>,
}

/// Random normal images of a config's shape, captioned by the shapes world.
struct RandomImages {
    channels: usize,
    size: usize,
    captions: ShapesWorld,
}

impl Dataset for RandomImages {
    fn describe(&self) -> String {
        "random images".into()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn size(&self) -> usize {
        self.size
    }
    fn len(&self) -> Option<usize> {
        None
    }
    fn sample(&self, index: u64) -> Result<Sample, DataError> {
        let mut rng = StdRng::seed_from_u64(index);
        let n = self.channels * self.size * self.size;
        Ok(Sample {
            image: (0..n).map(|_| StandardNormal.sample(&mut rng)).collect(),
            caption: self.captions.draw_scene(index).caption,
        })
    }
}

/// Times `reps` training steps of `cfg` at `batch` on `backend`.
pub fn bench_train(
    registry: &Registry,
    cfg: &ModelConfig,
    backend: Arc<dyn Backend>,
    batch: usize,
    dtype: DType,
    reps: usize,
    profile: bool,
) -> ModelResult<TrainBenchRecord> {
    if batch == 0 {
        return Err(EngineError::Other("bench train: --batch must be at least 1".into()).into());
    }
    let threads = backend.threads();
    let profiled = profile.then(|| Arc::new(ProfiledBackend::new(backend.clone())));
    let model_backend = match &profiled {
        Some(p) => p.clone() as Arc<dyn Backend>,
        None => backend,
    };
    let mut config = TrainConfig::for_model(cfg.clone());
    config.batch = batch;
    config.dtype = dtype;
    let other = |e: TrainError| EngineError::Other(format!("bench train: {e}"));
    let estimate = training_estimate(&config, registry)?.total();
    let captions = ShapesWorld::new(ShapesConfig::default()).map_err(|e| EngineError::Other(e.to_string()))?;
    let data = Box::new(RandomImages {
        channels: cfg.in_channels,
        size: cfg.input_size,
        captions,
    });
    let mut trainer = Trainer::new(config, registry, model_backend, data).map_err(other)?;
    let _span = tracing::info_span!("bench train", config = %cfg.name, batch, threads).entered();
    trainer.train_step(false).map_err(other)?;
    if let Some(p) = &profiled {
        p.reset();
    }
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        trainer.train_step(false).map_err(other)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let median = crate::bench_moe::median(&mut times);
    let peak_rss = peak_rss_bytes();
    let flops_per_image = 3.0 * info::flops_per_image(registry, &with_text_len(cfg, TEXT_LEN))?.total();
    let peak_gflops = matmul_peak_gflops(&peak_shapes(cfg, batch), threads, 5, dtype)?;
    let achieved_gflops = flops_per_image * batch as f64 / median / 1e9;
    Ok(TrainBenchRecord {
        config: cfg.name.clone(),
        batch,
        threads,
        dtype: dtype.name().to_string(),
        ms: median * 1e3,
        min_ms: times[0] * 1e3,
        images_per_sec: batch as f64 / median,
        flops_per_image,
        achieved_gflops,
        peak_gflops,
        mfu: achieved_gflops / peak_gflops,
        peak_rss_bytes: peak_rss,
        estimate_bytes: estimate,
        profile: profiled.map(|p| p.times()).unwrap_or_default(),
    })
}
