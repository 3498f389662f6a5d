//! The grammar of a fuzzed MQTT session: what a hostile or merely odd sensor may send, drawn
//! from a seeded random generator.
//!
//! A [`Session`] is a CONNECT (sometimes a broken one, sometimes none), then steps (publishes
//! with ordinary and hostile topics, subscriptions including `$share`, `#` and `+`,
//! unsubscribes, acknowledgements right or wrong, pings, pauses, garbage, cut and corrupted
//! packets, a second CONNECT), then an ending (DISCONNECT, an abrupt close, or lingering until
//! the keepalive runs out). How the client answers the broker's deliveries and its PUBRECs is
//! part of the session too.
//!
//! # Invariants
//! - A session is a pure function of its seed ([`session_seed`]): the same round seed, slot and
//!   index give the same bytes, so a finding's round can be replayed.
//! - Client ids never start with [`RESERVED_ID_PREFIX`], which the canaries use, so no fuzzed
//!   session takes a canary's connection over.
//! - Client ids shared between slots ([`SHARED_IDS`]) make takeovers happen by design.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};

use super::wire::{AckKind, Connect, Packet, Property, Publish, Subscription, Version, Will, encode, frame};

/// Client ids starting with this belong to the canaries.
pub const RESERVED_ID_PREFIX: &str = "outpost-fuzz";

/// How many client ids all slots draw from for takeovers.
pub const SHARED_IDS: u32 = 8;

/// What a client does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Writes the packet. `hostile` marks a packet the grammar made to be refused or to break
    /// something (an odd topic, a malformed packet); stall reports list these first.
    Send { packet: Packet, hostile: bool },
    /// Reads (and answers deliveries) for this long before the next step.
    Wait(Duration),
}

/// How a client answers what the broker sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// PUBACK for QoS 1; PUBREC, then PUBCOMP on PUBREL, for QoS 2; PUBREL on PUBREC.
    Correct,
    /// Never acknowledges.
    Never,
    /// Acknowledges with the wrong packet id.
    WrongPkid,
    /// Holds acknowledgements and sends each batch of three in reverse order.
    Reversed,
    /// Acknowledges everything twice.
    Twice,
}

/// One client connection, from TCP connect to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub version: Version,
    pub client_id: String,
    pub steps: Vec<Step>,
    /// How deliveries (PUBLISH, PUBREL) from the broker are answered.
    pub deliveries: AckPolicy,
    /// How PUBRECs of the client's own QoS 2 publishes are answered.
    pub releases: AckPolicy,
    /// After the last step: how long to keep the socket open (reading) before closing it.
    pub linger: Duration,
}

/// Kinds of input a run can leave out, to look past a bug already found (a crash that every
/// round hits in seconds hides whatever else is there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Topics and filters with non-ASCII characters (C1 controls and non-characters included).
    NonAscii,
    /// Topics and filters with control characters and non-characters.
    ControlChars,
    /// `$share/…` subscriptions.
    SharedSubscriptions,
}

/// Whether `topic` is anything but a few short levels of letters and digits (what the grammar's
/// ordinary topics are).
pub fn unusual_topic(topic: &str) -> bool {
    topic.is_empty()
        || topic.len() > 100
        || topic.split('/').count() > 8
        || !topic.chars().all(|c| c.is_ascii_alphanumeric() || c == '/')
}

/// The seed of session `index` of `slot` in a round with `round_seed`.
pub fn session_seed(round_seed: u64, slot: u32, index: u64) -> u64 {
    splitmix(round_seed ^ splitmix((u64::from(slot) << 40) ^ index))
}

/// SplitMix64: spreads nearby seeds (rounds 1, 2, 3) over unrelated generator states.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The session for `seed`, with nothing left out.
pub fn session(seed: u64) -> Session {
    session_without(seed, &[])
}

/// The session for `seed` without the `left_out` kinds of input (a left-out choice becomes an
/// ordinary topic or filter, so the rest of the session stays as it was).
pub fn session_without(seed: u64, left_out: &[Class]) -> Session {
    Generator {
        rng: StdRng::seed_from_u64(seed),
        next_pkid: 1,
        subscribed: Vec::new(),
        left_out: left_out.to_vec(),
    }
    .session()
}

struct Generator {
    rng: StdRng,
    left_out: Vec<Class>,
    next_pkid: u16,
    /// Filters this session subscribed to, for its unsubscribes.
    subscribed: Vec<String>,
}

/// Topic levels that subscriptions and publishes share, so that deliveries happen.
const LEVELS: &[&str] = &["sensors", "t", "a", "b", "x", "1", "2"];
const NON_ASCII_LEVELS: &[&str] = &["ü", "温度", "température", "😀", "Ω", "ß"];
/// Characters brokers refuse or drop connections over: C0 and C1 controls, DEL, non-characters.
const HOSTILE_CHARS: &[char] = &[
    '\u{0}', '\u{1}', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}', '\u{fdd0}', '\u{fffe}',
    '\u{ffff}',
];

