//! The gateway's typed configuration.
//!
//! Every struct denies unknown keys, so a typo fails start-up instead of silently falling back
//! to a default. Durations and sizes are written in human units (`"500ms"`, `"64MiB"`). The
//! whole config is validated once, by [`GatewayConfig::load`] / [`GatewayConfig::validate`];
//! after that the pipeline trusts it. Keys that were removed are refused with an error that
//! says what replaced them, rather than as unknown.

pub mod http;
pub mod tls;
pub mod upstream_tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use outpost_rules::TopicFilter;
use serde::de::IntoDeserializer;
use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};

use crate::mqtt::topic::TopicPolicy;

/// Everything that can be wrong with a configuration. Each message names the file (when
/// there is one), the line, the key, the bad value and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source} (pass an existing file with --config, or omit --config to use the built-in defaults)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {}`{key}` = {value:?} is invalid: {reason}", position.map(|(line, column)| format!("line {line}, column {column}: ")).unwrap_or_default())]
    Invalid { origin: String, position: Option<(usize, usize)>, key: String, value: String, reason: String },
}

/// Every problem found in one configuration, in file order; never empty. One problem a line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// The whole configuration of one gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the durable buffer and other state live. Must be on persistent storage.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A rules file; without one the gateway is a transparent bridge.
    #[serde(default)]
    pub rules: Option<PathBuf>,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Routes used while no rules file is given: which local topics go upstream, and with
    /// what priority and time-to-live. Empty means one route for every topic (`#`).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// How long a graceful stop may take before the process exits anyway. Committed events
    /// are safe regardless; this bounds how long in-flight upstream acks are awaited.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The operations endpoint (`/metrics`, `/health/*`, `/status`); off without the table.
    #[serde(default)]
    pub http: Option<http::HttpConfig>,
    /// While events arrive often, the runtime thread waits this long before it sleeps, so
    /// that the events of that interval share one wake-up (interrupt moderation), unless
    /// waiting is measured to slow a client down (`coalesce`). Zero: off. Read at start-up only.
    #[serde(default = "default_wakeup_coalescing", with = "humantime_serde")]
    pub wakeup_coalescing: Duration,
}

/// The embedded MQTT broker that sensors connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The MQTT 3.1.1 listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// An optional second listener. Both listeners speak MQTT 3.1.1 and 5 (the version is
    /// read from each CONNECT); this one exists for deployments that give MQTT 5 its own port.
    #[serde(default)]
    pub listen_v5: Option<SocketAddr>,
    /// When a sensor's QoS 1/2 publish is acknowledged.
    #[serde(default)]
    pub ack: AckMode,
    /// Sensor credentials in clear text, `username = "password"`: for tests only, refused
    /// unless `allow_plaintext_passwords = true`. Sites use `password_file`.
    #[serde(default)]
    pub users: std::collections::BTreeMap<String, String>,
    /// Lets `users` hold clear-text passwords. Off by default: a config file is copied, backed
    /// up and shown around far more than a password file, and a leaked one would hand out
    /// every sensor's password.
    #[serde(default)]
    pub allow_plaintext_passwords: bool,
    /// Mosquitto's password file (`username:hash` lines, `$7$` PBKDF2-SHA512 or `$6$`
    /// SHA-512 hashes): an existing `mosquitto_passwd` file works unchanged; `outpost passwd
    /// FILE USER` adds or changes users. Re-read on SIGHUP (an invalid file is refused and the
    /// one in force stays).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Mosquitto's ACL file (`topic`, `user`, `pattern` lines; see the README's "Users and
    /// ACLs"): without it any client may publish and subscribe anywhere. Enforced on every
    /// publish, subscription, delivery (retained ones included) and will; rule republishes are
    /// trusted. Re-read on SIGHUP like `password_file`.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// Whether clients may connect without a username. Default: false when a password file
    /// (or `users`) is configured — a site that sets up passwords means every sensor to use
    /// one, and an anonymous client would get past them — and true otherwise, since without
    /// passwords every client is anonymous. Set it to true to let, say, a local dashboard in
    /// without credentials (the ACL's anonymous entries then say what it may do).
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// The TLS listener (`[broker.tls]`); none without the table.
    #[serde(default)]
    pub tls: Option<tls::TlsConfig>,
    /// Publishes per second one connection may send (token bucket, a second's worth of
    /// burst); beyond it Outpost stops reading that connection's socket until the bucket
    /// refills, so TCP slows the sensor down and nothing is dropped (counted
    /// `publish_rate_limited`). Unlimited when absent.
    #[serde(default)]
    pub max_publish_rate: Option<NonZeroU32>,
    /// Publish bytes (topic + payload) per second one connection may send, enforced like
    /// `max_publish_rate`. Unlimited when absent.
    #[serde(default)]
    pub max_publish_bytes_rate: Option<ByteSize>,
    /// Topic filters one client's session may hold; a SUBSCRIBE beyond it is refused
    /// (SUBACK 0x80 / 0x97).
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: NonZeroUsize,
    /// How often `$SYS/outpost/…` status topics are refreshed.
    #[serde(default = "default_sys_interval", with = "humantime_serde")]
    pub sys_interval: Duration,
    /// Retained topics held at most; retained publishes for new topics beyond it are not kept.
    #[serde(default = "default_max_retained")]
    pub max_retained: usize,
    /// Bytes (topics + payloads) retained messages may hold in all.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: ByteSize,
    #[serde(default = "default_max_connections")]
    pub max_connections: NonZeroUsize,
    /// Connections one source address may hold at once. Unset, only `max_connections` bounds
    /// them; set it where sensors have addresses of their own (not behind one NAT), so that one
    /// host cannot take every slot.
    #[serde(default)]
    pub max_connections_per_address: Option<NonZeroUsize>,
    /// The largest PUBLISH payload a sensor may send; larger packets close the connection.
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// How long a new TCP connection may take to send its CONNECT.
    #[serde(default = "default_connection_timeout", with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// The longest keepalive (seconds) an MQTT 5 client may use: one asking for more, or for
    /// none (0), gets this value as CONNACK's server keep alive and must use it (mosquitto's
    /// `max_keepalive`). Unset: every client's own keepalive is accepted. MQTT 3.1.1 has no
    /// way to say it, so 3.1.1 clients keep theirs.
    #[serde(default)]
    pub max_keepalive: Option<std::num::NonZeroU16>,
    /// Topics with more levels are refused at ingest (MQTT 5: PUBACK 0x90; 3.1.1: the
    /// connection is closed, as mosquitto does). The default is EMQX's; mosquitto takes 201.
    /// Set it to the upstream broker's limit: a topic it refuses would cost that event.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Topics longer than this (bytes) are refused at ingest, like `max_topic_levels`.
    #[serde(default = "default_max_topic_length")]
    pub max_topic_length: usize,
    /// Deliveries queued per local session (connected or offline) at most. A connected
    /// subscriber whose queue is full slows its publishers down briefly, then misses
    /// deliveries (counted `local_dropped`); an offline persistent session misses QoS ≥ 1
    /// deliveries beyond it (QoS 0 is not queued offline).
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: NonZeroUsize,
    /// Persistent sessions (3.1.1 clean session 0, MQTT 5 session expiry > 0) kept while their
    /// client is offline, at most; beyond it the one offline longest is ended (counted
    /// `sessions_evicted`).
    #[serde(default = "default_max_offline_sessions")]
    pub max_offline_sessions: usize,
    /// Removed with rumqttd's router (refused with an error that says so).
    #[serde(default)]
    pub ring_segment_size: Option<toml::Value>,
    /// Removed with rumqttd's router (refused with an error that says so).
    #[serde(default)]
    pub ring_segments: Option<toml::Value>,
}

