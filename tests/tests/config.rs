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

/// Runs `outpost ARGS…` and returns its stderr lines that start a problem (`outpost: …`).
#[track_caller]
fn problems(outcome: &CommandOutcome) -> Vec<&str> {
    outcome.stderr.lines().filter(|l| l.starts_with("outpost: ")).collect()
}

#[test]
fn every_unknown_key_is_reported_in_one_run_with_a_suggestion() {
    let (outcome, path, _dir) = check_text(
        "[broker]\nmax_conections = 5\n[upstream]\nurl = \"mqtt://10.0.0.5:1883\"\nreconect_max = \"1s\"\n",
    );
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let found = problems(&outcome);
    assert_eq!(found.len(), 2, "{}", outcome.stderr);
    let file = path.display();
    assert!(
        found[0].starts_with(&format!(
            "outpost: {file}: line 2, column 1: `broker.max_conections`: unknown field"
        )),
        "{}",
        outcome.stderr
    );
    assert!(found[0].ends_with("; did you mean `max_connections`?"), "{}", outcome.stderr);
    assert!(
        found[1].starts_with(&format!(
            "outpost: {file}: line 5, column 1: `upstream.reconect_max`: unknown field"
        )),
        "{}",
        outcome.stderr
    );
    assert!(found[1].ends_with("; did you mean `reconnect_max`?"), "{}", outcome.stderr);
}

#[test]
fn a_missing_rules_file_fails_the_check() {
    let (outcome, path, _dir) = check_text("rules = \"typo.toml\"\n");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let expected = path.with_file_name("typo.toml");
    assert!(
        outcome.stderr.starts_with(&format!("outpost: cannot read rules file {}: ", expected.display())),
        "the path is resolved from the config file: {}",
        outcome.stderr
    );

    let outcome = outpost(&["check", "--rules", "typo.toml"]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    assert!(outcome.stderr.starts_with("outpost: cannot read rules file typo.toml: "), "{}", outcome.stderr);
}

/// A rules file whose table has a ragged CSV line, next to `outpost.toml` in `dir`.
fn write_broken_rules(dir: &std::path::Path) {
    std::fs::write(dir.join("devices.csv"), "device,site\nd1,plant-a\nd2\n").expect("write the table");
    std::fs::write(
        dir.join("rules.toml"),
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n\n[[rule]]\nname = \"site\"\nsql = '''\nSELECT lookup('devices', topic(2), 'site') AS site\nFROM \"sensors/+/temp\"\nWHERE lookup('devices', topic(2), 'site') = 'plant-a'\n'''\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write the rules");
}

#[test]
fn check_compiles_the_rules_and_reports_a_broken_table_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_broken_rules(dir.path());
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, "rules = \"rules.toml\"\ndata_dir = \"state\"\n").expect("write the config");
    let outcome =
        outpost(&["check", "--config", config.to_str().expect("utf-8")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let rules = dir.path().join("rules.toml");
    assert_eq!(
        problems(&outcome),
        [format!(
            "outpost: {}: table `devices`: devices.csv:3: 1 fields, but the header has 2; every line needs one field per column (quote a field that holds a comma)",
            rules.display()
        )],
        "one problem, at the CSV line, and no follow-up errors"
    );
}

#[test]
fn sql_errors_give_the_rules_files_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"hot\"\nsql = '''\nSELECT payload.temp AS temp\nFROM \"sensors/+/temp\"\nWHERE temp > lookup('devices', topic(2), 'max')\n'''\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write the rules");
    let outcome =
        outpost(&["rules", "check", rules.to_str().expect("utf-8")]).expect("run outpost rules check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.starts_with(&format!(
            "outpost: {}: line 6, column 21: rule `hot`: unknown table `devices`",
            rules.display()
        )),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("\n6 | WHERE temp > lookup("), "{}", outcome.stderr);
}

