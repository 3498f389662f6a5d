//! What a rule does with its output row: [`Action`]s, templates and output encodings.
//!
//! A template such as `sites/${site}/alerts/${topic(2)}` is parsed and checked at compile
//! time: a `${name}` whose root is a column of the rule's output reads the row; anything
//! else is an expression of the rule language, compiled once (errors with a caret under
//! the template). At run time a topic template fails the action with a dead letter on a
//! NULL, object or array value, or when the rendered topic is not a valid MQTT topic name
//! (empty, `+`, `#`, NUL); payload and reason templates render every value as text.
//!
//! The row a rule's SELECT produces is a [`Row`]: for the usual one-level column names it
//! holds the plan's names and values borrowed from the payload, tables and constants,
//! and is encoded straight from there; it becomes a [`Value`] only for a dry-run trace.

use std::borrow::Cow;
use std::time::Duration;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::OutputFormat;
use crate::compile::RowLayout;
use crate::error::SqlError;
use crate::expr::{Env, Expr, NULL, describe};
use crate::value::Value;
use outpost_topic::Topic;

/// One event's output row for one rule.
#[derive(Debug)]
pub(crate) enum Row<'a> {
    /// Every column has a one-level name: `values[i]` is the value of `layout.names[i]`,
    /// and each name appears once.
    Flat { layout: &'a RowLayout, values: Vec<Cow<'a, Value>> },
    /// Some column nests (an unaliased `payload.a.b`): built as an object.
    Nested(Value),
}

impl Row<'_> {
    /// The value of a top-level column.
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Row::Flat { layout, values } => {
                let idx = layout.names.iter().position(|n| n == name)?;
                values.get(idx).map(|v| &**v)
            }
            Row::Nested(value) => value.get(name),
        }
    }

    /// The row as an object value, columns in output order.
    pub(crate) fn into_value(self) -> Value {
        match self {
            Row::Flat { layout, values } => Value::Object(
                layout.names.iter().cloned().zip(values.into_iter().map(Cow::into_owned)).collect(),
            ),
            Row::Nested(value) => value,
        }
    }
}

/// Serializes as the object [`Row::into_value`] would give, without building it.
impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Row::Flat { layout, values } => {
                let mut map = serializer.serialize_map(Some(layout.names.len()))?;
                for (name, value) in layout.names.iter().zip(values) {
                    map.serialize_entry(name, &**value)?;
                }
                map.end()
            }
            Row::Nested(value) => value.serialize(serializer),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Action {
    Forward {
        topic: Option<Template>,
        qos: u8,
        priority: u8,
        ttl: Option<Duration>,
        body: Body,
    },
    Republish {
        topic: Template,
        qos: u8,
        body: Body,
    },
    Drop,
    /// `dead_letter`: the event goes to the dead-letter store on purpose, with this reason.
    DeadLetter {
        reason: Option<Template>,
    },
}

impl Action {
    /// The action's templates, for passes over the plan.
    pub(crate) fn templates_mut(&mut self) -> Vec<&mut Template> {
        fn body(body: &mut Body) -> Option<&mut Template> {
            match body {
                Body::Template(template) => Some(template),
                Body::Encode(_) => None,
            }
        }
        match self {
            Action::Forward { topic, body: b, .. } => topic.iter_mut().chain(body(b)).collect(),
            Action::Republish { topic, body: b, .. } => std::iter::once(topic).chain(body(b)).collect(),
            Action::Drop => Vec::new(),
            Action::DeadLetter { reason } => reason.iter_mut().collect(),
        }
    }
}

/// What an action sends as its payload.
#[derive(Debug)]
pub(crate) enum Body {
    /// The row in a format, or the original payload (`format = ".."`).
    Encode(OutputFormat),
    /// `payload = '..'`: a text template.
    Template(Template),
}

impl Body {
    pub(crate) fn render(&self, row: &Row<'_>, env: &Env<'_>, original: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Body::Encode(format) => Ok(encode(*format, row, original)),
            Body::Template(template) => template.render_text(row, env, "payload template"),
        }
    }
}

/// A parsed template: text with `${..}` holes, each a column of the output row (or a path
/// into one) or any expression of the rule language, compiled once here.
#[derive(Debug)]
pub(crate) struct Template {
    parts: Vec<Part>,
    /// The length of the literal parts: with room for the columns, one allocation renders.
    text_len: usize,
}

#[derive(Debug)]
enum Part {
    Text(String),
    /// `${a.b}` where `a` is a column: a path into the output row. `slot` is the root's
    /// index in a flat row (see `compile::RowLayout`), so rendering need not look the name up.
    Column {
        path: Vec<String>,
        slot: Option<usize>,
    },
    /// `${topic(2)}`, `${upper(site)}`: an expression, evaluated against the event (names
    /// resolve as in WHERE: aliases, fields, `payload`).
    Expr {
        text: String,
        expr: Box<Expr>,
    },
}

