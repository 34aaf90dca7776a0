//! Property-tested component swaps: every shipped component, loaded from its
//! cdylib wrapper through the C ABI (version 2), gives the same bits as the
//! statically linked one, on random shapes, specs and inputs: routers (host
//! code), schedulers (host code and `step_on`), the CPU backend (buffers and
//! ops through tensor descriptors) and the experts (driving the host's
//! backend through the lent table), alone and together in a MoE layer.

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
            assert_eq!(info.abi_version, plugin::abi::ABI_VERSION, "{p}");
        }
        Registries { stat, dynamic }
    })
}

// The op-conformance suite through ABI v2: every op of the CPU backend loaded
// as a plugin (tensors crossing as buffer handles) against the static build.
ecdit_engine::backend_conformance!(
    cpu_backend_plugin,
    registries()
        .dynamic
        .backend(&json!({"kind": "cpu", "threads": 2}))
        .unwrap(),
    registries()
        .stat
        .backend(&json!({"kind": "cpu", "threads": 1}))
        .unwrap()
);

/// Cases per property: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(n)
}

fn kinds(r: &Registry, family: Family) -> Vec<(String, Vec<ParamInfo>)> {
    r.list()
        .into_iter()
        .filter(|c| c.family == family)
        .map(|c| (c.kind, c.params))
        .collect()
}

/// A MoE layer's forward and backward as bits: out, routing stats, dx,
/// dW_router, expert parameter gradients.
type MoeBits = (Vec<u32>, RoutingStats, Vec<u32>, Vec<u32>, Vec<Vec<u32>>);

fn read(b: &dyn Backend, t: TensorRef<'_>) -> Vec<u32> {
    bits(&b.read_f32(t).unwrap())
}

