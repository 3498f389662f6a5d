//! Mosquitto's ACL file, and what it allows one client.
//!
//! The format (`man mosquitto.conf`, `acl_file`):
//! - `topic [read|write|readwrite|deny] <filter>` — without an access word, `readwrite`. The
//!   filter is the rest of the line, spaces included.
//! - `user <username>` — the `topic` lines after it are that user's; those before any `user`
//!   line are for anonymous clients. A user may have several sections.
//! - `pattern [read|write|readwrite|deny] <filter>` — for every client, with `%c` replaced by
//!   its client id and `%u` by its username (a `%u` pattern does not apply to anonymous
//!   clients).
//! - Blank lines and lines starting with `#` are skipped.
//!
//! How a topic is decided, as Debian's mosquitto 2.0 decides it (and its conformance tests
//! check): the client's own entries (its user's, or the anonymous ones) first, their `deny`
//! entries before the others; then the patterns, `deny` first. The first entry whose filter
//! matches the topic decides if it is a `deny` or grants the access asked for; an entry that
//! matches without granting it is passed over. Nothing matched: denied. A client id or
//! username holding `+` or `#` gets nothing from the patterns (it could widen them).
//!
//! Where Outpost differs, on purpose:
//! - Mosquitto grants every SUBSCRIBE and filters each delivery. Outpost filters deliveries the
//!   same way, and also refuses a subscription through which nothing could ever be delivered
//!   ([`ClientAcl::may_subscribe`]), so a misconfigured client learns it from its SUBACK.
//! - A line mosquitto would skip (an unknown keyword, an access word without a filter, an
//!   invalid filter) refuses the file: a typo in `user` would otherwise give one user's rights
//!   to another.

use std::collections::HashMap;
use std::path::Path;

use super::AuthFileError;
use crate::mqtt::topic::{TopicFilter, filter_matches};

/// What an entry allows on the topics its filter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, want: Want) -> bool {
        matches!(
            (self, want),
            (Access::ReadWrite, _) | (Access::Read, Want::Read) | (Access::Write, Want::Write)
        )
    }

    fn parse(word: &str) -> Option<Access> {
        Some(match word {
            "read" => Access::Read,
            "write" => Access::Write,
            "readwrite" => Access::ReadWrite,
            "deny" => Access::Deny,
            _ => return None,
        })
    }
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Receive a message published to it (a delivery, a retained message).
    Read,
    /// Publish to it (a publish, a will).
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    filter: String,
    access: Access,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Entries before any `user` line.
    anonymous: Vec<Entry>,
    users: HashMap<String, Vec<Entry>>,
    /// `pattern` entries, `%c`/`%u` not yet replaced.
    patterns: Vec<Entry>,
}

impl Acl {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Acl, AuthFileError> {
        Acl::parse(&super::read(path)?, path)
    }

