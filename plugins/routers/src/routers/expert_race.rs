//! Expert race (Race-DiT, 2025): tokens and experts race together, one top-K
//! over a group's whole `[tokens x experts]` score set.

use super::common::{
    check_backward, check_positive, check_scores, component, dispatch_with_capacity, empty_routing, groups_json,
    read_groups, read_positive, routing_without_aux,
};
use ecdit_engine::routing_math::{key_index, rank_key, select_best, softmax_rows, softmax_rows_backward};
use ecdit_engine::spec::get;
use ecdit_engine::{
    ComponentInfo, EngineError, Family, ParamInfo, ParamType, Result, RouteShape, Router, Routing, RoutingGroups,
};
use serde_json::{json, Map, Value};

/// The function that turns router logits into race scores (and gates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    /// Softmax over the experts of each token.
    Softmax,
    /// Independent sigmoid of each logit (Race-DiT's default).
    Sigmoid,
}

impl ScoreFn {
    fn name(self) -> &'static str {
        match self {
            ScoreFn::Softmax => "softmax",
            ScoreFn::Sigmoid => "sigmoid",
        }
    }
}

/// Expert race: per routing group of S tokens, the `K = round(k * S)` (half
/// up, clamped to `[1, S * E]`) largest scores of the whole `[S, E]` block win,
/// whichever tokens and experts they belong to (ties: lower token-major flat
/// index first). Gates are the winning scores after `score_fn`.
///
/// `Routing.probs` holds the row softmax of the logits for both score
/// functions, so the entropy statistic means the same thing everywhere; the
/// sigmoid backward needs only the gates (`s' = s (1 - s)`). The dispatch lists
/// each expert's tokens in ascending order.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertRaceRouter {
    k: f64,
    score_fn: ScoreFn,
    groups: RoutingGroups,
}

impl ExpertRaceRouter {
    /// Registry kind.
    pub const KIND: &'static str = "expert-race";

    /// A router with `k` (finite, > 0) expected experts per token.
    pub fn new(k: f64, score_fn: ScoreFn, groups: RoutingGroups) -> Result<Self> {
        check_positive(Self::KIND, "k", k)?;
        Ok(Self { k, score_fn, groups })
    }

    /// What the registry lists for this router.
    pub fn info() -> ComponentInfo {
        ComponentInfo {
            family: Family::Router,
            kind: Self::KIND.into(),
            description: "expert race (Race-DiT): one top-K over all token-expert scores of a group".into(),
            params: vec![
                ParamInfo::new(
                    "k",
                    ParamType::Float,
                    Some(json!(2.0)),
                    "mean experts per token: K = round(k * S) winners per group",
                ),
                ParamInfo::new(
                    "score_fn",
                    ParamType::Choice(vec!["softmax".into(), "sigmoid".into()]),
                    Some(json!("sigmoid")),
                    "logits to scores",
                ),
                ParamInfo::new(
                    "groups",
                    ParamType::Groups,
                    Some(json!("per_sample")),
                    "which tokens race each other",
                ),
            ],
            origin: "builtin".into(),
        }
    }

    /// Builds the router from checked parameters (defaults filled in).
    pub fn from_params(params: &Map<String, Value>) -> Result<Self> {
        let k = read_positive(Self::KIND, params, "k")?;
        let name: String = get(&component(Self::KIND), params, "score_fn")?;
        let score_fn = match name.as_str() {
            "softmax" => ScoreFn::Softmax,
            "sigmoid" => ScoreFn::Sigmoid,
            other => {
                return Err(EngineError::param(
                    component(Self::KIND),
                    "score_fn",
                    other,
                    "expected softmax or sigmoid",
                ))
            }
        };
        Self::new(k, score_fn, read_groups(Self::KIND, params)?)
    }

    /// Winners per group of `s` tokens and `experts` experts.
    pub fn winners(&self, s: usize, experts: usize) -> usize {
        let k = (self.k * s as f64 + 0.5).floor();
        (k.max(1.0) as usize).min(s * experts)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Router for ExpertRaceRouter {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({
            "kind": Self::KIND,
            "k": self.k,
            "score_fn": self.score_fn.name(),
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
        let k_win = self.winners(s, e_count);

        let mut probs = vec![0.0f32; n * e_count]; // [N, E]
        softmax_rows(&mut probs, scores, e_count);
        let values: Vec<f32> = match self.score_fn {
            ScoreFn::Softmax => probs.clone(),
            ScoreFn::Sigmoid => scores.iter().map(|&x| sigmoid(x)).collect(),
        }; // [N, E]

        let mut won = vec![false; n * e_count]; // [N, E]
        let block = s * e_count;
        let mut race: Vec<u64> = Vec::with_capacity(block); // ranking keys of one group
        for g in 0..n_groups {
            race.clear();
            // Global flat indices keep the token-major tie order inside a group.
            race.extend((g * block..(g + 1) * block).map(|i| rank_key(values[i], i as u32)));
            select_best(&mut race, k_win);
            for &key in &race[..k_win] {
                won[key_index(key) as usize] = true;
            }
        }

        let mut dispatch = dispatch_with_capacity(e_count, n, n_groups * k_win);
        for e in 0..e_count {
            for t in 0..n {
                let i = t * e_count + e;
                if won[i] {
                    dispatch.tokens.push(t as u32);
                    dispatch.gates.push(values[i]);
                }
            }
            dispatch.offsets.push(dispatch.tokens.len());
        }
        Ok(routing_without_aux(dispatch, probs, s))
    }

    // gate = score_fn(x)[t, e] at the winners. Sigmoid: dx = gg * g (1 - g).
    // Softmax: dL/dprobs = gg at the winners, then back through the softmax.
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
            for ((&t, &g), &gg) in d.tokens[r.clone()].iter().zip(&d.gates[r.clone()]).zip(&grad_gates[r]) {
                let i = t as usize * d.experts + e;
                grad_scores[i] += match self.score_fn {
                    ScoreFn::Sigmoid => gg * g * (1.0 - g),
                    ScoreFn::Softmax => gg,
                };
            }
        }
        if self.score_fn == ScoreFn::Softmax {
            softmax_rows_backward(grad_scores, &routing.probs, d.experts);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2 tokens x 2 experts, k = 1 -> K = 2 winners among 4 sigmoid scores.
    #[test]
    fn two_by_two_race_by_hand() {
        let scores = [2.0f32, -1.0, 1.0, 3.0];
        let router = ExpertRaceRouter::new(1.0, ScoreFn::Sigmoid, RoutingGroups::PerSample).unwrap();
        let shape = RouteShape {
            samples: 1,
            tokens_per_sample: 2,
            experts: 2,
        };
        let r = router.route(&scores, shape).unwrap();
        // Winners: (1, 1) = 3.0 and (0, 0) = 2.0; token 1 gets nothing from expert 0.
        assert_eq!(r.dispatch.offsets, vec![0, 1, 2]);
        assert_eq!(r.dispatch.tokens, vec![0, 1]);
        assert!((r.dispatch.gates[0] - sigmoid(2.0)).abs() < 1e-7);
        assert!((r.dispatch.gates[1] - sigmoid(3.0)).abs() < 1e-7);
        assert_eq!(router.winners(2, 2), 2);
        assert_eq!(router.winners(1000, 1), 1000); // clamped to S * E
    }
}
