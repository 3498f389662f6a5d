//! [`RuleSet`]: compiling a rules file and evaluating events against it.
//!
//! Per event: the [`TopicIndex`] picks the rules whose FROM matches; the payload is
//! decoded at most once per format and shared by those rules ([`Decoded`]); each rule
//! filters (WHERE), projects (SELECT) into a [`Row`] and runs its actions. A rule that
//! fails on an event yields an [`Output::DeadLetter`]; it never stops the other rules.
//!
//! The per-event path allocates only what it hands back (output topics and payloads, the
//! output list) plus a few small buffers: the row borrows its names from the plan and its
//! values from the payload, tables and constants wherever it can.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::action::{Action, Body, Row, Template, TemplateError};
use crate::compile::{CompiledSql, STAR_COLUMNS, compile_expr, compile_sql};
use crate::config::{ActionConfig, RulesFile, TableConfig, TableFormat};
use crate::error::{Problem, RulesError, SqlOrigin};
use crate::events::{EventKind, EventKinds};
use crate::expr::{Env, EvalError, Field, NULL, PathSeg, field_value};
use crate::foreach::Foreach;
use crate::index::TopicIndex;
use crate::payload::{Decoded, FieldSlots, PayloadView};
use crate::table::{Table, TableError, TableSources};
use crate::value::Value;
use crate::{EventContext, Output, OutputFormat, PayloadFormat};

/// A compiled, immutable set of rules. Cheap to share behind an `Arc`; swapping in a new
/// one is how the gateway reloads rules.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// Enabled rules, in file order; outputs come out in this order.
    pub(crate) rules: Vec<Rule>,
    pub(crate) index: TopicIndex,
    max_hops: u8,
    /// The top-level payload fields the rules read, by slot, when that is all they read:
    /// JSON decoding then builds only these. `None` if some rule reads the payload whole.
    pub(crate) fields: Option<FieldSlots>,
    /// Per [`EventKind`] (by its index in [`EventKind::ALL`]), the rules reading its topic, in
    /// file order. Events are looked up here, never in `index`. Boxed: most rule sets have
    /// none, and the gateway keeps a `RuleSet` by value in an enum.
    events: Box<EventRules>,
}

#[derive(Debug, Default)]
struct EventRules {
    by_kind: Vec<Vec<usize>>,
    /// The event kinds some rule reads.
    kinds: EventKinds,
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) sql: CompiledSql,
    pub(crate) payload: PayloadFormat,
    actions: Vec<Action>,
    warnings: Vec<crate::Warning>,
}

/// What one rule did with one event, for `outpost rules test`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub rule: Arc<str>,
    pub outcome: Outcome,
    /// The outputs this rule produced (also part of [`RuleSet::evaluate`]'s result).
    pub outputs: Vec<Output>,
}

/// How a matching rule's evaluation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// WHERE was FALSE or NULL: no outputs.
    Filtered,
    /// WHERE held; `row` is the SELECT output the actions saw. For a `FOREACH` rule, an
    /// array of the rows, one per element kept (no element kept is `Filtered`).
    Selected { row: Value },
    /// Decoding or evaluation failed; a dead letter was produced.
    Failed { reason: String },
}

