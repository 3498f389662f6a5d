//! Enrichment tables: static data (a device registry: device id → site, line, thresholds)
//! that rules read with `lookup(table, key[, field])`.
//!
//! Tables are built from text the caller supplies (CSV or TOML) or declared inline in the
//! rules file; this module never opens a file. Cells are typed when parsed: in CSV, `42`
//! is an integer, `4.2` a float, `true`/`false` booleans, an empty cell NULL, anything
//! else a string. Keys are strings; a numeric key in a rule is compared by its text.

use std::collections::{BTreeMap, HashMap};

use crate::value::Value;

/// A parsed table: rows by key. Every row is an object that includes the key column.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    name: String,
    key_column: String,
    /// Column names in first-seen order, the key column first.
    columns: Vec<String>,
    rows: rustc_hash::FxHashMap<String, Value>,
}

/// Why table text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("CSV line {line}: {message}")]
    Csv { line: usize, message: String },
    #[error("TOML: {0}")]
    Toml(String),
    #[error("duplicate key `{0}`; every row needs its own key")]
    DuplicateKey(String),
    #[error("key column `{key}` is not among the columns ({columns})")]
    MissingKeyColumn { key: String, columns: String },
}

impl Table {
    /// Builds a table from rows given as `(key, object)` pairs; the key is added to each row
    /// under `key_column`.
    pub fn from_rows(
        name: &str,
        key_column: &str,
        rows: impl IntoIterator<Item = (String, Vec<(String, Value)>)>,
    ) -> Result<Table, TableError> {
        let mut table = Table {
            name: name.to_owned(),
            key_column: key_column.to_owned(),
            columns: vec![key_column.to_owned()],
            rows: rustc_hash::FxHashMap::default(),
        };
        for (key, fields) in rows {
            let mut row = Value::Object(vec![(key_column.to_owned(), Value::Str(key.clone()))]);
            for (column, value) in fields {
                if !table.columns.contains(&column) {
                    table.columns.push(column.clone());
                }
                row.insert(&column, value);
            }
            if table.rows.insert(key.clone(), row).is_some() {
                return Err(TableError::DuplicateKey(key));
            }
        }
        Ok(table)
    }

    /// Parses CSV text with a header line. `key_column` names the key column; `None`
    /// takes the first column. Fields may be quoted with `"` (a doubled `""` is a quote).
    pub fn from_csv(name: &str, text: &str, key_column: Option<&str>) -> Result<Table, TableError> {
        let mut records = parse_csv(text)?.into_iter();
        let Some((_, header)) = records.next() else {
            return Err(TableError::Csv { line: 1, message: "no header line".into() });
        };
        let key_column =
            key_column.map(str::to_owned).or_else(|| header.first().cloned()).unwrap_or_default();
        let Some(key_idx) = header.iter().position(|h| *h == key_column) else {
            return Err(TableError::MissingKeyColumn { key: key_column, columns: header.join(", ") });
        };
        let mut rows = Vec::new();
        for (line, record) in records {
            if record.len() != header.len() {
                return Err(TableError::Csv {
                    line,
                    message: format!(
                        "{} fields, but the header has {}; every line needs one field per column (quote a field that holds a comma)",
                        record.len(),
                        header.len()
                    ),
                });
            }
            let key = record.get(key_idx).cloned().unwrap_or_default();
            let fields = header
                .iter()
                .zip(record)
                .enumerate()
                .filter(|(idx, _)| *idx != key_idx)
                .map(|(_, (column, cell))| (column.clone(), typed_cell(&cell)))
                .collect();
            rows.push((key, fields));
        }
        Table::from_rows(name, &key_column, rows)
    }

    /// Parses TOML text whose top-level tables are rows keyed by their name:
    ///
    /// ```toml
    /// [dev-001]
    /// site = "plant-a"
    /// max_temp = 80.0
    /// ```
    pub fn from_toml(name: &str, text: &str, key_column: &str) -> Result<Table, TableError> {
        let rows: BTreeMap<String, toml::Table> =
            toml::from_str(text).map_err(|e| TableError::Toml(e.to_string()))?;
        Table::from_toml_rows(name, key_column, rows)
    }

    pub(crate) fn from_toml_rows(
        name: &str,
        key_column: &str,
        rows: BTreeMap<String, toml::Table>,
    ) -> Result<Table, TableError> {
        let rows = rows.into_iter().map(|(key, fields)| {
            let fields = fields.into_iter().map(|(k, v)| (k, toml_to_value(v))).collect();
            (key, fields)
        });
        Table::from_rows(name, key_column, rows)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_column(&self) -> &str {
        &self.key_column
    }

    /// Column names, the key column first.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row for `key`, an object of all its columns.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.rows.get(key)
    }
}

