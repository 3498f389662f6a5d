//! The canaries: a well-behaved sensor that publishes QoS 1 with sequence numbers throughout a
//! round, and a subscriber at the upstream broker that must receive every canary the gateway
//! acknowledged. A PUBACK that does not come, or an acknowledged canary that does not arrive
//! upstream, within its bound is a stall.
//!
//! # Invariants
//! - A sequence number counts as acknowledged only once its PUBACK was read, and as relayed
//!   only once the upstream delivered it; [`CanaryState::unrelayed`] is exactly the difference.
//! - The canaries' client ids start with [`super::grammar::RESERVED_ID_PREFIX`], which no
//!   fuzzed session uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::wire::{AckKind, Connect, Packet, Publish, Subscription, Version, encode, read_frame};

/// The topic the canary publishes to (the gateway relays it unchanged by default).
pub const TOPIC: &str = "outpost-fuzz/canary";
const PUBLISHER_ID: &str = "outpost-fuzz-canary-pub";
const SUBSCRIBER_ID: &str = "outpost-fuzz-canary-sub";
/// How long a connect or a CONNACK/SUBACK may take before the canary retries.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between reconnect attempts of a canary whose broker closed it.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// What the canaries saw, shared with the round's monitor.
#[derive(Debug, Default)]
pub struct CanaryState {
    /// Publishes written (a resend after a reconnect counts again).
    pub sent: u64,
    pub acked: u64,
    pub relayed: u64,
    /// The canary written and not yet acknowledged: sequence number and first send time.
    pub outstanding: Option<(u64, Instant)>,
    /// Acknowledged and not yet seen upstream: sequence number → acknowledgement time.
    pub unrelayed: BTreeMap<u64, Instant>,
    /// Send times of the acknowledged canaries that are still unrelayed.
    pub sent_at: BTreeMap<u64, Instant>,
    /// The slowest PUBACK.
    pub max_ack: Duration,
    /// Times the publisher had to reconnect.
    pub reconnects: u64,
    /// Canaries the upstream delivered before their PUBACK was read.
    pub early: std::collections::BTreeSet<u64>,
    /// Canaries the upstream delivered again (at least once allows it).
    pub duplicates: u64,
}

/// The shared [`CanaryState`].
#[derive(Debug, Default, Clone)]
pub struct Canary(Arc<Mutex<CanaryState>>);

impl Canary {
    pub fn state(&self) -> MutexGuard<'_, CanaryState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The payload of canary `seq` in a run tagged `nonce`.
fn payload(nonce: u64, seq: u64) -> Vec<u8> {
    format!("canary {nonce:016x} {seq}").into_bytes()
}

fn parse_payload(nonce: u64, payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix(&format!("canary {nonce:016x} "))?;
    rest.parse().ok()
}

/// Connects, sends CONNECT (clean session, and on MQTT 5 a session that ends with the
/// connection) and waits for a successful CONNACK.
pub(super) async fn connect(addr: SocketAddr, client_id: &str, version: Version) -> Option<TcpStream> {
    let mut stream = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr)).await.ok()?.ok()?;
    let _ = stream.set_nodelay(true);
    let connect = Packet::Connect(Connect {
        version,
        client_id: client_id.to_string(),
        clean: true,
        keep_alive: 0,
        will: None,
        username: None,
        password: None,
        properties: Vec::new(),
    });
    stream.write_all(&encode(&connect, version)).await.ok()?;
    let connack = timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, 1 << 20)).await.ok()?.ok()??;
    (connack.packet_type() == 2 && connack.body.get(1) == Some(&0)).then_some(stream)
}

