//! Rectified flow (EC-DIT.md section 4): the straight path between data and noise,
//! trained on the velocity and sampled with Euler steps.
//!
//! - path: `x_t = (1 - t) x0 + t noise`, `t` in [0, 1] (t = 0 data, t = 1 noise);
//! - target: the velocity `v = dx_t/dt = noise - x0`;
//! - training times: logit-normal, `t = sigmoid(logit_mean + logit_std * u)`, `u ~ N(0, 1)`;
//! - sampling: `t` from 1 to 0 in `steps` equal steps, each time optionally bent by the
//!   SD3 shift `t' = shift t / (1 + (shift - 1) t)` (shift > 1 spends more steps near noise);
//!   Euler step `x += (t_next - t) v` (on a backend: one `axpby`, the same bits).
//!
//! The network sees `t * time_scale`: DiT-style timestep embedders were built for
//! integer DDPM timesteps in 0..1000, so the default scale is 1000.

use crate::buffers::{check_float_views, check_number, check_same_len, check_steps};
use ecdit_engine::error::check_finite;
use ecdit_engine::spec::get;
use ecdit_engine::{Backend, EngineError, ParamInfo, ParamType, Result, Scheduler, TensorMut, TensorRef};
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Map, Value};

const COMPONENT: &str = "scheduler 'rectified-flow'";

/// Drawn times are kept this far inside (0, 1) so `logit(t)` stays finite in f32.
const T_MARGIN: f64 = 1.0 / (1u64 << 24) as f64;

/// Rectified flow with logit-normal training times and (shifted) Euler sampling.
#[derive(Clone, Debug, PartialEq)]
pub struct RectifiedFlow {
    logit_mean: f64,
    logit_std: f64,
    shift: f64,
    time_scale: f64,
}

impl Default for RectifiedFlow {
    fn default() -> Self {
        Self {
            logit_mean: 0.0,
            logit_std: 1.0,
            shift: 1.0,
            time_scale: 1000.0,
        }
    }
}

impl RectifiedFlow {
    /// Registry kind.
    pub const KIND: &'static str = "rectified-flow";
    /// One line for `ecdit components`.
    pub const DESCRIPTION: &'static str =
        "rectified flow: x_t = (1-t) x0 + t noise, velocity target, logit-normal t, Euler sampling";

    /// A rectified flow; errors name the first bad parameter.
    pub fn new(logit_mean: f64, logit_std: f64, shift: f64, time_scale: f64) -> Result<Self> {
        check_number(COMPONENT, "logit_mean", logit_mean, false)?;
        check_number(COMPONENT, "logit_std", logit_std, false)?;
        if logit_std < 0.0 {
            return Err(EngineError::param(COMPONENT, "logit_std", logit_std, "must be >= 0"));
        }
        check_number(COMPONENT, "shift", shift, true)?;
        check_number(COMPONENT, "time_scale", time_scale, true)?;
        Ok(Self {
            logit_mean,
            logit_std,
            shift,
            time_scale,
        })
    }

    /// Builds from checked registry parameters (defaults filled in).
    pub fn from_params(params: &Map<String, Value>) -> Result<Self> {
        Self::new(
            get(COMPONENT, params, "logit_mean")?,
            get(COMPONENT, params, "logit_std")?,
            get(COMPONENT, params, "shift")?,
            get(COMPONENT, params, "time_scale")?,
        )
    }

    /// The declared parameters.
    pub fn param_infos() -> Vec<ParamInfo> {
        vec![
            ParamInfo::new(
                "logit_mean",
                ParamType::Float,
                Some(json!(0.0)),
                "mean m of the training-time logit: t = sigmoid(m + s u), u ~ N(0, 1)",
            ),
            ParamInfo::new(
                "logit_std",
                ParamType::Float,
                Some(json!(1.0)),
                "standard deviation s (>= 0) of the training-time logit",
            ),
            ParamInfo::new(
                "shift",
                ParamType::Float,
                Some(json!(1.0)),
                "SD3 sampling-time shift t' = shift t / (1 + (shift-1) t), > 0; 1 = none",
            ),
            ParamInfo::new(
                "time_scale",
                ParamType::Float,
                Some(json!(1000.0)),
                "the network sees t * time_scale (DiT embedders expect 0..1000), > 0",
            ),
        ]
    }

    /// The SD3 timestep shift; maps [0, 1] onto itself, monotone, identity at shift 1.
    pub fn shift_time(&self, t: f64) -> f64 {
        self.shift * t / (1.0 + (self.shift - 1.0) * t)
    }
}

/// Errors unless `t` is a finite time in [0, 1].
fn check_time(op: &str, name: &str, t: f32) -> Result<()> {
    if t.is_finite() && (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(EngineError::Other(format!(
            "{COMPONENT} {op}: time {name} = {t} is outside [0, 1]"
        )))
    }
}

