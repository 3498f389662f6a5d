//! Counters every stage updates and operators read.
//!
//! Stages share one [`Metrics`] handle (an `Arc` of atomics): counting never blocks and never
//! takes a lock. Nothing else is shared between stages. Each counter says what happened to
//! events, so "nothing lost" can be checked as arithmetic: ingested = forwarded + buffered +
//! every counted drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mqtt::topic::NameError;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters since start-up.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// A point-in-time copy, as `(name, value)` pairs in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![
                    $((stringify!($name), self.$name.load(Ordering::Relaxed)),)*
                ]
            }
        }
    };
}

counters! {
    /// Publishes read from sensor connections (and wills) and handed to the route stage.
    ingested,
    /// `ingested` split by the publisher's QoS (wills by the will's QoS).
    ingested_qos0,
    ingested_qos1,
    ingested_qos2,
    /// Publishes that had to wait for room in the pipeline (their sensor was slowed down).
    ingest_throttled,
    /// Sensor connections accepted (CONNACK success).
    sensor_connects,
    /// TCP connections accepted, by listener (`broker.listen`, `broker.listen_v5`,
    /// `broker.tls.listen`), before
    /// their CONNECT.
    accepted_listen,
    accepted_listen_v5,
    accepted_tls,
    /// CONNECTs refused with a reason code (credentials, id, server busy).
    sensor_refused,
    /// Of those, refused at `broker.max_connections_per_address`.
    sensor_refused_per_address,
    /// Connections closed because the same client id connected again.
    sensor_takeovers,
    /// Connections closed for a malformed packet or a protocol violation.
    protocol_errors,
    /// Connections closed for a packet over `broker.max_payload`.
    oversize_disconnects,
    /// Connections closed because the client stayed silent past 1.5 × its keepalive.
    keepalive_timeouts,
    wills_published,
    /// Retained messages refused because `broker.max_retained` topics are held.
    retained_refused,
    /// Retained writes the buffer file could not commit (kept in memory only until the
    /// next successful write of the same topic).
    retained_unsaved,
    /// Commits of persistent sessions' changes (queued deliveries, subscriptions) that failed:
    /// those changes live in memory only.
    sessions_unsaved,
    /// Persistent sessions restored from the buffer file at start-up.
    sessions_restored,
    /// Events that matched no route (bridge) or no rule produced anything for (rules).
    /// Client events (`$events/...`) are never counted here.
    unrouted,
    /// Client events (`$events/...`) the broker handed to the rules: only those some rule reads.
    client_events,
    /// Client events not handed over because the route stage's channel was full: dropped,
    /// never waited for (a connection is never held up by an event about it).
    client_events_dropped,
    /// Events consumed on purpose by a rule's `drop` action.
    rules_dropped,
    /// Events sent to the dead-letter store (a rule failed on them, or a `dead_letter` action
    /// sent them): one per event, however many rules.
    dead_letters,
    /// Dead letters counted but not kept because the dead-letter store fell behind.
    dead_letters_unsaved,
    /// Rule `republish` actions published into the local broker.
    republished,
    /// Republishes the local broker link refused (full).
    republish_failed,
    /// Republishes refused because the event reached the rules' hop limit.
    loops_prevented,
    /// Successful rule reloads (SIGHUP or file change).
    rules_reloads,
    /// Rejected rule reloads; the running rules stayed.
    rules_reload_failures,
    /// Checkpoints of the stateful rules' state committed to the buffer file.
    window_checkpoints,
    /// Bytes of state those checkpoints wrote.
    window_checkpoint_bytes,
    /// Of those, the ones holding a full snapshot (the others are deltas only).
    window_checkpoints_full,
    /// Bytes of the full snapshots among them (the rest of `window_checkpoint_bytes` is deltas).
    window_checkpoint_full_bytes,
    /// Checkpoints that failed (retried; the readings they held stay unacknowledged).
    window_checkpoint_failures,
    /// Rules whose checkpointed state was not restored at start (their window or aggregates
    /// changed while the gateway was stopped, or the checkpoint did not decode).
    window_state_dropped,
    /// Groups closed early because a rule had `max_groups` open (all rules, since the state
    /// began: restored from the checkpoint).
    window_groups_evicted,
    /// Readings in no window because their window had already closed.
    window_late,
    /// Event-time readings in no window because they were too far ahead of the rule's
    /// watermark (more open windows than a group may keep).
    window_ahead,
    /// QoS 2 readings sent again (DUP) whose first copy the stateful rules had taken in (its
    /// marker was set): not counted again in windows or report by exception.
    qos2_duplicates,
    /// QoS 2 markers dropped at the bound (`window::MAX_MARKS`): each may cost one reading
    /// counted twice after a crash, never one lost.
    qos2_marks_dropped,
    /// Events accepted into the store-and-forward path.
    accepted,
    /// Events acknowledged by the upstream broker (PUBACK).
    upstream_acked,
    /// Events the upstream refused with an MQTT 5 PUBACK reason code; discarded.
    upstream_rejected,
    /// Publishes sent upstream, resends included.
    upstream_sent,
    /// Publishes sent again after a reconnect or restart (possible duplicates upstream).
    upstream_resent,
    /// Upstream connections established.
    upstream_connects,
    /// Upstream connection attempts or sessions that failed.
    upstream_failures,
    /// Times the link left another endpoint for the preferred one (`upstream.failback_after`).
    upstream_failbacks,
    // Failed upstream TLS handshakes by reason (`uplink::transport::TlsReason`); each is also
    // an `upstream_failures`.
    /// The server's certificate is not issued by a trusted CA (`upstream.tls.ca_file`).
    upstream_tls_unknown_ca,
    /// The server's certificate is expired or not yet valid.
    upstream_tls_server_expired,
    /// The server refused our client certificate as expired.
    upstream_tls_client_expired,
    /// The server's certificate is not valid for the name connected to.
    upstream_tls_hostname,
    /// The server requires a client certificate and got none.
    upstream_tls_client_cert_required,
    /// The server refused our client certificate.
    upstream_tls_client_cert_refused,
    /// No TLS version or cipher suite in common.
    upstream_tls_protocol,
    /// Any other TLS failure (not a TLS server, a broken record).
    upstream_tls_other,
    /// Events acknowledged upstream before they had to be written: never touched the disk.
    acked_before_commit,
    /// Events written to the buffer file.
    committed,
    /// Buffer transactions (one fsync each).
    commits,
    /// Buffer transactions that failed (disk full, I/O error); retried.
    commit_failures,
    /// Events discarded because the buffer was full and the policy is drop_oldest.
    dropped_overflow,
    /// Events refused because the buffer was full and the policy is reject_new.
    rejected_full,
    /// Copies no sensor would resend (window outputs, copies of readings a stateful rule
    /// took in) that the full buffer refused (`reject_new`), written to the dead-letter file
    /// instead: their readings stay acknowledged, nothing is lost.
    buffer_full_dead_lettered,
    /// Of those, letters that could not be written: a window output lost, a reading's sensor
    /// told to resend it.
    buffer_full_letters_failed,
    /// Events discarded because their route's TTL passed before they could be sent.
    expired,
    /// Buffer files whose contents were found corrupt at start-up and moved aside.
    buffer_corrupt,
    /// Events merged into the buffer by `outpost buffer import` while the gateway ran.
    buffer_imported,
    /// Publishes refused because their topic holds a control character (U+0001–U+001F,
    /// U+007F–U+009F): MQTT 5 got PUBACK 0x90, MQTT 3.1.1 its connection closed.
    topics_refused_control,
    /// Publishes refused because their topic holds a Unicode non-character.
    topics_refused_noncharacter,
    /// Publishes refused because their topic has more than `broker.max_topic_levels` levels.
    topics_refused_levels,
    /// Publishes refused because their topic is longer than `broker.max_topic_length`.
    topics_refused_length,
    /// Events the upstream closed the link over `upstream.poison_after` times in a row: moved
    /// to the dead-letter store and deleted from the buffer, so the events behind them go on.
    upstream_poison,
    // Local fan-out (`broker::local`).
    /// Deliveries written to local subscribers (QoS 1 resends included).
    local_delivered,
    /// Deliveries to local subscribers dropped because the subscriber's queue was full
    /// (`broker.max_queued_messages`): it read too slowly, or was offline.
    local_dropped,
    /// Deliveries to local subscribers not sent because their MQTT 5 message expiry passed
    /// while they were queued.
    local_expired,
    /// Deliveries to local subscribers not sent because they exceed the maximum packet size
    /// the subscriber announced in its CONNECT (MQTT 5).
    local_too_large,
    /// Shared-subscription deliveries handed to another member of their group because the
    /// session they were queued or in flight for ended first (MQTT 5, 4.8.2).
    shared_redelivered,
    /// Shared-subscription QoS 1/2 deliveries lost because their session ended first and no
    /// other member of the group was left to take them (or its queue was full).
    shared_dropped,
    /// Persistent sessions ended because `broker.max_offline_sessions` were offline already.
    sessions_evicted,
    /// Persistent sessions ended because their MQTT 5 session expiry passed.
    sessions_expired,
    // Users and ACLs (`broker::access`).
    /// CONNECTs refused for a wrong username or password (CONNACK 4 / 0x86).
    auth_failed,
    /// CONNECTs without a username refused because `broker.allow_anonymous` is false
    /// (CONNACK 5 / 0x87).
    auth_anonymous_refused,
    /// Publishes the ACL does not let their client write: dropped (MQTT 5 PUBACK 0x87, 3.1.1
    /// acknowledged and dropped, as mosquitto does).
    acl_publish_denied,
    /// Subscriptions refused because the ACL lets their client read nothing they match
    /// (SUBACK 0x80 / 0x87).
    acl_subscribe_denied,
    /// Deliveries (retained ones included) not sent because the ACL does not let the
    /// subscriber read their topic.
    acl_delivery_denied,
    /// Wills not published because the ACL does not let their client write the will topic.
    acl_will_denied,
    // Commands from the cloud (`uplink::inbound`).
    /// Messages received on the inbound connection (`[[upstream.subscribe]]`).
    inbound_received,
    /// Inbound messages published into the local broker and handed to the route stage.
    inbound_delivered,
    /// Inbound messages whose upstream topic the mapping refused (not starting with
    /// `strip_prefix`, a `$` or invalid local topic): acknowledged upstream, not delivered.
    inbound_refused_mapping,
    /// Inbound messages the ACL does not let `upstream.inbound_acl_user` write: acknowledged
    /// upstream, not delivered.
    inbound_refused_acl,
    /// Forwards not made because the event came from upstream (a bridge route or a rule would
    /// have sent a command back to the cloud).
    inbound_not_forwarded,
    /// Inbound connections established.
    inbound_connects,
    /// Inbound connection attempts or sessions that failed.
    inbound_failures,
    /// Subscriptions (`[[upstream.subscribe]]` filters) the upstream refused in its SUBACK.
    inbound_subscribe_refused,
    /// Password and ACL files reloaded (SIGHUP).
    auth_reloads,
    /// Reloads refused because a file was unreadable or invalid; the files in force stayed.
    auth_reload_failures,
    // The TLS listener (`broker::tls`).
    /// TLS handshakes completed.
    tls_handshakes,
    /// TLS handshakes not finished within `broker.connection_timeout` (a slowloris, or a
    /// client that speaks plain MQTT to the TLS port).
    tls_handshakes_failed_timeout,
    /// Connections closed unread because `broker.tls.max_handshakes` were in progress.
    tls_handshakes_failed_busy,
    /// TLS handshakes refused over the client certificate: none when one is required, or
    /// one `broker.tls.ca_file` does not verify (expired, another CA, wrong usage).
    tls_handshakes_failed_certificate,
    /// TLS handshakes whose verified client certificate lacks the name
    /// `use_identity_as_username` asks for.
    tls_handshakes_failed_identity,
    /// Other failed TLS handshakes: not TLS, no common version or cipher suite, closed.
    tls_handshakes_failed_protocol,
    /// Certificate reloads (SIGHUP).
    tls_reloads,
    /// Certificate reloads refused (a file unreadable or invalid); the certificates in force
    /// stayed.
    tls_reload_failures,
    // Per-client limits.
    /// Times a connection's socket was left unread because it published faster than
    /// `broker.max_publish_rate` or `max_publish_bytes_rate`.
    publish_rate_limited,
    /// Subscriptions refused because their client holds `broker.max_subscriptions` filters.
    subscriptions_refused_limit,
    // The tap (`tap.rs`).
    /// Tap records a viewer (`outpost tap`) missed because it read too slowly: its queue was
    /// full, and the stage did not wait.
    tap_missed,
}

