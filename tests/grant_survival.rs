//! Grants survive faults: the `mailbridge` binary against the sandbox
//! provider with strict refresh-token rotation and reuse detection (a
//! rotated-out refresh token presented again revokes the whole grant), and
//! a token endpoint that can be slowed. Each case ends with the grant alive
//! and the provider having seen no replay, except the `kill -9` loop, which
//! counts the kills that fell in the one window nobody can win (after the
//! provider rotated, before the new token is on disk) and measures it.
//!
//! A store that fails its writes runs in-process (a `TokenStore` wrapper),
//! as the binary has no way to be given one.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mailbridge::config::Settings;
use mailbridge::server::Server;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SealedGrant, SledStore, StoreError, TokenStore};
use mailbridge::vault::GrantEvent;
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The sandbox provider and IMAP server, a config file for `mailbridge
/// run` and a state directory holding alice's grant.
struct World {
    provider: Provider,
    imap: ImapServer,
    _pki: TestPki,
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
}

/// Permissions `mode` (a key file other users can read is refused).
fn private(mode: u32) -> std::fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(mode)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The config's text: `[server]` with `server_extra`, one IMAP listener on
/// `port`, the sandbox provider, alice.
fn config_text(
    state: &Path,
    port: u16,
    provider: &Provider,
    imap: &ImapServer,
    ca: &Path,
    server_extra: &str,
) -> String {
    format!(
        r#"
[server]
state_dir = "{state}"
kdf_memory_kib = 256
kdf_iterations = 1
backoff_base_ms = 1
{server_extra}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{port}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "localhost", port = {imap_port}, tls = "implicit" }}

[[account]]
user = "{USER}"
provider = "sandbox"
"#,
        state = state.display(),
        token_url = provider.token_url(),
        ca = ca.display(),
        imap_port = imap.addr().port(),
    )
}

