//! The bad-input catalogue: every input surface (CLI flags, model and
//! training configs, component specs, weights, checkpoints, prompts, prompt
//! files and vocabularies, plugins, resource limits), one case per way in
//! which the input is wrong.
//!
//! Each case asserts the error kind (the exit status of `ecdit`, 2 for a
//! usage error and 1 for a refused input; the error variant of a library
//! call), that the message names the field, tensor, line or file, that
//! nothing panicked, and, where an output or a checkpoint existed before,
//! that it is byte-identical afterwards. Cases are named for what is wrong.
//!
//! Fast by construction: one tiny training run (two steps of the smoke
//! model) is shared by every case that needs a model or checkpoints, each
//! case works on its own copy, and sampling runs one step.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, EngineError, Registry};
use ecdit_model::config_files::{load_config, ConfigError};
use ecdit_model::eval::{read_prompts, EvalError};
use ecdit_model::limits;
use ecdit_model::model::{Model, ModelError};
use ecdit_model::sample::{Generator, LoadOptions, SampleError};
use ecdit_model::text::{TextError, Tokenizer, Vocab};
use ecdit_model::train::checkpoint::{CheckpointError, CheckpointStore, TensorData};
use ecdit_model::train::config::{TrainConfig, TrainConfigError};
use ecdit_model::train::trainer::TrainError;
use ecdit_model::weights::{Weights, WeightsError};
use ecdit_tests::{ecdit, workspace_dir};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A scratch directory for one case, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(case: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("bad-input")
            .join(format!("{case}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `ecdit` with `args` in the workspace root.
fn run(args: &[&str]) -> Output {
    ecdit().args(args).output().expect("run ecdit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The exit status of a refused input (anyhow's error in `main`).
const REFUSED: i32 = 1;
/// The exit status of a usage error (clap).
const USAGE: i32 = 2;

/// `o` exited with `code`, without a panic, and its stderr names every needle.
#[track_caller]
fn refused(o: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    assert_eq!(o.status.code(), Some(code), "exit status; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not name {n:?}:\n{err}");
    }
    err
}

/// `o` succeeded, without a panic, and its stderr names every needle.
#[track_caller]
fn warned(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    assert!(o.status.success(), "failed:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not name {n:?}:\n{err}");
    }
    err
}

/// The error of `r` (`T` need not be `Debug`).
#[track_caller]
fn error_of<T, E>(r: Result<T, E>) -> E {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

/// Every file under `dir` with its bytes (directories as empty entries): equal
/// snapshots mean nothing was changed, added or removed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).expect("read file")));
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

fn registry() -> Registry {
    ecdit_model::registry().expect("shipped registry")
}

fn backend() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(1).expect("cpu backend"))
}

/// The smoke model's config (text-conditioned expert choice on 16x16).
fn tiny_model() -> Value {
    json!({
        "name": "catalogue-tiny", "input_size": 16, "patch_size": 2, "in_channels": 3,
        "hidden": 32, "depth": 2, "heads": 2, "kv_heads": 2,
        "conditioning": {"text": {"text_dim": 32, "max_tokens": 16, "dropout": 0.1}},
        "moe": {"experts": 4, "router": {"kind": "expert-choice", "capacity_factor": 2.0},
                "expert": {"kind": "gelu-mlp", "mlp_ratio": 2.0}},
        "scheduler": {"kind": "rectified-flow"},
        "text_encoder": {"layers": 1}
    })
}

/// A model config far too big for 1 GiB: 1000 blocks of width 8192.
fn giant_model() -> Value {
    let mut m = tiny_model();
    m["name"] = "giant".into();
    m["depth"] = 1000.into();
    m["hidden"] = 8192.into();
    m["heads"] = 64.into();
    m["kv_heads"] = 64.into();
    m
}

/// A run of the smoke model trained for two steps (checkpoints at 1 and 2,
/// the exported model beside them), made once per test process.
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-input");
        // The runs of earlier test processes that are gone (one is left per process).
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("trained-run-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = root.join(format!("trained-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let o = run(&[
            "train",
            "--quiet",
            "--threads",
            "1",
            "--config",
            "configs/train/smoke-ec.json",
            "--steps",
            "2",
            "--checkpoint-every",
            "1",
            "--out",
            s(&dir),
        ]);
        assert!(o.status.success(), "the fixture run failed:\n{}", stderr(&o));
        dir
    })
}

/// A copy of the trained run in `scratch/run`.
fn run_copy(scratch: &Scratch) -> PathBuf {
    let dir = scratch.path("run");
    copy_dir(trained_run(), &dir);
    dir
}

