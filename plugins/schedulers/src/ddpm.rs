//! DDPM (Ho et al. 2020) as the upstream DiT trains it, sampled with DDIM (eta = 0).
//!
//! - betas: `train_steps` values linearly from `beta_start` to `beta_end` (numpy
//!   `linspace`), `alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`, computed in f64;
//! - training: integer `t` uniform in `0..train_steps`,
//!   `x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`, target = the noise (epsilon prediction);
//! - sampling (DDIM, deterministic): from `t` to `t_next`,
//!   `x0_pred = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t)`,
//!   `x = sqrt(ab_next) x0_pred + sqrt(1 - ab_next) eps`; a `t_next < 0` is the final step
//!   to data (`ab_next = 1`, so `x = x0_pred`). The step is linear in `x` and `eps`, so it
//!   runs as `x = c_x x + c_eps eps` with the two coefficients computed once in f64
//!   ([`Ddpm::ddim_coefficients`]) and the per-element arithmetic in f32: the host
//!   [`Scheduler::step`] and the backend [`Scheduler::step_on`] (one `axpby`) give the
//!   same bits.
//!
//! Learned sigma: DiT predicts `[eps, sigma]` as `2C` channels per sample. The split is
//! the caller's job (it knows the `[B, 2C, H, W]` layout, so it can hand over the first
//! `C` channels of each sample); [`Scheduler::step`] takes the epsilon part only, the same
//! length as `x`, and so does [`Scheduler::step_on`]: its `model_out` is the view of the
//! epsilon channels the caller passes (for one sample, `out.rows(b, 1)` of `[B, 2C, H, W]`
//! narrowed to its first `C H W` elements; a batch's epsilon halves are not contiguous,
//! so step per sample or copy them into one `[B, C, H, W]` tensor first). DDIM with
//! eta = 0 never reads the variance.
//!
//! The network sees the integer timestep itself (`model_time(t) = t`).

use crate::buffers::{check_float_views, check_number, check_same_len, check_steps};
use ecdit_engine::error::check_finite;
use ecdit_engine::spec::get;
use ecdit_engine::{Backend, EngineError, ParamInfo, ParamType, Result, Scheduler, TensorMut, TensorRef};
use rand::Rng;
use serde_json::{json, Map, Value};

const COMPONENT: &str = "scheduler 'ddpm'";

/// How the `steps` sampling timesteps are picked out of `0..train_steps` (T).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `t_i = floor(i T / steps)`, `i = steps-1 ..= 0`: starts at `T - T/steps`, ends at 0.
    /// Equals diffusers' "leading" (steps_offset 0) and DiT's `ddim{steps}` respacing
    /// whenever `steps` divides T (50 steps: 980, 960, ..., 0).
    Leading,
    /// `t_i = round((i + 1) T / steps) - 1`, `i = steps-1 ..= 0`: starts at T-1 (pure
    /// noise), as diffusers' "trailing" (ties rounded to even, as numpy).
    Trailing,
}

impl TimestepSpacing {
    fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            other => Err(EngineError::param(
                COMPONENT,
                "spacing",
                format!("\"{other}\""),
                "expected one of leading, trailing",
            )),
        }
    }
}

/// DDPM training with DDIM (eta = 0) sampling.
#[derive(Clone, Debug, PartialEq)]
pub struct Ddpm {
    beta_start: f64,
    beta_end: f64,
    spacing: TimestepSpacing,
    // [train_steps], decreasing from 1 - beta_start.
    alphas_cumprod: Vec<f64>,
}

impl Default for Ddpm {
    fn default() -> Self {
        Self::new(1000, 1e-4, 0.02, TimestepSpacing::Leading).expect("the DiT defaults are valid")
    }
}

impl Ddpm {
    /// Registry kind.
    pub const KIND: &'static str = "ddpm";
    /// One line for `ecdit components`.
    pub const DESCRIPTION: &'static str =
        "DDPM with linear betas and epsilon target (DiT checkpoints); deterministic DDIM sampling";

    /// The most timesteps T: 2^20, a thousand times DiT's 1000 (the schedule
    /// is a table of T f64s, built when the spec is, so a bigger T is a typo,
    /// and timesteps cross the scheduler API as f32, exact integers only up to 2^24).
    pub const MAX_TRAIN_STEPS: usize = 1 << 20;

