//! The subscribing side of a connection: its subscriptions, and deliveries to the client —
//! from its session's mailbox, retained messages and `$SYS` status — with the QoS 1/2 window,
//! packet ids, DUP resends and QoS 2's PUBREC/PUBREL/PUBCOMP.
//!
//! # Invariants
//! - At most the window (the client's MQTT 5 receive maximum, at most [`MAX_OUT_INFLIGHT`])
//!   QoS 1/2 deliveries await the client's PUBACK or PUBCOMP; the mailbox is taken from only as
//!   far as the window allows, so its queue (bounded) holds the rest. Retained and `$SYS`
//!   deliveries past the window go at QoS 0: a client that never acknowledges cannot exhaust
//!   the packet ids.
//! - A delivery whose message expiry passed is not sent (`local_expired`); one that is sent
//!   carries the expiry interval that remains. A delivery larger than the client's MQTT 5
//!   maximum packet size is not sent (`local_too_large`, logged) — MQTT 5 3.1.2.11.4 says
//!   discard it, as if it had been delivered.
//! - A topic alias is used without its name only after the client got it with the name, on
//!   this connection (aliases are not part of the session).
//! - A packet id is never used twice while in flight. Deliveries left unacknowledged go back
//!   to the session, in the order they were sent, when the connection ends.
//! - `$SYS` filters are this connection's alone ([`SysSubscription`]); every other filter is
//!   the session's, in the trie.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outpost_rules::EventKind;
use rumqttd::protocol::{
    Filter, Packet, PubRel, PubRelReason, Publish, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};

use super::io::Io;
use super::{Client, End, events};
use crate::broker::Shared;
use crate::broker::access::Permissions;
use crate::broker::local::{Attached, Mailbox, Message, SubOptions, SubscribeError, Will};
use crate::broker::sys::{self, SysSubscription};
use crate::event::escape_topic;
use crate::metrics::Metrics;
use crate::mqtt::codec;
use crate::mqtt::topic;
use tokio::time::Instant;
use tracing::{info, warn};

/// Outgoing QoS 1/2 deliveries awaiting the client's PUBACK or PUBCOMP, at most. Beyond it
/// the session's queued deliveries wait (and its queue fills); retained replays go at QoS 0.
const MAX_OUT_INFLIGHT: usize = 1_000;

/// Topic aliases used toward one client, at most (whatever more it accepts): bounds what a
/// connection keeps per topic.
const MAX_TOPIC_ALIASES: u16 = 256;

/// Server-to-client topic aliases of one connection. The first topics sent get one each, for
/// the connection's life; later topics go with their full name (MQTT 5 3.3.2.3.4 leaves the
/// choice to the sender).
struct TopicAliases {
    max: u16,
    by_topic: HashMap<Bytes, u16>,
}

#[derive(Clone, Copy)]
enum Alias {
    /// Sent before: the topic name may be left out.
    Known(u16),
    /// Sent with the name this time, and remembered.
    New(u16),
}

impl TopicAliases {
    fn lookup(&self, topic: &Bytes) -> Option<Alias> {
        if let Some(n) = self.by_topic.get(topic) {
            return Some(Alias::Known(*n));
        }
        let next = u16::try_from(self.by_topic.len() + 1).ok()?;
        (next <= self.max).then_some(Alias::New(next))
    }
}

pub(super) struct Outbound {
    pub(super) queue: SessionQueue,
    pub(super) sys: SysSubscription,
    /// Outgoing QoS 1/2 deliveries awaiting the client's PUBACK or PUBCOMP, by packet id, with
    /// their send order (a persistent session gets them again in that order after a
    /// reconnect).
    inflight: HashMap<u16, (u64, Message)>,
    /// Deliveries awaiting their acknowledgement, at most: [`MAX_OUT_INFLIGHT`] or the
    /// client's receive maximum, whichever is lower.
    window: usize,
    /// The largest packet the client accepts (MQTT 5 maximum packet size).
    max_packet: Option<usize>,
    /// Server-to-client topic aliases, when the MQTT 5 client accepts them.
    aliases: Option<TopicAliases>,
    sent: u64,
    next_pkid: u16,
    /// What the ACL lets this client read and subscribe to.
    permissions: Permissions,
    /// The session's client id (its deliveries in the buffer file are kept under it).
    id: Arc<str>,
}

