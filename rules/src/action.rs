//! What a rule does with its output row: [`Action`]s, topic templates and output
//! encodings.
//!
//! A template such as `sites/${site}/alerts/${device}` is parsed and checked at compile
//! time: every `${name}` must be a column of the rule's output (did-you-mean otherwise).
//! At run time a NULL or missing value, or a rendered topic that is not a valid MQTT
//! topic name (empty, `+`, `#`, NUL), fails the action with a dead letter.

use std::time::Duration;

use crate::error::did_you_mean;
use crate::topic::Topic;
use crate::value::Value;
use crate::{OutputFormat, expr::describe};

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
}

#[derive(Debug)]
enum Part {
    Text(String),
    /// `${a.b}`: a path into the output row.
    Column(Vec<String>),
}

impl Template {
    /// Parses `text`, checking each `${..}` against `columns` (the output's top-level names).
    pub(crate) fn parse(text: &str, columns: &[&str]) -> Result<Template, String> {
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
            parts.push(Part::Column(path));
            rest = inner.get(end + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// Renders the template against an output row into a valid MQTT topic name.
    pub(crate) fn render(&self, row: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Column(path) => {
                    let mut value = row;
                    for key in path {
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
        Topic::new(out).map(|t| t.as_str().to_owned()).map_err(|e| format!("topic template: {e}"))
    }
}

/// Encodes an output row (or passes the original payload through).
pub(crate) fn encode(format: OutputFormat, row: &Value, original: &[u8]) -> Vec<u8> {
    match format {
        OutputFormat::Json => serde_json::to_vec(row).unwrap_or_default(),
        OutputFormat::Cbor => row.to_cbor(),
        OutputFormat::Raw => original.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_columns_and_refuse_bad_topics() {
        let row = Value::from_json(br#"{"site":"a","n":3,"p":{"x":"y"},"w":"x/+"}"#).unwrap();
        let columns = ["site", "n", "p", "w"];
        let t = Template::parse("s/${site}/${n}/${p.x}", &columns).unwrap();
        assert_eq!(t.render(&row).unwrap(), "s/a/3/y");
        let err = Template::parse("s/${sit}", &columns).unwrap_err();
        assert!(err.ends_with("did you mean `site`?"), "{err}");
        assert!(Template::parse("s/${site", &columns).is_err());
        assert!(Template::parse("s/${w}", &columns).unwrap().render(&row).unwrap_err().contains("wildcard"));
        assert!(Template::parse("${p.z}", &columns).unwrap().render(&row).unwrap_err().contains("NULL"));
    }
}
