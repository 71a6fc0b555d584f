//! Token store: where each account's sealed OAuth2 grant and its (non-secret)
//! metadata live between runs.
//!
//! The [`TokenStore`] trait is what the rest of mailbridge codes against;
//! [`SledStore`] is the embedded default (one process per store) and the
//! only module that names sled; [`PgStore`] keeps the same records in a
//! PostgreSQL database that many instances share ([`postgres`]).
//! Nothing a store holds is a token in clear: grants arrive here already
//! sealed by [`seal`] (Argon2id key derivation + XChaCha20-Poly1305).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod control;
pub mod meta_cache;
pub mod modes;
pub mod postgres;
pub mod seal;
pub mod sled_store;

pub use postgres::PgStore;
pub use sled_store::SledStore;

/// Argon2id cost parameters, stored with every sealed record so that the
/// defaults can be raised later without breaking existing records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// The OWASP minimum for Argon2id: 19 MiB, two passes, one lane.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Small and fast parameters for tests and the demo. Never use these for
    /// real grants.
    pub fn for_tests() -> Self {
        KdfParams {
            m_cost_kib: 256,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

/// One account's grant, sealed. Safe to store: without the local password
/// (or service key) it reveals nothing but its length.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealedGrant {
    /// Record format version ([`seal::FORMAT`]).
    pub format: u32,
    /// The Argon2id parameters the key was derived with.
    pub kdf: KdfParams,
    /// The per-account random salt.
    pub salt: Vec<u8>,
    /// The 24-byte XChaCha20 nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext with the Poly1305 tag appended.
    pub ciphertext: Vec<u8>,
    /// Service key mode only: the Argon2id PHC hash of the local login
    /// password (the key comes from the service key, not the password).
    /// Bound into the AEAD's associated data, so replacing it in the store
    /// makes the record unreadable rather than letting another password in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

impl fmt::Debug for SealedGrant {
    /// Shows the shape only: the ciphertext is not secret, but keeping it
    /// out of logs keeps it out of reach of an offline password guesser.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedGrant")
            .field("format", &self.format)
            .field("kdf", &self.kdf)
            .field("salt_len", &self.salt.len())
            .field("nonce_len", &self.nonce.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .field("service_key_mode", &self.password_hash.is_some())
            .finish()
    }
}

/// What is known about an account apart from its grant. Not secret: shown
/// by `mailbridge account list`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AccountMeta {
    /// Provider preset name, e.g. "microsoft".
    pub provider: String,
    /// The login name used upstream.
    pub upstream_user: String,
    /// When the account was added (unix seconds).
    pub created_at: u64,
    /// When the current access token expires (unix seconds), if known.
    pub access_expires_at: Option<u64>,
    /// Last successful upstream login (unix seconds).
    pub last_login_at: Option<u64>,
    /// Last successful token refresh (unix seconds): a login's or the
    /// background refresh's. Written at once, not behind, so that a
    /// service restarting in a loop does not refresh every grant at each
    /// start.
    pub refreshed_at: Option<u64>,
    /// The last error seen for this account, as shown to a person.
    pub last_error: Option<String>,
    /// How the grant was obtained (`authorization_code`, `device_code`,
    /// `client_credentials`, `service_account`, `password`, `import`).
    pub flow: Option<String>,
    /// What the account's SMTP server advertised in its EHLO at the last
    /// SMTP login through mailbridge: a restarted mailbridge's pre-auth
    /// EHLO repeats it before anyone has logged in again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_ehlo: Option<SmtpEhlo>,
}

/// An SMTP server's EHLO as a login saw it ([`AccountMeta::smtp_ehlo`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SmtpEhlo {
    /// The server, `host:port`.
    pub server: String,
    /// Its EHLO keywords with their parameters (`SIZE 35882577`), but
    /// not AUTH, which is mailbridge's own towards its clients.
    pub keywords: Vec<String>,
}

