//! Point 6: an upstream that accepts TCP and never speaks costs the
//! client the connect timeout, for every protocol.

use std::time::{Duration, Instant};

use crate::common::{Client, Harness, Options, PASSWORD, USER, quote};
use mailbridge_sandbox::{ImapServerOptions, Pop3ServerOptions, SandboxTls, SmtpServerOptions};

/// A server that takes connections and says nothing, holding them until
/// the test ends.
async fn mute_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..16 {
            match listener.accept().await {
                Ok((tcp, _)) => held.push(tcp),
                Err(_) => break,
            }
        }
        std::future::pending::<()>().await;
    });
    (port, task)
}

#[tokio::test]
async fn a_mute_upstream_costs_the_connect_timeout_in_every_protocol() {
    let (imap_port, _a) = mute_server().await;
    let (pop3_port, _b) = mute_server().await;
    let (smtp_port, _c) = mute_server().await;
    let h = Harness::start(Options {
        server_extra: "connect_timeout_secs = 2\nlogin_timeout_secs = 30\n".into(),
        // Plain-text greetings expected (STARTTLS after), so the wait is
        // for the greeting, not a TLS handshake.
        upstream: ImapServerOptions {
            tls: SandboxTls::StartTls,
            ..Default::default()
        },
        pop3: Pop3ServerOptions {
            tls: SandboxTls::StartTls,
            ..Default::default()
        },
        smtp: SmtpServerOptions {
            tls: SandboxTls::StartTls,
            ..Default::default()
        },
        imap_port: Some(imap_port),
        pop3_port: Some(pop3_port),
        smtp_port: Some(smtp_port),
        ..Options::default()
    })
    .await;

    let started = Instant::now();
    let mut c = h.client().await;
    let reply = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    let imap = (reply.last().cloned().unwrap_or_default(), started.elapsed());

    let started = Instant::now();
    let mut c = Client::plain(h.pop3_addr).await;
    c.line().await;
    c.send(format!("USER {USER}\r\n").as_bytes()).await;
    c.line().await;
    c.send(format!("PASS {PASSWORD}\r\n").as_bytes()).await;
    let pop3 = (c.line().await, started.elapsed());

    let started = Instant::now();
    let mut c = Client::plain(h.smtp_addr).await;
    c.smtp_reply().await;
    c.smtp("EHLO client").await;
    let plain = base64_plain(USER, PASSWORD);
    let smtp = (
        c.smtp(&format!("AUTH PLAIN {plain}")).await,
        started.elapsed(),
    );

    for (name, (reply, took)) in [("IMAP", &imap), ("POP3", &pop3), ("SMTP", &smtp)] {
        println!(
            "{name} login against a server that never greets: {:.2} s: {reply}",
            took.as_secs_f64()
        );
        assert!(
            reply.contains("accepted the connection but did not greet within 2 s"),
            "{name}: {reply}"
        );
        assert!(
            *took >= Duration::from_secs(2) && *took < Duration::from_secs(8),
            "{name}: {took:?}"
        );
    }
    assert!(imap.0.starts_with("a1 NO [UNAVAILABLE]"), "{}", imap.0);
    assert!(pop3.0.starts_with("-ERR [SYS/TEMP]"), "{}", pop3.0);
    assert!(smtp.0.starts_with("454 4."), "{}", smtp.0);
    h.stop().await;
}

fn base64_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}
