//! Explanations for upstream refusals people can act on: the provider
//! facts (error strings and what causes them) live here and in
//! [`mailbridge_proto::smtp::explain`], apart from the code that moves bytes.

use crate::config::Protocol;

/// A one-line explanation of an upstream login refusal, if it is a known
/// one. `reply` is the server's final refusal line.
pub fn explain(protocol: Protocol, reply: &str) -> Option<&'static str> {
    match protocol {
        Protocol::Smtp => mailbridge_proto::smtp::explain(reply),
        Protocol::Imap | Protocol::Pop3 => explain_mailbox_login(reply),
    }
}

/// True when an upstream login refusal says the server could not check the
/// token just now, rather than that the token is bad: IMAP's `[UNAVAILABLE]`
/// response code (RFC 5530), POP3's `[SYS/TEMP]` or `[IN-USE]` (RFC 3206),
/// an SMTP 4xx reply. Dovecot answers `NO [UNAVAILABLE] Temporary
/// authentication failure.` / `-ERR [SYS/TEMP] ...` without a failure
/// challenge when its introspection request fails (OAuth2 server down or
/// slow). `reply` is the final refusal line without the IMAP tag.
pub fn is_temporary_refusal(protocol: Protocol, reply: &str) -> bool {
    let upper = reply.trim_start().to_ascii_uppercase();
    match protocol {
        Protocol::Imap => upper
            .strip_prefix("NO")
            .is_some_and(|rest| rest.trim_start().starts_with("[UNAVAILABLE]")),
        Protocol::Pop3 => upper.strip_prefix("-ERR").is_some_and(|rest| {
            let rest = rest.trim_start();
            rest.starts_with("[SYS/TEMP]") || rest.starts_with("[IN-USE]")
        }),
        Protocol::Smtp => {
            let b = upper.as_bytes();
            b.len() >= 3 && b[0] == b'4' && b[1].is_ascii_digit() && b[2].is_ascii_digit()
        }
    }
}

fn explain_mailbox_login(reply: &str) -> Option<&'static str> {
    let lower = reply.to_ascii_lowercase();
    // Microsoft 365 answers a token it will not take with exactly this,
    // whatever the reason.
    if lower.contains("authenticate failed")
        || lower.contains("authentication failure: unknown user name or bad password")
    {
        return Some(
            "Microsoft refused the token: most often a Graph token (check the scope order: Outlook scopes first), IMAP/POP disabled for the mailbox, or a missing IMAP.AccessAsUser.All / POP.AccessAsUser.All permission",
        );
    }
    if lower.contains("accesstokenexpired") || lower.contains("session invalidated") {
        return Some(
            "the server ended the session because the access token expired; reconnecting gets a fresh one",
        );
    }
    if lower.contains("[alert] invalid credentials")
        || lower.contains("invalid credentials (failure)")
    {
        return Some(
            "Google refused the token: check that the grant has the https://mail.google.com/ scope, that IMAP is enabled in Gmail's settings, and that the grant was not revoked",
        );
    }
    if lower.contains("web login required") || lower.contains("[webalert") {
        return Some(
            "the provider wants an interactive sign-in in a browser first; then re-authorize the account",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_refusals_are_told_apart() {
        // What Dovecot 2.3 sends when it cannot reach its introspection
        // endpoint (seen in the interop suite).
        assert!(is_temporary_refusal(
            Protocol::Imap,
            "NO [UNAVAILABLE] Temporary authentication failure. [host:2026-01-01 00:00:00]"
        ));
        assert!(is_temporary_refusal(
            Protocol::Pop3,
            "-ERR [SYS/TEMP] Temporary authentication failure. [host:2026-01-01 00:00:00]"
        ));
        assert!(is_temporary_refusal(
            Protocol::Smtp,
            "454 4.7.0 Temporary authentication failure"
        ));
        for (protocol, reply) in [
            (
                Protocol::Imap,
                "NO [AUTHENTICATIONFAILED] Authentication failed.",
            ),
            (Protocol::Imap, "NO AUTHENTICATE failed."),
            (Protocol::Imap, "BAD [UNAVAILABLE] odd"),
            (Protocol::Pop3, "-ERR [AUTH] Authentication failed."),
            (
                Protocol::Smtp,
                "535 5.7.8 Error: authentication failed: (reason unavailable)",
            ),
            (Protocol::Smtp, "4"),
        ] {
            assert!(!is_temporary_refusal(protocol, reply), "{reply}");
        }
    }

    #[test]
    fn known_refusals_are_explained() {
        assert!(
            explain(Protocol::Imap, "NO AUTHENTICATE failed.")
                .unwrap()
                .contains("Graph")
        );
        assert!(
            explain(
                Protocol::Imap,
                "NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
            )
            .unwrap()
            .contains("mail.google.com")
        );
        assert!(
            explain(Protocol::Smtp, "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.")
                .unwrap()
                .contains("Set-CASMailbox")
        );
        assert_eq!(
            explain(Protocol::Pop3, "-ERR [AUTH] Authentication failed"),
            None
        );
    }
}
