//! The event's payload as rules see it: decoded at most once per format per event and
//! shared by every rule that matched ([`Decoded`]), read through a [`PayloadView`].
//!
//! Most rules read a few top-level fields (`payload.temp`, `payload.device`) of a payload
//! that has many. When every enabled rule reads the payload *only* through such paths,
//! the rule set numbers those field names at load time ([`FieldSlots`]; each
//! [`Expr::Payload`](crate::expr::Expr::Payload) path carries its slot) and JSON decoding
//! builds just those fields, straight into a slot array: the other fields are validated
//! and skipped, no key is copied, and a rule reads a field by index instead of by name.
//! A rule that reads the whole payload (`payload`, `SELECT *`, `payload[1]`) makes the
//! rule set decode whole values instead, as does a CBOR or raw payload.
//!
//! **Invariant:** the two decodings agree on every value a rule can read. A field absent
//! from the payload, and any field when the payload is not a JSON object, is NULL in both;
//! a repeated key is last-wins in both (as [`Value::get`] resolves it). Both check the
//! whole text, so both refuse malformed JSON. Differences inherited from serde_json's
//! `IgnoredAny`, which the field decoding's reference path uses and which checks a skipped
//! field for syntax only: a number out of `f64` range, a bad `\u` escape, invalid UTF-8 or
//! nesting deeper than 128 levels inside a field that no rule reads is accepted by the
//! field decoding and refused by the whole one, and an error inside a skipped field can be
//! worded differently (`trailing comma` vs `expected value`).
//!
//! The field decoding has a fast path, a hand-written scanner ([`json_fields`]), that only
//! answers when it is sure to agree with the reference path (serde_json); a property test
//! holds it to that.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use rustc_hash::FxHashMap;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::PayloadFormat;
use crate::expr::PathSeg;
use crate::value::Value;

/// The top-level payload field names a rule set reads, each with a slot number (dense,
/// from 0, in first-seen order). Built once when the rule set is compiled.
#[derive(Debug, Default)]
pub(crate) struct FieldSlots {
    names: Vec<String>,
    /// Only used when there are too many names for a linear scan to win.
    by_name: FxHashMap<String, usize>,
    /// Bit `min(len, 63)` is set for the byte length of every name, and bit `b` of
    /// `first_bytes` for every name's first byte: most payload keys that are not names
    /// fail one of these two tests, which cost no memory access beyond the key itself.
    lengths: u64,
    first_bytes: [u64; 4],
}

/// Up to this many names, finding a key is a scan that compares lengths first: every
/// payload key is checked, and for the usual handful of names that beats hashing it.
const LINEAR_SCAN_MAX: usize = 8;

fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl FieldSlots {
    /// The slot of `name`, adding it if it is new.
    pub(crate) fn intern(&mut self, name: &str) -> usize {
        if let Some(slot) = self.slot(name) {
            return slot;
        }
        let slot = self.names.len();
        self.names.push(name.to_owned());
        self.by_name.insert(name.to_owned(), slot);
        self.lengths |= length_bit(name.len());
        if let Some(&first) = name.as_bytes().first() {
            if let Some(word) = self.first_bytes.get_mut(usize::from(first / 64)) {
                *word |= 1 << (first % 64);
            }
        }
        slot
    }

    pub(crate) fn slot(&self, name: &str) -> Option<usize> {
        self.slot_of_bytes(name.as_bytes())
    }

    /// [`FieldSlots::slot`] for a name given as raw bytes (only a valid UTF-8 name can
    /// match).
    pub(crate) fn slot_of_bytes(&self, name: &[u8]) -> Option<usize> {
        if self.lengths & length_bit(name.len()) == 0 {
            return None;
        }
        if let Some(&first) = name.first() {
            let word = self.first_bytes.get(usize::from(first / 64)).copied().unwrap_or(0);
            if word & (1 << (first % 64)) == 0 {
                return None;
            }
        }
        if self.names.len() <= LINEAR_SCAN_MAX {
            // Length, first and last byte rule out nearly every other key before the
            // full comparison (a `memcmp` call) runs.
            self.names.iter().position(|n| {
                let n = n.as_bytes();
                n.len() == name.len() && n.first() == name.first() && n.last() == name.last() && n == name
            })
        } else {
            self.by_name.get(std::str::from_utf8(name).ok()?).copied()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

/// A payload as one rule reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PayloadView<'a> {
    /// The whole decoded value.
    Whole(&'a Value),
    /// Only the rule set's [`FieldSlots`], by slot; NULL where the payload lacks the field.
    Fields(&'a [Value]),
}

impl<'a> PayloadView<'a> {
    /// The value at `path` (`slot` is the slot of its first key), or `None` if missing.
    pub(crate) fn walk(self, path: &[PathSeg], slot: Option<usize>) -> Option<&'a Value> {
        match self {
            PayloadView::Whole(value) => crate::expr::walk(value, path),
            PayloadView::Fields(fields) => {
                // A rule set only decodes into fields when every payload path of every
                // rule starts with a key and has its slot (see `RuleSet::compile`).
                let field = fields.get(slot?)?;
                crate::expr::walk(field, path.get(1..)?)
            }
        }
    }

    /// [`PayloadView::walk`] through strings holding JSON (see [`crate::expr::walk_decoding`]);
    /// only tried when `walk` finds nothing.
    pub(crate) fn walk_decoding(self, path: &[PathSeg], slot: Option<usize>) -> Option<Value> {
        match self {
            // A payload that decoded to text is a `raw` rule's: it asked for no decoding.
            PayloadView::Whole(Value::Str(_)) => None,
            PayloadView::Whole(value) => crate::expr::walk_decoding(value, path),
            PayloadView::Fields(fields) => crate::expr::walk_decoding(fields.get(slot?)?, path.get(1..)?),
        }
    }

    /// The whole payload, for `SELECT *`. A rule set with a `SELECT *` rule always
    /// decodes whole values, so the `Fields` arm is never reached; it gives NULL rather
    /// than a panic.
    pub(crate) fn whole(self) -> &'a Value {
        match self {
            PayloadView::Whole(value) => value,
            PayloadView::Fields(_) => &crate::expr::NULL,
        }
    }
}

/// The event's payload, decoded lazily and at most once per format, shared by all rules.
pub(crate) struct Decoded<'e> {
    bytes: &'e [u8],
    /// Decode JSON into these fields only (`None`: whole values).
    fields: Option<&'e FieldSlots>,
    /// Which of the other cells `auto` resolved to.
    auto: OnceCell<PayloadFormat>,
    json: OnceCell<Result<Json, String>>,
    cbor: OnceCell<Result<Value, String>>,
    raw: OnceCell<Value>,
}

enum Json {
    Whole(Value),
    Fields(Vec<Value>),
}

impl<'e> Decoded<'e> {
    pub(crate) fn new(bytes: &'e [u8], fields: Option<&'e FieldSlots>) -> Decoded<'e> {
        Decoded {
            bytes,
            fields,
            auto: OnceCell::new(),
            json: OnceCell::new(),
            cbor: OnceCell::new(),
            raw: OnceCell::new(),
        }
    }

    /// The payload as the text it arrived as (bytes if it is not UTF-8), made once.
    pub(crate) fn text(&self) -> &Value {
        self.raw.get_or_init(|| raw_value(self.bytes))
    }

    /// Whether `format` reads this payload as CBOR (after [`Decoded::get`] succeeded).
    pub(crate) fn is_cbor(&self, format: PayloadFormat) -> bool {
        match format {
            PayloadFormat::Cbor => true,
            PayloadFormat::Auto => self.auto.get() == Some(&PayloadFormat::Cbor),
            _ => false,
        }
    }

    /// The payload read as `format`, or why it cannot be.
    pub(crate) fn get(&self, format: PayloadFormat) -> Result<PayloadView<'_>, &str> {
        match format {
            PayloadFormat::Auto => match *self.auto.get_or_init(|| self.detect()) {
                PayloadFormat::Cbor => self.get(PayloadFormat::Cbor),
                PayloadFormat::Json => self.get(PayloadFormat::Json),
                _ => self.get(PayloadFormat::Raw),
            },
            PayloadFormat::Raw => Ok(PayloadView::Whole(self.raw.get_or_init(|| raw_value(self.bytes)))),
            PayloadFormat::Json => match self.json() {
                Ok(Json::Whole(value)) => Ok(PayloadView::Whole(value)),
                Ok(Json::Fields(fields)) => Ok(PayloadView::Fields(fields)),
                Err(reason) => Err(reason),
            },
            PayloadFormat::Cbor => self.cbor().as_ref().map(PayloadView::Whole).map_err(String::as_str),
        }
    }

    fn json(&self) -> &Result<Json, String> {
        self.json.get_or_init(|| {
            match self.fields {
                Some(fields) => json_fields(self.bytes, fields).map(Json::Fields),
                None => Value::from_json(self.bytes).map(Json::Whole),
            }
            .map_err(|e| format!("payload is not valid JSON: {e}"))
        })
    }

    fn cbor(&self) -> &Result<Value, String> {
        self.cbor.get_or_init(|| {
            Value::from_cbor(self.bytes).map_err(|e| format!("payload is not valid CBOR: {e}"))
        })
    }

    /// Auto-detection: a first byte of 0x80–0xBF (a CBOR array or map; never the start of
    /// UTF-8 text) or the CBOR self-describe tag means CBOR; otherwise JSON if it parses;
    /// otherwise the raw payload (a string if UTF-8, else bytes).
    fn detect(&self) -> PayloadFormat {
        let looks_cbor =
            matches!(self.bytes.first(), Some(0x80..=0xbf)) || self.bytes.starts_with(&[0xd9, 0xd9, 0xf7]);
        if looks_cbor && self.cbor().is_ok() {
            PayloadFormat::Cbor
        } else if self.json().is_ok() {
            PayloadFormat::Json
        } else {
            PayloadFormat::Raw
        }
    }
}

