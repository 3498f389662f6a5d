//! Issue #20's memory cases: state a client creates in the local broker is released when its
//! subscription, session or topic goes away. Each case runs against the real binary and reads
//! its resident memory (`VmRSS`) at the start (after a warm-up of the same work, so allocator
//! arenas and buffers already exist), at the peak of the case, and after; the end must be
//! within [`TOLERANCE_KIB`] of the start. With rumqttd's router the three cases kept +57 MiB,
//! +9 MiB and +29 MiB, growing with every round; here the measured round reuses what the
//! warm-up freed, so its peak stays near the start too (the warm-up's own peak is in it).
//!
//! The upstream is a real mosquitto, so events drain and the buffer file does not grow.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::conformance::{RawClient, RawRead};
use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::raw;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;

/// Memory the end of a case may keep over its start.
const TOLERANCE_KIB: u64 = 3 * 1024;
const TIMEOUT: Duration = Duration::from_secs(120);

struct Rss {
    start: u64,
    peak: u64,
    end: u64,
}

impl Rss {
    fn check(&self, case: &str, gateway: &GatewayProcess) {
        println!(
            "{case}: gateway RSS start {} KiB, peak {} KiB, end {} KiB (end − start {} KiB)",
            self.start,
            self.peak,
            self.end,
            self.end as i64 - self.start as i64
        );
        assert!(
            self.end <= self.start + TOLERANCE_KIB,
            "{case}: RSS went from {} KiB to {} KiB (peak {} KiB)\n{}",
            self.start,
            self.end,
            self.peak,
            gateway.tail()
        );
    }
}

async fn gateway(upstream: &Mosquitto, data: &std::path::Path) -> GatewayProcess {
    let gateway = GatewaySpec::new(data)
        .upstream(upstream.url())
        .config_toml("[broker]\nmax_connections = 2000\n")
        .start()
        .await
        .expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    gateway
}

/// Counts the packets of one type (high nibble) a raw client reads.
async fn count_packets(mut read: OwnedReadHalf, kind: u8, seen: watch::Sender<usize>) {
    while let Ok((first, _)) = raw::read_packet(&mut read).await {
        if first >> 4 == kind {
            seen.send_modify(|n| *n += 1);
        }
    }
}

/// An MQTT 3.1.1 UNSUBSCRIBE from one filter.
fn unsubscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut variable = packet_id.to_be_bytes().to_vec();
    raw::put_str(&mut variable, filter);
    raw::packet(0xa2, &variable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_filters_subscribed_and_unsubscribed_leave_no_memory_behind() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = gateway(&upstream, data.path()).await;
    let listen = gateway.listen();
    subscribe_then_unsubscribe_fully(listen, "warm", 10_000, &gateway).await;
    let start = gateway.rss_kib().expect("RSS");
    let peak = subscribe_then_unsubscribe_fully(listen, "leak", 10_000, &gateway).await;
    Rss { start, peak, end: gateway.rss_kib().expect("RSS") }.check("10,000 filters", &gateway);
    let counters = final_counters(gateway).await;
    assert_eq!(counters.get("protocol_errors").copied().unwrap_or(0), 0, "{counters:?}");
}

