//! The hand-over of sensors' publishes (and wills) to the route stage.
//!
//! # Invariants
//! - **Backpressure, not loss:** [`Intake::hand_over`] waits while the route stage's bounded
//!   channel is full; the connection does not read its socket meanwhile, and TCP slows the
//!   sensor. The wait is counted and logged (rate-limited).
//! - No lock on the way: event ids come from an atomic, the channel is the only
//!   synchronisation (the log throttle's lock is taken only while the channel is full).
//! - **Client events never wait:** [`Intake::report`] offers a client event (`$events/...`)
//!   to the same channel, so it keeps its place among the client's publishes, but only
//!   without waiting: when the channel is full the event is dropped, counted
//!   (`client_events_dropped`) and logged once per episode. Only events some rule reads are
//!   built at all ([`Intake::wants`]).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use crate::ack::Ticket;
use crate::event::{ClientEvent, Event, EventsWanted, IdGen, Qos2, now_ms};
use crate::metrics::Metrics;
use crate::tap::{Tap, TapRecord, TapStage, What};
use crate::telemetry::{Episode, Failure, LogThrottle, readable};
use crate::watchdog::Heartbeat;

/// The broker's end of the channel into the route stage. The route stage ends when every
/// sender is gone: this one goes with [`super::Shared`], once the accept loops and every
/// connection have ended.
pub struct Intake {
    ids: IdGen,
    events: mpsc::Sender<Event>,
    metrics: Metrics,
    /// Locked only while the channel is full.
    throttled_log: Mutex<LogThrottle>,
    /// The broker's heartbeat (the watchdog), shared with the accept loops: a hand-over is a
    /// turn, and waiting for room in the route stage's channel is not (its heartbeat covers it).
    heartbeat: Heartbeat,
    /// Where `outpost tap` sees events enter.
    tap: Tap,
    /// The client events some rule reads.
    wanted: EventsWanted,
    /// Client events dropped on a full channel: one episode from the first drop until one
    /// is handed over again. Locked only while it lasts (`dropping`).
    dropping_log: Mutex<Episode>,
    dropping: std::sync::atomic::AtomicBool,
}

