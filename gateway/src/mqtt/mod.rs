//! The MQTT wire, apart from any policy: topic names and filters ([`topic`]), and codecs for
//! both directions. Nothing here knows about the pipeline, tokio or the buffer.
//!
//! [`topic`] is the `outpost-topic` crate, so that the rules crate (which cannot depend on the
//! gateway) validates and matches topics with the same code as the broker and the routes.

pub mod codec;
pub use outpost_topic as topic;
