//! One sensor connection: CONNECT policy, publishes in, held acknowledgements out, local
//! deliveries, keepalive, will, takeover.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Packet,
    PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::local::{Mailbox, Message};
use super::{Live, Retained, Shared, Status, lock};
use crate::ack::{AckQueue, Outcome};
use crate::event::escape_topic;
use crate::metrics::Metrics;
use crate::mqtt::codec::{self, Codec};
use crate::mqtt::topic::{self, NameError, invalid_topic};
use crate::mqtt::wire::{self, Version};

/// Headroom over `broker.max_payload` for the topic and properties of one packet.
const HEADER_ROOM: usize = 4096;
/// How long a new connection waits for the connection it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Outgoing QoS 1 deliveries awaiting the client's PUBACK, at most. Beyond it the session's
/// queued deliveries wait (and its queue fills); retained replays go at QoS 0.
const MAX_OUT_INFLIGHT: usize = 1_000;
/// Output buffered while handling one read, before it is written out.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Input read (and kept) while output waits for a client that is slow to read. Beyond it the
/// connection stops reading: TCP slows a client that sends without reading.
const READ_WHILE_WRITING: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT: no will.
    Normal,
    /// MQTT 5 DISCONNECT with reason 0x04: publish the will.
    NormalWithWill,
    Eof,
    Io(std::io::Error),
    Protocol(String),
    /// A packet that breaks MQTT's encoding rules (MQTT 5 reason 0x81, not 0x82).
    Malformed(String),
    Oversize(usize),
    Keepalive,
    Takeover,
    Shutdown,
    /// 3.1.1 only: the buffer refused an event (`reject_new`) and 3.1.1 has no way to say so.
    Rejected,
}

impl End {
    fn publishes_will(&self) -> bool {
        !matches!(self, End::Normal | End::Shutdown)
    }

    fn reason(&self) -> Option<DisconnectReasonCode> {
        Some(match self {
            End::Protocol(_) => DisconnectReasonCode::ProtocolError,
            End::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            End::Oversize(_) => DisconnectReasonCode::PacketTooLarge,
            End::Keepalive => DisconnectReasonCode::KeepAliveTimeout,
            End::Takeover => DisconnectReasonCode::SessionTakenOver,
            End::Shutdown => DisconnectReasonCode::ServerShuttingDown,
            End::Rejected => DisconnectReasonCode::QuotaExceeded,
            _ => return None,
        })
    }
}

/// Keeps the gateway's books when a connection ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    client_id: String,
    serial: u64,
    finished: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = lock(&self.shared.live);
        if live.get(&self.client_id).is_some_and(|l| l.serial == self.serial) {
            live.remove(&self.client_id);
        }
        drop(live);
        let n = self.shared.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        Metrics::set(&self.shared.metrics.gauges().sensors_connected, n as u64);
        self.finished.cancel();
    }
}

struct Io {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    inbuf: BytesMut,
    outbuf: BytesMut,
}

