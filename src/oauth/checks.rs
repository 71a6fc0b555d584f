//! Checks on access tokens before anyone uses them.

use secrecy::{ExposeSecret, SecretString};

use crate::config::Protocol;
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

/// The permission a Microsoft token needs for a protocol: the delegated
/// scope (`scp`) and the application role (`roles`, client credentials).
pub fn microsoft_permission(protocol: Protocol) -> (&'static str, &'static str) {
    match protocol {
        Protocol::Imap => ("IMAP.AccessAsUser.All", "IMAP.AccessAsApp"),
        Protocol::Pop3 => ("POP.AccessAsUser.All", "POP.AccessAsApp"),
        Protocol::Smtp => ("SMTP.Send", "SMTP.SendAsApp"),
    }
}

/// A Microsoft token that lacks the permission some protocol needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the access token lacks {}: it holds {}", .missing.join(", "), if .held.is_empty() { "no permission".to_string() } else { .held.join(" ") })]
pub struct MissingPermissions {
    /// The permissions missing (`IMAP.AccessAsUser.All`, ...), one per
    /// protocol that lacks one.
    pub missing: Vec<String>,
    /// What the token holds (`scp` and `roles`).
    pub held: Vec<String>,
}

/// For Microsoft: the permissions of a JWT access token (`scp`, `roles`)
/// must cover each of `protocols` (IMAP.AccessAsUser.All, POP.AccessAsUser.All,
/// SMTP.Send, or their app roles). A scope counts with or without its
/// resource prefix (`https://outlook.office.com/SMTP.Send`). Ok(None) when
/// there is nothing to judge: another provider, or an opaque token
/// (personal accounts); else Ok with what the token holds.
pub fn check_permissions(
    provider: &Provider,
    token: &SecretString,
    protocols: &[Protocol],
) -> Result<Option<Vec<String>>, MissingPermissions> {
    if provider.preset != Preset::Microsoft {
        return Ok(None);
    }
    let Some(held) = super::jwt::permissions(token.expose_secret()) else {
        return Ok(None);
    };
    let has = |name: &str| {
        held.iter()
            .any(|p| p.rsplit('/').next().unwrap_or(p).eq_ignore_ascii_case(name))
    };
    let missing: Vec<String> = protocols
        .iter()
        .map(|p| microsoft_permission(*p))
        .filter(|(delegated, app)| !has(delegated) && !has(app))
        .map(|(delegated, _)| delegated.to_string())
        .collect();
    if missing.is_empty() {
        Ok(Some(held))
    } else {
        Err(MissingPermissions { missing, held })
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

    fn jwt_scp(scp: &str) -> SecretString {
        let payload = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"aud":"https://outlook.office.com","scp":"{scp}"}}"#
        ));
        SecretString::from(format!("e30.{payload}.sig"))
    }

    #[test]
    fn microsoft_tokens_must_hold_what_the_protocols_need() {
        let ms = provider("microsoft");
        let all = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];
        let full = jwt_scp("IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send");
        assert_eq!(
            check_permissions(&ms, &full, &all)
                .unwrap()
                .map(|h| h.len()),
            Some(3)
        );
        // Resource-prefixed scopes count too (as the sandbox writes them).
        let prefixed = jwt_scp(
            "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access",
        );
        assert!(check_permissions(&ms, &prefixed, &[Protocol::Imap, Protocol::Smtp]).is_ok());
        let e = check_permissions(&ms, &prefixed, &all).unwrap_err();
        assert_eq!(e.missing, ["POP.AccessAsUser.All"]);
        assert!(e.to_string().starts_with("the access token lacks POP.AccessAsUser.All: it holds https://outlook.office.com/IMAP"), "{e}");
        // App roles (client credentials).
        let payload = URL_SAFE_NO_PAD.encode(r#"{"roles":["IMAP.AccessAsApp"]}"#);
        let app = SecretString::from(format!("e30.{payload}.sig"));
        assert!(check_permissions(&ms, &app, &[Protocol::Imap]).is_ok());
        assert_eq!(
            check_permissions(&ms, &app, &[Protocol::Smtp])
                .unwrap_err()
                .missing,
            ["SMTP.Send"]
        );
        // Nothing to judge: opaque tokens, other providers.
        assert_eq!(
            check_permissions(&ms, &SecretString::from("EwBw-opaque"), &all),
            Ok(None)
        );
        assert_eq!(
            check_permissions(&provider("custom"), &full, &all),
            Ok(None)
        );
    }
}