/// The upstream MQTT broker that events are relayed to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (verified against the system's roots
    /// unless `[upstream.tls]` says otherwise): the one endpoint. Give either `url` or `urls`; use
    /// [`UpstreamConfig::endpoints`] to read them.
    #[serde(default)]
    pub url: Option<UpstreamUrl>,
    /// Several endpoints of one upstream (the nodes of a cluster), the preferred first: tried
    /// in order, the next one when the link is lost, back to the first once it has answered
    /// probes for `failback_after`.
    #[serde(default)]
    pub urls: Vec<UpstreamUrl>,
    /// How long the preferred endpoint must have answered a probe (TCP, CONNECT, CONNACK)
    /// without a failure before the link leaves another endpoint for it.
    #[serde(default = "default_failback_after", with = "humantime_serde")]
    pub failback_after: Duration,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (its first line), read at every connect so a rotated
    /// password needs no restart, and kept out of the config file. Relative paths are resolved
    /// from the config file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How an `mqtts://` upstream is verified, and the client certificate for mutual TLS.
    #[serde(default)]
    pub tls: Option<upstream_tls::UpstreamTlsConfig>,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// How long to wait for TCP connect plus CONNACK before giving up on an attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Prepended to every upstream topic, e.g. `"site-7/"`.
    #[serde(default)]
    pub topic_prefix: String,
    /// How many publishes may await their PUBACK at once (MQTT receive maximum, ≤ 65535).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// The largest packet the upstream accepts. An MQTT 5 upstream announces its own; an MQTT
    /// 3.1.1 one cannot, and if it drops the connection over a larger packet (mosquitto's
    /// `max_packet_size`, cloud brokers' message size limits) that event costs
    /// `poison_after` reconnects before it is dead-lettered. Larger events are counted
    /// `upstream_rejected` and skipped at once.
    #[serde(default)]
    pub max_packet_size: Option<ByteSize>,
    /// When the upstream closes the link right after the same event this many times in a row,
    /// that event goes to the dead-letter store and the link moves on (see ARCHITECTURE.md).
    #[serde(default = "default_poison_after")]
    pub poison_after: u32,
    /// Optional caps for metered links.
    #[serde(default)]
    pub max_events_per_sec: Option<NonZeroU32>,
    #[serde(default)]
    pub max_bytes_per_sec: Option<ByteSize>,
    /// The protocol spoken upstream. With MQTT 5 every message carries its stable event id
    /// as the `outpost-event-id` user property.
    #[serde(default)]
    pub mqtt_version: MqttVersion,
    /// Whether the payload is also wrapped in a JSON envelope with the event id.
    #[serde(default)]
    pub event_id: EventIdMode,
    /// `[[upstream.subscribe]]`: commands from the cloud, delivered into the local broker and
    /// the rules over a second upstream connection with a persistent session (see the README's
    /// "Commands from the cloud"). Empty: the uplink only sends.
    #[serde(default)]
    pub subscribe: Vec<SubscribeConfig>,
    /// The inbound connection's client id; default `<client_id>-in`. It must differ from
    /// `client_id`, or each connection would take the other over.
    #[serde(default)]
    pub inbound_client_id: Option<String>,
    /// How long the upstream keeps the inbound session (and the commands queued in it) while
    /// the link is down. MQTT 5 only: an MQTT 3.1.1 session (clean session 0) is kept for as
    /// long as the upstream broker's own policy says (mosquitto: `persistent_client_expiration`).
    #[serde(default = "default_inbound_session_expiry", with = "humantime_serde")]
    pub inbound_session_expiry: Duration,
    /// The username the ACL (`broker.acl_file`) checks inbound commands under: the mapped local
    /// topic must be writable by this user's entries (and its `pattern`s, `%c` being the
    /// inbound client id). Without an ACL file every mapped topic is allowed.
    #[serde(default = "default_inbound_acl_user")]
    pub inbound_acl_user: String,
}

/// One `[[upstream.subscribe]]` entry: an upstream filter, and how the topics it matches map
/// to local topics: `strip_prefix` is removed, then `local_prefix` is put in front
/// (both: the prefix is replaced).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeConfig {
    /// The upstream topic filter, e.g. `"cloud/site-7/cmd/#"`.
    #[serde(deserialize_with = "deserialize_filter")]
    pub filter: TopicFilter,
    /// The QoS asked for: 1 (the default: each command acknowledged upstream only once the
    /// local broker took it) or 0.
    #[serde(default = "default_subscribe_qos")]
    pub qos: u8,
    /// Removed from the front of every upstream topic; a topic that does not start with it
    /// is refused (counted `inbound_refused_mapping`). Must be a plain start of `filter`.
    #[serde(default)]
    pub strip_prefix: String,
    /// Put in front of what is left, e.g. `"cmd/"`.
    #[serde(default)]
    pub local_prefix: String,
}

impl SubscribeConfig {
    /// The local topic for an upstream topic this entry's filter matched, or why there is none.
    pub fn local_topic(&self, upstream: &str) -> Result<String, &'static str> {
        let rest =
            upstream.strip_prefix(self.strip_prefix.as_str()).ok_or("does not start with strip_prefix")?;
        let local = format!("{}{rest}", self.local_prefix);
        if local.is_empty() {
            return Err("maps to an empty topic");
        }
        if local.starts_with('$') {
            return Err("maps to a `$` topic, which only the broker itself may publish");
        }
        Ok(local)
    }
}

/// The MQTT protocol version of the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum MqttVersion {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// How the event id is attached to upstream messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventIdMode {
    /// The payload goes upstream unchanged; no id is attached.
    #[default]
    None,
    /// The payload is wrapped: `{"id":"<16 hex>","ts":<enqueue ms>,"payload":<…>}`, the payload
    /// as JSON when it parses as JSON, else as a string (its text, or hex when not UTF-8).
    Envelope,
}

/// The durable store-and-forward buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// At most this many events are kept; beyond it `overflow` decides.
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// At most this many bytes of events (topic + payload + record overhead) are kept.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// The shortest time an accepted event waits for its upstream PUBACK before it is
    /// committed to disk. On a slow link the wait follows the measured upstream round trip
    /// (twice the smoothed RTT on top of this), up to `max_ack_delay`.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// The longest an accepted event waits in memory for its upstream PUBACK before it is
    /// committed, and so the longest a sensor's PUBACK waits (plus one fsync). Longer means
    /// fewer, larger commits (less flash wear) on slow links and during outages, and a
    /// longer crash window of events acknowledged to nobody yet. Unset: 250 ms, or
    /// `commit_interval` if that is longer (see [`BufferConfig::max_ack_delay`]).
    /// It is also the least time between two checkpoints of the rules' window and
    /// report-by-exception state, so a reading a stateful rule took in is acknowledged
    /// within about this plus one fsync too.
    #[serde(default, with = "humantime_serde")]
    pub max_ack_delay: Option<Duration>,
    /// A commit starts at once when this many events wait to be written. Together with
    /// `commit_interval` it bounds the events that are accepted but not yet on disk.
    #[serde(default = "default_commit_max_events")]
    pub commit_max_events: NonZeroUsize,
}

/// When a sensor's QoS 1/2 publish is acknowledged (PUBACK, or PUBREC for QoS 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Once the event is committed to the buffer or acknowledged upstream: a PUBACK means the
    /// event survives a crash or power cut.
    #[default]
    AfterCommit,
    /// As soon as the publish is read: lower latency, but events acknowledged in the last
    /// moments before a crash are lost.
    OnReceipt,
}

/// What happens when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Drop the oldest event of the lowest priority to make room (counted, logged).
    #[default]
    DropOldest,
    /// Refuse the new event (counted, logged).
    RejectNew,
}

/// A bridge route: local topics matching `filter` go upstream with these properties.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(deserialize_with = "deserialize_filter")]
    pub filter: TopicFilter,
    /// 0 is the most urgent, 9 the least. Priorities share the uplink by weighted round
    /// robin (weight 10 − priority), so none starves.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Events older than this are discarded instead of being sent.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outpost=debug,info`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A validated `mqtt://host:port` or `mqtts://host:port` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: the connection is TLS.
    pub tls: bool,
}

