//! # ecdit-schedulers
//!
//! Schedulers: rectified flow with Euler sampling, DDPM with DDIM sampling.
#![warn(missing_docs)]

use ecdit_engine::{Registry, Result};

/// Registers this crate's components into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let _ = registry;
    Ok(())
}
