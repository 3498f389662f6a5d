//! One sensor connection: CONNECT policy, publishes in, held acknowledgements out, local
//! deliveries, keepalive, will, takeover.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::Forward;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill,
    Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
    PublishProperties, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::{AckQueue, Outcome};
use super::codec::{self, Codec, Version};
use super::{Live, Retained, Shared, Status, lock};
use crate::event::{TopicError, escape_topic, invalid_topic};
use crate::metrics::Metrics;

/// User property that marks a QoS 0 publish on its way through the router: rumqttd delivers
/// at the subscription's QoS, MQTT says min(publish, subscription). Stripped on delivery.
const QOS0_TAG: &str = "$outpost-qos0";
/// Headroom over `broker.max_payload` for the topic and properties of one packet.
const HEADER_ROOM: usize = 4096;
/// How long a new connection waits for the connection it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Deliveries queued from the router for one connection.
const DELIVERY_QUEUE: usize = 256;
/// Outgoing QoS 1 deliveries awaiting the client's PUBACK, at most; beyond it deliveries go
/// at QoS 0. The router itself keeps 100 in flight per link; the rest is retained replays.
const MAX_OUT_INFLIGHT: usize = 1_000;
/// Output buffered while handling one read, before it is written out.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Input read (and kept) while output waits for a client that is slow to read. Beyond it the
/// connection stops reading: TCP slows a client that sends without reading.
const READ_WHILE_WRITING: usize = 64 * 1024;
/// Topic filters one client may hold.
const MAX_FILTERS: usize = 1_000;

/// A publish for the router with its QoS 0 origin marked.
pub(super) fn tag_qos0(publish: Publish, properties: Option<PublishProperties>) -> Packet {
    let mut properties = properties.unwrap_or_default();
    properties.user_properties.push((QOS0_TAG.to_owned(), String::new()));
    Packet::Publish(publish, Some(properties))
}

/// Removes the QoS 0 mark; returns whether it was there.
fn untag(properties: Option<PublishProperties>) -> (Option<PublishProperties>, bool) {
    let Some(mut p) = properties else { return (None, false) };
    match p.user_properties.iter().rposition(|(k, _)| k == QOS0_TAG) {
        Some(i) => {
            p.user_properties.remove(i);
            let p = if p == PublishProperties::default() { None } else { Some(p) };
            (p, true)
        }
        None => (Some(p), false),
    }
}

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

