//! A small trainable transformer text encoder on the engine's backend ops.
//!
//! token embedding + learned positions -> `layers` pre-norm blocks
//! (`x += Attn(LN1(x))` with the padding mask on the keys, `x += MLP(LN2(x))`,
//! GELU-tanh MLP of width `mlp_ratio * dim`) -> final LayerNorm. The pooled
//! embedding is the mean over real (unmasked) tokens.
//!
//! Forward only for now. [`TextEncoderActs`] holds every buffer a backward
//! reads (llm.c style), so training adds `backward` beside `forward` without
//! changing it.

use super::tokenizer::{Tokenizer, Vocab};
use super::{TextBatch, TextEncoder, TextError};
use crate::config::{Conditioning, ModelConfig};
use ecdit_engine::error::check_len;
use ecdit_engine::{AttnDims, Backend, EngineError, GemmDims, Result, Unary};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// LayerNorm epsilon (as CLIP/T5-style encoders use 1e-5).
const LN_EPS: f32 = 1e-5;

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

/// Every parameter of the encoder, by name (`text_encoder.*`) and shape, in
/// the order [`TextEncoderParams::named`] and the seeded init use.
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

/// Parameters of one encoder block (PyTorch `Linear` layout `[out, in]`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams {
    /// [D]
    pub norm1_weight: Vec<f32>,
    /// [D]
    pub norm1_bias: Vec<f32>,
    /// [3D, D]; output channel `which * D + head * Dh + j` (q, k, v).
    pub qkv_weight: Vec<f32>,
    /// [3D]
    pub qkv_bias: Vec<f32>,
    /// [D, D]
    pub proj_weight: Vec<f32>,
    /// [D]
    pub proj_bias: Vec<f32>,
    /// [D]
    pub norm2_weight: Vec<f32>,
    /// [D]
    pub norm2_bias: Vec<f32>,
    /// [Hm, D]
    pub fc1_weight: Vec<f32>,
    /// [Hm]
    pub fc1_bias: Vec<f32>,
    /// [D, Hm]
    pub fc2_weight: Vec<f32>,
    /// [D]
    pub fc2_bias: Vec<f32>,
}

/// All encoder parameters. Gradients will reuse this type.
#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoderParams {
    /// [V, D]
    pub token_embedding: Vec<f32>,
    /// [max_tokens, D]
    pub position_embedding: Vec<f32>,
    /// One per block.
    pub layers: Vec<LayerParams>,
    /// [D]
    pub final_norm_weight: Vec<f32>,
    /// [D]
    pub final_norm_bias: Vec<f32>,
}

impl TextEncoderParams {
    /// Every buffer in [`param_shapes`] order (names are the same list).
    pub fn named_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![&mut self.token_embedding, &mut self.position_embedding];
        for l in &mut self.layers {
            out.extend([
                &mut l.norm1_weight,
                &mut l.norm1_bias,
                &mut l.qkv_weight,
                &mut l.qkv_bias,
                &mut l.proj_weight,
                &mut l.proj_bias,
                &mut l.norm2_weight,
                &mut l.norm2_bias,
                &mut l.fc1_weight,
                &mut l.fc1_bias,
                &mut l.fc2_weight,
                &mut l.fc2_bias,
            ]);
        }
        out.push(&mut self.final_norm_weight);
        out.push(&mut self.final_norm_bias);
        out
    }

    /// Read-only view of every buffer in [`param_shapes`] order.
    pub fn named(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![&self.token_embedding, &self.position_embedding];
        for l in &self.layers {
            out.extend([
                l.norm1_weight.as_slice(),
                &l.norm1_bias,
                &l.qkv_weight,
                &l.qkv_bias,
                &l.proj_weight,
                &l.proj_bias,
                &l.norm2_weight,
                &l.norm2_bias,
                &l.fc1_weight,
                &l.fc1_bias,
                &l.fc2_weight,
                &l.fc2_bias,
            ]);
        }
        out.push(&self.final_norm_weight);
        out.push(&self.final_norm_bias);
        out
    }

    /// Empty buffers for `layers` blocks, filled by `init`.
    fn zeros(layers: usize) -> Self {
        let layer = LayerParams {
            norm1_weight: vec![],
            norm1_bias: vec![],
            qkv_weight: vec![],
            qkv_bias: vec![],
            proj_weight: vec![],
            proj_bias: vec![],
            norm2_weight: vec![],
            norm2_bias: vec![],
            fc1_weight: vec![],
            fc1_bias: vec![],
            fc2_weight: vec![],
            fc2_bias: vec![],
        };
        Self {
            token_embedding: vec![],
            position_embedding: vec![],
            layers: vec![layer; layers],
            final_norm_weight: vec![],
            final_norm_bias: vec![],
        }
    }

    /// Deterministic init from `seed`, drawn in [`param_shapes`] order:
    /// embeddings N(0, 0.02), Linear weights Xavier-uniform (as DiT), biases 0,
    /// LayerNorm weights 1.
    pub fn init(shapes: &[(String, Vec<usize>)], layers: usize, seed: u64) -> Self {
        let mut params = Self::zeros(layers);
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("constant std is positive");
        for ((name, shape), buf) in shapes.iter().zip(params.named_mut()) {
            let n: usize = shape.iter().product();
            *buf = if name.ends_with("embedding.weight") {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            } else if name.contains("norm") && name.ends_with(".weight") {
                vec![1.0; n]
            } else if name.ends_with(".weight") {
                let (fan_out, fan_in) = (shape[0], shape[1]);
                let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
                (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
            } else {
                vec![0.0; n]
            };
        }
        params
    }
}

