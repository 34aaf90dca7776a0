//! Training the text encoder jointly with the model: a forward that keeps what
//! its backward reads ([`TextEncoderActs`]), and the backward.
//!
//! The two are written side by side (llm.c style): [`TransformerTextEncoder::forward_train`]
//! runs the same ops as the inference [`TransformerTextEncoder::forward`] (so
//! its output has the same bits as [`TransformerTextEncoder::encode_ids`]),
//! keeping every step's inputs; [`TransformerTextEncoder::backward`] walks the
//! same steps in reverse, each step's backward under the forward step's comment.
//!
//! Padding: the outputs at padded positions are not part of the encoder's
//! output (finite but meaningless, as [`super::TextBatch`] says), so the
//! backward drops the rows of `dtokens` there (a consumer that masks its keys
//! sends zeros there anyway). Real tokens never attend to padded keys, so with
//! those rows dropped no gradient depends on what the padded positions hold:
//! changing the ids there changes no gradient, bit for bit, and a token that
//! only ever pads (`<pad>`) gets none.

use super::encoder::{masked_mean, pool_weights, TransformerTextEncoder, LN_EPS};
use crate::model::{Act, Grads};
use ecdit_engine::{
    AttnDims, Backend, BackendExt, DType, EngineError, GemmDims, Layout, Param, Result, TensorMut, TensorRef, Unary,
};
use std::sync::Mutex;

/// Everything the encoder's backward reads, reusable across steps (buffers
/// grow, never shrink). Filled by [`TransformerTextEncoder::forward_train`].
/// Per-layer buffers stack the layers on a leading axis.
#[derive(Debug, Default)]
pub struct TextEncoderActs {
    /// Prompts B of the last forward.
    batch: usize,
    /// Tokens per prompt L of the last forward.
    len: usize,
    /// [B * L] u32 token ids.
    ids: Act,
    /// [B, L] u8, nonzero = real token.
    mask: Act,
    /// [B * L] f32: 1 at real tokens, 0 at padding (scales the rows of dtokens).
    real: Act,
    /// [B * L] u32: `0, 1, .., B L - 1` (the rows the masked copy of dtokens writes).
    row_ids: Act,
    /// [B, L] f32 masked-mean weights (`mask / real tokens of the prompt`).
    pool_w: Act,
    /// [2 layers + 1, B * L, D] the residual stream: slot 0 the embeddings,
    /// slot `2 l + 1` after layer l's attention, `2 l + 2` after its MLP; slot
    /// `2 l` is layer l's input, the last slot the final norm's.
    res: Act,
    /// [layers, B * L, D] LN1 outputs.
    ln1: Act,
    /// [layers, B * L] LN1 means.
    ln1_mean: Act,
    /// [layers, B * L] LN1 reciprocal standard deviations.
    ln1_rstd: Act,
    /// [layers, B * L, D] queries (heads interleaved within a token).
    q: Act,
    /// [layers, B * L, D] keys.
    k: Act,
    /// [layers, B * L, D] values.
    v: Act,
    /// [layers, B, H, L, L] attention probabilities.
    probs: Act,
    /// [layers, B * L, D] attention outputs (the projection's input).
    att: Act,
    /// [layers, B * L, D] LN2 outputs.
    ln2: Act,
    /// [layers, B * L] LN2 means.
    ln2_mean: Act,
    /// [layers, B * L] LN2 reciprocal standard deviations.
    ln2_rstd: Act,
    /// [layers, B * L, Hm] fc1 outputs (before GELU).
    hid: Act,
    /// [layers, B * L, Hm] after GELU (fc2's input).
    gelu: Act,
    /// [B * L] final-norm means.
    lnf_mean: Act,
    /// [B * L] final-norm reciprocal standard deviations.
    lnf_rstd: Act,
    /// [B, L, D] the encoder output.
    tokens: Act,
    /// [B, D] masked mean of `tokens` over the real tokens.
    pooled: Act,
    /// The backward's gradient buffers, reused across steps (the backward
    /// borrows the activations shared, so they sit behind a lock).
    scratch: Mutex<Scratch>,
}

/// Gradient buffers of one backward.
#[derive(Debug, Default)]
struct Scratch {
    /// [B * L, D] gradient of the residual stream.
    dres: Act,
    /// [B * L, D] gradient of a LayerNorm output (and of the encoder output).
    dln: Act,
    /// [B * L, D] gradient of a LayerNorm input, before it joins `dres`.
    dtmp: Act,
    /// [B * L, D] gradient of the attention output.
    datt: Act,
    /// [B * L, D] gradients of q, k, v.
    dq: Act,
    dk: Act,
    dv: Act,
    /// [B * L, Hm] gradient of the fc1 output (before GELU).
    dhid: Act,
    /// [B * L, Hm] gradient of the GELU output.
    dgelu: Act,
}

