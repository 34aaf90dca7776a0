//! The inference forward: the same ops as [`Model::forward_acts`], so the
//! same bits, in buffers that keep nothing only a backward would read.
//!
//! What it holds (B images, T tokens, width d, hidden h, L text tokens):
//! ```text
//! x [B, T, d]          residual stream
//! a [B, T, d]          modulated LN input -> attention output -> FFN input
//!                      (-> the final layer's modulated input)
//! wide                 q, k, v, att and the probabilities [n, H, T, T] of a
//!                      group of n samples (self-attention); or the FFN output
//!                      plus one chunk of MLP hidden [2, chunk, h]
//! MoE cache            router scores, gathered rows, expert hidden, outputs
//! ```
//! and the small conditioning and final-layer buffers. No block input, no
//! residual snapshots, no un-modulated LayerNorm output, no full-batch MLP
//! hidden or attention probabilities.

use super::block::BlockScratch;
use super::buffer::resize;
use super::final_layer::FinalActs;
use super::patch_embed::unpatchify;
use super::text_embed::{CaptionActs, PooledActs};
use super::timestep::TimestepActs;
use super::{CondBuffers, Condition, ForwardOutput, Model, ModelResult, TextContext};

/// Buffers of [`Model::forward_with`], reused across calls (a sampler keeps
/// one and calls the forward every step).
#[derive(Clone, Debug, Default)]
pub struct InferenceBuffers {
    /// [B, T, C*p*p] patches.
    pub patches: Vec<f32>,
    /// Timestep embedding; `t.emb` [B, d].
    pub t: TimestepActs,
    /// [B, d] class or pooled-text embedding.
    pub y_emb: Vec<f32>,
    /// Pooled-text embedder buffers.
    pub pooled: PooledActs,
    /// Caption projection; `caption.out` [B, L, d] is what cross-attention reads.
    pub caption: CaptionActs,
    /// [B, d] conditioning vector.
    pub c: Vec<f32>,
    /// [B, d] SiLU(c).
    pub silu_c: Vec<f32>,
    /// [B, T, d] residual stream.
    pub x: Vec<f32>,
    /// Shared by every block.
    pub block: BlockScratch,
    /// Final layer (without the un-modulated LN copy).
    pub final_layer: FinalActs,
}

impl InferenceBuffers {
    /// Bytes of the f32 buffers held (allocated capacity), for memory checks.
    pub fn bytes(&self) -> usize {
        let vecs = [
            &self.patches,
            &self.t.freq,
            &self.t.hidden,
            &self.t.hidden_act,
            &self.t.emb,
            &self.y_emb,
            &self.pooled.hidden,
            &self.pooled.hidden_act,
            &self.pooled.emb,
            &self.caption.hidden,
            &self.caption.hidden_act,
            &self.caption.out,
            &self.c,
            &self.silu_c,
            &self.x,
            &self.final_layer.modulation,
            &self.final_layer.ln,
            &self.final_layer.ln_mean,
            &self.final_layer.ln_rstd,
            &self.final_layer.modulated,
            &self.final_layer.out,
        ];
        vecs.iter().map(|v| v.capacity()).sum::<usize>() * std::mem::size_of::<f32>() + self.block.bytes()
    }
}

impl Model {
    /// The inference forward into reused buffers: [`Model::forward`]'s
    /// result, the same bits as [`Model::forward_acts`], holding only what
    /// the next op reads (see the module docs).
    /// x: [B, C, H, W]; t: [B]; returns out: [B, C_out, H, W] and routing stats.
    pub fn forward_with(
        &self,
        buf: &mut InferenceBuffers,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
    ) -> ModelResult<ForwardOutput> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let b = self.check_inputs(x, t)?;
        let tokens = c.tokens();

        // x = x_embedder(patchify(x)) + pos_embed
        resize(&mut buf.x, b * tokens * c.hidden);
        self.embed_patches(&mut buf.x, &mut buf.patches, x, b)?;
        self.add_pos_embed(&mut buf.x);
        // c = t_embedder(t) + y_embedder(cond)
        let text_ctx = self.embed_condition(
            CondBuffers {
                t: &mut buf.t,
                y_emb: &mut buf.y_emb,
                pooled: &mut buf.pooled,
                caption: &mut buf.caption,
                c: &mut buf.c,
                silu_c: &mut buf.silu_c,
            },
            t,
            cond,
        )?;

        let mut routing = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let text = text_ctx.map(|(mask, len)| TextContext {
                tokens: &buf.caption.out,
                mask,
                len,
            });
            if let Some(stats) =
                block.forward_inference(be, &mut buf.block, &mut buf.x, &buf.silu_c, text, b, tokens)?
            {
                routing.push((i, stats));
            }
        }

        // out = unpatchify(final_layer(x, c)); the blocks' [B, T, d] scratch
        // `a` is free now and serves as the final layer's modulated input.
        std::mem::swap(&mut buf.final_layer.modulated, &mut buf.block.a);
        let result = self
            .final_layer
            .forward_into(be, &mut buf.final_layer, false, &buf.x, &buf.silu_c, b, tokens);
        std::mem::swap(&mut buf.final_layer.modulated, &mut buf.block.a);
        result?;
        let (size, out_ch) = (c.input_size, c.out_channels());
        let mut out = vec![0.0; b * out_ch * size * size];
        unpatchify(&mut out, &buf.final_layer.out, b, out_ch, size, c.patch_size);
        Ok(ForwardOutput { out, routing })
    }
}
