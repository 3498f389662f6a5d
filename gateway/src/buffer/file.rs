//! The buffer file's vocabulary, shared by its one writer ([`super::store`]) and its
//! read-only readers ([`super::inspect`], [`super::import`]): the tables, the record and its
//! encoding, the failures, and a read-only open.
//!
//! Invariant: nothing here writes to a file. It sits below every other buffer module and
//! imports none of them except [`super::access`] (which only describes the file system).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadTransaction, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::event::MessageProps;

pub(super) const FILE_NAME: &str = "buffer.redb";

/// The buffer file of a data dir.
pub fn file_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Rows of events by `(priority, first seq)`: per priority, key order is FIFO order. Since
/// format 4 a row packs many events ([`super::chunk`]); older rows hold one CBOR record.
pub(crate) const EVENTS: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("events");
/// Counters kept in the same transactions as the records they describe.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Events merged in by `outpost buffer import`, by [`Record::fingerprint`], so importing the
/// same file again adds nothing. Entries stay after the events are relayed.
pub(crate) const IMPORTED: TableDefinition<(u64, u64), ()> = TableDefinition::new("imported");

/// The broker's retained messages (format version 3), by topic: a [`StoredRetained`] in CBOR.
pub(crate) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
/// The route stage's checkpoint of its stateful rules in formats 6–8: one row, the CBOR
/// snapshot of `outpost_rules::window::WindowState`. Format 9 moves it into
/// [`WINDOW_LOG`]; only that migration still opens it.
pub(crate) const WINDOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("windows");
/// The route stage's checkpoint of its stateful rules (format version 9), as a log by
/// sequence number: a full snapshot, then the deltas taken after it (see `buffer::windows`).
pub(crate) const WINDOW_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("window_log");
/// A [`WINDOW_LOG`] row's first byte: the rest is a full snapshot…
pub(crate) const WINDOW_FULL_TAG: u8 = b'F';
/// …or the changes since the row before it…
pub(crate) const WINDOW_DELTA_TAG: u8 = b'D';
/// …or (since format 11) the next piece of the full snapshot or delta in the row before it.
pub(crate) const WINDOW_MORE_TAG: u8 = b'M';
/// The most state bytes in one [`WINDOW_LOG`] row (since format 11): a checkpoint larger than
/// this is written as a row of its kind followed by [`WINDOW_MORE_TAG`] rows. A row this
/// size, with its tag, key and the leaf's bookkeeping, fits one of redb's 4 KiB pages; a
/// larger value gets a page of the next power of two to itself and redb writes all of it,
/// so a 43 KB delta cost a 64 KiB page and a 1.1 MB snapshot a 2 MiB one (rules/README.md,
/// "What windows cost"). 8,000-byte pieces measured the same; far smaller ones only add keys.
pub(crate) const WINDOW_ROW_BYTES: usize = 4000;

/// A [`WINDOW_LOG`] row: `tag`, then the rules crate's bytes.
pub(crate) fn window_row(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(bytes.len() + 1);
    row.push(tag);
    row.extend_from_slice(bytes);
    row
}

pub const N_PRIORITIES: usize = 10;

/// One write a window checkpoint makes to [`WINDOW_LOG`] (`buffer::windows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// No stateful rule runs: every row goes.
    Clear,
    /// A full snapshot of the state: every row goes, and this one is the log's new base.
    Full(Vec<u8>),
    /// The changes since the row before it: appended after the base and its deltas.
    Delta(Vec<u8>),
}

