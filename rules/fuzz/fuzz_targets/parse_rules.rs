//! Arbitrary UTF-8 to the rules compiler, as a whole rules file and as the SQL of one rule.
//!
//! The body is `outpost_rules::fuzz::parse_rules`, which `rules/tests/fuzz_corpus.rs` also runs on
//! every file in `rules/fuzz/corpus/parse_rules` and `rules/fuzz/regressions/parse_rules`. How to
//! run it: ARCHITECTURE.md, "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_rules::fuzz::parse_rules(data));