impl Scratch {
    fn ensure(&mut self, be: &dyn Backend, rows: usize, d: usize, hm: usize) -> Result<()> {
        for a in [
            &mut self.dres,
            &mut self.dln,
            &mut self.dtmp,
            &mut self.datt,
            &mut self.dq,
            &mut self.dk,
            &mut self.dv,
        ] {
            a.ensure(be, &[rows, d], DType::F32)?;
        }
        self.dhid.ensure(be, &[rows, hm], DType::F32)?;
        self.dgelu.ensure(be, &[rows, hm], DType::F32)
    }

    fn bytes(&self) -> usize {
        [
            &self.dres,
            &self.dln,
            &self.dtmp,
            &self.datt,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.dhid,
            &self.dgelu,
        ]
        .iter()
        .map(|a| a.bytes())
        .sum()
    }
}

impl TextEncoderActs {
    /// [B, L, D] the encoder output (what the DiT reads).
    pub fn tokens(&self) -> Result<TensorRef<'_>> {
        self.tokens.view()
    }

    /// [B, L] u8, nonzero = real token.
    pub fn mask(&self) -> Result<TensorRef<'_>> {
        self.mask.view()
    }

    /// [B, D] the masked mean of the output over the real tokens.
    pub fn pooled(&self) -> Result<TensorRef<'_>> {
        self.pooled.view()
    }

    /// Prompts B of the last forward.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens per prompt L of the last forward.
    pub fn seq_len(&self) -> usize {
        self.len
    }

    /// Bytes held (activations and the backward's buffers).
    pub fn bytes(&self) -> usize {
        let scratch = match self.scratch.lock() {
            Ok(s) => s.bytes(),
            Err(poisoned) => poisoned.into_inner().bytes(),
        };
        self.acts().iter().map(|a| a.bytes()).sum::<usize>() + scratch
    }

    fn acts(&self) -> [&Act; 23] {
        [
            &self.ids,
            &self.mask,
            &self.real,
            &self.row_ids,
            &self.pool_w,
            &self.res,
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.q,
            &self.k,
            &self.v,
            &self.probs,
            &self.att,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.hid,
            &self.gelu,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.tokens,
            &self.pooled,
        ]
    }

    /// Sizes every buffer for `s`.
    fn ensure(&mut self, be: &dyn Backend, s: &Shapes) -> Result<()> {
        let (b, l, r, d, nl) = (s.batch, s.len, s.rows, s.d, s.layers);
        let f = DType::F32;
        self.ids.ensure(be, &[r], DType::U32)?;
        self.mask.ensure(be, &[b, l], DType::U8)?;
        self.real.ensure(be, &[r], f)?;
        self.row_ids.ensure(be, &[r], DType::U32)?;
        self.pool_w.ensure(be, &[b, l], f)?;
        self.res.ensure(be, &[2 * nl + 1, r, d], f)?;
        for a in [
            &mut self.ln1,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.att,
            &mut self.ln2,
        ] {
            a.ensure(be, &[nl, r, d], f)?;
        }
        for a in [
            &mut self.ln1_mean,
            &mut self.ln1_rstd,
            &mut self.ln2_mean,
            &mut self.ln2_rstd,
        ] {
            a.ensure(be, &[nl, r], f)?;
        }
        self.probs.ensure(be, &[nl, b, s.heads, l, l], f)?;
        self.hid.ensure(be, &[nl, r, s.hidden], f)?;
        self.gelu.ensure(be, &[nl, r, s.hidden], f)?;
        self.lnf_mean.ensure(be, &[r], f)?;
        self.lnf_rstd.ensure(be, &[r], f)?;
        self.tokens.ensure(be, &[b, l, d], f)?;
        self.pooled.ensure(be, &[b, d], f)
    }
}

/// Sizes of one training call.
struct Shapes {
    batch: usize,
    len: usize,
    rows: usize,
    d: usize,
    heads: usize,
    hidden: usize,
    layers: usize,
}

/// Slot `i` of a stacked buffer, viewed as `dims`.
fn at<'a>(a: &'a Act, i: usize, dims: &[usize]) -> Result<TensorRef<'a>> {
    a.view()?.rows(i, 1)?.reshape(dims)
}

/// Slot `i` of a stacked buffer, exclusively, viewed as `dims`.
fn at_mut<'a>(a: &'a mut Act, i: usize, dims: &[usize]) -> Result<TensorMut<'a>> {
    a.view_mut()?.rows(i, 1)?.reshape(dims)
}

/// `(in, out_part, parts)` of an input-major weight: held `[parts, in, out_part]`
/// (`Layout::InputMajorChunks(parts)`, the fused qkv) or `[in, out]` (one part).
fn part_dims(w: &Param) -> (usize, usize, usize) {
    let parts = match w.layout {
        Layout::InputMajorChunks(k) => k,
        _ => 1,
    };
    (w.shape[1], w.shape[0] / parts, parts)
}

