//! The whole model's backward against finite differences, for each router
//! kind, on a tiny text-conditioned config that exercises everything a
//! backward passes through: grouped-query self-attention, cross-attention
//! with a padding mask, the pooled-text term, adaLN, dense and MoE FFNs (the
//! token-choice balance loss included) and token masking.
//!
//! The loss is `sum(pred * R) + sum(aux losses)` for a fixed random R; the
//! analytic gradient of sampled elements of every parameter tensor and of the
//! inputs (image, text tokens, pooled text) is compared with central
//! differences of the f32 forward, the loss summed in f64. An element whose
//! perturbation changes a routing decision (a discontinuity the backward does
//! not differentiate) is skipped and counted.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, Init};
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{Backprop, BackwardOptions, Condition, Grads, Model, ModelActs, TextInput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;

const TEXT_DIM: usize = 8;
const TEXT_LEN: usize = 3;
const BATCH: usize = 2;
const EPS: f32 = 1e-2;
/// `|analytic - numeric| <= ABS + REL * |numeric|`: central differences at
/// EPS carry an O(EPS^2) curvature error and f32 rounding of ~1e-6 / EPS.
const ABS: f64 = 2e-3;
const REL: f64 = 2e-2;

fn config(router: Value) -> ModelConfig {
    // The dense router is a MoE layer of one expert.
    let experts = if router["kind"] == "dense" { 1 } else { 4 };
    serde_json::from_value(json!({
        "name": "grad-tiny", "input_size": 8, "patch_size": 2, "in_channels": 4, "learn_sigma": true,
        "hidden": 16, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_ratio": 2.0,
        "conditioning": {"text": {"text_dim": TEXT_DIM, "max_tokens": TEXT_LEN, "dropout": 0.1, "pooled": true}},
        "moe": {"experts": experts, "every": 2, "first": 1, "router": router,
                "expert": {"kind": "gelu-mlp", "mlp_ratio": 2.0}},
        "scheduler": {"kind": "rectified-flow"}
    }))
    .expect("config")
}

/// Every trainable parameter redrawn at random (none zero), as the golden files do.
fn model(router: Value) -> Model {
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(1).expect("cpu backend"));
    let mut model = Model::new(config(router), &registry, backend.clone(), 3).expect("model");
    let mut rng = StdRng::seed_from_u64(5);
    for p in model.params_mut() {
        if p.init != Init::Fixed {
            let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.4..0.4)).collect();
            p.load(backend.as_ref(), &values).expect("load");
        }
    }
    model
}

struct Inputs {
    x: Vec<f32>,
    t: Vec<f32>,
    tokens: Vec<f32>,
    mask: Vec<u8>,
    pooled: Vec<f32>,
    /// Token masking: kept token indices per sample.
    kept: Option<Vec<u32>>,
}

impl Inputs {
    fn new(model: &Model, masked: bool) -> Self {
        let c = model.config();
        let mut rng = StdRng::seed_from_u64(9);
        let mut normal = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let image = c.in_channels * c.input_size * c.input_size;
        // The second prompt is one token shorter: its last key is padding.
        let kept = masked.then(|| vec![0, 2, 3, 5, 8, 9, 12, 15, 1, 4, 6, 7, 10, 11, 13, 14]);
        Self {
            x: normal(BATCH * image),
            t: vec![0.3, 0.8],
            tokens: normal(BATCH * TEXT_LEN * TEXT_DIM),
            mask: vec![1, 1, 1, 1, 1, 0],
            pooled: normal(BATCH * TEXT_DIM),
            kept,
        }
    }

    fn text(&self) -> TextInput<'_> {
        TextInput {
            tokens: &self.tokens,
            mask: &self.mask,
            pooled: &self.pooled,
            batch: BATCH,
            len: TEXT_LEN,
            dim: TEXT_DIM,
        }
    }
}

/// Forward: the loss in f64 and every MoE layer's dispatched tokens.
fn loss(model: &Model, acts: &mut ModelActs, inp: &Inputs, r: &[f32]) -> (f64, Vec<Vec<u32>>) {
    let be = model.backend();
    let routings = model
        .forward_train(acts, &inp.x, &inp.t, Condition::Text(inp.text()), inp.kept.as_deref())
        .expect("forward");
    let pred = be.read_f32(acts.patch_prediction().unwrap()).unwrap();
    assert_eq!(pred.len(), r.len());
    let mut loss: f64 = pred.iter().zip(r).map(|(&p, &r)| p as f64 * r as f64).sum();
    let mut dispatch = Vec::new();
    for (_, routing) in &routings {
        loss += routing.aux_loss.unwrap_or(0.0) as f64;
        dispatch.push(be.read_u32(routing.tokens.view()).unwrap());
    }
    (loss, dispatch)
}

struct Report {
    checked: usize,
    skipped: usize,
    failures: Vec<String>,
}

impl Report {
    fn compare(&mut self, what: &str, analytic: f32, numeric: Option<f64>) {
        let Some(n) = numeric else {
            self.skipped += 1;
            return;
        };
        self.checked += 1;
        let a = analytic as f64;
        let within = (a - n).abs() <= ABS + REL * n.abs();
        if !within {
            self.failures.push(format!("{what}: analytic {a:.6}, numeric {n:.6}"));
        }
    }
}