/// One connection subscribes to `n` distinct filters (returns the RSS then), unsubscribes from
/// all of them, waits until the gateway handled every UNSUBSCRIBE (a PINGRESP after them
/// arrived) and disconnects.
async fn subscribe_then_unsubscribe_fully(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    gateway: &GatewayProcess,
) -> u64 {
    let client = RawClient::connect(addr, "filters", &raw::connect_v311(&format!("filters-{prefix}"), 60))
        .await
        .expect("accepted");
    let (read, mut write) = client.into_split();
    let (subacks_tx, mut subacks) = watch::channel(0);
    let (read_back_tx, read_back) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut read = read;
        let (mut unsubacks, mut pong) = (0usize, false);
        while let Ok((first, _)) = raw::read_packet(&mut read).await {
            match first >> 4 {
                9 => subacks_tx.send_modify(|k| *k += 1),
                11 => unsubacks += 1,
                13 => {
                    pong = true;
                    break;
                }
                _ => {}
            }
        }
        let _ = read_back_tx.send((unsubacks, pong));
    });
    let id = |i: usize| u16::try_from(i % 65_535 + 1).expect("below 65,536");
    let filter = |i: usize| format!("{prefix}/{i}/level/#");
    let subscribes: Vec<u8> = (0..n).flat_map(|i| raw::subscribe_v311(id(i), &filter(i), 1)).collect();
    write.write_all(&subscribes).await.expect("SUBSCRIBEs");
    tokio::time::timeout(TIMEOUT, subacks.wait_for(|&k| k >= n))
        .await
        .expect("every SUBACK")
        .expect("reader");
    let peak = gateway.rss_kib().expect("RSS");
    let unsubscribes: Vec<u8> = (0..n).flat_map(|i| unsubscribe(id(i), &filter(i))).collect();
    write.write_all(&unsubscribes).await.expect("UNSUBSCRIBEs");
    write.write_all(&[0xc0, 0x00]).await.expect("PINGREQ");
    let (unsubacks, pong) =
        tokio::time::timeout(TIMEOUT, read_back).await.expect("PINGRESP").expect("reader");
    assert_eq!((unsubacks, pong), (n, true), "every UNSUBSCRIBE answered, then the PINGRESP");
    write.write_all(&[0xe0, 0x00]).await.expect("DISCONNECT");
    drop(write);
    let _ = reader.await;
    peak
}

/// `n` connections with an empty client id (the gateway assigns one), `parallel` at a time,
/// each subscribing and disconnecting. Returns the RSS sampled halfway.
async fn empty_id_clients(addr: SocketAddr, n: usize, parallel: usize, gateway: &GatewayProcess) -> u64 {
    let per_worker = n / parallel;
    let mut workers = Vec::new();
    for w in 0..parallel {
        workers.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let mut client = RawClient::connect(addr, "anonymous", &raw::connect_v311("", 60))
                    .await
                    .expect("accepted");
                client.send(&raw::subscribe_v311(1, &format!("anon/{w}/{i}"), 1)).await.expect("SUBSCRIBE");
                let suback = client.read(TIMEOUT).await;
                assert!(matches!(suback, RawRead::Packet { first_byte: 0x90, .. }), "{suback:?}");
                client.send(&[0xe0, 0x00]).await.expect("DISCONNECT");
                // Read until the gateway closes: the session is gone by then.
                let _ = client.read(TIMEOUT).await;
            }
        }));
    }
    let mut peak = 0;
    for (i, worker) in workers.into_iter().enumerate() {
        worker.await.expect("worker");
        if i == parallel / 2 {
            peak = gateway.rss_kib().expect("RSS");
        }
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_empty_id_clients_that_subscribe_leave_no_memory_behind() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = gateway(&upstream, data.path()).await;
    let listen = gateway.listen();
    empty_id_clients(listen, 2_000, 16, &gateway).await;
    let start = gateway.rss_kib().expect("RSS");
    let peak = empty_id_clients(listen, 10_000, 16, &gateway).await;
    Rss { start, peak, end: gateway.rss_kib().expect("RSS") }.check("10,000 empty-id clients", &gateway);
    let counters = final_counters(gateway).await;
    assert_eq!(counters.get("sensor_connects").copied(), Some(12_000), "{counters:?}");
}

