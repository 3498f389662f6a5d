//! Why a buffer file or data dir cannot be used, in words an operator can act on: who owns
//! it, with which mode, which user the gateway runs as, and the command that fixes it.
//!
//! Invariant: nothing here changes the file system; it only describes it. User names come
//! from `/etc/passwd` and the running user from `/proc/self/status` (no FFI); a user without
//! a passwd entry (systemd's `DynamicUser=`) is shown by number.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The effective user and group of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// The effective uid and gid, from `/proc/self/status` (`Uid:` real, effective, saved, fs).
pub fn running_as() -> Option<Identity> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = |prefix: &str| -> Option<u32> {
        status.lines().find(|l| l.starts_with(prefix))?.split_whitespace().nth(2)?.parse().ok()
    };
    Some(Identity { uid: effective("Uid:")?, gid: effective("Gid:")? })
}

/// `name (uid N)`, or `uid N` when no passwd entry names it.
pub fn user_label(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
        })
    });
    match name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// `owned by root (uid 0), mode 0644`, or why it cannot be looked at.
pub fn describe(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("owned by {}, mode {:04o}", user_label(m.uid()), m.mode() & 0o7777),
        Err(e) if e.kind() == io::ErrorKind::NotFound => "missing".to_owned(),
        Err(e) => format!("not inspectable ({e})"),
    }
}

/// What to tell the operator when `path` (in `dir`) failed with `error`. States that the file
/// was left as it is: an access problem never moves a buffer aside.
pub fn hint(path: &Path, dir: &Path, error: &io::Error) -> String {
    let me = running_as();
    let user = me.map_or("an unknown user".to_owned(), |id| user_label(id.uid));
    match error.kind() {
        io::ErrorKind::PermissionDenied => {
            let chown = me.map_or(format!("chown -R USER: {}", dir.display()), |id| {
                format!("chown -R {}:{} {}", id.uid, id.gid, dir.display())
            });
            let file = if path == dir {
                String::new()
            } else {
                format!("{} is {}; ", path.display(), describe(path))
            };
            format!(
                "{file}{} is {}; outpost runs as {user} and may not use them. Give {} to that user (`{chown}`) or run outpost as the owner. Nothing was changed",
                dir.display(),
                describe(dir),
                dir.display()
            )
        }
        io::ErrorKind::ReadOnlyFilesystem => format!(
            "the file system holding {} is mounted read-only; mount it read-write (or set data_dir to a directory on a writable file system). Nothing was changed",
            dir.display()
        ),
        io::ErrorKind::NotFound => format!(
            "{} or a directory on the way to it does not exist; check the path (data_dir must be a directory {user} can write to)",
            path.display()
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            format!("the disk holding {} is full; free space there. Nothing was changed", dir.display())
        }
        _ => format!(
            "an I/O error, not a problem with the file's contents: check the storage (`dmesg`); {} was left as it is",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_root_and_unknown_users() {
        assert_eq!(user_label(0), "root (uid 0)");
        assert_eq!(user_label(4_000_000_000), "uid 4000000000");
    }

    #[test]
    fn permission_hint_names_owner_mode_user_and_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("buffer.redb");
        std::fs::write(&file, b"x").expect("write");
        let error = io::Error::from(io::ErrorKind::PermissionDenied);
        let hint = hint(&file, dir.path(), &error);
        let me = running_as().expect("procfs");
        assert!(hint.contains(&format!("{} is owned by {}", file.display(), user_label(me.uid))), "{hint}");
        assert!(hint.contains("mode 0644"), "{hint}");
        assert!(hint.contains(&format!("chown -R {}:{} {}", me.uid, me.gid, dir.path().display())), "{hint}");
    }
}
