//! The transformer text encoder on the CPU backend: shapes, finiteness,
//! padding invariance, determinism.

use ecdit_backend_cpu::CpuBackend;
use ecdit_model::text::{TextEncoder, TextEncoderConfig, TransformerTextEncoder};
use std::sync::Arc;

fn encoder(dim: usize, max_tokens: usize, seed: u64) -> TransformerTextEncoder {
    let backend = Arc::new(CpuBackend::new(1).unwrap());
    let cfg = TextEncoderConfig {
        layers: 2,
        heads: Some(4),
        ..Default::default()
    };
    TransformerTextEncoder::new(backend, cfg, dim, max_tokens, seed).unwrap()
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
    let held: usize = enc.params.named().iter().map(|b| b.len()).sum();
    assert_eq!(total, held);
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
    let out = model.forward(&x, &[0.5, 0.5], Condition::Text(input)).unwrap();
    assert_eq!(out.out.len(), n);
    assert!(out.out.iter().all(|v| v.is_finite()));
    assert_eq!(out.routing.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 3]);
}
