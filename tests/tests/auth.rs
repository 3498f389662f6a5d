//! Users and ACLs on the real binary: `outpost passwd` writes password files that Debian's
//! mosquitto and Outpost both accept; SIGHUP reloads the password and ACL files (and keeps the
//! ones in force when a new one is invalid); `outpost check` refuses clear-text passwords and
//! names the bad line of a password or ACL file. What the ACL allows, compared with mosquitto,
//! is in `conformance.rs`.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use outpost_e2e::conformance::{Client4, Client5, Code, ConnectOutcome, PublishOutcome, options4, options5};
use outpost_e2e::gateway::{GatewaySpec, outpost, outpost_command};
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::{Mosquitto, MosquittoConfig};
use rumqttc::v5::mqttbytes::QoS as QoS5;

/// How long a reload may take to be logged after SIGHUP.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `outpost passwd ARGS…` with `stdin` piped in (not a terminal: one line is read).
fn passwd(args: &[&str], stdin: &str) -> (Option<i32>, String) {
    let mut command = outpost_command().expect("the outpost binary");
    command.arg("passwd").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn outpost passwd");
    // A command that refuses its arguments may exit before it reads its input: the write
    // then fails with a broken pipe, and its exit code and stderr say what happened.
    if let Err(e) = child.stdin.take().expect("stdin").write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write the password: {e}");
    }
    let output = child.wait_with_output().expect("outpost passwd ends");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[track_caller]
