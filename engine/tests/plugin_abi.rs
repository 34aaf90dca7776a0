//! The full C-ABI round trip in one process, with test-only components:
//! `plugin::load_in_process` exports a `register` function's components to the
//! C tables and registers them back through the host adapters. Dynamic and
//! static variants must agree bit for bit; misbehaviour must become errors;
//! shortened tables and unknown features must load with their defaults.

use ecdit_engine::plugin::abi::{BackendVtable, PluginDesc, ABI_VERSION};
use ecdit_engine::plugin::abi_v1::{BackendVtableV1, PluginDescV1, RouterVtableV1, SchedulerVtableV1, ABI_VERSION_V1};
use ecdit_engine::plugin::export::Exported;
use ecdit_engine::plugin::host::register_descriptor;
use ecdit_engine::plugin::load_in_process;
#[cfg(feature = "router-kit")]
use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::*;
use rand::{Rng as _, RngCore, SeedableRng};
use serde_json::{json, Map, Value};
use std::ffi::c_char;
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
    fn couples_samples(&self) -> bool {
        false
    }
    fn check_tokens_per_sample(&self, tokens_per_sample: usize) -> Result<()> {
        if tokens_per_sample == 0 {
            return Err(EngineError::param(
                "router 'test-top1'",
                "tokens_per_sample",
                0,
                "must be positive",
            ));
        }
        Ok(())
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
    fn model_time(&self, t: f32) -> Result<f32> {
        if !(0.0..=1.0).contains(&t) {
            return Err(EngineError::Other(format!("t = {t} is outside [0, 1]")));
        }
        Ok(t * 1000.0)
    }
    fn sampling_times(&self, steps: usize) -> Result<Vec<f32>> {
        if steps == 0 {
            return Err(EngineError::Other("0 sampling steps".into()));
        }
        Ok((0..=steps).map(|i| 1.0 - i as f32 / steps as f32).collect())
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

#[test]
fn router_through_the_abi_changes_no_bit() {
    let (stat, dynamic) = fresh(register_top1, "top1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..64 {
        let (samples, tps, experts) = (rng.gen_range(1..4), rng.gen_range(1..10), rng.gen_range(1..7));
        let temp: f32 = rng.gen_range(0.5..2.0);
        let spec = json!({"kind": "test-top1", "temperature": temp});
        let (a, b) = (stat.router(&spec).unwrap(), dynamic.router(&spec).unwrap());
        let shape = RouteShape {
            samples,
            tokens_per_sample: tps,
            experts,
        };
        let scores: Vec<f32> = (0..shape.tokens() * experts)
            .map(|_| rng.gen_range(-3.0..3.0))
            .collect();
        let (ra, rb) = (a.route(&scores, shape).unwrap(), b.route(&scores, shape).unwrap());
        assert_eq!(&ra.dispatch.offsets, &rb.dispatch.offsets);
        assert_eq!(&ra.dispatch.tokens, &rb.dispatch.tokens);
        assert_eq!(bits(&ra.dispatch.gates), bits(&rb.dispatch.gates));
        assert_eq!(bits(&ra.probs), bits(&rb.probs));
        assert_eq!(ra.aux_loss, rb.aux_loss);
        assert_eq!(ra.group_size, rb.group_size);
        assert_eq!(&ra.stats, &rb.stats);
        let gg: Vec<f32> = (0..ra.dispatch.slots()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut ga = vec![0.0; scores.len()];
        let mut gb = vec![1.0; scores.len()];
        a.backward(&ra, &scores, &gg, 0.5, &mut ga).unwrap();
        b.backward(&rb, &scores, &gg, 0.5, &mut gb).unwrap();
        assert_eq!(bits(&ga), bits(&gb));
    }
    // The ABI 2 hints cross too.
    let b = dynamic.router(&json!("test-top1")).unwrap();
    assert!(!b.couples_samples());
    assert!(b.check_tokens_per_sample(4).is_ok());
    let e = b.check_tokens_per_sample(0).unwrap_err().to_string();
    assert!(
        e.contains("top1") && e.contains("check_tokens_per_sample") && e.contains("must be positive"),
        "{e}"
    );
}

#[cfg(feature = "router-kit")]
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

#[cfg(feature = "router-kit")]
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
    assert_eq!(bits(&a.sampling_times(9).unwrap()), bits(&b.sampling_times(9).unwrap()));
    assert_eq!(
        a.model_time(0.37).unwrap().to_bits(),
        b.model_time(0.37).unwrap().to_bits()
    );
    // Errors of the now fallible methods cross with the plugin's name.
    let e = b.model_time(2.0).unwrap_err().to_string();
    assert!(
        e.contains("flow") && e.contains("model_time") && e.contains("outside"),
        "{e}"
    );
    let e = b.sampling_times(0).unwrap_err().to_string();
    assert!(e.contains("sampling_times") && e.contains("0 sampling steps"), "{e}");
    // Errors cross the boundary with the plugin's name.
    let e = b.add_noise(&mut xb, &x0[..3], &noise, 0.3).unwrap_err().to_string();
    assert!(
        e.contains("flow") && e.contains("add_noise") && e.contains("3 elements"),
        "{e}"
    );
}

// ------------------------------------------------------------------ test backend

/// A host-memory f32 backend with a few real ops, a few that report what
/// arrived (so optional tensors are seen to survive the ABI), one that panics,
/// and the rest refusing.
struct TestBackend;

fn refuse(op: &str) -> Result<()> {
    Err(EngineError::Backend {
        backend: "test".into(),
        reason: format!("{op} is not supported"),
    })
}

fn f32s<'a>(t: TensorRef<'a>) -> Result<&'a [f32]> {
    t.host::<f32>()
}