impl Generator {
    fn session(mut self) -> Session {
        let version = if self.rng.random_bool(0.5) { Version::V311 } else { Version::V5 };
        let client_id = self.client_id();
        let mut steps = Vec::new();
        match self.rng.random_range(0..100) {
            // No CONNECT at all: the first packet is something else.
            0..2 => {
                let packet = self.publish(version).0;
                steps.push(Step::Send { packet, hostile: true });
            }
            // A broken CONNECT.
            2..5 => steps.push(Step::Send { packet: self.bad_connect(&client_id), hostile: true }),
            _ => {
                let connect = self.connect(version, client_id.clone());
                // The gateway publishes the will upstream when the connection ends abruptly.
                let hostile = connect
                    .will
                    .as_ref()
                    .is_some_and(|will| unusual_topic(&will.topic) || !will.properties.is_empty());
                steps.push(Step::Send { packet: Packet::Connect(connect), hostile });
            }
        }
        let n_steps = self.rng.random_range(0..=25);
        for _ in 0..n_steps {
            let ended = self.step(version, &client_id, &mut steps);
            if ended {
                break;
            }
        }
        let linger = match self.rng.random_range(0..100) {
            0..40 => {
                let reason = *[0x00, 0x04, 0x80, 0x81, 0x83, 0x8d, 0x95].choose(&mut self.rng).unwrap_or(&0);
                let properties = self.maybe(0.2, |g| vec![g.user_property()]);
                steps.push(Step::Send { packet: Packet::Disconnect { reason, properties }, hostile: false });
                Duration::ZERO
            }
            40..50 => {
                let packet = self.cut_packet(version);
                steps.push(Step::Send { packet, hostile: true });
                Duration::ZERO
            }
            50..60 => Duration::from_millis(self.rng.random_range(500..3000)),
            _ => Duration::ZERO,
        };
        Session {
            version,
            client_id,
            steps,
            deliveries: self.ack_policy(),
            releases: self.ack_policy(),
            linger,
        }
    }

    fn ack_policy(&mut self) -> AckPolicy {
        match self.rng.random_range(0..100) {
            0..60 => AckPolicy::Correct,
            60..75 => AckPolicy::Never,
            75..85 => AckPolicy::WrongPkid,
            85..93 => AckPolicy::Reversed,
            _ => AckPolicy::Twice,
        }
    }

    /// Appends one step (or a burst of them); true if the session should end after it.
    fn step(&mut self, version: Version, client_id: &str, steps: &mut Vec<Step>) -> bool {
        match self.rng.random_range(0..100) {
            0..35 => {
                let (packet, hostile) = self.publish(version);
                steps.push(Step::Send { packet, hostile });
            }
            35..47 => {
                let (packet, hostile) = self.subscribe(version);
                steps.push(Step::Send { packet, hostile });
            }
            47..52 => {
                let packet = self.unsubscribe(version);
                steps.push(Step::Send { packet, hostile: false });
            }
            52..58 => {
                let kind = *[AckKind::PubAck, AckKind::PubRec, AckKind::PubRel, AckKind::PubComp]
                    .choose(&mut self.rng)
                    .unwrap_or(&AckKind::PubAck);
                let pkid = self.rng.random_range(0..=self.next_pkid.saturating_add(2));
                let reason = *[0x00, 0x10, 0x80, 0x92, 0x97].choose(&mut self.rng).unwrap_or(&0);
                steps.push(Step::Send { packet: Packet::Ack { kind, pkid, reason }, hostile: false });
            }
            58..61 => steps.push(Step::Send { packet: Packet::PingReq, hostile: false }),
            61..78 => steps.push(Step::Wait(Duration::from_millis(self.rng.random_range(0..300)))),
            78..81 => {
                let packet = self.malformed(version);
                steps.push(Step::Send { packet, hostile: true });
                // Most brokers close the connection now; sometimes keep going to see.
                return self.rng.random_bool(0.7);
            }
            81..82 => {
                let connect = self.connect(version, client_id.to_string());
                steps.push(Step::Send { packet: Packet::Connect(connect), hostile: true });
            }
            82..84 => self.filter_burst(version, steps),
            84..86 => self.topic_burst(version, steps),
            _ => {
                // QoS 1 and 2 publishes to ordinary topics, the traffic the broker must keep
                // acknowledging whatever else happens.
                let mut publish = self.plain_publish();
                publish.qos = self.rng.random_range(1..=2);
                publish.pkid = self.pkid();
                steps.push(Step::Send { packet: Packet::Publish(publish), hostile: false });
            }
        }
        false
    }

    fn client_id(&mut self) -> String {
        let id = match self.rng.random_range(0..100) {
            0..25 => format!("fz-{}", self.rng.random_range(0..SHARED_IDS)),
            25..35 => String::new(),
            35..40 => "x".repeat(self.rng.random_range(24..2000)),
            40..50 => [
                "a/b",
                "+",
                "#",
                "$sys",
                "ü-sensor",
                "温度计",
                "id with space",
                "a\u{1}b",
                "\u{ffff}",
                "-",
                "😀",
            ]
            .choose(&mut self.rng)
            .unwrap_or(&"-")
            .to_string(),
            _ => format!("c{:x}", self.rng.random::<u32>()),
        };
        if id.starts_with(RESERVED_ID_PREFIX) { format!("x{id}") } else { id }
    }

