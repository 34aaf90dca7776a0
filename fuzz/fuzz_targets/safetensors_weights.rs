//! Fuzz target `safetensors_weights`: the safetensors weights reader (`Weights::from_bytes`, as
//! `Weights::open` reads a mapped file) and the binder that loads a file
//! into a small model's parameters (`Model::from_weights`), plus the
//! model config `Model::load` takes from the file's metadata.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::safetensors_weights`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 safetensors_weights`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::safetensors_weights(data);
});
