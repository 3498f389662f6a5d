//! Live connections: the connection limit, and one connection per client id (takeover).
//!
//! # Invariants
//! - At most `broker.max_connections` connections hold a [`Registration`], and at most
//!   `broker.max_connections_per_address` of them come from one address; the
//!   `sensors_connected` gauge counts them.
//! - One connection per client id: a newer one takes over (the older is stopped, and the newer
//!   waits for it to finish, up to [`TAKEOVER_WAIT`]). A finished connection removes its entry
//!   only if it is still its own, so a late finisher never removes its successor.
//! - Shutdown stops every registered connection, and a connection registered after it starts
//!   stopped ([`LiveConnections::shut_down`] and `register` decide under the table's lock).
//! - Two locks, the table of client ids and the count per address; neither is taken while
//!   the other is held, nor held across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

/// How long a new connection waits for the connection it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// What ends a connection: the gateway's shutdown or a takeover.
///
/// Polled on every turn of a connection's loop, so a poll is one `AtomicWaker` registration
/// and one atomic load. A child `CancellationToken` took a mutex for `is_cancelled` and
/// another for its `Notify`'s waiter on every poll: ~2.5 % of the gateway's CPU at 1,000
/// sensors × 10 events/s (`perf record`, 2026-12-05). Shutdown reaches every live
/// connection through [`LiveConnections::shut_down`].
#[derive(Clone)]
pub struct Stop(Arc<StopSignal>);

struct StopSignal {
    /// [`RUNNING`], [`SHUTDOWN`] or [`TAKEOVER`].
    why: AtomicU8,
    /// The connection's task: every poll of [`Stopped`] comes from it.
    waker: AtomicWaker,
}

const RUNNING: u8 = 0;
const SHUTDOWN: u8 = 1;
const TAKEOVER: u8 = 2;

impl Stop {
    fn new() -> Stop {
        Stop(Arc::new(StopSignal { why: AtomicU8::new(RUNNING), waker: AtomicWaker::new() }))
    }

    /// A takeover is said even when shutdown came first: the newer connection holds the id.
    fn stop(&self, why: u8) {
        if why == TAKEOVER {
            self.0.why.store(TAKEOVER, Ordering::Release);
        } else {
            let _ = self.0.why.compare_exchange(RUNNING, why, Ordering::Release, Ordering::Relaxed);
        }
        self.0.waker.wake();
    }

    /// Resolves once the connection is to stop (at once if it already is).
    pub fn stopped(&self) -> Stopped<'_> {
        Stopped(&self.0)
    }

    /// Whether the stop was a takeover (otherwise: shutdown).
    pub fn taken_over(&self) -> bool {
        self.0.why.load(Ordering::Acquire) == TAKEOVER
    }
}

/// The future of [`Stop::stopped`]: cheap to poll again and again.
pub struct Stopped<'a>(&'a StopSignal);

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the load: a stop after the load wakes this waker.
        self.0.waker.register(cx.waker());
        if self.0.why.load(Ordering::Acquire) == RUNNING { Poll::Pending } else { Poll::Ready(()) }
    }
}

/// A client id's live connection, as the table holds it.
struct Holder {
    serial: u64,
    stop: Stop,
    finished: CancellationToken,
}

/// The connection a newer one takes over.
pub struct Previous(Holder);

impl Previous {
    /// Stops the previous connection and waits (bounded) until it finished: until then it may
    /// still hand its unacknowledged deliveries back to the session.
    pub async fn take_over(self, client_id: &str, metrics: &Metrics) {
        Metrics::add(&metrics.counters().sensor_takeovers, 1);
        self.0.stop.stop(TAKEOVER);
        if tokio::time::timeout(TAKEOVER_WAIT, self.0.finished.cancelled()).await.is_err() {
            warn!(message = "the connection being taken over did not finish in time; continuing", %client_id);
        }
    }
}

/// The table of live connections.
pub struct LiveConnections {
    by_id: Mutex<HashMap<String, Holder>>,
    /// Set under `by_id`'s lock by [`LiveConnections::shut_down`]: a connection registered
    /// after it starts stopped.
    shut: AtomicBool,
    serial: AtomicU64,
    connections: AtomicUsize,
    max: usize,
    /// Live connections per source address, kept only with a per-address limit.
    by_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: Option<usize>,
    metrics: Metrics,
}

/// Why a connection was not registered.
pub enum Full {
    /// `broker.max_connections` connections are live.
    Broker,
    /// `broker.max_connections_per_address` connections from this address are live.
    Address,
}

impl LiveConnections {
    pub fn new(max: usize, max_per_address: Option<usize>, metrics: Metrics) -> LiveConnections {
        LiveConnections {
            by_id: Mutex::default(),
            shut: AtomicBool::new(false),
            serial: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            max,
            by_address: Mutex::default(),
            max_per_address,
            metrics,
        }
    }

