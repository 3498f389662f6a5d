//! Incremental checkpoints: what changed in a rule's windows since the last delta.
//!
//! A full snapshot of 10,000 open groups is about 1 MB; checkpointed at every group commit
//! that is tens of MB/s. A caller that checkpoints often writes one full snapshot, then
//! deltas ([`WindowState::take_delta`](super::WindowState::take_delta)): per rule, its
//! clocks, sequence and counters (always), and the groups changed and removed since the
//! previous delta.
//!
//! A group's `dirty` flag goes up at any change, and the first time since the last delta
//! its key is listed (a copy, into a string kept from earlier deltas: no allocation in a
//! steady state); the delta writes the listed groups whose flag is up. A list, not a scan of every group's flag: with 10,000 groups
//! and a delta every 25 ms the scan walked about 1 MB of table 40 times a second, most of
//! it not in cache, for a few hundred changed groups (the gateway's profile put it at about
//! 0.5 µs per reading); the list costs a short copy and one lookup per changed group. A key removed
//! (closed, evicted, emptied, flushed) goes into a set, and a key removed then made again
//! is an upsert, not a removal. Deltas are written in format 2 (`codec`), straight from the
//! live groups.
//!
//! **Invariants:**
//! - A snapshot followed by every delta taken since it, in order and none skipped, gives a
//!   state equal to the live one (`window::tests`, `run::tests`).
//! - Tracking is bounded by the state, whether or not anyone takes deltas: once the keys
//!   listed (changed and removed keys) outnumber twice the live
//!   groups (plus [`SLACK`]), the lists are dropped and the next delta is *whole* (every
//!   group, and "remove the rest"), no larger than a snapshot.

use rustc_hash::FxHashSet;
use serde::Deserialize;

use super::codec::{FORMAT, Reader, Writer, decode_counters, encode_counters, is_format_1};
use super::{Group, SnapshotError, WindowCounters, WindowPlan, Windows, same_windows};

/// Keys of a rule's state that changed, and that were removed, since the last delta. Not
/// state: equal whatever it holds, so a state restored from a log equals the live one.
#[derive(Debug, Clone)]
pub(crate) struct Changes<K> {
    /// Keys changed since the last delta, in the order of their first change. A key may be
    /// listed twice (removed, then made again); the taker skips the repeats.
    pub(crate) changed: Vec<K>,
    /// Keys removed since the last delta; those that exist again at the delta are upserts.
    pub(crate) removed: FxHashSet<K>,
    /// Report by exception: the sequence number at the last delta. Every change of an entry
    /// gives it a later one, so an entry last used after it is listed already.
    pub(crate) since_seq: u64,
    /// The changes outgrew the state: the next delta holds all of it, and nothing is listed
    /// until then.
    pub(crate) whole: bool,
    /// Window groups: the strings of keys listed before the last delta, kept for the next
    /// ones (at most [`SPARE`]), so that listing a key copies it without an allocation.
    spare: Vec<String>,
}

/// Key strings [`Changes::spare`] keeps: about a delta's worth in the gateway (10,000
/// readings a second, a delta every 25 ms), not a burst's.
const SPARE: usize = 1_024;

/// Listed keys allowed beyond twice the live ones before the next delta goes whole: a
/// small state then still gets small deltas. Tests' states are small: they go whole
/// sooner, so that the model tests take both paths.
pub(crate) const SLACK: usize = if cfg!(test) { 8 } else { 256 };

impl<K> Default for Changes<K> {
    fn default() -> Changes<K> {
        Changes {
            changed: Vec::new(),
            removed: FxHashSet::default(),
            since_seq: 0,
            whole: false,
            spare: Vec::new(),
        }
    }
}

impl<K> Changes<K> {
    /// Goes whole if the lists outgrew a state of `live` keys. Called where lists grow by
    /// more than one per live key (a key made again, a removal), so that they stay bounded.
    pub(crate) fn bound(&mut self, live: usize) {
        if !self.whole && self.changed.len() + self.removed.len() > 2 * live + SLACK {
            self.changed = Vec::new();
            self.removed = FxHashSet::default();
            self.whole = true;
        }
    }

