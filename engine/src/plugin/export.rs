//! The plugin side: turns the components a `register` function puts into a
//! [`Registry`] into the C tables of [`abi`](super::abi).
//!
//! A Rust plugin is an ordinary trait impl plus one line:
//!
//! ```ignore
//! ecdit_engine::export_plugin!(my_crate::register);
//! ```
//!
//! in a `cdylib` crate. Every exported function runs inside [`guard`], so a
//! panic becomes [`STATUS_PANIC`] with its message and never unwinds into the host.

use super::abi::*;
use super::{f32s, f32s_mut, opt_f32s, opt_f32s_mut, opt_u8s, u32s, u32s_mut, write_err};
use crate::backend::{AdamW, AttnDims, Backend, GemmDims, Unary};
use crate::error::{EngineError, Result};
use crate::registry::{ComponentInfo, Factory, ParamInfo, Registry};
use crate::router::{Dispatch, RouteShape, Router, Routing};
use crate::routing_stats::RoutingStats;
use crate::scheduler::Scheduler;
use crate::spec::check_params;
use serde_json::{Map, Value};
use std::any::Any;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Exports `register`'s routers, schedulers and backends as an ecdit plugin:
/// defines the `ecdit_plugin_entry` symbol. Use it once, in a `cdylib` crate.
///
/// ```ignore
/// ecdit_engine::export_plugin!(ecdit_routers::register);
/// ecdit_engine::export_plugin!(name: "my-plugin", version: "0.3.0", register: my::register);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($register:path) => {
        $crate::export_plugin!(name: env!("CARGO_PKG_NAME"), version: env!("CARGO_PKG_VERSION"), register: $register);
    };
    (name: $name:expr, version: $version:expr, register: $register:path $(,)?) => {
        /// The ecdit plugin entry point (see `ecdit_plugin.h`).
        ///
        /// # Safety
        /// `host` is null or points to a valid `ecdit_host`.
        #[no_mangle]
        pub unsafe extern "C" fn ecdit_plugin_entry(
            host: *const $crate::plugin::abi::Host,
        ) -> *const $crate::plugin::abi::PluginDesc {
            static EXPORTED: ::std::sync::OnceLock<::std::option::Option<$crate::plugin::export::Exported>> =
                ::std::sync::OnceLock::new();
            $crate::plugin::export::entry(&EXPORTED, host, $name, $version, $register)
        }
    };
}

/// The body of the generated entry function: installs the log forwarder and
/// builds the tables once per process.
///
/// # Safety
/// `host` is null or points to a valid [`Host`].
pub unsafe fn entry(
    cell: &'static OnceLock<Option<Exported>>,
    host: *const Host,
    name: &str,
    version: &str,
    register: fn(&mut Registry) -> Result<()>,
) -> *const PluginDesc {
    let built = catch_unwind(AssertUnwindSafe(|| {
        super::log::install_forwarder(host);
        cell.get_or_init(|| match Exported::new(name, version, register) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!("plugin {name} failed to initialise: {e}");
                None
            }
        })
        .as_ref()
        .map_or(std::ptr::null(), |e| e.descriptor())
    }));
    built.unwrap_or(std::ptr::null())
}

