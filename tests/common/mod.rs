//! Shared end-to-end harness: the sandbox provider and IMAP, POP3 and SMTP
//! servers, mailbridge in front of them on loopback, and a raw line-level
//! client with helpers for each protocol.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mailbridge::config::Settings;
use mailbridge::server::Server;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SledStore, TokenStore};
use mailbridge_sandbox::{
    ImapServer, ImapServerOptions, Pop3Server, Pop3ServerOptions, Provider, ProviderOptions,
    SandboxTls, SmtpServer, SmtpServerOptions, TestPki,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const USER: &str = "alice@example.com";
pub const PASSWORD: &str = "correct horse \"battery\" \\staple";
/// Bound on every network wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Options {
    pub listener_tls: &'static str,
    pub upstream: ImapServerOptions,
    pub smtp: SmtpServerOptions,
    pub pop3: Pop3ServerOptions,
    pub provider: ProviderOptions,
    pub server_extra: String,
    /// Lines added to each `[[listener]]` table (`proxy_protocol = true`).
    pub listener_extra: String,
    pub mechanisms: Option<&'static str>,
    /// Log in to IMAP at this port on localhost instead of the sandbox
    /// server's (a test's own scripted server).
    pub imap_port: Option<u16>,
    /// The same for POP3 and SMTP.
    pub pop3_port: Option<u16>,
    pub smtp_port: Option<u16>,
    /// More accounts beside USER: (user, local password), each with a
    /// grant; a password of "" configures the account without a grant.
    pub extra_accounts: Vec<(&'static str, &'static str)>,
    /// Extra accounts without a grant have `authorize_on_login = true`.
    pub authorize_on_login: bool,
    /// `backoff_base_ms`, `backoff_max_secs` (default 300 ms, 2 s).
    pub backoff: (u64, u64),
    /// `kdf_memory_kib` (default 256: fast; 19456 is the real default).
    pub kdf_memory_kib: u32,
    /// More lines for the SMTP `[[listener]]` (e.g. `spool = true`).
    pub smtp_listener_extra: &'static str,
    /// Serve the control socket in `<dir>/state` (as `mailbridge run`
    /// does), so commands such as `mailbridge trace` reach this server.
    pub control_socket: bool,
    /// How often the server writes account metadata to the store
    /// (default: the server's own).
    pub meta_flush_every: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listener_tls: "none",
            upstream: ImapServerOptions::default(),
            smtp: SmtpServerOptions::default(),
            pop3: Pop3ServerOptions::default(),
            provider: ProviderOptions::default(),
            server_extra: String::new(),
            listener_extra: String::new(),
            mechanisms: None,
            imap_port: None,
            pop3_port: None,
            smtp_port: None,
            extra_accounts: Vec::new(),
            authorize_on_login: false,
            backoff: (300, 2),
            kdf_memory_kib: 256,
            smtp_listener_extra: "",
            control_socket: false,
            meta_flush_every: None,
        }
    }
}

