//! Windowed rules end to end through the compiler and engine: SQL in, outputs out, with the
//! clock moved by the script.

use expect_test::{Expect, expect};

use crate::{EventContext, Output, RuleSet, TableSources};

/// Runs `script` against the rules: `<ms> <topic> <payload>` is an event received at `ms`,
/// `advance <ms>` the timer, `flush` a shutdown. Prints each output on a line, prefixed by
/// the step that gave it.
fn run(rules_toml: &str, script: &str) -> String {
    let rules = match RuleSet::compile(rules_toml, &TableSources::new()) {
        Ok(rules) => rules,
        Err(e) => return format!("error: {e}\n"),
    };
    let mut state = rules.window_state();
    let mut text = String::new();
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let outputs = if let Some(now) = line.strip_prefix("advance ") {
            rules.advance_windows(&mut state, now.parse().unwrap())
        } else if line == "flush" {
            rules.flush_windows(&mut state)
        } else {
            let mut parts = line.splitn(3, ' ');
            let (at, topic, payload) =
                (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
            let event = EventContext {
                topic,
                payload: payload.as_bytes(),
                clientid: Some("c1"),
                username: None,
                qos: 1,
                timestamp_ms: at.parse().unwrap(),
                event_id: 1,
                hops: 0,
                peerhost: None,
                retain: false,
                dup: false,
                pub_props: None,
                lifecycle: None,
            };
            rules.evaluate_windowed(&event, &mut state)
        };
        for output in outputs {
            let shown = match output {
                Output::Forward { topic, payload, .. } => {
                    format!("{topic} {}", String::from_utf8_lossy(&payload))
                }
                Output::DeadLetter { topic, reason, .. } => format!("dead letter {topic}: {reason}"),
                other => format!("{other:?}"),
            };
            text.push_str(&format!("{}: {shown}\n", line.split(' ').next().unwrap()));
        }
    }
    text
}

fn rule(sql: &str) -> String {
    format!(
        "[[rule]]\nname = \"w\"\nsql = '''{sql}'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"agg/${{sensor}}\"\n"
    )
}

#[track_caller]
fn check(sql: &str, script: &str, expect: Expect) {
    expect.assert_eq(&run(&rule(sql), script));
}