impl Part {
    /// What the hole says, for error messages.
    fn name(&self) -> Cow<'_, str> {
        match self {
            Part::Text(text) => Cow::Borrowed(text),
            Part::Column { path, .. } => Cow::Owned(path.join(".")),
            Part::Expr { text, .. } => Cow::Borrowed(text),
        }
    }
}

/// Why a template was refused when the rules loaded.
#[derive(Debug)]
pub(crate) enum TemplateError {
    Plain(String),
    /// A `${..}` expression did not compile; spans count from the start of the template.
    Sql(Vec<SqlError>),
}

impl Template {
    /// Parses `text`. A `${..}` whose root name is one of `columns` (the output's top-level
    /// names) reads the row; anything else goes to `compile`, which compiles an expression
    /// of the rule language. `flat_names` are the names of the rule's flat rows, if its rows
    /// are flat.
    pub(crate) fn parse(
        text: &str,
        columns: &[&str],
        flat_names: Option<&[String]>,
        compile: &mut dyn FnMut(&str) -> Result<Expr, Vec<SqlError>>,
    ) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut pos = 0;
        while let Some(found) = text.get(pos..).and_then(|rest| rest.find("${")) {
            let start = pos + found;
            if found > 0 {
                parts.push(Part::Text(text.get(pos..start).unwrap_or("").to_owned()));
            }
            let inner_start = start + 2;
            let after = text.get(inner_start..).unwrap_or("");
            // A column reference ends at the first `}` (column names may hold quotes); an
            // expression at the first `}` outside its string literals.
            let column = after.find('}').and_then(|len| {
                let name = after.get(..len).unwrap_or("").trim();
                let path: Vec<String> = name.split('.').map(str::to_owned).collect();
                let root = path.first().map(String::as_str).unwrap_or("");
                (columns.contains(&root) && !path.iter().any(String::is_empty)).then_some((len, path))
            });
            let inner_len = if let Some((len, path)) = column {
                let slot = flat_names.and_then(|names| names.iter().position(|n| Some(n) == path.first()));
                parts.push(Part::Column { path, slot });
                len
            } else {
                let Some(len) = closing_brace(after) else {
                    return Err(TemplateError::Plain(format!(
                        "template `{text}`: `${{` without a closing `}}`"
                    )));
                };
                let inner = after.get(..len).unwrap_or("");
                let name = inner.trim();
                if name.is_empty() {
                    return Err(TemplateError::Plain(format!("template `{text}`: empty `${{}}`")));
                }
                match compile(inner) {
                    Ok(expr) => parts.push(Part::Expr { text: name.to_owned(), expr: Box::new(expr) }),
                    Err(errors) => {
                        let place = |e: SqlError| place_in_template(e, text, inner_start, len);
                        return Err(TemplateError::Sql(errors.into_iter().map(place).collect()));
                    }
                }
                len
            };
            pos = inner_start + inner_len + 1;
        }
        if let Some(rest) = text.get(pos..).filter(|rest| !rest.is_empty()) {
            parts.push(Part::Text(rest.to_owned()));
        }
        let text_len = parts.iter().map(|p| if let Part::Text(text) = p { text.len() } else { 0 }).sum();
        Ok(Template { parts, text_len })
    }

    /// The template's expressions, for passes over the plan (payload field numbering).
    pub(crate) fn exprs_mut(&mut self) -> impl Iterator<Item = &mut Expr> {
        self.parts.iter_mut().filter_map(|part| match part {
            Part::Expr { expr, .. } => Some(&mut **expr),
            _ => None,
        })
    }

    /// Renders the template into a valid MQTT topic name. A NULL, object or array value
    /// fails, as does a result that is not a topic name.
    pub(crate) fn render(&self, row: &Row<'_>, env: &Env<'_>) -> Result<String, String> {
        let mut out = String::with_capacity(self.text_len + 32);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Column { path, slot } => {
                    push_topic_level(&mut out, column_value(row, path, *slot), part)?
                }
                Part::Expr { text, expr } => {
                    let value =
                        expr.eval(env).map_err(|e| format!("topic template: `${{{text}}}`: {}", e.0))?;
                    push_topic_level(&mut out, &value, part)?;
                }
            }
        }
        Topic::new(out).map(Topic::into_string).map_err(|e| format!("topic template: {e}"))
    }

    /// Renders the template as a payload or a reason: strings as their text, bytes as they
    /// are, objects and arrays as JSON, NULL as `null` (so a JSON template stays JSON).
    /// `label` names the template in an evaluation error.
    pub(crate) fn render_text(&self, row: &Row<'_>, env: &Env<'_>, label: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.text_len + 32);
        for part in &self.parts {
            let value = match part {
                Part::Text(text) => {
                    out.extend_from_slice(text.as_bytes());
                    continue;
                }
                Part::Column { path, slot } => Cow::Borrowed(column_value(row, path, *slot)),
                Part::Expr { text, expr } => {
                    expr.eval(env).map_err(|e| format!("{label}: `${{{text}}}`: {}", e.0))?
                }
            };
            match &*value {
                Value::Null => out.extend_from_slice(b"null"),
                Value::Bytes(bytes) => out.extend_from_slice(bytes),
                other => out.extend_from_slice(other.to_text().unwrap_or_default().as_bytes()),
            }
        }
        Ok(out)
    }
}

