//! The plugin ABI, version [`ABI_VERSION`]: `#[repr(C)]` mirrors of
//! `engine/include/ecdit_plugin.h`. A test compiles the header with the system
//! C compiler and checks every size and field offset against these definitions.
//!
//! Layers, as in ggml's backend interface: plugin ([`PluginDesc`]) -> component
//! (one table per router, scheduler, backend or expert kind) -> instance (an
//! opaque handle made by the table's `create`).
//!
//! Growing without breaking (DESIGN.md "Plugins", STYLE.md 13):
//! - every descriptor and table starts with `abi_version` and `struct_size`; they
//!   are only ever appended to, and the host reads each through its
//!   `struct_size`: a slot beyond a shorter table reads as NULL;
//! - a NULL optional slot takes the default documented on it; a NULL required
//!   slot refuses the plugin at load;
//! - the descriptor and the host each carry a feature list (NULL-terminated
//!   array of strings) naming what they speak beyond the base of this version;
//!   unknown features are ignored, so later slots arrive with a new feature
//!   name and no version bump.
//!
//! Conventions of every function:
//! - argument order: handle, outputs, cached values, inputs, weights,
//!   dimensions, then `err` (the engine's order);
//! - host data (router scores, scheduler samples) travels as pointer-plus-length
//!   structs ([`F32s`], ...); backend data travels as [`TensorDesc`]s naming an
//!   opaque buffer handle of the backend that allocated it;
//! - an optional tensor is a NULL `*const TensorDesc`; an optional host buffer a
//!   NULL pointer; a zero-length host buffer may have any pointer;
//! - fallible functions return a status ([`STATUS_OK`], [`STATUS_ERROR`],
//!   [`STATUS_PANIC`]) and write a NUL-terminated message into `err` on failure.
//!
//! Thread safety: instance handles are shared between threads by the host (the
//! traits are `Send + Sync`); a plugin must allow concurrent calls on one handle.
//!
//! ABI version 1 (`abi_v1`) is still read for routers and schedulers, whose
//! tables are unchanged prefixes of these; its backends are refused.

use crate::DType;
use std::ffi::{c_char, c_void};

/// The ABI major version. Bumped on any change that is not an append.
pub const ABI_VERSION: u32 = 2;

/// Name of the one symbol every plugin library exports: an [`EntryFn`].
pub const ENTRY_SYMBOL: &str = "ecdit_plugin_entry";

/// Features of ABI 2 this engine speaks (host side) and exports (plugin side).
/// A later engine appends names here as it appends slots.
pub const FEATURES: &[&str] = &[FEATURE_TENSORS, FEATURE_EXPERTS, FEATURE_ROUTER_HINTS];
/// Backends exchange buffers and dtypes ([`TensorDesc`], [`BackendVtable`]).
pub const FEATURE_TENSORS: &str = "tensors";
/// Expert tables ([`ExpertVtable`]) and the lent host backend ([`BackendRef`]).
pub const FEATURE_EXPERTS: &str = "experts";
/// The router slots `couples_samples` and `check_tokens_per_sample`.
pub const FEATURE_ROUTER_HINTS: &str = "router-hints";

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

/// dtype code of f32 (`DType::F32 as u32`).
pub const DTYPE_F32: u32 = 0;
/// dtype code of bf16.
pub const DTYPE_BF16: u32 = 1;
/// dtype code of u32.
pub const DTYPE_U32: u32 = 2;
/// dtype code of u8.
pub const DTYPE_U8: u32 = 3;

/// `Unary::GeluTanh` over the ABI.
pub const UNARY_GELU_TANH: u32 = 0;
/// `Unary::Silu` over the ABI.
pub const UNARY_SILU: u32 = 1;

/// Most dimensions of a [`TensorDesc`] (the engine's `MAX_RANK`).
pub const MAX_RANK: usize = 6;

/// The host's log sink: `level` is one of the `LOG_*` codes, `target` the
/// module or subsystem, `msg` the line (both NUL-terminated UTF-8).
pub type LogFn = unsafe extern "C" fn(level: u32, target: *const c_char, msg: *const c_char);

/// What the host hands the plugin's entry function. Version 1 plugins read
/// the first four fields (unchanged from ABI 1).
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
    /// The host's features: NULL-terminated array of strings (NULL: none).
    pub features: *const *const c_char,
}

