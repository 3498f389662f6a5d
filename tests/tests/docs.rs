//! The docs say what the programs do: every command line in README.md and
//! simulators/README.md parses with the real clap definitions, and the facts the docs state
//! about the example config and the source agree with them.

use std::path::Path;
use std::process::Command;

use clap::{CommandFactory, Parser};
use outpost::cli::Cli;
use outpost::config::{GatewayConfig, Overrides};
use outpost_e2e::workspace_root;

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Whitespace collapsed to single spaces, so a phrase can be found across a line break.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The text between the heading `start` and the next heading of the same level.
fn section<'a>(markdown: &'a str, start: &str) -> &'a str {
    let level = start.split(' ').next().unwrap_or("#");
    let from = markdown.find(start).unwrap_or_else(|| panic!("no heading {start:?}"));
    let body = &markdown[from + start.len()..];
    let end = body.find(&format!("\n{level} ")).unwrap_or(body.len());
    &body[..end]
}

/// The contents of the fenced blocks tagged `lang`.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut found = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").unwrap_or(body.len());
        found.push(&body[..end]);
        rest = &body[end..];
    }
    found
}

/// Shell words of one line: quotes group, an unquoted `#` word starts a comment, and the
/// brackets of optional groups (`[--rules FILE]`) are dropped.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '[' | ']') => {}
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Every `outpost …` and `outpost-sim …` command in the `sh` blocks of `markdown`, as the
/// program name and its arguments. `cargo run -p outpost -- ARGS` counts as `outpost ARGS`.
fn commands(markdown: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for block in blocks(markdown, "sh") {
        for line in block.replace("\\\n", " ").lines() {
            let mut words = words(line);
            if words.first().is_some_and(|w| w == "cargo") {
                let Some(dashes) = words.iter().position(|w| w == "--") else { continue };
                let program = words.iter().position(|w| w == "-p").and_then(|p| words.get(p + 1)).cloned();
                let Some(program) = program else { continue };
                words = std::iter::once(program).chain(words.drain(dashes + 1..)).collect();
            }
            let Some(first) = words.first() else { continue };
            let program = Path::new(first).file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
            if program == "outpost" || program == "outpost-sim" {
                found.push((program, words[1..].to_vec()));
            }
        }
    }
    found
}

#[test]
fn every_command_line_in_the_readmes_parses() {
    let mut checked = 0;
    for readme in ["README.md", "simulators/README.md"] {
        for (program, args) in commands(&read(readme)) {
            checked += 1;
            if program == "outpost" {
                let argv = std::iter::once("outpost".to_owned()).chain(args.iter().cloned());
                if let Err(e) = Cli::try_parse_from(argv) {
                    use clap::error::ErrorKind::{DisplayHelp, DisplayVersion};
                    assert!(
                        matches!(e.kind(), DisplayHelp | DisplayVersion),
                        "{readme}: outpost {args:?}:\n{e}"
                    );
                }
            } else {
                // Its definitions live in the binary: `--help` after the words makes clap parse
                // every word before it (names, values) and then print help instead of running.
                let binary = outpost_e2e::binary("outpost-sim").expect("the outpost-sim binary");
                let output =
                    Command::new(binary).args(&args).arg("--help").output().expect("run outpost-sim");
                assert!(
                    output.status.success(),
                    "{readme}: outpost-sim {args:?}:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    assert!(checked >= 10, "only {checked} command lines found; is the parser still right?");
}

#[test]
fn the_command_line_synopsis_names_real_subcommands_and_flags() {
    let mut cli = Cli::command();
    cli.build();
    let readme = read("README.md");
    let synopsis = blocks(section(&readme, "## Command line"), "text").concat();
    let mut lines = 0;
    for line in synopsis.lines().filter(|l| l.starts_with("outpost ")) {
        lines += 1;
        let words: Vec<String> =
            line.split_whitespace().map(|w| w.trim_matches(['[', ']']).to_owned()).collect();
        let mut command = &cli;
        for word in &words[1..] {
            if let Some(sub) = command.find_subcommand(word) {
                command = sub;
            } else if let Some(flag) = word.strip_prefix("--") {
                assert!(
                    command.get_arguments().any(|a| a.get_long() == Some(flag)),
                    "README: `{line}`: `outpost {}` has no --{flag}",
                    command.get_name()
                );
            } else if let Some(short) = word.strip_prefix('-').and_then(|s| s.chars().next()) {
                assert!(
                    command.get_arguments().any(|a| a.get_short() == Some(short)),
                    "README: `{line}`: `outpost {}` has no -{short}",
                    command.get_name()
                );
            }
        }
    }
    assert!(lines >= 8, "only {lines} synopsis lines found");
}

#[test]
fn help_texts_say_what_the_programs_do() {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("outpost run");
    let listen = run.get_arguments().find(|a| a.get_id() == "listen").expect("--listen");
    let help = listen.get_help().map(ToString::to_string).unwrap_or_default();
    assert!(help.contains("MQTT 3.1.1 and 5"), "`outpost run --listen` speaks both versions: {help:?}");

    // The compare run time is stated the same way in both READMEs and in --help.
    let binary = outpost_e2e::binary("outpost-sim").expect("the outpost-sim binary");
    let output = Command::new(binary).args(["compare", "--help"]).output().expect("run outpost-sim");
    let compare_help = flat(&String::from_utf8_lossy(&output.stdout));
    for (place, text) in [
        ("outpost-sim compare --help", compare_help.clone()),
        ("README.md", flat(&read("README.md"))),
        ("simulators/README.md", flat(&read("simulators/README.md"))),
    ] {
        assert!(text.contains("3 min 40 s of publishing"), "{place} states the documented run's length");
    }
    assert!(compare_help.contains("48 s of publishing"), "{compare_help}");
    assert!(flat(&read("simulators/README.md")).contains("48 s of publishing"));
}

#[test]
fn the_docs_state_what_the_example_config_does() {
    let example = workspace_root().join("examples/outpost.toml");
    let config = GatewayConfig::load(Some(&example), &Overrides::default()).expect("the example is valid");
    let upstream = config.upstream.expect("the example has an upstream");

    let quick_start = flat(section(&read("README.md"), "## Quick start"));
    let prefix = &upstream.topic_prefix;
    assert!(!prefix.is_empty());
    assert!(quick_start.contains(&format!("topic_prefix = \"{prefix}\"")), "{quick_start}");
    assert!(quick_start.contains(&format!("`{prefix}sensors/s-0001/temp`")), "{quick_start}");
    let data_dir =
        config.data_dir.strip_prefix(workspace_root()).expect("data_dir is relative to the example");
    assert!(quick_start.contains(&format!("`{}`", data_dir.display())), "{quick_start}");

    let demo = flat(section(&read("simulators/README.md"), "## demo"));
    let reconnect_max = humantime::format_duration(upstream.reconnect_max).to_string();
    assert!(demo.contains(&format!("reconnect_max = \"{reconnect_max}\"")), "{demo}");
}

#[test]
fn the_compaction_threshold_is_the_sources() {
    let source = read("gateway/src/buffer/store.rs");
    let line = source
        .lines()
        .find(|l| l.contains("const COMPACT_ABOVE_BYTES: u64 ="))
        .expect("the compaction threshold in store.rs");
    let mib = line
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().trim_end_matches(';').strip_suffix(" * 1024 * 1024"))
        .expect("written as N * 1024 * 1024");
    let readme = flat(&read("README.md"));
    assert!(
        readme.contains(&format!("a file larger than {mib} MiB is compacted")),
        "README states {mib} MiB"
    );
}
