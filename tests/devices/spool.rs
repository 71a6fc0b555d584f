//! Points 1, 2 and 7: devices by address (127.0.0.2 allowed, 127.0.0.3
//! not), live and spooled; the spool through throttling, an outage, a
//! permanent refusal, a full disk and `kill -9`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{Client, Harness, Options, USER, temp_dir};
use mailbridge_sandbox::SmtpServer;

/// A key file for service key mode (0600: others may not read it).
fn key_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("service.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

/// `[server]` lines for service key mode, then `[spool]` and the device
/// (127.0.0.2 sends as alice).
fn device_config(dir: &Path, spool: bool, bounce: bool) -> String {
    format!(
        "key_mode = \"service\"\nkey_file = \"{key}\"\n\n[spool]\ndir = \"{spool_dir}\"\nretry_base_secs = 1\nretry_max_secs = 2\n\n\
         [[device]]\nname = \"mfp\"\nfrom = [\"127.0.0.2\"]\naccount = \"{USER}\"\nspool = {spool}\nbounce = {bounce}\n\n[server]\n",
        key = key_file(dir).display(),
        spool_dir = dir.join("spool").display(),
    )
}

/// Harness::start puts `server_extra` inside `[server]`; the device tables
/// go after it, and a second `[server]` header is not allowed in TOML, so
/// the lines for `[server]` come first and the tables last.
async fn harness(tag: &str, spool: bool, bounce: bool) -> (Harness, PathBuf) {
    let dir = temp_dir(tag);
    let extra = device_config(&dir, spool, bounce);
    // Drop the trailing `[server]` header: nothing follows it here.
    let extra = extra.trim_end_matches("[server]\n").to_string();
    let h = Harness::start(Options {
        server_extra: extra,
        ..Options::default()
    })
    .await;
    (h, dir)
}

/// A scanner's dialogue: HELO (not EHLO), no AUTH, one message.
async fn scanner_sends(
    from_ip: &str,
    addr: std::net::SocketAddr,
    sender: &str,
    to: &[&str],
    body: &[u8],
) -> Vec<String> {
    let mut c = Client::plain_from(from_ip, addr).await;
    let mut replies = vec![c.smtp_reply().await.pop().unwrap_or_default()];
    replies.push(c.smtp("HELO scanner").await);
    replies.push(c.smtp(&format!("MAIL FROM:<{sender}>")).await);
    if !replies.last().unwrap().starts_with("250") {
        return replies;
    }
    for r in to {
        replies.push(c.smtp(&format!("RCPT TO:<{r}>")).await);
    }
    replies.push(c.smtp("DATA").await);
    c.send(body).await;
    c.send(b".\r\n").await;
    replies.push(c.smtp_reply().await.pop().unwrap_or_default());
    replies.push(c.smtp("QUIT").await);
    replies
}

/// A message with a 5 MB attachment (base64 lines of 76), dot-stuffing
/// included where a line starts with a dot.
fn big_message() -> (Vec<u8>, Vec<u8>) {
    let mut content =
        b"From: alice@example.com\r\nTo: a@x.example, b@x.example\r\nSubject: scan\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            .to_vec();
    let line: Vec<u8> = (0..76)
        .map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64])
        .collect();
    while content.len() < 5 * 1024 * 1024 {
        content.extend_from_slice(&line);
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(b".a line that starts with a dot\r\n--b--\r\n");
    let mut wire = Vec::new();
    for l in content.split_inclusive(|&b| b == b'\n') {
        if l.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(l);
    }
    (content, wire)
}

async fn wait_for_messages(smtp: &SmtpServer, n: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    while smtp.message_count() < n && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn queued(dir: &Path, area: &str) -> usize {
    std::fs::read_dir(dir.join("spool").join(area))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_device_sends_by_its_address_and_nobody_else_does() {
    let (h, _dir) = harness("dev-live", false, false).await;
    let body = b"Subject: live\r\n\r\nfrom the scanner\r\n";
    let replies = scanner_sends("127.0.0.2", h.smtp_addr, USER, &["a@x.example"], body).await;
    println!("live device: {replies:?}");
    assert!(
        replies[2].starts_with("250"),
        "MAIL answered by the server: {replies:?}"
    );
    assert!(replies[5].starts_with("250"), "{replies:?}");
    let got = h.smtp.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].user, USER, "sent as the account");
    assert_eq!(got[0].from, USER);
    assert_eq!(got[0].to, ["a@x.example"]);
    assert_eq!(got[0].data, body);

    // Not on the list: no relay, ever.
    let replies = scanner_sends("127.0.0.3", h.smtp_addr, USER, &["a@x.example"], body).await;
    println!("127.0.0.3: {replies:?}");
    assert!(replies[2].starts_with("530 5.7.0"), "{replies:?}");
    // The device, as someone it may not send as.
    let replies = scanner_sends(
        "127.0.0.2",
        h.smtp_addr,
        "ceo@example.com",
        &["a@x.example"],
        body,
    )
    .await;
    println!("wrong sender: {}", replies[2]);
    assert!(
        replies[2].starts_with("550 5.7.1 this device may not send as ceo@example.com: by the [[device]] rule for its address it sends as alice@example.com"),
        "{replies:?}"
    );
    assert_eq!(h.smtp.message_count(), 1, "nothing else was sent");
    h.stop().await;
}

