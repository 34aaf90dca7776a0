//! Pieces every router shares: input checks (host and device), empty
//! routings, the group check of a config, and parameter reading. The row
//! softmax and the ranking order live in `ecdit_engine::routing_math`, which
//! the backends share so that device and host routing agree to the bit.

use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::spec::get;
use ecdit_engine::{
    Backend, BackendExt, DType, DeviceRouting, Dispatch, EngineError, Result, RouteShape, Routing, RoutingGroups,
    RoutingStats, TensorRef,
};
use serde_json::{Map, Value};

/// `router 'kind'`, the component name used in every error.
pub(crate) fn component(kind: &str) -> String {
    format!("router '{kind}'")
}

/// Checks the scores of one `route` call: at least one expert, token indices
/// that fit the dispatch's `u32`, `[tokens, experts]` elements, all finite.
pub(crate) fn check_scores(kind: &str, scores: &[f32], shape: RouteShape) -> Result<()> {
    let elements = check_route_shape(kind, shape)?;
    check_len(&component(kind), "scores [tokens, experts]", scores.len(), elements)?;
    check_finite("router scores", scores)
}

/// The checks of a route shape both paths share: at least one expert, and
/// token indices that fit the dispatch's `u32`. Returns the score count.
fn check_route_shape(kind: &str, shape: RouteShape) -> Result<usize> {
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
    Ok(elements)
}

/// Checks the scores of one `route_on` call: as [`check_scores`], but on a
/// view of f32 scores, without reading them (finiteness would cost a download;
/// non-finite scores make non-finite outputs, which the caller's output checks see).
pub(crate) fn check_scores_on(kind: &str, scores: TensorRef<'_>, shape: RouteShape) -> Result<()> {
    let elements = check_route_shape(kind, shape)?;
    let op = component(kind);
    scores.expect_dtype(&op, "scores", DType::F32)?;
    scores.expect_len(&op, "scores [tokens, experts]", elements)
}

/// Checks the views handed to `backward_on` against the routing they belong to.
pub(crate) fn check_backward_on(
    kind: &str,
    routing: &DeviceRouting,
    scores: TensorRef<'_>,
    grad_gates: TensorRef<'_>,
    grad_scores: TensorRef<'_>,
) -> Result<()> {
    let op = format!("{} backward", component(kind));
    let n = routing.tokens_total * routing.experts;
    scores.expect_len(&op, "scores [tokens, experts]", n)?;
    grad_scores.expect_len(&op, "grad_scores [tokens, experts]", n)?;
    grad_scores.expect_dtype(&op, "grad_scores", DType::F32)?;
    routing
        .probs
        .view()
        .expect_len(&op, "routing.probs [tokens, experts]", n)?;
    check_len(&op, "dispatch offsets", routing.offsets.len(), routing.experts + 1)?;
    grad_gates.expect_dtype(&op, "grad_gates", DType::F32)?;
    grad_gates.expect_len(&op, "grad_gates [slots]", routing.slots())
}

/// The device routing of an empty batch, made without a transfer.
pub(crate) fn empty_device_routing(backend: &dyn Backend, experts: usize) -> Result<DeviceRouting> {
    Ok(DeviceRouting {
        experts,
        tokens_total: 0,
        offsets: vec![0; experts + 1],
        tokens: backend.zeros(&[0], DType::U32)?,
        gates: backend.zeros(&[0], DType::F32)?,
        probs: backend.zeros(&[0, experts], DType::F32)?,
        aux_loss: None,
        group_size: 0,
        host: None,
    })
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
    use ecdit_engine::routing_math::{softmax_rows, softmax_rows_backward};

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
