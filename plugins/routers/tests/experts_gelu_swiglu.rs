//! The GELU MLP and SwiGLU experts on the real CPU backend: forward against a
//! plain per-row reference, backward against central finite differences,
//! experts computed together equal experts computed one by one, inference
//! (no cache) equals training and keeps nothing, and bad input errors
//! instead of panicking.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, Expert, ExpertCache, Init, Layout, Registry, Tensor, TensorRef};
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

/// Host data as an f32 tensor of `be`.
fn up(be: &dyn Backend, data: &[f32]) -> Tensor {
    be.upload_f32(&[data.len()], data, DType::F32).expect("upload")
}

fn read(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    be.read_f32(t.view()).expect("download")
}

/// The expert's parameters on `be`, in their (stored = memory) shapes.
fn param_tensors(expert: &dyn Expert, be: &dyn Backend, params: &[Vec<f32>], d: usize) -> Vec<Tensor> {
    let experts = offsets_experts(expert, params, d);
    expert
        .param_shapes(d, experts)
        .iter()
        .zip(params)
        .map(|(s, p)| be.upload_f32(&s.shape, p, DType::F32).expect("upload param"))
        .collect()
}

/// E from the length of the first parameter (the shapes are per expert).
fn offsets_experts(expert: &dyn Expert, params: &[Vec<f32>], d: usize) -> usize {
    let per: usize = expert.param_shapes(d, 1)[0].shape.iter().product();
    params[0].len() / per
}

fn views(ts: &[Tensor]) -> Vec<TensorRef<'_>> {
    ts.iter().map(|t| t.view()).collect()
}

/// A training forward on host data: the output and the cache.
fn forward(
    expert: &dyn Expert,
    be: &dyn Backend,
    x: &[f32],
    params: &[Vec<f32>],
    offsets: &[usize],
    d: usize,
) -> (Vec<f32>, ExpertCache) {
    let mut cache = ExpertCache::default();
    let out = forward_with(expert, be, x, params, offsets, d, Some(&mut cache)).expect("forward");
    (out, cache)
}

/// A forward on host data with an optional cache.
fn forward_with(
    expert: &dyn Expert,
    be: &dyn Backend,
    x: &[f32],
    params: &[Vec<f32>],
    offsets: &[usize],
    d: usize,
    cache: Option<&mut ExpertCache>,
) -> ecdit_engine::Result<Vec<f32>> {
    let p = param_tensors(expert, be, params, d);
    let xt = up(be, x);
    let mut out = be.zeros(&[x.len()], DType::F32)?;
    let keep = cache.is_some();
    let mut scratch = ExpertCache::default();
    let cache = cache.unwrap_or(&mut scratch);
    expert.forward(be, out.view_mut(), cache, keep, xt.view(), &views(&p), offsets, d)?;
    Ok(read(be, &out))
}

/// A backward on host data: dx and the parameter gradients accumulated onto `seed`.
#[allow(clippy::too_many_arguments)]
fn backward(
    expert: &dyn Expert,
    be: &dyn Backend,
    dout: &[f32],
    cache: &ExpertCache,
    x: &[f32],
    params: &[Vec<f32>],
    offsets: &[usize],
    d: usize,
    seed: &[Vec<f32>],
) -> ecdit_engine::Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let p = param_tensors(expert, be, params, d);
    let mut dp = param_tensors(expert, be, seed, d);
    let (xt, doutt) = (up(be, x), up(be, dout));
    let mut dx = be.zeros(&[x.len()], DType::F32)?;
    {
        let mut dpv: Vec<_> = dp.iter_mut().map(|t| t.view_mut()).collect();
        expert.backward(
            be,
            dx.view_mut(),
            &mut dpv,
            doutt.view(),
            cache,
            xt.view(),
            &views(&p),
            offsets,
            d,
        )?;
    }
    Ok((read(be, &dx), dp.iter().map(|t| read(be, t)).collect()))
}

