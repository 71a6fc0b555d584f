//! End-to-end SMTP through real loopback sockets: a raw client -> mailbridge
//! -> the strict sandbox SMTP server, with tokens from the sandbox provider.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use mailbridge_proto::sasl::Mechanism;
use mailbridge_sandbox::{ProviderOptions, SandboxTls, SmtpServerOptions};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn plain() -> String {
    b64(&format!("\0{USER}\0{PASSWORD}"))
}

async fn smtp_client(h: &Harness) -> Client {
    let mut c = Client::plain(h.smtp_addr).await;
    let greeting = c.smtp_reply().await;
    assert!(greeting[0].starts_with("220 "), "{greeting:?}");
    c
}

async fn ehlo(c: &mut Client) -> Vec<String> {
    c.send(b"EHLO client.example\r\n").await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
    r
}

/// A client that said EHLO and logged in with AUTH PLAIN.
async fn logged_in(h: &Harness) -> Client {
    let mut c = smtp_client(h).await;
    ehlo(&mut c).await;
    let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
    assert!(r.starts_with("235"), "{r}");
    c
}

/// MAIL FROM, RCPT TO and DATA, up to the server's 354.
async fn start_data(c: &mut Client) {
    assert!(
        c.smtp(&format!("MAIL FROM:<{USER}>"))
            .await
            .starts_with("250")
    );
    assert!(c.smtp("RCPT TO:<bob@example.org>").await.starts_with("250"));
    assert!(c.smtp("DATA").await.starts_with("354"));
}

/// Sends one message after a successful AUTH and checks it arrived.
async fn send_message(c: &mut Client, h: &Harness, body: &[u8]) {
    let before = h.smtp.messages().len();
    start_data(c).await;
    c.send(body).await;
    c.send(b".\r\n").await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("250"), "{r:?}");
    let got = h.smtp.messages();
    assert_eq!(got.len(), before + 1);
    assert_eq!(got.last().unwrap().data, body);
    assert_eq!(got.last().unwrap().user, USER);
}

#[tokio::test]
async fn ehlo_advertises_auth_and_mail_needs_auth() {
    let h = Harness::start(Options::default()).await;
    let mut c = smtp_client(&h).await;
    let caps = ehlo(&mut c).await.join("\n");
    for kw in [
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SIZE",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(caps.contains(kw), "{kw} missing: {caps}");
    }
    let r = c.smtp("MAIL FROM:<x@example.com>").await;
    assert!(r.starts_with("530 5.7.0"), "no open relay: {r}");
    assert!(c.smtp("NOOP").await.starts_with("250"));
    assert!(c.smtp("RSET").await.starts_with("250"));
    assert!(c.smtp("QUIT").await.starts_with("221"));
    h.stop().await;
}