impl LogWrite {
    /// The state bytes it writes (the row's tag byte not counted).
    pub fn len(&self) -> usize {
        match self {
            LogWrite::Clear => 0,
            LogWrite::Full(bytes) | LogWrite::Delta(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`WINDOW_LOG`] held at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum WindowLoad {
    /// No checkpoint.
    #[default]
    Empty,
    /// The last full snapshot and the deltas written after it, oldest first.
    Log { base: Vec<u8>, deltas: Vec<Vec<u8>> },
    /// Rows that cannot make a state (deltas without a base, an unknown row kind): the
    /// stateful rules start empty. Never written by this release; said for the log.
    Unusable(String),
}

/// The bytes a record in a one-record row of formats 1–3 counts for: its encoded value plus
/// its 9-byte key and B-tree entry overhead, rounded to 16.
pub fn stored_size(value_len: usize) -> u64 {
    value_len as u64 + 16
}

/// A record's position in the queue: `(priority, seq)`.
pub type Key = (u8, u64);

/// Failures of the buffer file.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "buffer file {} is locked by another process; is another outpost running with the same data dir?",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("cannot create data dir {}: {error}; {hint}", path.display())]
    DataDir { path: PathBuf, error: std::io::Error, hint: String },
    /// The file could not be opened or written for a reason outside its contents
    /// (permissions, a read-only or full file system, an I/O error): the gateway refuses to
    /// start and leaves the file alone.
    #[error("cannot open buffer file {}: {error}; {hint}", path.display())]
    Access { path: PathBuf, error: std::io::Error, hint: String },
    #[error(
        "buffer file {} has format version {found}, but this outpost reads versions up to {supported}: a newer release wrote it. Run that release (or a newer one) on this data dir; the file was left untouched",
        path.display()
    )]
    NewerFormat { path: PathBuf, found: u64, supported: u64 },
    #[error(
        "buffer file {} is in a redb file format this build cannot read ({detail}); run the release that wrote it, or a newer one. The file was left untouched",
        path.display()
    )]
    RedbFormat { path: PathBuf, detail: String },
    #[error("cannot move corrupt buffer file {} aside: {error}", path.display())]
    MoveAside { path: PathBuf, error: std::io::Error },
    // The underlying errors are printed in the messages, so no field is named `source`:
    // thiserror would make it the error's `source()` too, and a chain printed with `{:#}`
    // (as `main` does) would repeat it.
    #[error("buffer file {}: {error}", path.display())]
    Database { path: PathBuf, error: redb::Error },
    #[error("buffer record {key:?} is undecodable: {message}")]
    Record { key: Key, message: String },
    /// A bug, not the file's fault: the route stage's checkpointer writes a full snapshot
    /// before any delta, and a full one after a failure.
    #[error(
        "buffer file {}: a window-state delta was offered to a checkpoint log without a full snapshot; nothing was written, and the next checkpoint must be a full one",
        path.display()
    )]
    DeltaWithoutBase { path: PathBuf },
}

impl BufferError {
    /// Whether retrying later can help (a full disk can be freed; corruption cannot).
    pub fn is_io(&self) -> bool {
        matches!(self, BufferError::Database { error: redb::Error::Io(_) | redb::Error::PreviousIo, .. })
    }

    /// Whether this error proves the file's *contents* are bad: redb's own corruption
    /// verdicts (including "not a redb database" and a file cut short, which redb reports as
    /// I/O errors, see `is_content_error`), undecodable records, counters that disagree with
    /// the records. Only then may a file be moved aside; anything else (permissions, a
    /// read-only or full disk, a format too new) leaves it where it is.
    pub fn proves_corruption(&self) -> bool {
        match self {
            BufferError::Database { error: redb::Error::Corrupted(_), .. } | BufferError::Record { .. } => {
                true
            }
            BufferError::Database { error: redb::Error::Io(e), .. } => is_content_error(e),
            _ => false,
        }
    }

    /// Turns an I/O failure into [`BufferError::Access`], naming owner, mode, user and fix.
    pub(super) fn explained(self, data_dir: &Path) -> BufferError {
        match self {
            BufferError::Database { path, error: redb::Error::Io(error) } => {
                let hint = super::access::hint(&path, data_dir, &error);
                BufferError::Access { path, error, hint }
            }
            other => other,
        }
    }
}

/// One buffered event. `priority` and `seq` form the key; the rest is the stored value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(skip)]
    pub priority: u8,
    #[serde(skip)]
    pub seq: u64,
    pub event_id: u64,
    pub enqueued_ms: u64,
    pub expires_ms: Option<u64>,
    pub topic: String,
    pub qos: u8,
    pub payload: Bytes,
    /// The event's MQTT 5 properties (format 7), `None` when it has none. Never in the CBOR
    /// of formats 1–3, which predate them.
    #[serde(skip)]
    pub props: Option<Arc<MessageProps>>,
}

impl Record {
    pub fn key(&self) -> Key {
        (self.priority, self.seq)
    }

    /// What a record counts against `max_bytes` while it is only in memory: payload, topic
    /// and an estimate of the encoding overhead. On disk [`Record::stored_size`] counts.
    pub fn size(&self) -> u64 {
        (self.payload.len() + self.topic.len() + 48 + props_size(self)) as u64
    }

    /// What a record in a packed row counts for in the `bytes.<p>` counters: its topic and
    /// payload, at most 16 bytes of header (ids and times as deltas, flags, lengths) and its
    /// encoded properties, if any. A repeated topic costs less on disk; it counts the same,
    /// so the count depends on the record alone.
    pub fn stored_size(&self) -> u64 {
        (self.payload.len() + self.topic.len() + 16 + props_size(self)) as u64
    }