    /// Notes that `key` was removed (made by `key`, not cloned, while whole).
    pub(crate) fn removed(&mut self, key: impl FnOnce() -> K)
    where
        K: Eq + std::hash::Hash,
    {
        if !self.whole {
            self.removed.insert(key());
        }
    }

    /// Takes the lists for a delta, leaving them empty (their capacity with them: a burst
    /// must not keep its memory).
    pub(crate) fn take(&mut self) -> (bool, Vec<K>, FxHashSet<K>) {
        let whole = std::mem::take(&mut self.whole);
        (whole, std::mem::take(&mut self.changed), std::mem::take(&mut self.removed))
    }
}

impl Changes<String> {
    /// Notes that the window group `key` changed (nothing while whole): called once
    /// between deltas, when its flag goes up. The copy goes into a spare string.
    pub(crate) fn changed_key(&mut self, key: &str) {
        if !self.whole {
            let mut copy = self.spare.pop().unwrap_or_default();
            copy.clear();
            copy.push_str(key);
            self.changed.push(copy);
        }
    }

    /// Keeps the strings of keys a delta was written from, for the next ones.
    fn recycle(&mut self, keys: Vec<String>) {
        let room = SPARE.saturating_sub(self.spare.len());
        self.spare.extend(keys.into_iter().take(room));
    }
}

impl<K> PartialEq for Changes<K> {
    fn eq(&self, _other: &Changes<K>) -> bool {
        true
    }
}

/// One rule's delta as format 1 wrote it (read only): its meta whole, its groups upserted
/// and removed.
#[derive(Deserialize)]
pub(super) struct WindowsDelta<P, G> {
    /// Whole, so that a delta of a rule the snapshot does not have can start it.
    plan: P,
    /// `upserted` is every group: the others are removed.
    whole: bool,
    next_seq: u64,
    watermark: u64,
    event_clock: u64,
    last_arrival: u64,
    deadline: u64,
    counters: WindowCounters,
    upserted: Vec<G>,
    removed: Vec<String>,
}

pub(super) type DeltaIn = WindowsDelta<WindowPlan, (String, Group)>;

/// Format 1's version of a rule's delta (`{"version": 1, "delta": …}`).
const DELTA_VERSION_1: u32 = 1;

#[derive(Deserialize)]
struct Delta<D> {
    version: u32,
    delta: D,
}

