//! `[alerts]` end to end: mailbridge in front of the sandbox provider and
//! IMAP server, its alert command a shell that appends its environment to
//! a file the test reads, its webhook a loopback HTTP(S) receiver in the
//! test. Also the token endpoint's refusals as a client and an alert see
//! them (a Microsoft AADSTS700082 body from a fake token endpoint), and the
//! refresh-time audience check through a login.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Client, PASSWORD, USER, WAIT, quote, temp_dir};
use mailbridge::clock::unix_now;
use mailbridge::config::Settings;
use mailbridge::server::Server;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SealedGrant, SledStore, StoreError, TokenStore};
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const BOB: &str = "bob@example.com";
const GRAPH: &str = "00000003-0000-0000-c000-000000000000";
const MS_SCOPES: &str = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";
const DAY: u64 = 86_400;

// ---- log capture (one subscriber for the whole test binary) ----

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

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        capture
    })
}

fn logs() -> String {
    String::from_utf8_lossy(&capture().0.lock().unwrap()).to_string()
}

/// Polls `done` every 50 ms, for at most WAIT.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- a loopback HTTP(S) receiver: the webhook, or a fake token endpoint ----

#[derive(Clone, Debug)]
struct Request {
    head: String,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Answers every request with `status` and `body` after `delay`.
    async fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        status: u16,
        body: &str,
        delay: Duration,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let body = body.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let body = body.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(s) = acceptor.accept(tcp).await {
                                answer(s, &seen, status, &body, delay).await;
                            }
                        }
                        None => answer(tcp, &seen, status, &body, delay).await,
                    }
                });
            }
        });
        Receiver {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body, bounded) and
/// answers it.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    seen: &Mutex<Vec<Request>>,
    status: u16,
    body: &str,
    delay: Duration,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let request = Request {
        head: head.clone(),
        body: String::new(),
    };
    let len: usize = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(1 << 20);
    while buf.len() < head_end + len {
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let body_in = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    seen.lock().unwrap().push(Request {
        head,
        body: body_in,
    });
    tokio::time::sleep(delay).await;
    let reply = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

// ---- a store whose grant writes fail on demand (a full disk) ----

struct FailingStore {
    inner: SledStore,
    fail_grant_writes: Arc<AtomicBool>,
}

impl TokenStore for FailingStore {
    fn load_grant(&self, account: &str) -> Result<Option<SealedGrant>, StoreError> {
        self.inner.load_grant(account)
    }
    fn swap_grant(
        &self,
        account: &str,
        expected: Option<&SealedGrant>,
        new: &SealedGrant,
    ) -> Result<bool, StoreError> {
        if self.fail_grant_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Backend {
                path: "/var/lib/mailbridge".into(),
                reason: "io error: No space left on device (os error 28)".into(),
            });
        }
        self.inner.swap_grant(account, expected, new)
    }
    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.inner.load_meta(account)
    }
    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.inner.save_meta(account, meta)
    }
    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        self.inner.remove(account)
    }
    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        self.inner.accounts()
    }
}

// ---- mailbridge in front of the sandbox ----

#[derive(Default)]
struct Spec {
    /// `preset = "microsoft"` (else `custom`).
    microsoft: bool,
    /// The token endpoint, if not the sandbox's.
    token_url: Option<String>,
    /// Lines of `[alerts]` besides the command writing the env file.
    alerts: String,
    /// Omit the env-writing command (the test sets its own, or none).
    no_command: bool,
    provider: ProviderOptions,
    /// Alice's grant was created this long ago (metadata).
    alice_age: u64,
    /// Bob's grant was created this long ago.
    bob_age: u64,
    /// `key_mode = "service"` with a key file (background refresh).
    service: bool,
    /// More `[server]` lines.
    server_extra: String,
}

