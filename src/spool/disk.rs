//! The spool in a directory (the default).
//!
//! Layout under the spool directory (0700, files 0600):
//!
//! - `tmp/`: a message being written. Nothing here was acknowledged; it
//!   is removed at start.
//! - `queue/ID.eml` and `queue/ID.json`: the content (as received, dot-
//!   unstuffed) and the envelope with its delivery state. The envelope is
//!   written last, so its presence is what makes a message queued: an
//!   `.eml` without its `.json` was never acknowledged and is removed.
//! - `failed/`: the same pair for messages refused for good or too old,
//!   kept for a person (`mailbridge queue list`, `retry`, `delete`).
//! - `lock`: held (an advisory file lock) while an entry's state changes,
//!   by the service and by the `queue` commands alike.
//!
//! Durability: both files are written to `tmp/`, flushed (`fsync`), renamed
//! into `queue/`, and the directory flushed, all before the `250`. After
//! delivery the envelope is removed first (the commit point), then the
//! content. A crash between the server's `250` and that removal sends the
//! message again at the next start: at least once, never lost.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Area, Envelope, SpoolError, valid_id};

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The spool in a directory.
#[derive(Debug, Clone)]
pub struct DiskSpool {
    dir: PathBuf,
}

impl DiskSpool {
    /// Opens (creating) the spool at `dir`: the directories 0700, `tmp/`
    /// emptied, content without an envelope removed.
    pub fn open(dir: &Path) -> Result<DiskSpool, SpoolError> {
        for sub in ["", "tmp", "queue", "failed"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_at(&d))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(io_at(&d))?;
        }
        let spool = DiskSpool {
            dir: dir.to_path_buf(),
        };
        let tmp = dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let path = entry.map_err(io_at(&tmp))?.path();
            tracing::info!(file = %path.display(), "removing a message that was never acknowledged");
            let _ = fs::remove_file(&path);
        }
        let queue = dir.join("queue");
        for entry in fs::read_dir(&queue).map_err(io_at(&queue))? {
            let path = entry.map_err(io_at(&queue))?.path();
            if path.extension().is_some_and(|e| e == "eml") && !path.with_extension("json").exists()
            {
                tracing::info!(file = %path.display(), "removing content whose envelope was never written (never acknowledged)");
                let _ = fs::remove_file(&path);
            }
        }
        Ok(spool)
    }

    /// The spool at `dir` as it is, for the `queue` commands while the
    /// service may be running (nothing is cleaned up: a message being
    /// written in `tmp/` is the service's).
    pub fn open_existing(dir: &Path) -> Result<DiskSpool, SpoolError> {
        let queue = dir.join("queue");
        fs::metadata(&queue).map_err(io_at(&queue))?;
        Ok(DiskSpool {
            dir: dir.to_path_buf(),
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, area: Area, id: &str, ext: &str) -> PathBuf {
        self.dir.join(area.dir()).join(format!("{id}.{ext}"))
    }

    /// Stores a message durably. Only after this returns may the device
    /// hear `250`.
    pub fn store(&self, envelope: &Envelope, data: &[u8]) -> Result<(), SpoolError> {
        let id = &envelope.id;
        let tmp_eml = self.dir.join("tmp").join(format!("{id}.eml"));
        let tmp_json = self.dir.join("tmp").join(format!("{id}.json"));
        let done = (|| {
            write_synced(&tmp_eml, data)?;
            write_synced(&tmp_json, &to_json(envelope))?;
            let eml = self.path(Area::Queue, id, "eml");
            fs::rename(&tmp_eml, &eml).map_err(io_at(&eml))?;
            let json = self.path(Area::Queue, id, "json");
            fs::rename(&tmp_json, &json).map_err(io_at(&json))?;
            sync_dir(&self.dir.join("queue"))
        })();
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp_eml);
            let _ = fs::remove_file(&tmp_json);
            let _ = fs::remove_file(self.path(Area::Queue, id, "json"));
            let _ = fs::remove_file(self.path(Area::Queue, id, "eml"));
            return Err(e);
        }
        Ok(())
    }

    /// Every entry of `area`, oldest first. Damaged envelopes are logged
    /// and skipped.
    pub fn list(&self, area: Area) -> Result<Vec<Envelope>, SpoolError> {
        let dir = self.dir.join(area.dir());
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let path = entry.map_err(io_at(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_envelope(&path) {
                Ok(e) => out.push(e),
                // Delivered or deleted while we looked.
                Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, "skipping a spool envelope"),
            }
        }
        out.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
        Ok(out)
    }

    /// The entry `id` and where it is.
    pub fn find(&self, id: &str) -> Result<(Area, Envelope), SpoolError> {
        if !valid_id(id) {
            return Err(SpoolError::NotFound { id: id.to_owned() });
        }
        for area in [Area::Queue, Area::Failed] {
            let path = self.path(area, id, "json");
            match read_envelope(&path) {
                Ok(e) => return Ok((area, e)),
                Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Err(SpoolError::NotFound { id: id.to_owned() })
    }

    /// A queued message's content.
    pub fn content(&self, area: Area, id: &str) -> Result<Vec<u8>, SpoolError> {
        let path = self.path(area, id, "eml");
        fs::read(&path).map_err(io_at(&path))
    }

    /// Runs `f` holding the spool's lock (`lock`, an advisory lock on a
    /// file): the service's record of an attempt and a `queue` command
    /// never cross, so a deleted message is not brought back by the
    /// attempt that was under way.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, SpoolError>) -> Result<T, SpoolError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        file.lock().map_err(io_at(&path))?;
        let result = f();
        drop(file);
        result
    }

    /// Replaces a queued envelope (new state after an attempt), unless it
    /// was deleted meanwhile ([`SpoolError::NotFound`]).
    pub fn update(&self, area: Area, envelope: &Envelope) -> Result<(), SpoolError> {
        self.locked(|| {
            if !self.path(area, &envelope.id, "json").exists() {
                return Err(SpoolError::NotFound {
                    id: envelope.id.clone(),
                });
            }
            self.update_unlocked(area, envelope)
        })
    }

    fn update_unlocked(&self, area: Area, envelope: &Envelope) -> Result<(), SpoolError> {
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}.json.new", envelope.id));
        write_synced(&tmp, &to_json(envelope))?;
        let path = self.path(area, &envelope.id, "json");
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        sync_dir(&self.dir.join(area.dir()))
    }

    /// Delivered: the envelope goes first (the commit point), then the
    /// content.
    pub fn remove(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        self.locked(|| self.remove_unlocked(area, id))
    }

    fn remove_unlocked(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        let json = self.path(area, id, "json");
        match fs::remove_file(&json) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SpoolError::NotFound { id: id.to_owned() });
            }
            Err(e) => return Err(io_at(&json)(e)),
        }
        sync_dir(&self.dir.join(area.dir()))?;
        let eml = self.path(area, id, "eml");
        let _ = fs::remove_file(&eml);
        Ok(())
    }

    /// Moves an entry between areas (content first, so the envelope's
    /// arrival is the commit point in the new area too), unless it was
    /// deleted meanwhile.
    pub fn move_to(&self, envelope: &Envelope, from: Area, to: Area) -> Result<(), SpoolError> {
        self.locked(|| {
            if !self.path(from, &envelope.id, "json").exists() {
                return Err(SpoolError::NotFound {
                    id: envelope.id.clone(),
                });
            }
            self.move_unlocked(envelope, from, to)
        })
    }

    fn move_unlocked(&self, envelope: &Envelope, from: Area, to: Area) -> Result<(), SpoolError> {
        let id = &envelope.id;
        let eml_to = self.path(to, id, "eml");
        fs::rename(self.path(from, id, "eml"), &eml_to).map_err(io_at(&eml_to))?;
        let tmp = self.dir.join("tmp").join(format!("{id}.json.new"));
        write_synced(&tmp, &to_json(envelope))?;
        let json_to = self.path(to, id, "json");
        fs::rename(&tmp, &json_to).map_err(io_at(&json_to))?;
        sync_dir(&self.dir.join(to.dir()))?;
        let _ = fs::remove_file(self.path(from, id, "json"));
        sync_dir(&self.dir.join(from.dir()))
    }

    /// `queue retry ID`: a failed message back in the queue, or a queued
    /// one due now.
    pub fn retry(&self, id: &str) -> Result<Envelope, SpoolError> {
        self.locked(|| self.retry_unlocked(id))
    }

    fn retry_unlocked(&self, id: &str) -> Result<Envelope, SpoolError> {
        let (area, mut envelope) = self.find(id)?;
        super::requeue(area, &mut envelope);
        if area == Area::Failed {
            self.move_unlocked(&envelope, Area::Failed, Area::Queue)?;
        } else {
            self.update_unlocked(Area::Queue, &envelope)?;
        }
        Ok(envelope)
    }

    /// `queue delete ID`.
    pub fn delete(&self, id: &str) -> Result<Area, SpoolError> {
        self.locked(|| {
            let (area, _) = self.find(id)?;
            self.remove_unlocked(area, id)?;
            Ok(area)
        })
    }
}

