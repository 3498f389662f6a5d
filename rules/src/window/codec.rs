//! The window state's own encoding (format 2): CBOR written and read by hand, positional.
//!
//! Format 1 wrote every group, instance and aggregate state through serde as CBOR maps with
//! their field names, and the full snapshot cloned every group first; at 10,000 groups
//! changing every second that was most of the checkpoints' CPU. Format 2 writes the same
//! state as CBOR arrays, each field at a fixed place, straight from the live state (nothing
//! cloned), and reads it back the same way. It is still CBOR (any CBOR tool shows it),
//! which also lets it carry, unchanged, the parts that stay on serde: the rule's plan,
//! report-by-exception state and the QoS 2 markers.
//!
//! A record of either format says which it is by its first byte: format 1 records are CBOR
//! maps (`{"version": 1, …}`), format 2 records are arrays whose first item is the version.
//! Format 1 is read, never written.
//!
//! **Invariants:**
//! - Reading never panics and never allocates more than the input could describe: lengths
//!   are checked against the bytes left before anything is reserved, and nesting is bounded
//!   ([`MAX_DEPTH`]).
//! - `Value::Null` (SQL's NULL) and `Value::JsonNull` (a `null` from decoded data) stay
//!   apart: NULL is written as CBOR `undefined`, a JSON null as CBOR `null` (format 1 wrote
//!   both as `null`, and read both back as JSON null).

use serde::Serialize;
use serde::de::DeserializeOwned;

use std::collections::VecDeque;

use super::agg::AggState;
use super::{Closed, Due, Group, GroupState, Instance, Kept, SnapshotError, WindowCounters, Windows};
use crate::value::Value;

/// The format this build writes.
pub(super) const FORMAT: u64 = 2;

/// Nesting of values read at most (ciborium's limit for format 1, and the payload
/// decoders').
const MAX_DEPTH: usize = 256;

const UINT: u8 = 0;
const NINT: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;
const SIMPLE: u8 = 7;

const FALSE: u8 = 0xf4;
const TRUE: u8 = 0xf5;
const NULL: u8 = 0xf6;
const UNDEFINED: u8 = 0xf7;
const FLOAT64: u8 = 0xfb;

/// Whether `bytes` is a format 1 record (a CBOR map) rather than a format 2 one.
pub(crate) fn is_format_1(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| b >> 5 == MAP)
}

/// Appends CBOR items to a buffer.
pub(crate) struct Writer {
    pub(crate) bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Writer {
        Writer { bytes: Vec::new() }
    }

    /// A writer whose buffer starts with room for `capacity` bytes: a caller that knows
    /// about how large the record will be (the last one's size) spares the buffer's
    /// regrowth, a copy of everything written so far each time it doubles.
    pub(crate) fn with_capacity(capacity: usize) -> Writer {
        Writer { bytes: Vec::with_capacity(capacity) }
    }

