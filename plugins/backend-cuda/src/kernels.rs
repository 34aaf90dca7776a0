//! The CUDA C kernels (`kernels/*.cu`), compiled once per backend with NVRTC.
//!
//! Kernels are plain and deterministic: grid-stride loops with bounds checks,
//! sums in a fixed order (never atomics on floats). Float tensors are passed as
//! `Ten` (address plus storage type, [`crate::device::DevTen`]), so each kernel
//! serves f32 and bf16 storage alike with f32 arithmetic. Where the CPU
//! backend's bits are the reference (element-wise ops, adaLN, layer norm,
//! softmax, gather/scatter, top-k, optimisers, the router softmax) the kernels
//! round every operation as it does (explicit `__fadd_rn`-style intrinsics, no
//! FMA contraction) and sum in its order.
//!
//! At start-up the source is compiled for the device's own architecture to a
//! cubin (no PTX JIT, so a driver older than NVRTC is fine), falling back to
//! PTX for NVRTC's default target. The tests compile it for sm_80 and sm_90
//! and fail on any NVRTC diagnostic, warnings included.

use crate::probe::cuda_error;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{result, sys, Ptx};
use ecdit_engine::Result;
use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};

/// CUDA C source of every kernel: the files of `kernels/`, `common.cu` first.
pub const SOURCE: &str = concat!(
    include_str!("../kernels/common.cu"),
    include_str!("../kernels/memory.cu"),
    include_str!("../kernels/elementwise.cu"),
    include_str!("../kernels/rows.cu"),
    include_str!("../kernels/adaln.cu"),
    include_str!("../kernels/embed.cu"),
    include_str!("../kernels/gather.cu"),
    include_str!("../kernels/topk.cu"),
    include_str!("../kernels/attention.cu"),
);

/// Options of every compile besides the architecture.
pub const OPTIONS: &[&str] = &["--std=c++17"];

/// What NVRTC made of [`SOURCE`] for one architecture.
pub struct Compiled {
    /// PTX text (for `compute_XY` and `sm_XY` targets alike).
    pub ptx: String,
    /// The cubin, when the target was a real architecture (`sm_XY`).
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log: warnings land here even when compilation succeeds.
    pub log: String,
}

