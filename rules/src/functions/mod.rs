//! The builtin functions: one table, [`BUILTINS`], that the compiler resolves names
//! against and the README documents one by one.
//!
//! Names and semantics follow EMQX where EMQX has the function; Outpost's additions and
//! aliases are marked in the README. Arity is checked at compile time. A function with
//! `null_in_null_out` fails on a NULL argument without being called, as EMQX's functions
//! have no clause for `undefined` (their guards, `is_number` and the like, refuse it); the
//! others look at NULL themselves.
//! A wrong argument type or an out-of-domain value is an [`EvalError`] (the rule's dead
//! letter names the function), never a panic.
//!
//! `topic(N)`, `lookup(..)`, and `regex_match`/`regex_replace` with literal patterns are
//! resolved by the compiler into dedicated plan nodes; the entries here handle the rest.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::expr::{Env, EvalError, Num, describe, equal, number, order, text_of};
use crate::time::{self, DateTime, Unit};
use crate::value::Value;

mod bytes;
mod data;
mod text;

pub(crate) use text::compact_decimals;

pub(crate) type Eval = fn(&[Value], &Env<'_>) -> Result<Value, EvalError>;

/// A builtin function.
#[derive(Debug)]
pub(crate) struct Builtin {
    pub name: &'static str,
    pub min_args: usize,
    /// `usize::MAX` for variadic functions.
    pub max_args: usize,
    pub null_in_null_out: bool,
    pub eval: Eval,
}

const fn f(name: &'static str, min_args: usize, max_args: usize, eval: Eval) -> Builtin {
    Builtin { name, min_args, max_args, null_in_null_out: true, eval }
}

/// Functions that look at NULL arguments themselves.
const fn n(name: &'static str, min_args: usize, max_args: usize, eval: Eval) -> Builtin {
    Builtin { name, min_args, max_args, null_in_null_out: false, eval }
}

const MANY: usize = usize::MAX;

/// Every builtin, by name. Aliases are separate entries sharing an implementation.
pub(crate) static BUILTINS: &[Builtin] = &[
    // Math.
    f("abs", 1, 1, abs),
    f("ceil", 1, 1, |a, _| to_int_fn(a, "ceil", f64::ceil)),
    f("floor", 1, 1, |a, _| to_int_fn(a, "floor", f64::floor)),
    f("round", 1, 1, |a, _| to_int_fn(a, "round", f64::round)),
    f("sqrt", 1, 1, |a, _| float_fn(a, "sqrt", f64::sqrt)),
    f("exp", 1, 1, |a, _| float_fn(a, "exp", f64::exp)),
    f("log", 1, 1, |a, _| float_fn(a, "log", f64::ln)),
    f("log10", 1, 1, |a, _| float_fn(a, "log10", f64::log10)),
    f("log2", 1, 1, |a, _| float_fn(a, "log2", f64::log2)),
    f("sin", 1, 1, |a, _| float_fn(a, "sin", f64::sin)),
    f("cos", 1, 1, |a, _| float_fn(a, "cos", f64::cos)),
    f("tan", 1, 1, |a, _| float_fn(a, "tan", f64::tan)),
    f("asin", 1, 1, |a, _| float_fn(a, "asin", f64::asin)),
    f("acos", 1, 1, |a, _| float_fn(a, "acos", f64::acos)),
    f("atan", 1, 1, |a, _| float_fn(a, "atan", f64::atan)),
    f("sinh", 1, 1, |a, _| float_fn(a, "sinh", f64::sinh)),
    f("cosh", 1, 1, |a, _| float_fn(a, "cosh", f64::cosh)),
    f("tanh", 1, 1, |a, _| float_fn(a, "tanh", f64::tanh)),
    f("acosh", 1, 1, |a, _| float_fn(a, "acosh", f64::acosh)),
    f("asinh", 1, 1, |a, _| float_fn(a, "asinh", f64::asinh)),
    f("atanh", 1, 1, |a, _| float_fn(a, "atanh", f64::atanh)),
    f("div", 2, 2, |a, _| int_div(a, "div")),
    f("mod", 2, 2, |a, _| int_div(a, "mod")),
    f("random", 0, 0, |_, _| Ok(bytes::random())),
    // Bit operations on integers, and on bytes.
    f("bitnot", 1, 1, |a, _| bytes::bits(a, "bitnot")),
    f("bitand", 2, 2, |a, _| bytes::bits(a, "bitand")),
    f("bitor", 2, 2, |a, _| bytes::bits(a, "bitor")),
    f("bitxor", 2, 2, |a, _| bytes::bits(a, "bitxor")),
    f("bitsl", 2, 2, |a, _| bytes::bits(a, "bitsl")),
    f("bitsr", 2, 2, |a, _| bytes::bits(a, "bitsr")),
    f("bitsize", 1, 1, bytes::bitsize),
    f("bytesize", 1, 1, bytes::bytesize),
    f("subbits", 2, 6, bytes::subbits),
    f("power", 2, 2, |a, _| power(a, "power")),
    f("pow", 2, 2, |a, _| power(a, "pow")),
    f("fmod", 2, 2, fmod),
    n("greatest", 1, MANY, |a, _| extreme(a, Ordering::Greater)),
    n("least", 1, MANY, |a, _| extreme(a, Ordering::Less)),
    // Type checks and conversion.
    n("is_null", 1, 1, |a, _| Ok(Value::Bool(arg(a, 0).is_null()))),
    n("is_not_null", 1, 1, |a, _| Ok(Value::Bool(!arg(a, 0).is_null()))),
    n("is_str", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Str(_))))),
    n("is_num", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Int(_) | Value::Float(_))))),
    n("is_int", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Int(_))))),
    n("is_float", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Float(_))))),
    n("is_bool", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Bool(_))))),
    n("is_map", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Object(_))))),
    n("is_array", 1, 1, |a, _| Ok(Value::Bool(matches!(arg(a, 0), Value::Array(_))))),
    // The `_var` forms also take a JSON null for null (`emqx_rule_funcs:is_null_var`).
    n("is_null_var", 1, 1, |a, _| Ok(Value::Bool(arg(a, 0).is_null_var()))),
    n("is_not_null_var", 1, 1, |a, _| Ok(Value::Bool(!arg(a, 0).is_null_var()))),
    n("is_empty", 1, 1, |a, e| match arg(a, 0) {
        Value::Null => Err(EvalError::new("is_empty: the argument is NULL (EMQX: badarg)")),
        // EMQX's is_empty falls through to map_size(null), which fails.
        Value::JsonNull => Err(EvalError::new("is_empty: the argument is a JSON null (EMQX: badmap)")),
        _ => data::is_empty(a, e),
    }),
    f("int", 1, 1, int),
    f("float", 1, 2, float),
    // EMQX's str(undefined) is the atom's text, `undefined`.
    n("str", 1, 1, |a, _| match arg(a, 0) {
        Value::Null => Ok(Value::Str("undefined".to_owned())),
        other => str_of(other, "str").map(Value::Str),
    }),
    n("str_utf8", 1, 1, bytes::str_utf8),
    n("str_utf16_le", 1, 1, text::str_utf16_le),
    f("float2str", 2, 2, text::float2str),
    f("map", 1, 1, data::map),
    f("bool", 1, 1, bool_fn),
    // `topic =~ 'filter'`: EMQX's compare('=~') is false when either side is undefined.
    n("topic_match", 2, 2, |a, _| match (text_of(arg(a, 0)), text_of(arg(a, 1))) {
        (Some(topic), Some(filter)) => Ok(Value::Bool(outpost_topic::filter_matches(filter, topic))),
        _ => Ok(Value::Bool(false)),
    }),
    n("coalesce", 1, MANY, |a, _| Ok(a.iter().find(|v| !v.is_null()).cloned().unwrap_or(Value::Null))),
    n("coalesce_ne", 1, MANY, |a, _| {
        let empty = |v: &Value| {
            v.is_null()
                || matches!(v, Value::Str(s) if s.is_empty())
                || matches!(v, Value::Bytes(b) if b.is_empty())
        };
        Ok(a.iter().find(|v| !empty(v)).cloned().unwrap_or(Value::Null))
    }),
    // Strings.
    n("lower", 1, 1, |a, _| Ok(Value::Str(text::subject(a, "lower")?.to_lowercase()))),
    n("upper", 1, 1, |a, _| Ok(Value::Str(text::subject(a, "upper")?.to_uppercase()))),
    n("trim", 1, 1, |a, _| Ok(Value::Str(text::subject(a, "trim")?.trim().to_owned()))),
    n("ltrim", 1, 1, |a, _| Ok(Value::Str(text::subject(a, "ltrim")?.trim_start().to_owned()))),
    n("rtrim", 1, 2, text::rtrim),
    n("reverse", 1, 1, |a, _| Ok(Value::Str(text::subject(a, "reverse")?.chars().rev().collect()))),
    n("strlen", 1, 1, |a, _| Ok(Value::Int(count(text::subject(a, "strlen")?.chars().count())))),
    n("concat", 1, MANY, concat),
    n("substr", 2, 3, substr),
    n("substring", 2, 3, substr),
    n("split", 2, 3, text::split),
    n("tokens", 2, 3, text::tokens),
    n("replace", 3, 4, replace),
    n("find", 2, 3, find),
    n("regex_match", 2, 2, regex_match),
    n("regex_replace", 3, 3, regex_replace),
    n("regex_extract", 2, 2, text::regex_extract),
    n("pad", 2, 4, text::pad),
    n("rm_prefix", 2, 2, text::rm_prefix),
    n("ascii", 1, 1, text::ascii),
    n("unescape", 1, 1, text::unescape),
    n("sprintf", 1, MANY, text::sprintf),
    f("join_to_string", 1, 2, text::join_to_string),
    // Arrays.
    f("length", 1, 1, length),
    f("nth", 2, 2, nth),
    // EMQX: `lists:member`, so NULL is in a list that holds NULL.
    n("contains", 2, 2, |a, _| match arg(a, 1) {
        Value::Array(items) => {
            Ok(Value::Bool(items.iter().any(|i| match (i.is_null(), arg(a, 0).is_null()) {
                (true, true) => true,
                (false, false) => equal(i, arg(a, 0)),
                _ => false,
            })))
        }
        other => Err(EvalError::new(format!("contains: expected an array, got {}", describe(other)))),
    }),
    f("first", 1, 1, data::first),
    f("last", 1, 1, data::last),
    f("sublist", 2, 3, data::sublist),
    // Maps.
    f("map_new", 0, 0, |_, _| Ok(Value::Object(Vec::new()))),
    n("map_get", 2, 3, data::map_get),
    n("map_put", 3, 3, data::map_put),
    n("mget", 2, 3, data::mget),
    n("mput", 3, 3, data::mput),
    f("map_keys", 1, 1, data::map_keys),
    f("map_values", 1, 1, data::map_values),
    f("map_to_entries", 1, 1, data::map_to_entries),
    f("map_size", 1, 1, data::map_size),
    // Time.
    f("now_rfc3339", 0, 1, now_rfc3339),
    f("date_to_unix_ts", 3, 4, date_to_unix_ts),
    n("timezone_to_offset_seconds", 1, 1, |a, _| timezone_to_offset(a, "timezone_to_offset_seconds")),
    n("timezone_to_second", 1, 1, |a, _| timezone_to_offset(a, "timezone_to_second")),
    f("now_timestamp", 0, 1, now_timestamp),
    f("now", 0, 1, now_timestamp),
    f("unix_ts_to_rfc3339", 1, 2, unix_ts_to_rfc3339),
    f("rfc3339_to_unix_ts", 1, 2, rfc3339_to_unix_ts),
    f("format_date", 3, 4, format_date),
    f("format_time", 1, 1, |a, _| {
        let ts = want_int(a, 0, "format_time")?;
        Ok(Value::Str(
            DateTime::from_unix(ts, Unit::Millisecond, 0)
                .map_err(fail("format_time"))?
                .rfc3339(Unit::Millisecond),
        ))
    }),
    f("parse_time", 1, 1, |a, _| {
        let text = want_str(a, 0, "parse_time")?;
        let dt = time::parse_rfc3339(text).map_err(fail("parse_time"))?;
        dt.to_unix(Unit::Millisecond)
            .map(Value::Int)
            .ok_or_else(|| EvalError::new("parse_time: out of range"))
    }),
    // Encoding.
    f("base64_encode", 1, 3, bytes::base64_encode),
    f("base64_decode", 1, 3, bytes::base64_decode),
    f("bin2hexstr", 1, 2, |a, _| bytes::bin2hexstr(a, "bin2hexstr")),
    f("hex_encode", 1, 2, |a, _| bytes::bin2hexstr(a, "hex_encode")),
    f("sqlserver_bin2hexstr", 1, 1, |a, _| {
        bytes::bin2hexstr(&[arg(a, 0).clone(), Value::Str("0x".to_owned())], "sqlserver_bin2hexstr")
    }),
    f("hexstr2bin", 1, 2, |a, _| bytes::hexstr2bin(a, "hexstr2bin")),
    f("hex_decode", 1, 2, |a, _| bytes::hexstr2bin(a, "hex_decode")),
    n("json_encode", 1, 1, |a, _| Ok(Value::Str(arg(a, 0).to_json_string()))),
    f("json_decode", 1, 1, |a, _| {
        let text = want_str(a, 0, "json_decode")?;
        Value::from_json(text.as_bytes()).map_err(fail("json_decode"))
    }),
    // Hashes and compression.
    f("md5", 1, 1, bytes::md5),
    f("sha", 1, 1, bytes::sha),
    f("sha256", 1, 1, bytes::sha256),
    f("hash", 2, 2, bytes::hash),
    f("zip", 1, 1, |a, _| bytes::compress(a, bytes::Codec::Deflate, "zip")),
    f("unzip", 1, 1, |a, _| bytes::decompress(a, bytes::Codec::Deflate, "unzip")),
    f("gzip", 1, 1, |a, _| bytes::compress(a, bytes::Codec::Gzip, "gzip")),
    f("gunzip", 1, 1, |a, _| bytes::decompress(a, bytes::Codec::Gzip, "gunzip")),
    f("zip_compress", 1, 1, |a, _| bytes::compress(a, bytes::Codec::Zlib, "zip_compress")),
    f("zip_uncompress", 1, 1, |a, _| bytes::decompress(a, bytes::Codec::Zlib, "zip_uncompress")),
    // Random and system.
    f("uuid_v4", 0, 0, |_, _| Ok(bytes::uuid_v4(true))),
    f("uuid_v4_no_hyphen", 0, 0, |_, _| Ok(bytes::uuid_v4(false))),
    f("getenv", 1, 1, getenv),
];

