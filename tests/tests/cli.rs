//! What the `outpost` binary writes where an operator reads it: logs without terminal colour
//! codes when stderr is a file or journald, and JSON logs whose counters are numbers; and a
//! SIGTERM right after start-up is a graceful stop.

use std::time::Duration;

use outpost_e2e::gateway::{GatewaySpec, READY_MESSAGE, START_TIMEOUT, STOP_TIMEOUT, outpost_command};
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
