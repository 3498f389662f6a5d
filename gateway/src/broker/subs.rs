//! The subscription trie: which local sessions a topic goes to.
//!
//! One node per filter level; `+` and `#` are children like any other level, so a topic walks
//! at most three children per level (its own level, `+`, `#`). Plain subscriptions end at a
//! node as `session → options` (the QoS, and for MQTT 5 the subscription options; see
//! [`Merge`]); shared subscriptions (`$share/group/filter`) end at the node of
//! `filter` as groups, and each matching group yields one member per topic, round robin,
//! preferring members whose session is connected.
//!
//! # Invariants
//! - A node exists only while a subscription ends at it or below it: unsubscribing prunes every
//!   node it leaves empty, so the trie's size is the size of the live subscriptions, whatever
//!   topics and filters came and went (issue #20: rumqttd's router kept 5.85 KiB per filter
//!   ever used, and state per topic ever published).
//! - Nothing is kept per published topic: matching only reads the trie (and advances the
//!   round-robin position of the groups it matched).
//! - Leading wildcards (`#`, `+` at the first level) never match a topic that starts with `$`
//!   (MQTT 4.7.2); a filter that starts with `$` matches such topics as usual.
//! - Matching works on `&str` levels, never on byte offsets, so any UTF-8 topic is safe.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use crate::mqtt::topic::split_shared;

/// What a subscription holds besides its session, and how overlapping plain subscriptions of
/// one session combine into the one delivery it gets.
pub trait Merge {
    fn merge(&mut self, other: Self);
}

/// A bare QoS: overlapping subscriptions give the highest (as mosquitto does).
impl Merge for u8 {
    fn merge(&mut self, other: u8) {
        *self = (*self).max(other);
    }
}

#[derive(Debug)]
struct Group<K, V> {
    /// Members in subscription order, with their options.
    members: Vec<(K, V)>,
    /// Index of the member that gets the next message (if it is eligible). A `Cell`, so that
    /// matching reads the trie through `&self` and hands out shared references only.
    next: Cell<usize>,
}

#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    plain: HashMap<K, V>,
    groups: BTreeMap<Box<str>, Group<K, V>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: HashMap::new(), plain: HashMap::new(), groups: BTreeMap::new() }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plain.is_empty() && self.groups.is_empty()
    }
}

/// A delivery target: the session and the subscription's options.
pub type Target<K, V = u8> = (K, V);

/// The subscriptions of all local sessions, keyed by session `K`, each holding `V`.
#[derive(Debug)]
pub struct SubTrie<K, V = u8> {
    root: Node<K, V>,
    subscriptions: usize,
    nodes: usize,
}

impl<K, V> Default for SubTrie<K, V> {
    fn default() -> Self {
        SubTrie { root: Node::default(), subscriptions: 0, nodes: 0 }
    }
}

impl<K: Clone + Eq + Hash, V: Clone + Merge> SubTrie<K, V> {
    /// Subscriptions held (a session's filter counts once, whatever its QoS).
    pub fn len(&self) -> usize {
        self.subscriptions
    }

    pub fn is_empty(&self) -> bool {
        self.subscriptions == 0
    }

    /// Trie nodes below the root (for tests: pruning).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Adds or updates `key`'s subscription to `filter` (a valid filter). Returns whether it is
    /// new (false: only its options changed).
    pub fn subscribe(&mut self, key: &K, filter: &str, qos: V) -> bool {
        let (group, f) = split_shared(filter);
        let mut node = &mut self.root;
        for level in f.split('/') {
            node = node.children.entry(Box::from(level)).or_insert_with(|| {
                self.nodes += 1;
                Node::default()
            });
        }
        let new = match group {
            None => node.plain.insert(key.clone(), qos).is_none(),
            Some(g) => {
                let group = node
                    .groups
                    .entry(Box::from(g))
                    .or_insert(Group { members: Vec::new(), next: Cell::new(0) });
                match group.members.iter_mut().find(|(k, _)| k == key) {
                    Some(member) => {
                        member.1 = qos;
                        false
                    }
                    None => {
                        group.members.push((key.clone(), qos));
                        true
                    }
                }
            }
        };
        self.subscriptions += usize::from(new);
        new
    }

