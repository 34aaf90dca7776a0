//! Generation: the same bits for the same seed whatever the batch, prompts
//! that never influence each other, and model directories with missing or
//! mismatched files refused naming the file.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, Init};
use ecdit_model::config::ModelConfig;
use ecdit_model::model::Model;
use ecdit_model::sample::{Generator, SampleError, SampleOptions, MODEL_FILE, TEXT_ENCODER_FILE};
use ecdit_model::text::TransformerTextEncoder;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;

fn config() -> ModelConfig {
    serde_json::from_value(json!({
        "name": "gen-tiny", "input_size": 16, "patch_size": 2, "in_channels": 3, "learn_sigma": false,
        "hidden": 32, "depth": 2, "heads": 2, "kv_heads": 2, "mlp_ratio": 2.0,
        "conditioning": {"text": {"text_dim": 32, "max_tokens": 16, "dropout": 0.1, "pooled": true}},
        "moe": {"experts": 4, "router": {"kind": "expert-choice", "capacity_factor": 2.0},
                "expert": {"kind": "gelu-mlp", "mlp_ratio": 2.0}},
        "scheduler": {"kind": "rectified-flow"},
        "text_encoder": {"layers": 1}
    }))
    .unwrap()
}

/// A model with every weight random (so the zero-initialised gates let everything through).
fn generator(threads: usize) -> Generator {
    let registry = ecdit_model::registry().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads).unwrap());
    let mut model = Model::new(config(), &registry, backend.clone(), 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for p in model.params_mut() {
        if p.init != Init::Fixed {
            let v: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.2..0.2)).collect();
            p.load(backend.as_ref(), &v).unwrap();
        }
    }
    let encoder = TransformerTextEncoder::for_model(backend, model.config(), 3).unwrap();
    Generator::new(model, Some(encoder), &registry).unwrap()
}

fn opts(seed: u64) -> SampleOptions {
    SampleOptions {
        steps: 4,
        cfg: 3.0,
        seed,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn an_image_has_the_same_bits_whatever_the_batch() {
    let g = generator(2);
    let one = g
        .generate(&["a photo of a red circle"], opts(7), false, |_| {})
        .unwrap();
    let four = g
        .generate(&["a photo of a red circle"; 4], opts(7), false, |_| {})
        .unwrap();
    assert_eq!(bits(&one[0]), bits(&four[0]));
    assert_ne!(bits(&four[0]), bits(&four[1]), "image i starts from seed + i");
    // Image i of a batch is image 0 of seed + i, whatever the other prompts say.
    let mixed = g
        .generate(
            &["a photo of two squares", "a blue triangle above a green circle"],
            opts(7),
            false,
            |_| {},
        )
        .unwrap();
    let alone = g
        .generate(&["a blue triangle above a green circle"], opts(8), false, |_| {})
        .unwrap();
    assert_eq!(bits(&mixed[1]), bits(&alone[0]));
    assert!(one[0].iter().all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
}

#[test]
fn guidance_and_the_prompt_change_the_image() {
    let g = generator(1);
    let a = g
        .generate(&["a photo of a red circle"], opts(1), false, |_| {})
        .unwrap();
    let b = g
        .generate(&["a photo of a blue square"], opts(1), false, |_| {})
        .unwrap();
    let unguided = g
        .generate(
            &["a photo of a red circle"],
            SampleOptions { cfg: 1.0, ..opts(1) },
            false,
            |_| {},
        )
        .unwrap();
    assert_ne!(bits(&a[0]), bits(&b[0]));
    assert_ne!(bits(&a[0]), bits(&unguided[0]));
    let mut steps = 0;
    g.generate(&[""], opts(1), true, |info| {
        steps += 1;
        assert_eq!(
            info.routing.len(),
            1,
            "one MoE layer's statistics, the conditional pass's"
        );
    })
    .unwrap();
    assert_eq!(steps, 4);
}

#[test]
fn a_model_directory_with_missing_or_mismatched_files_is_refused() {
    let g = generator(1);
    let registry = ecdit_model::registry().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(1).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let err = |r: Result<Generator, SampleError>| r.unwrap_err().to_string();
    let e = err(Generator::load(dir.path(), &registry, backend.clone()));
    assert!(e.contains(MODEL_FILE) && e.contains("missing"), "{e}");
    g.model.save(dir.path().join(MODEL_FILE)).unwrap();
    let e = err(Generator::load(dir.path(), &registry, backend.clone()));
    assert!(e.contains(TEXT_ENCODER_FILE) && e.contains("missing"), "{e}");
    // A text encoder of another width.
    let mut other = config();
    if let ecdit_model::config::Conditioning::Text { text_dim, .. } = &mut other.conditioning {
        *text_dim = 16;
    }
    let wrong = TransformerTextEncoder::for_model(backend.clone(), &other, 0).unwrap();
    wrong.save(dir.path().join(TEXT_ENCODER_FILE)).unwrap();
    let e = err(Generator::load(dir.path(), &registry, backend.clone()));
    assert!(e.contains(TEXT_ENCODER_FILE) && e.contains("does not fit"), "{e}");
    g.encoder
        .as_ref()
        .unwrap()
        .save(dir.path().join(TEXT_ENCODER_FILE))
        .unwrap();
    let loaded = Generator::load(dir.path(), &registry, backend).unwrap();
    let a = loaded
        .generate(&["a photo of a red circle"], opts(3), false, |_| {})
        .unwrap();
    let b = g
        .generate(&["a photo of a red circle"], opts(3), false, |_| {})
        .unwrap();
    assert_eq!(
        bits(&a[0]),
        bits(&b[0]),
        "a saved and reloaded model draws the same image"
    );
    // A truncated model file.
    let bytes = std::fs::read(dir.path().join(MODEL_FILE)).unwrap();
    std::fs::write(dir.path().join(MODEL_FILE), &bytes[..bytes.len() / 3]).unwrap();
    let e = err(Generator::load(
        dir.path(),
        &ecdit_model::registry().unwrap(),
        Arc::new(CpuBackend::new(1).unwrap()),
    ));
    assert!(e.contains(MODEL_FILE), "{e}");
}
