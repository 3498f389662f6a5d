//! The two MQTT ends of a test: a sensor that publishes and waits for every PUBACK, and a
//! subscriber at the upstream that records what arrived.
//!
//! [`Subscriber`] feeds `outpost_sim::verify::Verifier`, the same bookkeeping the simulators
//! use, so fleet runs are checked with `VerifyReport`s. It exists next to
//! `outpost_sim::verify::Subscriber` for one reason: that one always uses a clean session and
//! misses whatever is published while it reconnects, so it cannot watch an upstream that the
//! test restarts. This one can keep a persistent session ([`Session::Persistent`]), which
//! the broker keeps (and Mosquitto persists) across the subscriber's and its own restarts.
//!
//! # Invariants
//! - [`Subscriber::start`] returns only after the broker granted the subscription (SUBACK), so
//!   anything published afterwards is recorded.
//! - Every message is recorded exactly as it arrived, duplicates included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use outpost_sim::fleet::FleetSummary;
use outpost_sim::verify::{Verifier, VerifyReport};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long [`Subscriber::start`] waits for the SUBACK.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts of the subscriber: a bounded back-off, not a wait.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Largest packet the test clients accept or send.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Distinguishes the client ids of clients created by one test process.
static CLIENT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A client id unique in this test run, e.g. `e2e-sub-4711-3`.
pub fn unique_client_id(role: &str) -> String {
    format!("e2e-{role}-{}-{}", std::process::id(), CLIENT_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Which MQTT session a subscriber uses.
#[derive(Debug, Clone)]
pub enum Session {
    /// A clean session: nothing survives a disconnect.
    Clean,
    /// A persistent session under this client id: the broker queues QoS 1 messages while the
    /// subscriber is away and delivers them when it is back.
    Persistent(String),
}

/// What the subscription task recorded; locked only for short, non-async sections.
#[derive(Default)]
struct Recorded {
    verifier: Verifier,
    messages: Vec<(String, Vec<u8>)>,
    /// The last connection error, for timeout messages.
    last_error: Option<String>,
    /// Successful CONNACKs.
    connects: u64,
}

/// A QoS 1 subscription that records every message. Dropping it stops its task.
pub struct Subscriber {
    broker: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
    count: watch::Receiver<u64>,
    _stop: DropGuard,
}

impl Subscriber {
    /// Connects to `broker`, subscribes to `filter` at QoS 1 and returns once the broker sent
    /// its SUBACK. Reconnects (and subscribes again) whenever the connection drops.
    pub async fn start(broker: SocketAddr, filter: &str, session: Session) -> anyhow::Result<Subscriber> {
        let (client_id, clean) = match session {
            Session::Clean => (unique_client_id("sub"), true),
            Session::Persistent(id) => (id, false),
        };
        let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let (count_tx, count) = watch::channel(0);
        let (ready_tx, ready_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        tokio::spawn(record(
            client,
            eventloop,
            filter.to_owned(),
            Arc::clone(&recorded),
            count_tx,
            ready_tx,
            cancel.clone(),
        ));
        let subscriber = Subscriber { broker, recorded, count, _stop: cancel.drop_guard() };
        match tokio::time::timeout(SUBACK_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(refused))) => Err(anyhow::anyhow!(refused)),
            Ok(Err(_)) => anyhow::bail!("the subscription task for `{filter}` on {broker} ended"),
            Err(_) => anyhow::bail!(
                "no SUBACK for `{filter}` from {broker} within {SUBACK_TIMEOUT:?} (last error: {})",
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
                    "only {} of {n} messages arrived at {} within {timeout:?} (subscriber connects: {connects}, last error: {last_error})",
                    self.count(),
                    self.broker,
                )
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

    /// The verifier's report on what arrived, against `expected` when given.
    pub fn report(&self, expected: Option<&FleetSummary>) -> VerifyReport {
        self.lock().verifier.report(expected)
    }

    /// Every message as `(topic, payload)`, in arrival order.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
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

/// The subscription task: polls the event loop and records messages until cancelled.
async fn record(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    filter: String,
    recorded: Arc<Mutex<Recorded>>,
    count: watch::Sender<u64>,
    ready: oneshot::Sender<Result<(), String>>,
    cancel: CancellationToken,
) {
    let lock = || recorded.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ready = Some(ready);
    loop {
        let polled = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                lock().connects += 1;
                // Subscribing again is harmless for a resumed session and needed for a new one.
                if let Err(error) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                    lock().last_error = Some(format!("subscribe request failed: {error}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted =
                    ack.return_codes.iter().all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                if let Some(ready) = ready.take() {
                    let _ = ready.send(if granted {
                        Ok(())
                    } else {
                        Err(format!("the broker refused the subscription to `{filter}`"))
                    });
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let now = now_ms();
                let total = {
                    let mut recorded = lock();
                    recorded.verifier.record(&publish.topic, &publish.payload, now);
                    recorded.messages.push((publish.topic, publish.payload.to_vec()));
                    recorded.verifier.received()
                };
                count.send_replace(total);
            }
            Ok(_) => {}
            Err(error) => {
                lock().last_error = Some(error.to_string());
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
}

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
    let payloads: Vec<Vec<u8>> = payloads.into_iter().collect();
    let n = payloads.len();
    let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    // Room for every request at once, so queueing never blocks.
    let (client, mut eventloop) = AsyncClient::new(options, n + 8);
    for payload in payloads {
        client.try_publish(topic, QoS::AtLeastOnce, false, payload).context("cannot queue a publish")?;
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

/// Milliseconds since the Unix epoch, for latency bookkeeping.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}
