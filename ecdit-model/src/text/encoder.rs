//! A small trainable transformer text encoder on the engine's backend ops.
//!
//! token embedding + learned positions -> `layers` pre-norm blocks
//! (`x += Attn(LN1(x))` with the padding mask on the keys, `x += MLP(LN2(x))`,
//! GELU-tanh MLP of width `mlp_ratio * dim`) -> final LayerNorm. The pooled
//! embedding is the mean over real (unmasked) tokens.
//!
//! Parameters are engine [`Param`]s listed through [`Params`], so loading,
//! saving and the model's parameter list walk them like any other. The
//! forward runs on backend tensors: token ids go up once as u32, everything
//! else stays on the backend (inference: attention keeps no probabilities).
//! Training (a forward that keeps activations, and the backward) is in
//! `encoder_train.rs`.

use super::tokenizer::{Tokenizer, Vocab};
use super::{TextBatch, TextEncoder, TextError};
use crate::config::{Conditioning, ModelConfig};
use crate::weights::{save_params, Weights, WeightsResult};
use ecdit_engine::{
    AttnDims, Backend, BackendExt, DType, EngineError, GemmDims, Init, Layout, Param, Params, Result, Tensor,
    TensorMut, TensorRef, Unary,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// LayerNorm epsilon (as CLIP/T5-style encoders use 1e-5).
pub(super) const LN_EPS: f32 = 1e-5;

/// Shape of the text encoder beyond its width and length (which the model's
/// `conditioning` sets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderConfig {
    /// Transformer blocks.
    #[serde(default = "default_layers")]
    pub layers: usize,
    /// Attention heads; default `max(1, dim / 64)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<usize>,
    /// MLP hidden width over `dim`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f32,
    /// Vocabulary file; default the built-in vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<PathBuf>,
}

fn default_layers() -> usize {
    2
}
fn default_mlp_ratio() -> f32 {
    4.0
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        Self {
            layers: default_layers(),
            heads: None,
            mlp_ratio: default_mlp_ratio(),
            vocab: None,
        }
    }
}

impl TextEncoderConfig {
    /// Heads for width `dim`.
    pub fn heads_for(&self, dim: usize) -> usize {
        self.heads.unwrap_or((dim / 64).max(1))
    }
    /// MLP hidden width for width `dim`.
    pub fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f32 * self.mlp_ratio) as usize
    }
    /// Loads the configured vocabulary.
    pub fn load_vocab(&self) -> Result<Vocab, TextError> {
        match &self.vocab {
            Some(path) => Vocab::from_path(path),
            None => Vocab::builtin(),
        }
    }
}

/// Every parameter of the encoder, by name (`text_encoder.*`) and shape on
/// disk, in the order [`Params::collect`] lists them and the seeded init draws.
pub fn param_shapes(cfg: &TextEncoderConfig, vocab: usize, dim: usize, max_tokens: usize) -> Vec<(String, Vec<usize>)> {
    let h = cfg.mlp_hidden(dim);
    let mut out = vec![
        ("text_encoder.token_embedding.weight".to_string(), vec![vocab, dim]),
        (
            "text_encoder.position_embedding.weight".to_string(),
            vec![max_tokens, dim],
        ),
    ];
    for i in 0..cfg.layers {
        let p = format!("text_encoder.layers.{i}");
        for (name, shape) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![h, dim]),
            ("mlp.fc1.bias", vec![h]),
            ("mlp.fc2.weight", vec![dim, h]),
            ("mlp.fc2.bias", vec![dim]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out.push(("text_encoder.final_norm.weight".to_string(), vec![dim]));
    out.push(("text_encoder.final_norm.bias".to_string(), vec![dim]));
    out
}

/// Parameters of one encoder block. Shapes are upstream (PyTorch `Linear`
/// `[out, in]`); every weight is held input-major, so `y = x W + b` reads it
/// as stored. The fused `qkv` is held as three input-major blocks `[3, D, D]`,
/// so each of q, k and v is its own product into its own attention input (no
/// splitting copy).
#[derive(Debug)]
pub struct LayerParams {
    /// [D]
    pub norm1_weight: Param,
    /// [D]
    pub norm1_bias: Param,
    /// [3D, D]; output channel `which * D + head * Dh + j` (q, k, v); held `[3, D, D]`.
    pub qkv_weight: Param,
    /// [3D]
    pub qkv_bias: Param,
    /// [D, D], input-major.
    pub proj_weight: Param,
    /// [D]
    pub proj_bias: Param,
    /// [D]
    pub norm2_weight: Param,
    /// [D]
    pub norm2_bias: Param,
    /// [Hm, D], input-major.
    pub fc1_weight: Param,
    /// [Hm]
    pub fc1_bias: Param,
    /// [D, Hm], input-major.
    pub fc2_weight: Param,
    /// [D]
    pub fc2_bias: Param,
}

/// All encoder parameters, in [`param_shapes`] order.
#[derive(Debug)]
pub struct TextEncoderParams {
    /// [V, D]
    pub token_embedding: Param,
    /// [max_tokens, D]
    pub position_embedding: Param,
    /// One per block.
    pub layers: Vec<LayerParams>,
    /// [D]
    pub final_norm_weight: Param,
    /// [D]
    pub final_norm_bias: Param,
}

/// Builds parameters on one backend in one dtype.
struct ParamMaker<'a> {
    backend: &'a dyn Backend,
    dtype: DType,
}