/// Windowed and report-by-exception rules load like any other: the gateway checkpoints
/// their state with the buffer (`tests/tests/windows.rs` runs them through crashes). A
/// windowed rule's own mistakes are still refused, naming the rule.
#[test]
fn check_accepts_windowed_and_report_by_exception_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"avg\"\nsql = '''\nSELECT topic(2) AS s, avg(payload.t) AS t\nFROM \"sensors/+/temp\"\nGROUP BY topic(2), TUMBLINGWINDOW(ss, 10)\n'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"avg/${s}\"\n\n[[rule]]\nname = \"db\"\nsql = '''SELECT payload.t AS t FROM \"s/+\" WHERE deadband(payload.t, 0.5)'''\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write the rules");
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, "rules = \"rules.toml\"\ndata_dir = \"state\"\n").expect("write the config");
    let outcome =
        outpost(&["check", "--config", config.to_str().expect("utf-8")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let outcome =
        outpost(&["rules", "check", rules.to_str().expect("utf-8")]).expect("run outpost rules check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");

    // A window's forward without a topic is the rule's error, not a refusal of windows.
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"avg\"\nsql = '''SELECT avg(payload.t) AS t FROM \"s/+\" GROUP BY TUMBLINGWINDOW(ss, 10)'''\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write the rules");
    let outcome =
        outpost(&["check", "--config", config.to_str().expect("utf-8")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    assert!(outcome.stderr.contains("avg"), "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("issue #15"), "{}", outcome.stderr);
}

#[test]
fn check_refuses_a_data_dir_that_cannot_be_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").expect("write a file");
    let data_dir = file.join("data");
    let outcome =
        outpost(&["check", "--data-dir", data_dir.to_str().expect("utf-8")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    assert_eq!(
        problems(&outcome),
        [format!(
            "outpost: data_dir {}: {} is not a directory; set data_dir (or --data-dir) to a directory the user running outpost can write",
            data_dir.display(),
            file.display()
        )]
    );
    assert!(!data_dir.exists());
}

#[test]
fn paths_in_a_config_file_are_relative_to_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    std::fs::create_dir(&site).expect("mkdir");
    std::fs::write(site.join("devices.csv"), "device,site\nd1,plant-a\n").expect("write the table");
    std::fs::write(
        site.join("rules.toml"),
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n[[rule]]\nname = \"all\"\nsql = 'SELECT * FROM \"#\"'\n[[rule.action]]\ntype = \"forward\"\n",
    )
    .expect("write the rules");
    let config = site.join("outpost.toml");
    std::fs::write(&config, "rules = \"rules.toml\"\ndata_dir = \"state\"\n").expect("write the config");
    // The working directory is the test's, not `site`.
    let outcome =
        outpost(&["check", "--config", config.to_str().expect("utf-8")]).expect("run outpost check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stdout.contains(&format!("data in {}", site.join("state").display())), "{outcome:?}");
    assert!(outcome.stdout.contains(&format!("rules {}", site.join("rules.toml").display())), "{outcome:?}");
    assert!(!site.join("state").exists(), "check creates nothing");
}

#[test]
fn run_with_broken_rules_exits_1_and_says_each_problem_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_broken_rules(dir.path());
    let rules = dir.path().join("rules.toml");
    let data_dir = dir.path().join("data");
    let outcome = outpost(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().expect("utf-8"),
        "--rules",
        rules.to_str().expect("utf-8"),
    ])
    .expect("run outpost run");
    assert_eq!(outcome.code, Some(1), "invalid rules are invalid configuration: {outcome:?}");
    assert_eq!(outcome.stderr.matches("devices.csv:3").count(), 1, "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("unknown table"), "{}", outcome.stderr);
}

#[test]
fn an_os_error_is_said_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").expect("write a file");
    let data_dir = file.join("data");
    let outcome =
        outpost(&["run", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().expect("utf-8")])
            .expect("run outpost run");
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert_eq!(outcome.stderr.matches("Not a directory").count(), 1, "{}", outcome.stderr);
}

#[test]
fn rules_check_and_test_warn_about_a_ported_emqx_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"ported\"\nsql = '''\nFOREACH payload.sensors AS s\nDO s.name AS name, unix_ts_to_rfc3339(timestamp) AS at, node AS node\nINCASE s.v > NULL\nFROM \"plc/+\"\n'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"sensors/${s.name}\"\n",
    )
    .expect("write the rules");
    let rules = rules.to_str().expect("utf-8");
    let outcome = outpost(&["rules", "check", rules]).expect("run outpost rules check");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stdout.starts_with(&format!("{rules}: ok (1 rules: ported)")), "{outcome:?}");
    let warnings: Vec<&str> = outcome.stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 3, "{}", outcome.stderr);
    // EMQX's `node` is not an Outpost field: NULL, as EMQX reads an unknown name, and said.
    assert!(
        warnings[0].starts_with("warning: rule `ported`: unknown field `node` reads as NULL on every event"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("warning: rule `ported`: `unix_ts_to_rfc3339` writes UTC"),
        "{warnings:?}"
    );
    assert!(
        warnings[2].starts_with("warning: rule `ported`: an ordering comparison with NULL"),
        "{warnings:?}"
    );

    let outcome = outpost(&[
        "rules",
        "test",
        rules,
        "--topic",
        "plc/7",
        "--payload",
        r#"{"sensors":[{"name":"a","v":1},{"name":"b"}]}"#,
    ])
    .expect("run outpost rules test");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stderr.starts_with("warning: rule `ported`: unknown field `node`"), "{}", outcome.stderr);
    assert!(outcome.stdout.starts_with("event plc/7 "), "{}", outcome.stdout);
    // `s.v > NULL` is never TRUE, so FOREACH keeps no element: what the warning said.
    assert!(outcome.stdout.contains("rule ported: filtered out by WHERE"), "{}", outcome.stdout);
}

