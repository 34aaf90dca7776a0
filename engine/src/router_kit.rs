//! The router contract as a reusable property-test suite, for shipped and
//! third-party routers alike (burn-style exported conformance tests).
//!
//! On random shapes and scores, every router must:
//! - return a structurally valid dispatch ([`Dispatch::validate`]: indices in
//!   range, no token twice under one expert, gates finite and in [0, 1]) of the
//!   asked shape, with finite probabilities in [0, 1] and a finite aux loss;
//! - report the statistics [`RoutingStats::compute`] gives for that dispatch;
//! - respect its expert capacity per routing group, when it declares one;
//! - be deterministic: the same scores give the same bits, across instances;
//! - have a backward that matches central finite differences of
//!   `L = sum_s w_s gate_s + a * aux` wherever the discrete selection does not change;
//! - on a backend ([`check_router_contract_on`]): route with `route_on` to
//!   the bits of `route` (dispatch, gates, probabilities, aux loss, group
//!   size), and have a `backward_on` that gives the values of `backward`.
//!
//! Use [`check_router_contract`] (or [`check_router_contract_on`]) from a
//! test, or stamp a test out with [`router_conformance!`](crate::router_conformance).

use crate::backend::Backend;
use crate::dtype::DType;
use crate::router::{expert_capacity, RouteShape, Router, Routing};
use crate::routing_stats::RoutingStats;
use crate::transfer::BackendExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

#[doc(hidden)]
pub use serde_json;

/// What to check and how hard.
#[derive(Clone, Debug)]
pub struct ContractConfig {
    /// Random cases; `None` uses proptest's default (honours `PROPTEST_CASES`).
    pub cases: Option<u32>,
    /// The router's capacity factor, when it caps tokens per expert per group
    /// at `expert_capacity(f, group_size, E)` (expert choice).
    pub capacity_factor: Option<f64>,
    /// Largest sample count drawn.
    pub max_samples: usize,
    /// Largest tokens-per-sample drawn.
    pub max_tokens_per_sample: usize,
    /// Smallest expert count drawn (e.g. `k` for a top-k router).
    pub min_experts: usize,
    /// Largest expert count drawn.
    pub max_experts: usize,
    /// Score coordinates checked by finite differences per case (0 = skip).
    pub fd_coords: usize,
}

impl Default for ContractConfig {
    fn default() -> Self {
        Self {
            cases: None,
            capacity_factor: None,
            max_samples: 3,
            max_tokens_per_sample: 12,
            min_experts: 1,
            max_experts: 6,
            fd_coords: 8,
        }
    }
}

impl ContractConfig {
    /// The default limits with a capacity check for factor `f`.
    pub fn with_capacity(f: f64) -> Self {
        Self {
            capacity_factor: Some(f),
            ..Self::default()
        }
    }
}

/// Runs the contract on routers made by `make`; the error describes the first
/// violation and the (shrunk) case that shows it.
pub fn check_router_contract(make: impl Fn() -> Box<dyn Router>, config: &ContractConfig) -> Result<(), String> {
    run_contract(&make, config, None)
}

/// [`check_router_contract`], and on every case the router's backend path on
/// `backend` against its host path: `route_on` must give the bits of `route`,
/// `backward_on` the values of `backward` (to f32 rounding: the backend may
/// sum in another order).
pub fn check_router_contract_on(
    make: impl Fn() -> Box<dyn Router>,
    config: &ContractConfig,
    backend: &dyn Backend,
) -> Result<(), String> {
    run_contract(&make, config, Some(backend))
}

fn run_contract(
    make: &dyn Fn() -> Box<dyn Router>,
    config: &ContractConfig,
    backend: Option<&dyn Backend>,
) -> Result<(), String> {
    let mut proptest_config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(cases) = config.cases {
        proptest_config.cases = cases;
    }
    let mut runner = TestRunner::new(proptest_config);
    let router = make();
    let experts = config.min_experts.max(1)..=config.max_experts.max(config.min_experts).max(1);
    let strategy =
        (1..=config.max_samples, 1..=config.max_tokens_per_sample, experts).prop_flat_map(|(samples, tps, experts)| {
            let n = samples * tps * experts;
            (
                Just(RouteShape {
                    samples,
                    tokens_per_sample: tps,
                    experts,
                }),
                proptest::collection::vec(-3.0f32..3.0, n),
                proptest::collection::vec(-1.0f32..1.0, n),
                -1.0f32..1.0,
                any::<u64>(),
            )
        });
    runner
        .run(&strategy, |(shape, scores, weights, aux_weight, pick)| {
            let case = Case {
                shape,
                scores: &scores,
                weights: &weights,
                aux_weight,
                pick,
            };
            check_case(&*router, make, config, backend, &case)
        })
        .map_err(|e| format!("router '{}' breaks the router contract: {e}", router.kind()))
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// One drawn case: a shape, its scores, gate-gradient weights, the aux
/// weight, and a seed picking the coordinates to probe.
struct Case<'a> {
    shape: RouteShape,
    scores: &'a [f32],
    weights: &'a [f32],
    aux_weight: f32,
    pick: u64,
}