/// Writes one hole's value into a topic: text, never NULL, an object or an array.
#[inline(always)]
fn push_topic_level(out: &mut String, value: &Value, part: &Part) -> Result<(), String> {
    match value {
        Value::Null => Err(format!("topic template: `${{{}}}` is NULL", part.name())),
        Value::Array(_) | Value::Object(_) => {
            Err(format!("topic template: `${{{}}}` is {}", part.name(), describe(value)))
        }
        other => match other.to_text() {
            Some(text) => {
                out.push_str(&text);
                Ok(())
            }
            None => Err(format!("topic template: `${{{}}}` is not text", part.name())),
        },
    }
}

/// The value at a column path of the row; NULL where it is missing.
#[inline(always)]
fn column_value<'r>(row: &'r Row<'_>, path: &[String], slot: Option<usize>) -> &'r Value {
    let (root, rest) = path.split_first().map_or(("", &[][..]), |(r, rest)| (r.as_str(), rest));
    let root_value = match (row, slot) {
        (Row::Flat { values, .. }, Some(slot)) => values.get(slot).map(|v| &**v),
        _ => row.get(root),
    };
    let mut value = root_value.unwrap_or(&NULL);
    for key in rest {
        value = value.get(key).unwrap_or(&NULL);
    }
    value
}

