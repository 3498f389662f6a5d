//! Checks what arrived downstream against what a fleet says the broker acknowledged.
//!
//! `Verifier` is pure bookkeeping over `(topic, payload, arrival time)` so it can be unit-tested
//! without a network; `Subscriber` feeds it from a live MQTT subscription. `Subscriber` is also
//! the harness's one subscriber recorder (MQTT 3.1.1 or 5, clean or persistent session), which
//! the end-to-end tests, the gateway's tests and its benches use. A reading is
//! identified by `(device, seq)`, so the verifier needs no side channel to the fleet. Payloads
//! may be JSON or CBOR, told apart per message (`SensorReading::decode`). Latency is measured
//! in microseconds when the reading carries `ts_us`, else in milliseconds.
//!
//! **Invariant:** `missing` only counts readings the fleet reports as acknowledged; a reading
//! the broker never acknowledged may be lost without being a failure of the system under test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::fleet::FleetSummary;
use crate::mqtt::MqttVersion;
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

    /// The p50 and p99 latency, ms, of the distinct readings that arrived `arrivals`-th
    /// (from 0, in arrival order, as [`Verifier::unique`] counted them): a measurement window's
    /// readings are those between its two counts.
    pub fn latency_ms_of(&self, arrivals: std::ops::Range<u64>) -> (Option<f64>, Option<f64>) {
        let len = self.latencies_us.len();
        let at = |index: u64| usize::try_from(index).map_or(len, |index| index.min(len));
        let mut latencies =
            self.latencies_us[at(arrivals.start)..at(arrivals.end).max(at(arrivals.start))].to_vec();
        latencies.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        (percentile(&latencies, 0.50).map(ms), percentile(&latencies, 0.99).map(ms))
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

/// At most this many raw messages [`start_subscriber`] keeps; the verifier counts all.
pub const MAX_KEPT_MESSAGES: usize = 100_000;
/// How long a subscriber waits for the broker's SUBACK.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between reconnect attempts: a bounded back-off, not a wait.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Largest packet a subscriber accepts or sends.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Which MQTT session a subscriber uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Session {
    /// A clean session (MQTT 5: clean start): nothing survives a disconnect, and messages
    /// published while it reconnects are not seen.
    #[default]
    Clean,
    /// A persistent session under this client id: the broker queues QoS 1 messages while the
    /// subscriber is away (and Mosquitto persists them across its restarts) and delivers them
    /// when it is back. MQTT 5: clean start 0 with a session that never expires.
    Persistent(String),
}

/// Observes every message as it arrives, on the subscriber's task: for a bench that counts what
/// it needs without keeping the messages. It must be quick; it delays the next read.
pub type OnMessage = Arc<dyn Fn(&Message) + Send + Sync>;

/// How a [`Subscriber`] connects and what it keeps.
#[derive(Clone)]
pub struct SubscriberOptions {
    pub version: MqttVersion,
    pub session: Session,
    /// At most this many messages are kept for [`Subscriber::messages`]; all are counted.
    pub keep: usize,
    /// Called for every message, before it is recorded.
    pub on_message: Option<OnMessage>,
    /// Feed every message to the [`Verifier`] (which decodes it as a `SensorReading`); off for
    /// a bench whose payloads are not readings and whose subscriber's CPU is measured.
    pub verify: bool,
}

impl Default for SubscriberOptions {
    /// MQTT 3.1.1, a clean session, every message kept and verified.
    fn default() -> SubscriberOptions {
        SubscriberOptions {
            version: MqttVersion::V311,
            session: Session::Clean,
            keep: usize::MAX,
            on_message: None,
            verify: true,
        }
    }
}

/// One message as the subscriber saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 user properties, in order (always empty over 3.1.1).
    pub user_properties: Vec<(String, String)>,
}

/// A running QoS 1 subscription that records every message and feeds a [`Verifier`]. It
/// reconnects (and subscribes again) whenever the connection drops. Dropping it stops its task.
///
/// # Invariants
/// - [`Subscriber::start`] returns only after the broker granted the subscription (SUBACK), so
///   anything published afterwards is recorded (with a persistent session, also what is
///   published while it reconnects).
/// - Every message is recorded exactly as it arrived, duplicates included.
pub struct Subscriber {
    /// `HOST:PORT`, for messages.
    broker: String,
    recorded: Arc<Mutex<Recorded>>,
    count: watch::Receiver<u64>,
    _stop: DropGuard,
}

/// What the subscription task has recorded; locked only for short, non-async sections.
#[derive(Default)]
struct Recorded {
    verifier: Verifier,
    messages: Vec<Message>,
    /// The last connection error, for timeout messages.
    last_error: Option<String>,
    /// Successful CONNACKs.
    connects: u64,
}

