//! `ecdit info`: what a model config costs before anything is built.
//!
//! [`param_shapes`] is the one place that lists the model's tensors by name
//! and shape (upstream DiT / PixArt names); every count here is summed from
//! that list. [`InfoReport`] adds activated and dense-equivalent parameters,
//! forward FLOPs per image, weight and activation memory, and, for the
//! paper's family, Table 1 of EC-DiT beside our numbers.
//!
//! Conventions:
//! - `total_params` counts every tensor of the state dict, including the
//!   fixed sin-cos `pos_embed` (as upstream DiT's `sum(p.numel())` does, which
//!   gives DiT-XL/2's 675,129,632); `trainable_params` leaves it out.
//! - The text encoder is not part of the DiT's counts; it is reported apart.
//! - Activated parameters count `a` experts per token on average for each MoE
//!   layer: `a = f_c` for expert choice, `k` for token choice and expert race.
//! - FLOPs count matmuls only (2 per multiply-add); norms, activations,
//!   softmax and residual adds are lower order and left out.

use crate::config::{Conditioning, ModelConfig, MoeConfig};
use crate::text::{self, TextEncoderConfig};
use ecdit_engine::{expert_capacity, EngineError, Registry, Result};
use serde::Serialize;
use serde_json::Value;
use std::fmt;

/// Frequencies of the timestep embedding (DiT).
const TIMESTEP_FREQ_DIM: usize = 256;

/// Tensors that are part of the state dict but not trained.
pub const FIXED_PARAMS: &[&str] = &["pos_embed"];

/// Every tensor of the DiT for `cfg` by name and shape, in state-dict order,
/// built with the shipped registry (experts name their own tensors).
pub fn param_shapes(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    param_shapes_with(&crate::registry()?, cfg)
}

/// [`param_shapes`] with the experts taken from `registry`.
pub fn param_shapes_with(registry: &Registry, cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let d = cfg.hidden;
    let (p, c) = (cfg.patch_size, cfg.in_channels);
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
    let linear = |push: &mut dyn FnMut(String, Vec<usize>), prefix: &str, out_f: usize, in_f: usize| {
        push(format!("{prefix}.weight"), vec![out_f, in_f]);
        push(format!("{prefix}.bias"), vec![out_f]);
    };

    push("x_embedder.proj.weight".into(), vec![d, c, p, p]);
    push("x_embedder.proj.bias".into(), vec![d]);
    linear(&mut push, "t_embedder.mlp.0", d, TIMESTEP_FREQ_DIM);
    linear(&mut push, "t_embedder.mlp.2", d, d);
    match &cfg.conditioning {
        // One extra row: the null class of classifier-free guidance.
        Conditioning::Class { num_classes, .. } => {
            push("y_embedder.embedding_table.weight".into(), vec![num_classes + 1, d])
        }
        Conditioning::Text { text_dim, pooled, .. } => {
            // PixArt's caption projection: text tokens -> d, read by every cross-attention
            // (grouped-query like self-attention: kv_linear is [2 * kv_heads * head_dim, d]).
            linear(&mut push, "y_embedder.y_proj.fc1", d, *text_dim);
            linear(&mut push, "y_embedder.y_proj.fc2", d, d);
            if *pooled {
                linear(&mut push, "pooled_embedder.mlp.0", d, *text_dim);
                linear(&mut push, "pooled_embedder.mlp.2", d, d);
            }
        }
    }
    push("pos_embed".into(), vec![1, cfg.tokens(), d]);

    let experts = match &cfg.moe {
        Some(moe) => Some((moe, registry.expert(&moe.expert)?)),
        None => None,
    };
    let head_dim = cfg.head_dim();
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        if cfg.kv_heads == cfg.heads {
            linear(&mut push, &format!("{b}.attn.qkv"), 3 * d, d);
        } else {
            linear(&mut push, &format!("{b}.attn.q"), d, d);
            linear(&mut push, &format!("{b}.attn.kv"), 2 * cfg.kv_heads * head_dim, d);
        }
        linear(&mut push, &format!("{b}.attn.proj"), d, d);
        if matches!(cfg.conditioning, Conditioning::Text { .. }) {
            linear(&mut push, &format!("{b}.cross_attn.q_linear"), d, d);
            linear(
                &mut push,
                &format!("{b}.cross_attn.kv_linear"),
                2 * cfg.kv_heads * head_dim,
                d,
            );
            linear(&mut push, &format!("{b}.cross_attn.proj"), d, d);
        }
        match &experts {
            Some((moe, expert)) if moe.is_moe_block(i) => {
                push(format!("{b}.moe.router.weight"), vec![moe.experts, d]);
                for ps in expert.param_shapes(d, moe.experts) {
                    push(format!("{b}.moe.experts.{}", ps.name), ps.shape);
                }
            }
            _ => {
                linear(&mut push, &format!("{b}.mlp.fc1"), cfg.mlp_hidden(), d);
                linear(&mut push, &format!("{b}.mlp.fc2"), d, cfg.mlp_hidden());
            }
        }
        linear(&mut push, &format!("{b}.adaLN_modulation.1"), 6 * d, d);
    }
    linear(&mut push, "final_layer.adaLN_modulation.1", 2 * d, d);
    linear(&mut push, "final_layer.linear", p * p * cfg.out_channels(), d);
    Ok(out)
}

