//! Captures every log line at trace level (mailbridge and its dependencies)
//! through IMAP, SMTP and POP3 logins, a wrong password, a refresh with rotation, an upstream
//! rejection and a revoked grant, and checks that no password or token
//! appears in it.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::*;

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

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let h = Harness::start(Options::default()).await;
    h.imap.append(USER, "INBOX", MESSAGE.to_vec());
    let (mut c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    c.cmd("s1", "SELECT INBOX").await;
    let (_c, no) = h.login("wrong-password-123").await;
    assert!(no.contains("NO"), "{no}");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    h.provider.revoke_access_tokens(USER);
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    // SMTP (AUTH LOGIN: the password travels base64 on its own line) and
    // POP3 (USER/PASS).
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut smtp = Client::plain(h.smtp_addr).await;
    smtp.smtp_reply().await;
    smtp.smtp("EHLO logs.example").await;
    smtp.smtp("AUTH LOGIN").await;
    smtp.smtp(&b64.encode(USER)).await;
    let r = smtp.smtp(&b64.encode(PASSWORD)).await;
    assert!(r.starts_with("235"), "{r}");
    let mut pop = Client::plain(h.pop3_addr).await;
    pop.line().await;
    pop.send(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes())
        .await;
    pop.line().await;
    let r = pop.line().await;
    assert!(r.starts_with("+OK"), "{r}");
    h.provider.revoke_user(USER);
    h.provider.revoke_access_tokens(USER);
    let (_c, no) = h.login(PASSWORD).await;
    assert!(no.contains("invalid_grant"), "{no}");

    let tokens = h.provider.issued_tokens();
    assert!(
        tokens.len() >= 4,
        "expected several issued tokens, got {}",
        tokens.len()
    );
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).to_string();
    assert!(
        logs.contains("access token refreshed"),
        "trace capture works"
    );
    let mut secrets: Vec<String> = vec![
        b64.encode(PASSWORD),
        PASSWORD.into(),
        "wrong-password-123".into(),
        h.refresh_token.clone(),
    ];
    secrets.push(b64.encode(format!("\0{USER}\0{PASSWORD}")));
    for t in &tokens {
        secrets.push(t.clone());
        secrets.push(b64.encode(format!("user={USER}\x01auth=Bearer {t}\x01\x01")));
    }
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret appeared in the logs");
    }
    h.stop().await;
}
