//! The transformer text encoder on the CPU backend: shapes, finiteness,
//! padding invariance, determinism, bf16 storage, and saving and loading.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{DType, Params};
use ecdit_model::text::{TextEncoder, TextEncoderConfig, TransformerTextEncoder};
use ecdit_model::weights::Weights;
use std::sync::Arc;

fn cfg() -> TextEncoderConfig {
    TextEncoderConfig {
        layers: 2,
        heads: Some(4),
        ..Default::default()
    }
}

fn encoder_in(dim: usize, max_tokens: usize, seed: u64, dtype: DType) -> TransformerTextEncoder {
    let backend = Arc::new(CpuBackend::new(1).unwrap());
    TransformerTextEncoder::with_dtype(backend, cfg(), dim, max_tokens, seed, dtype).unwrap()
}

fn encoder(dim: usize, max_tokens: usize, seed: u64) -> TransformerTextEncoder {
    encoder_in(dim, max_tokens, seed, DType::F32)
}

#[test]
fn output_shapes_mask_and_finite_values() {
    let enc = encoder(32, 16, 0);
    assert_eq!((enc.dim(), enc.max_tokens()), (32, 16));
    let b = enc
        .encode(&["a red circle", "", "two blue stars above a green square"])
        .unwrap();
    assert_eq!((b.batch, b.len, b.dim), (3, 9, 32));
    assert_eq!(b.tokens.len(), 3 * 9 * 32);
    assert_eq!(b.pooled.len(), 3 * 32);
    let real: Vec<usize> = (0..3)
        .map(|i| b.mask[i * 9..(i + 1) * 9].iter().map(|&m| m as usize).sum())
        .collect();
    assert_eq!(real, [5, 2, 9]);
    assert!(b.tokens.iter().chain(&b.pooled).all(|v| v.is_finite()));
    // Final LayerNorm with unit weight and zero bias: each real row has mean ~0, variance ~1.
    let row = &b.tokens[..32];
    let mean = row.iter().sum::<f32>() / 32.0;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 32.0;
    assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "mean {mean} var {var}");
    // Pooled = mean over the real tokens only.
    for j in 0..32 {
        let want = (0..5).map(|l| b.tokens[l * 32 + j]).sum::<f32>() / 5.0;
        assert!((b.pooled[j] - want).abs() < 1e-6);
    }
    // Different prompts give different encodings.
    assert_ne!(&b.tokens[..32 * 2], &b.tokens[9 * 32..9 * 32 + 32 * 2]);
}

#[test]
fn empty_prompt_and_empty_batch_encode() {
    let enc = encoder(16, 8, 1);
    let b = enc.encode(&[""]).unwrap();
    assert_eq!((b.batch, b.len), (1, 2));
    assert_eq!(b.mask, [1, 1]);
    assert!(b.tokens.iter().all(|v| v.is_finite()));
    let none = enc.encode(&[]).unwrap();
    assert_eq!((none.batch, none.tokens.len(), none.pooled.len()), (0, 0, 0));
}