fn raw_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::Str(text.to_owned()),
        Err(_) => Value::Bytes(bytes.to_vec()),
    }
}

/// Parses JSON text, building of a top-level object only the fields in `fields`, each
/// into its slot; the rest of the text is checked for syntax and skipped unbuilt. A
/// payload that is not an object leaves every slot NULL.
///
/// Two paths, one answer: [`scan_fields`] handles the common shape (an object whose keys
/// have no escapes) with a hand-written scanner, several times cheaper per key than going
/// through serde's visitor machinery; anything it is unsure of, including every error,
/// goes to [`serde_fields`], which is the reference (and words the error).
pub(crate) fn json_fields(bytes: &[u8], fields: &FieldSlots) -> Result<Vec<Value>, serde_json::Error> {
    match scan_fields(bytes, fields) {
        Some(slots) => Ok(slots),
        None => serde_fields(bytes, fields),
    }
}

/// The reference field decoding: serde_json over the whole text, skipping with `IgnoredAny`.
fn serde_fields(bytes: &[u8], fields: &FieldSlots) -> Result<Vec<Value>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let slots = deserializer.deserialize_any(FieldsVisitor { fields })?;
    deserializer.end()?;
    Ok(slots)
}

/// The fast path of [`json_fields`]. `Some` only when the text is certainly accepted by
/// [`serde_fields`] with the same slots; `None` means "ask serde_json", never "invalid".
///
/// What it accepts is a subset of what serde_json accepts, checked by a differential
/// property test: strict JSON (RFC 8259 grammar, UTF-8 text), a top-level object, keys of
/// that object without escapes, nesting under 64 levels. A field that some rule reads is
/// located by the scan and then decoded by serde_json from its own bytes, so values are
/// built by exactly the code that builds them on the reference path.
fn scan_fields(bytes: &[u8], fields: &FieldSlots) -> Option<Vec<Value>> {
    let mut scan = Scanner { bytes, pos: 0 };
    let mut slots = vec![Value::Null; fields.len()];
    scan.skip_ws();
    scan.eat(b'{')?;
    scan.skip_ws();
    if scan.peek() == Some(b'}') {
        scan.pos += 1;
    } else {
        loop {
            scan.eat(b'"')?;
            let key = scan.string(false)?;
            scan.skip_ws();
            scan.eat(b':')?;
            scan.skip_ws();
            let start = scan.pos;
            scan.value()?;
            if let Some(slot) = fields.slot_of_bytes(key).and_then(|slot| slots.get_mut(slot)) {
                // Overwriting makes a repeated key last-wins, as on the reference path.
                *slot = field_value(bytes.get(start..scan.pos)?)?;
            }
            scan.skip_ws();
            match scan.next()? {
                b',' => scan.skip_ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    scan.skip_ws();
    (scan.pos == bytes.len()).then_some(slots)
}

/// Decodes one field's value that the scanner has checked. A string without escapes is
/// its text (the scanner checked it is UTF-8 without control characters, which is all
/// serde_json checks); anything else goes to serde_json, numbers included, so that they
/// round exactly as on the reference path.
fn field_value(text: &[u8]) -> Option<Value> {
    if let [b'"', inner @ .., b'"'] = text {
        if !inner.contains(&b'\\') {
            return std::str::from_utf8(inner).ok().map(|s| Value::Str(s.to_owned()));
        }
    }
    serde_json::from_slice(text).ok()
}

/// A cursor over JSON text for [`scan_fields`]. Every method returns `None` on anything
/// it does not accept, leaving the verdict to serde_json.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Deeper nesting is left to serde_json; the scanner keeps its open containers in the bits
/// of a `u64`.
const SCAN_MAX_DEPTH: u32 = 63;

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> Option<()> {
        (self.next()? == expected).then_some(())
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string whose opening quote was consumed; returns its raw bytes (escapes not
    /// decoded). Refuses control characters, bad escapes and invalid UTF-8; refuses any
    /// escape at all unless `escapes` (an object key is compared by its raw bytes).
    fn string(&mut self, escapes: bool) -> Option<&'a [u8]> {
        let start = self.pos;
        let mut ascii = true;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' if escapes => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        let hex = self.bytes.get(self.pos..self.pos + 4)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        self.pos += 4;
                    }
                    _ => return None,
                },
                0..0x20 | b'\\' => return None,
                0x80.. => ascii = false,
                _ => {}
            }
        }
        let text = self.bytes.get(start..self.pos - 1)?;
        // ASCII is UTF-8; only text with other bytes needs the check.
        (ascii || std::str::from_utf8(text).is_ok()).then_some(text)
    }

    /// `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.digit()?;
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.digit()?;
            self.digits();
        }
        // `01`: serde_json refuses a digit after a leading zero; so does the caller, which
        // expects `,`, `]`, `}` or whitespace after a value.
        Some(())
    }

    fn digit(&mut self) -> Option<()> {
        self.next()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, text: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(text.len())?;
        (self.bytes.get(self.pos..end)? == text).then(|| self.pos = end)
    }

    /// Skips one value (at the cursor, no leading whitespace). Iterative: bit `d` of
    /// `objects` says whether the container at depth `d + 1` is an object.
    fn value(&mut self) -> Option<()> {
        let mut depth: u32 = 0;
        let mut objects: u64 = 0;
        loop {
            // A value starts here.
            match self.next()? {
                open @ (b'{' | b'[') => {
                    if depth == SCAN_MAX_DEPTH {
                        return None;
                    }
                    let is_object = open == b'{';
                    objects = (objects & !(1 << depth)) | (u64::from(is_object) << depth);
                    depth += 1;
                    self.skip_ws();
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        depth -= 1;
                    } else {
                        if is_object {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string(true)?;
                }
                b'-' | b'0'..=b'9' => {
                    self.pos -= 1;
                    self.number()?;
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                _ => return None,
            }
            // A value ended: close containers until one continues with `,`.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let is_object = objects & (1 << (depth - 1)) != 0;
                self.skip_ws();
                match self.next()? {
                    b',' => {
                        self.skip_ws();
                        if is_object {
                            self.member_key()?;
                        }
                        break;
                    }
                    b'}' if is_object => depth -= 1,
                    b']' if !is_object => depth -= 1,
                    _ => return None,
                }
            }
        }
    }

    /// `"key" :` inside a skipped object, up to the value.
    fn member_key(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.string(true)?;
        self.skip_ws();
        self.eat(b':')?;
        self.skip_ws();
        Some(())
    }
}