impl RuleSet {
    /// Compiles a rules file. `tables` supplies the text of every `[[table]] file = ".."`
    /// (see [`RuleSet::table_files`]) and any tables built by the caller. All problems are
    /// reported at once, each naming its rule or table, SQL problems with a caret.
    pub fn compile(rules_toml: &str, tables: &TableSources) -> Result<RuleSet, RulesError> {
        let file: RulesFile = toml::from_str(rules_toml)?;
        let mut problems = Vec::new();
        let mut broken_tables = FxHashSet::default();
        let tables = build_tables(&file.table, tables, &mut problems, &mut broken_tables);

        let mut rules = Vec::new();
        let mut names_seen: HashMap<&str, usize> = HashMap::new();
        for config in &file.rule {
            let context = format!("rule `{}`", config.name);
            if config.name.trim().is_empty() {
                problems.push(plain(&context, "`name` must not be empty"));
            }
            if names_seen.insert(&config.name, 0).is_some() {
                problems.push(plain(&context, "another rule has the same name; names must be unique"));
            }
            let mut sql = match compile_sql(config.sql.get_ref(), &tables) {
                Ok(sql) => sql,
                Err(errors) => {
                    let origin = SqlOrigin::locate(rules_toml, config.sql.span());
                    // A table that failed to load is reported once, not again by every lookup.
                    let errors = errors
                        .into_iter()
                        .filter(|e| !e.unknown_table.as_ref().is_some_and(|t| broken_tables.contains(t)));
                    problems.extend(errors.map(|e| e.into_problem(&context, config.sql.get_ref(), origin)));
                    continue;
                }
            };
            let mut templates_read_payload = false;
            let mut actions = build_actions(
                &config.action,
                rules_toml,
                &sql,
                &tables,
                &context,
                &mut templates_read_payload,
                &mut problems,
            );
            sql.uses_payload |= templates_read_payload;
            let name: Arc<str> = Arc::from(config.name.as_str());
            check_events(config, &sql, &context, &mut problems);
            let metadata = Value::Object(vec![("rule_id".to_owned(), Value::Str(config.name.clone()))]);
            let templates = actions.iter_mut().flat_map(Action::templates_mut).flat_map(Template::exprs_mut);
            for expr in sql.exprs_mut().chain(templates) {
                expr.resolve_metadata(&metadata);
            }
            let warnings = crate::warnings::check(&name, &sql);
            check_windowed(config, &mut sql, &context, &mut problems);
            // Only the actions' expressions needed them.
            sql.aliases = HashMap::new();
            if config.enabled {
                rules.push(Rule { name, sql, payload: config.payload, actions, warnings });
            }
        }
        if !problems.is_empty() {
            return Err(RulesError::Invalid(problems));
        }
        let mut index = TopicIndex::default();
        for (rule_idx, rule) in rules.iter().enumerate() {
            for filter in &rule.sql.filters {
                index.insert(filter, rule_idx);
            }
        }
        let mut event_rules = vec![Vec::new(); EventKind::ALL.len()];
        let mut event_kinds = EventKinds::NONE;
        for (rule_idx, rule) in rules.iter().enumerate() {
            for (kind, rules) in EventKind::ALL.into_iter().zip(event_rules.iter_mut()) {
                // A stateful rule never runs on `evaluate`: windows need the state `evaluate_windowed` carries.
                if rule.sql.events.contains(kind) && !rule.sql.is_stateful() {
                    rules.push(rule_idx);
                    event_kinds.insert(kind);
                }
            }
        }
        let fields = number_payload_fields(&mut rules);
        let events = Box::new(EventRules { by_kind: event_rules, kinds: event_kinds });
        Ok(RuleSet { rules, index, max_hops: file.max_hops, fields, events })
    }

    /// The files named by `[[table]] file = ".."` in a rules file: the caller reads them
    /// and passes their text to [`RuleSet::compile`] through [`TableSources::with_text`].
    pub fn table_files(rules_toml: &str) -> Result<Vec<String>, RulesError> {
        let file: RulesFile = toml::from_str(rules_toml)?;
        Ok(file.table.into_iter().filter_map(|t| t.file).collect())
    }

    /// A rule set with no rules: every event produces no outputs.
    pub fn empty() -> RuleSet {
        RuleSet::default()
    }

    /// The number of enabled rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The names of the enabled rules, in file order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    /// Warnings about rules that load but may not do what was meant: comparisons that never
    /// hold, and each deliberate difference from EMQX a rule relies on, with its rewrite.
    /// Enabled rules only (a disabled rule never runs), in file order.
    pub fn warnings(&self) -> impl Iterator<Item = &crate::Warning> {
        self.rules.iter().flat_map(|r| &r.warnings)
    }

