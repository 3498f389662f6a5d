//! Running windowed rules: [`RuleSet::evaluate_windowed`] feeds events into each windowed
//! rule's [`Windows`], [`RuleSet::advance_windows`] closes what is due, and each closed
//! window becomes the rule's outputs through the ordinary engine: its aggregates, keys and
//! bounds are written into a synthetic payload that the rule's compiled SELECT, HAVING and
//! actions read (see `window::sql`).
//!
//! **Invariant:** [`WindowState`] belongs to the [`RuleSet`] that made it (one slot per
//! rule, by index); [`WindowState::restore`] matches a snapshot to a rule set by rule name
//! and plan, so a reload keeps the open windows of every rule whose window and aggregates
//! are unchanged and starts the others empty (and says which). [`WindowState::restore_log`]
//! does the same for a snapshot followed by [`WindowState::take_delta`]s, applied by rule
//! name before the plans are matched.

use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;

use super::codec::{FORMAT, Reader, Writer, is_format_1};
use super::delta::{DeltaIn, decode_delta};
use super::marks::{MAX_MARKS, Marks, MarksDelta, MarksSnapshot};
use super::sql::{AGG_PREFIX, KEY_PREFIX, WINDOW_END, WINDOW_START, WindowSql};
use super::{Closed, LatePolicy, Pushed, SnapshotError, WindowCounters, Windows};
use crate::engine::{Rule, RuleSet, dead_letter};
use crate::expr::{Env, EvalError, NULL};
use crate::payload::{Decoded, PayloadView};
use crate::rbe::{RbeDeltaIn, RbeSql, RbeState};
use crate::value::Value;
use crate::{EventContext, Output, PayloadFormat};

/// The open windows of every windowed rule of one [`RuleSet`].
#[derive(Debug, Clone, PartialEq)]
pub struct WindowState {
    /// By rule index; `None` for rules without a window.
    rules: Vec<Option<Windows>>,
    /// By rule index; `None` for rules without report-by-exception functions.
    rbe: Vec<Option<RbeState>>,
    /// QoS 2 readings taken in whose PUBREL has not been taken (`window::marks`).
    marks: Marks,
    /// Outputs of windows a reload closed early (under the rule it changed or removed, so
    /// computed then, with their windows for their ids), held until the caller takes them
    /// ([`WindowState::take_pending`]) once a checkpoint holding them committed. State like
    /// the windows: after a crash the restored state gives them again, the same. They
    /// belong to no rule of the set, so a restore under any rules keeps them.
    pending: Vec<Marked>,
    /// The size of the last delta taken, the room the next one's buffer starts with. Not
    /// state.
    last_delta: SizeHint,
}

/// A buffer size remembered between records (see [`WindowState::last_delta`]); equal
/// whatever it holds, as it is not state.
#[derive(Debug, Clone, Copy, Default)]
struct SizeHint(usize);

impl PartialEq for SizeHint {
    fn eq(&self, _other: &SizeHint) -> bool {
        true
    }
}

/// Format 1's version of a state snapshot (read only; format 2 is `window::codec`'s).
const STATE_VERSION_1: u32 = 1;
/// Format 1's version of a state delta (read only).
const DELTA_VERSION_1: u32 = 1;

/// A state snapshot read back, of either format.
#[derive(Deserialize)]
struct StateSnapshot {
    version: u32,
    /// (rule name, its windows).
    rules: Vec<(String, Windows)>,
    /// (rule name, its report-by-exception state).
    rbe: Vec<(String, RbeState)>,
    /// Absent from snapshots written before QoS 2 markers existed.
    #[serde(default)]
    marks: MarksSnapshot,
    /// Format 2 only.
    #[serde(skip)]
    pending: Vec<Marked>,
}

/// A state delta read back, of either format.
#[derive(Deserialize)]
struct StateDeltaIn {
    version: u32,
    rules: Vec<(String, DeltaIn)>,
    rbe: Vec<(String, RbeDeltaIn)>,
    #[serde(default)]
    marks: MarksDelta,
    /// Format 2 only: the whole list (it is short, and empty but for a reload's outputs).
    #[serde(skip)]
    pending: Vec<Marked>,
}

impl StateSnapshot {
    /// Format 2: `[2, [[rule, windows]…], [[rule, rbe state]…], markers, [pending
    /// output…]]`, windows as
    /// `window::codec` writes them, the report-by-exception state and the markers as serde
    /// writes them.
    fn decode(bytes: &[u8]) -> Result<StateSnapshot, SnapshotError> {
        if is_format_1(bytes) {
            let snapshot: StateSnapshot =
                ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
            if snapshot.version != STATE_VERSION_1 {
                return Err(SnapshotError::Version(snapshot.version));
            }
            return Ok(snapshot);
        }
        let mut r = Reader::new(bytes);
        r.record(5)?;
        let n = r.array()?;
        let mut rules = Vec::with_capacity(n);
        for _ in 0..n {
            r.fields(2, "a rule's windows")?;
            rules.push((r.string()?, Windows::decode(&mut r)?));
        }
        let n = r.array()?;
        let mut rbe = Vec::with_capacity(n);
        for _ in 0..n {
            r.fields(2, "a rule's report-by-exception state")?;
            rbe.push((r.string()?, RbeState::decode(&mut r)?));
        }
        let marks = r.serde()?;
        let pending = decode_pending(&mut r)?;
        r.end()?;
        Ok(StateSnapshot { version: FORMAT as u32, rules, rbe, marks, pending })
    }
}

impl StateDeltaIn {
    /// Format 2: `[2, [[rule, windows delta]…], [[rule, rbe delta]…], markers delta,
    /// [pending output…]]`.
    fn decode(bytes: &[u8]) -> Result<StateDeltaIn, SnapshotError> {
        if is_format_1(bytes) {
            let delta: StateDeltaIn =
                ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
            if delta.version != DELTA_VERSION_1 {
                return Err(SnapshotError::Version(delta.version));
            }
            return Ok(delta);
        }
        let mut r = Reader::new(bytes);
        r.record(5)?;
        let n = r.array()?;
        let mut rules = Vec::with_capacity(n);
        for _ in 0..n {
            r.fields(2, "a rule's delta")?;
            rules.push((r.string()?, decode_delta(&mut r)?));
        }
        let n = r.array()?;
        let mut rbe = Vec::with_capacity(n);
        for _ in 0..n {
            r.fields(2, "a rule's report-by-exception delta")?;
            rbe.push((r.string()?, RbeState::decode_delta(&mut r)?));
        }
        let marks = r.serde()?;
        let pending = decode_pending(&mut r)?;
        r.end()?;
        Ok(StateDeltaIn { version: FORMAT as u32, rules, rbe, marks, pending })
    }
}

