//! A fleet of simulated sensors, one MQTT connection each, seeded and rate-limited.
//!
//! The fleet's `FleetSummary` is the ground truth the verifier checks a run against, so its one
//! invariant is: **a reading is counted as acknowledged only when the broker acknowledged it**
//! (PUBACK for QoS 1, PUBCOMP for QoS 2; for QoS 0, when rumqttc wrote it to the socket).
//!
//! rumqttc does not return a packet id from `publish()`, so acks are matched by order: each
//! sensor is one task that both hands readings to rumqttc and polls its event loop, and it keeps
//! the sequence numbers it handed over in a FIFO. Each `Outgoing::Publish(pkid)` pops the oldest
//! one and files it under `pkid`; `Incoming::PubAck(pkid)` then acknowledges it. When an
//! established connection fails, rumqttc moves everything queued or in flight to its pending
//! list and, because sessions are clean, drops it on reconnect; the sensor therefore forgets
//! those readings too (they stay unacknowledged), after handling the events rumqttc buffered
//! before the failure. The event-loop future is never dropped while the task runs, so no event
//! is lost between a publish and its bookkeeping.
//!
//! Sensors speak MQTT 3.1.1 or 5, over TCP or TLS, through `mqtt::Publisher` and
//! `mqtt::Connection`, which turn either rumqttc client's events into the few a sensor needs;
//! the loop below is the same for both versions. An MQTT 5 ack with a failure reason code is a
//! refusal, never an acknowledgement. A connection failure that rustls reported (the broker's
//! certificate does not verify, the broker refused our client certificate) ends the fleet with
//! that error instead of retrying: the same settings would fail again.
//!
//! The same bookkeeping measures each acknowledgement's latency: from the moment rumqttc
//! reports the publish written and flushed (`Outgoing::Publish`) to the moment the sensor task
//! sees its PUBACK (PUBCOMP for QoS 2). Queueing inside the fleet before the write is therefore
//! not counted; the sensor task's own scheduling delay is. Latencies go into one shared
//! log-bucket histogram (`latency`), never into a list.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::latency::{AtomicHistogram, Histogram};
use crate::mqtt::{
    AckKind, ClientEvent, ClientOptions, Connection, ConnectionFailure, MqttVersion, Publisher, TlsOptions,
};
use crate::payload::{PayloadFormat, SensorReading};

/// What a fleet does and where it sends it.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The broker address, `HOST:PORT`.
    pub broker: String,
    /// The MQTT version every sensor speaks.
    pub mqtt_version: MqttVersion,
    /// If set, sensors connect over TLS, verifying the broker's certificate against `HOST`.
    pub tls: Option<TlsOptions>,
    /// How many sensors (and MQTT connections) to run.
    pub sensors: usize,
    /// Readings per second per sensor.
    pub rate_per_sensor: f64,
    /// Stop each sensor after this many readings were handed to its MQTT client.
    pub count_per_sensor: Option<u64>,
    /// Stop publishing after this long.
    pub duration: Option<Duration>,
    /// The QoS of every publish.
    pub qos: QoS,
    /// The topic of each reading; `{id}` becomes the device id and `{metric}` the metric.
    pub topic_template: String,
    /// The metric name written into each reading and topic.
    pub metric: String,
    /// Client ids (and device ids) are this prefix plus a 1-based, 4-digit index.
    pub client_prefix: String,
    /// The target JSON payload size in bytes, reached by padding.
    pub payload_size: usize,
    /// Sensor `i` draws its values from a generator seeded with `seed + i`.
    pub seed: u64,
    /// How readings are encoded.
    pub format: PayloadFormat,
    /// How each sensor's values evolve.
    pub values: ValueModel,
    /// MQTT username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// If set, every sensor closes its connection and reconnects after about this long (±50 %,
    /// seeded), again and again; readings not yet acknowledged then are dropped uncounted.
    pub churn: Option<Duration>,
    /// Closed loop: if set, a sensor publishes whenever fewer than this many of its readings
    /// are unacknowledged, as fast as the broker acknowledges them, and `rate_per_sensor` is
    /// ignored. For measuring a broker's saturation throughput.
    pub max_outstanding: Option<usize>,
}