struct FieldsVisitor<'f> {
    fields: &'f FieldSlots,
}

impl FieldsVisitor<'_> {
    fn empty(&self) -> Vec<Value> {
        vec![Value::Null; self.fields.len()]
    }
}

impl<'de> Visitor<'de> for FieldsVisitor<'_> {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    fn visit_str<E>(self, _: &str) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    fn visit_unit<E>(self) -> Result<Vec<Value>, E> {
        Ok(self.empty())
    }
    /// A top-level array is decoded (and dropped) rather than skipped, so that it is
    /// checked exactly as whole decoding checks it; the engine has always done so.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(self.empty())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Value>, A::Error> {
        let mut slots = self.empty();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match self.fields.slot(&key).and_then(|slot| slots.get_mut(slot)) {
                // Overwriting makes a repeated key last-wins, as `Value::get` is.
                Some(slot) => *slot = map.next_value::<Value>()?,
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(slots)
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slots(names: &[&str]) -> FieldSlots {
        let mut slots = FieldSlots::default();
        for name in names {
            slots.intern(name);
        }
        slots
    }

    #[test]
    fn fields_keep_only_the_named_keys_and_still_validate() {
        let fields = slots(&["a", "c\"d", "missing"]);
        let got = json_fields(br#"{"a":1,"b":{"x":[1,2]},"c\"d":3,"a":{"z":true}}"#, &fields).unwrap();
        let got: Vec<String> = got.iter().map(Value::to_json_string).collect();
        assert_eq!(got, [r#"{"z":true}"#, "3", "null"], "last duplicate wins");
        assert!(json_fields(br#"{"a":1,"b":[}"#, &fields).is_err());
        assert!(json_fields(br#"{"a":1} x"#, &fields).is_err());
        assert_eq!(json_fields(b"[1, {\"a\": 2}]", &fields).unwrap(), vec![Value::Null; 3]);
        assert!(json_fields(b"[1e400]", &fields).is_err(), "a top-level array is checked in full");
        assert_eq!(json_fields(b"\"a\"", &fields).unwrap(), vec![Value::Null; 3]);
    }

    #[test]
    fn field_decoding_refuses_malformed_json_like_whole_decoding() {
        let fields = slots(&["a"]);
        for text in [&b"{\"a\":1,}"[..], b"{\"b\":[1,]}", b"", b"{\"a\":1", b"nul", b"{\"a\":1}}", b"{a:1}"] {
            let text_shown = String::from_utf8_lossy(text);
            assert!(Value::from_json(text).is_err(), "{text_shown}");
            assert!(json_fields(text, &fields).is_err(), "{text_shown}");
        }
        // Skipped fields are checked for syntax only (serde_json's `IgnoredAny`).
        assert!(Value::from_json(br#"{"a":1,"b":1e400}"#).is_err());
        assert!(json_fields(br#"{"a":1,"b":1e400}"#, &fields).is_ok());
        assert!(json_fields(br#"{"a":1e400,"b":1}"#, &fields).is_err(), "read fields are decoded");
    }

    #[test]
    fn the_scanner_takes_the_usual_payloads() {
        let fields = slots(&["device", "temp", "tags", "nested"]);
        for text in [
            &br#"{"device":"d-0001","seq":18342,"temp":84.25,"tags":["line-1","cell-7"],"location":{"x":12.5,"y":-3.25e-2},"ok":true,"none":null}"#[..],
            br#" { "nested" : { "a" : [ 1 , { "b" : "\u00e9\n\"" } ] } , "temp" : -0 , "temp" : 1E+2 } "#,
            "{\"device\":\"h\u{e9}llo\",\"w\u{e9}\":\"\u{1F600}\"}".as_bytes(),
            b"{}",
        ] {
            let fast = scan_fields(text, &fields);
            assert!(fast.is_some(), "{}", String::from_utf8_lossy(text));
            assert_eq!(fast.map(Ok), Some(serde_fields(text, &fields).map_err(|e| e.to_string())));
        }
        let taken = scan_fields(br#"{"temp":1,"temp":{"x":[2]}}"#, &fields).unwrap();
        assert_eq!(taken[1].to_json_string(), r#"{"x":[2]}"#, "last duplicate wins");
    }

    #[test]
    fn the_scanner_leaves_the_unusual_to_serde_json() {
        let fields = slots(&["a"]);
        for text in [
            &br#"{"\u0061":1}"#[..], // an escaped key: serde_json compares it decoded
            br#"[1]"#,               // not an object
            br#"{"a":1e400}"#,       // a read field that serde_json refuses
            br#"{"a":"\ud800"}"#,    // likewise
            br#"{"a":01}"#,          // malformed
            br#"{"b":[1,]}"#,
            b"{\"b\":\"\xff\"}", // invalid UTF-8 (serde_json skips it unchecked)
            b"{\"b\":\"\x01\"}",
        ] {
            assert!(scan_fields(text, &fields).is_none(), "{}", String::from_utf8_lossy(text));
        }
        let deep = format!("{{\"b\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(scan_fields(deep.as_bytes(), &fields).is_none());
        assert!(serde_fields(deep.as_bytes(), &fields).is_ok(), "`IgnoredAny` skips any depth");
        assert!(Value::from_json(deep.as_bytes()).is_err(), "whole decoding stops at 128 levels");
    }

    /// Bytes that are JSON, nearly JSON, or JSON-flavoured noise.
    fn arb_jsonish() -> impl Strategy<Value = Vec<u8>> {
        const TOKENS: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b" ",
            b"\n\t",
            b"\"a\"",
            b"\"s\"",
            b"\"k\"",
            b"\"\\u00e9x\"",
            b"\"\\ud800\"",
            b"\"\\q\"",
            b"\"\\u12\"",
            b"\"\\\"\"",
            b"\"\xc3\xa9\"",
            b"\"\x01\"",
            b"\"\xff\"",
            b"\"\xc3\"",
            b"1",
            b"-0",
            b"01",
            b"-",
            b"1.5e3",
            b"1e400",
            b"1.",
            b"2E+2",
            b"-1.0e-2",
            b"true",
            b"nul",
            b"null",
            b"false",
            b"\"",
            b"\\",
            b"x",
            b"\"a\":",
        ];
        let noise = prop::collection::vec(prop::sample::select(TOKENS), 0..24)
            .prop_map(|tokens| std::iter::once(&b"{"[..]).chain(tokens).flatten().copied().collect());
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
            "\\PC{0,6}".prop_map(serde_json::Value::String),
        ];
        let json = leaf.prop_recursive(4, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("a|s|k|[a-z\"\\\\é\n]{1,3}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        let object = prop::collection::btree_map("a|s|k|é|[a-z]{1,2}", json, 0..6)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()));
        let valid = (object, any::<bool>()).prop_map(|(value, pretty)| {
            if pretty { serde_json::to_vec_pretty(&value) } else { serde_json::to_vec(&value) }.unwrap()
        });
        // Valid JSON with one byte replaced, inserted or removed.
        let bytes: &[u8] = b"{}[],:\" \\0e.-x\xff";
        let mutated = (valid.clone(), any::<prop::sample::Index>(), prop::sample::select(bytes), 0..3u8)
            .prop_map(|(mut text, at, byte, how)| {
                let at = at.index(text.len() + 1);
                match how {
                    0 if at < text.len() => text[at] = byte,
                    1 if at < text.len() => {
                        text.remove(at);
                    }
                    _ => text.insert(at, byte),
                }
                text
            });
        prop_oneof![noise, valid, mutated]
    }

    /// JSON text built from leaves and keys that are each valid or slightly not, so that
    /// every rule of the grammar is met with the rest of the text valid around it.
    fn arb_raw_json() -> impl Strategy<Value = Vec<u8>> {
        // Each odd piece is rare, so that most texts have at most one.
        const LEAVES: &[&[u8]] = &[
            b"0",
            b"-0",
            b"7",
            b"-12",
            b"1.5",
            b"-0.25e-3",
            b"2E+2",
            b"1e400",
            b"123456789012345678901234567890",
            b"true",
            b"false",
            b"null",
            b"\"\"",
            b"\"x\"",
            b"\"\\u00e9\\n\\\"\\\\\\/\\b\\f\\r\\t\"",
            b"\"\\ud800\"",
            b"\"\\uD83D\\uDE00\"",
            b"\"\x7f\"",
            b"\"\xc3\xa9\"",
            b"\"\xf0\x9f\x98\x80\"",
        ];
        const ODD_LEAVES: &[&[u8]] = &[
            b"01",
            b"-",
            b"1.",
            b".5",
            b"1e",
            b"1e+",
            b"+1",
            b"0x1",
            b"--1",
            b"1.5.2",
            b"nul",
            b"True",
            b"nan",
            b"\"\\q\"",
            b"\"\\u12\"",
            b"\"\\u12g4\"",
            b"\"\x01\"",
            b"\"\x1f\"",
            b"\"\xff\"",
            b"\"\xc3\"",
            b"\"\xed\xa0\x80\"",
            b"\"unterminated",
            b"'x'",
            b"",
            b"x",
            b"tru",
            b"fals",
            b"nulll",
            b"[1}",
            b"{\"a\":1]",
            b"[",
            b"{",
            b"]",
            b"}",
            b"[1 2]",
            b"{\"a\" 1}",
            b"{\"a\":}",
            b"{,}",
            b"[,1]",
            b"{\"a\"}",
        ];
        const KEYS: &[&[u8]] =
            &[b"\"a\"", b"\"s\"", b"\"k\"", b"\"\xc3\xa9\"", b"\"b\"", b"\"\"", b"\"\\u0061\"", b"\"a\\n\""];
        const ODD_KEYS: &[&[u8]] =
            &[b"\"\\q\"", b"\"\x01\"", b"\"\xff\"", b"\"\xc3\"", b"a", b"1", b"\"a\" :", b"\"s\"\":"];
        const SPACE: &[&[u8]] = &[b"", b"", b"", b" ", b"\n\t\r "];
        const ODD_SPACE: &[&[u8]] = &[b"\x0c", b"\xc2\xa0"];
        let space = || prop_oneof![30 => prop::sample::select(SPACE), 1 => prop::sample::select(ODD_SPACE)];
        let key = || prop_oneof![20 => prop::sample::select(KEYS), 1 => prop::sample::select(ODD_KEYS)];
        let leaf = prop_oneof![12 => prop::sample::select(LEAVES), 1 => prop::sample::select(ODD_LEAVES)]
            .prop_map(<[u8]>::to_vec);
        let value = leaf.prop_recursive(4, 32, 5, move |inner| {
            let item = (space(), inner.clone(), space()).prop_map(|(a, v, b)| [a, &v[..], b].concat());
            let member = (key(), space(), inner, space())
                .prop_map(|(key, gap, v, end)| [key, gap, b":", &v[..], end].concat());
            prop_oneof![
                (prop::collection::vec(item, 0..5), any::<u8>()).prop_map(|(items, flags)| {
                    let close: &[u8] = if flags % 17 == 0 { b",]" } else { b"]" };
                    [&b"["[..], &items.join(&b","[..]), close].concat()
                }),
                (prop::collection::vec(member, 0..5), any::<u8>()).prop_map(|(members, flags)| {
                    let close: &[u8] = if flags % 17 == 0 { b",}" } else { b"}" };
                    [&b"{"[..], &members.join(&b","[..]), close].concat()
                }),
            ]
        });
        let member = (key(), space(), value, space())
            .prop_map(|(key, gap, v, end)| [key, gap, b":", gap, &v[..], end].concat());
        (space(), prop::collection::vec(member, 0..6), space(), any::<u8>()).prop_map(
            |(lead, members, trail, flags)| {
                let tail: &[u8] = match flags % 23 {
                    0 => b"x",
                    1 => b"}",
                    2 => b",",
                    _ => b"",
                };
                [lead, b"{", &members.join(&b","[..]), b"}", trail, tail].concat()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Whenever the scanner answers, serde_json gives the same answer.
        #[test]
        fn the_scanner_agrees_with_serde_json(text in prop_oneof![arb_jsonish(), arb_raw_json()]) {
            let fields = slots(&["a", "é"]);
            if let Some(fast) = scan_fields(&text, &fields) {
                let reference = serde_fields(&text, &fields);
                prop_assert!(reference.is_ok(), "{}: {:?}", String::from_utf8_lossy(&text), reference);
                let reference = reference.unwrap();
                prop_assert_eq!(&fast, &reference);
                let as_json = |values: &[Value]| values.iter().map(Value::to_json_string).collect::<Vec<_>>();
                prop_assert_eq!(as_json(&fast), as_json(&reference));
            }
        }
    }

    #[test]
    fn slots_are_found_by_scan_and_by_hash() {
        let few = slots(&["a", "bb"]);
        assert_eq!((few.slot("bb"), few.slot("b"), few.slot("a")), (Some(1), None, Some(0)));
        let names: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let many = slots(&names.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!((many.slot("k13"), many.slot("k20")), (Some(13), None));
        let mut again = many;
        assert_eq!(again.intern("k3"), 3, "interning is idempotent");
    }
}
