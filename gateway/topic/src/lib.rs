//! MQTT topic names and topic filters (MQTT 3.1.1 and MQTT 5, §4.7): validation and matching,
//! in one place for the gateway's broker and routes and for the rules crate.
//!
//! - [`invalid_topic`] says why a topic name cannot be published to, if it cannot: MQTT's own
//!   rules plus a [`TopicPolicy`], the limits of the upstream brokers events are relayed to.
//! - [`invalid_filter`] says why a topic filter is not well formed, if it is not;
//!   [`filter_matches`] matches one topic name against one filter; [`split_shared`] takes a
//!   shared subscription (`$share/group/filter`) apart.
//! - [`Topic`] and [`TopicFilter`] are the validated newtypes configuration and rules hold;
//!   their [`TopicError`] quotes the input and says how to fix it.
//!
//! # Invariants
//! - Pure and std-only: no I/O, no dependency, nothing that knows about the pipeline.
//! - The functions the broker calls per publish ([`invalid_topic`], [`filter_matches`])
//!   allocate nothing.
//! - Leading wildcards (`#`, `+` at the first level) never match a topic that starts with `$`
//!   (§4.7.2); a filter that starts with `$` matches such topics as usual. `a/#` matches `a`.
//! - Matching works on `&str` levels, never on byte offsets, so any UTF-8 topic is safe; it
//!   never fails or panics, whatever the filter.

use std::fmt;

/// MQTT's limit on a topic's length in bytes (a two-byte length prefix).
pub const MAX_LENGTH: usize = u16::MAX as usize;

/// What a topic name must satisfy besides MQTT's own rules: the limits of the upstream
/// brokers it will be relayed to (the gateway's `broker.max_topic_levels` and
/// `broker.max_topic_length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicPolicy {
    pub max_levels: usize,
    pub max_length: usize,
}

impl TopicPolicy {
    /// MQTT's own limits only: any level count, 65,535 bytes.
    pub const MQTT: TopicPolicy = TopicPolicy { max_levels: usize::MAX, max_length: MAX_LENGTH };
}

/// Why a topic name is refused by [`invalid_topic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    Wildcard,
    Nul,
    /// U+0001–U+001F or U+007F–U+009F.
    Control,
    /// U+FDD0–U+FDEF or U+xFFFE/U+xFFFF.
    NonCharacter,
    TooManyLevels,
    TooLong,
}

