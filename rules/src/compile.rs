//! SQL text → plan. Parses one rule's SQL with `sqlparser` (GenericDialect, which reads
//! double-quoted topic filters in FROM as quoted identifiers) and resolves every name:
//! fields, payload paths, functions, tables, aliases. All problems it finds carry the
//! span of the offending SQL, for a caret.
//!
//! **Invariant:** nothing here runs per event. What it returns ([`CompiledSql`]) holds no
//! AST; evaluation walks only [`crate::expr::Expr`].

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use sqlparser::ast::{
    self, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, SelectItem,
    SetExpr, Spanned, Statement, TableFactor, UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Span, Token, TokenWithSpan, Tokenizer, Word};

use crate::error::{SqlError, did_you_mean};
use crate::events::{EventKind, EventKinds};
use crate::expr::{ArithOp, CmpOp, Expr, Field, PUT_HEAD, PUT_TAIL, PathSeg};
use crate::functions::{BUILTINS, NOT_SUPPORTED, find_builtin};
use crate::table::Table;
use crate::value::Value;
use crate::window::sql::WindowSql;
use outpost_topic::TopicFilter;

/// Deep nesting is refused by the parser before it can exhaust the stack.
pub(crate) const RECURSION_LIMIT: usize = 32;

/// sqlparser builds operator chains (`a + b + c ...`) iteratively but as a left-deep tree,
/// which compiling, evaluating and dropping then walk recursively. Capping the number of
/// operators bounds that depth, so no rule text can overflow the stack.
const MAX_OPERATORS: usize = 100;

/// The names a rule can read, besides aliases: (name, field). `payload` is separate.
const FIELDS: &[(&str, Field)] = &[
    ("topic", Field::Topic),
    ("clientid", Field::ClientId),
    ("username", Field::Username),
    ("qos", Field::Qos),
    ("timestamp", Field::Timestamp),
    ("ts", Field::Timestamp),
    ("publish_received_at", Field::Timestamp),
    ("id", Field::EventId),
    ("event_id", Field::EventId),
    ("hops", Field::Hops),
    ("peerhost", Field::PeerHost),
    ("flags", Field::Flags),
    ("pub_props", Field::PubProps),
    ("metadata", Field::Metadata),
];

/// The columns `SELECT *` produces, in order.
pub(crate) const STAR_COLUMNS: &[&str] =
    &["id", "topic", "clientid", "username", "qos", "timestamp", "payload"];

/// One compiled `SELECT` statement.
#[derive(Debug)]
pub(crate) struct CompiledSql {
    pub filters: Vec<TopicFilter>,
    /// The event topics in FROM (`$events/...`), apart from the filters: events never go
    /// through the topic index.
    pub events: EventKinds,
    /// `SELECT *` was given: the output starts with [`STAR_COLUMNS`].
    pub star: bool,
    pub columns: Vec<Column>,
    pub condition: Option<Expr>,
    /// Whether any expression reads the payload; if not, it is never decoded.
    pub uses_payload: bool,
    /// Where each column goes in a flat output row; `None` when some column nests.
    pub layout: Option<RowLayout>,
    /// The SELECT aliases, compiled: what a name means in an action's `${..}` expression.
    pub aliases: HashMap<String, Expr>,
    /// A `FOREACH` statement: the columns above make one row per element.
    pub foreach: Option<Box<crate::foreach::Foreach>>,
    /// A windowed rule's per-event part; its `condition` is then its HAVING.
    pub window: Option<WindowSql>,
    /// The report-by-exception calls (`deadband`, `lag`, ...), computed before WHERE.
    pub rbe: Option<crate::rbe::RbeSql>,
    /// What compiling found worth a warning (unknown names), for [`crate::warnings::check`].
    pub notes: Vec<String>,
}

/// The output row of a statement whose columns all have one-level names (`expr AS name`,
/// an unaliased field or function call; `*` too): the row's names in output order, each
/// once, and where each column writes. Worked out here so that building a row per event
/// copies no names and compares none. A later column with the same name replaces the
/// earlier value in its place, as [`Value::insert`] does.
#[derive(Debug)]
pub(crate) struct RowLayout {
    pub names: Vec<String>,
    /// Per column of [`CompiledSql::columns`], its index in `names`.
    pub slots: Vec<usize>,
    /// Each name as a JSON object key, escaped and followed by `:`, for encoding rows.
    pub json_keys: Vec<String>,
}

impl RowLayout {
    /// `None` if a column nests (an unaliased `payload.a.b`): such rows are built as EMQX
    /// nests them, with [`Value::insert_path`].
    pub(crate) fn new(star: bool, columns: &[Column]) -> Option<RowLayout> {
        let mut names: Vec<String> =
            if star { STAR_COLUMNS.iter().map(|n| (*n).to_owned()).collect() } else { Vec::new() };
        let mut slots = Vec::with_capacity(columns.len());
        for column in columns {
            let [PathSeg::Key(name)] = column.path.as_slice() else { return None };
            let slot = match names.iter().position(|n| n == name) {
                Some(slot) => slot,
                None => {
                    names.push(name.clone());
                    names.len() - 1
                }
            };
            slots.push(slot);
        }
        let json_keys =
            names.iter().map(|name| format!("{}:", Value::Str(name.clone()).to_json_string())).collect();
        Some(RowLayout { names, slots, json_keys })
    }
}

/// An output column: where it goes in the output object, and how it is computed.
#[derive(Debug)]
pub(crate) struct Column {
    /// `["alias"]`, a path target (`AS meta.info`, `AS payload.data[1].name`), or a nested
    /// path for an unaliased `payload.a.b` (as EMQX nests it).
    pub path: Vec<PathSeg>,
    pub expr: Expr,
}

impl CompiledSql {
    /// Every expression of the statement (columns, then WHERE), for passes over the plan.
    pub(crate) fn exprs_mut(&mut self) -> impl Iterator<Item = &mut Expr> {
        let foreach = self
            .foreach
            .as_deref_mut()
            .into_iter()
            .flat_map(|f| std::iter::once(&mut f.collection).chain(f.incase.as_mut()));
        self.columns
            .iter_mut()
            .map(|c| &mut c.expr)
            .chain(self.condition.as_mut())
            .chain(foreach)
            .chain(self.window.iter_mut().flat_map(WindowSql::exprs_mut))
            .chain(self.rbe.iter_mut().flat_map(crate::rbe::RbeSql::exprs_mut))
    }

    /// Whether the rule keeps state between events (a window, or `deadband`, `lag` ...).
    pub(crate) fn is_stateful(&self) -> bool {
        self.window.is_some() || self.rbe.is_some()
    }

