//! Loading the rules file, and reloading it while the gateway runs.
//!
//! A rules file may name table files (`[[table]] file = "devices.csv"`, relative to the rules
//! file); they are read here and handed to the pure `outpost_rules` compiler as text, so the
//! rule engine itself never touches the file system.
//!
//! # Invariants
//! - A reload that fails (unreadable file, any rule or table error) changes nothing: the
//!   running rules stay, the error is logged with every problem and counted.
//! - Rules that keep state between events (a window, `deadband`, `dedupe`, `lag` ...) load
//!   like any other: the route stage checkpoints their state into the buffer file and
//!   acknowledges a reading they took in only once a checkpoint holding it has committed
//!   (`route::checkpoint`).
//! - Reloads happen on SIGHUP and when the rules file or one of its table files changes
//!   (checked every 2 s by size and modification time: cheap, and works on every file
//!   system, including the SD cards and overlays edge devices use).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_rules::{RuleSet, RulesError, TableSources};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::route::Routing;

const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// The largest rules or table file read (64 MiB): a rules file is written by hand and a table
/// of a site's devices is far smaller, while a file many times that (a wrong path, a log) would
/// be held in memory twice over while it is compiled, at start-up and at every reload.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read rules file {}: {source} (`rules` in a config file is relative to that file; --rules and OUTPOST_RULES to the working directory)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot read table file {} (named in {}): {source}", path.display(), rules.display())]
    ReadTable { path: PathBuf, rules: PathBuf, source: std::io::Error },
    #[error("{}: line {line}: not UTF-8 (byte {byte} of the line); save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`", path.display())]
    NotUtf8 { path: PathBuf, line: usize, byte: usize },
    #[error("{}: {size} bytes is over the limit of {MAX_FILE_BYTES} bytes for a rules or table file; split the table, or keep only the rows the rules need", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}: {source}", path.display())]
    Rules { path: PathBuf, source: RulesError },
}

impl LoadError {
    /// Every problem, one line each (a SQL caret adds lines), each naming the file.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Rules { path, source } => {
                source.problems().into_iter().map(|p| format!("{}: {p}", path.display())).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

/// The table files a rules file names, resolved against the rules file's directory.
fn table_paths(rules_path: &Path, text: &str) -> Result<Vec<(String, PathBuf)>, LoadError> {
    let names = RuleSet::table_files(text)
        .map_err(|source| LoadError::Rules { path: rules_path.to_owned(), source })?;
    let dir = rules_path.parent().unwrap_or_else(|| Path::new("."));
    Ok(names.into_iter().map(|name| (name.clone(), dir.join(name))).collect())
}

/// Reads a rules or table file: at most [`MAX_FILE_BYTES`], UTF-8 (the error names the line).
fn read_text(path: &Path) -> Result<Result<String, LoadError>, std::io::Error> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough to know; a file growing meanwhile cannot get past it.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Ok(Err(LoadError::TooLarge { path: path.to_owned(), size }));
    }
    Ok(String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
        LoadError::NotUtf8 {
            path: path.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            byte: valid.len() - line_start + 1,
        }
    }))
}

/// Reads and compiles a rules file and the table files it names.
pub fn load(path: &Path) -> Result<RuleSet, LoadError> {
    let text = read_text(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })??;
    let mut sources = TableSources::new();
    for (name, table_path) in table_paths(path, &text)? {
        let table_text = read_text(&table_path).map_err(|source| LoadError::ReadTable {
            path: table_path.clone(),
            rules: path.to_owned(),
            source,
        })??;
        sources = sources.with_text(name, table_text);
    }
    RuleSet::compile(&text, &sources).map_err(|source| LoadError::Rules { path: path.to_owned(), source })
}

/// What identifies the current version of the rules and their tables on disk.
fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<(u64, SystemTime)>)> {
    let stamp = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
    let mut files = vec![(path.to_owned(), stamp(path))];
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(tables) = table_paths(path, &text) {
            files.extend(tables.into_iter().map(|(_, p)| {
                let s = stamp(&p);
                (p, s)
            }));
        }
    }
    files
}

/// Reloads on SIGHUP and on file change until `cancel`.
pub async fn watch(
    path: PathBuf,
    routing: watch::Sender<Arc<Routing>>,
    events_wanted: crate::event::EventsWanted,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut seen = tokio::task::spawn_blocking({
        let path = path.clone();
        move || fingerprint(&path)
    })
    .await
    .unwrap_or_default();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reason = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(()) = async { hangup.as_mut()?.recv().await } => "SIGHUP",
            _ = poll.tick() => {
                let now = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || fingerprint(&path)
                })
                .await
                .unwrap_or_default();
                if now == seen {
                    continue;
                }
                seen = now;
                "file changed"
            }
        };
        let loaded = tokio::task::spawn_blocking({
            let path = path.clone();
            move || load(&path)
        })
        .await;
        let counters = metrics.counters();
        match loaded {
            Ok(Ok(rules)) => {
                Metrics::add(&counters.rules_reloads, 1);
                info!(message = "rules reloaded", path = %path.display(), reason, rules = rules.len());
                // Before the swap: a client event reported in between finds no rule for it
                // (dropped by the route stage, never unrouted) rather than being missed.
                events_wanted.set(rules.event_kinds());
                routing.send_replace(Arc::new(Routing::Rules(rules)));
            }
            Ok(Err(e)) => {
                Metrics::add(&counters.rules_reload_failures, 1);
                error!(message = "rules file rejected; the running rules stay. Fix the file and save it again (or send SIGHUP)", reason, error = %e);
            }
            Err(e) => error!(message = "rules reload task failed", error = %e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    const RULES: &str = "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n\n[[rule]]\nname = \"r\"\nsql = 'SELECT * FROM \"t/#\"'\n[[rule.action]]\ntype = \"forward\"\n";

    #[test]
    fn a_table_that_is_not_utf8_is_refused_naming_the_file_and_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = write(dir.path(), "rules.toml", RULES.as_bytes());
        let table = write(dir.path(), "devices.csv", b"device,site\nd1,plant-a\nd2,K\xf6ln\n");
        let err = load(&rules).expect_err("refused").to_string();
        assert_eq!(
            err,
            format!(
                "{}: line 3: not UTF-8 (byte 5 of the line); save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
                table.display()
            )
        );
        write(dir.path(), "devices.csv", "device,site\nd1,plant-a\nd2,Köln\n".as_bytes());
        assert_eq!(load(&rules).expect("loads").len(), 1);
    }

    #[test]
    fn a_file_over_the_limit_is_refused_before_it_is_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = write(dir.path(), "rules.toml", RULES.as_bytes());
        let table = dir.path().join("devices.csv");
        // Sparse: no disk is spent on it.
        std::fs::File::create(&table).and_then(|f| f.set_len(MAX_FILE_BYTES + 1)).expect("create");
        let err = load(&rules).expect_err("refused").to_string();
        assert!(
            err.starts_with(&format!(
                "{}: 67108865 bytes is over the limit of 67108864 bytes for a rules or table file; split",
                table.display()
            )),
            "{err}"
        );
    }
}
