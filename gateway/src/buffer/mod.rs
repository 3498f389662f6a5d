//! Stage 3 support: the durable store-and-forward buffer.
//!
//! # On-disk layout
//! One redb file, `<data_dir>/buffer.redb`, with two tables:
//! - `events`: key `(priority: u8, seq: u64)`, value a CBOR map with `event_id`, `enqueued_ms`,
//!   `expires_ms`, `topic`, `qos`, `payload` (a byte string). Within one priority, key order
//!   is arrival order, so reading a key range is FIFO.
//! - `meta`: `epoch` (bumped durably at every start; ids are `epoch << 40 | n`, so they never
//!   repeat across restarts) and per-priority `events.<p>` / `bytes.<p>` counters, updated in
//!   the same transaction as the records they count.
//!
//! # Invariants
//! - Every [`store::Batch`] is one redb transaction with `Durability::Immediate`: one fsync.
//!   A batch is applied whole or not at all, counters included.
//! - A record leaves the file only because the upstream acknowledged it, its TTL passed, or
//!   the overflow policy dropped it; each of those is counted by the relay.
//! - Only the store thread ([`worker`]) owns the open [`store::Store`] while the gateway runs;
//!   it executes commands strictly in the order they were sent, so a read sent after a commit
//!   sees that commit.
//! - A file that cannot be opened or whose counters disagree with its contents is moved aside
//!   (`buffer.redb.corrupt-<unix seconds>`), never deleted, and a new file is started.

pub mod inspect;
pub mod store;
pub mod worker;

pub use store::{Batch, BufferError, DropRequest, Key, LaneStats, N_PRIORITIES, OpenReport, Record, Store};
