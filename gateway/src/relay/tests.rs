//! The relay's state machine driven step by step against a real store, with the publishes it
//! encodes decoded back by rumqttc (no network): random accepts, writes, acks, disconnects, commit
//! ticks and crashes, then a final drain. Checked: every accepted event is acknowledged
//! upstream unless a crash lost it from the stated in-memory window; within one connection
//! and one priority, publishes go out in sequence order; the buffer ends empty; and **no
//! event whose sensor acknowledgement was released is ever lost in a crash** (every event
//! carries a ticket from a simulated sensor connection). The model upstream's PUBACKs and
//! PINGRESPs are real packets, read through the connection's session by the run loop's own
//! `deliver`.
//!
//! Poison events: the model upstream closes the connection as soon as one reaches it, every
//! time, and also closes it at random (a flapping upstream, at most `POISON_AFTER - 1` times in
//! a row without acknowledging anything in between). Checked: every poison event that was not
//! lost in a crash ends in the dead letters, nothing else ever does, and every other event is
//! acknowledged upstream as before — no event is lost for a poison in front of it.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::BytesMut;
use proptest::prelude::*;

use super::lanes::Bucket;
use super::run::deliver;
use super::*;
use crate::ack::{AckQueue, Outcome};
use crate::buffer::worker::Worker;
use crate::buffer::{Key, Store};
use crate::config::MqttVersion;
use crate::event::Outbound;
use crate::uplink::{LinkLoss, LinkParams, OUT_HIGH_WATER};

const WINDOW: usize = 4;
const COMMIT_MAX: usize = 5;
const INTERVAL: Duration = Duration::from_millis(10);
const POISON_AFTER: u32 = 3;

#[derive(Debug, Clone)]
enum Action {
    Accept(u8),
    /// An event the upstream closes the connection over, every time it receives it.
    AcceptPoison(u8),
    Connect,
    /// Up to this many encoded publishes reach the upstream.
    Write(usize),
    /// The upstream acknowledges the n-th in-flight publish (acks may come out of order).
    Ack(usize),
    Disconnect,
    /// The upstream closes the connection (a flap: nothing to do with what it received).
    Flap,
    /// Time passes by this many ms; due commits run.
    Tick(u64),
    /// The store thread's replies (commits, reads) are delivered.
    ServeStore,
    /// SIGKILL: memory is gone, the file stays.
    Crash,
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u8..3).prop_map(Action::Accept),
        1 => (0u8..3).prop_map(Action::AcceptPoison),
        1 => Just(Action::Connect),
        3 => (1usize..6).prop_map(Action::Write),
        3 => (0usize..8).prop_map(Action::Ack),
        1 => Just(Action::Disconnect),
        1 => Just(Action::Flap),
        2 => (1u64..25).prop_map(Action::Tick),
        2 => Just(Action::ServeStore),
        1 => Just(Action::Crash),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    relay: Relay,
    worker: Worker,
    clock: Instant,
    generation: u64,
    connected: bool,
    /// What the relay encoded for the socket.
    out: BytesMut,
    /// Encoded, not yet at the upstream: (packet id, priority, id).
    requested: VecDeque<(u16, u8, u64)>,
    inflight: Vec<(u16, u64)>,
    accepted: Vec<u64>,
    acked: HashSet<u64>,
    lost_in_crashes: HashSet<u64>,
    /// (generation, priority, id) in publish order.
    published: Vec<(u64, u8, u64)>,
    next_id: u64,
    /// The simulated sensor connection's held acknowledgements, and the ids they belong to.
    sensor: Arc<AckQueue>,
    awaiting: VecDeque<u64>,
    /// Ids whose acknowledgement the sensor received, and ids it was refused.
    released: HashSet<u64>,
    refused: HashSet<u64>,
    held_at_crash: HashSet<u64>,
    /// Ids the model upstream closes the connection over.
    poison: HashSet<u64>,
    /// Letters handed to the dead-letter writer and not yet answered; answered by `ServeStore`.
    letters: Vec<(Key, u64)>,
    dead_lettered: HashSet<u64>,
    /// Upstream-initiated closes since the last PUBACK (flaps are kept below `POISON_AFTER`).
    closes_since_ack: u32,
}