fn passwd_ok(args: &[&str], stdin: &str) {
    let (code, stderr) = passwd(args, stdin);
    assert_eq!(code, Some(0), "outpost passwd {args:?}: {stderr}");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

async fn login4(addr: std::net::SocketAddr, id: &str, user: &str, password: &str) -> ConnectOutcome {
    let mut options = options4(addr, id);
    options.set_credentials(user, password);
    match Client4::connect(options).await {
        Ok(client) => {
            client.disconnect().await;
            ConnectOutcome::Accepted
        }
        Err(outcome) => outcome,
    }
}

async fn login5(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
    password: &str,
) -> Result<Client5, ConnectOutcome> {
    let mut options = options5(addr, id);
    options.set_credentials(user, password);
    Client5::connect(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_by_outpost_passwd_works_in_mosquitto_and_outpost() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwd");
    let file_arg = path_str(&file);
    passwd_ok(&[file_arg, "sensor-1"], "pw-one\n");
    passwd_ok(&[file_arg, "sensor 2"], "pw two with spaces\r\n");
    passwd_ok(&[file_arg, "gone"], "x\n");
    assert_eq!(std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o600);
    passwd_ok(&["--delete", file_arg, "gone"], "");
    let text = std::fs::read_to_string(&file).expect("read");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.split(':').nth(1).is_some_and(|h| h.starts_with("$7$101$"))), "{text}");
    let (code, stderr) = passwd(&[file_arg, "nobody"], "\n");
    assert_eq!(code, Some(2), "an empty password is refused: {stderr}");
    let (code, stderr) = passwd(&["--delete", file_arg, "nobody"], "");
    assert_eq!(code, Some(2));
    assert!(stderr.contains("user \"nobody\" is not in the file"), "{stderr}");

    // Mosquitto, started as root, reads the file as its own user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod file");
    let config = MosquittoConfig {
        persistence: false,
        extra: format!("password_file {}\nallow_anonymous false\n", file.display()),
        ..MosquittoConfig::default()
    };
    let mosquitto = Mosquitto::start_configured(&config).await.expect("mosquitto takes the file");
    let addr = mosquitto.addr();
    assert_eq!(
        login4(addr, "m1", "sensor-1", "pw-one").await,
        ConnectOutcome::Accepted,
        "{}",
        mosquitto.tail()
    );
    assert_eq!(login4(addr, "m2", "sensor 2", "pw two with spaces").await, ConnectOutcome::Accepted);
    assert_eq!(login4(addr, "m3", "sensor-1", "pw-two").await, ConnectOutcome::Refused(Code(5)));
    drop(mosquitto);

    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(format!("[broker]\npassword_file = \"{}\"\n", file.display()))
        .start()
        .await
        .expect("outpost takes the file");
    let addr = gateway.listen();
    assert_eq!(
        login4(addr, "o1", "sensor-1", "pw-one").await,
        ConnectOutcome::Accepted,
        "{}",
        gateway.tail()
    );
    assert_eq!(login4(addr, "o2", "sensor 2", "pw two with spaces").await, ConnectOutcome::Accepted);
    assert_eq!(login4(addr, "o3", "sensor-1", "pw-two").await, ConnectOutcome::Refused(Code(4)));
    let anonymous = match Client4::connect(options4(addr, "o4")).await {
        Ok(_) => ConnectOutcome::Accepted,
        Err(outcome) => outcome,
    };
    assert_eq!(anonymous, ConnectOutcome::Refused(Code(5)), "no anonymous clients with a password file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_files_and_keeps_them_when_a_new_one_is_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = (dir.path().join("passwd"), dir.path().join("acl"));
    passwd_ok(&[path_str(&pw), "alice"], "one\n");
    std::fs::write(&acl, "user alice\ntopic readwrite a/#\n").expect("write acl");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\npassword_file = \"{}\"\nacl_file = \"{}\"\n",
            pw.display(),
            acl.display()
        ))
        .start()
        .await
        .expect("start");
    // Every listener speaks MQTT 3.1.1 and 5.
    let addr = gateway.listen();
    let mut before = login5(addr, "alice-before", "alice", "one").await.expect("alice logs in");
    assert_eq!(before.publish("a/x", QoS5::AtLeastOnce, false, b"1").await, PublishOutcome::Acked);
    assert_eq!(
        before.publish("b/x", QoS5::AtLeastOnce, false, b"2").await,
        PublishOutcome::Refused(Code(0x87))
    );

    passwd_ok(&[path_str(&pw), "alice"], "two\n");
    std::fs::write(&acl, "user alice\ntopic readwrite b/#\n").expect("write acl");
    gateway.signal(libc::SIGHUP).expect("SIGHUP");
    let reloaded =
        gateway.wait_for_message("password and ACL files reloaded", RELOAD_TIMEOUT).await.expect("reloaded");
    assert_eq!(
        (reloaded["users"].as_u64(), reloaded["acl_entries"].as_u64()),
        (Some(1), Some(1)),
        "{reloaded}"
    );
    assert_eq!(
        login5(addr, "alice-old", "alice", "one").await.err(),
        Some(ConnectOutcome::Refused(Code(0x86))),
        "the old password is gone"
    );
    let mut after = login5(addr, "alice-after", "alice", "two").await.expect("the new password works");
    assert_eq!(after.publish("b/x", QoS5::AtLeastOnce, false, b"3").await, PublishOutcome::Acked);
    assert_eq!(
        after.publish("a/x", QoS5::AtLeastOnce, false, b"4").await,
        PublishOutcome::Refused(Code(0x87))
    );
    // A connection made before the reload follows the new ACL too.
    assert_eq!(
        before.publish("a/x", QoS5::AtLeastOnce, false, b"5").await,
        PublishOutcome::Refused(Code(0x87))
    );
    assert_eq!(before.publish("b/y", QoS5::AtLeastOnce, false, b"6").await, PublishOutcome::Acked);

    std::fs::write(&acl, "user alice\ntopics readwrite c/#\n").expect("write a broken acl");
    gateway.signal(libc::SIGHUP).expect("SIGHUP");
    let refused =
        gateway.wait_for_message("password or ACL file refused", RELOAD_TIMEOUT).await.expect("refused");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("acl: line 2") && error.contains("unknown keyword `topics`"), "{refused}");
    assert_eq!(
        after.publish("b/x", QoS5::AtLeastOnce, false, b"7").await,
        PublishOutcome::Acked,
        "the ACL in force stays"
    );
    assert!(login5(addr, "alice-still", "alice", "two").await.is_ok(), "the passwords in force stay");

    let status = gateway.terminate().await.expect("stop");
    assert!(status.success(), "{status:?}");
    let counters = gateway.final_counters().expect("counters");
    assert_eq!(counters.get("auth_reloads"), Some(&1));
    assert_eq!(counters.get("auth_reload_failures"), Some(&1));
    assert_eq!(counters.get("acl_publish_denied"), Some(&3));
    assert_eq!(counters.get("auth_failed"), Some(&1));
}

#[test]
fn check_refuses_clear_text_passwords_and_names_bad_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("outpost.toml");
    let check = |toml: &str| {
        std::fs::write(&config, format!("data_dir = \"data\"\n{toml}")).expect("write config");
        let out = outpost(&["check", "--config", path_str(&config)]).expect("run outpost check");
        (out.code, out.stderr)
    };

    let (code, stderr) = check("[broker.users]\nsensor = \"hunter2\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("`broker.users` = \"sensor\" is invalid: clear-text passwords"), "{stderr}");
    assert!(
        stderr.contains("broker.password_file") && stderr.contains("allow_plaintext_passwords"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "a password is never printed: {stderr}");
    let (code, stderr) =
        check("[broker]\nallow_plaintext_passwords = true\n[broker.users]\nsensor = \"hunter2\"\n");
    assert_eq!(code, Some(0), "{stderr}");

    std::fs::write(dir.path().join("acl"), "topic read a/#\nuser\n").expect("write acl");
    std::fs::write(dir.path().join("passwd"), "sensor:hunter2\n").expect("write passwd");
    let (code, stderr) = check("[broker]\nacl_file = \"acl\"\npassword_file = \"passwd\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("`broker.password_file`")
            && stderr.contains("passwd: line 1: \"sensor:…\": not a hash"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        stderr.contains("`broker.acl_file`")
            && stderr.contains("acl: line 2: \"user\": `user` needs a username"),
        "{stderr}"
    );

    let (code, stderr) = check("[broker]\nallow_anonymous = false\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("`broker.allow_anonymous` = \"false\" is invalid: no client could connect"),
        "{stderr}"
    );
    let (code, stderr) = check("[broker]\npassword_file = \"missing\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot read") && stderr.contains("missing"), "{stderr}");
}

