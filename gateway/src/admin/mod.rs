//! The admin socket, `<data_dir>/outpost.sock`: lets `outpost buffer stats|peek|export|import`
//! reach the buffer while the daemon holds it (redb's writer lock keeps every other process
//! out). Both ends are here: [`server`] runs in the daemon, [`client`] in the `outpost`
//! command; this module is the protocol between them, defined once.
//!
//! Protocol: one [`Request`] line (`stats`, `peek N`, `export`), answered with JSON lines
//! ([`StatsReport`](crate::buffer::inspect::StatsReport), or one record a line), then the
//! daemon closes the connection. A failure is answered with one line starting with `error: `.
//!
//! `import` is followed by one JSON line per event ([`WireRecord`]) until the client ends its
//! input; the answer is one JSON [`ImportSummary`](crate::buffer::import::ImportSummary) line.
//!
//! `status` is answered with one JSON [`DaemonStatus`] line (what `outpost status` shows when
//! the gateway has no `[http]` endpoint).
//!
//! `tap {json}` ([`TapRequest`]) attaches a viewer to the tap: the daemon answers one
//! `{"attached": …}` line, then a JSON line per [`TapRecord`](crate::tap::TapRecord) that passes
//! the request's filters, and a `{"missed": N}` line whenever the viewer fell behind, until
//! either side closes the connection.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::buffer::inspect::hex;
use crate::buffer::{N_PRIORITIES, Record};
use crate::event::MessageProps;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("outpost.sock")
}

/// What an answer line that reports a failure starts with.
const ERROR_PREFIX: &str = "error: ";

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Stats,
    /// The next N records the relay will send.
    Peek(usize),
    /// Every record.
    Export,
    /// Records follow, one [`WireRecord`] a line.
    Import,
    /// The running gateway's state, one [`DaemonStatus`] line.
    Status,
    /// Attach a tap viewer.
    Tap(TapRequest),
}

/// What `outpost tap` asks to see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapRequest {
    /// Only events whose topic matches this filter (relay records: the upstream topic, or an
    /// event id seen passing ingest or the rules with a matching topic).
    pub topic: Option<String>,
    /// Only this rule's verdicts, and the relay records of the events it matched.
    pub rule: Option<String>,
    /// Only this stage's records.
    pub stage: Option<crate::tap::TapStage>,
    /// Only one event in N (by event id, so an event's whole path is kept or left out).
    pub sample: Option<u64>,
}

impl TapRequest {
    /// The request line that asks for this tap.
    pub fn line_of_tap(&self) -> String {
        Request::Tap(self.clone()).line()
    }
}

/// The first answer line of a tap: attached, and to which stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    pub attached: Vec<crate::tap::TapStage>,
}

/// `status` without `[http]`: what the daemon knows without its 1 s sampler (no rates, no
/// "since").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub upstream: DaemonUpstream,
    pub backlog: DaemonBacklog,
    pub sensors_connected: u64,
    /// Every counter that is not zero, by its log name.
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonUpstream {
    pub connected: bool,
    pub connects: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonBacklog {
    pub events: u64,
    pub committed: Option<crate::buffer::inspect::StatsReport>,
}

impl Request {
    /// Reads a request line; `Err` is the answer that says what is expected.
    pub fn parse(line: &str) -> Result<Request, &'static str> {
        if let Some(json) = line.trim().strip_prefix("tap") {
            return serde_json::from_str(json.trim()).map(Request::Tap).map_err(|_| TAP);
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("stats"), None) => Ok(Request::Stats),
            (Some("status"), None) => Ok(Request::Status),
            (Some("import"), None) => Ok(Request::Import),
            (Some("export"), None) => Ok(Request::Export),
            (Some("peek"), Some(n)) => n.parse().map(Request::Peek).map_err(|_| PEEK_OR_EXPORT),
            (Some("peek" | "export"), _) => Err(PEEK_OR_EXPORT),
            _ => Err(EXPECTED),
        }
    }

    /// The request as the client sends it, newline included.
    pub fn line(&self) -> String {
        match self {
            Request::Status => "status\n".to_owned(),
            Request::Tap(tap) => format!("tap {}\n", serde_json::to_string(tap).unwrap_or_default()),
            Request::Stats => "stats\n".to_owned(),
            Request::Peek(n) => format!("peek {n}\n"),
            Request::Export => "export\n".to_owned(),
            Request::Import => "import\n".to_owned(),
        }
    }
}