/// EMQX functions Outpost does not have, with what to write instead. The compiler reports
/// these by name rather than as unknown functions.
pub(crate) static NOT_SUPPORTED: &[(&str, &str)] = &[
    (
        "jq",
        "jq programs are not supported (EMQX stops them with a timeout; nothing can stop one here): read fields with paths (payload.a.b), ranges (payload.a[1..3]), FOREACH, map_get or json_decode",
    ),
    ("term_encode", "Erlang terms do not exist outside EMQX; use json_encode"),
    ("term_decode", "Erlang terms do not exist outside EMQX; use json_decode"),
    ("proc_dict_get", "rules keep no state between events in Outpost"),
    ("proc_dict_put", "rules keep no state between events in Outpost"),
    ("proc_dict_del", "rules keep no state between events in Outpost"),
    ("kv_store_get", "rules keep no state between events in Outpost; use a lookup table"),
    ("kv_store_put", "rules keep no state between events in Outpost"),
    ("kv_store_del", "rules keep no state between events in Outpost"),
    ("mongo_date", "there is no MongoDB action in Outpost; use format_date or unix_ts_to_rfc3339"),
    ("schema_decode", "schema registry decoding is not supported; send JSON or CBOR (payload = \"cbor\")"),
    ("schema_encode", "schema registry encoding is not supported; use an action with format = \"cbor\""),
    ("spb_decode", "Sparkplug B decoding is not supported"),
    ("spb_encode", "Sparkplug B encoding is not supported"),
    ("map_to_redis_hset_args", "there is no Redis action in Outpost"),
    ("join_to_sql_values_string", "there is no SQL database action in Outpost"),
];

