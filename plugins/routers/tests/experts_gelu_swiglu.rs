//! The GELU MLP and SwiGLU experts on the real CPU backend: forward against a
//! plain per-row reference, backward against central finite differences,
//! experts computed together equal experts computed one by one, and bad input
//! errors instead of panicking.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, Expert, ExpertCache, Registry};
use ecdit_routers::experts::{GeluMlp, SwiGlu};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn backend() -> CpuBackend {
    CpuBackend::new(1).expect("a one-thread CPU backend")
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn random_params(expert: &dyn Expert, d: usize, experts: usize, rng: &mut StdRng) -> Vec<Vec<f32>> {
    expert
        .param_shapes(d, experts)
        .iter()
        .map(|p| random(rng, p.shape.iter().product(), 0.5))
        .collect()
}

fn slices(params: &[Vec<f32>]) -> Vec<&[f32]> {
    params.iter().map(|p| p.as_slice()).collect()
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `y = v W (+ b)` for an input-major `[inp, out]` row-major W, in f64.
fn linear(w: &[f32], b: Option<&[f32]>, v: &[f64], out: usize) -> Vec<f64> {
    let inp = v.len();
    (0..out)
        .map(|o| {
            let dot: f64 = (0..inp).map(|i| w[i * out + o] as f64 * v[i]).sum();
            dot + b.map_or(0.0, |b| b[o] as f64)
        })
        .collect()
}

/// Per-row f64 reference of either expert kind.
fn reference(kind: &str, params: &[Vec<f32>], x: &[f32], offsets: &[usize], d: usize, h: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for e in 0..offsets.len() - 1 {
        let m = |p: usize, rows: usize, cols: usize| &params[p][e * rows * cols..(e + 1) * rows * cols];
        for r in offsets[e]..offsets[e + 1] {
            let v: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
            let y = match kind {
                "gelu-mlp" => {
                    let hid = linear(m(0, h, d), Some(&params[1][e * h..(e + 1) * h]), &v, h);
                    let act: Vec<f64> = hid.into_iter().map(gelu_tanh).collect();
                    linear(m(2, d, h), Some(&params[3][e * d..(e + 1) * d]), &act, d)
                }
                _ => {
                    let a = linear(m(0, h, d), None, &v, h);
                    let b = linear(m(1, h, d), None, &v, h);
                    let g: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| silu(a) * b).collect();
                    linear(m(2, d, h), None, &g, d)
                }
            };
            out.extend(y);
        }
    }
    out
}

fn experts_under_test() -> Vec<Box<dyn Expert>> {
    vec![
        Box::new(GeluMlp::new(2.0).expect("valid ratio")),
        Box::new(SwiGlu::new(1.5).expect("valid ratio")),
    ]
}

#[test]
fn forward_matches_a_per_row_reference_with_an_empty_expert() {
    let be = backend();
    let mut rng = StdRng::seed_from_u64(1);
    let d = 6;
    // Expert 1 gets no rows; it must cost nothing and disturb nothing.
    let offsets = [0, 3, 3, 7];
    for expert in experts_under_test() {
        let h = expert.hidden(d);
        let params = random_params(expert.as_ref(), d, 3, &mut rng);
        let x = random(&mut rng, 7 * d, 1.0);
        let mut out = vec![f32::NAN; 7 * d];
        let mut cache = ExpertCache::default();
        expert
            .forward(&be, &mut out, &mut cache, &x, &slices(&params), &offsets, d)
            .expect("forward");
        let want = reference(expert.kind(), &params, &x, &offsets, d, h);
        for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "{} out[{i}] = {got}, want {want}",
                expert.kind()
            );
        }
    }
}

/// `L = sum(out * r)`, in f64 so the finite differences see only the f32
/// rounding of `out` itself.
fn loss(
    expert: &dyn Expert,
    be: &dyn Backend,
    x: &[f32],
    params: &[Vec<f32>],
    offsets: &[usize],
    d: usize,
    r: &[f32],
) -> f64 {
    let mut out = vec![0.0; x.len()];
    let mut cache = ExpertCache::default();
    expert
        .forward(be, &mut out, &mut cache, x, &slices(params), offsets, d)
        .expect("forward");
    out.iter().zip(r).map(|(&o, &r)| o as f64 * r as f64).sum()
}

