//! Plugins that misbehave at run time are contained: each misbehaviour is an
//! error that names the plugin and what was wrong, and the host stays usable
//! (the same forward with a good router or backend, in the same process and
//! registry, gives the reference bits).
//!
//! - routers in C, loaded from a library (`tests/fixtures/misbehaving_router.c`,
//!   one build per misbehaviour): out-of-range and duplicate token indices,
//!   NaN gates, wrong counts, an error of their own, and one that logs from
//!   many threads at once while the host routes from several threads;
//! - Rust components through the full C-ABI round trip (exported tables and
//!   host adapters, as a library would be, without the file): a router that
//!   panics in `route`, an expert that panics in `forward`;
//! - the CPU backend exported over the ABI with its `gemm` slot failing on the
//!   Nth call, in the middle of a whole model's forward.

mod plugin_common;

use ecdit_engine::plugin::abi::{BackendVtable, ErrBuf, GemmDimsC, PluginDesc, TensorDesc, STATUS_ERROR};
use ecdit_engine::plugin::export::Exported;
use ecdit_engine::plugin::host::register_descriptor;
use ecdit_engine::plugin::load_in_process;
use ecdit_engine::*;
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{Condition, Model};
use plugin_common::bits;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

// ---------------------------------------------------------------------------
// The MoE layer forward every router and expert case runs

const D: usize = 8;
const EXPERTS: usize = 4;
const SHAPE: RouteShape = RouteShape {
    samples: 2,
    tokens_per_sample: 12,
    experts: EXPERTS,
};

/// The registry of a host: every shipped component, statically linked.
fn host() -> Registry {
    ecdit_model::registry().expect("static registry")
}

fn cpu(reg: &Registry) -> Arc<dyn Backend> {
    Arc::from(reg.backend(&json!({"kind": "cpu", "threads": 1})).expect("cpu backend"))
}

/// A seeded MoE layer's forward with `router` and `expert`: the output's bits.
fn moe_forward(reg: &Registry, router: &Value, expert: &Value) -> Result<Vec<u32>> {
    let backend = cpu(reg);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let layer = MoeLayer::new_random(
        reg.router(router)?,
        reg.expert(expert)?,
        D,
        EXPERTS,
        &*backend,
        DType::F32,
        "moe",
        &mut rng,
    )?;
    let x_host: Vec<f32> = (0..SHAPE.tokens() * D).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x = backend.upload_f32(&[SHAPE.tokens(), D], &x_host, DType::F32)?;
    let mut out = backend.zeros(&[SHAPE.tokens(), D], DType::F32)?;
    let mut cache = MoeCache::default();
    layer.forward(&*backend, out.view_mut(), &mut cache, false, x.view(), SHAPE)?;
    Ok(bits(&backend.read_f32(out.view())?))
}

/// The layer with the built-in expert-choice router and GELU experts.
fn good_forward(reg: &Registry) -> Vec<u32> {
    moe_forward(reg, &json!("expert-choice"), &json!("gelu-mlp")).expect("the good forward")
}

/// The reference bits of [`good_forward`], from a registry no plugin touched.
fn reference() -> &'static [u32] {
    static R: OnceLock<Vec<u32>> = OnceLock::new();
    R.get_or_init(|| {
        let out = good_forward(&host());
        assert!(out.iter().any(|&b| f32::from_bits(b) != 0.0), "a trivial reference");
        out
    })
}

/// The forward failed with a plugin error naming `plugin` and saying `what`;
/// then the host, with the plugin still loaded, gives the reference bits.
fn assert_contained(reg: &Registry, result: Result<Vec<u32>>, plugin: &[&str], what: &str) {
    let e = match result {
        Ok(_) => panic!("the forward succeeded; expected an error saying {what:?}"),
        Err(e) => e,
    };
    let text = e.to_string();
    assert!(matches!(e, EngineError::Plugin { .. }), "not a plugin error: {e:?}");
    for name in plugin {
        assert!(text.contains(name), "the error does not name {name:?}: {text}");
    }
    assert!(text.contains(what), "the error does not say {what:?}: {text}");
    assert_eq!(good_forward(reg), reference(), "the host is not usable after: {text}");
}

// ---------------------------------------------------------------------------
// Routers in C

/// The misbehaving router built with `flag`, loaded into a fresh host.
fn c_router(flag: &str, name: &str) -> (Registry, String) {
    let lib = plugin_common::c_plugin("tests/fixtures/misbehaving_router.c", &[flag], name);
    let mut reg = host();
    let info = reg
        .load_plugin(&lib)
        .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
    assert_eq!(info.name, "misbehaving-router");
    (reg, lib.display().to_string())
}

