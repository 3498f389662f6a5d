//! The window engine driven by a hand-moved clock, and a model test with crash points.

use proptest::prelude::*;

use super::*;

fn plan(spec: WindowSpec, aggs: Vec<AggKind>) -> WindowPlan {
    WindowPlan { spec, aggs, max_groups: DEFAULT_MAX_GROUPS, time: TimeBasis::Processing }
}

fn count_sum(spec: WindowSpec) -> Windows {
    Windows::new(plan(spec, vec![AggKind::CountAll, AggKind::Sum]))
}

/// Pushes `value` for `key` at `at`, returning what closed.
fn push(w: &mut Windows, at: u64, key: &str, value: i64) -> Vec<Closed> {
    let mut out = Vec::new();
    assert_eq!(w.push(at, key, &[Value::Int(value), Value::Int(value)], &mut out), Pushed::Accepted);
    out
}

/// (key, start, end, count, sum) of each closed window.
fn brief(closed: &[Closed]) -> Vec<(String, u64, u64, Value, Value)> {
    closed
        .iter()
        .map(|c| (c.key.clone(), c.start_ms, c.end_ms, c.values[0].clone(), c.values[1].clone()))
        .collect()
}

fn row(key: &str, start: u64, end: u64, count: i64, sum: i64) -> (String, u64, u64, Value, Value) {
    (key.to_owned(), start, end, Value::Int(count), Value::Int(sum))
}

#[test]
fn tumbling_windows_align_to_the_clock_and_close_at_their_end() {
    let mut w = count_sum(WindowSpec::Tumbling { size_ms: 10_000 });
    assert!(push(&mut w, 12_345, "a", 1).is_empty());
    assert!(push(&mut w, 19_999, "a", 2).is_empty());
    assert!(push(&mut w, 15_000, "b", 5).is_empty());
    assert!(w.advance(19_999).is_empty(), "[10 s, 20 s) is still open at 19.999 s");
    assert_eq!(brief(&w.advance(20_000)), [row("a", 10_000, 20_000, 2, 3), row("b", 10_000, 20_000, 1, 5)]);
    assert_eq!(w.groups(), 0, "a group with nothing open is dropped");
    // An event at exactly the boundary opens the next window.
    assert!(push(&mut w, 20_000, "a", 7).is_empty());
    assert_eq!(brief(&w.advance(35_000)), [row("a", 20_000, 30_000, 1, 7)]);
}

#[test]
fn empty_windows_emit_nothing() {
    let mut w = count_sum(WindowSpec::Tumbling { size_ms: 1_000 });
    for now in (0..100_000).step_by(250) {
        assert!(w.advance(now).is_empty());
    }
    push(&mut w, 100_500, "a", 1);
    assert_eq!(brief(&w.advance(200_000)), [row("a", 100_000, 101_000, 1, 1)], "one window, not 100");
}

#[test]
fn an_event_past_its_window_closes_it_without_waiting_for_advance() {
    let mut w = count_sum(WindowSpec::Tumbling { size_ms: 10 });
    push(&mut w, 3, "a", 1);
    assert_eq!(brief(&push(&mut w, 25, "a", 2)), [row("a", 0, 10, 1, 1)]);
    assert_eq!(brief(&w.advance(30)), [row("a", 20, 30, 1, 2)]);
}

#[test]
fn hopping_windows_overlap_and_each_holds_its_events() {
    let mut w = count_sum(WindowSpec::Hopping { size_ms: 10, hop_ms: 5 });
    push(&mut w, 7, "a", 1); // in [0, 10) and [5, 15)
    assert!(w.advance(9).is_empty());
    // In [5, 15) and [10, 20); past [0, 10), which it closes.
    assert_eq!(brief(&push(&mut w, 12, "a", 10)), [row("a", 0, 10, 1, 1)]);
    assert!(w.advance(14).is_empty());
    assert_eq!(brief(&w.advance(15)), [row("a", 5, 15, 2, 11)]);
    assert_eq!(brief(&w.advance(100)), [row("a", 10, 20, 1, 10)]);
    // Hop = size is a tumbling window.
    let mut w = count_sum(WindowSpec::Hopping { size_ms: 10, hop_ms: 10 });
    push(&mut w, 7, "a", 1);
    assert_eq!(brief(&push(&mut w, 12, "a", 2)), [row("a", 0, 10, 1, 1)]);
    assert_eq!(brief(&w.advance(100)), [row("a", 10, 20, 1, 2)]);
}

#[test]
fn hopping_after_an_advance_opens_no_window_that_already_closed() {
    let mut w = count_sum(WindowSpec::Hopping { size_ms: 10, hop_ms: 5 });
    push(&mut w, 3, "a", 1);
    assert_eq!(brief(&w.advance(10)), [row("a", 0, 10, 1, 1)]);
    // Received at 10 (the watermark) an event at 9 belongs to [5, 15) only: [0, 10) was sent.
    push(&mut w, 9, "a", 2);
    assert_eq!(brief(&w.advance(15)), [row("a", 5, 15, 1, 2)]);
}

