//! Who may connect, and what each client may read and write: Mosquitto's `password_file` and
//! `acl_file` formats, parsed and evaluated, so a site's existing files work unchanged.
//!
//! Pure except for [`password::PasswordFile::load`] and [`acl::Acl::load`], which read one file
//! each: no tokio, no sockets, no pipeline policy. The broker enforces what this module decides
//! (`broker::access`); the config check (`outpost check`) and `outpost passwd` use it too,
//! which is why it sits at the bottom rather than inside the broker.
//!
//! # Invariants
//! - A file is taken whole or not at all: one bad line refuses the file, and the error names
//!   the file, the line, its content (never a password or a hash) and the fix.
//! - Password checks compare in constant time (PBKDF2 through ring's `pbkdf2::verify`, SHA-512
//!   through `subtle`), and a user that does not exist costs the same work as one that does.

pub mod acl;
pub mod password;

use std::path::{Path, PathBuf};

/// A password or ACL file Outpost cannot use.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read {}: {source} (check the path and that the gateway's user may read it)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: line {line}: {content}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, content: String, reason: String },
    #[error("cannot write {}: {source} (check that the directory exists and you may write it)", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Edit { path: PathBuf, reason: String },
}

impl AuthFileError {
    fn line(path: &Path, line: usize, content: &str, reason: impl Into<String>) -> AuthFileError {
        AuthFileError::Line {
            path: path.to_owned(),
            line,
            content: format!("{:?}", truncate(content, 120)),
            reason: reason.into(),
        }
    }
}

/// At most `max` bytes of `text`, cut at a character boundary, for messages.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn read(path: &Path) -> Result<String, AuthFileError> {
    std::fs::read_to_string(path).map_err(|source| AuthFileError::Read { path: path.to_owned(), source })
}
