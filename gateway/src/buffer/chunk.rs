//! Format 4's packed rows: many events of one priority in one value of `events`, so a
//! commit writes about one full page per 4 KiB of events instead of a half-full B-tree leaf
//! and a CBOR map per event (measured during a full upstream outage at 2k events/s with
//! 100-byte payloads: 3.3× the payload written with a row per event; README "Flash wear").
//!
//! # Invariants
//! - A row keyed `(p, k)` holds events of priority `p` only, in strictly increasing `seq`,
//!   every one ≥ `k` and below the next row's key. So the row holding `seq` is the last row
//!   keyed ≤ `(p, seq)`, and reading rows in key order reads events in FIFO order.
//! - A value is either a packed row (first byte [`PACKED_TAG`]) or a single event in the
//!   CBOR map of formats 1–3 (first byte a CBOR map header, 0xa0–0xbf). Old rows are read,
//!   sent and deleted as they are; a row that changes is written back packed.
//! - An event's MQTT 5 properties (format 7) are written only when it has some, behind the
//!   `HAS_PROPS` flag bit: an event without them is stored byte for byte as in format 6.
//! - What an event counts for in the `bytes.<p>` counters depends on the event alone
//!   ([`Record::stored_size`]) or, for an old row, on that row's length, so a delete takes
//!   away exactly what the insert added, whatever else shares its row.
//! - A transaction appends new events only to rows it started or changes anyway, never to a
//!   row already in the file: each commit's events start a new row, so a commit never writes
//!   the previous commit's last page again (measured during an outage, one page of ~27 a
//!   commit). Every row but each commit's last is full.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadableTable, Table};

use super::file::{
    BufferError, Key, Reader, Record, db_err, get_props, props_size, put_props, put_varint, stored_size,
    unzigzag, varint_len, zigzag,
};

/// The first byte of a packed row of formats 4–7, whose topics are written whole.
/// CBOR maps (formats 1–3) start with 0xa0–0xbf.
pub(crate) const PACKED_TAG: u8 = 0x04;
/// The first byte of a packed row of format 8, whose topics are written as a difference
/// from the previous event's ([`topic_delta`]). Rows written by formats 4–7 keep
/// [`PACKED_TAG`] and are read as they are; a row that changes is written back with this.
/// Format 10 rows keep this tag: only their flags differ ([`PAYLOAD_DELTA`], a bit no
/// format 8 row has), and the file's format version keeps releases that know 8 away.
pub(crate) const PACKED_TAG_8: u8 = 0x05;

/// The largest packed row: with redb's 4-byte leaf header, the value's 4-byte length and the
/// 9-byte key it fills one 4 KiB page exactly. A full row is alone in its leaf (two never
/// fit) and never spills into an 8 KiB allocation.
const ROW_MAX: usize = 4096 - 4 - 4 - 9;

const QOS_MASK: u8 = 0b11;
const HAS_EXPIRY: u8 = 0b100;
const TOPIC_REF: u8 = 0b1000;
/// Format 7: MQTT 5 properties follow the expiry ([`super::file::put_props`]). Only set for
/// an event that has them, so one without costs no byte more than in format 6.
const HAS_PROPS: u8 = 0b1_0000;
/// Format 8: the sequence number and the event id are each one above the previous
/// event's, and neither is written (the common case: 2 bytes saved per event).
const STEP_ONE: u8 = 0b10_0000;
/// Format 8: enqueued in the same millisecond as the previous event; no time written.
const SAME_MS: u8 = 0b100_0000;
/// Format 10: the payload is written as the prefix and suffix it shares with the previous
/// event's payload and the bytes in between ([`shared_ends`]), set only where that is
/// shorter than the whole payload. Readings of one kind of sensor share their JSON keys'
/// opening (`{"device":"site-7-0`: 23 of ~127 bytes in the outage bench), so a payload that
/// shares nothing costs no byte more than in format 8.
const PAYLOAD_DELTA: u8 = 0b1000_0000;

/// How `next` differs from `prev`: the lengths of their common prefix and, in what is left
/// of both, their common suffix. Sensors' topics differ only in a device id
/// (`sensors/<id>/temp`), so the middle is a few bytes instead of the whole topic —
/// measured during an outage, the topic was ~20 % of a packed event.
fn shared_ends(prev: &[u8], next: &[u8]) -> (usize, usize) {
    let prefix = prev.iter().zip(next).take_while(|(x, y)| x == y).count();
    let suffix =
        prev[prefix..].iter().rev().zip(next[prefix..].iter().rev()).take_while(|(x, y)| x == y).count();
    (prefix, suffix)
}

fn topic_delta(prev: &str, topic: &str) -> (usize, usize) {
    shared_ends(prev.as_bytes(), topic.as_bytes())
}

/// How `payload` is written after `prev` (the previous event's payload, `None` for a row's
/// first event): as a difference when that is shorter, with the lengths of the shared
/// prefix and suffix, and the bytes it takes.
fn payload_delta(prev: Option<&[u8]>, payload: &[u8]) -> (Option<(usize, usize)>, usize) {
    let whole = varint_len(payload.len() as u64) + payload.len();
    let Some(prev) = prev else { return (None, whole) };
    let (prefix, suffix) = shared_ends(prev, payload);
    let middle = payload.len() - prefix - suffix;
    let delta = varint_len(prefix as u64) + varint_len(suffix as u64) + varint_len(middle as u64) + middle;
    if delta < whole { (Some((prefix, suffix)), delta) } else { (None, whole) }
}

/// The bytes a topic written as a difference takes: prefix, suffix and middle's length,
/// then the middle.
fn topic_delta_len(prev: &str, topic: &str) -> usize {
    let (prefix, suffix) = topic_delta(prev, topic);
    let middle = topic.len() - prefix - suffix;
    varint_len(prefix as u64) + varint_len(suffix as u64) + varint_len(middle as u64) + middle
}

