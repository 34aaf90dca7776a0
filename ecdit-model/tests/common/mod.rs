//! Shared by the tests that run `ecdit train` as a user does: the binary, a
//! tiny training config, and checks on a run directory.
#![allow(dead_code)]

use ecdit_model::train::checkpoint::CheckpointStore;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `ecdit` binary, run from the workspace root.
pub fn ecdit() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecdit"));
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    cmd
}

/// A small expert-choice text model on 16x16 shapes (`smoke-ec`), logging
/// every step, with a checkpoint every `checkpoint_every` steps and the
/// newest two kept; written to `dir/train.json`.
pub fn write_config(dir: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    let path = dir.join("train.json");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/train/smoke-ec.json"))
        .expect("smoke config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["steps"] = steps.into();
    cfg["checkpoint_every"] = checkpoint_every.into();
    cfg["keep_checkpoints"] = KEEP.into();
    cfg["log_every"] = 1.into();
    cfg["val_every"] = 4.into();
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    path
}

/// Checkpoints the config of [`write_config`] keeps.
pub const KEEP: usize = 2;

/// `ecdit train --quiet --threads 2` of `config` into `out`, plus `extra`.
pub fn train_command(config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = ecdit();
    cmd.args(["train", "--quiet", "--threads", "2", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// Runs [`train_command`] to the end.
pub fn train(config: &Path, out: &Path, extra: &[&str]) -> Output {
    train_command(config, out, extra).output().expect("run ecdit")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every listed checkpoint of the run in `out` reads back whole (through the
/// library); returns their steps, newest first.
pub fn all_checkpoints_whole(out: &Path) -> Vec<u64> {
    let store = CheckpointStore::new(out, KEEP);
    let list = store.list().expect("list checkpoints");
    for (step, path) in &list {
        CheckpointStore::load(path).unwrap_or_else(|e| panic!("checkpoint of step {step} is damaged: {e}"));
    }
    list.into_iter().map(|(step, _)| step).collect()
}
