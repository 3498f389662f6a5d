//! What windows cost: 10,000 devices × 1 event/s through a 10 s tumbling average. CPU time
//! per event (this thread's scheduler statistics, best of five, as `benches/cpu.rs`), heap
//! bytes per open group (a counting allocator), checkpoint size (full, and deltas taken
//! every 50 ms with the devices' readings spread over the second), the gateway's shape
//! (readings in a shuffled order, closings held, a delta every 25 ms), and the reduction in
//! events and bytes. Linux only (`/proc/thread-self/schedstat`).
//!
//! Run: `cargo bench -p outpost-rules --bench window`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};

use outpost_rules::window::{AggKind, TimeBasis, WindowPlan, WindowSpec, Windows};
use outpost_rules::{EventContext, Output, RuleSet, TableSources, Value};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// The one way to count heap bytes exactly. SAFETY: forwards to the system allocator
// unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DEVICES: usize = 10_000;
const WINDOW_MS: u64 = 10_000;
/// 10 windows of 10 s.
const SECONDS: u64 = 100;
/// The gateway's group commit: a checkpoint every 50 ms (20 per second).
const CHECKPOINT_MS: u64 = 50;

fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Best of five runs of `run`, in CPU nanoseconds per event.
fn best_of_five(events: u64, mut run: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = cpu_ns();
        run();
        best = best.min((cpu_ns() - start) as f64 / events as f64);
    }
    best
}

const RULES: &str = r#"
[[rule]]
name = "avg"
sql = '''SELECT topic(2) AS device, avg(payload.temp) AS temp, count(*) AS n
         FROM "sensors/+/telemetry" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)'''
[[rule.action]]
type = "forward"
topic = "avg/${device}"
"#;

const PLAIN: &str = r#"
[[rule]]
name = "plain"
sql = '''SELECT topic(2) AS device, payload.temp AS temp FROM "sensors/+/telemetry"'''
[[rule.action]]
type = "forward"
topic = "raw/${device}"
"#;

