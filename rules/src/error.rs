//! Compile-time errors: every problem in a rules file, each with where it is and, for SQL,
//! the offending line with a caret under the column.
//!
//! Evaluation never returns these: a rule that fails on an event produces
//! [`crate::Output::DeadLetter`] instead, and the other rules still run.

use std::fmt;

/// Why a rules file was refused. Compilation collects every problem it can find, so one
/// round of fixes is usually enough.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file is not valid TOML or does not have the expected shape (an unknown key, a
    /// wrong type). The message from `toml` names the line and column.
    #[error("invalid rules file: {}", .0.to_string().trim_end())]
    Toml(#[from] toml::de::Error),
    /// The file parsed, but rules or tables in it are wrong.
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

impl RulesError {
    /// The individual problems; a TOML error counts as one problem without a rule.
    pub fn problems(&self) -> Vec<String> {
        match self {
            RulesError::Toml(e) => vec![format!("invalid rules file: {}", e.to_string().trim_end())],
            RulesError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

fn render_problems(problems: &[Problem]) -> String {
    let mut out = String::new();
    for (idx, problem) in problems.iter().enumerate() {
        if idx > 0 {
            out.push('\n');
        }
        out.push_str(&problem.to_string());
    }
    out
}

/// One problem: what is wrong, in which rule or table, and where in its SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// "rule `hot`", "table `devices`" or "rules file".
    pub context: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
    /// The SQL text and the 1-based line and column range of the offending part.
    pub location: Option<SqlLocation>,
}

/// A place in a rule's SQL, for rendering a caret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlLocation {
    pub sql: String,
    /// 1-based line in `sql`.
    pub line: u64,
    /// 1-based column (in characters) of the first offending character.
    pub column: u64,
    /// How many characters to underline (at least 1).
    pub width: u64,
    /// The same place in the rules file: 1-based line, and column when it is exact (it is
    /// not in a `"…"` string with escapes, where the file holds more characters than the SQL).
    pub file_line: u64,
    pub file_column: Option<u64>,
}

/// Where a rule's SQL text starts in the rules file, from the span of its TOML string.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqlOrigin {
    line: u64,
    column: u64,
    exact_columns: bool,
}

impl SqlOrigin {
    /// Where `text` (a template, which is not spanned by the TOML parser) first stands in the
    /// file; when it is not there verbatim (escapes), line 1 of the file, without columns.
    pub(crate) fn find(file: &str, text: &str) -> SqlOrigin {
        match file.find(text).filter(|_| !text.is_empty()) {
            Some(start) => {
                let before = &file[..start];
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                SqlOrigin {
                    line: before.matches('\n').count() as u64 + 1,
                    column: before[line_start..].chars().count() as u64 + 1,
                    exact_columns: true,
                }
            }
            None => SqlOrigin { line: 1, column: 1, exact_columns: false },
        }
    }

    pub(crate) fn locate(file: &str, span: std::ops::Range<usize>) -> SqlOrigin {
        let raw = file.get(span.clone()).unwrap_or("");
        let multi_line = raw.starts_with("\"\"\"") || raw.starts_with("'''");
        let mut start = span.start + if multi_line { 3 } else { 1 };
        // TOML drops a newline right after the opening quotes of a multi-line string.
        if multi_line {
            let rest = file.get(start..).unwrap_or("");
            start += if rest.starts_with("\r\n") { 2 } else { usize::from(rest.starts_with('\n')) };
        }
        let before = file.get(..start.min(file.len())).unwrap_or("");
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        SqlOrigin {
            line: before.matches('\n').count() as u64 + 1,
            column: before[line_start..].chars().count() as u64 + 1,
            exact_columns: raw.starts_with('\'') || !raw.contains('\\'),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(SqlLocation { file_line, file_column: Some(column), .. }) => {
                write!(f, "line {file_line}, column {column}: ")?
            }
            Some(SqlLocation { file_line, file_column: None, .. }) => write!(f, "line {file_line}: ")?,
            None => {}
        }
        write!(f, "{}: {}", self.context, self.message)?;
        if let Some(loc) = &self.location {
            let Some(text) = loc.sql.lines().nth(usize::try_from(loc.line.saturating_sub(1)).unwrap_or(0))
            else {
                return Ok(());
            };
            let number = loc.file_line.to_string();
            let pad = " ".repeat(number.len());
            let indent = " ".repeat(usize::try_from(loc.column.saturating_sub(1)).unwrap_or(0));
            let carets = "^".repeat(usize::try_from(loc.width.clamp(1, 200)).unwrap_or(1));
            write!(f, "\n{pad} |\n{number} | {text}\n{pad} | {indent}{carets}")?;
        }
        Ok(())
    }
}

/// A problem found while compiling one SQL statement, before the rule name is attached.
#[derive(Debug, Clone)]
pub(crate) struct SqlError {
    pub message: String,
    pub span: Option<(u64, u64, u64)>,
    /// Set when the problem is a `lookup` of this undeclared table: if the table was
    /// declared but failed to load, that failure is the one problem to report.
    pub unknown_table: Option<String>,
}

impl SqlError {
    pub(crate) fn new(message: impl Into<String>, span: sqlparser::tokenizer::Span) -> SqlError {
        let width = if span.start.line == span.end.line && span.end.column > span.start.column {
            span.end.column - span.start.column
        } else {
            1
        };
        let span = (span.start.line > 0).then_some((span.start.line, span.start.column, width));
        SqlError { message: message.into(), span, unknown_table: None }
    }

    pub(crate) fn unplaced(message: impl Into<String>) -> SqlError {
        SqlError { message: message.into(), span: None, unknown_table: None }
    }

    pub(crate) fn into_problem(self, context: &str, sql: &str, origin: SqlOrigin) -> Problem {
        Problem {
            context: context.to_owned(),
            message: self.message,
            location: self.span.map(|(line, column, width)| SqlLocation {
                sql: sql.to_owned(),
                line,
                column,
                width,
                file_line: origin.line + line.saturating_sub(1),
                file_column: origin
                    .exact_columns
                    .then(|| if line <= 1 { origin.column + column.saturating_sub(1) } else { column }),
            }),
        }
    }
}

/// "; did you mean `x`?" for the closest candidate, or "" when nothing is close. Public so
/// the gateway's config errors suggest the same way the rules compiler does.
pub fn did_you_mean<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let wrong_lower = wrong.to_ascii_lowercase();
    let best = candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&wrong_lower, &c.to_ascii_lowercase()), c))
        .filter(|(distance, c)| *distance <= (c.chars().count() / 3).max(1) + 1)
        .min_by_key(|(distance, _)| *distance);
    match best {
        Some((_, c)) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use crate::{RuleSet, TableSources};

    #[track_caller]
    fn problems(rules: &str, devices_csv: &str) -> Vec<String> {
        let sources = TableSources::new().with_text("devices.csv", devices_csv);
        match RuleSet::compile(rules, &sources) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems(),
        }
    }

    const DEVICES: &str = "device,site\nd1,a\n";

    #[test]
    fn sql_positions_are_the_rules_files() {
        let rules = "# a comment\n[[rule]]\nname = \"hot\"\nsql = '''\nSELECT payload.t AS t\nFROM \"t\"\nWHERE rond(1) > 1'''\n[[rule.action]]\ntype = \"drop\"\n";
        assert_eq!(
            problems(rules, DEVICES),
            [
                "line 7, column 7: rule `hot`: unknown function `rond`; did you mean `round`?\n  |\n7 | WHERE rond(1) > 1\n  |       ^^^^"
            ]
        );
        // A "…" string with escapes: the file line is exact, the column is not, so it is left out.
        let rules = "[[rule]]\nname = \"hot\"\nsql = \"SELECT 1 AS one FROM \\\"t\\\" WHERE rond(1) > 1\"\n[[rule.action]]\ntype = \"drop\"\n";
        let found = problems(rules, DEVICES);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("line 3: rule `hot`: unknown function `rond`"), "{found:?}");
        // Without escapes a "…" string is exact too.
        let rules = "[[rule]]\nname = \"hot\"\nsql = \"SELECT rond(1) AS one FROM 't'\"\n[[rule.action]]\ntype = \"drop\"\n";
        let found = problems(rules, DEVICES);
        assert!(
            found.iter().any(|p| p.starts_with("line 3, column 15: rule `hot`: unknown function `rond`")),
            "{found:?}"
        );
    }

    #[test]
    fn a_table_that_fails_to_load_is_one_problem_naming_its_line() {
        let rules = "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n[[rule]]\nname = \"r\"\nsql = '''SELECT lookup('devices', topic(2), 'site') AS s, lookup('devices', topic(2)) AS d FROM \"t\"'''\n[[rule.action]]\ntype = \"drop\"\n";
        let found = problems(rules, "device,site\nd1,a\nd2\n");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("table `devices`: devices.csv:3: 1 fields, but the header has 2; "),
            "{found:?}"
        );
        // A table that was never declared is still reported at each lookup.
        let rules = rules.replace("name = \"devices\"", "name = \"registry\"");
        let found = problems(&rules, DEVICES);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found.iter().all(|p| p.contains("unknown table `devices`")), "{found:#?}");
    }
}
