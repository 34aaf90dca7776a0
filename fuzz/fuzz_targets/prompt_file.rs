//! Fuzz target `prompt_file`: GenEval prompt metadata files (`eval::parse_prompts`, what
//! `read_prompts` runs on `eval/prompts.jsonl`), and the write/read round
//! trip of every prompt accepted.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::prompt_file`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 prompt_file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::prompt_file(data);
});
