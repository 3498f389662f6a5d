//! The publishing side of a connection: publishes from the client into the local fan-out and
//! the pipeline, their acknowledgements held until the events are safe and written in arrival
//! order, QoS 2's PUBREC/PUBREL (both protocol versions), and the will (with its MQTT 5
//! properties and delay).
//!
//! # Invariants
//! - `held` and the `AckQueue` match one to one: every QoS ≥ 1 publish taken has a slot in
//!   both, in arrival order, and its answer is written only when the slots before it were.
//! - A QoS 2 publish is taken once: a resend of a packet id between PUBREC and PUBREL is
//!   answered again, never handed over again. Across connections (and restarts) the route
//!   stage tells a resend apart for the stateful rules (its QoS 2 markers): a QoS 2 event
//!   carries its packet id, and with acknowledgements held (`broker.ack = "after_commit"`) a
//!   PUBREL goes to the route stage too, its PUBCOMP held in turn like a PUBREC until the
//!   marker's removal is durable.
//! - An MQTT 5 client holds at most [`RECEIVE_MAXIMUM`] QoS 1/2 publishes unanswered (QoS 1
//!   without PUBACK, QoS 2 until PUBREL), as CONNACK announced; one more ends the connection
//!   with 0x93 (MQTT 5, 3.3.4), so a client that ignores it cannot grow `held` without bound.
//! - A publish is checked completely (size, topic, properties) before it reaches a subscriber,
//!   the retained store or the pipeline.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use outpost_rules::PubProps;
use rumqttd::protocol::{
    LastWill, LastWillProperties, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
    Publish, PublishProperties,
};
use tracing::warn;

use super::io::Io;
use super::{Client, End, events};
use crate::ack::{AckQueue, Outcome};
use crate::broker::Shared;
use crate::broker::access::Permissions;
use crate::broker::local::Will;
use crate::broker::retained::Retained;
use crate::event::{Qos2, escape_topic};
use crate::metrics::Metrics;
use crate::mqtt::codec;
use crate::mqtt::topic::{NameError, invalid_topic};

/// The receive maximum announced to MQTT 5 clients: QoS 1/2 publishes a client may have
/// unanswered. Room for a sensor at thousands of messages per second while acknowledgements
/// wait for the group commit (25 ms by default).
pub(super) const RECEIVE_MAXIMUM: u16 = 1_000;

/// The QoS slot of a `held` entry that is a PUBREL: its PUBCOMP waits in turn. Its third
/// field says the packet id was unknown to the connection (MQTT 5: reason 0x92).
const PUBREL: u8 = 3;

pub(super) struct Inbound {
    acks: Arc<AckQueue>,
    /// Held acknowledgements: packet id, QoS and whether the ACL denied the publish (MQTT 5:
    /// its answer is "not authorized" whatever its slot says), in arrival order (matches
    /// `acks`). A PUBREL's PUBCOMP has QoS [`PUBREL`] (and the flag: its id was unknown).
    held: VecDeque<(u16, u8, bool)>,
    /// QoS 1 entries of `held` (with `qos2`: the publishes the receive maximum counts).
    held_qos1: usize,
    /// QoS 2 packet ids acknowledged with PUBREC or waiting for it, until PUBREL.
    qos2: HashSet<u16>,
    will: Option<LastWill>,
    /// The will's MQTT 5 properties.
    will_properties: Option<LastWillProperties>,
    /// What the ACL lets this client write.
    permissions: Permissions,
}

impl Inbound {
    pub(super) fn new(
        will: Option<LastWill>,
        will_properties: Option<LastWillProperties>,
        permissions: Permissions,
    ) -> Inbound {
        Inbound {
            acks: AckQueue::new(),
            held: VecDeque::new(),
            held_qos1: 0,
            qos2: HashSet::new(),
            will,
            will_properties,
            permissions,
        }
    }

    /// Holds a publish's answer in its turn.
    fn hold(&mut self, entry: (u16, u8, bool)) {
        if entry.1 == 1 {
            self.held_qos1 += 1;
        }
        self.held.push_back(entry);
    }

