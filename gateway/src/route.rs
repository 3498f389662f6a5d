//! Stage 2: decides what happens to each event, then does it.
//!
//! Two modes ([`Routing`]):
//! - **Bridge** (no rules file): an event goes upstream under its own topic (plus
//!   `upstream.topic_prefix`) if it matches a `[[route]]` filter, with that route's priority
//!   and TTL; without `[[route]]` sections one route `#` sends everything at priority 5.
//! - **Rules**: the rule engine (`outpost_rules`) evaluates the event; its outputs are
//!   forwarded upstream, republished into the local broker, dropped, or dead-lettered.
//!
//! The decision and its effects are apart: [`decide`] turns an event into its [`Fate`]s
//! and touches nothing; [`run`] carries them out (relay channel, local broker, dead-letter
//! store, counters, logs). `outpost rules test` prints what a [`Dry`] run makes of [`decide`],
//! so the dry run cannot drift from what the gateway does.
//!
//! The mode can change while running: the rules watcher ([`crate::rules`]) replaces the
//! [`Routing`] through a `watch` channel, and the next event uses the new one.
//!
//! # Invariants
//! - Routing never blocks on anything but the bounded output channel to the relay: republish
//!   and dead letters are handed over without waiting, and counted if refused.
//! - Republish goes two ways: to local subscribers through the broker, and straight back into
//!   this stage as a new event carrying its hop count (event chains), evaluated before the
//!   next input. The rule engine refuses to push the count past the rules file's `max_hops`,
//!   which bounds every chain.
//! - Every upstream copy of an event carries a clone of the sensor's held acknowledgement
//!   (its [`Ticket`](crate::ack::Ticket)); the sensor is acknowledged once all of them
//!   are safe, or right after routing when nothing goes upstream.
//! - An event makes at most one dead-letter record, however many rules failed on it; the
//!   record lists each rule and its reason.
//! - Topics starting with `$` (broker-internal) never match `#` and are not bridged.

pub mod checkpoint;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outpost_rules::window::{DueMarks, Marked, WindowOrigin, WindowState};
use outpost_rules::{EventContext, Output, RuleSet, TopicFilter, Trace};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use self::checkpoint::{Checkpointer, Kind, Step};
use crate::broker::Republisher;
use crate::buffer::windows::{LogWrite, WindowLoad};
use crate::config::RouteConfig;
use crate::deadletter::{DeadLetter, RuleReason};
use crate::event::{Event, IdGen, Outbound, Qos2};
use crate::metrics::{Metrics, RuleCounters};
use crate::mqtt::topic::{NameError, TopicPolicy, invalid_topic};
use crate::tap::{RuleResult, Tap, TapRecord, TapStage, What};
use crate::telemetry::{Episode, Failure, LogThrottle, readable};
use crate::watchdog::Heartbeat;

/// What the route stage does with events right now.
#[derive(Debug)]
pub enum Routing {
    Bridge(Bridge),
    Rules(RuleSet),
}

/// The compiled bridge: the first route whose filter matches wins.
#[derive(Debug, Clone)]
pub struct Bridge {
    routes: Vec<(TopicFilter, u8, Option<Duration>)>,
}

impl Bridge {
    pub fn new(routes: &[RouteConfig]) -> Bridge {
        let routes = if routes.is_empty() {
            vec![(TopicFilter::new("#").expect("`#` is a valid filter"), 5, None)]
        } else {
            routes.iter().map(|r| (r.filter.clone(), r.priority, r.ttl)).collect()
        };
        Bridge { routes }
    }

    /// The priority and TTL of the first matching route, if any.
    fn route(&self, topic: &str) -> Option<(u8, Option<Duration>)> {
        self.routes.iter().find(|(filter, _, _)| filter.matches(topic)).map(|(_, p, ttl)| (*p, *ttl))
    }
}

fn expiry(received_ms: u64, ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|ttl| received_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)))
}

/// What happens to an event, as [`decide`] rules it: one entry per output, in rule order.
/// An empty list means the event is unrouted (no route matched, or no rule produced
/// anything). The route stage carries fates out; `outpost rules test` prints them.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Upstream through the store-and-forward buffer. `rule` is `None` for a bridge route.
    Forward {
        rule: Option<Arc<str>>,
        topic: String,
        payload: Bytes,
        qos: u8,
        priority: u8,
        ttl: Option<Duration>,
        /// For an output of a closed window: the id it travels with, derived from the rule,
        /// the group key and the window's bounds, so the same window sent again (after a
        /// restart from a checkpoint) has the same id and an upstream can drop the copy.
        window_id: Option<u64>,
    },
    /// Into the local broker, and back into the route stage as an event with `hops`.
    Republish { rule: Arc<str>, topic: String, payload: Bytes, qos: u8, hops: u8 },
    /// Consumed on purpose by a `drop` action.
    Drop { rule: Arc<str> },
    /// A republish refused because the event reached the hop limit.
    LoopPrevented { rule: Arc<str>, topic: String, hops: u8 },
    /// A forward not made because the event came from upstream (`[[upstream.subscribe]]`,
    /// or a republish of such a command): what came from the cloud never goes back to it.
    /// `rule` is `None` for a bridge route.
    NotBackUpstream { rule: Option<Arc<str>>, topic: String },
    /// One dead-letter record for the event, naming every rule that sent it there (at most
    /// one such fate per event, where the first rule did).
    DeadLetter { entries: Vec<DeadEntry> },
}

/// One rule's part in an event's dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadEntry {
    pub rule: Arc<str>,
    pub reason: String,
    pub cause: DeadCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadCause {
    /// The rule failed on the event (decoding, evaluation, a template).
    Failed,
    /// A forward's topic, with `upstream.topic_prefix`, is no valid topic name.
    InvalidTopic,
    /// A `dead_letter` action sent it.
    Deliberate,
}

/// The event as the rule engine sees it.
pub fn context(event: &Event, hops: u8) -> EventContext<'_> {
    EventContext {
        topic: &event.topic,
        payload: &event.payload,
        clientid: event.client_id.as_deref(),
        username: event.username.as_deref(),
        qos: event.qos.unwrap_or(0),
        timestamp_ms: event.received_ms,
        event_id: event.id,
        hops,
        peerhost: event.peerhost.as_deref(),
        retain: event.retain,
        dup: event.dup,
        pub_props: event.pub_props.as_deref(),
        lifecycle: event.lifecycle.as_ref().map(|l| &l.info),
    }
}

/// Decides what happens to `event` (which went through `hops` republishes), without doing
/// any of it: no channel, no counter, no log. The route stage and `outpost rules test`
/// both call this, so a dry run shows exactly what the gateway does.
pub fn decide(
    routing: &Routing,
    event: &Event,
    hops: u8,
    topic_prefix: &str,
    policy: &TopicPolicy,
) -> Vec<Fate> {
    not_back_upstream(event, decide_any(routing, event, hops, topic_prefix, policy))
}

/// [`decide`] for an event of any origin.
fn decide_any(
    routing: &Routing,
    event: &Event,
    hops: u8,
    topic_prefix: &str,
    policy: &TopicPolicy,
) -> Vec<Fate> {
    match routing {
        // Client events are for rules that read them; a bridge routes publishes only.
        Routing::Bridge(_) if event.lifecycle.is_some() => Vec::new(),
        Routing::Bridge(bridge) => bridge
            .route(&event.topic)
            .map(|(priority, ttl)| Fate::Forward {
                rule: None,
                topic: format!("{topic_prefix}{}", event.topic),
                payload: event.payload.clone(),
                qos: 1,
                priority,
                ttl,
                window_id: None,
            })
            .into_iter()
            .collect(),
        Routing::Rules(rules) => fates(rules.evaluate(&context(event, hops)), topic_prefix, policy),
    }
}

/// Per rule whose FROM matches, how its evaluation of `event` ended (for dry runs; the
/// outputs are those [`decide`] turns into fates). Nothing for a bridge.
pub fn explain(routing: &Routing, event: &Event, hops: u8) -> Vec<Trace> {
    match routing {
        Routing::Bridge(_) => Vec::new(),
        Routing::Rules(rules) => rules.explain(&context(event, hops)),
    }
}

/// Like [`decide`], and publishes into `tap` what each rule (or the bridge's route) made of
/// the event. Rules are evaluated once: the fates come from the traces' outputs, which are
/// what [`decide`]'s evaluation returns.
pub fn decide_tapped(
    routing: &Routing,
    event: &Event,
    hops: u8,
    topic_prefix: &str,
    policy: &TopicPolicy,
    tap: &Tap,
) -> Vec<Fate> {
    let record = |rule: Option<&str>, result, outputs, error| {
        TapRecord::new(
            event.id,
            What::Rules { topic: event.topic.clone(), rule: rule.map(str::to_owned), result, outputs, error },
        )
    };
    let Routing::Rules(rules) = routing else {
        let fates = decide(routing, event, hops, topic_prefix, policy);
        let outputs: Vec<String> = fates.iter().map(describe_fate).collect();
        let result = if fates.is_empty() { RuleResult::Unrouted } else { RuleResult::Matched };
        tap.publish(record(None, result, outputs, None));
        return fates;
    };
    let traces = rules.explain(&context(event, hops));
    if traces.is_empty() {
        tap.publish(record(None, RuleResult::Unrouted, Vec::new(), None));
    }
    let mut outputs = Vec::new();
    for trace in traces {
        let (result, error) = match trace.outcome {
            outpost_rules::Outcome::Filtered => (RuleResult::Filtered, None),
            outpost_rules::Outcome::Selected { .. } => (RuleResult::Matched, None),
            outpost_rules::Outcome::Failed { reason } => (RuleResult::Failed, Some(reason)),
        };
        let described = trace.outputs.iter().map(|o| describe_output(o, topic_prefix)).collect();
        tap.publish(record(Some(&trace.rule), result, described, error));
        outputs.extend(trace.outputs);
    }
    fates(outputs, topic_prefix, policy)
}

/// A rule output as the tap shows it.
fn describe_output(output: &Output, topic_prefix: &str) -> String {
    match output {
        Output::Forward { topic, .. } => format!("forward {topic_prefix}{topic}"),
        Output::Republish { topic, .. } => format!("republish {topic}"),
        Output::Dropped { .. } => "drop".to_owned(),
        Output::LoopPrevented { topic, .. } => format!("loop_prevented {topic}"),
        Output::DeadLetter { .. } => "dead_letter".to_owned(),
    }
}

fn describe_fate(fate: &Fate) -> String {
    match fate {
        Fate::Forward { topic, .. } => format!("forward {topic}"),
        Fate::Republish { topic, .. } => format!("republish {topic}"),
        Fate::Drop { .. } => "drop".to_owned(),
        Fate::LoopPrevented { topic, .. } => format!("loop_prevented {topic}"),
        Fate::NotBackUpstream { topic, .. } => format!("not_back_upstream {topic}"),
        Fate::DeadLetter { .. } => "dead_letter".to_owned(),
    }
}

/// The rule engine's outputs as fates: forward topics get the prefix and are checked,
/// and every dead letter of the event is folded into one.
fn fates(outputs: Vec<Output>, topic_prefix: &str, policy: &TopicPolicy) -> Vec<Fate> {
    fates_marked(outputs.into_iter().map(|o| (o, None)), topic_prefix, policy)
}

/// [`fates`] for outputs of which some came from a closed window: their forwards carry the
/// window's stable id.
fn fates_marked(
    outputs: impl IntoIterator<Item = (Output, Option<u64>)>,
    topic_prefix: &str,
    policy: &TopicPolicy,
) -> Vec<Fate> {
    let outputs = outputs.into_iter();
    let mut fates = Vec::with_capacity(outputs.size_hint().0);
    let mut dead_letter: Option<usize> = None;
    let mut dead = |fates: &mut Vec<Fate>, entry: DeadEntry| {
        if let Some(Fate::DeadLetter { entries }) = dead_letter.and_then(|idx| fates.get_mut(idx)) {
            entries.push(entry);
        } else {
            dead_letter = Some(fates.len());
            fates.push(Fate::DeadLetter { entries: vec![entry] });
        }
    };
    for (output, window_id) in outputs {
        match output {
            Output::Forward { rule, topic, payload, qos, priority, ttl } => {
                let topic = format!("{topic_prefix}{topic}");
                if let Some(why) = invalid_topic(&topic, policy).map(NameError::as_str) {
                    // A topic template filled from payload data can produce what no broker
                    // accepts; queued, it would block the uplink.
                    let reason = format!("invalid upstream topic {topic:?}: {why}");
                    dead(&mut fates, DeadEntry { rule, reason, cause: DeadCause::InvalidTopic });
                    continue;
                }
                let payload = Bytes::from(payload);
                fates.push(Fate::Forward { rule: Some(rule), topic, payload, qos, priority, ttl, window_id });
            }
            Output::Republish { rule, topic, payload, qos, hops } => {
                fates.push(Fate::Republish { rule, topic, payload: Bytes::from(payload), qos, hops });
            }
            Output::Dropped { rule } => fates.push(Fate::Drop { rule }),
            Output::LoopPrevented { rule, topic, hops } => {
                fates.push(Fate::LoopPrevented { rule, topic, hops })
            }
            Output::DeadLetter { rule, reason, deliberate, .. } => {
                let cause = if deliberate { DeadCause::Deliberate } else { DeadCause::Failed };
                dead(&mut fates, DeadEntry { rule, reason, cause });
            }
        }
    }
    fates
}

/// The event a republish feeds back into the route stage: the republished topic and
/// payload, the parent's receive time and held acknowledgement (what the chain forwards is
/// part of what the sensor is acknowledged for), no publisher.
pub fn republished_event(parent: &Event, id: u64, topic: String, payload: Bytes) -> Event {
    Event {
        ticket: parent.ticket.clone(),
        from_upstream: parent.from_upstream,
        ..Event::made(id, topic, payload, parent.received_ms)
    }
}

/// One event of a [`Dry`] run: the event (the input, one a republish fed back, or a closed
/// window's, on `$windows/<rule>` as in the stage), each matching stateless rule's verdict,
/// the stateful rules that took it in, and its fates.
#[derive(Debug)]
pub struct DryStep {
    pub event: Event,
    pub hops: u8,
    /// The rule whose republish produced this event; `None` for the input.
    pub via: Option<Arc<str>>,
    pub traces: Vec<Trace>,
    /// Stateful rules (windows, report by exception) whose FROM matches the event: they
    /// evaluated it with their state (their WHERE and FILTER decide whether it counted).
    pub stateful: Vec<String>,
    /// For a window's step: the window that closed.
    pub window: Option<DryWindow>,
    pub fates: Vec<Fate>,
}

/// A window that closed in a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryWindow {
    pub rule: Arc<str>,
    /// The group's key values, as a JSON array (`[]` without GROUP BY keys).
    pub key: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// What a [`Dry`] run saw.
#[derive(Debug, Default)]
pub struct DryRun {
    pub steps: Vec<DryStep>,
    /// Events of republish chains not shown because `max_events` were reached.
    pub waiting: usize,
}

/// The stateful rules' state across one dry run's events: windows and report-by-exception
/// state as the route stage keeps them, fed the events in order. Time is the events' own
/// (`received_ms`): before an event is taken in, the windows that ended by its time close,
/// as the stage's timer would have closed them.
pub struct DryState {
    state: outpost_rules::window::WindowState,
}

