//! Sealing a grant: Argon2id (v0x13) derives a 32-byte key from the local
//! password and a per-account salt; XChaCha20-Poly1305 encrypts the grant
//! under a fresh random 24-byte nonce. The associated data binds the record
//! format, the account name, the salt and the KDF parameters, so a record
//! copied to another account, or with its parameters edited, does not open.

use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{KdfParams, SealedGrant};

/// The current record format.
pub const FORMAT: u32 = 1;
/// Salt length in bytes.
pub const SALT_LEN: usize = 16;
/// XChaCha20 nonce length in bytes.
pub const NONCE_LEN: usize = 24;
/// Key length in bytes.
pub const KEY_LEN: usize = 32;

/// Upper bounds on KDF parameters read from a record, so a damaged or
/// hostile record cannot make the process allocate without limit.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

/// The secret part of an account: what is sealed.
#[derive(Clone, Debug, Default)]
pub struct GrantData {
    /// The OAuth2 refresh token, if the flow gave one.
    pub refresh_token: Option<SecretString>,
    /// When the grant (or its last rotation) was obtained, unix seconds.
    pub obtained_at: u64,
    /// The client id the grant was issued to, when it is not the
    /// provider's configured one (a dynamically registered client).
    pub client_id: Option<String>,
}

/// The serialized form of [`GrantData`]; wiped when dropped.
#[derive(Serialize, Deserialize)]
struct GrantWire {
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    obtained_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
}

impl Drop for GrantWire {
    fn drop(&mut self) {
        if let Some(t) = self.refresh_token.as_mut() {
            t.zeroize();
        }
    }
}

/// A 32-byte sealing key, wiped when dropped.
#[derive(Clone)]
pub struct SealKey(Zeroizing<[u8; KEY_LEN]>);

impl SealKey {
    /// A key from raw bytes (service key mode: read from a file or a
    /// systemd credential).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SealKey {
        SealKey(Zeroizing::new(bytes))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.0).into())
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Why sealing or opening failed. Never carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key does not open the record: wrong password (or the record was
    /// altered or copied from another account).
    #[error("the password does not unlock this grant")]
    WrongKey,
    /// The KDF parameters are out of range.
    #[error(
        "invalid key derivation parameters (memory {m_cost_kib} KiB, {t_cost} passes, {p_cost} lanes): {reason}"
    )]
    BadParams {
        /// Memory cost in KiB.
        m_cost_kib: u32,
        /// Passes.
        t_cost: u32,
        /// Lanes.
        p_cost: u32,
        /// What is wrong.
        reason: String,
    },
    /// Argon2 failed for another reason.
    #[error("key derivation failed: {reason}")]
    Kdf {
        /// What went wrong.
        reason: String,
    },
    /// The record was written by a newer mailbridge.
    #[error(
        "sealed record format {format} is not supported by this mailbridge (it reads format {FORMAT}); upgrade mailbridge"
    )]
    UnsupportedFormat {
        /// The record's format number.
        format: u32,
    },
    /// The record's fields have impossible sizes or the decrypted content
    /// does not parse.
    #[error("the sealed record is malformed: {reason}; remove the account and add it again")]
    Malformed {
        /// What is wrong (never the content).
        reason: String,
    },
    /// Encryption failed (cannot happen with valid inputs).
    #[error("encryption failed")]
    Encrypt,
}

/// 16 random bytes from the operating system.
pub fn new_salt() -> Vec<u8> {
    let mut salt = vec![0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    salt
}

fn check_params(kdf: KdfParams) -> Result<Params, SealError> {
    let bad = |reason: String| SealError::BadParams {
        m_cost_kib: kdf.m_cost_kib,
        t_cost: kdf.t_cost,
        p_cost: kdf.p_cost,
        reason,
    };
    if kdf.m_cost_kib > MAX_M_COST_KIB || kdf.t_cost > MAX_T_COST || kdf.p_cost > MAX_P_COST {
        return Err(bad(format!(
            "above the limits of {MAX_M_COST_KIB} KiB, {MAX_T_COST} passes, {MAX_P_COST} lanes"
        )));
    }
    Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(KEY_LEN))
        .map_err(|e| bad(e.to_string()))
}

/// Derive the sealing key from `password` with Argon2id v0x13. Slow by
/// design: run it on a blocking thread.
pub fn derive_key(
    password: &SecretString,
    salt: &[u8],
    kdf: KdfParams,
) -> Result<SealKey, SealError> {
    let params = check_params(kdf)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(password.expose_secret().as_bytes(), salt, &mut *out)
        .map_err(|e| SealError::Kdf {
            reason: e.to_string(),
        })?;
    Ok(SealKey(out))
}

