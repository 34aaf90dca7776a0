//! The EC-DiT model: DiT's embeddings, blocks with adaLN-Zero self-attention,
//! optional text cross-attention and a dense or MoE feed-forward, and DiT's
//! final layer (EC-DIT.md section 3), on the tensors of one backend.
//!
//! ```text
//! x [B, C, H, W] -> patchify -> x_embedder + pos      tokens [B, T, d]
//! t [B] -> 256 freqs [cos | sin] -> Linear-SiLU-Linear          t_emb [B, d]
//! class -> table | pooled text -> Linear-SiLU-Linear            y_emb [B, d]
//! c = t_emb + y_emb
//! blocks(tokens, SiLU(c), text) -> final_layer -> unpatchify    out [B, C_out, H, W]
//! ```
//!
//! # Public API (engine v2)
//!
//! ```text
//! Model::new(config, &registry, backend: Arc<dyn Backend>, seed) -> ModelResult<Model>   // f32
//! Model::from_weights(config, &registry, backend, &weights, allow_unused) / Model::load(path, &registry, backend)
//! model.save(path)                          // upstream names and layouts, each param in its dtype
//! model.to_dtype(DType::BF16)               // storage dtype of params and activations (f32 default)
//! model.dtype() / config() / backend() / backend_arc()
//! model.params() / params_mut()             // EVERY Param: dense, MoE router + experts, pos_embed (Init::Fixed) last
//!                                           // (the text encoder is its own `Params`; a trainer chains both lists)
//! model.param_shapes() / num_params()       // (name, on-disk shape); trainable count leaves Fixed out
//! model.forward(&mut acts, x, t, cond, ForwardOptions { keep, stats }) -> ForwardOutput
//! model.predict(x, t, cond)                 // forward with fresh buffers, inference, stats on
//! model.forward_with_cfg(&mut acts, x, t, cond, CfgOptions, ForwardOptions) -> ForwardOutput
//! ```
//!
//! Parameters are engine [`Param`]s (dense Linear weights input-major, fused
//! qkv/kv as input-major chunks, the patch embedding as stored) listed by the
//! [`Params`] trait. [`ModelActs`] holds the activations as backend tensors,
//! reused across calls: a sampler keeps one and calls `forward` every step.
//! One forward serves training and inference: with `keep` every block keeps
//! what a backward reads in its own [`BlockActs`]; without it all blocks
//! share one, attention keeps no probabilities, and the bits are the same.
//! A forward uploads its inputs once (x, t, labels or text) and downloads its
//! output once; routing statistics are downloaded only with `stats`.

mod act;
mod adaln;
mod attention;
mod backward;
mod block;
mod cross_attention;
mod error;
mod final_layer;
mod grads;
mod guidance;
mod label_embed;
mod linear;
mod mlp;
mod moe_ffn;
mod patch_embed;
mod pos_embed;
mod text_embed;
mod timestep;

pub use act::Act;
pub use adaln::{chunks, LN_EPS};
pub use attention::{AttentionActs, QkvProjection, SelfAttention};
pub use backward::{Backprop, BackwardOptions};
pub use block::{Block, BlockActs, BlockScratch, Ffn, TextContext};
pub use cross_attention::CrossAttention;
pub use error::{ModelError, ModelResult};
pub use final_layer::{FinalActs, FinalLayer, FinalScratch};
pub use grads::Grads;
pub use guidance::{CfgChannels, CfgOptions};
pub use label_embed::LabelEmbedder;
pub use linear::Linear;
pub(crate) use mlp::chunk_rows;
pub use mlp::{Mlp, MlpActs};
pub use moe_ffn::MoeFfn;
pub use patch_embed::patch_dims;
pub use pos_embed::sincos_2d;
pub use text_embed::{CaptionActs, CaptionEmbedder, PooledActs, PooledEmbedder, TextInput};
pub use timestep::{TimestepActs, TimestepEmbedder, FREQ_DIM, MAX_PERIOD};

use crate::config::{Conditioning, ModelConfig};
use crate::weights::{save_params, Weights, WeightsError};
use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::{
    Backend, BackendExt, DType, DeviceRouting, EngineError, Init, Layout, Param, Params, Registry, RoutingStats,
    TensorRef, Unary,
};
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Metadata key holding the model config (JSON) in saved files.
pub const CONFIG_KEY: &str = "config";

/// Metadata key holding the model's storage dtype (`f32` or `bf16`) in saved files.
pub const DTYPE_KEY: &str = "dtype";