pub struct Harness {
    pub provider: Provider,
    pub imap: ImapServer,
    pub smtp: SmtpServer,
    pub pop3: Pop3Server,
    pub pki: TestPki,
    /// mailbridge's IMAP listener.
    pub addr: SocketAddr,
    /// mailbridge's POP3 listener.
    pub pop3_addr: SocketAddr,
    /// mailbridge's SMTP listener.
    pub smtp_addr: SocketAddr,
    pub store: Arc<dyn TokenStore>,
    pub dir: PathBuf,
    /// The status listener, when the config has `[status]`.
    pub status_addr: Option<SocketAddr>,
    pub refresh_token: String,
    /// The configuration, written to a file (for the binary's commands,
    /// with `--state-dir <dir>/state`).
    pub config_path: PathBuf,
    /// The control socket, when `Options::control_socket`.
    control: Option<mailbridge::net::control::ControlSocket>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("mailbridge-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Harness {
    pub async fn start(opts: Options) -> Harness {
        let pki = TestPki::generate();
        let provider = Provider::start(opts.provider).await.unwrap();
        let imap = ImapServer::start(opts.upstream.clone(), provider.validator(), &pki)
            .await
            .unwrap();
        let smtp = SmtpServer::start(opts.smtp.clone(), provider.validator(), &pki)
            .await
            .unwrap();
        let pop3 = Pop3Server::start(opts.pop3.clone(), provider.validator(), &pki)
            .await
            .unwrap();
        let dir = temp_dir("e2e");
        let ca = dir.join("ca.pem");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        let tls_name = |t: SandboxTls| match t {
            SandboxTls::StartTls => "starttls",
            _ => "implicit",
        };
        // "implicit-selfsigned": TLS with the certificate mailbridge
        // generates when none is configured.
        let (ltls, generated) = match opts.listener_tls.strip_suffix("-selfsigned") {
            Some(mode) => (mode, true),
            None => (opts.listener_tls, false),
        };
        let listener_cert = if ltls == "none" || generated {
            String::new()
        } else {
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            )
        };
        let mechanisms = opts
            .mechanisms
            .map(|m| format!(", mechanisms = {m}"))
            .unwrap_or_default();
        let config = format!(
            r#"
[server]
kdf_memory_kib = {kdf_memory_kib}
kdf_iterations = 1
backoff_base_ms = {backoff_base_ms}
backoff_max_secs = {backoff_max_secs}
{extra}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:0"
tls = "{ltls}"
{listener_cert}
{listener_extra}

[[listener]]
protocol = "pop3"
bind = "127.0.0.1:0"
tls = "{ltls}"
{listener_cert}
{listener_extra}

[[listener]]
protocol = "smtp"
bind = "127.0.0.1:0"
tls = "{ltls}"
{listener_cert}
{smtp_listener_extra}
{listener_extra}

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "localhost", port = {port}, tls = "{imap_tls}"{mechanisms} }}
pop3 = {{ host = "localhost", port = {pop3_port}, tls = "{pop3_tls}"{mechanisms} }}
smtp = {{ host = "localhost", port = {smtp_port}, tls = "{smtp_tls}"{mechanisms} }}

[[account]]
user = "{USER}"
provider = "sandbox"
{extra_accounts}
"#,
            kdf_memory_kib = opts.kdf_memory_kib,
            smtp_listener_extra = opts.smtp_listener_extra,
            backoff_base_ms = opts.backoff.0,
            backoff_max_secs = opts.backoff.1,
            extra_accounts = opts
                .extra_accounts
                .iter()
                .map(|(user, password)| {
                    format!(
                        "[[account]]\nuser = \"{user}\"\nprovider = \"sandbox\"\nauthorize_on_login = {}\n",
                        opts.authorize_on_login && password.is_empty()
                    )
                })
                .collect::<String>(),
            extra = opts.server_extra,
            listener_extra = opts.listener_extra,
            ltls = ltls,
            token_url = provider.token_url(),
            ca = ca.display(),
            port = opts.imap_port.unwrap_or(imap.addr().port()),
            pop3_port = opts.pop3_port.unwrap_or(pop3.addr().port()),
            smtp_port = opts.smtp_port.unwrap_or(smtp.addr().port()),
            imap_tls = tls_name(opts.upstream.tls),
            pop3_tls = tls_name(opts.pop3.tls),
            smtp_tls = tls_name(opts.smtp.tls),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, &config).unwrap();
        let settings = Settings::parse(&config, "test config").unwrap();
        let store: Arc<dyn TokenStore> = Arc::new(SledStore::open(&dir.join("state")).unwrap());
        let refresh_token = provider.issue_refresh_token(USER, "mail");
        let vault = mailbridge::server::vault_for(&settings, store.clone()).unwrap();
        vault
            .create(
                USER,
                &SecretString::from(PASSWORD.to_string()),
                GrantData {
                    refresh_token: Some(SecretString::from(refresh_token.clone())),
                    obtained_at: 0,
                    client_id: None,
                    shared_access: None,
                },
                AccountMeta {
                    provider: "sandbox".into(),
                    upstream_user: USER.into(),
                    ..AccountMeta::default()
                },
                false,
            )
            .await
            .unwrap();
        for (user, password) in opts.extra_accounts.iter().filter(|(_, p)| !p.is_empty()) {
            vault
                .create(
                    user,
                    &SecretString::from(password.to_string()),
                    GrantData {
                        refresh_token: Some(SecretString::from(
                            provider.issue_refresh_token(user, "mail"),
                        )),
                        obtained_at: 0,
                        client_id: None,
                        shared_access: None,
                    },
                    AccountMeta {
                        provider: "sandbox".into(),
                        upstream_user: user.to_string(),
                        ..AccountMeta::default()
                    },
                    false,
                )
                .await
                .unwrap();
        }
        drop(vault);
        let mut server = Server::bind(settings, store.clone()).await.unwrap();
        if let Some(every) = opts.meta_flush_every {
            server = server.with_meta_flush_every(every);
        }
        let control = opts.control_socket.then(|| {
            mailbridge::net::control::ControlSocket::bind(
                &dir.join("state"),
                server.store(),
                Some(server.trace_desk()),
                None,
            )
            .unwrap()
        });
        let addrs = server.local_addrs();
        let status_addr = server.status_addr();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Harness {
            provider,
            imap,
            smtp,
            pop3,
            pki,
            addr: addrs[0],
            pop3_addr: addrs[1],
            smtp_addr: addrs[2],
            store,
            dir,
            status_addr,
            refresh_token,
            config_path,
            control,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A plain-text client of mailbridge, greeting already read.
    pub async fn client(&self) -> Client {
        let mut c = Client::plain(self.addr).await;
        let g = c.line().await;
        assert!(g.starts_with("* OK"), "greeting: {g}");
        c
    }

    pub fn client_tls_config(&self) -> Arc<rustls::ClientConfig> {
        client_tls(&self.pki.ca_pem)
    }

    /// Logs in with LOGIN and returns the tagged reply.
    pub async fn login(&self, password: &str) -> (Client, String) {
        let mut c = self.client().await;
        let reply = c
            .cmd("a1", &format!("LOGIN {USER} {}", quote(password)))
            .await;
        (c, reply.last().cloned().unwrap_or_default())
    }

    pub fn sealed_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.store.load_grant(USER).unwrap().expect("grant present")).unwrap()
    }

    /// Restarts mailbridge as a service restart does: stops the server
    /// (drained, metadata flushed) and starts a new one, with a new
    /// process's memory, over the same configuration and store. The
    /// listeners' addresses change; a control socket is not bound again.
    pub async fn restart(&mut self) {
        drop(self.control.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("the server stops")
                .unwrap();
        }
        let config = std::fs::read_to_string(&self.config_path).unwrap();
        let settings = Settings::parse(&config, "test config").unwrap();
        let server = Server::bind(settings, self.store.clone()).await.unwrap();
        let addrs = server.local_addrs();
        (self.addr, self.pop3_addr, self.smtp_addr) = (addrs[0], addrs[1], addrs[2]);
        self.status_addr = server.status_addr();
        let (stop, rx) = oneshot::channel();
        self.task = Some(tokio::spawn(server.run(async {
            let _ = rx.await;
        })));
        self.stop = Some(stop);
    }

    /// Starts mailbridge's shutdown (as SIGTERM does) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Whether mailbridge's server has finished (drained and returned)
    /// within `limit`.
    pub async fn server_finished_within(&mut self, limit: Duration) -> bool {
        let Some(t) = self.task.as_mut() else {
            return true;
        };
        let done = tokio::time::timeout(limit, t).await.is_ok();
        if done {
            self.task = None;
        }
        done
    }

    pub async fn stop(mut self) {
        drop(self.control.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
        self.imap.shutdown();
        self.smtp.shutdown();
        self.pop3.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TCP connection to `addr` from the loopback address `from`.
pub async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .unwrap()
        .unwrap()
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw IMAP client: lines and literals, with bounded waits.
pub struct Client {
    io: BufReader<Box<dyn Io>>,
}

/// The first line of each message `smtp` received, without `Subject: `
/// (the tests' messages start with their subject).
pub fn subjects(smtp: &SmtpServer) -> Vec<String> {
    smtp.messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("Subject: ")
                .to_string()
        })
        .collect()
}

