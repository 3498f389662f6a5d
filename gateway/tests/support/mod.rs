//! What the gateway's integration tests share: a tmpfs mounted for one test (a small disk
//! that can fill up, or a file system that can turn read-only).

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Unmounts on drop, even when an assertion fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create mount point");
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path));
        Tmpfs(path.to_owned())
    }

    pub fn resize(&self, size: &str) {
        run(Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0));
    }

    /// Remounts the file system read-only (`ro = true`) or read-write.
    pub fn set_read_only(&self, ro: bool) {
        run(Command::new("mount").args(["-o", if ro { "remount,ro" } else { "remount,rw" }]).arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run mount");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the effective uid is 0, from /proc (no unsafe FFI needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

/// Whether this machine can run these tests; in CI it must.
pub fn can_mount() -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "this test needs root (to mount a tmpfs) and CI runs as root");
    eprintln!("skipping: mounting a tmpfs needs root");
    false
}
