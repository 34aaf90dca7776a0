//! The fuzz targets' inputs in the normal suite (fuzz/README.md).
//!
//! - Every committed seed under `fuzz/corpus/<target>/` goes through its
//!   target's entry point: no panic, and seeds named `bad-*` are refused with
//!   an error while every other seed is accepted.
//! - Every input that found a bug while fuzzing is replayed with the error it
//!   gives now (`found_*` tests below).
//!
//! The entry points are `fuzz/src/lib.rs`, included here by path: the fuzz
//! crate is a workspace of its own that needs nightly and libFuzzer; this
//! file needs neither. `write_seed_corpus` (ignored) regenerates the seeds
//! made by the project's own writers.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod entry;

use entry::{Entry, Outcome, TARGETS};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one input, turning a panic into a test failure that names the input.
fn replay(target: &str, f: Entry, name: &str, bytes: &[u8]) -> Outcome {
    std::panic::catch_unwind(|| f(bytes)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{target}: input {name} panicked: {msg}")
    })
}

fn target(name: &str) -> Entry {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no target {name}"))
}

#[test]
fn every_seed_is_accepted_or_refused_as_its_name_says() {
    let mut wrong = Vec::new();
    for (name, f) in TARGETS {
        let dir = repo().join("fuzz/corpus").join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 3,
            "{name}: only {} seeds in {}",
            files.len(),
            dir.display()
        );
        for file in files {
            let seed = file.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&file).unwrap();
            match (seed.starts_with("bad-"), replay(name, *f, &seed, &bytes)) {
                (false, Err(e)) => wrong.push(format!("{name}/{seed} was refused: {e}")),
                (true, Ok(())) => wrong.push(format!("{name}/{seed} was accepted, but it is a bad- seed")),
                (true, Err(e)) if e.trim().is_empty() => wrong.push(format!("{name}/{seed}: empty error")),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Replays an input that once found a bug: it must now be refused with an
/// error containing every one of `expect`.
fn refused(target_name: &str, input: &[u8], expect: &[&str]) {
    match replay(target_name, target(target_name), "regression input", input) {
        Ok(()) => panic!("{target_name}: accepted {}", String::from_utf8_lossy(input)),
        Err(e) => assert!(expect.iter().all(|x| e.contains(x)), "{target_name}: {e}"),
    }
}

/// component_spec, crash-baa85b2c: a DDPM spec with 10^15 timesteps made the
/// schedule allocate 8 PB when built (an abort, not an error). Now capped at
/// `Ddpm::MAX_TRAIN_STEPS`.
#[test]
fn found_ddpm_train_steps_too_large_to_allocate() {
    refused(
        "component_spec",
        br#"{"beta_end":0.02,"beta_start":0.0001,"kind":"ddpm","spacing":"leading","train_steps":1033333333333300}"#,
        &[
            "scheduler 'ddpm'",
            "'train_steps'",
            "1033333333333300",
            "at most 1048576",
        ],
    );
}

/// plugin_descriptor, crash-e22e7e8f (after 315,611 runs): a version 2
/// descriptor with struct_size 74, two bytes into the `features` pointer (at
/// 72): the host read those two bytes and six zeros as the pointer and
/// dereferenced it (a SEGV). Sizes that are not a whole number of pointers
/// are now refused.
#[test]
fn found_struct_size_cutting_a_pointer_in_part() {
    let input = std::fs::read(repo().join("fuzz/regressions/plugin_descriptor-crash-e22e7e8f")).unwrap();
    refused(
        "plugin_descriptor",
        &input,
        &["plugin descriptor", "struct_size", "not a multiple of 8"],
    );
}

/// model_config, crash-6251246d (after 7,674,393 runs): an expert spec
/// holding `911111111111111111111.0` read back one bit off after the config
/// was written (serde_json's default float parser is not correctly rounded),
/// so a saved model's config did not equal the one it was saved from. The
/// workspace now builds serde_json with `float_roundtrip`.
#[test]
fn found_a_float_that_did_not_survive_a_config_round_trip() {
    let input = std::fs::read(repo().join("fuzz/regressions/model_config-crash-6251246d")).unwrap();
    // Accepted or refused, but no round-trip assertion fails inside.
    let _ = replay("model_config", target("model_config"), "crash-6251246d", &input);
    let x: f64 = serde_json::from_str("911111111111111111111.0").unwrap();
    let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
    assert_eq!(back.to_bits(), x.to_bits());
}

/// Regenerates the seeds the project's writers make (weights files,
/// checkpoints, plugin descriptors, specs) and copies the shipped files
/// (configs, prompts, vocabulary) the others come from:
/// `cargo test -p ecdit-tests --test fuzz_regressions -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    seeds::write_all(&repo());
}

mod seeds {
    use super::entry::{
        desc_bytes, encode_descriptor, fixture, pack_checkpoint, CHECKPOINT_FIX_CRC, CHECKPOINT_STEP_DIR, TINY_MODEL,
    };
    use ecdit_engine::{DType, Family};
    use ecdit_model::model::Model;
    use ecdit_model::text::BUILTIN_VOCAB;
    use ecdit_model::train::checkpoint::{CheckpointStore, TensorData};
    use ecdit_model::train::config::TrainConfig;
    use ecdit_model::weights::{save_params, save_safetensors, SaveTensor};
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::path::Path;

    fn put(repo: &Path, target: &str, name: &str, bytes: &[u8]) {
        let dir = repo.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    pub fn write_all(repo: &Path) {
        let scratch = std::env::temp_dir().join(format!("ecdit-fuzz-seeds-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        weights(repo, &scratch);
        configs(repo);
        specs(repo);
        tokenizer(repo);
        prompts(repo);
        checkpoints(repo, &scratch);
        plugins(repo);
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    fn weights(repo: &Path, scratch: &Path) {
        let f = fixture();
        let t = "safetensors_weights";
        let mut model = Model::new(f.tiny.clone(), &f.registry, f.backend.clone(), 7).unwrap();
        let path = scratch.join("m.safetensors");
        model.save(&path).unwrap();
        let f32_file = std::fs::read(&path).unwrap();
        put(repo, t, "tiny-f32.safetensors", &f32_file);
        put(repo, t, "bad-truncated.safetensors", &f32_file[..f32_file.len() - 7]);
        let extra = vec![SaveTensor {
            name: "extra.weight".into(),
            shape: vec![2],
            data: vec![1.0, 2.0].into(),
            dtype: DType::F32,
        }];
        save_params(&path, f.backend.as_ref(), &model.params(), extra, HashMap::new()).unwrap();
        put(repo, t, "bad-unused-tensor.safetensors", &std::fs::read(&path).unwrap());
        let meta = HashMap::from([("format".to_string(), "ecdit".to_string())]);
        save_safetensors(&path, &[("pos_embed".into(), vec![1, 4, 8], &[0.5; 32][..])], meta).unwrap();
        put(
            repo,
            t,
            "bad-missing-tensors.safetensors",
            &std::fs::read(&path).unwrap(),
        );
        model.to_dtype(DType::BF16).unwrap();
        model.save(&path).unwrap();
        put(repo, t, "tiny-bf16.safetensors", &std::fs::read(&path).unwrap());
    }

    fn configs(repo: &Path) {
        let t = "model_config";
        for file in [
            "tiny-ec.json",
            "small/ec-s-8e.json",
            "small/tc-s-8e.json",
            "small/dense-s.json",
            "dit/dit-s-2.json",
            "paper/ec-dit-xl-32e.json",
            "paper/gshard-xxl-32e.json",
            "train/smoke-ec.json",
            "train/shapes-ec.json",
        ] {
            let text = std::fs::read(repo.join("configs").join(file)).unwrap();
            put(repo, t, &file.replace('/', "-"), &text);
        }
        put(repo, t, "fuzz-tiny.json", TINY_MODEL.as_bytes());
        let upstream = json!({"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 384, "depth": 12,
            "num_heads": 6, "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": true});
        put(repo, t, "upstream-dit-s-2.json", upstream.to_string().as_bytes());
        let mut bad: Value = serde_json::from_str(TINY_MODEL).unwrap();
        bad["heads"] = json!(3);
        put(repo, t, "bad-heads.json", bad.to_string().as_bytes());
        let mut bad: Value = serde_json::from_str(TINY_MODEL).unwrap();
        bad["hiden"] = json!(8);
        put(repo, t, "bad-unknown-field.json", bad.to_string().as_bytes());
    }

    fn specs(repo: &Path) {
        let t = "component_spec";
        // Every shipped component with every parameter at its default, and by bare kind.
        for info in fixture().registry.list() {
            let mut spec = serde_json::Map::new();
            spec.insert("kind".into(), json!(info.kind));
            for p in &info.params {
                if let Some(d) = &p.default {
                    spec.insert(p.name.clone(), d.clone());
                }
            }
            let family = info.family.to_string();
            put(
                repo,
                t,
                &format!("{family}-{}.json", info.kind),
                Value::Object(spec).to_string().as_bytes(),
            );
            if info.family != Family::Backend {
                put(
                    repo,
                    t,
                    &format!("{family}-{}-bare.json", info.kind),
                    json!(info.kind).to_string().as_bytes(),
                );
            }
        }
        let tokens = json!({"kind": "expert-choice", "capacity_factor": 1.0, "groups": {"tokens": 16}});
        put(
            repo,
            t,
            "router-expert-choice-tokens.json",
            tokens.to_string().as_bytes(),
        );
        put(repo, t, "bad-unknown-kind.json", br#"{"kind": "nope"}"#);
        put(repo, t, "bad-unknown-param.json", br#"{"kind": "ddpm", "steps": 10}"#);
        put(repo, t, "bad-mistyped.json", br#"{"kind": "token-choice", "k": "two"}"#);
    }

    fn tokenizer(repo: &Path) {
        let t = "tokenizer";
        let case = |max: u8, vocab: &str, prompt: &str| {
            let mut v = vec![max];
            v.extend_from_slice(vocab.as_bytes());
            v.push(0);
            v.extend_from_slice(prompt.as_bytes());
            v
        };
        let small = "<pad>\n<unk>\n<bos>\n<eos>\nred\ncircle\ncircles\n,\n!\n";
        put(
            repo,
            t,
            "builtin.bin",
            &case(16, BUILTIN_VOCAB, "a photo of two red circles left of a square"),
        );
        put(
            repo,
            t,
            "small-truncated.bin",
            &case(4, small, "Red circle, RED circles! and a dog"),
        );
        put(
            repo,
            t,
            "small-unicode.bin",
            &case(32, small, "ÉCRU\tcircle\u{0}\u{2028}red…"),
        );
        put(
            repo,
            t,
            "bad-duplicate.bin",
            &case(8, "<pad>\n<unk>\n<bos>\n<eos>\nred\nred\n", "red"),
        );
        put(repo, t, "bad-no-specials.bin", &case(8, "red\ncircle\n", "red circle"));
        put(repo, t, "bad-max-tokens.bin", &case(1, small, "red"));
    }

    fn prompts(repo: &Path) {
        let t = "prompt_file";
        let text = std::fs::read_to_string(repo.join("eval/prompts.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // The first prompt of each of the six tags (72 each).
        let tags: String = (0..6).map(|k| format!("{}\n", lines[72 * k])).collect();
        put(repo, t, "all-tags.jsonl", tags.as_bytes());
        put(repo, t, "one-line.jsonl", format!("\n{}\n\n", lines[0]).as_bytes());
        put(
            repo,
            t,
            "bad-unknown-class.jsonl",
            br#"{"tag": "colors", "prompt": "x", "include": [{"class": "dog", "count": 1}]}"#,
        );
        put(repo, t, "bad-empty.jsonl", b"\n  \n");
    }

    fn checkpoints(repo: &Path, scratch: &Path) {
        let t = "checkpoint_meta";
        let store = CheckpointStore::new(scratch, 2);
        let bf16 = TensorData {
            shape: vec![2],
            dtype: DType::BF16,
            bytes: vec![0x80, 0x3f, 0x00, 0xc0],
        };
        let tensors = vec![
            (
                "param/w".to_string(),
                TensorData::from_f32(vec![2, 3], &[0.5, -1.0, 2.0, 0.0, 1e-3, 7.0]),
            ),
            ("opt0/w".to_string(), bf16),
        ];
        let state = json!({
            "config": TrainConfig::for_model(fixture().tiny.clone()),
            "step": 7, "data_position": 28, "optimizer_steps": 7, "skipped_steps": 0,
        });
        let dir = store.save(7, &tensors, &state).unwrap();
        let state = std::fs::read(dir.join("state.json")).unwrap();
        let tensors = std::fs::read(dir.join("tensors.safetensors")).unwrap();
        put(
            repo,
            t,
            "step-dir.bin",
            &pack_checkpoint(CHECKPOINT_STEP_DIR, &state, &tensors),
        );
        put(repo, t, "latest.bin", &pack_checkpoint(0, &state, &tensors));
        let mut v: Value = serde_json::from_slice(&state).unwrap();
        v["tensors_file"]["crc32"] = json!(0);
        let zeroed = serde_json::to_vec(&v).unwrap();
        put(
            repo,
            t,
            "fix-crc.bin",
            &pack_checkpoint(CHECKPOINT_FIX_CRC, &zeroed, &tensors),
        );
        put(repo, t, "bad-crc.bin", &pack_checkpoint(0, &zeroed, &tensors));
        v["step"] = json!(8);
        let step8 = serde_json::to_vec(&v).unwrap();
        put(
            repo,
            t,
            "bad-step.bin",
            &pack_checkpoint(CHECKPOINT_STEP_DIR | CHECKPOINT_FIX_CRC, &step8, &tensors),
        );
    }

    fn plugins(repo: &Path) {
        let t = "plugin_descriptor";
        let v2 = desc_bytes::VERSION_2;
        let k = r#"[{"name": "k", "type": "int", "default": 2, "help": "experts per token"}]"#;
        let many = r#"[{"name":"a","type":"float","default":1.5},{"name":"b","type":{"choice":["x","y"]}},{"name":"c","type":"groups","default":"batch"},{"name":"d","type":"optional_float","default":null},{"name":"e","type":"bool"}]"#;
        let put_desc = |name: &str, bytes: Vec<u8>| put(repo, t, name, &bytes);
        put_desc(
            "router.bin",
            encode_descriptor(
                false,
                v2,
                Some("fuzz-plugin"),
                [&[("fuzz-router", k)], &[], &[], &[]],
                &["tensors"],
            ),
        );
        put_desc(
            "all-families.bin",
            encode_descriptor(
                true,
                v2,
                Some("fuzz-plugin"),
                [
                    &[("fuzz-router", k), ("fuzz-router-2", many)],
                    &[("fuzz-scheduler", "[]")],
                    &[("fuzz-backend", r#"[{"name": "threads", "type": "int", "default": 0}]"#)],
                    &[(
                        "fuzz-expert",
                        r#"[{"name": "mlp_ratio", "type": "float", "default": 4.0}]"#,
                    )],
                ],
                &["tensors", "experts", "from-the-future"],
            ),
        );
        put_desc(
            "v1-router.bin",
            encode_descriptor(
                false,
                desc_bytes::VERSION_1,
                Some("old-plugin"),
                [&[("old-router", k)], &[("old-scheduler", "[]")], &[], &[]],
                &[],
            ),
        );
        put_desc(
            "bad-clash.bin",
            encode_descriptor(
                true,
                v2,
                Some("fuzz-plugin"),
                [&[("expert-choice", "[]")], &[], &[], &[]],
                &[],
            ),
        );
        put_desc(
            "bad-null-name.bin",
            encode_descriptor(false, v2, None, [&[("fuzz-router", k)], &[], &[], &[]], &[]),
        );
        put_desc(
            "bad-params-json.bin",
            encode_descriptor(
                false,
                v2,
                Some("fuzz-plugin"),
                [&[("fuzz-router", "{not json")], &[], &[], &[]],
                &[],
            ),
        );
        put_desc(
            "bad-v1-backend.bin",
            encode_descriptor(
                false,
                desc_bytes::VERSION_1,
                Some("old-plugin"),
                [&[], &[], &[("old-backend", "[]")], &[]],
                &[],
            ),
        );
    }
}