/// A model directory (model.safetensors and text_encoder.safetensors) in `scratch/model`.
fn model_copy(scratch: &Scratch) -> PathBuf {
    let dir = scratch.path("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "text_encoder.safetensors"] {
        std::fs::copy(trained_run().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// A tensor to write raw: name, safetensors dtype, shape, bytes.
type RawTensor = (String, String, Vec<usize>, Vec<u8>);

/// The trained model file's tensors (as F32 bytes) and metadata.
fn model_tensors() -> (Vec<RawTensor>, BTreeMap<String, String>) {
    let w = Weights::open(trained_run().join("model.safetensors")).unwrap();
    let tensors = w
        .names()
        .into_iter()
        .map(|name| {
            let shape = w.shape(&name).unwrap();
            let bytes = w
                .get(&name, &shape)
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (name, "F32".to_string(), shape, bytes)
        })
        .collect();
    let meta = ["config", "dtype", "format"]
        .iter()
        .filter_map(|k| w.metadata(k).map(|v| (k.to_string(), v.to_string())))
        .collect();
    (tensors, meta)
}

/// A safetensors file from raw tensors and metadata.
fn safetensors_bytes(tensors: &[RawTensor], meta: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        header.insert("__metadata__".into(), json!(meta));
    }
    let (mut data, mut offset) = (Vec::new(), 0usize);
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// A model directory whose model.safetensors is the trained one edited by `edit`.
fn edited_model(scratch: &Scratch, edit: impl FnOnce(&mut Vec<RawTensor>, &mut BTreeMap<String, String>)) -> PathBuf {
    let dir = model_copy(scratch);
    let (mut tensors, mut meta) = model_tensors();
    edit(&mut tensors, &mut meta);
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors, &meta)).unwrap();
    dir
}

fn load_model(dir: &Path) -> Result<Model, ModelError> {
    Model::load(dir.join("model.safetensors"), &registry(), backend())
}

/// Rewrites the newest checkpoint of `run` (step 2) through the store, so that
/// its length and checksum stay right: only what `edit` changes is wrong.
fn edit_checkpoint(run: &Path, edit: impl FnOnce(&mut Vec<(String, TensorData)>, &mut Value)) {
    let store = CheckpointStore::new(run, 0);
    let loaded = CheckpointStore::load(&store.step_dir(2)).unwrap();
    let mut tensors: Vec<(String, TensorData)> = loaded.tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = loaded.state;
    edit(&mut tensors, &mut state);
    store.save(2, &tensors, &state).unwrap();
}

/// Removes the older checkpoint (step 1) so a damaged step 2 has no fallback.
fn only_newest_checkpoint(run: &Path) {
    std::fs::remove_dir_all(CheckpointStore::new(run, 0).step_dir(1)).unwrap();
}

/// `ecdit train --resume` of `run` with `extra` flags.
fn resume(run: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--quiet", "--threads", "1", "--resume", "--out", s(run)];
    args.extend_from_slice(extra);
    ecdit().args(&args).output().expect("run ecdit")
}

/// A bad plugin fixture (engine/tests/fixtures/bad_plugin.c) built with one
/// `-D` flag, as engine/tests/common/mod.rs builds it.
fn bad_plugin(flag: &str, name: &str) -> PathBuf {
    let engine = workspace_dir().join("engine");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-input-plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("lib{name}.{}", std::env::consts::DLL_EXTENSION));
    let tmp = dir.join(format!("lib{name}.{}.tmp", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = std::process::Command::new(&cc);
    cmd.args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(engine.join("include"))
        .arg(engine.join("tests/fixtures/bad_plugin.c"));
    if !flag.is_empty() {
        cmd.arg(flag);
    }
    let status = cmd
        .arg("-o")
        .arg(&tmp)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC): {e}"));
    assert!(status.success(), "{cc} failed on bad_plugin.c {flag}");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

// ---------------------------------------------------------------------------
// CLI flags
// ---------------------------------------------------------------------------

#[test]
fn cli_train_unknown_config_name() {
    let t = Scratch::new("cli_train_unknown_config_name");
    let out = t.path("run");
    let o = run(&["train", "--config", "tiny-ex", "--out", s(&out)]);
    refused(&o, REFUSED, &["no config named 'tiny-ex'", "did you mean", "tiny-ec"]);
    assert!(!out.exists(), "nothing created for a refused run");
}

#[test]
fn cli_train_zero_steps() {
    let t = Scratch::new("cli_train_zero_steps");
    let out = t.path("run");
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--steps",
        "0",
        "--out",
        s(&out),
    ]);
    refused(&o, REFUSED, &["steps = 0", "at least 1"]);
    assert!(!out.exists());
}

#[test]
fn cli_train_zero_batch() {
    let t = Scratch::new("cli_train_zero_batch");
    let out = t.path("run");
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--batch",
        "0",
        "--out",
        s(&out),
    ]);
    refused(&o, REFUSED, &["batch = 0"]);
    assert!(!out.exists());
}

#[test]
fn cli_train_negative_batch() {
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--batch=-3",
        "--out",
        "x",
    ]);
    refused(&o, USAGE, &["--batch", "-3"]);
}

#[test]
fn cli_train_nan_learning_rate() {
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--lr",
        "NaN",
        "--out",
        "x",
    ]);
    refused(&o, REFUSED, &["optimizer.lr = NaN"]);
}

#[test]
fn cli_train_unknown_optimizer() {
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--optimizer",
        "sgd",
        "--out",
        "x",
    ]);
    refused(&o, REFUSED, &["--optimizer sgd", "adamw"]);
}

#[test]
fn cli_max_memory_unknown_unit() {
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--max-memory",
        "12XB",
        "--out",
        "x",
    ]);
    refused(&o, USAGE, &["--max-memory", "12XB", "unit 'X'"]);
}

#[test]
fn cli_max_memory_negative() {
    for cmd in ["train", "generate"] {
        let mut args = vec![cmd, "--max-memory=-1G"];
        args.extend_from_slice(if cmd == "train" { &["--out", "x"] } else { &["a circle"] });
        let o = run(&args);
        refused(&o, USAGE, &["--max-memory", "-1G", "not a positive size"]);
    }
}

