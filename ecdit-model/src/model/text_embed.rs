//! Text conditioning: the encoded prompt the model reads, the caption
//! projection its cross-attention keys come from (PixArt's `y_embedder`), and
//! the optional pooled-text term of the adaLN conditioning vector.

use super::act::Act;
use super::grads::Grads;
use super::linear::Linear;
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, DType, EngineError, Init, Param, Params, Result, TensorMut, TensorRef, Unary};

/// A borrowed batch of encoded prompts (the fields of `text::TextBatch`).
#[derive(Clone, Copy, Debug)]
pub struct TextInput<'a> {
    /// [B, L, dim] token embeddings.
    pub tokens: &'a [f32],
    /// [B, L], 1 = real token, 0 = padding.
    pub mask: &'a [u8],
    /// [B, dim] pooled embedding.
    pub pooled: &'a [f32],
    /// Prompts B.
    pub batch: usize,
    /// Tokens per prompt L.
    pub len: usize,
    /// Channels per token.
    pub dim: usize,
}

impl<'a> TextInput<'a> {
    /// Checks buffer lengths against `batch`, `len`, `dim` and the model's text width.
    pub fn check(&self, text_dim: usize) -> Result<()> {
        if self.dim != text_dim {
            return Err(EngineError::shape("text conditioning (dim)", text_dim, self.dim));
        }
        check_len(
            "text conditioning",
            "tokens [B, L, dim]",
            self.tokens.len(),
            self.batch * self.len * self.dim,
        )?;
        check_len(
            "text conditioning",
            "mask [B, L]",
            self.mask.len(),
            self.batch * self.len,
        )?;
        check_len(
            "text conditioning",
            "pooled [B, dim]",
            self.pooled.len(),
            self.batch * self.dim,
        )
    }

    /// Samples `start..start + n` of the batch (checked by the caller:
    /// `start + n <= batch` and the lengths as [`TextInput::check`]).
    pub fn slice(&self, start: usize, n: usize) -> TextInput<'a> {
        let (l, c) = (self.len, self.dim);
        TextInput {
            tokens: &self.tokens[start * l * c..(start + n) * l * c],
            mask: &self.mask[start * l..(start + n) * l],
            pooled: &self.pooled[start * c..(start + n) * c],
            batch: n,
            len: l,
            dim: c,
        }
    }
}

impl<'a> From<&'a crate::text::TextBatch> for TextInput<'a> {
    fn from(batch: &'a crate::text::TextBatch) -> Self {
        TextInput {
            tokens: &batch.tokens,
            mask: &batch.mask,
            pooled: &batch.pooled,
            batch: batch.batch,
            len: batch.len,
            dim: batch.dim,
        }
    }
}

/// `y_embedder.y_proj.{fc1,fc2}`: text tokens `[B, L, text_dim] -> [B, L, d]`
/// through `Linear -> GELU(tanh) -> Linear` (PixArt's caption embedder).
#[derive(Debug)]
pub struct CaptionEmbedder {
    /// `y_embedder.y_proj.fc1`: [d, text_dim].
    pub fc1: Linear,
    /// `y_embedder.y_proj.fc2`: [d, d].
    pub fc2: Linear,
}

/// What the caption embedder computes, kept for backward.
#[derive(Debug, Default)]
pub struct CaptionActs {
    /// [B, L, d] before GELU.
    pub hidden: Act,
    /// [B, L, d] after GELU.
    pub hidden_act: Act,
    /// [B, L, d] the projected text tokens (cross-attention keys and values read them).
    pub out: Act,
}

impl CaptionEmbedder {
    /// Xavier weights, zero biases.
    pub fn new(backend: &dyn Backend, d: usize, text_dim: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            fc1: Linear::xavier(backend, "y_embedder.y_proj.fc1", d, text_dim, dtype)?,
            fc2: Linear::xavier(backend, "y_embedder.y_proj.fc2", d, d, dtype)?,
        })
    }

    /// acts: filled; tokens: [B, L, text_dim] on the backend (one prompt's L
    /// tokens at a time, see [`Linear::forward_per_sample`]).
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut CaptionActs,
        tokens: TensorRef<'_>,
        batch: usize,
        len: usize,
        dtype: DType,
    ) -> Result<()> {
        let d = self.fc2.out_dim;
        for a in [&mut acts.hidden, &mut acts.hidden_act, &mut acts.out] {
            a.ensure(backend, &[batch, len, d], dtype)?;
        }
        self.fc1
            .forward_per_sample(backend, acts.hidden.view_mut()?, tokens, batch, len, None)?;
        backend.unary(Unary::GeluTanh, acts.hidden_act.view_mut()?, acts.hidden.view()?)?;
        self.fc2
            .forward_per_sample(backend, acts.out.view_mut()?, acts.hidden_act.view()?, batch, len, None)
    }
}

/// `pooled_embedder.mlp.{0,2}`: pooled text `[B, text_dim] -> [B, d]` through
/// `Linear -> SiLU -> Linear` (shaped like the timestep embedder), added to `c`.
#[derive(Debug)]
pub struct PooledEmbedder {
    /// `pooled_embedder.mlp.0`: [d, text_dim].
    pub fc1: Linear,
    /// `pooled_embedder.mlp.2`: [d, d].
    pub fc2: Linear,
}

