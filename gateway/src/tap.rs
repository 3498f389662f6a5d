//! The tap: a live view of events as they pass the stages (`outpost tap`).
//!
//! Stages publish [`TapRecord`]s into one [`Tap`] hub — the broker as an event is handed to
//! routing, the route stage per rule (or bridge route), the relay as it accepts, sends,
//! commits, sees acknowledged or drops an event — all keyed by the event id that the buffer,
//! the dead letters and the upstream's `outpost-event-id` carry. The admin socket attaches
//! a [`Viewer`] per `outpost tap` and writes what it receives to the operator.
//!
//! # Invariants
//! - **No viewer, no cost:** each hook first asks [`Tap::wants`], one relaxed atomic load of
//!   the stages some viewer wants; nothing is built, locked or allocated otherwise.
//! - **A viewer never slows the pipeline:** each has a bounded queue, filled with `try_send`
//!   from the stage's own loop; what does not fit is counted per viewer (shown to it) and in
//!   `tap_missed`, never waited for.
//! - At most [`MAX_VIEWERS`] viewers at once, so the per-record work of a stage while tapped
//!   is bounded too.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::event::now_ms;
use crate::metrics::Metrics;

/// Viewers attached at once; more are refused with a message.
pub const MAX_VIEWERS: usize = 4;
/// Records queued per viewer before further ones are counted as missed.
pub const VIEWER_QUEUE: usize = 1024;

/// Where in the pipeline a record was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TapStage {
    /// The broker handed a sensor's publish to routing.
    Ingest,
    /// The route stage: what each rule (or the bridge's route) made of the event.
    Rules,
    /// The relay: accepted, sent, acknowledged, committed, dropped.
    Relay,
}

impl TapStage {
    pub const ALL: u8 = 0b111;

    pub fn bit(self) -> u8 {
        match self {
            TapStage::Ingest => 1,
            TapStage::Rules => 2,
            TapStage::Relay => 4,
        }
    }
}

/// One thing that happened to one event, as a viewer receives it (one JSON line on the admin
/// socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapRecord {
    pub ts_ms: u64,
    /// 16 lowercase hex digits, as in `outpost buffer peek` and `outpost-event-id`.
    pub event_id: String,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum What {
    Ingest {
        client_id: Option<String>,
        topic: String,
        qos: u8,
    },
    /// One rule's verdict on the event (`rule` is `None` for the bridge's routes, and for an
    /// event no rule's FROM matched).
    Rules {
        topic: String,
        rule: Option<String>,
        result: RuleResult,
        /// What the rule produced: `forward <topic>`, `republish <topic>`, `drop`,
        /// `dead_letter`, `loop_prevented <topic>`.
        outputs: Vec<String>,
        /// Why the rule failed on the event.
        error: Option<String>,
    },
    Relay {
        topic: String,
        action: RelayAction,
        /// For `dropped`: why.
        reason: Option<DropReason>,
        priority: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleResult {
    /// FROM and WHERE held: the rule's actions ran.
    Matched,
    /// FROM matched, WHERE did not.
    Filtered,
    /// Decoding or evaluation failed: the event went to the dead letters.
    Failed,
    /// No rule's FROM (or no bridge route) matched: nothing goes anywhere.
    Unrouted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayAction {
    /// Taken into the store-and-forward buffer.
    Accepted,
    /// Written to the upstream connection.
    Sent,
    /// Written again after a reconnect or restart.
    Resent,
    /// The upstream's PUBACK came (QoS 0: handed to the connection).
    Acknowledged,
    /// Written to the buffer file (its PUBACK had not come within the commit window).
    Committed,
    /// Left the buffer without reaching the upstream.
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The route's TTL passed before it could be sent.
    Ttl,
    /// The buffer was full and the policy is drop_oldest.
    Overflow,
    /// The buffer was full and the policy is reject_new: refused on arrival.
    BufferFull,
    /// The upstream refused it with an MQTT 5 PUBACK reason code.
    RejectedUpstream,
    /// Larger than the upstream's maximum packet size.
    TooLarge,
    /// The upstream closed the connection right after it `upstream.poison_after` times in a
    /// row: it goes to the dead-letter store.
    Poison,
}

/// What a viewer is shown besides records: how many it missed because it read too slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    pub missed: u64,
}

impl TapRecord {
    pub fn new(event_id: u64, what: What) -> TapRecord {
        TapRecord { ts_ms: now_ms(), event_id: crate::event::format_event_id(event_id), what }
    }

    pub fn stage(&self) -> TapStage {
        match self.what {
            What::Ingest { .. } => TapStage::Ingest,
            What::Rules { .. } => TapStage::Rules,
            What::Relay { .. } => TapStage::Relay,
        }
    }

    /// The topic the record is about (for a relay record, the upstream topic).
    pub fn topic(&self) -> &str {
        match &self.what {
            What::Ingest { topic, .. } | What::Rules { topic, .. } | What::Relay { topic, .. } => topic,
        }
    }

    /// One line for a person: time, event id, stage, then what happened.
    pub fn text(&self) -> String {
        let time = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.ts_ms),
        );
        let detail = match &self.what {
            What::Ingest { client_id, topic, qos } => {
                format!("client={} topic={topic} qos={qos}", client_id.as_deref().unwrap_or("-"))
            }
            What::Rules { topic, rule, result, outputs, error } => {
                let mut line =
                    format!("rule={} {} topic={topic}", rule.as_deref().unwrap_or("-"), serde_plain(result));
                if !outputs.is_empty() {
                    line += &format!(" outputs=[{}]", outputs.join(", "));
                }
                if let Some(error) = error {
                    line += &format!(" error={error:?}");
                }
                line
            }
            What::Relay { topic, action, reason, priority } => {
                let mut line = format!("{} topic={topic} priority={priority}", serde_plain(action));
                if let Some(reason) = reason {
                    line += &format!(" reason={}", serde_plain(reason));
                }
                line
            }
        };
        format!("{time} {} {:<6} {detail}", self.event_id, serde_plain(&self.stage()))
    }
}

