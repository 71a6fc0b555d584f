//! The PostgreSQL backend of [`TokenStore`]: one database that many
//! mailbridge instances share (`[server] store = "postgres://..."`).
//!
//! - **Records.** The same sealed records as the sled store, as JSON in
//!   `jsonb` columns: `mailbridge_grants` (account -> [`SealedGrant`]) and
//!   `mailbridge_meta` (account -> [`AccountMeta`]). The database never
//!   sees a token in clear. [`TokenStore::swap_grant`] is one conditional
//!   statement (`UPDATE ... WHERE record = expected`, or `INSERT ... ON
//!   CONFLICT DO NOTHING`), so two instances writing at once cannot both
//!   win; a commit is durable as PostgreSQL's commits are.
//! - **Schema.** Created and migrated when the store opens, inside one
//!   transaction under a transaction-level advisory lock (instances that
//!   start together migrate once); `mailbridge_schema_version` lists the
//!   versions applied. A database newer than this build is refused.
//! - **Refresh lock.** [`TokenStore::lock_refresh`] takes a session-level
//!   advisory lock (`pg_advisory_lock`, keyed by a hash of the account) on
//!   a connection of its own, released when the guard drops the
//!   connection, or by the server when the process dies (its connection
//!   closes). One refresh per account at a time across every instance.
//! - **Backoff.** Failed-login counters shared by the instances
//!   (`mailbridge_backoff`, keyed by hashes), see [`SharedCounters`].
//! - **Spool.** With `[spool] store = "database"`, the spool's messages
//!   (`mailbridge_spool`, see [`crate::spool::database`]).
//! - **Threads.** The trait is synchronous and is called from async code,
//!   so the client runs on a small runtime of its own (one thread): a call
//!   hands its query to that runtime and waits for the answer, as a call
//!   to sled waits for the disk. Calls share one connection (pipelined),
//!   reopened when it breaks; after a failed connection attempt, calls in
//!   the next second fail at once with the same reason instead of each
//!   waiting for its own attempt.
//!
//! Passwords: the URL's, or one given separately ([`PgOptions`]); neither
//! appears in an error, a log line or a Debug output (the URL is shown
//! redacted, [`super::StoreUrl`]).

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::{
    AccountMeta, CounterRule, LockFuture, RefreshLock, SealedGrant, SharedCounters, StoreError,
    StoreUrl, TokenStore, decode,
};

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = 3;

/// Each version's statements, applied in order to a database behind.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE mailbridge_grants (
             account TEXT PRIMARY KEY,
             record JSONB NOT NULL,
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         CREATE TABLE mailbridge_meta (
             account TEXT PRIMARY KEY,
             meta JSONB NOT NULL
         );",
    ),
    (
        2,
        "CREATE TABLE mailbridge_backoff (
             key TEXT PRIMARY KEY,
             count INTEGER NOT NULL,
             until TIMESTAMPTZ NOT NULL
         );
         CREATE INDEX mailbridge_backoff_until ON mailbridge_backoff (until);",
    ),
    (
        3,
        "CREATE TABLE mailbridge_spool (
             id TEXT PRIMARY KEY,
             area TEXT NOT NULL CHECK (area IN ('queue', 'failed')),
             envelope JSONB NOT NULL,
             content BYTEA NOT NULL,
             received_at BIGINT NOT NULL,
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         CREATE INDEX mailbridge_spool_area ON mailbridge_spool (area, received_at, id);",
    ),
];

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed connection attempt, calls fail at once for this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The advisory lock key of schema migrations.
const MIGRATION_LOCK: i64 = 0x6d61_696c_6272_0001;

/// How to reach the database, beyond its URL.
#[derive(Default)]
pub struct PgOptions {
    /// The password, when not in the URL (from `store_password_file` or
    /// the environment).
    pub password: Option<SecretString>,
    /// PEM CA certificates for the database's TLS certificate (default:
    /// the platform's roots).
    pub ca_file: Option<PathBuf>,
    /// How long a refresh waits for another instance's refresh of the same
    /// account before giving up (temporarily).
    pub lock_wait: Duration,
}

/// The variable that may hold the database password (before
/// `PGPASSWORD`, after `store_password_file`).
pub const PASSWORD_ENV: &str = "MAILBRIDGE_STORE_PASSWORD";