#[tokio::test]
async fn every_auth_variant_then_send() {
    let h = Harness::start(Options::default()).await;
    // AUTH PLAIN with an initial response.
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    send_message(&mut c, &h, b"Subject: one\r\n\r\nplain ir\r\n").await;

    // AUTH PLAIN, 334 form.
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    assert!(c.smtp("AUTH PLAIN").await.starts_with("334"));
    assert!(c.smtp(&plain()).await.starts_with("235"));

    // AUTH LOGIN, both prompted.
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    assert_eq!(c.smtp("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.smtp(&b64(USER)).await, "334 UGFzc3dvcmQ6");
    assert!(c.smtp(&b64(PASSWORD)).await.starts_with("235"));

    // AUTH LOGIN with the user name as initial response, after HELO.
    let mut c = smtp_client(&h).await;
    assert!(c.smtp("HELO old-printer").await.starts_with("250"));
    assert_eq!(
        c.smtp(&format!("AUTH LOGIN {}", b64(USER))).await,
        "334 UGFzc3dvcmQ6"
    );
    assert!(c.smtp(&b64(PASSWORD)).await.starts_with("235"));
    send_message(&mut c, &h, b"Subject: printer\r\n\r\nscan attached\r\n").await;

    // `*` cancels; the session stays usable.
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    assert!(c.smtp("AUTH LOGIN").await.starts_with("334"));
    assert!(c.smtp("*").await.starts_with("501"));
    assert!(
        c.smtp(&format!("AUTH PLAIN {}", plain()))
            .await
            .starts_with("235")
    );
    assert_eq!(h.provider.refresh_requests(), 1);
    h.stop().await;
}

#[tokio::test]
async fn wrong_password_and_revoked_grant() {
    let h = Harness::start(Options::default()).await;
    let before = h.sealed_bytes();
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    let r = c
        .smtp(&format!("AUTH PLAIN {}", b64(&format!("\0{USER}\0nope"))))
        .await;
    assert!(
        r.starts_with("535 5.7.8") && r.contains("wrong password"),
        "{r}"
    );
    assert_eq!(h.sealed_bytes(), before);
    let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
    assert!(
        r.starts_with("454 4.7.0") && r.contains("try again"),
        "backoff: {r}"
    );
    h.stop().await;

    let h = Harness::start(Options::default()).await;
    h.provider.revoke_user(USER);
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
    assert!(r.starts_with("535") && r.contains("invalid_grant"), "{r}");
    h.stop().await;
}

#[tokio::test]
async fn expired_and_rejected_tokens_are_refreshed() {
    for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
        let h = Harness::start(Options {
            provider: ProviderOptions {
                access_token_lifetime: Duration::from_secs(1),
                ..ProviderOptions::default()
            },
            smtp: SmtpServerOptions {
                mechanisms: vec![mech],
                ..SmtpServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        let _c = logged_in(&h).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let _c = logged_in(&h).await;
        assert_eq!(h.provider.refresh_requests(), 2, "{mech:?}");
        h.provider
            .set_access_token_lifetime(Duration::from_secs(3600));
        let _c = logged_in(&h).await;
        // The server drops the cached token: challenge absorbed, refreshed, retried.
        h.provider.revoke_access_tokens(USER);
        let mut c = smtp_client(&h).await;
        ehlo(&mut c).await;
        let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
        assert!(r.starts_with("235"), "{mech:?}: {r}");
        assert_eq!(h.smtp.auth_failures(), 1, "{mech:?}");
        send_message(&mut c, &h, b"Subject: retried\r\n\r\nok\r\n").await;
        h.stop().await;
    }
}

#[tokio::test]
async fn two_step_upstream_and_microsoft_refusal_explained() {
    let h = Harness::start(Options {
        smtp: SmtpServerOptions {
            require_two_step: true,
            ..SmtpServerOptions::default()
        },
        ..Options::default()
    })
    .await;
    let mut c = logged_in(&h).await;
    send_message(&mut c, &h, b"Subject: two-step\r\n\r\nok\r\n").await;
    h.stop().await;

    let h = Harness::start(Options {
        smtp: SmtpServerOptions {
            auth_failure_reply: Some(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
            ),
            ..SmtpServerOptions::default()
        },
        ..Options::default()
    })
    .await;
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain()).as_bytes())
        .await;
    let r = c.smtp_reply().await.join("\n");
    assert!(
        r.contains("535") && r.contains("5.7.139"),
        "upstream code kept: {r}"
    );
    assert!(
        r.contains("SmtpClientAuthentication"),
        "upstream text kept: {r}"
    );
    assert!(r.contains("Set-CASMailbox"), "explained: {r}");
    // The session is still usable.
    assert!(c.smtp("NOOP").await.starts_with("250"));
    h.stop().await;
}

#[tokio::test]
async fn pipelined_mail_after_auth_and_a_30_mib_message() {
    let h = Harness::start(Options::default()).await;
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    let mut big = Vec::with_capacity(30 * 1024 * 1024);
    big.extend_from_slice(b"Subject: big\r\n\r\n");
    let mut n = 0u64;
    while big.len() < 30 * 1024 * 1024 {
        n += 1;
        // Lines starting with a dot must survive dot-stuffing both ways.
        if n.is_multiple_of(7) {
            big.extend_from_slice(b"..leading dot line\r\n");
        } else {
            big.extend_from_slice(
                format!("line {n:010} abcdefghijklmnopqrstuvwxyz0123456789\r\n").as_bytes(),
            );
        }
    }
    // Dot-stuff for the wire; the server stores the unstuffed bytes.
    let mut wire = Vec::with_capacity(big.len() + 1024);
    for line in big.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    // AUTH, MAIL, RCPT and DATA in one write, as a pipelining client does.
    c.send(
        format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
            plain()
        )
        .as_bytes(),
    )
    .await;
    for expect in ["235", "250", "250", "354"] {
        let r = c.smtp_reply().await;
        assert!(r.last().unwrap().starts_with(expect), "{expect}: {r:?}");
    }
    c.send(&wire).await;
    c.send(b".\r\n").await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("250"), "{r:?}");
    let got = h.smtp.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data.len(), big.len());
    assert!(got[0].data == big, "30 MiB message differs");
    assert_eq!(got[0].to, vec!["bob@example.org".to_string()]);
    assert_eq!(
        h.smtp.last_ehlo().as_deref(),
        Some("client.example"),
        "client's EHLO name passed upstream"
    );
    h.stop().await;
}

