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
//! - [`Mosquitto`] persists sessions to its directory and is stopped with SIGTERM, which saves
//!   them: a subscriber with a persistent session misses nothing across a restart, so
//!   "missing" always means the gateway lost it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use outpost_sim::flaky::{FlakySchedule, run_flaky_link};
use tempfile::TempDir;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::process::ChildProcess;

/// Where Debian installs the broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Where Debian installs the command-line publisher.
pub const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";

/// How long a broker may take to start listening or to stop.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// Debian's mosquitto on 127.0.0.1, configured for loss-free testing.
pub struct Mosquitto {
    port: u16,
    /// Declared before `dir`, so the broker is killed before its directory is removed.
    process: Option<ChildProcess>,
    /// Holds `mosquitto.conf` and the persistence file.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker on a free port and returns once it accepts connections.
    pub async fn start() -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with("").await
    }

    /// Like [`start`](Self::start), with `extra_config` (whole `mosquitto.conf` lines, e.g.
    /// `"max_packet_size 2000\n"`) appended to the generated config: how a test gives the
    /// upstream limits or an `acl_file`.
    pub async fn start_with(extra_config: &str) -> anyhow::Result<Mosquitto> {
        let mut broker = Mosquitto::not_started_with(extra_config)?;
        broker.start_again().await?;
        Ok(broker)
    }

    /// Reserves a port and writes the config without starting the broker, for tests where the
    /// upstream is down at first. [`start_again`](Self::start_again) starts it.
    pub fn not_started() -> anyhow::Result<Mosquitto> {
        Mosquitto::not_started_with("")
    }

    /// Like [`not_started`](Self::not_started), with `extra_config` appended to the config
    /// (see [`start_with`](Self::start_with)).
    pub fn not_started_with(extra_config: &str) -> anyhow::Result<Mosquitto> {
        let port = crate::free_port();
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        // max_queued_messages 0: no per-client queue limit. The default (1000) silently drops
        // messages queued for a slow or offline subscriber, which a test would count as lost.
        let mut config = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             max_queued_messages 0\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n",
            dir.path().display()
        );
        config.push_str(extra_config);
        if !config.ends_with('\n') {
            config.push('\n');
        }
        std::fs::write(dir.path().join("mosquitto.conf"), config).context("cannot write mosquitto.conf")?;
        Ok(Mosquitto { port, process: None, dir })
    }

    /// The listener address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The address as the gateway's `upstream.url`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// Starts the broker (again) on its port, with the sessions saved by the last
    /// [`stop`](Self::stop), and returns once it accepts connections.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.process.is_none(), "mosquitto on port {} is already running", self.port);
        let mut command = Command::new(MOSQUITTO);
        command.arg("-c").arg(self.config_path());
        let process = ChildProcess::spawn(format!("mosquitto :{}", self.port), command)?;
        // mosquitto logs "mosquitto version X running" after its listeners are open.
        process
            .wait_for_line("its `running` notice", BROKER_TIMEOUT, |line| {
                line.contains("mosquitto version") && line.ends_with(" running")
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the broker with SIGTERM, which makes it save its sessions and queued messages, and
    /// waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let mut process = self.process.take().context("mosquitto is not running")?;
        process.terminate(BROKER_TIMEOUT).await
    }

    /// Kills the broker with SIGKILL: whatever it held in memory is lost.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut process = self.process.take().context("mosquitto is not running")?;
        process.kill()
    }

    /// The broker's recent output, for failure messages.
    pub fn tail(&self) -> String {
        self.process.as_ref().map_or_else(|| "mosquitto is not running".to_owned(), ChildProcess::tail)
    }
}

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
