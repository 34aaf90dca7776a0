//! Cross-attention from image tokens (queries) to the projected text tokens
//! (keys and values), with the prompt's padding mask; a plain residual, no
//! adaLN (PixArt's `MultiHeadCrossAttention`).
//!
//! Names: `cross_attn.q_linear` [d, d], `cross_attn.kv_linear` [2 * kv_dim, d]
//! (output channel `which * kv_dim + head * head_dim + j`, which: k, v),
//! `cross_attn.proj` [d, d]. `proj` starts at zero (PixArt), so a fresh block
//! is still the identity.

use super::attention::{attention_in_groups, AttentionActs};
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

/// What cross-attention computes, kept for backward: the same buffers as
/// self-attention's, with the text length L as the key length.
pub type CrossAttentionActs = AttentionActs;

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

    /// Key/value width `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
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
        let (rows, text_rows) = (batch * tokens, batch * text_len);
        acts.resize_for(
            rows,
            text_rows,
            d,
            self.kv_dim(),
            batch * self.heads * tokens * text_len,
        );
        self.project_text(backend, &mut acts.k, &mut acts.v, text, batch, text_len)?;
        self.q.forward(backend, &mut acts.q, x, rows)?;
        self.attend(
            backend,
            &mut acts.out,
            &mut acts.att,
            &mut acts.probs,
            &acts.q,
            &acts.k,
            &acts.v,
            mask,
            [batch, tokens, text_len],
        )
    }

    /// Keys and values of the text, one prompt at a time (see
    /// [`Linear::forward_per_sample`]), each from its rows of `kv_linear`.
    /// k, v: [B, L, kv_dim]; text: [B, L, d].
    pub(crate) fn project_text(
        &self,
        backend: &dyn Backend,
        k: &mut [f32],
        v: &mut [f32],
        text: &[f32],
        batch: usize,
        text_len: usize,
    ) -> Result<()> {
        let kv_dim = self.kv_dim();
        self.kv
            .forward_features_per_sample(backend, k, text, batch, text_len, 0..kv_dim)?;
        self.kv
            .forward_features_per_sample(backend, v, text, batch, text_len, kv_dim..2 * kv_dim)
    }

    /// out = proj(masked attention(q, k, v)) in groups of `probs.len() / (H T L)`
    /// samples. out, att, q: [B, T, d]; probs: [n, H, T, L]; k, v: [B, L, kv_dim];
    /// mask: [B, L]; `[batch, tokens, text_len]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        att: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[u8],
        [batch, tokens, text_len]: [usize; 3],
    ) -> Result<()> {
        let dims = AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: text_len,
            head_dim: self.head_dim,
        };
        attention_in_groups(backend, att, probs, q, k, v, Some(mask), dims)?;
        self.proj.forward(backend, out, att, batch * tokens)
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
