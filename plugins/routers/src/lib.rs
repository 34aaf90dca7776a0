//! # ecdit-routers
//!
//! Routers (expert choice, token choice, dense, expert race) and experts (GELU MLP, SwiGLU).
#![warn(missing_docs)]

use ecdit_engine::{Registry, Result};

/// Registers this crate's components into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    let _ = registry;
    Ok(())
}
