//! The EC-DiT model: DiT's embeddings, blocks with adaLN-Zero self-attention,
//! optional text cross-attention and a dense or MoE feed-forward, and DiT's
//! final layer (EC-DIT.md section 3).
//!
//! ```text
//! x [B, C, H, W] -> patchify -> x_embedder + pos      tokens [B, T, d]
//! t [B] -> 256 freqs [cos | sin] -> Linear-SiLU-Linear          t_emb [B, d]
//! class -> table | pooled text -> Linear-SiLU-Linear            y_emb [B, d]
//! c = t_emb + y_emb
//! blocks(tokens, SiLU(c), text) -> final_layer -> unpatchify    out [B, C_out, H, W]
//! ```
//!
//! Parameters live in named structs (one file per layer), each a [`Param`]
//! with its upstream dotted name; activations in matching `*Acts` structs, so
//! a backward can read exactly what the forward kept. The inference forward
//! ([`Model::forward_with`], inference.rs) runs the same ops in a few shared
//! buffers ([`InferenceBuffers`]) and keeps none of that.

mod adaln;
mod attention;
mod block;
mod buffer;
mod cross_attention;
mod error;
mod final_layer;
mod guidance;
mod inference;
mod label_embed;
mod linear;
mod mlp;
mod moe_ffn;
mod param;
mod patch_embed;
mod pos_embed;
mod text_embed;
mod timestep;

pub use adaln::{gated_residual, modulate, modulate_in_place, Chunk, LN_EPS};
pub use attention::{AttentionActs, QkvProjection, SelfAttention};
pub use block::{Block, BlockActs, BlockScratch, Ffn, TextContext};
pub use cross_attention::{CrossAttention, CrossAttentionActs};
pub use error::{ModelError, ModelResult};
pub use final_layer::{FinalActs, FinalLayer};
pub use guidance::{CfgChannels, CfgOptions};
pub use inference::InferenceBuffers;
pub use label_embed::LabelEmbedder;
pub use linear::Linear;
pub use mlp::{Mlp, MlpActs};
pub use moe_ffn::MoeFfn;
pub use param::{Init, Param, Params};
pub use patch_embed::{patchify, unpatchify};
pub use pos_embed::sincos_2d;
pub use text_embed::{CaptionActs, CaptionEmbedder, PooledActs, PooledEmbedder, TextInput};
pub use timestep::{timestep_frequencies, TimestepActs, TimestepEmbedder, FREQ_DIM};

use crate::config::{Conditioning, ModelConfig};
use crate::weights::{save_safetensors, Weights, WeightsError};
use buffer::resize;
use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::{Backend, EngineError, Registry, RoutingStats, Unary};
use rand::SeedableRng;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Metadata key holding the model config (JSON) in saved files.
pub const CONFIG_KEY: &str = "config";

/// How the model is conditioned, per sample.
#[derive(Clone, Copy, Debug)]
pub enum Condition<'a> {
    /// Class ids [B]; the null class (`num_classes`) is the unconditional one.
    Class(&'a [u32]),
    /// Encoded prompts (B of them).
    Text(TextInput<'a>),
}

impl<'a> Condition<'a> {
    /// Samples `start..start + n`.
    pub fn slice(&self, start: usize, n: usize) -> Condition<'a> {
        match self {
            Condition::Class(labels) => Condition::Class(&labels[start..start + n]),
            Condition::Text(text) => Condition::Text(text.slice(start, n)),
        }
    }
}

/// The conditioning embedders of the model.
// One per model, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
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

/// A forward's result.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// [B, C_out, H, W].
    pub out: Vec<f32>,
    /// Routing statistics of each MoE layer, `(block index, stats)` in block
    /// order (guidance with separate routing calls lists the conditional
    /// pass's layers first, then the unconditional pass's).
    pub routing: Vec<(usize, RoutingStats)>,
}

