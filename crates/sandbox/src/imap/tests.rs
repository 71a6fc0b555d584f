//! The IMAP server through real loopback sockets, with a raw client.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;
use crate::{Provider, ProviderOptions};

const USER: &str = "alice@example.com";
const STEP: Duration = Duration::from_secs(10);

struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Client {
            io: BufReader::new(stream),
        }
    }

    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        tokio::time::timeout(STEP, self.io.read_until(b'\n', &mut line))
            .await
            .expect("server answered in time")
            .expect("read");
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
        line.truncate(line.len() - 2);
        String::from_utf8(line).expect("UTF-8 line")
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let s = self.io.get_mut();
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
    }

    async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    /// Sends a command and returns every line up to and including the
    /// tagged one.
    async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(&format!("{tag} {command}")).await;
        self.until(tag).await
    }

    async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Reads a FETCH response stream: (text with literals elided, literals).
    async fn fetch(&mut self, tag: &str) -> (Vec<String>, Vec<Vec<u8>>) {
        let mut lines = Vec::new();
        let mut literals = Vec::new();
        loop {
            let line = self.line().await;
            if let Some((_, header)) = syntax::literal_suffix(line.as_bytes()) {
                let mut data = vec![0; header.size as usize];
                tokio::time::timeout(STEP, self.io.read_exact(&mut data))
                    .await
                    .unwrap()
                    .unwrap();
                literals.push(data);
                lines.push(line);
                continue;
            }
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return (lines, literals);
            }
        }
    }

    async fn closed(&mut self) -> bool {
        let mut buf = Vec::new();
        matches!(
            tokio::time::timeout(STEP, self.io.read_until(b'\n', &mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

struct Sandbox {
    provider: Provider,
    server: ImapServer,
    pki: TestPki,
}

async fn sandbox(opts: ImapServerOptions) -> Sandbox {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let server = ImapServer::start(opts, provider.validator(), &pki)
        .await
        .unwrap();
    Sandbox {
        provider,
        server,
        pki,
    }
}

impl Sandbox {
    async fn plain(&self) -> Client<TcpStream> {
        Client::new(TcpStream::connect(self.server.addr()).await.unwrap())
    }

    async fn tls(&self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.server.addr()).await.unwrap();
        Client::new(tls_connect(&self.pki, tcp).await)
    }

    fn token(&self) -> String {
        self.provider
            .issue_access_token(USER, "mail", Duration::from_secs(600))
    }
}

async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    pki: &TestPki,
    stream: S,
) -> tokio_rustls::client::TlsStream<S> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(pki.client_config())
        .connect(name, stream)
        .await
        .expect("TLS handshake verifying the sandbox CA")
}

fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

fn oauthbearer(user: &str, token: &str) -> String {
    STANDARD.encode(format!(
        "n,a={user},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01"
    ))
}

fn decode_challenge(line: &str) -> serde_json::Value {
    let b64 = line.strip_prefix("+ ").expect("continuation");
    serde_json::from_slice(&STANDARD.decode(b64).unwrap()).unwrap()
}

fn last(lines: &[String]) -> &str {
    lines.last().unwrap()
}

#[tokio::test]
async fn xoauth2_with_initial_response_over_implicit_tls() {
    let sb = sandbox(ImapServerOptions::default()).await;
    let mut c = sb.tls().await;
    assert_eq!(
        c.line().await,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER ID LITERAL+ \
         LOGINDISABLED] Sandbox IMAP ready"
    );
    let r = c.cmd("a", "CAPABILITY").await;
    assert!(r[0].starts_with("* CAPABILITY IMAP4rev1 SASL-IR"));
    let r = c.cmd("b", "LIST \"\" \"*\"").await;
    assert!(last(&r).starts_with("b BAD"));
    let r = c
        .cmd(
            "c",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &sb.token())),
        )
        .await;
    assert_eq!(
        r,
        vec!["c OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE UIDPLUS LITERAL+ ID MOVE] Authenticated"]
    );
    assert_eq!(sb.server.logins(), 1);
    let r = c.cmd("d", "AUTHENTICATE XOAUTH2 abc").await;
    assert!(last(&r).starts_with("d BAD"));
    let r = c.cmd("e", "LOGOUT").await;
    assert_eq!(
        r,
        vec!["* BYE Sandbox IMAP logging out", "e OK LOGOUT completed"]
    );
    assert!(c.closed().await);
}