impl ParamMaker<'_> {
    fn make(&self, name: String, shape: &[usize], layout: Layout, init: Init) -> Result<Param> {
        Param::new(self.backend, name, shape, self.dtype, layout, init)
    }
    /// A Linear weight `[out, in]` with DiT's xavier init.
    fn weight(&self, name: String, out_f: usize, in_f: usize, layout: Layout) -> Result<Param> {
        let init = Init::XavierUniform {
            fan_in: in_f,
            fan_out: out_f,
        };
        self.make(name, &[out_f, in_f], layout, init)
    }
    fn zeros(&self, name: String, n: usize) -> Result<Param> {
        self.make(name, &[n], Layout::AsStored, Init::Zeros)
    }
    fn ones(&self, name: String, n: usize) -> Result<Param> {
        self.make(name, &[n], Layout::AsStored, Init::Ones)
    }
}

impl TextEncoderParams {
    /// Zero-filled parameters for `cfg` (fill them with [`TextEncoderParams::init`]
    /// or by loading a file).
    pub fn new(
        backend: &dyn Backend,
        dtype: DType,
        cfg: &TextEncoderConfig,
        vocab: usize,
        dim: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        let m = ParamMaker { backend, dtype };
        let embedding = |name: &str, rows: usize| {
            m.make(
                format!("text_encoder.{name}.weight"),
                &[rows, dim],
                Layout::AsStored,
                Init::Normal(0.02),
            )
        };
        let h = cfg.mlp_hidden(dim);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |name: &str| format!("text_encoder.layers.{i}.{name}");
            layers.push(LayerParams {
                norm1_weight: m.ones(p("norm1.weight"), dim)?,
                norm1_bias: m.zeros(p("norm1.bias"), dim)?,
                qkv_weight: m.weight(p("attn.qkv.weight"), 3 * dim, dim, Layout::InputMajorChunks(3))?,
                qkv_bias: m.zeros(p("attn.qkv.bias"), 3 * dim)?,
                proj_weight: m.weight(p("attn.proj.weight"), dim, dim, Layout::InputMajor)?,
                proj_bias: m.zeros(p("attn.proj.bias"), dim)?,
                norm2_weight: m.ones(p("norm2.weight"), dim)?,
                norm2_bias: m.zeros(p("norm2.bias"), dim)?,
                fc1_weight: m.weight(p("mlp.fc1.weight"), h, dim, Layout::InputMajor)?,
                fc1_bias: m.zeros(p("mlp.fc1.bias"), h)?,
                fc2_weight: m.weight(p("mlp.fc2.weight"), dim, h, Layout::InputMajor)?,
                fc2_bias: m.zeros(p("mlp.fc2.bias"), dim)?,
            });
        }
        Ok(Self {
            token_embedding: embedding("token_embedding", vocab)?,
            position_embedding: embedding("position_embedding", max_tokens)?,
            layers,
            final_norm_weight: m.ones("text_encoder.final_norm.weight".into(), dim)?,
            final_norm_bias: m.zeros("text_encoder.final_norm.bias".into(), dim)?,
        })
    }

    /// Deterministic init from `seed`, drawn on the host in [`param_shapes`]
    /// order and uploaded once per parameter: embeddings N(0, 0.02), Linear
    /// weights xavier-uniform (as DiT), biases 0, LayerNorm weights 1.
    pub fn init(&mut self, backend: &dyn Backend, seed: u64) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut list = Vec::new();
        self.collect_mut(&mut list);
        for param in list {
            let n = param.numel();
            let data: Vec<f32> = match param.init {
                Init::Normal(std) => {
                    let normal = Normal::new(0.0f32, std).map_err(|e| {
                        EngineError::param(format!("parameter '{}'", param.name), "init std", std, e.to_string())
                    })?;
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
                Init::XavierUniform { fan_in, fan_out } => {
                    let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
                    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
                }
                Init::Ones => vec![1.0; n],
                Init::Zeros | Init::Fixed => vec![0.0; n],
            };
            param.load(backend, &data)?;
        }
        Ok(())
    }
}

