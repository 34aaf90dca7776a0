//! Pieces every router shares: input checks, the row softmax with its
//! backward, the ranking order with its tie rule, and parameter reading.

use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::spec::get;
use ecdit_engine::{Dispatch, EngineError, Result, RouteShape, Routing, RoutingGroups, RoutingStats};
use serde_json::{Map, Value};
use std::cmp::Ordering;

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
    if shape.tokens() > u32::MAX as usize {
        return Err(EngineError::shape(
            format!("{op} (tokens)"),
            format!("at most {} tokens", u32::MAX),
            shape.tokens(),
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
    let stats = RoutingStats::compute(&dispatch, &[]);
    Routing {
        dispatch,
        probs: Vec::new(),
        aux_loss: None,
        stats,
        group_size: 0,
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

/// Ranking order of `(value, index)` candidates: larger value first, ties to
/// the lower index. A total order, so selection is deterministic.
pub(crate) fn by_rank(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Moves the `take` best candidates (by [`by_rank`]) to the front, unordered;
/// `O(len)` instead of a full sort.
pub(crate) fn select_best(candidates: &mut [(f32, u32)], take: usize) {
    if take > 0 && take < candidates.len() {
        candidates.select_nth_unstable_by(take - 1, by_rank);
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
