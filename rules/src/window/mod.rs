//! Windows and aggregates: the state a windowed rule keeps between events, per group key.
//!
//! The engine is driven by the caller's clock: [`Windows::push`] takes an event's time,
//! group key and aggregate inputs; [`Windows::advance`]`(now)` closes every window whose end
//! is at or before `now` and returns it as a [`Closed`]. Nothing here reads a clock or
//! sleeps, so tests drive time by hand and a restart replays nothing. With event time
//! ([`TimeBasis::Event`]) [`Windows::push_event`] takes the event's own time and its
//! receive time, and windows close on the rule's watermark, not on `now`.
//!
//! **Invariants:**
//! - State is bounded: at most [`WindowPlan::max_groups`] groups; per group at most
//!   [`spec::MAX_OVERLAP`] open window instances (hopping) or [`spec::MAX_RETAINED`] kept
//!   events (sliding, overlapping count windows); each aggregate's state is bounded
//!   (`agg`).
//! - With a partitioning window (tumbling, session, `COUNTWINDOW(n)`, hopping with
//!   hop = size) every pushed event is in exactly one [`Closed`] window or still in an open
//!   one, including across [`Windows::snapshot`] / [`Windows::restore`] and group eviction;
//!   a late event (its window already closed) is counted in [`WindowCounters::late`] and in
//!   no window. `window::tests` checks this against a model with random crash points, for
//!   processing and for event time.
//! - The watermark never moves back, also across a snapshot and restore: a window once
//!   closed is never reopened.
//! - Group eviction: a push for a new group when `max_groups` groups are open first closes
//!   the group seen least recently (its open windows are emitted at once, marked
//!   [`Closed::early`]) — no event is dropped, but that group's window is split in two.
//!   Kept events of sliding and overlapping count windows (already emitted in earlier
//!   windows) are dropped with the group.
//! - Output order is deterministic: by window end, then start, then group key.
//! - In hold mode ([`Windows::hold_event_closings`], how the gateway runs with checkpoints)
//!   nothing comes out of [`Windows::push`] or [`Windows::push_event`]: what an event closes
//!   is kept, computed as it would have come out, in its group's held list (state: in
//!   snapshots and deltas) until [`Windows::release`], so a caller can send it only once a
//!   checkpoint holding it is durable, and a restored state gives it again, the same.
//!   `window::tests` checks that the released closings are exactly those given at once.

mod agg;
pub(crate) mod codec;
mod delta;
mod marks;
mod run;
pub mod spec;
pub(crate) mod sql;

pub use marks::MAX_MARKS;
pub use run::{DueMarks, Marked, WindowOrigin, WindowState};

#[cfg(test)]
mod sql_tests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use agg::AggState;
pub use agg::{AggKind, DEFAULT_COLLECT_CAP, MAX_COLLECT_CAP, SKETCH_MAX_BUCKETS, SKETCH_RELATIVE_ACCURACY};
use codec::{Reader, Writer};
pub(crate) use delta::Changes;
pub use spec::{MAX_OVERLAP, MAX_RETAINED, WindowSpec};

use crate::value::Value;

/// The groups a windowed rule keeps when its rule does not say.
pub const DEFAULT_MAX_GROUPS: usize = 10_000;

/// What a windowed rule computes: its window and its aggregates, in column order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowPlan {
    pub spec: WindowSpec,
    pub aggs: Vec<AggKind>,
    /// Open groups at most; see the module doc for eviction.
    pub max_groups: usize,
    /// Which clock places events in windows and closes them. Snapshots written before
    /// event time existed have none: processing time.
    #[serde(default)]
    pub time: TimeBasis,
}

/// The clock of a windowed rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TimeBasis {
    /// An event's time is when the gateway received it; windows close on the gateway's
    /// clock ([`Windows::advance`]).
    #[default]
    Processing,
    /// An event's time is read from its payload (`field`, as the rule wrote it; the caller
    /// reads it). The rule's event clock is the latest event time seen, never ahead of the
    /// gateway's clock; the watermark is that clock minus `tolerance_ms`, and a window
    /// closes once the watermark reaches its end. After `idle_ms` without an event the
    /// event clock runs on with the gateway's clock from the last event's time, so a quiet
    /// rule's windows still close.
    Event { field: String, tolerance_ms: u64, idle_ms: u64 },
}

/// What an event-time rule does with an event too late (or too far ahead) for its
/// windows; it is counted either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatePolicy {
    #[default]
    Drop,
    /// To the dead letters, with a reason saying how late it was.
    #[serde(rename = "deadletter")]
    DeadLetter,
}

/// The idle timeout of an event-time rule that does not set one: its lateness tolerance,
/// but at least this (a zero tolerance would otherwise tick the clock between any two
/// events).
pub const MIN_IDLE_MS: u64 = 1_000;