/// What one block's forward keeps for its backward. R = B * L rows.
#[derive(Clone, Debug, Default)]
pub struct LayerActs {
    /// Block input (residual stream) [R, D].
    pub input: Vec<f32>,
    /// LN1 output [R, D]; mean, rstd [R].
    pub norm1: Vec<f32>,
    /// LN1 means [R].
    pub norm1_mean: Vec<f32>,
    /// LN1 reciprocal standard deviations [R].
    pub norm1_rstd: Vec<f32>,
    /// Queries [B, L, H, Dh].
    pub q: Vec<f32>,
    /// Keys [B, L, H, Dh].
    pub k: Vec<f32>,
    /// Values [B, L, H, Dh].
    pub v: Vec<f32>,
    /// Attention probabilities [B, H, L, L].
    pub probs: Vec<f32>,
    /// Attention output before the projection [R, D].
    pub attn: Vec<f32>,
    /// Residual stream after the attention [R, D].
    pub mid: Vec<f32>,
    /// LN2 output [R, D].
    pub norm2: Vec<f32>,
    /// LN2 means [R].
    pub norm2_mean: Vec<f32>,
    /// LN2 reciprocal standard deviations [R].
    pub norm2_rstd: Vec<f32>,
    /// fc1 output before GELU [R, Hm].
    pub fc1: Vec<f32>,
    /// GELU output [R, Hm].
    pub gelu: Vec<f32>,
}

/// Everything a forward keeps for the backward.
#[derive(Clone, Debug, Default)]
pub struct TextEncoderActs {
    /// Token ids [B, L].
    pub ids: Vec<u32>,
    /// [B, L], 1 = real token.
    pub mask: Vec<u8>,
    /// Batch B.
    pub batch: usize,
    /// Length L.
    pub len: usize,
    /// One per block.
    pub layers: Vec<LayerActs>,
    /// Input of the final norm [R, D].
    pub final_in: Vec<f32>,
    /// Final-norm means [R].
    pub final_mean: Vec<f32>,
    /// Final-norm reciprocal standard deviations [R].
    pub final_rstd: Vec<f32>,
}

/// The small transformer encoder.
pub struct TransformerTextEncoder {
    backend: Arc<dyn Backend>,
    tokenizer: Tokenizer,
    cfg: TextEncoderConfig,
    dim: usize,
    heads: usize,
    /// The weights; public so training and checkpoint loading can reach them.
    pub params: TextEncoderParams,
}

