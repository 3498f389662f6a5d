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
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{ConnectionError, Event, MqttOptions, Outgoing, Packet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{MqttVersion, UpstreamConfig};
use crate::event::format_event_id;
use crate::metrics::Metrics;

/// What the uplink tells the relay.
#[derive(Debug)]
pub enum UplinkEvent {
    /// CONNACK received; `client` publishes on this generation's connection.
    Connected { generation: u64, client: UplinkClient },
    /// rumqttc wrote the next requested publish with this packet id.
    Published { generation: u64, pkid: u16 },
    /// The upstream answered this packet id. `rejected` holds the MQTT 5 reason when the
    /// upstream refused the message (an MQTT 3.1.1 PUBACK always means accepted).
    Acked { generation: u64, pkid: u16, rejected: Option<String> },
    /// This generation's connection is gone; nothing more will come from it.
    Disconnected { generation: u64 },
}

/// The MQTT 5 user property that carries the stable event id.
pub const EVENT_ID_PROPERTY: &str = "outpost-event-id";

/// Publishes on one generation's connection.
#[derive(Debug, Clone)]
pub enum UplinkClient {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl UplinkClient {
    /// Queues a publish without waiting. With MQTT 5 the event id travels as the
    /// `outpost-event-id` user property.
    pub fn try_publish(&self, topic: String, qos: u8, payload: Vec<u8>, event_id: u64) -> Result<(), String> {
        match self {
            UplinkClient::V311(client) => {
                let qos = if qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
                client.try_publish(topic, qos, false, payload).map_err(|e| e.to_string())
            }
            UplinkClient::V5(client) => {
                use rumqttc::v5::mqttbytes::QoS;
                let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                let properties = PublishProperties {
                    user_properties: vec![(EVENT_ID_PROPERTY.to_owned(), format_event_id(event_id))],
                    ..PublishProperties::default()
                };
                client
                    .try_publish_with_properties(topic, qos, false, payload, properties)
                    .map_err(|e| e.to_string())
            }
        }
    }
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

/// What one poll of either protocol's event loop meant for the relay.
enum Polled {
    ConnAck,
    Published(u16),
    Acked { pkid: u16, rejected: Option<String> },
    Other,
}

/// One connection attempt: a fresh client and event loop of the configured protocol.
enum Session {
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

impl Session {
    fn new(cfg: &UpstreamConfig) -> Session {
        // The request channel never fills: the relay keeps at most `inflight` publishes
        // outstanding, and rumqttc takes requests only while it has inflight slots.
        let capacity = usize::from(cfg.inflight) + 16;
        let connect_timeout_secs = cfg.connect_timeout.as_secs().max(1);
        match cfg.mqtt_version {
            MqttVersion::V311 => {
                let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.url.host.clone(), cfg.url.port);
                opts.set_keep_alive(cfg.keepalive);
                opts.set_clean_session(true);
                opts.set_inflight(cfg.inflight);
                opts.set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
                if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
                    opts.set_credentials(user.clone(), pass.clone());
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, capacity);
                eventloop.network_options.set_connection_timeout(connect_timeout_secs);
                Session::V311(client, Box::new(eventloop))
            }
            MqttVersion::V5 => {
                let mut opts =
                    rumqttc::v5::MqttOptions::new(cfg.client_id.clone(), cfg.url.host.clone(), cfg.url.port);
                opts.set_keep_alive(cfg.keepalive);
                opts.set_clean_start(true);
                opts.set_outgoing_inflight_upper_limit(cfg.inflight);
                opts.set_connection_timeout(connect_timeout_secs);
                if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
                    opts.set_credentials(user.clone(), pass.clone());
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, capacity);
                Session::V5(client, Box::new(eventloop))
            }
        }
    }

    fn client(&self) -> UplinkClient {
        match self {
            Session::V311(client, _) => UplinkClient::V311(client.clone()),
            Session::V5(client, _) => UplinkClient::V5(client.clone()),
        }
    }

    /// The next event, with errors already turned into an operator-readable sentence.
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Session::V311(_, eventloop) => match eventloop.poll().await.map_err(|e| describe(&e))? {
                Event::Incoming(Packet::ConnAck(_)) => Ok(Polled::ConnAck),
                Event::Outgoing(Outgoing::Publish(pkid)) => Ok(Polled::Published(pkid)),
                Event::Incoming(Packet::PubAck(ack)) => Ok(Polled::Acked { pkid: ack.pkid, rejected: None }),
                _ => Ok(Polled::Other),
            },
            Session::V5(_, eventloop) => {
                use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
                match eventloop.poll().await.map_err(|e| describe_v5(&e))? {
                    rumqttc::v5::Event::Incoming(P5::ConnAck(_)) => Ok(Polled::ConnAck),
                    rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid)) => Ok(Polled::Published(pkid)),
                    rumqttc::v5::Event::Incoming(P5::PubAck(ack)) => Ok(Polled::Acked {
                        pkid: ack.pkid,
                        rejected: match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            other => Some(format!("{other:?}")),
                        },
                    }),
                    _ => Ok(Polled::Other),
                }
            }
        }
    }

    /// Sends DISCONNECT and gives the event loop a moment to write it.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            match self {
                Session::V311(client, eventloop) => {
                    let _ = client.try_disconnect();
                    while !matches!(
                        eventloop.poll().await,
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
                    ) {}
                }
                Session::V5(client, eventloop) => {
                    let _ = client.try_disconnect();
                    while !matches!(
                        eventloop.poll().await,
                        Ok(rumqttc::v5::Event::Outgoing(Outgoing::Disconnect)) | Err(_)
                    ) {}
                }
            }
        })
        .await;
        info!(message = "upstream connection closed");
    }
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