    /// The queue whose `ready()` says held acknowledgements may be written.
    pub(super) fn acks(&self) -> Arc<AckQueue> {
        Arc::clone(&self.acks)
    }

    /// Takes one publish: checks it, queues it for local subscribers (and the retained store),
    /// holds or writes its acknowledgement, and hands its event to the route stage.
    pub(super) async fn on_publish(
        &mut self,
        io: &mut Io,
        client: &Client,
        publish: Publish,
        properties: Option<PublishProperties>,
        peek: Option<(u8, u16, bool)>,
    ) -> Result<(), End> {
        let shared = &*client.shared;
        let (qos, pkid, dup) = peek.unwrap_or((0, 0, false));
        if qos > 0
            && io.v5()
            && !(qos == 2 && self.qos2.contains(&pkid))
            && self.held_qos1 + self.qos2.len() >= usize::from(RECEIVE_MAXIMUM)
        {
            return Err(End::ReceiveMaximum);
        }
        if publish.payload.len() as u64 > shared.cfg.max_payload.as_u64() {
            return Err(End::Oversize(publish.payload.len()));
        }
        let Some(topic) = self.topic(io, client, &publish, qos, pkid)? else { return Ok(()) };
        check_properties(properties.as_ref())?;
        if qos == 2 && self.qos2.contains(&pkid) {
            return self.on_qos2_resend(io, shared, pkid);
        }
        if !self.permissions.may_write(&shared.access, &topic) {
            events::dropped(client, &topic, &publish.payload, qos, "not_authorized");
            return self.deny(io, client, &topic, qos, pkid);
        }
        // Taken before the fan-out: its copies queued for persistent sessions hold it until
        // they are committed (see `broker::persist`), so the PUBACK waits for them too.
        let ticket = (qos > 0 && shared.ack_after_commit()).then(|| self.acks.timed_ticket(&shared.metrics));
        // A full subscriber queue slows this sensor down for a bounded time at most.
        fan_out(
            shared,
            &topic,
            &publish,
            publish.retain,
            qos,
            properties.as_ref(),
            Some(&client.id),
            ticket.as_ref(),
        )
        .await;
        let mut event = shared.intake.new_event(topic, publish.payload, qos, &client.id);
        event.peerhost = Some(Arc::clone(&client.peerhost));
        event.username = client.about.username.clone();
        event.retain = publish.retain;
        event.dup = dup;
        event.pub_props = properties.as_ref().and_then(pub_props);
        if qos > 0 {
            if qos == 2 {
                self.qos2.insert(pkid);
                if ticket.is_some() {
                    event.qos2 = Some(Qos2::Publish(pkid));
                }
            }
            if let Some(ticket) = ticket {
                event.ticket = Some(ticket);
                self.hold((pkid, qos, false));
            } else {
                acknowledge(io, &mut self.qos2, pkid, qos, Outcome::Safe)?;
            }
        }
        // A takeover or shutdown must not wait behind a full pipeline: the event not handed
        // over is not acknowledged either (the connection ends before its slot is answered).
        // Biased: the hand-over almost always succeeds at once, and then the stop signal is
        // never polled (registering with it per event cost more than the hand-over).
        tokio::select! {
            biased;
            handed = shared.intake.hand_over(event) => if handed { Ok(()) } else { Err(End::Shutdown) },
            () = client.registration.stop().stopped() => Err(client.why_stopped()),
        }
    }

    /// The publish's topic if it may be taken; `None`: refused by Outpost's topic policy and
    /// answered (MQTT 5 QoS 1: PUBACK 0x90 in its turn; QoS 0: discarded).
    fn topic(
        &mut self,
        io: &mut Io,
        client: &Client,
        publish: &Publish,
        qos: u8,
        pkid: u16,
    ) -> Result<Option<String>, End> {
        let shared = &*client.shared;
        let t = match std::str::from_utf8(&publish.topic) {
            // U+0000 and invalid UTF-8 break the encoding itself ([MQTT-1.5.4-1/2]).
            Ok(t) if t.contains('\0') => {
                return Err(End::Malformed(format!("publish topic {t:?} contains U+0000")));
            }
            Ok(t) => t,
            Err(_) => return Err(End::Malformed("topic is not UTF-8".to_owned())),
        };
        let why = match invalid_topic(t, &shared.cfg.topic_policy()) {
            None => return Ok(Some(t.to_owned())),
            Some(why) => why,
        };
        shared.metrics.count_topic_refusal(why);
        if why.is_protocol_violation() || !io.v5() || qos == 2 {
            // MQTT 3.1.1 cannot refuse one publish: close, as mosquitto 2.0.11 does.
            return Err(End::Protocol(format!("publish topic \"{}\": {why}", escape_topic(t))));
        }
        events::dropped(client, t, &publish.payload, qos, "topic_name_invalid");
        self.refuse_topic(io, client, t, why, qos, pkid)?;
        Ok(None)
    }

