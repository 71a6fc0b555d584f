//! The control socket: `<state_dir>/control.sock`, through which
//! `mailbridge account ...` uses the store while `mailbridge run` holds it
//! (sled allows one process per store). The messages are
//! [`crate::store::control`]'s; this module moves them.
//!
//! Who may connect: the socket is mode 0600 in the 0700 state directory,
//! and a peer whose user is neither the state directory's owner nor root
//! is dropped before it is read.
//!
//! Besides store calls, a connection may ask for a protocol trace
//! (`mailbridge trace`): the service answers, then streams the trace's
//! events, one JSON line each, until the command goes away
//! ([`TraceStream`] is the command's end).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::store::control::{self, MAX_LINE, Request, SOCKET_NAME};
use crate::store::{AccountMeta, SealedGrant, StoreError, TokenStore};
use crate::trace::{Desk, Event};

/// How the control socket asks the service to read its configuration
/// again: each request carries where the outcome goes (what is in force
/// now, or why the new configuration was refused).
pub type ReloadRequests = tokio::sync::mpsc::Sender<super::ReloadReply>;

/// The listening control socket of a running service. Dropping it stops
/// serving and removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    /// Binds `<state_dir>/control.sock` (replacing a stale one: the caller
    /// holds the store's lock, so no other service is using it) and serves
    /// `store` on it, traces from `traces` and reloads through `reloads`
    /// when given.
    pub fn bind(
        state_dir: &Path,
        store: Arc<dyn TokenStore>,
        traces: Option<Desk>,
        reloads: Option<ReloadRequests>,
    ) -> std::io::Result<ControlSocket> {
        let path = state_dir.join(SOCKET_NAME);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let owner = std::fs::metadata(state_dir)?.uid();
        let task = tokio::spawn(accept_loop(
            listener,
            Services {
                store,
                traces: traces.map(Arc::new),
                reloads,
            },
            owner,
            path.clone(),
        ));
        tracing::info!(socket = %path.display(), "control socket ready (account commands work while running)");
        Ok(ControlSocket { path, task })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a control connection may ask for.
#[derive(Clone)]
struct Services {
    store: Arc<dyn TokenStore>,
    traces: Option<Arc<Desk>>,
    reloads: Option<ReloadRequests>,
}

async fn accept_loop(listener: UnixListener, services: Services, owner: u32, path: PathBuf) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !matches!(uid, Some(u) if u == owner || u == 0) {
            tracing::warn!(peer_uid = ?uid, "control socket: peer is neither the state directory's owner nor root; dropped");
            // Say why, so the command does not report a vanished service.
            let denied = StoreError::Denied { path: path.clone() }.to_string();
            let line = control::error_line(&denied);
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
            });
            continue;
        }
        let services = services.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, services).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

/// Answers requests, one line each, until the peer closes (or streams a
/// trace, when one is asked for).
async fn serve(stream: UnixStream, services: Services) -> std::io::Result<()> {
    let Services {
        store,
        traces,
        reloads,
    } = services;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read.take(u64::MAX));
    let mut line = Vec::new();
    loop {
        line.clear();
        read.get_mut().set_limit(MAX_LINE as u64 + 1);
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
        if let Some(account) = control::lock_request(&line) {
            let read = read.into_inner().into_inner();
            return serve_lock(read, write, store, &account).await;
        }
        if let Some(account) = control::trace_request(&line) {
            let Some(desk) = &traces else {
                let line = control::error_line("this service does not serve traces");
                return write.write_all(&line).await;
            };
            let read = read.into_inner().into_inner();
            return serve_trace(read, write, desk, &account).await;
        }
        if control::reload_request(&line) {
            let out = match reload(reloads.as_ref()).await {
                Ok(note) => control::ok_line(serde_json::json!({ "result": note })),
                Err(reason) => control::error_line(&reason),
            };
            write.write_all(&out).await?;
            continue;
        }
        let store = store.clone();
        let request = std::mem::take(&mut line);
        let out =
            tokio::task::spawn_blocking(move || control::answer_line(store.as_ref(), &request))
                .await
                .map_err(std::io::Error::other)?;
        write.write_all(&out).await?;
    }
}

