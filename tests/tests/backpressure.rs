//! With the buffer's commits artificially slowed, publishers slow down; nothing acknowledged is
//! lost; the gateway's memory stays bounded.
//!
//! The gateway has no upstream, so every QoS 1 publish is acknowledged only once it is committed
//! to the buffer (`broker.ack = "after_commit"`, the default). `OUTPOST_FAULT_COMMIT_DELAY_MS`
//! makes each commit 200 ms slower and `buffer.commit_max_events` caps what one commit carries,
//! so the acknowledged rate has a hard ceiling. Ten publishers write as fast as their sockets
//! take it, with no window of their own: only the gateway can slow them, by not reading (TCP
//! backpressure). If it read everything into memory instead, its RSS would show it. A SIGKILL
//! under load and `outpost buffer stats` then show that every acknowledged publish was on disk.
//!
//! A control run without the fault shows that the ceiling comes from the slowed commits, not from
//! the publishers or the machine.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec, START_TIMEOUT, buffer_stats};
use outpost_e2e::process::rss_kib;
use outpost_e2e::raw;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The fault: every buffer commit takes this much longer.
const COMMIT_DELAY: Duration = Duration::from_millis(200);
/// `buffer.commit_max_events`: the most events one commit carries. Commits run one at a time.
const COMMIT_MAX_EVENTS: u64 = 200;
const PUBLISHERS: usize = 10;
/// 1 KiB payloads make "the gateway read the publishers' backlog into memory" visible in its
/// RSS.
const PAYLOAD_BYTES: usize = 1024;
/// Publishes written per `write_all`.
const WRITE_BATCH: usize = 8;
/// Each publisher's SO_SNDBUF (the kernel doubles it), so what sits in its socket does not
/// depend on the kernel's autotuning.
const SEND_BUFFER_BYTES: u32 = 64 * 1024;
/// How long the publishers publish in the faulted run.
const FAULTED_RUN: Duration = Duration::from_secs(5);
/// How long the publishers publish in the control run.
const CONTROL_RUN: Duration = Duration::from_secs(3);
/// How often the gateway's RSS is sampled during a run.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_secs(20);

/// Commits run one at a time and each takes at least `COMMIT_DELAY`, so in `elapsed` at most
/// `elapsed / COMMIT_DELAY + 1` of them finish (the `+ 1`: one may finish right at the end), each
/// releasing at most `COMMIT_MAX_EVENTS` PUBACKs. 5 s at 200 ms × 200 events: 5,200 (1,040/s).
fn ack_ceiling(elapsed: Duration) -> u64 {
    COMMIT_MAX_EVENTS * (elapsed.as_millis() as u64 / COMMIT_DELAY.as_millis() as u64 + 1)
}