    /// The client events (`$events/...`) some rule reads: the gateway's broker reports only
    /// these, so a rule set without them costs the broker nothing.
    pub fn event_kinds(&self) -> EventKinds {
        self.events.kinds
    }

    /// The rules an event goes to: by its topic for a message, by its kind for a client
    /// event. Ascending, without duplicates.
    #[inline]
    fn candidates(&self, event: &EventContext<'_>, out: &mut Vec<usize>) {
        match event.lifecycle {
            None => self.index.matches(event.topic, out),
            Some(lifecycle) => self.event_candidates(lifecycle.kind, out),
        }
    }

    /// Out of line: client events are rare next to publishes, whose path stays as it was.
    #[cold]
    #[inline(never)]
    fn event_candidates(&self, kind: EventKind, out: &mut Vec<usize>) {
        out.clear();
        let at = EventKind::ALL.iter().position(|k| *k == kind);
        if let Some(rules) = at.and_then(|at| self.events.by_kind.get(at)) {
            out.extend_from_slice(rules);
        }
    }

    /// The republish hop limit (`max_hops` in the rules file).
    pub fn max_hops(&self) -> u8 {
        self.max_hops
    }

    /// Runs every rule whose FROM matches the event's topic, in file order, and returns
    /// their outputs. Never fails: problems become [`Output::DeadLetter`]s.
    pub fn evaluate(&self, event: &EventContext<'_>) -> Vec<Output> {
        let mut outputs = Vec::new();
        let mut matched = Vec::new();
        self.candidates(event, &mut matched);
        let decoded = Decoded::new(event.payload, self.fields.as_ref());
        for rule_idx in matched {
            // Stateful rules need their state: `RuleSet::evaluate_windowed`.
            if let Some(rule) = self.rules.get(rule_idx).filter(|r| !r.sql.is_stateful()) {
                self.run(rule, event, &decoded, &mut outputs, &[]);
            }
        }
        outputs
    }

    /// Like [`RuleSet::evaluate`], but reports per matching rule what happened: filtered
    /// out, the selected row, or the failure. Rules whose FROM does not match are absent.
    pub fn explain(&self, event: &EventContext<'_>) -> Vec<Trace> {
        let mut matched = Vec::new();
        self.candidates(event, &mut matched);
        let decoded = Decoded::new(event.payload, self.fields.as_ref());
        let mut traces = Vec::new();
        for rule_idx in matched {
            let Some(rule) = self.rules.get(rule_idx).filter(|r| !r.sql.is_stateful()) else { continue };
            let mut outputs = Vec::new();
            let outcome = match self.run(rule, event, &decoded, &mut outputs, &[]) {
                Ran::Filtered => Outcome::Filtered,
                Ran::Selected(row) => Outcome::Selected { row: row.into_value() },
                Ran::Each(rows) => Outcome::Selected { row: Value::Array(rows) },
                Ran::Failed(reason) => Outcome::Failed { reason },
            };
            traces.push(Trace { rule: rule.name.clone(), outcome, outputs });
        }
        traces
    }