impl UpstreamUrl {
    /// A plain `mqtt://` address.
    pub fn plain(host: impl Into<String>, port: u16) -> UpstreamUrl {
        UpstreamUrl { host: host.into(), port, tls: false }
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<UpstreamUrl, String> {
        let url = url::Url::parse(s)
            .map_err(|e| format!("{e}; expected mqtt://host:port, e.g. mqtt://10.0.0.5:1883"))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(format!(
                    "unknown scheme `{other}`; expected mqtt://host:port or mqtts://host:port"
                ));
            }
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("no host; expected mqtt://host:port")?;
        if url.path() != "" && url.path() != "/" {
            return Err(format!("unexpected path `{}`; expected mqtt://host:port", url.path()));
        }
        Ok(UpstreamUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
        })
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UpstreamUrl, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: String| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

fn deserialize_filter<'de, D: Deserializer<'de>>(d: D) -> Result<TopicFilter, D::Error> {
    let s = String::deserialize(d)?;
    TopicFilter::new(s).map_err(serde::de::Error::custom)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./outpost-data")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
/// Measured at 1k, 2k and 10k events/s from 100 and 1,000 sensors: 10 ms halves the CPU per
/// event at 1-2k/s (README, "At low rates"); 2 ms saved too little, longer adds latency.
fn default_wakeup_coalescing() -> Duration {
    Duration::from_millis(10)
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1883))
}
fn default_max_connections() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero literal")
}
fn default_sys_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retained() -> usize {
    10_000
}
fn default_max_retained_bytes() -> ByteSize {
    ByteSize::mib(64)
}
fn default_max_payload() -> ByteSize {
    ByteSize::kib(256)
}
fn default_connection_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_subscriptions() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero literal")
}
fn default_max_queued_messages() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero literal")
}
fn default_max_offline_sessions() -> usize {
    1000
}
fn default_client_id() -> String {
    "outpost".to_owned()
}
fn default_inbound_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_inbound_acl_user() -> String {
    "outpost-inbound".to_owned()
}
fn default_subscribe_qos() -> u8 {
    1
}
fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(50)
}
/// Bounds how late the first delivery after an upstream outage can be: with jitter a retry
/// comes every 0.25–0.5 s. A refused or unanswered attempt costs one TCP handshake.
fn default_reconnect_max() -> Duration {
    Duration::from_millis(500)
}
/// Long enough that a node restarting in a rolling upgrade is not chosen between its listener
/// opening and its cluster catching up; short enough to spread load back within minutes.
fn default_failback_after() -> Duration {
    Duration::from_secs(60)
}
/// The send window must cover rate × round trip, or events queue behind it: at 2k events/s a
/// 150 ms round trip needs 300 in flight (measured with 100: 650 delivered/s, every event
/// committed). 1,000 also drains a backlog to a local mosquitto at ≥ 100k events/s where 100
/// gave 89.5k/s (README "Buffer and relay"). An MQTT 5 upstream's receive maximum still
/// lowers it; an MQTT 3.1.1 upstream cannot announce one, so set it lower where the upstream
/// documents a smaller limit.
fn default_inflight() -> u16 {
    1000
}
fn default_max_topic_levels() -> usize {
    128
}
fn default_max_topic_length() -> usize {
    65_535
}
fn default_poison_after() -> u32 {
    3
}
fn default_max_events() -> u64 {
    10_000_000
}
fn default_max_bytes() -> ByteSize {
    ByteSize::gib(2)
}
/// Measured (`cargo bench -p outpost --bench buffer`): a redb commit costs a fixed ~37 KB of
/// writes plus ~320 B per 200-byte event, so during an outage at 10k events/s, 25 ms batches
/// (~250 events) write ~2.4× the payload where 10 ms batches wrote ~3.5×. With a healthy
/// uplink nearly every event is acknowledged long before 25 ms and never written.
fn default_commit_interval() -> Duration {
    Duration::from_millis(25)
}
/// Measured (`outpost-sim ingest-bench --wan`, README "Flash wear on a slow uplink"): at 2k
/// events/s a 150 ms round trip needs a wait above it so that PUBACKs arrive before commits,
/// and an outage needs commits of a few hundred events to stay near 2× the payload written;
/// 250 ms gives both while keeping the sensors' PUBACK p99 under 300 ms.
fn default_max_ack_delay() -> Duration {
    Duration::from_millis(250)
}
fn default_commit_max_events() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero literal")
}
fn default_priority() -> u8 {
    5
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            listen: default_listen(),
            listen_v5: None,
            ack: AckMode::default(),
            users: std::collections::BTreeMap::new(),
            allow_plaintext_passwords: false,
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            tls: None,
            max_publish_rate: None,
            max_publish_bytes_rate: None,
            max_subscriptions: default_max_subscriptions(),
            sys_interval: default_sys_interval(),
            max_retained: default_max_retained(),
            max_retained_bytes: default_max_retained_bytes(),
            max_connections: default_max_connections(),
            max_connections_per_address: None,
            max_payload: default_max_payload(),
            connection_timeout: default_connection_timeout(),
            max_keepalive: None,
            max_topic_levels: default_max_topic_levels(),
            max_topic_length: default_max_topic_length(),
            max_queued_messages: default_max_queued_messages(),
            max_offline_sessions: default_max_offline_sessions(),
            ring_segment_size: None,
            ring_segments: None,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> BufferConfig {
        BufferConfig {
            max_events: default_max_events(),
            max_bytes: default_max_bytes(),
            overflow: OverflowPolicy::default(),
            commit_interval: default_commit_interval(),
            max_ack_delay: None,
            commit_max_events: default_commit_max_events(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig { format: LogFormat::default(), level: default_log_level() }
    }
}

impl Default for GatewayConfig {
    fn default() -> GatewayConfig {
        GatewayConfig {
            data_dir: default_data_dir(),
            rules: None,
            broker: BrokerConfig::default(),
            upstream: None,
            buffer: BufferConfig::default(),
            routes: Vec::new(),
            log: LogConfig::default(),
            shutdown_timeout: default_shutdown_timeout(),
            http: None,
            wakeup_coalescing: default_wakeup_coalescing(),
        }
    }
}

/// Per-device values given on the command line or in the environment; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub upstream: Option<UpstreamUrl>,
    pub data_dir: Option<PathBuf>,
    pub rules: Option<PathBuf>,
}

impl GatewayConfig {
    /// Reads and validates a config file, or the built-in defaults when `path` is `None`,
    /// then applies `overrides` and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<GatewayConfig, ConfigErrors> {
        match GatewayConfig::load_all(path, overrides) {
            (Some(config), problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(ConfigErrors(problems)),
        }
    }

    /// Like [`GatewayConfig::load`], but goes on after a problem to find every other one
    /// (`outpost check`). The config comes back whenever the file could be parsed at all,
    /// with defaults in place of refused values, so callers can check what it points to.
    /// Paths written in the file are resolved from the file's directory; overrides (flags,
    /// environment) stay relative to the working directory.
    pub fn load_all(path: Option<&Path>, overrides: &Overrides) -> (Option<GatewayConfig>, Vec<ConfigError>) {
        let (mut config, mut problems, mut positions, origin) = match path {
            Some(path) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(source) => return (None, vec![ConfigError::Read { path: path.to_owned(), source }]),
                };
                let parsed = parse_all(&text, path);
                let Some(mut config) = parsed.config else { return (None, parsed.problems) };
                let dir = path.parent().unwrap_or_else(|| Path::new(""));
                // `components` drops the `.` of "./outpost-data" so messages show a plain path.
                let resolve = |path: &Path| dir.join(path).components().collect::<PathBuf>();
                if parsed.positions.contains_key("data_dir") {
                    config.data_dir = resolve(&config.data_dir);
                }
                if parsed.positions.contains_key("rules") {
                    config.rules = config.rules.map(|rules| resolve(&rules));
                }
                for file in [&mut config.broker.password_file, &mut config.broker.acl_file] {
                    *file = file.as_deref().map(resolve);
                }
                if let Some(tls) = &mut config.broker.tls {
                    tls.cert_file = resolve(&tls.cert_file);
                    tls.key_file = resolve(&tls.key_file);
                    tls.ca_file = tls.ca_file.as_deref().map(resolve);
                }
                if let Some(http) = &mut config.http {
                    http.bearer_token_file = http.bearer_token_file.as_deref().map(resolve);
                }
                if let Some(upstream) = &mut config.upstream {
                    upstream.password_file = upstream.password_file.as_deref().map(resolve);
                    if let Some(tls) = &mut upstream.tls {
                        tls.resolve(resolve);
                    }
                }
                (config, parsed.problems, parsed.positions, path.display().to_string())
            }
            None => (GatewayConfig::default(), Vec::new(), BTreeMap::new(), "built-in defaults".to_owned()),
        };
        config.apply(overrides);
        // A value from a flag or the environment has no line in the file.
        for (given, key) in [
            (overrides.listen.is_some(), "broker.listen"),
            (overrides.upstream.is_some(), "upstream.url"),
            (overrides.data_dir.is_some(), "data_dir"),
            (overrides.rules.is_some(), "rules"),
        ] {
            if given {
                positions.remove(key);
            }
        }
        if let Err(ConfigErrors(invalid)) = config.validate(&origin) {
            problems.extend(invalid.into_iter().map(|mut e| {
                if let ConfigError::Invalid { key, position, .. } = &mut e {
                    *position = positions.get(key.as_str()).copied();
                }
                e
            }));
        }
        // The files `[broker]` names are read here, so `outpost check` reports what is wrong
        // inside them too (the broker reads them again when it starts).
        for (key, problem) in config.broker.auth_file_problems() {
            problems.push(ConfigError::Invalid {
                origin: origin.clone(),
                position: positions.get(key).copied(),
                key: key.to_owned(),
                value: problem.0,
                reason: problem.1,
            });
        }
        (Some(config), problems)
    }

    /// Parses TOML text; `path` only names the source in error messages. Reports every
    /// unknown key and every refused value, not just the first.
    pub fn parse(text: &str, path: &Path) -> Result<GatewayConfig, ConfigErrors> {
        match parse_all(text, path) {
            Parsed { config: Some(config), problems, .. } if problems.is_empty() => Ok(config),
            Parsed { problems, .. } => Err(ConfigErrors(problems)),
        }
    }

    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(listen) = overrides.listen {
            self.broker.listen = listen;
        }
        if let Some(url) = &overrides.upstream {
            match &mut self.upstream {
                // A device's own address replaces the file's whole list.
                Some(upstream) => {
                    upstream.url = Some(url.clone());
                    upstream.urls.clear();
                }
                None => {
                    self.upstream = Some(UpstreamConfig::with_url(url.clone()));
                }
            }
        }
        if let Some(dir) = &overrides.data_dir {
            self.data_dir = dir.clone();
        }
        if let Some(rules) = &overrides.rules {
            self.rules = Some(rules.clone());
        }
    }

    /// Checks that span more than one field, or that the types cannot express.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let mut invalid = |key: &str, value: String, reason: &str| {
            problems.push(ConfigError::Invalid {
                origin: origin.to_owned(),
                position: None,
                key: key.to_owned(),
                value,
                reason: reason.to_owned(),
            })
        };
        for (key, value, range) in self.durations() {
            if !(range.min..=range.max).contains(&value) {
                invalid(
                    &key,
                    humantime::format_duration(value).to_string(),
                    &format!(
                        "must be between {} and {}; {}",
                        humantime::format_duration(range.min),
                        humantime::format_duration(range.max),
                        range.why
                    ),
                );
            }
        }
        self.broker.check(&mut invalid);
        if let Some(upstream) = &self.upstream {
            upstream.check(&mut invalid);
            if let Some(tls) = &upstream.tls {
                for (key, value, reason) in tls.problems(upstream.endpoints().iter().any(|u| u.tls)) {
                    invalid(&key, value, &reason);
                }
            }
        }
        self.buffer.check(&mut invalid);
        for (idx, route) in self.routes.iter().enumerate() {
            if route.priority > 9 {
                invalid(
                    &format!("route[{idx}].priority"),
                    route.priority.to_string(),
                    "must be 0 (most urgent) to 9 (least urgent)",
                );
            }
        }
        if let Some(http) = &self.http {
            for (key, value, reason) in http.problems(&self.broker) {
                invalid(&key, value, &reason);
            }
        }
        if let Some(tls) = &self.broker.tls {
            for (key, value, reason) in tls.problems(&self.broker) {
                invalid(&key, value, &reason);
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigErrors(problems)) }
    }
}

