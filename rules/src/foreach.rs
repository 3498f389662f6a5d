//! `FOREACH ... DO ... INCASE ... FROM ... WHERE ...`: EMQX's statement that turns one event
//! carrying an array into one output per element (gateways and PLCs batch their readings).
//!
//! What EMQX does (`emqx_rule_runtime.erl`: `select_and_collect`, `filter_collection`, and
//! its `t_sqlparse_foreach_*` tests), and so what this does:
//! - The FOREACH fields are `expr [AS name]`, comma-separated; the **last** one is the
//!   collection. Earlier ones are aliases later fields, `WHERE`, `DO` and `INCASE` read
//!   (`FOREACH json_decode(payload) AS p, p.sensors AS s`).
//! - `WHERE` runs once, before the elements; in it the last alias is the whole collection.
//! - A collection that is not an array (a number, a string, a missing field) yields no
//!   output and no error; a bare `payload` as the collection is decoded as JSON.
//! - Per element, `INCASE` keeps it if TRUE; the element is `item`, or the last alias.
//! - Without `DO`, an output row is the event's columns (as `SELECT *`), the FOREACH
//!   fields, and the element under `item` (or the alias). With `DO`, only the DO columns.
//! - Each row goes through the rule's actions, in element order.
//!
//! The token pass splits the statement at its top-level `DO`, `INCASE` and `FROM`; the
//! FOREACH fields with FROM and WHERE parse as a `SELECT`, so topic filters, aliases and
//! errors are the same as for any rule.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use sqlparser::ast::{GroupByExpr, SelectItem, SetExpr, Spanned, Statement};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Span, Token, TokenWithSpan, Whitespace};

use crate::compile::{
    ALIAS_PATH_QUOTE, Column, CompiledSql, Compiler, RECURSION_LIMIT, RowLayout, column_path,
    parse_alias_path, parser_error,
};
use crate::error::SqlError;
use crate::expr::{Expr, PathSeg};
use crate::table::Table;

/// The per-element part of a compiled `FOREACH` statement. The statement's
/// [`CompiledSql`] columns are the per-element row; its condition is the WHERE.
#[derive(Debug)]
pub(crate) struct Foreach {
    /// The last FOREACH field: what is iterated.
    pub collection: Expr,
    /// The collection is the bare `payload`: EMQX decodes it (`ensure_list`).
    pub bare_payload: bool,
    pub incase: Option<Expr>,
}

/// A FOREACH statement's tokens, split at its clauses.
struct Parts {
    foreach: Span,
    fields: Vec<TokenWithSpan>,
    doeach: Option<Vec<TokenWithSpan>>,
    incase: Option<Vec<TokenWithSpan>>,
    /// From `FROM` to the end.
    rest: Vec<TokenWithSpan>,
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// Whether the statement starts with `FOREACH`.
pub(crate) fn is_foreach(tokens: &[TokenWithSpan]) -> bool {
    tokens
        .iter()
        .find(|t| !matches!(t.token, Token::Whitespace(_)))
        .is_some_and(|t| is_word(&t.token, "foreach"))
}

fn split(tokens: Vec<TokenWithSpan>) -> Result<Parts, SqlError> {
    let mut iter = tokens.into_iter().skip_while(|t| matches!(t.token, Token::Whitespace(_)));
    let foreach = iter.next().map(|t| t.span).unwrap_or(Span::empty());
    // 0: FOREACH fields, 1: DO, 2: INCASE, 3: FROM onwards.
    let mut sections: [Option<Vec<TokenWithSpan>>; 4] = [Some(Vec::new()), None, None, None];
    let mut at = 0;
    let mut depth = 0usize;
    for token in iter {
        match &token.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            word if depth == 0 && at < 3 => {
                let clause = ["do", "incase", "from"].iter().position(|w| is_word(word, w)).map(|i| i + 1);
                if let Some(clause) = clause {
                    if clause <= at {
                        return Err(SqlError::new(
                            "FOREACH clauses go in this order: FOREACH fields [DO columns] [INCASE condition] FROM \"topic\" [WHERE condition]",
                            token.span,
                        ));
                    }
                    at = clause;
                    let keep = clause == 3;
                    if let Some(section) = sections.get_mut(at) {
                        *section = Some(if keep { vec![token] } else { Vec::new() });
                    }
                    continue;
                }
            }
            _ => {}
        }
        if let Some(Some(section)) = sections.get_mut(at) {
            section.push(token);
        }
    }
    let [fields, doeach, incase, rest] = sections;
    let Some(rest) = rest else {
        return Err(SqlError::new("missing `FROM \"topic/filter\"` after the FOREACH fields", foreach));
    };
    Ok(Parts { foreach, fields: fields.unwrap_or_default(), doeach, incase, rest })
}

