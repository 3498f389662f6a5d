//! Mosquitto's password file: one `username:hash` a line, written by `mosquitto_passwd` (or
//! `outpost passwd`).
//!
//! Hashes, as Debian's mosquitto 2.0 reads them:
//! - `$7$<iterations>$<salt>$<hash>` — PBKDF2-HMAC-SHA512, `mosquitto_passwd`'s own since 2.0
//!   (12-byte salt, 64-byte hash, base64 with padding; 101 iterations by default).
//! - `$6$<salt>$<hash>` — SHA-512 of the password followed by the salt (mosquitto 1.x).
//!
//! Blank lines and lines starting with `#` are skipped, as mosquitto skips them. Unlike
//! mosquitto, which skips a line it cannot use and logs it, a malformed line, an unknown hash
//! or a user listed twice refuses the whole file: a silently missing user is found only when a
//! sensor cannot log in.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::{digest, pbkdf2, rand::SecureRandom as _};
use subtle::ConstantTimeEq as _;

use super::AuthFileError;

/// Iterations `outpost passwd` uses unless told otherwise: `mosquitto_passwd`'s default, so
/// files stay interchangeable and a reconnect storm stays cheap (see `outpost passwd --help`).
pub const DEFAULT_ITERATIONS: u32 = 101;
/// The most PBKDF2 iterations a `$7$` hash may ask for; a file with more is refused (at
/// start-up, on SIGHUP, by `outpost check`, and `outpost passwd --iterations`). Every login
/// costs this many rounds, and so does every attempt with an unknown username (the decoy takes
/// the file's highest count), so one line with `$7$4294967295$…` would let any client tie up a
/// check thread for over an hour per CONNECT. 100,000 rounds measured 0.1 s per check on the
/// 2-core test machine (release build; 1,000,000: 1.07 s), about a thousand times
/// `mosquitto_passwd`'s default of 101.
pub const MAX_ITERATIONS: u32 = 100_000;
/// The salt `mosquitto_passwd` makes, in bytes.
const SALT_LEN: usize = 12;
/// PBKDF2-HMAC-SHA512's output as `mosquitto_passwd` writes it.
const PBKDF2_LEN: usize = 64;

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 { iterations: NonZeroU32, salt: Vec<u8>, hash: Vec<u8> },
}

impl std::fmt::Debug for Hash {
    /// Never the salt or the hash: debug output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Sha512 { .. } => write!(f, "Hash($6$)"),
            Hash::Pbkdf2Sha512 { iterations, .. } => write!(f, "Hash($7$, {iterations} iterations)"),
        }
    }
}