impl World {
    async fn new(tag: &str, server_extra: &str, opts: ProviderOptions) -> World {
        let pki = TestPki::generate();
        let provider = Provider::start(opts).await.unwrap();
        let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        imap.append(USER, "INBOX", MESSAGE.to_vec());
        let dir = temp_dir(tag);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let key = dir.join("service.key");
        std::fs::write(&key, [42u8; 32]).unwrap();
        // A key other users can read is refused.
        std::fs::set_permissions(&key, private(0o600)).unwrap();
        let port = free_port();
        let config = dir.join("mailbridge.toml");
        let server_extra = server_extra.replace("KEY_FILE", &key.display().to_string());
        std::fs::write(
            &config,
            config_text(
                &dir.join("state"),
                port,
                &provider,
                &imap,
                &ca,
                &server_extra,
            ),
        )
        .unwrap();
        let w = World {
            provider,
            imap,
            _pki: pki,
            dir,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        w.seed().await;
        w
    }

    fn settings(&self) -> Settings {
        Settings::load(&self.config).unwrap()
    }

    /// A new grant for alice from the provider, sealed into the store
    /// (mailbridge must not be running). Returns its refresh token.
    async fn seed(&self) -> String {
        let token = self.provider.issue_refresh_token(USER, "mail");
        let settings = self.settings();
        let store: Arc<dyn TokenStore> =
            Arc::new(SledStore::open(&settings.server.state_dir()).unwrap());
        let vault = mailbridge::server::vault_for(&settings, store).unwrap();
        vault
            .create(
                USER,
                &SecretString::from(PASSWORD),
                GrantData {
                    refresh_token: Some(SecretString::from(token.clone())),
                    obtained_at: 0,
                    client_id: None,
                    shared_access: None,
                },
                AccountMeta {
                    provider: "sandbox".into(),
                    upstream_user: USER.into(),
                    ..AccountMeta::default()
                },
                true,
            )
            .await
            .unwrap();
        token
    }

    /// The refresh token on disk (mailbridge must not be running).
    async fn disk_token(&self) -> String {
        let settings = self.settings();
        let dir = settings.server.state_dir();
        // A killed process's lock goes with it, but give the kernel a moment.
        let mut store = None;
        for _ in 0..100 {
            match SledStore::open(&dir) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let store: Arc<dyn TokenStore> =
            Arc::new(store.expect("store opens after mailbridge ended"));
        let vault = mailbridge::server::vault_for(&settings, store).unwrap();
        let unlocked = match settings.server.key_mode {
            mailbridge::config::KeyMode::Service => vault.unlock_service(USER).await,
            mailbridge::config::KeyMode::Password => {
                vault
                    .unlock(USER, &SecretString::from(PASSWORD), LOCAL)
                    .await
            }
        }
        .unwrap();
        unlocked
            .refresh_token()
            .unwrap()
            .expose_secret()
            .to_string()
    }

    /// `mailbridge run`, listening.
    async fn start(&self) -> Running {
        let mut child = Reaper(
            Command::new(BIN)
                .args(["run", "--config", self.config.to_str().unwrap()])
                .env("MAILBRIDGE_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = logs.clone();
        // Drain the logs as they come (or the pipe fills and mailbridge
        // blocks), each line with the moment it was read.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let mut up = false;
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(up, "mailbridge run did not start listening");
        Running { child, logs }
    }

    fn cleanup(&self) {
        self.imap.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Running {
    child: Reaper,
    logs: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Running {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig}");
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; the exit status and how long the exit took (bounded).
    async fn term(&mut self) -> (std::process::ExitStatus, Duration) {
        let t0 = Instant::now();
        self.signal("-TERM");
        for _ in 0..600 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mailbridge run did not stop on SIGTERM within 15 s");
    }

    fn text(&self) -> String {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When the first log line containing `needle` after line `from` was
    /// read, waiting up to `limit`.
    async fn wait_log(
        &self,
        needle: &str,
        from: usize,
        limit: Duration,
    ) -> Option<(Instant, String)> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            {
                let logs = self.logs.lock().unwrap();
                if let Some((t, l)) = logs.iter().skip(from).find(|(_, l)| l.contains(needle)) {
                    return Some((*t, l.clone()));
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }

    fn lines(&self) -> usize {
        self.logs.lock().unwrap().len()
    }
}

/// LOGIN as alice and the tagged reply; on success the mailbox is read
/// and the session logged out.
async fn login(addr: SocketAddr) -> String {
    let mut c = Client::plain(addr).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let r = c
        .cmd("a1", &format!("LOGIN {USER} {}", quote(PASSWORD)))
        .await;
    let reply = r.last().cloned().unwrap_or_default();
    if reply.starts_with("a1 OK") {
        let s = c.cmd("s1", "SELECT INBOX").await;
        assert!(s.last().unwrap().starts_with("s1 OK"), "{s:?}");
        c.cmd("z", "LOGOUT").await;
    }
    reply
}

/// Sends LOGIN and returns the first reply line, or "" if the connection
/// ends first (mailbridge killed); never fails on a reset connection.
async fn login_reply(addr: SocketAddr) -> String {
    use tokio::io::AsyncWriteExt;
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let mut io = tokio::io::BufReader::new(tcp);
    if read_line_or_nothing(&mut io).await.is_empty() {
        return String::new();
    }
    let command = format!("a1 LOGIN {USER} {}\r\n", quote(PASSWORD));
    if io.get_mut().write_all(command.as_bytes()).await.is_err() {
        return String::new();
    }
    read_line_or_nothing(&mut io).await
}

async fn read_line_or_nothing(io: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut line = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), io.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&line).trim_end().to_string(),
        _ => String::new(),
    }
}

/// No password and no token the provider issued is in the logs.
fn assert_no_secret(logs: &str, w: &World) {
    assert!(!logs.is_empty());
    for secret in std::iter::once(PASSWORD.to_string()).chain(w.provider.issued_tokens()) {
        assert!(!logs.contains(&secret), "a secret appeared in the logs");
    }
}

/// The grant is alive: a restarted mailbridge (no cached token, so it
/// refreshes from what is on disk) logs in, and the provider saw no replay.
async fn assert_alive_after_restart(w: &World) {
    let disk = w.disk_token().await;
    assert!(
        w.provider.refresh_token_is_live(&disk),
        "the refresh token on disk is not the provider's live one"
    );
    let mut run = w.start().await;
    let r = login(w.addr).await;
    assert!(r.starts_with("a1 OK"), "after a restart: {r}");
    let (status, _) = run.term().await;
    assert!(status.success(), "{status:?}");
    assert_no_secret(&run.text(), w);
    assert_eq!(
        w.provider.refresh_token_replays(),
        0,
        "the provider saw a replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_timeout_during_a_refresh_keeps_the_grant() {
    let w = World::new(
        "gs-timeout",
        "login_timeout_secs = 1",
        ProviderOptions::default(),
    )
    .await;
    // The provider rotates the token only after the login gave up.
    w.provider.set_token_delay(Duration::from_millis(2500));
    for round in 1..=2 {
        let mut run = w.start().await;
        let from = run.lines();
        let t0 = Instant::now();
        let r = login(w.addr).await;
        let cut_after = t0.elapsed();
        assert!(
            r.starts_with("a1 NO [UNAVAILABLE]") && r.contains("within 1 s"),
            "{r}"
        );
        // The refresh runs on, and its rotated token is saved.
        let saved = run
            .wait_log(
                "rotated refresh token sealed and saved",
                from,
                Duration::from_secs(10),
            )
            .await;
        assert!(
            saved.is_some(),
            "the refresh did not finish: {}",
            run.text()
        );
        let saved_after = saved.unwrap().0 - t0;
        // The token it got is cached: no second refresh.
        let refreshes = w.provider.refresh_requests();
        let r = login(w.addr).await;
        assert!(r.starts_with("a1 OK"), "{r}");
        assert_eq!(
            w.provider.refresh_requests(),
            refreshes,
            "the refreshed token was not kept"
        );
        println!(
            "round {round}: login cut after {} ms, rotated token saved after {} ms, next login used it",
            cut_after.as_millis(),
            saved_after.as_millis()
        );
        let (status, _) = run.term().await;
        assert!(status.success());
    }
    assert_eq!(w.provider.refresh_token_replays(), 0);
    w.provider.set_token_delay(Duration::ZERO);
    assert_alive_after_restart(&w).await;
    println!(
        "refreshes {}, replays {}",
        w.provider.refresh_requests(),
        w.provider.refresh_token_replays()
    );
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_answering_after_32_s_is_waited_for() {
    // Past the 30 s that bound every other HTTP request: the refresh's own
    // bound is refresh_timeout_secs (default 300 s).
    let w = World::new(
        "gs-slow",
        "login_timeout_secs = 2",
        ProviderOptions::default(),
    )
    .await;
    w.provider.set_answer_delay(Duration::from_secs(32));
    let mut run = w.start().await;
    let from = run.lines();
    let t0 = Instant::now();
    let r = login(w.addr).await;
    let cut = t0.elapsed();
    assert!(r.starts_with("a1 NO [UNAVAILABLE]"), "{r}");
    let saved = run
        .wait_log(
            "rotated refresh token sealed and saved",
            from,
            Duration::from_secs(45),
        )
        .await;
    assert!(saved.is_some(), "{}", run.text());
    println!(
        "token endpoint answering after 32 s: login told to retry after {} ms, rotated token saved after {} ms",
        cut.as_millis(),
        (saved.unwrap().0 - t0).as_millis()
    );
    assert!(!run.text().contains("cannot reach the token endpoint"));
    let (status, _) = run.term().await;
    assert!(status.success());
    w.provider.set_answer_delay(Duration::ZERO);
    assert_alive_after_restart(&w).await;
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_a_refresh_keeps_the_grant() {
    let w = World::new("gs-gone", "", ProviderOptions::default()).await;
    w.provider.set_token_delay(Duration::from_millis(800));
    let mut run = w.start().await;
    let from = run.lines();
    {
        let mut c = Client::plain(w.addr).await;
        c.line().await;
        c.send(format!("a1 LOGIN {USER} {}\r\n", quote(PASSWORD)).as_bytes())
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The client goes away while the refresh is at the provider.
    }
    let saved = run
        .wait_log(
            "rotated refresh token sealed and saved",
            from,
            Duration::from_secs(10),
        )
        .await;
    assert!(saved.is_some(), "{}", run.text());
    assert_eq!(w.provider.refresh_requests(), 1);
    let (status, _) = run.term().await;
    assert!(status.success());
    println!("client gone after 200 ms of an 800 ms refresh: token saved");

    // A token response without `expires_in` is accepted, with a warning.
    w.provider.set_token_delay(Duration::ZERO);
    w.provider.set_omit_expires_in(true);
    let mut run = w.start().await;
    let r = login(w.addr).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let warning = run
        .wait_log("sent no expires_in", 0, Duration::from_secs(5))
        .await;
    assert!(warning.is_some(), "no warning: {}", run.text());
    println!("no expires_in: login OK; logged: {}", warning.unwrap().1);
    let (status, _) = run.term().await;
    assert!(status.success());
    w.provider.set_omit_expires_in(false);
    assert_alive_after_restart(&w).await;
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_provider_during_a_refresh_keeps_the_grant() {
    let w = World::new("gs-reload", "", ProviderOptions::default()).await;
    w.provider.set_token_delay(Duration::from_millis(1500));
    let mut run = w.start().await;
    let addr = w.addr;
    let first = tokio::spawn(async move { login(addr).await });
    // The refresh is at the provider when the reload comes.
    for _ in 0..200 {
        if w.provider.token_requests() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(w.provider.token_requests(), 1);
    let from = run.lines();
    let text = std::fs::read_to_string(&w.config).unwrap().replace(
        "client_id = \"mailbridge-test\"",
        "client_id = \"mailbridge-test\"\nscopes = [\"mail\"]",
    );
    std::fs::write(&w.config, text).unwrap();
    run.signal("-HUP");
    let reloaded = run
        .wait_log("configuration reloaded", from, Duration::from_secs(5))
        .await;
    assert!(reloaded.is_some(), "{}", run.text());
    // A login under the new provider settings while the old refresh is in
    // flight: it waits for that refresh and then refreshes with the
    // rotated token.
    let second = login(w.addr).await;
    let first = first.await.unwrap();
    assert!(first.starts_with("a1 OK"), "{first}");
    assert!(second.starts_with("a1 OK"), "{second}");
    assert_eq!(w.provider.refresh_requests(), 2);
    assert_eq!(w.provider.refresh_token_replays(), 0);
    println!(
        "reload during a refresh: both logins OK, {} refreshes, {} replays",
        w.provider.refresh_requests(),
        w.provider.refresh_token_replays()
    );
    let (status, _) = run.term().await;
    assert!(status.success());
    w.provider.set_token_delay(Duration::ZERO);
    assert_alive_after_restart(&w).await;
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_background_refresh_waits_for_it() {
    let w = World::new(
        "gs-term",
        "key_mode = \"service\"\nkey_file = \"KEY_FILE\"\nshutdown_grace_secs = 1\nbackground_refresh_secs = 3600",
        ProviderOptions::default(),
    )
    .await;
    w.provider.set_token_delay(Duration::from_millis(3000));
    let mut run = w.start().await;
    // The background refresh starts at once.
    for _ in 0..400 {
        if w.provider.token_requests() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(w.provider.token_requests(), 1, "no background refresh");
    let (status, took) = run.term().await;
    assert!(status.success(), "{status:?}");
    let logs = run.text();
    assert_no_secret(&logs, &w);
    assert!(logs.contains("waiting for 1 token refreshes"), "{logs}");
    assert!(
        logs.contains("rotated refresh token sealed and saved"),
        "{logs}"
    );
    assert!(took >= Duration::from_millis(2000), "exited after {took:?}");
    println!(
        "SIGTERM during a 3 s background refresh (shutdown_grace_secs = 1): exited after {} ms, token saved",
        took.as_millis()
    );
    w.provider.set_token_delay(Duration::ZERO);
    assert_alive_after_restart(&w).await;
    w.cleanup();
}

/// A service that crashes and is started again, over and over (systemd's
/// `Restart=on-failure` every 2 s), refreshes a grant at the first start
/// only: each later start finds the last refresh, written durably at once,
/// within the background interval and leaves the grant alone. A grant
/// last refreshed longer ago than the interval is refreshed at start, as a
/// restart after a long stop needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_restarting_in_a_loop_does_not_refresh_at_each_start() {
    let w = World::new(
        "gs-loop",
        "key_mode = \"service\"\nkey_file = \"KEY_FILE\"\nbackground_refresh_secs = 3600",
        ProviderOptions::default(),
    )
    .await;
    /// The log line of the background refresh's pass at start.
    async fn pass_at_start(run: &Running) -> String {
        let done = run
            .wait_log("background refresh done", 0, Duration::from_secs(10))
            .await;
        done.unwrap_or_else(|| panic!("no pass at start: {}", run.text()))
            .1
    }
    let refreshed_one = |done: &str| done.contains(" refreshed=1") && !done.contains("recently");
    let mut run = w.start().await;
    let done = pass_at_start(&run).await;
    assert!(refreshed_one(&done), "{done}");
    assert_eq!(w.provider.refresh_requests(), 1);
    // The crash: right after the refresh, before any background flush.
    run.kill9();
    for start in 2..=4 {
        let mut run = w.start().await;
        let done = pass_at_start(&run).await;
        assert!(
            done.contains(" refreshed=0") && done.contains("recently_refreshed=1"),
            "start {start}: {done}"
        );
        assert_no_secret(&run.text(), &w);
        run.kill9();
    }
    assert_eq!(
        w.provider.refresh_requests(),
        1,
        "three starts after a kill -9 refreshed again"
    );
    // The grant still works: a login refreshes for its access token.
    let mut run = w.start().await;
    assert!(login(w.addr).await.starts_with("a1 OK"));
    assert_eq!(w.provider.refresh_requests(), 2);
    run.kill9();
    // A grant last refreshed longer ago than the interval is refreshed at
    // start.
    let text = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        text.replace(
            "background_refresh_secs = 3600",
            "background_refresh_secs = 1",
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut run = w.start().await;
    let done = pass_at_start(&run).await;
    assert!(refreshed_one(&done), "{done}");
    assert!(w.provider.refresh_requests() >= 3);
    let (status, _) = run.term().await;
    assert!(status.success(), "{status:?}");
    println!(
        "a service killed and started four times within a 3600 s interval: 1 refresh at start; after the interval: refreshed at start ({} refreshes in all)",
        w.provider.refresh_requests()
    );
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_logins_with_five_minute_tokens_make_one_refresh() {
    let w = World::new(
        "gs-fifty",
        "login_timeout_secs = 5",
        ProviderOptions {
            access_token_lifetime: Duration::from_secs(300),
            ..ProviderOptions::default()
        },
    )
    .await;
    w.provider.set_token_delay(Duration::from_millis(300));
    let mut run = w.start().await;
    for wave in 1..=2 {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let addr = w.addr;
            tasks.push(tokio::spawn(async move { login(addr).await }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert!(r.starts_with("a1 OK"), "{r}");
        }
        println!(
            "wave {wave}: 50 logins with 5-minute tokens in {} ms, {} refresh(es) in all",
            t0.elapsed().as_millis(),
            w.provider.refresh_requests()
        );
        assert_eq!(w.provider.refresh_requests(), 1, "single flight defeated");
    }
    let (status, _) = run.term().await;
    assert!(status.success());
    w.provider.set_token_delay(Duration::ZERO);
    assert_alive_after_restart(&w).await;
    w.cleanup();
}

/// Where a `kill -9` fell, judged after the fact.
#[derive(Debug, Default)]
struct KillTally {
    before_rotation: u32,
    in_window: u32,
    /// Of those in the window: the request was on its way and the
    /// provider rotated after the kill.
    request_in_flight: u32,
    after_save: u32,
    lost: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_around_refreshes() {
    const KILLS: u32 = 32;
    let w = World::new("gs-kill", "", ProviderOptions::default()).await;
    // The answer takes 40 ms to come back after the provider rotated: a
    // provider some way off.
    let answer_delay = Duration::from_millis(40);
    w.provider.set_answer_delay(answer_delay);
    // And the request 30 ms to get there: some kills come before it.
    w.provider.set_token_delay(Duration::from_millis(30));
    let mut tally = KillTally::default();
    let mut windows = Vec::new();
    let mut save_ms = Vec::new();
    let mut rng = rand::thread_rng();
    for i in 0..KILLS {
        let on_disk = w.disk_token().await;
        let mut run = w.start().await;
        let offset = Duration::from_millis(rng.gen_range(0..120));
        let rotated_before = w.provider.last_rotation();
        let client = tokio::spawn(login_reply(w.addr));
        tokio::time::sleep(offset).await;
        let killed_at = Instant::now();
        run.kill9();
        let reply = client.await.unwrap();
        // Let the provider finish what it was doing.
        tokio::time::sleep(answer_delay + Duration::from_millis(20)).await;
        let rotation = w
            .provider
            .last_rotation()
            .filter(|r| Some(*r) != rotated_before);
        let disk = w.disk_token().await;
        let saved = disk != on_disk;
        if reply.starts_with("a1 OK") {
            // The access token is used only after the rotated refresh
            // token is on disk.
            assert!(
                saved,
                "kill {i}: login answered but the rotated token was not on disk"
            );
        }
        let place = match (rotation, saved) {
            (None, false) => "before the provider rotated",
            (Some(_), true) => "after the save",
            (Some(_), false) => "in the window",
            (None, true) => panic!("kill {i}: a new token on disk without a rotation"),
        };
        match place {
            "before the provider rotated" => tally.before_rotation += 1,
            "after the save" => tally.after_save += 1,
            _ => {
                tally.in_window += 1;
                if rotation.is_some_and(|r| r > killed_at) {
                    // Sent before the kill, rotated after it.
                    tally.request_in_flight += 1;
                }
            }
        }
        // Restart and log in: that refresh is measured and not killed.
        let mut run = w.start().await;
        let from = run.lines();
        let r = login(w.addr).await;
        let alive = r.starts_with("a1 OK");
        if alive {
            let rot = w.provider.last_rotation().unwrap();
            let (seen, line) = run
                .wait_log(
                    "rotated refresh token sealed and saved",
                    from,
                    Duration::from_secs(5),
                )
                .await
                .expect("the restart's refresh saved its token");
            windows.push(seen.saturating_duration_since(rot));
            if let Some(v) = line
                .split("save_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            {
                save_ms.push(v);
            }
        }
        run.kill9();
        assert_eq!(
            alive,
            place != "in the window",
            "kill {i} at +{} ms ({place}): restart login said {r}",
            offset.as_millis()
        );
        if !alive {
            tally.lost += 1;
            // Only a kill in the window loses the grant; start again.
            assert!(r.contains("invalid_grant"), "{r}");
            w.seed().await;
        }
    }
    windows.sort();
    save_ms.sort_by(f64::total_cmp);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{KILLS} kills at random offsets 0-120 ms after LOGIN (request delay 30 ms, answer delay {} ms): {} before the refresh request was sent, {} in the window (request sent, token not yet on disk; {} of them while the request was still on its way), {} after the save; grants lost {}",
        answer_delay.as_millis(),
        tally.before_rotation,
        tally.in_window,
        tally.request_in_flight,
        tally.after_save,
        tally.lost
    );
    if !windows.is_empty() {
        println!(
            "window from the provider's rotation to the saved-token log line read by this test ({} refreshes): min {:.1} ms, median {:.1} ms, max {:.1} ms (includes the {} ms answer delay)",
            windows.len(),
            ms(windows[0]),
            ms(windows[windows.len() / 2]),
            ms(windows[windows.len() - 1]),
            answer_delay.as_millis()
        );
    }
    if !save_ms.is_empty() {
        println!(
            "mailbridge's part, answer received -> sealed and flushed: min {:.2} ms, median {:.2} ms, max {:.2} ms",
            save_ms[0],
            save_ms[save_ms.len() / 2],
            save_ms[save_ms.len() - 1]
        );
    }
    assert_eq!(tally.lost, tally.in_window);
    assert_eq!(
        tally.before_rotation + tally.in_window + tally.after_save,
        KILLS
    );
    w.cleanup();
}

/// A store whose writes fail while `fail` is set, as on a full disk.
struct FailingStore {
    inner: SledStore,
    fail: AtomicBool,
}

impl FailingStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            Err(StoreError::Io {
                path: PathBuf::from("/test/state"),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device",
                ),
            })
        } else {
            Ok(())
        }
    }
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
        self.check()?;
        self.inner.swap_grant(account, expected, new)
    }
    fn load_meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.inner.load_meta(account)
    }
    fn save_meta(&self, account: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.check()?;
        self.inner.save_meta(account, meta)
    }
    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.remove(account)
    }
    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        self.inner.accounts()
    }
}

/// Runs a server in this process over `store`; returns its address and a
/// way to stop it.
async fn serve(
    settings: Settings,
    store: Arc<dyn TokenStore>,
) -> (
    SocketAddr,
    Arc<mailbridge::login::Gateway>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = Server::bind(settings, store).await.unwrap();
    let addr = server.local_addrs()[0];
    let gateway = server.gateway().clone();
    let (stop, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    (addr, gateway, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_keeps_the_rotated_token() {
    let pki = TestPki::generate();
    // Tokens that live a second: every login after a pause refreshes.
    let provider = Provider::start(ProviderOptions {
        access_token_lifetime: Duration::from_secs(1),
        ..ProviderOptions::default()
    })
    .await
    .unwrap();
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
        .await
        .unwrap();
    imap.append(USER, "INBOX", MESSAGE.to_vec());
    let dir = temp_dir("gs-full");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let text = config_text(&dir.join("state"), 0, &provider, &imap, &ca, "");
    let settings = || Settings::parse(&text, "test config").unwrap();
    let store = Arc::new(FailingStore {
        inner: SledStore::open(&dir.join("state")).unwrap(),
        fail: AtomicBool::new(false),
    });
    let dyn_store: Arc<dyn TokenStore> = store.clone();
    let first = provider.issue_refresh_token(USER, "mail");
    let vault = mailbridge::server::vault_for(&settings(), dyn_store.clone()).unwrap();
    vault
        .create(
            USER,
            &SecretString::from(PASSWORD),
            GrantData {
                refresh_token: Some(SecretString::from(first.clone())),
                obtained_at: 0,
                client_id: None,
                shared_access: None,
            },
            AccountMeta::default(),
            false,
        )
        .await
        .unwrap();
    drop(vault);
    // What is on disk, read by a vault of its own.
    let on_disk = || {
        let v = mailbridge::server::vault_for(&settings(), dyn_store.clone()).unwrap();
        async move {
            let u = v
                .unlock(USER, &SecretString::from(PASSWORD), LOCAL)
                .await
                .unwrap();
            u.refresh_token().unwrap().expose_secret().to_string()
        }
    };

    let (addr, gateway, stop, task) = serve(settings(), dyn_store.clone()).await;
    let mut events = gateway.vault().subscribe();
    store.fail.store(true, Ordering::SeqCst);
    let t_full = Instant::now();
    let r = login(addr).await;
    assert!(
        r.starts_with("a1 OK"),
        "the access token is used all the same: {r}"
    );
    let e = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event")
        .unwrap();
    assert!(
        matches!(&e, GrantEvent::RotationNotSaved { account, reason } if account == USER && reason.contains("No space left")),
        "{e:?}"
    );
    println!("disk full: login OK, event {e:?}");
    // On disk: the spent token. In memory: the live one, used next.
    assert_eq!(on_disk().await, first);
    assert!(!provider.refresh_token_is_live(&first));
    for n in 2..=3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = login(addr).await;
        assert!(r.starts_with("a1 OK"), "{r}");
        assert_eq!(provider.refresh_requests(), n);
        assert_eq!(
            provider.refresh_token_replays(),
            0,
            "the spent token was presented again"
        );
    }
    assert_eq!(on_disk().await, first, "the store took no write");
    // Room again: the background retry puts the grant back on disk.
    store.fail.store(false, Ordering::SeqCst);
    let e = tokio::time::timeout(Duration::from_secs(90), events.recv())
        .await
        .expect("saved again")
        .unwrap();
    assert!(
        matches!(&e, GrantEvent::RotationSaved { account, .. } if account == USER),
        "{e:?}"
    );
    println!(
        "disk has room again: {e:?} ({} ms after the disk filled)",
        t_full.elapsed().as_millis()
    );
    let disk = on_disk().await;
    assert!(
        provider.refresh_token_is_live(&disk),
        "the token on disk is the live one"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    drop(gateway);

    // A new server over the same store: the grant works. The disk fills
    // again, and has room again just as the server stops: the shutdown
    // saves the token (the background retry would come a second later).
    let (addr, gateway, stop, task) = serve(settings(), dyn_store.clone()).await;
    store.fail.store(true, Ordering::SeqCst);
    let r = login(addr).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let unsaved_at = Instant::now();
    assert_eq!(provider.refresh_token_replays(), 0);
    assert!(!provider.refresh_token_is_live(&on_disk().await));
    store.fail.store(false, Ordering::SeqCst);
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    let stopped_after = unsaved_at.elapsed();
    let disk = on_disk().await;
    assert!(
        stopped_after < Duration::from_millis(900),
        "too slow to tell the shutdown's save from the retry's: {stopped_after:?}"
    );
    assert!(
        provider.refresh_token_is_live(&disk),
        "the shutdown saved the rotated token"
    );
    println!(
        "disk full until the shutdown: saved by it ({} ms after the failed save)",
        stopped_after.as_millis()
    );
    drop(gateway);
    let (addr, gateway, stop, task) = serve(settings(), dyn_store.clone()).await;
    let r = login(addr).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    assert_eq!(provider.refresh_token_replays(), 0);
    println!(
        "after a restart: login OK; {} refreshes, {} replays",
        provider.refresh_requests(),
        provider.refresh_token_replays()
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    drop(gateway);
    imap.shutdown();
    provider.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sled store on a really full disk: a small tmpfs this test mounts
/// (skipped, saying why, where mounting is not allowed). Through the
/// binary the disk cannot be made to fail in reasonable time (sled writes
/// into a 512 KiB log segment it allocated at start), so the store is
/// driven directly: a write fails with ENOSPC, sled then refuses even to
/// reopen while the disk is full, and once there is room the store
/// reopens itself and the next write is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_store_on_a_full_tmpfs_works_again_once_there_is_room() {
    use mailbridge::store::KdfParams;
    let dir = temp_dir("gs-tmpfs");
    let mnt = dir.join("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    match Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED: cannot mount a tmpfs here ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        Err(e) => {
            println!("SKIPPED: cannot run mount ({e})");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    }
    let unmount = Unmount(mnt.clone());
    let grant = |n: usize| SealedGrant {
        format: 1,
        kdf: KdfParams::for_tests(),
        salt: vec![1; 16],
        nonce: vec![(n % 250) as u8; 24],
        ciphertext: vec![7; 400],
        password_hash: None,
    };
    let store = SledStore::open(&mnt.join("state")).unwrap();
    assert!(store.swap_grant(USER, None, &grant(0)).unwrap());
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        for _ in 0..2048 {
            if f.write_all(&chunk).and_then(|_| f.sync_all()).is_err() {
                break;
            }
        }
    }
    let mut current = grant(0);
    let mut failed = None;
    for n in 1..2000 {
        match store.swap_grant(USER, Some(&current), &grant(n)) {
            Ok(true) => current = grant(n),
            Ok(false) => panic!("nobody else writes"),
            Err(e) => {
                failed = Some((n, e));
                break;
            }
        }
    }
    let (n, e) = failed.expect("a write failed on the full disk");
    println!("full disk: write {n} failed: {e}");
    let while_full = store.load_grant(USER);
    println!("while full, a read: {while_full:?}");
    std::fs::remove_file(&filler).unwrap();
    let on_disk = store.load_grant(USER).unwrap().unwrap();
    assert!(
        store.swap_grant(USER, Some(&on_disk), &grant(777)).unwrap(),
        "a write once there is room"
    );
    drop(store);
    let again = SledStore::open(&mnt.join("state")).unwrap();
    assert_eq!(again.load_grant(USER).unwrap(), Some(grant(777)));
    println!("room again: the store reopened itself; the write is on disk");
    drop(again);
    drop(unmount);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unmounts its path when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
