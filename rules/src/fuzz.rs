//! The entry functions of the fuzz targets in `rules/fuzz/`, one per target: each target is one
//! call into here, and `rules/tests/fuzz_corpus.rs` calls the same function on every committed
//! corpus file and every crash reproducer (`rules/fuzz/{corpus,regressions}/`), so the normal
//! test suite replays what the fuzzers found on stable Rust.
//!
//! Every function takes arbitrary bytes and must return; a panic or a failed assertion (what
//! the code promises on every input) is a finding. Not part of the crate's API.

use crate::payload::{Decoded, FieldSlots, json_fields};
use crate::{PayloadFormat, RuleSet, TableSources, Value};

/// The rules compiler, on the input as a whole rules file and as the SQL of one rule.
pub fn parse_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let tables = TableSources::new().with_text("devices.csv", "device,site\nd1,a\n");
    let _ = RuleSet::compile(text, &tables);
    let escaped = text.replace('\'', "");
    let rules = format!(
        "[[table]]\nname = \"devices\"\nfile = \"devices.csv\"\n[[rule]]\nname = \"f\"\nsql = '''{escaped}'''\n[[rule.action]]\ntype = \"drop\"\n"
    );
    let _ = RuleSet::compile(&rules, &tables);
}

/// Field names the payload probes read: a few (found by a linear scan) and many (by hash),
/// ASCII and not.
const FIELD_NAMES: [&[&str]; 2] = [
    &["a", "temp", "é", ""],
    &["a", "b", "c", "d", "e", "f", "g", "h", "i", "temp", "device", "é", "\u{1F600}"],
];

fn field_slots() -> Vec<(FieldSlots, &'static [&'static str])> {
    FIELD_NAMES
        .iter()
        .map(|names| {
            let mut slots = FieldSlots::default();
            for name in names.iter() {
                slots.intern(name);
            }
            (slots, *names)
        })
        .collect()
}

/// The payload as the engine decodes it once per event (`payload::Decoded`), in every format,
/// checked against the invariants of `payload.rs`.
fn decode_every_way(data: &[u8], fields: &FieldSlots) {
    for format in [PayloadFormat::Auto, PayloadFormat::Json, PayloadFormat::Cbor, PayloadFormat::Raw] {
        let decoded = Decoded::new(data, Some(fields));
        if let Ok(view) = decoded.get(format) {
            let _ = view.whole();
            let _ = decoded.is_cbor(format);
        }
        let _ = Decoded::new(data, None).get(format).map(|view| view.whole().to_json_string());
    }
}

/// JSON payloads: the whole decoding (`Value::from_json`), the field decoding (its scanner fast
/// path and the serde_json reference) and what `payload.rs` promises between them: the
/// decodings agree on every field a rule can read, and the field decoding refuses nothing the
/// whole decoding accepts. A decoded value written as JSON reads back as itself.
pub fn payload_json(data: &[u8]) {
    let whole = Value::from_json(data);
    for (fields, names) in &field_slots() {
        let slots = json_fields(data, fields);
        if let Ok(value) = &whole {
            let slots = slots.unwrap_or_else(|e| panic!("whole decoding took it, field decoding said {e}"));
            for name in names.iter() {
                let slot = fields.slot(name).expect("interned");
                let expected = match value {
                    Value::Object(_) => value.get(name).unwrap_or(&Value::Null),
                    _ => &Value::Null,
                };
                assert_eq!(&slots[slot], expected, "field {name:?}");
            }
        }
        decode_every_way(data, fields);
    }
    if let Ok(value) = &whole {
        let text = value.to_json_string();
        let again =
            Value::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("{text} does not read back: {e}"));
        assert!(same_within_an_ulp(&again, value), "{text}: {again:?} vs {value:?}");
    }
}

/// Equal, except that floats may differ in their last bit: serde_json, built without its
/// `float_roundtrip` feature, reads some decimal numbers one ulp off (its documented trade of
/// precision for speed), so `1844674407374775.13` and the `1844674407374775.0` it is written
/// back as read as neighbouring floats.
fn same_within_an_ulp(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits().abs_diff(y.to_bits()) <= 1 || x == y,
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_within_an_ulp(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs.iter().zip(ys).all(|((kx, x), (ky, y))| kx == ky && same_within_an_ulp(x, y))
        }
        _ => a == b,
    }
}

/// CBOR payloads (`Value::from_cbor`, as the engine decodes `payload = "cbor"` and auto-detected
/// CBOR): a decoded value encodes (`Value::to_cbor`) to bytes that decode to a value that
/// encodes the same, and it can be written as JSON.
pub fn payload_cbor(data: &[u8]) {
    if let Ok(value) = Value::from_cbor(data) {
        let encoded = value.to_cbor();
        let again = Value::from_cbor(&encoded)
            .unwrap_or_else(|e| panic!("{value:?} encoded to CBOR that fails: {e}"));
        assert_eq!(again.to_cbor(), encoded, "{value:?}");
        let _ = value.to_json_string();
    }
    for (fields, _) in &field_slots() {
        decode_every_way(data, fields);
    }
}

/// Runs `entry` on every committed input of one fuzz target: the files of
/// `<fuzz_dir>/corpus/<target>/` and `<fuzz_dir>/regressions/<target>/`, in name order. Fails
/// naming each file that panicked, or when the target has no committed input at all. The
/// replay tests of this crate and of the gateway share it.
#[track_caller]
pub fn replay_corpus(fuzz_dir: &std::path::Path, target: &str, entry: fn(&[u8])) {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let mut ran = 0;
    let mut failed = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.expect("read a corpus entry").path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("read a corpus file");
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(ran > 0, "no corpus for fuzz target {target} under {}", fuzz_dir.display());
    assert!(failed.is_empty(), "fuzz target {target} fails on:\n{}", failed.join("\n"));
}
