//! Persistent sessions on disk: the broker's side of the buffer file's `sessions` and
//! `session_queue` tables ([`crate::buffer::sessions`]).
//!
//! [`Local`](super::local::Local) tells the [`SessionLog`] what changes — a QoS 1/2 delivery
//! queued for a persistent session, a delivery completed, a session's subscriptions or expiry,
//! a session ended — and one task ([`run`]) commits what gathered as one transaction through
//! the store thread, then gathers again while that commit runs (group commit: one fsync for
//! every publisher and subscriber of that moment).
//!
//! # Guarantee
//! A QoS 1/2 publish from a connection acknowledged after commit (`broker.ack =
//! "after_commit"`) is in every matching persistent session's queue on disk before its PUBACK
//! (PUBREC): each queued copy holds a clone of the publish's [`Ticket`] until the commit that
//! wrote it. So after a SIGKILL every acknowledged message comes back to every persistent
//! session it was queued for, in order. A delivery completed by its subscriber is deleted in a
//! later commit without anyone waiting: after a SIGKILL some completed ones may come again
//! (at least once; a QoS 2 one may arrive twice then). A delivery queued and completed before
//! its commit started is never written.
//!
//! # Invariants
//! - One lock, a leaf: taken under `Local`'s locks (the mailbox lock included), nothing is
//!   locked under it, never held across an `.await`.
//! - Bounded by what it describes: at most one insert and one delete per queued delivery (the
//!   queues are bounded), one row and one end per session; each commit takes all of it.
//! - Batches are built so that the store's fixed order (ends, inserts, deletes, rows) gives the
//!   broker's order: an end removes the session's pending inserts and row, a delete of a
//!   pending insert cancels both.
//! - A failed commit is counted (`sessions_unsaved`) and logged once per episode; the broker
//!   keeps running with the sessions in memory, and the publishers are acknowledged (the
//!   upstream copy of their event is what the PUBACK promises first).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::local::Message;
use crate::ack::Ticket;
use crate::buffer::sessions::{SessionBatch, StoredDelivery, StoredSession};
use crate::buffer::worker::Command;
use crate::metrics::Metrics;
use crate::telemetry::{Episode, Failure};

/// What [`crate::buffer::Store::load_sessions`] read at start-up, for [`super::start`].
#[derive(Debug, Default)]
pub struct Restored {
    pub sessions: Vec<crate::buffer::sessions::LoadedSession>,
    /// The largest seq in the file.
    pub max_seq: u64,
}

#[derive(Default)]
struct Pending {
    ends: HashSet<Arc<str>>,
    inserts: BTreeMap<(Arc<str>, u64), StoredDelivery>,
    deletes: Vec<(Arc<str>, u64)>,
    rows: HashMap<Arc<str>, StoredSession>,
    /// Publishers' tickets: released when the commit holding their copies finished.
    tickets: Vec<Ticket>,
}

/// The changes to persistent sessions not yet committed (see the module docs).
pub struct SessionLog {
    pending: Mutex<Pending>,
    wake: Notify,
    next_seq: AtomicU64,
    /// Changes handed to the log so far (counted under the pending lock).
    changes: AtomicU64,
    /// Changes whose commit has finished (or failed): what [`SessionLog::flush`] waits for.
    committed: watch::Sender<u64>,
}

impl SessionLog {
    /// `max_seq`: the largest seq in the file; new deliveries are numbered above it.
    pub fn new(max_seq: u64) -> SessionLog {
        SessionLog {
            pending: Mutex::default(),
            wake: Notify::new(),
            next_seq: AtomicU64::new(max_seq + 1),
            changes: AtomicU64::new(0),
            committed: watch::Sender::new(0),
        }
    }