/// The bytes of an event's sequence number, event id and time deltas from the previous
/// event (`seq`, `id`, `at`), and the flag bits that stand in for them.
fn step_flags(record: &Record, first: bool, (seq, id, at): (u64, u64, u64)) -> (u8, usize) {
    let mut flags = 0;
    let mut len = 0;
    if !first && record.seq.wrapping_sub(seq) == 1 && record.event_id.wrapping_sub(id) == 1 {
        flags |= STEP_ONE;
    } else {
        len += varint_len(record.seq - seq) + varint_len(zigzag(record.event_id.wrapping_sub(id)));
    }
    if !first && record.enqueued_ms == at {
        flags |= SAME_MS;
    } else {
        len += varint_len(zigzag(record.enqueued_ms.wrapping_sub(at)));
    }
    (flags, len)
}

/// The events of one row, and what they counted for when the row was read.
#[derive(Debug, Default)]
pub(crate) struct Row {
    pub records: Vec<Record>,
    /// `(events, bytes)` as counted in `meta`, when the row was read from the file.
    counted: (u64, u64),
    /// The packed size of `records` and where each topic first appears; worked out when an
    /// append needs it, forgotten when events are removed or inserted in between.
    layout: Option<Layout>,
    changed: bool,
    /// Read from the file, not started by this transaction.
    stored: bool,
}

#[derive(Debug)]
struct Layout {
    size: usize,
    topics: HashMap<String, usize>,
}

impl Row {
    fn new(records: Vec<Record>, counted: (u64, u64)) -> Row {
        Row { records, counted, layout: None, changed: false, stored: false }
    }

    fn layout(&mut self, key_seq: u64) -> &mut Layout {
        let records = &self.records;
        self.layout.get_or_insert_with(|| {
            let mut topics = HashMap::new();
            for (i, r) in records.iter().enumerate() {
                topics.entry(r.topic.clone()).or_insert(i);
            }
            Layout { size: encode(key_seq, records).len(), topics }
        })
    }

    /// Appends `record` (its `seq` above every event's here) if the row stays within
    /// [`ROW_MAX`]; gives it back otherwise.
    fn try_append(&mut self, key_seq: u64, record: Record) -> Result<(), Record> {
        let Some(last) = self.records.last() else { return Err(record) };
        let (_, steps) = step_flags(&record, false, (last.seq, last.event_id, last.enqueued_ms));
        let n = self.records.len();
        let delta = topic_delta_len(&last.topic, &record.topic);
        let (_, payload) = payload_delta(Some(&last.payload), &record.payload);
        let layout = self.layout(key_seq);
        let topic = match layout.topics.get(&record.topic) {
            Some(&i) => varint_len(i as u64),
            None => delta,
        };
        let size = layout.size + varint_len(n as u64 + 1) - varint_len(n as u64)
            + steps
            + 1
            + record.expires_ms.map_or(0, |e| varint_len(zigzag(e.wrapping_sub(record.enqueued_ms))))
            + props_size(&record)
            + topic
            + payload;
        if size > ROW_MAX {
            return Err(record);
        }
        layout.size = size;
        layout.topics.entry(record.topic.clone()).or_insert(n);
        self.records.push(record);
        self.changed = true;
        Ok(())
    }

