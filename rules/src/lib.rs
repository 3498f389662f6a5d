//! Outpost's rule engine: EMQX-style rule SQL over MQTT events.
//!
//! **Architecture Invariant:** this crate is pure. It knows nothing about tokio, sockets,
//! files or the gateway's pipeline; it takes values in and gives values out, so it can be
//! tested exhaustively and can never block or crash the gateway. It never panics on any
//! input: rules text, table text, topics and payloads are all outside input. Three
//! functions EMQX has read the process rather than the event: `random()` and `uuid_v4()`
//! (the OS random source) and `getenv()` (`EMQXVAR_*` variables); nothing else does.
//!
//! ```text
//! rules.toml ──toml──▶ RulesFile ──sqlparser──▶ AST ──compile──▶ RuleSet (plans + TopicIndex)
//!                                                                  │
//! EventContext ──▶ TopicIndex ──▶ matching rules ──▶ WHERE ──▶ SELECT row ──▶ actions ──▶ Vec<Output>
//!                    (payload decoded once, lazily, shared by all rules)
//! ```
//!
//! Per event, the engine copies as little as it can: when the rules read only top-level
//! payload fields, JSON decoding builds just those (numbered at load time, so a rule reads
//! a field by index); output rows borrow their names from the plan and their values from
//! the payload, tables and constants; JSON output is written straight from the row.
//!
//! # API
//! - [`RuleSet::compile`]`(rules_toml, &TableSources) -> Result<RuleSet, RulesError>`;
//!   [`RuleSet::table_files`] lists the table files the caller must read first.
//! - [`RuleSet::evaluate`]`(&EventContext) -> Vec<Output>` (a client event: an
//!   [`EventContext`] with its [`Lifecycle`]; [`RuleSet::event_kinds`] says which to report); [`RuleSet::explain`] returns a
//!   [`Trace`] per matching rule for dry runs (`outpost rules test`).
//! - [`RuleSet::empty`]: no rules, no outputs (the gateway stays a transparent bridge).
//! - [`Table`] parsers for CSV and TOML text; [`Value`], the data model.
//!
//! The language reference (every function, formats, actions, differences from EMQX) is
//! `rules/README.md`.
//!
//! # Layout
//! - [`Topic`], [`TopicFilter`], [`TopicError`]: validated topic names and filters, and filter
//!   matching, from the `outpost-topic` crate the gateway's broker and routes use too.
//! - `config`: the rules file format (serde, `deny_unknown_fields`).
//! - `compile`: SQL → plan; a token pass for EMQX's syntax that sqlparser lacks (`=~`,
//!   infix `div`/`mod`, path `AS` targets, single-quoted FROM), name resolution,
//!   did-you-mean, carets.
//! - `foreach`: `FOREACH ... DO ... INCASE`, one row per array element.
//! - `expr`: the plan ([`expr::Expr`]) and its evaluation; NULL and type rules.
//! - `functions`: the builtin function table; the EMQX families too large for it live in
//!   `functions::text` (sprintf, pad, tokens, unescape, ...), `functions::data` (arrays and
//!   maps) and `functions::bytes` (hashes, compression, bits, base64/hex options).
//! - `index`: the topic trie that picks candidate rules per event.
//! - `events`: EMQX's event topics (`$events/client_connected`, ...) as sources, their
//!   fields, and [`Lifecycle`], the event a broker reports.
//! - `action`: forward/republish/drop/dead_letter, templates (topic, payload, reason) with
//!   `${..}` expressions, output rows and their encoding.
//! - `engine`: [`RuleSet`], running rules on an event, dead letters, hop limit.
//! - `window`: windowed rules (`GROUP BY ..., TUMBLINGWINDOW(ss, 10)`): window specs,
//!   aggregates, the clock-driven engine and its snapshots, the SQL rewrite, and
//!   [`RuleSet::evaluate_windowed`] / [`RuleSet::advance_windows`].
//! - `rbe`: report by exception (`deadband`, `dedupe`, `lag`, `latest`, `changed_col`,
//!   `had_changed`): per-partition state computed before WHERE.
//! - `payload`: the payload decoded once per event and shared: formats, auto-detection,
//!   decoding only the fields the rules read (with a fast JSON scanner).
//! - `table`: enrichment tables from CSV/TOML text.
//! - `time`: calendar arithmetic for the time functions (no clock, no time zones).
//! - `value`: [`Value`] and its JSON/CBOR (de)serialization.
//! - `error`: [`RulesError`] and caret rendering.
//! - `warnings`: [`Warning`]s for rules that load but may not do what was meant (ported
//!   from EMQX): comparisons that never hold, deliberate differences with their rewrites.
//! - `fuzz`: the fuzz targets' entry functions (`rules/fuzz/`), replayed on their corpus by
//!   `tests/fuzz_corpus.rs`; not part of the API.
//! - `compat_tests` (tests only): EMQX compatibility cases, each naming the EMQX test or
//!   function its expected value comes from.

