//! A documented limit (ARCHITECTURE.md, "Known limits"): rumqttd's router, which Outpost uses
//! for local fan-out, skips a local subscriber ahead when it falls behind its ring, so that
//! subscriber loses deliveries. What Outpost guarantees around it, and this test checks: the
//! upstream path is unaffected — every acknowledged event arrives upstream while a local
//! subscriber has stopped reading — and the stalled subscriber still gets the newest message.

use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::mqtt::{Session, Subscriber, publish_qos1};
use outpost_e2e::raw;
use outpost_e2e::require_mosquitto;
use outpost_e2e::upstream::Mosquitto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2_500;
const PAYLOAD: usize = 1_000;
const TIMEOUT: Duration = Duration::from_secs(60);
const MARKER: &str = "sensors/marker";

/// Connects a QoS 0 subscriber to `sensors/#` with a small receive buffer, then stops reading.
async fn stalled_subscriber(gateway: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut stream = socket.connect(gateway).await.expect("connect");
    stream.write_all(&raw::connect_v311("stalled/dashboard", 60)).await.expect("CONNECT");
    let mut subscribe = vec![0, 1];
    raw::put_str(&mut subscribe, "sensors/#");
    subscribe.push(0);
    stream.write_all(&raw::packet(0x82, &subscribe)).await.expect("SUBSCRIBE");
    let (connack, body) = raw::read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((connack, body), (0x20, vec![0, 0]), "connection accepted");
    let (suback, _) = raw::read_packet(&mut stream).await.expect("SUBACK");
    assert_eq!(suback, 0x90);
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_subscriber_does_not_hold_up_or_lose_upstream_events() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut upstream_sub = Subscriber::start(upstream.addr(), "#", Session::Clean).await.expect("subscribe");
    let data = tempfile::tempdir().expect("tempdir");
    // A ring of 2 × 16 KiB per filter against 10 MB of publishes: the stalled reader must fall
    // behind it, whatever the kernel's socket buffers absorb.
    let mut gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml("[broker]\nmax_payload = \"2KiB\"\nring_segment_size = \"16KiB\"\nring_segments = 1\n")
        .start()
        .await
        .expect("start the gateway");
    let mut stalled = stalled_subscriber(gateway.listen()).await;

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
    let n = (PUBLISHERS * PER_PUBLISHER) as u64;
    upstream_sub
        .wait_for_count(n, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("every event reaches the upstream: {e:#}\n{}", gateway.tail()));

    // Now the dashboard reads again: it gets the newest message, after fewer than all of the
    // others (the router skipped it ahead).
    publish_qos1(gateway.listen(), "marker", MARKER, [b"end".to_vec()], TIMEOUT).await.expect("marker");
    let mut before_marker = 0u64;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let (first, body) =
                raw::read_packet(&mut stalled).await.expect("the stalled subscriber is still connected");
            if first >> 4 != 3 {
                continue;
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            if &body[2..2 + topic_len] == MARKER.as_bytes() {
                break;
            }
            before_marker += 1;
        }
    })
    .await
    .expect("the marker reaches the stalled subscriber");
    println!(
        "stalled local subscriber: {before_marker} of {n} delivered before the marker; upstream: all {n}"
    );
    assert!(
        before_marker < n,
        "the router delivered everything to a stalled subscriber; if rumqttd gained flow control, \
         update ARCHITECTURE.md's known limits and this test"
    );
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
}