/// How the model is conditioned, per sample.
#[derive(Clone, Copy, Debug)]
pub enum Condition<'a> {
    /// Class ids [B]; the null class (`num_classes`) is the unconditional one.
    Class(&'a [u32]),
    /// Encoded prompts (B of them).
    Text(TextInput<'a>),
    /// Encoded prompts already on the model's backend (a text encoder
    /// trained with the model hands its output over without a transfer).
    Encoded(EncodedText<'a>),
}

/// Encoded prompts on the model's backend.
#[derive(Clone, Copy, Debug)]
pub struct EncodedText<'a> {
    /// [B, L, text_dim] token embeddings.
    pub tokens: TensorRef<'a>,
    /// [B, L] u8, nonzero = real token.
    pub mask: TensorRef<'a>,
    /// [B, text_dim] pooled embedding.
    pub pooled: TensorRef<'a>,
}

impl EncodedText<'_> {
    /// Prompts B and tokens per prompt L, checked against the mask and pooled shapes.
    fn dims(&self, text_dim: usize) -> Result<(usize, usize), EngineError> {
        let what = "encoded text";
        let [b, l] = self.mask.shape() else {
            return Err(EngineError::shape(
                what,
                "mask [B, L]",
                format!("{:?}", self.mask.shape()),
            ));
        };
        let (b, l) = (*b, *l);
        self.mask.expect_dtype(what, "mask", DType::U8)?;
        self.tokens
            .expect_len(what, "tokens [B, L, text_dim]", b * l * text_dim)?;
        self.pooled.expect_len(what, "pooled [B, text_dim]", b * text_dim)?;
        Ok((b, l))
    }
}

impl<'a> Condition<'a> {
    /// Samples in the condition.
    pub fn batch(&self) -> usize {
        match self {
            Condition::Class(labels) => labels.len(),
            Condition::Text(text) => text.batch,
            Condition::Encoded(text) => text.mask.shape().first().copied().unwrap_or(0),
        }
    }

    /// Samples `start..start + n`; errors (never panics) when they are not all there.
    pub fn slice(&self, start: usize, n: usize) -> ModelResult<Condition<'a>> {
        let have = self.batch();
        if start.checked_add(n).is_none_or(|end| end > have) {
            return Err(EngineError::shape(
                "condition slice",
                format!("samples {start}..{} of the condition", start.saturating_add(n)),
                format!("{have} samples"),
            )
            .into());
        }
        Ok(match self {
            Condition::Class(labels) => Condition::Class(&labels[start..start + n]),
            Condition::Text(text) => {
                // The buffers must hold what the header fields say before slicing.
                text.check(text.dim)?;
                Condition::Text(text.slice(start, n))
            }
            Condition::Encoded(text) => {
                let (b, l) = (have, text.mask.numel() / have.max(1));
                let dim = text.pooled.numel() / b.max(1);
                Condition::Encoded(EncodedText {
                    tokens: text
                        .tokens
                        .reshape(&[b, l * dim])?
                        .rows(start, n)?
                        .reshape(&[n, l, dim])?,
                    mask: text.mask.rows(start, n)?,
                    pooled: text.pooled.reshape(&[b, dim])?.rows(start, n)?,
                })
            }
        })
    }
}

/// The conditioning embedders of the model.
// One per model, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CondEmbedder {
    /// `y_embedder.embedding_table`.
    Class(LabelEmbedder),
    /// `y_embedder.y_proj` for cross-attention, `pooled_embedder` when the
    /// config adds the pooled text to `c`.
    Text {
        /// Projects text tokens to width d.
        caption: CaptionEmbedder,
        /// Pooled text -> `c` term.
        pooled: Option<PooledEmbedder>,
        /// Text encoder width.
        text_dim: usize,
    },
}

/// What a forward keeps and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Keep every block's activations for a backward (training). Without it
    /// the blocks share one set of buffers and attention keeps no probabilities.
    pub keep: bool,
    /// Download each MoE layer's routing statistics into [`ForwardOutput::routing`].
    pub stats: bool,
}

impl ForwardOptions {
    /// Inference: nothing kept, no statistics.
    pub fn inference() -> Self {
        Self::default()
    }

    /// Training: everything a backward reads is kept; no statistics.
    pub fn training() -> Self {
        Self {
            keep: true,
            stats: false,
        }
    }

    /// The same, with routing statistics.
    pub fn with_stats(self) -> Self {
        Self { stats: true, ..self }
    }
}

/// A forward's result.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// [B, C_out, H, W].
    pub out: Vec<f32>,
    /// Routing statistics of each MoE layer, `(block index, stats)` in block
    /// order, when asked for (guidance with separate routing calls lists the
    /// conditional pass's layers first, then the unconditional pass's).
    pub routing: Vec<(usize, RoutingStats)>,
}

