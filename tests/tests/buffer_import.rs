//! Events left in a buffer file the gateway did not open reach the upstream (issue #19 §1):
//! a file moved aside as corrupt, imported with `outpost buffer import` while the gateway
//! runs; a file from another data dir, imported while it is stopped; and a buffer file in
//! format 1 (committed fixture, written by the release before format versions) opened as is.
//! Every event must arrive at a real mosquitto, per priority in its original order; importing
//! again adds nothing. Through the daemon, only root and the daemon's user may import.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use outpost::buffer::{Batch, Record, Store};
use outpost_e2e::gateway::{GatewaySpec, buffered_events, outpost};
use outpost_e2e::mqtt::{Session, Subscriber};
use outpost_e2e::process::run_to_completion;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `n` events at priorities 0 and 5, topics `stranded/<i>`, payload `{"i":<i>}`.
fn stranded_events(n: u64) -> Vec<Record> {
    (1..=n)
        .map(|i| Record {
            priority: if i % 4 == 0 { 0 } else { 5 },
            seq: i,
            event_id: 0x0100_0000_0000 + i,
            enqueued_ms: outpost::event::now_ms(),
            expires_ms: None,
            topic: format!("stranded/{i}"),
            qos: 1,
            payload: Bytes::from(format!("{{\"i\":{i}}}")),
            props: None,
        })
        .collect()
}

/// Asserts every `(priority, topic, payload)` arrived exactly once, and that per priority they
/// arrived in the order given.
fn assert_relayed(received: &[(String, Vec<u8>)], expected: &[(u8, String, Vec<u8>)]) {
    let mut counts: BTreeMap<(&str, &[u8]), usize> = BTreeMap::new();
    for (topic, payload) in received {
        *counts.entry((topic.as_str(), payload.as_slice())).or_default() += 1;
    }
    for (_, topic, payload) in expected {
        assert_eq!(counts.get(&(topic.as_str(), payload.as_slice())), Some(&1), "{topic} arrived once");
    }
    assert_eq!(received.len(), expected.len(), "nothing else arrived");
    for priority in 0..10u8 {
        let want: Vec<&String> = expected.iter().filter(|e| e.0 == priority).map(|e| &e.1).collect();
        let got: Vec<&String> = received.iter().map(|r| &r.0).filter(|t| want.contains(t)).collect();
        assert_eq!(got, want, "priority {priority} keeps its order");
    }
}

/// Makes the file's counters disagree with its records: corrupt by the store's own check,
/// while every record is still readable.
fn corrupt_counters(file: &Path) {
    let db = redb::Database::open(file).expect("open");
    let txn = db.begin_write().expect("txn");
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    txn.open_table(meta).expect("meta").insert("events.5", 1_000).expect("insert");
    txn.commit().expect("commit");
}

fn run(args: &[&str]) -> String {
    let out = outpost(args).expect("run outpost");
    assert_eq!(out.code, Some(0), "outpost {args:?}: {}", out.stderr);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_a_moved_aside_file_are_relayed_after_import_while_running() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "stranded/#", Session::Clean).await.expect("subscribe");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let records = stranded_events(40);
    {
        let (mut store, _) = Store::open(&data).expect("open");
        store.apply(&Batch { inserts: records.clone(), ..Batch::default() }).expect("fill");
    }
    corrupt_counters(&data.join("buffer.redb"));

    let mut gateway = GatewaySpec::new(&data).upstream(upstream.url()).start().await.expect("gateway");
    let moved = gateway.messages("the buffer file's contents are corrupt");
    let line = moved.first().unwrap_or_else(|| panic!("no move-aside ERROR\n{}", gateway.tail()));
    let aside = line["moved_to"].as_str().expect("moved_to").to_owned();
    let message = line["message"].as_str().expect("message");
    let command = format!("outpost buffer import {aside} --data-dir {}", data.display());
    assert!(message.contains(&command), "the ERROR names the command: {message}");

    let data_arg = data.to_str().expect("utf8");
    let stdout = run(&["buffer", "import", &aside, "--data-dir", data_arg]);
    assert!(
        stdout.starts_with(&format!("imported 40 events from {aside} into the running outpost's buffer")),
        "{stdout}"
    );
    subscriber.wait_for_count(40, TIMEOUT).await.expect("every stranded event is relayed");
    let expected: Vec<(u8, String, Vec<u8>)> =
        records.iter().map(|r| (r.priority, r.topic.clone(), r.payload.to_vec())).collect();
    assert_relayed(&subscriber.messages(), &expected);

    let stdout = run(&["buffer", "import", &aside, "--data-dir", data_arg]);
    assert!(stdout.starts_with("imported 0 events"), "{stdout}");
    assert!(stdout.contains("40 were already imported"), "{stdout}");
    gateway.terminate().await.expect("stop");
    let counters = gateway.final_counters().expect("counters");
    assert_eq!(counters.get("buffer_imported"), Some(&40));
    assert_eq!(counters.get("buffer_corrupt"), Some(&1));
    // Offline, the same file is still recognised as imported.
    let stdout = run(&["buffer", "import", &aside, "--data-dir", data_arg]);
    assert!(
        stdout.starts_with("imported 0 events") && stdout.contains("40 were already imported"),
        "{stdout}"
    );
    assert_eq!(subscriber.count(), 40, "no duplicates");
}

