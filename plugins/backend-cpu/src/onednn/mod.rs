//! oneDNN (the library PyTorch uses for CPU matrix products), loaded at run
//! time: the CPU backend looks for `libdnnl.so.2` when it starts and runs
//! large matrix products on it (bf16 on AMX / AVX-512-BF16 units, f32 on
//! oneDNN's own AVX-512 kernels). Without the library everything runs on the
//! `gemm` crate as before, and [`status`] says why and how to get it.
//!
//! - **Loading.** `libloading` opens the library and resolves the few C
//!   functions we call (declared here from oneDNN 2.x's `dnnl.h`); nothing
//!   links against it at build time. It is loaded once per process and never
//!   unloaded (oneDNN's JIT code and thread pools live as long as the process).
//! - **API versions.** oneDNN 2.x describes memory and operations with
//!   structs filled in place (`dnnl_memory_desc_init_by_strides`,
//!   `dnnl_matmul_desc_init`, `dnnl_primitive_desc_create`); 3.x replaced
//!   them with opaque handles (`dnnl_memory_desc_create_with_strides`,
//!   `dnnl_matmul_primitive_desc_create`) and output scales with per-argument
//!   scales. Only 2.x is implemented: [`ApiV2`] holds the version-specific
//!   entry points and [`Api`] the ones both share, so 3.x is one more variant
//!   of [`Flavour`] plus its branch in `matmul::create`.
//! - **Threads.** oneDNN 2.x packaged by distributions runs on OpenMP. A
//!   product (`matmul::OneDnn::matmul`) goes through one process-wide lock,
//!   from the thread that called the backend op (never from inside a rayon
//!   task: the backend checks), and sets OpenMP's thread count to the
//!   backend's `threads` first. So exactly one level of parallelism runs at a
//!   time: the rayon pool's threads sleep while oneDNN's OpenMP team computes,
//!   and the other way round. Many small products (attention's, per head) run
//!   instead inside rayon tasks, each on its task's thread alone
//!   (`matmul_in_task`: OpenMP at one thread, the lock held only to find the
//!   primitive, a scratchpad per task): still one level, the pool's.
//! - **Choice.** `ECDIT_ONEDNN=0` (or `off`) keeps the `gemm` crate;
//!   `ECDIT_ONEDNN=always` sends every product it can take to oneDNN (tests
//!   and benchmarks); unset or `1`/`auto` lets `ops/gemm.rs` decide by shape.
//!   `ECDIT_ONEDNN_LIB` names a library file to load instead of the search.

pub(crate) mod attention;
pub(crate) mod grouped;
pub(crate) mod matmul;
pub(crate) mod packed;

use ecdit_engine::GemmDims;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// How a backend uses oneDNN for its matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OneDnnMode {
    /// oneDNN where it is found and measured faster (`ops/gemm.rs` decides by
    /// shape and dtype); the `gemm` crate otherwise. The default.
    #[default]
    Auto,
    /// Never oneDNN: the `gemm` crate for every product.
    Off,
    /// oneDNN for every product it can take (all but the few-row products
    /// whose rows promise their own bits), whatever the size: for tests and
    /// benchmarks of the oneDNN path.
    Always,
}

impl OneDnnMode {
    /// The mode `ECDIT_ONEDNN` asks for: `0`/`off`/`false`/`no` -> Off,
    /// `always`/`force` -> Always, anything else (or unset) -> Auto.
    pub fn from_env() -> Self {
        match std::env::var("ECDIT_ONEDNN").map(|v| v.trim().to_ascii_lowercase()) {
            Ok(v) if matches!(v.as_str(), "0" | "off" | "false" | "no") => Self::Off,
            Ok(v) if matches!(v.as_str(), "always" | "force") => Self::Always,
            _ => Self::Auto,
        }
    }
}

/// What to do to get the oneDNN path, for messages.
pub const HOW_TO_GET: &str = "apt-get install libdnnl2 (oneDNN 2.x), or set ECDIT_ONEDNN_LIB=/path/to/libdnnl.so.2";

// ---- the C declarations (oneDNN 2.x, dnnl.h / dnnl_types.h) ----

/// `dnnl_status_t`; 0 is `dnnl_success`.
pub(crate) type Status = c_int;
/// Opaque handles (`dnnl_engine_t`, `dnnl_stream_t`, `dnnl_memory_t`, ...).
pub(crate) type Handle = *mut c_void;

