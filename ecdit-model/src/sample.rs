//! Prompts to images: a trained model directory (`model.safetensors` with its
//! config, `text_encoder.safetensors` beside it), the scheduler's sampler and
//! classifier-free guidance.
//!
//! ```text
//! text_i = encoder(prompt_i) alone, padded to max_tokens    (no batch dependence)
//! x_i ~ N(0, I) from rng(seed + i)                            (image i: the same bits for any n)
//! for t, t_next in scheduler.sampling_times(steps):
//!     v = v_uncond + cfg * (v_cond - v_uncond)                  (two passes, never one routing group)
//!     x = scheduler.step(x, v, t, t_next)
//! ```

use crate::config::Conditioning;
use crate::model::{CfgChannels, CfgOptions, Condition, ForwardOptions, Model, ModelActs, ModelError, TextInput};
use crate::text::{TextEncoder, TextError, TransformerTextEncoder};
use crate::weights::Weights;
use ecdit_engine::{Backend, DType, Registry, RoutingStats, Scheduler};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can go wrong generating.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A file of the model directory is missing or unreadable.
    #[error("model directory {dir}: {reason}")]
    ModelDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model or a backend op.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The text encoder.
    #[error(transparent)]
    Text(#[from] TextError),
    /// A setting is out of range.
    #[error("{0}")]
    Options(String),
}

impl From<ecdit_engine::EngineError> for SampleError {
    fn from(e: ecdit_engine::EngineError) -> Self {
        SampleError::Model(e.into())
    }
}

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Sampler steps.
    pub steps: usize,
    /// Guidance scale (1: none).
    pub cfg: f32,
    /// Image i starts from the noise of seed `seed + i`.
    pub seed: u64,
}

impl SampleOptions {
    /// Refuses zero steps and a guidance scale that is not finite.
    pub fn check(&self) -> Result<(), SampleError> {
        if self.steps == 0 {
            return Err(SampleError::Options("--steps must be at least 1".into()));
        }
        if !self.cfg.is_finite() {
            return Err(SampleError::Options(format!(
                "--cfg {}: the guidance scale must be finite",
                self.cfg
            )));
        }
        Ok(())
    }
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 30,
            cfg: 4.0,
            seed: 0,
        }
    }
}

/// One sampler step, for progress bars and inspection.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Step index (0-based) and count.
    pub step: usize,
    /// Steps in all.
    pub steps: usize,
    /// The scheduler time of this step.
    pub t: f32,
    /// The conditional pass's routing statistics per MoE block (when asked).
    pub routing: &'a [(usize, RoutingStats)],
    /// The images before this step [n, C, H, W] (the sampler's state at `t`).
    pub x: &'a [f32],
    /// The model input time of this step.
    pub t_model: f32,
}

/// A trained model and its text encoder, ready to sample.
pub struct Generator {
    /// The model.
    pub model: Model,
    /// Its text encoder (text-conditioned models).
    pub encoder: Option<TransformerTextEncoder>,
    scheduler: Box<dyn Scheduler>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("model", &self.model.config().name)
            .finish()
    }
}

/// The model file of a model directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The text encoder file of a model directory.
pub const TEXT_ENCODER_FILE: &str = "text_encoder.safetensors";

/// How to load a model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Refuse a model whose estimated memory (weights and activations for
    /// `images`) exceeds this many bytes; None: [`crate::limits::default_limit`].
    pub max_memory: Option<u64>,
    /// Images sampled at once (guidance runs the model on twice as many).
    pub images: usize,
    /// Storage dtype of the model's weights and activations while sampling
    /// (f32 or bf16; the router logits, softmaxes and norms compute in f32).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_memory: None,
            images: 1,
            dtype: DType::F32,
        }
    }
}

impl Generator {
    /// [`Generator::load_with`] with the default options (one image at a
    /// time, the machine's memory limit).
    pub fn load(dir: &Path, registry: &Registry, backend: Arc<dyn Backend>) -> Result<Self, SampleError> {
        Self::load_with(dir, registry, backend, LoadOptions::default())
    }

