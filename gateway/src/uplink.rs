//! Stage 4: the upstream MQTT connection.
//!
//! This task only polls rumqttc's event loop and reports what happened; the relay decides what
//! to send. Each connection attempt gets a **fresh** `AsyncClient`/`EventLoop` pair, numbered
//! by a generation, with a clean session. That sidesteps three rumqttc traps listed in
//! FIELD-NOTES: a session-less reconnect silently clears publishes still queued in the old
//! event loop, acks read just before a failure are delivered after the next CONNACK (when
//! packet ids may already be reused), and `publish` returns no packet id. With one event loop
//! per generation, nothing from an old connection can reach a new one, and the relay, which
//! treats its buffer as the truth, simply resends everything unacknowledged.
//!
//! # Invariants
//! - Events are reported in rumqttc's order: `Published(pkid)` events arrive in the order the
//!   relay called `try_publish`, which is how the relay learns each publish's packet id.
//! - Every message carries its generation; the relay ignores messages from old generations.
//! - The loop reconnects with capped exponential backoff plus jitter and stops on cancellation.

use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// What the uplink tells the relay.
#[derive(Debug)]
pub enum UplinkEvent {
    /// CONNACK received; `client` publishes on this generation's connection.
    Connected { generation: u64, client: AsyncClient },
    /// rumqttc wrote the next requested publish with this packet id.
    Published { generation: u64, pkid: u16 },
    /// The upstream acknowledged this packet id.
    Acked { generation: u64, pkid: u16 },
    /// This generation's connection is gone; nothing more will come from it.
    Disconnected { generation: u64 },
}

/// Capped exponential backoff with full jitter over the upper half, so a fleet of gateways
/// does not reconnect in lockstep after an upstream restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }
}

fn options(cfg: &UpstreamConfig) -> MqttOptions {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.url.host.clone(), cfg.url.port);
    opts.set_keep_alive(cfg.keepalive);
    opts.set_clean_session(true);
    opts.set_inflight(cfg.inflight);
    opts.set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
    if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
        opts.set_credentials(user.clone(), pass.clone());
    }
    opts
}

fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: is the upstream broker running and is upstream.url right?".to_owned()
        }
        ConnectionError::NetworkTimeout => {
            "no CONNACK within upstream.connect_timeout: the host accepts TCP but does not answer MQTT"
                .to_owned()
        }
        ConnectionError::ConnectionRefused(code) => {
            format!(
                "the upstream refused the connection ({code:?}): check upstream.client_id and credentials"
            )
        }
        other => other.to_string(),
    }
}

/// Runs until `cancel`. Reports to the relay over `events`; when the relay is gone, stops.
pub async fn run(
    cfg: UpstreamConfig,
    events: mpsc::Sender<UplinkEvent>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let counters = metrics.counters();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let connect_timeout_secs = cfg.connect_timeout.as_secs().max(1);
    for generation in 1.. {
        // The request channel never fills: the relay keeps at most `inflight` publishes
        // outstanding, and rumqttc takes requests only while it has inflight slots.
        let (client, mut eventloop) = AsyncClient::new(options(&cfg), usize::from(cfg.inflight) + 16);
        eventloop.network_options.set_connection_timeout(connect_timeout_secs);
        info!(message = "connecting upstream", upstream = %cfg.url, generation);
        let mut connected = false;
        loop {
            let polled = tokio::select! {
                _ = cancel.cancelled() => {
                    if connected {
                        close(&mut eventloop, &client).await;
                    }
                    return;
                }
                polled = eventloop.poll() => polled,
            };
            let report = match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    Metrics::add(&counters.upstream_connects, 1);
                    info!(message = "connected upstream", upstream = %cfg.url, generation);
                    Some(UplinkEvent::Connected { generation, client: client.clone() })
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    Some(UplinkEvent::Published { generation, pkid })
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    Some(UplinkEvent::Acked { generation, pkid: ack.pkid })
                }
                Ok(_) => None,
                Err(error) => {
                    Metrics::add(&counters.upstream_failures, 1);
                    if connected {
                        warn!(message = "upstream connection lost; events are kept in the buffer and resent after reconnecting", upstream = %cfg.url, generation, error = %describe(&error));
                    } else {
                        warn!(message = "cannot connect upstream; events are kept in the buffer", upstream = %cfg.url, generation, error = %describe(&error));
                    }
                    break;
                }
            };
            if let Some(report) = report {
                if events.send(report).await.is_err() {
                    return;
                }
            }
        }
        if connected && events.send(UplinkEvent::Disconnected { generation }).await.is_err() {
            return;
        }
        drop(eventloop);
        let delay = backoff.next_delay();
        info!(message = "reconnecting upstream after backoff", delay = ?delay);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Sends DISCONNECT and gives the event loop a moment to write it.
async fn close(eventloop: &mut rumqttc::EventLoop, client: &AsyncClient) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    info!(message = "upstream connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert!(b.next_delay() >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