/// Asks the service to reload and waits for the outcome.
async fn reload(reloads: Option<&ReloadRequests>) -> Result<String, String> {
    const NOT_NOW: &str = "this service does not reload its configuration now (it is shutting down, or cannot listen for SIGHUP: see its log); nothing was reloaded";
    let Some(reloads) = reloads else {
        return Err(NOT_NOW.into());
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if reloads.send(tx).await.is_err() {
        return Err(NOT_NOW.into());
    }
    rx.await.unwrap_or_else(|_| Err(NOT_NOW.into()))
}

/// Holds the service's refresh lock of `account` for the command, from
/// the `Ok` until the command closes the connection (or sends anything),
/// [`control::LOCK_HOLD_MAX`] at most.
async fn serve_lock(
    mut read: tokio::net::unix::OwnedReadHalf,
    mut write: tokio::net::unix::OwnedWriteHalf,
    store: Arc<dyn TokenStore>,
    account: &str,
) -> std::io::Result<()> {
    let mut probe = [0u8; 1];
    let lock = tokio::select! {
        lock = store.lock_refresh(account) => lock,
        // The command gave up waiting.
        _ = read.read(&mut probe) => return Ok(()),
    };
    let lock = match lock {
        Ok(lock) => lock,
        Err(e) => return write.write_all(&control::error_line(&e.to_string())).await,
    };
    write
        .write_all(&control::ok_line(serde_json::Value::Null))
        .await?;
    tracing::debug!(%account, "refresh lock held for a command");
    let held = tokio::time::timeout(control::LOCK_HOLD_MAX, read.read(&mut probe)).await;
    drop(lock);
    if held.is_err() {
        tracing::warn!(%account, secs = control::LOCK_HOLD_MAX.as_secs(), "a command held the refresh lock too long; released");
    }
    Ok(())
}

/// Streams a trace of `account` until the command closes the connection
/// (or sends anything). A command that reads slowly loses events and is
/// told how many, rather than the service keeping them.
async fn serve_trace(
    mut read: tokio::net::unix::OwnedReadHalf,
    mut write: tokio::net::unix::OwnedWriteHalf,
    desk: &Desk,
    account: &str,
) -> std::io::Result<()> {
    let mut watch = match desk.start(account) {
        Ok((name, watch)) => {
            write
                .write_all(&control::ok_line(serde_json::json!({ "account": name })))
                .await?;
            watch
        }
        Err(reason) => return write.write_all(&control::error_line(&reason)).await,
    };
    let mut probe = [0u8; 1];
    loop {
        let event = tokio::select! {
            event = watch.events.recv() => event,
            _ = read.read(&mut probe) => None,
        };
        let Some(event) = event else {
            tracing::info!("protocol trace ended");
            return Ok(());
        };
        let dropped = watch.take_dropped();
        if dropped > 0 {
            let note = Event {
                session: event.session,
                ms: event.ms,
                what: crate::trace::What::Dropped { count: dropped },
            };
            write.write_all(&event_line(&note)).await?;
        }
        write.write_all(&event_line(&event)).await?;
    }
}

fn event_line(event: &Event) -> Vec<u8> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    line
}

/// The command's end of a trace (`mailbridge trace`).
pub struct TraceStream {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    /// Kept open: closing it tells the service to stop.
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl TraceStream {
    /// Asks the service whose state directory is `state_dir` to trace
    /// `account`; the account's name as the service knows it, and the
    /// stream. Refusals (no such account, a peer not allowed) come back
    /// as the service's words.
    pub async fn start(
        state_dir: &Path,
        account: &str,
    ) -> Result<(String, TraceStream), StoreError> {
        let (answer, lines, write) = ask(
            state_dir,
            &Request::Trace {
                account: account.to_string(),
            },
        )
        .await?;
        #[derive(serde::Deserialize)]
        struct Started {
            account: String,
        }
        let started: Started = control::answer_value(&answer)?;
        Ok((
            started.account,
            TraceStream {
                lines,
                _write: write,
            },
        ))
    }

    /// The next event; `None` when the service ended the trace (it
    /// stopped).
    pub async fn next(&mut self) -> std::io::Result<Option<Event>> {
        match self.lines.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line).map(Some).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "unreadable trace event (are the command and the service the same mailbridge version?)",
                )
            }),
        }
    }
}

/// Connects to the service whose state directory is `state_dir`, sends
/// `request`, and reads the first answer line; the connection stays open
/// for what follows.
async fn ask(
    state_dir: &Path,
    request: &Request,
) -> Result<
    (
        String,
        tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
        tokio::net::unix::OwnedWriteHalf,
    ),
    StoreError,
> {
    let path = state_dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => StoreError::Denied { path: path.clone() },
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            StoreError::Remote {
                reason: format!(
                    "no mailbridge is running with the state directory {} (nothing answers on {}); start `mailbridge run` with this configuration, or give --state-dir",
                    state_dir.display(),
                    path.display()
                ),
            }
        }
        _ => StoreError::Remote {
            reason: format!("cannot connect to {}: {e}", path.display()),
        },
    })?;
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let request = control::request_line(request)?;
    // A service that refused this peer said why before closing: read that
    // even when the write failed.
    let _ = write.write_all(&request).await;
    let answer = lines
        .next_line()
        .await
        .map_err(|e| StoreError::Remote {
            reason: format!("the control socket failed: {e}"),
        })?
        .ok_or_else(|| StoreError::Remote {
            reason: "the service closed the control socket (did it stop?)".into(),
        })?;
    Ok((answer, lines, write))
}

