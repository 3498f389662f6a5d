//! `examples/prometheus-alerts.yml` only names metrics a real gateway serves: every series
//! selector in every rule's expression is looked up in a scrape of the real binary's
//! `/metrics`, with its label matchers. Where Debian's `prometheus` package is installed (CI
//! installs it), `promtool` also checks the rules file and lints the scraped exposition.
//!
//! How the names are found: the YAML is parsed with yaml-rust2 (so block scalars and quoting
//! are YAML's, not guessed), and each `expr` goes through a small tokenizer of PromQL's lexical
//! structure below, not a PromQL parser: the crates that parse PromQL pull in a parser
//! generator at build time, while what this test needs — which identifiers are series
//! selectors, and their `{label op "value"}` matchers — follows from the lexical rules alone
//! (strings, `[…]` ranges, `by (…)` / `on (…)` label lists, `name(` calls, keywords). The
//! tokenizer has its own test on expressions whose answer is known.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::http::{Scrape, scrape, series_names};
use outpost_e2e::mqtt::{publish_qos1, unique_client_id};
use outpost_e2e::{free_addr, require_tool, workspace_root};
use yaml_rust2::{Yaml, YamlLoader};

const RULES_FILE: &str = "examples/prometheus-alerts.yml";
const PROMTOOL: &str = "/usr/bin/promtool";
const TIMEOUT: Duration = Duration::from_secs(30);
/// Between two scrapes while waiting for the buffer gauges: the endpoint refreshes the store's
/// statistics at most once a second, and nothing announces that it did.
const POLL: Duration = Duration::from_millis(100);

/// Series Prometheus writes itself for every target it scrapes; never on `/metrics`.
const PROMETHEUS_OWN_SERIES: &[&str] = &["up"];
/// Labels Prometheus attaches to every series of a target (the scrape config's job and the
/// target's address).
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// One series selector of an expression: `name{label op "value", …}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// Keywords that are followed by a parenthesized list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
/// Identifiers that are operators, aggregations or modifiers, never series names, even when no
/// `(` follows them directly (`sum by (job) (…)`, `a and b`, `x offset 5m`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// A cursor over an expression's characters.
struct Lexer {
    chars: Vec<char>,
    at: usize,
}

impl Lexer {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn ident(&mut self) -> String {
        let start = self.at;
        while self.peek().is_some_and(is_ident) {
            self.at += 1;
        }
        self.chars[start..self.at].iter().collect()
    }

    /// A quoted string starting at the cursor (`"`, `'` or a backtick), unescaped.
    fn string(&mut self) -> String {
        let quote = self.chars[self.at];
        self.at += 1;
        let mut text = String::new();
        while let Some(c) = self.peek() {
            self.at += 1;
            match c {
                '\\' if quote != '`' => {
                    text.extend(self.peek());
                    self.at += 1;
                }
                c if c == quote => break,
                c => text.push(c),
            }
        }
        text
    }

    /// Skips from an opening bracket to its closing one, strings included.
    fn skip_group(&mut self, open: char, close: char) {
        let mut depth = 0;
        while let Some(c) = self.peek() {
            match c {
                '"' | '\'' | '`' => {
                    self.string();
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        self.at += 1;
                        return;
                    }
                }
                _ => {}
            }
            self.at += 1;
        }
    }

    /// `{label op "value", …}` starting at the `{`.
    fn matchers(&mut self) -> Vec<(String, String, String)> {
        let mut matchers = Vec::new();
        self.at += 1;
        loop {
            self.skip_whitespace();
            match self.peek() {
                None => return matchers,
                Some('}') => {
                    self.at += 1;
                    return matchers;
                }
                Some(',') => self.at += 1,
                Some(c) if is_ident_start(c) => {
                    let label = self.ident();
                    self.skip_whitespace();
                    let start = self.at;
                    while self.peek().is_some_and(|c| matches!(c, '=' | '!' | '~')) {
                        self.at += 1;
                    }
                    let op: String = self.chars[start..self.at].iter().collect();
                    self.skip_whitespace();
                    let value = if self.peek().is_some_and(|c| matches!(c, '"' | '\'' | '`')) {
                        self.string()
                    } else {
                        panic!("matcher `{label}{op}` without a quoted value")
                    };
                    matchers.push((label, op, value));
                }
                Some(other) => panic!("unexpected `{other}` in a label matcher list"),
            }
        }
    }
}

