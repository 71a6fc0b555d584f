//! JWTs for the sandbox provider: RS256 assertions it verifies (RFC 7523
//! grants and client authentication) and the unsigned JWT-shaped access
//! tokens it can issue.
//!
//! Verification only: signing is client code and lives elsewhere (the tests
//! sign with `ring` directly).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Map, Value, json};

/// A public key given to a registration hook could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unusable public key: {0}")]
pub struct InvalidKey(pub(super) String);

/// An RSA public key as ring wants it: the PKCS#1 `RSAPublicKey` DER.
#[derive(Clone)]
pub(super) struct RsaPublicKey(Vec<u8>);

impl std::fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaPublicKey({} bytes)", self.0.len())
    }
}

/// DER of the AlgorithmIdentifier OID rsaEncryption, 1.2.840.113549.1.1.1.
const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

impl RsaPublicKey {
    /// From an SPKI `-----BEGIN PUBLIC KEY-----` PEM holding an RSA key.
    pub(super) fn from_spki_pem(pem: &str) -> Result<RsaPublicKey, InvalidKey> {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| InvalidKey(format!("not a PUBLIC KEY PEM: {e}")))?;
        Self::from_spki_der(spki.as_ref()).map_err(|e| InvalidKey(e.to_string()))
    }

    /// SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier,
    /// subjectPublicKey BIT STRING }, with algorithm rsaEncryption and NULL
    /// parameters (RFC 3279 section 2.3.1); the BIT STRING holds
    /// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }.
    fn from_spki_der(der: &[u8]) -> Result<RsaPublicKey, &'static str> {
        let mut outer = Der(der);
        let spki = outer.read(TAG_SEQUENCE)?;
        outer.finish()?;
        let mut spki = Der(spki);
        let mut algorithm = Der(spki.read(TAG_SEQUENCE)?);
        if algorithm.read(TAG_OID)? != RSA_ENCRYPTION_OID {
            return Err("not an RSA key (algorithm is not rsaEncryption)");
        }
        if !algorithm.read(TAG_NULL)?.is_empty() {
            return Err("rsaEncryption parameters must be NULL");
        }
        algorithm.finish()?;
        let bits = spki.read(TAG_BIT_STRING)?;
        spki.finish()?;
        let (&unused, pkcs1) = bits.split_first().ok_or("empty BIT STRING")?;
        if unused != 0 {
            return Err("BIT STRING with unused bits");
        }
        let mut rsa = Der(pkcs1);
        let mut fields = Der(rsa.read(TAG_SEQUENCE)?);
        rsa.finish()?;
        let modulus = fields.read(TAG_INTEGER)?;
        fields.read(TAG_INTEGER)?;
        fields.finish()?;
        // 2048 bits at least (a leading zero byte keeps the INTEGER positive).
        let significant = modulus.iter().skip_while(|&&b| b == 0).count();
        if significant < 256 {
            return Err("RSA modulus shorter than 2048 bits");
        }
        Ok(RsaPublicKey(pkcs1.to_vec()))
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// A strict reader of DER: definite, minimal lengths; no trailing bytes.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The contents of the next element, which must carry `tag`.
    fn read(&mut self, tag: u8) -> Result<&'a [u8], &'static str> {
        let (&found, rest) = self.0.split_first().ok_or("truncated DER")?;
        if found != tag {
            return Err("unexpected DER element");
        }
        let (&first, rest) = rest.split_first().ok_or("truncated DER")?;
        let (len, rest) = match first {
            0..=0x7f => (usize::from(first), rest),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                let bytes = rest.get(..n).ok_or("truncated DER length")?;
                if bytes[0] == 0 {
                    return Err("non-minimal DER length");
                }
                let len = bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                if len < 0x80 {
                    return Err("non-minimal DER length");
                }
                (len, &rest[n..])
            }
            _ => return Err("unsupported DER length"),
        };
        let contents = rest.get(..len).ok_or("truncated DER contents")?;
        self.0 = &rest[len..];
        Ok(contents)
    }

    fn finish(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes after DER element")
        }
    }
}

/// A JWS compact serialization with an RS256 header, decoded but not yet
/// verified.
pub(super) struct Jwt<'a> {
    /// `BASE64URL(header) "." BASE64URL(claims)`: what the signature covers.
    signing_input: &'a str,
    signature: Vec<u8>,
    pub(super) claims: Map<String, Value>,
}

impl<'a> Jwt<'a> {
    /// Splits and decodes; refuses anything but `alg` RS256 (so never
    /// `none`), a `typ` other than JWT, and any `crit` header.
    pub(super) fn parse(token: &'a str) -> Result<Jwt<'a>, &'static str> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT (three dot-separated parts expected)");
        };
        let header = decode_object(header).ok_or("JWT header is not base64url JSON")?;
        let claims_map = decode_object(claims).ok_or("JWT claims are not base64url JSON")?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "JWT signature is not base64url")?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("JWT alg must be RS256");
        }
        if let Some(typ) = header.get("typ")
            && !typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT"))
        {
            return Err("JWT typ must be JWT");
        }
        if header.contains_key("crit") {
            return Err("JWT crit header parameters are not understood");
        }
        let signing_input = &token[..header_len_plus_claims(token)];
        Ok(Jwt {
            signing_input,
            signature,
            claims: claims_map,
        })
    }

    /// True if one of `keys` made the signature.
    pub(super) fn signed_by_any(&self, keys: &[RsaPublicKey]) -> bool {
        keys.iter()
            .any(|k| k.verify(self.signing_input.as_bytes(), &self.signature))
    }

    pub(super) fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim (seconds since the epoch, maybe fractional).
    pub(super) fn time_claim(&self, name: &str) -> Result<Option<f64>, String> {
        match self.claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("claim {name} is not a NumericDate")),
        }
    }

    /// `aud` is one string or an array of strings (RFC 7519 section 4.1.3);
    /// one of them must be exactly `expected`.
    pub(super) fn audience_is(&self, expected: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => aud == expected,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected)),
            _ => false,
        }
    }
}

/// Length of `header.claims` in a token already known to have two dots.
fn header_len_plus_claims(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

fn decode_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A JWT-shaped access token: `BASE64URL(header).BASE64URL(claims).` and
/// 32 random bytes in place of a signature. Only the issuing provider can
/// check it (by looking it up); the shape lets a client read `aud`.
pub(super) fn shaped_access_token(
    issuer: &str,
    audience: &str,
    subject: &str,
    scope: &str,
    issued_at: u64,
    expires_at: u64,
    random: &str,
) -> String {
    let header = json!({ "typ": "JWT", "alg": "RS256", "kid": "sandbox" });
    let claims = json!({
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "scp": scope,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": expires_at,
    });
    format!(
        "{}.{}.{random}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}
