//! The plugin ABI, version [`ABI_VERSION`]: `#[repr(C)]` mirrors of
//! `engine/include/ecdit_plugin.h`. A test compiles the header with the system C
//! compiler and checks every size and field offset against these definitions.
//!
//! Layers, as in ggml's backend interface: plugin ([`PluginDesc`]) -> component
//! (one vtable per router, scheduler or backend kind) -> instance (an opaque
//! handle made by the vtable's `create`). Every descriptor and vtable starts with
//! `abi_version` and `struct_size`; they are only ever appended to, and the host
//! reads them through `struct_size`, so a newer plugin with longer tables still
//! loads into an older host of the same ABI version.
//!
//! Conventions of every function:
//! - argument order: handle, outputs, inputs, dimensions, then `err`;
//! - buffers travel as pointer-plus-length structs ([`F32s`], [`F32sMut`], ...);
//!   an optional buffer is a null pointer; a zero-length buffer may have any pointer;
//! - fallible functions return a status ([`STATUS_OK`], [`STATUS_ERROR`],
//!   [`STATUS_PANIC`]) and write a NUL-terminated message into `err` on failure;
//! - every function slot is required (the host refuses a null slot at load).
//!
//! Thread safety: instance handles are shared between threads by the host (the
//! traits are `Send + Sync`); a plugin must allow concurrent calls on one handle.

use std::ffi::{c_char, c_void};

/// The ABI major version. Bumped on any change that is not an append.
pub const ABI_VERSION: u32 = 1;

/// Name of the one symbol every plugin library exports: an [`EntryFn`].
pub const ENTRY_SYMBOL: &str = "ecdit_plugin_entry";

/// Success.
pub const STATUS_OK: i32 = 0;
/// Failure; `err` holds the message.
pub const STATUS_ERROR: i32 = 1;
/// A panic (or C++ exception) was caught at the boundary; `err` holds its message.
pub const STATUS_PANIC: i32 = 2;

/// Log level: error.
pub const LOG_ERROR: u32 = 1;
/// Log level: warning.
pub const LOG_WARN: u32 = 2;
/// Log level: info.
pub const LOG_INFO: u32 = 3;
/// Log level: debug.
pub const LOG_DEBUG: u32 = 4;
/// Log level: trace.
pub const LOG_TRACE: u32 = 5;

/// The host's log sink: `level` is one of the `LOG_*` codes, `target` the
/// module or subsystem, `msg` the line (both NUL-terminated UTF-8).
pub type LogFn = unsafe extern "C" fn(level: u32, target: *const c_char, msg: *const c_char);

/// What the host hands the plugin's entry function.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// The host's [`ABI_VERSION`].
    pub abi_version: u32,
    /// `sizeof(ecdit_host)` as the host knows it.
    pub struct_size: u32,
    /// Log sink; lines reach the host's `tracing` subscriber.
    pub log: Option<LogFn>,
    /// Most verbose level the host records (a `LOG_*` code; 0 = off), so
    /// plugins can skip formatting lines nobody reads.
    pub max_level: u32,
}

/// The plugin's entry point, exported as [`ENTRY_SYMBOL`]. Returns a pointer
/// valid for the life of the process, or null on failure.
pub type EntryFn = unsafe extern "C" fn(host: *const Host) -> *const PluginDesc;

/// An error-message buffer: the callee writes at most `cap` bytes including
/// the terminating NUL.
#[repr(C)]
#[derive(Debug)]
pub struct ErrBuf {
    /// Buffer owned by the caller.
    pub msg: *mut c_char,
    /// Its capacity in bytes.
    pub cap: usize,
}

/// A read-only f32 buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct F32s {
    /// First element (null: absent, for optional buffers).
    pub ptr: *const f32,
    /// Element count.
    pub len: usize,
}

/// A writable f32 buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct F32sMut {
    /// First element (null: absent, for optional buffers).
    pub ptr: *mut f32,
    /// Element count.
    pub len: usize,
}

