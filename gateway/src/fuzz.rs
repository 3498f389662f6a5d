//! The entry functions of the fuzz targets in `gateway/fuzz/`, one per target: each target is
//! one call into here, and `gateway/tests/fuzz_corpus.rs` calls the same function on every
//! committed corpus file and every crash reproducer (`gateway/fuzz/{corpus,regressions}/`), so
//! the normal test suite replays what the fuzzers found on stable Rust.
//!
//! Every function takes arbitrary bytes and must return; a panic is a finding (the daemon
//! aborts on any panic, see `cli::abort_on_panic`). Besides "no panic", each checks what its
//! code promises on every input (the `assert!`s): a failed assertion is a finding too.
//!
//! Not part of the gateway's API: nothing but the fuzz targets and their replay test calls it.

use std::path::Path;

use bytes::BytesMut;

use crate::auth::acl::{Acl, Want, filter_covers, filters_overlap};
use crate::auth::password::{self, Hash, PasswordFile};
use crate::broker::subs::SubTrie;
use crate::config::{GatewayConfig, MqttVersion};
use crate::mqtt::codec::Codec;
use crate::mqtt::topic::{
    self, NameError, Topic, TopicFilter, TopicPolicy, filter_matches, invalid_filter, invalid_topic,
    split_shared,
};
use crate::mqtt::upstream::parse_incoming;
use crate::mqtt::wire::{self, Version};

/// Inputs made of a file and probes put this byte between them: 0xFF never occurs in UTF-8,
/// so the file part stays text the fuzzer can grow.
const SEPARATOR: u8 = 0xFF;

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == SEPARATOR) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

/// What reads a sensor's socket: the fixed header and its variable byte integer, the CONNECT
/// version sniffing and the PUBLISH header peek (`mqtt::wire`), and rumqttd's MQTT 3.1.1 and
/// 5 decoders behind `mqtt::codec::Codec`. Anything a sensor sends must decode, ask for more,
/// or fail: a panic here would let one sensor stop the gateway.
pub fn sensor_wire(data: &[u8]) {
    let _ = wire::connect_version(data);
    let _ = wire::fixed_header(data);
    // A variable byte integer read back re-encodes to the same value, in at most the bytes it
    // took (a sensor may pad one; we never do).
    if let Ok(Some((value, used))) = wire::read_varint(data) {
        let mut out = BytesMut::new();
        wire::put_varint(&mut out, value);
        assert!(out.len() <= used && out.len() == wire::varint_len(value), "{value} in {used} bytes");
        assert_eq!(wire::read_varint(&out), Ok(Some((value, out.len()))));
    }
    for version in [Version::V4, Version::V5] {
        let mut codec = Codec::new(version);
        let mut buf = BytesMut::from(data);
        // Each packet is peeked before it is decoded, as the connection does.
        while !buf.is_empty() {
            let _ = wire::peek_publish(&buf);
            if codec.read(&mut buf, 64 * 1024).is_err() {
                break;
            }
        }
    }
}