fn check_case(
    router: &dyn Router,
    make: &dyn Fn() -> Box<dyn Router>,
    config: &ContractConfig,
    backend: Option<&dyn Backend>,
    case: &Case<'_>,
) -> Result<(), TestCaseError> {
    let &Case {
        shape,
        scores,
        weights,
        aux_weight,
        pick,
    } = case;
    let routing = match router.route(scores, shape) {
        Ok(r) => r,
        // A shape the router's groups cannot split is a clean refusal, on
        // the backend too.
        Err(crate::EngineError::BadParam { .. }) => {
            if let Some(be) = backend {
                let t = be
                    .upload_f32(&[shape.tokens(), shape.experts], scores, DType::F32)
                    .map_err(|e| fail(e.to_string()))?;
                if router.route_on(be, t.view(), shape).is_ok() {
                    return Err(fail(format!(
                        "route refused {shape:?} but route_on on backend '{}' routed it",
                        be.name()
                    )));
                }
            }
            return Ok(());
        }
        Err(e) => return Err(fail(format!("route failed on {shape:?}: {e}"))),
    };
    check_structure(&routing, shape, config)?;

    // Determinism, within one instance and across instances.
    let again = router.route(scores, shape).map_err(|e| fail(e.to_string()))?;
    let fresh = make().route(scores, shape).map_err(|e| fail(e.to_string()))?;
    for (other, what) in [(&again, "a second call"), (&fresh, "a fresh instance")] {
        if !same_bits(&routing, other) {
            return Err(fail(format!("{what} routed the same scores differently")));
        }
    }

    if let Some(be) = backend {
        check_on_backend(router, be, case, &routing)?;
    }

    if config.fd_coords > 0 {
        check_backward(
            router,
            shape,
            scores,
            &routing,
            weights,
            aux_weight,
            pick,
            config.fd_coords,
        )?;
    }
    Ok(())
}

fn check_structure(routing: &Routing, shape: RouteShape, config: &ContractConfig) -> Result<(), TestCaseError> {
    let d = &routing.dispatch;
    if d.experts != shape.experts || d.tokens_total != shape.tokens() {
        return Err(fail(format!(
            "dispatch is {} experts x {} tokens for shape {shape:?}",
            d.experts, d.tokens_total
        )));
    }
    d.validate("contract").map_err(|e| fail(e.to_string()))?;
    if routing.probs.len() != shape.tokens() * shape.experts {
        return Err(fail(format!(
            "{} probabilities for {} x {}",
            routing.probs.len(),
            shape.tokens(),
            shape.experts
        )));
    }
    if let Some(i) = routing
        .probs
        .iter()
        .position(|p| !p.is_finite() || !(0.0..=1.0).contains(p))
    {
        return Err(fail(format!("probability {i} is {}", routing.probs[i])));
    }
    if let Some(a) = routing.aux_loss.filter(|a| !a.is_finite()) {
        return Err(fail(format!("aux loss is {a}")));
    }
    if routing.stats != RoutingStats::compute(d, &routing.probs) {
        return Err(fail("reported statistics differ from RoutingStats::compute".into()));
    }
    if let Some(f) = config.capacity_factor {
        let g = routing.group_size;
        if g == 0 || shape.tokens() / g * g != shape.tokens() {
            return Err(fail(format!(
                "group size {g} does not divide {} tokens",
                shape.tokens()
            )));
        }
        let cap = expert_capacity(f, g, shape.experts);
        for e in 0..d.experts {
            let (toks, _) = d.expert(e);
            let mut per_group = vec![0usize; shape.tokens() / g];
            for &t in toks {
                per_group[t as usize / g] += 1;
            }
            if let Some((grp, n)) = per_group.iter().enumerate().find(|(_, &n)| n > cap) {
                return Err(fail(format!(
                    "expert {e} took {n} tokens of group {grp}, capacity {cap}"
                )));
            }
        }
    }
    Ok(())
}