/// A shareable handle to the gateway's counters.
/// Values that go up and down; read by `$SYS/outpost/…` and the admin socket.
#[derive(Debug, Default)]
pub struct Gauges {
    pub sensors_connected: AtomicU64,
    /// Events held by the relay (memory and disk) as of its last loop turn.
    pub buffered_events: AtomicU64,
    /// 1 while an upstream connection is up.
    pub upstream_connected: AtomicU64,
    /// 1 while the inbound connection (`[[upstream.subscribe]]`) is up and subscribed.
    pub inbound_connected: AtomicU64,
    // Local fan-out (`broker::local`).
    /// Subscriptions held by local sessions (connected and offline).
    pub local_subscriptions: AtomicU64,
    /// Persistent sessions whose client is offline.
    pub offline_sessions: AtomicU64,
    /// TLS handshakes in progress on the sensor side.
    pub tls_handshakes_in_progress: AtomicU64,
    /// Viewers attached to the tap (`outpost tap`).
    pub tap_viewers: AtomicU64,
    /// 1 while the runtime thread waits `wakeup_coalescing` before it sleeps when busy (the
    /// publishes arrive on the sensors' own clock); 0 while it does not (off, or waiting
    /// would slow a client that publishes once per PUBACK).
    pub wakeup_coalescing_active: AtomicU64,
    /// 1 while the relay's last turn left its upstream send window full (it waits for PUBACKs
    /// to send more): the runtime thread then sleeps without waiting (`coalesce`). Not exported.
    pub upstream_window_full: AtomicU64,
    /// Signalled whenever `upstream_connected` changes, so `$SYS/outpost/upstream` follows at
    /// once instead of at the next `broker.sys_interval`.
    pub upstream_changed: tokio::sync::Notify,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<(Counters, Gauges, Operations)>,
}