pub(crate) fn find_builtin(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

static NULL: Value = Value::Null;

fn arg(args: &[Value], idx: usize) -> &Value {
    args.get(idx).unwrap_or(&NULL)
}

fn fail<E: std::fmt::Display>(name: &'static str) -> impl Fn(E) -> EvalError {
    move |e| EvalError::new(format!("{name}: {e}"))
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn want_num(args: &[Value], idx: usize, name: &str) -> Result<Num, EvalError> {
    let value = arg(args, idx);
    number(value).ok_or_else(|| EvalError::new(format!("{name}: expected a number, got {}", describe(value))))
}

fn want_int(args: &[Value], idx: usize, name: &str) -> Result<i64, EvalError> {
    match want_num(args, idx, name)? {
        Num::Int(i) => Ok(i),
        Num::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        Num::Float(f) => Err(EvalError::new(format!("{name}: expected an integer, got float {f}"))),
    }
}

fn want_str<'v>(args: &'v [Value], idx: usize, name: &str) -> Result<&'v str, EvalError> {
    let value = arg(args, idx);
    text_of(value)
        .ok_or_else(|| EvalError::new(format!("{name}: expected a string, got {}", describe(value))))
}

/// The bytes of a string or byte string.
fn bytes_of<'v>(args: &'v [Value], idx: usize, name: &str) -> Result<&'v [u8], EvalError> {
    match arg(args, idx) {
        Value::Str(s) => Ok(s.as_bytes()),
        Value::Bytes(b) => Ok(b),
        other => Err(EvalError::new(format!("{name}: expected a string or bytes, got {}", describe(other)))),
    }
}

