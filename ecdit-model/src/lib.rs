//! # ecdit-model
//!
//! The EC-DiT model built on the ecdit engine's components, plus the `ecdit`
//! command-line program.
#![warn(missing_docs)]

pub mod bench_forward;
pub mod bench_moe;
pub mod bench_train;
pub mod config;
pub mod config_files;
pub mod data;
pub mod eval;
pub mod info;
pub mod inspect;
pub mod limits;
pub mod model;
pub mod plot;
pub mod sample;
pub mod text;
pub mod train;
pub mod weights;

use ecdit_engine::{Registry, Result};

/// A registry holding every shipped component (CPU and CUDA backends, routers,
/// experts, schedulers).
pub fn registry() -> Result<Registry> {
    let mut registry = Registry::new();
    ecdit_backend_cpu::register(&mut registry)?;
    ecdit_routers::register(&mut registry)?;
    ecdit_schedulers::register(&mut registry)?;
    // The CUDA backend builds without CUDA; its factory probes for a driver.
    ecdit_backend_cuda::register(&mut registry)?;
    Ok(registry)
}
