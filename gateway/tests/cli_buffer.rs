//! `outpost buffer stats|peek|export`, the real binary, both ways: reading the file while no
//! daemon runs, and asking a running gateway (which holds redb's writer lock) over its admin
//! socket. Both must give the same answers.

use std::process::Command;

use bytes::Bytes;
use outpost::buffer::{Batch, Record, Store};

fn outpost(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost")).args(args).output().expect("run outpost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn record(priority: u8, seq: u64, payload: &[u8]) -> Record {
    Record {
        priority,
        seq,
        event_id: 0x0100_0000_0000 + seq,
        enqueued_ms: outpost::event::now_ms() - 5_000,
        expires_ms: None,
        topic: format!("sensors/{seq}/temp"),
        qos: 1,
        payload: Bytes::copy_from_slice(payload),
        props: None,
    }
}

/// Runs the three commands and checks their answers; returns the stats for comparison.
fn check_commands(data_dir: &str, scratch: &std::path::Path) -> serde_json::Value {
    let (code, stdout, stderr) = outpost(&["buffer", "stats", "--data-dir", data_dir]);
    assert_eq!(code, 0, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats are JSON");
    assert_eq!(stats["events"], 7);
    let priorities = stats["priorities"].as_array().expect("per priority");
    assert_eq!(priorities.len(), 2);
    assert_eq!(priorities[0]["priority"], 0);
    assert_eq!(priorities[0]["events"], 1);
    assert_eq!(priorities[1]["events"], 6);
    assert!(priorities[1]["oldest_age_s"].as_f64().expect("age") >= 4.0);

    let (code, stdout, stderr) = outpost(&["buffer", "peek", "3", "--data-dir", data_dir]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["topic"], "sensors/6/temp", "the most urgent event is sent first");
    assert_eq!(lines[0]["payload"], "{\"alarm\":true}");
    assert_eq!(lines[0]["event_id"], "0000010000000006");
    assert_eq!(lines[1]["seq"], 1);

    let export = scratch.join("export.jsonl");
    let (code, stdout, stderr) =
        outpost(&["buffer", "export", export.to_str().expect("utf8"), "--data-dir", data_dir]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), format!("exported 7 events to {}", export.display()));
    let exported = std::fs::read_to_string(&export).expect("export file");
    assert_eq!(exported.lines().count(), 7);
    let last: serde_json::Value =
        serde_json::from_str(exported.lines().last().expect("7 lines")).expect("JSON line");
    assert_eq!(last["payload"], "ff0010");
    assert_eq!(last["payload_encoding"], "hex");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_commands_work_with_and_without_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    {
        let (mut store, _) = Store::open(&data).expect("open");
        let mut inserts: Vec<Record> = (1..=5).map(|seq| record(5, seq, b"{\"v\":1}")).collect();
        inserts.push(record(0, 6, b"{\"alarm\":true}"));
        inserts.push(record(5, 7, &[0xff, 0x00, 0x10]));
        store.apply(&Batch { inserts, ..Batch::default() }).expect("fill");
    }
    let data_dir = data.to_str().expect("utf8 path").to_owned();
    let scratch = dir.path().to_owned();

    // No daemon: the CLI reads the file.
    let (d, s) = (data_dir.clone(), scratch.clone());
    let offline = tokio::task::spawn_blocking(move || check_commands(&d, &s)).await.expect("offline run");

    // A running gateway holds the file: the CLI asks it over the admin socket.
    let port = outpost_sim::harness::free_port().expect("a free port");
    let mut config = outpost::config::GatewayConfig { data_dir: data.clone(), ..Default::default() };
    config.broker.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    let gateway = outpost::Gateway::start(config).await.expect("gateway starts");
    let (d, s) = (data_dir.clone(), scratch.clone());
    let online = tokio::task::spawn_blocking(move || check_commands(&d, &s)).await.expect("online run");
    for (a, b) in online["priorities"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(offline["priorities"].as_array().into_iter().flatten())
    {
        assert_eq!((&a["priority"], &a["events"], &a["bytes"]), (&b["priority"], &b["events"], &b["bytes"]));
    }
    assert!(gateway.shutdown().await);
    assert!(!data.join("outpost.sock").exists(), "the admin socket is removed on shutdown");
}

#[test]
fn buffer_stats_on_a_missing_buffer_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = outpost(&["buffer", "stats", "--data-dir", dir.path().to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no buffer at") && stderr.contains("is --data-dir right?"), "{stderr}");
}