/// The series selectors of a PromQL expression.
fn selectors(expr: &str) -> Vec<Selector> {
    let mut lexer = Lexer { chars: expr.chars().collect(), at: 0 };
    let mut found: Vec<Selector> = Vec::new();
    // A selector just read, which a `{…}` right after it belongs to.
    let mut last_selector: Option<usize> = None;
    while let Some(c) = lexer.peek() {
        match c {
            '"' | '\'' | '`' => {
                lexer.string();
                last_selector = None;
            }
            // A range or subquery: durations only.
            '[' => lexer.skip_group('[', ']'),
            '{' => {
                let matchers = lexer.matchers();
                let index = last_selector.take().expect("a `{…}` without a metric name before it");
                found[index].matchers = matchers;
            }
            c if is_ident_start(c) => {
                let word = lexer.ident();
                lexer.skip_whitespace();
                let next = lexer.peek();
                last_selector = None;
                if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                    if next == Some('(') {
                        lexer.skip_group('(', ')');
                    }
                } else if KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) || next == Some('(') {
                    // An operator, an aggregation or a function call.
                } else {
                    found.push(Selector { metric: word, matchers: Vec::new() });
                    last_selector = Some(found.len() - 1);
                }
            }
            // A number or a duration (`0.8`, `1e3`, `0x1f`, `5m`): its letters are no name.
            c if c.is_ascii_digit() || c == '.' => {
                while lexer.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '.') {
                    lexer.at += 1;
                }
                last_selector = None;
            }
            c if c.is_whitespace() => lexer.at += 1,
            _ => {
                lexer.at += 1;
                last_selector = None;
            }
        }
    }
    found
}

/// `(alert name, expr)` of every rule in the rules file.
fn rule_expressions() -> Vec<(String, String)> {
    let path = workspace_root().join(RULES_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{RULES_FILE} is not YAML: {e}"));
    let groups = docs.first().and_then(|doc| doc["groups"].as_vec()).expect("a `groups` list");
    let mut rules = Vec::new();
    for group in groups {
        for rule in group["rules"].as_vec().expect("each group has `rules`") {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).expect("`alert` or `record`");
            let expr = match &rule["expr"] {
                Yaml::String(expr) => expr.clone(),
                other => panic!("{name}: `expr` is {other:?}, not a string"),
            };
            rules.push((name.to_owned(), expr));
        }
    }
    rules
}