    /// The top-level names in the output object, for checking `${..}` templates.
    pub(crate) fn output_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = if self.star { STAR_COLUMNS.to_vec() } else { Vec::new() };
        names.extend(self.columns.iter().filter_map(|c| match c.path.first() {
            Some(PathSeg::Key(name)) => Some(name.as_str()),
            _ => None,
        }));
        names
    }
}

pub(crate) fn compile_sql(
    sql: &str,
    tables: &FxHashMap<String, Arc<Table>>,
) -> Result<CompiledSql, Vec<SqlError>> {
    check_operators(sql, "statement", "split the rule")?;
    let tokens = emqx_tokens(sql)?;
    if crate::foreach::is_foreach(&tokens) {
        return crate::foreach::compile_foreach(sql, tokens, tables);
    }
    let statements = Parser::new(&GenericDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| vec![parser_error(&e.to_string(), sql)])?;
    let mut statements = statements.into_iter();
    let (Some(statement), None) = (statements.next(), statements.next()) else {
        return Err(vec![SqlError::unplaced(
            "expected exactly one `SELECT ... FROM \"topic/filter\"` statement",
        )]);
    };
    let Statement::Query(query) = statement else {
        return Err(vec![SqlError::new("only SELECT statements are rules", statement.span())]);
    };
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return Err(vec![SqlError::new(
            "WITH, ORDER BY, LIMIT and FETCH do not apply to single events",
            query.span(),
        )]);
    }
    let SetExpr::Select(mut select) = *query.body else {
        return Err(vec![SqlError::new(
            "expected a plain `SELECT ... FROM ... WHERE ...`",
            query.body.span(),
        )]);
    };
    let mut compiler = Compiler {
        tables,
        aliases: HashMap::new(),
        uses_payload: false,
        errors: Vec::new(),
        events: EventKinds::NONE,
        unknown_names: Some(Vec::new()),
    };
    // Takes GROUP BY and HAVING out of the statement when they make a window.
    // Its errors come alone: the rest of the statement was written for a window.
    let windowed = crate::window::sql::extract(&mut select)?;
    let unsupported = [
        (select.distinct.is_some(), "DISTINCT"),
        (select.top.is_some(), "TOP"),
        (select.into.is_some(), "INTO"),
        (
            !matches!(&select.group_by, GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty()),
            "GROUP BY",
        ),
        (select.having.is_some(), "HAVING"),
        (
            !select.sort_by.is_empty() || !select.cluster_by.is_empty() || !select.distribute_by.is_empty(),
            "SORT BY",
        ),
        (!select.lateral_views.is_empty(), "LATERAL VIEW"),
        (select.qualify.is_some() || select.prewhere.is_some(), "QUALIFY/PREWHERE"),
        (!select.named_window.is_empty(), "WINDOW"),
    ];
    for (present, clause) in unsupported {
        if present {
            compiler.errors.push(SqlError::new(format!("{clause} is not supported in rules"), select.span()));
        }
    }

    let filters = compiler.topic_filters(&select.from, select.select_token.0.span);
    let window =
        windowed.as_ref().map(|(window, _)| crate::window::sql::compile(window, &select, &mut compiler));
    let rbe = if windowed.is_none() { crate::rbe::extract(&mut select, &mut compiler)? } else { None };

    let mut star = false;
    let mut columns = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(_) => {
                star = true;
                compiler.uses_payload = true;
            }
            SelectItem::QualifiedWildcard(_, _) | SelectItem::ExprWithAliases { .. } => {
                compiler.errors.push(SqlError::new("expected `*`, `expr` or `expr AS name`", item.span()));
            }
            SelectItem::UnnamedExpr(expr) => {
                if let Some(compiled) = compiler.expr_or_record(expr) {
                    columns.push(Column { path: column_path(expr), expr: compiled });
                }
            }
            SelectItem::ExprWithAlias { expr, alias } if alias.quote_style == Some(ALIAS_PATH_QUOTE) => {
                // `AS meta.info`, `AS payload.data[1].name`: the value goes to that place in
                // the output, as EMQX's nested_put puts it.
                match (compiler.expr_or_record(expr), parse_alias_path(&alias.value, alias.span)) {
                    (Some(compiled), Ok(path)) => {
                        // EMQX's WHERE reads the selected map, so `meta.info` names this value.
                        compiler.aliases.insert(alias.value.clone(), compiled.clone());
                        columns.push(Column { path, expr: compiled })
                    }
                    (_, Err(e)) => compiler.errors.push(e),
                    (None, _) => {}
                }
            }
            SelectItem::ExprWithAlias { expr, alias } => match compiler.expr_or_record(expr) {
                Some(compiled) => {
                    compiler.aliases.insert(alias.value.clone(), compiled.clone());
                    columns.push(Column { path: vec![PathSeg::Key(alias.value.clone())], expr: compiled });
                }
                // The error is recorded; a placeholder keeps later uses from adding more.
                None => {
                    compiler.aliases.insert(alias.value.clone(), Expr::Const(Value::Null));
                }
            },
        }
    }
    let condition = match &windowed {
        Some((_, having)) => having.as_ref().and_then(|e| compiler.expr_or_record(e)),
        None => select.selection.as_ref().and_then(|e| compiler.expr_or_record(e)),
    };

    if compiler.errors.is_empty() {
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
            foreach: None,
            window,
            rbe,
            notes: compiler.unknown_names.unwrap_or_default(),
        })
    } else {
        Err(compiler.errors)
    }
}

/// Refuses text with more than [`MAX_OPERATORS`] operators before it reaches the parser.
fn check_operators(text: &str, what: &str, fix: &str) -> Result<(), Vec<SqlError>> {
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| vec![parser_error(&e.to_string(), text)])?;
    let operators = tokens.iter().filter(|t| is_operator(&t.token)).count();
    if operators > MAX_OPERATORS {
        return Err(vec![SqlError::unplaced(format!(
            "the {what} has {operators} operators; at most {MAX_OPERATORS} are allowed ({fix})"
        ))]);
    }
    Ok(())
}

/// Compiles one expression of the rule language outside the statement: the `${..}` of an
/// action's template. Names resolve as in the statement's WHERE (aliases of `sql`, fields,
/// `payload`); spans count from the start of `text`. The second value says whether the
/// expression reads the payload.
pub(crate) fn compile_expr(
    text: &str,
    sql: &CompiledSql,
    tables: &FxHashMap<String, Arc<Table>>,
) -> Result<(Expr, bool), Vec<SqlError>> {
    check_operators(text, "expression", "move the computation into the SELECT")?;
    let tokens = emqx_tokens(text)?;
    let mut parser = Parser::new(&GenericDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(tokens);
    let parsed = parser.parse_expr().map_err(|e| vec![parser_error(&e.to_string(), text)])?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(vec![SqlError::new(
            format!("expected one expression, found `{}` after it", next.token),
            next.span,
        )]);
    }
    let mut compiler = Compiler {
        tables,
        aliases: sql.aliases.clone(),
        uses_payload: false,
        errors: Vec::new(),
        events: sql.events,
        unknown_names: None,
    };
    match compiler.expr_or_record(&parsed) {
        Some(expr) if compiler.errors.is_empty() => Ok((expr, compiler.uses_payload)),
        _ => Err(compiler.errors),
    }
}

fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => matches!(word.keyword, Keyword::AND | Keyword::OR | Keyword::NOT),
        Token::LParen | Token::RParen | Token::Comma | Token::Period | Token::LBracket | Token::RBracket => {
            false
        }
        Token::Whitespace(_)
        | Token::Number(..)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_) => false,
        Token::EOF => false,
        _ => true,
    }
}

/// sqlparser reports "… at Line: L, Column: C" at the end of its message, except at the
/// end of input, where the caret goes just past the last character.
pub(crate) fn parser_error(message: &str, sql: &str) -> SqlError {
    let message = message.strip_prefix("sql parser error: ").unwrap_or(message);
    if let Some(at) = message.rfind(" at Line: ") {
        let (text, place) = message.split_at(at);
        let mut numbers = place.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
        if let (Some(Ok(line)), Some(Ok(column))) =
            (numbers.next().map(str::parse::<u64>), numbers.next().map(str::parse::<u64>))
        {
            return SqlError {
                message: format!("syntax error: {text}"),
                span: Some((line, column, 1)),
                unknown_table: None,
            };
        }
    }
    if message.ends_with("found: EOF") {
        let line = u64::try_from(sql.lines().count().max(1)).unwrap_or(1);
        let column = u64::try_from(sql.lines().last().map_or(0, |l| l.chars().count())).unwrap_or(0) + 1;
        return SqlError {
            message: format!("syntax error: {message}"),
            span: Some((line, column, 1)),
            unknown_table: None,
        };
    }
    SqlError::unplaced(format!("syntax error: {message}"))
}

/// `flag('retain')`: one publish flag, NULL for a name that is no flag. Apart from
/// `Compiler::function`, whose stack frame the recursion of deep expressions multiplies.
#[inline(never)]
fn flag_of(flag: &ast::Expr) -> Compiled {
    let Some(name) = string_literal(flag) else {
        return Err(SqlError::new("flag(name) takes a string literal, e.g. flag('retain')", flag.span()));
    };
    Ok(Expr::Get(Box::new(Expr::Field(Field::Flags)), vec![PathSeg::Key(name)]))
}

/// Unaliased columns are named as EMQX names them: `payload.a.b` nests, a plain field
/// keeps its name, anything else is named by its SQL text.
pub(crate) fn column_path(expr: &ast::Expr) -> Vec<PathSeg> {
    match expr {
        ast::Expr::Identifier(ident) => vec![PathSeg::Key(ident.value.clone())],
        ast::Expr::CompoundIdentifier(idents) => {
            idents.iter().map(|i| PathSeg::Key(i.value.clone())).collect()
        }
        ast::Expr::CompoundFieldAccess { root, access_chain } => {
            let mut path = column_path(root);
            for access in access_chain {
                match access {
                    ast::AccessExpr::Dot(ast::Expr::Identifier(ident)) => {
                        path.push(PathSeg::Key(ident.value.clone()))
                    }
                    ast::AccessExpr::Subscript(ast::Subscript::Index { index }) => match index_literal(index)
                    {
                        Ok(i) => path.push(PathSeg::Index(i)),
                        Err(_) => return vec![PathSeg::Key(expr.to_string())],
                    },
                    // EMQX puts an unaliased `payload.a[1..2]` at `payload.a`.
                    ast::AccessExpr::Subscript(ast::Subscript::Slice { .. }) => break,
                    _ => return vec![PathSeg::Key(expr.to_string())],
                }
            }
            path
        }
        other => vec![PathSeg::Key(other.to_string())],
    }
}

pub(crate) struct Compiler<'t> {
    pub(crate) tables: &'t FxHashMap<String, Arc<Table>>,
    /// Aliases defined so far in SELECT; later columns and WHERE may use them.
    pub(crate) aliases: HashMap<String, Expr>,
    pub(crate) uses_payload: bool,
    pub(crate) errors: Vec<SqlError>,
    /// The event topics FROM named so far: their fields are names in this rule.
    pub(crate) events: EventKinds,
    /// `Some`: an unknown bare name reads as NULL, as EMQX reads it as `undefined`, and its
    /// warning goes here (the statement). `None`: it is an error (a template's `${..}`,
    /// whose names are the rule's own columns and fields, all known at load).
    pub(crate) unknown_names: Option<Vec<String>>,
}

type Compiled = Result<Expr, SqlError>;