    /// Starts an array whose length is not known yet: its head is written in the 5-byte
    /// form (lengths up to `u32::MAX`; CBOR allows a longer form than needed, and
    /// [`Reader`] reads any), to be filled in by [`Writer::close_array`] with the position
    /// returned. Spares a caller a count before it writes the items.
    pub(crate) fn open_array(&mut self) -> usize {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[(ARRAY << 5) | 26, 0, 0, 0, 0]);
        at
    }

    /// Sets the length of the array [`Writer::open_array`] started at `at`. A length
    /// beyond `u32::MAX` (more items than memory holds groups) is written as `u32::MAX`.
    pub(crate) fn close_array(&mut self, at: usize, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
        if let Some(head) = self.bytes.get_mut(at + 1..at + 5) {
            head.copy_from_slice(&len);
        }
    }

    fn head(&mut self, major: u8, n: u64) {
        let major = major << 5;
        if n < 24 {
            self.bytes.push(major | n as u8);
        } else if n <= u64::from(u8::MAX) {
            self.bytes.extend_from_slice(&[major | 24, n as u8]);
        } else if n <= u64::from(u16::MAX) {
            self.bytes.push(major | 25);
            self.bytes.extend_from_slice(&(n as u16).to_be_bytes());
        } else if n <= u64::from(u32::MAX) {
            self.bytes.push(major | 26);
            self.bytes.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            self.bytes.push(major | 27);
            self.bytes.extend_from_slice(&n.to_be_bytes());
        }
    }

    pub(crate) fn array(&mut self, len: usize) {
        self.head(ARRAY, len as u64);
    }

    pub(crate) fn uint(&mut self, n: u64) {
        self.head(UINT, n);
    }

    pub(crate) fn int(&mut self, i: i64) {
        if i >= 0 {
            self.head(UINT, i as u64);
        } else {
            // −1 − n, as CBOR writes negative integers.
            self.head(NINT, !(i as u64));
        }
    }

    pub(crate) fn float(&mut self, f: f64) {
        self.bytes.push(FLOAT64);
        self.bytes.extend_from_slice(&f.to_bits().to_be_bytes());
    }

    pub(crate) fn bool(&mut self, b: bool) {
        self.bytes.push(if b { TRUE } else { FALSE });
    }

    pub(crate) fn null(&mut self) {
        self.bytes.push(NULL);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.head(BYTES, b.len() as u64);
        self.bytes.extend_from_slice(b);
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.head(TEXT, s.len() as u64);
        self.bytes.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.bytes.push(UNDEFINED),
            Value::JsonNull => self.bytes.push(NULL),
            Value::Bool(b) => self.bool(*b),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => self.float(*f),
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => self.bytes(b),
            Value::Array(items) => self.values(items),
            Value::Object(pairs) => {
                self.head(MAP, pairs.len() as u64);
                for (key, value) in pairs {
                    self.str(key);
                    self.value(value);
                }
            }
        }
    }

    pub(crate) fn values(&mut self, values: &[Value]) {
        self.array(values.len());
        for value in values {
            self.value(value);
        }
    }

    /// Something that stays on serde (its CBOR, as ciborium writes it).
    pub(crate) fn serde<T: Serialize + ?Sized>(&mut self, item: &T) {
        // Writing into a Vec fails only on a serializer bug; the reader then says so.
        let _ = ciborium::into_writer(item, &mut self.bytes);
    }
}