#[test]
fn an_overflowing_duration_is_refused_by_check_and_at_start_up() {
    // humantime reads this as a Duration; added to an Instant it would panic at shutdown.
    let toml = "shutdown_timeout = \"500000000y\"\n";
    check_refused(
        toml,
        &[
            "line 1, column 20: ",
            "`shutdown_timeout` = \"500000000years\" is invalid: must be between 100ms and 1h",
        ],
    );
    let (_, path, dir) = check_text(toml);
    let data_dir = dir.path().join("data");
    let outcome = outpost(&[
        "run",
        "--config",
        path.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().expect("utf-8"),
    ])
    .expect("run outpost run");
    assert_eq!(outcome.code, Some(1), "refused before anything starts: {outcome:?}");
    assert!(
        outcome.stderr.contains("`shutdown_timeout` = \"500000000years\" is invalid"),
        "{}",
        outcome.stderr
    );
    assert!(!data_dir.exists(), "nothing was created");
}

#[test]
fn wrong_types_and_out_of_range_sizes_name_the_key_the_value_and_the_limit() {
    check_refused(
        "shutdown_timeout = 10\n",
        &["line 1, column 20: ", "shutdown_timeout", "invalid type: integer `10`", "| shutdown_timeout = 10"],
    );
    check_refused("[broker]\nmax_payload = \"-5MiB\"\n", &["line 2, column 15: ", "max_payload"]);
    check_refused(
        "[broker]\nmax_payload = \"1TiB\"\n",
        &["`broker.max_payload` = \"1.0 TiB\" is invalid: must be between 16B and 256MiB"],
    );
    check_refused(
        "[broker]\nmax_topic_levels = 0\n",
        &["`broker.max_topic_levels` = \"0\" is invalid: must be between 1 and 32768"],
    );
    check_refused(
        "[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\ninflight = 70000\n",
        &["line 3, column 12: ", "inflight", "70000"],
    );
    check_refused("[buffer]\nmax_events = -1\n", &["line 2, column 14: ", "max_events", "-1"]);
}

#[test]
fn unreadable_paths_are_named_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory where a file belongs cannot be read even by root, who reads any mode.
    let a_dir = dir.path().display().to_string();
    check_refused(
        &format!("[broker]\npassword_file = \"{a_dir}\"\n"),
        &["`broker.password_file`", &format!("cannot read {a_dir}"), "Is a directory"],
    );
    check_refused(
        &format!("[broker]\nacl_file = \"{a_dir}/missing.acl\"\n"),
        &["`broker.acl_file`", "missing.acl", "No such file or directory"],
    );
    check_refused(
        &format!("[broker.tls]\ncert_file = \"{a_dir}/none.pem\"\nkey_file = \"{a_dir}/none.key\"\n"),
        &["cert_file", "none.pem", "No such file or directory"],
    );
    check_refused(
        &format!("[upstream]\nurl = \"mqtt://h:1\"\nusername = \"u\"\npassword_file = \"{a_dir}\"\n"),
        &["`upstream.password_file`", &a_dir],
    );
}
