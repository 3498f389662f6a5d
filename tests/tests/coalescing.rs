//! The runtime thread's interrupt moderation (`wakeup_coalescing`, 10 ms by default) against
//! the real binary, upstream Debian's mosquitto: sensors publishing on their own clock turn
//! waiting on (`outpost_wakeup_coalescing_active` 1), clients that publish once per PUBACK
//! turn it off again, since waiting would cap each at one publish per interval, and every
//! publish of both kinds is acknowledged and delivered.
//!
//! The mode is read from `/metrics`, polled with a deadline; nothing waits on the clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outpost_e2e::gateway::GatewaySpec;
use outpost_e2e::http::sample;
use outpost_e2e::mqtt::{Session, Subscriber, unique_client_id};
use outpost_e2e::upstream::Mosquitto;
use outpost_e2e::{free_addr, require_mosquitto};
use outpost_sim::payload::SensorReading;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Long enough for a few probes (the first 1 s after start, then backing off) on a loaded CI
/// machine.
const TIMEOUT: Duration = Duration::from_secs(40);
/// The open-loop fleet: 10 sensors × 100 readings a second, well above the ~330/s under which
/// the gateway never waits.
const SENSORS: usize = 10;
const READING_EVERY: Duration = Duration::from_millis(10);
/// Closed-loop clients: each has one publish outstanding at a time.
const CLOSED_LOOP_CLIENTS: usize = 4;

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    acked: AtomicU64,
}

/// A client that publishes QoS 1 readings until `stop`: every `every` whatever the PUBACKs do
/// (open loop), or, without `every`, the next as soon as the last is acknowledged (closed
/// loop: `inflight` 1). Returns once every publish it made was acknowledged.
fn publisher(
    broker: SocketAddr,
    every: Option<Duration>,
    counts: Arc<Counts>,
    stop: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let id = unique_client_id("coalescing");
        let mut options = MqttOptions::new(&id, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true);
        if every.is_none() {
            options.set_inflight(1);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let topic = format!("sensors/{id}/temp");
        let device = id.clone();
        let publishing = {
            let (counts, stop) = (Arc::clone(&counts), stop.clone());
            tokio::spawn(async move {
                let mut ticks = every.map(tokio::time::interval);
                let mut seq = 0u64;
                loop {
                    if let Some(ticks) = &mut ticks {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            _ = ticks.tick() => {}
                        }
                    } else if stop.is_cancelled() {
                        break;
                    }
                    seq += 1;
                    let reading = SensorReading {
                        device: device.clone(),
                        seq,
                        ts_ms: 0,
                        ts_us: 0,
                        metric: "temp".to_owned(),
                        value: 20.0,
                        pad: String::new(),
                    };
                    // Waits for room in the request queue, so a closed-loop client stays one ahead.
                    if client.publish(&topic, QoS::AtLeastOnce, false, reading.to_json()).await.is_err() {
                        break;
                    }
                    counts.published.fetch_add(1, Ordering::Relaxed);
                }
                seq
            })
        };
        tokio::pin!(publishing);
        let (mut acked, mut published) = (0u64, None);
        while published != Some(acked) {
            tokio::select! {
                done = &mut publishing, if published.is_none() => {
                    published = Some(done?);
                }
                polled = tokio::time::timeout(TIMEOUT, eventloop.poll()) => match polled {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked += 1;
                        counts.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => anyhow::bail!("{id}: the connection failed after {acked} PUBACKs: {error}"),
                    Err(_) => anyhow::bail!("{id}: no packet within {TIMEOUT:?} after {acked} PUBACKs"),
                },
            }
        }
        Ok(())
    })
}

async fn mode(http: SocketAddr, waiting: bool, what: &str) {
    let wanted = if waiting { 1.0 } else { 0.0 };
    outpost_e2e::http::scrape_until(http, what, TIMEOUT, |s| {
        sample(s, "outpost_wakeup_coalescing_active", &[]) == Some(wanted)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_on_their_own_clock_get_waits_and_a_client_waiting_for_each_puback_does_not() {
    if !require_mosquitto() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut subscriber =
        Subscriber::start(upstream.addr(), "sensors/#", Session::Clean).await.expect("subscribe upstream");
    let data = tempfile::tempdir().expect("tempdir");
    let http = free_addr();
    let gateway = GatewaySpec::new(data.path())
        .upstream(upstream.url())
        .config_toml(format!("[http]\nlisten = \"{http}\"\n"))
        .start()
        .await
        .expect("the gateway starts");
    mode(http, false, "no waiting before anything was published").await;

    let fleet_stop = CancellationToken::new();
    let fleet_counts = Arc::new(Counts::default());
    let fleet: Vec<_> = (0..SENSORS)
        .map(|_| {
            publisher(gateway.listen(), Some(READING_EVERY), Arc::clone(&fleet_counts), fleet_stop.clone())
        })
        .collect();
    mode(http, true, "waiting on under an open-loop fleet").await;

    // Clients that each publish once per PUBACK join the fleet: without waiting they publish
    // many times faster, which the next probe sees.
    let closed_stop = CancellationToken::new();
    let closed_counts = Arc::new(Counts::default());
    let closed: Vec<_> = (0..CLOSED_LOOP_CLIENTS)
        .map(|_| publisher(gateway.listen(), None, Arc::clone(&closed_counts), closed_stop.clone()))
        .collect();
    mode(http, false, "waiting off while closed-loop clients publish").await;

    closed_stop.cancel();
    fleet_stop.cancel();
    for client in fleet.into_iter().chain(closed) {
        client.await.expect("a publisher panicked").unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    }
    let acked = fleet_counts.acked.load(Ordering::Relaxed) + closed_counts.acked.load(Ordering::Relaxed);
    println!(
        "fleet: {} acknowledged; closed-loop clients: {} acknowledged",
        fleet_counts.acked.load(Ordering::Relaxed),
        closed_counts.acked.load(Ordering::Relaxed)
    );
    subscriber.wait_for_unique(acked, TIMEOUT).await.unwrap_or_else(|e| {
        panic!("not every acknowledged publish arrived upstream: {e:#}\n{}", gateway.tail())
    });
}