/// Decoded bytes are a string when they are UTF-8 (as EMQX binaries print), bytes otherwise.
fn bytes_value(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(s) => Value::Str(s),
        Err(e) => Value::Bytes(e.into_bytes()),
    }
}

fn finite(f: f64, name: &str) -> Result<Value, EvalError> {
    if f.is_finite() {
        Ok(Value::Float(f))
    } else {
        Err(EvalError::new(format!("{name}: argument out of domain (result is {f})")))
    }
}

fn abs(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    Ok(match want_num(args, 0, "abs")? {
        Num::Int(i) => i.checked_abs().map(Value::Int).unwrap_or(Value::Float((i as f64).abs())),
        Num::Float(f) => Value::Float(f.abs()),
    })
}

fn float_fn(args: &[Value], name: &str, op: fn(f64) -> f64) -> Result<Value, EvalError> {
    finite(op(want_num(args, 0, name)?.as_f64()), name)
}

/// `ceil`, `floor`, `round`: an integer result, as in EMQX.
fn to_int_fn(args: &[Value], name: &str, op: fn(f64) -> f64) -> Result<Value, EvalError> {
    match want_num(args, 0, name)? {
        Num::Int(i) => Ok(Value::Int(i)),
        Num::Float(f) => float_to_int(op(f), name),
    }
}