/// The session's delivery queue, as the connection waits on it.
pub(super) struct SessionQueue {
    mailbox: Arc<Mailbox>,
    /// Whether anything can arrive in the mailbox (a subscription was made, or a session
    /// resumed). Until then the loop does not wait on it: most sensors only publish, and a
    /// wake-up registration per loop turn is their per-publish cost otherwise.
    listening: bool,
}

impl SessionQueue {
    /// Resolves when the mailbox may hold deliveries; never while not listening.
    pub(super) async fn ready(&self) {
        if self.listening {
            self.mailbox.ready().await;
        } else {
            std::future::pending().await
        }
    }
}

/// What one SUBSCRIBE's filters got.
struct Granted {
    codes: Vec<SubscribeReasonCode>,
    /// Filters in the trie whose retained messages are due now, with their granted QoS.
    local: Vec<(String, u8)>,
    /// `$SYS` filters this connection did not hold yet.
    sys: Vec<String>,
}

impl Outbound {
    /// `receive_max`, `max_packet`, `topic_alias_max`: what the client's MQTT 5 CONNECT said
    /// it accepts, if it did.
    pub(super) fn new(
        attached: Attached,
        permissions: Permissions,
        receive_max: Option<u16>,
        max_packet: Option<u32>,
        topic_alias_max: Option<u16>,
    ) -> Outbound {
        Outbound {
            permissions,
            id: Arc::clone(&attached.id),
            queue: SessionQueue { mailbox: attached.mailbox, listening: attached.present },
            sys: SysSubscription::default(),
            inflight: HashMap::new(),
            window: receive_max.map_or(MAX_OUT_INFLIGHT, |r| usize::from(r).clamp(1, MAX_OUT_INFLIGHT)),
            max_packet: max_packet.and_then(|m| usize::try_from(m).ok()),
            aliases: topic_alias_max
                .filter(|m| *m > 0)
                .map(|m| TopicAliases { max: m.min(MAX_TOPIC_ALIASES), by_topic: HashMap::new() }),
            sent: 0,
            next_pkid: 0,
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the delivery is complete.
    pub(super) fn on_complete(&mut self, shared: &Shared, pkid: u16) {
        if let Some((_, message)) = self.inflight.remove(&pkid) {
            shared.local.completed(&self.id, &message);
        }
    }

    /// PUBREC for a QoS 2 delivery: PUBREL, and wait for the PUBCOMP. An MQTT 5 PUBREC with
    /// a failure code ends the delivery there (3.3.4: it is complete).
    pub(super) fn on_pubrec(&mut self, io: &mut Io, shared: &Shared, pkid: u16, failed: bool) {
        let reason = match self.inflight.get_mut(&pkid) {
            Some((_, m)) if m.qos == 2 && failed => {
                self.on_complete(shared, pkid);
                return;
            }
            Some((_, m)) if m.qos == 2 => {
                m.released = true;
                PubRelReason::Success
            }
            _ => PubRelReason::PacketIdentifierNotFound,
        };
        io.write(Packet::PubRel(PubRel { pkid, reason }, None));
    }

    /// Writes what the session's queue holds, as far as the QoS 1/2 window allows, in order.
    pub(super) fn pull(&mut self, io: &mut Io, shared: &Shared) {
        // Nothing can be queued for a session that never subscribed; its mailbox, cold in the
        // cache of a gateway with a thousand sensors, is not touched on every turn.
        if !self.queue.listening {
            return;
        }
        let mut room = self.window.saturating_sub(self.inflight.len());
        let mut taken = Vec::new();
        self.queue.mailbox.take(
            |m| {
                if m.qos == 0 {
                    return true;
                }
                if room == 0 {
                    return false;
                }
                room -= 1;
                true
            },
            &mut taken,
        );
        for message in taken {
            self.send(io, shared, message);
        }
    }

    /// Subscribes, answers with SUBACK, then sends the retained messages and current `$SYS`
    /// status the new filters match. No Local on a shared subscription ends the connection:
    /// MQTT 5 (3.8.3.1) makes it a protocol error, and nothing of the SUBSCRIBE is applied.
    pub(super) async fn on_subscribe(
        &mut self,
        io: &mut Io,
        client: &Client,
        subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
    ) -> Result<(), End> {
        if let Some(f) =
            subscribe.filters.iter().find(|f| f.nolocal && topic::split_shared(&f.path).0.is_some())
        {
            return Err(End::Protocol(format!(
                "No Local on the shared subscription {} (a protocol error, MQTT 5 3.8.3.1)",
                escape_topic(&f.path)
            )));
        }
        let id = properties.and_then(|p| p.id);
        // Only when a rule reads `$events/session_subscribed`: the filters go into `grant`.
        let asked: Vec<String> = if events::wanted(client, EventKind::SessionSubscribed) {
            subscribe.filters.iter().map(|f| f.path.clone()).collect()
        } else {
            Vec::new()
        };
        let granted = self.grant(client, io.v5(), subscribe.filters, id);
        // A persistent session's subscription is on disk before the client sees it granted.
        client.shared.local.flush(&client.id).await;
        for (filter, code) in asked.iter().zip(&granted.codes) {
            if let SubscribeReasonCode::Success(qos) = code {
                events::subscription(client, EventKind::SessionSubscribed, filter, *qos as u8);
            }
        }
        io.write(Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes: granted.codes }, None));
        self.replay_retained(io, &client.shared, granted.local);
        if !granted.sys.is_empty() {
            self.start_sys(io, &client.shared, granted.sys);
        }
        Ok(())
    }