#[tokio::test]
async fn tls_on_both_sides() {
    for (listener, upstream) in [
        ("starttls", SandboxTls::StartTls),
        ("starttls", SandboxTls::Implicit),
        ("implicit", SandboxTls::StartTls),
        ("implicit", SandboxTls::Implicit),
    ] {
        let h = Harness::start(Options {
            listener_tls: listener,
            smtp: SmtpServerOptions {
                tls: upstream,
                ..SmtpServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        let mut c = if listener == "starttls" {
            Client::upgrade(
                h.smtp_addr,
                h.client_tls_config(),
                &[(b"EHLO client.example\r\n", "250 ")],
                b"STARTTLS\r\n",
                "220",
            )
            .await
        } else {
            let mut c = Client::tls(h.smtp_addr, h.client_tls_config()).await;
            assert!(c.smtp_reply().await[0].starts_with("220"));
            c
        };
        let caps = ehlo(&mut c).await.join("\n");
        assert!(
            !caps.contains("STARTTLS") && caps.contains("AUTH PLAIN LOGIN"),
            "{caps}"
        );
        let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
        assert!(r.starts_with("235"), "{listener}/{upstream:?}: {r}");
        send_message(&mut c, &h, b"Subject: tls\r\n\r\nok\r\n").await;
        h.stop().await;
    }
}

/// A temporary refusal upstream (`454 4.7.0`, RFC 4954) stays temporary and
/// is not explained as a grant to re-authorize.
#[tokio::test]
async fn upstream_temporary_failure_stays_454() {
    let h = Harness::start(Options::default()).await;
    h.provider.set_validation_unavailable(true);
    let mut c = smtp_client(&h).await;
    ehlo(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain()).as_bytes())
        .await;
    let r = c.smtp_reply().await;
    assert!(r.iter().all(|l| l.starts_with("454")), "{r:?}");
    let all = r.join("\n");
    assert!(
        all.contains("try again later") && !all.contains("re-authorize"),
        "{r:?}"
    );
    h.provider.set_validation_unavailable(false);
    let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
    assert!(r.starts_with("235"), "{r}");
    h.stop().await;
}

/// Found by the interop suite (Postfix + Dovecot): with access tokens of
/// Microsoft's size (about 2 KB) the one-step `AUTH XOAUTH2 <response>`
/// line is longer than Postfix's line limit and is refused with a 535;
/// mailbridge must send such responses after the `334` (RFC 4954 section 4).
#[tokio::test]
async fn microsoft_sized_tokens_go_two_step() {
    for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
        let h = Harness::start(Options {
            smtp: SmtpServerOptions {
                mechanisms: vec![mech],
                ..SmtpServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        h.provider.set_access_token_min_len(2000);
        let mut c = smtp_client(&h).await;
        ehlo(&mut c).await;
        let r = c.smtp(&format!("AUTH PLAIN {}", plain())).await;
        assert!(r.starts_with("235"), "{mech:?}: {r}");
        assert_eq!(h.smtp.auth_failures(), 0, "{mech:?}");
        send_message(&mut c, &h, MESSAGE).await;
        h.stop().await;
    }
}

#[tokio::test]
async fn preauth_line_cap_and_idle_timeout() {
    let h = Harness::start(Options {
        server_extra: "preauth_timeout_secs = 1".into(),
        ..Options::default()
    })
    .await;
    let mut c = smtp_client(&h).await;
    let mut long = b"EHLO ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 20 * 1024));
    long.extend_from_slice(b"\r\n");
    c.send(&long).await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("500"), "{r:?}");
    assert!(c.smtp("NOOP").await.starts_with("250"), "still usable");
    let bye = c.smtp_reply().await;
    assert!(bye.last().unwrap().starts_with("421"), "{bye:?}");
    assert_eq!(c.line().await, "");
    h.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_message_in_flight_finish_and_turns_new_clients_away() {
    // A grace period far beyond the test's patience: the server can only
    // finish in time by closing sessions as they come to rest.
    let mut h = Harness::start(Options {
        server_extra: "shutdown_grace_secs = 600".into(),
        ..Options::default()
    })
    .await;
    let mut c = logged_in(&h).await;
    start_data(&mut c).await;
    let body: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("line {i} of a long message\r\n").into_bytes())
        .collect();
    let (first, second) = body.split_at(body.len() / 2);
    c.send(first).await;
    let mut waiting = smtp_client(&h).await;

    h.begin_shutdown();
    // The client that has not logged in is told to come back.
    let r = waiting.smtp_reply().await;
    assert!(
        r[0].starts_with("421 4.3.2") && r[0].contains("shutting down"),
        "{r:?}"
    );
    // New clients are no longer accepted.
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(h.smtp_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts");
    // The message being sent completes and is delivered whole.
    c.send(second).await;
    c.send(b".\r\n").await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("250"), "{r:?}");
    assert_eq!(h.smtp.messages().last().unwrap().data, body);
    // Then the session, at rest, is closed and the server finishes.
    assert_eq!(c.line().await, "", "closed after the answer");
    assert!(h.server_finished_within(WAIT).await);
    h.stop().await;
}
