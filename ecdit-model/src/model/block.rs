//! One DiT block, in order (EC-DIT.md section 3):
//! ```text
//! m = adaLN_modulation(SiLU(c))                                // [B, 6d]
//! x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
//! x = x + CrossAttn(x, text)                                   // text-conditioned only
//! x = x + gate_mlp * F(LN(x) * (1 + scale_mlp) + shift_mlp)    // F: MLP or MoE
//! ```

use super::adaln::{adaln_modulation, gated_residual, ln_modulate, Chunk};
use super::attention::{attention_group, AttentionActs, SelfAttention};
use super::buffer::resize;
use super::cross_attention::{CrossAttention, CrossAttentionActs};
use super::linear::Linear;
use super::mlp::{chunk_rows, Mlp, MlpActs};
use super::moe_ffn::MoeFfn;
use super::param::{Param, Params};
use ecdit_engine::{Backend, MoeCache, Result, RoutingStats};

/// Chunks of a block's modulation, in upstream order.
const SHIFT_MSA: usize = 0;
const SCALE_MSA: usize = 1;
const GATE_MSA: usize = 2;
const SHIFT_MLP: usize = 3;
const SCALE_MLP: usize = 4;
const GATE_MLP: usize = 5;
const CHUNKS: usize = 6;

/// The feed-forward of a block.
// One per block, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    /// `blocks.{i}.mlp`: dense GELU MLP.
    Dense(Mlp),
    /// `blocks.{i}.moe`: routed experts.
    Moe(MoeFfn),
}

/// `blocks.{i}`.
pub struct Block {
    /// Block index i.
    pub index: usize,
    /// `adaLN_modulation.1`: [6d, d], zero-initialised.
    pub adaln: Linear,
    /// `attn`.
    pub attn: SelfAttention,
    /// `cross_attn` (text-conditioned models only).
    pub cross_attn: Option<CrossAttention>,
    /// `mlp` or `moe`.
    pub ffn: Ffn,
}

/// The text a block's cross-attention reads.
#[derive(Clone, Copy, Debug)]
pub struct TextContext<'a> {
    /// [B, L, d] projected text tokens.
    pub tokens: &'a [f32],
    /// [B, L], nonzero = real token.
    pub mask: &'a [u8],
    /// L.
    pub len: usize,
}

/// What a block computes, kept for backward (and reused across blocks in an
/// inference forward).
#[derive(Clone, Debug, Default)]
pub struct BlockActs {
    /// [B, T, d] block input.
    pub inp: Vec<f32>,
    /// [B, 6d] modulation chunks.
    pub modulation: Vec<f32>,
    /// [B, T, d] LN(inp); mean, rstd: [B*T].
    pub ln1: Vec<f32>,
    /// [B*T] LayerNorm 1 means.
    pub ln1_mean: Vec<f32>,
    /// [B*T] LayerNorm 1 reciprocal standard deviations.
    pub ln1_rstd: Vec<f32>,
    /// [B, T, d] modulated attention input.
    pub attn_in: Vec<f32>,
    /// Self-attention internals; `attn.out` [B, T, d] is what gets gated.
    pub attn: AttentionActs,
    /// [B, T, d] residual after self-attention (cross-attention input).
    pub x_attn: Vec<f32>,
    /// Cross-attention internals (text-conditioned models).
    pub cross: CrossAttentionActs,
    /// [B, T, d] residual before the FFN.
    pub x_ffn: Vec<f32>,
    /// [B, T, d] LN(x_ffn); mean, rstd: [B*T].
    pub ln2: Vec<f32>,
    /// [B*T] LayerNorm 2 means.
    pub ln2_mean: Vec<f32>,
    /// [B*T] LayerNorm 2 reciprocal standard deviations.
    pub ln2_rstd: Vec<f32>,
    /// [B, T, d] modulated FFN input (the router sees this too).
    pub ffn_in: Vec<f32>,
    /// Dense MLP internals.
    pub mlp: MlpActs,
    /// MoE internals (scores, dispatch, statistics, expert caches).
    pub moe: MoeCache,
    /// [B, T, d] FFN output before gating.
    pub ffn_out: Vec<f32>,
}