impl WindowState {
    /// Every windowed rule's state as CBOR (format 2, see `StateSnapshot::decode`), to be
    /// written where it survives a crash. Written from the live state: nothing is cloned.
    pub fn snapshot(&self, rules: &RuleSet) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(5);
        w.uint(FORMAT);
        let windowed =
            || rules.rules.iter().zip(&self.rules).filter_map(|(r, s)| Some((&*r.name, s.as_ref()?)));
        w.array(windowed().count());
        for (name, windows) in windowed() {
            w.array(2);
            w.str(name);
            windows.encode(&mut w);
        }
        let rbe = || rules.rules.iter().zip(&self.rbe).filter_map(|(r, s)| Some((&*r.name, s.as_ref()?)));
        w.array(rbe().count());
        for (name, state) in rbe() {
            w.array(2);
            w.str(name);
            state.encode(&mut w);
        }
        w.serde(&self.marks.snapshot());
        encode_pending(&self.pending, &mut w);
        w.bytes
    }

    /// The state a snapshot held, for `rules` (perhaps reloaded since): the windows of each
    /// rule with the same name and plan; the others start empty and are named in the
    /// second value with the reason. Change tracking starts empty: the first delta is of
    /// changes after this state.
    pub fn restore(
        rules: &RuleSet,
        bytes: &[u8],
    ) -> Result<(WindowState, Vec<(String, SnapshotError)>), SnapshotError> {
        let mut snapshot = StateSnapshot::decode(bytes)?;
        let marks = Marks::restore(std::mem::take(&mut snapshot.marks), MAX_MARKS);
        Ok(WindowState::fitted(rules, snapshot, marks))
    }

    /// CBOR: everything that changed since the last `take_delta` or `clear_changes` — per
    /// windowed rule (by name) its meta (next_seq, watermark, event_clock, last_arrival,
    /// deadline, counters) and the groups upserted and removed (closed, evicted, emptied);
    /// per report-by-exception rule its meta (next_seq, evicted) and entries
    /// upserted/removed. Resets the change tracking.
    ///
    /// A delta describes changes to the state the caller's log already describes: after
    /// [`WindowState::restore`] of another rule set (a reload), write a full
    /// [`WindowState::snapshot`] (and [`WindowState::clear_changes`]) before the next delta.
    pub fn take_delta(&mut self, rules: &RuleSet) -> Vec<u8> {
        // Deltas of a steady load are of about one size: start at the last one's, with a
        // little more, so that the buffer is not regrown (and copied) as it fills.
        let mut w = Writer::with_capacity(self.last_delta.0 + self.last_delta.0 / 8 + 64);
        w.array(5);
        w.uint(FORMAT);
        let windowed = rules.rules.iter().zip(&self.rules).filter(|(_, s)| s.is_some()).count();
        w.array(windowed);
        for (rule, windows) in rules.rules.iter().zip(&mut self.rules) {
            if let Some(windows) = windows {
                w.array(2);
                w.str(&rule.name);
                windows.encode_delta(&mut w);
            }
        }
        let rbe = rules.rules.iter().zip(&self.rbe).filter(|(_, s)| s.is_some()).count();
        w.array(rbe);
        for (rule, state) in rules.rules.iter().zip(&mut self.rbe) {
            if let Some(state) = state {
                w.array(2);
                w.str(&rule.name);
                state.encode_delta(&mut w);
            }
        }
        w.serde(&self.marks.delta());
        encode_pending(&self.pending, &mut w);
        self.last_delta = SizeHint(w.bytes.len());
        w.bytes
    }

    /// Forgets the change tracking (the caller just took a full `snapshot`).
    pub fn clear_changes(&mut self) {
        self.rules.iter_mut().flatten().for_each(Windows::clear_changes);
        self.rbe.iter_mut().flatten().for_each(RbeState::clear_changes);
        self.marks.clear_changes();
    }

    /// The state a full snapshot followed by deltas (in the order taken) describes, for
    /// `rules` (perhaps reloaded since): same matching by rule name and plan as `restore`
    /// (deltas are applied by rule name to the snapshot's raw state first, then plans are
    /// matched). A delta of a rule the snapshot does not have, or whose window or calls
    /// differ from the snapshot's, starts that rule from the delta. A delta that does not
    /// decode fails the whole restore.
    pub fn restore_log<'a>(
        rules: &RuleSet,
        base: &[u8],
        deltas: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(WindowState, Vec<(String, SnapshotError)>), SnapshotError> {
        let mut snapshot = StateSnapshot::decode(base)?;
        let mut marks = Marks::restore(std::mem::take(&mut snapshot.marks), MAX_MARKS);
        for bytes in deltas {
            let delta = StateDeltaIn::decode(bytes)?;
            for (name, delta) in delta.rules {
                match snapshot.rules.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, windows)) => windows.apply(delta),
                    None => snapshot.rules.push((name, Windows::from_delta(delta))),
                }
            }
            for (name, delta) in delta.rbe {
                match snapshot.rbe.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, state)) => state.apply(delta),
                    None => snapshot.rbe.push((name, RbeState::from_delta(delta))),
                }
            }
            marks.apply(delta.marks);
            snapshot.pending = delta.pending;
        }
        Ok(WindowState::fitted(rules, snapshot, marks))
    }

    /// A snapshot's state for `rules`: each rule's by name if its plan is unchanged.
    fn fitted(
        rules: &RuleSet,
        snapshot: StateSnapshot,
        marks: Marks,
    ) -> (WindowState, Vec<(String, SnapshotError)>) {
        let mut saved: Vec<(String, Option<Windows>)> =
            snapshot.rules.into_iter().map(|(name, w)| (name, Some(w))).collect();
        let mut saved_rbe: Vec<(String, Option<RbeState>)> =
            snapshot.rbe.into_iter().map(|(name, r)| (name, Some(r))).collect();
        let mut state = rules.window_state();
        // The markers belong to no rule: whatever the rules now, a resend of a reading the
        // restored state holds is still one.
        state.marks = marks;
        state.pending = snapshot.pending;
        let mut dropped = Vec::new();
        for (rule, slot) in rules.rules.iter().zip(&mut state.rbe) {
            let Some(fresh) = slot.as_mut() else { continue };
            let Some(old) =
                saved_rbe.iter_mut().find(|(name, _)| **name == *rule.name).and_then(|(_, r)| r.take())
            else {
                continue;
            };
            if old.kinds() == fresh.kinds() {
                *fresh = old.with_limit_of(fresh);
            } else {
                dropped.push((rule.name.to_string(), SnapshotError::PlanChanged));
            }
        }
        for (rule, slot) in rules.rules.iter().zip(&mut state.rules) {
            let (Some(window), Some(fresh)) = (&rule.sql.window, slot.as_mut()) else { continue };
            let Some(old) =
                saved.iter_mut().find(|(name, _)| **name == *rule.name).and_then(|(_, w)| w.take())
            else {
                continue;
            };
            match old.fitted(&window.plan) {
                Ok(restored) => *fresh = restored,
                Err(e) => dropped.push((rule.name.to_string(), e)),
            }
        }
        // A report-by-exception state read back knows its entries' last uses, not which of
        // them the caller's log holds: all of them, now.
        state.clear_changes();
        (state, dropped)
    }

    /// Each windowed rule's counters, by rule name.
    pub fn counters<'a>(&'a self, rules: &'a RuleSet) -> impl Iterator<Item = (&'a str, WindowCounters)> {
        rules.rules.iter().zip(&self.rules).filter_map(|(r, w)| w.as_ref().map(|w| (&*r.name, w.counters())))
    }

    /// Per event-time rule that drops what its windows cannot take (`late = "drop"`, the
    /// default): its name and the readings refused so far, late or too far ahead (also
    /// counted in [`WindowCounters`]). Nothing else reports them, so the caller logs them.
    pub fn refused_silently<'a>(&'a self, rules: &'a RuleSet) -> impl Iterator<Item = (&'a str, u64)> {
        rules.rules.iter().zip(&self.rules).filter_map(|(r, w)| {
            let (window, w) = (r.sql.window.as_ref()?, w.as_ref()?);
            let silent = window.event_time.is_some() && window.late == LatePolicy::Drop;
            silent.then(|| (&*r.name, w.counters().late + w.counters().ahead))
        })
    }

    /// Whether the QoS 2 reading `packet_id` of `client` was taken in and its PUBREL not yet
    /// taken: a publish with that id and DUP set is a resend of it.
    pub fn qos2_marked(&self, client: &Arc<str>, packet_id: u16) -> bool {
        self.marks.contains(client, packet_id)
    }

    /// Records that the stateful rules took in the QoS 2 reading `packet_id` of `client`.
    /// Returns whether the oldest marker was dropped to stay within the bound (a reading that
    /// may then be counted twice after a crash).
    pub fn mark_qos2(&mut self, client: &Arc<str>, packet_id: u16) -> bool {
        self.marks.mark(client, packet_id)
    }

    /// The PUBREL of `packet_id` of `client`: removes its marker; whether there was one.
    pub fn release_qos2(&mut self, client: &Arc<str>, packet_id: u16) -> bool {
        self.marks.unmark(client, packet_id)
    }

    /// QoS 2 markers held, and dropped at the bound so far.
    pub fn qos2_marks(&self) -> (usize, u64) {
        (self.marks.len(), self.marks.dropped())
    }

    /// Holds `outputs` (a reload's, of the windows it closed early:
    /// [`RuleSet::flush_rule_windows_marked`]) in the state until
    /// [`WindowState::take_pending`]: a caller that checkpoints the state takes them once a
    /// checkpoint holding them committed, so no reading they hold rests on memory alone.
    pub fn keep_pending(&mut self, outputs: Vec<Marked>) {
        self.pending.extend(outputs);
    }

    /// Outputs are held ([`WindowState::keep_pending`]).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The held outputs, in the order kept; the state no longer holds them.
    pub fn take_pending(&mut self) -> Vec<Marked> {
        std::mem::take(&mut self.pending)
    }

    /// Open groups over all windowed rules.
    pub fn groups(&self) -> usize {
        self.rules.iter().flatten().map(Windows::groups).sum()
    }

    /// The earliest time (Unix milliseconds) at which [`RuleSet::advance_windows`] has
    /// something to do; `None` while nothing is open that a clock closes (no time window
    /// open, or only count windows and report-by-exception state). A caller's timer sleeps
    /// until then, and not at all when this is `None`.
    pub fn next_close(&self) -> Option<u64> {
        self.rules.iter().flatten().filter_map(Windows::next_close).min()
    }
}

