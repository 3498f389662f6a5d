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
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.message)?;
        if let Some(loc) = &self.location {
            let Some(text) = loc.sql.lines().nth(usize::try_from(loc.line.saturating_sub(1)).unwrap_or(0))
            else {
                return Ok(());
            };
            let number = loc.line.to_string();
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
}

impl SqlError {
    pub(crate) fn new(message: impl Into<String>, span: sqlparser::tokenizer::Span) -> SqlError {
        let width = if span.start.line == span.end.line && span.end.column > span.start.column {
            span.end.column - span.start.column
        } else {
            1
        };
        let span = (span.start.line > 0).then_some((span.start.line, span.start.column, width));
        SqlError { message: message.into(), span }
    }

    pub(crate) fn unplaced(message: impl Into<String>) -> SqlError {
        SqlError { message: message.into(), span: None }
    }

    pub(crate) fn into_problem(self, context: &str, sql: &str) -> Problem {
        Problem {
            context: context.to_owned(),
            message: self.message,
            location: self.span.map(|(line, column, width)| SqlLocation {
                sql: sql.to_owned(),
                line,
                column,
                width,
            }),
        }
    }
}

/// " did you mean `x`?" for the closest candidate, or "" when nothing is close.
pub(crate) fn did_you_mean<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
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
