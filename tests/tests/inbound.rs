//! Commands from the cloud (`[[upstream.subscribe]]`), end to end: a cloud application
//! publishes with `mosquitto_pub` at Debian's mosquitto (the upstream), and a local QoS 1
//! subscriber at the real `outpost` binary receives it under the mapped topic — also when it
//! was published while the link was down — while a topic the ACL or the mapping refuses is
//! counted and never delivered, a rule reacts to a command, a retained command is retained
//! locally, and nothing from the cloud is relayed back upstream by a `#` bridge route or a
//! forward-everything rule.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::gateway::{GatewayProcess, GatewaySpec};
use outpost_e2e::mqtt::{Session, Subscriber, SubscriberOptions, publish_qos1};
use outpost_e2e::upstream::{MOSQUITTO_PUB, Mosquitto, SwitchedLink, mosquitto_pub};
use outpost_e2e::{require_mosquitto, require_tool};

/// Generous bound for anything in these tests; each step takes well under a second when
/// healthy.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Logged once the inbound connection is up and its subscriptions were granted.
const INBOUND_CONNECTED: &str = "inbound connected";

fn tools() -> bool {
    require_mosquitto() && require_tool(MOSQUITTO_PUB, "mosquitto-clients")
}

/// A QoS 1 subscriber that records any payload (commands are no sensor readings).
async fn subscriber(addr: std::net::SocketAddr, filter: &str) -> Subscriber {
    let options =
        SubscriberOptions { verify: false, session: Session::Clean, ..SubscriberOptions::default() };
    Subscriber::start_with(addr, filter, options).await.expect("subscribe")
}

fn received(subscriber: &Subscriber) -> Vec<(String, String)> {
    subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload)| (topic, String::from_utf8_lossy(&payload).into_owned()))
        .collect()
}

async fn stop(mut gateway: GatewayProcess) -> BTreeMap<String, u64> {
    let status = gateway.terminate().await.expect("the gateway stops");
    assert!(status.success(), "exit status {status}\n{}", gateway.tail());
    gateway.final_counters().expect("final counters")
}

fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

/// Bridge mode with the default `#` route and an ACL: the allowed command reaches the local
/// subscriber, the one the ACL refuses and the one the mapping refuses do not (each counted
/// and logged), and the delivered command is not relayed back upstream, while a sensor's
/// event published after it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_a_local_subscriber_and_never_goes_back_upstream() {
    if !tools() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut cloud = subscriber(upstream.addr(), "#").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    // Anonymous local clients read commands and write readings; the inbound side may write
    // only valve commands.
    std::fs::write(
        &acl,
        "topic read cmd/#\ntopic write sensors/#\nuser outpost-inbound\ntopic write cmd/valve/#\n",
    )
    .expect("write the ACL");
    let config = format!(
        r#"[broker]
acl_file = {acl:?}

[upstream]
url = "{url}"
topic_prefix = "site-7/"

[[upstream.subscribe]]
filter = "cloud/site-7/#"
strip_prefix = "cloud/site-7/"
"#,
        acl = acl.to_str().expect("utf-8 path"),
        url = upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway.wait_for_message(INBOUND_CONNECTED, TIMEOUT).await.expect("the inbound connection");
    let mut local = subscriber(gateway.listen(), "cmd/#").await;

    let at = upstream.addr();
    mosquitto_pub(at, "cloud/site-7/cmd/door/1", "unlock", 1, false).expect("ACL-refused command");
    // Matches `cloud/site-7/#` (its parent level) but does not start with the strip prefix.
    mosquitto_pub(at, "cloud/site-7", "bare", 1, false).expect("mapping-refused command");
    mosquitto_pub(at, "cloud/site-7/cmd/valve/1", "open", 1, false).expect("the command");
    local.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    // A sensor's event after the command: once it is upstream, a relayed command (handed to
    // the route stage and the relay before it) would be too.
    publish_qos1(gateway.listen(), "s-1", "sensors/t/1", [b"21.5".to_vec()], TIMEOUT).await.expect("acks");
    cloud.wait_for_count(4, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    gateway
        .wait_for_message("a command from upstream was refused by the ACL", TIMEOUT)
        .await
        .expect("logged");
    gateway
        .wait_for_message("a command from upstream was refused by the topic mapping", TIMEOUT)
        .await
        .expect("logged");
    let counters = stop(gateway).await;

    assert_eq!(received(&local), [("cmd/valve/1".to_owned(), "open".to_owned())], "only the allowed command");
    let upstream_topics: Vec<String> = received(&cloud).into_iter().map(|(topic, _)| topic).collect();
    assert_eq!(
        upstream_topics,
        ["cloud/site-7/cmd/door/1", "cloud/site-7", "cloud/site-7/cmd/valve/1", "site-7/sensors/t/1"],
        "the cloud's own three, then the sensor's event; no command came back"
    );
    assert_eq!(counter(&counters, "inbound_received"), 3, "{counters:?}");
    assert_eq!(counter(&counters, "inbound_delivered"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "inbound_refused_acl"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "inbound_refused_mapping"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "inbound_not_forwarded"), 1, "the `#` route skipped it: {counters:?}");
}

/// The link is cut, a command is published at the upstream meanwhile, the link returns: the
/// upstream kept the inbound session and delivers the command, and it reaches the local
/// subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_the_link_was_down_arrives_when_it_returns() {
    if !tools() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let link = SwitchedLink::start(upstream.addr()).await.expect("start the link");
    let config = format!(
        r#"[upstream]
url = "{url}"
reconnect_max = "200ms"

[[upstream.subscribe]]
filter = "cloud/cmd/#"
strip_prefix = "cloud/"
"#,
        url = link.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway.wait_for_message(INBOUND_CONNECTED, TIMEOUT).await.expect("the inbound connection");
    let mut local = subscriber(gateway.listen(), "cmd/#").await;
    mosquitto_pub(upstream.addr(), "cloud/cmd/pump", "before", 1, false).expect("publish");
    local.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));

    link.set_up(false);
    gateway.wait_for_message("inbound connection lost", TIMEOUT).await.expect("the cut noticed");
    mosquitto_pub(upstream.addr(), "cloud/cmd/pump", "during", 1, false).expect("publish during the outage");
    mosquitto_pub(upstream.addr(), "cloud/cmd/valve", "during", 1, false).expect("publish during the outage");
    assert_eq!(local.count(), 1, "nothing can arrive while the link is down");
    link.set_up(true);
    let during =
        |local: &Subscriber| received(local).iter().filter(|(_, payload)| payload == "during").count();
    outpost_e2e::wait_until("both commands sent during the outage", TIMEOUT, || during(&local) >= 2)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let counters = stop(gateway).await;

    // The cut can come before the PUBACK of "before" reached the upstream, which then
    // delivers it again after the reconnect: at least once, as documented. Nothing else repeats.
    let before = ("cmd/pump".to_owned(), "before".to_owned());
    let mut messages = received(&local);
    let repeats = messages.iter().filter(|m| **m == before).count();
    assert!((1..=2).contains(&repeats), "{messages:?}");
    messages.dedup();
    assert_eq!(
        messages,
        [before, ("cmd/pump".to_owned(), "during".to_owned()), ("cmd/valve".to_owned(), "during".to_owned())]
    );
    assert_eq!(counter(&counters, "inbound_delivered"), 2 + repeats as u64, "{counters:?}");
    assert!(counter(&counters, "inbound_connects") >= 2, "{counters:?}");
}