impl DryState {
    /// `None` when no rule keeps state (a bridge, or stateless rules only).
    pub fn new(routing: &Routing) -> Option<DryState> {
        match routing {
            Routing::Rules(rules) if rules.stateful_rules().next().is_some() => {
                Some(DryState { state: rules.window_state() })
            }
            _ => None,
        }
    }
}

/// An event still to show in a dry run, or a closed window's step already decided.
enum DryNext {
    Event { event: Event, hops: u8, via: Option<Arc<str>> },
    Window { event: Event, window: DryWindow, fates: Vec<Fate> },
}

/// A dry run (`outpost rules test`): follows events through `routing` as the route stage
/// would, republish chains included and in the stage's order, doing nothing.
pub struct Dry<'a> {
    pub routing: &'a Routing,
    /// The ids the events a dry run makes get (republished, windows').
    pub ids: &'a IdGen,
    pub topic_prefix: &'a str,
    pub policy: &'a TopicPolicy,
    /// Events shown per [`Dry::run`] at most: a rule that republishes twice doubles the
    /// events at every hop.
    pub max_events: usize,
}

impl Dry<'_> {
    /// Follows `event`. With `state`, the stateful rules take it in too, and the windows that
    /// ended by its time close first, each a step of its own.
    pub fn run(&self, event: Event, mut state: Option<&mut DryState>) -> DryRun {
        let mut queue = VecDeque::new();
        if let (Routing::Rules(rules), Some(dry)) = (self.routing, state.as_deref_mut()) {
            let closed = rules.advance_windows_marked(&mut dry.state, event.received_ms);
            queue.extend(self.windows(closed, event.received_ms));
        }
        queue.push_back(DryNext::Event { event, hops: 0, via: None });
        self.follow(queue, state)
    }

    /// The end of a dry run: every window still open closes at `at_ms`, due or not, with the
    /// chains their republishes start. Not what the gateway does at a stop (it keeps them
    /// open, checkpointed, until their end): what they hold so far, shown.
    pub fn close_all(&self, state: &mut DryState, at_ms: u64) -> DryRun {
        let Routing::Rules(rules) = self.routing else { return DryRun::default() };
        let names: Vec<String> = rules.stateful_rules().map(str::to_owned).collect();
        let mut closed = Vec::new();
        for name in &names {
            closed.extend(rules.flush_rule_windows_marked(&mut state.state, name));
        }
        let queue = self.windows(closed, at_ms).into();
        self.follow(queue, Some(state))
    }

    /// Shows the queued events and windows, and every event their republishes feed back.
    fn follow(&self, mut queue: VecDeque<DryNext>, mut state: Option<&mut DryState>) -> DryRun {
        let (routing, prefix, policy) = (self.routing, self.topic_prefix, self.policy);
        let mut run = DryRun::default();
        while let Some(next) = queue.pop_front() {
            if run.steps.len() == self.max_events {
                run.waiting = queue.len() + 1;
                return run;
            }
            let step = match next {
                DryNext::Window { event, window, fates } => DryStep {
                    event,
                    hops: 0,
                    via: None,
                    traces: Vec::new(),
                    stateful: Vec::new(),
                    window: Some(window),
                    fates,
                },
                DryNext::Event { event, hops, via } => {
                    let traces = explain(routing, &event, hops);
                    let (stateful, fates) = match (routing, state.as_deref_mut()) {
                        (Routing::Rules(rules), Some(dry)) if rules.is_stateful_topic(&event.topic) => {
                            let names = rules
                                .stateful_rules_for(&event.topic)
                                .into_iter()
                                .map(str::to_owned)
                                .collect();
                            // Own outputs (stateless rules, report by exception), then the
                            // windows the event itself closed (count and sliding windows, an
                            // evicted group).
                            let (own, closed): (Vec<Marked>, Vec<Marked>) = rules
                                .evaluate_windowed_marked(&context(&event, hops), &mut dry.state)
                                .into_iter()
                                .partition(|(_, origin)| origin.is_none());
                            let own = fates(own.into_iter().map(|(o, _)| o).collect(), prefix, policy);
                            queue.extend(self.windows(closed, event.received_ms));
                            (names, not_back_upstream(&event, own))
                        }
                        _ => (Vec::new(), decide(routing, &event, hops, prefix, policy)),
                    };
                    DryStep { event, hops, via, traces, stateful, window: None, fates }
                }
            };
            for fate in &step.fates {
                if let Fate::Republish { rule, topic, payload, hops, .. } = fate {
                    let next =
                        republished_event(&step.event, self.ids.next_id(), topic.clone(), payload.clone());
                    queue.push_back(DryNext::Event { event: next, hops: *hops, via: Some(rule.clone()) });
                }
            }
            run.steps.push(step);
        }
        run
    }

    /// Closed windows' outputs as steps, one per window (grouped as the stage groups them),
    /// each on a `$windows/<rule>` event at `at_ms` whose fates carry the window's id.
    fn windows(&self, marked: Vec<Marked>, at_ms: u64) -> Vec<DryNext> {
        let mut steps = Vec::new();
        for (origin, outputs) in by_window(marked) {
            let event =
                Event::made(self.ids.next_id(), format!("$windows/{}", origin.rule), Bytes::new(), at_ms);
            let window = DryWindow {
                rule: origin.rule.clone(),
                key: origin.key.clone(),
                start_ms: origin.start_ms,
                end_ms: origin.end_ms,
            };
            let fates = fates_marked(
                outputs.into_iter().map(|(o, origin)| (o, origin.map(|o| o.fingerprint()))),
                self.topic_prefix,
                self.policy,
            );
            steps.push(DryNext::Window { event, window, fates });
        }
        steps
    }
}

/// Closed windows' outputs, one entry per window with its outputs in order (a window's
/// outputs are adjacent, each with its own `index`); outputs of no window are left out.
fn by_window(marked: Vec<Marked>) -> Vec<(WindowOrigin, Vec<Marked>)> {
    let same = |a: &WindowOrigin, b: &WindowOrigin| {
        (&a.rule, &a.key, a.start_ms, a.end_ms, a.seq) == (&b.rule, &b.key, b.start_ms, b.end_ms, b.seq)
    };
    let mut windows: Vec<(WindowOrigin, Vec<Marked>)> = Vec::new();
    // An output of no window between two of one window parts them, as it always has.
    let mut parted = true;
    for (output, origin) in marked {
        let Some(this) = origin.clone() else {
            parted = true;
            continue;
        };
        match windows.last_mut() {
            Some((last, outputs)) if !parted && same(last, &this) => outputs.push((output, origin)),
            _ => windows.push((this, vec![(output, origin)])),
        }
        parted = false;
    }
    windows
}

/// The dead-letter record of an event.
pub fn dead_letter(event: &Event, entries: &[DeadEntry]) -> DeadLetter {
    let rules: Vec<RuleReason> = entries
        .iter()
        .map(|entry| RuleReason {
            rule: entry.rule.to_string(),
            reason: entry.reason.clone(),
            deliberate: entry.cause == DeadCause::Deliberate,
        })
        .collect();
    let first = rules.first();
    DeadLetter {
        ts_ms: event.received_ms,
        event_id: event.id,
        rule: first.map(|r| r.rule.clone()).unwrap_or_default(),
        reason: first.map(|r| r.reason.clone()).unwrap_or_default(),
        topic: event.topic.clone(),
        payload: event.payload.to_vec(),
        rules,
    }
}

/// The route stage's fixed wiring.
pub struct RouteStage {
    pub routing: watch::Receiver<Arc<Routing>>,
    pub topic_prefix: String,
    pub republisher: Option<Republisher>,
    pub dead_letters: mpsc::Sender<DeadLetter>,
    /// What rule outputs' topics must satisfy (the broker's, so both paths agree).
    pub topic_policy: TopicPolicy,
    /// For the ids of a rule's second and later forwards of one event (each upstream message
    /// needs its own id, or deduplication would drop legitimate outputs).
    pub ids: IdGen,
    pub metrics: Metrics,
    /// The stage's heartbeat (the watchdog): busy from taking an event until it waits for the
    /// next, or for room in the relay's channel (the relay's own heartbeat covers that wait).
    pub heartbeat: Heartbeat,
    /// Where `outpost tap` sees each rule's verdict.
    pub tap: Tap,
    /// What closes windows (stateful rules only).
    pub clock: Clock,
    /// Where the stateful rules' state is checkpointed; `None` runs them from memory only
    /// (unit tests), flushing open windows when the stage stops.
    pub durable: Option<Durable>,
}

/// The buffer file's side of the stateful rules.
pub struct Durable {
    /// The store thread's command queue (`Command::Checkpoint`).
    pub commands: mpsc::Sender<crate::buffer::worker::Command>,
    /// The least time between two checkpoints: `buffer.max_ack_delay`, the longest a
    /// sensor's PUBACK is meant to wait (plus one fsync), as for a forwarded event on a slow
    /// uplink. A reading a window took in has no upstream copy whose PUBACK could come
    /// sooner, so its acknowledgement waits for the next checkpoint whatever the interval;
    /// a longer one makes fewer, larger commits. At `commit_interval` (25 ms), 10,000
    /// readings a second cost 40 durable commits a second and as many flash bytes as the
    /// readings themselves (rules/README.md, "What windows cost").
    pub interval: Duration,
    /// The checkpoint log found in the file at start.
    pub restored: WindowLoad,
}

/// The route stage's handles on the per-rule counters, looked up once per rule name.
#[derive(Default)]
struct RuleStats {
    by_name: std::collections::HashMap<Arc<str>, Arc<RuleCounters>>,
    /// Rules already counted as matched for the current event.
    matched: Vec<Arc<str>>,
}

impl RuleStats {
    fn of(&mut self, metrics: &Metrics, rule: &Arc<str>) -> &RuleCounters {
        self.by_name.entry(Arc::clone(rule)).or_insert_with(|| metrics.rules().get(rule))
    }

    /// Counts, per rule, whether it matched the event, its outputs and its failures.
    fn count(&mut self, metrics: &Metrics, fates: &[Fate]) {
        self.matched.clear();
        for fate in fates {
            let (rule, failed) = match fate {
                Fate::Forward { rule: Some(rule), .. }
                | Fate::Republish { rule, .. }
                | Fate::Drop { rule }
                | Fate::LoopPrevented { rule, .. }
                | Fate::NotBackUpstream { rule: Some(rule), .. } => (rule, false),
                Fate::Forward { rule: None, .. } | Fate::NotBackUpstream { rule: None, .. } => continue,
                Fate::DeadLetter { entries } => {
                    for entry in entries {
                        let failed = entry.cause != DeadCause::Deliberate;
                        self.count_one(metrics, &entry.rule, failed);
                    }
                    continue;
                }
            };
            self.count_one(metrics, rule, failed);
        }
    }

    fn count_one(&mut self, metrics: &Metrics, rule: &Arc<str>, failed: bool) {
        let first = !self.matched.contains(rule);
        if first {
            self.matched.push(Arc::clone(rule));
        }
        let counters = self.of(metrics, rule);
        if failed {
            Metrics::add(&counters.errors, 1);
            return;
        }
        Metrics::add(&counters.outputs, 1);
        if first {
            Metrics::add(&counters.matched, 1);
        }
    }
}

/// Where the route stage reads the time that closes windows: Unix milliseconds, the
/// timescale of events' `received_ms`.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock, as the broker stamps events.
    System,
    /// `base_ms` at tokio's `base`, then following tokio's clock: tests pause and advance it.
    Tokio { base_ms: u64, base: Instant },
}

impl Clock {
    /// A clock at `base_ms` now that moves with tokio's (paused, in tests) clock.
    pub fn tokio_at(base_ms: u64) -> Clock {
        Clock::Tokio { base_ms, base: Instant::now() }
    }

    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => crate::event::now_ms(),
            Clock::Tokio { base_ms, base } => {
                base_ms.saturating_add(u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX))
            }
        }
    }
}

/// The state of the stateful rules (windows, report by exception) of the routing in use;
/// `None` when it has none, so a bridge or stateless rules cost nothing here.
fn fresh_windows(routing: &Routing) -> Option<WindowState> {
    match routing {
        Routing::Rules(rules) if rules.stateful_rules().next().is_some() => Some(rules.window_state()),
        _ => None,
    }
}

/// A reload: what the new routing keeps of the old one's windows, and the outputs of the
/// windows it does not keep. A rule whose window and aggregates are unchanged (by name)
/// keeps its open windows (its new SELECT, HAVING and actions apply when they close); the
/// open windows of a rule that was changed or removed are closed at once under the old
/// rule (marked early), so no reading they hold is lost. Report-by-exception state of a
/// changed rule starts again (at most one report too many). Each is logged.
///
/// With checkpoints (`durable`) and rules to hold them, those outputs (and any an earlier
/// reload left unsent) are not returned but kept in the new state as pending
/// (`WindowState::keep_pending`): the readings they hold were acknowledged, and the
/// restart with the new rules would drop the changed rule's checkpointed windows, so they
/// go to the relay only once a checkpoint holding them committed ([`release_held`]), and a
/// crash before their outputs are safe sends them again from the restored state, with the
/// same ids. Otherwise they are returned, to be sent at once.
fn reload_windows(
    old: &Routing,
    state: Option<WindowState>,
    new: &Routing,
    durable: bool,
) -> (Option<WindowState>, Vec<Marked>) {
    let mut fresh = fresh_windows(new);
    let (Routing::Rules(old_rules), Some(mut state)) = (old, state) else { return (fresh, Vec::new()) };
    // An earlier reload's outputs not yet released: they go with this reload's.
    let mut outputs = state.take_pending();
    let mut kept: Vec<String> = Vec::new();
    if let (Routing::Rules(new_rules), Some(_)) = (new, fresh.as_ref()) {
        match WindowState::restore(new_rules, &state.snapshot(old_rules)) {
            Ok((restored, dropped)) => {
                let old_windowed: Vec<&str> = old_rules.windowed_rules().collect();
                kept = new_rules
                    .windowed_rules()
                    .filter(|r| old_windowed.contains(r) && !dropped.iter().any(|(d, _)| d == r))
                    .map(str::to_owned)
                    .collect();
                fresh = Some(restored);
            }
            Err(e) => {
                warn!(message = "the open windows could not be carried over to the reloaded rules; they are closed early and sent instead", error = %e)
            }
        }
    }
    let hold = durable && matches!(new, Routing::Rules(_));
    for rule in old_rules.windowed_rules() {
        if kept.iter().any(|k| k == rule) {
            info!(message = "rules reloaded: this rule's window and aggregates are unchanged, its open windows carry on", %rule);
            continue;
        }
        let flushed = old_rules.flush_rule_windows_marked(&mut state, rule);
        let windows = flushed.iter().filter_map(|(_, o)| o.as_ref()).filter(|o| o.index == 0).count();
        if hold {
            info!(message = "rules reloaded: this rule was changed or removed, its open windows were closed early; their outputs are sent once the next checkpoint, which holds them, has committed", %rule, windows);
        } else {
            info!(message = "rules reloaded: this rule was changed or removed, its open windows were closed early and their outputs sent", %rule, windows);
        }
        outputs.extend(flushed);
    }
    if let (true, false, Routing::Rules(new_rules)) = (hold, outputs.is_empty(), new) {
        fresh.get_or_insert_with(|| new_rules.window_state()).keep_pending(outputs);
        return (fresh, Vec::new());
    }
    (fresh, outputs)
}