/// Where the held closings of every windowed rule of one [`WindowState`] stood when it was
/// taken ([`WindowState::due_marks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueMarks(Vec<Option<u64>>);

impl WindowState {
    /// From now on windows that close on an event are held in the state until
    /// [`RuleSet::release_windows_marked`] (see `Windows::hold_event_closings`). Not state:
    /// a restored or reloaded `WindowState` is told again.
    pub fn hold_event_closings(&mut self) {
        self.rules.iter_mut().flatten().for_each(Windows::hold_event_closings);
    }

    /// The closings held so far: a checkpoint taken now holds them, and once it committed
    /// [`RuleSet::release_windows_marked`] with these marks gives them.
    pub fn due_marks(&self) -> DueMarks {
        DueMarks(self.rules.iter().map(|w| w.as_ref().map(Windows::due_mark)).collect())
    }

    /// Closings are held ([`RuleSet::release_windows_marked`] has something to give).
    pub fn has_due(&self) -> bool {
        self.rules.iter().flatten().any(Windows::has_due)
    }
}

/// Which closed window an output came from: a rule, a group key, the window's bounds, and
/// the output's place among that window's outputs (a rule with two actions gives two).
/// The same window gives the same origin after a restart from a checkpoint, so a caller
/// can give a resent window's output the id it had the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowOrigin {
    pub rule: Arc<str>,
    pub key: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub index: u32,
    /// [`Closed::seq`]: tells apart windows of one group an event closed with equal bounds.
    pub seq: Option<u64>,
}

impl WindowOrigin {
    /// A 64-bit FNV-1a hash of the origin, fixed across builds and platforms (unlike
    /// `std`'s hashers), with each part length-prefixed so two origins cannot run together.
    pub fn fingerprint(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for part in [self.rule.as_bytes(), self.key.as_bytes()] {
            feed(&(part.len() as u64).to_le_bytes());
            feed(part);
        }
        feed(&self.start_ms.to_le_bytes());
        feed(&self.end_ms.to_le_bytes());
        feed(&self.index.to_le_bytes());
        // Only when there is one, so the ids of windows the clock closes stay what they were.
        if let Some(seq) = self.seq {
            feed(&seq.to_le_bytes());
        }
        hash
    }
}

/// An output, and the closed window it came from (`None` for an output of a single event).
pub type Marked = (Output, Option<WindowOrigin>);

/// Outputs, and which ranges of them closed windows gave.
#[derive(Default)]
struct Emitted {
    outputs: Vec<Output>,
    windows: Vec<(Range<usize>, WindowOrigin)>,
}

impl Emitted {
    fn marked(self) -> Vec<Marked> {
        let mut origins: Vec<Option<WindowOrigin>> = vec![None; self.outputs.len()];
        for (range, origin) in self.windows {
            for (index, at) in range.enumerate() {
                if let Some(slot) = origins.get_mut(at) {
                    let index = u32::try_from(index).unwrap_or(u32::MAX);
                    *slot = Some(WindowOrigin { index, ..origin.clone() });
                }
            }
        }
        self.outputs.into_iter().zip(origins).collect()
    }
}

impl RuleSet {
    /// The names of the rules with a window.
    pub fn windowed_rules(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter(|r| r.sql.window.is_some()).map(|r| &*r.name)
    }

    /// The names of the rules that keep state between events: a window, or a
    /// report-by-exception function (`deadband`, `dedupe`, `lag` ...). [`RuleSet::evaluate`]
    /// skips them; [`RuleSet::evaluate_windowed`] runs them.
    pub fn stateful_rules(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter(|r| r.sql.is_stateful()).map(|r| &*r.name)
    }

    /// Whether a stateful rule's FROM matches `topic`: only an event on such a topic can
    /// change window or report-by-exception state, so only its acknowledgement must wait for
    /// a checkpoint.
    pub fn is_stateful_topic(&self, topic: &str) -> bool {
        let mut matched = Vec::new();
        self.index.matches(topic, &mut matched);
        matched.into_iter().any(|i| self.rules.get(i).is_some_and(|r| r.sql.is_stateful()))
    }

    /// The stateful rules whose FROM matches `topic`, in rule order (what `outpost rules test`
    /// names as taking an event in).
    pub fn stateful_rules_for(&self, topic: &str) -> Vec<&str> {
        let mut matched = Vec::new();
        self.index.matches(topic, &mut matched);
        matched.sort_unstable();
        matched.dedup();
        matched
            .into_iter()
            .filter_map(|i| self.rules.get(i))
            .filter(|r| r.sql.is_stateful())
            .map(|r| &*r.name)
            .collect()
    }

    /// Empty windows for every windowed rule of this set.
    pub fn window_state(&self) -> WindowState {
        WindowState {
            rules: self
                .rules
                .iter()
                .map(|r| r.sql.window.as_ref().map(|w| Windows::new(w.plan.clone())))
                .collect(),
            rbe: self
                .rules
                .iter()
                .map(|r| r.sql.rbe.as_ref().map(|rbe| RbeState::new(rbe.kinds(), rbe.max_groups)))
                .collect(),
            marks: Marks::default(),
            pending: Vec::new(),
            last_delta: SizeHint::default(),
        }
    }

    /// Like [`RuleSet::evaluate`], and windowed rules take the event into `state` (sliding
    /// and count windows may close and give outputs here, and with event time any window
    /// the event's clock passes). The event's time is its `timestamp_ms` (processing time)
    /// unless the rule names an `event_time`; then `timestamp_ms` is the gateway's clock.
    pub fn evaluate_windowed(&self, event: &EventContext<'_>, state: &mut WindowState) -> Vec<Output> {
        self.evaluate_windowed_marked(event, state).into_iter().map(|(o, _)| o).collect()
    }