impl Params for LayerParams {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.extend([
            &self.norm1_weight,
            &self.norm1_bias,
            &self.qkv_weight,
            &self.qkv_bias,
            &self.proj_weight,
            &self.proj_bias,
            &self.norm2_weight,
            &self.norm2_bias,
            &self.fc1_weight,
            &self.fc1_bias,
            &self.fc2_weight,
            &self.fc2_bias,
        ]);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.extend([
            &mut self.norm1_weight,
            &mut self.norm1_bias,
            &mut self.qkv_weight,
            &mut self.qkv_bias,
            &mut self.proj_weight,
            &mut self.proj_bias,
            &mut self.norm2_weight,
            &mut self.norm2_bias,
            &mut self.fc1_weight,
            &mut self.fc1_bias,
            &mut self.fc2_weight,
            &mut self.fc2_bias,
        ]);
    }
}

impl Params for TextEncoderParams {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.token_embedding);
        out.push(&self.position_embedding);
        for l in &self.layers {
            l.collect(out);
        }
        out.push(&self.final_norm_weight);
        out.push(&self.final_norm_bias);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.token_embedding);
        out.push(&mut self.position_embedding);
        for l in &mut self.layers {
            l.collect_mut(out);
        }
        out.push(&mut self.final_norm_weight);
        out.push(&mut self.final_norm_bias);
    }
}

/// Encoded prompts held on the backend (what [`TransformerTextEncoder::encode_on`]
/// returns; [`TextEncoder::encode`] downloads it into a [`TextBatch`]).
#[derive(Debug)]
pub struct DeviceTextBatch {
    /// Token embeddings [B, L, dim], f32.
    pub tokens: Tensor,
    /// [B, L] u8, 1 = real token.
    pub mask: Tensor,
    /// Masked mean of `tokens` over the real tokens [B, dim], f32.
    pub pooled: Tensor,
    /// Prompts B.
    pub batch: usize,
    /// Tokens per prompt L.
    pub len: usize,
    /// Channels per token.
    pub dim: usize,
}

/// The small transformer encoder.
pub struct TransformerTextEncoder {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) tokenizer: Tokenizer,
    pub(super) cfg: TextEncoderConfig,
    pub(super) dim: usize,
    pub(super) heads: usize,
    dtype: DType,
    /// The weights; public so training and checkpoint loading can reach them.
    pub params: TextEncoderParams,
}

impl TransformerTextEncoder {
    /// A freshly initialised f32 encoder of width `dim` reading at most
    /// `max_tokens` tokens, with weights drawn from `seed`.
    pub fn new(
        backend: Arc<dyn Backend>,
        cfg: TextEncoderConfig,
        dim: usize,
        max_tokens: usize,
        seed: u64,
    ) -> Result<Self, TextError> {
        Self::with_dtype(backend, cfg, dim, max_tokens, seed, DType::F32)
    }

