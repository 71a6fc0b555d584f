//! KDF work is bounded (issue 12, point 2): the `mailbridge` binary with
//! the default Argon2id parameters (19 MiB, two passes), its RSS read from
//! /proc while (a) 1,000 wrong-password IMAP logins for 1,000 accounts and
//! (b) 200 correct first logins right after a start arrive at once. Each
//! storm must leave the peak (VmHWM) under 512 MiB and RSS back near the
//! idle baseline, and a correct login for another account from another
//! address (127.0.0.3) succeeds in the middle of it.
//!
//! The storm comes from 127.0.{1..4}.{1..250} (any 127/8 source works on
//! Linux's loopback), one address per connection, so that per-address
//! limits and backoff do not stop it before the KDF.
//!
//! The stores are built in-process before the child starts, cheaply but
//! with the real cost for the checks: in password mode every storm account
//! shares one salt, so one 19 MiB derivation seals them all (each record
//! still has its own nonce and is bound to its account name); in service
//! mode they share one PHC hash made with the default parameters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailbridge::store::seal::{self, GrantData};
use mailbridge::store::{AccountMeta, KdfParams, SledStore, TokenStore};
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
const PASSWORD: &str = "storm password";
const WRONG: &str = "not the storm password";
const INNOCENT: &str = "innocent@example.com";
const INNOCENT_PASSWORD: &str = "the innocent's password";
/// The innocent's address: none of the storm's.
const INNOCENT_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// The loose bound on peak RSS.
const PEAK_LIMIT_KIB: u64 = 512 * 1024;
/// How far above the idle baseline RSS may stay after a storm.
const AFTER_SLACK_KIB: u64 = 64 * 1024;
/// Service key mode's key.
const SERVICE_KEY: [u8; 32] = [42u8; 32];

/// The two storms measure one process each; run side by side they would
/// share two cores and stretch each other past their time bounds.
static ONE_STORM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn storm_user(i: usize) -> String {
    format!("user{i}@example.com")
}

/// The i-th storm connection's source address, 127.0.{1..4}.{1..250}.
fn storm_source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + ((i / 250) % 4) as u8,
        1 + (i % 250) as u8,
    ))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Password,
    Service,
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mailbridge-hostile-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Kills the child when dropped (a failed assertion must not leave it).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct World {
    provider: Provider,
    imap: ImapServer,
    _pki: TestPki,
    dir: PathBuf,
    addr: SocketAddr,
    child: Reaper,
    logs: Arc<Mutex<Vec<String>>>,
}

impl World {
    /// The sandbox, a store holding `users` (password [`PASSWORD`]) and
    /// the innocent, and `mailbridge run` serving it with the default KDF
    /// parameters. `real_tokens`: the storm accounts' grants are real
    /// (they will log in), else placeholders.
    async fn start(tag: &str, mode: Mode, users: &[String], real_tokens: bool) -> World {
        let pki = TestPki::generate();
        let provider = Provider::start(ProviderOptions::default()).await.unwrap();
        let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let dir = temp_dir(tag);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let state = dir.join("state");
        let key_lines = match mode {
            Mode::Password => String::new(),
            Mode::Service => {
                let key = dir.join("service.key");
                std::fs::write(&key, SERVICE_KEY).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                format!(
                    "key_mode = \"service\"\nkey_file = {}\n",
                    quote(&key.display().to_string())
                )
            }
        };
        let port = free_port();
        let config = dir.join("mailbridge.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
state_dir = {state}
{key_lines}
max_connections = 1500
login_timeout_secs = 120
preauth_timeout_secs = 120
backoff_base_ms = 1
backoff_max_secs = 1

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{port}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = {ca}
imap = {{ host = "localhost", port = {imap_port}, tls = "implicit" }}

[[account]]
user = "*@example.com"
provider = "sandbox"
"#,
                state = quote(&state.display().to_string()),
                token_url = provider.token_url(),
                ca = quote(&ca.display().to_string()),
                imap_port = imap.addr().port(),
            ),
        )
        .unwrap();

        let t0 = Instant::now();
        seed(&state, mode, users, real_tokens, &provider);
        println!(
            "sealed {} grants in {:.1} s",
            users.len() + 1,
            t0.elapsed().as_secs_f64()
        );