/// A unit enum variant as its serde name.
fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The hub: cloned into every stage and the admin socket.
#[derive(Debug, Clone)]
pub struct Tap {
    hub: Arc<Hub>,
}

#[derive(Debug)]
struct Hub {
    /// The union of the stages the attached viewers want: what [`Tap::wants`] reads.
    wanted: AtomicU8,
    viewers: Mutex<Vec<Slot>>,
    next_id: AtomicU64,
    metrics: Metrics,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    stages: u8,
    queue: mpsc::Sender<TapRecord>,
    missed: Arc<AtomicU64>,
}

/// One attached viewer: its queue, and what it missed. Dropping it detaches it.
#[derive(Debug)]
pub struct Viewer {
    hub: Arc<Hub>,
    id: u64,
    pub records: mpsc::Receiver<TapRecord>,
    missed: Arc<AtomicU64>,
}

impl Viewer {
    /// Records that did not fit this viewer's queue since it attached.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let mut viewers = self.hub.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        viewers.retain(|slot| slot.id != self.id);
        self.hub.rewant(&viewers);
    }
}

impl Hub {
    fn rewant(&self, viewers: &[Slot]) {
        let wanted = viewers.iter().fold(0, |acc, slot| acc | slot.stages);
        self.wanted.store(wanted, Ordering::Relaxed);
        Metrics::set(&self.metrics.gauges().tap_viewers, viewers.len() as u64);
    }
}

