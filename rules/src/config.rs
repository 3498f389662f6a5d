//! The rules file format (TOML), as serde types. Every struct denies unknown fields, so a
//! mistyped key fails compilation instead of being ignored.
//!
//! ```toml
//! max_hops = 3                     # republish loop protection (default 3)
//!
//! [[table]]
//! name = "devices"
//! key = "device"                   # key column (CSV default: the first column)
//! file = "devices.csv"             # text supplied by the caller via TableSources
//!
//! [[rule]]
//! name = "hot"
//! sql = "SELECT ... FROM \"sensors/+/temp\" WHERE ..."
//! payload = "auto"                 # auto | json | cbor | raw
//! max_groups = 10000               # windowed rules: open groups at most
//! event_time = "payload.ts"        # tumbling/hopping windows: event time (Unix ms or RFC 3339)
//! late_tolerance = "5s"            # event time: how late an event may be (default 0s)
//! idle_timeout = "5s"              # event time: quiet this long, the clock runs on (default: late_tolerance, at least 1s)
//! late = "drop"                    # event time: drop | deadletter (late events are counted either way)
//! [[rule.action]]
//! type = "forward"                 # forward | republish | drop | dead_letter
//! topic = "sites/${site}/alerts"
//! qos = 1
//! priority = 2
//! ttl = "1h"
//! format = "json"                  # json | cbor | raw, or instead:
//! # payload = '{"alert":"${site}"}'  # a payload template
//! [[rule.action]]
//! type = "dead_letter"
//! reason = "no reading from ${topic(2)}"   # optional text template
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RulesFile {
    /// A republish is refused (and counted) when the event already went through this many
    /// republishes.
    #[serde(default = "default_max_hops")]
    pub max_hops: u8,
    #[serde(default)]
    pub table: Vec<TableConfig>,
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

fn default_max_hops() -> u8 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableConfig {
    pub name: String,
    /// The key column. Default: the first CSV column, or `key` for TOML rows.
    pub key: Option<String>,
    /// A file whose text the caller supplies through `TableSources::with_text`.
    pub file: Option<String>,
    /// The file's format; default: from the file extension.
    pub format: Option<TableFormat>,
    /// Rows declared inline: `[table.rows.dev-001]` / `site = "a"`.
    pub rows: Option<BTreeMap<String, toml::Table>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TableFormat {
    Csv,
    Toml,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleConfig {
    pub name: String,
    /// Spanned so that errors can point at the rules file's line, not the SQL's.
    pub sql: toml::Spanned<String>,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    #[serde(default)]
    pub payload: crate::PayloadFormat,
    #[serde(default)]
    pub action: Vec<ActionConfig>,
    /// A windowed rule's open groups at most (default `window::DEFAULT_MAX_GROUPS`).
    pub max_groups: Option<std::num::NonZeroUsize>,
    /// A windowed rule's event time: the payload field path holding it (`payload.ts`).
    /// Durations below are text (`"5s"`) so that a bad one is reported with its rule.
    pub event_time: Option<String>,
    pub late_tolerance: Option<String>,
    pub idle_timeout: Option<String>,
    pub late: Option<crate::window::LatePolicy>,
}

fn default_enabled() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum ActionConfig {
    Forward {
        /// Upstream topic template; default: the event's own topic.
        topic: Option<String>,
        #[serde(default = "default_qos")]
        qos: u8,
        /// 0 is the most urgent, 9 the least (as for bridge routes).
        #[serde(default = "default_priority")]
        priority: u8,
        #[serde(default, with = "humantime_serde")]
        ttl: Option<Duration>,
        /// Default `json`; not together with `payload`.
        format: Option<crate::OutputFormat>,
        /// A payload template; not together with `format`.
        payload: Option<String>,
    },
    Republish {
        topic: String,
        #[serde(default = "default_qos")]
        qos: u8,
        format: Option<crate::OutputFormat>,
        payload: Option<String>,
    },
    Drop {},
    /// The event goes to the dead-letter store on purpose.
    #[serde(rename = "dead_letter")]
    DeadLetter {
        /// A text template; default: says which rule sent it.
        reason: Option<String>,
    },
}

fn default_qos() -> u8 {
    1
}

fn default_priority() -> u8 {
    5
}