/// What reads the upstream's socket (`mqtt::upstream::parse_incoming`), for MQTT 3.1.1 and 5:
/// it returns a packet, asks for more, or fails; it never consumes a packet it did not return.
pub fn upstream_wire(data: &[u8]) {
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            match parse_incoming(&mut buf, version) {
                Ok(Some(_)) => assert!(buf.len() < before),
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// MQTT §4.7 read literally, over levels: `+` takes one level, `#` the rest (none included),
/// anything else itself; a topic starting with `$` is not matched by a leading wildcard.
fn naive_matches(filter: &str, topic: &str) -> bool {
    fn levels(filter: &[&str], topic: &[&str]) -> bool {
        match (filter.split_first(), topic.split_first()) {
            (Some((&"#", _)), _) => true,
            (Some((&f, f_rest)), Some((&t, t_rest))) => (f == "+" || f == t) && levels(f_rest, t_rest),
            (None, None) => true,
            _ => false,
        }
    }
    let filter: Vec<&str> = filter.split('/').collect();
    let topic: Vec<&str> = topic.split('/').collect();
    if topic[0].starts_with('$') && matches!(filter[0], "+" | "#") {
        return false;
    }
    levels(&filter, &topic)
}

/// Topic filters and names (`outpost-topic`, shared by the broker, the routes and the rules),
/// checked against the spec read literally, against the broker's `SubTrie`, and against what
/// the validators promise each other. The input is `filter 0xFF topic`; inputs that are not
/// UTF-8 on either side are skipped.
pub fn topic(data: &[u8]) {
    let (filter, name) = split(data);
    let (Ok(filter), Ok(name)) = (std::str::from_utf8(filter), std::str::from_utf8(name)) else {
        return;
    };

    // Matching: one function, whatever the filter, agrees with the spec read literally.
    assert_eq!(filter_matches(filter, name), naive_matches(filter, name), "{filter:?} vs {name:?}");

    // Filter validation: the newtype and the function agree.
    let valid_filter = invalid_filter(filter).is_none();
    assert_eq!(TopicFilter::new(filter).is_ok(), valid_filter, "{filter:?}");
    if let (Some(group), rest) = split_shared(filter) {
        assert_eq!(format!("$share/{group}/{rest}"), filter);
    }

    // Name validation: `Topic` is MQTT's rules alone; `invalid_topic` adds characters upstream
    // brokers refuse and the policy's limits.
    let mqtt = invalid_topic(name, &TopicPolicy::MQTT);
    let mqtt_ok = matches!(mqtt, None | Some(NameError::Control | NameError::NonCharacter));
    assert_eq!(Topic::new(name).is_ok(), mqtt_ok && name.len() <= topic::MAX_LENGTH, "{name:?}");
    if mqtt.is_none() {
        let policy = TopicPolicy { max_levels: 3, max_length: 16 };
        let levels = name.split('/').count();
        let expected = if name.len() > 16 {
            Some(NameError::TooLong)
        } else if levels > 3 {
            Some(NameError::TooManyLevels)
        } else {
            None
        };
        assert_eq!(invalid_topic(name, &policy), expected, "{name:?}");
        // A name is a filter that matches itself; `#` matches it unless it starts with `$`.
        assert!(filter_matches(name, name), "{name:?}");
        assert_eq!(filter_matches("#", name), !name.starts_with('$'), "{name:?}");
    }

    // The broker's trie agrees with the function for what reaches it: valid filters, and
    // names without wildcards or U+0000.
    if valid_filter && mqtt_ok {
        let mut trie: SubTrie<u8, u8> = SubTrie::default();
        trie.subscribe(&1u8, filter, 1);
        let mut out = Vec::new();
        trie.matches(name, |_| true, |_, _| true, &mut out);
        assert_eq!(!out.is_empty(), filter_matches(split_shared(filter).1, name), "{filter:?} vs {name:?}");
        trie.unsubscribe(&1u8, filter);
        assert_eq!((trie.len(), trie.nodes()), (0, 0));
    }
}

/// A config file's text to a validated `GatewayConfig` (`GatewayConfig::parse`, which goes on
/// after each problem to find the others, then `validate`), as `outpost run` and `outpost
/// check` read it, short of reading the files it names. Every refusal is a message that
/// names the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let origin = "fuzz.toml";
    let problems = match GatewayConfig::parse(text, Path::new(origin)) {
        Ok(config) => match config.validate(origin) {
            Ok(()) => {
                let _ = (
                    config.broker.topic_policy(),
                    config.broker.has_passwords(),
                    config.broker.allow_anonymous(),
                );
                return;
            }
            Err(problems) => problems,
        },
        Err(problems) => problems,
    };
    assert!(!problems.0.is_empty(), "a refusal without a problem");
    for problem in problems.0 {
        let message = problem.to_string();
        assert!(message.starts_with(origin), "{message:?} does not name the file");
    }
}

/// A topic the filter matches: each `+` and `#` level made `x` (so `a/#` gives `a/x`).
fn topic_of(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| if matches!(level, "+" | "#") { "x" } else { level })
        .collect::<Vec<_>>()
        .join("/")
}

