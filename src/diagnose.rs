//! Explanations for refusals people can act on. The provider facts
//! (which refusal means what, and what to do about it) live in two tables:
//! `ROWS`, over the typed upstream login refusals the protocol crate
//! reads, and `TOKEN_ROWS`, over the token endpoint's OAuth2 errors (the
//! `error` code and `error_description` a refused refresh carries:
//! Microsoft's AADSTS codes, Google's `invalid_grant` texts). A new
//! Microsoft or Google error is one more row. Logins use them in what the
//! client is told, alerts in their advice.

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

/// What a token endpoint's refusal means for a person: why, and what to
/// do. One line each, no secret (built from our own words and the
/// provider's error code only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenExplanation {
    /// Microsoft's AADSTS code, when the description starts with one.
    pub aadsts: Option<u32>,
    /// Why the provider refused.
    pub cause: String,
    /// What to do about it.
    pub fix: &'static str,
    /// Whether the grant is gone, so someone must sign in again
    /// (`mailbridge account reauthorize`).
    pub reauthorize: bool,
}

impl TokenExplanation {
    /// The cause and the fix as one sentence, with the command that
    /// re-authorizes `account` when the grant is gone.
    pub fn sentence(&self, account: &str) -> String {
        let mut s = format!("{}; {}", self.cause, self.fix);
        if self.reauthorize {
            s.push_str(&format!(
                "; then `mailbridge account reauthorize {account}`"
            ));
        }
        s
    }
}

