//! # ecdit-backend-cuda
//!
//! The CUDA backend (`cuda`): cuBLAS for the products and NVRTC-compiled kernels for
//! every other op (element-wise, rows, adaLN, embeddings, attention, gather/scatter,
//! top-k, optimiser), through `cudarc`.
//!
//! ## Design
//! - **Builds anywhere.** cudarc is used with dynamic loading: nothing from CUDA is
//!   needed at build time, and libcuda, libcublas and libnvrtc are opened at run time.
//! - **Declines cleanly.** cudarc panics when a library is missing, so the factory
//!   [probes](probe) the driver (and then cuBLAS and NVRTC) first and returns
//!   `backend cuda: no CUDA driver found (tried libcuda.so.1, libcuda.so: ...)`; any
//!   panic left inside cudarc is caught and returned as an error too.
//! - **Device-resident.** [`Backend::alloc`] gives device memory (a cudarc slice,
//!   [`storage::CudaStorage`]); `upload` / `download` are the only transfers, and
//!   every op of the trait runs on the device (none falls back to the host),
//!   queued on one stream. No op waits for the host: scratch is stream-ordered,
//!   routing (`router_softmax`, `top_k_tokens`) has static shapes, and row indices
//!   are checked by the kernels, a bad one reported at the next download
//!   ([`status`]).
//! - **f32 and bf16 storage.** Every float op takes f32 or bf16 tensors in any
//!   mix (the kernels load and store through a dtype tag, arithmetic in f32);
//!   bf16 x bf16 products run on tensor cores with f32 accumulation. Router math
//!   and optimiser state are f32, as on the CPU. TF32 (`tf32: true`) is an
//!   option for large f32 products only, never a router's ([`gemm`]).
//! - **Parity first.** Kernels (`kernels/*.cu`) are plain and deterministic;
//!   where the CPU backend's bits are the reference (element-wise ops, adaLN,
//!   layer norm, softmax, gather/scatter, top-k, optimisers) they round every
//!   operation as it does and sum in its order, and the router softmax uses the
//!   host's exact `exp` ([`exact`]), so device and host routing agree to the bit.
#![warn(missing_docs)]

pub mod backend;
pub mod device;
pub mod exact;
pub mod gemm;
pub mod kernels;
mod memory;
mod ops;
pub mod probe;
pub mod status;
pub mod storage;

pub use backend::CudaBackend;
pub use probe::{probe_driver, DRIVER_LIBRARIES};

use ecdit_engine::spec::get;
use ecdit_engine::{Backend, ComponentInfo, DType, Family, ParamInfo, ParamType, Registry, Result};
use serde_json::json;
use std::sync::Arc;

/// Registry kind of this backend.
pub const KIND: &str = "cuda";

/// The declared parameters of the `cuda` backend.
pub fn param_infos() -> Vec<ParamInfo> {
    vec![
        ParamInfo::new("device", ParamType::Int, Some(json!(0)), "CUDA device ordinal"),
        ParamInfo::new(
            "tf32",
            ParamType::Bool,
            Some(json!(false)),
            "let cuBLAS use TF32 tensor cores for f32 products (faster, ~1e-3 relative error)",
        ),
        ParamInfo::new(
            "dtype",
            ParamType::Choice(vec!["f32".into(), "bf16".into()]),
            Some(json!("f32")),
            "storage type models should prefer for activations and weights (both are supported)",
        ),
    ]
}

/// Registers the `cuda` backend. Building it probes for a driver first, so on a
/// machine without one it is an error, never a panic.
pub fn register(registry: &mut Registry) -> Result<()> {
    let info = ComponentInfo {
        family: Family::Backend,
        kind: KIND.into(),
        description: "NVIDIA GPUs through cudarc: cuBLAS products, NVRTC kernels; needs a CUDA driver".into(),
        params: param_infos(),
        origin: "builtin".into(),
    };
    registry.register_backend(
        info,
        Arc::new(|params| {
            const COMPONENT: &str = "backend 'cuda'";
            // The driver first: without one, nothing else here can be checked.
            probe_driver()?;
            let device: usize = get(COMPONENT, params, "device")?;
            let tf32: bool = get(COMPONENT, params, "tf32")?;
            let dtype: String = get(COMPONENT, params, "dtype")?;
            let dtype = match dtype.as_str() {
                "bf16" => DType::BF16,
                _ => DType::F32,
            };
            Ok(Box::new(CudaBackend::with_dtype(device, tf32, dtype)?) as Box<dyn Backend>)
        }),
    )
}
