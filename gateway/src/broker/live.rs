//! Live connections: the connection limit, and one connection per client id (takeover).
//!
//! # Invariants
//! - At most `broker.max_connections` connections hold a [`Registration`], and at most
//!   `broker.max_connections_per_address` of them come from one address; the
//!   `sensors_connected` gauge counts them.
//! - One connection per client id: a newer one takes over (the older is stopped, and the newer
//!   waits for it to finish, up to [`TAKEOVER_WAIT`]). A finished connection removes its entry
//!   only if it is still its own, so a late finisher never removes its successor.
//! - Two locks, the table of client ids and the count per address; neither is taken while
//!   the other is held, nor held across an `.await`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

/// How long a new connection waits for the connection it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// What ends a connection: shutdown (a child of the gateway's token) or a takeover.
///
/// One token for both: polling one long-lived future per loop turn instead of two fresh ones
/// measured ~1.5 % of the gateway's CPU.
#[derive(Clone)]
pub struct Stop {
    token: CancellationToken,
    taken: Arc<AtomicBool>,
}

impl Stop {
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether the stop was a takeover (otherwise: shutdown).
    pub fn taken_over(&self) -> bool {
        self.taken.load(Ordering::Relaxed)
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
        self.0.stop.taken.store(true, Ordering::Relaxed);
        self.0.stop.token.cancel();
        if tokio::time::timeout(TAKEOVER_WAIT, self.0.finished.cancelled()).await.is_err() {
            warn!(message = "the connection being taken over did not finish in time; continuing", %client_id);
        }
    }
}

/// The table of live connections.
pub struct LiveConnections {
    by_id: Mutex<HashMap<String, Holder>>,
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

    /// Counts a new connection against the limit and registers it as `client_id`'s live one,
    /// stopped by `cancel` or a takeover. Returns the connection it replaces, which the caller
    /// must [`Previous::take_over`].
    pub fn register(
        self: &Arc<Self>,
        client_id: &str,
        address: IpAddr,
        cancel: &CancellationToken,
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
        let stop = Stop { token: cancel.child_token(), taken: Arc::new(AtomicBool::new(false)) };
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
        let previous = self.lock().insert(client_id.to_owned(), Holder { serial, stop, finished });
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