/// `dnnl_memory_desc_t` of 2.x: a 696-byte struct filled by
/// `dnnl_memory_desc_init_by_strides` and only ever passed back by pointer, so
/// it is kept as aligned bytes, with room to spare for later 2.x releases.
#[repr(C, align(8))]
pub(crate) struct MemoryDescV2(pub [u8; 1024]);

/// `dnnl_matmul_desc_t` of 2.x (2800 bytes: four memory descriptors and two
/// enums), filled by `dnnl_matmul_desc_init`; kept as aligned bytes too.
#[repr(C, align(8))]
pub(crate) struct MatmulDescV2(pub [u8; 4096]);

/// `dnnl_exec_arg_t`.
#[repr(C)]
pub(crate) struct ExecArg {
    pub arg: c_int,
    pub memory: Handle,
}

/// `dnnl_version_t`.
#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}

/// `dnnl_data_type_t` values.
pub(crate) const DT_BF16: c_int = 2;
pub(crate) const DT_F32: c_int = 3;
/// `dnnl_cpu` of `dnnl_engine_kind_t`.
const ENGINE_CPU: c_int = 1;
/// `dnnl_stream_default_flags`.
pub(crate) const STREAM_DEFAULT: c_uint = 1;
/// `dnnl_query_impl_info_str` of `dnnl_query_t`.
pub(crate) const QUERY_IMPL_INFO_STR: c_int = 8;
/// `DNNL_ARG_*` execution argument indices.
pub(crate) const ARG_SRC: c_int = 1;
pub(crate) const ARG_DST: c_int = 17;
pub(crate) const ARG_WEIGHTS: c_int = 33;
pub(crate) const ARG_BIAS: c_int = 41;
pub(crate) const ARG_SCRATCHPAD: c_int = 80;
/// `dnnl_query_weights_md` and `dnnl_query_scratchpad_md` of `dnnl_query_t`.
pub(crate) const QUERY_WEIGHTS_MD: c_int = 131;
pub(crate) const QUERY_SCRATCHPAD_MD: c_int = 136;
/// `dnnl_format_tag_any`: the primitive picks the layout.
pub(crate) const FORMAT_TAG_ANY: c_int = 1;
/// `DNNL_ARG_FROM`, `DNNL_ARG_TO` of a reorder.
pub(crate) const ARG_FROM: c_int = 1;
pub(crate) const ARG_TO: c_int = 17;
/// `dnnl_scratchpad_mode_user`: the caller passes each run's scratchpad.
pub(crate) const SCRATCHPAD_USER: c_int = 1;
/// `dnnl_alg_kind_t` of the activations fused as eltwise post-ops.
pub(crate) const ELTWISE_GELU_TANH: c_int = 0xcf;
/// `x * sigmoid(alpha * x)`: SiLU at alpha 1.
pub(crate) const ELTWISE_SWISH: c_int = 0xdf;
/// `DNNL_RUNTIME_*` values of `dnnl_version_t::cpu_runtime`.
const RUNTIME_SEQ: c_uint = 1;
const RUNTIME_OMP: c_uint = 2;

/// Entry points 2.x and 3.x share (same names and C signatures).
pub(crate) struct Api {
    pub engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    pub stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_uint) -> Status,
    pub stream_wait: unsafe extern "C" fn(Handle) -> Status,
    pub stream_destroy: unsafe extern "C" fn(Handle) -> Status,
    pub primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    pub primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    pub primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    pub primitive_desc_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    pub primitive_desc_destroy: unsafe extern "C" fn(Handle) -> Status,
    pub primitive_attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    pub primitive_attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    pub primitive_attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    pub post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    pub post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    /// `dnnl_memory_create(memory, const md, engine, handle)`: the md is a
    /// struct pointer in 2.x and a handle in 3.x, the same pointer either way.
    pub memory_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *mut c_void) -> Status,
    pub memory_destroy: unsafe extern "C" fn(Handle) -> Status,
}