    /// The pending changes, counted as one more change (every caller changes them).
    fn lock(&self) -> MutexGuard<'_, Pending> {
        let p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.changes.fetch_add(1, Ordering::Relaxed);
        p
    }

    /// Resolves once every change handed to the log before the call has been committed (or
    /// its commit failed, counted and logged), or the log's task has ended. A SUBACK waits
    /// for it, so a subscription the client saw granted survives a SIGKILL.
    pub async fn flush(&self) {
        let target = self.changes.load(Ordering::Relaxed);
        let mut committed = self.committed.subscribe();
        self.wake.notify_one();
        let _ = committed.wait_for(|done| *done >= target).await;
    }

    /// A delivery queued for persistent session `id`: numbered, and written with the next
    /// commit, which `ticket` (the publisher's acknowledgement) waits for.
    pub fn insert(&self, id: &Arc<str>, message: &Message, ticket: Option<&Ticket>) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let stored = to_stored(message, Instant::now(), crate::event::now_ms());
        let mut p = self.lock();
        p.inserts.insert((Arc::clone(id), seq), stored);
        p.tickets.extend(ticket.cloned());
        drop(p);
        self.wake.notify_one();
        seq
    }

    /// A delivery completed or discarded: deleted (or never written, if still pending).
    pub fn delete(&self, id: &Arc<str>, seq: u64) {
        let key = (Arc::clone(id), seq);
        let mut p = self.lock();
        if p.inserts.remove(&key).is_none() {
            p.deletes.push(key);
            drop(p);
            self.wake.notify_one();
        }
    }

    /// A session's row (subscriptions, expiry, offline since): replaces any pending one.
    pub fn row(&self, id: &Arc<str>, session: StoredSession) {
        self.lock().rows.insert(Arc::clone(id), session);
        self.wake.notify_one();
    }

    /// A session ended: its row and queue go.
    pub fn end(&self, id: &Arc<str>) {
        let mut p = self.lock();
        let first = (Arc::clone(id), 0);
        let last = (Arc::clone(id), u64::MAX);
        let gone: Vec<_> = p.inserts.range(first..=last).map(|(k, _)| k.clone()).collect();
        for key in gone {
            p.inserts.remove(&key);
        }
        p.deletes.retain(|(owner, _)| owner != id);
        p.rows.remove(id);
        p.ends.insert(Arc::clone(id));
        drop(p);
        self.wake.notify_one();
    }

    /// Takes what gathered, as one batch and the tickets it releases.
    pub(super) fn take(&self) -> (SessionBatch, Vec<Ticket>, u64) {
        let mut guard = self.lock();
        let p = std::mem::take(&mut *guard);
        let changes = self.changes.load(Ordering::Relaxed);
        drop(guard);
        let batch = SessionBatch {
            ends: p.ends.into_iter().map(|id| id.to_string()).collect(),
            inserts: p.inserts.into_iter().map(|((id, seq), d)| ((id.to_string(), seq), d)).collect(),
            deletes: p.deletes.into_iter().map(|(id, seq)| (id.to_string(), seq)).collect(),
            rows: p.rows.into_iter().map(|(id, s)| (id.to_string(), s)).collect(),
        };
        (batch, p.tickets, changes)
    }
}

/// The task that commits the log: waits for changes, commits them in one transaction through
/// the store thread, releases the tickets, repeats. On `cancel` it commits what is pending
/// once more and ends, dropping its way to the store thread.
pub async fn run(
    log: Arc<SessionLog>,
    commands: mpsc::Sender<Command>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut episode = Episode::default();
    loop {
        let stopping = tokio::select! {
            () = log.wake.notified() => false,
            () = cancel.cancelled() => true,
        };
        let (batch, tickets, changes) = log.take();
        if !batch.is_empty() {
            let outcome = commit(&commands, batch).await;
            note(&mut episode, &metrics, outcome);
        }
        drop(tickets);
        // Past the end nothing will be committed: flushes waiting or to come go on at once.
        log.committed.send_replace(if stopping { u64::MAX } else { changes });
        if stopping {
            return;
        }
    }
}

async fn commit(commands: &mpsc::Sender<Command>, batch: SessionBatch) -> Result<(), String> {
    let (reply, committed) = oneshot::channel();
    if commands.send(Command::Sessions { batch, reply }).await.is_err() {
        return Err("the buffer's store thread has stopped".to_owned());
    }
    committed.await.unwrap_or_else(|_| Err("the buffer's store thread has stopped".to_owned()))
}

fn note(episode: &mut Episode, metrics: &Metrics, outcome: Result<(), String>) {
    let now = Instant::now();
    match outcome {
        Ok(()) => {
            if let Some((lasted, failed_commits)) = episode.ended(now) {
                info!(
                    message = "persistent sessions are written to the buffer file again",
                    failed_commits,
                    lasted_s = lasted.as_secs()
                );
            }
        }
        Err(error) => {
            Metrics::add(&metrics.counters().sessions_unsaved, 1);
            match episode.failed(now) {
                Failure::Started => {
                    warn!(message = "persistent sessions' changes could not be written to the buffer file: they live in memory only, and a restart loses them (sessions_unsaved); see the buffer's own errors (disk full, permissions)", %error)
                }
                Failure::Remind { lasted, attempts } => {
                    warn!(message = "persistent sessions' changes still cannot be written to the buffer file (sessions_unsaved)", %error, failed_commits = attempts, lasted_s = lasted.as_secs())
                }
                Failure::Quiet => {}
            }
        }
    }
}

/// As the file keeps it; `now` and `now_ms` are the same moment on both clocks.
pub fn to_stored(message: &Message, now: Instant, now_ms: u64) -> StoredDelivery {
    let p = message.properties.clone().unwrap_or_default();
    let expires_ms = message.expires.map(|at| {
        now_ms
            .saturating_add(u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX))
    });
    StoredDelivery {
        topic: String::from_utf8_lossy(&message.publish.topic).into_owned(),
        payload: message.publish.payload.clone(),
        qos: message.qos,
        retain: message.retain,
        expires_ms,
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_ids: p.subscription_identifiers,
        group: message.share.as_deref().map(str::to_owned),
    }
}