mod action;
mod compile;
mod config;
mod engine;
mod error;
mod events;
pub(crate) mod expr;
mod foreach;
mod functions;
#[doc(hidden)]
pub mod fuzz;
mod index;
mod payload;
mod rbe;
mod table;
mod time;
mod value;
mod warnings;
pub mod window;

#[cfg(test)]
mod compat_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use engine::{DEFAULT_DEAD_LETTER_REASON, Outcome, RuleSet, Trace};
pub use error::{Problem, RulesError, SqlLocation, did_you_mean};
pub use events::{EventKind, EventKinds, Lifecycle};
pub use outpost_topic::{Topic, TopicError, TopicFilter};
pub use table::{Table, TableError, TableSources};
pub use value::Value;
pub use warnings::Warning;

/// One event as a rule sees it. The caller (the gateway's route stage) builds it from the
/// publish it received; nothing here is decoded yet.
#[derive(Debug, Clone, Copy)]
pub struct EventContext<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub clientid: Option<&'a str>,
    pub username: Option<&'a str>,
    pub qos: u8,
    /// Receive time, Unix milliseconds. Also what `now_timestamp()` returns.
    pub timestamp_ms: u64,
    pub event_id: u64,
    /// How many times rules have already republished this event (0 for a sensor's
    /// publish). A republish at `hops >= max_hops` is refused.
    pub hops: u8,
    /// The publisher's IP address as text (EMQX's `peerhost`); `None` for events the
    /// gateway made itself.
    pub peerhost: Option<&'a str>,
    /// The PUBLISH's retain flag.
    pub retain: bool,
    /// The PUBLISH's DUP flag (a QoS 1/2 resend).
    pub dup: bool,
    /// The MQTT 5 publish properties, if the publish carried any a rule can read.
    pub pub_props: Option<&'a PubProps>,
    /// Set for a client event (`$events/client_connected`, ...): only rules reading that
    /// event topic see it, and `topic` is the event topic (for a subscription: its filter;
    /// for a dropped message: the message's topic).
    pub lifecycle: Option<&'a Lifecycle>,
}

impl<'a> EventContext<'a> {
    /// An event with only topic and payload set: no client, QoS 0, no flags or properties.
    pub fn new(topic: &'a str, payload: &'a [u8]) -> EventContext<'a> {
        EventContext {
            topic,
            payload,
            clientid: None,
            username: None,
            qos: 0,
            timestamp_ms: 0,
            event_id: 0,
            hops: 0,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
        }
    }
}

/// The MQTT 5 publish properties a rule reads as `pub_props`, under EMQX's names
/// ('User-Property', 'Content-Type', ...). Topic aliases and subscription identifiers are
/// left out: they describe one hop of the wire, not the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PubProps {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    /// In the order sent; a name may repeat.
    pub user_properties: Vec<(String, String)>,
}

impl PubProps {
    /// Whether there is nothing a rule could read.
    pub fn is_empty(&self) -> bool {
        *self == PubProps::default()
    }
}

/// What the rules want done with an event. Several per event are normal (several rules,
/// several actions each).
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send upstream through the store-and-forward buffer.
    Forward {
        rule: Arc<str>,
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        /// 0 (most urgent) to 9.
        priority: u8,
        ttl: Option<Duration>,
    },
    /// Publish into the local broker; `hops` is the event's hop count plus one and must be
    /// carried to the republished event's [`EventContext::hops`].
    Republish { rule: Arc<str>, topic: String, payload: Vec<u8>, qos: u8, hops: u8 },
    /// A `drop` action ran: the event is consumed on purpose (count it).
    Dropped { rule: Arc<str> },
    /// A republish was refused because the event reached the hop limit (count it).
    LoopPrevented { rule: Arc<str>, topic: String, hops: u8 },
    /// The event goes to the dead-letter store: the rule failed on it (payload not
    /// decodable, type error, bad topic template), or, with `deliberate`, a `dead_letter`
    /// action sent it there with its `reason`. Carries the original topic and payload so it
    /// can be kept or inspected.
    DeadLetter { rule: Arc<str>, reason: String, topic: String, payload: Vec<u8>, deliberate: bool },
}

impl Output {
    /// The rule that produced this output.
    pub fn rule(&self) -> &str {
        match self {
            Output::Forward { rule, .. }
            | Output::Republish { rule, .. }
            | Output::Dropped { rule }
            | Output::LoopPrevented { rule, .. }
            | Output::DeadLetter { rule, .. } => rule,
        }
    }
}

/// How a rule reads the payload (`payload = ".."` in a rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// CBOR if it starts like a CBOR map or array, else JSON if it parses, else raw.
    #[default]
    Auto,
    /// JSON; anything else is a dead letter.
    Json,
    /// CBOR; anything else is a dead letter.
    Cbor,
    /// No decoding: `payload` is the text (or bytes, if not UTF-8).
    Raw,
}

/// How an action encodes its output (`format = ".."` in an action).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// The selected row as a JSON object.
    #[default]
    Json,
    /// The selected row as a CBOR map.
    Cbor,
    /// The original payload bytes, unchanged.
    Raw,
}