/// Runs `f`, turning an error or a panic into a status code plus a message in `err`.
///
/// # Safety
/// `err` is null or a valid [`ErrBuf`].
pub unsafe fn guard(err: *mut ErrBuf, f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => STATUS_OK,
        Ok(Err(e)) => {
            write_err(err, &e.to_string());
            STATUS_ERROR
        }
        Err(payload) => {
            write_err(err, &format!("panicked: {}", panic_message(payload.as_ref())));
            STATUS_PANIC
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

/// What `create` needs to know about one component kind.
struct ComponentCtx<T> {
    label: String,
    params: Vec<ParamInfo>,
    factory: Factory<T>,
}

/// The C tables of one plugin, owning everything they point to.
pub struct Exported {
    desc: Box<PluginDesc>,
    _strings: Vec<CString>,
    _router_tables: Vec<RouterVtable>,
    _router_ptrs: Vec<*const RouterVtable>,
    _scheduler_tables: Vec<SchedulerVtable>,
    _scheduler_ptrs: Vec<*const SchedulerVtable>,
    _backend_tables: Vec<BackendVtable>,
    _backend_ptrs: Vec<*const BackendVtable>,
    _ctxs: Vec<Box<dyn Any + Send + Sync>>,
}

// SAFETY: the tables are immutable after construction and point only into
// boxes `Exported` owns; the factories behind `ctx` are `Send + Sync`.
unsafe impl Send for Exported {}
unsafe impl Sync for Exported {}

/// The strings a vtable header points to.
struct Header {
    kind: *const c_char,
    description: *const c_char,
    params_json: *const c_char,
}

impl Exported {
    /// Runs `register` on an empty registry and exports what it registered.
    pub fn new(name: &str, version: &str, register: fn(&mut Registry) -> Result<()>) -> Result<Self> {
        let mut registry = Registry::new();
        register(&mut registry)?;
        Self::from_registry(name, version, &registry)
    }

    /// Exports every router, scheduler and backend of `registry`.
    pub fn from_registry(name: &str, version: &str, registry: &Registry) -> Result<Self> {
        let skipped = registry.expert_kinds();
        if !skipped.is_empty() {
            tracing::debug!(
                "plugin {name}: experts are not exported by ABI v{ABI_VERSION}; skipping {}",
                skipped.join(", ")
            );
        }
        let mut strings = Vec::new();
        let mut ctxs: Vec<Box<dyn Any + Send + Sync>> = Vec::new();
        let mut string = |s: &str, what: &str| -> Result<*const c_char> {
            let c = CString::new(s)
                .map_err(|_| EngineError::Other(format!("plugin {name}: {what} '{s}' contains a NUL byte")))?;
            let p = c.as_ptr();
            strings.push(c);
            Ok(p)
        };
        let mut header = |info: &ComponentInfo| -> Result<Header> {
            let json = serde_json::to_string(&info.params)
                .map_err(|e| EngineError::Other(format!("plugin {name}: params of '{}': {e}", info.kind)))?;
            Ok(Header {
                kind: string(&info.kind, "kind")?,
                description: string(&info.description, "description")?,
                params_json: string(&json, "params")?,
            })
        };

        let mut router_tables = Vec::new();
        for (info, factory) in registry.router_factories() {
            let h = header(&info)?;
            let ctx = make_ctx(&mut ctxs, &info, factory);
            router_tables.push(RouterVtable {
                abi_version: ABI_VERSION,
                struct_size: std::mem::size_of::<RouterVtable>() as u32,
                kind: h.kind,
                description: h.description,
                params_json: h.params_json,
                ctx,
                create: Some(create::<Box<dyn Router>>),
                destroy: Some(destroy::<Box<dyn Router>>),
                route: Some(router_route),
                free_result: Some(router_free_result),
                backward: Some(router_backward),
            });
        }
        let mut scheduler_tables = Vec::new();
        for (info, factory) in registry.scheduler_factories() {
            let h = header(&info)?;
            let ctx = make_ctx(&mut ctxs, &info, factory);
            scheduler_tables.push(SchedulerVtable {
                abi_version: ABI_VERSION,
                struct_size: std::mem::size_of::<SchedulerVtable>() as u32,
                kind: h.kind,
                description: h.description,
                params_json: h.params_json,
                ctx,
                create: Some(create::<Box<dyn Scheduler>>),
                destroy: Some(destroy::<Box<dyn Scheduler>>),
                draw_t: Some(sched_draw_t),
                add_noise: Some(sched_add_noise),
                target: Some(sched_target),
                model_time: Some(sched_model_time),
                sampling_times: Some(sched_sampling_times),
                step: Some(sched_step),
            });
        }
        let mut backend_tables = Vec::new();
        for (info, factory) in registry.backend_factories() {
            let h = header(&info)?;
            let ctx = make_ctx(&mut ctxs, &info, factory);
            backend_tables.push(backend_vtable(h, ctx));
        }

        let name_p = string(name, "plugin name")?;
        let version_p = string(version, "plugin version")?;
        // The table vectors are complete and never grow again, so these stay valid.
        let router_ptrs: Vec<*const RouterVtable> = router_tables.iter().map(|t| t as *const _).collect();
        let scheduler_ptrs: Vec<*const SchedulerVtable> = scheduler_tables.iter().map(|t| t as *const _).collect();
        let backend_ptrs: Vec<*const BackendVtable> = backend_tables.iter().map(|t| t as *const _).collect();
        let desc = Box::new(PluginDesc {
            abi_version: ABI_VERSION,
            struct_size: std::mem::size_of::<PluginDesc>() as u32,
            name: name_p,
            version: version_p,
            n_routers: router_ptrs.len(),
            routers: router_ptrs.as_ptr(),
            n_schedulers: scheduler_ptrs.len(),
            schedulers: scheduler_ptrs.as_ptr(),
            n_backends: backend_ptrs.len(),
            backends: backend_ptrs.as_ptr(),
        });
        Ok(Self {
            desc,
            _strings: strings,
            _router_tables: router_tables,
            _router_ptrs: router_ptrs,
            _scheduler_tables: scheduler_tables,
            _scheduler_ptrs: scheduler_ptrs,
            _backend_tables: backend_tables,
            _backend_ptrs: backend_ptrs,
            _ctxs: ctxs,
        })
    }

    /// The descriptor, valid while `self` lives.
    pub fn descriptor(&self) -> *const PluginDesc {
        &*self.desc
    }
}

fn make_ctx<T: 'static>(
    ctxs: &mut Vec<Box<dyn Any + Send + Sync>>,
    info: &ComponentInfo,
    factory: Factory<T>,
) -> *const c_void {
    let ctx = Box::new(ComponentCtx {
        label: format!("{} '{}'", info.family, info.kind),
        params: info.params.clone(),
        factory,
    });
    let p = &*ctx as *const ComponentCtx<T> as *const c_void;
    ctxs.push(ctx);
    p
}

// SAFETY (for the `Any` box): the factory is `Send + Sync`, the rest is owned data.
unsafe impl<T> Send for ComponentCtx<T> {}
unsafe impl<T> Sync for ComponentCtx<T> {}

fn not_null<T>(p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        Err(EngineError::Other(format!("{what} is a null pointer")))
    } else {
        Ok(())
    }
}

