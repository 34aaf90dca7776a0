//! Routers from a plugin: host code over host buffers. The adapter gives
//! `route` and `backward` (the trait's `route_on` / `backward_on` defaults move
//! the data: one download, one upload) and validates every dispatch.

use super::{create_instance, slot, spec_of, Call, Table};
use crate::error::{check_finite, EngineError, Result};
use crate::plugin::abi::*;
use crate::plugin::{as_f32s, as_f32s_mut};
use crate::registry::{ComponentInfo, Registry};
use crate::router::{Dispatch, RouteShape, Router, Routing};
use crate::routing_stats::RoutingStats;
use serde_json::Value;
use std::ffi::c_void;
use std::sync::Arc;

/// The slots a router table must fill.
pub(crate) fn missing_slots(vt: &RouterVtable) -> Vec<String> {
    super::missing_slots(&[
        ("create", vt.create.is_some()),
        ("destroy", vt.destroy.is_some()),
        ("route", vt.route.is_some()),
        ("free_result", vt.free_result.is_some()),
        ("backward", vt.backward.is_some()),
    ])
}

/// Registers one checked router kind.
pub(crate) fn register(
    registry: &mut Registry,
    info: ComponentInfo,
    vt: Table<RouterVtable>,
    plugin: Arc<str>,
) -> Result<()> {
    let kind = info.kind.clone();
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
    )
}

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
        // No token goes to an expert twice, so a larger count is a bug; it is
        // refused before it sizes a read of the plugin's buffers.
        if v.slots > probs_len {
            return Err(self.bad(format!(
                "returned {} dispatch slots, more than the {probs_len} that {} tokens x {} experts allow",
                v.slots,
                shape.tokens(),
                shape.experts
            )));
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

    fn couples_samples(&self) -> bool {
        // SAFETY: an optional slot over this table's handle.
        self.vt.couples_samples.is_none_or(|f| unsafe { f(self.handle) } != 0)
    }

    fn check_tokens_per_sample(&self, tokens_per_sample: usize) -> Result<()> {
        let Some(f) = self.vt.check_tokens_per_sample else {
            return Ok(());
        };
        let mut call = Call::new();
        let mut err = call.err();
        // SAFETY: per the ABI.
        let status = unsafe { f(self.handle, tokens_per_sample, &mut err) };
        call.check(
            status,
            &self.plugin,
            format_args!("router '{}' check_tokens_per_sample", self.kind),
        )
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