/// Elements of a shape.
fn numel(shape: &[usize]) -> u64 {
    shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64))
}

/// How many experts an average token uses in a MoE layer (`a`), and the
/// expert rows one image dispatches (exact capacity rounding for expert
/// choice with per-sample groups).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Activation {
    /// Router kind.
    pub router: String,
    /// Mean experts per token.
    pub experts_per_token: f64,
    /// Expert rows (token copies) per image per MoE layer.
    pub expert_rows_per_image: f64,
    /// Expert-choice capacity C per expert for one image's group, if expert choice.
    pub capacity: Option<usize>,
}

/// Reads the router spec (through the registry, so defaults are filled) and
/// works out the per-token activation.
pub fn activation(registry: &Registry, cfg: &ModelConfig, moe: &MoeConfig) -> Result<Activation> {
    let router = registry.router(&moe.router)?;
    let spec = router.spec();
    let kind = router.kind().to_string();
    let t = cfg.tokens();
    let num = |field: &str| -> Result<f64> {
        spec.get(field)
            .and_then(Value::as_f64)
            .ok_or_else(|| EngineError::param(format!("router '{kind}'"), field, spec.to_string(), "expected a number"))
    };
    let (a, rows, capacity) =
        match kind.as_str() {
            "expert-choice" => {
                let f_c = num("capacity_factor")?;
                // Per-sample group of the image's T tokens; other groupings give the same mean.
                let c = expert_capacity(f_c, t, moe.experts);
                (f_c, (c * moe.experts) as f64, Some(c))
            }
            // Without a capacity limit every token takes k experts (an upper bound with one).
            "token-choice" | "expert-race" => {
                let k = num("k")?;
                (k, k * t as f64, None)
            }
            "dense" => (1.0, t as f64, None),
            other => return Err(EngineError::param(
                "ecdit info",
                "moe.router.kind",
                other,
                "cannot tell how many experts a token uses (known: expert-choice, token-choice, expert-race, dense)",
            )),
        };
    Ok(Activation {
        router: kind,
        experts_per_token: a,
        expert_rows_per_image: rows,
        capacity,
    })
}

/// Parameters by component.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParamBreakdown {
    /// Patch, timestep, label/caption/pooled embedders and `pos_embed`.
    pub embedders: u64,
    /// Self-attention projections.
    pub attention: u64,
    /// Cross-attention projections.
    pub cross_attention: u64,
    /// Dense FFNs.
    pub ffn: u64,
    /// MoE routers.
    pub routers: u64,
    /// MoE experts (all E).
    pub experts: u64,
    /// Per-block adaLN modulation.
    pub adaln: u64,
    /// Final layer.
    pub final_layer: u64,
}