    /// Inserts (or replaces) an event anywhere in the row, whatever its size.
    fn insert(&mut self, record: Record) {
        self.changed = true;
        self.layout = None;
        match self.records.binary_search_by_key(&record.seq, |r| r.seq) {
            Ok(i) => self.records[i] = record,
            Err(i) => self.records.insert(i, record),
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Record> {
        let i = self.records.binary_search_by_key(&seq, |r| r.seq).ok()?;
        self.changed = true;
        self.layout = None;
        Some(self.records.remove(i))
    }

    fn contains_or_precedes(&self, seq: u64) -> bool {
        self.records.last().is_some_and(|last| seq <= last.seq)
    }

    /// What this row counts for now: an unchanged old row keeps its count, anything written
    /// back is packed.
    fn counted_now(&self) -> (u64, u64) {
        if !self.changed {
            return self.counted;
        }
        (self.records.len() as u64, self.records.iter().map(Record::stored_size).sum())
    }
}

/// What one record of a row counts for in `bytes.<p>`: see the module invariants.
pub(crate) fn counted_sizes(value: &[u8], records: &[Record]) -> Vec<u64> {
    if is_packed(value) {
        records.iter().map(Record::stored_size).collect()
    } else {
        vec![stored_size(value.len()); records.len()]
    }
}

fn is_packed(value: &[u8]) -> bool {
    matches!(value.first(), Some(&PACKED_TAG | &PACKED_TAG_8))
}

/// How many events a stored value holds, from its header alone (`None`: no readable count).
pub(crate) fn count(value: &[u8]) -> Option<u64> {
    if !is_packed(value) {
        return Some(1);
    }
    let buf = Bytes::copy_from_slice(&value[..value.len().min(11)]);
    Reader { buf: &buf, at: 1 }.varint()
}

/// The events of one stored value, in `seq` order: a packed row, or one old CBOR record.
pub(crate) fn decode(key: Key, value: &[u8]) -> Result<Vec<Record>, BufferError> {
    if !is_packed(value) {
        return Ok(vec![Record::decode(key, value)?]);
    }
    let bad = |message: &str| BufferError::Record { key, message: format!("packed row: {message}") };
    let deltas = value[0] == PACKED_TAG_8;
    let buf = Bytes::copy_from_slice(value);
    let mut r = Reader { buf: &buf, at: 1 };
    let n = r.varint().ok_or_else(|| bad("no count"))?;
    // Each event takes at least 6 bytes (3 in format 8: flags, a topic reference and an
    // empty payload's length): an absurd count is corruption, not an allocation.
    if n > value.len() as u64 / if deltas { 3 } else { 6 } {
        return Err(bad("count larger than the row"));
    }
    let mut out: Vec<Record> = Vec::with_capacity(n as usize);
    let (mut seq, mut id, mut at) = (key.1, 0u64, 0u64);
    for i in 0..n as usize {
        // Format 8 moved the flags first, so that they can stand in for the deltas.
        let mut flags = if deltas { r.byte().ok_or_else(|| bad("truncated flags"))? } else { 0 };
        if i == 0 && flags & (STEP_ONE | SAME_MS | PAYLOAD_DELTA) != 0 {
            return Err(bad("the first event refers to a previous one"));
        }
        let (seq_step, id_step) = if flags & STEP_ONE != 0 {
            (1, 1)
        } else {
            let step = r.varint().ok_or_else(|| bad("truncated sequence number"))?;
            (step, unzigzag(r.varint().ok_or_else(|| bad("truncated event id"))?))
        };
        if i > 0 && seq_step == 0 {
            return Err(bad("sequence numbers not increasing"));
        }
        seq = seq.checked_add(seq_step).ok_or_else(|| bad("sequence number overflows"))?;
        id = id.wrapping_add(id_step);
        if flags & SAME_MS == 0 {
            at = at.wrapping_add(unzigzag(r.varint().ok_or_else(|| bad("truncated enqueue time"))?));
        }
        if !deltas {
            flags = r.byte().ok_or_else(|| bad("truncated flags"))?;
            if flags & (STEP_ONE | SAME_MS | PAYLOAD_DELTA) != 0 {
                return Err(bad("format 8 flags in an older row"));
            }
        }
        let expires_ms = if flags & HAS_EXPIRY != 0 {
            Some(at.wrapping_add(unzigzag(r.varint().ok_or_else(|| bad("truncated expiry"))?)))
        } else {
            None
        };
        let props =
            if flags & HAS_PROPS != 0 { Some(Arc::new(get_props(&mut r, at).map_err(&bad)?)) } else { None };
        let topic = if flags & TOPIC_REF != 0 {
            let j = r.varint().ok_or_else(|| bad("truncated topic reference"))?;
            match usize::try_from(j).ok().filter(|&j| j < i) {
                Some(j) => out[j].topic.clone(),
                None => return Err(bad("topic reference to a later event")),
            }
        } else if deltas {
            let prefix = r.varint().ok_or_else(|| bad("truncated topic prefix"))?;
            let suffix = r.varint().ok_or_else(|| bad("truncated topic suffix"))?;
            let middle = r.bytes().ok_or_else(|| bad("truncated topic"))?;
            let prev = out.last().map_or(&[][..], |p| p.topic.as_bytes());
            let (prefix, suffix) = match (usize::try_from(prefix), usize::try_from(suffix)) {
                (Ok(a), Ok(b)) if a.checked_add(b).is_some_and(|n| n <= prev.len()) => (a, b),
                _ => return Err(bad("topic shares more than the previous topic holds")),
            };
            let mut topic = Vec::with_capacity(prefix + middle.len() + suffix);
            topic.extend_from_slice(&prev[..prefix]);
            topic.extend_from_slice(&middle);
            topic.extend_from_slice(&prev[prev.len() - suffix..]);
            String::from_utf8(topic).map_err(|_| bad("topic is not UTF-8"))?
        } else {
            let bytes = r.bytes().ok_or_else(|| bad("truncated topic"))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| bad("topic is not UTF-8"))?
        };
        let payload = if flags & PAYLOAD_DELTA != 0 {
            let prefix = r.varint().ok_or_else(|| bad("truncated payload prefix"))?;
            let suffix = r.varint().ok_or_else(|| bad("truncated payload suffix"))?;
            let middle = r.bytes().ok_or_else(|| bad("truncated payload"))?;
            let prev = out.last().map_or(&[][..], |p| &p.payload[..]);
            let (prefix, suffix) = match (usize::try_from(prefix), usize::try_from(suffix)) {
                (Ok(a), Ok(b)) if a.checked_add(b).is_some_and(|n| n <= prev.len()) => (a, b),
                _ => return Err(bad("payload shares more than the previous payload holds")),
            };
            let mut payload = Vec::with_capacity(prefix + middle.len() + suffix);
            payload.extend_from_slice(&prev[..prefix]);
            payload.extend_from_slice(&middle);
            payload.extend_from_slice(&prev[prev.len() - suffix..]);
            Bytes::from(payload)
        } else {
            r.bytes().ok_or_else(|| bad("truncated payload"))?
        };
        out.push(Record {
            priority: key.0,
            seq,
            event_id: id,
            enqueued_ms: at,
            expires_ms,
            topic,
            qos: flags & QOS_MASK,
            payload,
            props,
        });
    }
    if r.at != value.len() {
        return Err(bad("bytes after the last event"));
    }
    Ok(out)
}

/// The packed value of `records` (sorted by `seq`, all ≥ `key_seq`), in format 10 (format
/// 8's row with payloads as differences where shorter).
pub(crate) fn encode(key_seq: u64, records: &[Record]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.topic.len() + r.payload.len() + 16).sum();
    let mut out = Vec::with_capacity(size + 8);
    out.push(PACKED_TAG_8);
    put_varint(&mut out, records.len() as u64);
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let (mut seq, mut id, mut at) = (key_seq, 0u64, 0u64);
    let mut prev_topic = "";
    let mut prev_payload: Option<&[u8]> = None;
    for (i, record) in records.iter().enumerate() {
        let (mut flags, _) = step_flags(record, i == 0, (seq, id, at));
        let earlier = first_of.get(record.topic.as_str()).copied();
        let (payload_shares, _) = payload_delta(prev_payload, &record.payload);
        if payload_shares.is_some() {
            flags |= PAYLOAD_DELTA;
        }
        flags |= record.qos & QOS_MASK;
        if record.expires_ms.is_some() {
            flags |= HAS_EXPIRY;
        }
        if earlier.is_some() {
            flags |= TOPIC_REF;
        }
        if record.props.is_some() {
            flags |= HAS_PROPS;
        }
        out.push(flags);
        if flags & STEP_ONE == 0 {
            put_varint(&mut out, record.seq - seq);
            put_varint(&mut out, zigzag(record.event_id.wrapping_sub(id)));
        }
        if flags & SAME_MS == 0 {
            put_varint(&mut out, zigzag(record.enqueued_ms.wrapping_sub(at)));
        }
        (seq, id, at) = (record.seq, record.event_id, record.enqueued_ms);
        if let Some(expires) = record.expires_ms {
            put_varint(&mut out, zigzag(expires.wrapping_sub(at)));
        }
        if let Some(props) = &record.props {
            put_props(&mut out, props, at);
        }
        match earlier {
            Some(j) => put_varint(&mut out, j as u64),
            None => {
                first_of.insert(&record.topic, i);
                let (prefix, suffix) = topic_delta(prev_topic, &record.topic);
                put_varint(&mut out, prefix as u64);
                put_varint(&mut out, suffix as u64);
                let middle = &record.topic.as_bytes()[prefix..record.topic.len() - suffix];
                put_varint(&mut out, middle.len() as u64);
                out.extend_from_slice(middle);
            }
        }
        prev_topic = &record.topic;
        match payload_shares {
            Some((prefix, suffix)) => {
                put_varint(&mut out, prefix as u64);
                put_varint(&mut out, suffix as u64);
                let middle = &record.payload[prefix..record.payload.len() - suffix];
                put_varint(&mut out, middle.len() as u64);
                out.extend_from_slice(middle);
            }
            None => {
                put_varint(&mut out, record.payload.len() as u64);
                out.extend_from_slice(&record.payload);
            }
        }
        prev_payload = Some(&record.payload);
    }
    out
}