/// `route_on` against `route` (bit for bit) and `backward_on` against
/// `backward` (to rounding) on `backend`.
fn check_on_backend(
    router: &dyn Router,
    be: &dyn Backend,
    case: &Case<'_>,
    routing: &Routing,
) -> Result<(), TestCaseError> {
    let shape = case.shape;
    let on = |e: crate::EngineError| fail(format!("on backend '{}' with {shape:?}: {e}", be.name()));
    let scores = be
        .upload_f32(&[shape.tokens(), shape.experts], case.scores, DType::F32)
        .map_err(on)?;
    let device = router.route_on(be, scores.view(), shape).map_err(on)?;
    let back = device.to_host(be).map_err(on)?;
    if !same_bits(routing, &back) || back.group_size != routing.group_size {
        return Err(fail(format!(
            "route_on on backend '{}' differs from route on {shape:?}:\n  route:    {:?}\n  route_on: {:?}",
            be.name(),
            routing.dispatch,
            back.dispatch
        )));
    }
    if back.stats != routing.stats {
        return Err(fail(format!(
            "route_on on backend '{}' reports other statistics than route",
            be.name()
        )));
    }

    let slots = routing.dispatch.slots();
    if slots > case.weights.len() {
        return Ok(()); // more slots than weights drawn; as in check_backward
    }
    let grad_gates = &case.weights[..slots];
    let mut want = vec![0.0f32; case.scores.len()];
    router
        .backward(routing, case.scores, grad_gates, case.aux_weight, &mut want)
        .map_err(|e| fail(format!("backward failed: {e}")))?;
    let gg = be.upload_f32(&[slots], grad_gates, DType::F32).map_err(on)?;
    let mut grad = be.zeros(&[shape.tokens(), shape.experts], DType::F32).map_err(on)?;
    router
        .backward_on(be, &device, scores.view(), gg.view(), case.aux_weight, grad.view_mut())
        .map_err(on)?;
    let got = be.read_f32(grad.view()).map_err(on)?;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let close = (g - w).abs() <= 1e-6 + 1e-4 * w.abs(); // false for NaN too
        if !close {
            return Err(fail(format!(
                "d loss / d score[{i}]: backward_on on backend '{}' gives {g}, backward {w} (shape {shape:?})",
                be.name()
            )));
        }
    }
    Ok(())
}

fn same_bits(a: &Routing, b: &Routing) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    a.dispatch.offsets == b.dispatch.offsets
        && a.dispatch.tokens == b.dispatch.tokens
        && bits(&a.dispatch.gates) == bits(&b.dispatch.gates)
        && bits(&a.probs) == bits(&b.probs)
        && a.aux_loss.map(f32::to_bits) == b.aux_loss.map(f32::to_bits)
}

/// `L = sum_s w_s gate_s + a * aux`, in f64.
fn loss(r: &Routing, weights: &[f32], aux_weight: f32) -> f64 {
    let gates: f64 = r
        .dispatch
        .gates
        .iter()
        .zip(weights)
        .map(|(&g, &w)| g as f64 * w as f64)
        .sum();
    gates + aux_weight as f64 * r.aux_loss.unwrap_or(0.0) as f64
}