fn describe_v5(error: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::ConnectionError as E;
    match error {
        E::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: is the upstream broker running and is upstream.url right?".to_owned()
        }
        E::Timeout(_) => {
            "no CONNACK within upstream.connect_timeout: the host accepts TCP but does not answer MQTT"
                .to_owned()
        }
        E::ConnectionRefused(code) => {
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
    for generation in 1.. {
        let mut session = Session::new(&cfg);
        info!(message = "connecting upstream", upstream = %cfg.url, version = ?cfg.mqtt_version, generation);
        let mut connected = false;
        loop {
            let polled = tokio::select! {
                _ = cancel.cancelled() => {
                    if connected {
                        session.close().await;
                    }
                    return;
                }
                polled = session.poll() => polled,
            };
            let report = match polled {
                Ok(Polled::ConnAck) => {
                    connected = true;
                    backoff.reset();
                    Metrics::add(&counters.upstream_connects, 1);
                    Metrics::set(&metrics.gauges().upstream_connected, 1);
                    info!(message = "connected upstream", upstream = %cfg.url, generation);
                    Some(UplinkEvent::Connected { generation, client: session.client() })
                }
                Ok(Polled::Published(pkid)) => Some(UplinkEvent::Published { generation, pkid }),
                Ok(Polled::Acked { pkid, rejected }) => {
                    Some(UplinkEvent::Acked { generation, pkid, rejected })
                }
                Ok(Polled::Other) => None,
                Err(error) => {
                    Metrics::add(&counters.upstream_failures, 1);
                    if connected {
                        warn!(message = "upstream connection lost; events are kept in the buffer and resent after reconnecting", upstream = %cfg.url, generation, %error);
                    } else {
                        warn!(message = "cannot connect upstream; events are kept in the buffer", upstream = %cfg.url, generation, %error);
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
        Metrics::set(&metrics.gauges().upstream_connected, 0);
        if connected && events.send(UplinkEvent::Disconnected { generation }).await.is_err() {
            return;
        }
        drop(session);
        let delay = backoff.next_delay();
        info!(message = "reconnecting upstream after backoff", delay = ?delay);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
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