    /// As [`TransformerTextEncoder::new`], with the weights stored in `dtype`
    /// (f32, or bf16 where the backend supports it; activations stay f32).
    pub fn with_dtype(
        backend: Arc<dyn Backend>,
        cfg: TextEncoderConfig,
        dim: usize,
        max_tokens: usize,
        seed: u64,
        dtype: DType,
    ) -> Result<Self, TextError> {
        let bad = |field: &str, value: String, reason: &str| TextError::Config {
            field: field.into(),
            value,
            reason: reason.into(),
        };
        let heads = cfg.heads_for(dim);
        if dim == 0 {
            return Err(bad("dim", "0".into(), "must be positive"));
        }
        if dim.checked_rem(heads) != Some(0) {
            return Err(bad("heads", heads.to_string(), &format!("must divide dim {dim}")));
        }
        if cfg.mlp_hidden(dim) == 0 {
            return Err(bad("mlp_ratio", cfg.mlp_ratio.to_string(), "gives an empty MLP"));
        }
        if !dtype.is_float() || !backend.supports(dtype) {
            let reason = format!("backend '{}' cannot store float weights in it", backend.name());
            return Err(bad("dtype", dtype.to_string(), &reason));
        }
        let tokenizer = Tokenizer::new(cfg.load_vocab()?, max_tokens)?;
        let vocab = tokenizer.vocab().len();
        let mut params = TextEncoderParams::new(backend.as_ref(), dtype, &cfg, vocab, dim, max_tokens)?;
        params.init(backend.as_ref(), seed)?;
        Ok(Self {
            backend,
            tokenizer,
            cfg,
            dim,
            heads,
            dtype,
            params,
        })
    }