fn main() {
    let plan = WindowPlan {
        spec: WindowSpec::Tumbling { size_ms: WINDOW_MS },
        aggs: vec![AggKind::Avg],
        max_groups: DEVICES,
        time: TimeBasis::Processing,
    };
    let keys: Vec<String> = (0..DEVICES).map(|i| format!("[\"d-{i:05}\"]")).collect();
    let events = DEVICES as u64 * SECONDS;

    // 1. The window state alone: push (and the closing advances, amortized).
    let mut closed = Vec::new();
    let engine_ns = best_of_five(events, || {
        let mut windows = Windows::new(plan.clone());
        for second in 0..SECONDS {
            let now = 1_700_000_000_000 + second * 1_000;
            for (i, key) in keys.iter().enumerate() {
                windows.push(now, key, &[Value::Float(20.0 + i as f64 * 0.001)], &mut closed);
            }
            black_box(windows.advance(now + 999));
            closed.clear();
        }
    });

    // 1b. The same with event time: each event stamped up to 3 s before it arrives (out of
    // order across devices), a 5 s tolerance; windows close on the watermark inside push.
    let event_plan = WindowPlan {
        time: TimeBasis::Event { field: "payload.ts".to_owned(), tolerance_ms: 5_000, idle_ms: 5_000 },
        ..plan.clone()
    };
    let event_time_ns = best_of_five(events, || {
        let mut windows = Windows::new(event_plan.clone());
        for second in 0..SECONDS {
            let now = 1_700_000_000_000 + second * 1_000;
            for (i, key) in keys.iter().enumerate() {
                let at = now - (i as u64 * 7) % 3_000;
                windows.push_event(at, now, key, &[Value::Float(20.0 + i as f64 * 0.001)], &mut closed);
            }
            black_box(windows.advance(now + 999));
            closed.clear();
        }
    });

    // 1c. The same with a delta taken every 50 ms: the devices' readings spread evenly over
    // each second (500 per period), each period closed by the timer and a checkpoint.
    let periods = 1_000 / CHECKPOINT_MS;
    let per_period = DEVICES / periods as usize;
    let delta_ns = best_of_five(events, || {
        let mut windows = Windows::new(plan.clone());
        for second in 0..SECONDS {
            for period in 0..periods {
                let now = 1_700_000_000_000 + second * 1_000 + period * CHECKPOINT_MS;
                let first = period as usize * per_period;
                for (i, key) in keys.iter().enumerate().skip(first).take(per_period) {
                    windows.push(now, key, &[Value::Float(20.0 + i as f64 * 0.001)], &mut closed);
                }
                black_box(windows.advance(now + CHECKPOINT_MS - 1));
                black_box(windows.take_delta());
                closed.clear();
            }
        }
    });

    // 2. Heap per open group (with every group changed since the last delta, and after a
    // delta), and the checkpoint.
    let mut windows = Windows::new(plan.clone());
    let before = LIVE.load(Ordering::Relaxed);
    for key in &keys {
        windows.push(1_700_000_000_000, key, &[Value::Float(20.5)], &mut closed);
    }
    let per_group_listed = (LIVE.load(Ordering::Relaxed) - before) as f64 / DEVICES as f64;
    black_box(windows.take_delta());
    let per_group = (LIVE.load(Ordering::Relaxed) - before) as f64 / DEVICES as f64;
    let snapshot = windows.snapshot();
    // Wall clock: the scheduler's CPU time is only brought up to date at ticks and switches,
    // too coarse for one call.
    let snapshot_ns = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            black_box(windows.snapshot());
            start.elapsed().as_nanos() as f64
        })
        .fold(f64::MAX, f64::min);

    // 3. The whole rule path, against the same rule without a window (which forwards every
    // event).
    let tables = TableSources::new();
    let rules = RuleSet::compile(RULES, &tables).expect("window rule compiles");
    let plain = RuleSet::compile(PLAIN, &tables).expect("plain rule compiles");
    let topics: Vec<String> = (0..DEVICES).map(|i| format!("sensors/d-{i:05}/telemetry")).collect();
    let payloads: Vec<String> =
        (0..DEVICES).map(|i| format!(r#"{{"temp":{}.25,"unit":"C","seq":{i}}}"#, 20 + i % 10)).collect();
    let event = |i: usize, at: u64| EventContext {
        topic: &topics[i],
        payload: payloads[i].as_bytes(),
        clientid: None,
        username: None,
        qos: 1,
        timestamp_ms: at,
        event_id: 1,
        hops: 0,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    };
    let (mut out_events, mut out_bytes, mut in_bytes) = (0u64, 0u64, 0u64);
    let mut count = |outputs: Vec<Output>| {
        for o in outputs {
            if let Output::Forward { payload, topic, .. } = o {
                out_events += 1;
                out_bytes += (payload.len() + topic.len()) as u64;
            }
        }
    };
    let rule_ns = best_of_five(events, || {
        let mut state = rules.window_state();
        for second in 0..SECONDS {
            let now = 1_700_000_000_000 + second * 1_000;
            for i in 0..DEVICES {
                black_box(rules.evaluate_windowed(&event(i, now), &mut state));
            }
            black_box(rules.advance_windows(&mut state, now + 999));
        }
    });
    let plain_ns = best_of_five(events, || {
        let mut state = plain.window_state();
        for second in 0..SECONDS {
            let now = 1_700_000_000_000 + second * 1_000;
            for i in 0..DEVICES {
                black_box(plain.evaluate_windowed(&event(i, now), &mut state));
            }
        }
    });
    let mut state = rules.window_state();
    for second in 0..SECONDS {
        let now = 1_700_000_000_000 + second * 1_000;
        for i in 0..DEVICES {
            in_bytes += (topics[i].len() + payloads[i].len()) as u64;
            count(rules.evaluate_windowed(&event(i, now), &mut state));
        }
        count(rules.advance_windows(&mut state, now + 999));
    }
    count(rules.advance_windows(&mut state, 1_700_000_000_000 + SECONDS * 1_000));

    // 4. Deltas as the gateway takes them (`WindowState::take_delta`, the rule's name
    // included) every 50 ms, readings spread over each second: after a snapshot taken once
    // every device has a window open, their bytes, encoding time (wall clock, each delta
    // timed) and the whole path's CPU per event with them.
    let mut state = rules.window_state();
    let (mut deltas, mut delta_bytes, mut delta_max, mut encode_ns, mut encode_max) =
        (0u64, 0u64, 0, 0.0, 0.0f64);
    let mut base_len = 0;
    for second in 0..SECONDS {
        for period in 0..periods {
            let now = 1_700_000_000_000 + second * 1_000 + period * CHECKPOINT_MS;
            let first = period as usize * per_period;
            for i in first..first + per_period {
                black_box(rules.evaluate_windowed(&event(i, now), &mut state));
            }
            black_box(rules.advance_windows(&mut state, now + CHECKPOINT_MS - 1));
            if second == 0 {
                if period == periods - 1 {
                    base_len = state.snapshot(&rules).len();
                    state.clear_changes();
                }
                continue;
            }
            let start = std::time::Instant::now();
            let delta = state.take_delta(&rules);
            let ns = start.elapsed().as_nanos() as f64;
            deltas += 1;
            delta_bytes += delta.len() as u64;
            delta_max = delta_max.max(delta.len());
            encode_ns += ns;
            encode_max = encode_max.max(ns);
        }
    }
    // The gateway's full checkpoint of the same state (every device's group open).
    let full = state.snapshot(&rules);
    let full_ns = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            black_box(state.snapshot(&rules));
            start.elapsed().as_nanos() as f64
        })
        .fold(f64::MAX, f64::min);
    let rule_delta_ns = best_of_five(events, || {
        let mut state = rules.window_state();
        for second in 0..SECONDS {
            for period in 0..periods {
                let now = 1_700_000_000_000 + second * 1_000 + period * CHECKPOINT_MS;
                let first = period as usize * per_period;
                for i in first..first + per_period {
                    black_box(rules.evaluate_windowed(&event(i, now), &mut state));
                }
                black_box(rules.advance_windows(&mut state, now + CHECKPOINT_MS - 1));
                black_box(state.take_delta(&rules));
            }
        }
    });

    // 5. The gateway's shape: every device once per second in an order shuffled anew each
    // second (so consecutive readings touch groups far apart in the table, as 10,000
    // sensors do), closings held for the checkpoint, and every 25 ms (the gateway's
    // default group commit) the due marks read, a delta taken and the held closings
    // released. Against the same readings through the rule without a window.
    const GATEWAY_COMMIT_MS: u64 = 25;
    let gw_periods = 1_000 / GATEWAY_COMMIT_MS;
    let gw_per_period = DEVICES / gw_periods as usize;
    let orders: Vec<Vec<usize>> = (0..SECONDS).map(|second| shuffled(DEVICES, second)).collect();
    let gateway_ns = best_of_five(events, || {
        let mut state = rules.window_state();
        state.hold_event_closings();
        for (second, order) in (0..SECONDS).zip(&orders) {
            for (period, devices) in (0..gw_periods).zip(order.chunks(gw_per_period)) {
                let now = 1_700_000_000_000 + second * 1_000 + period * GATEWAY_COMMIT_MS;
                for &i in devices {
                    black_box(rules.evaluate_windowed_marked(&event(i, now), &mut state));
                }
                black_box(rules.advance_windows_marked(&mut state, now + GATEWAY_COMMIT_MS - 1));
                let marks = state.has_due().then(|| state.due_marks());
                black_box(state.take_delta(&rules));
                if let Some(marks) = marks {
                    black_box(rules.release_windows_marked(&mut state, &marks));
                }
            }
        }
    });
    let gateway_plain_ns = best_of_five(events, || {
        let mut state = plain.window_state();
        for (second, order) in (0..SECONDS).zip(&orders) {
            let now = 1_700_000_000_000 + second * 1_000;
            for &i in order {
                black_box(plain.evaluate_windowed(&event(i, now), &mut state));
            }
        }
    });

    println!("{DEVICES} devices x 1 event/s, TUMBLINGWINDOW(ss, 10), avg; {SECONDS} s = {events} events");
    println!("window state (Windows::push + advance): {:.3} µs CPU per event", engine_ns / 1000.0);
    println!(
        "window state with event time (Windows::push_event, 3 s disorder, 5 s tolerance): {:.3} µs CPU per event",
        event_time_ns / 1000.0
    );
    println!(
        "window state with a delta every {CHECKPOINT_MS} ms (Windows::push + advance + take_delta, {per_period} events per period): {:.3} µs CPU per event",
        delta_ns / 1000.0
    );
    println!(
        "heap per open group: {per_group:.0} bytes ({per_group_listed:.0} while every group is listed as changed since the last delta)"
    );
    println!(
        "checkpoint of {DEVICES} open groups: {} bytes ({:.1} per group), {:.2} ms to encode (wall clock)",
        snapshot.len(),
        snapshot.len() as f64 / DEVICES as f64,
        snapshot_ns / 1e6
    );
    println!("windowed rule, whole path: {:.3} µs CPU per event", rule_ns / 1000.0);
    println!(
        "windowed rule, whole path with WindowState::take_delta every {CHECKPOINT_MS} ms: {:.3} µs CPU per event",
        rule_delta_ns / 1000.0
    );
    let per_second = 1_000 / CHECKPOINT_MS;
    println!(
        "deltas every {CHECKPOINT_MS} ms after a {base_len}-byte snapshot: {deltas} deltas, mean {:.0} bytes ({:.1} per reading since the last), largest {delta_max}; {:.2} MB/s; encode mean {:.3} ms, largest {:.3} ms (wall clock); a full snapshot every {CHECKPOINT_MS} ms instead: {:.1} MB/s",
        delta_bytes as f64 / deltas.max(1) as f64,
        delta_bytes as f64 / deltas.max(1) as f64 / per_period as f64,
        delta_bytes as f64 / deltas.max(1) as f64 * per_second as f64 / 1e6,
        encode_ns / deltas.max(1) as f64 / 1e6,
        encode_max / 1e6,
        base_len as f64 * per_second as f64 / 1e6,
    );
    // Each reading changes its device's group once per second, so a delta lists about one
    // group per reading since the last.
    let delta_groups = (deltas * per_period as u64).max(1) as f64;
    println!(
        "encoding per group: in a delta {:.3} µs and {:.1} bytes (mean over {deltas} deltas of {per_period} groups); in a full WindowState snapshot {:.3} µs and {:.1} bytes ({} groups, {:.2} ms, best of five, wall clock)",
        encode_ns / delta_groups / 1000.0,
        delta_bytes as f64 / delta_groups,
        full_ns / DEVICES as f64 / 1000.0,
        full.len() as f64 / DEVICES as f64,
        DEVICES,
        full_ns / 1e6,
    );
    println!(
        "the same rule without a window (forwards every event): {:.3} µs CPU per event",
        plain_ns / 1000.0
    );
    println!(
        "gateway shape (shuffled order each second, closings held, a delta every {GATEWAY_COMMIT_MS} ms): windowed rule {:.3} µs, the rule without a window {:.3} µs, window over it {:+.3} µs CPU per event",
        gateway_ns / 1000.0,
        gateway_plain_ns / 1000.0,
        (gateway_ns - gateway_plain_ns) / 1000.0
    );
    println!(
        "reduction: {events} events in, {out_events} out ({:.1}x); {in_bytes} bytes in, {out_bytes} out ({:.1}x) (topic + payload)",
        events as f64 / out_events.max(1) as f64,
        in_bytes as f64 / out_bytes.max(1) as f64
    );
}

/// `0..n` in an order fixed by `seed` (Fisher–Yates with xorshift64*): the same in every
/// run, so runs compare.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let j = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
