//! ABI version 1, frozen: the layouts of `engine/include/ecdit_plugin_v1.h`,
//! kept only so the host can read version 1 libraries. Never edit these.
//!
//! A version 1 router or scheduler table is an exact prefix of its version 2
//! table, so the host reads it and registers it as before. A version 1 backend
//! passed host slices (`F32s`) where version 2 passes buffers and dtypes; it
//! cannot work on device memory, so the host refuses it, naming both versions.

use super::abi::{
    AdamWC, AttnDimsC, CreateFn, DestroyFn, ErrBuf, F32s, F32sMut, GemmDimsC, LogFn, Rng, RoutingView, U32s, U32sMut,
    U8s,
};
use std::ffi::{c_char, c_void};

/// The version number of these layouts.
pub const ABI_VERSION_V1: u32 = 1;

/// What a version 1 plugin reads of the host: the first four fields of `abi::Host`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HostV1 {
    /// The host's ABI version.
    pub abi_version: u32,
    /// `sizeof(ecdit_host)`.
    pub struct_size: u32,
    /// Log sink.
    pub log: Option<LogFn>,
    /// Most verbose level recorded.
    pub max_level: u32,
}

/// The plugin descriptor the entry function returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PluginDescV1 {
    /// [`ABI_VERSION_V1`].
    pub abi_version: u32,
    /// `sizeof(ecdit_plugin)` as the plugin was built.
    pub struct_size: u32,
    /// Plugin name (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// Plugin version.
    pub version: *const c_char,
    /// Number of router vtables.
    pub n_routers: usize,
    /// `n_routers` pointers to router vtables.
    pub routers: *const *const RouterVtableV1,
    /// Number of scheduler vtables.
    pub n_schedulers: usize,
    /// `n_schedulers` pointers to scheduler vtables.
    pub schedulers: *const *const SchedulerVtableV1,
    /// Number of backend vtables.
    pub n_backends: usize,
    /// `n_backends` pointers to backend vtables.
    pub backends: *const *const BackendVtableV1,
}

/// One router kind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RouterVtableV1 {
    /// [`ABI_VERSION_V1`].
    pub abi_version: u32,
    /// `sizeof(ecdit_router_vtable)` as the plugin was built.
    pub struct_size: u32,
    /// Kind name used in specs.
    pub kind: *const c_char,
    /// One line of description.
    pub description: *const c_char,
    /// Declared parameters as a JSON array of `{"name", "type", "default", "help"}`.
    pub params_json: *const c_char,
    /// Passed back to `create` (the plugin's own data for this kind).
    pub ctx: *const c_void,
    /// Makes an instance.
    pub create: Option<CreateFn>,
    /// Frees an instance.
    pub destroy: Option<DestroyFn>,
    /// Routes `scores` `[samples * tokens_per_sample, experts]`: fills `out_view`
    /// with buffers owned by `*out_result`, which the host frees with `free_result`.
    #[allow(clippy::type_complexity)]
    pub route: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            out_view: *mut RoutingView,
            out_result: *mut *mut c_void,
            scores: F32s,
            samples: usize,
            tokens_per_sample: usize,
            experts: usize,
            err: *mut ErrBuf,
        ) -> i32,
    >,
    /// Frees a result of `route`.
    pub free_result: Option<unsafe extern "C" fn(result: *mut c_void)>,
    /// Score gradients `[tokens, experts]` (overwritten) from gate gradients
    /// (aligned with the gates of `routing`) and the aux-loss gradient.
    #[allow(clippy::type_complexity)]
    pub backward: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            grad_scores: F32sMut,
            routing: *const RoutingView,
            scores: F32s,
            grad_gates: F32s,
            grad_aux: f32,
            err: *mut ErrBuf,
        ) -> i32,
    >,
}

/// One scheduler kind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SchedulerVtableV1 {
    /// [`ABI_VERSION_V1`].
    pub abi_version: u32,
    /// `sizeof(ecdit_scheduler_vtable)` as the plugin was built.
    pub struct_size: u32,
    /// Kind name used in specs.
    pub kind: *const c_char,
    /// One line of description.
    pub description: *const c_char,
    /// Declared parameters (JSON array).
    pub params_json: *const c_char,
    /// Passed back to `create`.
    pub ctx: *const c_void,
    /// Makes an instance.
    pub create: Option<CreateFn>,
    /// Frees an instance.
    pub destroy: Option<DestroyFn>,
    /// Draws a training time into `*t` using the lent generator.
    pub draw_t:
        Option<unsafe extern "C" fn(handle: *mut c_void, t: *mut f32, rng: *const Rng, err: *mut ErrBuf) -> i32>,
    /// `x_t` at time `t`.
    pub add_noise: Option<
        unsafe extern "C" fn(handle: *mut c_void, x_t: F32sMut, x0: F32s, noise: F32s, t: f32, err: *mut ErrBuf) -> i32,
    >,
    /// The network's regression target at time `t`.
    pub target: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            target: F32sMut,
            x0: F32s,
            noise: F32s,
            t: f32,
            err: *mut ErrBuf,
        ) -> i32,
    >,
    /// The embedder's time value for `t`, into `*out`.
    pub model_time: Option<unsafe extern "C" fn(handle: *mut c_void, out: *mut f32, t: f32, err: *mut ErrBuf) -> i32>,
    /// `steps + 1` sampling times into `out` (length `steps + 1`).
    pub sampling_times:
        Option<unsafe extern "C" fn(handle: *mut c_void, out: F32sMut, steps: usize, err: *mut ErrBuf) -> i32>,
    /// One sampling step from `t` to `t_next`, in place on `x`.
    pub step: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            x: F32sMut,
            model_out: F32s,
            t: f32,
            t_next: f32,
            err: *mut ErrBuf,
        ) -> i32,
    >,
}

