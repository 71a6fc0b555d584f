//! Point 5: the PROXY protocol. Hand-made v1 and v2 headers from a
//! trusted address (127.0.0.1) name the client whose address then counts
//! for the connection limits, the backoff, `local_networks` and the
//! device allow-list; headers from anyone else, and garbage from a
//! trusted proxy, close the connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{self, Client, Harness, Options, PASSWORD, USER, quote, tcp_from};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy's own address, the one `trusted_proxies` names.
const PROXY: &str = "127.0.0.1";

/// `PROXY TCP4 ...` for a client at `client` talking to `to`.
fn v1(client: &str, to: SocketAddr) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        to.ip(),
        client.port(),
        to.port()
    )
    .into_bytes()
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A binary v2 header: PROXY over TCP/IPv4 for `client`, with a TLV (an
/// ALPN of `imap`) as haproxy may add.
fn v2(client: &str, to: SocketAddr) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let (SocketAddr::V4(c), SocketAddr::V4(t)) = (client, to) else {
        panic!("IPv4 only");
    };
    let mut payload = Vec::new();
    payload.extend_from_slice(&c.ip().octets());
    payload.extend_from_slice(&t.ip().octets());
    payload.extend_from_slice(&c.port().to_be_bytes());
    payload.extend_from_slice(&t.port().to_be_bytes());
    payload.extend_from_slice(&[0x01, 0x00, 0x04]);
    payload.extend_from_slice(b"imap");
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&payload);
    h
}

/// A v2 LOCAL header, as a proxy's health check sends.
fn v2_local() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// A connection from `from` that starts with `header`.
async fn proxied_from(from: &str, addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut tcp = tcp_from(from, addr).await;
    tcp.write_all(header).await.unwrap();
    tcp
}

/// A client through the trusted proxy, for the client `header` names.
async fn proxied(addr: SocketAddr, header: &[u8]) -> Client {
    Client::over(proxied_from(PROXY, addr, header).await)
}

/// Every listener takes the PROXY protocol from 127.0.0.1 only.
async fn harness(server_extra: &str) -> Harness {
    Harness::start(Options {
        server_extra: format!("trusted_proxies = [\"{PROXY}/32\"]\n{server_extra}"),
        listener_extra: "proxy_protocol = true\n".into(),
        ..Options::default()
    })
    .await
}