#[tokio::test]
async fn xoauth2_without_sasl_ir() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        sasl_ir: false,
        capability_in_login_ok: false,
        capability_in_greeting: false,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    assert_eq!(c.line().await, "* OK Sandbox IMAP ready");
    let r = c.cmd("a", "CAPABILITY").await;
    assert_eq!(
        r[0],
        "* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER ID LITERAL+ LOGINDISABLED"
    );
    let token = sb.token();
    let r = c
        .cmd(
            "b",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &token)),
        )
        .await;
    assert!(last(&r).starts_with("b BAD"), "{r:?}");
    // Cancel, then do it properly.
    c.send("c AUTHENTICATE XOAUTH2").await;
    assert_eq!(c.line().await, "+ ");
    c.send("*").await;
    assert!(c.line().await.starts_with("c BAD"));
    c.send("d AUTHENTICATE XOAUTH2").await;
    assert_eq!(c.line().await, "+ ");
    c.send(&xoauth2(USER, &token)).await;
    assert_eq!(c.line().await, "d OK Authenticated");
    let r = c.cmd("e", "CAPABILITY").await;
    assert_eq!(
        r[0],
        "* CAPABILITY IMAP4rev1 IDLE NAMESPACE UIDPLUS LITERAL+ ID MOVE"
    );
}

#[tokio::test]
async fn oauthbearer_failure_challenge_then_success() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    // A bad token: challenge, AQ==, NO.
    c.send(&format!(
        "a AUTHENTICATE OAUTHBEARER {}",
        oauthbearer(USER, "not-a-live-token-at-all")
    ))
    .await;
    // RFC 7628's error code, as Dovecot sends it for OAUTHBEARER.
    let challenge = decode_challenge(&c.line().await);
    assert_eq!(challenge["status"], "invalid_token");
    assert!(challenge["scope"].is_string());
    c.send("AQ==").await;
    assert_eq!(
        c.line().await,
        "a NO [AUTHENTICATIONFAILED] Invalid credentials"
    );
    // The wrong answer to the challenge: BAD.
    c.send(&format!(
        "b AUTHENTICATE OAUTHBEARER {}",
        oauthbearer(USER, "nope-nope-nope-nope-nope")
    ))
    .await;
    decode_challenge(&c.line().await);
    c.send("").await;
    assert!(c.line().await.starts_with("b BAD"));
    // Another user's token: OAUTHBEARER has no "400"; still invalid_token.
    let bobs = sb
        .provider
        .issue_access_token("bob@example.com", "mail", Duration::from_secs(60));
    c.send(&format!(
        "c AUTHENTICATE OAUTHBEARER {}",
        oauthbearer(USER, &bobs)
    ))
    .await;
    assert_eq!(decode_challenge(&c.line().await)["status"], "invalid_token");
    c.send("AQ==").await;
    assert!(c.line().await.starts_with("c NO [AUTHENTICATIONFAILED]"));
    assert_eq!(sb.server.auth_failures(), 3);
    // Still not authenticated; a good token now works, without SASL-IR too.
    c.send("d AUTHENTICATE OAUTHBEARER").await;
    assert_eq!(c.line().await, "+ ");
    c.send(&oauthbearer(USER, &sb.token())).await;
    assert!(c.line().await.starts_with("d OK [CAPABILITY"));
    assert_eq!(sb.server.logins(), 1);
}