impl Intake {
    pub fn new(
        ids: IdGen,
        events: mpsc::Sender<Event>,
        metrics: Metrics,
        heartbeat: Heartbeat,
        tap: Tap,
        wanted: EventsWanted,
    ) -> Intake {
        Intake {
            ids,
            events,
            metrics,
            throttled_log: Mutex::default(),
            heartbeat,
            tap,
            wanted,
            dropping_log: Mutex::default(),
            dropping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether some rule reads client events of `kind`: if not, the event is not built.
    pub fn wants(&self, kind: outpost_rules::EventKind) -> bool {
        self.wanted.wants(kind)
    }

    /// A client event about `client_id`: `topic`, `payload` and `qos` are a subscription's
    /// filter and QoS or a dropped publish's; empty for an event about the client itself.
    pub fn client_event(
        &self,
        info: outpost_rules::Lifecycle,
        client_id: &Arc<str>,
        username: Option<Arc<str>>,
        peerhost: &Arc<str>,
        message: (String, Bytes, u8),
    ) -> Event {
        let (topic, payload, qos) = message;
        let mut event = self.new_event(topic, payload, qos, client_id);
        event.peerhost = Some(Arc::clone(peerhost));
        event.username = username;
        event.lifecycle = Some(Box::new(ClientEvent { info }));
        event
    }

    /// Offers a client event to the route stage without waiting (see the module's invariants).
    pub fn report(&self, event: Event) {
        let counters = self.metrics.counters();
        let sent = self.events.try_send(event);
        let dropping = self.dropping.load(std::sync::atomic::Ordering::Relaxed);
        match sent {
            Ok(()) => {
                Metrics::add(&counters.client_events, 1);
                if dropping {
                    self.dropping.store(false, std::sync::atomic::Ordering::Relaxed);
                    let ended = self.episode().ended(tokio::time::Instant::now());
                    if let Some((lasted, dropped)) = ended {
                        warn!(message = "client events reach the rules again", lasted = %readable(lasted), dropped);
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                Metrics::add(&counters.client_events_dropped, 1);
                self.dropping.store(true, std::sync::atomic::Ordering::Relaxed);
                match self.episode().failed(tokio::time::Instant::now()) {
                    Failure::Started => warn!(
                        message = "client events ($events/...) are being dropped: the pipeline is full (see the warnings about slowed sensors); rules on $events miss them until it drains, see client_events_dropped"
                    ),
                    Failure::Remind { lasted, attempts } => {
                        warn!(message = "client events ($events/...) are still being dropped: the pipeline is full", lasted = %readable(lasted), dropped = attempts)
                    }
                    Failure::Quiet => {}
                }
            }
        }
    }

    fn episode(&self) -> std::sync::MutexGuard<'_, Episode> {
        self.dropping_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The broker's heartbeat, for the accept loops.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// An event for a publish of `client_id`, with a new id, received now.
    pub fn new_event(&self, topic: String, payload: Bytes, qos: u8, client_id: &Arc<str>) -> Event {
        Event {
            qos: Some(qos),
            client_id: Some(Arc::clone(client_id)),
            ..Event::made(self.ids.next_id(), topic, payload, now_ms())
        }
    }

    /// The PUBREL of a QoS 2 publish of `client_id`, for the route stage (see [`Qos2::Release`]):
    /// `ticket` holds its PUBCOMP. Not a publish: not counted as one, not shown by the tap.
    pub fn release(&self, client_id: &Arc<str>, packet_id: u16, ticket: Ticket) -> Event {
        let mut event = self.new_event(String::new(), Bytes::new(), 2, client_id);
        event.ticket = Some(ticket);
        event.qos2 = Some(Qos2::Release(packet_id));
        event
    }

    /// Hands a [`Intake::release`] to the route stage, waiting while it is full (like a
    /// publish: the connection does not read meanwhile). `false`: the route stage is gone.
    pub async fn hand_over_release(&self, event: Event) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// Hands an event to the route stage; waits while it is full, which is what slows the
    /// sensor down (its socket is not read meanwhile). Waiting is counted and logged, so an
    /// operator sees sensors being throttled. `false`: the route stage is gone (shutdown).
    pub async fn hand_over(&self, event: Event) -> bool {
        let counters = self.metrics.counters();
        Metrics::add(&counters.ingested, 1);
        let by_qos = match event.qos {
            Some(2) => &counters.ingested_qos2,
            Some(1) => &counters.ingested_qos1,
            _ => &counters.ingested_qos0,
        };
        Metrics::add(by_qos, 1);
        if self.tap.wants(TapStage::Ingest) {
            self.tap.publish(TapRecord::new(
                event.id,
                What::Ingest {
                    client_id: event.client_id.as_deref().map(str::to_owned),
                    topic: event.topic.clone(),
                    qos: event.qos.unwrap_or(0),
                },
            ));
        }
        self.heartbeat.begin();
        self.heartbeat.wedge_if_asked().await;
        let handed = self.events.try_send(event);
        self.heartbeat.end();
        match handed {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(event)) => {
                Metrics::add(&counters.ingest_throttled, 1);
                let log = self
                    .throttled_log
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .ready(tokio::time::Instant::now());
                if let Some(folded) = log {
                    warn!(
                        message = "sensors are being slowed down: the pipeline is full because the buffer cannot commit fast enough (slow or full disk, see commit warnings) or the rules are too slow",
                        similar_since_last_log = folded,
                        throttled_total = Metrics::get(&counters.ingest_throttled)
                    );
                }
                self.events.send(event).await.is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_rules::{EventKind, EventKinds, Lifecycle};

    /// A full channel drops the client event at once, counted; the next one that fits goes.
    #[tokio::test]
    async fn a_client_event_never_waits_for_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = Metrics::default();
        let wanted = EventsWanted::default();
        let intake = Intake::new(
            IdGen::new(1),
            tx,
            metrics.clone(),
            Heartbeat::unwatched(),
            Tap::new(metrics.clone()),
            wanted.clone(),
        );
        assert!(!intake.wants(EventKind::ClientConnected));
        let mut kinds = EventKinds::NONE;
        kinds.insert(EventKind::ClientConnected);
        wanted.set(kinds);
        assert!(intake.wants(EventKind::ClientConnected) && !intake.wants(EventKind::MessageDropped));

        let id: Arc<str> = Arc::from("c1");
        let host: Arc<str> = Arc::from("192.0.2.7");
        let event = || {
            let info = Lifecycle::new(EventKind::ClientConnected);
            intake.client_event(info, &id, None, &host, (String::new(), Bytes::new(), 0))
        };
        intake.report(event());
        intake.report(event());
        let counters = metrics.counters();
        assert_eq!(
            (Metrics::get(&counters.client_events), Metrics::get(&counters.client_events_dropped)),
            (1, 1)
        );
        let first = rx.recv().await.expect("the first event");
        assert_eq!(first.peerhost.as_deref(), Some("192.0.2.7"));
        assert!(first.lifecycle.is_some());
        intake.report(event());
        assert_eq!(Metrics::get(&counters.client_events), 2);
        assert_eq!(Metrics::get(&counters.ingested), 0, "client events are not publishes");
    }
}
