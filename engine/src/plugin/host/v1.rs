//! Reading ABI 1 libraries. Their routers and schedulers are host code over
//! host buffers, exactly as in ABI 2, so they load as before (each table read
//! through the frozen layouts of [`abi_v1`](crate::plugin::abi_v1) and
//! converted field by field). An ABI 1 backend passed host slices where ABI 2
//! passes buffer handles and dtypes: it cannot run on device memory, so the
//! whole library is refused, naming both versions.

use super::{check_header, check_slots, component_info, header_of, tables, Parsed, Pending, Table};
use crate::plugin::abi::*;
use crate::plugin::abi_v1::*;
use crate::plugin::{cstr, read_table};
use crate::registry::Family;
use std::ffi::c_void;
use std::mem::size_of;

fn router(v: RouterVtableV1) -> RouterVtable {
    RouterVtable {
        abi_version: v.abi_version,
        struct_size: v.struct_size,
        kind: v.kind,
        description: v.description,
        params_json: v.params_json,
        ctx: v.ctx,
        create: v.create,
        destroy: v.destroy,
        route: v.route,
        free_result: v.free_result,
        backward: v.backward,
        // Not in ABI 1: the documented defaults (couples samples; any tokens).
        couples_samples: None,
        check_tokens_per_sample: None,
    }
}

fn scheduler(v: SchedulerVtableV1) -> SchedulerVtable {
    SchedulerVtable {
        abi_version: v.abi_version,
        struct_size: v.struct_size,
        kind: v.kind,
        description: v.description,
        params_json: v.params_json,
        ctx: v.ctx,
        create: v.create,
        destroy: v.destroy,
        draw_t: v.draw_t,
        add_noise: v.add_noise,
        target: v.target,
        model_time: v.model_time,
        sampling_times: v.sampling_times,
        step: v.step,
    }
}

unsafe fn read_v1<T: Copy>(p: *const c_void, what: &str) -> std::result::Result<T, String> {
    let (v, s) = header_of(p);
    check_header(what, v, ABI_VERSION_V1, s, size_of::<T>())?;
    Ok(read_table(p, s as usize))
}

/// Reads an ABI 1 descriptor: routers and schedulers, or a refusal when it
/// has backends.
///
/// # Safety
/// `desc` points to a descriptor whose pointers stay valid forever.
pub(crate) unsafe fn read(
    desc: *const c_void,
    size: u32,
    origin: &str,
) -> std::result::Result<Parsed, (String, String)> {
    let at = |r: String| (origin.to_string(), r);
    check_header(
        "plugin descriptor",
        ABI_VERSION_V1,
        ABI_VERSION_V1,
        size,
        size_of::<PluginDescV1>(),
    )
    .map_err(at)?;
    let d: PluginDescV1 = read_table(desc, size as usize);
    let name = cstr(d.name).ok_or_else(|| at("descriptor has a null name".into()))?;
    let version = cstr(d.version).unwrap_or_default();
    let who = format!("'{name}' ({origin})");
    let fail = |r: String| (who.clone(), r);
    if d.n_backends > 0 {
        return Err(fail(format!(
            "its {} backend table(s) speak ecdit plugin ABI version {ABI_VERSION_V1}, which passed host slices; \
             this host speaks ABI version {ABI_VERSION} for backends (buffers and dtypes cross it), so the \
             library is refused. Rebuild the backend against this engine's ecdit_plugin.h; version \
             {ABI_VERSION_V1} router and scheduler libraries still load",
            d.n_backends
        )));
    }
    let component_origin = format!("plugin {name} {version} ({origin}, ABI {ABI_VERSION_V1})");
    let mut pending = Vec::new();
    for t in tables(d.n_routers, d.routers as *const *const c_void, "router").map_err(fail)? {
        let vt = router(read_v1::<RouterVtableV1>(t, "a router table").map_err(fail)?);
        let info = component_info(
            Family::Router,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, super::router::missing_slots(&vt)).map_err(fail)?;
        pending.push(Pending::Router(info, Table(vt)));
    }
    for t in tables(d.n_schedulers, d.schedulers as *const *const c_void, "scheduler").map_err(fail)? {
        let vt = scheduler(read_v1::<SchedulerVtableV1>(t, "a scheduler table").map_err(fail)?);
        let info = component_info(
            Family::Scheduler,
            vt.kind,
            vt.description,
            vt.params_json,
            &component_origin,
        )
        .map_err(fail)?;
        check_slots(&info, super::scheduler::missing_slots(&vt)).map_err(fail)?;
        pending.push(Pending::Scheduler(info, Table(vt)));
    }
    Ok(Parsed {
        name,
        version,
        abi_version: ABI_VERSION_V1,
        features: Vec::new(),
        pending,
    })
}