impl NameError {
    /// Whether MQTT itself forbids it (a protocol violation) rather than the upstream brokers'
    /// limits: the former closes the connection, the latter is refused per publish (MQTT 5).
    pub fn is_protocol_violation(self) -> bool {
        matches!(self, NameError::Empty | NameError::Wildcard | NameError::Nul)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NameError::Empty => "empty (topic aliases are not offered)",
            NameError::Wildcard => "wildcards are not allowed in a topic name",
            NameError::Nul => "U+0000 is not allowed in a topic name",
            NameError::Control => "a control character (U+0001–U+001F, U+007F–U+009F)",
            NameError::NonCharacter => "a Unicode non-character (U+FDD0–U+FDEF, U+xFFFE, U+xFFFF)",
            NameError::TooManyLevels => "more levels than broker.max_topic_levels",
            NameError::TooLong => "longer than broker.max_topic_length",
        }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn refused_char(c: char) -> Option<NameError> {
    let n = u32::from(c);
    if n == 0 {
        Some(NameError::Nul)
    } else if n < 0x20 || (0x7F..=0x9F).contains(&n) {
        Some(NameError::Control)
    } else if (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE {
        Some(NameError::NonCharacter)
    } else {
        None
    }
}

/// Why `topic` cannot be published to, if it cannot. MQTT forbids an empty topic (no aliases
/// are offered), wildcards, U+0000 and more than 65,535 bytes; common upstream brokers also
/// refuse control characters and Unicode non-characters (mosquitto 2.0.11 closes the
/// connection over either, measured) and limit the levels (mosquitto: 201, EMQX: 128 by
/// default). An upstream that closes the link over an event gets it again first after every
/// reconnect, so whatever the policy lets through must be what the upstream accepts.
pub fn invalid_topic(topic: &str, policy: &TopicPolicy) -> Option<NameError> {
    if topic.is_empty() {
        return Some(NameError::Empty);
    }
    let mut levels = 1usize;
    let mut refused = None;
    for c in topic.chars() {
        match c {
            '+' | '#' => return Some(NameError::Wildcard),
            '/' => levels += 1,
            _ => {
                if let Some(e) = refused_char(c) {
                    // U+0000 breaks the encoding itself: it wins over the softer refusals.
                    if e == NameError::Nul {
                        return Some(e);
                    }
                    refused.get_or_insert(e);
                }
            }
        }
    }
    if refused.is_some() {
        refused
    } else if topic.len() > MAX_LENGTH || topic.len() > policy.max_length {
        Some(NameError::TooLong)
    } else if levels > policy.max_levels {
        Some(NameError::TooManyLevels)
    } else {
        None
    }
}

/// Why a topic filter (or, for the first three, a name) is not well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterError {
    Empty,
    /// Over [`MAX_LENGTH`] bytes.
    TooLong,
    /// U+0000, which MQTT forbids in any string.
    Nul,
    /// `#` anywhere but as the whole last level.
    MisplacedHash,
    /// `+` sharing a level with anything else.
    MisplacedPlus,
}

/// What MQTT requires of every topic string, name or filter.
fn string_error(s: &str) -> Option<FilterError> {
    if s.is_empty() {
        Some(FilterError::Empty)
    } else if s.len() > MAX_LENGTH {
        Some(FilterError::TooLong)
    } else if s.contains('\0') {
        Some(FilterError::Nul)
    } else {
        None
    }
}

/// Why `filter` is not a well-formed topic filter, if it is not: the string rules first, then
/// the first level (from the left) with a misplaced wildcard. A shared subscription
/// (`$share/group/filter`) is checked as the plain filter it is written as.
pub fn invalid_filter(filter: &str) -> Option<FilterError> {
    if let Some(e) = string_error(filter) {
        return Some(e);
    }
    let n_levels = filter.split('/').count();
    for (level_idx, level) in filter.split('/').enumerate() {
        if level.contains('#') && (level != "#" || level_idx + 1 != n_levels) {
            return Some(FilterError::MisplacedHash);
        }
        if level.contains('+') && level != "+" {
            return Some(FilterError::MisplacedPlus);
        }
    }
    None
}

/// Whether the topic name `topic` matches `filter`. `filter` is meant to be valid; one that is
/// not matches whatever its levels say, and a name that is not valid simply does not match
/// anything it should not.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for filter_level in filter.split('/') {
        match filter_level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// A filter split into its shared-subscription group (if any) and the part topics are matched
/// against (MQTT 5, §4.8.2). `$share/group/filter` with an empty group or no filter is not
/// shared (and not a valid filter; the broker refuses those before it splits them).
pub fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')) {
        Some((group, f)) if !group.is_empty() && !f.is_empty() => (Some(group), f),
        _ => (None, filter),
    }
}

/// Why a [`Topic`] or [`TopicFilter`] was refused: the input, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    Empty(String),
    TooLong(String),
    Nul(String),
    MisplacedHash { filter: String },
    MisplacedPlus { filter: String },
    WildcardInName(String),
}

impl TopicError {
    fn new(why: FilterError, input: String) -> TopicError {
        match why {
            FilterError::Empty => TopicError::Empty(input),
            FilterError::TooLong => TopicError::TooLong(input),
            FilterError::Nul => TopicError::Nul(input),
            FilterError::MisplacedHash => TopicError::MisplacedHash { filter: input },
            FilterError::MisplacedPlus => TopicError::MisplacedPlus { filter: input },
        }
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty(t) => {
                write!(f, "topic `{t}` is empty; an MQTT topic needs at least one character")
            }
            TopicError::TooLong(t) => write!(f, "topic `{t}` is longer than 65535 bytes, the MQTT limit"),
            TopicError::Nul(t) => write!(f, "topic `{t}` contains a NUL character, which MQTT forbids"),
            TopicError::MisplacedHash { filter } => write!(
                f,
                "topic filter `{filter}`: `#` must be the last level and stand alone (e.g. `sensors/#`)"
            ),
            TopicError::MisplacedPlus { filter } => {
                write!(f, "topic filter `{filter}`: `+` must occupy a whole level (e.g. `sensors/+/temp`)")
            }
            TopicError::WildcardInName(t) => {
                write!(f, "topic name `{t}` contains a wildcard (`+` or `#`); only filters may")
            }
        }
    }
}

impl std::error::Error for TopicError {}

