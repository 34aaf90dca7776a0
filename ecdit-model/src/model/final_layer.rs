//! The final layer: adaLN with two chunks (`shift, scale`), LayerNorm without
//! affine, `Linear(d, p*p*out_channels)`; the model then unpatchifies.

use super::act::Act;
use super::adaln::{adaln_modulation, chunks, ln_modulate};
use super::grads::Grads;
use super::linear::Linear;
use ecdit_engine::{Backend, DType, Init, Param, Params, Result, RowDims, TensorMut, TensorRef};

/// `final_layer`.
#[derive(Debug)]
pub struct FinalLayer {
    /// `final_layer.adaLN_modulation.1`: [2d, d], zero-initialised.
    pub adaln: Linear,
    /// `final_layer.linear`: [p*p*out_ch, d], zero-initialised (DiT).
    pub linear: Linear,
}

/// What the final layer computes, kept for backward.
#[derive(Debug, Default)]
pub struct FinalActs {
    /// [B, 2d] `shift, scale`.
    pub modulation: Act,
    /// [B, T, d] LN(x).
    pub ln: Act,
    /// [B*T] LayerNorm means (f32).
    pub ln_mean: Act,
    /// [B*T] LayerNorm reciprocal standard deviations (f32).
    pub ln_rstd: Act,
    /// [B, T, d] modulated.
    pub modulated: Act,
    /// [B, T, p*p*out_ch] linear output, index `(pi * p + qi) * out_ch + ch`.
    pub out: Act,
}

impl FinalActs {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        [
            &self.modulation,
            &self.ln,
            &self.ln_mean,
            &self.ln_rstd,
            &self.modulated,
            &self.out,
        ]
        .iter()
        .map(|a| a.bytes())
        .sum()
    }
}

impl FinalLayer {
    /// Zero-initialised (DiT).
    pub fn new(backend: &dyn Backend, d: usize, patch_out: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            adaln: adaln_modulation(backend, "final_layer", d, 2, dtype)?,
            linear: Linear::new(backend, "final_layer.linear", patch_out, d, Init::Zeros, dtype)?,
        })
    }

    /// acts: filled (`acts.out` is the result); x: [B, T, d]; silu_c: [B, d].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut FinalActs,
        x: TensorRef<'_>,
        silu_c: TensorRef<'_>,
        batch: usize,
        tokens: usize,
        dtype: DType,
    ) -> Result<()> {
        let d = self.adaln.in_dim;
        let rows = batch * tokens;
        acts.modulation.ensure(backend, &[batch, 2 * d], dtype)?;
        acts.ln.ensure(backend, &[batch, tokens, d], dtype)?;
        acts.ln_mean.ensure(backend, &[rows], DType::F32)?;
        acts.ln_rstd.ensure(backend, &[rows], DType::F32)?;
        acts.modulated.ensure(backend, &[batch, tokens, d], dtype)?;
        acts.out.ensure(backend, &[batch, tokens, self.linear.out_dim], dtype)?;
        self.adaln
            .forward_per_sample(backend, acts.modulation.view_mut()?, silu_c, batch, 1, None)?;
        ln_modulate(
            backend,
            acts.modulated.view_mut()?,
            Some(acts.ln.view_mut()?),
            acts.ln_mean.view_mut()?,
            acts.ln_rstd.view_mut()?,
            x,
            acts.modulation.view()?,
            chunks(2, 0, 1),
            RowDims { batch, tokens, d },
        )?;
        self.linear
            .forward(backend, acts.out.view_mut()?, acts.modulated.view()?, rows)
    }
}

/// Scratch of the final layer's backward.
#[derive(Debug, Default)]
pub struct FinalScratch {
    /// [B, T, d] gradient of the modulated input.
    pub d_modulated: Act,
    /// [B, T, d] gradient of LN(x).
    pub d_ln: Act,
    /// [B, 2d] modulation gradient.
    pub dmod: Act,
}

impl FinalLayer {
    /// Backward of [`FinalLayer::forward`]: dout [B, T, p*p*out_ch] in; dx
    /// [B, T, d] overwritten; d_silu_c [B, d] accumulates; parameter
    /// gradients accumulate into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        acts: &FinalActs,
        s: &mut FinalScratch,
        grads: &mut Grads,
        dx: TensorMut<'_>,
        d_silu_c: TensorMut<'_>,
        dout: TensorRef<'_>,
        x: TensorRef<'_>,
        silu_c: TensorRef<'_>,
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let d = self.adaln.in_dim;
        let rows = batch * tokens;
        let dtype = dout.dtype();
        s.d_modulated.ensure(backend, &[batch, tokens, d], dtype)?;
        s.d_ln.ensure(backend, &[batch, tokens, d], dtype)?;
        s.dmod.ensure(backend, &[batch, 2 * d], dtype)?;
        backend.fill(s.dmod.view_mut()?, 0.0)?;
        // out = linear(modulated)
        let dout = dout.reshape(&[rows, self.linear.out_dim])?;
        self.linear.backward(
            backend,
            grads,
            Some(s.d_modulated.view_mut()?),
            false,
            dout,
            acts.modulated.view()?,
            rows,
        )?;
        // modulated = LN(x) * (1 + scale) + shift
        backend.modulate_backward(
            s.d_ln.view_mut()?,
            s.dmod.view_mut()?,
            s.d_modulated.view()?,
            acts.ln.view()?,
            acts.modulation.view()?,
            chunks(2, 0, 1),
            RowDims { batch, tokens, d },
        )?;
        backend.layer_norm_backward(
            dx,
            None,
            None,
            s.d_ln.view()?,
            x,
            acts.ln_mean.view()?,
            acts.ln_rstd.view()?,
            None,
            rows,
            d,
        )?;
        // modulation = adaLN(silu_c)
        self.adaln
            .backward(backend, grads, Some(d_silu_c), true, s.dmod.view()?, silu_c, batch)
    }
}

impl Params for FinalLayer {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.adaln.collect(out);
        self.linear.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.adaln.collect_mut(out);
        self.linear.collect_mut(out);
    }
}