    fn refuse_topic(
        &mut self,
        io: &mut Io,
        client: &Client,
        topic: &str,
        why: NameError,
        qos: u8,
        pkid: u16,
    ) -> Result<(), End> {
        if let Some(folded) = client.shared.logs.ready("topic") {
            warn!(message = "refused a publish whose topic the upstream brokers refuse (MQTT 5 PUBACK 0x90 for QoS 1, QoS 0 discarded); fix the sensor's topic, or raise broker.max_topic_levels/max_topic_length if the upstream accepts it", client_id = %client.id, topic = %escape_topic(topic), reason = %why, similar_since_last_log = folded);
        }
        if qos == 1 && self.held.is_empty() {
            acknowledge(io, &mut self.qos2, pkid, 1, Outcome::TopicInvalid)?;
        } else if qos == 1 {
            self.acks.answered(Outcome::TopicInvalid);
            self.hold((pkid, 1, false));
        }
        Ok(())
    }

    /// A publish the ACL does not let this client write: dropped — not retained, not
    /// delivered, not forwarded — and answered in its turn, as mosquitto 2.0 answers it: MQTT 5
    /// PUBACK 0x87 "not authorized"; 3.1.1, which has no refusal, an ordinary PUBACK (PUBREC
    /// for QoS 2). QoS 0 is discarded.
    fn deny(&mut self, io: &mut Io, client: &Client, topic: &str, qos: u8, pkid: u16) -> Result<(), End> {
        let shared = &*client.shared;
        Metrics::add(&shared.metrics.counters().acl_publish_denied, 1);
        if let Some(folded) = shared.logs.ready("acl publish") {
            warn!(message = "dropped a publish the ACL does not allow its client to write (MQTT 5: PUBACK 0x87; 3.1.1: acknowledged and dropped, as mosquitto does); grant it in broker.acl_file and send SIGHUP, or fix the sensor's topic", client_id = %client.id, topic = %escape_topic(topic), similar_since_last_log = folded);
        }
        if qos == 0 {
            return Ok(());
        }
        let v5 = io.v5();
        if qos == 2 && !v5 {
            // The PUBREL that follows gets its PUBCOMP (MQTT 5's PUBREC 0x87 ends the flow).
            self.qos2.insert(pkid);
        }
        if self.held.is_empty() {
            answer_denied(io, &mut self.qos2, pkid, qos, v5)
        } else {
            self.acks.answered(Outcome::Safe);
            self.hold((pkid, qos, true));
            Ok(())
        }
    }

    /// A resend of a QoS 2 publish already taken: answered again, never taken twice. If its
    /// PUBREC is still held, that one answer covers the resend too.
    fn on_qos2_resend(&mut self, io: &mut Io, shared: &Shared, pkid: u16) -> Result<(), End> {
        if !self.held.iter().any(|&(p, q, _)| p == pkid && q == 2) {
            if shared.ack_after_commit() {
                drop(self.acks.ticket());
                self.hold((pkid, 2, false));
            } else {
                acknowledge(io, &mut self.qos2, pkid, 2, Outcome::Safe)?;
            }
        }
        Ok(())
    }