impl Io {
    async fn read_more(&mut self) -> Result<(), End> {
        match self.rd.read_buf(&mut self.inbuf).await {
            Ok(0) => Err(End::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(End::Io(e)),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if !self.outbuf.is_empty() {
            self.wr.write_all(&self.outbuf).await.map_err(End::Io)?;
            self.outbuf.clear();
        }
        Ok(())
    }

    /// Writes all pending output, and meanwhile reads what the client sends (up to
    /// [`READ_WHILE_WRITING`] bytes, kept for later): a live client's PINGREQs still count
    /// while it is slow to read, and a client that sends nothing and reads nothing for its
    /// keepalive is dropped. Before, a half-open subscriber blocked its connection here until
    /// TCP gave up, minutes later.
    async fn flush_reading(
        &mut self,
        mut idle: Pin<&mut tokio::time::Sleep>,
        keepalive: Option<Duration>,
        last_read: &mut Instant,
    ) -> Result<(), End> {
        while !self.outbuf.is_empty() {
            let can_read = self.inbuf.len() < READ_WHILE_WRITING;
            tokio::select! {
                biased;
                // `write` and `read_buf` are cancel-safe: a branch that loses did nothing.
                w = self.wr.write(&self.outbuf) => match w {
                    Ok(0) => return Err(End::Eof),
                    Ok(n) => self.outbuf.advance(n),
                    Err(e) => return Err(End::Io(e)),
                },
                r = self.rd.read_buf(&mut self.inbuf), if can_read => match r {
                    Ok(0) => return Err(End::Eof),
                    Ok(_) => *last_read = Instant::now(),
                    Err(e) => return Err(End::Io(e)),
                },
                () = idle.as_mut(), if keepalive.is_some() => {
                    if let Some(k) = keepalive {
                        if last_read.elapsed() >= k {
                            return Err(End::Keepalive);
                        }
                        idle.as_mut().reset(*last_read + k);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads the CONNECT: picks the codec from its protocol level.
async fn read_connect(io: &mut Io, max: usize) -> Result<(Codec, Version, Packet), End> {
    let version = loop {
        match wire::connect_version(&io.inbuf) {
            Ok(Some(v)) => break v,
            Ok(None) => io.read_more().await?,
            Err(level) => {
                if level > 0 {
                    // 3.1.1's "unacceptable protocol version": understood by 3.1 clients too.
                    io.outbuf.extend_from_slice(&[0x20, 2, 0, 1]);
                    io.flush().await?;
                }
                return Err(End::Protocol(format!(
                    "not an MQTT 3.1.1 or 5 CONNECT (protocol level {level})"
                )));
            }
        }
    };
    let mut codec = Codec::new(version);
    loop {
        match codec.read(&mut io.inbuf, max) {
            Ok(packet) => return Ok((codec, version, packet)),
            Err(protocol::Error::InsufficientBytes(_)) => io.read_more().await?,
            Err(protocol::Error::PayloadSizeLimitExceeded(n)) => return Err(End::Oversize(n)),
            Err(e) => return Err(End::Protocol(format!("malformed CONNECT: {e:?}"))),
        }
    }
}

pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut io = Io { rd, wr, inbuf: BytesMut::with_capacity(4096), outbuf: BytesMut::with_capacity(4096) };
    let max = usize::try_from(shared.cfg.max_payload.as_u64()).unwrap_or(usize::MAX) + HEADER_ROOM;
    let handshake = tokio::time::timeout(shared.cfg.connection_timeout, read_connect(&mut io, max));
    let connect = tokio::select! {
        _ = cancel.cancelled() => return,
        r = handshake => r,
    };
    let (codec, version, packet) = match connect {
        Ok(Ok(parts)) => parts,
        Ok(Err(end)) => {
            debug!(message = "connection closed before CONNECT", %peer, reason = ?end);
            return;
        }
        Err(_) => {
            debug!(message = "no CONNECT within broker.connection_timeout; closing", %peer);
            return;
        }
    };
    let Packet::Connect(connect, props, will, _will_props, login) = packet else {
        debug!(message = "first packet is not CONNECT; closing", %peer);
        return;
    };
    let v5 = version == Version::V5;
    let mut session = Session::new(Arc::clone(&shared), codec, version, io, will);
    session.peer = Some(peer);

    let bad_will = session.will.as_ref().and_then(|w| match std::str::from_utf8(&w.topic) {
        Ok(t) => invalid_topic(t, &shared.cfg.topic_policy()).map(NameError::as_str),
        Err(_) => Some("not UTF-8"),
    });
    let refusal = if let Some(why) = bad_will {
        if !v5 {
            // 3.1.1 has no code for it: the spec says close the connection.
            debug!(message = "CONNECT with an invalid will topic; closing", %peer, reason = why);
            Metrics::add(&shared.metrics.counters().protocol_errors, 1);
            return;
        }
        Some((ConnectReturnCode::TopicNameInvalid, "invalid will topic"))
    } else if !shared.cfg.users.is_empty()
        && login.as_ref().is_none_or(|l| shared.cfg.users.get(&l.username) != Some(&l.password))
    {
        Some((ConnectReturnCode::BadUserNamePassword, "bad username or password"))
    } else if connect.client_id.is_empty() && !connect.clean_session && !v5 {
        Some((ConnectReturnCode::ClientIdentifierNotValid, "an empty client id needs clean session"))
    } else {
        None
    };
    if let Some((code, why)) = refusal {
        session.refuse(code, why, peer).await;
        return;
    }
    if shared.connections.fetch_add(1, Ordering::Relaxed) >= shared.cfg.max_connections.get() {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        // 3.1.1 has no "busy"; its "server unavailable" is the closest code.
        let code = if v5 { ConnectReturnCode::ServerBusy } else { ConnectReturnCode::ServiceUnavailable };
        session.refuse(code, "broker.max_connections reached", peer).await;
        return;
    }
    let assigned = connect.client_id.is_empty();
    let client_id =
        if assigned { format!("outpost-{:016x}", rand::random::<u64>()) } else { connect.client_id.clone() };
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    // One token ends the connection, for shutdown (a child of `cancel`) or takeover (`taken`
    // says which); polling one long-lived future per loop turn instead of two fresh ones
    // measured ~1.5 % of the gateway's CPU.
    let stop = cancel.child_token();
    let taken = Arc::new(AtomicBool::new(false));
    let finished = CancellationToken::new();
    let _registration = Registration {
        shared: Arc::clone(&shared),
        client_id: client_id.clone(),
        serial,
        finished: finished.clone(),
    };
    Metrics::set(
        &shared.metrics.gauges().sensors_connected,
        shared.connections.load(Ordering::Relaxed) as u64,
    );
    let previous = lock(&shared.live)
        .insert(client_id.clone(), Live { serial, stop: stop.clone(), taken: Arc::clone(&taken), finished });
    if let Some(previous) = previous {
        Metrics::add(&shared.metrics.counters().sensor_takeovers, 1);
        previous.taken.store(true, Ordering::Relaxed);
        previous.stop.cancel();
        if tokio::time::timeout(TAKEOVER_WAIT, previous.finished.cancelled()).await.is_err() {
            warn!(message = "the connection being taken over did not finish in time; continuing", %client_id);
        }
    }
    session.client_id = client_id;
    // A session outlives its connection only when asked to: 3.1.1 clean session = false; MQTT 5
    // a session expiry above 0 (absent means 0), whatever clean start says (clean start only
    // discards what was there before). An id Outpost assigned cannot be resumed by anyone, so
    // its session would only leak.
    let expiry = props.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0);
    session.clean = assigned || if v5 { expiry == 0 } else { connect.clean_session };
    let clean_start = connect.clean_session || assigned;
    // MQTT 5: 0xFFFFFFFF means the session never expires.
    let session_expiry =
        if v5 && expiry != u32::MAX { Some(Duration::from_secs(u64::from(expiry))) } else { None };
    session.shared_id = Arc::from(session.client_id.as_str());
    let session_present = session.attach(serial, clean_start, session_expiry);
    let props = v5.then(|| ConnAckProperties {
        max_qos: Some(1),
        retain_available: Some(1),
        max_packet_size: u32::try_from(max).ok(),
        assigned_client_identifier: assigned.then(|| session.client_id.clone()),
        topic_alias_max: Some(0),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(1),
        ..ConnAckProperties::default()
    });
    session.write(Packet::ConnAck(ConnAck { session_present, code: ConnectReturnCode::Success }, props));
    if session.io.flush().await.is_err() {
        session.close(End::Eof).await;
        return;
    }
    Metrics::add(&shared.metrics.counters().sensor_connects, 1);
    debug!(message = "sensor connected", client_id = %session.client_id, %peer, ?version, clean = session.clean);
    let keepalive =
        (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    session.stop = stop;
    session.taken = taken;
    let end = session.run(max, keepalive).await;
    session.close(end).await;
}

/// The state of one accepted connection.
struct Session {
    shared: Arc<Shared>,
    codec: Codec,
    version: Version,
    io: Io,
    client_id: String,
    /// Ends the connection: shutdown (child of the gateway's token) or takeover (`taken`).
    stop: CancellationToken,
    taken: Arc<AtomicBool>,
    /// `client_id`, shared by every event of this connection.
    shared_id: Arc<str>,
    clean: bool,
    will: Option<LastWill>,
    acks: Arc<AckQueue>,
    /// Held acknowledgements: packet id and QoS, in arrival order (matches `acks`).
    held: VecDeque<(u16, u8)>,
    /// QoS 2 packet ids acknowledged with PUBREC or waiting for it, until PUBREL.
    qos2: HashSet<u16>,
    /// The client's address, for log lines about it.
    peer: Option<SocketAddr>,
    /// This connection's serial (its claim on the session, see `local::Local::detach`).
    serial: u64,
    /// The session's delivery queue, once attached.
    mailbox: Option<Arc<Mailbox>>,
    /// Whether anything can arrive in the mailbox (a subscription was made, or a session
    /// resumed). Until then the loop does not wait on it: most sensors only publish, and a
    /// wake-up registration per loop turn is their per-publish cost otherwise.
    listening: bool,
    sys_filters: Vec<String>,
    sys: Option<watch::Receiver<Status>>,
    /// Outgoing QoS 1 deliveries awaiting the client's PUBACK, by packet id, with their send
    /// order (a persistent session gets them again in that order after a reconnect).
    out_inflight: HashMap<u16, (u64, Message)>,
    sent: u64,
    next_pkid: u16,
}

impl Session {
    fn new(shared: Arc<Shared>, codec: Codec, version: Version, io: Io, will: Option<LastWill>) -> Session {
        Session {
            shared,
            codec,
            version,
            io,
            client_id: String::new(),
            stop: CancellationToken::new(),
            taken: Arc::new(AtomicBool::new(false)),
            shared_id: Arc::from(""),
            clean: true,
            will,
            acks: AckQueue::new(),
            held: VecDeque::new(),
            qos2: HashSet::new(),
            peer: None,
            serial: 0,
            mailbox: None,
            listening: false,
            sys_filters: Vec::new(),
            sys: None,
            out_inflight: HashMap::new(),
            sent: 0,
            next_pkid: 0,
        }
    }

    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    fn write(&mut self, packet: Packet) {
        if let Err(error) = self.codec.write(packet, &mut self.io.outbuf) {
            warn!(message = "bug: a packet could not be encoded", ?error, client_id = %self.client_id);
        }
    }

    async fn refuse(&mut self, code: ConnectReturnCode, why: &str, peer: SocketAddr) {
        Metrics::add(&self.shared.metrics.counters().sensor_refused, 1);
        if let Some(folded) = self.shared.log_ready("refused") {
            info!(message = "sensor connection refused", reason = why, %peer, similar_since_last_log = folded);
        }
        self.write(Packet::ConnAck(ConnAck { session_present: false, code }, None));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.flush()).await;
    }

    /// Claims the client id's session (resumed if persistent and present); returns whether a
    /// session was present.
    fn attach(&mut self, serial: u64, clean_start: bool, expiry: Option<Duration>) -> bool {
        self.serial = serial;
        let attached = self.shared.local.attach(&self.shared_id, serial, clean_start, !self.clean, expiry);
        self.mailbox = Some(attached.mailbox);
        self.listening = attached.present;
        attached.present
    }

    /// Writes what the session's queue holds, as far as the QoS 1 window allows, in order.
    fn pull_deliveries(&mut self) {
        let Some(mailbox) = self.mailbox.clone() else { return };
        let mut room = MAX_OUT_INFLIGHT.saturating_sub(self.out_inflight.len());
        let mut taken = Vec::new();
        mailbox.take(
            |m| {
                if m.qos == 0 {
                    return true;
                }
                if room == 0 {
                    return false;
                }
                room -= 1;
                true
            },
            &mut taken,
        );
        for message in taken {
            self.send_message(message);
        }
    }

    async fn run(&mut self, max: usize, keepalive: Option<Duration>) -> End {
        let acks = Arc::clone(&self.acks);
        let stopped = self.stop.clone().cancelled_owned();
        tokio::pin!(stopped);
        let mut last_read = Instant::now();
        // One keepalive timer for the connection, moved only when it fires: re-arming it after
        // every read cost a timer-wheel insert and removal per publish.
        let idle = tokio::time::sleep_until(keepalive.map_or(last_read, |k| last_read + k));
        tokio::pin!(idle);
        loop {
            // Everything complete in the input buffer first.
            while !self.io.inbuf.is_empty() {
                let peek = wire::peek_publish(&self.io.inbuf);
                match self.codec.read(&mut self.io.inbuf, max) {
                    Ok(packet) => {
                        if let Err(end) = self.on_packet(packet, peek).await {
                            return end;
                        }
                        // Many packets in one read (SUBSCRIBEs replaying retained messages)
                        // must not pile up output without bound.
                        if self.io.outbuf.len() > OUT_HIGH_WATER {
                            let flushed = tokio::select! {
                                biased;
                                r = self.io.flush_reading(idle.as_mut(), keepalive, &mut last_read) => r,
                                _ = &mut stopped => Err(self.why_stopped()),
                            };
                            if let Err(end) = flushed {
                                return end;
                            }
                        }
                    }
                    Err(protocol::Error::InsufficientBytes(_)) => break,
                    Err(protocol::Error::PayloadSizeLimitExceeded(n)) => return End::Oversize(n),
                    Err(e) => return End::Malformed(format!("malformed packet: {e:?}")),
                }
            }
            if let Err(end) = self.on_acks_ready() {
                return end;
            }
            // PUBACKs just read may have opened the QoS 1 window.
            self.pull_deliveries();
            // A client that stops reading blocks this write; shutdown, takeover and its keepalive
            // still end it.
            let flushed = tokio::select! {
                biased;
                r = self.io.flush_reading(idle.as_mut(), keepalive, &mut last_read) => r,
                _ = &mut stopped => Err(self.why_stopped()),
            };
            if let Err(end) = flushed {
                return end;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => return self.why_stopped(),
                _ = acks.ready() => {}
                () = ready_opt(self.mailbox.as_deref().filter(|_| self.listening)) => self.pull_deliveries(),
                _ = changed_opt(&mut self.sys) => self.on_status(false, None),
                r = self.io.rd.read_buf(&mut self.io.inbuf) => match r {
                    Ok(0) => return End::Eof,
                    Ok(_) => last_read = Instant::now(),
                    Err(e) => return End::Io(e),
                },
                () = &mut idle, if keepalive.is_some() => {
                    if let Some(k) = keepalive {
                        if last_read.elapsed() >= k {
                            return End::Keepalive;
                        }
                        idle.as_mut().reset(last_read + k);
                    }
                }
            }
        }
    }

    async fn on_packet(&mut self, packet: Packet, peek: Option<(u8, u16)>) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, properties) => self.on_publish(publish, properties, peek).await,
            Packet::PubAck(ack, _) => {
                self.out_inflight.remove(&ack.pkid);
                Ok(())
            }
            Packet::PubRel(rel, _) => {
                let reason = if self.qos2.remove(&rel.pkid) {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.write(Packet::PubComp(PubComp { pkid: rel.pkid, reason }, None));
                Ok(())
            }
            Packet::Subscribe(subscribe, _) => {
                self.on_subscribe(subscribe);
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                self.on_unsubscribe(unsubscribe);
                Ok(())
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                Ok(())
            }
            Packet::Disconnect(d, _) => {
                Err(if self.v5() && d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    End::NormalWithWill
                } else {
                    End::Normal
                })
            }
            Packet::Connect(..) => Err(End::Protocol("a second CONNECT".to_owned())),
            // QoS 2 deliveries are not offered (maximum QoS 1), so PUBREC/PUBCOMP from a client
            // answer nothing of ours.
            _ => Ok(()),
        }
    }

    async fn on_publish(
        &mut self,
        publish: Publish,
        properties: Option<PublishProperties>,
        peek: Option<(u8, u16)>,
    ) -> Result<(), End> {
        let (qos, pkid) = peek.unwrap_or((0, 0));
        if publish.payload.len() as u64 > self.shared.cfg.max_payload.as_u64() {
            return Err(End::Oversize(publish.payload.len()));
        }
        let topic = match std::str::from_utf8(&publish.topic) {
            // U+0000 and invalid UTF-8 break the encoding itself ([MQTT-1.5.4-1/2]).
            Ok(t) if t.contains('\0') => {
                return Err(End::Malformed(format!("publish topic {t:?} contains U+0000")));
            }
            Ok(t) => match invalid_topic(t, &self.shared.cfg.topic_policy()) {
                None => t.to_owned(),
                Some(why) if why.is_protocol_violation() || !self.v5() || qos == 2 => {
                    // MQTT 3.1.1 cannot refuse one publish: close, as mosquitto 2.0.11 does.
                    self.shared.metrics.count_topic_refusal(why);
                    return Err(End::Protocol(format!("publish topic \"{}\": {why}", escape_topic(t))));
                }
                Some(why) => {
                    self.shared.metrics.count_topic_refusal(why);
                    if let Some(folded) = self.shared.log_ready("topic") {
                        warn!(message = "refused a publish whose topic the upstream brokers refuse (MQTT 5 PUBACK 0x90 for QoS 1, QoS 0 discarded); fix the sensor's topic, or raise broker.max_topic_levels/max_topic_length if the upstream accepts it", client_id = %self.client_id, topic = %escape_topic(t), reason = %why, similar_since_last_log = folded);
                    }
                    if qos == 1 && self.held.is_empty() {
                        self.acknowledge(pkid, 1, Outcome::TopicInvalid)?;
                    } else if qos == 1 {
                        self.acks.answered(Outcome::TopicInvalid);
                        self.held.push_back((pkid, 1));
                    }
                    return Ok(());
                }
            },
            Err(_) => return Err(End::Malformed("topic is not UTF-8".to_owned())),
        };
        if qos == 2 && self.v5() {
            return Err(End::Protocol("QoS 2 publish after CONNACK announced maximum QoS 1".to_owned()));
        }
        match &properties {
            Some(p) if p.topic_alias.is_some() => {
                return Err(End::Protocol(
                    "topic alias used; CONNACK announced topic alias maximum 0".to_owned(),
                ));
            }
            // Only a server may send one (MQTT 5, 3.3.4).
            Some(p) if !p.subscription_identifiers.is_empty() => {
                return Err(End::Protocol("subscription identifier in a PUBLISH".to_owned()));
            }
            _ => {}
        }
        if qos == 2 && self.qos2.contains(&pkid) {
            // A resend of a QoS 2 publish already taken: answer again, never take it twice. If
            // its PUBREC is still held, that one answer covers the resend too.
            if !self.held.iter().any(|&(p, q)| p == pkid && q == 2) {
                if self.shared.ack_after_commit() {
                    drop(self.acks.ticket());
                    self.held.push_back((pkid, 2));
                } else {
                    self.acknowledge(pkid, 2, Outcome::Safe)?;
                }
            }
            return Ok(());
        }
        let local_qos = qos.min(1);
        if publish.retain {
            let stored = codec::publish_with(&publish, local_qos, 0, true);
            self.shared
                .retain(&topic, Retained { publish: stored, qos: local_qos, properties: properties.clone() });
        }
        let payload = publish.payload.clone();
        // A full subscriber queue slows this sensor down for a bounded time at most.
        self.shared.local.publish(&topic, &publish, local_qos, properties.as_ref(), true).await;
        let mut event = self.shared.new_event(topic, payload, qos, &self.shared_id);
        if qos > 0 {
            if qos == 2 {
                self.qos2.insert(pkid);
            }
            if self.shared.ack_after_commit() {
                event.ticket = Some(self.acks.ticket());
                self.held.push_back((pkid, qos));
            } else {
                self.acknowledge(pkid, qos, Outcome::Safe)?;
            }
        }
        // A takeover or shutdown must not wait behind a full pipeline: the event not handed
        // over is not acknowledged either (the connection ends before its slot is answered).
        // Biased: the hand-over almost always succeeds at once, and then the stop signal is
        // never polled (registering with it per event cost more than the hand-over).
        tokio::select! {
            biased;
            handed = self.shared.ingest(event) => if handed { Ok(()) } else { Err(End::Shutdown) },
            _ = self.stop.cancelled() => Err(self.why_stopped()),
        }
    }

    fn why_stopped(&self) -> End {
        if self.taken.load(Ordering::Relaxed) { End::Takeover } else { End::Shutdown }
    }

    fn acknowledge(&mut self, pkid: u16, qos: u8, outcome: Outcome) -> Result<(), End> {
        match (outcome, qos) {
            (Outcome::Safe, 1) => {
                self.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None))
            }
            (Outcome::Safe, _) => {
                self.write(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None))
            }
            (Outcome::Rejected, _) if !self.v5() => return Err(End::Rejected),
            (Outcome::Rejected, 1) => {
                self.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::QuotaExceeded }, None));
            }
            (Outcome::Rejected, _) => {
                self.qos2.remove(&pkid);
                self.write(Packet::PubRec(PubRec { pkid, reason: PubRecReason::QuotaExceeded }, None));
            }
            (Outcome::TopicInvalid, _) => {
                self.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::TopicNameInvalid }, None))
            }
        }
        Ok(())
    }

    fn on_acks_ready(&mut self) -> Result<(), End> {
        let mut outcomes = Vec::new();
        self.acks.take_ready(&mut outcomes);
        for outcome in outcomes {
            let Some((pkid, qos)) = self.held.pop_front() else { break };
            self.acknowledge(pkid, qos, outcome)?;
        }
        Ok(())
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) {
        let v5 = self.v5();
        let refused = |quota: bool| match (v5, quota) {
            (false, _) => SubscribeReasonCode::Failure,
            (true, true) => SubscribeReasonCode::QuotaExceeded,
            (true, false) => SubscribeReasonCode::TopicFilterInvalid,
        };
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::new();
        let mut new_sys = Vec::new();
        for filter in subscribe.filters {
            let qos = (filter.qos as u8).min(1);
            if topic::invalid_filter(&filter.path).is_some() {
                codes.push(refused(false));
            } else if filter.path.starts_with("$SYS") {
                if !self.sys_filters.contains(&filter.path) && !new_sys.contains(&filter.path) {
                    if self.sys_filters.len() + new_sys.len() >= super::MAX_FILTERS {
                        codes.push(refused(true));
                        continue;
                    }
                    new_sys.push(filter.path);
                }
                codes.push(SubscribeReasonCode::Success(codec::qos(0)));
            } else {
                match self.shared.local.subscribe(&self.shared_id, &filter.path, qos) {
                    Ok(()) => {
                        self.listening = true;
                        codes.push(SubscribeReasonCode::Success(codec::qos(qos)));
                        granted.push((filter.path, qos));
                    }
                    Err(super::local::SubscribeError::TooMany) => codes.push(refused(true)),
                }
            }
        }
        self.write(Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes: codes }, None));
        // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
        for (filter, qos) in granted.into_iter().filter(|(f, _)| !f.starts_with("$share/")) {
            for (_, retained) in self.shared.retained_for(&filter) {
                let message = Message {
                    qos: retained.qos.min(qos),
                    publish: retained.publish,
                    retain: true,
                    properties: retained.properties,
                    resend: None,
                };
                self.deliver(message);
            }
        }
        if !new_sys.is_empty() {
            if self.sys.is_none() {
                let mut rx = self.shared.status.clone();
                rx.mark_unchanged();
                self.sys = Some(rx);
            }
            for filter in &new_sys {
                self.on_status(true, Some(filter));
            }
            self.sys_filters.extend(new_sys);
        }
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::new();
        for filter in unsubscribe.filters {
            let before = self.sys_filters.len();
            self.sys_filters.retain(|f| f != &filter);
            if self.shared.local.unsubscribe(&self.shared_id, &filter) || before != self.sys_filters.len() {
                reasons.push(UnsubAckReason::Success);
            } else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        self.write(Packet::UnsubAck(UnsubAck { pkid: unsubscribe.pkid, reasons }, None));
    }

    /// Sends the current `$SYS` topics matching one filter (`only`) or all of this session's.
    fn on_status(&mut self, retained: bool, only: Option<&String>) {
        let Some(rx) = self.sys.as_mut() else { return };
        let status = Arc::clone(&rx.borrow_and_update());
        for (topic, payload) in status.iter() {
            let wanted = match only {
                Some(f) => topic::filter_matches(f, topic),
                None => self.sys_filters.iter().any(|f| topic::filter_matches(f, topic)),
            };
            if wanted {
                let publish = Publish::new(Bytes::from(topic.clone()), payload.clone(), retained);
                self.deliver(Message { publish, qos: 0, retain: retained, properties: None, resend: None });
            }
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.out_inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Writes a retained or `$SYS` delivery. A client that never acknowledges cannot exhaust
    /// the packet ids: past the window it gets QoS 0.
    fn deliver(&mut self, mut message: Message) {
        if message.qos > 0 && self.out_inflight.len() >= MAX_OUT_INFLIGHT {
            message.qos = 0;
        }
        self.send_message(message);
    }

    /// Writes one delivery; a QoS 1 one is kept until the client's PUBACK.
    fn send_message(&mut self, message: Message) {
        let (pkid, dup) = match (message.qos, message.resend) {
            (0, _) => (0, false),
            (_, Some(p)) if !self.out_inflight.contains_key(&p) && p != 0 => (p, true),
            _ => (self.alloc_pkid(), false),
        };
        let out = codec::publish_out(&message.publish, message.qos, pkid, message.retain, dup);
        let properties = if self.v5() { message.properties.clone() } else { None };
        self.write(Packet::Publish(out, properties));
        Metrics::add(&self.shared.metrics.counters().local_delivered, 1);
        if message.qos > 0 {
            self.sent += 1;
            self.out_inflight.insert(pkid, (self.sent, Message { resend: Some(pkid), ..message }));
        }
    }

    async fn publish_will(&mut self) {
        let Some(will) = self.will.take() else { return };
        let qos = (will.qos as u8).min(1);
        let Ok(topic) = std::str::from_utf8(&will.topic).map(str::to_owned) else { return };
        let publish = codec::publish_from(will.topic.clone(), will.message.clone(), qos, false);
        if will.retain {
            let stored = codec::publish_with(&publish, qos, 0, true);
            self.shared.retain(&topic, Retained { publish: stored, qos, properties: None });
        }
        self.shared.local.publish(&topic, &publish, qos, None, true).await;
        Metrics::add(&self.shared.metrics.counters().wills_published, 1);
        let event = self.shared.new_event(topic, will.message, qos, &self.shared_id);
        self.shared.ingest(event).await;
    }

    async fn close(&mut self, end: End) {
        let counters = self.shared.metrics.counters();
        match &end {
            End::Oversize(size) => {
                Metrics::add(&counters.oversize_disconnects, 1);
                if let Some(folded) = self.shared.log_ready("oversize") {
                    let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
                    warn!(message = "a sensor sent a packet larger than broker.max_payload and its connection was closed; raise broker.max_payload or fix the sensor", client_id = %self.client_id, %peer, size, similar_since_last_log = folded);
                }
            }
            End::Protocol(why) | End::Malformed(why) => {
                Metrics::add(&counters.protocol_errors, 1);
                if let Some(folded) = self.shared.log_ready("protocol") {
                    let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
                    warn!(message = "a sensor broke the MQTT protocol and its connection was closed; fix the sensor's MQTT client", client_id = %self.client_id, %peer, reason = %why, similar_since_last_log = folded);
                }
            }
            End::Keepalive => Metrics::add(&counters.keepalive_timeouts, 1),
            End::Io(error) => {
                debug!(message = "sensor connection failed", client_id = %self.client_id, %error)
            }
            End::Rejected => {
                if let Some(folded) = self.shared.log_ready("rejected") {
                    warn!(message = "buffer full (overflow = reject_new): closed an MQTT 3.1.1 sensor's connection instead of acknowledging; it resends after reconnecting", client_id = %self.client_id, similar_since_last_log = folded);
                }
            }
            _ => {}
        }
        if self.v5()
            && let Some(reason_code) = end.reason()
        {
            self.write(Packet::Disconnect(Disconnect { reason_code }, None));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.flush()).await;
        let _ = self.io.wr.shutdown().await;
        if end.publishes_will() && !self.client_id.is_empty() {
            self.publish_will().await;
        }
        if let Some(mailbox) = self.mailbox.take() {
            let mut inflight: Vec<(u64, Message)> = self.out_inflight.drain().map(|(_, m)| m).collect();
            inflight.sort_unstable_by_key(|(sent, _)| *sent);
            let inflight = inflight.into_iter().map(|(_, m)| m).collect();
            self.shared.local.detach(&self.shared_id, self.serial, &mailbox, inflight);
        }
        debug!(message = "sensor disconnected", client_id = %self.client_id, reason = ?end);
    }
}

/// Resolves when the session's mailbox may hold deliveries; never without a mailbox.
async fn ready_opt(mailbox: Option<&Mailbox>) {
    match mailbox {
        Some(m) => m.ready().await,
        None => std::future::pending().await,
    }
}

async fn changed_opt(rx: &mut Option<watch::Receiver<Status>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
