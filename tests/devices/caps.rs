//! Capabilities that tell the truth (issue 13, point 4): before AUTH,
//! mailbridge's EHLO repeats what the account's SMTP server advertised at
//! the last login through it (SMTPUTF8, DSN, its real SIZE), with today's
//! fixed list before the first one (and after a restart, what the one
//! before it had learned); never CHUNKING.

use std::time::Instant;

use base64::Engine;
use mailbridge_sandbox::SmtpServerOptions;

use crate::common::*;

/// The sandbox server's limit: below mailbridge's default of 50 MiB, so
/// a SIZE that changed is plainly the server's.
const SANDBOX_SIZE: u64 = 12_345_678;

async fn smtp_client(h: &Harness) -> Client {
    let mut c = Client::plain(h.smtp_addr).await;
    let greeting = c.smtp_reply().await;
    assert!(greeting[0].starts_with("220 "), "{greeting:?}");
    c
}

/// The EHLO keywords mailbridge advertises to a new connection.
async fn ehlo_keywords(h: &Harness) -> Vec<String> {
    let mut c = smtp_client(h).await;
    c.send(b"EHLO client.example\r\n").await;
    let reply = c.smtp_reply().await;
    assert!(reply.last().unwrap().starts_with("250 "), "{reply:?}");
    assert!(c.smtp("QUIT").await.starts_with("221"));
    reply.iter().skip(1).map(|l| l[4..].to_owned()).collect()
}

#[tokio::test]
async fn ehlo_repeats_the_servers_extensions_after_one_login() {
    let started = Instant::now();
    let mut h = Harness::start(Options {
        smtp: SmtpServerOptions {
            max_size: SANDBOX_SIZE,
            extra_ehlo: ["SMTPUTF8", "DSN", "CHUNKING"].map(str::to_owned).to_vec(),
            ..SmtpServerOptions::default()
        },
        ..Options::default()
    })
    .await;

    // Before any login: the safe default, as before.
    let before = ehlo_keywords(&h).await;
    assert_eq!(
        before,
        [
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SIZE 52428800",
            "AUTH PLAIN LOGIN"
        ],
        "{before:?}"
    );

    // One login through mailbridge teaches it the server's EHLO.
    let mut c = smtp_client(&h).await;
    assert!(c.smtp("EHLO client.example").await.starts_with("250 "));
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    let r = c.smtp(&format!("AUTH PLAIN {plain}")).await;
    assert!(r.starts_with("235"), "{r}");
    assert!(c.smtp("QUIT").await.starts_with("221"));

    // A new connection's EHLO, still before AUTH, tells the truth.
    let after = ehlo_keywords(&h).await;
    assert_eq!(
        after,
        [
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            &format!("SIZE {SANDBOX_SIZE}"),
            "SMTPUTF8",
            "DSN",
            "AUTH PLAIN LOGIN"
        ],
        "CHUNKING is not repeated, AUTH is mailbridge's own: {after:?}"
    );

    // The limit a client was told is the one that holds: after AUTH a
    // message one octet over it is refused at MAIL, before its body.
    let mut c = smtp_client(&h).await;
    assert!(c.smtp("EHLO client.example").await.starts_with("250 "));
    let r = c.smtp(&format!("AUTH PLAIN {plain}")).await;
    assert!(r.starts_with("235"), "{r}");
    let r = c
        .smtp(&format!("MAIL FROM:<{USER}> SIZE={}", SANDBOX_SIZE + 1))
        .await;
    assert!(r.starts_with("552"), "{r}");
    let r = c
        .smtp(&format!("MAIL FROM:<{USER}> SIZE={SANDBOX_SIZE}"))
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.smtp("QUIT").await.starts_with("221"));

    // A restart: the server stops (its metadata flushed) and a new one
    // starts over the same store. The account's metadata kept the
    // server's EHLO, without AUTH (the clients' AUTH is mailbridge's own)...
    h.restart().await;
    let kept = h.store.load_meta(USER).unwrap().unwrap().smtp_ehlo;
    let kept = kept.expect("the server's EHLO is in the account's metadata");
    assert_eq!(kept.server, format!("localhost:{}", h.smtp.addr().port()));
    assert!(
        kept.keywords.iter().all(|k| !k.starts_with("AUTH")),
        "{kept:?}"
    );
    // ...so that before anyone has logged in again, a new connection's
    // EHLO still tells the truth.
    let recalled = ehlo_keywords(&h).await;
    assert_eq!(recalled, after, "after a restart, before any login");
    h.stop().await;
    println!(
        "EHLO before and after one login, then MAIL SIZE=, then after a restart: {:?}",
        started.elapsed()
    );
}
