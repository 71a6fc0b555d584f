//! SASL by hand: decoding the client's PLAIN / LOGIN credentials, encoding
//! the upstream XOAUTH2 / OAUTHBEARER initial responses, and reading the
//! JSON failure challenge a server sends when it refuses a bearer token.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::zeroize::{Zeroize, Zeroizing};
use secrecy::{ExposeSecret, SecretString};

/// A local login as the client typed it.
#[derive(Debug)]
pub struct Credentials {
    /// The login name, used to find the account.
    pub user: String,
    /// The local password: unlocks the sealed grant. Never logged.
    pub password: SecretString,
}

/// Upstream SASL mechanisms that carry an OAuth2 bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Google's and Microsoft's `XOAUTH2`.
    Xoauth2,
    /// RFC 7628 `OAUTHBEARER`.
    Oauthbearer,
}

impl Mechanism {
    /// The mechanism name as it appears on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::Oauthbearer => "OAUTHBEARER",
        }
    }
}

/// What the upstream login needs to build its SASL message.
#[derive(Debug, Clone)]
pub struct BearerToken {
    /// The upstream login name (`user=` / `a=`).
    pub user: String,
    /// The access token. Never logged.
    pub token: SecretString,
    /// Upstream host, for OAUTHBEARER's `host=`.
    pub host: String,
    /// Upstream port, for OAUTHBEARER's `port=`.
    pub port: u16,
}

/// The decoded JSON a server sends as its failure challenge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureChallenge {
    /// `status`, e.g. "400" or "401" (or "invalid_token" for OAUTHBEARER).
    pub status: Option<String>,
    /// `scope` the server wanted, if it said.
    pub scope: Option<String>,
    /// `schemes`, if present.
    pub schemes: Option<String>,
}

/// Why a SASL message could not be used. The messages are safe to show a
/// user or log: they never quote the data that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The data is not standard base64 (RFC 4648, with padding).
    #[error("the SASL data is not valid base64")]
    Base64,
    /// A PLAIN message must have exactly two NUL separators.
    #[error("the PLAIN message is malformed (expected authzid NUL user NUL password)")]
    PlainFormat,
    /// The user name or password is not UTF-8.
    #[error("the user name or password is not valid UTF-8")]
    NotUtf8,
    /// The user name is empty.
    #[error("the user name is empty")]
    EmptyUser,
    /// The password is empty.
    #[error("the password is empty")]
    EmptyPassword,
    /// The client asked to act as another user.
    #[error("logging in as another user (a different authorization identity) is not supported")]
    AuthzidMismatch,
}

/// OAUTHBEARER's answer to a failure challenge: a single %x01, base64.
/// RFC 7628 section 3.2.3: the client must send it to end the exchange.
pub const OAUTHBEARER_FAILURE_ACK: &[u8] = b"AQ==";

/// Decodes standard base64 with padding; rejects anything else (no
/// whitespace, no URL-safe alphabet, no missing padding).
pub fn decode_base64(data: &[u8]) -> Result<Vec<u8>, SaslError> {
    STANDARD.decode(data).map_err(|_| SaslError::Base64)
}

/// Decodes an RFC 4616 PLAIN message: `[authzid] NUL authcid NUL passwd`.
///
/// An authorization identity is accepted only when empty or equal to the
/// login name: acting on behalf of another user is not supported, and
/// silently ignoring it could let one login reach another account.
pub fn decode_plain(msg: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = msg.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::PlainFormat);
    };
    if passwd.contains(&0) {
        return Err(SaslError::PlainFormat);
    }
    let authzid = std::str::from_utf8(authzid).map_err(|_| SaslError::NotUtf8)?;
    let credentials = login_credentials(authcid, passwd)?;
    if !authzid.is_empty() && authzid != credentials.user {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(credentials)
}