/// A row as formats 4–7 wrote it, for tests that read old files.
#[cfg(test)]
pub(crate) fn encode_v7(key_seq: u64, records: &[Record]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.topic.len() + r.payload.len() + 16).sum();
    let mut out = Vec::with_capacity(size + 8);
    out.push(PACKED_TAG);
    put_varint(&mut out, records.len() as u64);
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let (mut seq, mut id, mut at) = (key_seq, 0u64, 0u64);
    for (i, record) in records.iter().enumerate() {
        put_varint(&mut out, record.seq - seq);
        seq = record.seq;
        put_varint(&mut out, zigzag(record.event_id.wrapping_sub(id)));
        id = record.event_id;
        put_varint(&mut out, zigzag(record.enqueued_ms.wrapping_sub(at)));
        at = record.enqueued_ms;
        let earlier = first_of.get(record.topic.as_str()).copied();
        let mut flags = record.qos & QOS_MASK;
        if record.expires_ms.is_some() {
            flags |= HAS_EXPIRY;
        }
        if earlier.is_some() {
            flags |= TOPIC_REF;
        }
        if record.props.is_some() {
            flags |= HAS_PROPS;
        }
        out.push(flags);
        if let Some(expires) = record.expires_ms {
            put_varint(&mut out, zigzag(expires.wrapping_sub(at)));
        }
        if let Some(props) = &record.props {
            put_props(&mut out, props, at);
        }
        match earlier {
            Some(j) => put_varint(&mut out, j as u64),
            None => {
                first_of.insert(&record.topic, i);
                put_varint(&mut out, record.topic.len() as u64);
                out.extend_from_slice(record.topic.as_bytes());
            }
        }
        put_varint(&mut out, record.payload.len() as u64);
        out.extend_from_slice(&record.payload);
    }
    out
}

/// The key of the row that holds (or would hold) `(p, seq)` in `table`: the last one keyed
/// ≤ it within priority `p`.
pub(crate) fn owner(
    table: &impl ReadableTable<Key, &'static [u8]>,
    (p, seq): Key,
) -> Result<Option<Key>, redb::StorageError> {
    Ok(table.range((p, 0)..=(p, seq))?.next_back().transpose()?.map(|(k, _)| k.value()))
}

/// Up to `limit` events of priority `p` with `seq >= from_seq`, in order.
pub(crate) fn read_lane(
    table: &impl ReadableTable<Key, &'static [u8]>,
    path: &std::path::Path,
    p: u8,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<Record>, BufferError> {
    let start = owner(table, (p, from_seq)).map_err(|e| db_err(path, e))?.map_or(from_seq, |k| k.1);
    let mut out = Vec::with_capacity(limit.min(4096));
    for entry in table.range((p, start)..=(p, u64::MAX)).map_err(|e| db_err(path, e))? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(|e| db_err(path, e))?;
        let room = limit - out.len();
        out.extend(decode(k.value(), v.value())?.into_iter().filter(|r| r.seq >= from_seq).take(room));
    }
    Ok(out)
}

/// Edits of one write transaction on `events`: rows are read once, changed in memory and
/// written back once ([`Editor::flush`]).
pub(crate) struct Editor<'a, 'txn> {
    table: &'a mut Table<'txn, Key, &'static [u8]>,
    path: &'a std::path::Path,
    rows: BTreeMap<Key, Row>,
}

/// What a flush changed in the counters: per priority `(events, bytes)` added and removed,
/// and rows added minus rows removed.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    pub lanes: Vec<(u8, u64, u64, u64, u64)>,
    pub rows: i64,
}

impl<'a, 'txn> Editor<'a, 'txn> {
    pub(crate) fn new(table: &'a mut Table<'txn, Key, &'static [u8]>, path: &'a std::path::Path) -> Self {
        Editor { table, path, rows: BTreeMap::new() }
    }

    /// The key of the row holding `(p, seq)`, among rows in the file and rows made here.
    fn owner(&self, (p, seq): Key) -> Result<Option<Key>, BufferError> {
        let here = self.rows.range((p, 0)..=(p, seq)).next_back();
        // A row in hand whose events reach `seq` owns it: no row key lies between.
        if let Some((key, row)) = here {
            if row.contains_or_precedes(seq) {
                return Ok(Some(*key));
            }
        }
        let stored = owner(&*self.table, (p, seq)).map_err(|e| db_err(self.path, e))?;
        Ok(here.map(|(k, _)| *k).max(stored))
    }

