//! Many instances, one grant store: `mailbridge run` processes sharing a
//! PostgreSQL database (`[server] store = "postgres://..."`), in front of
//! the sandbox provider with strict refresh-token rotation and reuse
//! detection (a rotated-out refresh token presented again revokes the
//! grant).
//!
//! Each test starts a private PostgreSQL cluster in a temporary directory
//! on a loopback port (initdb + pg_ctl from /usr/lib/postgresql/*/bin, or
//! `$MAILBRIDGE_TEST_PG_BIN`; as the `postgres` user when run as root,
//! which initdb refuses). Without PostgreSQL's binaries each test prints
//! "skipped: ..." and passes, unless `MAILBRIDGE_REQUIRE_POSTGRES` is set
//! (CI installs PostgreSQL and sets it, so there they run).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use mailbridge_sandbox::{
    ImapServer, ImapServerOptions, Pop3Server, Pop3ServerOptions, Provider, ProviderOptions,
    SmtpServer, SmtpServerOptions, TestPki,
};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
/// The database user's password (scram-sha-256): must never show in a log.
const DB_PASSWORD: &str = "db-pw-7Hq2xZ";
const BOB: &str = "bob@example.com";
const BOB_PASSWORD: &str = "bob's local password";

fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A port free on `ip` now (another socket may take it before it is used).
fn free_port_on(ip: Ipv4Addr) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// Where the instances listen: a loopback address of their own, so that
/// the many outgoing connections from 127.0.0.1 (whose ephemeral ports can
/// be any port) never take a listener's port between its choice and its
/// bind. Clients still connect from 127.0.0.1, a local network.
const INSTANCE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// PostgreSQL's server binaries, or why there are none.
fn pg_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MAILBRIDGE_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|_| {
            format!(
                "PostgreSQL is not installed ({} is missing)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no initdb/pg_ctl under {}", root.display()))
}

/// The uid and gid of `user`.
fn ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A private PostgreSQL cluster on a loopback port, stopped and removed
/// when dropped.
struct Pg {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    /// Run the server as this user (the tests run as root).
    run_as: Option<String>,
    /// TLS on, with these certificate and key files in the data directory.
    tls: bool,
}

impl Pg {
    /// A new cluster, started; Err(why) when PostgreSQL is not installed.
    /// Any other failure panics: with the binaries there, it must work.
    /// With TLS from `pki` when given (its CA verifies the server as
    /// `localhost`).
    fn start_with(tag: &str, pki: Option<&TestPki>) -> Result<Pg, String> {
        let bin = pg_bin()?;
        let dir = temp_dir(tag);
        std::fs::set_permissions(&dir, perms(0o755)).unwrap();
        let root = nix_uid() == 0;
        let run_as = root.then(|| {
            if ids("postgres").is_some() {
                "postgres".to_string()
            } else {
                "nobody".to_string()
            }
        });
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, perms(0o700)).unwrap();
        let pwfile = dir.join("initdb-pw");
        std::fs::write(&pwfile, DB_PASSWORD).unwrap();
        if let Some(user) = &run_as {
            let (uid, gid) = ids(user).expect("user exists");
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let mut pg = Pg {
            bin,
            dir,
            data,
            port: free_port(),
            run_as,
            tls: false,
        };
        let out = pg
            .tool("initdb")
            .args(["-D", pg.data.to_str().unwrap()])
            .args([
                "-U",
                "mb",
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C", "--pwfile", pwfile.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(pki) = pki {
            for (name, pem) in [("server.crt", &pki.cert_pem), ("server.key", &pki.key_pem)] {
                let path = pg.data.join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(&path, perms(0o600)).unwrap();
                if let Some(user) = &pg.run_as {
                    let (uid, gid) = ids(user).expect("user exists");
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            pg.tls = true;
        }
        // The port was free when asked for, but another test's outgoing
        // connection may take it before the server binds: try a few.
        let mut tries = 0;
        while let Err(log) = pg.try_up() {
            tries += 1;
            assert!(
                tries < 4 && log.contains("could not bind"),
                "pg_ctl start failed: {log}"
            );
            pg.port = free_port();
        }
        Ok(pg)
    }

    /// A PostgreSQL program, run as the cluster's user.
    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Starts the server and waits until it accepts connections.
    fn up(&self) {
        if let Err(log) = self.try_up() {
            panic!("pg_ctl start failed: {log}");
        }
    }

    /// Starts the server; what it said if it did not start.
    fn try_up(&self) -> Result<(), String> {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=on",
            self.port,
            self.data.display()
        );
        if self.tls {
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let out = self
            .tool("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-w", "-t", "60"])
            .args(["-l", self.data.join("server.log").to_str().unwrap()])
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
        ))
    }