/// Whether mailbridge closes `tcp` without a word within `limit`.
async fn closed_without_a_word(mut tcp: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// One LOGIN through the proxy for `client`: the tagged reply.
async fn login_as(h: &Harness, client: &str, user: &str, password: &str) -> String {
    let mut c = proxied(h.addr, &v1(client, h.addr)).await;
    let g = c.line().await;
    assert!(g.starts_with("* OK"), "{g}");
    let reply = c
        .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
        .await;
    reply.last().cloned().unwrap_or_default()
}

#[tokio::test]
async fn proxy_headers_v1_and_v2_carry_the_session_in_every_protocol() {
    let h = harness("").await;

    // IMAP, v1, with the login in the same packet as the header: the
    // bytes after the header reach the session.
    let started = Instant::now();
    let mut header = v1("192.0.2.7:51000", h.addr);
    header.extend_from_slice(format!("a1 LOGIN {USER} {}\r\n", quote(PASSWORD)).as_bytes());
    let mut c = proxied(h.addr, &header).await;
    assert!(c.line().await.starts_with("* OK"));
    let reply = c.until_tagged("a1").await;
    assert!(reply.last().unwrap().starts_with("a1 OK"), "{reply:?}");
    let select = c.cmd("a2", "SELECT INBOX").await;
    assert!(select.last().unwrap().starts_with("a2 OK"), "{select:?}");
    println!(
        "IMAP through a v1 header, login pipelined with it: {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );

    // IMAP, v2 with a TLV.
    let mut c = proxied(h.addr, &v2("192.0.2.8:40000", h.addr)).await;
    assert!(c.line().await.starts_with("* OK"));
    let reply = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(reply.last().unwrap().starts_with("a1 OK"), "{reply:?}");

    // SMTP, v2: EHLO, AUTH PLAIN.
    let mut c = proxied(h.smtp_addr, &v2("192.0.2.9:40001", h.smtp_addr)).await;
    assert!(c.smtp_reply().await[0].starts_with("220"));
    let ehlo = c.smtp("EHLO scanner.lan").await;
    assert!(ehlo.starts_with("250"), "{ehlo}");
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    let auth = c.smtp(&format!("AUTH PLAIN {plain}")).await;
    assert!(auth.starts_with("235"), "{auth}");

    // POP3, v1 over IPv6 addresses.
    let header = format!(
        "PROXY TCP6 2001:db8::7 2001:db8::1 51000 {}\r\n",
        h.pop3_addr.port()
    );
    let mut c = proxied(h.pop3_addr, header.as_bytes()).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send(format!("USER {USER}\r\n").as_bytes()).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send(format!("PASS {PASSWORD}\r\n").as_bytes()).await;
    let pass = c.line().await;
    assert!(pass.starts_with("+OK"), "{pass}");
    h.stop().await;
}

#[tokio::test]
async fn the_address_in_the_header_is_the_one_that_backs_off() {
    // A long backoff, so a throttled address stays throttled for the test.
    let h = Harness::start(Options {
        server_extra: format!(
            "trusted_proxies = [\"{PROXY}/32\"]\npreauth_max_failed_logins = 100\n"
        ),
        listener_extra: "proxy_protocol = true\n".into(),
        backoff: (60_000, 300),
        ..Options::default()
    })
    .await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(login_as(&h, "192.0.2.7:50000", USER, "wrong").await);
    }
    assert!(
        replies[0].starts_with("a1 NO [AUTHENTICATIONFAILED]"),
        "{replies:?}"
    );
    let right_from_7 = login_as(&h, "192.0.2.7:50001", USER, PASSWORD).await;
    let right_from_8 = login_as(&h, "192.0.2.8:50002", USER, PASSWORD).await;
    println!(
        "through one proxy: three wrong passwords for 192.0.2.7 ({replies:?}); then the right one from 192.0.2.7: {right_from_7}; from 192.0.2.8: {right_from_8}"
    );
    assert!(
        right_from_7.starts_with("a1 NO [UNAVAILABLE] too many failed logins; try again in"),
        "{right_from_7}"
    );
    assert!(right_from_8.starts_with("a1 OK"), "{right_from_8}");
    h.stop().await;
}

#[tokio::test]
async fn local_networks_go_by_the_address_in_the_header() {
    let h = harness("").await;
    // The proxy is 127.0.0.1, a local client; the header decides.
    let lan = login_as(&h, "192.0.2.7:50000", "nobody@example.com", "pw").await;
    assert_eq!(
        lan,
        "a1 NO [AUTHENTICATIONFAILED] wrong user name or password (the mailbridge log says more)"
    );
    let local = login_as(&h, "127.0.0.1:50001", "nobody@example.com", "pw").await;
    assert!(
        local.starts_with(
            "a1 NO [AUTHENTICATIONFAILED] mailbridge has no account for `nobody@example.com`"
        ),
        "{local}"
    );
    // A v2 LOCAL header (a health check): the proxy's own address
    // stands, and it is local. (Another name: 127.0.0.1 backs off for
    // the one it just failed with.)
    let mut c = proxied(h.addr, &v2_local()).await;
    assert!(c.line().await.starts_with("* OK"));
    let reply = c.cmd("a1", "LOGIN somebody@example.com pw").await;
    assert!(
        reply
            .last()
            .unwrap()
            .starts_with("a1 NO [AUTHENTICATIONFAILED] mailbridge has no account for"),
        "{reply:?}"
    );
    // v1 UNKNOWN likewise.
    let mut c = proxied(h.addr, b"PROXY UNKNOWN\r\n").await;
    assert!(c.line().await.starts_with("* OK"));
    let reply = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(reply.last().unwrap().starts_with("a1 OK"), "{reply:?}");
    h.stop().await;
}

#[tokio::test]
async fn headers_from_untrusted_addresses_and_garbage_are_closed() {
    let h = harness("").await;
    let started = Instant::now();
    // A valid header, from an address that is not a trusted proxy.
    let tcp = proxied_from("127.0.0.3", h.addr, &v1("192.0.2.7:1", h.addr)).await;
    assert!(closed_without_a_word(tcp, Duration::from_secs(2)).await);
    // No header at all from there (a client connecting directly).
    let tcp = tcp_from("127.0.0.3", h.smtp_addr).await;
    assert!(closed_without_a_word(tcp, Duration::from_secs(2)).await);
    // Garbage instead of a header, from the trusted proxy.
    for garbage in [
        &b"a1 LOGIN alice@example.com secret\r\n"[..],
        b"PROXY TCP4 192.0.2.7 192.0.2.1 not-a-port 143\r\n",
        b"PROXY TCP4 192.0.2.7 192.0.2.1 1 2\n",
        b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
    ] {
        let tcp = proxied_from(PROXY, h.addr, garbage).await;
        assert!(
            closed_without_a_word(tcp, Duration::from_secs(2)).await,
            "{:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    // A header cut short, then the proxy closes its side.
    let mut tcp = proxied_from(PROXY, h.pop3_addr, b"PROXY TCP4 192.0.2.7").await;
    tcp.shutdown().await.unwrap();
    assert!(closed_without_a_word(tcp, Duration::from_secs(2)).await);
    println!(
        "untrusted, headerless and garbage connections closed in {:.1} ms in all",
        started.elapsed().as_secs_f64() * 1000.0
    );
    // A header that never ends: closed after the 5 s the proxy has.
    let started = Instant::now();
    let tcp = proxied_from(PROXY, h.addr, b"PROXY TCP4 192.0.2.7 ").await;
    assert!(closed_without_a_word(tcp, Duration::from_secs(10)).await);
    let waited = started.elapsed();
    println!(
        "an unfinished header closed after {:.2} s",
        waited.as_secs_f64()
    );
    assert!(waited >= Duration::from_millis(4900), "{waited:?}");
    // The listener still serves.
    let reply = login_as(&h, "192.0.2.7:1", USER, PASSWORD).await;
    assert!(reply.starts_with("a1 OK"), "{reply}");
    h.stop().await;
}

#[tokio::test]
async fn the_per_address_limit_counts_the_client_not_the_proxy() {
    let h = harness("max_connections = 20\nmax_connections_per_address = 2\n").await;
    let mut held = Vec::new();
    for port in [1, 2] {
        let mut c = proxied(h.addr, &v1(&format!("192.0.2.7:{port}"), h.addr)).await;
        assert!(c.line().await.starts_with("* OK"));
        held.push(c);
    }
    let mut third = proxied(h.addr, &v2("192.0.2.7:3", h.addr)).await;
    let refused = third.line().await;
    assert_eq!(
        refused,
        "* BYE [UNAVAILABLE] too many connections from your address (at most 2); close some and try again"
    );
    // Another client through the same proxy is served.
    let mut other = proxied(h.addr, &v2("192.0.2.8:4", h.addr)).await;
    let greeting = other.line().await;
    println!(
        "two held for 192.0.2.7 through 127.0.0.1: a third for it got {refused:?}; 192.0.2.8 got {greeting:?}"
    );
    assert!(greeting.starts_with("* OK"), "{greeting}");
    drop(held);
    h.stop().await;
}

#[tokio::test]
async fn on_implicit_tls_the_header_comes_before_the_handshake() {
    let h = Harness::start(Options {
        listener_tls: "implicit",
        server_extra: format!("trusted_proxies = [\"{PROXY}/32\"]\n"),
        listener_extra: "proxy_protocol = true\n".into(),
        ..Options::default()
    })
    .await;
    let tcp = proxied_from(PROXY, h.addr, &v2("192.0.2.7:5", h.addr)).await;
    let tls = tokio_rustls::TlsConnector::from(h.client_tls_config())
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS after the header");
    let mut c = Client::over(tls);
    assert!(c.line().await.starts_with("* OK"));
    let reply = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    assert!(reply.last().unwrap().starts_with("a1 OK"), "{reply:?}");
    h.stop().await;
}

#[tokio::test]
async fn a_device_behind_the_proxy_is_known_by_the_address_in_the_header() {
    // A scanner at 192.0.2.50 may send as alice without AUTH (live, not
    // spooled); devices need service key mode.
    let keys = common::temp_dir("proxy-device-key");
    let key = keys.join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let h = Harness::start(Options {
        server_extra: format!(
            "trusted_proxies = [\"{PROXY}/32\"]\nkey_mode = \"service\"\nkey_file = \"{}\"\n\n[[device]]\nname = \"scanner\"\nfrom = [\"192.0.2.50\"]\naccount = \"{USER}\"\nspool = false\n",
            key.display()
        ),
        listener_extra: "proxy_protocol = true\n".into(),
        ..Options::default()
    })
    .await;
    let send = |client: &'static str| {
        let addr = h.smtp_addr;
        async move {
            let mut c = proxied(addr, &v2(client, addr)).await;
            assert!(c.smtp_reply().await[0].starts_with("220"));
            let helo = c.smtp("HELO scanner").await;
            assert!(helo.starts_with("250"), "{helo}");
            let mail = c.smtp(&format!("MAIL FROM:<{USER}>")).await;
            if !mail.starts_with("250") {
                return mail;
            }
            let rcpt = c.smtp("RCPT TO:<bob@example.com>").await;
            assert!(rcpt.starts_with("250"), "{rcpt}");
            let data = c.smtp("DATA").await;
            assert!(data.starts_with("354"), "{data}");
            c.smtp("Subject: scan\r\n\r\nscanned through a proxy\r\n.")
                .await
        }
    };
    let other = send("192.0.2.51:1").await;
    assert!(other.starts_with("530"), "{other}");
    assert_eq!(h.smtp.message_count(), 0);
    let device = send("192.0.2.50:1").await;
    println!(
        "through the proxy: 192.0.2.51 got {other:?}; the scanner at 192.0.2.50 got {device:?}"
    );
    assert!(device.starts_with("250"), "{device}");
    assert_eq!(h.smtp.message_count(), 1);
    h.stop().await;
    let _ = std::fs::remove_dir_all(keys);
}

/// Connections from the trusted proxy that have not sent their header yet
/// count against `max_connections`: beyond it, one is closed at once
/// instead of waiting for a header; once they go, proxied clients are
/// served again.
#[tokio::test]
async fn connections_waiting_for_their_header_count_against_max_connections() {
    let h = harness("max_connections = 2\n").await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tcp_from(PROXY, h.addr).await);
    }
    // The listener has taken both (a bounded wait for its accept loop).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = proxied_from(PROXY, h.addr, &v1("192.0.2.7:1", h.addr)).await;
    let t0 = std::time::Instant::now();
    assert!(
        closed_without_a_word(third, Duration::from_secs(3)).await,
        "a third connection waited beside two without a header"
    );
    println!(
        "with 2 connections waiting for a header (max_connections = 2), a third was closed after {} ms",
        t0.elapsed().as_millis()
    );
    drop(silent);
    let mut reply = String::new();
    for _ in 0..50 {
        let mut c = proxied(h.addr, &v1("192.0.2.7:2", h.addr)).await;
        reply = c.line().await;
        if reply.starts_with("* OK") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reply.starts_with("* OK"), "{reply}");
    h.stop().await;
}
