//! QoS 2 markers: which (client id, packet id) readings the stateful rules took in and whose
//! PUBREL has not been taken yet.
//!
//! A QoS 2 reading absorbed into a window is acknowledged (PUBREC) once a checkpoint holding
//! it commits. A crash after that commit and before the PUBREC leaves the sensor to send it
//! again (DUP) after reconnecting, and the restarted gateway, whose connection state was in
//! memory, would count it twice. The marker is in the same checkpoint as the reading (it is
//! part of [`WindowState`](super::WindowState): full snapshots, deltas, `restore_log`), so
//! after the restart the resend is recognised and the windows skip it; the PUBREL that
//! follows removes the marker, and its PUBCOMP waits until the removal is durable too, or a
//! marker left behind by a crash would swallow the sensor's next reading with that packet id.
//!
//! **Bound:** at most `max` markers (default [`MAX_MARKS`]: 1,000 in flight per connection
//! × 100 sensors publishing QoS 2 into stateful rules at once); beyond it the oldest is
//! dropped and counted. A dropped marker can cost one reading counted twice after a crash,
//! never a reading lost. Memory, counted with a counting allocator for 10,000 and 100,000
//! markers: 139–158 B per marker while the client id is shared with its connection's
//! events, 171–190 B after a restart (an allocation per marker for an 11-character id):
//! a map entry, an order entry and the change set's, with their tables' slack. A snapshot
//! holds about 4 bytes plus the client id per marker.
//!
//! Change tracking follows `delta`'s: a key whose presence changed since the last delta is
//! listed once; the delta carries the keys present (in the order they were marked) and the
//! keys removed, so a snapshot and its deltas give the live markers in the live order.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

/// The markers kept at most, unless the caller says otherwise.
pub const MAX_MARKS: usize = 100_000;

type Key = (Arc<str>, u16);

/// The markers of one [`WindowState`](super::WindowState).
#[derive(Debug, Clone)]
pub(crate) struct Marks {
    /// Each marker's place in `order`.
    by_key: FxHashMap<Key, u64>,
    /// Oldest first.
    order: BTreeMap<u64, Key>,
    next: u64,
    /// Markers dropped at the bound, over the state's life (kept in checkpoints).
    dropped: u64,
    max: usize,
    /// Keys marked or removed since the last delta (not state).
    changed: FxHashSet<Key>,
}

impl Default for Marks {
    fn default() -> Marks {
        Marks::new(MAX_MARKS)
    }
}

/// Equal when the same markers are kept in the same order and as many were dropped: what a
/// snapshot and its deltas must restore (places and change tracking are not state).
impl PartialEq for Marks {
    fn eq(&self, other: &Marks) -> bool {
        self.dropped == other.dropped && self.order.values().eq(other.order.values())
    }
}

/// Every marker, oldest first, as a full snapshot holds them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct MarksSnapshot {
    marks: Vec<(String, u16)>,
    dropped: u64,
}

/// What changed since the previous delta: markers present (oldest first) and removed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct MarksDelta {
    marked: Vec<(String, u16)>,
    removed: Vec<(String, u16)>,
    dropped: u64,
}