impl Backend for TestBackend {
    fn name(&self) -> &str {
        "test-be"
    }
    fn threads(&self) -> usize {
        3
    }
    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::U8
    }
    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        Ok(Buffer::new(Box::new(HostStorage::zeroed(bytes)?), "test-be"))
    }
    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        error::check_len("upload", "src bytes", src.len(), dst.byte_len())?;
        let n = dst.numel();
        let bytes = match dst.dtype() {
            DType::F32 => bytemuck::cast_slice_mut::<f32, u8>(dst.host_mut::<f32>()?),
            DType::U32 => bytemuck::cast_slice_mut::<u32, u8>(dst.host_mut::<u32>()?),
            DType::U8 => dst.host_mut::<u8>()?,
            DType::BF16 => bytemuck::cast_slice_mut::<bf16, u8>(dst.host_mut::<bf16>()?),
        };
        let _ = n;
        bytes.copy_from_slice(src);
        Ok(())
    }
    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        error::check_len("download", "dst bytes", dst.len(), src.byte_len())?;
        let bytes: &[u8] = match src.dtype() {
            DType::F32 => bytemuck::cast_slice(src.host::<f32>()?),
            DType::U32 => bytemuck::cast_slice(src.host::<u32>()?),
            DType::U8 => src.host::<u8>()?,
            DType::BF16 => bytemuck::cast_slice(src.host::<bf16>()?),
        };
        dst.copy_from_slice(bytes);
        Ok(())
    }
    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        src.expect_len("copy", "src", dst.numel())?;
        dst.host_mut::<f32>()?.copy_from_slice(f32s(src)?);
        Ok(())
    }
    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        dst.host_mut::<f32>()?.fill(value);
        Ok(())
    }
    fn gemm(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        d: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if d.m == 99 {
            panic!("gemm blew up");
        }
        out.expect_len("gemm", "out", d.m * d.n)?;
        a.expect_len("gemm", "a", d.m * d.k)?;
        b.expect_len("gemm", "b", d.k * d.n)?;
        let (o, a, b) = (out.host_mut::<f32>()?, f32s(a)?, f32s(b)?);
        let bias = bias.map(f32s).transpose()?;
        for i in 0..d.m {
            for j in 0..d.n {
                let mut acc = 0.0f32;
                for p in 0..d.k {
                    let x = if d.trans_a { a[p * d.m + i] } else { a[i * d.k + p] };
                    let y = if d.trans_b { b[j * d.k + p] } else { b[p * d.n + j] };
                    acc += x * y;
                }
                let prev = if beta != 0.0 { beta * o[i * d.n + j] } else { 0.0 };
                o[i * d.n + j] = alpha * acc + prev + bias.map_or(0.0, |b| b[j]);
            }
        }
        Ok(())
    }
    fn gemm_batched(
        &self,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: usize,
        _: GemmDims,
        _: f32,
        _: f32,
    ) -> Result<()> {
        refuse("gemm_batched")
    }
    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        let (o, i) = (out.host_mut::<f32>()?, f32s(inp)?);
        if i.is_empty() || o.len() % i.len() != 0 {
            return Err(EngineError::shape(
                "add_broadcast (inp)",
                format!("a divisor of {}", o.len()),
                i.len(),
            ));
        }
        for (k, v) in o.iter_mut().enumerate() {
            *v += i[k % i.len()];
        }
        Ok(())
    }
    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        x.expect_len("axpby", "x", y.numel())?;
        for (y, &x) in y.host_mut::<f32>()?.iter_mut().zip(f32s(x)?) {
            *y = a * x + b * *y;
        }
        Ok(())
    }
    fn sum_rows(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: usize, _: usize, _: bool) -> Result<()> {
        refuse("sum_rows")
    }
    fn softmax_rows(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: usize, _: usize) -> Result<()> {
        refuse("softmax_rows")
    }
    fn softmax_rows_backward(
        &self,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: usize,
        _: usize,
    ) -> Result<()> {
        refuse("softmax_rows_backward")
    }
    fn layer_norm(
        &self,
        out: TensorMut<'_>,
        mean: TensorMut<'_>,
        _: TensorMut<'_>,
        inp: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        bias: Option<TensorRef<'_>>,
        _: usize,
        _: usize,
        eps: f32,
    ) -> Result<()> {
        // Reports what arrived, so the test sees optional tensors survive.
        let o = out.host_mut::<f32>()?;
        o[0] = weight.map_or(-1.0, |w| w.numel() as f32);
        o[1] = bias.map_or(-1.0, |b| b.numel() as f32);
        o[2] = inp.numel() as f32;
        mean.host_mut::<f32>()?[0] = eps;
        Ok(())
    }
    fn layer_norm_backward(
        &self,
        _: TensorMut<'_>,
        dweight: Option<TensorMut<'_>>,
        _: Option<TensorMut<'_>>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: Option<TensorRef<'_>>,
        _: usize,
        _: usize,
    ) -> Result<()> {
        if let Some(d) = dweight {
            d.host_mut::<f32>()?.fill(7.0);
        }
        Ok(())
    }
    fn unary(&self, op: Unary, out: TensorMut<'_>, _: TensorRef<'_>) -> Result<()> {
        out.host_mut::<f32>()?[0] = if op == Unary::Silu { 1.0 } else { 2.0 };
        Ok(())
    }
    fn unary_backward(&self, _: Unary, _: TensorMut<'_>, _: TensorRef<'_>, _: TensorRef<'_>) -> Result<()> {
        refuse("unary_backward")
    }
    fn modulate(&self, out: TensorMut<'_>, _: TensorRef<'_>, _: TensorRef<'_>, w: ModChunks, d: RowDims) -> Result<()> {
        out.host_mut::<f32>()?[0] =
            (w.chunks * 100 + w.first * 10 + w.second) as f32 + (d.batch * 100 + d.tokens * 10 + d.d) as f32 * 1000.0;
        Ok(())
    }
    fn modulate_backward(
        &self,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: ModChunks,
        _: RowDims,
    ) -> Result<()> {
        refuse("modulate_backward")
    }
    fn gated_residual(
        &self,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: ModChunks,
        _: RowDims,
    ) -> Result<()> {
        refuse("gated_residual")
    }
    fn gated_residual_backward(
        &self,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: ModChunks,
        _: RowDims,
    ) -> Result<()> {
        refuse("gated_residual_backward")
    }
    fn patchify(&self, out: TensorMut<'_>, _: TensorRef<'_>, d: PatchDims) -> Result<()> {
        out.host_mut::<f32>()?[0] = if d.channels_fastest { 1.0 } else { 0.0 } + d.patch as f32 * 10.0;
        Ok(())
    }
    fn unpatchify(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: PatchDims) -> Result<()> {
        refuse("unpatchify")
    }
    fn timestep_features(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: usize, _: f32) -> Result<()> {
        refuse("timestep_features")
    }
    fn attention(
        &self,
        out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        d: AttnDims,
    ) -> Result<()> {
        let o = out.host_mut::<f32>()?;
        o[0] = key_mask.map_or(Ok(-1.0), |m| m.host::<u8>().map(|m| m.iter().map(|&b| b as f32).sum()))?;
        o[1] = (d.batch * 100000 + d.heads * 10000 + d.kv_heads * 1000 + d.q_len * 100 + d.kv_len * 10 + d.head_dim)
            as f32;
        o[2] = probs.map_or(-1.0, |p| p.numel() as f32);
        Ok(())
    }
    fn attention_backward(
        &self,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: AttnDims,
    ) -> Result<()> {
        refuse("attention_backward")
    }
    fn gather_rows(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: TensorRef<'_>, _: usize) -> Result<()> {
        refuse("gather_rows")
    }
    fn scatter_add_rows(
        &self,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: Option<TensorRef<'_>>,
        _: usize,
    ) -> Result<()> {
        refuse("scatter_add_rows")
    }
    fn gather_dot(
        &self,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: TensorRef<'_>,
        _: usize,
    ) -> Result<()> {
        refuse("gather_dot")
    }
    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: usize,
        _: usize,
        k: usize,
    ) -> Result<()> {
        idx.host_mut::<u32>()?[0] = k as u32;
        Ok(())
    }
    fn router_softmax(&self, _: TensorMut<'_>, _: TensorRef<'_>, _: usize, _: usize) -> Result<()> {
        refuse("router_softmax")
    }
    fn top_k_tokens(
        &self,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        _: TensorRef<'_>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        refuse("top_k_tokens")
    }
    fn adamw_step(
        &self,
        p: TensorMut<'_>,
        _: TensorRef<'_>,
        _: TensorMut<'_>,
        _: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        p.host_mut::<f32>()?[0] = hp.lr + hp.weight_decay + step as f32;
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
fn backend_ops_cross_the_abi_with_buffers_optional_tensors_and_panics_caught() {
    let mut reg = Registry::new();
    let info = load_in_process(&mut reg, "be-plugin", "0.1", register_backend).unwrap();
    assert_eq!(info.abi_version, ABI_VERSION);
    assert!(info.features.iter().any(|f| f == "tensors"), "{:?}", info.features);
    let b = reg.backend(&json!("test-be")).unwrap();
    assert_eq!((b.name(), b.threads()), ("test-be", 3));
    assert!(b.supports(DType::BF16) && !b.supports(DType::U8));
    // Buffers: the plugin's host memory is announced as such.
    let mut out = b
        .upload_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32)
        .unwrap();
    assert!(out.buffer().is_host());
    let bias = b.upload_f32(&[3], &[10.0, 20.0, 30.0], DType::F32).unwrap();
    b.add_broadcast(out.view_mut(), bias.view()).unwrap();
    assert_eq!(
        b.read_f32(out.view()).unwrap(),
        vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]
    );
    // Views with offsets cross as such.
    b.fill(out.view_mut().rows(1, 1).unwrap(), 0.5).unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap(), vec![11.0, 22.0, 33.0, 0.5, 0.5, 0.5]);
    let short = b.upload_f32(&[4], &[1.0; 4], DType::F32).unwrap();
    let e = b.add_broadcast(out.view_mut(), short.view()).unwrap_err().to_string();
    assert!(
        e.contains("be-plugin") && e.contains("add_broadcast") && e.contains("inp"),
        "{e}"
    );
    let idx = b.upload_u32(&[2], &[4, 5]).unwrap();
    assert_eq!(b.read_u32(idx.view()).unwrap(), vec![4, 5]);

    let (mut mean, mut rstd) = (b.zeros(&[1], DType::F32).unwrap(), b.zeros(&[1], DType::F32).unwrap());
    let (w3, inp) = (b.zeros(&[3], DType::F32).unwrap(), b.zeros(&[6], DType::F32).unwrap());
    b.layer_norm(
        out.view_mut(),
        mean.view_mut(),
        rstd.view_mut(),
        inp.view(),
        Some(w3.view()),
        None,
        2,
        3,
        1e-5,
    )
    .unwrap();
    assert_eq!(&b.read_f32(out.view()).unwrap()[..3], &[3.0, -1.0, 6.0]);
    assert_eq!(b.read_f32(mean.view()).unwrap(), vec![1e-5]);
    let mut dw = b.zeros(&[3], DType::F32).unwrap();
    b.layer_norm_backward(
        out.view_mut(),
        Some(dw.view_mut()),
        None,
        inp.view(),
        inp.view(),
        mean.view(),
        rstd.view(),
        None,
        2,
        3,
    )
    .unwrap();
    assert_eq!(b.read_f32(dw.view()).unwrap(), vec![7.0; 3]);
    b.unary(Unary::Silu, out.view_mut(), inp.view()).unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap()[0], 1.0);
    let which = ModChunks {
        chunks: 6,
        first: 1,
        second: 2,
    };
    b.modulate(
        out.view_mut(),
        inp.view(),
        inp.view(),
        which,
        RowDims {
            batch: 1,
            tokens: 2,
            d: 3,
        },
    )
    .unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap()[0], 612.0 + 123_000.0);
    let pd = PatchDims {
        batch: 1,
        channels: 1,
        height: 2,
        width: 2,
        patch: 2,
        channels_fastest: true,
    };
    b.patchify(out.view_mut(), inp.view(), pd).unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap()[0], 21.0);
    let dims = AttnDims {
        batch: 1,
        heads: 2,
        kv_heads: 3,
        q_len: 4,
        kv_len: 5,
        head_dim: 6,
    };
    let mask = b.upload_u8(&[3], &[1, 0, 1]).unwrap();
    let mut probs = b.zeros(&[4], DType::F32).unwrap();
    b.attention(
        out.view_mut(),
        Some(probs.view_mut()),
        inp.view(),
        inp.view(),
        inp.view(),
        Some(mask.view()),
        dims,
    )
    .unwrap();
    assert_eq!(&b.read_f32(out.view()).unwrap()[..3], &[2.0, 123456.0, 4.0]);
    b.attention(out.view_mut(), None, inp.view(), inp.view(), inp.view(), None, dims)
        .unwrap();
    assert_eq!(
        &b.read_f32(out.view()).unwrap()[..3],
        &[-1.0, 123456.0, -1.0],
        "absent stays absent"
    );
    let mut topi = b.zeros(&[2], DType::U32).unwrap();
    b.top_k_rows(topi.view_mut(), out.view_mut(), inp.view(), 1, 1, 9)
        .unwrap();
    assert_eq!(b.read_u32(topi.view()).unwrap()[0], 9);
    let hp = AdamW {
        lr: 0.5,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.25,
    };
    b.adamw_step(out.view_mut(), inp.view(), mean.view_mut(), rstd.view_mut(), hp, 3)
        .unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap()[0], 3.75);

    let mut big = b.zeros(&[99], DType::F32).unwrap();
    let e = b
        .gemm(
            big.view_mut(),
            inp.view(),
            inp.view(),
            None,
            GemmDims::nn(99, 1, 1),
            1.0,
            0.0,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gemm panicked inside the plugin") && e.contains("gemm blew up"),
        "{e}"
    );
    let e = b
        .sum_rows(out.view_mut(), inp.view(), 1, 1, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sum_rows is not supported"), "{e}");
    // A tensor of another backend never reaches the plugin.
    let foreign = Buffer::new(Box::new(HostStorage::zeroed(12).unwrap()), "host");
    let mut foreign = Tensor::from_buffer(foreign, &[3], DType::F32).unwrap();
    let e = b.fill(foreign.view_mut(), 1.0).unwrap_err().to_string();
    assert!(e.contains("backend 'host'"), "{e}");
    // The host is fine after a caught panic.
    b.add_broadcast(out.view_mut(), bias.view()).unwrap();
}

