//! CPU time per event of the `typical` rule (the same rule and payload as `benches/rules.rs`),
//! read from this thread's scheduler statistics, so other work on a shared machine disturbs
//! it far less than the wall-clock figures of criterion: best of five loops of 300,000
//! events each. Linux only (it reads `/proc/thread-self/schedstat`).
//!
//! Run: `cargo bench -p outpost-rules --bench cpu`

use std::hint::black_box;

use outpost_rules::{EventContext, RuleSet, TableSources};

const DEVICES: &str = "device,site,line,max_temp\nd-0001,plant-a,1,80\nd-0002,plant-b,2,72.5\n";

const PAYLOAD: &str = r#"{"device":"d-0001","seq":18342,"temp":84.25,"humidity":41.5,"pressure":1013.2,"battery":3.71,"status":"ok","fw":"2.4.1","tags":["line-1","cell-7"],"location":{"x":12.5,"y":3.25},"ts":1708671600123,"unit":"C"}"#;

const RULES: &str = r#"
[[table]]
name = "devices"
file = "devices.csv"
[[rule]]
name = "match-0"
sql = '''SELECT payload.device AS device, payload.temp AS temp, lookup('devices', payload.device, 'site') AS site
         FROM "sensors/+/telemetry" WHERE payload.temp > 30'''
[[rule.action]]
type = "forward"
topic = "sites/${site}/alerts/${device}"
"#;

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let tables = TableSources::new().with_text("devices.csv", DEVICES);
    let rules = RuleSet::compile(RULES, &tables).expect("benchmark rules compile");
    let event = EventContext {
        topic: "sensors/d-0001/telemetry",
        payload: PAYLOAD.as_bytes(),
        clientid: Some("d-0001"),
        username: None,
        qos: 1,
        timestamp_ms: 1_708_671_600_123,
        event_id: 7,
        hops: 0,
        peerhost: None,
        retain: false,
        dup: false,
        pub_props: None,
        lifecycle: None,
    };
    assert_eq!(rules.evaluate(&event).len(), 1);
    const EVENTS: u32 = 300_000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = cpu_ns();
        for _ in 0..EVENTS {
            black_box(rules.evaluate(black_box(&event)));
        }
        best = best.min((cpu_ns() - start) as f64 / f64::from(EVENTS));
    }
    println!("typical: {:.3} µs CPU time per event (best of 5 x {EVENTS})", best / 1000.0);
}