/// `out [R, out_p] = inp [R, in] @ W_j + b_j + beta * out` for part `j` of an
/// input-major weight (the whole weight when it has one part): the product
/// the inference forward runs, with the same views.
fn linear_part(
    be: &dyn Backend,
    out: TensorMut<'_>,
    inp: TensorRef<'_>,
    (weight, bias, j): (&Param, &Param, usize),
    beta: f32,
) -> Result<()> {
    let (n_in, n_out, _) = part_dims(weight);
    let rows = inp.numel() / n_in.max(1);
    let w = weight
        .tensor
        .view()
        .flat(j * n_in * n_out, n_in * n_out)?
        .reshape(&[n_in, n_out])?;
    let b = bias.tensor.view().flat(j * n_out, n_out)?;
    be.gemm(out, inp, w, Some(b), GemmDims::nn(rows, n_out, n_in), 1.0, beta)
}

/// Backward of [`linear_part`]: `dW_j += inp^T dout`, `db_j += sum_rows(dout)`,
/// `dinp = dout W_j^T + beta * dinp`.
fn linear_part_backward(
    be: &dyn Backend,
    grads: &mut Grads,
    (dinp, beta): (TensorMut<'_>, f32),
    dout: TensorRef<'_>,
    inp: TensorRef<'_>,
    (weight, bias, j): (&Param, &Param, usize),
) -> Result<()> {
    let (n_in, n_out, _) = part_dims(weight);
    let rows = inp.numel() / n_in.max(1);
    let dw = grads
        .view_mut(weight)?
        .flat(j * n_in * n_out, n_in * n_out)?
        .reshape(&[n_in, n_out])?;
    be.gemm(dw, inp, dout, None, GemmDims::tn(n_in, n_out, rows), 1.0, 1.0)?;
    let db = grads.view_mut(bias)?.flat(j * n_out, n_out)?;
    be.sum_rows(db, dout, rows, n_out, true)?;
    let w = weight
        .tensor
        .view()
        .flat(j * n_in * n_out, n_in * n_out)?
        .reshape(&[n_in, n_out])?;
    be.gemm(dinp, dout, w, None, GemmDims::nt(rows, n_in, n_out), 1.0, beta)
}

/// Backward of an affine LayerNorm: overwrites `dinp`, accumulates the weight
/// and bias gradients. (mean, rstd): the forward's cache.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward(
    be: &dyn Backend,
    grads: &mut Grads,
    dinp: TensorMut<'_>,
    dout: TensorRef<'_>,
    inp: TensorRef<'_>,
    (mean, rstd): (TensorRef<'_>, TensorRef<'_>),
    (weight, bias): (&Param, &Param),
    (rows, d): (usize, usize),
) -> Result<()> {
    // Both gradients are written at once: hold the bias's out of `grads`.
    let mut dbias = grads.take(bias)?;
    let w = Some(weight.tensor.view());
    let done = grads.view_mut(weight).and_then(|dw| {
        be.layer_norm_backward(
            dinp,
            Some(dw),
            Some(dbias.view_mut()),
            dout,
            inp,
            mean,
            rstd,
            w,
            rows,
            d,
        )
    });
    grads.put(bias, dbias)?;
    done
}

impl TransformerTextEncoder {
    fn shapes(&self, batch: usize, len: usize) -> Shapes {
        Shapes {
            batch,
            len,
            rows: batch * len,
            d: self.dim,
            heads: self.heads,
            hidden: self.cfg.mlp_hidden(self.dim),
            layers: self.params.layers.len(),
        }
    }

    fn attn_dims(&self, batch: usize, len: usize) -> AttnDims {
        AttnDims {
            batch,
            heads: self.heads,
            kv_heads: self.heads,
            q_len: len,
            kv_len: len,
            head_dim: self.dim / self.heads,
        }
    }

