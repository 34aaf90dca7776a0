//! Pieces every router shares: input checks, the row softmax with its
//! backward, the ranking order with its tie rule, and parameter reading.

use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::spec::get;
use ecdit_engine::{Dispatch, EngineError, Result, RouteShape, Routing, RoutingGroups, RoutingStats};
use serde_json::{Map, Value};

/// `router 'kind'`, the component name used in every error.
pub(crate) fn component(kind: &str) -> String {
    format!("router '{kind}'")
}

/// Checks the scores of one `route` call: at least one expert, token indices
/// that fit the dispatch's `u32`, `[tokens, experts]` elements, all finite.
pub(crate) fn check_scores(kind: &str, scores: &[f32], shape: RouteShape) -> Result<()> {
    let op = component(kind);
    if shape.experts == 0 {
        return Err(EngineError::shape(
            format!("{op} (experts)"),
            "at least 1 expert",
            "0 experts",
        ));
    }
    // Token rows and flat score indices are u32 in the dispatch and the ranking keys.
    let elements = shape.tokens().saturating_mul(shape.experts);
    if elements > u32::MAX as usize {
        return Err(EngineError::shape(
            format!("{op} (scores)"),
            format!("at most {} scores", u32::MAX),
            format!("{} tokens x {} experts", shape.tokens(), shape.experts),
        ));
    }
    check_len(
        &op,
        "scores [tokens, experts]",
        scores.len(),
        shape.tokens() * shape.experts,
    )?;
    check_finite("router scores", scores)
}

/// Checks the buffers handed to `backward` against the routing they belong to.
pub(crate) fn check_backward(
    kind: &str,
    routing: &Routing,
    scores: &[f32],
    grad_gates: &[f32],
    grad_scores: &[f32],
) -> Result<()> {
    let op = format!("{} backward", component(kind));
    let d = &routing.dispatch;
    let n = d.tokens_total * d.experts;
    check_len(&op, "scores [tokens, experts]", scores.len(), n)?;
    check_len(&op, "grad_scores [tokens, experts]", grad_scores.len(), n)?;
    check_len(&op, "routing.probs [tokens, experts]", routing.probs.len(), n)?;
    check_len(&op, "grad_gates [slots]", grad_gates.len(), d.slots())?;
    check_len(&op, "dispatch offsets", d.offsets.len(), d.experts + 1)
}

/// The routing of an empty batch: no slots, every expert idle.
pub(crate) fn empty_routing(experts: usize) -> Routing {
    let dispatch = Dispatch {
        experts,
        tokens_total: 0,
        offsets: vec![0; experts + 1],
        ..Default::default()
    };
    routing_without_aux(dispatch, Vec::new(), 0)
}

/// An empty dispatch with room for `slots` slots, its offsets holding only
/// the leading 0: a router fills it expert by expert, pushing each expert's
/// end offset.
pub(crate) fn dispatch_with_capacity(experts: usize, tokens_total: usize, slots: usize) -> Dispatch {
    let mut dispatch = Dispatch {
        experts,
        tokens_total,
        offsets: Vec::with_capacity(experts + 1),
        tokens: Vec::with_capacity(slots),
        gates: Vec::with_capacity(slots),
    };
    dispatch.offsets.push(0);
    dispatch
}

/// The routing of a filled `dispatch` with its statistics, for routers
/// without an auxiliary loss. probs: [tokens, experts].
pub(crate) fn routing_without_aux(dispatch: Dispatch, probs: Vec<f32>, group_size: usize) -> Routing {
    let stats = RoutingStats::compute(&dispatch, &probs);
    Routing {
        dispatch,
        probs,
        aux_loss: None,
        stats,
        group_size,
    }
}

/// Row softmax in f32, max-subtracted.
// probs: [N, E] out; scores: [N, E]
pub(crate) fn softmax_rows(probs: &mut [f32], scores: &[f32], experts: usize) {
    for (p_row, x_row) in probs.chunks_exact_mut(experts).zip(scores.chunks_exact(experts)) {
        let max = x_row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (p, &x) in p_row.iter_mut().zip(x_row) {
            *p = (x - max).exp();
            sum += *p;
        }
        let inv = 1.0 / sum;
        p_row.iter_mut().for_each(|p| *p *= inv);
    }
}

