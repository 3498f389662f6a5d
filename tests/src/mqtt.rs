//! The two MQTT ends of a test: a sensor that publishes and waits for every PUBACK, and a
//! subscriber at the upstream that records what arrived.
//!
//! The subscriber is the harness's recorder (`outpost_sim::verify::Subscriber`), re-exported:
//! it feeds `outpost_sim::verify::Verifier`, the same bookkeeping the simulators use, so fleet
//! runs are checked with `VerifyReport`s, and it can keep a persistent session
//! ([`Session::Persistent`]), which the broker keeps (and Mosquitto persists) across the
//! subscriber's and its own restarts.
//!
//! # Invariants
//! - [`Subscriber::start`] returns only after the broker granted the subscription (SUBACK), so
//!   anything published afterwards is recorded.
//! - Every message is recorded exactly as it arrived, duplicates included.
//! - The publishers return only once every publish was acknowledged.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
pub use outpost_sim::harness::unique_client_id;
pub use outpost_sim::verify::{Message, Session, Subscriber, SubscriberOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Largest packet the test publishers accept or send.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Publishes each payload to `topic` at QoS 1 from a fresh clean-session client, in order, and
/// returns once the broker acknowledged every one. Fails if the connection drops or the acks do
/// not all arrive within `timeout`.
pub async fn publish_qos1(
    broker: SocketAddr,
    client_id: &str,
    topic: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let events: Vec<(String, Vec<u8>)> =
        payloads.into_iter().map(|payload| (topic.to_owned(), payload)).collect();
    publish_each_qos1(broker, client_id, &events, timeout).await
}

/// Publishes each `(topic, payload)` at QoS 1, in order, from one fresh clean-session client,
/// and returns once the broker acknowledged every one: [`publish_qos1`] for more than one topic.
pub async fn publish_each_qos1(
    broker: SocketAddr,
    client_id: &str,
    events: &[(String, Vec<u8>)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let n = events.len();
    let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    // Room for every request at once, so queueing never blocks.
    let (client, mut eventloop) = AsyncClient::new(options, n + 8);
    for (topic, payload) in events {
        client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .context("cannot queue a publish")?;
    }
    let mut acked = 0;
    let all_acked = tokio::time::timeout(timeout, async {
        while acked < n {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(error) => {
                    anyhow::bail!("connection to {broker} failed after {acked} of {n} PUBACKs: {error}")
                }
            }
        }
        Ok(())
    })
    .await;
    match all_acked {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("only {acked} of {n} PUBACKs from {broker} within {timeout:?}"),
    }
    // A polite goodbye; the publishes are acknowledged either way.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    Ok(())
}