#[test]
fn cli_train_out_inside_a_regular_file() {
    let t = Scratch::new("cli_train_out_inside_a_regular_file");
    let file = t.write("notes.txt", "keep me");
    let o = run(&[
        "train",
        "--config",
        "configs/train/smoke-ec.json",
        "--out",
        s(&file.join("run")),
    ]);
    refused(&o, REFUSED, &["notes.txt/run", "Not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn cli_train_resume_with_a_corrupt_config_keeps_the_run() {
    let t = Scratch::new("cli_train_resume_with_a_corrupt_config_keeps_the_run");
    let run_dir = run_copy(&t);
    let before = snapshot(&run_dir);
    let bad = t.write("bad.json", "{\n  \"model\": \"tiny-ec\",\n  \"batch\": ,\n}\n");
    let o = resume(&run_dir, &["--config", s(&bad)]);
    refused(&o, REFUSED, &["bad.json", "line 3", "\"batch\": ,"]);
    assert_eq!(snapshot(&run_dir), before, "the run directory is untouched");
}

#[test]
fn cli_train_resume_with_another_model_keeps_the_run() {
    let t = Scratch::new("cli_train_resume_with_another_model_keeps_the_run");
    let run_dir = run_copy(&t);
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &["--config", "configs/tiny-ec.json"]);
    refused(&o, REFUSED, &["cannot resume", "the model config differs"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn cli_train_resume_with_garbled_run_json_keeps_the_run() {
    let t = Scratch::new("cli_train_resume_with_garbled_run_json_keeps_the_run");
    let run_dir = run_copy(&t);
    std::fs::write(run_dir.join("run.json"), "{\"model\": {\"name\": ").unwrap();
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &[]);
    refused(&o, REFUSED, &["run.json", "not a training config"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn cli_train_resume_with_zero_patch_size_in_run_json() {
    let t = Scratch::new("cli_train_resume_with_zero_patch_size_in_run_json");
    let run_dir = run_copy(&t);
    let path = run_dir.join("run.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model"]["patch_size"] = 0.into();
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &[]);
    refused(&o, REFUSED, &["run.json", "patch_size", "at least 1"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn cli_train_giant_config_refused_before_allocating() {
    let t = Scratch::new("cli_train_giant_config_refused_before_allocating");
    let cfg = t.write("giant.json", giant_model().to_string());
    let out = t.path("run");
    let start = Instant::now();
    let o = run(&["train", "--config", s(&cfg), "--max-memory", "1G", "--out", s(&out)]);
    let took = start.elapsed();
    refused(
        &o,
        REFUSED,
        &[
            "model 'giant'",
            "needs about",
            "TiB",
            "limit of 1.00 GiB",
            "--max-memory",
        ],
    );
    assert!(!out.exists(), "nothing created for a refused run");
    // Hundreds of GiB were never allocated: the refusal costs a process start.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn cli_generate_missing_model_dir() {
    let t = Scratch::new("cli_generate_missing_model_dir");
    let missing = t.path("no-model");
    let o = run(&[
        "generate",
        "a red circle",
        "--model",
        s(&missing),
        "-o",
        s(&t.path("o.png")),
    ]);
    refused(&o, REFUSED, &["no-model", "not a directory"]);
    assert!(!t.path("o.png").exists());
}

#[test]
fn cli_generate_zero_images() {
    let o = run(&["generate", "a red circle", "-n", "0"]);
    refused(&o, REFUSED, &["-n must be at least 1"]);
}

#[test]
fn cli_generate_zero_steps_refused_before_loading() {
    // The model directory does not exist: the flag is checked first.
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "0",
        "--model",
        "/nonexistent/model",
    ]);
    refused(&o, REFUSED, &["--steps must be at least 1"]);
}

#[test]
fn cli_generate_infinite_guidance() {
    let o = run(&[
        "generate",
        "a red circle",
        "--cfg",
        "inf",
        "--model",
        "/nonexistent/model",
    ]);
    refused(&o, REFUSED, &["--cfg inf", "finite"]);
}

#[test]
fn cli_generate_with_a_truncated_model_keeps_the_existing_image() {
    let t = Scratch::new("cli_generate_with_a_truncated_model_keeps_the_existing_image");
    let model = model_copy(&t);
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let png = t.write("existing.png", b"\x89PNG an earlier image");
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&png),
    ]);
    refused(&o, REFUSED, &["model.safetensors", "truncated"]);
    assert_eq!(std::fs::read(&png).unwrap(), b"\x89PNG an earlier image");
}

#[test]
fn cli_generate_output_inside_a_regular_file() {
    let t = Scratch::new("cli_generate_output_inside_a_regular_file");
    let model = model_copy(&t);
    let file = t.write("notes.txt", "keep me");
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&file.join("out.png")),
    ]);
    refused(&o, REFUSED, &["--output", "notes.txt is a file, not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn cli_generate_output_in_a_missing_directory() {
    let t = Scratch::new("cli_generate_output_in_a_missing_directory");
    let model = model_copy(&t);
    let out = t.path("no-such-dir").join("out.png");
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&out),
    ]);
    refused(&o, REFUSED, &["--output", "no-such-dir does not exist"]);
    assert!(!t.path("no-such-dir").exists(), "no directory is made");
}

#[test]
fn cli_generate_unknown_sampler() {
    let t = Scratch::new("cli_generate_unknown_sampler");
    let model = model_copy(&t);
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--model",
        s(&model),
        "--sampler",
        "heun",
    ]);
    refused(&o, REFUSED, &["--sampler heun", "euler"]);
}

#[test]
fn cli_generate_unknown_backend() {
    let o = run(&["generate", "a red circle", "--backend", "tpu"]);
    refused(&o, REFUSED, &["--backend tpu", "unknown backend kind 'tpu'"]);
}

#[test]
fn cli_generate_over_max_memory_keeps_the_existing_image() {
    let t = Scratch::new("cli_generate_over_max_memory_keeps_the_existing_image");
    let model = model_copy(&t);
    let png = t.write("existing.png", b"an earlier image");
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--model",
        s(&model),
        "--max-memory",
        "4K",
        "-o",
        s(&png),
    ]);
    refused(
        &o,
        REFUSED,
        &["smoke-ec", "needs about", "limit of 4.00 KiB", "--max-memory"],
    );
    assert_eq!(std::fs::read(&png).unwrap(), b"an earlier image");
}

#[test]
fn cli_generate_unknown_words_are_named_in_a_warning() {
    let t = Scratch::new("cli_generate_unknown_words_are_named_in_a_warning");
    let model = model_copy(&t);
    let png = t.path("out.png");
    let o = run(&[
        "generate",
        "a zorblax circle",
        "--steps",
        "1",
        "--scale",
        "1",
        "--threads",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&png),
    ]);
    warned(&o, &["warning", "zorblax", "<unk>"]);
    assert!(png.is_file());
}

#[test]
fn cli_generate_empty_prompt_says_unconditional() {
    let t = Scratch::new("cli_generate_empty_prompt_says_unconditional");
    let model = model_copy(&t);
    let png = t.path("out.png");
    let o = run(&[
        "generate",
        "",
        "--steps",
        "1",
        "--scale",
        "1",
        "--threads",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&png),
    ]);
    warned(&o, &["empty prompt", "unconditional"]);
    assert!(png.is_file());
}

const GOOD_PROMPT: &str =
    r#"{"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}"#;

#[test]
fn cli_eval_malformed_prompt_line_is_named() {
    let t = Scratch::new("cli_eval_malformed_prompt_line_is_named");
    let file = t.write(
        "p.jsonl",
        format!("{GOOD_PROMPT}\n\n{{\"tag\": \"single_object\", \"prompt\": \n"),
    );
    let o = run(&["eval", "--prompts", s(&file), "--model", "/nonexistent/model"]);
    refused(&o, REFUSED, &["p.jsonl:3:", "not valid JSON"]);
}

#[test]
fn cli_eval_unknown_tag() {
    let t = Scratch::new("cli_eval_unknown_tag");
    let file = t.write("p.jsonl", GOOD_PROMPT.replace("single_object", "single_obj"));
    let o = run(&["eval", "--prompts", s(&file)]);
    refused(&o, REFUSED, &["p.jsonl:1:", "unknown tag 'single_obj'"]);
}

