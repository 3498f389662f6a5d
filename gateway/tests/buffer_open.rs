//! A buffer the gateway cannot open is not a corrupt buffer (issue #19 §1): permission
//! problems, a read-only file system, a missing file and a format from a newer release must
//! leave the file exactly as it is and refuse to start with a message that says what to do.
//! Only contents proven corrupt are moved aside (`buffer::store` tests, `buffer_import` e2e).
//!
//! The real binary runs as `nobody` (uid 65534) through `setpriv` where a permission matters:
//! the tests run as root, which bypasses file permissions. Under `timeout`, so a gateway that
//! wrongly starts is killed (exit 124) and the test fails instead of hanging.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use outpost::buffer::{Batch, Record, Store};
use support::{Tmpfs, can_mount, is_root};

mod support;

const NOBODY: u32 = 65534;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// `outpost ARGS…` as `uid` (via setpriv) or as the test's user; killed after 20 s.
fn outpost_as(uid: Option<u32>, args: &[&std::ffi::OsStr]) -> Outcome {
    let mut command = Command::new("timeout");
    command.arg("20");
    if let Some(uid) = uid {
        let id = uid.to_string();
        command.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
    }
    command.arg(env!("CARGO_BIN_EXE_outpost")).args(args);
    for name in [
        "OUTPOST_CONFIG",
        "OUTPOST_LISTEN",
        "OUTPOST_UPSTREAM",
        "OUTPOST_DATA_DIR",
        "OUTPOST_RULES",
        "RUST_LOG",
    ] {
        command.env_remove(name);
    }
    let out = command.output().expect("run outpost");
    Outcome { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// `outpost run` on `data`, as `uid` or as the test's user.
fn run_gateway(data: &Path, uid: Option<u32>) -> Outcome {
    let port = outpost_sim::harness::free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    outpost_as(
        uid,
        &["run".as_ref(), "--listen".as_ref(), listen.as_ref(), "--data-dir".as_ref(), data.as_os_str()],
    )
}

/// A buffer in `data` holding `n` events, closed.
fn buffer_with_events(data: &Path, n: u64) -> PathBuf {
    let (mut store, _) = Store::open(data).expect("open");
    let inserts = (1..=n)
        .map(|seq| Record {
            priority: 5,
            seq,
            event_id: seq,
            enqueued_ms: outpost::event::now_ms(),
            expires_ms: None,
            topic: format!("sensors/{seq}"),
            qos: 1,
            payload: Bytes::from_static(b"{\"v\":1}"),
            props: None,
        })
        .collect();
    store.apply(&Batch { inserts, ..Batch::default() }).expect("fill");
    store.path().to_owned()
}

fn events_in(data: &Path) -> u64 {
    Store::open(data).expect("open as root").0.total().events
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into())
        .collect();
    names.sort();
    names
}

/// A tempdir `nobody` can traverse, with `data` inside it.
fn shared_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = dir.path().join("data");
    (dir, data)
}