    /// Removes `key`'s subscription to `filter`; returns whether there was one. Nodes left
    /// empty are removed.
    pub fn unsubscribe(&mut self, key: &K, filter: &str) -> bool {
        let (group, f) = split_shared(filter);
        let levels: Vec<&str> = f.split('/').collect();
        let mut pruned = 0;
        let removed = remove(&mut self.root, &levels, group, key, &mut pruned);
        self.nodes -= pruned;
        self.subscriptions -= usize::from(removed);
        removed
    }

    /// The sessions `topic` goes to: each plain subscriber once, its matching subscriptions
    /// that `keep` accepts merged ([`Merge`]: the highest QoS), then one member per matching
    /// shared group (round robin over the members `eligible` accepts; over all of them if it
    /// accepts none).
    pub fn matches(
        &self,
        topic: &str,
        eligible: impl Fn(&K) -> bool,
        keep: impl Fn(&K, &V) -> bool,
        out: &mut Vec<Target<K, V>>,
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut groups = Vec::new();
        collect(&self.root, &levels, 0, dollar, out, &mut groups);
        out.retain(|(k, v)| keep(k, v));
        // Overlapping plain subscriptions of one session: one delivery.
        if out.len() > 1 {
            let mut best: HashMap<K, V> = HashMap::with_capacity(out.len());
            let mut order = Vec::with_capacity(out.len());
            for (k, q) in out.drain(..) {
                match best.get_mut(&k) {
                    Some(b) => b.merge(q),
                    None => {
                        best.insert(k.clone(), q);
                        order.push(k);
                    }
                }
            }
            out.extend(order.into_iter().filter_map(|k| {
                let q = best.remove(&k)?;
                Some((k, q))
            }));
        }
        for group in groups {
            if let Some(pick) = group.choose(&eligible) {
                out.push(group.members[pick].clone());
            }
        }
    }
}

impl<K: Clone + Eq + Hash, V: Clone> SubTrie<K, V> {
    /// One member of the shared group `$share/group/filter` (the whole filter), chosen as
    /// [`SubTrie::matches`] chooses one for a message: round robin, preferring members
    /// `eligible` accepts. `None`: the group has no member.
    pub fn pick(&self, shared_filter: &str, eligible: impl Fn(&K) -> bool) -> Option<Target<K, V>> {
        let (Some(name), f) = split_shared(shared_filter) else { return None };
        let mut node = &self.root;
        for level in f.split('/') {
            node = node.children.get(level)?;
        }
        let group = node.groups.get(name)?;
        Some(group.members[group.choose(eligible)?].clone())
    }
}

impl<K, V> Group<K, V> {
    /// The member that gets the next message, and the round robin moved past it: the next
    /// one in turn that `eligible` accepts, else the next one in turn. `None`: no member.
    fn choose(&self, eligible: impl Fn(&K) -> bool) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.get() % n;
        let pick = (0..n).map(|i| (start + i) % n).find(|&i| eligible(&self.members[i].0)).unwrap_or(start);
        self.next.set((pick + 1) % n);
        Some(pick)
    }
}

fn collect<'a, K: Clone, V: Clone>(
    node: &'a Node<K, V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    out: &mut Vec<Target<K, V>>,
    groups: &mut Vec<&'a Group<K, V>>,
) {
    let Some(level) = levels.get(depth) else {
        // The topic ends here: subscriptions ending at this node, and `…/#` below it (a
        // filter `a/#` matches `a` too).
        out.extend(node.plain.iter().map(|(k, q)| (k.clone(), q.clone())));
        groups.extend(node.groups.values());
        if let Some(hash) = node.children.get("#") {
            out.extend(hash.plain.iter().map(|(k, q)| (k.clone(), q.clone())));
            groups.extend(hash.groups.values());
        }
        return;
    };
    // Leading wildcards skip `$` topics.
    if !(dollar && depth == 0) {
        if let Some(hash) = node.children.get("#") {
            out.extend(hash.plain.iter().map(|(k, q)| (k.clone(), q.clone())));
            groups.extend(hash.groups.values());
        }
        if let Some(plus) = node.children.get("+") {
            collect(plus, levels, depth + 1, dollar, out, groups);
        }
    }
    // Topic levels are never wildcards (topics are validated); never visit a child twice.
    if *level != "+" && *level != "#" {
        if let Some(child) = node.children.get(*level) {
            collect(child, levels, depth + 1, dollar, out, groups);
        }
    }
}