impl Scheduler for RectifiedFlow {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({
            "kind": Self::KIND,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "shift": self.shift,
            "time_scale": self.time_scale,
        })
    }

    fn draw_t(&self, rng: &mut dyn rand::RngCore) -> f32 {
        let u: f64 = StandardNormal.sample(rng);
        let t = 1.0 / (1.0 + (-(self.logit_mean + self.logit_std * u)).exp());
        t.clamp(T_MARGIN, 1.0 - T_MARGIN) as f32
    }

    // x_t, x0, noise: [n]
    fn add_noise(&self, x_t: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        check_same_len(
            "add_noise",
            &[("x_t", x_t.len()), ("x0", x0.len()), ("noise", noise.len())],
        )?;
        check_time("add_noise", "t", t)?;
        for ((x, &a), &n) in x_t.iter_mut().zip(x0).zip(noise) {
            *x = (1.0 - t) * a + t * n;
        }
        Ok(())
    }

    // target, x0, noise: [n]
    fn target(&self, target: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        check_same_len(
            "target",
            &[("target", target.len()), ("x0", x0.len()), ("noise", noise.len())],
        )?;
        check_time("target", "t", t)?;
        for ((v, &a), &n) in target.iter_mut().zip(x0).zip(noise) {
            *v = n - a;
        }
        Ok(())
    }

    fn model_time(&self, t: f32) -> Result<f32> {
        check_time("model_time", "t", t)?;
        Ok((t as f64 * self.time_scale) as f32)
    }

    /// `steps + 1` times, 1 (noise) first, 0 (data) last, strictly decreasing;
    /// `steps == 0` is an error.
    fn sampling_times(&self, steps: usize) -> Result<Vec<f32>> {
        check_steps(COMPONENT, steps, None)?;
        Ok((0..=steps)
            .map(|i| match i {
                // Pinned so rounding in the shift never moves the endpoints.
                0 => 1.0,
                i if i == steps => 0.0,
                i => self.shift_time((steps - i) as f64 / steps as f64) as f32,
            })
            .collect())
    }

    // x, model_out (velocity): [n]
    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()> {
        check_same_len("step", &[("x", x.len()), ("model_out", model_out.len())])?;
        check_time("step", "t", t)?;
        check_time("step", "t_next", t_next)?;
        check_finite("rectified-flow step: model_out (velocity)", model_out)?;
        let dt = t_next - t;
        // `dt * v + x`: the f32 arithmetic of `axpby(x, dt, v, 1)` in `step_on`.
        for (x, &v) in x.iter_mut().zip(model_out) {
            *x += dt * v;
        }
        Ok(())
    }

    /// [`Scheduler::step`] as one `axpby` on the backend (the same bits on f32
    /// tensors). The velocity is not scanned for NaN here: that would be a
    /// download per step.
    fn step_on(
        &self,
        backend: &dyn Backend,
        x: TensorMut<'_>,
        model_out: TensorRef<'_>,
        t: f32,
        t_next: f32,
    ) -> Result<()> {
        check_float_views("step_on", &x, &model_out, "model_out (velocity)")?;
        check_time("step_on", "t", t)?;
        check_time("step_on", "t_next", t_next)?;
        backend.axpby(x, t_next - t, model_out, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_keeps_endpoints_and_moves_midpoint_towards_noise() {
        let flow = RectifiedFlow::new(0.0, 1.0, 3.0, 1000.0).unwrap();
        assert_eq!(flow.shift_time(0.0), 0.0);
        assert_eq!(flow.shift_time(1.0), 1.0);
        // 3 * 0.5 / (1 + 2 * 0.5) = 0.75
        assert!((flow.shift_time(0.5) - 0.75).abs() < 1e-12);
        let times = flow.sampling_times(2).unwrap();
        assert_eq!(times, vec![1.0, 0.75, 0.0]);
    }

    #[test]
    fn bad_parameters_name_field_and_value() {
        let e = RectifiedFlow::new(0.0, 1.0, 0.0, 1000.0).unwrap_err().to_string();
        assert!(e.contains("'shift'") && e.contains("= 0") && e.contains("> 0"), "{e}");
        let e = RectifiedFlow::new(0.0, -1.0, 1.0, 1000.0).unwrap_err().to_string();
        assert!(e.contains("'logit_std'") && e.contains("-1"), "{e}");
        let e = RectifiedFlow::new(f64::NAN, 1.0, 1.0, 1000.0).unwrap_err().to_string();
        assert!(
            e.contains("'logit_mean'") && e.contains("NaN") && e.contains("finite"),
            "{e}"
        );
        let e = RectifiedFlow::new(0.0, 1.0, 1.0, f64::INFINITY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'time_scale'") && e.contains("inf"), "{e}");
    }

    #[test]
    fn length_time_and_nan_errors() {
        let flow = RectifiedFlow::default();
        let mut x = vec![0.0; 3];
        let e = flow
            .add_noise(&mut x, &[0.0; 3], &[0.0; 2], 0.5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("noise") && e.contains("3 elements") && e.contains("2 elements"),
            "{e}"
        );
        let e = flow
            .add_noise(&mut x, &[0.0; 3], &[0.0; 3], 1.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t = 1.5"), "{e}");
        let e = flow
            .step(&mut x, &[0.0, f32::NAN, 0.0], 1.0, 0.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_out") && e.contains("index 1"), "{e}");
        let e = flow.target(&mut x, &[0.0; 4], &[0.0; 3], 0.5).unwrap_err().to_string();
        assert!(e.contains("x0") && e.contains("4 elements"), "{e}");
    }

    #[test]
    fn model_time_scales_and_target_is_velocity() {
        let flow = RectifiedFlow::default();
        assert_eq!(flow.model_time(0.25).unwrap(), 250.0);
        let mut v = vec![0.0; 2];
        flow.target(&mut v, &[1.0, -2.0], &[0.5, 3.0], 0.3).unwrap();
        assert_eq!(v, vec![-0.5, 5.0]);
    }

    #[test]
    fn times_outside_the_process_and_zero_steps_are_errors() {
        let flow = RectifiedFlow::default();
        for t in [-0.5f32, 1.5, f32::NAN, f32::INFINITY] {
            let e = flow.model_time(t).unwrap_err().to_string();
            assert!(e.contains("model_time") && e.contains(&format!("t = {t}")), "{e}");
        }
        assert_eq!(flow.model_time(1.0).unwrap(), 1000.0);
        let e = flow.sampling_times(0).unwrap_err().to_string();
        assert!(e.contains("rectified-flow") && e.contains("steps = 0"), "{e}");
    }
}
