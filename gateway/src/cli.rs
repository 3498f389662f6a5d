//! The `outpost` command line: argument parsing and the commands behind it.
//!
//! Exit codes: 0 success, 1 invalid configuration — the config file, the rules file or its
//! tables (`check`, `rules check`, and `run` refusing to start on one), one `outpost: ` line a
//! problem — 2 any other error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::admin::client::Reader;
use crate::config::{ConfigErrors, GatewayConfig, LogFormat, Overrides, UpstreamUrl};
use crate::event::now_ms;
use crate::mqtt::topic::invalid_topic;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "IoT edge event gateway: embedded MQTT broker, rules, durable store-and-forward uplink"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, env = "OUTPOST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run(ConfigArgs),
    /// Check everything `run` needs without starting: the config, the rules file and its
    /// tables, the data directory. Exit 0 if all is well, 1 with every problem if not.
    Check(CheckArgs),
    /// Inspect the durable buffer.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Check rules files, try them on events, read the dead-letter store.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Add or change a user in a Mosquitto password file (`broker.password_file`), or delete
    /// one. Hashes are mosquitto_passwd's own `$7$` (PBKDF2-HMAC-SHA512), so mosquitto reads the
    /// file too. The password is asked for twice without echo on a terminal, or read as one
    /// line from standard input otherwise. A running gateway applies the change on SIGHUP
    /// (`systemctl reload outpost` or `kill -HUP`).
    Passwd(PasswdArgs),
    /// Follow events through the running gateway: each one as it passes ingest (client id,
    /// topic, QoS), each rule (matched or not, outputs, errors) and the relay (accepted, sent,
    /// acknowledged, committed, dropped and why), joined by the event id that `buffer peek`,
    /// the dead letters and the upstream's `outpost-event-id` carry. Until Ctrl-C. A tap never
    /// slows the gateway: what this viewer cannot keep up with is skipped and counted
    /// (`missed`).
    Tap(TapArgs),
    /// The running gateway's state for a person: upstream, backlog, rates, last errors. Asks
    /// the `[http]` endpoint's `/status` when the config has one, else the admin socket.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct TapArgs {
    /// Only events whose topic matches this MQTT filter (e.g. `site/+/temperature`).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this rule's verdicts, and what the relay does with the events it matched.
    #[arg(long)]
    pub rule: Option<String>,
    /// Only one stage.
    #[arg(long, value_enum)]
    pub stage: Option<crate::tap::TapStage>,
    /// Only one event in N, chosen by event id (an event's whole path is shown or none of it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: TapFormat,
    #[command(flatten)]
    pub args: BufferArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TapFormat {
    /// One line a record for a person.
    Text,
    /// The daemon's JSON lines as they come.
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the JSON object instead.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub args: BufferArgs,
}