fn float_to_int(f: f64, name: &str) -> Result<Value, EvalError> {
    if f.is_finite() && (-9.223_372_036_854_775e18..=9.223_372_036_854_775e18).contains(&f) {
        Ok(Value::Int(f as i64))
    } else {
        Err(EvalError::new(format!("{name}: {f} does not fit in an integer")))
    }
}

fn power(args: &[Value], name: &str) -> Result<Value, EvalError> {
    let (x, y) = (want_num(args, 0, name)?.as_f64(), want_num(args, 1, name)?.as_f64());
    finite(x.powf(y), name)
}

fn fmod(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let (x, y) = (want_num(args, 0, "fmod")?.as_f64(), want_num(args, 1, "fmod")?.as_f64());
    if y == 0.0 {
        return Err(EvalError::new("fmod: division by zero"));
    }
    finite(x % y, "fmod")
}

/// `greatest`/`least`: NULL arguments and JSON nulls are skipped (as PostgreSQL skips
/// NULL); all NULL gives NULL.
fn extreme(args: &[Value], want: Ordering) -> Result<Value, EvalError> {
    let mut best: Option<&Value> = None;
    for value in args.iter().filter(|v| !v.is_null_var()) {
        best = match best {
            Some(current) if order(value, current)? != want => Some(current),
            _ => Some(value),
        };
    }
    Ok(best.cloned().unwrap_or(Value::Null))
}

/// `int`: floats are floored (EMQX), numeric strings parsed, booleans are 1/0.
fn int(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    match arg(args, 0) {
        Value::Bool(b) => Ok(Value::Int(i64::from(*b))),
        other => match number(other) {
            Some(Num::Int(i)) => Ok(Value::Int(i)),
            Some(Num::Float(f)) => float_to_int(f.floor(), "int"),
            None => Err(EvalError::new(format!("int: cannot convert {}", describe(other)))),
        },
    }
}

/// `float(x[, decimals])`: numbers and numeric strings; with `decimals`, rounded to that
/// many places (EMQX 5's two-argument form).
fn float(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let value = want_num(args, 0, "float")?.as_f64();
    if args.len() < 2 {
        return Ok(Value::Float(value));
    }
    let decimals = want_int(args, 1, "float")?;
    let decimals = usize::try_from(decimals)
        .ok()
        .filter(|d| (1..=253).contains(d))
        .ok_or_else(|| EvalError::new(format!("float: decimals must be 1..=253, got {decimals}")))?;
    // Erlang's float_to_list(F, [{decimals, N}]) rounds the exact binary value, as Rust's
    // formatting does; parsing that text back gives EMQX's float.
    finite(format!("{value:.decimals$}").parse().unwrap_or(f64::NAN), "float")
}