#[test]
fn the_tokenizer_finds_the_series_selectors_and_nothing_else() {
    let names = |expr: &str| -> Vec<String> {
        selectors(expr)
            .into_iter()
            .map(|s| {
                let matchers: Vec<String> = s.matchers.iter().map(|(l, o, v)| format!("{l}{o}{v}")).collect();
                if matchers.is_empty() { s.metric } else { format!("{}{{{}}}", s.metric, matchers.join(",")) }
            })
            .collect()
    };
    assert_eq!(names(r#"up{job="outpost"} == 0"#), ["up{job=outpost}"]);
    assert_eq!(names(r#"absent(up{job="outpost"})"#), ["up{job=outpost}"]);
    assert_eq!(
        names(r#"sum by (job, instance, reason) (increase(a_total{reason!="ttl"}[15m])) > 0"#),
        ["a_total{reason!=ttl}"]
    );
    assert_eq!(names("sum by (job) (b_bytes)\n  / on (job, instance) c_bytes > 0.8"), ["b_bytes", "c_bytes"]);
    assert_eq!(names("max(d) by (le) and e unless f or g == bool 1"), ["d", "e", "f", "g"]);
    assert_eq!(names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m] offset 1h)))"), ["h_bucket"]);
    assert_eq!(names(r#"i{a=~"x|y", b!~'z\'s'} * on (a) group_left (b) j"#), ["i{a=~x|y,b!~z's}", "j"]);
    assert_eq!(names("rate(k:ratio_5m[1h:5m]) > 1e3 and l > Inf"), ["k:ratio_5m", "l"]);
    assert!(names(r#"label_replace(vector(1), "dst", "$1", "src", "(.*)")"#).is_empty());
}

/// A gateway whose `/metrics` has every series, the per-priority buffer gauges included:
/// its upstream is a free port nobody listens on, so the events it is sent are committed to
/// the buffer file and stay there.
async fn gateway_with_a_backlog() -> (tempfile::TempDir, GatewayProcess, SocketAddr) {
    let data = tempfile::tempdir().expect("tempdir");
    let http = free_addr();
    let unreachable = free_addr();
    let config = format!("[http]\nlisten = \"{http}\"\n[upstream]\nurl = \"mqtt://{unreachable}\"\n");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    let payloads = (0..5).map(|i| format!("reading {i}").into_bytes());
    // With the upstream down, each PUBACK means the event is committed to the buffer file.
    publish_qos1(gateway.listen(), &unique_client_id("alerts"), "alerts/backlog", payloads, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("publish: {e:#}\n{}", gateway.tail()));
    (data, gateway, http)
}

/// Scrapes until the buffer file's per-priority gauges are in (the store's statistics are
/// refreshed at most once a second), and returns the text and its parse.
async fn scrape_with_backlog(http: SocketAddr) -> (String, Scrape) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (text, parsed) = scrape(http, None).await.unwrap_or_else(|e| panic!("{e:#}"));
        if parsed.samples.iter().any(|s| s.metric == "outpost_buffer_oldest_event_age_seconds") {
            return (text, parsed);
        }
        assert!(tokio::time::Instant::now() < deadline, "no buffer gauges within {TIMEOUT:?}:\n{text}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_alert_rules_select_is_served() {
    let rules = rule_expressions();
    let alerts: BTreeSet<&str> = rules.iter().map(|(name, _)| name.as_str()).collect();
    // What the issue asks the examples to cover.
    for required in [
        "OutpostGatewayDown",
        "OutpostGatewayAbsent",
        "OutpostUpstreamDown",
        "OutpostBacklogOld",
        "OutpostBufferNearlyFull",
        "OutpostBufferBytesNearlyFull",
        "OutpostBufferCommitsFailing",
        "OutpostDeadLettersIncreasing",
        "OutpostPublishesRefused",
        "OutpostEventsDiscarded",
    ] {
        assert!(alerts.contains(required), "{RULES_FILE} has no alert {required}: {alerts:?}");
    }

    let (_data, gateway, http) = gateway_with_a_backlog().await;
    let (text, parsed) = scrape_with_backlog(http).await;
    let served = series_names(&parsed);
    // Label name → the values served, per series name.
    let mut labels: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for sample in &parsed.samples {
        let of_metric = labels.entry(sample.metric.as_str()).or_default();
        for (name, value) in sample.labels.iter() {
            of_metric.entry(name.as_str()).or_default().insert(value.as_str());
        }
    }

    let mut problems = Vec::new();
    let mut checked = 0;
    for (alert, expr) in &rules {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{alert}: no series in `{expr}`");
        for selector in found {
            checked += 1;
            let metric = selector.metric.as_str();
            if PROMETHEUS_OWN_SERIES.contains(&metric) {
                continue;
            }
            if !served.contains(metric) {
                problems.push(format!("{alert}: `{metric}` is not served by /metrics"));
                continue;
            }
            let served_labels = labels.get(metric);
            for (label, op, value) in &selector.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let values = served_labels.and_then(|l| l.get(label.as_str()));
                match values {
                    None => problems.push(format!("{alert}: `{metric}` has no label `{label}`")),
                    // An equality must name a value the gateway serves; other matchers only need
                    // the label (`!=`, regexes may well match nothing on a healthy gateway).
                    Some(values) if op == "=" && !values.contains(value.as_str()) => problems.push(format!(
                        "{alert}: `{metric}{{{label}=\"{value}\"}}` is not served; served: {values:?}"
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}\n--- /metrics ---\n{text}", problems.join("\n"));
    println!(
        "{} rules, {checked} selectors, all served ({} series names on /metrics)",
        rules.len(),
        served.len()
    );

    if !require_tool(PROMTOOL, "prometheus") {
        return;
    }
    let rules_path = workspace_root().join(RULES_FILE);
    let output =
        Command::new(PROMTOOL).args(["check", "rules"]).arg(&rules_path).output().expect("run promtool");
    assert!(
        output.status.success(),
        "promtool check rules {RULES_FILE}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lint = promtool_check_metrics(&text);
    assert!(lint.0, "promtool check metrics on the gateway's /metrics:\n{}", lint.1);
    println!("promtool check rules and check metrics pass");
    drop(gateway);
}

/// `promtool check metrics` with the exposition on its stdin: (passed, what it printed).
fn promtool_check_metrics(exposition: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().expect("stdin").write_all(exposition.as_bytes()).expect("feed promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let printed =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), printed)
}
