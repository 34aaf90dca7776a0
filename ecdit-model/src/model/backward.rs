//! The model's backward: [`Model::forward_train`]'s lines in reverse, each
//! layer's own backward beside its forward in its file. Parameter gradients
//! accumulate into a [`Grads`]; the gradients of the model's inputs (the
//! image, the encoded text) land in [`Backprop`] for whoever produced them.

use super::act::Act;
use super::block::{BlockScratch, TextContext};
use super::final_layer::FinalScratch;
use super::grads::Grads;
use super::patch_embed::patch_dims;
use super::{CondEmbedder, Model, ModelActs, ModelResult};
use ecdit_engine::{BackendExt, DType, EngineError, TensorRef, Unary};

/// What a backward computes besides the parameter gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackwardOptions {
    /// Compute the gradient of the input image into [`Backprop::d_x_in`].
    pub input_grad: bool,
    /// Weight of the routers' auxiliary losses in the loss (`d loss / d aux`;
    /// 1 when the loss adds them, 0 when they are not trained on).
    pub grad_aux: f32,
}

/// The backward's buffers, reused from step to step, and the input gradients.
#[derive(Debug, Default)]
pub struct Backprop {
    /// Shared by every block.
    pub block: BlockScratch,
    /// The final layer's.
    pub final_layer: FinalScratch,
    /// [B, T_kept, p*p*C_out] the output gradient in patch rows ([`Model::backward_image`]).
    pub d_out: Act,
    /// [B, T_kept, d] the residual stream's gradient.
    pub dx: Act,
    /// [B, T, d] every token's gradient (token masking: the dropped ones get 0).
    pub dx_all: Act,
    /// [B, T, C*p*p] patch gradients (input gradient only).
    pub d_patches: Act,
    /// [B, C, H, W] gradient of the input image (with `input_grad`).
    pub d_x_in: Act,
    /// [B, d] gradient of SiLU(c), summed over every adaLN.
    pub d_silu_c: Act,
    /// [B, d] gradient of c.
    pub dc: Act,
    /// Hidden gradients of the two-linear embedders.
    pub embed: [Act; 2],
    /// [B, L, d] gradient of the projected caption, summed over the blocks.
    pub d_caption: Act,
    /// [B, L, text_dim] gradient of the encoded text tokens (text models).
    pub d_text_tokens: Act,
    /// [B, text_dim] gradient of the pooled text (models with a pooled term).
    pub d_text_pooled: Act,
}

impl Backprop {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let acts = [
            &self.d_out,
            &self.dx,
            &self.dx_all,
            &self.d_patches,
            &self.d_x_in,
            &self.d_silu_c,
            &self.dc,
            &self.embed[0],
            &self.embed[1],
            &self.d_caption,
            &self.d_text_tokens,
            &self.d_text_pooled,
        ];
        acts.iter().map(|a| a.bytes()).sum::<usize>()
            + self.block.bytes()
            + [
                &self.final_layer.d_modulated,
                &self.final_layer.d_ln,
                &self.final_layer.dmod,
            ]
            .iter()
            .map(|a| a.bytes())
            .sum::<usize>()
    }
}

impl Model {
    /// Backward of [`Model::forward_train`] (or a kept [`Model::forward`]):
    /// dout: [B, T_kept, p*p*C_out], the loss gradient of
    /// [`ModelActs::patch_prediction`]. Parameter gradients accumulate into
    /// `grads`; input gradients land in `bp`.
    pub fn backward(
        &self,
        acts: &ModelActs,
        bp: &mut Backprop,
        grads: &mut Grads,
        dout: TensorRef<'_>,
        opts: BackwardOptions,
    ) -> ModelResult<()> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let (d, p, size) = (c.hidden, c.patch_size, c.input_size);
        let all_tokens = c.tokens();
        let &[b, tokens, _] = acts.x.shape() else {
            return Err(EngineError::Other("model backward: no forward to differentiate".into()).into());
        };
        if acts.blocks.len() != self.blocks.len() {
            return Err(EngineError::Other(
                "model backward: the forward did not keep its activations (use forward_train)".into(),
            )
            .into());
        }
        let masked = tokens != all_tokens;
        let dtype = self.dtype;
        let patch_out = p * p * c.out_channels();
        dout.expect_len("model backward", "dout [B, T_kept, p*p*C_out]", b * tokens * patch_out)?;
        let text = match &self.cond {
            CondEmbedder::Text { .. } => Some(acts.text_tokens.shape()[1]),
            CondEmbedder::Class(_) => None,
        };

        bp.dx.ensure(be, &[b, tokens, d], dtype)?;
        bp.d_silu_c.ensure(be, &[b, d], dtype)?;
        be.fill(bp.d_silu_c.view_mut()?, 0.0)?;
        if let Some(len) = text {
            bp.d_caption.ensure(be, &[b, len, d], dtype)?;
            be.fill(bp.d_caption.view_mut()?, 0.0)?;
        }

