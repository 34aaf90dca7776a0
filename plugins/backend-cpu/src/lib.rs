//! # ecdit-backend-cpu
//!
//! The CPU backend: every op of [`ecdit_engine::Backend`] on the CPU, with
//! the matrix products on the `gemm` crate (runtime SIMD dispatch, AVX-512
//! where the CPU has it) or on oneDNN where the library is found at run time
//! and faster (bf16 on AMX), and row-wise ops split over a rayon pool the
//! backend owns. One file per op family under `ops/`; oneDNN under `onednn/`.
//!
//! ## Design
//! - Buffers are zeroed, 64-byte aligned host memory, so ops take host slices
//!   of their tensor views and `upload`/`download` are plain copies.
//! - bf16 storage: every float op accepts f32 or bf16 tensors; bf16 inputs
//!   are widened to f32, the f32 kernel runs, and bf16 outputs are rounded
//!   once (nearest even). Router math and the optimiser are f32 only.
//! - One level of parallelism: [`CpuBackend`] owns a pool of `threads` threads
//!   and runs each op inside it; the GEMM and the row-wise ops both use that
//!   pool, and nothing nests a second pool.
//! - Determinism: for a given thread count results are the same bits run to
//!   run; row-wise ops, reductions and scatter-add give the same bits for any
//!   thread count (tests check this, and check it for the GEMM too).
//! - Attention is built from strided GEMMs that read the interleaved
//!   `[B, T, H, Dh]` layout in place, plus a masked row softmax: per (sample,
//!   head) when training keeps the probabilities, per block of query rows
//!   with a small per-thread scratch at inference (no probability matrix).
//! - The router ops call the host routers' own arithmetic
//!   (`ecdit_engine::routing_math`), so device and host routing agree to the bit.
//! - GELU, SiLU and softmax use a polynomial `exp` (Cephes' `expf`, a few
//!   ulp) compiled for AVX-512, AVX2+FMA and the baseline and picked at run
//!   time, instead of scalar libm `tanhf`/`expf` calls (about 10x faster
//!   GELU); all paths give the same bits.
//! - oneDNN ([`onednn`]): loaded with `libloading` when the first backend
//!   starts (`libdnnl.so.2`, the 2.x API); without it one line at start-up
//!   says how to get it and everything runs on the `gemm` crate.
//!   [`CpuBackend::matmul_library`] and `ecdit components` name the path.
//!   bf16 products with k >= 32 and n >= 32 go to its AMX kernel (5-7x the
//!   `gemm` crate on widened inputs); f32 stays on the `gemm` crate (oneDNN's
//!   f32 measured no faster). `ECDIT_ONEDNN=0` turns it off, `=always` sends
//!   it every product it takes. It is called from the op's calling thread,
//!   never inside the pool, with OpenMP set to the backend's `threads`: one
//!   level of parallelism at a time.
//! - [`bench`](mod@bench) times the GEMM on the DiT-S/2 shapes for `ecdit bench gemm`.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod onednn;
mod ops;
mod pool;
mod slices;

pub use backend::CpuBackend;
pub use onednn::OneDnnMode;

use ecdit_engine::registry::{ComponentInfo, Factory, Family, ParamInfo, ParamType};
use ecdit_engine::{spec, Backend, Registry, Result};
use serde_json::json;
use std::sync::Arc;

/// The kind name of this backend in specs (`{"kind": "cpu", "threads": 2}`).
pub const KIND: &str = "cpu";

/// What the registry lists for the CPU backend. Its one parameter, `threads`,
/// is the size of the backend's thread pool; 0 (the default) means all cores.
/// The description names the matrix library and why (loading oneDNN if it
/// was not loaded yet).
pub fn component_info() -> ComponentInfo {
    ComponentInfo {
        family: Family::Backend,
        kind: KIND.into(),
        description: format!(
            "f32 (and bf16 storage) on the CPU, rayon over rows, one thread pool; matrix products: {}",
            onednn::status(OneDnnMode::from_env())
        ),
        params: vec![ParamInfo::new(
            "threads",
            ParamType::Int,
            Some(json!(0)),
            "threads of the backend's pool; 0 = all cores",
        )],
        origin: "builtin".into(),
    }
}

/// Registers this crate's components (the `cpu` backend) into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let factory: Factory<Box<dyn Backend>> = Arc::new(|params| {
        let threads: usize = spec::get("backend 'cpu'", params, "threads")?;
        Ok(Box::new(CpuBackend::new(threads)?) as Box<dyn Backend>)
    });
    registry.register_backend(component_info(), factory)
}
