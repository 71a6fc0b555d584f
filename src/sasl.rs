//! SASL by hand: decoding the client's PLAIN / LOGIN credentials, encoding
//! the upstream XOAUTH2 / OAUTHBEARER initial responses, and reading the
//! JSON failure challenge a server sends when it refuses a bearer token.

use secrecy::SecretString;

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