/// The AADSTS number a Microsoft `error_description` names
/// (`AADSTS700082: The refresh token has expired ...`).
pub fn aadsts_code(description: &str) -> Option<u32> {
    let at = description.find("AADSTS")?;
    let digits: String = description[at + "AADSTS".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Explains a refused token request: `code` and `description` are the
/// OAuth2 `error` and `error_description` as the token source carries
/// them; `grant_age_secs` is how long ago the grant (or its last rotation)
/// was obtained, when known. None when the refusal is not a known one.
pub fn explain_token(
    code: &str,
    description: &str,
    grant_age_secs: Option<u64>,
) -> Option<TokenExplanation> {
    let aadsts = aadsts_code(description);
    let desc = description.to_ascii_lowercase();
    let row = TOKEN_ROWS.iter().find(|row| match row.when {
        When::Aadsts(n) => aadsts == Some(n),
        When::Says { code: c, text } => code == c && desc.contains(text),
        When::Code(c) => code == c,
    })?;
    let mut cause = row.cause.to_string();
    let mut fix = row.fix;
    if row.google_expiry {
        // Google's Testing-mode rule: refresh tokens of an app whose
        // consent screen is in "Testing" last seven days.
        if let Some(days) = grant_age_secs.filter(|a| (SIX_AND_A_HALF_DAYS..NINE_DAYS).contains(a))
        {
            cause = format!(
                "Google ended the grant after about {} days: apps in \"Testing\" get refresh tokens that last seven days",
                (days + 43_200) / 86_400
            );
            fix = "publish the app (OAuth consent screen: \"In production\")";
        }
    }
    Some(TokenExplanation {
        aadsts,
        cause,
        fix,
        reauthorize: row.reauthorize,
    })
}

const SIX_AND_A_HALF_DAYS: u64 = 13 * 43_200;
const NINE_DAYS: u64 = 9 * 86_400;

/// What a token row matches.
#[derive(Clone, Copy)]
enum When {
    /// Microsoft's AADSTS number in the description.
    Aadsts(u32),
    /// This `error` code with these words in the description
    /// (case-insensitive).
    Says {
        code: &'static str,
        text: &'static str,
    },
    /// This `error` code, whatever the description.
    Code(&'static str),
}

/// One known token endpoint refusal.
struct TokenRow {
    when: When,
    cause: &'static str,
    fix: &'static str,
    /// The grant is gone: someone must sign in again.
    reauthorize: bool,
    /// Google's expired-or-revoked: the seven-day rule may apply.
    google_expiry: bool,
}

const fn token_row(
    when: When,
    cause: &'static str,
    fix: &'static str,
    reauthorize: bool,
) -> TokenRow {
    TokenRow {
        when,
        cause,
        fix,
        reauthorize,
        google_expiry: false,
    }
}

/// Known token endpoint refusals, first match wins: Microsoft's AADSTS
/// codes first, then words, then bare error codes.
const TOKEN_ROWS: &[TokenRow] = &[
    token_row(
        When::Aadsts(700082),
        "the refresh token expired after 90 days without use",
        "keep grants alive with a login at least monthly, or key_mode = \"service\" (background refresh)",
        true,
    ),
    token_row(
        When::Aadsts(70043),
        "a Conditional Access sign-in frequency policy ended the grant",
        "sign in again; the tenant's administrator sets how often in Conditional Access",
        true,
    ),
    token_row(
        When::Aadsts(700084),
        "the refresh token hit its fixed lifetime (one day for apps registered as a single-page app)",
        "register the redirect URI under \"Mobile and desktop applications\" instead",
        true,
    ),
    token_row(
        When::Aadsts(50076),
        "Microsoft now requires multi-factor authentication for this sign-in (policy or location changed)",
        "complete MFA when signing in again in the browser",
        true,
    ),
    token_row(
        When::Aadsts(50079),
        "Microsoft requires the user to register for multi-factor authentication",
        "register MFA at https://aka.ms/mfasetup first",
        true,
    ),
    token_row(
        When::Aadsts(53003),
        "a Conditional Access policy blocked the token (device, location or app rules)",
        "an administrator must allow this sign-in; the Entra sign-in log names the policy",
        false,
    ),
    token_row(
        When::Aadsts(65001),
        "nobody has consented to the app's permissions, or consent was withdrawn",
        "accept the permissions when signing in again (or an administrator consents for the tenant)",
        true,
    ),
    token_row(
        When::Aadsts(7000218),
        "the app registration does not allow public clients, so a request without a client secret is refused",
        "turn on \"Allow public client flows\" (app registration, Authentication) or set client_secret_file for the provider",
        false,
    ),
    token_row(
        When::Aadsts(700016),
        "Entra ID knows no app with this client id in this tenant (wrong client_id or tenant)",
        "check client_id and tenant in the provider's config against the app registration's Overview page",
        false,
    ),
    token_row(
        When::Aadsts(90002),
        "the tenant does not exist (wrong tenant name or id)",
        "check tenant in the provider's config: common, organizations, consumers or the directory (tenant) id",
        false,
    ),
    token_row(
        When::Aadsts(50173),
        "the grant was revoked because the user's password changed or was reset",
        "sign in again with the new password",
        true,
    ),
    TokenRow {
        when: When::Says {
            code: "invalid_grant",
            text: "token has been expired or revoked",
        },
        cause: "Google says the refresh token expired or was revoked (access removed, password changed, or six months unused)",
        fix: "check the app's access in the Google account",
        reauthorize: true,
        google_expiry: true,
    },
    token_row(
        When::Code("invalid_client"),
        "the provider does not accept the client credentials (unknown client_id, or a wrong or expired client secret)",
        "check client_id and client_secret_file in the provider's config (Microsoft client secrets expire: make a new one in the app registration)",
        false,
    ),
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

#[cfg(test)]
mod token_tests {
    use oauth2::RequestTokenError;
    use oauth2::basic::BasicErrorResponse;

    use super::*;

    /// The provider's JSON error body as the token source reads it (the
    /// same parsing a refused refresh goes through): `error` and
    /// `error_description`.
    fn read(body: &str) -> (String, String) {
        let parsed: BasicErrorResponse = serde_json::from_str(body).expect("an OAuth2 error body");
        match crate::oauth::flows::token_error(
            RequestTokenError::<std::io::Error, _>::ServerResponse(parsed),
        ) {
            crate::oauth::flows::FlowError::Token {
                code, description, ..
            } => (code, description),
            other => panic!("not a refusal: {other}"),
        }
    }

    fn explained(body: &str, age: Option<u64>) -> TokenExplanation {
        let (code, description) = read(body);
        explain_token(&code, &description, age).unwrap_or_else(|| panic!("unexplained: {body}"))
    }

    /// Microsoft's error body: `error`, the AADSTS description with trace
    /// and correlation ids, and the rest of its fields.
    fn microsoft(error: &str, description: &str, code: u32) -> String {
        serde_json::json!({
            "error": error,
            "error_description": format!("{description}\r\nTrace ID: 0b7c7d5e-1c2f-4a57-9f1e-5c4b0d1a2b00\r\nCorrelation ID: 7f0a3c1e-8d2b-4e6f-9a1b-2c3d4e5f6a7b\r\nTimestamp: 2026-11-27 10:11:12Z"),
            "error_codes": [code],
            "timestamp": "2026-11-27 10:11:12Z",
            "trace_id": "0b7c7d5e-1c2f-4a57-9f1e-5c4b0d1a2b00",
            "correlation_id": "7f0a3c1e-8d2b-4e6f-9a1b-2c3d4e5f6a7b",
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        })
        .to_string()
    }

    #[test]
    fn microsoft_token_errors_have_a_cause_and_a_fix() {
        let cases: [(&str, &str, u32, &str, bool); 11] = [
            (
                "invalid_grant",
                "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T08:00:00.0000000Z and was inactive for 90.00:00:00.",
                700082,
                "90 days",
                true,
            ),
            (
                "invalid_grant",
                "AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks by conditional access. The token was issued on 2026-11-20T08:00:00.0000000Z and the maximum allowed lifetime for this request is 43200.",
                70043,
                "sign-in frequency",
                true,
            ),
            (
                "invalid_grant",
                "AADSTS700084: The refresh token was issued to a single page app (SPA), and therefore has a fixed, limited lifetime of 1.00:00:00, which cannot be extended. It is now expired and a new sign in request must be sent by the SPA to the sign in page. The token was issued on 2026-11-26T08:00:00.0000000Z.",
                700084,
                "single-page app",
                true,
            ),
            (
                "invalid_grant",
                "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
                50076,
                "multi-factor",
                true,
            ),
            (
                "invalid_grant",
                "AADSTS50079: Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
                50079,
                "register for multi-factor",
                true,
            ),
            (
                "invalid_grant",
                "AADSTS53003: Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.",
                53003,
                "Conditional Access policy blocked",
                false,
            ),
            (
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented to use the application with ID '9e5f94bc-e8a4-4e73-b8be-63364c29d753' named 'mailbridge'. Send an interactive authorization request for this user and resource.",
                65001,
                "consent",
                true,
            ),
            (
                "invalid_client",
                "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                7000218,
                "public client",
                false,
            ),
            (
                "unauthorized_client",
                "AADSTS700016: Application with identifier '9e5f94bc-e8a4-4e73-b8be-63364c29d753' was not found in the directory 'Contoso'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                700016,
                "client id",
                false,
            ),
            (
                "invalid_request",
                "AADSTS90002: Tenant 'contoso.onmicrosoft.con' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.",
                90002,
                "tenant does not exist",
                false,
            ),
            (
                "invalid_grant",
                "AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password. The grant was issued on '2026-10-01T08:00:00.0000000Z' and the TokensValidFrom date (before which tokens are not valid) for this user is '2026-11-01T08:00:00.0000000Z'.",
                50173,
                "password changed",
                true,
            ),
        ];
        for (error, description, code, cause, reauthorize) in cases {
            let e = explained(&microsoft(error, description, code), None);
            assert_eq!(e.aadsts, Some(code), "{description}");
            assert!(e.cause.contains(cause), "{code}: {e:?}");
            assert_eq!(e.reauthorize, reauthorize, "{code}");
            let line = e.sentence("alice@example.com");
            assert!(!line.contains('\n') && line.len() < 300, "{line}");
            assert_eq!(
                line.contains("mailbridge account reauthorize alice@example.com"),
                reauthorize,
                "{line}"
            );
        }
        // A code that merely begins like a known one is not it.
        assert_eq!(aadsts_code("AADSTS7000821: something else"), Some(7000821));
        assert_eq!(
            explain_token("invalid_grant", "AADSTS7000821: something else", None),
            None
        );
        // The 90-day row's fix says how to keep a grant alive.
        let e = explained(
            &microsoft(
                "invalid_grant",
                "AADSTS700082: The refresh token has expired due to inactivity.",
                700082,
            ),
            None,
        );
        assert!(e.fix.contains("key_mode = \"service\""), "{e:?}");
        // An unknown AADSTS code is not explained.
        assert_eq!(
            explain_token("invalid_grant", "AADSTS9002313: Invalid request.", None),
            None
        );
    }

    #[test]
    fn google_expired_or_revoked_and_the_seven_day_rule() {
        let body = r#"{
  "error": "invalid_grant",
  "error_description": "Token has been expired or revoked."
}"#;
        let days = |d: f64| Some((d * 86_400.0) as u64);
        // A grant about a week old: the Testing-mode rule is named.
        for age in [days(7.0), days(7.2), days(6.6), days(8.9)] {
            let e = explained(body, age);
            assert!(
                e.cause.contains("\"Testing\"") && e.cause.contains("seven days"),
                "{age:?}: {e:?}"
            );
            assert!(e.fix.contains("In production"), "{e:?}");
            assert!(e.reauthorize);
        }
        assert!(explained(body, days(7.2)).cause.contains("about 7 days"));
        // Older, younger or unknown: expired or revoked, no Testing story.
        for age in [None, days(2.0), days(30.0), days(200.0)] {
            let e = explained(body, age);
            assert!(e.cause.contains("expired or was revoked"), "{e:?}");
            assert!(!e.cause.contains("Testing"), "{e:?}");
            assert!(e.reauthorize);
        }
    }

    #[test]
    fn invalid_client_is_a_configuration_problem() {
        // Google's and Microsoft's (a wrong secret) bodies.
        for body in [
            r#"{"error": "invalid_client", "error_description": "The OAuth client was not found."}"#.to_string(),
            r#"{"error": "invalid_client", "error_description": "Unauthorized"}"#.to_string(),
            microsoft(
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '9e5f94bc-e8a4-4e73-b8be-63364c29d753'.",
                7000215,
            ),
        ] {
            let e = explained(&body, None);
            assert!(e.cause.contains("client credentials"), "{e:?}");
            assert!(e.fix.contains("client_secret_file"), "{e:?}");
            assert!(!e.reauthorize);
        }
    }

    #[test]
    fn unknown_refusals_are_not_explained() {
        // The sandbox's and oidc-provider's own words: the login falls back
        // to the provider's text.
        for (code, description) in [
            (
                "invalid_grant",
                "refresh token is invalid, expired, revoked or already used",
            ),
            ("invalid_grant", "grant request is invalid"),
            ("invalid_scope", "requested scope is not allowed"),
            ("temporarily_unavailable", ""),
        ] {
            assert_eq!(explain_token(code, description, None), None, "{code}");
        }
    }
}