/// Reads CBOR items from a record, in order.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn error(what: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Decode(what.to_string())
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    /// The whole record read: trailing bytes are refused.
    pub(crate) fn end(&self) -> Result<(), SnapshotError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(error(format!("{} bytes after the end of the record", self.bytes.len() - self.at)))
        }
    }

    fn byte(&mut self) -> Result<u8, SnapshotError> {
        let b = *self.bytes.get(self.at).ok_or_else(|| error("record cut short"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], SnapshotError> {
        let left = self.bytes.len() - self.at;
        let n = usize::try_from(n).ok().filter(|n| *n <= left).ok_or_else(|| error("record cut short"))?;
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    /// An item's major type and argument; `None` as argument for an indefinite length.
    fn head(&mut self) -> Result<(u8, Option<u64>), SnapshotError> {
        let first = self.byte()?;
        let (major, info) = (first >> 5, first & 0x1f);
        let n = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().map_err(error)?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().map_err(error)?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().map_err(error)?),
            31 if matches!(major, BYTES | TEXT | ARRAY | MAP | SIMPLE) => return Ok((major, None)),
            _ => return Err(error(format!("malformed CBOR head 0x{first:02x}"))),
        };
        Ok((major, Some(n)))
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// A record's head: an array of `len` items, the first the format version.
    pub(crate) fn record(&mut self, len: usize) -> Result<(), SnapshotError> {
        let n = self.array()?;
        let version = self.uint()?;
        if version != FORMAT {
            return Err(SnapshotError::Version(u32::try_from(version).unwrap_or(u32::MAX)));
        }
        if n != len {
            return Err(error(format!("a record of {n} items, expected {len}")));
        }
        Ok(())
    }

    /// A definite-length array's length; at most the bytes left (an item takes one at
    /// least), so a caller may reserve it.
    pub(crate) fn array(&mut self) -> Result<usize, SnapshotError> {
        match self.head()? {
            (ARRAY, Some(n)) if n <= (self.bytes.len() - self.at) as u64 => Ok(n as usize),
            (ARRAY, _) => Err(error("array longer than the record")),
            (major, _) => Err(error(format!("expected an array, found major type {major}"))),
        }
    }

    /// An array of exactly `len` items (a record's fixed fields).
    pub(crate) fn fields(&mut self, len: usize, what: &str) -> Result<(), SnapshotError> {
        let n = self.array()?;
        if n == len { Ok(()) } else { Err(error(format!("{what}: {n} fields, expected {len}"))) }
    }

    pub(crate) fn uint(&mut self) -> Result<u64, SnapshotError> {
        match self.head()? {
            (UINT, Some(n)) => Ok(n),
            (major, _) => Err(error(format!("expected an unsigned integer, found major type {major}"))),
        }
    }

    pub(crate) fn int(&mut self) -> Result<i64, SnapshotError> {
        match self.head()? {
            (UINT, Some(n)) => i64::try_from(n).map_err(error),
            (NINT, Some(n)) => i64::try_from(n).map(|n| -1 - n).map_err(error),
            (major, _) => Err(error(format!("expected an integer, found major type {major}"))),
        }
    }

    pub(crate) fn float(&mut self) -> Result<f64, SnapshotError> {
        match self.byte()? {
            FLOAT64 => Ok(f64::from_bits(u64::from_be_bytes(self.take(8)?.try_into().map_err(error)?))),
            other => Err(error(format!("expected a float, found 0x{other:02x}"))),
        }
    }

    pub(crate) fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.byte()? {
            FALSE => Ok(false),
            TRUE => Ok(true),
            other => Err(error(format!("expected a boolean, found 0x{other:02x}"))),
        }
    }

    /// A CBOR null is next (and is passed over).
    pub(crate) fn null(&mut self) -> bool {
        let null = self.peek() == Some(NULL);
        if null {
            self.at += 1;
        }
        null
    }

    pub(crate) fn byte_string(&mut self) -> Result<Vec<u8>, SnapshotError> {
        match self.head()? {
            (BYTES, Some(n)) => self.take(n).map(<[u8]>::to_vec),
            (major, _) => Err(error(format!("expected bytes, found major type {major}"))),
        }
    }

    pub(crate) fn string(&mut self) -> Result<String, SnapshotError> {
        match self.head()? {
            (TEXT, Some(n)) => {
                let bytes = self.take(n)?;
                std::str::from_utf8(bytes).map(str::to_owned).map_err(error)
            }
            (major, _) => Err(error(format!("expected text, found major type {major}"))),
        }
    }

    pub(crate) fn value(&mut self) -> Result<Value, SnapshotError> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Result<Value, SnapshotError> {
        if depth > MAX_DEPTH {
            return Err(error("values nested too deep"));
        }
        match self.peek() {
            Some(UNDEFINED) => {
                self.at += 1;
                return Ok(Value::Null);
            }
            Some(NULL) => {
                self.at += 1;
                return Ok(Value::JsonNull);
            }
            Some(FALSE | TRUE) => return self.bool().map(Value::Bool),
            Some(FLOAT64) => return self.float().map(Value::Float),
            _ => {}
        }
        let start = self.at;
        match self.head()? {
            (UINT | NINT, Some(_)) => {
                self.at = start;
                self.int().map(Value::Int)
            }
            (TEXT, Some(_)) => {
                self.at = start;
                self.string().map(Value::Str)
            }
            (BYTES, Some(n)) => self.take(n).map(|b| Value::Bytes(b.to_vec())),
            (ARRAY, Some(n)) if n <= (self.bytes.len() - self.at) as u64 => {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value_at(depth + 1)?);
                }
                Ok(Value::Array(items))
            }
            (MAP, Some(n)) if n <= (self.bytes.len() - self.at) as u64 => {
                let mut pairs = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let key = self.string()?;
                    pairs.push((key, self.value_at(depth + 1)?));
                }
                Ok(Value::Object(pairs))
            }
            (major, _) => Err(error(format!("not a value of window state (major type {major})"))),
        }
    }

    pub(crate) fn values(&mut self) -> Result<Vec<Value>, SnapshotError> {
        let n = self.array()?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(self.value()?);
        }
        Ok(values)
    }

    /// Passes over one item of any kind (what serde wrote included), returning its bytes.
    fn skip(&mut self, depth: usize) -> Result<&'a [u8], SnapshotError> {
        if depth > MAX_DEPTH {
            return Err(error("items nested too deep"));
        }
        let start = self.at;
        match self.head()? {
            // A simple value's or float's bytes were its head's argument.
            (UINT | NINT | SIMPLE, Some(_)) => {}
            // A break (0xff) alone is not an item.
            (SIMPLE, None) => return Err(error("unexpected break")),
            (BYTES | TEXT, Some(n)) => {
                self.take(n)?;
            }
            (BYTES | TEXT, None) => {
                while self.peek() != Some(0xff) {
                    self.skip(depth + 1)?;
                }
                self.at += 1;
            }
            (ARRAY, Some(n)) => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
            }
            (MAP, Some(n)) => {
                for _ in 0..n.saturating_mul(2) {
                    self.skip(depth + 1)?;
                }
            }
            (ARRAY | MAP, None) => {
                while self.peek() != Some(0xff) {
                    self.skip(depth + 1)?;
                }
                self.at += 1;
            }
            (TAG, _) => {
                self.skip(depth + 1)?;
            }
            (_, _) => return Err(error("malformed CBOR")),
        }
        Ok(&self.bytes[start..self.at])
    }

    /// Something written through serde ([`Writer::serde`]).
    pub(crate) fn serde<T: DeserializeOwned>(&mut self) -> Result<T, SnapshotError> {
        let bytes = self.skip(0)?;
        ciborium::from_reader(bytes).map_err(error)
    }
}