impl Metrics {
    pub fn counters(&self) -> &Counters {
        &self.inner.0
    }

    pub fn gauges(&self) -> &Gauges {
        &self.inner.1
    }

    /// Sets `upstream_connected` and wakes whoever shows it (`$SYS/outpost/upstream`).
    pub fn set_upstream_connected(&self, connected: bool) {
        Metrics::set(&self.gauges().upstream_connected, u64::from(connected));
        self.gauges().upstream_changed.notify_one();
    }

    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts one publish refused for its topic; protocol violations are counted where the
    /// connection is closed (`protocol_errors`).
    pub fn count_topic_refusal(&self, why: NameError) {
        let c = self.counters();
        let counter = match why {
            NameError::Control => &c.topics_refused_control,
            NameError::NonCharacter => &c.topics_refused_noncharacter,
            NameError::TooManyLevels => &c.topics_refused_levels,
            NameError::TooLong => &c.topics_refused_length,
            NameError::Empty | NameError::Wildcard | NameError::Nul => return,
        };
        Metrics::add(counter, 1);
    }
}

// Histograms (issue #13): latencies the relay and the broker observe, exposed at `/metrics`.

/// Upper bounds (seconds) shared by every histogram: 0.5 ms to 60 s, roughly ×2.5 apart.
/// Commit durations sit in the first buckets on a healthy disk; a PUBACK held for a whole
/// outage lands in the last ones.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A latency histogram over [`LATENCY_BUCKETS`]: one atomic per bucket plus the sum in
/// nanoseconds. [`Histogram::observe`] is wait-free (two relaxed `fetch_add`s and no lock), so a
/// stage can call it per event.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound (`+Inf`).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`]. Buckets are per bucket, not cumulative (the
/// exposition cumulates them).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations above the previous bound and ≤ this one)`, ending with
    /// `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one observation. Negative and NaN values count as 0; values above the last
    /// bound go to `+Inf`.
    pub fn observe(&self, seconds: f64) {
        let seconds = if seconds.is_nan() { 0.0 } else { seconds.max(0.0) };
        let idx = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        // `as` saturates: an absurd value cannot wrap the sum.
        self.sum_nanos.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, took: std::time::Duration) {
        self.observe(took.as_secs_f64());
    }

    /// The count is the sum of the buckets read, so `+Inf` always equals it even while
    /// observations race the snapshot; the sum may lag or lead by those observations.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(idx, n)| {
                (LATENCY_BUCKETS.get(idx).copied().unwrap_or(f64::INFINITY), n.load(Ordering::Relaxed))
            })
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The latencies operators see as distributions at `/metrics`, observed by the stages (see
/// the `http` module's docs for the exact points).
#[derive(Debug, Default)]
pub struct Histograms {
    /// A sensor's QoS ≥ 1 publish read → its PUBACK released (the event is safe).
    pub puback_hold: Histogram,
    /// One buffer transaction on the store thread, fsync included.
    pub commit_duration: Histogram,
    /// An upstream PUBLISH written → its PUBACK read.
    pub upstream_round_trip: Histogram,
}

/// Counters of the HTTP endpoint itself (`http/`).
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests refused for a missing or wrong bearer token (401).
    pub unauthorized: AtomicU64,
    /// Connections closed at once because the endpoint's connection limit was reached.
    pub connections_refused: AtomicU64,
}

