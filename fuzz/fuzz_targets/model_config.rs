//! Fuzz target `model_config`: model config files (`config_files::parse_config`, what
//! `load_config` runs on a file: JSON, then `ModelConfig::validate`), the
//! same text as a training config and as upstream DiT's config, and the serde
//! round trip a saved model relies on.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::model_config`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 model_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::model_config(data);
});
