//! String functions that EMQX's rule engine takes from `emqx_variform_bif`: `sprintf`, `pad`,
//! `tokens`, `unescape`, `regex_extract`, `ascii`, `rm_prefix`, `join_to_string`, `rtrim`
//! with characters, and `split`'s `*_notrim` options.
//!
//! EMQX refuses `undefined` in every one of these (`?BADARG()`), so they are registered as
//! NULL-aware and fail on a NULL subject instead of passing it through: a rule that
//! dead-lettered on EMQX for a missing field dead-letters here too.

use crate::expr::{Env, EvalError, Num, describe, number, text_of};
use crate::value::Value;

use super::{arg, runtime_regex, want_int, want_str};

/// EMQX's `?BADARG()` for a NULL subject.
pub(super) fn subject<'v>(args: &'v [Value], name: &str) -> Result<&'v str, EvalError> {
    match arg(args, 0) {
        Value::Null => Err(EvalError::new(format!("{name}: the argument is NULL (EMQX: badarg)"))),
        // emqx_variform_bif's IS_NULL guard takes `null` and `undefined` alike.
        Value::JsonNull => Err(EvalError::new(format!("{name}: the argument is a JSON null (EMQX: badarg)"))),
        _ => want_str(args, 0, name),
    }
}

/// `split(s, sep[, option])` with EMQX's options: `'leading'`/`'trailing'` split once at the
/// first/last separator and drop empty parts, as plain `split` does; the `'notrim'`,
/// `'leading_notrim'` and `'trailing_notrim'` forms keep them (`emqx_variform_bif:split/3`).
pub(super) fn split(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "split")?;
    let sep = want_str(args, 1, "split")?;
    let option = if args.len() > 2 { want_str(args, 2, "split")? } else { "all" };
    let (mode, trim) = match option {
        "all" => ("all", true),
        "leading" => ("leading", true),
        "trailing" => ("trailing", true),
        "notrim" => ("all", false),
        "leading_notrim" => ("leading", false),
        "trailing_notrim" => ("trailing", false),
        other => {
            return Err(EvalError::new(format!(
                "split: unknown option '{other}'; use 'leading', 'trailing', 'notrim', 'leading_notrim' or 'trailing_notrim'"
            )));
        }
    };
    let parts: Vec<&str> = if sep.is_empty() {
        vec![text]
    } else {
        match mode {
            "leading" => text.splitn(2, sep).collect(),
            "trailing" => {
                let mut parts: Vec<&str> = text.rsplitn(2, sep).collect();
                parts.reverse();
                parts
            }
            _ => text.split(sep).collect(),
        }
    };
    Ok(Value::Array(
        parts.into_iter().filter(|p| !trim || !p.is_empty()).map(|p| Value::Str(p.to_owned())).collect(),
    ))
}

/// `tokens(s, separators[, 'nocrlf'])`: splits at any of the separator characters and drops
/// empty tokens (Erlang's `string:lexemes`); `'nocrlf'` adds CR and LF to the separators.
pub(super) fn tokens(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "tokens")?;
    let mut separators: Vec<char> = want_str(args, 1, "tokens")?.chars().collect();
    if args.len() > 2 {
        match want_str(args, 2, "tokens")? {
            "nocrlf" => separators.extend(['\r', '\n']),
            other => return Err(EvalError::new(format!("tokens: unknown option '{other}'; use 'nocrlf'"))),
        }
    }
    Ok(Value::Array(
        text.split(|c| separators.contains(&c))
            .filter(|t| !t.is_empty())
            .map(|t| Value::Str(t.to_owned()))
            .collect(),
    ))
}

/// `pad(s, len[, 'trailing'|'leading'|'both'[, chars]])`: pads to `len` characters with
/// copies of `chars` (default a space), each copy counting as one (Erlang's `string:pad`);
/// `'both'` puts the smaller half in front.
pub(super) fn pad(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "pad")?;
    let len = want_int(args, 1, "pad")?;
    let side = if args.len() > 2 { want_str(args, 2, "pad")? } else { "trailing" };
    let filler = if args.len() > 3 { want_str(args, 3, "pad")? } else { " " };
    let missing = usize::try_from(len).unwrap_or(0).saturating_sub(text.chars().count());
    if missing > 1 << 20 {
        return Err(EvalError::new(format!("pad: length {len} is too large")));
    }
    let (before, after) = match side {
        "trailing" => (0, missing),
        "leading" => (missing, 0),
        "both" => (missing / 2, missing - missing / 2),
        other => {
            return Err(EvalError::new(format!(
                "pad: unknown position '{other}'; use 'trailing', 'leading' or 'both'"
            )));
        }
    };
    Ok(Value::Str(format!("{}{text}{}", filler.repeat(before), filler.repeat(after))))
}

/// `rtrim(s[, chars])`: with `chars`, strips any of those characters from the end.
pub(super) fn rtrim(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "rtrim")?;
    if args.len() < 2 {
        return Ok(Value::Str(text.trim_end().to_owned()));
    }
    let chars: Vec<char> = want_str(args, 1, "rtrim")?.chars().collect();
    Ok(Value::Str(text.trim_end_matches(|c| chars.contains(&c)).to_owned()))
}