#[test]
fn cli_eval_unknown_class() {
    let t = Scratch::new("cli_eval_unknown_class");
    let file = t.write(
        "p.jsonl",
        format!("{GOOD_PROMPT}\n{}", GOOD_PROMPT.replace("\"circle\"", "\"hexagon\"")),
    );
    let o = run(&["eval", "--prompts", s(&file)]);
    refused(&o, REFUSED, &["p.jsonl:2:", "include[0]", "unknown class 'hexagon'"]);
}

#[test]
fn cli_eval_unknown_colour() {
    let t = Scratch::new("cli_eval_unknown_colour");
    let line = GOOD_PROMPT.replace("\"count\": 1", "\"count\": 1, \"color\": \"mauve\"");
    let file = t.write("p.jsonl", line);
    let o = run(&["eval", "--prompts", s(&file)]);
    refused(&o, REFUSED, &["p.jsonl:1:", "unknown color 'mauve'"]);
}

#[test]
fn cli_eval_zero_samples_per_prompt() {
    let o = run(&["eval", "--samples-per-prompt", "0"]);
    refused(&o, REFUSED, &["--samples-per-prompt must be at least 1"]);
}

#[test]
fn cli_eval_output_inside_a_regular_file() {
    let t = Scratch::new("cli_eval_output_inside_a_regular_file");
    let file = t.write("notes.txt", "keep me");
    let o = run(&["eval", "--limit", "1", "-o", s(&file.join("eval"))]);
    refused(&o, REFUSED, &["--output", "notes.txt is a file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn cli_inspect_output_inside_a_regular_file_refused_before_loading() {
    let t = Scratch::new("cli_inspect_output_inside_a_regular_file_refused_before_loading");
    let file = t.write("notes.txt", "keep me");
    let o = run(&[
        "inspect",
        "a circle",
        "--model",
        "/nonexistent/model",
        "-o",
        s(&file.join("maps")),
    ]);
    refused(&o, REFUSED, &["--output", "notes.txt is a file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn cli_export_of_a_missing_run() {
    let t = Scratch::new("cli_export_of_a_missing_run");
    let out = t.path("exported");
    let o = run(&["export", s(&t.path("no-run")), "-o", s(&out)]);
    refused(&o, REFUSED, &["no-run/run.json"]);
    assert!(!out.exists());
}

#[test]
fn cli_export_unknown_dtype() {
    let o = run(&["export", "somewhere", "-o", "x", "--dtype", "f64"]);
    refused(&o, USAGE, &["--dtype", "f64", "f32 or bf16"]);
}

#[test]
fn cli_export_with_every_checkpoint_damaged_writes_nothing() {
    let t = Scratch::new("cli_export_with_every_checkpoint_damaged_writes_nothing");
    let run_dir = run_copy(&t);
    let store = CheckpointStore::new(&run_dir, 0);
    for step in [1, 2] {
        std::fs::write(store.step_dir(step).join("tensors.safetensors"), b"garbage").unwrap();
    }
    let before = snapshot(&run_dir);
    let out = t.path("exported");
    let o = run(&["export", s(&run_dir), "-o", s(&out)]);
    refused(&o, REFUSED, &["no checkpoint", "step-00000002", "step-00000001"]);
    assert!(!out.exists());
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn cli_info_unknown_config() {
    let o = run(&["info", "--config", "ec-dit-xl-33e"]);
    refused(&o, REFUSED, &["no config named 'ec-dit-xl-33e'", "ec-dit-xl-32e"]);
}

#[test]
fn cli_info_zero_batch() {
    let o = run(&["info", "--config", "tiny-ec", "--batch", "0"]);
    refused(&o, REFUSED, &["--batch must be at least 1"]);
}

#[test]
fn cli_data_zero_count() {
    let t = Scratch::new("cli_data_zero_count");
    let o = run(&["data", "preview", "-n", "0", "-o", s(&t.path("grid.png"))]);
    refused(&o, REFUSED, &["--count must be at least 1"]);
    assert!(!t.path("grid.png").exists());
}

#[test]
fn cli_data_output_inside_a_regular_file() {
    let t = Scratch::new("cli_data_output_inside_a_regular_file");
    let file = t.write("notes.txt", "keep me");
    let o = run(&["data", "preview", "-n", "1", "-o", s(&file.join("grid.png"))]);
    refused(&o, REFUSED, &["--output", "notes.txt is a file, not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn cli_data_missing_folder() {
    let o = run(&["data", "preview", "--data", "/nonexistent/photos"]);
    refused(&o, REFUSED, &["/nonexistent/photos", "directory of PNG images"]);
}

#[test]
fn cli_plugin_that_is_not_a_library() {
    let t = Scratch::new("cli_plugin_that_is_not_a_library");
    let file = t.write("router.so", "#!/bin/sh\necho not a library\n");
    let o = run(&["--plugin", s(&file), "components"]);
    refused(
        &o,
        REFUSED,
        &["--plugin", "router.so", "cannot load as a shared library"],
    );
}

#[test]
fn cli_plugin_missing_file() {
    let o = run(&["--plugin", "/nonexistent/libnothing.so", "components"]);
    refused(&o, REFUSED, &["/nonexistent/libnothing.so"]);
}

// ---------------------------------------------------------------------------
// Model configs and training configs
// ---------------------------------------------------------------------------

/// The tiny model config with `edit` applied, as a file, loaded.
fn load_edited_config(case: &str, edit: impl FnOnce(&mut Value)) -> (ConfigError, String) {
    let t = Scratch::new(case);
    let mut cfg = tiny_model();
    edit(&mut cfg);
    let path = t.write("model.json", serde_json::to_string_pretty(&cfg).unwrap());
    let e = error_of(load_config(&path));
    let text = e.to_string();
    assert!(text.contains("model.json"), "the file is named: {text}");
    (e, text)
}

#[test]
fn config_field_of_the_wrong_type() {
    let (e, text) = load_edited_config("config_field_of_the_wrong_type", |c| c["hidden"] = "32".into());
    assert!(matches!(e, ConfigError::Parse { line, .. } if line > 1), "{text}");
    assert!(text.contains("\"hidden\": \"32\""), "the line is quoted: {text}");
}

#[test]
fn config_unknown_field() {
    let (e, text) = load_edited_config("config_unknown_field", |c| c["hiden"] = 64.into());
    assert!(matches!(e, ConfigError::Parse { .. }), "{text}");
    assert!(text.contains("unknown field `hiden`"), "{text}");
}

#[test]
fn config_missing_field() {
    let (e, text) = load_edited_config("config_missing_field", |c| {
        c.as_object_mut().unwrap().remove("depth");
    });
    assert!(matches!(e, ConfigError::Parse { .. }), "{text}");
    assert!(text.contains("missing field `depth`"), "{text}");
}

#[test]
fn config_negative_size() {
    let (e, text) = load_edited_config("config_negative_size", |c| c["depth"] = (-2).into());
    assert!(matches!(e, ConfigError::Parse { .. }), "{text}");
    assert!(text.contains("\"depth\": -2"), "{text}");
}

#[test]
fn config_heads_not_dividing_hidden() {
    let (e, text) = load_edited_config("config_heads_not_dividing_hidden", |c| {
        c["heads"] = 3.into();
        c["kv_heads"] = 3.into();
    });
    assert!(matches!(e, ConfigError::Invalid { .. }), "{text}");
    assert!(
        text.contains("'heads' = 3") && text.contains("does not divide hidden 32"),
        "{text}"
    );
}

#[test]
fn config_zero_depth() {
    let (e, text) = load_edited_config("config_zero_depth", |c| c["depth"] = 0.into());
    assert!(matches!(e, ConfigError::Invalid { .. }), "{text}");
    assert!(text.contains("'depth' = 0"), "{text}");
}

#[test]
fn config_size_over_the_limit() {
    let (e, text) = load_edited_config("config_size_over_the_limit", |c| c["hidden"] = (1u64 << 40).into());
    assert!(matches!(e, ConfigError::Invalid { .. }), "{text}");
    assert!(text.contains("'hidden'") && text.contains("over the limit"), "{text}");
}

#[test]
fn config_truncated_json() {
    let t = Scratch::new("config_truncated_json");
    let text = serde_json::to_string_pretty(&tiny_model()).unwrap();
    let path = t.write("model.json", &text[..text.len() / 2]);
    let e = error_of(load_config(&path));
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("model.json at line"), "{e}");
}

#[test]
fn config_file_over_the_size_cap_is_not_read() {
    let t = Scratch::new("config_file_over_the_size_cap_is_not_read");
    let path = t.path("huge.json");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(limits::MAX_TEXT_FILE + 1).unwrap(); // sparse
    let start = Instant::now();
    let e = error_of(load_config(&path));
    assert!(matches!(e, ConfigError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("huge.json") && e.to_string().contains("16.00 MiB"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn training_config_field_of_the_wrong_type_is_named() {
    let t = Scratch::new("training_config_field_of_the_wrong_type_is_named");
    let path = t.write("train.json", r#"{"model": "tiny-ec", "steps": 10, "batch": "four"}"#);
    let e = error_of(TrainConfig::resolve(s(&path)));
    assert!(matches!(e, TrainConfigError::File(ConfigError::Parse { .. })), "{e}");
    let text = e.to_string();
    assert!(text.contains("train.json") && text.contains("field 'batch'"), "{text}");
}

#[test]
fn training_config_unknown_field() {
    let t = Scratch::new("training_config_unknown_field");
    let mut cfg = json!({"model": tiny_model(), "steps": 10});
    cfg["stepz"] = 3.into();
    let path = t.write("train.json", serde_json::to_string_pretty(&cfg).unwrap());
    let e = error_of(TrainConfig::resolve(s(&path)));
    let text = e.to_string();
    assert!(
        text.contains("train.json") && text.contains("unknown field `stepz`") && text.contains("line"),
        "{text}"
    );
}

#[test]
fn training_config_out_of_range_value() {
    let t = Scratch::new("training_config_out_of_range_value");
    let path = t.write(
        "train.json",
        json!({"model": tiny_model(), "mask_ratio": 1.5}).to_string(),
    );
    let e = error_of(TrainConfig::resolve(s(&path)));
    assert!(
        matches!(
            e,
            TrainConfigError::Field {
                field: "mask_ratio",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("train.json"), "{e}");
}

// ---------------------------------------------------------------------------
// Component specs
// ---------------------------------------------------------------------------

#[test]
fn spec_unknown_router_kind() {
    let e = error_of(registry().router(&json!({"kind": "expert-chioce"})));
    assert!(matches!(e, EngineError::UnknownKind { .. }), "{e}");
    assert!(
        e.to_string().contains("'expert-chioce'") && e.to_string().contains("expert-choice"),
        "{e}"
    );
}

#[test]
fn spec_router_capacity_factor_out_of_range() {
    let e = error_of(registry().router(&json!({"kind": "expert-choice", "capacity_factor": -1.0})));
    assert!(matches!(e, EngineError::BadParam { .. }), "{e}");
    assert!(e.to_string().contains("capacity_factor"), "{e}");
}

#[test]
fn spec_router_unknown_parameter() {
    let e = error_of(registry().router(&json!({"kind": "expert-choice", "capcity_factor": 2.0})));
    assert!(matches!(e, EngineError::BadParam { .. }), "{e}");
    assert!(
        e.to_string().contains("'capcity_factor'") && e.to_string().contains("unknown parameter"),
        "{e}"
    );
}

#[test]
fn spec_router_parameter_of_the_wrong_type() {
    let e = error_of(registry().router(&json!({"kind": "expert-choice", "capacity_factor": "two"})));
    assert!(matches!(e, EngineError::BadParam { .. }), "{e}");
    assert!(e.to_string().contains("capacity_factor"), "{e}");
}

#[test]
fn spec_unknown_expert_kind_in_a_model() {
    let mut cfg = tiny_model();
    cfg["moe"]["expert"]["kind"] = "gelu-mpl".into();
    let cfg = serde_json::from_value(cfg).unwrap();
    let e = error_of(Model::new(cfg, &registry(), backend(), 0));
    assert!(matches!(e, ModelError::Engine(EngineError::UnknownKind { .. })), "{e}");
    assert!(e.to_string().contains("unknown expert kind 'gelu-mpl'"), "{e}");
}

#[test]
fn spec_unknown_scheduler_kind() {
    let e = error_of(registry().scheduler(&json!({"kind": "rectified-flo"})));
    assert!(matches!(e, EngineError::UnknownKind { .. }), "{e}");
    assert!(e.to_string().contains("'rectified-flo'"), "{e}");
}

#[test]
fn spec_routing_groups_that_split_an_image() {
    let (e, text) = load_edited_config("spec_routing_groups_that_split_an_image", |c| {
        c["moe"]["router"]["groups"] = json!({"tokens": 7});
    });
    assert!(matches!(e, ConfigError::Invalid { .. }), "{text}");
    assert!(text.contains("moe.router.groups.tokens"), "{text}");
}

// ---------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------

#[test]
fn weights_truncated_file() {
    let t = Scratch::new("weights_truncated_file");
    let model = model_copy(&t);
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Format { .. })), "{e}");
    assert!(
        e.to_string().contains("model.safetensors") && e.to_string().contains("truncated"),
        "{e}"
    );
}

#[test]
fn weights_header_length_past_the_end_of_the_file() {
    let t = Scratch::new("weights_header_length_past_the_end_of_the_file");
    let mut bytes = 5000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\": 1}");
    let path = t.write("model.safetensors", bytes);
    let e = error_of(Weights::open(&path));
    assert!(matches!(e, WeightsError::Header { .. }), "{e}");
    assert!(
        e.to_string().contains("model.safetensors") && e.to_string().contains("claims 5000 bytes"),
        "{e}"
    );
}

#[test]
fn weights_header_over_the_limit_is_not_parsed() {
    let t = Scratch::new("weights_header_over_the_limit_is_not_parsed");
    let path = t.path("model.safetensors");
    let claim = limits::MAX_HEADER + 1;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(claim + 8).unwrap(); // sparse: the header "fits" the file
    drop(f);
    let mut head = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut head, &claim.to_le_bytes()).unwrap();
    let start = Instant::now();
    let e = error_of(Weights::open(&path));
    assert!(matches!(e, WeightsError::Header { .. }), "{e}");
    assert!(e.to_string().contains("more than the limit of 16.00 MiB"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn weights_header_not_json() {
    let t = Scratch::new("weights_header_not_json");
    let mut bytes = 12u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"hello world!");
    let path = t.write("model.safetensors", bytes);
    let e = error_of(Weights::open(&path));
    assert!(matches!(e, WeightsError::Format { .. }), "{e}");
    assert!(
        e.to_string().contains("model.safetensors") && e.to_string().contains("not valid safetensors"),
        "{e}"
    );
}

#[test]
fn weights_missing_tensor() {
    let t = Scratch::new("weights_missing_tensor");
    let model = edited_model(&t, |tensors, _| tensors.retain(|x| x.0 != "blocks.1.moe.router.weight"));
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Missing { .. })), "{e}");
    assert!(e.to_string().contains("'blocks.1.moe.router.weight' is missing"), "{e}");
}

#[test]
fn weights_tensor_of_the_wrong_shape() {
    let t = Scratch::new("weights_tensor_of_the_wrong_shape");
    let model = edited_model(&t, |tensors, _| {
        let x = tensors.iter_mut().find(|x| x.0 == "final_layer.linear.weight").unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Shape { .. })), "{e}");
    assert!(e.to_string().contains("'final_layer.linear.weight' has shape"), "{e}");
}

#[test]
fn weights_tensor_of_the_wrong_dtype() {
    let t = Scratch::new("weights_tensor_of_the_wrong_dtype");
    let model = edited_model(&t, |tensors, _| {
        let x = tensors.iter_mut().find(|x| x.0 == "x_embedder.proj.bias").unwrap();
        x.1 = "I32".into(); // the same bytes, not floats
    });
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Dtype { .. })), "{e}");
    assert!(e.to_string().contains("'x_embedder.proj.bias' has dtype I32"), "{e}");
}

#[test]
fn weights_tensor_the_model_does_not_use() {
    let t = Scratch::new("weights_tensor_the_model_does_not_use");
    let model = edited_model(&t, |tensors, _| {
        tensors.push(("blocks.9.mlp.fc1.weight".into(), "F32".into(), vec![2], vec![0; 8]));
    });
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Unused { .. })), "{e}");
    assert!(e.to_string().contains("blocks.9.mlp.fc1.weight"), "{e}");
}

