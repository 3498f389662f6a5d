//! A full disk: the buffer's file system runs out of space while a sensor publishes, then
//! space comes back. The gateway must keep running and count the failed commits; the sensor's
//! PUBACKs stop while nothing can be made safe (backpressure, not loss), and once space is
//! back every published event is stored — exactly, none lost, none counted away.
//!
//! Needs root to mount a small tmpfs (CI runs as root; elsewhere it says so and returns).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outpost::buffer::Store;
use outpost::config::GatewayConfig;
use outpost::metrics::Metrics;
use outpost_sim::harness::{free_port, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::{Tmpfs, can_mount};

mod support;

/// Publishes `n` QoS 1 messages of `size` bytes in the background; `acked` counts PUBACKs.
fn publish(port: u16, n: usize, size: usize, acked: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let mut opts = MqttOptions::new("disk-full-sensor", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    tokio::spawn(async move {
        let sender = tokio::spawn(async move {
            for i in 0..n {
                // A pad unlike the previous message's: the buffer writes a payload as its
                // difference from the previous one (format 10), and a repeated pad would
                // shrink the events to a few bytes each and never fill the disk.
                let pad: String = (0..size.saturating_sub(24))
                    .map(|j| char::from(b'a' + ((i * 31 + j * 7 + (i * j) % 11) % 26) as u8))
                    .collect();
                let payload = format!("{{\"seq\":{i},\"pad\":\"{pad}\"}}");
                client
                    .publish("sensors/disk/temp", QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("queue publish");
            }
            client
        });
        while acked.load(Ordering::Relaxed) < n as u64 {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("sensor connection") {
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(sender.await);
    })
}

fn config(data: &Path) -> GatewayConfig {
    let mut config = GatewayConfig { data_dir: data.to_owned(), ..Default::default() };
    config.broker.listen = format!("127.0.0.1:{}", free_port().expect("a free port")).parse().expect("addr");
    config.buffer.commit_max_events = std::num::NonZeroUsize::new(200).expect("non-zero");
    config
}

/// A data dir on a fresh 1 MiB tmpfs (logs on), or `None` where mounting is not possible.
fn small_data_dir() -> Option<(tempfile::TempDir, PathBuf, Tmpfs)> {
    outpost::telemetry::init(outpost::config::LogFormat::Text, "warn");
    if !can_mount() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let fs = Tmpfs::mount(&data, "1m");
    Some((dir, data, fs))
}

#[tokio::test(flavor = "current_thread")]
async fn full_disk_slows_the_sensor_and_loses_nothing() {
    let Some((_dir, data, fs)) = small_data_dir() else { return };
    let config = config(&data);
    let port = config.broker.listen.port();
    let gateway = outpost::Gateway::start(config).await.expect("gateway starts");
    let counters = gateway.metrics().counters();

    // ~4 MB of events into a 1 MiB file system, with no upstream: everything must go to disk.
    let n = 20_000;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = publish(port, n, 200, Arc::clone(&acked));
    wait_until("a commit failed for lack of space", Duration::from_secs(60), || {
        Metrics::get(&counters.commit_failures) > 0
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let failures = Metrics::get(&counters.commit_failures);
    let acked_while_full = acked.load(Ordering::Relaxed);
    let committed_while_full = Metrics::get(&counters.committed);
    assert!(acked_while_full < n as u64, "PUBACKs must stop while nothing can be committed");
    assert!(
        acked_while_full <= committed_while_full,
        "acknowledged {acked_while_full} but only {committed_while_full} committed (no upstream)"
    );

    // Space comes back: the store reopens the file (redb refuses all work after an I/O error
    // until then), the retried commits succeed, and the held PUBACKs go out.
    fs.resize("256m");
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("every publish is acknowledged once space is back")
        .expect("publisher task");
    assert!(gateway.shutdown().await, "clean shutdown after the disk recovered");

    let (store, _) = Store::open(&data).expect("reopen the buffer");
    let stored = store.total().events;
    eprintln!(
        "published {n}, acked while full {acked_while_full}, stored {stored}, commit failures while full {failures}"
    );
    assert_eq!(stored, n as u64, "every published event is stored");
}
