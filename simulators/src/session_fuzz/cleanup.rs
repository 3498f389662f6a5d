//! The state fuzzed clients may leave in the broker by design, and its release before each
//! memory measurement.
//!
//! Retained messages (published ones and retained wills) and persistent sessions (3.1.1 clean
//! session 0, MQTT 5 session expiry above 0) with their subscriptions and queued deliveries are
//! state the broker must keep after every client is gone, up to its configured bounds. Left in
//! place, it makes the memory check report growth that is no leak; so before each measurement
//! [`release`] clears every retained topic (an empty retained publish) and ends every
//! persistent session (a clean connect and a normal DISCONNECT) that fuzzed clients may have
//! created, and what remains is what the gateway failed to free.
//!
//! # Invariants
//! - [`Leftovers::note`] sees every packet before it is written, so the sets cover everything
//!   sent (they over-approximate: a publish or CONNECT the broker refused counts too).
//! - [`release`] returns only after the broker answered for each item: the CONNACK of a clean
//!   connect comes after the old session was discarded, and the PUBACK of an empty retained
//!   publish after the retained store dropped the topic. No fixed sleep is involved.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::grammar::RESERVED_ID_PREFIX;
use super::wire::{Connect, Packet, Property, Publish, Version, encode, read_frame};

/// The retained topics and persistent sessions fuzzed clients may have created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Topics of retained publishes and retained wills.
    pub retained: BTreeSet<String>,
    /// Client ids (with the protocol version they used) of sessions that may outlive their
    /// connection.
    pub sessions: BTreeSet<(String, Version)>,
}

