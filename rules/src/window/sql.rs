//! A windowed rule's SQL: `GROUP BY` with one window function and group keys, the window's
//! `FILTER (WHERE ..)`, aggregates, `HAVING`, `window_start()` and `window_end()`.
//!
//! The statement is rewritten before it is compiled: every aggregate call in SELECT and
//! HAVING becomes a name (`__agg_0` ...), as do `window_start()`, `window_end()` and every
//! expression equal to a group key (`__key_0` ...). Those names read a synthetic row built
//! when a window closes, so SELECT, HAVING and the actions compile and run through the
//! ordinary compiler and engine. What runs per event — WHERE, the window's FILTER, the group
//! keys and the aggregates' arguments — is compiled separately ([`WindowSql`]).
//!
//! **Invariant:** outside aggregates, a windowed rule's SELECT and HAVING read nothing of an
//! event (no field, no payload path, no `topic(n)` that is not a group key): a closed window
//! is many events, so any one event's value there would be arbitrary. The compiler refuses
//! such a rule and says to group by the expression or aggregate it.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, Spanned, VisitMut, VisitorMut,
};

use super::spec::{WINDOW_NAMES, WindowSpec};
use super::{
    AggKind, DEFAULT_COLLECT_CAP, DEFAULT_MAX_GROUPS, LatePolicy, MAX_COLLECT_CAP, MAX_OVERLAP, MIN_IDLE_MS,
    TimeBasis, WindowPlan,
};
use crate::compile::Compiler;
use crate::error::{SqlError, did_you_mean};
use crate::expr::{Expr, PathSeg};

pub(crate) const AGG_PREFIX: &str = "__agg_";
pub(crate) const KEY_PREFIX: &str = "__key_";
pub(crate) const WINDOW_START: &str = "__window_start";
pub(crate) const WINDOW_END: &str = "__window_end";

/// What the rewrite took out of the statement, still as SQL.
#[derive(Debug)]
pub(crate) struct WindowAst {
    pub spec: WindowSpec,
    pub filter: Option<ast::Expr>,
    pub keys: Vec<ast::Expr>,
    /// Per aggregate: its kind and argument (`None` for `count(*)`).
    pub aggs: Vec<(AggKind, Option<ast::Expr>)>,
}

/// The per-event part of a windowed rule, compiled.
#[derive(Debug)]
pub(crate) struct WindowSql {
    pub plan: WindowPlan,
    /// WHERE: before anything else (the rule's `condition` is its HAVING).
    pub where_: Option<Expr>,
    /// FILTER (WHERE ..): an event it rejects does not enter the window.
    pub filter: Option<Expr>,
    pub keys: Vec<Expr>,
    pub args: Vec<Option<Expr>>,
    /// Whether the per-event part reads the payload (the rule's `uses_payload` is set for
    /// the synthetic row read when a window closes).
    pub reads_payload: bool,
    /// Event time: the payload path holding each event's time (`plan.time` says the rest).
    pub event_time: Option<Expr>,
    /// What becomes of an event too late (or too far ahead) for its windows.
    pub late: LatePolicy,
}

impl WindowSql {
    pub(crate) fn exprs_mut(&mut self) -> impl Iterator<Item = &mut Expr> {
        self.where_
            .iter_mut()
            .chain(self.filter.iter_mut())
            .chain(self.keys.iter_mut())
            .chain(self.args.iter_mut().flatten())
            .chain(self.event_time.iter_mut())
    }
}

/// The rule options of event time, as written in the rules file.
pub(crate) struct TimeOptions<'a> {
    pub event_time: Option<&'a str>,
    pub late_tolerance: Option<&'a str>,
    pub idle_timeout: Option<&'a str>,
    pub late: Option<LatePolicy>,
}

impl TimeOptions<'_> {
    pub(crate) fn any(&self) -> bool {
        self.event_time.is_some()
            || self.late_tolerance.is_some()
            || self.idle_timeout.is_some()
            || self.late.is_some()
    }
}

/// `'5s'`, `'2m'`, `'1h'`, `'1d'`, `'250ms'`, or `'0s'`, in milliseconds.
fn duration_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

/// `payload.a.b` as a path of keys; `None` for anything else.
fn payload_path(text: &str) -> Option<Vec<PathSeg>> {
    let rest = text.strip_prefix("payload.")?;
    let keys: Vec<&str> = rest.split('.').collect();
    let plain = |k: &&str| !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-');
    keys.iter().all(plain).then(|| keys.iter().map(|k| PathSeg::Key((*k).to_owned())).collect())
}

