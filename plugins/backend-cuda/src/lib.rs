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
//!   ops take views as device address plus byte offset, all queued on one stream.
//!   Index checks of gather/scatter download the (small) index tensor once.
//! - **Parity first.** Kernels (`kernels/*.cu`) are the plainest deterministic
//!   versions; where the CPU backend's bits are the reference (axpby, adaLN,
//!   layer norm, gather-dot, top-k) they round every operation as it does.
//! - **Not yet on the GPU**: `router_softmax` (it returns `op router_softmax is not
//!   implemented on the CUDA backend yet`: bit-identity with the host routers needs
//!   the host's exact `exp` on the device). Float tensors are f32 only (bf16 storage
//!   is refused, as is `dtype: bf16`; `copy` converts between the two).
#![warn(missing_docs)]

pub mod backend;
mod device;
pub mod gemm;
pub mod kernels;
mod memory;
mod ops;
pub mod probe;
pub mod storage;

pub use backend::CudaBackend;
pub use probe::{probe_driver, DRIVER_LIBRARIES};

use ecdit_engine::spec::get;
use ecdit_engine::{Backend, ComponentInfo, EngineError, Family, ParamInfo, ParamType, Registry, Result};
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
            "storage type of activations and weights (bf16 not yet implemented)",
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
            if dtype != "f32" {
                return Err(EngineError::param(
                    COMPONENT,
                    "dtype",
                    format!("\"{dtype}\""),
                    "only f32 is implemented on cuda so far",
                ));
            }
            Ok(Box::new(CudaBackend::new(device, tf32)?) as Box<dyn Backend>)
        }),
    )
}
