//! Stage 2: decides what happens to each event.
//!
//! Two modes ([`Routing`]):
//! - **Bridge** (no rules file): an event goes upstream under its own topic (plus
//!   `upstream.topic_prefix`) if it matches a `[[route]]` filter, with that route's priority
//!   and TTL; without `[[route]]` sections one route `#` sends everything at priority 5.
//! - **Rules**: the rule engine (`outpost_rules`) evaluates the event; its outputs are
//!   forwarded upstream, republished into the local broker, dropped, or dead-lettered.
//!
//! The mode can change while running: the rules watcher ([`crate::rules`]) replaces the
//! [`Routing`] through a `watch` channel, and the next event uses the new one.
//!
//! # Invariants
//! - Routing never blocks on anything but the bounded output channel to the relay: republish
//!   and dead letters are handed over without waiting, and counted if refused.
//! - Republish goes two ways: to local subscribers through the broker, and straight back into
//!   this stage as a new event carrying its hop count (event chains), evaluated before the
//!   next input. The rule engine refuses to push the count past the rules file's `max_hops`,
//!   which bounds every chain.
//! - Every upstream copy of an event carries a clone of the sensor's held acknowledgement
//!   (its [`Ticket`](crate::ingest::acks::Ticket)); the sensor is acknowledged once all of them
//!   are safe, or right after routing when nothing goes upstream.
//! - Topics starting with `$` (broker-internal) never match `#` and are not bridged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outpost_rules::{EventContext, Output, RuleSet, TopicFilter};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::RouteConfig;
use crate::deadletter::DeadLetter;
use crate::event::{Event, IdGen, Outbound, TopicError, TopicPolicy, invalid_topic};
use crate::ingest::Republisher;
use crate::metrics::Metrics;
use crate::telemetry::LogThrottle;

/// What the route stage does with events right now.
#[derive(Debug)]
pub enum Routing {
    Bridge(Bridge),
    Rules(RuleSet),
}

/// The compiled bridge: the first route whose filter matches wins.
#[derive(Debug, Clone)]
pub struct Bridge {
    routes: Vec<(TopicFilter, u8, Option<Duration>)>,
}

impl Bridge {
    pub fn new(routes: &[RouteConfig]) -> Bridge {
        let routes = if routes.is_empty() {
            vec![(TopicFilter::new("#").expect("`#` is a valid filter"), 5, None)]
        } else {
            routes.iter().map(|r| (r.filter.clone(), r.priority, r.ttl)).collect()
        };
        Bridge { routes }
    }

    /// The priority and TTL of the first matching route, if any.
    fn route(&self, topic: &str) -> Option<(u8, Option<Duration>)> {
        self.routes.iter().find(|(filter, _, _)| filter.matches(topic)).map(|(_, p, ttl)| (*p, *ttl))
    }
}

fn expiry(received_ms: u64, ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|ttl| received_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)))
}

/// The route stage's fixed wiring.
pub struct RouteStage {
    pub routing: watch::Receiver<Arc<Routing>>,
    pub topic_prefix: String,
    pub republisher: Option<Republisher>,
    pub dead_letters: mpsc::Sender<DeadLetter>,
    /// What rule outputs' topics must satisfy (the broker's, so both paths agree).
    pub topic_policy: TopicPolicy,
    /// For the ids of a rule's second and later forwards of one event (each upstream message
    /// needs its own id, or deduplication would drop legitimate outputs).
    pub ids: IdGen,
    pub metrics: Metrics,
}