#[test]
fn every_shipped_component_is_exported_with_its_parameters() {
    let r = registries();
    for family in [Family::Router, Family::Scheduler, Family::Backend, Family::Expert] {
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
    #![proptest_config(cases(48))]

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
        prop_assert_eq!(a.couples_samples(), b.couples_samples());
        let (ca, cb) = (a.check_tokens_per_sample(tps), b.check_tokens_per_sample(tps));
        prop_assert_eq!(ca.is_ok(), cb.is_ok(), "{:?} vs {:?}", ca, cb);
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
    fn swapping_router_expert_and_backend_in_a_moe_layer_changes_no_bit(
        which in 0usize..16, ex in 0usize..4, samples in 1usize..3, tps in 1usize..9, experts in 1usize..5,
        d in 1usize..9, seed in any::<u64>(),
    ) {
        let r = registries();
        let routers = kinds(&r.stat, Family::Router);
        let (kind, params) = &routers[which % routers.len()];
        let expert_kinds = kinds(&r.stat, Family::Expert);
        let expert = json!(expert_kinds[ex % expert_kinds.len()].0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let spec = random_spec(kind, params, &mut rng);
        let (Ok(ra), Ok(rb)) = (r.stat.router(&spec), r.dynamic.router(&spec)) else { return Ok(()) };
        let backend = json!({"kind": "cpu", "threads": 1});
        let (ba, bb) = (r.stat.backend(&backend).unwrap(), r.dynamic.backend(&backend).unwrap());
        let (ea, eb) = (r.stat.expert(&expert).unwrap(), r.dynamic.expert(&expert).unwrap());
        let new = |router, expert, b: &dyn Backend| {
            MoeLayer::new_random(router, expert, d, experts, b, DType::F32, "",
                &mut rand::rngs::StdRng::seed_from_u64(seed))
        };
        let (la, lb) = match (new(ra, ea, &*ba), new(rb, eb, &*bb)) {
            (Ok(la), Ok(lb)) => (la, lb),
            (Err(_), Err(_)) => return Ok(()),
            (a, b) => return Err(TestCaseError::fail(format!("{spec}: static {:?} plugin {:?}", a.err(), b.err()))),
        };
        let shape = RouteShape { samples, tokens_per_sample: tps, experts };
        let x: Vec<f32> = (0..shape.tokens() * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let dout: Vec<f32> = (0..x.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let run = |l: &MoeLayer, b: &dyn Backend| -> Result<MoeBits> {
            let (xt, doutt) = (b.upload_f32(&[x.len()], &x, DType::F32)?, b.upload_f32(&[x.len()], &dout, DType::F32)?);
            let mut out = b.zeros(&[x.len()], DType::F32)?;
            let mut cache = MoeCache::default();
            let routing = l.forward(b, out.view_mut(), &mut cache, true, xt.view(), shape)?;
            let stats = routing.stats(b)?;
            let mut dx = b.zeros(&[x.len()], DType::F32)?;
            let mut grads = l.zero_grads(b)?;
            l.backward(b, dx.view_mut(), &mut grads, &cache, xt.view(), doutt.view(), 0.1)?;
            Ok((read(b, out.view()), stats, read(b, dx.view()), read(b, grads.dw_router.view()),
                grads.dparams.iter().map(|t| read(b, t.view())).collect()))
        };
        match (run(&la, &*ba), run(&lb, &*bb)) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(&a.0, &b.0, "forward");
                prop_assert_eq!(&a.1, &b.1, "routing stats");
                prop_assert_eq!(&a.2, &b.2, "dx");
                prop_assert_eq!(&a.3, &b.3, "dw_router");
                prop_assert_eq!(&a.4, &b.4, "expert parameter gradients");
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
        let times = a.sampling_times(n).unwrap();
        prop_assert_eq!(bits(&times), bits(&b.sampling_times(n).unwrap()));
        for &t in &times[..2] {
            match (a.model_time(t), b.model_time(t)) {
                (Ok(ma), Ok(mb)) => prop_assert_eq!(ma.to_bits(), mb.to_bits()),
                (Err(ea), Err(eb)) => prop_assert!(eb.to_string().contains(&ea.to_string()), "{ea} vs {eb}"),
                (ma, mb) => return Err(TestCaseError::fail(format!("{kind} model_time({t}): {ma:?} vs {mb:?}"))),
            }
        }
        let (ea, eb) = (a.sampling_times(0).unwrap_err().to_string(), b.sampling_times(0).unwrap_err().to_string());
        prop_assert!(eb.contains(&ea), "{ea} vs {eb}");
        a.step(&mut xa, &noise, times[0], times[1]).unwrap();
        b.step(&mut xb, &noise, times[0], times[1]).unwrap();
        prop_assert_eq!(bits(&xa), bits(&xb));
        // step_on: the static scheduler's device ops on the static backend,
        // the plugin's host step (the trait default) on the plugin backend.
        let backend = json!({"kind": "cpu", "threads": 1});
        let (ba, bb) = (r.stat.backend(&backend).unwrap(), r.dynamic.backend(&backend).unwrap());
        let mut da = ba.upload_f32(&[n], &x0, DType::F32).unwrap();
        let mut db = bb.upload_f32(&[n], &x0, DType::F32).unwrap();
        let (na, nb) = (ba.upload_f32(&[n], &noise, DType::F32).unwrap(), bb.upload_f32(&[n], &noise, DType::F32).unwrap());
        a.step_on(&*ba, da.view_mut(), na.view(), times[0], times[1]).unwrap();
        b.step_on(&*bb, db.view_mut(), nb.view(), times[0], times[1]).unwrap();
        prop_assert_eq!(read(&*ba, da.view()), read(&*bb, db.view()));
    }

    #[test]
    fn swapping_the_cpu_backend_for_its_plugin_changes_no_bit(
        m in 1usize..9, n in 1usize..9, k in 1usize..9, seed in any::<u64>(),
    ) {
        let r = registries();
        let spec = json!({"kind": "cpu", "threads": 1});
        let (a, b) = (r.stat.backend(&spec).unwrap(), r.dynamic.backend(&spec).unwrap());
        prop_assert_eq!(a.name(), b.name());
        prop_assert_eq!(a.supports(DType::BF16), b.supports(DType::BF16));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rand_vec = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let (x, w, bias, o0) = (rand_vec(m * k), rand_vec(n * k), rand_vec(n), rand_vec(m * n));
        // The same ops on both backends from identical inputs, compared bit for bit.
        let both = |be: &dyn Backend| -> Result<Vec<Vec<u32>>> {
            let (xt, wt, bt) = (be.upload_f32(&[m, k], &x, DType::F32)?, be.upload_f32(&[n, k], &w, DType::F32)?,
                be.upload_f32(&[n], &bias, DType::F32)?);
            let mut o = be.upload_f32(&[m, n], &o0, DType::F32)?;
            let mut res = Vec::new();
            be.gemm(o.view_mut(), xt.view(), wt.view(), Some(bt.view()), GemmDims::nt(m, n, k), 0.7, 0.3)?;
            res.push(read(be, o.view()));
            be.add_broadcast(o.view_mut(), bt.view())?;
            res.push(read(be, o.view()));
            let mut s = be.zeros(&[m, n], DType::F32)?;
            be.softmax_rows(s.view_mut(), o.view(), m, n)?;
            res.push(read(be, s.view()));
            let (mut mean, mut rstd) = (be.zeros(&[m], DType::F32)?, be.zeros(&[m], DType::F32)?);
            be.layer_norm(s.view_mut(), mean.view_mut(), rstd.view_mut(), o.view(), Some(bt.view()), None, m, n, 1e-6)?;
            res.push(read(be, s.view()));
            res.push(read(be, rstd.view()));
            be.unary(Unary::GeluTanh, s.view_mut(), o.view())?;
            res.push(read(be, s.view()));
            let kk = k.min(n);
            let (mut idx, mut val) = (be.zeros(&[m, kk], DType::U32)?, be.zeros(&[m, kk], DType::F32)?);
            be.top_k_rows(idx.view_mut(), val.view_mut(), o.view(), m, n, kk)?;
            res.push(be.read_u32(idx.view())?);
            res.push(read(be, val.view()));
            // gemm_grouped over two groups of the rows.
            let groups = [m / 2, m - m / 2];
            let wg = be.upload_f32(&[2, n, k], &[w.clone(), w.iter().map(|v| -v).collect()].concat(), DType::F32)?;
            be.gemm_grouped(o.view_mut(), xt.view(), wg.view(), &groups, n, k, true, 1.0, 0.0)?;
            res.push(read(be, o.view()));
            Ok(res)
        };
        prop_assert_eq!(both(&*a).unwrap(), both(&*b).unwrap());
        // Errors agree too, and name the plugin on the dynamic side.
        let err = |be: &dyn Backend| {
            let mut o = be.zeros(&[m, n], DType::F32).unwrap();
            let (xt, wt) = (be.zeros(&[m, k], DType::F32).unwrap(), be.zeros(&[n, k], DType::F32).unwrap());
            let wrong = GemmDims::nt(m + 1, n, k);
            be.gemm(o.view_mut(), xt.view(), wt.view(), None, wrong, 1.0, 0.0).unwrap_err().to_string()
        };
        let (ea, eb) = (err(&*a), err(&*b));
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

/// A weight the host rewrites through its zero-copy view of the plugin
/// backend's buffer is read afresh by the plugin's next product: the write
/// reaches the plugin through `buffer_written`, and its oneDNN path, which
/// keeps weights pre-packed while their buffer is unwritten, packs again.
/// (Without oneDNN, or for bf16 without bf16 kernels, products read the
/// buffer directly and this holds trivially.)
#[test]
fn host_writes_through_a_plugin_buffer_reach_the_plugin() {
    let r = registries();
    let spec = json!({"kind": "cpu", "threads": 2});
    let (dynamic, stat) = (r.dynamic.backend(&spec).unwrap(), r.stat.backend(&spec).unwrap());
    let (m, n, k) = (64, 384, 384);
    let dims = GemmDims::nn(m, n, k);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut values = |len: usize| (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<f32>>();
    let (xs, w0, w1) = (values(m * k), values(k * n), values(k * n));
    for dtype in [DType::F32, DType::BF16] {
        // The plugin's product before and after the host's write, and the
        // static build's product of the new weights.
        let x = dynamic.upload_f32(&[m, k], &xs, dtype).unwrap();
        let mut w = dynamic.upload_f32(&[k, n], &w0, dtype).unwrap();
        let product = |be: &dyn Backend, x: &Tensor, w: &Tensor| {
            let mut out = be.zeros(&[m, n], DType::F32).unwrap();
            be.gemm(out.view_mut(), x.view(), w.view(), None, dims, 1.0, 0.0)
                .unwrap();
            be.read_f32(out.view()).unwrap()
        };
        let before = product(dynamic.as_ref(), &x, &w);
        assert!(w.buffer().is_host(), "the CPU plugin lends host memory");
        match dtype {
            DType::BF16 => dtype::f32_to_bf16(w.view_mut().host_mut::<dtype::bf16>().unwrap(), &w1),
            _ => w.view_mut().host_mut::<f32>().unwrap().copy_from_slice(&w1),
        }
        let after = product(dynamic.as_ref(), &x, &w);
        let (sx, sw) = (
            stat.upload_f32(&[m, k], &xs, dtype).unwrap(),
            stat.upload_f32(&[k, n], &w1, dtype).unwrap(),
        );
        assert!(before != after, "{dtype:?}: the plugin read its old weights");
        let want = product(stat.as_ref(), &sx, &sw);
        assert!(
            bits(&after) == bits(&want),
            "{dtype:?}: not the static build's product of the new weights"
        );
    }
}