impl ParamBreakdown {
    fn add(&mut self, name: &str, n: u64) {
        let slot = if name.starts_with("final_layer.") {
            &mut self.final_layer
        } else if !name.starts_with("blocks.") {
            &mut self.embedders
        } else if name.contains(".moe.router.") {
            &mut self.routers
        } else if name.contains(".moe.experts.") {
            &mut self.experts
        } else if name.contains(".cross_attn.") {
            &mut self.cross_attention
        } else if name.contains(".attn.") {
            &mut self.attention
        } else if name.contains(".mlp.") {
            &mut self.ffn
        } else {
            &mut self.adaln
        };
        *slot = slot.saturating_add(n);
    }
}

/// Forward matmul FLOPs for one image, by part.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlopBreakdown {
    /// Patch embedding, timestep MLP, caption projection, pooled MLP.
    pub embed: f64,
    /// Self-attention q/k/v and output projections.
    pub attention_proj: f64,
    /// Self-attention `QK^T` and `PV`.
    pub attention_scores: f64,
    /// Cross-attention projections, `QK^T` and `PV` (at `max_tokens` text tokens).
    pub cross_attention: f64,
    /// Dense FFNs and experts (at the dispatched rows).
    pub ffn: f64,
    /// Router logits.
    pub router: f64,
    /// adaLN modulation (per image, not per token).
    pub adaln: f64,
    /// Final layer.
    pub final_layer: f64,
}

impl FlopBreakdown {
    /// Sum of all parts.
    pub fn total(&self) -> f64 {
        self.embed
            + self.attention_proj
            + self.attention_scores
            + self.cross_attention
            + self.ffn
            + self.router
            + self.adaln
            + self.final_layer
    }
}

/// Forward FLOPs per image.
pub fn flops_per_image(registry: &Registry, cfg: &ModelConfig) -> Result<FlopBreakdown> {
    let mm = |m: usize, n: usize, k: usize| 2.0 * m as f64 * n as f64 * k as f64;
    let (t, d, hd, h) = (cfg.tokens(), cfg.hidden, cfg.head_dim(), cfg.mlp_hidden());
    let (heads, kv_dim) = (cfg.heads, cfg.kv_heads * cfg.head_dim());
    let patch = cfg.patch_size * cfg.patch_size;
    let mut f = FlopBreakdown {
        embed: mm(t, d, patch * cfg.in_channels) + mm(1, d, TIMESTEP_FREQ_DIM) + mm(1, d, d),
        final_layer: mm(1, 2 * d, d) + mm(t, patch * cfg.out_channels(), d),
        ..Default::default()
    };
    let text_len = match cfg.conditioning {
        Conditioning::Text {
            text_dim,
            max_tokens,
            pooled,
            ..
        } => {
            f.embed += mm(max_tokens, d, text_dim) + mm(max_tokens, d, d);
            if pooled {
                f.embed += mm(1, d, text_dim) + mm(1, d, d);
            }
            Some(max_tokens)
        }
        Conditioning::Class { .. } => None,
    };
    let moe = match &cfg.moe {
        Some(moe) => Some((moe, registry.expert(&moe.expert)?, activation(registry, cfg, moe)?)),
        None => None,
    };
    for i in 0..cfg.depth {
        f.attention_proj += mm(t, d + 2 * kv_dim, d) + mm(t, d, d);
        f.attention_scores += 2.0 * heads as f64 * mm(t, t, hd);
        if let Some(l) = text_len {
            f.cross_attention += mm(t, d, d) + mm(l, 2 * kv_dim, d) + 2.0 * heads as f64 * mm(t, l, hd) + mm(t, d, d);
        }
        match &moe {
            Some((moe, expert, act)) if moe.is_moe_block(i) => {
                f.router += mm(t, moe.experts, d);
                f.ffn += act.expert_rows_per_image * expert.flops_per_token(d);
            }
            _ => f.ffn += mm(t, h, d) + mm(t, d, h),
        }
        f.adaln += mm(1, 6 * d, d);
    }
    Ok(f)
}