/// How a sensor's values evolve from one reading to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueModel {
    /// Always the sensor's starting value.
    Constant,
    /// The previous value plus uniform noise in ±0.5.
    #[default]
    RandomWalk,
    /// A sine of amplitude 5 and period 60 s (phase per sensor) plus noise in ±0.2.
    SineNoise,
    /// A random walk with, in 1 % of readings, a spike 50 above it.
    Spikes,
    /// A random walk that freezes for good at a seeded point between readings 50 and 200.
    Stuck,
    /// Sensor `i` uses the `i % 5`-th of the models above.
    Mixed,
}

impl ValueModel {
    /// The concrete model of sensor `index`.
    fn for_sensor(self, index: usize) -> ValueModel {
        const ALL: [ValueModel; 5] = [
            ValueModel::Constant,
            ValueModel::RandomWalk,
            ValueModel::SineNoise,
            ValueModel::Spikes,
            ValueModel::Stuck,
        ];
        match self {
            ValueModel::Mixed => ALL[index % ALL.len()],
            model => model,
        }
    }
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            broker: "127.0.0.1:1883".to_string(),
            mqtt_version: MqttVersion::V311,
            tls: None,
            sensors: 1,
            rate_per_sensor: 1.0,
            count_per_sensor: None,
            duration: None,
            qos: QoS::AtLeastOnce,
            topic_template: "sensors/{id}/{metric}".to_string(),
            metric: "temp".to_string(),
            client_prefix: "sim-".to_string(),
            payload_size: 200,
            seed: 1,
            format: PayloadFormat::Json,
            values: ValueModel::RandomWalk,
            credentials: None,
            churn: None,
            max_outstanding: None,
        }
    }
}

/// The highest rate a sensor supports; the publish interval must stay above zero.
const MAX_RATE_PER_SENSOR: f64 = 100_000.0;

impl FleetConfig {
    /// Checks the fields that rumqttc, rumqttd or tokio would otherwise reject late (or panic on).
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::parse_broker(&self.broker).context("invalid `broker`")?;
        if !(self.rate_per_sensor > 0.0 && self.rate_per_sensor <= MAX_RATE_PER_SENSOR) {
            anyhow::bail!(
                "`rate_per_sensor` must be above 0 and at most {MAX_RATE_PER_SENSOR}, got {}",
                self.rate_per_sensor
            );
        }
        if self.payload_size > MAX_PAYLOAD_SIZE {
            anyhow::bail!(
                "`payload_size` must be at most {MAX_PAYLOAD_SIZE} bytes, got {}",
                self.payload_size
            );
        }
        // rumqttd refuses such client ids, and a second attempt with one panics its listener.
        if let Some(bad) = self.client_prefix.chars().find(|c| matches!(c, '/' | '+' | '#' | '$')) {
            anyhow::bail!(
                "`client_prefix` '{}' contains '{bad}', which brokers refuse in client ids",
                self.client_prefix
            );
        }
        if let Some(window) = self.max_outstanding.filter(|window| !(1..=REQUEST_CAPACITY).contains(window)) {
            anyhow::bail!("`max_outstanding` must be between 1 and {REQUEST_CAPACITY}, got {window}");
        }
        let topic = self.topic_for("x");
        if topic.is_empty() || topic.contains(['+', '#']) {
            anyhow::bail!(
                "`topic_template` '{}' must give a non-empty topic without '+' or '#'",
                self.topic_template
            );
        }
        Ok(())
    }

    /// The device (and client) id of sensor `index` (0-based).
    pub fn device_id(&self, index: usize) -> String {
        format!("{}{:04}", self.client_prefix, index + 1)
    }

    /// The topic a device publishes to.
    pub fn topic_for(&self, device: &str) -> String {
        self.topic_template.replace("{id}", device).replace("{metric}", &self.metric)
    }
}

