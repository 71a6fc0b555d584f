//! The vault: turns a local password into an unlocked OAuth2 grant.
//!
//! - The password derives (Argon2id) the key that opens the account's
//!   sealed grant. The KDF is paid once per process per (account,
//!   password): afterwards a fast in-memory verifier (SHA-256 under a
//!   per-process random pepper, compared in constant time) recognises the
//!   same password for the same stored record.
//! - A wrong password is refused and never deletes or alters the grant.
//!   Failures back off per account and per peer address: after the n-th
//!   consecutive failure, attempts are refused for `base * 2^(n-1)` (capped
//!   at `max`); a success resets both counters.
//! - Every login that unlocked an account shares one current grant
//!   ([`Unlocked`]), so a refresh token rotated by one session is what the
//!   next refresh uses. A rotated token is sealed and flushed to the store
//!   before [`Vault::store_rotated`] returns.
//! - A rotated token that cannot be written (disk full, store error) is
//!   kept in memory as the account's current refresh token, marked
//!   unsaved: the provider has already spent the one on disk, so memory is
//!   authoritative until [`Vault::save_unsaved`] gets it on disk. Reading
//!   the (older) record again never replaces it: an install whose refresh
//!   token is the spent one keeps the unsaved token. Each change of that
//!   state is announced on [`Vault::subscribe`] ([`GrantEvent`]).
//!
//! Operations on one account are serialised by a per-account async mutex.
//! The final "save, then update memory" step of each write runs on a
//! blocking thread that owns the mutex guard, so a cancelled caller cannot
//! leave the store and the in-memory state disagreeing.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::OwnedMutexGuard;
use zeroize::Zeroizing;

use crate::clock::unix_now;
use crate::kdf::KdfGate;
use crate::store::seal::{self, GrantData, SealError, SealKey, SharedAccess};
use crate::store::{AccountMeta, KdfParams, LockFuture, SealedGrant, StoreError, TokenStore};

use crate::backoff::Backoff;
pub use crate::backoff::BackoffPolicy;

/// Why the vault refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No sealed grant is stored for the account.
    #[error("no grant stored for account {account}: run `mailbridge account import {account}`")]
    NoGrant {
        /// The account.
        account: String,
    },
    /// The local password does not open the grant.
    #[error(
        "wrong password: use the local mailbridge password for this account, not the mailbox password"
    )]
    WrongPassword,
    /// Too many recent failures for this account or from this address.
    #[error("too many failed logins; try again in {} s", ceil_secs(retry_after))]
    Backoff {
        /// When the next attempt will be considered.
        retry_after: Duration,
    },
    /// `create` without `replace` on an account that has a grant.
    #[error(
        "account {account} already has a grant: use `mailbridge account reauthorize {account}` to replace it, or remove it first"
    )]
    Exists {
        /// The account.
        account: String,
    },
    /// The stored grant was replaced by another writer (another mailbridge
    /// process through the control socket, or under a key this session
    /// does not have) while this change was being made; nothing was
    /// written.
    #[error(
        "the grant for account {account} was changed by someone else at the same moment (the running service saving a refreshed token, or another command); nothing was written: try again"
    )]
    Changed {
        /// The account.
        account: String,
    },
    /// The record was sealed in the other key mode.
    #[error(
        "the grant of {account} was sealed with key_mode = \"{sealed_in}\" but mailbridge runs with key_mode = \"{running}\": add the account again (`mailbridge account add {account} --replace`)"
    )]
    WrongKeyMode {
        /// The account.
        account: String,
        /// The mode the record was sealed in.
        sealed_in: &'static str,
        /// The mode in force.
        running: &'static str,
    },
    /// Service mode: the record does not open with the service key.
    #[error(
        "the grant of {account} does not open with this service key: it was sealed with another key file, or altered; add the account again"
    )]
    ServiceKeyMismatch {
        /// The account.
        account: String,
    },
    /// A service-mode operation in password mode.
    #[error("this needs key_mode = \"service\"")]
    NotServiceMode,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing or opening failed for a reason other than a wrong password.
    #[error(transparent)]
    Seal(#[from] SealError),
}

fn ceil_secs(d: &Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The state of an unlocked account, shared by every [`Unlocked`] for it.
struct Current {
    grant: GrantData,
    key: SealKey,
    salt: Vec<u8>,
    kdf: KdfParams,
    /// Identifies the stored record this state matches (with `salt`).
    nonce: Vec<u8>,
    /// Set while `grant` holds a rotated refresh token that is not in the
    /// record identified by `salt` and `nonce`.
    unsaved: Option<Unsaved>,
}

/// A rotation that is only in memory.
#[derive(Clone)]
struct Unsaved {
    /// The refresh token of the record on disk, already spent at the
    /// provider: a record read again that holds it is older than memory.
    spent: Option<SecretString>,
    /// When the rotation happened.
    since: Instant,
    /// A write of it has failed (and [`GrantEvent::RotationNotSaved`] was
    /// sent).
    failed: bool,
}

/// What happened to an account's grant that someone should hear about
/// (the alerts subscribe with [`Vault::subscribe`]). Each is sent once per
/// change of state, not per attempt; reasons are the store's words and
/// never hold a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantEvent {
    /// A rotated refresh token could not be written. It is kept in memory
    /// and used for later refreshes, and the write is retried; if
    /// mailbridge stops before it is saved, the grant is lost.
    RotationNotSaved {
        /// The account.
        account: String,
        /// Why the write failed.
        reason: String,
    },
    /// The rotated refresh token that could not be written is on disk now.
    RotationSaved {
        /// The account.
        account: String,
        /// How long it was only in memory.
        after: Duration,
    },
}

/// Whether two optional secrets hold the same value.
fn same_secret(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a
            .expose_secret()
            .as_bytes()
            .ct_eq(b.expose_secret().as_bytes())
            .into(),
        (None, None) => true,
        _ => false,
    }
}

impl Current {
    fn matches(&self, record: &SealedGrant) -> bool {
        self.salt == record.salt && self.nonce == record.nonce && self.kdf == record.kdf
    }
}

/// A new record for an account, and the record it replaces.
struct Write {
    /// What the store held when the change was computed (None: nothing).
    expected: Option<SealedGrant>,
    sealed: SealedGrant,
    grant: GrantData,
    key: SealKey,
}

struct Shared {
    account: String,
    current: RwLock<Current>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn replace(&self, new: Current) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = new;
    }
}

/// An unlocked account. Cheap to clone; all clones, and every login that
/// unlocked the same account through the same [`Vault`], share one current
/// grant.
#[derive(Clone)]
pub struct Unlocked {
    shared: Arc<Shared>,
}

impl Unlocked {
    /// The account name.
    pub fn account(&self) -> &str {
        &self.shared.account
    }

    /// The current refresh token (the latest rotation).
    pub fn refresh_token(&self) -> Option<SecretString> {
        self.shared.read().grant.refresh_token.clone()
    }

    /// The client id the grant was issued to, when not the provider's.
    pub fn client_id(&self) -> Option<String> {
        self.shared.read().grant.client_id.clone()
    }

    /// When the current grant or its last rotation was obtained (unix
    /// seconds).
    pub fn obtained_at(&self) -> u64 {
        self.shared.read().grant.obtained_at
    }

    /// The access token another instance left in a shared store's record
    /// (see [`GrantData::shared_access`]), if the current grant has one.
    pub fn shared_access(&self) -> Option<SharedAccess> {
        self.shared.read().grant.shared_access.clone()
    }

    /// How long the current refresh token has been in memory only (a
    /// rotation whose write failed), if it is.
    pub fn unsaved_for(&self) -> Option<Duration> {
        self.shared
            .read()
            .unsaved
            .as_ref()
            .map(|u| u.since.elapsed())
    }
}