    /// Parses an ACL file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Acl, AuthFileError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| AuthFileError::line(path, line_no, line, reason);
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(bad("`user` needs a username, e.g. `user sensor-7`".to_owned()));
                    }
                    acl.users.entry(rest.to_owned()).or_default();
                    user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let entry = parse_entry(keyword, rest).map_err(bad)?;
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(entry),
                        (_, None) => acl.anonymous.push(entry),
                        (_, Some(user)) => acl.users.entry(user.clone()).or_default().push(entry),
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown keyword `{other}`; a line is `topic [read|write|readwrite|deny] FILTER`, `pattern [read|write|readwrite|deny] FILTER`, `user NAME` or a `#` comment"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// What the file allows one client: `username` only when it was authenticated (a
    /// username no password checked is not an identity), and its client id.
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let own = match username {
            None => &self.anonymous[..],
            Some(user) => self.users.get(user).map_or(&[][..], Vec::as_slice),
        };
        let dangerous = |s: &str| s.contains(['+', '#']);
        let patterns =
            if !self.patterns.is_empty() && (dangerous(client_id) || username.is_some_and(dangerous)) {
                None
            } else {
                Some(Section::new(
                    self.patterns.iter().filter(|e| username.is_some() || !e.filter.contains("%u")).map(
                        |e| Entry { filter: substitute(&e.filter, username, client_id), access: e.access },
                    ),
                ))
            };
        ClientAcl { own: Section::new(own.iter().cloned()), patterns }
    }

    /// Entries in the file (for the reload's log line).
    pub fn len(&self) -> usize {
        self.anonymous.len() + self.users.values().map(Vec::len).sum::<usize>() + self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `topic`/`pattern`'s arguments: an optional access word, then the filter (the rest of the
/// line).
fn parse_entry(keyword: &str, rest: &str) -> Result<Entry, String> {
    if rest.is_empty() {
        return Err(format!("`{keyword}` needs a topic filter, e.g. `{keyword} read sensors/#`"));
    }
    let (access, filter) = match rest.split_once([' ', '\t']) {
        Some((word, filter)) => match Access::parse(word) {
            Some(access) => (access, filter.trim_start()),
            None => {
                return Err(format!(
                    "`{word}` is not an access; write `{keyword} read|write|readwrite|deny FILTER`, or `{keyword} FILTER` for readwrite"
                ));
            }
        },
        None if Access::parse(rest).is_some() => {
            return Err(format!(
                "`{rest}` without a topic filter; write `{keyword} {rest} FILTER` (mosquitto would read a topic named `{rest}`: write `{keyword} readwrite {rest}` if that is meant)"
            ));
        }
        None => (Access::ReadWrite, rest),
    };
    // A pattern's placeholders stand for one level's text.
    let checked =
        if keyword == "pattern" { filter.replace("%c", "c").replace("%u", "u") } else { filter.to_owned() };
    TopicFilter::new(checked).map_err(|e| e.to_string())?;
    Ok(Entry { filter: filter.to_owned(), access })
}

/// `pattern` with `%c` and `%u` replaced.
fn substitute(pattern: &str, username: Option<&str>, client_id: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + client_id.len());
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match (after.as_bytes().first(), username) {
            (Some(b'c'), _) => out.push_str(client_id),
            (Some(b'u'), Some(user)) => out.push_str(user),
            (Some(_), _) => {
                out.push('%');
                rest = after;
                continue;
            }
            (None, _) => {
                out.push('%');
                rest = after;
                break;
            }
        }
        rest = &after[1..];
    }
    out.push_str(rest);
    out
}

/// One section's entries, `deny` first, each group in file order.
#[derive(Debug, Clone, Default)]
struct Section {
    denies: Vec<String>,
    grants: Vec<(String, Access)>,
}

impl Section {
    fn new(entries: impl IntoIterator<Item = Entry>) -> Section {
        let mut section = Section::default();
        for e in entries {
            if e.access == Access::Deny {
                section.denies.push(e.filter);
            } else {
                section.grants.push((e.filter, e.access));
            }
        }
        section
    }

    /// `Some(verdict)` if an entry decides `topic`, `None` to ask the next section.
    fn decide(&self, topic: &str, want: Want) -> Option<bool> {
        if self.denies.iter().any(|f| filter_matches(f, topic)) {
            return Some(false);
        }
        self.grants.iter().any(|(f, access)| access.grants(want) && filter_matches(f, topic)).then_some(true)
    }

    fn reads_some_of(&self, filter: &str) -> bool {
        self.grants.iter().any(|(f, access)| access.grants(Want::Read) && filters_overlap(f, filter))
    }

    fn denies_all_of(&self, filter: &str) -> bool {
        self.denies.iter().any(|d| filter_covers(d, filter))
    }
}

/// What the ACL file allows one client, its patterns filled in.
#[derive(Debug, Clone, Default)]
pub struct ClientAcl {
    own: Section,
    /// `None`: the client id or username holds `+` or `#`, so no pattern applies.
    patterns: Option<Section>,
}

impl ClientAcl {
    /// Whether the client may read (receive) or write (publish to) `topic`.
    pub fn allows(&self, topic: &str, want: Want) -> bool {
        if let Some(verdict) = self.own.decide(topic, want) {
            return verdict;
        }
        self.patterns.as_ref().and_then(|p| p.decide(topic, want)).unwrap_or(false)
    }