/// What the pooled embedder computes, kept for backward.
#[derive(Debug, Default)]
pub struct PooledActs {
    /// [B, d] before SiLU.
    pub hidden: Act,
    /// [B, d] after SiLU.
    pub hidden_act: Act,
    /// [B, d] the embedding.
    pub emb: Act,
}

impl PooledEmbedder {
    /// Weights `N(0, 0.02^2)` as the timestep MLP, zero biases.
    pub fn new(backend: &dyn Backend, d: usize, text_dim: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(backend, "pooled_embedder.mlp.0", d, text_dim, Init::Normal(0.02), dtype)?,
            fc2: Linear::new(backend, "pooled_embedder.mlp.2", d, d, Init::Normal(0.02), dtype)?,
        })
    }

    /// acts: filled; pooled: [B, text_dim] on the backend.
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut PooledActs,
        pooled: TensorRef<'_>,
        batch: usize,
        dtype: DType,
    ) -> Result<()> {
        let d = self.fc2.out_dim;
        for a in [&mut acts.hidden, &mut acts.hidden_act, &mut acts.emb] {
            a.ensure(backend, &[batch, d], dtype)?;
        }
        self.fc1
            .forward_per_sample(backend, acts.hidden.view_mut()?, pooled, batch, 1, None)?;
        backend.unary(Unary::Silu, acts.hidden_act.view_mut()?, acts.hidden.view()?)?;
        self.fc2
            .forward_per_sample(backend, acts.emb.view_mut()?, acts.hidden_act.view()?, batch, 1, None)
    }
}

/// Backward of `out = fc2(act(fc1(inp)))` over `rows` rows, the hidden
/// pre- and post-activation kept in `hidden`, `hidden_act`: parameter
/// gradients accumulate; with `dinp` the input gradient is written there.
/// scratch: two buffers of the hidden's shape.
#[allow(clippy::too_many_arguments)]
fn two_linear_backward(
    backend: &dyn Backend,
    fc1: &Linear,
    fc2: &Linear,
    act: Unary,
    grads: &mut Grads,
    scratch: &mut [Act; 2],
    dinp: Option<TensorMut<'_>>,
    dout: TensorRef<'_>,
    inp: TensorRef<'_>,
    hidden: &Act,
    hidden_act: &Act,
    rows: usize,
) -> Result<()> {
    let [d_act, d_hidden] = scratch;
    for a in [&mut *d_act, &mut *d_hidden] {
        a.ensure(backend, hidden.shape(), dout.dtype())?;
    }
    fc2.backward(
        backend,
        grads,
        Some(d_act.view_mut()?),
        false,
        dout,
        hidden_act.view()?,
        rows,
    )?;
    backend.unary_backward(act, d_hidden.view_mut()?, d_act.view()?, hidden.view()?)?;
    fc1.backward(backend, grads, dinp, false, d_hidden.view()?, inp, rows)
}

impl CaptionEmbedder {
    /// Backward of [`CaptionEmbedder::forward`]: dout [B, L, d] in; with
    /// `dtokens`, the text tokens' gradient [B, L, text_dim] is written there.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        acts: &CaptionActs,
        scratch: &mut [Act; 2],
        grads: &mut Grads,
        dtokens: Option<TensorMut<'_>>,
        dout: TensorRef<'_>,
        tokens: TensorRef<'_>,
    ) -> Result<()> {
        let rows = dout.numel() / self.fc2.out_dim.max(1);
        two_linear_backward(
            backend,
            &self.fc1,
            &self.fc2,
            Unary::GeluTanh,
            grads,
            scratch,
            dtokens,
            dout,
            tokens,
            &acts.hidden,
            &acts.hidden_act,
            rows,
        )
    }
}

impl PooledEmbedder {
    /// Backward of [`PooledEmbedder::forward`]: demb [B, d] in; with
    /// `dpooled`, the pooled text's gradient [B, text_dim] is written there.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        acts: &PooledActs,
        scratch: &mut [Act; 2],
        grads: &mut Grads,
        dpooled: Option<TensorMut<'_>>,
        demb: TensorRef<'_>,
        pooled: TensorRef<'_>,
    ) -> Result<()> {
        let rows = demb.numel() / self.fc2.out_dim.max(1);
        two_linear_backward(
            backend,
            &self.fc1,
            &self.fc2,
            Unary::Silu,
            grads,
            scratch,
            dpooled,
            demb,
            pooled,
            &acts.hidden,
            &acts.hidden_act,
            rows,
        )
    }
}

macro_rules! two_linear_params {
    ($t:ty) => {
        impl Params for $t {
            fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
                self.fc1.collect(out);
                self.fc2.collect(out);
            }
            fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
                self.fc1.collect_mut(out);
                self.fc2.collect_mut(out);
            }
        }
    };
}
two_linear_params!(CaptionEmbedder);
two_linear_params!(PooledEmbedder);
