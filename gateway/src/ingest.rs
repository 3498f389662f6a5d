//! Stage 1: where events come from.
//!
//! Today: the embedded rumqttd broker. Sensors connect to its listeners; one in-process link
//! subscribed to `#` drains every publish into a bounded channel of [`Event`]s. Everything
//! rumqttd-specific lives in this module, behind [`start`]: the rest of the pipeline only sees
//! `mpsc::Receiver<Event>`. (Issue #5 replaces the listener with Outpost's own accept loop so a
//! sensor's PUBACK can wait for the disk commit; only this module changes.)
//!
//! # Invariants
//! - The link is drained as fast as the next stage accepts; `Unschedule` is answered with
//!   `wake()`, or rumqttd would stall the link for good.
//! - Loss is never silent. rumqttd drops events for a reader that falls behind its ring and
//!   only logs a warning; every forward carries its absolute offset in the filter's log, so a
//!   jump in offsets is exactly the number of events lost. It is counted (`ingest_lost`) and
//!   logged.
//! - On shutdown, ingest keeps draining the link until it is quiet (at most 2 s): rumqttd
//!   acknowledged those events to sensors already. It cannot stop its listener, so sensors
//!   that keep publishing during shutdown are acknowledged and then lost (issue #5).
//! - The link's client id ends in 64 random bits chosen at start-up, so no sensor can guess it
//!   and take over the gateway's own session (rumqttd's router refuses ids with `$` or `/`,
//!   even for in-process links, so a reserved prefix is not available).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::BrokerConfig;
use crate::event::{Event, IdGen, now_ms};
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;

/// On shutdown, ingest stops once the broker link has been quiet this long…
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// …or after this long at most (sensors may keep publishing: rumqttd cannot stop accepting).
const DRAIN_MAX: Duration = Duration::from_secs(2);

fn link_id(role: &str) -> String {
    format!("outpost-{role}-{:016x}", rand::random::<u64>())
}

/// Publishes into the local broker for rules' `republish` actions (event chains, actuators).
/// Sensors subscribed to the topic receive it like any publish.
pub struct Republisher {
    link: rumqttd::local::LinkTx,
}

impl Republisher {
    /// Hands the publish to the broker without waiting; refuses when the link is full.
    pub fn try_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        self.link
            .try_publish(topic.to_owned(), payload.to_vec())
            .map(drop)
            .map_err(|e| format!("local broker link: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {addr} (`{key}`): {source}; pick a free address or stop what holds it")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("the embedded broker refused the ingest link: {0}")]
    Link(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded broker did not start listening on {addr} within {timeout:?}")]
    NotListening { addr: SocketAddr, timeout: Duration },
}

/// Maps our typed broker config onto rumqttd's, in this one place.
fn rumqttd_config(cfg: &BrokerConfig) -> rumqttd::Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: u16::try_from(cfg.connection_timeout.as_millis()).unwrap_or(u16::MAX),
        max_payload_size: usize::try_from(cfg.max_payload.as_u64()).unwrap_or(usize::MAX),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen: SocketAddr| {
        HashMap::from([(
            name.to_owned(),
            ServerSettings {
                name: name.to_owned(),
                listen,
                tls: None,
                next_connection_delay_ms: 1,
                connections: connections.clone(),
            },
        )])
    };
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections.get() + 1,
            max_outgoing_packet_count: 200,
            max_segment_size: usize::try_from(cfg.ring_segment_size.as_u64()).unwrap_or(usize::MAX),
            max_segment_count: cfg.ring_segments.get(),
            ..RouterConfig::default()
        },
        v4: Some(server("v4", cfg.listen)),
        v5: cfg.listen_v5.map(|addr| server("v5", addr)),
        ..rumqttd::Config::default()
    }
}

/// rumqttd binds inside its own threads and only logs a failure; probing first turns "port
/// taken" into a start-up error that names the key.
fn probe_bind(key: &'static str, addr: SocketAddr) -> Result<(), IngestError> {
    TcpListener::bind(addr).map(drop).map_err(|source| IngestError::Bind { key, addr, source })
}

/// Starts the embedded broker and the ingest task. Returns once the listeners accept
/// connections, so callers (and tests) can connect sensors right away.
pub async fn start(
    cfg: &BrokerConfig,
    ids: IdGen,
    out: mpsc::Sender<Event>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Republisher, IngestError> {
    probe_bind("broker.listen", cfg.listen)?;
    if let Some(addr) = cfg.listen_v5 {
        probe_bind("broker.listen_v5", addr)?;
    }
    let mut broker = Broker::new(rumqttd_config(cfg));
    let (mut link_tx, link_rx) =
        broker.link(&link_id("ingest")).map_err(|e| IngestError::Link(e.to_string()))?;
    link_tx.subscribe("#").map_err(|e| IngestError::Link(e.to_string()))?;
    let (republish_tx, republish_rx) =
        broker.link(&link_id("republish")).map_err(|e| IngestError::Link(e.to_string()))?;
    // rumqttd has no stop API: the broker thread lives as long as the process.
    std::thread::Builder::new()
        .name("outpost-broker".into())
        .spawn(move || {
            if let Err(error) = broker.start() {
                error!(message = "embedded broker stopped", %error);
            }
        })
        .map_err(IngestError::Thread)?;
    for addr in std::iter::once(cfg.listen).chain(cfg.listen_v5) {
        wait_listening(addr).await?;
        info!(message = "embedded broker listening", %addr);
    }
    tracker.spawn(drain_link(link_tx, link_rx, ids, out, metrics, cancel.clone()));
    tracker.spawn(idle_link(republish_rx, cancel));
    Ok(Republisher { link: republish_tx })
}

/// Keeps the publish-only link serviced: it subscribes to nothing, but rumqttd still
/// schedules it and stalls a link whose `Unschedule` goes unanswered.
async fn idle_link(mut link_rx: rumqttd::local::LinkRx, cancel: CancellationToken) {
    loop {
        let notification = tokio::select! {
            _ = cancel.cancelled() => break,
            n = link_rx.next() => n,
        };
        match notification {
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// Waits until `addr` accepts TCP connections: the readiness signal rumqttd does not give.
async fn wait_listening(addr: SocketAddr) -> Result<(), IngestError> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() },
            addr.port(),
        )
    } else {
        addr
    };
    let timeout = Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if tokio::net::TcpStream::connect(target).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(IngestError::NotListening { addr, timeout });
        }
        // Polling is the only readiness signal rumqttd offers; the pause is bounded backoff.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Tracks the filter log's absolute offsets to detect events rumqttd skipped.