/// What the gateway may hold in memory beyond its idle RSS and its buffer file's size. The file
/// term is there because redb keeps what it wrote cached, so RSS grows with the file (measured:
/// +11 MiB for a 9 MB file, +37 MiB for 36 MB, +51 MiB for 71 MB). The slack covers the accepted
/// but unsaved events (2 × 200 in the relay, 2 × 1,024 in the stage channels, about 1.1 KiB
/// each: under 3 MiB) and allocator overhead. A gateway that read what the publishers offer
/// instead of pushing back would exceed it within a second: unthrottled, they write over
/// 100 MB/s.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// The most publishes that can be written and not acknowledged at once, over all publishers,
/// when the gateway pushes back: what it holds (`2 × COMMIT_MAX_EVENTS` in the relay, two stage
/// channels, one publish in hand per connection) plus what the sockets hold, about 1 MiB per
/// connection (the publisher's 128 KiB send buffer and the gateway's autotuned receive buffer;
/// measured: 6,300–6,700 in all, ~400 per connection beyond the gateway's share).
fn outstanding_bound() -> u64 {
    let held = 2 * COMMIT_MAX_EVENTS + 2 * outpost::STAGE_CHANNEL_CAPACITY as u64 + PUBLISHERS as u64;
    let per_socket = (1024 * 1024 / PAYLOAD_BYTES) as u64;
    held + PUBLISHERS as u64 * per_socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowed_commits_slow_the_publishers_lose_nothing_acked_and_keep_memory_bounded() {
    let control = run(None, CONTROL_RUN).await;
    control.print("control (no fault)");
    let faulted = run(Some(COMMIT_DELAY), FAULTED_RUN).await;
    faulted.print("faulted (commits +200 ms)");

    for (name, outcome) in [("control", &control), ("faulted", &faulted)] {
        // Every acknowledged publish survived the SIGKILL (a resent one would count twice,
        // which is fine); nothing was stored that was not written.
        assert!(
            outcome.stored_events >= outcome.acked,
            "{name}: {} publishes were acknowledged but only {} are in the buffer after the crash",
            outcome.acked,
            outcome.stored_events
        );
        assert!(
            outcome.stored_events <= outcome.sent + (PUBLISHERS * WRITE_BATCH) as u64,
            "{name}: {} events stored, only {} written",
            outcome.stored_events,
            outcome.sent
        );
        assert!(
            outcome.rss_peak_kib <= outcome.rss_baseline_kib + outcome.file_bytes / 1024 + RSS_SLACK_KIB,
            "{name}: the gateway's RSS grew from {} KiB to {} KiB with a {} byte buffer file",
            outcome.rss_baseline_kib,
            outcome.rss_peak_kib,
            outcome.file_bytes
        );
    }

    // The slowed commits cap the acknowledged rate...
    let ceiling = ack_ceiling(faulted.elapsed);
    assert!(
        faulted.acked_at_stop <= ceiling,
        "{} publishes acknowledged in {:?}; slowed commits allow at most {ceiling}",
        faulted.acked_at_stop,
        faulted.elapsed
    );
    // ...and commits keep going back to back (measured: 81–85 % of the ceiling).
    assert!(
        faulted.acked_at_stop >= ceiling * 2 / 5,
        "only {} publishes acknowledged in {:?} (ceiling {ceiling}): commits stalled",
        faulted.acked_at_stop,
        faulted.elapsed
    );
    // The publishers slowed to that pace: they never got far ahead of their acknowledgements,
    // although they wrote without pause for the whole run.
    assert!(
        faulted.max_outstanding_total <= outstanding_bound(),
        "{} publishes were unacknowledged at once (bound {}): the gateway did not push back",
        faulted.max_outstanding_total,
        outstanding_bound()
    );
    assert!(
        faulted.sent <= faulted.acked + outstanding_bound(),
        "{} publishes written against {} acknowledged (bound {})",
        faulted.sent,
        faulted.acked,
        outstanding_bound()
    );
    // The ceiling is the fault's doing (measured: 6,200–11,000/s against 840–880/s).
    assert!(
        control.acked_per_sec() >= 3.0 * faulted.acked_per_sec(),
        "without the fault the gateway acknowledged {:.0}/s, with it {:.0}/s",
        control.acked_per_sec(),
        faulted.acked_per_sec()
    );
}

/// What one run measured.
struct Outcome {
    /// PUBACKs the publishers had read when they stopped publishing.
    acked_at_stop: u64,
    /// PUBACKs the publishers read until the gateway was killed.
    acked: u64,
    /// Publishes the publishers' sockets accepted.
    sent: u64,
    /// The most written-but-unacknowledged publishes of one publisher at once.
    max_outstanding: u64,
    /// The same over all publishers, sampled.
    max_outstanding_total: u64,
    /// From starting the publishers to stopping them.
    elapsed: Duration,
    rss_baseline_kib: u64,
    rss_peak_kib: u64,
    /// `outpost buffer stats` after the SIGKILL.
    stored_events: u64,
    file_bytes: u64,
}

impl Outcome {
    fn acked_per_sec(&self) -> f64 {
        self.acked_at_stop as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, name: &str) {
        println!(
            "{name}: {} acknowledged in {:.2?} ({:.0}/s), {} by the SIGKILL; {} written ({:.0}/s), \
             at most {} unacknowledged at once (one publisher: {}); gateway RSS baseline {} KiB, \
             peak {} KiB; the buffer after the SIGKILL: {} events, {} file bytes",
            self.acked_at_stop,
            self.elapsed,
            self.acked_per_sec(),
            self.acked,
            self.sent,
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.max_outstanding_total,
            self.max_outstanding,
            self.rss_baseline_kib,
            self.rss_peak_kib,
            self.stored_events,
            self.file_bytes,
        );
    }
}

/// Starts a gateway (with the commit fault when `commit_delay` is set), lets the publishers
/// publish for `duration`, SIGKILLs the gateway under load and reads its buffer.
async fn run(commit_delay: Option<Duration>, duration: Duration) -> Outcome {
    let data = tempfile::tempdir().expect("tempdir");
    let mut gateway = start_gateway(data.path(), commit_delay).await;
    let rss_baseline_kib = gateway.rss_kib().expect("the gateway's RSS");

    let stats: Vec<Arc<PublisherStats>> = (0..PUBLISHERS).map(|_| Arc::default()).collect();
    let mut publishers = Vec::new();
    for (i, stats) in stats.iter().enumerate() {
        publishers.push(connect_publisher(gateway.listen(), &format!("backpressure/{i}"), stats).await);
    }
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(gateway.pid(), stats.clone(), stop.clone()));
    let started = Instant::now();
    let writers: Vec<_> = publishers
        .into_iter()
        .zip(&stats)
        .enumerate()
        .map(|(i, (publisher, stats))| {
            tokio::spawn(write_until(
                publisher,
                format!("backpressure/{i}/data"),
                Arc::clone(stats),
                stop.clone(),
            ))
        })
        .collect();
    // The measurement window: the publishers publish for a fixed time.
    tokio::time::sleep_until(started + duration).await;
    stop.cancel();
    let elapsed = started.elapsed();
    let acked_at_stop = stats.iter().map(|s| s.acked.load(Ordering::Relaxed)).sum();
    let mut publishers = Vec::new();
    for writer in writers {
        publishers.push(writer.await.expect("a writer panicked"));
    }
    let (rss_peak_kib, max_outstanding_total) = sampler.await.expect("the sampler panicked");

    // The crash, while the pipeline is still full: the gateway gets no chance to flush.
    gateway.kill().expect("SIGKILL the gateway");
    for publisher in publishers {
        publisher.reader.await.expect("a reader panicked");
    }
    let errors: Vec<String> = stats.iter().filter_map(|s| s.error()).collect();
    assert!(errors.is_empty(), "publishers failed: {errors:?}\n{}", gateway.tail());
    let stats_json = buffer_stats(data.path()).expect("outpost buffer stats");
    let stored_events = stats_json["events"].as_u64().expect("`events` in the stats");
    let file_bytes = stats_json["file_bytes"].as_u64().unwrap_or(0);
    Outcome {
        acked_at_stop,
        acked: stats.iter().map(|s| s.acked.load(Ordering::Relaxed)).sum(),
        sent: stats.iter().map(|s| s.sent.load(Ordering::Relaxed)).sum(),
        max_outstanding: stats.iter().map(|s| s.max_outstanding.load(Ordering::Relaxed)).max().unwrap_or(0),
        max_outstanding_total,
        elapsed,
        rss_baseline_kib,
        rss_peak_kib,
        stored_events,
        file_bytes,
    }
}