/// A delivery from the router to this connection.
enum Delivery {
    Forward(Box<Forward>),
    Disconnected,
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
        match codec::connect_version(&io.inbuf) {
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

    let bad_will = session.will.as_ref().and_then(|w| match std::str::from_utf8(&w.topic) {
        Ok(t) => invalid_topic(t, &shared.cfg.topic_policy()).map(TopicError::as_str),
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
    // clean start = false *and* a session expiry above 0 (absent means 0). An id Outpost
    // assigned cannot be resumed by anyone, so its session would only leak.
    let expiry = props.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0);
    session.clean = connect.clean_session || assigned || (v5 && expiry == 0);
    let session_present = match session.restore().await {
        Ok(present) => present,
        Err(why) => {
            let code =
                if v5 { ConnectReturnCode::ServerUnavailable } else { ConnectReturnCode::ServiceUnavailable };
            session.refuse(code, &why, peer).await;
            return;
        }
    };
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
    session.shared_id = Arc::from(session.client_id.as_str());
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
    /// The router link, once this client subscribes (or resumes a persistent session).
    link: Option<LinkTx>,
    link_stop: CancellationToken,
    deliveries: Option<mpsc::Receiver<Delivery>>,
    /// Router filters this session holds (counted in the shared index).
    filters: HashSet<String>,
    sys_filters: Vec<String>,
    sys: Option<watch::Receiver<Status>>,
    /// Outgoing QoS 1 deliveries by our packet id → the router's packet id, if it has one.
    out_inflight: HashMap<u16, Option<u16>>,
    next_pkid: u16,
    /// Router packet ids in delivery order, and whether each may be acknowledged to the
    /// router yet (rumqttd requires its acks in order).
    router_acks: VecDeque<(u16, bool)>,
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
            link: None,
            link_stop: CancellationToken::new(),
            deliveries: None,
            filters: HashSet::new(),
            sys_filters: Vec::new(),
            sys: None,
            out_inflight: HashMap::new(),
            next_pkid: 0,
            router_acks: VecDeque::new(),
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

    /// Takes over a persistent session's filters (or drops a clean session's). Returns
    /// whether a session was present.
    async fn restore(&mut self) -> Result<bool, String> {
        let previous = lock(&self.shared.offline).remove(&self.client_id);
        if self.clean {
            if let Some(filters) = previous {
                for filter in filters {
                    self.shared.subs.remove(&filter);
                }
                // The router still holds the old session; a clean link for the id clears it.
                self.open_link().await?;
            }
            return Ok(false);
        }
        let present = previous.is_some();
        self.filters = previous.unwrap_or_default();
        // A persistent session needs its router link now: the router queued deliveries for it.
        self.open_link().await?;
        Ok(present)
    }

    async fn open_link(&mut self) -> Result<(), String> {
        if self.link.is_some() {
            return Ok(());
        }
        let (tx, rx, _) = self.shared.link(&self.client_id, self.clean).await?;
        let (dtx, drx) = mpsc::channel(DELIVERY_QUEUE);
        tokio::spawn(pump(rx, dtx, self.link_stop.clone()));
        self.link = Some(tx);
        self.deliveries = Some(drx);
        Ok(())
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
                let peek = codec::peek_publish(&self.io.inbuf);
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
                d = recv_opt(&mut self.deliveries) => match d {
                    Some(Delivery::Forward(f)) => {
                        self.on_forward(*f);
                        // Deliveries downgraded to QoS 0 are due to the router now.
                        self.release_router_acks().await;
                    }
                    Some(Delivery::Disconnected) | None => {
                        return End::Protocol("the local broker closed this client's link".to_owned());
                    }
                },
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
                self.on_client_ack(ack.pkid).await;
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
            Packet::Subscribe(subscribe, _) => self.on_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe, _) => {
                self.on_unsubscribe(unsubscribe).await;
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
                    why.count(&self.shared.metrics);
                    return Err(End::Protocol(format!("publish topic \"{}\": {why}", escape_topic(t))));
                }
                Some(why) => {
                    why.count(&self.shared.metrics);
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
        let properties = match properties {
            // rumqttd's router disconnects the link that carries either of these, and that is
            // the one internal link every local delivery goes through.
            Some(p) if p.topic_alias.is_some() => {
                return Err(End::Protocol(
                    "topic alias used; CONNACK announced topic alias maximum 0".to_owned(),
                ));
            }
            Some(p) if !p.subscription_identifiers.is_empty() => {
                return Err(End::Protocol("subscription identifier in a PUBLISH".to_owned()));
            }
            // Nobody else may mark a publish as QoS 0 for the delivery side.
            Some(mut p) => {
                p.user_properties.retain(|(k, _)| k != QOS0_TAG);
                Some(p)
            }
            None => None,
        };
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
        self.shared
            .fan_out(&topic, || match qos {
                0 => tag_qos0(codec::publish_with(&publish, 0, 0, false), properties),
                _ => Packet::Publish(codec::publish_with(&publish, 1, pkid.max(1), false), properties),
            })
            .await;
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

    async fn on_subscribe(&mut self, subscribe: Subscribe) -> Result<(), End> {
        let v5 = self.v5();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut router = Vec::new();
        let mut granted = Vec::new();
        let mut new_sys = Vec::new();
        for filter in subscribe.filters {
            let qos = (filter.qos as u8).min(1);
            if !protocol::valid_filter(&filter.path) {
                codes.push(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                });
            } else if self.filters.len() + self.sys_filters.len() + router.len() >= MAX_FILTERS
                && !self.filters.contains(&filter.path)
            {
                codes.push(if v5 {
                    SubscribeReasonCode::QuotaExceeded
                } else {
                    SubscribeReasonCode::Failure
                });
            } else if filter.path.starts_with("$SYS") {
                codes.push(SubscribeReasonCode::Success(codec::qos(0)));
                if !self.sys_filters.contains(&filter.path) {
                    new_sys.push(filter.path);
                }
            } else if filter.path.starts_with('$') && !filter.path.starts_with("$share/") {
                // Nothing publishes there; rumqttd would drop the connection for it.
                codes.push(SubscribeReasonCode::Success(codec::qos(qos)));
            } else {
                codes.push(SubscribeReasonCode::Success(codec::qos(qos)));
                granted.push((filter.path.clone(), qos));
                router.push(Filter { qos: codec::qos(qos), ..filter });
            }
        }
        if !router.is_empty() {
            if let Err(why) = self.open_link().await {
                warn!(message = "cannot open a local broker link for a subscriber; closing it", %why, client_id = %self.client_id);
                return Err(End::Protocol(why));
            }
            for f in &router {
                if self.filters.insert(f.path.clone()) {
                    self.shared.subs.add(&f.path);
                }
            }
            if let Some(link) = self.link.as_mut() {
                let packet = Packet::Subscribe(Subscribe { pkid: subscribe.pkid, filters: router }, None);
                if let Err(e) = link.send(packet).await {
                    return Err(End::Protocol(format!("local broker link: {e}")));
                }
            }
        }
        self.write(Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes: codes }, None));
        // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
        for (filter, qos) in granted.into_iter().filter(|(f, _)| !f.starts_with("$share/")) {
            for (_, retained) in self.shared.retained_for(&filter) {
                self.deliver(&retained.publish, retained.qos.min(qos), true, retained.properties, None);
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
        Ok(())
    }

    async fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut router = Vec::new();
        let mut reasons = Vec::new();
        for filter in unsubscribe.filters {
            let before = self.sys_filters.len();
            self.sys_filters.retain(|f| f != &filter);
            if self.filters.remove(&filter) {
                self.shared.subs.remove(&filter);
                router.push(filter);
                reasons.push(UnsubAckReason::Success);
            } else if before != self.sys_filters.len() {
                reasons.push(UnsubAckReason::Success);
            } else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        if !router.is_empty()
            && let Some(link) = self.link.as_mut()
        {
            let _ = link
                .send(Packet::Unsubscribe(Unsubscribe { pkid: unsubscribe.pkid, filters: router }, None))
                .await;
        }
        self.write(Packet::UnsubAck(UnsubAck { pkid: unsubscribe.pkid, reasons }, None));
    }

    /// Sends the current `$SYS` topics matching one filter (`only`) or all of this session's.
    fn on_status(&mut self, retained: bool, only: Option<&String>) {
        let Some(rx) = self.sys.as_mut() else { return };
        let status = Arc::clone(&rx.borrow_and_update());
        for (topic, payload) in status.iter() {
            let wanted = match only {
                Some(f) => super::topic_matches(topic, f),
                None => self.sys_filters.iter().any(|f| super::topic_matches(topic, f)),
            };
            if wanted {
                let publish = Publish::new(Bytes::from(topic.clone()), payload.clone(), retained);
                self.deliver(&publish, 0, retained, None, None);
            }
        }
    }

    fn alloc_pkid(&mut self, router_pkid: Option<u16>) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.out_inflight.contains_key(&self.next_pkid) {
                self.out_inflight.insert(self.next_pkid, router_pkid);
                return self.next_pkid;
            }
        }
    }

