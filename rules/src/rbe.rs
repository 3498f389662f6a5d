//! Report by exception: functions that compare an event with the ones before it, per
//! partition (the event's topic unless the call says `OVER (PARTITION BY expr)`):
//! eKuiper's `lag`, `latest`, `changed_col` and `had_changed`, and `deadband` (OPC UA's
//! AbsoluteDeadband and PercentDeadband, with a heartbeat) and `dedupe`.
//!
//! They are computed for every event the rule's FROM matches, before WHERE, and their
//! values read by the rule through [`Expr::Local`]: the SQL rewrite (`extract`) replaces
//! each call by a name, as `window::sql` does for aggregates.
//!
//! **Invariants:** state is bounded: at most `max_groups` (call, partition) entries per
//! rule, the least recently seen evicted first (it then starts again as if new: one report
//! too many, never one too few); `lag` keeps at most [`MAX_LAG`] values; `dedupe` at most
//! [`MAX_DEDUPE_KEYS`] keys per partition. Nothing reads a clock: "now" is the event's
//! receive time.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::ControlFlow;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, Spanned, VisitMut, VisitorMut,
};

use crate::compile::Compiler;
use crate::error::SqlError;
use crate::expr::{Env, EvalError, Expr};
use crate::value::Value;
use crate::window::codec::{Reader, Writer};
use crate::window::{Changes, SnapshotError};

pub const MAX_LAG: usize = 100;
pub const MAX_DEDUPE_KEYS: usize = 1_000;

/// The stateful functions, for the rewrite.
const NAMES: &[&str] =
    &["lag", "latest", "changed_col", "had_changed", "deadband", "deadband_percent", "dedupe"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum RbeKind {
    /// `lag(expr[, offset[, default]])`: `expr` `offset` events ago in the partition.
    Lag {
        offset: usize,
        #[serde(deserialize_with = "constant")]
        default: Value,
    },
    /// `latest(expr[, default])`: the latest non-NULL value, this event's included.
    Latest {
        #[serde(deserialize_with = "constant")]
        default: Value,
    },
    /// `changed_col(ignore_null, expr)`: `expr` if it differs from the previous value, else NULL.
    ChangedCol { ignore_null: bool },
    /// `had_changed(ignore_null, expr, ...)`: whether any differs from its previous value.
    HadChanged { ignore_null: bool },
    /// `deadband(expr, threshold[, heartbeat])` and
    /// `deadband_percent(expr, percent, low, high[, heartbeat])`: TRUE when the value is to
    /// be reported — the first, one beyond the band around the last reported value, or any
    /// value once `heartbeat_ms` passed since the last report.
    Deadband { band: f64, heartbeat_ms: Option<u64> },
    /// `dedupe(key, within)`: TRUE unless the same key was seen within `within_ms`.
    Dedupe { within_ms: u64 },
}

/// A constant of the SQL read back from a snapshot. CBOR has one null, read back as JSON's;
/// a constant NULL must stay NULL, or the call would differ from the rule's and its state
/// be dropped at every restore.
fn constant<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::JsonNull => Value::Null,
        value => value,
    })
}

/// One call: its kind, its per-event arguments and its partition.
#[derive(Debug)]
pub(crate) struct RbeCall {
    pub kind: RbeKind,
    pub args: Vec<Expr>,
    pub partition: Option<Expr>,
}

/// A rule's stateful calls, in the order of their [`Expr::Local`] slots.
#[derive(Debug)]
pub(crate) struct RbeSql {
    pub calls: Vec<RbeCall>,
    /// (call, partition) entries at most (the rule's `max_groups`).
    pub max_groups: usize,
}

impl RbeSql {
    pub(crate) fn exprs_mut(&mut self) -> impl Iterator<Item = &mut Expr> {
        self.calls.iter_mut().flat_map(|c| c.args.iter_mut().chain(c.partition.iter_mut()))
    }