    pub(crate) fn run<'a>(
        &self,
        rule: &'a Rule,
        event: &'a EventContext<'a>,
        decoded: &'a Decoded<'a>,
        out: &mut Vec<Output>,
        locals: &'a [Value],
    ) -> Ran<'a> {
        let dead = |out: &mut Vec<Output>, reason: String| dead_letter(out, rule, event, reason);
        let payload = if rule.sql.uses_payload {
            match decoded.get(rule.payload) {
                Ok(payload) => payload,
                Err(reason) => return dead(out, reason.to_owned()),
            }
        } else {
            PayloadView::Whole(&NULL)
        };
        let text = (!decoded.is_cbor(rule.payload)).then_some(decoded);
        let env = Env { event, payload, text, item: None, locals };
        if let Some(foreach) = &rule.sql.foreach {
            return match select_each(rule, foreach, &env) {
                Ok(rows) if rows.is_empty() => Ran::Filtered,
                Ok(rows) => {
                    let mut selected = Vec::with_capacity(rows.len());
                    for (row, item) in rows {
                        let env = Env { item: Some(&item), ..env };
                        let row = Row::Nested(row);
                        self.act(rule, &row, &env, out);
                        selected.push(row.into_value());
                    }
                    Ran::Each(selected)
                }
                Err(EvalError(reason)) => dead(out, reason),
            };
        }
        let row = match select(rule, &env) {
            Ok(Some(row)) => row,
            Ok(None) => return Ran::Filtered,
            Err(EvalError(reason)) => return dead(out, reason),
        };
        self.act(rule, &row, &env, out);
        Ran::Selected(row)
    }

    /// Runs the rule's actions on one selected row.
    fn act(&self, rule: &Rule, row: &Row<'_>, env: &Env<'_>, out: &mut Vec<Output>) {
        let event = env.event;
        let dead = |out: &mut Vec<Output>, reason: String| dead_letter(out, rule, event, reason);
        for action in &rule.actions {
            // An action that fails fails on its own: a dead letter, and the rule's other
            // actions still run.
            let output = match action {
                Action::Drop => Output::Dropped { rule: rule.name.clone() },
                Action::Forward { topic, qos, priority, ttl, body } => {
                    let topic = match topic {
                        Some(template) => template.render(row, env),
                        None => Ok(event.topic.to_owned()),
                    };
                    let rendered = topic.and_then(|topic| Ok((topic, body.render(row, env, event.payload)?)));
                    match rendered {
                        Ok((topic, payload)) => Output::Forward {
                            rule: rule.name.clone(),
                            topic,
                            payload,
                            qos: *qos,
                            priority: *priority,
                            ttl: *ttl,
                        },
                        Err(reason) => {
                            dead(out, reason);
                            continue;
                        }
                    }
                }
                Action::Republish { topic, qos, body } => match topic.render(row, env) {
                    Err(reason) => {
                        dead(out, reason);
                        continue;
                    }
                    Ok(topic) if event.hops >= self.max_hops => {
                        Output::LoopPrevented { rule: rule.name.clone(), topic, hops: event.hops }
                    }
                    Ok(topic) => match body.render(row, env, event.payload) {
                        Ok(payload) => Output::Republish {
                            rule: rule.name.clone(),
                            topic,
                            payload,
                            qos: *qos,
                            hops: event.hops.saturating_add(1),
                        },
                        Err(reason) => {
                            dead(out, reason);
                            continue;
                        }
                    },
                },
                Action::DeadLetter { reason } => {
                    let reason = match reason {
                        Some(template) => match template.render_text(row, env, "reason template") {
                            Ok(text) => String::from_utf8_lossy(&text).into_owned(),
                            Err(reason) => {
                                dead(out, reason);
                                continue;
                            }
                        },
                        None => DEFAULT_DEAD_LETTER_REASON.to_owned(),
                    };
                    Output::DeadLetter {
                        rule: rule.name.clone(),
                        reason,
                        topic: event.topic.to_owned(),
                        payload: event.payload.to_vec(),
                        deliberate: true,
                    }
                }
            };
            out.push(output);
        }
    }
}

/// A rule failed on an event: its dead letter. Out of line, to keep the rule's common
/// path (`RuleSet::run`) small.
#[cold]
#[inline(never)]
pub(crate) fn dead_letter<'a>(
    out: &mut Vec<Output>,
    rule: &Rule,
    event: &EventContext<'_>,
    reason: String,
) -> Ran<'a> {
    out.push(Output::DeadLetter {
        rule: rule.name.clone(),
        reason: reason.clone(),
        topic: event.topic.to_owned(),
        payload: event.payload.to_vec(),
        deliberate: false,
    });
    Ran::Failed(reason)
}