struct World {
    provider: Provider,
    imap: ImapServer,
    addr: SocketAddr,
    dir: PathBuf,
    env_file: PathBuf,
    refresh_tokens: Vec<String>,
    /// While true, the store fails every grant write.
    fail_grant_writes: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl World {
    async fn start(spec: Spec) -> World {
        capture();
        let pki = TestPki::generate();
        World::start_with(spec, pki).await
    }

    async fn start_with(spec: Spec, pki: TestPki) -> World {
        let provider = Provider::start(spec.provider).await.unwrap();
        let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let dir = temp_dir("alerts");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let env_file = dir.join("alerts.env");
        let command = if spec.no_command {
            String::new()
        } else {
            // Each alert's record is written whole and appended with one
            // write, so alerts delivered at the same time do not mix.
            format!(
                "command = [\"/bin/sh\", \"-c\", '(env; echo ---) > \"$1.$$\" && cat \"$1.$$\" >> \"$1\"; rm -f \"$1.$$\"', \"alert\", {}]\n",
                quote(&env_file.display().to_string())
            )
        };
        let preset = if spec.microsoft {
            "microsoft"
        } else {
            "custom"
        };
        let mut server_extra = spec.server_extra.clone();
        if spec.service {
            let key = dir.join("service.key");
            std::fs::write(&key, [7u8; 32]).unwrap();
            // A key other users can read is refused.
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            server_extra.push_str(&format!(
                "\nkey_mode = \"service\"\nkey_file = {}\n",
                quote(&key.display().to_string())
            ));
        }
        let token_url = spec.token_url.unwrap_or_else(|| provider.token_url());
        let config = format!(
            r#"
[server]
kdf_memory_kib = 256
kdf_iterations = 1
backoff_base_ms = 20
backoff_max_secs = 1
{server_extra}

[alerts]
{command}{alerts}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:0"

[providers.p]
preset = "{preset}"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "localhost", port = {port}, tls = "implicit" }}

[[account]]
user = "{USER}"
provider = "p"

[[account]]
user = "{BOB}"
provider = "p"
"#,
            alerts = spec.alerts,
            ca = ca.display(),
            port = imap.addr().port(),
        );
        let settings = Settings::parse(&config, "alerts test config").unwrap();
        let fail_grant_writes = Arc::new(AtomicBool::new(false));
        let store: Arc<dyn TokenStore> = Arc::new(FailingStore {
            inner: SledStore::open(&dir.join("state")).unwrap(),
            fail_grant_writes: fail_grant_writes.clone(),
        });
        let scope = if spec.microsoft { MS_SCOPES } else { "mail" };
        let vault = mailbridge::server::vault_for(&settings, store.clone()).unwrap();
        let mut refresh_tokens = Vec::new();
        for (user, age) in [(USER, spec.alice_age), (BOB, spec.bob_age)] {
            let rt = provider.issue_refresh_token(user, scope);
            vault
                .create(
                    user,
                    &SecretString::from(PASSWORD.to_string()),
                    GrantData {
                        refresh_token: Some(SecretString::from(rt.clone())),
                        obtained_at: unix_now() - age,
                        client_id: None,
                        shared_access: None,
                    },
                    AccountMeta {
                        provider: "p".into(),
                        upstream_user: user.into(),
                        created_at: unix_now() - age,
                        ..AccountMeta::default()
                    },
                    false,
                )
                .await
                .unwrap();
            refresh_tokens.push(rt);
        }
        drop(vault);
        let server = Server::bind(settings, store).await.unwrap();
        let addr = server.local_addrs()[0];
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        World {
            provider,
            imap,
            addr,
            dir,
            env_file,
            refresh_tokens,
            fail_grant_writes,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `LOGIN user password`: the tagged reply.
    async fn login(&self, user: &str, password: &str) -> String {
        let mut c = Client::plain(self.addr).await;
        let greeting = c.line().await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        let reply = c
            .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
            .await;
        reply.last().cloned().unwrap_or_default()
    }

    /// The alerts the command has written so far: each its MAILBRIDGE_*
    /// variables.
    fn alerts(&self) -> Vec<HashMap<String, String>> {
        env_records(&self.env_file)
    }

    /// The env file as written (every variable the command saw).
    fn env_text(&self) -> String {
        std::fs::read_to_string(&self.env_file).unwrap_or_default()
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
        self.imap.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env_records(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete records (the command writes the separator last).
    let mut records = Vec::new();
    let mut current = HashMap::new();
    for line in text.lines() {
        if line == "---" {
            records.push(std::mem::take(&mut current));
        } else if let Some((k, v)) = line.split_once('=')
            && k.starts_with("MAILBRIDGE_")
        {
            current.insert(k.to_string(), v.to_string());
        }
    }
    records
}

/// Every secret a test used: the local password, the seeded refresh
/// tokens, and every token the provider issued.
fn secrets(w: &World) -> Vec<String> {
    let mut s = vec![PASSWORD.to_string()];
    s.extend(w.refresh_tokens.iter().cloned());
    s.extend(w.provider.issued_tokens());
    s
}

fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "a secret appeared in {what}");
    }
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_grant_runs_the_command_and_posts_the_webhook_once() {
    let hook = Receiver::start(None, 204, "", Duration::ZERO).await;
    let dir = temp_dir("alerts-secret");
    let secret_file = dir.join("hook-secret");
    std::fs::write(&secret_file, "hook-secret-7f3a\n").unwrap();
    let w = World::start(Spec {
        alerts: format!(
            "webhook_url = \"http://127.0.0.1:{}/hooks/mailbridge\"\nwebhook_secret_file = {}\n",
            hook.addr.port(),
            quote(&secret_file.display().to_string())
        ),
        ..Spec::default()
    })
    .await;
    // Working first: no alert.
    assert!(w.login(USER, PASSWORD).await.starts_with("a1 OK"));

    w.provider.revoke_user(USER);
    let no = w.login(USER, PASSWORD).await;
    let replied = Instant::now();
    assert!(
        no.starts_with("a1 NO [AUTHENTICATIONFAILED]") && no.contains("invalid_grant"),
        "{no}"
    );
    wait_until("the alert command", || w.alerts().len() == 1).await;
    wait_until("the webhook", || hook.requests().len() == 1).await;
    println!(
        "alert delivered to the command and the webhook within {} ms of the login's reply",
        replied.elapsed().as_millis()
    );

    let env = &w.alerts()[0];
    assert_eq!(env["MAILBRIDGE_EVENT"], "grant_refused");
    assert_eq!(env["MAILBRIDGE_ACCOUNT"], USER);
    assert!(
        env["MAILBRIDGE_REASON"].contains("invalid_grant"),
        "{env:?}"
    );
    assert!(
        env["MAILBRIDGE_ADVICE"].contains("mailbridge account reauthorize alice@example.com"),
        "{env:?}"
    );
    assert!(env["MAILBRIDGE_TIME"].parse::<u64>().unwrap() >= unix_now() - 60);

    let request = &hook.requests()[0];
    assert!(
        request.head.starts_with("POST /hooks/mailbridge HTTP/1.1"),
        "{}",
        request.head
    );
    assert_eq!(
        request.header("authorization").as_deref(),
        Some("Bearer hook-secret-7f3a")
    );
    assert!(
        request
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let json: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(json["event"], "grant_refused");
    assert_eq!(json["account"], USER);
    assert_eq!(json["reason"], env["MAILBRIDGE_REASON"].as_str());
    assert_eq!(json["advice"], env["MAILBRIDGE_ADVICE"].as_str());
    assert!(json["time"].as_u64().is_some());

    // Rate limited: the next refused login is logged, not sent again.
    let no = w.login(USER, PASSWORD).await;
    assert!(no.contains("invalid_grant"), "{no}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.alerts().len(), 1, "one alert per account and event");
    assert_eq!(
        hook.requests().len(),
        1,
        "one webhook per account and event"
    );
    // Another account has its own limit.
    w.provider.revoke_user(BOB);
    assert!(w.login(BOB, PASSWORD).await.contains("invalid_grant"));
    wait_until("bob's alert", || w.alerts().len() == 2).await;
    assert_eq!(w.alerts()[1]["MAILBRIDGE_ACCOUNT"], BOB);
    wait_until("bob's webhook", || hook.requests().len() == 2).await;

    // Logged too, one line each, and nothing sent or logged holds a
    // secret (the webhook's own secret only in its header).
    wait_until("the log lines", || {
        let l = logs();
        l.contains("alert command done") && l.contains("alert webhook done")
    })
    .await;
    let log = logs();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains(" alert ")
            && l.contains("grant_refused")
            && l.contains("advice=")),
        "no warn line for the alert"
    );
    assert!(
        log.contains("alert not sent again"),
        "the suppressed one is logged"
    );
    let secrets = secrets(&w);
    assert_no_secret("the command's environment", &w.env_text(), &secrets);
    for r in hook.requests() {
        assert_no_secret("the webhook body", &r.body, &secrets);
        assert!(!r.body.contains("hook-secret-7f3a"));
    }
    assert_no_secret("the log", &log, &secrets);
    assert!(
        !log.contains("hook-secret-7f3a"),
        "the webhook secret was logged"
    );
    assert!(
        !log.contains("/hooks/mailbridge"),
        "the webhook URL was logged"
    );
    w.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_command_and_a_slow_webhook_never_delay_a_login() {
    // The webhook answers after 20 s (mailbridge gives it 2), the command
    // sleeps 30 s (mailbridge gives it 1).
    let hook = Receiver::start(None, 204, "", Duration::from_secs(20)).await;
    let w = World::start(Spec {
        no_command: true,
        alerts: format!(
            "command = [\"/bin/sleep\", \"30\"]\ncommand_timeout_secs = 1\nwebhook_url = \"http://127.0.0.1:{}/slow\"\nwebhook_timeout_secs = 2\n",
            hook.addr.port()
        ),
        ..Spec::default()
    })
    .await;
    w.provider.revoke_user(USER);
    let started = Instant::now();
    let no = w.login(USER, PASSWORD).await;
    let took = started.elapsed();
    assert!(no.contains("invalid_grant"), "{no}");
    println!(
        "refused login with a stuck alert command and a 20 s webhook answered in {} ms",
        took.as_millis()
    );
    // A loose bound, far below either stall: the login did not wait.
    assert!(
        took < Duration::from_secs(5),
        "the login waited for the alert: {took:?}"
    );
    wait_until("the command's timeout and the webhook's failure", || {
        let l = logs();
        l.contains("alert command did not finish in time; killed")
            && l.contains("alert webhook failed")
    })
    .await;
    assert_eq!(hook.requests().len(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_verifies_tls_against_its_ca_file() {
    capture();
    let pki = TestPki::generate();
    let hook = Receiver::start(Some(pki.server_config()), 200, "{}", Duration::ZERO).await;
    let ca = temp_dir("alerts-ca").join("hook-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let storm = "password_storm_failures = 1\n";
    // Trusting the test CA: delivered over TLS.
    let w = World::start_with(
        Spec {
            no_command: true,
            alerts: format!(
                "{storm}webhook_url = \"https://localhost:{}/tls\"\nwebhook_ca_file = {}\n",
                hook.addr.port(),
                quote(&ca.display().to_string())
            ),
            ..Spec::default()
        },
        pki,
    )
    .await;
    let no = w.login(USER, "not the password").await;
    assert!(no.starts_with("a1 NO"), "{no}");
    wait_until("the TLS webhook", || hook.requests().len() == 1).await;
    let json: serde_json::Value = serde_json::from_str(&hook.requests()[0].body).unwrap();
    assert_eq!(json["event"], "password_storm");
    w.stop().await;

    // The system's CAs do not know the test CA: refused, nothing sent.
    let w = World::start(Spec {
        no_command: true,
        alerts: format!(
            "{storm}webhook_url = \"https://localhost:{}/untrusted\"\n",
            hook.addr.port()
        ),
        ..Spec::default()
    })
    .await;
    let no = w.login(BOB, "not the password either").await;
    assert!(no.starts_with("a1 NO"), "{no}");
    wait_until("the webhook failure in the log", || {
        logs()
            .lines()
            .any(|l| l.contains("alert webhook failed") && l.contains("localhost"))
    })
    .await;
    assert_eq!(
        hook.requests().len(),
        1,
        "no request past a failed handshake"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_storm_alerts_once() {
    let w = World::start(Spec {
        alerts: "password_storm_failures = 3\npassword_storm_window_secs = 600\n".into(),
        ..Spec::default()
    })
    .await;
    for i in 0..2 {
        let no = w.login(USER, &format!("guess {i}")).await;
        assert!(no.starts_with("a1 NO"), "{no}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.alerts().is_empty(), "two failures are no storm");
    for i in 2..6 {
        let no = w.login(USER, &format!("guess {i}")).await;
        assert!(no.starts_with("a1 NO"), "{no}");
    }
    wait_until("the storm alert", || !w.alerts().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts = w.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["MAILBRIDGE_EVENT"], "password_storm");
    assert_eq!(alerts[0]["MAILBRIDGE_ACCOUNT"], USER);
    assert!(
        alerts[0]["MAILBRIDGE_REASON"].contains("3 failed logins within 600 s")
            && alerts[0]["MAILBRIDGE_REASON"].contains("127.0.0.1"),
        "{alerts:?}"
    );
    let text = w.env_text();
    for i in 0..6 {
        assert!(!text.contains(&format!("guess {i}")), "a password was sent");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_failing_longer_than_the_threshold_alert() {
    // Fastmail's `invalid_grant` with `"temporary": true`: a temporary
    // failure, the grant kept; it alerts only once it has lasted.
    let w = World::start(Spec {
        alerts: "refresh_failing_secs = 1\n".into(),
        ..Spec::default()
    })
    .await;
    w.provider.set_user_locked(USER, true);
    let no = w.login(USER, PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        w.alerts().is_empty(),
        "a first temporary failure is no alert"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let no = w.login(USER, PASSWORD).await;
    assert!(no.starts_with("a1 NO [UNAVAILABLE]"), "{no}");
    wait_until("the refresh_failing alert", || !w.alerts().is_empty()).await;
    let a = &w.alerts()[0];
    assert_eq!(a["MAILBRIDGE_EVENT"], "refresh_failing");
    assert!(
        a["MAILBRIDGE_REASON"].contains("locked by an administrator"),
        "{a:?}"
    );
    assert!(
        a["MAILBRIDGE_ADVICE"].contains("the grant is kept"),
        "{a:?}"
    );
    // Working again: the next failure starts counting afresh.
    w.provider.set_user_locked(USER, false);
    assert!(w.login(USER, PASSWORD).await.starts_with("a1 OK"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microsoft_grant_unused_for_80_days_is_announced_at_start() {
    let w = World::start(Spec {
        microsoft: true,
        alice_age: 81 * DAY + 3600,
        bob_age: 10 * DAY,
        ..Spec::default()
    })
    .await;
    wait_until("the grant_expiring alert", || !w.alerts().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alerts = w.alerts();
    assert_eq!(
        alerts.len(),
        1,
        "bob's 10-day-old grant is fine: {alerts:?}"
    );
    let a = &alerts[0];
    assert_eq!(a["MAILBRIDGE_EVENT"], "grant_expiring");
    assert_eq!(a["MAILBRIDGE_ACCOUNT"], USER);
    assert!(
        a["MAILBRIDGE_REASON"].contains("last used 81 days ago")
            && a["MAILBRIDGE_REASON"].contains("in about 9 days"),
        "{a:?}"
    );
    assert!(
        a["MAILBRIDGE_ADVICE"].contains("log in with a mail client")
            && a["MAILBRIDGE_ADVICE"].contains("key_mode = \"service\""),
        "{a:?}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microsoft_refusal_is_explained_to_the_client_and_in_the_alert() {
    // Microsoft's answer to a refresh token unused for 90 days.
    let body = serde_json::json!({
        "error": "invalid_grant",
        "error_description": "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T08:00:00.0000000Z and was inactive for 90.00:00:00. Trace ID: 0b7c7d5e-1c2f-4a57-9f1e-5c4b0d1a2b00 Correlation ID: 7f0a3c1e-8d2b-4e6f-9a1b-2c3d4e5f6a7b Timestamp: 2026-11-27 10:11:12Z",
        "error_codes": [700082],
        "timestamp": "2026-11-27 10:11:12Z",
        "trace_id": "0b7c7d5e-1c2f-4a57-9f1e-5c4b0d1a2b00",
        "correlation_id": "7f0a3c1e-8d2b-4e6f-9a1b-2c3d4e5f6a7b",
        "error_uri": "https://login.microsoftonline.com/error?code=700082"
    })
    .to_string();
    let endpoint = Receiver::start(None, 400, &body, Duration::ZERO).await;
    let w = World::start(Spec {
        microsoft: true,
        token_url: Some(format!("http://127.0.0.1:{}/token", endpoint.addr.port())),
        ..Spec::default()
    })
    .await;
    let no = w.login(USER, PASSWORD).await;
    println!("client told: {no}");
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    assert!(
        no.contains("invalid_grant (AADSTS700082)")
            && no.contains("90 days without use")
            && no.contains("mailbridge account reauthorize alice@example.com"),
        "{no}"
    );
    assert!(
        !no.contains("Trace ID"),
        "the provider's trace ids are for the log: {no}"
    );
    let request = &endpoint.requests()[0];
    assert!(request.body.contains("grant_type=refresh_token"));
    wait_until("the alert", || !w.alerts().is_empty()).await;
    let a = &w.alerts()[0];
    assert_eq!(a["MAILBRIDGE_EVENT"], "grant_refused");
    assert!(
        a["MAILBRIDGE_ADVICE"].contains("90 days without use")
            && a["MAILBRIDGE_ADVICE"].contains("key_mode = \"service\""),
        "{a:?}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_token_at_refresh_fails_the_login_with_the_cause() {
    // Entra ID issuing a Graph token (a bare scope first): the refresh
    // succeeds, the token's `aud` is Graph, and IMAP would refuse it.
    let w = World::start(Spec {
        microsoft: true,
        provider: ProviderOptions {
            access_token_audience: Some(GRAPH.into()),
            ..ProviderOptions::default()
        },
        ..Spec::default()
    })
    .await;
    let no = w.login(USER, PASSWORD).await;
    println!("client told: {no}");
    assert!(no.starts_with("a1 NO"), "{no}");
    assert!(
        no.contains(GRAPH)
            && no.contains("not for Outlook/Exchange Online")
            && no.contains("IMAP.AccessAsUser.All first"),
        "{no}"
    );
    assert_eq!(w.provider.refresh_requests(), 1);
    wait_until("the alert", || !w.alerts().is_empty()).await;
    assert_eq!(w.alerts()[0]["MAILBRIDGE_EVENT"], "grant_refused");
    // An Outlook token goes through; the grant survived the refused token
    // (its rotated refresh token was kept).
    w.provider
        .set_access_token_audience(Some("https://outlook.office.com".into()));
    let ok = w.login(USER, PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert_eq!(w.provider.refresh_requests(), 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_that_cannot_be_saved_alerts() {
    // The sandbox rotates refresh tokens; the store's grant writes fail as
    // on a full disk.
    let w = World::start(Spec::default()).await;
    w.fail_grant_writes.store(true, Ordering::SeqCst);
    let reply = w.login(USER, PASSWORD).await;
    println!("client told: {reply}");
    wait_until("the token_not_saved alert", || !w.alerts().is_empty()).await;
    let a = &w.alerts()[0];
    assert_eq!(a["MAILBRIDGE_EVENT"], "token_not_saved");
    assert_eq!(a["MAILBRIDGE_ACCOUNT"], USER);
    assert!(
        a["MAILBRIDGE_REASON"].contains("cannot save the rotated refresh token"),
        "{a:?}"
    );
    assert!(a["MAILBRIDGE_ADVICE"].contains("free space"), "{a:?}");
    // The store's own words (paths) stay in the log.
    assert!(
        !a["MAILBRIDGE_REASON"].contains("/var/lib/mailbridge"),
        "{a:?}"
    );
    assert_no_secret("the command's environment", &w.env_text(), &secrets(&w));
    w.fail_grant_writes.store(false, Ordering::SeqCst);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_mode_background_refresh_failures_alert_and_no_unused_warning() {
    // In service key mode the background refresh keeps grants alive, so an
    // old Microsoft grant is no "grant_expiring"; a grant the provider
    // revokes is found by the background refresh, with no client around.
    let w = World::start(Spec {
        microsoft: true,
        service: true,
        server_extra: "background_refresh_secs = 1".into(),
        alice_age: 85 * DAY,
        ..Spec::default()
    })
    .await;
    wait_until("the first background refresh", || {
        w.provider.refresh_requests() >= 2
    })
    .await;
    w.provider.revoke_user(USER);
    wait_until("the background refresh's alert", || !w.alerts().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alerts = w.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["MAILBRIDGE_EVENT"], "grant_refused");
    assert_eq!(alerts[0]["MAILBRIDGE_ACCOUNT"], USER);
    assert!(
        alerts[0]["MAILBRIDGE_REASON"].contains("invalid_grant"),
        "{alerts:?}"
    );
    // Bob's grant kept being refreshed meanwhile.
    assert!(w.login(BOB, PASSWORD).await.starts_with("a1 OK"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_seven_day_expiry_is_named_when_the_grant_is_a_week_old() {
    // Google's answer for a refresh token of an app left in "Testing",
    // seven days after the grant.
    let body = r#"{
  "error": "invalid_grant",
  "error_description": "Token has been expired or revoked."
}"#;
    let endpoint = Receiver::start(None, 400, body, Duration::ZERO).await;
    let w = World::start(Spec {
        token_url: Some(format!("http://127.0.0.1:{}/token", endpoint.addr.port())),
        alice_age: 7 * DAY + 3600,
        bob_age: 40 * DAY,
        ..Spec::default()
    })
    .await;
    let no = w.login(USER, PASSWORD).await;
    println!("client told (7-day-old grant): {no}");
    assert!(
        no.starts_with("a1 NO [AUTHENTICATIONFAILED]")
            && no.contains("invalid_grant")
            && no.contains("\"Testing\"")
            && no.contains("In production")
            && no.contains("mailbridge account reauthorize alice@example.com"),
        "{no}"
    );
    // A grant weeks old: expired or revoked, no Testing story.
    let no = w.login(BOB, PASSWORD).await;
    println!("client told (40-day-old grant): {no}");
    assert!(
        no.contains("expired or was revoked") && !no.contains("Testing"),
        "{no}"
    );
    wait_until("both alerts", || w.alerts().len() == 2).await;
    let advice: Vec<String> = w
        .alerts()
        .iter()
        .map(|a| a["MAILBRIDGE_ADVICE"].clone())
        .collect();
    assert!(
        advice.iter().any(|a| a.contains("\"Testing\"")),
        "{advice:?}"
    );
    w.stop().await;
}
