//! The POP3 server through real loopback sockets, with a raw client.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;
use crate::{Provider, ProviderOptions};

const USER: &str = "alice@example.com";
const STEP: Duration = Duration::from_secs(20);

struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Client {
            io: BufReader::new(stream),
        }
    }

    async fn raw_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        tokio::time::timeout(STEP, self.io.read_until(b'\n', &mut line))
            .await
            .expect("server answered in time")
            .expect("read");
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
        line
    }

    async fn line(&mut self) -> String {
        let mut line = self.raw_line().await;
        line.truncate(line.len() - 2);
        String::from_utf8(line).expect("UTF-8 line")
    }

    async fn send(&mut self, line: &str) {
        let s = self.io.get_mut();
        s.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        s.flush().await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// The body of a multi-line response, un-stuffed, CRLFs kept.
    async fn body(&mut self) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let line = self.raw_line().await;
            if line == b".\r\n" {
                return data;
            }
            data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
        }
    }

    /// A multi-line response's lines, as text.
    async fn list(&mut self) -> Vec<String> {
        let body = self.body().await;
        String::from_utf8(body)
            .unwrap()
            .split_terminator("\r\n")
            .map(str::to_owned)
            .collect()
    }

    async fn closed(&mut self) -> bool {
        let mut buf = Vec::new();
        matches!(
            tokio::time::timeout(STEP, self.io.read_until(b'\n', &mut buf)).await,
            Ok(Ok(0))
        )
    }
}

struct Sandbox {
    provider: Provider,
    server: Pop3Server,
    pki: TestPki,
}

async fn sandbox(opts: Pop3ServerOptions) -> Sandbox {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let server = Pop3Server::start(opts, provider.validator(), &pki)
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
        "n,a={user},\x01host=localhost\x01port=995\x01auth=Bearer {token}\x01\x01"
    ))
}

fn decode_challenge(line: &str) -> serde_json::Value {
    let b64 = line.strip_prefix("+ ").expect("continuation");
    serde_json::from_slice(&STANDARD.decode(b64).unwrap()).unwrap()
}

#[tokio::test]
async fn xoauth2_two_step_over_implicit_tls() {
    let sb = sandbox(Pop3ServerOptions::default()).await;
    sb.server
        .append(USER, b"Subject: hi\r\n\r\nhello\r\n".to_vec());
    let mut c = sb.tls().await;
    assert_eq!(c.line().await, "+OK Sandbox POP3 ready");
    assert_eq!(c.cmd("CAPA").await, "+OK Capability list follows");
    assert_eq!(
        c.list().await,
        [
            "TOP",
            "UIDL",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "SASL XOAUTH2 OAUTHBEARER"
        ]
    );
    assert_eq!(c.cmd("AUTH").await, "+OK SASL mechanisms follow");
    assert_eq!(c.list().await, ["XOAUTH2", "OAUTHBEARER"]);
    assert_eq!(c.cmd("AUTH XOAUTH2").await, "+ ");
    assert_eq!(c.cmd(&xoauth2(USER, &sb.token())).await, "+OK Logged in");
    assert_eq!(sb.server.logins(), 1);
    assert_eq!(sb.server.auth_failures(), 0);
    assert_eq!(c.cmd("STAT").await, "+OK 1 22");
    assert!(c.cmd("AUTH XOAUTH2").await.starts_with("-ERR"));
    assert_eq!(c.cmd("CAPA").await, "+OK Capability list follows");
    assert_eq!(
        c.list().await,
        ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
    );
    assert_eq!(c.cmd("QUIT").await, "+OK Sandbox POP3 signing off");
    // A clean TLS close (close_notify) reads as EOF, not an error.
    assert!(c.closed().await);
}

#[tokio::test]
async fn stls_then_oauthbearer_with_initial_response() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::StartTls,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    assert_eq!(c.line().await, "+OK Sandbox POP3 ready");
    c.send("CAPA").await;
    c.line().await;
    assert!(c.list().await.contains(&"STLS".to_string()));
    let token = sb.token();
    assert_eq!(
        c.cmd(&format!("AUTH OAUTHBEARER {}", oauthbearer(USER, &token)))
            .await,
        "-ERR [AUTH] Must issue STLS first"
    );
    assert_eq!(
        c.cmd("AUTH XOAUTH2").await,
        "-ERR [AUTH] Must issue STLS first"
    );
    assert_eq!(c.cmd("STLS").await, "+OK Begin TLS negotiation");
    let mut c = Client::new(tls_connect(&sb.pki, c.io.into_inner()).await);
    c.send("CAPA").await;
    c.line().await;
    let caps = c.list().await;
    assert!(!caps.contains(&"STLS".to_string()), "{caps:?}");
    assert_eq!(c.cmd("STLS").await, "-ERR TLS is already active");
    assert_eq!(
        c.cmd(&format!("AUTH OAUTHBEARER {}", oauthbearer(USER, &token)))
            .await,
        "+OK Logged in"
    );
    assert_eq!(c.cmd("STAT").await, "+OK 0 0");
    assert_eq!(sb.server.logins(), 1);
}

