//! [`TopicIndex`]: which rules' FROM filters match a topic, without trying every rule.
//!
//! A trie over topic levels: literal levels in a hash map, `+` as one wildcard child, `#`
//! as a list of rules ending at a node. A lookup walks at most (levels × branching on
//! `+`) nodes, so the cost depends on the filters that could match, not on the number
//! of rules. Filters starting with a wildcard do not match `$`-topics (MQTT §4.7.2), as
//! in [`TopicFilter::matches`].

use outpost_topic::TopicFilter;

#[derive(Debug, Default)]
pub(crate) struct TopicIndex {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    literal: rustc_hash::FxHashMap<String, Node>,
    plus: Option<Box<Node>>,
    /// Rules whose filter ends in `#` right below this node.
    hash: Vec<usize>,
    /// Rules whose filter ends exactly at this node.
    exact: Vec<usize>,
}

impl TopicIndex {
    pub(crate) fn insert(&mut self, filter: &TopicFilter, rule_idx: usize) {
        let mut node = &mut self.root;
        for level in filter.as_str().split('/') {
            node = match level {
                "#" => {
                    node.hash.push(rule_idx);
                    return;
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                literal => node.literal.entry(literal.to_owned()).or_default(),
            };
        }
        node.exact.push(rule_idx);
    }

    /// The indexes of matching rules, ascending and without duplicates, into `out`.
    pub(crate) fn matches(&self, topic: &str, out: &mut Vec<usize>) {
        out.clear();
        let dollar = topic.starts_with('$');
        collect(&self.root, Some(topic), !dollar, out);
        out.sort_unstable();
        out.dedup();
    }
}

/// `levels` is the rest of the topic, `None` once every level was consumed. Splitting as
/// it goes (rather than collecting the levels first) keeps the lookup allocation-free.
fn collect(node: &Node, levels: Option<&str>, wildcards: bool, out: &mut Vec<usize>) {
    if wildcards {
        out.extend_from_slice(&node.hash);
    }
    let Some(levels) = levels else {
        out.extend_from_slice(&node.exact);
        return;
    };
    // A byte search: levels are short, and `split_once` sets up a general searcher.
    let (level, rest) = match levels.bytes().position(|b| b == b'/') {
        Some(slash) => (levels.get(..slash).unwrap_or(""), levels.get(slash + 1..)),
        None => (levels, None),
    };
    // Hashing the level is the main cost of a step, and many nodes have no literal
    // children to look it up in (`sensors` in `sensors/+/temp`).
    if !node.literal.is_empty() {
        if let Some(child) = node.literal.get(level) {
            collect(child, rest, true, out);
        }
    }
    if wildcards {
        if let Some(child) = &node.plus {
            collect(child, rest, true, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(filters: &[&str]) -> TopicIndex {
        let mut index = TopicIndex::default();
        for (idx, f) in filters.iter().enumerate() {
            index.insert(&TopicFilter::new(*f).unwrap(), idx);
        }
        index
    }

    #[test]
    fn finds_exactly_the_matching_filters() {
        let filters = ["sensors/+/temp", "sensors/#", "#", "alerts/x", "+/+", "$SYS/#", "sensors/a/temp"];
        let idx = index(&filters);
        let mut out = Vec::new();
        idx.matches("sensors/a/temp", &mut out);
        assert_eq!(out, [0, 1, 2, 6]);
        idx.matches("sensors", &mut out);
        assert_eq!(out, [1, 2]);
        idx.matches("$SYS/x", &mut out);
        assert_eq!(out, [5]);
        idx.matches("alerts/x", &mut out);
        assert_eq!(out, [2, 3, 4]);
    }

    proptest! {
        #[test]
        fn agrees_with_filter_matching(
            filters in prop::collection::vec("[ab+#$/]{1,6}", 1..8),
            topic in "[ab$/]{0,6}",
        ) {
            let filters: Vec<TopicFilter> = filters.into_iter().filter_map(|f| TopicFilter::new(f).ok()).collect();
            let mut idx = TopicIndex::default();
            for (i, f) in filters.iter().enumerate() {
                idx.insert(f, i);
            }
            let mut got = Vec::new();
            idx.matches(&topic, &mut got);
            let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| f.matches(&topic)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want);
        }
    }
}