/// Entry points of the 2.x API that 3.x removed or changed.
pub(crate) struct ApiV2 {
    pub memory_desc_init_by_strides:
        unsafe extern "C" fn(*mut MemoryDescV2, c_int, *const i64, c_int, *const i64) -> Status,
    pub matmul_desc_init: unsafe extern "C" fn(
        *mut MatmulDescV2,
        *const MemoryDescV2,
        *const MemoryDescV2,
        *const MemoryDescV2,
        *const MemoryDescV2,
    ) -> Status,
    pub primitive_desc_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    pub primitive_attr_set_output_scales: unsafe extern "C" fn(Handle, i64, c_int, *const f32) -> Status,
    pub post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    /// `(post_ops, scale, alg_kind, alpha, beta)`; 3.x dropped `scale`.
    pub post_ops_append_eltwise: unsafe extern "C" fn(Handle, f32, c_int, f32, f32) -> Status,
    pub primitive_attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    /// Returns a descriptor owned by the primitive descriptor (3.x: a handle).
    pub primitive_desc_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const c_void,
    pub memory_desc_get_size: unsafe extern "C" fn(*const c_void) -> usize,
    /// `(md, ndims, dims, data_type, format_tag)`: for `FORMAT_TAG_ANY`.
    pub memory_desc_init_by_tag: unsafe extern "C" fn(*mut MemoryDescV2, c_int, *const i64, c_int, c_int) -> Status,
    /// `(pd, src_md, src_engine, dst_md, dst_engine, attr)`.
    pub reorder_primitive_desc_create:
        unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *const c_void, Handle, Handle) -> Status,
    /// 1 when two descriptors describe the same layout.
    pub memory_desc_equal: unsafe extern "C" fn(*const c_void, *const c_void) -> c_int,
}

/// The API generation of the loaded library.
pub(crate) enum Flavour {
    /// oneDNN 2.x (`libdnnl.so.2`).
    V2(ApiV2),
}

/// The loaded library: its entry points, one CPU engine, and the one lock
/// every call takes.
pub struct OneDnn {
    pub(crate) api: Api,
    pub(crate) flavour: Flavour,
    /// `omp_set_num_threads`, found through the library's own OpenMP runtime.
    omp_set_num_threads: unsafe extern "C" fn(c_int),
    /// `dnnl_engine_t` for the CPU; used only under `calls`.
    pub(crate) engine: Handle,
    /// "2.6.3".
    version: String,
    /// The implementations oneDNN picks for a probe product of each dtype,
    /// e.g. "brg:avx512_core" (f32) and "brg:avx512_core_amx" (bf16).
    impl_f32: String,
    impl_bf16: String,
    /// Serialises every oneDNN call in the process and holds the stream and
    /// the primitive cache.
    calls: Mutex<matmul::State>,
    /// Keeps the library mapped for the life of the process.
    _lib: libloading::Library,
}

// SAFETY: the stream and the primitives built for the lock are only used
// while `calls` is locked, one thread at a time; the engine and the
// primitives built for tasks (user scratchpad mode) may be used by several
// threads at once, which oneDNN allows; oneDNN objects are not tied to the
// thread that created them.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

impl std::fmt::Debug for OneDnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl OneDnn {
    /// "onednn 2.6.3 (f32 brg:avx512_core, bf16 brg:avx512_core_amx; OpenMP)".
    pub fn describe(&self) -> String {
        format!(
            "onednn {} (f32 {}, bf16 {}; OpenMP)",
            self.version, self.impl_f32, self.impl_bf16
        )
    }

    /// The library's version, "2.6.3".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether this CPU runs bf16 products on oneDNN (its probe found a
    /// kernel; oneDNN 2.x has none without AVX-512).
    pub(crate) fn has_bf16(&self) -> bool {
        !self.impl_bf16.starts_with("unavailable")
    }

    /// Runs primitive `prim` on `stream` over `(argument, descriptor,
    /// buffer)` triples and waits for it: the memory objects are made for
    /// the call and released after.
    ///
    /// # Safety
    /// Each buffer must hold what its descriptor spans, and no other run may
    /// use `stream` (or a scratchpad among the buffers) meanwhile.
    pub(crate) unsafe fn run(
        &self,
        stream: Handle,
        prim: Handle,
        parts: &[(c_int, *const c_void, *mut c_void)],
    ) -> Result<(), String> {
        let api = &self.api;
        let mut args = Vec::with_capacity(parts.len());
        let mut made = Ok(());
        for &(arg, md, ptr) in parts {
            let mut memory: Handle = std::ptr::null_mut();
            made = check(
                (api.memory_create)(&mut memory, md, self.engine, ptr),
                "dnnl_memory_create",
            );
            if made.is_err() {
                break;
            }
            args.push(ExecArg { arg, memory });
        }
        let ran = made.and_then(|()| {
            check(
                (api.primitive_execute)(prim, stream, args.len() as c_int, args.as_ptr()),
                "dnnl_primitive_execute",
            )
            .and_then(|()| check((api.stream_wait)(stream), "dnnl_stream_wait"))
        });
        for a in &args {
            (api.memory_destroy)(a.memory);
        }
        ran
    }