/// Estimated activation memory of one forward, f32.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationMemory {
    /// Batch the estimate is for.
    pub batch: usize,
    /// Inference: the buffers an inference `Model::forward` holds. Every
    /// block reuses one set, so they do not grow with depth; the set holds each
    /// phase's buffers at once (attention, cross-attention, the dense MLP and
    /// the MoE working set) so that a steady state allocates nothing. Attention
    /// keeps no probabilities (the backend's attention never materialises them).
    pub inference_bytes: u64,
    /// Training: everything each block caches for its backward, summed over blocks.
    pub training_bytes: u64,
}

/// Activation estimate at batch `batch` (f32 buffers; see the fields).
pub fn activation_memory(registry: &Registry, cfg: &ModelConfig, batch: usize) -> Result<ActivationMemory> {
    // Counted in f64: exact below 2^53 bytes, and a config with absurd sizes
    // gets an absurd estimate (saturating to u64::MAX) rather than an overflow.
    let (t, d, h, heads) = (
        cfg.tokens() as f64,
        cfg.hidden as f64,
        cfg.mlp_hidden() as f64,
        cfg.heads as f64,
    );
    let kv_dim = (cfg.kv_heads * cfg.head_dim()) as f64;
    let l = match cfg.conditioning {
        Conditioning::Text { max_tokens, .. } => max_tokens as f64,
        Conditioning::Class { .. } => 0.0,
    };
    let moe = match &cfg.moe {
        Some(moe) => Some((moe, activation(registry, cfg, moe)?)),
        None => None,
    };
    // Per image, in floats. Persistent: residual stream, caption tokens.
    let persistent = t * d + l * d;
    // Self-attention: norm, q, k, v, output; training also keeps the probabilities.
    let attn = t * d + t * (d + 2.0 * kv_dim) + t * d;
    let attn_probs = heads * t * t;
    // Cross-attention: q, k, v over the caption, attention output, projection;
    // training also keeps the probabilities.
    let (cross, cross_probs) = if l > 0.0 {
        (t * d + 2.0 * l * kv_dim + 2.0 * t * d, heads * t * l)
    } else {
        (0.0, 0.0)
    };
    let dense_ffn = t * d + 2.0 * t * h + t * d;
    // The shared block buffers: input, two norms and modulated inputs,
    // residuals after attention and cross-attention, the FFN output.
    let block_io = 8.0 * t * d;
    let mut inference = persistent + block_io + attn + cross;
    let (mut any_dense, mut moe_set) = (false, 0.0f64);
    let mut training = 0.0f64;
    for i in 0..cfg.depth {
        // Block input, two normalised+modulated inputs, attention, cross-attention.
        let mut block = 3.0 * t * d + attn + attn_probs + cross + cross_probs;
        match &moe {
            Some((moe, act)) if moe.is_moe_block(i) => {
                let rows = act.expert_rows_per_image.ceil();
                // Input, router scores and probabilities, gathered rows, fc1
                // pre/post GELU, expert outputs, and the combined output
                // (`MoeLayer::forward` writes it while its input is borrowed).
                let moe_live = 2.0 * t * d + 2.0 * t * moe.experts as f64 + rows * (d + 2.0 * h + d);
                moe_set = moe_set.max(moe_live);
                block += moe_live;
            }
            _ => {
                any_dense = true;
                block += dense_ffn;
            }
        }
        training += block;
    }
    inference += moe_set;
    let bytes = |floats: f64| floats * batch as f64 * 4.0;
    // The dense MLP's input and output per image; its hidden buffers hold one
    // chunk of rows whatever the batch.
    let dense_inference = if any_dense {
        bytes(2.0 * t * d) + 4.0 * 2.0 * h * crate::model::chunk_rows(batch, cfg.tokens()) as f64
    } else {
        0.0
    };
    Ok(ActivationMemory {
        batch,
        // `as` saturates: an estimate past u64 reads as u64::MAX.
        inference_bytes: (bytes(inference) + dense_inference) as u64,
        training_bytes: bytes(training) as u64,
    })
}