fn settings() -> RelaySettings {
    RelaySettings {
        window: WINDOW,
        commit_interval: INTERVAL,
        // The model's clock moves in whole intervals; a longer hold is tested on its own.
        max_ack_delay: INTERVAL,
        commit_max_events: COMMIT_MAX,
        max_events: u64::MAX,
        max_bytes: u64::MAX,
        overflow: OverflowPolicy::DropOldest,
        event_id: EventIdMode::None,
        max_events_per_sec: None,
        max_bytes_per_sec: None,
        drain_grace: Duration::from_secs(1),
        poison_after: POISON_AFTER,
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, report) = Store::open(dir.path()).expect("open");
        let lanes = store.lanes();
        let worker = Worker::spawn(store, crate::watchdog::Heartbeat::unwatched()).expect("worker");
        let relay = Relay::new(settings(), Metrics::default(), IdGen::new(report.epoch), lanes);
        Harness {
            dir,
            relay,
            worker,
            clock: Instant::now(),
            generation: 0,
            connected: false,
            out: BytesMut::new(),
            requested: VecDeque::new(),
            inflight: Vec::new(),
            accepted: Vec::new(),
            acked: HashSet::new(),
            lost_in_crashes: HashSet::new(),
            published: Vec::new(),
            next_id: 0,
            sensor: AckQueue::new(),
            awaiting: VecDeque::new(),
            released: HashSet::new(),
            refused: HashSet::new(),
            held_at_crash: HashSet::new(),
            poison: HashSet::new(),
            letters: Vec::new(),
            dead_lettered: HashSet::new(),
            closes_since_ack: 0,
        }
    }

    /// Reads what the sensor connection would acknowledge now.
    fn collect_released(&mut self) {
        let mut outcomes = Vec::new();
        self.sensor.take_ready(&mut outcomes);
        for outcome in outcomes {
            let id = self.awaiting.pop_front().expect("one ticket per accepted event");
            match outcome {
                Outcome::Safe => self.released.insert(id),
                Outcome::Rejected => self.refused.insert(id),
                Outcome::TopicInvalid => panic!("the relay never refuses for a topic"),
            };
        }
    }

    /// The link ends; `loss` says who ended it.
    fn lose(&mut self, loss: LinkLoss) {
        if self.connected {
            self.connected = false;
            self.relay.on_link_lost(loss, "model", self.clock);
            self.out.clear();
            self.requested.clear();
            self.inflight.clear();
        }
    }

    /// What the model upstream sends reaches the relay as the run loop hands it over.
    fn upstream_sends(&mut self, mut bytes: BytesMut) {
        deliver(&mut self.relay, &mut bytes, self.clock).expect("the model upstream sends valid packets");
        assert!(bytes.is_empty(), "every packet the model upstream sent was read");
    }

    /// Answers the letters of blamed events, as the dead-letter writer would once they are on
    /// disk.
    fn write_letters(&mut self) {
        for (key, id) in std::mem::take(&mut self.letters) {
            self.dead_lettered.insert(id);
            self.relay.on_dead_lettered(key, Ok(()), self.clock);
        }
    }

    /// Waits for every outstanding store reply, as the run loop would.
    async fn settle(&mut self) {
        while self.relay.commits.running || self.relay.lanes.iter().any(|l| l.reading) {
            let reply = self.worker.replies.recv().await.expect("store thread alive");
            self.relay.on_reply(reply, self.dir.path(), self.clock);
        }
    }

    /// Fills the send window and decodes what the relay encoded. Disk reads it starts stay in
    /// flight until a `ServeStore` step, so they can race with disconnects and acks.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        self.relay.pump(&self.worker.commands, self.clock, &mut self.out);
        while !self.out.is_empty() {
            let p = match rumqttc::mqttbytes::v4::Packet::read(&mut self.out, usize::MAX) {
                Ok(rumqttc::Packet::Publish(p)) => p,
                // The probe of a connection that isolates the suspect.
                Ok(rumqttc::Packet::PingReq) => continue,
                _ => panic!("the relay encoded something other than a publish or a PINGREQ"),
            };
            let priority: u8 = p.topic.trim_start_matches("t/").parse().expect("test topic");
            let id: u64 = std::str::from_utf8(&p.payload).expect("utf8").parse().expect("test payload");
            self.requested.push_back((p.pkid, priority, id));
            self.published.push((self.generation, priority, id));
        }
    }

    async fn step(&mut self, action: Action) {
        match action {
            Action::Accept(priority) => {
                if !self.relay.can_accept() {
                    self.relay.maybe_commit(&self.worker.commands, false, self.clock);
                    self.settle().await;
                }
                if self.relay.can_accept() {
                    accept_with(self, priority, None);
                }
            }
            Action::AcceptPoison(priority) => {
                if self.relay.can_accept() {
                    accept_with(self, priority, None);
                    self.poison.insert(self.next_id);
                }
            }
            Action::Connect => {
                if !self.connected {
                    self.generation += 1;
                    let params = LinkParams {
                        version: MqttVersion::V311,
                        receive_max: u16::MAX,
                        max_packet: usize::MAX,
                        keepalive: Duration::ZERO,
                    };
                    self.relay.on_connected(self.generation, params, self.clock, &mut self.out);
                    self.connected = true;
                    if self.relay.wants_probe() {
                        // The model upstream answers the PINGREQ at once.
                        self.upstream_sends(BytesMut::from(&[0xD0u8, 0x00][..]));
                    }
                }
            }
            Action::Write(n) => {
                for _ in 0..n {
                    let Some((pkid, _, id)) = self.requested.pop_front() else { break };
                    assert!(
                        self.inflight.iter().all(|(p, _)| *p != pkid),
                        "packet id {pkid} reused while in flight"
                    );
                    self.inflight.push((pkid, id));
                    if self.poison.contains(&id) {
                        // The upstream refuses it by closing the connection.
                        self.closes_since_ack += 1;
                        self.lose(LinkLoss::PeerClosed);
                        break;
                    }
                }
            }
            Action::Ack(n) => {
                if !self.inflight.is_empty() {
                    let (pkid, id) = self.inflight.remove(n % self.inflight.len());
                    let mut puback = BytesMut::new();
                    rumqttc::mqttbytes::v4::PubAck::new(pkid).write(&mut puback).expect("write");
                    self.upstream_sends(puback);
                    self.acked.insert(id);
                    self.closes_since_ack = 0;
                }
            }
            Action::Disconnect => self.lose(LinkLoss::Local),
            Action::Flap => {
                if self.connected && self.closes_since_ack + 1 < POISON_AFTER {
                    self.closes_since_ack += 1;
                    self.lose(LinkLoss::PeerClosed);
                }
            }
            Action::Tick(ms) => {
                self.clock += Duration::from_millis(ms);
                self.relay.maybe_commit(&self.worker.commands, false, self.clock);
                self.settle().await;
            }
            Action::ServeStore => {
                self.write_letters();
                self.settle().await;
            }
            Action::Crash => self.crash().await,
        }
        self.pump();
        for (key, letter) in self.relay.take_poisoned() {
            assert!(self.poison.contains(&letter.event_id), "blamed an innocent event: {}", letter.event_id);
            self.letters.push((key, letter.event_id));
        }
        self.collect_released();
    }

    async fn crash(&mut self) {
        self.settle().await;
        let in_memory: HashSet<u64> = self
            .relay
            .lanes
            .iter()
            .flat_map(|l| l.unsaved.values().map(|p| p.record.event_id))
            .filter(|id| !self.acked.contains(id))
            .collect();
        assert!(in_memory.len() <= 2 * COMMIT_MAX, "crash window {} exceeds the bound", in_memory.len());
        self.collect_released();
        let acknowledged_but_lost: Vec<&u64> = in_memory.intersection(&self.released).collect();
        assert!(
            acknowledged_but_lost.is_empty(),
            "sensor was acknowledged, then lost in a crash: {acknowledged_but_lost:?}"
        );
        self.lost_in_crashes.extend(in_memory);
        // The connection dies with the process: tickets dropped by the dead relay reach nobody.
        // Events acknowledged upstream but held behind a lost one are never acknowledged to the
        // sensor: it resends them (a duplicate, never a loss).
        self.sensor = AckQueue::new();
        self.held_at_crash.extend(self.awaiting.drain(..));
        let fresh = Harness::new();
        let old_worker = std::mem::replace(&mut self.worker, fresh.worker);
        old_worker.join();
        drop(fresh.relay);
        let (store, report) = Store::open(self.dir.path()).expect("reopen");
        let lanes = store.lanes();
        std::mem::replace(
            &mut self.worker,
            Worker::spawn(store, crate::watchdog::Heartbeat::unwatched()).expect("worker"),
        )
        .join();
        self.relay = Relay::new(settings(), Metrics::default(), IdGen::new(report.epoch), lanes);
        // Letters not yet answered were not written: their events are still in the buffer
        // (or were only in memory, with their sensors not acknowledged).
        self.letters.clear();
        self.connected = false;
        self.out.clear();
        self.requested.clear();
        self.inflight.clear();
        self.generation += 1;
    }

    /// Connects and runs until everything that must arrive has been acknowledged, and every
    /// poison event is in the dead letters.
    async fn drain(&mut self) {
        for _ in 0..10_000 {
            self.step(Action::Connect).await;
            let must: Vec<u64> =
                self.accepted.iter().copied().filter(|id| !self.lost_in_crashes.contains(id)).collect();
            // An event acknowledged before a crash whose delete was not yet committed is still
            // in the file: it is resent (a duplicate) and must be acknowledged again.
            if must.iter().all(|id| self.acked.contains(id) || self.dead_lettered.contains(id))
                && self.requested.is_empty()
                && self.inflight.is_empty()
                && self.relay.stored().events == 0
            {
                break;
            }
            self.step(Action::ServeStore).await;
            self.step(Action::Write(WINDOW)).await;
            while !self.inflight.is_empty() {
                self.step(Action::Ack(0)).await;
            }
            self.step(Action::Tick(INTERVAL.as_millis() as u64)).await;
        }
        // Deletes of acknowledged records are lazy; force them out and let the file empty.
        self.relay.maybe_commit(&self.worker.commands, true, self.clock);
        self.settle().await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn relay_delivers_everything_in_order(
        actions in prop::collection::vec(arb_action(), 1..80),
        long_hold in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        rt.block_on(async {
            // A `max_ack_delay` beyond `commit_interval` holds events in memory longer (while
            // disconnected, or behind a slow round trip); a released ack must still mean safe.
            let mut h = if long_hold {
                harness_with(RelaySettings { max_ack_delay: INTERVAL * 5, ..settings() })
            } else {
                Harness::new()
            };
            for action in actions {
                h.step(action).await;
            }
            h.drain().await;
            h.collect_released();
            for id in &h.accepted {
                if h.poison.contains(id) {
                    assert!(!h.acked.contains(id), "the model upstream never acknowledges poison");
                    assert!(
                        h.dead_lettered.contains(id) || h.lost_in_crashes.contains(id),
                        "poison event {id} neither dead-lettered nor lost in a crash"
                    );
                }
                assert!(
                    !h.dead_lettered.contains(id) || h.poison.contains(id),
                    "event {id} was dead-lettered, but the upstream never refused it"
                );
                if !h.lost_in_crashes.contains(id) {
                    assert!(
                        h.acked.contains(id) || h.dead_lettered.contains(id),
                        "event {id} was accepted but never acknowledged upstream"
                    );
                    assert!(
                        h.released.contains(id) || h.held_at_crash.contains(id),
                        "event {id} is safe but its sensor was never acknowledged"
                    );
                }
            }
            assert!(h.awaiting.is_empty(), "acknowledgements still held after the drain: {:?}", h.awaiting);
            // Within one connection and priority, publishes are in sequence (= id) order.
            let mut last: HashMap<(u64, u8), u64> = HashMap::new();
            for (generation, priority, id) in &h.published {
                if let Some(prev) = last.insert((*generation, *priority), *id) {
                    assert!(prev < *id, "generation {generation} priority {priority}: {id} sent after {prev}");
                }
            }
            assert_eq!(h.relay.commits.unsaved_len, 0);
            let stored: u64 = h.relay.commits.disk.iter().map(|l| l.events).sum();
            assert_eq!(stored, 0, "acknowledged events must be deleted from the file");
        });
    }
}