    pub(crate) fn kinds(&self) -> Vec<RbeKind> {
        self.calls.iter().map(|c| c.kind.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum CallState {
    Lag(VecDeque<Value>),
    Latest(Option<Value>),
    Previous(Option<Vec<Value>>),
    Deadband { reported: f64, at: u64 },
    Dedupe(FxHashMap<String, u64>),
}

/// The state of one rule's stateful calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RbeState {
    kinds: Vec<RbeKind>,
    /// (call index, partition key) → (last use, state).
    entries: FxHashMap<(usize, String), (u64, CallState)>,
    next_seq: u64,
    max_groups: usize,
    pub(crate) evicted: u64,
    /// Which entries changed since the last delta; not state (never serialized, ignored by
    /// equality). An entry's last use says whether it is listed: every change gives it a
    /// new one.
    #[serde(skip)]
    changes: Changes<(usize, String)>,
}

/// One rule's delta: its meta whole, its entries upserted and removed. `K` and `E` are
/// borrowed to write it (no entry is cloned) and owned to read it.
#[derive(Serialize, Deserialize)]
pub(crate) struct RbeDelta<K, E> {
    /// Whole, so that a delta of a rule the snapshot does not have can start it.
    kinds: K,
    /// `upserted` is every entry: the others are removed.
    whole: bool,
    max_groups: usize,
    next_seq: u64,
    evicted: u64,
    upserted: Vec<E>,
    removed: Vec<(usize, String)>,
}

type EntryKey = (usize, String);
type Entry = (u64, CallState);
pub(crate) type RbeDeltaOut<'a> = RbeDelta<&'a [RbeKind], (&'a EntryKey, &'a Entry)>;
pub(crate) type RbeDeltaIn = RbeDelta<Vec<RbeKind>, (EntryKey, Entry)>;

/// Format 2's call state kinds.
mod state_tag {
    pub const LAG: u64 = 0;
    pub const LATEST: u64 = 1;
    pub const PREVIOUS: u64 = 2;
    pub const DEADBAND: u64 = 3;
    pub const DEDUPE: u64 = 4;
}

fn count(r: &mut Reader<'_>) -> Result<usize, SnapshotError> {
    let n = r.uint()?;
    usize::try_from(n).map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// `[call, partition, last use, state]`; a state is `[kind, fields…]`: `lag`'s values,
/// `latest`'s value (none: absent), the previous values (none: absent), the deadband's last
/// report and its time, `dedupe`'s keys and times (flat).
fn encode_entry((call, partition): &EntryKey, (seq, state): &Entry, w: &mut Writer) {
    w.array(4);
    w.uint(*call as u64);
    w.str(partition);
    w.uint(*seq);
    match state {
        CallState::Lag(values) => {
            w.array(1 + values.len());
            w.uint(state_tag::LAG);
            values.iter().for_each(|v| w.value(v));
        }
        CallState::Latest(value) => {
            w.array(1 + usize::from(value.is_some()));
            w.uint(state_tag::LATEST);
            value.iter().for_each(|v| w.value(v));
        }
        CallState::Previous(values) => {
            w.array(1 + usize::from(values.is_some()));
            w.uint(state_tag::PREVIOUS);
            values.iter().for_each(|v| w.values(v));
        }
        CallState::Deadband { reported, at } => {
            w.array(3);
            w.uint(state_tag::DEADBAND);
            w.float(*reported);
            w.uint(*at);
        }
        CallState::Dedupe(seen) => {
            w.array(1 + 2 * seen.len());
            w.uint(state_tag::DEDUPE);
            for (key, at) in seen {
                w.str(key);
                w.uint(*at);
            }
        }
    }
}

fn decode_entry(r: &mut Reader<'_>) -> Result<(EntryKey, Entry), SnapshotError> {
    r.fields(4, "a report-by-exception entry")?;
    let key = (count(r)?, r.string()?);
    let seq = r.uint()?;
    let len = r.array()?;
    let state = match (r.uint()?, len) {
        (state_tag::LAG, n @ 1..) => CallState::Lag((1..n).map(|_| r.value()).collect::<Result<_, _>>()?),
        (state_tag::LATEST, 1) => CallState::Latest(None),
        (state_tag::LATEST, 2) => CallState::Latest(Some(r.value()?)),
        (state_tag::PREVIOUS, 1) => CallState::Previous(None),
        (state_tag::PREVIOUS, 2) => CallState::Previous(Some(r.values()?)),
        (state_tag::DEADBAND, 3) => CallState::Deadband { reported: r.float()?, at: r.uint()? },
        (state_tag::DEDUPE, n @ 1..) if n % 2 == 1 => {
            let mut seen = FxHashMap::default();
            seen.reserve(n / 2);
            for _ in 0..n / 2 {
                seen.insert(r.string()?, r.uint()?);
            }
            CallState::Dedupe(seen)
        }
        (kind, len) => {
            return Err(SnapshotError::Decode(format!("a call state of kind {kind} with {len} fields")));
        }
    };
    Ok((key, (seq, state)))
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

impl RbeState {
    pub(crate) fn new(kinds: Vec<RbeKind>, max_groups: usize) -> RbeState {
        RbeState {
            kinds,
            entries: FxHashMap::default(),
            next_seq: 0,
            max_groups: max_groups.max(1),
            evicted: 0,
            changes: Changes::default(),
        }
    }

    /// This state under a reloaded rule whose calls are unchanged: the rule's limit now is
    /// `fresh`'s (a lowered one applies from the next new entry on, as for windows).
    pub(crate) fn with_limit_of(mut self, fresh: &RbeState) -> RbeState {
        self.max_groups = fresh.max_groups;
        self
    }

    #[cfg(test)]
    pub(crate) fn changes(&self) -> &Changes<(usize, String)> {
        &self.changes
    }

    /// Each entry as text, sorted (for tests: a map's order is no state).
    #[cfg(test)]
    pub(crate) fn entries_shown(&self) -> Vec<String> {
        let mut shown: Vec<String> = self.entries.iter().map(|e| format!("{e:?}")).collect();
        shown.sort();
        shown
    }

    #[cfg(test)]
    pub(crate) fn max_groups(&self) -> usize {
        self.max_groups
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// This rule's delta, borrowing what it writes; resets the tracking.
    pub(crate) fn delta(&mut self) -> RbeDeltaOut<'_> {
        let (whole, mut keys, removed) = self.changes.take();
        self.changes.since_seq = self.next_seq;
        let entries = &self.entries;
        let (upserted, removed) = if whole {
            (entries.iter().collect(), Vec::new())
        } else {
            // A key evicted and seen again is listed twice.
            keys.sort_unstable();
            keys.dedup();
            (
                keys.into_iter().filter_map(|key| entries.get_key_value(&key)).collect(),
                removed.into_iter().filter(|key| !entries.contains_key(key)).collect(),
            )
        };
        RbeDelta {
            kinds: &self.kinds,
            whole,
            max_groups: self.max_groups,
            next_seq: self.next_seq,
            evicted: self.evicted,
            upserted,
            removed,
        }
    }

    /// Forgets the change tracking: the state as it is now is what the caller's log says.
    pub(crate) fn clear_changes(&mut self) {
        self.changes.take();
        self.changes.since_seq = self.next_seq;
    }

    /// Applies a delta to the state it follows; a delta of other calls (the rule changed
    /// and no snapshot was written) restarts the rule from it.
    pub(crate) fn apply(&mut self, delta: RbeDeltaIn) {
        if self.kinds != delta.kinds {
            *self = RbeState::new(delta.kinds.clone(), delta.max_groups);
        }
        self.kinds = delta.kinds;
        self.max_groups = delta.max_groups.max(1);
        self.next_seq = delta.next_seq;
        self.evicted = delta.evicted;
        if delta.whole {
            self.entries.clear();
        }
        for key in delta.removed {
            self.entries.remove(&key);
        }
        self.entries.extend(delta.upserted);
    }

    /// A rule started from a delta (the snapshot does not have it).
    pub(crate) fn from_delta(delta: RbeDeltaIn) -> RbeState {
        let mut state = RbeState::new(delta.kinds.clone(), delta.max_groups);
        state.apply(delta);
        state
    }

    /// Format 2 (`window::codec`): `[kinds, max_groups, next_seq, evicted, [entry…]]`, an
    /// entry `[call, partition, last use, state]`, the kinds as serde writes them. Written
    /// from the live state.
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.array(5);
        w.serde(&self.kinds);
        w.uint(self.max_groups as u64);
        w.uint(self.next_seq);
        w.uint(self.evicted);
        w.array(self.entries.len());
        for (key, entry) in &self.entries {
            encode_entry(key, entry, w);
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<RbeState, SnapshotError> {
        r.fields(5, "a report-by-exception state")?;
        let kinds = r.serde()?;
        let mut state = RbeState::new(kinds, count(r)?);
        state.next_seq = r.uint()?;
        state.evicted = r.uint()?;
        let n = r.array()?;
        state.entries.reserve(n);
        for _ in 0..n {
            let (key, entry) = decode_entry(r)?;
            state.entries.insert(key, entry);
        }
        Ok(state)
    }

    /// This rule's delta in format 2, written from the live state; resets the tracking:
    /// `[kinds, whole, max_groups, next_seq, evicted, [entry…], [[call, partition]…]]`.
    pub(crate) fn encode_delta(&mut self, w: &mut Writer) {
        let delta = self.delta();
        w.array(7);
        w.serde(delta.kinds);
        w.bool(delta.whole);
        w.uint(delta.max_groups as u64);
        w.uint(delta.next_seq);
        w.uint(delta.evicted);
        w.array(delta.upserted.len());
        for (key, entry) in delta.upserted {
            encode_entry(key, entry, w);
        }
        w.array(delta.removed.len());
        for (call, partition) in &delta.removed {
            w.array(2);
            w.uint(*call as u64);
            w.str(partition);
        }
    }

    /// A delta in format 2 ([`RbeState::encode_delta`]).
    pub(crate) fn decode_delta(r: &mut Reader<'_>) -> Result<RbeDeltaIn, SnapshotError> {
        r.fields(7, "a report-by-exception delta")?;
        let kinds = r.serde()?;
        let whole = r.bool()?;
        let (max_groups, next_seq, evicted) = (count(r)?, r.uint()?, r.uint()?);
        let n = r.array()?;
        let mut upserted = Vec::with_capacity(n);
        for _ in 0..n {
            upserted.push(decode_entry(r)?);
        }
        let n = r.array()?;
        let mut removed = Vec::with_capacity(n);
        for _ in 0..n {
            r.fields(2, "a removed entry")?;
            removed.push((count(r)?, r.string()?));
        }
        Ok(RbeDelta { kinds, whole, max_groups, next_seq, evicted, upserted, removed })
    }

    pub(crate) fn kinds(&self) -> &[RbeKind] {
        &self.kinds
    }

    /// Each call's value for this event, updating the state.
    pub(crate) fn evaluate(&mut self, sql: &RbeSql, env: &Env<'_>) -> Result<Vec<Value>, EvalError> {
        let now = env.event.timestamp_ms;
        let mut values = Vec::with_capacity(sql.calls.len());
        for (i, call) in sql.calls.iter().enumerate() {
            let partition = match &call.partition {
                Some(p) => p.eval(env)?.to_json_string(),
                None => env.event.topic.to_owned(),
            };
            let args: Vec<Value> =
                call.args.iter().map(|a| a.eval(env).map(Cow::into_owned)).collect::<Result<_, _>>()?;
            let key = (i, partition);
            self.next_seq += 1;
            let seq = self.next_seq;
            match self.entries.get(&key) {
                Some((last, _)) if *last > self.changes.since_seq => {}
                Some(_) if self.changes.whole => {}
                Some(_) => self.changes.changed.push(key.clone()),
                None => {
                    if self.entries.len() >= self.max_groups {
                        // The overflow path: a scan rather than an index kept per event.
                        if let Some(oldest) =
                            self.entries.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| k.clone())
                        {
                            self.entries.remove(&oldest);
                            self.evicted += 1;
                            self.changes.removed(|| oldest);
                        }
                    }
                    if !self.changes.whole {
                        self.changes.changed.push(key.clone());
                        // A key made again after its eviction is listed again.
                        self.changes.bound(self.entries.len());
                    }
                }
            }
            let entry = self.entries.entry(key).or_insert_with(|| (seq, initial(&call.kind)));
            entry.0 = seq;
            values.push(step(&call.kind, &mut entry.1, &args, now));
        }
        Ok(values)
    }
}

fn initial(kind: &RbeKind) -> CallState {
    match kind {
        RbeKind::Lag { .. } => CallState::Lag(VecDeque::new()),
        RbeKind::Latest { .. } => CallState::Latest(None),
        RbeKind::ChangedCol { .. } | RbeKind::HadChanged { .. } => CallState::Previous(None),
        RbeKind::Deadband { .. } => CallState::Deadband { reported: f64::NAN, at: 0 },
        RbeKind::Dedupe { .. } => CallState::Dedupe(FxHashMap::default()),
    }
}

fn step(kind: &RbeKind, state: &mut CallState, args: &[Value], now: u64) -> Value {
    let first = args.first().cloned().unwrap_or(Value::Null);
    match (kind, state) {
        (RbeKind::Lag { offset, default }, CallState::Lag(past)) => {
            let value = if past.len() >= *offset { past.get(past.len() - offset).cloned() } else { None };
            past.push_back(first);
            while past.len() > *offset {
                past.pop_front();
            }
            value.unwrap_or_else(|| default.clone())
        }
        (RbeKind::Latest { default }, CallState::Latest(latest)) => {
            if !first.is_null_var() {
                *latest = Some(first);
            }
            latest.clone().unwrap_or_else(|| default.clone())
        }
        (RbeKind::ChangedCol { ignore_null }, CallState::Previous(previous)) => {
            if *ignore_null && first.is_null_var() {
                return Value::Null;
            }
            let changed = previous.as_ref().and_then(|p| p.first()) != Some(&first);
            *previous = Some(vec![first.clone()]);
            if changed { first } else { Value::Null }
        }
        (RbeKind::HadChanged { ignore_null }, CallState::Previous(previous)) => {
            let old = previous.take().unwrap_or_else(|| vec![Value::Null; args.len()]);
            let mut changed = false;
            let mut next = Vec::with_capacity(args.len());
            for (i, value) in args.iter().enumerate() {
                let before = old.get(i).cloned().unwrap_or(Value::Null);
                if *ignore_null && value.is_null_var() {
                    next.push(before);
                } else {
                    changed |= *value != before;
                    next.push(value.clone());
                }
            }
            *previous = Some(next);
            Value::Bool(changed)
        }
        (RbeKind::Deadband { band, heartbeat_ms }, CallState::Deadband { reported, at }) => {
            let Some(x) = number(&first) else { return Value::Bool(false) };
            let due = heartbeat_ms.is_some_and(|h| now.saturating_sub(*at) >= h);
            // OPC UA: report when |last reported − value| exceeds the band (strictly).
            let report = reported.is_nan() || (x - *reported).abs() > *band || due;
            if report {
                *reported = x;
                *at = now;
            }
            Value::Bool(report)
        }
        (RbeKind::Dedupe { within_ms }, CallState::Dedupe(seen)) => {
            let key = first.to_json_string();
            let fresh = seen.get(&key).is_none_or(|t| now.saturating_sub(*t) >= *within_ms);
            if fresh {
                if seen.len() >= MAX_DEDUPE_KEYS {
                    seen.retain(|_, t| now.saturating_sub(*t) < *within_ms);
                    if seen.len() >= MAX_DEDUPE_KEYS {
                        if let Some(oldest) = seen.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                            seen.remove(&oldest);
                        }
                    }
                }
                seen.insert(key, now);
            }
            Value::Bool(fresh)
        }
        _ => Value::Null,
    }
}

/// `'30s'`, `'5m'`, `'1h'`, `'250ms'`, or an integer of milliseconds.
fn duration_ms(text: &str) -> Option<u64> {
    let text = text.trim().trim_matches('\'');
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let unit_ms = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).filter(|ms| *ms > 0)
}

fn literal_number(e: &ast::Expr) -> Option<f64> {
    e.to_string().parse::<f64>().ok().filter(|f| f.is_finite())
}

fn literal_bool(e: &ast::Expr) -> Option<bool> {
    match e.to_string().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

fn literal_value(e: &ast::Expr) -> Option<Value> {
    let text = e.to_string();
    if let Some(s) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Some(Value::Str(s.to_owned()));
    }
    if text.eq_ignore_ascii_case("null") {
        return Some(Value::Null);
    }
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::Int(i));
    }
    literal_number(e).map(Value::Float).or_else(|| literal_bool(e).map(Value::Bool))
}