impl Compiler<'_> {
    pub(crate) fn expr_or_record(&mut self, expr: &ast::Expr) -> Option<Expr> {
        match self.expr(expr) {
            Ok(e) if !e.within_limits(0, &mut crate::expr::MAX_NODES.clone()) => {
                self.errors.push(SqlError::new(
                    format!(
                        "expression too large (more than {} nodes or {} levels deep after expanding aliases)",
                        crate::expr::MAX_NODES,
                        crate::expr::MAX_DEPTH
                    ),
                    expr.span(),
                ));
                None
            }
            Ok(e) => Some(e),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    pub(crate) fn topic_filters(
        &mut self,
        from: &[ast::TableWithJoins],
        select_span: Span,
    ) -> Vec<TopicFilter> {
        if from.is_empty() {
            self.errors.push(SqlError::new("missing `FROM \"topic/filter\"`", select_span));
        }
        let mut filters = Vec::new();
        for item in from {
            if !item.joins.is_empty() {
                self.errors.push(SqlError::new(
                    "JOIN is not supported; use lookup(table, key) to enrich",
                    item.span(),
                ));
            }
            let TableFactor::Table { name, alias: None, args: None, .. } = &item.relation else {
                self.errors
                    .push(SqlError::new("FROM takes double-quoted topic filters", item.relation.span()));
                continue;
            };
            let idents: Vec<&Ident> = name.0.iter().filter_map(|part| part.as_ident()).collect();
            let [ident] = idents.as_slice() else {
                self.errors.push(SqlError::new(
                    "write the topic filter in double quotes, e.g. FROM \"sensors/+/temp\"",
                    name.span(),
                ));
                continue;
            };
            if ident.quote_style != Some('"') {
                self.errors.push(SqlError::new(
                    format!("write the topic filter in double quotes: FROM \"{}\"", ident.value),
                    ident.span,
                ));
                continue;
            }
            if ident.value.starts_with("$events/") {
                match EventKind::from_topic(&ident.value) {
                    Some(kind) => self.events.insert(kind),
                    None => self.errors.push(SqlError::new(
                        format!(
                            "`{}` is no event topic Outpost reports{}; it reports {}",
                            ident.value,
                            did_you_mean(&ident.value, crate::events::topics()),
                            EventKind::ALL.map(EventKind::topic).join(", ")
                        ),
                        ident.span,
                    )),
                }
                continue;
            }
            match TopicFilter::new(ident.value.clone()) {
                Ok(filter) => filters.push(filter),
                Err(e) => self.errors.push(SqlError::new(e.to_string(), ident.span)),
            }
        }
        filters
    }

    fn payload(&mut self, path: Vec<PathSeg>) -> Expr {
        self.uses_payload = true;
        Expr::Payload { path, slot: None }
    }

    /// A bare name: an alias, a field or `payload`.
    fn name(&mut self, ident: &Ident) -> Compiled {
        if ident.quote_style == Some('\'') {
            return Ok(Expr::Const(Value::Str(ident.value.clone())));
        }
        // EMQX's lexer reads "text" as a NAME (sql_lex.xrl): a double-quoted word in an
        // expression is a field, alias or path, exactly like the bare word.
        let name = ident.value.as_str();
        if let Some(expr) = self.aliases.get(name) {
            return Ok(expr.clone());
        }
        if name.eq_ignore_ascii_case("payload") {
            return Ok(self.payload(Vec::new()));
        }
        if let Some((_, field)) = FIELDS.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Ok(Expr::Field(*field));
        }
        if let Some(field) = crate::events::field(name, self.events) {
            return Ok(Expr::Field(Field::Event(field)));
        }
        let event_fields: Vec<&str> = crate::events::field_names(self.events).collect();
        let candidates = FIELDS
            .iter()
            .map(|(n, _)| *n)
            .chain(["payload"])
            .chain(event_fields)
            .chain(self.aliases.keys().map(String::as_str));
        let hint = if ident.quote_style == Some('"') {
            "; EMQX reads a double-quoted word as a field name, not a string: write a string in single quotes ('text')"
        } else {
            ""
        };
        let suggestion = did_you_mean(name, candidates);
        match &mut self.unknown_names {
            Some(warnings) => {
                warnings.push(format!(
                    "unknown field `{name}` reads as NULL on every event, as EMQX reads an unknown name as \
                     `undefined`{suggestion}{hint}"
                ));
                Ok(Expr::Undefined)
            }
            None => Err(SqlError::new(format!("unknown field `{name}`{suggestion}{hint}"), ident.span)),
        }
    }

    /// `root.a.b` and `root[1].c`: a payload path, or a path into an alias or a value.
    fn path(&mut self, root: Expr, segs: Vec<PathSeg>) -> Expr {
        if segs.is_empty() {
            return root;
        }
        match root {
            Expr::Payload { mut path, slot } => {
                path.extend(segs);
                Expr::Payload { path, slot }
            }
            Expr::Get(inner, mut path) => {
                path.extend(segs);
                Expr::Get(inner, path)
            }
            other => Expr::Get(Box::new(other), segs),
        }
    }

    /// Compiles one expression. This is the recursion every nested operator goes through, so
    /// its frame is kept small: the work is in [`Compiler::expr_node`] and
    /// [`Compiler::binary`], which are not inlined. As one function, its debug-build frame
    /// was 17 KiB, and a rule near the operator limit inside nested calls overflowed a 2 MiB
    /// thread stack (a test thread's, or a blocking-pool thread's).
    fn expr(&mut self, expr: &ast::Expr) -> Compiled {
        match expr {
            ast::Expr::BinaryOp { left, op, right } => self.binary(expr, left, op, right),
            ast::Expr::Nested(inner) => self.expr(inner),
            ast::Expr::Function(function) => self.function(function),
            _ => self.expr_node(expr),
        }
    }

    #[inline(never)]
    fn expr_node(&mut self, expr: &ast::Expr) -> Compiled {
        use ast::Expr as E;
        match expr {
            E::Identifier(ident) => self.name(ident),
            E::CompoundIdentifier(idents) => {
                let Some((root, rest)) = idents.split_first() else {
                    return Err(SqlError::new("empty name", expr.span()));
                };
                // A path `AS` target (`AS meta.info`) read back whole.
                let joined = idents.iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
                if let Some(expr) = self.aliases.get(&joined) {
                    return Ok(expr.clone());
                }
                let root_expr = self.name(root)?;
                if matches!(root_expr, Expr::Field(field) if !field.has_fields()) {
                    return Err(SqlError::new(format!("`{}` has no fields", root.value), expr.span()));
                }
                let segs = rest.iter().map(|i| PathSeg::Key(i.value.clone())).collect();
                Ok(self.path(root_expr, segs))
            }
            E::CompoundFieldAccess { root, access_chain } => {
                let root_expr = self.expr(root)?;
                let mut segs = Vec::new();
                for access in access_chain {
                    match access {
                        ast::AccessExpr::Dot(E::Identifier(ident)) => {
                            segs.push(PathSeg::Key(ident.value.clone()))
                        }
                        ast::AccessExpr::Subscript(ast::Subscript::Index { index }) => {
                            segs.push(PathSeg::Index(index_literal(index)?));
                        }
                        // `x[a..b]` (the token pass made it `x[a:b]`): EMQX's range_get.
                        ast::AccessExpr::Subscript(ast::Subscript::Slice {
                            lower_bound: Some(begin),
                            upper_bound: Some(end),
                            stride: None,
                        }) if std::ptr::eq(access, access_chain.last().unwrap_or(access)) => {
                            let (begin, end) = (index_literal(begin)?, index_literal(end)?);
                            return Ok(Expr::Slice(Box::new(self.path(root_expr, segs)), begin, end));
                        }
                        other => {
                            return Err(SqlError::new(
                                "expected `.name`, `[index]` or, last, a range `[a..b]`",
                                other.span(),
                            ));
                        }
                    }
                }
                Ok(self.path(root_expr, segs))
            }
            E::Value(value) => literal(&value.value, value.span),
            E::Nested(inner) => self.expr(inner),
            E::UnaryOp { op, expr: inner } => match op {
                UnaryOperator::Not => Ok(Expr::Not(Box::new(self.expr(inner)?))),
                UnaryOperator::Plus => self.expr(inner),
                UnaryOperator::Minus => match self.expr(inner)? {
                    Expr::Const(Value::Int(i)) => {
                        Ok(Expr::Const(i.checked_neg().map(Value::Int).unwrap_or(Value::Float(-(i as f64)))))
                    }
                    Expr::Const(Value::Float(f)) => Ok(Expr::Const(Value::Float(-f))),
                    other => Ok(Expr::Neg(Box::new(other))),
                },
                other => Err(SqlError::new(format!("operator `{other}` is not supported"), expr.span())),
            },
            E::BinaryOp { left, op, right } => self.binary(expr, left, op, right),
            E::IsNull(inner) => Ok(Expr::IsNull(Box::new(self.expr(inner)?), false)),
            E::IsNotNull(inner) => Ok(Expr::IsNull(Box::new(self.expr(inner)?), true)),
            E::In { expr: inner, target: ast::InTarget::List(list), negated, global: false } => {
                let inner = Box::new(self.expr(inner)?);
                let list = list.iter().map(|e| self.expr(e)).collect::<Result<_, _>>()?;
                Ok(Expr::In { expr: inner, list, negated: *negated })
            }
            E::Between { expr: inner, negated, low, high } => {
                let inner = self.expr(inner)?;
                let low = Expr::Compare(CmpOp::GtEq, Box::new(inner.clone()), Box::new(self.expr(low)?));
                let high = Expr::Compare(CmpOp::LtEq, Box::new(inner), Box::new(self.expr(high)?));
                let between = Expr::And(Box::new(low), Box::new(high));
                Ok(if *negated { Expr::Not(Box::new(between)) } else { between })
            }
            E::Like { negated, any: false, expr: inner, pattern, escape_char: None } => {
                self.like(inner, pattern, *negated, false)
            }
            E::ILike { negated, any: false, expr: inner, pattern, escape_char: None } => {
                self.like(inner, pattern, *negated, true)
            }
            E::Case { operand, conditions, else_result, .. } => {
                let operand = operand.as_ref().map(|o| self.expr(o).map(Box::new)).transpose()?;
                let mut branches = Vec::with_capacity(conditions.len());
                for when in conditions {
                    branches.push((self.expr(&when.condition)?, self.expr(&when.result)?));
                }
                let otherwise = else_result.as_ref().map(|e| self.expr(e).map(Box::new)).transpose()?;
                Ok(Expr::Case { operand, branches, otherwise })
            }
            E::Function(function) => self.function(function),
            E::Array(array) => {
                Ok(Expr::Array(array.elem.iter().map(|e| self.expr(e)).collect::<Result<_, _>>()?))
            }
            // sqlparser gives these SQL-standard functions their own syntax nodes.
            E::Ceil {
                expr: inner,
                field: ast::CeilFloorKind::DateTimeField(ast::DateTimeField::NoDateTime),
            } => Ok(builtin_call("ceil", vec![self.expr(inner)?])),
            E::Floor {
                expr: inner,
                field: ast::CeilFloorKind::DateTimeField(ast::DateTimeField::NoDateTime),
            } => Ok(builtin_call("floor", vec![self.expr(inner)?])),
            E::Trim { trim_where: None, trim_what: None, expr: inner, trim_characters: None } => {
                Ok(builtin_call("trim", vec![self.expr(inner)?]))
            }
            E::Substring { expr: inner, substring_from: Some(from), substring_for, .. } => {
                let mut args = vec![self.expr(inner)?, self.expr(from)?];
                if let Some(length) = substring_for {
                    args.push(self.expr(length)?);
                }
                Ok(builtin_call("substr", args))
            }
            other => Err(SqlError::new(
                format!("this kind of expression is not supported: `{other}`"),
                other.span(),
            )),
        }
    }

    #[inline(never)]
    fn binary(
        &mut self,
        expr: &ast::Expr,
        left: &ast::Expr,
        op: &BinaryOperator,
        right: &ast::Expr,
    ) -> Compiled {
        let (l, r) = (self.expr(left)?, self.expr(right)?);
        let (l, r) = (Box::new(l), Box::new(r));
        Ok(match op {
            BinaryOperator::Plus => Expr::Arith(ArithOp::Add, l, r),
            BinaryOperator::Minus => Expr::Arith(ArithOp::Sub, l, r),
            BinaryOperator::Multiply => Expr::Arith(ArithOp::Mul, l, r),
            BinaryOperator::Divide => Expr::Arith(ArithOp::Div, l, r),
            BinaryOperator::Modulo => Expr::Arith(ArithOp::Rem, l, r),
            // `div` (the token pass turns EMQX's infix `div` into `//`).
            BinaryOperator::DuckIntegerDivide | BinaryOperator::MyIntegerDivide => {
                builtin_call("div", vec![*l, *r])
            }
            // `=~` (the token pass turns it into `~`): topic name matches filter.
            BinaryOperator::PGRegexMatch => builtin_call("topic_match", vec![*l, *r]),
            BinaryOperator::Eq => Expr::Compare(CmpOp::Eq, l, r),
            BinaryOperator::NotEq => Expr::Compare(CmpOp::NotEq, l, r),
            BinaryOperator::Lt => Expr::Compare(CmpOp::Lt, l, r),
            BinaryOperator::LtEq => Expr::Compare(CmpOp::LtEq, l, r),
            BinaryOperator::Gt => Expr::Compare(CmpOp::Gt, l, r),
            BinaryOperator::GtEq => Expr::Compare(CmpOp::GtEq, l, r),
            BinaryOperator::And => Expr::And(l, r),
            BinaryOperator::Or => Expr::Or(l, r),
            BinaryOperator::StringConcat => builtin_call("concat", vec![*l, *r]),
            other => {
                return Err(SqlError::new(format!("operator `{other}` is not supported"), expr.span()));
            }
        })
    }

    fn like(
        &mut self,
        subject: &ast::Expr,
        pattern: &ast::Expr,
        negated: bool,
        case_insensitive: bool,
    ) -> Compiled {
        let Some(text) = string_literal(pattern) else {
            return Err(SqlError::new("the LIKE pattern must be a string literal", pattern.span()));
        };
        let mut regex = String::from(if case_insensitive { "(?is)^" } else { "(?s)^" });
        for c in text.chars() {
            match c {
                '%' => regex.push_str(".*"),
                '_' => regex.push('.'),
                c => regex.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
            }
        }
        regex.push('$');
        let regex = regex::Regex::new(&regex).map_err(|e| SqlError::new(e.to_string(), pattern.span()))?;
        Ok(Expr::Matches { expr: Box::new(self.expr(subject)?), regex, negated })
    }

    fn function(&mut self, function: &ast::Function) -> Compiled {
        let span = function.name.span();
        let idents: Vec<&Ident> = function.name.0.iter().filter_map(|p| p.as_ident()).collect();
        let [ident] = idents.as_slice() else {
            return Err(SqlError::new("qualified function names are not supported", span));
        };
        let name = ident.value.to_ascii_lowercase();
        if function.filter.is_some() || function.over.is_some() || !function.within_group.is_empty() {
            return Err(SqlError::new("FILTER, OVER and WITHIN GROUP are not supported", function.span()));
        }
        let arg_exprs: Vec<&ast::Expr> = match &function.args {
            FunctionArguments::None => Vec::new(),
            FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return Err(SqlError::new(
                        "DISTINCT/ORDER BY in arguments is not supported",
                        function.span(),
                    ));
                }
                let mut exprs = Vec::with_capacity(list.args.len());
                for arg in &list.args {
                    match arg {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => exprs.push(e),
                        other => return Err(SqlError::new("expected a plain argument", other.span())),
                    }
                }
                exprs
            }
            FunctionArguments::Subquery(q) => {
                return Err(SqlError::new("subqueries are not supported", q.span()));
            }
        };
        match (name.as_str(), arg_exprs.as_slice()) {
            ("topic", _) => return self.topic_level(&arg_exprs, function.span()),
            ("lookup", _) => return self.lookup(&arg_exprs, function.span()),
            // EMQX's function forms of the metadata fields.
            ("qos", []) => return Ok(Expr::Field(Field::Qos)),
            ("clientid", []) => return Ok(Expr::Field(Field::ClientId)),
            ("username", []) => return Ok(Expr::Field(Field::Username)),
            ("msgid", []) => return Ok(Expr::Field(Field::EventId)),
            ("peerhost" | "clientip", []) => return Ok(Expr::Field(Field::PeerHost)),
            ("flags", []) => return Ok(Expr::Field(Field::Flags)),
            ("flag", [flag]) => return flag_of(flag),
            ("payload", []) => return Ok(self.payload(Vec::new())),
            // `payload('a.b')`: the dotted path into the payload.
            ("payload", [path]) => {
                let Some(path) = string_literal(path) else {
                    return Err(SqlError::new(
                        "payload(path) takes a string literal path, e.g. payload('a.b')",
                        path.span(),
                    ));
                };
                return Ok(self.payload(path.split('.').map(|k| PathSeg::Key(k.to_owned())).collect()));
            }
            _ => {}
        }
        if let Some((_, rewrite)) = NOT_SUPPORTED.iter().find(|(n, _)| *n == name) {
            return Err(SqlError::new(
                format!("EMQX's `{name}` is not available in Outpost: {rewrite}"),
                span,
            ));
        }
        let Some(builtin) = find_builtin(&name) else {
            let candidates = BUILTINS.iter().map(|b| b.name).chain(["topic", "lookup"]);
            return Err(SqlError::new(
                format!("unknown function `{}`{}", ident.value, did_you_mean(&name, candidates)),
                span,
            ));
        };
        let n_args = arg_exprs.len();
        if n_args < builtin.min_args || n_args > builtin.max_args {
            let expected = match (builtin.min_args, builtin.max_args) {
                (min, max) if min == max => format!("{min}"),
                (min, usize::MAX) => format!("at least {min}"),
                (min, max) => format!("{min} to {max}"),
            };
            return Err(SqlError::new(
                format!("`{name}` takes {expected} argument(s), got {n_args}"),
                function.span(),
            ));
        }
        // Literal patterns are compiled once, here; invalid ones are compile errors.
        if let ("regex_match" | "regex_replace", Some(pattern)) =
            (name.as_str(), arg_exprs.get(1).and_then(|p| string_literal(p)))
        {
            let pattern_span = arg_exprs.get(1).map(|p| p.span()).unwrap_or(span);
            let regex = regex::Regex::new(&pattern)
                .map_err(|e| SqlError::new(format!("invalid regular expression: {e}"), pattern_span))?;
            let subject = Box::new(
                self.expr(arg_exprs.first().copied().unwrap_or(&ast::Expr::value(ast::Value::Null)))?,
            );
            if name == "regex_match" {
                return Ok(Expr::Matches { expr: subject, regex, negated: false });
            }
            let replacement =
                arg_exprs.get(2).map(|r| self.expr(r)).transpose()?.unwrap_or(Expr::Const(Value::Null));
            return Ok(Expr::RegexReplace { expr: subject, regex, replacement: Box::new(replacement) });
        }
        let args = arg_exprs.iter().map(|e| self.expr(e)).collect::<Result<Vec<_>, _>>()?;
        Ok(Expr::Call { func: builtin, args })
    }

    /// `topic(N)`: level N (1-based) of the topic; `topic()` is the whole topic.
    fn topic_level(&mut self, args: &[&ast::Expr], span: Span) -> Compiled {
        match args {
            [] => Ok(Expr::Field(Field::Topic)),
            [level] => match index_literal(level) {
                Ok(n) if n >= 1 => Ok(Expr::TopicLevel(usize::try_from(n).unwrap_or(usize::MAX))),
                _ => Err(SqlError::new(
                    "topic(N) takes an integer literal N >= 1: topic(1) is the first level",
                    level.span(),
                )),
            },
            _ => Err(SqlError::new("`topic` takes 0 or 1 argument(s)", span)),
        }
    }

    /// `lookup('table', key[, 'field'])`: the table and field are checked now.
    fn lookup(&mut self, args: &[&ast::Expr], span: Span) -> Compiled {
        let (table_arg, key_arg, field_arg) = match args {
            [t, k] => (*t, *k, None),
            [t, k, f] => (*t, *k, Some(*f)),
            _ => {
                return Err(SqlError::new(
                    "`lookup` takes 2 or 3 arguments: lookup('table', key[, 'field'])",
                    span,
                ));
            }
        };
        let Some(table_name) = string_literal(table_arg) else {
            return Err(SqlError::new(
                "the table name must be a string literal, e.g. lookup('devices', ..)",
                table_arg.span(),
            ));
        };
        let Some(table) = self.tables.get(&table_name).cloned() else {
            let known = if self.tables.is_empty() {
                "; no tables are declared (add a [[table]])".to_owned()
            } else {
                did_you_mean(&table_name, self.tables.keys().map(String::as_str))
            };
            let mut error = SqlError::new(format!("unknown table `{table_name}`{known}"), table_arg.span());
            error.unknown_table = Some(table_name);
            return Err(error);
        };
        let field = match field_arg {
            None => None,
            Some(f) => {
                let Some(field) = string_literal(f) else {
                    return Err(SqlError::new("the field must be a string literal", f.span()));
                };
                if !table.columns().contains(&field) {
                    return Err(SqlError::new(
                        format!(
                            "table `{table_name}` has no column `{field}`{}",
                            did_you_mean(&field, table.columns().iter().map(String::as_str))
                        ),
                        f.span(),
                    ));
                }
                Some(field)
            }
        };
        let key = Box::new(self.expr(key_arg)?);
        Ok(Expr::Lookup { table, key, field })
    }
}

