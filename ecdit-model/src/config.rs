//! Model configuration: a JSON file that round-trips through serde.
//!
//! One struct describes the whole family: class-conditional dense DiT
//! (upstream shapes, so DiT checkpoints load) and the text-conditioned EC-DiT
//! of the paper, whose every other block (indices 1, 3, 5, ...) holds a MoE
//! layer. Components are named by registry specs, so any router, expert and
//! scheduler plugs in.

use crate::limits::{MAX_DEPTH, MAX_SIZE};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the model is conditioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Conditioning {
    /// Class labels (DiT): an embedding table with one extra null class for
    /// classifier-free guidance.
    Class {
        /// Number of real classes; the null class is `num_classes`.
        num_classes: usize,
        /// Label dropout in training (DiT: 0.1).
        #[serde(default = "default_dropout")]
        dropout: f32,
    },
    /// Text prompts through a text encoder and cross-attention.
    Text {
        /// Width of the text encoder's output tokens.
        text_dim: usize,
        /// Longest prompt in tokens; longer ones are truncated with a warning.
        max_tokens: usize,
        /// Prompt dropout in training (replaced by the empty prompt).
        #[serde(default = "default_dropout")]
        dropout: f32,
        /// Add the pooled text embedding to the adaLN conditioning vector.
        #[serde(default)]
        pooled: bool,
    },
}

fn default_dropout() -> f32 {
    0.1
}

/// The MoE layers of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per MoE layer (E).
    pub experts: usize,
    /// A MoE layer every `every` blocks...
    #[serde(default = "default_every")]
    pub every: usize,
    /// ...starting at block `first` (EC-DiT: blocks 1, 3, 5, ...).
    #[serde(default = "default_first")]
    pub first: usize,
    /// Router spec, e.g. `{"kind": "expert-choice", "capacity_factor": 2.0}`.
    pub router: Value,
    /// Expert spec, e.g. `{"kind": "gelu-mlp", "mlp_ratio": 4.0}`.
    pub expert: Value,
}

fn default_every() -> usize {
    2
}
fn default_first() -> usize {
    1
}

impl MoeConfig {
    /// Whether block `i` holds a MoE layer.
    pub fn is_moe_block(&self, i: usize) -> bool {
        i >= self.first && (i - self.first).is_multiple_of(self.every.max(1))
    }
}

/// A whole model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name shown by `ecdit info`.
    pub name: String,
    /// Latent height and width (32 for 256x256 images).
    pub input_size: usize,
    /// Patch size p.
    pub patch_size: usize,
    /// Latent channels (4).
    pub in_channels: usize,
    /// Predict a variance too (DiT): output channels are `2 * in_channels`.
    #[serde(default)]
    pub learn_sigma: bool,
    /// Width d.
    pub hidden: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention); equal to `heads` for MHA.
    pub kv_heads: usize,
    /// Dense FFN hidden width over d (4).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f32,
    /// Class or text conditioning.
    pub conditioning: Conditioning,
    /// MoE layers; `None` = dense model.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    /// Scheduler spec.
    pub scheduler: Value,
    /// Shape of the built-in text encoder (text conditioning only); absent =
    /// the defaults of [`crate::text::TextEncoderConfig`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<crate::text::TextEncoderConfig>,
}

fn default_mlp_ratio() -> f32 {
    4.0
}

impl ModelConfig {
    /// Output channels of the final layer.
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
    /// Tokens per image.
    pub fn tokens(&self) -> usize {
        (self.input_size / self.patch_size).pow(2)
    }
    /// Dense FFN hidden width.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden as f32 * self.mlp_ratio) as usize
    }
    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }
}