#[test]
fn real_tokens_do_not_depend_on_padding() {
    let enc = encoder(32, 16, 3);
    let short = "a red star";
    let alone = enc.encode(&[short]).unwrap();
    let padded = enc
        .encode(&["four small purple hearts left of a big yellow ring", short])
        .unwrap();
    assert!(padded.len > alone.len);
    let (l0, l1, d) = (alone.len, padded.len, 32);
    let mut max_diff = 0.0f32;
    for l in 0..l0 {
        for j in 0..d {
            let a = alone.tokens[l * d + j];
            let b = padded.tokens[(l1 + l) * d + j];
            max_diff = max_diff.max((a - b).abs());
        }
    }
    assert!(max_diff < 1e-5, "max diff {max_diff}");
    for j in 0..d {
        assert!((alone.pooled[j] - padded.pooled[d + j]).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_bits_other_seed_differs() {
    let prompts = ["three white crosses", "a heart below a triangle"];
    let a = encoder(32, 16, 42).encode(&prompts).unwrap();
    let b = encoder(32, 16, 42).encode(&prompts).unwrap();
    let c = encoder(32, 16, 43).encode(&prompts).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn param_names_are_prefixed_and_sized() {
    let enc = encoder(32, 16, 0);
    let shapes = enc.param_shapes();
    assert!(shapes.iter().all(|(n, _)| n.starts_with("text_encoder.")));
    let total: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let mut params = Vec::new();
    enc.collect(&mut params);
    let held: usize = params.iter().map(|p| p.numel()).sum();
    assert_eq!(total, held);
    let listed: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    assert_eq!(listed, shapes);
    let v = enc.tokenizer().vocab().len();
    // embeddings + 2 layers x (2 LN + qkv + proj + 2 LN + fc1 + fc2) + final LN
    let per_layer = 4 * 32 + (3 * 32 * 32 + 3 * 32) + (32 * 32 + 32) + (128 * 32 + 128) + (32 * 128 + 32);
    assert_eq!(total, v * 32 + 16 * 32 + 2 * per_layer + 2 * 32);
}

#[test]
fn bad_settings_are_errors() {
    let backend = Arc::new(CpuBackend::new(1).unwrap());
    let cfg = TextEncoderConfig {
        heads: Some(5),
        ..Default::default()
    };
    let err = TransformerTextEncoder::new(backend.clone(), cfg, 32, 8, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("heads = 5") && err.contains("divide dim 32"), "{err}");
    let cfg = TextEncoderConfig {
        vocab: Some("/nonexistent/vocab.txt".into()),
        ..Default::default()
    };
    let err = TransformerTextEncoder::new(backend, cfg, 32, 8, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/vocab.txt"), "{err}");
}

#[test]
fn encoded_prompts_feed_the_tiny_model() {
    // The TextBatch fields are exactly what the model's TextInput reads.
    use ecdit_model::config_files::load_config;
    use ecdit_model::model::{Condition, Model, TextInput};
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-ec.json");
    let cfg = load_config(&path).unwrap();
    let backend: Arc<CpuBackend> = Arc::new(CpuBackend::new(1).unwrap());
    let enc = TransformerTextEncoder::for_model(backend.clone(), &cfg, 5).unwrap();
    let model = Model::new(cfg.clone(), &ecdit_model::registry().unwrap(), backend, 0).unwrap();
    let text = enc.encode(&["a red circle", ""]).unwrap();
    let input = TextInput {
        tokens: &text.tokens,
        mask: &text.mask,
        pooled: &text.pooled,
        batch: text.batch,
        len: text.len,
        dim: text.dim,
    };
    let n = 2 * cfg.in_channels * cfg.input_size * cfg.input_size;
    let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let out = model.predict(&x, &[0.5, 0.5], Condition::Text(input)).unwrap();
    assert_eq!(out.out.len(), n);
    assert!(out.out.iter().all(|v| v.is_finite()));
    assert_eq!(out.routing.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 3]);
}

#[test]
fn bf16_weights_encode_close_to_f32() {
    let prompts = ["a red circle", "two blue stars above a green square"];
    let full = encoder(32, 16, 9).encode(&prompts).unwrap();
    let half = encoder_in(32, 16, 9, DType::BF16);
    assert_eq!(half.dtype(), DType::BF16);
    let half = half.encode(&prompts).unwrap();
    assert_eq!(
        (half.batch, half.len, half.mask.clone()),
        (full.batch, full.len, full.mask.clone())
    );
    // LayerNorm outputs are O(1); bf16 weights keep about 3 significant digits.
    let max_diff = full
        .tokens
        .iter()
        .zip(&half.tokens)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff > 0.0 && max_diff < 0.1, "max diff {max_diff}");
}

#[test]
fn saved_weights_reload_into_a_fresh_encoder_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["three white crosses", ""];
    for dtype in [DType::F32, DType::BF16] {
        let path = dir.path().join(format!("te-{dtype}.safetensors"));
        let a = encoder_in(32, 16, 1, dtype);
        a.save(&path).unwrap();
        let w = Weights::open(&path).unwrap();
        let want = if dtype == DType::BF16 { "BF16" } else { "F32" };
        assert_eq!(w.dtype("text_encoder.layers.0.attn.qkv.weight").as_deref(), Some(want));
        // Upstream shape on disk, though memory holds it input-major.
        assert_eq!(w.shape("text_encoder.layers.0.mlp.fc1.weight"), Some(vec![128, 32]));
        let mut b = encoder_in(32, 16, 2, dtype);
        assert_ne!(a.encode(&prompts).unwrap(), b.encode(&prompts).unwrap());
        b.load_weights(&w).unwrap();
        w.check_all_used(&[]).unwrap();
        assert_eq!(a.encode(&prompts).unwrap(), b.encode(&prompts).unwrap(), "{dtype}");
    }
    // A bf16 file loads into an f32 encoder exactly (bf16 widens to f32).
    let w = Weights::open(dir.path().join("te-bf16.safetensors")).unwrap();
    let mut f = encoder(32, 16, 3);
    f.load_weights(&w).unwrap();
    let h = encoder_in(32, 16, 1, DType::BF16);
    let (mut pf, mut ph) = (Vec::new(), Vec::new());
    f.collect(&mut pf);
    h.collect(&mut ph);
    for (a, b) in pf.iter().zip(&ph) {
        assert_eq!(
            a.to_upstream_f32(f.backend()).unwrap(),
            b.to_upstream_f32(h.backend()).unwrap(),
            "{}",
            a.name
        );
    }
    // A file for another width names the tensor and both shapes.
    let mut wide = encoder(64, 16, 0);
    let err = wide.load_weights(&w).unwrap_err().to_string();
    assert!(
        err.contains("text_encoder.token_embedding.weight") && err.contains("expected"),
        "{err}"
    );
}
