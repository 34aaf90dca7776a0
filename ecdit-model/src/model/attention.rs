//! Self-attention over image tokens with grouped-query heads.
//!
//! With `kv_heads == heads` the projection is upstream's fused `attn.qkv`
//! [3d, d], output channel `which * d + head * head_dim + j` (which: q, k, v).
//! With fewer kv heads it is `attn.q` [d, d] plus `attn.kv` [2 * kv_dim, d],
//! `kv_dim = kv_heads * head_dim`, output channel `which * kv_dim + head *
//! head_dim + j` (which: k, v). Output projection `attn.proj` [d, d].

use super::buffer::resize;
use super::linear::Linear;
use super::param::{Param, Params};
use ecdit_engine::{AttnDims, Backend, Result};

/// The query/key/value projection.
// One per block, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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

/// What self-attention computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionActs {
    /// Fused: [B, T, 3d] qkv output; grouped: [B, T, 2 * kv_dim] kv output.
    pub proj_in: Vec<f32>,
    /// [B, T, H, Dh] queries.
    pub q: Vec<f32>,
    /// [B, T, Hkv, Dh] keys.
    pub k: Vec<f32>,
    /// [B, T, Hkv, Dh] values.
    pub v: Vec<f32>,
    /// [B, H, T, T] attention probabilities.
    pub probs: Vec<f32>,
    /// [B, T, d] attention output before `proj`.
    pub att: Vec<f32>,
    /// [B, T, d] after `proj` (the block gates this).
    pub out: Vec<f32>,
}

impl SelfAttention {
    /// Xavier weights, zero biases; fused qkv when `kv_heads == heads`.
    pub fn new(prefix: &str, d: usize, heads: usize, kv_heads: usize) -> Self {
        let head_dim = d / heads;
        let kv_dim = kv_heads * head_dim;
        let qkv = if kv_heads == heads {
            QkvProjection::Fused(Linear::xavier(&format!("{prefix}.qkv"), 3 * d, d))
        } else {
            QkvProjection::Grouped {
                q: Linear::xavier(&format!("{prefix}.q"), d, d),
                kv: Linear::xavier(&format!("{prefix}.kv"), 2 * kv_dim, d),
            }
        };
        Self {
            qkv,
            proj: Linear::xavier(&format!("{prefix}.proj"), d, d),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// acts: filled (`acts.out` is the result); x: [B, T, d].
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut AttentionActs,
        x: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let d = self.heads * self.head_dim;
        let kv_dim = self.kv_heads * self.head_dim;
        let rows = batch * tokens;
        resize(&mut acts.q, rows * d);
        resize(&mut acts.k, rows * kv_dim);
        resize(&mut acts.v, rows * kv_dim);
        match &self.qkv {
            QkvProjection::Fused(qkv) => {
                resize(&mut acts.proj_in, rows * 3 * d);
                qkv.forward(backend, &mut acts.proj_in, x, rows)?;
                split_columns(&acts.proj_in, &mut [&mut acts.q, &mut acts.k, &mut acts.v], &[d, d, d]);
            }
            QkvProjection::Grouped { q, kv } => {
                resize(&mut acts.proj_in, rows * 2 * kv_dim);
                q.forward(backend, &mut acts.q, x, rows)?;
                kv.forward(backend, &mut acts.proj_in, x, rows)?;
                split_columns(&acts.proj_in, &mut [&mut acts.k, &mut acts.v], &[kv_dim, kv_dim]);
            }
        }
        let dims = AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: tokens,
            head_dim: self.head_dim,
        };
        resize(&mut acts.probs, batch * self.heads * tokens * tokens);
        resize(&mut acts.att, rows * d);
        resize(&mut acts.out, rows * d);
        backend.attention(&mut acts.att, &mut acts.probs, &acts.q, &acts.k, &acts.v, None, dims)?;
        self.proj.forward(backend, &mut acts.out, &acts.att, rows)
    }
}

/// Splits each row of `src` into consecutive column blocks of `widths`,
/// one destination each. src: [rows, sum(widths)]; dst[i]: [rows, widths[i]].
pub(crate) fn split_columns(src: &[f32], dst: &mut [&mut Vec<f32>], widths: &[usize]) {
    let total: usize = widths.iter().sum();
    for (r, row) in src.chunks(total).enumerate() {
        let mut at = 0;
        for (part, &w) in dst.iter_mut().zip(widths) {
            part[r * w..(r + 1) * w].copy_from_slice(&row[at..at + w]);
            at += w;
        }
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
