//! Who may connect and what each connection may touch: `[broker]`'s passwords
//! (`password_file`, or `users` in tests), `allow_anonymous` and `acl_file`, enforced with
//! [`crate::auth`]'s decisions, and reloaded on SIGHUP.
//!
//! # Invariants
//! - The files in force are replaced only by files that parsed completely: a reload that fails
//!   changes nothing (counted `auth_reload_failures`, logged with the fix).
//! - A password check never blocks the runtime for long: a hash of more than
//!   [`INLINE_ROUNDS`] rounds is checked on the blocking pool, at most [`MAX_BLOCKING_CHECKS`]
//!   at a time, so a CONNECT flood queues behind a semaphore (under the handshake's
//!   `broker.connection_timeout`) instead of filling the blocking pool.
//! - A username is an identity only when a password proved it: without a password store every
//!   client is anonymous for the ACL (mosquitto would trust the username a client claims).
//! - One lock, a leaf: the policy in force is swapped under it and read (an `Arc` clone) under
//!   it; nothing else is locked under it and it is never held across an `.await`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::auth::AuthFileError;
use crate::auth::acl::{Acl, ClientAcl, Want};
use crate::auth::password::{Hash, PasswordFile};
use crate::config::BrokerConfig;
use crate::metrics::Metrics;

/// Hash rounds checked on the runtime's own thread. `mosquitto_passwd`'s default of 101
/// PBKDF2-SHA512 rounds measured ~0.19 ms per check on the 2-core test machine under load
/// (1,000 rounds: ~1.7 ms, long enough to delay every other connection): more than 200 go to
/// the blocking pool.
pub const INLINE_ROUNDS: u32 = 200;
/// Expensive password checks running at once, at most (one per core of a small gateway).
pub const MAX_BLOCKING_CHECKS: usize = 2;

/// Where passwords come from.
enum Passwords {
    /// No passwords: every client is anonymous.
    None,
    /// `broker.users` (tests only).
    Plain(std::collections::BTreeMap<String, String>),
    File(PasswordFile),
}

/// The files in force.
struct Policy {
    passwords: Passwords,
    acl: Option<Arc<Acl>>,
}

/// Why a CONNECT's credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A wrong username or password (or a username the password store does not know).
    BadCredentials,
    /// No username, and `broker.allow_anonymous` is false.
    Anonymous,
}

/// The broker's part that decides access (see the module docs).
pub struct Access {
    allow_anonymous: bool,
    password_file: Option<PathBuf>,
    acl_file: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    /// Bumped by every reload, so connections know their [`Permissions`] are stale.
    generation: AtomicU64,
    checks: Semaphore,
}

impl Access {
    /// Reads the files `cfg` names.
    pub fn load(cfg: &BrokerConfig) -> Result<Access, AuthFileError> {
        let access = Access {
            allow_anonymous: cfg.allow_anonymous(),
            password_file: cfg.password_file.clone(),
            acl_file: cfg.acl_file.clone(),
            current: RwLock::new(Arc::new(Policy { passwords: Passwords::None, acl: None })),
            generation: AtomicU64::new(0),
            checks: Semaphore::new(MAX_BLOCKING_CHECKS),
        };
        let mut policy = access.read_files()?;
        if access.password_file.is_none() && !cfg.users.is_empty() {
            policy.passwords = Passwords::Plain(cfg.users.clone());
        }
        access.install(policy);
        Ok(access)
    }

    /// Whether any of it is configured: without it the broker checks nothing per packet.
    pub fn has_files(&self) -> bool {
        self.password_file.is_some() || self.acl_file.is_some()
    }

    fn read_files(&self) -> Result<Policy, AuthFileError> {
        let passwords = match &self.password_file {
            Some(path) => Passwords::File(PasswordFile::load(path)?),
            None => Passwords::None,
        };
        let acl = self.acl_file.as_deref().map(Acl::load).transpose()?.map(Arc::new);
        Ok(Policy { passwords, acl })
    }