    /// The lock every oneDNN call is made under, with OpenMP set to `threads`
    /// threads for the calls made while it is held (OpenMP's thread count is
    /// per calling thread, and primitives are built for the count they see).
    pub(crate) fn lock(&self, threads: usize) -> MutexGuard<'_, matmul::State> {
        let guard = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: a plain setter of the calling thread's OpenMP ICV.
        unsafe { (self.omp_set_num_threads)(threads.clamp(1, c_int::MAX as usize) as c_int) };
        guard
    }
}

/// The process's oneDNN, loaded on first use: the library, or why not (the
/// reason ends with how to get it).
pub fn library() -> Result<&'static OneDnn, &'static str> {
    static LIB: OnceLock<Result<OneDnn, String>> = OnceLock::new();
    match LIB.get_or_init(|| {
        let loaded = load();
        if let Err(reason) = &loaded {
            tracing::info!("CPU matrix products on the gemm crate: {reason}");
        }
        loaded
    }) {
        Ok(lib) => Ok(lib),
        Err(reason) => Err(reason.as_str()),
    }
}

/// Whether oneDNN's f32 kernel beats the `gemm` crate on this CPU, so `Auto`
/// sends f32 products to it too. Measured on 2 threads, DiT-S shapes: on an
/// AMD EPYC (AVX-512) oneDNN's `brg:avx512_core` ran at 1.5-2.1x the `gemm`
/// crate under load and 0.97-1.07x on a quiet one (family 26); on an Intel
/// Xeon with AMX at 0.85-1.1x. A fixed rule by vendor, not
/// a timing at start-up: a product's path, and so its bits, must be the same
/// on every run on one machine.
pub fn f32_faster_here() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| cpu_vendor() == "AuthenticAMD")
}

/// The CPUID vendor string ("GenuineIntel", "AuthenticAMD", ...).
fn cpu_vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0 (the vendor) exists on every x86-64 CPU.
        let r = std::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|v| v.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

/// How oneDNN's products run, whatever the dtype (`packed.rs`, `grouped.rs`).
const PACKED_AND_GROUPED: &str = "weights pre-packed once; grouped (expert) products side by side, one per thread";

/// What the CPU backend's matrix products run on under `mode`, in one line:
/// "onednn 2.6.3 (...)" or "gemm crate (oneDNN ...: how to get it)".
pub fn status(mode: OneDnnMode) -> String {
    let products = products_status(mode);
    match library() {
        // bf16 attention runs on oneDNN whenever its bf16 kernels do.
        Ok(lib) if mode != OneDnnMode::Off && lib.has_bf16() => {
            format!("{products}; {PACKED_AND_GROUPED}; bf16 attention per head on oneDNN")
        }
        Ok(_) if mode != OneDnnMode::Off => format!("{products}; {PACKED_AND_GROUPED}"),
        _ => products,
    }
}

/// [`status`] of the plain products.
fn products_status(mode: OneDnnMode) -> String {
    if mode == OneDnnMode::Off {
        // Not even loaded.
        return "gemm crate (oneDNN disabled: ECDIT_ONEDNN=0 or the backend's options)".into();
    }
    match (mode, library()) {
        (_, Err(reason)) => format!("gemm crate ({reason})"),
        (OneDnnMode::Auto, Ok(lib)) if f32_faster_here() => format!(
            "onednn {} (OpenMP) for bf16 products with k >= {} and n >= {} ({}) and f32 ones with k >= {} ({}: \
             measured faster than the gemm crate on AMD CPUs); gemm crate for the rest",
            lib.version,
            crate::ops::gemm::ONEDNN_BF16_MIN_K,
            crate::ops::gemm::ONEDNN_BF16_MIN_N,
            lib.impl_bf16,
            crate::ops::gemm::ONEDNN_F32_MIN_K,
            lib.impl_f32
        ),
        (OneDnnMode::Auto, Ok(lib)) => format!(
            "onednn {} (OpenMP) for bf16 products with k >= {} and n >= {} ({}); gemm crate for f32 (oneDNN's {} \
             measured no faster on Intel CPUs) and the rest",
            lib.version,
            crate::ops::gemm::ONEDNN_BF16_MIN_K,
            crate::ops::gemm::ONEDNN_BF16_MIN_N,
            lib.impl_bf16,
            lib.impl_f32
        ),
        (_, Ok(lib)) => format!(
            "onednn {} (OpenMP) for every product but those of <= 8 rows (f32 {}, bf16 {}; ECDIT_ONEDNN=always)",
            lib.version, lib.impl_f32, lib.impl_bf16
        ),
    }
}

