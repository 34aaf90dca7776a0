//! Grouped-query attention on the kernels of `kernels/attention.cu`: a fused
//! inference kernel that keeps no probabilities (one warp per query row,
//! online softmax), and the training pair (probabilities, then their product
//! with the values) with its backward from the cached probabilities.

use crate::backend::CudaBackend;
use crate::device::{dev_ptr, numel, ten, DevTen};
use cudarc::driver::{DevicePtr, DeviceRepr, PushKernelArg};
use ecdit_engine::error::check_len;
use ecdit_engine::{AttnDims, DType, EngineError, Result, TensorMut, TensorRef};

/// Head dims the fused inference kernel takes (`32 * ATTN_LANE_CHANNELS`);
/// beyond, inference runs the training pair over scratch probabilities.
pub const FUSED_MAX_HEAD_DIM: usize = 256;

/// The kernels' `AttnDims` struct (six 64-bit sizes, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct DevAttnDims {
    batch: u64,
    heads: u64,
    kv_heads: u64,
    q_len: u64,
    kv_len: u64,
    head_dim: u64,
}

// SAFETY: plain `repr(C)` integers, the layout of the CUDA struct.
unsafe impl DeviceRepr for DevAttnDims {}

impl From<AttnDims> for DevAttnDims {
    fn from(d: AttnDims) -> Self {
        Self {
            batch: d.batch as u64,
            heads: d.heads as u64,
            kv_heads: d.kv_heads as u64,
            q_len: d.q_len as u64,
            kv_len: d.kv_len as u64,
            head_dim: d.head_dim as u64,
        }
    }
}

/// Element counts of one call: (q-shaped, kv-shaped, probs, mask).
fn lens(op: &str, d: &AttnDims) -> Result<(usize, usize, usize, usize)> {
    if d.kv_heads == 0 && d.heads > 0 || d.kv_heads > 0 && !d.heads.is_multiple_of(d.kv_heads) {
        return Err(EngineError::shape(
            op,
            format!("kv_heads dividing heads = {}", d.heads),
            format!("kv_heads = {}", d.kv_heads),
        ));
    }
    Ok((
        numel(op, &[d.batch, d.q_len, d.heads, d.head_dim])?,
        numel(op, &[d.batch, d.kv_len, d.kv_heads, d.head_dim])?,
        numel(op, &[d.batch, d.heads, d.q_len, d.kv_len])?,
        numel(op, &[d.batch, d.kv_len])?,
    ))
}

/// Softmax scale `1 / sqrt(Dh)` (the CPU backend's).
fn scale(d: &AttnDims) -> f32 {
    1.0 / (d.head_dim.max(1) as f32).sqrt()
}

/// Threads of a warp-per-query-row kernel.
fn warps(d: &AttnDims) -> usize {
    (d.batch * d.heads * d.q_len).saturating_mul(32)
}

