//! The compiled plan of one rule's expressions and how it evaluates against an event.
//!
//! An [`Expr`] has resolved everything the SQL named: fields are [`Field`]s or payload
//! paths, functions are pointers into the builtin table, tables are shared handles, and
//! literal patterns (LIKE, `regex_match`) are compiled regexes. Evaluating it walks only
//! this tree; the SQL AST is gone after compilation.
//!
//! **NULL and type rules** (the README's "Semantics" section is the user-facing copy):
//! - A missing field and an out-of-range index are NULL (EMQX's `undefined`). A JSON
//!   `null` is [`Value::JsonNull`], a value (EMQX's atom `null`): not NULL for `is_null` or
//!   comparisons, written as its text `null` by `str`, `concat` and templates, and ordered
//!   as Erlang orders the atom (above every number).
//! - Comparisons follow EMQX (`emqx_rule_runtime:compare`): with one side NULL they are
//!   FALSE (`!=` too), NULL = NULL is TRUE; `NOT` of anything but TRUE/FALSE is FALSE; IN
//!   is list membership (NULL is in a list holding NULL). AND/OR of a bare NULL operand
//!   (a NULL field used as a condition) are three-valued; WHERE keeps an event only if the
//!   condition is TRUE.
//! - Arithmetic and most functions fail on a NULL argument, as EMQX's have no clause for
//!   `undefined`; `||`, `concat`, `str` write it as `undefined`.
//! - Numbers compare numerically (integer vs float included); a string compared with a
//!   number is converted to a number first (as in EMQX). If it is not numeric, `=` is
//!   false, `!=` true, and `<`, `<=`, `>`, `>=` are a type error.
//! - A type error (e.g. `'abc' * 2`, `sqrt(-1)`, a non-boolean in WHERE) fails the rule
//!   for this event: the engine emits a dead letter and the other rules still run.
//!
//! Evaluation returns `Cow`: a payload path borrows from the decoded payload and a
//! `lookup` from its table, so a filter like `payload.temp > 30` allocates nothing and an
//! enrichment copies nothing.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use regex::Regex;

use crate::functions::Builtin;
use crate::payload::PayloadView;
use crate::table::Table;
use crate::value::Value;

/// What a rule failed with on one event; becomes the `reason` of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EvalError(pub String);

impl EvalError {
    pub(crate) fn new(message: impl Into<String>) -> EvalError {
        EvalError(message.into())
    }
}

pub(crate) type EvalResult<'a> = Result<Cow<'a, Value>, EvalError>;

/// Event metadata a rule can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Topic,
    ClientId,
    Username,
    Qos,
    Timestamp,
    EventId,
    Hops,
    PeerHost,
    /// `{"retain": bool, "dup": bool}`.
    Flags,
    /// EMQX's `pub_props` map.
    PubProps,
    /// A field of a client event (`$events/...`): NULL for a message.
    Event(crate::events::EventField),
    /// EMQX's `metadata` (`rule_id`): replaced by the rule's own value once its actions are
    /// compiled ([`Expr::resolve_metadata`]).
    Metadata,
}

impl Field {
    /// Whether the field is a map a path can read into (`flags.retain`).
    pub(crate) fn has_fields(self) -> bool {
        matches!(self, Field::Flags | Field::PubProps | Field::Metadata)
    }
}

/// In an `AS` target, `[0]`: insert at the head of the array (EMQX's `head`).
pub(crate) const PUT_HEAD: i64 = 0;
/// In an `AS` target, `[-0]`: append to the array (EMQX's `tail`).
pub(crate) const PUT_TAIL: i64 = i64::MIN;