impl fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unlocked")
            .field("account", &self.shared.account)
            .finish_non_exhaustive()
    }
}

/// Per-account in-memory state, behind the per-account async mutex.
#[derive(Default)]
struct Slot {
    /// Verifier of the last password that opened the record in `shared`.
    verifier: Option<[u8; 32]>,
    shared: Option<Arc<Shared>>,
}

impl Slot {
    /// The shared state if `verifier` is the cached one and `record` is the
    /// record it was cached for.
    fn cached(&self, verifier: &[u8; 32], record: &SealedGrant) -> Option<Arc<Shared>> {
        let cached = self.verifier.as_ref()?;
        let shared = self.shared.as_ref()?;
        let same_password: bool = cached.ct_eq(verifier).into();
        (same_password && shared.read().matches(record)).then(|| shared.clone())
    }

    /// The shared state if `verifier` is the cached one, whatever the
    /// store holds (for when it cannot be read).
    fn cached_in_memory(&self, verifier: &[u8; 32]) -> Option<Arc<Shared>> {
        let cached = self.verifier.as_ref()?;
        let same_password: bool = cached.ct_eq(verifier).into();
        same_password.then(|| self.shared.clone()).flatten()
    }

    /// Make `current` the account's state, updating the shared state in
    /// place so that existing [`Unlocked`] values see it. A record that
    /// holds the refresh token an unsaved rotation replaced is older than
    /// memory: the unsaved token stays (now to be saved over that record).
    fn install(&mut self, account: &str, mut current: Current) -> Arc<Shared> {
        match &self.shared {
            Some(shared) => {
                {
                    let old = shared.read();
                    if let Some(unsaved) = &old.unsaved
                        && same_secret(current.grant.refresh_token.as_ref(), unsaved.spent.as_ref())
                    {
                        current.grant = old.grant.clone();
                        current.unsaved = Some(unsaved.clone());
                    }
                }
                shared.replace(current);
                shared.clone()
            }
            None => {
                let shared = Arc::new(Shared {
                    account: account.to_owned(),
                    current: RwLock::new(current),
                });
                self.shared = Some(shared.clone());
                shared
            }
        }
    }
}

/// Where record keys come from.
enum KeyMode {
    /// Argon2id of the local password (the password is the key).
    Password,
    /// A service secret (key file or systemd credential); the local
    /// password is checked against a PHC hash in the record.
    Service(Zeroizing<Vec<u8>>),
}

impl KeyMode {
    fn name(&self) -> &'static str {
        match self {
            KeyMode::Password => "password",
            KeyMode::Service(_) => "service",
        }
    }
}

/// Unlocks, creates and updates sealed grants. One per process.
pub struct Vault {
    store: Arc<dyn TokenStore>,
    /// Where record keys come from.
    mode: KeyMode,
    kdf: KdfParams,
    /// Failed logins: who waits (see [`crate::backoff`]).
    backoff: Backoff,
    pepper: Zeroizing<[u8; 32]>,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    meta_lock: Mutex<()>,
    kdf_runs: AtomicU64,
    /// Every Argon2 run goes through it: a fair cap on runs at once.
    gate: Arc<KdfGate>,
    /// Service mode: a PHC hash with this vault's KDF parameters that no
    /// password matches, for [`Vault::dummy_verification`].
    dummy_hash: Option<String>,
    /// Where [`GrantEvent`]s go.
    events: tokio::sync::broadcast::Sender<GrantEvent>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("kdf", &self.kdf)
            .field("backoff", &self.backoff.policy())
            .finish_non_exhaustive()
    }
}

fn gate_stopped(e: crate::kdf::KdfGateError) -> SealError {
    SealError::Kdf {
        reason: e.to_string(),
    }
}

fn task_stopped(what: &str) -> StoreError {
    StoreError::Backend {
        path: PathBuf::new(),
        reason: format!("the {what} task stopped unexpectedly"),
    }
}

impl Vault {
    /// A vault over `store`. New grants are sealed with `kdf`; failures back
    /// off according to `backoff`.
    pub fn new(store: Arc<dyn TokenStore>, kdf: KdfParams, backoff: BackoffPolicy) -> Vault {
        Vault::with_mode(store, KeyMode::Password, kdf, backoff)
    }

    /// A vault in service key mode: records are sealed under keys derived
    /// from `secret` (at least 32 random bytes from a key file or a systemd
    /// credential); local passwords are checked against Argon2id hashes
    /// (cost `kdf`). Grants can then be refreshed in the background.
    pub fn new_service(
        store: Arc<dyn TokenStore>,
        secret: Zeroizing<Vec<u8>>,
        kdf: KdfParams,
        backoff: BackoffPolicy,
    ) -> Vault {
        Vault::with_mode(store, KeyMode::Service(secret), kdf, backoff)
    }