    /// Whether a subscription to `filter` (shared prefix removed) could ever deliver anything.
    /// `false` only when every topic it matches is denied for reading: no grant overlaps it,
    /// or a `deny` that is checked before every grant that could covers it all.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        if self.own.denies_all_of(filter) {
            return false;
        }
        if self.own.reads_some_of(filter) {
            return true;
        }
        match &self.patterns {
            Some(p) => !p.denies_all_of(filter) && p.reads_some_of(filter),
            None => false,
        }
    }
}

/// Whether some topic matches both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    // Wildcards in the first level do not match `$` topics.
    let dollar_clash = |x: &str, y: &str| x.starts_with('$') && y.starts_with(['+', '#']);
    if dollar_clash(a, b) || dollar_clash(b, a) {
        return false;
    }
    let a: Vec<&str> = a.split('/').collect();
    let b: Vec<&str> = b.split('/').collect();
    overlap(&a, &b)
}

fn overlap(a: &[&str], b: &[&str]) -> bool {
    match (a.split_first(), b.split_first()) {
        (Some((&"#", _)), _) | (_, Some((&"#", _))) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some((x, a)), Some((y, b))) => (*x == "+" || *y == "+" || x == y) && overlap(a, b),
    }
}

/// Whether every topic `filter` matches is matched by `cover` too.
pub fn filter_covers(cover: &str, filter: &str) -> bool {
    if filter.starts_with('$') && cover.starts_with(['+', '#']) {
        return false;
    }
    let c: Vec<&str> = cover.split('/').collect();
    let f: Vec<&str> = filter.split('/').collect();
    covers(&c, &f)
}