/// A validated MQTT topic name: what a PUBLISH carries. No wildcards. Only MQTT's own rules
/// apply here (no [`TopicPolicy`]): the gateway checks its policy where events enter and leave.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    pub fn new(name: impl Into<String>) -> Result<Topic, TopicError> {
        let name = name.into();
        if let Some(why) = string_error(&name) {
            return Err(TopicError::new(why, name));
        }
        if name.contains(['+', '#']) {
            return Err(TopicError::WildcardInName(name));
        }
        Ok(Topic(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, without copying it.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated MQTT topic filter, such as `sensors/+/temp` or `alerts/#`. Validated once, when
/// it is built, so matching never fails: a filter that exists is well formed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn new(filter: impl Into<String>) -> Result<TopicFilter, TopicError> {
        let filter = filter.into();
        match invalid_filter(&filter) {
            Some(why) => Err(TopicError::new(why, filter)),
            None => Ok(TopicFilter(filter)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches this filter (see [`filter_matches`]).
    pub fn matches(&self, topic: &str) -> bool {
        filter_matches(&self.0, topic)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEFAULT: TopicPolicy = TopicPolicy { max_levels: 128, max_length: 65_535 };

    /// Each case mosquitto 2.0.11 closes the connection over (probed with raw publishes over
    /// TCP, MQTT 3.1.1 and 5), and the nearest ones it accepts.
    #[test]
    fn refuses_what_mosquitto_refuses() {
        let mosquitto = TopicPolicy { max_levels: 201, max_length: 65_535 };
        let levels = |n: usize| vec!["a"; n].join("/");
        for (topic, expected) in [
            ("a\u{1}b".to_owned(), Some(NameError::Control)),
            ("a\tb".to_owned(), Some(NameError::Control)),
            ("a\u{7f}b".to_owned(), Some(NameError::Control)),
            ("a\u{85}b".to_owned(), Some(NameError::Control)),
            ("a\u{9f}b".to_owned(), Some(NameError::Control)),
            ("a\u{a0}b".to_owned(), None),
            ("a\u{fdd0}b".to_owned(), Some(NameError::NonCharacter)),
            ("a\u{fdef}b".to_owned(), Some(NameError::NonCharacter)),
            ("a\u{fdf0}b".to_owned(), None),
            ("a\u{fffd}b".to_owned(), None),
            ("a\u{ffff}b".to_owned(), Some(NameError::NonCharacter)),
            ("a\u{1fffe}b".to_owned(), Some(NameError::NonCharacter)),
            ("a\u{10ffff}b".to_owned(), Some(NameError::NonCharacter)),
            ("température/温度".to_owned(), None),
            (levels(201), None),
            (levels(202), Some(NameError::TooManyLevels)),
            ("/".repeat(200), None),
            ("/".repeat(201), Some(NameError::TooManyLevels)),
            ("a".repeat(65_535), None),
        ] {
            let shown: String = topic.chars().take(40).collect();
            assert_eq!(invalid_topic(&topic, &mosquitto), expected, "{shown:?}");
        }
    }

    #[test]
    fn mqtt_rules_and_configured_limits() {
        assert_eq!(invalid_topic("", &DEFAULT), Some(NameError::Empty));
        assert_eq!(invalid_topic("a/+/b", &DEFAULT), Some(NameError::Wildcard));
        assert_eq!(invalid_topic("a/#", &DEFAULT), Some(NameError::Wildcard));
        assert_eq!(invalid_topic("a\0\u{1}", &DEFAULT), Some(NameError::Nul), "U+0000 wins");
        assert_eq!(invalid_topic(&"a".repeat(65_536), &TopicPolicy::MQTT), Some(NameError::TooLong));
        let tight = TopicPolicy { max_levels: 3, max_length: 8 };
        assert_eq!(invalid_topic("a/b/c", &tight), None);
        assert_eq!(invalid_topic("a/b/c/d", &tight), Some(NameError::TooManyLevels));
        assert_eq!(invalid_topic("abcdefghi", &tight), Some(NameError::TooLong));
        assert!(NameError::Wildcard.is_protocol_violation());
        assert!(!NameError::Control.is_protocol_violation());
    }

    #[track_caller]
    fn check_match(filter: &str, topic: &str, expected: bool) {
        let f = TopicFilter::new(filter).expect("test filter is valid");
        assert_eq!(f.matches(topic), expected, "filter `{filter}` vs topic `{topic}`");
        assert_eq!(filter_matches(filter, topic), expected, "filter `{filter}` vs topic `{topic}`");
    }

    #[test]
    fn matching_follows_the_spec() {
        check_match("sensors/+/temp", "sensors/a/temp", true);
        check_match("sensors/+/temp", "sensors/a/b/temp", false);
        check_match("sensors/+/temp", "sensors//temp", true);
        check_match("sensors/#", "sensors", true);
        check_match("sensors/#", "sensors/a/b", true);
        check_match("#", "a/b", true);
        check_match("#", "$SYS/x", false);
        check_match("+/x", "$SYS/x", false);
        check_match("$SYS/#", "$SYS/x", true);
        check_match("a/b", "a/b", true);
        check_match("a/b", "a/b/c", false);
        check_match("a/b/c", "a/b", false);
        check_match("+", "a", true);
        check_match("+", "a/b", false);
        check_match("/+", "/a", true);
    }

    /// The cases the broker's `$SYS` status and retained messages were pinned by.
    #[test]
    fn topics_match_filters_like_mqtt() {
        for (topic, filter, want) in [
            ("$SYS/outpost/clients", "$SYS/#", true),
            ("$SYS/outpost/clients", "$SYS/+/clients", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("a/b/c", "a/b/c/#", true),
            ("a/b", "a/+/c", false),
            ("a//b", "a/+/b", true),
            ("a/b/c", "a/b", false),
            ("ü/x", "#", true),
        ] {
            check_match(filter, topic, want);
        }
    }

    #[test]
    fn bad_filters_are_refused_with_a_fix() {
        let err = TopicFilter::new("a/#/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "topic filter `a/#/b`: `#` must be the last level and stand alone (e.g. `sensors/#`)"
        );
        assert!(matches!(TopicFilter::new("a/b+"), Err(TopicError::MisplacedPlus { .. })));
        assert!(matches!(TopicFilter::new(""), Err(TopicError::Empty(_))));
        assert!(matches!(Topic::new("a/+"), Err(TopicError::WildcardInName(_))));
    }

    /// The filters rumqttd's `valid_filter` (which the broker used before) refuses and accepts
    /// give the same verdicts here; U+0000, which it let through, is refused as MQTT requires.
    #[test]
    fn filter_validation_follows_the_spec() {
        for (filter, want) in [
            ("sport/tennis#/player", Some(FilterError::MisplacedHash)),
            ("sport/tennis/#/ranking", Some(FilterError::MisplacedHash)),
            ("sport/tennis#", Some(FilterError::MisplacedHash)),
            ("sport+", Some(FilterError::MisplacedPlus)),
            ("sport/++", Some(FilterError::MisplacedPlus)),
            ("+/#+", Some(FilterError::MisplacedHash)),
            ("", Some(FilterError::Empty)),
            ("a/\0", Some(FilterError::Nul)),
            ("#", None),
            ("+", None),
            ("/", None),
            ("+/+/#", None),
            ("$SYS/#", None),
            ("$share/g/a/+", None),
            ("température/+", None),
        ] {
            assert_eq!(invalid_filter(filter), want, "{filter:?}");
        }
        assert_eq!(invalid_filter(&"a".repeat(65_536)), Some(FilterError::TooLong));
    }

    #[test]
    fn shared_subscriptions_split_into_group_and_filter() {
        assert_eq!(split_shared("$share/g/s/+"), (Some("g"), "s/+"));
        assert_eq!(split_shared("$share//s"), (None, "$share//s"), "empty group");
        assert_eq!(split_shared("$share/g/"), (None, "$share/g/"), "no filter");
        assert_eq!(split_shared("$share/g"), (None, "$share/g"));
        assert_eq!(split_shared("s/+"), (None, "s/+"));
    }

    proptest! {
        #[test]
        fn a_topic_matches_itself_and_hash(levels in prop::collection::vec("[a-z0-9]{0,4}", 1..6)) {
            let topic = levels.join("/");
            prop_assume!(!topic.is_empty());
            prop_assert!(TopicFilter::new(topic.clone()).unwrap().matches(&topic));
            prop_assert!(TopicFilter::new("#").unwrap().matches(&topic));
            let plus = levels.iter().map(|_| "+").collect::<Vec<_>>().join("/");
            prop_assert!(TopicFilter::new(plus).unwrap().matches(&topic));
        }

        #[test]
        fn matching_never_panics(filter in "[a-z+#/$]{1,12}", topic in "[a-z+#/$]{0,12}") {
            if let Ok(f) = TopicFilter::new(filter) {
                let _ = f.matches(&topic);
            }
        }
    }
}