/// The exported tables of `register`, with the backend table rewritten by
/// `edit` and the descriptor's features replaced: what an older or newer
/// plugin build would hand the host.
fn edited_descriptor(
    register: fn(&mut Registry) -> Result<()>,
    edit: impl FnOnce(&mut BackendVtable),
    features: &'static [&'static [u8]],
) -> &'static PluginDesc {
    let exported: &'static Exported = Box::leak(Box::new(Exported::new("edited", "0.0.1", register).unwrap()));
    // SAFETY: the descriptor lives forever (leaked); tables are copied, not mutated.
    let mut desc = unsafe { *exported.descriptor() };
    let mut table = unsafe { **desc.backends };
    edit(&mut table);
    let table: &'static BackendVtable = Box::leak(Box::new(table));
    let list: &'static [*const BackendVtable] = Box::leak(vec![table as *const BackendVtable].into_boxed_slice());
    desc.backends = list.as_ptr();
    let mut names: Vec<*const c_char> = features.iter().map(|f| f.as_ptr() as *const c_char).collect();
    names.push(std::ptr::null());
    desc.features = Box::leak(names.into_boxed_slice()).as_ptr();
    Box::leak(Box::new(desc))
}

#[test]
fn a_shorter_backend_table_loads_and_its_missing_slots_take_their_defaults() {
    // As if built against an ABI 2 header that ended before gemm_grouped.
    let desc = edited_descriptor(
        register_backend,
        |t| t.struct_size = std::mem::offset_of!(BackendVtable, gemm_grouped) as u32,
        &[b"tensors\0"],
    );
    let mut reg = Registry::new();
    unsafe { register_descriptor(&mut reg, desc, "short") }.unwrap();
    let b = reg.backend(&json!("test-be")).unwrap();
    // gemm_grouped lies beyond: the trait's default loop of gemm runs.
    let a = b
        .upload_f32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32)
        .unwrap();
    let w = b.upload_f32(&[2, 1, 2], &[1.0, 1.0, 2.0, -1.0], DType::F32).unwrap();
    let mut out = b.zeros(&[3, 1], DType::F32).unwrap();
    b.gemm_grouped(out.view_mut(), a.view(), w.view(), &[1, 2], 1, 2, true, 1.0, 0.0)
        .unwrap();
    assert_eq!(b.read_f32(out.view()).unwrap(), vec![3.0, 2.0, 4.0]);
    // Everything after it too: no default, so a clear error naming plugin and op.
    let (mut m, mut v) = (b.zeros(&[3], DType::F32).unwrap(), b.zeros(&[3], DType::F32).unwrap());
    let hp = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let e = b.adamw_step(out.view_mut(), a.view(), m.view_mut(), v.view_mut(), hp, 1);
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("plugin 'edited'") && e.contains("does not implement op adamw_step"),
        "{e}"
    );
    // Slots inside the table still work.
    b.fill(m.view_mut(), 2.5).unwrap();
    assert_eq!(b.read_f32(m.view()).unwrap(), vec![2.5; 3]);
}

