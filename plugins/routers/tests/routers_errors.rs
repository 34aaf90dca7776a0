//! Registry round trips and bad input: every error names the field and value.

use ecdit_engine::{Registry, RouteShape, Router};
use serde_json::{json, Value};

fn registry() -> Registry {
    let mut registry = Registry::new();
    ecdit_routers::register(&mut registry).unwrap();
    registry
}

fn build_err(spec: Value) -> String {
    match registry().router(&spec) {
        Ok(r) => panic!("spec {spec} built router {}", r.kind()),
        Err(e) => e.to_string(),
    }
}

fn route_err(router: &dyn Router, scores: &[f32], shape: RouteShape) -> String {
    match router.route(scores, shape) {
        Ok(_) => panic!("{} routed bad input", router.kind()),
        Err(e) => e.to_string(),
    }
}

fn shape(samples: usize, tokens_per_sample: usize, experts: usize) -> RouteShape {
    RouteShape {
        samples,
        tokens_per_sample,
        experts,
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn specs_round_trip_through_the_registry() {
    let reg = registry();
    for spec in [
        json!("expert-choice"),
        json!({"kind": "expert-choice", "capacity_factor": 1.5, "groups": {"tokens": 512}}),
        json!({"kind": "token-choice", "k": 1, "renormalize": true, "capacity_factor": 1.25}),
        json!("dense"),
        json!({"kind": "expert-race", "k": 3.0, "score_fn": "softmax", "groups": "batch"}),
    ] {
        let router = reg.router(&spec).unwrap();
        let again = reg.router(&router.spec()).unwrap();
        assert_eq!(router.spec(), again.spec());
    }
    let ec = reg.router(&json!("expert-choice")).unwrap().spec();
    assert_eq!(
        ec,
        json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"})
    );
    let kinds: Vec<String> = reg.list().into_iter().map(|i| i.kind).collect();
    for k in ["dense", "expert-choice", "expert-race", "token-choice"] {
        assert!(kinds.iter().any(|x| x == k), "{k} not registered: {kinds:?}");
    }
}

#[test]
fn unknown_kind_lists_the_known_ones() {
    assert_names(
        &build_err(json!({"kind": "nope"})),
        &["'nope'", "expert-choice", "token-choice"],
    );
}

#[test]
fn missing_kind_is_refused() {
    assert_names(&build_err(json!({"capacity_factor": 2.0})), &["missing \"kind\""]);
}

#[test]
fn unknown_parameter_is_named() {
    let e = build_err(json!({"kind": "expert-choice", "capcity_factor": 2.0}));
    assert_names(&e, &["'capcity_factor'", "unknown", "capacity_factor"]);
}

#[test]
fn mistyped_parameter_is_named() {
    let e = build_err(json!({"kind": "token-choice", "k": "two"}));
    assert_names(&e, &["'k'", "\"two\""]);
    let e = build_err(json!({"kind": "expert-race", "score_fn": "relu"}));
    assert_names(&e, &["'score_fn'", "\"relu\"", "softmax"]);
}

#[test]
fn capacity_factor_must_be_positive() {
    let e = build_err(json!({"kind": "expert-choice", "capacity_factor": 0.0}));
    assert_names(&e, &["'capacity_factor'", "= 0", "> 0"]);
    let e = build_err(json!({"kind": "expert-choice", "capacity_factor": -1.5}));
    assert_names(&e, &["'capacity_factor'", "-1.5"]);
    let e = build_err(json!({"kind": "token-choice", "capacity_factor": -2.0}));
    assert_names(&e, &["'capacity_factor'", "-2"]);
    let e = build_err(json!({"kind": "expert-race", "k": 0.0}));
    assert_names(&e, &["'k'", "= 0"]);
}

#[test]
fn k_zero_and_k_above_e_are_refused() {
    let e = build_err(json!({"kind": "token-choice", "k": 0}));
    assert_names(&e, &["token-choice", "'k'", "= 0"]);
    let router = registry().router(&json!({"kind": "token-choice", "k": 3})).unwrap();
    let e = route_err(router.as_ref(), &[0.0; 8], shape(1, 4, 2));
    assert_names(&e, &["'k'", "= 3", "E = 2"]);
}

#[test]
fn group_that_is_not_whole_samples_is_refused() {
    let router = registry()
        .router(&json!({"kind": "expert-choice", "groups": {"tokens": 300}}))
        .unwrap();
    let e = route_err(router.as_ref(), &vec![0.0; 512 * 2], shape(2, 256, 2));
    assert_names(&e, &["groups.tokens", "300", "256"]);
    let e = build_err(json!({"kind": "token-choice", "groups": {"tokens": 0}}));
    assert_names(&e, &["'groups'", "tokens"]);
}

#[test]
fn non_finite_scores_are_refused_by_every_router() {
    let reg = registry();
    for (kind, experts) in [
        ("expert-choice", 2),
        ("token-choice", 2),
        ("expert-race", 2),
        ("dense", 1),
    ] {
        let router = reg.router(&json!(kind)).unwrap();
        let mut scores = vec![0.5f32; 4 * experts];
        scores[3] = f32::NAN;
        assert_names(
            &route_err(router.as_ref(), &scores, shape(1, 4, experts)),
            &["router scores", "index 3", "NaN"],
        );
        scores[3] = 0.0;
        scores[1] = f32::NEG_INFINITY;
        assert_names(
            &route_err(router.as_ref(), &scores, shape(1, 4, experts)),
            &["index 1", "-inf"],
        );
    }
}

#[test]
fn wrong_lengths_are_refused_by_every_router() {
    let reg = registry();
    for (kind, experts) in [
        ("expert-choice", 2),
        ("token-choice", 2),
        ("expert-race", 2),
        ("dense", 1),
    ] {
        let router = reg.router(&json!(kind)).unwrap();
        let e = route_err(router.as_ref(), &vec![0.0; 4 * experts - 1], shape(1, 4, experts));
        assert_names(
            &e,
            &[
                kind,
                "scores",
                &format!("{} elements", 4 * experts),
                &format!("{} elements", 4 * experts - 1),
            ],
        );
        let scores = vec![0.25f32; 4 * experts];
        let r = router.route(&scores, shape(1, 4, experts)).unwrap();
        let mut grad = vec![0.0f32; 4 * experts];
        let bad_gates = vec![0.0f32; r.dispatch.slots() + 1];
        let e = router
            .backward(&r, &scores, &bad_gates, 0.0, &mut grad)
            .unwrap_err()
            .to_string();
        assert_names(
            &e,
            &[kind, "grad_gates", &format!("{} elements", r.dispatch.slots() + 1)],
        );
        let mut short = vec![0.0f32; 3];
        let gates = vec![0.0f32; r.dispatch.slots()];
        let e = router
            .backward(&r, &scores, &gates, 0.0, &mut short)
            .unwrap_err()
            .to_string();
        assert_names(&e, &["grad_scores", "3 elements"]);
    }
}

#[test]
fn dense_router_needs_one_expert() {
    let router = registry().router(&json!("dense")).unwrap();
    let e = route_err(router.as_ref(), &[0.0; 8], shape(1, 4, 2));
    assert_names(&e, &["dense", "1 expert", "2 experts"]);
}

#[test]
fn zero_experts_is_refused() {
    let router = registry().router(&json!("expert-choice")).unwrap();
    assert_names(
        &route_err(router.as_ref(), &[], shape(1, 4, 0)),
        &["experts", "0 experts"],
    );
}

#[test]
fn empty_batch_routes_to_nothing() {
    let router = registry().router(&json!("expert-choice")).unwrap();
    let r = router.route(&[], shape(0, 4, 3)).unwrap();
    assert_eq!(r.dispatch.offsets, vec![0; 4]);
    assert_eq!(r.dispatch.slots(), 0);
}

#[test]
fn only_groups_wider_than_a_sample_couple_samples() {
    let reg = registry();
    for (spec, couples) in [
        (json!("expert-choice"), false),
        (json!({"kind": "expert-choice", "groups": "batch"}), true),
        (json!({"kind": "expert-choice", "groups": {"tokens": 512}}), true),
        (json!({"kind": "token-choice", "groups": "per_sample"}), false),
        (json!({"kind": "token-choice", "groups": "batch"}), true),
        (json!("expert-race"), false),
        (json!({"kind": "expert-race", "groups": {"tokens": 64}}), true),
        (json!("dense"), false),
    ] {
        assert_eq!(reg.router(&spec).unwrap().couples_samples(), couples, "{spec}");
    }
}

#[test]
fn token_groups_are_checked_against_the_sample_length_at_config_time() {
    let reg = registry();
    for kind in ["expert-choice", "token-choice", "expert-race"] {
        let router = reg.router(&json!({"kind": kind, "groups": {"tokens": 300}})).unwrap();
        let e = router.check_tokens_per_sample(256).unwrap_err().to_string();
        assert_names(&e, &["groups.tokens", "300", "256"]);
        router.check_tokens_per_sample(100).unwrap();
        assert!(router.check_tokens_per_sample(0).is_err(), "{kind}");
        for groups in [json!("per_sample"), json!("batch")] {
            let router = reg.router(&json!({"kind": kind, "groups": groups})).unwrap();
            router.check_tokens_per_sample(7).unwrap();
        }
    }
    reg.router(&json!("dense")).unwrap().check_tokens_per_sample(7).unwrap();
}

#[test]
fn routing_on_a_backend_refuses_bad_input_too() {
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_engine::{BackendExt, DType};
    let be = CpuBackend::new(1).unwrap();
    let reg = registry();
    let route_on_err = |router: &dyn Router, scores: &[f32], shape: RouteShape| {
        let t = be.upload_f32(&[scores.len()], scores, DType::F32).unwrap();
        match router.route_on(&be, t.view(), shape) {
            Ok(_) => panic!("{} routed bad input on the backend", router.kind()),
            Err(e) => e.to_string(),
        }
    };
    let ec = reg.router(&json!("expert-choice")).unwrap();
    assert_names(
        &route_on_err(ec.as_ref(), &[0.0; 7], shape(1, 4, 2)),
        &["scores", "8", "7"],
    );
    assert_names(
        &route_on_err(ec.as_ref(), &[], shape(1, 4, 0)),
        &["experts", "0 experts"],
    );
    let grouped = reg
        .router(&json!({"kind": "expert-choice", "groups": {"tokens": 300}}))
        .unwrap();
    let e = route_on_err(grouped.as_ref(), &vec![0.0; 512 * 2], shape(2, 256, 2));
    assert_names(&e, &["groups.tokens", "300", "256"]);
    let dense = reg.router(&json!("dense")).unwrap();
    assert_names(
        &route_on_err(dense.as_ref(), &[0.0; 8], shape(1, 4, 2)),
        &["dense", "1 expert", "2 experts"],
    );
    // Indices are not scores.
    let idx = be.upload_u32(&[8], &[0; 8]).unwrap();
    let e = ec.route_on(&be, idx.view(), shape(1, 4, 2)).unwrap_err().to_string();
    assert_names(&e, &["scores", "f32", "u32"]);
    // An empty batch routes to nothing on the backend as on the host.
    let empty = be.zeros(&[0], DType::F32).unwrap();
    for router in [&ec, &dense] {
        let experts = if router.kind() == "dense" { 1 } else { 3 };
        let r = router.route_on(&be, empty.view(), shape(0, 4, experts)).unwrap();
        assert_eq!(r.offsets, vec![0; experts + 1]);
        assert_eq!(r.slots(), 0);
    }
}
