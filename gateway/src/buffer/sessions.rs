//! The local broker's persistent sessions in the buffer file (format version 5): each
//! session's subscriptions and expiry, and its queued QoS 1/2 deliveries.
//!
//! Two tables:
//! - `sessions`: key the client id, value a [`StoredSession`] in CBOR.
//! - `session_queue`: key `(client id, seq)`, value a [`StoredDelivery`] in CBOR. `seq` comes
//!   from one counter for all sessions (seeded above the largest stored one at start-up), so
//!   per session key order is queue order.
//!
//! # Invariants
//! - A [`SessionBatch`] is one durable transaction: ended sessions first (row and queue), then
//!   inserts, deletes and rows. The broker's log ([`crate::broker::persist`]) builds batches so
//!   that this order gives the same result as the broker's own order.
//! - Times are absolute (Unix ms), so a session's expiry and a delivery's message expiry go on
//!   counting while the gateway is down.
//! - Loading removes what cannot come back (expired, undecodable, over the bounds) in the same
//!   transaction and counts it in [`SessionsLoad`].

use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::file::{BufferError, db_err};
use super::store::Store;

/// Persistent sessions by client id: a [`StoredSession`] in CBOR.
pub(crate) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Queued deliveries by `(client id, seq)`: a [`StoredDelivery`] in CBOR.
pub(crate) const SESSION_QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("session_queue");

/// One subscription of a stored session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub ids: Vec<usize>,
}

/// A persistent session as the file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Seconds it outlives its connection; `None`: until evicted (3.1.1, or 0xFFFFFFFF).
    pub expiry_secs: Option<u32>,
    /// When its connection ended, Unix ms; `None` while connected (after a crash: offline
    /// since the restart).
    pub offline_since_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
}

impl StoredSession {
    /// Whether its expiry passed by `now_ms`, counting from `offline_since_ms` or, for a
    /// session that was connected when the gateway stopped, from `restart_ms`.
    fn expired(&self, now_ms: u64) -> bool {
        match (self.expiry_secs, self.offline_since_ms) {
            (Some(secs), Some(since)) => since.saturating_add(u64::from(secs) * 1000) <= now_ms,
            _ => false,
        }
    }
}

/// A queued delivery as the file keeps it: what the subscriber gets, with its message expiry
/// as an absolute time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StoredDelivery {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub expires_ms: Option<u64>,
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub subscription_ids: Vec<usize>,
    /// The shared subscription (`$share/group/filter`) it was chosen for, so that it can go
    /// to another member if its session ends first. Absent in rows written before it existed
    /// (they decode as `None`: such a delivery stays with its session).
    #[serde(default)]
    pub group: Option<String>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    ciborium::into_writer(value, &mut out).expect("writing CBOR into a Vec cannot fail");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    ciborium::from_reader(bytes).ok()
}

/// One transaction's worth of session changes (see the module invariants for the order).
#[derive(Debug, Default)]
pub struct SessionBatch {
    /// Sessions that ended: their row and every queued delivery.
    pub ends: Vec<String>,
    pub inserts: Vec<((String, u64), StoredDelivery)>,
    /// Deliveries completed (or discarded); a key not stored is ignored.
    pub deletes: Vec<(String, u64)>,
    pub rows: Vec<(String, StoredSession)>,
}

impl SessionBatch {
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty() && self.inserts.is_empty() && self.deletes.is_empty() && self.rows.is_empty()
    }
}

/// One session read back at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedSession {
    pub client_id: String,
    pub session: StoredSession,
    /// In queue order, at most `max_queued`.
    pub queue: Vec<(u64, StoredDelivery)>,
}

/// What [`Store::load_sessions`] found.
#[derive(Debug, Default)]
pub struct SessionsLoad {
    pub sessions: Vec<LoadedSession>,
    /// The largest seq in the file (0 if none): new deliveries are numbered above it.
    pub max_seq: u64,
    /// Sessions removed: their expiry passed while the gateway was down.
    pub expired: usize,
    /// Sessions removed beyond `broker.max_offline_sessions` (the ones offline longest).
    pub evicted: usize,
    /// Deliveries removed: message expiry passed, beyond `max_queued_messages`, or
    /// undecodable (a session row that does not decode ends the session).
    pub deliveries_dropped: usize,
    pub undecodable: usize,
}

