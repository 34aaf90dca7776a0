//! One DiT block, in order (EC-DIT.md section 3):
//! ```text
//! m = adaLN_modulation(SiLU(c))                                // [B, 6d]
//! x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
//! x = x + CrossAttn(x, text)                                   // text-conditioned only
//! x = x + gate_mlp * F(LN(x) * (1 + scale_mlp) + shift_mlp)    // F: MLP or MoE
//! ```
//! One forward serves training and inference. Kept (training), each block
//! has its own [`BlockActs`] and every tensor a backward reads gets its own
//! buffer. At inference all blocks share one [`BlockActs`] and two `[B, T, d]`
//! buffers (`ln1`, `attn_in`) take turns as LN output, modulated input,
//! attention output and FFN output; attention keeps no probabilities. The
//! ops, hence the bits, are the same either way.

use super::act::Act;
use super::adaln::{adaln_modulation, chunks, ln_modulate};
use super::attention::{AttentionActs, SelfAttention};
use super::cross_attention::CrossAttention;
use super::grads::Grads;
use super::linear::Linear;
use super::mlp::{Mlp, MlpActs};
use super::moe_ffn::MoeFfn;
use ecdit_engine::{Backend, DType, DeviceRouting, MoeCache, Param, Params, Result, RowDims, TensorMut, TensorRef};
use std::sync::Arc;

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
#[derive(Debug)]
pub enum Ffn {
    /// `blocks.{i}.mlp`: dense GELU MLP.
    Dense(Mlp),
    /// `blocks.{i}.moe`: routed experts.
    Moe(MoeFfn),
}

/// `blocks.{i}`.
#[derive(Debug)]
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
    pub tokens: TensorRef<'a>,
    /// [B, L] u8, nonzero = real token.
    pub mask: TensorRef<'a>,
    /// L.
    pub len: usize,
}

/// What a block computes. Kept (training): everything a backward reads.
/// Shared (inference): `inp`, `x_attn`, `x_ffn`, `attn.{att, out, probs}`,
/// `cross.{q, att, out, probs}`, `ln2*`, `ffn_in` and `ffn_out` stay empty;
/// `ln1` and `attn_in` serve in turn (see the module docs); `moe` stays
/// empty (the MoE layer keeps nothing at inference).
#[derive(Debug, Default)]
pub struct BlockActs {
    /// [B, T, d] block input.
    pub inp: Act,
    /// [B, 6d] modulation chunks.
    pub modulation: Act,
    /// [B, T, d] LN(inp).
    pub ln1: Act,
    /// [B*T] LayerNorm 1 means (f32).
    pub ln1_mean: Act,
    /// [B*T] LayerNorm 1 reciprocal standard deviations (f32).
    pub ln1_rstd: Act,
    /// [B, T, d] modulated attention input.
    pub attn_in: Act,
    /// Self-attention internals; `attn.out` [B, T, d] is what gets gated.
    pub attn: AttentionActs,
    /// [B, T, d] residual after self-attention (cross-attention input).
    pub x_attn: Act,
    /// Cross-attention internals (text-conditioned models); `k`, `v` [B, L, kv_dim].
    pub cross: AttentionActs,
    /// [B, T, d] residual before the FFN.
    pub x_ffn: Act,
    /// [B, T, d] LN(x_ffn).
    pub ln2: Act,
    /// [B*T] LayerNorm 2 means (f32).
    pub ln2_mean: Act,
    /// [B*T] LayerNorm 2 reciprocal standard deviations (f32).
    pub ln2_rstd: Act,
    /// [B, T, d] modulated FFN input (the router sees this too).
    pub ffn_in: Act,
    /// Dense MLP internals.
    pub mlp: MlpActs,
    /// MoE internals kept for backward (scores, routing, gathered rows, expert hidden).
    pub moe: MoeCache,
    /// [B, T, d] FFN output before gating.
    pub ffn_out: Act,
    /// The routing of the last forward through this buffer (MoE blocks).
    pub routing: Option<Arc<DeviceRouting>>,
}