#[test]
fn tumbling_average_per_sensor() {
    check(
        "SELECT topic(2) AS sensor, avg(payload.t) AS t, count(*) AS n, window_start() AS ws, window_end() AS we
         FROM \"s/+/t\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)",
        r#"
        1000 s/a/t {"t": 20}
        2000 s/b/t {"t": 5}
        9999 s/a/t {"t": 21}
        advance 9999
        advance 10000
        10001 s/a/t {"t": 1}
        advance 30000
        "#,
        expect![[r#"
            advance: agg/a {"sensor":"a","t":20.5,"n":2,"ws":0,"we":10000}
            advance: agg/b {"sensor":"b","t":5.0,"n":1,"ws":0,"we":10000}
            advance: agg/a {"sensor":"a","t":1.0,"n":1,"ws":10000,"we":20000}
        "#]],
    );
}

#[test]
fn filter_having_and_expressions_of_aggregates() {
    check(
        "SELECT topic(2) AS sensor, max(payload.t) - min(payload.t) AS spread, collect(payload.t, 2) AS first_two
         FROM \"s/+/t\" WHERE payload.t > 0
         GROUP BY topic(2), TUMBLINGWINDOW(ms, 100) FILTER (WHERE payload.ok = true)
         HAVING count(*) >= 2",
        r#"
        1 s/a/t {"t": 3, "ok": true}
        2 s/a/t {"t": 9, "ok": false}
        3 s/a/t {"t": -1, "ok": true}
        4 s/a/t {"t": 7, "ok": true}
        5 s/a/t {"t": 8, "ok": true}
        6 s/b/t {"t": 1, "ok": true}
        advance 100
        "#,
        expect![[r#"
            advance: agg/a {"sensor":"a","spread":5,"first_two":[3,7]}
        "#]],
    );
}

#[test]
fn count_and_sliding_windows_emit_on_events() {
    check(
        "SELECT 'all' AS sensor, sum(payload.v) AS s FROM \"x\" GROUP BY COUNTWINDOW(2)",
        "1 x {\"v\":1}\n2 x {\"v\":2}\n3 x {\"v\":3}\n4 x {\"v\":4}",
        expect![[r#"
            2: agg/all {"sensor":"all","s":3}
            4: agg/all {"sensor":"all","s":7}
        "#]],
    );
    check(
        "SELECT 'all' AS sensor, count(*) AS n FROM \"x\" GROUP BY SLIDINGWINDOW(ms, 10)",
        "1 x {}\n5 x {}\n11 x {}",
        expect![[r#"
            1: agg/all {"sensor":"all","n":1}
            5: agg/all {"sensor":"all","n":2}
            11: agg/all {"sensor":"all","n":2}
        "#]],
    );
}

#[test]
fn stateless_rules_run_beside_windowed_ones() {
    let rules = format!(
        "{}[[rule]]\nname = \"plain\"\nsql = 'SELECT payload.v AS v FROM \"x\"'\n[[rule.action]]\ntype = \"forward\"\n",
        rule("SELECT 'x' AS sensor, count(*) AS n FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 1)")
    );
    expect![[r#"
        5: x {"v":1}
        advance: agg/x {"sensor":"x","n":1}
    "#]]
    .assert_eq(&run(&rules, "5 x {\"v\":1}\nadvance 1000"));
    // Without state, a windowed rule is not run.
    let set = RuleSet::compile(&rules, &TableSources::new()).unwrap();
    assert_eq!(set.windowed_rules().collect::<Vec<_>>(), ["w"]);
}

#[test]
fn an_event_the_window_cannot_read_is_a_dead_letter() {
    let toml = rule("SELECT topic(2) AS sensor, avg(payload.t) AS t FROM \"s/+/t\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 1)")
        .replace("[[rule.action]]", "payload = \"json\"\n[[rule.action]]");
    expect![[r#"
        1: dead letter s/a/t: payload is not valid JSON: key must be a string at line 1 column 2
        advance: agg/a {"sensor":"a","t":1.0}
    "#]]
    .assert_eq(&run(&toml, "1 s/a/t {not json\n2 s/a/t {\"t\": 1}\nadvance 1000"));
}

#[test]
fn state_survives_a_snapshot_and_a_reload_of_the_same_rule() {
    let toml = rule(
        "SELECT topic(2) AS sensor, sum(payload.v) AS s FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)",
    );
    let rules = RuleSet::compile(&toml, &TableSources::new()).unwrap();
    let mut state = rules.window_state();
    let event = |at, payload: &'static str| EventContext {
        topic: "s/a",
        payload: payload.as_bytes(),
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
    rules.evaluate_windowed(&event(1, r#"{"v":2}"#), &mut state);
    let bytes = state.snapshot(&rules);
    // A reload: the same rule compiled again, plus a changed one that starts empty.
    let reloaded = RuleSet::compile(&toml, &TableSources::new()).unwrap();
    let (mut restored, dropped) = crate::window::WindowState::restore(&reloaded, &bytes).unwrap();
    assert!(dropped.is_empty());
    reloaded.evaluate_windowed(&event(2, r#"{"v":3}"#), &mut restored);
    let out = reloaded.advance_windows(&mut restored, 10_000);
    assert_eq!(out.len(), 1);
    let Output::Forward { payload, .. } = &out[0] else { panic!("{out:?}") };
    assert_eq!(String::from_utf8_lossy(payload), r#"{"sensor":"a","s":5}"#);

    let changed = rule(
        "SELECT topic(2) AS sensor, avg(payload.v) AS s FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)",
    );
    let changed = RuleSet::compile(&changed, &TableSources::new()).unwrap();
    let (_, dropped) = crate::window::WindowState::restore(&changed, &bytes).unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].0, "w");
}

#[test]
fn windowed_sql_errors_say_what_to_write() {
    let errors = [
        "SELECT count(*) AS n FROM \"x\" GROUP BY topic",
        "SELECT count(*) AS n FROM \"x\" GROUP BY TUMBLINGWINDOW(sec, 10)",
        "SELECT payload.t AS t FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT * FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT avg(payload.t) AS t FROM \"x\" WHERE avg(payload.t) > 1 GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT percentile(payload.t, 95) AS p FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT avgg(payload.t) AS t FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT count(*) AS n FROM \"x\" HAVING count(*) > 1",
        "SELECT sum(avg(payload.t)) AS n FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10)",
        "SELECT count(*) AS n FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 10), COUNTWINDOW(5)",
    ];
    let mut text = String::new();
    for sql in errors {
        text.push_str(&run(&rule(sql), ""));
    }
    expect![[r#"
        error: line 3, column 49: rule `w`: GROUP BY needs a window function alongside the group keys, e.g. `GROUP BY topic, TUMBLINGWINDOW(ss, 10)`; one of TUMBLINGWINDOW, HOPPINGWINDOW, SLIDINGWINDOW, SESSIONWINDOW, COUNTWINDOW
          |
        3 | SELECT count(*) AS n FROM "x" GROUP BY topic
          |                                        ^^^^^
        error: line 3, column 49: rule `w`: TUMBLINGWINDOW: `sec` is not a time unit; use ms, ss, mi, hh or dd (TUMBLINGWINDOW(unit, size), e.g. TUMBLINGWINDOW(ss, 10))
          |
        3 | SELECT count(*) AS n FROM "x" GROUP BY TUMBLINGWINDOW(sec, 10)
          |                                        ^^^^^^^^^^^^^^^^^^^^^^
        error: line 3, column 17: rule `w`: `payload.t` reads one event, but a window holds many: put it in GROUP BY or inside an aggregate (e.g. last(payload.t))
          |
        3 | SELECT payload.t AS t FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10)
          |        ^^^^^^^
        error: line 3, column 17: rule `w`: SELECT * has no meaning for a window (many events): select aggregates and group keys
          |
        3 | SELECT * FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10)
          |        ^
        error: line 3, column 52: rule `w`: WHERE runs on each event before the window: put conditions on aggregates in HAVING
          |
        3 | SELECT avg(payload.t) AS t FROM "x" WHERE avg(payload.t) > 1 GROUP BY TUMBLINGWINDOW(ss, 10)
          |                                           ^^^^^^^^^^^^^^^^^^
        error: line 3, column 39: rule `w`: percentile(expr, p): p must be a number from 0 to 1, e.g. 0.95, not `95`
          |
        3 | SELECT percentile(payload.t, 95) AS p FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10)
          |                              ^^
        error: line 3, column 17: rule `w`: unknown function or aggregate `avgg`; did you mean `avg`?
          |
        3 | SELECT avgg(payload.t) AS t FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10)
          |        ^^^^^^^^^^^^^^
        error: line 3, column 47: rule `w`: HAVING needs a window: add GROUP BY TUMBLINGWINDOW(ss, 10) or another window
          |
        3 | SELECT count(*) AS n FROM "x" HAVING count(*) > 1
          |                                      ^^^^^^^^^^^^
        error: line 3, column 21: rule `w`: an aggregate cannot hold another aggregate
          |
        3 | SELECT sum(avg(payload.t)) AS n FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10)
          |            ^^^^^^^^^^^^^
        error: line 3, column 73: rule `w`: GROUP BY takes one window function
          |
        3 | SELECT count(*) AS n FROM "x" GROUP BY TUMBLINGWINDOW(ss, 10), COUNTWINDOW(5)
          |                                                                ^^^^^^^^^^^^^
    "#]].assert_eq(&text);
}

#[test]
fn windowed_rule_config_errors() {
    let no_topic = "[[rule]]\nname = \"w\"\nsql = 'SELECT count(*) AS n FROM \"x\" GROUP BY TUMBLINGWINDOW(ss, 1)'\npayload = \"raw\"\n[[rule.action]]\ntype = \"forward\"\n";
    let groups = "[[rule]]\nname = \"p\"\nsql = 'SELECT 1 AS n FROM \"x\"'\nmax_groups = 5\n";
    expect![[r#"
        error: rule `w`: a windowed rule cannot use `payload = "raw"`: use auto, json or cbor
        rule `w`: a windowed rule's forward action needs a `topic` (a window has no one event topic), e.g. topic = "agg/${sensor}"
        error: rule `p`: no actions; add `[[rule.action]]` with `type = "forward"`, "republish", "drop" or "dead_letter"
        rule `p`: `max_groups` applies to rules with a window or a stateful function (deadband, lag, ...) only
    "#]].assert_eq(&(run(no_topic, "") + &run(groups, "")));
}

#[test]
fn the_readme_example() {
    let toml = r#"
[[rule]]
name = "avg-10s"
sql = '''
SELECT topic(2) AS sensor,
       avg(payload.temp) AS temp, min(payload.temp) AS low, max(payload.temp) AS high,
       count(*) AS n, window_start() AS since, window_end() AS until
FROM "sensors/+/temp"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)
'''
[[rule.action]]
type = "forward"
topic = "sites/a/avg/${sensor}"
"#;
    expect![[r#"
        1764763210000: sites/a/avg/s1 {"sensor":"s1","temp":20.5,"low":20,"high":21,"n":2,"since":1764763200000,"until":1764763210000}
    "#]].assert_eq(&run(
        toml,
        r#"
        1764763201000 sensors/s1/temp {"temp": 20}
        1764763209999 sensors/s1/temp {"temp": 21}
        1764763210000 sensors/s1/temp {"temp": 30}
        advance 1764763210000
        "#,
    ));
}

// The model test of `window::tests`, through a compiled rule: outputs parsed back from their
// JSON, state through a log of `WindowState::snapshot` then `take_delta`s (compacted now and
// then) read back by `restore_log`, and the expected windows computed directly from the
// acknowledged events.
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use crate::window::WindowState;
    use crate::{EventContext, Output, RuleSet, TableSources, Value};

    #[derive(Debug, Clone)]
    enum Step {
        Event {
            dt: u64,
            sensor: u8,
            value: i8,
        },
        Advance {
            dt: u64,
        },
        /// A delta, or (`full`) a compaction into a new snapshot.
        Checkpoint {
            full: bool,
        },
        Crash,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..300u64, 0..4u8, any::<i8>()).prop_map(|(dt, sensor, value)| Step::Event { dt, sensor, value }),
            2 => (0..1_500u64).prop_map(|dt| Step::Advance { dt }),
            2 => prop::bool::weighted(0.2).prop_map(|full| Step::Checkpoint { full }),
            1 => Just(Step::Crash),
        ]
    }

    const RULE: &str = "[[rule]]\nname = \"w\"\nsql = '''SELECT topic(2) AS s, count(*) AS n, sum(payload.v) AS total, window_start() AS ws FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ms, 1000)'''\n[[rule.action]]\ntype = \"forward\"\ntopic = \"agg/${s}\"\n";

    /// (sensor, window start) → (count, sum) of the forwarded windows.
    fn add(outputs: Vec<Output>, to: &mut Vec<(String, i64, i64, i64)>) {
        for output in outputs {
            let Output::Forward { payload, .. } = output else { panic!("{output:?}") };
            let row = Value::from_json(&payload).unwrap();
            let int = |k: &str| match row.get(k) {
                Some(Value::Int(i)) => *i,
                other => panic!("{k}: {other:?} in {row}"),
            };
            let Some(Value::Str(s)) = row.get("s") else { panic!("{row}") };
            to.push((s.clone(), int("ws"), int("n"), int("total")));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn every_acknowledged_reading_is_in_exactly_one_forwarded_average(steps in prop::collection::vec(step(), 1..100)) {
            let rules = RuleSet::compile(RULE, &TableSources::new()).unwrap();
            let mut state = rules.window_state();
            let mut base = state.snapshot(&rules);
            state.clear_changes();
            let mut deltas: Vec<Vec<u8>> = Vec::new();
            let mut now = 1_000u64;
            let mut pending: Vec<(u8, i8, u64)> = Vec::new();
            let mut resend: Vec<(u8, i8)> = Vec::new();
            let mut acked: Vec<(u8, i8, u64)> = Vec::new();
            let mut since: Vec<(String, i64, i64, i64)> = Vec::new();
            let mut committed: Vec<(String, i64, i64, i64)> = Vec::new();
            let push = |state: &mut WindowState, at: u64, sensor: u8, value: i8| {
                let topic = format!("s/{sensor}");
                let payload = format!("{{\"v\":{value}}}");
                let event = EventContext { topic: &topic, payload: payload.as_bytes(), clientid: None, username: None, qos: 1, timestamp_ms: at, event_id: 1, hops: 0 , peerhost: None, retain: false, dup: false, pub_props: None, lifecycle: None};
                rules.evaluate_windowed(&event, state)
            };
            for step in steps.into_iter().chain([Step::Checkpoint { full: false }]) {
                match step {
                    Step::Event { dt, sensor, value } => {
                        now += dt;
                        let (sensor, value) = resend.pop().unwrap_or((sensor, value));
                        add(push(&mut state, now, sensor, value), &mut since);
                        pending.push((sensor, value, now));
                    }
                    Step::Advance { dt } => {
                        now += dt;
                        add(rules.advance_windows(&mut state, now), &mut since);
                    }
                    Step::Checkpoint { full: true } => {
                        base = state.snapshot(&rules);
                        state.clear_changes();
                        deltas.clear();
                        committed.append(&mut since);
                        acked.append(&mut pending);
                    }
                    Step::Checkpoint { full: false } => {
                        deltas.push(state.take_delta(&rules));
                        committed.append(&mut since);
                        acked.append(&mut pending);
                    }
                    Step::Crash => {
                        state = WindowState::restore_log(&rules, &base, deltas.iter().map(Vec::as_slice)).unwrap().0;
                        since.clear();
                        resend.extend(pending.drain(..).map(|(s, v, _)| (s, v)));
                        now += 5_000;
                    }
                }
            }
            for (sensor, value) in resend.drain(..) {
                now += 1;
                add(push(&mut state, now, sensor, value), &mut since);
                acked.push((sensor, value, now));
            }
            add(rules.flush_windows(&mut state), &mut since);
            committed.append(&mut since);

            let mut want: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
            for (sensor, value, at) in acked {
                let e = want.entry((sensor.to_string(), (at - at % 1000) as i64)).or_default();
                e.0 += 1;
                e.1 += i64::from(value);
            }
            let mut got: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
            for (sensor, start, n, total) in committed {
                prop_assert!(got.insert((sensor, start), (n, total)).is_none(), "one output per sensor and window");
            }
            prop_assert_eq!(got, want);
        }
    }
}

/// Each output of a closed window names its window, and the same window gives the same
/// origin (and fingerprint) after a snapshot and restore: what a stable upstream id needs.
#[test]
fn outputs_name_their_window_the_same_across_a_restore() {
    let toml = format!(
        "{}[[rule.action]]\ntype = \"forward\"\ntopic = \"copy/${{sensor}}\"\n[[rule]]\nname = \"plain\"\nsql = 'SELECT 1 AS one FROM \"s/+\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"plain\"\n",
        rule(
            "SELECT topic(2) AS sensor, sum(payload.v) AS s FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)"
        )
    );
    let rules = RuleSet::compile(&toml, &TableSources::new()).unwrap();
    let mut state = rules.window_state();
    assert_eq!(state.next_close(), None, "nothing open, no timer");
    let event = |payload: &'static str| EventContext {
        timestamp_ms: 12_345,
        ..EventContext::new("s/a", payload.as_bytes())
    };
    let plain = rules.evaluate_windowed_marked(&event(r#"{"v":2}"#), &mut state);
    assert!(matches!(plain.as_slice(), [(Output::Forward { .. }, None)]), "{plain:?}");
    assert_eq!(state.next_close(), Some(20_000));
    assert!(rules.advance_windows_marked(&mut state, 19_999).is_empty());
    let bytes = state.snapshot(&rules);

    let closed = rules.advance_windows_marked(&mut state, 20_000);
    let origins: Vec<_> = closed.iter().map(|(_, o)| o.clone().unwrap()).collect();
    assert_eq!(origins.len(), 2, "{closed:?}");
    assert_eq!(
        (
            &*origins[0].rule,
            origins[0].key.as_str(),
            origins[0].start_ms,
            origins[0].end_ms,
            origins[0].index
        ),
        ("w", r#"["a"]"#, 10_000, 20_000, 0)
    );
    assert_eq!(origins[1].index, 1);
    assert_ne!(origins[0].fingerprint(), origins[1].fingerprint());
    assert_eq!(state.next_close(), None);

    let (mut restored, _) = crate::window::WindowState::restore(&rules, &bytes).unwrap();
    let again = rules.advance_windows_marked(&mut restored, 25_000);
    assert_eq!(again, closed, "the same window, the same outputs and origins");
    let flushed = rules.flush_rule_windows_marked(&mut restored, "w");
    assert!(flushed.is_empty());
    // A fixed value: the fingerprint must not change between builds.
    let fixed = crate::window::WindowOrigin {
        rule: "r".into(),
        key: "[]".into(),
        start_ms: 0,
        end_ms: 1,
        index: 0,
        seq: None,
    };
    expect!["2940f920486b04c5"].assert_eq(&format!("{:016x}", fixed.fingerprint()));
}

/// Two count windows of one group closed in the same millisecond have the same bounds; their
/// outputs still get different ids, with or without hold mode, and a held one keeps its id
/// across a snapshot and restore.
#[test]
fn count_windows_with_equal_bounds_have_their_own_ids() {
    let toml =
        rule("SELECT topic(2) AS sensor, sum(payload.v) AS s FROM \"s/+\" GROUP BY topic(2), COUNTWINDOW(2)");
    let rules = RuleSet::compile(&toml, &TableSources::new()).unwrap();
    const READINGS: [&str; 4] = [r#"{"v":1}"#, r#"{"v":2}"#, r#"{"v":3}"#, r#"{"v":4}"#];
    let event = |payload: &'static str| EventContext {
        timestamp_ms: 12_345,
        ..EventContext::new("s/a", payload.as_bytes())
    };
    let ids = |marked: &[crate::window::Marked]| -> Vec<u64> {
        marked.iter().map(|(_, o)| o.as_ref().expect("a window's output").fingerprint()).collect()
    };
    let mut state = rules.window_state();
    let mut closed = Vec::new();
    for payload in READINGS {
        closed.extend(rules.evaluate_windowed_marked(&event(payload), &mut state));
    }
    let plain = ids(&closed);
    assert_eq!(plain.len(), 2, "{closed:?}");
    assert_ne!(plain[0], plain[1], "two windows, two ids: {closed:?}");

    let mut held = rules.window_state();
    held.hold_event_closings();
    for payload in READINGS {
        let out = rules.evaluate_windowed_marked(&event(payload), &mut held);
        assert!(out.is_empty(), "held: {out:?}");
    }
    let marks = held.due_marks();
    let bytes = held.snapshot(&rules);
    let released = rules.release_windows_marked(&mut held, &marks);
    let first = ids(&released);
    assert_eq!(first.len(), 2, "{released:?}");
    assert_ne!(first[0], first[1], "held: two windows, two ids: {released:?}");
    let (mut restored, _) = crate::window::WindowState::restore(&rules, &bytes).unwrap();
    let again = rules.release_windows_marked(&mut restored, &marks);
    assert_eq!(again, released, "the same closings, the same origins after a restore");
    // Flushed instead of released (a reload of the rule, a stop): the same ids too.
    let (mut restored, _) = crate::window::WindowState::restore(&rules, &bytes).unwrap();
    let flushed = rules.flush_rule_windows_marked(&mut restored, "w");
    assert_eq!(flushed, released, "flushed held closings keep their ids");
}

fn event_time_rule(sql: &str, options: &str) -> String {
    format!(
        "[[rule]]\nname = \"w\"\nsql = '''{sql}'''\n{options}\n[[rule.action]]\ntype = \"forward\"\ntopic = \"agg/${{sensor}}\"\n"
    )
}

const EVENT_TIME_SQL: &str =
    "SELECT topic(2) AS sensor, count(*) AS n, sum(payload.v) AS v, window_start() AS ws
     FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)";

#[test]
fn event_time_from_the_payload_with_late_events_to_the_dead_letters() {
    let rules = event_time_rule(
        EVENT_TIME_SQL,
        "event_time = \"payload.ts\"\nlate_tolerance = \"5s\"\nlate = \"deadletter\"",
    );
    let script = r#"
        11000 s/a {"ts": 11000, "v": 1}
        11200 s/a {"ts": 8000, "v": 10}
        11300 s/a {"ts": "1970-01-01T00:00:09.500Z", "v": 100}
        15100 s/b {"ts": 15000, "v": 5}
        15200 s/a {"ts": 9000, "v": 1000}
        15300 s/a {"v": 1}
        15400 s/a {"ts": "yesterday", "v": 1}
        advance 21000
        advance 32000
    "#;
    expect![[r#"
        15100: agg/a {"sensor":"a","n":2,"v":110,"ws":0}
        15200: dead letter s/a: late event: event time 9000 ms is at or before the watermark 10000 ms, in windows already closed; raise the rule's late_tolerance to take events this late
        15300: dead letter s/a: event time: null is not a time: the field must hold Unix milliseconds or RFC 3339 text
        15400: dead letter s/a: event time: "yesterday" is not a time: the field must hold Unix milliseconds or RFC 3339 text
        advance: agg/a {"sensor":"a","n":1,"v":1,"ws":10000}
        advance: agg/b {"sensor":"b","n":1,"v":5,"ws":10000}
    "#]]
    .assert_eq(&run(&rules, script));
    // The same events with the default policy: the late one is only counted.
    let dropped = event_time_rule(EVENT_TIME_SQL, "event_time = \"payload.ts\"\nlate_tolerance = \"5s\"");
    assert!(!run(&dropped, script).contains("late event"));
}

#[test]
fn event_time_option_errors_name_the_rule_key_value_and_fix() {
    let bad = event_time_rule(
        EVENT_TIME_SQL,
        "event_time = \"ts\"\nlate_tolerance = \"5 seconds\"\nidle_timeout = \"0s\"",
    );
    let wide = event_time_rule(EVENT_TIME_SQL, "event_time = \"payload.ts\"\nlate_tolerance = \"1h\"");
    let session = event_time_rule(
        "SELECT topic(2) AS sensor, count(*) AS n FROM \"s/+\" GROUP BY topic(2), SESSIONWINDOW(mi, 2, 1)",
        "event_time = \"payload.ts\"",
    );
    let without = event_time_rule(EVENT_TIME_SQL, "late = \"deadletter\"");
    let plain = "[[rule]]\nname = \"p\"\nsql = 'SELECT 1 AS n FROM \"x\"'\nevent_time = \"payload.ts\"\n[[rule.action]]\ntype = \"drop\"\n";
    let bad_policy = event_time_rule(EVENT_TIME_SQL, "event_time = \"payload.ts\"\nlate = \"keep\"");
    expect![[r#"
        error: rule `w`: `event_time = "ts"` is not a payload field path: write it like "payload.ts" or "payload.meta.time" (keys joined by dots, no indexes)
        rule `w`: `late_tolerance = "5 seconds"` is not a duration: write a whole number with a unit, like "5s", "2m", "1h" or "500ms"
        rule `w`: `idle_timeout = "0s"` would run the event clock on the gateway's clock between any two events: give it at least "1s" or leave it out
        error: rule `w`: `late_tolerance = "1h"` would keep 361 windows open per group, at most 64: shorten late_tolerance or widen the window
        error: rule `w`: `event_time` works with TUMBLINGWINDOW and HOPPINGWINDOW only (sliding, session and count windows run on processing time): remove `event_time` or use one of those windows
        error: rule `w`: `late` applies to event time only: add `event_time = "payload.ts"` (the payload field holding each event's time) or remove `late`
        error: rule `p`: `event_time`, `late_tolerance`, `idle_timeout` and `late` apply to rules with a time window only: add GROUP BY TUMBLINGWINDOW(ss, 10) or remove them
    "#]]
    .assert_eq(&[bad, wide, session, without, plain.to_owned()].map(|r| run(&r, "")).concat());
    let policy = run(&bad_policy, "");
    assert!(policy.contains("unknown variant `keep`, expected `drop` or `deadletter`"), "{policy}");
}

#[test]
fn the_stateful_rules_reading_a_topic_are_named_in_rule_order() {
    let rules = RuleSet::compile(
        r#"
[[rule]]
name = "plain"
sql = "SELECT * FROM \"sensors/#\""
[[rule.action]]
type = "forward"
topic = "x"

[[rule]]
name = "avg"
sql = "SELECT avg(payload.t) AS t FROM \"sensors/+/temp\" GROUP BY TUMBLINGWINDOW(ss, 10)"
[[rule.action]]
type = "forward"
topic = "y"

[[rule]]
name = "changes"
sql = "SELECT payload.t AS t FROM \"sensors/#\" WHERE deadband(payload.t, 1)"
[[rule.action]]
type = "forward"
topic = "z"
"#,
        &TableSources::new(),
    )
    .expect("compiles");
    assert_eq!(rules.stateful_rules_for("sensors/a/temp"), ["avg", "changes"]);
    assert_eq!(rules.stateful_rules_for("sensors/a/humidity"), ["changes"]);
    assert!(rules.stateful_rules_for("other").is_empty());
}