/// Publishes one QoS 1 message to each of `n` distinct topics under `sensors/` and waits until
/// the `sensors/#` subscriber has read them all.
async fn distinct_topics(addr: SocketAddr, prefix: &str, n: usize, received: &mut watch::Receiver<usize>) {
    let before = *received.borrow();
    let topics: Vec<String> = (0..n).map(|i| format!("sensors/{prefix}/{i}")).collect();
    for chunk in topics.chunks(1_000) {
        let mut client =
            RawClient::connect(addr, "topics", &raw::connect_v311(&format!("topics-{prefix}"), 60))
                .await
                .expect("accepted");
        let packets: Vec<u8> = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, t)| raw::publish_v311(t, 1, u16::try_from(i + 1).expect("small"), false, b"21.5"))
            .collect();
        client.send(&packets).await.expect("PUBLISHes");
        let mut acked = 0;
        while acked < chunk.len() {
            match client.read(TIMEOUT).await {
                RawRead::Packet { first_byte: 0x40, .. } => acked += 1,
                RawRead::Packet { .. } => {}
                other => panic!("publisher: {other:?} after {acked} PUBACKs"),
            }
        }
        client.send(&[0xe0, 0x00]).await.expect("DISCONNECT");
    }
    tokio::time::timeout(TIMEOUT, received.wait_for(|&k| k >= before + n))
        .await
        .expect("the subscriber read every message")
        .expect("subscriber");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_distinct_topics_under_a_local_subscription_leave_no_memory_behind() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = gateway(&upstream, data.path()).await;
    let listen = gateway.listen();
    let mut subscriber =
        RawClient::connect(listen, "dashboard", &raw::connect_v311("dashboard", 60)).await.expect("accepted");
    subscriber.send(&raw::subscribe_v311(1, "sensors/#", 0)).await.expect("SUBSCRIBE");
    let (read, _write) = subscriber.into_split();
    let (received_tx, mut received) = watch::channel(0);
    let reader = tokio::spawn(count_packets(read, 3, received_tx));
    distinct_topics(listen, "warm", 4_000, &mut received).await;
    let start = gateway.rss_kib().expect("RSS");
    distinct_topics(listen, "leak", 20_000, &mut received).await;
    let peak = gateway.rss_kib().expect("RSS");
    distinct_topics(listen, "more", 20_000, &mut received).await;
    Rss { start, peak, end: gateway.rss_kib().expect("RSS") }.check("40,000 distinct topics", &gateway);
    reader.abort();
    let counters = final_counters(gateway).await;
    assert_eq!(counters.get("local_dropped").copied().unwrap_or(0), 0, "{counters:?}");
}

async fn final_counters(mut gateway: GatewayProcess) -> std::collections::BTreeMap<String, u64> {
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    gateway.final_counters().expect("final counters")
}

/// `n` distinct persistent (clean session 0) clients (`n` a multiple of `parallel`), `parallel`
/// at a time, each subscribing and disconnecting: each leaves an offline session behind.
async fn persistent_clients(addr: SocketAddr, prefix: &'static str, n: usize, parallel: usize) {
    let per_worker = n / parallel;
    let mut workers = Vec::new();
    for w in 0..parallel {
        workers.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let id = format!("{prefix}-{w}-{i}");
                // CONNECT 3.1.1 with clean session 0: the flags byte after the keepalive.
                let mut connect = raw::connect_v311(&id, 60);
                connect[9] = 0x00;
                let mut client = RawClient::connect(addr, "persistent", &connect).await.expect("accepted");
                client
                    .send(&raw::subscribe_v311(1, &format!("persistent/{id}/#"), 1))
                    .await
                    .expect("SUBSCRIBE");
                let suback = client.read(TIMEOUT).await;
                assert!(matches!(suback, RawRead::Packet { first_byte: 0x90, .. }), "{suback:?}");
                client.send(&[0xe0, 0x00]).await.expect("DISCONNECT");
                let _ = client.read(TIMEOUT).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
}

/// Persistent sessions outlive their connections, so they are bounded by
/// `broker.max_offline_sessions`: beyond it the one offline longest is ended and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_persistent_sessions_are_bounded_by_config() {
    if !require_mosquitto() {
        return;
    }
    const KEPT: usize = 100;
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml(format!("[broker]\nmax_offline_sessions = {KEPT}\n"))
        .start()
        .await
        .expect("start the gateway");
    gateway.wait_for_message("connected upstream", TIMEOUT).await.expect("the uplink connects");
    let listen = gateway.listen();
    persistent_clients(listen, "warm", 2_000, 16).await;
    let start = gateway.rss_kib().expect("RSS");
    persistent_clients(listen, "many", 4_800, 16).await;
    let end = gateway.rss_kib().expect("RSS");
    Rss { start, peak: end, end }.check("4,800 persistent sessions (100 kept)", &gateway);
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    assert_eq!(counters.get("sessions_evicted").copied(), Some((6_800 - KEPT) as u64), "{counters:?}");
    let warned = gateway.messages("a persistent session was ended");
    assert!(!warned.is_empty() && warned.len() < 10, "logged, rate-limited: {} lines", warned.len());
}