/// The paper's Table 1 for one member of its family, and its formulas.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PaperFigures {
    /// Family name (XL, XXL, 3XL, M).
    pub family: String,
    /// Table 1 dense parameters (it seems to include the text encoder).
    pub dense_params: f64,
    /// Table 1 total parameters of this MoE model, where the table has it.
    pub total_params: Option<f64>,
    /// Table 1 activated parameters, where the table has it.
    pub activated_params: Option<f64>,
    /// `n_moe * ((E - 1) * 8 d^2 + E d)`: the paper's total-minus-dense.
    pub moe_delta_formula: Option<f64>,
    /// `n_moe * ((f_c - 1) * 8 d^2 + E d)`: the paper's activated-minus-dense.
    pub activated_delta_formula: Option<f64>,
}

/// Table 1 for a config of the paper's family (matched on width, depth,
/// heads and kv heads), else `None`.
pub fn paper_figures(cfg: &ModelConfig, act: Option<&Activation>) -> Option<PaperFigures> {
    let key = (cfg.hidden, cfg.depth, cfg.heads, cfg.kv_heads);
    let (family, dense) = match key {
        (1152, 28, 18, 6) => ("XL", 1.47e9),
        (1536, 38, 24, 6) => ("XXL", 2.35e9),
        (2304, 42, 36, 6) => ("3XL", 4.50e9),
        (3072, 46, 48, 12) | (3072, 38, 48, 12) => ("M", 8.03e9),
        _ => return None,
    };
    let experts = cfg.moe.as_ref().map(|m| m.experts);
    let (total, activated) = match (family, experts, cfg.depth) {
        ("XL", Some(32), _) => (Some(6.08e9), None),
        ("XXL", Some(32), _) => (Some(13.47e9), None),
        ("3XL", Some(32), _) => (Some(32.15e9), None),
        ("M", Some(64), 38) => (Some(97.21e9), Some(8.27e9)),
        _ => (None, None),
    };
    let (moe_delta, activated_delta) = match (&cfg.moe, act) {
        (Some(moe), Some(act)) => {
            let n_moe = (0..cfg.depth).filter(|&i| moe.is_moe_block(i)).count() as f64;
            let (d, e) = (cfg.hidden as f64, moe.experts as f64);
            let ffn = 8.0 * d * d;
            (
                Some(n_moe * ((e - 1.0) * ffn + e * d)),
                Some(n_moe * ((act.experts_per_token - 1.0) * ffn + e * d)),
            )
        }
        _ => (None, None),
    };
    Some(PaperFigures {
        family: family.into(),
        dense_params: dense,
        total_params: total,
        activated_params: activated,
        moe_delta_formula: moe_delta,
        activated_delta_formula: activated_delta,
    })
}

/// Everything `ecdit info` prints for a config.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InfoReport {
    /// Config name.
    pub name: String,
    /// Every tensor of the state dict (including `pos_embed`).
    pub total_params: u64,
    /// `total_params` without the fixed `pos_embed`.
    pub trainable_params: u64,
    /// Parameters one token uses on average (`a` of E experts per MoE layer).
    pub activated_params: u64,
    /// The same model with every MoE layer replaced by its dense FFN.
    pub dense_params: u64,
    /// `total_params - dense_params`.
    pub moe_delta: i64,
    /// `activated_params - dense_params`.
    pub activated_delta: i64,
    /// Of which the expert biases (the paper's formulas leave them out).
    pub expert_bias_params: u64,
    /// Parameters by component.
    pub breakdown: ParamBreakdown,
    /// MoE layers.
    pub moe_layers: usize,
    /// Experts per MoE layer (0 for dense).
    pub experts: usize,
    /// Per-token activation of the MoE layers, if any.
    pub activation: Option<Activation>,
    /// The text encoder's parameters (`text_encoder` of the config or its defaults), not in the counts above.
    pub text_encoder_params: Option<u64>,
    /// Tokens per image.
    pub tokens: usize,
    /// Forward FLOPs per image, by part.
    pub flops: FlopBreakdown,
    /// Total forward FLOPs per image.
    pub flops_per_image: f64,
    /// Forward FLOPs per image of the dense-equivalent model.
    pub dense_flops_per_image: f64,
    /// Weight memory in f32 (4 bytes per parameter).
    pub weight_bytes_f32: u64,
    /// Weight memory in bf16 (2 bytes per parameter).
    pub weight_bytes_bf16: u64,
    /// Activation estimate.
    pub activation_memory: ActivationMemory,
    /// Table 1 of the paper, for its family.
    pub paper: Option<PaperFigures>,
}

