//! Argument checks shared by both schedulers.

use ecdit_engine::error::check_len;
use ecdit_engine::{EngineError, Result, TensorMut, TensorRef};

/// Checks that every `(name, len)` has the length of the first one.
pub(crate) fn check_same_len(op: &str, buffers: &[(&str, usize)]) -> Result<()> {
    if let Some(&(_, expected)) = buffers.first() {
        for &(what, len) in &buffers[1..] {
            check_len(op, what, len, expected)?;
        }
    }
    Ok(())
}

/// The tensors of a `step_on`: float views of one element count, named in errors.
pub(crate) fn check_float_views(op: &str, x: &TensorMut<'_>, model_out: &TensorRef<'_>, what: &str) -> Result<()> {
    check_same_len(op, &[("x", x.numel()), (what, model_out.numel())])?;
    for (name, dtype) in [("x", x.dtype()), (what, model_out.dtype())] {
        if !dtype.is_float() {
            return Err(EngineError::shape(format!("{op} ({name} dtype)"), "f32 or bf16", dtype));
        }
    }
    Ok(())
}

/// A sampling run needs at least one step, and at most `max` when the process
/// has that many distinct times.
pub(crate) fn check_steps(component: &str, steps: usize, max: Option<usize>) -> Result<()> {
    if steps == 0 {
        return Err(EngineError::Other(format!(
            "{component} sampling_times: steps = 0; a sampling run needs at least 1 step"
        )));
    }
    if let Some(max) = max.filter(|&m| steps > m) {
        return Err(EngineError::Other(format!(
            "{component} sampling_times: steps = {steps} exceeds the {max} timesteps of the process"
        )));
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