/// One step of a path: `.key` or `[index]` (1-based; negative from the end; in an `AS`
/// target also [`PUT_HEAD`] and [`PUT_TAIL`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PathSeg {
    Key(String),
    Index(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Const(Value),
    Field(Field),
    /// A path into the decoded payload; empty means the whole payload. `slot` is the rule
    /// set's [`FieldSlots`](crate::payload::FieldSlots) number of the path's first key,
    /// assigned when the rule set is built; it lets a rule read a field decoded on its own.
    Payload {
        path: Vec<PathSeg>,
        slot: Option<usize>,
    },
    /// `topic(N)`: level N (1-based) of the event's topic.
    TopicLevel(usize),
    /// A value computed for this event before the rule runs ([`Env::locals`]): what a
    /// stateful function (`deadband`, `lag`, ...) returned, see `crate::rbe`.
    Local(usize),
    /// A path into a computed value, e.g. `lookup('devices', payload.id).site`.
    Get(Box<Expr>, Vec<PathSeg>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    IsNull(Box<Expr>, bool),
    In {
        expr: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    /// LIKE, and `regex_match` with a literal pattern.
    Matches {
        expr: Box<Expr>,
        regex: Regex,
        negated: bool,
    },
    /// `regex_replace` with a literal pattern.
    RegexReplace {
        expr: Box<Expr>,
        regex: Regex,
        replacement: Box<Expr>,
    },
    Case {
        operand: Option<Box<Expr>>,
        branches: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Call {
        func: &'static Builtin,
        args: Vec<Expr>,
    },
    /// An array literal, `[a, b]`.
    Array(Vec<Expr>),
    Lookup {
        table: Arc<Table>,
        key: Box<Expr>,
        field: Option<String>,
    },
    /// `x[a..b]`: elements a to b (1-based, negative from the end) of the array x, as
    /// EMQX's `range_get`.
    Slice(Box<Expr>, i64, i64),
    /// The element a `FOREACH` statement is at (`item`, or the last FOREACH field's alias),
    /// in its `DO` and `INCASE`.
    Item,
    /// A bare name that names no field or alias: NULL, as EMQX reads it as `undefined`. Kept
    /// apart from `Const(Null)` so that warnings name it once, as unknown.
    Undefined,
}

/// What an expression can see: the event and the payload decoded for this rule.
pub(crate) struct Env<'a> {
    pub event: &'a crate::EventContext<'a>,
    pub payload: PayloadView<'a>,
    /// The payload as text, for a bare `payload` (EMQX keeps the payload as the text it
    /// arrived as; only paths into it decode). `None` when the payload is CBOR, which EMQX
    /// does not read, and a bare `payload` is the decoded value.
    pub text: Option<&'a crate::payload::Decoded<'a>>,
    /// The element a `FOREACH` statement is at; `None` outside `DO` and `INCASE`.
    pub item: Option<&'a Value>,
    /// Values computed for this event before the rule runs, read by [`Expr::Local`].
    pub locals: &'a [Value],
}

impl<'a> Env<'a> {
    /// What a bare `payload` (and the `payload` column of `SELECT *`) is.
    pub(crate) fn payload_whole(&self) -> &'a Value {
        match self.text {
            Some(decoded) => decoded.text(),
            None => self.payload.whole(),
        }
    }
}

/// Limits on one compiled expression (after aliases are expanded), so that evaluation's
/// recursion stays shallow and alias chains (`a+a AS b, b+b AS c, ...`) cannot blow up.
pub(crate) const MAX_DEPTH: usize = 160;
pub(crate) const MAX_NODES: usize = 20_000;

impl Expr {
    /// Whether this expression is within [`MAX_DEPTH`] and the node budget. Stops as soon as
    /// a limit is hit, so it never recurses deeper than `MAX_DEPTH` itself.
    pub(crate) fn within_limits(&self, depth: usize, budget: &mut usize) -> bool {
        if depth > MAX_DEPTH || *budget == 0 {
            return false;
        }
        *budget -= 1;
        self.children().into_iter().all(|child| child.within_limits(depth + 1, budget))
    }

    /// Calls `f` with every payload path in this expression and its slot, so the rule set
    /// can number the fields its rules read. Recursion is bounded by [`MAX_DEPTH`]: only
    /// expressions that passed [`Expr::within_limits`] are compiled into rules.
    pub(crate) fn for_each_payload_path(&mut self, f: &mut dyn FnMut(&[PathSeg], &mut Option<usize>)) {
        if let Expr::Payload { path, slot } = self {
            f(path, slot);
        }
        for child in self.children_mut() {
            child.for_each_payload_path(f);
        }
    }

    /// The direct subexpressions, for walks over the plan.
    pub(crate) fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Const(_)
            | Expr::Field(_)
            | Expr::Payload { .. }
            | Expr::TopicLevel(_)
            | Expr::Item
            | Expr::Undefined
            | Expr::Local(_) => Vec::new(),
            Expr::Get(e, _)
            | Expr::Slice(e, _, _)
            | Expr::Neg(e)
            | Expr::Not(e)
            | Expr::IsNull(e, _)
            | Expr::Matches { expr: e, .. } => {
                vec![e]
            }
            Expr::Lookup { key, .. } => vec![key],
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) | Expr::Arith(_, a, b) => vec![a, b],
            Expr::RegexReplace { expr, replacement, .. } => vec![expr, replacement],
            Expr::In { expr, list, .. } => std::iter::once(&**expr).chain(list).collect(),
            Expr::Case { operand, branches, otherwise } => operand
                .iter()
                .map(|e| &**e)
                .chain(branches.iter().flat_map(|(w, t)| [w, t]))
                .chain(otherwise.iter().map(|e| &**e))
                .collect(),
            Expr::Call { args, .. } | Expr::Array(args) => args.iter().collect(),
        }
    }

    /// Puts the rule's `metadata` value where the rule reads it: it is the same for every
    /// event, so it costs nothing per event.
    pub(crate) fn resolve_metadata(&mut self, metadata: &Value) {
        if let Expr::Field(Field::Metadata) = self {
            *self = Expr::Const(metadata.clone());
            return;
        }
        for child in self.children_mut() {
            child.resolve_metadata(metadata);
        }
    }

    /// The same list as [`Expr::children`], mutably.
    fn children_mut(&mut self) -> Vec<&mut Expr> {
        match self {
            Expr::Const(_)
            | Expr::Field(_)
            | Expr::Payload { .. }
            | Expr::TopicLevel(_)
            | Expr::Item
            | Expr::Undefined
            | Expr::Local(_) => Vec::new(),
            Expr::Get(e, _)
            | Expr::Slice(e, _, _)
            | Expr::Neg(e)
            | Expr::Not(e)
            | Expr::IsNull(e, _)
            | Expr::Matches { expr: e, .. } => {
                vec![e]
            }
            Expr::Lookup { key, .. } => vec![key],
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) | Expr::Arith(_, a, b) => vec![a, b],
            Expr::RegexReplace { expr, replacement, .. } => vec![expr, replacement],
            Expr::In { expr, list, .. } => std::iter::once(&mut **expr).chain(list).collect(),
            Expr::Case { operand, branches, otherwise } => operand
                .iter_mut()
                .map(|e| &mut **e)
                .chain(branches.iter_mut().flat_map(|(w, t)| [w, t]))
                .chain(otherwise.iter_mut().map(|e| &mut **e))
                .collect(),
            Expr::Call { args, .. } | Expr::Array(args) => args.iter_mut().collect(),
        }
    }

    pub(crate) fn eval<'a>(&'a self, env: &Env<'a>) -> EvalResult<'a> {
        let owned = |v: Value| Ok(Cow::Owned(v));
        match self {
            Expr::Const(v) => Ok(Cow::Borrowed(v)),
            Expr::Undefined => Ok(Cow::Borrowed(&NULL)),
            Expr::Item => Ok(Cow::Borrowed(env.item.unwrap_or(&NULL))),
            Expr::Local(i) => Ok(Cow::Borrowed(env.locals.get(*i).unwrap_or(&NULL))),
            Expr::Field(field) => owned(field_value(*field, env.event)),
            Expr::Payload { path, .. } if path.is_empty() => Ok(Cow::Borrowed(env.payload_whole())),
            Expr::Payload { path, slot } => match env.payload.walk(path, *slot) {
                Some(value) => Ok(Cow::Borrowed(value)),
                // Missing, or behind a string holding JSON, which EMQX decodes on the way.
                None => owned(env.payload.walk_decoding(path, *slot).unwrap_or(Value::Null)),
            },
            Expr::Slice(inner, begin, end) => owned(slice(&*inner.eval(env)?, *begin, *end)?),
            Expr::TopicLevel(level) => owned(
                env.event
                    .topic
                    .split('/')
                    .nth(level.saturating_sub(1))
                    .map(|l| Value::Str(l.to_owned()))
                    .unwrap_or(Value::Null),
            ),
            Expr::Get(inner, path) => match inner.eval(env)? {
                Cow::Borrowed(v) => match walk(v, path) {
                    Some(found) => Ok(Cow::Borrowed(found)),
                    None => owned(walk_decoding(v, path).unwrap_or(Value::Null)),
                },
                Cow::Owned(v) => owned(walk_decoding(&v, path).unwrap_or(Value::Null)),
            },
            Expr::Neg(inner) => match &*inner.eval(env)? {
                Value::Null => owned(Value::Null),
                Value::Int(i) => owned(i.checked_neg().map(Value::Int).unwrap_or(Value::Float(-(*i as f64)))),
                Value::Float(f) => owned(Value::Float(-f)),
                other => match number(other) {
                    Some(Num::Int(i)) => {
                        owned(i.checked_neg().map(Value::Int).unwrap_or(Value::Float(-(i as f64))))
                    }
                    Some(Num::Float(f)) => owned(Value::Float(-f)),
                    None => Err(EvalError::new(format!("cannot negate {}", describe(other)))),
                },
            },
            Expr::Not(..) => owned(tri(self.truth(env)?)),
            Expr::And(..) | Expr::Or(..) | Expr::IsNull(..) | Expr::In { .. } | Expr::Matches { .. } => {
                owned(tri(self.truth(env)?))
            }
            Expr::Compare(op, left, right) => {
                let (left, right) = (left.eval(env)?, right.eval(env)?);
                owned(tri(compare(*op, &left, &right)?))
            }
            Expr::Arith(op, left, right) => owned(arith(*op, &*left.eval(env)?, &*right.eval(env)?)?),
            Expr::Case { operand, branches, otherwise } => {
                let operand = operand.as_ref().map(|o| o.eval(env)).transpose()?;
                for (when, then) in branches {
                    let hit = match &operand {
                        Some(operand) => {
                            let candidate = when.eval(env)?;
                            !operand.is_null() && !candidate.is_null() && equal(operand, &candidate)
                        }
                        None => when.truth(env)? == Some(true),
                    };
                    if hit {
                        return then.eval(env);
                    }
                }
                match otherwise {
                    Some(e) => e.eval(env),
                    None => owned(Value::Null),
                }
            }
            Expr::Call { func, args } => {
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    values.push(arg.eval(env)?.into_owned());
                }
                if func.null_in_null_out && values.iter().any(Value::is_null) {
                    return Err(EvalError::new(format!(
                        "{}: an argument is NULL (EMQX fails here too); guard with coalesce(x, default) or \
                         WHERE x IS NOT NULL",
                        func.name
                    )));
                }
                (func.eval)(&values, env).map(Cow::Owned)
            }
            Expr::RegexReplace { expr, regex, replacement } => {
                let (subject, replacement) = (expr.eval(env)?, replacement.eval(env)?);
                if subject.is_null() || replacement.is_null() {
                    return owned(Value::Null);
                }
                let (Some(text), Some(with)) = (text_of(&subject), text_of(&replacement)) else {
                    return Err(EvalError::new(format!(
                        "regex_replace: expected strings, got {} and {}",
                        describe(&subject),
                        describe(&replacement)
                    )));
                };
                let with = crate::functions::translate_replacement(with);
                owned(Value::Str(regex.replace_all(text, with.as_str()).into_owned()))
            }
            Expr::Array(items) => {
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    values.push(item.eval(env)?.into_owned());
                }
                owned(Value::Array(values))
            }
            Expr::Lookup { table, key, field } => {
                let key = key.eval(env)?;
                let key = match &*key {
                    // A JSON null names no row, as a missing key does.
                    Value::Null | Value::JsonNull => return owned(Value::Null),
                    Value::Str(s) => Cow::Borrowed(s.as_str()),
                    other => match other.to_text() {
                        Some(text) if !matches!(other, Value::Array(_) | Value::Object(_)) => text,
                        _ => {
                            return Err(EvalError::new(format!(
                                "lookup key must be a string or number, got {}",
                                describe(other)
                            )));
                        }
                    },
                };
                let Some(row) = table.get(&key) else { return owned(Value::Null) };
                // Borrowed from the table, which the plan owns: enriching copies nothing.
                Ok(Cow::Borrowed(match field {
                    Some(field) => row.get(field).unwrap_or(&NULL),
                    None => row,
                }))
            }
        }
    }

    /// Evaluates in a boolean context: `Some(b)` for TRUE/FALSE, `None` for NULL. Any other
    /// type is an error: WHERE does not guess what `1` or `'yes'` means.
    pub(crate) fn truth(&self, env: &Env<'_>) -> Result<Option<bool>, EvalError> {
        match self {
            Expr::And(left, right) => {
                let left = left.truth(env)?;
                if left == Some(false) {
                    return Ok(Some(false));
                }
                Ok(match (left, right.truth(env)?) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                })
            }
            Expr::Or(left, right) => {
                let left = left.truth(env)?;
                if left == Some(true) {
                    return Ok(Some(true));
                }
                Ok(match (left, right.truth(env)?) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                })
            }
            // EMQX: `not` of anything that is not a boolean is false (a JSON null, a number).
            Expr::Not(inner) => Ok(Some(match &**inner {
                Expr::And(..)
                | Expr::Or(..)
                | Expr::Not(..)
                | Expr::IsNull(..)
                | Expr::Compare(..)
                | Expr::In { .. }
                | Expr::Matches { .. } => inner.truth(env)? == Some(false),
                value => matches!(*value.eval(env)?, Value::Bool(false)),
            })),
            Expr::IsNull(inner, negated) => Ok(Some(inner.eval(env)?.is_null() != *negated)),
            Expr::Compare(op, left, right) => compare(*op, &*left.eval(env)?, &*right.eval(env)?),
            // EMQX: `lists:member`, so NULL is in a list that holds NULL, and never NULL.
            Expr::In { expr, list, negated } => {
                let needle = expr.eval(env)?;
                for item in list {
                    let item = item.eval(env)?;
                    let hit = match (needle.is_null(), item.is_null()) {
                        (true, true) => true,
                        (false, false) => equal(&needle, &item),
                        _ => false,
                    };
                    if hit {
                        return Ok(Some(!negated));
                    }
                }
                Ok(Some(*negated))
            }
            Expr::Matches { expr, regex, negated } => {
                let subject = expr.eval(env)?;
                match text_of(&subject) {
                    None if subject.is_null() => Ok(None),
                    None => Err(EvalError::new(format!(
                        "pattern match needs a string, got {}",
                        describe(&subject)
                    ))),
                    Some(text) => Ok(Some(regex.is_match(text) != *negated)),
                }
            }
            other => match &*other.eval(env)? {
                Value::Bool(b) => Ok(Some(*b)),
                Value::Null => Ok(None),
                v => Err(EvalError::new(format!("expected a boolean condition, got {}", describe(v)))),
            },
        }
    }
}

