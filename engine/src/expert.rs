//! The `Expert` trait: the feed-forward function each expert of a MoE layer
//! applies, computed for all E experts of a layer at once over the
//! expert-major rows a router dispatched, on tensors of a backend.

use crate::backend::Backend;
use crate::error::Result;
use crate::param::{Init, Layout};
use crate::tensor::{Tensor, TensorMut, TensorRef};

/// Name, upstream shape, memory layout and initialisation of one parameter
/// tensor of a layer's experts (all E stacked on the leading axis).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamShape {
    /// Parameter name, e.g. `fc1.weight`.
    pub name: String,
    /// Shape on disk, leading axis = experts.
    pub shape: Vec<usize>,
    /// How the expert wants it held in memory.
    pub layout: Layout,
    /// How it starts.
    pub init: Init,
}

/// What an expert's forward keeps for its backward: tensors in an order the
/// expert defines. After a forward without `keep` it holds only scratch that
/// the next forward reuses (no backward may read it).
#[derive(Debug, Default)]
pub struct ExpertCache {
    /// Cached tensors.
    pub tensors: Vec<Tensor>,
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
    /// out: [N, d]; cache: refilled for backward with `keep`, otherwise used
    /// as scratch reused from call to call (inference keeps no activations);
    /// x: [N, d], rows of expert e are `offsets[e]..offsets[e + 1]`; params:
    /// as `param_shapes`, in their memory layout.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        keep: bool,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()>;

    /// [`Expert::forward`] at inference (nothing kept) over the gathered
    /// rows `x[rows[i]]`, reading them where its first product runs
    /// ([`Backend::gemm_grouped_bias_gathered`]). Returns `false`, having
    /// done nothing, for an expert that takes its rows only as gathered
    /// (the default): the caller then gathers them and calls `forward`.
    /// out: [N, d]; x: [T, d]; rows: [N] (u32); the rest as in `forward`.
    #[allow(clippy::too_many_arguments)]
    fn forward_gathered(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        x: TensorRef<'_>,
        rows: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<bool> {
        let _ = (backend, out, cache, x, rows, params, offsets, d);
        Ok(false)
    }

    /// Backward: overwrites `dx` [N, d] and accumulates parameter gradients
    /// into `dparams` (same order and memory shapes as `params`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        backend: &dyn Backend,
        dx: TensorMut<'_>,
        dparams: &mut [TensorMut<'_>],
        dout: TensorRef<'_>,
        cache: &ExpertCache,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()>;
}
