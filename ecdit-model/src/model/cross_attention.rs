//! Cross-attention from image tokens (queries) to the projected text tokens
//! (keys and values), with the prompt's padding mask; a plain residual, no
//! adaLN (PixArt's `MultiHeadCrossAttention`).
//!
//! Names: `cross_attn.q_linear` [d, d], `cross_attn.kv_linear` [2 * kv_dim, d]
//! (output channel `which * kv_dim + head * head_dim + j`, which: k, v),
//! `cross_attn.proj` [d, d]. `proj` starts at zero (PixArt), so a fresh block
//! is still the identity.

use super::attention::split_columns;
use super::buffer::resize;
use super::linear::Linear;
use super::param::{Init, Param, Params};
use ecdit_engine::{AttnDims, Backend, Result};

/// `blocks.{i}.cross_attn`.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossAttention {
    /// `q_linear`: [d, d].
    pub q: Linear,
    /// `kv_linear`: [2 * kv_dim, d].
    pub kv: Linear,
    /// `proj`: [d, d].
    pub proj: Linear,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// What cross-attention computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CrossAttentionActs {
    /// [B, T, H, Dh] queries.
    pub q: Vec<f32>,
    /// [B, L, 2 * kv_dim] kv projection output.
    pub kv: Vec<f32>,
    /// [B, L, Hkv, Dh] keys.
    pub k: Vec<f32>,
    /// [B, L, Hkv, Dh] values.
    pub v: Vec<f32>,
    /// [B, H, T, L] attention probabilities.
    pub probs: Vec<f32>,
    /// [B, T, d] attention output before `proj`.
    pub att: Vec<f32>,
    /// [B, T, d] after `proj` (added to the residual stream).
    pub out: Vec<f32>,
}

impl CrossAttention {
    /// Xavier q/kv, zero `proj`.
    pub fn new(prefix: &str, d: usize, heads: usize, kv_heads: usize) -> Self {
        let head_dim = d / heads;
        let kv_dim = kv_heads * head_dim;
        Self {
            q: Linear::xavier(&format!("{prefix}.q_linear"), d, d),
            kv: Linear::xavier(&format!("{prefix}.kv_linear"), 2 * kv_dim, d),
            proj: Linear::new(&format!("{prefix}.proj"), d, d, Init::Zeros),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// acts: filled (`acts.out` is the result); x: [B, T, d]; text: [B, L, d]
    /// projected text tokens; mask: [B, L], nonzero = real token.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut CrossAttentionActs,
        x: &[f32],
        text: &[f32],
        mask: &[u8],
        batch: usize,
        tokens: usize,
        text_len: usize,
    ) -> Result<()> {
        let d = self.heads * self.head_dim;
        let kv_dim = self.kv_heads * self.head_dim;
        let (rows, text_rows) = (batch * tokens, batch * text_len);
        resize(&mut acts.q, rows * d);
        resize(&mut acts.kv, text_rows * 2 * kv_dim);
        resize(&mut acts.k, text_rows * kv_dim);
        resize(&mut acts.v, text_rows * kv_dim);
        self.q.forward(backend, &mut acts.q, x, rows)?;
        self.kv
            .forward_per_sample(backend, &mut acts.kv, text, batch, text_len)?;
        split_columns(&acts.kv, &mut [&mut acts.k, &mut acts.v], &[kv_dim, kv_dim]);
        let dims = AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: text_len,
            head_dim: self.head_dim,
        };
        resize(&mut acts.probs, batch * self.heads * tokens * text_len);
        resize(&mut acts.att, rows * d);
        resize(&mut acts.out, rows * d);
        backend.attention(
            &mut acts.att,
            &mut acts.probs,
            &acts.q,
            &acts.k,
            &acts.v,
            Some(mask),
            dims,
        )?;
        self.proj.forward(backend, &mut acts.out, &acts.att, rows)
    }
}

impl Params for CrossAttention {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.q.collect(out);
        self.kv.collect(out);
        self.proj.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.q.collect_mut(out);
        self.kv.collect_mut(out);
        self.proj.collect_mut(out);
    }
}