/// Table texts the caller has read, by the name the rules file uses for them (the `file`
/// value of a `[[table]]`), plus ready-made tables. The engine never reads files itself.
#[derive(Debug, Clone, Default)]
pub struct TableSources {
    texts: HashMap<String, String>,
    tables: Vec<Table>,
}

impl TableSources {
    pub fn new() -> TableSources {
        TableSources::default()
    }

    /// The text of the file a `[[table]]` names with `file = "…"`, under that exact string.
    pub fn with_text(mut self, file: impl Into<String>, text: impl Into<String>) -> TableSources {
        self.texts.insert(file.into(), text.into());
        self
    }

    /// A table built by the caller, available to `lookup` under its own name.
    pub fn with_table(mut self, table: Table) -> TableSources {
        self.tables.push(table);
        self
    }

    pub(crate) fn text(&self, file: &str) -> Option<&str> {
        self.texts.get(file).map(String::as_str)
    }

    pub(crate) fn tables(&self) -> &[Table] {
        &self.tables
    }
}

pub(crate) fn toml_to_value(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::Str(s),
        toml::Value::Integer(i) => Value::Int(i),
        toml::Value::Float(f) => Value::Float(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::Str(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_value).collect()),
        toml::Value::Table(t) => Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_value(v))).collect()),
    }
}

fn typed_cell(cell: &str) -> Value {
    if cell.is_empty() {
        Value::Null
    } else if let Ok(i) = cell.parse::<i64>() {
        Value::Int(i)
    } else if let Some(f) = cell.parse::<f64>().ok().filter(|f| f.is_finite()) {
        Value::Float(f)
    } else if cell == "true" || cell == "false" {
        Value::Bool(cell == "true")
    } else {
        Value::Str(cell.to_owned())
    }
}

/// RFC 4180 CSV: records with their 1-based starting line. Blank lines are skipped.
fn parse_csv(text: &str) -> Result<Vec<(usize, Vec<String>)>, TableError> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut field_was_quoted = false;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !field_was_quoted => {
                in_quotes = true;
                field_was_quoted = true;
            }
            '"' => {
                return Err(TableError::Csv { line, message: "a quote inside an unquoted field".into() });
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                field_was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if !(record.is_empty() && field.is_empty() && !field_was_quoted) {
                    record.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut record)));
                }
                field_was_quoted = false;
                line += 1;
                record_line = line;
            }
            _ => {
                if field_was_quoted {
                    return Err(TableError::Csv { line, message: "text after a closing quote".into() });
                }
                field.push(c);
            }
        }
    }
    if in_quotes {
        return Err(TableError::Csv { line, message: "unterminated quoted field".into() });
    }
    if !(record.is_empty() && field.is_empty() && !field_was_quoted) {
        record.push(field);
        records.push((record_line, record));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_are_typed_and_keyed() {
        let text = "device,site,max_temp,active,note\r\nd1,plant-a,80,true,\"a, \"\"b\"\"\"\n\nd2,plant-b,72.5,false,\n";
        let table = Table::from_csv("devices", text, None).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.get("d1").unwrap().to_json_string(),
            r#"{"device":"d1","site":"plant-a","max_temp":80,"active":true,"note":"a, \"b\""}"#
        );
        assert_eq!(table.get("d2").unwrap().get("note"), Some(&Value::Null));
        assert_eq!(table.columns(), ["device", "site", "max_temp", "active", "note"]);
    }

    #[test]
    fn csv_errors_name_the_line() {
        let err = Table::from_csv("t", "a,b\n1,2\n3\n", None).unwrap_err();
        assert!(err.to_string().starts_with("CSV line 3: 1 fields, but the header has 2; "), "{err}");
        let err = Table::from_csv("t", "a,b\n1,\"2\n", None).unwrap_err();
        assert_eq!(err.to_string(), "CSV line 3: unterminated quoted field");
        let err = Table::from_csv("t", "a,b\n1,2\n1,3\n", None).unwrap_err();
        assert_eq!(err, TableError::DuplicateKey("1".into()));
        let err = Table::from_csv("t", "a,b\n", Some("id")).unwrap_err();
        assert_eq!(err.to_string(), "key column `id` is not among the columns (a, b)");
    }

    #[test]
    fn toml_rows_are_keyed_by_table_name() {
        let table = Table::from_toml("devices", "[d1]\nsite = \"a\"\nmax = 3\n", "device").unwrap();
        assert_eq!(table.get("d1").unwrap().to_json_string(), r#"{"device":"d1","max":3,"site":"a"}"#);
        assert!(Table::from_toml("devices", "[d1\n", "device").is_err());
    }
}
