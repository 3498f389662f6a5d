//! The body every simulated sensor publishes, shared by `fleet` (writer) and `verify` (reader).
//!
//! A reading names its device and carries a per-device sequence number, so the verifier can find
//! losses, duplicates and reordering without any other channel to the fleet. `pad` exists only to
//! reach a realistic payload size; it carries no information.

use serde::{Deserialize, Serialize};

/// One measurement from one simulated sensor.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SensorReading {
    /// The device id, equal to the sensor's MQTT client id (e.g. `sim-0001`).
    pub device: String,
    /// Per-device sequence number: 1 for the first reading, then increasing by 1.
    pub seq: u64,
    /// Wall-clock time the reading was handed to the MQTT client, in ms since the Unix epoch.
    pub ts_ms: u64,
    /// The metric name, e.g. `temp`.
    pub metric: String,
    /// The measured value.
    pub value: f64,
    /// Filler that brings the payload up to a target size.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pad: String,
}

/// The JSON text `,"pad":""` adds to a reading when `pad` is non-empty.
const PAD_FIELD_OVERHEAD: usize = r#","pad":"""#.len();

impl SensorReading {
    /// Encodes the reading as compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes; a non-finite `value` becomes `null`.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a reading from JSON.
    pub fn from_json(bytes: &[u8]) -> Result<SensorReading, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Sets `pad` so that `to_json()` is exactly `target_len` bytes long, when the unpadded
    /// reading leaves room for the pad field (9 bytes plus the filler); otherwise leaves it empty.
    pub fn pad_to(&mut self, target_len: usize) {
        self.pad.clear();
        let unpadded = self.to_json().len();
        if let Some(fill) = target_len.checked_sub(unpadded + PAD_FIELD_OVERHEAD) {
            self.pad = "x".repeat(fill);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> SensorReading {
        SensorReading {
            device: "sim-0001".to_string(),
            seq: 7,
            ts_ms: 1_700_000_000_000,
            metric: "temp".to_string(),
            value: 21.5,
            pad: String::new(),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let mut original = reading();
        assert_eq!(SensorReading::from_json(&original.to_json()).ok(), Some(original.clone()));
        original.pad_to(200);
        assert_eq!(SensorReading::from_json(&original.to_json()).ok(), Some(original));
    }

    #[test]
    fn empty_pad_is_omitted() {
        let json = String::from_utf8(reading().to_json()).unwrap_or_default();
        assert!(!json.contains("pad"), "{json}");
    }

    #[test]
    fn pads_to_the_target_size() {
        let mut padded = reading();
        padded.pad_to(200);
        assert_eq!(padded.to_json().len(), 200);

        let mut small_target = reading();
        small_target.pad_to(10);
        assert!(small_target.pad.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(SensorReading::from_json(b"not json").is_err());
        assert!(SensorReading::from_json(br#"{"device":"a"}"#).is_err());
    }
}