/// Activations of a forward as backend tensors, reused across calls. With
/// [`ForwardOptions::keep`] everything a backward reads is here (one
/// [`BlockActs`] per block); without, `blocks` holds the one set all blocks
/// share, and `patch_embed` is not written.
#[derive(Debug, Default)]
pub struct ModelActs {
    /// [B, C, H, W] uploaded input images (f32).
    pub x_in: Act,
    /// [B] uploaded timesteps (f32).
    pub t_in: Act,
    /// [B] uploaded class labels (u32).
    pub labels: Act,
    /// [B, L, text_dim] uploaded text tokens.
    pub text_tokens: Act,
    /// [B, L] uploaded text mask (u8).
    pub text_mask: Act,
    /// [B, text_dim] uploaded pooled text.
    pub text_pooled: Act,
    /// [B, T, C*p*p] patches.
    pub patches: Act,
    /// [B * T_kept] u32: the rows of the tokens that stay (training with token masking).
    pub kept: Act,
    /// [B, T, d] every token's embedding before the masked ones leave (token masking only).
    pub x_all: Act,
    /// Timestep embedding internals; `t.emb` [B, d].
    pub t: TimestepActs,
    /// [B, d] class embedding (class-conditional models).
    pub y_emb: Act,
    /// Pooled-text embedder internals; `pooled.emb` is the text term of `c`.
    pub pooled: PooledActs,
    /// Caption projection internals; `caption.out` [B, L, d].
    pub caption: CaptionActs,
    /// [B, d] conditioning vector `t_emb + y_emb`.
    pub c: Act,
    /// [B, d] SiLU(c), what every adaLN reads.
    pub silu_c: Act,
    /// Per block when kept, else one shared entry.
    pub blocks: Vec<BlockActs>,
    /// [B, T, d] residual stream (after the last block at the end).
    pub x: Act,
    /// Final layer internals.
    pub final_layer: FinalActs,
    /// [B, C_out, H, W] the prediction, on the backend.
    pub img: Act,
    /// [2N, C_out, H, W] guidance's separate passes, on the backend.
    pub guided: Act,
}

impl ModelActs {
    /// The last forward's prediction [B, C_out, H, W], on the backend.
    pub fn prediction(&self) -> Result<TensorRef<'_>, EngineError> {
        self.img.view()
    }

    /// The last forward's prediction in patch rows [B, T, p*p*C_out]
    /// (index `(pi * p + qi) * C_out + ch`), on the backend; after a
    /// training forward with token masking, the kept tokens' rows only.
    pub fn patch_prediction(&self) -> Result<TensorRef<'_>, EngineError> {
        self.final_layer.out.view()
    }

    /// Bytes of backend memory the activations hold (allocated sizes).
    pub fn bytes(&self) -> usize {
        let acts = [
            &self.x_in,
            &self.t_in,
            &self.labels,
            &self.text_tokens,
            &self.text_mask,
            &self.text_pooled,
            &self.patches,
            &self.kept,
            &self.x_all,
            &self.y_emb,
            &self.c,
            &self.silu_c,
            &self.x,
            &self.img,
            &self.guided,
            &self.pooled.hidden,
            &self.pooled.hidden_act,
            &self.pooled.emb,
            &self.caption.hidden,
            &self.caption.hidden_act,
            &self.caption.out,
        ]
        .iter()
        .map(|a| a.bytes())
        .sum::<usize>();
        acts + self.t.bytes() + self.final_layer.bytes() + self.blocks.iter().map(BlockActs::bytes).sum::<usize>()
    }
}

