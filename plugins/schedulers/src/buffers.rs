//! Argument checks shared by both schedulers.

use ecdit_engine::error::check_len;
use ecdit_engine::{EngineError, Result};

/// Checks that every `(name, len)` has the length of the first one.
pub(crate) fn check_same_len(op: &str, buffers: &[(&str, usize)]) -> Result<()> {
    if let Some(&(_, expected)) = buffers.first() {
        for &(what, len) in &buffers[1..] {
            check_len(op, what, len, expected)?;
        }
    }
    Ok(())
}

/// A scheduler parameter that must be finite (and, when `positive`, > 0).
pub(crate) fn check_number(component: &str, field: &str, value: f64, positive: bool) -> Result<()> {
    if !value.is_finite() {
        return Err(EngineError::param(component, field, value, "must be finite"));
    }
    if positive && value <= 0.0 {
        return Err(EngineError::param(component, field, value, "must be > 0"));
    }
    Ok(())
}