/// The reason a `dead_letter` action gives when its rule sets none.
pub const DEFAULT_DEAD_LETTER_REASON: &str = "dead_letter action";

/// How one rule's run on one event ended; [`Outcome`] without copying the row.
pub(crate) enum Ran<'a> {
    Filtered,
    Selected(Row<'a>),
    /// A FOREACH rule's rows, one per element kept (never empty).
    Each(Vec<Value>),
    Failed(String),
}

/// A rule on client events (`$events/...`): its forwards need a `topic`, because an event
/// topic is no topic to publish to.
fn check_events(
    config: &crate::config::RuleConfig,
    sql: &CompiledSql,
    context: &str,
    problems: &mut Vec<Problem>,
) {
    if sql.events.is_empty() {
        return;
    }
    for action in &config.action {
        if let ActionConfig::Forward { topic: None, .. } = action {
            problems.push(plain(
                context,
                "a rule on `$events/...` needs a `topic` on its forward action (an event topic is not one to publish to), e.g. topic = \"gateway/events/${clientid}\"",
            ));
        }
    }
}

/// A windowed rule's checks that need more than its SQL: its outputs need a topic (a
/// window is many events, so there is no event topic to reuse), its synthetic row is JSON
/// or CBOR, and `max_groups` belongs to windowed rules only. A windowed rule's SELECT reads
/// its closed window from a synthetic payload, so that is always decoded.
fn check_windowed(
    config: &crate::config::RuleConfig,
    sql: &mut CompiledSql,
    context: &str,
    problems: &mut Vec<Problem>,
) {
    if let Some(rbe) = &mut sql.rbe {
        if let Some(max) = config.max_groups {
            rbe.max_groups = max.get();
        }
    }
    let time = crate::window::sql::TimeOptions {
        event_time: config.event_time.as_deref(),
        late_tolerance: config.late_tolerance.as_deref(),
        idle_timeout: config.idle_timeout.as_deref(),
        late: config.late,
    };
    let Some(window) = &mut sql.window else {
        if time.any() {
            problems.push(plain(
                context,
                "`event_time`, `late_tolerance`, `idle_timeout` and `late` apply to rules with a time window only: add GROUP BY TUMBLINGWINDOW(ss, 10) or remove them",
            ));
        }
        if config.max_groups.is_some() && sql.rbe.is_none() {
            problems.push(plain(
                context,
                "`max_groups` applies to rules with a window or a stateful function (deadband, lag, ...) only",
            ));
        }
        return;
    };
    window.reads_payload = sql.uses_payload;
    sql.uses_payload = true;
    for message in crate::window::sql::apply_time_options(window, &time) {
        problems.push(plain(context, message));
    }
    if let Some(max) = config.max_groups {
        window.plan.max_groups = max.get();
    }
    if config.payload == PayloadFormat::Raw {
        problems
            .push(plain(context, "a windowed rule cannot use `payload = \"raw\"`: use auto, json or cbor"));
    }
    for action in &config.action {
        if let ActionConfig::Forward { topic: None, .. } = action {
            problems.push(plain(
                context,
                "a windowed rule's forward action needs a `topic` (a window has no one event topic), e.g. topic = \"agg/${sensor}\"",
            ));
        }
    }
}

