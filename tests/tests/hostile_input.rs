//! Hostile input the other hostile-client tests do not cover: invalid UTF-8 where MQTT demands
//! UTF-8 (a topic, a client id, a username). Each is refused (the connection closed, never
//! accepted) and the gateway goes on serving a well-behaved sensor.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// A 3.1.1 CONNECT with raw bytes for the client id and, if given, the username.
fn connect_raw(client_id: &[u8], username: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if username.is_some() { 0x82 } else { 0x02 });
    body.extend_from_slice(&[0, 30]);
    raw::put_binary(&mut body, client_id);
    if let Some(username) = username {
        raw::put_binary(&mut body, username);
    }
    raw::packet(0x10, &body)
}

/// A 3.1.1 QoS 1 PUBLISH with a raw topic.
fn publish_raw(topic: &[u8], packet_id: u16) -> Vec<u8> {
    let mut body = Vec::new();
    raw::put_binary(&mut body, topic);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(b"payload");
    raw::packet(0x32, &body)
}

/// Everything the gateway answers until it closes the connection.
async fn answer(addr: SocketAddr, packets: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for packet in packets {
        // The gateway may close before the last write: that is an answer too.
        if stream.write_all(packet).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway closed the connection within {WAIT:?}; it answered {answer:?}");
    answer
}

/// A well-behaved sensor still gets its PUBACK.
async fn still_serving(addr: SocketAddr, id: &str) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&raw::connect_v311(id, 30)).await.expect("CONNECT");
    let (kind, connack) = raw::read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((kind >> 4, connack), (2, vec![0, 0]), "accepted");
    stream.write_all(&raw::publish_v311("plant/ok", 1, 7, false, b"fine")).await.expect("PUBLISH");
    let (kind, puback) =
        tokio::time::timeout(WAIT, raw::read_packet(&mut stream)).await.expect("in time").expect("PUBACK");
    assert_eq!((kind >> 4, puback), (4, vec![0, 7]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_topic_a_client_id_or_a_username_is_refused_and_others_go_on() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewaySpec::new(data.path()).start().await.expect("starts");
    let addr = gateway.listen();

    // A topic with a byte that is never UTF-8: closed before any PUBACK.
    let got = answer(addr, &[raw::connect_v311("bad-topic", 30), publish_raw(b"plant/\xff", 1)]).await;
    assert_eq!(got, [0x20, 2, 0, 0], "a CONNACK, then no PUBACK: the connection is closed");
    still_serving(addr, "ok-1").await;

    // An overlong encoding and a lone surrogate in the client id: never accepted.
    for id in [&b"dev\xc0\xaf"[..], &b"dev\xed\xa0\x80"[..]] {
        let got = answer(addr, &[connect_raw(id, None)]).await;
        assert!(!got.starts_with(&[0x20, 2, 0, 0]), "an invalid client id {id:?} was accepted: {got:?}");
    }
    still_serving(addr, "ok-2").await;

    // A username that is not UTF-8.
    let got = answer(addr, &[connect_raw(b"user-bad", Some(b"op\xfe"))]).await;
    assert!(!got.starts_with(&[0x20, 2, 0, 0]), "an invalid username was accepted: {got:?}");
    still_serving(addr, "ok-3").await;

    gateway.terminate().await.expect("stops");
    let counters = gateway.final_counters().expect("counters");
    assert_eq!(
        counters.get("sensor_connects").copied(),
        Some(4),
        "bad-topic and the three ok ones: {counters:?}"
    );
    assert!(counters.get("protocol_errors").copied().unwrap_or(0) >= 1, "{counters:?}");
}