    /// Training forward over token ids (host; uploaded once): runs the ops of
    /// [`TransformerTextEncoder::forward`] and the masked mean of
    /// [`TransformerTextEncoder::encode_ids`] (same bits), keeping in `acts`
    /// what [`TransformerTextEncoder::backward`] reads. ids, mask: [B, L];
    /// every id below the vocabulary size, `L <= max_tokens`.
    pub fn forward_train(
        &self,
        acts: &mut TextEncoderActs,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        len: usize,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let s = self.shapes(batch, len);
        let (rows, d, hm) = (s.rows, s.d, s.hidden);
        self.check_ids(ids, mask, rows)?;
        if len > self.tokenizer.max_tokens() {
            return Err(EngineError::shape(
                "text encoder (length)",
                format!("at most {} tokens", self.tokenizer.max_tokens()),
                len,
            ));
        }
        acts.ensure(be, &s)?;
        (acts.batch, acts.len) = (batch, len);
        let n = u32::try_from(rows).map_err(|_| EngineError::shape("text encoder (tokens)", "B L below 2^32", rows))?;
        let row_ids: Vec<u32> = (0..n).collect();
        let real: Vec<f32> = mask.iter().map(|&m| if m != 0 { 1.0 } else { 0.0 }).collect();
        be.upload(acts.ids.view_mut()?, bytemuck::cast_slice(ids))?;
        be.upload(acts.row_ids.view_mut()?, bytemuck::cast_slice(&row_ids))?;
        be.upload(acts.mask.view_mut()?, mask)?;
        be.write_f32(acts.real.view_mut()?, &real)?;
        be.write_f32(acts.pool_w.view_mut()?, &pool_weights(mask, batch, len))?;
        if rows == 0 {
            return be.fill(acts.pooled.view_mut()?, 0.0);
        }
        let p = &self.params;
        let (rd, rh) = ([rows, d], [rows, hm]);
        let probs_dims = [batch, s.heads, len, len];
        let attn_dims = self.attn_dims(batch, len);
        let a = acts;

        // x = token_embedding[ids] + position_embedding[..L]
        be.gather_rows(
            at_mut(&mut a.res, 0, &rd)?,
            p.token_embedding.tensor.view(),
            a.ids.view()?,
            d,
        )?;
        let positions = p.position_embedding.tensor.view().rows(0, len)?.reshape(&[len * d])?;
        be.add_broadcast(at_mut(&mut a.res, 0, &rd)?, positions)?;

        for (l, lp) in p.layers.iter().enumerate() {
            let (x_attn, x_mlp, x_out) = (2 * l, 2 * l + 1, 2 * l + 2);
            // n1 = LN1(x)
            be.layer_norm(
                at_mut(&mut a.ln1, l, &rd)?,
                at_mut(&mut a.ln1_mean, l, &[rows])?,
                at_mut(&mut a.ln1_rstd, l, &[rows])?,
                at(&a.res, x_attn, &rd)?,
                Some(lp.norm1_weight.tensor.view()),
                Some(lp.norm1_bias.tensor.view()),
                rows,
                d,
                LN_EPS,
            )?;
            // q, k, v = n1 @ W_qkv[j] + b_qkv[j]
            for (j, dst) in [&mut a.q, &mut a.k, &mut a.v].into_iter().enumerate() {
                let qkv = (&lp.qkv_weight, &lp.qkv_bias, j);
                linear_part(be, at_mut(dst, l, &rd)?, at(&a.ln1, l, &rd)?, qkv, 0.0)?;
            }
            // att = Attn(q, k, v), real keys only
            be.attention(
                at_mut(&mut a.att, l, &rd)?,
                Some(at_mut(&mut a.probs, l, &probs_dims)?),
                at(&a.q, l, &rd)?,
                at(&a.k, l, &rd)?,
                at(&a.v, l, &rd)?,
                Some(a.mask.view()?),
                attn_dims,
            )?;
            // x += att @ W_proj + b_proj
            copy_slot(be, &mut a.res, x_attn, rows * d)?;
            let proj = (&lp.proj_weight, &lp.proj_bias, 0);
            linear_part(be, at_mut(&mut a.res, x_mlp, &rd)?, at(&a.att, l, &rd)?, proj, 1.0)?;
            // n2 = LN2(x)
            be.layer_norm(
                at_mut(&mut a.ln2, l, &rd)?,
                at_mut(&mut a.ln2_mean, l, &[rows])?,
                at_mut(&mut a.ln2_rstd, l, &[rows])?,
                at(&a.res, x_mlp, &rd)?,
                Some(lp.norm2_weight.tensor.view()),
                Some(lp.norm2_bias.tensor.view()),
                rows,
                d,
                LN_EPS,
            )?;
            // hid = n2 @ W_fc1 + b_fc1
            let fc1 = (&lp.fc1_weight, &lp.fc1_bias, 0);
            linear_part(be, at_mut(&mut a.hid, l, &rh)?, at(&a.ln2, l, &rd)?, fc1, 0.0)?;
            // gelu = GELU_tanh(hid)
            be.unary(Unary::GeluTanh, at_mut(&mut a.gelu, l, &rh)?, at(&a.hid, l, &rh)?)?;
            // x += gelu @ W_fc2 + b_fc2
            copy_slot(be, &mut a.res, x_mlp, rows * d)?;
            let fc2 = (&lp.fc2_weight, &lp.fc2_bias, 0);
            linear_part(be, at_mut(&mut a.res, x_out, &rd)?, at(&a.gelu, l, &rh)?, fc2, 1.0)?;
        }

        // tokens = LN_final(x)
        be.layer_norm(
            a.tokens.view_mut()?.reshape(&rd)?,
            a.lnf_mean.view_mut()?,
            a.lnf_rstd.view_mut()?,
            at(&a.res, 2 * s.layers, &rd)?,
            Some(p.final_norm_weight.tensor.view()),
            Some(p.final_norm_bias.tensor.view()),
            rows,
            d,
            LN_EPS,
        )?;
        // pooled = pool_w @ tokens (the masked mean)
        masked_mean(
            be,
            a.pooled.view_mut()?,
            a.tokens.view()?,
            a.pool_w.view()?,
            batch,
            len,
            d,
        )
    }

