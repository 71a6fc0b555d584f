//! The control socket: `<state_dir>/control.sock`, through which
//! `mailbridge account ...` uses the store while `mailbridge run` holds it
//! (sled allows one process per store). The messages are
//! [`crate::store::control`]'s; this module moves them.
//!
//! Who may connect: the socket is mode 0600 in the 0700 state directory,
//! and a peer whose user is neither the state directory's owner nor root
//! is dropped before it is read.

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

/// The listening control socket of a running service. Dropping it stops
/// serving and removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    /// Binds `<state_dir>/control.sock` (replacing a stale one: the caller
    /// holds the store's lock, so no other service is using it) and serves
    /// `store` on it.
    pub fn bind(state_dir: &Path, store: Arc<dyn TokenStore>) -> std::io::Result<ControlSocket> {
        let path = state_dir.join(SOCKET_NAME);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let owner = std::fs::metadata(state_dir)?.uid();
        let task = tokio::spawn(accept_loop(listener, store, owner, path.clone()));
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

async fn accept_loop(
    listener: UnixListener,
    store: Arc<dyn TokenStore>,
    owner: u32,
    path: PathBuf,
) {
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
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, store).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

/// Answers requests, one line each, until the peer closes.
async fn serve(stream: UnixStream, store: Arc<dyn TokenStore>) -> std::io::Result<()> {
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
        let store = store.clone();
        let request = std::mem::take(&mut line);
        let out =
            tokio::task::spawn_blocking(move || control::answer_line(store.as_ref(), &request))
                .await
                .map_err(std::io::Error::other)?;
        write.write_all(&out).await?;
    }
}

/// A [`TokenStore`] that is the running service's, reached through its
/// control socket (blocking calls, as the trait's are).
pub struct RemoteStore {
    conn: Mutex<(BufReader<StdUnixStream>, StdUnixStream)>,
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
}
