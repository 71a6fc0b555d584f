//! File modes of what holds secrets: the service key file and the state
//! directory. Checked at start (and the key by every command that reads
//! it), because a key or a store another local user can read gives away
//! every grant.
//!
//! - **Key file** (service key mode, `key_file` or the systemd credential):
//!   refused if anyone but its owner may read or write it, with the
//!   `chmod 600` that fixes it. One exception, as PostgreSQL allows for its
//!   key: a key owned by root may be readable by its group (0640, 0440),
//!   the usual way to hand a root-managed key to a service user, and what
//!   systemd's credentials look like when it grants the service user
//!   access through an ACL (root-owned, 0440 with the ACL mask in the group
//!   bits; otherwise they are 0400 and owned by the service user).
//! - **State directory** (`state_dir`): the directory and every directory
//!   under it must be 0700, every file 0600 (no group or other bits).
//!   Wider modes are repaired when this user may change them, and each
//!   change is returned so the caller logs it; when it cannot (the
//!   directory belongs to someone else), start is refused with what to run.
//!   Symlinks inside are not followed; sockets and other special files are
//!   left alone (the control socket is made 0600 when bound).

use std::path::{Path, PathBuf};

/// A mode changed by [`secure_state_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The file or directory.
    pub path: PathBuf,
    /// Its permission bits before.
    pub from: u32,
    /// Its permission bits now.
    pub to: u32,
}

/// Why the state directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    /// Other users may reach it, and this user cannot change that.
    #[error(
        "{} is accessible to other users (mode {from:04o}) and mailbridge cannot change that ({reason}): as its owner or root, run `chmod {want:o} {}`",
        path.display(), path.display()
    )]
    CannotRepair {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        from: u32,
        /// The mode it needs.
        want: u32,
        /// Why the change failed.
        reason: String,
    },
    /// It cannot be inspected.
    #[error("cannot inspect {}: {reason}", path.display())]
    Inspect {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Whether a key file with these permission bits, owned by `uid`, is
/// private enough; if not, what to say (naming `path`).
pub fn key_file_problem(path: &Path, mode: u32, uid: u32) -> Option<String> {
    let mode = mode & 0o777;
    let group_read_by_root_key = uid == 0 && mode & 0o030 == 0;
    let too_open = mode & 0o007 != 0 || (mode & 0o070 != 0 && !group_read_by_root_key);
    too_open.then(|| {
        format!(
            "the key file {} can be read or changed by other users (mode {mode:04o}): run `chmod 600 {}` (a key owned by root may also be 0640, readable by the service's group)",
            path.display(),
            path.display()
        )
    })
}

/// [`key_file_problem`] for the file at `path` (symlinks followed, as
/// reading it does). None off Unix.
pub fn check_key_file(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        if let Some(problem) = key_file_problem(path, meta.mode(), meta.uid()) {
            return Err(problem);
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Makes the state directory `dir` and everything in it private (see the
/// module documentation); returns what it changed. A directory that does
/// not exist yet is fine (the store creates it 0700).
#[cfg(unix)]
pub fn secure_state_dir(dir: &Path) -> Result<Vec<Repair>, ModeError> {
    let mut repairs = Vec::new();
    // The state directory itself may be a symlink to where it lives.
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Ok(repairs),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(repairs),
        Err(e) => {
            return Err(ModeError::Inspect {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            });
        }
    }
    secure(dir, 0o700, &mut repairs)?;
    walk(dir, &mut repairs)?;
    Ok(repairs)
}

/// Not Unix: nothing to check.
#[cfg(not(unix))]
pub fn secure_state_dir(_dir: &Path) -> Result<Vec<Repair>, ModeError> {
    Ok(Vec::new())
}

#[cfg(unix)]
fn walk(dir: &Path, repairs: &mut Vec<Repair>) -> Result<(), ModeError> {
    let inspect = |path: &Path, e: std::io::Error| ModeError::Inspect {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    for entry in std::fs::read_dir(dir).map_err(|e| inspect(dir, e))? {
        let entry = entry.map_err(|e| inspect(dir, e))?;
        let path = entry.path();
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            // Gone between listing and looking (sled drops old snapshots).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(inspect(&path, e)),
        };
        if kind.is_dir() {
            secure(&path, 0o700, repairs)?;
            walk(&path, repairs)?;
        } else if kind.is_file() {
            secure(&path, 0o600, repairs)?;
        }
    }
    Ok(())
}

/// Sets `want` on `path` if it grants anything to group or others.
#[cfg(unix)]
fn secure(path: &Path, want: u32, repairs: &mut Vec<Repair>) -> Result<(), ModeError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ModeError::Inspect {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let from = meta.permissions().mode() & 0o7777;
    if from & 0o077 == 0 {
        return Ok(());
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)) {
        Ok(()) => {
            repairs.push(Repair {
                path: path.to_path_buf(),
                from,
                to: want,
            });
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ModeError::CannotRepair {
            path: path.to_path_buf(),
            from,
            want,
            reason: e.to_string(),
        }),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_modes() {
        let p = Path::new("/k");
        let user = 1000;
        for ok in [0o600, 0o400, 0o700] {
            assert_eq!(key_file_problem(p, ok, user), None, "{ok:o}");
            assert_eq!(key_file_problem(p, ok, 0), None, "{ok:o}");
        }
        for bad in [0o644, 0o640, 0o604, 0o660, 0o666, 0o620] {
            let problem = key_file_problem(p, bad, user).expect("refused");
            assert!(problem.contains("chmod 600 /k"), "{problem}");
            assert!(problem.contains(&format!("{bad:04o}")), "{problem}");
        }
        // Root's key, read through the service's group (or a systemd
        // credential with an ACL): fine; writable by the group, or
        // readable by others: not.
        assert_eq!(key_file_problem(p, 0o640, 0), None);
        assert_eq!(key_file_problem(p, 0o440, 0), None);
        assert!(key_file_problem(p, 0o660, 0).is_some());
        assert!(key_file_problem(p, 0o644, 0).is_some());
        assert!(key_file_problem(p, 0o444, 0).is_some());
    }

    #[test]
    fn state_dir_is_repaired() {
        let dir = std::env::temp_dir().join(format!(
            "mailbridge-modes-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let sub = dir.join("db");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(dir.join("open"), b"x").unwrap();
        std::fs::write(sub.join("conf"), b"x").unwrap();
        std::fs::write(dir.join("closed"), b"x").unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(&dir, 0o755);
        set(&sub, 0o750);
        set(&dir.join("open"), 0o644);
        set(&sub.join("conf"), 0o640);
        set(&dir.join("closed"), 0o600);
        let mut repairs = secure_state_dir(&dir).unwrap();
        repairs.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<_> = repairs
            .iter()
            .map(|r| {
                (
                    r.path.strip_prefix(&dir).unwrap().to_path_buf(),
                    r.from,
                    r.to,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (PathBuf::new(), 0o755, 0o700),
                (PathBuf::from("db"), 0o750, 0o700),
                (PathBuf::from("db/conf"), 0o640, 0o600),
                (PathBuf::from("open"), 0o644, 0o600),
            ]
        );
        // Nothing left to do.
        assert!(secure_state_dir(&dir).unwrap().is_empty());
        // Not there yet: fine.
        assert!(secure_state_dir(&dir.join("missing")).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