fn assert_close(what: &str, got: f32, want: f64) {
    let tol = 2e-3 + 1e-2 * want.abs();
    assert!(
        (got as f64 - want).abs() < tol,
        "{what}: analytic {got}, numeric {want}"
    );
}

#[test]
fn backward_matches_finite_differences() {
    let be = backend();
    let mut rng = StdRng::seed_from_u64(2);
    let d = 5;
    let offsets = [0, 2, 2, 6, 9];
    let eps = 1e-2f32;
    for expert in experts_under_test() {
        let expert = expert.as_ref();
        let mut params = random_params(expert, d, 4, &mut rng);
        let mut x = random(&mut rng, 9 * d, 1.0);
        let r = random(&mut rng, 9 * d, 1.0);

        let mut out = vec![0.0; 9 * d];
        let mut cache = ExpertCache::default();
        expert
            .forward(&be, &mut out, &mut cache, &x, &slices(&params), &offsets, d)
            .expect("forward");
        let mut dx = vec![f32::NAN; 9 * d];
        // dparams start non-zero: backward must accumulate into them.
        let seed: Vec<Vec<f32>> = params.iter().map(|p| vec![0.25; p.len()]).collect();
        let mut dparams = seed.clone();
        {
            let mut dp: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.as_mut_slice()).collect();
            expert
                .backward(&be, &mut dx, &mut dp, &r, &cache, &x, &slices(&params), &offsets, d)
                .expect("backward");
        }

        for i in 0..x.len() {
            let keep = x[i];
            x[i] = keep + eps;
            let up = loss(expert, &be, &x, &params, &offsets, d, &r);
            x[i] = keep - eps;
            let down = loss(expert, &be, &x, &params, &offsets, d, &r);
            x[i] = keep;
            assert_close(
                &format!("{} dx[{i}]", expert.kind()),
                dx[i],
                (up - down) / (2.0 * eps as f64),
            );
        }
        let names = expert.param_shapes(d, 4);
        for p in 0..params.len() {
            for i in 0..params[p].len() {
                let keep = params[p][i];
                params[p][i] = keep + eps;
                let up = loss(expert, &be, &x, &params, &offsets, d, &r);
                params[p][i] = keep - eps;
                let down = loss(expert, &be, &x, &params, &offsets, d, &r);
                params[p][i] = keep;
                let what = format!("{} d{}[{i}]", expert.kind(), names[p].name);
                assert_close(&what, dparams[p][i] - seed[p][i], (up - down) / (2.0 * eps as f64));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Computing all experts in one call equals running each expert alone on
    /// its rows with its own slice of the stacked parameters (forward and
    /// backward), for any split of the rows.
    #[test]
    fn experts_together_equal_experts_alone(counts in prop::collection::vec(0usize..5, 1..5), seed in 0u64..1000) {
        let be = backend();
        let mut rng = StdRng::seed_from_u64(seed);
        let d = 4;
        let e_count = counts.len();
        let mut offsets = vec![0];
        for c in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + c);
        }
        let n = offsets[e_count];
        for expert in experts_under_test() {
            let expert = expert.as_ref();
            let params = random_params(expert, d, e_count, &mut rng);
            let x = random(&mut rng, n * d, 1.0);
            let dout = random(&mut rng, n * d, 1.0);
            let mut out = vec![0.0; n * d];
            let mut cache = ExpertCache::default();
            expert.forward(&be, &mut out, &mut cache, &x, &slices(&params), &offsets, d).expect("forward");
            let mut dx = vec![0.0; n * d];
            let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            {
                let mut dp: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.as_mut_slice()).collect();
                expert.backward(&be, &mut dx, &mut dp, &dout, &cache, &x, &slices(&params), &offsets, d).expect("backward");
            }
            for e in 0..e_count {
                let (r0, r1) = (offsets[e], offsets[e + 1]);
                let per: Vec<usize> = params.iter().map(|p| p.len() / e_count).collect();
                let own: Vec<Vec<f32>> = params.iter().zip(&per).map(|(p, &k)| p[e * k..(e + 1) * k].to_vec()).collect();
                let one = [0, r1 - r0];
                let mut out1 = vec![0.0; (r1 - r0) * d];
                let mut cache1 = ExpertCache::default();
                expert.forward(&be, &mut out1, &mut cache1, &x[r0 * d..r1 * d], &slices(&own), &one, d).expect("forward");
                let mut dx1 = vec![0.0; (r1 - r0) * d];
                let mut dp1: Vec<Vec<f32>> = own.iter().map(|p| vec![0.0; p.len()]).collect();
                {
                    let mut dp: Vec<&mut [f32]> = dp1.iter_mut().map(|p| p.as_mut_slice()).collect();
                    expert.backward(&be, &mut dx1, &mut dp, &dout[r0 * d..r1 * d], &cache1, &x[r0 * d..r1 * d], &slices(&own), &one, d).expect("backward");
                }
                prop_assert_eq!(&out[r0 * d..r1 * d], &out1[..]);
                prop_assert_eq!(&dx[r0 * d..r1 * d], &dx1[..]);
                for (p, k) in per.iter().enumerate() {
                    prop_assert_eq!(&dparams[p][e * k..(e + 1) * k], &dp1[p][..]);
                }
            }
        }
    }
}