    /// The encoder a text-conditioned model config asks for: width
    /// `text_dim`, `max_tokens`, and its `text_encoder` settings (or defaults).
    pub fn for_model(backend: Arc<dyn Backend>, model: &ModelConfig, seed: u64) -> Result<Self, TextError> {
        match &model.conditioning {
            Conditioning::Text {
                text_dim, max_tokens, ..
            } => Self::new(
                backend,
                model.text_encoder.clone().unwrap_or_default(),
                *text_dim,
                *max_tokens,
                seed,
            ),
            Conditioning::Class { .. } => Err(TextError::Config {
                field: "conditioning".into(),
                value: "class".into(),
                reason: format!("model '{}' is class-conditioned and has no text encoder", model.name),
            }),
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The configuration.
    pub fn config(&self) -> &TextEncoderConfig {
        &self.cfg
    }

    /// The dtype the weights are stored in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend the weights live on.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Sets every parameter from `weights` (upstream names `text_encoder.*`;
    /// F32, F16 or BF16 on disk, converted to this encoder's dtype).
    pub fn load_weights(&mut self, weights: &Weights) -> WeightsResult<()> {
        let backend = self.backend.clone();
        let mut list = Vec::new();
        self.params.collect_mut(&mut list);
        weights.load_params(backend.as_ref(), list)
    }

    /// Writes every parameter to `path` in this encoder's dtype, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> WeightsResult<()> {
        let mut list = Vec::new();
        self.params.collect(&mut list);
        let metadata = HashMap::from([("format".to_string(), "ecdit-text-encoder".to_string())]);
        save_params(path, self.backend.as_ref(), &list, Vec::new(), metadata)
    }

    /// Parameter names and shapes of this encoder.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        param_shapes(
            &self.cfg,
            self.tokenizer.vocab().len(),
            self.dim,
            self.tokenizer.max_tokens(),
        )
    }

    /// Encodes token ids on the backend. ids, mask: [B, L] on the host
    /// (uploaded once each); every id must be below the vocabulary size.
    pub fn encode_ids(&self, ids: &[u32], mask: &[u8], batch: usize, len: usize) -> Result<DeviceTextBatch> {
        let be = self.backend.as_ref();
        let rows = batch * len;
        self.check_ids(ids, mask, rows)?;
        let ids_t = be.upload_u32(&[rows], ids)?;
        let mask_t = be.upload_u8(&[batch, len], mask)?;
        let weights = be.upload_f32(&[batch, len], &pool_weights(mask, batch, len), DType::F32)?;
        let mut tokens = be.zeros(&[batch, len, self.dim], DType::F32)?;
        let mut pooled = be.zeros(&[batch, self.dim], DType::F32)?;
        if rows > 0 {
            self.forward(tokens.view_mut(), ids_t.view(), mask_t.view(), batch, len)?;
            masked_mean(
                be,
                pooled.view_mut(),
                tokens.view(),
                weights.view(),
                batch,
                len,
                self.dim,
            )?;
        }
        Ok(DeviceTextBatch {
            tokens,
            mask: mask_t,
            pooled,
            batch,
            len,
            dim: self.dim,
        })
    }

    /// Checks host ids and mask of `rows` tokens: the lengths, and every id
    /// below the vocabulary size.
    pub(super) fn check_ids(&self, ids: &[u32], mask: &[u8], rows: usize) -> Result<()> {
        let vocab = self.tokenizer.vocab().len();
        ecdit_engine::error::check_len("text encoder", "ids", ids.len(), rows)?;
        ecdit_engine::error::check_len("text encoder", "mask", mask.len(), rows)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::shape(
                "text encoder (token id)",
                format!("ids below the vocabulary size {vocab}"),
                bad,
            ));
        }
        Ok(())
    }

    /// Tokenizes and encodes prompts, leaving the result on the backend.
    pub fn encode_on(&self, prompts: &[&str]) -> Result<DeviceTextBatch> {
        let (ids, mask, len) = self.tokenizer.tokenize_batch(prompts);
        self.encode_ids(&ids, &mask, prompts.len(), len)
    }

    /// Inference forward over token ids on the backend; keeps nothing.
    /// out: [B, L, D] (f32 or bf16); ids: [B * L] u32 (below the vocabulary
    /// size; the backend's gather checks); mask: [B, L] u8, nonzero = real token.
    pub fn forward(
        &self,
        mut out: TensorMut<'_>,
        ids: TensorRef<'_>,
        mask: TensorRef<'_>,
        batch: usize,
        len: usize,
    ) -> Result<()> {
        const OP: &str = "text encoder";
        let be = self.backend.as_ref();
        let (d, nh) = (self.dim, self.heads);
        let hm = self.cfg.mlp_hidden(d);
        let rows = batch * len;
        ids.expect_dtype(OP, "ids", DType::U32)?;
        ids.expect_len(OP, "ids", rows)?;
        mask.expect_dtype(OP, "mask", DType::U8)?;
        mask.expect_len(OP, "mask", rows)?;
        out.expect_len(OP, "out", rows * d)?;
        if len > self.tokenizer.max_tokens() {
            return Err(EngineError::shape(
                "text encoder (length)",
                format!("at most {} tokens", self.tokenizer.max_tokens()),
                len,
            ));
        }
        let p = &self.params;
        let f32_buf = |dims: &[usize]| be.zeros(dims, DType::F32);
        let (mut x, mut norm) = (f32_buf(&[rows, d])?, f32_buf(&[rows, d])?);
        let (mut mean, mut rstd) = (f32_buf(&[rows])?, f32_buf(&[rows])?);
        let (mut q, mut k, mut v) = (f32_buf(&[rows, d])?, f32_buf(&[rows, d])?, f32_buf(&[rows, d])?);
        let mut att = f32_buf(&[rows, d])?;
        let (mut hid, mut act) = (f32_buf(&[rows, hm])?, f32_buf(&[rows, hm])?);

        // x[b, l] = token_embedding[ids[b, l]] + position_embedding[l]
        be.gather_rows(x.view_mut(), p.token_embedding.tensor.view(), ids, d)?;
        let positions = p.position_embedding.tensor.view().rows(0, len)?;
        be.add_broadcast(x.view_mut(), positions.reshape(&[len * d])?)?;

        let attn_dims = AttnDims {
            batch,
            heads: nh,
            kv_heads: nh,
            q_len: len,
            kv_len: len,
            head_dim: d / nh,
        };
        let mut ln = |out: TensorMut<'_>, inp: TensorRef<'_>, w: &Param, b: &Param| {
            let (w, b) = (Some(w.tensor.view()), Some(b.tensor.view()));
            be.layer_norm(out, mean.view_mut(), rstd.view_mut(), inp, w, b, rows, d, LN_EPS)
        };
        for lp in &p.layers {
            // Attention sub-block: x += proj(Attn(LN1(x))).
            ln(norm.view_mut(), x.view(), &lp.norm1_weight, &lp.norm1_bias)?;
            for (which, dst) in [&mut q, &mut k, &mut v].into_iter().enumerate() {
                // dst = norm @ W_which + qkv.bias[which]   ([R, D] @ [D, D])
                let w = lp.qkv_weight.tensor.view().rows(which, 1)?.reshape(&[d, d])?;
                let b = lp.qkv_bias.tensor.view().rows(which * d, d)?;
                be.gemm(
                    dst.view_mut(),
                    norm.view(),
                    w,
                    Some(b),
                    GemmDims::nn(rows, d, d),
                    1.0,
                    0.0,
                )?;
            }
            be.attention(
                att.view_mut(),
                None,
                q.view(),
                k.view(),
                v.view(),
                Some(mask),
                attn_dims,
            )?;
            // beta = 1 adds the projection onto the residual.
            linear(be, x.view_mut(), att.view(), &lp.proj_weight, &lp.proj_bias, 1.0)?;

            // MLP sub-block: x += fc2(GELU(fc1(LN2(x)))).
            ln(norm.view_mut(), x.view(), &lp.norm2_weight, &lp.norm2_bias)?;
            linear(be, hid.view_mut(), norm.view(), &lp.fc1_weight, &lp.fc1_bias, 0.0)?;
            be.unary(Unary::GeluTanh, act.view_mut(), hid.view())?;
            linear(be, x.view_mut(), act.view(), &lp.fc2_weight, &lp.fc2_bias, 1.0)?;
        }
        let out_rows = out.reborrow().reshape(&[rows, d])?;
        ln(out_rows, x.view(), &p.final_norm_weight, &p.final_norm_bias)
    }
}