/// Parses the parameter JSON and re-checks it against the declaration.
unsafe fn parse_params<T>(ctx: &ComponentCtx<T>, json: *const c_char, len: usize) -> Result<Map<String, Value>> {
    not_null(json, "params_json")?;
    let bytes = std::slice::from_raw_parts(json as *const u8, len);
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| EngineError::Other(format!("{}: params are not valid JSON: {e}", ctx.label)))?;
    let Value::Object(params) = value else {
        return Err(EngineError::Other(format!(
            "{}: params must be a JSON object",
            ctx.label
        )));
    };
    check_params(&ctx.label, &ctx.params, &params)
}

/// A component object as an opaque handle, and back.
trait Instance: Sized + 'static {
    fn into_handle(self) -> *mut c_void;
    /// # Safety
    /// `h` came from `into_handle` of the same type and is dropped once.
    unsafe fn drop_handle(h: *mut c_void);
}
impl Instance for Box<dyn Router> {
    fn into_handle(self) -> *mut c_void {
        Box::into_raw(Box::new(self)) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut Self));
    }
}
impl Instance for Box<dyn Scheduler> {
    fn into_handle(self) -> *mut c_void {
        Box::into_raw(Box::new(self)) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut Self));
    }
}

/// A backend instance with its name as a C string (for the `name` slot).
struct BackendInstance {
    backend: Box<dyn Backend>,
    name: CString,
}
impl Instance for Box<dyn Backend> {
    fn into_handle(self) -> *mut c_void {
        let name = CString::new(self.name().replace('\0', "")).unwrap_or_default();
        Box::into_raw(Box::new(BackendInstance { backend: self, name })) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut BackendInstance));
    }
}

unsafe extern "C" fn create<T: Instance>(
    ctx: *const c_void,
    json: *const c_char,
    len: usize,
    out: *mut *mut c_void,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        not_null(ctx, "ctx")?;
        not_null(out, "out")?;
        let ctx = &*(ctx as *const ComponentCtx<T>);
        let params = parse_params(ctx, json, len)?;
        *out = (ctx.factory)(&params)?.into_handle();
        Ok(())
    })
}

