//! Property-tested component swaps: every shipped component, loaded from its
//! cdylib wrapper through the C ABI, gives the same bits as the statically
//! linked one, on random shapes, specs and inputs.

mod plugin_common;

use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::*;
use plugin_common::bits;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

struct Registries {
    stat: Registry,
    dynamic: Registry,
}

/// Static: every shipped crate's `register`; dynamic: every shipped cdylib.
fn registries() -> &'static Registries {
    static R: OnceLock<Registries> = OnceLock::new();
    R.get_or_init(|| {
        let mut stat = Registry::new();
        ecdit_routers::register(&mut stat).unwrap();
        ecdit_schedulers::register(&mut stat).unwrap();
        ecdit_backend_cpu::register(&mut stat).unwrap();
        let mut dynamic = Registry::new();
        for p in [
            "ecdit-routers-plugin",
            "ecdit-schedulers-plugin",
            "ecdit-backend-cpu-plugin",
        ] {
            let info = dynamic.load_plugin(plugin_common::shipped(p)).unwrap();
            assert!(!info.components.is_empty(), "{p} exported nothing");
        }
        Registries { stat, dynamic }
    })
}

fn kinds(r: &Registry, family: Family) -> Vec<(String, Vec<ParamInfo>)> {
    r.list()
        .into_iter()
        .filter(|c| c.family == family)
        .map(|c| (c.kind, c.params))
        .collect()
}

#[test]
fn every_shipped_router_scheduler_and_backend_is_exported_with_its_parameters() {
    let r = registries();
    for family in [Family::Router, Family::Scheduler, Family::Backend] {
        let s = kinds(&r.stat, family);
        assert!(!s.is_empty(), "no static {family}s");
        assert_eq!(
            s,
            kinds(&r.dynamic, family),
            "{family}s differ between static and plugin"
        );
    }
}