type H = *mut c_void;
type E = *mut ErrBuf;

/// One backend kind: one slot per `Backend` trait method.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct BackendVtableV1 {
    /// [`ABI_VERSION_V1`].
    pub abi_version: u32,
    /// `sizeof(ecdit_backend_vtable)` as the plugin was built.
    pub struct_size: u32,
    /// Kind name used in specs.
    pub kind: *const c_char,
    /// One line of description.
    pub description: *const c_char,
    /// Declared parameters (JSON array).
    pub params_json: *const c_char,
    /// Passed back to `create`.
    pub ctx: *const c_void,
    /// Makes an instance (may fail cleanly, e.g. "no CUDA driver found").
    pub create: Option<CreateFn>,
    /// Frees an instance.
    pub destroy: Option<DestroyFn>,
    /// Instance name (NUL-terminated, valid while the instance lives).
    pub name: Option<unsafe extern "C" fn(h: H) -> *const c_char>,
    /// Threads the instance computes with.
    pub threads: Option<unsafe extern "C" fn(h: H) -> usize>,
    /// `Backend::gemm`.
    pub gemm: Option<
        unsafe extern "C" fn(
            h: H,
            out: F32sMut,
            a: F32s,
            b: F32s,
            dims: GemmDimsC,
            alpha: f32,
            beta: f32,
            err: E,
        ) -> i32,
    >,
    /// `Backend::gemm_batched`.
    pub gemm_batched: Option<
        unsafe extern "C" fn(
            h: H,
            out: F32sMut,
            a: F32s,
            b: F32s,
            batch: usize,
            dims: GemmDimsC,
            alpha: f32,
            beta: f32,
            err: E,
        ) -> i32,
    >,
    /// `Backend::add_bias`.
    pub add_bias: Option<unsafe extern "C" fn(h: H, out: F32sMut, bias: F32s, rows: usize, cols: usize, err: E) -> i32>,
    /// `Backend::sum_rows` (`accumulate` 0/1).
    pub sum_rows: Option<
        unsafe extern "C" fn(h: H, out: F32sMut, inp: F32s, rows: usize, cols: usize, accumulate: u32, err: E) -> i32,
    >,
    /// `Backend::softmax_rows`.
    pub softmax_rows:
        Option<unsafe extern "C" fn(h: H, out: F32sMut, inp: F32s, rows: usize, cols: usize, err: E) -> i32>,
    /// `Backend::softmax_rows_backward`.
    pub softmax_rows_backward: Option<
        unsafe extern "C" fn(h: H, dinp: F32sMut, dout: F32s, out: F32s, rows: usize, cols: usize, err: E) -> i32,
    >,
    /// `Backend::layer_norm` (null `weight`/`bias`: absent).
    pub layer_norm: Option<
        unsafe extern "C" fn(
            h: H,
            out: F32sMut,
            mean: F32sMut,
            rstd: F32sMut,
            inp: F32s,
            weight: F32s,
            bias: F32s,
            rows: usize,
            cols: usize,
            eps: f32,
            err: E,
        ) -> i32,
    >,
    /// `Backend::layer_norm_backward` (null `dweight`/`dbias`/`weight`: absent).
    pub layer_norm_backward: Option<
        unsafe extern "C" fn(
            h: H,
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
            err: E,
        ) -> i32,
    >,
    /// `Backend::unary` (`op`: a `UNARY_*` code).
    pub unary: Option<unsafe extern "C" fn(h: H, op: u32, out: F32sMut, inp: F32s, err: E) -> i32>,
    /// `Backend::unary_backward`.
    pub unary_backward:
        Option<unsafe extern "C" fn(h: H, op: u32, dinp: F32sMut, dout: F32s, inp: F32s, err: E) -> i32>,
    /// `Backend::attention` (null `key_mask`: absent).
    pub attention: Option<
        unsafe extern "C" fn(
            h: H,
            out: F32sMut,
            probs: F32sMut,
            q: F32s,
            k: F32s,
            v: F32s,
            key_mask: U8s,
            dims: AttnDimsC,
            err: E,
        ) -> i32,
    >,
    /// `Backend::attention_backward`.
    pub attention_backward: Option<
        unsafe extern "C" fn(
            h: H,
            dq: F32sMut,
            dk: F32sMut,
            dv: F32sMut,
            dout: F32s,
            probs: F32s,
            q: F32s,
            k: F32s,
            v: F32s,
            dims: AttnDimsC,
            err: E,
        ) -> i32,
    >,
    /// `Backend::gather_rows`.
    pub gather_rows: Option<unsafe extern "C" fn(h: H, out: F32sMut, inp: F32s, idx: U32s, cols: usize, err: E) -> i32>,
    /// `Backend::scatter_add_rows` (null `scale`: absent).
    pub scatter_add_rows:
        Option<unsafe extern "C" fn(h: H, out: F32sMut, inp: F32s, idx: U32s, scale: F32s, cols: usize, err: E) -> i32>,
    /// `Backend::top_k_rows`.
    pub top_k_rows: Option<
        unsafe extern "C" fn(
            h: H,
            idx: U32sMut,
            val: F32sMut,
            inp: F32s,
            rows: usize,
            cols: usize,
            k: usize,
            err: E,
        ) -> i32,
    >,
    /// `Backend::adamw_step`.
    pub adamw_step: Option<
        unsafe extern "C" fn(
            h: H,
            param: F32sMut,
            grad: F32s,
            m: F32sMut,
            v: F32sMut,
            hp: AdamWC,
            step: u64,
            err: E,
        ) -> i32,
    >,
}