    fn connect(&mut self, version: Version, client_id: String) -> Connect {
        let v5 = version == Version::V5;
        let keep_alive = *[0u16, 1, 2, 5, 30, 60, u16::MAX].choose(&mut self.rng).unwrap_or(&30);
        let will = self.maybe(0.25, |g| {
            let (topic, _) = g.topic();
            Some(Will {
                topic,
                payload: g.payload(),
                qos: g.rng.random_range(0..=2),
                retain: g.rng.random_bool(0.3),
                properties: if v5 { g.will_properties() } else { Vec::new() },
            })
        });
        let username = self.maybe(0.15, |g| {
            Some(["", "sensor", "ü", "a:b", "x\u{0}y"].choose(&mut g.rng).unwrap_or(&"").to_string())
        });
        let password = if username.is_some() {
            self.maybe(0.5, |g| {
                Some(["", "secret", "pässword"].choose(&mut g.rng).unwrap_or(&"").to_string())
            })
        } else {
            None
        };
        let properties = if v5 { self.connect_properties() } else { Vec::new() };
        Connect {
            version,
            client_id,
            clean: self.rng.random_bool(0.7),
            keep_alive,
            will,
            username,
            password,
            properties,
        }
    }

    fn connect_properties(&mut self) -> Vec<Property> {
        let mut properties = Vec::new();
        if self.rng.random_bool(0.4) {
            let expiry = *[0u32, 1, 10, 3600, u32::MAX].choose(&mut self.rng).unwrap_or(&0);
            properties.push(Property::SessionExpiry(expiry));
        }
        if self.rng.random_bool(0.2) {
            // 0 is a protocol error the broker must refuse.
            properties.push(Property::ReceiveMaximum(self.rng.random_range(0..100)));
        }
        if self.rng.random_bool(0.15) {
            properties.push(Property::MaximumPacketSize(self.rng.random_range(1..2000)));
        }
        if self.rng.random_bool(0.2) {
            properties.push(Property::TopicAliasMaximum(self.rng.random_range(0..10)));
        }
        if self.rng.random_bool(0.1) {
            properties.push(Property::RequestResponseInfo(self.rng.random_range(0..=1)));
        }
        if self.rng.random_bool(0.1) {
            properties.push(Property::RequestProblemInfo(self.rng.random_range(0..=1)));
        }
        if self.rng.random_bool(0.2) {
            properties.push(self.user_property());
        }
        properties
    }

    fn will_properties(&mut self) -> Vec<Property> {
        let mut properties = Vec::new();
        if self.rng.random_bool(0.3) {
            properties.push(Property::WillDelay(self.rng.random_range(0..5)));
        }
        if self.rng.random_bool(0.2) {
            properties.push(Property::MessageExpiry(self.rng.random_range(0..100)));
        }
        if self.rng.random_bool(0.2) {
            properties.push(Property::ContentType("text/plain".to_string()));
        }
        if self.rng.random_bool(0.2) {
            properties.push(self.user_property());
        }
        properties
    }

    fn user_property(&mut self) -> Property {
        let key = ["k", "", "ü", "a\u{1}"].choose(&mut self.rng).unwrap_or(&"k").to_string();
        let value = "v".repeat(self.rng.random_range(0..40));
        Property::UserProperty(key, value)
    }

    /// A fresh packet id, or now and then a reused or zero one.
    fn pkid(&mut self) -> u16 {
        match self.rng.random_range(0..100) {
            0..2 => 0,
            2..5 => self.next_pkid.saturating_sub(1).max(1),
            _ => {
                let pkid = self.next_pkid;
                self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                pkid
            }
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..100) {
            0..5 => 0,
            5..8 => self.rng.random_range(1000..20_000),
            _ => self.rng.random_range(1..64),
        };
        (0..len).map(|_| self.rng.random()).collect()
    }

    fn plain_topic(&mut self) -> String {
        let n = self.rng.random_range(1..=4);
        let levels: Vec<&str> = (0..n).map(|_| *LEVELS.choose(&mut self.rng).unwrap_or(&"t")).collect();
        levels.join("/")
    }

    fn allows(&self, class: Class) -> bool {
        !self.left_out.contains(&class)
    }

