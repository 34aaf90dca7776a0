//! The plugin side: turns the components a `register` function puts into a
//! [`Registry`] into the C tables of [`abi`](super::abi), one file per
//! component kind.
//!
//! A Rust plugin is an ordinary trait impl plus one line:
//!
//! ```ignore
//! ecdit_engine::export_plugin!(my_crate::register);
//! ```
//!
//! in a `cdylib` crate. Every exported function runs inside [`guard`], so a
//! panic becomes [`STATUS_PANIC`] with its message and never unwinds into the host.

pub mod backend;
pub mod expert;
pub mod router;
pub mod scheduler;

use super::abi::*;
use super::write_err;
use crate::error::{EngineError, Result};
use crate::registry::{ComponentInfo, Factory, Family, ParamInfo, Registry};
use crate::spec::check_params;
use serde_json::{Map, Value};
use std::any::Any;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Exports `register`'s routers, schedulers, backends and experts as an ecdit
/// plugin: defines the `ecdit_plugin_entry` symbol. Use it once, in a `cdylib` crate.
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

/// Runs an infallible slot body; a panic gives `fallback` (the host checks it).
pub(crate) fn quiet<R>(fallback: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
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
pub(crate) struct ComponentCtx<T> {
    label: String,
    params: Vec<ParamInfo>,
    factory: Factory<T>,
}

// SAFETY (for the `Any` box): the factory is `Send + Sync`, the rest is owned data.
unsafe impl<T> Send for ComponentCtx<T> {}
unsafe impl<T> Sync for ComponentCtx<T> {}

/// The strings a table header points to.
pub(crate) struct Header {
    pub(crate) kind: *const c_char,
    pub(crate) description: *const c_char,
    pub(crate) params_json: *const c_char,
    pub(crate) ctx: *const c_void,
}

/// The C tables of one plugin, owning everything they point to.
pub struct Exported {
    desc: Box<PluginDesc>,
    _strings: Vec<CString>,
    _features: Vec<*const c_char>,
    _routers: (Vec<RouterVtable>, Vec<*const RouterVtable>),
    _schedulers: (Vec<SchedulerVtable>, Vec<*const SchedulerVtable>),
    _backends: (Vec<BackendVtable>, Vec<*const BackendVtable>),
    _experts: (Vec<ExpertVtable>, Vec<*const ExpertVtable>),
    _ctxs: Vec<Box<dyn Any + Send + Sync>>,
}

// SAFETY: the tables are immutable after construction and point only into
// boxes `Exported` owns; the factories behind `ctx` are `Send + Sync`.
unsafe impl Send for Exported {}
unsafe impl Sync for Exported {}

/// Builds the headers of one plugin's tables, keeping what they point to.
struct Builder<'a> {
    plugin: &'a str,
    strings: Vec<CString>,
    ctxs: Vec<Box<dyn Any + Send + Sync>>,
}

impl Builder<'_> {
    fn string(&mut self, s: &str, what: &str) -> Result<*const c_char> {
        let c = CString::new(s)
            .map_err(|_| EngineError::Other(format!("plugin {}: {what} '{s}' contains a NUL byte", self.plugin)))?;
        let p = c.as_ptr();
        self.strings.push(c);
        Ok(p)
    }

    fn header<T: 'static>(&mut self, info: &ComponentInfo, factory: Factory<T>) -> Result<Header> {
        let json = serde_json::to_string(&info.params)
            .map_err(|e| EngineError::Other(format!("plugin {}: params of '{}': {e}", self.plugin, info.kind)))?;
        let ctx = Box::new(ComponentCtx {
            label: format!("{} '{}'", info.family, info.kind),
            params: info.params.clone(),
            factory,
        });
        let ctx_ptr = &*ctx as *const ComponentCtx<T> as *const c_void;
        self.ctxs.push(ctx);
        Ok(Header {
            kind: self.string(&info.kind, "kind")?,
            description: self.string(&info.description, "description")?,
            params_json: self.string(&json, "params")?,
            ctx: ctx_ptr,
        })
    }
}