impl Leftovers {
    /// Notes what `packet`, about to be written, may leave behind.
    pub fn note(&mut self, packet: &Packet) {
        match packet {
            Packet::Connect(connect) => {
                if let Some(will) = connect.will.as_ref().filter(|will| will.retain) {
                    self.retained.insert(will.topic.clone());
                }
                // An empty id gets an id the broker assigns, whose session nobody can resume
                // and the broker therefore does not keep.
                if persistent(connect) && !connect.client_id.is_empty() {
                    self.sessions.insert((connect.client_id.clone(), connect.version));
                }
            }
            Packet::Publish(publish) if publish.retain => {
                self.retained.insert(publish.topic.clone());
            }
            // A corrupted PUBLISH (a flipped bit, a wrong length) may still be read as a
            // retained one.
            Packet::Raw { bytes, .. } => {
                if let Some(topic) = raw_retained_topic(bytes) {
                    self.retained.insert(topic);
                }
            }
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.retained.is_empty() && self.sessions.is_empty()
    }
}

/// Whether a CONNECT asks for a session that outlives the connection: 3.1.1 clean session 0;
/// MQTT 5 a session expiry above 0 (clean start only discards what was there before).
fn persistent(connect: &Connect) -> bool {
    match connect.version {
        Version::V311 => !connect.clean,
        Version::V5 => connect.properties.iter().any(|p| matches!(p, Property::SessionExpiry(e) if *e > 0)),
    }
}

/// The topic of the retained PUBLISH at the start of `bytes`, if they start with one whose
/// topic is readable UTF-8.
fn raw_retained_topic(bytes: &[u8]) -> Option<String> {
    let first = *bytes.first()?;
    if first >> 4 != 3 || first & 1 == 0 {
        return None;
    }
    // The remaining length: skip it (a wrong one does not change where the topic is).
    let used = 1 + bytes.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let rest = bytes.get(used..)?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let topic = rest.get(2..2 + len)?;
    std::str::from_utf8(topic).ok().map(str::to_string)
}

/// [`Leftovers`] shared by a round's connections.
#[derive(Debug, Default)]
pub struct Tracker(Mutex<Leftovers>);

impl Tracker {
    pub fn note(&self, packet: &Packet) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).note(packet);
    }

    /// What was noted since the last call.
    pub fn take(&self) -> Leftovers {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What [`release`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Released {
    /// Retained topics cleared (acknowledged empty retained publishes).
    pub retained_cleared: u64,
    /// Retained topics the broker refused to take a publish for (so it holds none for them)
    /// or that no publish can name (empty, wildcards, U+0000).
    pub retained_invalid: u64,
    /// Client ids connected cleanly (the broker answered with a CONNACK).
    pub sessions_ended: u64,
    /// Client ids the broker refused to connect (so it holds no session for them).
    pub sessions_refused: u64,
    /// Items the broker gave no answer for within [`ANSWER_TIMEOUT`].
    pub unanswered: u64,
}

/// How long one connect or acknowledgement may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Clean connects in flight at once.
const SESSION_WORKERS: usize = 8;
/// Empty retained publishes in flight on the clearing connection.
const PUBLISH_WINDOW: usize = 64;
const CLEANER_ID: &str = "outpost-fuzz-cleaner";

/// Ends `leftovers`' sessions, then clears its retained topics, at the broker at `addr`.
///
/// Sessions go first: a persistent session subscribed to `#` would otherwise queue the clearing
/// publishes.
pub async fn release(addr: SocketAddr, leftovers: Leftovers) -> Released {
    let mut released = Released::default();
    let queue = Arc::new(Mutex::new(leftovers.sessions.into_iter().collect::<Vec<_>>()));
    let mut workers = JoinSet::new();
    for _ in 0..SESSION_WORKERS {
        let queue = Arc::clone(&queue);
        workers.spawn(async move {
            let mut done = Released::default();
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                let Some((client_id, version)) = next else { return done };
                match end_session(addr, &client_id, version).await {
                    Some(true) => done.sessions_ended += 1,
                    Some(false) => done.sessions_refused += 1,
                    None => done.unanswered += 1,
                }
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        if let Ok(done) = done {
            released.sessions_ended += done.sessions_ended;
            released.sessions_refused += done.sessions_refused;
            released.unanswered += done.unanswered;
        }
    }
    let (topics, invalid): (Vec<String>, Vec<String>) =
        leftovers.retained.into_iter().partition(|topic| publishable(topic));
    released.retained_invalid += invalid.len() as u64;
    clear_retained(addr, &topics, &mut released).await;
    released
}

/// Whether a PUBLISH may name `topic` at all (else the broker cannot have retained it).
fn publishable(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= usize::from(u16::MAX)
}

/// Connects as `client_id` with a clean session that ends with the connection, and
/// disconnects: `Some(true)` once the broker accepted (and so discarded the old session),
/// `Some(false)` if it refused the connect, `None` without an answer.
async fn end_session(addr: SocketAddr, client_id: &str, version: Version) -> Option<bool> {
    let connect = Connect {
        version,
        client_id: client_id.to_string(),
        clean: true,
        keep_alive: 0,
        will: None,
        username: None,
        password: None,
        properties: match version {
            Version::V311 => Vec::new(),
            Version::V5 => vec![Property::SessionExpiry(0)],
        },
    };
    let mut stream = timeout(ANSWER_TIMEOUT, TcpStream::connect(addr)).await.ok()?.ok()?;
    stream.write_all(&encode(&Packet::Connect(connect), version)).await.ok()?;
    let connack = match timeout(ANSWER_TIMEOUT, read_frame(&mut stream, 1 << 20)).await.ok()? {
        Ok(Some(frame)) => frame,
        // Closed without a CONNACK: the id was refused.
        Ok(None) | Err(_) => return Some(false),
    };
    if connack.packet_type() != 2 || connack.body.get(1) != Some(&0) {
        return Some(false);
    }
    let disconnect = Packet::Disconnect { reason: 0, properties: Vec::new() };
    let _ = stream.write_all(&encode(&disconnect, version)).await;
    // The broker closes the connection after the DISCONNECT.
    let _ = timeout(ANSWER_TIMEOUT, read_frame(&mut stream, 1 << 20)).await;
    Some(true)
}

/// Publishes an empty retained QoS 1 message to each of `topics` over one MQTT 5 connection
/// (5, so a topic the broker only refuses gets a refusing PUBACK rather than a closed
/// connection), [`PUBLISH_WINDOW`] in flight. The broker answers in order, so when it closes
/// the connection the first unanswered topic is the one it would not take: that one is counted
/// invalid and the rest are sent again on a new connection.
async fn clear_retained(addr: SocketAddr, topics: &[String], released: &mut Released) {
    let mut next = 0;
    while next < topics.len() {
        let Some((mut reader, mut writer)) = connect_cleaner(addr).await else {
            released.unanswered += (topics.len() - next) as u64;
            return;
        };
        let mut answered = next;
        let mut sent = next;
        let closed = loop {
            while sent < topics.len() && sent - answered < PUBLISH_WINDOW {
                let publish = Packet::Publish(Publish {
                    dup: false,
                    qos: 1,
                    retain: true,
                    topic: topics[sent].clone(),
                    pkid: (sent % usize::from(u16::MAX)) as u16 + 1,
                    payload: Vec::new(),
                    properties: Vec::new(),
                });
                if writer.write_all(&encode(&publish, Version::V5)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            if answered == topics.len() {
                break false;
            }
            match timeout(ANSWER_TIMEOUT, read_frame(&mut reader, 1 << 20)).await {
                Ok(Ok(Some(frame))) if frame.packet_type() == 4 => {
                    if frame.body.get(2).is_some_and(|&reason| reason >= 0x80) {
                        released.retained_invalid += 1;
                    } else {
                        released.retained_cleared += 1;
                    }
                    answered += 1;
                }
                Ok(Ok(Some(_))) => {}
                Ok(_) => break true,
                Err(_) => {
                    released.unanswered += (topics.len() - answered) as u64;
                    return;
                }
            }
        };
        if !closed {
            let _ = writer
                .write_all(&encode(&Packet::Disconnect { reason: 0, properties: Vec::new() }, Version::V5))
                .await;
            return;
        }
        // The broker closed the connection over topic `answered`.
        released.retained_invalid += 1;
        next = answered + 1;
    }
}

async fn connect_cleaner(addr: SocketAddr) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    debug_assert!(CLEANER_ID.starts_with(RESERVED_ID_PREFIX));
    let stream = super::canary::connect(addr, CLEANER_ID, Version::V5).await?;
    Some(stream.into_split())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session_fuzz::grammar::{Step, session};
    use crate::session_fuzz::wire::Will;

    fn connect(version: Version, client_id: &str, clean: bool, properties: Vec<Property>) -> Connect {
        Connect {
            version,
            client_id: client_id.to_string(),
            clean,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
            properties,
        }
    }

    fn publish(topic: &str, retain: bool) -> Publish {
        Publish {
            dup: false,
            qos: 1,
            retain,
            topic: topic.to_string(),
            pkid: 1,
            payload: b"x".to_vec(),
            properties: Vec::new(),
        }
    }

    #[test]
    fn notes_retained_topics_and_retained_wills() {
        let mut leftovers = Leftovers::default();
        leftovers.note(&Packet::Publish(publish("kept", true)));
        leftovers.note(&Packet::Publish(publish("not-kept", false)));
        let mut with_will = connect(Version::V311, "c", true, Vec::new());
        with_will.will = Some(Will {
            topic: "will".into(),
            payload: vec![1],
            qos: 0,
            retain: true,
            properties: Vec::new(),
        });
        leftovers.note(&Packet::Connect(with_will.clone()));
        if let Some(will) = with_will.will.as_mut() {
            will.retain = false;
            will.topic = "plain-will".into();
        }
        leftovers.note(&Packet::Connect(with_will));
        assert_eq!(leftovers.retained, BTreeSet::from(["kept".to_string(), "will".to_string()]));
        assert!(leftovers.sessions.is_empty());
    }

    #[test]
    fn notes_corrupted_publishes_that_read_as_retained() {
        let mut bytes = encode(&Packet::Publish(publish("flipped", false)), Version::V311);
        let mut leftovers = Leftovers::default();
        leftovers.note(&Packet::Raw { what: "as sent".into(), bytes: bytes.clone() });
        assert!(leftovers.is_empty());
        bytes[0] |= 1;
        leftovers.note(&Packet::Raw { what: "retain bit flipped".into(), bytes: bytes.clone() });
        // A remaining length that lies does not move the topic.
        bytes[1] += 1;
        leftovers.note(&Packet::Raw { what: "wrong length".into(), bytes });
        leftovers.note(&Packet::Raw { what: "garbage".into(), bytes: vec![0x31, 0xff] });
        assert_eq!(leftovers.retained, BTreeSet::from(["flipped".to_string()]));
    }

    #[test]
    fn notes_the_sessions_that_outlive_their_connection() {
        let mut leftovers = Leftovers::default();
        leftovers.note(&Packet::Connect(connect(Version::V311, "kept-311", false, Vec::new())));
        leftovers.note(&Packet::Connect(connect(Version::V311, "clean-311", true, Vec::new())));
        let expiry = |e| vec![Property::SessionExpiry(e)];
        leftovers.note(&Packet::Connect(connect(Version::V5, "kept-5", true, expiry(10))));
        leftovers.note(&Packet::Connect(connect(Version::V5, "no-expiry-5", false, Vec::new())));
        leftovers.note(&Packet::Connect(connect(Version::V5, "zero-expiry-5", false, expiry(0))));
        // The broker assigns an id, whose session nobody can resume.
        leftovers.note(&Packet::Connect(connect(Version::V311, "", false, Vec::new())));
        assert_eq!(
            leftovers.sessions,
            BTreeSet::from([("kept-311".to_string(), Version::V311), ("kept-5".to_string(), Version::V5)])
        );
        assert!(leftovers.retained.is_empty());
    }

    /// Over the grammar's own sessions, every retained publish and retained will, and every
    /// persistent CONNECT, lands in the sets, and a [`Tracker`] hands each out once.
    #[test]
    fn covers_what_the_grammar_sends() {
        let tracker = Tracker::default();
        let mut expected = Leftovers::default();
        for seed in 0..500 {
            for step in session(seed).steps {
                let Step::Send { packet, .. } = step else { continue };
                tracker.note(&packet);
                match &packet {
                    Packet::Publish(p) if p.retain => {
                        expected.retained.insert(p.topic.clone());
                    }
                    Packet::Connect(c) => {
                        if let Some(will) = c.will.as_ref().filter(|w| w.retain) {
                            expected.retained.insert(will.topic.clone());
                        }
                        if persistent(c) && !c.client_id.is_empty() {
                            expected.sessions.insert((c.client_id.clone(), c.version));
                        }
                    }
                    _ => {}
                }
            }
        }
        let noted = tracker.take();
        assert!(!expected.retained.is_empty() && !expected.sessions.is_empty());
        assert!(noted.retained.is_superset(&expected.retained));
        assert_eq!(noted.sessions, expected.sessions);
        assert!(tracker.take().is_empty(), "take() empties the tracker");
    }

    #[test]
    fn only_nameable_topics_are_published() {
        assert!(publishable("a/b") && publishable("$SYS/x") && publishable("ü"));
        assert!(!publishable("") && !publishable("a/#") && !publishable("+") && !publishable("a\0b"));
    }
}