impl ModelConfig {
    /// Rejects configs no model can be built from, naming the field and value:
    /// heads that do not divide the width, kv heads that do not divide the
    /// heads, a patch that does not divide the input, zero experts, a width the
    /// 2-D sin-cos position table cannot split, other zero sizes, and sizes
    /// over the bounds of [`crate::limits`] (so shape products cannot overflow).
    pub fn validate(&self) -> ecdit_engine::Result<()> {
        use ecdit_engine::EngineError;
        let bad = |field: &str, value: &dyn std::fmt::Display, reason: String| {
            Err(EngineError::param(
                format!("model config '{}'", self.name),
                field,
                value,
                reason,
            ))
        };
        for (field, value) in [
            ("input_size", self.input_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("hidden", self.hidden),
            ("depth", self.depth),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
        ] {
            if value == 0 {
                return bad(field, &value, "must be at least 1".into());
            }
            let max = if field == "depth" { MAX_DEPTH } else { MAX_SIZE };
            if value > max {
                return bad(field, &value, format!("is over the limit of {max}"));
            }
        }
        if !self.input_size.is_multiple_of(self.patch_size) {
            return bad(
                "patch_size",
                &self.patch_size,
                format!("does not divide input_size {}", self.input_size),
            );
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return bad("heads", &self.heads, format!("does not divide hidden {}", self.hidden));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "kv_heads",
                &self.kv_heads,
                format!("does not divide heads {}", self.heads),
            );
        }
        if !self.hidden.is_multiple_of(4) {
            return bad(
                "hidden",
                &self.hidden,
                "the 2-D sin-cos position table needs a multiple of 4".into(),
            );
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            return bad(
                "mlp_ratio",
                &self.mlp_ratio,
                "must give a hidden width of at least 1".into(),
            );
        }
        if self.mlp_hidden() > MAX_SIZE {
            return bad(
                "mlp_ratio",
                &self.mlp_ratio,
                format!("gives a hidden width over the limit of {MAX_SIZE}"),
            );
        }
        match &self.conditioning {
            Conditioning::Class { num_classes, dropout } => {
                if *num_classes == 0 || *num_classes > MAX_SIZE {
                    return bad(
                        "conditioning.num_classes",
                        num_classes,
                        format!("must be from 1 to {MAX_SIZE}"),
                    );
                }
                if !(0.0..1.0).contains(dropout) {
                    return bad("conditioning.dropout", dropout, "must be in [0, 1)".into());
                }
            }
            Conditioning::Text {
                text_dim,
                max_tokens,
                dropout,
                ..
            } => {
                if *text_dim == 0 || *text_dim > MAX_SIZE {
                    return bad(
                        "conditioning.text_dim",
                        text_dim,
                        format!("must be from 1 to {MAX_SIZE}"),
                    );
                }
                if *max_tokens == 0 || *max_tokens > MAX_SIZE {
                    return bad(
                        "conditioning.max_tokens",
                        max_tokens,
                        format!("must be from 1 to {MAX_SIZE}"),
                    );
                }
                if let Some(enc) = &self.text_encoder {
                    if enc.layers > MAX_DEPTH {
                        return bad(
                            "text_encoder.layers",
                            &enc.layers,
                            format!("is over the limit of {MAX_DEPTH}"),
                        );
                    }
                    let width = enc.mlp_ratio as f64 * *text_dim as f64;
                    if !(enc.mlp_ratio.is_finite() && enc.mlp_ratio > 0.0 && width <= MAX_SIZE as f64) {
                        return bad(
                            "text_encoder.mlp_ratio",
                            &enc.mlp_ratio,
                            format!("must be positive and give a hidden width of at most {MAX_SIZE}"),
                        );
                    }
                }
                if !(0.0..1.0).contains(dropout) {
                    return bad("conditioning.dropout", dropout, "must be in [0, 1)".into());
                }
            }
        }
        if let Some(moe) = &self.moe {
            if moe.experts == 0 {
                return bad(
                    "moe.experts",
                    &moe.experts,
                    "a MoE layer needs at least 1 expert".into(),
                );
            }
            if moe.experts > MAX_SIZE {
                return bad("moe.experts", &moe.experts, format!("is over the limit of {MAX_SIZE}"));
            }
            if moe.every == 0 {
                return bad("moe.every", &moe.every, "must be at least 1".into());
            }
            // `{"tokens": N}` routing groups must hold whole images: found
            // here, not at the first forward. (Plugin routers with groups of
            // their own are checked by `Router::check_tokens_per_sample` when
            // the model is built.)
            let groups = moe.router.get("groups").cloned().map(serde_json::from_value);
            if let Some(Ok(groups @ ecdit_engine::RoutingGroups::Tokens(n))) = groups {
                if let Err(e) = groups.check_fits(self.tokens()) {
                    return bad("moe.router.groups.tokens", &n, e.to_string());
                }
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Reads upstream DiT's config JSON (`input_size`, `patch_size`,
    /// `in_channels`, `hidden_size`, `depth`, `num_heads`, `mlp_ratio`,
    /// `class_dropout_prob`, `num_classes`, `learn_sigma`, optional `name`),
    /// as stored in the metadata of converted checkpoints. Scheduler: DDPM.
    pub fn from_upstream_dit(json: &Value) -> ecdit_engine::Result<Self> {
        use ecdit_engine::EngineError;
        let field = |key: &str| {
            json.get(key)
                .ok_or_else(|| EngineError::param("upstream DiT config", key, "<missing>", "required"))
        };
        let int = |key: &str| -> ecdit_engine::Result<usize> {
            let v = field(key)?;
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| EngineError::param("upstream DiT config", key, v, "expected a non-negative integer"))
        };
        let float = |key: &str| -> ecdit_engine::Result<f32> {
            let v = field(key)?;
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| EngineError::param("upstream DiT config", key, v, "expected a number"))
        };
        let learn_sigma = match field("learn_sigma")? {
            Value::Bool(b) => *b,
            v => {
                return Err(EngineError::param(
                    "upstream DiT config",
                    "learn_sigma",
                    v,
                    "expected a boolean",
                ))
            }
        };
        let heads = int("num_heads")?;
        // Built through serde so fields added later with defaults stay defaulted.
        let ours = serde_json::json!({
            "name": json.get("name").and_then(Value::as_str).unwrap_or("DiT"),
            "input_size": int("input_size")?,
            "patch_size": int("patch_size")?,
            "in_channels": int("in_channels")?,
            "learn_sigma": learn_sigma,
            "hidden": int("hidden_size")?,
            "depth": int("depth")?,
            "heads": heads,
            "kv_heads": heads,
            "mlp_ratio": float("mlp_ratio")?,
            "conditioning": {"class": {"num_classes": int("num_classes")?, "dropout": float("class_dropout_prob")?}},
            "scheduler": {"kind": "ddpm"},
        });
        let config: ModelConfig =
            serde_json::from_value(ours).map_err(|e| EngineError::Other(format!("upstream DiT config: {e}")))?;
        config.validate()?;
        Ok(config)
    }
}
