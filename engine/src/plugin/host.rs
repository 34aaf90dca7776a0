//! The host side: loading plugin libraries, checking them, and adapters that
//! turn their C tables back into `Box<dyn Router>`, `Box<dyn Scheduler>` and
//! `Box<dyn Backend>` in the [`Registry`].
//!
//! Checks before anything is registered: the file opens as a library, it
//! exports `ecdit_plugin_entry`, the entry returns a descriptor, the descriptor
//! and every vtable speak [`ABI_VERSION`] and are at least as large as this
//! host's definitions, every function slot is filled, every `params_json`
//! parses, and no kind clashes with a registered one ([`Registry::check_free`]).
//! A plugin registers all of its components or none.
//!
//! At run time every dispatch a plugin router returns is validated
//! ([`Dispatch::validate`]), so a misbehaving router is an error, not a crash.
//!
//! Libraries are never unloaded. Objects built from a plugin (a router inside a
//! model, a backend's worker threads, a `tracing` subscriber installed at entry)
//! can outlive the registry that loaded them, and calling into an unmapped
//! library is a crash, not an error. So the `libloading::Library` is leaked on
//! purpose, as ggml does with its backends: the cost is a mapping per plugin.

use super::abi::*;
use super::export::Exported;
use super::{as_f32s, as_f32s_mut, as_opt_f32s, as_opt_f32s_mut, cstr, ERR_CAP};
use crate::backend::{AdamW, AttnDims, Backend, GemmDims, Unary};
use crate::error::{check_finite, EngineError, Result};
use crate::registry::{ComponentInfo, Family, ParamInfo, Registry};
use crate::router::{Dispatch, RouteShape, Router, Routing};
use crate::routing_stats::RoutingStats;
use crate::scheduler::Scheduler;
use serde::Serialize;
use serde_json::{Map, Value};
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable listing plugin directories, `:`-separated.
pub const PLUGIN_PATH_ENV: &str = "ECDIT_PLUGIN_PATH";

/// What a loaded plugin brought.
#[derive(Clone, Debug, Serialize)]
pub struct PluginInfo {
    /// Plugin name from its descriptor.
    pub name: String,
    /// Plugin version from its descriptor.
    pub version: String,
    /// The library file (or `in-process:<name>`).
    pub path: String,
    /// The components it registered.
    pub components: Vec<ComponentInfo>,
}

impl Registry {
    /// Loads a plugin library and registers its components; see [`load`].
    pub fn load_plugin(&mut self, path: impl AsRef<Path>) -> Result<PluginInfo> {
        load(self, path)
    }
}

/// Opens the library at `path`, checks it, and registers its routers,
/// schedulers and backends into `registry` (all or none). The library stays
/// loaded for the life of the process (see the module docs for why).
pub fn load(registry: &mut Registry, path: impl AsRef<Path>) -> Result<PluginInfo> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let fail = |reason: String| EngineError::Plugin {
        plugin: origin.clone(),
        reason,
    };
    let _span = tracing::info_span!("load_plugin", path = %origin).entered();
    // SAFETY: loading runs the library's initialisers; that is what a plugin is.
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| fail(format!("cannot load as a shared library: {e}")))?;
    // Leaked from here on, whatever happens next: the entry may have started
    // threads or installed hooks that must not be unmapped under them.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol's type is fixed by the ABI.
    let entry: libloading::Symbol<EntryFn> = unsafe { library.get(ENTRY_SYMBOL.as_bytes()) }.map_err(|e| {
        fail(format!(
            "no `{ENTRY_SYMBOL}` symbol, so not an ecdit plugin (export it with ecdit_engine::export_plugin! \
             or from C per ecdit_plugin.h): {e}"
        ))
    })?;
    let host: &'static Host = Box::leak(Box::new(Host {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<Host>() as u32,
        log: Some(super::log::host_log),
        max_level: super::log::host_max_level(),
    }));
    // SAFETY: calling the entry per the ABI; it returns null or a descriptor.
    let desc = unsafe { entry(host) };
    let info = unsafe { register_descriptor(registry, desc, &origin) }?;
    tracing::info!(
        "loaded plugin {} {} from {origin}: {} components",
        info.name,
        info.version,
        info.components.len()
    );
    Ok(info)
}