    /// The CBOR map of formats 1–3: still read ([`Record::decode`]), written only by tests
    /// that make an old file.
    #[cfg(test)]
    pub(crate) fn encode_v3(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + self.topic.len() + 32);
        ciborium::into_writer(self, &mut out).expect("writing CBOR into a Vec cannot fail");
        out
    }

    pub(crate) fn decode(key: Key, bytes: &[u8]) -> Result<Record, BufferError> {
        let mut record: Record =
            ciborium::from_reader(bytes).map_err(|e| BufferError::Record { key, message: e.to_string() })?;
        record.priority = key.0;
        record.seq = key.1;
        Ok(record)
    }

    /// What makes two records the same event for `buffer import`: the event id, and a
    /// 64-bit FNV-1a hash of everything the upstream would see (priority, QoS, expiry, topic,
    /// payload). The id alone is not enough: a file started after a move-aside reused ids
    /// before ids were seeded from the clock. The hash is fixed here, not `std`'s hasher, so
    /// it stays the same across builds (it is stored in the file).
    pub fn fingerprint(&self) -> (u64, u64) {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0100_0000_01b3;
        let mut hash = OFFSET;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash = (hash ^ u64::from(*b)).wrapping_mul(PRIME);
            }
        };
        feed(&[self.priority, self.qos]);
        feed(&self.expires_ms.map_or([0xff; 8], u64::to_le_bytes));
        feed(&(self.topic.len() as u64).to_le_bytes());
        feed(self.topic.as_bytes());
        feed(&self.payload);
        // Only when present, so the fingerprint of an event without properties (stored in
        // files since format 2) is what it always was.
        if let Some(props) = &self.props {
            let mut block = Vec::new();
            put_props(&mut block, props, 0);
            feed(&block);
        }
        (self.event_id, hash)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| at <= now_ms)
    }
}

/// A retained message as the file keeps it: the publish's QoS and payload, its MQTT 5
/// properties a subscriber gets (not the topic alias or subscription identifiers, which are
/// per connection), and when its message expiry passes, in Unix milliseconds, so the
/// remaining expiry survives a restart.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StoredRetained {
    pub qos: u8,
    pub payload: Bytes,
    pub expires_ms: Option<u64>,
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl StoredRetained {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 32);
        ciborium::into_writer(self, &mut out).expect("writing CBOR into a Vec cannot fail");
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<StoredRetained, String> {
        ciborium::from_reader(bytes).map_err(|e| e.to_string())
    }
}

// A record's properties (format 7), as the packed rows hold them after the flag
// `HAS_PROPS`: a varint length, then each property present as its MQTT 5 identifier and its
// value, in this order — 0x01 payload format indicator (a byte), 0x02 message expiry (the
// deadline as a zigzag delta from `base`), 0x03 content type, 0x08 response topic, 0x09
// correlation data (each length-prefixed), then 0x26 per user property (name, value, both
// length-prefixed), in their order. MQTT's identifiers make a dump readable; varint lengths
// keep it smaller than MQTT's two-byte ones.
const PFI: u8 = 0x01;
const EXPIRY: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION: u8 = 0x09;
const USER_PROPERTY: u8 = 0x26;

/// The bytes `props` take in a packed row, length prefix included; 0 without properties.
pub(crate) fn props_size(record: &Record) -> usize {
    record.props.as_deref().map_or(0, |props| {
        let len = props_body_len(props, record.enqueued_ms);
        varint_len(len as u64) + len
    })
}

fn props_body_len(props: &MessageProps, base: u64) -> usize {
    let field = |len: usize| varint_len(len as u64) + len;
    props.payload_format_indicator.map_or(0, |_| 2)
        + props.expires_ms.map_or(0, |at| 1 + varint_len(zigzag(at.wrapping_sub(base))))
        + props.content_type.as_ref().map_or(0, |t| 1 + field(t.len()))
        + props.response_topic.as_ref().map_or(0, |t| 1 + field(t.len()))
        + props.correlation_data.as_ref().map_or(0, |d| 1 + field(d.len()))
        + props.user_properties.iter().map(|(k, v)| 1 + field(k.len()) + field(v.len())).sum::<usize>()
}