/// `rm_prefix(s, prefix)`: `s` without `prefix` if it starts with it, else `s` unchanged.
pub(super) fn rm_prefix(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "rm_prefix")?;
    let prefix = want_str(args, 1, "rm_prefix")?;
    Ok(Value::Str(text.strip_prefix(prefix).unwrap_or(text).to_owned()))
}

/// `ascii(s)`: the code of the first byte.
pub(super) fn ascii(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "ascii")?;
    text.bytes()
        .next()
        .map(|b| Value::Int(i64::from(b)))
        .ok_or_else(|| EvalError::new("ascii: the string is empty"))
}

/// `regex_extract(s, re)`: the capture groups of the first match (not the whole match);
/// `[]` if there is no match or no group. A group that did not take part is `''`.
pub(super) fn regex_extract(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "regex_extract")?;
    let regex = runtime_regex(want_str(args, 1, "regex_extract")?, "regex_extract")?;
    Ok(Value::Array(match regex.captures(text) {
        Some(groups) => groups
            .iter()
            .skip(1)
            .map(|g| Value::Str(g.map(|m| m.as_str().to_owned()).unwrap_or_default()))
            .collect(),
        None => Vec::new(),
    }))
}

/// `join_to_string([sep, ]array)`: the items as `str` renders them, joined by `sep`
/// (default `', '`).
pub(super) fn join_to_string(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let (sep, list) = match args {
        [list] => (", ", list),
        [_, list] => (want_str(args, 0, "join_to_string")?, list),
        _ => return Err(EvalError::new("join_to_string: takes ([separator, ] array)")),
    };
    let Value::Array(items) = list else {
        return Err(EvalError::new(format!("join_to_string: expected an array, got {}", describe(list))));
    };
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        parts.push(super::str_of(item, "join_to_string")?);
    }
    Ok(Value::Str(parts.join(sep)))
}

/// `unescape(s)`: C-style escapes as EMQX reads them: `\\ \n \t \r \b \f \v \' \" \? \a`
/// and `\x` followed by a run of hex digits (one code point). Any other escape is an error.
pub(super) fn unescape(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = subject(args, "unescape")?;
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            return Err(EvalError::new("unescape: the string ends with a lone `\\`"));
        };
        let plain = match e {
            '\\' => '\\',
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'v' => '\u{b}',
            '\'' => '\'',
            '"' => '"',
            '?' => '?',
            'a' => '\u{7}',
            'x' if chars.peek().is_some_and(char::is_ascii_hexdigit) => {
                let mut code: u32 = 0;
                while let Some(d) = chars.peek().and_then(|d| d.to_digit(16)) {
                    code = code.checked_mul(16).and_then(|c| c.checked_add(d)).unwrap_or(u32::MAX);
                    chars.next();
                }
                char::from_u32(code).ok_or_else(|| {
                    EvalError::new(format!("unescape: \\x{code:X} is not a valid Unicode character"))
                })?
            }
            other => {
                return Err(EvalError::new(format!("unescape: unrecognized escape sequence `\\{other}`")));
            }
        };
        out.push(plain);
    }
    Ok(Value::Str(out))
}

/// `sprintf(format, args...)`: Erlang's `io_lib:format` directives that make sense for rule
/// values: `~s`/`~ts` (text), `~p`/`~tp`/`~w`/`~tw` (the value as Erlang prints it: strings
/// as `<<"...">>`), `~b`/`~B` (integer, optional base as `~16b`), `~d`, `~f`/`~.Nf`
/// (6 decimals by default), `~e`, `~c`, `~n`, `~~`. The number of arguments must match.
pub(super) fn sprintf(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let format = want_str(args, 0, "sprintf")?;
    let mut values = args.iter().skip(1);
    let mut next = |directive: &str| {
        values.next().ok_or_else(|| EvalError::new(format!("sprintf: no argument left for `~{directive}`")))
    };
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '~' {
            out.push(c);
            continue;
        }
        // `~[width][.precision][t|l]control`; width is ignored except as a base for `~b`.
        let mut spec = String::new();
        let mut control = None;
        for d in chars.by_ref() {
            if d.is_ascii_digit() || d == '.' || d == 't' || d == 'l' {
                spec.push(d);
            } else {
                control = Some(d);
                break;
            }
        }
        let Some(control) = control else {
            return Err(EvalError::new("sprintf: the format ends in the middle of a `~` directive"));
        };
        let precision = spec.split_once('.').and_then(|(_, p)| p.trim_end_matches(['t', 'l']).parse().ok());
        let width: Option<u32> = spec.split('.').next().and_then(|w| w.parse().ok());
        match control {
            '~' => out.push('~'),
            'n' => out.push('\n'),
            's' => {
                let v = next("s")?;
                out.push_str(&super::str_of(v, "sprintf")?);
            }
            'p' | 'w' => out.push_str(&erlang_term(next("p")?)),
            'c' => {
                let v = next("c")?;
                let code = want_int(std::slice::from_ref(v), 0, "sprintf ~c")?;
                let ch = u32::try_from(code).ok().and_then(char::from_u32).ok_or_else(|| {
                    EvalError::new(format!("sprintf: ~c needs a character code, got {code}"))
                })?;
                out.push(ch);
            }
            'b' | 'B' | 'd' => {
                let v = next("d")?;
                let i = want_int(std::slice::from_ref(v), 0, "sprintf ~d")?;
                let base = if control == 'd' { 10 } else { width.unwrap_or(10) };
                out.push_str(&to_base(i, base, control == 'b')?);
            }
            'f' | 'e' | 'g' => {
                let v = next("f")?;
                let Some(n) = number(v) else {
                    return Err(EvalError::new(format!(
                        "sprintf: ~{control} needs a number, got {}",
                        describe(v)
                    )));
                };
                let f = match n {
                    Num::Int(_) => {
                        return Err(EvalError::new("sprintf: ~f needs a float (Erlang refuses integers)"));
                    }
                    Num::Float(f) => f,
                };
                let p = precision.unwrap_or(6);
                out.push_str(&match control {
                    'e' => erlang_exp(f, p),
                    _ => format!("{f:.p$}"),
                });
            }
            other => {
                return Err(EvalError::new(format!(
                    "sprintf: unsupported directive `~{other}`; supported: ~s ~ts ~p ~w ~b ~B ~d ~f ~e ~c ~n ~~"
                )));
            }
        }
    }
    if values.next().is_some() {
        return Err(EvalError::new("sprintf: more arguments than `~` directives"));
    }
    Ok(Value::Str(out))
}

