//! Account metadata kept in memory and written behind: a [`TokenStore`]
//! in front of another whose metadata writes ([`TokenStore::save_meta`])
//! land in memory and reach the store underneath only when
//! [`MetaCache::flush`] runs (the server does every few seconds, at
//! shutdown, and when the cache is dropped).
//!
//! Metadata (`last_login_at`, `last_error`, ...) changes on every login;
//! written through, each login cost a read, an encode and a write of the
//! store. Only those changing fields wait: a record that is new here, or
//! whose provider, upstream user, creation time or flow changed (an
//! account added, imported or authorized), is written at once, as
//! before; so is a new last-refresh time (`refreshed_at`, once an hour per
//! account at most), and durably, because the service's start decides by
//! it whether a grant needs refreshing (a crash loop must not refresh
//! every grant at each start). Reads ([`TokenStore::load_meta`], [`TokenStore::accounts`]) go
//! through the cache first, so the status page and `mailbridge account
//! list` (through the control socket) see the latest values before they
//! are written. Grants are not cached: every grant call goes straight to
//! the store underneath, as durable as before.
//!
//! What a crash (`kill -9`, power loss) loses: metadata changed since the
//! last flush, i.e. at most one flush interval of it, plus whatever the
//! store underneath had not yet made durable. Never a grant. What a shared
//! store (PostgreSQL) offers its instances (the refresh lock, the shared
//! counters) passes straight through.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use super::{AccountMeta, SealedGrant, StoreError, TokenStore};

/// One account's metadata as the cache holds it.
struct Entry {
    meta: AccountMeta,
    /// Changed since it was last written to the store underneath; the
    /// number of the change, so that a flush clears only what it wrote.
    dirty: Option<u64>,
}

/// The write-behind cache of account metadata over `inner`.
pub struct MetaCache {
    inner: Arc<dyn TokenStore>,
    /// Metadata read or written since start, by account.
    entries: Mutex<HashMap<String, Entry>>,
    /// Numbers the changes (see [`Entry::dirty`]).
    changes: std::sync::atomic::AtomicU64,
    /// Held while a flush writes and while an account is removed, so a
    /// flush cannot write back the metadata of an account removed
    /// meanwhile.
    writing: Mutex<()>,
    /// Writes made to the store underneath by flushes (for tests and the
    /// benchmark's curiosity).
    written: std::sync::atomic::AtomicU64,
}