#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The password file; created (readable by its owner only) if it does not exist.
    pub file: PathBuf,
    /// The username (no `:`).
    pub user: String,
    /// Delete the user instead.
    #[arg(long)]
    pub delete: bool,
    /// PBKDF2 iterations. 101 is mosquitto_passwd's default: every CONNECT costs this many
    /// rounds, so on a small gateway thousands of sensors reconnecting at once stay cheap.
    /// Raise it where a stolen file is the bigger risk (checks above 200 rounds run on
    /// worker threads, at most 2 at a time). At most 100000 (`auth::password::MAX_ITERATIONS`).
    #[arg(long, default_value_t = crate::auth::password::DEFAULT_ITERATIONS, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::auth::password::MAX_ITERATIONS)))]
    pub iterations: u32,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Compile a rules file (and the table files it names): exit 0, or 1 with every problem.
    Check { file: PathBuf },
    /// Dry run: show what each rule does with an event and what the gateway would do with
    /// each output (forward, republish, drop, dead letter), without a running gateway.
    Test {
        file: PathBuf,
        /// Topic of a single test event (a topic name: `+` and `#` are refused, as the
        /// gateway refuses a publish to them).
        #[arg(long, required_unless_present = "events")]
        topic: Option<String>,
        /// Payload of the single test event (any text; JSON for most rules).
        #[arg(long, default_value = "")]
        payload: String,
        #[arg(long)]
        clientid: Option<String>,
        /// Replay recorded events: JSON lines with "topic", "payload" (a JSON value, or a
        /// string used as is) and optionally "clientid" and "ts_ms" (receive time, Unix
        /// milliseconds: windows close at the events' times, and the ones still open are
        /// shown closed at the end).
        #[arg(long, conflicts_with = "topic")]
        events: Option<PathBuf>,
        /// Gateway config whose `upstream.topic_prefix` forwarded topics get, as in `run`.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Print the last N dead letters (events a rule failed on), oldest first, as JSON lines.
    /// Works while the daemon runs.
    DeadLetters {
        #[arg(short = 'n', long, default_value_t = 20)]
        n: usize,
        #[command(flatten)]
        args: BufferArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Events, bytes and oldest age per priority. Works while the daemon runs (through its
    /// admin socket, <data_dir>/outpost.sock) and when it is stopped (reads the file).
    Stats(BufferArgs),
    /// Print the next N events the relay will send, as JSON lines. Works while the daemon runs
    /// (through its admin socket) and when it is stopped.
    Peek {
        #[arg(default_value_t = 10)]
        n: usize,
        #[command(flatten)]
        args: BufferArgs,
    },
    /// Write every buffered event to FILE as JSON lines (payload as UTF-8 text, or hex when it
    /// is not). Works while the daemon runs (through its admin socket; events acknowledged
    /// during the export may or may not appear).
    Export {
        file: PathBuf,
        #[command(flatten)]
        args: BufferArgs,
    },
    /// Merge the events of another buffer file (one moved aside as corrupt, or another
    /// gateway's) into this buffer: per priority in their order, behind the events already
    /// there, never twice. Works while the daemon runs (through its admin socket).
    Import {
        /// The buffer file to merge in, e.g. DATA_DIR/buffer.redb.corrupt-<unix seconds>.
        file: PathBuf,
        #[command(flatten)]
        args: BufferArgs,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML config file; without it the built-in defaults apply. Paths in the file are
    /// relative to the file; paths given as flags or environment variables are relative to
    /// the working directory.
    #[arg(long, short = 'c', env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address for sensors (MQTT 3.1.1 and 5), e.g. 0.0.0.0:1883.
    #[arg(long, env = "OUTPOST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Upstream broker, mqtt://host:port or mqtts://host:port.
    #[arg(long, env = "OUTPOST_UPSTREAM")]
    pub upstream: Option<UpstreamUrl>,
    /// Where the durable buffer lives.
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Rules file.
    #[arg(long, env = "OUTPOST_RULES")]
    pub rules: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Then try the upstream once — TCP, TLS, MQTT CONNECT — and print each step's result
    /// (exit 2 if a step fails). It connects with upstream.client_id: a running gateway with
    /// the same id is disconnected once (it reconnects and resends what was unacknowledged).
    #[arg(long)]
    pub connect: bool,
}

#[derive(Debug, Args)]
pub struct BufferArgs {
    /// Config file whose data_dir to inspect.
    #[arg(long, short = 'c', env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data dir to inspect (wins over the config file).
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            upstream: self.upstream.clone(),
            data_dir: self.data_dir.clone(),
            rules: self.rules.clone(),
        }
    }

    fn load(&self) -> Result<GatewayConfig, ConfigErrors> {
        GatewayConfig::load(self.config.as_deref(), &self.overrides())
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Run(args) => run_command(&args, cli.log_format),
        Command::Buffer(command) => report(buffer(command)),
        Command::Rules(RulesCommand::Check { file }) => match crate::rules::load(&file) {
            Ok(rules) => {
                println!(
                    "{}: ok ({} rules: {})",
                    file.display(),
                    rules.len(),
                    rules.rule_names().collect::<Vec<_>>().join(", ")
                );
                for warning in rules.warnings() {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => refuse(e.problems()),
        },
        Command::Rules(RulesCommand::Test { file, topic, payload, clientid, events, config }) => {
            rules_test_command(&file, config.as_deref(), topic, payload, clientid, events)
        }
        Command::Passwd(args) => report(passwd(&args)),
        Command::Tap(args) => report(tap(&args)),
        Command::Status(args) => report(status(&args)),
        Command::Rules(RulesCommand::DeadLetters { n, args }) => report((|| {
            let dir = data_dir(&args)?;
            let mut out = std::io::stdout().lock();
            for line in crate::deadletter::tail(&dir, n)? {
                writeln!(out, "{line}")?;
            }
            Ok(())
        })()),
    }
}

/// `outpost tap`: prints what the daemon's tap sends until it closes or stdout does.
fn tap(args: &TapArgs) -> anyhow::Result<()> {
    let dir = data_dir(&args.args)?;
    let request = crate::admin::TapRequest {
        topic: args.topic.clone(),
        rule: args.rule.clone(),
        stage: args.stage,
        sample: args.sample,
    };
    let mut out = std::io::stdout().lock();
    let format = args.format;
    let attached = |stages: &[crate::tap::TapStage]| {
        let names: Vec<String> = stages.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
        eprintln!("tapping {} of the gateway in {} (Ctrl-C to stop)", names.join(", "), dir.display());
    };
    let printed = crate::admin::client::tap(&dir, &request, attached, |line| {
        let text = match format {
            TapFormat::Json => line.to_owned(),
            TapFormat::Text => tap_text(line),
        };
        writeln!(out, "{text}")?;
        out.flush()
    });
    match printed {
        // The reader went away (`outpost tap | head`): not an error.
        Err(crate::admin::client::ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A tap line for a person: a record's text form, or what the viewer missed.
fn tap_text(line: &str) -> String {
    if let Ok(record) = serde_json::from_str::<crate::tap::TapRecord>(line) {
        return record.text();
    }
    match serde_json::from_str::<crate::tap::Missed>(line) {
        Ok(missed) => format!(
            "… missed {} records: this tap read too slowly (the gateway did not wait); narrow it with --topic, --rule, --stage or --sample",
            missed.missed
        ),
        Err(_) => line.to_owned(),
    }
}

/// `outpost status`: `/status` from the `[http]` endpoint, or the admin socket's answer.
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let config = GatewayConfig::load(args.args.config.as_deref(), &Overrides::default())?;
    let value = match (&config.http, &args.args.data_dir) {
        (Some(http), None) => {
            let token = http.read_token().map_err(|reason| {
                anyhow::anyhow!(
                    "`http.bearer_token_file` {}: {reason}",
                    http.bearer_token_file.as_deref().unwrap_or(Path::new("")).display()
                )
            })?;
            crate::admin::client::status_over_http(http.listen, token.map(|t| t.authorization()))?
        }
        (_, dir) => crate::admin::client::status(dir.as_deref().unwrap_or(&config.data_dir))?,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        out.write_all(status_text(&value, now_ms()).as_bytes())?;
    }
    Ok(())
}

/// `/status` (or the admin socket's status) for a person.
fn status_text(status: &serde_json::Value, now_ms: u64) -> String {
    use serde_json::Value;
    use std::fmt::Write as _;
    let num = |v: &Value, key: &str| v.get(key).and_then(Value::as_f64);
    let int = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let ago = |ms: u64| {
        let secs = now_ms.saturating_sub(ms) / 1000;
        humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
    };
    let mut out = String::new();
    let version = status.get("version").and_then(Value::as_str).unwrap_or("?");
    let mut head = format!("outpost {version}");
    if let Some(up) = num(status, "uptime_s") {
        head += &format!(", up {}", humantime::format_duration(std::time::Duration::from_secs(up as u64)));
    }
    match status.get("ready").and_then(Value::as_bool) {
        Some(true) => head += ", ready",
        Some(false) => head += ", NOT READY (see /health/ready)",
        None => {}
    }
    let _ = writeln!(out, "{head}");

    let upstream = status.get("upstream").cloned().unwrap_or_default();
    let endpoint = upstream.get("endpoint").and_then(Value::as_str).unwrap_or("(configured upstream)");
    let state = if upstream.get("connected").and_then(Value::as_bool).unwrap_or(false) {
        "connected"
    } else {
        "DISCONNECTED"
    };
    let since = upstream.get("since_ms").and_then(Value::as_u64).map(|ms| format!(" for {}", ago(ms)));
    let _ = writeln!(
        out,
        "upstream     {endpoint}: {state}{} ({} connects, {} failures)",
        since.unwrap_or_default(),
        int(&upstream, "connects"),
        int(&upstream, "failures")
    );

    let backlog = status.get("backlog").cloned().unwrap_or_default();
    let mut line = format!("backlog      {} events held", int(&backlog, "events"));
    if let Some(capacity) = backlog.get("capacity_events").and_then(Value::as_u64) {
        line += &format!(" (capacity {capacity} events, {})", bytes(int(&backlog, "capacity_bytes")));
    }
    let _ = writeln!(out, "{line}");
    match backlog.get("committed").filter(|c| !c.is_null()) {
        Some(committed) => {
            let _ = writeln!(
                out,
                "buffer file  {} events, {} (file {})",
                int(committed, "events"),
                bytes(int(committed, "bytes")),
                bytes(int(committed, "file_bytes"))
            );
            for p in committed.get("priorities").and_then(Value::as_array).into_iter().flatten() {
                if int(p, "events") == 0 {
                    continue;
                }
                let oldest = num(p, "oldest_age_s")
                    .map(|s| {
                        format!(
                            ", oldest {}",
                            humantime::format_duration(std::time::Duration::from_secs(s as u64))
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  priority {}: {} events, {}{oldest}",
                    int(p, "priority"),
                    int(p, "events"),
                    bytes(int(p, "bytes"))
                );
            }
        }
        None => {
            let why = backlog.get("store_error").and_then(Value::as_str).unwrap_or("no answer");
            let _ = writeln!(out, "buffer file  unknown: {why}");
        }
    }

    if let Some(rates) = status.get("rates") {
        let _ = writeln!(
            out,
            "rates        over {:.0} s: {:.1} ingested/s, {:.1} forwarded/s, {:.1} acknowledged/s, {:.1} committed/s",
            num(rates, "window_s").unwrap_or(0.0),
            num(rates, "ingested").unwrap_or(0.0),
            num(rates, "forwarded").unwrap_or(0.0),
            num(rates, "acked").unwrap_or(0.0),
            num(rates, "committed").unwrap_or(0.0)
        );
    }
    if let Some(sensors) = status.get("sensors_connected").and_then(Value::as_u64) {
        let _ = writeln!(out, "sensors      {sensors} connected");
    }
    match status.get("last_errors").and_then(Value::as_array) {
        Some(errors) if errors.is_empty() => {
            let _ = writeln!(out, "last errors  none");
        }
        Some(errors) => {
            let _ = writeln!(out, "last errors  (the log has the text)");
            for e in errors {
                let _ = writeln!(
                    out,
                    "  {:<10} {} ({} total), {} ago",
                    e.get("stage").and_then(Value::as_str).unwrap_or("?"),
                    e.get("kind").and_then(Value::as_str).unwrap_or("?"),
                    int(e, "total"),
                    ago(int(e, "at_ms"))
                );
            }
        }
        None => {}
    }
    if let Some(counters) = status.get("counters").and_then(Value::as_object) {
        let _ = writeln!(out, "counters     (no [http] endpoint: totals since start, no rates)");
        for (name, value) in counters {
            let _ = writeln!(out, "  {name} {value}");
        }
    }
    out
}

/// Bytes for a person: B, KiB, MiB or GiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `outpost passwd`: reads the password (without echo on a terminal), hashes it, edits the
/// file.
fn passwd(args: &PasswdArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;

    use crate::auth::password::{self, Edited, Hash};

    let hash = if args.delete {
        None
    } else {
        let password = if std::io::stdin().is_terminal() {
            let first = read_hidden("Password: ")?;
            let again = read_hidden("Reenter password: ")?;
            anyhow::ensure!(first == again, "the passwords do not match; nothing changed");
            first
        } else {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("cannot read the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_owned()
        };
        anyhow::ensure!(!password.is_empty(), "the password is empty; nothing changed");
        let iterations =
            std::num::NonZeroU32::new(args.iterations).context("--iterations must be at least 1")?;
        Some(
            Hash::pbkdf2(password.as_bytes(), iterations)
                .map_err(|_| anyhow::anyhow!("no system randomness for the salt"))?,
        )
    };
    let edited = password::edit_file(&args.file, &args.user, hash.as_ref())?;
    let what = match edited {
        Edited::Added => "added",
        Edited::Changed => "changed",
        Edited::Deleted => "deleted",
    };
    eprintln!(
        "{}: user {:?} {what}; a running gateway applies it on SIGHUP (systemctl reload outpost)",
        args.file.display(),
        args.user
    );
    Ok(())
}

/// One line from the terminal on standard input, not echoed.
fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};

    let stdin = std::io::stdin();
    let original = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
    let mut silent = original.clone();
    silent.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &silent).context("cannot turn the terminal's echo off")?;
    // Only now: what is typed after the prompt is never echoed.
    eprint!("{prompt}");
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    // Echo comes back whatever the read did.
    let restored = tcsetattr(&stdin, OptionalActions::Now, &original);
    eprintln!();
    read.context("cannot read the password")?;
    restored.context("cannot turn the terminal's echo back on")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// `outpost run`: loads the config, starts logging, runs the gateway until a signal.
fn run_command(args: &ConfigArgs, log_format: Option<LogFormat>) -> ExitCode {
    let config = match args.load() {
        Ok(config) => config,
        Err(ConfigErrors(problems)) => return refuse(problems),
    };
    crate::telemetry::init(log_format.unwrap_or(config.log.format), &config.log.level);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        // Broken rules are invalid configuration, as for `check`: one line a problem.
        Err(e) => match e.downcast_ref::<crate::StartError>() {
            Some(crate::StartError::Rules(load)) => refuse(load.problems()),
            _ => report(Err(e)),
        },
    }
}

/// `outpost rules test`: loads the rules (and the config whose prefix and topic limits apply),
/// then runs the dry run.
fn rules_test_command(
    file: &Path,
    config: Option<&Path>,
    topic: Option<String>,
    payload: String,
    clientid: Option<String>,
    events: Option<PathBuf>,
) -> ExitCode {
    // Forwarded topics get the config's prefix and are checked against its topic limits,
    // as in `run`; without a config, the defaults.
    let (topic_prefix, policy) = match config.map(|c| GatewayConfig::load(Some(c), &Overrides::default())) {
        None => (String::new(), crate::config::BrokerConfig::default().topic_policy()),
        Some(Ok(config)) => {
            (config.upstream.map(|u| u.topic_prefix).unwrap_or_default(), config.broker.topic_policy())
        }
        Some(Err(e)) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(1);
        }
    };
    match crate::rules::load(file) {
        Ok(rules) => report(rules_test(rules, &topic_prefix, &policy, topic, payload, clientid, events)),
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::from(1)
        }
    }
}

/// One recorded event for `rules test --events`.
#[derive(serde::Deserialize)]
struct RecordedEvent {
    topic: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    clientid: Option<String>,
    /// When it was received, Unix milliseconds (default: now): the time windows see.
    #[serde(default)]
    ts_ms: Option<u64>,
}

/// How many events one input may lead to through republish chains before the dry run stops
/// showing them (each chain ends at `max_hops`, but a rule that republishes twice doubles
/// the count at every hop).
const MAX_CHAIN_EVENTS: usize = 100;

/// One test event for `rules test`: topic, payload, client id, receive time (Unix ms).
type Case = (String, Vec<u8>, Option<String>, Option<u64>);

fn rules_test(
    rules: outpost_rules::RuleSet,
    topic_prefix: &str,
    policy: &crate::mqtt::topic::TopicPolicy,
    topic: Option<String>,
    payload: String,
    clientid: Option<String>,
    events: Option<PathBuf>,
) -> anyhow::Result<()> {
    let cases = match (topic, events) {
        (Some(topic), _) => {
            if let Some(why) = invalid_topic(&topic, policy) {
                anyhow::bail!(
                    "--topic {topic:?}: {why}; the gateway refuses such a publish, so no rule ever sees it"
                );
            }
            vec![(topic, payload.into_bytes(), clientid, None)]
        }
        (None, Some(path)) => recorded_cases(&path, policy)?,
        (None, None) => anyhow::bail!("give --topic (and --payload) or --events FILE"),
    };
    // Diagnostics on stderr: stdout stays the dry run, which scripts compare.
    for warning in rules.warnings() {
        eprintln!("warning: {warning}");
    }
    let mut out = std::io::stdout().lock();
    let routing = crate::route::Routing::Rules(rules);
    let ids = crate::event::IdGen::new(0);
    // Windows and report-by-exception state across the events, in their order.
    let mut state = crate::route::DryState::new(&routing);
    let dry = crate::route::Dry {
        routing: &routing,
        ids: &ids,
        topic_prefix,
        policy,
        max_events: MAX_CHAIN_EVENTS,
    };
    let mut last_ms = None;
    for (topic, payload, clientid, ts_ms) in cases {
        let received_ms = ts_ms.unwrap_or_else(now_ms);
        last_ms = Some(received_ms);
        let event = crate::event::Event {
            qos: Some(1),
            client_id: clientid.map(Into::into),
            ..crate::event::Event::made(ids.next_id(), topic, payload.into(), received_ms)
        };
        print_run(&mut out, &dry.run(event, state.as_mut()))?;
    }
    if let (Some(state), Some(at)) = (state.as_mut(), last_ms) {
        let run = dry.close_all(state, at);
        if !run.steps.is_empty() {
            writeln!(
                out,
                "end of the events: the windows still open are closed now to show what they hold (the gateway keeps them open until their end)"
            )?;
        }
        print_run(&mut out, &run)?;
    }
    Ok(())
}

fn print_run(out: &mut impl Write, run: &crate::route::DryRun) -> std::io::Result<()> {
    for step in &run.steps {
        print_step(out, step)?;
    }
    if run.waiting > 0 {
        writeln!(
            out,
            "  … republish chain cut after {MAX_CHAIN_EVENTS} events ({} more waiting)",
            run.waiting
        )?;
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 UTC, for the windows a dry run closes.
fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// The events of a `--events` file: JSON lines with "topic", "payload" and "clientid".
fn recorded_cases(path: &Path, policy: &crate::mqtt::topic::TopicPolicy) -> anyhow::Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cases = Vec::new();
    for (idx, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let e: RecordedEvent = serde_json::from_str(line).with_context(|| {
            format!("{}:{}: expected {{\"topic\": …, \"payload\": …}}", path.display(), idx + 1)
        })?;
        if let Some(why) = invalid_topic(&e.topic, policy) {
            anyhow::bail!(
                "{}:{}: topic {:?}: {why}; the gateway refuses such a publish",
                path.display(),
                idx + 1,
                e.topic
            );
        }
        let payload = match e.payload {
            serde_json::Value::String(s) => s.into_bytes(),
            serde_json::Value::Null => Vec::new(),
            other => serde_json::to_vec(&other)?,
        };
        cases.push((e.topic, payload, e.clientid, e.ts_ms));
    }
    Ok(cases)
}

/// One event of a dry run: the event, each rule's verdict, and each fate.
fn print_step(out: &mut impl Write, step: &crate::route::DryStep) -> std::io::Result<()> {
    use crate::route::{DeadCause, Fate};
    let event = &step.event;
    let payload_text = if event.payload.is_empty() {
        "(empty payload)".into()
    } else {
        String::from_utf8_lossy(&event.payload)
    };
    match (&step.via, &step.window) {
        (_, Some(window)) => writeln!(
            out,
            "window of rule {} closed{}: [{}, {})",
            window.rule,
            if matches!(window.key.as_str(), "" | "[]") {
                String::new()
            } else {
                format!(" for group {}", window.key)
            },
            rfc3339_ms(window.start_ms),
            rfc3339_ms(window.end_ms)
        )?,
        (None, None) => writeln!(out, "event {} {payload_text}", event.topic)?,
        (Some(rule), None) => writeln!(
            out,
            "event {} {payload_text} (republished by rule {rule}, hop {})",
            event.topic, step.hops
        )?,
    }
    if step.traces.is_empty() && step.stateful.is_empty() && step.window.is_none() {
        writeln!(out, "  no rule's FROM matches this topic")?;
    }
    for rule in &step.stateful {
        writeln!(
            out,
            "  rule {rule}: stateful (a window, or report by exception), evaluated with its state"
        )?;
    }
    for trace in &step.traces {
        match &trace.outcome {
            outpost_rules::Outcome::Filtered => {
                writeln!(out, "  rule {}: filtered out by WHERE", trace.rule)?
            }
            outpost_rules::Outcome::Selected { row } => {
                writeln!(out, "  rule {}: selected {row}", trace.rule)?
            }
            outpost_rules::Outcome::Failed { reason } => {
                writeln!(out, "  rule {}: failed: {reason}", trace.rule)?
            }
        }
    }
    if step.fates.is_empty() && step.stateful.is_empty() && step.window.is_none() {
        writeln!(out, "  => unrouted: nothing goes upstream (counted as unrouted)")?;
    } else if step.fates.is_empty() {
        writeln!(out, "  => nothing goes out now")?;
    }
    for fate in &step.fates {
        match fate {
            Fate::Forward { rule, topic, payload, qos, priority, ttl, .. } => writeln!(
                out,
                "  => forward {topic} qos={qos} priority={priority}{} (rule {}): {}",
                ttl.map(|t| format!(" ttl={}", humantime::format_duration(t))).unwrap_or_default(),
                rule.as_deref().unwrap_or("-"),
                String::from_utf8_lossy(payload)
            )?,
            Fate::Republish { rule, topic, payload, qos, hops } => writeln!(
                out,
                "  => republish {topic} qos={qos} hops={hops} (rule {rule}): {}",
                String::from_utf8_lossy(payload)
            )?,
            Fate::Drop { rule } => writeln!(out, "  => drop (rule {rule})")?,
            Fate::NotBackUpstream { rule, topic } => writeln!(
                out,
                "  => not forwarded to {topic} (rule {}): it came from upstream",
                rule.as_deref().unwrap_or("bridge route")
            )?,
            Fate::LoopPrevented { rule, topic, hops } => writeln!(
                out,
                "  => republish {topic} refused: hop limit (max_hops) reached after {hops} republish(es) (rule {rule})"
            )?,
            Fate::DeadLetter { entries } => {
                writeln!(out, "  => dead letter (one record for the event):")?;
                for entry in entries {
                    let how = match entry.cause {
                        DeadCause::Failed | DeadCause::InvalidTopic => "failed",
                        DeadCause::Deliberate => "dead_letter action",
                    };
                    writeln!(out, "       rule {} ({how}): {}", entry.rule, entry.reason)?;
                }
            }
        }
    }
    Ok(())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes joined by ": ", leaving out a cause that an outer message already
/// quotes (`cannot create /x: Read-only file system (os error 30)` and its `io::Error`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `outpost check`: everything `run` reads before it binds a port — the config, the rules
/// file and its tables, the data directory — with every problem found, one a line.
fn check(check_args: &CheckArgs) -> ExitCode {
    let args = &check_args.config;
    let (config, problems) = GatewayConfig::load_all(args.config.as_deref(), &args.overrides());
    let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if let Some(config) = &config {
        if let Some(rules) = &config.rules {
            if let Err(e) = crate::rules::load(rules) {
                problems.extend(e.problems());
            }
        }
        problems.extend(crate::buffer::store::check_data_dir(&config.data_dir));
        if let Some(upstream) = &config.upstream {
            problems.extend(tls_file_problems(upstream));
        }
    }
    match config {
        Some(config) if problems.is_empty() => {
            let origin =
                args.config.as_ref().map_or("built-in defaults".to_owned(), |p| p.display().to_string());
            println!(
                "{origin}: ok (broker on {}, data in {}, upstream {}, rules {})",
                config.broker.listen,
                config.data_dir.display(),
                config.upstream.as_ref().map_or("none".to_owned(), |u| u.endpoint_list()),
                config.rules.as_ref().map_or("none".to_owned(), |r| r.display().to_string()),
            );
            match &config.upstream {
                Some(upstream) if check_args.connect => try_upstream(upstream),
                None if check_args.connect => {
                    eprintln!("outpost: --connect: no upstream configured (set [upstream] url)");
                    ExitCode::from(2)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        _ => refuse(problems),
    }
}

/// The TLS and password files parsed as a connection would parse them (the config's own
/// check only opened them).
fn tls_file_problems(upstream: &crate::config::UpstreamConfig) -> Vec<String> {
    use crate::uplink::pem;
    let mut problems = Vec::new();
    if let Some(tls) = &upstream.tls {
        for (key, path) in
            [("upstream.tls.ca_file", &tls.ca_file), ("upstream.tls.cert_file", &tls.cert_file)]
        {
            if let Some(Err(e)) = path.as_deref().map(pem::certificates) {
                problems.push(format!("{key}: {e}"));
            }
        }
        if let Some(Err(e)) = tls.key_file.as_deref().map(pem::private_key) {
            problems.push(format!("upstream.tls.key_file: {e}"));
        }
    }
    problems
}

/// `outpost check --connect`: TCP, TLS, CONNECT to every endpoint in order, each step's result
/// on its own line; fails if any endpoint does.
fn try_upstream(cfg: &crate::config::UpstreamConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let endpoints = cfg.endpoints();
    let ok = runtime.block_on(async {
        let mut all = true;
        for url in &endpoints {
            if endpoints.len() > 1 {
                println!("endpoint {url}:");
            }
            all &= try_endpoint(cfg, url).await;
        }
        all
    });
    if ok { ExitCode::SUCCESS } else { ExitCode::from(2) }
}

/// One step's line of `outpost check --connect`; true if it succeeded.
fn step(name: &str, result: Result<String, String>) -> bool {
    match result {
        Ok(detail) => {
            println!("{name}: ok ({detail})");
            true
        }
        Err(why) => {
            println!("{name}: FAILED: {why}");
            false
        }
    }
}

/// TCP, TLS and CONNECT to one endpoint, each step printed; true if all succeeded.
async fn try_endpoint(cfg: &crate::config::UpstreamConfig, url: &crate::config::UpstreamUrl) -> bool {
    use crate::uplink::{connect, transport};
    let late = |what: &str| {
        format!(
            "no answer within upstream.connect_timeout ({}) at the {what} step",
            humantime::format_duration(cfg.connect_timeout)
        )
    };
    let started = std::time::Instant::now();
    let tcp = tokio::time::timeout(cfg.connect_timeout, transport::tcp(url))
        .await
        .map_or_else(|_| Err(late("TCP")), |r| r.map_err(|e| e.to_string()));
    let tcp = match tcp {
        Ok(tcp) => {
            let peer = tcp.peer_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
            step(
                &format!("tcp {}:{}", url.host, url.port),
                Ok(format!("connected to {peer} in {} ms", started.elapsed().as_millis())),
            );
            tcp
        }
        Err(e) => return step(&format!("tcp {}:{}", url.host, url.port), Err(e)),
    };
    let stream = if url.tls {
        let started = std::time::Instant::now();
        let tls = tokio::time::timeout(cfg.connect_timeout, transport::tls(cfg, url, tcp))
            .await
            .map_or_else(|_| Err(late("TLS")), |r| r.map_err(|e| e.to_string()));
        match tls {
            Ok(stream) => {
                let detail = format!(
                    "{}, server certificate verified, in {} ms",
                    stream.describe(),
                    started.elapsed().as_millis()
                );
                step("tls", Ok(detail));
                stream
            }
            Err(e) => return step("tls", Err(e)),
        }
    } else {
        println!("tls: skipped (the endpoint is mqtt://, plain TCP)");
        transport::Stream::Plain(tcp)
    };
    let started = std::time::Instant::now();
    let name = format!("mqtt CONNECT as {:?}", cfg.client_id);
    let done = tokio::time::timeout(cfg.connect_timeout, connect::handshake(cfg, url, stream))
        .await
        .map_or_else(|_| Err(late("CONNECT")), |r| r.map_err(|e| e.to_string()));
    match done {
        Ok((mut stream, params, _)) => {
            let detail = format!(
                "CONNACK accepted in {} ms, MQTT {}, receive maximum {}",
                started.elapsed().as_millis(),
                match params.version {
                    crate::config::MqttVersion::V311 => "3.1.1",
                    crate::config::MqttVersion::V5 => "5",
                },
                params.receive_max
            );
            step(&name, Ok(detail));
            use tokio::io::AsyncWriteExt as _;
            let mut out = bytes::BytesMut::new();
            crate::mqtt::upstream::encode_disconnect(&mut out);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                stream.write_all(&out).await?;
                stream.shutdown().await
            })
            .await;
            true
        }
        Err(e) => step(&name, Err(e)),
    }
}

/// Invalid configuration (config, rules, tables): one `outpost: ` line per problem, exit 1.
fn refuse<P: std::fmt::Display>(problems: impl IntoIterator<Item = P>) -> ExitCode {
    for problem in problems {
        eprintln!("outpost: {problem}");
    }
    ExitCode::from(1)
}

/// A panic anywhere ends the process. Tokio would catch a task's panic and keep running, and
/// the events the task held would drop their tickets — which acknowledges them to sensors
/// (dropping is the success path, see `ack`). Dying instead means the sensors resend
/// and systemd restarts the gateway from its buffer.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("outpost: a bug stopped the gateway (see above); the buffer is intact, restart it");
        std::process::abort();
    }));
}

/// [`Moderation`](crate::coalesce::Moderation) on the runtime thread's park hooks. The
/// publish count comes from the gateway's counters once it has started; until then nothing
/// is counted and nothing probed decides anything.
struct Coalescer {
    moderation: std::sync::Mutex<crate::coalesce::Moderation>,
    metrics: std::sync::OnceLock<crate::metrics::Metrics>,
}

impl Coalescer {
    fn new(interval: std::time::Duration) -> Coalescer {
        Coalescer {
            moderation: std::sync::Mutex::new(crate::coalesce::Moderation::new(
                interval,
                std::time::Instant::now(),
            )),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// A mutex nobody else takes (one runtime thread).
    fn moderation(&self) -> std::sync::MutexGuard<'_, crate::coalesce::Moderation> {
        self.moderation.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn before_park(&self) {
        let metrics = self.metrics.get();
        let published = metrics.map_or(0, |m| crate::metrics::Metrics::get(&m.counters().ingested));
        let window_full =
            metrics.is_some_and(|m| crate::metrics::Metrics::get(&m.gauges().upstream_window_full) == 1);
        let (wait, waits) = {
            let mut moderation = self.moderation();
            (moderation.before_park(std::time::Instant::now(), published, window_full), moderation.waits())
        };
        if let Some(metrics) = metrics {
            crate::metrics::Metrics::set(&metrics.gauges().wakeup_coalescing_active, u64::from(waits));
        }
        if let Some(wait) = wait {
            // Deliberate: the thread has nothing to run; what arrives meanwhile waits in the
            // sockets' buffers and is taken in one turn.
            std::thread::sleep(wait);
        }
        self.moderation().parked(std::time::Instant::now());
    }

    fn after_unpark(&self) {
        self.moderation().woke(std::time::Instant::now());
    }
}

fn run(config: GatewayConfig) -> anyhow::Result<()> {
    abort_on_panic();
    // One thread runs the pipeline: measured, a current-thread runtime beat two workers on two
    // cores (less CPU per event, better p99). redb runs on a thread of its own (the store thread).
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    let coalescer = (!config.wakeup_coalescing.is_zero())
        .then(|| std::sync::Arc::new(Coalescer::new(config.wakeup_coalescing)));
    if let Some(coalescer) = &coalescer {
        let (parks, woke) = (std::sync::Arc::clone(coalescer), std::sync::Arc::clone(coalescer));
        builder.on_thread_park(move || parks.before_park()).on_thread_unpark(move || woke.after_unpark());
    }
    let runtime = builder.build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // SIGHUP's default action ends the process. The reload handlers are installed only once
        // the rules and the broker are up, so a reload sent by a config manager during start-up
        // used to kill the gateway. Once tokio has a handler for a signal it keeps it for the
        // life of the process: from here on an early SIGHUP is dropped (the gateway is loading
        // the files anyway).
        if let Err(error) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tracing::warn!(message = "cannot install the SIGHUP handler; a SIGHUP during start-up ends the gateway", %error);
        }
        // Polled once here so that the handlers are installed before the broker says it is
        // listening: a SIGTERM from then on stops the gateway gracefully (it used to kill it
        // with the default action until the gateway reached its run loop).
        let signal = crate::shutdown::signal();
        tokio::pin!(signal);
        tokio::select! {
            biased;
            () = &mut signal => return Ok(()),
            () = std::future::ready(()) => {}
        }
        let gateway = crate::Gateway::start(config).await.context("cannot start the gateway")?;
        if let Some(coalescer) = &coalescer {
            let _ = coalescer.metrics.set(gateway.metrics().clone());
        }
        // Type=notify units start dependants only once the broker accepts sensors. Outside
        // systemd NOTIFY_SOCKET is unset and this does nothing.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let stop = async {
            signal.await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        };
        gateway.run_until(stop).await;
        Ok(())
    })
}

