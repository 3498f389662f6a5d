//! What the `outpost` binary writes where an operator reads it: logs without terminal colour
//! codes when stderr is a file or journald, and JSON logs whose counters are numbers; and a
//! SIGTERM right after start-up is a graceful stop.

use std::time::Duration;

use outpost_e2e::gateway::{
    GatewaySpec, READY_MESSAGE, START_TIMEOUT, STOP_TIMEOUT, buffer_stats, outpost_command,
};
use outpost_e2e::mqtt::publish_qos1;
use outpost_e2e::process::ChildProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_into_a_pipe_carry_no_colour_codes() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut command = outpost_command().expect("the outpost binary");
    command
        .args(["--log-format", "text", "run", "--listen"])
        .arg(outpost_e2e::free_addr().to_string())
        .arg("--data-dir")
        .arg(data.path());
    let mut gateway = ChildProcess::spawn("outpost text", command).expect("start outpost");
    gateway
        .wait_for_line("the readiness line", START_TIMEOUT, |line| line.contains(READY_MESSAGE))
        .await
        .expect("outpost starts");
    // At once after the readiness line: the signal handlers are installed by then.
    let status = gateway.terminate(STOP_TIMEOUT).await.expect("outpost stops");
    assert!(status.success(), "a graceful stop: {status:?}\n{}", gateway.tail());
    let lines = gateway.lines();
    assert!(lines.iter().any(|l| l.contains(" INFO ")), "text logs were written:\n{}", gateway.tail());
    let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\u{1b}')).collect();
    assert!(coloured.is_empty(), "ANSI escape codes in a pipe: {coloured:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_counters_are_numbers() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");
    publish_qos1(
        gateway.listen(),
        "counted-sensor",
        "sensors/s1/temp",
        [b"21.5".to_vec()],
        Duration::from_secs(10),
    )
    .await
    .expect("publish one event");
    let status = gateway.terminate().await.expect("stop the gateway");
    assert!(status.success(), "{status:?}\n{}", gateway.tail());
    let stopped = gateway.messages("stopped").pop().expect("a `stopped` line");
    assert_eq!(stopped["counters"]["ingested"], 1, "{stopped}");
    assert_eq!(stopped["counters"]["sensor_connects"], 1, "{stopped}");
}

/// A client that connects to the admin socket and never sends its request line holds one
/// request slot, not the socket: `outpost buffer stats` still answers beside it (it waited
/// forever before), and the gateway still stops gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_admin_client_does_not_lock_operators_out() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("start the gateway");
    let socket = outpost::admin::socket_path(data.path());
    let silent = tokio::net::UnixStream::connect(&socket).await.expect("connect to the admin socket");
    let dir = data.path().to_owned();
    let stats =
        tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(move || buffer_stats(&dir)))
            .await
            .expect("`outpost buffer stats` answers while a silent client is connected")
            .expect("the stats task");
    let stats = stats.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    assert_eq!(stats.get("events").and_then(serde_json::Value::as_u64), Some(0), "{stats}");
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "a graceful stop with a silent admin client: {status:?}\n{}", gateway.tail());
    drop(silent);
}
