//! Token-choice top-k routing (GShard / Switch), the baseline EC-DiT is
//! compared against: each token takes its k best experts.

use super::common::{check_backward, check_scores, component, empty_routing, groups_json, read_groups};
use ecdit_engine::routing_math::{key_index, rank_key, select_best, softmax_rows, softmax_rows_backward};
use ecdit_engine::spec::get;
use ecdit_engine::{
    expert_capacity, ComponentInfo, Dispatch, EngineError, Family, ParamInfo, ParamType, Result, RouteShape, Router,
    Routing, RoutingGroups, RoutingStats,
};
use serde_json::{json, Map, Value};

/// Largest k that picks experts by insertion instead of a partial sort.
const SMALL_K: usize = 8;

/// Token choice top-k with the GShard balance loss.
///
/// - Softmax over experts in f32; each token picks its `k` most probable
///   experts (ties: lower expert index first).
/// - Gates are the picked probabilities, or with `renormalize` those divided by
///   the sum of the token's k picked probabilities (taken before any capacity
///   dropping, as GShard does, so a dropped pick does not inflate the others).
/// - With a capacity factor, each expert takes at most
///   `C = expert_capacity(f_c * k, S, E)` picks per routing group of S tokens, so
///   `f_c = 1` is exactly the average load `k * S / E`. Picks fill capacity
///   GShard-style: every token's first choice in token order, then every
///   second choice, and so on; picks past a full expert are dropped. Without a
///   capacity factor nothing is dropped.
/// - Balance loss per group `aux_g = sum_e P_e * (E * f_e)`, `P_e` the mean
///   router probability of expert e over the group's tokens, `f_e` the fraction
///   of the group's `S * k` picks that chose e **before** capacity dropping;
///   `aux_loss = coef * mean_g aux_g` (always reported, 0 when coef = 0). The
///   backward treats `f_e` as a constant.
///
/// The dispatch lists each expert's tokens in ascending token order.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenChoiceRouter {
    k: usize,
    renormalize: bool,
    capacity_factor: Option<f64>,
    aux_loss_coef: f64,
    groups: RoutingGroups,
}

impl TokenChoiceRouter {
    /// Registry kind.
    pub const KIND: &'static str = "token-choice";

    /// A router; `k >= 1` here, `k <= E` is checked at route time.
    pub fn new(
        k: usize,
        renormalize: bool,
        capacity_factor: Option<f64>,
        aux_loss_coef: f64,
        groups: RoutingGroups,
    ) -> Result<Self> {
        let bad =
            |field: &str, value: String, reason: &str| EngineError::param(component(Self::KIND), field, value, reason);
        if k == 0 {
            return Err(bad("k", "0".into(), "each token must take at least 1 expert"));
        }
        if let Some(f) = capacity_factor {
            if !(f.is_finite() && f > 0.0) {
                return Err(bad(
                    "capacity_factor",
                    f.to_string(),
                    "must be a finite number > 0, or null for no capacity limit",
                ));
            }
        }
        if !(aux_loss_coef.is_finite() && aux_loss_coef >= 0.0) {
            return Err(bad(
                "aux_loss_coef",
                aux_loss_coef.to_string(),
                "must be a finite number >= 0",
            ));
        }
        Ok(Self {
            k,
            renormalize,
            capacity_factor,
            aux_loss_coef,
            groups,
        })
    }