/// Central difference of the loss in one element, set through `set`; None
/// when either perturbation changes a routing decision.
fn central(
    model: &mut Model,
    acts: &mut ModelActs,
    inp: &mut Inputs,
    r: &[f32],
    base: &[Vec<u32>],
    mut set: impl FnMut(&mut Model, &mut Inputs, f32),
) -> Option<f64> {
    set(model, inp, EPS);
    let (plus, d_plus) = loss(model, acts, inp, r);
    set(model, inp, -2.0 * EPS);
    let (minus, d_minus) = loss(model, acts, inp, r);
    set(model, inp, EPS);
    (d_plus == base && d_minus == base).then(|| (plus - minus) / (2.0 * EPS as f64))
}

fn check(router: Value, masked: bool) {
    let mut model = model(router.clone());
    let backend = model.backend_arc().clone();
    let be = backend.as_ref();
    let mut inp = Inputs::new(&model, masked);
    let mut acts = ModelActs::default();
    let mut rng = StdRng::seed_from_u64(17);
    // R: one weight per predicted element.
    let c = model.config();
    let kept_tokens = inp.kept.as_ref().map_or(c.tokens(), |k| k.len() / BATCH);
    let n_out = BATCH * kept_tokens * c.patch_size * c.patch_size * c.out_channels();
    let r: Vec<f32> = (0..n_out).map(|_| rng.gen_range(-1.0..1.0)).collect();

    // Analytic gradients.
    let (_, base) = loss(&model, &mut acts, &inp, &r);
    let mut grads = Grads::new(be, &model.params()).unwrap();
    let mut bp = Backprop::default();
    let shape = acts.patch_prediction().unwrap().shape().to_vec();
    let dout = be.upload_f32(&shape, &r, model.dtype()).unwrap();
    let opts = BackwardOptions {
        input_grad: true,
        grad_aux: 1.0,
    };
    model.backward(&acts, &mut bp, &mut grads, dout.view(), opts).unwrap();
    let d_x = bp.d_x_in.read(be).unwrap();
    let d_tokens = bp.d_text_tokens.read(be).unwrap();
    let d_pooled = bp.d_text_pooled.read(be).unwrap();

    let mut report = Report {
        checked: 0,
        skipped: 0,
        failures: Vec::new(),
    };
    // Three elements of every parameter tensor (memory layout, as the gradients).
    let names: Vec<String> = grads.names().to_vec();
    for name in &names {
        let g = be.read_f32(grads.get(name).unwrap()).unwrap();
        for _ in 0..3 {
            let i = rng.gen_range(0..g.len());
            let numeric = central(&mut model, &mut acts, &mut inp, &r, &base, |m, _, delta| {
                nudge_param(m, name, i, delta)
            });
            report.compare(&format!("{name}[{i}]"), g[i], numeric);
        }
    }
    // The inputs: image, text tokens (padding included: their gradient is 0), pooled text.
    for _ in 0..4 {
        let i = rng.gen_range(0..inp.x.len());
        let numeric = central(&mut model, &mut acts, &mut inp, &r, &base, |_, inp, d| inp.x[i] += d);
        report.compare(&format!("x[{i}]"), d_x[i], numeric);
    }
    for i in (0..inp.tokens.len()).step_by(5) {
        let numeric = central(&mut model, &mut acts, &mut inp, &r, &base, |_, inp, d| {
            inp.tokens[i] += d
        });
        report.compare(&format!("text tokens[{i}]"), d_tokens[i], numeric);
    }
    for i in (0..inp.pooled.len()).step_by(3) {
        let numeric = central(&mut model, &mut acts, &mut inp, &r, &base, |_, inp, d| {
            inp.pooled[i] += d
        });
        report.compare(&format!("pooled[{i}]"), d_pooled[i], numeric);
    }
    // The padded text token reaches nothing.
    let pad = (2 * TEXT_LEN - 1) * TEXT_DIM;
    assert!(
        d_tokens[pad..pad + TEXT_DIM].iter().all(|&v| v == 0.0),
        "padding has a gradient"
    );

    println!(
        "{router}: {} elements checked, {} skipped (a routing decision flipped)",
        report.checked, report.skipped
    );
    assert!(
        report.failures.is_empty(),
        "gradient mismatches:\n{}",
        report.failures.join("\n")
    );
    assert!(
        report.skipped * 10 <= report.checked,
        "too many routing flips to judge ({} of {})",
        report.skipped,
        report.checked + report.skipped
    );
}

/// Adds `delta` to element `i` (memory layout) of the parameter `name`.
fn nudge_param(model: &mut Model, name: &str, i: usize, delta: f32) {
    let backend: Arc<dyn Backend> = model.backend_arc().clone();
    let be = backend.as_ref();
    let p = model.params_mut().into_iter().find(|p| p.name == name).unwrap();
    let mut values = be.read_f32(p.tensor.view()).unwrap();
    values[i] += delta;
    be.write_f32(p.tensor.view_mut(), &values).unwrap();
}

#[test]
fn expert_choice_gradients_match_finite_differences() {
    check(
        json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"}),
        false,
    );
}

#[test]
fn expert_choice_with_token_masking_gradients_match_finite_differences() {
    check(
        json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"}),
        true,
    );
}

#[test]
fn token_choice_with_balance_loss_gradients_match_finite_differences() {
    check(
        json!({"kind": "token-choice", "k": 2, "aux_loss_coef": 0.5, "capacity_factor": 1.5}),
        false,
    );
}

#[test]
fn expert_race_gradients_match_finite_differences() {
    check(json!({"kind": "expert-race", "k": 2.0, "score_fn": "softmax"}), false);
}

#[test]
fn dense_router_gradients_match_finite_differences() {
    check(json!({"kind": "dense"}), false);
}
