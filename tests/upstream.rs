//! The upstream side of a login, end to end against the sandbox: a cached
//! token refused without a challenge (Microsoft's way) is replaced once;
//! a cold login refreshes while it connects; a session the server ends
//! says why in the log; mailbridge names itself in IMAP `ID`.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use mailbridge_sandbox::{ImapServerOptions, Pop3ServerOptions, SmtpServerOptions};

/// Every log line of this test binary (info and up).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Capture {
    static LOGS: OnceLock<Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        capture
    })
}

/// The log lines that contain `needle`, waiting up to 10 s for one.
async fn log_lines_with(needle: &str) -> Vec<String> {
    for _ in 0..200 {
        let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).to_string();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Vec::new()
}

/// The sandbox servers refusing tokens as Microsoft 365 does: no failure
/// challenge, just `NO AUTHENTICATE failed.`, `535 5.7.3`, `-ERR`.
fn like_microsoft() -> Options {
    Options {
        upstream: ImapServerOptions {
            failure_challenge: false,
            ..ImapServerOptions::default()
        },
        smtp: SmtpServerOptions {
            failure_challenge: false,
            ..SmtpServerOptions::default()
        },
        pop3: Pop3ServerOptions {
            failure_challenge: false,
            ..Pop3ServerOptions::default()
        },
        ..Options::default()
    }
}

async fn smtp_login(h: &Harness) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut c = Client::plain(h.smtp_addr).await;
    c.smtp_reply().await;
    c.smtp("EHLO upstream.example").await;
    let plain = b64.encode(format!("\0{USER}\0{PASSWORD}"));
    c.smtp(&format!("AUTH PLAIN {plain}")).await
}

async fn pop3_login(h: &Harness) -> String {
    let mut c = Client::plain(h.pop3_addr).await;
    c.line().await;
    c.send(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes())
        .await;
    c.line().await;
    c.line().await
}

