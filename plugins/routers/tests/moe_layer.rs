//! The MoE layer (`ecdit_engine::MoeLayer`) with the shipped routers and
//! experts on the CPU backend: whole-layer gradients against finite
//! differences, the dense router as a plain MLP, unrouted tokens, per-sample
//! routing independence, cache reuse, and errors on bad input.
//!
//! These live here rather than in `engine/tests` because they need the
//! router, expert and backend crates, which depend on the engine.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::counting::CountingBackend;
use ecdit_engine::{
    Backend, BackendExt, DType, Layout, MoeCache, MoeLayer, Params, Registry, RouteShape, Routing, Tensor,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;

fn backend() -> CpuBackend {
    CpuBackend::new(1).expect("a one-thread CPU backend")
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    ecdit_routers::register(&mut registry).expect("register routers and experts");
    registry
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn read(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    be.read_f32(t.view()).expect("download")
}

/// A layer with random weights (biases too, so their gradients are exercised)
/// and router weights scaled up so the top-C choices have clear margins.
fn layer(
    be: &dyn Backend,
    registry: &Registry,
    router: &Value,
    expert: &Value,
    d: usize,
    experts: usize,
    seed: u64,
) -> MoeLayer {
    let mut rng = StdRng::seed_from_u64(seed);
    let router = registry.router(router).expect("router spec");
    let expert = registry.expert(expert).expect("expert spec");
    let mut layer = MoeLayer::new_random(router, expert, d, experts, be, DType::F32, "", &mut rng).expect("layer");
    let w: Vec<f32> = read(be, &layer.w_router.tensor).iter().map(|w| w * 3.0).collect();
    be.write_f32(layer.w_router.tensor.view_mut(), &w).expect("upload");
    for p in &mut layer.params {
        if p.shape.len() == 2 {
            let data = random(&mut rng, p.numel(), 0.3);
            p.load(be, &data).expect("load bias");
        }
    }
    layer
}

fn shape(samples: usize, tokens_per_sample: usize, experts: usize) -> RouteShape {
    RouteShape {
        samples,
        tokens_per_sample,
        experts,
    }
}

/// A training forward on host data: the output, the cache, and the routing on the host.
fn forward(
    l: &MoeLayer,
    be: &dyn Backend,
    x: &[f32],
    s: RouteShape,
) -> ecdit_engine::Result<(Vec<f32>, MoeCache, Routing)> {
    let xt = be.upload_f32(&[x.len()], x, DType::F32)?;
    let mut out = be.zeros(&[s.tokens() * l.d], DType::F32)?;
    let mut cache = MoeCache::default();
    let routing = l.forward(be, out.view_mut(), &mut cache, true, xt.view(), s)?;
    let routing = routing.to_host(be)?;
    Ok((read(be, &out), cache, routing))
}

/// Gradients on the host: dx, dW_r in its memory layout [d, E], and the
/// expert parameters' in theirs.
struct HostGrads {
    dx: Vec<f32>,
    dw_router: Vec<f32>,
    dparams: Vec<Vec<f32>>,
}

fn backward(
    l: &MoeLayer,
    be: &dyn Backend,
    cache: &MoeCache,
    x: &[f32],
    dout: &[f32],
    grad_aux: f32,
) -> ecdit_engine::Result<HostGrads> {
    let (xt, doutt) = (
        be.upload_f32(&[x.len()], x, DType::F32)?,
        be.upload_f32(&[dout.len()], dout, DType::F32)?,
    );
    let mut dx = be.zeros(&[x.len()], DType::F32)?;
    let mut grads = l.zero_grads(be)?;
    l.backward(be, dx.view_mut(), &mut grads, cache, xt.view(), doutt.view(), grad_aux)?;
    Ok(HostGrads {
        dx: read(be, &dx),
        dw_router: read(be, &grads.dw_router),
        dparams: grads.dparams.iter().map(|t| read(be, t)).collect(),
    })
}

/// The discrete choice of a dispatch: tokens and expert offsets. Tokens
/// alone are not enough: a token moving between adjacent experts (the last
/// slot of expert e becoming the first of e + 1) leaves the token list as it was.
type Selection = (Vec<u32>, Vec<usize>);

/// `L = sum(out * r) + grad_aux * aux_loss` in f64, and the selection that
/// produced it (to notice a perturbation that changed the discrete choice).
fn loss(layer: &MoeLayer, be: &dyn Backend, x: &[f32], s: RouteShape, r: &[f32], grad_aux: f32) -> (f64, Selection) {
    let (out, _, routing) = forward(layer, be, x, s).expect("forward");
    let main: f64 = out.iter().zip(r).map(|(&o, &r)| o as f64 * r as f64).sum();
    let aux = routing.aux_loss.unwrap_or(0.0) as f64;
    let dispatch = routing.dispatch;
    (main + grad_aux as f64 * aux, (dispatch.tokens, dispatch.offsets))
}

/// Sets element `i` of a tensor (a read and a write: test code only).
fn poke(be: &dyn Backend, t: &mut Tensor, i: usize, v: f32) {
    let mut data = read(be, t);
    data[i] = v;
    be.write_f32(t.view_mut(), &data).expect("upload");
}

/// Checks dx, dW_r and every expert parameter gradient by central differences.
fn check_layer_gradients(router: Value, grad_aux: f32) {
    let registry = registry();
    let (d, e_count, samples, tps) = (6, 4, 2, 8);
    let s = shape(samples, tps, e_count);
    let be = backend();
    let mut layer = layer(
        &be,
        &registry,
        &router,
        &json!({"kind": "gelu-mlp", "mlp_ratio": 2.0}),
        d,
        e_count,
        7,
    );
    let mut rng = StdRng::seed_from_u64(8);
    let mut x = random(&mut rng, samples * tps * d, 1.0);
    let r = random(&mut rng, samples * tps * d, 1.0);

    let (_, cache, routing) = forward(&layer, &be, &x, s).expect("forward");
    let base: Selection = (routing.dispatch.tokens.clone(), routing.dispatch.offsets.clone());
    let grads = backward(&layer, &be, &cache, &x, &r, grad_aux).expect("backward");

    let eps = 1e-3f32;
    let (mut checked, mut skipped) = (0usize, 0usize);
    let mut check = |what: String, analytic: f32, up: (f64, Selection), down: (f64, Selection)| {
        if up.1 != base || down.1 != base {
            skipped += 1; // the perturbation moved a token across a top-C boundary
            return;
        }
        checked += 1;
        let numeric = (up.0 - down.0) / (2.0 * eps as f64);
        let tol = 5e-3 + 1e-2 * numeric.abs();
        assert!(
            (analytic as f64 - numeric).abs() < tol,
            "{router}: {what}: analytic {analytic}, numeric {numeric}"
        );
    };
    for i in 0..x.len() {
        let keep = x[i];
        x[i] = keep + eps;
        let up = loss(&layer, &be, &x, s, &r, grad_aux);
        x[i] = keep - eps;
        let down = loss(&layer, &be, &x, s, &r, grad_aux);
        x[i] = keep;
        check(format!("dx[{i}]"), grads.dx[i], up, down);
    }
    // Every parameter, router first, by its memory index.
    let count = {
        let mut all = Vec::new();
        layer.collect(&mut all);
        all.len()
    };
    for p in 0..count {
        let values = {
            let mut all = Vec::new();
            layer.collect(&mut all);
            read(&be, &all[p].tensor)
        };
        let analytic = if p == 0 {
            &grads.dw_router
        } else {
            &grads.dparams[p - 1]
        };
        for (i, &keep) in values.iter().enumerate() {
            let set = |layer: &mut MoeLayer, v: f32| {
                let mut all = Vec::new();
                layer.collect_mut(&mut all);
                poke(&be, &mut all[p].tensor, i, v);
            };
            set(&mut layer, keep + eps);
            let up = loss(&layer, &be, &x, s, &r, grad_aux);
            set(&mut layer, keep - eps);
            let down = loss(&layer, &be, &x, s, &r, grad_aux);
            set(&mut layer, keep);
            let what = if p == 0 {
                format!("dw_router[{i}]")
            } else {
                format!("dparams[{}][{i}]", p - 1)
            };
            check(what, analytic[i], up, down);
        }
    }
    assert!(
        skipped * 20 < checked,
        "{router}: {skipped} of {} coordinates changed the routing",
        checked + skipped
    );
    // The router path is live: the score gradient reaches W_r.
    assert!(
        grads.dw_router.iter().any(|g| g.abs() > 1e-3),
        "{router}: dW_r is all zero"
    );
}

#[test]
fn layer_gradients_match_finite_differences_expert_choice() {
    check_layer_gradients(json!({"kind": "expert-choice", "capacity_factor": 2.0}), 0.0);
}

#[test]
fn layer_gradients_match_finite_differences_token_choice_with_aux_loss() {
    check_layer_gradients(
        json!({"kind": "token-choice", "k": 2, "aux_loss_coef": 1.0, "renormalize": true}),
        0.7,
    );
}

#[test]
fn layer_gradients_match_finite_differences_expert_race() {
    check_layer_gradients(json!({"kind": "expert-race", "k": 2.0, "score_fn": "softmax"}), 0.0);
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

#[test]
fn dense_router_with_one_expert_is_a_plain_gelu_mlp() {
    let registry = registry();
    let (d, tokens) = (5, 7);
    let be = backend();
    let l = layer(
        &be,
        &registry,
        &json!("dense"),
        &json!({"kind": "gelu-mlp", "mlp_ratio": 3.0}),
        d,
        1,
        3,
    );
    let h = 15;
    let mut rng = StdRng::seed_from_u64(4);
    let x = random(&mut rng, tokens * d, 1.0);
    let (out, _, routing) = forward(&l, &be, &x, shape(1, tokens, 1)).expect("forward");
    let params: Vec<Vec<f32>> = l.params.iter().map(|p| read(&be, &p.tensor)).collect();
    let [w1, b1, w2, b2] = [0, 1, 2, 3].map(|i| &params[i]);
    for t in 0..tokens {
        let act: Vec<f64> = (0..h)
            .map(|j| {
                let pre: f64 = (0..d).map(|i| w1[i * h + j] as f64 * x[t * d + i] as f64).sum::<f64>() + b1[j] as f64;
                gelu_tanh(pre)
            })
            .collect();
        for o in 0..d {
            let want: f64 = (0..h).map(|j| w2[j * d + o] as f64 * act[j]).sum::<f64>() + b2[o] as f64;
            let got = out[t * d + o] as f64;
            assert!((got - want).abs() < 1e-5, "out[{t}, {o}] = {got}, want {want}");
        }
    }
    assert_eq!(routing.stats.unrouted_fraction, 0.0);
    assert_eq!(routing.stats.max_experts_per_token, 1);
}

#[test]
fn a_token_no_expert_chose_gets_exactly_zero() {
    let registry = registry();
    let (d, e_count, tps) = (4, 2, 8);
    // C = round(0.5 * 8 / 2) = 2 per expert: at most 4 of 8 tokens are chosen.
    let router = json!({"kind": "expert-choice", "capacity_factor": 0.5});
    let be = backend();
    let l = layer(&be, &registry, &router, &json!("gelu-mlp"), d, e_count, 5);
    let mut rng = StdRng::seed_from_u64(6);
    let x = random(&mut rng, tps * d, 1.0);
    let (out, cache, routing) = forward(&l, &be, &x, shape(1, tps, e_count)).expect("forward");
    let ys = read(&be, cache.ys.as_ref().expect("cached ys"));
    let dispatch = &routing.dispatch;
    assert_eq!(dispatch.offsets, vec![0, 2, 4]);
    let mut chosen = vec![false; tps];
    for &t in &dispatch.tokens {
        chosen[t as usize] = true;
    }
    let unrouted = chosen.iter().filter(|c| !**c).count();
    assert!(unrouted >= 4, "{unrouted} unrouted");
    assert!((routing.stats.unrouted_fraction - unrouted as f32 / tps as f32).abs() < 1e-6);
    for t in 0..tps {
        let row = &out[t * d..(t + 1) * d];
        if chosen[t] {
            assert!(row.iter().any(|&v| v != 0.0), "chosen token {t} has zero output");
        } else {
            assert!(row.iter().all(|&v| v == 0.0), "unchosen token {t} has output {row:?}");
        }
    }
    // Each chosen token's output is the gate-weighted sum of its experts' outputs.
    for (s, (&t, &g)) in dispatch.tokens.iter().zip(&dispatch.gates).enumerate() {
        let t = t as usize;
        let others: Vec<usize> = (0..dispatch.slots())
            .filter(|&o| dispatch.tokens[o] as usize == t)
            .collect();
        let want: Vec<f32> = (0..d)
            .map(|c| others.iter().map(|&o| dispatch.gates[o] * ys[o * d + c]).sum())
            .collect();
        for c in 0..d {
            assert!(
                (out[t * d + c] - want[c]).abs() < 1e-6,
                "slot {s} gate {g}: out[{t}, {c}]"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// With per-sample groups, a batch gives each sample the same output and
    /// the same input gradient as routing that sample alone.
    #[test]
    fn per_sample_routing_of_a_batch_equals_per_sample_calls(seed in 0u64..10_000, samples in 2usize..4, which in 0usize..3) {
        let registry = registry();
        let router = [
            json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"}),
            json!({"kind": "token-choice", "k": 2, "capacity_factor": 1.0, "groups": "per_sample"}),
            json!({"kind": "expert-race", "k": 2.0, "groups": "per_sample"}),
        ][which].clone();
        let (d, e_count, tps) = (8, 4, 12);
        let be = backend();
        let l = layer(&be, &registry, &router, &json!({"kind": "gelu-mlp", "mlp_ratio": 2.0}), d, e_count, seed);
        let mut rng = StdRng::seed_from_u64(seed + 1);
        let x = random(&mut rng, samples * tps * d, 1.0);
        let dout = random(&mut rng, samples * tps * d, 1.0);
        let (out, cache, _) = forward(&l, &be, &x, shape(samples, tps, e_count)).expect("batch forward");
        let grads = backward(&l, &be, &cache, &x, &dout, 0.0).expect("batch backward");
        for b in 0..samples {
            let rows = b * tps * d..(b + 1) * tps * d;
            let (out1, cache1, _) = forward(&l, &be, &x[rows.clone()], shape(1, tps, e_count)).expect("forward");
            let grads1 = backward(&l, &be, &cache1, &x[rows.clone()], &dout[rows.clone()], 0.0).expect("backward");
            for (i, (a, b1)) in out[rows.clone()].iter().zip(&out1).enumerate() {
                prop_assert!((a - b1).abs() <= 1e-6 * (1.0 + a.abs()), "{router} sample {b} out[{i}]: {a} vs {b1}");
            }
            for (i, (a, b1)) in grads.dx[rows.clone()].iter().zip(&grads1.dx).enumerate() {
                prop_assert!((a - b1).abs() <= 1e-5 * (1.0 + a.abs()), "{router} sample {b} dx[{i}]: {a} vs {b1}");
            }
        }
    }
}

#[test]
fn a_reused_cache_gives_the_same_result_as_a_fresh_one() {
    let registry = registry();
    let (d, e_count, tps) = (8, 4, 16);
    for expert in [json!("gelu-mlp"), json!("swiglu")] {
        let be = backend();
        let l = layer(&be, &registry, &json!("expert-choice"), &expert, d, e_count, 9);
        let mut rng = StdRng::seed_from_u64(10);
        let mut cache = MoeCache::default();
        // A bigger batch first, then a smaller one through the same cache.
        for samples in [3, 1, 2] {
            let x = random(&mut rng, samples * tps * d, 1.0);
            let s = shape(samples, tps, e_count);
            let xt = be.upload_f32(&[x.len()], &x, DType::F32).expect("upload");
            let mut out = be
                .upload_f32(&[x.len()], &vec![f32::NAN; x.len()], DType::F32)
                .expect("upload");
            l.forward(&be, out.view_mut(), &mut cache, true, xt.view(), s)
                .expect("forward");
            let (fresh, fresh_cache, _) = forward(&l, &be, &x, s).expect("forward");
            assert_eq!(read(&be, &out), fresh, "{expert}");
            let dout = random(&mut rng, x.len(), 1.0);
            let g1 = backward(&l, &be, &cache, &x, &dout, 0.0).expect("backward");
            let g2 = backward(&l, &be, &fresh_cache, &x, &dout, 0.0).expect("backward");
            assert_eq!(g1.dx, g2.dx, "{expert}");
            assert_eq!(g1.dw_router, g2.dw_router, "{expert}");
            assert_eq!(g1.dparams, g2.dparams, "{expert}");
        }
    }
}

#[test]
fn inference_keeps_nothing_and_equals_training() {
    let registry = registry();
    let (d, e_count, samples, tps) = (8, 4, 2, 12);
    for router in [
        json!("expert-choice"),
        json!({"kind": "token-choice", "k": 2}),
        json!("expert-race"),
    ] {
        for expert in [json!("gelu-mlp"), json!("swiglu")] {
            let be = backend();
            let l = layer(&be, &registry, &router, &expert, d, e_count, 13);
            let x = random(&mut StdRng::seed_from_u64(14), samples * tps * d, 1.0);
            let s = shape(samples, tps, e_count);
            let (train, _, train_routing) = forward(&l, &be, &x, s).expect("training forward");
            let xt = be.upload_f32(&[x.len()], &x, DType::F32).expect("upload");
            let mut out = be.zeros(&[x.len()], DType::F32).expect("alloc");
            let routing = l
                .forward(&be, out.view_mut(), &mut MoeCache::default(), false, xt.view(), s)
                .expect("inference forward");
            assert!(read(&be, &out) == train, "{router} {expert}: inference differs");
            assert_eq!(
                routing.stats(&be).expect("stats"),
                train_routing.stats,
                "{router} {expert}"
            );
        }
    }
}

/// The forward and backward of an expert-choice layer (and a dense one) run
/// on the backend: on a backend whose memory the host cannot see, they move
/// no bytes; statistics cost a download only when asked for.
#[test]
fn expert_choice_layers_route_and_train_without_transfers() {
    let registry = registry();
    let (d, samples, tps) = (8, 2, 12);
    for (router, e_count) in [(json!("expert-choice"), 4), (json!("dense"), 1)] {
        let be = CountingBackend::new(Arc::new(backend()));
        let l = layer(&be, &registry, &router, &json!("swiglu"), d, e_count, 15);
        let s = shape(samples, tps, e_count);
        let x = random(&mut StdRng::seed_from_u64(16), samples * tps * d, 1.0);
        let xt = be.upload_f32(&[x.len()], &x, DType::F32).expect("upload");
        let dout = be.upload_f32(&[x.len()], &x, DType::F32).expect("upload");
        let mut out = be.zeros(&[x.len()], DType::F32).expect("alloc");
        let mut dx = be.zeros(&[x.len()], DType::F32).expect("alloc");
        let mut grads = l.zero_grads(&be).expect("grads");
        let mut cache = MoeCache::default();
        be.reset();
        l.forward(&be, out.view_mut(), &mut MoeCache::default(), false, xt.view(), s)
            .expect("inference forward");
        let routing = l
            .forward(&be, out.view_mut(), &mut cache, true, xt.view(), s)
            .expect("forward");
        l.backward(&be, dx.view_mut(), &mut grads, &cache, xt.view(), dout.view(), 0.0)
            .expect("backward");
        assert_eq!(be.transfers(), Default::default(), "{router}");
        // The same numbers as on the plain CPU backend.
        let cpu = backend();
        let lc = layer(&cpu, &registry, &router, &json!("swiglu"), d, e_count, 15);
        let (want, cache_c, want_routing) = forward(&lc, &cpu, &x, s).expect("forward");
        assert!(read(&be, &out) == want, "{router}");
        let stats = routing.stats(&be).expect("stats");
        assert!(be.transfers().downloads > 0);
        assert_eq!(stats, want_routing.stats, "{router}");
        let g = backward(&lc, &cpu, &cache_c, &x, &x, 0.0).expect("backward");
        assert!(read(&be, &dx) == g.dx, "{router}");
        assert!(read(&be, &grads.dw_router) == g.dw_router, "{router}");
    }
}

#[test]
fn parameters_are_named_laid_out_and_drawn_as_before() {
    let registry = registry();
    let be = backend();
    let (d, e_count) = (4, 3);
    let router = registry.router(&json!("expert-choice")).expect("router");
    let expert = registry.expert(&json!("gelu-mlp")).expect("expert");
    let mut rng = StdRng::seed_from_u64(17);
    let l = MoeLayer::new_random(router, expert, d, e_count, &be, DType::F32, "blocks.1.moe", &mut rng).expect("layer");
    let mut all = Vec::new();
    l.collect(&mut all);
    let listed: Vec<(&str, Vec<usize>, Layout)> = all
        .iter()
        .map(|p| (p.name.as_str(), p.shape.clone(), p.layout))
        .collect();
    assert_eq!(
        listed,
        [
            ("blocks.1.moe.router.weight", vec![3, 4], Layout::InputMajor),
            ("blocks.1.moe.experts.fc1.weight", vec![3, 4, 16], Layout::AsStored),
            ("blocks.1.moe.experts.fc1.bias", vec![3, 16], Layout::AsStored),
            ("blocks.1.moe.experts.fc2.weight", vec![3, 16, 4], Layout::AsStored),
            ("blocks.1.moe.experts.fc2.bias", vec![3, 4], Layout::AsStored),
        ]
    );
    assert_eq!(l.w_router.memory_shape(), vec![d, e_count]);
    // The draws of the pre-v2 layer: the router [d, E] in memory order, then
    // each expert matrix in order (xavier-uniform), biases zero.
    let mut rng = StdRng::seed_from_u64(17);
    let mut xavier = |n: usize, fan_in: usize, fan_out: usize| -> Vec<f32> {
        let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
        (0..n).map(|_| rng.gen_range(-a..=a)).collect()
    };
    let want = [
        xavier(d * e_count, d, e_count),
        xavier(e_count * d * 16, 16, d),
        vec![0.0; e_count * 16],
        xavier(e_count * 16 * d, d, 16),
        vec![0.0; e_count * d],
    ];
    for (p, want) in all.iter().zip(&want) {
        assert!(&read(&be, &p.tensor) == want, "{}", p.name);
    }
}

#[test]
fn bad_shapes_are_errors_naming_what_is_wrong() {
    let registry = registry();
    let be = backend();
    let (d, e_count) = (4, 2);
    let l = layer(
        &be,
        &registry,
        &json!("expert-choice"),
        &json!("gelu-mlp"),
        d,
        e_count,
        11,
    );
    let x = vec![0.5; 3 * 4 * d];
    let err = forward(&l, &be, &x, shape(3, 4, 3)).expect_err("3 experts").to_string();
    assert!(err.contains("experts"), "{err}");
    let err = forward(&l, &be, &x[1..], shape(3, 4, 2))
        .expect_err("short x")
        .to_string();
    assert!(err.contains("x"), "{err}");
    let err = backward(&l, &be, &MoeCache::default(), &x, &x, 0.0)
        .err()
        .expect("no forward")
        .to_string();
    assert!(err.contains("no forward"), "{err}");

    // Gradients of another layer's shape.
    let (_, cache, _) = forward(&l, &be, &x, shape(3, 4, 2)).expect("forward");
    let other = layer(
        &be,
        &registry,
        &json!("expert-choice"),
        &json!("swiglu"),
        d,
        e_count,
        11,
    );
    let mut grads = other.zero_grads(&be).expect("grads");
    let (xt, mut dx) = (
        be.upload_f32(&[x.len()], &x, DType::F32).expect("upload"),
        be.zeros(&[x.len()], DType::F32).expect("alloc"),
    );
    let err = l
        .backward(&be, dx.view_mut(), &mut grads, &cache, xt.view(), xt.view(), 0.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dparams"), "{err}");

    let router = registry.router(&json!("expert-choice")).expect("router");
    let expert = registry.expert(&json!("gelu-mlp")).expect("expert");
    let err = MoeLayer::new(router, expert, 0, e_count, &be, DType::F32, "")
        .err()
        .expect("d = 0")
        .to_string();
    assert!(err.contains("d = 0"), "{err}");
}
