//! Read-only views of the buffer for operators: statistics and records as JSON lines.
//!
//! The same functions serve both paths of `outpost buffer …`: a [`FileView`], the CLI's own
//! read-only open when no daemon holds the file, and the daemon's store thread answering over
//! the admin socket when one does (redb's writer lock excludes every other opener).
//!
//! Invariant: nothing here writes to the file, except redb's repair of a file left unclean
//! (which the daemon would do at its next start anyway).

use std::path::{Path, PathBuf};

use redb::ReadTransaction;
use serde::{Deserialize, Serialize};

use super::chunk;
use super::file::{
    BufferError, EVENTS, Key, META, N_PRIORITIES, ReadDb, Record, db_err, file_path, meta_key,
};
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

/// Why `outpost buffer …` cannot read a data dir's buffer file itself.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no buffer at {} (is --data-dir right?)", path.display())]
    Missing { path: PathBuf },
    #[error("cannot repair {}: {error}", path.display())]
    Repair { path: PathBuf, error: redb::DatabaseError },
    #[error("cannot open {} read-only: {error}", path.display())]
    ReadOnly { path: PathBuf, error: redb::DatabaseError },
}

/// Where a data dir's buffer can be read from.
pub enum Opened {
    /// No process holds the file: read it directly.
    File(FileView),
    /// A running gateway holds the file (redb's writer lock): ask it over its admin socket.
    HeldByDaemon,
}

/// A buffer file opened by a process that is not the gateway, to read it.
pub struct FileView {
    db: ReadDb,
    path: PathBuf,
    repaired: bool,
}

impl FileView {
    /// Opens `data_dir`'s buffer file read-only. A file left unclean (a crash or power cut) is
    /// repaired first, as the daemon would do at start; [`FileView::repaired`] says so.
    pub fn open(data_dir: &Path) -> Result<Opened, OpenError> {
        let path = file_path(data_dir);
        if !path.exists() {
            return Err(OpenError::Missing { path });
        }
        let (db, repaired) = match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => (ReadDb::ReadOnly(db), false),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Ok(Opened::HeldByDaemon),
            Err(redb::DatabaseError::RepairAborted) => match redb::Database::open(&path) {
                Ok(db) => (ReadDb::Repaired(db), true),
                Err(error) => return Err(OpenError::Repair { path, error }),
            },
            Err(error) => return Err(OpenError::ReadOnly { path, error }),
        };
        Ok(Opened::File(FileView { db, path, repaired }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file had not been closed cleanly and was repaired when opened.
    pub fn repaired(&self) -> bool {
        self.repaired
    }

    pub fn stats(&self, now_ms: u64) -> Result<StatsReport, BufferError> {
        stats(&self.db.begin_read(&self.path)?, &self.path, now_ms)
    }

    /// Up to `limit` records after `after` (or from the start), in send order.
    pub fn records_after(&self, after: Option<Key>, limit: usize) -> Result<Vec<Record>, BufferError> {
        records_after(&self.db.begin_read(&self.path)?, &self.path, after, limit)
    }
}

pub(super) fn stats(txn: &ReadTransaction, path: &Path, now_ms: u64) -> Result<StatsReport, BufferError> {
    let events = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok(StatsReport { events: 0, bytes: 0, file_bytes: file_bytes(path), priorities: vec![] });
        }
        Err(e) => return Err(db_err(path, e)),
    };
    let meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
    let mut report =
        StatsReport { events: 0, bytes: 0, file_bytes: file_bytes(path), priorities: Vec::new() };
    for p in 0..N_PRIORITIES as u8 {
        let get = |kind: &str| -> Result<u64, BufferError> {
            Ok(meta
                .get(meta_key(kind, usize::from(p)).as_str())
                .map_err(|e| db_err(path, e))?
                .map_or(0, |v| v.value()))
        };
        let (n, bytes) = (get("events")?, get("bytes")?);
        if n == 0 {
            continue;
        }
        let oldest = events.range((p, 0)..=(p, u64::MAX)).map_err(|e| db_err(path, e))?.next();
        let oldest_age_s = match oldest {
            Some(entry) => {
                let (k, v) = entry.map_err(|e| db_err(path, e))?;
                let records = chunk::decode(k.value(), v.value())?;
                records.first().map(|r| now_ms.saturating_sub(r.enqueued_ms) as f64 / 1000.0)
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
pub(super) fn records_after(
    txn: &ReadTransaction,
    path: &Path,
    after: Option<Key>,
    limit: usize,
) -> Result<Vec<Record>, BufferError> {
    let events = match txn.open_table(EVENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(db_err(path, e)),
    };
    // The row holding `after` may hold later events too.
    let start = match after {
        Some(key) => chunk::owner(&events, key).map_err(|e| db_err(path, e))?.unwrap_or(key),
        None => (0, 0),
    };
    let mut out = Vec::new();
    for entry in events.range(start..).map_err(|e| db_err(path, e))? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(|e| db_err(path, e))?;
        let room = limit - out.len();
        let later =
            chunk::decode(k.value(), v.value())?.into_iter().filter(|r| after.is_none_or(|a| r.key() > a));
        out.extend(later.take(room));
    }
    Ok(out)
}

fn file_bytes(path: &Path) -> u64 {
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
    /// The event's MQTT 5 properties (format 7); no key when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    props: Option<&'a crate::event::MessageProps>,
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
        props: record.props.as_deref(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::event::MessageProps;

    #[test]
    fn an_exported_line_shows_properties_only_when_there_are_some() {
        let record = Record {
            priority: 5,
            seq: 1,
            event_id: 2,
            enqueued_ms: 3,
            expires_ms: None,
            topic: "sensors/1".into(),
            qos: 1,
            payload: Bytes::from_static(b"21.5"),
            props: None,
        };
        let line: serde_json::Value = serde_json::from_str(&export_line(&record)).expect("json");
        assert!(line.get("props").is_none(), "{line}");
        let props = MessageProps {
            content_type: Some("text/plain".into()),
            user_properties: vec![("site".into(), "a".into())],
            expires_ms: Some(60_003),
            ..MessageProps::default()
        };
        let with = Record { props: Some(Arc::new(props)), ..record };
        let line: serde_json::Value = serde_json::from_str(&export_line(&with)).expect("json");
        assert_eq!(line["props"]["content_type"], "text/plain", "{line}");
        assert_eq!(line["props"]["user_properties"], serde_json::json!([["site", "a"]]), "{line}");
        assert_eq!(line["props"]["expires_ms"], 60_003, "{line}");
    }
}