/// Persistent storage for sealed grants and account metadata.
pub trait TokenStore: Send + Sync + 'static {
    /// The sealed grant of `account`, if there is one.
    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError>;
    /// Store `new` for `account` only if the stored grant is still
    /// `expected` (None: no grant). False, and nothing written, if another
    /// writer (the running service, say, saving a rotated refresh token)
    /// changed it since. Durable when it returns true. The only way to
    /// write a grant: there is no blind overwrite.
    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError>;
    /// The metadata of `account`, if there is any.
    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError>;
    /// Store the metadata of `account`.
    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError>;
    /// Store the metadata of `account`, durably when it returns (a store
    /// that flushes metadata only in the background flushes here). For
    /// the rare record a crash must not lose: the last refresh.
    fn save_meta_durably(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.save_meta(account, meta)
    }
    /// Remove the grant and the metadata of `account`. True if there was
    /// either. Durable when it returns.
    fn remove(&self, account: &str) -> Result<bool, StoreError>;
    /// Every account with a grant or metadata, sorted.
    fn accounts(&self) -> Result<Vec<String>, StoreError>;
    /// True when other processes use the same store at the same time
    /// (PostgreSQL): refreshes then take [`TokenStore::lock_refresh`] and
    /// share their access token through the sealed record.
    fn is_shared(&self) -> bool {
        false
    }
    /// Waits until this process is the only one refreshing `account`'s
    /// grant; the lock holds until the returned guard is dropped (or the
    /// process dies). Nothing to wait for in a store only one process
    /// uses (sled): the process's own single flight is enough.
    fn lock_refresh(&self, account: &str) -> LockFuture {
        let _ = account;
        Box::pin(std::future::ready(Ok(RefreshLock::none())))
    }
    /// The failed-login counters the instances of a shared store share
    /// (see [`crate::backoff`]); none in a store only one process uses.
    fn shared_counters(&self) -> Option<&dyn SharedCounters> {
        None
    }
}

/// Failed-login counters kept in a shared store, keyed by opaque strings
/// (hashes: never a name or an address).
pub trait SharedCounters {
    /// Adds one failure to counter `key`; its count, and how long it now
    /// delays logins.
    fn count_failure(&self, key: &str, rule: CounterRule) -> Result<(u32, Duration), StoreError>;
    /// The counters among `keys` that are not forgotten (their delay ended
    /// less than `forget` ago), each with what is left of its delay.
    fn counters(
        &self,
        keys: &[String],
        forget: Duration,
    ) -> Result<Vec<(String, Duration)>, StoreError>;
    /// Removes the counters `keys`.
    fn clear_counters(&self, keys: &[String]) -> Result<(), StoreError>;
}

/// How a shared counter's count becomes a delay: `base * 2^(count -
/// offset - 1)`, at most `max`, none while `count <= offset`; a counter
/// whose delay ended more than `forget` ago starts again at one.
#[derive(Clone, Copy, Debug)]
pub struct CounterRule {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Failures that earn no delay.
    pub offset: u32,
    /// When a counter is forgotten.
    pub forget: Duration,
}

/// Per-account refresh locks within one process (see
/// [`SledStore`]'s [`TokenStore::lock_refresh`]). One entry per account
/// ever locked: as many as the store has accounts.
#[derive(Default)]
pub struct LocalLocks {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalLocks {
    /// Waits for `account`'s lock; held until the returned lock drops.
    pub fn lock(&self, account: &str) -> LockFuture {
        let mutex = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(account.to_owned())
            .or_default()
            .clone();
        Box::pin(async move { Ok(RefreshLock::held_by(Box::new(mutex.lock_owned().await))) })
    }
}

/// What [`TokenStore::lock_refresh`] returns.
pub type LockFuture = Pin<Box<dyn Future<Output = Result<RefreshLock, StoreError>> + Send>>;

/// Holds a store's refresh lock on one account until dropped.
pub struct RefreshLock(Option<Box<dyn Send + Sync>>);

impl RefreshLock {
    /// A lock that holds nothing (a store used by one process).
    pub fn none() -> RefreshLock {
        RefreshLock(None)
    }

    /// A lock released when `holder` is dropped.
    pub fn held_by(holder: Box<dyn Send + Sync>) -> RefreshLock {
        RefreshLock(Some(holder))
    }
}

impl fmt::Debug for RefreshLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshLock")
            .field("held", &self.0.is_some())
            .finish()
    }
}