/// Scratch of a block's backward, shared by every block (and reused from
/// step to step): gradients of the sub-layers' outputs and inputs.
#[derive(Debug, Default)]
pub struct BlockScratch {
    /// [B, T, d] twice: the gradient of one sub-layer's output, then its input.
    pub d1: Act,
    /// See `d1`.
    pub d2: Act,
    /// [B*T, d] query gradient.
    pub dq: Act,
    /// [B*T, kv_dim] key gradient.
    pub dk: Act,
    /// [B*T, kv_dim] value gradient.
    pub dv: Act,
    /// [B*L, kv_dim] cross-attention key gradient.
    pub dk_text: Act,
    /// [B*L, kv_dim] cross-attention value gradient.
    pub dv_text: Act,
    /// [B, 6d] modulation gradient.
    pub dmod: Act,
    /// The dense MLP's hidden gradients.
    pub mlp: MlpActs,
}

impl BlockScratch {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        [
            &self.d1,
            &self.d2,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.dk_text,
            &self.dv_text,
            &self.dmod,
        ]
        .iter()
        .map(|a| a.bytes())
        .sum::<usize>()
            + self.mlp.bytes()
    }
}

impl BlockActs {
    /// Bytes held by the activation buffers (MoE caches included).
    pub fn bytes(&self) -> usize {
        let acts = [
            &self.inp,
            &self.modulation,
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.attn_in,
            &self.x_attn,
            &self.x_ffn,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.ffn_in,
            &self.ffn_out,
        ]
        .iter()
        .map(|a| a.bytes())
        .sum::<usize>();
        let tensor_bytes = |t: &Option<ecdit_engine::Tensor>| t.as_ref().map_or(0, |t| t.numel() * t.dtype().size());
        let moe = [&self.moe.scores, &self.moe.xs, &self.moe.ys]
            .into_iter()
            .map(tensor_bytes)
            .sum::<usize>()
            + self
                .moe
                .expert
                .tensors
                .iter()
                .map(|t| t.numel() * t.dtype().size())
                .sum::<usize>();
        acts + self.attn.bytes() + self.cross.bytes() + self.mlp.bytes() + moe
    }
}