    /// A PUBREL: the QoS 2 flow of `pkid` ends. With acknowledgements held it goes to the
    /// route stage, whatever the connection knows of `pkid` (after a restart the reading's
    /// marker may be there and the connection's state not), and its PUBCOMP waits in turn.
    pub(super) async fn on_pubrel(&mut self, io: &mut Io, client: &Client, pkid: u16) -> Result<(), End> {
        let known = self.qos2.remove(&pkid);
        let shared = &*client.shared;
        if !shared.ack_after_commit() {
            io.write(Packet::PubComp(PubComp { pkid, reason: pubcomp_reason(known) }, None));
            return Ok(());
        }
        let release = shared.intake.release(&client.id, pkid, self.acks.ticket());
        self.hold((pkid, PUBREL, !known));
        tokio::select! {
            biased;
            handed = shared.intake.hand_over_release(release) => if handed { Ok(()) } else { Err(End::Shutdown) },
            () = client.registration.stop().stopped() => Err(client.why_stopped()),
        }
    }

    /// Writes the held acknowledgements whose events are safe now, in arrival order.
    pub(super) fn on_acks_ready(&mut self, io: &mut Io) -> Result<(), End> {
        let mut outcomes = Vec::new();
        self.acks.take_ready(&mut outcomes);
        let v5 = io.v5();
        for outcome in outcomes {
            let Some((pkid, qos, denied)) = self.held.pop_front() else { break };
            if qos == 1 {
                self.held_qos1 -= 1;
            }
            if qos == PUBREL {
                io.write(Packet::PubComp(PubComp { pkid, reason: pubcomp_reason(!denied) }, None));
            } else if denied {
                answer_denied(io, &mut self.qos2, pkid, qos, v5)?;
            } else {
                acknowledge(io, &mut self.qos2, pkid, qos, outcome)?;
            }
        }
        Ok(())
    }

    /// Takes the will (at most once), with its MQTT 5 will delay.
    pub(super) fn take_will(&mut self, client: &Client) -> Option<(Duration, Will)> {
        let will = self.will.take()?;
        let props = self.will_properties.take();
        let delay =
            Duration::from_secs(u64::from(props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0)));
        let properties = props.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
            ..PublishProperties::default()
        });
        let permissions = client.shared.access.permissions(None, Arc::clone(&client.id));
        let permissions = std::mem::replace(&mut self.permissions, permissions);
        Some((
            delay,
            Will {
                client_id: Arc::clone(&client.id),
                will,
                properties,
                permissions,
                peerhost: Arc::clone(&client.peerhost),
                username: client.about.username.clone(),
            },
        ))
    }
}

/// Publishes a will: locally, retained if asked, and into the pipeline.
pub(in crate::broker) async fn publish_will(shared: &Shared, will: Will) {
    let Will { client_id, will, properties, mut permissions, peerhost, username } = will;
    let qos = (will.qos as u8).min(2);
    let Ok(topic) = std::str::from_utf8(&will.topic).map(str::to_owned) else { return };
    // Checked now, not at CONNECT, as mosquitto does: the ACL may have been reloaded since.
    if !permissions.may_write(&shared.access, &topic) {
        Metrics::add(&shared.metrics.counters().acl_will_denied, 1);
        if let Some(folded) = shared.logs.ready("acl will") {
            warn!(message = "did not publish a will the ACL does not allow its client to write; grant its topic in broker.acl_file and send SIGHUP, or fix the sensor's will topic", %client_id, topic = %escape_topic(&topic), similar_since_last_log = folded);
        }
        return;
    }
    let publish = codec::publish_from(will.topic.clone(), will.message.clone(), qos, will.retain);
    fan_out(shared, &topic, &publish, will.retain, qos, properties.as_ref(), None, None).await;
    Metrics::add(&shared.metrics.counters().wills_published, 1);
    let mut event = shared.intake.new_event(topic, will.message, qos, &client_id);
    event.peerhost = Some(peerhost);
    event.username = username;
    event.retain = will.retain;
    event.pub_props = properties.as_ref().and_then(pub_props);
    shared.intake.hand_over(event).await;
}

/// What rules may read of a publish's properties (`pub_props`); `None` when nothing, so
/// a publish without properties allocates nothing for them.
fn pub_props(p: &PublishProperties) -> Option<Arc<PubProps>> {
    let props = PubProps {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|d| d.to_vec()),
        user_properties: p.user_properties.clone(),
    };
    (!props.is_empty()).then(|| Arc::new(props))
}