    /// Loads `dir/model.safetensors` (the config in its metadata) and, for a
    /// text model, `dir/text_encoder.safetensors`; or, for a training run
    /// without its final export, the EMA weights of its newest checkpoint.
    /// Missing or mismatched files are errors naming the file; a model whose
    /// estimated memory is over the limit is refused before it is allocated.
    pub fn load_with(
        dir: &Path,
        registry: &Registry,
        backend: Arc<dyn Backend>,
        opts: LoadOptions,
    ) -> Result<Self, SampleError> {
        let bad = |reason: String| SampleError::ModelDir {
            dir: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(bad("not a directory".into()));
        }
        let model_path = dir.join(MODEL_FILE);
        let is_run = !model_path.is_file() && dir.join("run.json").is_file();
        // The config alone (a header or run.json), to refuse what does not fit
        // before anything is allocated.
        let config = if is_run {
            crate::train::run::read_run_config(dir)
                .map_err(|e| bad(e.to_string()))?
                .model
        } else if model_path.is_file() {
            let weights = Weights::open(&model_path).map_err(|e| bad(format!("{MODEL_FILE}: {e}")))?;
            crate::model::config_from_metadata(&weights).map_err(|e| bad(format!("{MODEL_FILE}: {e}")))?
        } else {
            return Err(bad(format!("{MODEL_FILE} is missing")));
        };
        let source = if is_run { "run.json" } else { MODEL_FILE };
        let estimate = crate::limits::inference_estimate(&config, registry, 2 * opts.images.max(1))
            .map_err(|e| bad(format!("{source}: {e}")))?;
        crate::limits::check_memory(
            format!(
                "model '{}' sampling {} image(s) at once",
                config.name,
                opts.images.max(1)
            ),
            estimate,
            opts.max_memory,
            "sample fewer images at once (-n, --samples-per-prompt) or raise --max-memory",
        )
        .map_err(|e| bad(e.to_string()))?;
        if is_run {
            // A training run without its final export: its newest checkpoint's EMA.
            let (mut model, encoder, step) =
                crate::train::run::load_ema(dir, registry, backend).map_err(|e| bad(e.to_string()))?;
            eprintln!(
                "{}: a training run; using the EMA weights of its step {step}",
                dir.display()
            );
            model.to_dtype(opts.dtype)?;
            return Self::new(model, encoder, registry);
        }
        let mut model =
            Model::load(&model_path, registry, backend.clone()).map_err(|e| bad(format!("{MODEL_FILE}: {e}")))?;
        // Weights are stored in bf16 to ship small; sampling in f32 widens them exactly.
        model.to_dtype(opts.dtype)?;
        let encoder = match model.config().conditioning {
            Conditioning::Text { .. } => {
                let path = dir.join(TEXT_ENCODER_FILE);
                if !path.is_file() {
                    return Err(bad(format!(
                        "{TEXT_ENCODER_FILE} is missing (the model is text-conditioned)"
                    )));
                }
                let mut enc = TransformerTextEncoder::for_model(backend.clone(), model.config(), 0)?;
                let weights = Weights::open(&path).map_err(|e| bad(format!("{TEXT_ENCODER_FILE}: {e}")))?;
                enc.load_weights(&weights).map_err(|e| {
                    bad(format!(
                        "{TEXT_ENCODER_FILE} does not fit the model's text encoder: {e}"
                    ))
                })?;
                Some(enc)
            }
            Conditioning::Class { .. } => None,
        };
        let scheduler = registry
            .scheduler(&model.config().scheduler)
            .map_err(ModelError::from)?;
        Ok(Self {
            model,
            encoder,
            scheduler,
        })
    }

    /// A generator of a model and encoder in memory (e.g. a trainer's).
    pub fn new(
        model: Model,
        encoder: Option<TransformerTextEncoder>,
        registry: &Registry,
    ) -> Result<Self, SampleError> {
        let scheduler = registry
            .scheduler(&model.config().scheduler)
            .map_err(ModelError::from)?;
        Ok(Self {
            model,
            encoder,
            scheduler,
        })
    }

    /// Chooses the sampler: `euler` for rectified-flow models (with an
    /// optional SD3 timestep `shift`), `ddim` for DDPM ones. The model's
    /// objective fixes the family; anything else is an error listing the choice.
    pub fn set_sampler(&mut self, registry: &Registry, name: &str, shift: Option<f64>) -> Result<(), SampleError> {
        let mut spec = self.model.config().scheduler.clone();
        let kind = spec["kind"].as_str().unwrap_or_default().to_string();
        let valid = match kind.as_str() {
            "rectified-flow" => "euler",
            "ddpm" => "ddim",
            _ => "",
        };
        if name != valid {
            return Err(SampleError::Options(format!(
                "--sampler {name}: a '{kind}' model samples with '{valid}'"
            )));
        }
        if let Some(shift) = shift {
            if kind != "rectified-flow" {
                return Err(SampleError::Options(format!(
                    "--shift applies to rectified-flow models, not '{kind}'"
                )));
            }
            spec["shift"] = shift.into();
        }
        self.scheduler = registry.scheduler(&spec).map_err(ModelError::from)?;
        Ok(())
    }

