//! The sled backend of [`TokenStore`].
//!
//! Layout: the state directory (mode 0700) holds a `store` directory that is
//! sled's database; other parts of mailbridge may keep their own files (for
//! example a generated local certificate) beside it. Two trees: `grants`
//! (account -> JSON [`SealedGrant`]) and `meta` (account -> JSON
//! [`AccountMeta`]). Every directory is 0700 and every file 0600; sled
//! creates its files with the process umask, so modes are tightened after
//! opening and after each flush instead of changing the umask.
//!
//! After a write fails (a full disk), sled refuses every later write until
//! the database is opened again, so a store in a state directory reopens
//! itself before its next operation: once the disk has room, writes work
//! again without a restart.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AccountMeta, SealedGrant, StoreError, TokenStore, decode};

const DB_DIR: &str = "store";
const GRANTS: &str = "grants";
const META: &str = "meta";

/// A [`TokenStore`] kept in a sled database under the state directory.
pub struct SledStore {
    /// The open database; `None` between a failed reopen and the next try.
    handles: RwLock<Option<Handles>>,
    /// A write failed: reopen before the next operation (state directory
    /// stores only; a temporary one would lose its data).
    reopen: AtomicBool,
    /// The state directory; `None` for a temporary store.
    dir: Option<PathBuf>,
    /// Refresh locks: the service's own refreshes, and those of commands
    /// that reach the store through the control socket (`doctor`).
    locks: super::LocalLocks,
}

/// The database and its two trees.
struct Handles {
    db: sled::Db,
    grants: sled::Tree,
    meta: sled::Tree,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore").field("dir", &self.dir).finish()
    }
}

impl SledStore {
    /// Open (creating if needed) the store in the state directory `dir`.
    ///
    /// Creates `dir` with mode 0700 and tightens an existing one; every file
    /// under it that the store owns is set to 0600. Fails with
    /// [`StoreError::Locked`] while another process (or another `SledStore`
    /// in this process) has the same directory open.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let handles = Self::open_handles(dir)?;
        let store = SledStore {
            handles: RwLock::new(Some(handles)),
            reopen: AtomicBool::new(false),
            dir: Some(dir.to_path_buf()),
            locks: super::LocalLocks::default(),
        };
        store.tighten()?;
        Ok(store)
    }

    fn open_handles(dir: &Path) -> Result<Handles, StoreError> {
        create_private_dir(dir)?;
        let db_dir = dir.join(DB_DIR);
        create_private_dir(&db_dir)?;
        let db = sled::Config::new()
            .path(&db_dir)
            .open()
            .map_err(|e| open_error(dir, e))?;
        Self::handles_of(db, dir)
    }

    /// A store in a temporary location that disappears when dropped: for
    /// tests and `mailbridge demo`.
    pub fn open_temporary() -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|e| StoreError::Open {
                path: PathBuf::from("(temporary)"),
                reason: e.to_string(),
            })?;
        Ok(SledStore {
            handles: RwLock::new(Some(Self::handles_of(db, Path::new(""))?)),
            reopen: AtomicBool::new(false),
            dir: None,
            locks: super::LocalLocks::default(),
        })
    }

    /// The state directory, or `None` for a temporary store.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn handles_of(db: sled::Db, path: &Path) -> Result<Handles, StoreError> {
        let grants = db.open_tree(GRANTS).map_err(|e| open_error(path, e))?;
        let meta = db.open_tree(META).map_err(|e| open_error(path, e))?;
        Ok(Handles { db, grants, meta })
    }

    /// Runs `f` on the open database, reopening it first after a failed
    /// write; a failed write marks it for reopening.
    fn with<T>(
        &self,
        write: bool,
        f: impl FnOnce(&Handles) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(dir) = &self.dir
            && self.reopen.load(Ordering::Acquire)
        {
            let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
            if self.reopen.load(Ordering::Acquire) {
                // Closed first: sled holds a lock on its files.
                *handles = None;
                let opened = Self::open_handles(dir)?;
                *handles = Some(opened);
                self.reopen.store(false, Ordering::Release);
                tracing::info!(state_dir = %dir.display(), "token store reopened after a failed write");
            }
        }
        let handles = self.handles.read().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = handles.as_ref() else {
            return Err(StoreError::Backend {
                path: self.dir.clone().unwrap_or_default(),
                reason: "the store is closed".into(),
            });
        };
        let result = f(h);
        if write && result.is_err() && self.dir.is_some() {
            self.reopen.store(true, Ordering::Release);
        }
        result
    }

    fn backend(&self, e: sled::Error) -> StoreError {
        StoreError::Backend {
            path: self.dir.clone().unwrap_or_default(),
            reason: e.to_string(),
        }
    }

    /// Flush everything to disk, then re-tighten file modes (a flush may
    /// have created files).
    fn flush(&self, h: &Handles) -> Result<(), StoreError> {
        h.db.flush().map_err(|e| self.backend(e))?;
        self.tighten()
    }

    fn tighten(&self) -> Result<(), StoreError> {
        match &self.dir {
            Some(dir) => {
                set_mode(dir, 0o700)?;
                tighten_tree(&dir.join(DB_DIR))
            }
            None => Ok(()),
        }
    }

    fn get<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        account: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = tree.get(account.as_bytes()).map_err(|e| self.backend(e))? else {
            return Ok(None);
        };
        decode(account, &bytes).map(Some)
    }

    fn put<T: Serialize>(
        &self,
        tree: &sled::Tree,
        account: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = self.encode(account, value)?;
        tree.insert(account.as_bytes(), bytes)
            .map_err(|e| self.backend(e))?;
        Ok(())
    }

    fn encode<T: Serialize>(&self, account: &str, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| StoreError::Backend {
            path: self.dir.clone().unwrap_or_default(),
            reason: format!("cannot encode the record for account {account}: {e}"),
        })
    }
}