    /// What the registry lists for this router.
    pub fn info() -> ComponentInfo {
        ComponentInfo {
            family: Family::Router,
            kind: Self::KIND.into(),
            description: "token choice top-k (GShard/Switch) with optional capacity and the balance loss".into(),
            params: vec![
                ParamInfo::new("k", ParamType::Int, Some(json!(2)), "experts per token, 1 <= k <= E"),
                ParamInfo::new(
                    "renormalize",
                    ParamType::Bool,
                    Some(json!(false)),
                    "divide the k gates by their sum",
                ),
                ParamInfo::new(
                    "capacity_factor",
                    ParamType::OptionalFloat,
                    Some(Value::Null),
                    "null: no limit; f: each expert takes at most round(f * k * S / E) picks per group",
                ),
                ParamInfo::new(
                    "aux_loss_coef",
                    ParamType::Float,
                    Some(json!(0.01)),
                    "weight of the balance loss sum_e P_e * E * f_e",
                ),
                ParamInfo::new(
                    "groups",
                    ParamType::Groups,
                    Some(json!("per_sample")),
                    "which tokens share capacity and the balance loss",
                ),
            ],
            origin: "builtin".into(),
        }
    }

    /// Builds the router from checked parameters (defaults filled in).
    pub fn from_params(params: &Map<String, Value>) -> Result<Self> {
        let c = component(Self::KIND);
        // Int parameters may arrive as 2.0; read as a number, then convert.
        let k: f64 = get(&c, params, "k")?;
        Self::new(
            k as usize,
            get(&c, params, "renormalize")?,
            get(&c, params, "capacity_factor")?,
            get(&c, params, "aux_loss_coef")?,
            read_groups(Self::KIND, params)?,
        )
    }

    /// Each token's k picked experts, best first (ties: lower expert index).
    // picks: [N, k] out; probs: [N, E]
    fn pick_top_k(&self, picks: &mut [u32], probs: &[f32], experts: usize) {
        let k = self.k;
        if k <= SMALL_K {
            // Insertion into a k-long ranked list: no allocation, O(E k) per row.
            // Scanning experts in order and inserting only past equal values
            // keeps the lower index ahead on ties.
            let mut best = [(0.0f32, 0u32); SMALL_K];
            for (p_row, pick_row) in probs.chunks_exact(experts).zip(picks.chunks_exact_mut(k)) {
                let mut len = 0;
                for (e, &p) in p_row.iter().enumerate() {
                    if len == k && p <= best[k - 1].0 {
                        continue;
                    }
                    let mut at = len.min(k - 1);
                    while at > 0 && best[at - 1].0 < p {
                        best[at] = best[at - 1];
                        at -= 1;
                    }
                    best[at] = (p, e as u32);
                    len = (len + 1).min(k);
                }
                for (dst, &(_, e)) in pick_row.iter_mut().zip(&best[..k]) {
                    *dst = e;
                }
            }
            return;
        }
        let mut row: Vec<u64> = Vec::with_capacity(experts);
        for (p_row, pick_row) in probs.chunks_exact(experts).zip(picks.chunks_exact_mut(k)) {
            row.clear();
            row.extend(p_row.iter().enumerate().map(|(e, &p)| rank_key(p, e as u32)));
            select_best(&mut row, k);
            row[..k].sort_unstable();
            for (dst, &key) in pick_row.iter_mut().zip(&row[..k]) {
                *dst = key_index(key);
            }
        }
    }

    /// Checks `k <= E` (E is only known at route time).
    fn check_k(&self, experts: usize) -> Result<()> {
        if self.k > experts {
            return Err(EngineError::param(
                component(Self::KIND),
                "k",
                self.k,
                format!("a token cannot take more experts than the layer's E = {experts}"),
            ));
        }
        Ok(())
    }
}

