//! A local subscriber that stops reading (ARCHITECTURE.md, "Local fan-out"): its queue of
//! `broker.max_queued_messages` fills, its publishers wait once for a bounded time, then its
//! deliveries are dropped and counted (`local_dropped`) — never skipped silently. What this
//! checks: the upstream path is unaffected (every acknowledged event arrives upstream while the
//! subscriber has stopped), what the subscriber does get arrives in order without duplicates,
//! every delivery it missed is counted, and once it reads again it gets new messages.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::raw;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2_500;
const PAYLOAD: usize = 1_000;
const MAX_QUEUED: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(60);
const MARKER: &str = "sensors/marker";
/// Markers published at most, one after another, until the subscriber has drained its backlog
/// and one gets through.
const MARKERS: usize = 30;

/// Connects a QoS 0 subscriber to `sensors/#` with a small receive buffer, then stops reading.
async fn stalled_subscriber(gateway: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut stream = socket.connect(gateway).await.expect("connect");
    stream.write_all(&raw::connect_v311("stalled/dashboard", 60)).await.expect("CONNECT");
    stream.write_all(&raw::subscribe_v311(1, "sensors/#", 0)).await.expect("SUBSCRIBE");
    let (connack, body) = raw::read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((connack, body), (0x20, vec![0, 0]), "connection accepted");
    let (suback, _) = raw::read_packet(&mut stream).await.expect("SUBACK");
    assert_eq!(suback, 0x90);
    stream
}

/// Every PUBLISH the subscriber reads, as `(topic, payload)`, in order.
async fn read_all(mut stream: TcpStream, seen: watch::Sender<Vec<(String, String)>>) {
    while let Ok((first, body)) = raw::read_packet(&mut stream).await {
        if first >> 4 != 3 || body.len() < 2 {
            continue;
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let Some(topic) = body.get(2..2 + topic_len) else { continue };
        // QoS 0 deliveries: no packet id.
        let payload = String::from_utf8_lossy(&body[2 + topic_len..]).into_owned();
        seen.send_modify(|s| s.push((String::from_utf8_lossy(topic).into_owned(), payload)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_subscriber_loses_only_counted_deliveries_and_never_holds_up_upstream_events() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut upstream_sub = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    // A queue of 100 deliveries against 10 MB of publishes: the stalled reader must fall behind
    // it, whatever the kernel's socket buffers absorb.
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml(format!("[broker]\nmax_payload = \"2KiB\"\nmax_queued_messages = {MAX_QUEUED}\n"))
        .start()
        .await
        .expect("start the gateway");
    let stalled = stalled_subscriber(gateway.listen()).await;

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let addr = gateway.listen();
            tokio::spawn(async move {
                let payloads =
                    (0..PER_PUBLISHER).map(|i| format!("{i:0>width$}", width = PAYLOAD).into_bytes());
                publish_qos1(addr, &format!("pub-{p}"), &format!("sensors/p{p}"), payloads, TIMEOUT).await
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher task").expect("every publish is acknowledged");
    }
    let n = PUBLISHERS * PER_PUBLISHER;
    upstream_sub
        .wait_for_count(n as u64, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("every event reaches the upstream: {e:#}\n{}", gateway.tail()));

    // Now the dashboard reads again. Markers go out one at a time until one arrives: those
    // published while its backlog was still full are dropped (and counted) like the rest.
    let (seen_tx, mut seen) = watch::channel(Vec::new());
    let reader = tokio::spawn(read_all(stalled, seen_tx));
    let mut markers = 0;
    let mut marker_seen = false;
    while markers < MARKERS && !marker_seen {
        publish_qos1(gateway.listen(), "marker", MARKER, [format!("m{markers}").into_bytes()], TIMEOUT)
            .await
            .expect("marker");
        markers += 1;
        let arrived = seen.wait_for(|s| s.iter().any(|(topic, _)| topic == MARKER));
        marker_seen = tokio::time::timeout(Duration::from_secs(2), arrived).await.is_ok_and(|r| r.is_ok());
    }
    let received = seen.borrow().clone();
    reader.abort();
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    let counters = gateway.final_counters().expect("final counters");
    let dropped = counters.get("local_dropped").copied().unwrap_or(0);

    assert!(marker_seen, "no marker reached the subscriber once it read again\n{}", gateway.tail());
    let (marker_at, first_marker) = received
        .iter()
        .enumerate()
        .find(|(_, (topic, _))| topic == MARKER)
        .map(|(i, (_, payload))| (i, payload.clone()))
        .expect("a marker");
    assert_eq!(first_marker, format!("m{}", markers - 1), "markers arrive in order: only the last one");
    let readings = &received[..marker_at];
    for p in 0..PUBLISHERS {
        let topic = format!("sensors/p{p}");
        let sequence: Vec<u64> = readings
            .iter()
            .filter(|(t, _)| *t == topic)
            .filter_map(|(_, payload)| payload.parse().ok())
            .collect();
        assert!(sequence.windows(2).all(|w| w[0] < w[1]), "{topic}: in order, no duplicates");
    }
    println!(
        "stalled local subscriber: {} of {n} delivered, local_dropped = {dropped} ({} markers); upstream: all {n}",
        readings.len(),
        markers - 1
    );
    assert!(readings.len() < n, "the stalled subscriber fell behind (else this test proves nothing)");
    assert_eq!(
        dropped,
        (n - readings.len() + markers - 1) as u64,
        "every delivery the subscriber missed is counted: {counters:?}"
    );
}