/// A NULL to borrow where a value is missing.
pub(crate) static NULL: Value = Value::Null;

fn tri(b: Option<bool>) -> Value {
    b.map(Value::Bool).unwrap_or(Value::Null)
}

pub(crate) fn field_value(field: Field, event: &crate::EventContext<'_>) -> Value {
    let opt = |s: Option<&str>| s.map(|s| Value::Str(s.to_owned())).unwrap_or(Value::Null);
    match field {
        // A client event has no topic, QoS or flags (EMQX gives none).
        Field::Topic | Field::Qos | Field::Flags if crate::events::lacks_message(event.lifecycle) => {
            Value::Null
        }
        Field::Topic => Value::Str(event.topic.to_owned()),
        Field::ClientId => opt(event.clientid),
        Field::Username => opt(event.username),
        Field::Qos => Value::Int(i64::from(event.qos)),
        Field::Timestamp => Value::from_meta_u64(event.timestamp_ms),
        Field::EventId => Value::from_meta_u64(event.event_id),
        Field::Hops => Value::Int(i64::from(event.hops)),
        Field::PeerHost => opt(event.peerhost),
        Field::Flags => Value::Object(vec![
            ("retain".to_owned(), Value::Bool(event.retain)),
            ("dup".to_owned(), Value::Bool(event.dup)),
        ]),
        Field::PubProps => event.pub_props.map(pub_props_value).unwrap_or_else(|| Value::Object(Vec::new())),
        Field::Event(field) => crate::events::field_value(field, event.lifecycle),
        Field::Metadata => Value::Null,
    }
}

