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

/// Debian's NATS server (package `nats-server`).
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long a three-node NATS cluster may take to answer MQTT QoS 1 on every node (measured:
/// 0.9–1.6 s on the 2-core target; JetStream elects its meta leader first).
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of a [`NatsCluster`].
pub struct NatsNode {
    pub name: String,
    /// The MQTT listener.
    pub mqtt: SocketAddr,
    process: Option<ChildProcess>,
}

impl NatsNode {
    /// The MQTT listener as the gateway's `upstream.urls` entry.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    pub fn tail(&self) -> String {
        self.process.as_ref().map_or_else(|| "(killed)".to_owned(), ChildProcess::tail)
    }
}

/// A real three-node NATS cluster on loopback: JetStream (every node a voter, file storage in
/// its own directory) and its MQTT 3.1.1 listener on each node, joined by routes. NATS keeps
/// MQTT sessions and QoS 1 messages in replicated JetStream streams, so a persistent subscriber
/// on one node receives what is published on another, also after a node died.
///
/// # Invariants
/// - [`NatsCluster::start`] returns once every node acknowledged a QoS 1 publish on MQTT.
/// - Every node listens on free loopback ports, keeps its files in the cluster's tempdir and is
///   killed when the cluster is dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts three nodes and waits until each answers MQTT QoS 1.
    pub async fn start() -> anyhow::Result<NatsCluster> {
        let dir = tempfile::tempdir().context("tempdir for the NATS cluster")?;
        let ports: Vec<(SocketAddr, SocketAddr, SocketAddr, SocketAddr)> = (0..3)
            .map(|_| (crate::free_addr(), crate::free_addr(), crate::free_addr(), crate::free_addr()))
            .collect();
        let routes: Vec<String> =
            ports.iter().map(|(_, _, route, _)| format!("\"nats-route://{route}\"")).collect();
        let mut nodes = Vec::new();
        for (i, (client, http, route, mqtt)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store)?;
            let config = format!(
                "server_name: {name}\nlisten: \"{client}\"\nhttp: \"{http}\"\n\
                 jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 1GB }}\n\
                 cluster {{ name: outpost-test, listen: \"{route}\", routes: [{}] }}\n\
                 mqtt {{ listen: \"{mqtt}\" }}\n",
                store.display(),
                routes.join(", ")
            );
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, config)?;
            let mut command = Command::new(NATS_SERVER);
            command.arg("-c").arg(&path);
            let process = ChildProcess::spawn(format!("nats-server {name}"), command)?;
            nodes.push(NatsNode { name, mqtt: *mqtt, process: Some(process) });
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        for node in &cluster.nodes {
            cluster.wait_answering(node).await?;
        }
        Ok(cluster)
    }

    /// Waits until `node` acknowledges a QoS 1 publish: its MQTT listener is up and JetStream
    /// has the majority it needs to store.
    async fn wait_answering(&self, node: &NatsNode) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + CLUSTER_READY_TIMEOUT;
        let mut last_error = String::new();
        while tokio::time::Instant::now() < deadline {
            let client_id = crate::mqtt::unique_client_id("nats-ready");
            let probe = crate::mqtt::publish_qos1(
                node.mqtt,
                &client_id,
                "outpost-test/ready",
                [b"ready".to_vec()],
                Duration::from_secs(3),
            );
            match probe.await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = format!("{e:#}"),
            }
            // A retry interval while the node starts: its readiness has no event to wait on.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "NATS node {} did not acknowledge a QoS 1 publish within {CLUSTER_READY_TIMEOUT:?}: {last_error}\n{}",
            node.name,
            node.tail()
        )
    }

    /// The node whose MQTT listener is `url`.
    pub fn node(&self, url: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.url() == url)
    }

    /// SIGKILLs node `idx` and reaps it.
    pub fn kill(&mut self, idx: usize) -> anyhow::Result<()> {
        if let Some(mut process) = self.nodes[idx].process.take() {
            process.kill()?;
        }
        Ok(())
    }

    pub fn tail(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {}\n{}", n.name, n.tail())).collect::<Vec<_>>().join("\n")
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
        SwitchedLink::start_shaped(upstream, LinkShaping::default()).await
    }

    /// Proxies to `upstream`, up, with `shaping` (a slow WAN: added latency, a bandwidth cap).
    pub async fn start_shaped(upstream: SocketAddr, shaping: LinkShaping) -> anyhow::Result<SwitchedLink> {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the switched link")?;
        let addr = listener.local_addr()?;
        let (switch, up) = tokio::sync::watch::channel(true);
        let cancel = CancellationToken::new();
        tokio::spawn(run_switched_link(listener, upstream, up, shaping, cancel.clone()));
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
    mosquitto_pub_with(broker, topic, message, qos, retain, &[])
}

/// [`mosquitto_pub`] with more arguments, e.g. `["-V", "mqttv5", "-D", "publish",
/// "user-property", "site", "plant-a"]` for an MQTT 5 publish with a user property.
pub fn mosquitto_pub_with(
    broker: SocketAddr,
    topic: &str,
    message: &str,
    qos: u8,
    retain: bool,
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut command = Command::new(MOSQUITTO_PUB);
    let port = broker.port().to_string();
    let qos = qos.to_string();
    command.args(["-h", &broker.ip().to_string(), "-p", &port, "-q", &qos, "-t", topic, "-m", message]);
    if retain {
        command.arg("-r");
    }
    command.args(extra);
    let output = run_to_completion(command)?;
    anyhow::ensure!(
        output.status.success(),
        "mosquitto_pub to {topic} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