/// The plugin libraries in one directory (`*.so`, `*.dylib`, `*.dll`), sorted.
pub fn plugin_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        EngineError::Other(format!(
            "{PLUGIN_PATH_ENV}: cannot read directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == std::env::consts::DLL_EXTENSION))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every library in the directories of `$ECDIT_PLUGIN_PATH` (see
/// [`load_dirs`]); nothing when the variable is unset.
pub fn load_env_path(registry: &mut Registry) -> Vec<(PathBuf, Result<PluginInfo>)> {
    match std::env::var_os(PLUGIN_PATH_ENV) {
        Some(value) => load_dirs(registry, &value),
        None => Vec::new(),
    }
}

/// Loads every library in a `:`-separated list of directories. Returns one
/// result per file (or per unreadable directory), so a caller can report each
/// failure by plugin and go on with the rest.
pub fn load_dirs(registry: &mut Registry, dirs: &std::ffi::OsStr) -> Vec<(PathBuf, Result<PluginInfo>)> {
    let mut out = Vec::new();
    for dir in std::env::split_paths(dirs).filter(|d| !d.as_os_str().is_empty()) {
        match plugin_files(&dir) {
            Err(e) => out.push((dir, Err(e))),
            Ok(files) => {
                for file in files {
                    let result = load(registry, &file);
                    out.push((file, result));
                }
            }
        }
    }
    out
}

/// Runs `register` into a fresh registry, exports the result through the C
/// tables and registers it back through the host adapters, all in this
/// process: the full ABI round trip without a library file. The tables are
/// leaked like a loaded library. Tests use it to compare static and ABI paths.
pub fn load_in_process(
    registry: &mut Registry,
    name: &str,
    version: &str,
    register: fn(&mut Registry) -> Result<()>,
) -> Result<PluginInfo> {
    let exported: &'static Exported = Box::leak(Box::new(Exported::new(name, version, register)?));
    // SAFETY: the descriptor lives forever (leaked above).
    unsafe { register_descriptor(registry, exported.descriptor(), &format!("in-process:{name}")) }
}

/// Reads the `abi_version` and `struct_size` every ABI struct starts with.
///
/// # Safety
/// `p` is non-null and points to at least 8 readable bytes.
unsafe fn header_of(p: *const c_void) -> (u32, u32) {
    let h = p as *const u32;
    (std::ptr::read_unaligned(h), std::ptr::read_unaligned(h.add(1)))
}

fn check_header(what: &str, version: u32, size: u32, needed: usize) -> std::result::Result<(), String> {
    if version != ABI_VERSION {
        return Err(format!(
            "{what} speaks ecdit plugin ABI version {version}, this host speaks version {ABI_VERSION}; \
             rebuild the plugin against this engine's ecdit_plugin.h"
        ));
    }
    if (size as usize) < needed {
        return Err(format!(
            "{what} has struct_size {size} bytes but ABI version {ABI_VERSION} needs at least {needed}; \
             the plugin was built against a different ecdit_plugin.h"
        ));
    }
    Ok(())
}

/// Registers the components of a descriptor.
///
/// # Safety
/// `desc` is null or points to a descriptor whose pointers stay valid forever.
pub unsafe fn register_descriptor(
    registry: &mut Registry,
    desc: *const PluginDesc,
    origin: &str,
) -> Result<PluginInfo> {
    let fail = |plugin: &str, reason: String| EngineError::Plugin {
        plugin: plugin.to_string(),
        reason,
    };
    if desc.is_null() {
        return Err(fail(
            origin,
            format!("`{ENTRY_SYMBOL}` returned null (the plugin failed to initialise; see its log lines)"),
        ));
    }
    let (version, size) = header_of(desc as *const c_void);
    check_header("plugin descriptor", version, size, std::mem::size_of::<PluginDesc>()).map_err(|r| fail(origin, r))?;
    let d = &*desc;
    let name = cstr(d.name).ok_or_else(|| fail(origin, "descriptor has a null name".into()))?;
    let plugin_version = cstr(d.version).unwrap_or_default();
    let who = format!("'{name}' ({origin})");
    let component_origin = format!("plugin {name} {plugin_version} ({origin})");

    let mut pending: Vec<Pending> = Vec::new();
    let tables = |n: usize, p: *const *const c_void, family: &str| -> Result<Vec<*const c_void>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if p.is_null() {
            return Err(fail(
                &who,
                format!("{n} {family} tables announced but the array is null"),
            ));
        }
        let v = std::slice::from_raw_parts(p, n).to_vec();
        if let Some(i) = v.iter().position(|t| t.is_null()) {
            return Err(fail(&who, format!("{family} table {i} is null")));
        }
        Ok(v)
    };
    let plugin: Arc<str> = Arc::from(who.as_str());
    for t in tables(d.n_routers, d.routers as *const *const c_void, "router")? {
        let (v, s) = header_of(t);
        check_header("a router table", v, s, std::mem::size_of::<RouterVtable>()).map_err(|r| fail(&who, r))?;
        let vt = *(t as *const RouterVtable);
        let (info, _) = component_info(
            Family::Router,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(|r| fail(&who, r))?;
        let missing = missing_slots(&[
            ("create", vt.create.is_some()),
            ("destroy", vt.destroy.is_some()),
            ("route", vt.route.is_some()),
            ("free_result", vt.free_result.is_some()),
            ("backward", vt.backward.is_some()),
        ]);
        check_slots(&info, missing).map_err(|r| fail(&who, r))?;
        pending.push(Pending::Router(info, Table(vt)));
    }
    for t in tables(d.n_schedulers, d.schedulers as *const *const c_void, "scheduler")? {
        let (v, s) = header_of(t);
        check_header("a scheduler table", v, s, std::mem::size_of::<SchedulerVtable>()).map_err(|r| fail(&who, r))?;
        let vt = *(t as *const SchedulerVtable);
        let (info, _) = component_info(
            Family::Scheduler,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(|r| fail(&who, r))?;
        let missing = missing_slots(&[
            ("create", vt.create.is_some()),
            ("destroy", vt.destroy.is_some()),
            ("draw_t", vt.draw_t.is_some()),
            ("add_noise", vt.add_noise.is_some()),
            ("target", vt.target.is_some()),
            ("model_time", vt.model_time.is_some()),
            ("sampling_times", vt.sampling_times.is_some()),
            ("step", vt.step.is_some()),
        ]);
        check_slots(&info, missing).map_err(|r| fail(&who, r))?;
        pending.push(Pending::Scheduler(info, Table(vt)));
    }
    for t in tables(d.n_backends, d.backends as *const *const c_void, "backend")? {
        let (v, s) = header_of(t);
        check_header("a backend table", v, s, std::mem::size_of::<BackendVtable>()).map_err(|r| fail(&who, r))?;
        let vt = *(t as *const BackendVtable);
        let (info, _) = component_info(
            Family::Backend,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(|r| fail(&who, r))?;
        check_slots(&info, backend_missing_slots(&vt)).map_err(|r| fail(&who, r))?;
        pending.push(Pending::Backend(info, Table(vt)));
    }

    let infos: Vec<ComponentInfo> = pending.iter().map(|p| p.info().clone()).collect();
    registry.check_free(&infos).map_err(|e| fail(&who, e.to_string()))?;
    for p in pending {
        match p {
            Pending::Router(info, vt) => {
                let (plugin, kind) = (plugin.clone(), info.kind.clone());
                registry.register_router(
                    info,
                    Arc::new(move |params| {
                        let vt = vt.get();
                        let handle = create_instance(&plugin, "router", &kind, vt.create, vt.ctx, params)?;
                        Ok(Box::new(PluginRouter {
                            vt,
                            handle,
                            plugin: plugin.clone(),
                            kind: kind.clone(),
                            spec: spec_of(&kind, params),
                        }) as Box<dyn Router>)
                    }),
                )?;
            }
            Pending::Scheduler(info, vt) => {
                let (plugin, kind) = (plugin.clone(), info.kind.clone());
                registry.register_scheduler(
                    info,
                    Arc::new(move |params| {
                        let vt = vt.get();
                        let handle = create_instance(&plugin, "scheduler", &kind, vt.create, vt.ctx, params)?;
                        Ok(Box::new(PluginScheduler {
                            vt,
                            handle,
                            plugin: plugin.clone(),
                            kind: kind.clone(),
                            spec: spec_of(&kind, params),
                        }) as Box<dyn Scheduler>)
                    }),
                )?;
            }
            Pending::Backend(info, vt) => {
                let (plugin, kind) = (plugin.clone(), info.kind.clone());
                registry.register_backend(
                    info,
                    Arc::new(move |params| {
                        let vt = vt.get();
                        let handle = create_instance(&plugin, "backend", &kind, vt.create, vt.ctx, params)?;
                        let name = match vt.name {
                            Some(f) => cstr(f(handle)).unwrap_or_else(|| kind.clone()),
                            None => kind.clone(),
                        };
                        Ok(Box::new(PluginBackend {
                            vt,
                            handle,
                            plugin: plugin.clone(),
                            name,
                        }) as Box<dyn Backend>)
                    }),
                )?;
            }
        }
    }
    Ok(PluginInfo {
        name,
        version: plugin_version,
        path: origin.to_string(),
        components: infos,
    })
}

/// A vtable copy; its pointers lead into a library that is never unloaded and
/// its functions must be thread-safe (an ABI rule), so it may cross threads.
#[derive(Clone, Copy)]
struct Table<T>(T);
unsafe impl<T> Send for Table<T> {}
unsafe impl<T> Sync for Table<T> {}

impl<T: Copy> Table<T> {
    /// The table (a method, so closures capture the whole `Send` wrapper).
    fn get(&self) -> T {
        self.0
    }
}

enum Pending {
    Router(ComponentInfo, Table<RouterVtable>),
    Scheduler(ComponentInfo, Table<SchedulerVtable>),
    Backend(ComponentInfo, Table<BackendVtable>),
}

impl Pending {
    fn info(&self) -> &ComponentInfo {
        match self {
            Pending::Router(i, _) | Pending::Scheduler(i, _) | Pending::Backend(i, _) => i,
        }
    }
}

unsafe fn component_info(
    family: Family,
    kind: *const c_char,
    description: *const c_char,
    params_json: *const c_char,
    origin: &str,
) -> std::result::Result<(ComponentInfo, ()), String> {
    let kind = cstr(kind).ok_or_else(|| format!("a {family} table has a null kind"))?;
    if kind.is_empty() {
        return Err(format!("a {family} table has an empty kind"));
    }
    let description = cstr(description).unwrap_or_default();
    let json = cstr(params_json).unwrap_or_else(|| "[]".into());
    let params: Vec<ParamInfo> = serde_json::from_str(&json)
        .map_err(|e| format!("{family} '{kind}': params_json is not a list of parameters: {e} (got {json})"))?;
    Ok((
        ComponentInfo {
            family,
            kind,
            description,
            params,
            origin: origin.to_string(),
        },
        (),
    ))
}

fn missing_slots(slots: &[(&str, bool)]) -> Vec<String> {
    slots.iter().filter(|(_, ok)| !ok).map(|(n, _)| n.to_string()).collect()
}

fn check_slots(info: &ComponentInfo, missing: Vec<String>) -> std::result::Result<(), String> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} '{}' leaves required function slots null: {}",
            info.family,
            info.kind,
            missing.join(", ")
        ))
    }
}