impl CudaBackend {
    /// `out = softmax(scale q k^T + mask) v`, probabilities kept when `probs` is given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_impl(
        &self,
        mut out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        d: AttnDims,
    ) -> Result<()> {
        let op = "attention";
        let (nq, nkv, np, nm) = lens(op, &d)?;
        check_len(op, "out", out.numel(), nq)?;
        check_len(op, "q", q.numel(), nq)?;
        check_len(op, "k", k.numel(), nkv)?;
        check_len(op, "v", v.numel(), nkv)?;
        if let Some(p) = &probs {
            check_len(op, "probs", p.numel(), np)?;
        }
        if let Some(m) = key_mask {
            check_len(op, "key_mask", m.numel(), nm)?;
        }
        let (o, qp, kp, vp) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "q", q)?,
            ten(op, "k", k)?,
            ten(op, "v", v)?,
        );
        let pp = match &probs {
            Some(p) => Some(ten(op, "probs", p.as_ref())?),
            None => None,
        };
        let (mp, has_mask) = match key_mask {
            Some(m) => (dev_ptr(op, "key_mask", m, DType::U8)?, 1i32),
            None => (0u64, 0i32),
        };
        if np == 0 {
            // No queries or no keys: nothing to attend to.
            return self.fill_impl(out.reborrow(), 0.0);
        }
        let (dd, sc) = (DevAttnDims::from(d), scale(&d));
        self.run(op, || {
            if pp.is_none() && d.head_dim <= FUSED_MAX_HEAD_DIM {
                let mut args = self.stream().launch_builder(&self.kernels().attention_infer);
                args.arg(&o)
                    .arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&mp)
                    .arg(&has_mask)
                    .arg(&dd)
                    .arg(&sc);
                return self.launch(op, warps(&d), args);
            }
            // Probabilities into the caller's tensor, or into f32 scratch.
            let (pt, _scratch) = match pp {
                Some(p) => (p, None),
                None => {
                    let s = self.scratch_f32(op, np)?;
                    let ptr = s.device_ptr(self.stream()).0;
                    (DevTen::f32(ptr), Some(s))
                }
            };
            let mut args = self.stream().launch_builder(&self.kernels().attention_probs);
            args.arg(&pt)
                .arg(&qp)
                .arg(&kp)
                .arg(&mp)
                .arg(&has_mask)
                .arg(&dd)
                .arg(&sc);
            self.launch(op, warps(&d), args)?;
            let mut args = self.stream().launch_builder(&self.kernels().attention_apply);
            args.arg(&o).arg(&pt).arg(&vp).arg(&dd);
            self.launch(op, nq, args)
        })
    }

    /// Backward from the cached probabilities; overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward_impl(
        &self,
        mut dq: TensorMut<'_>,
        mut dk: TensorMut<'_>,
        mut dv: TensorMut<'_>,
        dout: TensorRef<'_>,
        probs: TensorRef<'_>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        d: AttnDims,
    ) -> Result<()> {
        let op = "attention_backward";
        let (nq, nkv, np, _) = lens(op, &d)?;
        check_len(op, "dq", dq.numel(), nq)?;
        check_len(op, "dk", dk.numel(), nkv)?;
        check_len(op, "dv", dv.numel(), nkv)?;
        check_len(op, "dout", dout.numel(), nq)?;
        check_len(op, "probs", probs.numel(), np)?;
        check_len(op, "q", q.numel(), nq)?;
        check_len(op, "k", k.numel(), nkv)?;
        check_len(op, "v", v.numel(), nkv)?;
        let (dqp, dkp, dvp) = (
            ten(op, "dq", dq.as_ref())?,
            ten(op, "dk", dk.as_ref())?,
            ten(op, "dv", dv.as_ref())?,
        );
        let (gp, pp, qp, kp, vp) = (
            ten(op, "dout", dout)?,
            ten(op, "probs", probs)?,
            ten(op, "q", q)?,
            ten(op, "k", k)?,
            ten(op, "v", v)?,
        );
        if np == 0 {
            self.fill_impl(dq.reborrow(), 0.0)?;
            self.fill_impl(dk.reborrow(), 0.0)?;
            return self.fill_impl(dv.reborrow(), 0.0);
        }
        let (dd, sc) = (DevAttnDims::from(d), scale(&d));
        let rows = d.batch * d.heads * d.q_len;
        self.run(op, || {
            // The score gradients ds [B, H, Tq, Tk] in f32 scratch.
            let ds = self.scratch_f32(op, np)?;
            let dsp = ds.device_ptr(self.stream()).0;
            let mut args = self.stream().launch_builder(&self.kernels().attention_backward_ds);
            args.arg(&dsp).arg(&gp).arg(&pp).arg(&vp).arg(&dd).arg(&sc);
            self.launch(op, rows, args)?;
            let mut args = self.stream().launch_builder(&self.kernels().attention_backward_dq);
            args.arg(&dqp).arg(&dsp).arg(&kp).arg(&dd);
            self.launch(op, nq, args)?;
            let mut args = self.stream().launch_builder(&self.kernels().attention_backward_dkv);
            args.arg(&dkp).arg(&dvp).arg(&dsp).arg(&gp).arg(&pp).arg(&qp).arg(&dd);
            self.launch(op, nkv, args)
        })
    }
}
