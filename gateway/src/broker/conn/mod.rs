//! One sensor connection: one task that owns the socket and both sides of the session.
//!
//! Split by job: [`handshake`] (CONNECT to CONNACK), [`publish_in`] (the publishing side,
//! `Inbound`: publishes in, held acknowledgements out, the will) and [`deliver_out`] (the
//! subscribing side, `Outbound`: subscriptions, deliveries out). This file holds the loop that
//! drives them, keepalive, the publish rate limit (`rate`), and how a connection ends
//! ([`End`], `Connection::close`).
//!
//! # Invariants
//! - Nothing of a connection is shared but its `AckQueue` (with the tickets of its events)
//!   and its session's `Mailbox` (with publishers); the sides touch the broker's shared state
//!   only through its parts' methods.
//! - Input is decoded completely before the loop waits again; output from one read is
//!   written before the next wait, and while it is written the client is still read (up to a
//!   bound) so its keepalive counts.
//! - Shutdown, takeover and keepalive end a connection wherever it waits: on its socket, on a
//!   full pipeline, on a slow reader.

mod deliver_out;
mod events;
mod handshake;
mod io;
mod publish_in;
mod rate;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::{self, Disconnect, DisconnectReasonCode, Packet, PingResp, PubRecReason};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::deliver_out::Outbound;
use self::io::Io;
pub(super) use self::io::Stream;
use self::publish_in::Inbound;
pub(super) use self::publish_in::publish_will;
use self::rate::RateLimit;
use super::Shared;
use super::live::{Registration, Stopped};
use crate::metrics::Metrics;
use crate::mqtt::wire;

/// Output buffered while handling one read, before it is written out.
const OUT_HIGH_WATER: usize = 64 * 1024;

/// Keepalive checks fall on this grid.
const KEEPALIVE_GRID: Duration = Duration::from_secs(1);

/// When to check a keepalive due at `due`: `due` rounded up to the next whole
/// [`KEEPALIVE_GRID`] step. A connection's timer fires every 1.5 × keepalive even when the
/// client is live (it then moves on), so 1,000 idle sensors at keepalive 60 s fired 11 timers a
/// second, each a wake-up of its own; on a shared grid the timers due in one step fire in one
/// turn of the runtime. A dead client is dropped at most one step later.
fn keepalive_check(due: Instant) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let since = due.saturating_duration_since(origin);
    let step = KEEPALIVE_GRID.as_nanos();
    let steps = since.as_nanos().div_ceil(step);
    // u64 nanoseconds last 584 years: the conversion cannot fail for a running process.
    origin + Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT: no will. With the session expiry an MQTT 5 DISCONNECT sets.
    Normal(Option<u32>),
    /// MQTT 5 DISCONNECT with reason 0x04: publish the will.
    NormalWithWill(Option<u32>),
    Eof,
    Io(std::io::Error),
    Protocol(String),
    /// A packet that breaks MQTT's encoding rules (MQTT 5 reason 0x81, not 0x82).
    Malformed(String),
    Oversize(usize),
    Keepalive,
    /// An MQTT 5 client sent more unanswered QoS 1/2 publishes than CONNACK's receive maximum.
    ReceiveMaximum,
    Takeover,
    Shutdown,
    /// 3.1.1 only: the buffer refused an event (`reject_new`) and 3.1.1 has no way to say so.
    Rejected,
}

impl End {
    fn publishes_will(&self) -> bool {
        !matches!(self, End::Normal(_) | End::Shutdown)
    }

    /// The session expiry the client's DISCONNECT set, if it did.
    fn session_expiry(&self) -> Option<u32> {
        match self {
            End::Normal(expiry) | End::NormalWithWill(expiry) => *expiry,
            _ => None,
        }
    }

    fn reason(&self) -> Option<DisconnectReasonCode> {
        Some(match self {
            End::Protocol(_) => DisconnectReasonCode::ProtocolError,
            End::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            End::Oversize(_) => DisconnectReasonCode::PacketTooLarge,
            End::Keepalive => DisconnectReasonCode::KeepAliveTimeout,
            End::ReceiveMaximum => DisconnectReasonCode::ReceiveMaximumExceeded,
            End::Takeover => DisconnectReasonCode::SessionTakenOver,
            End::Shutdown => DisconnectReasonCode::ServerShuttingDown,
            End::Rejected => DisconnectReasonCode::QuotaExceeded,
            _ => return None,
        })
    }
}