/// What a fleet sent and what the broker acknowledged.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct FleetSummary {
    /// Readings handed to the MQTT clients.
    pub sent: u64,
    /// Readings the broker acknowledged.
    pub acked: u64,
    /// Readings the broker refused (MQTT 5 reason code ≥ 0x80); never counted as acknowledged.
    #[serde(default)]
    pub refused: u64,
    /// The same, per device id.
    pub per_device: BTreeMap<String, DeviceSummary>,
    /// Acknowledgement latency over the run (publish written → PUBACK, or PUBCOMP for QoS 2),
    /// in ms: median, 99th percentile and maximum; `None` without acknowledgements (always for
    /// QoS 0). Percentiles are within 1.6 % (`latency` module).
    #[serde(default)]
    pub ack_latency_ms_p50: Option<f64>,
    #[serde(default)]
    pub ack_latency_ms_p99: Option<f64>,
    #[serde(default)]
    pub ack_latency_ms_max: Option<f64>,
}

/// What one sensor sent and what the broker acknowledged.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct DeviceSummary {
    /// Readings handed to the MQTT client (seqs 1..=sent).
    pub sent: u64,
    /// Readings the broker acknowledged.
    pub acked: u64,
    /// Readings the broker refused (MQTT 5 reason code ≥ 0x80).
    #[serde(default)]
    pub refused: u64,
    /// The acknowledged seqs, sorted ascending.
    pub acked_seqs: Vec<u64>,
}

/// Live counters for a running fleet, for progress output and measurement windows.
#[derive(Debug, Default)]
pub struct FleetProgress {
    sent: AtomicU64,
    /// Payload bytes of the readings handed to the MQTT clients.
    sent_payload_bytes: AtomicU64,
    acked: AtomicU64,
    /// Sensors connected now (CONNACK seen, connection not lost since).
    connected: AtomicU64,
    /// Acknowledgement latencies in µs (QoS 1 and 2 only).
    ack_latency: AtomicHistogram,
}

impl FleetProgress {
    /// Readings handed to the MQTT clients so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Payload bytes of the readings handed to the MQTT clients so far: a reading is at least
    /// `payload_size` long, longer when its fields alone exceed it.
    pub fn sent_payload_bytes(&self) -> u64 {
        self.sent_payload_bytes.load(Ordering::Relaxed)
    }

    /// Readings acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Sensors connected now: a measurement that should not see the fleet connect waits
    /// until this reaches the fleet's size.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// The acknowledgement latencies so far; the difference of two snapshots
    /// ([`Histogram::since`]) covers the time between them.
    pub fn ack_latency(&self) -> Histogram {
        self.ack_latency.snapshot()
    }
}

/// Runs a fleet until every sensor reached its count, the duration elapsed or `cancel` fires.
pub async fn run_fleet(cfg: FleetConfig, cancel: CancellationToken) -> anyhow::Result<FleetSummary> {
    run_fleet_with_progress(cfg, cancel, Arc::new(FleetProgress::default())).await
}

/// Like [`run_fleet`], updating `progress` as readings are sent and acknowledged.
/// The summary's latencies are what `progress` recorded during the run, so fleets that run at
/// the same time should not share one.
pub async fn run_fleet_with_progress(
    cfg: FleetConfig,
    cancel: CancellationToken,
    progress: Arc<FleetProgress>,
) -> anyhow::Result<FleetSummary> {
    run_fleet_inner(cfg, cancel, progress, None).await
}

/// Like [`run_fleet_with_progress`], but publishing stops when `stop_publishing` fires (or
/// `duration` elapses, or the count is reached), and each sensor then stays connected,
/// taking its acknowledgements and keeping its connection alive, until `cancel` fires: a
/// measurement can end after the last reading arrived and before the fleet disconnects. On
/// `cancel` the connections are dropped without DISCONNECT.
pub async fn run_fleet_held(
    cfg: FleetConfig,
    cancel: CancellationToken,
    progress: Arc<FleetProgress>,
    stop_publishing: CancellationToken,
) -> anyhow::Result<FleetSummary> {
    run_fleet_inner(cfg, cancel, progress, Some(stop_publishing)).await
}