fn covers(c: &[&str], f: &[&str]) -> bool {
    match (c.split_first(), f.split_first()) {
        (Some((&"#", _)), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some((_, _)), Some((&"#", _))) => false,
        (Some((x, c)), Some((y, f))) => (*x == "+" || (x == y && *y != "+")) && covers(c, f),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text, Path::new("acl")).expect("valid ACL")
    }

    #[track_caller]
    fn refused(text: &str) -> String {
        Acl::parse(text, Path::new("acl")).expect_err("refused").to_string()
    }

    #[test]
    fn every_line_form() {
        let a = acl("# comment\n\n  # indented comment\n\
             topic read public/#\n\
             topic weather/+\n\
             user alice\n\
             topic readwrite alice/#\n\
             topic deny alice/secret/#\n\
             topic write shared/in\n\
             topic read with space/x\n\
             user bob smith\n\
             topic read bob/#\n\
             user alice\n\
             topic read more/alice\n\
             pattern readwrite clients/%c/#\n\
             pattern read users/%u/#\n\
             pattern deny clients/%c/locked\n");
        let anon = a.for_client(None, "anon-1");
        assert!(anon.allows("public/a", Want::Read) && !anon.allows("public/a", Want::Write));
        assert!(anon.allows("weather/x", Want::Read) && anon.allows("weather/x", Want::Write));
        assert!(!anon.allows("alice/x", Want::Read));
        assert!(anon.allows("clients/anon-1/x", Want::Write), "%c patterns apply to anonymous clients");
        assert!(!anon.allows("users/%u/x", Want::Read), "a %u pattern does not apply without a username");

        let alice = a.for_client(Some("alice"), "a1");
        assert!(alice.allows("alice/x", Want::Write));
        assert!(!alice.allows("alice/secret/x", Want::Read), "deny before an earlier grant");
        assert!(alice.allows("shared/in", Want::Write) && !alice.allows("shared/in", Want::Read));
        assert!(alice.allows("with space/x", Want::Read), "the filter is the rest of the line");
        assert!(alice.allows("more/alice", Want::Read), "a user's second section adds to the first");
        assert!(!alice.allows("public/a", Want::Read), "anonymous entries are not a user's");
        assert!(alice.allows("users/alice/q", Want::Read) && !alice.allows("users/bob/q", Want::Read));
        assert!(!alice.allows("clients/a1/locked", Want::Write), "pattern deny before pattern grants");
        assert!(alice.allows("clients/a1/open", Want::Write));

        let bob = a.for_client(Some("bob smith"), "b");
        assert!(bob.allows("bob/x", Want::Read));
        let stranger = a.for_client(Some("carol"), "c");
        assert!(!stranger.allows("public/a", Want::Read), "a user without a section has only patterns");
        assert!(stranger.allows("users/carol/x", Want::Read));
    }

    #[test]
    fn a_user_grant_is_checked_before_a_pattern_deny() {
        // mosquitto 2.0 walks the client's own list (deny first) before the patterns.
        let a = acl("user alice\ntopic read a/#\npattern deny a/%u\n");
        assert!(a.for_client(Some("alice"), "x").allows("a/alice", Want::Read));
    }

    #[test]
    fn wildcards_in_ids_switch_patterns_off() {
        let a = acl("user u\ntopic read own/#\npattern readwrite c/%c/#\n");
        assert!(!a.for_client(Some("u"), "x/#").allows("c/x/#/y", Want::Read));
        assert!(!a.for_client(Some("u"), "+").allows("c/+/y", Want::Read));
        assert!(
            a.for_client(Some("u"), "+").allows("own/y", Want::Read),
            "the user's own entries still apply"
        );
        assert!(
            a.for_client(Some("u"), "a/b").allows("c/a/b/y", Want::Write),
            "`/` in an id is mosquitto 2.0's business as usual"
        );
    }

    #[test]
    fn dollar_topics_need_dollar_entries() {
        let a = acl("topic read #\ntopic read $SYS/broker/#\n");
        let c = a.for_client(None, "x");
        assert!(c.allows("a/b", Want::Read));
        assert!(!c.allows("$SYS/outpost/x", Want::Read));
        assert!(c.allows("$SYS/broker/load", Want::Read));
    }

    #[test]
    fn substitution_replaces_every_placeholder() {
        assert_eq!(substitute("a/%c/%u/%c", Some("u"), "c"), "a/c/u/c");
        assert_eq!(substitute("a/%x/%", Some("u"), "c"), "a/%x/%");
        assert_eq!(substitute("a/%u", None, "c"), "a/%u");
    }

    #[test]
    fn subscriptions_are_refused_only_when_nothing_could_be_delivered() {
        let a = acl("topic read public/#\ntopic deny public/secret/#\npattern read c/%c/#\n");
        let c = a.for_client(None, "me");
        assert!(c.may_subscribe("public/x"));
        assert!(c.may_subscribe("#"), "overlaps public/#: deliveries are filtered one by one");
        assert!(c.may_subscribe("+/x"));
        assert!(!c.may_subscribe("private/x"));
        assert!(!c.may_subscribe("public/secret/x"), "covered by a deny");
        assert!(c.may_subscribe("c/me/#"));
        assert!(!c.may_subscribe("c/other/#"));
        assert!(!c.may_subscribe("$SYS/#"), "`#` grants do not reach `$` topics");
    }

    #[test]
    fn bad_lines_name_file_line_and_fix() {
        let err = refused("topic read a\nuser\n");
        assert_eq!(err, "acl: line 2: \"user\": `user` needs a username, e.g. `user sensor-7`");
        let err = refused("topics read a/#\n");
        assert!(err.starts_with("acl: line 1: \"topics read a/#\": unknown keyword `topics`"), "{err}");
        let err = refused("topic reed a/#\n");
        assert!(err.contains("`reed` is not an access"), "{err}");
        let err = refused("topic read\n");
        assert!(err.contains("`read` without a topic filter"), "{err}");
        let err = refused("topic\n");
        assert!(err.contains("`topic` needs a topic filter"), "{err}");
        let err = refused("# ok\ntopic read a/#/b\n");
        assert!(err.starts_with("acl: line 2:") && err.contains("`#` must be the last level"), "{err}");
        let err = refused("pattern read a/%c+/x\n");
        assert!(err.contains("`+` must occupy a whole level"), "{err}");
        let err = Acl::load(Path::new("/nonexistent/acl")).expect_err("missing").to_string();
        assert!(err.starts_with("cannot read /nonexistent/acl: No such file"), "{err}");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("$s".to_owned()), Just("+".to_owned())]
    }

    /// Filters over a small alphabet, so they often overlap.
    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            levels.join("/")
        })
    }

    /// Every topic of up to four levels over the filters' alphabet.
    fn all_topics() -> Vec<String> {
        let mut topics = vec![String::new()];
        let mut out = Vec::new();
        for _ in 0..4 {
            let mut next = Vec::new();
            for t in &topics {
                for l in ["a", "b", "$s"] {
                    next.push(if t.is_empty() { l.to_owned() } else { format!("{t}/{l}") });
                }
            }
            out.extend(next.iter().cloned());
            topics = next;
        }
        out
    }

    fn line() -> impl Strategy<Value = String> {
        let access = prop_oneof![Just(""), Just("read "), Just("write "), Just("readwrite "), Just("deny ")];
        prop_oneof![
            (access.clone(), filter()).prop_map(|(a, f)| format!("topic {a}{f}")),
            (access, filter(), any::<bool>())
                .prop_map(|(a, f, u)| format!("pattern {a}{}/{f}", if u { "%u" } else { "%c" })),
            prop_oneof![Just("user a"), Just("user b")].prop_map(str::to_owned),
        ]
    }

    proptest! {
        #[test]
        fn overlap_and_cover_agree_with_matching(a in filter(), b in filter()) {
            let topics = all_topics();
            let both = topics.iter().any(|t| filter_matches(&a, t) && filter_matches(&b, t));
            if both {
                prop_assert!(filters_overlap(&a, &b), "{a} and {b} share a topic");
            }
            if filter_covers(&a, &b) {
                for t in topics.iter().filter(|t| filter_matches(&b, t)) {
                    prop_assert!(filter_matches(&a, t), "{a} covers {b} but not {t}");
                }
            }
            if a == b || a.ends_with('#') && b.starts_with(a.trim_end_matches('#')) && !b.starts_with('$') {
                prop_assert!(filter_covers(&a, &b), "{a} covers {b}");
            }
        }

        /// A refused subscription never misses a message the client could have read.
        #[test]
        fn a_refused_subscription_could_deliver_nothing(
            lines in prop::collection::vec(line(), 0..8),
            user in prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))],
            sub in filter(),
        ) {
            let a = acl(&lines.join("\n"));
            let client = a.for_client(user, "a");
            if !client.may_subscribe(&sub) {
                for t in all_topics().iter().filter(|t| filter_matches(&sub, t)) {
                    prop_assert!(!client.allows(t, Want::Read), "{sub} refused, but {t} is readable\n{}", lines.join("\n"));
                }
            }
        }

        /// The evaluation is mosquitto's, restated naively: own entries (deny first), then
        /// patterns (deny first); first decisive match wins.
        #[test]
        fn decisions_follow_the_documented_order(
            lines in prop::collection::vec(line(), 0..8),
            user in prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))],
            topic in prop::sample::select(all_topics()),
            write in any::<bool>(),
        ) {
            let text = lines.join("\n");
            let a = acl(&text);
            let want = if write { Want::Write } else { Want::Read };
            let mut own = Vec::new();
            let mut pats = Vec::new();
            let mut current: Option<&str> = None;
            for l in &lines {
                let words: Vec<&str> = l.split(' ').collect();
                match words[0] {
                    "user" => current = Some(if words[1] == "a" { "a" } else { "b" }),
                    kw => {
                        let (access, f) = if words.len() == 3 { (Access::parse(words[1]).expect("access"), words[2]) } else { (Access::ReadWrite, words[1]) };
                        if kw == "pattern" {
                            if f.contains("%u") && user.is_none() { continue; }
                            pats.push((access, f.replace("%c", "a").replace("%u", user.unwrap_or("")) ));
                        } else if current == user {
                            own.push((access, f.to_owned()));
                        }
                    }
                }
            }
            let decide = |entries: &[(Access, String)]| {
                if entries.iter().any(|(acc, f)| *acc == Access::Deny && filter_matches(f, &topic)) { return Some(false); }
                entries.iter().any(|(acc, f)| acc.grants(want) && filter_matches(f, &topic)).then_some(true)
            };
            let expected = decide(&own).or_else(|| decide(&pats)).unwrap_or(false);
            prop_assert_eq!(a.for_client(user, "a").allows(&topic, want), expected, "{}", text);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = Acl::parse(&text, Path::new("acl"));
            let _ = super::super::password::PasswordFile::parse(&text, Path::new("pw"));
        }
    }
}
