//! Incremental checkpoints: what changed in a rule's windows since the last delta.
//!
//! A full snapshot of 10,000 open groups is about 1 MB; checkpointed at every group commit
//! that is tens of MB/s. A caller that checkpoints often writes one full snapshot, then
//! deltas ([`WindowState::take_delta`](super::WindowState::take_delta)): per rule, its
//! clocks, sequence and counters (always), and the groups changed and removed since the
//! previous delta.
//!
//! Tracking is paid per group per delta, not per event: a group's `dirty` flag goes up at
//! its first change since the last delta, and its key is listed then (one clone); a key
//! removed (closed, evicted, emptied, flushed) goes into a set, and a key removed then made
//! again is an upsert, not a removal.
//!
//! **Invariants:**
//! - A snapshot followed by every delta taken since it, in order and none skipped, gives a
//!   state equal to the live one (`window::tests`, `run::tests`).
//! - Tracking is bounded by the state, whether or not anyone takes deltas: once the keys
//!   listed outnumber twice the live groups (plus [`SLACK`]), the lists are dropped and the
//!   next delta is *whole* (every group, and "remove the rest"), no larger than a snapshot.

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use super::{
    Group, SNAPSHOT_VERSION, Snapshot, SnapshotError, WindowCounters, WindowPlan, Windows, same_windows,
};

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
}

/// Listed keys allowed beyond twice the live ones before the next delta goes whole: a
/// small state then still gets small deltas. Tests' states are small: they go whole
/// sooner, so that the model tests take both paths.
pub(crate) const SLACK: usize = if cfg!(test) { 8 } else { 256 };

impl<K> Default for Changes<K> {
    fn default() -> Changes<K> {
        Changes { changed: Vec::new(), removed: FxHashSet::default(), since_seq: 0, whole: false }
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

impl<K> PartialEq for Changes<K> {
    fn eq(&self, _other: &Changes<K>) -> bool {
        true
    }
}

/// One rule's delta: its meta whole, its groups upserted and removed. `P` and `G` are
/// borrowed to write it (no group is cloned) and owned to read it.
#[derive(Serialize, Deserialize)]
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

pub(super) type DeltaOut<'a> = WindowsDelta<&'a WindowPlan, (&'a str, &'a Group)>;
pub(super) type DeltaIn = WindowsDelta<WindowPlan, (String, Group)>;

pub(super) const DELTA_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Delta<D> {
    version: u32,
    delta: D,
}

impl Windows {
    /// What changed since the last [`Windows::take_delta`] or [`Windows::clear_changes`],
    /// as CBOR; resets the tracking. [`Windows::restore_log`] reads it after a snapshot.
    pub fn take_delta(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        // Writing into a Vec fails only on a serializer bug; restore_log then says so.
        let _ = ciborium::into_writer(&Delta { version: DELTA_VERSION, delta: self.delta() }, &mut bytes);
        bytes
    }

    /// Forgets the change tracking: the caller just took a full [`Windows::snapshot`].
    pub fn clear_changes(&mut self) {
        let (whole, changed, _) = self.changes.take();
        if whole {
            self.groups.values_mut().for_each(|group| group.dirty = false);
        }
        for key in changed {
            if let Some(group) = self.groups.get_mut(&key) {
                group.dirty = false;
            }
        }
    }

    /// The state a [`Windows::snapshot`] followed by deltas (in the order taken) describes,
    /// for a rule that now has `plan` (refused as [`Windows::restore`] refuses).
    pub fn restore_log<'a>(
        plan: &WindowPlan,
        base: &[u8],
        deltas: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Windows, SnapshotError> {
        let snapshot: Snapshot<Windows> =
            ciborium::from_reader(base).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(snapshot.version));
        }
        let mut windows = snapshot.windows;
        for bytes in deltas {
            let delta: Delta<DeltaIn> =
                ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
            if delta.version != DELTA_VERSION {
                return Err(SnapshotError::Version(delta.version));
            }
            windows.apply(delta.delta);
        }
        windows.fitted(plan)
    }

    /// This rule's delta, borrowing what it writes; resets the tracking.
    pub(super) fn delta(&mut self) -> DeltaOut<'_> {
        let (whole, mut keys, removed) = self.changes.take();
        if whole {
            self.groups.values_mut().for_each(|group| group.dirty = false);
        }
        // The flag goes down at a key's first listing: a repeat (the group was removed and
        // made again) finds it down and is skipped, and so is a key of a removed group.
        keys.retain(|key| match self.groups.get_mut(key) {
            Some(group) if group.dirty => {
                group.dirty = false;
                true
            }
            _ => false,
        });
        let groups = &self.groups;
        let (upserted, removed) = if whole {
            (groups.iter().map(|(key, group)| (key.as_str(), group)).collect(), Vec::new())
        } else {
            (
                keys.iter()
                    .filter_map(|key| groups.get_key_value(key.as_str()))
                    .map(|(key, group)| (key.as_str(), group))
                    .collect(),
                removed.into_iter().filter(|key| !groups.contains_key(key)).collect(),
            )
        };
        WindowsDelta {
            plan: &self.plan,
            whole,
            next_seq: self.next_seq,
            watermark: self.watermark,
            event_clock: self.event_clock,
            last_arrival: self.last_arrival,
            deadline: self.deadline,
            counters: self.counters,
            upserted,
            removed,
        }
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
            self.groups.remove(&key);
        }
        self.groups.extend(delta.upserted);
    }

    /// A rule started from a delta (the snapshot does not have it).
    pub(super) fn from_delta(delta: DeltaIn) -> Windows {
        let mut windows = Windows::new(delta.plan.clone());
        windows.apply(delta);
        windows
    }
}