/// The model: config, parameters and the backend it computes on.
pub struct Model {
    config: ModelConfig,
    backend: Arc<dyn Backend>,
    dtype: DType,
    /// `x_embedder.proj`: [d, C, p, p] (used as [d, C*p*p]).
    pub x_embedder: Linear,
    /// `pos_embed`: [1, T, d] fixed sin-cos table (`Init::Fixed`).
    pub pos_embed: Param,
    /// `t_embedder`.
    pub t_embedder: TimestepEmbedder,
    /// `y_embedder` (and `pooled_embedder`).
    pub cond: CondEmbedder,
    /// `blocks.{i}`.
    pub blocks: Vec<Block>,
    /// `final_layer`.
    pub final_layer: FinalLayer,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config.name)
            .field("backend", &self.backend.name())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Model {
    /// A freshly initialised f32 model (DiT's `initialize_weights`),
    /// deterministic in `seed`. Routers and experts come from `registry` by
    /// the config's specs; a router that cannot route the config's images
    /// (e.g. `{"tokens": N}` groups that are not whole images) is an error here.
    pub fn new(config: ModelConfig, registry: &Registry, backend: Arc<dyn Backend>, seed: u64) -> ModelResult<Self> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let be = backend.as_ref();
        let dtype = DType::F32;
        let c = &config;
        let (d, p) = (c.hidden, c.patch_size);
        let text_dim = match c.conditioning {
            Conditioning::Text { text_dim, .. } => Some(text_dim),
            Conditioning::Class { .. } => None,
        };
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let ffn = match &c.moe {
                Some(moe) if moe.is_moe_block(i) => {
                    let layer = MoeFfn::new(be, &format!("blocks.{i}.moe"), d, moe, registry, dtype, &mut rng)?;
                    layer.layer.router.check_tokens_per_sample(c.tokens())?;
                    Ffn::Moe(layer)
                }
                _ => Ffn::Dense(Mlp::new(be, &format!("blocks.{i}.mlp"), d, c.mlp_hidden(), dtype)?),
            };
            blocks.push(Block::new(
                be,
                i,
                d,
                c.heads,
                c.kv_heads,
                text_dim.is_some(),
                ffn,
                dtype,
            )?);
        }
        let cond = match c.conditioning {
            Conditioning::Class { num_classes, .. } => {
                CondEmbedder::Class(LabelEmbedder::new(be, num_classes, d, dtype)?)
            }
            Conditioning::Text { text_dim, pooled, .. } => CondEmbedder::Text {
                caption: CaptionEmbedder::new(be, d, text_dim, dtype)?,
                pooled: pooled
                    .then(|| PooledEmbedder::new(be, d, text_dim, dtype))
                    .transpose()?,
                text_dim,
            },
        };
        let tokens = c.tokens();
        let mut pos_embed = Param::new(be, "pos_embed", &[1, tokens, d], dtype, Layout::AsStored, Init::Fixed)?;
        pos_embed.load(be, &sincos_2d(d, c.input_size / p))?;
        let mut model = Self {
            x_embedder: patch_embed::patch_embedder(be, d, c.in_channels, p, dtype)?,
            pos_embed,
            t_embedder: TimestepEmbedder::new(be, d, dtype)?,
            cond,
            blocks,
            final_layer: FinalLayer::new(be, d, p * p * c.out_channels(), dtype)?,
            dtype,
            backend: backend.clone(),
            config,
        };
        // Dense parameters draw after the MoE layers, in this order, as
        // seeded models always did.
        let mut dense = Vec::new();
        model.collect_dense_mut(&mut dense);
        for param in dense {
            param.initialise(backend.as_ref(), &mut rng)?;
        }
        Ok(model)
    }

    /// A model with `config` whose weights all come from `weights` (upstream
    /// DiT names; see docs/WEIGHTS.md). Errors name any missing, misshapen or
    /// unreadable tensor, and list tensors the model did not use unless they
    /// start with one of `allow_unused`. `pos_embed` is optional (the fixed
    /// table); a file's table that differs from it is used, with a warning.
    pub fn from_weights(
        config: ModelConfig,
        registry: &Registry,
        backend: Arc<dyn Backend>,
        weights: &Weights,
        allow_unused: &[&str],
    ) -> ModelResult<Self> {
        let _span = tracing::info_span!("load weights", path = %weights.path().display()).entered();
        // Every tensor the config needs is in the file, of its shape, before
        // anything is allocated: a header cannot make us allocate more than
        // the file holds.
        config.validate()?;
        for (name, shape) in crate::info::param_shapes_with(registry, &config)? {
            if crate::info::FIXED_PARAMS.contains(&name.as_str()) {
                continue;
            }
            match weights.shape(&name) {
                None => {
                    return Err(WeightsError::Missing {
                        path: weights.path().to_path_buf(),
                        name,
                        expected: shape,
                    }
                    .into())
                }
                Some(found) if found != shape => {
                    return Err(WeightsError::Shape {
                        path: weights.path().to_path_buf(),
                        name,
                        expected: shape,
                        found,
                    }
                    .into())
                }
                Some(_) => {}
            }
        }
        let mut model = Self::new(config, registry, backend.clone(), 0)?;
        let (t, d, grid) = (
            model.config.tokens(),
            model.config.hidden,
            model.config.input_size / model.config.patch_size,
        );
        for param in model.params_mut() {
            if param.init == Init::Fixed {
                continue;
            }
            weights.load_param(backend.as_ref(), param)?;
        }
        if weights.contains("pos_embed") {
            let table = weights.get("pos_embed", &[1, t, d])?;
            let diff = table
                .iter()
                .zip(&sincos_2d(d, grid))
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            // A table stored in bf16 is the fixed one rounded: up to 2^-9 of |v| <= 1.
            let allowed = if weights.dtype("pos_embed").as_deref() == Some("BF16") {
                1.0 / 512.0
            } else {
                1e-5
            };
            if diff > allowed {
                tracing::warn!(
                    max_abs_diff = diff,
                    "pos_embed in {} differs from the fixed 2-D sin-cos table; using the file's",
                    weights.path().display()
                );
            }
            model.pos_embed.load(backend.as_ref(), &table)?;
        }
        weights.check_all_used(allow_unused)?;
        Ok(model)
    }

    /// Loads a file written by [`Model::save`]: the config from its metadata,
    /// then every weight, refusing unused tensors.
    pub fn load(path: impl AsRef<Path>, registry: &Registry, backend: Arc<dyn Backend>) -> ModelResult<Self> {
        let weights = Weights::open(path)?;
        let config = config_from_metadata(&weights)?;
        let mut model = Self::from_weights(config, registry, backend, &weights, &[])?;
        // A model saved in bf16 comes back in bf16 (files without the key are f32).
        if let Some(name) = weights.metadata(DTYPE_KEY) {
            let dtype = DType::parse_float(name).ok_or_else(|| WeightsError::Metadata {
                path: weights.path().to_path_buf(),
                key: DTYPE_KEY.into(),
                reason: format!("'{name}' is not a model dtype (f32 or bf16)"),
            })?;
            model.to_dtype(dtype)?;
        }
        Ok(model)
    }

    /// Writes every parameter under its upstream name and layout, in its
    /// dtype (`pos_embed` [1, T, d] included), and the config JSON in the
    /// metadata key `config`; atomically (temp + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> ModelResult<()> {
        let json = serde_json::to_string(&self.config)
            .map_err(|e| EngineError::Other(format!("cannot serialise the model config: {e}")))?;
        let metadata = HashMap::from([
            (CONFIG_KEY.to_string(), json),
            (DTYPE_KEY.to_string(), self.dtype.name().to_string()),
            ("format".to_string(), "ecdit".to_string()),
        ]);
        save_params(path, self.backend.as_ref(), &self.params(), Vec::new(), metadata)?;
        Ok(())
    }

    /// Converts every parameter to `dtype` (f32 or bf16, where the backend
    /// supports it); activations follow. bf16 rounds to nearest even.
    pub fn to_dtype(&mut self, dtype: DType) -> ModelResult<()> {
        if !dtype.is_float() || !self.backend.supports(dtype) {
            return Err(EngineError::param(
                format!("model '{}'", self.config.name),
                "dtype",
                dtype,
                format!("backend '{}' cannot store model tensors in it", self.backend.name()),
            )
            .into());
        }
        if dtype == self.dtype {
            return Ok(());
        }
        let backend = self.backend.clone();
        // Router weights stay f32: router math is f32 whatever the model's
        // dtype (EC-DIT.md section 6).
        let routers: Vec<String> = self
            .blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                Ffn::Moe(moe) => Some(moe.layer.w_router.name.clone()),
                Ffn::Dense(_) => None,
            })
            .collect();
        for p in self.params_mut() {
            if routers.contains(&p.name) {
                continue;
            }
            // Converted on the backend (`copy` rounds f32 to bf16), no transfer.
            let mut converted = backend.zeros(&p.memory_shape(), dtype)?;
            backend.copy(converted.view_mut(), p.tensor.view())?;
            p.tensor = converted;
        }
        self.dtype = dtype;
        Ok(())
    }

    /// Storage dtype of parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every stored tensor `(name, on-disk shape)` in [`Model::params`] order
    /// (`pos_embed` last). `ecdit info` counts parameters from the same names.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.params()
            .into_iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    /// Trainable parameter count (every parameter but the fixed `pos_embed`).
    pub fn num_params(&self) -> usize {
        self.params()
            .iter()
            .filter(|p| p.init != Init::Fixed)
            .map(|p| p.numel())
            .sum()
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, shared.
    pub fn backend_arc(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Every parameter, in a fixed order: embeddings, blocks (MoE routers and
    /// experts in their block), final layer, `pos_embed` (`Init::Fixed`) last.
    pub fn params(&self) -> Vec<&Param> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    /// Every parameter, mutably, in the order of [`Model::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut out = Vec::new();
        self.collect_mut(&mut out);
        out
    }

    /// The prediction with fresh buffers: an inference forward with routing
    /// statistics. A caller that runs many forwards keeps a [`ModelActs`]
    /// and calls [`Model::forward`].
    pub fn predict(&self, x: &[f32], t: &[f32], cond: Condition<'_>) -> ModelResult<ForwardOutput> {
        self.forward(
            &mut ModelActs::default(),
            x,
            t,
            cond,
            ForwardOptions::inference().with_stats(),
        )
    }

    /// The model's prediction for `x` at times `t` under `cond`.
    /// acts: reused buffers (kept for backward with `opts.keep`);
    /// x: [B, C, H, W]; t: [B]; returns out: [B, C_out, H, W] (one download)
    /// and, with `opts.stats`, each MoE layer's routing statistics.
    pub fn forward(
        &self,
        acts: &mut ModelActs,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
        opts: ForwardOptions,
    ) -> ModelResult<ForwardOutput> {
        let routings = self.forward_on(acts, x, t, cond, opts.keep, None)?;
        let out = self.backend.read_f32(acts.img.view()?)?;
        Ok(ForwardOutput {
            out,
            routing: self.routing_stats(&routings, opts.stats)?,
        })
    }

    /// Downloads the statistics of `routings` when `stats`, else none.
    fn routing_stats(
        &self,
        routings: &[(usize, Arc<DeviceRouting>)],
        stats: bool,
    ) -> ModelResult<Vec<(usize, RoutingStats)>> {
        if !stats {
            return Ok(Vec::new());
        }
        routings
            .iter()
            .map(|(i, r)| Ok((*i, r.stats(self.backend.as_ref())?)))
            .collect()
    }

    /// The forward of an image already on the backend (a sampler keeps its
    /// `x` there from step to step): x: [B, C, H, W] on this model's backend;
    /// t: [B] and the condition are uploaded; the prediction stays on the
    /// backend in [`ModelActs::prediction`]. Returns each MoE layer's routing
    /// statistics with `opts.stats`. No download otherwise.
    pub fn forward_device(
        &self,
        acts: &mut ModelActs,
        x: TensorRef<'_>,
        t: &[f32],
        cond: Condition<'_>,
        opts: ForwardOptions,
    ) -> ModelResult<Vec<(usize, RoutingStats)>> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let b = t.len();
        x.expect_len(
            "model forward",
            "x [B, C, H, W] with B = t.len()",
            b * c.in_channels * c.input_size * c.input_size,
        )?;
        check_finite("model forward: timesteps t", t)?;
        acts.x_in
            .ensure(be, &[b, c.in_channels, c.input_size, c.input_size], DType::F32)?;
        be.copy(acts.x_in.view_mut()?, x)?;
        let routings = self.forward_inputs(acts, t, cond, opts.keep, None)?;
        self.routing_stats(&routings, opts.stats)
    }

    /// The forward on the backend: uploads the inputs, leaves the prediction
    /// in `acts.img` (or, with `kept` tokens, in patch rows); returns each MoE
    /// block's routing.
    fn forward_on(
        &self,
        acts: &mut ModelActs,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
        keep: bool,
        kept: Option<&[u32]>,
    ) -> ModelResult<Vec<(usize, Arc<DeviceRouting>)>> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let b = self.check_inputs(x, t)?;
        acts.x_in
            .ensure(be, &[b, c.in_channels, c.input_size, c.input_size], DType::F32)?;
        be.write_f32(acts.x_in.view_mut()?, x)?;
        self.forward_inputs(acts, t, cond, keep, kept)
    }

    /// The training forward: keeps everything [`Model::backward`] reads and
    /// leaves the prediction in patch rows ([`ModelActs::patch_prediction`]).
    /// kept: token masking, per sample the indices of the tokens that stay
    /// ([B, T_kept] row-major, each below T): the others leave before the
    /// first block, so attention and the routers see only the kept tokens
    /// (expert choice's capacity follows from T_kept).
    /// Returns each MoE block's routing (statistics, auxiliary losses).
    pub fn forward_train(
        &self,
        acts: &mut ModelActs,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
        kept: Option<&[u32]>,
    ) -> ModelResult<Vec<(usize, Arc<DeviceRouting>)>> {
        self.forward_on(acts, x, t, cond, true, kept)
    }

    /// Checks kept token indices and uploads them as global rows; returns T_kept.
    fn upload_kept(&self, acts: &mut ModelActs, kept: &[u32], b: usize) -> ModelResult<usize> {
        let tokens = self.config.tokens();
        let per = kept.len() / b.max(1);
        if b == 0 || per == 0 || per * b != kept.len() || per > tokens {
            return Err(EngineError::shape(
                "token masking",
                format!("B x T_kept indices with B = {b} and 0 < T_kept <= {tokens}"),
                format!("{} indices", kept.len()),
            )
            .into());
        }
        if let Some(&bad) = kept.iter().find(|&&i| i as usize >= tokens) {
            return Err(EngineError::shape("token masking (index)", format!("below {tokens}"), bad).into());
        }
        for block in &self.blocks {
            if let Ffn::Moe(moe) = &block.ffn {
                moe.layer.router.check_tokens_per_sample(per)?;
            }
        }
        let rows: Vec<u32> = kept
            .iter()
            .enumerate()
            .map(|(i, &k)| ((i / per) * tokens) as u32 + k)
            .collect();
        acts.kept.ensure(self.backend.as_ref(), &[rows.len()], DType::U32)?;
        self.backend
            .upload(acts.kept.view_mut()?, bytemuck::cast_slice(&rows))?;
        Ok(per)
    }

    /// The forward from `acts.x_in` (the image, on the backend) and the host
    /// `t` and condition (uploaded here); leaves the prediction in `acts.img`.
    fn forward_inputs(
        &self,
        acts: &mut ModelActs,
        t: &[f32],
        cond: Condition<'_>,
        keep: bool,
        kept: Option<&[u32]>,
    ) -> ModelResult<Vec<(usize, Arc<DeviceRouting>)>> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let dtype = self.dtype;
        let (d, p, size) = (c.hidden, c.patch_size, c.input_size);
        let b = t.len();
        let all_tokens = c.tokens();
        let rows = b * all_tokens;
        let kept_tokens = match kept {
            Some(kept) => Some(self.upload_kept(acts, kept, b)?),
            None => None,
        };

        // Inputs, one upload each (the image is already in `acts.x_in`).
        acts.t_in.ensure(be, &[b], DType::F32)?;
        be.write_f32(acts.t_in.view_mut()?, t)?;
        let text_len = self.upload_condition(acts, cond, b)?;

        // x = x_embedder(patchify(x)) + pos_embed
        let patch = c.in_channels * p * p;
        acts.patches.ensure(be, &[b, all_tokens, patch], dtype)?;
        be.patchify(
            acts.patches.view_mut()?,
            acts.x_in.view()?,
            patch_dims(b, c.in_channels, size, p, false),
        )?;
        // With token masking every token is embedded, then the kept ones gather.
        let embedded = if kept_tokens.is_some() {
            &mut acts.x_all
        } else {
            &mut acts.x
        };
        embedded.ensure(be, &[b, all_tokens, d], dtype)?;
        self.x_embedder
            .forward(be, embedded.view_mut()?, acts.patches.view()?, rows)?;
        let table = self.pos_embed.tensor.view().reshape(&[all_tokens * d])?;
        be.add_broadcast(embedded.view_mut()?.reshape(&[rows * d])?, table)?;
        let tokens = kept_tokens.unwrap_or(all_tokens);
        if kept_tokens.is_some() {
            acts.x.ensure(be, &[b, tokens, d], dtype)?;
            be.gather_rows(acts.x.view_mut()?, acts.x_all.view()?, acts.kept.view()?, d)?;
        }

        // c = t_embedder(t) + y_embedder(cond); silu_c = SiLU(c)
        self.embed_condition(acts, b, text_len)?;

        // blocks
        let wanted = if keep { c.depth } else { 1 };
        acts.blocks.resize_with(wanted, BlockActs::default);
        acts.blocks.truncate(wanted);
        let mut routing = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = if keep { i } else { 0 };
            let text = match text_len {
                Some(len) => Some(TextContext {
                    tokens: acts.caption.out.view()?,
                    mask: acts.text_mask.view()?,
                    len,
                }),
                None => None,
            };
            let r = block.forward(
                be,
                &mut acts.blocks[slot],
                keep,
                acts.x.view_mut()?,
                acts.silu_c.view()?,
                text,
                b,
                tokens,
                dtype,
            )?;
            if let Some(r) = r {
                routing.push((i, r));
            }
        }

        // out = unpatchify(final_layer(x, c)). At inference the blocks'
        // [B, T, d] buffers are free and serve the final layer.
        let shared = !keep;
        if shared {
            swap_final_scratch(&mut acts.final_layer, &mut acts.blocks[0]);
        }
        let result = self.final_layer.forward(
            be,
            &mut acts.final_layer,
            acts.x.view()?,
            acts.silu_c.view()?,
            b,
            tokens,
            dtype,
        );
        if shared {
            swap_final_scratch(&mut acts.final_layer, &mut acts.blocks[0]);
        }
        result?;
        if kept_tokens.is_some() {
            // Only the kept tokens have a prediction: it stays in patch rows.
            return Ok(routing);
        }
        let out_ch = c.out_channels();
        acts.img.ensure(be, &[b, out_ch, size, size], DType::F32)?;
        be.unpatchify(
            acts.img.view_mut()?,
            acts.final_layer.out.view()?,
            patch_dims(b, out_ch, size, p, true),
        )?;
        Ok(routing)
    }

    /// Checks x and t; returns the batch size B = t.len().
    fn check_inputs(&self, x: &[f32], t: &[f32]) -> ModelResult<usize> {
        let c = &self.config;
        let b = t.len();
        check_len(
            "model forward",
            "x [B, C, H, W] with B = t.len()",
            x.len(),
            b * c.in_channels * c.input_size * c.input_size,
        )?;
        check_finite("model forward: timesteps t", t)?;
        check_finite("model forward: input x", x)?;
        Ok(b)
    }

    /// Checks the condition against the model and the batch, and uploads it
    /// (labels, or text tokens, mask and pooled text). Returns the text length.
    fn upload_condition(&self, acts: &mut ModelActs, cond: Condition<'_>, b: usize) -> ModelResult<Option<usize>> {
        let be = self.backend.as_ref();
        match (&self.cond, cond) {
            (CondEmbedder::Class(table), Condition::Class(labels)) => {
                check_len("model forward", "class labels [B]", labels.len(), b)?;
                table.check(labels)?;
                acts.labels.ensure(be, &[b], DType::U32)?;
                be.upload(acts.labels.view_mut()?, bytemuck::cast_slice(labels))?;
                Ok(None)
            }
            (CondEmbedder::Text { text_dim, .. }, Condition::Text(text)) => {
                text.check(*text_dim)?;
                check_len("model forward", "text prompts [B]", text.batch, b)?;
                acts.text_tokens.ensure(be, &[b, text.len, text.dim], self.dtype)?;
                be.write_f32(acts.text_tokens.view_mut()?, text.tokens)?;
                acts.text_mask.ensure(be, &[b, text.len], DType::U8)?;
                be.upload(acts.text_mask.view_mut()?, text.mask)?;
                acts.text_pooled.ensure(be, &[b, text.dim], self.dtype)?;
                be.write_f32(acts.text_pooled.view_mut()?, text.pooled)?;
                Ok(Some(text.len))
            }
            (CondEmbedder::Text { text_dim, .. }, Condition::Encoded(text)) => {
                let (tb, len) = text.dims(*text_dim)?;
                check_len("model forward", "text prompts [B]", tb, b)?;
                acts.text_tokens.ensure(be, &[b, len, *text_dim], self.dtype)?;
                be.copy(acts.text_tokens.view_mut()?, text.tokens.reshape(&[b, len, *text_dim])?)?;
                acts.text_mask.ensure(be, &[b, len], DType::U8)?;
                be.copy(acts.text_mask.view_mut()?, text.mask)?;
                acts.text_pooled.ensure(be, &[b, *text_dim], self.dtype)?;
                be.copy(acts.text_pooled.view_mut()?, text.pooled.reshape(&[b, *text_dim])?)?;
                Ok(Some(len))
            }
            (CondEmbedder::Class(_), Condition::Text(_) | Condition::Encoded(_)) => {
                Err(EngineError::Other("this model is class-conditional; it was given text".into()).into())
            }
            (CondEmbedder::Text { .. }, Condition::Class(_)) => {
                Err(EngineError::Other("this model is text-conditional; it was given class labels".into()).into())
            }
        }
    }

    /// c = t_embedder(t) + y_embedder(cond), silu_c = SiLU(c), and the
    /// projected caption for text models (inputs already uploaded).
    fn embed_condition(&self, acts: &mut ModelActs, b: usize, text_len: Option<usize>) -> ModelResult<()> {
        let be = self.backend.as_ref();
        let (d, dtype) = (self.config.hidden, self.dtype);
        self.t_embedder.forward(be, &mut acts.t, acts.t_in.view()?, dtype)?;
        acts.c.ensure(be, &[b, d], dtype)?;
        acts.silu_c.ensure(be, &[b, d], dtype)?;
        be.copy(acts.c.view_mut()?, acts.t.emb.view()?)?;
        match &self.cond {
            CondEmbedder::Class(table) => {
                acts.y_emb.ensure(be, &[b, d], dtype)?;
                table.forward(be, acts.y_emb.view_mut()?, acts.labels.view()?)?;
                // c = 1 * y_emb + 1 * t_emb: the plain sum.
                be.axpby(acts.c.view_mut()?, 1.0, acts.y_emb.view()?, 1.0)?;
            }
            CondEmbedder::Text { caption, pooled, .. } => {
                let len = text_len.unwrap_or(0);
                caption.forward(be, &mut acts.caption, acts.text_tokens.view()?, b, len, dtype)?;
                if let Some(pooled) = pooled {
                    pooled.forward(be, &mut acts.pooled, acts.text_pooled.view()?, b, dtype)?;
                    be.axpby(acts.c.view_mut()?, 1.0, acts.pooled.emb.view()?, 1.0)?;
                }
            }
        }
        be.unary(Unary::Silu, acts.silu_c.view_mut()?, acts.c.view()?)?;
        Ok(())
    }

    /// Parameters initialised by drawing after construction (all but the MoE
    /// layers, which draw when built, and the fixed `pos_embed`).
    fn collect_dense_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.x_embedder.collect_mut(out);
        self.t_embedder.collect_mut(out);
        self.cond.collect_mut(out);
        for block in &mut self.blocks {
            block.collect_dense_mut(out);
        }
        self.final_layer.collect_mut(out);
    }
}