    /// A topic name and whether it is one of the hostile kinds.
    fn topic(&mut self) -> (String, bool) {
        let choice = self.rng.random_range(0..100);
        if (55..65).contains(&choice) && !self.allows(Class::NonAscii)
            || (65..75).contains(&choice) && !self.allows(Class::ControlChars)
        {
            return (self.plain_topic(), false);
        }
        match choice {
            0..45 => (self.plain_topic(), false),
            45..55 => (format!("d/{}", self.rng.random::<u32>()), false),
            55..65 => {
                let first = *NON_ASCII_LEVELS.choose(&mut self.rng).unwrap_or(&"ü");
                (format!("{first}/{}", self.plain_topic()), true)
            }
            65..75 => {
                let mut topic: Vec<char> = self.plain_topic().chars().collect();
                let at = self.rng.random_range(0..=topic.len());
                let ascii_only = !self.allows(Class::NonAscii);
                let chars: Vec<char> =
                    HOSTILE_CHARS.iter().copied().filter(|c| c.is_ascii() || !ascii_only).collect();
                topic.insert(at, *chars.choose(&mut self.rng).unwrap_or(&'\u{1}'));
                (topic.into_iter().collect(), true)
            }
            75..78 => ("a/".repeat(self.rng.random_range(100..300)) + "z", true),
            78..81 => ("x".repeat(self.rng.random_range(200..5000)), true),
            81..87 => {
                let topic = ["$SYS/x", "$share/g/t", "$outpost/x", "$", "$SYS/outpost/clients"]
                    .choose(&mut self.rng)
                    .unwrap_or(&"$");
                (topic.to_string(), true)
            }
            87..94 => {
                let topic = ["a/+/b", "#", "a/#", "+", "sensors/+"].choose(&mut self.rng).unwrap_or(&"#");
                (topic.to_string(), true)
            }
            _ => {
                let topic = ["", "/", "//", "a//b", "/a", "a/"].choose(&mut self.rng).unwrap_or(&"");
                (topic.to_string(), true)
            }
        }
    }

    /// A topic filter and whether it is one of the hostile kinds.
    fn filter(&mut self) -> (String, bool) {
        let (filter, hostile) = self.any_filter();
        if filter.starts_with("$share") && !self.allows(Class::SharedSubscriptions) {
            return (self.plain_topic(), false);
        }
        (filter, hostile)
    }

    fn any_filter(&mut self) -> (String, bool) {
        let choice = self.rng.random_range(0..100);
        if (45..60).contains(&choice) && !self.allows(Class::SharedSubscriptions)
            || (70..78).contains(&choice) && !self.allows(Class::NonAscii)
        {
            return (self.plain_topic(), false);
        }
        match choice {
            0..20 => ("#".to_string(), false),
            20..30 => {
                let filter =
                    ["+", "+/+", "sensors/+", "a/+/b", "t/#", "+/#"].choose(&mut self.rng).unwrap_or(&"+");
                (filter.to_string(), false)
            }
            30..45 => (self.plain_topic(), false),
            45..60 => {
                let group = ["g", "h"].choose(&mut self.rng).unwrap_or(&"g");
                let rest = ["t", "#", "sensors/#", "a/+", "+"].choose(&mut self.rng).unwrap_or(&"t");
                (format!("$share/{group}/{rest}"), false)
            }
            60..70 => (format!("f/{}", self.rng.random::<u32>()), false),
            70..78 => {
                let first = *NON_ASCII_LEVELS.choose(&mut self.rng).unwrap_or(&"ü");
                let rest = ["#", "+", "t"].choose(&mut self.rng).unwrap_or(&"#");
                (format!("{first}/{rest}"), true)
            }
            78..85 => {
                let filter = ["a/#/b", "a+", "#/a", "$share//t", "$share/g", "$share/g+/t", "", "a/b#"]
                    .choose(&mut self.rng)
                    .unwrap_or(&"");
                (filter.to_string(), true)
            }
            85..90 => {
                let filter = ["$SYS/#", "$outpost/#", "$SYS/outpost/#", "$+/x"]
                    .choose(&mut self.rng)
                    .unwrap_or(&"$SYS/#");
                (filter.to_string(), true)
            }
            90..96 => {
                let (topic, _) = self.topic();
                (topic, true)
            }
            _ => ("+/".repeat(self.rng.random_range(50..250)) + "#", true),
        }
    }

