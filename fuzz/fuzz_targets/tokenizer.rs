//! Fuzz target `tokenizer`: vocabulary files (`Vocab::parse`) and tokenizing arbitrary
//! prompt text (`Tokenizer`), with the invariants of the ids it returns.
//!
//! The entry point lives in `fuzz/src/lib.rs` (`ecdit_fuzz::tokenizer`), where the
//! normal test suite replays the seed corpus and past findings through it.
//! A refused input (`Err`) is fine; a panic, hang or allocation over the cap
//! is a bug. Run: `scripts/fuzz.sh 60 tokenizer`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ecdit_fuzz::tokenizer(data);
});