impl TransformerTextEncoder {
    /// A freshly initialised encoder of width `dim` reading at most
    /// `max_tokens` tokens, with weights drawn from `seed`.
    pub fn new(
        backend: Arc<dyn Backend>,
        cfg: TextEncoderConfig,
        dim: usize,
        max_tokens: usize,
        seed: u64,
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
        let tokenizer = Tokenizer::new(cfg.load_vocab()?, max_tokens)?;
        let shapes = param_shapes(&cfg, tokenizer.vocab().len(), dim, max_tokens);
        let params = TextEncoderParams::init(&shapes, cfg.layers, seed);
        Ok(Self {
            backend,
            tokenizer,
            cfg,
            dim,
            heads,
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

    /// Parameter names and shapes of this encoder.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        param_shapes(
            &self.cfg,
            self.tokenizer.vocab().len(),
            self.dim,
            self.tokenizer.max_tokens(),
        )
    }

    /// Forward over token ids, filling `acts`.
    /// out: [B, L, D]; ids, mask: [B, L].
    pub fn forward(
        &self,
        out: &mut [f32],
        acts: &mut TextEncoderActs,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        len: usize,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let (d, nh) = (self.dim, self.heads);
        let hm = self.cfg.mlp_hidden(d);
        let rows = batch * len;
        let vocab = self.tokenizer.vocab().len();
        check_len("text encoder", "ids", ids.len(), rows)?;
        check_len("text encoder", "mask", mask.len(), rows)?;
        check_len("text encoder", "out", out.len(), rows * d)?;
        if len > self.tokenizer.max_tokens() {
            return Err(EngineError::shape(
                "text encoder (length)",
                format!("at most {} tokens", self.tokenizer.max_tokens()),
                len,
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::shape(
                "text encoder (token id)",
                format!("ids below the vocabulary size {vocab}"),
                bad,
            ));
        }
        let p = &self.params;
        acts.ids = ids.to_vec();
        acts.mask = mask.to_vec();
        acts.batch = batch;
        acts.len = len;
        acts.layers.resize_with(self.cfg.layers, LayerActs::default);

        // x[b, l] = token_embedding[ids[b, l]] + position_embedding[l]
        let mut x = vec![0.0f32; rows * d];
        be.gather_rows(&mut x, &p.token_embedding, ids, d)?;
        for r in 0..rows {
            let pos = &p.position_embedding[(r % len) * d..(r % len + 1) * d];
            x[r * d..(r + 1) * d].iter_mut().zip(pos).for_each(|(a, b)| *a += b);
        }

        let attn_dims = AttnDims {
            batch,
            heads: nh,
            kv_heads: nh,
            q_len: len,
            kv_len: len,
            head_dim: d / nh,
        };
        for (lp, la) in p.layers.iter().zip(acts.layers.iter_mut()) {
            la.input = x;
            // Attention sub-block: x += proj(Attn(LN1(x))).
            layer_norm_forward(
                be,
                &mut la.norm1,
                &mut la.norm1_mean,
                &mut la.norm1_rstd,
                &la.input,
                &lp.norm1_weight,
                &lp.norm1_bias,
                rows,
                d,
            )?;
            let mut qkv = vec![0.0f32; rows * 3 * d];
            linear_forward(be, &mut qkv, &la.norm1, &lp.qkv_weight, &lp.qkv_bias, rows, d, 3 * d)?;
            split_qkv(&mut la.q, &mut la.k, &mut la.v, &qkv, rows, d);
            la.attn = vec![0.0; rows * d];
            la.probs = vec![0.0; batch * nh * len * len];
            be.attention(&mut la.attn, &mut la.probs, &la.q, &la.k, &la.v, Some(mask), attn_dims)?;
            la.mid = la.input.clone();
            // beta = 1 adds the projection onto the residual.
            be.gemm(
                &mut la.mid,
                &la.attn,
                &lp.proj_weight,
                GemmDims::nt(rows, d, d),
                1.0,
                1.0,
            )?;
            be.add_bias(&mut la.mid, &lp.proj_bias, rows, d)?;

            // MLP sub-block: x += fc2(GELU(fc1(LN2(x)))).
            layer_norm_forward(
                be,
                &mut la.norm2,
                &mut la.norm2_mean,
                &mut la.norm2_rstd,
                &la.mid,
                &lp.norm2_weight,
                &lp.norm2_bias,
                rows,
                d,
            )?;
            la.fc1 = vec![0.0; rows * hm];
            linear_forward(be, &mut la.fc1, &la.norm2, &lp.fc1_weight, &lp.fc1_bias, rows, d, hm)?;
            la.gelu = vec![0.0; rows * hm];
            be.unary(Unary::GeluTanh, &mut la.gelu, &la.fc1)?;
            x = la.mid.clone();
            be.gemm(&mut x, &la.gelu, &lp.fc2_weight, GemmDims::nt(rows, d, hm), 1.0, 1.0)?;
            be.add_bias(&mut x, &lp.fc2_bias, rows, d)?;
        }
        acts.final_in = x;
        acts.final_mean = vec![0.0; rows];
        acts.final_rstd = vec![0.0; rows];
        be.layer_norm(
            out,
            &mut acts.final_mean,
            &mut acts.final_rstd,
            &acts.final_in,
            Some(&p.final_norm_weight),
            Some(&p.final_norm_bias),
            rows,
            d,
            LN_EPS,
        )
    }
}

/// pooled: [B, D] = mean of tokens [B, L, D] over rows with mask [B, L] = 1.
pub(crate) fn masked_mean_forward(pooled: &mut [f32], tokens: &[f32], mask: &[u8], batch: usize, len: usize, d: usize) {
    pooled.fill(0.0);
    for b in 0..batch {
        let out = &mut pooled[b * d..(b + 1) * d];
        let mut count = 0usize;
        for l in 0..len {
            if mask[b * len + l] != 0 {
                count += 1;
                let row = &tokens[(b * len + l) * d..(b * len + l + 1) * d];
                out.iter_mut().zip(row).for_each(|(o, t)| *o += t);
            }
        }
        let scale = 1.0 / count.max(1) as f32;
        out.iter_mut().for_each(|o| *o *= scale);
    }
}

/// out: [R, D] = LayerNorm(inp) with affine weight and bias; mean, rstd: [R].
#[allow(clippy::too_many_arguments)]
fn layer_norm_forward(
    be: &dyn Backend,
    out: &mut Vec<f32>,
    mean: &mut Vec<f32>,
    rstd: &mut Vec<f32>,
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    cols: usize,
) -> Result<()> {
    out.resize(rows * cols, 0.0);
    mean.resize(rows, 0.0);
    rstd.resize(rows, 0.0);
    be.layer_norm(out, mean, rstd, inp, Some(weight), Some(bias), rows, cols, LN_EPS)
}

/// out: [R, out_f] = inp [R, in_f] @ weight[out_f, in_f]^T + bias [out_f].
#[allow(clippy::too_many_arguments)]
fn linear_forward(
    be: &dyn Backend,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
) -> Result<()> {
    be.gemm(out, inp, weight, GemmDims::nt(rows, out_f, in_f), 1.0, 0.0)?;
    be.add_bias(out, bias, rows, out_f)
}

/// Splits a fused projection qkv: [R, 3D] into q, k, v: [R, D] each
/// (heads stay interleaved within a token, the backend's attention layout).
fn split_qkv(q: &mut Vec<f32>, k: &mut Vec<f32>, v: &mut Vec<f32>, qkv: &[f32], rows: usize, d: usize) {
    for (which, dst) in [q, k, v].into_iter().enumerate() {
        dst.clear();
        dst.extend((0..rows).flat_map(|r| qkv[r * 3 * d + which * d..r * 3 * d + (which + 1) * d].iter().copied()));
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
        let d = self.dim;
        let mut tokens = vec![0.0f32; batch * len * d];
        let mut acts = TextEncoderActs::default();
        if batch > 0 {
            self.forward(&mut tokens, &mut acts, &ids, &mask, batch, len)?;
        }
        let mut pooled = vec![0.0f32; batch * d];
        masked_mean_forward(&mut pooled, &tokens, &mask, batch, len, d);
        Ok(TextBatch {
            tokens,
            mask,
            pooled,
            batch,
            len,
            dim: d,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_buffers_follow_param_shapes() {
        let cfg = TextEncoderConfig {
            layers: 3,
            heads: Some(2),
            ..Default::default()
        };
        let shapes = param_shapes(&cfg, 17, 8, 5);
        let params = TextEncoderParams::init(&shapes, cfg.layers, 1);
        let bufs = params.named();
        assert_eq!(bufs.len(), shapes.len());
        for ((name, shape), buf) in shapes.iter().zip(bufs) {
            assert_eq!(buf.len(), shape.iter().product::<usize>(), "{name}");
        }
        assert_eq!(shapes.len(), 2 + 3 * 12 + 2);
    }

    #[test]
    fn init_is_deterministic_and_seed_dependent() {
        let cfg = TextEncoderConfig::default();
        let shapes = param_shapes(&cfg, 10, 16, 4);
        let a = TextEncoderParams::init(&shapes, cfg.layers, 7);
        let b = TextEncoderParams::init(&shapes, cfg.layers, 7);
        let c = TextEncoderParams::init(&shapes, cfg.layers, 8);
        assert_eq!(a, b);
        assert_ne!(a.token_embedding, c.token_embedding);
        assert!(a.layers[0].norm1_weight.iter().all(|&w| w == 1.0));
        assert!(a.layers[0].qkv_bias.iter().all(|&w| w == 0.0));
        let bound = (6.0f32 / (16.0 + 48.0)).sqrt();
        assert!(a.layers[0].qkv_weight.iter().all(|w| w.abs() <= bound));
    }

    #[test]
    fn masked_mean_ignores_padding() {
        // B = 2, L = 3, D = 2; second prompt has one real token.
        let tokens = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 100.0, 100.0, 100.0, 100.0];
        let mask = [1, 1, 0, 1, 0, 0];
        let mut pooled = [0.0; 4];
        masked_mean_forward(&mut pooled, &tokens, &mask, 2, 3, 2);
        assert_eq!(pooled, [2.0, 3.0, 5.0, 6.0]);
    }
}