#[tokio::test]
async fn bad_token_challenge_dance() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    // XOAUTH2: challenge, empty line, -ERR.
    let line = c
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2(USER, "not-a-live-token")
        ))
        .await;
    let challenge = decode_challenge(&line);
    assert_eq!(challenge["status"], "401");
    assert_eq!(challenge["schemes"], "bearer");
    assert!(challenge["scope"].is_string());
    assert_eq!(c.cmd("").await, "-ERR [AUTH] Authentication failed");
    // OAUTHBEARER two-step: challenge, AQ==, -ERR.
    assert_eq!(c.cmd("AUTH OAUTHBEARER").await, "+ ");
    let line = c.cmd(&oauthbearer(USER, "nope")).await;
    assert_eq!(decode_challenge(&line)["status"], "invalid_token");
    assert_eq!(c.cmd("AQ==").await, "-ERR [AUTH] Authentication failed");
    // A wrong answer to the challenge is a protocol error.
    c.cmd(&format!("AUTH OAUTHBEARER {}", oauthbearer(USER, "nope")))
        .await;
    assert_eq!(
        c.cmd("").await,
        "-ERR Protocol error: unexpected answer to the failure challenge"
    );
    c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "nope")))
        .await;
    assert!(c.cmd("AQ==").await.starts_with("-ERR Protocol error"));
    // A token for another mailbox: status 400.
    let line = c
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("bob@example.com", &sb.token())
        ))
        .await;
    assert_eq!(decode_challenge(&line)["status"], "400");
    assert_eq!(c.cmd("").await, "-ERR [AUTH] Authentication failed");
    // Malformed payloads are refused outright.
    assert!(
        c.cmd(&format!("AUTH XOAUTH2 {}", STANDARD.encode("user=x")))
            .await
            .starts_with("-ERR [AUTH] Malformed XOAUTH2")
    );
    assert_eq!(
        c.cmd("AUTH XOAUTH2 !!!").await,
        "-ERR Invalid base64 in SASL response"
    );
    assert_eq!(sb.server.auth_failures(), 6);
    assert_eq!(sb.server.logins(), 0);
    // The session is still usable.
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &sb.token())))
            .await,
        "+OK Logged in"
    );
    assert_eq!(sb.server.logins(), 1);
}

#[tokio::test]
async fn initial_response_refused_when_disabled_and_cancel() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::Plain,
        mechanisms: vec![Mechanism::Xoauth2],
        accept_initial_response: false,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    let token = sb.token();
    assert!(
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await
            .starts_with("-ERR Initial response not accepted")
    );
    assert_eq!(
        c.cmd("AUTH OAUTHBEARER").await,
        "-ERR Unsupported SASL mechanism"
    );
    assert_eq!(c.cmd("AUTH XOAUTH2").await, "+ ");
    assert_eq!(c.cmd("*").await, "-ERR AUTH cancelled");
    assert_eq!(c.cmd("auth xoauth2").await, "+ ");
    assert_eq!(c.cmd(&xoauth2(USER, &token)).await, "+OK Logged in");
}

#[tokio::test]
async fn commands_before_auth_refused() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    sb.server.append(USER, b"x\r\n".to_vec());
    let mut c = sb.plain().await;
    c.line().await;
    for cmd in [
        "STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "UIDL", "TOP 1 0", "RSET",
    ] {
        let reply = c.cmd(cmd).await;
        assert!(
            reply.starts_with("-ERR") && reply.contains("before authentication"),
            "{cmd}: {reply}"
        );
    }
    assert_eq!(
        c.cmd("USER alice@example.com").await,
        "-ERR [AUTH] Password logins are disabled"
    );
    assert_eq!(
        c.cmd("PASS my  password").await,
        "-ERR [AUTH] Password logins are disabled"
    );
    assert_eq!(c.cmd("FROBNICATE").await, "-ERR Unknown command");
    assert_eq!(c.cmd("STLS").await, "-ERR STLS is not available here");
    assert_eq!(c.cmd("CAPA x").await, "-ERR CAPA takes no arguments");
    assert_eq!(sb.server.auth_failures(), 2);
    assert_eq!(sb.server.messages(USER).len(), 1);
    // Still usable.
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &sb.token())))
            .await,
        "+OK Logged in"
    );
    assert_eq!(c.cmd("QUIT").await, "+OK Sandbox POP3 signing off");
    assert!(c.closed().await);
}

