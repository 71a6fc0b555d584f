//! Explanations for upstream refusals people can act on: the provider
//! facts (error strings and what causes them) live here and in
//! [`crate::proto::smtp::explain`], apart from the code that moves bytes.

use crate::config::Protocol;

/// A one-line explanation of an upstream login refusal, if it is a known
/// one. `reply` is the server's final refusal line.
pub fn explain(protocol: Protocol, reply: &str) -> Option<&'static str> {
    match protocol {
        Protocol::Smtp => crate::proto::smtp::explain(reply),
        Protocol::Imap | Protocol::Pop3 => explain_mailbox_login(reply),
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