#[test]
fn null_optional_slots_take_their_defaults_and_unknown_features_are_tolerated() {
    let desc = edited_descriptor(
        register_backend,
        |t| {
            t.threads = None;
            t.supports = None;
            t.buffer_host_ptr = None;
            t.gemm_grouped = None;
            t.softmax_rows = None;
        },
        &[b"tensors\0", b"quantum-entanglement\0", b"experts-v7\0"],
    );
    let mut reg = Registry::new();
    let info = unsafe { register_descriptor(&mut reg, desc, "nulls") }.unwrap();
    assert_eq!(info.features, vec!["tensors", "quantum-entanglement", "experts-v7"]);
    let b = reg.backend(&json!("test-be")).unwrap();
    assert_eq!(b.threads(), 1, "threads: default 1");
    assert!(
        b.supports(DType::U8) && !b.supports(DType::BF16),
        "supports: the trait's default"
    );
    let t = b.upload_f32(&[2], &[1.0, 2.0], DType::F32).unwrap();
    assert!(!t.buffer().is_host(), "buffer_host_ptr absent: not host memory");
    assert!(t.view().host::<f32>().is_err());
    assert_eq!(b.read_f32(t.view()).unwrap(), vec![1.0, 2.0]);
    let mut o = b.zeros(&[2], DType::F32).unwrap();
    let e = b.softmax_rows(o.view_mut(), t.view(), 1, 2).unwrap_err().to_string();
    assert!(e.contains("does not implement op softmax_rows"), "{e}");
}