/// Numbers the top-level payload fields the rules read and records each payload path's
/// slot ([`FieldSlots`]). Returns them if they are all the rules read: every payload path
/// starts with a key, or is the bare `payload` (the text, see [`Env::payload_whole`]; a CBOR
/// payload is always decoded whole, so it needs no JSON fields). Otherwise the payload is
/// decoded whole.
fn number_payload_fields(rules: &mut [Rule]) -> Option<FieldSlots> {
    let mut fields = FieldSlots::default();
    let mut whole = false;
    for rule in rules {
        let templates = rule.actions.iter_mut().flat_map(Action::templates_mut).flat_map(Template::exprs_mut);
        for expr in rule.sql.exprs_mut().chain(templates) {
            expr.for_each_payload_path(&mut |path, slot| match path.first() {
                Some(PathSeg::Key(key)) => *slot = Some(fields.intern(key)),
                None => {}
                _ => whole = true,
            });
        }
    }
    (!whole).then_some(fields)
}

/// WHERE, then SELECT. `None` when the condition is not TRUE.
fn select<'a>(rule: &'a Rule, env: &Env<'a>) -> Result<Option<Row<'a>>, EvalError> {
    if let Some(condition) = &rule.sql.condition {
        if condition.truth(env)? != Some(true) {
            return Ok(None);
        }
    }
    let star_value = |name: &str| match name {
        "id" => field_value(Field::EventId, env.event),
        "topic" => field_value(Field::Topic, env.event),
        "clientid" => field_value(Field::ClientId, env.event),
        "username" => field_value(Field::Username, env.event),
        "qos" => field_value(Field::Qos, env.event),
        "timestamp" => field_value(Field::Timestamp, env.event),
        _ => env.payload_whole().clone(),
    };
    let Some(layout) = &rule.sql.layout else {
        let mut row = Value::Object(Vec::with_capacity(rule.sql.columns.len() + 7));
        if rule.sql.star {
            for name in STAR_COLUMNS {
                row.insert(name, star_value(name));
            }
        }
        for column in &rule.sql.columns {
            let value = column.expr.eval(env)?.into_owned();
            row.put_path(&column.path, value);
        }
        return Ok(Some(Row::Nested(row)));
    };
    let mut values: Vec<Cow<'a, Value>> = vec![Cow::Borrowed(&NULL); layout.names.len()];
    if rule.sql.star {
        // The layout starts with the star columns, in order.
        for (name, value) in STAR_COLUMNS.iter().zip(values.iter_mut()) {
            *value = match *name {
                "payload" => Cow::Borrowed(env.payload_whole()),
                other => Cow::Owned(star_value(other)),
            };
        }
    }
    for (column, slot) in rule.sql.columns.iter().zip(&layout.slots) {
        let value = column.expr.eval(env)?;
        if let Some(target) = values.get_mut(*slot) {
            *target = value;
        }
    }
    Ok(Some(Row::Flat { layout, values }))
}

/// A FOREACH rule: WHERE once, then per element of the collection INCASE and the row.
/// Returns each row with its element (the actions' templates read the element too).
fn select_each(rule: &Rule, foreach: &Foreach, env: &Env<'_>) -> Result<Vec<(Value, Value)>, EvalError> {
    if let Some(condition) = &rule.sql.condition {
        if condition.truth(env)? != Some(true) {
            return Ok(Vec::new());
        }
    }
    let collection = foreach.collection.eval(env)?;
    let decoded;
    let items = match &*collection {
        Value::Array(items) => items,
        // EMQX decodes a bare `payload` to iterate over it (`ensure_list`); a payload that is
        // not JSON fails the rule there too.
        Value::Str(_) | Value::Bytes(_) if foreach.bare_payload => {
            decoded = Value::from_json(env.event.payload)
                .map_err(|e| EvalError::new(format!("FOREACH payload: the payload is not JSON: {e}")))?;
            match &decoded {
                Value::Array(items) => items,
                _ => return Ok(Vec::new()),
            }
        }
        // Not an array (a missing field included): no element, as in EMQX.
        _ => return Ok(Vec::new()),
    };
    let mut rows = Vec::new();
    for item in items {
        let env = Env { item: Some(item), ..*env };
        if let Some(incase) = &foreach.incase {
            if incase.truth(&env)? != Some(true) {
                continue;
            }
        }
        let mut row = Value::Object(Vec::with_capacity(rule.sql.columns.len() + 8));
        if rule.sql.star {
            for name in STAR_COLUMNS {
                row.insert(name, star_value(name, &env));
            }
        }
        for column in &rule.sql.columns {
            let value = column.expr.eval(&env)?.into_owned();
            row.put_path(&column.path, value);
        }
        rows.push((row, item.clone()));
    }
    Ok(rows)
}