/// Finds, opens and checks the library, creates the CPU engine and stream,
/// and builds one probe product per dtype to learn which kernels oneDNN picks.
fn load() -> Result<OneDnn, String> {
    let (lib, name) = open()?;
    let sym_err = |s: &str, e: libloading::Error| format!("{name} lacks {s} ({e}); {HOW_TO_GET}");
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the declared signature is the one in oneDNN 2.x's dnnl.h.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| sym_err($name, e))?
        };
    }
    let version_fn: unsafe extern "C" fn() -> *const Version = sym!("dnnl_version");
    // SAFETY: dnnl_version returns a pointer to a static struct.
    let v = unsafe { version_fn().as_ref() }.ok_or_else(|| format!("{name}: dnnl_version returned null"))?;
    let version = format!("{}.{}.{}", v.major, v.minor, v.patch);
    if v.major != 2 {
        return Err(format!(
            "{name} is oneDNN {version}; only the 2.x API is supported yet: {HOW_TO_GET}"
        ));
    }
    let omp_set_num_threads: unsafe extern "C" fn(c_int) = match v.cpu_runtime {
        // Resolved through the library's dependencies (libgomp or libiomp5).
        RUNTIME_OMP => sym!("omp_set_num_threads"),
        RUNTIME_SEQ => {
            return Err(format!(
                "{name} is a sequential build of oneDNN {version} (one thread); the OpenMP build is needed: {HOW_TO_GET}"
            ))
        }
        other => {
            return Err(format!(
                "{name} (oneDNN {version}) threads with runtime {other} (not OpenMP), whose thread count this backend cannot set: {HOW_TO_GET}"
            ))
        }
    };
    let api = Api {
        engine_create: sym!("dnnl_engine_create"),
        stream_create: sym!("dnnl_stream_create"),
        stream_wait: sym!("dnnl_stream_wait"),
        stream_destroy: sym!("dnnl_stream_destroy"),
        primitive_create: sym!("dnnl_primitive_create"),
        primitive_execute: sym!("dnnl_primitive_execute"),
        primitive_destroy: sym!("dnnl_primitive_destroy"),
        primitive_desc_query: sym!("dnnl_primitive_desc_query"),
        primitive_desc_destroy: sym!("dnnl_primitive_desc_destroy"),
        primitive_attr_create: sym!("dnnl_primitive_attr_create"),
        primitive_attr_destroy: sym!("dnnl_primitive_attr_destroy"),
        primitive_attr_set_post_ops: sym!("dnnl_primitive_attr_set_post_ops"),
        post_ops_create: sym!("dnnl_post_ops_create"),
        post_ops_destroy: sym!("dnnl_post_ops_destroy"),
        memory_create: sym!("dnnl_memory_create"),
        memory_destroy: sym!("dnnl_memory_destroy"),
    };
    let flavour = Flavour::V2(ApiV2 {
        memory_desc_init_by_strides: sym!("dnnl_memory_desc_init_by_strides"),
        matmul_desc_init: sym!("dnnl_matmul_desc_init"),
        primitive_desc_create: sym!("dnnl_primitive_desc_create"),
        primitive_attr_set_output_scales: sym!("dnnl_primitive_attr_set_output_scales"),
        post_ops_append_sum: sym!("dnnl_post_ops_append_sum"),
        post_ops_append_eltwise: sym!("dnnl_post_ops_append_eltwise"),
        primitive_attr_set_scratchpad_mode: sym!("dnnl_primitive_attr_set_scratchpad_mode"),
        primitive_desc_query_md: sym!("dnnl_primitive_desc_query_md"),
        memory_desc_get_size: sym!("dnnl_memory_desc_get_size"),
        memory_desc_init_by_tag: sym!("dnnl_memory_desc_init_by_tag"),
        reorder_primitive_desc_create: sym!("dnnl_reorder_primitive_desc_create"),
        memory_desc_equal: sym!("dnnl_memory_desc_equal"),
    });
    let mut engine: Handle = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; engine index 0 of the CPU kind.
    check(
        unsafe { (api.engine_create)(&mut engine, ENGINE_CPU, 0) },
        "dnnl_engine_create",
    )
    .map_err(|e| format!("{name}: {e}"))?;
    let mut stream: Handle = std::ptr::null_mut();
    // SAFETY: as above, on the engine just made.
    check(
        unsafe { (api.stream_create)(&mut stream, engine, STREAM_DEFAULT) },
        "dnnl_stream_create",
    )
    .map_err(|e| format!("{name}: {e}"))?;
    let mut lib = OneDnn {
        api,
        flavour,
        omp_set_num_threads,
        engine,
        version,
        impl_f32: String::new(),
        impl_bf16: String::new(),
        calls: Mutex::new(matmul::State::new(stream)),
        _lib: lib,
    };
    // Probe products at a DiT-S shape, to name the kernels in `describe`.
    let probe = |dt: c_int| {
        let spec = matmul::Spec {
            batch: 1,
            dims: GemmDims::nn(256, 384, 384),
            src: dt,
            dst: DT_F32,
            bias: false,
            alpha: 1.0,
            beta: 0.0,
            act: None,
            whole_k: false,
        };
        match lib.implementation(spec, 1) {
            Ok(name) => name,
            Err(e) => format!("unavailable: {e}"),
        }
    };
    let (f32_impl, bf16_impl) = (probe(DT_F32), probe(DT_BF16));
    if f32_impl.starts_with("unavailable") {
        return Err(format!("{name} (oneDNN {}): f32 matmul {f32_impl}", lib.version));
    }
    lib.impl_f32 = f32_impl;
    lib.impl_bf16 = bf16_impl;
    Ok(lib)
}