/// The dense-equivalent config: every MoE layer replaced by the block's dense
/// FFN (`mlp_ratio`; the paper's experts have that same shape).
pub fn dense_equivalent(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        moe: None,
        ..cfg.clone()
    }
}

/// Builds the report for `cfg` at activation batch `batch`.
pub fn report(registry: &Registry, cfg: &ModelConfig, batch: usize) -> Result<InfoReport> {
    cfg.validate()?;
    let shapes = param_shapes_with(registry, cfg)?;
    let mut breakdown = ParamBreakdown::default();
    let (mut total, mut fixed, mut expert_bias) = (0u64, 0u64, 0u64);
    for (name, shape) in &shapes {
        // Saturating: a config with absurd sizes reports absurd counts, never overflows.
        let n = numel(shape);
        total = total.saturating_add(n);
        breakdown.add(name, n);
        if FIXED_PARAMS.contains(&name.as_str()) {
            fixed = fixed.saturating_add(n);
        }
        if name.contains(".moe.experts.") && name.ends_with(".bias") {
            expert_bias = expert_bias.saturating_add(n);
        }
    }
    let dense_cfg = dense_equivalent(cfg);
    let dense: u64 = param_shapes_with(registry, &dense_cfg)?
        .iter()
        .map(|(_, s)| numel(s))
        .fold(0, u64::saturating_add);
    let (activation, activated, moe_layers, experts) = match &cfg.moe {
        Some(moe) => {
            let act = activation(registry, cfg, moe)?;
            // Experts are used a of E at a time; everything else always.
            let a_over_e = act.experts_per_token / moe.experts as f64;
            let activated = total.saturating_sub(breakdown.experts) as f64 + breakdown.experts as f64 * a_over_e;
            let layers = (0..cfg.depth).filter(|&i| moe.is_moe_block(i)).count();
            (Some(act), activated.round() as u64, layers, moe.experts)
        }
        None => (None, total, 0, 0),
    };
    let text_encoder_params = match &cfg.conditioning {
        Conditioning::Text {
            text_dim, max_tokens, ..
        } => {
            let te: TextEncoderConfig = cfg.text_encoder.clone().unwrap_or_default();
            let vocab = te.load_vocab().map_err(EngineError::from)?.len();
            Some(
                text::param_shapes(&te, vocab, *text_dim, *max_tokens)
                    .iter()
                    .map(|(_, s)| numel(s))
                    .fold(0, u64::saturating_add),
            )
        }
        Conditioning::Class { .. } => None,
    };
    let flops = flops_per_image(registry, cfg)?;
    let dense_flops = flops_per_image(registry, &dense_cfg)?.total();
    let paper = paper_figures(cfg, activation.as_ref());
    Ok(InfoReport {
        name: cfg.name.clone(),
        total_params: total,
        trainable_params: total.saturating_sub(fixed),
        activated_params: activated,
        dense_params: dense,
        moe_delta: (total as i64).saturating_sub(dense as i64),
        activated_delta: (activated as i64).saturating_sub(dense as i64),
        expert_bias_params: expert_bias,
        breakdown,
        moe_layers,
        experts,
        activation,
        text_encoder_params,
        tokens: cfg.tokens(),
        flops_per_image: flops.total(),
        flops,
        dense_flops_per_image: dense_flops,
        weight_bytes_f32: total.saturating_mul(4),
        weight_bytes_bf16: total.saturating_mul(2),
        activation_memory: activation_memory(registry, cfg, batch)?,
        paper,
    })
}

/// `1234567` -> `1.23M`, with B, M, K.
fn human(n: f64) -> String {
    let a = n.abs();
    if a >= 1e12 {
        format!("{:.2}T", n / 1e12)
    } else if a >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Bytes as GiB/MiB.
fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", n / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", n / (1u64 << 20) as f64)
    }
}