#[test]
fn healthy_link_writes_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        h.step(Action::Connect).await;
        for _ in 0..200 {
            h.step(Action::Accept(5)).await;
            h.step(Action::Write(WINDOW)).await;
            h.step(Action::Ack(0)).await;
            h.step(Action::Tick(1)).await;
        }
        h.drain().await;
        let c = h.relay.metrics.counters();
        assert_eq!(Metrics::get(&c.acked_before_commit), 200);
        assert_eq!(Metrics::get(&c.committed), 0, "acked within commit_interval: never written");
    });
}

proptest! {
    #[test]
    fn hold_stays_between_commit_interval_and_max_ack_delay(
        interval_ms in 1u64..1000,
        extra_ms in 0u64..5000,
        rtt_ms in proptest::option::of(0u64..20_000),
        connected in any::<bool>(),
    ) {
        let interval = Duration::from_millis(interval_ms);
        let max = interval + Duration::from_millis(extra_ms);
        let hold = commit::hold(interval, max, connected, rtt_ms.map(Duration::from_millis));
        prop_assert!(hold >= interval && hold <= max, "{hold:?} outside {interval:?}..={max:?}");
        if !connected {
            prop_assert_eq!(hold, max, "no connection: nothing can be acked, so commits are as large as allowed");
        }
    }

    #[test]
    fn smoothed_rtt_stays_within_its_samples(samples in prop::collection::vec(0u64..10_000, 1..200)) {
        let mut rtt = commit::Rtt::default();
        for &ms in &samples {
            rtt.observe(Duration::from_millis(ms));
        }
        let (lo, hi) = (samples.iter().min().copied().unwrap_or(0), samples.iter().max().copied().unwrap_or(0));
        let srtt = rtt.get().expect("observed").as_millis() as u64;
        prop_assert!(srtt >= lo && srtt <= hi, "{srtt} outside {lo}..={hi}");
    }
}