impl Client {
    pub async fn plain(addr: SocketAddr) -> Client {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Client {
            io: BufReader::new(Box::new(tcp)),
        }
    }

    /// A plain connection from the loopback address `from` (127.0.0.2
    /// and 127.0.0.3 stand in for other hosts on the LAN).
    pub async fn plain_from(from: &str, addr: SocketAddr) -> Client {
        Client {
            io: BufReader::new(Box::new(tcp_from(from, addr).await)),
        }
    }

    /// A device's message, sent without AUTH from `from` as `sender` to
    /// office@x.example with `subject`: the server's reply to its data
    /// (`250 2.0.0 OK: queued as ID`, or why not). HELO, MAIL, RCPT and
    /// DATA must be accepted.
    pub async fn device_message(
        from: &str,
        addr: SocketAddr,
        sender: &str,
        subject: &str,
    ) -> String {
        let mut c = Client::plain_from(from, addr).await;
        c.smtp_reply().await;
        c.smtp("HELO mfp").await;
        for (command, code) in [
            (format!("MAIL FROM:<{sender}>"), "250"),
            ("RCPT TO:<office@x.example>".to_owned(), "250"),
            ("DATA".to_owned(), "354"),
        ] {
            let r = c.smtp(&command).await;
            assert!(r.starts_with(code), "{command}: {r}");
        }
        c.send(format!("Subject: {subject}\r\n\r\nscan\r\n.\r\n").as_bytes())
            .await;
        c.smtp_reply().await.pop().unwrap_or_default()
    }

    /// A client over a connection already made (and written to: a PROXY
    /// protocol header, say).
    pub fn over(io: impl Io + 'static) -> Client {
        Client {
            io: BufReader::new(Box::new(io)),
        }
    }