/// About 10 MiB of CRLF lines, many starting with '.', one just ".".
fn big_message() -> Vec<u8> {
    let mut m = b"Subject: big\r\nFrom: a@example.com\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < 10 * 1024 * 1024 {
        match i % 5 {
            0 => m.extend_from_slice(b".\r\n"),
            1 => m.extend_from_slice(format!("..double dot line {i}\r\n").as_bytes()),
            2 => m.extend_from_slice(format!(".leading dot {i} {}\r\n", "x".repeat(60)).as_bytes()),
            _ => m.extend_from_slice(format!("plain line {i} {}\r\n", "y".repeat(70)).as_bytes()),
        }
        i += 1;
    }
    m
}

#[tokio::test]
async fn retr_large_message_byte_exact_and_listing() {
    let sb = sandbox(Pop3ServerOptions::default()).await;
    let big = big_message();
    let small = b"Subject: s\r\n\r\n.one\r\ntwo\r\nthree\r\n".to_vec();
    sb.server.append(USER, small.clone());
    sb.server.append(USER, big.clone());
    let mut c = sb.tls().await;
    c.line().await;
    c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &sb.token())))
        .await;
    assert_eq!(
        c.cmd("STAT").await,
        format!("+OK 2 {}", small.len() + big.len())
    );
    assert_eq!(c.cmd("LIST").await, "+OK 2 messages");
    assert_eq!(
        c.list().await,
        [format!("1 {}", small.len()), format!("2 {}", big.len())]
    );
    assert_eq!(c.cmd("LIST 2").await, format!("+OK 2 {}", big.len()));
    assert_eq!(c.cmd("LIST 3").await, "-ERR No such message");
    assert_eq!(c.cmd("UIDL").await, "+OK 2 messages");
    let uids = c.list().await;
    assert_eq!(uids.len(), 2);
    assert_ne!(uids[0].split(' ').nth(1), uids[1].split(' ').nth(1));
    assert_eq!(c.cmd("UIDL 1").await, format!("+OK {}", uids[0]));
    assert_eq!(c.cmd("TOP 1 1").await, "+OK Top of message follows");
    assert_eq!(c.body().await, b"Subject: s\r\n\r\n.one\r\n");
    assert_eq!(c.cmd("TOP 1 x").await, "-ERR Invalid line count");
    assert_eq!(c.cmd("RETR 1").await, format!("+OK {} octets", small.len()));
    assert_eq!(c.body().await, small);
    assert_eq!(c.cmd("RETR 2").await, format!("+OK {} octets", big.len()));
    let got = c.body().await;
    assert_eq!(got.len(), big.len());
    assert!(got == big, "10 MiB message differs after un-stuffing");
    assert_eq!(c.cmd("RETR 0").await, "-ERR No such message");
    assert_eq!(c.cmd("RETR").await, "-ERR Wrong arguments for RETR");
    assert_eq!(c.cmd("NOOP").await, "+OK");
}

#[tokio::test]
async fn dele_applies_on_quit_only() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    for i in 1..=3 {
        sb.server.append(
            USER,
            format!("Subject: {i}\r\n\r\nbody {i}\r\n").into_bytes(),
        );
    }
    let login = format!("AUTH XOAUTH2 {}", xoauth2(USER, &sb.token()));
    // DELE then RSET: nothing removed.
    let mut c = sb.plain().await;
    c.line().await;
    c.cmd(&login).await;
    assert_eq!(c.cmd("DELE 1").await, "+OK Message 1 deleted");
    assert_eq!(c.cmd("DELE 1").await, "-ERR Message already deleted");
    assert_eq!(c.cmd("RETR 1").await, "-ERR No such message");
    assert_eq!(c.cmd("RSET").await, "+OK 3 messages");
    assert!(c.cmd("RETR 1").await.starts_with("+OK"));
    c.body().await;
    // DELE, then the connection drops without QUIT: nothing removed.
    assert_eq!(c.cmd("DELE 2").await, "+OK Message 2 deleted");
    drop(c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sb.server.messages(USER).len(), 3);
    // DELE and QUIT: removed.
    let mut c = sb.plain().await;
    c.line().await;
    c.cmd(&login).await;
    assert_eq!(c.cmd("DELE 2").await, "+OK Message 2 deleted");
    assert_eq!(c.cmd("STAT").await, "+OK 2 44");
    assert_eq!(c.cmd("LIST").await, "+OK 2 messages");
    assert_eq!(c.list().await, ["1 22", "3 22"]);
    assert_eq!(c.cmd("DELE 9").await, "-ERR No such message");
    assert_eq!(c.cmd("QUIT").await, "+OK Sandbox POP3 signing off");
    assert!(c.closed().await);
    assert_eq!(
        sb.server.messages(USER),
        [
            b"Subject: 1\r\n\r\nbody 1\r\n".to_vec(),
            b"Subject: 3\r\n\r\nbody 3\r\n".to_vec()
        ]
    );
}