#[tokio::test]
async fn spooled_mail_survives_an_outage_and_throttling_and_arrives_once() {
    let (h, dir) = harness("dev-spool", true, false).await;
    // The server is down, then throttles (Microsoft's 4.7.500).
    h.smtp.set_down(true);
    let (content, wire) = big_message();
    let started = Instant::now();
    let replies = scanner_sends(
        "127.0.0.2",
        h.smtp_addr,
        USER,
        &["a@x.example", "b@x.example"],
        &wire,
    )
    .await;
    let took = started.elapsed();
    println!(
        "5 MB to 2 recipients spooled in {:.0} ms: {replies:?}",
        took.as_secs_f64() * 1000.0
    );
    let queued_reply = &replies[replies.len() - 2];
    assert!(
        queued_reply.starts_with("250 2.0.0 OK: queued as "),
        "{replies:?}"
    );
    assert_eq!(queued(&dir, "queue"), 1, "on disk before the 250");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.smtp.message_count(), 0, "the server is down");
    h.smtp.throttle_mail(2);
    h.smtp.set_down(false);
    let waited = wait_for_messages(&h.smtp, 1, Duration::from_secs(60)).await;
    println!(
        "delivered {:.1} s after the outage ended (two throttled tries)",
        waited.as_secs_f64()
    );
    let got = h.smtp.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].user, USER);
    assert_eq!(got[0].to, ["a@x.example", "b@x.example"]);
    assert!(got[0].data == content, "the content arrives byte for byte");
    // Exactly once: nothing more arrives, the queue is empty.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.smtp.message_count(), 1);
    assert_eq!(queued(&dir, "queue"), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_permanent_refusal_fails_the_message_with_an_alert_and_a_report() {
    let (h, dir) = harness("dev-fail", true, true).await;
    h.smtp.refuse_recipient("nobody@x.example");
    let replies = scanner_sends(
        "127.0.0.2",
        h.smtp_addr,
        USER,
        &["nobody@x.example", "ok@x.example"],
        b"Subject: half\r\n\r\nhello\r\n",
    )
    .await;
    assert!(
        replies[replies.len() - 2].starts_with("250 2.0.0 OK: queued as "),
        "{replies:?}"
    );
    // ok@ gets the message, nobody@ fails; the report goes to the sender.
    wait_for_messages(&h.smtp, 2, Duration::from_secs(30)).await;
    let got = h.smtp.messages();
    println!(
        "delivered: {:?}",
        got.iter().map(|m| (&m.from, &m.to)).collect::<Vec<_>>()
    );
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].to, ["ok@x.example"]);
    assert_eq!(got[1].from, "", "the report has the null sender");
    assert_eq!(got[1].to, [USER]);
    let report = String::from_utf8_lossy(&got[1].data);
    assert!(
        report.contains("nobody@x.example: 550 5.1.1 User unknown"),
        "{report}"
    );
    assert_eq!(queued(&dir, "failed"), 1);
    assert_eq!(queued(&dir, "queue"), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_full_disk_gives_452_never_250() {
    let (h, dir) = harness("dev-full", true, false).await;
    // The spool on a small tmpfs (skipped where mounting is not allowed).
    let spool = dir.join("spool");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&spool)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            println!("SKIPPED: cannot mount a tmpfs here ({other:?})");
            h.stop().await;
            return;
        }
    }
    for sub in ["tmp", "queue", "failed"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    h.smtp.set_down(true);
    let (_, wire) = big_message();
    let replies = scanner_sends("127.0.0.2", h.smtp_addr, USER, &["a@x.example"], &wire).await;
    let last = &replies[replies.len() - 2];
    println!("5 MB into a 1 MB spool: {last}");
    assert!(last.starts_with("452 4.3.1 "), "{replies:?}");
    assert_eq!(queued(&dir, "queue"), 0);
    assert_eq!(
        std::fs::read_dir(spool.join("tmp")).unwrap().count(),
        0,
        "nothing left behind"
    );
    // A small one still fits.
    let replies = scanner_sends(
        "127.0.0.2",
        h.smtp_addr,
        USER,
        &["a@x.example"],
        b"small\r\n",
    )
    .await;
    assert!(
        replies[replies.len() - 2].starts_with("250 2.0.0 OK: queued as "),
        "{replies:?}"
    );
    h.stop().await;
    let _ = std::process::Command::new("umount").arg(&spool).status();
}

