//! The dense feed-forward: `fc2(GELU_tanh(fc1(x)))` (timm `Mlp` with DiT's
//! `approx_gelu`). Names `mlp.fc1` [h, d], `mlp.fc2` [d, h].

use super::act::Act;
use super::grads::Grads;
use super::linear::Linear;
use ecdit_engine::{Backend, DType, Param, Params, Result, TensorMut, TensorRef, Unary};

/// `blocks.{i}.mlp`.
#[derive(Debug)]
pub struct Mlp {
    /// `mlp.fc1`: [h, d].
    pub fc1: Linear,
    /// `mlp.fc2`: [d, h].
    pub fc2: Linear,
}

/// What the MLP computes: [B*T, h] each when kept for backward, one chunk
/// of rows (reused by every chunk) at inference.
#[derive(Debug, Default)]
pub struct MlpActs {
    /// Before GELU.
    pub pre: Act,
    /// After GELU.
    pub act: Act,
}

impl MlpActs {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.pre.bytes() + self.act.bytes()
    }
}

impl Mlp {
    /// Xavier weights, zero biases.
    pub fn new(backend: &dyn Backend, prefix: &str, d: usize, hidden: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            fc1: Linear::xavier(backend, &format!("{prefix}.fc1"), hidden, d, dtype)?,
            fc2: Linear::xavier(backend, &format!("{prefix}.fc2"), d, hidden, dtype)?,
        })
    }

    /// Hidden width h.
    pub fn hidden(&self) -> usize {
        self.fc1.out_dim
    }

    /// The MLP on [`chunk_rows`] rows at a time, so the hidden activations of
    /// a chunk are still in cache for fc2, and an inference forward needs
    /// hidden buffers of one chunk only. Chunks hold whole samples, and the
    /// chunk grows with the batch (up to [`chunk_rows`]), so a sample's bits do
    /// not depend on the batch only because the backend's GEMM gives each row
    /// the same bits whatever the row count (the CPU backend keeps products of
    /// at least 64 rows on one kernel path for this; see its `ops/gemm.rs`).
    /// out: [B*T, d]; acts: [B*T, h] each when `keep`, else one chunk; x: [B*T, d].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        backend: &dyn Backend,
        mut out: TensorMut<'_>,
        acts: &mut MlpActs,
        keep: bool,
        x: TensorRef<'_>,
        batch: usize,
        tokens: usize,
        dtype: DType,
    ) -> Result<()> {
        let (d, h, rows) = (self.fc1.in_dim, self.hidden(), batch * tokens);
        let chunk = chunk_rows(batch, tokens).max(1);
        let held = if keep { rows } else { chunk.min(rows) };
        if keep {
            acts.pre.ensure(backend, &[held, h], dtype)?;
        }
        acts.act.ensure(backend, &[held, h], dtype)?;
        let x = x.reshape(&[rows, d])?;
        for r0 in (0..rows).step_by(chunk) {
            let m = chunk.min(rows - r0);
            let at = if keep { r0 } else { 0 };
            let act = acts.act.view_mut()?.rows(at, m)?;
            if keep {
                // The backward needs the pre-activation.
                let pre = acts.pre.view_mut()?.rows(at, m)?;
                self.fc1.forward(backend, pre, x.rows(r0, m)?, m)?;
                backend.unary(Unary::GeluTanh, act, acts.pre.view()?.rows(at, m)?)?;
            } else {
                self.fc1.forward_act(backend, act, x.rows(r0, m)?, m, Unary::GeluTanh)?;
            }
            let o = out.reborrow().reshape(&[rows, d])?.rows(r0, m)?;
            self.fc2.forward(backend, o, acts.act.view()?.rows(at, m)?, m)?;
        }
        Ok(())
    }
}

impl Mlp {
    /// Backward of [`Mlp::forward`] (kept): parameter gradients accumulate
    /// into `grads`; dx [B*T, d] is overwritten with the input gradient.
    /// scratch: [B*T, h] hidden gradients, reused; dout, x: [B*T, d].
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        grads: &mut Grads,
        scratch: &mut MlpActs,
        dx: TensorMut<'_>,
        dout: TensorRef<'_>,
        x: TensorRef<'_>,
        acts: &MlpActs,
        rows: usize,
    ) -> Result<()> {
        let (d, h) = (self.fc1.in_dim, self.hidden());
        let dtype = dout.dtype();
        scratch.act.ensure(backend, &[rows, h], dtype)?;
        scratch.pre.ensure(backend, &[rows, h], dtype)?;
        let (dout, x) = (dout.reshape(&[rows, d])?, x.reshape(&[rows, d])?);
        let (pre, act) = (acts.pre.view()?, acts.act.view()?);
        pre.expect_len("Mlp::backward", "kept hidden activations", rows * h)?;
        // out = fc2(act)
        self.fc2
            .backward(backend, grads, Some(scratch.act.view_mut()?), false, dout, act, rows)?;
        // act = GELU(pre)
        backend.unary_backward(Unary::GeluTanh, scratch.pre.view_mut()?, scratch.act.view()?, pre)?;
        // pre = fc1(x)
        let dx = dx.reshape(&[rows, d])?;
        self.fc1
            .backward(backend, grads, Some(dx), false, scratch.pre.view()?, x, rows)
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