/// Starts `outpost run` with no upstream and `commit_max_events = COMMIT_MAX_EVENTS`, and waits
/// for the readiness line (and the fault's warning, when the fault is set).
async fn start_gateway(data_dir: &Path, commit_delay: Option<Duration>) -> GatewayProcess {
    let mut spec = GatewaySpec::new(data_dir)
        .config_toml(format!("[buffer]\ncommit_max_events = {COMMIT_MAX_EVENTS}\n"));
    if let Some(delay) = commit_delay {
        spec = spec.env("OUTPOST_FAULT_COMMIT_DELAY_MS", delay.as_millis().to_string());
    }
    let gateway = spec.start().await.expect("the gateway starts");
    if commit_delay.is_some() {
        gateway.wait_for_message("fault injection", START_TIMEOUT).await.expect("the fault is active");
    }
    gateway
}

/// One publisher's books, shared with the test.
#[derive(Default)]
struct PublisherStats {
    /// PUBLISH packets the socket accepted (completed writes).
    sent: AtomicU64,
    /// PUBACKs read.
    acked: AtomicU64,
    /// The most publishes written and not yet acknowledged at once.
    max_outstanding: AtomicU64,
    error: Mutex<Option<String>>,
}

impl PublisherStats {
    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn fail(&self, error: String) {
        self.error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(error);
    }

    fn outstanding(&self) -> u64 {
        self.sent.load(Ordering::Relaxed).saturating_sub(self.acked.load(Ordering::Relaxed))
    }
}

/// A connected publisher.
struct Publisher {
    write: OwnedWriteHalf,
    /// Counts PUBACKs until the connection ends (the gateway is killed).
    reader: tokio::task::JoinHandle<()>,
}