    /// Reads one line, or "" when none comes within `limit` (or EOF).
    pub async fn line_within(&mut self, limit: Duration) -> String {
        let mut buf = Vec::new();
        match tokio::time::timeout(limit, self.io.read_until(b'\n', &mut buf)).await {
            Ok(Ok(_)) => String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            _ => String::new(),
        }
    }

    pub async fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Client {
            io: BufReader::new(Box::new(tls)),
        }
    }

    /// Connects, reads the greeting, runs IMAP STARTTLS, and continues in TLS.
    pub async fn starttls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Client {
        Client::upgrade(addr, config, &[], b"s1 STARTTLS\r\n", "s1 OK").await
    }

    /// Connects and reads the greeting; for each `(command, last)` in
    /// `before` (e.g. an SMTP EHLO) sends it and reads lines up to one that
    /// starts with `last`; then sends `command`, expects a reply starting
    /// with `ok`, and continues in TLS.
    pub async fn upgrade(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        before: &[(&[u8], &str)],
        command: &[u8],
        ok: &str,
    ) -> Client {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let greeting = read_line_unbuffered(&mut tcp).await;
        assert!(!greeting.is_empty(), "no greeting");
        for (cmd, last) in before {
            tcp.write_all(cmd).await.unwrap();
            for _ in 0..100 {
                let l = read_line_unbuffered(&mut tcp).await;
                if l.starts_with(last) || l.is_empty() {
                    break;
                }
            }
        }
        tcp.write_all(command).await.unwrap();
        let reply = read_line_unbuffered(&mut tcp).await;
        assert!(reply.starts_with(ok), "{reply}");
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Client {
            io: BufReader::new(Box::new(tls)),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let w = self.io.get_mut();
        w.write_all(bytes).await.unwrap();
        w.flush().await.unwrap();
    }

    /// An SMTP reply: lines up to the one with a space after the code.
    pub async fn smtp_reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..1000 {
            let l = self.line().await;
            let done = l.len() < 4 || l.as_bytes()[3] == b' ';
            lines.push(l);
            if done {
                break;
            }
        }
        lines
    }

    /// Sends an SMTP command line and returns the last reply line.
    pub async fn smtp(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes()).await;
        self.smtp_reply().await.pop().unwrap_or_default()
    }

    /// A POP3 multi-line body up to the lone dot, dot-unstuffed, CRLF kept.
    pub async fn pop3_multiline(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            tokio::time::timeout(WAIT, self.io.read_until(b'\n', &mut buf))
                .await
                .expect("timed out reading a POP3 body")
                .unwrap();
            assert!(!buf.is_empty(), "EOF inside a POP3 body");
            if buf == b".\r\n" {
                return out;
            }
            let line = if buf.starts_with(b"..") {
                &buf[1..]
            } else {
                &buf[..]
            };
            out.extend_from_slice(line);
        }
    }

    /// One line without CRLF; "" on EOF.
    pub async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, self.io.read_until(b'\n', &mut buf))
            .await
            .expect("timed out waiting for a line")
            .unwrap();
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string()
    }

    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(WAIT, self.io.read_exact(&mut buf))
            .await
            .expect("timed out reading bytes")
            .unwrap();
        buf
    }

    /// Sends `tag command` and collects lines up to the tagged reply.
    pub async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await;
        self.until_tagged(tag).await
    }

    pub async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..10_000 {
            let l = self.line().await;
            if l.is_empty() {
                lines.push("<EOF>".into());
                return lines;
            }
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
        panic!("no tagged reply for {tag}");
    }

    /// `FETCH n BODY[]` after SELECT: returns the literal's bytes.
    pub async fn fetch_body(&mut self, tag: &str, n: u32) -> Vec<u8> {
        self.send(format!("{tag} FETCH {n} BODY[]\r\n").as_bytes())
            .await;
        let head = self.line().await;
        let open = head
            .rfind('{')
            .unwrap_or_else(|| panic!("no literal in {head}"));
        let len: usize = head[open + 1..head.len() - 1].parse().unwrap();
        let body = self.exact(len).await;
        let rest = self.until_tagged(tag).await;
        assert!(
            rest.last().unwrap().starts_with(&format!("{tag} OK")),
            "{rest:?}"
        );
        body
    }
}

async fn read_line_unbuffered(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8_lossy(&out).trim_end().to_string()
}

pub const MESSAGE: &[u8] = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n";

/// A child process that is killed and reaped when dropped, so a failing
/// test never leaves a server running. Derefs to the `Child`.
pub struct Reaper(pub std::process::Child);

impl std::ops::Deref for Reaper {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaper {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