/// A call's kind and the argument expressions evaluated per event.
fn parse_call(
    name: &str,
    args: &[ast::Expr],
    span: sqlparser::tokenizer::Span,
) -> Result<(RbeKind, Vec<ast::Expr>), SqlError> {
    let err = |m: String| SqlError::new(m, span);
    let duration = |e: &ast::Expr, what: &str| {
        duration_ms(&e.to_string()).ok_or_else(|| {
            SqlError::new(
                format!("{name}: {what} must be a duration such as '30s', '5m' or 500 (ms), not `{e}`"),
                e.span(),
            )
        })
    };
    let positive = |e: &ast::Expr, what: &str| match literal_number(e) {
        Some(x) if x >= 0.0 => Ok(x),
        _ => Err(SqlError::new(format!("{name}: {what} must be a number ≥ 0, not `{e}`"), e.span())),
    };
    match (name, args) {
        ("lag", [e]) => Ok((RbeKind::Lag { offset: 1, default: Value::Null }, vec![e.clone()])),
        ("lag", [e, offset, rest @ ..]) if rest.len() <= 1 => {
            let offset = match offset.to_string().parse::<usize>() {
                Ok(n) if (1..=MAX_LAG).contains(&n) => n,
                _ => {
                    return Err(SqlError::new(
                        format!("lag: the offset must be an integer from 1 to {MAX_LAG}, not `{offset}`"),
                        offset.span(),
                    ));
                }
            };
            let default = match rest.first() {
                Some(d) => literal_value(d)
                    .ok_or_else(|| SqlError::new("lag: the default must be a constant", d.span()))?,
                None => Value::Null,
            };
            Ok((RbeKind::Lag { offset, default }, vec![e.clone()]))
        }
        ("latest", [e]) => Ok((RbeKind::Latest { default: Value::Null }, vec![e.clone()])),
        ("latest", [e, d]) => {
            let default = literal_value(d)
                .ok_or_else(|| SqlError::new("latest: the default must be a constant", d.span()))?;
            Ok((RbeKind::Latest { default }, vec![e.clone()]))
        }
        ("changed_col" | "had_changed", [flag, exprs @ ..]) if !exprs.is_empty() => {
            let ignore_null = literal_bool(flag).ok_or_else(|| {
                SqlError::new(
                    format!("{name}: the first argument is ignore_null, true or false, not `{flag}`"),
                    flag.span(),
                )
            })?;
            if name == "changed_col" {
                if exprs.len() != 1 {
                    return Err(err("expected changed_col(ignore_null, expr)".to_owned()));
                }
                Ok((RbeKind::ChangedCol { ignore_null }, exprs.to_vec()))
            } else {
                Ok((RbeKind::HadChanged { ignore_null }, exprs.to_vec()))
            }
        }
        ("deadband", [e, threshold, rest @ ..]) if rest.len() <= 1 => {
            let band = positive(threshold, "the threshold")?;
            let heartbeat_ms = rest.first().map(|h| duration(h, "the heartbeat")).transpose()?;
            Ok((RbeKind::Deadband { band, heartbeat_ms }, vec![e.clone()]))
        }
        ("deadband_percent", [e, percent, low, high, rest @ ..]) if rest.len() <= 1 => {
            let percent = positive(percent, "the percentage")?;
            let (Some(low), Some(high)) = (literal_number(low), literal_number(high)) else {
                return Err(err(
                    "deadband_percent: low and high (the engineering range) must be numbers".to_owned()
                ));
            };
            if high <= low || percent > 100.0 {
                return Err(err(format!(
                    "deadband_percent: expected 0 ≤ percent ≤ 100 and low < high, got {percent}, {low}, {high}"
                )));
            }
            let heartbeat_ms = rest.first().map(|h| duration(h, "the heartbeat")).transpose()?;
            // OPC UA PercentDeadband: the band is percent of the EURange's width.
            Ok((RbeKind::Deadband { band: percent / 100.0 * (high - low), heartbeat_ms }, vec![e.clone()]))
        }
        ("dedupe", [key, within]) => {
            Ok((RbeKind::Dedupe { within_ms: duration(within, "`within`")? }, vec![key.clone()]))
        }
        _ => Err(err(format!(
            "expected {}",
            match name {
                "lag" => "lag(expr[, offset[, default]])",
                "latest" => "latest(expr[, default])",
                "changed_col" => "changed_col(ignore_null, expr)",
                "had_changed" => "had_changed(ignore_null, expr[, expr ...])",
                "deadband" => "deadband(expr, threshold[, heartbeat])",
                "deadband_percent" => "deadband_percent(expr, percent, low, high[, heartbeat])",
                _ => "dedupe(key, within)",
            }
        ))),
    }
}

