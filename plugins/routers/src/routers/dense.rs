//! The "no routing" baseline: a MoE layer with one expert and this router is
//! exactly a dense FFN.

use super::common::{check_backward, check_scores, component, empty_routing};
use ecdit_engine::{ComponentInfo, Dispatch, EngineError, Family, Result, RouteShape, Router, Routing, RoutingStats};
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

    // scores: [N, 1]
    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        if shape.experts != 1 {
            return Err(EngineError::shape(
                format!("{} (experts)", component(Self::KIND)),
                "a layer with exactly 1 expert",
                format!("{} experts", shape.experts),
            ));
        }
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
