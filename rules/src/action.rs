//! What a rule does with its output row: [`Action`]s, topic templates and output
//! encodings.
//!
//! A template such as `sites/${site}/alerts/${device}` is parsed and checked at compile
//! time: every `${name}` must be a column of the rule's output (did-you-mean otherwise).
//! At run time a NULL or missing value, or a rendered topic that is not a valid MQTT
//! topic name (empty, `+`, `#`, NUL), fails the action with a dead letter.
//!
//! The row a rule's SELECT produces is a [`Row`]: for the usual one-level column names it
//! holds the plan's names and values borrowed from the payload, tables and constants,
//! and is encoded straight from there; it becomes a [`Value`] only for a dry-run trace.

use std::borrow::Cow;
use std::time::Duration;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::compile::RowLayout;
use crate::error::did_you_mean;
use crate::topic::Topic;
use crate::value::Value;
use crate::{OutputFormat, expr::describe};

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
    Forward { topic: Option<Template>, qos: u8, priority: u8, ttl: Option<Duration>, format: OutputFormat },
    Republish { topic: Template, qos: u8, format: OutputFormat },
    Drop,
}

/// A parsed topic template.
#[derive(Debug)]
pub(crate) struct Template {
    parts: Vec<Part>,
    /// The length of the literal parts: with room for the columns, one allocation renders.
    text_len: usize,
}

#[derive(Debug)]
enum Part {
    Text(String),
    /// `${a.b}`: a path into the output row. `slot` is the root's index in a flat row
    /// (see `compile::RowLayout`), so rendering need not look the name up.
    Column {
        path: Vec<String>,
        slot: Option<usize>,
    },
}

impl Template {
    /// Parses `text`, checking each `${..}` against `columns` (the output's top-level names).
    /// `flat_names` are the names of the rule's flat rows, if its rows are flat.
    pub(crate) fn parse(
        text: &str,
        columns: &[&str],
        flat_names: Option<&[String]>,
    ) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            let (before, after) = rest.split_at(start);
            if !before.is_empty() {
                parts.push(Part::Text(before.to_owned()));
            }
            let inner = after.get(2..).unwrap_or("");
            let Some(end) = inner.find('}') else {
                return Err(format!("template `{text}`: `${{` without a closing `}}`"));
            };
            let name = inner.get(..end).unwrap_or("").trim();
            let path: Vec<String> = name.split('.').map(str::to_owned).collect();
            let root = path.first().map(String::as_str).unwrap_or("");
            if name.is_empty() || path.iter().any(String::is_empty) {
                return Err(format!("template `{text}`: empty or malformed `${{{name}}}`"));
            }
            if !columns.contains(&root) {
                let listing = if columns.is_empty() { "none".to_owned() } else { columns.join(", ") };
                return Err(format!(
                    "template `{text}`: `${{{name}}}` is not a column of the rule's SELECT (columns: {listing}){}",
                    did_you_mean(root, columns.iter().copied())
                ));
            }
            let slot = flat_names.and_then(|names| names.iter().position(|n| n == root));
            parts.push(Part::Column { path, slot });
            rest = inner.get(end + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let text_len = parts.iter().map(|p| if let Part::Text(text) = p { text.len() } else { 0 }).sum();
        Ok(Template { parts, text_len })
    }

    /// Renders the template against an output row into a valid MQTT topic name.
    pub(crate) fn render(&self, row: &Row<'_>) -> Result<String, String> {
        let mut out = String::with_capacity(self.text_len + 32);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Column { path, slot } => {
                    let (root, rest) =
                        path.split_first().map_or(("", &[][..]), |(r, rest)| (r.as_str(), rest));
                    let root_value = match (row, slot) {
                        (Row::Flat { values, .. }, Some(slot)) => values.get(*slot).map(|v| &**v),
                        _ => row.get(root),
                    };
                    let mut value = root_value.unwrap_or(&Value::Null);
                    for key in rest {
                        value = value.get(key).unwrap_or(&Value::Null);
                    }
                    match value {
                        Value::Null => {
                            return Err(format!("topic template: `${{{}}}` is NULL", path.join(".")));
                        }
                        Value::Array(_) | Value::Object(_) => {
                            return Err(format!(
                                "topic template: `${{{}}}` is {}",
                                path.join("."),
                                describe(value)
                            ));
                        }
                        other => match other.to_text() {
                            Some(text) => out.push_str(&text),
                            None => {
                                return Err(format!("topic template: `${{{}}}` is not text", path.join(".")));
                            }
                        },
                    }
                }
            }
        }
        Topic::new(out).map(Topic::into_string).map_err(|e| format!("topic template: {e}"))
    }
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

    #[test]
    fn templates_render_columns_and_refuse_bad_topics() {
        let row = Row::Nested(Value::from_json(br#"{"site":"a","n":3,"p":{"x":"y"},"w":"x/+"}"#).unwrap());
        let columns = ["site", "n", "p", "w"];
        let t = Template::parse("s/${site}/${n}/${p.x}", &columns, None).unwrap();
        assert_eq!(t.render(&row).unwrap(), "s/a/3/y");
        let err = Template::parse("s/${sit}", &columns, None).unwrap_err();
        assert!(err.ends_with("did you mean `site`?"), "{err}");
        assert!(Template::parse("s/${site", &columns, None).is_err());
        assert!(
            Template::parse("s/${w}", &columns, None).unwrap().render(&row).unwrap_err().contains("wildcard")
        );
        assert!(
            Template::parse("${p.z}", &columns, None).unwrap().render(&row).unwrap_err().contains("NULL")
        );
    }

    #[test]
    fn flat_rows_encode_and_render_like_the_object_they_stand_for() {
        use crate::compile::Column;
        use crate::expr::Expr;
        let column = |name: &str| Column { path: vec![name.to_owned()], expr: Expr::Const(Value::Null) };
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
        let template = Template::parse("t/${q\"uo\\te}/${a.x}", &names, Some(&layout.names)).unwrap();
        assert_eq!(template.render(&row), template.render(&object));
        let without_slots = Template::parse("${f}/${a}", &names, None).unwrap();
        assert_eq!(without_slots.render(&row), without_slots.render(&object));
    }

    fn row_value(row: &Row<'_>) -> Value {
        match row {
            Row::Flat { layout, values } => Row::Flat { layout, values: values.clone() }.into_value(),
            Row::Nested(value) => value.clone(),
        }
    }
}
