//! Runs fuzzed [`Session`]s over TCP and records what each connection sent, so a finding can
//! name the packets that led to it.
//!
//! # Invariants
//! - Every packet written is noted in [`Recorder::leftovers`] before it is written.
//! - Every byte written is recorded (per connection: its first packet and the latest
//!   [`PACKETS_KEPT`] − 1) before it is written, so a crash report includes the packet that
//!   was being written when the broker died.
//! - A session never outlives the round: it ends on cancellation, when the broker closes the
//!   connection, or when a write stays blocked for [`WRITE_TIMEOUT`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::cleanup::Tracker;
use super::grammar::{AckPolicy, Session, Step};
use super::wire::{AckKind, Packet, Version, encode, read_frame};

/// Packets kept per connection for reports.
pub const PACKETS_KEPT: usize = 64;
/// Bytes of one packet kept for reports and replays; the grammar's packets are all shorter,
/// so only a packet over this is kept cut (and its `len` says so).
const BYTES_KEPT: usize = 32 * 1024;
/// Closed connections kept for reports and replays: about 20 s of a round's connections, so a
/// stall found 10 s after the event that caused it still has that event's connection.
const CLOSED_KEPT: usize = 1024;
/// A write that blocks this long (the broker stopped reading) ends the session.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest packet read from the broker.
const MAX_INCOMING: usize = 1 << 20;

/// One packet a connection sent.
#[derive(Debug, Clone)]
pub struct SentPacket {
    pub at: Instant,
    pub what: String,
    /// The packet's bytes (cut to [`BYTES_KEPT`]).
    pub bytes: Vec<u8>,
    /// The packet's full length.
    pub len: usize,
    pub hostile: bool,
    /// A PUBLISH's QoS and packet id.
    pub publish: Option<(u8, u16)>,
    /// A QoS 1 or 2 PUBLISH the broker accepted (PUBACK or PUBREC with success).
    pub acked: bool,
    /// A CONNECT with a will.
    pub will: bool,
}

/// What one connection sent, for reports.
#[derive(Debug, Clone)]
pub struct ConnectionLog {
    pub id: u64,
    pub client_id: String,
    pub version: Version,
    pub packets: Vec<SentPacket>,
    pub last_write: Option<Instant>,
    pub closed_at: Option<Instant>,
}

impl ConnectionLog {
    /// When the connection last wrote or closed.
    pub fn last_event(&self) -> Option<Instant> {
        self.last_write.max(self.closed_at)
    }
}

/// The packet logs of the round's open connections and of the latest closed ones.
#[derive(Debug, Default)]
pub struct Recorder {
    inner: Mutex<RecorderInner>,
    pub connections: AtomicU64,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Connections the broker closed before the session's script ended.
    pub closed_by_broker: AtomicU64,
    /// TCP connects that failed.
    pub connect_failures: AtomicU64,
    /// What the connections may have left in the broker.
    pub leftovers: Tracker,
}

