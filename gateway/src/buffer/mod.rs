//! Stage 3 support: the durable store-and-forward buffer.
//!
//! # On-disk layout
//! One redb file, `<data_dir>/buffer.redb`, with seven tables:
//! - `events`: key `(priority: u8, seq: u64)`, value a *row* of events of that priority
//!   ([`chunk`]): since format 4 a packed row of up to ~4,000 bytes (a tag byte, a count, then
//!   per event its `seq`, `event_id` and `enqueued_ms` as deltas, flags (QoS, expiry, topic
//!   repeated, properties; since format 8 first, and standing in for deltas of one sequence
//!   number and id and of no time), `expires_ms`, since format 7 the MQTT 5 properties if it has any
//!   ([`file::put_props`]: user properties in order, content type, payload format indicator,
//!   response topic, correlation data, the message expiry as a deadline), `topic` (or a
//!   reference to an earlier event's equal topic; since format 8 as the lengths of the prefix
//!   and suffix it shares with the previous event's topic and the bytes in between) and `payload`
//!   (since format 10, where shorter, as the prefix and suffix it shares with the previous
//!   event's payload and the bytes in between, behind a flag bit)); in files from formats 1–3 a CBOR map of one event (`event_id`,
//!   `enqueued_ms`, `expires_ms`, `topic`, `qos`, `payload`). A row's key is at most its first
//!   event's `seq`, and its events lie below the next row's key, so within one priority key
//!   order is arrival order and reading a key range is FIFO. A commit starts a new row
//!   and fills rows one after the other: about one full 4 KiB page per 4 KiB of events, where
//!   a row per event wrote a CBOR map per event into half-full B-tree leaves. It does not
//!   append to a row an earlier commit wrote (that would write its page again).
//! - `meta`: `format_version` (see below), `epoch` (bumped durably at every start; ids are
//!   `epoch << 40 | n`, so they never repeat across restarts) and per-priority `events.<p>` /
//!   `bytes.<p>` counters and (format 4) `rows`, the number of rows in `events`, updated in
//!   the same transaction as the records they count. An event in a packed row counts its
//!   topic, its payload, 16 bytes and its properties' encoding ([`Record::stored_size`]); one
//!   in an old row its value and 16 bytes, as before.
//! - `imported`: the fingerprints (`event_id`, content hash) of events `outpost buffer import`
//!   brought in, so a second import of the same file adds nothing ([`import`]).
//! - `retained`: the local broker's retained messages, key the topic, value a CBOR map
//!   ([`StoredRetained`]: QoS, payload, expiry in Unix ms, MQTT 5 properties). Written by
//!   the store thread ([`worker::Command::Retain`]) in the broker's order, read once at start.
//! - `sessions` and `session_queue`: the local broker's persistent sessions and their queued
//!   QoS 1/2 deliveries ([`sessions`]), written by the store thread
//!   ([`worker::Command::Sessions`]), read once at start.
//! - `window_log`: the route stage's checkpoint of its stateful rules' state (open windows,
//!   report-by-exception memory) as a log by sequence number: a full snapshot, then the
//!   deltas taken after it, each row a kind tag and the rules crate's bytes (since format 11
//!   one longer than 4,000 bytes goes on in "more" rows, so each row fits a 4 KiB page). A checkpoint
//!   ([`worker::Command::Checkpoint`]) appends deltas, or writes a full snapshot in place of
//!   every row; read once at start, the last full row and the deltas after it ([`windows`]).
//!   Formats 6–8 had a `windows` table with one snapshot instead.
//!
//! # Format versions
//! [`store::FORMAT_VERSION`] is 11. Version 1 is a file without the `format_version` key (every
//! release before it); version 2 added the `imported` table, version 3 the `retained` table,
//! version 4 packed rows and the `rows` counter, version 5 the `sessions` and
//! `session_queue` tables, version 6 the `windows` table, version 7 events' MQTT 5 properties
//! in packed rows (a flag bit older releases did not know: nothing to migrate, no old row has
//! it, but a release that reads 6 must refuse a 7 file rather than find its rows corrupt),
//! version 8 rows with topics as differences and the flags first (a new tag byte: rows of 4–7
//! are read as they are and written back in 8 when they change; nothing to migrate),
//! version 9 the `window_log` table in place of `windows` (the start-up transaction moves a
//! format-8 snapshot into it as its first, full row, and deletes `windows`).
//! version 10 payloads as differences from the previous event's (a flag bit that 8 and 9 did
//! not know, as with 7: nothing to migrate, no old row has it),
//! version 11 window checkpoints in pieces of at most 4,000 bytes, one `window_log` row each
//! (a "more" tag that 9 and 10 did not know: nothing to migrate, an old row is a checkpoint of
//! one piece).
//! Opening an older file adds the key, the
//! missing tables and (older than 4 → 4) the `rows` counter, set to the number of rows, which
//! is its event count (checked against the counters), in the same transaction as the epoch
//! bump. Records stay as they are: a row of formats 1–3 is read, sent and deleted as a row of
//! one event, in key order with the packed ones; a row that changes is written back packed.
//! Tested with `gateway/tests/fixtures/buffer-v1.redb`, written by that release, and with
//! version-2 and version-3 files (the latter with retained messages) made in the tests.
//! Releases that know version 3 refuse a version-4 or later file (newer format), which they
//! could not read. A file with a higher version was written by a newer release: it is refused before
//! anything writes to it (a read-only open reads the version), and the message names both
//! versions. A future change bumps the version, adds its migration next to the others, and
//! keeps a fixture of the version before it. Note that releases before version 2 do not
//! check the version: one of them would find a version-4 file's packed rows undecodable and
//! move the file aside as corrupt (kept, never deleted; `outpost buffer import` of a release
//! that reads version 4 brings its events back).
//!
//! redb has a file format of its own (3 in redb 4.x, stated in the file's header), separate
//! from ours. redb supports only its current format: a file in an older one fails to open
//! with `UpgradeRequired`, and the upgrade (`Database::upgrade()`) exists only in the redb
//! release that reads both (2.6 for v2 → v3). So moving to a redb with a new file format needs
//! a release that still links the old redb and upgrades the file (or copies the records into a
//! new file with the new redb, as `buffer import` does per event), shipped before the release
//! that drops it. Both redb-format failures — a file older than this redb, and a newer one
//! (which redb reports as corrupt) — are refused here with the file untouched
//! ([`BufferError::RedbFormat`]), never moved aside.
//!
//! # Invariants
//! - Every [`store::Batch`] is one redb transaction with `Durability::Immediate`: one fsync.
//!   A batch is applied whole or not at all, counters included.
//! - A record leaves the file only because the upstream acknowledged it, its TTL passed, or
//!   the overflow policy dropped it; each of those is counted by the relay.
//! - Only the store thread ([`worker`]) owns the open [`store::Store`] while the gateway runs;
//!   it executes commands strictly in the order they were sent, so a read sent after a commit
//!   sees that commit.
//! - A file is moved aside (`buffer.redb.corrupt-<unix seconds>`, never deleted) only when its
//!   contents are proven corrupt: redb's own corruption verdicts, or counters that disagree
//!   with the records ([`BufferError::proves_corruption`]). The new file's epoch starts
//!   at the hours since the Unix epoch, so its ids do not repeat the old file's. Any other
//!   failure — another process holds the file, permissions, a read-only or full file system,
//!   an I/O error, a newer format — refuses to start and leaves the file as it is, with a
//!   message naming the path, its owner and mode, the user running and the fix ([`access`]).

pub mod access;
pub(crate) mod chunk;
pub mod file;
pub mod import;
pub mod inspect;
pub mod sessions;
pub mod store;
pub mod windows;
pub mod worker;

pub use file::{BufferError, Key, N_PRIORITIES, Record, StoredRetained};
pub use store::{Batch, DropRequest, LaneStats, OpenReport, RetainedLoad, Store};
