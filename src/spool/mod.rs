//! The spool: messages from devices that cannot retry, stored durably
//! before the device hears `250`, until they are delivered or fail for
//! good. It lives in a directory ([`disk`], the default) or in the shared
//! PostgreSQL database ([`database`], `[spool] store = "database"`), where
//! every instance delivers what any instance accepted.
//!
//! At least once, never lost: a message is stored (flushed, or committed)
//! before the `250`, and removed only after the server's `250`. A crash
//! between the two sends it again.

pub mod database;
pub mod deliver;
pub mod disk;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mailbridge_proto::Message;
use serde::{Deserialize, Serialize};

use crate::clock::unix_now;

/// A queued message's envelope and delivery state (`ID.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// The queue id (also the file names).
    pub id: String,
    /// The account it is sent as.
    pub account: String,
    /// The device that sent it (its `[[device]]` name) and its address.
    pub device: String,
    /// The client's address.
    pub client: String,
    /// `MAIL FROM`.
    pub from: String,
    /// Recipients still to deliver to.
    pub recipients: Vec<String>,
    /// `SMTPUTF8` was asked for.
    #[serde(default)]
    pub smtputf8: bool,
    /// `BODY=8BITMIME` was asked for.
    #[serde(default)]
    pub eight_bit: bool,
    /// Content size in bytes.
    pub size: u64,
    /// When it was accepted (unix seconds).
    pub received_at: u64,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before (unix seconds).
    #[serde(default)]
    pub next_attempt_at: u64,
    /// The last failure, in words.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Recipients refused for good, with the server's reply.
    #[serde(default)]
    pub failed_recipients: Vec<(String, String)>,
    /// Send a report to the sender if it fails for good.
    #[serde(default)]
    pub bounce: bool,
    /// How many times `queue retry` asked for it: an attempt under way
    /// when one comes in records its outcome without undoing it.
    #[serde(default)]
    pub retries_asked: u32,
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Waiting for delivery.
    Queue,
    /// Refused for good or too old.
    Failed,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Queue => "queue",
            Area::Failed => "failed",
        }
    }

    /// As shown by `queue list`.
    pub fn name(self) -> &'static str {
        match self {
            Area::Queue => "queued",
            Area::Failed => "failed",
        }
    }
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An envelope does not parse.
    #[error("spool envelope {} is damaged: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No such message.
    #[error("no message {id} in the spool (see `mailbridge queue list`)")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The spool's database refused or is out of reach.
    #[error("spool database: {0}")]
    Database(#[source] crate::store::StoreError),
    /// A record in the database does not parse.
    #[error("spool message {id} in the database is damaged: {reason}")]
    DamagedRecord {
        /// The queue id.
        id: String,
        /// Why.
        reason: String,
    },
}

impl Envelope {
    /// A new message's envelope, not yet attempted.
    fn new(account: &str, device: &str, client: &str, bounce: bool, message: &Message) -> Envelope {
        Envelope {
            id: new_id(),
            account: account.to_owned(),
            device: device.to_owned(),
            client: client.to_owned(),
            from: message.from.clone(),
            recipients: message.recipients.clone(),
            smtputf8: message.smtputf8,
            eight_bit: message.eight_bit,
            size: message.data.len() as u64,
            received_at: unix_now(),
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            failed_recipients: Vec::new(),
            bounce,
            retries_asked: 0,
        }
    }
}

/// `queue retry`: due now; a failed message starts over, with the
/// recipients refused for good given another try too.
fn requeue(area: Area, envelope: &mut Envelope) {
    envelope.next_attempt_at = 0;
    envelope.retries_asked = envelope.retries_asked.wrapping_add(1);
    if area == Area::Failed {
        envelope.received_at = unix_now();
        envelope.attempts = 0;
        let refused: Vec<String> = envelope
            .failed_recipients
            .drain(..)
            .map(|(r, _)| r)
            .collect();
        envelope.recipients.extend(refused);
    }
}

/// Where the spool is.
#[derive(Debug, Clone)]
enum Backend {
    Disk(disk::DiskSpool),
    Database(database::DbSpool),
}

/// The spool, on disk or in the database.
#[derive(Debug, Clone)]
pub struct Spool {
    backend: Backend,
}

/// The right to attempt one message: held while it is being sent, so two
/// instances sharing a database never send it at once. Released when
/// dropped (or when the process dies).
pub struct Claim {
    _held: Option<database::Held>,
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match &$self.backend {
            Backend::Disk($s) => $e,
            Backend::Database($s) => $e,
        }
    };
}

