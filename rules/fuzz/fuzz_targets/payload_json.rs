//! JSON payloads as the rule engine decodes them: the whole decoding, the field decoding (its
//! hand-written scanner and the serde_json reference) and the invariants between them.
//!
//! The body is `outpost_rules::fuzz::payload_json`, which `rules/tests/fuzz_corpus.rs` also runs on
//! every file in `rules/fuzz/corpus/payload_json` and `rules/fuzz/regressions/payload_json`. How to run it:
//! ARCHITECTURE.md, "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_rules::fuzz::payload_json(data));
