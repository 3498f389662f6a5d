//! Mosquitto's password file (`auth::password`), its hashes, and `outpost passwd`'s edits;
//! the input is `file 0xFF probes` (usernames, a line each).
//!
//! The body is `outpost::fuzz::password_file`, which `gateway/tests/fuzz_corpus.rs` also runs on every file
//! in `gateway/fuzz/corpus/password_file` and `gateway/fuzz/regressions/password_file`. How to run it: ARCHITECTURE.md,
//! "Fuzzing".

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost::fuzz::password_file(data));