/// A read-only u32 buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U32s {
    /// First element.
    pub ptr: *const u32,
    /// Element count.
    pub len: usize,
}

/// A writable u32 buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U32sMut {
    /// First element.
    pub ptr: *mut u32,
    /// Element count.
    pub len: usize,
}

/// A read-only byte buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U8s {
    /// First element (null: absent).
    pub ptr: *const u8,
    /// Element count.
    pub len: usize,
}

/// The plugin descriptor the entry function returns.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDesc {
    /// Must equal the host's [`ABI_VERSION`].
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
    pub routers: *const *const RouterVtable,
    /// Number of scheduler vtables.
    pub n_schedulers: usize,
    /// `n_schedulers` pointers to scheduler vtables.
    pub schedulers: *const *const SchedulerVtable,
    /// Number of backend vtables.
    pub n_backends: usize,
    /// `n_backends` pointers to backend vtables.
    pub backends: *const *const BackendVtable,
}

/// A dispatch plus what goes with it, as buffers (see `Dispatch` and `Routing`).
/// In `route` the plugin fills it with pointers into the result it owns; in
/// `backward` the host fills it with pointers into its copy.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RoutingView {
    /// Experts (E).
    pub experts: usize,
    /// Token rows routed.
    pub tokens_total: usize,
    /// `E + 1` CSR offsets into `tokens` and `gates`.
    pub offsets: *const usize,
    /// Token row of each slot.
    pub tokens: *const u32,
    /// Gate of each slot.
    pub gates: *const f32,
    /// Slot count (length of `tokens` and `gates`).
    pub slots: usize,
    /// Router probabilities `[tokens_total, experts]`.
    pub probs: *const f32,
    /// Length of `probs`.
    pub probs_len: usize,
    /// 1 when `aux_loss` is present.
    pub has_aux: u32,
    /// Auxiliary loss (read only when `has_aux`).
    pub aux_loss: f32,
    /// Tokens per routing group the call used (backward needs it for per-group terms).
    pub group_size: usize,
}

/// Builds an instance from the complete parameter object (defaults filled in
/// by the host) as JSON text of `len` bytes. `ctx` is the vtable's `ctx`.
pub type CreateFn = unsafe extern "C" fn(
    ctx: *const c_void,
    params_json: *const c_char,
    len: usize,
    out: *mut *mut c_void,
    err: *mut ErrBuf,
) -> i32;
/// Frees an instance.
pub type DestroyFn = unsafe extern "C" fn(handle: *mut c_void);

/// One router kind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RouterVtable {
    /// Must equal [`ABI_VERSION`].
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

/// A random source lent by the host for one call: the plugin draws through
/// these callbacks, so a dynamic scheduler consumes the host's generator exactly
/// as a static one would (same bits).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Rng {
    /// Host state.
    pub ctx: *mut c_void,
    /// Next 32 random bits.
    pub next_u32: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u32>,
    /// Next 64 random bits.
    pub next_u64: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u64>,
    /// Fills `len` bytes.
    pub fill_bytes: Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut u8, len: usize)>,
}

/// One scheduler kind.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SchedulerVtable {
    /// Must equal [`ABI_VERSION`].
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

/// `GemmDims` over the ABI (booleans as 0/1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GemmDimsC {
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Contracted dimension.
    pub k: usize,
    /// `a` stored `[k, m]`.
    pub trans_a: u32,
    /// `b` stored `[n, k]`.
    pub trans_b: u32,
}

/// `AttnDims` over the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttnDimsC {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query tokens per sample.
    pub q_len: usize,
    /// Key/value tokens per sample.
    pub kv_len: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// `AdamW` over the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamWC {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// `Unary::GeluTanh` over the ABI.
pub const UNARY_GELU_TANH: u32 = 0;
/// `Unary::Silu` over the ABI.
pub const UNARY_SILU: u32 = 1;

type H = *mut c_void;
type E = *mut ErrBuf;

/// One backend kind: one slot per `Backend` trait method.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct BackendVtable {
    /// Must equal [`ABI_VERSION`].
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