#[test]
fn a_file_owned_by_another_user_is_refused_and_kept() {
    if !is_root() {
        eprintln!("skipping: needs root to run the gateway as another user");
        return;
    }
    let (_dir, data) = shared_tempdir();
    let file = buffer_with_events(&data, 5);
    // The data dir was handed over, the file stays root's (0644): what `DynamicUser=` meets
    // after a first run as root.
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).expect("chown");
    let before = std::fs::read(&file).expect("read");

    let out = run_gateway(&data, Some(NOBODY));
    assert_eq!(out.code, Some(2), "refuses to start\n{}", out.stderr);
    for needle in [
        format!("cannot open buffer file {}", file.display()),
        "Permission denied".to_owned(),
        format!("{} is owned by root (uid 0), mode 0644", file.display()),
        "outpost runs as nobody (uid 65534)".to_owned(),
        format!("`chown -R 65534:65534 {}`", data.display()),
    ] {
        assert!(out.stderr.contains(&needle), "missing {needle:?} in\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("aside"), "{}", out.stderr);
    assert_eq!(std::fs::read(&file).expect("read"), before, "the file is untouched");
    assert_eq!(entries(&data), vec!["buffer.redb"], "nothing moved aside");
    assert_eq!(events_in(&data), 5, "the acknowledged events are still there");
}

#[test]
fn a_missing_file_is_created_and_an_unwritable_dir_is_named() {
    let (_dir, data) = shared_tempdir();
    std::fs::create_dir(&data).expect("mkdir");
    let (store, report) = Store::open(&data).expect("a missing file is simply created");
    assert!(report.moved_aside.is_none());
    assert_eq!(store.total().events, 0);
    drop(store);
    assert_eq!(entries(&data), vec!["buffer.redb"]);

    if !is_root() {
        eprintln!("skipping the unwritable half: needs root to run the gateway as another user");
        return;
    }
    std::fs::remove_file(data.join("buffer.redb")).expect("rm");
    let out = run_gateway(&data, Some(NOBODY));
    assert_eq!(out.code, Some(2), "refuses to start\n{}", out.stderr);
    for needle in [
        format!(
            "{} is missing; {} is owned by root (uid 0), mode 0755",
            data.join("buffer.redb").display(),
            data.display()
        ),
        "outpost runs as nobody (uid 65534)".to_owned(),
        format!("`chown -R 65534:65534 {}`", data.display()),
    ] {
        assert!(out.stderr.contains(&needle), "missing {needle:?} in\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("aside"), "{}", out.stderr);
    assert!(entries(&data).is_empty());
}

#[test]
fn a_read_only_file_system_is_named_and_the_file_kept() {
    if !can_mount() {
        return;
    }
    let (_dir, data) = shared_tempdir();
    let fs = Tmpfs::mount(&data, "16m");
    let file = buffer_with_events(&data, 5);
    fs.set_read_only(true);
    let before = std::fs::read(&file).expect("read");

    let out = run_gateway(&data, None);
    assert_eq!(out.code, Some(2), "refuses to start\n{}", out.stderr);
    for needle in [
        format!("cannot open buffer file {}", file.display()),
        format!("the file system holding {} is mounted read-only; mount it read-write", data.display()),
    ] {
        assert!(out.stderr.contains(&needle), "missing {needle:?} in\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("aside"), "{}", out.stderr);
    assert_eq!(std::fs::read(&file).expect("read"), before, "the file is untouched");
    fs.set_read_only(false);
    assert_eq!(entries(&data), vec!["buffer.redb"]);
    assert_eq!(events_in(&data), 5);
}

#[test]
fn a_newer_format_is_refused_by_the_binary_and_left_byte_identical() {
    const NEWER: u64 = outpost::buffer::store::FORMAT_VERSION + 1;
    let (_dir, data) = shared_tempdir();
    let file = buffer_with_events(&data, 3);
    // What a newer release would have written; the table is the buffer's `meta`.
    {
        let db = redb::Database::open(&file).expect("open");
        let txn = db.begin_write().expect("txn");
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        txn.open_table(meta).expect("meta").insert("format_version", NEWER).expect("insert");
        txn.commit().expect("commit");
    }
    let before = std::fs::read(&file).expect("read");
    let out = run_gateway(&data, None);
    assert_eq!(out.code, Some(2), "refuses to start\n{}", out.stderr);
    let needle = format!(
        "buffer file {} has format version {NEWER}, but this outpost reads versions up to {}",
        file.display(),
        outpost::buffer::store::FORMAT_VERSION
    );
    assert!(out.stderr.contains(&needle), "missing {needle:?} in\n{}", out.stderr);
    assert_eq!(std::fs::read(&file).expect("read"), before, "byte-identical");
    assert_eq!(entries(&data), vec!["buffer.redb"]);
}

#[test]
fn an_import_source_the_user_may_not_read_is_refused_precisely() {
    if !is_root() {
        eprintln!("skipping: needs root to run outpost as another user");
        return;
    }
    let (dir, data) = shared_tempdir();
    let source = buffer_with_events(&dir.path().join("other"), 2);
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::create_dir(&data).expect("mkdir");
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).expect("chown");
    let out = outpost_as(
        Some(NOBODY),
        &["buffer".as_ref(), "import".as_ref(), source.as_os_str(), "--data-dir".as_ref(), data.as_os_str()],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    for needle in [
        format!("cannot read {}: Permission denied", source.display()),
        format!("{} is owned by root (uid 0), mode 0600", source.display()),
        "outpost runs as nobody (uid 65534)".to_owned(),
    ] {
        assert!(out.stderr.contains(&needle), "missing {needle:?} in\n{}", out.stderr);
    }
    assert!(entries(&data).is_empty(), "nothing was created before the source was readable");
}