/// A column of `SELECT *`.
fn star_value(name: &str, env: &Env<'_>) -> Value {
    match name {
        "id" => field_value(Field::EventId, env.event),
        "topic" => field_value(Field::Topic, env.event),
        "clientid" => field_value(Field::ClientId, env.event),
        "username" => field_value(Field::Username, env.event),
        "qos" => field_value(Field::Qos, env.event),
        "timestamp" => field_value(Field::Timestamp, env.event),
        _ => env.payload_whole().clone(),
    }
}

fn plain(context: &str, message: impl Into<String>) -> Problem {
    Problem { context: context.to_owned(), message: message.into(), location: None }
}

fn build_tables(
    configs: &[TableConfig],
    sources: &TableSources,
    problems: &mut Vec<Problem>,
    broken: &mut FxHashSet<String>,
) -> FxHashMap<String, Arc<Table>> {
    let mut tables: FxHashMap<String, Arc<Table>> = FxHashMap::default();
    for table in sources.tables() {
        tables.insert(table.name().to_owned(), Arc::new(table.clone()));
    }
    for config in configs {
        let context = format!("table `{}`", config.name);
        let built = match (&config.file, &config.rows) {
            (Some(_), Some(_)) => Err("give either `file` or `rows`, not both".to_owned()),
            (None, None) => Err("give `file = \"devices.csv\"` or inline `[table.rows]`".to_owned()),
            (None, Some(rows)) => {
                let key = config.key.as_deref().unwrap_or("key");
                Table::from_toml_rows(&config.name, key, rows.clone()).map_err(|e| e.to_string())
            }
            (Some(file), None) => match sources.text(file) {
                None => Err(format!("the text of `{file}` was not supplied (TableSources::with_text)")),
                Some(text) => {
                    let format = config.format.or_else(|| {
                        let lower = file.to_ascii_lowercase();
                        if lower.ends_with(".csv") {
                            Some(TableFormat::Csv)
                        } else if lower.ends_with(".toml") {
                            Some(TableFormat::Toml)
                        } else {
                            None
                        }
                    });
                    match format {
                        Some(TableFormat::Csv) => Table::from_csv(&config.name, text, config.key.as_deref())
                            .map_err(|e| match e {
                                TableError::Csv { line, message } => format!("{file}:{line}: {message}"),
                                other => format!("`{file}`: {other}"),
                            }),
                        Some(TableFormat::Toml) => {
                            Table::from_toml(&config.name, text, config.key.as_deref().unwrap_or("key"))
                                .map_err(|e| format!("`{file}`: {e}"))
                        }
                        None => Err(format!(
                            "cannot tell the format of `{file}`; add `format = \"csv\"` or \"toml\""
                        )),
                    }
                }
            },
        };
        match built {
            Ok(table) => {
                if tables.insert(config.name.clone(), Arc::new(table)).is_some() {
                    problems.push(plain(&context, "another table has the same name"));
                }
            }
            Err(message) => {
                broken.insert(config.name.clone());
                problems.push(plain(&context, message));
            }
        }
    }
    tables
}