/// Everything one forward computes, kept for backward (and for locating
/// mismatches against reference intermediates).
#[derive(Clone, Debug, Default)]
pub struct ModelActs {
    /// [B, T, C*p*p] patches.
    pub patches: Vec<f32>,
    /// [B, T, d] patch embedding, before the position table.
    pub patch_embed: Vec<f32>,
    /// Timestep embedding internals; `t.emb` [B, d].
    pub t: TimestepActs,
    /// [B, d] class or pooled-text embedding (zeros for text without pooling).
    pub y_emb: Vec<f32>,
    /// Pooled-text embedder internals.
    pub pooled: PooledActs,
    /// Caption projection internals; `caption.out` [B, L, d].
    pub caption: CaptionActs,
    /// [B, d] conditioning vector `t_emb + y_emb`.
    pub c: Vec<f32>,
    /// [B, d] SiLU(c), what every adaLN reads.
    pub silu_c: Vec<f32>,
    /// Per block (one reused entry when activations are not kept).
    pub blocks: Vec<BlockActs>,
    /// [B, T, d] residual stream after the last block.
    pub x: Vec<f32>,
    /// Final layer internals.
    pub final_layer: FinalActs,
}

/// The model: config, parameters and the backend it computes on.
pub struct Model {
    config: ModelConfig,
    backend: Arc<dyn Backend>,
    /// `x_embedder.proj`: [d, C, p, p] (as [d, C*p*p]).
    pub x_embedder: Linear,
    /// `pos_embed`: [T, d] fixed sin-cos table (stored [1, T, d]).
    pub pos_embed: Vec<f32>,
    /// `t_embedder`.
    pub t_embedder: TimestepEmbedder,
    /// `y_embedder` (and `pooled_embedder`).
    pub cond: CondEmbedder,
    /// `blocks.{i}`.
    pub blocks: Vec<Block>,
    /// `final_layer`.
    pub final_layer: FinalLayer,
}