/// The values a duration key may take, and why its bounds are where they are.
///
/// Every duration key has one: a duration is added to an `Instant` or turned into a timer, a
/// protocol field or a file timestamp somewhere, and a value like `"500000000y"` (which
/// humantime accepts) would overflow there at run time instead of being refused here.
#[derive(Debug, Clone, Copy)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
    /// What the key does, said after the range in the error.
    pub why: &'static str,
}

const fn range(min: Duration, max: Duration, why: &'static str) -> DurationRange {
    DurationRange { min, max, why }
}

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

impl GatewayConfig {
    /// Every duration key with its value and [`DurationRange`] (`validate` checks them all).
    pub fn durations(&self) -> Vec<(String, Duration, DurationRange)> {
        let mut all = vec![
            (
                "wakeup_coalescing".to_owned(),
                self.wakeup_coalescing,
                range(
                    Duration::ZERO,
                    50 * MS,
                    "how long a busy gateway waits before it sleeps, so that events share a wake-up; every PUBACK and delivery may wait this long",
                ),
            ),
            (
                "shutdown_timeout".to_owned(),
                self.shutdown_timeout,
                range(
                    100 * MS,
                    HOUR,
                    "how long a graceful stop may wait for upstream acknowledgements; keep it below systemd's TimeoutStopSec",
                ),
            ),
            (
                "broker.sys_interval".to_owned(),
                self.broker.sys_interval,
                range(SECOND, DAY, "how often the $SYS/outpost/… topics are refreshed"),
            ),
            (
                "broker.connection_timeout".to_owned(),
                self.broker.connection_timeout,
                range(
                    100 * MS,
                    10 * MINUTE,
                    "how long a new connection may hold a socket before its CONNECT (and TLS handshake); a few seconds is plenty",
                ),
            ),
            (
                "buffer.commit_interval".to_owned(),
                self.buffer.commit_interval,
                range(MS, 10 * SECOND, "it bounds how long an accepted event stays only in memory"),
            ),
        ];
        // Unset, it follows commit_interval, whose range is checked above.
        if let Some(max_ack_delay) = self.buffer.max_ack_delay {
            all.push((
                "buffer.max_ack_delay".to_owned(),
                max_ack_delay,
                range(MS, 10 * SECOND, "it bounds how long a sensor's PUBACK waits for the event to be safe"),
            ));
        }
        if let Some(up) = &self.upstream {
            all.extend([
                (
                    "upstream.failback_after".to_owned(),
                    up.failback_after,
                    range(
                        SECOND,
                        DAY,
                        "how long the preferred endpoint must answer before the link returns to it",
                    ),
                ),
                (
                    "upstream.keepalive".to_owned(),
                    up.keepalive,
                    range(
                        SECOND,
                        Duration::from_secs(u16::MAX as u64),
                        "MQTT's keep alive is at most 65535 seconds",
                    ),
                ),
                (
                    "upstream.connect_timeout".to_owned(),
                    up.connect_timeout,
                    range(SECOND, 10 * MINUTE, "how long one attempt (TCP, TLS, CONNACK) may take"),
                ),
                (
                    "upstream.reconnect_min".to_owned(),
                    up.reconnect_min,
                    range(MS, HOUR, "the first wait after a failed connect"),
                ),
                (
                    "upstream.reconnect_max".to_owned(),
                    up.reconnect_max,
                    range(MS, HOUR, "the longest wait between connect attempts"),
                ),
                (
                    "upstream.inbound_session_expiry".to_owned(),
                    up.inbound_session_expiry,
                    range(
                        SECOND,
                        365 * DAY,
                        "how long the upstream keeps queued commands while the link is down",
                    ),
                ),
            ]);
        }
        for (idx, route) in self.routes.iter().enumerate() {
            if let Some(ttl) = route.ttl {
                all.push((
                    format!("route[{idx}].ttl"),
                    ttl,
                    range(SECOND, 3650 * DAY, "events older than this are discarded instead of sent"),
                ));
            }
        }
        all
    }
}

impl BrokerConfig {
    /// The checks of `[broker]` that its types cannot make.
    fn check(&self, invalid: &mut impl FnMut(&str, String, &str)) {
        if self.listen_v5 == Some(self.listen) {
            invalid(
                "broker.listen_v5",
                self.listen.to_string(),
                "it is the same address as broker.listen; MQTT 5 needs its own port, e.g. 0.0.0.0:1884",
            );
        }
        if self.max_payload.as_u64() < 16 || self.max_payload.as_u64() > 256 * 1024 * 1024 {
            invalid(
                "broker.max_payload",
                self.max_payload.to_string(),
                "must be between 16B and 256MiB (the MQTT limit)",
            );
        }
        if self.max_publish_bytes_rate.is_some_and(|rate| rate.as_u64() < self.max_payload.as_u64()) {
            invalid(
                "broker.max_publish_bytes_rate",
                self.max_publish_bytes_rate.map(|r| r.to_string()).unwrap_or_default(),
                "must be at least broker.max_payload, or a publish of the largest allowed size could never be read",
            );
        }
        if self.max_subscriptions.get() > 1_000_000 {
            invalid(
                "broker.max_subscriptions",
                self.max_subscriptions.to_string(),
                "must be between 1 and 1000000; each filter costs about 200 bytes",
            );
        }
        if self.max_topic_levels == 0 || self.max_topic_levels > 32_768 {
            invalid(
                "broker.max_topic_levels",
                self.max_topic_levels.to_string(),
                "must be between 1 and 32768 (a 65,535-byte topic has at most that many levels); set it to the upstream broker's limit (EMQX 128, mosquitto 201)",
            );
        }
        if self.max_topic_length == 0 || self.max_topic_length > 65_535 {
            invalid(
                "broker.max_topic_length",
                self.max_topic_length.to_string(),
                "must be between 1 and 65535 (MQTT's limit, in bytes); set it to the upstream broker's limit",
            );
        }
        if !self.users.is_empty() && !self.allow_plaintext_passwords {
            invalid(
                "broker.users",
                self.users.keys().cloned().collect::<Vec<_>>().join(", "),
                "clear-text passwords in the config file are refused: put the users in a password file \
                 (`outpost passwd /etc/outpost/passwd USER`, or an existing mosquitto_passwd file) and set \
                 broker.password_file; for tests, set broker.allow_plaintext_passwords = true",
            );
        }
        if !self.users.is_empty() && self.password_file.is_some() {
            invalid(
                "broker.users",
                self.users.keys().cloned().collect::<Vec<_>>().join(", "),
                "broker.password_file is set too; keep one source of passwords: move these users into the \
                 file with `outpost passwd FILE USER` and delete broker.users",
            );
        }
        if self.allow_anonymous == Some(false) && !self.has_passwords() {
            invalid(
                "broker.allow_anonymous",
                "false".to_owned(),
                "no client could connect: without broker.password_file every client is anonymous; set \
                 broker.password_file, or delete broker.allow_anonymous",
            );
        }
        for (key, value) in [
            ("broker.ring_segment_size", &self.ring_segment_size),
            ("broker.ring_segments", &self.ring_segments),
        ] {
            if let Some(value) = value {
                invalid(
                    key,
                    value.to_string(),
                    "this key was removed with rumqttd's router: local subscribers now have a queue of \
                     broker.max_queued_messages deliveries each (default 1000); delete the key",
                );
            }
        }
    }
}