/// Publishes canaries to the gateway at `addr`, one in flight, one every `interval`, until
/// `cancel`; reconnects and resends when the gateway closes the connection.
pub async fn publish(
    addr: SocketAddr,
    nonce: u64,
    interval: Duration,
    canary: Canary,
    cancel: CancellationToken,
) {
    let mut seq = 1u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'connection: while !cancel.is_cancelled() {
        let connected = tokio::select! {
            stream = connect(addr, PUBLISHER_ID, Version::V311) => stream,
            () = cancel.cancelled() => return,
        };
        let Some(mut stream) = connected else {
            canary.state().reconnects += 1;
            tokio::select! {
                () = tokio::time::sleep(RECONNECT_PAUSE) => continue,
                () = cancel.cancelled() => return,
            }
        };
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = cancel.cancelled() => return,
            }
            let publish = Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: TOPIC.to_string(),
                pkid: (seq % u64::from(u16::MAX)) as u16 + 1,
                payload: payload(nonce, seq),
                properties: Vec::new(),
            });
            {
                let mut state = canary.state();
                state.sent += 1;
                if state.outstanding.is_none() {
                    state.outstanding = Some((seq, Instant::now()));
                }
            }
            if stream.write_all(&encode(&publish, Version::V311)).await.is_err() {
                canary.state().reconnects += 1;
                continue 'connection;
            }
            loop {
                let frame = tokio::select! {
                    frame = read_frame(&mut stream, 1 << 20) => frame,
                    () = cancel.cancelled() => return,
                };
                match frame {
                    Ok(Some(frame)) if frame.packet_type() == 4 => break,
                    Ok(Some(_)) => {}
                    _ => {
                        canary.state().reconnects += 1;
                        continue 'connection;
                    }
                }
            }
            let mut state = canary.state();
            if let Some((acked, sent_at)) = state.outstanding.take() {
                state.acked += 1;
                state.max_ack = state.max_ack.max(sent_at.elapsed());
                if state.early.remove(&acked) {
                    state.relayed += 1;
                } else {
                    state.unrelayed.insert(acked, Instant::now());
                    state.sent_at.insert(acked, sent_at);
                }
            }
            seq += 1;
        }
    }
}

/// A subscriber to the canary topic at the upstream broker.
#[derive(Debug)]
pub struct Subscriber {
    stream: TcpStream,
}

impl Subscriber {
    /// Connects to the upstream at `addr` and subscribes at QoS 1; returns after the SUBACK, so
    /// nothing published afterwards is missed.
    pub async fn subscribe(addr: SocketAddr) -> anyhow::Result<Subscriber> {
        let mut stream = connect(addr, SUBSCRIBER_ID, Version::V311).await.ok_or_else(|| {
            anyhow::anyhow!("the canary subscriber cannot connect to the upstream at {addr}")
        })?;
        let subscribe = Packet::Subscribe {
            pkid: 1,
            subscriptions: vec![Subscription { filter: TOPIC.to_string(), options: 1 }],
            properties: Vec::new(),
        };
        stream.write_all(&encode(&subscribe, Version::V311)).await?;
        loop {
            let frame = timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, 1 << 20))
                .await
                .map_err(|_| anyhow::anyhow!("no SUBACK from the upstream at {addr}"))??
                .ok_or_else(|| anyhow::anyhow!("the upstream at {addr} closed the canary subscriber"))?;
            if frame.packet_type() == 9 {
                return Ok(Subscriber { stream });
            }
        }
    }

    /// Records every canary of run `nonce` that arrives, until `cancel` or the upstream closes.
    pub async fn record(mut self, nonce: u64, canary: Canary, cancel: CancellationToken) {
        loop {
            let frame = tokio::select! {
                frame = read_frame(&mut self.stream, 1 << 20) => frame,
                () = cancel.cancelled() => return,
            };
            let Ok(Some(frame)) = frame else { return };
            if frame.packet_type() != 3 {
                continue;
            }
            if let Some((1, pkid)) = frame.publish_qos_pkid() {
                let puback = Packet::Ack { kind: AckKind::PubAck, pkid, reason: 0 };
                if self.stream.write_all(&encode(&puback, Version::V311)).await.is_err() {
                    return;
                }
            }
            let Some(seq) =
                frame.publish_topic_payload(false).and_then(|(_, body)| parse_payload(nonce, body))
            else {
                continue;
            };
            let mut state = canary.state();
            if state.unrelayed.remove(&seq).is_some() {
                state.sent_at.remove(&seq);
                state.relayed += 1;
            } else if state.outstanding.is_some_and(|(outstanding, _)| outstanding == seq) {
                state.early.insert(seq);
            } else {
                state.duplicates += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_only_for_their_run() {
        assert_eq!(parse_payload(7, &payload(7, 42)), Some(42));
        assert_eq!(parse_payload(8, &payload(7, 42)), None);
        assert_eq!(parse_payload(7, b"canary"), None);
    }
}
