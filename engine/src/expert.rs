//! The `Expert` trait: the feed-forward function each expert of a MoE layer
//! applies, computed for all E experts of a layer at once over the
//! expert-major rows a router dispatched.

use crate::backend::Backend;
use crate::error::Result;

/// Name and shape of one parameter tensor of a layer's experts (all E stacked
/// on the leading axis).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamShape {
    /// Parameter name, e.g. `fc1.weight`.
    pub name: String,
    /// Shape, leading axis = experts.
    pub shape: Vec<usize>,
}

/// What an expert's forward keeps for its backward: named buffers.
#[derive(Clone, Debug, Default)]
pub struct ExpertCache {
    /// Buffers in an order the expert defines.
    pub buffers: Vec<Vec<f32>>,
}

/// One kind of expert network (GELU MLP, SwiGLU, ...).
pub trait Expert: Send + Sync {
    /// Registry kind, e.g. `gelu-mlp`.
    fn kind(&self) -> &str;

    /// The full spec that rebuilds this expert.
    fn spec(&self) -> serde_json::Value;

    /// Hidden width for model width `d`.
    fn hidden(&self, d: usize) -> usize;

    /// Parameter tensors of `experts` experts of width `d`, in the order
    /// `forward` and `backward` take them.
    fn param_shapes(&self, d: usize, experts: usize) -> Vec<ParamShape>;

    /// Forward FLOPs for one token through one expert.
    fn flops_per_token(&self, d: usize) -> f64;

    /// Runs every expert over its rows.
    /// out: [N, d]; cache: filled for backward; x: [N, d], rows of expert e
    /// are `offsets[e]..offsets[e + 1]`; params: as `param_shapes`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        cache: &mut ExpertCache,
        x: &[f32],
        params: &[&[f32]],
        offsets: &[usize],
        d: usize,
    ) -> Result<()>;

    /// Backward: overwrites `dx` [N, d] and accumulates parameter gradients
    /// into `dparams` (same order and shapes as `params`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        backend: &dyn Backend,
        dx: &mut [f32],
        dparams: &mut [&mut [f32]],
        dout: &[f32],
        cache: &ExpertCache,
        x: &[f32],
        params: &[&[f32]],
        offsets: &[usize],
        d: usize,
    ) -> Result<()>;
}
