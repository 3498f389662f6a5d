//! Checks what arrived downstream against what a fleet says the broker acknowledged.
//!
//! `Verifier` is pure bookkeeping over `(topic, payload, arrival time)` so it can be unit-tested
//! without a network; `Subscriber` feeds it from a live MQTT subscription. A reading is
//! identified by `(device, seq)`, so the verifier needs no side channel to the fleet. Payloads
//! may be JSON or CBOR, told apart per message (`SensorReading::decode`). Latency is measured
//! in microseconds when the reading carries `ts_us`, else in milliseconds.
//!
//! **Invariant:** `missing` only counts readings the fleet reports as acknowledged; a reading
//! the broker never acknowledged may be lost without being a failure of the system under test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::fleet::FleetSummary;
use crate::payload::SensorReading;

/// At most this many missing seqs are listed per device in a report.
const MISSING_LIST_CAP: usize = 20;

/// Counts received readings by `(device, seq)`.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    received: u64,
    malformed: u64,
    duplicates: u64,
    reordered: u64,
    unique: u64,
    devices: HashMap<String, DeviceSeen>,
    /// Latency of each reading's first arrival, in µs.
    latencies_us: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
struct DeviceSeen {
    seqs: HashSet<u64>,
    max_seq: u64,
}

/// The outcome of a verification.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Every message recorded, malformed ones included.
    pub received: u64,
    /// Distinct `(device, seq)` readings.
    pub unique: u64,
    /// Readings that arrived again after their first arrival.
    pub duplicates: u64,
    /// First arrivals whose seq is below the highest seq already seen for their device.
    pub reordered: u64,
    /// Acknowledged readings (per the expected summary) that never arrived.
    pub missing: u64,
    /// The lowest missing seqs per device, at most 20 each; devices with none are left out.
    pub missing_by_device: BTreeMap<String, Vec<u64>>,
    /// Messages that are not a `SensorReading`.
    pub malformed: u64,
    /// Latency (arrival time minus `ts_ms`) percentiles over first arrivals, in ms.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub latency_ms_max: Option<f64>,
}

impl Verifier {
    /// An empty verifier.
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// Records one received message. The topic is not checked: a gateway may rewrite topics,
    /// and the reading itself names its device.
    pub fn record(&mut self, topic: &str, payload: &[u8], received_at_ms: u64) {
        self.record_at_us(topic, payload, received_at_ms.saturating_mul(1000));
    }

    /// Like [`Verifier::record`], with the arrival time in µs since the Unix epoch.
    pub fn record_at_us(&mut self, _topic: &str, payload: &[u8], received_at_us: u64) {
        self.received += 1;
        let Ok(reading) = SensorReading::decode(payload) else {
            self.malformed += 1;
            return;
        };
        let sent_at_us = if reading.ts_us > 0 { reading.ts_us } else { reading.ts_ms.saturating_mul(1000) };
        let device = self.devices.entry(reading.device).or_default();
        if !device.seqs.insert(reading.seq) {
            self.duplicates += 1;
            return;
        }
        if reading.seq < device.max_seq {
            self.reordered += 1;
        }
        device.max_seq = device.max_seq.max(reading.seq);
        self.unique += 1;
        self.latencies_us.push(received_at_us.saturating_sub(sent_at_us));
    }

    /// Distinct `(device, seq)` readings recorded so far.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Messages recorded so far, malformed ones included.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the reading `(device, seq)` has arrived.
    pub fn has(&self, device: &str, seq: u64) -> bool {
        self.devices.get(device).is_some_and(|seen| seen.seqs.contains(&seq))
    }