/// Whether `Forward`s become `NotBackUpstream` for an event from upstream (see [`decide`]).
fn not_back_upstream(event: &Event, fates: Vec<Fate>) -> Vec<Fate> {
    if !event.from_upstream {
        return fates;
    }
    fates
        .into_iter()
        .map(|fate| match fate {
            Fate::Forward { rule, topic, .. } => Fate::NotBackUpstream { rule, topic },
            other => other,
        })
        .collect()
}

/// Hands `outbound` to the relay in order; `false` once the relay has gone.
async fn send_all(out: &mpsc::Sender<Outbound>, outbound: Vec<Outbound>, heartbeat: &Heartbeat) -> bool {
    for outbound in outbound {
        match out.try_send(outbound) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(outbound)) => {
                // Waiting on the relay, not working: the turn ends until there is room.
                heartbeat.end();
                let sent = out.send(outbound).await;
                heartbeat.begin();
                if sent.is_err() {
                    return false;
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
    }
    true
}

/// What the stage takes next.
enum Next {
    Event(Event, u8),
    /// The earliest open window is due.
    Tick,
    /// The checkpointer asks for a snapshot, or made progress.
    Checkpoint(Step),
    /// The input closed: the broker stopped.
    Closed,
}

/// The state found in the buffer file at start, for `routing`: the windows of every rule
/// whose window and aggregates are unchanged. The others are logged and counted, and so is
/// a checkpoint log that does not decode or cannot make a state.
fn restore_windows(routing: &Routing, load: WindowLoad, metrics: &Metrics) -> Option<WindowState> {
    let counters = metrics.counters();
    let (base, deltas) = match load {
        WindowLoad::Empty => return None,
        WindowLoad::Log { base, deltas } => (base, deltas),
        WindowLoad::Unusable(why) => {
            Metrics::add(&counters.window_state_dropped, 1);
            error!(message = "the window-state log in the buffer file cannot be used; the stateful rules start empty, and the readings the log held are lost (the next checkpoint replaces it)", reason = %why);
            return None;
        }
    };
    let Routing::Rules(rules) = routing else {
        warn!(message = "the buffer file holds window state, but no rules file is in use; it is discarded");
        Metrics::add(&counters.window_state_dropped, 1);
        return None;
    };
    match WindowState::restore_log(rules, &base, deltas.iter().map(Vec::as_slice)) {
        // No stateful rule, and no reload's outputs waiting to be sent: nothing to restore.
        Ok((state, _)) if fresh_windows(routing).is_none() && !state.has_pending() => None,
        Ok((state, dropped)) => {
            for (rule, why) in &dropped {
                Metrics::add(&counters.window_state_dropped, 1);
                warn!(message = "this rule's window or aggregates changed while the gateway was stopped: its checkpointed open windows are discarded, with the readings they held. Change windowed rules while the gateway runs (a reload closes and sends their windows)", %rule, reason = %why);
            }
            info!(
                message = "window state restored from the buffer file",
                groups = state.groups(),
                deltas = deltas.len(),
                rules_not_restored = dropped.len()
            );
            Some(state)
        }
        Err(e) => {
            Metrics::add(&counters.window_state_dropped, 1);
            error!(message = "the window state in the buffer file could not be read; the stateful rules start empty", error = %e);
            None
        }
    }
}

/// Exports the state's own counters (they live in the checkpoint, so they carry across
/// restarts) as the gateway's, and logs readings event-time rules dropped. Called after each
/// reading a stateful rule reads (where they change), at start and at each checkpoint (where
/// a quiet episode of late readings can end): a few loads and stores per rule.
fn export_window_counters(
    routing: &Routing,
    state: &WindowState,
    metrics: &Metrics,
    late_log: &mut LateLog,
    now: Instant,
) {
    let Routing::Rules(rules) = routing else { return };
    let (mut evicted, mut late, mut ahead) = (0, 0, 0);
    for (_, c) in state.counters(rules) {
        evicted += c.groups_evicted;
        late += c.late;
        ahead += c.ahead;
    }
    let counters = metrics.counters();
    counters.window_groups_evicted.store(evicted, std::sync::atomic::Ordering::Relaxed);
    counters.window_late.store(late, std::sync::atomic::Ordering::Relaxed);
    counters.window_ahead.store(ahead, std::sync::atomic::Ordering::Relaxed);
    for (rule, refused) in state.refused_silently(rules) {
        late_log.observe(rule, refused, now);
    }
}

/// Readings an event-time rule with `late = "drop"` refused (too late, or too far ahead):
/// counted by the rules crate, and logged here once per rule per episode. An episode ends
/// after [`LATE_QUIET`] without one (looks come with readings and checkpoints, far more often
/// than a sensor with a wrong clock sends, so one look without news would end it each time).
#[derive(Default)]
struct LateLog {
    /// By rule name: the count at the last look, when it last grew, the episode.
    rules: std::collections::HashMap<String, (u64, Instant, Episode)>,
}

/// How long an event-time rule drops nothing before its episode of late readings ends.
const LATE_QUIET: Duration = Duration::from_secs(60);

impl LateLog {
    /// Returns what it logged, for tests: `Some(true)` an episode started, `Some(false)` one
    /// ended.
    fn observe(&mut self, rule: &str, refused: u64, now: Instant) -> Option<bool> {
        let Some((seen, grew_at, episode)) = self.rules.get_mut(rule) else {
            // The first look (a start, a reload): what the checkpoint carried over is no news.
            self.rules.insert(rule.to_owned(), (refused, now, Episode::default()));
            return None;
        };
        let new = refused.saturating_sub(*seen);
        *seen = refused;
        if new > 0 {
            *grew_at = now;
            if episode.failed(now) == Failure::Started {
                warn!(message = "an event-time rule is dropping readings whose event time is outside its open windows (late, or too far ahead); raise the rule's late_tolerance, fix the sensors' clocks, or set late = \"deadletter\" to keep them (counted in window_late and window_ahead; logged again only after a quiet minute)", %rule, dropped = new);
                return Some(true);
            }
            None
        } else if now.duration_since(*grew_at) < LATE_QUIET {
            None
        } else {
            let (lasted, looks) = episode.ended(now)?;
            info!(message = "an event-time rule stopped dropping late readings", %rule, lasted = %readable(lasted), looks_with_drops = looks);
            Some(false)
        }
    }
}

/// Runs until its input closes (the broker stopped), then closes its output so the relay can
/// finish. It never selects on cancellation itself: stopping upstream of it is what ends it,
/// so nothing already ingested is dropped on the floor.
///
/// With stateful rules it also sleeps until the next window is due (no timer while none is
/// open) and, with [`Durable`], checkpoints their state ([`checkpoint`]): a reading they take
/// in is acknowledged once a checkpoint holding it is committed. When its input closes it
/// writes a last checkpoint, and the open windows go on after the next start (the shutdown
/// policy); without [`Durable`] it closes them early and sends them instead.
pub async fn run(mut stage: RouteStage, mut input: mpsc::Receiver<Event>, out: mpsc::Sender<Outbound>) {
    // Republished events waiting to be evaluated again, with their hop count.
    let mut chain: VecDeque<(Event, u8)> = VecDeque::new();
    let mut logs = Logs::default();
    let mut late_log = LateLog::default();
    let mut rule_stats = RuleStats::default();
    let mut routing = stage.routing.borrow_and_update().clone();
    let mut durable = stage.durable.take();
    let restored = durable.as_mut().map(|d| std::mem::take(&mut d.restored)).unwrap_or_default();
    let mut windows = match restored {
        WindowLoad::Empty => fresh_windows(&routing),
        load => restore_windows(&routing, load, &stage.metrics).or_else(|| fresh_windows(&routing)),
    };
    let mut checkpointer = durable.map(|d| Checkpointer::new(d.commands, d.interval, stage.metrics.clone()));
    if let (Some(ck), true) = (checkpointer.as_mut(), windows.is_some()) {
        // The restored state (or a fresh one replacing a discarded checkpoint) is written
        // again, in full (the checkpointer's first one always is), which also compacts the
        // log found and clears a checkpoint no rule uses any more.
        ck.changed();
    }
    hold_if_durable(windows.as_mut(), checkpointer.as_ref());
    if let Some(state) = windows.as_ref() {
        // What the restored state counted before the restart.
        export_window_counters(&routing, state, &stage.metrics, &mut late_log, Instant::now());
    }
    // The last checkpoint taken while windows an event closed, or a reload's outputs, were
    // held, and where they stood: once it committed they go out (see `release_held`).
    let mut held_at = HeldAt::default();
    // The latest time the windows were advanced to: an event taken in later but received
    // before it (it waited in the stage's queue across a window's end) counts in the window
    // open now instead of being late, so no acknowledged reading falls out of every window.
    let mut advanced_to = 0;
    // Its own holder: `carry_out` borrows the whole stage.
    let heartbeat = stage.heartbeat.clone();
    // Every turn ends where the stage waits; the first one begins here.
    heartbeat.begin();
    loop {
        let next = match chain.pop_front() {
            Some((event, hops)) => Next::Event(event, hops),
            None => {
                let due_in = windows
                    .as_ref()
                    .and_then(WindowState::next_close)
                    .map(|at| Duration::from_millis(at.saturating_sub(stage.clock.now_ms())));
                let room = checkpointer.as_ref().is_none_or(|ck| !ck.full());
                heartbeat.end();
                let next = tokio::select! {
                    biased;
                    step = async { Some(checkpointer.as_mut()?.wait().await) }, if checkpointer.is_some() => {
                        step.map_or(Next::Checkpoint(Step::Progress), Next::Checkpoint)
                    }
                    received = input.recv(), if room => match received {
                        Some(event) => Next::Event(event, 0),
                        None => Next::Closed,
                    },
                    () = tokio::time::sleep(due_in.unwrap_or_default()), if due_in.is_some() => Next::Tick,
                };
                heartbeat.begin();
                next
            }
        };
        heartbeat.wedge_if_asked().await;
        if stage.routing.has_changed().unwrap_or(false) {
            let new = stage.routing.borrow_and_update().clone();
            let (kept, flushed) = reload_windows(&routing, windows.take(), &new, checkpointer.is_some());
            let outbound = stage.carry_out_windows(
                flushed,
                None,
                checkpointer.as_mut(),
                &mut chain,
                &mut logs,
                &mut rule_stats,
            );
            windows = kept;
            routing = new;
            hold_if_durable(windows.as_mut(), checkpointer.as_ref());
            // Marks of the old state's rules: the next checkpoint marks the new one.
            held_at = HeldAt::default();
            if let Some(ck) = checkpointer.as_mut() {
                // Other rules, another state: deltas of the old one would not apply to it.
                ck.reshaped();
            }
            // The outputs of the windows the reload closed rest on memory alone until the
            // reshaped state holding them commits: commit it now (taking no input meanwhile),
            // and `release_held` below sends them.
            if let (Some(ck), Routing::Rules(rules), Some(state)) =
                (checkpointer.as_mut(), &*routing, windows.as_mut())
                && state.has_pending()
            {
                heartbeat.end();
                commit_now(ck, rules, state, &mut held_at).await;
                heartbeat.begin();
            }
            if !send_all(&out, outbound, &heartbeat).await {
                return;
            }
        }
        // A PUBREL is no reading: it ends a QoS 2 reading's marker, nothing else.
        let next = match next {
            Next::Event(event, _) if matches!(event.qos2, Some(Qos2::Release(_))) => {
                release_qos2(event, windows.as_mut(), checkpointer.as_mut());
                continue;
            }
            other => other,
        };
        let released = release_held(
            &mut stage,
            &routing,
            windows.as_mut(),
            checkpointer.as_mut(),
            &mut held_at,
            &mut chain,
            &mut logs,
            &mut rule_stats,
        );
        if !send_all(&out, released, &heartbeat).await {
            return;
        }
        // A state kept only for a reload's outputs (the new rules keep none) has done its
        // part: without it the stateless rules take their usual path, and the next
        // checkpoint clears the log.
        if let (Routing::Rules(rules), Some(state)) = (&*routing, windows.as_ref())
            && !state.has_pending()
            && rules.stateful_rules().next().is_none()
        {
            windows = None;
            if let Some(ck) = checkpointer.as_mut() {
                ck.changed();
            }
        }
        // Windows due (the timer fired, or an event came past the earliest end) close here,
        // and only from committed state: the readings they hold are first checkpointed, so
        // after a crash a window restored from the file closes again with exactly the readings
        // it was sent with (the same id, the same content), and the stage takes no input
        // meanwhile (one checkpoint per window end).
        let due_at = match &next {
            Next::Event(event, _) => Some(event.received_ms.max(advanced_to)),
            Next::Tick => Some(stage.clock.now_ms()),
            _ => None,
        };
        if let (Some(at), Routing::Rules(rules), Some(state)) = (due_at, &*routing, windows.as_mut()) {
            if state.next_close().is_some_and(|close| close <= at) {
                if let Some(ck) = checkpointer.as_mut() {
                    heartbeat.end();
                    commit_now(ck, rules, state, &mut held_at).await;
                    heartbeat.begin();
                }
                advanced_to = advanced_to.max(stage.clock.now_ms()).max(at);
                let closed = rules.advance_windows_marked(state, advanced_to);
                if let (Some(ck), false) = (checkpointer.as_mut(), closed.is_empty()) {
                    ck.changed();
                }
                let outbound = stage.carry_out_windows(
                    closed,
                    None,
                    checkpointer.as_mut(),
                    &mut chain,
                    &mut logs,
                    &mut rule_stats,
                );
                if !send_all(&out, outbound, &heartbeat).await {
                    return;
                }
            }
        }
        let now = Instant::now();
        let outbound = match (next, &*routing, windows.as_mut()) {
            (Next::Checkpoint(Step::Progress), ..) => Vec::new(),
            (Next::Checkpoint(Step::Due), routing_now, state) => {
                if let Some(ck) = checkpointer.as_mut() {
                    let write = match (routing_now, state) {
                        (Routing::Rules(rules), Some(state)) => {
                            export_window_counters(routing_now, state, &stage.metrics, &mut late_log, now);
                            let write = checkpoint_of(ck.wants(), rules, state);
                            mark_held(ck.taken() + 1, state, &mut held_at);
                            write
                        }
                        _ => LogWrite::Clear,
                    };
                    ck.take(write);
                }
                Vec::new()
            }
            (Next::Closed, routing_now, state) => {
                if let Some(ck) = checkpointer.as_mut() {
                    // The shutdown policy: a last checkpoint; the windows go on after the
                    // next start. Bounded, so a hung disk cannot hold the shutdown.
                    let mut state = state;
                    let has_state = state.is_some();
                    let mut last_write = |ck: &mut Checkpointer| match (routing_now, state.as_deref_mut()) {
                        (Routing::Rules(rules), Some(state)) => checkpoint_of(ck.wants(), rules, state),
                        _ => LogWrite::Clear,
                    };
                    if has_state || !ck.idle() {
                        let write = last_write(ck);
                        ck.take(write);
                        // A write that fails meanwhile loses the deltas behind it: the
                        // checkpointer then asks for a full one, which is taken here too.
                        let last = async {
                            while !ck.idle() {
                                if ck.wait().await == Step::Due {
                                    let write = last_write(ck);
                                    ck.take(write);
                                }
                            }
                        };
                        if tokio::time::timeout(SHUTDOWN_CHECKPOINT_WAIT, last).await.is_err() {
                            error!(
                                message = "stopping: the last window checkpoint did not commit in time; readings since the previous one were not acknowledged and will be resent by their sensors"
                            );
                        } else {
                            info!(
                                message = "stopping: window state checkpointed; open windows go on after the next start"
                            );
                        }
                    }
                    break;
                }
                if let (Routing::Rules(rules), Some(state)) = (routing_now, state) {
                    let flushed: Vec<Marked> = rules
                        .windowed_rules()
                        .collect::<Vec<_>>()
                        .into_iter()
                        .flat_map(|rule| rules.flush_rule_windows_marked(state, rule))
                        .collect();
                    if !flushed.is_empty() {
                        info!(
                            message = "stopping: open windows closed early and their outputs sent",
                            outputs = flushed.len()
                        );
                    }
                    let outbound =
                        stage.carry_out_windows(flushed, None, None, &mut chain, &mut logs, &mut rule_stats);
                    // Republishes a flush made are not evaluated again: the stage is stopping.
                    let _ = send_all(&out, outbound, &heartbeat).await;
                }
                break;
            }
            // Closed above; or a tick for state a reload has just replaced: the next turn
            // sleeps afresh.
            (Next::Tick, ..) => Vec::new(),
            (Next::Event(event, hops), Routing::Rules(rules), Some(state)) => {
                let mut ctx = context(&event, hops);
                ctx.timestamp_ms = ctx.timestamp_ms.max(advanced_to);
                let stateful = rules.is_stateful_topic(ctx.topic);
                let marked = if checkpointer.is_some()
                    && qos2_resend(&event, rules, state, &stage.metrics, &mut logs.qos2_marks)
                {
                    // Already in the state: the stateless rules alone see it again (their
                    // forwards are at least once, as for any resend).
                    rules.evaluate(&ctx).into_iter().map(|o| (o, None)).collect()
                } else {
                    rules.evaluate_windowed_marked(&ctx, state)
                };
                if let Some(ck) = checkpointer.as_mut() {
                    // An event a stateful rule may have taken in waits for the checkpoint
                    // (whether its WHERE kept it is not known here); one no stateful rule
                    // reads neither waits nor makes a checkpoint due.
                    if stateful {
                        ck.hold(event.ticket.clone());
                    }
                }
                if stateful {
                    // Evictions, late and ahead readings happen here: the metrics follow at
                    // once, not only when a checkpoint is taken (nor never, without one).
                    export_window_counters(&routing, state, &stage.metrics, &mut late_log, now);
                }
                let (own, closed): (Vec<Marked>, Vec<Marked>) =
                    marked.into_iter().partition(|(_, o)| o.is_none());
                let own = fates(
                    own.into_iter().map(|(o, _)| o).collect(),
                    &stage.topic_prefix,
                    &stage.topic_policy,
                );
                let own = not_back_upstream(&event, own);
                rule_stats.count(&stage.metrics, &own);
                let mut outbound = stage.carry_out(&event, own, stateful, &mut chain, &mut logs, now);
                let ticket = event.ticket.clone();
                let windows_out = stage.carry_out_windows(
                    closed,
                    ticket.as_ref().map(|t| (t, event.received_ms)),
                    checkpointer.as_mut(),
                    &mut chain,
                    &mut logs,
                    &mut rule_stats,
                );
                outbound.extend(windows_out);
                outbound
            }
            (Next::Event(event, hops), ..) => {
                let fates = if stage.tap.wants(TapStage::Rules) {
                    decide_tapped(
                        &routing,
                        &event,
                        hops,
                        &stage.topic_prefix,
                        &stage.topic_policy,
                        &stage.tap,
                    )
                } else {
                    decide(&routing, &event, hops, &stage.topic_prefix, &stage.topic_policy)
                };
                if matches!(*routing, Routing::Rules(_)) {
                    rule_stats.count(&stage.metrics, &fates);
                }
                stage.carry_out(&event, fates, false, &mut chain, &mut logs, now)
            }
        };
        if !send_all(&out, outbound, &heartbeat).await {
            return;
        }
    }
    info!(message = "router stopped");
}

/// How long stopping waits for the last window checkpoint.
const SHUTDOWN_CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// Checkpoints `state` now, whatever the interval, and returns once it (and anything before
/// it) has committed; at once when nothing changed since the last commit. A failing disk
/// keeps it retrying with the checkpointer's back-off: windows then stay open, and the
/// sensors whose readings they hold wait for their PUBACKs.
async fn commit_now(ck: &mut Checkpointer, rules: &RuleSet, state: &mut WindowState, held_at: &mut HeldAt) {
    if ck.idle() {
        return;
    }
    mark_held(ck.taken() + 1, state, held_at);
    ck.take(checkpoint_of(ck.wants(), rules, state));
    while !ck.idle() {
        if ck.wait().await == Step::Due {
            mark_held(ck.taken() + 1, state, held_at);
            ck.take(checkpoint_of(ck.wants(), rules, state));
        }
    }
}

/// With checkpoints, windows an event closes (a count window's last reading, a sliding
/// window's every reading, an evicted group, an event-time watermark moved by a reading)
/// are held in the state and sent only once a checkpoint holding them committed
/// ([`release_held`]): sent at the event, a crash before the checkpoint would restore their
/// readings into open windows, and the resent closing reading would close them again with
/// other bounds, so another id, and the upstream would count those readings twice.
fn hold_if_durable(state: Option<&mut WindowState>, ck: Option<&Checkpointer>) {
    if let (Some(state), Some(_)) = (state, ck) {
        state.hold_event_closings();
    }
}

/// Where held outputs stood at a checkpoint: the last one taken while windows an event
/// closed were held (and their marks), and while a reload's outputs were pending.
#[derive(Default)]
struct HeldAt {
    closings: Option<(u64, DueMarks)>,
    pending: Option<u64>,
}

/// Notes that checkpoint number `number` (about to be taken of `state`) holds the
/// closings held now, and the pending outputs of a reload. A later one replaces an earlier
/// one: it holds them too.
fn mark_held(number: u64, state: &WindowState, held_at: &mut HeldAt) {
    if state.has_due() {
        held_at.closings = Some((number, state.due_marks()));
    }
    if state.has_pending() {
        held_at.pending = Some(number);
    }
}

/// The outputs of the held closings a committed checkpoint holds ([`hold_if_durable`]), and
/// of the windows a reload closed ([`reload_windows`]) once a committed checkpoint holds
/// them. They are then no longer in the state: the next checkpoint waits until they are
/// safe (as for any window output), and a crash before it restores them held, to be sent
/// again with the same ids.
#[allow(clippy::too_many_arguments)]
fn release_held(
    stage: &mut RouteStage,
    routing: &Routing,
    state: Option<&mut WindowState>,
    mut ck: Option<&mut Checkpointer>,
    held_at: &mut HeldAt,
    chain: &mut VecDeque<(Event, u8)>,
    logs: &mut Logs,
    rule_stats: &mut RuleStats,
) -> Vec<Outbound> {
    let (Routing::Rules(rules), Some(state), Some(committed)) =
        (routing, state, ck.as_ref().map(|c| c.committed()))
    else {
        return Vec::new();
    };
    let mut released = Vec::new();
    if held_at.pending.is_some_and(|number| number <= committed) {
        held_at.pending = None;
        let pending = state.take_pending();
        if !pending.is_empty() {
            info!(
                message = "rules reloaded: the outputs of the windows the reload closed are in a committed checkpoint, and sent",
                outputs = pending.len()
            );
        }
        released.extend(pending);
    }
    if held_at.closings.as_ref().is_some_and(|(number, _)| *number <= committed)
        && let Some((_, marks)) = held_at.closings.take()
    {
        released.extend(rules.release_windows_marked(state, &marks));
    }
    if released.is_empty() {
        return Vec::new();
    }
    if let Some(ck) = ck.as_deref_mut() {
        ck.changed();
    }
    stage.carry_out_windows(released, None, ck, chain, logs, rule_stats)
}

/// The checkpoint of `state` the checkpointer asked for. Either kind resets the state's
/// record of changes: the next delta holds what changed after this one.
fn checkpoint_of(kind: Kind, rules: &RuleSet, state: &mut WindowState) -> LogWrite {
    match kind {
        Kind::Full => {
            let full = state.snapshot(rules);
            state.clear_changes();
            LogWrite::Full(full)
        }
        Kind::Delta => LogWrite::Delta(state.take_delta(rules)),
    }
}

/// The route stage's rate-limited warnings.
#[derive(Default)]
struct Logs {
    republish: LogThrottle,
    dead: LogThrottle,
    qos2_marks: LogThrottle,
}

/// For a QoS 2 reading a stateful rule reads (with checkpoints): whether it is a resend
/// (DUP) of one the state took in already, whose PUBREL has not come — its marker is in the
/// state, restored with it after a crash. If not, it is marked, in the state the next
/// checkpoint (which its PUBREC waits for) holds. A marked packet id without DUP is a new
/// reading (the client lost its session and reuses the id): marked afresh, counted.
fn qos2_resend(
    event: &Event,
    rules: &RuleSet,
    state: &mut WindowState,
    metrics: &Metrics,
    log: &mut LogThrottle,
) -> bool {
    let (Some(Qos2::Publish(packet_id)), Some(client)) = (event.qos2, event.client_id.as_ref()) else {
        return false;
    };
    if !rules.is_stateful_topic(&event.topic) {
        return false;
    }
    let counters = metrics.counters();
    if event.dup && state.qos2_marked(client, packet_id) {
        Metrics::add(&counters.qos2_duplicates, 1);
        return true;
    }
    if state.mark_qos2(client, packet_id) {
        Metrics::add(&counters.qos2_marks_dropped, 1);
        if let Some(folded) = log.ready(Instant::now()) {
            warn!(message = "too many QoS 2 readings await their PUBREL: the oldest marker was dropped, and that reading may be counted twice in its window if the gateway crashes before its PUBREL (see qos2_marks_dropped). Fewer QoS 2 sensors in flight into stateful rules, or sensors that complete their QoS 2 flows, avoid it", client_id = %client, similar_since_last_log = folded);
        }
    }
    false
}

/// A PUBREL ([`Qos2::Release`]): removes its reading's marker, and holds the PUBCOMP (the
/// event's ticket) until a checkpoint without the marker commits — or one already under way
/// does, when there was no marker (a PUBREL sent again after a reconnect: its removal may be
/// in that one). Without checkpoints, or with nothing to wait for, the PUBCOMP goes at once.
fn release_qos2(event: Event, state: Option<&mut WindowState>, checkpointer: Option<&mut Checkpointer>) {
    let (Some(Qos2::Release(packet_id)), Some(client), Some(ck)) =
        (event.qos2, event.client_id.as_ref(), checkpointer)
    else {
        return;
    };
    let removed = state.is_some_and(|state| state.release_qos2(client, packet_id));
    if removed || !ck.idle() {
        ck.hold(event.ticket);
    }
}

impl RouteStage {
    /// Does what `fates` say for `event`: counts, logs, republishes, hands dead letters to
    /// their store. Returns what goes to the relay, for the caller to send (the one wait).
    fn carry_out(
        &mut self,
        event: &Event,
        fates: Vec<Fate>,
        taken_in: bool,
        chain: &mut VecDeque<(Event, u8)>,
        logs: &mut Logs,
        now: Instant,
    ) -> Vec<Outbound> {
        // A client event is reported only for the rules that read it: whether they produce
        // anything is theirs to decide (`client_events` counts them apart). A reading a
        // stateful rule reads is not unrouted either: it went into the rule's state.
        if fates.is_empty() && event.lifecycle.is_none() && !taken_in {
            Metrics::add(&self.metrics.counters().unrouted, 1);
        }
        let mut forwards = Vec::new();
        for fate in fates {
            match fate {
                Fate::Forward { topic, payload, qos, priority, ttl, window_id, .. } => {
                    // Each upstream message needs its own id, or deduplication would drop
                    // legitimate outputs: the first keeps the event's; a window's output
                    // has its window's.
                    let event_id = match window_id {
                        Some(id) => id,
                        None if forwards.is_empty() => event.id,
                        None => self.ids.next_id(),
                    };
                    forwards.push(Outbound {
                        event_id,
                        topic,
                        payload,
                        qos,
                        priority,
                        expires_ms: expiry(event.received_ms, ttl),
                        received_ms: event.received_ms,
                        ticket: event.ticket.clone(),
                        props: event.message_props(),
                        dead_letter_if_refused: taken_in || window_id.is_some(),
                    });
                }
                Fate::Republish { rule, topic, payload, hops, .. } => {
                    if let Some(next) = self.republish(event, &rule, topic, payload, &mut logs.republish, now)
                    {
                        chain.push_back((next, hops));
                    }
                }
                Fate::Drop { .. } => Metrics::add(&self.metrics.counters().rules_dropped, 1),
                Fate::LoopPrevented { rule, topic, hops } => {
                    Metrics::add(&self.metrics.counters().loops_prevented, 1);
                    if let Some(folded) = logs.republish.ready(now) {
                        warn!(message = "republish refused: the event reached the hop limit (max_hops in the rules file); check the rules for a loop", %rule, %topic, hops, similar_since_last_log = folded);
                    }
                }
                Fate::DeadLetter { entries } => self.dead_letter(event, &entries, &mut logs.dead, now),
                Fate::NotBackUpstream { .. } => {
                    Metrics::add(&self.metrics.counters().inbound_not_forwarded, 1)
                }
            }
        }
        forwards
    }

    /// Carries out the outputs of closed windows, one window at a time: each window is a
    /// gateway-made event on `$windows/<rule>` (what its dead letter shows), received now
    /// (or, for windows an event closed, with that event's time and held acknowledgement,
    /// `from`), and its forwards carry the window's stable id.
    fn carry_out_windows(
        &mut self,
        marked: Vec<Marked>,
        from: Option<(&crate::ack::Ticket, u64)>,
        mut checkpointer: Option<&mut Checkpointer>,
        chain: &mut VecDeque<(Event, u8)>,
        logs: &mut Logs,
        rule_stats: &mut RuleStats,
    ) -> Vec<Outbound> {
        let mut forwards = Vec::new();
        let now = Instant::now();
        for (origin, outputs) in by_window(marked) {
            let payload = outputs.iter().find_map(|(o, _)| match o {
                Output::DeadLetter { payload, .. } => Some(Bytes::from(payload.clone())),
                _ => None,
            });
            let window_event = Event {
                // With checkpoints, the window's own ticket: the next checkpoint (which no
                // longer holds the window's readings) waits until its outputs are safe.
                ticket: match checkpointer.as_deref_mut() {
                    Some(ck) => Some(ck.output_ticket()),
                    None => from.map(|(t, _)| t.clone()),
                },
                ..Event::made(
                    self.ids.next_id(),
                    format!("$windows/{}", origin.rule),
                    payload.unwrap_or_default(),
                    from.map_or_else(|| self.clock.now_ms(), |(_, at)| at),
                )
            };
            let outputs = outputs.into_iter().map(|(o, origin)| (o, origin.map(|o| o.fingerprint())));
            let fates = fates_marked(outputs, &self.topic_prefix, &self.topic_policy);
            // Only rules have windows.
            rule_stats.count(&self.metrics, &fates);
            forwards.extend(self.carry_out(&window_event, fates, false, chain, logs, now));
        }
        forwards
    }

    /// Publishes into the local broker; returns the event the republish feeds back into this
    /// stage, or `None` (counted, logged) when the broker did not take it.
    fn republish(
        &mut self,
        event: &Event,
        rule: &str,
        topic: String,
        payload: Bytes,
        log: &mut LogThrottle,
        now: Instant,
    ) -> Option<Event> {
        let counters = self.metrics.counters();
        let sent = match self.republisher.as_mut() {
            Some(r) => r.try_publish(&topic, &payload),
            None => Err("no local broker link".to_owned()),
        };
        match sent {
            Ok(()) => {
                Metrics::add(&counters.republished, 1);
                Some(republished_event(event, self.ids.next_id(), topic, payload))
            }
            Err(reason) => {
                Metrics::add(&counters.republish_failed, 1);
                if let Some(folded) = log.ready(now) {
                    warn!(message = "republish into the local broker failed; the event is not republished", %rule, %topic, %reason, similar_since_last_log = folded);
                }
                None
            }
        }
    }

    /// Counts the event's one dead letter, warns (rate-limited) unless every rule sent it there
    /// on purpose, and hands the record to the dead-letter store without waiting.
    fn dead_letter(&self, event: &Event, entries: &[DeadEntry], log: &mut LogThrottle, now: Instant) {
        let counters = self.metrics.counters();
        Metrics::add(&counters.dead_letters, 1);
        // A deliberate dead letter is what its rule asked for: nothing to warn about.
        let failure = entries.iter().find(|e| e.cause != DeadCause::Deliberate);
        if let Some(entry) = failure {
            if let Some(folded) = log.ready(now) {
                let (rule, reason, rules) = (&entry.rule, &entry.reason, entries.len());
                if entry.cause == DeadCause::InvalidTopic {
                    warn!(message = "a rule produced an invalid upstream topic; the event went to the dead-letter store, fix the rule's topic template", %rule, %reason, topic = %event.topic, rules, similar_since_last_log = folded);
                } else {
                    warn!(message = "an event failed in a rule and went to the dead-letter store; see `outpost rules dead-letters`", %rule, %reason, topic = %event.topic, rules, similar_since_last_log = folded);
                }
            }
        }
        if self.dead_letters.try_send(dead_letter(event, entries)).is_err() {
            Metrics::add(&counters.dead_letters_unsaved, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_an_event_time_rule_drops_are_logged_once_per_rule_per_episode() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = LateLog::default();
        assert_eq!(log.observe("r", 5, at(0)), None, "counts carried over by a checkpoint are no news");
        assert_eq!(log.observe("r", 6, at(1)), Some(true), "the first drop starts an episode");
        assert_eq!(log.observe("r", 6, at(2)), None, "a look without news does not end it");
        assert_eq!(log.observe("r", 9, at(30)), None, "more drops in the same episode: quiet");
        assert_eq!(log.observe("s", 0, at(30)), None);
        assert_eq!(log.observe("s", 1, at(31)), Some(true), "each rule has its own episode");
        assert_eq!(log.observe("r", 9, at(89)), None, "not yet a quiet minute");
        assert_eq!(log.observe("r", 9, at(90)), Some(false), "a quiet minute ends it");
        assert_eq!(log.observe("r", 9, at(200)), None, "ended once");
        assert_eq!(log.observe("r", 10, at(201)), Some(true), "a new episode is logged again");
    }

    #[test]
    fn first_matching_route_sets_priority_and_ttl() {
        let routes = vec![
            RouteConfig {
                filter: TopicFilter::new("alerts/#").expect("f"),
                priority: 0,
                ttl: Some(Duration::from_secs(60)),
            },
            RouteConfig { filter: TopicFilter::new("sensors/+/temp").expect("f"), priority: 7, ttl: None },
        ];
        let b = Bridge::new(&routes);
        assert_eq!(b.route("alerts/fire"), Some((0, Some(Duration::from_secs(60)))));
        assert_eq!(b.route("sensors/x/temp"), Some((7, None)));
        assert_eq!(b.route("sensors/x/humidity"), None);
        assert_eq!(Bridge::new(&[]).route("anything/at/all"), Some((5, None)));
        assert_eq!(Bridge::new(&[]).route("$SYS/x"), None);
        assert_eq!(expiry(1_000, Some(Duration::from_secs(60))), Some(61_000));
    }

    fn event(topic: &str, payload: &str) -> Event {
        Event {
            qos: Some(1),
            client_id: Some("c1".into()),
            ..Event::made(7, topic.to_owned(), Bytes::copy_from_slice(payload.as_bytes()), 1_000)
        }
    }

    fn policy() -> TopicPolicy {
        crate::config::BrokerConfig::default().topic_policy()
    }

    fn rules(text: &str) -> Routing {
        Routing::Rules(RuleSet::compile(text, &outpost_rules::TableSources::new()).expect("rules compile"))
    }

    /// Three strict rules fail on one malformed payload; a fourth forwards, a fifth sends the
    /// event to the dead letters on purpose.
    const FAILING: &str = r#"
[[rule]]
name = "a"
payload = "json"
sql = 'SELECT payload.x AS x FROM "in/#"'
[[rule.action]]
type = "forward"
[[rule]]
name = "b"
payload = "json"
sql = 'SELECT payload.y AS y FROM "in/#"'
[[rule.action]]
type = "forward"
[[rule]]
name = "copy"
sql = 'SELECT topic(2) AS level FROM "in/#"'
[[rule.action]]
type = "forward"
topic = "copy/${level}"
ttl = "1m"
priority = 2
[[rule]]
name = "c"
payload = "json"
sql = 'SELECT payload.z AS z FROM "in/#"'
[[rule.action]]
type = "forward"
[[rule]]
name = "park"
sql = 'SELECT 1 AS one FROM "in/#"'
[[rule.action]]
type = "dead_letter"
reason = "parked"
"#;

    #[test]
    fn a_tapped_decision_is_the_same_and_shows_each_rules_verdict() {
        let routing = rules(FAILING);
        let bad = event("in/a", "{bad");
        let tap = Tap::new(Metrics::default());
        let mut viewer = tap.attach(TapStage::ALL, 64).expect("room");
        let tapped = decide_tapped(&routing, &bad, 0, "site/", &policy(), &tap);
        assert_eq!(tapped, decide(&routing, &bad, 0, "site/", &policy()));
        let mut seen = Vec::new();
        while let Ok(record) = viewer.records.try_recv() {
            assert_eq!(record.event_id, "0000000000000007");
            if let What::Rules { rule, result, outputs, error, .. } = record.what {
                seen.push((rule.unwrap_or_default(), result, outputs, error.is_some()));
            }
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
        let copy = ("copy".to_owned(), RuleResult::Matched, vec!["forward site/copy/a".to_owned()], false);
        assert!(seen.contains(&copy), "{seen:?}");
        let failed = ("a".to_owned(), RuleResult::Failed, vec!["dead_letter".to_owned()], true);
        assert!(seen.contains(&failed), "{seen:?}");
        let unrouted = decide_tapped(&routing, &event("elsewhere", "{}"), 0, "", &policy(), &tap);
        assert!(unrouted.is_empty());
        let record = viewer.records.try_recv().expect("the unrouted verdict");
        assert!(matches!(record.what, What::Rules { rule: None, result: RuleResult::Unrouted, .. }));
    }

    #[test]
    fn every_dead_letter_of_an_event_is_one_record() {
        let bad = event("in/a", "{bad");
        let fates = decide(&rules(FAILING), &bad, 0, "site/", &policy());
        let [Fate::DeadLetter { entries }, forward] = fates.as_slice() else { panic!("{fates:#?}") };
        assert_eq!(
            forward,
            &Fate::Forward {
                rule: Some("copy".into()),
                topic: "site/copy/a".into(),
                payload: Bytes::from_static(br#"{"level":"a"}"#),
                qos: 1,
                priority: 2,
                ttl: Some(Duration::from_secs(60)),
                window_id: None,
            }
        );
        let summary: Vec<(&str, DeadCause)> = entries.iter().map(|e| (&*e.rule, e.cause)).collect();
        let expected = [
            ("a", DeadCause::Failed),
            ("b", DeadCause::Failed),
            ("c", DeadCause::Failed),
            ("park", DeadCause::Deliberate),
        ];
        assert_eq!(summary, expected);
        assert!(entries.iter().take(3).all(|e| e.reason.contains("not valid JSON")), "{entries:?}");

        let record = dead_letter(&bad, entries);
        assert_eq!((record.rule.as_str(), record.topic.as_str()), ("a", "in/a"));
        assert_eq!((record.event_id, record.payload.as_slice()), (7, &b"{bad"[..]));
        let rules: Vec<(&str, &str, bool)> =
            record.rules.iter().map(|r| (r.rule.as_str(), r.reason.as_str(), r.deliberate)).collect();
        assert_eq!(rules[3], ("park", "parked", true));
        assert_eq!(rules.len(), 4);
    }

    #[test]
    fn forwards_republishes_drops_and_refusals_are_fates() {
        let routing = rules(
            r#"
max_hops = 1
[[rule]]
name = "r"
sql = 'SELECT payload AS p FROM "t/#"'
[[rule.action]]
type = "forward"
topic = "${p}"
[[rule.action]]
type = "republish"
topic = "t/again"
payload = "once more"
[[rule.action]]
type = "drop"
"#,
        );
        let republish = Fate::Republish {
            rule: "r".into(),
            topic: "t/again".into(),
            payload: Bytes::from_static(b"once more"),
            qos: 1,
            hops: 1,
        };
        let fates = decide(&routing, &event("t/x", "up/x"), 0, "", &policy());
        assert_eq!(fates.get(1..), Some(&[republish, Fate::Drop { rule: "r".into() }][..]));
        assert!(matches!(fates.first(), Some(Fate::Forward { topic, .. }) if topic == "up/x"), "{fates:?}");

        let fates = decide(&routing, &event("t/again", "up/x"), 1, "", &policy());
        let refused = Fate::LoopPrevented { rule: "r".into(), topic: "t/again".into(), hops: 1 };
        assert_eq!(fates.get(1), Some(&refused));

        // Only the prefix makes this topic too long: the gateway's own check refuses it.
        let long = "x".repeat(usize::from(u16::MAX));
        assert!(matches!(
            decide(&routing, &event("t/x", &long), 0, "", &policy()).first(),
            Some(Fate::Forward { .. })
        ));
        let fates = decide(&routing, &event("t/x", &long), 0, "site/", &policy());
        let Some(Fate::DeadLetter { entries }) = fates.first() else { panic!("{fates:?}") };
        assert_eq!(entries.first().map(|e| e.cause), Some(DeadCause::InvalidTopic));

        assert_eq!(decide(&routing, &event("other", ""), 0, "", &policy()), []);
        let bridge = Routing::Bridge(Bridge::new(&[]));
        let fates = decide(&bridge, &event("a/b", ""), 0, "p/", &policy());
        let [Fate::Forward { rule: None, topic, .. }] = fates.as_slice() else { panic!("{fates:?}") };
        assert_eq!(topic, "p/a/b");
    }

    /// A command from upstream, and what a rule republishes from it, is never forwarded:
    /// not by a bridge route `#`, not by a rule's forward.
    #[test]
    fn nothing_from_upstream_is_forwarded_back() {
        let mut command = event("cmd/valve", "open");
        command.from_upstream = true;
        let bridge = Routing::Bridge(Bridge::new(&[]));
        assert_eq!(
            decide(&bridge, &command, 0, "site/", &policy()),
            [Fate::NotBackUpstream { rule: None, topic: "site/cmd/valve".into() }]
        );
        let routing = rules(
            r##"
[[rule]]
name = "all"
sql = 'SELECT payload AS p FROM "#"'
[[rule.action]]
type = "forward"
[[rule.action]]
type = "republish"
topic = "devices/valve/set"
"##,
        );
        let fates = decide(&routing, &command, 0, "", &policy());
        assert!(
            matches!(&fates[0], Fate::NotBackUpstream { rule: Some(r), .. } if &**r == "all"),
            "{fates:?}"
        );
        assert!(
            matches!(&fates[1], Fate::Republish { topic, .. } if topic == "devices/valve/set"),
            "{fates:?}"
        );
        let child = republished_event(&command, 9, "devices/valve/set".into(), Bytes::new());
        assert!(child.from_upstream, "a republished command stays a command");
        assert!(matches!(decide(&routing, &child, 1, "", &policy())[0], Fate::NotBackUpstream { .. }));
        // The same from a sensor is forwarded.
        assert!(matches!(
            decide(&bridge, &event("cmd/valve", ""), 0, "", &policy())[0],
            Fate::Forward { .. }
        ));
    }

    #[test]
    fn a_dry_run_follows_republish_chains_in_the_stages_order_and_cuts_a_growing_one() {
        let routing = rules(
            r#"
max_hops = 8
[[rule]]
name = "twice"
sql = 'SELECT payload AS p FROM "t/#"'
[[rule.action]]
type = "republish"
topic = "t/a"
[[rule.action]]
type = "republish"
topic = "t/b"
"#,
        );
        let ids = IdGen::new(1);
        let policy = policy();
        let dry =
            |max_events| Dry { routing: &routing, ids: &ids, topic_prefix: "", policy: &policy, max_events };
        let run = dry(7).run(event("t/x", "1"), None);
        let shown: Vec<(&str, u8, Option<&str>)> =
            run.steps.iter().map(|s| (s.event.topic.as_str(), s.hops, s.via.as_deref())).collect();
        assert_eq!(
            shown,
            [
                ("t/x", 0, None),
                ("t/a", 1, Some("twice")),
                ("t/b", 1, Some("twice")),
                ("t/a", 2, Some("twice")),
                ("t/b", 2, Some("twice")),
                ("t/a", 2, Some("twice")),
                ("t/b", 2, Some("twice")),
            ]
        );
        // Each of the four hop-2 events shown queued two more.
        assert_eq!(run.waiting, 8);

        let whole = dry(1000).run(event("t/x", "1"), None);
        assert_eq!((whole.steps.len(), whole.waiting), ((1 << 9) - 1, 0), "hop limit 8 ends every chain");
    }

    #[test]
    fn a_dry_run_closes_windows_at_the_events_times_and_names_the_stateful_rules() {
        let routing = rules(
            r#"
[[rule]]
name = "avg"
sql = '''
SELECT topic(2) AS device, avg(payload.t) AS t, count(*) AS n
FROM "s/+/t"
GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)
'''
[[rule.action]]
type = "forward"
topic = "avg/${device}"
[[rule.action]]
type = "republish"
topic = "local/avg/${device}"

[[rule]]
name = "all"
sql = 'SELECT * FROM "local/#"'
[[rule.action]]
type = "forward"
topic = "seen"
"#,
        );
        let (ids, mut state) = (IdGen::new(1), DryState::new(&routing).expect("stateful rules"));
        let at = |ms, t: &str| Event { received_ms: ms, ..event("s/d1/t", &format!("{{\"t\":{t}}}")) };
        let policy = policy();
        let dry = Dry { routing: &routing, ids: &ids, topic_prefix: "", policy: &policy, max_events: 100 };
        let mut run = |e: Event| dry.run(e, Some(&mut state));
        let first = run(at(1_000, "20"));
        assert_eq!(first.steps.len(), 1);
        assert_eq!(first.steps[0].stateful, ["avg"]);
        assert!(first.steps[0].fates.is_empty(), "the window holds it: {:?}", first.steps[0].fates);
        assert!(run(at(9_999, "22")).steps[0].fates.is_empty());
        // The next window's event closes [0, 10 s) first: its forward, its republish, and the
        // republished event through the stateless rule.
        let third = run(at(10_000, "30"));
        let shown: Vec<(&str, Option<(u64, u64)>)> = third
            .steps
            .iter()
            .map(|s| (s.event.topic.as_str(), s.window.as_ref().map(|w| (w.start_ms, w.end_ms))))
            .collect();
        assert_eq!(shown, [("$windows/avg", Some((0, 10_000))), ("s/d1/t", None), ("local/avg/d1", None)]);
        let window = &third.steps[0];
        assert_eq!(window.window.as_ref().map(|w| w.key.as_str()), Some(r#"["d1"]"#), "the group's keys");
        let forwarded: Vec<String> = window
            .fates
            .iter()
            .filter_map(|f| match f {
                Fate::Forward { topic, payload, window_id, .. } => {
                    assert!(window_id.is_some(), "a window's forward carries its id");
                    Some(format!("{topic} {}", String::from_utf8_lossy(payload)))
                }
                _ => None,
            })
            .collect();
        assert_eq!(forwarded, [r#"avg/d1 {"device":"d1","t":21.0,"n":2}"#]);
        assert!(matches!(third.steps[2].fates.as_slice(), [Fate::Forward { topic, .. }] if topic == "seen"));

        // The end of the replay: the open window closes with what it holds.
        let end = dry.close_all(&mut state, 12_000);
        let last: Vec<(&str, Option<(u64, u64)>)> = end
            .steps
            .iter()
            .map(|s| (s.event.topic.as_str(), s.window.as_ref().map(|w| (w.start_ms, w.end_ms))))
            .collect();
        assert_eq!(last, [("$windows/avg", Some((10_000, 20_000))), ("local/avg/d1", None)]);
    }

    #[tokio::test]
    async fn the_stage_writes_one_dead_letter_record_per_event() {
        let (routing_tx, routing_rx) = watch::channel(Arc::new(rules(FAILING)));
        let (dead_tx, mut dead_rx) = mpsc::channel(8);
        let (in_tx, in_rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let metrics = Metrics::default();
        let stage = RouteStage {
            routing: routing_rx,
            topic_prefix: String::new(),
            topic_policy: policy(),
            republisher: None,
            dead_letters: dead_tx,
            ids: IdGen::new(1),
            metrics: metrics.clone(),
            heartbeat: Heartbeat::unwatched(),
            tap: crate::tap::Tap::new(metrics.clone()),
            clock: Clock::System,
            durable: None,
        };
        let route = tokio::spawn(run(stage, in_rx, out_tx));
        in_tx.send(event("in/a", "{bad")).await.expect("send");
        drop(in_tx);
        let forwarded = out_rx.recv().await.expect("the copy");
        assert_eq!((forwarded.topic.as_str(), forwarded.event_id), ("copy/a", 7));
        route.await.expect("route stage");
        drop(routing_tx);
        let record = dead_rx.recv().await.expect("one record");
        assert_eq!(record.rules.len(), 4);
        assert!(dead_rx.recv().await.is_none(), "no second record");
        assert_eq!(Metrics::get(&metrics.counters().dead_letters), 1);
        let rules = metrics.rules().snapshot();
        let of = |name: &str| rules.iter().find(|r| r.0 == name).map(|r| (r.1, r.2, r.3));
        assert_eq!((of("a"), of("b"), of("c")), (Some((0, 0, 1)), Some((0, 0, 1)), Some((0, 0, 1))));
        assert_eq!(of("copy"), Some((1, 1, 0)), "{rules:?}");
    }

    /// A 10 s tumbling average per sensor, and a plain copy of every reading.
    const WINDOWED: &str = r#"
[[rule]]
name = "avg"
sql = 'SELECT topic(2) AS sensor, avg(payload.v) AS v, count(*) AS n, window_end() AS until FROM "s/+" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)'
[[rule.action]]
type = "forward"
topic = "avg/${sensor}"
priority = 3
ttl = "1h"
[[rule]]
name = "copy"
sql = 'SELECT payload.v AS v FROM "s/+"'
[[rule.action]]
type = "forward"
topic = "raw"
"#;

    struct Running {
        routing: watch::Sender<Arc<Routing>>,
        input: mpsc::Sender<Event>,
        out: mpsc::Receiver<Outbound>,
        stage: tokio::task::JoinHandle<()>,
        metrics: Metrics,
    }

    /// The stage with its clock at `base_ms`, moving with tokio's (paused) clock.
    fn start(text: &str, base_ms: u64) -> Running {
        let (routing, routing_rx) = watch::channel(Arc::new(rules(text)));
        let (dead_tx, _dead_rx) = mpsc::channel(8);
        let (input, in_rx) = mpsc::channel(64);
        let (out_tx, out) = mpsc::channel(64);
        let metrics = Metrics::default();
        let stage = RouteStage {
            routing: routing_rx,
            topic_prefix: String::new(),
            topic_policy: policy(),
            republisher: None,
            dead_letters: dead_tx,
            ids: IdGen::new(1),
            metrics: metrics.clone(),
            heartbeat: Heartbeat::unwatched(),
            tap: crate::tap::Tap::new(metrics.clone()),
            clock: Clock::tokio_at(base_ms),
            durable: None,
        };
        Running { routing, input, out, stage: tokio::spawn(run(stage, in_rx, out_tx)), metrics }
    }

    fn reading(sensor: &str, v: f64, at_ms: u64) -> Event {
        let mut e = event(&format!("s/{sensor}"), &format!("{{\"v\":{v}}}"));
        e.received_ms = at_ms;
        e
    }

    fn shown(o: &Outbound) -> String {
        format!("{} {}", o.topic, String::from_utf8_lossy(&o.payload))
    }

    /// The id a window's output travels with, computed here from its parts.
    fn window_id(rule: &str, key: &str, start_ms: u64, end_ms: u64) -> u64 {
        WindowOrigin { rule: rule.into(), key: key.into(), start_ms, end_ms, index: 0, seq: None }
            .fingerprint()
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_closes_on_the_timer_with_its_stable_id_priority_and_ttl() {
        let mut stage = start(WINDOWED, 1_000_000);
        for (sensor, v, at) in [("a", 1.0, 1_000_100), ("b", 10.0, 1_000_200), ("a", 2.0, 1_009_999)] {
            stage.input.send(reading(sensor, v, at)).await.expect("send");
            let copy = stage.out.recv().await.expect("the plain copy");
            assert_eq!((copy.topic.as_str(), copy.event_id), ("raw", 7), "a stateless rule as before");
        }
        // Nothing is due before :10 on the stage's clock.
        tokio::time::sleep(Duration::from_millis(9_990)).await;
        assert!(stage.out.try_recv().is_err(), "no output before the window ends");
        let first = stage.out.recv().await.expect("a window output");
        let second = stage.out.recv().await.expect("a window output");
        assert_eq!(shown(&first), r#"avg/a {"sensor":"a","v":1.5,"n":2,"until":1010000}"#);
        assert_eq!(shown(&second), r#"avg/b {"sensor":"b","v":10.0,"n":1,"until":1010000}"#);
        assert_eq!(first.event_id, window_id("avg", r#"["a"]"#, 1_000_000, 1_010_000));
        assert_eq!(second.event_id, window_id("avg", r#"["b"]"#, 1_000_000, 1_010_000));
        assert_eq!(first.priority, 3);
        assert_eq!(first.received_ms, 1_010_000, "made when the clock closed it");
        assert_eq!(first.expires_ms, Some(1_010_000 + 3_600_000));
        assert!(first.ticket.is_none());
        // The stage stops when its input closes, with nothing open and so nothing to flush.
        drop(stage.input);
        stage.stage.await.expect("stage");
        assert!(stage.out.recv().await.is_none());
    }

    /// What the relay must not refuse to a sensor under a full buffer is marked: a window's
    /// output (nobody resends it) and any copy of a reading a stateful rule took in (its
    /// resend would count again); a copy of a reading no stateful rule reads is not.
    #[tokio::test(start_paused = true)]
    async fn copies_no_sensor_would_resend_are_marked_for_the_dead_letters() {
        let text = format!(
            "{WINDOWED}[[rule]]\nname = \"other\"\nsql = 'SELECT * FROM \"x/+\"'\n[[rule.action]]\ntype = \"forward\"\n"
        );
        let mut stage = start(&text, 1_000_000);
        stage.input.send(reading("a", 1.0, 1_000_100)).await.expect("send");
        let copy = stage.out.recv().await.expect("the plain copy");
        assert_eq!(
            (copy.topic.as_str(), copy.dead_letter_if_refused),
            ("raw", true),
            "the window took it in"
        );
        stage.input.send(event("x/a", "{}")).await.expect("send");
        let other = stage.out.recv().await.expect("the other rule's copy");
        assert_eq!(
            (other.topic.as_str(), other.dead_letter_if_refused),
            ("x/a", false),
            "its sensor resends it"
        );
        tokio::time::sleep(Duration::from_millis(10_000)).await;
        let window = stage.out.recv().await.expect("a window output");
        assert_eq!((window.topic.as_str(), window.dead_letter_if_refused), ("avg/a", true));
        drop(stage.input);
        stage.stage.await.expect("stage");
    }

    /// The late, ahead and eviction counters are in the metrics as soon as the reading that
    /// moved them was taken, not only once a checkpoint is taken (this stage takes none).
    #[tokio::test(start_paused = true)]
    async fn window_counters_reach_the_metrics_with_the_reading_that_moved_them() {
        let text = r#"
[[rule]]
name = "by_time"
sql = 'SELECT topic(2) AS sensor, count(*) AS n FROM "s/+" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)'
event_time = "payload.ts"
max_groups = 1
[[rule.action]]
type = "forward"
topic = "n/${sensor}"
[[rule]]
name = "copy"
sql = 'SELECT payload.ts AS ts FROM "s/+"'
[[rule.action]]
type = "forward"
topic = "raw"
"#;
        let mut stage = start(text, 30_000);
        // What `/metrics` and the status page read (the route stage sits below `http`).
        let scrape = |metrics: &Metrics| {
            let counters = metrics.counters().snapshot();
            ["window_late", "window_groups_evicted"]
                .map(|name| counters.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("a counter"))
        };
        // `a` opens a window; `b` evicts it (one group at most); `a` again, stamped in the
        // window already closed, is late.
        for (sensor, ts, expected) in [("a", 25_000, [0, 0]), ("b", 26_000, [0, 1]), ("a", 5_000, [1, 1])] {
            let mut e = event(&format!("s/{sensor}"), &format!("{{\"ts\":{ts}}}"));
            e.received_ms = 30_000;
            stage.input.send(e).await.expect("send");
            // The plain copy comes once the windowed rule has taken the reading (an evicted
            // window's output may come before it).
            while stage.out.recv().await.expect("the plain copy").topic != "raw" {}
            assert_eq!(scrape(&stage.metrics), expected, "after {sensor} at {ts}");
        }
        drop(stage.input);
        stage.stage.await.expect("stage");
    }

    /// A reading a window takes in has gone somewhere: only one no rule reads is unrouted.
    #[tokio::test(start_paused = true)]
    async fn a_reading_a_window_takes_in_is_not_unrouted() {
        let only_window = WINDOWED.split("[[rule]]\nname = \"copy\"").next().expect("the avg rule");
        let mut stage = start(only_window, 1_000_000);
        stage.input.send(reading("a", 1.0, 1_000_100)).await.expect("send");
        stage.input.send(reading("b", 2.0, 1_000_200)).await.expect("send");
        stage.input.send(event("elsewhere/1", "{}")).await.expect("send");
        drop(stage.input);
        stage.stage.await.expect("stage");
        let flushed = [stage.out.recv().await, stage.out.recv().await];
        assert!(flushed.iter().all(Option::is_some), "stopping flushed both windows");
        assert_eq!(Metrics::get(&stage.metrics.counters().unrouted), 1, "only the reading no rule reads");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_closes_open_windows_early_and_sends_them() {
        let mut stage = start(WINDOWED, 2_000_000);
        stage.input.send(reading("a", 4.0, 2_000_500)).await.expect("send");
        assert_eq!(stage.out.recv().await.expect("copy").topic, "raw");
        drop(stage.input);
        let flushed = stage.out.recv().await.expect("the flushed window");
        assert_eq!(shown(&flushed), r#"avg/a {"sensor":"a","v":4.0,"n":1,"until":2010000}"#);
        assert_eq!(flushed.event_id, window_id("avg", r#"["a"]"#, 2_000_000, 2_010_000));
        stage.stage.await.expect("stage");
        assert!(stage.out.recv().await.is_none());
    }

    /// A reload keeps the open windows of a rule whose window and aggregates are unchanged
    /// (its new actions apply), and closes and sends those of a changed rule at once.
    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_unchanged_windows_and_flushes_changed_ones() {
        let two = format!(
            "{WINDOWED}[[rule]]\nname = \"peak\"\nsql = 'SELECT topic(2) AS sensor, max(payload.v) AS v FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"peak/${{sensor}}\"\n"
        );
        let mut stage = start(&two, 3_000_000);
        stage.input.send(reading("a", 5.0, 3_000_100)).await.expect("send");
        assert_eq!(stage.out.recv().await.expect("copy").topic, "raw");
        // `avg` keeps its plan with a new topic; `peak` becomes a 20 s window.
        let reloaded = two.replace("avg/${sensor}", "mean/${sensor}").replace(
            "max(payload.v) AS v FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 10)",
            "max(payload.v) AS v FROM \"s/+\" GROUP BY topic(2), TUMBLINGWINDOW(ss, 20)",
        );
        stage.routing.send_replace(Arc::new(rules(&reloaded)));
        stage.input.send(reading("a", 7.0, 3_000_200)).await.expect("send");
        let peak = stage.out.recv().await.expect("peak's window, closed by the reload");
        assert_eq!(shown(&peak), r#"peak/a {"sensor":"a","v":5}"#);
        assert_eq!(peak.event_id, window_id("peak", r#"["a"]"#, 3_000_000, 3_010_000));
        assert_eq!(stage.out.recv().await.expect("copy").topic, "raw");
        let mean = stage.out.recv().await.expect("avg's window at :10");
        assert_eq!(shown(&mean), r#"mean/a {"sensor":"a","v":6.0,"n":2,"until":3010000}"#);
        let peak = stage.out.recv().await.expect("peak's new window at :20");
        assert_eq!(shown(&peak), r#"peak/a {"sensor":"a","v":7}"#);
        drop(stage.input);
        stage.stage.await.expect("stage");
    }

    /// A reading received just before a window's end but taken in after the stage closed that
    /// window (it waited in the queue) counts in the window open now: it is acknowledged, so
    /// it must be in some window, never late.
    #[tokio::test(start_paused = true)]
    async fn a_reading_queued_across_a_windows_end_counts_in_the_next_window() {
        let mut stage = start(WINDOWED, 5_000_000);
        stage.input.send(reading("a", 1.0, 5_000_100)).await.expect("send");
        assert_eq!(stage.out.recv().await.expect("copy").topic, "raw");
        tokio::time::sleep(Duration::from_millis(10_000)).await;
        let first = stage.out.recv().await.expect("the first window");
        assert_eq!(shown(&first), r#"avg/a {"sensor":"a","v":1.0,"n":1,"until":5010000}"#);
        stage.input.send(reading("a", 3.0, 5_009_999)).await.expect("send");
        assert_eq!(stage.out.recv().await.expect("copy").topic, "raw");
        // Paused time runs on to the deadline when nothing else is due: a reading lost as
        // late leaves no window to wait for, and this fails instead of hanging.
        let second = tokio::time::timeout(Duration::from_secs(60), stage.out.recv())
            .await
            .expect("the reading is in the next window, not late")
            .expect("the next window");
        assert_eq!(shown(&second), r#"avg/a {"sensor":"a","v":3.0,"n":1,"until":5020000}"#);
        drop(stage.input);
        stage.stage.await.expect("stage");
    }

    /// A route stage with a durable checkpoint whose store the test answers by hand.
    struct DurableStage {
        routing: watch::Sender<Arc<Routing>>,
        input: mpsc::Sender<Event>,
        out: mpsc::Receiver<Outbound>,
        store: mpsc::Receiver<crate::buffer::worker::Command>,
        stage: tokio::task::JoinHandle<()>,
        metrics: Metrics,
    }

    /// Starts a stage on `text` at `now_ms` (paused clock) and commits its first checkpoint,
    /// the empty state at start.
    async fn start_durable(text: &str, now_ms: u64) -> DurableStage {
        let mut stage = spawn_durable(text, now_ms, WindowLoad::Empty);
        tokio::time::sleep(Duration::from_millis(1)).await;
        next_checkpoint(&mut stage.store).expect("the first checkpoint").send(Ok(())).expect("reply");
        stage
    }

    /// Starts a stage on `text` at `now_ms` (paused clock) from the checkpoint log `restored`.
    fn spawn_durable(text: &str, now_ms: u64, restored: WindowLoad) -> DurableStage {
        let (routing, routing_rx) = watch::channel(Arc::new(rules(text)));
        let (dead_tx, _dead_rx) = mpsc::channel(8);
        let (input, in_rx) = mpsc::channel(64);
        let (out_tx, out) = mpsc::channel(64);
        let (commands, store) = mpsc::channel(8);
        let metrics = Metrics::default();
        let stage = RouteStage {
            routing: routing_rx,
            topic_prefix: String::new(),
            topic_policy: policy(),
            republisher: None,
            dead_letters: dead_tx,
            ids: IdGen::new(1),
            metrics: metrics.clone(),
            heartbeat: Heartbeat::unwatched(),
            tap: crate::tap::Tap::new(metrics.clone()),
            clock: Clock::tokio_at(now_ms),
            durable: Some(Durable { commands, interval: Duration::from_millis(25), restored }),
        };
        let stage = tokio::spawn(run(stage, in_rx, out_tx));
        DurableStage { routing, input, out, store, stage, metrics }
    }

    /// The store thread's side with a real buffer file: commits the checkpoint the stage has
    /// asked for, if it has, into `file`, and returns what it wrote.
    fn commit_into(
        store: &mut mpsc::Receiver<crate::buffer::worker::Command>,
        file: &mut crate::buffer::Store,
    ) -> Option<Vec<LogWrite>> {
        match store.try_recv() {
            Ok(crate::buffer::worker::Command::Checkpoint { writes, reply }) => {
                file.save_windows(&writes).expect("save");
                reply.send(Ok(())).expect("reply");
                Some(writes)
            }
            _ => None,
        }
    }

    /// The reply of the checkpoint the stage has asked for, if it has.
    fn next_checkpoint(
        store: &mut mpsc::Receiver<crate::buffer::worker::Command>,
    ) -> Option<tokio::sync::oneshot::Sender<Result<(), String>>> {
        match store.try_recv() {
            Ok(crate::buffer::worker::Command::Checkpoint { reply, .. }) => Some(reply),
            _ => None,
        }
    }

    /// The last checkpoint fails as the stage stops: the stage takes a full one at once and
    /// stops when it commits (it used to spin until the 10 s bound and stop without it).
    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_failing_at_stop_is_taken_again_in_full() {
        use crate::buffer::worker::Command;
        let mut stage = start_durable(WINDOWED, 1_000_000).await;
        stage.input.send(reading("a", 1.0, 1_000_100)).await.expect("send");
        stage.out.recv().await.expect("the plain copy");
        drop(stage.input);
        let Some(Command::Checkpoint { writes, reply }) = stage.store.recv().await else {
            panic!("a checkpoint")
        };
        assert!(matches!(writes.as_slice(), [LogWrite::Delta(_)]), "the last checkpoint is a delta");
        reply.send(Err("disk full".to_owned())).expect("reply");
        let Some(Command::Checkpoint { writes, reply }) = stage.store.recv().await else { panic!("a retry") };
        assert!(matches!(writes.as_slice(), [LogWrite::Full(_)]), "its delta is lost: a full one");
        reply.send(Ok(())).expect("reply");
        stage.stage.await.expect("the stage stops once it committed");
        assert!(stage.store.try_recv().is_err(), "nothing more");
    }

    /// Ends the input and commits checkpoints (the last one, at stopping) until the stage ends.
    async fn stop_durable(
        input: mpsc::Sender<Event>,
        mut store: mpsc::Receiver<crate::buffer::worker::Command>,
        stage: tokio::task::JoinHandle<()>,
    ) {
        drop(input);
        let last = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { reply, .. }) = store.recv().await {
                let _ = reply.send(Ok(()));
            }
        });
        stage.await.expect("stage");
        last.abort();
    }

    /// A window closes only once the state holding its readings has committed: after a crash
    /// it is restored with exactly the readings it was sent with, so it is sent again with
    /// the same id and the same content.
    #[tokio::test(start_paused = true)]
    async fn a_window_closes_only_after_a_checkpoint_holding_its_readings_commits() {
        let DurableStage { routing: routing_tx, input, mut out, mut store, stage, .. } =
            start_durable(WINDOWED, 6_009_000).await;
        let sensor = crate::ack::AckQueue::new();
        let mut e = reading("a", 2.0, 6_009_990);
        e.ticket = Some(sensor.ticket());
        tokio::time::sleep(Duration::from_millis(989)).await;
        input.send(e).await.expect("send");
        assert_eq!(out.recv().await.expect("copy").topic, "raw");
        // Its checkpoint is written, and the disk is slow: not committed by the window's end.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let held = next_checkpoint(&mut store).expect("the reading's checkpoint");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(out.try_recv().is_err(), "no window output before its readings are committed");
        held.send(Ok(())).expect("reply");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(out.try_recv().is_err(), "nor after, before the window's own checkpoint commits");
        next_checkpoint(&mut store).expect("the checkpoint before the close").send(Ok(())).expect("reply");
        let window = out.recv().await.expect("the window");
        assert_eq!(shown(&window), r#"avg/a {"sensor":"a","v":2.0,"n":1,"until":6010000}"#);
        let mut acked = Vec::new();
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 1, "the reading was acknowledged by its commit");
        drop(routing_tx);
        stop_durable(input, store, stage).await;
    }

    /// A crash after checkpoints of a full snapshot and deltas: the next start restores the
    /// last full row with the deltas after it, and the windows close with every reading the
    /// checkpoints held, as if the gateway had not stopped.
    #[tokio::test(start_paused = true)]
    async fn a_restart_from_the_checkpoint_log_closes_the_same_windows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let DurableStage { routing: _routing, input, mut out, mut store, stage, .. } =
            spawn_durable(WINDOWED, 7_000_000, WindowLoad::Empty);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut written = commit_into(&mut store, &mut file).expect("the first checkpoint");
        // Readings of `d` go on until the last checkpoint is a delta: where the log compacts
        // depends on the encoded sizes, and the point here is a base with deltas after it.
        let fixed = [("a", 1.0), ("b", 5.0), ("a", 3.0), ("c", 7.0)];
        let mut of_d = 0;
        for i in 0.. {
            let (sensor, v) = fixed.get(i).copied().unwrap_or(("d", 9.0));
            if i >= fixed.len() {
                if matches!(written.last(), Some(LogWrite::Delta(_))) {
                    break;
                }
                assert!(of_d < 8, "the log never ends with a delta: {written:?}");
                of_d += 1;
            }
            input.send(reading(sensor, v, 7_000_000)).await.expect("send");
            drop(out.recv().await.expect("the plain copy"));
            tokio::time::sleep(Duration::from_millis(30)).await;
            written.extend(commit_into(&mut store, &mut file).expect("the reading's checkpoint"));
        }
        assert!(
            matches!(written.first(), Some(LogWrite::Full(_))),
            "the first in a run is full: {written:?}"
        );
        // A SIGKILL: no last checkpoint.
        stage.abort();
        let _ = stage.await;
        drop(file);
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("reopen");
        let restored = file.load_windows().expect("load");
        let WindowLoad::Log { deltas, .. } = &restored else { panic!("a log: {restored:?}") };
        assert!(!deltas.is_empty(), "the readings after the base are in deltas: {written:?}");
        let DurableStage { routing: _routing, input, mut out, mut store, stage, .. } =
            spawn_durable(WINDOWED, 7_000_200, restored);
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { writes, reply }) = store.recv().await
            {
                file.save_windows(&writes).expect("save");
                let _ = reply.send(Ok(()));
            }
        });
        let mut expected = vec![
            r#"avg/a {"sensor":"a","v":2.0,"n":2,"until":7010000}"#.to_owned(),
            r#"avg/b {"sensor":"b","v":5.0,"n":1,"until":7010000}"#.to_owned(),
            r#"avg/c {"sensor":"c","v":7.0,"n":1,"until":7010000}"#.to_owned(),
        ];
        if of_d > 0 {
            expected.push(format!(r#"avg/d {{"sensor":"d","v":9.0,"n":{of_d},"until":7010000}}"#));
        }
        let mut windows: Vec<String> = Vec::new();
        for _ in 0..expected.len() {
            let window = tokio::time::timeout(Duration::from_secs(20), out.recv()).await;
            windows.push(shown(&window.expect("the restored windows close at their end").expect("a window")));
        }
        windows.sort();
        assert_eq!(windows, expected);
        drop(input);
        stage.await.expect("stage");
        answer.await.expect("answers");
    }

    /// A log that cannot make a state (deltas without a base) is counted and logged, the
    /// rules start empty and still work, and the first checkpoint replaces the log in full.
    #[tokio::test(start_paused = true)]
    async fn an_unusable_checkpoint_log_starts_empty_and_is_replaced() {
        let unusable = WindowLoad::Unusable("2 deltas but no full snapshot".into());
        let DurableStage { input, mut out, mut store, stage, metrics, .. } =
            spawn_durable(WINDOWED, 9_000_000, unusable);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (writes, reply) = next_writes(&mut store);
        assert!(matches!(writes[..], [LogWrite::Full(_)]), "{writes:?}");
        reply.send(Ok(())).expect("reply");
        assert_eq!(Metrics::get(&metrics.counters().window_state_dropped), 1);
        input.send(reading("a", 4.0, 9_000_002)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { reply, .. }) = store.recv().await {
                let _ = reply.send(Ok(()));
            }
        });
        let window =
            tokio::time::timeout(Duration::from_secs(20), out.recv()).await.expect("closes").expect("window");
        assert_eq!(shown(&window), r#"avg/a {"sensor":"a","v":4.0,"n":1,"until":9010000}"#);
        drop(input);
        stage.await.expect("stage");
        answer.await.expect("answers");
    }

    /// A delta whose write failed is lost: the next checkpoint is full and holds its
    /// readings, and a restart from the file counts each reading once.
    #[tokio::test(start_paused = true)]
    async fn after_a_failed_delta_the_full_checkpoint_holds_its_readings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let DurableStage { input, mut out, mut store, stage, .. } =
            spawn_durable(WINDOWED, 7_000_000, WindowLoad::Empty);
        tokio::time::sleep(Duration::from_millis(1)).await;
        commit_into(&mut store, &mut file).expect("the first checkpoint");
        input.send(reading("a", 1.0, 7_000_001)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (writes, reply) = next_writes(&mut store);
        assert!(matches!(writes[..], [LogWrite::Delta(_)]), "{writes:?}");
        reply.send(Err("disk full".into())).expect("reply");
        input.send(reading("b", 5.0, 7_000_040)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        // The back-off after a failure is longer than the interval.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let written = commit_into(&mut store, &mut file).expect("the next checkpoint");
        assert!(matches!(written[..], [LogWrite::Full(_)]), "full after a failure: {written:?}");
        stage.abort();
        let _ = stage.await;
        drop(file);
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("reopen");
        let restored = file.load_windows().expect("load");
        let DurableStage { input, mut out, mut store, stage, .. } =
            spawn_durable(WINDOWED, 7_000_200, restored);
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { writes, reply }) = store.recv().await
            {
                file.save_windows(&writes).expect("save");
                let _ = reply.send(Ok(()));
            }
        });
        let mut windows: Vec<String> = Vec::new();
        for _ in 0..2 {
            let window = tokio::time::timeout(Duration::from_secs(20), out.recv()).await;
            windows.push(shown(&window.expect("the restored windows close").expect("a window")));
        }
        windows.sort();
        assert_eq!(
            windows,
            [
                r#"avg/a {"sensor":"a","v":1.0,"n":1,"until":7010000}"#,
                r#"avg/b {"sensor":"b","v":5.0,"n":1,"until":7010000}"#,
            ]
        );
        drop(input);
        stage.await.expect("stage");
        answer.await.expect("answers");
    }

    /// A count window of two per sensor, and a plain copy of every reading.
    const COUNTED: &str = r#"
[[rule]]
name = "pairs"
sql = 'SELECT topic(2) AS sensor, sum(payload.v) AS v, count(*) AS n FROM "s/+" GROUP BY topic(2), COUNTWINDOW(2)'
[[rule.action]]
type = "forward"
topic = "pairs/${sensor}"
[[rule]]
name = "copy"
sql = 'SELECT payload.v AS v FROM "s/+"'
[[rule.action]]
type = "forward"
topic = "raw"
"#;

    /// A window an event closes is sent only once a checkpoint holding it committed; a crash
    /// after that commit, before the output is safe upstream, restarts with the window held
    /// still, and it is sent again with the same id and content (no second window of the
    /// same readings with other bounds).
    #[tokio::test(start_paused = true)]
    async fn a_window_an_event_closes_is_sent_after_its_checkpoint_and_again_the_same_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let DurableStage { routing: _routing, input, mut out, mut store, stage, .. } =
            spawn_durable(COUNTED, 9_000_000, WindowLoad::Empty);
        tokio::time::sleep(Duration::from_millis(1)).await;
        commit_into(&mut store, &mut file).expect("the first checkpoint");
        input.send(reading("a", 1.0, 9_000_010)).await.expect("send");
        assert_eq!(out.recv().await.expect("copy").topic, "raw");
        tokio::time::sleep(Duration::from_millis(30)).await;
        commit_into(&mut store, &mut file).expect("the first reading's checkpoint");
        // The second reading closes the window: held, not sent.
        input.send(reading("a", 3.0, 9_000_050)).await.expect("send");
        assert_eq!(out.recv().await.expect("copy").topic, "raw");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(out.try_recv().is_err(), "no output before the checkpoint holding it commits");
        tokio::time::sleep(Duration::from_millis(30)).await;
        commit_into(&mut store, &mut file).expect("the closing reading's checkpoint");
        let first = out.recv().await.expect("the window, once committed");
        assert_eq!(shown(&first), r#"pairs/a {"sensor":"a","v":4,"n":2}"#);
        // A SIGKILL before the output is safe: the next checkpoint (which would forget the
        // held window) is not written.
        stage.abort();
        let _ = stage.await;
        drop(file);
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("reopen");
        let restored = file.load_windows().expect("load");
        let DurableStage { routing: _routing, input, mut out, mut store, stage, .. } =
            spawn_durable(COUNTED, 9_000_200, restored);
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { writes, reply }) = store.recv().await
            {
                file.save_windows(&writes).expect("save");
                let _ = reply.send(Ok(()));
            }
        });
        let again = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .expect("the held window is sent again after the restart")
            .expect("a window");
        assert_eq!(
            (shown(&again), again.event_id),
            (shown(&first), first.event_id),
            "the same output with the same id: the upstream dedupes it"
        );
        // The readings are in no other window: the next reading opens a new one.
        input.send(reading("a", 5.0, 9_000_300)).await.expect("send");
        assert_eq!(out.recv().await.expect("copy").topic, "raw");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(out.try_recv().is_err(), "one reading does not close a window of two");
        drop(input);
        stage.await.expect("stage");
        answer.await.expect("answers");
    }

    /// The writes of the checkpoint the stage has asked for, and their reply.
    fn next_writes(
        store: &mut mpsc::Receiver<crate::buffer::worker::Command>,
    ) -> (Vec<LogWrite>, tokio::sync::oneshot::Sender<Result<(), String>>) {
        match store.try_recv() {
            Ok(crate::buffer::worker::Command::Checkpoint { writes, reply }) => (writes, reply),
            _ => panic!("expected a checkpoint"),
        }
    }

    /// After the first full checkpoint, a reading's checkpoint is a delta; after a reload
    /// (even to the same rules: the state was rebuilt) the next one is full again.
    #[tokio::test(start_paused = true)]
    async fn a_reload_makes_the_next_checkpoint_full() {
        let DurableStage { routing, input, mut out, mut store, stage, .. } =
            start_durable(WINDOWED, 8_000_000).await;
        let step = |store: &mut mpsc::Receiver<crate::buffer::worker::Command>| {
            let (writes, reply) = next_writes(store);
            reply.send(Ok(())).expect("reply");
            writes
        };
        input.send(reading("a", 1.0, 8_000_001)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(matches!(step(&mut store)[..], [LogWrite::Delta(_)]), "a delta after the first full one");
        routing.send(Arc::new(rules(WINDOWED))).expect("reload");
        input.send(reading("a", 3.0, 8_000_040)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(matches!(step(&mut store)[..], [LogWrite::Full(_)]), "full after the reload");
        input.send(reading("a", 5.0, 8_000_080)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(matches!(step(&mut store)[..], [LogWrite::Delta(_)]), "then deltas again");
        drop(routing);
        stop_durable(input, store, stage).await;
    }

    /// With a windowed rule loaded, an event no stateful rule reads is acknowledged on its own
    /// path: its ticket is not held for a checkpoint, and it makes none due.
    #[tokio::test(start_paused = true)]
    async fn an_event_no_stateful_rule_reads_does_not_wait_for_a_checkpoint() {
        let text = format!(
            "{WINDOWED}[[rule]]\nname = \"other\"\nsql = 'SELECT payload.v AS v FROM \"x/+\"'\n[[rule.action]]\ntype = \"forward\"\ntopic = \"other\"\n"
        );
        let DurableStage { input, mut out, mut store, stage, .. } = start_durable(&text, 6_001_000).await;
        let sensor = crate::ack::AckQueue::new();
        let mut e = event("x/1", r#"{"v":1}"#);
        e.received_ms = 6_001_001;
        e.ticket = Some(sensor.ticket());
        input.send(e).await.expect("send");
        let other = out.recv().await.expect("the stateless forward");
        assert_eq!(shown(&other), r#"other {"v":1}"#);
        drop(other);
        let mut acked = Vec::new();
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 1, "acknowledged once its forward was done with, no checkpoint between");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(next_checkpoint(&mut store).is_none(), "no state changed: no checkpoint");
        // A reading the windowed rule takes in waits for one, as before.
        let mut r = reading("a", 2.0, 6_001_200);
        r.ticket = Some(sensor.ticket());
        input.send(r).await.expect("send");
        drop(out.recv().await.expect("copy"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 1, "the reading waits for its checkpoint");
        next_checkpoint(&mut store).expect("the reading's checkpoint").send(Ok(())).expect("reply");
        tokio::time::sleep(Duration::from_millis(1)).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 2, "acknowledged by its commit");
        stop_durable(input, store, stage).await;
    }

    /// An event that closes a window (a count window) lends it its held acknowledgement: the
    /// sensor is not acknowledged before the output that holds its reading is safe.
    #[tokio::test(start_paused = true)]
    async fn a_window_an_event_closes_carries_that_events_ticket() {
        let text = r#"
[[rule]]
name = "pairs"
sql = 'SELECT sum(payload.v) AS v FROM "s/+" GROUP BY COUNTWINDOW(2)'
[[rule.action]]
type = "forward"
topic = "pairs"
"#;
        let mut stage = start(text, 4_000_000);
        let queue = crate::ack::AckQueue::new();
        for (v, at) in [(1.0, 4_000_001), (2.0, 4_000_002)] {
            let mut e = reading("a", v, at);
            e.ticket = Some(queue.ticket());
            stage.input.send(e).await.expect("send");
        }
        let pair = stage.out.recv().await.expect("the pair");
        assert_eq!(shown(&pair), r#"pairs {"v":3}"#);
        assert!(pair.ticket.is_some());
        assert_eq!(pair.received_ms, 4_000_002);
        // A count window's id also holds the closing's number in its rule (two pushes, then
        // the closing: 2), so two windows of one group closed in one millisecond differ.
        let origin = WindowOrigin {
            rule: "pairs".into(),
            key: "[]".into(),
            start_ms: 4_000_001,
            end_ms: 4_000_002,
            index: 0,
            seq: Some(2),
        };
        assert_eq!(pair.event_id, origin.fingerprint());
        drop(stage.input);
        stage.stage.await.expect("stage");
    }

    /// A QoS 2 reading a window took in is marked; its resend (DUP) is skipped by the window
    /// (the stateless rule still forwards it) and acknowledged after the next checkpoint; its
    /// PUBREL removes the marker and its PUBCOMP waits for the checkpoint without it; the
    /// same packet id, new (no DUP), counts again.
    #[tokio::test(start_paused = true)]
    async fn a_qos2_resend_is_counted_once_and_its_pubrel_waits_for_the_markers_removal() {
        let DurableStage { input, mut out, mut store, stage, .. } = start_durable(WINDOWED, 8_000_000).await;
        let sensor = crate::ack::AckQueue::new();
        let client: Arc<str> = Arc::from("c1");
        let qos2 = |v: f64, dup: bool| {
            let mut e = reading("a", v, 8_000_100);
            e.qos = Some(2);
            e.client_id = Some(Arc::clone(&client));
            e.dup = dup;
            e.qos2 = Some(Qos2::Publish(7));
            e.ticket = Some(sensor.ticket());
            e
        };
        let release = || {
            let mut e = event("", "");
            e.client_id = Some(Arc::clone(&client));
            e.qos2 = Some(Qos2::Release(7));
            e.ticket = Some(sensor.ticket());
            e
        };
        let mut acked = Vec::new();
        let commit = async |store: &mut mpsc::Receiver<crate::buffer::worker::Command>| {
            tokio::time::sleep(Duration::from_millis(30)).await;
            next_checkpoint(store).expect("a checkpoint").send(Ok(())).expect("reply");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        input.send(qos2(2.0, false)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        commit(&mut store).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 1, "PUBREC after its checkpoint");
        // The crash case: the sensor did not get the PUBREC and sends it again.
        input.send(qos2(2.0, true)).await.expect("send");
        assert_eq!(shown(&out.recv().await.expect("the stateless rule's copy")), r#"raw {"v":2}"#);
        commit(&mut store).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 2, "the resend is answered after the next checkpoint");
        input.send(release()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(1)).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 2, "no PUBCOMP before the marker's removal is committed");
        commit(&mut store).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 3, "PUBCOMP after it");
        // The PUBREL again (a reconnect): nothing to remove, nothing under way: at once.
        input.send(release()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(1)).await;
        sensor.take_ready(&mut acked);
        assert_eq!(acked.len(), 4);
        assert!(next_checkpoint(&mut store).is_none(), "no checkpoint for nothing");
        // The packet id again, a new reading: counted.
        input.send(qos2(4.0, false)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        commit(&mut store).await;
        // Marked, and the same id without DUP: a client that lost its session reuses the id
        // for a new reading, which counts (and is marked afresh).
        input.send(qos2(6.0, false)).await.expect("send");
        drop(out.recv().await.expect("copy"));
        commit(&mut store).await;
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { reply, .. }) = store.recv().await {
                let _ = reply.send(Ok(()));
            }
        });
        let window = tokio::time::timeout(Duration::from_secs(20), out.recv()).await.expect("the window");
        assert_eq!(
            shown(&window.expect("a window")),
            r#"avg/a {"sensor":"a","v":4.0,"n":3,"until":8010000}"#,
            "the first reading and the two new ones, not the resend"
        );
        drop(input);
        stage.await.expect("stage");
        answer.abort();
    }

    /// A client event goes only to the rules that read it, never through a bridge route, and
    /// is never counted unrouted (even when its rule's WHERE turns it away).
    #[tokio::test]
    async fn client_events_reach_their_rules_and_are_never_unrouted() {
        let client_event = |kind: outpost_rules::EventKind, reason: &str| {
            let mut info = outpost_rules::Lifecycle::new(kind);
            info.reason = Some(reason.to_owned());
            let mut event = event(kind.topic(), "");
            event.username = Some("u".into());
            event.lifecycle = Some(Box::new(crate::event::ClientEvent { info }));
            event
        };
        let gone = || client_event(outpost_rules::EventKind::ClientDisconnected, "keepalive_timeout");
        let bridge = Routing::Bridge(Bridge::new(&[]));
        assert_eq!(decide(&bridge, &gone(), 0, "", &policy()), []);

        let routing = rules(
            r#"
[[rule]]
name = "gone"
sql = "SELECT clientid, username, reason FROM \"$events/client_disconnected\" WHERE reason <> 'normal'"
[[rule.action]]
type = "forward"
topic = "gone/${clientid}"
"#,
        );
        let (_routing_tx, routing_rx) = watch::channel(Arc::new(routing));
        let (dead_tx, _dead_rx) = mpsc::channel(8);
        let (in_tx, in_rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let metrics = Metrics::default();
        let stage = RouteStage {
            routing: routing_rx,
            topic_prefix: String::new(),
            topic_policy: policy(),
            republisher: None,
            dead_letters: dead_tx,
            ids: IdGen::new(1),
            metrics: metrics.clone(),
            heartbeat: Heartbeat::unwatched(),
            tap: crate::tap::Tap::new(metrics.clone()),
            clock: Clock::tokio_at(0),
            durable: None,
        };
        let route = tokio::spawn(run(stage, in_rx, out_tx));
        in_tx.send(client_event(outpost_rules::EventKind::ClientDisconnected, "normal")).await.expect("send");
        in_tx.send(client_event(outpost_rules::EventKind::ClientConnected, "")).await.expect("send");
        in_tx.send(gone()).await.expect("send");
        drop(in_tx);
        let forwarded = out_rx.recv().await.expect("the forward");
        assert_eq!(forwarded.topic, "gone/c1");
        assert_eq!(
            &forwarded.payload[..],
            br#"{"clientid":"c1","username":"u","reason":"keepalive_timeout"}"#
        );
        route.await.expect("route stage");
        assert!(out_rx.recv().await.is_none(), "one forward");
        assert_eq!(Metrics::get(&metrics.counters().unrouted), 0);
    }

    /// A reload that changes a windowed rule closes its open windows early, and their
    /// outputs are kept in the state: they go out only once the reshaped checkpoint holding
    /// them has committed. A SIGKILL after that commit and before the outputs are safe
    /// restarts with the new rules (which drop the changed rule's checkpointed windows) from
    /// that checkpoint, and the outputs come again, the same, with the same ids: no reading
    /// the old windows held is lost.
    #[tokio::test(start_paused = true)]
    async fn a_crash_after_a_reload_before_its_outputs_are_safe_loses_no_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("open");
        let DurableStage { routing, input, mut out, mut store, stage, .. } =
            spawn_durable(WINDOWED, 10_000_000, WindowLoad::Empty);
        tokio::time::sleep(Duration::from_millis(1)).await;
        commit_into(&mut store, &mut file).expect("the first checkpoint");
        for (sensor, v) in [("a", 1.0), ("b", 4.0), ("a", 3.0)] {
            input.send(reading(sensor, v, 10_000_100)).await.expect("send");
            drop(out.recv().await.expect("the plain copy"));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        commit_into(&mut store, &mut file).expect("the readings' checkpoint");
        // `avg` becomes a 20 s window: its open 10 s windows close now.
        let changed = WINDOWED.replace("TUMBLINGWINDOW(ss, 10)", "TUMBLINGWINDOW(ss, 20)");
        routing.send(Arc::new(rules(&changed))).expect("reload");
        // The next reading wakes the stage, which takes the reload first.
        input.send(reading("c", 9.0, 10_000_200)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            out.try_recv().is_err(),
            "nothing goes out before the checkpoint holding the outputs commits"
        );
        let writes = commit_into(&mut store, &mut file).expect("the reload's checkpoint");
        assert!(matches!(writes[..], [LogWrite::Full(_)]), "the reshaped state in full: {writes:?}");
        let expected = [
            (
                r#"avg/a {"sensor":"a","v":2.0,"n":2,"until":10010000}"#.to_owned(),
                window_id("avg", r#"["a"]"#, 10_000_000, 10_010_000),
            ),
            (
                r#"avg/b {"sensor":"b","v":4.0,"n":1,"until":10010000}"#.to_owned(),
                window_id("avg", r#"["b"]"#, 10_000_000, 10_010_000),
            ),
        ];
        let mut sent = Vec::new();
        for _ in 0..2 {
            let o = out.recv().await.expect("a closed window's output");
            sent.push((shown(&o), o.event_id));
        }
        assert_eq!(sent, expected);
        assert_eq!(out.recv().await.expect("c's copy").topic, "raw");
        // A SIGKILL before the outputs are safe (the next checkpoint waits for that).
        stage.abort();
        let _ = stage.await;
        drop((file, store, routing, input));
        let (mut file, _) = crate::buffer::Store::open(dir.path()).expect("reopen");
        let restored = file.load_windows().expect("load");
        let DurableStage { routing: _routing, input, mut out, mut store, stage, metrics } =
            spawn_durable(&changed, 10_000_300, restored);
        let answer = tokio::spawn(async move {
            while let Some(crate::buffer::worker::Command::Checkpoint { writes, reply }) = store.recv().await
            {
                file.save_windows(&writes).expect("save");
                let _ = reply.send(Ok(()));
            }
        });
        let mut again = Vec::new();
        for _ in 0..2 {
            let o = tokio::time::timeout(Duration::from_secs(5), out.recv())
                .await
                .expect("the restored outputs are sent once the first checkpoint commits")
                .expect("an output");
            again.push((shown(&o), o.event_id));
        }
        assert_eq!(again, expected, "the same outputs, with the same ids");
        assert_eq!(
            Metrics::get(&metrics.counters().window_state_dropped),
            0,
            "the log holds the reloaded state"
        );
        drop(input);
        stage.await.expect("stage");
        answer.await.expect("answers");
        assert!(out.recv().await.is_none(), "nothing more");
    }
}