impl Marks {
    pub fn new(max: usize) -> Marks {
        Marks {
            by_key: FxHashMap::default(),
            order: BTreeMap::new(),
            next: 0,
            dropped: 0,
            max: max.max(1),
            changed: FxHashSet::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Markers dropped at the bound so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn contains(&self, client: &Arc<str>, packet_id: u16) -> bool {
        self.by_key.contains_key(&(Arc::clone(client), packet_id))
    }

    /// Marks a reading (again: it becomes the newest). Returns whether the oldest marker was
    /// dropped to make room.
    pub fn mark(&mut self, client: &Arc<str>, packet_id: u16) -> bool {
        let key = (Arc::clone(client), packet_id);
        if let Some(at) = self.by_key.remove(&key) {
            self.order.remove(&at);
        }
        let mut dropped = false;
        if self.order.len() >= self.max
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.by_key.remove(&oldest);
            self.changed.insert(oldest);
            self.dropped += 1;
            dropped = true;
        }
        self.insert(key);
        dropped
    }

    fn insert(&mut self, key: Key) {
        let at = self.next;
        self.next += 1;
        self.by_key.insert(key.clone(), at);
        self.order.insert(at, key.clone());
        self.changed.insert(key);
    }

    /// Removes a marker; whether there was one.
    pub fn unmark(&mut self, client: &Arc<str>, packet_id: u16) -> bool {
        let key = (Arc::clone(client), packet_id);
        let Some(at) = self.by_key.remove(&key) else { return false };
        self.order.remove(&at);
        self.changed.insert(key);
        true
    }

    pub(crate) fn snapshot(&self) -> MarksSnapshot {
        MarksSnapshot {
            marks: self.order.values().map(|(c, p)| (c.to_string(), *p)).collect(),
            dropped: self.dropped,
        }
    }

    /// The markers a snapshot held, within `max` (the newest kept).
    pub(crate) fn restore(snapshot: MarksSnapshot, max: usize) -> Marks {
        let mut marks = Marks::new(max);
        marks.dropped = snapshot.dropped;
        let skip = snapshot.marks.len().saturating_sub(marks.max);
        for (client, packet_id) in snapshot.marks.into_iter().skip(skip) {
            marks.insert((Arc::from(client), packet_id));
        }
        marks.clear_changes();
        marks
    }

    pub(crate) fn delta(&mut self) -> MarksDelta {
        let mut marked: Vec<(u64, String, u16)> = Vec::new();
        let mut removed = Vec::new();
        for (client, packet_id) in self.changed.drain() {
            match self.by_key.get(&(Arc::clone(&client), packet_id)) {
                Some(&at) => marked.push((at, client.to_string(), packet_id)),
                None => removed.push((client.to_string(), packet_id)),
            }
        }
        marked.sort_unstable_by_key(|(at, ..)| *at);
        MarksDelta {
            marked: marked.into_iter().map(|(_, c, p)| (c, p)).collect(),
            removed,
            dropped: self.dropped,
        }
    }

    /// Applies a delta taken after the state this one holds.
    pub(crate) fn apply(&mut self, delta: MarksDelta) {
        for (client, packet_id) in delta.removed {
            self.unmark(&Arc::from(client), packet_id);
        }
        for (client, packet_id) in delta.marked {
            let key = (Arc::from(client), packet_id);
            if let Some(at) = self.by_key.remove(&key) {
                self.order.remove(&at);
            }
            self.insert(key);
        }
        self.dropped = delta.dropped;
        while self.order.len() > self.max {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.by_key.remove(&oldest);
        }
        self.clear_changes();
    }

    pub(crate) fn clear_changes(&mut self) {
        self.changed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Arc<str> {
        Arc::from(format!("sensor-{n}"))
    }

    #[test]
    fn the_oldest_marker_is_dropped_at_the_bound_and_counted() {
        let mut marks = Marks::new(3);
        for n in 0..3 {
            assert!(!marks.mark(&id(n), 1));
        }
        // Marking again makes it the newest: sensor-1 is now the oldest but one.
        assert!(!marks.mark(&id(0), 1));
        assert!(marks.mark(&id(9), 7), "full: the oldest goes");
        assert_eq!((marks.len(), marks.dropped()), (3, 1));
        assert!(!marks.contains(&id(1), 1), "sensor-1 was the oldest");
        assert!(marks.contains(&id(0), 1) && marks.contains(&id(2), 1) && marks.contains(&id(9), 7));
        assert!(marks.unmark(&id(9), 7));
        assert!(!marks.unmark(&id(9), 7), "only once");
        assert!(!marks.contains(&id(0), 2), "the packet id is part of the key");
    }

    #[test]
    fn a_snapshot_and_its_deltas_give_the_live_markers_in_order() {
        let mut live = Marks::new(4);
        live.mark(&id(1), 1);
        live.mark(&id(2), 1);
        let snapshot = live.snapshot();
        live.clear_changes();
        let mut deltas = Vec::new();
        live.mark(&id(3), 1);
        live.unmark(&id(1), 1);
        live.mark(&id(1), 1); // removed and made again: an upsert, now the newest
        deltas.push(live.delta());
        live.mark(&id(4), 5);
        live.mark(&id(5), 5); // the bound drops sensor-2
        live.mark(&id(6), 6); // and sensor-3
        live.unmark(&id(4), 5);
        deltas.push(live.delta());
        assert_eq!(live.dropped(), 2);
        let mut restored = Marks::restore(snapshot, 4);
        for delta in deltas {
            // Through CBOR, as the checkpoint log holds it.
            let mut bytes = Vec::new();
            ciborium::into_writer(&delta, &mut bytes).expect("encode");
            restored.apply(ciborium::from_reader(bytes.as_slice()).expect("decode"));
        }
        assert_eq!(restored, live);
        let order: Vec<String> = restored.order.values().map(|(c, p)| format!("{c}/{p}")).collect();
        assert_eq!(order, ["sensor-1/1", "sensor-5/5", "sensor-6/6"]);
        // Nothing changed since: an empty delta.
        let empty = live.delta();
        assert!(empty.marked.is_empty() && empty.removed.is_empty());
    }

    #[test]
    fn a_snapshot_with_more_than_the_bound_keeps_the_newest() {
        let mut big = Marks::new(10);
        for n in 0..10 {
            big.mark(&id(n), 1);
        }
        let restored = Marks::restore(big.snapshot(), 4);
        assert_eq!(restored.len(), 4);
        assert!(
            restored.contains(&id(9), 1) && restored.contains(&id(6), 1) && !restored.contains(&id(5), 1)
        );
    }
}
