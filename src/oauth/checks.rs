//! Checks on access tokens before anyone uses them.

use secrecy::{ExposeSecret, SecretString};

use crate::provider::{Preset, Provider, is_outlook_audience};

/// A Microsoft access token for another resource than Exchange Online:
/// IMAP, POP and SMTP would refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the access token is for {audience}, not for Outlook/Exchange Online")]
pub struct WrongAudience {
    /// The token's `aud` values, comma-separated.
    pub audience: String,
}

/// For Microsoft: a JWT access token must be for Exchange Online. Opaque
/// tokens (personal accounts) are not judged.
pub fn check_audience(provider: &Provider, token: &SecretString) -> Result<(), WrongAudience> {
    if provider.preset != Preset::Microsoft {
        return Ok(());
    }
    match super::jwt::audiences(token.expose_secret()) {
        Some(aud) if !aud.iter().any(|a| is_outlook_audience(a)) => Err(WrongAudience {
            audience: aud.join(", "),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn provider(preset: &str) -> Provider {
        let mut c: crate::config::ProviderConfig = toml::from_str(&format!(
            "preset = \"{preset}\"\nclient_id = \"id\"\ntoken_url = \"https://idp.example/token\""
        ))
        .unwrap();
        if preset == "microsoft" {
            c.token_url = None;
        }
        crate::provider::resolve("p", &c).unwrap()
    }

    fn jwt(aud: &str) -> SecretString {
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"aud":"{aud}"}}"#));
        SecretString::from(format!("e30.{payload}.sig"))
    }

    #[test]
    fn microsoft_tokens_must_be_for_exchange_online() {
        let ms = provider("microsoft");
        assert_eq!(
            check_audience(&ms, &jwt("https://outlook.office.com")),
            Ok(())
        );
        let graph = "00000003-0000-0000-c000-000000000000";
        assert_eq!(
            check_audience(&ms, &jwt(graph)),
            Err(WrongAudience {
                audience: graph.into()
            })
        );
        // Opaque tokens are not judged, nor other providers' tokens.
        assert_eq!(
            check_audience(&ms, &SecretString::from("EwBw-opaque")),
            Ok(())
        );
        assert_eq!(check_audience(&provider("custom"), &jwt(graph)), Ok(()));
    }
}