    /// A DDPM schedule; errors name the first bad parameter.
    pub fn new(train_steps: usize, beta_start: f64, beta_end: f64, spacing: TimestepSpacing) -> Result<Self> {
        if train_steps == 0 {
            return Err(EngineError::param(COMPONENT, "train_steps", 0, "must be >= 1"));
        }
        if train_steps > Self::MAX_TRAIN_STEPS {
            return Err(EngineError::param(
                COMPONENT,
                "train_steps",
                train_steps,
                format!("must be at most {}", Self::MAX_TRAIN_STEPS),
            ));
        }
        check_number(COMPONENT, "beta_start", beta_start, true)?;
        check_number(COMPONENT, "beta_end", beta_end, true)?;
        if beta_end <= beta_start {
            return Err(EngineError::param(
                COMPONENT,
                "beta_end",
                beta_end,
                format!("must be > beta_start = {beta_start}"),
            ));
        }
        if beta_end >= 1.0 {
            return Err(EngineError::param(COMPONENT, "beta_end", beta_end, "must be < 1"));
        }
        let mut alphas_cumprod = Vec::with_capacity(train_steps);
        let mut prod = 1.0f64;
        for i in 0..train_steps {
            // numpy linspace: both endpoints included; one step means beta_start alone.
            let frac = if train_steps == 1 {
                0.0
            } else {
                i as f64 / (train_steps - 1) as f64
            };
            prod *= 1.0 - (beta_start + (beta_end - beta_start) * frac);
            alphas_cumprod.push(prod);
        }
        Ok(Self {
            beta_start,
            beta_end,
            spacing,
            alphas_cumprod,
        })
    }

    /// Builds from checked registry parameters (defaults filled in).
    pub fn from_params(params: &Map<String, Value>) -> Result<Self> {
        let spacing: String = get(COMPONENT, params, "spacing")?;
        Self::new(
            get(COMPONENT, params, "train_steps")?,
            get(COMPONENT, params, "beta_start")?,
            get(COMPONENT, params, "beta_end")?,
            TimestepSpacing::parse(&spacing)?,
        )
    }

    /// The declared parameters.
    pub fn param_infos() -> Vec<ParamInfo> {
        vec![
            ParamInfo::new(
                "train_steps",
                ParamType::Int,
                Some(json!(1000)),
                "number of diffusion timesteps T (1 to 2^20)",
            ),
            ParamInfo::new(
                "beta_start",
                ParamType::Float,
                Some(json!(1e-4)),
                "first beta of the linear schedule (> 0)",
            ),
            ParamInfo::new(
                "beta_end",
                ParamType::Float,
                Some(json!(0.02)),
                "last beta of the linear schedule (> beta_start, < 1)",
            ),
            ParamInfo::new(
                "spacing",
                ParamType::Choice(vec!["leading".into(), "trailing".into()]),
                Some(json!("leading")),
                "DDIM timestep spacing: leading (DiT's ddimN: ..., 20, 0) or trailing (starts at T-1)",
            ),
        ]
    }

    /// Number of training timesteps T.
    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `alphas_cumprod[t]` for `t` in `0..T` (f64, as computed).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The timestep spacing used by [`Scheduler::sampling_times`].
    pub fn spacing(&self) -> TimestepSpacing {
        self.spacing
    }

    /// `alphas_cumprod` at an integer timestep given as f32; `allow_final` lets a
    /// negative time mean "data" (ab = 1).
    fn alpha_bar(&self, op: &str, name: &str, t: f32, allow_final: bool) -> Result<f64> {
        if allow_final && t < 0.0 {
            return Ok(1.0);
        }
        let last = self.train_steps() - 1;
        if !t.is_finite() || t.fract() != 0.0 || t < 0.0 || t as f64 > last as f64 {
            let range = if allow_final {
                format!("an integer in 0..={last} or negative (final step)")
            } else {
                format!("an integer in 0..={last}")
            };
            return Err(EngineError::Other(format!(
                "{COMPONENT} {op}: timestep {name} = {t} is not {range}"
            )));
        }
        Ok(self.alphas_cumprod[t as usize])
    }

    /// The DDIM step from `t` to `t_next` as `x_next = c_x x + c_eps eps`:
    /// returns `(c_x, c_eps)`, computed in f64 and rounded once to f32.
    /// `c_x = sqrt(ab_next / ab)`, `c_eps = sqrt(1 - ab_next) - c_x sqrt(1 - ab)`
    /// (expanding `x0_pred` in the DDIM update).
    pub fn ddim_coefficients(&self, op: &str, t: f32, t_next: f32) -> Result<(f32, f32)> {
        let ab = self.alpha_bar(op, "t", t, false)?;
        let ab_next = self.alpha_bar(op, "t_next", t_next, true)?;
        let (sqrt_ab, sqrt_1m_ab) = (ab.sqrt(), (1.0 - ab).sqrt());
        let (sqrt_ab_next, sqrt_1m_ab_next) = (ab_next.sqrt(), (1.0 - ab_next).sqrt());
        let c_x = sqrt_ab_next / sqrt_ab;
        let c_eps = sqrt_1m_ab_next - c_x * sqrt_1m_ab;
        Ok((c_x as f32, c_eps as f32))
    }
}

