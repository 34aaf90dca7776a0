//! The MoE layer (`ecdit_engine::MoeLayer`) with the shipped routers and
//! experts on the CPU backend: whole-layer gradients against finite
//! differences, the dense router as a plain MLP, unrouted tokens, per-sample
//! routing independence, cache reuse, and errors on bad input.
//!
//! These live here rather than in `engine/tests` because they need the
//! router, expert and backend crates, which depend on the engine.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{HostTensor, MoeCache, MoeLayer, Registry, RouteShape};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

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

/// A layer with random weights (biases too, so their gradients are exercised)
/// and router weights scaled up so the top-C choices have clear margins.
fn layer(registry: &Registry, router: &Value, expert: &Value, d: usize, experts: usize, seed: u64) -> MoeLayer {
    let mut rng = StdRng::seed_from_u64(seed);
    let router = registry.router(router).expect("router spec");
    let expert = registry.expert(expert).expect("expert spec");
    let mut layer = MoeLayer::new_random(router, expert, d, experts, &mut rng).expect("layer");
    for w in &mut layer.w_router.data {
        *w *= 3.0;
    }
    for p in &mut layer.params {
        if p.shape.len() == 2 {
            p.data = random(&mut rng, p.data.len(), 0.3);
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

/// The discrete choice of a dispatch: tokens and expert offsets. Tokens
/// alone are not enough: a token moving between adjacent experts (the last
/// slot of expert e becoming the first of e + 1) leaves the token list as it was.
type Selection = (Vec<u32>, Vec<usize>);

/// `L = sum(out * r) + grad_aux * aux_loss` in f64, and the selection that
/// produced it (to notice a perturbation that changed the discrete choice).
fn loss(layer: &MoeLayer, x: &[f32], s: RouteShape, r: &[f32], grad_aux: f32) -> (f64, Selection) {
    let (out, cache) = layer.forward(&backend(), x, s).expect("forward");
    let main: f64 = out.iter().zip(r).map(|(&o, &r)| o as f64 * r as f64).sum();
    let aux = cache.routing.aux_loss.unwrap_or(0.0) as f64;
    let dispatch = cache.routing.dispatch;
    (main + grad_aux as f64 * aux, (dispatch.tokens, dispatch.offsets))
}

/// Checks dx, dW_r and every expert parameter gradient by central differences.
fn check_layer_gradients(router: Value, grad_aux: f32) {
    let registry = registry();
    let (d, e_count, samples, tps) = (6, 4, 2, 8);
    let s = shape(samples, tps, e_count);
    let mut layer = layer(
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

    let be = backend();
    let (_, cache) = layer.forward(&be, &x, s).expect("forward");
    let base: Selection = (
        cache.routing.dispatch.tokens.clone(),
        cache.routing.dispatch.offsets.clone(),
    );
    let grads = layer.backward(&be, &cache, &x, &r, grad_aux).expect("backward");

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
        let up = loss(&layer, &x, s, &r, grad_aux);
        x[i] = keep - eps;
        let down = loss(&layer, &x, s, &r, grad_aux);
        x[i] = keep;
        check(format!("dx[{i}]"), grads.dx[i], up, down);
    }
    for i in 0..layer.w_router.data.len() {
        let keep = layer.w_router.data[i];
        layer.w_router.data[i] = keep + eps;
        let up = loss(&layer, &x, s, &r, grad_aux);
        layer.w_router.data[i] = keep - eps;
        let down = loss(&layer, &x, s, &r, grad_aux);
        layer.w_router.data[i] = keep;
        check(format!("dw_router[{i}]"), grads.dw_router[i], up, down);
    }
    for p in 0..layer.params.len() {
        for i in 0..layer.params[p].data.len() {
            let keep = layer.params[p].data[i];
            layer.params[p].data[i] = keep + eps;
            let up = loss(&layer, &x, s, &r, grad_aux);
            layer.params[p].data[i] = keep - eps;
            let down = loss(&layer, &x, s, &r, grad_aux);
            layer.params[p].data[i] = keep;
            check(format!("dparams[{p}][{i}]"), grads.dparams[p].data[i], up, down);
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
    let l = layer(
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
    let (out, cache) = l.forward(&backend(), &x, shape(1, tokens, 1)).expect("forward");
    let [w1, b1, w2, b2] = [0, 1, 2, 3].map(|i| &l.params[i].data);
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
    assert_eq!(cache.routing.stats.unrouted_fraction, 0.0);
    assert_eq!(cache.routing.stats.max_experts_per_token, 1);
}

#[test]
fn a_token_no_expert_chose_gets_exactly_zero() {
    let registry = registry();
    let (d, e_count, tps) = (4, 2, 8);
    // C = round(0.5 * 8 / 2) = 2 per expert: at most 4 of 8 tokens are chosen.
    let router = json!({"kind": "expert-choice", "capacity_factor": 0.5});
    let l = layer(&registry, &router, &json!("gelu-mlp"), d, e_count, 5);
    let mut rng = StdRng::seed_from_u64(6);
    let x = random(&mut rng, tps * d, 1.0);
    let (out, cache) = l.forward(&backend(), &x, shape(1, tps, e_count)).expect("forward");
    let dispatch = &cache.routing.dispatch;
    assert_eq!(dispatch.offsets, vec![0, 2, 4]);
    let mut chosen = vec![false; tps];
    for &t in &dispatch.tokens {
        chosen[t as usize] = true;
    }
    let unrouted = chosen.iter().filter(|c| !**c).count();
    assert!(unrouted >= 4, "{unrouted} unrouted");
    assert!((cache.routing.stats.unrouted_fraction - unrouted as f32 / tps as f32).abs() < 1e-6);
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
            .map(|c| others.iter().map(|&o| dispatch.gates[o] * cache.ys[o * d + c]).sum())
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
        let l = layer(&registry, &router, &json!({"kind": "gelu-mlp", "mlp_ratio": 2.0}), d, e_count, seed);
        let mut rng = StdRng::seed_from_u64(seed + 1);
        let x = random(&mut rng, samples * tps * d, 1.0);
        let dout = random(&mut rng, samples * tps * d, 1.0);
        let be = backend();
        let (out, cache) = l.forward(&be, &x, shape(samples, tps, e_count)).expect("batch forward");
        let grads = l.backward(&be, &cache, &x, &dout, 0.0).expect("batch backward");
        for b in 0..samples {
            let rows = b * tps * d..(b + 1) * tps * d;
            let (out1, cache1) = l.forward(&be, &x[rows.clone()], shape(1, tps, e_count)).expect("forward");
            let grads1 = l.backward(&be, &cache1, &x[rows.clone()], &dout[rows.clone()], 0.0).expect("backward");
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
        let l = layer(&registry, &json!("expert-choice"), &expert, d, e_count, 9);
        let be = backend();
        let mut rng = StdRng::seed_from_u64(10);
        let mut cache = MoeCache::default();
        // A bigger batch first, then a smaller one through the same cache.
        for samples in [3, 1, 2] {
            let x = random(&mut rng, samples * tps * d, 1.0);
            let s = shape(samples, tps, e_count);
            let mut out = vec![f32::NAN; x.len()];
            l.forward_into(&be, &mut out, &mut cache, &x, s).expect("forward_into");
            let (fresh, fresh_cache) = l.forward(&be, &x, s).expect("forward");
            assert_eq!(out, fresh, "{expert}");
            let dout = random(&mut rng, x.len(), 1.0);
            let g1 = l.backward(&be, &cache, &x, &dout, 0.0).expect("backward");
            let g2 = l.backward(&be, &fresh_cache, &x, &dout, 0.0).expect("backward");
            assert_eq!(g1.dx, g2.dx, "{expert}");
            assert_eq!(g1.dw_router, g2.dw_router, "{expert}");
        }
    }
}

#[test]
fn bad_shapes_are_errors_naming_what_is_wrong() {
    let registry = registry();
    let be = backend();
    let (d, e_count) = (4, 2);
    let l = layer(&registry, &json!("expert-choice"), &json!("gelu-mlp"), d, e_count, 11);
    let x = vec![0.5; 3 * 4 * d];
    let err = l.forward(&be, &x, shape(3, 4, 3)).unwrap_err().to_string();
    assert!(err.contains("experts"), "{err}");
    let err = l.forward(&be, &x[1..], shape(3, 4, 2)).unwrap_err().to_string();
    assert!(err.contains("x"), "{err}");
    let err = l
        .backward(&be, &MoeCache::default(), &x, &x, 0.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no forward"), "{err}");

    let router = registry.router(&json!("expert-choice")).expect("router");
    let expert = registry.expert(&json!("gelu-mlp")).expect("expert");
    let mut params: Vec<HostTensor> = expert
        .param_shapes(d, e_count)
        .iter()
        .map(|p| HostTensor::zeros(&p.shape))
        .collect();
    params[2] = HostTensor::zeros(&[e_count, d, 7]);
    let err = MoeLayer::new(router, expert, d, e_count, HostTensor::zeros(&[d, e_count]), params)
        .err()
        .expect("wrong fc2 shape")
        .to_string();
    assert!(err.contains("fc2.weight") && err.contains("[2, 4, 7]"), "{err}");
}