/// Checks a user name and password given separately (IMAP LOGIN, POP3
/// USER/PASS, SASL LOGIN): both UTF-8 and non-empty.
pub fn login_credentials(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    let user = std::str::from_utf8(user).map_err(|_| SaslError::NotUtf8)?;
    let password = std::str::from_utf8(password).map_err(|_| SaslError::NotUtf8)?;
    if user.is_empty() {
        return Err(SaslError::EmptyUser);
    }
    if password.is_empty() {
        return Err(SaslError::EmptyPassword);
    }
    Ok(Credentials {
        user: user.to_owned(),
        password: SecretString::from(password.to_owned()),
    })
}

/// The server's first prompt of the LOGIN mechanism: base64 of
/// `Username:`. LOGIN (draft-murchison-sasl-login) was never standardized,
/// and devices compare its prompts byte for byte: some give up on any other
/// text.
pub const LOGIN_PROMPT_USER: &str = "VXNlcm5hbWU6";

/// The LOGIN mechanism's second prompt: base64 of `Password:`.
pub const LOGIN_PROMPT_PASSWORD: &str = "UGFzc3dvcmQ6";

/// The decoded user name of a LOGIN exchange (SASL LOGIN, POP3 USER)
/// between its two steps. It is part of a credential: wiped when dropped,
/// whichever way the exchange ends, and never shown by Debug.
pub struct PendingUser(Zeroizing<Vec<u8>>);

impl PendingUser {
    /// Holds `user` (already decoded) until the password comes.
    pub fn new(user: Vec<u8>) -> Self {
        PendingUser(Zeroizing::new(user))
    }

    /// The credentials, checked like [`login_credentials`]; the held name
    /// is wiped.
    pub fn with_password(self, password: &[u8]) -> Result<Credentials, SaslError> {
        login_credentials(&self.0, password)
    }
}

impl std::fmt::Debug for PendingUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingUser(<redacted>)")
    }
}

/// Encodes a message that holds a secret as base64, wiping the clear copy.
fn encode_secret(mut clear: String) -> SecretString {
    let encoded = STANDARD.encode(clear.as_bytes());
    clear.zeroize();
    SecretString::from(encoded)
}

/// The XOAUTH2 initial response, base64:
/// `user=USER ^A auth=Bearer TOKEN ^A ^A`.
pub fn xoauth2_response(t: &BearerToken) -> SecretString {
    encode_secret(format!(
        "user={}\x01auth=Bearer {}\x01\x01",
        t.user,
        t.token.expose_secret()
    ))
}

/// Escapes a GS2 saslname (RFC 5801): `,` -> `=2C`, `=` -> `=3D`.
fn gs2_saslname(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            ',' => out.push_str("=2C"),
            '=' => out.push_str("=3D"),
            c => out.push(c),
        }
    }
    out
}

/// The OAUTHBEARER (RFC 7628) initial response, base64:
/// `n,a=USER,^Ahost=HOST^Aport=PORT^Aauth=Bearer TOKEN^A^A`.
/// `host` is left out when empty and `port` when zero (both are optional).
pub fn oauthbearer_response(t: &BearerToken) -> SecretString {
    let mut msg = format!("n,a={},\x01", gs2_saslname(&t.user));
    if !t.host.is_empty() {
        msg.push_str("host=");
        msg.push_str(&t.host);
        msg.push('\x01');
    }
    if t.port != 0 {
        msg.push_str(&format!("port={}\x01", t.port));
    }
    msg.push_str("auth=Bearer ");
    msg.push_str(t.token.expose_secret());
    msg.push_str("\x01\x01");
    encode_secret(msg)
}

