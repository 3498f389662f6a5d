//! Logging set-up: human-readable text on stderr by default, JSON lines on request.
//!
//! Text is coloured only when stderr is a terminal: a file or journald gets plain text. In
//! JSON, the `counters` summary (`name=value …`) becomes an object of numbers, so a log
//! pipeline can read `counters.upstream_failures` without parsing a string.

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().event_format(JsonLines).with_writer(std::io::stderr))
            .try_init(),
    };
    // A subscriber is already installed (tests): keep it.
    drop(result);
}

/// One JSON object a line: `timestamp`, `level`, the event's fields in order (`message`
/// first), `target` — tracing-subscriber's flattened layout — except that a `counters` field
/// is an object of numbers.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields =
            JsonFields(vec![("timestamp", timestamp.into()), ("level", meta.level().as_str().into())]);
        event.record(&mut fields);
        fields.0.push(("target", meta.target().into()));
        writer.write_char('{')?;
        for (idx, (name, value)) in fields.0.iter().enumerate() {
            if idx > 0 {
                writer.write_char(',')?;
            }
            write!(writer, "{}:{value}", serde_json::Value::from(*name))?;
        }
        writer.write_str("}\n")
    }
}

/// An event's fields as JSON values, in the order they were recorded.
struct JsonFields(Vec<(&'static str, serde_json::Value)>);

impl JsonFields {
    fn push_text(&mut self, field: &Field, text: String) {
        let value = match field.name() {
            "counters" => counters_object(&text).unwrap_or(serde_json::Value::String(text)),
            _ => serde_json::Value::String(text),
        };
        self.0.push((field.name(), value));
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push_text(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push_text(field, format!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push_text(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name(), value.into()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name(), value.into()));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.push((field.name(), value.into()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name(), value.into()));
    }
}

/// `"ingested=5 upstream_failures=2"` as `{"ingested":5,"upstream_failures":2}`; `None` if
/// the text is not such a list.
fn counters_object(text: &str) -> Option<serde_json::Value> {
    text.split_whitespace()
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_owned(), serde_json::Value::from(value.parse::<u64>().ok()?)))
        })
        .collect::<Option<serde_json::Map<_, _>>>()
        .map(serde_json::Value::Object)
}

/// Lets a repeated warning through at most once per 10 s, and says how many were folded in,
/// so a sustained problem (overflow, expiry, a refusing upstream) cannot flood the log.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(folded)` when this occurrence should be logged, `folded` being how many were
    /// suppressed since the last one; `None` when it should not.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// One [`LogThrottle`] per kind of warning, for a part shared by many tasks that logs several
/// kinds. Its lock guards only the throttles and is never held across an `.await`.
#[derive(Debug, Default)]
pub struct LogThrottles(Mutex<BTreeMap<&'static str, LogThrottle>>);

impl LogThrottles {
    /// [`LogThrottle::ready`] for the warnings of `kind`.
    pub fn ready(&self, kind: &'static str) -> Option<u64> {
        let mut throttles = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        throttles.entry(kind).or_default().ready(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Everything the JSON layer writes while `f` runs.
    fn json_lines(f: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = out.clone();
            move || SharedBuffer(out.clone())
        };
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().event_format(JsonLines).with_writer(writer));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_counters_are_numbers_and_other_fields_keep_their_types() {
        let text = json_lines(|| {
            let counters = "ingested=5 upstream_failures=54";
            tracing::info!(message = "stopped", counters = %counters, n = 3_u64, ok = true, path = "a \"b\"");
        });
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
        assert_eq!(line["message"], "stopped");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["counters"], serde_json::json!({"ingested": 5, "upstream_failures": 54}));
        assert_eq!(line["n"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["path"], "a \"b\"");
        assert!(line["timestamp"].as_str().is_some_and(|t| t.contains('T')), "{text}");
        assert!(text.starts_with("{\"timestamp\":"), "tracing-subscriber's field order: {text}");
    }

    #[test]
    fn counters_that_are_not_a_summary_stay_text() {
        assert_eq!(counters_object(""), Some(serde_json::json!({})));
        assert_eq!(counters_object("a=1 b"), None);
        assert_eq!(counters_object("a=x"), None);
    }
}
