//! Bad weights files and bad configs: each gives a clear error naming what
//! and where, never a panic; NaN weights load with a warning.

use ecdit_backend_cpu::CpuBackend;
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{Condition, Model, ModelError};
use ecdit_model::weights::{Weights, WeightsError};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn tiny_config() -> ModelConfig {
    serde_json::from_value(json!({
        "name": "tiny", "input_size": 8, "patch_size": 2, "in_channels": 4, "learn_sigma": true,
        "hidden": 16, "depth": 2, "heads": 2, "kv_heads": 2, "mlp_ratio": 4.0,
        "conditioning": {"class": {"num_classes": 5, "dropout": 0.1}},
        "scheduler": {"kind": "ddpm"}
    }))
    .expect("tiny config")
}

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(1).expect("cpu backend"))
}

fn build(config: ModelConfig) -> Result<Model, ModelError> {
    let registry = ecdit_model::registry().expect("registry");
    Model::new(config, &registry, backend(), 3)
}

fn load(path: &Path) -> Result<Model, ModelError> {
    let registry = ecdit_model::registry().expect("registry");
    Model::load(path, &registry, backend())
}

/// A file's tensors as (name, dtype, shape, bytes) plus its metadata.
type Entries = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_entries(path: &Path) -> (Entries, HashMap<String, String>) {
    let bytes = std::fs::read(path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("meta");
    let entries = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    (entries, meta.metadata().clone().unwrap_or_default())
}

fn write_entries(path: &Path, entries: &Entries, meta: &HashMap<String, String>) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).expect("view")))
        .collect();
    let buf = safetensors::serialize(views, &Some(meta.clone())).expect("serialize");
    std::fs::write(path, buf).expect("write");
}

/// Saves a fresh tiny model, lets `edit` change its tensors, writes the result.
fn edited(dir: &Path, edit: impl FnOnce(&mut Entries)) -> PathBuf {
    let path = dir.join("model.safetensors");
    build(tiny_config()).expect("model").save(&path).expect("save");
    let (mut entries, meta) = read_entries(&path);
    edit(&mut entries);
    let out = dir.join("edited.safetensors");
    write_entries(&out, &entries, &meta);
    out
}

fn err_text(r: Result<Model, ModelError>) -> (ModelError, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            (e, s)
        }
    }
}

#[test]
fn a_saved_model_reloads_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let model = build(tiny_config()).unwrap();
    model.save(&path).unwrap();
    let back = load(&path).unwrap();
    let be = model.backend_arc().clone();
    for (a, b) in model.params().iter().zip(back.params()) {
        assert_eq!(a.name, b.name);
        let (ad, bd) = (a.to_upstream_f32(be.as_ref()), b.to_upstream_f32(be.as_ref()));
        assert_eq!(ad.expect("read"), bd.expect("read"), "{}", a.name);
    }
    // No temporary file is left beside it.
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |e| e.retain(|(n, ..)| n != "blocks.1.attn.proj.weight"));
    let (err, text) = err_text(load(&path));
    assert!(
        matches!(err, ModelError::Weights(WeightsError::Missing { .. })),
        "{text}"
    );
    assert!(text.contains("'blocks.1.attn.proj.weight' is missing"), "{text}");
    assert!(text.contains("[16, 16]"), "{text}");
    assert!(text.contains("edited.safetensors"), "{text}");
}

#[test]
fn extra_tensors_are_listed_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |e| {
        e.push(("blocks.0.attn.extra.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
        e.push(("ema.scale".into(), Dtype::F32, vec![1], vec![0; 4]));
    });
    let (err, text) = err_text(load(&path));
    assert!(
        matches!(err, ModelError::Weights(WeightsError::Unused { .. })),
        "{text}"
    );
    assert!(text.contains("2 tensor(s) not used"), "{text}");
    assert!(
        text.contains("blocks.0.attn.extra.weight") && text.contains("ema.scale"),
        "{text}"
    );
    // Allowed by prefix: both gone.
    let weights = Weights::open(&path).unwrap();
    let registry = ecdit_model::registry().unwrap();
    let r = Model::from_weights(
        tiny_config(),
        &registry,
        backend(),
        &weights,
        &["blocks.0.attn.extra", "ema."],
    );
    assert!(r.is_ok(), "{:?}", r.err());
}

#[test]
fn misshapen_tensor_names_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |e| {
        for (n, _, s, _) in e.iter_mut() {
            if n == "blocks.0.mlp.fc1.weight" {
                *s = vec![16, 64]; // transposed: [h, d] expected
            }
        }
    });
    let (err, text) = err_text(load(&path));
    assert!(matches!(err, ModelError::Weights(WeightsError::Shape { .. })), "{text}");
    assert!(
        text.contains("'blocks.0.mlp.fc1.weight' has shape [16, 64], expected [64, 16]"),
        "{text}"
    );
}

