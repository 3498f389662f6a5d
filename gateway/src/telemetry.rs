//! Logging set-up: human-readable text on stderr by default, JSON lines on request.
//!
//! Text is coloured only when stderr is a terminal: a file or journald gets plain text. In
//! JSON, the `counters` summary (`name=value …`) becomes an object of numbers, so a log
//! pipeline can read `counters.upstream_failures` without parsing a string.
//!
//! # Log cadence
//! A gateway runs unattended for weeks, often offline, on flash that wears; its log must stay
//! readable after a week of the same problem. So nothing that can repeat per event or per
//! retry is logged each time:
//! - a problem that lasts across retries (the upstream unreachable, buffer commits failing) is
//!   an [`Episode`]: one line when it starts (with its reason), a reminder every
//!   [`reminder_every`] with the attempts so far, one line when it ends (after how long);
//! - a warning that can fire per event or per client ([`LogThrottle`]) is logged the first
//!   time, then at most once per [`reminder_every`] with how many were folded in.
//!
//! [`reminder_every`] is 10 minutes: a week-long outage costs about a thousand lines per
//! problem instead of one per attempt (the upstream's reconnects alone were ~200,000 a day),
//! and `journalctl --since -15min` still shows every problem that holds. Exact numbers are in
//! the counters (`/metrics`, the `counters` line every minute).

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

/// How often a lasting problem is logged again (see "Log cadence" in the module docs).
pub const REMINDER_EVERY: Duration = Duration::from_secs(600);

/// Hidden setting for tests: the reminder cadence in milliseconds, so a test can run an
/// hour-long outage's worth of reminders in seconds. Not a config key: operators have no
/// reason to make the log noisier, and the counters carry the detail.
pub const REMINDER_ENV: &str = "OUTPOST_LOG_REMINDER_MS";

/// [`REMINDER_EVERY`], or `OUTPOST_LOG_REMINDER_MS` when set (read once).
pub fn reminder_every() -> Duration {
    static EVERY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var(REMINDER_ENV)
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map_or(REMINDER_EVERY, Duration::from_millis)
    })
}

/// Lets a repeated warning through the first time, then at most once per
/// [`reminder_every`], saying how many were folded in, so a sustained problem (overflow,
/// expiry, a refusing upstream, throttled sensors, refused clients) cannot flood the log.
#[derive(Debug)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
    every: Duration,
}

impl Default for LogThrottle {
    fn default() -> LogThrottle {
        LogThrottle::every(reminder_every())
    }
}

impl LogThrottle {
    pub fn every(every: Duration) -> LogThrottle {
        LogThrottle { last: None, suppressed: 0, every }
    }

    /// `Some(folded)` when this occurrence should be logged, `folded` being how many were
    /// suppressed since the last one; `None` when it should not.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A problem that lasts across retries: logged when it starts, reminded every
/// [`reminder_every`] with the failed attempts so far, logged when it ends. The clock is
/// passed in; the caller writes the lines, with what it knows (reason, backlog).
#[derive(Debug)]
pub struct Episode {
    /// When the problem started, while it lasts.
    since: Option<Instant>,
    /// Failed attempts since it started (the first included).
    attempts: u64,
    next_reminder: Option<Instant>,
    every: Duration,
}

/// What one failed attempt asks the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The problem starts now: log it with its reason.
    Started,
    /// It still holds: log a reminder.
    Remind { lasted: Duration, attempts: u64 },
    /// Nothing to log (debug level at most).
    Quiet,
}

impl Default for Episode {
    fn default() -> Episode {
        Episode::every(reminder_every())
    }
}

impl Episode {
    pub fn every(every: Duration) -> Episode {
        Episode { since: None, attempts: 0, next_reminder: None, every }
    }

    /// Whether the problem holds.
    pub fn ongoing(&self) -> bool {
        self.since.is_some()
    }

    /// One more failed attempt at `now`.
    pub fn failed(&mut self, now: Instant) -> Failure {
        self.attempts += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.attempts = 1;
            self.next_reminder = Some(now + self.every);
            return Failure::Started;
        };
        match self.next_reminder {
            Some(at) if now >= at => {
                // From `now`, not `at`: after a long gap (a suspended device) one reminder,
                // not a burst of the ones missed.
                self.next_reminder = Some(now + self.every);
                Failure::Remind { lasted: now.duration_since(since), attempts: self.attempts }
            }
            _ => Failure::Quiet,
        }
    }

    /// The problem is over: `Some((how long it lasted, failed attempts))` if it held.
    pub fn ended(&mut self, now: Instant) -> Option<(Duration, u64)> {
        let since = self.since.take()?;
        self.next_reminder = None;
        Some((now.duration_since(since), std::mem::take(&mut self.attempts)))
    }
}

/// A duration as an operator reads it in a log line: whole seconds above a minute
/// (`1h 2m 3s`), milliseconds below.
pub fn readable(d: Duration) -> String {
    let d = if d >= Duration::from_secs(60) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    };
    humantime::format_duration(d).to_string()
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
    fn a_throttle_logs_the_first_then_once_per_period_with_the_folded_count() {
        let start = Instant::now();
        let mut t = LogThrottle::every(Duration::from_secs(600));
        assert_eq!(t.ready(start), Some(0));
        let mut lines = 1;
        // An event a second for an hour.
        for s in 1..3600 {
            if let Some(folded) = t.ready(start + Duration::from_secs(s)) {
                assert_eq!(folded, 599, "every occurrence in between is counted");
                lines += 1;
            }
        }
        assert_eq!(lines, 6);
    }

    /// An hour of an upstream outage with the default backoff (a retry every 0.25–0.5 s):
    /// about 10,000 attempts, seven lines (the start, five reminders, the end).
    #[test]
    fn an_hour_long_episode_is_one_line_five_reminders_and_one_end() {
        let start = Instant::now();
        let mut e = Episode::every(REMINDER_EVERY);
        let mut now = start;
        let mut lines = Vec::new();
        let mut attempts = 0;
        while now < start + Duration::from_secs(3600) {
            attempts += 1;
            match e.failed(now) {
                Failure::Quiet => {}
                line => lines.push(line),
            }
            now += Duration::from_millis(250 + (attempts % 250));
        }
        assert!(attempts > 7_000, "{attempts}");
        assert_eq!(lines[0], Failure::Started);
        assert_eq!(lines.len(), 6, "{lines:?}");
        let Failure::Remind { lasted, attempts: so_far } = lines[5] else { panic!("{lines:?}") };
        assert!(lasted >= Duration::from_secs(3000), "{lasted:?}");
        assert!(so_far > 6_000, "{so_far}");
        assert!(e.ongoing());
        let (lasted, n) = e.ended(now).expect("it held");
        assert_eq!(n, attempts);
        assert!(lasted >= Duration::from_secs(3600));
        assert_eq!(e.ended(now), None, "ended once");
        assert_eq!(e.failed(now), Failure::Started, "a new problem starts a new episode");
    }

    #[test]
    fn durations_read_as_an_operator_expects() {
        assert_eq!(readable(Duration::from_millis(1234)), "1s 234ms");
        assert_eq!(readable(Duration::from_secs_f64(3723.7)), "1h 2m 3s");
    }

    #[test]
    fn counters_that_are_not_a_summary_stay_text() {
        assert_eq!(counters_object(""), Some(serde_json::json!({})));
        assert_eq!(counters_object("a=1 b"), None);
        assert_eq!(counters_object("a=x"), None);
    }
}