#[test]
fn session_windows_close_on_a_gap_or_at_the_aligned_maximum() {
    // Maximum 60 s (closes at the next minute boundary), timeout 10 s.
    let mut w = count_sum(WindowSpec::Session { max_ms: 60_000, timeout_ms: 10_000 });
    push(&mut w, 1_000, "a", 1);
    push(&mut w, 9_000, "a", 2);
    assert!(w.advance(18_999).is_empty());
    assert_eq!(brief(&w.advance(19_000)), [row("a", 1_000, 19_000, 2, 3)], "10 s after the last event");
    // A gap of exactly the timeout starts a new session on push.
    push(&mut w, 20_000, "a", 1);
    assert_eq!(brief(&push(&mut w, 30_000, "a", 2)), [row("a", 20_000, 30_000, 1, 1)]);
    // Events every 5 s never time out; the session ends at 60 s, the next starts there.
    for t in (35_000..80_000).step_by(5_000) {
        let closed = push(&mut w, t, "a", 1);
        if t == 60_000 {
            assert_eq!(brief(&closed), [row("a", 30_000, 60_000, 6, 7)]);
        } else {
            assert!(closed.is_empty(), "at {t}: {closed:?}");
        }
    }
    assert_eq!(brief(&w.advance(200_000)), [row("a", 60_000, 85_000, 4, 4)]);
}

#[test]
fn count_windows_close_on_their_nth_event() {
    let mut w = count_sum(WindowSpec::Count { size: 3, step: 3 });
    let mut closed = Vec::new();
    for (t, v) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)] {
        closed.extend(push(&mut w, t, "a", v));
    }
    assert_eq!(brief(&closed), [row("a", 1, 3, 3, 6)]);
    assert!(w.advance(1_000_000).is_empty(), "count windows do not close on time");
    assert_eq!(brief(&push(&mut w, 6, "a", 6)), [row("a", 4, 6, 3, 15)]);
}

#[test]
fn overlapping_count_windows_follow_ekuiper() {
    // COUNTWINDOW(5, 2): events 2 and 4 do not trigger (fewer than 5), event 6 does with the
    // latest 5, event 8 with 4..8.
    let mut w = count_sum(WindowSpec::Count { size: 5, step: 2 });
    let mut closed = Vec::new();
    for t in 1..=8 {
        closed.extend(push(&mut w, t, "a", t as i64));
    }
    assert_eq!(brief(&closed), [row("a", 2, 6, 5, 20), row("a", 4, 8, 5, 30)]);
}

#[test]
fn sliding_windows_emit_on_every_event_over_the_last_size() {
    let mut w = count_sum(WindowSpec::Sliding { size_ms: 10 });
    assert_eq!(brief(&push(&mut w, 100, "a", 1)), [row("a", 90, 100, 1, 1)]);
    assert_eq!(brief(&push(&mut w, 105, "a", 2)), [row("a", 95, 105, 2, 3)]);
    // 100 is not in (100, 110].
    assert_eq!(brief(&push(&mut w, 110, "a", 4)), [row("a", 100, 110, 2, 6)]);
    assert!(w.advance(1_000).is_empty());
    assert_eq!(w.groups(), 0, "kept events expire with the window");
}

#[test]
fn late_events_are_counted_and_in_no_window() {
    let mut w = count_sum(WindowSpec::Tumbling { size_ms: 10 });
    push(&mut w, 5, "a", 1);
    assert_eq!(w.advance(10).len(), 1);
    let mut out = Vec::new();
    assert_eq!(w.push(9, "a", &[Value::Int(1), Value::Int(1)], &mut out), Pushed::Late);
    assert_eq!(w.counters().late, 1);
    assert!(w.advance(100).is_empty());
}

#[test]
fn a_new_group_beyond_the_limit_closes_the_least_recent_group_early() {
    let mut w = Windows::new(WindowPlan {
        spec: WindowSpec::Tumbling { size_ms: 10 },
        aggs: vec![AggKind::CountAll, AggKind::Sum],
        max_groups: 2,
        time: TimeBasis::Processing,
    });
    push(&mut w, 1, "a", 1);
    push(&mut w, 2, "b", 2);
    push(&mut w, 3, "a", 3); // "b" is now the least recently seen
    let closed = push(&mut w, 4, "c", 4);
    assert_eq!(brief(&closed), [row("b", 0, 10, 1, 2)]);
    assert!(closed[0].early);
    assert_eq!(w.counters().groups_evicted, 1);
    assert_eq!(w.groups(), 2);
    let closed = w.advance(10);
    assert_eq!(brief(&closed), [row("a", 0, 10, 2, 4), row("c", 0, 10, 1, 4)]);
    assert!(closed.iter().all(|c| !c.early));
}

#[test]
fn held_closings_come_out_only_at_release_and_survive_a_snapshot() {
    let mut w = count_sum(WindowSpec::Count { size: 2, step: 2 });
    w.hold_event_closings();
    assert!(push(&mut w, 1, "a", 1).is_empty());
    assert!(push(&mut w, 2, "a", 3).is_empty(), "closed, held");
    let mark = w.due_mark();
    assert!(push(&mut w, 3, "a", 5).is_empty());
    assert!(push(&mut w, 4, "a", 7).is_empty(), "closed after the mark, held");
    // A checkpoint taken at `mark` holds the first; the restored state holds both.
    let mut restored = Windows::restore(w.plan(), &w.snapshot()).expect("restore");
    assert_eq!(restored, w);
    assert_eq!(brief(&w.release(mark)), [row("a", 1, 2, 2, 4)]);
    assert_eq!(brief(&w.release(w.due_mark())), [row("a", 3, 4, 2, 12)]);
    assert!(w.release(w.due_mark()).is_empty(), "released once");
    assert_eq!(w.groups(), 0, "a group with nothing open nor held is dropped");
    assert_eq!(brief(&restored.release(restored.due_mark())), [row("a", 1, 2, 2, 4), row("a", 3, 4, 2, 12)]);
}