/// Where an accepted socket comes from, for the handshake.
pub(super) struct Accepted {
    pub(super) peer: SocketAddr,
    /// `broker.connection_timeout` after the TCP accept: the CONNECT must have arrived by then
    /// (a TLS handshake counts against it too).
    pub(super) deadline: Instant,
    /// The username a verified client certificate names (`use_identity_as_username`).
    pub(super) identity: Option<Arc<str>>,
}

/// Serves one accepted socket until the connection ends.
pub(super) async fn serve(
    stream: Stream,
    accepted: Accepted,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // The handshake and the close run once; boxed, their futures (7 and 5 KiB) are not part
    // of the task every idle connection keeps for its lifetime.
    let Some(mut connection) = Box::pin(handshake::connect(stream, accepted, shared, &cancel)).await else {
        return;
    };
    let end = connection.run().await;
    Box::pin(connection.close(end)).await;
}

/// Who is connected, for both sides: the broker's parts and the client's identity.
struct Client {
    shared: Arc<Shared>,
    /// The client id, shared by every event of this connection.
    id: Arc<str>,
    /// The client's address, for log lines about it.
    peer: SocketAddr,
    /// Its IP address as text, shared by every event of this connection (rules' `peerhost`).
    peerhost: Arc<str>,
    /// The claim on the client id; dropped last, when the connection has finished.
    registration: Registration,
    /// What its client events (`$events/...`) say about it.
    about: events::About,
}

impl Client {
    fn why_stopped(&self) -> End {
        if self.registration.stop().taken_over() { End::Takeover } else { End::Shutdown }
    }
}

/// A connection past its CONNACK.
struct Connection {
    io: Io,
    inbound: Inbound,
    outbound: Outbound,
    client: Client,
    /// The largest packet accepted (`broker.max_payload` plus headroom).
    max: usize,
    /// 1.5 × the client's keepalive: silence this long ends the connection.
    keepalive: Option<Duration>,
    /// `broker.max_publish_rate` / `max_publish_bytes_rate`; `None` without either.
    rate: Option<RateLimit>,
    /// MQTT 5: the CONNECT asked for session expiry 0, so a DISCONNECT may not raise it.
    expiry_zero: bool,
}

impl Connection {
    async fn run(&mut self) -> End {
        let acks = self.inbound.acks();
        let stop = self.client.registration.stop().clone();
        let mut stopped = stop.stopped();
        let keepalive = self.keepalive;
        let mut last_read = Instant::now();
        // One keepalive timer for the connection, moved only when it fires: re-arming it after
        // every read cost a timer-wheel insert and removal per publish.
        let idle = tokio::time::sleep_until(keepalive.map_or(last_read, |k| keepalive_check(last_read + k)));
        tokio::pin!(idle);
        // While the rate limit pauses reading: when it ends.
        let pause = tokio::time::sleep_until(last_read);
        tokio::pin!(pause);
        let mut paused_until = None;
        loop {
            // Everything complete in the input buffer first, unless the rate limit says wait:
            // then what was read stays in the buffer, so a burst read at once costs no more
            // than the limit allows.
            while !self.io.inbuf.is_empty()
                && self.rate.as_ref().is_none_or(|r| r.paused_until(Instant::now()).is_none())
            {
                let peek = wire::peek_publish(&self.io.inbuf)
                    .map(|(qos, pkid)| (qos, pkid, wire::publish_dup(&self.io.inbuf)));
                match self.io.decode(self.max) {
                    Ok(packet) => {
                        if let Err(end) = self.on_packet(packet, peek).await {
                            return end;
                        }
                        // Many packets in one read (SUBSCRIBEs replaying retained messages)
                        // must not pile up output without bound.
                        if self.io.outbuf.len() > OUT_HIGH_WATER
                            && let Err(end) = self.flush(idle.as_mut(), &mut last_read, &mut stopped).await
                        {
                            return end;
                        }
                    }
                    Err(protocol::Error::InsufficientBytes(_)) => break,
                    Err(protocol::Error::PayloadSizeLimitExceeded(n)) => return End::Oversize(n),
                    Err(e) => return End::Malformed(format!("malformed packet: {e:?}")),
                }
            }
            if let Err(end) = self.inbound.on_acks_ready(&mut self.io) {
                return end;
            }
            // PUBACKs just read may have opened the QoS 1 window.
            self.outbound.pull(&mut self.io, &self.client.shared);
            if let Err(end) = self.flush(idle.as_mut(), &mut last_read, &mut stopped).await {
                return end;
            }
            let until = self.rate.as_ref().and_then(|r| r.paused_until(Instant::now()));
            if until.is_some() && until != paused_until {
                Metrics::add(&self.client.shared.metrics.counters().publish_rate_limited, 1);
            }
            if let Some(until) = until {
                pause.as_mut().reset(until);
                // Silence the limit imposes is not the client's: its keepalive waits.
                last_read = last_read.max(until);
            }
            paused_until = until;
            let paused = until.is_some();
            self.io.release_idle();
            tokio::select! {
                biased;
                _ = &mut stopped => return self.client.why_stopped(),
                _ = acks.ready() => {}
                () = self.outbound.queue.ready() => self.outbound.pull(&mut self.io, &self.client.shared),
                () = self.outbound.sys.changed() => self.outbound.on_status(&mut self.io, &self.client.shared),
                r = self.io.read_more(), if !paused => match r {
                    Ok(()) => last_read = Instant::now(),
                    Err(end) => return end,
                },
                () = &mut pause, if paused => {}
                () = &mut idle, if keepalive.is_some() => {
                    if let Some(k) = keepalive {
                        if last_read.elapsed() >= k {
                            return End::Keepalive;
                        }
                        idle.as_mut().reset(keepalive_check(last_read + k));
                    }
                }
            }
        }
    }