impl Store {
    /// Applies one batch of session changes in one durable transaction.
    pub fn apply_sessions(&mut self, batch: &SessionBatch) -> Result<(), BufferError> {
        let result = self.apply_sessions_inner(batch);
        self.forget_on_io_error(result)
    }

    fn apply_sessions_inner(&mut self, batch: &SessionBatch) -> Result<(), BufferError> {
        let path = self.path().to_owned();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        {
            let mut rows = txn.open_table(SESSIONS).map_err(|e| db_err(&path, e))?;
            let mut queue = txn.open_table(SESSION_QUEUE).map_err(|e| db_err(&path, e))?;
            for id in &batch.ends {
                rows.remove(id.as_str()).map_err(|e| db_err(&path, e))?;
                queue
                    .retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)
                    .map_err(|e| db_err(&path, e))?;
            }
            for ((id, seq), delivery) in &batch.inserts {
                queue
                    .insert((id.as_str(), *seq), encode(delivery).as_slice())
                    .map_err(|e| db_err(&path, e))?;
            }
            for (id, seq) in &batch.deletes {
                queue.remove((id.as_str(), *seq)).map_err(|e| db_err(&path, e))?;
            }
            for (id, session) in &batch.rows {
                rows.insert(id.as_str(), encode(session).as_slice()).map_err(|e| db_err(&path, e))?;
            }
        }
        txn.commit().map_err(|e| db_err(&path, e))
    }

    /// The persistent sessions to restore at start-up (before the store thread takes the
    /// file), at most `max_sessions` of them (the ones offline the shortest time) with at most
    /// `max_queued` deliveries each (the oldest). What cannot come back is removed in the same
    /// transaction: sessions whose expiry passed by `now_ms`, deliveries whose message expiry
    /// passed, anything beyond the bounds, values that do not decode, and deliveries without a
    /// session. Sessions that were connected when the gateway stopped are offline from `now_ms`.
    pub fn load_sessions(
        &mut self,
        now_ms: u64,
        max_sessions: usize,
        max_queued: usize,
    ) -> Result<SessionsLoad, BufferError> {
        let result = self.load_sessions_inner(now_ms, max_sessions, max_queued);
        self.forget_on_io_error(result)
    }

    fn load_sessions_inner(
        &mut self,
        now_ms: u64,
        max_sessions: usize,
        max_queued: usize,
    ) -> Result<SessionsLoad, BufferError> {
        let path = self.path().to_owned();
        let txn = self.database()?.begin_write().map_err(|e| db_err(&path, e))?;
        let mut load = SessionsLoad::default();
        {
            let mut rows = txn.open_table(SESSIONS).map_err(|e| db_err(&path, e))?;
            let mut queue = txn.open_table(SESSION_QUEUE).map_err(|e| db_err(&path, e))?;
            let mut kept: Vec<LoadedSession> = Vec::new();
            let mut ended: Vec<String> = Vec::new();
            for entry in rows.iter().map_err(|e| db_err(&path, e))? {
                let (id, value) = entry.map_err(|e| db_err(&path, e))?;
                let id = id.value().to_owned();
                match decode::<StoredSession>(value.value()) {
                    None => {
                        load.undecodable += 1;
                        ended.push(id);
                    }
                    Some(s) if s.expired(now_ms) => {
                        load.expired += 1;
                        ended.push(id);
                    }
                    Some(mut s) => {
                        s.offline_since_ms.get_or_insert(now_ms);
                        kept.push(LoadedSession { client_id: id, session: s, queue: Vec::new() });
                    }
                }
            }
            // Beyond the bound: the ones offline longest go, as eviction picks them online.
            kept.sort_by_key(|s| std::cmp::Reverse(s.session.offline_since_ms));
            if kept.len() > max_sessions {
                for s in kept.drain(max_sessions..) {
                    load.evicted += 1;
                    ended.push(s.client_id);
                }
            }
            kept.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            let mut gone: Vec<(String, u64)> = Vec::new();
            for entry in queue.iter().map_err(|e| db_err(&path, e))? {
                let (key, value) = entry.map_err(|e| db_err(&path, e))?;
                let (id, seq) = key.value();
                load.max_seq = load.max_seq.max(seq);
                let owner = kept.binary_search_by(|s| s.client_id.as_str().cmp(id)).ok();
                let delivery = decode::<StoredDelivery>(value.value());
                match (owner, delivery) {
                    (Some(i), Some(d))
                        if kept[i].queue.len() < max_queued && d.expires_ms.is_none_or(|at| at > now_ms) =>
                    {
                        kept[i].queue.push((seq, d));
                    }
                    (owner, d) => {
                        if owner.is_some() {
                            if d.is_none() {
                                load.undecodable += 1;
                            }
                            load.deliveries_dropped += 1;
                        }
                        gone.push((id.to_owned(), seq));
                    }
                }
            }
            for (id, seq) in &gone {
                queue.remove((id.as_str(), *seq)).map_err(|e| db_err(&path, e))?;
            }
            for id in &ended {
                rows.remove(id.as_str()).map_err(|e| db_err(&path, e))?;
            }
            load.sessions = kept;
        }
        txn.commit().map_err(|e| db_err(&path, e))?;
        Ok(load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(payload: &str, expires_ms: Option<u64>) -> StoredDelivery {
        StoredDelivery {
            topic: "t".to_owned(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            expires_ms,
            user_properties: vec![("k".to_owned(), "v".to_owned())],
            subscription_ids: vec![4],
            ..StoredDelivery::default()
        }
    }

    fn session(expiry_secs: Option<u32>, offline_since_ms: Option<u64>) -> StoredSession {
        StoredSession {
            expiry_secs,
            offline_since_ms,
            subscriptions: vec![StoredSubscription {
                filter: "t/#".to_owned(),
                qos: 2,
                no_local: true,
                retain_as_published: false,
                ids: vec![4],
            }],
        }
    }

    fn payloads(s: &LoadedSession) -> Vec<(u64, String)> {
        s.queue.iter().map(|(seq, d)| (*seq, String::from_utf8_lossy(&d.payload).into_owned())).collect()
    }

    #[test]
    fn sessions_and_queues_come_back_in_order_with_what_cannot_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut store, _) = Store::open(dir.path()).expect("open");
            let mut batch = SessionBatch::default();
            batch.rows.push(("a".to_owned(), session(None, Some(1_000))));
            batch.rows.push(("b".to_owned(), session(Some(10), Some(1_000))));
            batch.rows.push(("c".to_owned(), session(Some(10), None)));
            for (seq, payload, expires) in [(3, "a3", None), (1, "a1", None), (7, "a7", Some(5_000))] {
                batch.inserts.push((("a".to_owned(), seq), delivery(payload, expires)));
            }
            batch.inserts.push((("a".to_owned(), 9), delivery("a9", None)));
            batch.inserts.push((("b".to_owned(), 2), delivery("b2", None)));
            batch.inserts.push((("c".to_owned(), 4), delivery("c4", None)));
            batch.inserts.push((("orphan".to_owned(), 11), delivery("o", None)));
            store.apply_sessions(&batch).expect("apply");
            let mut later = SessionBatch::default();
            later.deletes.push(("a".to_owned(), 3));
            store.apply_sessions(&later).expect("apply");
        }
        let (mut store, _) = Store::open(dir.path()).expect("reopen");
        // At 20 s: b's 10 s expiry (offline since 1 s) passed; a7 expired at 5 s.
        let load = store.load_sessions(20_000, 10, 10).expect("load");
        assert_eq!(load.max_seq, 11);
        assert_eq!(load.expired, 1);
        assert_eq!(load.deliveries_dropped, 1, "a7 expired (b's and the orphan's are not counted)");
        let ids: Vec<&str> = load.sessions.iter().map(|s| s.client_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(payloads(&load.sessions[0]), [(1, "a1".to_owned()), (9, "a9".to_owned())]);
        assert_eq!(load.sessions[0].queue[0].1, delivery("a1", None), "every field back");
        assert_eq!(load.sessions[0].session, session(None, Some(1_000)));
        assert_eq!(
            load.sessions[1].session.offline_since_ms,
            Some(20_000),
            "connected at the stop: from now"
        );
        // What was removed stays removed; c's expiry now counts from 20 s.
        let again = store.load_sessions(20_000, 10, 10).expect("load");
        assert_eq!((again.expired, again.deliveries_dropped), (0, 0));
        assert_eq!(again.sessions.len(), 2);
        assert_eq!(again.max_seq, 9);
    }

    #[test]
    fn the_bounds_keep_the_newest_sessions_and_the_oldest_deliveries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        let mut batch = SessionBatch::default();
        for (n, since) in [(1, 100), (2, 300), (3, 200)] {
            batch.rows.push((format!("s{n}"), session(None, Some(since))));
            for seq in 0..3 {
                batch.inserts.push(((format!("s{n}"), n * 10 + seq), delivery(&format!("{seq}"), None)));
            }
        }
        store.apply_sessions(&batch).expect("apply");
        let load = store.load_sessions(1_000, 2, 2).expect("load");
        assert_eq!(load.evicted, 1);
        let ids: Vec<&str> = load.sessions.iter().map(|s| s.client_id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3"], "s1, offline longest, ended");
        assert_eq!(payloads(&load.sessions[0]), [(20, "0".to_owned()), (21, "1".to_owned())]);
        assert_eq!(load.deliveries_dropped, 2, "one beyond the queue bound in each kept session");
    }

    #[test]
    fn an_ended_session_takes_its_row_and_queue_and_a_new_one_can_start_in_the_same_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path()).expect("open");
        let mut batch = SessionBatch::default();
        batch.rows.push(("a".to_owned(), session(None, Some(1))));
        batch.inserts.push((("a".to_owned(), 1), delivery("old", None)));
        batch.inserts.push((("ab".to_owned(), 2), delivery("neighbour", None)));
        batch.rows.push(("ab".to_owned(), session(None, Some(1))));
        store.apply_sessions(&batch).expect("apply");
        let mut batch = SessionBatch::default();
        batch.ends.push("a".to_owned());
        batch.inserts.push((("a".to_owned(), 3), delivery("new", None)));
        batch.rows.push(("a".to_owned(), session(Some(60), Some(5))));
        store.apply_sessions(&batch).expect("apply");
        let load = store.load_sessions(10, 10, 10).expect("load");
        assert_eq!(payloads(&load.sessions[0]), [(3, "new".to_owned())]);
        assert_eq!(load.sessions[0].session.expiry_secs, Some(60));
        assert_eq!(payloads(&load.sessions[1]), [(2, "neighbour".to_owned())], "a prefix is another id");
    }

    #[test]
    fn a_version_3_file_gains_the_session_tables_and_keeps_its_retained_messages() {
        use super::super::file::{META, RETAINED};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = super::super::file::file_path(dir.path());
        {
            // Version 3: the retained table, no session tables.
            let db = redb::Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            txn.open_table(META).expect("meta").insert("format_version", 3).expect("version");
            txn.open_table(RETAINED).expect("retained").insert("r", [0xa0_u8].as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let (mut store, report) = Store::open(dir.path()).expect("open");
        assert_eq!(report.migrated_from, Some(3));
        assert_eq!(store.load_sessions(0, 10, 10).expect("tables exist").sessions, []);
        let mut batch = SessionBatch::default();
        batch.rows.push(("a".to_owned(), session(None, None)));
        store.apply_sessions(&batch).expect("apply");
        drop(store);
        let (mut store, report) = Store::open(dir.path()).expect("reopen");
        assert_eq!(report.migrated_from, None, "migrated once");
        assert_eq!(store.load_sessions(0, 10, 10).expect("load").sessions.len(), 1);
        assert_eq!(
            store.load_retained(0, 10, 1 << 20).expect("retained").undecodable,
            1,
            "the v3 row is still there"
        );
    }
}