const RULES: &str = r##"
[[rule]]
name = "route-command"
sql = 'SELECT topic(2) AS device, payload AS p FROM "cmd/+"'
[[rule.action]]
type = "republish"
topic = "devices/${device}/set"
payload = "${p}"

[[rule]]
name = "everything-up"
sql = 'SELECT payload FROM "#"'
[[rule.action]]
type = "forward"
format = "raw"
"##;

/// A rule routes a command to its device's topic; a forward-everything rule sends the
/// sensor's event upstream, but neither the command nor what the rule made of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_routes_a_command_to_its_device_and_nothing_goes_back_upstream() {
    if !tools() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    let mut cloud = subscriber(upstream.addr(), "#").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).expect("write rules");
    let config = format!(
        r#"rules = {rules:?}

[upstream]
url = "{url}"

[[upstream.subscribe]]
filter = "cloud/cmd/#"
strip_prefix = "cloud/"
"#,
        rules = rules.to_str().expect("utf-8 path"),
        url = upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway.wait_for_message(INBOUND_CONNECTED, TIMEOUT).await.expect("the inbound connection");
    let mut device = subscriber(gateway.listen(), "devices/#").await;

    mosquitto_pub(upstream.addr(), "cloud/cmd/pump-3", "on", 1, false).expect("the command");
    device.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    publish_qos1(gateway.listen(), "s-1", "sensors/t/1", [b"21.5".to_vec()], TIMEOUT).await.expect("acks");
    cloud.wait_for_count(2, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let counters = stop(gateway).await;

    assert_eq!(received(&device), [("devices/pump-3/set".to_owned(), "on".to_owned())]);
    assert_eq!(
        received(&cloud),
        [("cloud/cmd/pump-3".to_owned(), "on".to_owned()), ("sensors/t/1".to_owned(), "21.5".to_owned())],
        "the cloud's command, then the sensor's event; nothing of the command came back"
    );
    // The command and the event the rule republished from it: both kept from the forward.
    assert_eq!(counter(&counters, "inbound_not_forwarded"), 2, "{counters:?}");
    assert_eq!(counter(&counters, "republished"), 1, "{counters:?}");
}

/// A command the cloud sent retained (a setpoint, a configuration) is retained at the site
/// too: a dashboard that subscribes afterwards gets it from Outpost's retained store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_is_retained_locally_as_sent() {
    if !tools() {
        return;
    }
    let upstream = Mosquitto::start().await.expect("start mosquitto");
    // Sent before the gateway ever connected: delivered on its first subscription.
    mosquitto_pub(upstream.addr(), "cloud/cfg/interval", "30s", 1, true).expect("the retained command");
    let config = format!(
        "[upstream]\nurl = \"{}\"\n\n[[upstream.subscribe]]\nfilter = \"cloud/cfg/#\"\nstrip_prefix = \"cloud/\"\n",
        upstream.url()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let gateway = GatewaySpec::new(data.path()).config_toml(config).start().await.expect("start the gateway");
    gateway.wait_for_message(INBOUND_CONNECTED, TIMEOUT).await.expect("the inbound connection");
    let mut first = subscriber(gateway.listen(), "cfg/#").await;
    first.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    // Whether `first` got it live or retained, it is in the store now.
    let mut later = subscriber(gateway.listen(), "cfg/#").await;
    later.wait_for_count(1, TIMEOUT).await.unwrap_or_else(|e| panic!("{e:#}\n{}", gateway.tail()));
    let counters = stop(gateway).await;

    for dashboard in [&first, &later] {
        assert_eq!(received(dashboard), [("cfg/interval".to_owned(), "30s".to_owned())]);
    }
    assert_eq!(counter(&counters, "inbound_delivered"), 1, "{counters:?}");
}