fn to_base(i: i64, base: u32, lower: bool) -> Result<String, EvalError> {
    if !(2..=36).contains(&base) {
        return Err(EvalError::new(format!("sprintf: base {base} is not 2..36")));
    }
    let mut n = i.unsigned_abs();
    let mut digits = Vec::new();
    loop {
        let d = u32::try_from(n % u64::from(base)).unwrap_or(0);
        let c = char::from_digit(d, base).unwrap_or('?');
        digits.push(if lower { c } else { c.to_ascii_uppercase() });
        n /= u64::from(base);
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        digits.push('-');
    }
    Ok(digits.into_iter().rev().collect())
}

/// `~e`: Erlang prints `1.23450e+4` style (precision counts all significant digits).
fn erlang_exp(f: f64, precision: usize) -> String {
    let text = format!("{:.*e}", precision.saturating_sub(1), f);
    match text.split_once('e') {
        Some((mantissa, exp)) => {
            let exp: i32 = exp.parse().unwrap_or(0);
            let sign = if exp < 0 { '-' } else { '+' };
            format!("{mantissa}e{sign}{:02}", exp.abs())
        }
        None => text,
    }
}

/// How Erlang's `~p` prints a rule value: binaries as `<<"...">>`, maps as `#{...}`.
fn erlang_term(value: &Value) -> String {
    match value {
        Value::Null => "undefined".to_owned(),
        Value::JsonNull => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => crate::value::format_float(*f),
        Value::Str(_) | Value::Bytes(_) => match text_of(value) {
            Some(s) => format!("<<\"{}\">>", s.replace('\\', "\\\\").replace('"', "\\\"")),
            None => match value {
                Value::Bytes(b) => {
                    format!("<<{}>>", b.iter().map(u8::to_string).collect::<Vec<_>>().join(","))
                }
                _ => String::new(),
            },
        },
        Value::Array(items) => format!("[{}]", items.iter().map(erlang_term).collect::<Vec<_>>().join(",")),
        Value::Object(pairs) => format!(
            "#{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("<<\"{k}\">> => {}", erlang_term(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// `str_utf16_le(x)`: `str(x)` as UTF-16 little-endian bytes.
pub(super) fn str_utf16_le(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let text = super::str_of(arg(args, 0), "str_utf16_le")?;
    Ok(Value::Bytes(text.encode_utf16().flat_map(u16::to_le_bytes).collect()))
}

/// `float2str(x, decimals)`: at most `decimals` decimals, trailing zeros dropped but one
/// kept (Erlang's `float_to_binary(F, [{decimals, N}, compact])`).
pub(super) fn float2str(args: &[Value], _: &Env<'_>) -> Result<Value, EvalError> {
    let f = super::want_num(args, 0, "float2str")?.as_f64();
    let decimals = want_int(args, 1, "float2str")?;
    let decimals = usize::try_from(decimals)
        .ok()
        .filter(|d| *d <= 253)
        .ok_or_else(|| EvalError::new(format!("float2str: decimals must be 0..=253, got {decimals}")))?;
    Ok(Value::Str(compact_decimals(f, decimals)))
}

/// Erlang's `float_to_binary(F, [{decimals, N}, compact])`.
pub(crate) fn compact_decimals(f: f64, decimals: usize) -> String {
    let mut text = format!("{f:.decimals$}");
    if text.contains('.') {
        let trimmed = text.trim_end_matches('0').len();
        text.truncate(trimmed);
        if text.ends_with('.') {
            text.push('0');
        }
    } else if f.is_finite() {
        text.push_str(".0");
    }
    text
}
