//! Schedulers from a plugin: host code over host buffers. The adapter gives
//! the host methods; the trait's `step_on` default moves the data.

use super::{create_instance, slot, spec_of, Call, Table};
use crate::error::{EngineError, Result};
use crate::plugin::abi::*;
use crate::plugin::{as_f32s, as_f32s_mut};
use crate::registry::{ComponentInfo, Registry};
use crate::scheduler::Scheduler;
use serde_json::Value;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// The slots a scheduler table must fill.
pub(crate) fn missing_slots(vt: &SchedulerVtable) -> Vec<String> {
    super::missing_slots(&[
        ("create", vt.create.is_some()),
        ("destroy", vt.destroy.is_some()),
        ("draw_t", vt.draw_t.is_some()),
        ("add_noise", vt.add_noise.is_some()),
        ("target", vt.target.is_some()),
        ("model_time", vt.model_time.is_some()),
        ("sampling_times", vt.sampling_times.is_some()),
        ("step", vt.step.is_some()),
    ])
}

/// Registers one checked scheduler kind.
pub(crate) fn register(
    registry: &mut Registry,
    info: ComponentInfo,
    vt: Table<SchedulerVtable>,
    plugin: Arc<str>,
) -> Result<()> {
    let kind = info.kind.clone();
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
    )
}

/// A scheduler living in a plugin. `draw_t` (infallible in the trait) logs a
/// plugin failure and returns NaN so the caller's checks trip.
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

    fn model_time(&self, t: f32) -> Result<f32> {
        let f = slot(self.vt.model_time, &self.plugin, "model_time")?;
        let (mut call, mut out) = (Call::new(), f32::NAN);
        let mut err = call.err();
        let status = unsafe { f(self.handle, &mut out, t, &mut err) };
        call.check(status, &self.plugin, self.what("model_time"))?;
        Ok(out)
    }

    fn sampling_times(&self, steps: usize) -> Result<Vec<f32>> {
        let f = slot(self.vt.sampling_times, &self.plugin, "sampling_times")?;
        let len = steps.checked_add(1).ok_or_else(|| EngineError::Plugin {
            plugin: self.plugin.to_string(),
            reason: format!("{}: {steps} steps is too many", self.what("sampling_times")),
        })?;
        let mut out = vec![f32::NAN; len];
        let mut call = Call::new();
        let mut err = call.err();
        let status = unsafe { f(self.handle, as_f32s_mut(&mut out), steps, &mut err) };
        call.check(status, &self.plugin, self.what("sampling_times"))?;
        Ok(out)
    }

    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()> {
        let f = slot(self.vt.step, &self.plugin, "step")?;
        let mut call = Call::new();
        let mut err = call.err();
        let status = unsafe { f(self.handle, as_f32s_mut(x), as_f32s(model_out), t, t_next, &mut err) };
        call.check(status, &self.plugin, self.what("step"))
    }
}