#[test]
fn the_fixture_router_built_without_a_flag_routes_validly() {
    let (reg, _) = c_router("-DWELL_BEHAVED", "misbehaving_router_ok");
    let out = moe_forward(&reg, &json!("misbehaving"), &json!("gelu-mlp")).expect("the valid build");
    assert!(out.iter().all(|&b| f32::from_bits(b).is_finite()));
    assert!(out.iter().any(|&b| f32::from_bits(b) != 0.0));
    assert_eq!(good_forward(&reg), reference());
}

#[test]
fn routers_breaking_the_dispatch_contract_are_errors_naming_the_plugin() {
    for (flag, what) in [
        ("-DOUT_OF_RANGE", "out of range"),
        ("-DDUPLICATE", "twice"),
        ("-DNAN_GATE", "gate NaN"),
        ("-DSLOTS_MISMATCH", "do not end at the slot count"),
        ("-DHUGE_COUNT", "1152921504606846976 dispatch slots"),
        ("-DWRONG_EXPERTS", "5 experts"),
        ("-DSHORT_PROBS", "95 probabilities"),
        ("-DROUTE_ERROR", "the routing table is on fire"),
    ] {
        let name = format!("misbehaving_router_{}", flag[2..].to_lowercase());
        let (reg, lib) = c_router(flag, &name);
        let result = moe_forward(&reg, &json!("misbehaving"), &json!("gelu-mlp"));
        assert_contained(
            &reg,
            result,
            &["misbehaving-router", &lib, "router 'misbehaving'"],
            what,
        );
    }
}

// ---------------------------------------------------------------------------
// Log lines from many plugin threads at once

const LOG_THREADS: usize = 8;
const LOG_EVENTS: usize = 200;
const HOST_THREADS: usize = 4;

/// Plugin log lines the host's subscriber received: (plugin target, message).
type Lines = Arc<Mutex<Vec<(String, String)>>>;

fn captured() -> &'static Mutex<Vec<(String, String)>> {
    static LINES: OnceLock<Lines> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::set_global_default(Capture(lines.clone())).expect("the only global subscriber");
        lines
    })
}