/// Asks the service whose state directory is `state_dir` to read its
/// configuration again (as SIGHUP does) and waits until it has: what is
/// in force now, or why the new configuration was refused (the previous
/// one then stays in force).
pub async fn request_reload(state_dir: &Path) -> Result<String, StoreError> {
    let (answer, _, _) = ask(state_dir, &Request::Reload).await?;
    #[derive(serde::Deserialize)]
    struct Reloaded {
        result: String,
    }
    let reloaded: Reloaded = control::answer_value(&answer)?;
    Ok(reloaded.result)
}

/// A [`TokenStore`] that is the running service's, reached through its
/// control socket (blocking calls, as the trait's are).
pub struct RemoteStore {
    conn: Mutex<(BufReader<StdUnixStream>, StdUnixStream)>,
    /// The socket, for connections of their own (refresh locks).
    socket: PathBuf,
}

impl RemoteStore {
    /// Connects to `<state_dir>/control.sock`.
    pub fn connect(state_dir: &Path) -> std::io::Result<RemoteStore> {
        let stream = StdUnixStream::connect(state_dir.join(SOCKET_NAME))?;
        // Argon2 runs on this side; the service only stores. A minute
        // covers a busy disk.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(RemoteStore {
            conn: Mutex::new((reader, stream)),
            socket: state_dir.join(SOCKET_NAME),
        })
    }

    fn call<T: serde::de::DeserializeOwned>(&self, request: Request) -> Result<T, StoreError> {
        let remote = |e: std::io::Error| StoreError::Remote {
            reason: format!("the control socket failed: {e}"),
        };
        let line = control::request_line(&request)?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let (reader, writer) = &mut *conn;
        let mut answer = String::new();
        if let Err(e) = writer.write_all(&line) {
            // A service that refused this peer said why before closing.
            if reader.read_line(&mut answer).unwrap_or(0) > 0 {
                return control::answer_value(&answer);
            }
            return Err(remote(e));
        }
        if reader.read_line(&mut answer).map_err(remote)? == 0 {
            return Err(StoreError::Remote {
                reason: "the service closed the control socket (did it stop?)".into(),
            });
        }
        control::answer_value(&answer)
    }
}

impl TokenStore for RemoteStore {
    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
        self.call(Request::LoadGrant {
            account: account.into(),
        })
    }

    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError> {
        self.call(Request::SwapGrant {
            account: account.into(),
            expected: expected.cloned(),
            new: new.clone(),
        })
    }

    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.call(Request::LoadMeta {
            account: account.into(),
        })
    }

    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.call(Request::SaveMeta {
            account: account.into(),
            meta: meta.clone(),
        })
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        self.call(Request::Remove {
            account: account.into(),
        })
    }

    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        self.call(Request::Accounts)
    }

    /// The service's own refresh lock of `account`, held (on a connection
    /// of its own) until the returned lock drops: the service and this
    /// command never refresh one grant at once.
    fn lock_refresh(&self, account: &str) -> crate::store::LockFuture {
        let socket = self.socket.clone();
        let request = control::request_line(&Request::LockRefresh {
            account: account.to_owned(),
        });
        Box::pin(async move {
            let request = request?;
            let remote = |e: std::io::Error| StoreError::Remote {
                reason: format!("the control socket failed: {e}"),
            };
            let mut stream = UnixStream::connect(&socket).await.map_err(remote)?;
            stream.write_all(&request).await.map_err(remote)?;
            let mut answer = Vec::new();
            let mut reader = tokio::io::BufReader::new(&mut stream);
            // The service's refresh in progress, if any, ends within its
            // refresh timeout.
            tokio::time::timeout(
                control::LOCK_HOLD_MAX,
                reader.read_until(b'\n', &mut answer),
            )
            .await
            .map_err(|_| StoreError::Remote {
                reason: "the service did not give up the refresh lock in time".into(),
            })?
            .map_err(remote)?;
            if answer.is_empty() {
                return Err(StoreError::Remote {
                    reason: "the service closed the control socket (did it stop?)".into(),
                });
            }
            control::answer_value::<serde_json::Value>(&String::from_utf8_lossy(&answer))?;
            Ok(crate::store::RefreshLock::held_by(Box::new(stream)))
        })
    }
}