const PEEK_OR_EXPORT: &str = "expected `peek N` or `export`";
const EXPECTED: &str = "expected `stats`, `status`, `peek N`, `export`, `import` or `tap {…}`";
const TAP: &str = "expected `tap` and a JSON object with `topic`, `rule`, `stage`, `sample`";

/// One event on the admin socket: a JSON line, the payload in hex.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireRecord {
    pub priority: u8,
    pub event_id: u64,
    pub enqueued_ms: u64,
    pub expires_ms: Option<u64>,
    pub topic: String,
    pub qos: u8,
    pub payload: String,
    /// The event's MQTT 5 properties; absent when it has none (and in lines from releases
    /// before format 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<MessageProps>,
}

impl WireRecord {
    pub fn new(record: &Record) -> WireRecord {
        WireRecord {
            priority: record.priority,
            event_id: record.event_id,
            enqueued_ms: record.enqueued_ms,
            expires_ms: record.expires_ms,
            topic: record.topic.clone(),
            qos: record.qos,
            payload: hex(&record.payload),
            props: record.props.as_deref().cloned(),
        }
    }

    /// The record (without a sequence number: the importing side assigns it).
    pub fn into_record(self) -> Result<Record, String> {
        let payload = unhex(&self.payload).ok_or("payload is not hex")?;
        Ok(Record {
            priority: self.priority.min(N_PRIORITIES as u8 - 1),
            seq: 0,
            event_id: self.event_id,
            enqueued_ms: self.enqueued_ms,
            expires_ms: self.expires_ms,
            topic: self.topic,
            qos: self.qos,
            payload: Bytes::from(payload),
            props: self.props.map(Arc::new),
        })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_records_round_trip() {
        let r = Record {
            priority: 3,
            seq: 7,
            event_id: 99,
            enqueued_ms: 1_700_000_000_007,
            expires_ms: None,
            topic: "sensors/7".into(),
            qos: 1,
            payload: Bytes::from_static(&[0, 1, 0xfe, b'x']),
            props: None,
        };
        let line = serde_json::to_string(&WireRecord::new(&r)).expect("json");
        assert!(!line.contains("props"), "no properties, no key: {line}");
        let back: WireRecord = serde_json::from_str(&line).expect("parse");
        let back = back.into_record().expect("valid");
        assert_eq!(back.fingerprint(), r.fingerprint());
        assert_eq!((back.enqueued_ms, &back.payload), (r.enqueued_ms, &r.payload));
        let with_props = Record {
            props: Some(Arc::new(MessageProps {
                content_type: Some("text/plain".into()),
                correlation_data: Some(Bytes::from_static(&[0, 0xff])),
                user_properties: vec![("k".into(), "v".into())],
                expires_ms: Some(1_700_000_060_007),
                ..MessageProps::default()
            })),
            ..r
        };
        let line = serde_json::to_string(&WireRecord::new(&with_props)).expect("json");
        let back: WireRecord = serde_json::from_str(&line).expect("parse");
        let back = back.into_record().expect("valid");
        assert_eq!(back.fingerprint(), with_props.fingerprint());
        assert_eq!(back.props, with_props.props);
        assert!(unhex("abc").is_none() && unhex("zz").is_none());
    }

    #[test]
    fn requests_round_trip_and_bad_lines_say_what_is_expected() {
        let tap = TapRequest {
            topic: Some("site/+/t".into()),
            rule: Some("r".into()),
            stage: Some(crate::tap::TapStage::Rules),
            sample: Some(10),
        };
        for request in [
            Request::Stats,
            Request::Status,
            Request::Peek(12),
            Request::Export,
            Request::Import,
            Request::Tap(tap),
            Request::Tap(TapRequest::default()),
        ] {
            assert_eq!(Request::parse(&request.line()), Ok(request));
        }
        assert_eq!(Request::parse("tap {\"topics\":\"x\"}"), Err(TAP));
        assert_eq!(Request::parse("peek"), Err(PEEK_OR_EXPORT));
        assert_eq!(Request::parse("peek x"), Err(PEEK_OR_EXPORT));
        assert_eq!(Request::parse("export 3"), Err(PEEK_OR_EXPORT));
        assert_eq!(Request::parse("stats 3"), Err(EXPECTED));
        assert_eq!(Request::parse(""), Err(EXPECTED));
    }
}