    /// Adds each filter to the session (or to this connection's `$SYS` filters), unless it is
    /// invalid, the ACL lets the client read nothing it matches, or the session holds too many.
    fn grant(&mut self, client: &Client, v5: bool, filters: Vec<Filter>, id: Option<usize>) -> Granted {
        let refused = |quota: bool| match (v5, quota) {
            (false, _) => SubscribeReasonCode::Failure,
            (true, true) => SubscribeReasonCode::QuotaExceeded,
            (true, false) => SubscribeReasonCode::TopicFilterInvalid,
        };
        let mut granted =
            Granted { codes: Vec::with_capacity(filters.len()), local: Vec::new(), sys: Vec::new() };
        for filter in filters {
            let qos = (filter.qos as u8).min(2);
            if topic::invalid_filter(&filter.path).is_some() {
                granted.codes.push(refused(false));
            } else if !self
                .permissions
                .may_subscribe(&client.shared.access, topic::split_shared(&filter.path).1)
            {
                self.deny_subscription(client, &filter.path);
                granted.codes.push(if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                });
            } else if sys::is_sys(&filter.path) {
                if !self.sys.holds(&filter.path) && !granted.sys.contains(&filter.path) {
                    if !self.sys.has_room(&granted.sys) {
                        granted.codes.push(refused(true));
                        continue;
                    }
                    granted.sys.push(filter.path);
                }
                granted.codes.push(SubscribeReasonCode::Success(codec::qos(0)));
            } else {
                let options = SubOptions {
                    qos,
                    // Never on a shared subscription: `on_subscribe` refused that.
                    no_local: v5 && filter.nolocal,
                    retain_as_published: v5 && filter.preserve_retain,
                    ids: id.into_iter().collect(),
                    share: None,
                };
                match client.shared.local.subscribe(&client.id, &filter.path, options) {
                    Ok(new) => {
                        self.queue.listening = true;
                        granted.codes.push(SubscribeReasonCode::Success(codec::qos(qos)));
                        // Retain handling (MQTT 5): 0 every time, 1 only for a new
                        // subscription, 2 never. 3.1.1 has only 0.
                        let replay = match (v5, &filter.retain_forward_rule) {
                            (false, _) | (true, RetainForwardRule::OnEverySubscribe) => true,
                            (true, RetainForwardRule::OnNewSubscribe) => new,
                            (true, RetainForwardRule::Never) => false,
                        };
                        if replay {
                            granted.local.push((filter.path, qos));
                        }
                    }
                    Err(SubscribeError::TooMany) => {
                        Metrics::add(&client.shared.metrics.counters().subscriptions_refused_limit, 1);
                        granted.codes.push(refused(true));
                    }
                }
            }
        }
        granted
    }

    /// Counts and logs a subscription the ACL refused (SUBACK 0x80 / 0x87).
    fn deny_subscription(&self, client: &Client, filter: &str) {
        let shared = &client.shared;
        Metrics::add(&shared.metrics.counters().acl_subscribe_denied, 1);
        if let Some(folded) = shared.logs.ready("acl subscribe") {
            warn!(message = "refused a subscription: the ACL lets its client read no topic it matches (SUBACK 0x80 / 0x87; mosquitto would grant it and deliver nothing); grant read in broker.acl_file and send SIGHUP, or fix the client's filter", client_id = %client.id, filter = %escape_topic(filter), similar_since_last_log = folded);
        }
    }

    /// Sends the retained messages matching new filters. Shared subscriptions get none (MQTT 5,
    /// 4.8.2).
    fn replay_retained(&mut self, io: &mut Io, shared: &Shared, filters: Vec<(String, u8)>) {
        for (filter, qos) in filters.into_iter().filter(|(f, _)| !f.starts_with("$share/")) {
            for retained in shared.retained.matching(&filter) {
                let mut message =
                    Message::new(retained.publish, retained.qos.min(qos), true, retained.properties);
                message.expires = retained.expires;
                self.deliver(io, shared, message);
            }
        }
    }

    /// Adds new `$SYS` filters and sends each the current status it matches, as retained.
    fn start_sys(&mut self, io: &mut Io, shared: &Shared, filters: Vec<String>) {
        let status = self.sys.follow(&shared.status);
        for filter in &filters {
            for (topic, payload) in status.iter().filter(|(name, _)| topic::filter_matches(filter, name)) {
                self.send_status(io, shared, topic, payload, true);
            }
        }
        self.sys.extend(filters);
    }

    /// The status changed: sends the topics this connection's `$SYS` filters match.
    pub(super) fn on_status(&mut self, io: &mut Io, shared: &Shared) {
        let Some(status) = self.sys.current() else { return };
        for (topic, payload) in status.iter() {
            if self.sys.wants(topic) {
                self.send_status(io, shared, topic, payload, false);
            }
        }
    }

    fn send_status(&mut self, io: &mut Io, shared: &Shared, topic: &str, payload: &Bytes, retained: bool) {
        let publish = Publish::new(Bytes::from(topic.to_owned()), payload.clone(), retained);
        self.deliver(io, shared, Message::new(publish, 0, retained, None));
    }

    pub(super) async fn on_unsubscribe(&mut self, io: &mut Io, client: &Client, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::new();
        for filter in unsubscribe.filters {
            let was_sys = self.sys.remove(&filter);
            if client.shared.local.unsubscribe(&client.id, &filter) || was_sys {
                events::subscription(client, EventKind::SessionUnsubscribed, &filter, 0);
                reasons.push(UnsubAckReason::Success);
            } else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        client.shared.local.flush(&client.id).await;
        io.write(Packet::UnsubAck(UnsubAck { pkid: unsubscribe.pkid, reasons }, None));
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Writes a retained or `$SYS` delivery. A client that never acknowledges cannot exhaust
    /// the packet ids: past the window it gets QoS 0.
    fn deliver(&mut self, io: &mut Io, shared: &Shared, mut message: Message) {
        if message.qos > 0 && self.inflight.len() >= self.window {
            message.qos = 0;
        }
        self.send(io, shared, message);
    }

    /// Writes one delivery; a QoS 1/2 one is kept until the client's PUBACK/PUBCOMP. A
    /// delivery the ACL does not let the client read is not written (as mosquitto does, at
    /// delivery: a subscription may match topics the client may not read, and a reload may
    /// take a topic away from a subscription made before).
    fn send(&mut self, io: &mut Io, shared: &Shared, mut message: Message) {
        // A QoS 2 delivery whose PUBREC came before the connection was lost: only its PUBREL
        // is sent again (MQTT 4.4).
        if message.released
            && let Some(pkid) = message.resend.filter(|p| *p != 0 && !self.inflight.contains_key(p))
        {
            io.write(Packet::PubRel(PubRel { pkid, reason: PubRelReason::Success }, None));
            self.sent += 1;
            self.inflight.insert(pkid, (self.sent, message));
            return;
        }
        let counters = shared.metrics.counters();
        let now = Instant::now();
        if let Some(expires) = message.expires {
            if expires <= now {
                Metrics::add(&counters.local_expired, 1);
                shared.local.completed(&self.id, &message);
                return;
            }
            // The interval that remains, rounded up so a live message never says 0.
            let left = expires.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            if let Some(p) = message.properties.as_mut() {
                p.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
            }
        }
        if !self.permissions.may_read(&shared.access, &message.publish.topic) {
            Metrics::add(&shared.metrics.counters().acl_delivery_denied, 1);
            if let Some(folded) = shared.logs.ready("acl deliver") {
                info!(message = "withheld deliveries the ACL does not let their subscriber read (its subscription matches topics it may not read); grant read in broker.acl_file and send SIGHUP if it should get them", topic = %escape_topic(&String::from_utf8_lossy(&message.publish.topic)), similar_since_last_log = folded);
            }
            shared.local.completed(&self.id, &message);
            return;
        }
        let (pkid, dup) = match (message.qos, message.resend) {
            (0, _) => (0, false),
            (_, Some(p)) if !self.inflight.contains_key(&p) && p != 0 => (p, true),
            _ => (self.alloc_pkid(), false),
        };
        let mut properties = if io.v5() { message.properties.clone() } else { None };
        let alias = self.aliases.as_ref().and_then(|a| a.lookup(&message.publish.topic));
        let out = match alias {
            Some(Alias::Known(n)) => {
                properties.get_or_insert_with(Default::default).topic_alias = Some(n);
                let bare = Publish::new(Bytes::new(), message.publish.payload.clone(), false);
                codec::publish_out(&bare, message.qos, pkid, message.retain, dup)
            }
            Some(Alias::New(n)) => {
                properties.get_or_insert_with(Default::default).topic_alias = Some(n);
                codec::publish_out(&message.publish, message.qos, pkid, message.retain, dup)
            }
            None => codec::publish_out(&message.publish, message.qos, pkid, message.retain, dup),
        };
        let before = io.outbuf.len();
        io.write(Packet::Publish(out, properties));
        let size = io.outbuf.len() - before;
        if self.max_packet.is_none_or(|max| size <= max)
            && let (Some(Alias::New(n)), Some(aliases)) = (alias, self.aliases.as_mut())
        {
            // Only once the client has seen the name with it.
            aliases.by_topic.insert(message.publish.topic.clone(), n);
        }
        if self.max_packet.is_some_and(|max| size > max) {
            io.outbuf.truncate(before);
            Metrics::add(&counters.local_too_large, 1);
            if let Some(folded) = shared.logs.ready("too large for client") {
                warn!(message = "a delivery was larger than the maximum packet size its MQTT 5 subscriber announced, and was discarded (local_too_large), as MQTT 5 requires; raise the client's maximum packet size or publish smaller messages", topic = %escape_topic(&String::from_utf8_lossy(&message.publish.topic)), size, similar_since_last_log = folded);
            }
            shared.local.completed(&self.id, &message);
            return;
        }
        Metrics::add(&counters.local_delivered, 1);
        if message.qos > 0 {
            self.sent += 1;
            self.inflight.insert(pkid, (self.sent, Message { resend: Some(pkid), ..message }));
        }
    }

    /// The connection ends: the session gets its unacknowledged deliveries back, in the order
    /// they were sent (see `Local::detach`).
    /// `expiry` and `will`: see `Local::detach`; returns the wills due now.
    pub(super) fn detach(
        &mut self,
        client: &Client,
        expiry: Option<u32>,
        will: Option<(Duration, Will)>,
    ) -> Vec<Will> {
        let mut inflight: Vec<(u64, Message)> = self.inflight.drain().map(|(_, m)| m).collect();
        inflight.sort_unstable_by_key(|(sent, _)| *sent);
        let inflight = inflight.into_iter().map(|(_, m)| m).collect();
        client.shared.local.detach(
            &client.id,
            client.registration.serial(),
            &self.queue.mailbox,
            inflight,
            expiry,
            will,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_topics_get_aliases_for_good_and_the_rest_go_by_name() {
        let mut aliases = TopicAliases { max: 2, by_topic: HashMap::new() };
        let (a, b, c) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"), Bytes::from_static(b"c"));
        assert!(matches!(aliases.lookup(&a), Some(Alias::New(1))));
        assert!(matches!(aliases.lookup(&a), Some(Alias::New(1))), "not remembered until it was written");
        aliases.by_topic.insert(a.clone(), 1);
        assert!(matches!(aliases.lookup(&a), Some(Alias::Known(1))));
        aliases.by_topic.insert(b.clone(), 2);
        assert!(aliases.lookup(&c).is_none(), "all aliases taken: by name");
        assert!(matches!(aliases.lookup(&b), Some(Alias::Known(2))));
    }
}