#[test]
fn a_held_evicted_group_does_not_count_against_the_limit_and_is_released_whole() {
    let mut w = Windows::new(WindowPlan {
        spec: WindowSpec::Tumbling { size_ms: 10 },
        aggs: vec![AggKind::CountAll, AggKind::Sum],
        max_groups: 1,
        time: TimeBasis::Processing,
    });
    w.hold_event_closings();
    assert!(push(&mut w, 1, "a", 1).is_empty());
    assert!(push(&mut w, 2, "b", 2).is_empty(), "a evicted, held");
    assert!(push(&mut w, 3, "c", 3).is_empty(), "b evicted, held");
    assert_eq!(w.counters().groups_evicted, 2);
    let released = w.release(w.due_mark());
    assert_eq!(brief(&released), [row("a", 0, 10, 1, 1), row("b", 0, 10, 1, 2)]);
    assert!(released.iter().all(|c| c.early));
    assert_eq!(w.groups(), 1);
    assert_eq!(brief(&w.advance(10)), [row("c", 0, 10, 1, 3)]);
}

fn any_spec() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        spec(),
        (1..4u64).prop_map(|s| WindowSpec::Sliding { size_ms: s * 300 }),
        (2..5u64, 1..3u64).prop_map(|(size, step)| WindowSpec::Count { size, step }),
    ]
}

proptest! {
    /// Held closings, released after each event (through a snapshot and its restore, as a
    /// checkpoint and a crash would), are exactly what the engine gives at once without
    /// holding: the same windows with the same bounds and values, for every window kind,
    /// eviction included.
    #[test]
    fn held_closings_are_the_closings_given_at_once(
        spec in any_spec(),
        max_groups in 1..4usize,
        events in prop::collection::vec((0..400u64, 0..5u8, any::<i8>(), any::<bool>(), any::<bool>()), 1..60),
    ) {
        let plan = WindowPlan { spec, aggs: vec![AggKind::CountAll, AggKind::Sum], max_groups, time: TimeBasis::Processing };
        let mut at_once = Windows::new(plan.clone());
        let mut held = Windows::new(plan.clone());
        held.hold_event_closings();
        let mut now = 1_000;
        let shown = |closed: &[Closed]| {
            let mut shown: Vec<String> = closed.iter().map(|c| format!("{c:?}")).collect();
            shown.sort();
            shown
        };
        // Given at once and not yet released from the held engine.
        let mut expected = Vec::new();
        let last = events.len() - 1;
        for (i, (dt, key, value, crash, release)) in events.into_iter().enumerate() {
            now += dt;
            let inputs = [Value::Int(value.into()), Value::Int(value.into())];
            let key = format!("s{key}");
            prop_assert_eq!(shown(&at_once.advance(now)), shown(&held.advance(now)), "the clock closes the same");
            at_once.push(now, &key, &inputs, &mut expected);
            let mut out = Vec::new();
            held.push(now, &key, &inputs, &mut out);
            prop_assert!(out.is_empty(), "nothing comes out of a push while held");
            // `has_due` keeps a count, not a scan: it must agree with one at every step.
            let scanned = |w: &Windows| w.groups.values().any(|g| !g.due.is_empty());
            prop_assert_eq!(held.has_due(), scanned(&held));
            if crash {
                held = Windows::restore(&plan, &held.snapshot()).expect("own snapshot");
                held.hold_event_closings();
            }
            if release || i == last {
                let released = held.release(held.due_mark());
                prop_assert!(!held.has_due(), "everything held was released");
                prop_assert_eq!(held.has_due(), scanned(&held));
                prop_assert_eq!(shown(&released), shown(&expected));
                expected.clear();
                // Open groups: a group whose count window just closed is kept empty at
                // once and dropped at release when held, which changes no output.
                let open = |w: &Windows| w.groups.values().filter(|g| g.is_open()).count();
                prop_assert_eq!(open(&held), open(&at_once));
            }
        }
    }
}

#[test]
fn all_aggregates_in_one_window() {
    let aggs = vec![
        AggKind::Count,
        AggKind::Avg,
        AggKind::Min,
        AggKind::Max,
        AggKind::First,
        AggKind::Last,
        AggKind::Stddev,
        AggKind::Percentile(0.5),
        AggKind::Collect(2),
    ];
    let n = aggs.len();
    let mut w = Windows::new(plan(WindowSpec::Tumbling { size_ms: 10 }, aggs));
    let mut out = Vec::new();
    for (t, v) in [(1, 4), (2, 2), (3, 6)] {
        w.push(t, "k", &vec![Value::Int(v); n], &mut out);
    }
    let closed = w.advance(10);
    let values = &closed[0].values;
    assert_eq!(
        values[..7],
        [
            Value::Int(3),
            Value::Float(4.0),
            Value::Int(2),
            Value::Int(6),
            Value::Int(4),
            Value::Int(6),
            Value::Float((8.0f64 / 3.0).sqrt()),
        ]
    );
    assert_eq!(values[8], Value::Array(vec![Value::Int(4), Value::Int(2)]));
    let Value::Float(median) = values[7] else { panic!("{:?}", values[7]) };
    assert!((median - 4.0).abs() <= 0.04, "median {median}");
}

