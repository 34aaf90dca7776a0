//! The CUDA C kernels (`kernels/*.cu`), compiled once per backend with NVRTC.
//!
//! Each kernel is the plainest correct version (one thread per element, row,
//! column or selection), written for parity with the CPU backend, not for
//! speed. Reductions run serially inside one thread so results are
//! deterministic; where the CPU backend's bits are the reference, the kernels
//! round every operation explicitly (no FMA contraction).

use crate::probe::cuda_error;
use cudarc::driver::{CudaContext, CudaFunction};
use ecdit_engine::Result;
use std::sync::Arc;

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

/// Compiles [`SOURCE`] to PTX (needs only NVRTC, no driver or GPU).
pub fn compile_ptx() -> Result<cudarc::nvrtc::Ptx> {
    cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| cuda_error(format!("NVRTC compile failed: {e}")))
}

/// Compiles [`SOURCE`] for one GPU architecture (`sm_80`, `sm_90`, ...) with
/// the backend's options; returns the PTX and NVRTC's log (warnings land
/// there even when compilation succeeds). Needs only NVRTC.
pub fn compile_for(arch: &str) -> Result<(String, String)> {
    use cudarc::nvrtc::result;
    let text = |bytes: Vec<std::ffi::c_char>| {
        let bytes: Vec<u8> = bytes.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let src = std::ffi::CString::new(SOURCE).map_err(|e| cuda_error(format!("kernel source: {e}")))?;
    let prog = result::create_program(&src, None).map_err(|e| cuda_error(format!("NVRTC: {e}")))?;
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY: `prog` is a live program created above and destroyed once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }.map(text).unwrap_or_default();
    let ptx = match compiled {
        Ok(()) => unsafe { result::get_ptx(prog) }.map(text),
        Err(e) => Err(e),
    };
    unsafe { result::destroy_program(prog) }.map_err(|e| cuda_error(format!("NVRTC: {e}")))?;
    let ptx = ptx.map_err(|e| cuda_error(format!("NVRTC compile for {arch} failed: {e}\n{log}")))?;
    Ok((ptx, log))
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
            /// Compiles [`SOURCE`] with NVRTC and loads it into `ctx`.
            pub fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
                let module = ctx
                    .load_module(compile_ptx()?)
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
    f32_to_bf16_copy,
    bf16_to_f32_copy,
    scale_in_place,
    add_broadcast,
    axpby,
    unary_forward,
    unary_backward,
    adamw_step,
    sum_rows,
    softmax_rows,
    softmax_rows_backward,
    layer_norm,
    layer_norm_backward_input,
    layer_norm_backward_params,
    modulate,
    modulate_backward_input,
    modulate_backward_params,
    gated_residual,
    gated_residual_backward_input,
    gated_residual_backward_params,
    patchify,
    unpatchify,
    timestep_features,
    gather_rows,
    scatter_add_rows,
    gather_dot,
    top_k_rows,
    top_k_tokens,
    attention_probs,
    attention_apply,
    attention_infer,
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

    /// Every kernel compiles to PTX for sm_80 and sm_90 with no error and no
    /// warning, with NVRTC alone (no driver, no GPU). Without libnvrtc the
    /// test says so and passes, unless `ECDIT_REQUIRE_NVRTC` is set (CI sets it
    /// after installing the `nvidia-cuda-nvrtc-cu12` wheel).
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
            let (ptx, log) = compile_for(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert!(!log.to_lowercase().contains("warning"), "{arch}: NVRTC warned:\n{log}");
            assert!(
                ptx.contains(&format!(".target {arch}")),
                "{arch}: PTX for another target"
            );
            for name in KERNEL_NAMES {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{arch}: {name} not in the PTX"
                );
            }
        }
    }
}