impl Scheduler for Ddpm {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> Value {
        json!({
            "kind": Self::KIND,
            "train_steps": self.train_steps(),
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "spacing": self.spacing.name(),
        })
    }

    fn draw_t(&self, rng: &mut dyn rand::RngCore) -> f32 {
        rng.gen_range(0..self.train_steps()) as f32
    }

    // x_t, x0, noise: [n]
    fn add_noise(&self, x_t: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        check_same_len(
            "add_noise",
            &[("x_t", x_t.len()), ("x0", x0.len()), ("noise", noise.len())],
        )?;
        let ab = self.alpha_bar("add_noise", "t", t, false)?;
        let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
        for ((x, &d), &n) in x_t.iter_mut().zip(x0).zip(noise) {
            *x = (a * d as f64 + s * n as f64) as f32;
        }
        Ok(())
    }

    // target, x0, noise: [n]
    fn target(&self, target: &mut [f32], x0: &[f32], noise: &[f32], t: f32) -> Result<()> {
        check_same_len(
            "target",
            &[("target", target.len()), ("x0", x0.len()), ("noise", noise.len())],
        )?;
        self.alpha_bar("target", "t", t, false)?;
        target.copy_from_slice(noise);
        Ok(())
    }

    /// The integer timestep itself; an error unless `t` is one of `0..T`.
    fn model_time(&self, t: f32) -> Result<f32> {
        self.alpha_bar("model_time", "t", t, false)?;
        Ok(t)
    }

    /// `steps` decreasing timesteps (see [`TimestepSpacing`]) then `-1` (the final step
    /// to data). `steps` must be in `1..=T`: more would repeat timesteps.
    fn sampling_times(&self, steps: usize) -> Result<Vec<f32>> {
        let t_count = self.train_steps();
        check_steps(COMPONENT, steps, Some(t_count))?;
        let mut times: Vec<f32> = (0..steps)
            .rev()
            .map(|i| match self.spacing {
                TimestepSpacing::Leading => (i * t_count / steps) as f32,
                TimestepSpacing::Trailing => {
                    let t = ((i + 1) as f64 * t_count as f64 / steps as f64).round_ties_even() - 1.0;
                    t.max(0.0) as f32
                }
            })
            .collect();
        times.push(-1.0);
        Ok(times)
    }

    // x, model_out (epsilon part only, see the module docs): [n]
    fn step(&self, x: &mut [f32], model_out: &[f32], t: f32, t_next: f32) -> Result<()> {
        check_same_len("step", &[("x", x.len()), ("model_out (epsilon)", model_out.len())])?;
        let (c_x, c_eps) = self.ddim_coefficients("step", t, t_next)?;
        check_finite("ddpm step: model_out (epsilon)", model_out)?;
        // `c_eps * eps + c_x * x` in f32: the arithmetic of `axpby(x, c_eps, eps, c_x)`.
        for (x, &eps) in x.iter_mut().zip(model_out) {
            *x = c_eps * eps + c_x * *x;
        }
        Ok(())
    }

