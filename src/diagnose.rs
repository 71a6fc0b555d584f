//! Explanations for upstream refusals people can act on. The provider
//! facts (which refusal means what, and what to do about it) live in one
//! table, `ROWS`, over the typed refusals the protocol crate reads; a new
//! Microsoft or Google error is one more row.

use mailbridge_proto::Refusal;
use mailbridge_proto::refusal::{EnhancedCode, RefusalCode};

/// A one-line explanation of an upstream login refusal, if it is a known
/// one: the first row of `ROWS` that matches.
pub fn explain(refusal: &Refusal) -> Option<&'static str> {
    ROWS.iter()
        .find(|row| row.matches(refusal))
        .map(|row| row.why)
}

/// Which protocols a row is about.
#[derive(Clone, Copy)]
enum On {
    /// SMTP submission.
    Smtp,
    /// Mailbox access: IMAP and POP3.
    Mailbox,
}

/// What the server's text must say (case-insensitive).
#[derive(Clone, Copy)]
enum Text {
    /// Anything.
    Any,
    /// These words, anywhere.
    Has(&'static str),
    /// These words first.
    Starts(&'static str),
}

/// One known refusal: every condition given must hold.
struct Row {
    on: On,
    /// The SMTP enhanced status code, when the row needs one.
    enhanced: Option<EnhancedCode>,
    /// The IMAP or POP3 response code, when the row needs one.
    response_code: Option<&'static str>,
    text: Text,
    /// The explanation: one line, what to do.
    why: &'static str,
}

impl Row {
    fn matches(&self, refusal: &Refusal) -> bool {
        let protocol = matches!(
            (self.on, &refusal.code),
            (On::Smtp, RefusalCode::Smtp { .. })
                | (
                    On::Mailbox,
                    RefusalCode::Imap { .. } | RefusalCode::Pop3 { .. }
                )
        );
        let enhanced = self.enhanced.is_none_or(|e| refusal.enhanced() == Some(e));
        let response_code = self
            .response_code
            .is_none_or(|name| refusal.response_code().is_some_and(|c| c.is(name)));
        let text = refusal.text.to_ascii_lowercase();
        let text = match self.text {
            Text::Any => true,
            Text::Has(words) => text.contains(words),
            Text::Starts(words) => text.starts_with(words),
        };
        protocol && enhanced && response_code && text
    }
}

/// An SMTP row.
const fn smtp(enhanced: Option<EnhancedCode>, text: Text, why: &'static str) -> Row {
    Row {
        on: On::Smtp,
        enhanced,
        response_code: None,
        text,
        why,
    }
}

/// An IMAP / POP3 row.
const fn mailbox(response_code: Option<&'static str>, text: Text, why: &'static str) -> Row {
    Row {
        on: On::Mailbox,
        enhanced: None,
        response_code,
        text,
        why,
    }
}

const fn esc(class: u8, subject: u16, detail: u16) -> Option<EnhancedCode> {
    Some(EnhancedCode::new(class, subject, detail))
}

// Explanations that several rows share.
const MS_SMTP_AUTH_OFF: &str = "SMTP AUTH is switched off for this Microsoft 365 tenant or mailbox: enable Authenticated SMTP in the admin centre or run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false";
const MS_SEND_AS: &str =
    "the mailbox may not send as this From address: grant Send As or use the account's own address";
const MS_TOKEN_EXPIRY: &str = "the token was too close to expiry for this endpoint";
const MS_NOT_LOGGED_IN: &str =
    "Microsoft saw no successful login before the mail: the client must log in before sending";
const GOOGLE_SMTP_TOKEN: &str = "Google refused the token: check that the grant has the https://mail.google.com/ scope and is not revoked";
const GOOGLE_APP_PASSWORD: &str = "Google asked for an app password, so it did not take the login as OAuth2: check that the upstream login uses XOAUTH2 or OAUTHBEARER";
const GOOGLE_WEB_LOGIN: &str = "Google wants an interactive sign-in for this account: sign in at https://accounts.google.com, then re-authorize the account";
const MS_MAILBOX_TOKEN: &str = "Microsoft refused the token: most often a Graph token (check the scope order: Outlook scopes first), IMAP/POP disabled for the mailbox, or a missing IMAP.AccessAsUser.All / POP.AccessAsUser.All permission";
const SESSION_EXPIRED: &str =
    "the server ended the session because the access token expired; reconnecting gets a fresh one";
const GOOGLE_MAILBOX_TOKEN: &str = "Google refused the token: check that the grant has the https://mail.google.com/ scope, that IMAP is enabled in Gmail's settings, and that the grant was not revoked";
const WEB_LOGIN: &str =
    "the provider wants an interactive sign-in in a browser first; then re-authorize the account";

/// Known refusals, first match wins (more specific rows first).
const ROWS: &[Row] = &[
    // Microsoft 365, SMTP AUTH.
    smtp(
        None,
        Text::Has("smtpclientauthentication is disabled"),
        MS_SMTP_AUTH_OFF,
    ),
    smtp(
        esc(5, 7, 139),
        Text::Has("security defaults"),
        "the Microsoft 365 tenant's security defaults block SMTP AUTH: an admin must turn security defaults off or allow Authenticated SMTP for this mailbox",
    ),
    smtp(
        esc(5, 7, 139),
        Text::Any,
        "Microsoft 365 refused SMTP AUTH by policy: check that Authenticated SMTP is enabled for the mailbox and that no Conditional Access policy blocks it",
    ),
    smtp(
        esc(5, 7, 3),
        Text::Has("authentication unsuccessful"),
        "Microsoft refused the token: wrong token audience (Graph instead of Outlook scopes), SMTP AUTH off for the mailbox, or missing SMTP.Send permission",
    ),
    smtp(esc(5, 7, 60), Text::Any, MS_SEND_AS),
    smtp(
        None,
        Text::Has("not have permissions to send as this sender"),
        MS_SEND_AS,
    ),
    smtp(esc(5, 5, 127), Text::Any, MS_TOKEN_EXPIRY),
    smtp(None, Text::Has("token will expire soon"), MS_TOKEN_EXPIRY),
    smtp(esc(5, 7, 57), Text::Any, MS_NOT_LOGGED_IN),
    smtp(
        None,
        Text::Has("client not authenticated to send mail"),
        MS_NOT_LOGGED_IN,
    ),
    // Google, SMTP.
    smtp(
        esc(5, 7, 8),
        Text::Has("username and password not accepted"),
        GOOGLE_SMTP_TOKEN,
    ),
    smtp(None, Text::Has("badcredentials"), GOOGLE_SMTP_TOKEN),
    smtp(esc(5, 7, 9), Text::Any, GOOGLE_APP_PASSWORD),
    smtp(
        None,
        Text::Has("application-specific password required"),
        GOOGLE_APP_PASSWORD,
    ),
    smtp(esc(5, 7, 14), Text::Any, GOOGLE_WEB_LOGIN),
    smtp(
        None,
        Text::Has("please log in via your web browser"),
        GOOGLE_WEB_LOGIN,
    ),
    // Any provider, SMTP.
    smtp(
        None,
        Text::Has("too many login attempts"),
        "the provider is throttling logins for this account: wait and try again",
    ),
    // Microsoft 365, IMAP and POP3: a token it will not take gets exactly
    // this, whatever the reason.
    mailbox(None, Text::Has("authenticate failed"), MS_MAILBOX_TOKEN),
    mailbox(
        None,
        Text::Has("authentication failure: unknown user name or bad password"),
        MS_MAILBOX_TOKEN,
    ),
    mailbox(None, Text::Has("accesstokenexpired"), SESSION_EXPIRED),
    mailbox(None, Text::Has("session invalidated"), SESSION_EXPIRED),
    // Google, IMAP and POP3.
    mailbox(
        Some("ALERT"),
        Text::Starts("invalid credentials"),
        GOOGLE_MAILBOX_TOKEN,
    ),
    mailbox(
        None,
        Text::Has("invalid credentials (failure)"),
        GOOGLE_MAILBOX_TOKEN,
    ),
    mailbox(None, Text::Has("web login required"), WEB_LOGIN),
    mailbox(Some("WEBALERT"), Text::Any, WEB_LOGIN),
];

#[cfg(test)]
mod tests {
    use mailbridge_proto::{imap, pop3, smtp};

    use super::*;

    fn smtp_reply(line: &str) -> Refusal {
        smtp::parse_refusal(line).expect("an SMTP refusal")
    }

    #[test]
    fn smtp_explanations() {
        let cases: [(&str, Option<&str>); 13] = [
            (
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
                Some("SMTP AUTH is switched off"),
            ),
            (
                "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy.",
                Some("security defaults"),
            ),
            (
                "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully.",
                Some("refused SMTP AUTH by policy"),
            ),
            (
                "535 5.7.3 Authentication unsuccessful [SN4PR0201CA0045.namprd02.prod.outlook.com]",
                Some("wrong token audience"),
            ),
            (
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender.",
                Some("Send As"),
            ),
            (
                "501 5.5.127 Token will expire soon",
                Some("too close to expiry"),
            ),
            (
                "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials",
                Some("https://mail.google.com/ scope"),
            ),
            // The sandbox's Google refusal (crates/sandbox smtp tests).
            (
                "535 5.7.8 Username and Password not accepted",
                Some("https://mail.google.com/ scope"),
            ),
            (
                "534 5.7.9 Application-specific password required.",
                Some("app password"),
            ),
            (
                "534 5.7.14 Please log in via your web browser and then try again.",
                Some("interactive sign-in"),
            ),
            (
                "454 4.7.0 Too many login attempts, please try again later.",
                Some("throttling"),
            ),
            ("535 5.7.30 Something else", None),
            ("535 Authentication failed", None),
        ];
        for (reply, want) in cases {
            let got = explain(&smtp_reply(reply));
            match want {
                Some(part) => assert!(got.is_some_and(|g| g.contains(part)), "{reply}: {got:?}"),
                None => assert_eq!(got, None, "{reply}"),
            }
            if let Some(g) = got {
                assert!(!g.contains('\n'));
            }
        }
        assert_eq!(
            explain(&smtp_reply(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."
            )),
            Some(MS_SMTP_AUTH_OFF)
        );
        // Not refusals: nothing to explain.
        assert_eq!(smtp::parse_refusal("250 2.0.0 OK"), None);
        assert_eq!(smtp::parse_refusal(""), None);
    }

    #[test]
    fn mailbox_explanations() {
        for (refusal, want) in [
            (
                imap::parse_refusal("NO AUTHENTICATE failed."),
                Some("Graph"),
            ),
            (
                pop3::parse_refusal(
                    "-ERR Authentication failure: unknown user name or bad password.",
                ),
                Some("Graph"),
            ),
            (
                imap::parse_refusal("NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"),
                Some("mail.google.com"),
            ),
            (
                imap::parse_refusal("NO [ALERT] Invalid credentials"),
                Some("mail.google.com"),
            ),
            (
                imap::parse_refusal(
                    "NO [WEBALERT https://accounts.google.com/signin/continue?x] Web login required.",
                ),
                Some("interactive sign-in"),
            ),
            (
                imap::parse_refusal("NO Session invalidated - AccessTokenExpired"),
                Some("access token expired"),
            ),
            (
                pop3::parse_refusal("-ERR [AUTH] Authentication failed"),
                None,
            ),
            (
                imap::parse_refusal("NO [AUTHENTICATIONFAILED] Authentication failed."),
                None,
            ),
        ] {
            let refusal = refusal.expect("a refusal");
            let got = explain(&refusal);
            match want {
                Some(part) => assert!(got.is_some_and(|g| g.contains(part)), "{refusal}: {got:?}"),
                None => assert_eq!(got, None, "{refusal}"),
            }
        }
    }

    #[test]
    fn rows_stay_with_their_protocol() {
        // SMTP text in an IMAP refusal, IMAP text in an SMTP one: neither.
        let imap = imap::parse_refusal("NO SmtpClientAuthentication is disabled").unwrap();
        assert_eq!(explain(&imap), None);
        let smtp = smtp_reply("535 5.7.8 AUTHENTICATE failed.");
        assert_eq!(explain(&smtp), None);
    }

    #[test]
    fn known_refusals_are_explained() {
        assert!(
            explain(&imap::parse_refusal("NO AUTHENTICATE failed.").unwrap())
                .unwrap()
                .contains("Graph")
        );
        assert!(
            explain(
                &imap::parse_refusal("NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)")
                    .unwrap()
            )
            .unwrap()
            .contains("mail.google.com")
        );
        assert!(
            explain(&smtp_reply("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."))
                .unwrap()
                .contains("Set-CASMailbox")
        );
        assert_eq!(
            explain(&pop3::parse_refusal("-ERR [AUTH] Authentication failed").unwrap()),
            None
        );
    }

    /// What Dovecot 2.3 sends when it cannot reach its introspection
    /// endpoint (seen in the interop suite) is temporary; token refusals
    /// are not. (The codes are read by the protocol crate; this is the
    /// behaviour logins rely on.)
    #[test]
    fn temporary_refusals_are_told_apart() {
        assert!(
            imap::parse_refusal(
                "NO [UNAVAILABLE] Temporary authentication failure. [host:2026-01-01 00:00:00]"
            )
            .unwrap()
            .is_temporary()
        );
        assert!(
            pop3::parse_refusal(
                "-ERR [SYS/TEMP] Temporary authentication failure. [host:2026-01-01 00:00:00]"
            )
            .unwrap()
            .is_temporary()
        );
        assert!(smtp_reply("454 4.7.0 Temporary authentication failure").is_temporary());
        for refusal in [
            imap::parse_refusal("NO [AUTHENTICATIONFAILED] Authentication failed."),
            imap::parse_refusal("NO AUTHENTICATE failed."),
            imap::parse_refusal("BAD [UNAVAILABLE] odd"),
            pop3::parse_refusal("-ERR [AUTH] Authentication failed."),
            smtp::parse_refusal("535 5.7.8 Error: authentication failed: (reason unavailable)"),
        ] {
            let refusal = refusal.expect("a refusal");
            assert!(!refusal.is_temporary(), "{refusal}");
        }
        // Old case "4": not an SMTP reply at all, so not a refusal.
        assert_eq!(smtp::parse_refusal("4"), None);
    }
}
