//! The store's control protocol: how `mailbridge account ...` reaches the
//! store of a running `mailbridge run`, which holds the store's lock.
//!
//! One JSON object per line each way, one answer per request. Only sealed
//! records and metadata travel: the command seals and unseals on its own
//! side, so no password, key or token crosses the socket. This module is
//! the protocol (messages and what the service does with them); the socket
//! is `net::control`'s.

use serde::{Deserialize, Serialize};

use super::{AccountMeta, SealedGrant, StoreError, TokenStore};

/// The file name of the control socket in the state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line the service reads.
pub const MAX_LINE: usize = 1024 * 1024;

/// One [`TokenStore`] call.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// [`TokenStore::load_grant`].
    LoadGrant {
        /// The account.
        account: String,
    },
    /// [`TokenStore::swap_grant`].
    SwapGrant {
        /// The account.
        account: String,
        /// The record the change was based on.
        expected: Option<SealedGrant>,
        /// The new record.
        new: SealedGrant,
    },
    /// [`TokenStore::load_meta`].
    LoadMeta {
        /// The account.
        account: String,
    },
    /// [`TokenStore::save_meta`].
    SaveMeta {
        /// The account.
        account: String,
        /// The metadata.
        meta: AccountMeta,
    },
    /// [`TokenStore::remove`].
    Remove {
        /// The account.
        account: String,
    },
    /// [`TokenStore::accounts`].
    Accounts,
    /// Not a store call: a protocol trace of an account's new sessions
    /// (`mailbridge trace`). The answer is `Ok` with `{"account": NAME}`
    /// (or the reason it is refused), then one `crate::trace::Event` per
    /// line until the command closes the connection. `net::control` serves
    /// it; [`handle`] refuses it.
    Trace {
        /// The account, or a login name that opens it.
        account: String,
    },
    /// Not a plain store call: [`TokenStore::lock_refresh`] for a command
    /// that refreshes a grant while the service runs (`mailbridge
    /// doctor`). The answer is `Ok` once the service's refresh lock of the
    /// account is held for the command; it is held until the command
    /// closes the connection (or for [`LOCK_HOLD_MAX`] at most).
    /// `net::control` serves it; [`handle`] refuses it.
    LockRefresh {
        /// The account.
        account: String,
    },
    /// Not a store call: read the configuration again, as SIGHUP does,
    /// and answer with the outcome once the reload is done (`mailbridge
    /// reload`, the units' `ExecReload=`). `net::control` serves it;
    /// [`handle`] refuses it.
    Reload,
}

/// Longest a command may hold the service's refresh lock of an account:
/// a refresh takes seconds; a command that hangs must not stop the
/// service's refreshes for long.
pub const LOCK_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// The account a request line asks to lock, when it is a
/// [`Request::LockRefresh`].
pub fn lock_request(line: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Request>(line) {
        Ok(Request::LockRefresh { account }) => Some(account),
        _ => None,
    }
}

/// The account a request line asks to trace, when it is a
/// [`Request::Trace`].
pub fn trace_request(line: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Request>(line) {
        Ok(Request::Trace { account }) => Some(account),
        _ => None,
    }
}

/// Whether a request line asks for a [`Request::Reload`].
pub fn reload_request(line: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Request>(line), Ok(Request::Reload))
}

/// An answer line (with its newline) carrying `value`.
pub fn ok_line(value: serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Response::Ok(value))
        .unwrap_or_else(|_| br#"{"error":"cannot encode the answer"}"#.to_vec());
    out.push(b'\n');
    out
}

/// The answer to a [`Request`]: a value, or the store's error as text.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success, with the call's value (`null` for none).
    Ok(serde_json::Value),
    /// The store refused; its message (which never holds secrets).
    Error(String),
}

/// What the service does with a request.
pub fn handle(store: &dyn TokenStore, request: Request) -> Response {
    fn answer<T: Serialize>(r: Result<T, StoreError>) -> Response {
        match r {
            Ok(v) => match serde_json::to_value(v) {
                Ok(v) => Response::Ok(v),
                Err(e) => Response::Error(format!("cannot encode the answer: {e}")),
            },
            Err(e) => Response::Error(e.to_string()),
        }
    }
    match request {
        Request::LoadGrant { account } => answer(store.load_grant(&account)),
        Request::SwapGrant {
            account,
            expected,
            new,
        } => answer(store.swap_grant(&account, expected.as_ref(), &new)),
        Request::LoadMeta { account } => answer(store.load_meta(&account)),
        Request::SaveMeta { account, meta } => answer(store.save_meta(&account, &meta)),
        Request::Remove { account } => answer(store.remove(&account)),
        Request::Accounts => answer(store.accounts()),
        Request::Trace { .. } | Request::LockRefresh { .. } | Request::Reload => {
            Response::Error("served by the control socket only".into())
        }
    }
}