/// Back from the file (see [`to_stored`]), with its seq. A resend after a restart is a new
/// delivery: the packet id it had was not kept.
pub fn from_stored(seq: u64, stored: StoredDelivery, now: Instant, now_ms: u64) -> Message {
    let expires = stored.expires_ms.map(|at| now + Duration::from_millis(at.saturating_sub(now_ms)));
    let properties = PublishProperties {
        payload_format_indicator: stored.payload_format_indicator,
        // Replaced at delivery by what remains (see `deliver_out`).
        message_expiry_interval: expires.map(|_| 0),
        topic_alias: None,
        response_topic: stored.response_topic,
        correlation_data: stored.correlation_data,
        user_properties: stored.user_properties,
        subscription_identifiers: stored.subscription_ids,
        content_type: stored.content_type,
    };
    let properties = (properties != PublishProperties::default()).then_some(properties);
    let publish = Publish::new(Bytes::copy_from_slice(stored.topic.as_bytes()), stored.payload, false);
    Message {
        publish,
        qos: stored.qos,
        retain: stored.retain,
        properties,
        expires,
        resend: None,
        released: false,
        stored: Some(seq),
        share: stored.group.map(Arc::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str) -> Message {
        let properties = PublishProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into())],
            subscription_identifiers: vec![2],
            ..PublishProperties::default()
        };
        let mut m = Message::new(
            Publish::new("a/b".to_owned(), payload.to_owned(), false),
            1,
            true,
            Some(properties),
        );
        m.stored = None;
        m
    }

    #[test]
    fn a_delivery_round_trips_with_its_expiry_counting_on() {
        let now = Instant::now();
        let m = message("x");
        let stored = to_stored(&m, now, 1_000_000);
        assert_eq!(stored.expires_ms.map(|at| at / 1000), Some(1_060), "absolute: 60 s after now");
        // Read back 20 s later: 40 s remain.
        let back = from_stored(9, stored, now, 1_020_000);
        assert_eq!(back.stored, Some(9));
        assert_eq!(back.expires.map(|at| at.duration_since(now).as_secs()), Some(40));
        assert_eq!(back.publish.topic, m.publish.topic);
        assert_eq!(back.publish.payload, m.publish.payload);
        assert_eq!((back.qos, back.retain), (1, true));
        let p = back.properties.expect("properties");
        assert_eq!(p.user_properties, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(p.subscription_identifiers, [2]);
    }

    #[test]
    fn a_batch_cancels_what_completed_before_its_commit_and_what_an_end_removed() {
        let log = SessionLog::new(10);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let s1 = log.insert(&a, &message("1"), None);
        let s2 = log.insert(&a, &message("2"), None);
        let s3 = log.insert(&b, &message("3"), None);
        assert_eq!((s1, s2, s3), (11, 12, 13));
        log.delete(&a, s1);
        log.delete(&b, 5);
        log.row(&a, StoredSession { expiry_secs: None, offline_since_ms: None, subscriptions: Vec::new() });
        let (batch, _, _) = log.take();
        assert_eq!(
            batch.inserts.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            [("a".to_owned(), 12), ("b".to_owned(), 13)],
            "1 was completed before any commit: never written"
        );
        assert_eq!(batch.deletes, [("b".to_owned(), 5)]);
        assert_eq!(batch.rows.len(), 1);
        log.insert(&b, &message("4"), None);
        log.delete(&b, 13);
        log.row(&b, StoredSession { expiry_secs: None, offline_since_ms: None, subscriptions: Vec::new() });
        log.end(&b);
        let (batch, _, _) = log.take();
        assert_eq!(batch.ends, ["b"]);
        assert!(batch.inserts.is_empty() && batch.deletes.is_empty() && batch.rows.is_empty());
        assert!(log.take().0.is_empty());
    }

    #[tokio::test]
    async fn a_failed_commit_is_counted_and_still_releases_publishers_and_flushes() {
        let log = Arc::new(SessionLog::new(0));
        // The store thread is gone: every commit fails.
        let (commands, gone) = mpsc::channel(1);
        drop(gone);
        let metrics = Metrics::default();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&log), commands, metrics.clone(), cancel.clone()));
        let acks = crate::ack::AckQueue::new();
        let ticket = acks.ticket();
        let id: Arc<str> = Arc::from("p");
        log.insert(&id, &message("1"), Some(&ticket));
        drop(ticket);
        log.flush().await;
        let mut ready = Vec::new();
        acks.take_ready(&mut ready);
        assert_eq!(ready.len(), 1, "the publisher is answered: its event's own safety is what it waits for");
        assert_eq!(Metrics::get(&metrics.counters().sessions_unsaved), 1);
        cancel.cancel();
        task.await.expect("the task ends on cancel");
        // After the task ended a flush does not wait for a commit that will never come.
        log.row(&id, StoredSession { expiry_secs: None, offline_since_ms: None, subscriptions: Vec::new() });
        log.flush().await;
    }
}
