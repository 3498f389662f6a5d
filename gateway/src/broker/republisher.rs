//! The route stage's way into the local broker: rules' `republish` actions (actuators).
//!
//! # Invariants
//! - It never waits and holds no sender of events: the route stage owns it and must see its
//!   input close at shutdown, and must not be slowed down by a local subscriber.

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::Publish;

use super::local::Local;

/// Publishes into the local broker for rules' `republish` actions.
pub struct Republisher {
    local: Arc<Local>,
}

impl Republisher {
    pub(super) fn new(local: Arc<Local>) -> Republisher {
        Republisher { local }
    }

    /// Queues the publish (QoS 0) for local subscribers without waiting: a subscriber whose
    /// queue is full misses it, counted as `local_dropped`. Never fails.
    pub fn try_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let publish =
            Publish::new(Bytes::copy_from_slice(topic.as_bytes()), Bytes::copy_from_slice(payload), false);
        self.local.publish_now(topic, &publish, None);
        Ok(())
    }
}