impl Hash {
    /// Parses the part after `username:`. The error says what is wrong, never the hash.
    pub fn parse(text: &str) -> Result<Hash, String> {
        let fields: Vec<&str> = text.split('$').collect();
        let decode = |what: &str, field: &str| {
            BASE64.decode(field).map_err(|e| format!("the {what} is not base64 ({e})"))
        };
        match fields.as_slice() {
            ["", "6", salt, hash] => {
                let hash = decode("hash", hash)?;
                if hash.len() != digest::SHA512_OUTPUT_LEN {
                    return Err(format!("a $6$ hash is 64 bytes, this one {}", hash.len()));
                }
                Ok(Hash::Sha512 { salt: decode("salt", salt)?, hash })
            }
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations.parse::<NonZeroU32>().map_err(|_| {
                    // A count has at most 10 digits; a longer field may be a salt or a hash
                    // from a line whose `$`s went astray, and stays out of the message.
                    let shown = if iterations.len() <= 10 {
                        format!("{iterations:?}")
                    } else {
                        format!("({} characters)", iterations.chars().count())
                    };
                    format!("the iteration count {shown} is not a number from 1 to 4294967295")
                })?;
                if iterations.get() > MAX_ITERATIONS {
                    return Err(format!(
                        "{iterations} PBKDF2 iterations is above Outpost's limit of {MAX_ITERATIONS}: every login, \
                         and every attempt with an unknown username, would cost that many rounds of CPU; set the \
                         password again with `outpost passwd --iterations {DEFAULT_ITERATIONS} FILE USER` \
                         (or `mosquitto_passwd FILE USER`, which uses {DEFAULT_ITERATIONS})"
                    ));
                }
                let hash = decode("hash", hash)?;
                if hash.is_empty() {
                    return Err("the $7$ hash is empty".to_owned());
                }
                Ok(Hash::Pbkdf2Sha512 { iterations, salt: decode("salt", salt)?, hash })
            }
            _ if !text.starts_with('$') => Err(
                "not a hash: clear-text passwords are not accepted; hash the file with `mosquitto_passwd -U FILE` or add users with `outpost passwd FILE USER`"
                    .to_owned(),
            ),
            _ => Err(
                "unknown hash format; expected $7$iterations$salt$hash (mosquitto_passwd 2.x) or $6$salt$hash (1.x)"
                    .to_owned(),
            ),
        }
    }

    /// A new `$7$` hash of `password` with a random salt.
    pub fn pbkdf2(password: &[u8], iterations: NonZeroU32) -> Result<Hash, ring::error::Unspecified> {
        let mut salt = vec![0; SALT_LEN];
        ring::rand::SystemRandom::new().fill(&mut salt)?;
        let mut hash = vec![0; PBKDF2_LEN];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, iterations, &salt, password, &mut hash);
        Ok(Hash::Pbkdf2Sha512 { iterations, salt, hash })
    }

    /// Whether `password` is the one hashed, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => {
                let mut context = digest::Context::new(&digest::SHA512);
                context.update(password);
                context.update(salt);
                bool::from(context.finish().as_ref().ct_eq(hash))
            }
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, *iterations, salt, password, hash).is_ok()
            }
        }
    }

    /// How many hash rounds one check costs (1 for `$6$`): the broker runs expensive checks on
    /// a blocking thread.
    pub fn rounds(&self) -> u32 {
        match self {
            Hash::Sha512 { .. } => 1,
            Hash::Pbkdf2Sha512 { iterations, .. } => iterations.get(),
        }
    }

    /// The file's form, as mosquitto writes it.
    pub fn encode(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => format!("$6${}${}", BASE64.encode(salt), BASE64.encode(hash)),
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
        }
    }
}

/// A parsed password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// Checked when a user is not in the file, so an unknown user costs what a known one costs
    /// (a timing difference would tell which usernames exist).
    decoy: Option<Hash>,
}