/// Appends `props` as a packed row holds them, the expiry relative to `base`.
pub(crate) fn put_props(out: &mut Vec<u8>, props: &MessageProps, base: u64) {
    let put_field = |out: &mut Vec<u8>, id: u8, bytes: &[u8]| {
        out.push(id);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    };
    put_varint(out, props_body_len(props, base) as u64);
    if let Some(indicator) = props.payload_format_indicator {
        out.extend_from_slice(&[PFI, indicator]);
    }
    if let Some(at) = props.expires_ms {
        out.push(EXPIRY);
        put_varint(out, zigzag(at.wrapping_sub(base)));
    }
    if let Some(t) = &props.content_type {
        put_field(out, CONTENT_TYPE, t.as_bytes());
    }
    if let Some(t) = &props.response_topic {
        put_field(out, RESPONSE_TOPIC, t.as_bytes());
    }
    if let Some(d) = &props.correlation_data {
        put_field(out, CORRELATION, d);
    }
    for (name, value) in &props.user_properties {
        put_field(out, USER_PROPERTY, name.as_bytes());
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }
}

/// Reads what [`put_props`] wrote. `Err` names what is wrong, for the caller's corruption
/// verdict.
pub(crate) fn get_props(r: &mut Reader<'_>, base: u64) -> Result<MessageProps, &'static str> {
    let len =
        usize::try_from(r.varint().ok_or("truncated properties")?).map_err(|_| "properties too long")?;
    let end = r.at.checked_add(len).filter(|&end| end <= r.buf.len()).ok_or("truncated properties")?;
    let text = |bytes: Bytes| String::from_utf8(bytes.to_vec()).map_err(|_| "a property is not UTF-8");
    let mut props = MessageProps::default();
    while r.at < end {
        match r.byte().ok_or("truncated properties")? {
            PFI => props.payload_format_indicator = Some(r.byte().ok_or("truncated property")?),
            EXPIRY => {
                props.expires_ms = Some(base.wrapping_add(unzigzag(r.varint().ok_or("truncated property")?)))
            }
            CONTENT_TYPE => props.content_type = Some(text(r.bytes().ok_or("truncated property")?)?),
            RESPONSE_TOPIC => props.response_topic = Some(text(r.bytes().ok_or("truncated property")?)?),
            CORRELATION => props.correlation_data = Some(r.bytes().ok_or("truncated property")?),
            USER_PROPERTY => {
                let name = text(r.bytes().ok_or("truncated property")?)?;
                let value = text(r.bytes().ok_or("truncated property")?)?;
                props.user_properties.push((name, value));
            }
            _ => return Err("unknown property"),
        }
    }
    if r.at != end {
        return Err("properties overrun their length");
    }
    Ok(props)
}

// Varints (LEB128) and zigzag deltas, shared by the packed rows and their properties.

pub(crate) fn zigzag(delta: u64) -> u64 {
    let v = delta as i64;
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> u64 {
    (v >> 1) ^ (v & 1).wrapping_neg()
}

pub(crate) fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a Bytes,
    pub(crate) at: usize,
}

impl Reader<'_> {
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A length-prefixed slice, sharing the row's buffer.
    pub(crate) fn bytes(&mut self) -> Option<Bytes> {
        let len = usize::try_from(self.varint()?).ok()?;
        let end = self.at.checked_add(len).filter(|&end| end <= self.buf.len())?;
        let out = self.buf.slice(self.at..end);
        self.at = end;
        Some(out)
    }
}

pub(super) fn db_err(path: &Path, e: impl Into<redb::Error>) -> BufferError {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => BufferError::Locked { path: path.to_owned() },
        error => BufferError::Database { path: path.to_owned(), error },
    }
}

/// The two I/O error kinds redb uses for a verdict on a file's contents: `InvalidData` ("Not a
/// redb database", redb's `StorageError::not_a_database`) and `UnexpectedEof` (a structure
/// reaching past the end of the file). Every other I/O error is about access or the device.
pub(crate) fn is_content_error(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof)
}

pub(super) fn meta_key(kind: &str, priority: usize) -> String {
    format!("{kind}.{priority}")
}

/// A buffer file opened only to be read, by a process that is not its writer: read-only, or
/// read-write when it had not been closed cleanly and redb had to repair it before reading
/// (redb's read-only open refuses such a file).
pub(crate) enum ReadDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}

impl ReadDb {
    pub(crate) fn begin_read(&self, path: &Path) -> Result<ReadTransaction, BufferError> {
        match self {
            ReadDb::ReadOnly(db) => db.begin_read(),
            ReadDb::Repaired(db) => db.begin_read(),
        }
        .map_err(|e| db_err(path, e))
    }
}