/// The plugin's entry point, exported as [`ENTRY_SYMBOL`]. Returns a pointer
/// valid for the life of the process, or null on failure. The descriptor's
/// `abi_version` says which layout it has (1: `abi_v1::PluginDescV1`).
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

/// A read-only f32 host buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct F32s {
    /// First element (null: absent, for optional buffers).
    pub ptr: *const f32,
    /// Element count.
    pub len: usize,
}

/// A writable f32 host buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct F32sMut {
    /// First element (null: absent, for optional buffers).
    pub ptr: *mut f32,
    /// Element count.
    pub len: usize,
}

/// A read-only u32 host buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U32s {
    /// First element.
    pub ptr: *const u32,
    /// Element count.
    pub len: usize,
}

/// A writable u32 host buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U32sMut {
    /// First element.
    pub ptr: *mut u32,
    /// Element count.
    pub len: usize,
}

/// A read-only byte host buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct U8s {
    /// First element (null: absent).
    pub ptr: *const u8,
    /// Element count.
    pub len: usize,
}

/// A tensor view over a backend buffer: contiguous row-major `dims[..rank]`
/// elements of `dtype` starting `offset` elements into the buffer. `buffer`
/// is the opaque handle the owning backend's `alloc` returned (never
/// dereferenced by anyone else).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TensorDesc {
    /// The backend's buffer handle.
    pub buffer: *mut c_void,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// A `DTYPE_*` code.
    pub dtype: u32,
    /// Dimensions used, at most [`MAX_RANK`].
    pub rank: u32,
    /// The dimensions, outermost first.
    pub dims: [usize; MAX_RANK],
}

impl TensorDesc {
    /// The dtype, the dimensions used, and the byte just past the view
    /// (`(offset + numel) * size`); errors name `what` on an unknown dtype, a
    /// rank above [`MAX_RANK`] or a size that overflows. Every side of the ABI
    /// decodes descriptors through this one place.
    pub(crate) fn decode(&self, what: &str) -> crate::error::Result<(DType, &[usize], usize)> {
        use crate::error::EngineError;
        let dtype = DType::from_code(self.dtype)
            .ok_or_else(|| EngineError::shape(format!("{what} (dtype)"), "a dtype code 0..=3", self.dtype))?;
        if self.rank as usize > MAX_RANK {
            return Err(EngineError::shape(
                format!("{what} (rank)"),
                format!("at most {MAX_RANK}"),
                self.rank,
            ));
        }
        let dims = &self.dims[..self.rank as usize];
        let end = dims
            .iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .and_then(|n| n.checked_add(self.offset))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| EngineError::shape(what, "a size that fits in memory", format!("{dims:?}")))?;
        Ok((dtype, dims, end))
    }
}

/// The plugin descriptor the entry function returns. The first ten fields
/// are ABI 1's descriptor unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PluginDesc {
    /// [`ABI_VERSION`] (1 for a version 1 descriptor).
    pub abi_version: u32,
    /// `sizeof(ecdit_plugin)` as the plugin was built.
    pub struct_size: u32,
    /// Plugin name (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// Plugin version.
    pub version: *const c_char,
    /// Number of router tables.
    pub n_routers: usize,
    /// `n_routers` pointers to router tables.
    pub routers: *const *const RouterVtable,
    /// Number of scheduler tables.
    pub n_schedulers: usize,
    /// `n_schedulers` pointers to scheduler tables.
    pub schedulers: *const *const SchedulerVtable,
    /// Number of backend tables.
    pub n_backends: usize,
    /// `n_backends` pointers to backend tables.
    pub backends: *const *const BackendVtable,
    /// Optional. The plugin's features: NULL-terminated array of strings. Default: none.
    pub features: *const *const c_char,
    /// Optional. Number of expert tables. Default: 0.
    pub n_experts: usize,
    /// `n_experts` pointers to expert tables.
    pub experts: *const *const ExpertVtable,
}

/// A dispatch plus what goes with it, as host buffers (see `Dispatch` and
/// `Routing`). In `route` the plugin fills it with pointers into the result it
/// owns; in `backward` the host fills it with pointers into its copy.
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
/// by the host) as JSON text of `len` bytes. `ctx` is the table's `ctx`.
pub type CreateFn = unsafe extern "C" fn(
    ctx: *const c_void,
    params_json: *const c_char,
    len: usize,
    out: *mut *mut c_void,
    err: *mut ErrBuf,
) -> i32;
/// Frees an instance.
pub type DestroyFn = unsafe extern "C" fn(handle: *mut c_void);