/// `out [R, out_f] = inp [R, in_f] @ W + bias + beta * out` for an
/// input-major `Linear` weight (memory `[in_f, out_f]`).
fn linear(
    be: &dyn Backend,
    out: TensorMut<'_>,
    inp: TensorRef<'_>,
    weight: &Param,
    bias: &Param,
    beta: f32,
) -> Result<()> {
    let (out_f, in_f) = (weight.shape[0], weight.shape[1]);
    let rows = inp.numel() / in_f.max(1);
    let dims = GemmDims::nn(rows, out_f, in_f);
    be.gemm(
        out,
        inp,
        weight.tensor.view(),
        Some(bias.tensor.view()),
        dims,
        1.0,
        beta,
    )
}

/// Per-token weights of the masked mean: `mask / (real tokens of the prompt)`.
/// mask: [B, L]; returns [B, L].
pub(super) fn pool_weights(mask: &[u8], batch: usize, len: usize) -> Vec<f32> {
    let mut w = vec![0.0f32; batch * len];
    for (wb, mb) in w.chunks_exact_mut(len.max(1)).zip(mask.chunks_exact(len.max(1))) {
        let count = mb.iter().filter(|&&m| m != 0).count().max(1);
        let scale = 1.0 / count as f32;
        wb.iter_mut()
            .zip(mb)
            .for_each(|(o, &m)| *o = if m != 0 { scale } else { 0.0 });
    }
    w
}

/// pooled [B, D] = per prompt, `weights [1, L] @ tokens [L, D]` (one batched
/// product): the masked mean when the weights come from [`pool_weights`].
pub(super) fn masked_mean(
    be: &dyn Backend,
    pooled: TensorMut<'_>,
    tokens: TensorRef<'_>,
    weights: TensorRef<'_>,
    batch: usize,
    len: usize,
    d: usize,
) -> Result<()> {
    be.gemm_batched(pooled, weights, tokens, batch, GemmDims::nn(1, d, len), 1.0, 0.0)
}

