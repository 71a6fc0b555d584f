//! RS256 JSON Web Tokens for the grants that sign their own requests:
//! Google service accounts (RFC 7523 JWT bearer assertion) and Microsoft
//! certificate credentials (private-key JWT client assertion). Also reads
//! the `aud` of an access token that happens to be a JWT (never relied on:
//! Microsoft personal-account tokens are opaque).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use secrecy::{ExposeSecret, SecretString};

/// Signing failures; no key material in the messages.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwtError {
    /// The key is not an RSA PKCS#8 private key in PEM.
    #[error(
        "the private key is not an RSA key in PKCS#8 PEM form (\"-----BEGIN PRIVATE KEY-----\"): {0}"
    )]
    BadKey(String),
    /// The certificate is not PEM.
    #[error("the certificate is not a PEM certificate: {0}")]
    BadCertificate(String),
    /// Signing failed.
    #[error("signing the assertion failed")]
    Sign,
}

/// An RSA signing key for RS256.
pub struct Rs256Key {
    pair: RsaKeyPair,
}

impl std::fmt::Debug for Rs256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rs256Key(..)")
    }
}

impl Rs256Key {
    /// Reads a PKCS#8 PEM private key (as in a Google service-account JSON
    /// file's `private_key`).
    pub fn from_pkcs8_pem(pem: &SecretString) -> Result<Rs256Key, JwtError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.expose_secret().as_bytes())
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        Ok(Rs256Key { pair })
    }

    /// `header.claims.signature`, each base64url without padding.
    pub fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, JwtError> {
        let mut input = URL_SAFE_NO_PAD.encode(header.to_string());
        input.push('.');
        input.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| JwtError::Sign)?;
        input.push('.');
        input.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(input)
    }
}

/// The base64url SHA-1 thumbprint (`x5t`) of the first certificate in a
/// PEM file's text, as Microsoft wants in a client assertion's header.
pub fn x5t(cert_pem: &str) -> Result<String, JwtError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| JwtError::BadCertificate(e.to_string()))?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// The claims of a JWT-shaped access token, or None when the token is
/// opaque or its payload unreadable. The signature is not checked: this
/// only diagnoses what a token was issued for.
fn claims(token: &str) -> Option<serde_json::Value> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The permissions a JWT-shaped access token carries: the delegated
/// scopes of `scp` (one string, space-separated) and the application
/// roles of `roles` (an array), as Entra ID writes them. None when the
/// token is opaque or has neither claim.
pub fn permissions(token: &str) -> Option<Vec<String>> {
    let claims = claims(token)?;
    let mut found = None::<Vec<String>>;
    if let Some(scp) = claims.get("scp").and_then(serde_json::Value::as_str) {
        found
            .get_or_insert_default()
            .extend(scp.split_whitespace().map(str::to_string));
    }
    if let Some(roles) = claims.get("roles").and_then(serde_json::Value::as_array) {
        found
            .get_or_insert_default()
            .extend(roles.iter().filter_map(|r| r.as_str().map(str::to_string)));
    }
    found
}

/// The `aud` claim(s) of a JWT-shaped access token, or None when the token
/// is opaque or its payload unreadable. The signature is not checked: this
/// only diagnoses which resource a token was issued for.
pub fn audiences(token: &str) -> Option<Vec<String>> {
    let claims = claims(token)?;
    match claims.get("aud")? {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_audiences_of_jwt_tokens_only() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"aud":"https://outlook.office.com","sub":"x"}"#);
        assert_eq!(
            audiences(&format!("e30.{payload}.sig")),
            Some(vec!["https://outlook.office.com".to_string()])
        );
        let payload = URL_SAFE_NO_PAD.encode(r#"{"aud":["a","b"]}"#);
        assert_eq!(
            audiences(&format!("e30.{payload}.sig")),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(audiences("EwBwA8l6BAAU-opaque-token"), None);
        assert_eq!(audiences("a.b.c.d"), None);
    }

    #[test]
    fn reads_delegated_scopes_and_app_roles() {
        let token = |claims: &str| format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims));
        assert_eq!(
            permissions(&token(r#"{"scp":"IMAP.AccessAsUser.All  SMTP.Send"}"#)),
            Some(vec!["IMAP.AccessAsUser.All".into(), "SMTP.Send".into()])
        );
        assert_eq!(
            permissions(&token(
                r#"{"roles":["IMAP.AccessAsApp","POP.AccessAsApp"]}"#
            )),
            Some(vec!["IMAP.AccessAsApp".into(), "POP.AccessAsApp".into()])
        );
        assert_eq!(permissions(&token(r#"{"aud":"x"}"#)), None);
        assert_eq!(permissions("EwBwA8l6BAAU-opaque-token"), None);
    }

    #[test]
    fn refuses_a_non_pkcs8_key() {
        let e = Rs256Key::from_pkcs8_pem(&SecretString::from("not a key".to_string())).unwrap_err();
        assert!(e.to_string().contains("PKCS#8"));
    }
}