/// Mosquitto's ACL file (`auth::acl`). The input is `file 0xFF probes`: the probes are lines,
/// a client id, a username (empty: anonymous), then topic filters. For each client and each
/// valid probe filter, and each filter overlap/cover question between them, the answers agree
/// with each other: a filter whose topics the client may read is a subscription it may make.
pub fn acl_file(data: &[u8]) {
    let (file, probes) = split(data);
    let Ok(text) = std::str::from_utf8(file) else { return };
    let acl = match Acl::parse(text, Path::new("acl")) {
        Ok(acl) => acl,
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("acl: line "), "{message:?}");
            return;
        }
    };
    let _ = acl.len();
    let probes = String::from_utf8_lossy(probes);
    let mut lines = probes.lines();
    let client_id = lines.next().unwrap_or("client");
    let username = lines.next().filter(|u| !u.is_empty());
    let clients = [acl.for_client(username, client_id), acl.for_client(None, client_id)];
    let filters: Vec<&str> =
        lines.take(8).map(|f| split_shared(f).1).filter(|f| TopicFilter::new(*f).is_ok()).collect();
    for filter in &filters {
        let topic = topic_of(filter);
        assert!(filter_matches(filter, &topic), "{filter:?} vs {topic:?}");
        for client in &clients {
            let _ = client.allows(&topic, Want::Write);
            if client.allows(&topic, Want::Read) {
                assert!(client.may_subscribe(filter), "{topic:?} is readable, {filter:?} refused");
            }
        }
        for other in &filters {
            let covers = filter_covers(filter, other);
            let overlap = filters_overlap(filter, other);
            assert_eq!(overlap, filters_overlap(other, filter), "{filter:?} vs {other:?}");
            if covers {
                assert!(overlap, "{filter:?} covers {other:?} without overlapping it");
                assert!(filter_matches(filter, &topic_of(other)), "{filter:?} covers {other:?}");
            }
            if filter_matches(filter, &topic_of(other)) && filter_matches(other, &topic_of(other)) {
                assert!(overlap, "{filter:?} and {other:?} share {:?}", topic_of(other));
            }
        }
    }
}

/// Hashes this cheap are verified on every input; dearer ones only parsed.
const VERIFY_MAX_ROUNDS: u32 = 64;

/// Mosquitto's password file (`auth::password`). The input is `file 0xFF probes`: the probes
/// are lines, each a username. A file that parses keeps its hashes through encode and parse;
/// setting or deleting a probe user (`outpost passwd`) gives a file that parses with that user
/// set or gone and every other user as it was; an error never shows a hash.
pub fn password_file(data: &[u8]) {
    let (file, probes) = split(data);
    let Ok(text) = std::str::from_utf8(file) else { return };
    let parsed = match PasswordFile::parse(text, Path::new("passwd")) {
        Ok(parsed) => parsed,
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("passwd: line "), "{message:?}");
            // A hash field long enough not to occur by chance in the wording stays out of it,
            // unless the same text is also in what an error may show of a line: its username
            // (`user:…`), or for a line without `:` what comes before its first `$`.
            let shown: Vec<String> = text
                .lines()
                .map(|l| match (l.trim().split_once(':'), l.trim().split_once('$')) {
                    (Some((user, _)), _) => format!("{}:…", user.trim()),
                    (None, Some((before, _))) => format!("{before}$…"),
                    (None, None) => l.trim().to_owned(),
                })
                .collect();
            for field in text.lines().filter_map(|l| l.split_once(':')).flat_map(|(_, h)| h.split('$')) {
                // Salts and hashes are base64; other text may be the message's own wording.
                let base64 = field.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
                let may_show = !base64 || shown.iter().any(|s| s.contains(field));
                assert!(
                    field.len() < 12 || may_show || !message.contains(field),
                    "{message:?} shows {field:?}"
                );
            }
            return;
        }
    };
    let probes = String::from_utf8_lossy(probes);
    let new_hash = Hash::Sha512 { salt: b"fuzz".to_vec(), hash: vec![7; 64] };
    for username in probes.lines().take(4) {
        if let Some((hash, _known)) = parsed.lookup(username) {
            assert_eq!(Hash::parse(&hash.encode()).as_ref(), Ok(hash), "{hash:?}");
            if hash.rounds() <= VERIFY_MAX_ROUNDS {
                let _ = hash.verify(username.as_bytes());
            }
        }
        if password::invalid_username(username).is_some() {
            continue;
        }
        let known = parsed.lookup(username).is_some_and(|(_, known)| known);
        let set = password::set_user(text, username, &new_hash);
        let after = PasswordFile::parse(&set, Path::new("passwd"))
            .unwrap_or_else(|e| panic!("setting {username:?} broke the file: {e}"));
        assert_eq!(after.lookup(username), Some((&new_hash, true)), "{username:?} not set");
        assert_eq!(after.len(), parsed.len() + usize::from(!known), "setting {username:?}");
        match password::delete_user(text, username) {
            Some(deleted) => {
                assert!(known, "{username:?} deleted but not in the file");
                let after = PasswordFile::parse(&deleted, Path::new("passwd"))
                    .unwrap_or_else(|e| panic!("deleting {username:?} broke the file: {e}"));
                assert!(after.lookup(username).is_none_or(|(_, known)| !known), "{username:?} not deleted");
                assert_eq!(after.len() + 1, parsed.len(), "deleting {username:?}");
            }
            None => assert!(!known, "{username:?} is in the file but was not deleted"),
        }
    }
}