fn to_json(envelope: &Envelope) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(envelope).unwrap_or_default();
    v.push(b'\n');
    v
}

fn read_envelope(path: &Path) -> Result<Envelope, SpoolError> {
    let bytes = fs::read(path).map_err(io_at(path))?;
    serde_json::from_slice(&bytes).map_err(|e| SpoolError::Damaged {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `data` to a new 0600 file and flushes it to the disk.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                fs::remove_file(path)?;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
            } else {
                Err(e)
            }
        })
        .map_err(io_at(path))?;
    f.write_all(data).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailbridge_proto::Message;

    /// Stores a message as [`super::super::Spool::store`] does.
    fn put(spool: &DiskSpool, account: &str, device: &str, client: &str) -> Envelope {
        let e = Envelope::new(account, device, client, false, &message());
        spool.store(&e, &message().data).unwrap();
        e
    }

    fn message() -> Message {
        Message {
            from: "scanner@contoso.com".into(),
            recipients: vec!["a@x".into()],
            data: b"Subject: s\r\n\r\nbody\r\n".to_vec(),
            smtputf8: false,
            eight_bit: true,
            client_name: None,
        }
    }

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mailbridge-spool-unit-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn store_list_update_fail_retry_delete() {
        let dir = temp();
        let spool = DiskSpool::open(&dir).unwrap();
        let e = put(&spool, "scanner@contoso.com", "mfp", "192.0.2.7");
        assert_eq!(spool.list(Area::Queue).unwrap(), std::slice::from_ref(&e));
        assert_eq!(spool.content(Area::Queue, &e.id).unwrap(), message().data);
        for f in ["queue", "failed", "tmp"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{f}");
        }
        let mode = fs::metadata(spool.path(Area::Queue, &e.id, "eml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        let mut later = e.clone();
        later.attempts = 2;
        later.last_error = Some("busy".into());
        spool.update(Area::Queue, &later).unwrap();
        assert_eq!(spool.find(&e.id).unwrap(), (Area::Queue, later.clone()));

        spool.move_to(&later, Area::Queue, Area::Failed).unwrap();
        assert!(spool.list(Area::Queue).unwrap().is_empty());
        assert_eq!(spool.list(Area::Failed).unwrap().len(), 1);
        let back = spool.retry(&e.id).unwrap();
        assert_eq!(back.attempts, 0);
        assert_eq!(spool.find(&e.id).unwrap().0, Area::Queue);
        assert_eq!(spool.delete(&e.id).unwrap(), Area::Queue);
        assert!(matches!(
            spool.find(&e.id),
            Err(SpoolError::NotFound { .. })
        ));
        assert!(matches!(
            spool.find("../../etc/passwd"),
            Err(SpoolError::NotFound { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    /// The at-least-once window: from the server's `250` to the envelope
    /// gone from the disk is one `unlink` and one directory `fsync`.
    #[test]
    fn the_window_after_delivery_is_one_unlink_and_fsync() {
        let dir = temp();
        let spool = DiskSpool::open(&dir).unwrap();
        let mut took = Vec::new();
        for _ in 0..20 {
            let e = put(&spool, "a", "mfp", "192.0.2.7");
            let t0 = std::time::Instant::now();
            spool.remove(Area::Queue, &e.id).unwrap();
            took.push(t0.elapsed());
        }
        took.sort();
        println!(
            "delivered-to-removed window on this disk: median {:?}, max {:?} (a crash inside it sends the message again)",
            took[10], took[19]
        );
        assert!(spool.list(Area::Queue).unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_was_never_acknowledged_is_removed_at_open() {
        let dir = temp();
        let spool = DiskSpool::open(&dir).unwrap();
        let kept = put(&spool, "a", "mfp", "192.0.2.7");
        // A crash mid-store: content in tmp, content without envelope.
        fs::write(dir.join("tmp/0000000000100000000.eml"), b"x").unwrap();
        fs::write(dir.join("queue/0000000000200000000.eml"), b"x").unwrap();
        let spool = DiskSpool::open(&dir).unwrap();
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert!(!dir.join("queue/0000000000200000000.eml").exists());
        assert_eq!(spool.list(Area::Queue).unwrap(), [kept]);
        let _ = fs::remove_dir_all(&dir);
    }
}
