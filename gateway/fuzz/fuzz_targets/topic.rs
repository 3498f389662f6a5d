//! Topic filters and names (`outpost-topic`) against a naive matcher, the broker's `SubTrie`
//! and the validators' promises; the input is `filter 0xFF topic`.
//!
//! The body is `outpost::fuzz::topic`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/topic` and `gateway/fuzz/regressions/topic`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::topic(data));