    /// The row `key`, read from the file the first time.
    fn row(&mut self, key: Key) -> Result<&mut Row, BufferError> {
        if !self.rows.contains_key(&key) {
            let row = match self.table.get(key).map_err(|e| db_err(self.path, e))? {
                Some(value) => {
                    let value = value.value();
                    let records = decode(key, value)?;
                    let counted = (records.len() as u64, counted_sizes(value, &records).iter().sum());
                    Row { stored: true, ..Row::new(records, counted) }
                }
                None => Row::new(Vec::new(), (0, 0)),
            };
            self.rows.insert(key, row);
        }
        Ok(self.rows.get_mut(&key).expect("inserted above"))
    }

    /// Adds (or replaces) an event: into the row that owns its `seq` when the event falls
    /// inside it, or when the row has room and was started (or is changed anyway) by this
    /// transaction; else as the first event of a new row.
    pub(crate) fn insert(&mut self, record: Record) -> Result<(), BufferError> {
        let key = record.key();
        let record = match self.owner(key)? {
            Some(owner) => {
                let row = self.row(owner)?;
                if row.contains_or_precedes(key.1) {
                    row.insert(record);
                    return Ok(());
                }
                // A row in the file that this transaction does not otherwise change is left as
                // it is: appending would write its page again (a previous commit's partly
                // filled last row, once per commit during an outage), while a new row that does
                // not fit beside it in its leaf goes into a page of its own and leaves that leaf
                // unwritten (redb's path for a key above all others). The price is a partly
                // filled row per commit on disk.
                if row.stored && !row.changed {
                    record
                } else {
                    match row.try_append(owner.1, record) {
                        Ok(()) => return Ok(()),
                        Err(record) => record,
                    }
                }
            }
            None => record,
        };
        let mut row = Row::new(Vec::new(), (0, 0));
        row.insert(record);
        self.rows.insert(key, row);
        Ok(())
    }

    /// Removes the event at `key`, if stored.
    pub(crate) fn remove(&mut self, key: Key) -> Result<Option<Record>, BufferError> {
        match self.owner(key)? {
            Some(owner) => Ok(self.row(owner)?.remove(key.1)),
            None => Ok(None),
        }
    }

    /// The first event of priority `p`, if any.
    pub(crate) fn first(&mut self, p: u8) -> Result<Option<Key>, BufferError> {
        let path = self.path;
        let mut stored = None;
        for entry in self.table.range((p, 0)..=(p, u64::MAX)).map_err(|e| db_err(path, e))? {
            let key = entry.map_err(|e| db_err(path, e))?.0.value();
            // A row emptied in this transaction is still in the file until the flush.
            if !self.rows.get(&key).is_some_and(|r| r.records.is_empty()) {
                stored = Some(key);
                break;
            }
        }
        let made =
            self.rows.range((p, 0)..=(p, u64::MAX)).find(|(_, r)| !r.records.is_empty()).map(|(k, _)| *k);
        let first_row = match (stored, made) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match first_row {
            Some(key) => Ok(self.row(key)?.records.first().map(Record::key)),
            None => Ok(None),
        }
    }

    /// What `key` counts for in `bytes.<p>`, if stored.
    pub(crate) fn counted_size(&mut self, key: Key) -> Result<Option<u64>, BufferError> {
        let Some(owner) = self.owner(key)? else { return Ok(None) };
        let row = self.row(owner)?;
        let Ok(i) = row.records.binary_search_by_key(&key.1, |r| r.seq) else { return Ok(None) };
        // An old row read from the file holds one event, counted by the row's length.
        if !row.changed && row.counted.0 == 1 {
            return Ok(Some(row.counted.1));
        }
        Ok(Some(row.records[i].stored_size()))
    }