#[test]
fn hold_follows_the_round_trip() {
    let (interval, max) = (Duration::from_millis(25), Duration::from_millis(250));
    assert_eq!(commit::hold(interval, max, true, None), interval, "no sample yet: as before");
    assert_eq!(commit::hold(interval, max, true, Some(Duration::from_millis(1))), Duration::from_millis(27));
    assert_eq!(
        commit::hold(interval, max, true, Some(Duration::from_millis(50))),
        Duration::from_millis(125)
    );
    assert_eq!(commit::hold(interval, max, true, Some(Duration::from_millis(150))), max, "capped");
    assert_eq!(commit::hold(interval, max, false, Some(Duration::from_millis(1))), max);
    let mut rtt = commit::Rtt::default();
    rtt.observe(Duration::from_millis(50));
    for _ in 0..40 {
        rtt.observe(Duration::from_millis(150));
    }
    let srtt = rtt.get().expect("observed");
    assert!(srtt > Duration::from_millis(145) && srtt <= Duration::from_millis(150), "{srtt:?}");
}

/// On a connected slow link an unacknowledged event waits `commit_interval + 2 × SRTT` for its
/// PUBACK, not `commit_interval`; its sensor's ack is released by whichever comes first.
#[test]
fn slow_link_waits_for_the_puback_within_max_ack_delay() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = harness_with(RelaySettings { max_ack_delay: INTERVAL * 10, ..settings() });
        h.step(Action::Connect).await;
        // Teach the relay a 3 × INTERVAL round trip: hold = INTERVAL + 6 × INTERVAL.
        for _ in 0..3 {
            h.step(Action::Accept(5)).await;
            h.step(Action::Write(WINDOW)).await;
            h.step(Action::Tick(3 * INTERVAL.as_millis() as u64)).await;
            h.step(Action::Ack(0)).await;
        }
        assert_eq!(h.relay.hold(), INTERVAL * 7);
        let metrics = h.relay.metrics.clone();
        let c = metrics.counters();
        // The first event outlived the 10 ms hold of a link with no sample yet.
        let before = Metrics::get(&c.committed);
        h.step(Action::Accept(5)).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Tick(3 * INTERVAL.as_millis() as u64)).await;
        h.step(Action::Ack(0)).await;
        assert_eq!(Metrics::get(&c.committed), before, "acked within the hold: never written");
        h.step(Action::Accept(5)).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Tick(6 * INTERVAL.as_millis() as u64)).await;
        assert_eq!(Metrics::get(&c.committed), before, "not due before the hold");
        h.step(Action::Tick(INTERVAL.as_millis() as u64)).await;
        assert_eq!(Metrics::get(&c.committed), before + 1, "due once it waited the hold");
        h.drain().await;
        // Disconnected: no PUBACK can come, so the hold is max_ack_delay.
        h.step(Action::Disconnect).await;
        assert_eq!(h.relay.hold(), INTERVAL * 10);
        h.step(Action::Accept(5)).await;
        h.step(Action::Tick(9 * INTERVAL.as_millis() as u64)).await;
        assert_eq!(Metrics::get(&c.committed), before + 1, "not due before max_ack_delay");
        h.step(Action::Tick(INTERVAL.as_millis() as u64)).await;
        assert_eq!(Metrics::get(&c.committed), before + 2, "due at max_ack_delay");
    });
}

