//! [`Value`], the one data model of the rule language: what a payload decodes to, what an
//! expression evaluates to, and what an action encodes.
//!
//! It is the JSON data model plus byte strings (CBOR and raw payloads carry them) and a split
//! between integers and floats (EMQX keeps them apart: `round` returns an integer, `/`
//! always a float). Objects keep insertion order, so outputs list columns in `SELECT` order.
//!
//! **Invariant:** decoding never recurses deeper than the decoders allow (serde_json: 128
//! levels, ciborium: 256), so no `Value` is deep enough to overflow the stack when it is
//! walked or dropped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A value in the rule language. `Null` is SQL's NULL and EMQX's `undefined`: a missing
/// field, an out-of-range index, or the result of an operation on NULL. `JsonNull` is a
/// `null` the payload (or `json_decode`) held: EMQX decodes it to the atom `null`, a value
/// like any other, so `is_null` is FALSE for it and `payload.x != 1` TRUE.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    /// A JSON `null` (or a CBOR null or undefined) from decoded data; written back as `null`.
    JsonNull,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Bytes that are not text: a raw payload that is not UTF-8, a CBOR byte string, the
    /// result of `base64_decode` or `hexstr2bin` when it is not UTF-8.
    Bytes(Vec<u8>),
    Array(Vec<Value>),
    /// Key-value pairs in insertion order. A key appears at most once when built by
    /// [`Value::insert`]; decoded duplicates are resolved last-wins by [`Value::get`].
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The type name used in error messages, e.g. "expected a number, got string".
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::JsonNull => "JSON null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Whether this is NULL (EMQX's `undefined`); a JSON `null` is not, as in EMQX's `is_null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Whether this is NULL or a JSON `null`, as EMQX's `is_null_var`.
    pub fn is_null_var(&self) -> bool {
        matches!(self, Value::Null | Value::JsonNull)
    }

    /// Field `key` of an object (the last one if the payload repeated the key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(pairs) => pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Element `index` of an array, 1-based as in EMQX; negative counts from the end
    /// (`-1` is the last element). Index 0 and out-of-range indexes give `None`.
    pub fn index(&self, index: i64) -> Option<&Value> {
        let Value::Array(items) = self else { return None };
        let position = if index > 0 {
            usize::try_from(index - 1).ok()?
        } else if index < 0 {
            let back = usize::try_from(index.unsigned_abs()).ok()?;
            items.len().checked_sub(back)?
        } else {
            return None;
        };
        items.get(position)
    }

    /// Sets `key` in an object, replacing an existing entry. On a non-object it does nothing.
    pub fn insert(&mut self, key: &str, value: Value) {
        if let Value::Object(pairs) = self {
            match pairs.iter_mut().find(|(k, _)| k == key) {
                Some((_, slot)) => *slot = value,
                None => pairs.push((key.to_owned(), value)),
            }
        }
    }

    /// Sets a nested path (`["payload", "a", "b"]`), creating objects on the way, as EMQX
    /// does for `SELECT payload.a.b`. An intermediate non-object is replaced by an object.
    pub fn insert_path(&mut self, path: &[String], value: Value) {
        let Some((last, init)) = path.split_last() else { return };
        let mut node = self;
        for key in init {
            if !matches!(node.get(key), Some(Value::Object(_))) {
                node.insert(key, Value::Object(Vec::new()));
            }
            let Value::Object(pairs) = node else { return };
            let Some((_, child)) = pairs.iter_mut().find(|(k, _)| k == key) else { return };
            node = child;
        }
        node.insert(last, value);
    }

    /// Puts `value` at `path` as EMQX's `emqx_rule_maps:nested_put` does: a key step makes
    /// an object of what is not one (JSON text of an object is decoded first, as EMQX decodes
    /// binaries on the way); an index step (1-based, negative from the end) goes into an
    /// existing element, leaves an array unchanged when out of range, and makes a one-element
    /// array of what is not an array.
    pub(crate) fn put_path(&mut self, path: &[crate::expr::PathSeg], value: Value) {
        use crate::expr::PathSeg;
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return;
        };
        if let Value::Str(text) = self {
            if let Ok(decoded @ (Value::Object(_) | Value::Array(_))) = Value::from_json(text.as_bytes()) {
                *self = decoded;
            }
        }
        match first {
            PathSeg::Key(key) => {
                if !matches!(self, Value::Object(_)) {
                    *self = Value::Object(Vec::new());
                }
                let Value::Object(pairs) = self else { return };
                let at = match pairs.iter().rposition(|(k, _)| k == key) {
                    Some(at) => at,
                    None => {
                        pairs.push((key.clone(), Value::Null));
                        pairs.len() - 1
                    }
                };
                if let Some((_, child)) = pairs.get_mut(at) {
                    child.put_path(rest, value);
                }
            }
            PathSeg::Index(index) => {
                let Value::Array(items) = self else {
                    let mut child = Value::Null;
                    child.put_path(rest, value);
                    *self = Value::Array(vec![child]);
                    return;
                };
                if matches!(*index, crate::expr::PUT_HEAD | crate::expr::PUT_TAIL) {
                    let mut child = Value::Null;
                    child.put_path(rest, value);
                    if *index == crate::expr::PUT_HEAD {
                        items.insert(0, child);
                    } else {
                        items.push(child);
                    }
                    return;
                }
                let position = if *index > 0 {
                    usize::try_from(index - 1).ok()
                } else {
                    usize::try_from(index.unsigned_abs()).ok().and_then(|back| items.len().checked_sub(back))
                };
                if let Some(child) = position.and_then(|p| items.get_mut(p)) {
                    child.put_path(rest, value);
                }
            }
        }
    }

    /// The text of a value as `str()` renders it: strings as they are, numbers in decimal,
    /// arrays and objects as JSON, a JSON `null` as `null` (EMQX's `atom_to_binary(null)`).
    /// `None` for NULL and for bytes that are not UTF-8.
    pub fn to_text(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::Null => None,
            Value::JsonNull => Some(Cow::Borrowed("null")),
            Value::Str(s) => Some(Cow::Borrowed(s)),
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Value::Int(i) => Some(Cow::Owned(i.to_string())),
            Value::Float(f) => Some(Cow::Owned(float_text(*f))),
            Value::Array(_) | Value::Object(_) => Some(Cow::Owned(self.to_json_string())),
        }
    }

    /// Compact JSON text. Bytes become a string (base64 if not UTF-8); NaN and infinities
    /// become `null`, as JSON has no spelling for them.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses JSON text. Errors carry serde_json's line and column.
    pub fn from_json(bytes: &[u8]) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Parses one complete CBOR item; trailing bytes are an error.
    pub fn from_cbor(mut bytes: &[u8]) -> Result<Value, String> {
        let value: Value = ciborium::from_reader(&mut bytes).map_err(|e| match e {
            ciborium::de::Error::Io(_) => "unexpected end of data".to_owned(),
            ciborium::de::Error::Syntax(offset) => format!("syntax error at byte {offset}"),
            ciborium::de::Error::Semantic(_, message) => message,
            ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_owned(),
        })?;
        if bytes.is_empty() {
            Ok(value)
        } else {
            Err(format!("{} trailing bytes after the CBOR item", bytes.len()))
        }
    }

    /// CBOR encoding. Writing to a `Vec` cannot fail for this data model.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // A `Vec` writer never fails and `Value` serializes every variant.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// An unsigned integer: `Int` when it fits in `i64`, otherwise the nearest `Float`.
    pub(crate) fn from_meta_u64(n: u64) -> Value {
        i64::try_from(n).map(Value::Int).unwrap_or(Value::Float(n as f64))
    }
}

