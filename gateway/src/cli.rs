//! The `outpost` command line: argument parsing and the commands behind it.
//!
//! Exit codes: 0 success, 1 invalid configuration — the config file, the rules file or its
//! tables (`check`, `rules check`, and `run` refusing to start on one), one `outpost: ` line a
//! problem — 2 any other error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::buffer::inspect;
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
    Check(ConfigArgs),
    /// Inspect the durable buffer.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Check rules files, try them on events, read the dead-letter store.
    #[command(subcommand)]
    Rules(RulesCommand),
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
        /// string used as is) and optionally "clientid".
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
    /// Upstream broker, mqtt://host:port.
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
        Command::Run(args) => {
            let config = match args.load() {
                Ok(config) => config,
                Err(ConfigErrors(problems)) => return refuse(problems),
            };
            crate::telemetry::init(cli.log_format.unwrap_or(config.log.format), &config.log.level);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                // Broken rules are invalid configuration, as for `check`: one line a problem.
                Err(e) => match e.downcast_ref::<crate::StartError>() {
                    Some(crate::StartError::Rules(load)) => refuse(load.problems()),
                    _ => report(Err(e)),
                },
            }
        }
        Command::Buffer(command) => report(buffer(command)),
        Command::Rules(RulesCommand::Check { file }) => match crate::rules::load(&file) {
            Ok(rules) => {
                println!(
                    "{}: ok ({} rules: {})",
                    file.display(),
                    rules.len(),
                    rules.rule_names().collect::<Vec<_>>().join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => refuse(e.problems()),
        },
        Command::Rules(RulesCommand::Test { file, topic, payload, clientid, events, config }) => {
            // Forwarded topics get the config's prefix and are checked against its topic limits,
            // as in `run`; without a config, the defaults.
            let (topic_prefix, policy) =
                match config.map(|c| GatewayConfig::load(Some(&c), &Overrides::default())) {
                    None => (String::new(), crate::config::BrokerConfig::default().topic_policy()),
                    Some(Ok(config)) => (
                        config.upstream.map(|u| u.topic_prefix).unwrap_or_default(),
                        config.broker.topic_policy(),
                    ),
                    Some(Err(e)) => {
                        eprintln!("outpost: {e}");
                        return ExitCode::from(1);
                    }
                };
            match crate::rules::load(&file) {
                Ok(rules) => {
                    report(rules_test(rules, &topic_prefix, &policy, topic, payload, clientid, events))
                }
                Err(e) => {
                    eprintln!("outpost: {e}");
                    ExitCode::from(1)
                }
            }
        }
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

/// One recorded event for `rules test --events`.
#[derive(serde::Deserialize)]
struct RecordedEvent {
    topic: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    clientid: Option<String>,
}

/// How many events one input may lead to through republish chains before the dry run stops
/// showing them (each chain ends at `max_hops`, but a rule that republishes twice doubles
/// the count at every hop).
const MAX_CHAIN_EVENTS: usize = 100;

fn rules_test(
    rules: outpost_rules::RuleSet,
    topic_prefix: &str,
    policy: &crate::mqtt::topic::TopicPolicy,
    topic: Option<String>,
    payload: String,
    clientid: Option<String>,
    events: Option<PathBuf>,
) -> anyhow::Result<()> {
    use crate::route::{DeadCause, Fate};
    let mut out = std::io::stdout().lock();
    let mut cases: Vec<(String, Vec<u8>, Option<String>)> = Vec::new();
    match (topic, events) {
        (Some(topic), _) => {
            if let Some(why) = invalid_topic(&topic, policy) {
                anyhow::bail!(
                    "--topic {topic:?}: {why}; the gateway refuses such a publish, so no rule ever sees it"
                );
            }
            cases.push((topic, payload.into_bytes(), clientid));
        }
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
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
                cases.push((e.topic, payload, e.clientid));
            }
        }
        (None, None) => anyhow::bail!("give --topic (and --payload) or --events FILE"),
    }
    let routing = crate::route::Routing::Rules(rules);
    let ids = crate::event::IdGen::new(0);
    for (topic, payload, clientid) in cases {
        let event = crate::event::Event {
            id: ids.next_id(),
            topic,
            payload: payload.into(),
            qos: Some(1),
            received_ms: now_ms(),
            client_id: clientid.map(Into::into),
            ticket: None,
        };
        // The event, then what its republishes feed back, in the route stage's order.
        let mut queue = std::collections::VecDeque::from([(event, 0u8, None)]);
        let mut shown = 0;
        while let Some((event, hops, via)) = queue.pop_front() {
            shown += 1;
            if shown > MAX_CHAIN_EVENTS {
                writeln!(
                    out,
                    "  … republish chain cut after {MAX_CHAIN_EVENTS} events ({} more waiting)",
                    queue.len() + 1
                )?;
                break;
            }
            let payload_text = if event.payload.is_empty() {
                "(empty payload)".into()
            } else {
                String::from_utf8_lossy(&event.payload)
            };
            match &via {
                None => writeln!(out, "event {} {payload_text}", event.topic)?,
                Some(rule) => writeln!(
                    out,
                    "event {} {payload_text} (republished by rule {rule}, hop {hops})",
                    event.topic
                )?,
            }
            let traces = crate::route::explain(&routing, &event, hops);
            if traces.is_empty() {
                writeln!(out, "  no rule's FROM matches this topic")?;
            }
            for trace in traces {
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
            let fates = crate::route::decide(&routing, &event, hops, topic_prefix, policy);
            if fates.is_empty() {
                writeln!(out, "  => unrouted: nothing goes upstream (counted as unrouted)")?;
            }
            for fate in fates {
                match fate {
                    Fate::Forward { rule, topic, payload, qos, priority, ttl } => writeln!(
                        out,
                        "  => forward {topic} qos={qos} priority={priority}{} (rule {}): {}",
                        ttl.map(|t| format!(" ttl={}", humantime::format_duration(t))).unwrap_or_default(),
                        rule.as_deref().unwrap_or("-"),
                        String::from_utf8_lossy(&payload)
                    )?,
                    Fate::Republish { rule, topic, payload, qos, hops } => {
                        writeln!(
                            out,
                            "  => republish {topic} qos={qos} hops={hops} (rule {rule}): {}",
                            String::from_utf8_lossy(&payload)
                        )?;
                        let next = crate::route::republished_event(&event, ids.next_id(), topic, payload);
                        queue.push_back((next, hops, Some(rule)));
                    }
                    Fate::Drop { rule } => writeln!(out, "  => drop (rule {rule})")?,
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
fn check(args: &ConfigArgs) -> ExitCode {
    let (config, problems) = GatewayConfig::load_all(args.config.as_deref(), &args.overrides());
    let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if let Some(config) = &config {
        if let Some(rules) = &config.rules {
            if let Err(e) = crate::rules::load(rules) {
                problems.extend(e.problems());
            }
        }
        problems.extend(check_data_dir(&config.data_dir));
    }
    match config {
        Some(config) if problems.is_empty() => {
            let origin =
                args.config.as_ref().map_or("built-in defaults".to_owned(), |p| p.display().to_string());
            println!(
                "{origin}: ok (broker on {}, data in {}, upstream {}, rules {})",
                config.broker.listen,
                config.data_dir.display(),
                config.upstream.as_ref().map_or("none".to_owned(), |u| u.url.to_string()),
                config.rules.as_ref().map_or("none".to_owned(), |r| r.display().to_string()),
            );
            ExitCode::SUCCESS
        }
        _ => refuse(problems),
    }
}

/// Invalid configuration (config, rules, tables): one `outpost: ` line per problem, exit 1.
fn refuse<P: std::fmt::Display>(problems: impl IntoIterator<Item = P>) -> ExitCode {
    for problem in problems {
        eprintln!("outpost: {problem}");
    }
    ExitCode::from(1)
}

/// What `run` needs of `data_dir`: a directory it can write (or one it can create, in the
/// nearest existing parent), and a buffer file it can open for writing. Creates nothing but
/// a probe file that it removes at once.
fn check_data_dir(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let fix = "set data_dir (or --data-dir) to a directory the user running outpost can write";
    let existing = dir.ancestors().find(|p| p.as_os_str().is_empty() || p.exists())?;
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    if !existing.is_dir() {
        return Some(format!("data_dir {}: {} is not a directory; {fix}", dir.display(), existing.display()));
    }
    let probe = existing.join(format!(".outpost-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            let what = if existing == dir {
                format!("cannot write in {}", dir.display())
            } else {
                format!("{} does not exist and cannot be created in {}", dir.display(), existing.display())
            };
            return Some(format!("data_dir {what}: {e}; {fix}"));
        }
    }
    let buffer = crate::buffer::store::file_path(dir);
    match std::fs::OpenOptions::new().read(true).write(true).open(&buffer) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let owner = std::fs::metadata(&buffer)
                .map(|m| format!(" (owner uid {}, mode {:o})", m.uid(), m.mode() & 0o7777))
                .unwrap_or_default();
            Some(format!(
                "cannot open the buffer file {} for writing{owner}: {e}; run outpost as the file's owner, or give the file to the user running outpost (chown)",
                buffer.display()
            ))
        }
    }
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

fn run(config: GatewayConfig) -> anyhow::Result<()> {
    abort_on_panic();
    // One thread runs the pipeline: measured, a current-thread runtime beat two workers on two
    // cores (less CPU per event, better p99). redb and rumqttd have threads of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
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

/// Where `outpost buffer …` gets its answers: the file itself when no daemon holds it, or
/// the daemon's admin socket when one does (redb's writer lock excludes all other openers).
enum Source {
    File(FileDb, PathBuf),
    Daemon(PathBuf),
}

/// The file opened by the CLI: read-only, or read-write when it needed repair.
enum FileDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}

/// Runs `$body` with `$db` bound to whichever database `$file` holds.
macro_rules! with_db {
    ($file:expr, $db:ident => $body:expr) => {
        match $file {
            FileDb::ReadOnly($db) => $body,
            FileDb::Repaired($db) => $body,
        }
    };
}

fn open_source(dir: &Path) -> anyhow::Result<Source> {
    let path = crate::buffer::store::file_path(dir);
    anyhow::ensure!(path.exists(), "no buffer at {} (is --data-dir right?)", path.display());
    match redb::ReadOnlyDatabase::open(&path) {
        Ok(db) => Ok(Source::File(FileDb::ReadOnly(db), path)),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(Source::Daemon(crate::admin::socket_path(dir))),
        // Not closed cleanly (a crash or power cut): repair it, as the daemon does at start.
        Err(redb::DatabaseError::RepairAborted) => {
            eprintln!(
                "note: {} was not closed cleanly; repairing it (the daemon would do the same at start)",
                path.display()
            );
            let db =
                redb::Database::open(&path).with_context(|| format!("cannot repair {}", path.display()))?;
            Ok(Source::File(FileDb::Repaired(db), path))
        }
        Err(e) => Err(e).with_context(|| format!("cannot open {} read-only", path.display())),
    }
}

/// Sends one request line to the daemon and returns its answer.
fn ask_daemon(socket: &Path, request: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "the buffer is locked by a running outpost, but its admin socket {} does not answer",
            socket.display()
        )
    })?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if let Some(error) = answer.strip_prefix("error: ") {
        anyhow::bail!("the daemon answered: {}", error.trim());
    }
    Ok(answer)
}

/// Records from the file, in send order, as JSON lines; at most `limit`.
fn file_lines(
    db: &impl redb::ReadableDatabase,
    path: &Path,
    limit: usize,
    mut f: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after = None;
    let mut left = limit;
    while left > 0 {
        let records = inspect::records_after(db, path, after, left.min(1000))?;
        let Some(last) = records.last() else { break };
        after = Some(last.key());
        left -= records.len();
        for record in &records {
            f(&inspect::export_line(record))?;
        }
    }
    Ok(())
}

fn buffer(command: BufferCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        BufferCommand::Stats(args) => {
            let stats: inspect::StatsReport = match open_source(&data_dir(&args)?)? {
                Source::File(db, path) => with_db!(&db, d => inspect::stats(d, &path, now_ms())?),
                Source::Daemon(socket) => serde_json::from_str(ask_daemon(&socket, "stats")?.trim())
                    .context("the daemon's stats answer is not valid JSON")?,
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
        }
        BufferCommand::Peek { n, args } => match open_source(&data_dir(&args)?)? {
            Source::File(db, path) => {
                with_db!(&db, d => file_lines(d, &path, n, |line| Ok(writeln!(out, "{line}")?))?)
            }
            Source::Daemon(socket) => write!(out, "{}", ask_daemon(&socket, &format!("peek {n}"))?)?,
        },
        BufferCommand::Export { file, args } => {
            let source = open_source(&data_dir(&args)?)?;
            let f =
                std::fs::File::create(&file).with_context(|| format!("cannot create {}", file.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let mut n = 0u64;
            match source {
                Source::File(db, path) => with_db!(&db, d => file_lines(d, &path, usize::MAX, |line| {
                    n += 1;
                    Ok(writeln!(w, "{line}")?)
                })?),
                Source::Daemon(socket) => {
                    let answer = ask_daemon(&socket, "export")?;
                    n = answer.lines().count() as u64;
                    w.write_all(answer.as_bytes())?;
                }
            }
            w.flush()?;
            writeln!(out, "exported {n} events to {}", file.display())?;
        }
        BufferCommand::Import { file, args } => {
            writeln!(out, "{}", crate::buffer::import::command(&file, &data_dir(&args)?)?)?;
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
        assert_eq!(args.upstream, Some(UpstreamUrl { host: "h".into(), port: 1 }));
    }

    #[test]
    fn cli_rejects_bad_upstream_with_reason() {
        let err = Cli::try_parse_from(["outpost", "run", "--upstream", "ftp://h"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("unknown scheme `ftp`"), "{err}");
    }
}
