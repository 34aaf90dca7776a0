//! The host side: loading plugin libraries, checking them, and adapters that
//! turn their C tables back into components of the [`Registry`], one file per
//! component kind.
//!
//! Checks before anything is registered: the file opens as a library, it
//! exports `ecdit_plugin_entry`, the entry returns a descriptor, the descriptor
//! and every table speak a version this host reads and are at least as large
//! as the part of that version that has no default, every required slot is
//! filled, every `params_json` parses, and no kind clashes with a registered
//! one ([`Registry::check_free`]). A plugin registers all of its components or
//! none. Tables are read through their `struct_size`: what a shorter table
//! lacks reads as NULL and takes its documented default.
//!
//! Versions: ABI 2 is this host's. An ABI 1 library (module `v1`) still loads its
//! routers and schedulers (their tables are prefixes of ABI 2's); an ABI 1
//! backend is refused with an error naming both versions, since it passed host
//! slices where ABI 2 passes device buffers.
//!
//! At run time every dispatch a plugin router returns is validated
//! ([`crate::Dispatch::validate`]), so a misbehaving router is an error, not a crash.
//!
//! Libraries are never unloaded. Objects built from a plugin (a router inside a
//! model, a backend's worker threads or buffers, a `tracing` subscriber
//! installed at entry) can outlive the registry that loaded them, and calling
//! into an unmapped library is a crash, not an error. So the
//! `libloading::Library` is leaked on purpose, as ggml does with its backends:
//! the cost is a mapping per plugin.

pub(crate) mod backend;
pub(crate) mod expert;
pub(crate) mod router;
pub(crate) mod scheduler;
pub(crate) mod v1;

use super::abi::*;
use super::abi_v1::ABI_VERSION_V1;
use super::export::Exported;
use super::{cstr, read_table, string_list, ERR_CAP};
use crate::error::{EngineError, Result};
use crate::registry::{ComponentInfo, Family, ParamInfo, Registry};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

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
    /// The ABI version its descriptor speaks (1 or 2).
    pub abi_version: u32,
    /// Its features (unknown ones included; the host ignores those).
    pub features: Vec<String>,
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
/// schedulers, backends and experts into `registry` (all or none). The library stays
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
        log: Some(crate::plugin::log::host_log),
        max_level: crate::plugin::log::host_max_level(),
        features: host_features(),
    }));
    // SAFETY: calling the entry per the ABI; it returns null or a descriptor.
    let desc = unsafe { entry(host) };
    let info = unsafe { register_descriptor(registry, desc, &origin) }?;
    tracing::info!(
        "loaded plugin {} {} (ABI {}) from {origin}: {} components",
        info.name,
        info.version,
        info.abi_version,
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
pub(crate) unsafe fn header_of(p: *const c_void) -> (u32, u32) {
    let h = p as *const u32;
    (std::ptr::read_unaligned(h), std::ptr::read_unaligned(h.add(1)))
}

/// The host's features, as the NULL-terminated array [`Host::features`] lends
/// (built once, kept for the life of the process).
fn host_features() -> *const *const c_char {
    struct List(#[allow(dead_code)] Vec<CString>, Vec<*const c_char>);
    // SAFETY: immutable after construction; the pointers lead into the strings it owns.
    unsafe impl Send for List {}
    unsafe impl Sync for List {}
    static LIST: OnceLock<List> = OnceLock::new();
    let list = LIST.get_or_init(|| {
        let strings: Vec<CString> = FEATURES.iter().map(|f| CString::new(*f).unwrap_or_default()).collect();
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        List(strings, ptrs)
    });
    list.1.as_ptr()
}

/// Checks the version and size of a descriptor or table: `needed` is the
/// size of the part without defaults.
pub(crate) fn check_header(
    what: &str,
    version: u32,
    want: u32,
    size: u32,
    needed: usize,
) -> std::result::Result<(), String> {
    if version != want {
        let why = if want != ABI_VERSION {
            // A table inside an older descriptor.
            format!("but a version {want} plugin descriptor holds only version {want} tables")
        } else if version == ABI_VERSION_V1 && what != "plugin descriptor" {
            format!(
                "but a version {ABI_VERSION} plugin descriptor holds only version {ABI_VERSION} tables \
                 (version {ABI_VERSION_V1} routers and schedulers load only from a whole version \
                 {ABI_VERSION_V1} plugin)"
            )
        } else {
            format!(
                "this host speaks version {ABI_VERSION} (and reads version {ABI_VERSION_V1} routers and schedulers)"
            )
        };
        return Err(format!(
            "{what} speaks ecdit plugin ABI version {version}, {why}; rebuild the plugin against this \
             engine's ecdit_plugin.h"
        ));
    }
    if (size as usize) < needed {
        return Err(format!(
            "{what} has struct_size {size} bytes but ABI version {version} needs at least {needed}; \
             the plugin was built against a different ecdit_plugin.h"
        ));
    }
    // Every ABI struct holds pointers, so its size is a whole number of them;
    // any other size would make the host read a pointer in part (found by fuzzing).
    let align = std::mem::align_of::<*const c_void>();
    if !(size as usize).is_multiple_of(align) {
        return Err(format!(
            "{what} has struct_size {size} bytes, not a multiple of {align}: no C struct of this ABI has \
             that size (its last pointer would be read in part); the plugin fills struct_size wrongly"
        ));
    }
    Ok(())
}

/// A table copy; its pointers lead into a library that is never unloaded and
/// its functions must be thread-safe (an ABI rule), so it may cross threads.
#[derive(Clone, Copy)]
pub(crate) struct Table<T>(T);
unsafe impl<T> Send for Table<T> {}
unsafe impl<T> Sync for Table<T> {}

impl<T: Copy> Table<T> {
    /// The table (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(&self) -> T {
        self.0
    }
}

/// A checked component waiting for the all-or-nothing registration.
#[allow(clippy::large_enum_variant)] // a handful per plugin, at load time
pub(crate) enum Pending {
    Router(ComponentInfo, Table<RouterVtable>),
    Scheduler(ComponentInfo, Table<SchedulerVtable>),
    Backend(ComponentInfo, Table<BackendVtable>),
    Expert(ComponentInfo, Table<ExpertVtable>),
}

impl Pending {
    fn info(&self) -> &ComponentInfo {
        match self {
            Pending::Router(i, _) | Pending::Scheduler(i, _) | Pending::Backend(i, _) | Pending::Expert(i, _) => i,
        }
    }
}

/// What a descriptor of either version brought, checked.
pub(crate) struct Parsed {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) abi_version: u32,
    pub(crate) features: Vec<String>,
    pub(crate) pending: Vec<Pending>,
}