/// Sets a windowed rule's clock from its options; each problem says the key, the value
/// and what to write instead.
pub(crate) fn apply_time_options(window: &mut WindowSql, options: &TimeOptions<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(field) = options.event_time else {
        for (key, set) in [
            ("late_tolerance", options.late_tolerance.is_some()),
            ("idle_timeout", options.idle_timeout.is_some()),
            ("late", options.late.is_some()),
        ] {
            if set {
                problems.push(format!(
                    "`{key}` applies to event time only: add `event_time = \"payload.ts\"` (the payload field holding each event's time) or remove `{key}`"
                ));
            }
        }
        return problems;
    };
    let size_hop = match window.plan.spec {
        super::WindowSpec::Tumbling { size_ms } => Some((size_ms, size_ms)),
        super::WindowSpec::Hopping { size_ms, hop_ms } => Some((size_ms, hop_ms)),
        _ => None,
    };
    if size_hop.is_none() {
        problems.push(
            "`event_time` works with TUMBLINGWINDOW and HOPPINGWINDOW only (sliding, session and count windows run on processing time): remove `event_time` or use one of those windows"
                .to_owned(),
        );
    }
    let path = payload_path(field);
    if path.is_none() {
        problems.push(format!(
            "`event_time = \"{field}\"` is not a payload field path: write it like \"payload.ts\" or \"payload.meta.time\" (keys joined by dots, no indexes)"
        ));
    }
    let duration = |key: &str, text: Option<&str>, default: u64, problems: &mut Vec<String>| {
        match text {
        None => default,
        Some(text) => duration_ms(text.trim()).unwrap_or_else(|| {
            problems.push(format!(
                "`{key} = \"{text}\"` is not a duration: write a whole number with a unit, like \"5s\", \"2m\", \"1h\" or \"500ms\""
            ));
            default
        }),
    }
    };
    let tolerance_ms = duration("late_tolerance", options.late_tolerance, 0, &mut problems);
    let idle_ms =
        duration("idle_timeout", options.idle_timeout, tolerance_ms.max(MIN_IDLE_MS), &mut problems);
    if idle_ms == 0 {
        problems.push(
            "`idle_timeout = \"0s\"` would run the event clock on the gateway's clock between any two events: give it at least \"1s\" or leave it out"
                .to_owned(),
        );
    }
    if let Some((size_ms, hop_ms)) = size_hop {
        // Every window that may still take an event stays open: those starting in
        // (watermark − size, event clock], an interval of tolerance + size.
        let open = tolerance_ms.saturating_add(size_ms).div_ceil(hop_ms);
        if open > MAX_OVERLAP {
            problems.push(format!(
                "`late_tolerance = \"{}\"` would keep {open} windows open per group, at most {MAX_OVERLAP}: shorten late_tolerance or widen the window",
                options.late_tolerance.unwrap_or_default()
            ));
        }
    }
    if let Some(path) = path {
        window.event_time = Some(Expr::Payload { path, slot: None });
        window.reads_payload = true;
    }
    window.plan.time = TimeBasis::Event { field: field.to_owned(), tolerance_ms, idle_ms };
    window.late = options.late.unwrap_or_default();
    problems
}

fn function_name(function: &ast::Function) -> String {
    function.name.to_string().to_ascii_lowercase()
}

fn list_args(function: &ast::Function) -> Option<&[FunctionArg]> {
    match &function.args {
        FunctionArguments::List(list) if list.duplicate_treatment.is_none() && list.clauses.is_empty() => {
            Some(&list.args)
        }
        FunctionArguments::None => Some(&[]),
        _ => None,
    }
}

fn is_window_call(expr: &ast::Expr) -> bool {
    matches!(expr, ast::Expr::Function(f) if WINDOW_NAMES.contains(&function_name(f).as_str()))
}

