//! Classifier-free guidance as upstream DiT's `forward_with_cfg`: the batch is
//! a conditional half then an unconditional half; the first half of `x` is run
//! under both conditions and `eps = uncond + s * (cond - uncond)` replaces the
//! guided channels of both halves (on the backend, with `axpby`).
//!
//! Upstream guides only the first 3 channels (a quirk, kept for checkpoint
//! parity); the standard form guides every input channel, leaving only the
//! learned-variance channels unguided.
//!
//! Routing (EC-DIT.md section 2): with `per_sample` groups the two halves
//! never share a group. A router that couples samples would let them, so
//! unless `share_routing_group` is set the halves run as two separate forwards.

use super::{Condition, Ffn, ForwardOptions, ForwardOutput, Model, ModelActs, ModelResult};
use ecdit_engine::{BackendExt, EngineError, TensorMut};

/// Which output channels guidance mixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CfgChannels {
    /// Channels 0..3, as upstream DiT's `forward_with_cfg`.
    UpstreamFirstThree,
    /// Every input channel (the standard form).
    #[default]
    All,
}

/// Options of [`Model::forward_with_cfg`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CfgOptions {
    /// Guidance scale s (1 = no guidance).
    pub scale: f32,
    /// Which channels are guided.
    pub channels: CfgChannels,
    /// Let the conditional and unconditional passes share routing groups
    /// (only matters for routers that couple samples). Default false.
    pub share_routing_group: bool,
}

impl Default for CfgOptions {
    fn default() -> Self {
        Self {
            scale: 4.0,
            channels: CfgChannels::All,
            share_routing_group: false,
        }
    }
}

impl Model {
    /// Guided prediction. x: [2N, C, H, W] (only the first N images are read);
    /// t: [2N]; cond: 2N conditions, the first N conditional, the last N
    /// unconditional (null class / empty prompt). out: [2N, C_out, H, W],
    /// both halves carry the guided channels. `opts` as [`Model::forward`].
    pub fn forward_with_cfg(
        &self,
        acts: &mut ModelActs,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
        cfg: CfgOptions,
        opts: ForwardOptions,
    ) -> ModelResult<ForwardOutput> {
        let c = self.config();
        let b = t.len();
        let err = |reason: String| -> ModelResult<ForwardOutput> { Err(EngineError::Other(reason).into()) };
        if b == 0 || !b.is_multiple_of(2) {
            return err(format!(
                "forward_with_cfg: batch {b} must be even and non-zero (conditional half + unconditional half)"
            ));
        }
        if !cfg.scale.is_finite() {
            return err(format!("forward_with_cfg: guidance scale {} is not finite", cfg.scale));
        }
        // Check every input's length before slicing any of them.
        let n = b / 2;
        let per_image = c.in_channels * c.input_size * c.input_size;
        ecdit_engine::error::check_len("forward_with_cfg", "x [2N, C, H, W]", x.len(), b * per_image)?;
        ecdit_engine::error::check_len("forward_with_cfg", "conditions [2N]", cond.batch(), b)?;
        let half = &x[..n * per_image];
        let be = self.backend();
        let out_ch = c.out_channels();
        let per_out = out_ch * c.input_size * c.input_size;

        let routing = if self.needs_separate_routing() && !cfg.share_routing_group {
            // Two forwards into one set of activations: the second would
            // overwrite what the first kept, so no backward could use them.
            if opts.keep {
                return err(
                    "forward_with_cfg: routing the two passes separately keeps no activations for a backward; \
                     run it without `keep`"
                        .to_string(),
                );
            }
            // Two forwards; each prediction is copied into `guided` on the backend.
            let (cond_half, uncond_half) = (cond.slice(0, n)?, cond.slice(n, n)?);
            acts.guided
                .ensure(be, &[b, out_ch, c.input_size, c.input_size], ecdit_engine::DType::F32)?;
            let mut routing = Vec::new();
            for (k, (ts, cd)) in [(&t[..n], cond_half), (&t[n..], uncond_half)].into_iter().enumerate() {
                let r = self.forward_on(acts, half, ts, cd, opts.keep, None)?;
                routing.extend(self.routing_stats(&r, opts.stats)?);
                let dst = acts.guided.view_mut()?.rows(k * n, n)?;
                be.copy(dst, acts.img.view()?)?;
            }
            std::mem::swap(&mut acts.guided, &mut acts.img);
            routing
        } else {
            let combined: Vec<f32> = half.iter().chain(half).copied().collect();
            let r = self.forward_on(acts, &combined, t, cond, opts.keep, None)?;
            self.routing_stats(&r, opts.stats)?
        };

        let guided = match cfg.channels {
            CfgChannels::UpstreamFirstThree => 3.min(out_ch),
            CfgChannels::All => c.in_channels.min(out_ch),
        };
        let run = guided * c.input_size * c.input_size;
        let img_len = b * per_out;
        let mut img = acts.img.view_mut()?.reshape(&[img_len])?;
        for i in 0..n {
            let at = |sample: usize| sample * per_out;
            let (cond_part, uncond_part) = img.reborrow().split_rows(at(n + i))?;
            let cond_run: TensorMut<'_> = cond_part.flat(at(i), run)?;
            let uncond_run: TensorMut<'_> = uncond_part.flat(0, run)?;
            // cond <- cond - uncond; uncond <- uncond + s * (cond - uncond); cond <- uncond.
            let (mut cond_run, mut uncond_run) = (cond_run, uncond_run);
            be.axpby(cond_run.reborrow(), -1.0, uncond_run.as_ref(), 1.0)?;
            be.axpby(uncond_run.reborrow(), cfg.scale, cond_run.as_ref(), 1.0)?;
            be.copy(cond_run, uncond_run.as_ref())?;
        }
        let out = be.read_f32(acts.img.view()?)?;
        Ok(ForwardOutput { out, routing })
    }

    /// Whether some MoE layer's router lets one sample's routing depend on
    /// the others of its batch.
    fn needs_separate_routing(&self) -> bool {
        self.blocks.iter().any(|b| match &b.ffn {
            Ffn::Moe(moe) => moe.layer.router.couples_samples(),
            Ffn::Dense(_) => false,
        })
    }
}