fn parser(tokens: Vec<TokenWithSpan>) -> Parser<'static> {
    Parser::new(&GenericDialect {}).with_recursion_limit(RECURSION_LIMIT).with_tokens_with_locations(tokens)
}

fn expect_end(parser: &mut Parser<'_>, what: &str) -> Result<(), SqlError> {
    let next = parser.peek_token();
    if next.token == Token::EOF {
        Ok(())
    } else {
        Err(SqlError::new(format!("unexpected `{}` in {what}", next.token), next.span))
    }
}

/// Compiles a statement for which [`is_foreach`] holds; `tokens` went through the EMQX
/// token pass.
pub(crate) fn compile_foreach(
    sql: &str,
    tokens: Vec<TokenWithSpan>,
    tables: &FxHashMap<String, Arc<Table>>,
) -> Result<CompiledSql, Vec<SqlError>> {
    let parts = split(tokens).map_err(|e| vec![e])?;
    if parts.fields.iter().all(|t| matches!(t.token, Token::Whitespace(_))) {
        return Err(vec![SqlError::new(
            "FOREACH needs a field to iterate over, e.g. FOREACH payload.sensors",
            parts.foreach,
        )]);
    }
    let mut select = vec![
        TokenWithSpan { token: Token::make_keyword("SELECT"), span: parts.foreach },
        TokenWithSpan { token: Token::Whitespace(Whitespace::Space), span: parts.foreach },
    ];
    select.extend(parts.fields);
    select.push(TokenWithSpan { token: Token::Whitespace(Whitespace::Space), span: parts.foreach });
    select.extend(parts.rest);
    let statement = parser(select).parse_statement().map_err(|e| vec![parser_error(&e.to_string(), sql)])?;
    let Statement::Query(query) = statement else {
        return Err(vec![SqlError::new("expected FOREACH ... FROM \"topic/filter\"", parts.foreach)]);
    };
    let SetExpr::Select(select) = *query.body else {
        return Err(vec![SqlError::new("expected FOREACH ... FROM \"topic/filter\"", parts.foreach)]);
    };
    let mut compiler = Compiler {
        tables,
        aliases: Default::default(),
        uses_payload: false,
        errors: Vec::new(),
        events: crate::events::EventKinds::NONE,
        unknown_names: Some(Vec::new()),
    };
    if select.distinct.is_some()
        || !matches!(&select.group_by, GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty())
        || select.having.is_some()
    {
        compiler
            .errors
            .push(SqlError::new("DISTINCT, GROUP BY and HAVING do not apply to FOREACH", select.span()));
    }
    let filters = compiler.topic_filters(&select.from, parts.foreach);

    // The FOREACH fields: all but the last are aliases; the last is the collection.
    let count = select.projection.len();
    let mut fields_out = Vec::new();
    let mut collection = None;
    let mut item_name = "item".to_owned();
    for (i, field) in select.projection.iter().enumerate() {
        let last = i + 1 == count;
        let (expr, alias) = match field {
            SelectItem::UnnamedExpr(expr) => (expr, None),
            SelectItem::ExprWithAlias { expr, alias } if alias.quote_style != Some(ALIAS_PATH_QUOTE) => {
                (expr, Some(alias.value.clone()))
            }
            other => {
                compiler
                    .errors
                    .push(SqlError::new("a FOREACH field is `expr` or `expr AS name`", other.span()));
                continue;
            }
        };
        let Some(compiled) = compiler.expr_or_record(expr) else {
            if let Some(alias) = alias {
                compiler.aliases.insert(alias, Expr::Const(crate::value::Value::Null));
            }
            continue;
        };
        let path = match &alias {
            Some(alias) => vec![PathSeg::Key(alias.clone())],
            None => column_path(expr),
        };
        if let Some(alias) = &alias {
            compiler.aliases.insert(alias.clone(), compiled.clone());
        }
        if last {
            item_name = alias.unwrap_or_else(|| "item".to_owned());
            let bare_payload = matches!(&compiled, Expr::Payload { path, .. } if path.is_empty());
            collection = Some((compiled.clone(), bare_payload));
        }
        fields_out.push(Column { path, expr: compiled });
    }
    // WHERE sees the last alias as the whole collection, as EMQX's WHERE does.
    let condition = select.selection.as_ref().and_then(|e| compiler.expr_or_record(e));

    // DO and INCASE see the element.
    compiler.aliases.insert(item_name.clone(), Expr::Item);
    let incase = parts.incase.and_then(|tokens| {
        let mut p = parser(tokens);
        let parsed = p.parse_expr().map_err(|e| parser_error(&e.to_string(), sql));
        match parsed.and_then(|e| expect_end(&mut p, "INCASE").map(|()| e)) {
            Ok(e) => compiler.expr_or_record(&e),
            Err(e) => {
                compiler.errors.push(e);
                None
            }
        }
    });
    let (star, columns) = match parts.doeach {
        None => {
            compiler.uses_payload = true;
            fields_out.push(Column { path: vec![PathSeg::Key(item_name)], expr: Expr::Item });
            (true, fields_out)
        }
        Some(tokens) => {
            let mut p = parser(tokens);
            let items = p.parse_projection().map_err(|e| parser_error(&e.to_string(), sql));
            match items.and_then(|items| expect_end(&mut p, "DO").map(|()| items)) {
                Ok(items) => (false, do_columns(&mut compiler, &items)),
                Err(e) => {
                    compiler.errors.push(e);
                    (false, Vec::new())
                }
            }
        }
    };
    match collection {
        Some((collection, bare_payload)) if compiler.errors.is_empty() => {
            let layout = RowLayout::new(star, &columns);
            Ok(CompiledSql {
                filters,
                events: compiler.events,
                star,
                columns,
                condition,
                uses_payload: compiler.uses_payload,
                layout,
                aliases: compiler.aliases,
                foreach: Some(Box::new(Foreach { collection, bare_payload, incase })),
                window: None,
                rbe: None,
                notes: compiler.unknown_names.unwrap_or_default(),
            })
        }
        _ if compiler.errors.is_empty() => Err(vec![SqlError::new(
            "FOREACH needs a field to iterate over, e.g. FOREACH payload.sensors",
            parts.foreach,
        )]),
        _ => Err(compiler.errors),
    }
}