pub(crate) fn builtin_call(name: &str, args: Vec<Expr>) -> Expr {
    match find_builtin(name) {
        Some(func) => Expr::Call { func, args },
        None => Expr::Const(Value::Null),
    }
}

fn literal(value: &ast::Value, span: Span) -> Compiled {
    match value {
        ast::Value::Number(text, _) => match text.parse::<i64>() {
            Ok(i) => Ok(Expr::Const(Value::Int(i))),
            Err(_) => match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Expr::Const(Value::Float(f))),
                _ => Err(SqlError::new(format!("number `{text}` is out of range"), span)),
            },
        },
        ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => {
            Ok(Expr::Const(Value::Str(s.clone())))
        }
        ast::Value::Boolean(b) => Ok(Expr::Const(Value::Bool(*b))),
        ast::Value::Null => Ok(Expr::Const(Value::Null)),
        other => Err(SqlError::new(format!("unsupported literal `{other}`"), span)),
    }
}

fn string_literal(expr: &ast::Expr) -> Option<String> {
    match expr {
        ast::Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        ast::Expr::Identifier(ident) if ident.quote_style == Some('"') => Some(ident.value.clone()),
        _ => None,
    }
}

/// An integer literal (possibly negative) used as an index; 0 is refused with a hint.
fn index_literal(expr: &ast::Expr) -> Result<i64, SqlError> {
    let value = match expr {
        ast::Expr::Value(v) => match &v.value {
            ast::Value::Number(text, _) => text.parse::<i64>().ok(),
            _ => None,
        },
        ast::Expr::UnaryOp { op: UnaryOperator::Minus, expr: inner } => match &**inner {
            ast::Expr::Value(v) => match &v.value {
                ast::Value::Number(text, _) => text.parse::<i64>().ok().and_then(i64::checked_neg),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    };
    match value {
        Some(0) => Err(SqlError::new(
            "indexes start at 1, as in EMQX: [1] is the first element, [-1] the last",
            expr.span(),
        )),
        Some(i) => Ok(i),
        None => Err(SqlError::new("an index must be an integer literal", expr.span())),
    }
}

/// The quote style the token pass gives an `AS` target that is a path (`AS meta.info`,
/// `AS payload.data[1].name`): no SQL text can produce it, so the compiler knows the alias
/// names a path and not one column.
pub(crate) const ALIAS_PATH_QUOTE: char = '`';

/// Tokenizes rule text and rewrites EMQX's syntax that sqlparser does not know into what it
/// does (EMQX's grammar is `rulesql.yrl` and `sql_lex.xrl` in emqx/rulesql):
/// - `=~` (topic match) becomes `~`, which the compiler reads as topic match;
/// - infix `div` becomes `//` and infix `mod` becomes `%` (followed by `(` they stay calls);
/// - a single-quoted topic filter in FROM becomes a double-quoted one;
/// - an `AS` target that is a path becomes one identifier quoted with [`ALIAS_PATH_QUOTE`].
///
/// - a range `x[a..b]` becomes the slice `x[a:b]`; a range standing alone, `[1..4]`,
///   becomes the array literal `[1, 2, 3, 4]`.
///
/// A `FOREACH` statement goes on to [`crate::foreach`].
fn emqx_tokens(text: &str) -> Result<Vec<TokenWithSpan>, Vec<SqlError>> {
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| vec![parser_error(&e.to_string(), text)])?;
    let significant = |t: &TokenWithSpan| !matches!(t.token, Token::Whitespace(_));
    let mut out: Vec<TokenWithSpan> = Vec::with_capacity(tokens.len());
    let mut in_from = false;
    let mut i = 0;
    while let Some(current) = tokens.get(i) {
        let next = tokens.get(i + 1..).and_then(|rest| rest.iter().find(|t| significant(t)));
        let word = match &current.token {
            Token::Word(w) if w.quote_style.is_none() => Some(w),
            _ => None,
        };
        let keyword = word.map(|w| w.keyword);
        match (&current.token, next.map(|n| &n.token)) {
            (Token::Eq, _) if matches!(tokens.get(i + 1).map(|t| &t.token), Some(Token::Tilde)) => {
                out.push(TokenWithSpan { token: Token::Tilde, span: current.span });
                i += 2;
                continue;
            }
            (Token::LBracket, _) => {
                if let Some((begin, end, close)) = range_at(&tokens, i) {
                    // After a name, `)` or `]` it slices; anywhere else it is a literal.
                    let subscript = match out.iter().rev().find(|t| significant(t)).map(|t| &t.token) {
                        Some(Token::Word(w)) => {
                            w.quote_style.is_some()
                                || !(EXPRESSION_KEYWORDS.contains(&w.keyword)
                                    || ["do", "incase", "foreach"]
                                        .iter()
                                        .any(|k| w.value.eq_ignore_ascii_case(k)))
                        }
                        Some(Token::RBracket | Token::RParen) => true,
                        _ => false,
                    };
                    range_tokens(begin, end, subscript, current.span, &mut out)?;
                    i = close + 1;
                    continue;
                }
            }
            _ => {}
        }
        match keyword {
            Some(Keyword::DIV) if !matches!(next.map(|n| &n.token), Some(Token::LParen)) => {
                out.push(TokenWithSpan { token: Token::DuckIntDiv, span: current.span });
            }
            Some(Keyword::MOD) if !matches!(next.map(|n| &n.token), Some(Token::LParen)) => {
                out.push(TokenWithSpan { token: Token::Mod, span: current.span });
            }
            Some(Keyword::FROM) => {
                in_from = true;
                out.push(current.clone());
            }
            Some(Keyword::WHERE) => {
                in_from = false;
                out.push(current.clone());
            }
            Some(Keyword::AS) => {
                out.push(current.clone());
                if let Some((path, end)) = alias_path(&tokens, i + 1) {
                    let first = tokens.get(i + 1..end).and_then(|t| t.iter().find(|t| significant(t)));
                    let span = first.map(|t| t.span).unwrap_or(current.span);
                    let word = Word {
                        value: path,
                        quote_style: Some(ALIAS_PATH_QUOTE),
                        keyword: Keyword::NoKeyword,
                    };
                    out.push(TokenWithSpan { token: Token::Word(word), span });
                    i = end;
                    continue;
                }
            }
            _ => match &current.token {
                Token::SingleQuotedString(filter) if in_from => {
                    let word =
                        Word { value: filter.clone(), quote_style: Some('"'), keyword: Keyword::NoKeyword };
                    out.push(TokenWithSpan { token: Token::Word(word), span: current.span });
                }
                _ => out.push(current.clone()),
            },
        }
        i += 1;
    }
    Ok(out)
}

/// Keywords after which an expression starts: a `[` there opens a literal, not a subscript.
const EXPRESSION_KEYWORDS: &[Keyword] = &[
    Keyword::SELECT,
    Keyword::WHERE,
    Keyword::AND,
    Keyword::OR,
    Keyword::NOT,
    Keyword::IN,
    Keyword::CASE,
    Keyword::WHEN,
    Keyword::THEN,
    Keyword::ELSE,
    Keyword::BETWEEN,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::IS,
];

/// The most elements a range literal `[a..b]` may have.
const MAX_RANGE: i64 = 10_000;

/// A range `[a..b]` whose `[` is token `open`: its bounds and the index of its `]`. The
/// tokenizer reads `1..4` as the numbers `1.` and `.4`, so the bracket's text is matched.
fn range_at(tokens: &[TokenWithSpan], open: usize) -> Option<(i64, i64, usize)> {
    let mut text = String::new();
    for (at, token) in tokens.iter().enumerate().skip(open + 1) {
        match &token.token {
            Token::RBracket => {
                let (begin, end) = text.split_once("..")?;
                let bound = |t: &str| {
                    let digits = t.strip_prefix('-').unwrap_or(t);
                    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| t.parse().ok())?
                };
                return Some((bound(begin)?, bound(end)?, at));
            }
            Token::Whitespace(_) => {}
            Token::Number(n, _) => text.push_str(n),
            Token::Minus => text.push('-'),
            Token::Period => text.push('.'),
            _ => return None,
        }
    }
    None
}

