//! The SMTP server through real loopback sockets, with a raw client.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
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

    /// A whole reply: every line up to the one with a space after the code.
    async fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines;
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let s = self.io.get_mut();
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
    }

    async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    /// Sends a command and returns the last line of its reply.
    async fn cmd(&mut self, command: &str) -> String {
        self.send(command).await;
        self.reply().await.pop().unwrap_or_default()
    }

    async fn closed(&mut self) -> bool {
        let mut buf = Vec::new();
        matches!(
            tokio::time::timeout(STEP, self.io.read_until(b'\n', &mut buf)).await,
            Ok(Ok(0))
        )
    }

    fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

struct Sandbox {
    provider: Provider,
    server: SmtpServer,
    pki: TestPki,
}

async fn sandbox(opts: SmtpServerOptions) -> Sandbox {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let server = SmtpServer::start(opts, provider.validator(), &pki)
        .await
        .unwrap();
    Sandbox {
        provider,
        server,
        pki,
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

impl Sandbox {
    async fn plain(&self) -> Client<TcpStream> {
        Client::new(TcpStream::connect(self.server.addr()).await.unwrap())
    }

    /// Greeting, EHLO, STARTTLS, handshake, EHLO again.
    async fn starttls(&self) -> Client<Tls> {
        let mut c = self.plain().await;
        assert_eq!(c.line().await, "220 localhost ESMTP Sandbox SMTP ready");
        let lines = c.cmd_all("EHLO client.example").await;
        assert_eq!(lines.last().map(String::as_str), Some("250 STARTTLS"));
        assert!(!lines.iter().any(|l| l.contains("AUTH")), "{lines:?}");
        assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");
        let tls = tls_connect(&self.pki, c.into_inner()).await;
        let mut c = Client::new(tls);
        let lines = c.cmd_all("EHLO client.example").await;
        assert_eq!(
            lines,
            [
                "250-localhost greets client.example".to_owned(),
                "250-PIPELINING".to_owned(),
                "250-8BITMIME".to_owned(),
                "250-ENHANCEDSTATUSCODES".to_owned(),
                format!("250-SIZE {}", self.server.shared.opts.max_size),
                "250 AUTH XOAUTH2 OAUTHBEARER".to_owned()
            ]
        );
        c
    }

    fn token(&self) -> String {
        self.provider
            .issue_access_token(USER, "mail", Duration::from_secs(600))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn cmd_all(&mut self, command: &str) -> Vec<String> {
        self.send(command).await;
        self.reply().await
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
        "n,a={user},\x01host=localhost\x01port=587\x01auth=Bearer {token}\x01\x01"
    ))
}

fn decode_challenge(line: &str) -> serde_json::Value {
    let b64 = line.strip_prefix("334 ").expect("challenge");
    serde_json::from_slice(&STANDARD.decode(b64).unwrap()).unwrap()
}

#[tokio::test]
async fn starttls_then_both_mechanisms_both_forms() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    for (mech, encode) in [
        ("XOAUTH2", xoauth2 as fn(&str, &str) -> String),
        ("OAUTHBEARER", oauthbearer),
    ] {
        // One-step.
        let mut c = sb.starttls().await;
        let ir = encode(USER, &sb.token());
        assert_eq!(
            c.cmd(&format!("AUTH {mech} {ir}")).await,
            "235 2.7.0 Accepted"
        );
        assert_eq!(
            c.cmd(&format!("AUTH {mech} {ir}")).await,
            "503 5.5.1 Already authenticated"
        );
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
        assert!(c.closed().await);
        // Two-step.
        let mut c = sb.starttls().await;
        assert_eq!(c.cmd(&format!("AUTH {mech}")).await, "334 ");
        assert_eq!(
            c.cmd(&encode(USER, &sb.token())).await,
            "235 2.7.0 Accepted"
        );
    }
    assert_eq!(sb.server.logins(), 4);
    assert_eq!(sb.server.auth_failures(), 0);
    assert_eq!(sb.server.last_ehlo().as_deref(), Some("client.example"));
}

#[tokio::test]
async fn auth_refused_before_starttls_and_plaintext_discarded() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    let mut c = sb.plain().await;
    c.line().await;
    let ir = xoauth2(USER, &sb.token());
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {ir}")).await,
        "503 5.5.1 EHLO first"
    );
    c.cmd_all("EHLO x").await;
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {ir}")).await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.com>").await,
        "530 5.7.0 Authentication Required"
    );
    // Plaintext pipelined after STARTTLS must not count inside TLS.
    c.send_raw(format!("STARTTLS\r\nEHLO evil\r\nAUTH XOAUTH2 {ir}\r\n").as_bytes())
        .await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS");
    let mut c = Client::new(tls_connect(&sb.pki, c.into_inner()).await);
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {ir}")).await,
        "503 5.5.1 EHLO first"
    );
    assert_eq!(c.cmd("STARTTLS").await, "503 5.5.1 TLS already active");
    assert_eq!(sb.server.logins(), 0);
}