/// The DO columns, as SELECT columns are compiled: `expr`, `expr AS name`, `expr AS path`.
fn do_columns(compiler: &mut Compiler<'_>, items: &[SelectItem]) -> Vec<Column> {
    let mut columns = Vec::new();
    for item in items {
        match item {
            SelectItem::UnnamedExpr(expr) => {
                if let Some(compiled) = compiler.expr_or_record(expr) {
                    columns.push(Column { path: column_path(expr), expr: compiled });
                }
            }
            SelectItem::ExprWithAlias { expr, alias } if alias.quote_style == Some(ALIAS_PATH_QUOTE) => {
                match (compiler.expr_or_record(expr), parse_alias_path(&alias.value, alias.span)) {
                    (Some(compiled), Ok(path)) => columns.push(Column { path, expr: compiled }),
                    (_, Err(e)) => compiler.errors.push(e),
                    (None, _) => {}
                }
            }
            SelectItem::ExprWithAlias { expr, alias } => match compiler.expr_or_record(expr) {
                Some(compiled) => {
                    compiler.aliases.insert(alias.value.clone(), compiled.clone());
                    columns.push(Column { path: vec![PathSeg::Key(alias.value.clone())], expr: compiled });
                }
                None => {
                    compiler.aliases.insert(alias.value.clone(), Expr::Const(crate::value::Value::Null));
                }
            },
            other => {
                compiler.errors.push(SqlError::new("a DO column is `expr` or `expr AS name`", other.span()))
            }
        }
    }
    columns
}