/// Connects to `broker` (`HOST:PORT`), subscribes to `filter` at QoS 1 with a clean session
/// and returns once the broker granted the subscription; keeps the first
/// [`MAX_KEPT_MESSAGES`] messages.
pub async fn start_subscriber(broker: &str, filter: &str) -> anyhow::Result<Subscriber> {
    let (host, port) = crate::parse_broker(broker)?;
    let options = SubscriberOptions { keep: MAX_KEPT_MESSAGES, ..SubscriberOptions::default() };
    // The host goes to rumqttc as given, which resolves it (and tries each address) itself.
    Subscriber::start_at(host, port, filter, options).await
}

impl Subscriber {
    /// An MQTT 3.1.1 subscriber to `filter` at QoS 1 on `broker` with `session`, keeping every
    /// message; see [`start_with`](Self::start_with).
    pub async fn start(broker: SocketAddr, filter: &str, session: Session) -> anyhow::Result<Subscriber> {
        Subscriber::start_with(broker, filter, SubscriberOptions { session, ..SubscriberOptions::default() })
            .await
    }

    /// Connects to `broker`, subscribes to `filter` at QoS 1 and returns once the broker sent
    /// its SUBACK granting it.
    pub async fn start_with(
        broker: SocketAddr,
        filter: &str,
        options: SubscriberOptions,
    ) -> anyhow::Result<Subscriber> {
        Subscriber::start_at(broker.ip().to_string(), broker.port(), filter, options).await
    }