    /// Writes every changed row back (an emptied one is removed) and says what the counters
    /// must add and take away.
    pub(crate) fn flush(&mut self) -> Result<Counted, BufferError> {
        let mut counted = Counted::default();
        for (key, row) in std::mem::take(&mut self.rows) {
            if !row.changed {
                continue;
            }
            let (before, after) = (row.counted, row.counted_now());
            let existed = before.0 > 0;
            if row.records.is_empty() {
                if existed {
                    self.table.remove(key).map_err(|e| db_err(self.path, e))?;
                    counted.rows -= 1;
                }
            } else {
                let value = encode(key.1, &row.records);
                self.table.insert(key, value.as_slice()).map_err(|e| db_err(self.path, e))?;
                if !existed {
                    counted.rows += 1;
                }
            }
            counted.lanes.push((key.0, after.0, after.1, before.0, before.1));
        }
        Ok(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MessageProps;

    fn record(seq: u64, topic: &str, payload: &[u8], expires_ms: Option<u64>) -> Record {
        Record {
            priority: 4,
            seq,
            event_id: (7 << 40) | seq,
            enqueued_ms: 1_700_000_000_000 + seq * 3,
            expires_ms,
            topic: topic.to_owned(),
            qos: (seq % 3) as u8,
            payload: Bytes::copy_from_slice(payload),
            props: None,
        }
    }

    #[test]
    fn a_packed_row_round_trips_and_repeats_topics_by_reference() {
        let records = vec![
            record(10, "site/a/temp", b"{\"t\":21.5}", None),
            record(11, "site/b/temp", &[0xff, 0, 1], Some(1_700_000_000_000)),
            record(15, "site/a/temp", b"", Some(u64::MAX)),
            record(16, "", b"x", None),
        ];
        let value = encode(9, &records);
        assert_eq!(decode((4, 9), &value).expect("decode"), records);
        let once = encode(9, &records[..2]);
        let mut repeated = records[..2].to_vec();
        repeated.push(record(12, "site/b/temp", b"", None));
        let twice = encode(9, &repeated);
        assert!(
            twice.len() - once.len() <= 6,
            "a repeated topic costs a reference: {} → {}",
            once.len(),
            twice.len()
        );
    }

    #[test]
    fn a_packed_event_costs_a_few_bytes_beyond_topic_and_payload() {
        let payload = [b'x'; 100];
        let records: Vec<Record> =
            (0..30).map(|i| record(100 + i, &format!("sensors/{i}/temp"), &payload, None)).collect();
        let value = encode(100, &records);
        let content: usize = records.iter().map(|r| r.topic.len() + r.payload.len()).sum();
        assert!(
            value.len() <= content + 30 * 8 + 16,
            "{} bytes for {content} of topics and payloads",
            value.len()
        );
    }

    #[test]
    fn an_append_is_sized_exactly_and_stops_at_one_page() {
        let mut row = Row::new(vec![record(100, "a/first", b"x", None)], (0, 0));
        let mut seq = 100;
        loop {
            seq += 1 + seq % 3;
            let topic = format!("site/{}/temp", seq % 5);
            let expires = (seq % 4 == 0).then_some(1_700_000_000_000 + seq * 1000);
            let payload = vec![b'y'; (seq % 150) as usize];
            let mut next = record(seq, &topic, &payload, expires);
            if seq % 5 == 0 {
                next.props = Some(Arc::new(all_props(next.enqueued_ms + 60_000)));
            }
            if row.try_append(99, next).is_err() {
                break;
            }
            let size = row.layout.as_ref().expect("layout").size;
            assert_eq!(size, encode(99, &row.records).len(), "after {} events", row.records.len());
        }
        let full = encode(99, &row.records).len();
        assert!(full <= ROW_MAX && full > ROW_MAX - 200, "{full}");
    }

    fn all_props(expires_ms: u64) -> MessageProps {
        MessageProps {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/7".into()),
            correlation_data: Some(Bytes::from_static(&[0, 0xff, 7])),
            user_properties: vec![
                ("site".into(), "a".into()),
                ("unit".into(), "°C".into()),
                ("site".into(), "b".into()),
            ],
            expires_ms: Some(expires_ms),
        }
    }

    #[test]
    fn properties_round_trip_beside_events_without_them() {
        let mut records = vec![
            record(10, "site/a/temp", b"21.5", None),
            record(11, "site/a/temp", b"21.6", Some(1_700_000_100_000)),
            record(12, "site/b/temp", b"", None),
            record(13, "site/a/temp", b"x", None),
        ];
        records[1].props = Some(Arc::new(all_props(1_700_000_060_000)));
        // A deadline before the enqueue time (a clock step) and a lone user property.
        records[2].props = Some(Arc::new(MessageProps {
            expires_ms: Some(5),
            user_properties: vec![("k".into(), String::new())],
            ..MessageProps::default()
        }));
        records[3].props = Some(Arc::new(MessageProps::default()));
        let value = encode(9, &records);
        assert_eq!(decode((4, 9), &value).expect("decode"), records);
        for r in &records {
            let alone = encode(r.seq, std::slice::from_ref(r));
            assert_eq!(decode((4, r.seq), &alone).expect("decode"), std::slice::from_ref(r));
        }
    }

    /// Format 7 added nothing to an event without properties: its bytes are format 6's,
    /// field by field, and format 8 still reads them and counts what they counted.
    #[test]
    fn a_format_7_event_without_properties_reads_as_before() {
        let r = record(10, "sensors/1/temp", b"{\"t\":21.5}", Some(1_700_000_060_030));
        let value = encode_v7(9, std::slice::from_ref(&r));
        assert_eq!(value[0], PACKED_TAG);
        let header = varint_len(1) // count
            + varint_len(1) // seq - key
            + varint_len(zigzag(r.event_id))
            + varint_len(zigzag(r.enqueued_ms))
            + 1 // flags
            + varint_len(zigzag(60_000)); // expiry
        let body = 1 + r.topic.len() + 1 + r.payload.len();
        assert_eq!(value.len(), 1 + header + body);
        assert_eq!(
            value[1
                + varint_len(1)
                + varint_len(1)
                + varint_len(zigzag(r.event_id))
                + varint_len(zigzag(r.enqueued_ms))],
            0b101,
            "flags: QoS 1, expiry, nothing else"
        );
        assert_eq!(decode((4, 9), &value).expect("decode"), std::slice::from_ref(&r));
        assert_eq!(count(&value), Some(1));
        assert_eq!(props_size(&r), 0);
        assert_eq!(r.stored_size(), (r.topic.len() + r.payload.len() + 16) as u64);
        assert_eq!(r.size(), (r.topic.len() + r.payload.len() + 48) as u64);
        let with = Record { props: Some(Arc::new(all_props(1))), ..r.clone() };
        let grown = encode(9, std::slice::from_ref(&with)).len() - encode(9, std::slice::from_ref(&r)).len();
        assert_eq!(grown, props_size(&with), "an event with properties pays for them exactly");
        assert_eq!(with.stored_size() - r.stored_size(), grown as u64);
    }

    /// Rows of formats 4–7 (whole topics, deltas before the flags) are read beside format 8's,
    /// with and without properties, and an append to one writes it back in format 8.
    #[test]
    fn format_7_rows_still_read_and_are_rewritten_as_format_8() {
        let mut records: Vec<Record> = (0..40)
            .map(|i| record(100 + i, &format!("sensors/sim-{:04}/temp", i % 9), b"{\"t\":1}", None))
            .collect();
        records[3].props = Some(Arc::new(all_props(1_700_000_060_000)));
        records[5].expires_ms = Some(1_700_000_000_000);
        let old = encode_v7(100, &records);
        assert_eq!(decode((4, 100), &old).expect("decode"), records);
        let new = encode(100, &records);
        assert_eq!(new[0], PACKED_TAG_8);
        assert_eq!(decode((4, 100), &new).expect("decode"), records);
        assert!(new.len() < old.len(), "format 8 {} bytes, format 7 {}", new.len(), old.len());
        let mut row = Row::new(decode((4, 100), &old).expect("decode"), (40, 0));
        row.try_append(100, record(140, "sensors/sim-0100/temp", b"", None)).expect("room");
        let value = encode(100, &row.records);
        assert_eq!(value.len(), row.layout.as_ref().expect("layout").size);
        assert_eq!(decode((4, 100), &value).expect("decode"), row.records);
    }

    /// Issue #18's outage: 100 sensors publishing in turn. A topic costs its differing middle
    /// plus three bytes, and consecutive sequence numbers, ids and times cost nothing.
    #[test]
    fn sensor_topics_cost_their_difference_from_the_previous_one() {
        let payload = [b'x'; 100];
        let records: Vec<Record> = (0..30)
            .map(|i| Record {
                event_id: (7 << 40) | (500 + i),
                enqueued_ms: 1_700_000_000_000 + i / 4,
                qos: 1,
                ..record(
                    500 + i,
                    &format!("sensors/wan-outage-{:04}/temp", 1 + (i * 37) % 100),
                    &payload,
                    None,
                )
            })
            .collect();
        let value = encode(500, &records);
        let payloads: usize = records.iter().map(|r| r.payload.len()).sum();
        // Per event: flags, a time delta for one in four, prefix, suffix, middle's length,
        // a middle of at most 4 digits and the payload's length.
        assert!(
            value.len() <= payloads + records[0].topic.len() + 30 * 10 + 16,
            "{} bytes for {payloads} of payloads",
            value.len()
        );
        assert_eq!(decode((4, 500), &value).expect("decode"), records);
    }

    /// The smallest format-8 event (consecutive, same millisecond, repeated topic, empty
    /// payload) is 3 bytes, and a row of them is no corruption.
    #[test]
    fn a_row_of_the_smallest_events_reads_back() {
        let records: Vec<Record> = (1..=50)
            .map(|seq| Record { event_id: seq, enqueued_ms: 20, qos: 1, ..record(seq, "t/9", b"", None) })
            .collect();
        let value = encode(1, &records);
        assert!(value.len() < 50 * 4, "{} bytes", value.len());
        assert_eq!(decode((4, 1), &value).expect("decode"), records);
    }

    /// Issue #18: readings of one kind share their opening (and often their end), so a
    /// payload costs its difference from the previous one; the same row in format 8 wrote
    /// every payload whole.
    #[test]
    fn sensor_payloads_cost_their_difference_from_the_previous_one() {
        let records: Vec<Record> = (0..30u64)
            .map(|i| {
                let payload = format!(
                    "{{\"device\":\"site-7-{:04}\",\"seq\":{},\"ts_ms\":{},\"metric\":\"temp\",\"value\":{}}}",
                    (i * 37) % 100,
                    1000 + i,
                    1_796_397_212_785 + i * 3,
                    18.0 + (i as f64) * 0.37
                );
                record(100 + i, &format!("sensors/site-7-{:04}/temp", (i * 37) % 100), payload.as_bytes(), None)
            })
            .collect();
        let value = encode(100, &records);
        assert_eq!(decode((4, 100), &value).expect("decode"), records);
        let whole: usize = records.iter().map(|r| r.payload.len() + 1).sum();
        let flagged = records.iter().skip(1).count();
        let mut row = Row::new(records[..1].to_vec(), (1, 0));
        for r in &records[1..] {
            row.try_append(99, r.clone()).expect("fits");
        }
        assert_eq!(row.layout(100).size, value.len());
        // `{"device":"site-7-00` is shared with the previous reading: 20 bytes less each.
        let topics_and_steps = encode_whole_payloads_len(&records) - whole;
        assert!(
            value.len() + 15 * flagged <= topics_and_steps + whole,
            "{} bytes against {} with whole payloads",
            value.len(),
            topics_and_steps + whole
        );
    }

    /// The length of `records` in a row whose payloads are written whole, as format 8 did.
    fn encode_whole_payloads_len(records: &[Record]) -> usize {
        // Payloads that share nothing with their neighbours are written whole; the byte
        // count does not depend on their contents, only on their lengths.
        let unlike: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let fill = if i % 2 == 0 { b'a' } else { b'b' };
                Record { payload: Bytes::from(vec![fill; r.payload.len()]), ..r.clone() }
            })
            .collect();
        encode(100, &unlike).len()
    }

