//! Expert-choice routing, exactly as EC-DIT.md section 2: each expert takes the
//! C tokens of each routing group that it scores highest.

use super::common::{
    check_backward, check_backward_on, check_positive, check_scores, check_scores_on, dispatch_with_capacity,
    empty_device_routing, empty_routing, groups_json, read_groups, read_positive, routing_without_aux,
};
use ecdit_engine::routing_math::{key_index, key_value, rank_key, select_best, softmax_rows, softmax_rows_backward};
use ecdit_engine::{
    expert_capacity, Backend, BackendExt, ComponentInfo, DType, DeviceRouting, Family, GemmDims, ParamInfo, ParamType,
    Result, RouteShape, Router, Routing, RoutingGroups, TensorMut, TensorRef,
};
use serde_json::{json, Map, Value};

/// Expert choice (EC-DiT): softmax over experts in f32; per routing group of S
/// tokens every expert takes the `C = expert_capacity(f_c, S, E)` tokens with
/// the largest probability for it (ties: lower token index first). The gate is
/// the raw softmax probability, not renormalised. No auxiliary loss.
///
/// The dispatch is expert-major over the whole batch (global token rows);
/// within an expert the slots go group by group, and inside a group by
/// descending probability.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertChoiceRouter {
    capacity_factor: f64,
    groups: RoutingGroups,
}

impl ExpertChoiceRouter {
    /// Registry kind.
    pub const KIND: &'static str = "expert-choice";

    /// A router with capacity factor `f_c` (finite, > 0) and routing groups.
    pub fn new(capacity_factor: f64, groups: RoutingGroups) -> Result<Self> {
        check_positive(Self::KIND, "capacity_factor", capacity_factor)?;
        Ok(Self {
            capacity_factor,
            groups,
        })
    }

    /// What the registry lists for this router.
    pub fn info() -> ComponentInfo {
        ComponentInfo {
            family: Family::Router,
            kind: Self::KIND.into(),
            description: "expert choice (EC-DiT): each expert takes its top-C tokens per routing group".into(),
            params: vec![
                ParamInfo::new(
                    "capacity_factor",
                    ParamType::Float,
                    Some(json!(2.0)),
                    "f_c: each expert takes C = round(f_c * S / E) tokens of a group of S",
                ),
                ParamInfo::new(
                    "groups",
                    ParamType::Groups,
                    Some(json!("per_sample")),
                    "which tokens compete: per_sample, batch or {\"tokens\": N}",
                ),
            ],
            origin: "builtin".into(),
        }
    }

    /// Builds the router from checked parameters (defaults filled in).
    pub fn from_params(params: &Map<String, Value>) -> Result<Self> {
        let capacity_factor = read_positive(Self::KIND, params, "capacity_factor")?;
        Self::new(capacity_factor, read_groups(Self::KIND, params)?)
    }
}