    /// Backward of [`TransformerTextEncoder::forward_train`] (whose `acts` it
    /// reads): dtokens [B, L, D] is the gradient of the loss w.r.t.
    /// `acts.tokens()` (rows at padded positions are ignored: those outputs
    /// are not part of the encoder's output), dpooled [B, D] (optional) w.r.t.
    /// `acts.pooled()`. Accumulates into the gradient of every encoder
    /// parameter in `grads` (found by name; memory layout). The token
    /// embedding's gradient is nonzero only in rows of ids at real positions,
    /// the position embedding's only in its first L rows.
    pub fn backward(
        &self,
        acts: &TextEncoderActs,
        grads: &mut Grads,
        dtokens: TensorRef<'_>,
        dpooled: Option<TensorRef<'_>>,
    ) -> Result<()> {
        const OP: &str = "text encoder backward";
        let be = self.backend.as_ref();
        let (batch, len) = (acts.batch, acts.len);
        let s = self.shapes(batch, len);
        let (rows, d, hm) = (s.rows, s.d, s.hidden);
        if acts.res.shape() != [2 * s.layers + 1, rows, d] || acts.hid.shape() != [s.layers, rows, hm] {
            return Err(EngineError::shape(
                format!("{OP} (activations)"),
                "the activations of this encoder's forward_train",
                format!("{:?}", acts.res.shape()),
            ));
        }
        dtokens.expect_len(OP, "dtokens [B, L, D]", rows * d)?;
        if let Some(dp) = dpooled {
            dp.expect_len(OP, "dpooled [B, D]", batch * d)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let p = &self.params;
        let (rd, rh) = ([rows, d], [rows, hm]);
        let probs_dims = [batch, s.heads, len, len];
        let attn_dims = self.attn_dims(batch, len);
        let a = acts;
        // A poisoned lock only means an earlier backward panicked; every
        // buffer is overwritten before it is read.
        let mut guard = a.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let g = &mut *guard;
        g.ensure(be, rows, d, hm)?;

        // (dtokens at the real positions only)
        be.fill(g.dln.view_mut()?, 0.0)?;
        let dtokens = dtokens.reshape(&rd)?;
        be.scatter_add_rows(g.dln.view_mut()?, dtokens, a.row_ids.view()?, Some(a.real.view()?), d)?;
        // pooled = pool_w @ tokens (the masked mean)
        if let Some(dp) = dpooled {
            // dtokens[b] += pool_w[b]^T dpooled[b]: [L, 1] @ [1, D] per prompt
            let dp = dp.reshape(&[batch, d])?;
            let dims = GemmDims::nn(len, d, 1);
            be.gemm_batched(g.dln.view_mut()?, a.pool_w.view()?, dp, batch, dims, 1.0, 1.0)?;
        }
        // tokens = LN_final(x)
        layer_norm_backward(
            be,
            grads,
            g.dres.view_mut()?,
            g.dln.view()?,
            at(&a.res, 2 * s.layers, &rd)?,
            (a.lnf_mean.view()?, a.lnf_rstd.view()?),
            (&p.final_norm_weight, &p.final_norm_bias),
            (rows, d),
        )?;

        for (l, lp) in p.layers.iter().enumerate().rev() {
            let (x_attn, x_mlp) = (2 * l, 2 * l + 1);
            // x += gelu @ W_fc2 + b_fc2   (dx passes through unchanged)
            let fc2 = (&lp.fc2_weight, &lp.fc2_bias, 0);
            let dgelu = (g.dgelu.view_mut()?, 0.0);
            linear_part_backward(be, grads, dgelu, g.dres.view()?, at(&a.gelu, l, &rh)?, fc2)?;
            // gelu = GELU_tanh(hid)
            be.unary_backward(
                Unary::GeluTanh,
                g.dhid.view_mut()?,
                g.dgelu.view()?,
                at(&a.hid, l, &rh)?,
            )?;
            // hid = n2 @ W_fc1 + b_fc1
            let fc1 = (&lp.fc1_weight, &lp.fc1_bias, 0);
            let dn2 = (g.dln.view_mut()?, 0.0);
            linear_part_backward(be, grads, dn2, g.dhid.view()?, at(&a.ln2, l, &rd)?, fc1)?;
            // n2 = LN2(x)
            layer_norm_backward(
                be,
                grads,
                g.dtmp.view_mut()?,
                g.dln.view()?,
                at(&a.res, x_mlp, &rd)?,
                (at(&a.ln2_mean, l, &[rows])?, at(&a.ln2_rstd, l, &[rows])?),
                (&lp.norm2_weight, &lp.norm2_bias),
                (rows, d),
            )?;
            be.axpby(g.dres.view_mut()?, 1.0, g.dtmp.view()?, 1.0)?;
            // x += att @ W_proj + b_proj   (dx passes through unchanged)
            let proj = (&lp.proj_weight, &lp.proj_bias, 0);
            let datt = (g.datt.view_mut()?, 0.0);
            linear_part_backward(be, grads, datt, g.dres.view()?, at(&a.att, l, &rd)?, proj)?;
            // att = Attn(q, k, v), real keys only
            be.attention_backward(
                g.dq.view_mut()?,
                g.dk.view_mut()?,
                g.dv.view_mut()?,
                g.datt.view()?,
                at(&a.probs, l, &probs_dims)?,
                at(&a.q, l, &rd)?,
                at(&a.k, l, &rd)?,
                at(&a.v, l, &rd)?,
                attn_dims,
            )?;
            // q, k, v = n1 @ W_qkv[j] + b_qkv[j]   (dn1 sums the three parts)
            for (j, dpart) in [&g.dq, &g.dk, &g.dv].into_iter().enumerate() {
                let qkv = (&lp.qkv_weight, &lp.qkv_bias, j);
                let dn1 = (g.dln.view_mut()?, if j == 0 { 0.0 } else { 1.0 });
                linear_part_backward(be, grads, dn1, dpart.view()?, at(&a.ln1, l, &rd)?, qkv)?;
            }
            // n1 = LN1(x)
            layer_norm_backward(
                be,
                grads,
                g.dtmp.view_mut()?,
                g.dln.view()?,
                at(&a.res, x_attn, &rd)?,
                (at(&a.ln1_mean, l, &[rows])?, at(&a.ln1_rstd, l, &[rows])?),
                (&lp.norm1_weight, &lp.norm1_bias),
                (rows, d),
            )?;
            be.axpby(g.dres.view_mut()?, 1.0, g.dtmp.view()?, 1.0)?;
        }

        // x = token_embedding[ids] + position_embedding[..L]
        let dtable = grads.view_mut(&p.token_embedding)?;
        be.scatter_add_rows(dtable, g.dres.view()?, a.ids.view()?, None, d)?;
        let dpos = grads.view_mut(&p.position_embedding)?.flat(0, len * d)?;
        be.sum_rows(dpos, g.dres.view()?.reshape(&[batch, len * d])?, batch, len * d, true)
    }
}

/// Residual slot `i + 1` = slot `i` of `res` [S, R, D] (`n = R D` elements
/// each), before a sub-block adds its output onto it.
fn copy_slot(be: &dyn Backend, res: &mut Act, i: usize, n: usize) -> Result<()> {
    let (prev, next) = res.view_mut()?.split_rows(i + 1)?;
    let src = prev.as_ref().rows(i, 1)?.reshape(&[n])?;
    be.copy(next.rows(0, 1)?.reshape(&[n])?, src)
}

#[cfg(test)]
mod tests {
    use super::super::encoder::TextEncoderConfig;
    use super::*;
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_engine::{Init, Params};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};
    use std::sync::Arc;