/// The tokens a range becomes (see [`emqx_tokens`]). EMQX fails a range literal whose end is
/// below its start less one (`lists:seq`), and a slice bound of 0, at run time; here they are
/// compile errors.
fn range_tokens(
    begin: i64,
    end: i64,
    subscript: bool,
    span: Span,
    out: &mut Vec<TokenWithSpan>,
) -> Result<(), Vec<SqlError>> {
    let number = |n: i64, out: &mut Vec<TokenWithSpan>| {
        if n < 0 {
            out.push(TokenWithSpan { token: Token::Minus, span });
        }
        out.push(TokenWithSpan { token: Token::Number(n.unsigned_abs().to_string(), false), span });
    };
    out.push(TokenWithSpan { token: Token::LBracket, span });
    if subscript {
        if begin == 0 || end == 0 {
            return Err(vec![SqlError::new(
                "range bounds start at 1, as in EMQX: [1..2] is the first two elements, [-2..-1] the last two",
                span,
            )]);
        }
        number(begin, out);
        out.push(TokenWithSpan { token: Token::Colon, span });
        number(end, out);
    } else {
        let len = end.saturating_sub(begin).saturating_add(1);
        if len < 0 {
            return Err(vec![SqlError::new(
                format!("the range [{begin}..{end}] ends before it starts"),
                span,
            )]);
        }
        if len > MAX_RANGE {
            return Err(vec![SqlError::new(
                format!("the range [{begin}..{end}] has {len} elements; at most {MAX_RANGE} are allowed"),
                span,
            )]);
        }
        for (k, n) in (begin..=end).enumerate() {
            if k > 0 {
                out.push(TokenWithSpan { token: Token::Comma, span });
            }
            number(n, out);
        }
    }
    out.push(TokenWithSpan { token: Token::RBracket, span });
    Ok(())
}

