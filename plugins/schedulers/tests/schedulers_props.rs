//! Property tests of the two schedulers: path endpoints, exact integration of known
//! fields, the training-time distribution, sampling-time grids, and spec round trips.

use ecdit_engine::{Registry, Scheduler};
use ecdit_schedulers::{register, Ddpm, RectifiedFlow, TimestepSpacing};
use proptest::prelude::*;
use rand::SeedableRng;
use serde_json::json;

fn vec_pair(max_len: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (1..max_len).prop_flat_map(|n| {
        (
            prop::collection::vec(-4.0f32..4.0, n),
            prop::collection::vec(-4.0f32..4.0, n),
        )
    })
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn spacing() -> impl Strategy<Value = TimestepSpacing> {
    prop_oneof![Just(TimestepSpacing::Leading), Just(TimestepSpacing::Trailing)]
}

fn registry() -> Registry {
    let mut r = Registry::new();
    register(&mut r).unwrap();
    r
}

proptest! {
    #[test]
    fn flow_path_hits_its_endpoints_and_lies_on_the_line((x0, noise) in vec_pair(64), t in 0.0f32..=1.0) {
        let flow = RectifiedFlow::default();
        let mut x = vec![0.0; x0.len()];
        flow.add_noise(&mut x, &x0, &noise, 0.0).unwrap();
        prop_assert_eq!(&x, &x0);
        flow.add_noise(&mut x, &x0, &noise, 1.0).unwrap();
        prop_assert_eq!(&x, &noise);
        // In between: x_t = x0 + t v with v the target.
        let mut v = vec![0.0; x0.len()];
        flow.add_noise(&mut x, &x0, &noise, t).unwrap();
        flow.target(&mut v, &x0, &noise, t).unwrap();
        for i in 0..x.len() {
            prop_assert!((x[i] - (x0[i] + t * v[i])).abs() <= 4e-6 * 8.0, "i {} x {} v {}", i, x[i], v[i]);
        }
    }

    #[test]
    fn euler_integrates_the_true_velocity_to_x0(
        (x0, noise) in vec_pair(32),
        steps in 1usize..200,
        shift in 0.1f64..10.0,
    ) {
        let flow = RectifiedFlow::new(0.0, 1.0, shift, 1000.0).unwrap();
        let times = flow.sampling_times(steps).unwrap();
        let mut v = vec![0.0; x0.len()];
        let mut x = noise.clone();
        for w in times.windows(2) {
            flow.target(&mut v, &x0, &noise, w[0]).unwrap();
            flow.step(&mut x, &v, w[0], w[1]).unwrap();
        }
        // Each step rounds once in f32; the error grows at most linearly in the steps.
        let scale = max_abs(&x0) + max_abs(&noise);
        let tol = 2.0 * steps as f32 * f32::EPSILON * scale + f32::EPSILON;
        for i in 0..x.len() {
            prop_assert!((x[i] - x0[i]).abs() <= tol, "i {}: {} vs {} (tol {})", i, x[i], x0[i], tol);
        }
    }

    #[test]
    fn ddim_fed_the_true_epsilon_recovers_x0(
        (x0, eps) in vec_pair(32),
        steps in 1usize..120,
        spacing in spacing(),
    ) {
        let ddpm = Ddpm::new(1000, 1e-4, 0.02, spacing).unwrap();
        let times = ddpm.sampling_times(steps).unwrap();
        let mut x = vec![0.0; x0.len()];
        ddpm.add_noise(&mut x, &x0, &eps, times[0]).unwrap();
        for w in times.windows(2) {
            ddpm.step(&mut x, &eps, w[0], w[1]).unwrap();
        }
        // Relative to the inputs' scale: near t = T the f32 rounding of x_T (~|eps| 2^-24)
        // is divided by sqrt(ab) ~ 0.006, so the floor grows with the noise too.
        let tol = 1e-3 * max_abs(&x0).max(max_abs(&eps));
        for i in 0..x.len() {
            prop_assert!((x[i] - x0[i]).abs() <= tol, "i {}: {} vs {} (tol {})", i, x[i], x0[i], tol);
        }
    }

    #[test]
    fn ddpm_t0_is_almost_x0((x0, noise) in vec_pair(64)) {
        let ddpm = Ddpm::default();
        let ab0 = 1.0 - 1e-4f64;
        let mut x = vec![0.0; x0.len()];
        ddpm.add_noise(&mut x, &x0, &noise, 0.0).unwrap();
        for i in 0..x.len() {
            let expected = ab0.sqrt() * x0[i] as f64 + (1.0 - ab0).sqrt() * noise[i] as f64;
            prop_assert!((x[i] as f64 - expected).abs() <= 1e-6, "i {}: {} vs {}", i, x[i], expected);
            // sqrt(1 - ab0) = 0.01: one percent of the noise is left.
            prop_assert!((x[i] - x0[i]).abs() <= 5.1e-5 * x0[i].abs() + 0.0101 * noise[i].abs() + 1e-6);
        }
        let mut target = vec![0.0; x0.len()];
        ddpm.target(&mut target, &x0, &noise, 0.0).unwrap();
        prop_assert_eq!(target, noise);
    }

    #[test]
    fn logit_normal_draws_have_the_asked_mean_and_std(
        mean in -2.0f64..2.0,
        std in 0.3f64..2.0,
        seed in 0u64..4,
    ) {
        let flow = RectifiedFlow::new(mean, std, 1.0, 1000.0).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = 20_000;
        let mut logits = Vec::with_capacity(n);
        for _ in 0..n {
            let t = flow.draw_t(&mut rng);
            prop_assert!(t > 0.0 && t < 1.0, "t = {}", t);
            let t = t as f64;
            logits.push((t / (1.0 - t)).ln());
        }
        let m = logits.iter().sum::<f64>() / n as f64;
        let s = (logits.iter().map(|l| (l - m) * (l - m)).sum::<f64>() / (n - 1) as f64).sqrt();
        // Five standard errors: s / sqrt(n) for the mean, s / sqrt(2n) for the std.
        prop_assert!((m - mean).abs() < 5.0 * std / (n as f64).sqrt(), "mean {} vs {}", m, mean);
        prop_assert!((s - std).abs() < 5.0 * std / (2.0 * n as f64).sqrt(), "std {} vs {}", s, std);
    }

    #[test]
    fn flow_sampling_times_run_monotonically_from_1_to_0(steps in 1usize..500, shift in 0.05f64..20.0) {
        let flow = RectifiedFlow::new(0.0, 1.0, shift, 1000.0).unwrap();
        let times = flow.sampling_times(steps).unwrap();
        prop_assert_eq!(times.len(), steps + 1);
        prop_assert_eq!(times[0], 1.0);
        prop_assert_eq!(times[steps], 0.0);
        for w in times.windows(2) {
            prop_assert!(w[1] < w[0], "{:?}", w);
        }
    }

    #[test]
    fn ddpm_sampling_times_are_decreasing_timesteps_ending_in_the_final_step(
        steps in 1usize..=1000,
        spacing in spacing(),
    ) {
        let ddpm = Ddpm::new(1000, 1e-4, 0.02, spacing).unwrap();
        let times = ddpm.sampling_times(steps).unwrap();
        prop_assert_eq!(times.len(), steps + 1);
        prop_assert_eq!(times[steps], -1.0);
        for &t in &times[..steps] {
            prop_assert!(t.fract() == 0.0 && (0.0..=999.0).contains(&t), "t = {}", t);
        }
        for w in times.windows(2) {
            prop_assert!(w[1] < w[0], "{:?}", w);
        }
        match spacing {
            TimestepSpacing::Leading => prop_assert_eq!(times[steps - 1], 0.0),
            TimestepSpacing::Trailing => prop_assert_eq!(times[0], 999.0),
        }
    }

    #[test]
    fn ddpm_draws_integer_timesteps_in_range(seed in any::<u64>()) {
        let ddpm = Ddpm::new(37, 1e-3, 0.05, TimestepSpacing::Leading).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..200 {
            let t = ddpm.draw_t(&mut rng);
            prop_assert!(t.fract() == 0.0 && (0.0..37.0).contains(&t), "t = {}", t);
            prop_assert_eq!(ddpm.model_time(t).unwrap(), t);
        }
    }

    #[test]
    fn specs_round_trip_through_the_registry(
        mean in -3.0f64..3.0,
        std in 0.0f64..3.0,
        shift in 0.1f64..10.0,
        scale in 1.0f64..2000.0,
        train_steps in 1usize..2000,
        beta_start in 1e-5f64..1e-2,
        beta_gap in 1e-5f64..0.5,
        spacing in spacing(),
    ) {
        let reg = registry();
        let flow = RectifiedFlow::new(mean, std, shift, scale).unwrap();
        let rebuilt = reg.scheduler(&flow.spec()).unwrap();
        prop_assert_eq!(rebuilt.spec(), flow.spec());
        let ddpm = Ddpm::new(train_steps, beta_start, beta_start + beta_gap, spacing).unwrap();
        let rebuilt = reg.scheduler(&ddpm.spec()).unwrap();
        prop_assert_eq!(rebuilt.spec(), ddpm.spec());
        // Both Ok and equal, or (fewer than 7 timesteps) both the same error.
        let times = |s: &dyn Scheduler| s.sampling_times(7).map_err(|e| e.to_string());
        prop_assert_eq!(times(rebuilt.as_ref()), times(&ddpm));
    }
}

#[test]
fn register_lists_both_kinds_with_their_params() {
    let reg = registry();
    let list = reg.list();
    let names = |kind: &str| -> Vec<String> {
        let info = list.iter().find(|c| c.kind == kind).unwrap();
        info.params.iter().map(|p| p.name.clone()).collect()
    };
    assert_eq!(
        names("rectified-flow"),
        ["logit_mean", "logit_std", "shift", "time_scale"]
    );
    assert_eq!(names("ddpm"), ["train_steps", "beta_start", "beta_end", "spacing"]);
    // Defaults build the schedulers the paper and DiT use.
    assert_eq!(
        reg.scheduler(&json!("rectified-flow")).unwrap().spec(),
        RectifiedFlow::default().spec()
    );
    assert_eq!(reg.scheduler(&json!("ddpm")).unwrap().spec(), Ddpm::default().spec());
    // Registering twice refuses, and names the clash.
    let mut twice = registry();
    let e = register(&mut twice).unwrap_err().to_string();
    assert!(e.contains("rectified-flow") && e.contains("already registered"), "{e}");
}

#[test]
fn bad_specs_are_errors_naming_field_and_value() {
    let reg = registry();
    let err = |spec: serde_json::Value| reg.scheduler(&spec).err().expect("spec should fail").to_string();
    let e = err(json!({"kind": "rectified-flow", "shift": -2.0}));
    assert!(e.contains("'shift'") && e.contains("-2"), "{e}");
    let e = err(json!({"kind": "rectified-flow", "shift": "big"}));
    assert!(e.contains("'shift'") && e.contains("\"big\""), "{e}");
    let e = err(json!({"kind": "ddpm", "beta_start": 0.02, "beta_end": 0.02}));
    assert!(e.contains("'beta_end'") && e.contains("0.02"), "{e}");
    let e = err(json!({"kind": "ddpm", "train_steps": 0}));
    assert!(e.contains("'train_steps'") && e.contains("0"), "{e}");
    let e = err(json!({"kind": "ddpm", "spacing": "linspace"}));
    assert!(
        e.contains("'spacing'") && e.contains("linspace") && e.contains("leading"),
        "{e}"
    );
    let e = err(json!({"kind": "ddpm", "learned_sigma": true}));
    assert!(e.contains("'learned_sigma'") && e.contains("unknown"), "{e}");
}