#[tokio::test]
async fn overlong_line_closes_and_shutdown_stops() {
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::Plain,
        ..Default::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    c.send(&"x".repeat(MAX_LINE + 10)).await;
    assert_eq!(c.line().await, "-ERR Line too long");
    assert!(c.closed().await);
    let mut c = sb.plain().await;
    c.line().await;
    sb.server.shutdown();
    assert!(c.closed().await);
}

/// How a login drive over one stream ended.
enum Driven {
    Done(mailbridge_proto::UpstreamSuccess),
    StartTls,
}

/// Runs mailbridge's upstream login dialogue over `stream`, handing out
/// `tokens` in order and retrying when the server suggests it.
async fn drive_login<S: AsyncRead + AsyncWrite + Unpin>(
    u: &mut mailbridge_proto::pop3::Pop3UpstreamLogin,
    stream: &mut S,
    tokens: &mut Vec<String>,
    rejections: &mut Vec<mailbridge_proto::Rejection>,
) -> Driven {
    use tokio::io::AsyncReadExt;

    use mailbridge_proto::sasl::BearerToken;
    use mailbridge_proto::{UpstreamLogin, UpstreamStep};
    let mut buf = vec![0; 4096];
    loop {
        match u.next_step().expect("login dialogue") {
            UpstreamStep::NeedInput => {
                let n = tokio::time::timeout(STEP, stream.read(&mut buf))
                    .await
                    .expect("server answered in time")
                    .expect("read");
                assert!(n > 0, "server closed during login");
                u.feed(&buf[..n]);
            }
            UpstreamStep::Send(bytes) => {
                stream.write_all(&bytes).await.unwrap();
                stream.flush().await.unwrap();
            }
            UpstreamStep::StartTls => return Driven::StartTls,
            UpstreamStep::NeedToken => u.provide_token(&BearerToken {
                user: USER.into(),
                token: secrecy::SecretString::from(tokens.remove(0)),
                host: "localhost".into(),
                port: 110,
            }),
            UpstreamStep::Rejected(r) => {
                let retry = r.retry_suggested;
                rejections.push(r);
                assert!(retry, "rejected without a retry suggestion");
                u.retry();
            }
            UpstreamStep::Authenticated(ok) => return Driven::Done(ok),
        }
    }
}

#[tokio::test]
async fn upstream_login_dialogue_against_the_sandbox() {
    use mailbridge_proto::pop3::{Pop3UpstreamLogin, UpstreamOptions};
    let sb = sandbox(Pop3ServerOptions {
        tls: SandboxTls::StartTls,
        ..Default::default()
    })
    .await;
    sb.server.append(USER, b"Subject: x\r\n\r\ny\r\n".to_vec());
    for (mech, ir) in [(Mechanism::Xoauth2, false), (Mechanism::Oauthbearer, true)] {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions {
            starttls: true,
            preference: vec![mech],
            initial_response: ir,
            ..UpstreamOptions::default()
        });
        let mut tokens = vec!["stale-token".to_string(), sb.token()];
        let mut rejections = Vec::new();
        let mut tcp = TcpStream::connect(sb.server.addr()).await.unwrap();
        let driven = drive_login(&mut u, &mut tcp, &mut tokens, &mut rejections).await;
        assert!(matches!(driven, Driven::StartTls));
        let mut tls = tls_connect(&sb.pki, tcp).await;
        mailbridge_proto::UpstreamLogin::tls_started(&mut u);
        let Driven::Done(ok) = drive_login(&mut u, &mut tls, &mut tokens, &mut rejections).await
        else {
            panic!("a second STLS");
        };
        assert!(
            ok.capabilities
                .contains(&"SASL XOAUTH2 OAUTHBEARER".to_string())
        );
        assert!(!ok.capabilities.contains(&"STLS".to_string()));
        assert!(ok.leftover.is_empty());
        assert_eq!(rejections.len(), 1);
        assert_eq!(
            rejections[0].refusal.to_string(),
            "-ERR [AUTH] Authentication failed"
        );
        assert!(
            rejections[0]
                .refusal
                .response_code()
                .is_some_and(|c| c.is("AUTH"))
        );
        assert_eq!(
            rejections[0]
                .challenge
                .as_ref()
                .and_then(|c| c.status.as_deref()),
            Some(match mech {
                Mechanism::Xoauth2 => "401",
                Mechanism::Oauthbearer => "invalid_token",
            })
        );
        // Relaying from here: the session is a plain POP3 session.
        let mut c = Client::new(tls);
        assert_eq!(c.cmd("STAT").await, "+OK 1 17");
        assert_eq!(c.cmd("QUIT").await, "+OK Sandbox POP3 signing off");
    }
    assert_eq!(sb.server.logins(), 2);
    assert_eq!(sb.server.auth_failures(), 2);
}