/// A commit that falls due for deletes alone does not take unsaved events that are not due:
/// they would be written, acknowledged a moment later and deleted by the next such commit, a
/// cycle of one commit per `DELETE_INTERVAL` on a healthy slow link.
#[test]
fn a_delete_commit_takes_no_event_that_is_not_due() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        h.step(Action::Connect).await;
        h.step(Action::Accept(5)).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Tick(INTERVAL.as_millis() as u64)).await;
        let metrics = h.relay.metrics.clone();
        let c = metrics.counters();
        assert_eq!(Metrics::get(&c.committed), 1, "outlived the hold unacknowledged");
        h.step(Action::Ack(0)).await;
        // The delete of the acked record falls due one second after the ack.
        h.step(Action::Tick(995)).await;
        h.step(Action::Accept(5)).await;
        h.step(Action::Write(WINDOW)).await;
        let commits = Metrics::get(&c.commits);
        h.step(Action::Tick(5)).await;
        assert_eq!(Metrics::get(&c.commits), commits + 1, "the delete commit ran");
        assert_eq!(Metrics::get(&c.committed), 1, "an event younger than its hold stays in memory");
        assert_eq!(h.relay.commits.unsaved_len, 1);
        h.step(Action::Ack(0)).await;
        h.drain().await;
        assert_eq!(Metrics::get(&c.committed), 1, "acknowledged before it was due: never written");
    });
}

#[test]
fn outage_commits_everything_and_drains_in_order_after_reconnect() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        for i in 0..50u8 {
            h.step(Action::Accept(i % 2)).await;
            h.step(Action::Tick(3)).await;
        }
        h.step(Action::Tick(20)).await;
        let metrics = h.relay.metrics.clone();
        let c = metrics.counters();
        assert_eq!(Metrics::get(&c.committed), 50, "with no uplink every event is committed");
        h.drain().await;
        assert_eq!(h.acked.len(), 50);
        assert_eq!(Metrics::get(&c.upstream_acked), 50);
    });
}

/// The runtime thread must not wait before sleeping while the relay waits for PUBACKs to
/// send more (`coalesce`): the window is full exactly while `window` publishes are unanswered.
#[test]
fn the_window_is_full_until_a_puback_opens_it() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        h.step(Action::Accept(5)).await;
        assert!(!h.relay.window_full(), "no connection: nothing in flight");
        h.step(Action::Connect).await;
        for _ in 1..WINDOW {
            h.step(Action::Accept(5)).await;
        }
        assert!(h.relay.window_full(), "{WINDOW} sent, none answered");
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Ack(0)).await;
        assert!(!h.relay.window_full(), "one answered, nothing else to send");
        for _ in 0..3 {
            h.step(Action::Accept(5)).await;
        }
        assert!(h.relay.window_full(), "more waiting than the window holds");
    });
}

/// A harness with custom settings, for policy tests.
fn harness_with(settings: RelaySettings) -> Harness {
    let mut h = Harness::new();
    h.relay.settings = settings;
    h
}

fn accept_with(h: &mut Harness, priority: u8, expires_ms: Option<u64>) {
    accept_with_props(h, priority, expires_ms, None);
}

/// [`accept_with`] an event carrying MQTT 5 properties.
fn accept_with_props(
    h: &mut Harness,
    priority: u8,
    expires_ms: Option<u64>,
    props: Option<std::sync::Arc<crate::event::MessageProps>>,
) {
    h.next_id += 1;
    let id = h.next_id;
    h.relay.accept(
        Outbound {
            event_id: id,
            topic: format!("t/{priority}"),
            payload: id.to_string().into(),
            qos: 1,
            priority,
            expires_ms,
            received_ms: 0,
            ticket: Some(h.sensor.ticket()),
            props,
            dead_letter_if_refused: false,
        },
        h.clock,
    );
    h.awaiting.push_back(id);
    h.accepted.push(id);
}

#[test]
fn expired_events_are_counted_and_never_sent() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        accept_with(&mut h, 5, Some(1)); // expired long ago
        accept_with(&mut h, 5, None);
        h.step(Action::Tick(20)).await; // both committed: no uplink
        h.step(Action::Connect).await;
        h.step(Action::ServeStore).await;
        h.step(Action::Write(WINDOW)).await;
        let sent: Vec<u64> = h.published.iter().map(|(_, _, id)| *id).collect();
        assert_eq!(sent, vec![2], "the expired event is not sent");
        assert_eq!(Metrics::get(&h.relay.metrics.counters().expired), 1);
        h.step(Action::Ack(0)).await;
        h.relay.maybe_commit(&h.worker.commands, true, h.clock);
        h.settle().await;
        assert_eq!(
            h.relay.commits.disk.iter().map(|l| l.events).sum::<u64>(),
            0,
            "the expired event left the file"
        );
    });
}