/// One closed window of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closed {
    pub key: String,
    /// `window_start()`: inclusive, Unix milliseconds. For count and session windows the
    /// time of the first event in it.
    pub start_ms: u64,
    /// `window_end()`: exclusive for time windows; for count windows the time of the last
    /// event in it, for sliding windows the triggering event's time.
    pub end_ms: u64,
    /// Events in the window.
    pub events: u64,
    /// One value per [`WindowPlan::aggs`], in order.
    pub values: Vec<Value>,
    /// Closed before its end because its group was evicted.
    pub early: bool,
    /// For windows that close on an event (count, sliding): the rule's sequence number of
    /// that closing, which tells apart two windows of one group closed in the same
    /// millisecond (same bounds); part of their outputs' id. `None` for windows the clock
    /// closes, whose bounds alone name them. Not encoded with the closing: [`Windows::release`]
    /// sets it from the held closing's own sequence number, which the state keeps, so a
    /// closing given again after a restore has the same.
    #[serde(skip)]
    pub seq: Option<u64>,
}

/// What happened to a pushed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Accepted,
    /// Its window had already closed: in no window, counted.
    Late,
    /// Event time only: so far ahead of the watermark that its group would need more than
    /// [`MAX_OVERLAP`] open windows. In no window, counted.
    Ahead,
}

/// Counters a caller exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCounters {
    pub late: u64,
    /// Event time only: events refused as [`Pushed::Ahead`].
    #[serde(default)]
    pub ahead: u64,
    pub groups_evicted: u64,
    /// Kept events of sliding / overlapping count windows beyond [`MAX_RETAINED`].
    pub retained_dropped: u64,
}

/// The state of one windowed rule. Written in format 2 (`codec`); `Deserialize` reads
/// format 1.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct Windows {
    plan: WindowPlan,
    /// Keys as `Box<str>`: 8 bytes less than a `String` in every slot of the table.
    groups: FxHashMap<Box<str>, Group>,
    /// Orders groups by last use, for eviction.
    next_seq: u64,
    /// Windows ending at or before it are closed, and an event that belongs only to them
    /// is late. Processing time: the latest `now` passed to [`Windows::advance`]. Event
    /// time: the event clock minus the tolerance. It never moves back, also across a
    /// restore, so a restart does not reopen a closed window.
    watermark: u64,
    /// Event time: the latest event time seen, each capped at its receive time.
    #[serde(default)]
    event_clock: u64,
    /// Event time: the gateway's clock at the latest event (for the idle timeout).
    #[serde(default)]
    last_arrival: u64,
    /// No window closes before this; `advance` skips its scan until then.
    deadline: u64,
    counters: WindowCounters,
    /// Which groups changed since the last delta ([`WindowState::take_delta`]); not state:
    /// never serialized, and ignored by equality.
    #[serde(skip)]
    changes: Changes<String>,
    /// The caller's mode ([`Windows::hold_event_closings`]), not state: never serialized,
    /// and ignored by equality.
    #[serde(skip)]
    hold: Hold,
    /// Groups whose held list ([`Group::due`]) is not empty, so that [`Windows::has_due`]
    /// (asked at every checkpoint) is not a scan of every group. Kept where a held list
    /// changes, counted again where groups are decoded or replaced; equal in a state
    /// restored from a log and the live one (the model tests compare them).
    #[serde(skip)]
    due_groups: usize,
    /// Buffers the per-event path (`run::push`) reuses, so an event allocates none for its
    /// group key's text or its aggregate inputs. Not state.
    #[serde(skip)]
    pub(crate) scratch: Scratch,
}

/// See [`Windows::scratch`]: emptied before each use, only the capacity is kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scratch {
    /// The group key's values, then its text (JSON, as `Value::to_json_string` writes an
    /// array of them).
    pub(crate) keys: Vec<Value>,
    pub(crate) key: Vec<u8>,
    /// One value per aggregate.
    pub(crate) inputs: Vec<Value>,
}

impl PartialEq for Scratch {
    fn eq(&self, _other: &Scratch) -> bool {
        true
    }
}

/// Whether windows that close on an event are held in their group ([`Group::due`]) until
/// [`Windows::release`] instead of coming out at once.
#[derive(Debug, Clone, Copy, Default)]
struct Hold(bool);

impl PartialEq for Hold {
    fn eq(&self, _other: &Hold) -> bool {
        true
    }
}

/// A window an event closed while closings are held: its output, computed at the event,
/// and the sequence number (`Windows::next_seq`) it was held at.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Due {
    seq: u64,
    closed: Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Group {
    seq: u64,
    state: GroupState,
    /// Windows of this group (or of groups its creation evicted) an event closed, held
    /// until [`Windows::release`]; state like the open windows, so checkpoints hold them.
    /// Absent from snapshots written before held closings existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    due: Vec<Due>,
    /// Changed since the last delta (its key then listed): the next delta holds it (`delta`).
    #[serde(skip)]
    dirty: bool,
}

/// Change tracking is not state: a group restored from a log equals the live one.
impl PartialEq for Group {
    fn eq(&self, other: &Group) -> bool {
        self.seq == other.seq && self.state == other.state && self.due == other.due
    }
}