#[test]
fn snapshot_restores_the_same_state_and_refuses_a_changed_rule() {
    let mut w = count_sum(WindowSpec::Session { max_ms: 60_000, timeout_ms: 5_000 });
    push(&mut w, 1_000, "a", 1);
    push(&mut w, 2_000, "b", 2);
    w.advance(2_500);
    let bytes = w.snapshot();
    let restored = Windows::restore(w.plan(), &bytes).unwrap();
    assert_eq!(restored, w);
    let mut changed = w.plan().clone();
    changed.aggs.pop();
    assert_eq!(Windows::restore(&changed, &bytes), Err(SnapshotError::PlanChanged));
    assert!(matches!(Windows::restore(w.plan(), &bytes[..bytes.len() / 2]), Err(SnapshotError::Decode(_))));
}

// The model test. The gateway's contract: an event is acknowledged to its sensor only once a
// checkpoint holding it is committed, and the windows closed since the previous checkpoint
// are committed in that same transaction. A crash loses everything after the last
// checkpoint: the state (restored from the snapshot and the deltas committed since), the
// closed windows not yet committed, and the unacknowledged events, which their sensors send
// again later (with a new receive time). At the end every event must be in exactly one
// committed window, and that window must be the one a direct computation over the
// acknowledged events gives.

/// The durable window state as the gateway keeps it: a full snapshot, then a delta per
/// checkpoint, compacted into a new snapshot now and then.
struct Durable {
    base: Vec<u8>,
    deltas: Vec<Vec<u8>>,
    /// A write failed: what its delta held is in no log, so the next checkpoint must be a
    /// full snapshot (the caller's rule).
    need_full: bool,
}

impl Durable {
    fn new(windows: &mut Windows) -> Durable {
        let base = windows.snapshot();
        windows.clear_changes();
        Durable { base, deltas: Vec::new(), need_full: false }
    }

    /// A checkpoint's write: a delta, or a full snapshot when `full` (compaction) or after a
    /// failed write. `false` when the write fails: nothing is committed.
    fn checkpoint(&mut self, windows: &mut Windows, full: bool, fails: bool) -> bool {
        if full || self.need_full {
            let base = windows.snapshot();
            windows.clear_changes();
            if fails {
                self.need_full = true;
                return false;
            }
            self.base = base;
            self.deltas.clear();
            self.need_full = false;
        } else {
            let delta = windows.take_delta();
            if fails {
                self.need_full = true;
                return false;
            }
            self.deltas.push(delta);
        }
        true
    }

    fn restore(&self, plan: &WindowPlan) -> Windows {
        Windows::restore_log(plan, &self.base, self.deltas.iter().map(Vec::as_slice)).expect("own log")
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// An event from sensor `key` with `value`, after `dt` ms.
    Event { dt: u64, key: u8, value: i8 },
    /// The rules stage's timer.
    Advance { dt: u64 },
    /// A group commit, its state a delta or (`full`) a compaction into a snapshot; the write
    /// `fails` (nothing committed).
    Checkpoint { full: bool, fails: bool },
    /// SIGKILL, then a restart from the last checkpoint.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..400u64, 0..6u8, any::<i8>()).prop_map(|(dt, key, value)| Step::Event { dt, key, value }),
        2 => (0..2_000u64).prop_map(|dt| Step::Advance { dt }),
        2 => (prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(full, fails)| Step::Checkpoint { full, fails }),
        1 => Just(Step::Crash),
    ]
}

/// The last commit before shutdown, which succeeds.
const LAST_CHECKPOINT: Step = Step::Checkpoint { full: false, fails: false };

fn spec() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        (1..5u64).prop_map(|s| WindowSpec::Tumbling { size_ms: s * 500 }),
        (1..4u64).prop_map(|s| WindowSpec::Hopping { size_ms: s * 700, hop_ms: s * 700 }),
        (1..4u64, 1..4u64)
            .prop_map(|(m, t)| WindowSpec::Session { max_ms: m * 1_000 + t * 300, timeout_ms: t * 300 }),
        (1..6u64).prop_map(|n| WindowSpec::Count { size: n, step: n }),
    ]
}

/// The window an acknowledged event belongs to, computed directly.
fn tumbling_start(spec: WindowSpec, at: u64) -> Option<u64> {
    match spec {
        WindowSpec::Tumbling { size_ms } => Some(at - at % size_ms),
        WindowSpec::Hopping { size_ms, .. } => Some(at - at % size_ms),
        _ => None,
    }
}

fn event_time(spec: WindowSpec, tolerance_ms: u64, idle_ms: u64) -> Windows {
    Windows::new(WindowPlan {
        time: TimeBasis::Event { field: "payload.ts".to_owned(), tolerance_ms, idle_ms },
        ..plan(spec, vec![AggKind::CountAll, AggKind::Sum])
    })
}

/// Pushes `value` for `key` stamped `at`, received at `now`; what closed, and the fate.
fn push_at(w: &mut Windows, at: u64, now: u64, key: &str, value: i64) -> (Vec<Closed>, Pushed) {
    let mut out = Vec::new();
    let pushed = w.push_event(at, now, key, &[Value::Int(value), Value::Int(value)], &mut out);
    (out, pushed)
}