pub(crate) const LOCAL_PREFIX: &str = "__rbe_";

struct Rewrite {
    calls: Vec<(RbeKind, Vec<ast::Expr>, Option<ast::Expr>)>,
    errors: Vec<SqlError>,
}

impl VisitorMut for Rewrite {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &mut ast::Expr) -> ControlFlow<()> {
        let ast::Expr::Function(function) = expr else { return ControlFlow::Continue(()) };
        let name = function.name.to_string().to_ascii_lowercase();
        if !NAMES.contains(&name.as_str()) {
            return ControlFlow::Continue(());
        }
        let span = function.span();
        let args: Option<Vec<ast::Expr>> = match &function.args {
            FunctionArguments::List(list)
                if list.duplicate_treatment.is_none() && list.clauses.is_empty() =>
            {
                list.args
                    .iter()
                    .map(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
                        _ => None,
                    })
                    .collect()
            }
            _ => None,
        };
        let partition = match &function.over {
            None => Ok(None),
            Some(ast::WindowType::WindowSpec(spec))
                if spec.window_name.is_none() && spec.order_by.is_empty() && spec.window_frame.is_none() =>
            {
                match spec.partition_by.as_slice() {
                    [p] => Ok(Some(p.clone())),
                    _ => Err(()),
                }
            }
            _ => Err(()),
        };
        let result = match (args, partition) {
            (Some(args), Ok(partition)) => {
                parse_call(&name, &args, span).map(|(kind, args)| (kind, args, partition))
            }
            (None, _) => Err(SqlError::new(format!("{name}: expected plain arguments"), span)),
            (_, Err(())) => Err(SqlError::new(format!("{name}: OVER takes (PARTITION BY expr) only"), span)),
        };
        match result {
            Ok(call) => {
                self.calls.push(call);
                *expr = ast::Expr::Identifier(Ident::new(format!("{LOCAL_PREFIX}{}", self.calls.len() - 1)));
            }
            Err(e) => {
                self.errors.push(e);
                *expr = ast::Expr::Value(ast::Value::Null.into());
            }
        }
        ControlFlow::Continue(())
    }
}

