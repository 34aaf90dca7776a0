//! The dense feed-forward: `fc2(GELU_tanh(fc1(x)))` (timm `Mlp` with DiT's
//! `approx_gelu`). Names `mlp.fc1` [h, d], `mlp.fc2` [d, h].

use super::buffer::resize;
use super::linear::Linear;
use super::param::{Param, Params};
use ecdit_engine::{Backend, Result, Unary};

/// `blocks.{i}.mlp`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// `mlp.fc1`: [h, d].
    pub fc1: Linear,
    /// `mlp.fc2`: [d, h].
    pub fc2: Linear,
}

/// What the MLP computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MlpActs {
    /// [N, h] before GELU.
    pub pre: Vec<f32>,
    /// [N, h] after GELU.
    pub act: Vec<f32>,
}

impl Mlp {
    /// Xavier weights, zero biases.
    pub fn new(prefix: &str, d: usize, hidden: usize) -> Self {
        Self {
            fc1: Linear::xavier(&format!("{prefix}.fc1"), hidden, d),
            fc2: Linear::xavier(&format!("{prefix}.fc2"), d, hidden),
        }
    }

    /// out: [N, d]; acts: filled; x: [N, d].
    pub fn forward(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        acts: &mut MlpActs,
        x: &[f32],
        rows: usize,
    ) -> Result<()> {
        let h = self.fc1.out_dim;
        resize(&mut acts.pre, rows * h);
        resize(&mut acts.act, rows * h);
        self.fc1.forward(backend, &mut acts.pre, x, rows)?;
        backend.unary(Unary::GeluTanh, &mut acts.act, &acts.pre)?;
        self.fc2.forward(backend, out, &acts.act, rows)
    }
}

impl Params for Mlp {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.fc1.collect(out);
        self.fc2.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.fc1.collect_mut(out);
        self.fc2.collect_mut(out);
    }
}