async fn run_fleet_inner(
    cfg: FleetConfig,
    cancel: CancellationToken,
    progress: Arc<FleetProgress>,
    hold: Option<CancellationToken>,
) -> anyhow::Result<FleetSummary> {
    cfg.validate()?;
    let (host, port) = crate::parse_broker(&cfg.broker)?;
    let tls = cfg.tls.as_ref().map(TlsOptions::client_config).transpose().context("invalid TLS settings")?;
    let cfg = Arc::new(cfg);
    let latency_before = progress.ack_latency();
    let start = Instant::now();
    let mut sensors = JoinSet::new();
    for index in 0..cfg.sensors {
        let sensor = Sensor::new(&cfg, index, Arc::clone(&progress));
        let options = ClientOptions {
            version: cfg.mqtt_version,
            client_id: sensor.device.clone(),
            host: host.clone(),
            port,
            credentials: cfg.credentials.clone(),
            tls: tls.clone(),
            keep_alive: KEEP_ALIVE,
            max_packet_size: MAX_PACKET_SIZE,
            request_capacity: REQUEST_CAPACITY,
            max_inflight: MAX_INFLIGHT,
        };
        sensors.spawn(sensor.run(options, Arc::clone(&cfg), start, cancel.clone(), hold.clone()));
    }
    let mut summary = FleetSummary::default();
    while let Some(joined) = sensors.join_next().await {
        let (device, device_summary) = match joined.context("a sensor task panicked").and_then(|ran| ran) {
            Ok(ran) => ran,
            Err(error) => {
                // The other sensors would fail the same way; stop them rather than wait.
                sensors.shutdown().await;
                return Err(error);
            }
        };
        summary.sent += device_summary.sent;
        summary.acked += device_summary.acked;
        summary.refused += device_summary.refused;
        summary.per_device.insert(device, device_summary);
    }
    let latency = progress.ack_latency().since(&latency_before);
    summary.ack_latency_ms_p50 = latency.percentile_ms(0.50);
    summary.ack_latency_ms_p99 = latency.percentile_ms(0.99);
    summary.ack_latency_ms_max = latency.max_ms();
    Ok(summary)
}

/// The keep-alive interval each sensor announces.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Publishes a sensor keeps in flight at most (rumqttc's MQTT 3.1.1 default; an MQTT 5 broker's
/// receive maximum may lower it).
const MAX_INFLIGHT: u16 = 100;
/// How long a sensor waits for outstanding acks after its last publish.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long a sensor waits for its DISCONNECT to be written.
const DISCONNECT_WAIT: Duration = Duration::from_secs(1);
/// Reconnect backoff: first delay, and the cap it doubles up to.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Readings a sensor may queue in rumqttc while disconnected or with a full in-flight window;
/// a tick that finds the queue full skips its reading (the seq is not used).
const REQUEST_CAPACITY: usize = 1_000;
/// rumqttc's maximum packet size, both ways.
const MAX_PACKET_SIZE: usize = 1024 * 1024;
/// The largest payload that fits in a packet with room for any reasonable topic.
const MAX_PAYLOAD_SIZE: usize = MAX_PACKET_SIZE - 64 * 1024;

/// One simulated sensor: its reading generator and its ack bookkeeping.
struct Sensor {
    /// The 0-based index in the fleet.
    index: usize,
    device: String,
    topic: String,
    metric: String,
    qos: QoS,
    payload_size: usize,
    format: PayloadFormat,
    model: ValueModel,
    /// For `ValueModel::Stuck`: the seq from which the value no longer changes.
    stuck_from: u64,
    /// For `ValueModel::SineNoise`: the sensor's phase, in radians.
    phase: f64,
    /// When the fleet started, for time-based models.
    started: std::time::Instant,
    rng: StdRng,
    value: f64,
    /// The seq of the next reading.
    next_seq: u64,
    /// Seqs handed to rumqttc whose `Outgoing::Publish` has not been seen yet, oldest first.
    submitted: VecDeque<u64>,
    /// Seqs written on the current connection and awaiting their ack, with when they were
    /// written, by packet id.
    inflight: HashMap<u16, (u64, std::time::Instant)>,
    summary: DeviceSummary,
    progress: Arc<FleetProgress>,
}

/// Why a sensor's event-loop wait ended.
enum Wake {
    Polled(Result<ClientEvent, ConnectionFailure>),
    BackoffOver,
    Churn,
    Stop,
}