/// Connects a raw MQTT 3.1.1 publisher (clean session) and returns once the gateway accepted it.
///
/// Raw rather than rumqttc: rumqttc flushes inside its event loop, so while TCP pushes back (the
/// situation under test) it stops reading PUBACKs and under-counts them, and its 5 s flush
/// timeout would end a connection that the gateway is right to slow down. Here a reader task
/// counts every PUBACK as it arrives, and the writer blocks exactly as long as the socket does.
async fn connect_publisher(broker: SocketAddr, client_id: &str, stats: &Arc<PublisherStats>) -> Publisher {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket.set_send_buffer_size(SEND_BUFFER_BYTES).expect("SO_SNDBUF");
    socket.set_nodelay(true).expect("TCP_NODELAY");
    let stream = socket.connect(broker).await.expect("connect to the gateway");
    let (mut read, mut write) = stream.into_split();
    write.write_all(&raw::connect_v311(client_id, 60)).await.expect("send CONNECT");
    let mut connack = [0_u8; 4];
    tokio::time::timeout(TIMEOUT, read.read_exact(&mut connack))
        .await
        .expect("a CONNACK in time")
        .expect("read the CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "the gateway accepts {client_id}");
    let reader = tokio::spawn(count_pubacks(read, Arc::clone(stats)));
    Publisher { write, reader }
}

/// Writes QoS 1 publishes as fast as the socket takes them until `stop`; returns the
/// publisher with its connection still open.
async fn write_until(
    mut publisher: Publisher,
    topic: String,
    stats: Arc<PublisherStats>,
    stop: CancellationToken,
) -> Publisher {
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let mut packet_id: u16 = 0;
    let mut batch = Vec::new();
    loop {
        batch.clear();
        for _ in 0..WRITE_BATCH {
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            encode_publish(&mut batch, &topic, packet_id, &payload);
        }
        let written = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            written = publisher.write.write_all(&batch) => written,
        };
        if let Err(error) = written {
            stats.fail(format!("{topic}: write failed: {error}"));
            break;
        }
        stats.sent.fetch_add(WRITE_BATCH as u64, Ordering::Relaxed);
        let outstanding = stats.outstanding();
        stats.max_outstanding.fetch_max(outstanding, Ordering::Relaxed);
        // Packet ids wrap at 65,535: more unacknowledged publishes would reuse ids in flight.
        if outstanding > 60_000 {
            stats.fail(format!("{topic}: {outstanding} publishes unacknowledged; nothing pushed back"));
            break;
        }
    }
    publisher
}

/// Counts PUBACKs (the only packet a publisher without subscriptions receives) until the
/// connection ends.
async fn count_pubacks(mut read: OwnedReadHalf, stats: Arc<PublisherStats>) {
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut partial = Vec::new();
    loop {
        let n = match read.read(&mut buffer).await {
            // The gateway was killed (or closed the connection; the writer reports that).
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        partial.extend_from_slice(&buffer[..n]);
        let whole = partial.len() / 4 * 4;
        for packet in partial[..whole].chunks_exact(4) {
            if packet[..2] != [0x40, 0x02] {
                stats.fail(format!("expected a PUBACK, got {packet:02x?}"));
                return;
            }
        }
        stats.acked.fetch_add(whole as u64 / 4, Ordering::Relaxed);
        partial.drain(..whole);
    }
}

/// Appends an MQTT 3.1.1 PUBLISH at QoS 1.
fn encode_publish(out: &mut Vec<u8>, topic: &str, packet_id: u16, payload: &[u8]) {
    out.push(0x32);
    raw::put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    raw::put_str(out, topic);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Samples the gateway's RSS and the publishers' unacknowledged total until `stop`; returns
/// both maxima.
async fn sample(pid: u32, stats: Vec<Arc<PublisherStats>>, stop: CancellationToken) -> (u64, u64) {
    let (mut rss_peak, mut outstanding_peak) = (0, 0);
    let mut every = tokio::time::interval(RSS_SAMPLE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = every.tick() => {
                rss_peak = rss_peak.max(rss_kib(pid).unwrap_or(0));
                outstanding_peak = outstanding_peak.max(stats.iter().map(|s| s.outstanding()).sum());
            }
        }
    }
    (rss_peak.max(rss_kib(pid).unwrap_or(0)), outstanding_peak)
}