    /// [`RuleSet::evaluate_windowed`], each output with the window it came from.
    pub fn evaluate_windowed_marked(&self, event: &EventContext<'_>, state: &mut WindowState) -> Vec<Marked> {
        let mut emitted = Emitted::default();
        let mut matched = Vec::new();
        self.index.matches(event.topic, &mut matched);
        let decoded = Decoded::new(event.payload, self.fields.as_ref());
        for rule_idx in matched {
            let Some(rule) = self.rules.get(rule_idx) else { continue };
            match (&rule.sql.window, state.rules.get_mut(rule_idx).and_then(Option::as_mut)) {
                (None, _) => match (&rule.sql.rbe, state.rbe.get_mut(rule_idx).and_then(Option::as_mut)) {
                    (Some(rbe), Some(rbe_state)) => {
                        self.run_rbe(rule, rbe, rbe_state, event, &decoded, &mut emitted.outputs);
                    }
                    // A state made for another rule set: the caller's bug; nothing to feed.
                    (Some(_), None) => {}
                    (None, _) => {
                        self.run(rule, event, &decoded, &mut emitted.outputs, &[]);
                    }
                },
                (Some(window), Some(windows)) => {
                    let mut closed = Vec::new();
                    push(rule, window, windows, event, &decoded, &mut closed, &mut emitted.outputs);
                    for c in closed {
                        self.emit(rule, c, &mut emitted);
                    }
                }
                // A state made for another rule set: the caller's bug; nothing to feed.
                (Some(_), None) => {}
            }
        }
        emitted.marked()
    }

    /// Closes every window due at `now_ms` (Unix milliseconds) and returns the outputs.
    pub fn advance_windows(&self, state: &mut WindowState, now_ms: u64) -> Vec<Output> {
        self.advance_windows_marked(state, now_ms).into_iter().map(|(o, _)| o).collect()
    }

    /// [`RuleSet::advance_windows`], each output with the window it came from.
    pub fn advance_windows_marked(&self, state: &mut WindowState, now_ms: u64) -> Vec<Marked> {
        let mut emitted = Emitted::default();
        for (rule, windows) in self.rules.iter().zip(&mut state.rules) {
            if let Some(windows) = windows {
                for c in windows.advance(now_ms) {
                    self.emit(rule, c, &mut emitted);
                }
            }
        }
        emitted.marked()
    }

    /// Gives the outputs of the windows an event closed in hold mode
    /// ([`WindowState::hold_event_closings`]) that were held before `marks`
    /// ([`WindowState::due_marks`]), each with its window, and forgets them.
    pub fn release_windows_marked(&self, state: &mut WindowState, marks: &DueMarks) -> Vec<Marked> {
        let mut emitted = Emitted::default();
        for ((rule, windows), mark) in self.rules.iter().zip(&mut state.rules).zip(&marks.0) {
            if let (Some(windows), Some(mark)) = (windows, mark) {
                for c in windows.release(*mark) {
                    self.emit(rule, c, &mut emitted);
                }
            }
        }
        emitted.marked()
    }

    /// Closes every open window now, due or not (shutdown with the flush policy).
    pub fn flush_windows(&self, state: &mut WindowState) -> Vec<Output> {
        let mut emitted = Emitted::default();
        for (rule, windows) in self.rules.iter().zip(&mut state.rules) {
            if let Some(windows) = windows {
                for c in windows.flush() {
                    self.emit(rule, c, &mut emitted);
                }
            }
        }
        emitted.outputs
    }

    /// Closes every open window of the rule named `rule` now, due or not, each output with
    /// its window: what a reload does with the windows of a rule it changes or removes.
    pub fn flush_rule_windows_marked(&self, state: &mut WindowState, rule: &str) -> Vec<Marked> {
        let mut emitted = Emitted::default();
        for (r, windows) in self.rules.iter().zip(&mut state.rules) {
            if let (true, Some(windows)) = (&*r.name == rule, windows) {
                for c in windows.flush() {
                    self.emit(r, c, &mut emitted);
                }
            }
        }
        emitted.marked()
    }

    /// A rule with report-by-exception calls: they are computed first (and their state
    /// updated) for every event FROM matches, then the rule runs reading their values.
    fn run_rbe(
        &self,
        rule: &Rule,
        rbe: &RbeSql,
        rbe_state: &mut RbeState,
        event: &EventContext<'_>,
        decoded: &Decoded<'_>,
        out: &mut Vec<Output>,
    ) {
        let payload = if rule.sql.uses_payload {
            match decoded.get(rule.payload) {
                Ok(payload) => payload,
                Err(reason) => {
                    dead_letter(out, rule, event, reason.to_owned());
                    return;
                }
            }
        } else {
            PayloadView::Whole(&NULL)
        };
        let text = (!decoded.is_cbor(rule.payload)).then_some(decoded);
        let env = Env { event, payload, text, item: None, locals: &[] };
        match rbe_state.evaluate(rbe, &env) {
            Ok(locals) => {
                self.run(rule, event, decoded, out, &locals);
            }
            Err(EvalError(reason)) => {
                dead_letter(out, rule, event, reason);
            }
        }
    }

    /// One closed window through the rule's HAVING, SELECT and actions.
    fn emit(&self, rule: &Rule, closed: Closed, emitted: &mut Emitted) {
        let origin = WindowOrigin {
            rule: rule.name.clone(),
            key: closed.key.clone(),
            start_ms: closed.start_ms,
            end_ms: closed.end_ms,
            index: 0,
            seq: closed.seq,
        };
        let mut row = Value::Object(Vec::new());
        if let Ok(Value::Array(keys)) = Value::from_json(closed.key.as_bytes()) {
            for (i, key) in keys.into_iter().enumerate() {
                row.insert(&format!("{KEY_PREFIX}{i}"), key);
            }
        }
        for (i, value) in closed.values.into_iter().enumerate() {
            row.insert(&format!("{AGG_PREFIX}{i}"), value);
        }
        row.insert(WINDOW_START, Value::from_meta_u64(closed.start_ms));
        row.insert(WINDOW_END, Value::from_meta_u64(closed.end_ms));
        let payload = match rule.payload {
            PayloadFormat::Cbor => row.to_cbor(),
            _ => row.to_json_string().into_bytes(),
        };
        let topic = format!("$windows/{}", rule.name);
        let event = EventContext {
            topic: &topic,
            payload: &payload,
            clientid: None,
            username: None,
            qos: 1,
            timestamp_ms: closed.end_ms,
            event_id: 0,
            hops: 0,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
        };
        let decoded = Decoded::new(&payload, self.fields.as_ref());
        let first = emitted.outputs.len();
        self.run(rule, &event, &decoded, &mut emitted.outputs, &[]);
        emitted.windows.push((first..emitted.outputs.len(), origin));
    }
}

/// An event time read from a payload: Unix milliseconds (an integer, or a float rounded
/// down) or RFC 3339 text.
fn event_time_ms(value: &Value) -> Result<u64, String> {
    let ms = match value {
        Value::Int(ms) => Some(*ms),
        // Out of range saturates, and is refused below with the value.
        #[allow(clippy::cast_possible_truncation)]
        Value::Float(ms) if ms.is_finite() => Some(ms.floor() as i64),
        Value::Str(text) => {
            crate::time::parse_rfc3339(text).ok().and_then(|dt| dt.to_unix(crate::time::Unit::Millisecond))
        }
        _ => None,
    };
    ms.and_then(|ms| u64::try_from(ms).ok()).ok_or_else(|| {
        format!(
            "{} is not a time: the field must hold Unix milliseconds or RFC 3339 text",
            value.to_json_string()
        )
    })
}

