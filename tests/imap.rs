//! End-to-end IMAP through real loopback sockets: a raw client -> mailbridge
//! -> the strict sandbox IMAP server, with tokens from the sandbox provider.

mod common;

use std::time::Duration;

use common::*;
use mailbridge_proto::sasl::Mechanism;
use mailbridge_sandbox::{ImapServerOptions, ProviderOptions, SandboxTls};

async fn select_and_check(c: &mut Client, h: &Harness) {
    let r = c.cmd("s1", "SELECT INBOX").await;
    assert!(r.last().unwrap().starts_with("s1 OK"), "{r:?}");
    let body = c.fetch_body("f1", 1).await;
    assert_eq!(body, h.imap.messages(USER, "INBOX")[0]);
}

async fn harness() -> Harness {
    let h = Harness::start(Options::default()).await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    h
}

#[tokio::test]
async fn login_with_quoted_password_reaches_the_mailbox() {
    let h = harness().await;
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK [CAPABILITY "), "{ok}");
    assert!(ok.contains("IDLE"), "upstream capabilities passed on: {ok}");
    select_and_check(&mut c, &h).await;
    let bye = c.cmd("z", "LOGOUT").await;
    assert!(bye.last().unwrap().starts_with("z OK"), "{bye:?}");
    assert_eq!(h.provider.refresh_requests(), 1);
    h.stop().await;
}

#[tokio::test]
async fn login_with_atom_and_literals() {
    let h = Harness::start(Options::default()).await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    // Atom user, synchronizing literal password: we must see the `+`.
    let mut c = h.client().await;
    c.send(format!("a1 LOGIN {USER} {{{}}}\r\n", PASSWORD.len()).as_bytes())
        .await;
    let cont = c.line().await;
    assert!(cont.starts_with('+'), "{cont}");
    c.send(format!("{PASSWORD}\r\n").as_bytes()).await;
    let r = c.until_tagged("a1").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    select_and_check(&mut c, &h).await;

    // Non-synchronizing literals for both: no continuation, one write.
    let mut c = h.client().await;
    c.send(
        format!(
            "a2 LOGIN {{{}+}}\r\n{USER} {{{}+}}\r\n{PASSWORD}\r\n",
            USER.len(),
            PASSWORD.len()
        )
        .as_bytes(),
    )
    .await;
    let r = c.until_tagged("a2").await;
    assert_eq!(r.len(), 1, "no continuation for LITERAL+: {r:?}");
    assert!(r[0].starts_with("a2 OK"), "{r:?}");
    select_and_check(&mut c, &h).await;
    h.stop().await;
}

#[tokio::test]
async fn authenticate_plain_both_ways() {
    use base64::Engine;
    let h = harness().await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    let mut c = h.client().await;
    let r = c.cmd("a1", &format!("AUTHENTICATE PLAIN {b64}")).await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    select_and_check(&mut c, &h).await;

    let mut c = h.client().await;
    c.send(b"a2 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with('+'));
    c.send(format!("{b64}\r\n").as_bytes()).await;
    let r = c.until_tagged("a2").await;
    assert!(r.last().unwrap().starts_with("a2 OK"), "{r:?}");

    // `*` cancels, and the connection stays usable.
    let mut c = h.client().await;
    c.send(b"a3 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with('+'));
    c.send(b"*\r\n").await;
    let r = c.until_tagged("a3").await;
    assert!(r.last().unwrap().starts_with("a3 BAD"), "{r:?}");
    let r = c.cmd("a4", "NOOP").await;
    assert!(r.last().unwrap().starts_with("a4 OK"), "{r:?}");
    h.stop().await;
}

#[tokio::test]
async fn wrong_password_is_refused_backs_off_and_keeps_the_grant() {
    let h = harness().await;
    let before = h.sealed_bytes();
    let (mut c, no) = h.login("not the password").await;
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    assert!(no.contains("wrong password"), "{no}");
    assert_eq!(
        h.sealed_bytes(),
        before,
        "a wrong password must not alter the grant"
    );
    // Immediately again, even with the right password: backoff.
    let r = c
        .cmd("a2", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    let last = r.last().unwrap();
    assert!(
        last.starts_with("a2 NO [UNAVAILABLE]") && last.contains("try again"),
        "{r:?}"
    );
    // The connection is still usable and the right password works later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = c
        .cmd("a3", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(r.last().unwrap().starts_with("a3 OK"), "{r:?}");
    assert_eq!(h.provider.refresh_requests(), 1);
    h.stop().await;
}

#[tokio::test]
async fn unknown_user_is_refused_clearly() {
    let h = harness().await;
    let mut c = h.client().await;
    let r = c.cmd("a1", "LOGIN nobody@example.com secret").await;
    let last = r.last().unwrap();
    assert!(
        last.starts_with("a1 NO [AUTHENTICATIONFAILED]") && last.contains("no account"),
        "{last}"
    );
    h.stop().await;
}

#[tokio::test]
async fn account_without_a_grant_says_how_to_add_one() {
    let h = harness().await;
    assert!(h.store.remove(USER).unwrap());
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    assert!(
        no.contains("no stored authorization") && no.contains("mailbridge account add"),
        "{no}"
    );
    h.stop().await;
}

#[tokio::test]
async fn cached_token_is_reused_and_short_lived_one_refreshed() {
    let h = harness().await;
    for _ in 0..3 {
        let (_c, ok) = h.login(PASSWORD).await;
        assert!(ok.starts_with("a1 OK"), "{ok}");
    }
    assert_eq!(
        h.provider.refresh_requests(),
        1,
        "a token with an hour left is reused"
    );
    h.stop().await;

    // Tokens that live one second: the second login finds it expired.
    let h = Harness::start(Options {
        provider: ProviderOptions {
            access_token_lifetime: Duration::from_secs(1),
            ..ProviderOptions::default()
        },
        ..Options::default()
    })
    .await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    select_and_check(&mut c, &h).await;
    assert_eq!(h.provider.refresh_requests(), 2);
    assert_eq!(
        h.imap.auth_failures(),
        0,
        "never hands upstream an expired token"
    );
    h.stop().await;
}

#[tokio::test]
async fn grant_refused_for_now_is_temporary_and_works_again_later() {
    // Fastmail answers a refresh for a user an administrator locked with
    // `invalid_grant` and `"temporary": true`: not a revoked grant.
    let h = harness().await;
    h.provider.set_user_locked(USER, true);
    let before = h.sealed_bytes();
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    assert!(no.contains("locked by an administrator"), "{no}");
    assert!(no.contains("the grant is kept"), "{no}");
    assert!(!no.contains("reauthorize"), "{no}");
    assert_eq!(h.sealed_bytes(), before, "the grant is kept as it was");

    h.provider.set_user_locked(USER, false);
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    select_and_check(&mut c, &h).await;
    h.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_sessions_and_tells_waiting_clients() {
    let mut h = Harness::start(Options {
        server_extra: "shutdown_grace_secs = 600".into(),
        ..Options::default()
    })
    .await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    c.cmd("s1", "SELECT INBOX").await;
    c.send(b"i1 IDLE\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    let mut waiting = h.client().await;

    h.begin_shutdown();
    let bye = waiting.line().await;
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE]") && bye.contains("shutting down"),
        "{bye}"
    );
    assert_eq!(waiting.line().await, "");
    // The IDLE session is at rest: closed, and the server finishes long
    // before its grace period.
    assert_eq!(c.line().await, "");
    assert!(h.server_finished_within(WAIT).await);
    h.stop().await;
}

#[tokio::test]
async fn revoked_grant_gives_a_clear_no_and_keeps_the_grant() {
    let h = harness().await;
    h.provider.revoke_user(USER);
    let before = h.sealed_bytes();
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    assert!(no.contains("invalid_grant"), "{no}");
    assert!(no.contains("mailbridge account reauthorize"), "{no}");
    assert_eq!(
        h.sealed_bytes(),
        before,
        "a refused refresh keeps the stored grant"
    );
    h.stop().await;
}

#[tokio::test]
async fn upstream_rejection_is_absorbed_refreshed_and_retried() {
    for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
        let h = Harness::start(Options {
            upstream: ImapServerOptions {
                mechanisms: vec![mech],
                ..ImapServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        h.imap.append(USER, "INBOX", MESSAGE.to_vec());
        let (_c, ok) = h.login(PASSWORD).await;
        assert!(ok.starts_with("a1 OK"), "{ok}");
        // The server stops honouring the cached token behind our back.
        h.provider.revoke_access_tokens(USER);
        let (mut c, ok) = h.login(PASSWORD).await;
        assert!(ok.starts_with("a1 OK"), "{mech:?}: {ok}");
        select_and_check(&mut c, &h).await;
        assert_eq!(h.imap.auth_failures(), 1, "{mech:?}");
        assert_eq!(h.provider.refresh_requests(), 2, "{mech:?}");
        h.stop().await;
    }
}

#[tokio::test]
async fn continuation_form_when_upstream_lacks_sasl_ir() {
    let h = Harness::start(Options {
        upstream: ImapServerOptions {
            sasl_ir: false,
            capability_in_greeting: false,
            capability_in_login_ok: false,
            ..ImapServerOptions::default()
        },
        ..Options::default()
    })
    .await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(
        ok.starts_with("a1 OK [CAPABILITY"),
        "capabilities fetched after login: {ok}"
    );
    select_and_check(&mut c, &h).await;
    h.stop().await;
}

#[tokio::test]
async fn tls_on_both_sides_in_every_combination() {
    for (listener, upstream) in [
        ("starttls", SandboxTls::StartTls),
        ("starttls", SandboxTls::Implicit),
        ("implicit", SandboxTls::StartTls),
        ("implicit", SandboxTls::Implicit),
    ] {
        let h = Harness::start(Options {
            listener_tls: listener,
            upstream: ImapServerOptions {
                tls: upstream,
                ..ImapServerOptions::default()
            },
            ..Options::default()
        })
        .await;
        h.imap.append(USER, "INBOX", MESSAGE.to_vec());
        let mut c = if listener == "starttls" {
            Client::starttls(h.addr, h.client_tls_config()).await
        } else {
            let mut c = Client::tls(h.addr, h.client_tls_config()).await;
            assert!(c.line().await.starts_with("* OK"));
            c
        };
        let caps = c.cmd("c1", "CAPABILITY").await;
        assert!(
            !caps[0].contains("STARTTLS") && !caps[0].contains("LOGINDISABLED"),
            "{caps:?}"
        );
        let r = c
            .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
            .await;
        assert!(
            r.last().unwrap().starts_with("a1 OK"),
            "{listener}/{upstream:?}: {r:?}"
        );
        select_and_check(&mut c, &h).await;
        h.stop().await;
    }
}

#[tokio::test]
async fn twenty_mib_message_arrives_byte_for_byte() {
    let h = Harness::start(Options::default()).await;
    let mut big = Vec::with_capacity(20 * 1024 * 1024);
    big.extend_from_slice(b"From: big@example.com\r\nSubject: big\r\n\r\n");
    let mut x: u32 = 12345;
    while big.len() < 20 * 1024 * 1024 - 2 {
        // Printable pseudo-random lines, so any corruption shows.
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        big.push(b'!' + (x >> 16) as u8 % 90);
        if big.len() % 998 == 0 {
            big.extend_from_slice(b"\r\n");
        }
    }
    big.extend_from_slice(b"\r\n");
    h.imap.append(USER, "INBOX", big.clone());
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let r = c.cmd("s1", "SELECT INBOX").await;
    assert!(r.last().unwrap().starts_with("s1 OK"));
    let body = c.fetch_body("f1", 1).await;
    assert_eq!(body.len(), big.len());
    assert!(body == big, "20 MiB body differs");
    h.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_logins_share_one_refresh() {
    let h = harness().await;
    h.provider.set_token_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = h.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::plain(addr).await;
            c.line().await;
            let r = c
                .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
                .await;
            r.last().cloned().unwrap_or_default()
        }));
    }
    for t in tasks {
        let ok = t.await.unwrap();
        assert!(ok.starts_with("a1 OK"), "{ok}");
    }
    assert_eq!(
        h.provider.token_requests(),
        1,
        "exactly one token request for 50 logins"
    );
    assert_eq!(h.imap.logins(), 50);
    h.stop().await;
}

#[tokio::test]
async fn pipelined_commands_after_login_arrive_in_order_and_id_is_forwarded() {
    let h = harness().await;
    let mut c = h.client().await;
    let r = c.cmd("i1", "ID (\"name\" \"pipeline-test\")").await;
    assert!(r.last().unwrap().starts_with("i1 OK"), "{r:?}");
    c.send(
        format!(
            "a1 LOGIN {USER} {}\r\ns1 SELECT INBOX\r\nn1 NOOP\r\n",
            quote(PASSWORD)
        )
        .as_bytes(),
    )
    .await;
    let r = c.until_tagged("a1").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    let r = c.until_tagged("s1").await;
    assert!(r.last().unwrap().starts_with("s1 OK"), "{r:?}");
    let r = c.until_tagged("n1").await;
    assert!(r.last().unwrap().starts_with("n1 OK"), "{r:?}");
    // The client's ID goes up first, mailbridge's own name after it.
    assert_eq!(
        h.imap.last_client_id(),
        Some(format!(
            "(\"name\" \"pipeline-test\" \"x-proxy-name\" \"mailbridge\" \"x-proxy-version\" \"{}\")",
            env!("CARGO_PKG_VERSION")
        ))
    );
    h.stop().await;
}

#[tokio::test]
async fn preauth_commands_limits_and_idle_timeout() {
    let h = Harness::start(Options {
        server_extra: "preauth_timeout_secs = 1".into(),
        ..Options::default()
    })
    .await;
    let mut c = h.client().await;
    let r = c.cmd("x1", "SELECT INBOX").await;
    assert!(
        r.last().unwrap().starts_with("x1 BAD") || r.last().unwrap().starts_with("x1 NO"),
        "{r:?}"
    );
    // A 100 KiB line: refused, connection still usable.
    let mut long = b"x2 LOGIN ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100 * 1024));
    long.extend_from_slice(b"\r\n");
    c.send(&long).await;
    let l = c.line().await;
    assert!(l.contains("BAD"), "{l}");
    let r = c.cmd("x3", "NOOP").await;
    assert!(r.last().unwrap().starts_with("x3 OK"), "{r:?}");
    // Silence: the proxy says goodbye and closes.
    let bye = c.line().await;
    assert!(bye.starts_with("* BYE"), "{bye}");
    assert_eq!(c.line().await, "");
    h.stop().await;
}

#[tokio::test]
async fn upstream_down_gives_unavailable() {
    let h = harness().await;
    h.imap.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    h.stop().await;
}

/// An upstream that drops the TLS connection in the middle of the login,
/// without a TLS close_notify: the client is told so in one sentence;
/// rustls's wording (and its docs.rs link) stays in the log.
#[tokio::test]
async fn upstream_dropping_tls_mid_login_gives_one_sentence() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = Harness::start(Options {
        imap_port: Some(port),
        ..Options::default()
    })
    .await;
    let acceptor = tokio_rustls::TlsAcceptor::from(h.pki.server_config());
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tls.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "mailbridge hung up first");
            got.extend_from_slice(&buf[..n]);
        }
        // Drop the socket under the TLS session: no close_notify.
        let (tcp, _) = tls.into_inner();
        drop(tcp);
        String::from_utf8_lossy(&got).into_owned()
    });
    let (_c, no) = h.login(PASSWORD).await;
    let request = server.await.unwrap();
    assert!(
        request.starts_with("mb1 AUTHENTICATE XOAUTH2 "),
        "{request}"
    );
    assert_eq!(
        no,
        format!("a1 NO [UNAVAILABLE] localhost:{port} closed the connection during login")
    );
    for library_text in ["docs.rs", "close_notify", "rustls", "peer closed"] {
        assert!(!no.contains(library_text), "{no}");
    }
    h.stop().await;
}

