//! End-to-end POP3 through real loopback sockets: a raw client -> mailbridge
//! -> the strict sandbox POP3 server, with tokens from the sandbox provider.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use mailbridge_proto::sasl::Mechanism;
use mailbridge_sandbox::{Pop3ServerOptions, ProviderOptions, SandboxTls};

async fn pop3_client(h: &Harness) -> Client {
    let mut c = Client::plain(h.pop3_addr).await;
    let g = c.line().await;
    assert!(g.starts_with("+OK"), "{g}");
    c
}

async fn cmd(c: &mut Client, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes()).await;
    c.line().await
}

async fn user_pass(c: &mut Client, password: &str) -> String {
    assert!(cmd(c, &format!("USER {USER}")).await.starts_with("+OK"));
    cmd(c, &format!("PASS {password}")).await
}

fn plain() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"))
}

async fn retr_first(c: &mut Client, h: &Harness) {
    let stat = cmd(c, "STAT").await;
    assert!(stat.starts_with("+OK 1 "), "{stat}");
    assert!(cmd(c, "RETR 1").await.starts_with("+OK"));
    let body = c.pop3_multiline().await;
    assert_eq!(body, h.pop3.messages(USER)[0]);
}

#[tokio::test]
async fn capa_preauth_refusals_and_user_pass() {
    let h = Harness::start(Options::default()).await;
    h.pop3.append(USER, MESSAGE.to_vec());
    let mut c = pop3_client(&h).await;
    c.send(b"CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let capa = String::from_utf8(c.pop3_multiline().await).unwrap();
    assert!(
        capa.contains("USER") && capa.contains("SASL PLAIN"),
        "{capa}"
    );
    assert!(
        !capa.contains("XOAUTH2"),
        "no upstream capability leaks: {capa}"
    );
    let r = cmd(&mut c, "STAT").await;
    assert!(r.starts_with("-ERR"), "{r}");
    // Password with spaces and quotes, taken verbatim.
    let r = user_pass(&mut c, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    retr_first(&mut c, &h).await;
    assert!(cmd(&mut c, "QUIT").await.starts_with("+OK"));
    h.stop().await;
}

#[tokio::test]
async fn auth_plain_both_ways_and_cancel() {
    let h = Harness::start(Options::default()).await;
    h.pop3.append(USER, MESSAGE.to_vec());
    let mut c = pop3_client(&h).await;
    let r = cmd(&mut c, &format!("AUTH PLAIN {}", plain())).await;
    assert!(r.starts_with("+OK"), "{r}");
    retr_first(&mut c, &h).await;

    let mut c = pop3_client(&h).await;
    assert!(cmd(&mut c, "AUTH PLAIN").await.starts_with('+'));
    assert!(cmd(&mut c, &plain()).await.starts_with("+OK"));

    let mut c = pop3_client(&h).await;
    assert!(cmd(&mut c, "AUTH PLAIN").await.starts_with('+'));
    assert!(cmd(&mut c, "*").await.starts_with("-ERR"));
    assert!(user_pass(&mut c, PASSWORD).await.starts_with("+OK"));
    h.stop().await;
}

#[tokio::test]
async fn wrong_password_revoked_and_refreshed_tokens() {
    let h = Harness::start(Options::default()).await;
    let before = h.sealed_bytes();
    let mut c = pop3_client(&h).await;
    let r = user_pass(&mut c, "nope").await;
    assert!(
        r.starts_with("-ERR [AUTH]") && r.contains("wrong password"),
        "{r}"
    );
    assert_eq!(h.sealed_bytes(), before);
    let r = user_pass(&mut c, PASSWORD).await;
    assert!(
        r.starts_with("-ERR [SYS/TEMP]") && r.contains("try again"),
        "backoff: {r}"
    );
    h.stop().await;

    let h = Harness::start(Options::default()).await;
    h.provider.revoke_user(USER);
    let mut c = pop3_client(&h).await;
    let r = user_pass(&mut c, PASSWORD).await;
    assert!(
        r.starts_with("-ERR [AUTH]") && r.contains("invalid_grant"),
        "{r}"
    );
    h.stop().await;

    for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
        let h = Harness::start(Options {
            provider: ProviderOptions {
                access_token_lifetime: Duration::from_secs(1),
                ..ProviderOptions::default()
            },
            pop3: Pop3ServerOptions {
                mechanisms: vec![mech],
                ..Pop3ServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        h.pop3.append(USER, MESSAGE.to_vec());
        let mut c = pop3_client(&h).await;
        assert!(user_pass(&mut c, PASSWORD).await.starts_with("+OK"));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut c = pop3_client(&h).await;
        assert!(
            user_pass(&mut c, PASSWORD).await.starts_with("+OK"),
            "{mech:?}"
        );
        assert_eq!(h.provider.refresh_requests(), 2);
        h.provider
            .set_access_token_lifetime(Duration::from_secs(3600));
        let mut c = pop3_client(&h).await;
        assert!(user_pass(&mut c, PASSWORD).await.starts_with("+OK"));
        h.provider.revoke_access_tokens(USER);
        let mut c = pop3_client(&h).await;
        let r = user_pass(&mut c, PASSWORD).await;
        assert!(r.starts_with("+OK"), "{mech:?}: {r}");
        assert_eq!(h.pop3.auth_failures(), 1, "{mech:?}");
        retr_first(&mut c, &h).await;
        h.stop().await;
    }
}

#[tokio::test]
async fn tls_on_both_sides_and_a_large_retr() {
    for (listener, upstream) in [
        ("starttls", SandboxTls::StartTls),
        ("starttls", SandboxTls::Implicit),
        ("implicit", SandboxTls::StartTls),
        ("implicit", SandboxTls::Implicit),
    ] {
        let h = Harness::start(Options {
            listener_tls: listener,
            pop3: Pop3ServerOptions {
                tls: upstream,
                ..Pop3ServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        let mut n = 0u32;
        while big.len() < 12 * 1024 * 1024 {
            n += 1;
            if n.is_multiple_of(5) {
                big.extend_from_slice(b".a line that starts with a dot\r\n");
            } else {
                big.extend_from_slice(
                    format!("{n:08} the quick brown fox jumps over the lazy dog\r\n").as_bytes(),
                );
            }
        }
        h.pop3.append(USER, big.clone());
        let mut c = if listener == "starttls" {
            Client::upgrade(h.pop3_addr, h.client_tls_config(), &[], b"STLS\r\n", "+OK").await
        } else {
            let mut c = Client::tls(h.pop3_addr, h.client_tls_config()).await;
            assert!(c.line().await.starts_with("+OK"));
            c
        };
        c.send(b"CAPA\r\n").await;
        assert!(c.line().await.starts_with("+OK"));
        let capa = String::from_utf8(c.pop3_multiline().await).unwrap();
        assert!(!capa.contains("STLS") && capa.contains("USER"), "{capa}");
        assert!(
            user_pass(&mut c, PASSWORD).await.starts_with("+OK"),
            "{listener}/{upstream:?}"
        );
        assert!(cmd(&mut c, "RETR 1").await.starts_with("+OK"));
        let body = c.pop3_multiline().await;
        assert_eq!(body.len(), big.len());
        assert!(body == big, "RETR body differs");
        h.stop().await;
    }
}

/// Found by the interop suite: Dovecot answers `-ERR [SYS/TEMP] Temporary
/// authentication failure.` when it cannot check the token; the client gets
/// a temporary failure too, not "re-authorize".
#[tokio::test]
async fn upstream_temporary_failure_is_sys_temp_not_reauthorize() {
    let h = Harness::start(Options::default()).await;
    h.provider.set_validation_unavailable(true);
    let mut c = pop3_client(&h).await;
    let r = user_pass(&mut c, PASSWORD).await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(
        r.contains("try again later") && !r.contains("re-authorize"),
        "{r}"
    );
    h.provider.set_validation_unavailable(false);
    let mut c = pop3_client(&h).await;
    assert!(user_pass(&mut c, PASSWORD).await.starts_with("+OK"));
    h.stop().await;
}

#[tokio::test]
async fn preauth_line_cap_and_idle_timeout() {
    let h = Harness::start(Options {
        server_extra: "preauth_timeout_secs = 1".into(),
        ..Options::default()
    })
    .await;
    let mut c = pop3_client(&h).await;
    let mut long = b"USER ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 20 * 1024));
    long.extend_from_slice(b"\r\n");
    c.send(&long).await;
    let r = c.line().await;
    assert!(r.starts_with("-ERR"), "{r}");
    assert!(cmd(&mut c, "CAPA").await.starts_with("+OK"), "still usable");
    c.pop3_multiline().await;
    let bye = c.line().await;
    assert!(bye.starts_with("-ERR") && bye.contains("Idle"), "{bye}");
    assert_eq!(c.line().await, "");
    h.stop().await;
}