#[test]
fn event_time_places_out_of_order_events_in_their_own_window() {
    let mut w = event_time(WindowSpec::Tumbling { size_ms: 10_000 }, 5_000, 5_000);
    assert_eq!(push_at(&mut w, 11_000, 11_100, "a", 1), (vec![], Pushed::Accepted));
    // 3 s out of order, within the 5 s tolerance: [0, 10 s), not the window open at 11 s.
    assert_eq!(push_at(&mut w, 8_000, 11_200, "a", 10), (vec![], Pushed::Accepted));
    assert_eq!(push_at(&mut w, 14_000, 14_100, "a", 2), (vec![], Pushed::Accepted));
    // The event clock reaching 15 s puts the watermark at 10 s: [0, 10 s) closes, inside push.
    let (closed, pushed) = push_at(&mut w, 15_000, 15_050, "b", 5);
    assert_eq!(pushed, Pushed::Accepted);
    assert_eq!(brief(&closed), [row("a", 0, 10_000, 1, 10)]);
    assert_eq!(w.watermark(), 10_000);
    // The gateway's clock alone does not close [10 s, 20 s) while events keep coming.
    assert!(w.advance(20_500).is_empty());
    let (closed, _) = push_at(&mut w, 25_000, 25_000, "a", 3);
    assert_eq!(brief(&closed), [row("a", 10_000, 20_000, 2, 3), row("b", 10_000, 20_000, 1, 5)]);
    assert_eq!(w.counters().late, 0);
}

#[test]
fn event_time_hopping_takes_an_earlier_event_into_every_window_still_open() {
    let mut w = event_time(WindowSpec::Hopping { size_ms: 10, hop_ms: 5 }, 10, 1_000);
    push_at(&mut w, 12, 100, "a", 1); // windows [5, 15) and [10, 20)
    // Watermark 2: 3 is in [0, 10) only (no window starts before the epoch), opened in
    // front of the two later ones.
    push_at(&mut w, 3, 100, "a", 10);
    let (closed, pushed) = push_at(&mut w, 26, 100, "a", 100); // watermark 16
    assert_eq!(pushed, Pushed::Accepted);
    assert_eq!(brief(&closed), [row("a", 0, 10, 1, 10), row("a", 5, 15, 1, 1)]);
    let (closed, _) = push_at(&mut w, 40, 100, "a", 1_000); // watermark 30
    assert_eq!(brief(&closed), [row("a", 10, 20, 1, 1), row("a", 20, 30, 1, 100)]);
}

#[test]
fn event_time_beyond_the_tolerance_is_late_and_counted() {
    let mut w = event_time(WindowSpec::Tumbling { size_ms: 10 }, 5, 1_000);
    push_at(&mut w, 21, 21, "a", 1); // watermark 16: [0, 10) is closed
    assert_eq!(push_at(&mut w, 9, 22, "a", 1).1, Pushed::Late);
    assert_eq!(push_at(&mut w, 16, 22, "b", 1).1, Pushed::Accepted, "[10, 20) is open until 25");
    assert_eq!(w.counters().late, 1);
    let (closed, _) = push_at(&mut w, 25, 25, "a", 1);
    assert_eq!(brief(&closed), [row("b", 10, 20, 1, 1)]);
    assert_eq!(push_at(&mut w, 19, 26, "b", 1).1, Pushed::Late);
    assert_eq!(w.counters().late, 2);
}

#[test]
fn a_sensor_clock_ahead_of_the_gateway_does_not_make_the_others_late() {
    let mut w = event_time(WindowSpec::Tumbling { size_ms: 10_000 }, 5_000, 5_000);
    // Stamped an hour ahead: in its own (future) window, but the rule's clock stays at 10 s.
    assert_eq!(push_at(&mut w, 3_610_000, 10_000, "fast", 1).1, Pushed::Accepted);
    assert_eq!(w.watermark(), 5_000);
    assert_eq!(push_at(&mut w, 9_000, 10_100, "b", 1).1, Pushed::Accepted);
    // A group keeps at most MAX_OVERLAP windows open: a time beyond them is refused.
    let far = 3_610_000 + MAX_OVERLAP * 10_000;
    for at in (3_620_000..far).step_by(10_000) {
        assert_eq!(push_at(&mut w, at, 10_200, "fast", 1).1, Pushed::Accepted);
    }
    assert_eq!(push_at(&mut w, far, 10_300, "fast", 1).1, Pushed::Ahead);
    assert_eq!(w.counters().ahead, 1);
}

#[test]
fn the_most_windows_the_compiler_allows_fit_a_group() {
    // 64 windows hold each time, the most the compiler allows (with no tolerance): events
    // in order must never be refused as ahead.
    let mut w = event_time(WindowSpec::Hopping { size_ms: 640, hop_ms: 10 }, 0, 1_000);
    let mut closed = 0;
    for now in (1_000..3_000).step_by(3) {
        let (out, pushed) = push_at(&mut w, now, now, "a", 1);
        assert_eq!(pushed, Pushed::Accepted, "at {now}");
        closed += out.len();
    }
    assert!(closed > 100);
    assert_eq!(w.counters().ahead, 0);
}

#[test]
fn a_quiet_sensor_closes_on_the_fleet_and_a_quiet_fleet_on_the_idle_timeout() {
    let mut w = event_time(WindowSpec::Tumbling { size_ms: 10_000 }, 2_000, 3_000);
    push_at(&mut w, 1_000, 1_100, "quiet", 1);
    // Only "busy" speaks from now on; its clock closes the quiet sensor's window.
    push_at(&mut w, 9_000, 9_100, "busy", 1);
    let (closed, _) = push_at(&mut w, 12_000, 12_100, "busy", 2);
    assert_eq!(brief(&closed), [row("busy", 0, 10_000, 1, 1), row("quiet", 0, 10_000, 1, 1)]);
    // Then nobody: [10 s, 20 s) closes when the event clock, running on after 3 s of
    // silence from 12 s, reaches 22 s: at 12.1 s + 10 s on the gateway's clock.
    assert_eq!(w.next_close(), Some(22_100));
    assert!(w.advance(15_000).is_empty(), "silent 2.9 s: the clock waits");
    assert!(w.advance(22_099).is_empty());
    assert_eq!(brief(&w.advance(22_100)), [row("busy", 10_000, 20_000, 1, 2)]);
    assert_eq!(w.next_close(), None);
    assert_eq!(w.groups(), 0);
    // The silence moved the clock: an event stamped before it is late.
    assert_eq!(push_at(&mut w, 19_000, 30_000, "busy", 1).1, Pushed::Late);
}

