//! Cross-attention from image tokens (queries) to the projected text tokens
//! (keys and values), with the prompt's padding mask; a plain residual, no
//! adaLN (PixArt's `MultiHeadCrossAttention`).
//!
//! Names: `cross_attn.q_linear` [d, d], `cross_attn.kv_linear` [2 * kv_dim, d]
//! (output channel `which * kv_dim + head * head_dim + j`, which: k, v; held
//! as two input-major chunks), `cross_attn.proj` [d, d]. `proj` starts at
//! zero (PixArt), so a fresh block is still the identity.

use super::linear::Linear;
use ecdit_engine::{AttnDims, Backend, DType, Init, Param, Params, Result, TensorMut, TensorRef};

/// `blocks.{i}.cross_attn`.
#[derive(Debug)]
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

impl CrossAttention {
    /// Xavier q/kv, zero `proj`.
    pub fn new(
        backend: &dyn Backend,
        prefix: &str,
        d: usize,
        heads: usize,
        kv_heads: usize,
        dtype: DType,
    ) -> Result<Self> {
        let head_dim = d / heads;
        let kv_dim = kv_heads * head_dim;
        Ok(Self {
            q: Linear::xavier(backend, &format!("{prefix}.q_linear"), d, d, dtype)?,
            kv: Linear::fused(backend, &format!("{prefix}.kv_linear"), 2, 2 * kv_dim, d, dtype)?,
            proj: Linear::new(backend, &format!("{prefix}.proj"), d, d, Init::Zeros, dtype)?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// Key/value width `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The attention dims of `batch` samples of `tokens` queries and `text_len` keys.
    pub fn dims(&self, batch: usize, tokens: usize, text_len: usize) -> AttnDims {
        AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: text_len,
            head_dim: self.head_dim,
        }
    }

    /// Keys and values of the text, one prompt at a time (see
    /// [`Linear::forward_per_sample`]). k, v: [B, L, kv_dim]; text: [B, L, d].
    pub fn project_text(
        &self,
        backend: &dyn Backend,
        k: TensorMut<'_>,
        v: TensorMut<'_>,
        text: TensorRef<'_>,
        batch: usize,
        text_len: usize,
    ) -> Result<()> {
        self.kv.forward_per_sample(backend, k, text, batch, text_len, Some(0))?;
        self.kv.forward_per_sample(backend, v, text, batch, text_len, Some(1))
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