#[test]
fn a_backend_table_without_a_required_slot_is_refused() {
    let desc = edited_descriptor(register_backend, |t| t.download = None, &[]);
    let mut reg = Registry::new();
    let e = unsafe { register_descriptor(&mut reg, desc, "no-download") }
        .unwrap_err()
        .to_string();
    assert!(e.contains("backend 'test-be'") && e.contains("null: download"), "{e}");
    assert!(reg.list().is_empty());
}

// ------------------------------------------------------------------ test expert

/// Expert e maps its rows through one `[d, d]` matrix: `out = x @ W[e]^T`.
/// Forward caches a copy of x (made through the backend) so backward proves
/// the cache came back; `panic_at` makes forward panic for that d.
struct TestLinear {
    panic_at: usize,
}

impl Expert for TestLinear {
    fn kind(&self) -> &str {
        "test-linear"
    }
    fn spec(&self) -> Value {
        json!({"kind": "test-linear", "panic_at": self.panic_at})
    }
    fn hidden(&self, d: usize) -> usize {
        d
    }
    fn param_shapes(&self, d: usize, experts: usize) -> Vec<ParamShape> {
        vec![
            ParamShape {
                name: "w".into(),
                shape: vec![experts, d, d],
                layout: Layout::AsStored,
                init: Init::XavierUniform { fan_in: d, fan_out: d },
            },
            // Unused by the maths; here so every layout and init crosses.
            ParamShape {
                name: "extra".into(),
                shape: vec![3 * d, d],
                layout: Layout::InputMajorChunks(3),
                init: Init::Normal(0.02),
            },
        ]
    }
    fn flops_per_token(&self, d: usize) -> f64 {
        2.0 * (d * d) as f64
    }
    fn forward(
        &self,
        backend: &dyn Backend,
        mut out: TensorMut<'_>,
        cache: &mut ExpertCache,
        keep: bool,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        if d == self.panic_at {
            panic!("expert exploded on purpose");
        }
        for e in 0..offsets.len() - 1 {
            let (r0, n) = (offsets[e], offsets[e + 1] - offsets[e]);
            if n > 0 {
                let w = params[0].rows(e, 1)?.reshape(&[d, d])?;
                backend.gemm(
                    out.reborrow().rows(r0, n)?,
                    x.rows(r0, n)?,
                    w,
                    None,
                    GemmDims::nt(n, d, d),
                    1.0,
                    0.0,
                )?;
            }
        }
        if keep {
            let mut copy = backend.zeros(x.shape(), x.dtype())?;
            backend.copy(copy.view_mut(), x)?;
            cache.tensors = vec![copy];
        }
        Ok(())
    }
    fn backward(
        &self,
        backend: &dyn Backend,
        mut dx: TensorMut<'_>,
        dparams: &mut [TensorMut<'_>],
        dout: TensorRef<'_>,
        cache: &ExpertCache,
        _x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        let xc = cache
            .tensors
            .first()
            .ok_or_else(|| EngineError::Other("no cache".into()))?
            .view();
        for e in 0..offsets.len() - 1 {
            let (r0, n) = (offsets[e], offsets[e + 1] - offsets[e]);
            if n > 0 {
                let w = params[0].rows(e, 1)?.reshape(&[d, d])?;
                backend.gemm(
                    dx.reborrow().rows(r0, n)?,
                    dout.rows(r0, n)?,
                    w,
                    None,
                    GemmDims::nn(n, d, d),
                    1.0,
                    0.0,
                )?;
                let dw = dparams[0].reborrow().rows(e, 1)?.reshape(&[d, d])?;
                backend.gemm(
                    dw,
                    dout.rows(r0, n)?,
                    xc.rows(r0, n)?,
                    None,
                    GemmDims::tn(d, d, n),
                    1.0,
                    1.0,
                )?;
            }
        }
        Ok(())
    }
}

fn register_linear(r: &mut Registry) -> Result<()> {
    r.register_expert(
        ComponentInfo {
            family: Family::Expert,
            kind: "test-linear".into(),
            description: "test expert".into(),
            params: vec![ParamInfo::new(
                "panic_at",
                ParamType::Int,
                Some(json!(0)),
                "d that panics",
            )],
            origin: "builtin".into(),
        },
        Arc::new(|p: &Map<String, Value>| {
            let panic_at = spec::get::<usize>("expert 'test-linear'", p, "panic_at")?;
            Ok(Box::new(TestLinear { panic_at }) as Box<dyn Expert>)
        }),
    )
}

/// Runs forward (training and inference) and backward of `expert` on
/// `backend`; returns (out, cache count, dx, dw) as bits.
fn run_expert(expert: &dyn Expert, backend: &dyn Backend, seed: u64) -> (Vec<u32>, usize, Vec<u32>, Vec<u32>) {
    let (experts, d, offsets) = (3, 4, [0usize, 2, 2, 5]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rand_t = |dims: &[usize]| {
        let data: Vec<f32> = (0..dims.iter().product()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        backend.upload_f32(dims, &data, DType::F32).unwrap()
    };
    let (x, w, dout) = (rand_t(&[5, d]), rand_t(&[experts, d, d]), rand_t(&[5, d]));
    let mut out = backend.zeros(&[5, d], DType::F32).unwrap();
    let mut cache = ExpertCache::default();
    expert
        .forward(
            backend,
            out.view_mut(),
            &mut cache,
            true,
            x.view(),
            &[w.view()],
            &offsets,
            d,
        )
        .unwrap();
    let mut out_inference = backend.zeros(&[5, d], DType::F32).unwrap();
    expert
        .forward(
            backend,
            out_inference.view_mut(),
            &mut ExpertCache::default(),
            false,
            x.view(),
            &[w.view()],
            &offsets,
            d,
        )
        .unwrap();
    assert_eq!(
        backend.read_f32(out.view()).unwrap(),
        backend.read_f32(out_inference.view()).unwrap()
    );
    let mut dx = backend.zeros(&[5, d], DType::F32).unwrap();
    let mut dw = rand_t(&[experts, d, d]); // backward accumulates
    expert
        .backward(
            backend,
            dx.view_mut(),
            &mut [dw.view_mut()],
            dout.view(),
            &cache,
            x.view(),
            &[w.view()],
            &offsets,
            d,
        )
        .unwrap();
    let read = |t: &Tensor| bits(&backend.read_f32(t.view()).unwrap());
    (read(&out), cache.tensors.len(), read(&dx), read(&dw))
}

#[test]
fn an_expert_through_the_abi_drives_the_host_backend_and_changes_no_bit() {
    let (stat, dynamic) = fresh(register_linear, "linear-plugin");
    let info = &dynamic.list()[0];
    assert_eq!((info.family, info.kind.as_str()), (Family::Expert, "test-linear"));
    let (a, b) = (
        stat.expert(&json!("test-linear")).unwrap(),
        dynamic.expert(&json!("test-linear")).unwrap(),
    );
    assert_eq!(a.spec(), b.spec());
    assert_eq!(
        (a.hidden(8), a.flops_per_token(8).to_bits()),
        (b.hidden(8), b.flops_per_token(8).to_bits())
    );
    assert_eq!(
        a.param_shapes(4, 3),
        b.param_shapes(4, 3),
        "every layout and init crosses"
    );
    // On a backend the host links statically (lent to the plugin expert)...
    let backend = TestBackend;
    for seed in 0..4 {
        let (sa, sb) = (run_expert(&*a, &backend, seed), run_expert(&*b, &backend, seed));
        assert_eq!(sa, sb);
        assert_eq!(sb.1, 1, "the cached tensor came back to the host");
    }
    // ...and on a plugin backend: the expert's ops cross the ABI twice.
    let mut reg = Registry::new();
    load_in_process(&mut reg, "be-plugin", "0.1", register_backend).unwrap();
    let plugin_backend = reg.backend(&json!("test-be")).unwrap();
    assert_eq!(run_expert(&*a, &backend, 9), run_expert(&*b, &*plugin_backend, 9));
}

#[test]
fn an_expert_panic_is_an_error_naming_the_plugin() {
    let mut reg = Registry::new();
    load_in_process(&mut reg, "linear-plugin", "0.1", register_linear).unwrap();
    let e = reg.expert(&json!({"kind": "test-linear", "panic_at": 2})).unwrap();
    let backend = TestBackend;
    let x = backend.zeros(&[1, 2], DType::F32).unwrap();
    let w = backend.zeros(&[1, 2, 2], DType::F32).unwrap();
    let mut out = backend.zeros(&[1, 2], DType::F32).unwrap();
    let mut cache = ExpertCache::default();
    let err = e
        .forward(
            &backend,
            out.view_mut(),
            &mut cache,
            true,
            x.view(),
            &[w.view()],
            &[0, 1],
            2,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linear-plugin") && err.contains("forward panicked") && err.contains("exploded"),
        "{err}"
    );
    assert!(cache.tensors.is_empty());
}

// ------------------------------------------------------------------ ABI 1 descriptors

/// `register`'s routers and schedulers as an ABI 1 descriptor: the exported
/// ABI 2 tables copied field by field into the frozen ABI 1 layouts, as a
/// library built against `ecdit_plugin_v1.h` would hand them over.
fn v1_descriptor(register: fn(&mut Registry) -> Result<()>, with_backend: bool) -> &'static PluginDescV1 {
    let exported: &'static Exported = Box::leak(Box::new(Exported::new("old-lib", "0.9.0", register).unwrap()));
    // SAFETY: the descriptor and its tables live forever (leaked).
    let d = unsafe { &*exported.descriptor() };
    let routers: Vec<*const RouterVtableV1> = (0..d.n_routers)
        .map(|i| {
            let t = unsafe { **d.routers.add(i) };
            let v1 = RouterVtableV1 {
                abi_version: ABI_VERSION_V1,
                struct_size: std::mem::size_of::<RouterVtableV1>() as u32,
                kind: t.kind,
                description: t.description,
                params_json: t.params_json,
                ctx: t.ctx,
                create: t.create,
                destroy: t.destroy,
                route: t.route,
                free_result: t.free_result,
                backward: t.backward,
            };
            Box::leak(Box::new(v1)) as *const RouterVtableV1
        })
        .collect();
    let schedulers: Vec<*const SchedulerVtableV1> = (0..d.n_schedulers)
        .map(|i| {
            let t = unsafe { **d.schedulers.add(i) };
            let v1 = SchedulerVtableV1 {
                abi_version: ABI_VERSION_V1,
                struct_size: std::mem::size_of::<SchedulerVtableV1>() as u32,
                kind: t.kind,
                description: t.description,
                params_json: t.params_json,
                ctx: t.ctx,
                create: t.create,
                destroy: t.destroy,
                draw_t: t.draw_t,
                add_noise: t.add_noise,
                target: t.target,
                model_time: t.model_time,
                sampling_times: t.sampling_times,
                step: t.step,
            };
            Box::leak(Box::new(v1)) as *const SchedulerVtableV1
        })
        .collect();
    // A v1 backend table: only its presence matters (the host refuses it unread).
    let backend: &'static [u8; 256] = Box::leak(Box::new([0u8; 256]));
    let backends: &'static [*const BackendVtableV1] = Box::leak(Box::new([backend.as_ptr() as *const BackendVtableV1]));
    let (routers, schedulers) = (
        Box::leak(routers.into_boxed_slice()),
        Box::leak(schedulers.into_boxed_slice()),
    );
    Box::leak(Box::new(PluginDescV1 {
        abi_version: ABI_VERSION_V1,
        struct_size: std::mem::size_of::<PluginDescV1>() as u32,
        name: d.name,
        version: d.version,
        n_routers: routers.len(),
        routers: routers.as_ptr(),
        n_schedulers: schedulers.len(),
        schedulers: schedulers.as_ptr(),
        n_backends: with_backend as usize,
        backends: backends.as_ptr(),
    }))
}

#[test]
fn v1_router_and_scheduler_descriptors_load_and_change_no_bit() {
    fn both(r: &mut Registry) -> Result<()> {
        register_top1(r)?;
        register_flow(r)
    }
    let mut stat = Registry::new();
    both(&mut stat).unwrap();
    let mut reg = Registry::new();
    let desc = v1_descriptor(both, false) as *const PluginDescV1 as *const PluginDesc;
    let info = unsafe { register_descriptor(&mut reg, desc, "v1-in-process") }.unwrap();
    assert_eq!((info.abi_version, info.components.len()), (ABI_VERSION_V1, 2));
    let (a, b) = (
        stat.router(&json!("test-top1")).unwrap(),
        reg.router(&json!("test-top1")).unwrap(),
    );
    let shape = RouteShape {
        samples: 2,
        tokens_per_sample: 5,
        experts: 3,
    };
    let scores: Vec<f32> = (0..30).map(|i| (i as f32 * 0.7).sin()).collect();
    let (ra, rb) = (a.route(&scores, shape).unwrap(), b.route(&scores, shape).unwrap());
    assert_eq!((&ra.dispatch, bits(&ra.probs)), (&rb.dispatch, bits(&rb.probs)));
    // ABI 1 carries no hints: the defaults, whatever the router says statically.
    assert!(!a.couples_samples() && b.couples_samples());
    assert!(b.check_tokens_per_sample(0).is_ok());
    let (sa, sb) = (
        stat.scheduler(&json!("test-flow")).unwrap(),
        reg.scheduler(&json!("test-flow")).unwrap(),
    );
    let (mut ga, mut gb) = (
        rand::rngs::StdRng::seed_from_u64(3),
        rand::rngs::StdRng::seed_from_u64(3),
    );
    assert_eq!(sa.draw_t(&mut ga).to_bits(), sb.draw_t(&mut gb).to_bits());
    assert_eq!(
        bits(&sa.sampling_times(4).unwrap()),
        bits(&sb.sampling_times(4).unwrap())
    );
}

#[test]
fn a_v1_descriptor_with_a_backend_is_refused_whole_naming_both_versions() {
    let mut reg = Registry::new();
    let desc = v1_descriptor(register_top1, true) as *const PluginDescV1 as *const PluginDesc;
    let e = unsafe { register_descriptor(&mut reg, desc, "v1-backend") }
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("version 1") && e.contains("version 2") && e.contains("backend"),
        "{e}"
    );
    assert!(reg.list().is_empty(), "its routers are refused too");
}

// ------------------------------------------------------------------ misbehaving C experts

use ecdit_engine::plugin::abi::{BackendRef, ErrBuf, ExpertVtable, TensorDesc, TensorSink, UNARY_SILU};
use std::ffi::c_void;
use std::sync::OnceLock;

type ForwardFn = unsafe extern "C" fn(
    *mut c_void,
    *const BackendRef,
    *const TensorDesc,
    *const TensorSink,
    *const TensorDesc,
    *const TensorDesc,
    usize,
    *const usize,
    usize,
    usize,
    *mut ErrBuf,
) -> i32;

/// The exported `test-linear` forward, for wrappers that call it with bad arguments.
static LINEAR_FORWARD: OnceLock<ForwardFn> = OnceLock::new();

/// `test-linear` exported, its table rewritten by `edit`: what a C expert
/// breaking the rules would hand the host.
fn edited_expert(edit: impl FnOnce(&mut ExpertVtable)) -> &'static PluginDesc {
    let exported: &'static Exported =
        Box::leak(Box::new(Exported::new("bad-expert", "0.0.1", register_linear).unwrap()));
    // SAFETY: the descriptor lives forever (leaked); tables are copied, not mutated.
    let mut desc = unsafe { *exported.descriptor() };
    let mut table = unsafe { **desc.experts };
    let _ = LINEAR_FORWARD.set(table.forward.unwrap());
    edit(&mut table);
    let table: &'static ExpertVtable = Box::leak(Box::new(table));
    let list: &'static [*const ExpertVtable] = Box::leak(vec![table as *const ExpertVtable].into_boxed_slice());
    desc.experts = list.as_ptr();
    Box::leak(Box::new(desc))
}