    /// Stops the server (fast: sessions are ended).
    fn down(&self) {
        let out = self
            .tool("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-w", "-t", "60"])
            .args(["-m", "fast", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL mailbridge is given (the password comes from a file).
    fn url(&self) -> String {
        format!(
            "postgres://mb@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// One query through psql; its rows, one per line.
    fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "mb", "-d", "postgres", "-At", "-c", sql])
            .env("PGPASSWORD", DB_PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn perms(mode: u32) -> std::fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(mode)
}

fn nix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file this process just made is this process's uid.
    let probe = temp_dir("uid-probe");
    let uid = std::fs::metadata(&probe).unwrap().uid();
    let _ = std::fs::remove_dir_all(&probe);
    uid
}

/// The cluster, or return from the test after saying why it is skipped.
macro_rules! pg_or_skip {
    ($tag:expr) => {
        pg_or_skip!($tag, None)
    };
    ($tag:expr, $pki:expr) => {
        match Pg::start_with($tag, $pki) {
            Ok(pg) => pg,
            Err(why) if std::env::var_os("MAILBRIDGE_REQUIRE_POSTGRES").is_some() => {
                panic!("MAILBRIDGE_REQUIRE_POSTGRES is set but {why}")
            }
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

/// A TCP relay in front of the provider's token endpoint that can hold
/// new connections (accepted, never forwarded): a token request caught in
/// the middle, before the provider saw it.
struct TokenRelay {
    addr: SocketAddr,
    hold: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
}

impl TokenRelay {
    async fn start(upstream: SocketAddr) -> TokenRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let (h, n) = (hold.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if h.load(Ordering::SeqCst) {
                    n.fetch_add(1, Ordering::SeqCst);
                    // Kept open, read and dropped: never forwarded.
                    tokio::spawn(async move {
                        let mut sink = tokio::io::sink();
                        let _ = tokio::io::copy(&mut client, &mut sink).await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                    let _ = client.shutdown().await;
                });
            }
        });
        TokenRelay { addr, hold, held }
    }
}

/// The sandbox upstreams, the database, and the config files of two
/// instances (each its own state directory and ports, one database).
struct World {
    provider: Provider,
    imap: ImapServer,
    pop3: Pop3Server,
    smtp: SmtpServer,
    _pki: TestPki,
    dir: PathBuf,
    configs: Vec<PathBuf>,
    /// Per instance: IMAP, POP3, SMTP listeners.
    addrs: Vec<[SocketAddr; 3]>,
    /// Between the instances and the token endpoint, when asked for.
    relay: Option<TokenRelay>,
}

impl World {
    /// With `relay`, the instances reach the token endpoint through a
    /// [`TokenRelay`].
    async fn new(pg: &Pg, tag: &str, instances: usize, relay: bool) -> World {
        World::build(pg, tag, instances, relay, false).await
    }

    /// With `spooling`, service key mode and a spooling device (mfp, from
    /// 127.0.0.2, sending as alice) on every instance, the spool in the
    /// database (its default with a database store), retries every second.
    async fn build(pg: &Pg, tag: &str, instances: usize, relay: bool, spooling: bool) -> World {
        let pki = TestPki::generate();
        let provider = Provider::start(ProviderOptions::default()).await.unwrap();
        let relay = match relay {
            true => {
                let addr = provider
                    .base_url()
                    .trim_start_matches("http://")
                    .parse()
                    .unwrap();
                Some(TokenRelay::start(addr).await)
            }
            false => None,
        };
        let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let pop3 = Pop3Server::start(Pop3ServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let smtp = SmtpServer::start(SmtpServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        imap.append(USER, "INBOX", MESSAGE.to_vec());
        imap.append(BOB, "INBOX", MESSAGE.to_vec());
        let dir = temp_dir(tag);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let pw = dir.join("db-password");
        std::fs::write(&pw, format!("{DB_PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pw, perms(0o600)).unwrap();
        let key = dir.join("service.key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, perms(0o600)).unwrap();
        let (server_extra, tail) = match spooling {
            true => (
                format!("key_mode = \"service\"\nkey_file = \"{}\"\n", key.display()),
                format!(
                    "\n[spool]\nretry_base_secs = 1\nretry_max_secs = 1\n\n[[device]]\nname = \"mfp\"\nfrom = [\"127.0.0.2\"]\naccount = \"{USER}\"\n"
                ),
            ),
            false => (String::new(), String::new()),
        };
        let token_url = match &relay {
            Some(r) => format!("http://{}/token", r.addr),
            None => provider.token_url(),
        };
        let mut configs = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..instances {
            let ports = [
                free_port_on(INSTANCE_IP),
                free_port_on(INSTANCE_IP),
                free_port_on(INSTANCE_IP),
            ];
            let text = format!(
                r#"
[server]
state_dir = "{state}"
store = "{url}"
store_password_file = "{pw}"
kdf_memory_kib = 256
kdf_iterations = 1
backoff_base_ms = 60000
backoff_max_secs = 120
{server_extra}
[[listener]]
protocol = "imap"
bind = "{ip}:{p0}"

[[listener]]
protocol = "pop3"
bind = "{ip}:{p1}"

[[listener]]
protocol = "smtp"
bind = "{ip}:{p2}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "localhost", port = {imap_port}, tls = "implicit" }}
pop3 = {{ host = "localhost", port = {pop3_port}, tls = "implicit" }}
smtp = {{ host = "localhost", port = {smtp_port}, tls = "starttls" }}

[[account]]
user = "{USER}"
provider = "sandbox"

[[account]]
user = "{BOB}"
provider = "sandbox"
{tail}"#,
                state = dir.join(format!("state-{i}")).display(),
                url = pg.url(),
                pw = pw.display(),
                ip = INSTANCE_IP,
                p0 = ports[0],
                p1 = ports[1],
                p2 = ports[2],
                ca = ca.display(),
                imap_port = imap.addr().port(),
                pop3_port = pop3.addr().port(),
                smtp_port = smtp.addr().port(),
            );
            let path = dir.join(format!("mailbridge-{i}.toml"));
            std::fs::write(&path, text).unwrap();
            configs.push(path);
            addrs.push(ports.map(|p| SocketAddr::from((INSTANCE_IP, p))));
        }
        World {
            provider,
            imap,
            pop3,
            smtp,
            _pki: pki,
            dir,
            configs,
            addrs,
            relay,
        }
    }

    /// `mailbridge ARGS --config CONFIG` with `stdin`; (success, stdout,
    /// stderr).
    fn cli(&self, instance: usize, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--config", self.configs[instance].to_str().unwrap()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `account import` of a new grant for `user` into the database.
    fn import(&self, user: &str, password: &str) -> String {
        let token = self.provider.issue_refresh_token(user, "mail");
        let (ok, out, err) = self.cli(
            0,
            &[
                "account",
                "import",
                user,
                "--refresh-token-stdin",
                "--password-stdin",
            ],
            &format!("{token}\n{password}\n"),
        );
        assert!(ok, "account import: {out}{err}");
        token
    }

    /// `mailbridge run` for instance `i`, listening.
    async fn start(&self, i: usize) -> Running {
        let mut child = Reaper(
            Command::new(BIN)
                .args(["run", "--config", self.configs[i].to_str().unwrap()])
                .env("MAILBRIDGE_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut up = false;
        for _ in 0..1000 {
            if tokio::net::TcpStream::connect(self.addrs[i][0])
                .await
                .is_ok()
            {
                up = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let running = Running { child, logs };
        assert!(
            up,
            "mailbridge run did not start listening: {}",
            running.text()
        );
        running
    }

    /// No log line of `runs` holds the database password or any token the
    /// provider issued; nor does the database.
    fn assert_no_secrets(&self, pg: &Pg, runs: &[&Running]) {
        let tokens = self.provider.issued_tokens();
        assert!(!tokens.is_empty());
        let db = pg.psql(
            "SELECT record::text FROM mailbridge_grants UNION ALL SELECT meta::text FROM mailbridge_meta",
        );
        assert!(!db.is_empty());
        for t in &tokens {
            assert!(!db.contains(t.as_str()), "a token in clear in the database");
        }
        for r in runs {
            let text = r.text();
            assert!(
                !text.contains(DB_PASSWORD),
                "the database password in a log"
            );
            for t in &tokens {
                assert!(!text.contains(t.as_str()), "a token in a log");
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.imap.shutdown();
        self.pop3.shutdown();
        self.smtp.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Running {
    child: Reaper,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// IMAP LOGIN and the tagged reply; on success the mailbox is read and
/// the session logged out.
async fn imap_login(addr: SocketAddr, user: &str, password: &str) -> String {
    imap_login_from("127.0.0.1", addr, user, password).await
}

async fn imap_login_from(from: &str, addr: SocketAddr, user: &str, password: &str) -> String {
    let mut c = Client::plain_from(from, addr).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let r = c
        .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
        .await;
    let reply = r.last().cloned().unwrap_or_default();
    if reply.starts_with("a1 OK") {
        let s = c.cmd("s1", "SELECT INBOX").await;
        assert!(s.last().unwrap().starts_with("s1 OK"), "{s:?}");
        c.cmd("z", "LOGOUT").await;
    }
    reply
}

async fn pop3_login(addr: SocketAddr, user: &str, password: &str) -> String {
    let mut c = Client::plain(addr).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    c.send(format!("USER {user}\r\n").as_bytes()).await;
    let r = c.line().await;
    assert!(r.starts_with("+OK"), "{r}");
    c.send(format!("PASS {password}\r\n").as_bytes()).await;
    c.line().await
}

async fn smtp_login(addr: SocketAddr, user: &str, password: &str) -> String {
    let mut c = Client::plain(addr).await;
    let greeting = c.smtp_reply().await;
    assert!(greeting[0].starts_with("220 "), "{greeting:?}");
    c.send(b"EHLO client.example\r\n").await;
    let r = c.smtp_reply().await;
    assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.smtp(&format!("AUTH PLAIN {plain}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_logins_on_two_instances_cause_one_refresh() {
    let pg = pg_or_skip!("pg-fifty");
    let w = World::new(&pg, "pg-fifty", 2, false).await;
    // Account commands work on the database with no instance running.
    w.import(USER, PASSWORD);
    let (ok, out, err) = w.cli(1, &["account", "list"], "");
    assert!(ok && out.contains(USER), "account list: {out}{err}");
    assert_eq!(
        pg.psql("SELECT max(version) FROM mailbridge_schema_version")
            .trim(),
        mailbridge::store::postgres::SCHEMA_VERSION.to_string()
    );
    let a = w.start(0).await;
    let b = w.start(1).await;
    let before = w.provider.refresh_requests();

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = w.addrs[i % 2][0];
        tasks.push(tokio::spawn(async move {
            imap_login(addr, USER, PASSWORD).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.starts_with("a1 OK"), "{r}");
    }
    let elapsed = t0.elapsed();
    let refreshes = w.provider.refresh_requests() - before;
    println!(
        "50 logins over 2 instances: {refreshes} refresh at the provider, {} ms in all",
        elapsed.as_millis()
    );
    assert_eq!(refreshes, 1, "{}\n---\n{}", a.text(), b.text());
    assert_eq!(w.provider.refresh_token_replays(), 0);
    let shared = format!("{}\n{}", a.text(), b.text());
    assert!(
        shared.contains("access token taken from the shared store"),
        "{shared}"
    );

    // Account commands work on the database while instances run, and
    // what they write reaches every instance at its next login.
    let (ok, out, err) = w.cli(0, &["account", "list"], "");
    assert!(ok && out.contains(USER), "account list: {out}{err}");
    const NEW: &str = "a new local password";
    let (ok, out, err) = w.cli(
        1,
        &["account", "passwd", USER, "--password-stdin"],
        &format!("{PASSWORD}\n{NEW}\n"),
    );
    assert!(ok, "account passwd: {out}{err}");
    for (i, addrs) in w.addrs.iter().enumerate() {
        // The old password from addresses of their own (a failure delays
        // its address).
        let from = format!("127.0.0.{}", 20 + i);
        let r = imap_login_from(&from, addrs[0], USER, PASSWORD).await;
        assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
        let r = imap_login(addrs[0], USER, NEW).await;
        assert!(r.starts_with("a1 OK"), "{r}");
    }
    // The grant itself did not change: no refresh for that.
    assert_eq!(w.provider.refresh_requests() - before, 1);
    w.assert_no_secrets(&pg, &[&a, &b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_the_middle_of_a_refresh_leaves_the_grant_to_the_other_instance() {
    let pg = pg_or_skip!("pg-kill");
    let w = World::new(&pg, "pg-kill", 2, true).await;
    let relay = w.relay.as_ref().unwrap();
    let token = w.import(USER, PASSWORD);

    let mut a = w.start(0).await;
    let b = w.start(1).await;
    // A's refresh is caught on its way to the provider.
    relay.hold.store(true, Ordering::SeqCst);
    let a_addr = w.addrs[0][0];
    let a_login = tokio::spawn(async move { imap_login(a_addr, USER, PASSWORD).await });
    let mut caught = false;
    for _ in 0..1000 {
        if relay.held.load(Ordering::SeqCst) > 0 {
            caught = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(caught, "A's token request never came: {}", a.text());
    // B wants a token too: it waits for A's lock.
    let b_addr = w.addrs[1][0];
    let b_login = tokio::spawn(async move { imap_login(b_addr, USER, PASSWORD).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_login.is_finished(), "B did not wait for A's refresh");
    assert_eq!(
        relay.held.load(Ordering::SeqCst),
        1,
        "B refreshed beside A: {}",
        b.text()
    );
    // New token requests pass again (A's stays held) before A dies: once
    // A is gone B's request can come at once, and must not be held too.
    relay.hold.store(false, Ordering::SeqCst);
    let t0 = Instant::now();
    a.kill9();
    let r = tokio::time::timeout(WAIT, b_login).await.unwrap().unwrap();
    println!(
        "B logged in {} ms after A was killed",
        t0.elapsed().as_millis()
    );
    assert!(r.starts_with("a1 OK"), "{r}\n{}", b.text());
    let _ = a_login.await;
    assert_eq!(w.provider.refresh_token_replays(), 0);
    assert!(
        !w.provider.refresh_token_is_live(&token),
        "B refreshed with the stored token"
    );
    // B keeps serving, and the grant in the database is the live one.
    let r = imap_login(b_addr, USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    w.assert_no_secrets(&pg, &[&b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_gives_temporary_errors_and_logins_recover() {
    let pg = pg_or_skip!("pg-restart");
    let w = World::new(&pg, "pg-restart", 1, false).await;
    w.import(USER, PASSWORD);
    w.import(BOB, BOB_PASSWORD);
    let a = w.start(0).await;
    let [imap, pop3, smtp] = w.addrs[0];
    let r = imap_login(imap, USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");

    pg.down();
    // A login whose password and token this instance holds goes on.
    let r = imap_login(imap, USER, PASSWORD).await;
    assert!(
        r.starts_with("a1 OK"),
        "cached login while the database is down: {r}"
    );
    // One that needs the database is told to come back later.
    let r = imap_login(imap, BOB, BOB_PASSWORD).await;
    assert!(r.starts_with("a1 NO [UNAVAILABLE]"), "{r}");
    let r = pop3_login(pop3, BOB, BOB_PASSWORD).await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    let r = smtp_login(smtp, BOB, BOB_PASSWORD).await;
    assert!(r.starts_with("454"), "{r}");
    assert!(
        a.text().contains("token store database unreachable"),
        "{}",
        a.text()
    );

    pg.up();
    // The same process serves bob once the database is back.
    let t0 = Instant::now();
    let mut last = String::new();
    for _ in 0..50 {
        last = imap_login(imap, BOB, BOB_PASSWORD).await;
        if last.starts_with("a1 OK") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(last.starts_with("a1 OK"), "after the restart: {last}");
    println!(
        "bob logged in {} ms after the database was back",
        t0.elapsed().as_millis()
    );
    let r = pop3_login(pop3, BOB, BOB_PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert_eq!(w.provider.refresh_token_replays(), 0);
    w.assert_no_secrets(&pg, &[&a]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_logins_delay_the_address_on_every_instance() {
    let pg = pg_or_skip!("pg-backoff");
    let w = World::new(&pg, "pg-backoff", 2, false).await;
    w.import(USER, PASSWORD);
    let a = w.start(0).await;
    let b = w.start(1).await;
    let [a_imap, b_imap] = [w.addrs[0][0], w.addrs[1][0]];
    let r = imap_login_from("127.0.0.7", a_imap, USER, "not the password").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    // The same address, the right password, the other instance: it
    // waits as it would on the first (a minute after one failure).
    let r = imap_login_from("127.0.0.7", b_imap, USER, PASSWORD).await;
    assert!(
        r.starts_with("a1 NO") && r.contains("too many failed logins"),
        "{r}"
    );
    // Another address is not delayed for alice.
    let r = imap_login_from("127.0.0.8", b_imap, USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    // The database keeps counters under hashes, not names or addresses.
    let keys = pg.psql("SELECT key, count FROM mailbridge_backoff");
    assert!(!keys.is_empty(), "no shared counter");
    assert!(
        !keys.contains("alice") && !keys.contains("127.0.0.7"),
        "{keys}"
    );
    w.assert_no_secrets(&pg, &[&a, &b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_migrate_moves_a_sled_store_into_the_database() {
    let pg = pg_or_skip!("pg-migrate");
    let w = World::new(&pg, "pg-migrate", 1, false).await;
    // The same config without `store`: the sled store in the state
    // directory, filled by the account commands.
    let shared = std::fs::read_to_string(&w.configs[0]).unwrap();
    let sled: String = shared
        .lines()
        .filter(|l| !l.starts_with("store = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&w.configs[0], &sled).unwrap();
    w.import(USER, PASSWORD);
    w.import(BOB, BOB_PASSWORD);
    let url = pg.url();
    let (ok, out, err) = w.cli(0, &["store", "migrate", "--to", &url], "");
    assert!(ok, "store migrate: {out}{err}");
    assert!(out.contains("copied 2 grant(s)"), "{out}");
    assert!(!out.contains(DB_PASSWORD) && !err.contains(DB_PASSWORD));
    // Again: nothing to do, nothing overwritten.
    let (ok, out, err) = w.cli(0, &["store", "migrate", "--to", &url], "");
    assert!(
        ok && out.contains("copied 0 grant(s)") && out.contains("2 already there"),
        "{out}{err}"
    );

    // The instance on the database serves both accounts.
    std::fs::write(&w.configs[0], &shared).unwrap();
    let (ok, out, err) = w.cli(0, &["account", "list"], "");
    assert!(ok && out.contains(USER) && out.contains(BOB), "{out}{err}");
    let a = w.start(0).await;
    let r = imap_login(w.addrs[0][0], USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let r = imap_login(w.addrs[0][0], BOB, BOB_PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    // Removal works against the database while the instance runs.
    let (ok, out, err) = w.cli(0, &["account", "remove", BOB], "");
    assert!(ok, "{out}{err}");
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM mailbridge_grants WHERE account = '{BOB}'"
        ))
        .trim(),
        "0"
    );
    w.assert_no_secrets(&pg, &[&a]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_is_reached_over_verified_tls() {
    let db_pki = TestPki::generate();
    let pg = pg_or_skip!("pg-tls", Some(&db_pki));
    let w = World::new(&pg, "pg-tls", 1, false).await;
    let db_ca = w.dir.join("db-ca.pem");
    std::fs::write(&db_ca, &db_pki.ca_pem).unwrap();
    let plain = std::fs::read_to_string(&w.configs[0]).unwrap();
    let with = |ca: &Path| {
        plain.replace(
            &format!("store = \"{}\"", pg.url()),
            &format!(
                "store = \"postgres://mb@localhost:{}/postgres?sslmode=require\"\nstore_ca_file = \"{}\"",
                pg.port,
                ca.display()
            ),
        )
    };
    // A CA that did not sign the database's certificate: refused.
    std::fs::write(&w.configs[0], with(&w.dir.join("ca.pem"))).unwrap();
    let (ok, out, err) = w.cli(0, &["account", "list"], "");
    assert!(!ok, "an unverified database was used: {out}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // The right CA.
    std::fs::write(&w.configs[0], with(&db_ca)).unwrap();
    w.import(USER, PASSWORD);
    let a = w.start(0).await;
    let r = imap_login(w.addrs[0][0], USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let tls = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
         WHERE application_name = 'mailbridge' AND ssl",
    );
    assert!(tls.trim().parse::<u32>().unwrap() >= 1, "{tls}");
    let clear = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
         WHERE application_name = 'mailbridge' AND NOT ssl",
    );
    assert_eq!(clear.trim(), "0");
    w.assert_no_secrets(&pg, &[&a]);
}

/// Sends one message as the device (from 127.0.0.2) to `addr`; the queue
/// id from the `250`.
async fn device_send(addr: SocketAddr, subject: &str) -> String {
    let reply = Client::device_message("127.0.0.2", addr, USER, subject).await;
    assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
    reply.rsplit(' ').next().unwrap().to_string()
}

/// Waits (bounded) until `running`'s log says its start-up refresh is
/// done: a `kill -9` before that could fall in the one window nobody can
/// close (the rotated token on its way), which is not what these tests are
/// about.
async fn refreshed(running: &Running) {
    for _ in 0..2000 {
        if running.text().contains("background refresh done") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no start-up refresh: {}", running.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_accepted_by_a_killed_instance_is_delivered_by_the_other() {
    let pg = pg_or_skip!("pg-spool");
    let w = World::build(&pg, "pg-spool", 2, false, true).await;
    w.import(USER, PASSWORD);
    // A message left in the spool on disk from before the move to the
    // database: A takes it over at start.
    let left = mailbridge::spool::Spool::open(&w.dir.join("state-0").join("spool"))
        .unwrap()
        .store(
            USER,
            "mfp",
            "127.0.0.2",
            false,
            &mailbridge_proto::Message {
                from: USER.into(),
                recipients: vec!["office@x.example".into()],
                data: b"Subject: left on disk\r\n\r\nscan\r\n".to_vec(),
                smtputf8: false,
                eight_bit: false,
                client_name: None,
            },
        )
        .unwrap();
    w.smtp.set_down(true);
    let mut a = w.start(0).await;
    let b = w.start(1).await;
    refreshed(&a).await;
    refreshed(&b).await;

    // A accepts the message (committed to the database before the 250),
    // cannot deliver it (the server is down), and dies.
    let id = device_send(w.addrs[0][2], "accepted by A").await;
    let (ok, out, err) = w.cli(1, &["queue", "list"], "");
    assert!(
        ok && out.contains(&id) && out.contains("queued"),
        "{out}{err}"
    );
    assert!(out.contains(&left.id), "taken over from the disk: {out}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM mailbridge_spool WHERE area = 'queue'")
            .trim(),
        "2"
    );
    assert!(
        std::fs::read_dir(w.dir.join("state-0/spool/queue"))
            .unwrap()
            .next()
            .is_none(),
        "the disk's copy removed"
    );
    a.kill9();

    // B delivers it once the server is back.
    w.smtp.set_down(false);
    let t0 = Instant::now();
    while w.smtp.message_count() < 2 && t0.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "delivered by B {} ms after the server came back",
        t0.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = subjects(&w.smtp);
    got.sort();
    assert_eq!(got, ["accepted by A", "left on disk"], "{}", b.text());
    let (ok, out, err) = w.cli(1, &["queue", "list"], "");
    assert!(ok && out.contains("the spool is empty"), "{out}{err}");

    // Both alive: messages accepted by either go out exactly once (an
    // instance sends only what it holds the claim of).
    let a = w.start(0).await;
    refreshed(&a).await;
    w.smtp.set_down(true);
    let n = 10;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(device_send(w.addrs[i % 2][2], &format!("m{i}")).await);
    }
    // `queue retry` works on the database while both run (and the
    // message still goes out once).
    let (ok, out, err) = w.cli(0, &["queue", "retry", &ids[0]], "");
    assert!(
        ok && out.contains("queued for delivery to office@x.example"),
        "{out}{err}"
    );
    // `queue delete` works on the database while both run.
    let doomed = device_send(w.addrs[0][2], "deleted").await;
    let (ok, out, err) = w.cli(1, &["queue", "delete", &doomed], "");
    assert!(ok && out.contains("deleted"), "{out}{err}");
    w.smtp.set_down(false);
    let t0 = Instant::now();
    while w.smtp.message_count() < n + 2 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = subjects(&w.smtp);
    got.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.push("accepted by A".into());
    want.push("left on disk".into());
    want.sort();
    assert_eq!(got, want, "each once\nA: {}\nB: {}", a.text(), b.text());
    let sent_by = |r: &Running| r.text().matches("delivered").count();
    println!(
        "{n} messages on two instances: A delivered {}, B {}",
        sent_by(&a),
        sent_by(&b)
    );
    assert_eq!(pg.psql("SELECT count(*) FROM mailbridge_spool").trim(), "0");
    // The database down: the device hears 452 (try later), never a 250;
    // back up, the same processes accept again.
    pg.down();
    let reply = Client::device_message(
        "127.0.0.2",
        w.addrs[1][2],
        USER,
        "while the database is down",
    )
    .await;
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    pg.up();
    let mut accepted = None;
    for _ in 0..50 {
        let reply = Client::device_message("127.0.0.2", w.addrs[1][2], USER, "after").await;
        if reply.starts_with("250") {
            accepted = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(accepted.is_some(), "no 250 after the database came back");
    // The database holds no token, and no log a password or token.
    w.assert_no_secrets(&pg, &[&a, &b]);
}