type H = *mut c_void;
type E = *mut ErrBuf;
type T = *const TensorDesc;

/// One router kind. Routers are host code: scores in, dispatch out, as host
/// buffers. The fields up to `backward` are ABI 1's router table unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct RouterVtable {
    /// [`ABI_VERSION`].
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
    /// Required. Makes an instance.
    pub create: Option<CreateFn>,
    /// Required. Frees an instance.
    pub destroy: Option<DestroyFn>,
    /// Required. Routes `scores` `[samples * tokens_per_sample, experts]`: fills
    /// `out_view` with buffers owned by `*out_result`, freed with `free_result`.
    pub route: Option<
        unsafe extern "C" fn(
            handle: H,
            out_view: *mut RoutingView,
            out_result: *mut *mut c_void,
            scores: F32s,
            samples: usize,
            tokens_per_sample: usize,
            experts: usize,
            err: E,
        ) -> i32,
    >,
    /// Required. Frees a result of `route`.
    pub free_result: Option<unsafe extern "C" fn(result: *mut c_void)>,
    /// Required. Score gradients `[tokens, experts]` (overwritten) from gate
    /// gradients (aligned with the gates of `routing`) and the aux-loss gradient.
    pub backward: Option<
        unsafe extern "C" fn(
            handle: H,
            grad_scores: F32sMut,
            routing: *const RoutingView,
            scores: F32s,
            grad_gates: F32s,
            grad_aux: f32,
            err: E,
        ) -> i32,
    >,
    /// Optional (feature `router-hints`). 1 when one sample's routing can
    /// depend on other samples of its batch. Default: 1 (assumed to couple).
    pub couples_samples: Option<unsafe extern "C" fn(handle: H) -> u32>,
    /// Optional (feature `router-hints`). Checks that batches of
    /// `tokens_per_sample` tokens can be routed. Default: accepted.
    pub check_tokens_per_sample: Option<unsafe extern "C" fn(handle: H, tokens_per_sample: usize, err: E) -> i32>,
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

/// One scheduler kind: host code over host buffers (the host runs `step_on`
/// as download, `step`, upload). Layout unchanged from ABI 1; every slot required.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct SchedulerVtable {
    /// [`ABI_VERSION`].
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
    pub draw_t: Option<unsafe extern "C" fn(handle: H, t: *mut f32, rng: *const Rng, err: E) -> i32>,
    /// `x_t` at time `t`.
    pub add_noise: Option<unsafe extern "C" fn(handle: H, x_t: F32sMut, x0: F32s, noise: F32s, t: f32, err: E) -> i32>,
    /// The network's regression target at time `t`.
    pub target: Option<unsafe extern "C" fn(handle: H, target: F32sMut, x0: F32s, noise: F32s, t: f32, err: E) -> i32>,
    /// The embedder's time value for `t`, into `*out`; an error outside the process.
    pub model_time: Option<unsafe extern "C" fn(handle: H, out: *mut f32, t: f32, err: E) -> i32>,
    /// `steps + 1` sampling times into `out` (length `steps + 1`).
    pub sampling_times: Option<unsafe extern "C" fn(handle: H, out: F32sMut, steps: usize, err: E) -> i32>,
    /// One sampling step from `t` to `t_next`, in place on `x`.
    pub step: Option<unsafe extern "C" fn(handle: H, x: F32sMut, model_out: F32s, t: f32, t_next: f32, err: E) -> i32>,
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

/// `ModChunks` over the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModChunksC {
    /// Chunks in the modulation row.
    pub chunks: usize,
    /// Shift (modulate) or gate (gated residual) chunk.
    pub first: usize,
    /// Scale chunk (modulate).
    pub second: usize,
}

/// `RowDims` over the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RowDimsC {
    /// Samples.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
    /// Channels.
    pub d: usize,
}

/// `PatchDims` over the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PatchDimsC {
    /// Samples.
    pub batch: usize,
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Patch size.
    pub patch: usize,
    /// Row element order: 1 for `(pi, qi, c)`, 0 for `(c, pi, qi)`.
    pub channels_fastest: u32,
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