    fn addresses(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `address` against its limit; false when it is reached.
    fn claim_address(&self, address: IpAddr) -> bool {
        let Some(max) = self.max_per_address else { return true };
        let mut by_address = self.addresses();
        let held = by_address.entry(address).or_default();
        if *held >= max {
            return false;
        }
        *held += 1;
        true
    }

    fn release_address(&self, address: IpAddr) {
        if self.max_per_address.is_none() {
            return;
        }
        let mut by_address = self.addresses();
        if let Some(held) = by_address.get_mut(&address) {
            *held -= 1;
            if *held == 0 {
                by_address.remove(&address);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Holder>> {
        self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops every live connection, and every one registered from now on: the gateway is
    /// shutting down.
    pub fn shut_down(&self) {
        let by_id = self.lock();
        self.shut.store(true, Ordering::Relaxed);
        for holder in by_id.values() {
            holder.stop.stop(SHUTDOWN);
        }
    }

    /// Stops the live connections when `cancel` fires (the gateway's shutdown).
    pub async fn shut_down_on(self: Arc<Self>, cancel: CancellationToken) {
        cancel.cancelled().await;
        self.shut_down();
    }

    /// Counts a new connection against the limit and registers it as `client_id`'s live one,
    /// stopped by the gateway's shutdown or a takeover. Returns the connection it replaces,
    /// which the caller must [`Previous::take_over`].
    pub fn register(
        self: &Arc<Self>,
        client_id: &str,
        address: IpAddr,
    ) -> Result<(Registration, Option<Previous>), Full> {
        let connections = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if connections > self.max {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(Full::Broker);
        }
        if !self.claim_address(address) {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(Full::Address);
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let stop = Stop::new();
        let finished = CancellationToken::new();
        let registration = Registration {
            live: Arc::clone(self),
            client_id: client_id.to_owned(),
            address,
            serial,
            stop: stop.clone(),
            finished: finished.clone(),
        };
        Metrics::set(&self.metrics.gauges().sensors_connected, connections as u64);
        let mut by_id = self.lock();
        if self.shut.load(Ordering::Relaxed) {
            stop.stop(SHUTDOWN);
        }
        let previous = by_id.insert(client_id.to_owned(), Holder { serial, stop, finished });
        drop(by_id);
        Ok((registration, previous.map(Previous)))
    }

    fn release(&self, client_id: &str, address: IpAddr, serial: u64) {
        let mut by_id = self.lock();
        if by_id.get(client_id).is_some_and(|h| h.serial == serial) {
            by_id.remove(client_id);
        }
        drop(by_id);
        self.release_address(address);
        let n = self.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        Metrics::set(&self.metrics.gauges().sensors_connected, n as u64);
    }
}

/// A connection's place in the table; dropping it ends the claim, however the connection ends.
pub struct Registration {
    live: Arc<LiveConnections>,
    client_id: String,
    address: IpAddr,
    serial: u64,
    stop: Stop,
    finished: CancellationToken,
}

impl Registration {
    /// This connection's serial: its claim on the client id's session too.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn stop(&self) -> &Stop {
        &self.stop
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live.release(&self.client_id, self.address, self.serial);
        self.finished.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::task::Waker;

    use super::*;

    const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn live() -> Arc<LiveConnections> {
        Arc::new(LiveConnections::new(10, None, Metrics::default()))
    }

    fn register(live: &Arc<LiveConnections>, id: &str) -> (Registration, Option<Previous>) {
        match live.register(id, HERE) {
            Ok(registered) => registered,
            Err(_) => panic!("{id}: refused under the limit"),
        }
    }

    fn poll(stop: &Stop) -> Poll<()> {
        let mut stopped = stop.stopped();
        Pin::new(&mut stopped).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_takeover_stops_the_older_connection_and_says_so() {
        let live = live();
        let (older, none) = register(&live, "s1");
        assert!(none.is_none());
        assert_eq!(poll(older.stop()), Poll::Pending);
        let (newer, previous) = register(&live, "s1");
        let waiting = tokio::spawn({
            let stop = older.stop().clone();
            async move { stop.stopped().await }
        });
        let metrics = Metrics::default();
        let taking =
            tokio::spawn(async move { previous.expect("s1 was live").take_over("s1", &metrics).await });
        waiting.await.expect("the stop resolves");
        assert!(older.stop().taken_over());
        drop(older);
        taking.await.expect("the takeover finishes");
        assert_eq!(poll(newer.stop()), Poll::Pending, "the newer connection runs on");
    }

    #[tokio::test]
    async fn shutdown_stops_live_connections_and_later_ones() {
        let live = live();
        let (a, _) = register(&live, "a");
        let waiting = tokio::spawn({
            let stop = a.stop().clone();
            async move { stop.stopped().await }
        });
        let cancel = CancellationToken::new();
        let sweep = tokio::spawn(Arc::clone(&live).shut_down_on(cancel.clone()));
        cancel.cancel();
        sweep.await.expect("the sweep finishes");
        waiting.await.expect("the stop resolves");
        assert!(!a.stop().taken_over());
        let (late, _) = register(&live, "b");
        assert_eq!(poll(late.stop()), Poll::Ready(()), "registered after shutdown: stopped at once");
    }

    #[test]
    fn a_takeover_after_shutdown_is_still_a_takeover() {
        let live = live();
        let (a, _) = register(&live, "a");
        live.shut_down();
        assert!(!a.stop().taken_over());
        a.stop().stop(TAKEOVER);
        assert!(a.stop().taken_over());
        a.stop().stop(SHUTDOWN);
        assert!(a.stop().taken_over(), "shutdown does not overwrite the takeover");
    }
}