/// `pub_props` as EMQX shows it to rules: only the properties sent, 'User-Property' as a
/// map (the last value of a repeated name wins) and 'User-Property-Pairs' as the list sent.
fn pub_props_value(props: &crate::PubProps) -> Value {
    let mut map = Vec::new();
    let text = |s: &str| Value::Str(s.to_owned());
    if let Some(n) = props.payload_format_indicator {
        map.push(("Payload-Format-Indicator".to_owned(), Value::Int(i64::from(n))));
    }
    if let Some(n) = props.message_expiry_interval {
        map.push(("Message-Expiry-Interval".to_owned(), Value::Int(i64::from(n))));
    }
    if let Some(t) = &props.content_type {
        map.push(("Content-Type".to_owned(), text(t)));
    }
    if let Some(t) = &props.response_topic {
        map.push(("Response-Topic".to_owned(), text(t)));
    }
    if let Some(data) = &props.correlation_data {
        map.push(("Correlation-Data".to_owned(), Value::Bytes(data.clone())));
    }
    if !props.user_properties.is_empty() {
        let mut users = Value::Object(Vec::new());
        for (name, value) in &props.user_properties {
            users.insert(name, text(value));
        }
        let pairs = props
            .user_properties
            .iter()
            .map(|(k, v)| Value::Object(vec![("key".to_owned(), text(k)), ("value".to_owned(), text(v))]))
            .collect();
        map.push(("User-Property".to_owned(), users));
        map.push(("User-Property-Pairs".to_owned(), Value::Array(pairs)));
    }
    Value::Object(map)
}