/// An `AS` target that is a path, starting at token `start` (after `AS`): a name followed by
/// at least one `.name` or `[index]`. Returns the path's text (`a.b[1]`, `c[-1]`) and the
/// index of the first token after it; `None` for a plain name.
fn alias_path(tokens: &[TokenWithSpan], start: usize) -> Option<(String, usize)> {
    let mut i = start;
    while matches!(tokens.get(i).map(|t| &t.token), Some(Token::Whitespace(_))) {
        i += 1;
    }
    let Some(Token::Word(first)) = tokens.get(i).map(|t| &t.token) else { return None };
    let mut path = first.value.clone();
    i += 1;
    let mut steps = 0;
    loop {
        match tokens.get(i..).unwrap_or(&[]) {
            [t1, t2, ..] if t1.token == Token::Period => match &t2.token {
                Token::Word(w) => {
                    path.push('.');
                    path.push_str(&w.value);
                    i += 2;
                }
                _ => return None,
            },
            [t1, t2, t3, ..] if t1.token == Token::LBracket && t3.token == Token::RBracket => match &t2.token
            {
                Token::Number(n, _) => {
                    path.push_str(&format!("[{n}]"));
                    i += 3;
                }
                _ => return None,
            },
            [t1, t2, t3, t4, ..]
                if t1.token == Token::LBracket && t2.token == Token::Minus && t4.token == Token::RBracket =>
            {
                match &t3.token {
                    Token::Number(n, _) => {
                        path.push_str(&format!("[-{n}]"));
                        i += 4;
                    }
                    _ => return None,
                }
            }
            // `AS a.1` tokenizes the `.1` as a number.
            [t1, ..] if matches!(&t1.token, Token::Number(n, _) if n.starts_with('.')) => {
                let Token::Number(n, _) = &t1.token else { return None };
                path.push_str(n);
                i += 1;
            }
            _ => break,
        }
        steps += 1;
    }
    (steps > 0).then_some((path, i))
}

/// Reads an `AS` path target (see [`emqx_tokens`]) into its steps.
pub(crate) fn parse_alias_path(text: &str, span: Span) -> Result<Vec<PathSeg>, SqlError> {
    let mut segs = Vec::new();
    for part in text.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (part.get(..at).unwrap_or(""), part.get(at..).unwrap_or("")),
            None => (part, ""),
        };
        if !key.is_empty() {
            segs.push(PathSeg::Key(key.to_owned()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(close) = inner.find(']') else { break };
            let digits = inner.get(..close).unwrap_or("");
            let index: i64 = digits
                .parse()
                .map_err(|_| SqlError::new(format!("`{text}`: an index must be an integer"), span))?;
            // As a target, EMQX reads `[0]` as "insert at the head" and `[-0]` as "append".
            segs.push(PathSeg::Index(match (index, digits.starts_with('-')) {
                (0, false) => PUT_HEAD,
                (0, true) => PUT_TAIL,
                (i, _) => i,
            }));
            rest = inner.get(close + 1..).unwrap_or("");
        }
    }
    Ok(segs)
}
