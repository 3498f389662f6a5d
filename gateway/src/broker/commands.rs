//! The inbound connection's way into the local broker: commands from the cloud
//! (`[[upstream.subscribe]]`), already mapped to local topics by `uplink::inbound`.
//!
//! A command enters like a publish of a trusted-but-checked local client: its topic must be
//! one the broker would take from a sensor (`broker.max_topic_levels`, `max_topic_length`,
//! no control characters, and no `$` topic, which only the broker publishes), and with
//! `broker.acl_file` the ACL must let `upstream.inbound_acl_user` write it (its `user`
//! section, and the `pattern`s with `%u` = that user and `%c` = the inbound client id).
//! Then it goes where a sensor's publish goes: the retained store if it came retained, every
//! matching local subscriber (QoS ≤ 1, waiting up to `FULL_QUEUE_WAIT` for a full queue as a
//! sensor would), and the route stage as an event marked `from_upstream`, so rules see it and
//! no route or rule sends it back upstream.
//!
//! # Invariants
//! - [`Commands::deliver`] returns only once the command is in every local queue it goes to
//!   and in the route stage's channel: the caller acknowledges it upstream after that, so a
//!   crash before it means the upstream's persistent session delivers it again.
//! - A refused command touches nothing: not retained, not queued, not routed.
//! - It holds the broker's [`Shared`], and so a sender of the route stage's input: its owner
//!   must stop on the cancellation signal, or the route stage would never see its input close.

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::Publish;

use super::Shared;
use super::access::Permissions;
use crate::metrics::Metrics;
use crate::mqtt::codec;
use crate::mqtt::topic::invalid_topic;

/// What became of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Retained if asked, queued for this many local subscribers, handed to the route stage.
    Delivered { local: usize },
    /// The topic is no topic the local broker takes (counted `inbound_refused_mapping`).
    InvalidTopic(&'static str),
    /// The ACL does not let `upstream.inbound_acl_user` write it (counted
    /// `inbound_refused_acl`).
    Denied,
    /// The route stage is gone: the gateway is stopping. Not acknowledged upstream, so the
    /// upstream delivers it again after the restart.
    Stopping,
}

/// The inbound connection's door into the local broker (see the module docs).
pub struct Commands {
    shared: Arc<Shared>,
    permissions: Permissions,
    client_id: Arc<str>,
}

impl Commands {
    pub(super) fn new(shared: Arc<Shared>, acl_user: &str, client_id: &str) -> Commands {
        let client_id: Arc<str> = Arc::from(client_id);
        let permissions = shared.access.permissions(Some(Arc::from(acl_user)), Arc::clone(&client_id));
        Commands { shared, permissions, client_id }
    }

    /// The counters, for what the caller refuses before the door.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Delivers one command to local subscribers and the rules, or refuses it and says why.
    /// Counts what it did; logging is the caller's (it knows the upstream topic).
    pub async fn deliver(&mut self, topic: &str, payload: Bytes, qos: u8, retain: bool) -> Delivery {
        let shared = &*self.shared;
        let counters = shared.metrics.counters();
        let invalid = if topic.starts_with('$') {
            Some("a `$` topic, which only the broker itself publishes")
        } else {
            invalid_topic(topic, &shared.cfg.topic_policy()).map(|why| why.as_str())
        };
        if let Some(why) = invalid {
            Metrics::add(&counters.inbound_refused_mapping, 1);
            return Delivery::InvalidTopic(why);
        }
        if !self.permissions.may_write(&shared.access, topic) {
            Metrics::add(&counters.inbound_refused_acl, 1);
            return Delivery::Denied;
        }
        let qos = qos.min(1);
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload.clone(), retain);
        if retain {
            let stored = codec::publish_with(&publish, qos, 0, true);
            shared
                .retained
                .retain(
                    topic,
                    super::retained::Retained { publish: stored, qos, properties: None, expires: None },
                )
                .await;
        }
        let local = shared.local.publish(topic, &publish, qos, None, None, true, None).await;
        let mut event = shared.intake.new_event(topic.to_owned(), payload, qos, &self.client_id);
        event.from_upstream = true;
        event.retain = retain;
        if !shared.intake.hand_over(event).await {
            return Delivery::Stopping;
        }
        Metrics::add(&counters.inbound_delivered, 1);
        Delivery::Delivered { local }
    }
}
