//! The "no routing" baseline: a MoE layer with one expert and this router is
//! exactly a dense FFN.

use super::common::{
    check_backward, check_backward_on, check_scores, check_scores_on, component, empty_device_routing, empty_routing,
};
use ecdit_engine::{
    Backend, BackendExt, ComponentInfo, DType, DeviceRouting, Dispatch, EngineError, Family, Result, RouteShape,
    Router, Routing, RoutingStats, TensorMut, TensorRef,
};
use serde_json::{json, Value};

/// Every token goes to expert 0 with gate 1. The layer must have exactly one
/// expert (anything else is an error, not a silent truncation). The softmax
/// over one expert is constant, so the score gradient is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenseRouter;

impl DenseRouter {
    /// Registry kind.
    pub const KIND: &'static str = "dense";

    /// What the registry lists for this router.
    pub fn info() -> ComponentInfo {
        ComponentInfo {
            family: Family::Router,
            kind: Self::KIND.into(),
            description: "no routing: every token to the single expert with gate 1 (a dense FFN)".into(),
            params: vec![],
            origin: "builtin".into(),
        }
    }
}

impl Router for DenseRouter {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({ "kind": Self::KIND })
    }

    fn couples_samples(&self) -> bool {
        false
    }

    // scores: [N, 1]
    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        check_one_expert(shape)?;
        check_scores(Self::KIND, scores, shape)?;
        let n = shape.tokens();
        if n == 0 {
            return Ok(empty_routing(1));
        }
        let dispatch = Dispatch {
            experts: 1,
            tokens_total: n,
            offsets: vec![0, n],
            tokens: (0..n as u32).collect(),
            gates: vec![1.0; n],
        };
        let probs = vec![1.0f32; n]; // softmax over a single expert
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: None,
            stats,
            group_size: n,
        })
    }

    fn backward(
        &self,
        routing: &Routing,
        scores: &[f32],
        grad_gates: &[f32],
        _grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()> {
        check_backward(Self::KIND, routing, scores, grad_gates, grad_scores)?;
        grad_scores.fill(0.0);
        Ok(())
    }

    // The same routing on the backend, without a transfer: the softmax over
    // one expert is exactly 1, and expert choice's selection taking all
    // `tokens_per_sample` rows of each sample (all tied at 1) lists them in
    // row order: tokens 0..N with gate 1.
    fn route_on(&self, backend: &dyn Backend, scores: TensorRef<'_>, shape: RouteShape) -> Result<DeviceRouting> {
        check_one_expert(shape)?;
        check_scores_on(Self::KIND, scores, shape)?;
        let (n, tps) = (shape.tokens(), shape.tokens_per_sample);
        if n == 0 {
            return empty_device_routing(backend, 1);
        }
        let mut probs = backend.zeros(&[n, 1], DType::F32)?;
        backend.router_softmax(probs.view_mut(), scores, n, 1)?;
        let mut tokens = backend.zeros(&[n], DType::U32)?;
        let mut gates = backend.zeros(&[n], DType::F32)?;
        backend.top_k_tokens(
            tokens.view_mut(),
            gates.view_mut(),
            probs.view(),
            shape.samples,
            tps,
            1,
            tps,
        )?;
        Ok(DeviceRouting {
            experts: 1,
            tokens_total: n,
            offsets: vec![0, n],
            tokens,
            gates,
            probs,
            aux_loss: None,
            group_size: n,
            host: None,
        })
    }

    fn backward_on(
        &self,
        backend: &dyn Backend,
        routing: &DeviceRouting,
        scores: TensorRef<'_>,
        grad_gates: TensorRef<'_>,
        _grad_aux: f32,
        grad_scores: TensorMut<'_>,
    ) -> Result<()> {
        check_backward_on(Self::KIND, routing, scores, grad_gates, grad_scores.as_ref())?;
        backend.fill(grad_scores, 0.0)
    }
}

/// The dense router serves exactly one expert.
fn check_one_expert(shape: RouteShape) -> Result<()> {
    if shape.experts != 1 {
        return Err(EngineError::shape(
            format!("{} (experts)", component(DenseRouter::KIND)),
            "a layer with exactly 1 expert",
            format!("{} experts", shape.experts),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_to_the_one_expert() {
        let shape = RouteShape {
            samples: 2,
            tokens_per_sample: 3,
            experts: 1,
        };
        let r = DenseRouter.route(&[0.5, -1.0, 2.0, 0.0, 3.0, 1.0], shape).unwrap();
        assert_eq!(r.dispatch.tokens, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(r.dispatch.gates, vec![1.0; 6]);
        assert_eq!(r.stats.unrouted_fraction, 0.0);
        assert_eq!(r.stats.router_entropy, 0.0);
        let e = DenseRouter
            .route(
                &[0.0; 4],
                RouteShape {
                    samples: 1,
                    tokens_per_sample: 2,
                    experts: 2,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 experts"), "{e}");
    }
}