fn backend_missing_slots(vt: &BackendVtable) -> Vec<String> {
    missing_slots(&[
        ("create", vt.create.is_some()),
        ("destroy", vt.destroy.is_some()),
        ("name", vt.name.is_some()),
        ("threads", vt.threads.is_some()),
        ("gemm", vt.gemm.is_some()),
        ("gemm_batched", vt.gemm_batched.is_some()),
        ("add_bias", vt.add_bias.is_some()),
        ("sum_rows", vt.sum_rows.is_some()),
        ("softmax_rows", vt.softmax_rows.is_some()),
        ("softmax_rows_backward", vt.softmax_rows_backward.is_some()),
        ("layer_norm", vt.layer_norm.is_some()),
        ("layer_norm_backward", vt.layer_norm_backward.is_some()),
        ("unary", vt.unary.is_some()),
        ("unary_backward", vt.unary_backward.is_some()),
        ("attention", vt.attention.is_some()),
        ("attention_backward", vt.attention_backward.is_some()),
        ("gather_rows", vt.gather_rows.is_some()),
        ("scatter_add_rows", vt.scatter_add_rows.is_some()),
        ("top_k_rows", vt.top_k_rows.is_some()),
        ("adamw_step", vt.adamw_step.is_some()),
    ])
}

fn spec_of(kind: &str, params: &Map<String, Value>) -> Value {
    let mut spec = params.clone();
    spec.insert("kind".into(), Value::String(kind.to_string()));
    Value::Object(spec)
}