impl PgOptions {
    /// The options `[server]` gives: the password from
    /// `store_password_file` (its first line), else
    /// `$MAILBRIDGE_STORE_PASSWORD`, else `$PGPASSWORD` (else the URL's);
    /// `store_ca_file`; a refresh waits for another instance's as long as
    /// a token request may take, and half a minute more.
    pub fn from_server(server: &crate::config::ServerConfig) -> Result<PgOptions, StoreError> {
        let password = match &server.store_password_file {
            Some(path) => {
                let text =
                    zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                        StoreError::Io {
                            path: path.clone(),
                            source,
                        }
                    })?);
                let line = text.lines().next().unwrap_or("");
                Some(SecretString::from(line.to_owned()))
            }
            None => [PASSWORD_ENV, "PGPASSWORD"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|p| !p.is_empty()))
                .map(SecretString::from),
        };
        Ok(PgOptions {
            password,
            ca_file: server.store_ca_file.clone(),
            lock_wait: server.refresh_timeout() + Duration::from_secs(30),
        })
    }
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("lock_wait", &self.lock_wait)
            .finish()
    }
}

/// A [`TokenStore`] in a PostgreSQL database.
pub struct PgStore {
    inner: Arc<Inner>,
    /// The client's runtime; shut down (without waiting) when dropped.
    rt: Option<tokio::runtime::Runtime>,
}

pub(crate) struct Inner {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The URL, password redacted.
    location: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    /// The last failed connection attempt: when, and why.
    down: Mutex<Option<(Instant, String)>>,
    lock_wait: Duration,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.inner.location)
            .finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl PgStore {
    /// Connects to the database at `url`, creating or migrating the schema.
    pub fn open(url: &StoreUrl, opts: PgOptions) -> Result<PgStore, StoreError> {
        let location = url.to_string();
        let fail = |reason: String| StoreError::Database {
            location: location.clone(),
            reason,
        };
        let mut config = tokio_postgres::Config::from_str(url.expose())
            .map_err(|e| fail(format!("unusable URL ({e})")))?;
        if let Some(p) = &opts.password {
            config.password(p.expose_secret().as_bytes());
        }
        config
            .application_name("mailbridge")
            // The migrations' "already exists, skipping" notices are noise.
            .options("-c client_min_messages=warning")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let tls = crate::net::tls::client_config(opts.ca_file.as_deref())
            .map_err(|e| fail(format!("TLS setup: {e}")))?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mailbridge-db")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the database client's thread: {e}")))?;
        let store = PgStore {
            inner: Arc::new(Inner {
                config,
                tls,
                location: location.clone(),
                client: tokio::sync::Mutex::new(None),
                down: Mutex::new(None),
                lock_wait: if opts.lock_wait.is_zero() {
                    Duration::from_secs(330)
                } else {
                    opts.lock_wait
                },
            }),
            rt: Some(rt),
        };
        store.call(|inner| async move { inner.migrate().await })?;
        Ok(store)
    }

    /// The database URL, password redacted.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
            .handle()
    }

    /// Runs `f` on the client's runtime and waits for its answer (bounded
    /// by [`CALL_TIMEOUT`]).
    pub(crate) fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let result = match tokio::time::timeout(CALL_TIMEOUT, f(inner.clone())).await {
                Ok(r) => r,
                Err(_) => Err(inner.fail(format!("no answer within {} s", CALL_TIMEOUT.as_secs()))),
            };
            let _ = tx.send(result);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(self.inner.fail("the database client stopped".into())))
    }
}

impl Inner {
    pub(crate) fn fail(&self, reason: String) -> StoreError {
        StoreError::Database {
            location: self.location.clone(),
            reason,
        }
    }

    /// The server's message when it sent one, else the client's (neither
    /// holds the password).
    pub(crate) fn db(&self, e: &tokio_postgres::Error) -> StoreError {
        let reason = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => match std::error::Error::source(e) {
                Some(cause) => format!("{e} ({cause})"),
                None => e.to_string(),
            },
        };
        self.fail(reason)
    }

    /// A new connection, its driver running on this runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.config.connect(self.tls.clone()),
        )
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(self.db(&e)),
            Err(_) => {
                return Err(self.fail(format!(
                    "cannot connect within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "token store database connection ended");
            }
        });
        Ok(client)
    }

    /// The shared connection, reopened if it broke.
    pub(crate) async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let lost = slot.take().is_some();
        if let Some((at, reason)) = self
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && at.elapsed() < RETRY_AFTER
        {
            return Err(self.fail(reason.clone()));
        }
        match self.connect().await {
            Ok(c) => {
                let was_down = self
                    .down
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .is_some();
                if lost || was_down {
                    tracing::info!(database = %self.location, "token store database reachable again");
                }
                let c = Arc::new(c);
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                let reason = match &e {
                    StoreError::Database { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                let first = self
                    .down
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .replace((Instant::now(), reason))
                    .is_none();
                if first {
                    tracing::warn!(database = %self.location, error = %e, "token store database unreachable; logins that need it are told to try again later");
                }
                Err(e)
            }
        }
    }

    /// Creates or migrates the schema, then keeps the connection.
    async fn migrate(self: Arc<Self>) -> Result<(), StoreError> {
        let mut client = self.connect().await?;
        let db = |e: tokio_postgres::Error| self.db(&e);
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS mailbridge_schema_version (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db)?;
        let found: Option<i32> = tx
            .query_one("SELECT max(version) FROM mailbridge_schema_version", &[])
            .await
            .map_err(db)?
            .get(0);
        let found = found.unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                location: self.location.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO mailbridge_schema_version (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(db)?;
            tracing::info!(database = %self.location, version, "token store schema migrated");
        }
        tx.commit().await.map_err(db)?;
        *self.client.lock().await = Some(Arc::new(client));
        Ok(())
    }
}

