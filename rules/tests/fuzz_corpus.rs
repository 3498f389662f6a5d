//! Replays every committed fuzz input through the function its fuzz target calls
//! (`outpost_rules::fuzz`): the seed corpus in `rules/fuzz/corpus/<target>/` and each crash
//! reproducer in `rules/fuzz/regressions/<target>/`. So what the fuzzers found stays fixed on
//! stable Rust, without cargo-fuzz.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Runs `entry` on every file of the target's corpus and regressions; fails naming each file
/// that panicked, or when the target has no committed input at all.
#[track_caller]
fn replay(target: &str, entry: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    let mut failed = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.expect("read a corpus entry").path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("read a corpus file");
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(ran > 0, "no corpus for fuzz target {target} under {}", root.display());
    assert!(failed.is_empty(), "fuzz target {target} fails on:\n{}", failed.join("\n"));
}

#[test]
fn parse_rules() {
    replay("parse_rules", outpost_rules::fuzz::parse_rules);
}

#[test]
fn payload_json() {
    replay("payload_json", outpost_rules::fuzz::payload_json);
}

#[test]
fn payload_cbor() {
    replay("payload_cbor", outpost_rules::fuzz::payload_cbor);
}