/// An error buffer on the stack and the status check after a call.
struct Call {
    buf: [u8; ERR_CAP],
}

impl Call {
    fn new() -> Self {
        Self { buf: [0; ERR_CAP] }
    }

    fn err(&mut self) -> ErrBuf {
        ErrBuf {
            msg: self.buf.as_mut_ptr() as *mut c_char,
            cap: ERR_CAP,
        }
    }

    fn message(&self) -> String {
        let end = self.buf.iter().position(|&b| b == 0).unwrap_or(ERR_CAP);
        String::from_utf8_lossy(&self.buf[..end]).into_owned()
    }

    /// Turns a status into a result naming the plugin and the operation;
    /// `what` is only formatted on failure (no allocation per successful call).
    fn check(&self, status: i32, plugin: &str, what: impl std::fmt::Display) -> Result<()> {
        let reason = match status {
            STATUS_OK => return Ok(()),
            STATUS_PANIC => format!("{what} panicked inside the plugin: {}", self.message()),
            STATUS_ERROR => format!("{what} failed: {}", self.message()),
            other => format!("{what} returned unknown status {other}: {}", self.message()),
        };
        Err(EngineError::Plugin {
            plugin: plugin.to_string(),
            reason,
        })
    }
}

fn slot<F>(f: Option<F>, plugin: &str, what: &str) -> Result<F> {
    f.ok_or_else(|| EngineError::Plugin {
        plugin: plugin.to_string(),
        reason: format!("{what}: function slot is null"),
    })
}