impl Block {
    /// Forward one block in place, keeping everything a backward reads.
    /// acts: filled; x: [B, T, d] residual stream (block input in, output out);
    /// silu_c: [B, d]; text: cross-attention context when the block has one.
    /// Returns the MoE layer's routing statistics, if it is one.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut BlockActs,
        x: &mut [f32],
        silu_c: &[f32],
        text: Option<TextContext<'_>>,
        batch: usize,
        tokens: usize,
    ) -> Result<Option<RoutingStats>> {
        let d = self.attn.dim();
        let rows = batch * tokens;
        let ch = |index| Chunk { index, chunks: CHUNKS };
        for buf in [
            &mut acts.ln1,
            &mut acts.attn_in,
            &mut acts.x_attn,
            &mut acts.x_ffn,
            &mut acts.ln2,
            &mut acts.ffn_in,
            &mut acts.ffn_out,
        ] {
            resize(buf, rows * d);
        }
        for buf in [
            &mut acts.ln1_mean,
            &mut acts.ln1_rstd,
            &mut acts.ln2_mean,
            &mut acts.ln2_rstd,
        ] {
            resize(buf, rows);
        }
        resize(&mut acts.modulation, batch * CHUNKS * d);
        acts.inp.clear();
        acts.inp.extend_from_slice(x);

        // m = adaLN_modulation(SiLU(c))
        self.adaln
            .forward_per_sample(backend, &mut acts.modulation, silu_c, batch, 1)?;
        // x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        ln_modulate(
            backend,
            &mut acts.attn_in,
            Some(&mut acts.ln1),
            &mut acts.ln1_mean,
            &mut acts.ln1_rstd,
            x,
            &acts.modulation,
            ch(SHIFT_MSA),
            ch(SCALE_MSA),
            batch,
            tokens,
            d,
        )?;
        self.attn
            .forward(backend, &mut acts.attn, &acts.attn_in, batch, tokens)?;
        gated_residual(x, &acts.attn.out, &acts.modulation, ch(GATE_MSA), batch, tokens, d);
        acts.x_attn.copy_from_slice(x);
        // x = x + CrossAttn(x, text)
        if let (Some(cross), Some(text)) = (&self.cross_attn, text) {
            cross.forward(
                backend,
                &mut acts.cross,
                x,
                text.tokens,
                text.mask,
                batch,
                tokens,
                text.len,
            )?;
            add_in_place(x, &acts.cross.out);
        }
        acts.x_ffn.copy_from_slice(x);
        // x = x + gate_mlp * F(modulate(LN(x), shift_mlp, scale_mlp))
        ln_modulate(
            backend,
            &mut acts.ffn_in,
            Some(&mut acts.ln2),
            &mut acts.ln2_mean,
            &mut acts.ln2_rstd,
            x,
            &acts.modulation,
            ch(SHIFT_MLP),
            ch(SCALE_MLP),
            batch,
            tokens,
            d,
        )?;
        let stats = match &self.ffn {
            Ffn::Dense(mlp) => {
                mlp.forward(backend, &mut acts.ffn_out, &mut acts.mlp, &acts.ffn_in, batch, tokens)?;
                None
            }
            Ffn::Moe(moe) => {
                moe.forward(backend, &mut acts.ffn_out, &mut acts.moe, &acts.ffn_in, batch, tokens)?;
                Some(acts.moe.routing.stats.clone())
            }
        };
        gated_residual(x, &acts.ffn_out, &acts.modulation, ch(GATE_MLP), batch, tokens, d);
        Ok(stats)
    }

    /// Inference forward of one block in place: the same ops, so the same
    /// bits, as [`Block::forward`], in the few buffers of `scratch` (shared
    /// by every block) and keeping nothing for a backward.
    /// x: [B, T, d] residual stream (block input in, output out); silu_c: [B, d].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_inference(
        &self,
        backend: &dyn Backend,
        scratch: &mut BlockScratch,
        x: &mut [f32],
        silu_c: &[f32],
        text: Option<TextContext<'_>>,
        batch: usize,
        tokens: usize,
    ) -> Result<Option<RoutingStats>> {
        let (d, kv_dim, heads) = (self.attn.dim(), self.attn.kv_dim(), self.attn.heads);
        let rows = batch * tokens;
        let ch = |index| Chunk { index, chunks: CHUNKS };
        let group = attention_group(heads, backend.threads(), batch);
        let s = scratch;
        resize(&mut s.modulation, batch * CHUNKS * d);
        resize(&mut s.mean, rows);
        resize(&mut s.rstd, rows);
        resize(&mut s.a, rows * d);
        grow(&mut s.wide, self.inference_wide_len(batch, tokens, group));

        // m = adaLN_modulation(SiLU(c))
        self.adaln
            .forward_per_sample(backend, &mut s.modulation, silu_c, batch, 1)?;
        // x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa)); a: the
        // attention input, then (dead after the projections) its output.
        ln_modulate(
            backend,
            &mut s.a,
            None,
            &mut s.mean,
            &mut s.rstd,
            x,
            &s.modulation,
            ch(SHIFT_MSA),
            ch(SCALE_MSA),
            batch,
            tokens,
            d,
        )?;
        {
            let (q, rest) = s.wide.split_at_mut(rows * d);
            let (k, rest) = rest.split_at_mut(rows * kv_dim);
            let (v, rest) = rest.split_at_mut(rows * kv_dim);
            let (att, rest) = rest.split_at_mut(rows * d);
            let probs = &mut rest[..group * heads * tokens * tokens];
            self.attn.project(backend, q, k, v, &s.a, rows)?;
            self.attn
                .attend(backend, &mut s.a, att, probs, q, k, v, batch, tokens)?;
        }
        gated_residual(x, &s.a, &s.modulation, ch(GATE_MSA), batch, tokens, d);
        // x = x + CrossAttn(x, text)
        if let (Some(cross), Some(text)) = (&self.cross_attn, text) {
            let text_rows = batch * text.len;
            resize(&mut s.text_k, text_rows * cross.kv_dim());
            resize(&mut s.text_v, text_rows * cross.kv_dim());
            // As many samples as fit in the self-attention group's probabilities
            // (the whole batch for short prompts): fewer, larger calls.
            let text_group = (group * tokens / text.len.max(1)).clamp(group, batch.max(1));
            resize(&mut s.text_probs, text_group * heads * tokens * text.len);
            let (q, rest) = s.wide.split_at_mut(rows * d);
            let att = &mut rest[..rows * d];
            cross.project_text(backend, &mut s.text_k, &mut s.text_v, text.tokens, batch, text.len)?;
            cross.q.forward(backend, q, x, rows)?;
            cross.attend(
                backend,
                &mut s.a,
                att,
                &mut s.text_probs,
                q,
                &s.text_k,
                &s.text_v,
                text.mask,
                [batch, tokens, text.len],
            )?;
            add_in_place(x, &s.a);
        }
        // x = x + gate_mlp * F(modulate(LN(x), shift_mlp, scale_mlp))
        ln_modulate(
            backend,
            &mut s.a,
            None,
            &mut s.mean,
            &mut s.rstd,
            x,
            &s.modulation,
            ch(SHIFT_MLP),
            ch(SCALE_MLP),
            batch,
            tokens,
            d,
        )?;
        let (out, rest) = s.wide.split_at_mut(rows * d);
        let stats = match &self.ffn {
            Ffn::Dense(mlp) => {
                let hidden = chunk_rows(batch, tokens) * mlp.hidden();
                let (pre, rest) = rest.split_at_mut(hidden);
                mlp.forward_chunks(backend, out, pre, &mut rest[..hidden], &s.a, batch, tokens)?;
                None
            }
            Ffn::Moe(moe) => {
                moe.forward(backend, out, &mut s.moe, &s.a, batch, tokens)?;
                Some(s.moe.routing.stats.clone())
            }
        };
        gated_residual(x, out, &s.modulation, ch(GATE_MLP), batch, tokens, d);
        Ok(stats)
    }

    /// Floats of [`BlockScratch::wide`] this block's inference forward carves
    /// up: q, k, v, att and the probabilities of a `group` of samples
    /// (self-attention); q, att (cross-attention); the FFN output plus, dense,
    /// one chunk of hidden pre- and post-GELU.
    fn inference_wide_len(&self, batch: usize, tokens: usize, group: usize) -> usize {
        let (d, kv_dim, rows) = (self.attn.dim(), self.attn.kv_dim(), batch * tokens);
        let attn = 2 * rows * d + 2 * rows * kv_dim + group * self.attn.heads * tokens * tokens;
        let ffn = match &self.ffn {
            Ffn::Dense(mlp) => rows * d + 2 * chunk_rows(batch, tokens) * mlp.hidden(),
            Ffn::Moe(_) => rows * d,
        };
        attn.max(ffn)
    }
}

