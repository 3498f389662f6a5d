//! One upstream connection's protocol state, sans I/O: packet ids, keepalive, and what the
//! upstream's packets mean. It reads from and writes to byte buffers the caller owns, takes the
//! clock as an argument, and returns what happened; it never touches a socket and never calls
//! into the relay.
//!
//! # Invariants
//! - A packet id is in use from the moment its publish is encoded ([`Session::publish`]) until
//!   its PUBACK; no two publishes awaiting a PUBACK share one.
//! - A PUBACK for a packet id not in use is ignored: it cannot release anything.
//! - Pings go out every `keepalive` whatever the traffic; if no packet at all came back by the
//!   next one, the link is dead.

use std::collections::HashMap;

use bytes::BytesMut;
use tokio::time::Instant;

use super::{LinkLoss, Lost, peer};
use crate::mqtt::upstream::{
    Incoming, LinkParams, Message, TooLarge, encode_disconnect, encode_pingreq, encode_publish,
    parse_incoming,
};

/// What the upstream told us, as far as the caller needs to act on it.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<T> {
    /// The upstream answered the publish tracked as `value`. `rejected` holds the MQTT 5 reason
    /// when it refused the message.
    Acked { value: T, rejected: Option<String> },
    /// A PINGRESP: nothing to do; the session noted that the upstream answered.
    PingResp,
}

/// The protocol state of one connection. `T` is what the caller keeps per publish awaiting
/// its PUBACK; the session hands it back with the PUBACK, so the caller needs no map of its own.
#[derive(Debug)]
pub struct Session<T> {
    params: LinkParams,
    /// Encoded QoS 1 publishes awaiting their PUBACK, by packet id.
    inflight: HashMap<u16, T>,
    /// Where the search for a free packet id starts.
    next_pkid: u16,
    next_ping: Option<Instant>,
    ping_outstanding: bool,
    /// The upstream answered something (a PINGRESP or a PUBACK) on this connection.
    answered: bool,
}

