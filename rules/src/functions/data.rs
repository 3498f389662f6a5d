//! Array and map functions as EMQX defines them (`emqx_rule_funcs`): `first`, `last`,
//! `sublist`, `map()`, `map_get`/`map_put` (dotted paths, JSON text decoded on the way, as
//! `emqx_rule_maps` does), `mget`/`mput` (one key, no dots), `map_keys`, `map_values`,
//! `map_to_entries`, `map_size`, `is_empty`.

use std::borrow::Cow;

use crate::expr::{Env, EvalError, describe, text_of};
use crate::value::Value;

use super::{arg, count, want_int, want_str};

fn want_array<'v>(args: &'v [Value], idx: usize, name: &str) -> Result<&'v [Value], EvalError> {
    match arg(args, idx) {
        Value::Array(items) => Ok(items),
        other => Err(EvalError::new(format!("{name}: expected an array, got {}", describe(other)))),
    }
}

pub(super) fn first(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    want_array(args, 0, "first")?.first().cloned().ok_or_else(|| EvalError::new("first: the array is empty"))
}

pub(super) fn last(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    want_array(args, 0, "last")?.last().cloned().ok_or_else(|| EvalError::new("last: the array is empty"))
}

/// `sublist(len, array)` and `sublist(start, len, array)` (Erlang's `lists:sublist`):
/// `start` is 1-based and may be one past the end (giving `[]`); `len` is a maximum.
pub(super) fn sublist(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let (start, len, items) = match args.len() {
        2 => (1, want_int(args, 0, "sublist")?, want_array(args, 1, "sublist")?),
        _ => (want_int(args, 0, "sublist")?, want_int(args, 1, "sublist")?, want_array(args, 2, "sublist")?),
    };
    let len = usize::try_from(len)
        .map_err(|_| EvalError::new(format!("sublist: length must be >= 0, got {len}")))?;
    let start =
        usize::try_from(start).ok().filter(|s| (1..=items.len() + 1).contains(s)).ok_or_else(|| {
            EvalError::new(format!("sublist: start {start} is outside 1..={}", items.len() + 1))
        })?;
    Ok(Value::Array(items.iter().skip(start - 1).take(len).cloned().collect()))
}

/// `map(x)`: an object as it is; JSON text of an object decoded; an array of `[key, value]`
/// pairs (or `[]`) as an object. Anything else is an error, as in EMQX.
pub(super) fn to_map<'v>(value: &'v Value, name: &str) -> Result<Cow<'v, [(String, Value)]>, EvalError> {
    match value {
        Value::Object(pairs) => Ok(Cow::Borrowed(pairs)),
        Value::Str(_) | Value::Bytes(_) => {
            let decoded = text_of(value).and_then(|t| Value::from_json(t.as_bytes()).ok());
            match decoded {
                Some(Value::Object(pairs)) => Ok(Cow::Owned(pairs)),
                _ => Err(EvalError::new(format!(
                    "{name}: {} is not the JSON text of an object",
                    describe(value)
                ))),
            }
        }
        Value::Array(items) => {
            let mut pairs = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        let key = match &pair[0] {
                            Value::Str(k) => k.clone(),
                            other => other.to_text().map(Cow::into_owned).unwrap_or_default(),
                        };
                        pairs.push((key, pair[1].clone()));
                    }
                    other => {
                        return Err(EvalError::new(format!(
                            "{name}: an array converts to a map only as [key, value] pairs, got {}",
                            describe(other)
                        )));
                    }
                }
            }
            Ok(Cow::Owned(pairs))
        }
        other => Err(EvalError::new(format!("{name}: cannot convert {} to a map", describe(other)))),
    }
}

/// Last value of `key` (decoded objects may repeat keys; the last one wins, as in a map).
fn lookup<'p>(pairs: &'p [(String, Value)], key: &str) -> Option<&'p Value> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

pub(super) fn map(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(Value::Object(to_map(arg(args, 0), "map")?.into_owned()))
}

/// One step of `map_get`'s walk: an object's field, or the field of an object that JSON
/// text decodes to (`emqx_rule_maps:general_find` decodes binaries).
fn step(value: &Value, key: &str) -> Option<Value> {
    match value {
        Value::Object(pairs) => lookup(pairs, key).cloned(),
        Value::Str(_) | Value::Bytes(_) => {
            match text_of(value).and_then(|t| Value::from_json(t.as_bytes()).ok()) {
                Some(Value::Object(pairs)) => lookup(&pairs, key).cloned(),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `map_get('a.b', map[, default])`: the dotted path; a missing step gives `default` (NULL).
pub(super) fn map_get(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let key = want_str(args, 0, "map_get")?;
    let default = arg(args, 2).clone();
    let mut node = arg(args, 1).clone();
    for part in key.split('.') {
        match step(&node, part) {
            Some(Value::Null) | None => return Ok(default),
            Some(next) => node = next,
        }
    }
    Ok(node)
}

/// `map_put('a.b', value, map)`: sets the dotted path, creating objects on the way and
/// replacing anything that is not an object; a `map` that is not an object starts empty.
pub(super) fn map_put(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let key = want_str(args, 0, "map_put")?;
    let value = arg(args, 1).clone();
    let mut root = match arg(args, 2) {
        map @ Value::Object(_) => map.clone(),
        _ => Value::Object(Vec::new()),
    };
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    root.insert_path(&path, value);
    Ok(root)
}

/// `mget(key, map[, default])`: one key, dots included; `map` may be JSON text.
pub(super) fn mget(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let key = want_str(args, 0, "mget")?;
    let pairs = to_map(arg(args, 1), "mget")?;
    Ok(lookup(&pairs, key).cloned().unwrap_or_else(|| arg(args, 2).clone()))
}

/// `mput(key, value, map)`: one key, dots included; `map` may be JSON text.
pub(super) fn mput(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let key = want_str(args, 0, "mput")?;
    let mut map = Value::Object(to_map(arg(args, 2), "mput")?.into_owned());
    map.insert(key, arg(args, 1).clone());
    Ok(map)
}

pub(super) fn map_keys(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let pairs = to_map(arg(args, 0), "map_keys")?;
    Ok(Value::Array(pairs.iter().map(|(k, _)| Value::Str(k.clone())).collect()))
}

pub(super) fn map_values(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let pairs = to_map(arg(args, 0), "map_values")?;
    Ok(Value::Array(pairs.iter().map(|(_, v)| v.clone()).collect()))
}

/// `map_to_entries(map)`: `[{"key": k, "value": v}, ...]`.
pub(super) fn map_to_entries(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let pairs = to_map(arg(args, 0), "map_to_entries")?;
    Ok(Value::Array(
        pairs
            .iter()
            .map(|(k, v)| {
                Value::Object(vec![
                    ("key".to_owned(), Value::Str(k.clone())),
                    ("value".to_owned(), v.clone()),
                ])
            })
            .collect(),
    ))
}

pub(super) fn map_size(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(Value::Int(count(to_map(arg(args, 0), "map_size")?.len())))
}

/// `is_empty(x)`: `[]` and `''` are empty, other arrays are not; anything else is converted
/// as by `map()` and empty when it has no keys (so `'{}'` is empty, `'abc'` an error).
pub(super) fn is_empty(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(Value::Bool(match arg(args, 0) {
        Value::Array(items) => items.is_empty(),
        Value::Str(s) if s.is_empty() => true,
        Value::Bytes(b) if b.is_empty() => true,
        other => to_map(other, "is_empty")?.is_empty(),
    }))
}
