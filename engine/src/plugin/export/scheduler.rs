//! Schedulers out of a plugin: host code over host buffers (the host runs
//! `step_on` as download, `step`, upload). Unchanged from ABI 1.

use super::{create, destroy, guard, not_null, obj, Header, Instance};
use crate::error::EngineError;
use crate::plugin::abi::*;
use crate::plugin::{f32s, f32s_mut};
use crate::scheduler::Scheduler;
use std::ffi::c_void;

impl Instance for Box<dyn Scheduler> {
    fn into_handle(self) -> *mut c_void {
        Box::into_raw(Box::new(self)) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut Self));
    }
}

/// The table of one scheduler kind.
pub(crate) fn table(h: Header) -> SchedulerVtable {
    SchedulerVtable {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<SchedulerVtable>() as u32,
        kind: h.kind,
        description: h.description,
        params_json: h.params_json,
        ctx: h.ctx,
        create: Some(create::<Box<dyn Scheduler>>),
        destroy: Some(destroy::<Box<dyn Scheduler>>),
        draw_t: Some(sched_draw_t),
        add_noise: Some(sched_add_noise),
        target: Some(sched_target),
        model_time: Some(sched_model_time),
        sampling_times: Some(sched_sampling_times),
        step: Some(sched_step),
    }
}

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
        *out = s.model_time(t)?;
        Ok(())
    })
}

unsafe extern "C" fn sched_sampling_times(handle: *mut c_void, out: F32sMut, steps: usize, err: *mut ErrBuf) -> i32 {
    guard(err, || {
        let times = obj::<dyn Scheduler>(handle)?.sampling_times(steps)?;
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