/// Runs forward (keeping a cache) of the edited expert on `[2, 2]` tensors;
/// returns the error and proves the host's tensors survived.
fn forward_error(edit: impl FnOnce(&mut ExpertVtable)) -> String {
    let mut reg = Registry::new();
    unsafe { register_descriptor(&mut reg, edited_expert(edit), "bad-expert") }.unwrap();
    let e = reg.expert(&json!("test-linear")).unwrap();
    let backend = TestBackend;
    let x = backend.upload_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0], DType::F32).unwrap();
    let w = backend.zeros(&[1, 2, 2], DType::F32).unwrap();
    let mut out = backend.zeros(&[2, 2], DType::F32).unwrap();
    let mut cache = ExpertCache::default();
    let err = e
        .forward(
            &backend,
            out.view_mut(),
            &mut cache,
            true,
            x.view(),
            &[w.view()],
            &[0, 2],
            2,
        )
        .unwrap_err()
        .to_string();
    assert!(cache.tensors.is_empty());
    assert_eq!(backend.read_f32(x.view()).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    err
}

/// Copies row 0 of `out` into row 1 (disjoint views of one buffer: fine),
/// then runs silu on `out` in place (refused).
unsafe extern "C" fn forward_in_place(
    _: *mut c_void,
    backend: *const BackendRef,
    out: *const TensorDesc,
    _: *const TensorSink,
    _: *const TensorDesc,
    _: *const TensorDesc,
    _: usize,
    _: *const usize,
    _: usize,
    _: usize,
    err: *mut ErrBuf,
) -> i32 {
    let (vt, h) = (&*(*backend).vtable, (*backend).handle);
    let mut rows = [*out, *out];
    rows[0].dims[0] = 1;
    rows[1].dims[0] = 1;
    rows[1].offset += rows[0].dims[1];
    let status = (vt.copy.unwrap())(h, &rows[1], &rows[0], err);
    if status != 0 {
        return status;
    }
    (vt.unary.unwrap())(h, UNARY_SILU, out, out, err)
}