#[derive(Debug, Default)]
struct RecorderInner {
    next_id: u64,
    open: HashMap<u64, ConnectionLog>,
    closed: VecDeque<ConnectionLog>,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self, client_id: &str, version: Version) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let log = ConnectionLog {
            id,
            client_id: client_id.to_string(),
            version,
            packets: Vec::new(),
            last_write: None,
            closed_at: None,
        };
        inner.open.insert(id, log);
        id
    }

    fn record(&self, id: u64, packet: &Packet, bytes: &[u8], hostile: bool) {
        self.leftovers.note(packet);
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        let sent = SentPacket {
            at: now,
            what: packet.describe(),
            bytes: bytes[..bytes.len().min(BYTES_KEPT)].to_vec(),
            len: bytes.len(),
            hostile,
            publish: match packet {
                Packet::Publish(publish) => Some((publish.qos, publish.pkid)),
                _ => None,
            },
            acked: false,
            will: matches!(packet, Packet::Connect(connect) if connect.will.is_some()),
        };
        let mut inner = self.lock();
        if let Some(log) = inner.open.get_mut(&id) {
            if log.packets.len() >= PACKETS_KEPT {
                // Keep the CONNECT, which every reproducer needs.
                log.packets.remove(1);
            }
            log.packets.push(sent);
            log.last_write = Some(now);
        }
    }

    /// Marks connection `id`'s latest QoS 1 or 2 PUBLISH with `pkid` as accepted.
    fn mark_acked(&self, id: u64, pkid: u16) {
        let mut inner = self.lock();
        let Some(log) = inner.open.get_mut(&id) else { return };
        let latest =
            log.packets.iter_mut().rev().find(|p| p.publish.is_some_and(|(qos, id)| qos > 0 && id == pkid));
        if let Some(packet) = latest {
            packet.acked = true;
        }
    }

    fn close(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(mut log) = inner.open.remove(&id) {
            log.closed_at = Some(Instant::now());
            if inner.closed.len() >= CLOSED_KEPT {
                inner.closed.pop_front();
            }
            inner.closed.push_back(log);
        }
    }

    /// Every kept connection log, open and closed.
    pub fn logs(&self) -> Vec<ConnectionLog> {
        let inner = self.lock();
        inner.open.values().chain(inner.closed.iter()).cloned().collect()
    }
}

