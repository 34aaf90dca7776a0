//! One DiT block, in order (EC-DIT.md section 3):
//! ```text
//! m = adaLN_modulation(SiLU(c))                                // [B, 6d]
//! x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
//! x = x + CrossAttn(x, text)                                   // text-conditioned only
//! x = x + gate_mlp * F(LN(x) * (1 + scale_mlp) + shift_mlp)    // F: MLP or MoE
//! ```

use super::adaln::{adaln_modulation, gated_residual, modulate, Chunk, LN_EPS};
use super::attention::{AttentionActs, SelfAttention};
use super::buffer::resize;
use super::cross_attention::{CrossAttention, CrossAttentionActs};
use super::linear::Linear;
use super::mlp::{Mlp, MlpActs};
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
    /// Forward one block in place.
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
        let d = self.attn.heads * self.attn.head_dim;
        let rows = batch * tokens;
        let ch = |index| Chunk { index, chunks: CHUNKS };
        for buf in [
            &mut acts.ln1,
            &mut acts.attn_in,
            &mut acts.x_attn,
            &mut acts.x_ffn,
            &mut acts.ln2,
        ] {
            resize(buf, rows * d);
        }
        for buf in [&mut acts.ffn_in, &mut acts.ffn_out] {
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
        backend.layer_norm(
            &mut acts.ln1,
            &mut acts.ln1_mean,
            &mut acts.ln1_rstd,
            x,
            None,
            None,
            rows,
            d,
            LN_EPS,
        )?;
        modulate(
            &mut acts.attn_in,
            &acts.ln1,
            &acts.modulation,
            ch(SHIFT_MSA),
            ch(SCALE_MSA),
            batch,
            tokens,
            d,
        );
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
            x.iter_mut().zip(&acts.cross.out).for_each(|(a, b)| *a += b);
        }
        acts.x_ffn.copy_from_slice(x);
        // x = x + gate_mlp * F(modulate(LN(x), shift_mlp, scale_mlp))
        backend.layer_norm(
            &mut acts.ln2,
            &mut acts.ln2_mean,
            &mut acts.ln2_rstd,
            x,
            None,
            None,
            rows,
            d,
            LN_EPS,
        )?;
        modulate(
            &mut acts.ffn_in,
            &acts.ln2,
            &acts.modulation,
            ch(SHIFT_MLP),
            ch(SCALE_MLP),
            batch,
            tokens,
            d,
        );
        let stats = match &self.ffn {
            Ffn::Dense(mlp) => {
                mlp.forward(backend, &mut acts.ffn_out, &mut acts.mlp, &acts.ffn_in, rows)?;
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
