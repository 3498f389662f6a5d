//! The MQTT wire, apart from any policy: topic names and filters ([`topic`]), the wire format
//! both directions share ([`wire`]: fixed header, variable byte integers, reason-code names,
//! peeks), rumqttd's codecs for the sensor side ([`codec`]) and the upstream direction's
//! packets ([`upstream`]). Nothing here knows about the
//! pipeline, tokio or the buffer.
//!
//! [`topic`] is the `outpost-topic` crate, so that the rules crate (which cannot depend on the
//! gateway) validates and matches topics with the same code as the broker and the routes.

pub mod codec;
pub mod upstream;
pub mod wire;
pub use outpost_topic as topic;
