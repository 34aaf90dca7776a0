//! The full C-ABI round trip in one process, with test-only components:
//! `plugin::load_in_process` exports a `register` function's components to the
//! C tables and registers them back through the host adapters. Dynamic and
//! static variants must agree bit for bit; misbehaviour must become errors.

use ecdit_engine::plugin::load_in_process;
use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::*;
use proptest::prelude::*;
use rand::{Rng as _, RngCore, SeedableRng};
use serde_json::{json, Map, Value};
use std::sync::Arc;

// ------------------------------------------------------------------ test router

/// Top-1 routing: each token to its most probable expert, gate = that probability.
struct TopOne {
    temperature: f32,
}

fn softmax_rows(scores: &[f32], experts: usize, temperature: f32) -> Vec<f32> {
    let mut probs = vec![0.0; scores.len()];
    for (row, out) in scores.chunks(experts).zip(probs.chunks_mut(experts)) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x / temperature));
        let mut sum = 0.0;
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (x / temperature - mx).exp();
            sum += *o;
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
    probs
}

impl Router for TopOne {
    fn kind(&self) -> &str {
        "test-top1"
    }
    fn spec(&self) -> Value {
        json!({"kind": "test-top1", "temperature": self.temperature})
    }
    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        error::check_len("test-top1", "scores", scores.len(), shape.tokens() * shape.experts)?;
        error::check_finite("scores", scores)?;
        let probs = softmax_rows(scores, shape.experts, self.temperature);
        let mut lists = vec![Vec::new(); shape.experts];
        for (t, row) in probs.chunks(shape.experts).enumerate() {
            let (e, &p) = row
                .iter()
                .enumerate()
                .fold((0, &row[0]), |best, (e, p)| if *p > *best.1 { (e, p) } else { best });
            lists[e].push((t as u32, p));
        }
        let dispatch = Dispatch::from_lists(shape.tokens(), lists);
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: Some(0.25),
            stats,
            group_size: shape.tokens_per_sample,
        })
    }
    fn backward(&self, routing: &Routing, _: &[f32], grad_gates: &[f32], _: f32, grad: &mut [f32]) -> Result<()> {
        let d = &routing.dispatch;
        let e_count = d.experts;
        grad.iter_mut().for_each(|g| *g = 0.0);
        for e in 0..e_count {
            let r = d.offsets[e]..d.offsets[e + 1];
            for (&t, &gg) in d.tokens[r.clone()].iter().zip(&grad_gates[r]) {
                let p = &routing.probs[t as usize * e_count..][..e_count];
                for j in 0..e_count {
                    let delta = if j == e { 1.0 } else { 0.0 };
                    grad[t as usize * e_count + j] += gg * p[e] * (delta - p[j]) / self.temperature;
                }
            }
        }
        Ok(())
    }
}

fn router_info(kind: &str, params: Vec<ParamInfo>) -> ComponentInfo {
    ComponentInfo {
        family: Family::Router,
        kind: kind.into(),
        description: format!("test router {kind}"),
        params,
        origin: "builtin".into(),
    }
}

fn register_top1(r: &mut Registry) -> Result<()> {
    let params = vec![
        ParamInfo::new("temperature", ParamType::Float, Some(json!(1.0)), "softmax temperature"),
        ParamInfo::new(
            "note",
            ParamType::OptionalFloat,
            Some(Value::Null),
            "a null default survives",
        ),
    ];
    r.register_router(
        router_info("test-top1", params),
        Arc::new(|p: &Map<String, Value>| {
            let temperature = spec::get::<f32>("router 'test-top1'", p, "temperature")?;
            Ok(Box::new(TopOne { temperature }) as Box<dyn Router>)
        }),
    )
}

// ------------------------------------------------------------------ misbehaving routers

#[derive(Clone, Copy)]
enum Bad {
    Panics,
    OutOfRange,
    Duplicate,
    NanGate,
    GateAboveOne,
}

struct BadRouter(Bad);