/// An event's life in the buffer ends at min(route TTL, message expiry): either one passing
/// drops it, counted as `expired`.
#[test]
fn the_message_expiry_bounds_an_event_like_its_ttl() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        let expiring_at = |at: u64| {
            Some(std::sync::Arc::new(crate::event::MessageProps {
                expires_ms: Some(at),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            }))
        };
        let later = crate::event::now_ms() + 3_600_000;
        accept_with_props(&mut h, 5, None, expiring_at(1)); // message expiry passed
        accept_with_props(&mut h, 5, Some(1), expiring_at(later)); // TTL passed
        accept_with_props(&mut h, 5, Some(later), expiring_at(later)); // neither
        accept_with_props(&mut h, 5, None, Some(std::sync::Arc::new(crate::event::MessageProps::default())));
        h.step(Action::Tick(20)).await; // committed: no uplink
        h.step(Action::Connect).await;
        h.step(Action::ServeStore).await;
        h.step(Action::Write(WINDOW)).await;
        let sent: Vec<u64> = h.published.iter().map(|(_, _, id)| *id).collect();
        assert_eq!(sent, vec![3, 4], "the expired events are not sent");
        assert_eq!(Metrics::get(&h.relay.metrics.counters().expired), 2);
    });
}

#[test]
fn drop_oldest_discards_the_least_urgent_oldest_first() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = harness_with(RelaySettings { max_events: 4, ..settings() });
        accept_with(&mut h, 0, None); // id 1, urgent
        accept_with(&mut h, 9, None); // id 2, least urgent: first to go
        accept_with(&mut h, 9, None); // id 3
        accept_with(&mut h, 0, None); // id 4
        h.step(Action::Tick(20)).await; // all on disk
        accept_with(&mut h, 5, None); // id 5: over capacity by one
        h.step(Action::Tick(20)).await;
        h.step(Action::ServeStore).await;
        assert_eq!(Metrics::get(&h.relay.metrics.counters().dropped_overflow), 1);
        h.lost_in_crashes.insert(2); // dropped by policy, counted above
        h.drain().await;
        assert!(!h.acked.contains(&2), "the oldest least urgent event was dropped");
        for id in [1, 3, 4, 5] {
            assert!(h.acked.contains(&id), "event {id} kept");
        }
    });
}

#[test]
fn reject_new_refuses_and_counts() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h =
            harness_with(RelaySettings { max_events: 3, overflow: OverflowPolicy::RejectNew, ..settings() });
        for _ in 0..5 {
            accept_with(&mut h, 5, None);
        }
        assert_eq!(Metrics::get(&h.relay.metrics.counters().rejected_full), 2);
        h.lost_in_crashes.extend([4, 5]);
        h.drain().await;
        assert_eq!(h.acked, HashSet::from([1, 2, 3]));
        h.collect_released();
        assert_eq!(h.refused, HashSet::from([4, 5]), "the sensor is told, not acknowledged");
        assert_eq!(h.released, HashSet::from([1, 2, 3]));
    });
}

#[test]
fn priorities_share_the_link_without_starving() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        // A backlog of routine events, then a burst of urgent ones.
        for _ in 0..40 {
            accept_with(&mut h, 9, None);
        }
        for _ in 0..40 {
            accept_with(&mut h, 0, None);
        }
        h.step(Action::Tick(20)).await;
        h.step(Action::Connect).await;
        for _ in 0..20 {
            h.step(Action::ServeStore).await;
            h.step(Action::Write(1)).await;
            h.step(Action::Ack(0)).await;
        }
        let first: Vec<u8> = h.published.iter().take(22).map(|(_, p, _)| *p).collect();
        let urgent = first.iter().filter(|p| **p == 0).count();
        let routine = first.len() - urgent;
        // Weights 10 (priority 0) and 1 (priority 9): urgent events dominate, routine ones
        // still get their share.
        assert!(urgent >= 18, "urgent events first: {first:?}");
        assert!(routine >= 1, "routine events are not starved: {first:?}");
        h.drain().await;
        assert_eq!(h.acked.len(), 80);
    });
}

#[test]
fn rate_limit_paces_the_link() {
    let now = Instant::now();
    let mut bucket = Bucket::new(10.0);
    for _ in 0..10 {
        assert!(bucket.take(1.0, now).is_ok());
    }
    let ready_at = bucket.take(1.0, now).expect_err("empty bucket");
    assert!(ready_at > now && ready_at <= now + Duration::from_millis(101), "{:?}", ready_at - now);
    assert!(bucket.take(1.0, now + Duration::from_millis(100)).is_ok(), "refilled after 1/rate");
    // An item larger than the bucket passes once the bucket is full, so it cannot block forever.
    let mut bytes = Bucket::new(100.0);
    assert!(bytes.take(500.0, now).is_ok());
}

/// QoS 0 publishes get no PUBACK, so the send window never stops them: the output waiting for
/// the socket must stop growing by itself (before, every turn encoded everything, without
/// bound, while a slow link took nothing).
#[test]
fn output_waiting_for_the_socket_is_bounded_for_qos0() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        let mut settings = settings();
        settings.commit_max_events = 100_000;
        h.relay.settings = settings;
        h.step(Action::Connect).await;
        let payload = bytes::Bytes::from(vec![b'x'; 200]);
        let mut out = BytesMut::new();
        for turn in 0..20u64 {
            for i in 0..1000 {
                h.relay.accept(
                    Outbound {
                        event_id: turn * 1000 + i,
                        topic: "t/0".to_owned(),
                        payload: payload.clone(),
                        qos: 0,
                        priority: 0,
                        expires_ms: None,
                        received_ms: 0,
                        ticket: None,
                        props: None,
                        dead_letter_if_refused: false,
                    },
                    h.clock,
                );
            }
            // The socket takes nothing.
            h.relay.pump(&h.worker.commands, h.clock, &mut out);
        }
        assert!(out.len() < OUT_HIGH_WATER + 300, "unwritten output grew to {} bytes", out.len());
        let sent = Metrics::get(&h.relay.metrics.counters().upstream_sent);
        assert!(sent < 2000, "only what fits was handed over: {sent} of 20,000");
        // Once the socket took it, encoding goes on.
        out.clear();
        h.relay.pump(&h.worker.commands, h.clock, &mut out);
        assert!(Metrics::get(&h.relay.metrics.counters().upstream_sent) > sent);
    });
}

