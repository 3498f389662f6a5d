//! MQTT topic names and topic filters (MQTT 3.1.1 §4.7, MQTT 5 §4.7).
//!
//! A [`TopicFilter`] is validated once, when it is built, so matching never fails: a filter
//! that exists is well-formed. Matching follows the spec, including the rule that a filter
//! starting with a wildcard does not match topics starting with `$` (§4.7.2).

use std::fmt;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic `{0}` is empty; an MQTT topic needs at least one character")]
    Empty(String),
    #[error("topic `{0}` is longer than 65535 bytes, the MQTT limit")]
    TooLong(String),
    #[error("topic `{0}` contains a NUL character, which MQTT forbids")]
    Nul(String),
    #[error("topic filter `{filter}`: `#` must be the last level and stand alone (e.g. `sensors/#`)")]
    MisplacedHash { filter: String },
    #[error("topic filter `{filter}`: `+` must occupy a whole level (e.g. `sensors/+/temp`)")]
    MisplacedPlus { filter: String },
    #[error("topic name `{0}` contains a wildcard (`+` or `#`); only filters may")]
    WildcardInName(String),
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty(s.to_owned()));
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong(s.to_owned()));
    }
    if s.contains('\0') {
        return Err(TopicError::Nul(s.to_owned()));
    }
    Ok(())
}

/// A validated MQTT topic name: what a PUBLISH carries. No wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    pub fn new(name: impl Into<String>) -> Result<Topic, TopicError> {
        let name = name.into();
        check_common(&name)?;
        if name.contains(['+', '#']) {
            return Err(TopicError::WildcardInName(name));
        }
        Ok(Topic(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, without copying it.
    pub(crate) fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated MQTT topic filter, such as `sensors/+/temp` or `alerts/#`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn new(filter: impl Into<String>) -> Result<TopicFilter, TopicError> {
        let filter = filter.into();
        check_common(&filter)?;
        let n_levels = filter.split('/').count();
        for (level_idx, level) in filter.split('/').enumerate() {
            if level.contains('#') && (level != "#" || level_idx + 1 != n_levels) {
                return Err(TopicError::MisplacedHash { filter });
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::MisplacedPlus { filter });
            }
        }
        Ok(TopicFilter(filter))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches this filter. `topic` is a topic name as published; a name that
    /// is not valid simply does not match anything it should not.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.0.starts_with(['+', '#']) {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for filter_level in self.0.split('/') {
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

    #[track_caller]
    fn check_match(filter: &str, topic: &str, expected: bool) {
        let f = TopicFilter::new(filter).expect("test filter is valid");
        assert_eq!(f.matches(topic), expected, "filter `{filter}` vs topic `{topic}`");
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