/// A value as EMQX's `emqx_utils_conv:bin/1` writes it; NULL is the atom's text, `undefined`.
fn str_of(value: &Value, name: &str) -> Result<String, EvalError> {
    if value.is_null() {
        return Ok("undefined".to_owned());
    }
    value
        .to_text()
        .map(Cow::into_owned)
        .ok_or_else(|| EvalError::new(format!("{name}: cannot convert {} to a string", describe(value))))
}

/// `bool`: booleans, `'true'`/`'false'`, and the integers 1/0 (EMQX).
fn bool_fn(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    match arg(args, 0) {
        Value::Bool(b) => Ok(Value::Bool(*b)),
        Value::Int(1) => Ok(Value::Bool(true)),
        Value::Int(0) => Ok(Value::Bool(false)),
        // Erlang's `N == 1` is true for 1.0 too.
        Value::Float(f) if *f == 1.0 => Ok(Value::Bool(true)),
        Value::Float(f) if *f == 0.0 => Ok(Value::Bool(false)),
        value => match text_of(value) {
            Some("true") => Ok(Value::Bool(true)),
            Some("false") => Ok(Value::Bool(false)),
            _ => Err(EvalError::new(format!("bool: cannot convert {}", describe(value)))),
        },
    }
}

/// `concat(a, b, ...)`: non-strings are converted as by `str`, NULL included (EMQX writes
/// undefined as `undefined`).
fn concat(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let mut out = String::new();
    for value in args {
        if value.is_null() {
            out.push_str("undefined");
            continue;
        }
        out.push_str(
            &value
                .to_text()
                .ok_or_else(|| EvalError::new(format!("concat: cannot convert {}", describe(value))))?,
        );
    }
    Ok(Value::Str(out))
}

/// `substr(s, start[, length])`: `start` is 0-based, in characters (EMQX).
fn substr(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = text::subject(args, "substr")?;
    let start = want_int(args, 1, "substr")?;
    let start = usize::try_from(start)
        .map_err(|_| EvalError::new(format!("substr: start must be >= 0, got {start}")))?;
    let chars = text.chars().skip(start);
    let out: String = if args.len() > 2 {
        let length = want_int(args, 2, "substr")?;
        let length = usize::try_from(length)
            .map_err(|_| EvalError::new(format!("substr: length must be >= 0, got {length}")))?;
        chars.take(length).collect()
    } else {
        chars.collect()
    };
    Ok(Value::Str(out))
}

/// The optional `'all' | 'leading' | 'trailing'` argument of `split`, `replace`, `find`.
fn direction<'v>(args: &'v [Value], idx: usize, name: &str, default: &'v str) -> Result<&'v str, EvalError> {
    let dir = if args.len() > idx { want_str(args, idx, name)? } else { default };
    match dir {
        "all" | "leading" | "trailing" => Ok(dir),
        other => {
            Err(EvalError::new(format!("{name}: expected 'all', 'leading' or 'trailing', got '{other}'")))
        }
    }
}

/// `replace(s, from, to[, 'all'|'leading'|'trailing'])`.
fn replace(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = text::subject(args, "replace")?;
    let from = want_str(args, 1, "replace")?;
    let to = want_str(args, 2, "replace")?;
    if from.is_empty() {
        return Ok(Value::Str(text.to_owned()));
    }
    let out = match direction(args, 3, "replace", "all")? {
        "leading" => text.replacen(from, to, 1),
        "trailing" => match text.rfind(from) {
            Some(at) => {
                let (head, tail) = (text.get(..at).unwrap_or(""), text.get(at + from.len()..).unwrap_or(""));
                format!("{head}{to}{tail}")
            }
            None => text.to_owned(),
        },
        _ => text.replace(from, to),
    };
    Ok(Value::Str(out))
}

/// `find(s, sub[, 'leading'|'trailing'])`: the rest of `s` from the first (or last)
/// occurrence of `sub`, or `''` if there is none (EMQX).
fn find(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = text::subject(args, "find")?;
    let sub = want_str(args, 1, "find")?;
    let at = match direction(args, 2, "find", "leading")? {
        "trailing" => text.rfind(sub),
        _ => text.find(sub),
    };
    Ok(Value::Str(at.and_then(|at| text.get(at..)).unwrap_or("").to_owned()))
}

/// Compiles a pattern that only became known at run time, with a size limit so that a
/// payload cannot make the engine build a huge automaton.
pub(crate) fn runtime_regex(pattern: &str, name: &str) -> Result<regex::Regex, EvalError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| EvalError::new(format!("{name}: invalid regular expression: {e}")))
}