impl Model {
    /// A freshly initialised model (DiT's `initialize_weights`), deterministic
    /// in `seed`. Routers and experts come from `registry` by the config's specs.
    pub fn new(config: ModelConfig, registry: &Registry, backend: Arc<dyn Backend>, seed: u64) -> ModelResult<Self> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = &config;
        let (d, p) = (c.hidden, c.patch_size);
        let text_dim = match c.conditioning {
            Conditioning::Text { text_dim, .. } => Some(text_dim),
            Conditioning::Class { .. } => None,
        };
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let prefix = format!("blocks.{i}");
            let ffn = match &c.moe {
                Some(moe) if moe.is_moe_block(i) => {
                    Ffn::Moe(MoeFfn::new(&format!("{prefix}.moe"), d, moe, registry, &mut rng)?)
                }
                _ => Ffn::Dense(Mlp::new(&format!("{prefix}.mlp"), d, c.mlp_hidden())),
            };
            blocks.push(Block {
                index: i,
                adaln: block::block_adaln(i, d),
                attn: SelfAttention::new(&format!("{prefix}.attn"), d, c.heads, c.kv_heads),
                cross_attn: text_dim
                    .map(|_| CrossAttention::new(&format!("{prefix}.cross_attn"), d, c.heads, c.kv_heads)),
                ffn,
            });
        }
        let cond = match c.conditioning {
            Conditioning::Class { num_classes, .. } => CondEmbedder::Class(LabelEmbedder::new(num_classes, d)),
            Conditioning::Text { text_dim, pooled, .. } => CondEmbedder::Text {
                caption: CaptionEmbedder::new(d, text_dim),
                pooled: pooled.then(|| PooledEmbedder::new(d, text_dim)),
                text_dim,
            },
        };
        let mut model = Self {
            x_embedder: patch_embed::patch_embedder(d, c.in_channels, p),
            pos_embed: sincos_2d(d, c.input_size / p),
            t_embedder: TimestepEmbedder::new(d),
            cond,
            blocks,
            final_layer: FinalLayer::new(d, p * p * c.out_channels()),
            backend,
            config,
        };
        for param in model.params_mut() {
            param.initialise(&mut rng);
        }
        Ok(model)
    }

    /// A model with `config` whose weights all come from `weights` (upstream
    /// DiT names; see docs/WEIGHTS.md). Errors name any missing, misshapen or
    /// non-f32 tensor, and list tensors the model did not use unless they
    /// start with one of `allow_unused`.
    pub fn from_weights(
        config: ModelConfig,
        registry: &Registry,
        backend: Arc<dyn Backend>,
        weights: &Weights,
        allow_unused: &[&str],
    ) -> ModelResult<Self> {
        let _span = tracing::info_span!("load weights", path = %weights.path().display()).entered();
        let mut model = Self::new(config, registry, backend, 0)?;
        for param in model.params_mut() {
            param.data = weights.get(&param.name, &param.shape)?;
        }
        let root = weights.pp("");
        for block in &mut model.blocks {
            if let Ffn::Moe(moe) = &mut block.ffn {
                moe.load(&root)?;
            }
        }
        let (t, d) = (model.config.tokens(), model.config.hidden);
        if weights.contains("pos_embed") {
            let table = weights.get("pos_embed", &[1, t, d])?;
            let diff = table
                .iter()
                .zip(&model.pos_embed)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            if diff > 1e-5 {
                tracing::warn!(
                    max_abs_diff = diff,
                    "pos_embed in {} differs from the fixed 2-D sin-cos table; using the file's",
                    weights.path().display()
                );
            }
            model.pos_embed = table;
        }
        weights.check_all_used(allow_unused)?;
        Ok(model)
    }

    /// Loads a file written by [`Model::save`]: the config from its metadata,
    /// then every weight, refusing unused tensors.
    pub fn load(path: impl AsRef<Path>, registry: &Registry, backend: Arc<dyn Backend>) -> ModelResult<Self> {
        let weights = Weights::open(path)?;
        let config = config_from_metadata(&weights)?;
        Self::from_weights(config, registry, backend, &weights, &[])
    }

    /// Writes every weight under its upstream name, `pos_embed` [1, T, d], and
    /// the config JSON in the metadata key `config`; atomically (temp + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> ModelResult<()> {
        let json = serde_json::to_string(&self.config)
            .map_err(|e| EngineError::Other(format!("cannot serialise the model config: {e}")))?;
        let tensors = self.named_tensors();
        let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.as_ref()))
            .collect();
        let metadata = HashMap::from([
            (CONFIG_KEY.to_string(), json),
            ("format".to_string(), "ecdit".to_string()),
        ]);
        save_safetensors(path, &refs, metadata)?;
        Ok(())
    }

    /// Every stored tensor `(name, shape)` in file order: trainable parameters
    /// (dense ones, then each MoE layer's router and experts) and the fixed
    /// `pos_embed` last. `ecdit info` counts parameters from the same list.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.named_tensors().into_iter().map(|(n, s, _)| (n, s)).collect()
    }

    /// Trainable parameter count (everything in [`Model::param_shapes`] but `pos_embed`).
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .filter(|(n, _)| n != "pos_embed")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    fn named_tensors(&self) -> Vec<(String, Vec<usize>, Cow<'_, [f32]>)> {
        let mut out: Vec<_> = self
            .params()
            .into_iter()
            .map(|p| (p.name.clone(), p.shape.clone(), Cow::Borrowed(p.data.as_slice())))
            .collect();
        for block in &self.blocks {
            if let Ffn::Moe(moe) = &block.ffn {
                out.extend(moe.named_tensors());
            }
        }
        let (t, d) = (self.config.tokens(), self.config.hidden);
        out.push((
            "pos_embed".into(),
            vec![1, t, d],
            Cow::Borrowed(self.pos_embed.as_slice()),
        ));
        out
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Dense parameters in a fixed order (MoE layers hold their own).
    pub fn params(&self) -> Vec<&Param> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    /// Dense parameters, mutably, in the order of [`Model::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut out = Vec::new();
        self.collect_mut(&mut out);
        out
    }

    /// The model's prediction for `x` at times `t` under `cond`.
    /// x: [B, C, H, W]; t: [B]; returns out: [B, C_out, H, W] and routing stats.
    /// Inference memory: see [`Model::forward_with`] (same bits), whose
    /// buffers this allocates per call; a sampler should keep them instead.
    pub fn forward(&self, x: &[f32], t: &[f32], cond: Condition<'_>) -> ModelResult<ForwardOutput> {
        self.forward_with(&mut InferenceBuffers::default(), x, t, cond)
    }

    /// As [`Model::forward`], keeping every block's activations in `acts`
    /// (for backward, or to compare intermediates).
    pub fn forward_acts(
        &self,
        acts: &mut ModelActs,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
    ) -> ModelResult<ForwardOutput> {
        self.forward_into(acts, true, x, t, cond)
    }

    /// The forward into caller-owned activations (reused across calls).
    /// `keep_blocks`: one `BlockActs` per block, else one shared entry (the
    /// last block's). Everything a backward reads is kept either way; for
    /// inference use [`Model::forward_with`], which keeps none of it.
    pub fn forward_into(
        &self,
        acts: &mut ModelActs,
        keep_blocks: bool,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
    ) -> ModelResult<ForwardOutput> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let (d, p, size) = (c.hidden, c.patch_size, c.input_size);
        let b = self.check_inputs(x, t)?;
        let tokens = c.tokens();
        let rows = b * tokens;

        // tokens = x_embedder(patchify(x)) + pos_embed
        resize(&mut acts.patch_embed, rows * d);
        resize(&mut acts.x, rows * d);
        self.embed_patches(&mut acts.patch_embed, &mut acts.patches, x, b)?;
        acts.x.copy_from_slice(&acts.patch_embed);
        self.add_pos_embed(&mut acts.x);
        // c = t_embedder(t) + y_embedder(cond)
        let text_ctx = self.embed_condition(
            CondBuffers {
                t: &mut acts.t,
                y_emb: &mut acts.y_emb,
                pooled: &mut acts.pooled,
                caption: &mut acts.caption,
                c: &mut acts.c,
                silu_c: &mut acts.silu_c,
            },
            t,
            cond,
        )?;

        // blocks
        let wanted = if keep_blocks { c.depth } else { 1 };
        acts.blocks.resize_with(wanted, BlockActs::default);
        acts.blocks.truncate(wanted);
        let mut routing = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = if keep_blocks { i } else { 0 };
            let text = text_ctx.map(|(mask, len)| TextContext {
                tokens: &acts.caption.out,
                mask,
                len,
            });
            if let Some(stats) =
                block.forward(be, &mut acts.blocks[slot], &mut acts.x, &acts.silu_c, text, b, tokens)?
            {
                routing.push((i, stats));
            }
        }

        // out = unpatchify(final_layer(x, c))
        self.final_layer
            .forward(be, &mut acts.final_layer, &acts.x, &acts.silu_c, b, tokens)?;
        let mut out = vec![0.0; b * c.out_channels() * size * size];
        unpatchify(&mut out, &acts.final_layer.out, b, c.out_channels(), size, p);
        Ok(ForwardOutput { out, routing })
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

    /// out: [B, T, d] = x_embedder(patchify(x)); patches: resized scratch; x: [B, C, H, W].
    fn embed_patches(&self, out: &mut [f32], patches: &mut Vec<f32>, x: &[f32], b: usize) -> ModelResult<()> {
        let c = &self.config;
        let (p, ch) = (c.patch_size, c.in_channels);
        let rows = b * c.tokens();
        resize(patches, rows * ch * p * p);
        patchify(patches, x, b, ch, c.input_size, p);
        self.x_embedder.forward(self.backend.as_ref(), out, patches, rows)?;
        Ok(())
    }

    /// x: [B, T, d] += the position table, row by row.
    fn add_pos_embed(&self, x: &mut [f32]) {
        let table = self.pos_embed.as_slice();
        for sample in x.chunks_exact_mut(table.len()) {
            sample.iter_mut().zip(table).for_each(|(o, p)| *o += p);
        }
    }

    /// c = t_embedder(t) + y_embedder(cond), silu_c = SiLU(c), and the
    /// projected caption for text models. Returns the text mask and length
    /// the blocks' cross-attention reads.
    fn embed_condition<'c>(
        &self,
        buf: CondBuffers<'_>,
        t: &[f32],
        cond: Condition<'c>,
    ) -> ModelResult<Option<(&'c [u8], usize)>> {
        let be = self.backend.as_ref();
        let (b, d) = (t.len(), self.config.hidden);
        self.t_embedder.forward(be, buf.t, t)?;
        resize(buf.y_emb, b * d);
        let mut text_ctx = None;
        match (&self.cond, cond) {
            (CondEmbedder::Class(table), Condition::Class(labels)) => {
                check_len("model forward", "class labels [B]", labels.len(), b)?;
                table.forward(be, buf.y_emb, labels)?;
            }
            (
                CondEmbedder::Text {
                    caption,
                    pooled,
                    text_dim,
                },
                Condition::Text(text),
            ) => {
                text.check(*text_dim)?;
                check_len("model forward", "text prompts [B]", text.batch, b)?;
                caption.forward(be, buf.caption, text.tokens, b, text.len)?;
                match pooled {
                    Some(pooled) => {
                        pooled.forward(be, buf.pooled, text.pooled, b)?;
                        buf.y_emb.copy_from_slice(&buf.pooled.emb);
                    }
                    None => buf.y_emb.fill(0.0),
                }
                text_ctx = Some((text.mask, text.len));
            }
            (CondEmbedder::Class(_), Condition::Text(_)) => {
                return Err(EngineError::Other("this model is class-conditional; it was given text".into()).into())
            }
            (CondEmbedder::Text { .. }, Condition::Class(_)) => {
                return Err(
                    EngineError::Other("this model is text-conditional; it was given class labels".into()).into(),
                )
            }
        }
        resize(buf.c, b * d);
        resize(buf.silu_c, b * d);
        for ((o, te), ye) in buf.c.iter_mut().zip(&buf.t.emb).zip(buf.y_emb.iter()) {
            *o = te + ye;
        }
        be.unary(Unary::Silu, buf.silu_c, buf.c)?;
        Ok(text_ctx)
    }
}

