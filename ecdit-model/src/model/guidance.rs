//! Classifier-free guidance as upstream DiT's `forward_with_cfg`: the batch is
//! a conditional half then an unconditional half; the first half of `x` is run
//! under both conditions and `eps = uncond + s * (cond - uncond)` replaces the
//! guided channels of both halves.
//!
//! Upstream guides only the first 3 channels (a quirk, kept for checkpoint
//! parity); the standard form guides every input channel, leaving only the
//! learned-variance channels unguided.
//!
//! Routing (EC-DIT.md section 2): with `per_sample` groups the two halves
//! never share a group. With `tokens`/`batch` groups they would, so unless
//! `share_routing_group` is set the halves run as two separate forwards.

use super::{Condition, Ffn, ForwardOutput, Model, ModelResult};
use ecdit_engine::EngineError;

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
    /// (only matters for `tokens`/`batch` groups). Default false.
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
    /// both halves carry the guided channels.
    pub fn forward_with_cfg(
        &self,
        x: &[f32],
        t: &[f32],
        cond: Condition<'_>,
        opts: CfgOptions,
    ) -> ModelResult<ForwardOutput> {
        let c = self.config();
        let b = t.len();
        if b == 0 || !b.is_multiple_of(2) {
            return Err(EngineError::Other(format!(
                "forward_with_cfg: batch {b} must be even and non-zero (conditional half + unconditional half)"
            ))
            .into());
        }
        if !opts.scale.is_finite() {
            return Err(
                EngineError::Other(format!("forward_with_cfg: guidance scale {} is not finite", opts.scale)).into(),
            );
        }
        let n = b / 2;
        let per_image = c.in_channels * c.input_size * c.input_size;
        ecdit_engine::error::check_len("forward_with_cfg", "x [2N, C, H, W]", x.len(), b * per_image)?;
        let half = &x[..n * per_image];
        let mut result = if self.needs_separate_routing() && !opts.share_routing_group {
            let cond_pass = self.forward(half, &t[..n], cond.slice(0, n))?;
            let uncond_pass = self.forward(half, &t[n..], cond.slice(n, n))?;
            let mut out = cond_pass.out;
            out.extend_from_slice(&uncond_pass.out);
            let mut routing = cond_pass.routing;
            routing.extend(uncond_pass.routing);
            ForwardOutput { out, routing }
        } else {
            let combined: Vec<f32> = half.iter().chain(half).copied().collect();
            self.forward(&combined, t, cond)?
        };
        let out_ch = c.out_channels();
        let guided = match opts.channels {
            CfgChannels::UpstreamFirstThree => 3.min(out_ch),
            CfgChannels::All => c.in_channels.min(out_ch),
        };
        let plane = c.input_size * c.input_size;
        let s = opts.scale;
        for i in 0..n {
            for ch in 0..guided {
                let cond_at = (i * out_ch + ch) * plane;
                let uncond_at = ((n + i) * out_ch + ch) * plane;
                for k in 0..plane {
                    let (ce, ue) = (result.out[cond_at + k], result.out[uncond_at + k]);
                    let g = ue + s * (ce - ue);
                    result.out[cond_at + k] = g;
                    result.out[uncond_at + k] = g;
                }
            }
        }
        Ok(result)
    }

    /// Whether some MoE layer routes in groups that span samples.
    fn needs_separate_routing(&self) -> bool {
        self.blocks.iter().any(|b| match &b.ffn {
            Ffn::Moe(moe) => moe.layer.router.spec().get("groups").and_then(|g| g.as_str()) != Some("per_sample"),
            Ffn::Dense(_) => false,
        })
    }
}