/// The table pointers of one family (errors on a null array or entry).
pub(crate) unsafe fn tables(
    n: usize,
    p: *const *const c_void,
    family: &str,
) -> std::result::Result<Vec<*const c_void>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(format!("{n} {family} tables announced but the array is null"));
    }
    crate::plugin::check_count(
        n,
        crate::plugin::MAX_LIST,
        size_of::<*const c_void>(),
        &format!("{family} tables"),
    )
    .map_err(|e| e.to_string())?;
    let v = std::slice::from_raw_parts(p, n).to_vec();
    if let Some(i) = v.iter().position(|t| t.is_null()) {
        return Err(format!("{family} table {i} is null"));
    }
    Ok(v)
}

/// Reads one table of this ABI through its `struct_size`.
unsafe fn read_checked<T: Copy>(p: *const c_void, what: &str, needed: usize) -> std::result::Result<T, String> {
    let (v, s) = header_of(p);
    check_header(what, v, ABI_VERSION, s, needed)?;
    Ok(read_table(p, s as usize))
}

pub(crate) fn missing_slots(slots: &[(&str, bool)]) -> Vec<String> {
    slots.iter().filter(|(_, ok)| !ok).map(|(n, _)| n.to_string()).collect()
}

pub(crate) fn check_slots(info: &ComponentInfo, missing: Vec<String>) -> std::result::Result<(), String> {
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

/// Reads an ABI 2 descriptor and checks every table it lists.
unsafe fn read_v2(desc: *const PluginDesc, size: u32, origin: &str) -> std::result::Result<Parsed, (String, String)> {
    let at = |r: String| (origin.to_string(), r);
    let (version, _) = header_of(desc as *const c_void);
    check_header(
        "plugin descriptor",
        version,
        ABI_VERSION,
        size,
        offset_of!(PluginDesc, features),
    )
    .map_err(at)?;
    let d: PluginDesc = read_table(desc as *const c_void, size as usize);
    let name = cstr(d.name).ok_or_else(|| at("descriptor has a null name".into()))?;
    let version = cstr(d.version).unwrap_or_default();
    let who = format!("'{name}' ({origin})");
    let component_origin = format!("plugin {name} {version} ({origin})");
    let fail = |r: String| (who.clone(), r);
    let mut pending = Vec::new();
    for t in tables(d.n_routers, d.routers as *const *const c_void, "router").map_err(fail)? {
        let vt: RouterVtable =
            read_checked(t, "a router table", offset_of!(RouterVtable, couples_samples)).map_err(fail)?;
        let info = component_info(
            Family::Router,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, router::missing_slots(&vt)).map_err(fail)?;
        pending.push(Pending::Router(info, Table(vt)));
    }
    for t in tables(d.n_schedulers, d.schedulers as *const *const c_void, "scheduler").map_err(fail)? {
        let vt: SchedulerVtable = read_checked(t, "a scheduler table", size_of::<SchedulerVtable>()).map_err(fail)?;
        let info = component_info(
            Family::Scheduler,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, scheduler::missing_slots(&vt)).map_err(fail)?;
        pending.push(Pending::Scheduler(info, Table(vt)));
    }
    for t in tables(d.n_backends, d.backends as *const *const c_void, "backend").map_err(fail)? {
        let vt: BackendVtable = read_checked(t, "a backend table", offset_of!(BackendVtable, copy)).map_err(fail)?;
        let info = component_info(
            Family::Backend,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, backend::missing_slots(&vt, true)).map_err(fail)?;
        pending.push(Pending::Backend(info, Table(vt)));
    }
    for t in tables(d.n_experts, d.experts as *const *const c_void, "expert").map_err(fail)? {
        let vt: ExpertVtable = read_checked(t, "an expert table", size_of::<ExpertVtable>()).map_err(fail)?;
        let info = component_info(
            Family::Expert,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, expert::missing_slots(&vt)).map_err(fail)?;
        pending.push(Pending::Expert(info, Table(vt)));
    }
    Ok(Parsed {
        name,
        version,
        abi_version: ABI_VERSION,
        features: string_list(d.features),
        pending,
    })
}

/// Registers the components of a descriptor of either version.
///
/// # Safety
/// `desc` is null or points to a descriptor whose pointers stay valid forever.
pub unsafe fn register_descriptor(
    registry: &mut Registry,
    desc: *const PluginDesc,
    origin: &str,
) -> Result<PluginInfo> {
    let fail = |(plugin, reason): (String, String)| EngineError::Plugin { plugin, reason };
    if desc.is_null() {
        return Err(fail((
            origin.into(),
            format!("`{ENTRY_SYMBOL}` returned null (the plugin failed to initialise; see its log lines)"),
        )));
    }
    let (version, size) = header_of(desc as *const c_void);
    let parsed = match version {
        ABI_VERSION_V1 => v1::read(desc as *const c_void, size, origin),
        _ => read_v2(desc, size, origin),
    }
    .map_err(fail)?;
    let who = format!("'{}' ({origin})", parsed.name);
    let unknown: Vec<&str> = parsed
        .features
        .iter()
        .map(String::as_str)
        .filter(|f| !FEATURES.contains(f))
        .collect();
    if !unknown.is_empty() {
        tracing::debug!(
            "plugin {who}: ignoring features this host does not know: {}",
            unknown.join(", ")
        );
    }
    let infos: Vec<ComponentInfo> = parsed.pending.iter().map(|p| p.info().clone()).collect();
    registry
        .check_free(&infos)
        .map_err(|e| fail((who.clone(), e.to_string())))?;
    let plugin: Arc<str> = Arc::from(who.as_str());
    for p in parsed.pending {
        match p {
            Pending::Router(info, vt) => router::register(registry, info, vt, plugin.clone())?,
            Pending::Scheduler(info, vt) => scheduler::register(registry, info, vt, plugin.clone())?,
            Pending::Backend(info, vt) => backend::register(registry, info, vt, plugin.clone())?,
            Pending::Expert(info, vt) => expert::register(registry, info, vt, plugin.clone())?,
        }
    }
    Ok(PluginInfo {
        name: parsed.name,
        version: parsed.version,
        path: origin.to_string(),
        abi_version: parsed.abi_version,
        features: parsed.features,
        components: infos,
    })
}

/// A component's registry entry from its table header.
pub(crate) unsafe fn component_info(
    family: Family,
    kind: *const c_char,
    description: *const c_char,
    params_json: *const c_char,
    origin: &str,
) -> std::result::Result<ComponentInfo, String> {
    let kind = cstr(kind).ok_or_else(|| format!("a {family} table has a null kind"))?;
    if kind.is_empty() {
        return Err(format!("a {family} table has an empty kind"));
    }
    let description = cstr(description).unwrap_or_default();
    let json = cstr(params_json).unwrap_or_else(|| "[]".into());
    let params: Vec<ParamInfo> = serde_json::from_str(&json)
        .map_err(|e| format!("{family} '{kind}': params_json is not a list of parameters: {e} (got {json})"))?;
    Ok(ComponentInfo {
        family,
        kind,
        description,
        params,
        origin: origin.to_string(),
    })
}

/// The full spec of a component built from `params`.
pub(crate) fn spec_of(kind: &str, params: &Map<String, Value>) -> Value {
    let mut spec = params.clone();
    spec.insert("kind".into(), Value::String(kind.to_string()));
    Value::Object(spec)
}

/// A `&'static str` for a name known only at run time (a plugin backend's
/// name for its buffers), leaked once per distinct name.
pub(crate) fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let set = names.get_or_insert_with(HashSet::new);
    if let Some(n) = set.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// An error buffer on the stack and the status check after a call.
pub(crate) struct Call {
    buf: [u8; ERR_CAP],
}

impl Call {
    pub(crate) fn new() -> Self {
        Self { buf: [0; ERR_CAP] }
    }

    pub(crate) fn err(&mut self) -> ErrBuf {
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
    pub(crate) fn check(&self, status: i32, plugin: &str, what: impl std::fmt::Display) -> Result<()> {
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

pub(crate) fn slot<F>(f: Option<F>, plugin: &str, what: &str) -> Result<F> {
    f.ok_or_else(|| EngineError::Plugin {
        plugin: plugin.to_string(),
        reason: format!("{what}: function slot is null"),
    })
}

pub(crate) fn create_instance(
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
