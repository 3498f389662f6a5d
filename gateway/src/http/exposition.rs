//! `/metrics`: the gateway's counters, gauges and histograms in the Prometheus text format
//! (0.0.4), encoded by `prometheus-client`.
//!
//! Nothing here counts: the stages' [`Metrics`] atomics stay the only source of truth, and a
//! scrape reads them into constant metrics (a `Collector`), so serving metrics adds no work to
//! the hot path. [`COUNTERS`] maps each counter of `metrics.rs` to its Prometheus name and
//! labels (README "Metrics and health" shows the same table); a counter added without a
//! mapping is still exposed, as `outpost_<field>_total`, and fails this module's tests.
//!
//! Label cardinality is fixed by this file: the only label values are the ones written here,
//! the buffer's ten priorities, the configured upstream endpoint and the version. No device,
//! client id or topic ever becomes a label.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::buffer::inspect::StatsReport;
use crate::metrics::{HistogramSnapshot, Metrics};

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One counter of `metrics::Counters` and the sample it becomes.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    /// The field name in `metrics::Counters`.
    pub counter: &'static str,
    /// The Prometheus name, `_total` included. Entries sharing a name form one family and are
    /// adjacent in [`COUNTERS`]; the first entry's help describes the family.
    pub metric: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub help: &'static str,
}

const fn m(
    counter: &'static str,
    metric: &'static str,
    labels: &'static [(&'static str, &'static str)],
    help: &'static str,
) -> Mapping {
    Mapping { counter, metric, labels, help }
}