    fn install(&self, policy: Policy) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Reads the files again (blocking file I/O: call it off the runtime) and puts them in
    /// force, or keeps the ones in force if either is unreadable or invalid. Returns what was
    /// loaded, for the log: (users, ACL entries).
    pub fn reload(&self) -> Result<(usize, usize), AuthFileError> {
        let mut policy = self.read_files()?;
        // `broker.users` is config, not a file: it stays as it was.
        if matches!(policy.passwords, Passwords::None)
            && let Passwords::Plain(users) = &self.policy().passwords
        {
            policy.passwords = Passwords::Plain(users.clone());
        }
        let counts = (
            match &policy.passwords {
                Passwords::None => 0,
                Passwords::Plain(users) => users.len(),
                Passwords::File(file) => file.len(),
            },
            policy.acl.as_ref().map_or(0, |acl| acl.len()),
        );
        self.install(policy);
        Ok(counts)
    }

    /// Checks a CONNECT's credentials: the username the ACL knows the client by (`None`:
    /// anonymous), or why it is refused.
    pub async fn authenticate(&self, login: Option<(&str, &str)>) -> Result<Option<Arc<str>>, Refusal> {
        let policy = self.policy();
        let Some((username, password)) = login else {
            return if self.allow_anonymous { Ok(None) } else { Err(Refusal::Anonymous) };
        };
        let verified = match &policy.passwords {
            // No passwords to prove a username with: the client is anonymous.
            Passwords::None => {
                return if self.allow_anonymous { Ok(None) } else { Err(Refusal::Anonymous) };
            }
            Passwords::Plain(users) => users
                .get(username)
                .is_some_and(|expected| bool::from(expected.as_bytes().ct_eq(password.as_bytes()))),
            Passwords::File(file) => match file.lookup(username) {
                Some((hash, known)) => self.verify(hash, password).await && known,
                None => false,
            },
        };
        if verified { Ok(Some(Arc::from(username))) } else { Err(Refusal::BadCredentials) }
    }

    /// Checks `password` against `hash`, on the blocking pool when it is expensive.
    async fn verify(&self, hash: &Hash, password: &str) -> bool {
        if hash.rounds() <= INLINE_ROUNDS {
            return hash.verify(password.as_bytes());
        }
        // Closed only if the semaphore were dropped, which it is not while `self` lives.
        let Ok(_permit) = self.checks.acquire().await else { return false };
        let (hash, password) = (hash.clone(), password.to_owned());
        tokio::task::spawn_blocking(move || hash.verify(password.as_bytes())).await.unwrap_or(false)
    }

    /// A connection's view of the ACL, refreshed after a reload.
    pub fn permissions(&self, username: Option<Arc<str>>, client_id: Arc<str>) -> Permissions {
        Permissions { username, client_id, generation: u64::MAX, acl: None }
    }
}

/// One connection's ACL, its patterns filled in for its client id and username; rebuilt when
/// the files were reloaded. Each side of a connection keeps its own (no lock per packet).
pub struct Permissions {
    username: Option<Arc<str>>,
    client_id: Arc<str>,
    /// The [`Access`] generation `acl` was built from (`u64::MAX`: never built).
    generation: u64,
    /// `None`: no ACL file, everything is allowed.
    acl: Option<ClientAcl>,
}

impl Permissions {
    fn current(&mut self, access: &Access) -> Option<&ClientAcl> {
        let generation = access.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.acl = access
                .policy()
                .acl
                .as_ref()
                .map(|acl| acl.for_client(self.username.as_deref(), &self.client_id));
            self.generation = generation;
        }
        self.acl.as_ref()
    }

    /// Whether the client may publish to `topic` (a publish, its will).
    pub fn may_write(&mut self, access: &Access, topic: &str) -> bool {
        self.current(access).is_none_or(|acl| acl.allows(topic, Want::Write))
    }

    /// Whether the client may receive a message published to `topic` (its wire bytes, which
    /// are only decoded when there is an ACL to check them against).
    pub fn may_read(&mut self, access: &Access, topic: &[u8]) -> bool {
        self.current(access)
            .is_none_or(|acl| std::str::from_utf8(topic).is_ok_and(|topic| acl.allows(topic, Want::Read)))
    }

    /// Whether a subscription to `filter` (shared prefix removed) could deliver anything.
    pub fn may_subscribe(&mut self, access: &Access, filter: &str) -> bool {
        self.current(access).is_none_or(|acl| acl.may_subscribe(filter))
    }
}

