//! The hand-over of sensors' publishes (and wills) to the route stage.
//!
//! # Invariants
//! - **Backpressure, not loss:** [`Intake::hand_over`] waits while the route stage's bounded
//!   channel is full; the connection does not read its socket meanwhile, and TCP slows the
//!   sensor. The wait is counted and logged (rate-limited).
//! - No lock on the way: event ids come from an atomic, the channel is the only
//!   synchronisation (the log throttle's lock is taken only while the channel is full).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use crate::event::{Event, IdGen, now_ms};
use crate::metrics::Metrics;
use crate::tap::{Tap, TapRecord, TapStage, What};
use crate::telemetry::LogThrottle;
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
}

impl Intake {
    pub fn new(
        ids: IdGen,
        events: mpsc::Sender<Event>,
        metrics: Metrics,
        heartbeat: Heartbeat,
        tap: Tap,
    ) -> Intake {
        Intake { ids, events, metrics, throttled_log: Mutex::default(), heartbeat, tap }
    }

    /// The broker's heartbeat, for the accept loops.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// An event for a publish of `client_id`, with a new id, received now.
    pub fn new_event(&self, topic: String, payload: Bytes, qos: u8, client_id: &Arc<str>) -> Event {
        Event {
            id: self.ids.next_id(),
            topic,
            payload,
            qos: Some(qos),
            received_ms: now_ms(),
            client_id: Some(Arc::clone(client_id)),
            ticket: None,
            from_upstream: false,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
        }
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
