//! Experts: the feed-forward networks a MoE layer's router dispatches tokens to.
//!
//! Every expert kind computes all E experts of a layer in one call over the
//! expert-major rows of a dispatch (rows of expert e are
//! `offsets[e]..offsets[e + 1]`), one GEMM per expert and projection, so an
//! expert with no rows costs nothing. Parameters of the E experts are stacked
//! on a leading expert axis, each matrix in the PyTorch `Linear` layout
//! `[out, in]`.

mod gelu_mlp;
mod swiglu;

pub use gelu_mlp::GeluMlp;
pub use swiglu::SwiGlu;

use ecdit_engine::error::check_len;
use ecdit_engine::{ComponentInfo, EngineError, Family, ParamInfo, ParamType, Registry, Result};
use serde_json::json;
use std::sync::Arc;

/// Registers the `gelu-mlp` and `swiglu` experts.
pub fn register(registry: &mut Registry) -> Result<()> {
    let ratio = || {
        ParamInfo::new(
            "mlp_ratio",
            ParamType::Float,
            Some(json!(4.0)),
            "hidden width = floor(mlp_ratio * d)",
        )
    };
    registry.register_expert(
        ComponentInfo {
            family: Family::Expert,
            kind: GeluMlp::KIND.into(),
            description: "DiT's MLP: Linear(d, h) -> GELU (tanh) -> Linear(h, d), with biases".into(),
            params: vec![ratio()],
            origin: "builtin".into(),
        },
        Arc::new(|p| Ok(Box::new(GeluMlp::new(read_ratio(GeluMlp::KIND, p)?)?) as _)),
    )?;
    registry.register_expert(
        ComponentInfo {
            family: Family::Expert,
            kind: SwiGlu::KIND.into(),
            description: "DiT-MoE's SwiGLU: w2(silu(w1 x) * w3 x), no biases, h = mlp_ratio * d".into(),
            params: vec![ratio()],
            origin: "builtin".into(),
        },
        Arc::new(|p| Ok(Box::new(SwiGlu::new(read_ratio(SwiGlu::KIND, p)?)?) as _)),
    )?;
    Ok(())
}

fn read_ratio(kind: &str, params: &serde_json::Map<String, serde_json::Value>) -> Result<f64> {
    ecdit_engine::spec::get(&format!("expert '{kind}'"), params, "mlp_ratio")
}

/// Checks an MLP ratio: finite and positive.
fn check_ratio(kind: &str, mlp_ratio: f64) -> Result<()> {
    if mlp_ratio.is_finite() && mlp_ratio > 0.0 {
        Ok(())
    } else {
        Err(EngineError::param(
            format!("expert '{kind}'"),
            "mlp_ratio",
            mlp_ratio,
            "must be a finite number > 0",
        ))
    }
}

/// Hidden width `floor(mlp_ratio * d)`, at least 1 (DiT: `int(hidden_size * mlp_ratio)`).
fn hidden_width(mlp_ratio: f64, d: usize) -> usize {
    ((mlp_ratio * d as f64) as usize).max(1)
}

/// Checks the inputs every expert forward/backward shares and returns the
/// number of experts E and the number of dispatched rows N.
/// x: [N, d]; offsets: [E + 1], monotone from 0; params: as `shapes`.
fn check_dispatch(
    op: &str,
    x: &[f32],
    params: &[&[f32]],
    shapes: &[Vec<usize>],
    offsets: &[usize],
    d: usize,
) -> Result<(usize, usize)> {
    if offsets.len() < 2 || offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(EngineError::shape(
            format!("{op} (offsets)"),
            "E + 1 >= 2 monotone offsets starting at 0",
            format!("{offsets:?}"),
        ));
    }
    let experts = offsets.len() - 1;
    let rows = offsets[experts];
    check_len(op, "x", x.len(), rows * d)?;
    if params.len() != shapes.len() {
        return Err(EngineError::shape(
            format!("{op} (params)"),
            format!("{} tensors", shapes.len()),
            format!("{} tensors", params.len()),
        ));
    }
    for (i, (p, s)) in params.iter().zip(shapes).enumerate() {
        check_len(op, &format!("params[{i}] {s:?}"), p.len(), s.iter().product())?;
    }
    Ok((experts, rows))
}

/// Makes `buf` exactly `len` long, reusing its allocation (forward caches are
/// refilled every step; reallocating them costs page faults).
fn reuse(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..]
}

/// Rows per forward block: large enough that each GEMM runs near full speed,
/// small enough that a block's hidden activations (512 x 4d floats) stay in
/// cache between the first projection, the activation and the second.
const ROW_BLOCK: usize = 512;

/// `[r0, r1)` split into consecutive blocks of at most [`ROW_BLOCK`] rows.
fn row_blocks(r0: usize, r1: usize) -> impl Iterator<Item = (usize, usize)> {
    (r0..r1).step_by(ROW_BLOCK).map(move |b| (b, (b + ROW_BLOCK).min(r1)))
}