/// A "not before" time that has passed is no deadline: left in place it made the run loop's
/// timer always due (a spin while the link was down after a rate limit was hit, or forever
/// after one failed disk read).
#[test]
fn passed_waits_are_not_deadlines() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        let now = h.clock;
        h.relay.pacing.rate_wait = Some(now - Duration::from_millis(5));
        h.relay.pacing.read_retry_at = Some(now - Duration::from_millis(5));
        assert!(h.relay.next_deadline().is_some_and(|d| d <= now), "the set-up has past deadlines");
        h.relay.pacing.clear_elapsed(now);
        assert!(h.relay.next_deadline().is_none_or(|d| d > now), "{:?}", h.relay.next_deadline());
        // A wait still ahead stays.
        h.relay.pacing.rate_wait = Some(now + Duration::from_millis(5));
        h.relay.pacing.clear_elapsed(now);
        assert_eq!(h.relay.next_deadline(), Some(now + Duration::from_millis(5)));
    });
}

/// Accepts `n` events (one of them poison, at `poison_at`), all committed, then connected.
async fn backlog_with_poison(n: usize, poison_at: usize) -> Harness {
    let mut h = Harness::new();
    for i in 0..n {
        accept_with(&mut h, 5, None);
        if i == poison_at {
            h.poison.insert(h.next_id);
        }
    }
    h.step(Action::Tick(20)).await;
    h
}

/// One connection: the upstream acknowledges everything it receives until the poison, and
/// closes the connection on the poison.
async fn one_connection(h: &mut Harness) {
    h.step(Action::Connect).await;
    for _ in 0..20 {
        h.step(Action::ServeStore).await;
        h.step(Action::Write(WINDOW)).await;
        if !h.connected {
            return;
        }
        while !h.inflight.is_empty() {
            h.step(Action::Ack(0)).await;
        }
    }
}

#[test]
fn a_poison_event_is_dead_lettered_and_the_events_behind_it_go_on() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = backlog_with_poison(10, 0).await;
        let mut viewer = h.relay.tap.attach(crate::tap::TapStage::Relay.bit(), 4096).expect("a tap viewer");
        // The first connection sends a full window; the upstream closes on the poison.
        one_connection(&mut h).await;
        assert!(!h.connected && h.relay.isolation.suspect.is_some(), "the poison is now the suspect");
        // Each following connection sends the suspect alone after a PINGRESP: strikes 1..=3.
        for strike in 1..=POISON_AFTER {
            one_connection(&mut h).await;
            let sent_last = h.published.iter().filter(|(g, _, _)| *g == h.generation).count();
            assert_eq!(sent_last, 1, "connection {} isolated the suspect", h.generation);
            if strike < POISON_AFTER {
                assert_eq!(h.relay.isolation.strikes.map(|(_, n)| n), Some(strike));
            }
        }
        assert_eq!(h.letters.len(), 1, "blamed after {POISON_AFTER} closes in a row");
        assert!(h.dead_lettered.is_empty(), "the event stays until its letter is written");
        // `outpost tap` shows why it left: dropped as poison, once.
        let mut poison_drops = Vec::new();
        while let Ok(record) = viewer.records.try_recv() {
            if let crate::tap::What::Relay { action: RelayAction::Dropped, reason, .. } = record.what {
                poison_drops.push((record.event_id, reason));
            }
        }
        assert_eq!(poison_drops, vec![(crate::event::format_event_id(1), Some(DropReason::Poison))]);
        h.step(Action::ServeStore).await;
        assert_eq!(h.dead_lettered, HashSet::from([1]));
        let c = h.relay.metrics.counters();
        assert_eq!(Metrics::get(&c.upstream_poison), 1);
        h.drain().await;
        for id in 2..=10 {
            assert!(h.acked.contains(&id), "event {id} behind the poison arrived");
        }
        h.relay.maybe_commit(&h.worker.commands, true, h.clock);
        h.settle().await;
        assert_eq!(h.relay.commits.disk.iter().map(|l| l.events).sum::<u64>(), 0, "the poison left the file");
    });
}