    fn with_mode(
        store: Arc<dyn TokenStore>,
        mode: KeyMode,
        kdf: KdfParams,
        backoff: BackoffPolicy,
    ) -> Vault {
        let mut pepper = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut *pepper);
        // Out-of-range parameters fail every real run the same way; the
        // dummy then has nothing to imitate.
        let backoff = Backoff::new(backoff).with_shared(store.clone());
        let dummy_hash = match mode {
            KeyMode::Service(_) => seal::dummy_password_hash(kdf).ok(),
            KeyMode::Password => None,
        };
        Vault {
            store,
            mode,
            kdf,
            backoff,
            pepper,
            slots: Mutex::new(HashMap::new()),
            meta_lock: Mutex::new(()),
            kdf_runs: AtomicU64::new(0),
            gate: Arc::new(KdfGate::new(crate::kdf::automatic_cap(kdf.m_cost_kib))),
            dummy_hash,
            events: tokio::sync::broadcast::channel(64).0,
        }
    }

    /// The same vault with its Argon2 runs going through `gate` (shared
    /// with whatever else runs them in the process) instead of a gate of
    /// its own with the automatic cap.
    pub fn with_kdf_gate(mut self, gate: Arc<KdfGate>) -> Vault {
        self.gate = gate;
        self
    }

    /// The gate this vault's Argon2 runs go through.
    pub fn kdf_gate(&self) -> &Arc<KdfGate> {
        &self.gate
    }

    /// Costs what checking a wrong password costs, and checks nothing: one
    /// Argon2 run with this vault's parameters through the same gate (in
    /// password mode a key derivation over a fixed salt, in service mode a
    /// check against a fixed PHC hash). For a login whose user has no
    /// account, so that its refusal takes as long as a wrong password's.
    pub async fn dummy_verification(&self) {
        const DUMMY_PASSWORD: &str = "mailbridge dummy verification";
        let password = SecretString::from(DUMMY_PASSWORD);
        let result = match (&self.mode, &self.dummy_hash) {
            (KeyMode::Password, _) => self
                .run_derive(&password, &seal::DUMMY_SALT, self.kdf)
                .await
                .map(drop),
            (KeyMode::Service(_), Some(hash)) => self.verify(&password, hash).await.map(drop),
            // Out-of-range parameters: a real check fails at once too.
            (KeyMode::Service(_), None) => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %crate::report::chain(&e), "dummy verification failed");
        }
    }

    /// Events about grants from now on (see [`GrantEvent`]). A receiver
    /// that falls more than 64 events behind loses the oldest.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<GrantEvent> {
        self.events.subscribe()
    }

    fn announce(&self, event: GrantEvent) {
        // Nobody listening is fine: the log has it too.
        let _ = self.events.send(event);
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// How many key derivations this vault has run (for tests).
    #[doc(hidden)]
    pub fn kdf_runs(&self) -> u64 {
        self.kdf_runs.load(Ordering::Relaxed)
    }

    /// Check the local password and return the unlocked grant.
    ///
    /// Refused with [`VaultError::Backoff`] while the account or the peer is
    /// locked out (the password is not even checked). A password already
    /// seen for the same stored record is recognised without a KDF.
    pub async fn unlock(
        &self,
        account: &str,
        password: &SecretString,
        peer: IpAddr,
    ) -> Result<Unlocked, VaultError> {
        self.check_backoff(account, peer)?;
        // Only accounts with a record get a slot: unknown names cost nothing.
        // An account that has a slot had a record; it is read again below.
        let has_slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(account);
        if !has_slot && self.store.load_grant(account)?.is_none() {
            return Err(no_grant(account));
        }
        let slot = self.slot(account);
        let mut slot = slot.lock_owned().await;
        // Attempts that queued behind a failure are refused too.
        self.check_backoff(account, peer)?;
        let verifier = self.verifier(account, password);
        let record = match self.store.load_grant(account) {
            Ok(record) => record.ok_or_else(|| no_grant(account))?,
            // The store cannot be read just now (sled on a full disk cannot
            // even reopen): a password already seen opens the grant held
            // in memory, so logins go on while a person frees the disk.
            Err(e) => match slot.cached_in_memory(&verifier) {
                Some(shared) => {
                    tracing::warn!(account, error = %crate::report::chain(&e), "the token store cannot be read; using the grant in memory");
                    self.succeeded(account, peer);
                    return Ok(Unlocked { shared });
                }
                None => return Err(e.into()),
            },
        };
        if let Some(shared) = slot.cached(&verifier, &record) {
            self.succeeded(account, peer);
            return Ok(Unlocked { shared });
        }
        self.check_mode(account, &record)?;
        if let Some(hash) = &record.password_hash
            && !self.verify(password, hash).await?
        {
            return Err(self.wrong_password(account, peer));
        }

        let key = self.derive(password, &record.salt, record.kdf).await?;
        match seal::open(account, &key, &record) {
            Ok(grant) => {
                self.succeeded(account, peer);
                let shared = slot.install(
                    account,
                    Current {
                        grant,
                        key,
                        salt: record.salt,
                        kdf: record.kdf,
                        nonce: record.nonce,
                        unsaved: None,
                    },
                );
                slot.verifier = Some(verifier);
                tracing::debug!(account, "grant unlocked");
                Ok(Unlocked { shared })
            }
            // In service mode the password was checked above: a record
            // the service key cannot open was sealed under another key.
            Err(SealError::WrongKey) if matches!(self.mode, KeyMode::Service(_)) => {
                Err(VaultError::ServiceKeyMismatch {
                    account: account.to_owned(),
                })
            }
            Err(SealError::WrongKey) => Err(self.wrong_password(account, peer)),
            Err(e) => Err(e.into()),
        }
    }

    /// Service key mode: the unlocked grant without a password, for the
    /// background refresh that keeps grants alive.
    pub async fn unlock_service(&self, account: &str) -> Result<Unlocked, VaultError> {
        if !matches!(self.mode, KeyMode::Service(_)) {
            return Err(VaultError::NotServiceMode);
        }
        let slot = self.slot(account);
        let mut slot = slot.lock_owned().await;
        let record = match self.store.load_grant(account) {
            Ok(record) => record.ok_or_else(|| no_grant(account))?,
            // Unreadable store: the grant in memory, if there is one.
            Err(e) => match slot.shared.clone() {
                Some(shared) => return Ok(Unlocked { shared }),
                None => return Err(e.into()),
            },
        };
        if let Some(shared) = slot.shared.as_ref().filter(|s| s.read().matches(&record)) {
            return Ok(Unlocked {
                shared: shared.clone(),
            });
        }
        self.check_mode(account, &record)?;
        let key = self.service_key(&record.salt)?;
        let grant = match seal::open(account, &key, &record) {
            Ok(grant) => grant,
            Err(SealError::WrongKey) => {
                return Err(VaultError::ServiceKeyMismatch {
                    account: account.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let shared = slot.install(
            account,
            Current {
                grant,
                key,
                salt: record.salt,
                kdf: record.kdf,
                nonce: record.nonce,
                unsaved: None,
            },
        );
        // No verifier: a password login still checks its password.
        slot.verifier = None;
        Ok(Unlocked { shared })
    }

    fn wrong_password(&self, account: &str, peer: IpAddr) -> VaultError {
        let tally = self.backoff.failed(peer, account);
        tracing::warn!(
            account,
            %peer,
            failures_here = tally.pair,
            addresses_failing = tally.addresses,
            names_failed_here = tally.names,
            "wrong local password"
        );
        VaultError::WrongPassword
    }

    /// The record must have been sealed in the mode in force.
    fn check_mode(&self, account: &str, record: &SealedGrant) -> Result<(), VaultError> {
        let sealed_in = if record.password_hash.is_some() {
            "service"
        } else {
            "password"
        };
        if sealed_in == self.mode.name() {
            Ok(())
        } else {
            Err(VaultError::WrongKeyMode {
                account: account.to_owned(),
                sealed_in,
                running: self.mode.name(),
            })
        }
    }

    fn service_key(&self, salt: &[u8]) -> Result<SealKey, VaultError> {
        match &self.mode {
            KeyMode::Service(secret) => Ok(seal::service_key(secret, salt)),
            KeyMode::Password => Err(VaultError::NotServiceMode),
        }
    }

    /// The PHC hash of a new local password, in service mode.
    async fn password_hash(&self, password: &SecretString) -> Result<Option<String>, VaultError> {
        if !matches!(self.mode, KeyMode::Service(_)) {
            return Ok(None);
        }
        self.kdf_runs.fetch_add(1, Ordering::Relaxed);
        let password = password.clone();
        let kdf = self.kdf;
        let hash = self
            .gate
            .run(move |memory| seal::hash_password_in(&password, kdf, memory))
            .await
            .map_err(gate_stopped)??;
        Ok(Some(hash))
    }

    async fn verify(&self, password: &SecretString, hash: &str) -> Result<bool, VaultError> {
        self.kdf_runs.fetch_add(1, Ordering::Relaxed);
        let password = password.clone();
        let hash = hash.to_owned();
        let ok = self
            .gate
            .run(move |memory| seal::verify_password_in(&password, &hash, memory))
            .await
            .map_err(gate_stopped)??;
        Ok(ok)
    }

    /// Seal a new grant (import / add). Replaces an existing grant for the
    /// account only if `replace` is true, else [`VaultError::Exists`].
    /// Sessions that already unlocked the account see the new grant.
    pub async fn create(
        &self,
        account: &str,
        password: &SecretString,
        grant: GrantData,
        mut meta: AccountMeta,
        replace: bool,
    ) -> Result<(), VaultError> {
        let slot = self.slot(account).lock_owned().await;
        let existing = self.store.load_grant(account)?;
        if !replace && existing.is_some() {
            return Err(VaultError::Exists {
                account: account.to_owned(),
            });
        }
        let salt = seal::new_salt();
        let key = self.derive(password, &salt, self.kdf).await?;
        let hash = self.password_hash(password).await?;
        let sealed = seal::seal_with_hash(account, &key, salt, self.kdf, hash, &grant)?;
        let verifier = self.verifier(account, password);
        let write = Write {
            expected: existing,
            sealed,
            grant,
            key,
        };
        self.commit(slot, account, write, Some(verifier), None)
            .await?;
        if meta.created_at == 0 {
            meta.created_at = unix_now();
        }
        self.store.save_meta(account, &meta)?;
        tracing::info!(account, replaced = replace, "grant sealed and saved");
        Ok(())
    }

    /// True when other instances share the store: refreshes then take
    /// [`Vault::lock_refresh`] and reload the grant first.
    pub fn store_is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// The store's lock on refreshing `account` (see
    /// [`TokenStore::lock_refresh`]).
    pub fn lock_refresh(&self, account: &str) -> LockFuture {
        self.store.lock_refresh(account)
    }

    /// Takes up the stored record if another writer (another instance on
    /// a shared store) replaced the one `unlocked` holds, opening it with
    /// the key in memory. True if it did. Nothing is read over a rotation
    /// that is still only in memory (it is newer than any record).
    /// [`VaultError::Changed`] if the key in memory no longer opens the
    /// record (the password was changed elsewhere).
    pub async fn reload(&self, unlocked: &Unlocked) -> Result<bool, VaultError> {
        let account = unlocked.account();
        let _slot = self.slot(account).lock_owned().await;
        if unlocked.shared.read().unsaved.is_some() {
            return Ok(false);
        }
        let record = self
            .store
            .load_grant(account)?
            .ok_or_else(|| no_grant(account))?;
        let key = {
            let c = unlocked.shared.read();
            if c.matches(&record) {
                return Ok(false);
            }
            c.key.clone()
        };
        let grant = match seal::open(account, &key, &record) {
            Ok(grant) => grant,
            Err(SealError::WrongKey) => {
                return Err(VaultError::Changed {
                    account: account.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        unlocked.shared.replace(Current {
            grant,
            key,
            salt: record.salt,
            kdf: record.kdf,
            nonce: record.nonce,
            unsaved: None,
        });
        Ok(true)
    }

    /// After a refresh on a shared store: the rotated refresh token (if
    /// the provider rotated it, as [`Vault::store_rotated`]) and the new
    /// access token go into the sealed record, so the other instances use
    /// both. A failure to write only the access token is not an error
    /// worth more than a log line: the others refresh on their own.
    pub async fn store_refreshed(
        &self,
        unlocked: &Unlocked,
        new_refresh_token: Option<SecretString>,
        access: Option<SharedAccess>,
    ) -> Result<(), VaultError> {
        let slot = self.slot(unlocked.account()).lock_owned().await;
        let rotated = new_refresh_token.is_some();
        {
            let mut c = unlocked
                .shared
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(rt) = new_refresh_token {
                let spent = c.grant.refresh_token.clone();
                c.unsaved.get_or_insert(Unsaved {
                    spent,
                    since: Instant::now(),
                    failed: false,
                });
                c.grant.refresh_token = Some(rt);
                c.grant.obtained_at = unix_now();
            }
            c.grant.shared_access = access;
        }
        if rotated {
            self.write_unsaved(slot, unlocked).await
        } else {
            self.write_current(slot, unlocked).await
        }
    }

    /// The refresh token rotated: make it the account's current token in
    /// memory at once (the provider has spent the old one), then reseal
    /// under the same key (new nonce) and save durably. Returns only after
    /// the store flushed. If the write fails, the new token stays in memory
    /// marked unsaved (see [`Vault::save_unsaved`]) and the error is
    /// returned: the caller may use the access token that came with it,
    /// and must get the write retried.
    pub async fn store_rotated(
        &self,
        unlocked: &Unlocked,
        new_refresh_token: SecretString,
    ) -> Result<(), VaultError> {
        let account = unlocked.account();
        let slot = self.slot(account).lock_owned().await;
        {
            let mut c = unlocked
                .shared
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let spent = c.grant.refresh_token.clone();
            c.unsaved.get_or_insert(Unsaved {
                spent,
                since: Instant::now(),
                failed: false,
            });
            c.grant.refresh_token = Some(new_refresh_token);
            c.grant.obtained_at = unix_now();
        }
        self.write_unsaved(slot, unlocked).await
    }

    /// Writes the account's unsaved rotated refresh token, if it has one
    /// (a retry after a failed [`Vault::store_rotated`]). True if there was
    /// one and it is on disk now.
    pub async fn save_unsaved(&self, unlocked: &Unlocked) -> Result<bool, VaultError> {
        if unlocked.shared.read().unsaved.is_none() {
            return Ok(false);
        }
        let slot = self.slot(unlocked.account()).lock_owned().await;
        if unlocked.shared.read().unsaved.is_none() {
            return Ok(false);
        }
        self.write_unsaved(slot, unlocked).await.map(|()| true)
    }

    /// At shutdown: one last try to save every rotated refresh token that
    /// is still only in memory. Each that stays unsaved is logged as an
    /// error (its grant is lost when the process ends). Returns how many.
    pub async fn save_all_unsaved(&self) -> usize {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut left = 0;
        for slot in slots {
            let Some(shared) = slot.lock().await.shared.clone() else {
                continue;
            };
            if shared.read().unsaved.is_none() {
                continue;
            }
            let unlocked = Unlocked { shared };
            if let Err(e) = self.save_unsaved(&unlocked).await {
                left += 1;
                tracing::error!(
                    account = unlocked.account(),
                    error = %crate::report::chain(&e),
                    "the rotated refresh token could not be saved before exit: the grant is lost; authorize the account again (`mailbridge account reauthorize`)"
                );
            }
        }
        left
    }

    /// Seals `unlocked`'s current grant over the record it is based on
    /// and saves it; on failure the grant stays in memory, unsaved.
    async fn write_unsaved(
        &self,
        slot: OwnedMutexGuard<Slot>,
        unlocked: &Unlocked,
    ) -> Result<(), VaultError> {
        let account = unlocked.account();
        let was_unsaved = unlocked.shared.read().unsaved.clone();
        let result = self.write_current(slot, unlocked).await;
        match &result {
            Ok(()) => {
                if let Some(u) = &was_unsaved
                    && u.failed
                {
                    tracing::warn!(
                        account,
                        unsaved_secs = u.since.elapsed().as_secs(),
                        "the rotated refresh token that could not be saved is on disk now"
                    );
                    self.announce(GrantEvent::RotationSaved {
                        account: account.to_owned(),
                        after: u.since.elapsed(),
                    });
                }
            }
            Err(e) => {
                let first = {
                    let mut c = unlocked
                        .shared
                        .current
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    let first = c.unsaved.as_ref().is_none_or(|u| !u.failed);
                    if let Some(u) = c.unsaved.as_mut() {
                        u.failed = true;
                    }
                    first
                };
                let reason = crate::report::chain(e);
                tracing::warn!(
                    account,
                    error = %reason,
                    "cannot save the rotated refresh token; it is kept in memory and used for later refreshes, and the write is retried (if mailbridge stops before it is saved, the account must be authorized again)"
                );
                if first {
                    self.announce(GrantEvent::RotationNotSaved {
                        account: account.to_owned(),
                        reason,
                    });
                }
            }
        }
        result
    }

    /// Seals `unlocked`'s current grant over the record it is based on
    /// and saves it.
    async fn write_current(
        &self,
        slot: OwnedMutexGuard<Slot>,
        unlocked: &Unlocked,
    ) -> Result<(), VaultError> {
        let account = unlocked.account();
        let (grant, key, salt, kdf, known) = {
            let c = unlocked.shared.read();
            (
                c.grant.clone(),
                c.key.clone(),
                c.salt.clone(),
                c.kdf,
                (c.salt.clone(), c.nonce.clone()),
            )
        };
        let record = self
            .store
            .load_grant(account)?
            .ok_or_else(|| no_grant(account))?;
        if (&record.salt, &record.nonce) != (&known.0, &known.1) {
            // Written since this session's state was loaded (by another
            // vault on the same store, say). Go on only if our key
            // still opens it: otherwise the account was re-keyed
            // elsewhere.
            match seal::open(account, &key, &record) {
                Ok(_) => {}
                Err(SealError::WrongKey) => {
                    return Err(VaultError::Changed {
                        account: account.to_owned(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let sealed = seal::seal_with_hash(
            account,
            &key,
            salt,
            kdf,
            record.password_hash.clone(),
            &grant,
        )?;
        let write = Write {
            expected: Some(record),
            sealed,
            grant,
            key,
        };
        self.commit(slot, account, write, None, Some(unlocked.shared.clone()))
            .await
    }

    /// Re-seal under a new password (new salt, this vault's KDF
    /// parameters). The old password is required.
    pub async fn change_password(
        &self,
        account: &str,
        old: &SecretString,
        new: &SecretString,
    ) -> Result<(), VaultError> {
        if self.store.load_grant(account)?.is_none() {
            return Err(no_grant(account));
        }
        let slot = self.slot(account).lock_owned().await;
        let record = self
            .store
            .load_grant(account)?
            .ok_or_else(|| no_grant(account))?;
        self.check_mode(account, &record)?;
        if let Some(hash) = &record.password_hash
            && !self.verify(old, hash).await?
        {
            return Err(VaultError::WrongPassword);
        }
        let grant = match slot.cached(&self.verifier(account, old), &record) {
            Some(shared) => shared.read().grant.clone(),
            None => {
                let old_key = self.derive(old, &record.salt, record.kdf).await?;
                match seal::open(account, &old_key, &record) {
                    Ok(grant) => grant,
                    Err(SealError::WrongKey) => return Err(VaultError::WrongPassword),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let salt = seal::new_salt();
        let key = self.derive(new, &salt, self.kdf).await?;
        let hash = self.password_hash(new).await?;
        let sealed = seal::seal_with_hash(account, &key, salt, self.kdf, hash, &grant)?;
        let verifier = self.verifier(account, new);
        let write = Write {
            expected: Some(record),
            sealed,
            grant,
            key,
        };
        self.commit(slot, account, write, Some(verifier), None)
            .await?;
        tracing::info!(account, "local password changed");
        Ok(())
    }

    /// Read-modify-write of the account's metadata (starting from the
    /// default if there is none).
    pub fn update_meta(
        &self,
        account: &str,
        f: impl FnOnce(&mut AccountMeta),
    ) -> Result<(), VaultError> {
        let _guard = self
            .meta_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut meta = self.store.load_meta(account)?.unwrap_or_default();
        f(&mut meta);
        self.store.save_meta(account, &meta)?;
        Ok(())
    }

    fn slot(&self, account: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.entry(account.to_owned()).or_default().clone()
    }

    fn verifier(&self, account: &str, password: &SecretString) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper.as_slice());
        h.update(account.as_bytes());
        h.update([0u8]);
        h.update(password.expose_secret().as_bytes());
        h.finalize().into()
    }

    /// The record key: Argon2id of the password, or in service mode from
    /// the service secret (the password is checked separately).
    async fn derive(
        &self,
        password: &SecretString,
        salt: &[u8],
        kdf: KdfParams,
    ) -> Result<SealKey, VaultError> {
        if matches!(self.mode, KeyMode::Service(_)) {
            return self.service_key(salt);
        }
        self.run_derive(password, salt, kdf).await
    }

    /// One Argon2id key derivation through the gate.
    async fn run_derive(
        &self,
        password: &SecretString,
        salt: &[u8],
        kdf: KdfParams,
    ) -> Result<SealKey, VaultError> {
        self.kdf_runs.fetch_add(1, Ordering::Relaxed);
        let password = password.clone();
        let salt = salt.to_vec();
        let key = self
            .gate
            .run(move |memory| seal::derive_key_in(&password, &salt, kdf, memory))
            .await
            .map_err(gate_stopped)??;
        Ok(key)
    }

    /// Save `write.sealed` durably if the stored record is still the one
    /// the change was based on, then make it the account's in-memory state
    /// (and `also`'s, if that is a different shared state). Runs on a
    /// blocking thread that owns the account's guard, so it completes even
    /// if the caller is cancelled. [`VaultError::Changed`] if another
    /// writer got there first.
    async fn commit(
        &self,
        mut slot: OwnedMutexGuard<Slot>,
        account: &str,
        write: Write,
        verifier: Option<[u8; 32]>,
        also: Option<Arc<Shared>>,
    ) -> Result<(), VaultError> {
        let store = self.store.clone();
        let account = account.to_owned();
        let Write {
            expected,
            sealed,
            grant,
            key,
        } = write;
        tokio::task::spawn_blocking(move || -> Result<(), VaultError> {
            if !store.swap_grant(&account, expected.as_ref(), &sealed)? {
                return Err(VaultError::Changed { account });
            }
            let current = |grant: GrantData, key: SealKey| Current {
                grant,
                key,
                salt: sealed.salt.clone(),
                kdf: sealed.kdf,
                nonce: sealed.nonce.clone(),
                unsaved: None,
            };
            let installed = slot.install(&account, current(grant.clone(), key.clone()));
            if let Some(also) = also.filter(|a| !Arc::ptr_eq(a, &installed)) {
                also.replace(current(grant, key));
            }
            if let Some(v) = verifier {
                slot.verifier = Some(v);
            }
            Ok(())
        })
        .await
        .map_err(|_| task_stopped("store write"))??;
        Ok(())
    }

    fn check_backoff(&self, account: &str, peer: IpAddr) -> Result<(), VaultError> {
        match self.backoff.check(peer, account) {
            Some(retry_after) => {
                tracing::info!(account, %peer, ?retry_after, "login refused: backing off");
                Err(VaultError::Backoff { retry_after })
            }
            None => Ok(()),
        }
    }

    fn succeeded(&self, account: &str, peer: IpAddr) {
        self.backoff.succeeded(peer, account);
    }

    /// The failed-login bookkeeping (the login path records unknown names
    /// in it too).
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
}

fn no_grant(account: &str) -> VaultError {
    VaultError::NoGrant {
        account: account.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::store::sled_store::tests::TempDir;
    use std::path::Path;

    const P1: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const P2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn pw(s: &str) -> SecretString {
        SecretString::from(s)
    }

    fn grant(token: &str) -> GrantData {
        GrantData {
            refresh_token: Some(pw(token)),
            obtained_at: 1,
            client_id: None,
            shared_access: None,
        }
    }

    fn token(u: &Unlocked) -> String {
        u.refresh_token()
            .map(|t| t.expose_secret().to_owned())
            .unwrap_or_default()
    }

    fn vault_on(store: Arc<dyn TokenStore>, backoff: BackoffPolicy) -> Vault {
        Vault::new(store, KdfParams::for_tests(), backoff)
    }

    fn temp_vault() -> Vault {
        let store = SledStore::open_temporary().expect("temporary store");
        vault_on(Arc::new(store), BackoffPolicy::default())
    }

    fn tiny_backoff() -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
        }
    }

    async fn add(v: &Vault, account: &str, password: &str, rt: &str) {
        v.create(
            account,
            &pw(password),
            grant(rt),
            AccountMeta::default(),
            false,
        )
        .await
        .expect("create");
    }

    #[test]
    fn backoff_delay_doubles_and_caps() {
        let p = BackoffPolicy::default();
        assert_eq!(p.delay(0), Duration::ZERO);
        assert_eq!(p.delay(1), Duration::from_secs(1));
        assert_eq!(p.delay(2), Duration::from_secs(2));
        assert_eq!(p.delay(5), Duration::from_secs(16));
        assert_eq!(p.delay(9), Duration::from_secs(256));
        assert_eq!(p.delay(10), Duration::from_secs(300));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(300));
    }

    /// Two vaults on one store stand for two instances on a shared one.
    #[tokio::test]
    async fn reload_takes_up_what_another_instance_saved() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().expect("store"));
        let a = vault_on(store.clone(), BackoffPolicy::default());
        let b = vault_on(store, BackoffPolicy::default());
        add(&a, "alice", "pw", "rt-1").await;
        let ua = a.unlock("alice", &pw("pw"), P1).await.expect("unlock a");
        let ub = b.unlock("alice", &pw("pw"), P1).await.expect("unlock b");
        assert!(!b.reload(&ub).await.expect("nothing new"));
        let access = SharedAccess {
            token: pw("at-2"),
            expires_at: 2_000_000_000,
            lifetime_secs: 3600,
        };
        a.store_refreshed(&ua, Some(pw("rt-2")), Some(access))
            .await
            .expect("save");
        assert_eq!(token(&ub), "rt-1");
        assert!(ub.shared_access().is_none());
        assert!(b.reload(&ub).await.expect("reload"));
        assert_eq!(token(&ub), "rt-2");
        let shared = ub.shared_access().expect("the access token came along");
        assert_eq!(shared.token.expose_secret(), "at-2");
        assert_eq!(shared.expires_at, 2_000_000_000);
        assert!(!b.reload(&ub).await.expect("nothing new again"));
        // An access token alone (no rotation) is saved too.
        let later = SharedAccess {
            token: pw("at-3"),
            expires_at: 2_000_003_600,
            lifetime_secs: 3600,
        };
        b.store_refreshed(&ub, None, Some(later))
            .await
            .expect("save");
        assert!(a.reload(&ua).await.expect("reload"));
        assert_eq!(token(&ua), "rt-2");
        assert_eq!(
            ua.shared_access().expect("shared").token.expose_secret(),
            "at-3"
        );
        // The password changed through the other instance: the key in
        // memory no longer opens the record.
        a.change_password("alice", &pw("pw"), &pw("new"))
            .await
            .expect("passwd");
        let err = b.reload(&ub).await.expect_err("re-keyed");
        assert!(matches!(err, VaultError::Changed { .. }), "{err}");
    }

    #[tokio::test]
    async fn unlock_right_and_wrong() {
        let v = temp_vault();
        add(&v, "alice", "pw", "rt-1").await;
        let u = v.unlock("alice", &pw("pw"), P1).await.expect("unlock");
        assert_eq!(u.account(), "alice");
        assert_eq!(token(&u), "rt-1");
        assert_eq!(format!("{u:?}"), "Unlocked { account: \"alice\", .. }");
        let err = v.unlock("alice", &pw("nope"), P2).await.expect_err("wrong");
        assert!(matches!(err, VaultError::WrongPassword), "{err}");
        let err = v.unlock("bob", &pw("pw"), P1).await.expect_err("none");
        assert!(matches!(err, VaultError::NoGrant { .. }));
        assert!(
            err.to_string().contains("mailbridge account import bob"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn second_unlock_skips_the_kdf() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().expect("store"));
        let admin = vault_on(store.clone(), BackoffPolicy::default());
        add(&admin, "alice", "pw", "rt").await;

        let v = vault_on(store, BackoffPolicy::default());
        assert_eq!(v.kdf_runs(), 0);
        let a = v.unlock("alice", &pw("pw"), P1).await.expect("first");
        assert_eq!(v.kdf_runs(), 1);
        let b = v.unlock("alice", &pw("pw"), P2).await.expect("second");
        assert_eq!(v.kdf_runs(), 1, "second unlock must not run the KDF");
        assert!(Arc::ptr_eq(&a.shared, &b.shared));
        // A different (wrong) password is checked the slow way.
        assert!(v.unlock("alice", &pw("other"), P1).await.is_err());
        assert_eq!(v.kdf_runs(), 2);
    }

    #[tokio::test]
    async fn concurrent_first_logins_run_one_kdf() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().expect("store"));
        add(
            &vault_on(store.clone(), BackoffPolicy::default()),
            "a",
            "pw",
            "rt",
        )
        .await;
        let v = Arc::new(vault_on(store, BackoffPolicy::default()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let v = v.clone();
            tasks.push(tokio::spawn(async move {
                v.unlock("a", &pw("pw"), P1).await.map(|u| token(&u))
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("join").expect("unlock"), "rt");
        }
        assert_eq!(v.kdf_runs(), 1);
    }

    #[tokio::test]
    async fn wrong_password_leaves_record_untouched() {
        let tmp = TempDir::new("vault-wrong");
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open(tmp.path()).expect("open"));
        let v = vault_on(
            store.clone(),
            BackoffPolicy {
                base: Duration::ZERO,
                max: Duration::ZERO,
            },
        );
        add(&v, "alice", "pw", "rt").await;
        let before = store.load_grant("alice").expect("load").expect("some");
        let before_json = serde_json::to_vec(&before).expect("json");
        for guess in ["a", "b", "pw ", ""] {
            let err = v.unlock("alice", &pw(guess), P1).await.expect_err("wrong");
            assert!(matches!(err, VaultError::WrongPassword), "{err}");
            assert!(
                v.change_password("alice", &pw(guess), &pw("new"))
                    .await
                    .is_err()
            );
        }
        let after = store
            .load_grant("alice")
            .expect("load")
            .expect("still there");
        assert_eq!(serde_json::to_vec(&after).expect("json"), before_json);
        assert_eq!(
            token(&v.unlock("alice", &pw("pw"), P1).await.expect("ok")),
            "rt"
        );
    }

    #[tokio::test]
    async fn backoff_grows_refuses_and_resets() {
        let v = vault_on(
            Arc::new(SledStore::open_temporary().expect("store")),
            tiny_backoff(),
        );
        add(&v, "alice", "pw", "rt").await;

        assert!(matches!(
            v.unlock("alice", &pw("x"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        // Within the window even the right password is refused, unchecked.
        let runs = v.kdf_runs();
        match v.unlock("alice", &pw("pw"), P1).await {
            Err(VaultError::Backoff { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(200))
            }
            other => panic!("expected backoff, got {other:?}"),
        }
        assert_eq!(v.kdf_runs(), runs);

        tokio::time::sleep(Duration::from_millis(220)).await;
        assert!(matches!(
            v.unlock("alice", &pw("y"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        // Second consecutive failure: the window doubled.
        match v.unlock("alice", &pw("pw"), P1).await {
            Err(VaultError::Backoff { retry_after }) => {
                assert!(retry_after > Duration::from_millis(200), "{retry_after:?}")
            }
            other => panic!("expected backoff, got {other:?}"),
        }

        tokio::time::sleep(Duration::from_millis(420)).await;
        v.unlock("alice", &pw("pw"), P1)
            .await
            .expect("right password after the window");
        // Success reset the counters: the next failure gets the base window.
        assert!(matches!(
            v.unlock("alice", &pw("z"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        match v.unlock("alice", &pw("pw"), P1).await {
            Err(VaultError::Backoff { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}")
            }
            other => panic!("expected backoff, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn backoff_holds_the_failing_pair_only() {
        let v = vault_on(
            Arc::new(SledStore::open_temporary().expect("store")),
            BackoffPolicy {
                base: Duration::from_secs(60),
                max: Duration::from_secs(60),
            },
        );
        add(&v, "alice", "pa", "ra").await;
        add(&v, "bob", "pb", "rb").await;
        assert!(matches!(
            v.unlock("alice", &pw("guess"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        // The same address and account: refused, unchecked.
        let err = v
            .unlock("alice", &pw("pa"), P1)
            .await
            .expect_err("pair backoff");
        assert!(matches!(err, VaultError::Backoff { .. }), "{err}");
        assert!(err.to_string().contains("try again in 60 s"), "{err}");
        // The same address, another account; another address, the same
        // account: both fine (see crate::backoff for the wider rules).
        v.unlock("bob", &pw("pb"), P1).await.expect("other account");
        v.unlock("alice", &pw("pa"), P2)
            .await
            .expect("other address");
    }

    fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readdir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                files_under(&path, out);
            } else {
                out.push(path);
            }
        }
    }

    /// Drop-then-reopen: sled may release its file lock a moment after the
    /// last handle is dropped.
    fn reopen(dir: &Path) -> SledStore {
        for _ in 0..50 {
            match SledStore::open(dir) {
                Ok(s) => return s,
                Err(StoreError::Locked { .. }) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("reopen: {e}"),
            }
        }
        panic!("store still locked");
    }

    #[tokio::test]
    async fn rotation_persists_and_is_shared() {
        let tmp = TempDir::new("vault-rotate");
        const FIRST: &str = "RT-FIRST-4f1c9a7e-do-not-store-in-clear";
        const SECOND: &str = "RT-SECOND-8b2d3c6f-do-not-store-in-clear";
        {
            let store = Arc::new(SledStore::open(tmp.path()).expect("open"));
            let v = vault_on(store, BackoffPolicy::default());
            add(&v, "alice", "pw", FIRST).await;
            let u1 = v.unlock("alice", &pw("pw"), P1).await.expect("unlock");
            let u2 = u1.clone();
            let u3 = v
                .unlock("alice", &pw("pw"), P2)
                .await
                .expect("unlock again");
            v.store_rotated(&u1, pw(SECOND)).await.expect("rotate");
            assert_eq!(token(&u1), SECOND);
            assert_eq!(token(&u2), SECOND);
            assert_eq!(token(&u3), SECOND);
            // The cache still recognises the password after a rotation.
            let runs = v.kdf_runs();
            let u4 = v
                .unlock("alice", &pw("pw"), P1)
                .await
                .expect("unlock after rotate");
            assert_eq!(token(&u4), SECOND);
            assert_eq!(v.kdf_runs(), runs);
        }
        // No refresh token, old or new, appears in clear in any file.
        let mut files = Vec::new();
        files_under(tmp.path(), &mut files);
        assert!(!files.is_empty());
        for f in &files {
            let bytes = std::fs::read(f).expect("read");
            for needle in [FIRST, SECOND] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} contains a refresh token",
                    f.display()
                );
            }
        }
        // A new process sees the rotated token.
        let v = vault_on(Arc::new(reopen(tmp.path())), BackoffPolicy::default());
        let u = v
            .unlock("alice", &pw("pw"), P1)
            .await
            .expect("unlock after reopen");
        assert_eq!(token(&u), SECOND);
    }

    #[tokio::test]
    async fn change_password_rekeys() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().expect("store"));
        let v = vault_on(
            store.clone(),
            BackoffPolicy {
                base: Duration::ZERO,
                max: Duration::ZERO,
            },
        );
        add(&v, "alice", "old", "rt").await;
        let u = v.unlock("alice", &pw("old"), P1).await.expect("unlock");
        let err = v
            .change_password("alice", &pw("bad"), &pw("new"))
            .await
            .expect_err("old password required");
        assert!(matches!(err, VaultError::WrongPassword));
        let salt_before = store.load_grant("alice").expect("load").expect("some").salt;
        v.change_password("alice", &pw("old"), &pw("new"))
            .await
            .expect("change");
        let record = store.load_grant("alice").expect("load").expect("some");
        assert_ne!(record.salt, salt_before);
        assert!(matches!(
            v.unlock("alice", &pw("old"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        assert_eq!(
            token(&v.unlock("alice", &pw("new"), P1).await.expect("new")),
            "rt"
        );
        // An Unlocked from before the change can still rotate: it reseals
        // under the new key.
        v.store_rotated(&u, pw("rt-2")).await.expect("rotate");
        let fresh = vault_on(store, BackoffPolicy::default());
        assert_eq!(
            token(&fresh.unlock("alice", &pw("new"), P1).await.expect("unlock")),
            "rt-2"
        );
    }

    #[tokio::test]
    async fn create_refuses_to_overwrite_unless_asked() {
        let v = temp_vault();
        add(&v, "alice", "pw", "rt-1").await;
        let u = v.unlock("alice", &pw("pw"), P1).await.expect("unlock");
        let err = v
            .create(
                "alice",
                &pw("pw2"),
                grant("rt-2"),
                AccountMeta::default(),
                false,
            )
            .await
            .expect_err("exists");
        assert!(matches!(err, VaultError::Exists { .. }), "{err}");
        assert_eq!(token(&u), "rt-1");
        v.create(
            "alice",
            &pw("pw2"),
            grant("rt-2"),
            AccountMeta::default(),
            true,
        )
        .await
        .expect("replace");
        // Sessions follow the replacement.
        assert_eq!(token(&u), "rt-2");
        assert_eq!(
            token(&v.unlock("alice", &pw("pw2"), P1).await.expect("unlock")),
            "rt-2"
        );
        let meta = v.store().load_meta("alice").expect("meta").expect("some");
        assert!(meta.created_at > 0);
    }

    #[tokio::test]
    async fn rotation_after_outside_rekey_is_refused() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().expect("store"));
        let v = vault_on(store.clone(), BackoffPolicy::default());
        add(&v, "alice", "pw", "rt").await;
        let u = v.unlock("alice", &pw("pw"), P1).await.expect("unlock");
        // Another vault on the same store re-keys the account.
        let other = vault_on(store.clone(), BackoffPolicy::default());
        other
            .change_password("alice", &pw("pw"), &pw("new"))
            .await
            .expect("change");
        let before = store.load_grant("alice").expect("load");
        let err = v.store_rotated(&u, pw("rt-2")).await.expect_err("changed");
        assert!(matches!(err, VaultError::Changed { .. }), "{err}");
        assert_eq!(store.load_grant("alice").expect("load"), before);
    }

    #[tokio::test]
    async fn update_meta_read_modify_write() {
        let v = temp_vault();
        v.update_meta("alice", |m| m.last_login_at = Some(5))
            .expect("update");
        v.update_meta("alice", |m| m.last_error = Some("x".into()))
            .expect("update");
        let m = v.store().load_meta("alice").expect("load").expect("some");
        assert_eq!(m.last_login_at, Some(5));
        assert_eq!(m.last_error.as_deref(), Some("x"));
    }

    #[test]
    fn errors_carry_no_secrets() {
        let e = VaultError::WrongPassword;
        assert!(!format!("{e} {e:?}").is_empty());
        let e = VaultError::Backoff {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(e.to_string(), "too many failed logins; try again in 2 s");
    }

    fn service_vault(store: Arc<dyn TokenStore>, secret: &[u8]) -> Vault {
        Vault::new_service(
            store,
            Zeroizing::new(secret.to_vec()),
            KdfParams::for_tests(),
            tiny_backoff(),
        )
    }

    #[tokio::test]
    async fn dummy_verification_runs_the_kdf_once_in_both_modes() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let gate = Arc::new(KdfGate::new(1));
        let password_mode = Vault::new(store.clone(), KdfParams::for_tests(), tiny_backoff())
            .with_kdf_gate(gate.clone());
        password_mode.dummy_verification().await;
        assert_eq!(password_mode.kdf_runs(), 1);
        let service_mode = service_vault(store, &[7u8; 32]).with_kdf_gate(gate.clone());
        assert!(service_mode.dummy_hash.is_some());
        service_mode.dummy_verification().await;
        assert_eq!(service_mode.kdf_runs(), 1);
        assert!(Arc::ptr_eq(service_mode.kdf_gate(), &gate));
    }

    #[tokio::test]
    async fn service_mode_checks_the_password_hash_and_unlocks_without_it() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let secret = [7u8; 32];
        let v = service_vault(store.clone(), &secret);
        v.create(
            "a",
            &pw("local"),
            grant("rt-1"),
            AccountMeta::default(),
            false,
        )
        .await
        .unwrap();
        let record = store.load_grant("a").unwrap().unwrap();
        assert!(
            record
                .password_hash
                .as_deref()
                .unwrap()
                .starts_with("$argon2id$")
        );
        assert!(matches!(
            v.unlock("a", &pw("nope"), P1).await,
            Err(VaultError::WrongPassword)
        ));
        assert_eq!(store.load_grant("a").unwrap().unwrap(), record, "untouched");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let u = v.unlock("a", &pw("local"), P2).await.unwrap();
        assert_eq!(token(&u), "rt-1");

        // The background refresh's unlock needs no password, and rotations
        // keep the password hash.
        let fresh = service_vault(store.clone(), &secret);
        let bg = fresh.unlock_service("a").await.unwrap();
        assert_eq!(token(&bg), "rt-1");
        fresh.store_rotated(&bg, pw("rt-2")).await.unwrap();
        let again = service_vault(store.clone(), &secret);
        assert_eq!(
            token(&again.unlock("a", &pw("local"), P1).await.unwrap()),
            "rt-2"
        );

        // Another key file cannot open it; a swapped password hash makes the
        // record unreadable instead of letting another password in.
        let other = service_vault(store.clone(), &[8u8; 32]);
        assert!(matches!(
            other.unlock_service("a").await,
            Err(VaultError::ServiceKeyMismatch { .. })
        ));
        let original = store.load_grant("a").unwrap().unwrap();
        let mut forged = original.clone();
        forged.password_hash =
            Some(seal::hash_password(&pw("attacker"), KdfParams::for_tests()).unwrap());
        assert!(store.swap_grant("a", Some(&original), &forged).unwrap());
        let v2 = service_vault(store.clone(), &secret);
        let r = v2.unlock("a", &pw("attacker"), P1).await;
        assert!(
            matches!(r, Err(VaultError::ServiceKeyMismatch { .. })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn key_modes_do_not_mix() {
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let pv = vault_on(store.clone(), tiny_backoff());
        pv.create("p", &pw("x"), grant("rt"), AccountMeta::default(), false)
            .await
            .unwrap();
        let sv = service_vault(store.clone(), &[1u8; 32]);
        let e = sv.unlock("p", &pw("x"), P1).await.unwrap_err();
        assert!(matches!(e, VaultError::WrongKeyMode { .. }), "{e}");
        assert!(e.to_string().contains("account add"), "{e}");
        assert!(matches!(
            pv.unlock_service("p").await,
            Err(VaultError::NotServiceMode)
        ));
        sv.create("s", &pw("y"), grant("rt"), AccountMeta::default(), false)
            .await
            .unwrap();
        assert!(matches!(
            pv.unlock("s", &pw("y"), P1).await,
            Err(VaultError::WrongKeyMode { .. })
        ));
        // Changing the password in service mode keeps the grant.
        sv.change_password("s", &pw("y"), &pw("z")).await.unwrap();
        let fresh = service_vault(store.clone(), &[1u8; 32]);
        assert_eq!(token(&fresh.unlock("s", &pw("z"), P2).await.unwrap()), "rt");
    }

    /// A store whose writes fail while `fail` is set (a full disk).
    struct Flaky {
        inner: SledStore,
        fail: std::sync::atomic::AtomicBool,
        fail_reads: std::sync::atomic::AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    path: PathBuf::from("/state"),
                    reason: "No space left on device".into(),
                });
            }
            Ok(())
        }
    }

    impl TokenStore for Flaky {
        fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
            if self.fail_reads.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    path: PathBuf::from("/state"),
                    reason: "cannot reopen: No space left on device".into(),
                });
            }
            self.inner.load_grant(account)
        }
        fn swap_grant(
            &self,
            account: &str,
            expected: Option<&SealedGrant>,
            new: &SealedGrant,
        ) -> Result<bool, StoreError> {
            self.check()?;
            self.inner.swap_grant(account, expected, new)
        }
        fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
            self.inner.load_meta(account)
        }
        fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
            self.check()?;
            self.inner.save_meta(account, meta)
        }
        fn remove(&self, account: &str) -> Result<bool, StoreError> {
            self.check()?;
            self.inner.remove(account)
        }
        fn accounts(&self) -> Result<Vec<String>, StoreError> {
            self.inner.accounts()
        }
    }

    #[tokio::test]
    async fn an_unsaved_rotation_stays_authoritative_until_saved() {
        let flaky = Arc::new(Flaky {
            inner: SledStore::open_temporary().unwrap(),
            fail: std::sync::atomic::AtomicBool::new(false),
            fail_reads: std::sync::atomic::AtomicBool::new(false),
        });
        let store: Arc<dyn TokenStore> = flaky.clone();
        let secret = [9u8; 32];
        let v = service_vault(store.clone(), &secret);
        v.create(
            "a",
            &pw("local"),
            grant("rt-1"),
            AccountMeta::default(),
            false,
        )
        .await
        .unwrap();
        let mut events = v.subscribe();
        let bg = v.unlock_service("a").await.unwrap();
        flaky.fail.store(true, Ordering::SeqCst);
        let e = v.store_rotated(&bg, pw("rt-2")).await.unwrap_err();
        assert!(matches!(e, VaultError::Store(_)), "{e}");
        // Memory holds the new token; the disk the spent one.
        assert_eq!(token(&bg), "rt-2");
        assert!(bg.unsaved_for().is_some());
        match events.try_recv() {
            Ok(GrantEvent::RotationNotSaved { account, reason }) => {
                assert_eq!(account, "a");
                assert!(reason.contains("No space left"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A password login reads the (older) record again, the slow way
        // (no verifier cached after the service unlock): memory stays.
        let u = v.unlock("a", &pw("local"), P1).await.unwrap();
        assert_eq!(token(&u), "rt-2");
        assert_eq!(token(&v.unlock_service("a").await.unwrap()), "rt-2");
        // Rotated again while the disk is still full: one event, not two.
        assert!(v.store_rotated(&u, pw("rt-3")).await.is_err());
        assert_eq!(token(&bg), "rt-3");
        assert!(matches!(
            events.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ));
        // A store that cannot even be read: a password already seen opens
        // the grant in memory; another is not checked against anything.
        flaky.fail_reads.store(true, Ordering::SeqCst);
        assert_eq!(
            token(&v.unlock("a", &pw("local"), P1).await.unwrap()),
            "rt-3"
        );
        assert_eq!(token(&v.unlock_service("a").await.unwrap()), "rt-3");
        assert!(matches!(
            v.unlock("a", &pw("other"), P2).await,
            Err(VaultError::Store(_))
        ));
        flaky.fail_reads.store(false, Ordering::SeqCst);
        // Room again.
        flaky.fail.store(false, Ordering::SeqCst);
        assert!(v.save_unsaved(&u).await.unwrap());
        assert!(!v.save_unsaved(&u).await.unwrap(), "nothing left to save");
        assert!(bg.unsaved_for().is_none());
        assert!(matches!(
            events.try_recv(),
            Ok(GrantEvent::RotationSaved { account, .. }) if account == "a"
        ));
        let fresh = service_vault(store, &secret);
        assert_eq!(token(&fresh.unlock_service("a").await.unwrap()), "rt-3");
    }
}