#[tokio::test]
async fn a_cached_token_refused_without_a_challenge_is_refreshed_once_imap() {
    logs();
    let h = Harness::start(like_microsoft()).await;
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(h.provider.refresh_requests(), 1);
    // Revoked early: the cached token still looks fresh to mailbridge.
    h.provider.revoke_access_tokens(USER);
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(h.imap.auth_failures(), 1, "the cached token was tried once");
    assert_eq!(h.provider.refresh_requests(), 2, "one refresh replaced it");
    // The new token is the cached one now: no refresh, no refusal.
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(
        (h.imap.auth_failures(), h.provider.refresh_requests()),
        (1, 2)
    );
    println!(
        "IMAP: {} logins, {} refused, {} refreshes",
        h.imap.logins(),
        h.imap.auth_failures(),
        h.provider.refresh_requests()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_cached_token_refused_without_a_challenge_is_refreshed_once_smtp_and_pop3() {
    logs();
    let h = Harness::start(like_microsoft()).await;
    assert!(smtp_login(&h).await.starts_with("235"));
    h.provider.revoke_access_tokens(USER);
    let r = smtp_login(&h).await;
    assert!(r.starts_with("235"), "{r}");
    assert_eq!(h.smtp.auth_failures(), 1);
    assert_eq!(h.provider.refresh_requests(), 2);
    h.provider.revoke_access_tokens(USER);
    let r = pop3_login(&h).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert_eq!(h.pop3.auth_failures(), 1);
    assert_eq!(h.provider.refresh_requests(), 3);
    println!(
        "SMTP: {} refused; POP3: {} refused; {} refreshes",
        h.smtp.auth_failures(),
        h.pop3.auth_failures(),
        h.provider.refresh_requests()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_revoked_grant_behind_a_refused_token_says_so() {
    logs();
    let h = Harness::start(like_microsoft()).await;
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    h.provider.revoke_user(USER);
    h.provider.revoke_access_tokens(USER);
    // The refused token is not handed out again: the refresh says why.
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.contains("invalid_grant"), "{no}");
    assert_eq!(h.imap.auth_failures(), 1, "the refused token went up once");
    let r = smtp_login(&h).await;
    assert!(r.contains("invalid_grant"), "{r}");
    // Nor later, although the refresh that should have replaced it failed:
    // the token source dropped it.
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.contains("invalid_grant"), "{no}");
    assert_eq!(
        h.imap.auth_failures(),
        1,
        "the refused token went up again after a failed refresh"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_temporary_refusal_is_not_retried() {
    logs();
    let h = Harness::start(like_microsoft()).await;
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    h.provider.set_validation_unavailable(true);
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    assert_eq!(h.provider.refresh_requests(), 1, "no refresh for that");
    h.provider.set_validation_unavailable(false);
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(h.provider.refresh_requests(), 1);
    h.stop().await;
}

/// Microsoft ends an IMAP session whose token expired with `* BYE
/// Session invalidated - AccessTokenExpired`: the session's log line says
/// so.
#[tokio::test]
async fn a_session_the_server_ends_is_logged_with_its_reason() {
    logs();
    let h = Harness::start(Options {
        upstream: ImapServerOptions {
            bye_on_invalid_token: true,
            ..ImapServerOptions::default()
        },
        ..Options::default()
    })
    .await;
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let r = c.cmd("n1", "NOOP").await;
    assert!(r.last().unwrap().starts_with("n1 OK"), "{r:?}");
    h.provider.revoke_access_tokens(USER);
    c.send(b"n2 NOOP\r\n").await;
    assert_eq!(
        c.line().await,
        "* BYE Session invalidated - AccessTokenExpired"
    );
    assert_eq!(c.line().await, "", "closed after the BYE");
    drop(c);
    let lines = log_lines_with("session ended by the server").await;
    let ours: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("AccessTokenExpired"))
        .collect();
    assert!(!ours.is_empty(), "{lines:?}");
    println!("{}", ours[0]);
    // A client's own LOGOUT is not the server ending the session.
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let r = c.cmd("z", "LOGOUT").await;
    assert!(r.last().unwrap().starts_with("z OK"), "{r:?}");
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).to_string();
    assert!(!text.contains("Sandbox IMAP logging out"), "{text}");
    h.stop().await;
}

/// A cold login (no cached token) refreshes while it connects: with a
/// slow token endpoint and a server slow to greet it takes about the
/// longer of the two, not their sum.
#[tokio::test]
async fn a_cold_login_refreshes_while_it_connects() {
    logs();
    let delay = Duration::from_millis(700);
    let h = Harness::start(Options {
        upstream: ImapServerOptions {
            greeting_delay: delay,
            ..ImapServerOptions::default()
        },
        ..Options::default()
    })
    .await;
    h.provider.set_token_delay(delay);

    // The refresh alone, with a refresh token of its own (mailbridge's
    // rotates, and replaying it would revoke the grant).
    let own = h.provider.issue_refresh_token(USER, "mail");
    let http = reqwest::Client::new();
    let started = Instant::now();
    let r = http
        .post(h.provider.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", own.as_str()),
            ("client_id", "mailbridge-test"),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let refresh = started.elapsed();

    // The connection alone: TCP, TLS and the greeting.
    let started = Instant::now();
    let mut direct = Client::tls(h.imap.addr(), h.client_tls_config()).await;
    assert!(direct.line().await.starts_with("* OK"));
    let connect = started.elapsed();
    drop(direct);

    let started = Instant::now();
    let (_c, ok) = h.login(PASSWORD).await;
    let cold = started.elapsed();
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(h.provider.refresh_requests(), 2, "the login refreshed");
    let sum = refresh + connect;
    println!(
        "cold login {:.0} ms; refresh alone {:.0} ms, connect and greeting alone {:.0} ms, sum {:.0} ms",
        cold.as_secs_f64() * 1000.0,
        refresh.as_secs_f64() * 1000.0,
        connect.as_secs_f64() * 1000.0,
        sum.as_secs_f64() * 1000.0
    );
    // A loose bound: overlapped, the login costs about the longer one.
    assert!(
        cold.as_secs_f64() < 0.8 * sum.as_secs_f64(),
        "cold login {cold:?} vs refresh {refresh:?} + connect {connect:?}"
    );
    h.stop().await;
}

/// mailbridge names itself in IMAP `ID` when the server offers it: alone
/// when the client sent no ID, after the client's own pairs when it did.
#[tokio::test]
async fn imap_id_upstream_names_mailbridge_and_the_client() {
    logs();
    let h = Harness::start(Options::default()).await;
    let version = env!("CARGO_PKG_VERSION");
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(
        h.imap.last_client_id(),
        Some(format!(
            "(\"name\" \"mailbridge\" \"version\" \"{version}\")"
        ))
    );
    let mut c = h.client().await;
    let r = c
        .cmd("i1", "ID (\"name\" \"Thunderbird\" \"version\" \"115.0\")")
        .await;
    assert!(r.last().unwrap().starts_with("i1 OK"), "{r:?}");
    let r = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    let sent = h.imap.last_client_id().unwrap();
    assert_eq!(
        sent,
        format!(
            "(\"name\" \"Thunderbird\" \"version\" \"115.0\" \"x-proxy-name\" \"mailbridge\" \"x-proxy-version\" \"{version}\")"
        )
    );
    println!("upstream ID {sent}");
    h.stop().await;
}

/// The server offers only OAUTHBEARER and the provider's `mechanisms`
/// allows only XOAUTH2: the client's `NO` says which setting leaves the
/// offered mechanism out, not that the server offers neither.
#[tokio::test]
async fn a_mechanism_the_setting_leaves_out_is_named_to_the_client() {
    logs();
    let h = Harness::start(Options {
        upstream: ImapServerOptions {
            mechanisms: vec![mailbridge_proto::sasl::Mechanism::Oauthbearer],
            ..ImapServerOptions::default()
        },
        mechanisms: Some("[\"xoauth2\"]"),
        ..Options::default()
    })
    .await;
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO"), "{no}");
    assert!(
        no.contains("does not offer XOAUTH2")
            && no.contains(
                "it offers OAUTHBEARER, which the provider's `mechanisms` setting leaves out"
            ),
        "{no}"
    );
    // The log says it once (the chain begins with the client's sentence).
    let lines: Vec<String> = log_lines_with("does not offer XOAUTH2")
        .await
        .into_iter()
        .filter(|l| l.contains("upstream login failed"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        lines[0].matches("does not offer XOAUTH2").count(),
        1,
        "{lines:?}"
    );
    h.stop().await;
}