#[test]
fn a_password_file_asking_for_too_many_pbkdf2_rounds_is_refused_by_check_and_at_start_up() {
    use outpost_sim::harness::mosquitto::{MOSQUITTO_PASSWD, write_password_file};
    if !outpost_e2e::require_tool(MOSQUITTO_PASSWD, "mosquitto") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwd");
    let users = [("sensor-1", "one"), ("sensor-2", "two")].map(|(u, p)| (u.to_owned(), p.to_owned()));
    write_password_file(&file, &users).expect("mosquitto_passwd");
    // Every login, and the decoy check for unknown users, would cost 2^32 − 1 rounds: hours.
    let text = std::fs::read_to_string(&file).expect("read");
    assert_eq!(text.matches("$7$101$").count(), 2, "{text}");
    let edited = text.replacen(":$7$101$", &format!(":$7${}$", u32::MAX), 2).replacen(
        &format!("sensor-1:$7${}$", u32::MAX),
        "sensor-1:$7$101$",
        1,
    );
    std::fs::write(&file, &edited).expect("write");
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, "data_dir = \"data\"\n[broker]\npassword_file = \"passwd\"\n")
        .expect("write config");

    let started = std::time::Instant::now();
    let out = outpost(&["check", "--config", path_str(&config)]).expect("run outpost check");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "`broker.password_file` = \"{}\" is invalid: {}: line 2: \"sensor-2:…\": 4294967295 PBKDF2 \
             iterations is above Outpost's limit of 100000",
            file.display(),
            file.display()
        )) && out.stderr.contains("outpost passwd --iterations 101 FILE USER"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("$7$"), "no hash is printed: {}", out.stderr);
    let out =
        outpost(&["run", "--config", path_str(&config), "--listen", "127.0.0.1:0"]).expect("run outpost run");
    assert_eq!(out.code, Some(1), "refused at start-up: {out:?}");
    assert!(out.stderr.contains("above Outpost's limit of 100000"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(10), "refused without hashing");

    let (code, stderr) = passwd(&["--iterations", "100001", path_str(&file), "sensor-3"], "pw\n");
    assert_eq!(code, Some(2), "outpost passwd keeps to the limit too: {stderr}");
    assert!(stderr.contains("100001") && stderr.contains("1..=100000"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_denial_is_counted_and_logged_with_its_fix() {
    use outpost_e2e::conformance::{ACK_TIMEOUT, Received, Recorder};
    use rumqttc::QoS;
    use rumqttc::v5::mqttbytes::v5::LastWill;

    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    // No password file: every client is anonymous, and anonymous clients are allowed.
    std::fs::write(&acl, "topic readwrite open/#\ntopic read news/#\ntopic write drop/#\n")
        .expect("write acl");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .config_toml(format!("[broker]\nacl_file = \"{}\"\n", acl.display()))
        .start()
        .await
        .expect("start");
    let addr = gateway.listen();

    let mut subscriber = Client5::connect(options5(addr, "denied-sub")).await.expect("connect");
    assert_eq!(subscriber.subscribe("secret/#", QoS5::AtLeastOnce).await, Some(Code(0x87)));
    gateway.wait_for_message("refused a subscription", RELOAD_TIMEOUT).await.expect("logged");

    let mut recorder = Recorder::start(addr, "#", QoS::AtLeastOnce).await.expect("`#` overlaps open/#");
    assert!(recorder.all_granted());
    let mut publisher = Client5::connect(options5(addr, "denied-pub")).await.expect("connect");
    assert_eq!(
        publisher.publish("news/x", QoS5::AtLeastOnce, false, b"n").await,
        PublishOutcome::Refused(Code(0x87))
    );
    gateway
        .wait_for_message("dropped a publish the ACL does not allow", RELOAD_TIMEOUT)
        .await
        .expect("logged");
    assert_eq!(publisher.publish("drop/x", QoS5::AtLeastOnce, false, b"d").await, PublishOutcome::Acked);
    assert_eq!(publisher.publish("open/x", QoS5::AtLeastOnce, false, b"o").await, PublishOutcome::Acked);
    let received = recorder.wait_until(ACK_TIMEOUT, |m| m.iter().any(|m| m.topic == "open/x")).await;
    assert_eq!(received, vec![Received::new("open/x", "o", 1, false)], "drop/x is written, never read");
    gateway
        .wait_for_message("withheld deliveries the ACL does not let", RELOAD_TIMEOUT)
        .await
        .expect("logged");

    let mut options = options5(addr, "denied-will");
    options.set_last_will(LastWill::new("news/will", "gone", QoS5::AtLeastOnce, false, None));
    Client5::connect(options).await.expect("a denied will does not refuse the CONNECT").drop_connection();
    let log = gateway.wait_for_message("did not publish a will", RELOAD_TIMEOUT).await.expect("logged");
    assert!(log["message"].as_str().is_some_and(|m| m.contains("broker.acl_file")), "{log}");

    let status = gateway.terminate().await.expect("stop");
    assert!(status.success(), "{status:?}");
    let counters = gateway.final_counters().expect("counters");
    for (counter, n) in [
        ("acl_subscribe_denied", 1),
        ("acl_publish_denied", 1),
        ("acl_delivery_denied", 1),
        ("acl_will_denied", 1),
        ("auth_failed", 0),
    ] {
        // The stop line leaves out counters that stayed at zero.
        assert_eq!(counters.get(counter).copied().unwrap_or(0), n, "{counter}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_password_is_asked_twice_and_never_echoed() {
    use std::sync::{Arc, Mutex};

    use outpost::auth::password::PasswordFile;
    use outpost_e2e::wait_until;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // `script` gives the command a pseudo-terminal, so `outpost passwd` sees a tty on stdin.
    if !outpost_e2e::require_tool("/usr/bin/script", "bsdutils") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwd");
    let outpost = outpost_command().expect("the outpost binary").get_program().to_owned();
    let inner = format!("{} passwd {} tty-user", outpost.to_string_lossy(), file.display());
    let mut child = tokio::process::Command::new("/usr/bin/script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn script");
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = tokio::spawn({
        let output = Arc::clone(&output);
        async move {
            let mut chunk = [0u8; 256];
            while let Ok(n @ 1..) = stdout.read(&mut chunk).await {
                output.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
        }
    });
    let shown =
        |output: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&output.lock().expect("lock")).into_owned();
    let mut stdin = child.stdin.take().expect("stdin");
    for prompt in ["Password: ", "Reenter password: "] {
        wait_until(&format!("the prompt {prompt:?}"), RELOAD_TIMEOUT, || shown(&output).ends_with(prompt))
            .await
            .unwrap_or_else(|e| panic!("{e}: {:?}", shown(&output)));
        stdin.write_all(b"tty-secret\n").await.expect("type the password");
        stdin.flush().await.expect("flush");
    }
    let status =
        tokio::time::timeout(RELOAD_TIMEOUT, child.wait()).await.expect("passwd ends").expect("status");
    reader.await.expect("reader");
    let shown = shown(&output);
    assert!(status.success(), "{status:?}: {shown:?}");
    assert!(!shown.contains("tty-secret"), "the password was echoed: {shown:?}");
    assert!(shown.contains("user \"tty-user\" added"), "{shown:?}");
    let passwords = PasswordFile::load(&file).expect("a valid file");
    assert!(passwords.lookup("tty-user").is_some_and(|(hash, known)| known && hash.verify(b"tty-secret")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_check_that_outlasts_the_connection_timeout_gets_server_unavailable() {
    // 100,000 PBKDF2 rounds (the most a file may ask for): 0.7 s of CPU in a debug build, 0.1 s
    // in release, past a 100 ms timeout. The hash never verifies; it only has to be expensive.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwd");
    std::fs::write(&file, format!("slow:$7$100000$AAAAAAAAAAAAAAAA${}==\n", "A".repeat(86))).expect("write");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path())
        .config_toml(format!(
            "[broker]\npassword_file = \"{}\"\nconnection_timeout = \"100ms\"\n",
            file.display()
        ))
        .start()
        .await
        .expect("start");
    let started = std::time::Instant::now();
    let outcome = login4(gateway.listen(), "slow-1", "slow", "anything").await;
    assert_eq!(outcome, ConnectOutcome::Refused(Code(3)), "3.1.1 server unavailable\n{}", gateway.tail());
    assert!(started.elapsed() < Duration::from_secs(5), "answered at the timeout, not after the check");
    gateway
        .wait_for_message("sensor connection refused", RELOAD_TIMEOUT)
        .await
        .map(|log| {
            assert!(log["reason"].as_str().is_some_and(|r| r.contains("broker.connection_timeout")), "{log}")
        })
        .expect("logged with the reason");
}