    /// Summarises what arrived and, given the fleet's summary, what is missing.
    pub fn report(&self, expected: Option<&FleetSummary>) -> VerifyReport {
        let mut missing = 0;
        let mut missing_by_device = BTreeMap::new();
        for (device, summary) in expected.map(|fleet| &fleet.per_device).into_iter().flatten() {
            let mut device_missing = summary.acked_seqs.iter().filter(|&&seq| !self.has(device, seq));
            let listed: Vec<u64> = device_missing.by_ref().take(MISSING_LIST_CAP).copied().collect();
            let count = listed.len() + device_missing.count();
            if count > 0 {
                missing += count as u64;
                missing_by_device.insert(device.clone(), listed);
            }
        }

        let mut latencies = self.latencies_us.clone();
        latencies.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        VerifyReport {
            received: self.received,
            unique: self.unique,
            duplicates: self.duplicates,
            reordered: self.reordered,
            missing,
            missing_by_device,
            malformed: self.malformed,
            latency_ms_p50: percentile(&latencies, 0.50).map(ms),
            latency_ms_p99: percentile(&latencies, 0.99).map(ms),
            latency_ms_max: latencies.last().copied().map(ms),
        }
    }
}

impl VerifyReport {
    /// The counts as a small text table, plus the missing seqs per device.
    pub fn table(&self) -> String {
        let latency = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"));
        let mut out = format!(
            "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}\n",
            "received",
            "unique",
            "duplicate",
            "reordered",
            "missing",
            "malformed",
            "p50 ms",
            "p99 ms",
            "max ms"
        );
        out.push_str(&format!(
            "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}\n",
            self.received,
            self.unique,
            self.duplicates,
            self.reordered,
            self.missing,
            self.malformed,
            latency(self.latency_ms_p50),
            latency(self.latency_ms_p99),
            latency(self.latency_ms_max)
        ));
        for (device, seqs) in &self.missing_by_device {
            out.push_str(&format!("missing from {device}: {seqs:?}\n"));
        }
        out
    }
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], fraction: f64) -> Option<u64> {
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// At most this many raw messages are kept for `received_messages`; the verifier counts all.
pub const MAX_KEPT_MESSAGES: usize = 100_000;
/// How long `start_subscriber` waits for the broker's SUBACK.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between reconnect attempts.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// A running QoS 1 subscription that records every message. Dropping it stops its task.
pub struct Subscriber {
    received: Arc<Mutex<Received>>,
    count: watch::Receiver<u64>,
    _stop: DropGuard,
}

/// What the subscription task has recorded; locked only for short, non-async sections.
#[derive(Default)]
struct Received {
    verifier: Verifier,
    messages: Vec<(String, Vec<u8>)>,
    last_error: Option<String>,
}

/// Distinguishes the client ids of subscribers in one process.
static SUBSCRIBER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Connects to `broker` (`HOST:PORT`), subscribes to `filter` at QoS 1 and returns once the
/// broker granted the subscription. Reconnects (and resubscribes) if the connection drops;
/// messages published while it is down are not seen.
pub async fn start_subscriber(broker: &str, filter: &str) -> anyhow::Result<Subscriber> {
    let (host, port) = crate::parse_broker(broker)?;
    let client_id = format!(
        "outpost-sim-verify-{}-{}",
        std::process::id(),
        SUBSCRIBER_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(16 * 1024 * 1024, 1024 * 1024);
    let (client, eventloop) = AsyncClient::new(options, 64);

    let received = Arc::new(Mutex::new(Received::default()));
    let (count_tx, count_rx) = watch::channel(0);
    let (ready_tx, ready_rx) = oneshot::channel();
    let cancel = CancellationToken::new();
    tokio::spawn(run_subscription(
        client,
        eventloop,
        filter.to_string(),
        Arc::clone(&received),
        count_tx,
        ready_tx,
        cancel.clone(),
    ));
    let subscriber = Subscriber { received, count: count_rx, _stop: cancel.drop_guard() };

    match tokio::time::timeout(READY_TIMEOUT, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(subscriber),
        Ok(Ok(Err(refused))) => Err(anyhow::anyhow!(refused)),
        Ok(Err(_)) => anyhow::bail!("the subscription task for '{filter}' on {broker} ended"),
        Err(_) => {
            let last_error = subscriber.lock().last_error.clone().unwrap_or_else(|| "none".to_string());
            anyhow::bail!(
                "no SUBACK for '{filter}' from {broker} within {READY_TIMEOUT:?} (last error: {last_error})"
            )
        }
    }
}

impl Subscriber {
    /// Waits until at least `n_received` messages have been recorded.
    pub async fn wait_for(&mut self, n_received: u64, timeout: Duration) -> anyhow::Result<()> {
        let waited = tokio::time::timeout(timeout, self.count.wait_for(|&count| count >= n_received))
            .await
            .map(|outcome| outcome.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => anyhow::bail!(
                "the subscription task ended after {} of {n_received} messages",
                self.received_count()
            ),
            Err(_) => anyhow::bail!(
                "timed out after {timeout:?} waiting for {n_received} messages; {} arrived",
                self.received_count()
            ),
        }
    }

    /// Waits until every reading `expected` reports as acknowledged has arrived, and returns the
    /// report; on timeout, the error includes the report.
    pub async fn wait_for_expected(
        &mut self,
        expected: &FleetSummary,
        timeout: Duration,
    ) -> anyhow::Result<VerifyReport> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seen = self.received_count();
            let report = self.snapshot().report(Some(expected));
            if report.missing == 0 {
                return Ok(report);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.wait_for(seen + 1, remaining).await.is_err() {
                let report = self.snapshot().report(Some(expected));
                let json = serde_json::to_string(&report).unwrap_or_default();
                anyhow::bail!(
                    "{} acknowledged readings still missing after {timeout:?}: {json}",
                    report.missing
                );
            }
        }
    }

    /// Messages recorded so far.
    pub fn received_count(&self) -> u64 {
        *self.count.borrow()
    }

    /// A copy of the verifier's current state.
    pub fn snapshot(&self) -> Verifier {
        self.lock().verifier.clone()
    }

    /// The current report against `expected`, computed without copying the verifier.
    pub fn report(&self, expected: Option<&FleetSummary>) -> VerifyReport {
        self.lock().verifier.report(expected)
    }

    /// Distinct readings recorded so far.
    pub fn unique_count(&self) -> u64 {
        self.lock().verifier.unique()
    }

    /// The first `MAX_KEPT_MESSAGES` messages as `(topic, payload)`, in arrival order.
    pub fn received_messages(&self) -> Vec<(String, Vec<u8>)> {
        self.lock().messages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        // The task never panics while holding the lock; if it did, the data is still usable.
        self.received.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The subscription task: polls the event loop and records messages until cancelled.
async fn run_subscription(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    filter: String,
    received: Arc<Mutex<Received>>,
    count: watch::Sender<u64>,
    ready: oneshot::Sender<Result<(), String>>,
    cancel: CancellationToken,
) {
    let mut ready = Some(ready);
    loop {
        let polled = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Sessions are clean, so every connection needs the subscription again.
                if let Err(error) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                    warn!(%error, filter, "subscribe request failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted =
                    ack.return_codes.iter().all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                let outcome = if granted {
                    Ok(())
                } else {
                    Err(format!("the broker refused the subscription to '{filter}'"))
                };
                if !granted {
                    warn!(filter, "subscription refused");
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(outcome);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let now = crate::now_us();
                let total = {
                    let mut received = received.lock().unwrap_or_else(PoisonError::into_inner);
                    received.verifier.record_at_us(&publish.topic, &publish.payload, now);
                    if received.messages.len() < MAX_KEPT_MESSAGES {
                        received.messages.push((publish.topic, publish.payload.to_vec()));
                    }
                    received.verifier.received()
                };
                count.send_replace(total);
            }
            Ok(_) => {}
            Err(error) => {
                debug!(%error, "subscriber connection failed; retrying");
                received.lock().unwrap_or_else(PoisonError::into_inner).last_error = Some(error.to_string());
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(RECONNECT_DELAY) => {}
                }
            }
        }
    }
}

/// Subscribes, records for `duration` (or until `cancel`) and returns what arrived.
pub async fn verify_for(
    broker: &str,
    filter: &str,
    duration: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<Verifier> {
    let subscriber = start_subscriber(broker, filter)
        .await
        .with_context(|| format!("cannot subscribe to '{filter}' on {broker}"))?;
    tokio::select! {
        () = cancel.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
    Ok(subscriber.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::DeviceSummary;

    fn reading(device: &str, seq: u64, ts_ms: u64) -> Vec<u8> {
        SensorReading {
            device: device.to_string(),
            seq,
            ts_ms,
            ts_us: 0,
            metric: "temp".to_string(),
            value: 1.0,
            pad: String::new(),
        }
        .to_json()
    }

    fn record_all(verifier: &mut Verifier, readings: &[(&str, u64)]) {
        for &(device, seq) in readings {
            verifier.record("sensors/x/temp", &reading(device, seq, 1_000), 1_010);
        }
    }

    fn expected(devices: &[(&str, &[u64])]) -> FleetSummary {
        let mut fleet = FleetSummary::default();
        for &(device, acked) in devices {
            let summary = DeviceSummary {
                sent: acked.len() as u64,
                acked: acked.len() as u64,
                refused: 0,
                acked_seqs: acked.to_vec(),
            };
            fleet.sent += summary.sent;
            fleet.acked += summary.acked;
            fleet.per_device.insert(device.to_string(), summary);
        }
        fleet
    }

    #[test]
    fn counts_duplicates_and_reordering() {
        let mut verifier = Verifier::new();
        record_all(&mut verifier, &[("a", 1), ("a", 3), ("a", 2), ("a", 3), ("b", 1), ("a", 4), ("a", 2)]);
        let report = verifier.report(None);
        assert_eq!(report.received, 7);
        assert_eq!(report.unique, 5);
        assert_eq!(report.duplicates, 2);
        assert_eq!(report.reordered, 1, "only the first late arrival of a:2 counts");
        assert_eq!(report.missing, 0);
        assert_eq!(report.malformed, 0);
    }

    #[test]
    fn counts_only_acked_readings_as_missing() {
        let mut verifier = Verifier::new();
        record_all(&mut verifier, &[("a", 1), ("a", 3), ("b", 2)]);
        let report = verifier.report(Some(&expected(&[("a", &[1, 2, 3, 4]), ("b", &[2]), ("c", &[1])])));
        assert_eq!(report.missing, 3);
        let want: BTreeMap<String, Vec<u64>> =
            [("a".to_string(), vec![2, 4]), ("c".to_string(), vec![1])].into_iter().collect();
        assert_eq!(report.missing_by_device, want);
    }

    #[test]
    fn caps_the_missing_list_but_not_the_count() {
        let acked: Vec<u64> = (1..=100).collect();
        let report = Verifier::new().report(Some(&expected(&[("a", &acked)])));
        assert_eq!(report.missing, 100);
        assert_eq!(report.missing_by_device.get("a").map(Vec::len), Some(MISSING_LIST_CAP));
    }

    #[test]
    fn counts_malformed_messages() {
        let mut verifier = Verifier::new();
        verifier.record("status/x", b"online", 0);
        verifier.record("sensors/a/temp", &reading("a", 1, 0), 0);
        let report = verifier.report(None);
        assert_eq!((report.received, report.unique, report.malformed), (2, 1, 1));
    }

    #[test]
    fn computes_latency_percentiles_over_first_arrivals() {
        let mut verifier = Verifier::new();
        for seq in 1..=100 {
            verifier.record("t", &reading("a", seq, 1_000), 1_000 + seq);
        }
        verifier.record("t", &reading("a", 1, 1_000), 99_999);
        let report = verifier.report(None);
        assert_eq!(report.latency_ms_p50, Some(50.0));
        assert_eq!(report.latency_ms_p99, Some(99.0));
        assert_eq!(report.latency_ms_max, Some(100.0));
        assert_eq!(Verifier::new().report(None).latency_ms_p50, None);
    }

    #[test]
    fn measures_microseconds_and_reads_cbor() {
        let mut verifier = Verifier::new();
        let reading = SensorReading {
            device: "a".to_string(),
            seq: 1,
            ts_ms: 1_000,
            ts_us: 1_000_250,
            metric: "temp".to_string(),
            value: 1.0,
            pad: String::new(),
        };
        verifier.record_at_us("t", &reading.to_cbor(), 1_001_750);
        let report = verifier.report(None);
        assert_eq!((report.unique, report.malformed), (1, 0));
        assert_eq!(report.latency_ms_p50, Some(1.5));
    }
}
