//! Logs a person can read after a week offline: an upstream outage is logged when it starts,
//! reminded at a slow cadence with the attempts and the backlog, and logged when it ends —
//! not once per reconnect attempt.
//!
//! The hour runs at 1,200× speed: the reminder cadence (10 minutes in production) is set to
//! 500 ms through the hidden `OUTPOST_LOG_REMINDER_MS`, and the reconnect backoff to 5–20 ms,
//! so the gateway makes hundreds of attempts while six reminders fall due. The log must grow
//! with the state changes and the reminders, not with the attempts.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1, unique_client_id};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use serde_json::Value;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Stands for the production cadence of 10 minutes.
const REMINDER: Duration = Duration::from_millis(500);
/// Six reminders: an hour of outage at this speed.
const REMINDERS_IN_AN_HOUR: usize = 6;
const EVENTS: usize = 100;

fn message(log: &Value) -> &str {
    log["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_long_outage_logs_its_state_changes_and_reminders_not_its_attempts() {
    if !require_mosquitto() {
        return;
    }
    let mut upstream = Mosquitto::not_started().expect("prepare mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[upstream]\nurl = \"{}\"\nreconnect_min = \"5ms\"\nreconnect_max = \"20ms\"\n",
        upstream.url()
    );
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(config)
        .env("OUTPOST_LOG_REMINDER_MS", REMINDER.as_millis().to_string())
        .start()
        .await
        .expect("start the gateway");
    let down = gateway
        .wait_for_message("cannot connect upstream", TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let outage_started = Instant::now();
    assert_eq!(down["level"], "WARN", "{down}");
    assert!(down["error"].as_str().is_some_and(|e| e.contains("connection refused")), "the reason: {down}");

    let payloads = (0..EVENTS).map(|i| format!("reading {i}").into_bytes());
    publish_qos1(gateway.listen(), &unique_client_id("cadence"), "sensors/cadence/t", payloads, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let mut reminders = 0;
    let last_reminder = gateway
        .wait_for_log("six reminders", TIMEOUT, |log| {
            reminders += usize::from(message(log).starts_with("upstream still unreachable"));
            reminders == REMINDERS_IN_AN_HOUR
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(last_reminder["level"], "WARN", "{last_reminder}");
    assert_eq!(last_reminder["backlog_events"], EVENTS, "the backlog: {last_reminder}");
    assert_eq!(last_reminder["buffered_while_down"], EVENTS, "{last_reminder}");
    assert!(
        last_reminder["last_error"].as_str().is_some_and(|e| e.contains("connection refused")),
        "{last_reminder}"
    );
    let attempts = last_reminder["failed_attempts"].as_u64().expect("failed_attempts");
    assert!(attempts >= 60, "the backoff made many attempts: {last_reminder}");

    // The upstream returns; the gateway says so once the connection has lasted.
    upstream.start_again().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe upstream");
    let back = gateway
        .wait_for_log("the upstream back", TIMEOUT, |log| {
            message(log) == "connected upstream" && log.get("down_for").is_some()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let outage = outage_started.elapsed();
    assert_eq!(back["level"], "INFO", "{back}");
    assert_eq!(back["buffered_while_down"], EVENTS, "how much was buffered: {back}");
    assert!(back["failed_attempts"].as_u64().is_some_and(|n| n >= attempts), "{back}");
    subscriber
        .wait_for_count(EVENTS as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    let failures = counters.get("upstream_failures").copied().unwrap_or(0);

    // Every line from the outage's start to its end: the start, the reminders, the end.
    let logs = gateway.logs();
    let first =
        logs.iter().position(|l| message(l).starts_with("cannot connect upstream")).expect("start line");
    let last = logs
        .iter()
        .position(|l| message(l) == "connected upstream" && l.get("down_for").is_some())
        .expect("end line");
    let outage_lines: Vec<&str> = logs[first..=last].iter().map(message).collect();
    let reminder_lines = outage_lines.iter().filter(|m| m.starts_with("upstream still unreachable")).count();
    println!(
        "outage of {outage:?} at {}x speed: {failures} failed attempts, {} log lines ({reminder_lines} reminders)",
        Duration::from_secs(600).as_millis() / REMINDER.as_millis(),
        outage_lines.len()
    );
    // A reminder per cadence at most (they fall due at attempts), nothing per attempt.
    let due = (outage.as_millis() / REMINDER.as_millis()) as usize + 1;
    assert!(reminder_lines <= due, "{reminder_lines} reminders in {outage:?}: {outage_lines:#?}");
    assert_eq!(
        outage_lines.len(),
        reminder_lines + 2,
        "only the start, the reminders and the end: {outage_lines:#?}"
    );
    assert!(failures as usize > 10 * outage_lines.len(), "{failures} attempts, {} lines", outage_lines.len());
}