pub(crate) fn walk<'v>(mut value: &'v Value, path: &[PathSeg]) -> Option<&'v Value> {
    for seg in path {
        value = match seg {
            PathSeg::Key(key) => value.get(key)?,
            PathSeg::Index(index) => value.index(*index)?,
        };
    }
    Some(value)
}

/// Like [`walk`], but a string met before the path ends is decoded as JSON and walked into,
/// as EMQX's `general_find` does; a string that is not JSON ends the walk (NULL).
pub(crate) fn walk_decoding(value: &Value, path: &[PathSeg]) -> Option<Value> {
    let mut current = value;
    for (at, seg) in path.iter().enumerate() {
        if let Value::Str(text) = current {
            let decoded = Value::from_json(text.as_bytes()).ok()?;
            // A JSON string holding JSON text is decoded again, as EMQX would; each
            // round shortens the text, so this ends.
            return walk_decoding(&decoded, path.get(at..)?);
        }
        current = match seg {
            PathSeg::Key(key) => current.get(key)?,
            PathSeg::Index(index) => current.index(*index)?,
        };
    }
    Some(current.clone())
}

/// EMQX's `range_get`: elements `begin` to `end` of an array (1-based; negative counts from
/// the end). Not an array, or bounds outside it, fail as in EMQX (`lists:sublist`).
pub(crate) fn slice(value: &Value, begin: i64, end: i64) -> Result<Value, EvalError> {
    let Value::Array(items) = value else {
        return Err(EvalError::new(format!("range [{begin}..{end}] of {}: not an array", describe(value))));
    };
    let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
    let at = |i: i64| if i < 0 { len.saturating_add(i).saturating_add(1) } else { i };
    let (first, last) = (at(begin), at(end));
    let count = last.saturating_sub(first).saturating_add(1);
    if first < 1 || first > len.saturating_add(1) || count < 0 {
        return Err(EvalError::new(format!("range [{begin}..{end}] outside an array of {len} elements")));
    }
    let skip = usize::try_from(first - 1).unwrap_or(usize::MAX);
    let take = usize::try_from(count).unwrap_or(0);
    Ok(Value::Array(items.iter().skip(skip).take(take).cloned().collect()))
}

/// "string 'abc'", "integer 3", "object" — for error messages; long values are cut.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null | Value::JsonNull | Value::Array(_) | Value::Object(_) | Value::Bytes(_) => {
            value.type_name().to_owned()
        }
        other => {
            let mut text = other.to_string();
            if text.len() > 40 {
                let cut = (0..=37).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                text.truncate(cut);
                text.push_str("...");
            }
            format!("{} {text}", other.type_name())
        }
    }
}