unsafe extern "C" fn destroy<T: Instance>(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| T::drop_handle(handle)));
}

unsafe fn obj<'a, T: ?Sized>(handle: *mut c_void) -> Result<&'a T>
where
    Box<T>: 'static,
{
    not_null(handle, "handle")?;
    Ok(&**(handle as *const Box<T>))
}

// ---------------------------------------------------------------- routers

/// A route result as the plugin keeps it until `free_result`.
fn view_of(r: &Routing) -> Result<RoutingView> {
    let d = &r.dispatch;
    if d.offsets.len() != d.experts + 1 || d.gates.len() != d.tokens.len() {
        return Err(EngineError::Other(format!(
            "router produced {} offsets for {} experts and {} gates for {} tokens",
            d.offsets.len(),
            d.experts,
            d.gates.len(),
            d.tokens.len()
        )));
    }
    Ok(RoutingView {
        experts: d.experts,
        tokens_total: d.tokens_total,
        offsets: d.offsets.as_ptr(),
        tokens: d.tokens.as_ptr(),
        gates: d.gates.as_ptr(),
        slots: d.tokens.len(),
        probs: r.probs.as_ptr(),
        probs_len: r.probs.len(),
        has_aux: r.aux_loss.is_some() as u32,
        aux_loss: r.aux_loss.unwrap_or(0.0),
        group_size: r.group_size,
    })
}

/// Copies a view back into a [`Routing`] (statistics are not carried: backward
/// does not read them).
///
/// # Safety
/// The view's pointers are valid for their lengths.
pub(crate) unsafe fn routing_from_view(v: &RoutingView) -> Result<Routing> {
    let offsets = if v.offsets.is_null() {
        return Err(EngineError::Other("routing view: null offsets".into()));
    } else {
        std::slice::from_raw_parts(v.offsets, v.experts + 1).to_vec()
    };
    let tokens = u32s(
        U32s {
            ptr: v.tokens,
            len: v.slots,
        },
        "routing tokens",
    )?
    .to_vec();
    let gates = f32s(
        F32s {
            ptr: v.gates,
            len: v.slots,
        },
        "routing gates",
    )?
    .to_vec();
    let probs = f32s(
        F32s {
            ptr: v.probs,
            len: v.probs_len,
        },
        "routing probs",
    )?
    .to_vec();
    Ok(Routing {
        dispatch: Dispatch {
            experts: v.experts,
            tokens_total: v.tokens_total,
            offsets,
            tokens,
            gates,
        },
        probs,
        aux_loss: (v.has_aux != 0).then_some(v.aux_loss),
        stats: RoutingStats::default(),
        group_size: v.group_size,
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn router_route(
    handle: *mut c_void,
    out_view: *mut RoutingView,
    out_result: *mut *mut c_void,
    scores: F32s,
    samples: usize,
    tokens_per_sample: usize,
    experts: usize,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        let router = obj::<dyn Router>(handle)?;
        not_null(out_view, "out_view")?;
        not_null(out_result, "out_result")?;
        let scores = f32s(scores, "scores")?;
        let shape = RouteShape {
            samples,
            tokens_per_sample,
            experts,
        };
        let routing = Box::new(router.route(scores, shape)?);
        *out_view = view_of(&routing)?;
        *out_result = Box::into_raw(routing) as *mut c_void;
        Ok(())
    })
}

unsafe extern "C" fn router_free_result(result: *mut c_void) {
    if !result.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(result as *mut Routing))));
    }
}

unsafe extern "C" fn router_backward(
    handle: *mut c_void,
    grad_scores: F32sMut,
    routing: *const RoutingView,
    scores: F32s,
    grad_gates: F32s,
    grad_aux: f32,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        let router = obj::<dyn Router>(handle)?;
        not_null(routing, "routing")?;
        let routing = routing_from_view(&*routing)?;
        router.backward(
            &routing,
            f32s(scores, "scores")?,
            f32s(grad_gates, "grad_gates")?,
            grad_aux,
            f32s_mut(grad_scores, "grad_scores")?,
        )
    })
}

// ---------------------------------------------------------------- schedulers

/// The host's generator seen as a `RngCore` inside the plugin.
struct LentRng<'a>(&'a Rng);

