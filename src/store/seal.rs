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
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::kdf::Blocks;

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
    /// A store shared by several instances only: the access token the
    /// last refresh obtained, so that an instance that waited for another
    /// one's refresh uses its token instead of refreshing again. Sealed
    /// like the refresh token; never written to a store of one process.
    pub shared_access: Option<SharedAccess>,
}

/// An access token kept in a shared store's sealed record.
#[derive(Clone)]
pub struct SharedAccess {
    /// The bearer token.
    pub token: SecretString,
    /// When it stops working (unix seconds).
    pub expires_at: u64,
    /// Its whole lifetime in seconds (`expires_in`).
    pub lifetime_secs: u64,
}

impl fmt::Debug for SharedAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedAccess")
            .field("expires_at", &self.expires_at)
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_lifetime_secs: Option<u64>,
}

impl Drop for GrantWire {
    fn drop(&mut self) {
        if let Some(t) = self.refresh_token.as_mut() {
            t.zeroize();
        }
        if let Some(t) = self.access_token.as_mut() {
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

/// Whether `[server] kdf_memory_kib` and `kdf_iterations` can seal a grant
/// (one lane, as mailbridge seals): else the key and what is allowed. For
/// config validation, so a bad value fails at start, not at the first
/// import.
pub fn check_kdf_limits(m_cost_kib: u32, t_cost: u32) -> Result<(), (&'static str, String)> {
    // Argon2 needs 8 KiB per lane.
    let min_m = Params::MIN_M_COST.max(8);
    if !(min_m..=MAX_M_COST_KIB).contains(&m_cost_kib) {
        return Err((
            "kdf_memory_kib",
            format!(
                "{m_cost_kib} KiB is outside what Argon2id accepts here: {min_m} to {MAX_M_COST_KIB} KiB (the default, 19456, is OWASP's recommendation)"
            ),
        ));
    }
    if !(Params::MIN_T_COST..=MAX_T_COST).contains(&t_cost) {
        return Err((
            "kdf_iterations",
            format!(
                "{t_cost} passes is outside {}..={MAX_T_COST} (the default is 2)",
                Params::MIN_T_COST
            ),
        ));
    }
    Params::new(m_cost_kib, t_cost, 1, Some(KEY_LEN))
        .map(|_| ())
        .map_err(|e| ("kdf_memory_kib", format!("Argon2id refuses it: {e}")))
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
/// design: run it through the [`crate::kdf::KdfGate`].
pub fn derive_key(
    password: &SecretString,
    salt: &[u8],
    kdf: KdfParams,
) -> Result<SealKey, SealError> {
    derive_key_in(password, salt, kdf, &mut Blocks::default())
}

/// [`derive_key`] in the given working memory.
pub fn derive_key_in(
    password: &SecretString,
    salt: &[u8],
    kdf: KdfParams,
    memory: &mut Blocks,
) -> Result<SealKey, SealError> {
    let params = check_params(kdf)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon_into(
        &argon,
        password.expose_secret().as_bytes(),
        salt,
        &mut *out,
        memory,
    )?;
    Ok(SealKey(out))
}

/// One Argon2 run into `out`, in working memory that goes back to the
/// operating system afterwards (see [`crate::kdf`]).
fn argon_into(
    argon: &Argon2<'_>,
    pwd: &[u8],
    salt: &[u8],
    out: &mut [u8],
    memory: &mut Blocks,
) -> Result<(), SealError> {
    argon
        .hash_password_into_with_memory(pwd, salt, out, memory.get(argon.params().block_count()))
        .map_err(|e| SealError::Kdf {
            reason: e.to_string(),
        })
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
        .map_or(0, |t| t.expose_secret().len())
        + grant
            .shared_access
            .as_ref()
            .map_or(0, |a| a.token.expose_secret().len());
    let wire = GrantWire {
        refresh_token: grant
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        obtained_at: grant.obtained_at,
        client_id: grant.client_id.clone(),
        access_token: grant
            .shared_access
            .as_ref()
            .map(|a| a.token.expose_secret().to_owned()),
        access_expires_at: grant.shared_access.as_ref().map(|a| a.expires_at),
        access_lifetime_secs: grant.shared_access.as_ref().map(|a| a.lifetime_secs),
    };
    // Reserve enough for the worst-case JSON escaping so the buffer never
    // reallocates and leaves unwiped copies of the token behind.
    let mut plain = Zeroizing::new(Vec::with_capacity(token_len * 6 + 256));
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
    let shared_access = match (wire.access_token.take(), wire.access_expires_at) {
        (Some(token), Some(expires_at)) => Some(SharedAccess {
            token: SecretString::from(token),
            expires_at,
            lifetime_secs: wire.access_lifetime_secs.unwrap_or(0),
        }),
        _ => None,
    };
    Ok(GrantData {
        refresh_token: wire.refresh_token.take().map(SecretString::from),
        obtained_at: wire.obtained_at,
        client_id: wire.client_id.take(),
        shared_access,
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
/// Slow by design: run it through the [`crate::kdf::KdfGate`].
pub fn hash_password(password: &SecretString, kdf: KdfParams) -> Result<String, SealError> {
    hash_password_in(password, kdf, &mut Blocks::default())
}

/// [`hash_password`] in the given working memory.
pub fn hash_password_in(
    password: &SecretString,
    kdf: KdfParams,
    memory: &mut Blocks,
) -> Result<String, SealError> {
    let params = check_params(kdf)?;
    let salt = new_salt();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon_into(
        &argon,
        password.expose_secret().as_bytes(),
        &salt,
        &mut *out,
        memory,
    )?;
    phc_string(&params, &salt, &*out)
}

/// The PHC string of an Argon2id v0x13 hash.
fn phc_string(params: &Params, salt: &[u8], output: &[u8]) -> Result<String, SealError> {
    use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
    let kdf_error = |e: &dyn fmt::Display| SealError::Kdf {
        reason: e.to_string(),
    };
    let hash = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|e| kdf_error(&e))?,
        salt: Some(Salt::new(salt).map_err(|e| kdf_error(&e))?),
        hash: Some(Output::new(output).map_err(|e| kdf_error(&e))?),
    };
    Ok(hash.to_string())
}

/// Service key mode: whether `password` matches a PHC hash from
/// [`hash_password`]. A malformed hash, or one whose parameters are out of
/// bounds, is an error, not a mismatch. Slow by design: run it through the
/// [`crate::kdf::KdfGate`].
pub fn verify_password(password: &SecretString, hash: &str) -> Result<bool, SealError> {
    verify_password_in(password, hash, &mut Blocks::default())
}

/// [`verify_password`] in the given working memory.
pub fn verify_password_in(
    password: &SecretString,
    hash: &str,
    memory: &mut Blocks,
) -> Result<bool, SealError> {
    use argon2::password_hash::phc::PasswordHash;
    let malformed = |what: &dyn fmt::Display| SealError::Malformed {
        reason: format!("stored password hash: {what}"),
    };
    let parsed = PasswordHash::new(hash).map_err(|e| malformed(&e))?;
    let algorithm = Algorithm::try_from(parsed.algorithm.as_str()).map_err(|e| malformed(&e))?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| malformed(&e))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(|e| malformed(&e))?;
    // The same bounds as a record's own parameters: a damaged or hostile
    // hash must not make the process allocate without limit.
    check_params(KdfParams {
        m_cost_kib: params.m_cost(),
        t_cost: params.t_cost(),
        p_cost: params.p_cost(),
    })?;
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return Err(malformed(&"no salt or no hash"));
    };
    let argon = Argon2::new(algorithm, version, params);
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    argon_into(
        &argon,
        password.expose_secret().as_bytes(),
        salt.as_ref(),
        &mut out,
        memory,
    )?;
    Ok(expected.as_bytes().ct_eq(&out).into())
}

/// A PHC hash with `kdf`'s parameters and a fixed salt that no password
/// matches in practice (its output is all zeros): checking a password
/// against it costs what checking a real one costs. For the dummy
/// verification an unknown user pays. No Argon2 run is needed to make it.
pub fn dummy_password_hash(kdf: KdfParams) -> Result<String, SealError> {
    let params = check_params(kdf)?;
    phc_string(&params, &DUMMY_SALT, &[0u8; KEY_LEN])
}

/// The salt of dummy verifications: any fixed value will do.
pub const DUMMY_SALT: [u8; SALT_LEN] = *b"mailbridge-dummy";

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
            shared_access: None,
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
    fn password_hashes_verify() {
        let kdf = KdfParams::for_tests();
        let hash = hash_password(&pw("right"), kdf).expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{hash}");
        assert!(verify_password(&pw("right"), &hash).expect("verify"));
        assert!(!verify_password(&pw("wrong"), &hash).expect("verify"));
        // Hashes made by the argon2 crate itself verify too (records
        // written before the KDF gate).
        use argon2::password_hash::PasswordHasher;
        let theirs = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            check_params(kdf).unwrap(),
        )
        .hash_password_with_salt(b"right", &new_salt())
        .unwrap()
        .to_string();
        assert!(verify_password(&pw("right"), &theirs).expect("verify"));
        assert!(!verify_password(&pw("wrong"), &theirs).expect("verify"));
    }

    #[test]
    fn bad_password_hashes_are_errors() {
        for bad in [
            "",
            "not a hash",
            "$argon2id$v=19$m=256,t=1,p=1$c2FsdHNhbHRzYWx0",
            // 8 GiB: above the bound, refused before any allocation.
            "$argon2id$v=19$m=8388608,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                verify_password(&pw("x"), bad).is_err(),
                "{bad:?} should not verify"
            );
        }
    }

    #[test]
    fn the_dummy_hash_costs_a_run_and_matches_nothing() {
        let kdf = KdfParams::for_tests();
        let dummy = dummy_password_hash(kdf).expect("dummy");
        assert!(
            dummy.starts_with("$argon2id$v=19$m=256,t=1,p=1$"),
            "{dummy}"
        );
        assert!(!verify_password(&pw(""), &dummy).expect("verify"));
        assert!(!verify_password(&pw("anything"), &dummy).expect("verify"));
    }

    #[test]
    fn default_params_derive() {
        // The production parameters are accepted by argon2.
        assert!(check_params(KdfParams::default()).is_ok());
    }
}