/// The write half, shared by the script and the answers to deliveries.
type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// Runs `session` against `addr` until its script and linger end, the broker closes the
/// connection, or `cancel`.
///
/// The script's packets are `pacing` apart (answers to deliveries are not held back): a fuzzer
/// that saturates the gateway would only report its throughput as stalls.
pub async fn run_session(
    addr: SocketAddr,
    session: &Session,
    pacing: Duration,
    recorder: &Recorder,
    cancel: &CancellationToken,
) {
    let stream = match timeout(WRITE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        _ => {
            recorder.connect_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let id = recorder.open(&session.client_id, session.version);
    let (mut reader, writer) = stream.into_split();
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
    let conn = Conn { id, version: session.version, writer: Arc::clone(&writer), recorder };

    let script = async {
        for step in &session.steps {
            match step {
                Step::Send { packet, hostile } => {
                    if !conn.send(packet, *hostile).await {
                        return;
                    }
                    tokio::time::sleep(pacing).await;
                }
                Step::Wait(pause) => tokio::time::sleep(*pause).await,
            }
        }
        tokio::time::sleep(session.linger).await;
    };
    let answers = async {
        let mut answerer = Answerer::new(session.deliveries, session.releases);
        // Ends when the broker closes the connection or sends something unreadable.
        while let Ok(Some(frame)) = read_frame(&mut reader, MAX_INCOMING).await {
            // PUBACK or PUBREC; an MQTT 5 reason code of 0x80 or more refuses the publish.
            if matches!(frame.packet_type(), 4 | 5)
                && frame.body.get(2).is_none_or(|&reason| reason < 0x80)
                && let Some(pkid) = frame.ack_pkid()
            {
                recorder.mark_acked(id, pkid);
            }
            for packet in answerer.answer(&frame) {
                if !conn.send(&packet, false).await {
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = script => {}
        () = answers => {
            recorder.closed_by_broker.fetch_add(1, Ordering::Relaxed);
        }
        () = cancel.cancelled() => {}
    }
    recorder.close(id);
    // Dropping both halves closes the socket without a DISCONNECT: an abrupt close unless
    // the script sent one.
}

struct Conn<'a> {
    id: u64,
    version: Version,
    writer: Writer,
    recorder: &'a Recorder,
}

impl Conn<'_> {
    /// Records and writes `packet`; false if the connection is gone or blocked.
    async fn send(&self, packet: &Packet, hostile: bool) -> bool {
        let bytes = encode(packet, self.version);
        self.recorder.record(self.id, packet, &bytes, hostile);
        let mut writer = self.writer.lock().await;
        matches!(timeout(WRITE_TIMEOUT, writer.write_all(&bytes)).await, Ok(Ok(())))
    }
}

/// Decides the answers to what the broker sends, by the session's policies.
struct Answerer {
    deliveries: AckPolicy,
    releases: AckPolicy,
    /// Held answers of the `Reversed` policy.
    held: Vec<Packet>,
}

impl Answerer {
    fn new(deliveries: AckPolicy, releases: AckPolicy) -> Answerer {
        Answerer { deliveries, releases, held: Vec::new() }
    }

    fn answer(&mut self, frame: &super::wire::Frame) -> Vec<Packet> {
        let (policy, kind, pkid) = match frame.packet_type() {
            // PUBLISH: QoS 1 gets PUBACK, QoS 2 PUBREC.
            3 => match frame.publish_qos_pkid() {
                Some((1, pkid)) => (self.deliveries, AckKind::PubAck, pkid),
                Some((2, pkid)) => (self.deliveries, AckKind::PubRec, pkid),
                _ => return Vec::new(),
            },
            // PUBREC of our QoS 2 publish: PUBREL.
            5 => match frame.ack_pkid() {
                Some(pkid) => (self.releases, AckKind::PubRel, pkid),
                None => return Vec::new(),
            },
            // PUBREL of a QoS 2 delivery: PUBCOMP.
            6 => match frame.ack_pkid() {
                Some(pkid) => (self.deliveries, AckKind::PubComp, pkid),
                None => return Vec::new(),
            },
            _ => return Vec::new(),
        };
        let ack = |pkid| Packet::Ack { kind, pkid, reason: 0 };
        match policy {
            AckPolicy::Correct => vec![ack(pkid)],
            AckPolicy::Never => Vec::new(),
            AckPolicy::WrongPkid => vec![ack(pkid.wrapping_add(1))],
            AckPolicy::Twice => vec![ack(pkid), ack(pkid)],
            AckPolicy::Reversed => {
                self.held.push(ack(pkid));
                if self.held.len() < 3 {
                    return Vec::new();
                }
                let mut batch = std::mem::take(&mut self.held);
                batch.reverse();
                batch
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session_fuzz::wire::Frame;

    #[test]
    fn answers_by_policy() {
        // A QoS 1 PUBLISH, topic "t", packet id 7.
        let publish = Frame { first_byte: 0x32, body: vec![0, 1, b't', 0, 7, b'x'] };
        let puback = |pkid| Packet::Ack { kind: AckKind::PubAck, pkid, reason: 0 };
        assert_eq!(Answerer::new(AckPolicy::Correct, AckPolicy::Correct).answer(&publish), vec![puback(7)]);
        assert_eq!(Answerer::new(AckPolicy::Never, AckPolicy::Correct).answer(&publish), vec![]);
        assert_eq!(Answerer::new(AckPolicy::WrongPkid, AckPolicy::Correct).answer(&publish), vec![puback(8)]);
        let mut reversed = Answerer::new(AckPolicy::Reversed, AckPolicy::Correct);
        let second = Frame { first_byte: 0x32, body: vec![0, 1, b't', 0, 8] };
        let third = Frame { first_byte: 0x32, body: vec![0, 1, b't', 0, 9] };
        assert!(reversed.answer(&publish).is_empty());
        assert!(reversed.answer(&second).is_empty());
        assert_eq!(reversed.answer(&third), vec![puback(9), puback(8), puback(7)]);
        // PUBREC of our QoS 2 publish follows the release policy.
        let pubrec = Frame { first_byte: 0x50, body: vec![0, 3] };
        let pubrel = Packet::Ack { kind: AckKind::PubRel, pkid: 3, reason: 0 };
        assert_eq!(Answerer::new(AckPolicy::Never, AckPolicy::Correct).answer(&pubrec), vec![pubrel]);
    }
}