/// MQTT 5 properties a client may not send, given what CONNACK offered.
fn check_properties(properties: Option<&PublishProperties>) -> Result<(), End> {
    match properties {
        Some(p) if p.topic_alias.is_some() => {
            Err(End::Protocol("topic alias used; CONNACK announced topic alias maximum 0".to_owned()))
        }
        // Only a server may send one (MQTT 5, 3.3.4).
        Some(p) if !p.subscription_identifiers.is_empty() => {
            Err(End::Protocol("subscription identifier in a PUBLISH".to_owned()))
        }
        _ => Ok(()),
    }
}

/// Keeps the publish if `retain`, and queues it for local subscribers (at `qos`, the most
/// they get). `from`: the publishing session (for no local). `ticket`: the publisher's
/// acknowledgement, held until its copies for persistent sessions are committed.
#[allow(clippy::too_many_arguments)]
async fn fan_out(
    shared: &Shared,
    topic: &str,
    publish: &Publish,
    retain: bool,
    qos: u8,
    properties: Option<&PublishProperties>,
    from: Option<&str>,
    ticket: Option<&crate::ack::Ticket>,
) {
    if retain {
        let stored = codec::publish_with(publish, qos, 0, true);
        let expires = properties
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| tokio::time::Instant::now() + Duration::from_secs(u64::from(secs)));
        shared
            .retained
            .retain(topic, Retained { publish: stored, qos, properties: properties.cloned(), expires })
            .await;
    }
    shared.local.publish(topic, publish, qos, properties, from, true, ticket).await;
}

fn pubcomp_reason(known: bool) -> PubCompReason {
    if known { PubCompReason::Success } else { PubCompReason::PacketIdentifierNotFound }
}

/// Writes the answer to a publish the ACL denied (see `Inbound::deny`).
fn answer_denied(io: &mut Io, qos2: &mut HashSet<u16>, pkid: u16, qos: u8, v5: bool) -> Result<(), End> {
    match (v5, qos) {
        (true, 2) => io.write(Packet::PubRec(PubRec { pkid, reason: PubRecReason::NotAuthorized }, None)),
        (true, _) => io.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::NotAuthorized }, None)),
        (false, 1) => io.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)),
        (false, _) => acknowledge(io, qos2, pkid, qos, Outcome::Safe)?,
    }
    Ok(())
}

/// Writes the answer to one publish.
fn acknowledge(
    io: &mut Io,
    qos2: &mut HashSet<u16>,
    pkid: u16,
    qos: u8,
    outcome: Outcome,
) -> Result<(), End> {
    match (outcome, qos) {
        (Outcome::Safe, 1) => io.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)),
        (Outcome::Safe, _) => io.write(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None)),
        (Outcome::Rejected, _) if !io.v5() => return Err(End::Rejected),
        (Outcome::Rejected, 1) => {
            io.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::QuotaExceeded }, None));
        }
        (Outcome::Rejected, _) => {
            qos2.remove(&pkid);
            io.write(Packet::PubRec(PubRec { pkid, reason: PubRecReason::QuotaExceeded }, None));
        }
        (Outcome::TopicInvalid, _) => {
            io.write(Packet::PubAck(PubAck { pkid, reason: PubAckReason::TopicNameInvalid }, None))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn rules_see_only_the_properties_that_describe_the_message() {
        // Wire-only properties (alias, subscription ids) leave nothing for rules: no allocation.
        let wire_only = PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![1],
            ..PublishProperties::default()
        };
        assert_eq!(pub_props(&wire_only), None);
        let sent = PublishProperties {
            content_type: Some("application/json".to_owned()),
            correlation_data: Some(Bytes::from_static(b"c1")),
            user_properties: vec![("site".to_owned(), "plant-a".to_owned())],
            ..PublishProperties::default()
        };
        let props = pub_props(&sent).expect("properties a rule can read");
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c1"[..]));
        assert_eq!(props.user_properties, [("site".to_owned(), "plant-a".to_owned())]);
    }
}