/// The length of a `${..}`'s inside: up to the first `}` that is not in a quoted string,
/// so `${'}'}` and `${concat("a}", x)}` work.
fn closing_brace(text: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (idx, c) in text.char_indices() {
        match (quote, c) {
            (None, '}') => return Some(idx),
            (None, '\'' | '"') => quote = Some(c),
            // A doubled quote inside a string is an escaped quote: leaving and re-entering
            // the string gives the same result.
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    None
}

/// Moves an expression's error span (relative to the `${..}` inside, which starts at byte
/// `inner_start` of `template`) to where it is in the template; an error without a place
/// underlines the whole `${..}`.
fn place_in_template(error: SqlError, template: &str, inner_start: usize, inner_len: usize) -> SqlError {
    let before = template.get(..inner_start).unwrap_or("");
    let line = u64::try_from(before.matches('\n').count()).unwrap_or(0) + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    // 1-based column of the inside's first character, in characters.
    let column = u64::try_from(before.get(line_start..).unwrap_or("").chars().count()).unwrap_or(0) + 1;
    let span = match error.span {
        Some((1, col, width)) => Some((line, (column + col).saturating_sub(1), width)),
        Some((l, col, width)) => Some((line + l - 1, col, width)),
        None => Some((line, column.saturating_sub(2), u64::try_from(inner_len).unwrap_or(0) + 3)),
    };
    SqlError { span, ..error }
}

/// Compact JSON, as `serde_json::to_writer(out, row)` writes it. A flat row writes its
/// keys from the layout, where they are already escaped and followed by `:`; serde_json
/// writes each value, so values are spelled exactly as before.
fn write_json(out: &mut Vec<u8>, row: &Row<'_>) -> serde_json::Result<()> {
    let Row::Flat { layout, values } = row else { return serde_json::to_writer(out, row) };
    out.push(b'{');
    for (idx, (key, value)) in layout.json_keys.iter().zip(values).enumerate() {
        if idx > 0 {
            out.push(b',');
        }
        out.extend_from_slice(key.as_bytes());
        serde_json::to_writer(&mut *out, &**value)?;
    }
    out.push(b'}');
    Ok(())
}

/// Encodes an output row (or passes the original payload through).
pub(crate) fn encode(format: OutputFormat, row: &Row<'_>, original: &[u8]) -> Vec<u8> {
    // Rows are small; starting at this size saves the first few doublings of the buffer.
    let mut out = Vec::with_capacity(128);
    match format {
        // Writing to a `Vec` cannot fail, and `Row` and `Value` serialize every variant;
        // were it to fail, the output would be empty, never half-written JSON.
        OutputFormat::Json => {
            if write_json(&mut out, row).is_err() {
                out.clear();
            }
        }
        OutputFormat::Cbor => {
            let _ = ciborium::into_writer(row, &mut out);
        }
        OutputFormat::Raw => return original.to_vec(),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles nothing: every `${..}` in these tests must be a column.
    fn columns_only(_: &str) -> Result<Expr, Vec<SqlError>> {
        Err(vec![SqlError::unplaced("not a column")])
    }

    fn parse(text: &str, columns: &[&str], flat_names: Option<&[String]>) -> Result<Template, TemplateError> {
        Template::parse(text, columns, flat_names, &mut columns_only)
    }

    /// Runs `f` with an environment for an event on topic `a/b` (templates with
    /// expressions read it; column templates do not).
    fn with_env<T>(f: impl FnOnce(&Env<'_>) -> T) -> T {
        let event = crate::EventContext {
            topic: "a/b",
            payload: b"",
            clientid: None,
            username: None,
            qos: 0,
            timestamp_ms: 0,
            event_id: 0,
            hops: 0,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
        };
        f(&Env {
            event: &event,
            payload: crate::payload::PayloadView::Whole(&NULL),
            text: None,
            item: None,
            locals: &[],
        })
    }

    #[test]
    fn templates_render_columns_and_refuse_bad_topics() {
        let row = Row::Nested(Value::from_json(br#"{"site":"a","n":3,"p":{"x":"y"},"w":"x/+"}"#).unwrap());
        let columns = ["site", "n", "p", "w"];
        with_env(|env| {
            let t = parse("s/${site}/${n}/${p.x}", &columns, None).unwrap();
            assert_eq!(t.render(&row, env).unwrap(), "s/a/3/y");
            assert!(matches!(parse("s/${sit}", &columns, None), Err(TemplateError::Sql(_))));
            assert!(matches!(parse("s/${site", &columns, None), Err(TemplateError::Plain(_))));
            let wildcard = parse("s/${w}", &columns, None).unwrap().render(&row, env).unwrap_err();
            assert!(wildcard.contains("wildcard"), "{wildcard}");
            let null = parse("${p.z}", &columns, None).unwrap().render(&row, env).unwrap_err();
            assert!(null.contains("NULL"), "{null}");
            let text = parse(r#"{"s":"${site}","p":${p},"z":${p.z}}"#, &columns, None).unwrap();
            assert_eq!(
                text.render_text(&row, env, "payload template").unwrap(),
                br#"{"s":"a","p":{"x":"y"},"z":null}"#
            );
        });
    }

    #[test]
    fn closing_braces_inside_strings_do_not_end_a_hole() {
        assert_eq!(closing_brace("'}'} rest"), Some(3));
        assert_eq!(closing_brace(r#"concat("a}", 'it''s}') }"#), Some(23));
        assert_eq!(closing_brace("'never closed}"), None);
    }

    #[test]
    fn flat_rows_encode_and_render_like_the_object_they_stand_for() {
        use crate::compile::Column;
        use crate::expr::Expr;
        let column = |name: &str| Column {
            path: vec![crate::expr::PathSeg::Key(name.to_owned())],
            expr: Expr::Const(Value::Null),
        };
        let columns = [column("a"), column("q\"uo\\te"), column("é\n"), column("a"), column("f")];
        let layout = RowLayout::new(false, &columns).unwrap();
        let values = vec![
            Cow::Owned(Value::Object(vec![("x".into(), Value::Array(vec![Value::Int(-1), Value::Null]))])),
            Cow::Owned(Value::Str("s/\"\u{1}".into())),
            Cow::Owned(Value::Bytes(vec![0xff, 0])),
            Cow::Owned(Value::Float(f64::NAN)),
        ];
        let row = Row::Flat { layout: &layout, values };
        let object = Row::Nested(row_value(&row));
        assert_eq!(encode(OutputFormat::Json, &row, b""), encode(OutputFormat::Json, &object, b""));
        assert_eq!(encode(OutputFormat::Cbor, &row, b""), encode(OutputFormat::Cbor, &object, b""));
        let text = String::from_utf8(encode(OutputFormat::Json, &row, b"")).unwrap();
        assert_eq!(text, r#"{"a":{"x":[-1,null]},"q\"uo\\te":"s/\"\u0001","é\n":"/wA=","f":null}"#);

        let names: Vec<&str> = layout.names.iter().map(String::as_str).collect();
        let template = parse("t/${q\"uo\\te}/${a.x}", &names, Some(&layout.names)).unwrap();
        let without_slots = parse("${f}/${a}", &names, None).unwrap();
        with_env(|env| {
            assert_eq!(template.render(&row, env), template.render(&object, env));
            assert_eq!(without_slots.render(&row, env), without_slots.render(&object, env));
        });
    }

    fn row_value(row: &Row<'_>) -> Value {
        match row {
            Row::Flat { layout, values } => Row::Flat { layout, values: values.clone() }.into_value(),
            Row::Nested(value) => value.clone(),
        }
    }
}
