//! `ecdit train` as a user runs it: bad runs are refused with clear errors
//! that cost no earlier data, and a damaged checkpoint costs only itself.
//! (Kills, resumes and a full disk are in `train_crash.rs`.)

mod common;

use common::{all_checkpoints_whole, stderr, train, write_config};
use ecdit_model::train::checkpoint::CheckpointStore;
use ecdit_model::weights::Weights;
use std::path::Path;

/// The largest difference between two saved models' tensors of the same names.
fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (Weights::open(a).unwrap(), Weights::open(b).unwrap());
    assert_eq!(a.names(), b.names());
    let mut worst = 0.0f32;
    for name in a.names() {
        let shape = a.shape(&name).unwrap();
        let (x, y) = (a.get(&name, &shape).unwrap(), b.get(&name, &shape).unwrap());
        worst = x.iter().zip(&y).fold(worst, |m, (p, q)| m.max((p - q).abs()));
    }
    worst
}

#[test]
fn a_fine_tune_starts_from_the_given_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 6, 3);
    let source = tmp.path().join("source");
    assert!(train(&config, &source, &[]).status.success());
    // A learning rate far below an f32 weight's last bit (it must be positive)
    // leaves the live weights the given ones, and so their EMA.
    let tuned = tmp.path().join("tuned");
    let fixed = ["--lr", "1e-20", "--steps", "1", "--seed", "7"];
    let out = train(
        &config,
        &tuned,
        &[&["--init-from", source.to_str().unwrap()], &fixed[..]].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("starting from the weights in"),
        "{}",
        stderr(&out)
    );
    let fresh = tmp.path().join("fresh");
    assert!(train(&config, &fresh, &fixed).status.success());
    for file in ["model.safetensors", "text_encoder.safetensors"] {
        let kept = max_difference(&source.join(file), &tuned.join(file));
        assert!(
            kept < 1e-6,
            "{file}: the fine-tune moved a weight by {kept} at lr 1e-20"
        );
        let other = max_difference(&source.join(file), &fresh.join(file));
        assert!(
            other > 1e-2,
            "{file}: a fresh run of another seed is {other} from the source"
        );
    }
}

#[test]
fn a_fine_tune_of_another_architecture_is_refused_naming_the_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3, 3);
    let source = tmp.path().join("source");
    assert!(train(&config, &source, &[]).status.success());
    let mut wider: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    wider["model"]["hidden"] = 48.into();
    let wider_config = tmp.path().join("wider.json");
    std::fs::write(&wider_config, wider.to_string()).unwrap();
    let out_dir = tmp.path().join("tuned");
    let refused = train(&wider_config, &out_dir, &["--init-from", source.to_str().unwrap()]);
    assert!(!refused.status.success());
    let msg = stderr(&refused);
    assert!(
        msg.contains("--init-from") && msg.contains("hidden (32 there, 48 here)"),
        "{msg}"
    );
    assert!(!out_dir.exists(), "a refused fine-tune created its run directory");

    let missing = train(&config, &tmp.path().join("other"), &["--init-from", "no/such/model"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no/such/model"), "{}", stderr(&missing));
}

#[test]
fn a_directory_holding_a_run_or_other_files_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3, 3);
    let out = tmp.path().join("run");
    assert!(train(&config, &out, &[]).status.success());
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let again = train(&config, &out, &[]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already holds a run") && stderr(&again).contains("--resume"));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);

    let other = tmp.path().join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("holiday.png"), b"not ours").unwrap();
    let refused = train(&config, &other, &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("not empty"), "{}", stderr(&refused));
    assert_eq!(std::fs::read(other.join("holiday.png")).unwrap(), b"not ours");
}

#[test]
fn resuming_with_an_incompatible_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3, 3);
    let out = tmp.path().join("run");
    assert!(train(&config, &out, &[]).status.success());
    let bad = train(&config, &out, &["--resume", "--batch", "8"]);
    assert!(!bad.status.success());
    let msg = stderr(&bad);
    assert!(msg.contains("cannot resume") && msg.contains("batch"), "{msg}");
    all_checkpoints_whole(&out);
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 6, 3);
    let out = tmp.path().join("run");
    assert!(train(&config, &out, &[]).status.success());
    // Truncate the newest checkpoint's tensors.
    let newest = CheckpointStore::new(&out, 2).step_dir(6);
    let file = newest.join("tensors.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let resumed = train(&config, &out, &["--resume", "--steps", "9"]);
    let msg = stderr(&resumed);
    assert!(resumed.status.success(), "{msg}");
    assert!(msg.contains("damaged") && msg.contains("step 3"), "{msg}");
}

#[test]
fn a_run_that_does_not_fit_in_memory_is_refused_with_the_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3, 3);
    let out = tmp.path().join("run");
    let refused = train(&config, &out, &["--max-memory", "64K"]);
    assert!(!refused.status.success());
    let msg = stderr(&refused);
    assert!(
        msg.contains("needs about") && msg.contains("limit") && msg.contains("--batch"),
        "{msg}"
    );
    assert!(!out.join("run.json").exists(), "nothing written for a refused run");
}

#[test]
fn a_bf16_run_records_its_dtype_and_exports_bf16_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3, 3);
    let out = tmp.path().join("run");
    let run = train(&config, &out, &["--dtype", "bf16"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(saved["dtype"], "bf16");
    let model = Weights::open(out.join("model.safetensors")).unwrap();
    assert_eq!(model.metadata("dtype"), Some("bf16"));
    assert_eq!(model.dtype("blocks.0.attn.qkv.weight").as_deref(), Some("BF16"));

    let refused = train(&config, &tmp.path().join("other"), &["--dtype", "f16"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("f16") && stderr(&refused).contains("bf16"),
        "{}",
        stderr(&refused)
    );
}
