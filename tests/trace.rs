//! `mailbridge trace ACCOUNT` (the binary) against a server with its
//! control socket: both sides of IMAP, POP3 and SMTP logins of the
//! account, no password, token or SASL response in the trace; another
//! account's session not shown; an unknown account refused; no service
//! running said plainly.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
const BOB: &str = "bob@example.com";
const BOB_PASSWORD: &str = "bobs-own-pa55word";

fn trace_command(h: &Harness, account: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("trace")
        .arg(account)
        .arg("--config")
        .arg(&h.config_path)
        .arg("--state-dir")
        .arg(h.dir.join("state"))
        .args(extra)
        .env("MAILBRIDGE_LOG", "warn");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_shows_both_sides_of_each_login_and_no_secret() {
    let h = Harness::start(Options {
        control_socket: true,
        extra_accounts: vec![(BOB, BOB_PASSWORD)],
        ..Options::default()
    })
    .await;
    let mut child = Reaper(
        trace_command(&h, USER, &["--count", "3", "--for", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailbridge trace"),
    );
    // The command says so once the service has started the trace.
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut said = String::new();
    stderr.read_line(&mut said).unwrap();
    assert!(
        said.contains(&format!("tracing `{USER}`")),
        "first line on stderr: {said}"
    );
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    // Another account's session first: it must not appear.
    let mut bob = h.client().await;
    let r = bob
        .cmd("b1", &format!("LOGIN {BOB} {}", quote(BOB_PASSWORD)))
        .await;
    assert!(r.last().unwrap().starts_with("b1 OK"), "{r:?}");

    // IMAP LOGIN.
    let (mut imap, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    imap.cmd("a2", "NOOP").await;

    // POP3 AUTH PLAIN, the response on its own line.
    let plain = b64(&format!("\0{USER}\0{PASSWORD}"));
    let mut pop = Client::plain(h.pop3_addr).await;
    pop.line().await;
    pop.send(b"AUTH PLAIN\r\n").await;
    let go = pop.line().await;
    assert!(go.starts_with('+'), "{go}");
    pop.send(format!("{plain}\r\n").as_bytes()).await;
    let ok = pop.line().await;
    assert!(ok.starts_with("+OK"), "{ok}");

    // SMTP AUTH LOGIN: the name and the password base64 on lines of
    // their own.
    let mut smtp = Client::plain(h.smtp_addr).await;
    smtp.smtp_reply().await;
    smtp.smtp("EHLO trace.example").await;
    smtp.smtp("AUTH LOGIN").await;
    smtp.smtp(&b64(USER)).await;
    let r = smtp.smtp(&b64(PASSWORD)).await;
    assert!(r.starts_with("235"), "{r}");

    // Three sessions shown: the command ends by itself.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < WAIT, "mailbridge trace did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut trace = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut trace)
        .unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}\n{trace}");
    println!("{trace}");

    // Both sides, each line marked with its session and direction.
    for expected in [
        "---- IMAP connection from 127.0.0.1:",
        "M->C * OK",
        &format!("C->M a1 LOGIN {USER} [redacted]"),
        "---- connecting to localhost:",
        "S->M * OK",
        "CAPABILITY",
        "AUTHENTICATE XOAUTH2 [redacted]",
        "to the listener on 127.0.0.1:",
        "---- access token ready (not shown)",
        "M->C a1 OK",
        "==== logged in: the byte relay starts",
        "---- POP3 connection",
        "C->M AUTH PLAIN",
        "C->M [redacted]",
        "M->S AUTH XOAUTH2 [redacted]",
        "M->C +OK",
        "---- SMTP connection",
        "C->M EHLO trace.example",
        "C->M AUTH LOGIN",
        "M->C 334 ",
        "S->M 220 ",
        "M->S EHLO ",
        "M->C 235 ",
    ] {
        assert!(
            trace.contains(expected),
            "the trace lacks {expected:?}:\n{trace}"
        );
    }
    assert_eq!(trace.matches("==== logged in").count(), 3, "{trace}");
    // The relayed NOOP is not in it: the trace ends at the relay.
    assert!(!trace.contains("a2 NOOP"), "{trace}");
    // Every line names its session.
    assert!(
        trace.lines().all(|l| l.starts_with("[s")),
        "unmarked line:\n{trace}"
    );
    // Bob's session is not shown.
    assert!(!trace.contains(BOB), "{trace}");
    assert!(!trace.contains("C->M b1 "), "{trace}");
    assert!(!trace.contains("[s1 "), "{trace}");

    // No secret: the passwords, the tokens the provider issued (access
    // and refresh), and the SASL payloads in any form.
    let mut secrets = vec![
        PASSWORD.to_string(),
        b64(PASSWORD),
        plain.clone(),
        BOB_PASSWORD.to_string(),
        h.refresh_token.clone(),
    ];
    let issued = h.provider.issued_tokens();
    assert!(
        issued.len() >= 2,
        "a refresh and an access token were issued"
    );
    for token in issued {
        secrets.push(b64(&format!("user={USER}\x01auth=Bearer {token}\x01\x01")));
        secrets.push(token);
    }
    for s in &secrets {
        assert!(!trace.contains(s.as_str()), "the trace shows a secret");
        assert!(!rest.contains(s.as_str()), "stderr shows a secret");
    }
    // (Closed first: a drain with relayed clients still open sometimes
    // takes the harness's whole wait.)
    drop((bob, imap, pop, smtp));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_account_is_refused_and_a_missing_service_said_plainly() {
    let h = Harness::start(Options {
        control_socket: true,
        ..Options::default()
    })
    .await;
    let out = trace_command(&h, "nobody@elsewhere.example", &["--for", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the running service has no account `nobody@elsewhere.example`"),
        "{stderr}"
    );
    // A name the account takes in another case is the account.
    let out = trace_command(&h, &USER.to_uppercase(), &["--for", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("tracing `{USER}`")), "{stderr}");

    // With no service on that state directory.
    let empty = temp_dir("trace-none");
    let out = Command::new(BIN)
        .args(["trace", USER, "--config"])
        .arg(&h.config_path)
        .arg("--state-dir")
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no mailbridge is running with the state directory"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&empty);
    h.stop().await;
}

/// Another user may not trace: refused where the socket's permissions
/// stop it, and by the service when they do not (needs root to act as
/// another user; skipped otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_may_not_trace() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!("skipped: needs root to run a command as another user");
        return;
    }
    let h = Harness::start(Options {
        control_socket: true,
        ..Options::default()
    })
    .await;
    let state = h.dir.join("state");
    let socket = state.join("control.sock");
    let run_as_nobody = || {
        trace_command(&h, USER, &["--for", "5"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_as_nobody();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("permission denied on"), "{stderr}");
    println!("as another user: {stderr}");
    // The socket open to everyone: the service itself refuses the peer.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_as_nobody();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("permission denied on {}", socket.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("tracing"), "{stderr}");
    println!("with the socket open to all: {stderr}");
    h.stop().await;
}