fn text(bytes: Vec<c_char>) -> String {
    let bytes: Vec<u8> = bytes.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles [`SOURCE`] for `arch` (`sm_80`, `sm_90`, `compute_80`, ...) with
/// [`OPTIONS`]. Needs only NVRTC (no driver, no GPU).
pub fn compile_for(arch: &str) -> Result<Compiled> {
    let src = CString::new(SOURCE).map_err(|e| cuda_error(format!("kernel source: {e}")))?;
    let prog = result::create_program(&src, None).map_err(|e| cuda_error(format!("NVRTC: {e}")))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog` is a live program created above and destroyed once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }.map(text).unwrap_or_default();
    let outputs = compiled.and_then(|()| {
        let ptx = unsafe { result::get_ptx(prog) }.map(text)?;
        let cubin = if arch.starts_with("sm_") {
            let mut size = 0usize;
            // SAFETY: the program compiled; the buffer is sized from NVRTC's answer.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
            let mut bytes = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut c_char) }.result()?;
            Some(bytes)
        } else {
            None
        };
        Ok((ptx, cubin))
    });
    unsafe { result::destroy_program(prog) }.map_err(|e| cuda_error(format!("NVRTC: {e}")))?;
    let (ptx, cubin) = outputs.map_err(|e| cuda_error(format!("NVRTC compile for {arch} failed: {e}\n{log}")))?;
    Ok(Compiled { ptx, cubin, log })
}

/// A compiled cubin and the compute capability it is for.
type CachedCubin = ((i32, i32), Vec<u8>);

/// The module for a device of compute capability `(major, minor)`: a cubin
/// for `sm_{major}{minor}`, or, when this NVRTC cannot target it, PTX for
/// NVRTC's default target (JIT-compiled by the driver). A cubin is compiled
/// at most once per architecture and process (NVRTC takes seconds).
pub fn module_for(major: i32, minor: i32) -> Result<Ptx> {
    static CUBINS: Mutex<Vec<CachedCubin>> = Mutex::new(Vec::new());
    if let Ok(cache) = CUBINS.lock() {
        if let Some((_, cubin)) = cache.iter().find(|(cc, _)| *cc == (major, minor)) {
            return Ok(Ptx::from_binary(cubin.clone()));
        }
    }
    let arch = format!("sm_{major}{minor}");
    match compile_for(&arch) {
        Ok(Compiled { cubin: Some(cubin), .. }) => {
            if let Ok(mut cache) = CUBINS.lock() {
                cache.push(((major, minor), cubin.clone()));
            }
            Ok(Ptx::from_binary(cubin))
        }
        first => {
            let why = first.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(%arch, %why, "no cubin for this device; loading PTX instead");
            let opts = cudarc::nvrtc::CompileOptions {
                options: OPTIONS.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
                .map_err(|e| cuda_error(format!("NVRTC compile failed: {e}")))
        }
    }
}

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        /// The compiled kernels of one backend, one field per `extern "C"` kernel of [`SOURCE`].
        pub struct Kernels {
            $(
                #[allow(missing_docs)]
                pub $name: CudaFunction,
            )*
        }

        /// Names of every kernel in [`SOURCE`].
        pub const KERNEL_NAMES: &[&str] = &[$(stringify!($name)),*];

        impl Kernels {
            /// Compiles [`SOURCE`] for the device of `ctx` and loads it.
            pub fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
                let (major, minor) = ctx
                    .compute_capability()
                    .map_err(|e| cuda_error(format!("compute capability: {e}")))?;
                let module = ctx
                    .load_module(module_for(major, minor)?)
                    .map_err(|e| cuda_error(format!("loading the kernel module: {e}")))?;
                let load = |name: &str| {
                    module
                        .load_function(name)
                        .map_err(|e| cuda_error(format!("kernel '{name}' missing from the module: {e}")))
                };
                Ok(Self { $($name: load(stringify!($name))?,)* })
            }
        }
    };
}

kernels!(
    // memory.cu
    f32_to_bf16_copy,
    bf16_to_f32_copy,
    scale_in_place,
    // elementwise.cu
    add_broadcast,
    axpby,
    unary_forward,
    unary_backward,
    adamw_step,
    rmsprop_step,
    // rows.cu
    sum_rows,
    softmax_rows,
    softmax_rows_backward,
    router_softmax,
    layer_norm,
    layer_norm_backward_input,
    layer_norm_dparams_partial,
    layer_norm_dparams_fold,
    // adaln.cu
    modulate,
    modulate_backward_input,
    modulate_backward_params,
    gated_residual,
    gated_residual_backward_input,
    gated_residual_backward_params,
    // embed.cu
    patchify,
    unpatchify,
    timestep_features,
    // gather.cu
    gather_rows,
    scatter_count,
    scatter_scan,
    scatter_place,
    scatter_sort,
    scatter_apply,
    gather_dot,
    // topk.cu
    top_k_rows,
    top_k_tokens,
    // attention.cu
    attention_probs,
    attention_apply,
    attention_infer,
    attention_backward_ds,
    attention_backward_dq,
    attention_backward_dkv,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_in_the_source() {
        for name in KERNEL_NAMES {
            assert!(
                SOURCE.contains(&format!("__global__ void {name}(")),
                "kernel {name} missing from kernels/*.cu"
            );
        }
        assert_eq!(SOURCE.matches("__global__").count(), KERNEL_NAMES.len());
    }

    /// Every kernel compiles to PTX and a cubin for sm_80 and sm_90 with NVRTC
    /// alone (no driver, no GPU), and NVRTC says nothing at all: any warning
    /// (or remark) in its log fails the test. Without libnvrtc the test says
    /// so and passes, unless `ECDIT_REQUIRE_NVRTC` is set (CI sets it after
    /// installing the `nvidia-cuda-nvrtc-cu12` wheel).
    #[test]
    fn every_kernel_compiles_for_sm80_and_sm90_without_warnings() {
        if let Err(e) = crate::probe::probe_toolkit_library("NVRTC", "nvrtc") {
            assert!(
                std::env::var_os("ECDIT_REQUIRE_NVRTC").is_none(),
                "ECDIT_REQUIRE_NVRTC is set but NVRTC is missing: {e}"
            );
            eprintln!(
                "SKIPPED every_kernel_compiles_for_sm80_and_sm90_without_warnings: no libnvrtc \
                 (pip install nvidia-cuda-nvrtc-cu12 and add its lib/ to LD_LIBRARY_PATH)"
            );
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let out = compile_for(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert!(out.log.trim().is_empty(), "{arch}: NVRTC said something:\n{}", out.log);
            assert!(
                out.ptx.contains(&format!(".target {arch}")),
                "{arch}: PTX for another target"
            );
            for name in KERNEL_NAMES {
                assert!(
                    out.ptx.contains(&format!(".entry {name}(")),
                    "{arch}: {name} not in the PTX"
                );
            }
            let cubin = out.cubin.unwrap_or_else(|| panic!("{arch}: no cubin"));
            assert!(cubin.starts_with(b"\x7fELF"), "{arch}: the cubin is not an ELF image");
        }
    }

    /// The check above really fails on a warning: NVRTC does report one in its
    /// log for a kernel with an unused variable (so an empty log means something).
    #[test]
    fn nvrtc_reports_warnings_in_its_log() {
        if crate::probe::probe_toolkit_library("NVRTC", "nvrtc").is_err() {
            assert!(
                std::env::var_os("ECDIT_REQUIRE_NVRTC").is_none(),
                "NVRTC required but missing"
            );
            eprintln!("SKIPPED nvrtc_reports_warnings_in_its_log: no libnvrtc");
            return;
        }
        let src = CString::new("extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }").unwrap();
        let prog = result::create_program(&src, None).unwrap();
        let opts = ["--gpu-architecture=sm_80".to_string()];
        unsafe { result::compile_program(prog, &opts) }.unwrap();
        let log = unsafe { result::get_program_log(prog) }.map(text).unwrap();
        unsafe { result::destroy_program(prog) }.unwrap();
        assert!(log.contains("warning") && log.contains("unused"), "log: {log}");
    }
}