/// Reads a server's failure challenge: base64 of a JSON object such as
/// `{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`.
/// `status` may be a JSON string or number. Returns `None` when the data is
/// not base64 of a JSON object.
pub fn parse_failure_challenge(b64: &[u8]) -> Option<FailureChallenge> {
    let raw = decode_base64(b64).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let obj = value.as_object()?;
    let field = |name: &str| -> Option<String> {
        match obj.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    Some(FailureChallenge {
        status: field("status"),
        scope: field("scope"),
        schemes: field("schemes"),
    })
}

impl FailureChallenge {
    /// True when the status says the token was refused as such (400, 401
    /// or OAUTHBEARER's `invalid_token`): a fresh token may well work.
    pub fn suggests_retry(&self) -> bool {
        matches!(
            self.status.as_deref().map(str::trim),
            Some("400" | "401" | "invalid_token")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, xorshift};

    /// The shared test token for `user`, with a Google-looking token.
    fn token(user: &str) -> BearerToken {
        BearerToken {
            user: user.to_owned(),
            token: SecretString::from("ya29.tok".to_owned()),
            ..testkit::token()
        }
    }

    #[test]
    fn base64_strict() {
        assert_eq!(decode_base64(b"aGVsbG8=").as_deref(), Ok(&b"hello"[..]));
        assert_eq!(decode_base64(b"").as_deref(), Ok(&b""[..]));
        assert_eq!(decode_base64(b"aGVsbG8"), Err(SaslError::Base64));
        assert_eq!(decode_base64(b"aGVs bG8="), Err(SaslError::Base64));
        assert_eq!(decode_base64(b"!!!!"), Err(SaslError::Base64));
        assert_eq!(decode_base64(b"aGVsbG8=\r\n"), Err(SaslError::Base64));
    }

    #[test]
    fn plain_forms() {
        let c = decode_plain(b"\0alice\0s3cret").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.expose_secret(), "s3cret");
        let c = decode_plain(b"alice\0alice\0pw\x01with space").unwrap();
        assert_eq!(c.password.expose_secret(), "pw\x01with space");
        let c = decode_plain("\0j\u{f6}rg\0p\u{e4}ss".as_bytes()).unwrap();
        assert_eq!(c.user, "j\u{f6}rg");
    }

    #[test]
    fn plain_refusals() {
        assert_eq!(
            decode_plain(b"bob\0alice\0pw").err(),
            Some(SaslError::AuthzidMismatch)
        );
        assert_eq!(decode_plain(b"\0\0pw").err(), Some(SaslError::EmptyUser));
        assert_eq!(
            decode_plain(b"\0alice\0").err(),
            Some(SaslError::EmptyPassword)
        );
        assert_eq!(
            decode_plain(b"alice\0pw").err(),
            Some(SaslError::PlainFormat)
        );
        assert_eq!(decode_plain(b"").err(), Some(SaslError::PlainFormat));
        assert_eq!(
            decode_plain(b"\0alice\0pw\0more").err(),
            Some(SaslError::PlainFormat)
        );
        assert_eq!(
            decode_plain(b"\0al\xffice\0pw").err(),
            Some(SaslError::NotUtf8)
        );
        assert_eq!(
            decode_plain(b"\0alice\0p\xc3").err(),
            Some(SaslError::NotUtf8)
        );
    }

    #[test]
    fn errors_do_not_quote_input() {
        for input in [&b"secretpw"[..], b"\0\0secretpw", b"x\0y\0secretpw"] {
            if let Err(e) = decode_plain(input) {
                assert!(!e.to_string().contains("secretpw"));
            }
        }
    }

    #[test]
    fn login_prompts_and_pending_user() {
        assert_eq!(
            decode_base64(LOGIN_PROMPT_USER.as_bytes()).unwrap(),
            b"Username:"
        );
        assert_eq!(
            decode_base64(LOGIN_PROMPT_PASSWORD.as_bytes()).unwrap(),
            b"Password:"
        );
        let user = PendingUser::new(b"alice-secret-name".to_vec());
        assert!(!format!("{user:?}").contains("alice"));
        let c = user.with_password(b"pw").unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose_secret()),
            ("alice-secret-name", "pw")
        );
        assert_eq!(
            PendingUser::new(Vec::new()).with_password(b"pw").err(),
            Some(SaslError::EmptyUser)
        );
        assert_eq!(
            PendingUser::new(b"u".to_vec()).with_password(b"").err(),
            Some(SaslError::EmptyPassword)
        );
    }

    #[test]
    fn xoauth2_format() {
        let r = xoauth2_response(&token("alice@example.com"));
        let raw = decode_base64(r.expose_secret().as_bytes()).unwrap();
        assert_eq!(
            raw,
            b"user=alice@example.com\x01auth=Bearer ya29.tok\x01\x01".to_vec()
        );
    }

    #[test]
    fn oauthbearer_format() {
        let r = oauthbearer_response(&token("a,b=c@example.com"));
        let raw = decode_base64(r.expose_secret().as_bytes()).unwrap();
        assert_eq!(
            raw,
            b"n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer ya29.tok\x01\x01"
                .to_vec()
        );
        let mut t = token("u");
        t.host.clear();
        t.port = 0;
        let raw = decode_base64(oauthbearer_response(&t).expose_secret().as_bytes()).unwrap();
        assert_eq!(raw, b"n,a=u,\x01auth=Bearer ya29.tok\x01\x01".to_vec());
    }

    #[test]
    fn responses_hide_token_in_debug() {
        let r = xoauth2_response(&token("u"));
        assert!(!format!("{r:?}").contains(r.expose_secret()));
        assert!(!format!("{:?}", token("u")).contains("ya29"));
    }

    #[test]
    fn failure_challenges() {
        let b64 = STANDARD
            .encode(br#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#);
        let c = parse_failure_challenge(b64.as_bytes()).unwrap();
        assert_eq!(c.status.as_deref(), Some("401"));
        assert_eq!(c.schemes.as_deref(), Some("bearer"));
        assert_eq!(c.scope.as_deref(), Some("https://mail.google.com/"));
        assert!(c.suggests_retry());

        let b64 = STANDARD.encode(br#"{"status":400}"#);
        let c = parse_failure_challenge(b64.as_bytes()).unwrap();
        assert_eq!(c.status.as_deref(), Some("400"));
        assert!(c.suggests_retry());

        let b64 = STANDARD.encode(
            br#"{"status":"invalid_token","openid-configuration":"https://x/.well-known"}"#,
        );
        assert!(
            parse_failure_challenge(b64.as_bytes())
                .unwrap()
                .suggests_retry()
        );

        let b64 = STANDARD.encode(br#"{"status":"403","scope":"x"}"#);
        assert!(
            !parse_failure_challenge(b64.as_bytes())
                .unwrap()
                .suggests_retry()
        );
        let b64 = STANDARD.encode(br#"{}"#);
        assert!(
            !parse_failure_challenge(b64.as_bytes())
                .unwrap()
                .suggests_retry()
        );

        assert_eq!(parse_failure_challenge(b""), None);
        assert_eq!(parse_failure_challenge(b"not base64!"), None);
        assert_eq!(
            parse_failure_challenge(STANDARD.encode(b"[1,2]").as_bytes()),
            None
        );
        assert_eq!(
            parse_failure_challenge(STANDARD.encode(b"{broken").as_bytes()),
            None
        );
    }

    /// Up to `max` random bytes.
    fn bytes(next: &mut impl FnMut() -> u64, max: usize) -> Vec<u8> {
        let n = (next() as usize) % (max + 1);
        (0..n).map(|_| next() as u8).collect()
    }

    #[test]
    fn prop_plain_roundtrip_and_no_panic() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let junk = bytes(&mut next, 40);
            let _ = decode_plain(&junk);
            let _ = decode_base64(&junk);
            let _ = parse_failure_challenge(&junk);
            let _ = parse_failure_challenge(STANDARD.encode(&junk).as_bytes());

            let user: String = (0..1 + next() % 12)
                .map(|_| char::from(b'a' + (next() % 26) as u8))
                .collect();
            let pw: String = (0..1 + next() % 12)
                .map(|_| char::from(0x20 + (next() % 95) as u8))
                .collect();
            let authz = if next().is_multiple_of(2) {
                ""
            } else {
                user.as_str()
            };
            let msg = format!("{authz}\0{user}\0{pw}");
            let b64 = STANDARD.encode(msg.as_bytes());
            let c = decode_plain(&decode_base64(b64.as_bytes()).unwrap()).unwrap();
            assert_eq!(c.user, user);
            assert_eq!(c.password.expose_secret(), pw);
        }
    }
}