impl UpstreamConfig {
    /// The checks of `[upstream]` that its types cannot make.
    fn check(&self, invalid: &mut impl FnMut(&str, String, &str)) {
        match (&self.url, self.urls.as_slice()) {
            (Some(url), [_, ..]) => invalid(
                "upstream.urls",
                self.urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                &format!(
                    "upstream.url ({url}) is set too; give one endpoint as `url` or several as `urls`, not both"
                ),
            ),
            (None, []) => invalid(
                "upstream.url",
                String::new(),
                "the [upstream] table needs `url = \"mqtt://host:port\"` or `urls = [\"mqtt://node-1:1883\", …]`",
            ),
            _ => {}
        }
        for (idx, url) in self.urls.iter().enumerate() {
            if self.urls[..idx].contains(url) {
                invalid(
                    "upstream.urls",
                    url.to_string(),
                    "is listed twice; list each endpoint once, the preferred first",
                );
            }
        }
        if self.urls.len() > MAX_ENDPOINTS {
            invalid(
                "upstream.urls",
                format!("{} endpoints", self.urls.len()),
                &format!(
                    "at most {MAX_ENDPOINTS} endpoints; list the nodes of one upstream, the preferred first"
                ),
            );
        }
        if !(1..=100).contains(&self.poison_after) {
            invalid(
                "upstream.poison_after",
                self.poison_after.to_string(),
                "must be between 1 and 100; 3 tells an event the upstream refuses from a flapping link",
            );
        }
        if self.client_id.is_empty() || self.client_id.len() > 23 * 8 {
            invalid("upstream.client_id", self.client_id.clone(), "must be 1 to 184 characters");
        }
        if self.inflight == 0 {
            invalid("upstream.inflight", "0".into(), "must be between 1 and 65535");
        }
        if self.reconnect_min > self.reconnect_max {
            invalid(
                "upstream.reconnect_min",
                humantime::format_duration(self.reconnect_min).to_string(),
                "must be at most upstream.reconnect_max",
            );
        }
        if let Some(max) = self.max_packet_size {
            if max.as_u64() < 128 || max.as_u64() > 268_435_460 {
                invalid(
                    "upstream.max_packet_size",
                    max.to_string(),
                    "must be between 128B and 256MiB (MQTT's largest packet); set it to the upstream broker's limit",
                );
            }
        }
        if let Some(path) = &self.password_file {
            if self.password.is_some() {
                invalid(
                    "upstream.password_file",
                    path.display().to_string(),
                    "upstream.password is set too; keep one: delete upstream.password (the file keeps it out of the config)",
                );
            }
            if self.username.is_none() {
                invalid(
                    "upstream.password_file",
                    path.display().to_string(),
                    "MQTT sends a password only with a username: set upstream.username",
                );
            }
            if let Err(reason) = upstream_tls::readable(path) {
                invalid("upstream.password_file", path.display().to_string(), &reason);
            }
        }
        if self.topic_prefix.contains(['+', '#', '\0']) {
            invalid(
                "upstream.topic_prefix",
                self.topic_prefix.clone(),
                "must not contain `+`, `#` or NUL; use a plain prefix such as \"site-7/\"",
            );
        }
        self.check_inbound(invalid);
    }

    /// The checks of `inbound_*` and `[[upstream.subscribe]]`.
    fn check_inbound(&self, invalid: &mut impl FnMut(&str, String, &str)) {
        if self.subscribe.is_empty() {
            return;
        }
        let inbound_id = self.inbound_client_id();
        if inbound_id == self.client_id {
            invalid(
                "upstream.inbound_client_id",
                inbound_id.clone(),
                "must differ from upstream.client_id: the two connections would take each other over; delete it to use `<client_id>-in`",
            );
        }
        if inbound_id.is_empty() || inbound_id.len() > 23 * 8 {
            invalid("upstream.inbound_client_id", inbound_id, "must be 1 to 184 characters");
        }
        if self.inbound_acl_user.is_empty() {
            invalid(
                "upstream.inbound_acl_user",
                String::new(),
                "must not be empty; the default is \"outpost-inbound\"",
            );
        }
        for (idx, entry) in self.subscribe.iter().enumerate() {
            let key = |field: &str| format!("upstream.subscribe[{idx}].{field}");
            if entry.qos > 1 {
                invalid(
                    &key("qos"),
                    entry.qos.to_string(),
                    "must be 0 or 1: the local broker delivers at most QoS 1, and QoS 1 already gets each command to it",
                );
            }
            let filter = entry.filter.as_str();
            let literal = filter.find(['+', '#']).map_or(filter, |at| &filter[..at]);
            if !literal.starts_with(entry.strip_prefix.as_str()) {
                invalid(
                    &key("strip_prefix"),
                    entry.strip_prefix.clone(),
                    &format!(
                        "must be a plain start of the filter {filter:?} (before any `+` or `#`), or no topic it matches could be mapped"
                    ),
                );
            }
            if entry.local_prefix.contains(['+', '#', '\0']) || entry.local_prefix.starts_with('$') {
                invalid(
                    &key("local_prefix"),
                    entry.local_prefix.clone(),
                    "must not contain `+`, `#` or NUL nor start with `$`; use a plain prefix such as \"cmd/\"",
                );
            }
            let mapped =
                format!("{}{}", entry.local_prefix, &literal[entry.strip_prefix.len().min(literal.len())..]);
            if mapped.starts_with('$') {
                invalid(
                    &key("strip_prefix"),
                    entry.strip_prefix.clone(),
                    &format!(
                        "the filter {filter:?} would map to local `$` topics, which only the broker may publish; strip the `$…` levels or set local_prefix"
                    ),
                );
            }
        }
    }

    /// The inbound connection's client id: `inbound_client_id`, or `<client_id>-in`.
    pub fn inbound_client_id(&self) -> String {
        self.inbound_client_id.clone().unwrap_or_else(|| format!("{}-in", self.client_id))
    }
}

impl BufferConfig {
    /// The longest wait for an upstream PUBACK before a commit: as set, else the default, or
    /// `commit_interval` when that is longer (a config from before the key keeps its meaning).
    pub fn max_ack_delay(&self) -> Duration {
        self.max_ack_delay.unwrap_or_else(|| default_max_ack_delay().max(self.commit_interval))
    }

    /// The checks of `[buffer]` that its types cannot make.
    fn check(&self, invalid: &mut impl FnMut(&str, String, &str)) {
        if self.max_events == 0 {
            invalid("buffer.max_events", "0".into(), "must be at least 1");
        }
        let max_ack_delay = self.max_ack_delay();
        // Its range is checked with the other durations; this is the part that needs two keys.
        if max_ack_delay < self.commit_interval {
            invalid(
                "buffer.max_ack_delay",
                humantime::format_duration(max_ack_delay).to_string(),
                &format!(
                    "must be at least buffer.commit_interval ({}); it bounds how long a sensor's PUBACK waits for the event to be safe",
                    humantime::format_duration(self.commit_interval)
                ),
            );
        }
    }
}

impl BrokerConfig {
    /// Whether clients can log in with a password (`password_file`, or `users` in tests).
    pub fn has_passwords(&self) -> bool {
        self.password_file.is_some() || !self.users.is_empty()
    }

    /// `allow_anonymous` as given, or its default: false when there are passwords.
    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.has_passwords())
    }

    /// What is wrong with the password and ACL files: `(key, (path, why))`.
    fn auth_file_problems(&self) -> Vec<(&'static str, (String, String))> {
        let mut problems = Vec::new();
        if let Some(path) = &self.password_file {
            if let Err(e) = crate::auth::password::PasswordFile::load(path) {
                problems.push(("broker.password_file", (path.display().to_string(), e.to_string())));
            }
        }
        if let Some(path) = &self.acl_file {
            if let Err(e) = crate::auth::acl::Acl::load(path) {
                problems.push(("broker.acl_file", (path.display().to_string(), e.to_string())));
            }
        }
        problems
    }

    pub fn topic_policy(&self) -> TopicPolicy {
        TopicPolicy { max_levels: self.max_topic_levels, max_length: self.max_topic_length }
    }
}

/// The most endpoints `upstream.urls` may list: they label metrics, so their number is bounded.
pub const MAX_ENDPOINTS: usize = 16;

impl UpstreamConfig {
    /// The endpoints in order of preference (`url`, or `urls`); never empty once validated.
    pub fn endpoints(&self) -> Vec<UpstreamUrl> {
        self.url.iter().chain(&self.urls).cloned().collect()
    }

    /// The endpoints as one line for logs and status: `mqtt://a:1883, mqtt://b:1883`.
    pub fn endpoint_list(&self) -> String {
        self.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }

    /// An upstream with every setting at its default.
    pub fn with_url(url: UpstreamUrl) -> UpstreamConfig {
        UpstreamConfig {
            url: Some(url),
            urls: Vec::new(),
            failback_after: default_failback_after(),
            client_id: default_client_id(),
            username: None,
            password: None,
            password_file: None,
            tls: None,
            keepalive: default_keepalive(),
            connect_timeout: default_connect_timeout(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
            topic_prefix: String::new(),
            inflight: default_inflight(),
            max_packet_size: None,
            poison_after: default_poison_after(),
            max_events_per_sec: None,
            max_bytes_per_sec: None,
            mqtt_version: MqttVersion::default(),
            event_id: EventIdMode::default(),
            subscribe: Vec::new(),
            inbound_client_id: None,
            inbound_session_expiry: default_inbound_session_expiry(),
            inbound_acl_user: default_inbound_acl_user(),
        }
    }
}

/// What [`parse_all`] found in one file.
struct Parsed {
    /// `None` only when the file is not TOML at all, or a problem could not be set aside.
    config: Option<GatewayConfig>,
    problems: Vec<ConfigError>,
    /// Line and column of every key the file sets, by dotted path (`upstream.url`,
    /// `route[1].priority`), for messages about values that parsed but are invalid.
    positions: BTreeMap<String, (usize, usize)>,
}

/// serde stops at the first error, so each error's key is set aside (its default applies)
/// and the document is deserialized again, until it parses: one run reports every unknown
/// key and refused value, each with its line.
fn parse_all(text: &str, path: &Path) -> Parsed {
    let problem = |e: &toml::de::Error, key: Option<&str>| ConfigError::Parse {
        path: path.to_owned(),
        message: describe_toml_error(e, text, key),
    };
    let (mut doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let problems = syntax.iter().map(|e| problem(e, None)).collect();
        return Parsed { config: None, problems, positions: BTreeMap::new() };
    }
    let mut found = Vec::new();
    let config = loop {
        let error = match GatewayConfig::deserialize(doc.clone().into_deserializer()) {
            Ok(config) => break Some(config),
            Err(error) => error,
        };
        // Each round removes one entry, so this ends.
        let removed = error.span().and_then(|span| remove_entry(doc.get_mut(), &span, ""));
        found.push((error.span().map_or(usize::MAX, |s| s.start), problem(&error, removed.as_deref())));
        if removed.is_none() {
            break None;
        }
    };
    // serde visits keys in its own order; the operator reads the file top down.
    found.sort_by_key(|(start, _)| *start);
    let problems = found.into_iter().map(|(_, problem)| problem).collect();
    let mut positions = BTreeMap::new();
    record_positions(doc.get_ref(), "", text, &mut positions);
    Parsed { config, problems, positions }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") }
}

/// Removes the innermost entry whose key or value holds `span` (a table of an array of
/// tables counts as an entry); returns its dotted path.
fn remove_entry(table: &mut DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<String> {
    let holds = |r: Range<usize>| r.start <= span.start && span.end <= r.end;
    let keys: Vec<String> = table.keys().map(|k| k.get_ref().to_string()).collect();
    for key in &keys {
        let path = join_key(prefix, key);
        let Some(value) = table.get_mut(key.as_str()) else { continue };
        match value.get_mut() {
            DeValue::Table(inner) => {
                if let Some(found) = remove_entry(inner, span, &path) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                for (idx, item) in items.iter_mut().enumerate() {
                    let item_path = format!("{path}[{idx}]");
                    let item_span = item.span();
                    let DeValue::Table(inner) = item.get_mut() else { continue };
                    if let Some(found) = remove_entry(inner, span, &item_path) {
                        return Some(found);
                    }
                    if holds(item_span) {
                        let kept = std::mem::replace(items, toml::de::DeArray::new())
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| *i != idx);
                        *items = kept.map(|(_, item)| item).collect();
                        return Some(item_path);
                    }
                }
            }
            _ => {}
        }
    }
    let key = keys.into_iter().find(|key| {
        table.get_key_value(key.as_str()).is_some_and(|(k, v)| holds(k.span()) || holds(v.span()))
    })?;
    table.remove(key.as_str());
    Some(join_key(prefix, &key))
}

fn record_positions(
    table: &DeTable<'_>,
    prefix: &str,
    text: &str,
    positions: &mut BTreeMap<String, (usize, usize)>,
) {
    for (key, value) in table.iter() {
        let path = join_key(prefix, key.get_ref());
        positions.insert(path.clone(), line_column(text, value.span().start));
        match value.get_ref() {
            DeValue::Table(inner) => record_positions(inner, &path, text, positions),
            DeValue::Array(items) => {
                for (idx, item) in items.iter().enumerate() {
                    if let DeValue::Table(inner) = item.get_ref() {
                        record_positions(inner, &format!("{path}[{idx}]"), text, positions);
                    }
                }
            }
            _ => {}
        }
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// Turns a toml error into "line L, column C: `table.key`: message; did you mean …" plus
/// the offending line, so the operator sees where and what without counting characters.
fn describe_toml_error(e: &toml::de::Error, text: &str, key: Option<&str>) -> String {
    let message = e.message().trim_end().to_owned();
    let hint = if message.contains("socket address") {
        "; expected IP:PORT such as \"0.0.0.0:1883\" (host names are not accepted here)".to_owned()
    } else {
        did_you_mean(&message)
    };
    let Some(span) = e.span() else {
        return format!("{message}{hint}");
    };
    let (line_no, col) = line_column(text, span.start);
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = key.map(|k| format!("`{k}`: ")).unwrap_or_default();
    format!("line {line_no}, column {col}: {key}{message}{hint}\n  | {line}")
}

/// "; did you mean `x`?" for serde's "unknown field/variant `y`, expected `x`, …" messages,
/// whose wording serde fixes for every format.
fn did_you_mean(message: &str) -> String {
    let Some(rest) =
        message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return String::new();
    };
    let Some((wrong, expected)) = rest.split_once('`') else {
        return String::new();
    };
    outpost_rules::did_you_mean(wrong, expected.split('`').skip(1).step_by(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn parse_err(text: &str) -> String {
        GatewayConfig::parse(text, Path::new("outpost.toml"))
            .and_then(|c| c.validate("outpost.toml").map(|_| c))
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = GatewayConfig::parse("", Path::new("x.toml")).expect("empty config parses");
        assert_eq!(c.broker.listen, "0.0.0.0:1883".parse().expect("addr"));
        assert_eq!(c.data_dir, PathBuf::from("./outpost-data"));
        assert!(c.upstream.is_none());
        assert_eq!(c.buffer.commit_interval, Duration::from_millis(25));
    }

    #[test]
    fn human_units_parse() {
        let c = GatewayConfig::parse(
            "[broker]\nmax_payload = \"64KiB\"\n[buffer]\ncommit_interval = \"500ms\"\nmax_bytes = \"1GiB\"\n",
            Path::new("x.toml"),
        )
        .expect("parses");
        assert_eq!(c.broker.max_payload, ByteSize::kib(64));
        assert_eq!(c.buffer.commit_interval, Duration::from_millis(500));
        assert_eq!(c.buffer.max_ack_delay(), Duration::from_millis(500), "follows a longer commit_interval");
        assert_eq!(c.buffer.max_bytes, ByteSize::gib(1));
    }

    #[test]
    fn max_ack_delay_defaults_and_bounds() {
        let c = GatewayConfig::parse("", Path::new("x.toml")).expect("parses");
        assert_eq!(c.buffer.max_ack_delay(), Duration::from_millis(250));
        let c =
            GatewayConfig::parse("[buffer]\nmax_ack_delay = \"1s\"\n", Path::new("x.toml")).expect("parses");
        assert_eq!(c.buffer.max_ack_delay(), Duration::from_secs(1));
        let err = GatewayConfig::parse(
            "[buffer]\ncommit_interval = \"100ms\"\nmax_ack_delay = \"50ms\"\n",
            Path::new("x.toml"),
        )
        .expect("parses")
        .validate("x.toml")
        .expect_err("shorter than commit_interval");
        let text = err.to_string();
        assert!(
            text.contains("buffer.max_ack_delay") && text.contains("50ms") && text.contains("100ms"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_names_the_key_and_valid_ones() {
        let err = parse_err("[broker]\nlisten = \"0.0.0.0:1883\"\nmax_conections = 5\n");
        assert!(
            err.starts_with(
                "outpost.toml: line 3, column 1: `broker.max_conections`: unknown field `max_conections`, expected one of"
            ),
            "{err}"
        );
        assert!(err.contains("`max_connections`"), "{err}");
    }

    #[test]
    fn wrong_type_says_what_was_expected() {
        let err = parse_err("[broker]\nmax_connections = \"many\"\n");
        assert!(err.contains("line 2, column 19"), "{err}");
        assert!(err.contains("invalid type: string \"many\""), "{err}");
    }

    #[test]
    fn bad_address_and_url_are_explained() {
        let err = parse_err("[broker]\nlisten = \"localhost:99999\"\n");
        assert!(
            err.contains("`broker.listen`: invalid socket address syntax; expected IP:PORT such as"),
            "{err}"
        );
        let err = parse_err("[upstream]\nurl = \"http://x:1\"\n");
        assert!(err.contains("unknown scheme `http`; expected mqtt://host:port"), "{err}");
    }

    #[test]
    fn the_router_ring_keys_are_refused_with_what_replaced_them() {
        for (text, key) in [
            ("[broker]\nring_segment_size = \"1MiB\"\n", "`broker.ring_segment_size` = \"\\\"1MiB\\\"\""),
            ("[broker]\nring_segments = 4\n", "`broker.ring_segments` = \"4\""),
        ] {
            let err = parse_err(text);
            assert!(
                err.starts_with(&format!("outpost.toml: {key} is invalid: this key was removed")),
                "{err}"
            );
            assert!(err.contains("broker.max_queued_messages"), "{err}");
        }
    }

    #[test]
    fn cross_field_checks_name_the_key() {
        let err = parse_err("[broker]\nlisten = \"0.0.0.0:1883\"\nlisten_v5 = \"0.0.0.0:1883\"\n");
        assert!(err.starts_with("outpost.toml: `broker.listen_v5` = \"0.0.0.0:1883\" is invalid"), "{err}");
        let err = parse_err("[[route]]\nfilter = \"a/#\"\npriority = 12\n");
        assert!(err.contains("`route[0].priority` = \"12\""), "{err}");
        let err = parse_err("[[route]]\nfilter = \"a/#/b\"\n");
        assert!(err.contains("`#` must be the last level"), "{err}");
    }

    #[test]
    fn topic_limits_and_poison_after_are_checked() {
        let c = GatewayConfig::parse("", Path::new("x.toml")).expect("parses");
        assert_eq!(c.broker.topic_policy(), TopicPolicy { max_levels: 128, max_length: 65_535 });
        let err = parse_err("[broker]\nmax_topic_levels = 0\n");
        assert!(err.contains("broker.max_topic_levels") && err.contains("between 1 and 32768"), "{err}");
        let err = parse_err("[broker]\nmax_topic_length = 70000\n");
        assert!(err.contains("broker.max_topic_length") && err.contains("70000"), "{err}");
        let err = parse_err("[upstream]\nurl = \"mqtt://h:1\"\npoison_after = 0\n");
        assert!(err.contains("upstream.poison_after") && err.contains("between 1 and 100"), "{err}");
        let c = GatewayConfig::parse(
            "[broker]\nmax_topic_levels = 201\nmax_topic_length = 256\n[upstream]\nurl = \"mqtt://h:1\"\npoison_after = 5\n",
            Path::new("x.toml"),
        )
        .expect("parses");
        c.validate("x.toml").expect("valid");
        assert_eq!(c.broker.topic_policy(), TopicPolicy { max_levels: 201, max_length: 256 });
        assert_eq!(c.upstream.map(|u| u.poison_after), Some(5));
    }

    #[test]
    fn upstream_max_packet_size_is_checked() {
        let err = parse_err("[upstream]\nurl = \"mqtt://h:1\"\nmax_packet_size = \"64B\"\n");
        assert!(err.contains("upstream.max_packet_size") && err.contains("between 128B and 256MiB"), "{err}");
        let c = GatewayConfig::parse(
            "[upstream]\nurl = \"mqtt://h:1\"\nmax_packet_size = \"128KiB\"\n",
            Path::new("x"),
        )
        .expect("valid");
        c.validate("x").expect("valid");
        assert_eq!(c.upstream.and_then(|u| u.max_packet_size).map(|b| b.as_u64()), Some(128 * 1024));
    }

    #[test]
    fn overrides_win_and_create_an_upstream() {
        let overrides = Overrides {
            upstream: Some("mqtt://10.0.0.5:1884".parse().expect("url")),
            listen: Some("127.0.0.1:2000".parse().expect("addr")),
            ..Overrides::default()
        };
        let c = GatewayConfig::load(None, &overrides).expect("defaults are valid");
        let up = c.upstream.expect("upstream from override");
        assert_eq!(up.endpoints(), vec![UpstreamUrl::plain("10.0.0.5", 1884)]);
        assert_eq!(c.broker.listen.port(), 2000);
    }

    #[test]
    fn urls_list_endpoints_in_order_and_an_override_replaces_them() {
        let text = "[upstream]\nurls = [\"mqtt://a:1\", \"mqtt://b:2\"]\nfailback_after = \"2s\"\n";
        let c = GatewayConfig::parse(text, Path::new("x")).expect("valid");
        c.validate("x").expect("valid");
        let up = c.upstream.clone().expect("upstream");
        assert_eq!(up.endpoint_list(), "mqtt://a:1, mqtt://b:2");
        assert_eq!(up.failback_after, Duration::from_secs(2));
        let mut c = c;
        c.apply(&Overrides { upstream: Some("mqtt://c:3".parse().expect("url")), ..Overrides::default() });
        assert_eq!(c.upstream.expect("upstream").endpoint_list(), "mqtt://c:3");
    }

    #[test]
    fn url_and_urls_together_or_neither_are_refused() {
        let err = parse_err("[upstream]\nurl = \"mqtt://a:1\"\nurls = [\"mqtt://b:2\"]\n");
        assert!(
            err.contains("`upstream.urls` = \"mqtt://b:2\" is invalid: upstream.url (mqtt://a:1) is set too"),
            "{err}"
        );
        let err = parse_err("[upstream]\nclient_id = \"x\"\n");
        assert!(err.contains("`upstream.url`") && err.contains("needs `url = "), "{err}");
        let err = parse_err("[upstream]\nurls = []\n");
        assert!(err.contains("`upstream.url`"), "{err}");
        let err = parse_err("[upstream]\nurls = [\"mqtt://a:1\", \"mqtt://a:1\"]\n");
        assert!(err.contains("is listed twice"), "{err}");
        let err = parse_err("[upstream]\nurls = [\"mqtt://a:1\"]\nfailback_after = \"100ms\"\n");
        assert!(
            err.contains("`upstream.failback_after` = \"100ms\"")
                && err.contains("must be between 1s and 1day"),
            "{err}"
        );
    }

    #[test]
    fn mqtt_version_is_spelled_as_in_the_spec() {
        let c =
            GatewayConfig::parse("[upstream]\nurl = \"mqtt://h:1\"\nmqtt_version = \"5\"\n", Path::new("x"))
                .expect("parses");
        assert_eq!(c.upstream.expect("upstream").mqtt_version, MqttVersion::V5);
        let err = parse_err("[upstream]\nurl = \"mqtt://h:1\"\nmqtt_version = \"4\"\n");
        assert!(
            err.contains("`upstream.mqtt_version`: unknown variant `4`, expected `3.1.1` or `5`"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_in_file_order_with_a_suggestion() {
        let text = "[broker]\nmax_conections = 5\nack = \"after_comit\"\n[upstream]\nurl = \"mqtt://h:1\"\nreconect_max = \"1s\"\nreconnect_min = \"0s\"\n[[route]]\npriority = 1\n[[route]]\nfilter = \"a/#\"\npriority = 12\n";
        let (config, problems) = parse_and_validate(text);
        assert!(config.is_some(), "what parsed is still checked");
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let expected = [
            "outpost.toml: line 2, column 1: `broker.max_conections`: unknown field `max_conections`",
            "outpost.toml: line 3, column 7: `broker.ack`: unknown variant `after_comit`",
            "outpost.toml: line 6, column 1: `upstream.reconect_max`: unknown field `reconect_max`",
            "outpost.toml: line 8, column 1: `route[0]`: missing field `filter`",
            "outpost.toml: line 7, column 17: `upstream.reconnect_min` = \"0s\" is invalid",
            // route[0] was set aside, so the second [[route]] is the first one left.
            "outpost.toml: line 12, column 12: `route[0].priority` = \"12\" is invalid",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (problem, start) in problems.iter().zip(expected) {
            assert!(problem.starts_with(start), "{problem:?} should start with {start:?}");
        }
        assert!(
            problems[0].ends_with("; did you mean `max_connections`?\n  | max_conections = 5"),
            "{}",
            problems[0]
        );
        assert!(problems[1].contains("; did you mean `after_commit`?"), "{}", problems[1]);
        assert!(problems[2].contains("; did you mean `reconnect_max`?"), "{}", problems[2]);
    }

    #[test]
    fn a_syntax_error_stops_the_check_and_names_its_place() {
        let (config, problems) = parse_and_validate("[broker\nlisten = 1\n");
        assert!(config.is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].to_string().starts_with("outpost.toml: line 1, column 8: "), "{}", problems[0]);
    }

    #[track_caller]
    #[test]
    fn inbound_subscriptions_are_checked_with_their_keys() {
        let (config, problems) = parse_and_validate(
            r#"
[upstream]
url = "mqtt://127.0.0.1:1883"
client_id = "gw"
inbound_client_id = "gw"

[[upstream.subscribe]]
filter = "cloud/site-7/cmd/#"
strip_prefix = "cloud/site-7/"

[[upstream.subscribe]]
filter = "$aws/things/gw/#"
qos = 2
strip_prefix = "cloud/"
local_prefix = "a/#"
"#,
        );
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |key: &str| text.iter().any(|t| t.contains(&format!("`{key}`")));
        assert!(has("upstream.inbound_client_id"), "{text:#?}");
        assert!(has("upstream.subscribe[1].qos"), "{text:#?}");
        assert!(has("upstream.subscribe[1].strip_prefix"), "{text:#?}");
        assert!(has("upstream.subscribe[1].local_prefix"), "{text:#?}");
        assert!(!text.iter().any(|t| t.contains("subscribe[0]")), "{text:#?}");
        assert!(text.iter().any(|t| t.contains("line 5")), "the position is named: {text:#?}");
        let upstream = config.and_then(|c| c.upstream).expect("parsed");
        assert_eq!(upstream.subscribe[0].local_topic("cloud/site-7/cmd/x"), Ok("cmd/x".to_owned()));

        let (config, problems) = parse_and_validate(
            "[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\n[[upstream.subscribe]]\nfilter = \"$aws/things/gw/#\"\nstrip_prefix = \"$aws/things/\"\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let upstream = config.and_then(|c| c.upstream).expect("parsed");
        assert_eq!(upstream.inbound_client_id(), "outpost-in");
        assert_eq!(upstream.subscribe[0].qos, 1);
    }

    fn parse_and_validate(text: &str) -> (Option<GatewayConfig>, Vec<ConfigError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, text).expect("write");
        let (config, problems) = GatewayConfig::load_all(Some(&path), &Overrides::default());
        let prefix = path.display().to_string();
        let problems = problems
            .into_iter()
            .map(|mut e| {
                // Name the file as the expectations do.
                match &mut e {
                    ConfigError::Parse { path, .. } => *path = PathBuf::from("outpost.toml"),
                    ConfigError::Invalid { origin, .. } => *origin = origin.replace(&prefix, "outpost.toml"),
                    ConfigError::Read { .. } => {}
                }
                e
            })
            .collect();
        (config, problems)
    }

    #[test]
    fn paths_in_a_file_are_relative_to_it_and_overrides_to_the_working_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, "data_dir = \"state\"\nrules = \"rules/site.toml\"\n").expect("write");
        let config = GatewayConfig::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(config.data_dir, dir.path().join("state"));
        assert_eq!(config.rules, Some(dir.path().join("rules/site.toml")));

        let overrides = Overrides {
            data_dir: Some(PathBuf::from("here")),
            rules: Some(PathBuf::from("r.toml")),
            ..Overrides::default()
        };
        let config = GatewayConfig::load(Some(&path), &overrides).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("here"));
        assert_eq!(config.rules, Some(PathBuf::from("r.toml")));

        // Absolute paths stay; an unset data_dir keeps its default.
        std::fs::write(&path, "data_dir = \"/var/lib/outpost\"\n").expect("write");
        let config = GatewayConfig::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/outpost"));
        std::fs::write(&path, "").expect("write");
        let config = GatewayConfig::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("./outpost-data"));
    }

    #[test]
    fn clear_text_users_need_the_flag_and_never_show_their_passwords() {
        let err = parse_err("[broker.users]\nsensor = \"hunter2\"\n");
        assert!(
            err.starts_with("outpost.toml: `broker.users` = \"sensor\" is invalid: clear-text passwords"),
            "{err}"
        );
        assert!(err.contains("outpost passwd") && err.contains("allow_plaintext_passwords = true"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let c = GatewayConfig::parse(
            "[broker]\nallow_plaintext_passwords = true\n[broker.users]\nsensor = \"hunter2\"\n",
            Path::new("x"),
        )
        .expect("parses");
        c.validate("x").expect("allowed with the flag");
        assert!(!c.broker.allow_anonymous(), "users mean no anonymous clients by default");
        let err = parse_err(
            "[broker]\nallow_plaintext_passwords = true\npassword_file = \"p\"\n[broker.users]\ns = \"x\"\n",
        );
        assert!(err.contains("broker.password_file is set too; keep one source of passwords"), "{err}");
    }

    #[test]
    fn allow_anonymous_defaults_to_false_with_passwords_and_needs_them_to_be_false() {
        let c = GatewayConfig::parse("", Path::new("x")).expect("parses");
        assert!(c.broker.allow_anonymous(), "without passwords every client is anonymous");
        let c = GatewayConfig::parse("[broker]\npassword_file = \"p\"\n", Path::new("x")).expect("parses");
        assert!(!c.broker.allow_anonymous());
        let c =
            GatewayConfig::parse("[broker]\npassword_file = \"p\"\nallow_anonymous = true\n", Path::new("x"))
                .expect("parses");
        assert!(c.broker.allow_anonymous());
        let err = parse_err("[broker]\nallow_anonymous = false\n");
        assert!(
            err.contains("`broker.allow_anonymous` = \"false\" is invalid: no client could connect"),
            "{err}"
        );
    }

    #[test]
    fn the_password_and_acl_files_are_read_from_the_config_directory_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("acl"), "topic read a/#\ntopic reed b\n").expect("write");
        std::fs::write(dir.path().join("passwd"), "").expect("write");
        let (config, problems) =
            parse_and_validate_in(dir.path(), "[broker]\npassword_file = \"passwd\"\nacl_file = \"acl\"\n");
        let config = config.expect("parsed");
        assert_eq!(config.broker.password_file, Some(dir.path().join("passwd")));
        assert_eq!(config.broker.acl_file, Some(dir.path().join("acl")));
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("line 3, column 12: `broker.acl_file`"), "{}", problems[0]);
        assert!(
            problems[0].contains("acl: line 2: \"topic reed b\": `reed` is not an access"),
            "{}",
            problems[0]
        );
    }

    #[track_caller]
    fn parse_and_validate_in(dir: &Path, text: &str) -> (Option<GatewayConfig>, Vec<ConfigError>) {
        let path = dir.join("outpost.toml");
        std::fs::write(&path, text).expect("write");
        GatewayConfig::load_all(Some(&path), &Overrides::default())
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let err = GatewayConfig::load(Some(Path::new("/nonexistent/outpost.toml")), &Overrides::default())
            .expect_err("missing file")
            .to_string();
        assert!(err.starts_with("cannot read config file /nonexistent/outpost.toml: No such file"), "{err}");
    }
    /// Each duration key, as written in a file, with the text that sets it to `value`.
    fn duration_key_texts(value: &str) -> Vec<(&'static str, String)> {
        let up = "[upstream]\nurl = \"mqtt://h:1\"\n";
        vec![
            ("wakeup_coalescing", format!("wakeup_coalescing = \"{value}\"\n")),
            ("shutdown_timeout", format!("shutdown_timeout = \"{value}\"\n")),
            ("broker.sys_interval", format!("[broker]\nsys_interval = \"{value}\"\n")),
            ("broker.connection_timeout", format!("[broker]\nconnection_timeout = \"{value}\"\n")),
            ("buffer.commit_interval", format!("[buffer]\ncommit_interval = \"{value}\"\n")),
            (
                "buffer.max_ack_delay",
                format!("[buffer]\nmax_ack_delay = \"{value}\"\ncommit_interval = \"1ms\"\n"),
            ),
            ("upstream.failback_after", format!("{up}failback_after = \"{value}\"\n")),
            ("upstream.keepalive", format!("{up}keepalive = \"{value}\"\n")),
            ("upstream.connect_timeout", format!("{up}connect_timeout = \"{value}\"\n")),
            ("upstream.reconnect_min", format!("{up}reconnect_min = \"{value}\"\nreconnect_max = \"1h\"\n")),
            ("upstream.reconnect_max", format!("{up}reconnect_max = \"{value}\"\nreconnect_min = \"1ms\"\n")),
            ("upstream.inbound_session_expiry", format!("{up}inbound_session_expiry = \"{value}\"\n")),
            ("route[0].ttl", format!("[[route]]\nfilter = \"#\"\nttl = \"{value}\"\n")),
        ]
    }

    #[test]
    fn every_duration_key_has_a_range_and_refuses_an_overflowing_value() {
        let keys: Vec<&str> = duration_key_texts("1s").iter().map(|(key, _)| *key).collect();
        let mut config = GatewayConfig::parse(
            "[buffer]\nmax_ack_delay = \"1s\"\n[upstream]\nurl = \"mqtt://h:1\"\n[[route]]\nfilter = \"#\"\nttl = \"1h\"\n",
            Path::new("x"),
        )
        .expect("parses");
        config.validate("x").expect("the defaults are in range");
        let ranged: Vec<String> = config.durations().into_iter().map(|(key, ..)| key).collect();
        assert_eq!(ranged, keys, "every duration key is listed in durations() and tested here");
        config.shutdown_timeout = Duration::MAX;
        let err = config.validate("x").expect_err("refused").to_string();
        assert!(err.contains("`shutdown_timeout`"), "{err}");

        // 500,000,000 years parses as a Duration; added to an Instant it would panic.
        for (key, text) in duration_key_texts("500000000y") {
            let err = parse_err(&text);
            assert!(
                err.contains(&format!("outpost.toml: `{key}` = \""))
                    && err.contains("is invalid: must be between "),
                "{key}: {err}"
            );
            assert_eq!(
                err.matches("is invalid").count(),
                err.matches(&format!("`{key}`")).count(),
                "{key}: only the key itself is refused: {err}"
            );
        }
        // Zero is `wakeup_coalescing`'s "off"; every other duration refuses it.
        let text = "wakeup_coalescing = \"0s\"\n";
        GatewayConfig::parse(text, Path::new("x")).expect("parses").validate("x").expect("zero is off");
        for (key, text) in duration_key_texts("0s").into_iter().filter(|(key, _)| *key != "wakeup_coalescing")
        {
            let err = parse_err(&text);
            assert!(err.contains(&format!("`{key}` = \"0s\" is invalid: must be between ")), "{key}: {err}");
        }
    }

    #[test]
    fn a_duration_range_is_inclusive_and_the_message_says_what_the_key_does() {
        let config = GatewayConfig::parse("shutdown_timeout = \"1h\"\n", Path::new("x")).expect("parses");
        config.validate("x").expect("the maximum itself is allowed");
        let err = parse_err("shutdown_timeout = \"1h 1s\"\n");
        assert_eq!(
            err,
            "outpost.toml: `shutdown_timeout` = \"1h 1s\" is invalid: must be between 100ms and 1h; how long a \
             graceful stop may wait for upstream acknowledgements; keep it below systemd's TimeoutStopSec"
        );
        let err = parse_err("[upstream]\nurl = \"mqtt://h:1\"\nkeepalive = \"65536s\"\n");
        assert!(
            err.contains("must be between 1s and 18h 12m 15s; MQTT's keep alive is at most 65535 seconds"),
            "{err}"
        );
    }
}