#[tokio::test]
async fn bad_token_challenge_dance() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    let mut c = sb.starttls().await;
    // XOAUTH2: the answer must be an empty line.
    c.send(&format!(
        "AUTH XOAUTH2 {}",
        xoauth2(USER, "not-a-live-token")
    ))
    .await;
    let challenge = decode_challenge(&c.line().await);
    assert_eq!(challenge["status"], "401");
    assert_eq!(challenge["schemes"], "bearer");
    assert!(challenge["scope"].is_string());
    assert_eq!(
        c.cmd("").await,
        "535 5.7.8 Username and Password not accepted"
    );
    // A wrong answer to the challenge.
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "nope")))
        .await;
    c.line().await;
    assert_eq!(
        c.cmd("AQ==").await,
        "501 5.5.2 Unexpected answer to the failure challenge"
    );
    // OAUTHBEARER, two-step: the answer must be AQ==.
    assert_eq!(c.cmd("AUTH OAUTHBEARER").await, "334 ");
    c.send(&oauthbearer(USER, "nope")).await;
    assert_eq!(decode_challenge(&c.line().await)["status"], "invalid_token");
    assert_eq!(
        c.cmd("AQ==").await,
        "535 5.7.8 Username and Password not accepted"
    );
    // A token for another mailbox: 400.
    let other = sb
        .provider
        .issue_access_token("bob@example.com", "mail", Duration::from_secs(600));
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &other)))
        .await;
    assert_eq!(decode_challenge(&c.line().await)["status"], "400");
    c.cmd("").await;
    // Errors that are not token refusals.
    assert_eq!(
        c.cmd("AUTH XOAUTH2 !!").await,
        "501 5.5.2 Cannot decode response"
    );
    assert!(
        c.cmd(&format!("AUTH XOAUTH2 {}", STANDARD.encode("junk")))
            .await
            .starts_with("535 5.7.8 Malformed XOAUTH2")
    );
    assert_eq!(c.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(c.cmd("*").await, "501 5.0.0 Authentication cancelled");
    assert_eq!(
        c.cmd("AUTH PLAIN AGEAYg==").await,
        "504 5.5.4 Unrecognized authentication type"
    );
    assert_eq!(sb.server.auth_failures(), 5);
    // Still usable: a good token works.
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &sb.token())))
            .await,
        "235 2.7.0 Accepted"
    );
}