/// The service's side of one exchange: a request line in, the answer line
/// (with its newline) out.
pub fn answer_line(store: &dyn TokenStore, line: &[u8]) -> Vec<u8> {
    let response = match serde_json::from_slice::<Request>(line) {
        Ok(request) => handle(store, request),
        // Not echoed: the line may hold a record.
        Err(_) => Response::Error("unreadable request".into()),
    };
    let mut out = serde_json::to_vec(&response)
        .unwrap_or_else(|_| br#"{"error":"cannot encode the answer"}"#.to_vec());
    out.push(b'\n');
    out
}

/// An error answer line (with its newline), for a peer refused before
/// it asked anything.
pub fn error_line(reason: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Response::Error(reason.to_string()))
        .unwrap_or_else(|_| br#"{"error":"refused"}"#.to_vec());
    out.push(b'\n');
    out
}

/// A request as a line to send (with its newline).
pub fn request_line(request: &Request) -> Result<Vec<u8>, StoreError> {
    let mut line = serde_json::to_vec(request).map_err(|e| StoreError::Remote {
        reason: format!("cannot encode the request: {e}"),
    })?;
    line.push(b'\n');
    Ok(line)
}

/// The command's side: the value in an answer line, or the service's
/// error.
pub fn answer_value<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, StoreError> {
    let response: Response = serde_json::from_str(line).map_err(|_| StoreError::Remote {
        reason: "unreadable answer on the control socket".into(),
    })?;
    value(response)
}

/// The value of a [`Response`] as `T`, or the service's error.
pub fn value<T: serde::de::DeserializeOwned>(response: Response) -> Result<T, StoreError> {
    match response {
        Response::Ok(v) => serde_json::from_value(v).map_err(|_| StoreError::Remote {
            reason: "the running service sent an answer this command cannot read (are both the same mailbridge version?)".into(),
        }),
        Response::Error(reason) => Err(StoreError::Remote { reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::store::sled_store::tests::TempDir;

    fn round_trip(store: &dyn TokenStore, request: Request) -> Response {
        // Through the wire format, as the socket carries it.
        let line = request_line(&request).expect("encode");
        let answer = answer_line(store, &line);
        serde_json::from_slice(&answer).expect("decode")
    }

    #[test]
    fn every_call_round_trips() {
        let tmp = TempDir::new("control");
        let store = SledStore::open(&tmp.path().join("state")).expect("open");
        let grant = SealedGrant {
            format: 1,
            kdf: crate::store::KdfParams::for_tests(),
            salt: vec![1; 16],
            nonce: vec![2; 24],
            password_hash: None,
            ciphertext: vec![3; 40],
        };
        let a = || "a@example".to_string();
        let none: Option<SealedGrant> =
            value(round_trip(&store, Request::LoadGrant { account: a() })).expect("load");
        assert!(none.is_none());
        let swapped: bool = value(round_trip(
            &store,
            Request::SwapGrant {
                account: a(),
                expected: None,
                new: grant.clone(),
            },
        ))
        .expect("swap");
        assert!(swapped);
        let got: Option<SealedGrant> =
            value(round_trip(&store, Request::LoadGrant { account: a() })).expect("load");
        assert_eq!(got, Some(grant.clone()));
        let meta = AccountMeta {
            provider: "p".into(),
            ..AccountMeta::default()
        };
        let () = value(round_trip(
            &store,
            Request::SaveMeta {
                account: a(),
                meta: meta.clone(),
            },
        ))
        .expect("save meta");
        let got: Option<AccountMeta> =
            value(round_trip(&store, Request::LoadMeta { account: a() })).expect("meta");
        assert_eq!(got.map(|m| m.provider), Some("p".to_string()));
        let names: Vec<String> = value(round_trip(&store, Request::Accounts)).expect("accounts");
        assert_eq!(names, vec![a()]);
        let removed: bool =
            value(round_trip(&store, Request::Remove { account: a() })).expect("remove");
        assert!(removed);
        // A line that is not a request gets an error, not a disconnect.
        let answer = answer_line(&store, b"{not json\n");
        let err = answer_value::<bool>(std::str::from_utf8(&answer).unwrap()).unwrap_err();
        assert!(err.to_string().contains("unreadable request"), "{err}");
        // Errors arrive as the store's message.
        let err = value::<bool>(Response::Error("disk full".into())).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