#[test]
fn registry_builds_both_kinds_and_round_trips_specs() {
    let mut registry = Registry::new();
    ecdit_routers::register(&mut registry).expect("register");
    let gelu = registry.expert(&json!("gelu-mlp")).expect("default gelu-mlp");
    assert_eq!(gelu.spec(), json!({"kind": "gelu-mlp", "mlp_ratio": 4.0}));
    assert_eq!(gelu.hidden(384), 1536);
    let swiglu = registry
        .expert(&json!({"kind": "swiglu", "mlp_ratio": 2.5}))
        .expect("swiglu");
    assert_eq!(swiglu.hidden(8), 20);
    let again = registry.expert(&swiglu.spec()).expect("rebuild from spec");
    assert_eq!(again.spec(), swiglu.spec());

    let shapes: Vec<(String, Vec<usize>)> = gelu.param_shapes(4, 3).into_iter().map(|p| (p.name, p.shape)).collect();
    let want = [
        ("fc1.weight", vec![3, 4, 16]),
        ("fc1.bias", vec![3, 16]),
        ("fc2.weight", vec![3, 16, 4]),
        ("fc2.bias", vec![3, 4]),
    ];
    assert_eq!(shapes, want.map(|(n, s)| (n.to_string(), s)).to_vec());
    let names: Vec<String> = swiglu.param_shapes(4, 3).into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["w1", "w3", "w2"]);

    let err = registry
        .expert(&json!({"kind": "gelu-mlp", "mlp_ratio": -1.0}))
        .err()
        .expect("negative ratio")
        .to_string();
    assert!(err.contains("mlp_ratio") && err.contains("-1"), "{err}");
    let err = registry
        .expert(&json!({"kind": "swiglu", "mlp_ratio": "wide"}))
        .err()
        .expect("string ratio")
        .to_string();
    assert!(err.contains("mlp_ratio"), "{err}");
}

