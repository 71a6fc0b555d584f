//! Every login mechanism clients use (issue 13, point 3): IMAP
//! `AUTHENTICATE LOGIN` and POP3 `AUTH LOGIN`, prompted and with an initial
//! response, with the exact prompts devices compare byte for byte, through
//! mailbridge to the sandbox servers.

use std::time::Instant;

use base64::Engine;

use crate::common::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// SELECT and FETCH the one message: the login really reached the mailbox.
async fn imap_reads_inbox(c: &mut Client, h: &Harness) {
    let r = c.cmd("s1", "SELECT INBOX").await;
    assert!(r.last().unwrap().starts_with("s1 OK"), "{r:?}");
    assert_eq!(
        c.fetch_body("f1", 1).await,
        h.imap.messages(USER, "INBOX")[0]
    );
}

#[tokio::test]
async fn imap_authenticate_login_prompted_initial_response_and_cancel() {
    let started = Instant::now();
    let h = Harness::start(Options::default()).await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());

    // Offered, in the greeting and in CAPABILITY.
    let mut c = Client::plain(h.addr).await;
    let greeting = c.line().await;
    assert!(greeting.contains(" AUTH=LOGIN"), "{greeting}");
    let caps = c.cmd("c1", "CAPABILITY").await;
    assert!(
        caps[0].starts_with("* CAPABILITY ") && caps[0].contains(" AUTH=PLAIN AUTH=LOGIN"),
        "{caps:?}"
    );

    // Prompted (curl, neomutt without SASL-IR): both prompts, exactly.
    c.send(b"a1 AUTHENTICATE LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(USER)).as_bytes()).await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PASSWORD)).as_bytes()).await;
    let ok = c.until_tagged("a1").await;
    assert!(ok.last().unwrap().starts_with("a1 OK"), "{ok:?}");
    imap_reads_inbox(&mut c, &h).await;

    // SASL-IR: the user name on the command line, one prompt.
    let mut c = h.client().await;
    c.send(format!("a2 AUTHENTICATE LOGIN {}\r\n", b64(USER)).as_bytes())
        .await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PASSWORD)).as_bytes()).await;
    let ok = c.until_tagged("a2").await;
    assert!(ok.last().unwrap().starts_with("a2 OK"), "{ok:?}");
    imap_reads_inbox(&mut c, &h).await;

    // `*` cancels at either prompt; the session stays usable.
    let mut c = h.client().await;
    c.send(b"a3 AUTHENTICATE LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(b"*\r\n").await;
    assert_eq!(c.line().await, "a3 BAD AUTHENTICATE cancelled");
    c.send(format!("a4 AUTHENTICATE LOGIN {}\r\n*\r\n", b64(USER)).as_bytes())
        .await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    assert_eq!(c.line().await, "a4 BAD AUTHENTICATE cancelled");

    // A wrong password is refused like any other login, grant untouched
    // (last: the failure starts the backoff for this account).
    let before = h.sealed_bytes();
    c.send(format!("a5 AUTHENTICATE LOGIN {}\r\n", b64(USER)).as_bytes())
        .await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64("not the password")).as_bytes())
        .await;
    let no = c.until_tagged("a5").await;
    assert!(
        no.last()
            .unwrap()
            .starts_with("a5 NO [AUTHENTICATIONFAILED]"),
        "{no:?}"
    );
    assert_eq!(h.sealed_bytes(), before);
    h.stop().await;
    println!(
        "IMAP AUTHENTICATE LOGIN, two logins and a refusal: {:?}",
        started.elapsed()
    );
}

async fn pop3_client(h: &Harness) -> Client {
    let mut c = Client::plain(h.pop3_addr).await;
    let g = c.line().await;
    assert!(g.starts_with("+OK"), "{g}");
    c
}

async fn pop3(c: &mut Client, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes()).await;
    c.line().await
}

/// STAT and RETR the one message.
async fn pop3_reads_maildrop(c: &mut Client, h: &Harness) {
    let stat = pop3(c, "STAT").await;
    assert!(stat.starts_with("+OK 1 "), "{stat}");
    assert!(pop3(c, "RETR 1").await.starts_with("+OK"));
    assert_eq!(c.pop3_multiline().await, h.pop3.messages(USER)[0]);
}

#[tokio::test]
async fn pop3_auth_login_prompted_initial_response_and_cancel() {
    let started = Instant::now();
    let h = Harness::start(Options::default()).await;
    h.pop3.append(USER, MESSAGE.to_vec());

    // Offered in CAPA's SASL line and in the AUTH listing.
    let mut c = pop3_client(&h).await;
    c.send(b"CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let capa = String::from_utf8(c.pop3_multiline().await).unwrap();
    assert!(capa.contains("\r\nSASL PLAIN LOGIN\r\n"), "{capa}");
    c.send(b"AUTH\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert_eq!(c.pop3_multiline().await, b"PLAIN\r\nLOGIN\r\n");

    // Prompted.
    assert_eq!(pop3(&mut c, "AUTH LOGIN").await, "+ VXNlcm5hbWU6");
    assert_eq!(pop3(&mut c, &b64(USER)).await, "+ UGFzc3dvcmQ6");
    let ok = pop3(&mut c, &b64(PASSWORD)).await;
    assert!(ok.starts_with("+OK"), "{ok}");
    pop3_reads_maildrop(&mut c, &h).await;
    assert!(pop3(&mut c, "QUIT").await.starts_with("+OK"));

    // With the user name as initial response (RFC 5034).
    let mut c = pop3_client(&h).await;
    assert_eq!(
        pop3(&mut c, &format!("AUTH LOGIN {}", b64(USER))).await,
        "+ UGFzc3dvcmQ6"
    );
    let ok = pop3(&mut c, &b64(PASSWORD)).await;
    assert!(ok.starts_with("+OK"), "{ok}");
    pop3_reads_maildrop(&mut c, &h).await;
    assert!(pop3(&mut c, "QUIT").await.starts_with("+OK"));

    // `*` cancels at either prompt; a wrong password is refused with
    // [AUTH] and the grant untouched (last: it starts the backoff).
    let mut c = pop3_client(&h).await;
    assert_eq!(pop3(&mut c, "AUTH LOGIN").await, "+ VXNlcm5hbWU6");
    assert_eq!(pop3(&mut c, "*").await, "-ERR AUTH cancelled");
    assert_eq!(
        pop3(&mut c, &format!("AUTH LOGIN {}", b64(USER))).await,
        "+ UGFzc3dvcmQ6"
    );
    assert_eq!(pop3(&mut c, "*").await, "-ERR AUTH cancelled");
    let before = h.sealed_bytes();
    assert_eq!(pop3(&mut c, "AUTH LOGIN").await, "+ VXNlcm5hbWU6");
    assert_eq!(pop3(&mut c, &b64(USER)).await, "+ UGFzc3dvcmQ6");
    let no = pop3(&mut c, &b64("not the password")).await;
    assert!(no.starts_with("-ERR [AUTH]"), "{no}");
    assert_eq!(h.sealed_bytes(), before);
    h.stop().await;
    println!(
        "POP3 AUTH LOGIN, two logins and a refusal: {:?}",
        started.elapsed()
    );
}
