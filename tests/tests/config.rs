//! `outpost check`: a bad config is refused with exit code 1 and a message that says where,
//! what and how to fix it; the shipped example is accepted.

use std::path::PathBuf;

use outpost_e2e::gateway::{CommandOutcome, outpost};
use outpost_e2e::workspace_root;

/// Writes `toml` to a fresh `outpost.toml` and runs `outpost check --config` on it.
fn check_text(toml: &str) -> (CommandOutcome, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, toml).expect("write the config");
    let outcome =
        outpost(&["check", "--config", path.to_str().expect("utf-8 path")]).expect("run outpost check");
    (outcome, path, dir)
}

/// Asserts that `outpost check` refuses `toml` with exit code 1 and one stderr message that
/// starts with `outpost: <file>: ` and contains every fragment.
#[track_caller]
fn check_refused(toml: &str, fragments: &[&str]) {
    let (outcome, path, _dir) = check_text(toml);
    assert_eq!(outcome.code, Some(1), "exit code for an invalid config: {outcome:?}");
    assert!(outcome.stdout.is_empty(), "nothing on stdout: {outcome:?}");
    let prefix = format!("outpost: {}: ", path.display());
    assert!(outcome.stderr.starts_with(&prefix), "stderr starts with {prefix:?}: {:?}", outcome.stderr);
    for fragment in fragments {
        assert!(outcome.stderr.contains(fragment), "stderr contains {fragment:?}:\n{}", outcome.stderr);
    }
}

#[test]
fn unknown_key_names_the_key_its_place_and_the_valid_keys() {
    check_refused(
        "[broker]\nlisten = \"127.0.0.1:1883\"\nmax_conections = 5\n",
        &[
            "line 3, column 1: ",
            "unknown field `max_conections`",
            "expected one of",
            "`listen`",
            "`max_connections`",
            "`ring_segments`",
            "| max_conections = 5",
        ],
    );
}

#[test]
fn wrong_type_names_the_value_and_what_was_expected() {
    check_refused(
        "[broker]\nmax_connections = \"many\"\n",
        &[
            "line 2, column 19: ",
            "max_connections",
            "invalid type: string \"many\"",
            "expected a nonzero usize",
        ],
    );
}

#[test]
fn unparsable_listen_address_is_quoted_and_explained() {
    check_refused(
        "[broker]\nlisten = \"localhost:99999\"\n",
        &["line 2, column 10: ", "listen", "invalid socket address syntax", "| listen = \"localhost:99999\""],
    );
}

#[test]
fn bad_upstream_url_says_what_is_expected() {
    check_refused(
        "[upstream]\nurl = \"http://10.0.0.5:1883\"\n",
        &["line 2", "url", "\"http://10.0.0.5:1883\"", "unknown scheme `http`; expected mqtt://host:port"],
    );
}

#[test]
fn invalid_value_names_the_key_the_value_and_the_valid_range() {
    check_refused(
        "[buffer]\ncommit_interval = \"0s\"\n",
        &["`buffer.commit_interval` = \"0s\" is invalid: must be between 1ms and 10s"],
    );
}

#[test]
fn missing_file_is_named_with_a_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nowhere.toml");
    let outcome =
        outpost(&["check", "--config", path.to_str().expect("utf-8 path")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let prefix = format!("outpost: cannot read config file {}: ", path.display());
    assert!(outcome.stderr.starts_with(&prefix), "stderr starts with {prefix:?}: {:?}", outcome.stderr);
    assert!(outcome.stderr.contains("No such file or directory"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("--config"), "says how to fix it: {}", outcome.stderr);
}

#[test]
fn valid_config_is_accepted() {
    let (outcome, path, _dir) =
        check_text("[broker]\nlisten = \"127.0.0.1:1883\"\n[upstream]\nurl = \"mqtt://10.0.0.5:1883\"\n");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stderr.is_empty(), "{outcome:?}");
    assert!(outcome.stdout.starts_with(&format!("{}: ok", path.display())), "{outcome:?}");
    assert!(outcome.stdout.contains("upstream mqtt://10.0.0.5:1883"), "{outcome:?}");
}

#[test]
fn shipped_example_is_valid() {
    let example = workspace_root().join("examples/outpost.toml");
    assert!(example.exists(), "{} is missing", example.display());
    let outcome =
        outpost(&["check", "--config", example.to_str().expect("utf-8 path")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stdout.contains(": ok"), "{outcome:?}");
}
