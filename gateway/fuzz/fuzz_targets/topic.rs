//! Feeds arbitrary topic filters and names to `outpost::mqtt::topic` (the `outpost-topic`
//! crate the broker, the routes and the rules share) and checks it on every input against a
//! naive matcher written from the spec, against the broker's `SubTrie`, and against what its
//! validators promise each other. The input is `filter 0xFF topic` (0xFF never occurs in
//! UTF-8); inputs that are not UTF-8 on either side are skipped.
//!
//! Run: `cd gateway/fuzz && cargo +nightly fuzz run topic`

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::broker::subs::SubTrie;
use outpost::mqtt::topic::{
    self, NameError, Topic, TopicFilter, TopicPolicy, filter_matches, invalid_filter, invalid_topic,
    split_shared,
};

/// MQTT §4.7 read literally, over levels: `+` takes one level, `#` the rest (none included),
/// anything else itself; a topic starting with `$` is not matched by a leading wildcard.
fn naive(filter: &str, topic: &str) -> bool {
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

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |&b| b == 0xFF);
    let (Ok(filter), Ok(name)) =
        (std::str::from_utf8(parts.next().unwrap_or(&[])), std::str::from_utf8(parts.next().unwrap_or(&[])))
    else {
        return;
    };

    // Matching: one function, whatever the filter, agrees with the spec read literally.
    assert_eq!(filter_matches(filter, name), naive(filter, name), "{filter:?} vs {name:?}");

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
        let mut trie = SubTrie::default();
        trie.subscribe(&1u8, filter, 1);
        let mut out = Vec::new();
        trie.matches(name, |_| true, &mut out);
        assert_eq!(!out.is_empty(), filter_matches(split_shared(filter).1, name), "{filter:?} vs {name:?}");
        trie.unsubscribe(&1u8, filter);
        assert_eq!((trie.len(), trie.nodes()), (0, 0));
    }
});