/// Associated data: everything in the record except nonce and ciphertext,
/// plus the account name, length-prefixed so no two inputs collide.
fn aad(
    format: u32,
    account: &str,
    salt: &[u8],
    kdf: KdfParams,
    password_hash: Option<&str>,
) -> Vec<u8> {
    let mut a = Vec::with_capacity(64 + account.len() + salt.len());
    a.extend_from_slice(b"mailbridge-grant");
    a.extend_from_slice(&format.to_be_bytes());
    for part in [account.as_bytes(), salt] {
        a.extend_from_slice(&(part.len() as u64).to_be_bytes());
        a.extend_from_slice(part);
    }
    a.extend_from_slice(&kdf.m_cost_kib.to_be_bytes());
    a.extend_from_slice(&kdf.t_cost.to_be_bytes());
    a.extend_from_slice(&kdf.p_cost.to_be_bytes());
    // Absent in password mode, so those records keep their original AAD.
    if let Some(hash) = password_hash {
        a.extend_from_slice(b"password-hash");
        a.extend_from_slice(&(hash.len() as u64).to_be_bytes());
        a.extend_from_slice(hash.as_bytes());
    }
    a
}

/// Seal `grant` for `account` under `key` (derived from `salt` and `kdf`,
/// which are stored with the record) and a fresh random nonce.
pub fn seal(
    account: &str,
    key: &SealKey,
    salt: Vec<u8>,
    kdf: KdfParams,
    grant: &GrantData,
) -> Result<SealedGrant, SealError> {
    seal_with_hash(account, key, salt, kdf, None, grant)
}

/// [`seal`] for service key mode: the record also carries the local
/// password's PHC hash, bound into the associated data.
pub fn seal_with_hash(
    account: &str,
    key: &SealKey,
    salt: Vec<u8>,
    kdf: KdfParams,
    password_hash: Option<String>,
    grant: &GrantData,
) -> Result<SealedGrant, SealError> {
    let token_len = grant
        .refresh_token
        .as_ref()
        .map_or(0, |t| t.expose_secret().len());
    let wire = GrantWire {
        refresh_token: grant
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        obtained_at: grant.obtained_at,
        client_id: grant.client_id.clone(),
    };
    // Reserve enough for the worst-case JSON escaping so the buffer never
    // reallocates and leaves unwiped copies of the token behind.
    let mut plain = Zeroizing::new(Vec::with_capacity(token_len * 6 + 96));
    serde_json::to_writer(&mut *plain, &wire).map_err(|e| SealError::Malformed {
        reason: format!("cannot encode grant: {}", e.classify_str()),
    })?;
    let mut nonce = vec![0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let aad = aad(FORMAT, account, &salt, kdf, password_hash.as_deref());
    let ciphertext = key
        .cipher()
        .encrypt(
            &XNonce::try_from(&nonce[..]).map_err(|_| SealError::Encrypt)?,
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| SealError::Encrypt)?;
    Ok(SealedGrant {
        format: FORMAT,
        kdf,
        salt,
        nonce,
        ciphertext,
        password_hash,
    })
}

/// Open `sealed` for `account` with `key`. A wrong key, another account's
/// record or any tampering gives [`SealError::WrongKey`].
pub fn open(account: &str, key: &SealKey, sealed: &SealedGrant) -> Result<GrantData, SealError> {
    if sealed.format != FORMAT {
        return Err(SealError::UnsupportedFormat {
            format: sealed.format,
        });
    }
    let nonce = XNonce::try_from(&sealed.nonce[..]).map_err(|_| SealError::Malformed {
        reason: format!(
            "nonce is {} bytes, expected {NONCE_LEN}",
            sealed.nonce.len()
        ),
    })?;
    let aad = aad(
        sealed.format,
        account,
        &sealed.salt,
        sealed.kdf,
        sealed.password_hash.as_deref(),
    );
    let plain = Zeroizing::new(
        key.cipher()
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::WrongKey)?,
    );
    let mut wire: GrantWire = serde_json::from_slice(&plain).map_err(|e| SealError::Malformed {
        reason: format!("decrypted grant does not parse: {}", e.classify_str()),
    })?;
    Ok(GrantData {
        refresh_token: wire.refresh_token.take().map(SecretString::from),
        obtained_at: wire.obtained_at,
        client_id: wire.client_id.take(),
    })
}