#[test]
fn bad_buffers_are_errors_not_panics() {
    let be = backend();
    let mut rng = StdRng::seed_from_u64(3);
    let d = 4;
    for expert in experts_under_test() {
        let expert = expert.as_ref();
        let params = random_params(expert, d, 2, &mut rng);
        let x = random(&mut rng, 5 * d, 1.0);
        let mut out = vec![0.0; 5 * d];
        let mut cache = ExpertCache::default();
        let p = slices(&params);
        // offsets end past the rows of x
        let err = expert
            .forward(&be, &mut out, &mut cache, &x, &p, &[0, 2, 6], d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x"), "{err}");
        // offsets not monotone
        let err = expert
            .forward(&be, &mut out, &mut cache, &x, &p, &[0, 4, 3], d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("offsets"), "{err}");
        // parameters for 3 experts with offsets for 2
        let p3 = random_params(expert, d, 3, &mut rng);
        let err = expert
            .forward(&be, &mut out, &mut cache, &x, &slices(&p3), &[0, 2, 5], d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("params[0]"), "{err}");
        // backward without a forward
        let mut dx = vec![0.0; 5 * d];
        let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut dp: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.as_mut_slice()).collect();
        let err = expert
            .backward(
                &be,
                &mut dx,
                &mut dp,
                &out,
                &ExpertCache::default(),
                &x,
                &p,
                &[0, 2, 5],
                d,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache"), "{err}");
    }
}

#[test]
fn experts_with_more_rows_than_one_forward_block_are_exact() {
    // The forward runs an expert's rows in blocks; 1100 rows span three.
    let be = backend();
    let mut rng = StdRng::seed_from_u64(12);
    let d = 4;
    let offsets = [0, 1100, 1103];
    for expert in experts_under_test() {
        let h = expert.hidden(d);
        let params = random_params(expert.as_ref(), d, 2, &mut rng);
        let x = random(&mut rng, 1103 * d, 1.0);
        let mut out = vec![f32::NAN; 1103 * d];
        let mut cache = ExpertCache::default();
        expert
            .forward(&be, &mut out, &mut cache, &x, &slices(&params), &offsets, d)
            .expect("forward");
        let want = reference(expert.kind(), &params, &x, &offsets, d, h);
        for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "{} out[{i}] = {got}, want {want}",
                expert.kind()
            );
        }
        // dx is row-local: one call equals two calls on the halves of expert 0.
        let dout = random(&mut rng, 1103 * d, 1.0);
        let grads = |rows: std::ops::Range<usize>, offsets: &[usize]| {
            let (x, dout) = (&x[rows.start * d..rows.end * d], &dout[rows.start * d..rows.end * d]);
            let mut out = vec![0.0; x.len()];
            let mut cache = ExpertCache::default();
            expert
                .forward(&be, &mut out, &mut cache, x, &slices(&params), offsets, d)
                .expect("forward");
            let mut dx = vec![0.0; x.len()];
            let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut dp: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.as_mut_slice()).collect();
            expert
                .backward(&be, &mut dx, &mut dp, dout, &cache, x, &slices(&params), offsets, d)
                .expect("backward");
            dx
        };
        let whole = grads(0..1100, &[0, 1100, 1100]);
        let mut halves = grads(0..600, &[0, 600, 600]);
        halves.extend(grads(600..1100, &[0, 500, 500]));
        for (i, (a, b)) in whole.iter().zip(&halves).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "{} dx[{i}]: {a} vs {b}",
                expert.kind()
            );
        }
    }
}

#[test]
fn uneven_experts_on_two_threads_match_the_reference_and_one_thread_bit_for_bit() {
    // Widths and expert sizes that make the 2-thread backend split experts
    // into row tiles and the forward cut the dispatch into several slices of
    // experts (4100 rows exceed one slice), with empty experts in between.
    let (be1, be2) = (backend(), CpuBackend::new(2).expect("a two-thread CPU backend"));
    let mut rng = StdRng::seed_from_u64(21);
    let d = 16;
    let counts = [300usize, 0, 700, 5, 4100, 0, 260];
    let mut offsets = vec![0];
    for c in counts {
        offsets.push(offsets.last().copied().unwrap_or(0) + c);
    }
    let n = offsets[counts.len()];
    for expert in experts_under_test() {
        let h = expert.hidden(d);
        let params = random_params(expert.as_ref(), d, counts.len(), &mut rng);
        let x = random(&mut rng, n * d, 1.0);
        let dout = random(&mut rng, n * d, 1.0);
        let run = |be: &CpuBackend| {
            let mut out = vec![f32::NAN; n * d];
            let mut cache = ExpertCache::default();
            expert
                .forward(be, &mut out, &mut cache, &x, &slices(&params), &offsets, d)
                .expect("forward");
            let mut dx = vec![f32::NAN; n * d];
            let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut dp: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.as_mut_slice()).collect();
            expert
                .backward(be, &mut dx, &mut dp, &dout, &cache, &x, &slices(&params), &offsets, d)
                .expect("backward");
            (out, dx, dparams)
        };
        let (out2, dx2, dp2) = run(&be2);
        let want = reference(expert.kind(), &params, &x, &offsets, d, h);
        for (i, (&got, &want)) in out2.iter().zip(&want).enumerate() {
            assert!(
                (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{} out[{i}] = {got}, want {want}",
                expert.kind()
            );
        }
        let (out1, dx1, dp1) = run(&be1);
        assert!(
            out1 == out2,
            "{}: forward differs between 1 and 2 threads",
            expert.kind()
        );
        assert!(dx1 == dx2, "{}: dx differs between 1 and 2 threads", expert.kind());
        assert!(dp1 == dp2, "{}: parameter gradients differ", expert.kind());
    }
}