/// A random spec for `kind`, drawn from its declared parameters.
fn random_spec(kind: &str, params: &[ParamInfo], rng: &mut impl Rng) -> Value {
    let mut spec = Map::new();
    spec.insert("kind".into(), json!(kind));
    for p in params {
        let v = match &p.ty {
            ParamType::Float => json!(rng.gen_range(0.5..3.0f64)),
            ParamType::Int => json!(rng.gen_range(1..=3u32)),
            ParamType::Bool => json!(rng.gen::<bool>()),
            ParamType::Groups => json!(["per_sample", "batch"][rng.gen_range(0..2)]),
            ParamType::Choice(options) => json!(options[rng.gen_range(0..options.len())]),
            _ => continue, // keep the default
        };
        spec.insert(p.name.clone(), v);
    }
    Value::Object(spec)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn swapping_a_router_for_its_plugin_changes_no_bit(
        which in 0usize..16, samples in 1usize..4, tps in 1usize..12, experts in 1usize..7, seed in any::<u64>(),
    ) {
        let r = registries();
        let routers = kinds(&r.stat, Family::Router);
        let (kind, params) = &routers[which % routers.len()];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let spec = random_spec(kind, params, &mut rng);
        let (a, b) = match (r.stat.router(&spec), r.dynamic.router(&spec)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(ea), Err(eb)) => {
                prop_assert!(eb.to_string().contains(&ea.to_string()), "{ea} vs {eb}");
                return Ok(());
            }
            (a, b) => return Err(TestCaseError::fail(format!("{spec}: static {:?} plugin {:?}", a.err(), b.err()))),
        };
        prop_assert_eq!(a.spec(), b.spec());
        let shape = RouteShape { samples, tokens_per_sample: tps, experts };
        let scores: Vec<f32> = (0..shape.tokens() * experts).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let (ra, rb) = match (a.route(&scores, shape), b.route(&scores, shape)) {
            (Ok(ra), Ok(rb)) => (ra, rb),
            (Err(ea), Err(eb)) => {
                prop_assert!(eb.to_string().contains(&ea.to_string()), "{ea} vs {eb}");
                return Ok(());
            }
            (a, b) => return Err(TestCaseError::fail(format!("{spec}: static {:?} plugin {:?}", a.err(), b.err()))),
        };
        prop_assert_eq!(&ra.dispatch.offsets, &rb.dispatch.offsets);
        prop_assert_eq!(&ra.dispatch.tokens, &rb.dispatch.tokens);
        prop_assert_eq!(bits(&ra.dispatch.gates), bits(&rb.dispatch.gates));
        prop_assert_eq!(bits(&ra.probs), bits(&rb.probs));
        prop_assert_eq!(ra.aux_loss.map(f32::to_bits), rb.aux_loss.map(f32::to_bits));
        prop_assert_eq!(&ra.stats, &rb.stats);
        let gg: Vec<f32> = (0..ra.dispatch.slots()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let grad_aux = rng.gen_range(-1.0..1.0);
        let (mut ga, mut gb) = (vec![0.0; scores.len()], vec![0.0; scores.len()]);
        a.backward(&ra, &scores, &gg, grad_aux, &mut ga).unwrap();
        b.backward(&rb, &scores, &gg, grad_aux, &mut gb).unwrap();
        prop_assert_eq!(bits(&ga), bits(&gb));
    }

    #[test]
    fn swapping_router_and_backend_in_a_moe_layer_changes_no_bit(
        which in 0usize..16, samples in 1usize..3, tps in 1usize..9, experts in 1usize..5, d in 1usize..9,
        seed in any::<u64>(),
    ) {
        let r = registries();
        let routers = kinds(&r.stat, Family::Router);
        let (kind, params) = &routers[which % routers.len()];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let spec = random_spec(kind, params, &mut rng);
        let (Ok(ra), Ok(rb)) = (r.stat.router(&spec), r.dynamic.router(&spec)) else { return Ok(()) };
        let expert = json!("gelu-mlp");
        let backend = json!({"kind": "cpu", "threads": 1});
        let (ba, bb) = (r.stat.backend(&backend).unwrap(), r.dynamic.backend(&backend).unwrap());
        let la = MoeLayer::new_random(ra, r.stat.expert(&expert).unwrap(), d, experts,
            &mut rand::rngs::StdRng::seed_from_u64(seed)).unwrap();
        let lb = MoeLayer::new_random(rb, r.stat.expert(&expert).unwrap(), d, experts,
            &mut rand::rngs::StdRng::seed_from_u64(seed)).unwrap();
        let shape = RouteShape { samples, tokens_per_sample: tps, experts };
        let x: Vec<f32> = (0..shape.tokens() * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        match (la.forward(&*ba, &x, shape), lb.forward(&*bb, &x, shape)) {
            (Ok((oa, ca)), Ok((ob, cb))) => {
                prop_assert_eq!(bits(&oa), bits(&ob));
                prop_assert_eq!(&ca.routing.stats, &cb.routing.stats);
                let dout: Vec<f32> = (0..x.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let ga = la.backward(&*ba, &ca, &x, &dout, 0.1).unwrap();
                let gb = lb.backward(&*bb, &cb, &x, &dout, 0.1).unwrap();
                prop_assert_eq!(bits(&ga.dx), bits(&gb.dx));
                prop_assert_eq!(bits(&ga.dw_router), bits(&gb.dw_router));
            }
            (Err(_), Err(_)) => {}
            (a, b) => return Err(TestCaseError::fail(format!("{spec}: static {:?} plugin {:?}", a.err(), b.err()))),
        }
    }

    #[test]
    fn swapping_a_scheduler_for_its_plugin_changes_no_bit(which in 0usize..8, n in 1usize..40, seed in any::<u64>()) {
        let r = registries();
        let schedulers = kinds(&r.stat, Family::Scheduler);
        let (kind, _) = &schedulers[which % schedulers.len()];
        let (a, b) = (r.stat.scheduler(&json!(kind)).unwrap(), r.dynamic.scheduler(&json!(kind)).unwrap());
        let (mut ra, mut rb) = (rand::rngs::StdRng::seed_from_u64(seed), rand::rngs::StdRng::seed_from_u64(seed));
        for _ in 0..8 {
            prop_assert_eq!(a.draw_t(&mut ra).to_bits(), b.draw_t(&mut rb).to_bits());
        }
        prop_assert_eq!(ra.next_u64(), rb.next_u64());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
        let x0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let noise: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let t = a.draw_t(&mut rng);
        let (mut xa, mut xb) = (vec![0.0; n], vec![0.0; n]);
        a.add_noise(&mut xa, &x0, &noise, t).unwrap();
        b.add_noise(&mut xb, &x0, &noise, t).unwrap();
        prop_assert_eq!(bits(&xa), bits(&xb));
        a.target(&mut xa, &x0, &noise, t).unwrap();
        b.target(&mut xb, &x0, &noise, t).unwrap();
        prop_assert_eq!(bits(&xa), bits(&xb));
        let times = a.sampling_times(n);
        prop_assert_eq!(bits(&times), bits(&b.sampling_times(n)));
        prop_assert_eq!(a.model_time(times[1]).to_bits(), b.model_time(times[1]).to_bits());
        a.step(&mut xa, &noise, times[0], times[1]).unwrap();
        b.step(&mut xb, &noise, times[0], times[1]).unwrap();
        prop_assert_eq!(bits(&xa), bits(&xb));
    }

    #[test]
    fn swapping_the_cpu_backend_for_its_plugin_changes_no_bit(
        m in 1usize..9, n in 1usize..9, k in 1usize..9, seed in any::<u64>(),
    ) {
        let r = registries();
        let spec = json!({"kind": "cpu", "threads": 1});
        let (a, b) = (r.stat.backend(&spec).unwrap(), r.dynamic.backend(&spec).unwrap());
        prop_assert_eq!(a.name(), b.name());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rand_vec = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let (x, w, bias) = (rand_vec(m * k), rand_vec(n * k), rand_vec(n));
        // Each op on both backends from identical inputs; outputs compared bit for bit.
        let (mut oa, mut ob) = (rand_vec(m * n), vec![0.0; m * n]);
        ob.copy_from_slice(&oa);
        a.gemm(&mut oa, &x, &w, GemmDims::nt(m, n, k), 0.7, 0.3).unwrap();
        b.gemm(&mut ob, &x, &w, GemmDims::nt(m, n, k), 0.7, 0.3).unwrap();
        prop_assert_eq!(bits(&oa), bits(&ob));
        a.add_bias(&mut oa, &bias, m, n).unwrap();
        b.add_bias(&mut ob, &bias, m, n).unwrap();
        prop_assert_eq!(bits(&oa), bits(&ob));
        let (mut sa, mut sb) = (vec![0.0; m * n], vec![0.0; m * n]);
        a.softmax_rows(&mut sa, &oa, m, n).unwrap();
        b.softmax_rows(&mut sb, &ob, m, n).unwrap();
        prop_assert_eq!(bits(&sa), bits(&sb));
        let (mut mean_a, mut rstd_a, mut mean_b, mut rstd_b) = (vec![0.0; m], vec![0.0; m], vec![0.0; m], vec![0.0; m]);
        a.layer_norm(&mut sa, &mut mean_a, &mut rstd_a, &oa, Some(&bias), None, m, n, 1e-6).unwrap();
        b.layer_norm(&mut sb, &mut mean_b, &mut rstd_b, &ob, Some(&bias), None, m, n, 1e-6).unwrap();
        prop_assert_eq!(bits(&sa), bits(&sb));
        prop_assert_eq!(bits(&rstd_a), bits(&rstd_b));
        let (mut ua, mut ub) = (vec![0.0; m * n], vec![0.0; m * n]);
        a.unary(Unary::GeluTanh, &mut ua, &oa).unwrap();
        b.unary(Unary::GeluTanh, &mut ub, &ob).unwrap();
        prop_assert_eq!(bits(&ua), bits(&ub));
        let kk = k.min(n);
        let (mut ia, mut va, mut ib, mut vb) = (vec![0u32; m * kk], vec![0.0; m * kk], vec![0u32; m * kk], vec![0.0; m * kk]);
        a.top_k_rows(&mut ia, &mut va, &oa, m, n, kk).unwrap();
        b.top_k_rows(&mut ib, &mut vb, &ob, m, n, kk).unwrap();
        prop_assert_eq!(&ia, &ib);
        prop_assert_eq!(bits(&va), bits(&vb));
        // Errors agree too, and name the plugin on the dynamic side.
        let ea = a.add_bias(&mut oa, &bias[..n - 1], m, n).unwrap_err().to_string();
        let eb = b.add_bias(&mut ob, &bias[..n - 1], m, n).unwrap_err().to_string();
        prop_assert!(eb.contains(&ea) && eb.contains("ecdit-backend-cpu-plugin"), "{ea} vs {eb}");
    }
}

#[test]
fn every_shipped_router_keeps_the_router_contract_through_the_abi() {
    let r = registries();
    for (kind, _) in kinds(&r.dynamic, Family::Router) {
        let spec = json!(kind);
        let full_spec = r.stat.router(&spec).unwrap().spec();
        let capacity = (kind == "expert-choice").then(|| full_spec["capacity_factor"].as_f64().unwrap());
        // top-k routers need at least k experts
        let min_experts = full_spec.get("k").and_then(Value::as_u64).unwrap_or(1) as usize;
        let config = ContractConfig {
            cases: Some(24),
            capacity_factor: capacity,
            // dense is the one-expert baseline FFN and refuses any other E
            min_experts,
            max_experts: if kind == "dense" { 1 } else { 6 },
            ..ContractConfig::default()
        };
        if let Err(e) = check_router_contract(|| r.dynamic.router(&spec).unwrap(), &config) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_cuda_plugin_loads_and_declines_cleanly_without_a_driver() {
    let mut reg = Registry::new();
    let info = reg
        .load_plugin(plugin_common::shipped("ecdit-backend-cuda-plugin"))
        .unwrap();
    assert_eq!(info.name, "ecdit-backend-cuda-plugin");
    assert!(
        info.components
            .iter()
            .any(|c| c.family == Family::Backend && c.kind == "cuda"),
        "{info:?}"
    );
    match reg.backend(&json!("cuda")) {
        Ok(b) => assert_eq!(b.name(), "cuda"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("ecdit-backend-cuda-plugin") && e.contains("CUDA"), "{e}");
        }
    }
}