    fn deliver(
        &mut self,
        publish: &Publish,
        qos: u8,
        retain: bool,
        properties: Option<PublishProperties>,
        router_pkid: Option<u16>,
    ) {
        // A client that never acknowledges cannot exhaust the packet ids: past the cap it gets
        // QoS 0 (and the router's ack, if any, is due at once).
        let qos = if qos > 0 && self.out_inflight.len() >= MAX_OUT_INFLIGHT {
            if let Some(r) = router_pkid
                && let Some(entry) = self.router_acks.iter_mut().find(|(p, done)| *p == r && !done)
            {
                entry.1 = true;
            }
            0
        } else {
            qos
        };
        let pkid = if qos > 0 { self.alloc_pkid(router_pkid) } else { 0 };
        let out = codec::publish_with(publish, qos, pkid, retain);
        let properties = if self.v5() { properties } else { None };
        self.write(Packet::Publish(out, properties));
    }

    fn on_forward(&mut self, forward: Forward) {
        let raw = forward.publish.serialize();
        let router_qos = raw.first().map_or(0, |b| (b >> 1) & 0b11);
        let router_pkid = raw.get(1..3).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        let (properties, was_qos0) = untag(forward.properties);
        let qos = if was_qos0 { 0 } else { router_qos.min(1) };
        if router_qos > 0 {
            // Delivered at QoS 0: nothing to wait for, the router's ack is due now (in order).
            self.router_acks.push_back((router_pkid, qos == 0));
        }
        let via_router = (qos > 0).then_some(router_pkid);
        self.deliver(&forward.publish, qos, false, properties, via_router);
    }