/// Backward of [`softmax_rows`], in place: `grad` holds dL/dprobs on entry and
/// dL/dscores on exit, `dx_j = p_j * (dp_j - sum_k p_k dp_k)`.
// grad: [N, E] in/out; probs: [N, E]
pub(crate) fn softmax_rows_backward(grad: &mut [f32], probs: &[f32], experts: usize) {
    for (g_row, p_row) in grad.chunks_exact_mut(experts).zip(probs.chunks_exact(experts)) {
        let dot: f32 = g_row.iter().zip(p_row).map(|(g, p)| g * p).sum();
        for (g, &p) in g_row.iter_mut().zip(p_row) {
            *g = p * (*g - dot);
        }
    }
}

/// Packs a candidate into one integer whose ascending order is the ranking
/// order: larger value first, ties to the lower index. Integer keys make the
/// selection a plain `u64` partial sort, several times faster than comparing
/// `(f32, u32)` pairs. `value` must be >= 0 (a probability or a sigmoid): the
/// bit patterns of non-negative floats order like the floats (`+ 0.0` turns a
/// stray `-0.0` into `+0.0`).
pub(crate) fn rank_key(value: f32, index: u32) -> u64 {
    ((!(value + 0.0).to_bits() as u64) << 32) | index as u64
}

/// The index packed by [`rank_key`].
pub(crate) fn key_index(key: u64) -> u32 {
    key as u32
}

/// The value packed by [`rank_key`].
pub(crate) fn key_value(key: u64) -> f32 {
    f32::from_bits(!((key >> 32) as u32))
}

/// Moves the `take` best keys (smallest, see [`rank_key`]) to the front,
/// unordered; `O(len)` instead of a full sort.
pub(crate) fn select_best(keys: &mut [u64], take: usize) {
    if take > 0 && take < keys.len() {
        keys.select_nth_unstable(take - 1);
    }
}

/// Reads `groups` and refuses `{"tokens": 0}` at build time.
pub(crate) fn read_groups(kind: &str, params: &Map<String, Value>) -> Result<RoutingGroups> {
    let groups: RoutingGroups = get(&component(kind), params, "groups")?;
    if groups == RoutingGroups::Tokens(0) {
        return Err(EngineError::param(
            component(kind),
            "groups",
            r#"{"tokens":0}"#,
            "a routing group needs at least one token",
        ));
    }
    Ok(groups)
}

/// Reads a number that must be finite and strictly positive.
pub(crate) fn read_positive(kind: &str, params: &Map<String, Value>, name: &str) -> Result<f64> {
    let v: f64 = get(&component(kind), params, name)?;
    check_positive(kind, name, v)?;
    Ok(v)
}

/// Errors unless `v` is finite and > 0.
pub(crate) fn check_positive(kind: &str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(EngineError::param(
            component(kind),
            name,
            v,
            "must be a finite number > 0",
        ))
    }
}

/// The spec value of a groups setting.
pub(crate) fn groups_json(groups: RoutingGroups) -> Value {
    serde_json::to_value(groups).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_keys_order_by_value_then_index() {
        let mut keys = [
            rank_key(0.25, 3),
            rank_key(1.0, 7),
            rank_key(0.0, 0),
            rank_key(0.25, 1),
            rank_key(-0.0, 2),
            rank_key(1e-30, 9),
        ];
        keys.sort_unstable();
        let order: Vec<(f32, u32)> = keys.iter().map(|&k| (key_value(k), key_index(k))).collect();
        assert_eq!(
            order,
            vec![(1.0, 7), (0.25, 1), (0.25, 3), (1e-30, 9), (0.0, 0), (0.0, 2)]
        );
    }

    #[test]
    fn softmax_backward_matches_the_jacobian() {
        let scores = [0.2f32, -1.0, 0.7];
        let mut p = [0.0f32; 3];
        softmax_rows(&mut p, &scores, 3);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let dp = [0.3f32, -0.5, 1.1];
        let mut g = dp;
        softmax_rows_backward(&mut g, &p, 3);
        for j in 0..3 {
            // dx_j = sum_i dp_i * p_i * (delta_ij - p_j)
            let want: f32 = (0..3).map(|i| dp[i] * p[i] * (f32::from(i == j) - p[j])).sum();
            assert!((g[j] - want).abs() < 1e-6, "{j}: {} vs {want}", g[j]);
        }
    }
}
