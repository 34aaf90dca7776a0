//! A block's MoE feed-forward: the engine's [`MoeLayer`] plus the file names
//! and layouts of its weights.
//!
//! Names: `blocks.{i}.moe.router.weight` [E, d] (PyTorch `Linear` layout; the
//! layer computes with its transpose [d, E]) and `blocks.{i}.moe.experts.<name>`
//! for each of the expert kind's stacked parameters (`fc1.weight` [E, d, h] ...).

use crate::config::MoeConfig;
use crate::weights::{VarBuilder, WeightsResult};
use ecdit_engine::{Backend, HostTensor, MoeCache, MoeLayer, Registry, Result, RouteShape};
use rand::Rng;
use std::borrow::Cow;

/// `blocks.{i}.moe`.
pub struct MoeFfn {
    /// The layer (router weights stored [d, E]).
    pub layer: MoeLayer,
    /// `blocks.{i}.moe`.
    pub prefix: String,
}

impl MoeFfn {
    /// A layer with the router and expert the config names, weights drawn as
    /// DiT draws its linears (xavier matrices, zero biases).
    pub fn new(prefix: &str, d: usize, moe: &MoeConfig, registry: &Registry, rng: &mut impl Rng) -> Result<Self> {
        let router = registry.router(&moe.router)?;
        let expert = registry.expert(&moe.expert)?;
        Ok(Self {
            layer: MoeLayer::new_random(router, expert, d, moe.experts, rng)?,
            prefix: prefix.to_string(),
        })
    }

    /// Experts E.
    pub fn experts(&self) -> usize {
        self.layer.experts
    }

    /// out: [B*T, d]; cache: refilled; x: [B*T, d] the modulated FFN input
    /// (the router sees the same input as the experts).
    pub fn forward(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        cache: &mut MoeCache,
        x: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let shape = RouteShape {
            samples: batch,
            tokens_per_sample: tokens,
            experts: self.layer.experts,
        };
        self.layer.forward_into(backend, out, cache, x, shape)
    }

    /// Every tensor as stored in files: (name, shape, data); the router
    /// transposed to [E, d].
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Cow<'_, [f32]>)> {
        let (d, e) = (self.layer.d, self.layer.experts);
        let mut out = vec![(
            format!("{}.router.weight", self.prefix),
            vec![e, d],
            Cow::Owned(transpose(&self.layer.w_router.data, d, e)),
        )];
        for (shape, t) in self.layer.expert.param_shapes(d, e).iter().zip(&self.layer.params) {
            out.push((
                format!("{}.experts.{}", self.prefix, shape.name),
                t.shape.clone(),
                Cow::Borrowed(t.data.as_slice()),
            ));
        }
        out
    }

    /// Replaces every weight with the file's (`vb` is rooted at the file).
    pub fn load(&mut self, vb: &VarBuilder<'_>) -> WeightsResult<()> {
        let (d, e) = (self.layer.d, self.layer.experts);
        let vb = vb.pp(&self.prefix);
        let router = vb.get(&[e, d], "router.weight")?;
        self.layer.w_router = HostTensor {
            shape: vec![d, e],
            data: transpose(&router, e, d),
        };
        let shapes = self.layer.expert.param_shapes(d, e);
        for (shape, t) in shapes.iter().zip(self.layer.params.iter_mut()) {
            t.data = vb.pp("experts").get(&shape.shape, &shape.name)?;
        }
        Ok(())
    }
}

/// out: [cols, rows] = inp^T; inp: [rows, cols].
fn transpose(inp: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = inp[r * cols + c];
        }
    }
    out
}
