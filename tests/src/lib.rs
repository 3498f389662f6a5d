//! Test harness for Outpost's end-to-end tests.
//!
//! The tests in `tests/tests/*.rs` treat the gateway as a black box: real `outpost` processes
//! (and, where metrics are needed, an in-process [`outpost::Gateway`]), real brokers, real TCP.
//! This crate holds everything they share, written as real code: each helper waits on an event
//! (a log line, a SUBACK, a process closing its output, the last PUBACK) and fails with a
//! message that says what it waited for and what it saw instead.
//!
//! The harness itself (child processes, mosquitto, the subscriber recorder, raw packets, free
//! ports, condition waits) lives in `outpost_sim::harness`, shared with the gateway's tests and
//! benches; this crate re-exports it and adds what is specific to driving the `outpost` binary.
//!
//! # Layout
//! - [`process`]: `outpost_sim::process`, re-exported: [`process::ChildProcess`], a spawned
//!   program whose output is captured line by line and that is killed (SIGKILL, then reaped)
//!   when dropped; signals; [`process::rss_kib`].
//! - [`upstream`]: the brokers and links the gateway relays to: [`upstream::Mosquitto`] (the
//!   harness's), [`upstream::RumqttdUpstream`] (`outpost-sim broker`),
//!   [`upstream::SilentUpstream`] (accepts TCP, never answers), [`upstream::FlakyLink`] and
//!   [`upstream::SwitchedLink`] (cut and restored by the test); [`upstream::mosquitto_pub`], a
//!   cloud application's publish.
//! - [`gateway`]: [`gateway::GatewayProcess`], the `outpost` binary under test, and the one-shot
//!   commands (`outpost check`, `outpost buffer stats`).
//! - [`http`]: a GET against the gateway's `[http]` endpoint and `/metrics` parsed with a
//!   Prometheus text parser, as an operator's scraper reads it.
//! - [`mqtt`]: the harness's [`mqtt::Subscriber`] and [`mqtt::publish_qos1`], the two ends of
//!   a test.
//! - [`notify`]: [`notify::NotifySocket`], systemd's end of `sd_notify` (`NOTIFY_SOCKET`):
//!   what the gateway tells its service manager (READY, watchdog pings, STATUS).
//! - [`tls`]: [`tls::Pki`], certificates made in the test with rcgen (CA, servers valid or
//!   expired, clients by CN) as PEM files, and the `[broker.tls]` table that uses them.
//! - [`windows`]: what the windowed-rule tests share: [`windows::Fleet`], raw 3.1.1 sensors
//!   sending numbered readings one flow at a time (clean or persistent sessions, QoS 1 or 2,
//!   resending as MQTT says), and [`windows::WindowCheck`], which checks that the windows
//!   arriving upstream count every acknowledged reading exactly once.
//! - [`raw`]: `outpost_sim::harness::raw`, re-exported: hand-encoded MQTT packets, for clients
//!   that do what rumqttc will not.
//!
//! # Invariants
//! - Every port comes from [`free_addr`]; nothing uses a fixed port.
//! - Every file lives in a `tempfile::TempDir` owned by the value that uses it.
//! - No helper sleeps to let something happen. The only timed loops are bounded, commented
//!   back-offs between retries of something that has no readiness event (a TCP connect).
//! - Binaries are never built here: they come from the same `target/` directory as the test
//!   (or from `$OUTPOST_E2E_BIN_DIR`), and [`binary`] refuses one that is older than its sources.

pub mod conformance;
pub mod gateway;
pub mod http;
pub mod mqtt;
pub mod notify;
pub mod tls;
pub mod upstream;
pub mod windows;

pub use outpost_sim::harness::raw;
pub use outpost_sim::harness::{in_ci, require_tool, wait_until};
pub use outpost_sim::process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::Context as _;

/// A free address on 127.0.0.1 (`outpost_sim::harness::free_addr`); panics if the machine has
/// none, which no test could survive anyway.
pub fn free_addr() -> SocketAddr {
    outpost_sim::harness::free_addr().expect("a free port on 127.0.0.1")
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The source files cargo recorded for `binary` in its dep-info file (`<binary>.d`, a Makefile
/// rule `target: dep dep …` with spaces in paths escaped as `\ `).
fn recorded_sources(binary: &Path) -> Vec<PathBuf> {
    let Ok(rule) = std::fs::read_to_string(binary.with_extension("d")) else { return Vec::new() };
    let Some((_, deps)) = rule.lines().next().and_then(|line| line.split_once(": ")) else {
        return Vec::new();
    };
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => current.push(chars.next().unwrap_or(' ')),
            ' ' => sources.extend((!current.is_empty()).then(|| PathBuf::from(std::mem::take(&mut current)))),
            c => current.push(c),
        }
    }
    sources.extend((!current.is_empty()).then(|| PathBuf::from(current)));
    sources
}

/// Names a directory to take the binaries from instead, e.g. `target/release` to run the
/// end-to-end tests against optimised builds.
pub const BIN_DIR_ENV: &str = "OUTPOST_E2E_BIN_DIR";

/// Locates a workspace binary next to the running test (or in `$OUTPOST_E2E_BIN_DIR`): the test runs from
/// `target/<profile>/deps/`, binaries live in `target/<profile>/`.
///
/// `cargo test --workspace` builds every binary; `cargo test -p outpost-e2e` alone does not (a
/// package's tests only get their own package's binaries), so run `cargo build --workspace
/// --bins` first. A binary older than any source file cargo recorded for it (its dep-info file)
/// is refused rather than tested.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    // Checked once per test process: a binary that was fresh when a test began stays in use
    // for the whole test, even if a source file is saved meanwhile.
    static CHECKED: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut checked = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = checked.get(name) {
        return Ok(path.clone());
    }
    let path = check_binary(name)?;
    checked.insert(name.to_owned(), path.clone());
    Ok(path)
}

fn check_binary(name: &str) -> anyhow::Result<PathBuf> {
    let profile_dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("cannot find the running test executable")?;
            exe.parent()
                .and_then(Path::parent)
                .with_context(|| format!("unexpected test executable location {}", exe.display()))?
                .to_path_buf()
        }
    };
    let path = profile_dir.join(name);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).with_context(|| {
        format!(
            "the `{name}` binary is missing at {}; build it with `cargo build --workspace --bins` \
                 (or run the tests with `cargo test --workspace`)",
            path.display()
        )
    })?;
    let newer = recorded_sources(&path).into_iter().find(|source| {
        std::fs::metadata(source).and_then(|m| m.modified()).is_ok_and(|modified| modified > built)
    });
    if let Some(source) = newer {
        anyhow::bail!(
            "the `{name}` binary at {} is older than its source {}; rebuild it with `cargo build --workspace --bins` \
             (or run the tests with `cargo test --workspace`)",
            path.display(),
            source.display()
        );
    }
    Ok(path)
}

/// Whether Debian's `mosquitto` broker is installed; see [`require_tool`].
#[track_caller]
pub fn require_mosquitto() -> bool {
    require_tool(upstream::MOSQUITTO, "mosquitto")
}