impl Router for ExpertChoiceRouter {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({
            "kind": Self::KIND,
            "capacity_factor": self.capacity_factor,
            "groups": groups_json(self.groups),
        })
    }

    fn couples_samples(&self) -> bool {
        self.groups != RoutingGroups::PerSample
    }

    fn check_tokens_per_sample(&self, tokens_per_sample: usize) -> Result<()> {
        self.groups.check_fits(tokens_per_sample)
    }

    // scores: [N, E] with N = samples * tokens_per_sample
    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        check_scores(Self::KIND, scores, shape)?;
        let (n, e_count) = (shape.tokens(), shape.experts);
        if n == 0 {
            return Ok(empty_routing(e_count));
        }
        let s = self.groups.group_size(shape)?;
        let n_groups = n / s;
        let c = expert_capacity(self.capacity_factor, s, e_count);

        let mut probs = vec![0.0f32; n * e_count]; // [N, E]
        softmax_rows(&mut probs, scores, e_count);

        let slots = e_count * n_groups * c;
        let mut dispatch = dispatch_with_capacity(e_count, n, slots);
        let mut column: Vec<u64> = Vec::with_capacity(s); // one expert's ranking keys over one group
        for e in 0..e_count {
            for g in 0..n_groups {
                column.clear();
                column.extend((g * s..(g + 1) * s).map(|t| rank_key(probs[t * e_count + e], t as u32)));
                select_best(&mut column, c);
                let chosen = &mut column[..c];
                chosen.sort_unstable();
                for &key in chosen.iter() {
                    dispatch.tokens.push(key_index(key));
                    dispatch.gates.push(key_value(key));
                }
            }
            dispatch.offsets.push(dispatch.tokens.len());
        }
        Ok(routing_without_aux(dispatch, probs, s))
    }

    // gate[slot] = probs[t, e], so dL/dprobs[t, e] = sum of grad_gates over the
    // slots of (t, e); then back through the softmax. grad_aux is unused.
    fn backward(
        &self,
        routing: &Routing,
        scores: &[f32],
        grad_gates: &[f32],
        _grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()> {
        check_backward(Self::KIND, routing, scores, grad_gates, grad_scores)?;
        let d = &routing.dispatch;
        grad_scores.fill(0.0);
        for e in 0..d.experts {
            let r = d.offsets[e]..d.offsets[e + 1];
            for (&t, &gg) in d.tokens[r.clone()].iter().zip(&grad_gates[r]) {
                grad_scores[t as usize * d.experts + e] += gg;
            }
        }
        softmax_rows_backward(grad_scores, &routing.probs, d.experts);
        Ok(())
    }

    // The same routing on the backend: `router_softmax` is bit-identical to
    // the host softmax and `top_k_tokens` ranks with the host's tie rule, and
    // its expert-major [E, groups, C] output is the dispatch itself, so the
    // offsets `e * groups * C` follow from the shape without a transfer.
    fn route_on(&self, backend: &dyn Backend, scores: TensorRef<'_>, shape: RouteShape) -> Result<DeviceRouting> {
        check_scores_on(Self::KIND, scores, shape)?;
        let (n, e_count) = (shape.tokens(), shape.experts);
        if n == 0 {
            return empty_device_routing(backend, e_count);
        }
        let s = self.groups.group_size(shape)?;
        let n_groups = n / s;
        let c = expert_capacity(self.capacity_factor, s, e_count);

        let mut probs = backend.zeros(&[n, e_count], DType::F32)?;
        backend.router_softmax(probs.view_mut(), scores, n, e_count)?;
        let slots = e_count * n_groups * c;
        let mut tokens = backend.zeros(&[e_count, n_groups, c], DType::U32)?;
        let mut gates = backend.zeros(&[e_count, n_groups, c], DType::F32)?;
        backend.top_k_tokens(
            tokens.view_mut(),
            gates.view_mut(),
            probs.view(),
            n_groups,
            s,
            e_count,
            c,
        )?;
        tokens.reshape(&[slots])?;
        gates.reshape(&[slots])?;
        Ok(DeviceRouting {
            experts: e_count,
            tokens_total: n,
            offsets: (0..=e_count).map(|e| e * n_groups * c).collect(),
            tokens,
            gates,
            probs,
            aux_loss: None,
            group_size: s,
            host: None,
        })
    }

    // As `backward`, on the backend. dL/dprobs[t, e] is grad_gates scattered
    // to (token, expert); a scatter writes whole rows, so each expert's
    // gradients go to its own row of an expert-major [E, T] buffer, and one
    // product with the identity turns that into [T, E] (exact: each output
    // is one value times 1 plus zeros).
    fn backward_on(
        &self,
        backend: &dyn Backend,
        routing: &DeviceRouting,
        scores: TensorRef<'_>,
        grad_gates: TensorRef<'_>,
        _grad_aux: f32,
        mut grad_scores: TensorMut<'_>,
    ) -> Result<()> {
        check_backward_on(Self::KIND, routing, scores, grad_gates, grad_scores.as_ref())?;
        let (n, e_count) = (routing.tokens_total, routing.experts);
        if n == 0 {
            return Ok(());
        }
        let mut by_expert = backend.zeros(&[e_count, n], DType::F32)?; // [E, T]
        for e in 0..e_count {
            let (r0, r1) = (routing.offsets[e], routing.offsets[e + 1]);
            if r1 > r0 {
                backend.scatter_add_rows(
                    by_expert.view_mut().rows(e, 1)?.reshape(&[n, 1])?,
                    grad_gates.flat(r0, r1 - r0)?.reshape(&[r1 - r0, 1])?,
                    routing.tokens.view().flat(r0, r1 - r0)?,
                    None,
                    1,
                )?;
            }
        }
        let mut identity = backend.zeros(&[e_count, e_count], DType::F32)?;
        for e in 0..e_count {
            backend.fill(identity.view_mut().flat(e * (e_count + 1), 1)?, 1.0)?;
        }
        // grad_probs = by_expert^T @ I   ([T, E] from [E, T])
        let mut grad_probs = backend.zeros(&[n, e_count], DType::F32)?;
        backend.gemm(
            grad_probs.view_mut(),
            by_expert.view(),
            identity.view(),
            None,
            GemmDims::tn(n, e_count, e_count),
            1.0,
            0.0,
        )?;
        backend.softmax_rows_backward(
            grad_scores.reborrow(),
            grad_probs.view(),
            routing.probs.view(),
            n,
            e_count,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 4 tokens, 2 experts, one group, f_c = 1: C = round(1 * 4 / 2) = 2.
    // Logits chosen so the softmax is easy: row [ln a, ln b] gives [a, b] / (a + b).
    #[test]
    fn four_tokens_two_experts_by_hand() {
        let rows = [[0.9f32, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]];
        let scores: Vec<f32> = rows.iter().flat_map(|r| r.map(f32::ln)).collect();
        let router = ExpertChoiceRouter::new(1.0, RoutingGroups::PerSample).unwrap();
        let shape = RouteShape {
            samples: 1,
            tokens_per_sample: 4,
            experts: 2,
        };
        let r = router.route(&scores, shape).unwrap();
        // Expert 0 column: 0.9, 0.6, 0.3, 0.2 -> tokens 0, 1.
        // Expert 1 column: 0.1, 0.4, 0.7, 0.8 -> tokens 3, 2 (descending prob).
        assert_eq!(r.dispatch.offsets, vec![0, 2, 4]);
        assert_eq!(r.dispatch.tokens, vec![0, 1, 3, 2]);
        let want = [0.9f32, 0.6, 0.8, 0.7];
        for (g, w) in r.dispatch.gates.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "gates {:?} want {want:?}", r.dispatch.gates);
        }
        assert_eq!(r.stats.experts_per_token_hist, vec![0, 4, 0]);
        assert!(r.aux_loss.is_none());
    }

    // Equal probabilities: the lower token index wins.
    #[test]
    fn ties_go_to_the_lower_token() {
        let scores = vec![0.0f32; 6 * 2];
        let router = ExpertChoiceRouter::new(1.0, RoutingGroups::PerSample).unwrap();
        let shape = RouteShape {
            samples: 1,
            tokens_per_sample: 6,
            experts: 2,
        };
        let r = router.route(&scores, shape).unwrap();
        assert_eq!(r.dispatch.tokens, vec![0, 1, 2, 0, 1, 2]);
        assert!(r.dispatch.gates.iter().all(|&g| g == 0.5));
    }

    // Backward by hand for one token, two experts, gate = p0: dL/dx0 = p0 p1 gg.
    #[test]
    fn backward_of_one_gate() {
        let scores = [0.3f32, -0.2];
        let router = ExpertChoiceRouter::new(0.5, RoutingGroups::PerSample).unwrap();
        let shape = RouteShape {
            samples: 1,
            tokens_per_sample: 1,
            experts: 2,
        };
        let r = router.route(&scores, shape).unwrap();
        // C = clamp(round(0.25), 1, 1) = 1: both experts take token 0.
        assert_eq!(r.dispatch.tokens, vec![0, 0]);
        let (p0, p1) = (r.probs[0], r.probs[1]);
        let mut grad = [0.0f32; 2];
        router.backward(&r, &scores, &[1.0, 0.0], 0.0, &mut grad).unwrap();
        assert!(
            (grad[0] - p0 * p1).abs() < 1e-6 && (grad[1] + p0 * p1).abs() < 1e-6,
            "{grad:?}"
        );
    }
}