/// Runs until its input closes (ingest stopped), then closes its output so the relay can
/// finish. It never selects on cancellation itself: stopping upstream of it is what ends it,
/// so nothing already ingested is dropped on the floor.
pub async fn run(mut stage: RouteStage, mut input: mpsc::Receiver<Event>, out: mpsc::Sender<Outbound>) {
    let metrics = stage.metrics.clone();
    let counters = metrics.counters();
    // Republished events waiting to be evaluated again, with their hop count.
    let mut chain: VecDeque<(Event, u8)> = VecDeque::new();
    let mut republish_log = LogThrottle::default();
    let mut dead_log = LogThrottle::default();
    let mut routing = stage.routing.borrow_and_update().clone();
    loop {
        let (event, hops) = match chain.pop_front() {
            Some(next) => next,
            None => match input.recv().await {
                Some(event) => (event, 0),
                None => break,
            },
        };
        if stage.routing.has_changed().unwrap_or(false) {
            routing = stage.routing.borrow_and_update().clone();
        }
        let now = Instant::now();
        let outbound: Vec<Outbound> = match &*routing {
            Routing::Bridge(bridge) => match bridge.route(&event.topic) {
                Some((priority, ttl)) => vec![Outbound {
                    event_id: event.id,
                    topic: format!("{}{}", stage.topic_prefix, event.topic),
                    payload: event.payload.clone(),
                    qos: 1,
                    priority,
                    expires_ms: expiry(event.received_ms, ttl),
                    received_ms: event.received_ms,
                    ticket: event.ticket.clone(),
                }],
                None => {
                    Metrics::add(&counters.unrouted, 1);
                    Vec::new()
                }
            },
            Routing::Rules(rules) => {
                let context = EventContext {
                    topic: &event.topic,
                    payload: &event.payload,
                    clientid: event.client_id.as_deref(),
                    username: None,
                    qos: event.qos.unwrap_or(0),
                    timestamp_ms: event.received_ms,
                    event_id: event.id,
                    hops,
                };
                let outputs = rules.evaluate(&context);
                if outputs.is_empty() {
                    Metrics::add(&counters.unrouted, 1);
                }
                let mut forwards = Vec::new();
                for output in outputs {
                    match output {
                        Output::Forward { rule, topic, payload, qos, priority, ttl } => {
                            let topic = format!("{}{topic}", stage.topic_prefix);
                            if let Some(why) =
                                invalid_topic(&topic, &stage.topic_policy).map(TopicError::as_str)
                            {
                                // A topic template filled from payload data can produce what
                                // no broker accepts; queued, it would block the uplink.
                                Metrics::add(&counters.dead_letters, 1);
                                if let Some(folded) = dead_log.ready(now) {
                                    warn!(message = "a rule produced an invalid upstream topic; the output went to the dead-letter store, fix the rule's topic template", %rule, %topic, reason = why, similar_since_last_log = folded);
                                }
                                let letter = DeadLetter {
                                    ts_ms: event.received_ms,
                                    event_id: event.id,
                                    rule: rule.to_string(),
                                    reason: format!("invalid upstream topic: {why}"),
                                    topic,
                                    payload,
                                };
                                if stage.dead_letters.try_send(letter).is_err() {
                                    Metrics::add(&counters.dead_letters_unsaved, 1);
                                }
                                continue;
                            }
                            let event_id = if forwards.is_empty() { event.id } else { stage.ids.next_id() };
                            forwards.push(Outbound {
                                event_id,
                                topic,
                                payload: Bytes::from(payload),
                                qos,
                                priority,
                                expires_ms: expiry(event.received_ms, ttl),
                                received_ms: event.received_ms,
                                ticket: event.ticket.clone(),
                            });
                        }
                        Output::Republish { rule, topic, payload, hops, .. } => {
                            let sent = match stage.republisher.as_mut() {
                                Some(r) => r.try_publish(&topic, &payload),
                                None => Err("no local broker link".to_owned()),
                            };
                            match sent {
                                Ok(()) => {
                                    Metrics::add(&counters.republished, 1);
                                    let next = Event {
                                        id: stage.ids.next_id(),
                                        topic,
                                        payload: Bytes::from(payload),
                                        qos: None,
                                        received_ms: event.received_ms,
                                        client_id: None,
                                        // What the chain forwards is part of what the sensor
                                        // is acknowledged for.
                                        ticket: event.ticket.clone(),
                                    };
                                    chain.push_back((next, hops));
                                }
                                Err(reason) => {
                                    Metrics::add(&counters.republish_failed, 1);
                                    if let Some(folded) = republish_log.ready(now) {
                                        warn!(message = "republish into the local broker failed; the event is not republished", %rule, %topic, %reason, similar_since_last_log = folded);
                                    }
                                }
                            }
                        }
                        Output::Dropped { .. } => Metrics::add(&counters.rules_dropped, 1),
                        Output::LoopPrevented { rule, topic, hops } => {
                            Metrics::add(&counters.loops_prevented, 1);
                            if let Some(folded) = republish_log.ready(now) {
                                warn!(message = "republish refused: the event reached the hop limit (max_hops in the rules file); check the rules for a loop", %rule, %topic, hops, similar_since_last_log = folded);
                            }
                        }
                        Output::DeadLetter { rule, reason, topic, payload } => {
                            Metrics::add(&counters.dead_letters, 1);
                            if let Some(folded) = dead_log.ready(now) {
                                warn!(message = "an event failed in a rule and went to the dead-letter store; see `outpost rules dead-letters`", %rule, %reason, %topic, similar_since_last_log = folded);
                            }
                            let letter = DeadLetter {
                                ts_ms: event.received_ms,
                                event_id: event.id,
                                rule: rule.to_string(),
                                reason,
                                topic,
                                payload,
                            };
                            if stage.dead_letters.try_send(letter).is_err() {
                                Metrics::add(&counters.dead_letters_unsaved, 1);
                            }
                        }
                    }
                }
                forwards
            }
        };
        for outbound in outbound {
            if out.send(outbound).await.is_err() {
                return;
            }
        }
    }
    info!(message = "router stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let b = Bridge::new(&routes);
        assert_eq!(b.route("alerts/fire"), Some((0, Some(Duration::from_secs(60)))));
        assert_eq!(b.route("sensors/x/temp"), Some((7, None)));
        assert_eq!(b.route("sensors/x/humidity"), None);
        assert_eq!(Bridge::new(&[]).route("anything/at/all"), Some((5, None)));
        assert_eq!(Bridge::new(&[]).route("$SYS/x"), None);
        assert_eq!(expiry(1_000, Some(Duration::from_secs(60))), Some(61_000));
    }
}