    async fn on_client_ack(&mut self, pkid: u16) {
        let Some(Some(router_pkid)) = self.out_inflight.remove(&pkid) else { return };
        if let Some(entry) = self.router_acks.iter_mut().find(|(p, done)| *p == router_pkid && !done) {
            entry.1 = true;
        }
        self.release_router_acks().await;
    }

    async fn release_router_acks(&mut self) {
        while let Some((pkid, true)) = self.router_acks.front().copied() {
            self.router_acks.pop_front();
            if let Some(link) = self.link.as_mut() {
                let ack = Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None);
                let _ = link.send(ack).await;
            }
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
        self.shared
            .fan_out(&topic, || match qos {
                0 => tag_qos0(publish.clone(), None),
                _ => Packet::Publish(publish.clone(), None),
            })
            .await;
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
                    warn!(message = "a sensor sent a packet larger than broker.max_payload and its connection was closed; raise broker.max_payload or fix the sensor", client_id = %self.client_id, size, similar_since_last_log = folded);
                }
            }
            End::Protocol(why) | End::Malformed(why) => {
                Metrics::add(&counters.protocol_errors, 1);
                if let Some(folded) = self.shared.log_ready("protocol") {
                    warn!(message = "a sensor broke the MQTT protocol and its connection was closed; fix the sensor's MQTT client", client_id = %self.client_id, reason = %why, similar_since_last_log = folded);
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
        if let Some(mut link) = self.link.take() {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let _ = link.send(Packet::Disconnect(bye, None)).await;
        }
        self.link_stop.cancel();
        let filters = std::mem::take(&mut self.filters);
        if self.clean || self.client_id.is_empty() {
            for filter in filters {
                self.shared.subs.remove(&filter);
            }
        } else {
            // Merge, never overwrite: a connection taken over may close after its successor
            // has already saved (or restored) the session; every filter stays counted once.
            let mut offline = lock(&self.shared.offline);
            let saved = offline.entry(self.client_id.clone()).or_default();
            for filter in filters {
                if !saved.insert(filter.clone()) {
                    self.shared.subs.remove(&filter);
                }
            }
        }
        debug!(message = "sensor disconnected", client_id = %self.client_id, reason = ?end);
    }
}

impl Drop for Session {
    /// The link pump must end with the connection, however it ends (a panic included).
    fn drop(&mut self) {
        self.link_stop.cancel();
    }
}

/// Moves the router's notifications for one link into the connection's queue, and answers
/// `Unschedule` (rumqttd stalls a link for good otherwise).
async fn pump(mut rx: LinkRx, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            n = rx.next() => n,
        };
        match n {
            Ok(Some(rumqttd::Notification::Forward(f))) => {
                if tx.send(Delivery::Forward(Box::new(f))).await.is_err() {
                    break;
                }
            }
            Ok(Some(rumqttd::Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(Some(rumqttd::Notification::Disconnect(..))) | Err(_) => {
                let _ = tx.send(Delivery::Disconnected).await;
                break;
            }
            Ok(_) => {}
        }
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qos0_mark_is_removed_and_leaves_properties_as_they_were() {
        let Packet::Publish(_, props) = tag_qos0(Publish::new("t", "p", false), None) else { panic!() };
        assert_eq!(untag(props), (None, true));
        let mine = PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            ..PublishProperties::default()
        };
        let Packet::Publish(_, props) = tag_qos0(Publish::new("t", "p", false), Some(mine.clone())) else {
            panic!()
        };
        assert_eq!(untag(props), (Some(mine.clone()), true));
        assert_eq!(untag(Some(mine.clone())), (Some(mine), false));
    }
}