fn create_instance(
    plugin: &str,
    family: &str,
    kind: &str,
    create: Option<CreateFn>,
    ctx: *const c_void,
    params: &Map<String, Value>,
) -> Result<*mut c_void> {
    let what = format!("{family} '{kind}' create");
    let create = slot(create, plugin, &what)?;
    let json = Value::Object(params.clone()).to_string();
    let mut call = Call::new();
    let mut err = call.err();
    let mut handle: *mut c_void = std::ptr::null_mut();
    // SAFETY: per the ABI; `json` outlives the call.
    let status = unsafe { create(ctx, json.as_ptr() as *const c_char, json.len(), &mut handle, &mut err) };
    call.check(status, plugin, &what)?;
    if handle.is_null() {
        return Err(EngineError::Plugin {
            plugin: plugin.to_string(),
            reason: format!("{what} reported success but returned a null handle"),
        });
    }
    Ok(handle)
}

// ---------------------------------------------------------------- routers

/// A router living in a plugin.
struct PluginRouter {
    vt: RouterVtable,
    handle: *mut c_void,
    plugin: Arc<str>,
    kind: String,
    spec: Value,
}

// SAFETY: the ABI requires instance handles to be usable from any thread.
unsafe impl Send for PluginRouter {}
unsafe impl Sync for PluginRouter {}

impl Drop for PluginRouter {
    fn drop(&mut self) {
        if let Some(destroy) = self.vt.destroy {
            // SAFETY: the handle came from this table's `create`, dropped once.
            unsafe { destroy(self.handle) }
        }
    }
}

impl PluginRouter {
    fn bad(&self, reason: String) -> EngineError {
        EngineError::Plugin {
            plugin: self.plugin.to_string(),
            reason: format!("router '{}': {reason}", self.kind),
        }
    }

    /// Copies a route result out of plugin memory, checking lengths first.
    unsafe fn copy_view(&self, v: &RoutingView, shape: RouteShape) -> Result<Routing> {
        if v.experts != shape.experts || v.tokens_total != shape.tokens() {
            return Err(self.bad(format!(
                "returned a dispatch for {} experts x {} tokens, asked for {} x {}",
                v.experts,
                v.tokens_total,
                shape.experts,
                shape.tokens()
            )));
        }
        let probs_len = shape.tokens() * shape.experts;
        if v.probs_len != probs_len {
            return Err(self.bad(format!("returned {} probabilities, expected {probs_len}", v.probs_len)));
        }
        if v.offsets.is_null() || (v.slots > 0 && (v.tokens.is_null() || v.gates.is_null())) {
            return Err(self.bad("returned null dispatch buffers".into()));
        }
        if probs_len > 0 && v.probs.is_null() {
            return Err(self.bad("returned null probabilities".into()));
        }
        let offsets = std::slice::from_raw_parts(v.offsets, v.experts + 1).to_vec();
        let (tokens, gates) = if v.slots == 0 {
            (Vec::new(), Vec::new())
        } else {
            (
                std::slice::from_raw_parts(v.tokens, v.slots).to_vec(),
                std::slice::from_raw_parts(v.gates, v.slots).to_vec(),
            )
        };
        let probs = if probs_len == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(v.probs, probs_len).to_vec()
        };
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
}