/// The text of a string or of UTF-8 bytes.
pub(crate) fn text_of(value: &Value) -> Option<&str> {
    match value {
        Value::Str(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub(crate) fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// A number, or a string spelling one (`"42"`, `"-1.5e3"`; no `inf`/`nan`, no spaces).
pub(crate) fn number(value: &Value) -> Option<Num> {
    match value {
        Value::Int(i) => Some(Num::Int(*i)),
        Value::Float(f) => Some(Num::Float(*f)),
        Value::Str(_) | Value::Bytes(_) => parse_number(text_of(value)?),
        _ => None,
    }
}

pub(crate) fn parse_number(text: &str) -> Option<Num> {
    if text.is_empty()
        || !text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return None;
    }
    if let Ok(i) = text.parse::<i64>() {
        return Some(Num::Int(i));
    }
    text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Num::Float)
}

fn compare_nums(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
        (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
    }
}

/// Equality for `=`, IN and CASE. Both sides are non-NULL.
pub(crate) fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(_) | Value::Float(_), _) | (_, Value::Int(_) | Value::Float(_)) => {
            match (number(a), number(b)) {
                (Some(x), Some(y)) => compare_nums(x, y) == Some(Ordering::Equal),
                _ => false,
            }
        }
        (Value::Bool(x), Value::Str(s)) | (Value::Str(s), Value::Bool(x)) => {
            s == if *x { "true" } else { "false" }
        }
        // EMQX compares an atom with a binary as the atom's text: `null = 'null'` is TRUE.
        (Value::JsonNull, Value::Str(s)) | (Value::Str(s), Value::JsonNull) => s == "null",
        (Value::Str(_) | Value::Bytes(_), Value::Str(_) | Value::Bytes(_)) => {
            match (text_of(a), text_of(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            }
        }
        // Erlang's `==` inside lists and maps: `[1] = [1.0]` is TRUE.
        (Value::Array(_) | Value::Object(_), _) | (_, Value::Array(_) | Value::Object(_)) => {
            term_order(a, b) == Some(Ordering::Equal)
        }
        _ => a == b,
    }
}

/// Ordering for `<`, `>`, `greatest`, `least`. Both sides are non-NULL.
pub(crate) fn order(a: &Value, b: &Value) -> Result<Ordering, EvalError> {
    let mismatch = || EvalError::new(format!("cannot compare {} with {}", describe(a), describe(b)));
    match (a, b) {
        (Value::JsonNull, _) => json_null_order(b).ok_or_else(mismatch),
        (_, Value::JsonNull) => json_null_order(a).map(Ordering::reverse).ok_or_else(mismatch),
        (Value::Str(x), Value::Str(y)) => Ok(x.cmp(y)),
        (
            Value::Int(_) | Value::Float(_) | Value::Str(_),
            Value::Int(_) | Value::Float(_) | Value::Str(_),
        ) => match (number(a), number(b)) {
            (Some(x), Some(y)) => compare_nums(x, y).ok_or_else(mismatch),
            _ => Err(mismatch()),
        },
        // EMQX compares an atom with a binary as the atom's text.
        (Value::Bool(x), Value::Str(_) | Value::Bytes(_)) => Ok(atom_name(*x).as_bytes().cmp(binary(b))),
        (Value::Str(_) | Value::Bytes(_), Value::Bool(y)) => Ok(binary(a).cmp(atom_name(*y).as_bytes())),
        // Whatever EMQX's `compare/3` does not convert, Erlang orders by its term order.
        _ => term_order(a, b).ok_or_else(mismatch),
    }
}

fn atom_name(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// The bytes of a string or byte string (empty for anything else).
fn binary(value: &Value) -> &[u8] {
    match value {
        Value::Str(s) => s.as_bytes(),
        Value::Bytes(b) => b,
        _ => &[],
    }
}

/// Erlang's term order, which EMQX's comparisons fall back to: number < atom (`false`,
/// `null`, `true`, `undefined`, by name) < map < list < binary. Numbers compare by value,
/// binaries byte by byte, lists element by element (a prefix first), maps by size, then by
/// their keys in order, then by the values in key order. Inside a list or map nothing is
/// converted (`[1] < ['1']`: a number is less than a binary). `None` only for NaN, which
/// rule values do not hold.
fn term_order(a: &Value, b: &Value) -> Option<Ordering> {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Int(_) | Value::Float(_) => 0,
            Value::Null | Value::JsonNull | Value::Bool(_) => 1,
            Value::Object(_) => 2,
            Value::Array(_) => 3,
            Value::Str(_) | Value::Bytes(_) => 4,
        }
    }
    fn atom(v: &Value) -> &'static str {
        match v {
            Value::Bool(b) => atom_name(*b),
            Value::JsonNull => "null",
            _ => "undefined",
        }
    }
    /// A map's entries by key, the last of a duplicated key winning (as `Value::get`).
    fn entries(pairs: &[(String, Value)]) -> Vec<(&str, &Value)> {
        let mut sorted: std::collections::BTreeMap<&str, &Value> = std::collections::BTreeMap::new();
        for (key, value) in pairs {
            sorted.insert(key, value);
        }
        sorted.into_iter().collect()
    }
    match (a, b) {
        _ if rank(a) != rank(b) => Some(rank(a).cmp(&rank(b))),
        (Value::Int(_) | Value::Float(_), _) => compare_nums(number(a)?, number(b)?),
        (Value::Str(_) | Value::Bytes(_), _) => Some(binary(a).cmp(binary(b))),
        (Value::Array(x), Value::Array(y)) => {
            for (x, y) in x.iter().zip(y) {
                match term_order(x, y)? {
                    Ordering::Equal => {}
                    other => return Some(other),
                }
            }
            Some(x.len().cmp(&y.len()))
        }
        (Value::Object(x), Value::Object(y)) => {
            let (x, y) = (entries(x), entries(y));
            if x.len() != y.len() {
                return Some(x.len().cmp(&y.len()));
            }
            for ((kx, _), (ky, _)) in x.iter().zip(&y) {
                match kx.cmp(ky) {
                    Ordering::Equal => {}
                    other => return Some(other),
                }
            }
            for ((_, vx), (_, vy)) in x.iter().zip(&y) {
                match term_order(vx, vy)? {
                    Ordering::Equal => {}
                    other => return Some(other),
                }
            }
            Some(Ordering::Equal)
        }
        _ => Some(atom(a).cmp(atom(b))),
    }
}