/// One backend kind: buffers plus one slot per `Backend` trait method
/// (engine/src/backend.rs documents each op; tensors as [`TensorDesc`]s of
/// this backend's buffers). Required: `create`, `destroy`, `name`, `alloc`,
/// `buffer_free`, `upload`, `download`. Every other slot is optional: a NULL
/// slot (or one beyond `struct_size`) takes the trait's default where it has
/// one (`threads`, `supports`, `buffer_host_ptr`, `gemm_grouped`), and
/// otherwise the op fails with "plugin X does not implement op Y".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct BackendVtable {
    /// [`ABI_VERSION`].
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
    /// Required. Makes an instance (may fail cleanly, e.g. "no CUDA driver found").
    pub create: Option<CreateFn>,
    /// Required. Frees an instance (its buffers stay valid until freed).
    pub destroy: Option<DestroyFn>,
    /// Required. Instance name (NUL-terminated, valid while the instance lives).
    pub name: Option<unsafe extern "C" fn(h: H) -> *const c_char>,
    /// Optional. Threads the instance computes with. Default: 1.
    pub threads: Option<unsafe extern "C" fn(h: H) -> usize>,
    /// Optional. 1 when float tensors may be stored in `dtype`. Default: f32, u32 and u8.
    pub supports: Option<unsafe extern "C" fn(h: H, dtype: u32) -> u32>,
    /// Required. Allocates `bytes` zeroed bytes; `*out` is the buffer handle.
    pub alloc: Option<unsafe extern "C" fn(h: H, bytes: usize, out: *mut *mut c_void, err: E) -> i32>,
    /// Required. Frees a buffer (may be called after the instance is destroyed).
    pub buffer_free: Option<unsafe extern "C" fn(buffer: *mut c_void)>,
    /// Optional. The base address when the buffer is host memory the host may
    /// read and write directly (stable for the buffer's life). Default: NULL,
    /// not host memory (all access goes through upload and download).
    pub buffer_host_ptr: Option<unsafe extern "C" fn(buffer: *mut c_void) -> *mut c_void>,
    /// Required. Copies `len` host bytes into `dst` (`len` = its byte length).
    pub upload: Option<unsafe extern "C" fn(h: H, dst: T, src: *const c_void, len: usize, err: E) -> i32>,
    /// Required. Copies `src`'s bytes to `len` host bytes at `dst`.
    pub download: Option<unsafe extern "C" fn(h: H, dst: *mut c_void, len: usize, src: T, err: E) -> i32>,
    /// `Backend::copy`.
    pub copy: Option<unsafe extern "C" fn(h: H, dst: T, src: T, err: E) -> i32>,
    /// `Backend::fill`.
    pub fill: Option<unsafe extern "C" fn(h: H, dst: T, value: f32, err: E) -> i32>,
    /// `Backend::gemm` (NULL `bias`: absent).
    pub gemm: Option<
        unsafe extern "C" fn(h: H, out: T, a: T, b: T, bias: T, dims: GemmDimsC, alpha: f32, beta: f32, err: E) -> i32,
    >,
    /// `Backend::gemm_batched`.
    pub gemm_batched: Option<
        unsafe extern "C" fn(
            h: H,
            out: T,
            a: T,
            b: T,
            batch: usize,
            dims: GemmDimsC,
            alpha: f32,
            beta: f32,
            err: E,
        ) -> i32,
    >,
    /// Optional `Backend::gemm_grouped` (`group_rows`: `groups` row counts).
    /// Default: one `gemm` per non-empty group.
    pub gemm_grouped: Option<
        unsafe extern "C" fn(
            h: H,
            out: T,
            a: T,
            b: T,
            group_rows: *const usize,
            groups: usize,
            n: usize,
            k: usize,
            trans_b: u32,
            alpha: f32,
            beta: f32,
            err: E,
        ) -> i32,
    >,
    /// `Backend::add_broadcast`.
    pub add_broadcast: Option<unsafe extern "C" fn(h: H, out: T, inp: T, err: E) -> i32>,
    /// `Backend::axpby`.
    pub axpby: Option<unsafe extern "C" fn(h: H, y: T, a: f32, x: T, b: f32, err: E) -> i32>,
    /// `Backend::sum_rows` (`accumulate` 0/1).
    pub sum_rows:
        Option<unsafe extern "C" fn(h: H, out: T, inp: T, rows: usize, cols: usize, accumulate: u32, err: E) -> i32>,
    /// `Backend::softmax_rows`.
    pub softmax_rows: Option<unsafe extern "C" fn(h: H, out: T, inp: T, rows: usize, cols: usize, err: E) -> i32>,
    /// `Backend::softmax_rows_backward`.
    pub softmax_rows_backward:
        Option<unsafe extern "C" fn(h: H, dinp: T, dout: T, out: T, rows: usize, cols: usize, err: E) -> i32>,
    /// `Backend::layer_norm` (NULL `weight`/`bias`: absent).
    pub layer_norm: Option<
        unsafe extern "C" fn(
            h: H,
            out: T,
            mean: T,
            rstd: T,
            inp: T,
            weight: T,
            bias: T,
            rows: usize,
            cols: usize,
            eps: f32,
            err: E,
        ) -> i32,
    >,
    /// `Backend::layer_norm_backward` (NULL `dweight`/`dbias`/`weight`: absent).
    pub layer_norm_backward: Option<
        unsafe extern "C" fn(
            h: H,
            dinp: T,
            dweight: T,
            dbias: T,
            dout: T,
            inp: T,
            mean: T,
            rstd: T,
            weight: T,
            rows: usize,
            cols: usize,
            err: E,
        ) -> i32,
    >,
    /// `Backend::unary` (`op`: a `UNARY_*` code).
    pub unary: Option<unsafe extern "C" fn(h: H, op: u32, out: T, inp: T, err: E) -> i32>,
    /// `Backend::unary_backward`.
    pub unary_backward: Option<unsafe extern "C" fn(h: H, op: u32, dinp: T, dout: T, inp: T, err: E) -> i32>,
    /// `Backend::modulate`.
    pub modulate: Option<
        unsafe extern "C" fn(h: H, out: T, inp: T, modulation: T, which: ModChunksC, dims: RowDimsC, err: E) -> i32,
    >,
    /// `Backend::modulate_backward`.
    pub modulate_backward: Option<
        unsafe extern "C" fn(
            h: H,
            dinp: T,
            dmodulation: T,
            dout: T,
            inp: T,
            modulation: T,
            which: ModChunksC,
            dims: RowDimsC,
            err: E,
        ) -> i32,
    >,
    /// `Backend::gated_residual`.
    pub gated_residual:
        Option<unsafe extern "C" fn(h: H, x: T, y: T, modulation: T, which: ModChunksC, dims: RowDimsC, err: E) -> i32>,
    /// `Backend::gated_residual_backward`.
    pub gated_residual_backward: Option<
        unsafe extern "C" fn(
            h: H,
            dy: T,
            dmodulation: T,
            dx: T,
            y: T,
            modulation: T,
            which: ModChunksC,
            dims: RowDimsC,
            err: E,
        ) -> i32,
    >,
    /// `Backend::patchify`.
    pub patchify: Option<unsafe extern "C" fn(h: H, out: T, inp: T, dims: PatchDimsC, err: E) -> i32>,
    /// `Backend::unpatchify`.
    pub unpatchify: Option<unsafe extern "C" fn(h: H, out: T, inp: T, dims: PatchDimsC, err: E) -> i32>,
    /// `Backend::timestep_features`.
    pub timestep_features: Option<unsafe extern "C" fn(h: H, out: T, t: T, dim: usize, max_period: f32, err: E) -> i32>,
    /// `Backend::attention` (NULL `probs`: inference; NULL `key_mask`: absent).
    pub attention: Option<
        unsafe extern "C" fn(h: H, out: T, probs: T, q: T, k: T, v: T, key_mask: T, dims: AttnDimsC, err: E) -> i32,
    >,
    /// `Backend::attention_backward`.
    pub attention_backward: Option<
        unsafe extern "C" fn(
            h: H,
            dq: T,
            dk: T,
            dv: T,
            dout: T,
            probs: T,
            q: T,
            k: T,
            v: T,
            dims: AttnDimsC,
            err: E,
        ) -> i32,
    >,
    /// `Backend::gather_rows`.
    pub gather_rows: Option<unsafe extern "C" fn(h: H, out: T, inp: T, idx: T, cols: usize, err: E) -> i32>,
    /// `Backend::scatter_add_rows` (NULL `scale`: absent).
    pub scatter_add_rows:
        Option<unsafe extern "C" fn(h: H, out: T, inp: T, idx: T, scale: T, cols: usize, err: E) -> i32>,
    /// `Backend::gather_dot`.
    pub gather_dot: Option<unsafe extern "C" fn(h: H, out: T, a: T, idx: T, b: T, cols: usize, err: E) -> i32>,
    /// `Backend::top_k_rows`.
    pub top_k_rows:
        Option<unsafe extern "C" fn(h: H, idx: T, val: T, inp: T, rows: usize, cols: usize, k: usize, err: E) -> i32>,
    /// `Backend::router_softmax`.
    pub router_softmax:
        Option<unsafe extern "C" fn(h: H, out: T, scores: T, rows: usize, experts: usize, err: E) -> i32>,
    /// `Backend::top_k_tokens`.
    pub top_k_tokens: Option<
        unsafe extern "C" fn(
            h: H,
            idx: T,
            val: T,
            probs: T,
            groups: usize,
            group_rows: usize,
            experts: usize,
            k: usize,
            err: E,
        ) -> i32,
    >,
    /// `Backend::adamw_step`.
    pub adamw_step:
        Option<unsafe extern "C" fn(h: H, param: T, grad: T, m: T, v: T, hp: AdamWC, step: u64, err: E) -> i32>,
    /// Optional. The host is about to write the buffer's memory through its
    /// host pointer (a zero-copy view), not through an op: a backend keeping
    /// data derived from the contents (pre-packed weights) forgets it.
    /// Default: nothing.
    pub buffer_written: Option<unsafe extern "C" fn(buffer: *mut c_void)>,
}

