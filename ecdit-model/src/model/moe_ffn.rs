//! A block's MoE feed-forward: the engine's [`MoeLayer`] under the block's
//! names: `blocks.{i}.moe.router.weight` [E, d] (PyTorch `Linear` layout,
//! held input-major) and `blocks.{i}.moe.experts.<name>` for each of the
//! expert kind's stacked parameters (`fc1.weight` [E, d, h] input-major ...). Routing
//! runs on the backend; its statistics are downloaded only when asked.

use super::grads::Grads;
use crate::config::MoeConfig;
use ecdit_engine::{
    Backend, DType, DeviceRouting, MoeCache, MoeGrads, MoeLayer, Param, Params, Registry, Result, RouteShape,
    TensorMut, TensorRef,
};
use rand::Rng;
use std::sync::Arc;

/// `blocks.{i}.moe`.
pub struct MoeFfn {
    /// The layer (router weights and stacked expert parameters).
    pub layer: MoeLayer,
}

impl std::fmt::Debug for MoeFfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeFfn")
            .field("router", &self.layer.router.kind())
            .field("expert", &self.layer.expert.kind())
            .field("experts", &self.layer.experts)
            .finish()
    }
}

impl MoeFfn {
    /// A layer with the router and expert the config names, weights drawn as
    /// DiT draws its linears (xavier matrices, zero biases).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &dyn Backend,
        prefix: &str,
        d: usize,
        moe: &MoeConfig,
        registry: &Registry,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let router = registry.router(&moe.router)?;
        let expert = registry.expert(&moe.expert)?;
        Ok(Self {
            layer: MoeLayer::new_random(router, expert, d, moe.experts, backend, dtype, prefix, rng)?,
        })
    }

    /// Experts E.
    pub fn experts(&self) -> usize {
        self.layer.experts
    }

    /// out: [B*T, d] (overwritten); cache: reused across calls, valid for
    /// backward after a forward with `keep`;
    /// x: [B*T, d] the modulated FFN input (the router sees the same input as
    /// the experts). Returns the routing, on the backend.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut MoeCache,
        keep: bool,
        x: TensorRef<'_>,
        batch: usize,
        tokens: usize,
    ) -> Result<Arc<DeviceRouting>> {
        let shape = RouteShape {
            samples: batch,
            tokens_per_sample: tokens,
            experts: self.layer.experts,
        };
        self.layer.forward(backend, out, cache, keep, x, shape)
    }
}

impl MoeFfn {
    /// Backward of [`MoeFfn::forward`] (kept): the layer's gradients
    /// accumulate into `grads`; dx [B*T, d] is overwritten; `grad_aux`
    /// weighs the router's auxiliary loss.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        grads: &mut Grads,
        dx: TensorMut<'_>,
        cache: &MoeCache,
        x: TensorRef<'_>,
        dout: TensorRef<'_>,
        grad_aux: f32,
    ) -> Result<()> {
        let layer = &self.layer;
        // The engine's layer accumulates into tensors it owns for the call.
        let mut moe_grads = MoeGrads {
            dw_router: grads.take(&layer.w_router)?,
            dparams: Vec::with_capacity(layer.params.len()),
        };
        let mut result = Ok(());
        for p in &layer.params {
            match grads.take(p) {
                Ok(t) => moe_grads.dparams.push(t),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = layer.backward(backend, dx, &mut moe_grads, cache, x, dout, grad_aux);
        }
        // Every gradient goes back, whatever happened.
        grads.put(&layer.w_router, moe_grads.dw_router)?;
        for (p, t) in layer.params.iter().zip(moe_grads.dparams) {
            grads.put(p, t)?;
        }
        result
    }
}

impl Params for MoeFfn {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.layer.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.layer.collect_mut(out);
    }
}
