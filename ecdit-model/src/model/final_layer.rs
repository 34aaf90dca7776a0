//! The final layer: adaLN with two chunks (`shift, scale`), LayerNorm without
//! affine, `Linear(d, p*p*out_channels)`; the model then unpatchifies.

use super::adaln::{adaln_modulation, ln_modulate, Chunk};
use super::buffer::resize;
use super::linear::Linear;
use super::param::{Init, Param, Params};
use ecdit_engine::{Backend, Result};

/// `final_layer`.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalLayer {
    /// `final_layer.adaLN_modulation.1`: [2d, d], zero-initialised.
    pub adaln: Linear,
    /// `final_layer.linear`: [p*p*out_ch, d], zero-initialised (DiT).
    pub linear: Linear,
}

/// What the final layer computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinalActs {
    /// [B, 2d] `shift, scale`.
    pub modulation: Vec<f32>,
    /// [B, T, d] LN(x).
    pub ln: Vec<f32>,
    /// [B*T] LayerNorm means.
    pub ln_mean: Vec<f32>,
    /// [B*T] LayerNorm reciprocal standard deviations.
    pub ln_rstd: Vec<f32>,
    /// [B, T, d] modulated.
    pub modulated: Vec<f32>,
    /// [B, T, p*p*out_ch] linear output, index `(pi * p + qi) * out_ch + ch`.
    pub out: Vec<f32>,
}

impl FinalLayer {
    /// Zero-initialised (DiT).
    pub fn new(d: usize, patch_out: usize) -> Self {
        Self {
            adaln: adaln_modulation("final_layer", d, 2),
            linear: Linear::new("final_layer.linear", patch_out, d, Init::Zeros),
        }
    }

    /// acts: filled (`acts.out` is the result); x: [B, T, d]; silu_c: [B, d].
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut FinalActs,
        x: &[f32],
        silu_c: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        self.forward_into(backend, acts, true, x, silu_c, batch, tokens)
    }

    /// As [`FinalLayer::forward`]; without `keep_ln`, `acts.ln` stays empty
    /// (LN is modulated in place in `acts.modulated`, the same bits).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_into(
        &self,
        backend: &dyn Backend,
        acts: &mut FinalActs,
        keep_ln: bool,
        x: &[f32],
        silu_c: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let d = self.adaln.in_dim;
        let rows = batch * tokens;
        resize(&mut acts.modulation, batch * 2 * d);
        resize(&mut acts.ln, if keep_ln { rows * d } else { 0 });
        resize(&mut acts.ln_mean, rows);
        resize(&mut acts.ln_rstd, rows);
        resize(&mut acts.modulated, rows * d);
        resize(&mut acts.out, rows * self.linear.out_dim);
        self.adaln
            .forward_per_sample(backend, &mut acts.modulation, silu_c, batch, 1)?;
        let ch = |index| Chunk { index, chunks: 2 };
        ln_modulate(
            backend,
            &mut acts.modulated,
            keep_ln.then_some(acts.ln.as_mut_slice()),
            &mut acts.ln_mean,
            &mut acts.ln_rstd,
            x,
            &acts.modulation,
            ch(0),
            ch(1),
            batch,
            tokens,
            d,
        )?;
        self.linear.forward(backend, &mut acts.out, &acts.modulated, rows)
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