/// A flapping upstream closes the connection right after the isolated suspect, but fewer times
/// in a row than `poison_after`, or later than `POISON_CLOSE_WITHIN`, or we end the connection
/// ourselves: nothing is blamed.
#[test]
fn flaps_slow_closes_and_our_own_losses_blame_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        for _ in 0..5 {
            accept_with(&mut h, 5, None);
        }
        h.step(Action::Connect).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Flap).await;
        let suspect = h.relay.isolation.suspect.expect("the first unacknowledged publish is the suspect");
        // Two quick closes right after the isolated suspect: two strikes.
        for _ in 0..2 {
            h.closes_since_ack = 0;
            h.step(Action::Connect).await;
            h.step(Action::Write(WINDOW)).await;
            h.step(Action::Flap).await;
        }
        assert_eq!(h.relay.isolation.strikes, Some((suspect, 2)));
        // Closes after POISON_CLOSE_WITHIN, and losses we cause, never count.
        for i in 0..6 {
            h.step(Action::Connect).await;
            h.step(Action::Write(WINDOW)).await;
            assert_eq!(h.inflight.len(), 1, "only the suspect is sent");
            if i % 2 == 0 {
                h.clock += POISON_CLOSE_WITHIN + Duration::from_millis(1);
                h.closes_since_ack = 0;
                h.step(Action::Flap).await;
            } else {
                h.step(Action::Disconnect).await;
            }
        }
        assert_eq!(h.relay.isolation.strikes, Some((suspect, 2)));
        // Its PUBACK clears the strikes and ends the isolation.
        h.step(Action::Connect).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Ack(0)).await;
        assert_eq!((h.relay.isolation.strikes, h.relay.isolation.suspect), (None, None));
        assert_eq!(h.relay.window(), WINDOW, "the full window again");
        h.drain().await;
        assert!(h.dead_lettered.is_empty() && h.letters.is_empty());
        assert_eq!(h.acked.len(), 5);
    });
}

/// An upstream that closes every connection before answering anything (a broker that is
/// shutting down) never gets the suspect, so it cannot blame it however often it closes.
#[test]
fn closes_before_the_pingresp_blame_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        accept_with(&mut h, 5, None);
        h.step(Action::Connect).await;
        h.step(Action::Write(WINDOW)).await;
        h.step(Action::Flap).await;
        for _ in 0..10 {
            h.generation += 1;
            let params = LinkParams {
                version: MqttVersion::V311,
                receive_max: u16::MAX,
                max_packet: usize::MAX,
                keepalive: Duration::ZERO,
            };
            let mut probe = BytesMut::new();
            h.relay.on_connected(h.generation, params, h.clock, &mut probe);
            assert!(h.relay.wants_probe());
            assert_eq!(&probe[..], &[0xC0, 0x00], "a PINGREQ first");
            let mut out = BytesMut::new();
            h.relay.pump(&h.worker.commands, h.clock, &mut out);
            assert!(out.is_empty(), "nothing is sent before the PINGRESP");
            h.relay.on_link_lost(LinkLoss::PeerClosed, "closed", h.clock);
        }
        assert_eq!(h.relay.isolation.strikes, None);
        h.drain().await;
        assert_eq!(h.acked.len(), 1);
    });
}

/// Under `reject_new`, a full buffer refuses a sensor's event by refusing its ticket, but a
/// copy no sensor would resend (a window's output) goes to the dead-letter writer, its ticket
/// held until the letter's answer: released (safe) once written, refused if the write failed.
#[test]
fn a_refused_copy_no_sensor_resends_waits_for_its_dead_letter() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        h.relay.settings.overflow = OverflowPolicy::RejectNew;
        h.relay.settings.max_events = 1;
        accept_with(&mut h, 5, None);
        let windows = AckQueue::new();
        let outcomes = |q: &AckQueue| {
            let mut out = Vec::new();
            q.take_ready(&mut out);
            out
        };
        let output = |id: u64, dead_letter_if_refused: bool| Outbound {
            event_id: id,
            topic: format!("avg/{id}"),
            payload: bytes::Bytes::from(format!("{{\"n\":{id}}}")),
            qos: 1,
            priority: 5,
            expires_ms: None,
            received_ms: 0,
            ticket: Some(windows.ticket()),
            props: None,
            dead_letter_if_refused,
        };
        let metrics = h.relay.metrics.clone();
        let c = metrics.counters();
        // A sensor's own event: refused at once, the sensor is told.
        h.relay.accept(output(100, false), h.clock);
        assert_eq!(outcomes(&windows), vec![Outcome::Rejected]);
        assert_eq!(Metrics::get(&c.rejected_full), 1);
        assert!(!h.relay.refused_pending());
        // Window outputs: held, each with its letter.
        h.relay.accept(output(101, true), h.clock);
        h.relay.accept(output(102, true), h.clock);
        assert!(outcomes(&windows).is_empty(), "held until their letters are answered");
        assert_eq!(Metrics::get(&c.rejected_full), 1, "no sensor was refused");
        let (letter, written) = h.relay.next_refused().expect("the first letter");
        assert_eq!(
            (letter.event_id, letter.topic.as_str(), letter.reason.as_str(), &letter.payload[..]),
            (101, "avg/101", "buffer_full", &b"{\"n\":101}"[..])
        );
        let (second, failed) = h.relay.next_refused().expect("the second letter");
        assert_eq!(second.event_id, 102);
        assert!(h.relay.next_refused().is_none());
        assert!(h.relay.refused_pending(), "two letters being written");
        h.relay.on_refused_lettered(written, Ok(()), h.clock);
        assert_eq!(outcomes(&windows), vec![Outcome::Safe], "written: safe");
        h.relay.on_refused_lettered(failed, Err("disk full".to_owned()), h.clock);
        assert_eq!(outcomes(&windows), vec![Outcome::Rejected], "not written: refused, not safe");
        assert!(!h.relay.refused_pending());
        assert_eq!(
            (Metrics::get(&c.buffer_full_dead_lettered), Metrics::get(&c.buffer_full_letters_failed)),
            (1, 1)
        );
    });
}
