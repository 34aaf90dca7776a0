//! `Linear` in the PyTorch layout: `out = inp @ weight^T + bias`.

use super::param::{Init, Param, Params};
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, EngineError, GemmDims, Result};
use std::ops::Range;

/// A linear layer with bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// `<prefix>.weight`: [out_dim, in_dim] (stored shape may split `in_dim`,
    /// as the patch embedding's conv weight [d, C, p, p]).
    pub weight: Param,
    /// `<prefix>.bias`: [out_dim].
    pub bias: Param,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

impl Linear {
    /// A layer named `prefix` with weight shape `[out_dim, in_dim]`, bias zero.
    pub fn new(prefix: &str, out_dim: usize, in_dim: usize, init: Init) -> Self {
        Self::with_weight_shape(prefix, &[out_dim, in_dim], out_dim, in_dim, init)
    }

    /// Xavier-uniform weight, zero bias (DiT's default for `nn.Linear`).
    pub fn xavier(prefix: &str, out_dim: usize, in_dim: usize) -> Self {
        Self::new(
            prefix,
            out_dim,
            in_dim,
            Init::XavierUniform {
                fan_in: in_dim,
                fan_out: out_dim,
            },
        )
    }

    /// A layer whose stored weight shape is `weight_shape` (product `out * in`).
    pub fn with_weight_shape(prefix: &str, weight_shape: &[usize], out_dim: usize, in_dim: usize, init: Init) -> Self {
        debug_assert_eq!(weight_shape.iter().product::<usize>(), out_dim * in_dim);
        Self {
            weight: Param::new(format!("{prefix}.weight"), weight_shape, init),
            bias: Param::new(format!("{prefix}.bias"), &[out_dim], Init::Zeros),
            in_dim,
            out_dim,
        }
    }

    /// out: [rows, out_dim]; inp: [rows, in_dim].
    pub fn forward(&self, backend: &dyn Backend, out: &mut [f32], inp: &[f32], rows: usize) -> Result<()> {
        self.forward_features(backend, out, inp, rows, 0..self.out_dim)
    }

    /// The output features `features` only, from the matching rows of the
    /// weight: a fused projection (q, k, v) writes each part into its own
    /// buffer with no splitting copy.
    /// out: [rows, features.len()]; inp: [rows, in_dim].
    pub fn forward_features(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        inp: &[f32],
        rows: usize,
        features: Range<usize>,
    ) -> Result<()> {
        if features.end > self.out_dim || features.start > features.end {
            return Err(EngineError::shape(
                format!("Linear::forward_features ({})", self.weight.name),
                format!("a feature range inside 0..{}", self.out_dim),
                format!("{features:?}"),
            ));
        }
        let n = features.len();
        let weight = &self.weight.data[features.start * self.in_dim..features.end * self.in_dim];
        backend.gemm(out, inp, weight, GemmDims::nt(rows, n, self.in_dim), 1.0, 0.0)?;
        backend.add_bias(out, &self.bias.data[features], rows, n)
    }

    /// As [`Linear::forward`], one sample's rows at a time, so each sample's
    /// output is the same bits whatever the batch size: a GEMM's summation
    /// order may depend on its row count (the CPU GEMM switches kernels for
    /// tiny products), and the products of per-sample rows (conditioning
    /// vectors, text tokens) are tiny. Image-token products stay batched.
    /// out: [samples * rows_per_sample, out_dim]; inp: [samples * rows_per_sample, in_dim].
    pub fn forward_per_sample(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        inp: &[f32],
        samples: usize,
        rows_per_sample: usize,
    ) -> Result<()> {
        self.forward_features_per_sample(backend, out, inp, samples, rows_per_sample, 0..self.out_dim)
    }

    /// [`Linear::forward_features`] one sample's rows at a time (see
    /// [`Linear::forward_per_sample`]).
    /// out: [samples * rows_per_sample, features.len()]; inp: [samples * rows_per_sample, in_dim].
    pub fn forward_features_per_sample(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        inp: &[f32],
        samples: usize,
        rows_per_sample: usize,
        features: Range<usize>,
    ) -> Result<()> {
        let rows = samples * rows_per_sample;
        let n = features.len();
        check_len("Linear::forward_per_sample", "out", out.len(), rows * n)?;
        check_len("Linear::forward_per_sample", "inp", inp.len(), rows * self.in_dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (out_rows, in_rows) = (rows_per_sample * n, rows_per_sample * self.in_dim);
        for (o, x) in out.chunks_mut(out_rows).zip(inp.chunks(in_rows)) {
            self.forward_features(backend, o, x, rows_per_sample, features.clone())?;
        }
        Ok(())
    }
}

impl Params for Linear {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.weight);
        out.push(&self.bias);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.weight);
        out.push(&mut self.bias);
    }
}