impl TokenStore for SledStore {
    /// One process uses a sled store, but commands reach it through the
    /// control socket while the service runs: a refresh by `mailbridge
    /// doctor` and one by the service wait for each other here.
    fn lock_refresh(&self, account: &str) -> super::LockFuture {
        self.locks.lock(account)
    }

    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
        self.with(false, |h| self.get(&h.grants, account))
    }

    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError> {
        let new_bytes = self.encode(account, new)?;
        self.with(true, |h| {
            // Compare records, not bytes (an older version may have encoded
            // the same record differently); then swap against the bytes
            // read, so a write in between makes the swap fail.
            let current = h
                .grants
                .get(account.as_bytes())
                .map_err(|e| self.backend(e))?;
            let decoded: Option<SealedGrant> = match &current {
                Some(bytes) => Some(decode(account, bytes)?),
                None => None,
            };
            if decoded.as_ref() != expected {
                return Ok(false);
            }
            let swapped = h
                .grants
                .compare_and_swap(account.as_bytes(), current, Some(new_bytes))
                .map_err(|e| self.backend(e))?
                .is_ok();
            if swapped {
                self.flush(h)?;
            }
            Ok(swapped)
        })
    }

    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.with(false, |h| self.get(&h.meta, account))
    }

    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        // Not flushed here: metadata changes on every login and losing the
        // last few hundred milliseconds of it in a crash is harmless; sled
        // flushes in the background.
        self.with(true, |h| self.put(&h.meta, account, meta))
    }

    fn save_meta_durably(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.with(true, |h| {
            self.put(&h.meta, account, meta)?;
            self.flush(h)
        })
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        self.with(true, |h| {
            let g = h
                .grants
                .remove(account.as_bytes())
                .map_err(|e| self.backend(e))?;
            let m = h
                .meta
                .remove(account.as_bytes())
                .map_err(|e| self.backend(e))?;
            self.flush(h)?;
            Ok(g.is_some() || m.is_some())
        })
    }

    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        self.with(false, |h| {
            let mut names = BTreeSet::new();
            for tree in [&h.grants, &h.meta] {
                for key in tree.iter().keys() {
                    let key = key.map_err(|e| self.backend(e))?;
                    names.insert(String::from_utf8_lossy(&key).into_owned());
                }
            }
            Ok(names.into_iter().collect())
        })
    }
}

fn open_error(dir: &Path, e: sled::Error) -> StoreError {
    if let sled::Error::Io(io) = &e {
        if io.kind() == std::io::ErrorKind::PermissionDenied {
            return StoreError::Denied {
                path: dir.to_path_buf(),
            };
        }
        // sled reports a held file lock as an `Other` I/O error whose
        // message starts with "could not acquire lock".
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock")
        {
            return StoreError::Locked {
                path: dir.to_path_buf(),
            };
        }
    }
    StoreError::Open {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        return StoreError::Denied {
            path: path.to_path_buf(),
        };
    }
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create `dir` (and missing parents) private to this user, and tighten it
/// if it already existed.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            StoreError::Denied {
                path: dir.to_path_buf(),
            }
        } else {
            StoreError::Open {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            }
        }
    })?;
    set_mode(dir, 0o700)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    if meta.file_type().is_symlink() || meta.permissions().mode() & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(path, e))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), StoreError> {
    Ok(())
}

