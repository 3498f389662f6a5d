//! Checks the Architecture Invariant "no module imports from a stage above it" (see
//! ARCHITECTURE.md) on the source text: every `crate::<module>` path outside comments, and
//! inside `buffer/` every `super::<module>` path, must name a module of a lower rank than the
//! file's own (the bottom rank's modules may also use each other). A module missing from the
//! table fails the check, so a new one gets a place.

use std::path::{Path, PathBuf};

/// The crate's top-level modules, lowest first. A module may use only modules of a lower
/// rank; modules of one rank do not use each other, except at the bottom.
const RANKS: &[(&str, u8)] = &[
    // The bottom, used by every stage and free to use each other: the wire, the ticket
    // contract, counters, the values passed between stages, config, signals.
    ("mqtt", BOTTOM),
    ("ack", BOTTOM),
    ("metrics", BOTTOM),
    ("event", BOTTOM),
    ("config", BOTTOM),
    ("auth", BOTTOM),
    ("shutdown", BOTTOM),
    ("tls", BOTTOM),
    ("telemetry", 1),
    // The runtime thread's interrupt moderation: pure, fed counts by `cli`.
    ("coalesce", 1),
    // The stages' heartbeats and the systemd watchdog: every stage holds a heartbeat.
    ("watchdog", 1),
    // The tap's hub: every stage publishes into it, the admin socket attaches its viewers.
    ("tap", 1),
    // What the stages hand work to: the redb file (below the relay), the dead-letter store.
    ("buffer", 2),
    ("deadletter", 2),
    // The stages: broker → route → relay, which drives the uplink's connection.
    ("broker", 3),
    ("route", 4),
    ("uplink", 4),
    ("rules", 5),
    ("relay", 5),
    // Operators' access to a running gateway, the wiring (`lib.rs`'s own items, such as
    // `Gateway`), then the command line.
    ("admin", 6),
    ("http", 6),
    // The fuzz targets' entry functions: they call into any part below.
    ("fuzz", 6),
    ("lib", 7),
    ("cli", 8),
];

const BOTTOM: u8 = 0;

/// `buffer/`'s own modules, lowest first: `file` is below everything that opens the file.
const BUFFER_RANKS: &[(&str, u8)] = &[
    ("access", 0),
    ("file", 1),
    ("chunk", 2),
    ("inspect", 3),
    ("store", 4),
    ("import", 5),
    ("windows", 5),
    ("worker", 5),
];

fn rank(table: &[(&str, u8)], module: &str) -> Option<u8> {
    table.iter().find(|(name, _)| *name == module).map(|(_, rank)| *rank)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module names that follow each `prefix` in the code lines of `text`.
fn paths_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = (usize, &'a str)> + 'a {
    text.lines().enumerate().filter(|(_, line)| !line.trim_start().starts_with("//")).flat_map(
        move |(idx, line)| {
            line.match_indices(prefix).filter_map(move |(at, _)| {
                let rest = &line[at + prefix.len()..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                (end > 0).then(|| (idx + 1, &rest[..end]))
            })
        },
    )
}

/// Every use of a module of the same or a higher rank, as `file:line: a -> b`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let mut parts = relative.iter().map(|p| p.to_str().expect("utf-8 path").trim_end_matches(".rs"));
        let top = parts.next().expect("a file name");
        if matches!(top, "lib" | "main" | "architecture") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let Some(own) = rank(RANKS, top) else {
            found.push(format!("{}: module `{top}` has no rank in architecture.rs", relative.display()));
            continue;
        };
        for (line, used) in paths_after(&text, "crate::") {
            // A path to an item rather than a module names one of `lib.rs`'s own items.
            let used = if used.starts_with(|c: char| c.is_ascii_uppercase()) { "lib" } else { used };
            match rank(RANKS, used) {
                Some(_) if used == top => {}
                Some(theirs) if theirs < own || theirs == BOTTOM && own == BOTTOM => {}
                _ => found.push(format!("{}:{line}: {top} -> {used}", relative.display())),
            }
        }
        if top == "buffer" {
            let Some(sub) = parts.next().filter(|s| *s != "mod") else { continue };
            let own = rank(BUFFER_RANKS, sub).unwrap_or(u8::MAX);
            let uses = paths_after(&text, "super::").chain(paths_after(&text, "crate::buffer::"));
            for (line, used) in uses {
                if let Some(theirs) = rank(BUFFER_RANKS, used) {
                    if theirs >= own && used != sub {
                        found.push(format!("{}:{line}: buffer::{sub} -> buffer::{used}", relative.display()));
                    }
                }
            }
        }
    }
    found.sort();
    found
}

#[test]
fn no_module_imports_from_a_stage_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(found.is_empty(), "imports against the stage order:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("buffer")).expect("mkdir");
    let files = [
        ("event.rs", "use crate::ack::Ticket;\n// crate::relay in a comment is no import\n"),
        ("telemetry.rs", "use crate::config::LogFormat;\nuse crate::deadletter::DeadLetter;\n"),
        ("route.rs", "use crate::relay::Relay;\n"),
        ("cli.rs", "use crate::Gateway;\n"),
        ("relay.rs", "const N: usize = crate::STAGE_CHANNEL_CAPACITY;\n"),
        ("buffer/file.rs", "use super::store::Store;\n"),
        ("buffer/store.rs", "use super::file::Record;\n"),
        ("newcomer.rs", ""),
    ];
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    assert_eq!(
        violations(dir.path()),
        [
            "buffer/file.rs:1: buffer::file -> buffer::store",
            "newcomer.rs: module `newcomer` has no rank in architecture.rs",
            "relay.rs:1: relay -> lib",
            "route.rs:1: route -> relay",
            "telemetry.rs:2: telemetry -> deadletter",
        ]
    );
}