/// Today's counter names → metric names (the README's "Metrics and health" table). The per-rule
/// counters are not in this table: they are read from `metrics::RuleRegistry`.
pub const COUNTERS: &[Mapping] = &[
    m(
        "ingested",
        "outpost_messages_received_total",
        &[],
        "Publishes read from sensors (and wills) and handed to routing.",
    ),
    m(
        "ingested_qos0",
        "outpost_messages_received_by_qos_total",
        &[("qos", "0")],
        "Publishes read from sensors (and wills), by their QoS; they sum to outpost_messages_received_total.",
    ),
    m("ingested_qos1", "outpost_messages_received_by_qos_total", &[("qos", "1")], ""),
    m("ingested_qos2", "outpost_messages_received_by_qos_total", &[("qos", "2")], ""),
    m(
        "ingest_throttled",
        "outpost_messages_throttled_total",
        &[],
        "Publishes that waited for room in the pipeline (their sensor was slowed down).",
    ),
    m(
        "sensor_connects",
        "outpost_connections_total",
        &[],
        "Sensor connections accepted (CONNACK success), readiness probes included.",
    ),
    m(
        "accepted_listen",
        "outpost_connections_accepted_total",
        &[("listener", "broker.listen")],
        "TCP connections accepted, by the listener they came in on, before their CONNECT.",
    ),
    m("accepted_listen_v5", "outpost_connections_accepted_total", &[("listener", "broker.listen_v5")], ""),
    m("accepted_tls", "outpost_connections_accepted_total", &[("listener", "broker.tls.listen")], ""),
    m(
        "sensor_refused",
        "outpost_connections_refused_total",
        &[],
        "CONNECTs refused with a reason code (credentials, client id, server busy).",
    ),
    m(
        "sensor_refused_per_address",
        "outpost_connections_refused_per_address_total",
        &[],
        "Of the refused CONNECTs, those refused at broker.max_connections_per_address.",
    ),
    m(
        "sensor_takeovers",
        "outpost_connections_taken_over_total",
        &[],
        "Connections closed because the same client id connected again.",
    ),
    m(
        "protocol_errors",
        "outpost_connections_closed_total",
        &[("reason", "protocol_error")],
        "Sensor connections closed by the gateway, by reason.",
    ),
    m("oversize_disconnects", "outpost_connections_closed_total", &[("reason", "oversize")], ""),
    m("keepalive_timeouts", "outpost_connections_closed_total", &[("reason", "keepalive_timeout")], ""),
    m(
        "wills_published",
        "outpost_wills_published_total",
        &[],
        "Wills published for connections that ended abnormally.",
    ),
    m(
        "retained_refused",
        "outpost_retained_refused_total",
        &[],
        "Retained messages not kept because broker.max_retained topics are held.",
    ),
    m(
        "retained_unsaved",
        "outpost_retained_unsaved_total",
        &[],
        "Retained writes the buffer file could not commit; they live in memory only.",
    ),
    m(
        "sessions_unsaved",
        "outpost_sessions_unsaved_total",
        &[],
        "Commits of persistent sessions' changes the buffer file could not take; they live in memory only.",
    ),
    m(
        "sessions_restored",
        "outpost_sessions_restored_total",
        &[],
        "Persistent sessions restored from the buffer file at start-up.",
    ),
    m(
        "topics_refused_control",
        "outpost_publishes_refused_total",
        &[("reason", "topic_control_character")],
        "Publishes refused, by reason (MQTT 5: a PUBACK reason code; 3.1.1: the connection closed).",
    ),
    m(
        "topics_refused_noncharacter",
        "outpost_publishes_refused_total",
        &[("reason", "topic_noncharacter")],
        "",
    ),
    m("topics_refused_levels", "outpost_publishes_refused_total", &[("reason", "topic_levels")], ""),
    m("topics_refused_length", "outpost_publishes_refused_total", &[("reason", "topic_length")], ""),
    m("rejected_full", "outpost_publishes_refused_total", &[("reason", "buffer_full")], ""),
    m(
        "buffer_full_dead_lettered",
        "outpost_buffer_full_dead_lettered_total",
        &[],
        "Window outputs and copies of readings a stateful rule took in that the full buffer refused, written to the dead-letter file instead.",
    ),
    m(
        "buffer_full_letters_failed",
        "outpost_buffer_full_letters_failed_total",
        &[],
        "Of those, letters that could not be written (a window output lost, a reading's sensor told to resend).",
    ),
    m("unrouted", "outpost_events_unrouted_total", &[], "Events no route or rule produced an output for."),
    m(
        "client_events",
        "outpost_client_events_total",
        &[],
        "Client events ($events/...) handed to the rules; only those some rule reads are reported.",
    ),
    m(
        "client_events_dropped",
        "outpost_client_events_dropped_total",
        &[],
        "Client events ($events/...) dropped because the route stage's channel was full.",
    ),
    m(
        "rules_dropped",
        "outpost_rules_dropped_total",
        &[],
        "Events consumed on purpose by a rule's drop action.",
    ),
    m(
        "dead_letters",
        "outpost_dead_letters_total",
        &[],
        "Events sent to the dead-letter store (a rule failed on them, or a dead_letter action).",
    ),
    m(
        "dead_letters_unsaved",
        "outpost_dead_letters_unsaved_total",
        &[],
        "Dead letters counted but not written because the dead-letter store fell behind.",
    ),
    m(
        "republished",
        "outpost_rules_republished_total",
        &[],
        "Rule republish actions published into the local broker.",
    ),
    m(
        "republish_failed",
        "outpost_rules_republish_failures_total",
        &[],
        "Rule republishes the local broker refused.",
    ),
    m(
        "loops_prevented",
        "outpost_rules_loops_prevented_total",
        &[],
        "Republishes refused at the rules' hop limit.",
    ),
    m("rules_reloads", "outpost_rules_reloads_total", &[], "Successful rules reloads."),
    m(
        "rules_reload_failures",
        "outpost_rules_reload_failures_total",
        &[],
        "Refused rules reloads (the running rules stayed).",
    ),
    m(
        "window_checkpoints",
        "outpost_window_checkpoints_total",
        &[],
        "Checkpoints of the stateful rules' state committed to the buffer file.",
    ),
    m(
        "window_checkpoint_bytes",
        "outpost_window_checkpoint_bytes_total",
        &[],
        "Bytes of window state written by checkpoints.",
    ),
    m(
        "window_checkpoints_full",
        "outpost_window_checkpoints_full_total",
        &[],
        "Window checkpoints that wrote a full snapshot (the others wrote deltas only).",
    ),
    m(
        "window_checkpoint_full_bytes",
        "outpost_window_checkpoint_full_bytes_total",
        &[],
        "Bytes of full snapshots written by window checkpoints (the rest are deltas).",
    ),
    m(
        "window_checkpoint_failures",
        "outpost_window_checkpoint_failures_total",
        &[],
        "Window checkpoints that failed; the readings they hold stay unacknowledged.",
    ),
    m(
        "window_state_dropped",
        "outpost_window_state_dropped_total",
        &[],
        "Rules whose checkpointed window state was not restored at start.",
    ),
    m(
        "window_groups_evicted",
        "outpost_window_groups_evicted_total",
        &[],
        "Window groups closed early because their rule had max_groups open.",
    ),
    m("window_late", "outpost_window_late_total", &[], "Readings in no window because it had closed."),
    m(
        "window_ahead",
        "outpost_window_ahead_total",
        &[],
        "Event-time readings in no window because they were too far ahead of the watermark.",
    ),
    m(
        "qos2_duplicates",
        "outpost_window_resends_skipped_total",
        &[],
        "QoS 2 resends (DUP) of readings the stateful rules already took in: not counted again.",
    ),
    m(
        "qos2_marks_dropped",
        "outpost_window_resend_marks_dropped_total",
        &[],
        "QoS 2 markers dropped at their bound; each may cost one double count after a crash.",
    ),
    m("accepted", "outpost_buffer_accepted_total", &[], "Events accepted into the store-and-forward path."),
    m(
        "upstream_acked",
        "outpost_upstream_acknowledged_total",
        &[],
        "Events acknowledged by the upstream broker.",
    ),
    m("upstream_sent", "outpost_upstream_sent_total", &[], "Publishes written upstream, resends included."),
    m(
        "upstream_resent",
        "outpost_upstream_resent_total",
        &[],
        "Publishes sent again after a reconnect or restart (possible duplicates upstream).",
    ),
    m(
        "upstream_connects",
        "outpost_upstream_connects_total",
        &[],
        "Upstream connections established (the first and every reconnect).",
    ),
    m(
        "upstream_failures",
        "outpost_upstream_connection_failures_total",
        &[],
        "Upstream connection attempts or sessions that failed.",
    ),
    m(
        "upstream_failbacks",
        "outpost_upstream_failbacks_total",
        &[],
        "Times the link left another endpoint for the preferred one (upstream.failback_after).",
    ),
    m(
        "upstream_tls_unknown_ca",
        "outpost_upstream_tls_failures_total",
        &[("reason", "unknown_ca")],
        "Upstream TLS handshakes that failed, by reason (also counted in outpost_upstream_connection_failures_total).",
    ),
    m(
        "upstream_tls_server_expired",
        "outpost_upstream_tls_failures_total",
        &[("reason", "server_expired")],
        "",
    ),
    m(
        "upstream_tls_client_expired",
        "outpost_upstream_tls_failures_total",
        &[("reason", "client_expired")],
        "",
    ),
    m("upstream_tls_hostname", "outpost_upstream_tls_failures_total", &[("reason", "hostname")], ""),
    m(
        "upstream_tls_client_cert_required",
        "outpost_upstream_tls_failures_total",
        &[("reason", "client_cert_required")],
        "",
    ),
    m(
        "upstream_tls_client_cert_refused",
        "outpost_upstream_tls_failures_total",
        &[("reason", "client_cert_refused")],
        "",
    ),
    m("upstream_tls_protocol", "outpost_upstream_tls_failures_total", &[("reason", "protocol")], ""),
    m("upstream_tls_other", "outpost_upstream_tls_failures_total", &[("reason", "other")], ""),
    m(
        "acked_before_commit",
        "outpost_buffer_acked_before_commit_total",
        &[],
        "Events acknowledged upstream before they had to be written: never touched the disk.",
    ),
    m("committed", "outpost_buffer_committed_total", &[], "Events written to the buffer file."),
    m("commits", "outpost_buffer_fsyncs_total", &[], "Buffer transactions, one fsync each."),
    m(
        "commit_failures",
        "outpost_buffer_commit_failures_total",
        &[],
        "Buffer transactions that failed (disk full, I/O error) and were retried.",
    ),
    m(
        "upstream_rejected",
        "outpost_events_discarded_total",
        &[("reason", "rejected_upstream")],
        "Events that left the buffer without an upstream acknowledgement, by reason.",
    ),
    m("dropped_overflow", "outpost_events_discarded_total", &[("reason", "overflow")], ""),
    m("expired", "outpost_events_discarded_total", &[("reason", "ttl")], ""),
    m("upstream_poison", "outpost_events_discarded_total", &[("reason", "poison")], ""),
    m(
        "buffer_corrupt",
        "outpost_buffer_corrupt_files_total",
        &[],
        "Buffer files found corrupt at start-up and moved aside.",
    ),
    m(
        "buffer_imported",
        "outpost_buffer_imported_total",
        &[],
        "Events merged in by `outpost buffer import` while the gateway ran.",
    ),
    m(
        "local_delivered",
        "outpost_local_deliveries_total",
        &[],
        "Deliveries written to local subscribers (QoS 1 resends included).",
    ),
    m(
        "local_dropped",
        "outpost_local_deliveries_dropped_total",
        &[],
        "Deliveries to local subscribers dropped because their queue was full.",
    ),
    m(
        "local_expired",
        "outpost_local_deliveries_skipped_total",
        &[("reason", "expired")],
        "Deliveries to local subscribers not sent, by reason: message expiry passed, or larger than the subscriber's maximum packet size.",
    ),
    m("local_too_large", "outpost_local_deliveries_skipped_total", &[("reason", "too_large")], ""),
    m(
        "shared_redelivered",
        "outpost_shared_deliveries_handed_over_total",
        &[("outcome", "redelivered")],
        "Shared-subscription deliveries left by a session that ended: given to another member of the group, or dropped with no member to take them.",
    ),
    m("shared_dropped", "outpost_shared_deliveries_handed_over_total", &[("outcome", "dropped")], ""),
    m(
        "sessions_evicted",
        "outpost_sessions_ended_total",
        &[("reason", "evicted")],
        "Persistent sessions ended by the gateway, by reason.",
    ),
    m("sessions_expired", "outpost_sessions_ended_total", &[("reason", "expired")], ""),
    m(
        "auth_failed",
        "outpost_auth_refused_total",
        &[("reason", "bad_credentials")],
        "CONNECTs refused by the password check or allow_anonymous, by reason.",
    ),
    m("auth_anonymous_refused", "outpost_auth_refused_total", &[("reason", "anonymous")], ""),
    m(
        "acl_publish_denied",
        "outpost_acl_denied_total",
        &[("action", "publish")],
        "Operations the ACL file denied, by action (publish dropped, subscription refused, delivery or will withheld).",
    ),
    m("acl_subscribe_denied", "outpost_acl_denied_total", &[("action", "subscribe")], ""),
    m("acl_delivery_denied", "outpost_acl_denied_total", &[("action", "deliver")], ""),
    m("acl_will_denied", "outpost_acl_denied_total", &[("action", "will")], ""),
    m(
        "auth_reloads",
        "outpost_auth_reloads_total",
        &[("result", "ok")],
        "Reloads of the password and ACL files (SIGHUP), by result; a failed one keeps the files in force.",
    ),
    m("auth_reload_failures", "outpost_auth_reloads_total", &[("result", "failed")], ""),
    m(
        "inbound_received",
        "outpost_inbound_messages_total",
        &[("result", "received")],
        "Commands from the cloud ([[upstream.subscribe]]): received, delivered into the local broker and rules, or refused (by the topic mapping or the ACL).",
    ),
    m("inbound_delivered", "outpost_inbound_messages_total", &[("result", "delivered")], ""),
    m("inbound_refused_mapping", "outpost_inbound_messages_total", &[("result", "refused_mapping")], ""),
    m("inbound_refused_acl", "outpost_inbound_messages_total", &[("result", "refused_acl")], ""),
    m(
        "inbound_not_forwarded",
        "outpost_inbound_not_forwarded_total",
        &[],
        "Forwards not made because the event came from upstream: nothing from the cloud goes back to it.",
    ),
    m(
        "inbound_connects",
        "outpost_inbound_connections_total",
        &[("result", "ok")],
        "Inbound connection attempts, by result.",
    ),
    m("inbound_failures", "outpost_inbound_connections_total", &[("result", "failed")], ""),
    m(
        "inbound_subscribe_refused",
        "outpost_inbound_subscriptions_refused_total",
        &[],
        "[[upstream.subscribe]] filters the upstream refused in its SUBACK.",
    ),
    m(
        "tls_handshakes",
        "outpost_tls_handshakes_total",
        &[("result", "ok")],
        "TLS handshakes on the sensor listener, by result (failed: by reason).",
    ),
    m("tls_handshakes_failed_timeout", "outpost_tls_handshakes_total", &[("result", "timeout")], ""),
    m("tls_handshakes_failed_busy", "outpost_tls_handshakes_total", &[("result", "busy")], ""),
    m(
        "tls_handshakes_failed_certificate",
        "outpost_tls_handshakes_total",
        &[("result", "bad_certificate")],
        "",
    ),
    m("tls_handshakes_failed_identity", "outpost_tls_handshakes_total", &[("result", "no_identity")], ""),
    m("tls_handshakes_failed_protocol", "outpost_tls_handshakes_total", &[("result", "protocol")], ""),
    m(
        "tls_reloads",
        "outpost_tls_reloads_total",
        &[("result", "ok")],
        "Reloads of the TLS listener's certificates (SIGHUP), by result; a failed one keeps those in force.",
    ),
    m("tls_reload_failures", "outpost_tls_reloads_total", &[("result", "failed")], ""),
    m(
        "publish_rate_limited",
        "outpost_publish_rate_limited_total",
        &[],
        "Times a sensor's socket was left unread because it published faster than its rate limit.",
    ),
    m(
        "subscriptions_refused_limit",
        "outpost_subscriptions_refused_total",
        &[("reason", "max_subscriptions")],
        "Subscriptions refused because the client holds broker.max_subscriptions filters.",
    ),
    m(
        "tap_missed",
        "outpost_tap_missed_total",
        &[],
        "Tap records a viewer (outpost tap) missed because it read too slowly; the pipeline never waits for one.",
    ),
];