impl Router for TokenChoiceRouter {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({
            "kind": Self::KIND,
            "k": self.k,
            "renormalize": self.renormalize,
            "capacity_factor": self.capacity_factor,
            "aux_loss_coef": self.aux_loss_coef,
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
        let (n, e_count, k) = (shape.tokens(), shape.experts, self.k);
        self.check_k(e_count)?;
        if n == 0 {
            return Ok(empty_routing(e_count));
        }
        let s = self.groups.group_size(shape)?;
        let n_groups = n / s;

        let mut probs = vec![0.0f32; n * e_count]; // [N, E]
        softmax_rows(&mut probs, scores, e_count);
        let mut picks = vec![0u32; n * k]; // [N, k] expert ids, best first
        self.pick_top_k(&mut picks, &probs, e_count);

        // Capacity: first choices of the whole group, then second choices, ...
        let mut kept = vec![true; n * k]; // [N, k]
        if let Some(f_c) = self.capacity_factor {
            let cap = expert_capacity(f_c * k as f64, s, e_count);
            let mut load = vec![0usize; e_count];
            for g in 0..n_groups {
                load.fill(0);
                for r in 0..k {
                    for t in g * s..(g + 1) * s {
                        let e = picks[t * k + r] as usize;
                        if load[e] < cap {
                            load[e] += 1;
                        } else {
                            kept[t * k + r] = false;
                        }
                    }
                }
            }
        }

        // Balance loss, per group, from the picks before dropping.
        let mut aux_sum = 0.0f64;
        let mut p_sum = vec![0.0f64; e_count];
        let mut pick_count = vec![0.0f64; e_count];
        for g in 0..n_groups {
            p_sum.fill(0.0);
            pick_count.fill(0.0);
            for t in g * s..(g + 1) * s {
                for (ps, &p) in p_sum.iter_mut().zip(&probs[t * e_count..(t + 1) * e_count]) {
                    *ps += p as f64;
                }
                for &e in &picks[t * k..(t + 1) * k] {
                    pick_count[e as usize] += 1.0;
                }
            }
            // aux_g = sum_e P_e * E * f_e, P_e = p_sum_e / S, f_e = pick_count_e / (S k).
            let aux_g: f64 = p_sum.iter().zip(&pick_count).map(|(ps, pc)| ps * pc).sum::<f64>() * e_count as f64
                / (s as f64 * (s * k) as f64);
            aux_sum += aux_g;
        }
        let aux_loss = (self.aux_loss_coef * aux_sum / n_groups as f64) as f32;

        // Expert-major dispatch by counting sort, tokens ascending per expert.
        let mut offsets = vec![0usize; e_count + 1];
        for (&e, _) in picks.iter().zip(&kept).filter(|(_, &keep)| keep) {
            offsets[e as usize + 1] += 1;
        }
        for e in 0..e_count {
            offsets[e + 1] += offsets[e];
        }
        let slots = offsets[e_count];
        let mut cursor = offsets.clone();
        let mut tokens = vec![0u32; slots];
        let mut gates = vec![0.0f32; slots];
        for t in 0..n {
            let row = &probs[t * e_count..(t + 1) * e_count];
            let pick_row = &picks[t * k..(t + 1) * k];
            let norm = if self.renormalize {
                1.0 / pick_row.iter().map(|&e| row[e as usize]).sum::<f32>()
            } else {
                1.0
            };
            for (r, &e) in pick_row.iter().enumerate() {
                if kept[t * k + r] {
                    let slot = &mut cursor[e as usize];
                    tokens[*slot] = t as u32;
                    gates[*slot] = row[e as usize] * norm;
                    *slot += 1;
                }
            }
        }
        let dispatch = Dispatch {
            experts: e_count,
            tokens_total: n,
            offsets,
            tokens,
            gates,
        };
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: Some(aux_loss),
            stats,
            group_size: s,
        })
    }

    // Reverses route(): picks are recomputed from the cached probs (same rule,
    // same result). dL/dprobs gets (1) the gate path, through the
    // renormalisation if on, and (2) the balance loss path
    // d(coef * mean_g aux_g)/dp[t, e] = coef * E * f_e / (S * n_groups);
    // then back through the softmax.
    fn backward(
        &self,
        routing: &Routing,
        scores: &[f32],
        grad_gates: &[f32],
        grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()> {
        check_backward(Self::KIND, routing, scores, grad_gates, grad_scores)?;
        let d = &routing.dispatch;
        let (n, e_count, k) = (d.tokens_total, d.experts, self.k);
        self.check_k(e_count)?;
        grad_scores.fill(0.0);
        if n == 0 {
            return Ok(());
        }
        let probs = &routing.probs;

        // (1) gate path. gg[t, e] = grad of the (t, e) gate; 0 for dropped picks.
        for e in 0..e_count {
            let r = d.offsets[e]..d.offsets[e + 1];
            for (&t, &gg) in d.tokens[r.clone()].iter().zip(&grad_gates[r]) {
                grad_scores[t as usize * e_count + e] += gg;
            }
        }
        let mut picks = vec![0u32; n * k];
        self.pick_top_k(&mut picks, probs, e_count);
        if self.renormalize {
            // gate_j = p_j / Z, Z = sum_i p_i over the picks:
            // dL/dp_i = (gg_i - sum_j gg_j * gate_j) / Z for picked i.
            for t in 0..n {
                let row = &probs[t * e_count..(t + 1) * e_count];
                let grow = &mut grad_scores[t * e_count..(t + 1) * e_count];
                let pick_row = &picks[t * k..(t + 1) * k];
                let z: f32 = pick_row.iter().map(|&e| row[e as usize]).sum();
                let dot: f32 = pick_row.iter().map(|&e| grow[e as usize] * row[e as usize] / z).sum();
                for &e in pick_row {
                    grow[e as usize] = (grow[e as usize] - dot) / z;
                }
            }
        }

        // (2) balance loss path.
        let scale = grad_aux as f64 * self.aux_loss_coef;
        if scale != 0.0 {
            // A routing rebuilt without its group size (0) can still say it
            // for groups that do not depend on the sample length.
            let s = match (routing.group_size, self.groups) {
                (0, RoutingGroups::Batch) => n,
                (0, RoutingGroups::Tokens(m)) => m,
                (s, _) => s,
            };
            if s == 0 || n % s != 0 {
                return Err(EngineError::shape(
                    format!("{} backward (routing.group_size)", component(Self::KIND)),
                    format!("a divisor of the {n} tokens"),
                    s,
                ));
            }
            let n_groups = n / s;
            let mut f_count = vec![0.0f64; e_count];
            for g in 0..n_groups {
                f_count.fill(0.0);
                for &e in &picks[g * s * k..(g + 1) * s * k] {
                    f_count[e as usize] += 1.0;
                }
                // f_e = count / (S k); d/dp = scale * E * f_e / (S * n_groups)
                let c = scale * e_count as f64 / ((s * k) as f64 * s as f64 * n_groups as f64);
                for t in g * s..(g + 1) * s {
                    for (gs, &fc) in grad_scores[t * e_count..(t + 1) * e_count].iter_mut().zip(&f_count) {
                        *gs += (c * fc) as f32;
                    }
                }
            }
        }
        softmax_rows_backward(grad_scores, probs, e_count);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference picks by a full sort (ties: lower expert first).
    fn sorted_picks(probs: &[f32], experts: usize, k: usize) -> Vec<u32> {
        probs
            .chunks(experts)
            .flat_map(|row| {
                let mut idx: Vec<u32> = (0..experts as u32).collect();
                idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
                idx.truncate(k);
                idx
            })
            .collect()
    }

    // Both pick paths (insertion for k <= SMALL_K, partial sort above) against
    // a full sort, on rows with many ties.
    #[test]
    fn both_pick_paths_match_a_full_sort() {
        let experts = 12;
        let probs: Vec<f32> = (0..experts * 40).map(|i| ((i * 7919 % 13) as f32) / 13.0).collect();
        for k in 1..=experts {
            let router = TokenChoiceRouter::new(k, false, None, 0.0, RoutingGroups::PerSample).unwrap();
            let mut picks = vec![0u32; 40 * k];
            router.pick_top_k(&mut picks, &probs, experts);
            assert_eq!(picks, sorted_picks(&probs, experts, k), "k = {k}");
        }
    }
}