    async fn start_at(
        host: String,
        port: u16,
        filter: &str,
        options: SubscriberOptions,
    ) -> anyhow::Result<Subscriber> {
        let broker = format!("{host}:{port}");
        let client = SubscriberClient::new(host, port, &options);
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let (count_tx, count) = watch::channel(0);
        let (ready_tx, ready_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        let task = Task {
            filter: filter.to_owned(),
            recorded: Arc::clone(&recorded),
            count: count_tx,
            keep: options.keep,
            on_message: options.on_message,
            verify: options.verify,
        };
        tokio::spawn(task.run(client, ready_tx, cancel.clone()));
        let subscriber = Subscriber { broker, recorded, count, _stop: cancel.drop_guard() };
        match tokio::time::timeout(SUBACK_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(refused))) => Err(anyhow::anyhow!(refused)),
            Ok(Err(_)) => {
                anyhow::bail!("the subscription task for `{filter}` on {} ended", subscriber.broker)
            }
            Err(_) => anyhow::bail!(
                "no SUBACK for `{filter}` from {} within {SUBACK_TIMEOUT:?} (last error: {})",
                subscriber.broker,
                subscriber.lock().last_error.as_deref().unwrap_or("none")
            ),
        }
    }

    /// Messages recorded so far, duplicates included.
    pub fn count(&self) -> u64 {
        *self.count.borrow()
    }

    /// Waits until at least `n` messages were recorded.
    pub async fn wait_for_count(&mut self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let reached =
            tokio::time::timeout(timeout, self.count.wait_for(|&count| count >= n)).await.map(|r| r.is_ok());
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => anyhow::bail!("the subscription task ended after {} of {n} messages", self.count()),
            Err(_) => {
                let (connects, last_error) = {
                    let recorded = self.lock();
                    (recorded.connects, recorded.last_error.clone().unwrap_or_else(|| "none".to_owned()))
                };
                anyhow::bail!(
                    "timed out after {timeout:?} waiting for {n} messages at {}; {} arrived (subscriber connects: {connects}, last error: {last_error})",
                    self.broker,
                    self.count(),
                )
            }
        }
    }

    /// Waits until `predicate` holds for the kept messages; `what` names it in the error.
    pub async fn wait_for_messages(
        &mut self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&[Message]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.count.borrow_and_update();
            if predicate(&self.lock().messages) {
                return Ok(());
            }
            let changed = tokio::time::timeout_at(deadline, self.count.changed()).await;
            if !changed.is_ok_and(|changed| changed.is_ok()) {
                let recorded = self.lock();
                anyhow::bail!(
                    "no {what} within {timeout:?}: {} messages arrived (subscriber connects: {}, last error: {:?})",
                    recorded.messages.len(),
                    recorded.connects,
                    recorded.last_error
                );
            }
        }
    }

    /// Waits until at least `n` distinct readings (by device and seq) were recorded.
    pub async fn wait_for_unique(&mut self, n: u64, timeout: Duration) -> anyhow::Result<VerifyReport> {
        self.wait_for_report(None, timeout, |report| n.saturating_sub(report.unique))
            .await
            .with_context(|| format!("waiting for {n} distinct readings"))
    }

    /// Waits until every reading `expected` reports as acknowledged has arrived, and returns the
    /// report; on timeout the error carries the report.
    pub async fn wait_for_expected(
        &mut self,
        expected: &FleetSummary,
        timeout: Duration,
    ) -> anyhow::Result<VerifyReport> {
        self.wait_for_report(Some(expected), timeout, |report| report.missing)
            .await
            .context("waiting for every acknowledged reading")
    }

    /// Waits until `still_needed(report)` is 0 and returns that report. `still_needed` must be a
    /// lower bound on the messages that have to arrive before it can reach 0 (each message
    /// changes `unique` or `missing` by at most one). A report walks every reading, so it is
    /// computed again only once that many more messages arrived, not on every message.
    async fn wait_for_report(
        &mut self,
        expected: Option<&FleetSummary>,
        timeout: Duration,
        still_needed: impl Fn(&VerifyReport) -> u64,
    ) -> anyhow::Result<VerifyReport> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.count();
            let report = self.report(expected);
            let needed = still_needed(&report);
            if needed == 0 {
                return Ok(report);
            }
            let arrived =
                tokio::time::timeout_at(deadline, self.count.wait_for(|&count| count >= seen + needed))
                    .await
                    .is_ok_and(|waited| waited.is_ok());
            if !arrived {
                let report = self.report(expected);
                anyhow::bail!(
                    "still {} short after {timeout:?} ({} messages, subscriber connects: {}): {}",
                    still_needed(&report),
                    self.count(),
                    self.connects(),
                    serde_json::to_string(&report).unwrap_or_default()
                );
            }
        }
    }

    /// A copy of the verifier's current state.
    pub fn snapshot(&self) -> Verifier {
        self.lock().verifier.clone()
    }

    /// The verifier's report on what arrived, against `expected` when given.
    pub fn report(&self, expected: Option<&FleetSummary>) -> VerifyReport {
        self.lock().verifier.report(expected)
    }

    /// Distinct readings recorded so far.
    pub fn unique_count(&self) -> u64 {
        self.lock().verifier.unique()
    }

    /// See [`Verifier::latency_ms_of`].
    pub fn latency_ms_of(&self, arrivals: std::ops::Range<u64>) -> (Option<f64>, Option<f64>) {
        self.lock().verifier.latency_ms_of(arrivals)
    }

    /// The kept messages as `(topic, payload)`, in arrival order.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.lock().messages.iter().map(|m| (m.topic.clone(), m.payload.clone())).collect()
    }

    /// The kept messages with their MQTT 5 user properties, in arrival order.
    pub fn full_messages(&self) -> Vec<Message> {
        self.lock().messages.clone()
    }

    /// Successful connections so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.lock().connects
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // The task never panics while holding the lock; if it did, the data is still usable.
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A subscriber's rumqttc client and event loop, 3.1.1 or 5.
enum SubscriberClient {
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

/// What the subscription task learns from one poll, whichever the protocol version.
enum Polled {
    ConnAck,
    /// Whether the SUBACK granted the filter, and the packet for a refusal's message.
    SubAck(bool, String),
    Publish(Message),
    Other,
    Failed(String),
}

impl SubscriberClient {
    fn new(host: String, port: u16, options: &SubscriberOptions) -> SubscriberClient {
        let (client_id, clean) = match &options.session {
            Session::Clean => (crate::harness::unique_client_id("verify"), true),
            Session::Persistent(id) => (id.clone(), false),
        };
        match options.version {
            MqttVersion::V311 => {
                let mut mqtt = rumqttc::MqttOptions::new(client_id, host, port);
                mqtt.set_keep_alive(Duration::from_secs(30))
                    .set_clean_session(clean)
                    .set_max_packet_size(MAX_PACKET, MAX_PACKET);
                let (client, eventloop) = rumqttc::AsyncClient::new(mqtt, 64);
                SubscriberClient::V311(client, Box::new(eventloop))
            }
            MqttVersion::V5 => {
                let mut mqtt = rumqttc::v5::MqttOptions::new(client_id, host, port);
                mqtt.set_keep_alive(Duration::from_secs(30))
                    .set_clean_start(clean)
                    .set_max_packet_size(Some(MAX_PACKET as u32));
                if !clean {
                    mqtt.set_session_expiry_interval(Some(u32::MAX));
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(mqtt, 64);
                SubscriberClient::V5(client, Box::new(eventloop))
            }
        }
    }

    /// Asks for the subscription at QoS 1 (sent by the next polls).
    fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            SubscriberClient::V311(client, _) => {
                client.try_subscribe(filter, QoS::AtLeastOnce).map_err(|e| e.to_string())
            }
            SubscriberClient::V5(client, _) => client
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    async fn poll(&mut self) -> Polled {
        match self {
            SubscriberClient::V311(_, eventloop) => match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::ConnAck,
                Ok(Event::Incoming(Packet::SubAck(ack))) => Polled::SubAck(
                    ack.return_codes.iter().all(|code| matches!(code, SubscribeReasonCode::Success(_))),
                    format!("{ack:?}"),
                ),
                Ok(Event::Incoming(Packet::Publish(publish))) => Polled::Publish(Message {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                    user_properties: Vec::new(),
                }),
                Ok(_) => Polled::Other,
                Err(error) => Polled::Failed(error.to_string()),
            },
            SubscriberClient::V5(_, eventloop) => {
                use rumqttc::v5::Event as Event5;
                use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, SubscribeReasonCode as Code5};
                match eventloop.poll().await {
                    Ok(Event5::Incoming(Packet5::ConnAck(_))) => Polled::ConnAck,
                    Ok(Event5::Incoming(Packet5::SubAck(ack))) => Polled::SubAck(
                        ack.return_codes.iter().all(|code| matches!(code, Code5::Success(_))),
                        format!("{ack:?}"),
                    ),
                    Ok(Event5::Incoming(Packet5::Publish(publish))) => Polled::Publish(Message {
                        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                        payload: publish.payload.to_vec(),
                        user_properties: publish.properties.map(|p| p.user_properties).unwrap_or_default(),
                    }),
                    Ok(_) => Polled::Other,
                    Err(error) => Polled::Failed(error.to_string()),
                }
            }
        }
    }
}