/// Takes `GROUP BY` and `HAVING` out of `select` and rewrites its SELECT items and HAVING.
/// `Ok(None)`: no GROUP BY, no HAVING — not a windowed rule, nothing changed.
pub(crate) fn extract(
    select: &mut ast::Select,
) -> Result<Option<(WindowAst, Option<ast::Expr>)>, Vec<SqlError>> {
    let group_by = std::mem::replace(&mut select.group_by, GroupByExpr::Expressions(Vec::new(), Vec::new()));
    let exprs = match group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
        other => {
            return Err(vec![SqlError::new(
                "GROUP BY takes expressions and one window function",
                other.span(),
            )]);
        }
    };
    if exprs.is_empty() {
        if let Some(having) = select.having.take() {
            return Err(vec![SqlError::new(
                "HAVING needs a window: add GROUP BY TUMBLINGWINDOW(ss, 10) or another window",
                having.span(),
            )]);
        }
        return Ok(None);
    }
    let mut errors = Vec::new();
    let (windows, keys): (Vec<ast::Expr>, Vec<ast::Expr>) = exprs.into_iter().partition(is_window_call);
    let mut windows = windows.into_iter();
    let (spec, filter) = match (windows.next(), windows.next()) {
        (Some(ast::Expr::Function(mut function)), None) => {
            let filter = function.filter.take().map(|f| *f);
            match window_spec(&function) {
                Ok(spec) => (Some(spec), filter),
                Err(e) => {
                    errors.push(e);
                    (None, filter)
                }
            }
        }
        (Some(_), Some(second)) => {
            errors.push(SqlError::new("GROUP BY takes one window function", second.span()));
            (None, None)
        }
        _ => {
            let span = keys.first().map(Spanned::span).unwrap_or(select.select_token.0.span);
            errors.push(SqlError::new(
                format!(
                    "GROUP BY needs a window function alongside the group keys, e.g. `GROUP BY {}, TUMBLINGWINDOW(ss, 10)`; one of {}",
                    keys.first().map_or_else(|| "topic".to_owned(), ToString::to_string),
                    "TUMBLINGWINDOW, HOPPINGWINDOW, SLIDINGWINDOW, SESSIONWINDOW, COUNTWINDOW"
                ),
                span,
            ));
            (None, None)
        }
    };
    for key in &keys {
        if contains_aggregate(key) {
            errors.push(SqlError::new("a group key cannot be an aggregate", key.span()));
        }
    }
    let aliases: Vec<String> = select
        .projection
        .iter()
        .filter_map(|item| match item {
            ast::SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
            _ => None,
        })
        .collect();
    let mut rewrite = Rewrite {
        keys: keys.iter().map(ToString::to_string).collect(),
        aliases,
        aggs: Vec::new(),
        agg_texts: Vec::new(),
        errors: Vec::new(),
    };
    for item in &mut select.projection {
        match item {
            ast::SelectItem::Wildcard(w) => rewrite.errors.push(SqlError::new(
                "SELECT * has no meaning for a window (many events): select aggregates and group keys",
                w.wildcard_token.0.span,
            )),
            ast::SelectItem::UnnamedExpr(expr) | ast::SelectItem::ExprWithAlias { expr, .. } => {
                let _ = expr.visit(&mut rewrite);
            }
            _ => {}
        }
    }
    let mut having = select.having.take();
    if let Some(having) = &mut having {
        let _ = having.visit(&mut rewrite);
    }
    errors.append(&mut rewrite.errors);
    if let Some(filter) = &filter {
        if contains_aggregate(filter) {
            errors.push(SqlError::new(
                "FILTER runs before the window: it cannot use aggregates",
                filter.span(),
            ));
        }
    }
    if let Some(condition) = &select.selection {
        if contains_aggregate(condition) {
            errors.push(SqlError::new(
                "WHERE runs on each event before the window: put conditions on aggregates in HAVING",
                condition.span(),
            ));
        }
    }
    match spec {
        Some(spec) if errors.is_empty() => {
            Ok(Some((WindowAst { spec, filter, keys, aggs: rewrite.aggs }, having)))
        }
        _ => Err(errors),
    }
}

fn window_spec(function: &ast::Function) -> Result<WindowSpec, SqlError> {
    let name = function.name.to_string();
    let args: Option<Vec<String>> = list_args(function).and_then(|args| {
        args.iter()
            .map(|arg| match arg {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.to_string()),
                _ => None,
            })
            .collect()
    });
    let Some(args) = args else {
        return Err(SqlError::new(format!("{name}: expected plain arguments"), function.span()));
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    WindowSpec::parse(&name, &args).map_err(|e| SqlError::new(e, function.span()))
}

