//! Golden conformance against upstream DiT (tests/data/dit_tiny.safetensors,
//! computed by facebookresearch/DiT; see tests/data/README.md), in the style of
//! llm.c's test_gpt2.c: load the reference inputs, run, and check every output
//! and intermediate by name with one `check_tensor` helper.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::DType;
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{
    config_from_metadata, Act, Backprop, BackwardOptions, CfgChannels, CfgOptions, Condition, ForwardOptions, Grads,
    Model, ModelActs,
};
use ecdit_model::weights::Weights;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::path::PathBuf;
use std::sync::Arc;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

/// Checks `got` against `want` elementwise within `1e-4 + 1e-4 * |want|`;
/// prints the max abs difference and the first mismatches. Returns pass.
fn check_tensor(name: &str, got: &[f32], want: &[f32]) -> bool {
    if got.len() != want.len() {
        println!("{name}: length {} vs expected {}  FAIL", got.len(), want.len());
        return false;
    }
    let mut max_diff = 0.0f32;
    let mut bad = Vec::new();
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let diff = (a - b).abs();
        max_diff = max_diff.max(diff);
        // NaN fails too.
        if diff.is_nan() || diff > 1e-4 + 1e-4 * b.abs() {
            bad.push((i, a, b));
        }
    }
    let ok = bad.is_empty();
    println!(
        "{name:<28} max |diff| {max_diff:.3e}  {}",
        if ok { "ok" } else { "FAIL" }
    );
    for (i, a, b) in bad.iter().take(5) {
        println!("    [{i}] got {a} expected {b}");
    }
    if bad.len() > 5 {
        println!("    ... {} mismatches in all", bad.len());
    }
    ok
}

struct Golden {
    weights: Weights,
    model: Model,
}

fn load() -> Golden {
    let weights = Weights::open(data("dit_tiny.safetensors")).expect("open golden file");
    let text = std::fs::read_to_string(repo_file("configs/dit/dit-tiny-2.json")).expect("read config");
    let config: ModelConfig = serde_json::from_str(&text).expect("parse configs/dit/dit-tiny-2.json");
    // The file's own (upstream) config describes the same model.
    let upstream = config_from_metadata(&weights).expect("config in metadata");
    assert_eq!(
        upstream, config,
        "configs/dit/dit-tiny-2.json disagrees with the golden file's metadata"
    );
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(2).expect("cpu backend"));
    let model = Model::from_weights(config, &registry, backend, &weights, &["golden."]).expect("load weights");
    Golden { weights, model }
}

impl Golden {
    fn f32(&self, name: &str) -> Vec<f32> {
        let shape = self.weights.shape(name).unwrap_or_else(|| panic!("{name} missing"));
        self.weights.get(name, &shape).expect(name)
    }

    /// Class ids stored as I64.
    fn labels(&self, name: &str) -> Vec<u32> {
        let bytes = std::fs::read(self.weights.path()).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("parse");
        let view = st.tensor(name).expect(name);
        assert_eq!(view.dtype(), Dtype::I64);
        view.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    }
}