    #[test]
    fn payload_deltas_never_overlap_and_split_any_byte() {
        for (prev, next) in [
            (&b"aXa"[..], &b"aa"[..]),
            (b"aa", b"aXa"),
            (b"", b"abc"),
            (b"abcdef", b""),
            (b"abcdef", b"abcdef"),
            (b"abcdef", b"abc"),
            (b"abc", b"abcdef"),
            (b"\xff\x00\xff", b"\xff\xff"),
            (b"{\"k\":1}", b"{\"k\":12}"),
        ] {
            let (shares, _) = payload_delta(Some(prev), next);
            if let Some((prefix, suffix)) = shares {
                assert!(prefix + suffix <= prev.len().min(next.len()), "{prev:?} → {next:?}");
            }
            let records = vec![record(1, "t", prev, None), record(2, "t", next, None)];
            let value = encode(1, &records);
            assert_eq!(decode((4, 1), &value).expect("decode"), records, "{prev:?} → {next:?}");
            let mut row = Row::new(records[..1].to_vec(), (1, 0));
            row.try_append(1, records[1].clone()).expect("fits");
            assert_eq!(row.layout(1).size, value.len(), "{prev:?} → {next:?}");
        }
    }

    /// A payload difference that claims more than the previous payload holds, or one on a
    /// row's first event or in a format 4–7 row, is corruption, not a panic.
    #[test]
    fn damaged_payload_deltas_are_errors() {
        let records = vec![record(1, "t", b"abcdefgh", None), record(2, "t", b"abcdefXY", None)];
        let value = encode(1, &records);
        // The second event: flags, topic reference, then the prefix (6) and suffix (0).
        let at = value.len() - 2 - 1 - 2;
        assert_eq!((value[at - 1], value[at], value[at + 1]), (0, 6, 0), "{value:?}");
        let mut too_long = value.clone();
        too_long[at] = 9;
        assert!(decode((4, 1), &too_long).is_err());
        let mut first = encode(1, &records[..1]);
        first[2] |= PAYLOAD_DELTA;
        assert!(decode((4, 1), &first).is_err());
        let mut old = encode_v7(1, &records);
        let flags_at = old.iter().position(|&b| b == 1).expect("the first event's flags");
        old[flags_at] |= PAYLOAD_DELTA;
        assert!(decode((4, 1), &old).is_err());
    }