/// Frees a host tensor through the lent backend (ignored), then allocates a
/// buffer, frees it and pushes it to the cache (refused).
unsafe extern "C" fn forward_push_freed(
    _: *mut c_void,
    backend: *const BackendRef,
    _: *const TensorDesc,
    cache: *const TensorSink,
    x: *const TensorDesc,
    _: *const TensorDesc,
    _: usize,
    _: *const usize,
    _: usize,
    _: usize,
    err: *mut ErrBuf,
) -> i32 {
    let (vt, h) = (&*(*backend).vtable, (*backend).handle);
    (vt.buffer_free.unwrap())((*x).buffer);
    let mut buffer: *mut c_void = std::ptr::null_mut();
    let status = (vt.alloc.unwrap())(h, 16, &mut buffer, err);
    if status != 0 {
        return status;
    }
    (vt.buffer_free.unwrap())(buffer);
    let mut d = *x;
    d.buffer = buffer;
    d.offset = 0;
    d.rank = 1;
    d.dims = [0; ecdit_engine::plugin::abi::MAX_RANK];
    d.dims[0] = 4;
    ((*cache).push.unwrap())((*cache).ctx, &d, err)
}

/// The exported forward, told there are 2^60 parameter tensors.
unsafe extern "C" fn forward_huge_count(
    h: *mut c_void,
    backend: *const BackendRef,
    out: *const TensorDesc,
    cache: *const TensorSink,
    x: *const TensorDesc,
    params: *const TensorDesc,
    _: usize,
    offsets: *const usize,
    n_offsets: usize,
    d: usize,
    err: *mut ErrBuf,
) -> i32 {
    let f = LINEAR_FORWARD.get().unwrap();
    f(h, backend, out, cache, x, params, 1 << 60, offsets, n_offsets, d, err)
}