fn zeros_like(params: &[Vec<f32>]) -> Vec<Vec<f32>> {
    params.iter().map(|p| vec![0.0; p.len()]).collect()
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
        let (out, _) = forward(expert.as_ref(), &be, &x, &params, &offsets, d);
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
    let (out, _) = forward(expert, be, x, params, offsets, d);
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

        let (_, cache) = forward(expert, &be, &x, &params, &offsets, d);
        // dparams start non-zero: backward must accumulate into them.
        let seed: Vec<Vec<f32>> = params.iter().map(|p| vec![0.25; p.len()]).collect();
        let (dx, dparams) = backward(expert, &be, &r, &cache, &x, &params, &offsets, d, &seed).expect("backward");

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
            let (out, cache) = forward(expert, &be, &x, &params, &offsets, d);
            let (dx, dparams) = backward(expert, &be, &dout, &cache, &x, &params, &offsets, d, &zeros_like(&params)).expect("backward");
            for e in 0..e_count {
                let (r0, r1) = (offsets[e], offsets[e + 1]);
                let per: Vec<usize> = params.iter().map(|p| p.len() / e_count).collect();
                let own: Vec<Vec<f32>> = params.iter().zip(&per).map(|(p, &k)| p[e * k..(e + 1) * k].to_vec()).collect();
                let one = [0, r1 - r0];
                let x1 = &x[r0 * d..r1 * d];
                let (out1, cache1) = forward(expert, &be, x1, &own, &one, d);
                let (dx1, dp1) = backward(expert, &be, &dout[r0 * d..r1 * d], &cache1, x1, &own, &one, d, &zeros_like(&own)).expect("backward");
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
    // Stored input-major on disk already (docs/WEIGHTS.md): held as stored;
    // matrices start xavier-uniform per expert, biases at zero.
    let layouts: Vec<(Layout, Init)> = gelu
        .param_shapes(4, 3)
        .into_iter()
        .map(|p| (p.layout, p.init))
        .collect();
    let xavier = Init::XavierUniform { fan_in: 4, fan_out: 16 };
    let back = Init::XavierUniform { fan_in: 16, fan_out: 4 };
    assert_eq!(
        layouts,
        [
            (Layout::AsStored, xavier),
            (Layout::AsStored, Init::Zeros),
            (Layout::AsStored, back),
            (Layout::AsStored, Init::Zeros)
        ]
    );
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
        let run = |offsets: &[usize], params: &[Vec<f32>]| {
            let mut cache = ExpertCache::default();
            forward_with(expert, &be, &x, params, offsets, d, Some(&mut cache))
                .unwrap_err()
                .to_string()
        };
        // offsets end past the rows of x
        let err = run(&[0, 2, 6], &params);
        assert!(err.contains("x"), "{err}");
        // offsets not monotone
        let err = run(&[0, 4, 3], &params);
        assert!(err.contains("offsets"), "{err}");
        // parameters for 3 experts with offsets for 2
        let p3 = random_params(expert, d, 3, &mut rng);
        let err = run(&[0, 2, 5], &p3);
        assert!(err.contains("params[0]"), "{err}");
        // backward without a training forward: an inference forward keeps nothing
        let mut cache = ExpertCache::default();
        forward_with(expert, &be, &x, &params, &[0, 2, 5], d, None).expect("inference forward");
        let err = backward(
            expert,
            &be,
            &x,
            &cache,
            &x,
            &params,
            &[0, 2, 5],
            d,
            &zeros_like(&params),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache"), "{err}");
        // a cache from another dispatch
        forward_with(expert, &be, &x[..3 * d], &params, &[0, 1, 3], d, Some(&mut cache)).expect("forward");
        let err = backward(
            expert,
            &be,
            &x,
            &cache,
            &x,
            &params,
            &[0, 2, 5],
            d,
            &zeros_like(&params),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache"), "{err}");
    }
}

#[test]
fn inference_keeps_nothing_and_equals_training_bit_for_bit() {
    let be = backend();
    let mut rng = StdRng::seed_from_u64(31);
    let d = 8;
    // Several slices (4100 rows exceed one), an empty expert, and a reused cache.
    let offsets = [0, 4100, 4100, 4700, 4703];
    for expert in experts_under_test() {
        let expert = expert.as_ref();
        let params = random_params(expert, d, 4, &mut rng);
        let x = random(&mut rng, 4703 * d, 1.0);
        let (train, _) = forward(expert, &be, &x, &params, &offsets, d);
        let infer = forward_with(expert, &be, &x, &params, &offsets, d, None).expect("inference forward");
        assert!(train == infer, "{}: inference differs from training", expert.kind());
        // A cache refilled by a second, smaller forward holds that forward only.
        let mut cache = ExpertCache::default();
        forward_with(expert, &be, &x, &params, &offsets, d, Some(&mut cache)).expect("forward");
        let small = [0, 3, 3, 5, 6];
        let again = forward_with(expert, &be, &x[..6 * d], &params, &small, d, Some(&mut cache)).expect("forward");
        let (fresh, fresh_cache) = forward(expert, &be, &x[..6 * d], &params, &small, d);
        assert_eq!(again, fresh);
        let h = expert.hidden(d);
        assert!(cache.tensors.iter().all(|t| t.numel() == 6 * h));
        assert_eq!(cache.tensors.len(), fresh_cache.tensors.len());
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
        let (out, _) = forward(expert.as_ref(), &be, &x, &params, &offsets, d);
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
            let expert = expert.as_ref();
            let (_, cache) = forward(expert, &be, x, &params, offsets, d);
            backward(expert, &be, dout, &cache, x, &params, offsets, d, &zeros_like(&params))
                .expect("backward")
                .0
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
            let expert = expert.as_ref();
            let (out, cache) = forward(expert, be, &x, &params, &offsets, d);
            let (dx, dparams) = backward(
                expert,
                be,
                &dout,
                &cache,
                &x,
                &params,
                &offsets,
                d,
                &zeros_like(&params),
            )
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

#[test]
fn a_forward_over_gathered_rows_equals_the_forward_of_the_gathered_rows() {
    // f32 on one thread (the gather apart) and bf16 on two (each expert's
    // rows gathered in its task where oneDNN runs the products).
    let mut rng = StdRng::seed_from_u64(41);
    let (d, tokens) = (32, 200);
    let offsets = [0, 96, 96, 250, 330];
    let n = offsets[4];
    let rows: Vec<u32> = (0..n).map(|_| rng.gen_range(0..tokens as u32)).collect();
    let x = random(&mut rng, tokens * d, 1.0);
    let gathered: Vec<f32> = rows.iter().flat_map(|&r| x[r as usize * d..][..d].to_vec()).collect();
    for (be, dtype) in [
        (backend(), DType::F32),
        (CpuBackend::new(2).expect("backend"), DType::BF16),
    ] {
        for expert in experts_under_test() {
            let expert = expert.as_ref();
            let params = random_params(expert, d, 4, &mut rng);
            let p: Vec<Tensor> = expert
                .param_shapes(d, 4)
                .iter()
                .zip(&params)
                .map(|(s, v)| be.upload_f32(&s.shape, v, dtype).expect("param"))
                .collect();
            let (xt, xs) = (
                be.upload_f32(&[tokens, d], &x, dtype).expect("x"),
                be.upload_f32(&[n, d], &gathered, dtype).expect("xs"),
            );
            let idx = be.upload_u32(&[n], &rows).expect("rows");
            let mut cache = ExpertCache::default();
            let mut fused = be.zeros(&[n, d], dtype).expect("out");
            let took = expert
                .forward_gathered(
                    &be,
                    fused.view_mut(),
                    &mut cache,
                    xt.view(),
                    idx.view(),
                    &views(&p),
                    &offsets,
                    d,
                )
                .expect("gathered forward");
            assert_eq!(
                took,
                expert.kind() == GeluMlp::KIND,
                "{} reads gathered rows",
                expert.kind()
            );
            if !took {
                continue;
            }
            let mut apart = be.zeros(&[n, d], dtype).expect("out");
            expert
                .forward(
                    &be,
                    apart.view_mut(),
                    &mut cache,
                    false,
                    xs.view(),
                    &views(&p),
                    &offsets,
                    d,
                )
                .expect("forward");
            assert!(
                read(&be, &fused) == read(&be, &apart),
                "{} {dtype}: bits differ",
                expert.kind()
            );
            // A row index past the tokens is an error, not a panic.
            let bad = be.upload_u32(&[n], &vec![tokens as u32; n]).expect("rows");
            let e = expert
                .forward_gathered(
                    &be,
                    fused.view_mut(),
                    &mut cache,
                    xt.view(),
                    bad.view(),
                    &views(&p),
                    &offsets,
                    d,
                )
                .expect_err("bad rows");
            assert!(e.to_string().contains("row index"), "{e}");
        }
    }
}
