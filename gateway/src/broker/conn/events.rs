//! Client events for rules (`FROM "$events/client_connected"` and the others): one call per
//! event site, each building its event only when some rule reads that kind
//! ([`Intake::wants`](crate::broker::intake::Intake::wants)), and handing it over without
//! waiting ([`Intake::report`](crate::broker::intake::Intake::report)).
//!
//! The sites: the CONNACK (accepted, and refused with a reason code), the connection's end
//! (with why it ended, in EMQX's words), a subscription granted, an unsubscription, and two
//! places a publish is dropped at the broker — the ACL denies it (`not_authorized`) or its
//! topic breaks the topic policy and MQTT 5 lets it be refused alone (`topic_name_invalid`).
//! Field names and reasons are EMQX's (`emqx_rule_events.erl`, `emqx_reason_codes.erl`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use outpost_rules::{EventKind, Lifecycle};
use rumqttd::protocol::ConnectReturnCode;

use super::{Client, End};
use crate::broker::Shared;
use crate::event::now_ms;

/// What a connection's events say about its client besides its id and address; kept from
/// the CONNECT for the disconnect.
#[derive(Debug, Clone)]
pub(super) struct About {
    pub(super) username: Option<Arc<str>>,
    /// The listener's address, as the socket saw it.
    pub(super) sockname: Option<SocketAddr>,
    pub(super) proto_ver: u8,
    /// Unix milliseconds, when the CONNACK was sent.
    pub(super) connected_at: u64,
}

/// What a CONNECT asked for, for `client_connected` and `client_connack`.
pub(super) struct Asked {
    pub(super) keepalive: u16,
    pub(super) clean_start: bool,
    pub(super) expiry_interval: u32,
    pub(super) receive_maximum: Option<u16>,
}

fn lifecycle(kind: EventKind, client: &Client) -> Lifecycle {
    let about = &client.about;
    let mut info = Lifecycle::new(kind);
    info.peername = Some(client.peer.to_string());
    info.sockname = about.sockname.map(|a| a.to_string());
    info.proto_name = Some("MQTT".to_owned());
    info.proto_ver = Some(about.proto_ver);
    info.connected_at = Some(about.connected_at);
    info
}

fn report(client: &Client, info: Lifecycle, message: (String, Bytes, u8)) {
    let intake = &client.shared.intake;
    let event =
        intake.client_event(info, &client.id, client.about.username.clone(), &client.peerhost, message);
    intake.report(event);
}

/// An event about the client itself carries its event topic as its topic, so a dead letter
/// or `outpost tap` names it; rules read its `topic` as NULL, as EMQX gives none.
fn no_message(kind: EventKind) -> (String, Bytes, u8) {
    (kind.topic().to_owned(), Bytes::new(), 0)
}

/// The CONNACK accepted the client: `client_connack` (`success`), then `client_connected`.
pub(super) fn connected(client: &Client, asked: &Asked) {
    let intake = &client.shared.intake;
    for kind in [EventKind::ClientConnack, EventKind::ClientConnected] {
        if !intake.wants(kind) {
            continue;
        }
        let mut info = lifecycle(kind, client);
        info.keepalive = Some(asked.keepalive);
        info.clean_start = Some(asked.clean_start);
        info.expiry_interval = Some(asked.expiry_interval);
        if kind == EventKind::ClientConnack {
            info.reason = Some("success".to_owned());
        } else {
            info.receive_maximum = asked.receive_maximum;
        }
        report(client, info, no_message(kind));
    }
}

/// A CONNECT refused with a reason code: `client_connack` with its name. The client never
/// connected, so it has no `connected_at`.
pub(super) fn refused(
    shared: &Shared,
    peer: SocketAddr,
    v5: bool,
    client_id: &str,
    username: Option<&str>,
    code: ConnectReturnCode,
) {
    if !shared.intake.wants(EventKind::ClientConnack) {
        return;
    }
    let mut info = Lifecycle::new(EventKind::ClientConnack);
    info.reason = Some(connack_reason(code).to_owned());
    info.peername = Some(peer.to_string());
    info.proto_name = Some("MQTT".to_owned());
    info.proto_ver = Some(if v5 { 5 } else { 4 });
    let id: Arc<str> = Arc::from(client_id);
    let peerhost: Arc<str> = Arc::from(peer.ip().to_canonical().to_string());
    let event = shared.intake.client_event(
        info,
        &id,
        username.map(Arc::from),
        &peerhost,
        no_message(EventKind::ClientConnack),
    );
    shared.intake.report(event);
}