/// Replaces the stateful calls in SELECT and WHERE by names, compiles their arguments, and
/// makes the names read [`Expr::Local`]. `None` when the statement has none.
pub(crate) fn extract(
    select: &mut ast::Select,
    compiler: &mut Compiler<'_>,
) -> Result<Option<RbeSql>, Vec<SqlError>> {
    let mut rewrite = Rewrite { calls: Vec::new(), errors: Vec::new() };
    for item in &mut select.projection {
        if let ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } = item {
            let _ = e.visit(&mut rewrite);
        }
    }
    if let Some(selection) = &mut select.selection {
        let _ = selection.visit(&mut rewrite);
    }
    if !rewrite.errors.is_empty() {
        return Err(rewrite.errors);
    }
    if rewrite.calls.is_empty() {
        return Ok(None);
    }
    let mut calls = Vec::new();
    for (i, (kind, args, partition)) in rewrite.calls.into_iter().enumerate() {
        let args = args.iter().filter_map(|a| compiler.expr_or_record(a)).collect();
        let partition = partition.as_ref().and_then(|p| compiler.expr_or_record(p));
        compiler.aliases.insert(format!("{LOCAL_PREFIX}{i}"), Expr::Local(i));
        calls.push(RbeCall { kind, args, partition });
    }
    Ok(Some(RbeSql { calls, max_groups: crate::window::DEFAULT_MAX_GROUPS }))
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use crate::{EventContext, Output, RuleSet, TableSources};

    /// `<ms> <topic> <payload>` per line; prints each forward as `ms: topic payload`.
    #[track_caller]
    fn check(sql: &str, script: &str, expect: Expect) {
        let toml =
            format!("[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n");
        let rules = match RuleSet::compile(&toml, &TableSources::new()) {
            Ok(rules) => rules,
            Err(e) => return expect.assert_eq(&format!("error: {e}\n")),
        };
        assert!(rules.evaluate(&event(0, "x", "{}")).is_empty(), "stateless evaluation skips the rule");
        let mut state = rules.window_state();
        let mut text = String::new();
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut parts = line.splitn(3, ' ');
            let (at, topic, payload) =
                (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
            for output in rules.evaluate_windowed(&event(at.parse().unwrap(), topic, payload), &mut state) {
                match output {
                    Output::Forward { topic, payload, .. } => {
                        text.push_str(&format!("{at}: {topic} {}\n", String::from_utf8_lossy(&payload)));
                    }
                    other => text.push_str(&format!("{at}: {other:?}\n")),
                }
            }
        }
        expect.assert_eq(&text);
    }

    fn event<'a>(at: u64, topic: &'a str, payload: &'a str) -> EventContext<'a> {
        EventContext {
            topic,
            payload: payload.as_bytes(),
            clientid: None,
            username: None,
            qos: 1,
            timestamp_ms: at,
            event_id: 1,
            hops: 0,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
        }
    }

    #[test]
    fn absolute_deadband_reports_the_first_value_and_moves_beyond_the_band_per_topic() {
        check(
            "SELECT payload.v AS v FROM \"s/+\" WHERE deadband(payload.v, 0.5)",
            r#"
            1 s/a {"v": 20.0}
            2 s/a {"v": 20.5}
            3 s/a {"v": 20.51}
            4 s/b {"v": 20.0}
            5 s/a {"v": 20.2}
            6 s/a {"v": 20.0}
            7 s/a {"v": "n/a"}
            "#,
            // 20.5 is not beyond 0.5 of 20.0 (OPC UA: strictly greater); 20.51 is; 20.0 is
            // compared with the last reported 20.51, not with 20.2.
            expect![[r#"
                1: s/a {"v":20.0}
                3: s/a {"v":20.51}
                4: s/b {"v":20.0}
                6: s/a {"v":20.0}
            "#]],
        );
    }

    #[test]
    fn deadband_heartbeat_reports_an_unchanged_value_once_per_period() {
        check(
            "SELECT payload.v AS v FROM \"s\" WHERE deadband(payload.v, 1, '10s')",
            "0 s {\"v\":1}\n5000 s {\"v\":1}\n9999 s {\"v\":1}\n10000 s {\"v\":1}\n15000 s {\"v\":1.5}\n20000 s {\"v\":1}",
            expect![[r#"
                0: s {"v":1}
                10000: s {"v":1}
                20000: s {"v":1}
            "#]],
        );
    }

    #[test]
    fn percent_deadband_is_a_share_of_the_engineering_range() {
        // 2 % of 0..200 is a band of 4.
        check(
            "SELECT payload.v AS v FROM \"s\" WHERE deadband_percent(payload.v, 2, 0, 200)",
            "1 s {\"v\":100}\n2 s {\"v\":104}\n3 s {\"v\":104.5}\n4 s {\"v\":100}",
            expect![[r#"
                1: s {"v":100}
                3: s {"v":104.5}
                4: s {"v":100}
            "#]],
        );
    }

    #[test]
    fn dedupe_passes_a_key_once_within_the_period() {
        check(
            "SELECT payload.id AS id FROM \"s\" WHERE dedupe(payload.id, '1s')",
            "0 s {\"id\":\"a\"}\n10 s {\"id\":\"b\"}\n500 s {\"id\":\"a\"}\n1000 s {\"id\":\"a\"}\n1001 s {\"id\":\"b\"}",
            expect![[r#"
                0: s {"id":"a"}
                10: s {"id":"b"}
                1000: s {"id":"a"}
            "#]],
        );
    }

    #[test]
    fn lag_latest_and_changes_follow_ekuiper() {
        check(
            "SELECT payload.v AS v, lag(payload.v) AS prev, lag(payload.v, 2, 0) AS prev2, latest(payload.v) AS l,
                    changed_col(true, payload.v) AS c, had_changed(true, payload.v, payload.w) AS h
             FROM \"s/+\"",
            r#"
            1 s/a {"v": 1, "w": 1}
            2 s/a {"v": 1, "w": 2}
            3 s/a {"w": 2}
            4 s/b {"v": 7, "w": 1}
            5 s/a {"v": 3, "w": 2}
            "#,
            expect![[r#"
                1: s/a {"v":1,"prev":null,"prev2":0,"l":1,"c":1,"h":true}
                2: s/a {"v":1,"prev":1,"prev2":0,"l":1,"c":null,"h":true}
                3: s/a {"v":null,"prev":1,"prev2":1,"l":1,"c":null,"h":false}
                4: s/b {"v":7,"prev":null,"prev2":0,"l":7,"c":7,"h":true}
                5: s/a {"v":3,"prev":null,"prev2":1,"l":3,"c":3,"h":true}
            "#]],
        );
    }

    #[test]
    fn partition_by_overrides_the_topic() {
        check(
            "SELECT payload.v AS v FROM \"s/+\" WHERE deadband(payload.v, 1) OVER (PARTITION BY payload.site)",
            "1 s/a {\"v\":1,\"site\":\"x\"}\n2 s/b {\"v\":1.5,\"site\":\"x\"}\n3 s/b {\"v\":1.5,\"site\":\"y\"}",
            expect![[r#"
                1: s/a {"v":1}
                3: s/b {"v":1.5}
            "#]],
        );
    }

    #[test]
    fn state_survives_a_snapshot() {
        let toml = "[[rule]]\nname = \"r\"\nsql = '''SELECT 1 AS x FROM \"s\" WHERE dedupe(payload.id, '1m')'''\n[[rule.action]]\ntype = \"forward\"\n";
        let rules = RuleSet::compile(toml, &TableSources::new()).unwrap();
        let mut state = rules.window_state();
        assert_eq!(rules.evaluate_windowed(&event(0, "s", r#"{"id":1}"#), &mut state).len(), 1);
        let bytes = state.snapshot(&rules);
        let (mut restored, dropped) = crate::window::WindowState::restore(&rules, &bytes).unwrap();
        assert!(dropped.is_empty());
        assert!(
            rules.evaluate_windowed(&event(10, "s", r#"{"id":1}"#), &mut restored).is_empty(),
            "remembered"
        );
        assert_eq!(rules.evaluate_windowed(&event(60_000, "s", r#"{"id":1}"#), &mut restored).len(), 1);
    }

    #[test]
    fn lag_keeps_its_state_across_a_snapshot() {
        let toml = "[[rule]]\nname = \"r\"\nsql = '''SELECT lag(payload.v) AS p, latest(payload.v) AS l FROM \"s\"'''\n[[rule.action]]\ntype = \"forward\"\n";
        let rules = RuleSet::compile(toml, &TableSources::new()).unwrap();
        let mut state = rules.window_state();
        rules.evaluate_windowed(&event(0, "s", r#"{"v":1}"#), &mut state);
        let (mut restored, dropped) =
            crate::window::WindowState::restore(&rules, &state.snapshot(&rules)).unwrap();
        assert!(dropped.is_empty(), "{dropped:?}");
        let out = rules.evaluate_windowed(&event(1, "s", r#"{"v":2}"#), &mut restored);
        let [Output::Forward { payload, .. }] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!(String::from_utf8_lossy(payload), r#"{"p":1,"l":2}"#);
    }

    #[test]
    fn bad_calls_say_what_to_write() {
        let mut text = String::new();
        for sql in [
            "SELECT 1 AS x FROM \"s\" WHERE deadband(payload.v)",
            "SELECT 1 AS x FROM \"s\" WHERE deadband(payload.v, -1)",
            "SELECT 1 AS x FROM \"s\" WHERE deadband(payload.v, 1, 'soon')",
            "SELECT 1 AS x FROM \"s\" WHERE deadband_percent(payload.v, 2, 10, 0)",
            "SELECT 1 AS x FROM \"s\" WHERE dedupe(payload.id)",
            "SELECT lag(payload.v, 0) AS x FROM \"s\"",
            "SELECT changed_col(payload.v) AS x FROM \"s\"",
        ] {
            let toml =
                format!("[[rule]]\nname = \"r\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\n");
            if let Err(e) = RuleSet::compile(&toml, &TableSources::new()) {
                text.push_str(&format!("{e}\n"));
            }
        }
        expect![[r#"
            line 3, column 39: rule `r`: expected deadband(expr, threshold[, heartbeat])
              |
            3 | SELECT 1 AS x FROM "s" WHERE deadband(payload.v)
              |                              ^^^^^^^^^^^^^^^^^^
            line 3, column 60: rule `r`: deadband: the threshold must be a number ≥ 0, not `-1`
              |
            3 | SELECT 1 AS x FROM "s" WHERE deadband(payload.v, -1)
              |                                                   ^
            line 3, column 62: rule `r`: deadband: the heartbeat must be a duration such as '30s', '5m' or 500 (ms), not `'soon'`
              |
            3 | SELECT 1 AS x FROM "s" WHERE deadband(payload.v, 1, 'soon')
              |                                                     ^^^^^^
            line 3, column 39: rule `r`: deadband_percent: expected 0 ≤ percent ≤ 100 and low < high, got 2, 10, 0
              |
            3 | SELECT 1 AS x FROM "s" WHERE deadband_percent(payload.v, 2, 10, 0)
              |                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
            line 3, column 39: rule `r`: expected dedupe(key, within)
              |
            3 | SELECT 1 AS x FROM "s" WHERE dedupe(payload.id)
              |                              ^^^^^^^^^^^^^^^^^
            line 3, column 32: rule `r`: lag: the offset must be an integer from 1 to 100, not `0`
              |
            3 | SELECT lag(payload.v, 0) AS x FROM "s"
              |                       ^
            line 3, column 17: rule `r`: expected changed_col(ignore_null, expr)
              |
            3 | SELECT changed_col(payload.v) AS x FROM "s"
              |        ^^^^^^^^^^^^^^^^^^^^^
        "#]].assert_eq(&text);
    }
}
