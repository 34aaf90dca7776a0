//! Fuzz target `plugin_descriptor`: the host's checks of a plugin descriptor
//! (`plugin::host::register_descriptor`, what `plugin::load` runs on the
//! entry symbol's result) on a fake descriptor built in memory from the input:
//! versions, sizes, names, counts, tables, params_json, NULL or filled slots.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::plugin_descriptor`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 plugin_descriptor`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::plugin_descriptor(data);
});