    const DIM: usize = 16;
    const MAX_TOKENS: usize = 8;

    /// dim 16, 2 layers, 2 heads, the built-in vocabulary, every parameter
    /// random (LayerNorm weights near 1, biases small, embeddings N(0, 0.5)),
    /// so no gradient is trivially zero.
    fn tiny(threads: usize) -> TransformerTextEncoder {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads).unwrap());
        let cfg = TextEncoderConfig {
            layers: 2,
            heads: Some(2),
            ..Default::default()
        };
        let mut enc = TransformerTextEncoder::new(be.clone(), cfg, DIM, MAX_TOKENS, 11).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let mut list = Vec::new();
        enc.params.collect_mut(&mut list);
        for p in list {
            let mut v = be.read_f32(p.tensor.view()).unwrap();
            match p.init {
                Init::Normal(_) => {
                    let n = Normal::new(0.0f32, 0.5).unwrap();
                    v.iter_mut().for_each(|x| *x = n.sample(&mut rng));
                }
                Init::Ones => v.iter_mut().for_each(|x| *x = 1.0 + rng.gen_range(-0.3..0.3)),
                Init::Zeros => v.iter_mut().for_each(|x| *x = rng.gen_range(-0.2..0.2)),
                _ => {}
            }
            be.write_f32(p.tensor.view_mut(), &v).unwrap();
        }
        enc
    }

    /// B = 2, L = 5: prompt 0 fills all five positions (token 10 twice),
    /// prompt 1 has three real tokens and two `<pad>`s.
    fn batch(enc: &TransformerTextEncoder) -> (Vec<u32>, Vec<u8>, usize, usize) {
        let v = enc.tokenizer.vocab();
        let id = |t: &str| v.id(t).unwrap();
        let (bos, eos, pad) = (id(super::super::BOS), id(super::super::EOS), id(super::super::PAD));
        let ids = vec![bos, 10, 11, 10, eos, bos, 12, eos, pad, pad];
        let mask = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
        (ids, mask, 2, 5)
    }

    fn fresh_grads(enc: &TransformerTextEncoder) -> Grads {
        let mut list = Vec::new();
        enc.params.collect(&mut list);
        Grads::new(enc.backend(), &list).unwrap()
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every gradient on the host, in parameter order (memory layout).
    fn all_grads(enc: &TransformerTextEncoder, grads: &Grads) -> Vec<(String, Vec<f32>)> {
        grads
            .iter()
            .map(|(name, t)| (name.to_string(), enc.backend().read_f32(t.unwrap()).unwrap()))
            .collect()
    }

    #[test]
    fn forward_train_has_the_bits_of_encode_ids() {
        let enc = tiny(2);
        let be = enc.backend();
        let (ids, mask, b, l) = batch(&enc);
        let mut acts = TextEncoderActs::default();
        // The full batch, then its second prompt alone in the same (larger) buffers.
        for (ids, mask, b) in [(&ids[..], &mask[..], b), (&ids[l..], &mask[l..], 1)] {
            enc.forward_train(&mut acts, ids, mask, b, l).unwrap();
            let want = enc.encode_ids(ids, mask, b, l).unwrap();
            let tokens = be.read_f32(acts.tokens().unwrap()).unwrap();
            assert_eq!(acts.tokens().unwrap().shape(), &[b, l, DIM]);
            assert_eq!(bits(&tokens), bits(&be.read_f32(want.tokens.view()).unwrap()));
            let pooled = be.read_f32(acts.pooled().unwrap()).unwrap();
            assert_eq!(bits(&pooled), bits(&be.read_f32(want.pooled.view()).unwrap()));
            let mut got_mask = vec![0u8; b * l];
            be.download(&mut got_mask, acts.mask().unwrap()).unwrap();
            assert_eq!(got_mask, mask);
        }
        assert!(acts.bytes() > 0);
    }

    /// loss = sum over real rows of tokens * R1 + sum(pooled * R2), in f64.
    fn loss(enc: &TransformerTextEncoder, acts: &mut TextEncoderActs, r1: &[f32], r2: &[f32]) -> f64 {
        let (ids, mask, b, l) = batch(enc);
        enc.forward_train(acts, &ids, &mask, b, l).unwrap();
        let be = enc.backend();
        let tokens = be.read_f32(acts.tokens().unwrap()).unwrap();
        let pooled = be.read_f32(acts.pooled().unwrap()).unwrap();
        let real: f64 = tokens
            .chunks_exact(DIM)
            .zip(r1.chunks_exact(DIM))
            .zip(&mask)
            .filter(|(_, &m)| m != 0)
            .flat_map(|((t, r), _)| t.iter().zip(r))
            .map(|(&t, &r)| t as f64 * r as f64)
            .sum();
        real + pooled.iter().zip(r2).map(|(&p, &r)| p as f64 * r as f64).sum::<f64>()
    }

    /// Element `e` (memory layout) of parameter `i` (in `Params::collect` order).
    fn set(enc: &mut TransformerTextEncoder, i: usize, e: usize, value: f32) -> f32 {
        let be = enc.backend.clone();
        let mut list = Vec::new();
        enc.params.collect_mut(&mut list);
        let t = &mut list[i].tensor;
        let mut v = be.read_f32(t.view()).unwrap();
        let old = std::mem::replace(&mut v[e], value);
        be.write_f32(t.view_mut(), &v).unwrap();
        old
    }

    /// Central differences of the whole encoder against the backward, for
    /// every parameter tensor. dtokens = R1 everywhere (padded rows too: the
    /// backward drops them, and the loss does not read them); f32 forward,
    /// loss in f64, eps = 1e-2; |analytic - numeric| <= 2e-3 max(1, |numeric|).
    #[test]
    fn backward_matches_finite_differences() {
        let mut enc = tiny(1);
        let (ids, mask, b, l) = batch(&enc);
        let be = enc.backend.clone();
        let (r1, r2) = (random(b * l * DIM, 1), random(b * DIM, 2));
        let mut acts = TextEncoderActs::default();
        loss(&enc, &mut acts, &r1, &r2);
        let mut grads = fresh_grads(&enc);
        let dtok = be.upload_f32(&[b, l, DIM], &r1, DType::F32).unwrap();
        let dpool = be.upload_f32(&[b, DIM], &r2, DType::F32).unwrap();
        enc.backward(&acts, &mut grads, dtok.view(), Some(dpool.view()))
            .unwrap();
        let analytic = all_grads(&enc, &grads);

        // Token rows: those at real positions get gradient, every other row
        // (unused tokens, and <pad>, which only pads) exactly none.
        let used: Vec<usize> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m != 0)
            .map(|(&i, _)| i as usize)
            .collect();
        let table = &analytic[0].1;
        assert_eq!(analytic[0].0, "text_encoder.token_embedding.weight");
        for (row, g) in table.chunks_exact(DIM).enumerate() {
            let zero = g.iter().all(|&x| x == 0.0);
            assert_eq!(zero, !used.contains(&row), "token row {row}: {g:?}");
        }
        // Position rows: the first L only.
        let pos = &analytic[1].1;
        assert!(pos[l * DIM..].iter().all(|&x| x == 0.0));
        assert!(pos[..l * DIM].chunks_exact(DIM).all(|r| r.iter().any(|&x| x != 0.0)));

        let eps = 1e-2f32;
        let mut rng = StdRng::seed_from_u64(9);
        let mut worst = (0.0f64, String::new());
        for (i, (name, g)) in analytic.iter().enumerate() {
            // 10 distinct elements per tensor; the token table's from rows in use.
            let candidates: Vec<usize> = match i {
                0 => used.iter().flat_map(|&r| r * DIM..(r + 1) * DIM).collect(),
                1 => (0..l * DIM).collect(),
                _ => (0..g.len()).collect(),
            };
            let picks = rand::seq::index::sample(&mut rng, candidates.len(), 10)
                .into_iter()
                .map(|k| candidates[k]);
            let scale = g.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
            assert!(
                scale > 1e-3,
                "{name}: gradient all (near) zero, the check would be vacuous"
            );
            for e in picks {
                let x = set(&mut enc, i, e, 0.0);
                set(&mut enc, i, e, x + eps);
                let plus = loss(&enc, &mut acts, &r1, &r2);
                set(&mut enc, i, e, x - eps);
                let minus = loss(&enc, &mut acts, &r1, &r2);
                set(&mut enc, i, e, x);
                // The step actually taken in f32.
                let numeric = (plus - minus) / ((x + eps) as f64 - (x - eps) as f64);
                let a = g[e] as f64;
                // |a - n| <= 2e-3 max(1, |n|): the worst seen is 2.4e-4 (eps^2
                // truncation and f32 rounding), gradients here are 0.005 to 17.
                let err = (a - numeric).abs() / numeric.abs().max(1.0);
                if err > worst.0 {
                    worst = (err, format!("{name}[{e}]: analytic {a}, numeric {numeric}"));
                }
                assert!(err <= 2e-3, "{name}[{e}]: analytic {a} vs numeric {numeric}");
            }
        }
        eprintln!("worst relative error {:.2e} at {}", worst.0, worst.1);

        // No dpooled is the same as a zero dpooled.
        let zeros = be.zeros(&[b, DIM], DType::F32).unwrap();
        let (mut g1, mut g2) = (fresh_grads(&enc), fresh_grads(&enc));
        enc.backward(&acts, &mut g1, dtok.view(), None).unwrap();
        enc.backward(&acts, &mut g2, dtok.view(), Some(zeros.view())).unwrap();
        let (g1, g2) = (all_grads(&enc, &g1), all_grads(&enc, &g2));
        for ((n, a), (_, b)) in g1.iter().zip(&g2) {
            assert_eq!(bits(a), bits(b), "{n}");
        }
    }

    /// What the padded positions hold changes neither the real outputs nor
    /// any gradient (bit for bit), whatever dtokens says at padded rows.
    #[test]
    fn padding_changes_no_real_output_and_no_gradient() {
        let enc = tiny(1);
        let be = enc.backend();
        let (ids, mask, b, l) = batch(&enc);
        let mut other = ids.clone();
        other[8] = 20; // a token used nowhere else
        other[9] = 11; // a token also used at a real position
        let (r1, r2) = (random(b * l * DIM, 3), random(b * DIM, 4));
        let dtok = be.upload_f32(&[b, l, DIM], &r1, DType::F32).unwrap();
        let dpool = be.upload_f32(&[b, DIM], &r2, DType::F32).unwrap();
        let run = |ids: &[u32]| {
            let mut acts = TextEncoderActs::default();
            enc.forward_train(&mut acts, ids, &mask, b, l).unwrap();
            let mut grads = fresh_grads(&enc);
            enc.backward(&acts, &mut grads, dtok.view(), Some(dpool.view()))
                .unwrap();
            let tokens = be.read_f32(acts.tokens().unwrap()).unwrap();
            let pooled = be.read_f32(acts.pooled().unwrap()).unwrap();
            (tokens, pooled, all_grads(&enc, &grads))
        };
        let (t1, p1, g1) = run(&ids);
        let (t2, p2, g2) = run(&other);
        for (r, &m) in mask.iter().enumerate() {
            let (a, b) = (&t1[r * DIM..(r + 1) * DIM], &t2[r * DIM..(r + 1) * DIM]);
            if m != 0 {
                assert_eq!(bits(a), bits(b), "real row {r}");
            } else {
                assert_ne!(a, b, "padded row {r} should see its own token");
            }
        }
        assert_eq!(bits(&p1), bits(&p2));
        for ((n, a), (_, b)) in g1.iter().zip(&g2) {
            assert_eq!(bits(a), bits(b), "{n}");
        }
        assert!(g1[0].1[20 * DIM..21 * DIM].iter().all(|&x| x == 0.0));
    }
}