/// A backend instance seen through its table: what the host lends an expert
/// for one call (the host's own backend, whatever it is), so the expert
/// computes on the host's buffers without knowing their type.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackendRef {
    /// The table (its `create`/`destroy` are NULL: the host owns the instance).
    pub vtable: *const BackendVtable,
    /// The instance handle for the table's functions.
    pub handle: *mut c_void,
}

/// Where an expert's forward puts the tensors it caches for backward: each
/// `push` hands the host a buffer the expert allocated through the lent
/// backend during this call (offset 0; the host owns it from then on).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TensorSink {
    /// Host state.
    pub ctx: *mut c_void,
    /// Takes ownership of `tensor.buffer`.
    pub push: Option<unsafe extern "C" fn(ctx: *mut c_void, tensor: T, err: E) -> i32>,
}

/// One expert kind (feature `experts`). The expert computes through the
/// backend the host lends it ([`BackendRef`]); its tensors are that backend's.
/// Every slot up to `backward` is required.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(clippy::type_complexity)]
pub struct ExpertVtable {
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// `sizeof(ecdit_expert_vtable)` as the plugin was built.
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
    /// Hidden width for model width `d`.
    pub hidden: Option<unsafe extern "C" fn(h: H, d: usize) -> usize>,
    /// Forward FLOPs per token through one expert.
    pub flops_per_token: Option<unsafe extern "C" fn(h: H, d: usize) -> f64>,
    /// The parameter list of `experts` experts of width `d` as a JSON array of
    /// `{"name", "shape", "layout", "init"}` with `layout` one of
    /// `"as_stored"`, `"input_major"`, `{"input_major_chunks": k}` and `init`
    /// one of `"zeros"`, `"ones"`, `"fixed"`, `{"normal": std}`,
    /// `{"xavier_uniform": [fan_in, fan_out]}`. Writes at most `cap` bytes
    /// (no NUL) to `out` and the full length to `*len`; the host calls again
    /// with a larger buffer when `*len > cap`.
    pub param_shapes: Option<
        unsafe extern "C" fn(
            h: H,
            d: usize,
            experts: usize,
            out: *mut c_char,
            cap: usize,
            len: *mut usize,
            err: E,
        ) -> i32,
    >,
    /// `Expert::forward`. `cache` NULL: inference, keep nothing. `params`:
    /// `n_params` tensors; `offsets`: `n_offsets` (E + 1) row offsets.
    pub forward: Option<
        unsafe extern "C" fn(
            h: H,
            backend: *const BackendRef,
            out: T,
            cache: *const TensorSink,
            x: T,
            params: T,
            n_params: usize,
            offsets: *const usize,
            n_offsets: usize,
            d: usize,
            err: E,
        ) -> i32,
    >,
    /// `Expert::backward`: overwrites `dx`, accumulates into the `n_dparams`
    /// tensors `dparams`; `cache`: the `n_cache` tensors forward pushed, in order.
    pub backward: Option<
        unsafe extern "C" fn(
            h: H,
            backend: *const BackendRef,
            dx: T,
            dparams: T,
            n_dparams: usize,
            dout: T,
            cache: T,
            n_cache: usize,
            x: T,
            params: T,
            n_params: usize,
            offsets: *const usize,
            n_offsets: usize,
            d: usize,
            err: E,
        ) -> i32,
    >,
}