struct Rewrite {
    /// The group keys as text: a SELECT expression with the same text reads the key.
    keys: Vec<String>,
    aliases: Vec<String>,
    aggs: Vec<(AggKind, Option<ast::Expr>)>,
    /// Each aggregate's text, so the same aggregate written twice is computed once.
    agg_texts: Vec<String>,
    errors: Vec<SqlError>,
}

fn name_expr(name: String) -> ast::Expr {
    ast::Expr::Identifier(Ident::new(name))
}

impl VisitorMut for Rewrite {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &mut ast::Expr) -> ControlFlow<()> {
        let text = expr.to_string();
        if let Some(key) = self.keys.iter().position(|k| *k == text) {
            *expr = name_expr(format!("{KEY_PREFIX}{key}"));
            return ControlFlow::Continue(());
        }
        match expr {
            ast::Expr::Function(function) => {
                let name = function_name(function);
                if name == "window_start" || name == "window_end" {
                    if list_args(function).is_some_and(<[FunctionArg]>::is_empty) {
                        let target = if name == "window_start" { WINDOW_START } else { WINDOW_END };
                        *expr = name_expr(target.to_owned());
                    } else {
                        self.errors
                            .push(SqlError::new(format!("{name}() takes no arguments"), function.span()));
                    }
                } else if AggKind::NAMES.contains(&name.as_str()) {
                    match aggregate(function) {
                        Ok(agg) => {
                            let at = match self.agg_texts.iter().position(|t| *t == text) {
                                Some(at) => at,
                                None => {
                                    self.aggs.push(agg);
                                    self.agg_texts.push(text);
                                    self.aggs.len() - 1
                                }
                            };
                            *expr = name_expr(format!("{AGG_PREFIX}{at}"));
                        }
                        Err(e) => {
                            self.errors.push(e);
                            *expr = ast::Expr::Value(ast::Value::Null.into());
                        }
                    }
                } else if name == "topic" && !list_args(function).is_some_and(<[FunctionArg]>::is_empty) {
                    self.errors.push(reads_event(&text, function.span()));
                } else if name != "topic"
                    && name != "lookup"
                    && crate::functions::find_builtin(&name).is_none()
                {
                    // Most likely a misspelt aggregate: say so before its arguments are
                    // blamed for reading an event.
                    let names = AggKind::NAMES.iter().copied().chain(["window_start", "window_end"]);
                    self.errors.push(SqlError::new(
                        format!("unknown function or aggregate `{name}`{}", did_you_mean(&name, names)),
                        function.span(),
                    ));
                    *expr = ast::Expr::Value(ast::Value::Null.into());
                }
            }
            ast::Expr::Identifier(ident) if !self.allowed(ident) => {
                self.errors.push(reads_event(&text, ident.span));
            }
            ast::Expr::CompoundIdentifier(idents) => {
                if let Some(first) = idents.first() {
                    if !self.allowed(first) {
                        self.errors.push(reads_event(&text, first.span));
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Rewrite {
    fn allowed(&self, ident: &Ident) -> bool {
        ident.quote_style == Some('\'')
            || ident.value.starts_with("__")
            || self.aliases.contains(&ident.value)
    }
}

fn reads_event(text: &str, span: sqlparser::tokenizer::Span) -> SqlError {
    SqlError::new(
        format!(
            "`{text}` reads one event, but a window holds many: put it in GROUP BY or inside an aggregate (e.g. last({text}))"
        ),
        span,
    )
}

fn contains_aggregate(expr: &ast::Expr) -> bool {
    let mut found = false;
    let _ = ast::visit_expressions(expr, |e| {
        if let ast::Expr::Function(f) = e {
            if AggKind::NAMES.contains(&function_name(f).as_str()) {
                found = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    found
}

fn aggregate(function: &ast::Function) -> Result<(AggKind, Option<ast::Expr>), SqlError> {
    let name = function_name(function);
    let span = function.span();
    if function.filter.is_some() || function.over.is_some() || !function.within_group.is_empty() {
        return Err(SqlError::new(
            format!(
                "{name}(): FILTER, OVER and WITHIN GROUP on an aggregate are not supported; filter the window: GROUP BY TUMBLINGWINDOW(ss, 10) FILTER (WHERE ..)"
            ),
            span,
        ));
    }
    let Some(args) = list_args(function) else {
        return Err(SqlError::new(format!("{name}(): expected plain arguments"), span));
    };
    let mut exprs = Vec::new();
    let mut star = false;
    for arg in args {
        match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => exprs.push(e.clone()),
            FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => star = true,
            _ => return Err(SqlError::new(format!("{name}(): expected plain arguments"), span)),
        }
    }
    for e in &exprs {
        if contains_aggregate(e) {
            return Err(SqlError::new("an aggregate cannot hold another aggregate", e.span()));
        }
    }
    let number = |e: &ast::Expr| -> Option<f64> { e.to_string().parse::<f64>().ok() };
    let usage = |u: &str| SqlError::new(format!("expected {u}"), span);
    match (name.as_str(), star, exprs.as_slice()) {
        ("count", true, []) => Ok((AggKind::CountAll, None)),
        ("count", false, [e]) => Ok((AggKind::Count, Some(e.clone()))),
        ("count", _, _) => Err(usage("count(*) or count(expr)")),
        ("percentile", false, [e, p]) => match number(p) {
            Some(p) if (0.0..=1.0).contains(&p) => Ok((AggKind::Percentile(p), Some(e.clone()))),
            _ => Err(SqlError::new(
                format!("percentile(expr, p): p must be a number from 0 to 1, e.g. 0.95, not `{p}`"),
                p.span(),
            )),
        },
        ("percentile", _, _) => Err(usage("percentile(expr, p), e.g. percentile(payload.ms, 0.95)")),
        ("collect", false, [e]) => Ok((AggKind::Collect(DEFAULT_COLLECT_CAP), Some(e.clone()))),
        ("collect", false, [e, cap]) => match cap.to_string().parse::<usize>() {
            Ok(cap) if (1..=MAX_COLLECT_CAP).contains(&cap) => Ok((AggKind::Collect(cap), Some(e.clone()))),
            _ => Err(SqlError::new(
                format!(
                    "collect(expr, cap): cap must be an integer from 1 to {MAX_COLLECT_CAP}, not `{cap}`"
                ),
                cap.span(),
            )),
        },
        ("collect", _, _) => Err(usage("collect(expr) or collect(expr, cap)")),
        (_, false, [e]) => {
            let kind = match name.as_str() {
                "sum" => AggKind::Sum,
                "avg" => AggKind::Avg,
                "min" => AggKind::Min,
                "max" => AggKind::Max,
                "first" => AggKind::First,
                "last" => AggKind::Last,
                "stddev" => AggKind::Stddev,
                other => {
                    return Err(SqlError::new(
                        format!(
                            "unknown aggregate `{other}`{}",
                            did_you_mean(other, AggKind::NAMES.iter().copied())
                        ),
                        span,
                    ));
                }
            };
            Ok((kind, Some(e.clone())))
        }
        _ => Err(usage(&format!("{name}(expr)"))),
    }
}

/// Compiles what runs per event, and makes the synthetic names readable by SELECT, HAVING
/// and the actions (before they are compiled).
pub(crate) fn compile(window: &WindowAst, select: &ast::Select, compiler: &mut Compiler<'_>) -> WindowSql {
    let where_ = select.selection.as_ref().and_then(|e| compiler.expr_or_record(e));
    let filter = window.filter.as_ref().and_then(|e| compiler.expr_or_record(e));
    let keys = window.keys.iter().filter_map(|e| compiler.expr_or_record(e)).collect();
    let args =
        window.aggs.iter().map(|(_, arg)| arg.as_ref().and_then(|e| compiler.expr_or_record(e))).collect();
    let names = (0..window.keys.len())
        .map(|i| format!("{KEY_PREFIX}{i}"))
        .chain((0..window.aggs.len()).map(|i| format!("{AGG_PREFIX}{i}")))
        .chain([WINDOW_START.to_owned(), WINDOW_END.to_owned()]);
    for name in names {
        let read = Expr::Payload { path: vec![PathSeg::Key(name.clone())], slot: None };
        compiler.aliases.insert(name, read);
    }
    WindowSql {
        plan: WindowPlan {
            spec: window.spec,
            aggs: window.aggs.iter().map(|(kind, _)| kind.clone()).collect(),
            max_groups: DEFAULT_MAX_GROUPS,
            time: TimeBasis::Processing,
        },
        where_,
        filter,
        keys,
        args,
        reads_payload: false,
        event_time: None,
        late: LatePolicy::default(),
    }
}
