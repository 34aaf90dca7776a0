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

    /// NVRTC alone (no driver) compiles the source: run with libnvrtc on the
    /// library path, e.g. from the `nvidia-cuda-nvrtc-cu12` wheel.
    #[test]
    #[ignore = "needs libnvrtc"]
    fn the_source_compiles_with_nvrtc() {
        crate::probe::probe_toolkit_library("NVRTC", "nvrtc").unwrap();
        let ptx = compile_ptx().unwrap().to_src();
        for name in KERNEL_NAMES {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} not in the PTX");
        }
    }
}