/// The parts of a rule's windows in format 2.
impl Windows {
    /// `[plan, next_seq, watermark, event_clock, last_arrival, deadline, counters,
    /// [group…]]`, written from the live state.
    pub(super) fn encode(&self, w: &mut Writer) {
        w.array(8);
        w.serde(&self.plan);
        w.uint(self.next_seq);
        w.uint(self.watermark);
        w.uint(self.event_clock);
        w.uint(self.last_arrival);
        w.uint(self.deadline);
        encode_counters(&self.counters, w);
        w.array(self.groups.len());
        for (key, group) in &self.groups {
            group.encode(key, w);
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Windows, SnapshotError> {
        r.fields(8, "a rule's windows")?;
        let mut windows = Windows::new(r.serde()?);
        windows.next_seq = r.uint()?;
        windows.watermark = r.uint()?;
        windows.event_clock = r.uint()?;
        windows.last_arrival = r.uint()?;
        windows.deadline = r.uint()?;
        windows.counters = decode_counters(r)?;
        let n = r.array()?;
        windows.groups.reserve(n);
        for _ in 0..n {
            let (key, group) = Group::decode(r)?;
            windows.groups.insert(key.into_boxed_str(), group);
        }
        windows.count_due();
        Ok(windows)
    }
}

pub(super) fn encode_counters(c: &WindowCounters, w: &mut Writer) {
    w.array(4);
    w.uint(c.late);
    w.uint(c.ahead);
    w.uint(c.groups_evicted);
    w.uint(c.retained_dropped);
}

pub(super) fn decode_counters(r: &mut Reader<'_>) -> Result<WindowCounters, SnapshotError> {
    r.fields(4, "window counters")?;
    Ok(WindowCounters {
        late: r.uint()?,
        ahead: r.uint()?,
        groups_evicted: r.uint()?,
        retained_dropped: r.uint()?,
    })
}

/// A group's open state: `[0, instance…]` (running aggregates) or `[1, since_emit,
/// event…]` (kept events).
const OPEN: u64 = 0;
const KEPT: u64 = 1;

impl Group {
    /// `[key, seq, state, [held closing…]]`.
    pub(super) fn encode(&self, key: &str, w: &mut Writer) {
        w.array(4);
        w.str(key);
        w.uint(self.seq);
        match &self.state {
            GroupState::Open(instances) => {
                w.array(1 + instances.len());
                w.uint(OPEN);
                for i in instances {
                    // `[start, end, last, events, state…]`
                    w.array(4 + i.states.len());
                    w.uint(i.start);
                    w.uint(i.end);
                    w.uint(i.last);
                    w.uint(i.events);
                    for state in &i.states {
                        state.encode(w);
                    }
                }
            }
            GroupState::Kept(kept) => {
                w.array(2 + kept.events.len());
                w.uint(KEPT);
                w.uint(kept.since_emit);
                for (at, inputs) in &kept.events {
                    // `[time, input…]`
                    w.array(1 + inputs.len());
                    w.uint(*at);
                    for input in inputs {
                        w.value(input);
                    }
                }
            }
        }
        w.array(self.due.len());
        for due in &self.due {
            // `[seq, key, start, end, events, early, value…]`
            let c = &due.closed;
            w.array(6 + c.values.len());
            w.uint(due.seq);
            w.str(&c.key);
            w.uint(c.start_ms);
            w.uint(c.end_ms);
            w.uint(c.events);
            w.bool(c.early);
            for value in &c.values {
                w.value(value);
            }
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<(String, Group), SnapshotError> {
        r.fields(4, "a group")?;
        let key = r.string()?;
        let seq = r.uint()?;
        let len = r.array()?;
        let state = match (len, r.uint()?) {
            (1.., OPEN) => {
                let mut instances = VecDeque::with_capacity(len - 1);
                for _ in 1..len {
                    let n = r.array()?;
                    if n < 4 {
                        return Err(SnapshotError::Decode(format!("a window instance of {n} fields")));
                    }
                    let (start, end, last, events) = (r.uint()?, r.uint()?, r.uint()?, r.uint()?);
                    let mut states = Vec::with_capacity(n - 4);
                    for _ in 4..n {
                        states.push(AggState::decode(r)?);
                    }
                    instances.push_back(Instance { start, end, last, events, states });
                }
                GroupState::Open(instances)
            }
            (2.., KEPT) => {
                let since_emit = r.uint()?;
                let mut events = VecDeque::with_capacity(len - 2);
                for _ in 2..len {
                    let n = r.array()?;
                    if n < 1 {
                        return Err(SnapshotError::Decode("a kept event without its time".into()));
                    }
                    let at = r.uint()?;
                    let mut inputs = Vec::with_capacity(n - 1);
                    for _ in 1..n {
                        inputs.push(r.value()?);
                    }
                    events.push_back((at, inputs));
                }
                GroupState::Kept(Box::new(Kept { events, since_emit }))
            }
            (_, other) => return Err(SnapshotError::Decode(format!("a group state of kind {other}"))),
        };
        let n = r.array()?;
        let mut due = Vec::with_capacity(n);
        for _ in 0..n {
            let fields = r.array()?;
            if fields < 6 {
                return Err(SnapshotError::Decode(format!("a held closing of {fields} fields")));
            }
            let seq = r.uint()?;
            let key = r.string()?;
            let (start_ms, end_ms, events, early) = (r.uint()?, r.uint()?, r.uint()?, r.bool()?);
            let mut values = Vec::with_capacity(fields - 6);
            for _ in 6..fields {
                values.push(r.value()?);
            }
            due.push(Due { seq, closed: Closed { key, start_ms, end_ms, events, values, early, seq: None } });
        }
        Ok((key, Group { seq, state, due, dirty: false }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_null_stays_null() {
        let value = Value::Array(vec![
            Value::Null,
            Value::JsonNull,
            Value::Bool(true),
            Value::Int(-1),
            Value::Int(i64::MIN),
            Value::Int(i64::MAX),
            Value::Float(-0.5),
            Value::Str("ü".into()),
            Value::Bytes(vec![0, 255]),
            Value::Object(vec![("a".into(), Value::Null), ("b".into(), Value::Array(Vec::new()))]),
        ]);
        let mut w = Writer::new();
        w.value(&value);
        let mut r = Reader::new(&w.bytes);
        assert_eq!(r.value().expect("reads"), value);
        r.end().expect("nothing left");
        // Plain CBOR: the payload decoder reads it too (its one null is JSON's).
        assert!(Value::from_cbor(&w.bytes).is_ok());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic_or_a_huge_allocation() {
        // An array claiming 2^32 items in 6 bytes; a cut float; deep nesting.
        for bytes in [&[0x9a, 0xff, 0xff, 0xff, 0xff, 0x01][..], &[0xfb, 0, 0], &[0x81; 1_000][..], &[]] {
            assert!(Reader::new(bytes).value().is_err(), "{bytes:?}");
            assert!(Reader::new(bytes).skip(0).is_err(), "{bytes:?}");
        }
    }
}