/// What issue #13 added to the shared handle: the histograms, the HTTP endpoint's counters
/// and the per-rule counters; and issue #12: the upstream endpoints.
#[derive(Debug, Default)]
pub struct Operations {
    pub histograms: Histograms,
    pub http: HttpCounters,
    pub endpoints: Endpoints,
    pub rules: RuleRegistry,
}

/// The configured upstream endpoints (`upstream.url` or `upstream.urls`), each with its own
/// counters, and which one the link is on. Set once by the uplink task before it connects; the
/// list is bounded by the config (`config::MAX_ENDPOINTS`), so it can label metrics.
#[derive(Debug, Default)]
pub struct Endpoints {
    list: std::sync::OnceLock<Box<[EndpointStats]>>,
    /// The index + 1 of the endpoint the link is connected to; 0 while none.
    current: AtomicU64,
}

/// One upstream endpoint's counters.
#[derive(Debug)]
pub struct EndpointStats {
    /// `mqtt://host:port`, as configured.
    pub url: String,
    /// Connections established to it.
    pub connects: AtomicU64,
    /// Attempts (failback probes included) that failed, and connections to it that were lost.
    pub failures: AtomicU64,
}

impl Endpoints {
    /// Names the endpoints; the first call wins (one uplink per gateway).
    pub fn configure(&self, urls: impl IntoIterator<Item = String>) {
        let list = urls
            .into_iter()
            .map(|url| EndpointStats { url, connects: AtomicU64::new(0), failures: AtomicU64::new(0) })
            .collect();
        let _ = self.list.set(list);
    }