unsafe extern "C" fn param_shapes_huge(
    _: *mut c_void,
    _: usize,
    _: usize,
    _: *mut c_char,
    _: usize,
    len: *mut usize,
    _: *mut ErrBuf,
) -> i32 {
    *len = 1 << 40;
    0
}

#[test]
fn the_lent_backend_refuses_in_place_ops() {
    let e = forward_error(|t| t.forward = Some(forward_in_place));
    assert!(e.contains("in-place ops are not supported: out and inp overlap"), "{e}");
}

#[test]
fn a_freed_lent_buffer_cannot_be_pushed_and_host_tensors_cannot_be_freed() {
    let e = forward_error(|t| t.forward = Some(forward_push_freed));
    assert!(e.contains("allocated through the lent backend"), "{e}");
}

#[test]
fn counts_and_lengths_from_a_plugin_are_bounded() {
    let e = forward_error(|t| t.forward = Some(forward_huge_count));
    assert!(e.contains("params") && e.contains("at most 4096"), "{e}");
    // A parameter list longer than 16 MiB is an error (logged), not an allocation.
    let mut reg = Registry::new();
    let desc = edited_expert(|t| t.param_shapes = Some(param_shapes_huge));
    unsafe { register_descriptor(&mut reg, desc, "bad-expert") }.unwrap();
    assert!(reg.expert(&json!("test-linear")).unwrap().param_shapes(4, 3).is_empty());
    // A table count beyond the bound is refused at load.
    let mut desc = *edited_expert(|_| ());
    desc.n_experts = 5000;
    let e = unsafe { register_descriptor(&mut Registry::new(), &desc, "many") }
        .unwrap_err()
        .to_string();
    assert!(e.contains("expert tables") && e.contains("at most 4096"), "{e}");
}
