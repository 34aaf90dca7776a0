//! `ecdit info`: parameter counts against the paper's Table 1 formulas and
//! upstream DiT-XL/2, FLOPs, and the JSON report.

use ecdit_model::config::{Conditioning, ModelConfig};
use ecdit_model::config_files::load_config;
use ecdit_model::info::{param_shapes, report, InfoReport};
use serde_json::json;
use std::path::PathBuf;

fn paper(name: &str) -> ModelConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/paper")
        .join(format!("{name}.json"));
    load_config(&path).unwrap()
}

fn info(cfg: &ModelConfig) -> InfoReport {
    report(&ecdit_model::registry().unwrap(), cfg, 1).unwrap()
}

fn billions(n: f64) -> String {
    format!("{:.2}", n / 1e9)
}

/// `n_moe * ((E - 1) * 8 d^2 + E d)`, exactly, in integers.
fn paper_moe_delta(n_moe: u64, e: u64, d: u64) -> u64 {
    n_moe * ((e - 1) * 8 * d * d + e * d)
}

#[test]
fn moe_deltas_match_table_1() {
    // (config, MoE layers, experts, width, paper total - dense in billions)
    for (name, n_moe, e, d, want) in [
        ("ec-dit-xl-32e", 14, 32, 1152, "4.61"),
        ("ec-dit-xxl-32e", 19, 32, 1536, "11.12"),
        ("ec-dit-3xl-32e", 21, 32, 2304, "27.65"),
        ("ec-dit-m-64e", 19, 64, 3072, "90.37"),
    ] {
        let r = info(&paper(name));
        assert_eq!((r.moe_layers as u64, r.experts as u64), (n_moe, e), "{name}");
        // Our count = the paper's formula + the biases of the E - 1 extra expert MLPs
        // (each GELU-MLP expert has 4d + d biases), exactly.
        let extra_bias = n_moe * (e - 1) * 5 * d;
        let formula = paper_moe_delta(n_moe, e, d);
        assert_eq!(r.moe_delta as u64, formula + extra_bias, "{name}");
        assert_eq!(r.expert_bias_params, n_moe * e * 5 * d, "{name}");
        // Weights only, the paper's figure to 2 decimals.
        assert_eq!(billions((r.moe_delta as u64 - extra_bias) as f64), want, "{name}");
        assert_eq!(
            billions(r.paper.as_ref().unwrap().moe_delta_formula.unwrap()),
            want,
            "{name}"
        );
    }
}

#[test]
fn expert_biases_shift_the_two_largest_deltas_past_rounding() {
    // Counted honestly with biases, XL and XXL still round to the paper's figure;
    // 3XL and M do not (27.66B and 90.39B): the paper's formula leaves biases out.
    let with_bias: Vec<String> = ["ec-dit-xl-32e", "ec-dit-xxl-32e", "ec-dit-3xl-32e", "ec-dit-m-64e"]
        .iter()
        .map(|n| billions(info(&paper(n)).moe_delta as f64))
        .collect();
    assert_eq!(with_bias, ["4.61", "11.12", "27.66", "90.39"]);
}

#[test]
fn activated_delta_of_m_64e_matches_table_1() {
    let r = info(&paper("ec-dit-m-64e"));
    let (n_moe, e, d) = (19u64, 64u64, 3072u64);
    // n_moe * ((f_c - 1) * 8 d^2 + E d) with f_c = 2, plus one expert's biases per layer.
    let formula = n_moe * (8 * d * d + e * d);
    assert_eq!(r.activated_delta as u64, formula + n_moe * 5 * d);
    assert_eq!(billions(formula as f64), "1.44");
    assert_eq!(billions(r.activated_delta as f64), "1.44");
    let p = r.paper.as_ref().unwrap();
    assert_eq!(p.family, "M");
    assert_eq!((p.total_params, p.activated_params), (Some(97.21e9), Some(8.27e9)));
    assert_eq!(r.activation.as_ref().unwrap().capacity, Some(8)); // round(2 * 256 / 64)
}

fn dit_xl_2() -> ModelConfig {
    serde_json::from_value(json!({
        "name": "DiT-XL/2", "input_size": 32, "patch_size": 2, "in_channels": 4, "learn_sigma": true,
        "hidden": 1152, "depth": 28, "heads": 16, "kv_heads": 16,
        "conditioning": {"class": {"num_classes": 1000}},
        "scheduler": {"kind": "ddpm"}
    }))
    .unwrap()
}

#[test]
fn dit_xl_2_has_upstream_parameter_count() {
    let r = info(&dit_xl_2());
    // Upstream `sum(p.numel() for p in DiT_XL_2().parameters())`, which includes
    // the fixed pos_embed [1, 256, 1152] (requires_grad=False).
    assert_eq!(r.total_params, 675_129_632);
    assert_eq!(r.trainable_params, 675_129_632 - 256 * 1152);
    assert_eq!((r.activated_params, r.dense_params), (r.total_params, r.total_params));
    assert!(r.paper.is_none() && r.text_encoder_params.is_none());
    // DiT reports 118.6 "Gflops" for XL/2, counting multiply-adds; we count 2 per multiply-add.
    let macs = r.flops_per_image / 2.0;
    assert!((macs / 118.6e9 - 1.0).abs() < 0.005, "{macs}");
}

