//! `ecdit train` as a user runs it: a process killed at random points and
//! resumed ends with the bits of an uninterrupted run, no checkpoint is ever
//! left half-written, and bad runs are refused with clear errors that cost
//! no earlier data.

use ecdit_model::train::checkpoint::CheckpointStore;
use ecdit_model::weights::Weights;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn ecdit() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecdit"));
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    cmd
}

/// A small expert-choice text model on 16x16 shapes, checkpointing often.
fn write_config(dir: &Path, steps: u64) -> PathBuf {
    let path = dir.join("train.json");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/train/smoke-ec.json"))
        .expect("smoke config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["steps"] = steps.into();
    cfg["checkpoint_every"] = 3.into();
    cfg["keep_checkpoints"] = 2.into();
    cfg["log_every"] = 1.into();
    cfg["val_every"] = 4.into();
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    path
}

fn train(config: &Path, out: &Path, extra: &[&str]) -> Output {
    ecdit()
        .args(["train", "--quiet", "--threads", "2", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run ecdit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every listed checkpoint reads back whole.
fn all_checkpoints_whole(out: &Path) -> usize {
    let store = CheckpointStore::new(out, 2);
    let list = store.list().expect("list checkpoints");
    for (step, path) in &list {
        CheckpointStore::load(path).unwrap_or_else(|e| panic!("checkpoint of step {step} is damaged: {e}"));
    }
    list.len()
}

#[test]
fn killed_runs_resume_to_the_bits_of_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 90);
    let reference = tmp.path().join("reference");
    let start = std::time::Instant::now();
    let done = train(&config, &reference, &[]);
    let whole_run = start.elapsed();
    assert!(done.status.success(), "{}", stderr(&done));

    let killed = tmp.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut kills = 0;
    loop {
        let mut cmd = ecdit();
        cmd.args(["train", "--quiet", "--threads", "2", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&killed)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if killed.join("run.json").exists() {
            cmd.arg("--resume");
        }
        let mut child = cmd.spawn().expect("spawn ecdit");
        if kills < 8 {
            // Somewhere in a whole run's time: start-up, a step, a checkpoint write.
            std::thread::sleep(whole_run.mul_f64(rng.gen_range(0.02..0.15)));
            if child.try_wait().unwrap().is_none() {
                child.kill().expect("SIGKILL"); // SIGKILL on Unix
                child.wait().unwrap();
                kills += 1;
                all_checkpoints_whole(&killed);
                continue;
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "the last run failed");
        break;
    }
    assert!(
        kills >= 2,
        "the runs finished before they could be killed ({kills} kills)"
    );
    // The exported EMA models hold the same bits (the files' JSON headers may
    // order their metadata differently).
    let a = Weights::open(reference.join("model.safetensors")).unwrap();
    let b = Weights::open(killed.join("model.safetensors")).unwrap();
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let shape = a.shape(&name).unwrap();
        let (va, vb) = (a.get(&name, &shape).unwrap(), b.get(&name, &shape).unwrap());
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "after {kills} kills the EMA model's {name} differs from the uninterrupted run's"
        );
    }
    let final_a = CheckpointStore::load(&CheckpointStore::new(&reference, 2).step_dir(90)).unwrap();
    let final_b = CheckpointStore::load(&CheckpointStore::new(&killed, 2).step_dir(90)).unwrap();
    assert_eq!(final_a.tensors.len(), final_b.tensors.len());
    for (name, t) in &final_a.tensors {
        assert!(t.bytes == final_b.tensors[name].bytes, "{name} differs");
    }
    // The metrics of the resumed run hold each step once.
    let rows = ecdit_model::train::metrics::read_metrics(&killed.join("metrics.csv")).unwrap();
    let steps: Vec<u64> = rows.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=90).collect::<Vec<_>>());
}

#[test]
fn a_directory_holding_a_run_or_other_files_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 3);
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
    let config = write_config(tmp.path(), 3);
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
    let config = write_config(tmp.path(), 6);
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
    let config = write_config(tmp.path(), 3);
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
