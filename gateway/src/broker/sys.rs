//! `$SYS/outpost/…`: the gateway's status as topics local clients can subscribe to.
//! `$SYS/outpost/upstream` is `connected mqtt://host:port` (the endpoint the link is on) or
//! `disconnected`.
//!
//! One task ([`refresh`]) rebuilds the topics every `broker.sys_interval`, and at once when the
//! uplink goes up or down, into a `watch` channel; each connection that subscribed to a `$SYS`
//! filter holds a [`SysSubscription`] and sends what changed. `$SYS` filters never enter the
//! subscription trie, so publishes never match them.
//!
//! # Invariants
//! - No lock: the status is an immutable snapshot swapped whole through the `watch` channel.
//! - A connection holds at most [`super::MAX_FILTERS`] `$SYS` filters (besides its others).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::mqtt::topic::filter_matches;

/// The current `$SYS/outpost/…` topics and their payloads.
pub type Status = Arc<Vec<(String, Bytes)>>;

/// Refreshes the `$SYS/outpost/…` topics every `interval`, and at once when the uplink goes up
/// or down, until `cancel`.
pub async fn refresh(
    interval: Duration,
    metrics: Metrics,
    tx: watch::Sender<Status>,
    cancel: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    loop {
        let g = metrics.gauges();
        let c = metrics.counters();
        // "connected mqtt://host:port" names the endpoint the link is on (issue #12): with
        // several, a dashboard sees a failover; a reader of the first word sees the state.
        let upstream = match metrics.endpoints().current() {
            Some(endpoint) if Metrics::get(&g.upstream_connected) > 0 => {
                format!("connected {}", endpoint.url)
            }
            _ if Metrics::get(&g.upstream_connected) > 0 => "connected".to_owned(),
            _ => "disconnected".to_owned(),
        };
        let topics = vec![
            ("$SYS/outpost/version".to_owned(), Bytes::from_static(env!("CARGO_PKG_VERSION").as_bytes())),
            ("$SYS/outpost/uptime".to_owned(), Bytes::from(started.elapsed().as_secs().to_string())),
            ("$SYS/outpost/clients".to_owned(), Bytes::from(Metrics::get(&g.sensors_connected).to_string())),
            ("$SYS/outpost/backlog".to_owned(), Bytes::from(Metrics::get(&g.buffered_events).to_string())),
            ("$SYS/outpost/upstream".to_owned(), Bytes::from(upstream)),
            ("$SYS/outpost/ingested".to_owned(), Bytes::from(Metrics::get(&c.ingested).to_string())),
        ];
        tx.send_replace(Arc::new(topics));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            // The uplink went up or down: `$SYS/outpost/upstream` must not wait for the tick.
            () = g.upstream_changed.notified() => {}
        }
    }
}

/// Whether a filter is one [`SysSubscription`] serves rather than the subscription trie.
pub fn is_sys(filter: &str) -> bool {
    filter.starts_with("$SYS")
}

/// One connection's `$SYS` filters and its view of the status.
#[derive(Default)]
pub struct SysSubscription {
    filters: Vec<String>,
    /// Subscribed to the status since the first `$SYS` filter.
    status: Option<watch::Receiver<Status>>,
}

impl SysSubscription {
    /// Whether one more filter fits, besides the ones this SUBSCRIBE adds (`adding`).
    pub fn has_room(&self, adding: &[String]) -> bool {
        self.filters.len() + adding.len() < super::MAX_FILTERS
    }

    pub fn holds(&self, filter: &str) -> bool {
        self.filters.iter().any(|f| f == filter)
    }

    /// The current status, marked seen (for new filters' first deliveries); from here on
    /// [`Self::changed`] follows it.
    pub fn follow(&mut self, status: &watch::Receiver<Status>) -> Status {
        let rx = self.status.get_or_insert_with(|| {
            let mut rx = status.clone();
            rx.mark_unchanged();
            rx
        });
        Arc::clone(&rx.borrow_and_update())
    }

    /// Adds filters not held yet (within [`Self::has_room`]).
    pub fn extend(&mut self, filters: Vec<String>) {
        self.filters.extend(filters);
    }

    /// Removes a filter; returns whether it was held.
    pub fn remove(&mut self, filter: &str) -> bool {
        let before = self.filters.len();
        self.filters.retain(|f| f != filter);
        before != self.filters.len()
    }

    /// Whether `topic` matches one of the filters.
    pub fn wants(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| filter_matches(f, topic))
    }

    /// Resolves when the status changed; never without a `$SYS` filter.
    pub async fn changed(&mut self) {
        match &mut self.status {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The status after [`Self::changed`], marked seen.
    pub fn current(&mut self) -> Option<Status> {
        self.status.as_mut().map(|rx| Arc::clone(&rx.borrow_and_update()))
    }
}