    /// Every configured endpoint, preferred first; empty before the uplink started.
    pub fn list(&self) -> &[EndpointStats] {
        self.list.get().map_or(&[], |l| l)
    }

    pub fn get(&self, idx: usize) -> Option<&EndpointStats> {
        self.list().get(idx)
    }

    /// The endpoint the link is connected to.
    pub fn current(&self) -> Option<&EndpointStats> {
        let idx = self.current.load(Ordering::Relaxed).checked_sub(1)?;
        self.get(usize::try_from(idx).ok()?)
    }
}

/// One rule's counters, by its name in the rules file.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Events the rule's actions ran on (FROM and WHERE held), once per event.
    pub matched: AtomicU64,
    /// Outputs the rule produced: forwards, republishes, drops, deliberate dead letters.
    pub outputs: AtomicU64,
    /// Events the rule failed on (decoding, evaluation, an invalid topic it made).
    pub errors: AtomicU64,
}

/// The per-rule counters, by rule name. The route stage looks a rule up once and keeps the
/// `Arc` (so counting is a relaxed `fetch_add`); a scrape reads them all. Names come from the
/// rules file, so the set is bounded by it; a rule removed by a reload keeps its counters
/// (counters never go back) until the gateway restarts.
#[derive(Debug, Default)]
pub struct RuleRegistry {
    rules: std::sync::Mutex<std::collections::BTreeMap<Arc<str>, Arc<RuleCounters>>>,
}