/// One event into one windowed rule: WHERE, FILTER, group key, aggregate inputs.
fn push(
    rule: &Rule,
    window: &WindowSql,
    windows: &mut Windows,
    event: &EventContext<'_>,
    decoded: &Decoded<'_>,
    closed: &mut Vec<Closed>,
    out: &mut Vec<Output>,
) {
    let payload = if window.reads_payload {
        match decoded.get(rule.payload) {
            Ok(payload) => payload,
            Err(reason) => {
                dead_letter(out, rule, event, reason.to_owned());
                return;
            }
        }
    } else {
        PayloadView::Whole(&NULL)
    };
    let text = (!decoded.is_cbor(rule.payload)).then_some(decoded);
    let env = Env { event, payload, text, item: None, locals: &[] };
    // The key's text and the inputs go into buffers kept between events (taken out of
    // `windows` while it is borrowed, and put back).
    let mut scratch = std::mem::take(&mut windows.scratch);
    let taken = (|| -> Result<bool, EvalError> {
        for condition in window.where_.iter().chain(&window.filter) {
            if condition.truth(&env)? != Some(true) {
                return Ok(false);
            }
        }
        scratch.keys.clear();
        for key in &window.keys {
            scratch.keys.push(key.eval(&env)?.into_owned());
        }
        scratch.inputs.clear();
        for arg in &window.args {
            scratch.inputs.push(match arg {
                // count(*): every event counts.
                None => Value::Bool(true),
                Some(e) => e.eval(&env)?.into_owned(),
            });
        }
        scratch.key.clear();
        // The same text as `Value::Array(keys).to_json_string()`, which the state's keys
        // have always been (an error, which serde_json's writer of values does not give,
        // gives "" there too).
        if serde_json::to_writer(&mut scratch.key, &scratch.keys[..]).is_err() {
            scratch.key.clear();
        }
        Ok(true)
    })();
    match taken {
        Ok(true) => {
            let key = std::str::from_utf8(&scratch.key).unwrap_or_default();
            let inputs = &scratch.inputs;
            let Some(path) = &window.event_time else {
                windows.push(event.timestamp_ms, key, inputs, closed);
                windows.scratch = scratch;
                return;
            };
            let at = match path.eval(&env).map_err(|EvalError(e)| e).and_then(|v| event_time_ms(&v)) {
                Ok(at) => at,
                Err(reason) => {
                    windows.scratch = scratch;
                    dead_letter(out, rule, event, format!("event time: {reason}"));
                    return;
                }
            };
            let pushed = windows.push_event(at, event.timestamp_ms, key, inputs, closed);
            windows.scratch = scratch;
            if window.late == LatePolicy::DeadLetter {
                let reason = match pushed {
                    Pushed::Accepted => return,
                    Pushed::Late => format!(
                        "late event: event time {at} ms is at or before the watermark {} ms, in windows already closed; raise the rule's late_tolerance to take events this late",
                        windows.watermark()
                    ),
                    Pushed::Ahead => format!(
                        "event time {at} ms is too far ahead of the watermark {} ms (more open windows than the group may keep); check the sensor's clock",
                        windows.watermark()
                    ),
                };
                // Asked for by the rule (`late = "deadletter"`), not a failure of it.
                out.push(Output::DeadLetter {
                    rule: rule.name.clone(),
                    reason,
                    topic: event.topic.to_owned(),
                    payload: event.payload.to_vec(),
                    deliberate: true,
                });
            }
        }
        Ok(false) => windows.scratch = scratch,
        Err(EvalError(reason)) => {
            windows.scratch = scratch;
            dead_letter(out, rule, event, reason);
        }
    }
}

/// Format 2's output kinds.
mod output_tag {
    pub const FORWARD: u64 = 0;
    pub const REPUBLISH: u64 = 1;
    pub const DROPPED: u64 = 2;
    pub const LOOP_PREVENTED: u64 = 3;
    pub const DEAD_LETTER: u64 = 4;
}

/// `[[output, origin or null]…]`; an output is `[kind, fields…]` in [`Output`]'s order (a
/// TTL as `[seconds, nanoseconds]` or null), an origin `[rule, key, start, end, index]`.
fn encode_pending(pending: &[Marked], w: &mut Writer) {
    w.array(pending.len());
    for (output, origin) in pending {
        w.array(2);
        match output {
            Output::Forward { rule, topic, payload, qos, priority, ttl } => {
                w.array(7);
                w.uint(output_tag::FORWARD);
                w.str(rule);
                w.str(topic);
                w.bytes(payload);
                w.uint(u64::from(*qos));
                w.uint(u64::from(*priority));
                match ttl {
                    Some(ttl) => {
                        w.array(2);
                        w.uint(ttl.as_secs());
                        w.uint(u64::from(ttl.subsec_nanos()));
                    }
                    None => w.null(),
                }
            }
            Output::Republish { rule, topic, payload, qos, hops } => {
                w.array(6);
                w.uint(output_tag::REPUBLISH);
                w.str(rule);
                w.str(topic);
                w.bytes(payload);
                w.uint(u64::from(*qos));
                w.uint(u64::from(*hops));
            }
            Output::Dropped { rule } => {
                w.array(2);
                w.uint(output_tag::DROPPED);
                w.str(rule);
            }
            Output::LoopPrevented { rule, topic, hops } => {
                w.array(4);
                w.uint(output_tag::LOOP_PREVENTED);
                w.str(rule);
                w.str(topic);
                w.uint(u64::from(*hops));
            }
            Output::DeadLetter { rule, reason, topic, payload, deliberate } => {
                w.array(6);
                w.uint(output_tag::DEAD_LETTER);
                w.str(rule);
                w.str(reason);
                w.str(topic);
                w.bytes(payload);
                w.bool(*deliberate);
            }
        }
        match origin {
            Some(o) => {
                w.array(6);
                w.str(&o.rule);
                w.str(&o.key);
                w.uint(o.start_ms);
                w.uint(o.end_ms);
                w.uint(u64::from(o.index));
                // A count or sliding window's closing number is part of its id.
                match o.seq {
                    Some(seq) => w.uint(seq),
                    None => w.null(),
                }
            }
            None => w.null(),
        }
    }
}