impl PasswordFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        PasswordFile::parse(&super::read(path)?, path)
    }

    /// Parses a password file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, AuthFileError> {
        let mut users = HashMap::new();
        let mut lines_of: HashMap<String, usize> = HashMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((username, hash)) = line.split_once(':') else {
                // A hash whose `username:` was lost: show only what comes before it.
                let shown = match line.split_once('$') {
                    Some((before, _)) => format!("{before}$…"),
                    None => line.to_owned(),
                };
                return Err(AuthFileError::line(
                    path,
                    line_no,
                    &shown,
                    "expected `username:hash`; add users with `outpost passwd FILE USER` or `mosquitto_passwd -b FILE USER PASSWORD`",
                ));
            };
            let username = username.trim();
            if username.is_empty() {
                return Err(AuthFileError::line(path, line_no, "", "the username before `:` is empty"));
            }
            // The content shown is the username only: the hash stays out of logs.
            let hash = Hash::parse(hash.trim())
                .map_err(|reason| AuthFileError::line(path, line_no, &format!("{username}:…"), reason))?;
            if let Some(first) = lines_of.insert(username.to_owned(), line_no) {
                return Err(AuthFileError::line(
                    path,
                    line_no,
                    &format!("{username}:…"),
                    format!(
                        "user {username:?} is listed twice (first on line {first}); delete one of the lines"
                    ),
                ));
            }
            users.insert(username.to_owned(), hash);
        }
        let decoy = users.values().map(Hash::rounds).max().map(|rounds| Hash::Pbkdf2Sha512 {
            iterations: NonZeroU32::new(rounds).unwrap_or(NonZeroU32::MIN),
            salt: vec![0; SALT_LEN],
            hash: vec![0; PBKDF2_LEN],
        });
        Ok(PasswordFile { users, decoy })
    }

    /// The hash to check `username`'s password against: the user's, or for an unknown user a
    /// decoy that never verifies but costs as much (`false` then).
    pub fn lookup(&self, username: &str) -> Option<(&Hash, bool)> {
        match self.users.get(username) {
            Some(hash) => Some((hash, true)),
            None => self.decoy.as_ref().map(|decoy| (decoy, false)),
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// `text` (a password file) with `username` set to `hash`: its line replaced where it is, or
/// appended. Every other line is kept as it was, comments included.
pub fn set_user(text: &str, username: &str, hash: &Hash) -> String {
    let entry = format!("{username}:{}", hash.encode());
    let mut replaced = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|line| {
            if !replaced && user_of(line) == Some(username) {
                replaced = true;
                entry.clone()
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !replaced {
        out.push(entry);
    }
    out.join("\n") + "\n"
}

/// `text` without `username`'s line; `None` if the user is not in it.
pub fn delete_user(text: &str, username: &str) -> Option<String> {
    let before = text.lines().count();
    let kept: Vec<&str> = text.lines().filter(|line| user_of(line) != Some(username)).collect();
    if kept.len() == before {
        return None;
    }
    Some(if kept.is_empty() { String::new() } else { kept.join("\n") + "\n" })
}

/// What [`edit_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edited {
    Added,
    Changed,
    Deleted,
}

/// Sets `username`'s hash in the password file at `path` (`Some`), creating the file if need
/// be, or deletes the user (`None`). The file must parse first (a broken file is not edited
/// further), and is replaced atomically (a temporary file beside it, synced, renamed), keeping
/// its permissions; a new file is readable by its owner only.
pub fn edit_file(path: &Path, username: &str, hash: Option<&Hash>) -> Result<Edited, AuthFileError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    if let Some(reason) = invalid_username(username) {
        return Err(AuthFileError::Edit { path: path.to_owned(), reason: format!("{reason}: {username:?}") });
    }
    let (text, mode) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o600);
            (text, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && hash.is_some() => (String::new(), 0o600),
        Err(source) => return Err(AuthFileError::Read { path: path.to_owned(), source }),
    };
    let existing = PasswordFile::parse(&text, path)?;
    let (new_text, edited) = match hash {
        Some(hash) => {
            let edited = if existing.users.contains_key(username) { Edited::Changed } else { Edited::Added };
            (set_user(&text, username, hash), edited)
        }
        None => match delete_user(&text, username) {
            Some(text) => (text, Edited::Deleted),
            None => {
                return Err(AuthFileError::Edit {
                    path: path.to_owned(),
                    reason: format!("user {username:?} is not in the file; nothing deleted"),
                });
            }
        },
    };
    let write_error = |source| AuthFileError::Write { path: path.to_owned(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.outpost-new"));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(new_text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(write_error(source));
    }
    Ok(edited)
}

/// The username a line holds, if it is an entry (not blank, not a comment).
fn user_of(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(user, _)| user.trim())
}

/// Whether `username` can be written into a password file as it is.
pub fn invalid_username(username: &str) -> Option<&'static str> {
    if username.is_empty() {
        Some("the username is empty")
    } else if username.contains(':') {
        Some("a username in a password file cannot contain `:`")
    } else if username.contains(['\n', '\r']) || username.trim() != username {
        Some("a username cannot contain line breaks or begin or end with whitespace")
    } else if username.starts_with('#') {
        Some("a username cannot begin with `#` (the line would be a comment)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by Debian's `mosquitto_passwd -c -b FILE alice secret` (mosquitto 2.0.11).
    const MOSQUITTO_7: &str = "$7$101$aB9oQg7EuNWTnSxy$0WU5L0WSIq26/ZuzxV4yPt6OfFAXIFsbydKGczIkKXdTkrYO0OgC7zTgbkY/CknPgRBVYyRk9GJRpPHy3VqI1A==";

    fn file(text: &str) -> Result<PasswordFile, String> {
        PasswordFile::parse(text, Path::new("passwd")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_mosquitto_passwd_hash_verifies() {
        let hash = Hash::parse(MOSQUITTO_7).expect("parses");
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"Secret"));
        assert!(!hash.verify(b""));
        assert_eq!(hash.rounds(), 101);
        assert_eq!(hash.encode(), MOSQUITTO_7, "encoding round-trips");
    }

    #[test]
    fn a_sha512_hash_of_mosquitto_1_verifies() {
        // SHA-512("secret" ‖ salt), salt = 12 bytes, as mosquitto 1.x's mosquitto_passwd wrote it.
        let salt = b"0123456789ab";
        let mut context = digest::Context::new(&digest::SHA512);
        context.update(b"secret");
        context.update(salt);
        let text = format!("$6${}${}", BASE64.encode(salt), BASE64.encode(context.finish()));
        let hash = Hash::parse(&text).expect("parses");
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"secreT"));
        assert_eq!(hash.encode(), text);
    }

    #[test]
    fn new_hashes_verify_and_use_fresh_salts() {
        let iterations = NonZeroU32::new(DEFAULT_ITERATIONS).expect("non-zero");
        let a = Hash::pbkdf2(b"pw", iterations).expect("random");
        let b = Hash::pbkdf2(b"pw", iterations).expect("random");
        assert!(a.verify(b"pw") && b.verify(b"pw"));
        assert_ne!(a, b, "salts differ");
        let reparsed = Hash::parse(&a.encode()).expect("parses");
        assert!(reparsed.verify(b"pw"));
    }

    #[test]
    fn every_line_form() {
        let text = format!("# users\n\nalice:{MOSQUITTO_7}\n  bob : {MOSQUITTO_7}  \n");
        let parsed = file(&text).expect("valid");
        assert_eq!(parsed.len(), 2);
        assert!(parsed.lookup("alice").is_some_and(|(h, known)| known && h.verify(b"secret")));
        assert!(parsed.lookup("bob").is_some_and(|(_, known)| known));
        let (decoy, known) = parsed.lookup("mallory").expect("a decoy");
        assert!(!known && !decoy.verify(b"secret"));
        assert_eq!(decoy.rounds(), 101, "an unknown user costs what a known one does");
        assert!(file("").expect("empty").lookup("x").is_none());
    }

    #[test]
    fn bad_lines_name_file_line_and_fix_and_never_the_hash() {
        let err = file("alice:secret\n").expect_err("clear text");
        assert!(err.starts_with("passwd: line 1: \"alice:…\": not a hash: clear-text passwords"), "{err}");
        assert!(err.contains("mosquitto_passwd -U"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = file(&format!("# c\nalice:{MOSQUITTO_7}\njust-a-name\n")).expect_err("no colon");
        assert!(err.starts_with("passwd: line 3: \"just-a-name\": expected `username:hash`"), "{err}");
        let err = file(&format!(":{MOSQUITTO_7}\n")).expect_err("no user");
        assert!(err.contains("line 1") && err.contains("username before `:` is empty"), "{err}");
        let err = file("u:$5$abc$def\n").expect_err("unknown");
        assert!(err.contains("unknown hash format; expected $7$"), "{err}");
        let err = file(&format!("u:$7${}$YWJj$YWJj\n", u32::MAX)).expect_err("too many iterations");
        assert!(
            err.starts_with(
                "passwd: line 1: \"u:…\": 4294967295 PBKDF2 iterations is above Outpost's limit of 100000"
            ) && err.contains("outpost passwd --iterations 101 FILE USER"),
            "{err}"
        );
        file(&format!("u:{}\n", &MOSQUITTO_7.replacen("$101$", &format!("${MAX_ITERATIONS}$"), 1)))
            .expect("the limit itself is allowed");
        // Found by the password_file fuzz target: a field in the count's place that is not a
        // count is not quoted when it could be a salt or a hash.
        let err = file("u:$7$c2FsdHNhbHRzYWx0$Hd71hnNoKcARd6$YWJj\n").expect_err("no count");
        assert!(err.contains("the iteration count (16 characters) is not a number"), "{err}");
        assert!(!err.contains("c2FsdHNhbHRzYWx0"), "{err}");
        let err = file("u$7$101$c2FsdHNhbHRzYWx0$Hd71hnNoKcARd6\n").expect_err("no colon");
        assert!(err.starts_with("passwd: line 1: \"u$…\": expected `username:hash`"), "{err}");
        assert!(!err.contains("c2FsdHNhbHRzYWx0"), "{err}");
        let err = file("u:$7$0$YWJj$YWJj\n").expect_err("zero iterations");
        assert!(err.contains("iteration count \"0\""), "{err}");
        let err = file("u:$7$10$!!$YWJj\n").expect_err("bad base64");
        assert!(err.contains("the salt is not base64"), "{err}");
        let err = file("u:$6$YWJj$YWJj\n").expect_err("short sha512");
        assert!(err.contains("a $6$ hash is 64 bytes, this one 3"), "{err}");
        let err = file(&format!("a:{MOSQUITTO_7}\na:{MOSQUITTO_7}\n")).expect_err("twice");
        assert!(err.contains("line 2") && err.contains("listed twice (first on line 1)"), "{err}");
    }

    #[test]
    fn set_and_delete_keep_the_other_lines() {
        let hash = Hash::parse(MOSQUITTO_7).expect("parses");
        let text = "# site users\nalice:$6$x$y\nbob:$6$x$y\n";
        let set = set_user(text, "alice", &hash);
        assert_eq!(set, format!("# site users\nalice:{MOSQUITTO_7}\nbob:$6$x$y\n"));
        let added = set_user(&set, "carol", &hash);
        assert!(added.ends_with(&format!("bob:$6$x$y\ncarol:{MOSQUITTO_7}\n")), "{added}");
        assert_eq!(delete_user(&added, "bob").expect("present").lines().count(), 3);
        assert_eq!(delete_user(&added, "nobody"), None);
        assert_eq!(set_user("", "a", &hash), format!("a:{MOSQUITTO_7}\n"));
    }

    #[test]
    fn edit_file_adds_changes_deletes_and_keeps_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        let hash = |pw: &[u8]| Hash::pbkdf2(pw, NonZeroU32::new(101).expect("non-zero")).expect("random");
        assert_eq!(edit_file(&path, "alice", Some(&hash(b"one"))).expect("creates"), Edited::Added);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "a new file is its owner's only");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(edit_file(&path, "alice", Some(&hash(b"two"))).expect("changes"), Edited::Changed);
        assert_eq!(edit_file(&path, "bob", Some(&hash(b"b"))).expect("adds"), Edited::Added);
        assert_eq!(mode(&path), 0o640, "permissions are kept");
        let file = PasswordFile::load(&path).expect("valid");
        assert!(file.lookup("alice").is_some_and(|(h, known)| known && h.verify(b"two")));
        assert_eq!(edit_file(&path, "alice", None).expect("deletes"), Edited::Deleted);
        assert_eq!(PasswordFile::load(&path).expect("valid").len(), 1);
        let err = edit_file(&path, "alice", None).expect_err("gone").to_string();
        assert!(err.ends_with("user \"alice\" is not in the file; nothing deleted"), "{err}");
        let err = edit_file(&path, "a:b", Some(&hash(b"x"))).expect_err("colon").to_string();
        assert!(err.contains("cannot contain `:`"), "{err}");
        std::fs::write(&path, "broken\n").expect("write");
        let err = edit_file(&path, "carol", Some(&hash(b"x"))).expect_err("broken file").to_string();
        assert!(err.contains("line 1"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "no temporary file left");
    }

    #[test]
    fn usernames_that_cannot_be_written_are_refused() {
        assert!(invalid_username("sensor-7").is_none());
        for bad in ["", "a:b", " a", "a\n", "#a"] {
            assert!(invalid_username(bad).is_some(), "{bad:?}");
        }
    }
}