impl fmt::Display for InfoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, k: &str, v: String| writeln!(f, "  {k:<28} {v}");
        let count = |n: u64| format!("{:>10}  ({n})", human(n as f64));
        writeln!(f, "{}  ({} tokens per image)", self.name, self.tokens)?;
        writeln!(f, "parameters")?;
        row(f, "total", count(self.total_params))?;
        row(f, "trainable (no pos_embed)", count(self.trainable_params))?;
        row(f, "activated per token", count(self.activated_params))?;
        row(f, "dense equivalent", count(self.dense_params))?;
        if self.moe_layers > 0 {
            row(f, "total - dense", format!("{:>10}", human(self.moe_delta as f64)))?;
            row(
                f,
                "activated - dense",
                format!("{:>10}", human(self.activated_delta as f64)),
            )?;
            row(f, "  of which expert biases", count(self.expert_bias_params))?;
        }
        let b = &self.breakdown;
        for (k, v) in [
            ("embedders", b.embedders),
            ("self-attention", b.attention),
            ("cross-attention", b.cross_attention),
            ("dense FFN", b.ffn),
            ("routers", b.routers),
            ("experts", b.experts),
            ("adaLN", b.adaln),
            ("final layer", b.final_layer),
        ] {
            if v > 0 {
                row(f, &format!("  {k}"), count(v))?;
            }
        }
        if let Some(te) = self.text_encoder_params {
            row(f, "text encoder (apart)", count(te))?;
        }
        if let Some(a) = &self.activation {
            writeln!(f, "routing")?;
            row(
                f,
                "MoE layers x experts",
                format!("{} x {}", self.moe_layers, self.experts),
            )?;
            row(f, "router", a.router.clone())?;
            row(f, "experts per token (mean)", format!("{}", a.experts_per_token))?;
            if let Some(c) = a.capacity {
                row(f, "capacity C per image", c.to_string())?;
            }
        }
        writeln!(f, "forward FLOPs per image")?;
        let fl = &self.flops;
        for (k, v) in [
            ("embed", fl.embed),
            ("attention projections", fl.attention_proj),
            ("attention QK^T + PV", fl.attention_scores),
            ("cross-attention", fl.cross_attention),
            ("FFN / experts", fl.ffn),
            ("router", fl.router),
            ("adaLN", fl.adaln),
            ("final layer", fl.final_layer),
        ] {
            if v > 0.0 {
                row(f, &format!("  {k}"), human(v))?;
            }
        }
        row(f, "total", human(self.flops_per_image))?;
        row(f, "dense equivalent", human(self.dense_flops_per_image))?;
        writeln!(f, "memory")?;
        row(f, "weights f32", bytes(self.weight_bytes_f32))?;
        row(f, "weights bf16", bytes(self.weight_bytes_bf16))?;
        let am = &self.activation_memory;
        row(
            f,
            &format!("activations inference B={}", am.batch),
            bytes(am.inference_bytes),
        )?;
        row(
            f,
            &format!("activations training B={}", am.batch),
            bytes(am.training_bytes),
        )?;
        if let Some(p) = &self.paper {
            writeln!(f, "paper (EC-DiT Table 1, {} family)", p.family)?;
            row(f, "dense (paper)", human(p.dense_params))?;
            if let Some(t) = p.total_params {
                row(
                    f,
                    "total (paper)",
                    format!("{}   ours {}", human(t), human(self.total_params as f64)),
                )?;
            }
            if let Some(a) = p.activated_params {
                row(
                    f,
                    "activated (paper)",
                    format!("{}   ours {}", human(a), human(self.activated_params as f64)),
                )?;
            }
            if let Some(m) = p.moe_delta_formula {
                row(
                    f,
                    "total - dense (formula)",
                    format!("{}   ours {}", human(m), human(self.moe_delta as f64)),
                )?;
            }
            if let Some(a) = p.activated_delta_formula {
                row(
                    f,
                    "activated - dense (formula)",
                    format!("{}   ours {}", human(a), human(self.activated_delta as f64)),
                )?;
            }
        }
        Ok(())
    }
}