#[test]
fn param_shapes_use_upstream_names() {
    let shapes = param_shapes(&dit_xl_2()).unwrap();
    let get = |n: &str| shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
    assert_eq!(get("x_embedder.proj.weight"), Some(vec![1152, 4, 2, 2]));
    assert_eq!(get("blocks.0.attn.qkv.weight"), Some(vec![3456, 1152]));
    assert_eq!(get("blocks.27.adaLN_modulation.1.weight"), Some(vec![6912, 1152]));
    assert_eq!(get("y_embedder.embedding_table.weight"), Some(vec![1001, 1152]));
    assert_eq!(get("final_layer.linear.weight"), Some(vec![32, 1152]));
    assert_eq!(get("pos_embed"), Some(vec![1, 256, 1152]));
    let mut names: Vec<&String> = shapes.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), shapes.len(), "duplicate names");

    let ec = param_shapes(&paper("ec-dit-xl-32e")).unwrap();
    let get = |n: &str| ec.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
    // GQA: 18 heads of 64, 6 kv heads -> kv [2 * 6 * 64, d].
    assert_eq!(get("blocks.0.attn.q.weight"), Some(vec![1152, 1152]));
    assert_eq!(get("blocks.0.attn.kv.weight"), Some(vec![768, 1152]));
    assert_eq!(get("blocks.0.attn.qkv.weight"), None);
    assert_eq!(get("blocks.0.cross_attn.kv_linear.weight"), Some(vec![768, 1152]));
    assert_eq!(get("blocks.0.mlp.fc1.weight"), Some(vec![4608, 1152]));
    assert_eq!(get("blocks.1.mlp.fc1.weight"), None);
    assert_eq!(get("blocks.1.moe.router.weight"), Some(vec![32, 1152]));
    assert_eq!(get("blocks.1.moe.experts.fc1.weight"), Some(vec![32, 1152, 4608]));
    assert_eq!(get("blocks.1.moe.experts.fc2.bias"), Some(vec![32, 1152]));
    assert_eq!(get("y_embedder.y_proj.fc1.weight"), Some(vec![1152, 1024]));
    assert_eq!(get("y_embedder.embedding_table.weight"), None);
}

#[test]
fn token_choice_top2_activates_as_much_as_expert_choice_fc2() {
    let ec = info(&paper("ec-dit-xxl-32e"));
    let tc = info(&paper("gshard-xxl-32e"));
    assert_eq!(tc.total_params, ec.total_params);
    assert_eq!(tc.activated_params, ec.activated_params);
    assert_eq!(tc.flops_per_image, ec.flops_per_image);
    // Two experts per token cost two dense FFNs: MoE FLOPs exceed dense by the
    // extra FFN per MoE layer plus the router.
    let (t, d) = (256.0, 1536.0);
    let extra = 19.0 * (t * 16.0 * d * d + 2.0 * t * d * 32.0);
    assert!((ec.flops_per_image - ec.dense_flops_per_image - extra).abs() < 1.0);
}

#[test]
fn dense_configs_have_no_moe_and_paper_dense_figure() {
    for (name, fam, paper_dense) in [("dense-xl", "XL", 1.47e9), ("dense-m", "M", 8.03e9)] {
        let r = info(&paper(name));
        assert_eq!((r.total_params, r.activated_params), (r.dense_params, r.dense_params));
        assert_eq!(r.moe_delta, 0);
        let p = r.paper.unwrap();
        assert_eq!((p.family.as_str(), p.dense_params), (fam, paper_dense));
        assert!(matches!(paper(name).conditioning, Conditioning::Text { .. }));
        assert!(r.text_encoder_params.unwrap() > 0);
    }
}

#[test]
fn report_serializes_counts_and_prints_a_table() {
    let r = info(&paper("ec-dit-xl-32e"));
    let v = serde_json::to_value(&r).unwrap();
    for field in [
        "total_params",
        "activated_params",
        "dense_params",
        "flops_per_image",
        "weight_bytes_bf16",
    ] {
        assert!(v[field].is_number(), "missing {field}: {v}");
    }
    assert_eq!(v["total_params"].as_u64(), Some(r.total_params));
    assert_eq!(r.weight_bytes_f32, 4 * r.total_params);
    assert!(r.activation_memory.training_bytes > r.activation_memory.inference_bytes);
    let text = r.to_string();
    for needle in [
        "ec-dit-xl-32e",
        "activated per token",
        "total (paper)",
        "6.08B",
        "weights bf16",
    ] {
        assert!(text.contains(needle), "table lacks '{needle}':\n{text}");
    }
}

#[test]
fn activation_memory_scales_with_batch() {
    let cfg = paper("ec-dit-xl-32e");
    let registry = ecdit_model::registry().unwrap();
    let a = report(&registry, &cfg, 1).unwrap().activation_memory;
    let b = report(&registry, &cfg, 8).unwrap().activation_memory;
    // Inference grows with the batch, but less than linearly: the dense MLP's
    // hidden buffers hold one chunk of rows whatever the batch.
    assert!(b.inference_bytes > a.inference_bytes && b.inference_bytes < 8 * a.inference_bytes);
    assert_eq!(b.training_bytes, 8 * a.training_bytes);
}

#[test]
fn info_param_list_agrees_with_the_built_model() {
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_model::model::Model;
    use std::sync::Arc;
    let registry = ecdit_model::registry().unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    for file in ["tiny-ec.json", "small/tc-s-8e.json"] {
        let cfg = load_config(&dir.join(file)).unwrap();
        let backend = Arc::new(CpuBackend::new(1).unwrap());
        let model = Model::new(cfg.clone(), &registry, backend, 0).unwrap();
        let mut ours = param_shapes(&cfg).unwrap();
        let mut built = model.param_shapes();
        ours.sort();
        built.sort();
        assert_eq!(ours, built, "{file}");
        let r = info(&cfg);
        assert_eq!(r.trainable_params, model.num_params() as u64, "{file}");
    }
}
