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
    /// Publishes that had to wait for room in the pipeline (their sensor was slowed down).
    ingest_throttled,
    /// Sensor connections accepted (CONNACK success).
    sensor_connects,
    /// CONNECTs refused with a reason code (credentials, id, server busy).
    sensor_refused,
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
    /// Events that matched no route (bridge) or no rule produced anything for (rules).
    unrouted,
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
    /// Persistent sessions ended because `broker.max_offline_sessions` were offline already.
    sessions_evicted,
    /// Persistent sessions ended because their MQTT 5 session expiry passed.
    sessions_expired,
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
    // Local fan-out (`broker::local`).
    /// Subscriptions held by local sessions (connected and offline).
    pub local_subscriptions: AtomicU64,
    /// Persistent sessions whose client is offline.
    pub offline_sessions: AtomicU64,
    /// Signalled whenever `upstream_connected` changes, so `$SYS/outpost/upstream` follows at
    /// once instead of at the next `broker.sys_interval`.
    pub upstream_changed: tokio::sync::Notify,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<(Counters, Gauges)>,
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