    fn plain_publish(&mut self) -> Publish {
        Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: self.plain_topic(),
            pkid: 0,
            payload: self.payload(),
            properties: Vec::new(),
        }
    }

    fn publish(&mut self, version: Version) -> (Packet, bool) {
        let (topic, hostile) = self.topic();
        let qos = self.rng.random_range(0..=2);
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        let mut properties = Vec::new();
        let mut topic = topic;
        if version == Version::V5 && self.rng.random_bool(0.3) {
            properties = self.publish_properties();
            if properties.iter().any(|p| matches!(p, Property::TopicAlias(_))) && self.rng.random_bool(0.5) {
                // Use an alias alone: valid only if this connection set it before.
                topic = String::new();
            }
        }
        let publish = Publish {
            dup: self.rng.random_bool(0.05),
            qos,
            retain: self.rng.random_bool(0.15),
            topic,
            pkid,
            payload: self.payload(),
            properties,
        };
        // Properties are passed on upstream, where a broker may refuse what a client chose.
        let hostile = hostile || !publish.properties.is_empty();
        (Packet::Publish(publish), hostile)
    }

    fn publish_properties(&mut self) -> Vec<Property> {
        let mut properties = Vec::new();
        for _ in 0..self.rng.random_range(1..=3) {
            let property = match self.rng.random_range(0..8) {
                0 => Property::PayloadFormat(self.rng.random_range(0..=1)),
                1 => Property::MessageExpiry(self.rng.random_range(0..10)),
                2 => Property::TopicAlias(self.rng.random_range(0..6)),
                3 => Property::ResponseTopic(self.plain_topic()),
                4 => Property::CorrelationData(self.payload()),
                5 => Property::ContentType("application/json".to_string()),
                // Only a server may send this one.
                6 => Property::SubscriptionId(self.rng.random_range(1..1000)),
                _ => self.user_property(),
            };
            properties.push(property);
        }
        properties
    }

    fn subscription_options(&mut self, version: Version) -> u8 {
        let qos = self.rng.random_range(0..=2);
        match version {
            Version::V311 => qos,
            Version::V5 => {
                let no_local = u8::from(self.rng.random_bool(0.2)) << 2;
                let retain_as_published = u8::from(self.rng.random_bool(0.2)) << 3;
                let retain_handling = self.rng.random_range(0..=2) << 4;
                qos | no_local | retain_as_published | retain_handling
            }
        }
    }

    fn subscribe(&mut self, version: Version) -> (Packet, bool) {
        let mut hostile = false;
        let subscriptions = (0..self.rng.random_range(1..=3))
            .map(|_| {
                let (filter, odd) = self.filter();
                hostile |= odd;
                self.subscribed.push(filter.clone());
                Subscription { filter, options: self.subscription_options(version) }
            })
            .collect();
        let properties = if version == Version::V5 && self.rng.random_bool(0.2) {
            vec![Property::SubscriptionId(self.rng.random_range(1..100_000)), self.user_property()]
        } else {
            Vec::new()
        };
        let pkid = self.subscribe_pkid();
        (Packet::Subscribe { pkid, subscriptions, properties }, hostile)
    }

    /// SUBSCRIBE and UNSUBSCRIBE ids: fresh, seldom zero.
    fn subscribe_pkid(&mut self) -> u16 {
        let pkid = self.pkid();
        if pkid == 0 && self.rng.random_bool(0.5) { 1 } else { pkid }
    }

    fn unsubscribe(&mut self, version: Version) -> Packet {
        let filters: Vec<String> = (0..self.rng.random_range(1..=3))
            .map(|_| match self.subscribed.choose(&mut self.rng) {
                Some(filter) if self.rng.random_bool(0.8) => filter.clone(),
                _ => self.filter().0,
            })
            .collect();
        let properties = if version == Version::V5 && self.rng.random_bool(0.1) {
            vec![self.user_property()]
        } else {
            Vec::new()
        };
        Packet::Unsubscribe { pkid: self.subscribe_pkid(), filters, properties }
    }

    /// Subscribes to many distinct filters and unsubscribes them again: state the broker must
    /// release.
    fn filter_burst(&mut self, version: Version, steps: &mut Vec<Step>) {
        let base = self.rng.random::<u32>();
        for n in 0..self.rng.random_range(20..200u32) {
            let filter = format!("f/{base:x}/{n}");
            let options = self.subscription_options(version);
            let pkid = self.subscribe_pkid();
            let subscribe = Packet::Subscribe {
                pkid,
                subscriptions: vec![Subscription { filter: filter.clone(), options }],
                properties: Vec::new(),
            };
            steps.push(Step::Send { packet: subscribe, hostile: false });
            let pkid = self.subscribe_pkid();
            let unsubscribe = Packet::Unsubscribe { pkid, filters: vec![filter], properties: Vec::new() };
            steps.push(Step::Send { packet: unsubscribe, hostile: false });
        }
    }

    /// Publishes to many distinct topics under `d/`, which `#` and `d/#` subscribers match.
    fn topic_burst(&mut self, _version: Version, steps: &mut Vec<Step>) {
        let base = self.rng.random::<u32>();
        for n in 0..self.rng.random_range(20..200u32) {
            let publish = Publish {
                dup: false,
                qos: 0,
                retain: false,
                topic: format!("d/{base:x}/{n}"),
                pkid: 0,
                payload: vec![b'0' + (n % 10) as u8],
                properties: Vec::new(),
            };
            steps.push(Step::Send { packet: Packet::Publish(publish), hostile: false });
        }
    }

    fn bad_connect(&mut self, client_id: &str) -> Packet {
        let mut body = Vec::new();
        let (name, level) = match self.rng.random_range(0..4) {
            0 => ("MQIsdp", 3),
            1 => ("MQTT", 3),
            2 => ("MQTT", 6),
            _ => ("MQTX", 4),
        };
        super::wire::put_str(&mut body, name);
        body.push(level);
        body.push(0x02);
        body.extend_from_slice(&30u16.to_be_bytes());
        super::wire::put_str(&mut body, client_id);
        Packet::Raw { what: format!("CONNECT protocol {name:?} level {level}"), bytes: frame(0x10, &body) }
    }

    /// A packet cut short: a client that died halfway through a write.
    fn cut_packet(&mut self, version: Version) -> Packet {
        let (packet, _) = self.publish(version);
        let bytes = encode(&packet, version);
        let cut = self.rng.random_range(1..bytes.len().max(2));
        Packet::Raw {
            what: format!("the first {cut} bytes of {}", packet.describe()),
            bytes: bytes[..cut].to_vec(),
        }
    }

    fn malformed(&mut self, version: Version) -> Packet {
        let (raw, what): (Vec<u8>, String) = match self.rng.random_range(0..9) {
            0 => {
                let bytes: Vec<u8> = (0..self.rng.random_range(1..64)).map(|_| self.rng.random()).collect();
                (bytes, "random bytes".to_string())
            }
            1 => return self.cut_packet(version),
            2 => (vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f], "a 5-byte remaining length".to_string()),
            3 => {
                let (packet, _) = self.publish(version);
                let mut bytes = encode(&packet, version);
                // Claim more or fewer bytes than follow: the next packet is read from the middle.
                if bytes.len() > 2 && bytes[1] < 0x7f {
                    bytes[1] =
                        if self.rng.random_bool(0.5) { bytes[1] + 1 } else { bytes[1].saturating_sub(1) };
                }
                (bytes, format!("{} with a wrong remaining length", packet.describe()))
            }
            4 => {
                let first = *[0x00u8, 0xf0, 0x80, 0x36, 0x60, 0xa0, 0x21].choose(&mut self.rng).unwrap_or(&0);
                (
                    frame(first, &[0x00, 0x01, 0x00]),
                    format!("first byte {first:#04x}: reserved type or flags"),
                )
            }
            5 => {
                let bad: &[u8] = [&[0xffu8, 0xfe][..], &[0xed, 0xa0, 0x80], &[0xc0, 0xaf], &[b'a', 0x80]]
                    .choose(&mut self.rng)
                    .copied()
                    .unwrap_or(&[0xff]);
                let mut body = Vec::new();
                super::wire::put_bytes(&mut body, bad);
                body.extend_from_slice(&[0x00, 0x07]);
                if version == Version::V5 {
                    body.push(0);
                }
                body.extend_from_slice(b"payload");
                (
                    frame(0x32, &body),
                    format!("PUBLISH QoS 1 with invalid UTF-8 topic {}", super::wire::hex(bad)),
                )
            }
            6 => {
                // A string length running past the end of the packet.
                let mut body = vec![0x7f, 0xff];
                body.extend_from_slice(b"short");
                (frame(0x30, &body), "PUBLISH whose topic length runs past the packet".to_string())
            }
            7 => {
                let mut flipped = encode(&self.publish(version).0, version);
                let at = self.rng.random_range(0..flipped.len());
                flipped[at] ^= 1 << self.rng.random_range(0..8);
                (flipped, format!("a PUBLISH with a bit flipped at byte {at}"))
            }
            _ => {
                // A SUBSCRIBE with no subscriptions, or with options QoS 3.
                let empty = self.rng.random_bool(0.5);
                let mut body = vec![0x00, 0x09];
                if version == Version::V5 {
                    body.push(0);
                }
                if !empty {
                    super::wire::put_str(&mut body, "t");
                    body.push(0x03);
                }
                let what = if empty { "SUBSCRIBE without subscriptions" } else { "SUBSCRIBE with QoS 3" };
                (frame(0x82, &body), what.to_string())
            }
        };
        Packet::Raw { what, bytes: raw }
    }

    fn maybe<T: Default>(&mut self, probability: f64, make: impl FnOnce(&mut Self) -> T) -> T {
        if self.rng.random_bool(probability) { make(self) } else { T::default() }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use proptest::prelude::*;
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5;

    use super::*;

    /// Decodes `bytes` with rumqttc and describes the packet in a form [`expected`] also gives.
    fn decoded(bytes: &[u8], version: Version) -> Result<String, String> {
        let mut buffer = BytesMut::from(bytes);
        let description = match version {
            Version::V311 => match v4::Packet::read(&mut buffer, 1 << 20).map_err(|e| format!("{e:?}"))? {
                v4::Packet::Connect(c) => format!(
                    "CONNECT {:?} {} {} will {:?} login {:?}",
                    c.client_id,
                    c.clean_session,
                    c.keep_alive,
                    c.last_will.map(|w| (w.topic, w.message.to_vec(), w.qos as u8, w.retain)),
                    c.login.map(|l| (l.username, l.password)),
                ),
                v4::Packet::Publish(p) => {
                    format!(
                        "PUBLISH {} {} {} {:?} {} {:?}",
                        p.dup,
                        p.qos as u8,
                        p.retain,
                        p.topic,
                        p.pkid,
                        p.payload.to_vec()
                    )
                }
                v4::Packet::PubAck(a) => format!("PUBACK {}", a.pkid),
                v4::Packet::PubRec(a) => format!("PUBREC {}", a.pkid),
                v4::Packet::PubRel(a) => format!("PUBREL {}", a.pkid),
                v4::Packet::PubComp(a) => format!("PUBCOMP {}", a.pkid),
                v4::Packet::Subscribe(s) => {
                    let filters: Vec<(String, u8)> =
                        s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect();
                    format!("SUBSCRIBE {} {filters:?}", s.pkid)
                }
                v4::Packet::Unsubscribe(u) => format!("UNSUBSCRIBE {} {:?}", u.pkid, u.topics),
                v4::Packet::PingReq => "PINGREQ".to_string(),
                v4::Packet::Disconnect => "DISCONNECT".to_string(),
                other => format!("unexpected {other:?}"),
            },
            Version::V5 => match v5::Packet::read(&mut buffer, None).map_err(|e| format!("{e:?}"))? {
                v5::Packet::Connect(c, will, login) => format!(
                    "CONNECT {:?} {} {} will {:?} login {:?} expiry {:?}",
                    c.client_id,
                    c.clean_start,
                    c.keep_alive,
                    will.map(|w| (
                        String::from_utf8_lossy(&w.topic).into_owned(),
                        w.message.to_vec(),
                        w.qos as u8,
                        w.retain
                    )),
                    login.map(|l| (l.username, l.password)),
                    c.properties.and_then(|p| p.session_expiry_interval),
                ),
                v5::Packet::Publish(p) => format!(
                    "PUBLISH {} {} {} {:?} {} {:?} alias {:?} user {:?}",
                    p.dup,
                    p.qos as u8,
                    p.retain,
                    String::from_utf8_lossy(&p.topic),
                    p.pkid,
                    p.payload.to_vec(),
                    p.properties.as_ref().and_then(|p| p.topic_alias),
                    p.properties.map(|p| p.user_properties).unwrap_or_default(),
                ),
                v5::Packet::PubAck(a) => format!("PUBACK {}", a.pkid),
                v5::Packet::PubRec(a) => format!("PUBREC {}", a.pkid),
                v5::Packet::PubRel(a) => format!("PUBREL {}", a.pkid),
                v5::Packet::PubComp(a) => format!("PUBCOMP {}", a.pkid),
                v5::Packet::Subscribe(s) => {
                    let filters: Vec<(String, u8)> =
                        s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect();
                    format!("SUBSCRIBE {} {filters:?}", s.pkid)
                }
                v5::Packet::Unsubscribe(u) => format!("UNSUBSCRIBE {} {:?}", u.pkid, u.filters),
                v5::Packet::PingReq(_) => "PINGREQ".to_string(),
                v5::Packet::Disconnect(d) => format!("DISCONNECT {:#04x}", d.reason_code as u8),
                other => format!("unexpected {other:?}"),
            },
        };
        if !buffer.is_empty() {
            return Err(format!("{} bytes left over after {description}", buffer.len()));
        }
        Ok(description)
    }

    /// What [`decoded`] must say about `packet`.
    fn expected(packet: &Packet, version: Version) -> String {
        let v5 = version == Version::V5;
        match packet {
            Packet::Connect(c) => {
                let will = c.will.as_ref().map(|w| (w.topic.clone(), w.payload.clone(), w.qos, w.retain));
                // rumqttc reads an empty username without a password as no login at all.
                let login = c
                    .username
                    .clone()
                    .map(|u| (u, c.password.clone().unwrap_or_default()))
                    .filter(|(u, p)| !(u.is_empty() && p.is_empty()));
                let mut text = format!(
                    "CONNECT {:?} {} {} will {will:?} login {login:?}",
                    c.client_id, c.clean, c.keep_alive
                );
                if v5 {
                    let expiry = c.properties.iter().rev().find_map(|p| match p {
                        Property::SessionExpiry(e) => Some(*e),
                        _ => None,
                    });
                    text.push_str(&format!(" expiry {expiry:?}"));
                }
                text
            }
            Packet::Publish(p) => {
                let mut text = format!(
                    "PUBLISH {} {} {} {:?} {} {:?}",
                    p.dup, p.qos, p.retain, p.topic, p.pkid, p.payload
                );
                if v5 {
                    let alias = p.properties.iter().rev().find_map(|p| match p {
                        Property::TopicAlias(a) => Some(*a),
                        _ => None,
                    });
                    let user: Vec<(String, String)> = p
                        .properties
                        .iter()
                        .filter_map(|p| match p {
                            Property::UserProperty(k, v) => Some((k.clone(), v.clone())),
                            _ => None,
                        })
                        .collect();
                    text.push_str(&format!(" alias {alias:?} user {user:?}"));
                }
                text
            }
            Packet::Ack { kind, pkid, .. } => format!("{} {pkid}", kind.name()),
            Packet::Subscribe { pkid, subscriptions, .. } => {
                let filters: Vec<(String, u8)> =
                    subscriptions.iter().map(|s| (s.filter.clone(), s.options & 0b11)).collect();
                format!("SUBSCRIBE {pkid} {filters:?}")
            }
            Packet::Unsubscribe { pkid, filters, .. } => format!("UNSUBSCRIBE {pkid} {filters:?}"),
            Packet::PingReq => "PINGREQ".to_string(),
            Packet::Disconnect { reason, .. } if v5 => format!("DISCONNECT {reason:#04x}"),
            Packet::Disconnect { .. } => "DISCONNECT".to_string(),
            Packet::Raw { what, .. } => format!("raw {what}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Every well-formed packet the grammar makes decodes, field for field, with rumqttc's
        /// codec for the session's version.
        #[test]
        fn well_formed_packets_decode(seed in any::<u64>()) {
            prop_assert_eq!(undecodable(seed), None);
        }

        /// The same seed gives the same session; the grammar draws nothing from elsewhere.
        #[test]
        fn sessions_are_reproducible(seed in any::<u64>()) {
            prop_assert_eq!(session(seed), session(seed));
        }

        /// No fuzzed session can take over a canary's connection.
        #[test]
        fn client_ids_avoid_the_canaries(seed in any::<u64>()) {
            prop_assert!(!session(seed).client_id.starts_with(RESERVED_ID_PREFIX));
        }
    }

    /// The first well-formed packet of session `seed` that rumqttc does not decode to what
    /// [`expected`] says, with both descriptions.
    fn undecodable(seed: u64) -> Option<(Result<String, String>, String)> {
        let session = session(seed);
        session.steps.iter().find_map(|step| {
            let Step::Send { packet, .. } = step else { return None };
            if !packet.is_well_formed() {
                return None;
            }
            let got = decoded(&encode(packet, session.version), session.version);
            let want = expected(packet, session.version);
            (got.as_ref() != Ok(&want)).then_some((got, want))
        })
    }

    /// Found by the proptest: a PUBLISH with a two-byte Subscription Identifier, which a
    /// client may not send and rumqttc's decoder misreads.
    #[test]
    fn a_publish_with_a_subscription_id_is_not_counted_well_formed() {
        assert_eq!(undecodable(8_074_719_735_127_874_226), None);
    }

    #[test]
    fn left_out_classes_do_not_appear() {
        let left_out = [Class::NonAscii, Class::ControlChars, Class::SharedSubscriptions];
        for seed in 0..2000 {
            for step in session_without(seed, &left_out).steps {
                let Step::Send { packet, .. } = step else { continue };
                let (texts, filters): (Vec<String>, bool) = match packet {
                    Packet::Publish(p) => (vec![p.topic], false),
                    Packet::Subscribe { subscriptions, .. } => {
                        (subscriptions.into_iter().map(|s| s.filter).collect(), true)
                    }
                    _ => continue,
                };
                for text in texts {
                    assert!(
                        text.is_ascii() && !text.chars().any(|c| c.is_control()),
                        "{text:?} in session {seed}"
                    );
                    assert!(!(filters && text.starts_with("$share")), "{text:?} in session {seed}");
                }
            }
        }
    }

    /// The grammar covers what the session fuzzer promises: both versions, takeovers, `$share`,
    /// wildcards, hostile topics, malformed packets, every QoS.
    #[test]
    fn covers_the_grammar() {
        let sessions: Vec<Session> = (0..2000).map(session).collect();
        let packets: Vec<&Packet> = sessions
            .iter()
            .flat_map(|s| s.steps.iter())
            .filter_map(|step| match step {
                Step::Send { packet, .. } => Some(packet),
                Step::Wait(_) => None,
            })
            .collect();
        let publishes: Vec<&Publish> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect();
        let filters: Vec<&str> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Subscribe { subscriptions, .. } => {
                    Some(subscriptions.iter().map(|s| s.filter.as_str()))
                }
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            sessions.iter().any(|s| s.version == Version::V311)
                && sessions.iter().any(|s| s.version == Version::V5)
        );
        assert!(sessions.iter().any(|s| s.client_id.is_empty()));
        assert!(sessions.iter().filter(|s| s.client_id == "fz-0").count() > 10, "shared ids make takeovers");
        for qos in 0..=2 {
            assert!(publishes.iter().any(|p| p.qos == qos), "QoS {qos}");
        }
        assert!(publishes.iter().any(|p| p.retain));
        assert!(publishes.iter().any(|p| p.topic.starts_with('ü')), "non-ASCII first character");
        assert!(publishes.iter().any(|p| p.topic.contains('\u{1}')), "control character");
        assert!(publishes.iter().any(|p| p.topic.contains('\u{ffff}')), "non-character");
        assert!(publishes.iter().any(|p| p.topic.split('/').count() > 200), "many levels");
        assert!(publishes.iter().any(|p| p.topic.contains('#') || p.topic.contains('+')), "wildcards");
        assert!(filters.iter().any(|f| f.starts_with("$share/")));
        assert!(filters.contains(&"#") && filters.iter().any(|f| f.contains('+')));
        assert!(packets.iter().any(|p| matches!(p, Packet::Unsubscribe { .. })));
        assert!(packets.iter().any(|p| matches!(p, Packet::Raw { .. })));
        assert!(packets.iter().any(|p| matches!(p, Packet::Connect(c) if c.will.is_some())));
        assert!(packets.iter().any(|p| matches!(p, Packet::Connect(c) if !c.clean)));
        assert!(packets.iter().any(|p| matches!(p, Packet::Connect(c) if c.keep_alive == 0)));
        assert!(packets.iter().any(|p| matches!(p, Packet::Ack { kind: AckKind::PubRel, .. })));
        assert!(sessions.iter().any(|s| s.deliveries == AckPolicy::Never));
        assert!(sessions.iter().any(|s| s.deliveries == AckPolicy::Reversed));
    }
}
