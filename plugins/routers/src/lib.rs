//! # ecdit-routers
//!
//! Routers (expert choice, token choice, dense, expert race) and experts (GELU MLP, SwiGLU).
#![warn(missing_docs)]

pub mod experts;
pub mod routers;

use ecdit_engine::{Registry, Result};

/// Registers this crate's components into `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    routers::register(registry)?;
    experts::register(registry)?;
    Ok(())
}