impl Router for BadRouter {
    fn kind(&self) -> &str {
        "bad"
    }
    fn spec(&self) -> Value {
        json!({"kind": "bad"})
    }
    fn route(&self, _: &[f32], shape: RouteShape) -> Result<Routing> {
        let t = shape.tokens() as u32;
        let list = match self.0 {
            Bad::Panics => panic!("router exploded on purpose"),
            Bad::OutOfRange => vec![(t + 5, 0.5)],
            Bad::Duplicate => vec![(0, 0.5), (0, 0.5)],
            Bad::NanGate => vec![(0, f32::NAN)],
            Bad::GateAboveOne => vec![(0, 1.5)],
        };
        let mut lists = vec![Vec::new(); shape.experts];
        lists[0] = list;
        Ok(Routing {
            dispatch: Dispatch::from_lists(shape.tokens(), lists),
            probs: vec![1.0 / shape.experts as f32; shape.tokens() * shape.experts],
            aux_loss: None,
            stats: RoutingStats::default(),
            group_size: shape.tokens_per_sample,
        })
    }
    fn backward(&self, _: &Routing, _: &[f32], _: &[f32], _: f32, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

fn register_bad(r: &mut Registry) -> Result<()> {
    for (kind, mode) in [
        ("bad-panics", Bad::Panics),
        ("bad-out-of-range", Bad::OutOfRange),
        ("bad-duplicate", Bad::Duplicate),
        ("bad-nan-gate", Bad::NanGate),
        ("bad-gate-above-one", Bad::GateAboveOne),
    ] {
        r.register_router(
            router_info(kind, vec![]),
            Arc::new(move |_: &Map<String, Value>| Ok(Box::new(BadRouter(mode)) as Box<dyn Router>)),
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------ test scheduler

/// Uses every RngCore method, so the lent generator must forward each exactly.
struct TestFlow;

impl Scheduler for TestFlow {
    fn kind(&self) -> &str {
        "test-flow"
    }
    fn spec(&self) -> Value {
        json!({"kind": "test-flow"})
    }
    fn draw_t(&self, rng: &mut dyn RngCore) -> f32 {
        let mut bytes = [0u8; 3];
        rng.fill_bytes(&mut bytes);
        let a = rng.next_u32() as f32 / u32::MAX as f32;
        let b = rng.gen::<f32>();
        ((a + b) * 0.5 + bytes[0] as f32 * 1e-6).min(1.0)
    }
    fn add_noise(&self, x_t: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        error::check_len("add_noise", "x0", x0.len(), x_t.len())?;
        error::check_len("add_noise", "noise", noise.len(), x_t.len())?;
        for ((o, &a), &n) in x_t.iter_mut().zip(x0).zip(noise) {
            *o = (1.0 - t) * a + t * n;
        }
        Ok(())
    }
    fn target(&self, target: &mut [f32], x0: &[f32], noise: &[f32], _: f32) -> Result<()> {
        error::check_len("target", "x0", x0.len(), target.len())?;
        for ((o, &a), &n) in target.iter_mut().zip(x0).zip(noise) {
            *o = n - a;
        }
        Ok(())
    }
    fn model_time(&self, t: f32) -> f32 {
        t * 1000.0
    }
    fn sampling_times(&self, steps: usize) -> Vec<f32> {
        (0..=steps).map(|i| 1.0 - i as f32 / steps.max(1) as f32).collect()
    }
    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()> {
        error::check_len("step", "model_out", model_out.len(), x.len())?;
        for (o, &v) in x.iter_mut().zip(model_out) {
            *o += (t_next - t) * v;
        }
        Ok(())
    }
}

fn register_flow(r: &mut Registry) -> Result<()> {
    r.register_scheduler(
        ComponentInfo {
            family: Family::Scheduler,
            kind: "test-flow".into(),
            description: "test scheduler".into(),
            params: vec![],
            origin: "builtin".into(),
        },
        Arc::new(|_: &Map<String, Value>| Ok(Box::new(TestFlow) as Box<dyn Scheduler>)),
    )
}

fn fresh(register: fn(&mut Registry) -> Result<()>, name: &str) -> (Registry, Registry) {
    let mut stat = Registry::new();
    register(&mut stat).unwrap();
    let mut dynamic = Registry::new();
    let info = load_in_process(&mut dynamic, name, "1.2.3", register).unwrap();
    assert_eq!(info.name, name);
    assert_eq!(info.version, "1.2.3");
    (stat, dynamic)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ------------------------------------------------------------------ tests

#[test]
fn plugin_component_keeps_its_parameters_and_origin() {
    let (stat, dynamic) = fresh(register_top1, "top1-plugin");
    let s = stat.list();
    let d = dynamic.list();
    assert_eq!(s.len(), 1);
    assert_eq!(d.len(), 1);
    assert_eq!(s[0].params, d[0].params, "params must survive the JSON round trip");
    assert_eq!(d[0].params[1].default, Some(Value::Null));
    assert!(d[0].origin.contains("top1-plugin 1.2.3"), "{}", d[0].origin);
    let r = dynamic
        .router(&json!({"kind": "test-top1", "temperature": 2.0}))
        .unwrap();
    assert_eq!(r.kind(), "test-top1");
    assert_eq!(r.spec(), json!({"kind": "test-top1", "temperature": 2.0, "note": null}));
    // The host checks parameters before the plugin sees them.
    let e = dynamic
        .router(&json!({"kind": "test-top1", "temp": 2.0}))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("'temp'") && e.contains("temperature"), "{e}");
}

proptest! {
    #[test]
    fn router_through_the_abi_changes_no_bit(
        samples in 1usize..4, tps in 1usize..10, experts in 1usize..7, seed in any::<u64>(), temp in 0.5f32..2.0,
    ) {
        static REGISTRIES: std::sync::OnceLock<(Registry, Registry)> = std::sync::OnceLock::new();
        let (stat, dynamic) = REGISTRIES.get_or_init(|| fresh(register_top1, "top1"));
        let spec = json!({"kind": "test-top1", "temperature": temp});
        let (a, b) = (stat.router(&spec).unwrap(), dynamic.router(&spec).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let shape = RouteShape { samples, tokens_per_sample: tps, experts };
        let scores: Vec<f32> = (0..shape.tokens() * experts).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let (ra, rb) = (a.route(&scores, shape).unwrap(), b.route(&scores, shape).unwrap());
        prop_assert_eq!(&ra.dispatch.offsets, &rb.dispatch.offsets);
        prop_assert_eq!(&ra.dispatch.tokens, &rb.dispatch.tokens);
        prop_assert_eq!(bits(&ra.dispatch.gates), bits(&rb.dispatch.gates));
        prop_assert_eq!(bits(&ra.probs), bits(&rb.probs));
        prop_assert_eq!(ra.aux_loss, rb.aux_loss);
        prop_assert_eq!(ra.group_size, rb.group_size);
        prop_assert_eq!(&ra.stats, &rb.stats);
        let gg: Vec<f32> = (0..ra.dispatch.slots()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut ga = vec![0.0; scores.len()];
        let mut gb = vec![1.0; scores.len()];
        a.backward(&ra, &scores, &gg, 0.5, &mut ga).unwrap();
        b.backward(&rb, &scores, &gg, 0.5, &mut gb).unwrap();
        prop_assert_eq!(bits(&ga), bits(&gb));
    }
}

#[test]
fn router_contract_holds_statically_and_through_the_abi() {
    let (stat, dynamic) = fresh(register_top1, "top1-contract");
    let spec = json!({"kind": "test-top1"});
    let config = ContractConfig {
        cases: Some(32),
        ..ContractConfig::default()
    };
    check_router_contract(|| stat.router(&spec).unwrap(), &config).unwrap();
    check_router_contract(|| dynamic.router(&spec).unwrap(), &config).unwrap();
}

#[test]
fn router_kit_catches_a_wrong_backward_and_a_capacity_breach() {
    let mut r = Registry::new();
    register_top1(&mut r).unwrap();
    // The backward of temperature 1 applied to a temperature-2 router is off by 2x.
    struct WrongGrad(TopOne);
    impl Router for WrongGrad {
        fn kind(&self) -> &str {
            "wrong-grad"
        }
        fn spec(&self) -> Value {
            json!({"kind": "wrong-grad"})
        }
        fn route(&self, s: &[f32], shape: RouteShape) -> Result<Routing> {
            self.0.route(s, shape)
        }
        fn backward(&self, r: &Routing, s: &[f32], g: &[f32], a: f32, out: &mut [f32]) -> Result<()> {
            TopOne { temperature: 1.0 }.backward(r, s, g, a, out)
        }
    }
    let config = ContractConfig {
        cases: Some(16),
        max_experts: 4,
        ..ContractConfig::default()
    };
    let e = check_router_contract(|| Box::new(WrongGrad(TopOne { temperature: 2.0 })), &config).unwrap_err();
    assert!(e.contains("finite differences"), "{e}");
    // Top-1 sends every token of a sample to one expert when scores say so;
    // a tiny capacity factor caps experts at 1 token per group.
    let tight = ContractConfig {
        cases: Some(16),
        capacity_factor: Some(0.01),
        fd_coords: 0,
        ..ContractConfig::default()
    };
    let e = check_router_contract(|| r.router(&json!("test-top1")).unwrap(), &tight).unwrap_err();
    assert!(e.contains("capacity"), "{e}");
}

#[test]
fn misbehaving_routers_are_errors_and_the_host_lives_on() {
    let mut reg = Registry::new();
    load_in_process(&mut reg, "bad-routers", "0.0.1", register_bad).unwrap();
    let shape = RouteShape {
        samples: 1,
        tokens_per_sample: 4,
        experts: 2,
    };
    let scores = vec![0.0; 8];
    for (kind, expect) in [
        (
            "bad-panics",
            "panicked inside the plugin: panicked: router exploded on purpose",
        ),
        ("bad-out-of-range", "out of range"),
        ("bad-duplicate", "twice"),
        ("bad-nan-gate", "NaN"),
        ("bad-gate-above-one", "1.5"),
    ] {
        let router = reg.router(&json!(kind)).unwrap();
        let e = router
            .route(&scores, shape)
            .err()
            .unwrap_or_else(|| panic!("{kind} routed"));
        let text = e.to_string();
        assert!(matches!(e, EngineError::Plugin { .. }), "{kind}: {e:?}");
        assert!(
            text.contains("bad-routers") && text.contains(kind) && text.contains(expect),
            "{kind}: {text}"
        );
    }
    // Still alive and usable.
    assert_eq!(reg.list().len(), 5);
}

#[test]
fn a_clashing_plugin_registers_nothing() {
    let mut reg = Registry::new();
    register_top1(&mut reg).unwrap();
    // bad-* are free, test-top1 is taken: all or nothing.
    fn both(r: &mut Registry) -> Result<()> {
        register_bad(r)?;
        register_top1(r)
    }
    let e = load_in_process(&mut reg, "clasher", "1", both).unwrap_err().to_string();
    assert!(
        e.contains("test-top1") && e.contains("already registered") && e.contains("clasher"),
        "{e}"
    );
    assert_eq!(reg.list().len(), 1, "nothing of the refused plugin may stay registered");
    // The same plugin twice: the second is refused, naming both origins.
    let mut reg = Registry::new();
    load_in_process(&mut reg, "first", "1", register_top1).unwrap();
    let e = load_in_process(&mut reg, "second", "1", register_top1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("first") && e.contains("second"), "{e}");
}

#[test]
fn scheduler_through_the_abi_consumes_the_same_random_bits() {
    let (stat, dynamic) = fresh(register_flow, "flow");
    let (a, b) = (
        stat.scheduler(&json!("test-flow")).unwrap(),
        dynamic.scheduler(&json!("test-flow")).unwrap(),
    );
    let mut ra = rand::rngs::StdRng::seed_from_u64(7);
    let mut rb = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20 {
        assert_eq!(a.draw_t(&mut ra).to_bits(), b.draw_t(&mut rb).to_bits());
    }
    assert_eq!(
        ra.next_u64(),
        rb.next_u64(),
        "both must leave the generator in the same state"
    );
    let x0: Vec<f32> = (0..17).map(|i| i as f32 * 0.3 - 2.0).collect();
    let noise: Vec<f32> = (0..17).map(|i| (i as f32 * 1.7).sin()).collect();
    let (mut xa, mut xb) = (vec![0.0; 17], vec![0.0; 17]);
    a.add_noise(&mut xa, &x0, &noise, 0.3).unwrap();
    b.add_noise(&mut xb, &x0, &noise, 0.3).unwrap();
    assert_eq!(bits(&xa), bits(&xb));
    a.target(&mut xa, &x0, &noise, 0.3).unwrap();
    b.target(&mut xb, &x0, &noise, 0.3).unwrap();
    assert_eq!(bits(&xa), bits(&xb));
    a.step(&mut xa, &noise, 0.5, 0.25).unwrap();
    b.step(&mut xb, &noise, 0.5, 0.25).unwrap();
    assert_eq!(bits(&xa), bits(&xb));
    assert_eq!(bits(&a.sampling_times(9)), bits(&b.sampling_times(9)));
    assert_eq!(a.model_time(0.37).to_bits(), b.model_time(0.37).to_bits());
    // Errors cross the boundary with the plugin's name.
    let e = b.add_noise(&mut xb, &x0[..3], &noise, 0.3).unwrap_err().to_string();
    assert!(
        e.contains("flow") && e.contains("add_noise") && e.contains("3 elements"),
        "{e}"
    );
}

// ------------------------------------------------------------------ test backend

/// A backend with two real ops and one that panics; the rest refuse.
struct TestBackend;

fn refuse(op: &str) -> Result<()> {
    Err(EngineError::Backend {
        backend: "test".into(),
        reason: format!("{op} is not supported"),
    })
}

impl Backend for TestBackend {
    fn name(&self) -> &str {
        "test-be"
    }
    fn threads(&self) -> usize {
        3
    }
    fn gemm(&self, _: &mut [f32], _: &[f32], _: &[f32], _: GemmDims, _: f32, _: f32) -> Result<()> {
        panic!("gemm blew up")
    }
    fn gemm_batched(&self, _: &mut [f32], _: &[f32], _: &[f32], _: usize, _: GemmDims, _: f32, _: f32) -> Result<()> {
        refuse("gemm_batched")
    }
    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
        error::check_len("add_bias", "out", out.len(), rows * cols)?;
        error::check_len("add_bias", "bias", bias.len(), cols)?;
        for row in out.chunks_mut(cols) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
        Ok(())
    }
    fn sum_rows(&self, _: &mut [f32], _: &[f32], _: usize, _: usize, _: bool) -> Result<()> {
        refuse("sum_rows")
    }
    fn softmax_rows(&self, _: &mut [f32], _: &[f32], _: usize, _: usize) -> Result<()> {
        refuse("softmax_rows")
    }
    fn softmax_rows_backward(&self, _: &mut [f32], _: &[f32], _: &[f32], _: usize, _: usize) -> Result<()> {
        refuse("softmax_rows_backward")
    }
    fn layer_norm(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: Option<&[f32]>,
        bias: Option<&[f32]>,
        _: usize,
        _: usize,
        eps: f32,
    ) -> Result<()> {
        // Reports what arrived, so the test sees optional buffers survive.
        out[0] = weight.map_or(-1.0, |w| w.len() as f32);
        out[1] = bias.map_or(-1.0, |b| b.len() as f32);
        out[2] = inp.len() as f32;
        mean[0] = eps;
        rstd[0] = 1.0;
        Ok(())
    }
    fn layer_norm_backward(
        &self,
        _: &mut [f32],
        dweight: Option<&mut [f32]>,
        _: Option<&mut [f32]>,
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: Option<&[f32]>,
        _: usize,
        _: usize,
    ) -> Result<()> {
        if let Some(d) = dweight {
            d.iter_mut().for_each(|x| *x = 7.0);
        }
        Ok(())
    }
    fn unary(&self, op: Unary, out: &mut [f32], _: &[f32]) -> Result<()> {
        out[0] = if op == Unary::Silu { 1.0 } else { 2.0 };
        Ok(())
    }
    fn unary_backward(&self, _: Unary, _: &mut [f32], _: &[f32], _: &[f32]) -> Result<()> {
        refuse("unary_backward")
    }
    fn attention(
        &self,
        out: &mut [f32],
        _: &mut [f32],
        _: &[f32],
        _: &[f32],
        _: &[f32],
        key_mask: Option<&[u8]>,
        dims: AttnDims,
    ) -> Result<()> {
        out[0] = key_mask.map_or(-1.0, |m| m.iter().map(|&b| b as f32).sum());
        out[1] = (dims.batch * 100000 + dims.heads * 10000 + dims.kv_heads * 1000 + dims.q_len * 100) as f32
            + (dims.kv_len * 10 + dims.head_dim) as f32;
        Ok(())
    }
    fn attention_backward(
        &self,
        _: &mut [f32],
        _: &mut [f32],
        _: &mut [f32],
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: AttnDims,
    ) -> Result<()> {
        refuse("attention_backward")
    }
    fn gather_rows(&self, _: &mut [f32], _: &[f32], _: &[u32], _: usize) -> Result<()> {
        refuse("gather_rows")
    }
    fn scatter_add_rows(&self, _: &mut [f32], _: &[f32], _: &[u32], _: Option<&[f32]>, _: usize) -> Result<()> {
        refuse("scatter_add_rows")
    }
    fn top_k_rows(&self, idx: &mut [u32], _: &mut [f32], _: &[f32], _: usize, _: usize, k: usize) -> Result<()> {
        idx[0] = k as u32;
        Ok(())
    }
    fn adamw_step(&self, p: &mut [f32], _: &[f32], _: &mut [f32], _: &mut [f32], hp: AdamW, step: u64) -> Result<()> {
        p[0] = hp.lr + hp.weight_decay + step as f32;
        Ok(())
    }
}

fn register_backend(r: &mut Registry) -> Result<()> {
    r.register_backend(
        ComponentInfo {
            family: Family::Backend,
            kind: "test-be".into(),
            description: "test backend".into(),
            params: vec![],
            origin: "builtin".into(),
        },
        Arc::new(|_: &Map<String, Value>| Ok(Box::new(TestBackend) as Box<dyn Backend>)),
    )
}

#[test]
fn backend_ops_cross_the_abi_with_optional_buffers_and_panics_caught() {
    let mut reg = Registry::new();
    load_in_process(&mut reg, "be-plugin", "0.1", register_backend).unwrap();
    let b = reg.backend(&json!("test-be")).unwrap();
    assert_eq!(b.name(), "test-be");
    assert_eq!(b.threads(), 3);
    let mut out = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    b.add_bias(&mut out, &[10.0, 20.0, 30.0], 2, 3).unwrap();
    assert_eq!(out, vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    let e = b.add_bias(&mut out, &[1.0], 2, 3).unwrap_err().to_string();
    assert!(
        e.contains("be-plugin") && e.contains("add_bias") && e.contains("bias"),
        "{e}"
    );

    let (mut mean, mut rstd) = (vec![0.0; 1], vec![0.0; 1]);
    b.layer_norm(
        &mut out,
        &mut mean,
        &mut rstd,
        &[0.0; 6],
        Some(&[1.0; 3]),
        None,
        2,
        3,
        1e-5,
    )
    .unwrap();
    assert_eq!(&out[..3], &[3.0, -1.0, 6.0]);
    assert_eq!(mean[0], 1e-5);
    b.layer_norm(&mut out, &mut mean, &mut rstd, &[0.0; 6], None, Some(&[]), 2, 3, 1e-5)
        .unwrap();
    assert_eq!(&out[..2], &[-1.0, 0.0], "absent stays absent, empty stays present");
    let mut dw = vec![0.0; 3];
    b.layer_norm_backward(&mut out, Some(&mut dw), None, &[], &[], &[], &[], None, 2, 3)
        .unwrap();
    assert_eq!(dw, vec![7.0; 3]);

    b.unary(Unary::Silu, &mut out, &[]).unwrap();
    assert_eq!(out[0], 1.0);
    b.unary(Unary::GeluTanh, &mut out, &[]).unwrap();
    assert_eq!(out[0], 2.0);
    let dims = AttnDims {
        batch: 1,
        heads: 2,
        kv_heads: 3,
        q_len: 4,
        kv_len: 5,
        head_dim: 6,
    };
    b.attention(&mut out, &mut [], &[], &[], &[], Some(&[1, 0, 1]), dims)
        .unwrap();
    assert_eq!(&out[..2], &[2.0, 123456.0]);
    b.attention(&mut out, &mut [], &[], &[], &[], None, dims).unwrap();
    assert_eq!(out[0], -1.0);
    let mut idx = vec![0u32; 2];
    b.top_k_rows(&mut idx, &mut [], &[], 1, 1, 9).unwrap();
    assert_eq!(idx[0], 9);
    let hp = AdamW {
        lr: 0.5,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.25,
    };
    b.adamw_step(&mut out, &[], &mut [], &mut [], hp, 3).unwrap();
    assert_eq!(out[0], 3.75);

    let e = b
        .gemm(&mut out, &[], &[], GemmDims::nn(1, 1, 1), 1.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gemm panicked inside the plugin") && e.contains("gemm blew up"),
        "{e}"
    );
    let e = b.sum_rows(&mut out, &[], 1, 1, true).unwrap_err().to_string();
    assert!(e.contains("sum_rows is not supported"), "{e}");
    // The host is fine after a caught panic.
    b.add_bias(&mut out, &[1.0, 1.0, 1.0], 2, 3).unwrap();
}
