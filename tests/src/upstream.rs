//! What the gateway relays to: real brokers in their own processes, and misbehaving links.
//!
//! Upstream brokers run as separate processes so a test can stop, kill and restart them while
//! the gateway runs; rumqttd in particular has no stop API, so an in-process one could never go
//! away.
//!
//! # Invariants
//! - A broker value owns its process and its temporary directory; dropping it kills the process.
//! - A restarted broker listens on the same port as before, so the gateway's configured
//!   upstream URL stays valid.
//! - [`Mosquitto`] (the harness's, `outpost_sim::harness::mosquitto`) persists sessions to its
//!   directory and is stopped with SIGTERM, which saves them: a subscriber with a persistent
//!   session misses nothing across a restart, so "missing" always means the gateway lost it.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use outpost_sim::flaky::{FlakySchedule, LinkShaping, run_flaky_link, run_switched_link};
pub use outpost_sim::harness::mosquitto::{MOSQUITTO, MOSQUITTO_PUB, Mosquitto, MosquittoConfig};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::process::{ChildProcess, run_to_completion};

/// How long a broker may take to start listening.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// A plain rumqttd broker in its own process (`outpost-sim broker`), as an independent upstream.
pub struct RumqttdUpstream {
    addr: SocketAddr,
    process: ChildProcess,
}

impl RumqttdUpstream {
    /// Starts `outpost-sim broker` on a free port and returns once it accepts connections.
    pub async fn start() -> anyhow::Result<RumqttdUpstream> {
        let addr = crate::free_addr();
        let mut command = Command::new(crate::binary("outpost-sim")?);
        command.args(["broker", "--listen", &addr.to_string()]).env("RUST_LOG", "warn");
        let process = ChildProcess::spawn(format!("outpost-sim broker {addr}"), command)?;
        // Printed after the broker accepted a probe connection.
        let expected = format!("listening on {addr}");
        process.wait_for_line(&format!("`{expected}`"), BROKER_TIMEOUT, |line| line == expected).await?;
        Ok(RumqttdUpstream { addr, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The broker's recent output, for failure messages.
    pub fn tail(&self) -> String {
        self.process.tail()
    }
}

/// An "upstream" that accepts TCP connections and never says a word: the CONNACK never comes.
/// Dropping it closes the listener and every held connection.
pub struct SilentUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    _stop: DropGuard,
}

impl SilentUpstream {
    pub async fn start() -> anyhow::Result<SilentUpstream> {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind a silent upstream")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (count, stop) = (Arc::clone(&accepted), cancel.clone());
        tokio::spawn(async move {
            // Held, never read or written, until the test ends.
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => {
                        if let Ok((socket, _)) = accepted {
                            count.fetch_add(1, Ordering::Relaxed);
                            held.push(socket);
                        }
                    }
                }
            }
        });
        Ok(SilentUpstream { addr, accepted, _stop: cancel.drop_guard() })
    }

    /// The address as the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A TCP proxy (`outpost_sim::flaky`) that cuts every connection on a schedule. It runs on the
/// test's runtime: it is part of the test set-up, not of the system under test.
pub struct FlakyLink {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl FlakyLink {
    /// Proxies to `upstream`, up for `up_for`, then down for `down_for`, and so on.
    pub async fn start(
        upstream: SocketAddr,
        up_for: Duration,
        down_for: Duration,
    ) -> anyhow::Result<FlakyLink> {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the flaky link")?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let schedule = FlakySchedule { up_for, down_for, extra_latency: Duration::ZERO };
        tokio::spawn(run_flaky_link(listener, upstream, schedule, cancel.clone()));
        Ok(FlakyLink { addr, _stop: cancel.drop_guard() })
    }

    /// The address as the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

/// A TCP proxy (`outpost_sim::flaky::run_switched_link`) the test switches off and on: off
/// closes every proxied connection and refuses new ones, on lets them through again. For
/// outages whose start and end the test decides (a command sent while the link is down).
pub struct SwitchedLink {
    addr: SocketAddr,
    switch: tokio::sync::watch::Sender<bool>,
    _stop: DropGuard,
}

impl SwitchedLink {
    /// Proxies to `upstream`, up.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<SwitchedLink> {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the switched link")?;
        let addr = listener.local_addr()?;
        let (switch, up) = tokio::sync::watch::channel(true);
        let cancel = CancellationToken::new();
        tokio::spawn(run_switched_link(listener, upstream, up, LinkShaping::default(), cancel.clone()));
        Ok(SwitchedLink { addr, switch, _stop: cancel.drop_guard() })
    }

    /// Cuts (`false`) or restores (`true`) the link.
    pub fn set_up(&self, up: bool) {
        self.switch.send_replace(up);
    }

    /// The address as the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

/// `mosquitto_pub -q QOS -t TOPIC -m MESSAGE` against `broker`, as a cloud application would
/// send a command; returns once the broker acknowledged it (QoS 1) and the tool exited 0.
pub fn mosquitto_pub(
    broker: SocketAddr,
    topic: &str,
    message: &str,
    qos: u8,
    retain: bool,
) -> anyhow::Result<()> {
    let mut command = Command::new(MOSQUITTO_PUB);
    let port = broker.port().to_string();
    let qos = qos.to_string();
    command.args(["-h", &broker.ip().to_string(), "-p", &port, "-q", &qos, "-t", topic, "-m", message]);
    if retain {
        command.arg("-r");
    }
    let output = run_to_completion(command)?;
    anyhow::ensure!(
        output.status.success(),
        "mosquitto_pub to {topic} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