/// Where [`Model::embed_condition`] writes (fields of either forward's buffers).
struct CondBuffers<'a> {
    t: &'a mut TimestepActs,
    y_emb: &'a mut Vec<f32>,
    pooled: &'a mut PooledActs,
    caption: &'a mut CaptionActs,
    c: &'a mut Vec<f32>,
    silu_c: &'a mut Vec<f32>,
}

impl Params for Model {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.x_embedder.collect(out);
        self.t_embedder.collect(out);
        match &self.cond {
            CondEmbedder::Class(table) => table.collect(out),
            CondEmbedder::Text { caption, pooled, .. } => {
                caption.collect(out);
                if let Some(p) = pooled {
                    p.collect(out);
                }
            }
        }
        for block in &self.blocks {
            block.collect(out);
        }
        self.final_layer.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.x_embedder.collect_mut(out);
        self.t_embedder.collect_mut(out);
        match &mut self.cond {
            CondEmbedder::Class(table) => table.collect_mut(out),
            CondEmbedder::Text { caption, pooled, .. } => {
                caption.collect_mut(out);
                if let Some(p) = pooled {
                    p.collect_mut(out);
                }
            }
        }
        for block in &mut self.blocks {
            block.collect_mut(out);
        }
        self.final_layer.collect_mut(out);
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
