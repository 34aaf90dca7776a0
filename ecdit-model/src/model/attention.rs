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
use ecdit_engine::error::check_len;
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

/// What an attention layer computes, kept for backward. S is the number of
/// key tokens: T for self-attention, the text length L for cross-attention.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionActs {
    /// [B, T, H, Dh] queries.
    pub q: Vec<f32>,
    /// [B, S, Hkv, Dh] keys.
    pub k: Vec<f32>,
    /// [B, S, Hkv, Dh] values.
    pub v: Vec<f32>,
    /// [B, H, T, S] attention probabilities.
    pub probs: Vec<f32>,
    /// [B, T, d] attention output before `proj`.
    pub att: Vec<f32>,
    /// [B, T, d] after `proj` (self-attention: the block gates this;
    /// cross-attention: added to the residual stream).
    pub out: Vec<f32>,
}

impl AttentionActs {
    /// Sizes every buffer for `rows = B * T` query rows and `key_rows = B * S`
    /// key rows, reusing the allocations; `probs` gets `probs_len` elements.
    pub(crate) fn resize_for(&mut self, rows: usize, key_rows: usize, d: usize, kv_dim: usize, probs_len: usize) {
        resize(&mut self.q, rows * d);
        resize(&mut self.k, key_rows * kv_dim);
        resize(&mut self.v, key_rows * kv_dim);
        resize(&mut self.probs, probs_len);
        resize(&mut self.att, rows * d);
        resize(&mut self.out, rows * d);
    }
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

    /// Width d.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key/value width `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
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
        let (d, kv_dim, rows) = (self.dim(), self.kv_dim(), batch * tokens);
        acts.resize_for(rows, rows, d, kv_dim, batch * self.heads * tokens * tokens);
        self.project(backend, &mut acts.q, &mut acts.k, &mut acts.v, x, rows)?;
        self.attend(
            backend,
            &mut acts.out,
            &mut acts.att,
            &mut acts.probs,
            &acts.q,
            &acts.k,
            &acts.v,
            batch,
            tokens,
        )
    }

    /// The projections, each straight into its own buffer from its rows of
    /// the (fused) weight, so no splitting copy.
    /// q: [B*T, d]; k, v: [B*T, kv_dim]; x: [B*T, d].
    pub(crate) fn project(
        &self,
        backend: &dyn Backend,
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        x: &[f32],
        rows: usize,
    ) -> Result<()> {
        let (d, kv_dim) = (self.dim(), self.kv_dim());
        match &self.qkv {
            QkvProjection::Fused(qkv) => {
                qkv.forward_features(backend, q, x, rows, 0..d)?;
                qkv.forward_features(backend, k, x, rows, d..2 * d)?;
                qkv.forward_features(backend, v, x, rows, 2 * d..3 * d)
            }
            QkvProjection::Grouped { q: q_proj, kv } => {
                q_proj.forward(backend, q, x, rows)?;
                kv.forward_features(backend, k, x, rows, 0..kv_dim)?;
                kv.forward_features(backend, v, x, rows, kv_dim..2 * kv_dim)
            }
        }
    }

    /// out = proj(attention(q, k, v)), in groups of `probs.len() / (H T T)`
    /// samples (see [`attention_in_groups`]).
    /// out, att: [B, T, d]; probs: [n, H, T, T], 1 <= n <= B; q: [B, T, H, Dh]; k, v: [B, T, Hkv, Dh].
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
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let dims = AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: tokens,
            kv_len: tokens,
            head_dim: self.head_dim,
        };
        attention_in_groups(backend, att, probs, q, k, v, None, dims)?;
        self.proj.forward(backend, out, att, batch * tokens)
    }
}

/// Samples per attention call: the backend runs a call's `(sample, head)`
/// pairs side by side, so a group gives every thread the same number of
/// pairs (`lcm(heads, threads) / heads` samples, or a multiple) and at least
/// [`PAIRS_PER_THREAD`] of them, so a thread the OS preempts delays the call
/// less. At most `batch`.
pub(crate) fn attention_group(heads: usize, threads: usize, batch: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let (heads, threads) = (heads.max(1), threads.max(1));
    let even = threads / gcd(heads, threads);
    let wanted = (PAIRS_PER_THREAD * threads).div_ceil(even * heads);
    (even * wanted).clamp(1, batch.max(1))
}

/// Minimum `(sample, head)` pairs per thread in one grouped attention call.
const PAIRS_PER_THREAD: usize = 4;

/// [`Backend::attention`] on groups of `n = probs.len() / (H Tq Tk)` samples,
/// so an inference forward holds the probabilities of one group, not of the
/// batch. The backend computes each (sample, head) on its own, so the bits
/// do not depend on the grouping.
/// out, q: [B, Tq, H, Dh]; probs: [n, H, Tq, Tk]; k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk].
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_in_groups(
    backend: &dyn Backend,
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[u8]>,
    dims: AttnDims,
) -> Result<()> {
    const OP: &str = "attention (in groups)";
    let per_sample = dims.heads * dims.q_len * dims.kv_len;
    let group = probs.len().checked_div(per_sample).unwrap_or(dims.batch);
    if group >= dims.batch || group == 0 {
        // The whole batch at once (or a probs buffer the backend rejects by name).
        return backend.attention(out, probs, q, k, v, key_mask, dims);
    }
    let (q_len, kv_len) = (
        dims.q_len * dims.heads * dims.head_dim,
        dims.kv_len * dims.kv_heads * dims.head_dim,
    );
    check_len(OP, "out", out.len(), dims.batch * q_len)?;
    check_len(OP, "q", q.len(), dims.batch * q_len)?;
    check_len(OP, "k", k.len(), dims.batch * kv_len)?;
    check_len(OP, "v", v.len(), dims.batch * kv_len)?;
    if let Some(mask) = key_mask {
        check_len(OP, "key_mask", mask.len(), dims.batch * dims.kv_len)?;
    }
    for start in (0..dims.batch).step_by(group) {
        let n = group.min(dims.batch - start);
        let (qs, ks) = (start * q_len..(start + n) * q_len, start * kv_len..(start + n) * kv_len);
        let mask = key_mask.map(|m| &m[start * dims.kv_len..(start + n) * dims.kv_len]);
        backend.attention(
            &mut out[qs.clone()],
            &mut probs[..n * per_sample],
            &q[qs],
            &k[ks.clone()],
            &v[ks],
            mask,
            AttnDims { batch: n, ..dims },
        )?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::attention_group;

    #[test]
    fn attention_groups_split_pairs_evenly_over_threads() {
        // (heads, threads) -> samples per call: pairs a multiple of threads, >= 4 per thread.
        assert_eq!(attention_group(6, 2, 8), 2);
        assert_eq!(attention_group(4, 2, 3), 2);
        assert_eq!(attention_group(1, 1, 5), 4);
        assert_eq!(attention_group(6, 4, 8), 4);
        // Capped by the batch.
        assert_eq!(attention_group(6, 16, 8), 8);
        assert_eq!(attention_group(6, 2, 1), 1);
        for heads in 1..=12 {
            for threads in 1..=16 {
                let g = attention_group(heads, threads, usize::MAX);
                assert_eq!(g * heads % threads, 0, "{heads} heads, {threads} threads");
                assert!(g * heads >= 4 * threads, "{heads} heads, {threads} threads");
            }
        }
    }
}
