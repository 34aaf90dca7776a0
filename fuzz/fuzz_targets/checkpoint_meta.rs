//! Fuzz target `checkpoint_meta`: a training checkpoint's `state.json` envelope and tensors
//! file (`CheckpointStore::load_from_bytes`, what `load` runs on a
//! checkpoint directory), then the training config resuming reads from it.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::checkpoint_meta`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 checkpoint_meta`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::checkpoint_meta(data);
});