impl<T> Session<T> {
    /// A session for a connection established at `now`.
    pub fn new(params: LinkParams, now: Instant) -> Session<T> {
        let keepalive = params.keepalive;
        Session {
            params,
            inflight: HashMap::new(),
            next_pkid: 1,
            next_ping: (!keepalive.is_zero()).then(|| now + keepalive),
            ping_outstanding: false,
            answered: false,
        }
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Publishes awaiting their PUBACK.
    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// What the caller tracks for each publish awaiting its PUBACK, in no particular order.
    pub fn in_flight(&self) -> impl Iterator<Item = &T> {
        self.inflight.values()
    }

    /// Whether the upstream answered anything yet: a PINGRESP, or a PUBACK for a publish of
    /// this session.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Asks the upstream to prove the connection works: a PINGREQ now, answered (or not)
    /// before anything else it sends back.
    pub fn probe(&mut self, out: &mut BytesMut) {
        encode_pingreq(out);
        self.ping_outstanding = true;
    }

    /// Appends one PUBLISH to `out`. QoS 1 takes a free packet id and tracks `value()` under
    /// it until its PUBACK; QoS 0 tracks nothing. Nothing is written or tracked when the
    /// upstream's maximum packet size does not allow it.
    pub fn publish(
        &mut self,
        out: &mut BytesMut,
        qos: u8,
        message: &Message<'_>,
        value: impl FnOnce() -> T,
    ) -> Result<(), TooLarge> {
        if qos == 0 {
            return encode_publish(out, &self.params, 0, 0, message);
        }
        let pkid = self.free_pkid();
        encode_publish(out, &self.params, qos, pkid, message)?;
        self.next_pkid = pkid % u16::MAX + 1;
        self.inflight.insert(pkid, value());
        Ok(())
    }

    /// The next packet id not awaiting a PUBACK. One exists: the send window keeps fewer than
    /// 65,535 publishes in flight.
    fn free_pkid(&self) -> u16 {
        let mut pkid = self.next_pkid;
        while self.inflight.contains_key(&pkid) {
            pkid = pkid % u16::MAX + 1;
        }
        pkid
    }

    /// Takes the next complete packet off `inbuf` that the caller must act on. `Ok(None)`:
    /// wait for more bytes. An error means the connection cannot go on: a malformed or
    /// unexpected packet (we end it), or the upstream's DISCONNECT (it ended it).
    pub fn receive(&mut self, inbuf: &mut BytesMut) -> Result<Option<Received<T>>, Lost> {
        loop {
            let incoming =
                parse_incoming(inbuf, self.params.version).map_err(|error| (LinkLoss::Local, error))?;
            let Some(incoming) = incoming else { return Ok(None) };
            // Any packet proves the link alive: a PINGREQ queued behind a slow link's backlog
            // may be answered long after the acks that came before it.
            self.ping_outstanding = false;
            match incoming {
                Incoming::PubAck { pkid, rejected } => {
                    if let Some(value) = self.inflight.remove(&pkid) {
                        self.answered = true;
                        return Ok(Some(Received::Acked { value, rejected }));
                    }
                }
                Incoming::PingResp => {
                    self.answered = true;
                    return Ok(Some(Received::PingResp));
                }
                Incoming::Disconnect(reason) => return Err(peer(reason)),
            }
        }
    }

    /// When [`Session::keepalive`] must run next, if the connection has a keepalive.
    pub fn next_ping(&self) -> Option<Instant> {
        self.next_ping
    }

    /// At `next_ping`: a PINGREQ into `out`, or the verdict that the last one went unanswered.
    /// Pings go out regardless of traffic, so a silently dead (half-open) link is noticed while
    /// publishes are still being written into it.
    pub fn keepalive(&mut self, now: Instant, out: &mut BytesMut) -> Result<(), Lost> {
        if self.next_ping.is_none_or(|t| now < t) {
            return Ok(());
        }
        if self.ping_outstanding {
            return Err((
                LinkLoss::Local,
                "no PINGRESP within upstream.keepalive: the link is dead".to_owned(),
            ));
        }
        encode_pingreq(out);
        self.ping_outstanding = true;
        self.next_ping = Some(now + self.params.keepalive);
        Ok(())
    }

    /// Ends the session: a DISCONNECT into `out`, after everything already in it.
    pub fn close(self, out: &mut BytesMut) {
        encode_disconnect(out);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::MqttVersion;

    fn params(keepalive: Duration) -> LinkParams {
        LinkParams { version: MqttVersion::V311, receive_max: 100, max_packet: usize::MAX, keepalive }
    }

    fn puback(pkid: u16) -> BytesMut {
        let mut wire = BytesMut::new();
        rumqttc::mqttbytes::v4::PubAck::new(pkid).write(&mut wire).expect("write");
        wire
    }

    /// Packet ids skip those still in use, wrap after 65,535, never use 0, and each PUBACK
    /// hands back what was tracked under its id, once.
    #[test]
    fn packet_ids_are_free_and_acks_return_what_was_tracked() {
        let now = Instant::now();
        let mut session: Session<&str> = Session::new(params(Duration::ZERO), now);
        let mut out = BytesMut::new();
        session.publish(&mut out, 1, &Message::new("t", b"a", 1), || "a").expect("fits");
        session
            .publish(&mut out, 0, &Message::new("t", b"q0", 2), || unreachable!("QoS 0 is not tracked"))
            .expect("fits");
        session.publish(&mut out, 1, &Message::new("t", b"b", 3), || "b").expect("fits");
        assert_eq!(session.outstanding(), 2);
        let mut pkids = Vec::new();
        while let Ok(rumqttc::Packet::Publish(p)) = rumqttc::mqttbytes::v4::Packet::read(&mut out, usize::MAX)
        {
            pkids.push(p.pkid);
        }
        assert_eq!(pkids, vec![1, 0, 2]);

        let mut inbuf = puback(2);
        inbuf.extend_from_slice(&puback(2));
        inbuf.extend_from_slice(&puback(9));
        assert_eq!(session.receive(&mut inbuf), Ok(Some(Received::Acked { value: "b", rejected: None })));
        assert_eq!(session.receive(&mut inbuf), Ok(None), "a repeated or unknown PUBACK releases nothing");
        assert!(inbuf.is_empty());
        assert!(session.answered());

        // Id 1 is still in use when the search wraps around to it.
        session.next_pkid = u16::MAX;
        session.publish(&mut out, 1, &Message::new("t", b"c", 4), || "c").expect("fits");
        session.publish(&mut out, 1, &Message::new("t", b"d", 5), || "d").expect("fits");
        let mut pkids = Vec::new();
        while let Ok(rumqttc::Packet::Publish(p)) = rumqttc::mqttbytes::v4::Packet::read(&mut out, usize::MAX)
        {
            pkids.push(p.pkid);
        }
        assert_eq!(pkids, vec![u16::MAX, 2]);
    }

    /// A refused publish is neither written nor tracked, and does not use up a packet id.
    #[test]
    fn a_publish_too_large_takes_no_packet_id() {
        let mut p = params(Duration::ZERO);
        p.max_packet = 50;
        let mut session: Session<u32> = Session::new(p, Instant::now());
        let mut out = BytesMut::new();
        assert!(session.publish(&mut out, 1, &Message::new("t", &[0; 100], 1), || 1).is_err());
        assert!(out.is_empty() && session.outstanding() == 0);
        session.publish(&mut out, 1, &Message::new("t", b"x", 2), || 2).expect("fits");
        let Ok(rumqttc::Packet::Publish(p)) = rumqttc::mqttbytes::v4::Packet::read(&mut out, usize::MAX)
        else {
            panic!("a publish")
        };
        assert_eq!(p.pkid, 1);
    }

    /// A PINGREQ every keepalive; the link is dead only when nothing at all came back between
    /// two of them, and any packet counts as an answer.
    #[test]
    fn keepalive_pings_and_declares_a_silent_link_dead() {
        let start = Instant::now();
        let keepalive = Duration::from_secs(10);
        let mut session: Session<()> = Session::new(params(keepalive), start);
        let mut out = BytesMut::new();
        session.keepalive(start + Duration::from_secs(9), &mut out).expect("not due");
        assert!(out.is_empty());
        session.keepalive(start + keepalive, &mut out).expect("a ping");
        assert_eq!(&out[..], &[0xC0, 0x00]);
        assert_eq!(session.next_ping(), Some(start + 2 * keepalive));
        // An unknown PUBACK is an answer too: the link is alive.
        session.receive(&mut puback(7)).expect("valid");
        session.keepalive(start + 2 * keepalive, &mut out).expect("answered: another ping");
        let (loss, reason) = session.keepalive(start + 3 * keepalive, &mut out).expect_err("dead");
        assert_eq!(loss, LinkLoss::Local);
        assert!(reason.contains("upstream.keepalive"), "{reason}");
    }

    /// A DISCONNECT means the upstream ended the connection; garbage means we end it.
    #[test]
    fn disconnects_are_the_peers_and_garbage_is_ours() {
        let mut session: Session<()> = Session::new(params(Duration::ZERO), Instant::now());
        let (loss, _) = session.receive(&mut BytesMut::from(&[0xE0u8, 0x00][..])).expect_err("ended");
        assert_eq!(loss, LinkLoss::PeerClosed);
        let (loss, _) =
            session.receive(&mut BytesMut::from(&[0x30u8, 0x03, 0, 1, b't'][..])).expect_err("garbage");
        assert_eq!(loss, LinkLoss::Local);
        let mut out = BytesMut::new();
        session.close(&mut out);
        assert_eq!(&out[..], &[0xE0, 0x00]);
    }
}