/// Keeps the `ecdit_plugin` events (what the host makes of plugin log lines).
struct Capture(Lines);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() != "ecdit_plugin" {
            return;
        }
        #[derive(Default)]
        struct Fields(String, String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                match f.name() {
                    "plugin_target" => self.0 = format!("{v:?}"),
                    "message" => self.1 = format!("{v:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().unwrap().push((fields.0, fields.1));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_plugin_logging_from_many_threads_at_once_neither_hangs_nor_loses_lines() {
    // The subscriber first: the host tells the plugin at load which levels it records.
    let lines = captured();
    let flags = [
        format!("-DLOG_THREADS={LOG_THREADS}"),
        format!("-DLOG_EVENTS={LOG_EVENTS}"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let lib = plugin_common::c_plugin(
        "tests/fixtures/misbehaving_router.c",
        &flags,
        "misbehaving_router_chatty",
    );
    let mut reg = host();
    reg.load_plugin(&lib).unwrap();
    // Several host threads route at once; each route logs from LOG_THREADS plugin threads.
    let outs: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..HOST_THREADS)
            .map(|_| s.spawn(|| moe_forward(&reg, &json!("misbehaving"), &json!("gelu-mlp")).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "concurrent forwards disagree");
    assert_eq!(good_forward(&reg), reference());

    let lines = lines.lock().unwrap();
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    let (mut no_target, mut no_message, mut odd_level) = (0, 0, 0);
    for (target, msg) in lines.iter() {
        if let Some(rest) = msg.strip_prefix("chatty thread ") {
            assert_eq!(target, "misbehaving_router", "{msg}");
            let (t, e) = rest.split_once(" event ").expect("a chatty line");
            *seen.entry((t.parse().unwrap(), e.parse().unwrap())).or_default() += 1;
        } else if msg == "chatty: no target" {
            assert_eq!(target, "");
            no_target += 1;
        } else if msg == "chatty: level 99" {
            odd_level += 1;
        } else if msg.is_empty() && target == "misbehaving_router" {
            no_message += 1;
        }
    }
    assert_eq!(seen.len(), LOG_THREADS * LOG_EVENTS, "lines lost");
    assert!(
        seen.values().all(|&n| n == HOST_THREADS),
        "a line arrived other than once per route"
    );
    let odd = HOST_THREADS * LOG_THREADS * (LOG_EVENTS / 50);
    assert_eq!((no_target, no_message, odd_level), (odd, odd, odd));
}

// ---------------------------------------------------------------------------
// Panics inside a Rust plugin

/// A router whose `route` panics.
struct PanickyRouter;

impl Router for PanickyRouter {
    fn kind(&self) -> &str {
        "panicky-router"
    }
    fn spec(&self) -> Value {
        json!({"kind": "panicky-router"})
    }
    fn route(&self, _: &[f32], _: RouteShape) -> Result<Routing> {
        panic!("the router exploded on purpose")
    }
    fn backward(&self, _: &Routing, _: &[f32], _: &[f32], _: f32, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// GELU experts whose `forward` panics.
struct PanickyExpert(Box<dyn Expert>);

impl Expert for PanickyExpert {
    fn kind(&self) -> &str {
        "panicky-expert"
    }
    fn spec(&self) -> Value {
        json!({"kind": "panicky-expert"})
    }
    fn hidden(&self, d: usize) -> usize {
        self.0.hidden(d)
    }
    fn param_shapes(&self, d: usize, experts: usize) -> Vec<ParamShape> {
        self.0.param_shapes(d, experts)
    }
    fn flops_per_token(&self, d: usize) -> f64 {
        self.0.flops_per_token(d)
    }
    fn forward(
        &self,
        _: &dyn Backend,
        _: TensorMut<'_>,
        _: &mut ExpertCache,
        _: bool,
        _: TensorRef<'_>,
        _: &[TensorRef<'_>],
        _: &[usize],
        _: usize,
    ) -> Result<()> {
        panic!("the expert exploded on purpose")
    }
    fn backward(
        &self,
        backend: &dyn Backend,
        dx: TensorMut<'_>,
        dparams: &mut [TensorMut<'_>],
        dout: TensorRef<'_>,
        cache: &ExpertCache,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        self.0
            .backward(backend, dx, dparams, dout, cache, x, params, offsets, d)
    }
}

fn info(family: Family, kind: &str) -> ComponentInfo {
    ComponentInfo {
        family,
        kind: kind.into(),
        description: format!("test {kind}"),
        params: vec![],
        origin: "builtin".into(),
    }
}

fn register_panicky(r: &mut Registry) -> Result<()> {
    r.register_router(
        info(Family::Router, "panicky-router"),
        Arc::new(|_: &Map<String, Value>| Ok(Box::new(PanickyRouter) as Box<dyn Router>)),
    )?;
    r.register_expert(
        info(Family::Expert, "panicky-expert"),
        Arc::new(|_: &Map<String, Value>| {
            let mut inner = Registry::new();
            ecdit_routers::register(&mut inner)?;
            Ok(Box::new(PanickyExpert(inner.expert(&json!("gelu-mlp"))?)) as Box<dyn Expert>)
        }),
    )
}

#[test]
fn a_plugin_panicking_in_route_or_forward_is_an_error_naming_it() {
    let mut reg = host();
    load_in_process(&mut reg, "panicky", "0.1.0", register_panicky).unwrap();
    let plugin = ["'panicky' (in-process:panicky)"];
    for _ in 0..2 {
        // Twice: a caught panic leaves the plugin callable.
        let result = moe_forward(&reg, &json!("panicky-router"), &json!("gelu-mlp"));
        assert_contained(
            &reg,
            result,
            &plugin,
            "router 'panicky-router' route panicked inside the plugin: panicked: the router exploded on purpose",
        );
        let result = moe_forward(&reg, &json!("expert-choice"), &json!("panicky-expert"));
        assert_contained(&reg, result, &plugin, "the expert exploded on purpose");
    }
}

// ---------------------------------------------------------------------------
// A backend op failing in the middle of a model forward

/// The exported CPU backend's own `gemm`, and the flaky one's counters.
static CPU_GEMM: OnceLock<GemmFn> = OnceLock::new();
static GEMM_CALLS: AtomicUsize = AtomicUsize::new(0);
static FAIL_AT: AtomicUsize = AtomicUsize::new(usize::MAX);

type GemmFn = unsafe extern "C" fn(
    *mut c_void,
    *const TensorDesc,
    *const TensorDesc,
    *const TensorDesc,
    *const TensorDesc,
    GemmDimsC,
    f32,
    f32,
    *mut ErrBuf,
) -> i32;

/// The CPU backend's gemm, except that call number FAIL_AT fails.
unsafe extern "C" fn flaky_gemm(
    h: *mut c_void,
    out: *const TensorDesc,
    a: *const TensorDesc,
    b: *const TensorDesc,
    bias: *const TensorDesc,
    dims: GemmDimsC,
    alpha: f32,
    beta: f32,
    err: *mut ErrBuf,
) -> i32 {
    let call = GEMM_CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    if call == FAIL_AT.load(Ordering::SeqCst) {
        let msg = format!("injected failure on gemm call {call}\0");
        let e = &*err;
        let n = msg.len().min(e.cap);
        std::ptr::copy_nonoverlapping(msg.as_ptr(), e.msg as *mut u8, n);
        *e.msg.add(n - 1) = 0;
        return STATUS_ERROR;
    }
    CPU_GEMM.get().expect("the CPU gemm")(h, out, a, b, bias, dims, alpha, beta, err)
}

/// The CPU backend exported over the ABI as kind `flaky-cpu`, its `gemm` slot
/// replaced by [`flaky_gemm`]: what a backend library failing mid-forward hands the host.
fn flaky_cpu_descriptor() -> &'static PluginDesc {
    let mut cpu_only = Registry::new();
    ecdit_backend_cpu::register(&mut cpu_only).unwrap();
    let exported: &'static Exported = Box::leak(Box::new(
        Exported::from_registry("flaky-backend", "0.1.0", &cpu_only).unwrap(),
    ));
    // SAFETY: the descriptor lives forever (leaked); tables are copied, not mutated.
    let mut desc = unsafe { *exported.descriptor() };
    let mut table: BackendVtable = unsafe { **desc.backends };
    let _ = CPU_GEMM.set(table.gemm.expect("the CPU backend exports gemm"));
    table.gemm = Some(flaky_gemm);
    table.kind = c"flaky-cpu".as_ptr() as *const c_char;
    let table: &'static BackendVtable = Box::leak(Box::new(table));
    let list: &'static [*const BackendVtable] = Box::leak(vec![table as *const BackendVtable].into_boxed_slice());
    desc.backends = list.as_ptr();
    Box::leak(Box::new(desc))
}

/// A small class-conditioned EC-DiT (MoE in block 1) on `backend`, its dense
/// weights drawn at random so the output depends on every block.
fn small_model(reg: &Registry, backend: Arc<dyn Backend>) -> Model {
    let config: ModelConfig = serde_json::from_value(json!({
        "name": "flaky-case", "input_size": 8, "patch_size": 2, "in_channels": 4, "learn_sigma": false,
        "hidden": 32, "depth": 2, "heads": 2, "kv_heads": 2, "mlp_ratio": 2.0,
        "conditioning": {"class": {"num_classes": 10}},
        "moe": {"experts": 4, "every": 2, "first": 1, "router": {"kind": "expert-choice", "capacity_factor": 2.0},
                "expert": {"kind": "gelu-mlp", "mlp_ratio": 2.0}},
        "scheduler": "rectified-flow",
    }))
    .unwrap();
    let mut model = Model::new(config, reg, backend.clone(), 7).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for p in model.params_mut() {
        if p.init == Init::Fixed {
            continue;
        }
        let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.3..0.3)).collect();
        p.load(backend.as_ref(), &values).unwrap();
    }
    model
}

/// The model's prediction for a fixed batch of two.
fn predict(model: &Model) -> std::result::Result<Vec<u32>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..2 * 4 * 8 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
    model
        .predict(&x, &[0.25, 0.75], Condition::Class(&[3, 6]))
        .map(|o| bits(&o.out))
        .map_err(|e| e.to_string())
}

#[test]
fn a_backend_op_failing_mid_forward_is_an_error_naming_the_plugin() {
    let mut reg = host();
    unsafe { register_descriptor(&mut reg, flaky_cpu_descriptor(), "flaky-backend-library") }.unwrap();
    let good = small_model(&reg, cpu(&reg));
    let want = predict(&good).unwrap();
    let flaky: Arc<dyn Backend> = Arc::from(reg.backend(&json!({"kind": "flaky-cpu", "threads": 1})).unwrap());
    let model = small_model(&reg, flaky);
    // Not failing yet: the same bits as on the CPU backend, over how many gemm calls.
    let before = GEMM_CALLS.load(Ordering::SeqCst);
    assert_eq!(predict(&model).unwrap(), want);
    let per_forward = GEMM_CALLS.load(Ordering::SeqCst) - before;
    assert!(per_forward >= 4, "{per_forward} gemm calls in a forward");

    // Fail half-way through the next forward.
    let fail_at = GEMM_CALLS.load(Ordering::SeqCst) + per_forward / 2;
    FAIL_AT.store(fail_at, Ordering::SeqCst);
    let e = predict(&model).expect_err("the forward with a failing gemm succeeded");
    assert!(
        e.contains("'flaky-backend' (flaky-backend-library)")
            && e.contains("gemm failed")
            && e.contains(&format!("injected failure on gemm call {fail_at}")),
        "{e}"
    );
    // The host and even the plugin backend go on: the same model forwards again.
    FAIL_AT.store(usize::MAX, Ordering::SeqCst);
    assert_eq!(predict(&model).unwrap(), want);
    assert_eq!(predict(&good).unwrap(), want);
    assert_eq!(good_forward(&reg), reference());
}
