//! `ecdit train` as a user runs it: bad runs are refused with clear errors
//! that cost no earlier data, and a damaged checkpoint costs only itself.
//! (Kills, resumes and a full disk are in `train_crash.rs`.)

mod common;

use common::{all_checkpoints_whole, stderr, train, write_config};
use ecdit_model::train::checkpoint::CheckpointStore;

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