impl RuleRegistry {
    /// The counters of `rule`, created at zero the first time.
    pub fn get(&self, rule: &Arc<str>) -> Arc<RuleCounters> {
        let mut rules = self.rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(rules.entry(Arc::clone(rule)).or_default())
    }

    /// `(rule, matched, outputs, errors)` for every rule seen, by name.
    pub fn snapshot(&self) -> Vec<(String, u64, u64, u64)> {
        let rules = self.rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        rules
            .iter()
            .map(|(name, c)| {
                (
                    name.to_string(),
                    Metrics::get(&c.matched),
                    Metrics::get(&c.outputs),
                    Metrics::get(&c.errors),
                )
            })
            .collect()
    }
}

impl Metrics {
    pub fn histograms(&self) -> &Histograms {
        &self.inner.2.histograms
    }

    pub fn http(&self) -> &HttpCounters {
        &self.inner.2.http
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.inner.2.endpoints
    }

    /// The link is connected to endpoint `idx`, or to none: sets `upstream_connected` and the
    /// current endpoint, and wakes whoever shows them (`$SYS/outpost/upstream`).
    pub fn set_upstream_endpoint(&self, idx: Option<usize>) {
        let current = idx.map_or(0, |i| i as u64 + 1);
        self.endpoints().current.store(current, Ordering::Relaxed);
        self.set_upstream_connected(idx.is_some());
    }

    pub fn rules(&self) -> &RuleRegistry {
        &self.inner.2.rules
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets_with_their_sum() {
        let h = Histogram::default();
        for seconds in [0.0001, 0.0005, 0.003, 0.003, 7.0, 3600.0, -1.0, f64::NAN] {
            h.observe(seconds);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 8);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len() + 1);
        let at = |bound: f64| s.buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        // 0.0001, 0.0005 (a bound is inclusive), -1 and NaN (as 0).
        assert_eq!(at(0.0005), Some(4));
        assert_eq!(at(0.005), Some(2));
        assert_eq!(at(5.0), Some(0));
        assert_eq!(at(10.0), Some(1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 8);
        assert!((s.sum_seconds - 3607.0066).abs() < 1e-6, "{}", s.sum_seconds);
    }

    #[test]
    fn metrics_carry_the_histograms() {
        let metrics = Metrics::default();
        metrics.histograms().commit_duration.observe_duration(std::time::Duration::from_millis(2));
        assert_eq!(metrics.clone().histograms().commit_duration.snapshot().count, 1);
        assert_eq!(metrics.histograms().puback_hold.snapshot().count, 0);
    }
}