pub use crate::config::schema::{StoreUrl, redact_url};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened or created.
    #[error(
        "cannot open the token store at {}: {reason}; check that the directory is writable by this user or choose another with --state-dir",
        path.display()
    )]
    Open {
        /// The state directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Another process (or another store in this process) holds the lock.
    #[error(
        "another mailbridge process is using the store at {}; stop it first",
        path.display()
    )]
    Locked {
        /// The state directory.
        path: PathBuf,
    },
    /// This user may not use the state directory or the running service's
    /// control socket: a command run as someone other than the service.
    #[error(
        "permission denied on {}: run as the service's user (e.g. sudo -u mailbridge mailbridge ...) or root",
        path.display()
    )]
    Denied {
        /// The directory, file or socket refused.
        path: PathBuf,
    },
    /// A file system operation on the state directory failed.
    #[error(
        "I/O error on the token store at {}: {source}; check free space and permissions",
        path.display()
    )]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The storage backend failed while reading or writing.
    #[error(
        "the token store at {} failed: {reason}; check free space and permissions",
        path.display()
    )]
    Backend {
        /// The state directory (empty for a temporary store).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The running service, which holds the store, refused or could not be
    /// asked (see [`control`]).
    #[error("the running mailbridge service could not do it: {reason}")]
    Remote {
        /// Why, as the service or the socket said.
        reason: String,
    },
    /// The database of a shared store could not be reached or failed.
    /// Temporary as a rule (a restart, a failover): logins that need it
    /// are told to try again later.
    #[error("the token store database {location} failed: {reason}")]
    Database {
        /// The database URL, password redacted.
        location: String,
        /// What went wrong (the client's or the server's words).
        reason: String,
    },
    /// The database holds a schema newer than this mailbridge knows.
    #[error(
        "the token store database {location} has schema version {found}, newer than this mailbridge knows ({known}): upgrade mailbridge on this host"
    )]
    SchemaTooNew {
        /// The database URL, password redacted.
        location: String,
        /// The version found.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// A stored record could not be decoded.
    #[error(
        "the stored record for account {account} is unreadable ({reason}); remove it with `mailbridge account remove {account}` and add the account again"
    )]
    Corrupt {
        /// The account whose record is damaged.
        account: String,
        /// What is wrong with it (never the record's content).
        reason: String,
    },
}

/// A stored JSON record, or [`StoreError::Corrupt`] (which never quotes
/// the record).
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    account: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        account: account.to_owned(),
        // Category and position only: serde_json's message can quote the
        // data.
        reason: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// The default state directory: `$STATE_DIRECTORY` (its first entry, as
/// systemd may list several separated by colons), else the XDG data
/// directory's `mailbridge`, else `./mailbridge-state`.
pub fn default_state_dir() -> PathBuf {
    state_dir_from(
        std::env::var_os("STATE_DIRECTORY").as_deref(),
        dirs::data_dir().as_deref(),
    )
}

fn state_dir_from(state_directory: Option<&std::ffi::OsStr>, data_dir: Option<&Path>) -> PathBuf {
    if let Some(first) = state_directory
        .and_then(|v| v.to_str())
        .and_then(|v| v.split(':').find(|s| !s.is_empty()))
    {
        return PathBuf::from(first);
    }
    match data_dir {
        Some(d) => d.join("mailbridge"),
        None => PathBuf::from("./mailbridge-state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn store_urls_are_shown_without_their_password() {
        let u = StoreUrl::parse("postgres://mb:s3cret@db.example:5432/mail?sslmode=require")
            .expect("url");
        assert_eq!(
            u.to_string(),
            "postgres://mb:***@db.example:5432/mail?sslmode=require"
        );
        assert!(!format!("{u:?}").contains("s3cret"));
        let u = StoreUrl::parse("postgresql://mb@db/mail?password=s3cret&sslmode=disable")
            .expect("url");
        assert_eq!(
            u.to_string(),
            "postgresql://mb@db/mail?password=***&sslmode=disable"
        );
        let err = StoreUrl::parse("mysql://u:s3cret@h/db").expect_err("not postgres");
        assert!(!err.contains("s3cret"), "{err}");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn state_dir_prefers_systemd_first_entry() {
        let d = state_dir_from(Some(OsStr::new("/var/lib/a:/var/lib/b")), None);
        assert_eq!(d, PathBuf::from("/var/lib/a"));
        let d = state_dir_from(
            Some(OsStr::new("")),
            Some(Path::new("/home/u/.local/share")),
        );
        assert_eq!(d, PathBuf::from("/home/u/.local/share/mailbridge"));
        let d = state_dir_from(None, None);
        assert_eq!(d, PathBuf::from("./mailbridge-state"));
    }

    #[test]
    fn meta_tolerates_missing_and_extra_fields() {
        let m: AccountMeta = serde_json::from_str(r#"{"provider":"google","future":1}"#)
            .expect("meta with missing fields parses");
        assert_eq!(m.provider, "google");
        assert_eq!(m.created_at, 0);
    }

    #[test]
    fn sealed_grant_debug_hides_bytes() {
        let g = SealedGrant {
            format: 1,
            kdf: KdfParams::for_tests(),
            salt: vec![7; 16],
            nonce: vec![8; 24],
            password_hash: None,
            ciphertext: vec![9; 40],
        };
        let s = format!("{g:?}");
        assert!(s.contains("ciphertext_len: 40"));
        assert!(!s.contains("9, 9"));
    }
}
