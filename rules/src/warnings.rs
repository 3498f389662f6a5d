//! Warnings for a rule that loads but may not do what its author (often porting it from
//! EMQX) meant: a comparison that can never hold, and each use of a deliberate difference
//! from EMQX, named with its rewrite. `outpost rules check` and `outpost rules test` print
//! them; they never stop a rule from loading.

use std::sync::Arc;

use crate::compile::CompiledSql;
use crate::expr::{CmpOp, Expr, number};
use crate::value::Value;

/// Something a rule does that loads but deserves a second look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub rule: Arc<str>,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule `{}`: {}", self.rule, self.message)
    }
}

/// The warnings for one compiled statement, each message once, in the order found.
pub(crate) fn check(rule: &Arc<str>, sql: &CompiledSql) -> Vec<Warning> {
    let mut messages: Vec<String> = sql.notes.clone();
    if sql.star && sql.foreach.is_none() {
        messages.push(
            "`SELECT *` outputs id, topic, clientid, username, qos, timestamp and payload; EMQX also \
             outputs node, peerhost, flags, pub_props and more, and its id is a GUID string: select \
             the columns the action needs by name"
                .to_owned(),
        );
    }
    let mut exprs: Vec<&Expr> = sql.columns.iter().map(|c| &c.expr).chain(sql.condition.as_ref()).collect();
    if let Some(foreach) = &sql.foreach {
        exprs.push(&foreach.collection);
        exprs.extend(foreach.incase.as_ref());
    }
    for expr in exprs {
        walk(expr, &mut messages);
    }
    let mut seen = Vec::new();
    messages
        .into_iter()
        .filter(|m| {
            let new = !seen.contains(m);
            seen.push(m.clone());
            new
        })
        .map(|message| Warning { rule: rule.clone(), message })
        .collect()
}

fn walk(expr: &Expr, out: &mut Vec<String>) {
    match expr {
        Expr::Compare(op, left, right) => compare(*op, left, right, out),
        Expr::Call { func, args } => match func.name {
            "now_timestamp" | "now_rfc3339" => out.push(format!(
                "`{}()` is the event's receive time here, EMQX's is the clock when the rule runs (they \
                 differ by the processing delay); `timestamp` says the same thing plainly",
                func.name
            )),
            "format_date" if args.len() == 3 => out.push(
                "`format_date` without a timestamp formats the event's receive time here, EMQX the clock \
                 when the rule runs; pass `timestamp` as the fourth argument to say which"
                    .to_owned(),
            ),
            "unix_ts_to_rfc3339" => out.push(
                "`unix_ts_to_rfc3339` writes UTC (`Z`) here; EMQX writes the node's local offset: use \
                 `format_date(unit, offset, format, ts)` for a fixed offset"
                    .to_owned(),
            ),
            _ => {}
        },
        _ => {}
    }
    for child in expr.children() {
        walk(child, out);
    }
}

fn compare(op: CmpOp, left: &Expr, right: &Expr, out: &mut Vec<String>) {
    let constant = |e: &Expr| match e {
        Expr::Const(v) => Some(v.clone()),
        _ => None,
    };
    let ordering = matches!(op, CmpOp::Lt | CmpOp::LtEq | CmpOp::Gt | CmpOp::GtEq);
    match (constant(left), constant(right)) {
        (Some(Value::Null), None) | (None, Some(Value::Null)) if ordering => out.push(
            "an ordering comparison with NULL (`x > NULL`) is never TRUE: with one side NULL, EMQX's \
             comparisons are FALSE; write `x IS NOT NULL` or `is_not_null(x)`"
                .to_owned(),
        ),
        (Some(Value::Null), None) | (None, Some(Value::Null)) => out.push(
            "`= NULL` / `!= NULL` compare with NULL: `x = NULL` is TRUE only when x is NULL (as in \
             EMQX), `x != NULL` never is; write `x IS NULL` / `x IS NOT NULL` to say so plainly"
                .to_owned(),
        ),
        (None, Some(Value::Str(text))) | (Some(Value::Str(text)), None)
            if ordering && number(&Value::Str(text.clone())).is_none() && is_numeric(left, right) =>
        {
            out.push(format!(
                "comparing a number with the text '{text}' fails the rule on every event (EMQX converts the \
                 text to a number first and fails too): compare with a number"
            ))
        }
        _ => {}
    }
}

/// Whether the non-constant side of a comparison is arithmetic, which is always a number.
fn is_numeric(left: &Expr, right: &Expr) -> bool {
    [left, right].iter().any(|e| matches!(e, Expr::Arith(..)))
}