#[tokio::test]
async fn xoauth2_failure_challenge_needs_empty_line() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    let token = sb.token();
    sb.provider.revoke_access_tokens(USER);
    c.send(&format!("a AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &token)))
        .await;
    assert_eq!(decode_challenge(&c.line().await)["status"], "401");
    c.send("").await;
    assert_eq!(
        c.line().await,
        "a NO [AUTHENTICATIONFAILED] Invalid credentials"
    );
    c.send(&format!("b AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &token)))
        .await;
    decode_challenge(&c.line().await);
    c.send("AQ==").await;
    assert!(c.line().await.starts_with("b BAD"));
    // Malformed payloads and bad base64.
    let r = c
        .cmd(
            "c",
            &format!("AUTHENTICATE XOAUTH2 {}", STANDARD.encode("user=x")),
        )
        .await;
    assert!(last(&r).starts_with("c NO"), "{r:?}");
    let r = c.cmd("d", "AUTHENTICATE XOAUTH2 !!!").await;
    assert!(last(&r).starts_with("d BAD"), "{r:?}");
    let r = c.cmd("e", "LOGIN alice secret").await;
    assert!(last(&r).starts_with("e NO"), "{r:?}");
    assert_eq!(sb.server.logins(), 0);
}

#[tokio::test]
async fn mechanism_not_enabled() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        mechanisms: vec![Mechanism::Xoauth2],
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    let greeting = c.line().await;
    assert!(greeting.contains("AUTH=XOAUTH2") && !greeting.contains("AUTH=OAUTHBEARER"));
    let r = c
        .cmd(
            "a",
            &format!(
                "AUTHENTICATE OAUTHBEARER {}",
                oauthbearer(USER, &sb.token())
            ),
        )
        .await;
    assert!(last(&r).starts_with("a NO"), "{r:?}");
    let r = c.cmd("b", "AUTHENTICATE PLAIN AGFsaWNlAHB3").await;
    assert!(last(&r).starts_with("b NO"), "{r:?}");
}

#[tokio::test]
async fn starttls_then_authenticate() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::StartTls,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    let greeting = c.line().await;
    assert!(greeting.contains(" STARTTLS "), "{greeting}");
    let token = sb.token();
    let r = c
        .cmd(
            "a",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &token)),
        )
        .await;
    assert!(last(&r).starts_with("a NO [PRIVACYREQUIRED]"), "{r:?}");
    let r = c.cmd("b", "LOGIN alice secret").await;
    assert!(last(&r).starts_with("b NO [PRIVACYREQUIRED]"), "{r:?}");
    // Plaintext pipelined after STARTTLS must be dropped.
    c.send_raw(b"c STARTTLS\r\nx NOOP\r\n").await;
    assert_eq!(c.line().await, "c OK Begin TLS negotiation now");
    assert!(c.io.buffer().is_empty());
    let tls = tls_connect(&sb.pki, c.io.into_inner()).await;
    let mut c = Client::new(tls);
    let r = c.cmd("d", "CAPABILITY").await;
    assert_eq!(r.len(), 2, "the pipelined NOOP was answered: {r:?}");
    assert!(!r[0].contains("STARTTLS"));
    let r = c.cmd("e", "STARTTLS").await;
    assert!(last(&r).starts_with("e BAD"));
    let r = c
        .cmd(
            "f",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &token)),
        )
        .await;
    assert!(last(&r).starts_with("f OK"), "{r:?}");
}

/// A message with every byte value but NUL-free lines, `size` bytes long.
fn big_message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@example.com\r\nSubject: big\r\n\r\n".to_vec();
    let mut i: u32 = 0;
    while m.len() < size {
        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let b = (i >> 16) as u8;
        m.push(if b == b'\r' || b == b'\n' { b'x' } else { b });
        if m.len().is_multiple_of(76) {
            m.extend_from_slice(b"\r\n");
        }
    }
    m.truncate(size);
    m
}

#[tokio::test]
async fn append_then_fetch_is_byte_exact() {
    let sb = sandbox(ImapServerOptions::default()).await;
    let mut c = sb.tls().await;
    c.line().await;
    c.cmd(
        "a",
        &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &sb.token())),
    )
    .await;
    let small = b"Subject: hi\r\n\r\nbody {5}\r\n".to_vec();
    // Synchronizing literal: wait for the continuation.
    c.send(&format!(
        "b APPEND INBOX (\\Seen) \"01-Jan-2024 10:00:00 +0000\" {{{}}}",
        small.len()
    ))
    .await;
    assert!(c.line().await.starts_with("+ "));
    c.send_raw(&small).await;
    c.send("").await;
    assert_eq!(c.line().await, "b OK [APPENDUID 1 1] APPEND completed");
    // Non-synchronizing, 20 MiB, to another mailbox.
    let big = big_message(20 * 1024 * 1024);
    c.send_raw(format!("c APPEND Archive {{{}+}}\r\n", big.len()).as_bytes())
        .await;
    c.send_raw(&big).await;
    c.send("").await;
    assert_eq!(c.line().await, "c OK [APPENDUID 1 1] APPEND completed");
    sb.server.append(USER, "inbox", b"third\r\n".to_vec());
    assert_eq!(sb.server.messages(USER, "Archive"), vec![big.clone()]);

    let r = c.cmd("d", "LIST \"\" \"*\"").await;
    assert_eq!(
        r,
        vec![
            "* LIST (\\HasNoChildren) \"/\" \"INBOX\"",
            "* LIST (\\HasNoChildren) \"/\" \"Archive\"",
            "d OK LIST completed"
        ]
    );
    let r = c.cmd("e", "SELECT inbox").await;
    assert!(r.contains(&"* 2 EXISTS".to_string()), "{r:?}");
    assert!(r.contains(&"* OK [UIDNEXT 3] Predicted next UID".to_string()));
    assert_eq!(last(&r), "e OK [READ-WRITE] SELECT completed");
    c.send("f FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[])")
        .await;
    let (lines, literals) = c.fetch("f").await;
    assert_eq!(literals, vec![small.clone(), b"third\r\n".to_vec()]);
    assert_eq!(
        lines[0],
        format!(
            "* 1 FETCH (UID 1 FLAGS (\\Seen) RFC822.SIZE {0} BODY[] {{{0}}}",
            small.len()
        )
    );
    assert_eq!(lines[1], ")");
    assert_eq!(last(&lines), "f OK FETCH completed");
    let r = c.cmd("g", "FETCH 3 UID").await;
    assert!(last(&r).starts_with("g BAD"));
    c.send("h UID FETCH 2 RFC822").await;
    let (lines, literals) = c.fetch("h").await;
    assert_eq!(literals, vec![b"third\r\n".to_vec()]);
    assert_eq!(lines[0], "* 2 FETCH (UID 2 RFC822 {7}");

    let r = c.cmd("i", "EXAMINE Archive").await;
    assert_eq!(last(&r), "i OK [READ-ONLY] EXAMINE completed");
    c.send("j UID FETCH 1:* BODY[]").await;
    let (_, literals) = c.fetch("j").await;
    assert!(literals[0] == big, "20 MiB body differs");
    c.send("k FETCH * (BODY[])").await;
    let (_, literals) = c.fetch("k").await;
    assert!(literals[0] == big);
}