/// Everything one scrape shows, read before encoding.
#[derive(Debug)]
pub struct Scrape {
    pub counters: Vec<(&'static str, u64)>,
    pub sensors_connected: u64,
    pub buffered_events: u64,
    pub upstream_connected: u64,
    pub local_subscriptions: u64,
    pub offline_sessions: u64,
    /// The configured upstream endpoints (`mqtt://host:port`), the label of
    /// `outpost_upstream_connected`: `(endpoint, connected, connects, failures)`.
    pub upstream_endpoints: Vec<(String, bool, u64, u64)>,
    /// 1 while the inbound connection (`[[upstream.subscribe]]`) is up and subscribed.
    pub inbound_connected: u64,
    pub tls_handshakes_in_progress: u64,
    pub tap_viewers: u64,
    pub wakeup_coalescing_active: u64,
    /// Per rule name: matched, outputs, errors.
    pub rules: Vec<(String, u64, u64, u64)>,
    /// The committed part of the buffer, when the store thread answered.
    pub store: Option<StatsReport>,
    pub capacity_events: u64,
    pub capacity_bytes: u64,
    /// The size of `dead-letters-upstream.jsonl`, when it could be read.
    pub dead_letters_upstream_bytes: Option<u64>,
    pub histograms: [(&'static str, &'static str, HistogramSnapshot); 3],
    pub process: ProcessStats,
    /// The endpoint's own counters: requests, 401s, connections refused at the limit.
    pub http: (u64, u64, u64),
    pub version: &'static str,
}

impl Scrape {
    pub fn read(
        metrics: &Metrics,
        store: Option<StatsReport>,
        capacity: (u64, u64),
        dead_letters_upstream_bytes: Option<u64>,
    ) -> Scrape {
        let g = metrics.gauges();
        let h = metrics.histograms();
        Scrape {
            counters: metrics.counters().snapshot(),
            sensors_connected: Metrics::get(&g.sensors_connected),
            buffered_events: Metrics::get(&g.buffered_events),
            upstream_connected: Metrics::get(&g.upstream_connected),
            local_subscriptions: Metrics::get(&g.local_subscriptions),
            offline_sessions: Metrics::get(&g.offline_sessions),
            upstream_endpoints: endpoint_samples(metrics),
            inbound_connected: Metrics::get(&g.inbound_connected),
            tls_handshakes_in_progress: Metrics::get(&g.tls_handshakes_in_progress),
            tap_viewers: Metrics::get(&g.tap_viewers),
            wakeup_coalescing_active: Metrics::get(&g.wakeup_coalescing_active),
            rules: metrics.rules().snapshot(),
            store,
            capacity_events: capacity.0,
            capacity_bytes: capacity.1,
            dead_letters_upstream_bytes,
            histograms: [
                (
                    "outpost_puback_hold_seconds",
                    "Time from a sensor's QoS 1/2 publish to its PUBACK (the event is safe).",
                    h.puback_hold.snapshot(),
                ),
                (
                    "outpost_buffer_commit_duration_seconds",
                    "Duration of one buffer transaction, fsync included.",
                    h.commit_duration.snapshot(),
                ),
                (
                    "outpost_upstream_round_trip_seconds",
                    "Time from an upstream PUBLISH written to its PUBACK read.",
                    h.upstream_round_trip.snapshot(),
                ),
            ],
            process: ProcessStats::read(),
            http: (
                Metrics::get(&metrics.http().requests),
                Metrics::get(&metrics.http().unauthorized),
                Metrics::get(&metrics.http().connections_refused),
            ),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// Each configured endpoint: its URL, whether the link is on it, its connects and failures.
fn endpoint_samples(metrics: &Metrics) -> Vec<(String, bool, u64, u64)> {
    let endpoints = metrics.endpoints();
    let current = endpoints.current().map(|c| c.url.as_str());
    let connected = Metrics::get(&metrics.gauges().upstream_connected) == 1;
    endpoints
        .list()
        .iter()
        .map(|ep| {
            let up = connected && current == Some(ep.url.as_str());
            (ep.url.clone(), up, Metrics::get(&ep.connects), Metrics::get(&ep.failures))
        })
        .collect()
}

/// Writes the scrape in the Prometheus text format.
pub fn encode(scrape: Scrape) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// `(label, value)` pairs of one sample.
type Labels<'a> = Vec<(&'a str, &'a str)>;

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, u64)],
) -> Result<(), std::fmt::Error> {
    // The encoder appends `_total` to counters itself.
    let base = name.strip_suffix("_total").unwrap_or(name);
    let mut metric = encoder.encode_descriptor(base, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    gauge_family(encoder, name, help, &[(Vec::new(), value)])
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        // Counters, grouped into their families in table order.
        let value = |name: &str| self.counters.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let mut idx = 0;
        while let Some(first) = COUNTERS.get(idx) {
            let family: Vec<&Mapping> =
                COUNTERS[idx..].iter().take_while(|m| m.metric == first.metric).collect();
            idx += family.len();
            let samples: Vec<(Labels<'_>, u64)> =
                family.iter().filter_map(|m| Some((m.labels.to_vec(), value(m.counter)?))).collect();
            counter_family(e, first.metric, first.help, &samples)?;
        }
        for (name, v) in &self.counters {
            if !COUNTERS.iter().any(|m| m.counter == *name) {
                counter_family(
                    e,
                    &format!("outpost_{name}_total"),
                    "Not yet mapped (see http/exposition.rs).",
                    &[(Vec::new(), *v)],
                )?;
            }
        }

        // Per rule: names come from the rules file, so the label set is bounded by it.
        let per_rule = |pick: fn(&(String, u64, u64, u64)) -> u64| -> Vec<(Labels<'_>, u64)> {
            self.rules.iter().map(|r| (vec![("rule", r.0.as_str())], pick(r))).collect()
        };
        counter_family(
            e,
            "outpost_rule_matched_total",
            "Events a rule's actions ran on (its FROM and WHERE held), by rule.",
            &per_rule(|r| r.1),
        )?;
        counter_family(
            e,
            "outpost_rule_outputs_total",
            "Outputs a rule produced (forwards, republishes, drops, deliberate dead letters), by rule.",
            &per_rule(|r| r.2),
        )?;
        counter_family(
            e,
            "outpost_rule_errors_total",
            "Events a rule failed on (sent to the dead letters), by rule.",
            &per_rule(|r| r.3),
        )?;

        let (requests, unauthorized, refused) = self.http;
        counter_family(
            e,
            "outpost_http_requests_total",
            "Requests to this endpoint.",
            &[(Vec::new(), requests)],
        )?;
        counter_family(
            e,
            "outpost_http_unauthorized_total",
            "Requests refused for a missing or wrong bearer token.",
            &[(Vec::new(), unauthorized)],
        )?;
        counter_family(
            e,
            "outpost_http_connections_refused_total",
            "Connections closed at once because the endpoint's connection limit was reached.",
            &[(Vec::new(), refused)],
        )?;

        gauge(e, "outpost_connections", "Sensor connections open now.", self.sensors_connected as f64)?;
        gauge(
            e,
            "outpost_local_subscriptions",
            "Subscriptions held by local sessions.",
            self.local_subscriptions as f64,
        )?;
        gauge(
            e,
            "outpost_offline_sessions",
            "Persistent sessions whose client is offline.",
            self.offline_sessions as f64,
        )?;
        gauge(
            e,
            "outpost_tls_handshakes_in_progress",
            "TLS handshakes in progress on the sensor listener.",
            self.tls_handshakes_in_progress as f64,
        )?;
        gauge(
            e,
            "outpost_inbound_connected",
            "1 while the inbound connection (commands from the cloud) is up and subscribed.",
            self.inbound_connected as f64,
        )?;
        gauge(
            e,
            "outpost_tap_viewers",
            "Viewers attached to the tap (outpost tap).",
            self.tap_viewers as f64,
        )?;
        gauge(
            e,
            "outpost_wakeup_coalescing_active",
            "1 while the runtime thread waits wakeup_coalescing before it sleeps when busy; 0 while it does not (off, or waiting would slow a client that publishes once per PUBACK).",
            self.wakeup_coalescing_active as f64,
        )?;
        let connected: Vec<(Labels<'_>, f64)> = if self.upstream_endpoints.is_empty() {
            vec![(vec![("endpoint", "none")], self.upstream_connected as f64)]
        } else {
            self.upstream_endpoints
                .iter()
                .map(|(url, up, _, _)| (vec![("endpoint", url.as_str())], if *up { 1.0 } else { 0.0 }))
                .collect()
        };
        gauge_family(
            e,
            "outpost_upstream_connected",
            "1 while the upstream connection is up, per configured endpoint.",
            &connected,
        )?;
        let per_endpoint = |pick: fn(&(String, bool, u64, u64)) -> u64| -> Vec<(Labels<'_>, u64)> {
            self.upstream_endpoints.iter().map(|ep| (vec![("endpoint", ep.0.as_str())], pick(ep))).collect()
        };
        counter_family(
            e,
            "outpost_upstream_endpoint_connects_total",
            "Upstream connections established, per configured endpoint.",
            &per_endpoint(|ep| ep.2),
        )?;
        counter_family(
            e,
            "outpost_upstream_endpoint_failures_total",
            "Failed upstream connection attempts (failback probes included) and lost connections, per configured endpoint.",
            &per_endpoint(|ep| ep.3),
        )?;

        gauge(
            e,
            "outpost_buffer_events",
            "Events held by the relay, in memory and on disk, as of its last loop turn.",
            self.buffered_events as f64,
        )?;
        gauge(e, "outpost_buffer_capacity_events", "buffer.max_events.", self.capacity_events as f64)?;
        gauge(e, "outpost_buffer_capacity_bytes", "buffer.max_bytes.", self.capacity_bytes as f64)?;
        if let Some(bytes) = self.dead_letters_upstream_bytes {
            gauge(
                e,
                "outpost_dead_letters_upstream_bytes",
                "Size of dead-letters-upstream.jsonl (poison events, outputs a full buffer refused): each line is its event's only copy; Outpost never shrinks it, delete it once dealt with.",
                bytes as f64,
            )?;
        }
        gauge(
            e,
            "outpost_buffer_store_up",
            "1 when the store thread answered this scrape within 1 s.",
            if self.store.is_some() { 1.0 } else { 0.0 },
        )?;
        if let Some(store) = &self.store {
            let priorities: Vec<String> = store.priorities.iter().map(|p| p.priority.to_string()).collect();
            let per_priority = |f: &dyn Fn(&crate::buffer::inspect::PriorityStats) -> Option<f64>| {
                store
                    .priorities
                    .iter()
                    .zip(&priorities)
                    .filter_map(|(p, label)| Some((vec![("priority", label.as_str())], f(p)?)))
                    .collect::<Vec<_>>()
            };
            gauge_family(
                e,
                "outpost_buffer_committed_events",
                "Events in the buffer file, by priority (0 most urgent).",
                &per_priority(&|p| Some(p.events as f64)),
            )?;
            gauge_family(
                e,
                "outpost_buffer_committed_bytes",
                "Bytes of events in the buffer file, by priority.",
                &per_priority(&|p| Some(p.bytes as f64)),
            )?;
            gauge_family(
                e,
                "outpost_buffer_oldest_event_age_seconds",
                "Age of the oldest event in the buffer file, by priority.",
                &per_priority(&|p| p.oldest_age_s),
            )?;
            gauge(e, "outpost_buffer_file_bytes", "Size of the buffer file.", store.file_bytes as f64)?;
        }

        for (name, help, snapshot) in &self.histograms {
            let mut metric = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                snapshot.sum_seconds,
                snapshot.count,
                &snapshot.buckets,
                None,
            )?;
        }

        if let Some(rss) = self.process.resident_bytes {
            gauge(e, "outpost_process_resident_memory_bytes", "Resident memory (VmRSS).", rss as f64)?;
        }
        if let Some(fds) = self.process.open_fds {
            gauge(e, "outpost_process_open_fds", "Open file descriptors.", fds as f64)?;
        }
        gauge_family(
            e,
            "outpost_build_info",
            "Always 1; the version is in the label.",
            &[(vec![("version", self.version)], 1.0)],
        )
    }
}

/// Process statistics from `/proc/self` (Linux); `None` where it cannot be read.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads procfs: in-memory files answered by the kernel without touching a disk, so this
    /// runs on the async runtime like any other short computation.
    pub fn read() -> ProcessStats {
        let resident_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| vm_rss_bytes(&s));
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64);
        ProcessStats { resident_bytes, open_fds }
    }
}