impl Windows {
    /// What changed since the last [`Windows::take_delta`] or [`Windows::clear_changes`],
    /// as CBOR (`[format, delta]`); resets the tracking. [`Windows::restore_log`] reads it
    /// after a snapshot.
    pub fn take_delta(&mut self) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(2);
        w.uint(FORMAT);
        self.encode_delta(&mut w);
        w.bytes
    }

    /// Forgets the change tracking: the caller just took a full [`Windows::snapshot`].
    pub fn clear_changes(&mut self) {
        self.changes.take();
        self.groups.values_mut().for_each(|group| group.dirty = false);
    }

    /// The state a [`Windows::snapshot`] followed by deltas (in the order taken) describes,
    /// for a rule that now has `plan` (refused as [`Windows::restore`] refuses). Either
    /// format, or both in one log (a log begun before an upgrade).
    pub fn restore_log<'a>(
        plan: &WindowPlan,
        base: &[u8],
        deltas: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Windows, SnapshotError> {
        let mut windows = Windows::decode_snapshot(base)?;
        for bytes in deltas {
            let delta = if is_format_1(bytes) {
                let delta: Delta<DeltaIn> =
                    ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
                if delta.version != DELTA_VERSION_1 {
                    return Err(SnapshotError::Version(delta.version));
                }
                delta.delta
            } else {
                let mut r = Reader::new(bytes);
                r.record(2)?;
                let delta = decode_delta(&mut r)?;
                r.end()?;
                delta
            };
            windows.apply(delta);
        }
        windows.fitted(plan)
    }

    /// This rule's delta in format 2, written from the live state; resets the tracking:
    /// `[plan, whole, next_seq, watermark, event_clock, last_arrival, deadline, counters,
    /// [group…], [removed key…]]`, groups as in a snapshot (`window::codec`), the changed
    /// ones in the order of their first change (see the module's doc).
    pub(super) fn encode_delta(&mut self, w: &mut Writer) {
        let (whole, changed_keys, removed) = self.changes.take();
        w.array(10);
        w.serde(&self.plan);
        w.bool(whole);
        w.uint(self.next_seq);
        w.uint(self.watermark);
        w.uint(self.event_clock);
        w.uint(self.last_arrival);
        w.uint(self.deadline);
        encode_counters(&self.counters, w);
        // The array's length is filled in after: the listed keys may name groups removed
        // since, or repeat one removed and made again (written once: its flag goes down).
        let at = w.open_array();
        let mut changed = 0;
        if whole {
            for (key, group) in &mut self.groups {
                group.dirty = false;
                group.encode(key, w);
                changed += 1;
            }
        } else {
            for key in &changed_keys {
                if let Some(group) = self.groups.get_mut(key.as_str()).filter(|g| g.dirty) {
                    group.dirty = false;
                    group.encode(key, w);
                    changed += 1;
                }
            }
        }
        w.close_array(at, changed);
        self.changes.recycle(changed_keys);
        let at = w.open_array();
        let mut n_removed = 0;
        for key in removed.iter().filter(|key| !self.groups.contains_key(key.as_str())) {
            w.str(key);
            n_removed += 1;
        }
        w.close_array(at, n_removed);
    }

    /// Applies a delta to the state it follows. A delta of a rule whose windows changed (the
    /// caller reloaded without writing a snapshot) restarts the rule from the delta, as it
    /// would a rule the snapshot does not have.
    pub(super) fn apply(&mut self, delta: DeltaIn) {
        if !same_windows(&self.plan, &delta.plan) {
            *self = Windows::new(delta.plan.clone());
        }
        self.plan = delta.plan;
        self.next_seq = delta.next_seq;
        self.watermark = delta.watermark;
        self.event_clock = delta.event_clock;
        self.last_arrival = delta.last_arrival;
        self.deadline = delta.deadline;
        self.counters = delta.counters;
        if delta.whole {
            self.groups.clear();
        }
        for key in delta.removed {
            self.groups.remove(key.as_str());
        }
        self.groups.extend(delta.upserted.into_iter().map(|(key, group)| (key.into_boxed_str(), group)));
        self.count_due();
    }

    /// A rule started from a delta (the snapshot does not have it).
    pub(super) fn from_delta(delta: DeltaIn) -> Windows {
        let mut windows = Windows::new(delta.plan.clone());
        windows.apply(delta);
        windows
    }
}

/// A rule's delta in format 2 ([`Windows::encode_delta`]).
pub(super) fn decode_delta(r: &mut Reader<'_>) -> Result<DeltaIn, SnapshotError> {
    r.fields(10, "a rule's delta")?;
    let plan = r.serde()?;
    let whole = r.bool()?;
    let (next_seq, watermark, event_clock, last_arrival, deadline) =
        (r.uint()?, r.uint()?, r.uint()?, r.uint()?, r.uint()?);
    let counters = decode_counters(r)?;
    let n = r.array()?;
    let mut upserted = Vec::with_capacity(n);
    for _ in 0..n {
        upserted.push(Group::decode(r)?);
    }
    let n = r.array()?;
    let mut removed = Vec::with_capacity(n);
    for _ in 0..n {
        removed.push(r.string()?);
    }
    Ok(WindowsDelta {
        plan,
        whole,
        next_seq,
        watermark,
        event_clock,
        last_arrival,
        deadline,
        counters,
        upserted,
        removed,
    })
}