#[test]
fn weights_without_the_config_metadata() {
    let t = Scratch::new("weights_without_the_config_metadata");
    let model = edited_model(&t, |_, meta| {
        meta.remove("config");
    });
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Metadata { .. })), "{e}");
    assert!(e.to_string().contains("metadata 'config'"), "{e}");
}

#[test]
fn weights_header_naming_a_giant_model_allocates_nothing() {
    // A 20 KB file whose metadata says the model is 1000 blocks of width 8192:
    // refused for the tensors it lacks before anything is allocated.
    let t = Scratch::new("weights_header_naming_a_giant_model_allocates_nothing");
    let model = edited_model(&t, |_, meta| {
        meta.insert("config".into(), giant_model().to_string());
    });
    let start = Instant::now();
    let e = error_of(load_model(&model));
    assert!(matches!(e, ModelError::Weights(WeightsError::Shape { .. })), "{e}");
    assert!(e.to_string().contains("x_embedder.proj.weight"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    // Through a generator the memory limit refuses it first, with the estimate.
    let e = error_of(Generator::load_with(
        &model,
        &registry(),
        backend(),
        LoadOptions {
            max_memory: Some(1 << 30),
            ..LoadOptions::default()
        },
    ));
    assert!(matches!(e, SampleError::ModelDir { .. }), "{e}");
    assert!(
        e.to_string().contains("needs about") && e.to_string().contains("1.00 GiB"),
        "{e}"
    );
}

#[test]
fn weights_with_nan_are_named_and_sampling_refuses_the_result() {
    // The loader warns naming the tensor (a diverged checkpoint can still be
    // inspected); the sampler refuses the non-finite velocity it leads to,
    // and the image already at the output path stays.
    let t = Scratch::new("weights_with_nan_are_named_and_sampling_refuses_the_result");
    let model = edited_model(&t, |tensors, _| {
        let x = tensors.iter_mut().find(|x| x.0 == "t_embedder.mlp.0.bias").unwrap();
        x.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let png = t.write("existing.png", b"an earlier image");
    let o = run(&[
        "generate",
        "a red circle",
        "--steps",
        "1",
        "--scale",
        "1",
        "--model",
        s(&model),
        "-o",
        s(&png),
    ]);
    refused(
        &o,
        REFUSED,
        &["'t_embedder.mlp.0.bias' holds 1 NaN", "non-finite value"],
    );
    assert_eq!(std::fs::read(&png).unwrap(), b"an earlier image");
}

#[test]
fn weights_text_encoder_of_another_width() {
    let t = Scratch::new("weights_text_encoder_of_another_width");
    let model = model_copy(&t);
    // The model's own file in place of the text encoder: every tensor is wrong.
    std::fs::copy(model.join("model.safetensors"), model.join("text_encoder.safetensors")).unwrap();
    let e = error_of(Generator::load(&model, &registry(), backend()));
    assert!(matches!(e, SampleError::ModelDir { .. }), "{e}");
    assert!(e.to_string().contains("text_encoder.safetensors does not fit"), "{e}");
}

// ---------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------

#[test]
fn checkpoint_truncated_with_no_older_one_keeps_the_run() {
    let t = Scratch::new("checkpoint_truncated_with_no_older_one_keeps_the_run");
    let run_dir = run_copy(&t);
    only_newest_checkpoint(&run_dir);
    let file = CheckpointStore::new(&run_dir, 0)
        .step_dir(2)
        .join("tensors.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &["--steps", "3"]);
    refused(&o, REFUSED, &["no checkpoint", "step-00000002", "truncated"]);
    assert_eq!(snapshot(&run_dir), before, "the damaged checkpoint is kept as it was");
}

#[test]
fn checkpoint_corrupt_optimizer_state_keeps_the_run() {
    let t = Scratch::new("checkpoint_corrupt_optimizer_state_keeps_the_run");
    let run_dir = run_copy(&t);
    only_newest_checkpoint(&run_dir);
    edit_checkpoint(&run_dir, |tensors, _| {
        let opt = tensors
            .iter_mut()
            .find(|(n, _)| n == "opt0/final_layer.linear.bias")
            .unwrap();
        opt.1 = TensorData::from_f32(vec![1], &[0.0]);
    });
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &["--steps", "3"]);
    refused(&o, REFUSED, &["step-00000002", "'opt0/final_layer.linear.bias'"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn checkpoint_of_another_model_keeps_the_run() {
    let t = Scratch::new("checkpoint_of_another_model_keeps_the_run");
    let run_dir = run_copy(&t);
    only_newest_checkpoint(&run_dir);
    edit_checkpoint(&run_dir, |_, state| state["config"]["model"]["hidden"] = 64.into());
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &["--steps", "3"]);
    refused(&o, REFUSED, &["step-00000002", "is of another run", "model config"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn checkpoint_state_missing_the_optimizer_steps_keeps_the_run() {
    let t = Scratch::new("checkpoint_state_missing_the_optimizer_steps_keeps_the_run");
    let run_dir = run_copy(&t);
    only_newest_checkpoint(&run_dir);
    edit_checkpoint(&run_dir, |_, state| {
        state.as_object_mut().unwrap().remove("optimizer_steps");
    });
    let before = snapshot(&run_dir);
    let o = resume(&run_dir, &["--steps", "3"]);
    refused(&o, REFUSED, &["step-00000002", "'optimizer_steps' missing"]);
    assert_eq!(snapshot(&run_dir), before);
}

#[test]
fn checkpoint_step_disagreeing_with_its_directory() {
    let t = Scratch::new("checkpoint_step_disagreeing_with_its_directory");
    let run_dir = run_copy(&t);
    let dir = CheckpointStore::new(&run_dir, 0).step_dir(2);
    let path = dir.join("state.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state["step"] = 7.into();
    std::fs::write(&path, state.to_string()).unwrap();
    let e = error_of(CheckpointStore::load(&dir));
    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains("step-00000002") && e.to_string().contains("says step 7"),
        "{e}"
    );
}

#[test]
fn checkpoint_state_file_over_the_size_cap_is_not_read() {
    let t = Scratch::new("checkpoint_state_file_over_the_size_cap_is_not_read");
    let run_dir = run_copy(&t);
    let dir = CheckpointStore::new(&run_dir, 0).step_dir(2);
    let f = std::fs::File::create(dir.join("state.json")).unwrap();
    f.set_len(limits::MAX_TEXT_FILE + 1).unwrap();
    let e = error_of(CheckpointStore::load(&dir));
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("state.json") && e.to_string().contains("16.00 MiB"),
        "{e}"
    );
}

#[test]
fn checkpoint_run_json_naming_a_giant_model_allocates_nothing() {
    // run.json says the model is huge; its checkpoints hold the small one.
    let t = Scratch::new("checkpoint_run_json_naming_a_giant_model_allocates_nothing");
    let run_dir = run_copy(&t);
    std::fs::remove_file(run_dir.join("model.safetensors")).unwrap();
    let path = run_dir.join("run.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model"] = giant_model();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let start = Instant::now();
    let e = error_of(ecdit_model::train::run::load_ema(&run_dir, &registry(), backend()));
    assert!(matches!(e, TrainError::Other(_)), "{e}");
    assert!(
        e.to_string().contains("step-00000002") && e.to_string().contains("ema/"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

// ---------------------------------------------------------------------------
// Prompts, prompt files and vocabularies
// ---------------------------------------------------------------------------

#[test]
fn prompt_with_unknown_words_names_them() {
    let tok = Tokenizer::new(Vocab::builtin().unwrap(), 16).unwrap();
    let t = tok.tokenize_quiet("a zorblax circle and a quux");
    assert_eq!(t.unknown, vec!["zorblax".to_string(), "quux".to_string()]);
}

#[test]
fn prompt_longer_than_max_tokens_is_cut_and_says_so() {
    let tok = Tokenizer::new(Vocab::builtin().unwrap(), 4).unwrap();
    let t = tok.tokenize_quiet("a photo of a red circle left of a blue square");
    assert!(t.truncated);
    assert_eq!(t.ids.len(), 4);
}

fn prompt_error(case: &str, text: &str) -> (EvalError, String) {
    let t = Scratch::new(case);
    let path = t.write("prompts.jsonl", text);
    let e = error_of(read_prompts(&path));
    let msg = e.to_string();
    assert!(msg.contains("prompts.jsonl"), "the file is named: {msg}");
    (e, msg)
}

#[test]
fn prompt_file_count_of_zero() {
    let (e, msg) = prompt_error(
        "prompt_file_count_of_zero",
        &GOOD_PROMPT.replace("\"count\": 1", "\"count\": 0"),
    );
    assert!(matches!(e, EvalError::Prompt { line: 1, .. }), "{msg}");
    assert!(msg.contains("'count'"), "{msg}");
}

#[test]
fn prompt_file_unknown_relation() {
    let line = r#"{"tag": "position", "prompt": "a circle beneath a square", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["beneath", 0]}]}"#;
    let (e, msg) = prompt_error("prompt_file_unknown_relation", &format!("{GOOD_PROMPT}\n{line}\n"));
    assert!(matches!(e, EvalError::Prompt { line: 2, .. }), "{msg}");
    assert!(msg.contains("unknown relation 'beneath'"), "{msg}");
}

#[test]
fn prompt_file_without_prompts() {
    let (e, msg) = prompt_error("prompt_file_without_prompts", "\n\n   \n");
    assert!(matches!(e, EvalError::Prompt { .. }), "{msg}");
    assert!(msg.contains("holds no prompts"), "{msg}");
}

#[test]
fn prompt_file_over_the_size_cap_is_not_read() {
    let t = Scratch::new("prompt_file_over_the_size_cap_is_not_read");
    let path = t.path("prompts.jsonl");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(limits::MAX_TEXT_FILE + 1)
        .unwrap();
    let e = error_of(read_prompts(&path));
    assert!(matches!(e, EvalError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("prompts.jsonl") && e.to_string().contains("16.00 MiB"),
        "{e}"
    );
}

#[test]
fn vocabulary_with_a_duplicate_token_names_the_line() {
    let t = Scratch::new("vocabulary_with_a_duplicate_token_names_the_line");
    let path = t.write("vocab.txt", "<pad>\n<unk>\ncircle\n<bos>\n<eos>\ncircle\n");
    let e = error_of(Vocab::from_path(&path));
    assert!(matches!(e, TextError::Vocab { line: 6, .. }), "{e}");
    assert!(
        e.to_string().contains("vocab.txt") && e.to_string().contains("duplicate token 'circle'"),
        "{e}"
    );
}

#[test]
fn vocabulary_without_a_special_token() {
    let e = error_of(Vocab::parse("<pad>\n<bos>\n<eos>\ncircle\n", "vocab.txt"));
    assert!(matches!(e, TextError::Vocab { .. }), "{e}");
    assert!(e.to_string().contains("'<unk>'"), "{e}");
}

// ---------------------------------------------------------------------------
// Plugins
// ---------------------------------------------------------------------------

fn plugin_error(lib: &Path) -> String {
    let mut reg = registry();
    let e = error_of(reg.load_plugin(lib));
    assert!(matches!(e, EngineError::Plugin { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(s(lib)), "the library is named: {msg}");
    msg
}

#[test]
fn plugin_that_is_not_a_library() {
    let t = Scratch::new("plugin_that_is_not_a_library");
    let path = t.write("libnotes.so", "just text");
    let msg = plugin_error(&path);
    assert!(msg.contains("cannot load as a shared library"), "{msg}");
}

#[test]
fn plugin_without_the_entry_symbol() {
    let msg = plugin_error(&bad_plugin("-DNO_ENTRY", "catalogue_no_entry"));
    assert!(msg.contains("ecdit_plugin_entry"), "{msg}");
}

#[test]
fn plugin_of_another_abi_version() {
    let msg = plugin_error(&bad_plugin("-DABI=99", "catalogue_abi_99"));
    assert!(msg.contains("99"), "{msg}");
    assert!(
        msg.contains(&ecdit_engine::plugin::abi::ABI_VERSION.to_string()),
        "the host's version too: {msg}"
    );
}

#[test]
fn plugin_whose_entry_returns_null() {
    let msg = plugin_error(&bad_plugin("-DNULL_ENTRY", "catalogue_null_entry"));
    assert!(msg.contains("returned null"), "{msg}");
}

#[test]
fn plugin_with_a_bad_parameter_list() {
    let msg = plugin_error(&bad_plugin("-DBAD_PARAMS", "catalogue_bad_params"));
    assert!(msg.contains("params_json"), "{msg}");
}

// ---------------------------------------------------------------------------
// Resource limits (library)
// ---------------------------------------------------------------------------

#[test]
fn limit_giant_training_config_refused_in_milliseconds() {
    let cfg = TrainConfig::for_model(serde_json::from_value(giant_model()).unwrap());
    let start = Instant::now();
    let estimate = limits::training_estimate(&cfg, &registry()).unwrap();
    let e = limits::check_memory("model 'giant' at batch 32", estimate, Some(1 << 30), "lower --batch").unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    // 1000 blocks of 12 d^2 (and the experts') parameters: hundreds of GiB.
    assert!(estimate.weights > 800 << 30, "{estimate:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("needs about") && msg.contains("limit of 1.00 GiB (--max-memory)"),
        "{msg}"
    );
}

#[test]
fn limit_info_of_sizes_at_their_bounds_saturates() {
    // Every tensor dimension at its bound: `ecdit info` reports saturated
    // counts instead of overflowing.
    let t = Scratch::new("limit_info_of_sizes_at_their_bounds_saturates");
    let mut m = tiny_model();
    for (k, v) in [
        ("input_size", 1 << 20),
        ("patch_size", 1 << 20),
        ("in_channels", 1 << 20),
        ("hidden", 1 << 20),
        ("heads", 1 << 10),
        ("kv_heads", 1 << 10),
        ("depth", 4096),
    ] {
        m[k] = json!(v);
    }
    m["mlp_ratio"] = 1.0.into();
    let cfg = t.write("absurd.json", m.to_string());
    let o = run(&["info", "--config", s(&cfg)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(out.contains(&u64::MAX.to_string()), "saturated: {out}");
}

#[test]
fn limit_absurd_sizes_estimate_without_overflow() {
    // Every size at its bound: the estimate saturates instead of overflowing.
    let mut m = tiny_model();
    for (k, v) in [
        ("input_size", 1 << 20),
        ("hidden", 1 << 20),
        ("heads", 1 << 10),
        ("kv_heads", 1 << 10),
    ] {
        m[k] = json!(v);
    }
    m["patch_size"] = 1.into();
    m["mlp_ratio"] = 1.0.into();
    let cfg: ecdit_model::config::ModelConfig = serde_json::from_value(m).unwrap();
    cfg.validate().unwrap();
    let estimate = limits::inference_estimate(&cfg, &registry(), 1 << 30).unwrap();
    assert!(estimate.total() > 1 << 60, "{estimate:?}");
    assert!(limits::check_memory("absurd", estimate, Some(u64::MAX - 1), "").is_err());
}
