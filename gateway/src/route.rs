//! Stage 2: decides which events go upstream, and how.
//!
//! Until the rule engine lands, and whenever no rules file is given, this is a transparent
//! bridge: an event goes upstream under its own topic (plus `upstream.topic_prefix`) if it
//! matches a `[[route]]` filter, with that route's priority and TTL. With no `[[route]]`
//! sections, one route `#` sends everything at the default priority.
//!
//! # Invariants
//! - Routing is pure: no I/O, no waiting except on the bounded output channel.
//! - Topics starting with `$` (broker-internal) never match `#` and are not bridged.

use std::time::Duration;

use outpost_rules::TopicFilter;
use tokio::sync::mpsc;
use tracing::info;

use crate::config::RouteConfig;
use crate::event::{Event, Outbound};
use crate::metrics::Metrics;

/// The compiled bridge: the first route whose filter matches wins.
#[derive(Debug, Clone)]
pub struct Bridge {
    routes: Vec<(TopicFilter, u8, Option<Duration>)>,
    topic_prefix: String,
}

impl Bridge {
    pub fn new(routes: &[RouteConfig], topic_prefix: &str) -> Bridge {
        let routes = if routes.is_empty() {
            vec![(TopicFilter::new("#").expect("`#` is a valid filter"), 5, None)]
        } else {
            routes.iter().map(|r| (r.filter.clone(), r.priority, r.ttl)).collect()
        };
        Bridge { routes, topic_prefix: topic_prefix.to_owned() }
    }

    pub fn route(&self, event: &Event) -> Option<Outbound> {
        let (_, priority, ttl) = self.routes.iter().find(|(filter, _, _)| filter.matches(&event.topic))?;
        Some(Outbound {
            event_id: event.id,
            topic: format!("{}{}", self.topic_prefix, event.topic),
            payload: event.payload.clone(),
            qos: 1,
            priority: *priority,
            expires_ms: ttl.map(|ttl| event.received_ms + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            received_ms: event.received_ms,
        })
    }
}

/// Runs until its input closes (ingest stopped), then closes its output so the relay can
/// finish. It never selects on cancellation itself: stopping upstream of it is what ends it,
/// so nothing already ingested is dropped on the floor.
pub async fn run(
    bridge: Bridge,
    mut input: mpsc::Receiver<Event>,
    out: mpsc::Sender<Outbound>,
    metrics: Metrics,
) {
    let counters = metrics.counters();
    while let Some(event) = input.recv().await {
        match bridge.route(&event) {
            Some(outbound) => {
                if out.send(outbound).await.is_err() {
                    break;
                }
            }
            None => Metrics::add(&counters.unrouted, 1),
        }
    }
    info!(message = "router stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event(topic: &str) -> Event {
        Event {
            id: 7,
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            qos: None,
            received_ms: 1000,
            client_id: None,
        }
    }

    #[test]
    fn default_bridge_forwards_everything_with_prefix() {
        let b = Bridge::new(&[], "site-7/");
        let out = b.route(&event("sensors/a/temp")).expect("routed");
        assert_eq!(out.topic, "site-7/sensors/a/temp");
        assert_eq!((out.priority, out.expires_ms, out.event_id), (5, None, 7));
    }

    #[test]
    fn first_matching_route_sets_priority_and_ttl() {
        let routes = vec![
            RouteConfig {
                filter: TopicFilter::new("alerts/#").expect("f"),
                priority: 0,
                ttl: Some(Duration::from_secs(60)),
            },
            RouteConfig { filter: TopicFilter::new("sensors/+/temp").expect("f"), priority: 7, ttl: None },
        ];
        let b = Bridge::new(&routes, "");
        let alert = b.route(&event("alerts/fire")).expect("routed");
        assert_eq!((alert.priority, alert.expires_ms), (0, Some(61_000)));
        assert_eq!(b.route(&event("sensors/x/temp")).expect("routed").priority, 7);
        assert!(b.route(&event("sensors/x/humidity")).is_none());
    }
}
