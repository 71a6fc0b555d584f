//! Point 1: pre-auth is bounded in time and work; connections beyond the
//! limits are told so at once.

use std::time::{Duration, Instant};

use crate::common::{Client, Harness, Options, PASSWORD, USER, quote};
use tokio::io::AsyncWriteExt;

/// Connects from `from` and returns the first line (or "" when none comes
/// within 3 s) with the time it took.
async fn first_line(from: &str, addr: std::net::SocketAddr) -> (Client, String, Duration) {
    let started = Instant::now();
    let mut c = Client::plain_from(from, addr).await;
    let line = c.line_within(Duration::from_secs(3)).await;
    (c, line, started.elapsed())
}

#[tokio::test]
async fn slowloris_from_one_address_does_not_keep_another_out() {
    let h = Harness::start(Options {
        server_extra: "max_connections = 100\npreauth_timeout_secs = 10\n".into(),
        ..Options::default()
    })
    .await;
    let addr = h.addr;
    // 100 connections from 127.0.0.2, each dripping one byte every
    // second for as long as the test runs.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut held = 0;
    let mut refused = 0;
    let mut slowest_refusal = Duration::ZERO;
    let mut drippers = Vec::new();
    for _ in 0..100 {
        let (mut c, line, took) = first_line("127.0.0.2", addr).await;
        if line.starts_with("* OK") {
            held += 1;
            let mut stop = stop_rx.clone();
            drippers.push(tokio::spawn(async move {
                for _ in 0..60 {
                    if *stop.borrow() {
                        break;
                    }
                    c.send(b"a").await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                }
                c
            }));
        } else {
            assert!(
                line.starts_with(
                    "* BYE [UNAVAILABLE] too many connections from your address (at most 12)"
                ),
                "{line}"
            );
            refused += 1;
            slowest_refusal = slowest_refusal.max(took);
        }
    }
    println!(
        "slowloris of 100 from 127.0.0.2: {held} held (the per-address share), {refused} refused at once (slowest refusal {:.1} ms)",
        slowest_refusal.as_secs_f64() * 1000.0
    );
    assert_eq!(held, 12, "max_connections / 8");
    assert_eq!(refused, 88);

    // Meanwhile another host logs in.
    let started = Instant::now();
    let mut c = Client::plain_from("127.0.0.3", addr).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let reply = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    let took = started.elapsed();
    assert!(reply.last().unwrap().starts_with("a1 OK"), "{reply:?}");
    println!(
        "a login from 127.0.0.3 during the slowloris: {:.1} ms (target: under 1 s)",
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let _ = stop_tx.send(true);
    for d in drippers {
        let _ = d.await;
    }
    h.stop().await;
}

#[tokio::test]
async fn beyond_max_connections_each_protocol_says_so_at_once() {
    let h = Harness::start(Options {
        server_extra: "max_connections = 3\n".into(),
        ..Options::default()
    })
    .await;
    let mut hold = Vec::new();
    for _ in 0..3 {
        let (c, line, _) = first_line("127.0.0.2", h.addr).await;
        assert!(line.starts_with("* OK"), "{line}");
        hold.push(c);
    }
    let expect = [
        (
            h.addr,
            "* BYE [UNAVAILABLE] mailbridge is serving its maximum of 3 connections; try again shortly",
        ),
        (
            h.smtp_addr,
            "421 4.7.0 localhost mailbridge is serving its maximum of 3 connections; try again shortly",
        ),
        (
            h.pop3_addr,
            "-ERR [SYS/TEMP] mailbridge is serving its maximum of 3 connections; try again shortly",
        ),
    ];
    for (addr, want) in expect {
        let (mut c, line, took) = first_line("127.0.0.3", addr).await;
        assert_eq!(line, want);
        // And the connection is closed.
        assert_eq!(c.line_within(Duration::from_secs(3)).await, "");
        println!(
            "refused beyond max_connections in {:.1} ms: {line}",
            took.as_secs_f64() * 1000.0
        );
    }
    // A place freed is a place offered.
    drop(hold.pop());
    let mut greeted = false;
    for _ in 0..50 {
        let (_c, line, _) = first_line("127.0.0.3", h.addr).await;
        if line.starts_with("* OK") {
            greeted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(greeted, "a closed connection gives its place back");
    h.stop().await;
}

#[tokio::test]
async fn the_preauth_deadline_holds_whatever_the_client_sends() {
    let h = Harness::start(Options {
        server_extra: "preauth_deadline_secs = 3\npreauth_timeout_secs = 10\n".into(),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let mut c = Client::plain_from("127.0.0.2", h.addr).await;
    assert!(c.line().await.starts_with("* OK"));
    let mut bye = String::new();
    for n in 0..40 {
        c.send(format!("n{n} NOOP\r\n").as_bytes()).await;
        let line = c.line_within(Duration::from_secs(2)).await;
        if line.starts_with("* BYE") {
            bye = line;
            break;
        }
        assert!(line.starts_with(&format!("n{n} OK")), "{line}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let took = started.elapsed();
    println!(
        "a client sending NOOP every 0.4 s was closed after {:.2} s (deadline 3 s): {bye}",
        took.as_secs_f64()
    );
    assert_eq!(
        bye,
        "* BYE [UNAVAILABLE] No login within 3 s; connect again and log in"
    );
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(6));
    h.stop().await;
}

#[tokio::test]
async fn commands_and_failed_logins_are_capped_per_connection() {
    let h = Harness::start(Options {
        server_extra: "preauth_max_commands = 10\n".into(),
        ..Options::default()
    })
    .await;

    // IMAP: the 11th command ends the connection.
    let mut c = Client::plain_from("127.0.0.2", h.addr).await;
    c.line().await;
    let mut answered = 0;
    let mut last = String::new();
    for n in 0..20 {
        c.send(format!("n{n} NOOP\r\n").as_bytes()).await;
        last = c.line_within(Duration::from_secs(3)).await;
        if !last.starts_with(&format!("n{n} OK")) {
            break;
        }
        answered += 1;
    }
    println!("IMAP: {answered} commands answered, then: {last}");
    assert_eq!(answered, 10);
    assert_eq!(
        last,
        "* BYE [UNAVAILABLE] Too many commands before login (at most 10); connect again and log in"
    );
    assert_eq!(c.line_within(Duration::from_secs(3)).await, "");

    // IMAP: the third failed login is answered, then the connection ends.
    let mut c = Client::plain_from("127.0.0.2", h.addr).await;
    c.line().await;
    for n in 1..=3 {
        let reply = c
            .cmd(&format!("l{n}"), "LOGIN nobody@example.com wrong")
            .await;
        assert!(
            reply.last().unwrap().starts_with(&format!("l{n} NO")),
            "{reply:?}"
        );
    }
    let bye = c.line_within(Duration::from_secs(3)).await;
    println!("IMAP after 3 failed logins: {bye}");
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] Too many failed logins on this connection (3)"),
        "{bye}"
    );
    assert_eq!(c.line_within(Duration::from_secs(3)).await, "");

    // SMTP and POP3 close the same way, in their own words.
    let mut c = Client::plain_from("127.0.0.3", h.smtp_addr).await;
    c.smtp_reply().await;
    c.smtp("EHLO scanner").await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        // AUTH PLAIN with "\0nobody\0wrong".
        replies.push(c.smtp("AUTH PLAIN AG5vYm9keQB3cm9uZw==").await);
    }
    let bye = c.smtp_reply().await.pop().unwrap_or_default();
    println!("SMTP after 3 failed logins: {replies:?} then {bye}");
    assert!(
        replies
            .iter()
            .all(|r| r.starts_with('5') || r.starts_with('4')),
        "{replies:?}"
    );
    assert!(
        bye.starts_with("421 4.7.0 localhost Too many failed logins on this connection (3)"),
        "{bye}"
    );

    let mut c = Client::plain_from("127.0.0.3", h.pop3_addr).await;
    c.line().await;
    for _ in 0..3 {
        c.send(b"USER nobody@example.com\r\n").await;
        assert!(c.line().await.starts_with("+OK"));
        c.send(b"PASS wrong\r\n").await;
        assert!(c.line().await.starts_with("-ERR"));
    }
    let bye = c.line_within(Duration::from_secs(3)).await;
    println!("POP3 after 3 failed logins: {bye}");
    assert!(
        bye.starts_with("-ERR [SYS/TEMP] Too many failed logins on this connection (3)"),
        "{bye}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_still_closed_at_the_deadline() {
    let h = Harness::start(Options {
        server_extra: "preauth_deadline_secs = 2\npreauth_max_commands = 1000000\n".into(),
        ..Options::default()
    })
    .await;
    // Pipelined commands, replies never read: the socket buffers fill up
    // and mailbridge's writes stall. The deadline still ends it.
    let mut tcp = crate::common::tcp_from("127.0.0.2", h.addr).await;
    let started = Instant::now();
    let chunk = "x CAPABILITY\r\n".repeat(1000);
    let mut closed = false;
    for _ in 0..2000 {
        match tokio::time::timeout(Duration::from_secs(1), tcp.write_all(chunk.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {
                if started.elapsed() > Duration::from_secs(15) {
                    break;
                }
            }
        }
    }
    let took = started.elapsed();
    println!(
        "a client that never reads: connection closed by mailbridge after {:.1} s (deadline 2 s, plus 5 s for a last word)",
        took.as_secs_f64()
    );
    assert!(closed, "mailbridge closed the connection");
    assert!(took < Duration::from_secs(12), "{took:?}");
    h.stop().await;
}