impl Sensor {
    fn new(cfg: &FleetConfig, index: usize, progress: Arc<FleetProgress>) -> Sensor {
        let device = cfg.device_id(index);
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(index as u64));
        let value = 20.0 + rng.random_range(-5.0..5.0);
        let stuck_from = rng.random_range(50..=200);
        let phase = rng.random_range(0.0..std::f64::consts::TAU);
        Sensor {
            index,
            topic: cfg.topic_for(&device),
            device,
            metric: cfg.metric.clone(),
            qos: cfg.qos,
            payload_size: cfg.payload_size,
            format: cfg.format,
            model: cfg.values.for_sensor(index),
            stuck_from,
            phase,
            started: std::time::Instant::now(),
            rng,
            value,
            next_seq: 1,
            submitted: VecDeque::new(),
            inflight: HashMap::new(),
            summary: DeviceSummary::default(),
            progress,
        }
    }

    /// Publishes and polls until done; fails only if rustls rejected the connection.
    async fn run(
        mut self,
        options: ClientOptions,
        cfg: Arc<FleetConfig>,
        start: Instant,
        cancel: CancellationToken,
        hold: Option<CancellationToken>,
    ) -> anyhow::Result<(String, DeviceSummary)> {
        let (mut client, mut connection) = options.connect();

        // Spread the sensors' ticks evenly over one period.
        let period = Duration::from_secs_f64(1.0 / cfg.rate_per_sensor).max(Duration::from_micros(1));
        let offset = period.mul_f64(self.index as f64 / cfg.sensors.max(1) as f64);
        let mut ticker = tokio::time::interval_at(start + offset, period);
        // A load generator must hold its average rate: ticks missed while the machine was busy
        // are made up at once instead of silently lowering the offered load.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let publish_until = cfg.duration.map(|duration| start + duration);

        let mut publishing = cfg.count_per_sensor != Some(0);
        let mut ack_deadline = Instant::now() + ACK_WAIT;
        let mut connected = false;
        let mut backoff: Option<Duration> = None;
        let mut next_backoff = BACKOFF_MIN;
        let mut churn_at = cfg.churn.map(|every| Instant::now() + self.churn_delay(every));

        loop {
            if !publishing && self.outstanding() == 0 && hold.is_none() {
                break;
            }
            let wake = {
                let backoff_now = backoff.take();
                let next = async {
                    match backoff_now {
                        Some(delay) => {
                            tokio::time::sleep(delay).await;
                            Wake::BackoffOver
                        }
                        None => Wake::Polled(connection.poll().await),
                    }
                };
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => break Wake::Stop,
                        () = sleep_until(publish_until), if publishing => {
                            publishing = false;
                            ack_deadline = Instant::now() + ACK_WAIT;
                            if self.outstanding() == 0 && hold.is_none() {
                                break Wake::Stop;
                            }
                        }
                        () = cancelled_or_never(hold.as_ref()), if publishing => {
                            publishing = false;
                        }
                        // A held sensor waits for its acks as long as it is held.
                        () = tokio::time::sleep_until(ack_deadline), if !publishing && hold.is_none() => break Wake::Stop,
                        () = sleep_until(churn_at), if churn_at.is_some() => break Wake::Churn,
                        wake = &mut next => break wake,
                        _ = ticker.tick(), if publishing && cfg.max_outstanding.is_none() => {
                            self.publish_next(&client);
                            if cfg.count_per_sensor.is_some_and(|count| self.summary.sent >= count) {
                                publishing = false;
                                ack_deadline = Instant::now() + ACK_WAIT;
                            }
                        }
                        // Closed loop: ready whenever the window has room. It closes after at
                        // most `max_outstanding` publishes, so the task then waits on its acks.
                        () = std::future::ready(()), if publishing
                            && cfg.max_outstanding.is_some_and(|window| self.outstanding() < window) => {
                            self.publish_next(&client);
                            if cfg.count_per_sensor.is_some_and(|count| self.summary.sent >= count) {
                                publishing = false;
                                ack_deadline = Instant::now() + ACK_WAIT;
                            }
                        }
                    }
                }
            };
            match wake {
                Wake::Stop => break,
                Wake::Churn => {
                    debug!(device = %self.device, "churn: reconnecting");
                    if connected {
                        self.disconnect(&client, &mut connection).await;
                        self.progress.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.on_connection_lost(&mut connection);
                    (client, connection) = options.connect();
                    connected = false;
                    next_backoff = BACKOFF_MIN;
                    churn_at = cfg.churn.map(|every| Instant::now() + self.churn_delay(every));
                }
                Wake::BackoffOver => {}
                Wake::Polled(Ok(event)) => {
                    if event == ClientEvent::Connected {
                        debug!(device = %self.device, "connected");
                        if !connected {
                            self.progress.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        connected = true;
                        next_backoff = BACKOFF_MIN;
                    }
                    self.on_event(event, true);
                }
                Wake::Polled(Err(ConnectionFailure { message, tls_rejected: true })) => {
                    anyhow::bail!(
                        "sensor {} cannot connect to {} over TLS: {message} (check the CA file, \
                         the client certificate and that the broker's certificate names {host})",
                        self.device,
                        cfg.broker,
                        host = options.host,
                    );
                }
                Wake::Polled(Err(ConnectionFailure { message: error, tls_rejected: false })) => {
                    if connected {
                        warn!(device = %self.device, %error, "connection lost; reconnecting");
                        self.progress.connected.fetch_sub(1, Ordering::Relaxed);
                        connected = false;
                        self.on_connection_lost(&mut connection);
                    } else {
                        debug!(device = %self.device, %error, "connect failed; retrying");
                    }
                    backoff = Some(next_backoff);
                    next_backoff = (next_backoff * 2).min(BACKOFF_MAX);
                }
            }
        }

        if connected && !cancel.is_cancelled() {
            self.disconnect(&client, &mut connection).await;
        }
        if connected {
            self.progress.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.summary.acked_seqs.sort_unstable();
        Ok((self.device, self.summary))
    }

    /// Sends a DISCONNECT and polls until it is written, the connection fails or time runs out;
    /// acks that arrive meanwhile still count.
    async fn disconnect(&mut self, client: &Publisher, connection: &mut Connection) {
        if client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
            loop {
                match connection.poll().await {
                    Ok(ClientEvent::DisconnectWritten) | Err(_) => break,
                    Ok(event) => self.on_event(event, true),
                }
            }
        })
        .await;
    }

    /// A seeded delay of `every` ± 50 % until the next churn.
    fn churn_delay(&mut self, every: Duration) -> Duration {
        every.mul_f64(self.rng.random_range(0.5..1.5)).max(Duration::from_millis(1))
    }

    /// Readings handed to rumqttc that are neither acknowledged nor known to be lost.
    fn outstanding(&self) -> usize {
        self.submitted.len() + self.inflight.len()
    }

    /// Generates the next reading and hands it to rumqttc, unless its request queue is full.
    fn publish_next(&mut self, client: &Publisher) {
        let seq = self.next_seq;
        let (state, value) = self.next_value(seq);
        let ts_us = crate::now_us();
        let mut reading = SensorReading {
            device: self.device.clone(),
            seq,
            ts_ms: ts_us / 1000,
            ts_us,
            metric: self.metric.clone(),
            value,
            pad: String::new(),
        };
        reading.pad_to_format(self.payload_size, self.format);
        let payload = reading.encode(self.format);
        let payload_len = payload.len() as u64;
        match client.try_publish(&self.topic, self.qos, payload) {
            Ok(()) => {
                self.value = state;
                self.next_seq += 1;
                self.submitted.push_back(seq);
                self.summary.sent += 1;
                self.progress.sent.fetch_add(1, Ordering::Relaxed);
                self.progress.sent_payload_bytes.fetch_add(payload_len, Ordering::Relaxed);
            }
            Err(error) => {
                debug!(device = %self.device, %error, "request queue full; reading skipped");
            }
        }
    }

    /// The model's next state and the value to publish for reading `seq` (they differ only for
    /// a spike, which does not move the walk).
    fn next_value(&mut self, seq: u64) -> (f64, f64) {
        let walk = self.value + self.rng.random_range(-0.5..0.5);
        match self.model {
            ValueModel::Constant => (self.value, self.value),
            ValueModel::RandomWalk | ValueModel::Mixed => (walk, walk),
            ValueModel::SineNoise => {
                let t = self.started.elapsed().as_secs_f64();
                let sine = 5.0 * (std::f64::consts::TAU * t / 60.0 + self.phase).sin();
                (self.value, self.value + sine + self.rng.random_range(-0.2..0.2))
            }
            ValueModel::Spikes => {
                let spike = self.rng.random_bool(0.01);
                (walk, if spike { walk + 50.0 } else { walk })
            }
            ValueModel::Stuck if seq >= self.stuck_from => (self.value, self.value),
            ValueModel::Stuck => (walk, walk),
        }
    }

    /// Updates the ack bookkeeping for one event. `written` is false for an `Outgoing::Publish`
    /// whose connection failed before the packet was flushed.
    fn on_event(&mut self, event: ClientEvent, written: bool) {
        match event {
            ClientEvent::PublishWritten(pkid) => {
                let Some(seq) = self.submitted.pop_front() else {
                    warn!(device = %self.device, pkid, "publish written that was never submitted");
                    return;
                };
                if !written {
                    return;
                }
                if self.qos == QoS::AtMostOnce {
                    self.acknowledge(seq);
                } else if let Some((replaced, _)) =
                    self.inflight.insert(pkid, (seq, std::time::Instant::now()))
                {
                    debug!(device = %self.device, pkid, replaced, "packet id reused before its ack");
                }
            }
            ClientEvent::Ack { pkid, kind, accepted } => match (self.qos, kind) {
                (QoS::AtLeastOnce, AckKind::PubAck) | (QoS::ExactlyOnce, AckKind::PubComp) => {
                    self.on_ack(pkid, accepted);
                }
                // A refused PUBREC ends the QoS 2 exchange: no PUBCOMP follows.
                (QoS::ExactlyOnce, AckKind::PubRec) if !accepted => self.on_ack(pkid, false),
                _ => {}
            },
            ClientEvent::Connected | ClientEvent::DisconnectWritten | ClientEvent::Other => {}
        }
    }

    /// The final answer to the publish with `pkid`: acknowledged, or refused by the broker.
    fn on_ack(&mut self, pkid: u16, accepted: bool) {
        match self.inflight.remove(&pkid) {
            Some((seq, written)) if accepted => {
                let latency_us = u64::try_from(written.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.progress.ack_latency.record(latency_us);
                self.acknowledge(seq);
            }
            Some((seq, _)) => {
                debug!(device = %self.device, pkid, seq, "the broker refused the reading");
                self.summary.refused += 1;
            }
            None => debug!(device = %self.device, pkid, "ack for an unknown packet id"),
        }
    }

    fn acknowledge(&mut self, seq: u64) {
        self.summary.acked += 1;
        self.summary.acked_seqs.push(seq);
        self.progress.acked.fetch_add(1, Ordering::Relaxed);
    }

    /// Called when an established connection failed. rumqttc has already moved every queued and
    /// in-flight publish to its pending list, which the clean-session reconnect clears.
    fn on_connection_lost(&mut self, connection: &mut Connection) {
        // Acks read before the failure still count; a publish whose flush failed does not.
        for event in connection.take_buffered() {
            self.on_event(event, false);
        }
        let lost = self.outstanding();
        if lost > 0 {
            debug!(device = %self.device, lost, "unacknowledged readings dropped with the session");
        }
        self.submitted.clear();
        self.inflight.clear();
    }
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits until `token` fires, or forever if there is none.
async fn cancelled_or_never(token: Option<&CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert!(FleetConfig::default().validate().is_ok());
    }

    #[test]
    fn rejects_bad_config() {
        let bad = [
            FleetConfig { rate_per_sensor: 0.0, ..FleetConfig::default() },
            FleetConfig { rate_per_sensor: f64::NAN, ..FleetConfig::default() },
            FleetConfig { client_prefix: "a/b".to_string(), ..FleetConfig::default() },
            FleetConfig { topic_template: "sensors/#".to_string(), ..FleetConfig::default() },
            FleetConfig { broker: "nowhere".to_string(), ..FleetConfig::default() },
            FleetConfig { max_outstanding: Some(0), ..FleetConfig::default() },
            FleetConfig { max_outstanding: Some(REQUEST_CAPACITY + 1), ..FleetConfig::default() },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn names_devices_and_topics() {
        let cfg = FleetConfig::default();
        assert_eq!(cfg.device_id(0), "sim-0001");
        assert_eq!(cfg.topic_for("sim-0001"), "sensors/sim-0001/temp");
    }
}