/// A short name for a serde_json error category, with no data from the
/// input.
trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Service key mode: the record key for one salt, from the service secret
/// (a key file or systemd credential of at least 32 random bytes).
pub fn service_key(secret: &[u8], salt: &[u8]) -> SealKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"mailbridge-service-key");
    h.update((secret.len() as u64).to_be_bytes());
    h.update(secret);
    h.update(salt);
    SealKey::from_bytes(h.finalize().into())
}

/// Service key mode: an Argon2id PHC hash of the local login password.
pub fn hash_password(password: &SecretString, kdf: KdfParams) -> Result<String, SealError> {
    use argon2::password_hash::PasswordHasher;
    let params = check_params(kdf)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let hash = argon
        .hash_password_with_salt(password.expose_secret().as_bytes(), &new_salt())
        .map_err(|e| SealError::Kdf {
            reason: e.to_string(),
        })?;
    Ok(hash.to_string())
}

/// Service key mode: whether `password` matches a PHC hash from
/// [`hash_password`]. A malformed hash is an error, not a mismatch.
pub fn verify_password(password: &SecretString, hash: &str) -> Result<bool, SealError> {
    use argon2::password_hash::PasswordVerifier;
    match Argon2::default().verify_password(password.expose_secret().as_bytes(), hash) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(SealError::Malformed {
            reason: format!("stored password hash: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> SecretString {
        SecretString::from(s)
    }

    fn grant(token: &str) -> GrantData {
        GrantData {
            refresh_token: Some(pw(token)),
            obtained_at: 1_700_000_000,
            client_id: None,
        }
    }

    fn sealed(account: &str, password: &str, token: &str) -> (SealedGrant, SealKey) {
        let salt = new_salt();
        let kdf = KdfParams::for_tests();
        let key = derive_key(&pw(password), &salt, kdf).expect("derive");
        let s = seal(account, &key, salt, kdf, &grant(token)).expect("seal");
        (s, key)
    }

    #[test]
    fn round_trip() {
        let (s, key) = sealed("a@example.com", "hunter2", "rt-123");
        assert_eq!(s.format, FORMAT);
        assert_eq!(s.salt.len(), SALT_LEN);
        assert_eq!(s.nonce.len(), NONCE_LEN);
        let g = open("a@example.com", &key, &s).expect("open");
        assert_eq!(
            g.refresh_token.as_ref().map(|t| t.expose_secret()),
            Some("rt-123")
        );
        assert_eq!(g.obtained_at, 1_700_000_000);
        // Same key again, fresh nonce each time.
        let s2 = seal("a@example.com", &key, s.salt.clone(), s.kdf, &g).expect("reseal");
        assert_ne!(s.nonce, s2.nonce);
        assert!(open("a@example.com", &key, &s2).is_ok());
    }

    #[test]
    fn wrong_password_is_wrong_key() {
        let (s, _) = sealed("a", "right", "rt");
        let key = derive_key(&pw("wrong"), &s.salt, s.kdf).expect("derive");
        assert!(matches!(open("a", &key, &s), Err(SealError::WrongKey)));
    }

    #[test]
    fn record_copied_to_another_account_does_not_open() {
        let (s, key) = sealed("alice", "pw", "rt");
        assert!(matches!(open("bob", &key, &s), Err(SealError::WrongKey)));
    }

    #[test]
    fn edited_kdf_params_do_not_open() {
        let (mut s, key) = sealed("alice", "pw", "rt");
        s.kdf.t_cost += 1;
        assert!(matches!(open("alice", &key, &s), Err(SealError::WrongKey)));
    }

    #[test]
    fn bad_records_are_refused() {
        let (mut s, key) = sealed("alice", "pw", "rt");
        s.nonce.truncate(5);
        assert!(matches!(
            open("alice", &key, &s),
            Err(SealError::Malformed { .. })
        ));
        s.format = 99;
        assert!(matches!(
            open("alice", &key, &s),
            Err(SealError::UnsupportedFormat { format: 99 })
        ));
        let huge = KdfParams {
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(matches!(
            derive_key(&pw("x"), &new_salt(), huge),
            Err(SealError::BadParams { .. })
        ));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let (s, key) = sealed("alice", "pw", "rt-very-secret");
        assert_eq!(format!("{key:?}"), "SealKey(..)");
        let g = open("alice", &key, &s).expect("open");
        assert!(!format!("{g:?}").contains("rt-very-secret"));
    }

    #[test]
    fn default_params_derive() {
        // The production parameters are accepted by argon2.
        assert!(check_params(KdfParams::default()).is_ok());
    }
}