#[test]
fn the_watermark_survives_a_snapshot_so_closed_windows_stay_closed() {
    let spec = WindowSpec::Tumbling { size_ms: 10 };
    let mut w = event_time(spec, 5, 1_000);
    push_at(&mut w, 3, 30, "a", 1);
    push_at(&mut w, 12, 30, "a", 2);
    let (closed, _) = push_at(&mut w, 16, 30, "b", 4); // watermark 11: [0, 10) closes
    assert_eq!(brief(&closed), [row("a", 0, 10, 1, 1)]);
    let mut back = Windows::restore(w.plan(), &w.snapshot()).expect("own snapshot");
    assert_eq!(back.watermark(), 11);
    assert_eq!(push_at(&mut back, 8, 31, "a", 1).1, Pushed::Late, "[0, 10) is not reopened");
    assert_eq!(push_at(&mut back, 13, 31, "a", 3).1, Pushed::Accepted);
    let (closed, _) = push_at(&mut back, 25, 31, "b", 8);
    assert_eq!(brief(&closed), [row("a", 10, 20, 2, 5), row("b", 10, 20, 1, 4)]);
    // A new tolerance applies on restore; switching the clock is a changed plan.
    let wider = event_time(spec, 9, 1_000);
    assert_eq!(Windows::restore(wider.plan(), &back.snapshot()).map(|w| w.watermark()), Ok(20));
    let processing = count_sum(spec);
    assert_eq!(Windows::restore(processing.plan(), &back.snapshot()), Err(SnapshotError::PlanChanged));
}