fn decode_pending(r: &mut Reader<'_>) -> Result<Vec<Marked>, SnapshotError> {
    fn small<T: TryFrom<u64>>(r: &mut Reader<'_>) -> Result<T, SnapshotError> {
        let n = r.uint()?;
        T::try_from(n).map_err(|_| SnapshotError::Decode(format!("{n} is out of range")))
    }
    let n = r.array()?;
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        r.fields(2, "a pending output")?;
        let len = r.array()?;
        let output = match (r.uint()?, len) {
            (output_tag::FORWARD, 7) => Output::Forward {
                rule: Arc::from(r.string()?),
                topic: r.string()?,
                payload: r.byte_string()?,
                qos: small(r)?,
                priority: small(r)?,
                ttl: if r.null() {
                    None
                } else {
                    r.fields(2, "a TTL")?;
                    Some(std::time::Duration::new(r.uint()?, small(r)?))
                },
            },
            (output_tag::REPUBLISH, 6) => Output::Republish {
                rule: Arc::from(r.string()?),
                topic: r.string()?,
                payload: r.byte_string()?,
                qos: small(r)?,
                hops: small(r)?,
            },
            (output_tag::DROPPED, 2) => Output::Dropped { rule: Arc::from(r.string()?) },
            (output_tag::LOOP_PREVENTED, 4) => {
                Output::LoopPrevented { rule: Arc::from(r.string()?), topic: r.string()?, hops: small(r)? }
            }
            (output_tag::DEAD_LETTER, 6) => Output::DeadLetter {
                rule: Arc::from(r.string()?),
                reason: r.string()?,
                topic: r.string()?,
                payload: r.byte_string()?,
                deliberate: r.bool()?,
            },
            (kind, len) => {
                return Err(SnapshotError::Decode(format!("an output of kind {kind} with {len} fields")));
            }
        };
        let origin = if r.null() {
            None
        } else {
            r.fields(6, "an output's window")?;
            Some(WindowOrigin {
                rule: Arc::from(r.string()?),
                key: r.string()?,
                start_ms: r.uint()?,
                end_ms: r.uint()?,
                index: small(r)?,
                seq: if r.null() { None } else { Some(r.uint()?) },
            })
        };
        pending.push((output, origin));
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::WindowState;
    use crate::rbe::RbeState;
    use crate::window::SnapshotError;
    use crate::{EventContext, RuleSet, TableSources};

    /// Every kind of state a delta carries: each window, eviction (`max_groups`), event time,
    /// and report-by-exception calls with eviction.
    const RULES: &str = r#"
[[rule]]
name = "tumble"
max_groups = 3
sql = '''SELECT count(*) AS n, sum(payload.v) AS t FROM "s/+" GROUP BY topic(2), TUMBLINGWINDOW(ms, 1000)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "hop"
sql = '''SELECT avg(payload.v) AS a FROM "s/+" GROUP BY topic(2), HOPPINGWINDOW(ms, 1000, 500)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "slide"
sql = '''SELECT max(payload.v) AS m FROM "s/+" GROUP BY topic(2), SLIDINGWINDOW(ms, 700)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "session"
sql = '''SELECT collect(payload.v) AS c FROM "s/+" GROUP BY topic(2), SESSIONWINDOW(ms, 2000, 300)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "count"
sql = '''SELECT percentile(payload.v, 0.5) AS p FROM "s/+" GROUP BY topic(2), COUNTWINDOW(3, 2)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "event"
max_groups = 4
event_time = "payload.ts"
late_tolerance = "400ms"
sql = '''SELECT stddev(payload.v) AS d FROM "s/+" GROUP BY topic(2), TUMBLINGWINDOW(ms, 500)'''
[[rule.action]]
type = "forward"
topic = "out"

[[rule]]
name = "band"
max_groups = 4
sql = '''SELECT lag(payload.v) AS l FROM "s/+" WHERE deadband(payload.v, 20) AND dedupe(payload.v, '1s')'''
[[rule.action]]
type = "forward"
"#;

    fn rules() -> RuleSet {
        RuleSet::compile(RULES, &TableSources::new()).expect("test rules compile")
    }

    fn feed(rules: &RuleSet, state: &mut WindowState, now: u64, sensor: u8, value: i8, ts: u64) {
        let topic = format!("s/{sensor}");
        let payload = format!(r#"{{"v":{value},"ts":{ts}}}"#);
        let event = EventContext {
            topic: &topic,
            payload: payload.as_bytes(),
            clientid: None,
            username: None,
            qos: 1,
            timestamp_ms: now,
            event_id: 1,
            hops: 0,
            peerhost: None,
            retain: false,
            dup: false,
            pub_props: None,
            lifecycle: None,
        };
        rules.evaluate_windowed(&event, state);
    }

    /// A durable log: one snapshot and the deltas taken since.
    struct Log {
        base: Vec<u8>,
        deltas: Vec<Vec<u8>>,
    }

    impl Log {
        fn new(rules: &RuleSet, state: &mut WindowState) -> Log {
            let base = state.snapshot(rules);
            state.clear_changes();
            Log { base, deltas: Vec::new() }
        }

        fn restore(&self, rules: &RuleSet) -> (WindowState, Vec<(String, SnapshotError)>) {
            WindowState::restore_log(rules, &self.base, self.deltas.iter().map(Vec::as_slice))
                .expect("own log restores")
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A reading from `sensor`, `dt` ms later, stamped `delay` ms before it arrived.
        Event {
            dt: u64,
            sensor: u8,
            value: i8,
            delay: u64,
        },
        Advance {
            dt: u64,
        },
        Delta,
        /// Compaction: a new full snapshot replaces the log.
        Snapshot,
        /// Restart from the log.
        Restore,
        Flush,
        /// A QoS 2 reading's marker (sensor, packet id), and its release.
        Mark {
            sensor: u8,
            packet_id: u16,
        },
        Release {
            sensor: u8,
            packet_id: u16,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0..300u64, 0..6u8, any::<i8>(), 0..600u64)
                .prop_map(|(dt, sensor, value, delay)| Step::Event { dt, sensor, value, delay }),
            3 => (0..1_200u64).prop_map(|dt| Step::Advance { dt }),
            4 => Just(Step::Delta),
            1 => Just(Step::Snapshot),
            1 => Just(Step::Restore),
            1 => Just(Step::Flush),
            3 => (0..6u8, 1..4u16).prop_map(|(sensor, packet_id)| Step::Mark { sensor, packet_id }),
            2 => (0..6u8, 1..4u16).prop_map(|(sensor, packet_id)| Step::Release { sensor, packet_id }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// A snapshot and the deltas taken since restore the live state, whatever happened
        /// between them: closing, eviction, removal and re-creation of a group, flushes,
        /// restarts from the log, compactions.
        #[test]
        fn a_snapshot_and_its_deltas_restore_the_live_state(steps in prop::collection::vec(step(), 1..80)) {
            let rules = rules();
            let mut state = rules.window_state();
            let mut log = Log::new(&rules, &mut state);
            let mut now = 1_000u64;
            for step in steps.into_iter().chain([Step::Delta]) {
                match step {
                    Step::Event { dt, sensor, value, delay } => {
                        now += dt;
                        feed(&rules, &mut state, now, sensor, value, now.saturating_sub(delay));
                    }
                    Step::Advance { dt } => {
                        now += dt;
                        rules.advance_windows(&mut state, now);
                    }
                    Step::Delta => {
                        log.deltas.push(state.take_delta(&rules));
                        let (restored, dropped) = log.restore(&rules);
                        prop_assert!(dropped.is_empty());
                        prop_assert_eq!(&restored, &state);
                    }
                    Step::Snapshot => log = Log::new(&rules, &mut state),
                    Step::Restore => {
                        // What the last delta did not take is lost, as in a crash.
                        state = log.restore(&rules).0;
                    }
                    Step::Flush => {
                        rules.flush_windows(&mut state);
                    }
                    Step::Mark { sensor, packet_id } => {
                        state.mark_qos2(&std::sync::Arc::from(format!("c{sensor}")), packet_id);
                    }
                    Step::Release { sensor, packet_id } => {
                        state.release_qos2(&std::sync::Arc::from(format!("c{sensor}")), packet_id);
                    }
                }
            }
        }
    }

    #[test]
    fn a_group_removed_and_made_again_is_an_upsert() {
        let rules = rules();
        let mut state = rules.window_state();
        let mut log = Log::new(&rules, &mut state);
        feed(&rules, &mut state, 100, 1, 5, 100);
        log.deltas.push(state.take_delta(&rules));
        // Closed (removed), then the sensor speaks again: the same keys, new windows.
        rules.advance_windows(&mut state, 5_000);
        feed(&rules, &mut state, 5_100, 1, 7, 5_100);
        log.deltas.push(state.take_delta(&rules));
        assert_eq!(log.restore(&rules).0, state);
        // Made again, then removed again within one delta: a removal.
        feed(&rules, &mut state, 5_200, 2, 1, 5_200);
        rules.advance_windows(&mut state, 9_000);
        log.deltas.push(state.take_delta(&rules));
        assert_eq!(log.restore(&rules).0, state);
    }

    #[test]
    fn evicted_groups_and_entries_are_removed_by_the_delta() {
        let rules = rules();
        let mut state = rules.window_state();
        let mut log = Log::new(&rules, &mut state);
        // "tumble" keeps 3 groups, "band" 4 entries (3 calls per topic).
        for sensor in 0..6 {
            feed(&rules, &mut state, 100 + u64::from(sensor), sensor, 1, 100);
        }
        log.deltas.push(state.take_delta(&rules));
        for sensor in [0, 1] {
            feed(&rules, &mut state, 200 + u64::from(sensor), sensor, 100, 200);
        }
        log.deltas.push(state.take_delta(&rules));
        let (restored, _) = log.restore(&rules);
        assert_eq!(restored, state);
        let evicted: Vec<(&str, u64)> =
            restored.counters(&rules).map(|(name, c)| (name, c.groups_evicted)).collect();
        assert_eq!(evicted[0], ("tumble", 5));
        // 18 entries into 4 places, then 6 more for the two topics that come back.
        let band = restored.rbe.iter().flatten().next().expect("band state");
        assert_eq!(band.evicted, 18 - 4 + 6);
    }

    #[test]
    fn a_delta_of_an_unchanged_state_is_its_meta_only() {
        let rules = rules();
        let mut state = rules.window_state();
        for sensor in 0..6 {
            for at in [100, 150, 190] {
                feed(&rules, &mut state, at + u64::from(sensor), sensor, 3, at);
            }
        }
        let full = state.snapshot(&rules);
        let changed = state.take_delta(&rules);
        let unchanged = state.take_delta(&rules);
        assert!(changed.len() > full.len() / 2, "{} of {}", changed.len(), full.len());
        // Per rule its name, plan and clocks (about 200 bytes), and no group or entry.
        assert!(unchanged.len() < 7 * 250, "{} bytes", unchanged.len());
        // `[2, [[rule, [plan, whole, clocks…, counters, upserted, removed]]…], [[rule, […,
        // upserted, removed]]…], markers, pending]`
        let decoded: ciborium::Value = ciborium::from_reader(unchanged.as_slice()).expect("cbor");
        let top = decoded.as_array().expect("an array");
        assert_eq!(top[0].as_integer(), Some(2.into()), "format 2");
        let mut lists = 0;
        for rule in top[1].as_array().expect("windowed rules") {
            let delta =
                rule.as_array().and_then(|pair| pair.get(1)).and_then(|d| d.as_array()).expect("a delta");
            for list in &delta[8..10] {
                assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:?}");
                lists += 1;
            }
        }
        for rule in top[2].as_array().expect("rbe rules") {
            // `[kinds, whole, max_groups, next_seq, evicted, upserted, removed]`
            let delta =
                rule.as_array().and_then(|pair| pair.get(1)).and_then(|d| d.as_array()).expect("a delta");
            for list in &delta[5..7] {
                assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:?}");
                lists += 1;
            }
        }
        assert_eq!(lists, 7 * 2);
        let mut log = Log::new(&rules, &mut state);
        log.deltas.push(unchanged.clone());
        assert_eq!(log.restore(&rules).0, state);
        // Taking a snapshot and clearing the tracking leaves nothing to say either.
        state.clear_changes();
        assert_eq!(state.take_delta(&rules).len(), unchanged.len());
    }

    #[test]
    fn a_rule_changed_since_the_log_is_dropped_as_restore_drops_it() {
        let rules = rules();
        let mut state = rules.window_state();
        let mut log = Log::new(&rules, &mut state);
        feed(&rules, &mut state, 100, 1, 5, 100);
        log.deltas.push(state.take_delta(&rules));
        let edited = RuleSet::compile(
            &RULES
                .replace("TUMBLINGWINDOW(ms, 1000)", "TUMBLINGWINDOW(ms, 2000)")
                .replace("dedupe(payload.v, '1s')", "dedupe(payload.v, '2s')"),
            &TableSources::new(),
        )
        .expect("edited rules compile");
        let (restored, dropped) = log.restore(&edited);
        let from_snapshot = WindowState::restore(&edited, &state.snapshot(&rules)).expect("own snapshot");
        assert_eq!(restored, from_snapshot.0);
        assert_eq!(dropped, from_snapshot.1);
        let names: Vec<&str> = dropped.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["band", "tumble"]);
        assert_eq!(
            restored.counters(&rules).find(|(n, _)| *n == "hop"),
            state.counters(&rules).find(|(n, _)| *n == "hop")
        );
    }

    #[test]
    fn a_delta_of_a_rule_the_snapshot_lacks_starts_it() {
        let rules = rules();
        let only_hop = RuleSet::compile(
            &RULES[RULES.find("[[rule]]\nname = \"hop\"").expect("hop rule")
                ..RULES.find("[[rule]]\nname = \"slide\"").expect("slide rule")],
            &TableSources::new(),
        )
        .expect("one rule compiles");
        let base = only_hop.window_state().snapshot(&only_hop);
        let mut state = rules.window_state();
        feed(&rules, &mut state, 100, 1, 5, 100);
        let delta = state.take_delta(&rules);
        let (restored, dropped) = WindowState::restore_log(&rules, &base, [delta.as_slice()]).expect("log");
        assert!(dropped.is_empty());
        assert_eq!(restored, state);
    }

    #[test]
    fn tracking_stays_bounded_when_no_delta_is_taken_and_the_next_delta_is_whole() {
        let rules = rules();
        let mut state = rules.window_state();
        let mut log = Log::new(&rules, &mut state);
        let mut longest = 0;
        // Groups and entries made, evicted and closed again and again: 200 sensors, 2 s.
        for at in (0..2_000).step_by(5) {
            for sensor in 0..2u8 {
                let topic_sensor = (at / 5 % 100) as u8 * 2 + sensor;
                feed(&rules, &mut state, 10_000 + at, topic_sensor, 1, 10_000 + at);
            }
            rules.advance_windows(&mut state, 10_000 + at);
            let windows = state
                .rules
                .iter()
                .flatten()
                .map(|w| (w.changes.changed.len() + w.changes.removed.len(), w.groups.len()));
            let rbe = state
                .rbe
                .iter()
                .flatten()
                .map(|r| (r.changes().changed.len() + r.changes().removed.len(), r.len()));
            for (listed, live) in windows.chain(rbe) {
                assert!(
                    listed <= 2 * live + super::super::delta::SLACK + 1,
                    "{listed} listed, {live} live at {at}"
                );
                longest = longest.max(listed);
            }
        }
        assert!(longest > 0);
        assert!(state.rules.iter().flatten().any(|w| w.changes.whole), "some rule went whole");
        log.deltas.push(state.take_delta(&rules));
        assert_eq!(log.restore(&rules).0, state);
    }

    #[test]
    fn a_delta_that_does_not_decode_fails_the_restore() {
        let rules = rules();
        let mut state = rules.window_state();
        let base = state.snapshot(&rules);
        feed(&rules, &mut state, 100, 1, 5, 100);
        let delta = state.take_delta(&rules);
        let cut = &delta[..delta.len() - 3];
        assert!(matches!(WindowState::restore_log(&rules, &base, [cut]), Err(SnapshotError::Decode(_))));
        // A snapshot is not a delta.
        assert!(matches!(
            WindowState::restore_log(&rules, &base, [base.as_slice()]),
            Err(SnapshotError::Decode(_))
        ));
    }

    /// The steps that made the format 1 fixtures (`testdata/v1-*.hex`, written by the
    /// gateway's code before format 2): held closings, QoS 2 markers, every window kind,
    /// report by exception. Returns the live state after each record.
    fn fixture_steps(rules: &RuleSet) -> Vec<WindowState> {
        let mut state = rules.window_state();
        state.hold_event_closings();
        let mut after = Vec::new();
        for sensor in 0..5u8 {
            feed(rules, &mut state, 1_000 + u64::from(sensor) * 7, sensor, sensor as i8 * 3 - 4, 990);
        }
        state.mark_qos2(&std::sync::Arc::from("c1"), 7);
        state.mark_qos2(&std::sync::Arc::from("c2"), 9);
        after.push(state.clone());
        state.clear_changes();
        for sensor in 1..4u8 {
            feed(rules, &mut state, 1_300 + u64::from(sensor) * 5, sensor, 11 - sensor as i8, 1_250);
        }
        state.release_qos2(&std::sync::Arc::from("c1"), 7);
        after.push(state.clone());
        state.take_delta(rules);
        rules.advance_windows(&mut state, 2_100);
        for sensor in [0u8, 4, 5] {
            feed(rules, &mut state, 2_200 + u64::from(sensor), sensor, -(sensor as i8), 2_150);
        }
        after.push(state);
        after
    }

    fn fixture(hex_text: &str) -> Vec<u8> {
        hex::decode(hex_text.trim()).expect("fixture is hex")
    }

    #[test]
    fn a_log_written_in_format_1_still_restores_and_takes_format_2_deltas() {
        let rules = rules();
        let mut after = fixture_steps(&rules);
        let base = fixture(include_str!("testdata/v1-base.hex"));
        let d1 = fixture(include_str!("testdata/v1-d1.hex"));
        let d2 = fixture(include_str!("testdata/v1-d2.hex"));
        assert!(super::is_format_1(&base) && super::is_format_1(&d1));
        let (restored, dropped) = WindowState::restore(&rules, &base).expect("format 1 snapshot");
        assert!(dropped.is_empty());
        assert_eq!(restored, after[0]);
        let (restored, dropped) =
            WindowState::restore_log(&rules, &base, [d1.as_slice(), d2.as_slice()]).expect("format 1 log");
        assert!(dropped.is_empty());
        assert!(restored.has_due(), "the fixture holds closings");
        assert_eq!(restored, after[2]);
        // The gateway upgraded with that log on disk: its next record is a format 2 delta.
        let mut state = after.pop().expect("last state");
        state.take_delta(&rules);
        feed(&rules, &mut state, 2_400, 2, 9, 2_390);
        let d3 = state.take_delta(&rules);
        assert!(!super::is_format_1(&d3));
        let (restored, _) =
            WindowState::restore_log(&rules, &base, [d1.as_slice(), d2.as_slice(), d3.as_slice()])
                .expect("mixed log");
        assert_eq!(restored, state);
    }

    #[test]
    fn a_null_kept_in_the_state_comes_back_null() {
        let rules = rules();
        let mut state = rules.window_state();
        let mut log = Log::new(&rules, &mut state);
        // No `v`: the sliding and count windows keep NULL inputs, the event-time rule's
        // stddev and the lag see NULL.
        for (at, payload) in [(100, r#"{"ts":100}"#), (150, r#"{"v":null,"ts":150}"#), (180, r#"{"ts":180}"#)]
        {
            let event = EventContext {
                topic: "s/1",
                payload: payload.as_bytes(),
                clientid: None,
                username: None,
                qos: 1,
                timestamp_ms: at,
                event_id: 1,
                hops: 0,
                peerhost: None,
                retain: false,
                dup: false,
                pub_props: None,
                lifecycle: None,
            };
            rules.evaluate_windowed(&event, &mut state);
        }
        log.deltas.push(state.take_delta(&rules));
        let kept: Vec<&crate::Value> = state.rules.iter().flatten().flat_map(|w| w.kept_inputs()).collect();
        assert!(kept.contains(&&crate::Value::Null) && kept.contains(&&crate::Value::JsonNull), "{kept:?}");
        // The windows, and `lag`'s NULL (the deadband's NaN report is no value to compare).
        let (restored, _) = log.restore(&rules);
        assert_eq!(restored.rules, state.rules);
        let lag =
            |s: &WindowState| s.rbe.iter().flatten().flat_map(RbeState::entries_shown).collect::<Vec<_>>();
        assert!(lag(&state).iter().any(|e| e.contains("Lag([Null])")), "{:?}", lag(&state));
        assert_eq!(lag(&restored), lag(&state));
        let (from_snapshot, _) = WindowState::restore(&rules, &state.snapshot(&rules)).expect("own snapshot");
        assert_eq!(from_snapshot.rules, state.rules);
        assert_eq!(lag(&from_snapshot), lag(&state));
    }

    /// Outputs a reload closed are state: a snapshot and its deltas hold them until taken,
    /// every kind of output and its window, byte for byte.
    #[test]
    fn pending_outputs_are_held_by_snapshots_and_deltas_until_taken() {
        use std::sync::Arc;

        use crate::Output;
        use crate::window::WindowOrigin;
        let rules = rules();
        let mut state = rules.window_state();
        feed(&rules, &mut state, 100, 1, 5, 100);
        let mut log = Log::new(&rules, &mut state);
        let rule: Arc<str> = Arc::from("gone");
        // Count and sliding windows' origins carry their closing's number; time windows' none.
        let origin = |index: u32| {
            Some(WindowOrigin {
                rule: rule.clone(),
                key: r#"["1"]"#.into(),
                start_ms: 0,
                end_ms: 1_000,
                index,
                seq: (index % 2 == 1).then_some(u64::from(index) + 7),
            })
        };
        let outputs = vec![
            (
                Output::Forward {
                    rule: rule.clone(),
                    topic: "out/1".into(),
                    payload: vec![0, 159, 255],
                    qos: 1,
                    priority: 9,
                    ttl: Some(std::time::Duration::new(3_600, 5)),
                },
                origin(0),
            ),
            (
                Output::Forward {
                    rule: rule.clone(),
                    topic: "out/2".into(),
                    payload: b"{}".to_vec(),
                    qos: 0,
                    priority: 0,
                    ttl: None,
                },
                origin(1),
            ),
            (
                Output::Republish {
                    rule: rule.clone(),
                    topic: "loc".into(),
                    payload: vec![],
                    qos: 2,
                    hops: 3,
                },
                origin(2),
            ),
            (Output::Dropped { rule: rule.clone() }, origin(3)),
            (Output::LoopPrevented { rule: rule.clone(), topic: "loc".into(), hops: 8 }, None),
            (
                Output::DeadLetter {
                    rule: rule.clone(),
                    reason: "topic template: `${x}` is NULL".into(),
                    topic: "$windows/gone".into(),
                    payload: br#"{"n":1}"#.to_vec(),
                    deliberate: false,
                },
                origin(4),
            ),
        ];
        state.keep_pending(outputs.clone());
        assert!(state.has_pending());
        log.deltas.push(state.take_delta(&rules));
        let (restored, _) = log.restore(&rules);
        assert_eq!(restored, state);
        let (from_snapshot, _) = WindowState::restore(&rules, &state.snapshot(&rules)).expect("own snapshot");
        assert_eq!(from_snapshot, state);
        // Under other rules too: they belong to no rule.
        let other = RuleSet::compile(
            &RULES.replace("TUMBLINGWINDOW(ms, 1000)", "TUMBLINGWINDOW(ms, 2000)"),
            &TableSources::new(),
        )
        .expect("edited rules compile");
        let (mut under_other, _) = log.restore(&other);
        assert_eq!(under_other.take_pending(), outputs);
        // Taken: the next delta says none are left.
        assert_eq!(state.take_pending(), outputs);
        log.deltas.push(state.take_delta(&rules));
        assert!(!log.restore(&rules).0.has_pending());
        assert_eq!(log.restore(&rules).0, state);
    }

    /// A reloaded rule whose report-by-exception calls are unchanged keeps its state under
    /// the rule's new `max_groups`.
    #[test]
    fn a_restore_takes_the_rules_new_max_groups_for_report_by_exception() {
        let rules = rules();
        let mut state = rules.window_state();
        feed(&rules, &mut state, 100, 1, 5, 100);
        let bigger = RuleSet::compile(
            &RULES.replace("max_groups = 4\nsql = '''SELECT lag", "max_groups = 40\nsql = '''SELECT lag"),
            &TableSources::new(),
        )
        .expect("edited rules compile");
        let (restored, dropped) = WindowState::restore(&bigger, &state.snapshot(&rules)).expect("restores");
        assert!(dropped.is_empty());
        let band =
            |s: &WindowState| s.rbe.iter().flatten().next().map(|r| (r.len(), r.max_groups())).expect("band");
        assert_eq!(band(&state).1, 4);
        assert_eq!(band(&restored), (band(&state).0, 40));
    }
}