impl Spool {
    /// Opens (creating) the spool in `dir`: the directories 0700, what was
    /// never acknowledged removed.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Ok(Spool {
            backend: Backend::Disk(disk::DiskSpool::open(dir)?),
        })
    }

    /// The spool in `dir` as it is, for the `queue` commands while the
    /// service may be running.
    pub fn open_existing(dir: &Path) -> Result<Spool, SpoolError> {
        Ok(Spool {
            backend: Backend::Disk(disk::DiskSpool::open_existing(dir)?),
        })
    }

    /// The spool in the shared database (its table made by the store's
    /// schema migrations).
    pub fn in_database(db: Arc<crate::store::PgStore>) -> Spool {
        Spool {
            backend: Backend::Database(database::DbSpool::new(db)),
        }
    }

    /// A spool in the database takes over what a spool on disk in `dir`
    /// still holds (a gateway that moved to a shared database): each
    /// message is committed to the database, then removed from the disk.
    /// A crash in between moves it again at the next start, once (the id
    /// is kept). Returns how many moved; nothing for a spool on disk.
    pub fn adopt_from_disk(&self, dir: &Path) -> Result<usize, SpoolError> {
        let Backend::Database(db) = &self.backend else {
            return Ok(0);
        };
        if !dir.join("queue").is_dir() {
            return Ok(0);
        }
        let disk = disk::DiskSpool::open(dir)?;
        let mut moved = 0;
        for area in [Area::Queue, Area::Failed] {
            for envelope in disk.list(area)? {
                let data = disk.content(area, &envelope.id)?;
                db.adopt(area, &envelope, &data)?;
                disk.remove(area, &envelope.id)?;
                tracing::info!(id = %envelope.id, state = area.name(), from = %dir.display(), "spooled message moved from the disk into the database");
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Where it is, for people (a directory, or the database URL with its
    /// password hidden).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Disk(d) => d.dir().display().to_string(),
            Backend::Database(d) => d.location(),
        }
    }

    /// Stores a message durably; returns its envelope. Only after this
    /// returns may the device hear `250`.
    pub fn store(
        &self,
        account: &str,
        device: &str,
        client: &str,
        bounce: bool,
        message: &Message,
    ) -> Result<Envelope, SpoolError> {
        let envelope = Envelope::new(account, device, client, bounce, message);
        each!(self, s => s.store(&envelope, &message.data))?;
        Ok(envelope)
    }

    /// Every entry of `area`, oldest first. Damaged entries are logged and
    /// skipped.
    pub fn list(&self, area: Area) -> Result<Vec<Envelope>, SpoolError> {
        each!(self, s => s.list(area))
    }

    /// The entry `id` and where it is.
    pub fn find(&self, id: &str) -> Result<(Area, Envelope), SpoolError> {
        if !valid_id(id) {
            return Err(SpoolError::NotFound { id: id.to_owned() });
        }
        each!(self, s => s.find(id))
    }

    /// A message's content.
    pub fn content(&self, area: Area, id: &str) -> Result<Vec<u8>, SpoolError> {
        each!(self, s => s.content(area, id))
    }

    /// Replaces an envelope (new state after an attempt), unless it was
    /// deleted meanwhile ([`SpoolError::NotFound`]).
    pub fn update(&self, area: Area, envelope: &Envelope) -> Result<(), SpoolError> {
        each!(self, s => s.update(area, envelope))
    }

    /// Delivered: gone from the spool.
    pub fn remove(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        each!(self, s => s.remove(area, id))
    }

    /// Moves an entry between areas with its new envelope, unless it was
    /// deleted meanwhile.
    pub fn move_to(&self, envelope: &Envelope, from: Area, to: Area) -> Result<(), SpoolError> {
        each!(self, s => s.move_to(envelope, from, to))
    }

    /// `queue retry ID`: a failed message back in the queue, or a queued
    /// one due now.
    pub fn retry(&self, id: &str) -> Result<Envelope, SpoolError> {
        if !valid_id(id) {
            return Err(SpoolError::NotFound { id: id.to_owned() });
        }
        each!(self, s => s.retry(id))
    }

    /// `queue delete ID`.
    pub fn delete(&self, id: &str) -> Result<Area, SpoolError> {
        if !valid_id(id) {
            return Err(SpoolError::NotFound { id: id.to_owned() });
        }
        each!(self, s => s.delete(id))
    }

    /// The right to attempt `id` now: `None` while another instance is
    /// sending it. A spool on disk has one service, so always granted.
    pub fn claim(&self, id: &str) -> Result<Option<Claim>, SpoolError> {
        match &self.backend {
            Backend::Disk(_) => Ok(Some(Claim { _held: None })),
            Backend::Database(d) => Ok(d.claim(id)?.map(|h| Claim { _held: Some(h) })),
        }
    }
}

/// A queue id: milliseconds since the epoch and 32 random bits, in hex
/// (ordered by arrival, unique without coordination).
fn new_id() -> String {
    let ms = crate::clock::unix_millis();
    format!("{ms:011X}{:08X}", rand::random::<u32>())
}

/// Ids are what `new_id` makes: nothing that could name another path.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}
