//! Cost per event of the rule engine.
//!
//! - `typical`: one rule with a filter, three projections and a table lookup on a
//!   ~200-byte JSON payload (decode + evaluate + encode the forwarded JSON).
//! - `rules_loaded/N`: the same event with N rules loaded, each on its own topic filter,
//!   plus three that match: the topic index keeps the cost flat as N grows.
//!
//! Run: `cargo bench -p outpost-rules --bench rules -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use outpost_rules::{EventContext, RuleSet, TableSources};

const DEVICES: &str = "device,site,line,max_temp\nd-0001,plant-a,1,80\nd-0002,plant-b,2,72.5\n";

const PAYLOAD: &str = r#"{"device":"d-0001","seq":18342,"temp":84.25,"humidity":41.5,"pressure":1013.2,"battery":3.71,"status":"ok","fw":"2.4.1","tags":["line-1","cell-7"],"location":{"x":12.5,"y":3.25},"ts":1708671600123,"unit":"C"}"#;

fn typical_rule(name: &str, filter: &str) -> String {
    format!(
        r#"
[[rule]]
name = "{name}"
sql = '''SELECT payload.device AS device, payload.temp AS temp, lookup('devices', payload.device, 'site') AS site
         FROM "{filter}" WHERE payload.temp > 30'''
[[rule.action]]
type = "forward"
topic = "sites/${{site}}/alerts/${{device}}"
"#
    )
}

fn rules_file(n_distinct: usize, n_matching: usize) -> String {
    let mut text = String::from("[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n");
    for idx in 0..n_distinct {
        text.push_str(&typical_rule(&format!("other-{idx}"), &format!("plant/{idx}/+/telemetry")));
    }
    for idx in 0..n_matching {
        text.push_str(&typical_rule(&format!("match-{idx}"), "sensors/+/telemetry"));
    }
    text
}

fn event(payload: &[u8]) -> EventContext<'_> {
    EventContext {
        topic: "sensors/d-0001/telemetry",
        payload,
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
    }
}

fn bench(c: &mut Criterion) {
    let tables = TableSources::new().with_text("devices.csv", DEVICES);
    assert!((180..=220).contains(&PAYLOAD.len()), "payload is {} bytes", PAYLOAD.len());

    let one = RuleSet::compile(&rules_file(0, 1), &tables).expect("benchmark rules compile");
    assert_eq!(one.evaluate(&event(PAYLOAD.as_bytes())).len(), 1);
    c.bench_function("typical", |b| b.iter(|| one.evaluate(black_box(&event(PAYLOAD.as_bytes())))));

    let mut group = c.benchmark_group("rules_loaded");
    for n_rules in [1, 100, 1000] {
        let rules = RuleSet::compile(&rules_file(n_rules, 3), &tables).expect("benchmark rules compile");
        assert_eq!(rules.evaluate(&event(PAYLOAD.as_bytes())).len(), 3);
        group.bench_function(format!("{n_rules}+3_matching"), |b| {
            b.iter(|| rules.evaluate(black_box(&event(PAYLOAD.as_bytes()))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