        let mut child = Reaper(
            Command::new(BIN)
                .args(["run", "--config", config.to_str().unwrap()])
                .env("MAILBRIDGE_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = logs.clone();
        // Drained as they come, or the pipe fills and mailbridge blocks.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut up = false;
        for _ in 0..1000 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(up, "mailbridge run did not start listening");
        World {
            provider,
            imap,
            _pki: pki,
            dir,
            addr,
            child,
            logs,
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn cleanup(self) {
        self.imap.shutdown();
        self.provider.shutdown();
        let dir = self.dir.clone();
        drop(self.child);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Seals the grants straight into the store (the binary is not running).
fn seed(state: &Path, mode: Mode, users: &[String], real_tokens: bool, provider: &Provider) {
    let store = SledStore::open(state).unwrap();
    let kdf = KdfParams::default();
    let grant = |user: &str, real: bool| GrantData {
        refresh_token: Some(SecretString::from(if real {
            provider.issue_refresh_token(user, "mail")
        } else {
            format!("placeholder for {user}")
        })),
        obtained_at: 0,
        client_id: None,
        shared_access: None,
    };
    let save = |user: &str, sealed| {
        assert!(store.swap_grant(user, None, &sealed).unwrap());
        store
            .save_meta(
                user,
                &AccountMeta {
                    provider: "sandbox".into(),
                    upstream_user: user.into(),
                    ..AccountMeta::default()
                },
            )
            .unwrap();
    };
    let password = SecretString::from(PASSWORD);
    let innocent = SecretString::from(INNOCENT_PASSWORD);
    match mode {
        Mode::Password => {
            let salt = seal::new_salt();
            let key = seal::derive_key(&password, &salt, kdf).unwrap();
            for user in users {
                let sealed =
                    seal::seal(user, &key, salt.clone(), kdf, &grant(user, real_tokens)).unwrap();
                save(user, sealed);
            }
            let salt = seal::new_salt();
            let key = seal::derive_key(&innocent, &salt, kdf).unwrap();
            save(
                INNOCENT,
                seal::seal(INNOCENT, &key, salt, kdf, &grant(INNOCENT, true)).unwrap(),
            );
        }
        Mode::Service => {
            let hash = seal::hash_password(&password, kdf).unwrap();
            let sealed = |user: &str, hash: &str, real: bool| {
                let salt = seal::new_salt();
                let key = seal::service_key(&SERVICE_KEY, &salt);
                seal::seal_with_hash(user, &key, salt, kdf, Some(hash.into()), &grant(user, real))
                    .unwrap()
            };
            for user in users {
                save(user, sealed(user, &hash, real_tokens));
            }
            let hash = seal::hash_password(&innocent, kdf).unwrap();
            save(INNOCENT, sealed(INNOCENT, &hash, true));
        }
    }
}

/// LOGIN from `source` and the tagged reply (the session is logged out
/// if it succeeded), or why there was none.
async fn login(
    addr: SocketAddr,
    source: IpAddr,
    user: &str,
    password: &str,
    wait: Duration,
) -> Result<String, String> {
    let attempt = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect from {source}: {e}"))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines.next_line().await.map_err(|e| e.to_string())?;
        match greeting {
            Some(g) if g.starts_with("* OK") => {}
            other => return Err(format!("greeting: {other:?}")),
        }
        write
            .write_all(format!("a1 LOGIN {user} {}\r\n", quote(password)).as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match lines.next_line().await.map_err(|e| e.to_string())? {
                Some(l) if l.starts_with("a1 ") => {
                    if l.starts_with("a1 OK") {
                        let _ = write.write_all(b"a2 LOGOUT\r\n").await;
                    }
                    return Ok(l);
                }
                Some(_) => {}
                None => return Err("connection closed before the reply".into()),
            }
        }
    };
    tokio::time::timeout(wait, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no reply within {wait:?}")))
}

struct Figures {
    baseline: u64,
    peak: u64,
    after: u64,
    storm: Duration,
    innocent: Duration,
}

/// Runs the storm (`users[i]` with `password` from [`storm_source`]`(i)`),
/// the innocent's login once a tenth of it is answered, and measures.
async fn storm(w: &World, users: &[String], password: &str, expect: &str) -> Figures {
    // Idle baseline: listening, nothing served yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (baseline, _) = rss(w.pid());
    let t0 = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, user) in users.iter().enumerate() {
        let (addr, user, password, answered) =
            (w.addr, user.clone(), password.to_owned(), answered.clone());
        tasks.spawn(async move {
            let r = login(
                addr,
                storm_source(i),
                &user,
                &password,
                Duration::from_secs(150),
            )
            .await;
            answered.fetch_add(1, Ordering::Relaxed);
            (user, r)
        });
    }
    let tenth = users.len() / 10;
    let waited = Instant::now();
    while answered.load(Ordering::Relaxed) < tenth && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (rss_mid, _) = rss(w.pid());
    let t_innocent = Instant::now();
    let innocent = login(
        w.addr,
        INNOCENT_SOURCE,
        INNOCENT,
        INNOCENT_PASSWORD,
        Duration::from_secs(150),
    )
    .await;
    let innocent_took = t_innocent.elapsed();
    let still_running = users.len() - answered.load(Ordering::Relaxed);
    println!(
        "innocent login from {INNOCENT_SOURCE} after {tenth} storm replies (RSS then {:.1} MiB): {innocent:?} in {:.2} s, {still_running} storm logins still unanswered",
        mib(rss_mid),
        innocent_took.as_secs_f64()
    );
    let mut bad = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (user, r) = r.unwrap();
        match r {
            Ok(l) if l.starts_with(expect) => {}
            other => bad.push(format!("{user}: {other:?}")),
        }
    }
    let storm_took = t0.elapsed();
    // Let freed memory go and idle threads settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, peak) = rss(w.pid());
    assert!(
        bad.is_empty(),
        "{} of {} storm logins did not get {expect}: first {:?}\n{}",
        bad.len(),
        users.len(),
        bad.first(),
        w.log_text()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        innocent.as_deref().is_ok_and(|l| l.starts_with("a1 OK")),
        "the innocent login in the middle of the storm: {innocent:?}"
    );
    Figures {
        baseline,
        peak,
        after,
        storm: storm_took,
        innocent: innocent_took,
    }
}

fn report(name: &str, n: usize, f: &Figures) {
    println!(
        "{name}: {n} logins in {:.1} s; RSS baseline {:.1} MiB, peak (VmHWM) {:.1} MiB, after {:.1} MiB; innocent login {:.2} s",
        f.storm.as_secs_f64(),
        mib(f.baseline),
        mib(f.peak),
        mib(f.after),
        f.innocent.as_secs_f64()
    );
    assert!(
        f.peak < PEAK_LIMIT_KIB,
        "{name}: peak RSS {:.1} MiB is over {} MiB",
        mib(f.peak),
        PEAK_LIMIT_KIB / 1024
    );
    assert!(
        f.after < f.baseline + AFTER_SLACK_KIB,
        "{name}: RSS after the storm {:.1} MiB stays more than {} MiB over the baseline {:.1} MiB",
        mib(f.after),
        AFTER_SLACK_KIB / 1024,
        mib(f.baseline)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_wrong_passwords_stay_bounded() {
    let _one = ONE_STORM_AT_A_TIME.lock().await;
    mailbridge::server::raise_open_files_limit(8192);
    let users: Vec<String> = (0..1000).map(storm_user).collect();
    let w = World::start("kdf-wrong", Mode::Password, &users, false).await;
    let f = storm(&w, &users, WRONG, "a1 NO").await;
    report("1000 wrong passwords (password key mode)", users.len(), &f);
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_first_logins_stay_bounded() {
    let _one = ONE_STORM_AT_A_TIME.lock().await;
    mailbridge::server::raise_open_files_limit(8192);
    let users: Vec<String> = (0..200).map(storm_user).collect();
    let w = World::start("kdf-first", Mode::Service, &users, true).await;
    let f = storm(&w, &users, PASSWORD, "a1 OK").await;
    report("200 first logins (service key mode)", users.len(), &f);
    w.cleanup();
}