/// The fixture's events as `(priority, topic, payload)`, from the export the writing release
/// made of it.
fn fixture_events() -> Vec<(u8, String, Vec<u8>)> {
    let export = include_str!("../../gateway/tests/fixtures/buffer-v1.export.jsonl");
    export
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("JSON line");
            let payload = v["payload"].as_str().expect("payload");
            let payload = match v["payload_encoding"].as_str() {
                Some("hex") => (0..payload.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&payload[i..i + 2], 16).expect("hex"))
                    .collect(),
                _ => payload.as_bytes().to_vec(),
            };
            let priority = u8::try_from(v["priority"].as_u64().expect("priority")).expect("u8");
            (priority, v["topic"].as_str().expect("topic").to_owned(), payload)
        })
        .collect()
}

fn fixture_path() -> std::path::PathBuf {
    outpost_e2e::workspace_root().join("gateway/tests/fixtures/buffer-v1.redb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_buffer_is_opened_and_every_event_relayed() {
    if !require_mosquitto() {
        return;
    }
    let expected = fixture_events();
    assert_eq!(expected.len(), 24);
    let upstream = Mosquitto::start().await.expect("mosquitto");
    let mut subscriber = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::copy(fixture_path(), data.join("buffer.redb")).expect("copy the fixture");

    let gateway = GatewaySpec::new(&data).upstream(upstream.url()).start().await.expect("gateway");
    let migrated = gateway.messages("buffer file format migrated");
    assert_eq!(migrated.first().map(|l| l["from"].clone()), Some(Value::from(1)), "{}", gateway.tail());
    subscriber.wait_for_count(24, TIMEOUT).await.expect("every fixture event is relayed");
    assert_relayed(&subscriber.messages(), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_file_imported_while_stopped_is_relayed_behind_the_own_events() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("mosquitto");
    let mut subscriber = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let own = stranded_events(6);
    {
        let (mut store, _) = Store::open(&data).expect("open");
        store.apply(&Batch { inserts: own.clone(), ..Batch::default() }).expect("fill");
    }
    let data_arg = data.to_str().expect("utf8");
    let fixture = fixture_path();
    let fixture_arg = fixture.to_str().expect("utf8");
    let before = std::fs::read(&fixture).expect("read");
    let stdout = run(&["buffer", "import", fixture_arg, "--data-dir", data_arg]);
    assert!(
        stdout.starts_with(&format!("imported 24 events from {fixture_arg} into {data_arg}/buffer.redb")),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&fixture).expect("read"), before, "the source is never written");

    let _gateway = GatewaySpec::new(&data).upstream(upstream.url()).start().await.expect("gateway");
    subscriber.wait_for_count(30, TIMEOUT).await.expect("own and imported events are relayed");
    // Per priority, the buffer's own events first, then the imported ones in their order.
    let mut expected: Vec<(u8, String, Vec<u8>)> =
        own.iter().map(|r| (r.priority, r.topic.clone(), r.payload.to_vec())).collect();
    expected.extend(fixture_events());
    assert_relayed(&subscriber.messages(), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_or_the_gateways_user_may_import_through_the_daemon() {
    if outpost::buffer::access::running_as().map(|id| id.uid) != Some(0) {
        eprintln!("skipping: needs root to run the import as another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let other = dir.path().join("other");
    {
        let (mut store, _) = Store::open(&other).expect("open");
        store.apply(&Batch { inserts: stranded_events(2), ..Batch::default() }).expect("fill");
    }
    let data = dir.path().join("data");
    let _gateway = GatewaySpec::new(&data).start().await.expect("gateway");
    // Let the other user reach the socket: the refusal under test is the daemon's own.
    let socket = data.join("outpost.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod socket");

    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    command.arg(outpost_e2e::binary("outpost").expect("binary"));
    command.args(["buffer", "import"]).arg(other.join("buffer.redb")).arg("--data-dir").arg(&data);
    let out = run_to_completion(command).expect("run the import");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the running outpost refused the import: only root or the gateway's own user (root (uid 0)) may import"),
        "{stderr}"
    );
    assert_eq!(buffered_events(&data).expect("stats"), 0, "nothing was imported");
}