impl Params for TransformerTextEncoder {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.params.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.params.collect_mut(out);
    }
}

impl TextEncoder for TransformerTextEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    fn encode(&self, prompts: &[&str]) -> Result<TextBatch> {
        let _span = tracing::debug_span!("text_encode", prompts = prompts.len()).entered();
        let (ids, mask, len) = self.tokenizer.tokenize_batch(prompts);
        let batch = prompts.len();
        let enc = self.encode_ids(&ids, &mask, batch, len)?;
        let be = self.backend.as_ref();
        Ok(TextBatch {
            tokens: be.read_f32(enc.tokens.view())?,
            mask,
            pooled: be.read_f32(enc.pooled.view())?,
            batch,
            len,
            dim: self.dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecdit_backend_cpu::CpuBackend;

    fn values(be: &dyn Backend, p: &Param) -> Vec<f32> {
        p.to_upstream_f32(be).unwrap()
    }

    #[test]
    fn params_follow_param_shapes() {
        let be = CpuBackend::new(1).unwrap();
        let cfg = TextEncoderConfig {
            layers: 3,
            heads: Some(2),
            ..Default::default()
        };
        let shapes = param_shapes(&cfg, 17, 8, 5);
        let params = TextEncoderParams::new(&be, DType::F32, &cfg, 17, 8, 5).unwrap();
        let mut list = Vec::new();
        params.collect(&mut list);
        let listed: Vec<(String, Vec<usize>)> = list.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
        assert_eq!(listed, shapes);
        assert_eq!(shapes.len(), 2 + 3 * 12 + 2);
        // Linear weights are held input-major, the fused qkv as three blocks.
        let l = &params.layers[0];
        assert_eq!(l.fc1_weight.memory_shape(), vec![8, 32]);
        assert_eq!(l.qkv_weight.memory_shape(), vec![3, 8, 8]);
    }

    #[test]
    fn init_is_deterministic_and_seed_dependent() {
        let be = CpuBackend::new(1).unwrap();
        let cfg = TextEncoderConfig::default();
        let make = |seed| {
            let mut p = TextEncoderParams::new(&be, DType::F32, &cfg, 10, 16, 4).unwrap();
            p.init(&be, seed).unwrap();
            p
        };
        let (a, b, c) = (make(7), make(7), make(8));
        let all = |p: &TextEncoderParams| {
            let mut list = Vec::new();
            p.collect(&mut list);
            list.iter().map(|p| values(&be, p)).collect::<Vec<_>>()
        };
        assert_eq!(all(&a), all(&b));
        assert_ne!(values(&be, &a.token_embedding), values(&be, &c.token_embedding));
        assert!(values(&be, &a.layers[0].norm1_weight).iter().all(|&w| w == 1.0));
        assert!(values(&be, &a.layers[0].qkv_bias).iter().all(|&w| w == 0.0));
        let bound = (6.0f32 / (16.0 + 48.0)).sqrt();
        assert!(values(&be, &a.layers[0].qkv_weight).iter().all(|w| w.abs() <= bound));
    }

    #[test]
    fn masked_mean_ignores_padding() {
        // B = 2, L = 3, D = 2; second prompt has one real token.
        let be = CpuBackend::new(1).unwrap();
        let tokens = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 100.0, 100.0, 100.0, 100.0];
        let mask = [1, 1, 0, 1, 0, 0];
        let tokens = be.upload_f32(&[2, 3, 2], &tokens, DType::F32).unwrap();
        let weights = be.upload_f32(&[2, 3], &pool_weights(&mask, 2, 3), DType::F32).unwrap();
        let mut pooled = be.zeros(&[2, 2], DType::F32).unwrap();
        masked_mean(&be, pooled.view_mut(), tokens.view(), weights.view(), 2, 3, 2).unwrap();
        assert_eq!(be.read_f32(pooled.view()).unwrap(), [2.0, 3.0, 5.0, 6.0]);
    }
}