fn remove<K: Eq + Hash, V>(
    node: &mut Node<K, V>,
    levels: &[&str],
    group: Option<&str>,
    key: &K,
    pruned: &mut usize,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.plain.remove(key).is_some(),
            Some(g) => {
                let Some(members) = node.groups.get_mut(g) else { return false };
                let Some(i) = members.members.iter().position(|(k, _)| k == key) else { return false };
                members.members.remove(i);
                if members.members.is_empty() {
                    node.groups.remove(g);
                }
                true
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else { return false };
    let removed = remove(child, rest, group, key, pruned);
    if child.is_empty() {
        node.children.remove(*first);
        *pruned += 1;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::filter_matches;
    use proptest::prelude::*;

    fn plain(trie: &SubTrie<u32, u8>, topic: &str) -> Vec<(u32, u8)> {
        let mut out = Vec::new();
        trie.matches(topic, |_| true, |_, _| true, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_match_like_mqtt_and_dollar_topics_skip_leading_ones() {
        let mut t: SubTrie<u32, u8> = SubTrie::default();
        t.subscribe(&1, "#", 0);
        t.subscribe(&2, "a/+", 1);
        t.subscribe(&3, "a/#", 1);
        t.subscribe(&4, "$SYS/#", 0);
        t.subscribe(&5, "+/+", 0);
        assert_eq!(plain(&t, "a/b"), [(1, 0), (2, 1), (3, 1), (5, 0)]);
        assert_eq!(plain(&t, "a"), [(1, 0), (3, 1)], "a/# matches its parent level");
        assert_eq!(plain(&t, "$SYS/x"), [(4, 0)]);
        assert_eq!(plain(&t, "ü"), [(1, 0)], "a non-ASCII first character");
        assert_eq!(plain(&t, "température/salon"), [(1, 0), (5, 0)]);
    }

    #[test]
    fn overlapping_subscriptions_give_one_delivery_at_the_highest_qos() {
        let mut t: SubTrie<u32, u8> = SubTrie::default();
        t.subscribe(&1, "a/#", 0);
        t.subscribe(&1, "a/b", 1);
        assert_eq!(plain(&t, "a/b"), [(1, 1)]);
        assert!(!t.subscribe(&1, "a/b", 0), "a QoS change is not a new subscription");
        assert_eq!(plain(&t, "a/b"), [(1, 0)]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn unsubscribing_prunes_every_node_it_empties() {
        let mut t: SubTrie<u32, u8> = SubTrie::default();
        for n in 0..1_000 {
            t.subscribe(&1, &format!("f/{n}/x/#"), 1);
        }
        t.subscribe(&2, "f/keep", 0);
        assert_eq!(t.nodes(), 1 + 3 * 1_000 + 1);
        for n in 0..1_000 {
            assert!(t.unsubscribe(&1, &format!("f/{n}/x/#")));
        }
        assert!(!t.unsubscribe(&1, "f/0/x/#"), "already gone");
        assert_eq!((t.len(), t.nodes()), (1, 2));
        t.unsubscribe(&2, "f/keep");
        assert_eq!((t.len(), t.nodes()), (0, 0));
        t.subscribe(&3, "$share/g/s/t", 1);
        t.unsubscribe(&3, "$share/g/s/t");
        assert_eq!((t.len(), t.nodes()), (0, 0), "shared groups are pruned too");
    }

    #[test]
    fn a_shared_group_delivers_to_one_member_round_robin_preferring_eligible_ones() {
        let mut t: SubTrie<u32, u8> = SubTrie::default();
        t.subscribe(&1, "$share/g/s/+", 1);
        t.subscribe(&2, "$share/g/s/#", 1);
        t.subscribe(&3, "$share/g/s/+", 0);
        t.subscribe(&9, "$share/h/s/+", 1);
        let mut picks = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            t.matches("s/x", |_| true, |_, _| true, &mut out);
            out.sort_unstable();
            picks.push(out);
        }
        // Group g at s/+ (1, 3) and group g at s/# (2) are distinct nodes: each delivers.
        assert_eq!(
            picks,
            [
                vec![(1, 1), (2, 1), (9, 1)],
                vec![(2, 1), (3, 0), (9, 1)],
                vec![(1, 1), (2, 1), (9, 1)],
                vec![(2, 1), (3, 0), (9, 1)]
            ]
        );
        let mut out = Vec::new();
        t.matches("s/x", |k| *k == 3, |_, _| true, &mut out);
        assert!(out.contains(&(3, 0)), "the eligible member is chosen: {out:?}");
        out.clear();
        t.matches("s/x", |_| false, |_, _| true, &mut out);
        assert_eq!(out.len(), 3, "nobody eligible: still one member per group");
    }

    #[test]
    fn pick_chooses_one_member_of_the_named_group_in_turn() {
        let mut t: SubTrie<u32, u8> = SubTrie::default();
        t.subscribe(&1, "$share/g/s/+", 1);
        t.subscribe(&2, "$share/g/s/+", 2);
        t.subscribe(&3, "$share/h/s/+", 1);
        t.subscribe(&4, "s/+", 1);
        assert_eq!(t.pick("$share/g/s/+", |_| true), Some((1, 1)));
        assert_eq!(t.pick("$share/g/s/+", |_| true), Some((2, 2)), "in turn");
        assert_eq!(t.pick("$share/g/s/+", |k| *k == 2), Some((2, 2)), "an eligible one first");
        assert_eq!(t.pick("$share/h/s/+", |_| false), Some((3, 1)), "nobody eligible: still a member");
        assert_eq!(t.pick("$share/x/s/+", |_| true), None, "no such group");
        assert_eq!(t.pick("$share/g/s/#", |_| true), None, "another filter's group");
        assert_eq!(t.pick("s/+", |_| true), None, "not a shared filter");
        t.unsubscribe(&3, "$share/h/s/+");
        assert_eq!(t.pick("$share/h/s/+", |_| true), None, "the last member left");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("ü".to_owned()),
            Just(String::new()),
            Just("$x".to_owned())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop_oneof![4 => level(), 1 => Just("+".to_owned())], 1..4), any::<bool>())
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|levels| levels.join("/"))
    }

    proptest! {
        /// The trie agrees with the naive matcher for plain subscriptions, and unsubscribing
        /// everything leaves no node behind.
        #[test]
        fn the_trie_agrees_with_a_naive_matcher(
            subs in prop::collection::vec((0u32..6, filter(), 0u8..2), 0..24),
            unsubs in prop::collection::vec(0usize..24, 0..12),
            topics in prop::collection::vec(topic(), 1..12),
        ) {
            let mut t: SubTrie<u32, u8> = SubTrie::default();
            let mut model: HashMap<(u32, String), u8> = HashMap::new();
            for (k, f, q) in &subs {
                t.subscribe(k, f, *q);
                model.insert((*k, f.clone()), *q);
            }
            for i in unsubs {
                if let Some((k, f, _)) = subs.get(i) {
                    t.unsubscribe(k, f);
                    model.remove(&(*k, f.clone()));
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for topic in &topics {
                let mut want: HashMap<u32, u8> = HashMap::new();
                for ((k, f), q) in &model {
                    if filter_matches(f, topic) {
                        let e = want.entry(*k).or_insert(*q);
                        *e = (*e).max(*q);
                    }
                }
                let mut want: Vec<(u32, u8)> = want.into_iter().collect();
                want.sort_unstable();
                prop_assert_eq!(plain(&t, topic), want, "topic {:?}", topic);
            }
            for (k, f) in model.keys().cloned().collect::<Vec<_>>() {
                t.unsubscribe(&k, &f);
            }
            prop_assert_eq!((t.len(), t.nodes()), (0, 0));
        }
    }
}