/// Directories 0700, regular files 0600, recursively; symlinks untouched.
fn tighten_tree(dir: &Path) -> Result<(), StoreError> {
    set_mode(dir, 0o700)?;
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            // Vanished between listing and inspection (sled removes old
            // snapshots): nothing to tighten.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path, e)),
        };
        let result = if kind.is_dir() {
            tighten_tree(&path)
        } else if kind.is_file() {
            set_mode(&path, 0o600)
        } else {
            Ok(())
        };
        match result {
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::KdfParams;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            use rand::Rng;
            let n: u64 = rand::thread_rng().r#gen();
            let path = std::env::temp_dir()
                .join(format!("mailbridge-{tag}-{}-{n:016x}", std::process::id()));
            TempDir(path)
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn grant(n: u8) -> SealedGrant {
        SealedGrant {
            format: 1,
            kdf: KdfParams::for_tests(),
            salt: vec![n; 16],
            nonce: vec![n; 24],
            password_hash: None,
            ciphertext: vec![n; 48],
        }
    }

    #[test]
    fn swap_grant_writes_only_over_what_the_writer_read() {
        let tmp = TempDir::new("store-swap");
        let s = SledStore::open(&tmp.path().join("state")).expect("open");
        assert!(s.swap_grant("a", None, &grant(1)).expect("swap"));
        // Someone else created it first.
        assert!(!s.swap_grant("a", None, &grant(2)).expect("swap"));
        // Based on an old read.
        assert!(!s.swap_grant("a", Some(&grant(3)), &grant(2)).expect("swap"));
        assert_eq!(s.load_grant("a").expect("load"), Some(grant(1)));
        assert!(s.swap_grant("a", Some(&grant(1)), &grant(2)).expect("swap"));
        assert_eq!(s.load_grant("a").expect("load"), Some(grant(2)));
    }

    #[test]
    fn round_trip_and_accounts() {
        let tmp = TempDir::new("store-rt");
        let state = tmp.path().join("state");
        {
            let s = SledStore::open(&state).expect("open");
            assert_eq!(s.load_grant("a").expect("load"), None);
            assert!(s.swap_grant("b@x", None, &grant(2)).expect("save"));
            assert!(s.swap_grant("a@x", None, &grant(1)).expect("save"));
            let meta = AccountMeta {
                provider: "google".into(),
                ..AccountMeta::default()
            };
            s.save_meta("c@x", &meta).expect("save meta");
            assert_eq!(
                s.accounts().expect("accounts"),
                vec!["a@x".to_string(), "b@x".into(), "c@x".into()]
            );
            s.with(false, |h| s.flush(h)).expect("flush");
        }
        let s = SledStore::open(&state).expect("reopen");
        assert_eq!(s.load_grant("a@x").expect("load"), Some(grant(1)));
        assert_eq!(
            s.load_meta("c@x").expect("meta").map(|m| m.provider),
            Some("google".to_string())
        );
        assert!(s.remove("a@x").expect("remove"));
        assert!(!s.remove("a@x").expect("remove again"));
        assert_eq!(s.load_grant("a@x").expect("load"), None);
    }

    #[test]
    fn a_store_marked_after_a_failed_write_reopens_and_keeps_its_data() {
        let tmp = TempDir::new("store-reopen");
        let s = SledStore::open(&tmp.path().join("state")).expect("open");
        assert!(s.swap_grant("a", None, &grant(1)).expect("save"));
        // As after a write that failed on a full disk.
        s.reopen.store(true, Ordering::SeqCst);
        assert_eq!(s.load_grant("a").expect("load"), Some(grant(1)));
        assert!(!s.reopen.load(Ordering::SeqCst), "reopened");
        assert!(s.swap_grant("a", Some(&grant(1)), &grant(2)).expect("save"));
        assert_eq!(s.load_grant("a").expect("load"), Some(grant(2)));
        // A temporary store is never reopened (it would lose its data).
        let t = SledStore::open_temporary().expect("temp");
        assert!(t.swap_grant("a", None, &grant(1)).expect("save"));
        assert!(!t.reopen.load(Ordering::SeqCst));
    }

    #[test]
    fn temporary_store_works() {
        let s = SledStore::open_temporary().expect("temp");
        assert!(s.swap_grant("a", None, &grant(1)).expect("save"));
        assert_eq!(s.load_grant("a").expect("load"), Some(grant(1)));
        assert_eq!(s.dir(), None);
    }

    #[test]
    fn corrupt_record_is_reported_without_content() {
        let s = SledStore::open_temporary().expect("temp");
        s.with(true, |h| {
            h.grants
                .insert("a", &b"{\"format\":\"secret-looking\"}"[..])
                .map_err(|e| s.backend(e))
        })
        .expect("insert");
        let err = s.load_grant("a").expect_err("corrupt");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
        assert!(!msg.contains("secret-looking"), "{msg}");
        assert!(msg.contains("mailbridge account remove a"), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn modes_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("store-modes");
        let state = tmp.path().join("state");
        // An existing, too-open directory is tightened.
        std::fs::create_dir_all(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let s = SledStore::open(&state).expect("open");
        assert!(s.swap_grant("a", None, &grant(1)).expect("save"));

        let mut seen_files = 0;
        let mut stack = vec![state.clone()];
        while let Some(dir) = stack.pop() {
            let mode = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
            for entry in std::fs::read_dir(&dir).expect("readdir") {
                let entry = entry.expect("entry");
                let meta = entry.metadata().expect("stat");
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    seen_files += 1;
                    let mode = meta.permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "{}", entry.path().display());
                }
            }
        }
        assert!(seen_files > 0);
    }

    #[test]
    fn second_open_is_locked() {
        let tmp = TempDir::new("store-lock");
        let state = tmp.path().join("state");
        let _first = SledStore::open(&state).expect("open");
        let err = SledStore::open(&state).expect_err("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("another mailbridge process is using the store"),
            "{err}"
        );
    }
}