impl rand::RngCore for LentRng<'_> {
    fn next_u32(&mut self) -> u32 {
        // SAFETY: the host guarantees the callbacks and ctx for the call's duration.
        unsafe { self.0.next_u32.map_or(0, |f| f(self.0.ctx)) }
    }
    fn next_u64(&mut self) -> u64 {
        unsafe { self.0.next_u64.map_or(0, |f| f(self.0.ctx)) }
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        if let Some(f) = self.0.fill_bytes {
            unsafe { f(self.0.ctx, dest.as_mut_ptr(), dest.len()) }
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

unsafe extern "C" fn sched_draw_t(handle: *mut c_void, t: *mut f32, rng: *const Rng, err: *mut ErrBuf) -> i32 {
    guard(err, || {
        let s = obj::<dyn Scheduler>(handle)?;
        not_null(t, "t")?;
        not_null(rng, "rng")?;
        let rng = &*rng;
        if rng.next_u32.is_none() || rng.next_u64.is_none() || rng.fill_bytes.is_none() {
            return Err(EngineError::Other("rng has a null callback".into()));
        }
        *t = s.draw_t(&mut LentRng(rng));
        Ok(())
    })
}

unsafe extern "C" fn sched_add_noise(
    handle: *mut c_void,
    x_t: F32sMut,
    x0: F32s,
    noise: F32s,
    t: f32,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        obj::<dyn Scheduler>(handle)?.add_noise(f32s_mut(x_t, "x_t")?, f32s(x0, "x0")?, f32s(noise, "noise")?, t)
    })
}

unsafe extern "C" fn sched_target(
    handle: *mut c_void,
    target: F32sMut,
    x0: F32s,
    noise: F32s,
    t: f32,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        obj::<dyn Scheduler>(handle)?.target(f32s_mut(target, "target")?, f32s(x0, "x0")?, f32s(noise, "noise")?, t)
    })
}

unsafe extern "C" fn sched_model_time(handle: *mut c_void, out: *mut f32, t: f32, err: *mut ErrBuf) -> i32 {
    guard(err, || {
        let s = obj::<dyn Scheduler>(handle)?;
        not_null(out, "out")?;
        *out = s.model_time(t);
        Ok(())
    })
}

unsafe extern "C" fn sched_sampling_times(handle: *mut c_void, out: F32sMut, steps: usize, err: *mut ErrBuf) -> i32 {
    guard(err, || {
        let times = obj::<dyn Scheduler>(handle)?.sampling_times(steps);
        let out = f32s_mut(out, "out")?;
        crate::error::check_len("sampling_times", "out", out.len(), times.len())?;
        out.copy_from_slice(&times);
        Ok(())
    })
}

unsafe extern "C" fn sched_step(
    handle: *mut c_void,
    x: F32sMut,
    model_out: F32s,
    t: f32,
    t_next: f32,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        obj::<dyn Scheduler>(handle)?.step(f32s_mut(x, "x")?, f32s(model_out, "model_out")?, t, t_next)
    })
}

// ---------------------------------------------------------------- backends

unsafe fn be<'a>(h: *mut c_void) -> Result<&'a dyn Backend> {
    not_null(h, "handle")?;
    Ok(&*(*(h as *const BackendInstance)).backend)
}

pub(crate) fn gemm_dims(d: GemmDimsC) -> GemmDims {
    GemmDims {
        m: d.m,
        n: d.n,
        k: d.k,
        trans_a: d.trans_a != 0,
        trans_b: d.trans_b != 0,
    }
}

pub(crate) fn attn_dims(d: AttnDimsC) -> AttnDims {
    AttnDims {
        batch: d.batch,
        heads: d.heads,
        kv_heads: d.kv_heads,
        q_len: d.q_len,
        kv_len: d.kv_len,
        head_dim: d.head_dim,
    }
}

fn unary_op(op: u32) -> Result<Unary> {
    match op {
        UNARY_GELU_TANH => Ok(Unary::GeluTanh),
        UNARY_SILU => Ok(Unary::Silu),
        _ => Err(EngineError::Other(format!(
            "unknown unary op code {op} (known: {UNARY_GELU_TANH} gelu_tanh, {UNARY_SILU} silu)"
        ))),
    }
}