impl Group {
    /// Whether the group has a window open (or kept events): not only held closings.
    fn is_open(&self) -> bool {
        match &self.state {
            GroupState::Open(instances) => !instances.is_empty(),
            GroupState::Kept(kept) => !kept.events.is_empty(),
        }
    }

    /// Notes that the group `key` changed since the last delta: its flag goes up, and the
    /// first time since the last delta its key is listed for the delta (`delta`).
    fn touch(&mut self, key: &str, changes: &mut Changes<String>) {
        if !self.dirty {
            self.dirty = true;
            changes.changed_key(key);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
enum GroupState {
    /// Tumbling (at most one), hopping (at most size / hop), session (at most one), and
    /// disjoint count windows (one): running aggregates.
    Open(VecDeque<Instance>),
    /// Sliding and overlapping count windows: the events themselves (time, inputs), and
    /// for count windows the events since the last emission.
    /// Boxed: rare beside `Open`, and the larger, so every group's slot would pay for it.
    Kept(Box<Kept>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Kept {
    events: VecDeque<(u64, Vec<Value>)>,
    since_emit: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Instance {
    start: u64,
    /// Time windows: the end (exclusive). Sessions: the maximum end. Count: unused.
    end: u64,
    /// The last event's time.
    last: u64,
    events: u64,
    states: Vec<AggState>,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SnapshotError {
    #[error("window snapshot unreadable: {0}")]
    Decode(String),
    #[error("window snapshot is of format version {0}, this build reads versions 1 and 2")]
    Version(u32),
    #[error("the rule's window or aggregates changed since the snapshot; its open windows are not restored")]
    PlanChanged,
}

/// Format 1's version of a rule's snapshot (`{"version": 1, "windows": …}`), read only.
const SNAPSHOT_VERSION_1: u32 = 1;

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Snapshot<W> {
    version: u32,
    windows: W,
}

impl Windows {
    pub fn new(plan: WindowPlan) -> Windows {
        Windows {
            plan,
            groups: FxHashMap::default(),
            next_seq: 0,
            watermark: 0,
            event_clock: 0,
            last_arrival: 0,
            deadline: u64::MAX,
            counters: WindowCounters::default(),
            changes: Changes::default(),
            hold: Hold(false),
            due_groups: 0,
            scratch: Scratch::default(),
        }
    }

    /// Counts the groups with held closings again: after groups were decoded or replaced
    /// wholesale (a restore, a delta applied).
    fn count_due(&mut self) {
        self.due_groups = self.groups.values().filter(|g| !g.due.is_empty()).count();
    }

    /// From now on, windows an event closes ([`Windows::push`], [`Windows::push_event`]:
    /// a count window's last event, a sliding window's every event, a group evicted, an
    /// event-time watermark moved) are not returned but held in the state, each with its
    /// output as computed at the event, until [`Windows::release`]. A caller that
    /// checkpoints the state releases them only once a checkpoint holding them committed,
    /// so after a crash the restored state gives them again, the same. Not state: a
    /// restored `Windows` does not hold until told again.
    pub fn hold_event_closings(&mut self) {
        self.hold = Hold(true);
    }

    /// The mark of the closings held so far: [`Windows::release`] with it gives them (and
    /// none held later).
    pub fn due_mark(&self) -> u64 {
        self.next_seq
    }

    /// Gives the held closings older than `mark` ([`Windows::due_mark`]), in output order,
    /// and forgets them; groups left with nothing open are dropped.
    pub fn release(&mut self, mark: u64) -> Vec<Closed> {
        let mut out = Vec::new();
        if self.due_groups == 0 {
            return out;
        }
        let changes = &mut self.changes;
        let spec = self.plan.spec;
        let due_groups = &mut self.due_groups;
        self.groups.retain(|key, group| {
            if group.due.first().is_none_or(|d| d.seq >= mark) {
                return true;
            }
            // Held in order of their sequence numbers.
            let at = group.due.partition_point(|d| d.seq < mark);
            out.extend(group.due.drain(..at).map(|d| d.given(spec)));
            if group.due.is_empty() {
                *due_groups -= 1;
            }
            if group.due.is_empty() && !group.is_open() {
                changes.removed(|| key.to_string());
                return false;
            }
            group.touch(key, changes);
            true
        });
        self.changes.bound(self.groups.len());
        sort_closed(&mut out);
        out
    }

    /// Closings held: [`Windows::release`] has something to give.
    pub fn has_due(&self) -> bool {
        self.due_groups != 0
    }

    /// In hold mode, moves the closings an event made (`out[first_out..]`) into the state,
    /// each into its own group's held list (made again, with nothing open, if it was
    /// removed or evicted). Without hold mode, numbers them the same way instead ([`Closed::seq`]), so a closing
    /// has the same id whether it was held or not.
    fn hold_closed(&mut self, out: &mut Vec<Closed>, first_out: usize) {
        if out.len() <= first_out {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if !self.hold.0 {
            if closes_on_events(self.plan.spec) {
                out[first_out..].iter_mut().for_each(|closed| closed.seq = Some(seq));
            }
            return;
        }
        for closed in out.drain(first_out..) {
            let group = self.groups.entry(closed.key.as_str().into()).or_insert_with(|| Group {
                seq: 0,
                state: empty_state(self.plan.spec),
                due: Vec::new(),
                dirty: false,
            });
            if group.due.is_empty() {
                self.due_groups += 1;
            }
            group.touch(&closed.key, &mut self.changes);
            group.due.push(Due { seq, closed });
        }
        self.changes.bound(self.groups.len());
    }

    /// The inputs kept by sliding and overlapping count windows (for tests).
    #[cfg(test)]
    pub(crate) fn kept_inputs(&self) -> Vec<&Value> {
        let kept = self.groups.values().filter_map(|g| match &g.state {
            GroupState::Kept(kept) => Some(&kept.events),
            GroupState::Open(_) => None,
        });
        kept.flat_map(|events| events.iter().flat_map(|(_, inputs)| inputs)).collect()
    }

    pub fn plan(&self) -> &WindowPlan {
        &self.plan
    }

    pub fn counters(&self) -> WindowCounters {
        self.counters
    }

    /// Open groups now.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// When [`Windows::advance`] next has something to close or release (Unix
    /// milliseconds, the gateway's clock); `None` when no clock is needed (nothing open, or
    /// count windows only). With event time: when the idle timeout would carry the event
    /// clock far enough, if no event comes first.
    pub fn next_close(&self) -> Option<u64> {
        if self.deadline == u64::MAX {
            return None;
        }
        match self.plan.time {
            TimeBasis::Processing => Some(self.deadline),
            TimeBasis::Event { tolerance_ms, idle_ms, .. } => {
                let clock_needed = self.deadline.saturating_add(tolerance_ms);
                let after = clock_needed.saturating_sub(self.event_clock);
                Some(self.last_arrival.saturating_add(after.max(idle_ms)))
            }
        }
    }

    /// The watermark: windows ending at or before it are closed.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Event time: moves the watermark by the idle rule for the gateway clock `now_ms`.
    fn tick(&mut self, now_ms: u64) {
        if let TimeBasis::Event { tolerance_ms, idle_ms, .. } = self.plan.time {
            if self.last_arrival != 0 && now_ms >= self.last_arrival.saturating_add(idle_ms) {
                let clock = self.event_clock.saturating_add(now_ms - self.last_arrival);
                self.watermark = self.watermark.max(clock.saturating_sub(tolerance_ms));
            }
        }
    }

    /// Takes one event by event time: `event_ms` read from it, `now_ms` the gateway's clock
    /// (its receive time). Closed windows of every group the event's clock passes come out
    /// in `out`. With processing time `event_ms` is ignored: [`Windows::push`] at `now_ms`.
    pub fn push_event(
        &mut self,
        event_ms: u64,
        now_ms: u64,
        key: &str,
        inputs: &[Value],
        out: &mut Vec<Closed>,
    ) -> Pushed {
        let TimeBasis::Event { tolerance_ms, .. } = self.plan.time else {
            return self.push(now_ms, key, inputs, out);
        };
        let first_out = out.len();
        // Silence before this event may already have closed windows: judge it after them.
        self.tick(now_ms);
        self.close_until(self.watermark, out);
        if self.is_late(event_ms) {
            self.counters.late += 1;
            self.hold_closed(out, first_out);
            return Pushed::Late;
        }
        // A sensor's clock ahead of the gateway's moves the rule's clock only to the
        // gateway's: otherwise one such sensor would make every other sensor's events late.
        self.event_clock = self.event_clock.max(event_ms.min(now_ms));
        self.last_arrival = self.last_arrival.max(now_ms);
        self.watermark = self.watermark.max(self.event_clock.saturating_sub(tolerance_ms));
        // Before the event goes in: what its clock closes cannot hold it (the watermark is at
        // most its time, a window holding it ends after), and the group's windows it no
        // longer needs must not count against its limit.
        self.close_until(self.watermark, out);
        let seq = self.next_seq;
        self.ensure_group(key, seq, out);
        let result = match self.groups.get_mut(key) {
            Some(Group { seq: group_seq, state: GroupState::Open(instances), dirty, due }) => {
                if push_event_time(
                    &self.plan,
                    self.watermark,
                    instances,
                    event_ms,
                    inputs,
                    &mut self.deadline,
                ) {
                    *group_seq = seq;
                    if !*dirty {
                        *dirty = true;
                        self.changes.changed_key(key);
                    }
                    self.next_seq += 1;
                    Pushed::Accepted
                } else {
                    // Only a group this event made can be empty: nothing else changed.
                    if instances.is_empty() && due.is_empty() {
                        self.groups.remove(key);
                        self.changes.removed(|| key.to_owned());
                        self.changes.bound(self.groups.len());
                    }
                    self.counters.ahead += 1;
                    Pushed::Ahead
                }
            }
            // Event time is compiled for tumbling and hopping windows only, whose groups
            // hold open instances.
            _ => Pushed::Accepted,
        };
        sort_closed(&mut out[first_out..]);
        self.hold_closed(out, first_out);
        result
    }

    /// Makes the group `key` if new, evicting the least recent group if full. A group with
    /// held closings only is as new: it does not count against the limit (it goes at the
    /// next release), and taking an event it counts again.
    fn ensure_group(&mut self, key: &str, seq: u64, out: &mut Vec<Closed>) {
        if self.groups.get(key).is_some_and(Group::is_open) {
            return;
        }
        let limit = self.plan.max_groups.max(1);
        if self.groups.len() >= limit && self.groups.values().filter(|g| g.is_open()).count() >= limit {
            self.evict_one(out);
        }
        match self.groups.get_mut(key) {
            Some(group) => group.seq = seq,
            None => {
                let state = empty_state(self.plan.spec);
                self.groups.insert(key.into(), Group { seq, state, due: Vec::new(), dirty: false });
                self.changes.bound(self.groups.len());
            }
        }
    }

    /// Takes one event: `at_ms` its time (processing time: when it was received), `key` its
    /// group, `inputs` one value per aggregate (NULL where the aggregate skips it). Sliding
    /// and count windows close on events, so closed windows may come out here too.
    pub fn push(&mut self, at_ms: u64, key: &str, inputs: &[Value], out: &mut Vec<Closed>) -> Pushed {
        if self.is_late(at_ms) {
            self.counters.late += 1;
            return Pushed::Late;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let first_held = out.len();
        // One lookup for a group with a window open (nearly every event); a new group, or
        // one with held closings only, takes the path that may evict, then a second.
        let group = match self.groups.get_mut(key) {
            Some(group) if group.is_open() => group,
            _ => {
                self.ensure_group(key, seq, out);
                let Some(group) = self.groups.get_mut(key) else { return Pushed::Accepted };
                group
            }
        };
        group.seq = seq;
        group.touch(key, &mut self.changes);
        let plan = &self.plan;
        let mut deadline = self.deadline;
        let first_out = out.len();
        match &mut group.state {
            GroupState::Open(instances) => {
                push_open(plan, self.watermark, instances, at_ms, inputs, &mut deadline, key, out);
            }
            GroupState::Kept(kept) => {
                let Kept { events, since_emit } = &mut **kept;
                if events.len() >= MAX_RETAINED {
                    events.pop_front();
                    self.counters.retained_dropped += 1;
                }
                events.push_back((at_ms, inputs.to_vec()));
                *since_emit += 1;
                match plan.spec {
                    WindowSpec::Sliding { size_ms } => {
                        while events.front().is_some_and(|(t, _)| t.saturating_add(size_ms) <= at_ms) {
                            events.pop_front();
                        }
                        out.push(fold_kept(plan, key, events, at_ms.saturating_sub(size_ms), at_ms));
                        if let Some((oldest, _)) = events.front() {
                            deadline = deadline.min(oldest.saturating_add(size_ms));
                        }
                    }
                    WindowSpec::Count { size, step } => {
                        while events.len() as u64 > size {
                            events.pop_front();
                        }
                        // eKuiper triggers on every `step`-th event, once `size` are there.
                        if *since_emit >= step {
                            *since_emit = 0;
                        }
                        if *since_emit == 0 && events.len() as u64 >= size {
                            let start = events.front().map_or(at_ms, |(t, _)| *t);
                            out.push(fold_kept(plan, key, events, start, at_ms));
                        }
                    }
                    _ => {}
                }
            }
        }
        self.deadline = deadline;
        sort_closed(&mut out[first_out..]);
        self.hold_closed(out, first_held);
        Pushed::Accepted
    }

    fn is_late(&self, at_ms: u64) -> bool {
        match self.plan.spec {
            WindowSpec::Tumbling { size_ms } => {
                aligned_start(at_ms, size_ms).saturating_add(size_ms) <= self.watermark
            }
            // The last window holding `at_ms` starts at its hop boundary.
            WindowSpec::Hopping { size_ms, hop_ms } => {
                aligned_start(at_ms, hop_ms).saturating_add(size_ms) <= self.watermark
            }
            WindowSpec::Session { .. } | WindowSpec::Sliding { .. } => at_ms < self.watermark,
            WindowSpec::Count { .. } => false,
        }
    }

    /// Closes every window ending at or before `now` (Unix milliseconds) and returns them
    /// in order. Groups left with nothing open are dropped. Cheap when nothing is due.
    /// With event time, what `now` closes follows the idle rule ([`TimeBasis::Event`]).
    pub fn advance(&mut self, now_ms: u64) -> Vec<Closed> {
        let mut out = Vec::new();
        match self.plan.time {
            TimeBasis::Processing => self.watermark = self.watermark.max(now_ms),
            TimeBasis::Event { .. } => self.tick(now_ms),
        }
        self.close_until(self.watermark, &mut out);
        out
    }

    /// Closes every window ending at or before `now_ms`, into `out` in order.
    fn close_until(&mut self, now_ms: u64, out: &mut Vec<Closed>) {
        if now_ms < self.deadline {
            return;
        }
        let first_out = out.len();
        let plan = &self.plan;
        let changes = &mut self.changes;
        let mut deadline = u64::MAX;
        self.groups.retain(|key, group| {
            let (before, after) = match &mut group.state {
                GroupState::Open(instances) => {
                    let before = instances.len();
                    while let Some(first) = instances.front() {
                        match close_time(plan.spec, first) {
                            Some(at) if at <= now_ms => {
                                if let Some(instance) = instances.pop_front() {
                                    out.push(instance.close(plan, key, at, false));
                                }
                            }
                            _ => break,
                        }
                    }
                    for instance in instances.iter() {
                        if let Some(at) = close_time(plan.spec, instance) {
                            deadline = deadline.min(at);
                        }
                    }
                    (before, instances.len())
                }
                GroupState::Kept(kept) => {
                    let events = &mut kept.events;
                    let before = events.len();
                    if let WindowSpec::Sliding { size_ms } = plan.spec {
                        while events.front().is_some_and(|(t, _)| t.saturating_add(size_ms) <= now_ms) {
                            events.pop_front();
                        }
                        if let Some((oldest, _)) = events.front() {
                            deadline = deadline.min(oldest.saturating_add(size_ms));
                        }
                    }
                    (before, events.len())
                }
            };
            let keep = after != 0 || !group.due.is_empty();
            if !keep {
                changes.removed(|| key.to_string());
            } else if after != before {
                group.touch(key, changes);
            }
            keep
        });
        self.changes.bound(self.groups.len());
        self.deadline = deadline;
        sort_closed(&mut out[first_out..]);
    }

    /// Closes every open window now, whatever its end (shutdown with the `flush` policy).
    pub fn flush(&mut self) -> Vec<Closed> {
        let mut out = Vec::new();
        let plan = &self.plan;
        let numbered = closes_on_events(plan.spec);
        for (key, group) in self.groups.drain() {
            out.extend(group.due.into_iter().map(|d| d.given(plan.spec)));
            if let GroupState::Open(instances) = group.state {
                for instance in instances {
                    let at = close_time(plan.spec, &instance).unwrap_or(instance.last);
                    let mut closed = instance.close(plan, &key, at, true);
                    // A count or sliding window cut short here has the bounds of its events,
                    // which an earlier window of the group, closed within the same
                    // millisecond, can share: its own number keeps their ids apart.
                    if numbered {
                        closed.seq = Some(self.next_seq);
                        self.next_seq += 1;
                    }
                    out.push(closed);
                }
            }
            self.changes.removed(|| key.into_string());
        }
        self.changes.bound(0);
        self.deadline = u64::MAX;
        self.due_groups = 0;
        sort_closed(&mut out);
        out
    }

    fn evict_one(&mut self, out: &mut Vec<Closed>) {
        // A scan, not an index kept per event: eviction is the overflow path, and an index
        // would cost every event an ordered-map update.
        // Held closings only: nothing open to evict (they go at the next release).
        let Some(oldest) = self
            .groups
            .iter()
            .filter(|(_, g)| g.is_open())
            .min_by_key(|(_, g)| g.seq)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        let Some(group) = self.groups.get_mut(&oldest) else { return };
        self.counters.groups_evicted += 1;
        if let GroupState::Open(instances) = std::mem::replace(&mut group.state, empty_state(self.plan.spec))
        {
            for instance in instances {
                let at = close_time(self.plan.spec, &instance).unwrap_or(instance.last);
                out.push(instance.close(&self.plan, &oldest, at, true));
            }
        }
        // Its held closings stay held where they are, under their own sequence numbers: the
        // ids of windows that close on events derive from them ([`Closed::seq`]), and one
        // released before a crash must be given again after it with the same.
        if group.due.is_empty() {
            self.groups.remove(&oldest);
            self.changes.removed(|| oldest.into_string());
        } else {
            group.touch(&oldest, &mut self.changes);
        }
    }

    /// The whole state as CBOR (`[format, windows]`, `codec`), to be written where it
    /// survives a crash.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(2);
        w.uint(codec::FORMAT);
        self.encode(&mut w);
        w.bytes
    }

    /// The state a [`Windows::snapshot`] held (either format), for a rule that still has
    /// `plan`. A changed plan (the rule was edited) is refused: the caller starts that rule
    /// empty.
    pub fn restore(plan: &WindowPlan, bytes: &[u8]) -> Result<Windows, SnapshotError> {
        Windows::decode_snapshot(bytes)?.fitted(plan)
    }

    /// The state as format 1 wrote it (serde's CBOR maps), for tests of reading it.
    #[cfg(test)]
    pub(crate) fn snapshot_format_1(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(&Snapshot { version: SNAPSHOT_VERSION_1, windows: self }, &mut bytes)
            .expect("format 1 encodes");
        bytes
    }

    fn decode_snapshot(bytes: &[u8]) -> Result<Windows, SnapshotError> {
        if codec::is_format_1(bytes) {
            let snapshot: Snapshot<Windows> =
                ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
            if snapshot.version != SNAPSHOT_VERSION_1 {
                return Err(SnapshotError::Version(snapshot.version));
            }
            return Ok(snapshot.windows);
        }
        let mut r = Reader::new(bytes);
        r.record(2)?;
        let windows = Windows::decode(&mut r)?;
        r.end()?;
        Ok(windows)
    }

    /// These windows for a rule that now has `plan`, if it still computes the same windows.
    fn fitted(mut self, plan: &WindowPlan) -> Result<Windows, SnapshotError> {
        if !same_windows(&self.plan, plan) {
            return Err(SnapshotError::PlanChanged);
        }
        // A lowered limit applies from the next new group on; a new tolerance from the next
        // event on (the watermark does not move back).
        self.plan.max_groups = plan.max_groups;
        self.plan.time = plan.time.clone();
        self.count_due();
        Ok(self)
    }
}

/// Whether windows opened under plan `a` mean the same under plan `b`: the same window,
/// aggregates and clock (windows opened on one clock mean nothing on another).
fn same_windows(a: &WindowPlan, b: &WindowPlan) -> bool {
    let field = |time: &TimeBasis| match time {
        TimeBasis::Processing => None,
        TimeBasis::Event { field, .. } => Some(field.clone()),
    };
    a.spec == b.spec && a.aggs == b.aggs && field(&a.time) == field(&b.time)
}

impl Due {
    /// The held closing as it is given out, released or flushed: numbered by its own
    /// sequence number ([`Closed::seq`]), so it has the same id either way.
    fn given(self, spec: WindowSpec) -> Closed {
        Closed { seq: closes_on_events(spec).then_some(self.seq), ..self.closed }
    }
}

/// Whether the windows of `spec` close on an event rather than on the clock: two of one
/// group can then have the same bounds (a burst within one millisecond).
fn closes_on_events(spec: WindowSpec) -> bool {
    matches!(spec, WindowSpec::Count { .. } | WindowSpec::Sliding { .. })
}

/// A new group's state, nothing open yet.
fn empty_state(spec: WindowSpec) -> GroupState {
    match spec {
        WindowSpec::Sliding { .. } => {
            GroupState::Kept(Box::new(Kept { events: VecDeque::new(), since_emit: 0 }))
        }
        WindowSpec::Count { size, step } if size != step => {
            GroupState::Kept(Box::new(Kept { events: VecDeque::new(), since_emit: 0 }))
        }
        // Exactly the instances it can hold: most windows hold one at a time, and a
        // default VecDeque would reserve four.
        WindowSpec::Hopping { size_ms, hop_ms } => {
            GroupState::Open(VecDeque::with_capacity(size_ms.div_ceil(hop_ms) as usize))
        }
        _ => GroupState::Open(VecDeque::with_capacity(1)),
    }
}

/// The epoch-aligned start of the `size`-long window holding `t`. Times are the gateway's
/// clock in Unix milliseconds; arithmetic on them saturates, so no time can panic.
fn aligned_start(t: u64, size: u64) -> u64 {
    t - t % size.max(1)
}

/// When an open instance closes; `None` for count windows (they close on events).
fn close_time(spec: WindowSpec, instance: &Instance) -> Option<u64> {
    match spec {
        WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } => Some(instance.end),
        WindowSpec::Session { timeout_ms, .. } => {
            Some(instance.end.min(instance.last.saturating_add(timeout_ms)))
        }
        WindowSpec::Sliding { .. } | WindowSpec::Count { .. } => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn push_open(
    plan: &WindowPlan,
    watermark: u64,
    instances: &mut VecDeque<Instance>,
    at: u64,
    inputs: &[Value],
    deadline: &mut u64,
    key: &str,
    out: &mut Vec<Closed>,
) {
    let new_instance = |start: u64, end: u64| Instance {
        start,
        end,
        last: at,
        events: 0,
        states: plan.aggs.iter().map(AggKind::new_state).collect(),
    };
    // Windows this event is past have closed, whether or not `advance` saw their end yet.
    while let Some(first) = instances.front() {
        match close_time(plan.spec, first) {
            Some(close) if close <= at => {
                if let Some(instance) = instances.pop_front() {
                    out.push(instance.close(plan, key, close, false));
                }
            }
            _ => break,
        }
    }
    match plan.spec {
        WindowSpec::Tumbling { size_ms } => {
            if instances.is_empty() {
                let start = aligned_start(at, size_ms);
                instances.push_back(new_instance(start, start.saturating_add(size_ms)));
            }
        }
        WindowSpec::Hopping { size_ms, hop_ms } => {
            // Open every window holding `at` not open yet: starts are hop multiples in
            // (at − size, at].
            let last_start = aligned_start(at, hop_ms);
            let mut start = instances.back().map_or_else(
                || {
                    let earliest = at.saturating_add(1).saturating_sub(size_ms);
                    earliest.div_ceil(hop_ms).saturating_mul(hop_ms)
                },
                |i| i.start.saturating_add(hop_ms),
            );
            // Skip windows that already ended (the event is not in them) or were already
            // closed by `advance` (they were emitted without it).
            while start.saturating_add(size_ms) <= at.max(watermark) && start < u64::MAX {
                start = start.saturating_add(hop_ms);
            }
            while start <= last_start {
                instances.push_back(new_instance(start, start.saturating_add(size_ms)));
                if instances.len() as u64 >= MAX_OVERLAP {
                    break;
                }
                start = start.saturating_add(hop_ms);
            }
        }
        WindowSpec::Session { max_ms, .. } => {
            if instances.is_empty() {
                instances.push_back(new_instance(at, aligned_start(at, max_ms).saturating_add(max_ms)));
            }
        }
        WindowSpec::Count { .. } => {
            if instances.is_empty() {
                instances.push_back(new_instance(at, at));
            }
        }
        WindowSpec::Sliding { .. } => {}
    }
    for instance in instances.iter_mut() {
        // Hopping windows opened earlier may not hold `at`: only those with start <= at.
        if instance.start > at && !matches!(plan.spec, WindowSpec::Count { .. }) {
            continue;
        }
        instance.last = at;
        instance.events += 1;
        for ((state, kind), value) in instance.states.iter_mut().zip(&plan.aggs).zip(inputs) {
            state.add(kind, value);
        }
        if let Some(close) = close_time(plan.spec, instance) {
            *deadline = (*deadline).min(close);
        }
    }
    if let WindowSpec::Count { size, .. } = plan.spec {
        if instances.front().is_some_and(|i| i.events >= size) {
            if let Some(instance) = instances.pop_front() {
                out.push(instance.close(plan, key, at, false));
            }
        }
    }
}

/// Event time, tumbling and hopping windows: `at` joins every window holding it that is
/// still open (its end after `watermark`), opening those not open yet in start order.
/// `false`, and nothing changed, when that would keep more than [`MAX_OVERLAP`] windows
/// open in the group.
fn push_event_time(
    plan: &WindowPlan,
    watermark: u64,
    instances: &mut VecDeque<Instance>,
    at: u64,
    inputs: &[Value],
    deadline: &mut u64,
) -> bool {
    let (size_ms, hop_ms) = match plan.spec {
        WindowSpec::Tumbling { size_ms } => (size_ms, size_ms),
        WindowSpec::Hopping { size_ms, hop_ms } => (size_ms, hop_ms),
        // The rule compiler refuses event time for other windows.
        _ => return false,
    };
    let last_start = aligned_start(at, hop_ms);
    let mut first_start =
        at.saturating_add(1).saturating_sub(size_ms).div_ceil(hop_ms).saturating_mul(hop_ms);
    while first_start.saturating_add(size_ms) <= watermark && first_start < last_start {
        first_start = first_start.saturating_add(hop_ms);
    }
    let starts = || (first_start..=last_start).step_by(hop_ms.max(1) as usize);
    let missing = starts().filter(|s| !instances.iter().any(|i| i.start == *s)).count();
    if instances.len() + missing > MAX_OVERLAP as usize {
        return false;
    }
    for start in starts() {
        let at_index = instances.iter().position(|i| i.start >= start).unwrap_or(instances.len());
        if instances.get(at_index).is_none_or(|i| i.start != start) {
            let end = start.saturating_add(size_ms);
            let states = plan.aggs.iter().map(AggKind::new_state).collect();
            instances.insert(at_index, Instance { start, end, last: at, events: 0, states });
        }
        if let Some(instance) = instances.get_mut(at_index) {
            instance.last = instance.last.max(at);
            instance.events += 1;
            for ((state, kind), value) in instance.states.iter_mut().zip(&plan.aggs).zip(inputs) {
                state.add(kind, value);
            }
            *deadline = (*deadline).min(instance.end);
        }
    }
    true
}

impl Instance {
    fn close(self, plan: &WindowPlan, key: &str, end: u64, early: bool) -> Closed {
        let end = match plan.spec {
            WindowSpec::Count { .. } => self.last,
            _ => end,
        };
        Closed {
            key: key.to_owned(),
            start_ms: self.start,
            end_ms: end,
            events: self.events,
            values: self.states.iter().zip(&plan.aggs).map(|(s, k)| s.value(k)).collect(),
            early,
            seq: None,
        }
    }
}

fn fold_kept(
    plan: &WindowPlan,
    key: &str,
    events: &VecDeque<(u64, Vec<Value>)>,
    start: u64,
    end: u64,
) -> Closed {
    let mut states: Vec<AggState> = plan.aggs.iter().map(AggKind::new_state).collect();
    for (_, inputs) in events {
        for ((state, kind), value) in states.iter_mut().zip(&plan.aggs).zip(inputs) {
            state.add(kind, value);
        }
    }
    Closed {
        key: key.to_owned(),
        start_ms: start,
        end_ms: end,
        events: events.len() as u64,
        values: states.iter().zip(&plan.aggs).map(|(s, k)| s.value(k)).collect(),
        early: false,
        seq: None,
    }
}

fn sort_closed(closed: &mut [Closed]) {
    closed.sort_by(|a, b| (a.end_ms, a.start_ms, &a.key).cmp(&(b.end_ms, b.start_ms, &b.key)));
}
