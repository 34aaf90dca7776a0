//! Embedding ops: patchify, unpatchify, timestep features.

use crate::backend::CudaBackend;
use crate::device::{numel, ten};
use cudarc::driver::PushKernelArg;
use ecdit_engine::error::check_len;
use ecdit_engine::{EngineError, PatchDims, Result, TensorMut, TensorRef};

/// Checks the patch size; returns the element count (images and patch rows alike).
fn check_patch(op: &str, d: &PatchDims) -> Result<usize> {
    if d.patch == 0 || !d.height.is_multiple_of(d.patch) || !d.width.is_multiple_of(d.patch) {
        return Err(EngineError::shape(
            format!("{op} (patch)"),
            format!("a patch size dividing height {} and width {}", d.height, d.width),
            d.patch,
        ));
    }
    numel(op, &[d.batch, d.channels, d.height, d.width])
}

impl CudaBackend {
    /// Images to patch rows (`forward`) or back, in the row order `d` names.
    pub(crate) fn patch_impl(&self, forward: bool, out: TensorMut<'_>, inp: TensorRef<'_>, d: PatchDims) -> Result<()> {
        let op = if forward { "patchify" } else { "unpatchify" };
        let len = check_patch(op, &d)?;
        check_len(op, "out", out.numel(), len)?;
        check_len(op, "inp", inp.numel(), len)?;
        let (o, i) = (ten(op, "out", out.as_ref())?, ten(op, "inp", inp)?);
        let (b, c, h, w, p, cf) = (
            d.batch as u64,
            d.channels as u64,
            d.height as u64,
            d.width as u64,
            d.patch as u64,
            d.channels_fastest as i32,
        );
        self.run(op, || {
            let kernel = if forward {
                &self.kernels().patchify
            } else {
                &self.kernels().unpatchify
            };
            let mut args = self.stream().launch_builder(kernel);
            args.arg(&o).arg(&i).arg(&b).arg(&c).arg(&h).arg(&w).arg(&p).arg(&cf);
            self.launch(op, len, args)
        })
    }

    /// DiT's sinusoidal timestep features, all on the device: the
    /// frequencies with the host's exact `exp` (the CPU backend's bits), cos
    /// and sin in double rounded once (so within an ulp of the host's).
    pub(crate) fn timestep_features_impl(
        &self,
        out: TensorMut<'_>,
        t: TensorRef<'_>,
        dim: usize,
        max_period: f32,
    ) -> Result<()> {
        let op = "timestep_features";
        check_len(op, "out", out.numel(), numel(op, &[t.numel(), dim])?)?;
        if !(max_period.is_finite() && max_period > 0.0) {
            return Err(EngineError::param(
                op,
                "max_period",
                max_period,
                "must be a positive finite number",
            ));
        }
        let (o, tp) = (ten(op, "out", out.as_ref())?, ten(op, "t", t)?);
        if out.numel() == 0 {
            return Ok(());
        }
        let half = dim / 2;
        // The CPU backend's scale, computed the same way on the host.
        let scale = -((max_period as f64).ln()) as f32;
        let (batch, dim64, half64) = (t.numel() as u64, dim as u64, half as u64);
        let fma = crate::exact::host_uses_fma() as i32;
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().timestep_features);
            args.arg(&o)
                .arg(&tp)
                .arg(&batch)
                .arg(&dim64)
                .arg(&half64)
                .arg(&scale)
                .arg(&fma);
            self.launch(op, out.numel(), args)
        })
    }
}