fn regex_match(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = text::subject(args, "regex_match")?;
    let regex = runtime_regex(want_str(args, 1, "regex_match")?, "regex_match")?;
    Ok(Value::Bool(regex.is_match(text)))
}

fn regex_replace(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = text::subject(args, "regex_replace")?;
    let regex = runtime_regex(want_str(args, 1, "regex_replace")?, "regex_replace")?;
    let replacement = translate_replacement(want_str(args, 2, "regex_replace")?);
    Ok(Value::Str(regex.replace_all(text, replacement.as_str()).into_owned()))
}

/// Erlang's `re:replace` replacement syntax, which EMQX's `regex_replace` uses, in the
/// `regex` crate's: `&` is the whole match, `\N`, `\gN` and `\g{N}` are group N, `\&` and
/// `\\` are a literal `&` and `\`, and `$` has no special meaning.
pub(crate) fn translate_replacement(replacement: &str) -> String {
    let mut out = String::with_capacity(replacement.len() + 8);
    let mut chars = replacement.chars().peekable();
    let digits = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        let mut n = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        n
    };
    while let Some(c) = chars.next() {
        match c {
            '&' => out.push_str("${0}"),
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => out.push_str(&format!("${{{}}}", digits(&mut chars))),
                Some('g') => {
                    chars.next();
                    let braced = chars.peek() == Some(&'{');
                    if braced {
                        chars.next();
                    }
                    let n = digits(&mut chars);
                    if braced && chars.peek() == Some(&'}') {
                        chars.next();
                    }
                    if n.is_empty() {
                        out.push_str("\\g");
                    } else {
                        out.push_str(&format!("${{{n}}}"));
                    }
                }
                Some('&') => {
                    chars.next();
                    out.push('&');
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

fn length(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    match arg(args, 0) {
        Value::Array(items) => Ok(Value::Int(count(items.len()))),
        Value::Object(pairs) => Ok(Value::Int(count(pairs.len()))),
        other => Err(EvalError::new(format!("length: expected an array or object, got {}", describe(other)))),
    }
}

/// `nth(n, array)`: 1-based; `n` outside `1..=length` is an error, as Erlang's `lists:nth`
/// makes it in EMQX.
fn nth(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let index = want_int(args, 0, "nth")?;
    match arg(args, 1) {
        Value::Array(items) => usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| items.get(i))
            .cloned()
            .ok_or_else(|| EvalError::new(format!("nth: index {index} is outside 1..={}", items.len()))),
        other => Err(EvalError::new(format!("nth: expected an array, got {}", describe(other)))),
    }
}

/// `div(x, y)` and `mod(x, y)` (and the infix forms): integers only; `div` truncates toward
/// zero and `mod` takes the sign of `x`, as Erlang's `div` and `rem` do.
fn int_div(args: &[Value], name: &str) -> Result<Value, EvalError> {
    let (x, y) = (want_strict_int(args, 0, name)?, want_strict_int(args, 1, name)?);
    if y == 0 {
        return Err(EvalError::new(format!("{name}: division by zero")));
    }
    let result = if name == "div" { x.checked_div(y) } else { x.checked_rem(y) };
    result.map(Value::Int).ok_or_else(|| EvalError::new(format!("{name}: {x} {name} {y} overflows")))
}

/// An integer value (EMQX's `is_integer` guard): floats and strings are refused.
fn want_strict_int(args: &[Value], idx: usize, name: &str) -> Result<i64, EvalError> {
    match arg(args, idx) {
        Value::Int(i) => Ok(*i),
        other => Err(EvalError::new(format!("{name}: expected an integer, got {}", describe(other)))),
    }
}

/// `now_rfc3339([unit])`: the event's receive time in RFC 3339, UTC.
fn now_rfc3339(args: &[Value], env: &Env<'_>) -> Result<Value, EvalError> {
    let unit = unit_arg(args, 0, "now_rfc3339")?;
    let ms = i64::try_from(env.event.timestamp_ms).unwrap_or(i64::MAX);
    let dt = DateTime::from_unix(ms, Unit::Millisecond, 0).map_err(fail("now_rfc3339"))?;
    Ok(Value::Str(dt.rfc3339(unit)))
}

/// `date_to_unix_ts(unit, [offset,] format, text)`.
fn date_to_unix_ts(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let unit = unit_arg(args, 0, "date_to_unix_ts")?;
    let (offset, format, input) = if args.len() == 4 {
        (
            offset_arg(args, 1, "date_to_unix_ts")?,
            want_str(args, 2, "date_to_unix_ts")?,
            want_str(args, 3, "date_to_unix_ts")?,
        )
    } else {
        (0, want_str(args, 1, "date_to_unix_ts")?, want_str(args, 2, "date_to_unix_ts")?)
    };
    let ts = time::parse_formatted(format, input, unit).map_err(fail("date_to_unix_ts"))?;
    ts.checked_sub(offset.saturating_mul(unit.per_second()))
        .map(Value::Int)
        .ok_or_else(|| EvalError::new("date_to_unix_ts: out of range"))
}

fn offset_arg(args: &[Value], idx: usize, name: &'static str) -> Result<i64, EvalError> {
    match arg(args, idx) {
        Value::Int(seconds) => time::offset_seconds(*seconds),
        _ => time::parse_offset(want_str(args, idx, name)?),
    }
    .map_err(fail(name))
}

/// `timezone_to_offset_seconds(tz)`: NULL (EMQX: `undefined`) is 0.
fn timezone_to_offset(args: &[Value], name: &'static str) -> Result<Value, EvalError> {
    match arg(args, 0) {
        Value::Null => Ok(Value::Int(0)),
        _ => offset_arg(args, 0, name).map(Value::Int),
    }
}

/// `getenv(name)`: the environment variable `EMQXVAR_<name>` (EMQX's prefix, so that rules
/// cannot read arbitrary variables), `''` if unset.
fn getenv(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let name = want_str(args, 0, "getenv")?;
    Ok(Value::Str(std::env::var(format!("EMQXVAR_{name}")).unwrap_or_default()))
}

fn unit_arg(args: &[Value], idx: usize, name: &str) -> Result<Unit, EvalError> {
    if args.len() <= idx {
        return Ok(Unit::Second);
    }
    let unit = want_str(args, idx, name)?;
    Unit::parse(unit).ok_or_else(|| {
        EvalError::new(format!(
            "{name}: unknown unit '{unit}'; use second, millisecond, microsecond or nanosecond"
        ))
    })
}

/// `now_timestamp([unit])`: the event's receive time (not the wall clock), in seconds by
/// default, as in EMQX.
fn now_timestamp(args: &[Value], env: &Env<'_>) -> Result<Value, EvalError> {
    let unit = unit_arg(args, 0, "now_timestamp")?;
    let ms = i64::try_from(env.event.timestamp_ms).unwrap_or(i64::MAX);
    let value = match unit {
        Unit::Second => ms / 1000,
        Unit::Millisecond => ms,
        Unit::Microsecond => ms.saturating_mul(1_000),
        Unit::Nanosecond => ms.saturating_mul(1_000_000),
    };
    Ok(Value::Int(value))
}

/// `unix_ts_to_rfc3339(ts[, unit])`, in UTC.
fn unix_ts_to_rfc3339(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let ts = want_int(args, 0, "unix_ts_to_rfc3339")?;
    let unit = unit_arg(args, 1, "unix_ts_to_rfc3339")?;
    let dt = DateTime::from_unix(ts, unit, 0).map_err(fail("unix_ts_to_rfc3339"))?;
    Ok(Value::Str(dt.rfc3339(unit)))
}

fn rfc3339_to_unix_ts(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = want_str(args, 0, "rfc3339_to_unix_ts")?;
    let unit = unit_arg(args, 1, "rfc3339_to_unix_ts")?;
    let dt = time::parse_rfc3339(text).map_err(fail("rfc3339_to_unix_ts"))?;
    dt.to_unix(unit).map(Value::Int).ok_or_else(|| EvalError::new("rfc3339_to_unix_ts: out of range"))
}

/// `format_date(unit, offset, format[, ts])` (EMQX's argument order); without `ts`, the
/// event's receive time.
fn format_date(args: &[Value], env: &Env<'_>) -> Result<Value, EvalError> {
    let unit = unit_arg(args, 0, "format_date")?;
    let offset = offset_arg(args, 1, "format_date")?;
    let format = want_str(args, 2, "format_date")?;
    let ts = if args.len() > 3 {
        want_int(args, 3, "format_date")?
    } else {
        let Value::Int(now) = now_timestamp(&args[..1], env)? else {
            return Err(EvalError::new("format_date: no time"));
        };
        now
    };
    let dt = DateTime::from_unix(ts, unit, offset).map_err(fail("format_date"))?;
    dt.strftime(format).map(Value::Str).map_err(fail("format_date"))
}