/// The intermediates the golden file holds, as this model's activations.
/// (`patch_embed` is compared as block 0's input, `patch_embed + pos_embed`.)
fn intermediates(acts: &ModelActs) -> [(&'static str, &Act); 10] {
    [
        ("t_freq", &acts.t.freq),
        ("t_emb", &acts.t.emb),
        ("y_emb", &acts.y_emb),
        ("c", &acts.c),
        ("block0.adaLN", &acts.blocks[0].modulation),
        ("block0.attn_in", &acts.blocks[0].attn_in),
        ("block0.attn_out", &acts.blocks[0].attn.out),
        ("block0.out", &acts.blocks[1].inp),
        ("block1.out", &acts.x),
        ("final_linear_out", &acts.final_layer.out),
    ]
}

#[test]
fn forward_and_intermediates_match_upstream_dit() {
    let g = load();
    let (x, t, y) = (g.f32("golden.x"), g.f32("golden.t"), g.labels("golden.y"));
    let mut acts = ModelActs::default();
    let out = g
        .model
        .forward(
            &mut acts,
            &x,
            &t,
            Condition::Class(&y),
            ForwardOptions::training().with_stats(),
        )
        .expect("forward");
    let be = g.model.backend();
    let mut ok = true;
    for (name, act) in intermediates(&acts) {
        let got = act.read(be).expect(name);
        ok &= check_tensor(name, &got, &g.f32(&format!("golden.dbg.{name}")));
    }
    let pos = g.f32("pos_embed");
    let embedded: Vec<f32> = g
        .f32("golden.dbg.patch_embed")
        .iter()
        .enumerate()
        .map(|(i, v)| v + pos[i % pos.len()])
        .collect();
    let block0_in = acts.blocks[0].inp.read(be).expect("block 0 input");
    ok &= check_tensor("patch_embed + pos_embed", &block0_in, &embedded);
    ok &= check_tensor("out", &out.out, &g.f32("golden.out"));
    // The f64 reference agrees with ours about as well as with upstream's f32.
    ok &= check_tensor("out vs out_f64", &out.out, &g.f32("golden.out_f64"));
    assert!(out.routing.is_empty(), "a dense model reports no routing");
    assert!(ok, "golden mismatches (see the table above)");

    // The inference forward (one shared block buffer, no attention
    // probabilities) gives the same bits.
    let lean = g.model.predict(&x, &t, Condition::Class(&y)).expect("forward");
    assert_eq!(lean.out, out.out);
}

/// The backward against upstream DiT's autograd (tests/data/dit_tiny_grad.safetensors):
/// the gradient of `sum(out * dy)` for every learnable parameter and the input
/// image, each within the forward's tolerance.
#[test]
fn gradients_match_upstream_dit() {
    let g = load();
    let grad_file = Weights::open(data("dit_tiny_grad.safetensors")).expect("open golden gradients");
    let get = |name: &str| {
        let shape = grad_file.shape(name).unwrap_or_else(|| panic!("{name} missing"));
        grad_file.get(name, &shape).expect(name)
    };
    let (x, t, y) = (g.f32("golden.x"), g.f32("golden.t"), g.labels("golden.y"));
    let model = &g.model;
    let be = model.backend();
    let mut acts = ModelActs::default();
    let out = model
        .forward(&mut acts, &x, &t, Condition::Class(&y), ForwardOptions::training())
        .expect("forward");
    let mut ok = check_tensor("out (f64 reference)", &out.out, &get("golden.out"));
    let mut grads = Grads::new(be, &model.params()).expect("gradients");
    let mut bp = Backprop::default();
    let opts = BackwardOptions {
        input_grad: true,
        grad_aux: 0.0,
    };
    model
        .backward_image(&acts, &mut bp, &mut grads, &get("golden.dy"), opts)
        .expect("backward");
    let mut checked = 0;
    for param in model.params() {
        let name = format!("grad.param.{}", param.name);
        if param.name == "pos_embed" {
            assert!(grad_file.shape(&name).is_none(), "pos_embed is fixed");
            continue;
        }
        let got = param
            .upstream_of(be, grads.get(&param.name).expect("gradient"))
            .expect("download");
        ok &= check_tensor(&param.name, &got, &get(&name));
        checked += 1;
    }
    let dx = bp.d_x_in.read(be).expect("input gradient");
    ok &= check_tensor("input x", &dx, &get("grad.in.x"));
    // Every gradient in the file was compared (one per trainable parameter).
    let in_file = grad_file
        .names()
        .iter()
        .filter(|n| n.starts_with("grad.param."))
        .count();
    assert_eq!(checked, in_file, "parameters in the model and the file differ");
    assert!(ok, "gradient mismatches (see the table above)");
}

/// bf16 storage (parameters and activations; f32 accumulation) of the golden
/// tiny DiT stays within a bf16-sized tolerance of the f32 forward: each
/// output within `TOL_ABS + TOL_REL * |f32|`, and the whole output within 1%
/// relative L2 error. bf16 keeps 8 significant bits (relative rounding 2^-9
/// per stored value), and the two-block forward stores some 20 tensors in a row.
#[test]
fn bf16_forward_stays_close_to_f32() {
    const TOL_ABS: f32 = 0.03;
    const TOL_REL: f32 = 0.03;
    let g = load();
    let (x, t, y) = (g.f32("golden.x"), g.f32("golden.t"), g.labels("golden.y"));
    let f32_out = g.model.predict(&x, &t, Condition::Class(&y)).expect("f32 forward").out;
    let mut model = g.model;
    model.to_dtype(DType::BF16).expect("bf16 model");
    assert_eq!(model.dtype(), DType::BF16);
    assert!(model.params().iter().all(|p| p.dtype() == DType::BF16));
    let mut acts = ModelActs::default();
    let bf16_out = model
        .forward(&mut acts, &x, &t, Condition::Class(&y), ForwardOptions::training())
        .expect("bf16 forward")
        .out;
    assert_eq!(acts.x.view().expect("x").dtype(), DType::BF16, "activations are bf16");
    assert_eq!(bf16_out.len(), f32_out.len());
    let mut max_diff = 0.0f32;
    for (i, (&b, &f)) in bf16_out.iter().zip(&f32_out).enumerate() {
        let diff = (b - f).abs();
        max_diff = max_diff.max(diff);
        assert!(diff <= TOL_ABS + TOL_REL * f.abs(), "out[{i}]: bf16 {b}, f32 {f}");
    }
    let norm = |v: &[f32]| v.iter().map(|a| (a * a) as f64).sum::<f64>().sqrt();
    let err: Vec<f32> = bf16_out.iter().zip(&f32_out).map(|(b, f)| b - f).collect();
    let rel = norm(&err) / norm(&f32_out);
    println!("bf16 vs f32: max |diff| {max_diff:.3e}, relative L2 {rel:.3e}");
    assert!(rel < 0.01, "relative L2 error {rel}");
}

#[test]
fn guidance_matches_upstream_forward_with_cfg() {
    let g = load();
    let (x, t, y) = (g.f32("golden.cfg_x"), g.f32("golden.cfg_t"), g.labels("golden.cfg_y"));
    assert_eq!(y[1], 10, "cfg_y[1] is the null class");
    let scale = g.f32("golden.cfg_scale")[0];
    let upstream = CfgOptions {
        scale,
        channels: CfgChannels::UpstreamFirstThree,
        share_routing_group: false,
    };
    let mut acts = ModelActs::default();
    let fwd = ForwardOptions::inference();
    let got = g
        .model
        .forward_with_cfg(&mut acts, &x, &t, Condition::Class(&y), upstream, fwd)
        .expect("cfg");
    let mut ok = check_tensor("cfg_out", &got.out, &g.f32("golden.cfg_out"));
    let all = CfgOptions {
        channels: CfgChannels::All,
        ..upstream
    };
    let got_all = g
        .model
        .forward_with_cfg(&mut acts, &x, &t, Condition::Class(&y), all, fwd)
        .expect("cfg");
    ok &= check_tensor("cfg_out_all", &got_all.out, &g.f32("golden.cfg_out_all"));
    assert!(ok, "guidance mismatches (see the table above)");
    // The two forms differ exactly on channel 3.
    assert_ne!(got.out, got_all.out);
}

#[test]
fn save_and_reload_round_trips_the_golden_model() {
    let g = load();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dit_tiny_resaved.safetensors");
    g.model.save(&path).expect("save");
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(2).expect("cpu backend"));
    let reloaded = Model::load(&path, &registry, backend).expect("reload");
    assert_eq!(reloaded.config(), g.model.config());
    let (x, t, y) = (g.f32("golden.x"), g.f32("golden.t"), g.labels("golden.y"));
    let a = g.model.predict(&x, &t, Condition::Class(&y)).expect("forward");
    let b = reloaded.predict(&x, &t, Condition::Class(&y)).expect("forward");
    assert_eq!(a.out, b.out, "a reloaded model computes the same bits");
    // Every stored name is an upstream name the golden file also holds.
    let names: Vec<String> = g.model.param_shapes().into_iter().map(|(n, _)| n).collect();
    let mut upstream: Vec<String> = g
        .weights
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("golden."))
        .collect();
    let mut ours = names.clone();
    ours.sort();
    upstream.sort();
    assert_eq!(ours, upstream);
}