fn backend_vtable(h: Header, ctx: *const c_void) -> BackendVtable {
    type Hd = *mut c_void;
    type Er = *mut ErrBuf;
    unsafe extern "C" fn name(h: Hd) -> *const c_char {
        if h.is_null() {
            return std::ptr::null();
        }
        (*(h as *const BackendInstance)).name.as_ptr()
    }
    unsafe extern "C" fn threads(h: Hd) -> usize {
        catch_unwind(AssertUnwindSafe(|| be(h).map_or(0, |b| b.threads()))).unwrap_or(0)
    }
    unsafe extern "C" fn gemm(
        h: Hd,
        out: F32sMut,
        a: F32s,
        b: F32s,
        d: GemmDimsC,
        alpha: f32,
        beta: f32,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.gemm(
                f32s_mut(out, "out")?,
                f32s(a, "a")?,
                f32s(b, "b")?,
                gemm_dims(d),
                alpha,
                beta,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn gemm_batched(
        h: Hd,
        out: F32sMut,
        a: F32s,
        b: F32s,
        batch: usize,
        d: GemmDimsC,
        alpha: f32,
        beta: f32,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.gemm_batched(
                f32s_mut(out, "out")?,
                f32s(a, "a")?,
                f32s(b, "b")?,
                batch,
                gemm_dims(d),
                alpha,
                beta,
            )
        })
    }
    unsafe extern "C" fn add_bias(h: Hd, out: F32sMut, bias: F32s, rows: usize, cols: usize, err: Er) -> i32 {
        guard(err, || {
            be(h)?.add_bias(f32s_mut(out, "out")?, f32s(bias, "bias")?, rows, cols)
        })
    }
    unsafe extern "C" fn sum_rows(h: Hd, out: F32sMut, inp: F32s, rows: usize, cols: usize, acc: u32, err: Er) -> i32 {
        guard(err, || {
            be(h)?.sum_rows(f32s_mut(out, "out")?, f32s(inp, "inp")?, rows, cols, acc != 0)
        })
    }
    unsafe extern "C" fn softmax_rows(h: Hd, out: F32sMut, inp: F32s, rows: usize, cols: usize, err: Er) -> i32 {
        guard(err, || {
            be(h)?.softmax_rows(f32s_mut(out, "out")?, f32s(inp, "inp")?, rows, cols)
        })
    }
    unsafe extern "C" fn softmax_rows_backward(
        h: Hd,
        dinp: F32sMut,
        dout: F32s,
        out: F32s,
        rows: usize,
        cols: usize,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.softmax_rows_backward(
                f32s_mut(dinp, "dinp")?,
                f32s(dout, "dout")?,
                f32s(out, "out")?,
                rows,
                cols,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn layer_norm(
        h: Hd,
        out: F32sMut,
        mean: F32sMut,
        rstd: F32sMut,
        inp: F32s,
        weight: F32s,
        bias: F32s,
        rows: usize,
        cols: usize,
        eps: f32,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.layer_norm(
                f32s_mut(out, "out")?,
                f32s_mut(mean, "mean")?,
                f32s_mut(rstd, "rstd")?,
                f32s(inp, "inp")?,
                opt_f32s(weight),
                opt_f32s(bias),
                rows,
                cols,
                eps,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn layer_norm_backward(
        h: Hd,
        dinp: F32sMut,
        dweight: F32sMut,
        dbias: F32sMut,
        dout: F32s,
        inp: F32s,
        mean: F32s,
        rstd: F32s,
        weight: F32s,
        rows: usize,
        cols: usize,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.layer_norm_backward(
                f32s_mut(dinp, "dinp")?,
                opt_f32s_mut(dweight),
                opt_f32s_mut(dbias),
                f32s(dout, "dout")?,
                f32s(inp, "inp")?,
                f32s(mean, "mean")?,
                f32s(rstd, "rstd")?,
                opt_f32s(weight),
                rows,
                cols,
            )
        })
    }
    unsafe extern "C" fn unary(h: Hd, op: u32, out: F32sMut, inp: F32s, err: Er) -> i32 {
        guard(err, || {
            be(h)?.unary(unary_op(op)?, f32s_mut(out, "out")?, f32s(inp, "inp")?)
        })
    }
    unsafe extern "C" fn unary_backward(h: Hd, op: u32, dinp: F32sMut, dout: F32s, inp: F32s, err: Er) -> i32 {
        guard(err, || {
            be(h)?.unary_backward(
                unary_op(op)?,
                f32s_mut(dinp, "dinp")?,
                f32s(dout, "dout")?,
                f32s(inp, "inp")?,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn attention(
        h: Hd,
        out: F32sMut,
        probs: F32sMut,
        q: F32s,
        k: F32s,
        v: F32s,
        key_mask: U8s,
        d: AttnDimsC,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.attention(
                f32s_mut(out, "out")?,
                f32s_mut(probs, "probs")?,
                f32s(q, "q")?,
                f32s(k, "k")?,
                f32s(v, "v")?,
                opt_u8s(key_mask),
                attn_dims(d),
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn attention_backward(
        h: Hd,
        dq: F32sMut,
        dk: F32sMut,
        dv: F32sMut,
        dout: F32s,
        probs: F32s,
        q: F32s,
        k: F32s,
        v: F32s,
        d: AttnDimsC,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.attention_backward(
                f32s_mut(dq, "dq")?,
                f32s_mut(dk, "dk")?,
                f32s_mut(dv, "dv")?,
                f32s(dout, "dout")?,
                f32s(probs, "probs")?,
                f32s(q, "q")?,
                f32s(k, "k")?,
                f32s(v, "v")?,
                attn_dims(d),
            )
        })
    }
    unsafe extern "C" fn gather_rows(h: Hd, out: F32sMut, inp: F32s, idx: U32s, cols: usize, err: Er) -> i32 {
        guard(err, || {
            be(h)?.gather_rows(f32s_mut(out, "out")?, f32s(inp, "inp")?, u32s(idx, "idx")?, cols)
        })
    }
    unsafe extern "C" fn scatter_add_rows(
        h: Hd,
        out: F32sMut,
        inp: F32s,
        idx: U32s,
        scale: F32s,
        cols: usize,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.scatter_add_rows(
                f32s_mut(out, "out")?,
                f32s(inp, "inp")?,
                u32s(idx, "idx")?,
                opt_f32s(scale),
                cols,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn top_k_rows(
        h: Hd,
        idx: U32sMut,
        val: F32sMut,
        inp: F32s,
        rows: usize,
        cols: usize,
        k: usize,
        err: Er,
    ) -> i32 {
        guard(err, || {
            be(h)?.top_k_rows(
                u32s_mut(idx, "idx")?,
                f32s_mut(val, "val")?,
                f32s(inp, "inp")?,
                rows,
                cols,
                k,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn adamw_step(
        h: Hd,
        param: F32sMut,
        grad: F32s,
        m: F32sMut,
        v: F32sMut,
        hp: AdamWC,
        step: u64,
        err: Er,
    ) -> i32 {
        guard(err, || {
            let hp = AdamW {
                lr: hp.lr,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                weight_decay: hp.weight_decay,
            };
            be(h)?.adamw_step(
                f32s_mut(param, "param")?,
                f32s(grad, "grad")?,
                f32s_mut(m, "m")?,
                f32s_mut(v, "v")?,
                hp,
                step,
            )
        })
    }

    BackendVtable {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<BackendVtable>() as u32,
        kind: h.kind,
        description: h.description,
        params_json: h.params_json,
        ctx,
        create: Some(create::<Box<dyn Backend>>),
        destroy: Some(destroy::<Box<dyn Backend>>),
        name: Some(name),
        threads: Some(threads),
        gemm: Some(gemm),
        gemm_batched: Some(gemm_batched),
        add_bias: Some(add_bias),
        sum_rows: Some(sum_rows),
        softmax_rows: Some(softmax_rows),
        softmax_rows_backward: Some(softmax_rows_backward),
        layer_norm: Some(layer_norm),
        layer_norm_backward: Some(layer_norm_backward),
        unary: Some(unary),
        unary_backward: Some(unary_backward),
        attention: Some(attention),
        attention_backward: Some(attention_backward),
        gather_rows: Some(gather_rows),
        scatter_add_rows: Some(scatter_add_rows),
        top_k_rows: Some(top_k_rows),
        adamw_step: Some(adamw_step),
    }
}
