//! Fuzz target `component_spec`: a JSON component spec built through the registry as a
//! router, an expert and a scheduler (`spec::split_spec`, `check_params`,
//! the shipped factories), and checked against the backends' parameters.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::component_spec`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 component_spec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::component_spec(data);
});