/// The buffers of [`Block::forward_inference`], shared by all blocks of a
/// forward and reused across forwards.
#[derive(Clone, Debug, Default)]
pub struct BlockScratch {
    /// [B, 6d] modulation chunks.
    pub modulation: Vec<f32>,
    /// [B*T] LayerNorm means (not read again).
    pub mean: Vec<f32>,
    /// [B*T] LayerNorm reciprocal standard deviations (not read again).
    pub rstd: Vec<f32>,
    /// [B, T, d] modulated attention input, then the attention output; the
    /// cross-attention output; the modulated FFN input.
    pub a: Vec<f32>,
    /// One allocation for the buffers of one phase: q, k, v, att and the
    /// [n, H, T, T] probabilities of a group of n samples; or the FFN output
    /// and one chunk of MLP hidden activations.
    pub wide: Vec<f32>,
    /// [B, L, kv_dim] text keys.
    pub text_k: Vec<f32>,
    /// [B, L, kv_dim] text values.
    pub text_v: Vec<f32>,
    /// [n, H, T, L] cross-attention probabilities of one group.
    pub text_probs: Vec<f32>,
    /// The MoE layer's buffers (its routing statistics are read after each block).
    pub moe: MoeCache,
}

impl BlockScratch {
    /// Bytes of the f32 buffers held (allocated capacity).
    pub fn bytes(&self) -> usize {
        let moe = &self.moe;
        let floats = [
            &self.modulation,
            &self.mean,
            &self.rstd,
            &self.a,
            &self.wide,
            &self.text_k,
            &self.text_v,
            &self.text_probs,
            &moe.scores,
            &moe.xs,
            &moe.ys,
            &moe.routing.probs,
        ]
        .iter()
        .map(|b| b.capacity())
        .sum::<usize>()
            + moe.expert.buffers.iter().map(Vec::capacity).sum::<usize>();
        floats * std::mem::size_of::<f32>()
    }
}

/// Grows `buf` to at least `len` elements (never shrinks: a scratch buffer
/// serves the largest user).
fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// x += y, element-wise (the cross-attention residual).
fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

impl Params for Block {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.adaln.collect(out);
        self.attn.collect(out);
        if let Some(c) = &self.cross_attn {
            c.collect(out);
        }
        if let Ffn::Dense(mlp) = &self.ffn {
            mlp.collect(out);
        }
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.adaln.collect_mut(out);
        self.attn.collect_mut(out);
        if let Some(c) = &mut self.cross_attn {
            c.collect_mut(out);
        }
        if let Ffn::Dense(mlp) = &mut self.ffn {
            mlp.collect_mut(out);
        }
    }
}

/// The block's adaLN modulation layer.
pub(crate) fn block_adaln(index: usize, d: usize) -> Linear {
    adaln_modulation(&format!("blocks.{index}"), d, CHUNKS)
}
