//! The relay's state machine driven step by step against a real store, with the publishes it
//! encodes decoded back by rumqttc (no network): random accepts, writes, acks, disconnects, commit
//! ticks and crashes, then a final drain. Checked: every accepted event is acknowledged
//! upstream unless a crash lost it from the stated in-memory window; within one connection
//! and one priority, publishes go out in sequence order; the buffer ends empty; and **no
//! event whose sensor acknowledgement was released is ever lost in a crash** (every event
//! carries a ticket from a simulated sensor connection).

use std::collections::{HashSet, VecDeque};

use crate::config::MqttVersion;
use proptest::prelude::*;

use super::*;
use crate::buffer::Store;
use crate::ingest::acks::{AckQueue, Outcome};

const WINDOW: usize = 4;
const COMMIT_MAX: usize = 5;
const INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
enum Action {
    Accept(u8),
    Connect,
    /// Up to this many encoded publishes reach the upstream.
    Write(usize),
    /// The upstream acknowledges the n-th in-flight publish (acks may come out of order).
    Ack(usize),
    Disconnect,
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
        1 => Just(Action::Connect),
        3 => (1usize..6).prop_map(Action::Write),
        3 => (0usize..8).prop_map(Action::Ack),
        1 => Just(Action::Disconnect),
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
}

fn settings() -> RelaySettings {
    RelaySettings {
        window: WINDOW,
        commit_interval: INTERVAL,
        commit_max_events: COMMIT_MAX,
        max_events: u64::MAX,
        max_bytes: u64::MAX,
        overflow: OverflowPolicy::DropOldest,
        event_id: EventIdMode::None,
        max_events_per_sec: None,
        max_bytes_per_sec: None,
        drain_grace: Duration::from_secs(1),
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, report) = Store::open(dir.path()).expect("open");
        let lanes = store.lanes();
        let worker = Worker::spawn(store).expect("worker");
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
            };
        }
    }

    /// Waits for every outstanding store reply, as the run loop would.
    async fn settle(&mut self) {
        while self.relay.commit_running || self.relay.lanes.iter().any(|l| l.reading) {
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
            let Ok(rumqttc::Packet::Publish(p)) =
                rumqttc::mqttbytes::v4::Packet::read(&mut self.out, usize::MAX)
            else {
                panic!("the relay encoded something other than a publish")
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
            Action::Connect => {
                if !self.connected {
                    self.generation += 1;
                    let params = LinkParams {
                        version: MqttVersion::V311,
                        receive_max: u16::MAX,
                        max_packet: usize::MAX,
                        keepalive: Duration::ZERO,
                    };
                    self.relay.on_connected(self.generation, params);
                    self.connected = true;
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
                }
            }
            Action::Ack(n) => {
                if !self.inflight.is_empty() {
                    let (pkid, id) = self.inflight.remove(n % self.inflight.len());
                    self.relay.on_puback(pkid, None, self.clock);
                    self.acked.insert(id);
                }
            }
            Action::Disconnect => {
                if self.connected {
                    self.connected = false;
                    self.relay.on_link_lost();
                    self.out.clear();
                    self.requested.clear();
                    self.inflight.clear();
                }
            }
            Action::Tick(ms) => {
                self.clock += Duration::from_millis(ms);
                self.relay.maybe_commit(&self.worker.commands, false, self.clock);
                self.settle().await;
            }
            Action::ServeStore => self.settle().await,
            Action::Crash => self.crash().await,
        }
        self.pump();
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
        std::mem::replace(&mut self.worker, Worker::spawn(store).expect("worker")).join();
        self.relay = Relay::new(settings(), Metrics::default(), IdGen::new(report.epoch), lanes);
        self.connected = false;
        self.out.clear();
        self.requested.clear();
        self.inflight.clear();
        self.generation += 1;
    }

    /// Connects and runs until everything that must arrive has been acknowledged.
    async fn drain(&mut self) {
        self.step(Action::Connect).await;
        for _ in 0..10_000 {
            let must: Vec<u64> =
                self.accepted.iter().copied().filter(|id| !self.lost_in_crashes.contains(id)).collect();
            // An event acknowledged before a crash whose delete was not yet committed is still
            // in the file: it is resent (a duplicate) and must be acknowledged again.
            if must.iter().all(|id| self.acked.contains(id))
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
    fn relay_delivers_everything_in_order(actions in prop::collection::vec(arb_action(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        rt.block_on(async {
            let mut h = Harness::new();
            for action in actions {
                h.step(action).await;
            }
            h.drain().await;
            h.collect_released();
            for id in &h.accepted {
                if !h.lost_in_crashes.contains(id) {
                    assert!(h.acked.contains(id), "event {id} was accepted but never acknowledged upstream");
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
            assert_eq!(h.relay.unsaved_len, 0);
            let stored: u64 = h.relay.disk.iter().map(|l| l.events).sum();
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

/// A harness with custom settings, for policy tests.
fn harness_with(settings: RelaySettings) -> Harness {
    let mut h = Harness::new();
    h.relay.settings = settings;
    h
}

fn accept_with(h: &mut Harness, priority: u8, expires_ms: Option<u64>) {
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
        assert_eq!(h.relay.disk.iter().map(|l| l.events).sum::<u64>(), 0, "the expired event left the file");
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
        h.relay.rate_wait = Some(now - Duration::from_millis(5));
        h.relay.read_retry_at = Some(now - Duration::from_millis(5));
        assert!(h.relay.next_deadline().is_some_and(|d| d <= now), "the set-up has past deadlines");
        h.relay.clear_elapsed_waits(now);
        assert!(h.relay.next_deadline().is_none_or(|d| d > now), "{:?}", h.relay.next_deadline());
        // A wait still ahead stays.
        h.relay.rate_wait = Some(now + Duration::from_millis(5));
        h.relay.clear_elapsed_waits(now);
        assert_eq!(h.relay.next_deadline(), Some(now + Duration::from_millis(5)));
    });
}