impl Router for PluginRouter {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn spec(&self) -> Value {
        self.spec.clone()
    }

    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        let route = slot(self.vt.route, &self.plugin, "route")?;
        let free_result = slot(self.vt.free_result, &self.plugin, "free_result")?;
        let mut call = Call::new();
        let mut err = call.err();
        // SAFETY: all-zero is a valid RoutingView (null pointers, zero lengths).
        let mut view: RoutingView = unsafe { std::mem::zeroed() };
        let mut result: *mut c_void = std::ptr::null_mut();
        let _span = tracing::trace_span!("plugin_route", kind = %self.kind).entered();
        // SAFETY: per the ABI; `scores` outlives the call.
        let status = unsafe {
            route(
                self.handle,
                &mut view,
                &mut result,
                as_f32s(scores),
                shape.samples,
                shape.tokens_per_sample,
                shape.experts,
                &mut err,
            )
        };
        let copied = if status == STATUS_OK {
            Some(unsafe { self.copy_view(&view, shape) })
        } else {
            None
        };
        if !result.is_null() {
            // SAFETY: the result came from this table's `route`.
            unsafe { free_result(result) }
        }
        call.check(status, &self.plugin, format_args!("router '{}' route", self.kind))?;
        let mut routing = copied.unwrap_or_else(|| Err(self.bad("route returned no result".into())))?;
        let who = "route";
        routing.dispatch.validate(who).map_err(|e| self.bad(e.to_string()))?;
        check_finite("router probabilities", &routing.probs).map_err(|e| self.bad(e.to_string()))?;
        if let Some(aux) = routing.aux_loss.filter(|a| !a.is_finite()) {
            return Err(self.bad(format!("returned a non-finite auxiliary loss {aux}")));
        }
        routing.stats = RoutingStats::compute(&routing.dispatch, &routing.probs);
        Ok(routing)
    }

    fn backward(
        &self,
        routing: &Routing,
        scores: &[f32],
        grad_gates: &[f32],
        grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()> {
        let backward = slot(self.vt.backward, &self.plugin, "backward")?;
        let d = &routing.dispatch;
        if d.offsets.len() != d.experts + 1 || d.gates.len() != d.tokens.len() {
            return Err(EngineError::shape(
                "router backward (routing)",
                format!("{} offsets and gates for {} slots", d.experts + 1, d.tokens.len()),
                format!("{} offsets and {} gates", d.offsets.len(), d.gates.len()),
            ));
        }
        let view = RoutingView {
            experts: d.experts,
            tokens_total: d.tokens_total,
            offsets: d.offsets.as_ptr(),
            tokens: d.tokens.as_ptr(),
            gates: d.gates.as_ptr(),
            slots: d.tokens.len(),
            probs: routing.probs.as_ptr(),
            probs_len: routing.probs.len(),
            has_aux: routing.aux_loss.is_some() as u32,
            aux_loss: routing.aux_loss.unwrap_or(0.0),
            group_size: routing.group_size,
        };
        let mut call = Call::new();
        let mut err = call.err();
        // SAFETY: per the ABI; every buffer outlives the call.
        let status = unsafe {
            backward(
                self.handle,
                as_f32s_mut(grad_scores),
                &view,
                as_f32s(scores),
                as_f32s(grad_gates),
                grad_aux,
                &mut err,
            )
        };
        call.check(status, &self.plugin, format_args!("router '{}' backward", self.kind))?;
        check_finite("router score gradients", grad_scores).map_err(|e| self.bad(e.to_string()))
    }
}

// ---------------------------------------------------------------- schedulers

/// A scheduler living in a plugin. The trait's infallible methods log a
/// plugin failure and return NaN (or no times) so the caller's checks trip.
struct PluginScheduler {
    vt: SchedulerVtable,
    handle: *mut c_void,
    plugin: Arc<str>,
    kind: String,
    spec: Value,
}

// SAFETY: the ABI requires instance handles to be usable from any thread.
unsafe impl Send for PluginScheduler {}
unsafe impl Sync for PluginScheduler {}

impl Drop for PluginScheduler {
    fn drop(&mut self) {
        if let Some(destroy) = self.vt.destroy {
            // SAFETY: the handle came from this table's `create`, dropped once.
            unsafe { destroy(self.handle) }
        }
    }
}

/// The host generator, lent to the plugin for one `draw_t`.
struct LentRng<'a>(&'a mut dyn rand::RngCore);

unsafe extern "C" fn rng_next_u32(ctx: *mut c_void) -> u32 {
    catch_unwind(AssertUnwindSafe(|| (*(ctx as *mut LentRng)).0.next_u32())).unwrap_or(0)
}
unsafe extern "C" fn rng_next_u64(ctx: *mut c_void) -> u64 {
    catch_unwind(AssertUnwindSafe(|| (*(ctx as *mut LentRng)).0.next_u64())).unwrap_or(0)
}
unsafe extern "C" fn rng_fill_bytes(ctx: *mut c_void, out: *mut u8, len: usize) {
    if out.is_null() || len == 0 {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        (*(ctx as *mut LentRng))
            .0
            .fill_bytes(std::slice::from_raw_parts_mut(out, len))
    }));
}

impl PluginScheduler {
    fn what(&self, op: &str) -> String {
        format!("scheduler '{}' {op}", self.kind)
    }

    fn logged<T>(&self, r: Result<T>, fallback: T) -> T {
        r.unwrap_or_else(|e| {
            tracing::error!("{e}");
            fallback
        })
    }
}

impl Scheduler for PluginScheduler {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn spec(&self) -> Value {
        self.spec.clone()
    }