/// The subscription task's state: what it records into and how.
struct Task {
    filter: String,
    recorded: Arc<Mutex<Recorded>>,
    count: watch::Sender<u64>,
    keep: usize,
    on_message: Option<OnMessage>,
    verify: bool,
}

impl Task {
    /// Polls the event loop and records messages until cancelled.
    async fn run(
        self,
        mut client: SubscriberClient,
        ready: oneshot::Sender<Result<(), String>>,
        cancel: CancellationToken,
    ) {
        let lock = || self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ready = Some(ready);
        loop {
            let polled = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                polled = client.poll() => polled,
            };
            match polled {
                Polled::ConnAck => {
                    lock().connects += 1;
                    // Subscribing again is harmless for a resumed session and needed for a new one.
                    if let Err(error) = client.subscribe(&self.filter) {
                        lock().last_error = Some(format!("subscribe request failed: {error}"));
                    }
                }
                Polled::SubAck(granted, ack) => {
                    if !granted {
                        warn!(filter = self.filter, ack, "subscription refused");
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(if granted {
                            Ok(())
                        } else {
                            Err(format!("the broker refused the subscription to `{}`: {ack}", self.filter))
                        });
                    }
                }
                Polled::Publish(message) => {
                    if let Some(on_message) = &self.on_message {
                        on_message(&message);
                    }
                    let now = crate::now_us();
                    {
                        let mut recorded = lock();
                        if self.verify {
                            recorded.verifier.record_at_us(&message.topic, &message.payload, now);
                        }
                        if recorded.messages.len() < self.keep {
                            recorded.messages.push(message);
                        }
                    }
                    self.count.send_modify(|count| *count += 1);
                }
                Polled::Other => {}
                Polled::Failed(error) => {
                    debug!(%error, "subscriber connection failed; retrying");
                    lock().last_error = Some(error);
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                    }
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
    fn latency_of_a_range_of_arrivals() {
        let mut verifier = Verifier::new();
        // Readings 1–10 took 500 ms (a fleet connecting), 11–110 took 1–100 ms.
        for seq in 1..=10 {
            verifier.record("t", &reading("a", seq, 1_000), 1_500);
        }
        for seq in 11..=110 {
            verifier.record("t", &reading("a", seq, 1_000), 1_000 + seq - 10);
        }
        assert_eq!(verifier.latency_ms_of(10..110), (Some(50.0), Some(99.0)));
        assert_eq!(verifier.latency_ms_of(0..110).1, Some(500.0));
        assert_eq!(verifier.latency_ms_of(105..500), (Some(98.0), Some(100.0)));
        assert_eq!(verifier.latency_ms_of(200..300), (None, None));
        // A window whose end was read before its start (never in the benches) is empty.
        let (start, end) = (50, 40);
        assert_eq!(verifier.latency_ms_of(start..end), (None, None));
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