impl Tap {
    pub fn new(metrics: Metrics) -> Tap {
        Tap {
            hub: Arc::new(Hub {
                wanted: AtomicU8::new(0),
                viewers: Mutex::default(),
                next_id: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// Whether some viewer wants records of `stage`: the one check on the hot path.
    #[inline]
    pub fn wants(&self, stage: TapStage) -> bool {
        self.hub.wanted.load(Ordering::Relaxed) & stage.bit() != 0
    }

    /// Hands `record` to every viewer that wants its stage, without waiting: a full queue
    /// counts a miss.
    pub fn publish(&self, record: TapRecord) {
        let bit = record.stage().bit();
        let viewers = self.hub.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in viewers.iter().filter(|slot| slot.stages & bit != 0) {
            if slot.queue.try_send(record.clone()).is_err() {
                slot.missed.fetch_add(1, Ordering::Relaxed);
                Metrics::add(&self.hub.metrics.counters().tap_missed, 1);
            }
        }
    }

    /// Attaches a viewer of `stages` (a union of [`TapStage::bit`]s) with a queue of
    /// `capacity` records; `None` when [`MAX_VIEWERS`] are attached.
    pub fn attach(&self, stages: u8, capacity: usize) -> Option<Viewer> {
        let mut viewers = self.hub.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        if viewers.len() >= MAX_VIEWERS {
            return None;
        }
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, records) = mpsc::channel(capacity.max(1));
        let missed = Arc::new(AtomicU64::new(0));
        viewers.push(Slot { id, stages, queue, missed: Arc::clone(&missed) });
        self.hub.rewant(&viewers);
        Some(Viewer { hub: Arc::clone(&self.hub), id, records, missed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest(id: u64) -> TapRecord {
        TapRecord::new(id, What::Ingest { client_id: Some("c".into()), topic: "t".into(), qos: 1 })
    }

    #[test]
    fn without_viewers_nothing_is_wanted_and_a_dropped_viewer_detaches() {
        let metrics = Metrics::default();
        let tap = Tap::new(metrics.clone());
        assert!(!tap.wants(TapStage::Ingest) && !tap.wants(TapStage::Relay));
        let viewer = tap.attach(TapStage::Relay.bit(), 4).expect("room");
        assert!(tap.wants(TapStage::Relay) && !tap.wants(TapStage::Ingest));
        assert_eq!(Metrics::get(&metrics.gauges().tap_viewers), 1);
        drop(viewer);
        assert!(!tap.wants(TapStage::Relay));
        assert_eq!(Metrics::get(&metrics.gauges().tap_viewers), 0);
    }

    #[test]
    fn a_full_queue_counts_misses_per_viewer_and_in_total_without_waiting() {
        let metrics = Metrics::default();
        let tap = Tap::new(metrics.clone());
        let mut slow = tap.attach(TapStage::ALL, 2).expect("room");
        let mut fast = tap.attach(TapStage::ALL, 16).expect("room");
        for id in 0..5 {
            tap.publish(ingest(id));
        }
        assert_eq!((slow.missed(), fast.missed()), (3, 0));
        assert_eq!(Metrics::get(&metrics.counters().tap_missed), 3);
        assert_eq!(slow.records.try_recv().map(|r| r.event_id), Ok(crate::event::format_event_id(0)));
        let mut seen = 0;
        while fast.records.try_recv().is_ok() {
            seen += 1;
        }
        assert_eq!(seen, 5);
    }

    #[test]
    fn viewers_are_bounded_and_get_only_their_stages() {
        let tap = Tap::new(Metrics::default());
        let mut relay = tap.attach(TapStage::Relay.bit(), 4).expect("room");
        let held: Vec<Viewer> =
            (1..MAX_VIEWERS).map(|_| tap.attach(TapStage::ALL, 4).expect("room")).collect();
        assert!(tap.attach(TapStage::ALL, 4).is_none());
        tap.publish(ingest(1));
        assert!(relay.records.try_recv().is_err());
        drop(held);
        assert!(tap.attach(TapStage::ALL, 4).is_some());
    }

    #[test]
    fn records_are_json_lines_with_the_event_id_in_hex_and_a_text_form() {
        let record = TapRecord {
            ts_ms: 0,
            event_id: crate::event::format_event_id(0x2a),
            what: What::Relay {
                topic: "up/t".into(),
                action: RelayAction::Dropped,
                reason: Some(DropReason::Ttl),
                priority: 5,
            },
        };
        let line = serde_json::to_string(&record).expect("json");
        assert_eq!(
            line,
            r#"{"ts_ms":0,"event_id":"000000000000002a","stage":"relay","topic":"up/t","action":"dropped","reason":"ttl","priority":5}"#
        );
        assert_eq!(serde_json::from_str::<TapRecord>(&line).expect("parse"), record);
        assert_eq!(
            record.text(),
            "1970-01-01T00:00:00.000Z 000000000000002a relay  dropped topic=up/t priority=5 reason=ttl"
        );
    }
}