    fn draw_t(&self, rng: &mut dyn rand::RngCore) -> f32 {
        let r = (|| {
            let f = slot(self.vt.draw_t, &self.plugin, "draw_t")?;
            let mut lent = LentRng(rng);
            let abi_rng = Rng {
                ctx: &mut lent as *mut LentRng as *mut c_void,
                next_u32: Some(rng_next_u32),
                next_u64: Some(rng_next_u64),
                fill_bytes: Some(rng_fill_bytes),
            };
            let (mut call, mut t) = (Call::new(), f32::NAN);
            let mut err = call.err();
            let status = unsafe { f(self.handle, &mut t, &abi_rng, &mut err) };
            call.check(status, &self.plugin, self.what("draw_t"))?;
            Ok(t)
        })();
        self.logged(r, f32::NAN)
    }

    fn add_noise(&self, x_t: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        let f = slot(self.vt.add_noise, &self.plugin, "add_noise")?;
        let mut call = Call::new();
        let mut err = call.err();
        let status = unsafe { f(self.handle, as_f32s_mut(x_t), as_f32s(x0), as_f32s(noise), t, &mut err) };
        call.check(status, &self.plugin, self.what("add_noise"))
    }

    fn target(&self, target: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        let f = slot(self.vt.target, &self.plugin, "target")?;
        let mut call = Call::new();
        let mut err = call.err();
        let status = unsafe {
            f(
                self.handle,
                as_f32s_mut(target),
                as_f32s(x0),
                as_f32s(noise),
                t,
                &mut err,
            )
        };
        call.check(status, &self.plugin, self.what("target"))
    }

    fn model_time(&self, t: f32) -> f32 {
        let r = (|| {
            let f = slot(self.vt.model_time, &self.plugin, "model_time")?;
            let (mut call, mut out) = (Call::new(), f32::NAN);
            let mut err = call.err();
            let status = unsafe { f(self.handle, &mut out, t, &mut err) };
            call.check(status, &self.plugin, self.what("model_time"))?;
            Ok(out)
        })();
        self.logged(r, f32::NAN)
    }

    fn sampling_times(&self, steps: usize) -> Vec<f32> {
        let r = (|| {
            let f = slot(self.vt.sampling_times, &self.plugin, "sampling_times")?;
            let mut out = vec![f32::NAN; steps + 1];
            let mut call = Call::new();
            let mut err = call.err();
            let status = unsafe { f(self.handle, as_f32s_mut(&mut out), steps, &mut err) };
            call.check(status, &self.plugin, self.what("sampling_times"))?;
            Ok(out)
        })();
        self.logged(r, Vec::new())
    }

    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()> {
        let f = slot(self.vt.step, &self.plugin, "step")?;
        let mut call = Call::new();
        let mut err = call.err();
        let status = unsafe { f(self.handle, as_f32s_mut(x), as_f32s(model_out), t, t_next, &mut err) };
        call.check(status, &self.plugin, self.what("step"))
    }
}

// ---------------------------------------------------------------- backends

/// A backend living in a plugin.
struct PluginBackend {
    vt: BackendVtable,
    handle: *mut c_void,
    plugin: Arc<str>,
    name: String,
}

// SAFETY: the ABI requires instance handles to be usable from any thread.
unsafe impl Send for PluginBackend {}
unsafe impl Sync for PluginBackend {}

impl Drop for PluginBackend {
    fn drop(&mut self) {
        if let Some(destroy) = self.vt.destroy {
            // SAFETY: the handle came from this table's `create`, dropped once.
            unsafe { destroy(self.handle) }
        }
    }
}

fn gemm_c(d: GemmDims) -> GemmDimsC {
    GemmDimsC {
        m: d.m,
        n: d.n,
        k: d.k,
        trans_a: d.trans_a as u32,
        trans_b: d.trans_b as u32,
    }
}

fn attn_c(d: AttnDims) -> AttnDimsC {
    AttnDimsC {
        batch: d.batch,
        heads: d.heads,
        kv_heads: d.kv_heads,
        q_len: d.q_len,
        kv_len: d.kv_len,
        head_dim: d.head_dim,
    }
}

fn unary_c(op: Unary) -> u32 {
    match op {
        Unary::GeluTanh => UNARY_GELU_TANH,
        Unary::Silu => UNARY_SILU,
    }
}

fn u32s(s: &[u32]) -> U32s {
    U32s {
        ptr: s.as_ptr(),
        len: s.len(),
    }
}

