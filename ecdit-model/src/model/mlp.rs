//! The dense feed-forward: `fc2(GELU_tanh(fc1(x)))` (timm `Mlp` with DiT's
//! `approx_gelu`). Names `mlp.fc1` [h, d], `mlp.fc2` [d, h].

use super::buffer::resize;
use super::linear::Linear;
use super::param::{Param, Params};
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, EngineError, Result, Unary};

/// `blocks.{i}.mlp`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// `mlp.fc1`: [h, d].
    pub fc1: Linear,
    /// `mlp.fc2`: [d, h].
    pub fc2: Linear,
}

/// What the MLP computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MlpActs {
    /// [N, h] before GELU.
    pub pre: Vec<f32>,
    /// [N, h] after GELU.
    pub act: Vec<f32>,
}

impl Mlp {
    /// Xavier weights, zero biases.
    pub fn new(prefix: &str, d: usize, hidden: usize) -> Self {
        Self {
            fc1: Linear::xavier(&format!("{prefix}.fc1"), hidden, d),
            fc2: Linear::xavier(&format!("{prefix}.fc2"), d, hidden),
        }
    }

    /// Hidden width h.
    pub fn hidden(&self) -> usize {
        self.fc1.out_dim
    }

    /// out: [B*T, d]; acts: filled ([B*T, h] each); x: [B*T, d].
    pub fn forward(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        acts: &mut MlpActs,
        x: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        let rows = batch * tokens * self.hidden();
        resize(&mut acts.pre, rows);
        resize(&mut acts.act, rows);
        self.forward_chunks(backend, out, &mut acts.pre, &mut acts.act, x, batch, tokens)
    }

    /// The MLP on [`chunk_rows`] rows at a time, so the hidden activations of
    /// a chunk are still in cache for fc2, and an inference forward needs
    /// hidden buffers of one chunk only. Chunks hold whole samples: each
    /// sample's rows get the same products, so the same bits, whatever the batch.
    /// out: [B*T, d]; pre, act: [B*T, h] (kept for backward) or at least
    /// [chunk_rows, h] (reused by every chunk); x: [B*T, d].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_chunks(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        pre: &mut [f32],
        act: &mut [f32],
        x: &[f32],
        batch: usize,
        tokens: usize,
    ) -> Result<()> {
        const OP: &str = "Mlp::forward";
        let (d, h, rows) = (self.fc1.in_dim, self.hidden(), batch * tokens);
        check_len(OP, "x", x.len(), rows * d)?;
        check_len(OP, "out", out.len(), rows * d)?;
        let chunk = chunk_rows(batch, tokens);
        let keep = pre.len() >= rows * h && act.len() >= rows * h;
        if pre.len() < chunk * h || act.len() < chunk * h {
            return Err(EngineError::shape(
                format!("{OP} (hidden buffers)"),
                format!("at least {chunk} x {h} floats each"),
                format!("{} and {}", pre.len(), act.len()),
            ));
        }
        for r0 in (0..rows).step_by(chunk.max(1)) {
            let m = chunk.min(rows - r0);
            let at = if keep { r0 * h } else { 0 };
            let (pre, act) = (&mut pre[at..at + m * h], &mut act[at..at + m * h]);
            self.fc1.forward(backend, pre, &x[r0 * d..(r0 + m) * d], m)?;
            backend.unary(Unary::GeluTanh, act, pre)?;
            self.fc2.forward(backend, &mut out[r0 * d..(r0 + m) * d], act, m)?;
        }
        Ok(())
    }
}

/// Rows the MLP runs at a time (rounded to whole samples): bounds the hidden
/// buffers of an inference forward while keeping the products large.
const CHUNK_ROWS: usize = 512;

/// Rows per MLP chunk at `batch` samples of `tokens` rows: whole samples.
pub(crate) fn chunk_rows(batch: usize, tokens: usize) -> usize {
    tokens * (CHUNK_ROWS / tokens.max(1)).clamp(1, batch.max(1))
}

impl Params for Mlp {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.fc1.collect(out);
        self.fc2.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.fc1.collect_mut(out);
        self.fc2.collect_mut(out);
    }
}
