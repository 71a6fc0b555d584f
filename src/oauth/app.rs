//! App-only access tokens: client credentials (a secret or a certificate)
//! and Google service accounts (a JWT bearer assertion for the mailbox).
//! Nothing is stored for these grants; the token source asks for a new
//! token whenever the cached one runs out, and `authorize` gets the first
//! one the same way.

use secrecy::SecretString;

use super::flows::{self, FlowEndpoints, FlowError, Obtained};
use crate::config::{Account, GrantKind};
use crate::provider::Provider;

/// The flow endpoints of a provider with the given scopes.
pub fn endpoints<'a>(provider: &'a Provider, scopes: &'a [String]) -> FlowEndpoints<'a> {
    FlowEndpoints {
        client_id: &provider.client_id,
        client_secret: provider.client_secret.as_ref(),
        authorize_url: provider.authorize_url.as_deref(),
        token_url: &provider.token_url,
        device_url: provider.device_url.as_deref(),
        scopes,
    }
}

/// App-only tokens: client credentials (secret or certificate), or a
/// service account's JWT bearer assertion for the mailbox. Key material is
/// read from its files each time (about once an hour).
pub async fn app_token(
    provider: &Provider,
    account: &Account,
    http: &reqwest::Client,
) -> Result<Obtained, FlowError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| FlowError::io(format!("cannot read {}", path.display()), e))
    };
    match account.grant {
        GrantKind::ServiceAccount => {
            let path = provider.service_account_key_file.as_ref().ok_or_else(|| {
                FlowError::Unsupported("the provider has no service_account_key_file".into())
            })?;
            let key = flows::ServiceAccountKey::from_json(&read(path)?)?;
            flows::jwt_bearer(
                &endpoints(provider, &provider.scopes),
                http,
                &key,
                &account.upstream_user,
            )
            .await
        }
        _ => {
            let ep = endpoints(provider, &provider.app_scopes);
            match &provider.client_certificate {
                Some((cert, key)) => {
                    let cert_pem = read(cert)?;
                    let key_pem = SecretString::from(read(key)?);
                    let proof = flows::ClientProof::Certificate {
                        key_pem: &key_pem,
                        cert_pem: &cert_pem,
                    };
                    // The assertion is the client's proof: no secret beside it.
                    let ep = FlowEndpoints {
                        client_secret: None,
                        ..ep
                    };
                    flows::client_credentials(&ep, http, proof).await
                }
                None => flows::client_credentials(&ep, http, flows::ClientProof::Secret).await,
            }
        }
    }
}