#[derive(Debug, Default)]
struct GapDetector {
    last_offset: Option<u64>,
}

impl GapDetector {
    /// Returns how many events were skipped before this one.
    fn observe(&mut self, offset: u64) -> u64 {
        let lost = match self.last_offset {
            Some(last) if offset > last + 1 => offset - last - 1,
            _ => 0,
        };
        self.last_offset = Some(offset);
        lost
    }
}

async fn drain_link(
    _link_tx: rumqttd::local::LinkTx,
    mut link_rx: rumqttd::local::LinkRx,
    ids: IdGen,
    out: mpsc::Sender<Event>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let counters = metrics.counters();
    let mut gaps = GapDetector::default();
    let mut gap_log = LogThrottle::default();
    // Set once shutdown is requested: rumqttd has already acknowledged whatever sits in its
    // ring, so ingest keeps reading until the link has been quiet for `DRAIN_IDLE` (or
    // `DRAIN_MAX` passed), instead of dropping acknowledged events on the floor.
    let mut draining_until: Option<tokio::time::Instant> = None;
    loop {
        let notification = match draining_until {
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    draining_until = Some(tokio::time::Instant::now() + DRAIN_MAX);
                    info!(message = "draining events the broker already acknowledged before stopping");
                    continue;
                }
                n = link_rx.next() => n,
            },
            Some(deadline) => {
                let idle = DRAIN_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                match tokio::time::timeout(idle, link_rx.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                }
            }
        };
        match notification {
            Ok(Some(Notification::Forward(forward))) => {
                if let Some((_, offset)) = forward.cursor {
                    let lost = gaps.observe(offset);
                    if lost > 0 {
                        Metrics::add(&counters.ingest_lost, lost);
                        if let Some(folded) = gap_log.ready(tokio::time::Instant::now()) {
                            error!(
                                message = "ingest fell behind the broker's ring and the broker dropped events; raise broker.ring_segment_size/ring_segments or reduce the load",
                                lost,
                                similar_since_last_log = folded,
                                lost_total = Metrics::get(&counters.ingest_lost)
                            );
                        }
                    }
                }
                let publish = forward.publish;
                let event = Event {
                    id: ids.next_id(),
                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                    // rumqttd hands over a `Bytes` view of its ring: no copy.
                    payload: publish.payload,
                    qos: None,
                    received_ms: now_ms(),
                    client_id: None,
                };
                Metrics::add(&counters.ingested, 1);
                // Waiting here is backpressure into the broker's ring; losing it there is
                // detected above. The event in hand is always delivered: the stages after
                // ingest run until ingest closes its channel, so this ends (or the shutdown
                // timeout ends the process).
                if out.send(event).await.is_err() {
                    break;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if let Err(error) = link_rx.wake().await {
                    error!(message = "embedded broker link failed; ingest stops", %error);
                    break;
                }
            }
            Ok(Some(other)) => {
                debug!(message = "ingest link notification", kind = ?std::mem::discriminant(&other))
            }
            Ok(None) => {}
            Err(error) => {
                error!(message = "embedded broker link failed; ingest stops", %error);
                break;
            }
        }
    }
    info!(message = "ingest stopped");
    drop(out);
    if cancel.is_cancelled() {
        return;
    }
    warn!(message = "ingest ended before shutdown was requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_skipped_offsets() {
        let mut g = GapDetector::default();
        assert_eq!(g.observe(0), 0);
        assert_eq!(g.observe(1), 0);
        assert_eq!(g.observe(5), 3);
        assert_eq!(g.observe(6), 0);
    }

    #[test]
    fn config_maps_sizes_and_listeners() {
        let cfg = BrokerConfig {
            listen_v5: Some("127.0.0.1:1884".parse().expect("addr")),
            ..BrokerConfig::default()
        };
        let r = rumqttd_config(&cfg);
        assert_eq!(r.router.max_segment_size, 1024 * 1024);
        assert_eq!(r.router.max_segment_count, 4);
        assert!(r.v5.is_some());
        let v4 = r.v4.expect("v4 listener");
        assert_eq!(v4["v4"].connections.max_payload_size, 256 * 1024);
    }
}
