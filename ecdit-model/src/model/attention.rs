//! Self-attention over image tokens with grouped-query heads.
//!
//! With `kv_heads == heads` the projection is upstream's fused `attn.qkv`
//! [3d, d], output channel `which * d + head * head_dim + j` (which: q, k, v).
//! With fewer kv heads it is `attn.q` [d, d] plus `attn.kv` [2 * kv_dim, d],
//! `kv_dim = kv_heads * head_dim`, output channel `which * kv_dim + head *
//! head_dim + j` (which: k, v). Output projection `attn.proj` [d, d].
//!
//! The fused weights are held as input-major chunks (one `[d, part]` block
//! per q, k, v), so each part is one plain gemm, bias fused, straight into the
//! contiguous `[B, T, H, Dh]` tensor the backend's attention reads: no
//! splitting copy, no strided views.

use super::act::Act;
use super::grads::Grads;
use super::linear::Linear;
use ecdit_engine::{AttnDims, Backend, DType, Param, Params, Result, TensorMut, TensorRef};

/// The query/key/value projection.
// One per block, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum QkvProjection {
    /// `attn.qkv`: [3d, d] (multi-head attention, upstream DiT).
    Fused(Linear),
    /// `attn.q`: [d, d] and `attn.kv`: [2 * kv_dim, d] (grouped-query attention).
    Grouped {
        /// Query projection.
        q: Linear,
        /// Key and value projection.
        kv: Linear,
    },
}

/// `blocks.{i}.attn`.
#[derive(Debug)]
pub struct SelfAttention {
    /// Query/key/value projection.
    pub qkv: QkvProjection,
    /// `attn.proj`: [d, d].
    pub proj: Linear,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// What an attention layer computes, kept for backward. S is the number of
/// key tokens: T for self-attention, the text length L for cross-attention.
/// At inference only q, k, v are used (the rest live in the block's shared buffers).
#[derive(Debug, Default)]
pub struct AttentionActs {
    /// [B, T, H, Dh] queries.
    pub q: Act,
    /// [B, S, Hkv, Dh] keys.
    pub k: Act,
    /// [B, S, Hkv, Dh] values.
    pub v: Act,
    /// [B, H, T, S] attention probabilities (training only).
    pub probs: Act,
    /// [B, T, d] attention output before `proj`.
    pub att: Act,
    /// [B, T, d] after `proj` (self-attention: the block gates this;
    /// cross-attention: added to the residual stream).
    pub out: Act,
}

impl AttentionActs {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.probs, &self.att, &self.out]
            .iter()
            .map(|a| a.bytes())
            .sum()
    }
}

impl SelfAttention {
    /// Xavier weights, zero biases; fused qkv when `kv_heads == heads`.
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
        let qkv = if kv_heads == heads {
            QkvProjection::Fused(Linear::fused(backend, &format!("{prefix}.qkv"), 3, 3 * d, d, dtype)?)
        } else {
            QkvProjection::Grouped {
                q: Linear::xavier(backend, &format!("{prefix}.q"), d, d, dtype)?,
                kv: Linear::fused(backend, &format!("{prefix}.kv"), 2, 2 * kv_dim, d, dtype)?,
            }
        };
        Ok(Self {
            qkv,
            proj: Linear::xavier(backend, &format!("{prefix}.proj"), d, d, dtype)?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// Width d.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key/value width `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The attention dims of `batch` samples of `tokens` tokens.
    pub fn dims(&self, batch: usize, tokens: usize) -> AttnDims {
        AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: tokens,
            head_dim: self.head_dim,
        }
    }

    /// The projections, each its own gemm into its own tensor.
    /// q: [B*T, d]; k, v: [B*T, kv_dim]; x: [B*T, d].
    pub fn project(
        &self,
        backend: &dyn Backend,
        q: TensorMut<'_>,
        k: TensorMut<'_>,
        v: TensorMut<'_>,
        x: TensorRef<'_>,
        rows: usize,
    ) -> Result<()> {
        match &self.qkv {
            QkvProjection::Fused(qkv) => {
                qkv.forward_chunk(backend, 0, q, x, rows)?;
                qkv.forward_chunk(backend, 1, k, x, rows)?;
                qkv.forward_chunk(backend, 2, v, x, rows)
            }
            QkvProjection::Grouped { q: q_proj, kv } => {
                q_proj.forward(backend, q, x, rows)?;
                kv.forward_chunk(backend, 0, k, x, rows)?;
                kv.forward_chunk(backend, 1, v, x, rows)
            }
        }
    }
}

impl SelfAttention {
    /// Backward of [`SelfAttention::project`]: parameter gradients
    /// accumulate into `grads`; dx [B*T, d] is overwritten with the input
    /// gradient (the sum over q, k and v).
    #[allow(clippy::too_many_arguments)]
    pub fn project_backward(
        &self,
        backend: &dyn Backend,
        grads: &mut Grads,
        mut dx: TensorMut<'_>,
        dq: TensorRef<'_>,
        dk: TensorRef<'_>,
        dv: TensorRef<'_>,
        x: TensorRef<'_>,
        rows: usize,
    ) -> Result<()> {
        match &self.qkv {
            QkvProjection::Fused(qkv) => {
                for (j, dy) in [dq, dk, dv].into_iter().enumerate() {
                    qkv.backward_chunk(backend, j, grads, Some(dx.reborrow()), j > 0, dy, x, rows)?;
                }
            }
            QkvProjection::Grouped { q, kv } => {
                q.backward(backend, grads, Some(dx.reborrow()), false, dq, x, rows)?;
                kv.backward_chunk(backend, 0, grads, Some(dx.reborrow()), true, dk, x, rows)?;
                kv.backward_chunk(backend, 1, grads, Some(dx.reborrow()), true, dv, x, rows)?;
            }
        }
        Ok(())
    }
}

impl Params for SelfAttention {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        match &self.qkv {
            QkvProjection::Fused(qkv) => qkv.collect(out),
            QkvProjection::Grouped { q, kv } => {
                q.collect(out);
                kv.collect(out);
            }
        }
        self.proj.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        match &mut self.qkv {
            QkvProjection::Fused(qkv) => qkv.collect_mut(out),
            QkvProjection::Grouped { q, kv } => {
                q.collect_mut(out);
                kv.collect_mut(out);
            }
        }
        self.proj.collect_mut(out);
    }
}