impl PluginBackend {
    /// Calls one op slot with a fresh error buffer and checks its status.
    fn call<F>(&self, op: &str, f: Option<F>, body: impl FnOnce(F, *mut ErrBuf) -> i32) -> Result<()> {
        let f = slot(f, &self.plugin, op)?;
        let mut call = Call::new();
        let mut err = call.err();
        let status = body(f, &mut err);
        call.check(status, &self.plugin, format_args!("backend '{}' {op}", self.name))
    }
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> usize {
        self.vt.threads.map_or(1, |f| unsafe { f(self.handle) })
    }

    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], dims: GemmDims, alpha: f32, beta: f32) -> Result<()> {
        self.call("gemm", self.vt.gemm, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s(a),
                as_f32s(b),
                gemm_c(dims),
                alpha,
                beta,
                e,
            )
        })
    }

    fn gemm_batched(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.call("gemm_batched", self.vt.gemm_batched, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s(a),
                as_f32s(b),
                batch,
                gemm_c(dims),
                alpha,
                beta,
                e,
            )
        })
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.call("add_bias", self.vt.add_bias, |f, e| unsafe {
            f(self.handle, as_f32s_mut(out), as_f32s(bias), rows, cols, e)
        })
    }

    fn sum_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        self.call("sum_rows", self.vt.sum_rows, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s(inp),
                rows,
                cols,
                accumulate as u32,
                e,
            )
        })
    }

    fn softmax_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.call("softmax_rows", self.vt.softmax_rows, |f, e| unsafe {
            f(self.handle, as_f32s_mut(out), as_f32s(inp), rows, cols, e)
        })
    }

    fn softmax_rows_backward(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.call("softmax_rows_backward", self.vt.softmax_rows_backward, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(dinp),
                as_f32s(dout),
                as_f32s(out),
                rows,
                cols,
                e,
            )
        })
    }

    fn layer_norm(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: Option<&[f32]>,
        bias: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        self.call("layer_norm", self.vt.layer_norm, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s_mut(mean),
                as_f32s_mut(rstd),
                as_f32s(inp),
                as_opt_f32s(weight),
                as_opt_f32s(bias),
                rows,
                cols,
                eps,
                e,
            )
        })
    }

    fn layer_norm_backward(
        &self,
        dinp: &mut [f32],
        dweight: Option<&mut [f32]>,
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        weight: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.call("layer_norm_backward", self.vt.layer_norm_backward, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(dinp),
                as_opt_f32s_mut(dweight),
                as_opt_f32s_mut(dbias),
                as_f32s(dout),
                as_f32s(inp),
                as_f32s(mean),
                as_f32s(rstd),
                as_opt_f32s(weight),
                rows,
                cols,
                e,
            )
        })
    }

    fn unary(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.call("unary", self.vt.unary, |f, e| unsafe {
            f(self.handle, unary_c(op), as_f32s_mut(out), as_f32s(inp), e)
        })
    }

    fn unary_backward(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        self.call("unary_backward", self.vt.unary_backward, |f, e| unsafe {
            f(
                self.handle,
                unary_c(op),
                as_f32s_mut(dinp),
                as_f32s(dout),
                as_f32s(inp),
                e,
            )
        })
    }

    fn attention(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&[u8]>,
        dims: AttnDims,
    ) -> Result<()> {
        let mask = key_mask.map_or(
            U8s {
                ptr: std::ptr::null(),
                len: 0,
            },
            |m| U8s {
                ptr: m.as_ptr(),
                len: m.len(),
            },
        );
        self.call("attention", self.vt.attention, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s_mut(probs),
                as_f32s(q),
                as_f32s(k),
                as_f32s(v),
                mask,
                attn_c(dims),
                e,
            )
        })
    }

    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttnDims,
    ) -> Result<()> {
        self.call("attention_backward", self.vt.attention_backward, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(dq),
                as_f32s_mut(dk),
                as_f32s_mut(dv),
                as_f32s(dout),
                as_f32s(probs),
                as_f32s(q),
                as_f32s(k),
                as_f32s(v),
                attn_c(dims),
                e,
            )
        })
    }

    fn gather_rows(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()> {
        self.call("gather_rows", self.vt.gather_rows, |f, e| unsafe {
            f(self.handle, as_f32s_mut(out), as_f32s(inp), u32s(idx), cols, e)
        })
    }

    fn scatter_add_rows(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()> {
        self.call("scatter_add_rows", self.vt.scatter_add_rows, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(out),
                as_f32s(inp),
                u32s(idx),
                as_opt_f32s(scale),
                cols,
                e,
            )
        })
    }

    fn top_k_rows(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        let idx = U32sMut {
            ptr: idx.as_mut_ptr(),
            len: idx.len(),
        };
        self.call("top_k_rows", self.vt.top_k_rows, |f, e| unsafe {
            f(self.handle, idx, as_f32s_mut(val), as_f32s(inp), rows, cols, k, e)
        })
    }

    fn adamw_step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        let hp = AdamWC {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
        };
        self.call("adamw_step", self.vt.adamw_step, |f, e| unsafe {
            f(
                self.handle,
                as_f32s_mut(param),
                as_f32s(grad),
                as_f32s_mut(m),
                as_f32s_mut(v),
                hp,
                step,
                e,
            )
        })
    }
}
