//! Read-only views of the buffer for operators: statistics and records as JSON lines.
//!
//! The same functions serve both paths of `outpost buffer …`: the CLI opening the file itself
//! when no daemon holds it, and the daemon's store thread answering over the admin socket
//! when it does (redb's writer lock excludes every other opener).

use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};

use super::store::{BufferError, EVENTS, Key, META, N_PRIORITIES, Record, decode};
use crate::event::format_event_id;

/// `outpost buffer stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Committed events (up to `2 × commit_max_events` more may be in the daemon's memory).
    pub events: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    pub priorities: Vec<PriorityStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorityStats {
    pub priority: u8,
    pub events: u64,
    pub bytes: u64,
    pub oldest_age_s: Option<f64>,
}

fn err(path: &std::path::Path, e: impl Into<redb::Error>) -> BufferError {
    BufferError::Database { path: path.to_owned(), error: e.into() }
}

pub fn stats(
    db: &impl ReadableDatabase,
    path: &std::path::Path,
    now_ms: u64,
) -> Result<StatsReport, BufferError> {
    let txn = db.begin_read().map_err(|e| err(path, e))?;
    let events = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok(StatsReport { events: 0, bytes: 0, file_bytes: file_bytes(path), priorities: vec![] });
        }
        Err(e) => return Err(err(path, e)),
    };
    let meta = txn.open_table(META).map_err(|e| err(path, e))?;
    let mut report =
        StatsReport { events: 0, bytes: 0, file_bytes: file_bytes(path), priorities: Vec::new() };
    for p in 0..N_PRIORITIES as u8 {
        let get = |kind: &str| -> Result<u64, BufferError> {
            Ok(meta.get(format!("{kind}.{p}").as_str()).map_err(|e| err(path, e))?.map_or(0, |v| v.value()))
        };
        let (n, bytes) = (get("events")?, get("bytes")?);
        if n == 0 {
            continue;
        }
        let oldest = events.range((p, 0)..=(p, u64::MAX)).map_err(|e| err(path, e))?.next();
        let oldest_age_s = match oldest {
            Some(entry) => {
                let (k, v) = entry.map_err(|e| err(path, e))?;
                let record = decode(k.value(), v.value())?;
                Some(now_ms.saturating_sub(record.enqueued_ms) as f64 / 1000.0)
            }
            None => None,
        };
        report.events += n;
        report.bytes += bytes;
        report.priorities.push(PriorityStats { priority: p, events: n, bytes, oldest_age_s });
    }
    Ok(report)
}

/// Up to `limit` records after `after` (or from the start), in send order: priority 0 first,
/// FIFO within a priority.
pub fn records_after(
    db: &impl ReadableDatabase,
    path: &std::path::Path,
    after: Option<Key>,
    limit: usize,
) -> Result<Vec<Record>, BufferError> {
    let txn = db.begin_read().map_err(|e| err(path, e))?;
    let events = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(err(path, e)),
    };
    let range = match after {
        Some(key) => events.range(key..).map_err(|e| err(path, e))?,
        None => events.range::<Key>(..).map_err(|e| err(path, e))?,
    };
    let mut out = Vec::new();
    for entry in range {
        let (k, v) = entry.map_err(|e| err(path, e))?;
        if Some(k.value()) == after {
            continue;
        }
        if out.len() >= limit {
            break;
        }
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

fn file_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[derive(Serialize)]
struct ExportedRecord<'a> {
    priority: u8,
    seq: u64,
    event_id: String,
    enqueued_ms: u64,
    expires_ms: Option<u64>,
    topic: &'a str,
    qos: u8,
    payload: String,
    payload_encoding: &'static str,
}

/// Lowercase hex, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// One record as a JSON line: the payload as UTF-8 text, or hex when it is not.
pub fn export_line(record: &Record) -> String {
    let (payload, payload_encoding) = match std::str::from_utf8(&record.payload) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (hex(&record.payload), "hex"),
    };
    serde_json::to_string(&ExportedRecord {
        priority: record.priority,
        seq: record.seq,
        event_id: format_event_id(record.event_id),
        enqueued_ms: record.enqueued_ms,
        expires_ms: record.expires_ms,
        topic: &record.topic,
        qos: record.qos,
        payload,
        payload_encoding,
    })
    .unwrap_or_default()
}
