//! Model configuration: a JSON file that round-trips through serde.
//!
//! One struct describes the whole family: class-conditional dense DiT
//! (upstream shapes, so DiT checkpoints load) and the text-conditioned EC-DiT
//! of the paper, whose every other block (indices 1, 3, 5, ...) holds a MoE
//! layer. Components are named by registry specs, so any router, expert and
//! scheduler plugs in.

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
        i >= self.first && (i - self.first) % self.every.max(1) == 0
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
