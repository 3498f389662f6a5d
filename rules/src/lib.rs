//! Outpost's rule engine.
//!
//! **Architecture Invariant:** this crate is pure. It knows nothing about tokio, sockets,
//! files or the gateway's pipeline; it takes values in and gives values out, so it can be
//! tested exhaustively and can never block or crash the gateway.
//!
//! Today it holds the MQTT topic model that every rule's `FROM` clause and every bridge
//! route is built on ([`TopicFilter`], [`Topic`]). The SQL rule language lands on top of it.
//!
//! # Layout
//! - [`topic`]: validated topic names and topic filters, and filter matching.

pub mod topic;

pub use topic::{Topic, TopicError, TopicFilter};