fn data_dir(args: &BufferArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.data_dir {
        return Ok(dir.clone());
    }
    let config = GatewayConfig::load(args.config.as_deref(), &Overrides::default())?;
    Ok(config.data_dir)
}

fn buffer(command: BufferCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let open = |args: &BufferArgs| -> anyhow::Result<Reader> {
        let reader = Reader::open(&data_dir(args)?)?;
        if let Reader::File(view) = &reader {
            if view.repaired() {
                eprintln!(
                    "note: {} was not closed cleanly; it was repaired (the daemon would do the same at start)",
                    view.path().display()
                );
            }
        }
        Ok(reader)
    };
    match command {
        BufferCommand::Stats(args) => {
            let stats = open(&args)?.stats()?;
            writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
        }
        BufferCommand::Peek { n, args } => {
            open(&args)?.records(Some(n), |line| writeln!(out, "{line}"))?;
        }
        BufferCommand::Export { file, args } => {
            let reader = open(&args)?;
            let f =
                std::fs::File::create(&file).with_context(|| format!("cannot create {}", file.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let n = reader.records(None, |line| writeln!(w, "{line}"))?;
            w.flush()?;
            writeln!(out, "exported {n} events to {}", file.display())?;
        }
        BufferCommand::Import { file, args } => {
            writeln!(out, "{}", crate::admin::client::import(&file, &data_dir(&args)?)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_overrides() {
        let cli =
            Cli::try_parse_from(["outpost", "run", "--listen", "127.0.0.1:1999", "--upstream", "mqtt://h:1"])
                .expect("parses");
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.listen, Some("127.0.0.1:1999".parse().expect("addr")));
        assert_eq!(args.upstream, Some(UpstreamUrl::plain("h", 1)));
    }

    #[test]
    fn cli_rejects_bad_upstream_with_reason() {
        let err = Cli::try_parse_from(["outpost", "run", "--upstream", "ftp://h"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("unknown scheme `ftp`"), "{err}");
    }
}