    /// [`Scheduler::step`] as one `axpby` on the backend (the same bits on f32
    /// tensors). `model_out` is the epsilon view the caller passes (see the
    /// module docs on learned sigma); it is not scanned for NaN here, which
    /// would be a download per step.
    fn step_on(
        &self,
        backend: &dyn Backend,
        x: TensorMut<'_>,
        model_out: TensorRef<'_>,
        t: f32,
        t_next: f32,
    ) -> Result<()> {
        check_float_views("step_on", &x, &model_out, "model_out (epsilon)")?;
        let (c_x, c_eps) = self.ddim_coefficients("step_on", t, t_next)?;
        backend.axpby(x, c_eps, model_out, c_x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dit_schedule_matches_published_alphas_cumprod() {
        let ddpm = Ddpm::default();
        let ac = ddpm.alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - 0.9999).abs() < 1e-15);
        // beta_1 = 1e-4 + 0.0199 / 999
        assert!((ac[1] - 0.9999 * (1.0 - (1e-4 + 0.0199 / 999.0))).abs() < 1e-15);
        // The well-known final value of DiT's linear schedule, ~4.036e-5.
        assert!((ac[999] - 4.0358e-5).abs() < 1e-8, "{}", ac[999]);
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn spacings_match_dit_and_diffusers() {
        let ddpm = Ddpm::default();
        let t = ddpm.sampling_times(50).unwrap();
        assert_eq!(t.len(), 51);
        assert_eq!(&t[..3], &[980.0, 960.0, 940.0]);
        assert_eq!(&t[48..], &[20.0, 0.0, -1.0]);
        let trailing = Ddpm::new(1000, 1e-4, 0.02, TimestepSpacing::Trailing).unwrap();
        // diffusers: np.round(np.arange(1000, 0, -1000/3)) - 1 = [999, 666, 332]
        assert_eq!(trailing.sampling_times(3).unwrap(), vec![999.0, 666.0, 332.0, -1.0]);
        assert_eq!(ddpm.sampling_times(3).unwrap(), vec![666.0, 333.0, 0.0, -1.0]);
    }

    #[test]
    fn bad_parameters_name_field_and_value() {
        let e = Ddpm::new(0, 1e-4, 0.02, TimestepSpacing::Leading)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'train_steps'") && e.contains("= 0"), "{e}");
        let e = Ddpm::new(1000, 0.02, 0.01, TimestepSpacing::Leading)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'beta_end'") && e.contains("0.01") && e.contains("beta_start = 0.02"),
            "{e}"
        );
        let e = Ddpm::new(1000, f64::NAN, 0.02, TimestepSpacing::Leading)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'beta_start'") && e.contains("NaN"), "{e}");
        let e = Ddpm::new(1000, 1e-4, 1.5, TimestepSpacing::Leading)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'beta_end'") && e.contains("< 1"), "{e}");
    }

    #[test]
    fn timestep_and_length_errors() {
        let ddpm = Ddpm::default();
        let mut x = vec![0.0; 2];
        let e = ddpm
            .add_noise(&mut x, &[0.0; 2], &[0.0; 2], 1000.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t = 1000") && e.contains("0..=999"), "{e}");
        let e = ddpm
            .add_noise(&mut x, &[0.0; 2], &[0.0; 2], 2.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t = 2.5"), "{e}");
        let e = ddpm.step(&mut x, &[0.0; 4], 10.0, 0.0).unwrap_err().to_string();
        assert!(e.contains("epsilon") && e.contains("4 elements"), "{e}");
        let e = ddpm.step(&mut x, &[0.0; 2], -1.0, 0.0).unwrap_err().to_string();
        assert!(e.contains("timestep t = -1"), "{e}");
    }

    #[test]
    fn times_outside_the_process_and_bad_step_counts_are_errors() {
        let ddpm = Ddpm::default();
        assert_eq!(ddpm.model_time(999.0).unwrap(), 999.0);
        for t in [-1.0f32, 1000.0, 2.5, f32::NAN] {
            let e = ddpm.model_time(t).unwrap_err().to_string();
            assert!(
                e.contains("model_time") && e.contains(&format!("t = {t}")) && e.contains("0..=999"),
                "{e}"
            );
        }
        let e = ddpm.sampling_times(0).unwrap_err().to_string();
        assert!(e.contains("ddpm") && e.contains("steps = 0"), "{e}");
        let e = ddpm.sampling_times(1001).unwrap_err().to_string();
        assert!(e.contains("steps = 1001") && e.contains("1000 timesteps"), "{e}");
        assert_eq!(ddpm.sampling_times(1000).unwrap().len(), 1001);
    }

    #[test]
    fn coefficients_expand_the_ddim_update() {
        let ddpm = Ddpm::default();
        let ac = ddpm.alphas_cumprod();
        let (c_x, c_eps) = ddpm.ddim_coefficients("t", 500.0, 250.0).unwrap();
        let (x, eps) = (0.3f64, -1.2f64);
        let x0_pred = (x - (1.0 - ac[500]).sqrt() * eps) / ac[500].sqrt();
        let want = ac[250].sqrt() * x0_pred + (1.0 - ac[250]).sqrt() * eps;
        let got = c_x as f64 * x + c_eps as f64 * eps;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // The final step to data: x0_pred itself.
        let (c_x, c_eps) = ddpm.ddim_coefficients("t", 0.0, -1.0).unwrap();
        assert_eq!(c_x, (1.0 / ac[0].sqrt()) as f32);
        let want = -(1.0 - ac[0]).sqrt() / ac[0].sqrt();
        assert!((c_eps as f64 - want).abs() <= 1e-7 * want.abs(), "{c_eps} vs {want}");
    }
}