impl MetaCache {
    /// A cache in front of `inner`, empty.
    pub fn new(inner: Arc<dyn TokenStore>) -> MetaCache {
        MetaCache {
            inner,
            entries: Mutex::new(HashMap::new()),
            changes: std::sync::atomic::AtomicU64::new(0),
            writing: Mutex::new(()),
            written: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The store underneath.
    pub fn inner(&self) -> &Arc<dyn TokenStore> {
        &self.inner
    }

    /// How many accounts have metadata not yet written.
    pub fn pending(&self) -> usize {
        self.lock().values().filter(|e| e.dirty.is_some()).count()
    }

    /// How many metadata records flushes have written so far.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes every changed record to the store underneath: only the
    /// fields a login or a refresh changes, into the record as the store
    /// has it now (so a change written there meanwhile by someone else,
    /// a command or another instance sharing the store, is kept; the
    /// later last-login time wins). A record that cannot be written stays
    /// pending (and is retried by the next flush); the first error is
    /// returned. Blocking: the store's own speed.
    pub fn flush(&self) -> Result<usize, StoreError> {
        self.flush_with(None)
    }

    /// [`MetaCache::flush`], with the record of `durable` written last and
    /// durably ([`TokenStore::save_meta_durably`]; a store's flush covers
    /// what was written before it, so one flush serves the batch).
    fn flush_with(&self, durable: Option<&str>) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch: Vec<(String, AccountMeta, u64)> = self
            .lock()
            .iter()
            .filter_map(|(k, e)| e.dirty.map(|n| (k.clone(), e.meta.clone(), n)))
            .collect();
        batch.sort_by_key(|(account, _, _)| Some(account.as_str()) == durable);
        let mut first_error = None;
        let mut done = 0;
        for (account, meta, change) in batch {
            let merged = self.inner.load_meta(&account).map(|stored| match stored {
                Some(mut stored) => {
                    stored.last_login_at = stored.last_login_at.max(meta.last_login_at);
                    stored.last_error = meta.last_error.clone();
                    stored.access_expires_at = meta.access_expires_at;
                    stored.refreshed_at = stored.refreshed_at.max(meta.refreshed_at);
                    if meta.smtp_ehlo.is_some() {
                        stored.smtp_ehlo = meta.smtp_ehlo.clone();
                    }
                    stored
                }
                None => meta.clone(),
            });
            let save = |m: AccountMeta| {
                if Some(account.as_str()) == durable {
                    self.inner.save_meta_durably(&account, &m)
                } else {
                    self.inner.save_meta(&account, &m)
                }
                .map(|()| m)
            };
            match merged.and_then(save) {
                Ok(merged) => {
                    done += 1;
                    self.written
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Only if nothing changed it since it was read above;
                    // then it is the store's record.
                    if let Some(e) = self.lock().get_mut(&account)
                        && e.dirty == Some(change)
                    {
                        e.meta = merged;
                        e.dirty = None;
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for MetaCache {
    /// The last chance for what is still pending (a process ending without
    /// the server's shutdown, a command's vault going away).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %crate::report::chain(&e), "cannot write the accounts' metadata to the store; the last changes are lost");
        }
    }
}

impl TokenStore for MetaCache {
    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
        self.inner.load_grant(account)
    }

    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError> {
        self.inner.swap_grant(account, expected, new)
    }

    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        if let Some(e) = self.lock().get(account) {
            return Ok(Some(e.meta.clone()));
        }
        // Not while a removal is under way, which would leave the removed
        // account's record here.
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let loaded = self.inner.load_meta(account)?;
        if let Some(meta) = &loaded {
            // A write that came in meanwhile is newer: keep it.
            self.lock().entry(account.to_owned()).or_insert(Entry {
                meta: meta.clone(),
                dirty: None,
            });
        }
        Ok(loaded)
    }

    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        let (only_changing_fields, refreshed) = match self.lock().get(account) {
            Some(e) => (
                same_account(&e.meta, meta),
                e.meta.refreshed_at != meta.refreshed_at,
            ),
            None => (false, meta.refreshed_at.is_some()),
        };
        if !only_changing_fields {
            // Written through; a flush under way cannot then write an
            // older copy over it.
            let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
            if refreshed {
                self.inner.save_meta_durably(account, meta)?;
            } else {
                self.inner.save_meta(account, meta)?;
            }
            self.lock().insert(
                account.to_owned(),
                Entry {
                    meta: meta.clone(),
                    dirty: None,
                },
            );
            return Ok(());
        }
        let change = self
            .changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.lock().insert(
            account.to_owned(),
            Entry {
                meta: meta.clone(),
                dirty: Some(change),
            },
        );
        if refreshed {
            // A refresh is rare (once an hour per account at most, a
            // login's or the background's) and the next start decides by
            // it whether to refresh again: written now, merged as a flush
            // merges, and durably.
            self.flush_with(Some(account))?;
        }
        Ok(())
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = self.lock().remove(account);
        let removed = self.inner.remove(account)?;
        Ok(removed || cached.is_some_and(|e| e.dirty.is_some()))
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    fn lock_refresh(&self, account: &str) -> super::LockFuture {
        self.inner.lock_refresh(account)
    }

    fn shared_counters(&self) -> Option<&dyn super::SharedCounters> {
        self.inner.shared_counters()
    }

    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        let mut names: BTreeSet<String> = self.inner.accounts()?.into_iter().collect();
        names.extend(
            self.lock()
                .iter()
                .filter(|(_, e)| e.dirty.is_some())
                .map(|(k, _)| k.clone()),
        );
        Ok(names.into_iter().collect())
    }
}

/// Whether `a` and `b` differ at most in the fields a login or a refresh
/// changes (last login, last error, access token expiry).
fn same_account(a: &AccountMeta, b: &AccountMeta) -> bool {
    let AccountMeta {
        provider,
        upstream_user,
        created_at,
        flow,
        access_expires_at: _,
        last_login_at: _,
        last_error: _,
        refreshed_at: _,
        smtp_ehlo: _,
    } = a;
    *provider == b.provider
        && *upstream_user == b.upstream_user
        && *created_at == b.created_at
        && *flow == b.flow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn meta(at: u64) -> AccountMeta {
        AccountMeta {
            provider: "p".into(),
            last_login_at: Some(at),
            ..AccountMeta::default()
        }
    }

    #[test]
    fn writes_wait_for_a_flush_and_reads_see_them_at_once() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let cache = MetaCache::new(inner.clone());
        // A new record is written at once...
        cache.save_meta("alice", &meta(4)).unwrap();
        assert_eq!(inner.load_meta("alice").unwrap(), Some(meta(4)));
        // ...a login's changes wait.
        cache.save_meta("alice", &meta(5)).unwrap();
        cache.save_meta("alice", &meta(6)).unwrap();
        assert_eq!(inner.load_meta("alice").unwrap(), Some(meta(4)));
        assert_eq!(cache.load_meta("alice").unwrap(), Some(meta(6)));
        assert_eq!(cache.accounts().unwrap(), vec!["alice".to_string()]);
        assert_eq!(cache.pending(), 1);
        assert_eq!(cache.flush().unwrap(), 1);
        assert_eq!(inner.load_meta("alice").unwrap(), Some(meta(6)));
        assert_eq!(cache.pending(), 0);
        // Nothing changed: nothing written.
        assert_eq!(cache.flush().unwrap(), 0);
        assert_eq!(cache.written(), 1);
        // Another flow (a reauthorization) is written at once.
        let reauthorized = AccountMeta {
            flow: Some("device_code".into()),
            ..meta(7)
        };
        cache.save_meta("alice", &reauthorized).unwrap();
        assert_eq!(inner.load_meta("alice").unwrap(), Some(reauthorized));
        assert_eq!(cache.pending(), 0);
    }

    #[test]
    fn a_refresh_is_written_at_once_and_merged() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let cache = MetaCache::new(inner.clone());
        cache.save_meta("alice", &meta(4)).unwrap();
        // A login's change waits; a refresh writes it and the refresh time.
        cache.save_meta("alice", &meta(5)).unwrap();
        // Meanwhile another instance sharing the store saw a later login.
        inner.save_meta("alice", &meta(9)).unwrap();
        let refreshed = AccountMeta {
            refreshed_at: Some(100),
            ..meta(6)
        };
        cache.save_meta("alice", &refreshed).unwrap();
        assert_eq!(cache.pending(), 0);
        let stored = inner.load_meta("alice").unwrap().unwrap();
        assert_eq!(stored.refreshed_at, Some(100));
        assert_eq!(stored.last_login_at, Some(9), "the later login is kept");
        // The same refresh time again: it waits like any login's change.
        cache
            .save_meta(
                "alice",
                &AccountMeta {
                    refreshed_at: Some(100),
                    ..meta(10)
                },
            )
            .unwrap();
        assert_eq!(cache.pending(), 1);
    }