fn build_actions(
    configs: &[ActionConfig],
    rules_toml: &str,
    sql: &CompiledSql,
    tables: &FxHashMap<String, Arc<Table>>,
    context: &str,
    reads_payload: &mut bool,
    problems: &mut Vec<Problem>,
) -> Vec<Action> {
    if configs.is_empty() {
        problems.push(plain(
            context,
            "no actions; add `[[rule.action]]` with `type = \"forward\"`, \"republish\", \"drop\" or \"dead_letter\"",
        ));
    }
    let columns = sql.output_names();
    let flat_names = sql.layout.as_ref().map(|layout| layout.names.as_slice());
    let mut compile = |text: &str| {
        compile_expr(text, sql, tables).map(|(expr, reads)| {
            *reads_payload |= reads;
            expr
        })
    };
    let mut template =
        |key: String, text: &str| match Template::parse(text, &columns, flat_names, &mut compile) {
            Ok(t) => Some(t),
            Err(TemplateError::Plain(message)) => {
                problems.push(plain(context, format!("{key}: {message}")));
                None
            }
            Err(TemplateError::Sql(errors)) => {
                for error in errors {
                    let mut problem = error.into_problem(context, text, SqlOrigin::find(rules_toml, text));
                    problem.message = format!("{key} `{}`: {}", one_line(text), problem.message);
                    problems.push(problem);
                }
                None
            }
        };
    let mut actions = Vec::new();
    let mut invalid = Vec::new();
    for (action_idx, config) in configs.iter().enumerate() {
        let key = |name: &str| format!("action[{action_idx}].{name}");
        match config {
            ActionConfig::Drop {} => actions.push(Action::Drop),
            ActionConfig::DeadLetter { reason } => {
                let reason = match reason {
                    Some(text) => match template(key("reason"), text) {
                        Some(t) => Some(t),
                        None => continue,
                    },
                    None => None,
                };
                actions.push(Action::DeadLetter { reason });
            }
            ActionConfig::Forward { topic, qos, priority, ttl, format, payload } => {
                if *qos > 2 {
                    invalid.push(format!("action[{action_idx}].qos = {qos}: QoS is 0, 1 or 2"));
                }
                if *priority > 9 {
                    invalid.push(format!(
                        "action[{action_idx}].priority = {priority}: priorities are 0 (most urgent) to 9"
                    ));
                }
                let topic = match topic {
                    Some(text) => match template(key("topic"), text) {
                        Some(t) => Some(t),
                        None => continue,
                    },
                    None => None,
                };
                let Some(body) = body(*format, payload.as_deref(), action_idx, &mut invalid, &mut template)
                else {
                    continue;
                };
                actions.push(Action::Forward { topic, qos: *qos, priority: *priority, ttl: *ttl, body });
            }
            ActionConfig::Republish { topic, qos, format, payload } => {
                if *qos > 2 {
                    invalid.push(format!("action[{action_idx}].qos = {qos}: QoS is 0, 1 or 2"));
                }
                let Some(topic) = template(key("topic"), topic) else { continue };
                let Some(body) = body(*format, payload.as_deref(), action_idx, &mut invalid, &mut template)
                else {
                    continue;
                };
                actions.push(Action::Republish { topic, qos: *qos, body });
            }
        }
    }
    problems.extend(invalid.into_iter().map(|m| plain(context, m)));
    actions
}

/// An action's payload: `format` or a `payload` template, not both.
fn body(
    format: Option<OutputFormat>,
    payload: Option<&str>,
    action_idx: usize,
    invalid: &mut Vec<String>,
    template: &mut impl FnMut(String, &str) -> Option<Template>,
) -> Option<Body> {
    match (format, payload) {
        (Some(_), Some(_)) => {
            invalid.push(format!(
                "action[{action_idx}]: give `format` or a `payload` template, not both (a template is sent as written)"
            ));
            None
        }
        (format, None) => Some(Body::Encode(format.unwrap_or_default())),
        (None, Some(text)) => template(format!("action[{action_idx}].payload"), text).map(Body::Template),
    }
}

/// A template quoted in a message: its first line, shortened.
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or("");
    if first.chars().count() > 60 || text.contains('\n') {
        format!("{}…", first.chars().take(60).collect::<String>())
    } else {
        first.to_owned()
    }
}