#[test]
fn a_snapshot_from_before_event_time_restores_on_processing_time() {
    let mut w = count_sum(WindowSpec::Tumbling { size_ms: 10 });
    push(&mut w, 5, "a", 1);
    assert!(push(&mut w, 15, "a", 2).len() == 1);
    // The same state as the previous format wrote it: no clock in the plan, no event clock.
    let mut value: ciborium::Value = ciborium::from_reader(&w.snapshot_format_1()[..]).expect("cbor");
    let strip = |map: &mut ciborium::Value, keys: &[&str]| {
        if let ciborium::Value::Map(entries) = map {
            entries.retain(|(k, _)| !keys.iter().any(|key| k.as_text() == Some(*key)));
        }
    };
    let mut removed = 0;
    if let ciborium::Value::Map(top) = &mut value {
        for (k, windows) in top.iter_mut() {
            if k.as_text() == Some("windows") {
                strip(windows, &["event_clock", "last_arrival"]);
                if let ciborium::Value::Map(fields) = windows {
                    for (k, v) in fields.iter_mut() {
                        if k.as_text() == Some("plan") {
                            strip(v, &["time"]);
                            removed += 1;
                        }
                        if k.as_text() == Some("counters") {
                            strip(v, &["ahead"]);
                        }
                    }
                }
            }
        }
    }
    assert_eq!(removed, 1, "the snapshot has the shape this test edits");
    let mut old = Vec::new();
    ciborium::into_writer(&value, &mut old).expect("cbor");
    assert!(old.len() < w.snapshot_format_1().len());
    let mut back = Windows::restore(w.plan(), &old).expect("an old snapshot restores");
    assert_eq!(back, w);
    assert_eq!(brief(&back.advance(20)), [row("a", 10, 20, 1, 2)]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_acknowledged_event_is_in_exactly_one_committed_window(
        spec in spec(),
        max_groups in 1..8usize,
        steps in prop::collection::vec(step(), 1..120),
        hold in any::<bool>(),
    ) {
        // With `hold`, as the gateway runs it: windows an event closes are held in the state
        // and released after the checkpoint holding them commits; a crash after that and
        // before the next checkpoint releases them again, the same (the upstream dedupes
        // them by id), so only a copy equal to one already released may come twice.
        // Each event's id travels through `collect`, so the windows say which events they hold.
        let plan = WindowPlan {
            spec,
            aggs: vec![AggKind::Collect(MAX_COLLECT_CAP), AggKind::Sum, AggKind::CountAll],
            max_groups,
            time: TimeBasis::Processing,
        };
        let mut windows = Windows::new(plan.clone());
        if hold {
            windows.hold_event_closings();
        }
        let mut durable = Durable::new(&mut windows);
        let mut now = 1_000u64;
        let mut next_id = 0i64;
        // Events pushed since the last checkpoint: (id, key, value); not yet acknowledged.
        let mut pending: Vec<(i64, u8, i8)> = Vec::new();
        // Sensors' resends waiting to be pushed again.
        let mut resend: Vec<(i64, u8, i8)> = Vec::new();
        // id → (key, value, receive time) of acknowledged events.
        let mut acked: std::collections::BTreeMap<i64, (u8, i8, u64)> = Default::default();
        let mut pending_times: std::collections::BTreeMap<i64, u64> = Default::default();
        let mut closed_since: Vec<Closed> = Vec::new();
        let mut committed: Vec<Closed> = Vec::new();
        let do_push = |windows: &mut Windows, at: u64, id: i64, key: u8, value: i8, out: &mut Vec<Closed>| {
            let inputs = [Value::Int(id), Value::Int(value.into()), Value::Null];
            windows.push(at, &format!("s{key}"), &inputs, out)
        };
        for step in steps.into_iter().chain([LAST_CHECKPOINT]) {
            match step {
                Step::Event { dt, key, value } => {
                    now += dt;
                    // A resend, if any, goes first: sensors resend before sending new data.
                    let (id, key, value) = resend.pop().unwrap_or_else(|| {
                        next_id += 1;
                        (next_id, key, value)
                    });
                    let mut out = Vec::new();
                    prop_assert_eq!(do_push(&mut windows, now, id, key, value, &mut out), Pushed::Accepted);
                    prop_assert!(!hold || out.is_empty(), "nothing an event closes comes out while held");
                    closed_since.append(&mut out);
                    pending.push((id, key, value));
                    pending_times.insert(id, now);
                }
                Step::Advance { dt } => {
                    now += dt;
                    closed_since.extend(windows.advance(now));
                }
                Step::Checkpoint { full, fails } => {
                    let mark = windows.due_mark();
                    if durable.checkpoint(&mut windows, full, fails) {
                        prop_assert_eq!(&durable.restore(&plan), &windows);
                        committed.append(&mut closed_since);
                        for closed in windows.release(mark) {
                            if !committed.contains(&closed) {
                                committed.push(closed);
                            }
                        }
                        for (id, key, value) in pending.drain(..) {
                            acked.insert(id, (key, value, pending_times[&id]));
                        }
                    }
                }
                Step::Crash => {
                    windows = durable.restore(&plan);
                    if hold {
                        windows.hold_event_closings();
                    }
                    closed_since.clear();
                    resend.append(&mut pending);
                    now += 5_000; // a restart takes time
                }
            }
        }
        // Shut down: resend what is left, then close everything and commit.
        for (id, key, value) in resend.drain(..) {
            now += 1;
            do_push(&mut windows, now, id, key, value, &mut closed_since);
            acked.insert(id, (key, value, now));
        }
        closed_since.extend(windows.flush());
        for closed in closed_since {
            // A held window released before a crash is flushed again, the same.
            if !(hold && committed.contains(&closed)) {
                committed.push(closed);
            }
        }

        let mut seen: std::collections::BTreeMap<i64, (String, u64)> = Default::default();
        for closed in &committed {
            let Value::Array(ids) = &closed.values[0] else { panic!("collect gives an array") };
            let mut sum = 0i64;
            for id in ids {
                let Value::Int(id) = id else { panic!("ids are ints") };
                prop_assert!(seen.insert(*id, (closed.key.clone(), closed.start_ms)).is_none(), "event {} in two windows", id);
                let Some((key, value, at)) = acked.get(id) else {
                    return Err(TestCaseError::fail(format!("event {id} counted but never acknowledged")));
                };
                prop_assert_eq!(&closed.key, &format!("s{key}"));
                sum += i64::from(*value);
                if let Some(start) = tumbling_start(spec, *at) {
                    prop_assert_eq!(closed.start_ms, start, "event {} at {} in the wrong window", id, at);
                } else if let WindowSpec::Session { .. } = spec {
                    prop_assert!(closed.start_ms <= *at && *at <= closed.end_ms);
                }
            }
            prop_assert_eq!(closed.values[2].clone(), Value::Int(ids.len() as i64));
            prop_assert_eq!(closed.events, ids.len() as u64);
            if !ids.is_empty() {
                prop_assert_eq!(closed.values[1].clone(), Value::Int(sum));
            }
        }
        let acked_ids: Vec<i64> = acked.keys().copied().collect();
        let seen_ids: Vec<i64> = seen.keys().copied().collect();
        prop_assert_eq!(acked_ids, seen_ids, "every acknowledged event counted");
    }
}

#[test]
fn extreme_times_do_not_panic() {
    for spec in [
        WindowSpec::Tumbling { size_ms: 10_000 },
        WindowSpec::Hopping { size_ms: 10_000, hop_ms: 5_000 },
        WindowSpec::Session { max_ms: 60_000, timeout_ms: 1_000 },
        WindowSpec::Sliding { size_ms: 10 },
        WindowSpec::Count { size: 2, step: 1 },
    ] {
        let mut w = count_sum(spec);
        let mut out = Vec::new();
        for at in [0, u64::MAX - 1, u64::MAX, 5] {
            w.push(at, "k", &[Value::Int(1), Value::Int(1)], &mut out);
            out.extend(w.advance(at));
        }
        out.extend(w.flush());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Event time: each acknowledged event is in exactly one committed window — the one its
    /// own time says, whatever order events came in — or was refused as late (its window
    /// had closed) at its last push; no window is emitted twice, across crash points.
    #[test]
    fn event_time_counts_each_acknowledged_event_once_or_reports_it_late(
        size in 1..5u64,
        tolerance_ms in 0..1_500u64,
        idle_ms in 1..3_000u64,
        max_groups in 1..8usize,
        steps in prop::collection::vec((step(), 0..2_500u64), 1..120),
        hold in any::<bool>(),
    ) {
        // With `hold`, windows a reading's watermark closes (or an eviction) are held until
        // the checkpoint holding them commits; a copy equal to one released may come again
        // after a crash.
        let spec = WindowSpec::Tumbling { size_ms: size * 500 };
        let plan = WindowPlan {
            spec,
            aggs: vec![AggKind::Collect(MAX_COLLECT_CAP), AggKind::CountAll],
            max_groups,
            time: TimeBasis::Event { field: "payload.ts".to_owned(), tolerance_ms, idle_ms },
        };
        let mut windows = Windows::new(plan.clone());
        if hold {
            windows.hold_event_closings();
        }
        let mut durable = Durable::new(&mut windows);
        let mut now = 10_000u64;
        let mut next_id = 0i64;
        // (id, key, event time) pushed since the last checkpoint, and their fate.
        let mut pending: Vec<(i64, u8, u64, Pushed)> = Vec::new();
        let mut resend: Vec<(i64, u8, u64)> = Vec::new();
        // id → (key, event time, fate at its last push) of acknowledged events.
        let mut acked: std::collections::BTreeMap<i64, (u8, u64, Pushed)> = Default::default();
        let mut closed_since: Vec<Closed> = Vec::new();
        let mut committed: Vec<Closed> = Vec::new();
        let do_push = |windows: &mut Windows, now: u64, id: i64, key: u8, at: u64, out: &mut Vec<Closed>| {
            let before = windows.watermark();
            let pushed = windows.push_event(at, now, &format!("s{key}"), &[Value::Int(id), Value::Null], out);
            let end = at - at % (size * 500) + size * 500;
            match pushed {
                Pushed::Late => assert!(end <= windows.watermark(), "late only when its window closed"),
                _ => assert!(end > before, "accepted into a window the watermark had not passed"),
            }
            pushed
        };
        for (step, delay) in steps.into_iter().chain([(LAST_CHECKPOINT, 0)]) {
            match step {
                Step::Event { dt, key, .. } => {
                    now += dt;
                    let (id, key, at) = resend.pop().unwrap_or_else(|| {
                        next_id += 1;
                        (next_id, key, now.saturating_sub(delay))
                    });
                    let mut out = Vec::new();
                    let pushed = do_push(&mut windows, now, id, key, at, &mut out);
                    prop_assert!(!hold || out.is_empty(), "nothing a reading closes comes out while held");
                    closed_since.append(&mut out);
                    pending.push((id, key, at, pushed));
                }
                Step::Advance { dt } => {
                    now += dt;
                    closed_since.extend(windows.advance(now));
                }
                Step::Checkpoint { full, fails } => {
                    let mark = windows.due_mark();
                    if durable.checkpoint(&mut windows, full, fails) {
                        prop_assert_eq!(&durable.restore(&plan), &windows);
                        committed.append(&mut closed_since);
                        for closed in windows.release(mark) {
                            if !committed.contains(&closed) {
                                committed.push(closed);
                            }
                        }
                        for (id, key, at, pushed) in pending.drain(..) {
                            acked.insert(id, (key, at, pushed));
                        }
                    }
                }
                Step::Crash => {
                    windows = durable.restore(&plan);
                    if hold {
                        windows.hold_event_closings();
                    }
                    closed_since.clear();
                    resend.extend(pending.drain(..).map(|(id, key, at, _)| (id, key, at)));
                    now += 5_000;
                }
            }
        }
        for (id, key, at) in resend.drain(..) {
            now += 1;
            let pushed = do_push(&mut windows, now, id, key, at, &mut closed_since);
            acked.insert(id, (key, at, pushed));
        }
        closed_since.extend(windows.flush());
        for closed in closed_since {
            if !(hold && committed.contains(&closed)) {
                committed.push(closed);
            }
        }

        let mut windows_seen = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        for closed in &committed {
            // An evicted group's window is split (module doc): only its early part may repeat.
            if !closed.early {
                prop_assert!(windows_seen.insert((closed.key.clone(), closed.start_ms)), "window {:?} emitted twice", (&closed.key, closed.start_ms));
            }
            let Value::Array(ids) = &closed.values[0] else { panic!("collect gives an array") };
            for id in ids {
                let Value::Int(id) = id else { panic!("ids are ints") };
                prop_assert!(seen.insert(*id), "event {} in two windows", id);
                let Some((key, at, pushed)) = acked.get(id) else {
                    return Err(TestCaseError::fail(format!("event {id} counted but never acknowledged")));
                };
                prop_assert_eq!(*pushed, Pushed::Accepted);
                prop_assert_eq!(&closed.key, &format!("s{key}"));
                prop_assert_eq!(closed.start_ms, at - at % (size * 500), "event {} at {} in the wrong window", id, at);
            }
        }
        for (id, (_, _, pushed)) in &acked {
            prop_assert_eq!(seen.contains(id), *pushed == Pushed::Accepted, "event {} ({:?})", id, pushed);
        }
    }
}

#[test]
fn a_count_window_cut_short_by_a_flush_is_numbered_apart_from_one_closed_in_the_same_millisecond() {
    // Three readings in one millisecond: the first window (2 readings) closes, the flush cuts
    // the second short with the same bounds (5, 5); only their numbers tell their ids apart.
    let mut w = count_sum(WindowSpec::Count { size: 2, step: 2 });
    let mut closed = Vec::new();
    for value in [1, 2, 3] {
        closed.extend(push(&mut w, 5, "k", value));
    }
    closed.extend(w.flush());
    assert_eq!(brief(&closed).iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(), vec![(5, 5), (5, 5)]);
    let seqs: Vec<Option<u64>> = closed.iter().map(|c| c.seq).collect();
    assert!(seqs.iter().all(Option::is_some) && seqs[0] != seqs[1], "{closed:?}");
}
