//! The MQTT wire, apart from any policy: codecs for both directions. Nothing here knows about
//! the pipeline, tokio or the buffer.

pub mod codec;
pub mod upstream;