/// `VmRSS:    1234 kB` → bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::buffer::inspect::PriorityStats;

    #[test]
    fn every_counter_is_mapped_once_with_prometheus_names() {
        let metrics = Metrics::default();
        let fields: Vec<&str> = metrics.counters().snapshot().into_iter().map(|(n, _)| n).collect();
        for field in &fields {
            let n = COUNTERS.iter().filter(|m| m.counter == *field).count();
            assert_eq!(n, 1, "counter `{field}` needs exactly one row in COUNTERS (has {n})");
        }
        for m in COUNTERS {
            assert!(
                fields.contains(&m.counter),
                "COUNTERS maps `{}`, which metrics.rs does not have",
                m.counter
            );
            assert!(m.metric.starts_with("outpost_") && m.metric.ends_with("_total"), "{}", m.metric);
            assert!(m.metric.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", m.metric);
        }
        // A family is contiguous, its first row has the help, and its label sets differ.
        let mut seen = HashSet::new();
        let mut previous = "";
        for m in COUNTERS {
            if m.metric != previous {
                assert!(seen.insert(m.metric), "{} is split; keep a family's rows together", m.metric);
                assert!(!m.help.is_empty(), "{} needs help text on its first row", m.metric);
                previous = m.metric;
            }
        }
        let label_sets: HashSet<(&str, Vec<(&str, &str)>)> =
            COUNTERS.iter().map(|m| (m.metric, m.labels.to_vec())).collect();
        assert_eq!(label_sets.len(), COUNTERS.len(), "two rows give the same sample");
    }

    fn sample_scrape() -> Scrape {
        let metrics = Metrics::default();
        Metrics::add(&metrics.counters().ingested, 7);
        Metrics::add(&metrics.counters().expired, 2);
        Metrics::add(&metrics.counters().dropped_overflow, 3);
        metrics.endpoints().configure(["mqtt://10.0.0.5:1883".to_owned(), "mqtt://10.0.0.6:1883".to_owned()]);
        metrics.set_upstream_endpoint(Some(0));
        Metrics::add(&metrics.endpoints().list()[1].failures, 4);
        Metrics::set(&metrics.gauges().inbound_connected, 1);
        Metrics::add(&metrics.counters().ingested_qos1, 7);
        Metrics::add(&metrics.counters().accepted_listen_v5, 2);
        Metrics::add(&metrics.rules().get(&"to_cloud".into()).errors, 4);
        metrics.histograms().commit_duration.observe(0.003);
        let store = StatsReport {
            events: 5,
            bytes: 500,
            file_bytes: 4096,
            priorities: vec![PriorityStats { priority: 2, events: 5, bytes: 500, oldest_age_s: Some(1.5) }],
        };
        Scrape::read(&metrics, Some(store), (1000, 2048), Some(345))
    }

    #[test]
    fn the_exposition_has_conventional_names_types_and_labels() {
        let text = encode(sample_scrape()).expect("encodes");
        for line in [
            "# TYPE outpost_messages_received_total counter",
            "outpost_messages_received_total 7",
            "outpost_events_discarded_total{reason=\"ttl\"} 2",
            "outpost_events_discarded_total{reason=\"overflow\"} 3",
            "outpost_events_discarded_total{reason=\"poison\"} 0",
            "outpost_inbound_connected 1.0",
            "outpost_messages_received_by_qos_total{qos=\"1\"} 7",
            "outpost_connections_accepted_total{listener=\"broker.listen_v5\"} 2",
            "outpost_rule_errors_total{rule=\"to_cloud\"} 4",
            "outpost_rule_matched_total{rule=\"to_cloud\"} 0",
            "outpost_tap_viewers 0.0",
            "outpost_wakeup_coalescing_active 0.0",
            "# TYPE outpost_upstream_connected gauge",
            "outpost_upstream_connected{endpoint=\"mqtt://10.0.0.5:1883\"} 1.0",
            "outpost_upstream_connected{endpoint=\"mqtt://10.0.0.6:1883\"} 0.0",
            "outpost_upstream_endpoint_failures_total{endpoint=\"mqtt://10.0.0.6:1883\"} 4",
            "outpost_buffer_committed_events{priority=\"2\"} 5.0",
            "outpost_buffer_oldest_event_age_seconds{priority=\"2\"} 1.5",
            "outpost_buffer_capacity_bytes 2048.0",
            "# TYPE outpost_buffer_commit_duration_seconds histogram",
            "outpost_buffer_commit_duration_seconds_bucket{le=\"0.0025\"} 0",
            "outpost_buffer_commit_duration_seconds_bucket{le=\"0.005\"} 1",
            "outpost_buffer_commit_duration_seconds_bucket{le=\"+Inf\"} 1",
            "outpost_buffer_commit_duration_seconds_count 1",
            "outpost_build_info{version=\"0.1.0\"} 1.0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        // A family's TYPE line comes once.
        assert_eq!(text.matches("# TYPE outpost_events_discarded_total counter").count(), 1, "{text}");
        assert!(text.lines().any(|l| l.starts_with("outpost_process_resident_memory_bytes ")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("outpost_process_open_fds ")), "{text}");
    }

    #[test]
    fn without_a_store_answer_the_buffer_file_metrics_are_absent_and_store_up_is_zero() {
        let mut scrape = sample_scrape();
        scrape.store = None;
        let text = encode(scrape).expect("encodes");
        assert!(text.lines().any(|l| l == "outpost_buffer_store_up 0.0"), "{text}");
        assert!(!text.contains("outpost_buffer_committed_events"), "{text}");
    }

    #[test]
    fn the_readme_table_is_this_table() {
        let readme = include_str!("../../../README.md");
        let rows: Vec<&str> =
            readme.lines().filter(|l| l.starts_with("| `") && l.contains("` | `outpost_")).collect();
        let expected: Vec<String> = COUNTERS
            .iter()
            .map(|m| {
                let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                let labels =
                    if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
                format!("| `{}` | `{}{labels}` |", m.counter, m.metric)
            })
            .collect();
        assert_eq!(rows, expected, "README.md's \"Metrics and health\" table differs from COUNTERS");
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        assert_eq!(vm_rss_bytes("Name:\toutpost\nVmRSS:\t    1234 kB\nThreads: 3\n"), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name:\toutpost\n"), None);
    }
}