    /// Words of `prompt` outside the vocabulary (they become `<unk>`).
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        match &self.encoder {
            Some(enc) => enc.tokenizer().tokenize_quiet(prompt).unknown,
            None => Vec::new(),
        }
    }

    /// The vocabulary's words (for messages about unknown ones).
    pub fn known_words(&self) -> Vec<String> {
        match &self.encoder {
            Some(enc) => enc
                .tokenizer()
                .vocab()
                .tokens()
                .filter(|w| !w.starts_with('<'))
                .map(String::from)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Images [C, H, W] in [-1, 1] (clamped), one per prompt. `on_step` runs
    /// after every sampler step; with `stats` it gets the conditional pass's
    /// routing statistics.
    pub fn generate(
        &self,
        prompts: &[&str],
        opts: SampleOptions,
        stats: bool,
        mut on_step: impl FnMut(StepInfo<'_>),
    ) -> Result<Vec<Vec<f32>>, SampleError> {
        let c = self.model.config();
        opts.check()?;
        let n = prompts.len();
        let image = c.in_channels * c.input_size * c.input_size;
        // Noise: image i from its own seed.
        let mut x = Vec::with_capacity(2 * n * image);
        for i in 0..n {
            let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(i as u64));
            x.extend((0..image).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
        }
        x.extend(std::iter::repeat_n(0.0, n * image)); // the unconditional half (not read)
        let cond = self.conditions(prompts)?;
        let times = self.scheduler.sampling_times(opts.steps)?;
        let mut acts = ModelActs::default();
        let cfg = CfgOptions {
            scale: opts.cfg,
            channels: CfgChannels::All,
            share_routing_group: false,
        };
        let fwd = ForwardOptions { keep: false, stats };
        let out_image = c.out_channels() * c.input_size * c.input_size;
        for (k, pair) in times.windows(2).enumerate() {
            let (t, t_next) = (pair[0], pair[1]);
            let t_model = vec![self.scheduler.model_time(t)?; 2 * n];
            let out = self
                .model
                .forward_with_cfg(&mut acts, &x, &t_model, cond.condition(), cfg, fwd)?;
            let before = x[..n * image].to_vec();
            // Each image steps with its own guided prediction (its first C channels).
            for i in 0..n {
                let pred = &out.out[i * out_image..i * out_image + image];
                self.scheduler
                    .step(&mut x[i * image..(i + 1) * image], pred, t, t_next)?;
            }
            let cond_layers: Vec<(usize, RoutingStats)> = out.routing.into_iter().take(self.moe_layers()).collect();
            on_step(StepInfo {
                step: k,
                steps: times.len() - 1,
                t,
                routing: &cond_layers,
                x: &before,
                t_model: t_model[0],
            });
        }
        Ok(x[..n * image]
            .chunks(image)
            .map(|img| img.iter().map(|v| v.clamp(-1.0, 1.0)).collect())
            .collect())
    }

    /// MoE layers of the model.
    fn moe_layers(&self) -> usize {
        let c = self.model.config();
        c.moe
            .as_ref()
            .map_or(0, |m| (0..c.depth).filter(|&i| m.is_moe_block(i)).count())
    }

    /// The 2N conditions: the prompts, then the empty prompt (the null class) N times.
    pub fn conditions(&self, prompts: &[&str]) -> Result<Conditions, SampleError> {
        let n = prompts.len();
        match (&self.encoder, &self.model.config().conditioning) {
            (Some(enc), _) => {
                let all: Vec<&str> = prompts.iter().copied().chain(std::iter::repeat_n("", n)).collect();
                let len = enc.max_tokens();
                let (mut tokens, mut mask, mut pooled) = (Vec::new(), Vec::new(), Vec::new());
                // One prompt at a time, padded to max_tokens: a prompt's
                // encoding never depends on the others of its batch.
                for prompt in all {
                    let one = enc.encode(&[prompt])?;
                    let dim = one.dim;
                    tokens.extend_from_slice(&one.tokens);
                    tokens.extend(std::iter::repeat_n(0.0, (len - one.len) * dim));
                    mask.extend_from_slice(&one.mask);
                    mask.extend(std::iter::repeat_n(0u8, len - one.len));
                    pooled.extend_from_slice(&one.pooled);
                }
                Ok(Conditions::Text {
                    tokens,
                    mask,
                    pooled,
                    batch: 2 * n,
                    len,
                    dim: enc.dim(),
                })
            }
            (None, Conditioning::Class { num_classes, .. }) => {
                let labels = prompts
                    .iter()
                    .map(|p| crate::train::trainer::class_of(p, *num_classes))
                    .chain(std::iter::repeat_n(*num_classes as u32, n))
                    .collect();
                Ok(Conditions::Class(labels))
            }
            (None, Conditioning::Text { .. }) => Err(SampleError::Options("the model has no text encoder".into())),
        }
    }
}

/// Conditions held on the host for a whole sampling run.
#[derive(Clone, Debug, PartialEq)]
pub enum Conditions {
    /// Class labels.
    Class(Vec<u32>),
    /// Encoded prompts.
    Text {
        /// [B, L, dim].
        tokens: Vec<f32>,
        /// [B, L].
        mask: Vec<u8>,
        /// [B, dim].
        pooled: Vec<f32>,
        /// B.
        batch: usize,
        /// L.
        len: usize,
        /// dim.
        dim: usize,
    },
}

impl Conditions {
    /// As the model takes them.
    pub fn condition(&self) -> Condition<'_> {
        match self {
            Conditions::Class(labels) => Condition::Class(labels),
            Conditions::Text {
                tokens,
                mask,
                pooled,
                batch,
                len,
                dim,
            } => Condition::Text(TextInput {
                tokens,
                mask,
                pooled,
                batch: *batch,
                len: *len,
                dim: *dim,
            }),
        }
    }
}