#[test]
fn wrong_dtype_says_which_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |e| {
        for (n, dt, _, _) in e.iter_mut() {
            if n == "final_layer.linear.bias" {
                *dt = Dtype::I32; // same bytes, not a float
            }
        }
    });
    let (err, text) = err_text(load(&path));
    assert!(matches!(err, ModelError::Weights(WeightsError::Dtype { .. })), "{text}");
    assert!(
        text.contains("'final_layer.linear.bias' has dtype I32; only F32, F16 and BF16 are accepted"),
        "{text}"
    );
}

#[test]
fn truncated_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    build(tiny_config()).unwrap().save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let (err, text) = err_text(load(&cut));
    assert!(
        matches!(err, ModelError::Weights(WeightsError::Format { .. })),
        "{text}"
    );
    assert!(text.contains("cut.safetensors") && text.contains("truncated"), "{text}");
    // Cut inside the header too.
    std::fs::write(&cut, &bytes[..20]).unwrap();
    let (_, text) = err_text(load(&cut));
    assert!(text.contains("truncated"), "{text}");
}

#[test]
fn header_lying_about_sizes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    build(tiny_config()).unwrap().save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Claim the patch embedding bias is [17] (68 bytes) while its offsets hold 64.
    let lying = header.replacen(
        "\"x_embedder.proj.bias\":{\"dtype\":\"F32\",\"shape\":[16]",
        "\"x_embedder.proj.bias\":{\"dtype\":\"F32\",\"shape\":[17]",
        1,
    );
    assert_ne!(lying, header, "test setup: header layout changed");
    let mut out = (lying.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(lying.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    let liar = dir.path().join("liar.safetensors");
    std::fs::write(&liar, out).unwrap();
    let (err, text) = err_text(load(&liar));
    assert!(
        matches!(err, ModelError::Weights(WeightsError::Format { .. })),
        "{text}"
    );
    assert!(
        text.contains("liar.safetensors") && text.contains("offsets disagree"),
        "{text}"
    );
}

/// A tracing writer that keeps everything written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn nan_weight_loads_with_a_warning_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |e| {
        for (n, _, _, b) in e.iter_mut() {
            if n == "blocks.1.attn.qkv.weight" {
                b[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
    });
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let model = tracing::subscriber::with_default(subscriber, || load(&path)).expect("NaN weights still load");
    let qkv = model
        .params()
        .into_iter()
        .find(|p| p.name == "blocks.1.attn.qkv.weight")
        .unwrap();
    assert!(qkv.to_upstream_f32(model.backend()).unwrap()[1].is_nan());
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("WARN") && log.contains("blocks.1.attn.qkv.weight"),
        "{log}"
    );
}

#[test]
fn configs_that_cannot_build_a_model_are_refused() {
    let mut c = tiny_config();
    c.heads = 3;
    let text = c.validate().unwrap_err().to_string();
    assert!(
        text.contains("'heads' = 3") && text.contains("does not divide hidden 16"),
        "{text}"
    );
    assert!(build(c).is_err());

    let mut c = tiny_config();
    c.kv_heads = 3;
    c.heads = 4;
    let text = c.validate().unwrap_err().to_string();
    assert!(
        text.contains("'kv_heads' = 3") && text.contains("does not divide heads 4"),
        "{text}"
    );

    let mut c = tiny_config();
    c.patch_size = 3;
    let text = c.validate().unwrap_err().to_string();
    assert!(
        text.contains("'patch_size' = 3") && text.contains("input_size 8"),
        "{text}"
    );

    let mut c = tiny_config();
    c.moe = Some(
        serde_json::from_value(json!({
            "experts": 0, "router": {"kind": "expert-choice"}, "expert": {"kind": "gelu-mlp"}
        }))
        .expect("moe config"),
    );
    let text = c.validate().unwrap_err().to_string();
    assert!(
        text.contains("'moe.experts' = 0") && text.contains("at least 1 expert"),
        "{text}"
    );
    let text = match build(c) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("zero experts built a model"),
    };
    assert!(text.contains("moe.experts"), "{text}");
}

#[test]
fn bad_forward_inputs_are_errors() {
    let model = build(tiny_config()).unwrap();
    let x = vec![0.0; 2 * 4 * 8 * 8];
    let err = model
        .predict(&x[..100], &[1.0, 2.0], Condition::Class(&[0, 1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("x [B, C, H, W]"), "{err}");
    let err = model
        .predict(&x, &[1.0, 2.0], Condition::Class(&[0, 6]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("class label 6 at batch index 1"), "{err}");
    let err = model
        .predict(&x, &[1.0, f32::NAN], Condition::Class(&[0, 1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("timesteps"), "{err}");
}