/// Swaps the final layer's two [B, T, d] buffers with the shared block
/// buffers (inference: the blocks are done with them).
fn swap_final_scratch(fin: &mut FinalActs, block: &mut BlockActs) {
    std::mem::swap(&mut fin.ln, &mut block.ln1);
    std::mem::swap(&mut fin.modulated, &mut block.attn_in);
}

impl Params for CondEmbedder {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        match self {
            CondEmbedder::Class(table) => table.collect(out),
            CondEmbedder::Text { caption, pooled, .. } => {
                caption.collect(out);
                if let Some(p) = pooled {
                    p.collect(out);
                }
            }
        }
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        match self {
            CondEmbedder::Class(table) => table.collect_mut(out),
            CondEmbedder::Text { caption, pooled, .. } => {
                caption.collect_mut(out);
                if let Some(p) = pooled {
                    p.collect_mut(out);
                }
            }
        }
    }
}

impl Params for Model {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.x_embedder.collect(out);
        self.t_embedder.collect(out);
        self.cond.collect(out);
        for block in &self.blocks {
            block.collect(out);
        }
        self.final_layer.collect(out);
        out.push(&self.pos_embed);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.x_embedder.collect_mut(out);
        self.t_embedder.collect_mut(out);
        self.cond.collect_mut(out);
        for block in &mut self.blocks {
            block.collect_mut(out);
        }
        self.final_layer.collect_mut(out);
        out.push(&mut self.pos_embed);
    }
}

/// Reads the model config from a file's metadata key `config`: this crate's
/// [`ModelConfig`] JSON, or upstream DiT's config JSON (`hidden_size`, ...).
pub fn config_from_metadata(weights: &Weights) -> ModelResult<ModelConfig> {
    let bad = |reason: String| WeightsError::Metadata {
        path: weights.path().to_path_buf(),
        key: CONFIG_KEY.into(),
        reason,
    };
    let json = weights
        .metadata(CONFIG_KEY)
        .ok_or_else(|| bad("missing: the file does not say which model it holds".into()))?;
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    if value.get("hidden_size").is_some() {
        return Ok(ModelConfig::from_upstream_dit(&value)?);
    }
    let config: ModelConfig = serde_json::from_value(value).map_err(|e| bad(format!("not a model config: {e}")))?;
    Ok(config)
}
