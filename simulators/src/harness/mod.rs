//! The one test harness: what the end-to-end tests (`outpost-e2e`), the gateway's integration
//! tests, its benches and the simulators' own commands share to drive real programs over real
//! sockets.
//!
//! - [`crate::process::ChildProcess`]: a spawned program, killed (SIGKILL, then reaped) when
//!   dropped, its output captured line by line or written to a log file.
//! - [`mosquitto::Mosquitto`]: Debian's broker on a free port, restartable on the same port.
//! - [`crate::verify::Subscriber`]: the subscriber recorder, MQTT 3.1.1 or 5, clean or
//!   persistent session, feeding the `Verifier`.
//! - [`pki`]: a test CA (rcgen) and the certificates it issues, and a TLS listener for mosquitto.
//! - [`raw`]: hand-encoded MQTT packets, and the one copy of the fixed-header and variable byte
//!   integer parsing the test clients and probes need.
//! - [`free_port`], [`free_addr`], [`wait_until`], [`unique_client_id`], [`require_tool`].
//!
//! # Invariants
//! - Every port comes from [`free_port`]/[`free_addr`]; nothing uses a fixed port.
//! - Nothing here sleeps to let something happen: a wait is on an event (a line, a packet, a
//!   channel) or, where the awaited state has no event (counters, `/proc`), [`wait_until`]
//!   polls a condition against a deadline.
//! - Nothing here depends on the gateway crate (see the crate's invariant).

pub mod mosquitto;
pub mod pki;
pub mod raw;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;

/// How often [`wait_until`] checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A loopback address with a port that was free a moment ago.
///
/// The port is released before the caller binds it, so another process could take it in
/// between; on a test machine that is rare, and the caller's bind then fails loudly.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    probe.local_addr().context("cannot read the probe's address")
}

/// A free TCP port on 127.0.0.1; see [`free_addr`].
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_addr()?.port())
}

/// Waits until `condition` holds, checking it every 10 ms, and fails once `timeout` passed;
/// `what` names the condition in that error.
///
/// For state that announces no change of its own (atomic counters, `/proc`, a file's size);
/// anything with an event (a log line, a message, a channel) is awaited on that event instead.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting until {what}");
        }
        // The poll interval of a condition with no event, not a synchronisation by sleeping.
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Ok(())
}

/// Distinguishes the client ids of the clients one process creates.
static CLIENT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A client id unique in this run, e.g. `outpost-sim-verify-4711-3`: the role, the process
/// id, a counter.
pub fn unique_client_id(role: &str) -> String {
    format!("outpost-sim-{role}-{}-{}", std::process::id(), CLIENT_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Whether the environment says this is a CI run, where missing tools are failures.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Checks that an external tool a test needs is installed.
///
/// Under CI (`CI` set) a missing tool fails the test: CI installs it (`.ci/run`), so its absence
/// is a broken set-up, not a reason to skip. Elsewhere the test prints a notice and the caller
/// returns early.
#[track_caller]
pub fn require_tool(path: &str, package: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(!in_ci(), "{path} is missing and CI is set: install the Debian package `{package}`");
    eprintln!("notice: {path} is missing; skipping this test (install the Debian package `{package}`)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_fails_at_its_deadline() {
        let error = wait_until("never", Duration::from_millis(50), || false).await.expect_err("times out");
        assert!(format!("{error}").contains("waiting until never"), "{error}");
        let mut checks = 0;
        wait_until("the third check", Duration::from_secs(10), || {
            checks += 1;
            checks == 3
        })
        .await
        .expect("holds on the third check");
    }

    #[test]
    fn free_addrs_are_loopback() {
        let addr = free_addr().expect("a free port");
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    }
}