    #[test]
    fn topic_deltas_never_overlap_and_split_any_byte() {
        for (prev, topic) in [
            ("aXa", "aa"),
            ("aa", "aXa"),
            ("", "abc"),
            ("abc", ""),
            ("abc", "abc"),
            ("é/x", "è/x"),
            ("a/b", "a/b/b"),
        ] {
            let (prefix, suffix) = topic_delta(prev, topic);
            assert!(prefix + suffix <= prev.len().min(topic.len()), "{prev:?} → {topic:?}");
            let records = vec![record(1, prev, b"", None), record(2, topic, b"", None)];
            assert_eq!(
                decode((4, 1), &encode(1, &records)).expect("decode"),
                records,
                "{prev:?} → {topic:?}"
            );
        }
    }

    #[test]
    fn damaged_properties_are_errors_not_panics() {
        let mut r = record(1, "a", b"p", None);
        r.props = Some(Arc::new(all_props(1_700_000_000_100)));
        let value = encode(1, std::slice::from_ref(&r));
        for cut in 1..value.len() {
            assert!(decode((4, 1), &value[..cut]).is_err(), "cut at {cut}");
        }
        // An unknown property identifier: the first one (payload format 0x01, its value 1,
        // then the expiry's 0x02) becomes 0x7f.
        let at =
            value.windows(3).position(|w| w == [0x01, 0x01, 0x02]).expect("the payload format indicator");
        let mut unknown = value.clone();
        unknown[at] = 0x7f;
        assert!(decode((4, 1), &unknown).is_err());
    }

    proptest::proptest! {
        /// Any properties, on any event, come back as they went in.
        #[test]
        fn any_properties_round_trip(
            pfi in proptest::option::of(0u8..2),
            expires in proptest::option::of(proptest::num::u64::ANY),
            content_type in proptest::option::of(".{0,20}"),
            response_topic in proptest::option::of("[a-z/]{0,20}"),
            correlation in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)),
            user in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..5),
            with_props: bool,
            expires_ms in proptest::option::of(proptest::num::u64::ANY),
        ) {
            let mut records = vec![record(3, "t", b"before", None), record(4, "t", b"x", expires_ms)];
            if with_props {
                records[1].props = Some(Arc::new(MessageProps {
                    payload_format_indicator: pfi,
                    content_type,
                    response_topic,
                    correlation_data: correlation.map(Bytes::from),
                    user_properties: user,
                    expires_ms: expires,
                }));
            }
            let value = encode(2, &records);
            proptest::prop_assert_eq!(decode((4, 2), &value).expect("decode"), records);
        }

        /// Any row, in format 10 and in format 7, reads back as it went in, and an append
        /// predicts the size of the row it makes. Payloads are random bytes or pieces that
        /// often share a prefix or suffix with the previous one.
        #[test]
        fn any_row_round_trips(
            events in proptest::collection::vec(
                (0u64..3, proptest::num::u64::ANY, 0u64..4, proptest::sample::select(vec![0u64, 1, 2]),
                 "(a|b|é|/|x1|x2){0,6}",
                 proptest::prop_oneof![
                     proptest::collection::vec(proptest::num::u8::ANY, 0..8),
                     proptest::strategy::Strategy::prop_map("(\\{k|ab|1|2|\\}){0,6}", String::into_bytes),
                 ]),
                1..40,
            ),
        ) {
            let (mut seq, mut id, mut at) = (10u64, 1u64 << 40, 1_700_000_000_000u64);
            let mut records = Vec::new();
            for (i, (seq_step, any_id, at_step, id_kind, topic, payload)) in events.into_iter().enumerate() {
                seq += if i == 0 { 0 } else { seq_step.max(1) };
                id = match id_kind { 0 => id.wrapping_add(1), 1 => any_id, _ => id };
                at += at_step;
                records.push(Record { event_id: id, enqueued_ms: at, qos: 1, ..record(seq, &topic, &payload, None) });
            }
            let value = encode(10, &records);
            proptest::prop_assert_eq!(&decode((4, 10), &value).expect("decode"), &records);
            proptest::prop_assert_eq!(&decode((4, 10), &encode_v7(10, &records)).expect("decode"), &records);
            let mut row = Row::new(records[..1].to_vec(), (1, 0));
            for r in &records[1..] {
                row.try_append(10, r.clone()).expect("small rows fit");
            }
            proptest::prop_assert_eq!(row.layout(10).size, value.len());
        }
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let records = vec![record(1, "a", b"payload", Some(5)), record(2, "a", b"p", None)];
        let value = encode(1, &records);
        for cut in 1..value.len() {
            assert!(decode((4, 1), &value[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode((4, 1), &longer).is_err());
        // A second event with the same sequence number.
        let mut same = vec![PACKED_TAG_8, 2];
        same.extend_from_slice(&encode(1, &records[..1])[2..]);
        same.extend_from_slice(&encode(1, &records[..1])[2..]);
        assert!(decode((4, 1), &same).is_err());
        assert!(decode((4, 1), &[PACKED_TAG, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode((4, 1), &[PACKED_TAG_8, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let old = encode_v7(1, &records);
        for cut in 1..old.len() {
            assert!(decode((4, 1), &old[..cut]).is_err(), "format 7, cut at {cut}");
        }
        // A first event that claims to follow one, and a topic sharing more than the
        // previous topic has.
        let mut first = encode(1, &records[..1]);
        first[2] |= STEP_ONE;
        assert!(decode((4, 1), &first).is_err());
        let two = vec![record(1, "ab", b"", None), record(2, "abc", b"", None)];
        let mut long = encode(1, &two);
        let at = long.len() - 1 /* payload length */ - 1 /* middle */ - 1 /* its length */ - 2;
        assert_eq!(&long[at..at + 2], &[2, 0], "prefix 2, suffix 0");
        long[at] = 3;
        assert!(decode((4, 1), &long).is_err());
    }
}