    /// Writes the pending output. A client that stops reading blocks this write; shutdown,
    /// takeover and its keepalive still end it.
    async fn flush(
        &mut self,
        idle: Pin<&mut Sleep>,
        last_read: &mut Instant,
        stopped: &mut Stopped<'_>,
    ) -> Result<(), End> {
        tokio::select! {
            biased;
            r = self.io.flush_reading(idle, self.keepalive, last_read) => r,
            _ = stopped => Err(self.client.why_stopped()),
        }
    }

    async fn on_packet(&mut self, packet: Packet, peek: Option<(u8, u16, bool)>) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, properties) => {
                if let Some(rate) = &mut self.rate {
                    rate.charge(publish.topic.len() + publish.payload.len(), Instant::now());
                }
                // Boxed: the publish path's future (fan-out, hand-over) is ~2 KiB, and inline
                // it would be part of every connection's task for its whole life, idle or
                // not. One short-lived allocation per publish costs far less than that memory
                // on a fleet of mostly idle sensors.
                Box::pin(self.inbound.on_publish(&mut self.io, &self.client, publish, properties, peek)).await
            }
            Packet::PubAck(ack, _) => {
                self.outbound.on_complete(&self.client.shared, ack.pkid);
                Ok(())
            }
            Packet::PubRec(rec, _) => {
                let failed =
                    !matches!(rec.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers);
                self.outbound.on_pubrec(&mut self.io, &self.client.shared, rec.pkid, failed);
                Ok(())
            }
            Packet::PubComp(comp, _) => {
                self.outbound.on_complete(&self.client.shared, comp.pkid);
                Ok(())
            }
            Packet::PubRel(rel, _) => self.inbound.on_pubrel(&mut self.io, &self.client, rel.pkid).await,
            // Boxed like the publish path: a (un)subscribe is rare, and its future (which waits
            // for a persistent session's write) would otherwise be part of every task.
            Packet::Subscribe(subscribe, properties) => {
                Box::pin(self.outbound.on_subscribe(&mut self.io, &self.client, subscribe, properties)).await
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                Box::pin(self.outbound.on_unsubscribe(&mut self.io, &self.client, unsubscribe)).await;
                Ok(())
            }
            Packet::PingReq(_) => {
                self.io.write(Packet::PingResp(PingResp));
                Ok(())
            }
            Packet::Disconnect(d, properties) => {
                let expiry = properties.and_then(|p| p.session_expiry_interval);
                if self.expiry_zero && expiry.is_some_and(|e| e > 0) {
                    return Err(End::Protocol(
                        "DISCONNECT sets a session expiry after CONNECT asked for 0".to_owned(),
                    ));
                }
                Err(if self.io.v5() && d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    End::NormalWithWill(expiry)
                } else {
                    End::Normal(expiry)
                })
            }
            Packet::Connect(..) => Err(End::Protocol("a second CONNECT".to_owned())),
            _ => Ok(()),
        }
    }

    /// Ends the connection: counts and logs why, tells an MQTT 5 client why, publishes the will
    /// if it is due, and hands the session back. The registration goes last, with `self`.
    async fn close(mut self, end: End) {
        self.count_end(&end);
        events::disconnected(&self.client, &end);
        if self.io.v5()
            && let Some(reason_code) = end.reason()
        {
            self.io.write(Packet::Disconnect(Disconnect { reason_code }, None));
        }
        self.io.shut_down(Duration::from_secs(1)).await;
        if self.io.v5()
            && end.reason().is_some()
            && !matches!(end, End::Shutdown | End::Takeover | End::Keepalive)
        {
            // A takeover of the id (the client reconnecting at once) or shutdown cuts it short.
            let stop = self.client.registration.stop().clone();
            tokio::select! {
                () = self.io.linger(Duration::from_secs(1)) => {}
                () = stop.stopped() => {}
            }
        }
        let will = if end.publishes_will() { self.inbound.take_will(&self.client) } else { None };
        // A will without a delay goes before the session is handed back, as before; a delayed
        // one waits in the session (`Local::detach`), which hands back what is due now.
        let (now, delayed) = match will {
            Some((delay, will)) if delay.is_zero() => (Some(will), None),
            other => (None, other),
        };
        if let Some(will) = now {
            publish_will(&self.client.shared, will).await;
        }
        for will in self.outbound.detach(&self.client, end.session_expiry(), delayed) {
            publish_will(&self.client.shared, will).await;
        }
        debug!(message = "sensor disconnected", client_id = %self.client.id, reason = ?end);
    }

    fn count_end(&self, end: &End) {
        let shared = &self.client.shared;
        let counters = shared.metrics.counters();
        let client_id = &self.client.id;
        let peer = self.client.peer;
        match end {
            End::Oversize(size) => {
                Metrics::add(&counters.oversize_disconnects, 1);
                if let Some(folded) = shared.logs.ready("oversize") {
                    warn!(message = "a sensor sent a packet larger than broker.max_payload and its connection was closed; raise broker.max_payload or fix the sensor", %client_id, %peer, size, similar_since_last_log = folded);
                }
            }
            End::ReceiveMaximum => {
                Metrics::add(&counters.protocol_errors, 1);
                if let Some(folded) = shared.logs.ready("protocol") {
                    warn!(message = "an MQTT 5 sensor sent more unacknowledged QoS 1/2 publishes than the receive maximum Outpost announced, and its connection was closed (0x93); fix the sensor's MQTT client to honour CONNACK's receive maximum", %client_id, %peer, similar_since_last_log = folded);
                }
            }
            End::Protocol(why) | End::Malformed(why) => {
                Metrics::add(&counters.protocol_errors, 1);
                if let Some(folded) = shared.logs.ready("protocol") {
                    warn!(message = "a sensor broke the MQTT protocol and its connection was closed; fix the sensor's MQTT client", %client_id, %peer, reason = %why, similar_since_last_log = folded);
                }
            }
            End::Keepalive => Metrics::add(&counters.keepalive_timeouts, 1),
            End::Io(error) => debug!(message = "sensor connection failed", %client_id, %error),
            End::Rejected => {
                if let Some(folded) = shared.logs.ready("rejected") {
                    warn!(message = "buffer full (overflow = reject_new): closed an MQTT 3.1.1 sensor's connection instead of acknowledging; it resends after reconnecting", %client_id, similar_since_last_log = folded);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_checks_fall_on_a_shared_grid_never_early() {
        let now = Instant::now();
        let dues: Vec<Instant> = (0..50).map(|i| now + Duration::from_millis(90_000 + i * 37)).collect();
        let checks: Vec<Instant> = dues.iter().map(|&due| keepalive_check(due)).collect();
        for (due, check) in dues.iter().zip(&checks) {
            assert!(*check >= *due && *check - *due < KEEPALIVE_GRID, "{due:?} -> {check:?}");
        }
        // 50 dues over 1.8 s land on at most three steps: the timers fire together.
        let mut distinct = checks.clone();
        distinct.dedup();
        assert!(distinct.len() <= 3, "{} steps", distinct.len());
        assert!(distinct.windows(2).all(|w| w[1] - w[0] == KEEPALIVE_GRID));
    }
}