fn pointers<T>(tables: Vec<T>) -> (Vec<T>, Vec<*const T>) {
    // The table vector is complete and never grows again, so these stay valid.
    let ptrs = tables.iter().map(|t| t as *const T).collect();
    (tables, ptrs)
}

impl Exported {
    /// Runs `register` on an empty registry and exports what it registered.
    pub fn new(name: &str, version: &str, register: fn(&mut Registry) -> Result<()>) -> Result<Self> {
        let mut registry = Registry::new();
        register(&mut registry)?;
        Self::from_registry(name, version, &registry)
    }

    /// Exports every router, scheduler, backend and expert of `registry`.
    pub fn from_registry(name: &str, version: &str, registry: &Registry) -> Result<Self> {
        let mut b = Builder {
            plugin: name,
            strings: Vec::new(),
            ctxs: Vec::new(),
        };
        let mut routers = Vec::new();
        for (info, factory) in registry.router_factories() {
            routers.push(router::table(b.header(&info, factory)?));
        }
        let mut schedulers = Vec::new();
        for (info, factory) in registry.scheduler_factories() {
            schedulers.push(scheduler::table(b.header(&info, factory)?));
        }
        let mut backends = Vec::new();
        for (info, factory) in registry.backend_factories() {
            backends.push(backend::table(b.header(&info, factory)?));
        }
        let mut experts = Vec::new();
        for (info, factory) in registry.expert_factories() {
            experts.push(expert::table(b.header(&info, factory)?));
        }
        // Says what crosses, inside the plugin: the host sees it through the log forwarder.
        tracing::debug!(
            "plugin {name}: exporting over ABI {ABI_VERSION}: {} routers, {} schedulers, {} backends, experts [{}]",
            routers.len(),
            schedulers.len(),
            backends.len(),
            registry
                .list()
                .iter()
                .filter(|c| c.family == Family::Expert)
                .map(|c| c.kind.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut features = Vec::new();
        for f in FEATURES {
            features.push(b.string(f, "feature")?);
        }
        features.push(std::ptr::null());
        let name_p = b.string(name, "plugin name")?;
        let version_p = b.string(version, "plugin version")?;
        let (routers, schedulers, backends, experts) = (
            pointers(routers),
            pointers(schedulers),
            pointers(backends),
            pointers(experts),
        );
        let desc = Box::new(PluginDesc {
            abi_version: ABI_VERSION,
            struct_size: std::mem::size_of::<PluginDesc>() as u32,
            name: name_p,
            version: version_p,
            n_routers: routers.1.len(),
            routers: routers.1.as_ptr(),
            n_schedulers: schedulers.1.len(),
            schedulers: schedulers.1.as_ptr(),
            n_backends: backends.1.len(),
            backends: backends.1.as_ptr(),
            features: features.as_ptr(),
            n_experts: experts.1.len(),
            experts: experts.1.as_ptr(),
        });
        Ok(Self {
            desc,
            _strings: b.strings,
            _features: features,
            _routers: routers,
            _schedulers: schedulers,
            _backends: backends,
            _experts: experts,
            _ctxs: b.ctxs,
        })
    }

    /// The descriptor, valid while `self` lives.
    pub fn descriptor(&self) -> *const PluginDesc {
        &*self.desc
    }
}

pub(crate) fn not_null<T>(p: *const T, what: &str) -> Result<()> {
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
pub(crate) trait Instance: Sized + 'static {
    fn into_handle(self) -> *mut c_void;
    /// # Safety
    /// `h` came from `into_handle` of the same type and is dropped once.
    unsafe fn drop_handle(h: *mut c_void);
}

/// `create` of every table: checks the parameters and runs the factory.
pub(crate) unsafe extern "C" fn create<T: Instance>(
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

/// `destroy` of every table.
pub(crate) unsafe extern "C" fn destroy<T: Instance>(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| T::drop_handle(handle)));
}

/// The object behind a handle made by `into_handle` of a `Box<T>` boxed again.
pub(crate) unsafe fn obj<'a, T: ?Sized>(handle: *mut c_void) -> Result<&'a T>
where
    Box<T>: 'static,
{
    not_null(handle, "handle")?;
    Ok(&**(handle as *const Box<T>))
}