#[allow(clippy::too_many_arguments)]
fn check_backward(
    router: &dyn Router,
    shape: RouteShape,
    scores: &[f32],
    routing: &Routing,
    weights: &[f32],
    aux_weight: f32,
    pick: u64,
    coords: usize,
) -> Result<(), TestCaseError> {
    let grad_gates = &weights[..routing.dispatch.slots().min(weights.len())];
    if grad_gates.len() != routing.dispatch.slots() {
        return Ok(()); // more slots than weights drawn (only with tiny shapes); nothing to check
    }
    let mut grad = vec![f32::NAN; scores.len()];
    router
        .backward(routing, scores, grad_gates, aux_weight, &mut grad)
        .map_err(|e| fail(format!("backward failed: {e}")))?;
    if let Some(i) = grad.iter().position(|g| !g.is_finite()) {
        return Err(fail(format!("score gradient {i} is {}", grad[i])));
    }
    let h = 1e-2f32;
    let mut state = pick | 1;
    for _ in 0..coords.min(scores.len()) {
        // xorshift: which coordinates to probe, reproducible from the case.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let i = (state % scores.len() as u64) as usize;
        let (Some(fd), Some(fd_fine)) = (
            central_difference(router, shape, scores, routing, grad_gates, aux_weight, i, h)?,
            central_difference(router, shape, scores, routing, grad_gates, aux_weight, i, h / 4.0)?,
        ) else {
            continue; // the discrete choice moved; not differentiable here
        };
        // A choice the dispatch does not show can still jump (token choice's
        // balance loss counts picks made before capacity drops them): a smooth
        // loss gives the same difference at both step sizes, a jump does not.
        if (fd - fd_fine).abs() > 2e-3 + 2e-2 * fd.abs().max(fd_fine.abs()) {
            continue;
        }
        let an = grad[i] as f64;
        if (fd - an).abs() > 2e-3 + 2e-2 * fd.abs().max(an.abs()) {
            return Err(fail(format!(
                "d loss / d score[{i}]: backward gives {an}, finite differences {fd} (shape {shape:?})"
            )));
        }
    }
    Ok(())
}

/// `(L(s + h e_i) - L(s - h e_i)) / 2h`, or `None` when either side routes
/// to a different dispatch than `routing`.
#[allow(clippy::too_many_arguments)]
fn central_difference(
    router: &dyn Router,
    shape: RouteShape,
    scores: &[f32],
    routing: &Routing,
    grad_gates: &[f32],
    aux_weight: f32,
    i: usize,
    h: f32,
) -> Result<Option<f64>, TestCaseError> {
    let mut plus = scores.to_vec();
    plus[i] += h;
    let mut minus = scores.to_vec();
    minus[i] -= h;
    let rp = router.route(&plus, shape).map_err(|e| fail(e.to_string()))?;
    let rm = router.route(&minus, shape).map_err(|e| fail(e.to_string()))?;
    let same_selection =
        |r: &Routing| r.dispatch.offsets == routing.dispatch.offsets && r.dispatch.tokens == routing.dispatch.tokens;
    if !same_selection(&rp) || !same_selection(&rm) {
        return Ok(None);
    }
    Ok(Some(
        (loss(&rp, grad_gates, aux_weight) - loss(&rm, grad_gates, aux_weight)) / (2.0 * h as f64),
    ))
}

/// Stamps out a `#[test]` running [`check_router_contract`] on a router built
/// from a JSON spec by a registry expression; with a trailing `on backend`,
/// [`check_router_contract_on`] on that backend.
///
/// ```ignore
/// ecdit_engine::router_conformance!(expert_choice_contract, registry(), {"kind": "expert-choice"},
///     ecdit_engine::router_kit::ContractConfig::with_capacity(2.0));
/// ecdit_engine::router_conformance!(expert_choice_on_cpu, registry(), {"kind": "expert-choice"},
///     ecdit_engine::router_kit::ContractConfig::with_capacity(2.0), on CpuBackend::new(1).unwrap());
/// ```
#[macro_export]
macro_rules! router_conformance {
    ($name:ident, $registry:expr, $spec:tt) => {
        $crate::router_conformance!(
            $name,
            $registry,
            $spec,
            $crate::router_kit::ContractConfig::default()
        );
    };
    ($name:ident, $registry:expr, $spec:tt, $config:expr) => {
        #[test]
        fn $name() {
            let registry = $registry;
            let spec = $crate::router_kit::serde_json::json!($spec);
            let make = || {
                registry
                    .router(&spec)
                    .unwrap_or_else(|e| panic!("cannot build {spec}: {e}"))
            };
            if let Err(e) = $crate::router_kit::check_router_contract(make, &$config) {
                panic!("{e}");
            }
        }
    };
    ($name:ident, $registry:expr, $spec:tt, $config:expr, on $backend:expr) => {
        #[test]
        fn $name() {
            let registry = $registry;
            let backend = $backend;
            let spec = $crate::router_kit::serde_json::json!($spec);
            let make = || {
                registry
                    .router(&spec)
                    .unwrap_or_else(|e| panic!("cannot build {spec}: {e}"))
            };
            if let Err(e) = $crate::router_kit::check_router_contract_on(make, &$config, &backend) {
                panic!("{e}");
            }
        }
    };
}