/// The connection ended: `client_disconnected` with why.
pub(super) fn disconnected(client: &Client, end: &End) {
    if !client.shared.intake.wants(EventKind::ClientDisconnected) {
        return;
    }
    let mut info = lifecycle(EventKind::ClientDisconnected, client);
    info.reason = Some(disconnect_reason(end).to_owned());
    info.disconnected_at = Some(now_ms());
    report(client, info, no_message(EventKind::ClientDisconnected));
}

/// A subscription granted (`session_subscribed`) or removed (`session_unsubscribed`):
/// `topic` is the filter, `qos` the granted QoS.
pub(super) fn subscription(client: &Client, kind: EventKind, filter: &str, qos: u8) {
    if !client.shared.intake.wants(kind) {
        return;
    }
    report(client, lifecycle_of_session(kind, client), (filter.to_owned(), Bytes::new(), qos));
}

/// Whether some rule reads `kind` (so a site can skip gathering what the event needs).
pub(super) fn wanted(client: &Client, kind: EventKind) -> bool {
    client.shared.intake.wants(kind)
}

fn lifecycle_of_session(kind: EventKind, client: &Client) -> Lifecycle {
    let mut info = Lifecycle::new(kind);
    info.peername = Some(client.peer.to_string());
    info
}

/// A publish the broker dropped: `message_dropped` with the publish's topic, payload and QoS.
pub(super) fn dropped(client: &Client, topic: &str, payload: &Bytes, qos: u8, reason: &str) {
    if !client.shared.intake.wants(EventKind::MessageDropped) {
        return;
    }
    let mut info = lifecycle_of_session(EventKind::MessageDropped, client);
    info.reason = Some(reason.to_owned());
    report(client, info, (topic.to_owned(), payload.clone(), qos));
}

/// Why a connection ended, in EMQX's words where EMQX has them (`emqx_rule_events:reason/1`
/// gives the atom of the channel's shutdown reason).
fn disconnect_reason(end: &End) -> &'static str {
    match end {
        End::Normal(_) | End::NormalWithWill(_) => "normal",
        End::Eof | End::Io(_) => "tcp_closed",
        End::Keepalive => "keepalive_timeout",
        End::Takeover => "takenover",
        End::Protocol(_) => "protocol_error",
        End::Malformed(_) => "malformed_packet",
        End::Oversize(_) => "frame_too_large",
        End::ReceiveMaximum => "receive_maximum_exceeded",
        End::Shutdown => "server_shutting_down",
        End::Rejected => "quota_exceeded",
    }
}

/// A CONNACK code's name as EMQX's `emqx_reason_codes:name/1` gives it.
fn connack_reason(code: ConnectReturnCode) -> &'static str {
    use ConnectReturnCode as C;
    match code {
        C::Success => "success",
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => "unsupported_protocol_version",
        C::ClientIdentifierNotValid => "client_identifier_not_valid",
        C::ServiceUnavailable | C::ServerUnavailable => "server_unavailable",
        C::UnspecifiedError => "unspecified_error",
        C::MalformedPacket => "malformed_packet",
        C::ProtocolError => "protocol_error",
        C::ImplementationSpecificError => "implementation_specific_error",
        C::BadUserNamePassword => "bad_username_or_password",
        C::NotAuthorized => "not_authorized",
        C::ServerBusy => "server_busy",
        C::Banned => "banned",
        C::BadAuthenticationMethod => "bad_authentication_method",
        C::TopicNameInvalid => "topic_name_invalid",
        C::PacketTooLarge => "packet_too_large",
        C::QuotaExceeded => "quota_exceeded",
        C::PayloadFormatInvalid => "payload_format_invalid",
        C::RetainNotSupported => "retain_not_supported",
        C::QoSNotSupported => "qos_not_supported",
        C::UseAnotherServer => "use_another_server",
        C::ServerMoved => "server_moved",
        C::ConnectionRateExceeded => "connection_rate_exceeded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_emqx_names() {
        assert_eq!(disconnect_reason(&End::Normal(None)), "normal");
        assert_eq!(disconnect_reason(&End::Eof), "tcp_closed");
        assert_eq!(disconnect_reason(&End::Keepalive), "keepalive_timeout");
        assert_eq!(disconnect_reason(&End::Takeover), "takenover");
        assert_eq!(connack_reason(ConnectReturnCode::BadUserNamePassword), "bad_username_or_password");
        assert_eq!(connack_reason(ConnectReturnCode::NotAuthorized), "not_authorized");
    }
}