/// Re-reads the password and ACL files on every SIGHUP until `cancel`.
pub async fn reload_on_hangup(access: Arc<Access>, metrics: Metrics, cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            error!(message = "cannot listen for SIGHUP; the password and ACL files will not be reloaded until a restart", %error);
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            received = hangup.recv() => if received.is_none() { break },
        }
        let reloaded = tokio::task::spawn_blocking({
            let access = Arc::clone(&access);
            move || access.reload()
        })
        .await;
        match reloaded {
            Ok(Ok((users, acl_entries))) => {
                Metrics::add(&metrics.counters().auth_reloads, 1);
                info!(message = "password and ACL files reloaded", users, acl_entries);
            }
            Ok(Err(e)) => {
                Metrics::add(&metrics.counters().auth_reload_failures, 1);
                error!(message = "password or ACL file refused; the files loaded before stay in force. Fix the file and send SIGHUP again", error = %e);
            }
            Err(e) => error!(message = "the password and ACL reload task failed", error = %e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    #[tokio::test]
    async fn passwords_anonymous_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("passwd");
        let hash = Hash::pbkdf2(b"right", NonZeroU32::new(101).expect("non-zero")).expect("random");
        std::fs::write(&pw, format!("alice:{}\n", hash.encode())).expect("write");
        let cfg = BrokerConfig { password_file: Some(pw.clone()), ..BrokerConfig::default() };
        let access = Access::load(&cfg).expect("loads");
        assert_eq!(access.authenticate(Some(("alice", "right"))).await, Ok(Some(Arc::from("alice"))));
        assert_eq!(access.authenticate(Some(("alice", "wrong"))).await, Err(Refusal::BadCredentials));
        assert_eq!(access.authenticate(Some(("bob", "right"))).await, Err(Refusal::BadCredentials));
        assert_eq!(
            access.authenticate(None).await,
            Err(Refusal::Anonymous),
            "default: no anonymous with passwords"
        );

        // A broken file is refused and the one in force stays.
        std::fs::write(&pw, "alice:clear\n").expect("write");
        assert!(access.reload().is_err());
        assert_eq!(access.authenticate(Some(("alice", "right"))).await, Ok(Some(Arc::from("alice"))));
        // A good one replaces it.
        let bob = Hash::pbkdf2(b"b", NonZeroU32::new(5_000).expect("non-zero")).expect("random");
        std::fs::write(&pw, format!("bob:{}\n", bob.encode())).expect("write");
        assert_eq!(access.reload().expect("reloads"), (1, 0));
        assert_eq!(access.authenticate(Some(("alice", "right"))).await, Err(Refusal::BadCredentials));
        // 5,000 rounds: checked on the blocking pool.
        assert_eq!(access.authenticate(Some(("bob", "b"))).await, Ok(Some(Arc::from("bob"))));
    }

    #[tokio::test]
    async fn without_passwords_everyone_is_anonymous() {
        let access = Access::load(&BrokerConfig::default()).expect("loads");
        assert_eq!(access.authenticate(None).await, Ok(None));
        assert_eq!(
            access.authenticate(Some(("admin", "x"))).await,
            Ok(None),
            "an unproven username is no identity"
        );
        let mut cfg = BrokerConfig::default();
        cfg.users.insert("u".into(), "p".into());
        cfg.allow_plaintext_passwords = true;
        let access = Access::load(&cfg).expect("loads");
        assert_eq!(access.authenticate(Some(("u", "p"))).await, Ok(Some(Arc::from("u"))));
        assert_eq!(access.authenticate(Some(("u", "q"))).await, Err(Refusal::BadCredentials));
        assert_eq!(access.authenticate(None).await, Err(Refusal::Anonymous));
    }

    #[test]
    fn permissions_follow_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let acl = dir.path().join("acl");
        std::fs::write(&acl, "topic readwrite a/#\n").expect("write");
        let cfg = BrokerConfig { acl_file: Some(acl.clone()), ..BrokerConfig::default() };
        let access = Access::load(&cfg).expect("loads");
        let mut perms = access.permissions(None, Arc::from("c"));
        assert!(perms.may_write(&access, "a/x") && !perms.may_write(&access, "b/x"));
        std::fs::write(&acl, "topic readwrite b/#\n").expect("write");
        access.reload().expect("reloads");
        assert!(!perms.may_write(&access, "a/x") && perms.may_write(&access, "b/x"));
        assert!(perms.may_subscribe(&access, "b/+") && !perms.may_subscribe(&access, "a/+"));
        let open = Access::load(&BrokerConfig::default()).expect("loads");
        let mut anything = open.permissions(None, Arc::from("c"));
        assert!(anything.may_read(&open, b"x") && anything.may_write(&open, "$SYS/x"));
    }
}