/// Where EMQX puts its atom `null` relative to `other` (`emqx_rule_runtime:compare`): a
/// string is compared with the text `null`; otherwise Erlang's term order holds, in which
/// every number is less than an atom, atoms compare by name (`false < null < true`), and an
/// atom is less than a map or a list. So `null > 30` is TRUE in EMQX, and here.
fn json_null_order(other: &Value) -> Option<Ordering> {
    Some(match other {
        Value::JsonNull => Ordering::Equal,
        Value::Int(_) | Value::Float(_) => Ordering::Greater,
        Value::Bool(b) => {
            if *b {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        Value::Str(_) | Value::Bytes(_) => b"null".as_slice().cmp(match other {
            Value::Str(s) => s.as_bytes(),
            Value::Bytes(b) => b.as_slice(),
            _ => return None,
        }),
        Value::Array(_) | Value::Object(_) => Ordering::Less,
        Value::Null => return None,
    })
}

/// A comparison as EMQX makes it (`emqx_rule_runtime:compare`): with one side undefined
/// (NULL) it is FALSE, whatever the operator (`!=` too); with both undefined, `=`, `<=` and
/// `>=` are TRUE and the others FALSE. It never gives NULL; the `Option` is for callers
/// that combine it with other conditions.
pub(crate) fn compare(op: CmpOp, a: &Value, b: &Value) -> Result<Option<bool>, EvalError> {
    match (a.is_null(), b.is_null()) {
        (true, true) => return Ok(Some(matches!(op, CmpOp::Eq | CmpOp::LtEq | CmpOp::GtEq))),
        (true, false) | (false, true) => return Ok(Some(false)),
        (false, false) => {}
    }
    // EMQX converts the string of a string-number comparison with binary_to_integer /
    // binary_to_float, which fails on text that is not a number.
    let numeric = |v: &Value| matches!(v, Value::Int(_) | Value::Float(_));
    let text_not_number = |v: &Value| matches!(v, Value::Str(_) | Value::Bytes(_)) && number(v).is_none();
    if (numeric(a) && text_not_number(b)) || (numeric(b) && text_not_number(a)) {
        return Err(EvalError::new(format!(
            "cannot compare {} with {}: the string is not a number (EMQX fails here too)",
            describe(a),
            describe(b)
        )));
    }
    Ok(Some(match op {
        CmpOp::Eq => equal(a, b),
        CmpOp::NotEq => !equal(a, b),
        CmpOp::Lt => order(a, b)? == Ordering::Less,
        CmpOp::LtEq => order(a, b)? != Ordering::Greater,
        CmpOp::Gt => order(a, b)? == Ordering::Greater,
        CmpOp::GtEq => order(a, b)? != Ordering::Less,
    }))
}

/// Arithmetic as EMQX does it: integers stay integers (overflow falls back to float),
/// `/` always divides as floats, `+` with a string on either side concatenates, and a
/// string is never a number here (EMQX's `is_number` guards). Division or remainder by zero
/// is an error.
pub(crate) fn arith(op: ArithOp, a: &Value, b: &Value) -> Result<Value, EvalError> {
    if a.is_null() || b.is_null() {
        // EMQX's `'+'` concatenates when either side is a string, and writes undefined as
        // `undefined`; every other operator (and `+` on numbers) has no clause for it.
        if let (ArithOp::Add, Value::Str(_) | Value::Bytes(_), _)
        | (ArithOp::Add, _, Value::Str(_) | Value::Bytes(_)) = (op, a, b)
        {
            let text =
                |v: &Value| v.to_text().map(|t| t.into_owned()).unwrap_or_else(|| "undefined".to_owned());
            return Ok(Value::Str(format!("{}{}", text(a), text(b))));
        }
        return Err(EvalError::new(format!(
            "arithmetic on NULL ({} and {}): EMQX fails the rule here too; guard with coalesce(x, 0) or WHERE x IS NOT NULL",
            describe(a),
            describe(b)
        )));
    }
    let text = |v: &Value| matches!(v, Value::Str(_) | Value::Bytes(_));
    // EMQX's `'+'` adds two numbers and otherwise, when either side is a string, concatenates
    // their texts as `str()` writes them: `'1' + 1` is `'11'`, `'a' + null` is `'anull'`.
    if op == ArithOp::Add && (text(a) || text(b)) && !(num_value(a) && num_value(b)) {
        return match (a.to_text(), b.to_text()) {
            (Some(x), Some(y)) => Ok(Value::Str(format!("{x}{y}"))),
            _ => Err(EvalError::new(format!("cannot concatenate {} and {}", describe(a), describe(b)))),
        };
    }
    // Only numbers: EMQX's operators have no clause for a string, even one spelling a number.
    let (Some(x), Some(y)) =
        (num_value(a).then(|| number(a)).flatten(), num_value(b).then(|| number(b)).flatten())
    else {
        let verb = match op {
            ArithOp::Add => "add",
            ArithOp::Sub => "subtract",
            ArithOp::Mul => "multiply",
            ArithOp::Div => "divide",
            ArithOp::Rem => "take the remainder of",
        };
        let spells_number = |v: &Value| text(v) && number(v).is_some();
        let hint = if spells_number(a) || spells_number(b) {
            " (EMQX fails here too: a string is not a number even when it spells one; convert it with float(x) or int(x))"
        } else {
            ""
        };
        return Err(EvalError::new(format!("cannot {verb} {} and {}{hint}", describe(a), describe(b))));
    };
    let float = |f: f64| {
        if f.is_finite() {
            Ok(Value::Float(f))
        } else {
            Err(EvalError::new("arithmetic result is not a finite number"))
        }
    };
    match (op, x, y) {
        (ArithOp::Div | ArithOp::Rem, _, y) if y.as_f64() == 0.0 => Err(EvalError::new("division by zero")),
        (ArithOp::Div, x, y) => float(x.as_f64() / y.as_f64()),
        (op, Num::Int(x), Num::Int(y)) => {
            let exact = match op {
                ArithOp::Add => x.checked_add(y),
                ArithOp::Sub => x.checked_sub(y),
                ArithOp::Mul => x.checked_mul(y),
                _ => x.checked_rem(y),
            };
            match exact {
                Some(i) => Ok(Value::Int(i)),
                None => arith_float(op, x as f64, y as f64).and_then(float),
            }
        }
        (op, x, y) => arith_float(op, x.as_f64(), y.as_f64()).and_then(float),
    }
}

fn num_value(value: &Value) -> bool {
    matches!(value, Value::Int(_) | Value::Float(_))
}

fn arith_float(op: ArithOp, x: f64, y: f64) -> Result<f64, EvalError> {
    Ok(match op {
        ArithOp::Add => x + y,
        ArithOp::Sub => x - y,
        ArithOp::Mul => x * y,
        ArithOp::Div => x / y,
        ArithOp::Rem => x % y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_coerces_numeric_strings_only() {
        assert!(equal(&Value::Int(5), &Value::Str("5".into())));
        assert!(equal(&Value::Int(5), &Value::Float(5.0)));
        assert!(!equal(&Value::Int(5), &Value::Str("five".into())));
        assert!(equal(&Value::Bool(true), &Value::Str("true".into())));
        assert!(order(&Value::Int(5), &Value::Str("five".into())).is_err());
        assert_eq!(order(&Value::Str("10".into()), &Value::Int(9)).unwrap(), Ordering::Greater);
        assert_eq!(order(&Value::Str("10".into()), &Value::Str("9".into())).unwrap(), Ordering::Less);
    }

    fn arb_scalar() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Value::JsonNull),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (-1e6f64..1e6).prop_map(Value::Float),
            prop_oneof![Just("null".to_owned()), Just("nul".to_owned()), "[a-z0-9]{0,5}"]
                .prop_map(Value::Str),
            Just(Value::Array(Vec::new())),
            Just(Value::Object(Vec::new())),
        ]
    }

    proptest::proptest! {
        /// The JSON null's place among values is one order: where it compares, swapping the
        /// sides reverses the answer, `=` agrees with the order, and `!=` is `=`'s negation.
        #[test]
        fn json_null_compares_consistently(other in arb_scalar()) {
            let null = Value::JsonNull;
            if let (Ok(ab), Ok(ba)) = (order(&null, &other), order(&other, &null)) {
                proptest::prop_assert_eq!(ab, ba.reverse());
                let eq = compare(CmpOp::Eq, &null, &other).unwrap() == Some(true);
                if !matches!(other, Value::Str(_)) || number(&other).is_none() {
                    proptest::prop_assert_eq!(eq, ab == Ordering::Equal, "{:?}", other);
                }
            }
            for (a, b) in [(&null, &other), (&other, &null)] {
                if let (Ok(Some(eq)), Ok(Some(ne))) = (compare(CmpOp::Eq, a, b), compare(CmpOp::NotEq, a, b)) {
                    proptest::prop_assert_eq!(eq, !ne);
                }
                // Against NULL (`undefined`) it is never equal and never ordered.
                proptest::prop_assert_eq!(compare(CmpOp::Eq, a, &Value::Null).unwrap(), Some(false));
                proptest::prop_assert_eq!(compare(CmpOp::Gt, &Value::Null, b).unwrap(), Some(false));
            }
        }
    }

    #[test]
    fn arithmetic_never_overflows() {
        assert_eq!(
            arith(ArithOp::Add, &Value::Int(i64::MAX), &Value::Int(1)).unwrap(),
            Value::Float(i64::MAX as f64 + 1.0)
        );
        assert_eq!(arith(ArithOp::Rem, &Value::Int(i64::MIN), &Value::Int(-1)).unwrap(), Value::Float(-0.0));
        assert!(arith(ArithOp::Div, &Value::Int(1), &Value::Int(0)).is_err());
        assert_eq!(arith(ArithOp::Div, &Value::Int(1), &Value::Int(2)).unwrap(), Value::Float(0.5));
        assert!(arith(ArithOp::Mul, &Value::Float(f64::MAX), &Value::Int(2)).is_err());
    }
}
