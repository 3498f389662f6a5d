//! **A window's output the full buffer refuses is not lost.** Under `buffer.overflow =
//! "reject_new"` a full buffer refuses a sensor's event, and the sensor resends it. A window's
//! output has no sensor behind it, and its readings were acknowledged long before it existed
//! (once the checkpoint holding them committed), so refusing it would lose them: it goes to the
//! durable dead-letter file (`dead-letters-upstream.jsonl`, reason `buffer_full`) instead,
//! counted and logged, and the windows go on.
//!
//! The real `outpost` binary without an upstream (everything stays in the buffer file), its
//! buffer capped at three events: three forwarded readings fill it, then the readings of a
//! 1 s tumbling count and sum are acknowledged and their windows close into the full buffer.
//! And the failure mode: a dead-letter file that cannot be written (a directory where the
//! file should be) loses the output, counted and logged once, and the windows go on.

use std::path::Path;
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec, RulesFile, buffered_events, upstream_dead_letters};
use outpost_e2e::http::scrape;
use outpost_e2e::mqtt::publish_qos1;
use outpost_e2e::wait_until;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);
const MAX_EVENTS: u64 = 3;

const RULES: &str = r#"
[[rule]]
name = "fill"
sql = 'SELECT * FROM "f/+"'
[[rule.action]]
type = "forward"
[[rule]]
name = "per_second"
sql = '''
SELECT topic(2) AS sensor, count(*) AS n, sum(payload.v) AS total
FROM "w/+"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 1)
'''
[[rule.action]]
type = "forward"
topic = "n/${sensor}"
"#;

/// The letters of window outputs, as `(topic, n, total)`.
fn window_letters(letters: &[Value]) -> Vec<(String, u64, u64)> {
    letters
        .iter()
        .filter(|l| l["reason"] == "buffer_full")
        .filter_map(|l| {
            // A window's payload is its JSON row, kept as text in the letter.
            let row: Value = serde_json::from_str(l["payload"].as_str()?).ok()?;
            Some((l["topic"].as_str()?.to_owned(), row["n"].as_u64()?, row["total"].as_u64()?))
        })
        .collect()
}

/// A gateway on `data` with the rules above and a buffer of [`MAX_EVENTS`] under
/// `reject_new` (and `extra` config), filled: the window outputs that come next are refused.
async fn full_gateway(rules: &RulesFile, data: &Path, extra: &str) -> GatewayProcess {
    let config = format!(
        "{}[buffer]\nmax_events = {MAX_EVENTS}\noverflow = \"reject_new\"\n{extra}",
        rules.config_line()
    );
    let gateway = GatewaySpec::new(data).config_toml(config).start().await.expect("start the gateway");
    let fill = (1..=MAX_EVENTS).map(|i| format!(r#"{{"i":{i}}}"#).into_bytes());
    publish_qos1(gateway.listen(), "filler", "f/a", fill, TIMEOUT).await.expect("the buffer takes its fill");
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_output_the_full_buffer_refuses_goes_to_the_dead_letter_file() {
    let rules = RulesFile::write(RULES).expect("write rules");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = full_gateway(&rules, data.path(), "").await;
    let listen = gateway.listen();

    // Acknowledged once the checkpoint holding them committed: safe before their window closes.
    let readings = [2, 3, 5].map(|v| format!(r#"{{"v":{v}}}"#).into_bytes());
    publish_qos1(listen, "sensor-a", "w/a", readings, TIMEOUT).await.expect("the window takes the readings");
    wait_until("the first window's letter", TIMEOUT, || {
        upstream_dead_letters(data.path()).is_ok_and(|l| !window_letters(&l).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let warned = gateway.messages("buffer full (overflow = reject_new): window outputs");
    assert_eq!(warned.len(), 1, "logged once, with what to do\n{}", gateway.tail());

    // The windows go on: the next checkpoint did not wait for the refused output for ever.
    publish_qos1(listen, "sensor-a", "w/a", [br#"{"v":7}"#.to_vec()], TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("a reading after the refusal is acknowledged: {e:#}\n{}", gateway.tail()));
    wait_until("the second window's letter", TIMEOUT, || {
        upstream_dead_letters(data.path()).is_ok_and(|l| window_letters(&l).len() >= 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let letters = upstream_dead_letters(data.path()).expect("the dead letters");
    // Each acknowledged reading is in exactly one letter: 2 + 3 + 5 in the first, 7 in the
    // second (the first three may straddle a second's end, so sum over the windows).
    let windows = window_letters(&letters);
    assert!(windows.iter().all(|(topic, _, _)| topic == "n/a"), "{letters:?}");
    let (n, total) = windows.iter().fold((0, 0), |(n, t), (_, wn, wt)| (n + wn, t + wt));
    assert_eq!((n, total), (4, 17), "every acknowledged reading once: {letters:?}");
    assert!(letters.iter().all(|l| l["event_id"].as_u64().is_some_and(|id| id > 0)), "{letters:?}");
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!(count("buffer_full_dead_lettered"), windows.len() as u64, "{counters:?}");
    assert_eq!(count("buffer_full_letters_failed"), 0, "{counters:?}");
    assert_eq!(count("rejected_full"), 0, "no sensor was refused: {counters:?}");
    assert_eq!(buffered_events(data.path()).expect("buffer stats"), MAX_EVENTS, "the fill is still there");
}

/// `outpost_buffer_full_letters_failed_total` as `/metrics` shows it.
async fn letters_failed(http: std::net::SocketAddr) -> anyhow::Result<u64> {
    let (text, _) = scrape(http, None).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("outpost_buffer_full_letters_failed_total ")?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no outpost_buffer_full_letters_failed_total in {text}"))
}

/// The dead-letter file cannot be written either: the output is lost, and says so (a counter,
/// an ERROR saying what to do, once), and the gateway goes on taking readings and closing
/// windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_window_output_whose_letter_fails_is_counted_logged_and_the_windows_go_on() {
    let rules = RulesFile::write(RULES).expect("write rules");
    let data = tempfile::tempdir().expect("tempdir");
    // Appending to a directory fails whatever the user's rights (the tests may run as root).
    std::fs::create_dir(data.path().join("dead-letters-upstream.jsonl")).expect("block the file");
    let http = outpost_e2e::free_addr();
    let mut gateway = full_gateway(&rules, data.path(), &format!("[http]\nlisten = \"{http}\"\n")).await;
    let listen = gateway.listen();
    for (round, v) in [(1, 2), (2, 3)] {
        publish_qos1(listen, "sensor-a", "w/a", [format!(r#"{{"v":{v}}}"#).into_bytes()], TIMEOUT)
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: the reading is acknowledged: {e:#}\n{}", gateway.tail())
            });
        // The window closes within a second of the reading; no event says so outside.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match letters_failed(http).await {
                Ok(n) if n >= round => break,
                Ok(_) if tokio::time::Instant::now() < deadline => {}
                other => panic!("round {round}: the failed letter is counted: {other:?}\n{}", gateway.tail()),
            }
            // The poll interval of a condition with no event, not a synchronisation by sleeping.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let errors = gateway.messages("the full buffer refused a window output");
    assert_eq!(errors.len(), 1, "logged once per episode, with what to do\n{}", gateway.tail());
    assert_eq!(errors[0]["level"], "ERROR", "{}", errors[0]);
    let counters = gateway.final_counters().expect("final counters");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert_eq!(
        (count("buffer_full_letters_failed"), count("buffer_full_dead_lettered")),
        (2, 0),
        "{counters:?}"
    );
    assert_eq!(count("rejected_full"), 0, "no sensor was refused: {counters:?}");
}