/// An advisory lock key: 64 bits of a hash of `name` in `domain` (each
/// kind of lock its own domain), so two names share a lock only by a
/// 2^-64 chance (and would then only wait for each other).
pub(crate) fn lock_key(domain: &str, name: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    h.update(b"\0");
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    i64::from_be_bytes(first)
}

/// The advisory lock key of `account`'s refresh.
fn refresh_lock_key(account: &str) -> i64 {
    lock_key("mailbridge refresh lock", account)
}

fn encode<T: serde::Serialize>(
    inner: &Inner,
    account: &str,
    value: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| {
        inner.fail(format!(
            "cannot encode the record for account {account}: {e}"
        ))
    })
}

impl PgStore {
    /// One account's JSON record by `sql` (one text column, `$1` the
    /// account), decoded.
    fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        sql: &'static str,
        account: &str,
    ) -> Result<Option<T>, StoreError> {
        let name = account.to_owned();
        let text: Option<String> = self.call(move |inner| async move {
            let c = inner.client().await?;
            let row = c.query_opt(sql, &[&name]).await.map_err(|e| inner.db(&e))?;
            Ok(row.map(|r| r.get(0)))
        })?;
        text.map(|t| decode(account, t.as_bytes())).transpose()
    }
}

impl TokenStore for PgStore {
    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
        self.load_json(
            "SELECT record::text FROM mailbridge_grants WHERE account = $1",
            account,
        )
    }

    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError> {
        let new = encode(&self.inner, account, new)?;
        let expected = expected
            .map(|e| encode(&self.inner, account, e))
            .transpose()?;
        let account = account.to_owned();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            // jsonb equality compares records, not their spelling.
            let rows = match expected {
                None => c
                    .execute(
                        "INSERT INTO mailbridge_grants (account, record) VALUES ($1, $2::text::jsonb)
                         ON CONFLICT (account) DO NOTHING",
                        &[&account, &new],
                    )
                    .await,
                Some(expected) => c
                    .execute(
                        "UPDATE mailbridge_grants SET record = $2::text::jsonb, updated_at = now()
                         WHERE account = $1 AND record = $3::text::jsonb",
                        &[&account, &new, &expected],
                    )
                    .await,
            }
            .map_err(|e| inner.db(&e))?;
            Ok(rows == 1)
        })
    }

    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.load_json(
            "SELECT meta::text FROM mailbridge_meta WHERE account = $1",
            account,
        )
    }

    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        let meta = encode(&self.inner, account, meta)?;
        let account = account.to_owned();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            c.execute(
                "INSERT INTO mailbridge_meta (account, meta) VALUES ($1, $2::text::jsonb)
                 ON CONFLICT (account) DO UPDATE SET meta = EXCLUDED.meta",
                &[&account, &meta],
            )
            .await
            .map_err(|e| inner.db(&e))?;
            Ok(())
        })
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        let account = account.to_owned();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            let row = c
                .query_one(
                    "WITH g AS (DELETE FROM mailbridge_grants WHERE account = $1 RETURNING 1),
                          m AS (DELETE FROM mailbridge_meta WHERE account = $1 RETURNING 1)
                     SELECT (SELECT count(*) FROM g) + (SELECT count(*) FROM m)",
                    &[&account],
                )
                .await
                .map_err(|e| inner.db(&e))?;
            let n: i64 = row.get(0);
            Ok(n > 0)
        })
    }

    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        self.call(move |inner| async move {
            let c = inner.client().await?;
            let rows = c
                .query(
                    "SELECT account FROM mailbridge_grants UNION SELECT account FROM mailbridge_meta",
                    &[],
                )
                .await
                .map_err(|e| inner.db(&e))?;
            let names: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok(names.into_iter().collect())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn shared_counters(&self) -> Option<&dyn SharedCounters> {
        Some(self)
    }

    fn lock_refresh(&self, account: &str) -> LockFuture {
        let inner = self.inner.clone();
        let key = refresh_lock_key(account);
        let task = self.handle().spawn(async move {
            // A connection of its own: the lock belongs to the session,
            // and ends with it.
            let client = inner.connect().await?;
            match tokio::time::timeout(
                inner.lock_wait,
                client.execute("SELECT pg_advisory_lock($1)", &[&key]),
            )
            .await
            {
                Ok(Ok(_)) => Ok(RefreshLock::held_by(Box::new(client))),
                Ok(Err(e)) => Err(inner.db(&e)),
                Err(_) => Err(inner.fail(format!(
                    "another instance has been refreshing this account for more than {} s",
                    inner.lock_wait.as_secs()
                ))),
            }
        });
        let location = self.inner.location.clone();
        Box::pin(async move {
            task.await.unwrap_or_else(|_| {
                Err(StoreError::Database {
                    location,
                    reason: "the database client stopped".into(),
                })
            })
        })
    }
}

impl SharedCounters for PgStore {
    fn count_failure(&self, key: &str, rule: CounterRule) -> Result<(u32, Duration), StoreError> {
        let key = key.to_owned();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            // One statement: two instances counting at once both count.
            let row = c
                .query_one(
                    "WITH n AS (
                         SELECT CASE WHEN b.until IS NULL
                                       OR b.until < now() - make_interval(secs => $2)
                                     THEN 1 ELSE b.count + 1 END AS count
                         FROM (SELECT 1) one
                         LEFT JOIN mailbridge_backoff b ON b.key = $1
                     ), d AS (
                         SELECT count, CASE WHEN count <= $5 THEN 0::float8
                                ELSE LEAST($3 * power(2::float8, count - $5 - 1), $4) END AS secs
                         FROM n
                     )
                     INSERT INTO mailbridge_backoff (key, count, until)
                     SELECT $1, count, now() + make_interval(secs => secs) FROM d
                     ON CONFLICT (key) DO UPDATE SET count = EXCLUDED.count,
                         until = GREATEST(mailbridge_backoff.until, EXCLUDED.until)
                     RETURNING count, GREATEST(EXTRACT(EPOCH FROM until - now())::float8, 0)",
                    &[
                        &key,
                        &rule.forget.as_secs_f64(),
                        &rule.base.as_secs_f64(),
                        &rule.max.as_secs_f64(),
                        &i32::try_from(rule.offset).unwrap_or(i32::MAX),
                    ],
                )
                .await
                .map_err(|e| inner.db(&e))?;
            let count: i32 = row.get(0);
            let secs: f64 = row.get(1);
            Ok((
                u32::try_from(count).unwrap_or(1),
                Duration::from_secs_f64(secs.max(0.0)),
            ))
        })
    }

    fn counters(
        &self,
        keys: &[String],
        forget: Duration,
    ) -> Result<Vec<(String, Duration)>, StoreError> {
        let keys = keys.to_vec();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            let rows = c
                .query(
                    "SELECT key, GREATEST(EXTRACT(EPOCH FROM until - now())::float8, 0)
                     FROM mailbridge_backoff
                     WHERE key = ANY($1) AND until >= now() - make_interval(secs => $2)",
                    &[&keys, &forget.as_secs_f64()],
                )
                .await
                .map_err(|e| inner.db(&e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let secs: f64 = r.get(1);
                    (r.get(0), Duration::from_secs_f64(secs.max(0.0)))
                })
                .collect())
        })
    }

    fn clear_counters(&self, keys: &[String]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.call(move |inner| async move {
            let c = inner.client().await?;
            // Counters forgotten for a day go too.
            c.execute(
                "DELETE FROM mailbridge_backoff
                 WHERE key = ANY($1) OR until < now() - interval '1 day'",
                &[&keys],
            )
            .await
            .map_err(|e| inner.db(&e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_per_account_and_are_stable() {
        assert_eq!(refresh_lock_key("a@x"), refresh_lock_key("a@x"));
        assert_ne!(refresh_lock_key("a@x"), refresh_lock_key("b@x"));
    }

    #[test]
    fn options_debug_hides_the_password() {
        let o = PgOptions {
            password: Some(SecretString::from("s3cret")),
            ..PgOptions::default()
        };
        assert!(!format!("{o:?}").contains("s3cret"));
    }

    #[test]
    fn an_unreachable_database_is_a_database_error_without_the_password() {
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = StoreUrl::parse(&format!(
            "postgres://mb:s3cret@127.0.0.1:{port}/mail?sslmode=disable"
        ))
        .unwrap();
        let err = PgStore::open(&url, PgOptions::default()).expect_err("nobody listens");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Database { .. }), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(msg.contains("mb:***@127.0.0.1"), "{msg}");
    }
}