#[tokio::test]
async fn a_swaks_like_helo_and_auth_login_dialogue_sends() {
    // A client that logs in: HELO (no EHLO), AUTH LOGIN with the exact
    // prompts devices wait for, a multi-recipient message.
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let (h, _dir) = harness("dev-authlogin", true, false).await;
    let mut c = Client::plain_from("127.0.0.3", h.smtp_addr).await;
    c.smtp_reply().await;
    assert_eq!(c.smtp("HELO swaks").await, "250 localhost");
    assert_eq!(c.smtp("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.smtp(&b64(USER)).await, "334 UGFzc3dvcmQ6");
    let ok = c.smtp(&b64(crate::common::PASSWORD)).await;
    assert!(ok.starts_with("235 2.7.0"), "{ok}");
    assert!(
        c.smtp(&format!("MAIL FROM:<{USER}>"))
            .await
            .starts_with("250")
    );
    for r in ["a@x.example", "b@x.example", "c@x.example"] {
        assert!(c.smtp(&format!("RCPT TO:<{r}>")).await.starts_with("250"));
    }
    assert!(c.smtp("DATA").await.starts_with("354"));
    c.send(b"Subject: swaks\r\n\r\nhello\r\n.\r\n").await;
    let reply = c.smtp_reply().await.pop().unwrap_or_default();
    println!("AUTH LOGIN client: {reply}");
    assert!(reply.starts_with("250"), "{reply}");
    let got = h.smtp.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["a@x.example", "b@x.example", "c@x.example"]);
    h.stop().await;
}

#[tokio::test]
async fn a_spooling_listener_keeps_the_message_of_a_client_that_logs_in() {
    // A scanner with a fixed user name and password that never retries:
    // its listener stores and forwards after AUTH.
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let dir = temp_dir("dev-spool-listener");
    let extra = device_config(&dir, true, false);
    // No device: the client is known by its login alone.
    let extra = extra[..extra.find("[[device]]").unwrap()].to_string();
    let h = Harness::start(Options {
        server_extra: extra,
        smtp_listener_extra: "spool = true",
        ..Options::default()
    })
    .await;
    h.smtp.set_down(true);
    let mut c = Client::plain_from("127.0.0.3", h.smtp_addr).await;
    c.smtp_reply().await;
    c.smtp("HELO scanner").await;
    let plain = b64(&format!("\0{USER}\0{}", crate::common::PASSWORD));
    let ok = c.smtp(&format!("AUTH PLAIN {plain}")).await;
    assert!(ok.starts_with("235 2.7.0"), "{ok}");
    assert!(
        c.smtp("AUTH PLAIN x").await.starts_with("503"),
        "one login per session"
    );
    let wrong = c.smtp("MAIL FROM:<ceo@example.com>").await;
    assert!(wrong.starts_with("550 5.7.1"), "{wrong}");
    assert!(
        c.smtp(&format!("MAIL FROM:<{USER}>"))
            .await
            .starts_with("250")
    );
    assert!(c.smtp("RCPT TO:<a@x.example>").await.starts_with("250"));
    assert!(c.smtp("DATA").await.starts_with("354"));
    c.send(b"Subject: after auth\r\n\r\nscan\r\n.\r\n").await;
    let queued_reply = c.smtp_reply().await.pop().unwrap_or_default();
    println!("spooling listener: {queued_reply}");
    assert!(
        queued_reply.starts_with("250 2.0.0 OK: queued as "),
        "{queued_reply}"
    );
    assert_eq!(
        h.smtp.message_count(),
        0,
        "the server is down: stored, not sent"
    );
    // A wrong password on a spooling listener is refused like anywhere.
    let mut w = Client::plain_from("127.0.0.3", h.smtp_addr).await;
    w.smtp_reply().await;
    let bad = w
        .smtp(&format!("AUTH PLAIN {}", b64(&format!("\0{USER}\0wrong"))))
        .await;
    assert!(bad.starts_with("535"), "{bad}");
    h.smtp.set_down(false);
    wait_for_messages(&h.smtp, 1, Duration::from_secs(30)).await;
    let got = h.smtp.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].user, USER);
    assert_eq!(got[0].data, b"Subject: after auth\r\n\r\nscan\r\n");
    h.stop().await;
}