#[tokio::test]
async fn idle_id_namespace_and_errors() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    let r = c
        .cmd("a", "ID (\"name\" \"mailbridge\" \"version\" \"1\")")
        .await;
    assert_eq!(
        r,
        vec!["* ID (\"name\" \"sandbox-imap\")", "a OK ID completed"]
    );
    assert_eq!(
        sb.server.last_client_id().as_deref(),
        Some("(\"name\" \"mailbridge\" \"version\" \"1\")")
    );
    let r = c.cmd("b", "SELECT INBOX").await;
    assert!(last(&r).starts_with("b BAD"));
    c.cmd(
        "c",
        &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &sb.token())),
    )
    .await;
    c.send("d IDLE").await;
    assert_eq!(c.line().await, "+ idling");
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.send("DONE").await;
    assert_eq!(c.line().await, "d OK IDLE terminated");
    let r = c.cmd("e", "NAMESPACE").await;
    assert_eq!(r[0], "* NAMESPACE ((\"\" \"/\")) NIL NIL");
    let r = c.cmd("f", "FROBNICATE").await;
    assert!(last(&r).starts_with("f BAD"));
    let r = c.cmd("g", "FETCH 1 UID").await;
    assert!(last(&r).starts_with("g BAD"), "no mailbox selected: {r:?}");
    let r = c.cmd("h", "SELECT Nowhere").await;
    assert!(last(&r).starts_with("h NO [NONEXISTENT]"));
    let r = c.cmd("i", "NOOP").await;
    assert_eq!(r, vec!["i OK NOOP completed"]);
    c.send("))) garbage").await;
    assert!(c.line().await.starts_with("* BAD"));
    sb.server.shutdown();
    assert!(c.closed().await);
}

#[tokio::test]
async fn oversized_literal_before_login_is_refused() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    let r = c.cmd("a", "LOGIN {100000}").await;
    assert!(last(&r).starts_with("a NO [TOOBIG]"), "{r:?}");
    c.send("b LOGIN {5}").await;
    assert_eq!(c.line().await, "+ Ready for literal data");
    c.send_raw(b"alice").await;
    c.send(" \"pw\"").await;
    assert!(c.line().await.starts_with("b NO"));
}

#[tokio::test]
async fn like_microsoft_no_challenge_and_bye_when_the_token_goes() {
    let sb = sandbox(ImapServerOptions {
        tls: SandboxTls::Plain,
        failure_challenge: false,
        bye_on_invalid_token: true,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    assert!(c.line().await.starts_with("* OK"));
    // A refused token: the NO at once, no challenge.
    let r = c
        .cmd(
            "a",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, "not-a-token")),
        )
        .await;
    assert_eq!(r, ["a NO AUTHENTICATE failed."]);
    let r = c
        .cmd(
            "b",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &sb.token())),
        )
        .await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    assert!(last(&c.cmd("c", "NOOP").await).starts_with("c OK"));
    // The token is revoked: the next command ends the session.
    sb.provider.revoke_access_tokens(USER);
    c.send("d NOOP").await;
    assert_eq!(
        c.line().await,
        "* BYE Session invalidated - AccessTokenExpired"
    );
    assert!(c.closed().await);
}
