//! Embedding ops: patchify, unpatchify, timestep features.

use crate::backend::CudaBackend;
use crate::device::{f32_ptr, numel};
use crate::probe::cuda_error;
use cudarc::driver::DevicePtr;
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
        let (o, i) = (f32_ptr(op, "out", out.as_ref())?, f32_ptr(op, "inp", inp)?);
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

    /// DiT's sinusoidal timestep features. The frequencies are computed on the
    /// host exactly as the CPU backend does and uploaded (`dim / 2` floats);
    /// the device's `cosf`/`sinf` may differ from the host's in the last bits.
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
        let (o, tp) = (f32_ptr(op, "out", out.as_ref())?, f32_ptr(op, "t", t)?);
        if out.numel() == 0 {
            return Ok(());
        }
        let half = dim / 2;
        let scale = -((max_period as f64).ln()) as f32;
        // At least one element: CUDA allocates no zero-sized memory.
        let mut freqs: Vec<f32> = (0..half).map(|i| (scale * i as f32 / half as f32).exp()).collect();
        if freqs.is_empty() {
            freqs.push(0.0);
        }
        let (batch, dim64, half64) = (t.numel() as u64, dim as u64, half as u64);
        self.run(op, || {
            let dev = self
                .stream()
                .clone_htod(&freqs)
                .map_err(|e| cuda_error(format!("{op}: uploading the frequencies: {e}")))?;
            let (f, _record) = dev.device_ptr(self.stream());
            let mut args = self.stream().launch_builder(&self.kernels().timestep_features);
            args.arg(&o).arg(&tp).arg(&f).arg(&batch).arg(&dim64).arg(&half64);
            self.launch(op, out.numel(), args)
        })
    }
}
