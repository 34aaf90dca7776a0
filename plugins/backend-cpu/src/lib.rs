//! # ecdit-backend-cpu
//!
//! The CPU backend: ndarray plus a real GEMM, both cores.
#![warn(missing_docs)]

use ecdit_engine::{Registry, Result};

/// Registers this crate's components into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let _ = registry;
    Ok(())
}