/// Opens `ECDIT_ONEDNN_LIB`, else the first of `libdnnl.so.2` and
/// `libdnnl.so.3` the dynamic loader finds (3.x is then declined by version).
///
/// First sets `OMP_WAIT_POLICY=passive` unless the user chose a wait policy:
/// OpenMP's default lets idle team threads spin after each parallel region,
/// which on a loaded machine (and between our rayon ops) takes the core the
/// thread still computing needs. Measured on 2 busy cores, bf16 2048x384x384:
/// 80 GFLOP/s spinning, 960 passive. libgomp reads it when it loads, which is
/// when oneDNN loads (unless the host already uses OpenMP).
fn open() -> Result<(libloading::Library, String), String> {
    let set_policy = std::env::var_os("OMP_WAIT_POLICY").is_none() && std::env::var_os("GOMP_SPINCOUNT").is_none();
    if set_policy {
        // Before any OpenMP runtime is loaded (taken back below if oneDNN is
        // not found, so it only ever concerns the runtime oneDNN brings).
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
    let candidates: Vec<String> = match std::env::var("ECDIT_ONEDNN_LIB") {
        Ok(path) if !path.is_empty() => vec![path],
        _ => vec!["libdnnl.so.2".into(), "libdnnl.so.3".into()],
    };
    let mut errors = Vec::new();
    for name in &candidates {
        // SAFETY: loading oneDNN runs its static initialisers, which only set
        // up its own state.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return Ok((lib, name.clone())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if set_policy {
        std::env::remove_var("OMP_WAIT_POLICY");
    }
    let first = errors.first().map(String::as_str).unwrap_or("");
    Err(format!("oneDNN not found ({first}): {HOW_TO_GET}"))
}

/// Errors unless a oneDNN call returned `dnnl_success`.
pub(crate) fn check(status: Status, what: &str) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what} failed with dnnl_status {status} ({})",
            status_name(status)
        ))
    }
}

/// The `dnnl_status_t` names.
fn status_name(status: Status) -> &'static str {
    match status {
        1 => "out_of_memory",
        2 => "invalid_arguments",
        3 => "unimplemented",
        4 => "iterator_ends",
        5 => "runtime_error",
        6 => "not_required",
        _ => "unknown",
    }
}

/// A C string owned by oneDNN, copied.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
pub(crate) unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
