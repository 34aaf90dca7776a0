//! Routers out of a plugin: host code over host buffers (scores in, an
//! expert-major dispatch out), as in ABI 1, plus the ABI 2 hints.

use super::{create, destroy, guard, not_null, obj, quiet, Header, Instance};
use crate::error::{EngineError, Result};
use crate::plugin::abi::*;
use crate::plugin::{f32s, f32s_mut, u32s};
use crate::router::{Dispatch, RouteShape, Router, Routing};
use crate::routing_stats::RoutingStats;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

impl Instance for Box<dyn Router> {
    fn into_handle(self) -> *mut c_void {
        Box::into_raw(Box::new(self)) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut Self));
    }
}

/// The table of one router kind.
pub(crate) fn table(h: Header) -> RouterVtable {
    RouterVtable {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<RouterVtable>() as u32,
        kind: h.kind,
        description: h.description,
        params_json: h.params_json,
        ctx: h.ctx,
        create: Some(create::<Box<dyn Router>>),
        destroy: Some(destroy::<Box<dyn Router>>),
        route: Some(router_route),
        free_result: Some(router_free_result),
        backward: Some(router_backward),
        couples_samples: Some(router_couples_samples),
        check_tokens_per_sample: Some(router_check_tokens_per_sample),
    }
}

unsafe extern "C" fn router_couples_samples(handle: *mut c_void) -> u32 {
    // On any failure say "couples": the safe assumption.
    quiet(1, || {
        obj::<dyn Router>(handle).map_or(1, |r| r.couples_samples() as u32)
    })
}

unsafe extern "C" fn router_check_tokens_per_sample(handle: *mut c_void, tokens: usize, err: *mut ErrBuf) -> i32 {
    guard(err, || obj::<dyn Router>(handle)?.check_tokens_per_sample(tokens))
}

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
unsafe fn routing_from_view(v: &RoutingView) -> Result<Routing> {
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