/// A float as EMQX's `str()` writes it (`float_to_binary(F, [{decimals, 10}, compact])`): at
/// most 10 decimals, trailing zeros dropped but one kept (`31.5`, `2.0`, `0.3333333333`).
pub(crate) fn float_text(f: f64) -> String {
    if f.is_finite() { crate::functions::compact_decimals(f, 10) } else { format!("{f}") }
}

/// Floats print like Rust's `{:?}`: shortest round-trip form, always with a fraction or an
/// exponent, so `1.0` stays distinguishable from the integer `1`.
pub(crate) fn format_float(f: f64) -> String {
    if f.is_finite() { format!("{f:?}") } else { format!("{f}") }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Str(s) => write!(f, "'{s}'"),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            other => f.write_str(&other.to_text().unwrap_or_default()),
        }
    }
}

impl From<serde_json::Value> for Value {
    fn from(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::JsonNull,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s),
            serde_json::Value::Array(a) => Value::Array(a.into_iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
            }
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null | Value::JsonNull => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Bytes(b) => {
                if serializer.is_human_readable() {
                    match std::str::from_utf8(b) {
                        Ok(text) => serializer.serialize_str(text),
                        Err(_) => {
                            use base64::Engine as _;
                            let text = base64::engine::general_purpose::STANDARD.encode(b);
                            serializer.serialize_str(&text)
                        }
                    }
                } else {
                    serializer.serialize_bytes(b)
                }
            }
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(pairs) => {
                let mut map = serializer.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON or CBOR value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from_meta_u64(v))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(i64::try_from(v).map(Value::Int).unwrap_or(Value::Float(v as f64)))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Value, E> {
        Ok(i64::try_from(v).map(Value::Int).unwrap_or(Value::Float(v as f64)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    // Decoded data's `null` is a value, not a missing field (EMQX's JSON decoder gives the
    // atom `null`). ciborium reports CBOR's null and undefined both here.
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::JsonNull)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::JsonNull)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(key) = map.next_key::<Value>()? {
            let value = map.next_value::<Value>()?;
            let key = match key {
                Value::Str(s) => s,
                other => other.to_text().map(Cow::into_owned).unwrap_or_else(|| other.to_json_string()),
            };
            pairs.push((key, value));
        }
        Ok(Value::Object(pairs))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("enums are not part of the data model"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_cbor_round_trip() {
        let v = Value::from_json(br#"{"a":[1,2.5,"x",null,true],"b":{"c":-3}}"#).unwrap();
        assert_eq!(v.to_json_string(), r#"{"a":[1,2.5,"x",null,true],"b":{"c":-3}}"#);
        assert_eq!(Value::from_cbor(&v.to_cbor()).unwrap(), v);
        assert!(Value::from_cbor(&[0xa0, 0x00]).is_err(), "trailing bytes are refused");
    }

    #[test]
    fn json_null_is_a_value_distinct_from_null() {
        let v = Value::from_json(br#"{"x":null}"#).unwrap();
        assert_eq!(v.get("x"), Some(&Value::JsonNull));
        assert_eq!(Value::from(serde_json::json!({"x": null})), v);
        assert!(!Value::JsonNull.is_null() && Value::JsonNull.is_null_var() && Value::Null.is_null_var());
        assert_eq!(Value::JsonNull.to_text().as_deref(), Some("null"));
        assert_eq!(Value::Null.to_text(), None);
        assert_eq!(Value::Array(vec![Value::JsonNull, Value::Null]).to_json_string(), "[null,null]");
        // CBOR null (0xf6) and undefined (0xf7) both decode to the JSON null value.
        assert_eq!(Value::from_cbor(&[0xf6]).unwrap(), Value::JsonNull);
        assert_eq!(Value::from_cbor(&[0xf7]).unwrap(), Value::JsonNull);
        assert_eq!(Value::JsonNull.to_cbor(), vec![0xf6]);
    }

    #[test]
    fn indexes_are_one_based_and_negative_from_the_end() {
        let v = Value::from_json(b"[10,20,30]").unwrap();
        assert_eq!(v.index(1), Some(&Value::Int(10)));
        assert_eq!(v.index(-1), Some(&Value::Int(30)));
        assert_eq!(v.index(0), None);
        assert_eq!(v.index(4), None);
        assert_eq!(v.index(i64::MIN), None);
    }

    #[test]
    fn nested_insert_builds_objects() {
        let mut row = Value::Object(Vec::new());
        row.insert_path(&["payload".into(), "a".into()], Value::Int(1));
        row.insert_path(&["payload".into(), "b".into()], Value::Int(2));
        assert_eq!(row.to_json_string(), r#"{"payload":{"a":1,"b":2}}"#);
    }
}