    #[test]
    fn reads_fall_through_and_removal_drops_pending_writes() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        inner.save_meta("bob", &meta(1)).unwrap();
        let cache = MetaCache::new(inner.clone());
        assert_eq!(cache.load_meta("bob").unwrap(), Some(meta(1)));
        assert_eq!(cache.load_meta("nobody").unwrap(), None);
        cache.save_meta("carol", &meta(2)).unwrap();
        cache.save_meta("carol", &meta(3)).unwrap();
        assert!(cache.remove("carol").unwrap());
        assert!(cache.remove("bob").unwrap());
        cache.flush().unwrap();
        assert_eq!(inner.load_meta("carol").unwrap(), None);
        assert_eq!(inner.load_meta("bob").unwrap(), None);
        assert!(cache.accounts().unwrap().is_empty());
    }

    #[test]
    fn a_flush_keeps_what_another_writer_changed_in_the_store() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let cache = MetaCache::new(inner.clone());
        cache.save_meta("alice", &meta(4)).unwrap();
        cache.save_meta("alice", &meta(5)).unwrap();
        // Another instance (or a command) reauthorizes meanwhile, and
        // logs in later than we did.
        let elsewhere = AccountMeta {
            flow: Some("device_code".into()),
            ..meta(9)
        };
        inner.save_meta("alice", &elsewhere).unwrap();
        cache.flush().unwrap();
        let stored = inner.load_meta("alice").unwrap().unwrap();
        assert_eq!(stored.flow.as_deref(), Some("device_code"));
        assert_eq!(stored.last_login_at, Some(9), "the later login wins");
        assert_eq!(cache.load_meta("alice").unwrap(), Some(stored));
    }

    #[test]
    fn what_a_shared_store_offers_passes_through() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let cache = MetaCache::new(inner.clone());
        assert_eq!(cache.is_shared(), inner.is_shared());
        assert_eq!(
            cache.shared_counters().is_some(),
            inner.shared_counters().is_some()
        );
    }

    #[test]
    fn dropping_the_cache_flushes() {
        let inner: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
        let cache = MetaCache::new(inner.clone());
        cache.save_meta("alice", &meta(8)).unwrap();
        cache.save_meta("alice", &meta(9)).unwrap();
        assert_eq!(inner.load_meta("alice").unwrap(), Some(meta(8)));
        drop(cache);
        assert_eq!(inner.load_meta("alice").unwrap(), Some(meta(9)));
    }
}
