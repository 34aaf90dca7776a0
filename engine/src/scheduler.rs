//! The `Scheduler` trait: the diffusion process, for training and sampling.
//!
//! Time runs in the scheduler's own units (`t` in [0, 1] for rectified flow,
//! 0..1000 for DDPM); [`Scheduler::model_time`] maps it to what the network's
//! timestep embedder sees.

use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::{TensorMut, TensorRef};
use crate::transfer::BackendExt;

/// A diffusion process.
pub trait Scheduler: Send + Sync {
    /// Registry kind, e.g. `rectified-flow`.
    fn kind(&self) -> &str;

    /// The full spec that rebuilds this scheduler.
    fn spec(&self) -> serde_json::Value;

    /// Draws a training timestep.
    fn draw_t(&self, rng: &mut dyn rand::RngCore) -> f32;

    /// The noisy sample at time `t`. x_t, x0, noise: same length.
    fn add_noise(&self, x_t: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()>;

    /// The regression target of the network at time `t` (velocity or epsilon).
    fn target(&self, target: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()>;

    /// The timestep value fed to the network's embedder for time `t`; an
    /// error for a time outside the process.
    fn model_time(&self, t: f32) -> Result<f32>;

    /// `steps + 1` times from pure noise to data for a sampling run; an error
    /// for `steps == 0` or more steps than the process has.
    fn sampling_times(&self, steps: usize) -> Result<Vec<f32>>;

    /// One sampling step from `t` to `t_next` given the network output at `t`
    /// (in place on `x`).
    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()>;

    /// [`Scheduler::step`] on tensors of `backend`. The default downloads `x`
    /// and `model_out`, steps on the host and uploads `x`; shipped schedulers
    /// override it with device ops giving the same bits.
    fn step_on(
        &self,
        backend: &dyn Backend,
        x: TensorMut<'_>,
        model_out: TensorRef<'_>,
        t: f32,
        t_next: f32,
    ) -> Result<()> {
        let mut host_x = backend.read_f32(x.as_ref())?;
        let out = backend.read_f32(model_out)?;
        self.step(&mut host_x, &out, t, t_next)?;
        backend.write_f32(x, &host_x)
    }
}