/// Found by the interop suite: Dovecot answers `NO [UNAVAILABLE] Temporary
/// authentication failure.` (no challenge) when it cannot reach its
/// introspection endpoint. That is no reason to re-authorize, and a client
/// told AUTHENTICATIONFAILED asks its user for a new password.
#[tokio::test]
async fn upstream_temporary_failure_is_unavailable_not_reauthorize() {
    let h = harness().await;
    h.provider.set_validation_unavailable(true);
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    assert!(no.contains("try again later"), "{no}");
    assert!(!no.contains("re-authorize"), "{no}");
    assert_eq!(h.provider.refresh_requests(), 1, "no second refresh");
    h.provider.set_validation_unavailable(false);
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    h.stop().await;
}

/// Accepts any server certificate and remembers the names in it: enough to
/// see what a client meets on a listener with a generated certificate.
#[derive(Debug)]
struct AnyCert(std::sync::Mutex<Vec<u8>>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = end_entity.to_vec();
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn implicit_tls_with_a_generated_certificate() {
    let h = Harness::start(Options {
        listener_tls: "implicit-selfsigned",
        ..Options::default()
    })
    .await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    let seen = std::sync::Arc::new(AnyCert(std::sync::Mutex::new(Vec::new())));
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(seen.clone())
    .with_no_client_auth();
    let mut c = Client::tls(h.addr, std::sync::Arc::new(config)).await;
    assert!(c.line().await.starts_with("* OK"));
    let cert = seen.0.lock().unwrap().clone();
    assert!(
        cert.windows(b"localhost".len()).any(|w| w == b"localhost"),
        "the generated certificate names localhost"
    );
    let r = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    select_and_check(&mut c, &h).await;
    h.stop().await;
}