impl Block {
    /// A block of width `d` (its MoE layer, if any, built by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &dyn Backend,
        index: usize,
        d: usize,
        heads: usize,
        kv_heads: usize,
        text: bool,
        ffn: Ffn,
        dtype: DType,
    ) -> Result<Self> {
        let prefix = format!("blocks.{index}");
        Ok(Self {
            index,
            adaln: adaln_modulation(backend, &prefix, d, CHUNKS, dtype)?,
            attn: SelfAttention::new(backend, &format!("{prefix}.attn"), d, heads, kv_heads, dtype)?,
            cross_attn: text
                .then(|| CrossAttention::new(backend, &format!("{prefix}.cross_attn"), d, heads, kv_heads, dtype))
                .transpose()?,
            ffn,
        })
    }

    /// Forward one block in place. acts: this block's own buffers when `keep`
    /// (everything a backward reads is kept), else the buffers all blocks
    /// share; x: [B, T, d] residual stream (block input in, output out);
    /// silu_c: [B, d]; text: cross-attention context when the block has one.
    /// Returns the MoE layer's routing, on the backend, if it is one.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut BlockActs,
        keep: bool,
        mut x: TensorMut<'_>,
        silu_c: TensorRef<'_>,
        text: Option<TextContext<'_>>,
        batch: usize,
        tokens: usize,
        dtype: DType,
    ) -> Result<Option<Arc<DeviceRouting>>> {
        let (d, kv_dim) = (self.attn.dim(), self.attn.kv_dim());
        let rows = batch * tokens;
        let dims = RowDims { batch, tokens, d };
        let a = acts;
        let act = [batch, tokens, d];
        if keep {
            a.inp.ensure(backend, &act, dtype)?;
            backend.copy(a.inp.view_mut()?, x.as_ref())?;
        }

        // m = adaLN_modulation(SiLU(c))
        a.modulation.ensure(backend, &[batch, CHUNKS * d], dtype)?;
        self.adaln
            .forward_per_sample(backend, a.modulation.view_mut()?, silu_c, batch, 1, None)?;

        // x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        a.ln1.ensure(backend, &act, dtype)?;
        a.attn_in.ensure(backend, &act, dtype)?;
        a.ln1_mean.ensure(backend, &[rows], DType::F32)?;
        a.ln1_rstd.ensure(backend, &[rows], DType::F32)?;
        ln_modulate(
            backend,
            a.attn_in.view_mut()?,
            // Kept for the backward; at inference the buffer serves attention below.
            if keep { Some(a.ln1.view_mut()?) } else { None },
            a.ln1_mean.view_mut()?,
            a.ln1_rstd.view_mut()?,
            x.as_ref(),
            a.modulation.view()?,
            chunks(CHUNKS, SHIFT_MSA, SCALE_MSA),
            dims,
        )?;
        a.attn.q.ensure(backend, &[rows, d], dtype)?;
        a.attn.k.ensure(backend, &[rows, kv_dim], dtype)?;
        a.attn.v.ensure(backend, &[rows, kv_dim], dtype)?;
        self.attn.project(
            backend,
            a.attn.q.view_mut()?,
            a.attn.k.view_mut()?,
            a.attn.v.view_mut()?,
            a.attn_in.view()?,
            rows,
        )?;
        {
            // Shared: LN1's buffer is free once modulated.
            let att = if keep { &mut a.attn.att } else { &mut a.ln1 };
            att.ensure(backend, &act, dtype)?;
            let probs = if keep {
                let h = self.attn.heads;
                a.attn.probs.ensure(backend, &[batch, h, tokens, tokens], dtype)?;
                Some(a.attn.probs.view_mut()?)
            } else {
                None
            };
            let (q, k, v) = (a.attn.q.view()?, a.attn.k.view()?, a.attn.v.view()?);
            backend.attention(att.view_mut()?, probs, q, k, v, None, self.attn.dims(batch, tokens))?;
        }
        {
            // Shared: the modulated input is dead after the projections.
            let (out, att) = if keep {
                (&mut a.attn.out, &a.attn.att)
            } else {
                (&mut a.attn_in, &a.ln1)
            };
            out.ensure(backend, &act, dtype)?;
            self.attn.proj.forward(backend, out.view_mut()?, att.view()?, rows)?;
            backend.gated_residual(
                x.reborrow(),
                out.view()?,
                a.modulation.view()?,
                chunks(CHUNKS, GATE_MSA, 0),
                dims,
            )?;
        }
        if keep {
            a.x_attn.ensure(backend, &act, dtype)?;
            backend.copy(a.x_attn.view_mut()?, x.as_ref())?;
        }

        // x = x + CrossAttn(x, text)
        if let (Some(cross), Some(text)) = (&self.cross_attn, text) {
            self.cross_attention(backend, cross, a, keep, x.reborrow(), text, batch, tokens, dtype)?;
        }
        if keep {
            a.x_ffn.ensure(backend, &act, dtype)?;
            backend.copy(a.x_ffn.view_mut()?, x.as_ref())?;
        }

        // x = x + gate_mlp * F(modulate(LN(x), shift_mlp, scale_mlp))
        {
            let (ln, mean, rstd, ffn_in) = if keep {
                (&mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, &mut a.ffn_in)
            } else {
                (&mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, &mut a.attn_in)
            };
            ln.ensure(backend, &act, dtype)?;
            ffn_in.ensure(backend, &act, dtype)?;
            mean.ensure(backend, &[rows], DType::F32)?;
            rstd.ensure(backend, &[rows], DType::F32)?;
            ln_modulate(
                backend,
                ffn_in.view_mut()?,
                if keep { Some(ln.view_mut()?) } else { None },
                mean.view_mut()?,
                rstd.view_mut()?,
                x.as_ref(),
                a.modulation.view()?,
                chunks(CHUNKS, SHIFT_MLP, SCALE_MLP),
                dims,
            )?;
        }
        let (ffn_in, ffn_out) = if keep {
            (&a.ffn_in, &mut a.ffn_out)
        } else {
            (&a.attn_in, &mut a.ln1)
        };
        ffn_out.ensure(backend, &act, dtype)?;
        let routing = match &self.ffn {
            Ffn::Dense(mlp) => {
                mlp.forward(
                    backend,
                    ffn_out.view_mut()?,
                    &mut a.mlp,
                    keep,
                    ffn_in.view()?,
                    batch,
                    tokens,
                    dtype,
                )?;
                None
            }
            Ffn::Moe(moe) => {
                // Inference keeps nothing for a backward, but reuses the
                // cache's tensors (shared by every block) as scratch.
                let x_rows = ffn_in.view()?.reshape(&[rows, d])?;
                let out_rows = ffn_out.view_mut()?.reshape(&[rows, d])?;
                Some(moe.forward(backend, out_rows, &mut a.moe, keep, x_rows, batch, tokens)?)
            }
        };
        backend.gated_residual(
            x,
            ffn_out.view()?,
            a.modulation.view()?,
            chunks(CHUNKS, GATE_MLP, 0),
            dims,
        )?;
        a.routing = routing.clone();
        Ok(routing)
    }

    /// Backward of [`Block::forward`] (kept), the same lines in reverse.
    /// dx: [B, T, d], the gradient of the block's output in, of its input
    /// out; d_silu_c: [B, d] and d_text: [B, L, d] (text models) accumulate;
    /// parameter gradients accumulate into `grads`; `grad_aux` weighs the
    /// MoE router's auxiliary loss (0 when it is not trained on).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        a: &BlockActs,
        s: &mut BlockScratch,
        grads: &mut Grads,
        mut dx: TensorMut<'_>,
        mut d_silu_c: TensorMut<'_>,
        d_text: Option<TensorMut<'_>>,
        silu_c: TensorRef<'_>,
        text: Option<TextContext<'_>>,
        batch: usize,
        tokens: usize,
        grad_aux: f32,
    ) -> Result<()> {
        let (d, kv_dim) = (self.attn.dim(), self.attn.kv_dim());
        let rows = batch * tokens;
        let dims = RowDims { batch, tokens, d };
        let act = [batch, tokens, d];
        if !a.inp.is_set() {
            return Err(ecdit_engine::EngineError::Other(format!(
                "block {}: backward needs a forward that kept its activations",
                self.index
            )));
        }
        let dtype = a.inp.view()?.dtype();
        for buf in [&mut s.d1, &mut s.d2] {
            buf.ensure(backend, &act, dtype)?;
        }
        s.dq.ensure(backend, &[rows, d], dtype)?;
        s.dk.ensure(backend, &[rows, kv_dim], dtype)?;
        s.dv.ensure(backend, &[rows, kv_dim], dtype)?;
        s.dmod.ensure(backend, &[batch, CHUNKS * d], dtype)?;
        backend.fill(s.dmod.view_mut()?, 0.0)?;
        let m = a.modulation.view()?;

        // x = x + gate_mlp * F(modulate(LN(x), shift_mlp, scale_mlp))
        backend.gated_residual_backward(
            s.d1.view_mut()?,
            s.dmod.view_mut()?,
            dx.as_ref(),
            a.ffn_out.view()?,
            m,
            chunks(CHUNKS, GATE_MLP, 0),
            dims,
        )?;
        match &self.ffn {
            Ffn::Dense(mlp) => mlp.backward(
                backend,
                grads,
                &mut s.mlp,
                s.d2.view_mut()?,
                s.d1.view()?,
                a.ffn_in.view()?,
                &a.mlp,
                rows,
            )?,
            Ffn::Moe(moe) => {
                let x_rows = a.ffn_in.view()?.reshape(&[rows, d])?;
                let dout = s.d1.view()?.reshape(&[rows, d])?;
                let dx_rows = s.d2.view_mut()?.reshape(&[rows, d])?;
                moe.backward(backend, grads, dx_rows, &a.moe, x_rows, dout, grad_aux)?;
            }
        }
        backend.modulate_backward(
            s.d1.view_mut()?,
            s.dmod.view_mut()?,
            s.d2.view()?,
            a.ln2.view()?,
            m,
            chunks(CHUNKS, SHIFT_MLP, SCALE_MLP),
            dims,
        )?;
        backend.layer_norm_backward(
            s.d2.view_mut()?,
            None,
            None,
            s.d1.view()?,
            a.x_ffn.view()?,
            a.ln2_mean.view()?,
            a.ln2_rstd.view()?,
            None,
            rows,
            d,
        )?;
        backend.axpby(dx.reborrow(), 1.0, s.d2.view()?, 1.0)?;

        // x = x + CrossAttn(x, text)
        if let (Some(cross), Some(text)) = (&self.cross_attn, text) {
            let mut d_text = d_text.ok_or_else(|| {
                ecdit_engine::EngineError::Other(format!("block {}: cross-attention backward needs d_text", self.index))
            })?;
            let c = &a.cross;
            let text_rows = batch * text.len;
            s.dk_text.ensure(backend, &[text_rows, cross.kv_dim()], dtype)?;
            s.dv_text.ensure(backend, &[text_rows, cross.kv_dim()], dtype)?;
            cross.proj.backward(
                backend,
                grads,
                Some(s.d1.view_mut()?),
                false,
                dx.as_ref(),
                c.att.view()?,
                rows,
            )?;
            backend.attention_backward(
                s.dq.view_mut()?,
                s.dk_text.view_mut()?,
                s.dv_text.view_mut()?,
                s.d1.view()?,
                c.probs.view()?,
                c.q.view()?,
                c.k.view()?,
                c.v.view()?,
                cross.dims(batch, tokens, text.len),
            )?;
            cross.q.backward(
                backend,
                grads,
                Some(dx.reborrow()),
                true,
                s.dq.view()?,
                a.x_attn.view()?,
                rows,
            )?;
            for (j, dkv) in [&s.dk_text, &s.dv_text].into_iter().enumerate() {
                let dinp = Some(d_text.reborrow());
                cross
                    .kv
                    .backward_chunk(backend, j, grads, dinp, true, dkv.view()?, text.tokens, text_rows)?;
            }
        }

        // x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        backend.gated_residual_backward(
            s.d1.view_mut()?,
            s.dmod.view_mut()?,
            dx.as_ref(),
            a.attn.out.view()?,
            m,
            chunks(CHUNKS, GATE_MSA, 0),
            dims,
        )?;
        self.attn.proj.backward(
            backend,
            grads,
            Some(s.d2.view_mut()?),
            false,
            s.d1.view()?,
            a.attn.att.view()?,
            rows,
        )?;
        backend.attention_backward(
            s.dq.view_mut()?,
            s.dk.view_mut()?,
            s.dv.view_mut()?,
            s.d2.view()?,
            a.attn.probs.view()?,
            a.attn.q.view()?,
            a.attn.k.view()?,
            a.attn.v.view()?,
            self.attn.dims(batch, tokens),
        )?;
        self.attn.project_backward(
            backend,
            grads,
            s.d1.view_mut()?,
            s.dq.view()?,
            s.dk.view()?,
            s.dv.view()?,
            a.attn_in.view()?,
            rows,
        )?;
        backend.modulate_backward(
            s.d2.view_mut()?,
            s.dmod.view_mut()?,
            s.d1.view()?,
            a.ln1.view()?,
            m,
            chunks(CHUNKS, SHIFT_MSA, SCALE_MSA),
            dims,
        )?;
        backend.layer_norm_backward(
            s.d1.view_mut()?,
            None,
            None,
            s.d2.view()?,
            a.inp.view()?,
            a.ln1_mean.view()?,
            a.ln1_rstd.view()?,
            None,
            rows,
            d,
        )?;
        backend.axpby(dx, 1.0, s.d1.view()?, 1.0)?;

        // m = adaLN_modulation(SiLU(c))
        self.adaln.backward(
            backend,
            grads,
            Some(d_silu_c.reborrow()),
            true,
            s.dmod.view()?,
            silu_c,
            batch,
        )
    }

    /// `x += proj(attention(q_linear(x), kv_linear(text), mask))`.
    #[allow(clippy::too_many_arguments)]
    fn cross_attention(
        &self,
        backend: &dyn Backend,
        cross: &CrossAttention,
        a: &mut BlockActs,
        keep: bool,
        mut x: TensorMut<'_>,
        text: TextContext<'_>,
        batch: usize,
        tokens: usize,
        dtype: DType,
    ) -> Result<()> {
        let d = self.attn.dim();
        let rows = batch * tokens;
        let act = [batch, tokens, d];
        a.cross.k.ensure(backend, &[batch, text.len, cross.kv_dim()], dtype)?;
        a.cross.v.ensure(backend, &[batch, text.len, cross.kv_dim()], dtype)?;
        cross.project_text(
            backend,
            a.cross.k.view_mut()?,
            a.cross.v.view_mut()?,
            text.tokens,
            batch,
            text.len,
        )?;
        // Shared: self-attention's q, LN1's buffer and the modulated-input
        // buffer are free here.
        let (q, att, out) = if keep {
            (&mut a.cross.q, &mut a.cross.att, &mut a.cross.out)
        } else {
            (&mut a.attn.q, &mut a.ln1, &mut a.attn_in)
        };
        q.ensure(backend, &[rows, d], dtype)?;
        att.ensure(backend, &act, dtype)?;
        out.ensure(backend, &act, dtype)?;
        cross.q.forward(backend, q.view_mut()?, x.as_ref(), rows)?;
        let probs = if keep {
            a.cross
                .probs
                .ensure(backend, &[batch, cross.heads, tokens, text.len], dtype)?;
            Some(a.cross.probs.view_mut()?)
        } else {
            None
        };
        backend.attention(
            att.view_mut()?,
            probs,
            q.view()?,
            a.cross.k.view()?,
            a.cross.v.view()?,
            Some(text.mask),
            cross.dims(batch, tokens, text.len),
        )?;
        cross.proj.forward(backend, out.view_mut()?, att.view()?, rows)?;
        // x = 1 * out + 1 * x: the plain residual sum.
        backend.axpby(x.reborrow(), 1.0, out.view()?, 1.0)
    }

    /// Parameters drawn from the model's rng after construction, in the
    /// order seeded models always drew them (MoE layers draw when built).
    pub(crate) fn collect_dense_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
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

impl Params for Block {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.adaln.collect(out);
        self.attn.collect(out);
        if let Some(c) = &self.cross_attn {
            c.collect(out);
        }
        match &self.ffn {
            Ffn::Dense(mlp) => mlp.collect(out),
            Ffn::Moe(moe) => moe.collect(out),
        }
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.adaln.collect_mut(out);
        self.attn.collect_mut(out);
        if let Some(c) = &mut self.cross_attn {
            c.collect_mut(out);
        }
        match &mut self.ffn {
            Ffn::Dense(mlp) => mlp.collect_mut(out),
            Ffn::Moe(moe) => moe.collect_mut(out),
        }
    }
}
