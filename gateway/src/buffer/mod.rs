//! Stage 3 support: the durable store-and-forward buffer.
//!
//! # On-disk layout
//! One redb file, `<data_dir>/buffer.redb`, with four tables:
//! - `events`: key `(priority: u8, seq: u64)`, value a CBOR map with `event_id`, `enqueued_ms`,
//!   `expires_ms`, `topic`, `qos`, `payload` (a byte string). Within one priority, key order
//!   is arrival order, so reading a key range is FIFO.
//! - `meta`: `format_version` (see below), `epoch` (bumped durably at every start; ids are
//!   `epoch << 40 | n`, so they never repeat across restarts) and per-priority `events.<p>` /
//!   `bytes.<p>` counters, updated in the same transaction as the records they count.
//! - `imported`: the fingerprints (`event_id`, content hash) of events `outpost buffer import`
//!   brought in, so a second import of the same file adds nothing ([`import`]).
//! - `retained`: the local broker's retained messages, key the topic, value a CBOR map
//!   ([`StoredRetained`]: QoS, payload, expiry in Unix ms, MQTT 5 properties). Written by
//!   the store thread ([`worker::Command::Retain`]) in the broker's order, read once at start.
//! - `windows`: the route stage's checkpoint of its stateful rules' state (open windows,
//!   report-by-exception memory), one row `state` holding a CBOR snapshot, replaced whole by
//!   each checkpoint ([`worker::Command::Checkpoint`]), read once at start ([`windows`]).
//!
//! # Format versions
//! [`store::FORMAT_VERSION`] is 6. Version 1 is a file without the `format_version` key (every
//! release before it); version 2 added the `imported` table, version 3 the `retained` table,
//! version 6 the `windows` table (4 and 5 belong to changes on other branches; each step is
//! written as "older than N → add what N added", so they compose in any merge order).
//! Opening an older file adds the key and the missing tables in the same transaction as the
//! epoch bump, and leaves the records as they are (tested with
//! `gateway/tests/fixtures/buffer-v1.redb`, written by that release, and with a version-2 file
//! made in the test). Releases that know version 2 refuse a version-3 file (newer format). A file with a higher
//! version was written by a newer release: it is refused before anything writes to it (a
//! read-only open reads the version), and the message names both versions. A future change
//! bumps the version, adds its migration next to the 1 → 2 one, and keeps a fixture of the
//! version before it. Note that releases before version 2 do not check the version: they
//! open a version-2 file as if it were theirs (which works: version 2 only adds).
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
pub mod file;
pub mod import;
pub mod inspect;
pub mod store;
pub mod windows;
pub mod worker;

pub use file::{BufferError, Key, N_PRIORITIES, Record, StoredRetained};
pub use store::{Batch, DropRequest, LaneStats, OpenReport, RetainedLoad, Store};
