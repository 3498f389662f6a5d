//! The body every simulated sensor publishes, shared by `fleet` (writer) and `verify` (reader).
//!
//! A reading names its device and carries a per-device sequence number, so the verifier can find
//! losses, duplicates and reordering without any other channel to the fleet. `pad` exists only to
//! reach a realistic payload size; it carries no information.
//!
//! A reading is encoded as JSON or CBOR ([`PayloadFormat`]). [`SensorReading::decode`] tells them
//! apart by the first byte: a JSON reading is an object and starts with `{`, a CBOR reading is a
//! map and starts with a byte in `0xa0..=0xbf`.

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
    /// The same time in µs since the Unix epoch, for sub-millisecond latency; 0 (and left out of
    /// the encoding) when unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ts_us: u64,
    /// The metric name, e.g. `temp`.
    pub metric: String,
    /// The measured value.
    pub value: f64,
    /// Filler that brings the payload up to a target size.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pad: String,
}

/// How a reading is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// Compact JSON text.
    #[default]
    Json,
    /// CBOR (RFC 8949), a map with the same field names.
    Cbor,
}

/// Why a payload is not a reading.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON reading: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid CBOR reading: {0}")]
    Cbor(String),
    #[error("neither a JSON object nor a CBOR map (first byte {0:#04x})")]
    Unknown(u8),
    #[error("empty payload")]
    Empty,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// The JSON text `,"pad":""` adds to a reading when `pad` is non-empty.
const PAD_FIELD_OVERHEAD: usize = r#","pad":"""#.len();

impl SensorReading {
    /// Encodes the reading in `format`.
    pub fn encode(&self, format: PayloadFormat) -> Vec<u8> {
        match format {
            PayloadFormat::Json => self.to_json(),
            PayloadFormat::Cbor => self.to_cbor(),
        }
    }

    /// Decodes a JSON or CBOR reading, telling them apart by the first byte.
    pub fn decode(bytes: &[u8]) -> Result<SensorReading, DecodeError> {
        let first =
            bytes.iter().copied().find(|byte| !byte.is_ascii_whitespace()).ok_or(DecodeError::Empty)?;
        match first {
            b'{' => Ok(SensorReading::from_json(bytes)?),
            0xa0..=0xbf => SensorReading::from_cbor(bytes),
            other => Err(DecodeError::Unknown(other)),
        }
    }

    /// Encodes the reading as CBOR.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(256);
        // Writing strings and numbers into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut bytes);
        bytes
    }

    /// Decodes a reading from CBOR.
    pub fn from_cbor(bytes: &[u8]) -> Result<SensorReading, DecodeError> {
        ciborium::from_reader(bytes).map_err(|error| DecodeError::Cbor(error.to_string()))
    }

    /// Sets `pad` so that the reading encoded in `format` is `target_len` bytes long, or as close
    /// below it as the encoding allows; leaves it empty when the unpadded reading is too long.
    pub fn pad_to_format(&mut self, target_len: usize, format: PayloadFormat) {
        match format {
            PayloadFormat::Json => self.pad_to(target_len),
            PayloadFormat::Cbor => {
                self.pad.clear();
                // The key and the string header take a few bytes; their size depends on the
                // pad's length, so shrink the pad until the whole fits.
                let unpadded = self.to_cbor().len();
                let Some(mut fill) = target_len.checked_sub(unpadded + "pad".len() + 2) else { return };
                loop {
                    self.pad = "x".repeat(fill);
                    let len = self.to_cbor().len();
                    if len <= target_len || fill == 0 {
                        break;
                    }
                    fill = fill.saturating_sub(len - target_len);
                }
            }
        }
    }

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
            ts_us: 1_700_000_000_000_123,
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
    fn round_trips_through_cbor_and_detects_the_format() {
        let mut original = reading();
        for format in [PayloadFormat::Json, PayloadFormat::Cbor] {
            original.pad_to_format(200, format);
            let bytes = original.encode(format);
            assert!(bytes.len() <= 200 && bytes.len() >= 196, "{format:?}: {}", bytes.len());
            assert_eq!(SensorReading::decode(&bytes).ok(), Some(original.clone()), "{format:?}");
        }
        assert!(matches!(SensorReading::decode(b""), Err(DecodeError::Empty)));
        assert!(matches!(SensorReading::decode(b"online"), Err(DecodeError::Unknown(b'o'))));
        assert!(matches!(SensorReading::decode(&[0xa1, 0x00]), Err(DecodeError::Cbor(_))));
    }

    #[test]
    fn old_readings_without_microseconds_decode() {
        let json = br#"{"device":"a","seq":1,"ts_ms":5,"metric":"m","value":1.0}"#;
        assert_eq!(SensorReading::from_json(json).map(|reading| reading.ts_us).ok(), Some(0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(SensorReading::from_json(b"not json").is_err());
        assert!(SensorReading::from_json(br#"{"device":"a"}"#).is_err());
    }
}