        // out = final_layer(x, c)
        self.final_layer.backward(
            be,
            &acts.final_layer,
            &mut bp.final_layer,
            grads,
            bp.dx.view_mut()?,
            bp.d_silu_c.view_mut()?,
            dout.reshape(&[b, tokens, patch_out])?,
            acts.x.view()?,
            acts.silu_c.view()?,
            b,
            tokens,
        )?;

        // blocks, last first
        for (block, block_acts) in self.blocks.iter().zip(&acts.blocks).rev() {
            let (context, d_text) = match text {
                Some(len) => (
                    Some(TextContext {
                        tokens: acts.caption.out.view()?,
                        mask: acts.text_mask.view()?,
                        len,
                    }),
                    Some(bp.d_caption.view_mut()?),
                ),
                None => (None, None),
            };
            block.backward(
                be,
                block_acts,
                &mut bp.block,
                grads,
                bp.dx.view_mut()?,
                bp.d_silu_c.view_mut()?,
                d_text,
                acts.silu_c.view()?,
                context,
                b,
                tokens,
                opts.grad_aux,
            )?;
        }

        // x = gather_kept(x_embedder(patchify(x_in)) + pos_embed); pos_embed is fixed.
        let rows = b * all_tokens;
        let d_embedded = if masked {
            bp.dx_all.ensure(be, &[b, all_tokens, d], dtype)?;
            be.fill(bp.dx_all.view_mut()?, 0.0)?;
            be.scatter_add_rows(bp.dx_all.view_mut()?, bp.dx.view()?, acts.kept.view()?, None, d)?;
            &bp.dx_all
        } else {
            &bp.dx
        };
        let d_patches = if opts.input_grad {
            bp.d_patches.ensure(be, acts.patches.shape(), dtype)?;
            Some(bp.d_patches.view_mut()?)
        } else {
            None
        };
        self.x_embedder.backward(
            be,
            grads,
            d_patches,
            false,
            d_embedded.view()?,
            acts.patches.view()?,
            rows,
        )?;
        if opts.input_grad {
            bp.d_x_in.ensure(be, acts.x_in.shape(), DType::F32)?;
            be.unpatchify(
                bp.d_x_in.view_mut()?,
                bp.d_patches.view()?,
                patch_dims(b, c.in_channels, size, p, false),
            )?;
        }

        // silu_c = SiLU(c); c = t_embedder(t) + y_embedder(cond)
        bp.dc.ensure(be, &[b, d], dtype)?;
        be.unary_backward(Unary::Silu, bp.dc.view_mut()?, bp.d_silu_c.view()?, acts.c.view()?)?;
        self.t_embedder
            .backward(be, &acts.t, &mut bp.embed, grads, bp.dc.view()?)?;
        match &self.cond {
            CondEmbedder::Class(table) => table.backward(be, grads, bp.dc.view()?, acts.labels.view()?)?,
            CondEmbedder::Text {
                caption,
                pooled,
                text_dim,
            } => {
                if let Some(pooled) = pooled {
                    bp.d_text_pooled.ensure(be, &[b, *text_dim], dtype)?;
                    pooled.backward(
                        be,
                        &acts.pooled,
                        &mut bp.embed,
                        grads,
                        Some(bp.d_text_pooled.view_mut()?),
                        bp.dc.view()?,
                        acts.text_pooled.view()?,
                    )?;
                }
                bp.d_text_tokens.ensure(be, acts.text_tokens.shape(), dtype)?;
                caption.backward(
                    be,
                    &acts.caption,
                    &mut bp.embed,
                    grads,
                    Some(bp.d_text_tokens.view_mut()?),
                    bp.d_caption.view()?,
                    acts.text_tokens.view()?,
                )?;
            }
        }
        Ok(())
    }

    /// [`Model::backward`] from the gradient of the image-shaped prediction
    /// dimg [B, C_out, H, W] (host; one upload), as the golden files define it.
    pub fn backward_image(
        &self,
        acts: &ModelActs,
        bp: &mut Backprop,
        grads: &mut Grads,
        dimg: &[f32],
        opts: BackwardOptions,
    ) -> ModelResult<()> {
        let c = &self.config;
        let be = self.backend.as_ref();
        let (p, size, out_ch) = (c.patch_size, c.input_size, c.out_channels());
        let b = acts.t_in.shape().first().copied().unwrap_or(0);
        if acts.x.shape().get(1) != Some(&c.tokens()) {
            return Err(EngineError::Other(
                "model backward_image: the forward masked tokens; its prediction is in patch rows".into(),
            )
            .into());
        }
        let mut img = be.zeros(&[b, out_ch, size, size], DType::F32)?;
        be.write_f32(img.view_mut(), dimg)?;
        bp.d_out.ensure(be, &[b, c.tokens(), p * p * out_ch], self.dtype)?;
        // unpatchify's backward is patchify with the same dims.
        be.patchify(bp.d_out.view_mut()?, img.view(), patch_dims(b, out_ch, size, p, true))?;
        let d_out = std::mem::take(&mut bp.d_out);
        let result = self.backward(acts, bp, grads, d_out.view()?, opts);
        bp.d_out = d_out;
        result
    }
}