#[tokio::test]
async fn auth_failure_reply_and_two_step_only() {
    let reply = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.";
    let sb = sandbox(SmtpServerOptions {
        tls: SandboxTls::Plain,
        mechanisms: vec![Mechanism::Xoauth2],
        auth_failure_reply: Some(reply.to_owned()),
        ..SmtpServerOptions::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    let lines = c.cmd_all("EHLO x").await;
    assert_eq!(lines.last().map(String::as_str), Some("250 AUTH XOAUTH2"));
    let ir = xoauth2(USER, &sb.token());
    assert_eq!(c.cmd(&format!("AUTH XOAUTH2 {ir}")).await, reply);
    assert_eq!(c.cmd("AUTH XOAUTH2").await, reply);
    assert_eq!(
        c.cmd(&format!("AUTH OAUTHBEARER {ir}")).await,
        "504 5.5.4 Unrecognized authentication type"
    );
    assert_eq!(sb.server.auth_failures(), 2);
    assert_eq!(sb.server.logins(), 0);

    let sb = sandbox(SmtpServerOptions {
        tls: SandboxTls::Implicit,
        require_two_step: true,
        ..SmtpServerOptions::default()
    })
    .await;
    let tcp = TcpStream::connect(sb.server.addr()).await.unwrap();
    let mut c = Client::new(tls_connect(&sb.pki, tcp).await);
    c.line().await;
    let lines = c.cmd_all("HELO old").await;
    assert_eq!(lines, ["250 localhost"]);
    let token = sb.token();
    assert!(
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await
            .starts_with("501 ")
    );
    assert_eq!(c.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(c.cmd(&xoauth2(USER, &token)).await, "235 2.7.0 Accepted");
    assert_eq!(sb.server.last_ehlo().as_deref(), Some("old"));
}

async fn logged_in(sb: &Sandbox) -> Client<Tls> {
    let mut c = sb.starttls().await;
    let ir = xoauth2(USER, &sb.token());
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {ir}")).await,
        "235 2.7.0 Accepted"
    );
    c
}

#[tokio::test]
async fn pipelined_transaction_with_dot_unstuffing() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    let mut c = logged_in(&sb).await;
    assert_eq!(
        c.cmd("RCPT TO:<b@example.com>").await,
        "503 5.5.1 Need MAIL command"
    );
    assert_eq!(c.cmd("DATA").await, "503 5.5.1 Need MAIL command");
    c.send_raw(
        b"MAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=100\r\nRCPT TO:<b@example.com>\r\n\
          RCPT TO:<c@example.com>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(c.line().await, "250 2.1.0 OK");
    assert_eq!(c.line().await, "250 2.1.5 OK");
    assert_eq!(c.line().await, "250 2.1.5 OK");
    assert_eq!(c.line().await, "354 Go ahead");
    // The body, its end and the next commands in one write.
    c.send_raw(
        b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n. \r\nend\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(c.line().await, "250 2.0.0 OK queued");
    assert_eq!(c.line().await, "250 2.1.0 OK");
    assert_eq!(c.line().await, "250 2.1.5 OK");
    assert_eq!(c.line().await, "354 Go ahead");
    c.send_raw(b".\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 OK queued");
    assert_eq!(
        c.cmd("MAIL FROM:<x@example.com> SIZE=999999999999").await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 OK");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert!(c.closed().await);
    let messages = sb.server.messages();
    assert_eq!(
        messages,
        [
            ReceivedMessage {
                user: USER.to_owned(),
                from: "alice@example.com".to_owned(),
                to: vec!["b@example.com".to_owned(), "c@example.com".to_owned()],
                data: b"Subject: dots\r\n\r\n.leading dot\r\n..\r\n \r\nend\r\n".to_vec(),
            },
            ReceivedMessage {
                user: USER.to_owned(),
                from: String::new(),
                to: vec!["d@example.com".to_owned()],
                data: Vec::new(),
            }
        ]
    );
    assert_eq!(sb.server.message_count(), 2);
    sb.server.clear_messages();
    assert_eq!(sb.server.message_count(), 0);
    assert!(sb.server.messages().is_empty());
}

#[tokio::test]
async fn mail_before_auth_refused() {
    let sb = sandbox(SmtpServerOptions {
        tls: SandboxTls::Plain,
        ..SmtpServerOptions::default()
    })
    .await;
    let mut c = sb.plain().await;
    c.line().await;
    c.cmd_all("EHLO x").await;
    c.send_raw(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nFROB\r\nBDAT 1 LAST\r\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(c.line().await, "530 5.7.0 Authentication Required");
    }
    assert_eq!(c.line().await, "500 5.5.1 Unrecognized command");
    assert_eq!(c.line().await, "502 5.5.1 BDAT not implemented");
    assert!(sb.server.messages().is_empty());
    // An overlong line ends the session.
    c.send_raw(&vec![b'x'; 20_000]).await;
    assert_eq!(c.line().await, "500 5.5.2 Line too long");
    assert!(c.closed().await);
}

#[tokio::test]
async fn thirty_mib_message_byte_exact() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    let mut c = logged_in(&sb).await;
    // 30 MiB of lines, some starting with dots, with 8-bit bytes.
    let mut body = Vec::with_capacity(31 << 20);
    let mut i: u32 = 0;
    while body.len() < 30 << 20 {
        if i.is_multiple_of(7) {
            body.extend_from_slice(b".");
        }
        body.extend_from_slice(format!("line {i} \u{e9}\u{e8} ").as_bytes());
        body.extend(std::iter::repeat_n(
            b'a' + (i % 26) as u8,
            (i % 90) as usize,
        ));
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    let mut wire = Vec::with_capacity(body.len() + body.len() / 50);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    let started = Instant::now();
    c.send_raw(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    assert_eq!(c.line().await, "250 2.1.0 OK");
    assert_eq!(c.line().await, "250 2.1.5 OK");
    assert_eq!(c.line().await, "354 Go ahead");
    c.send_raw(&wire).await;
    let done = tokio::time::timeout(Duration::from_secs(60), c.line())
        .await
        .expect("30 MiB accepted in time");
    assert_eq!(done, "250 2.0.0 OK queued");
    let elapsed = started.elapsed();
    let messages = sb.server.messages();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].data == body, "30 MiB body differs");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}

#[tokio::test]
async fn too_big_message_is_refused_and_session_continues() {
    let sb = sandbox(SmtpServerOptions {
        max_size: 10,
        ..SmtpServerOptions::default()
    })
    .await;
    let mut c = logged_in(&sb).await;
    c.send_raw(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    c.reply().await;
    c.reply().await;
    assert_eq!(c.line().await, "354 Go ahead");
    c.send_raw(b"0123456789abcdef\r\n.\r\nNOOP\r\n").await;
    assert_eq!(
        c.line().await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert_eq!(c.line().await, "250 2.0.0 OK");
    assert!(sb.server.messages().is_empty());
}

#[tokio::test]
async fn shutdown_closes_sessions() {
    let sb = sandbox(SmtpServerOptions::default()).await;
    let mut c = sb.plain().await;
    c.line().await;
    sb.server.shutdown();
    assert!(c.closed().await);
}

// ---------------------------------------------------------------------------
// mailbridge's upstream login dialogue against this server.

mod upstream {
    use secrecy::SecretString;
    use tokio::io::AsyncReadExt;

    use super::*;
    use mailbridge_proto::Refusal;
    use mailbridge_proto::refusal::{EnhancedCode, RefusalCode};
    use mailbridge_proto::sasl::BearerToken;
    use mailbridge_proto::smtp::{SmtpUpstreamLogin, UpstreamOptions};
    use mailbridge_proto::{UpstreamLogin, UpstreamStep};

    #[derive(Debug)]
    enum End {
        StartTls,
        Authenticated(Vec<String>),
        Rejected(Refusal, bool),
        Error(String),
    }

    /// Runs the dialogue over one stream until it needs TLS or ends; a
    /// rejection that suggests a retry is retried while tokens remain.
    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        u: &mut SmtpUpstreamLogin,
        io: &mut S,
        tokens: &mut Vec<String>,
    ) -> End {
        let mut buf = vec![0; 4096];
        loop {
            match u.next_step() {
                Ok(UpstreamStep::NeedInput) => {
                    let n = tokio::time::timeout(STEP, io.read(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(n > 0, "server closed");
                    u.feed(&buf[..n]);
                }
                Ok(UpstreamStep::Send(bytes)) => {
                    io.write_all(&bytes).await.unwrap();
                    io.flush().await.unwrap();
                }
                Ok(UpstreamStep::StartTls) => return End::StartTls,
                Ok(UpstreamStep::NeedToken) => {
                    let token = tokens.remove(0);
                    u.provide_token(&BearerToken {
                        user: USER.to_owned(),
                        token: SecretString::from(token),
                        host: "localhost".to_owned(),
                        port: 587,
                    });
                }
                Ok(UpstreamStep::Authenticated(ok)) => return End::Authenticated(ok.capabilities),
                Ok(UpstreamStep::Rejected(r)) => {
                    if r.retry_suggested && !tokens.is_empty() {
                        u.retry();
                        continue;
                    }
                    return End::Rejected(r.refusal, r.retry_suggested);
                }
                Err(e) => return End::Error(e.to_string()),
            }
        }
    }

    async fn login(sb: &Sandbox, opts: UpstreamOptions, mut tokens: Vec<String>) -> End {
        let mut tcp = TcpStream::connect(sb.server.addr()).await.unwrap();
        let mut u = SmtpUpstreamLogin::new(opts);
        match drive(&mut u, &mut tcp, &mut tokens).await {
            End::StartTls => {}
            end => return end,
        }
        u.tls_started();
        let mut tls = tls_connect(&sb.pki, tcp).await;
        drive(&mut u, &mut tls, &mut tokens).await
    }

    fn starttls(name: &str) -> UpstreamOptions {
        UpstreamOptions {
            starttls: true,
            ehlo_name: Some(name.to_owned()),
            ..UpstreamOptions::default()
        }
    }

    #[tokio::test]
    async fn starttls_login_with_stale_then_fresh_token() {
        let sb = sandbox(SmtpServerOptions::default()).await;
        let end = login(
            &sb,
            starttls("scanner.lan"),
            vec!["stale".into(), sb.token()],
        )
        .await;
        match end {
            End::Authenticated(caps) => {
                assert!(
                    caps.contains(&"AUTH XOAUTH2 OAUTHBEARER".to_owned()),
                    "{caps:?}"
                );
                assert!(!caps.contains(&"STARTTLS".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sb.server.logins(), 1);
        assert_eq!(sb.server.auth_failures(), 1);
        assert_eq!(sb.server.last_ehlo().as_deref(), Some("scanner.lan"));
    }

    #[tokio::test]
    async fn oauthbearer_two_step_fallback_and_refusal() {
        let sb = sandbox(SmtpServerOptions {
            tls: SandboxTls::Implicit,
            require_two_step: true,
            mechanisms: vec![Mechanism::Oauthbearer],
            ..SmtpServerOptions::default()
        })
        .await;
        let tcp = TcpStream::connect(sb.server.addr()).await.unwrap();
        let mut tls = tls_connect(&sb.pki, tcp).await;
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        let end = drive(&mut u, &mut tls, &mut vec![sb.token()]).await;
        assert!(matches!(end, End::Authenticated(_)), "{end:?}");
        // A bad token with no second chance: the challenge is answered and
        // the final refusal reported.
        let tcp = TcpStream::connect(sb.server.addr()).await.unwrap();
        let mut tls = tls_connect(&sb.pki, tcp).await;
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        match drive(&mut u, &mut tls, &mut vec!["bad".into()]).await {
            End::Rejected(refusal, retry) => {
                assert_eq!(
                    refusal.to_string(),
                    "535 5.7.8 Username and Password not accepted"
                );
                assert!(retry);
                // Read as Google's refusal; mailbridge's diagnose table
                // explains this very line (its smtp_explanations test).
                assert_eq!(
                    refusal.code,
                    RefusalCode::Smtp {
                        code: 535,
                        enhanced: Some(EnhancedCode::new(5, 7, 8))
                    }
                );
                assert_eq!(refusal.text, "Username and Password not accepted");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn microsoft_smtp_auth_disabled() {
        let reply = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.";
        let sb = sandbox(SmtpServerOptions {
            mechanisms: vec![Mechanism::Xoauth2],
            auth_failure_reply: Some(reply.to_owned()),
            ..SmtpServerOptions::default()
        })
        .await;
        match login(&sb, starttls("c"), vec![sb.token(), sb.token()]).await {
            End::Rejected(refusal, retry) => {
                assert_eq!(refusal.to_string(), reply);
                assert!(!retry);
                // Read as Microsoft's policy refusal; mailbridge's diagnose
                // table explains this very line with Set-CASMailbox (its
                // known_refusals_are_explained test).
                assert_eq!(refusal.enhanced(), Some(EnhancedCode::new(5, 7, 139)));
                assert!(!refusal.is_temporary());
                assert!(
                    refusal
                        .text
                        .contains("SmtpClientAuthentication is disabled for the Tenant")
                );
            }
            other => panic!("{other:?}"),
        }
        // No STARTTLS offered when the dialogue requires it.
        let sb = sandbox(SmtpServerOptions {
            tls: SandboxTls::Plain,
            ..SmtpServerOptions::default()
        })
        .await;
        let end = login(&sb, starttls("c"), vec![sb.token()]).await;
        assert!(
            matches!(&end, End::Error(e) if e.contains("STARTTLS")),
            "{end:?}"
        );
    }
}

/// Postfix's line limit, found by the interop suite: an AUTH line over 2048
/// octets is cut and its initial response refused; the same response after
/// a `334` is fine.
#[tokio::test]
async fn long_initial_response_is_cut_like_postfix() {
    let sb = sandbox(SmtpServerOptions {
        tls: SandboxTls::Plain,
        ..SmtpServerOptions::default()
    })
    .await;
    sb.provider.set_access_token_min_len(2000);
    let token = sb.token();
    assert!(token.len() >= 2000);
    let mut c = sb.plain().await;
    c.line().await;
    c.cmd_all("EHLO x").await;
    let ir = xoauth2(USER, &token);
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {ir}")).await,
        "535 5.7.8 Error: authentication failed: Invalid base64 data in initial response"
    );
    assert_eq!(c.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(c.cmd(&ir).await, "235 2.7.0 Accepted");
    assert_eq!(sb.server.auth_failures(), 1);
    assert_eq!(sb.server.logins(), 1);
}
