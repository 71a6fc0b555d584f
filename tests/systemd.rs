//! systemd integration without systemd as PID 1: `mailbridge run` as a
//! child process with a `NOTIFY_SOCKET` this test owns (what it is told
//! at start, while serving, at a reload and at the drain; the watchdog),
//! and with listening sockets passed the socket-activation way
//! (`LISTEN_FDS`), by `systemd-socket-activate` and by a plain shell.

#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mailbridge::config::Settings;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SledStore, TokenStore};
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use secrecy::SecretString;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");

/// The sandbox provider and IMAP server, and a config for `mailbridge run`
/// with one IMAP listener on `addr` and alice's grant in its store.
struct World {
    provider: Provider,
    imap: ImapServer,
    _pki: TestPki,
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl World {
    async fn new(tag: &str) -> World {
        let pki = TestPki::generate();
        let provider = Provider::start(ProviderOptions::default()).await.unwrap();
        let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        imap.append(USER, "INBOX", MESSAGE.to_vec());
        let dir = temp_dir(tag);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("mailbridge.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
state_dir = "{state}"
kdf_memory_kib = 256
kdf_iterations = 1
backoff_base_ms = 1

[[listener]]
protocol = "imap"
bind = "{addr}"

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
                state = dir.join("state").display(),
                token_url = provider.token_url(),
                ca = ca.display(),
                imap_port = imap.addr().port(),
            ),
        )
        .unwrap();
        let w = World {
            provider,
            imap,
            _pki: pki,
            dir,
            config,
            addr,
        };
        w.seed().await;
        w
    }

    /// Alice's grant, sealed with her local password.
    async fn seed(&self) {
        let token = self.provider.issue_refresh_token(USER, "mail");
        let settings = Settings::load(&self.config).unwrap();
        let store: Arc<dyn TokenStore> =
            Arc::new(SledStore::open(&settings.server.state_dir()).unwrap());
        let vault = mailbridge::server::vault_for(&settings, store).unwrap();
        vault
            .create(
                USER,
                &SecretString::from(PASSWORD),
                GrantData {
                    refresh_token: Some(SecretString::from(token)),
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
    }

    /// `mailbridge run` with this config.
    fn run(&self) -> Command {
        let mut c = Command::new(BIN);
        c.args(["run", "--config", self.config.to_str().unwrap()])
            .env("MAILBRIDGE_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        c
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.imap.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running child and its standard error, read as it comes.
struct Running {
    child: Reaper,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = Reaper(
            command
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
        Running { child, logs }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig}");
    }

    fn text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    async fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.text().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The exit status, waiting up to `limit`.
    async fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "mailbridge did not exit within {limit:?}; its log:\n{}",
            self.text()
        );
    }
}

/// The notification socket: systemd's end of sd_notify(3).
struct Notes {
    socket: tokio::net::UnixDatagram,
    seen: Vec<String>,
    _path: Option<PathBuf>,
}

impl Notes {
    fn at(path: &Path) -> Notes {
        Notes {
            socket: tokio::net::UnixDatagram::bind(path).unwrap(),
            seen: Vec::new(),
            _path: Some(path.to_path_buf()),
        }
    }

    /// One in the abstract namespace; `NOTIFY_SOCKET` is `@name`.
    fn abstract_named(name: &str) -> Notes {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        Notes {
            socket: tokio::net::UnixDatagram::from_std(socket).unwrap(),
            seen: Vec::new(),
            _path: None,
        }
    }

    /// The next datagram holding the line `line`, waiting up to `limit`.
    async fn until(&mut self, line: &str, limit: Duration, run: &Running) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            let got = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await;
            let Ok(Ok(n)) = got else {
                panic!(
                    "no {line:?} within {limit:?}; datagrams so far: {:#?}\nmailbridge's log:\n{}",
                    self.seen,
                    run.text()
                );
            };
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            self.seen.push(text.clone());
            if text.lines().any(|l| l == line) {
                return text;
            }
        }
    }

    /// Datagrams arriving within `d`.
    async fn during(&mut self, d: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + d;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
            out.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        self.seen.extend(out.iter().cloned());
        out
    }
}

/// The value of `KEY=` in a datagram.
fn value<'a>(datagram: &'a str, key: &str) -> Option<&'a str> {
    datagram
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// LOGIN as alice, SELECT, LOGOUT; the tagged reply to LOGIN.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_hears_ready_status_watchdog_reload_and_stopping() {
    let w = World::new("notify").await;
    let path = w.dir.join("notify.sock");
    let mut notes = Notes::at(&path);
    let mut command = w.run();
    // A 300 ms watchdog: a ping every 150 ms.
    command
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "300000");
    let t0 = Instant::now();
    let mut run = Running::spawn(command);

    // READY=1 once the listener serves, with a status line.
    let ready = notes.until("READY=1", WAIT, &run).await;
    let started = t0.elapsed();
    assert_eq!(
        value(&ready, "STATUS"),
        Some("serving 0 session(s), 1 account(s) on 1 listener(s)"),
        "{ready}"
    );
    let mut c = Client::plain(w.addr).await;
    assert!(c.line().await.starts_with("* OK"), "served at READY=1");

    // The status line follows the sessions (looked at every 2 s and
    // with each watchdog ping).
    notes
        .until(
            "STATUS=serving 1 session(s), 1 account(s) on 1 listener(s)",
            Duration::from_secs(5),
            &run,
        )
        .await;

    // The watchdog: pings at half the period (150 ms; the bound leaves
    // room for a busy machine).
    let t1 = Instant::now();
    for _ in 0..3 {
        notes
            .until("WATCHDOG=1", Duration::from_secs(2), &run)
            .await;
    }
    let three = t1.elapsed();
    assert!(
        three < Duration::from_millis(1500),
        "three pings took {three:?}"
    );
    assert!(run.text().contains("systemd watchdog on"));

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1.
    run.signal("-HUP");
    let reloading = notes.until("RELOADING=1", WAIT, &run).await;
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let again = notes.until("READY=1", WAIT, &run).await;
    assert!(value(&again, "STATUS").unwrap().starts_with("serving "));
    assert!(run.wait_log("configuration reloaded", WAIT).await);

    // SIGTERM: STOPPING=1 as the drain begins, saying so.
    run.signal("-TERM");
    let stopping = notes.until("STOPPING=1", WAIT, &run).await;
    assert!(
        value(&stopping, "STATUS").is_some_and(|s| s.starts_with("draining")),
        "{stopping}"
    );
    drop(c);
    let status = run.exit_within(WAIT).await;
    assert!(status.success(), "{status:?}\n{}", run.text());
    println!("READY=1 after {started:?}; three watchdog pings in {three:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_an_abstract_socket_and_another_pids_watchdog_is_not_fed() {
    let w = World::new("notify-abstract").await;
    let name = format!("mailbridge-test-notify-{}", std::process::id());
    let mut notes = Notes::abstract_named(&name);
    let mut command = w.run();
    // The watchdog is meant for PID 1, not for mailbridge.
    command
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "100000")
        .env("WATCHDOG_PID", "1");
    let mut run = Running::spawn(command);
    notes.until("READY=1", WAIT, &run).await;
    let later = notes.during(Duration::from_millis(600)).await;
    assert!(
        !later.iter().any(|d| d.lines().any(|l| l == "WATCHDOG=1")),
        "{later:?}"
    );
    assert!(!run.text().contains("systemd watchdog on"));
    run.signal("-TERM");
    notes.until("STOPPING=1", WAIT, &run).await;
    assert!(run.exit_within(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activate_hands_over_the_listener() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        println!(
            "skipped: systemd-socket-activate is not installed (Debian: apt-get install systemd)"
        );
        return;
    }
    let w = World::new("socket-activate").await;
    let spare = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = w.dir.join("notify.sock");
    let mut notes = Notes::at(&path);
    let mut command = Command::new("systemd-socket-activate");
    // Its child gets only the variables named here.
    command
        .args(["-l", &w.addr.to_string(), "-l", &spare.to_string()])
        .args(["--fdname=imap:spare"])
        .args(["-E", "MAILBRIDGE_LOG=info", "-E", "NO_COLOR=1"])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", path.display()))
        .args([BIN, "run", "--config", w.config.to_str().unwrap()]);
    let mut run = Running::spawn(command);
    assert!(run.wait_log("Listening on", WAIT).await, "{}", run.text());
    // It starts mailbridge at the first connection, which waits in the
    // socket's queue meanwhile.
    let first = tokio::spawn(login(w.addr));
    notes.until("READY=1", WAIT, &run).await;
    let reply = first.await.unwrap();
    assert!(reply.starts_with("a1 OK"), "{reply}\n{}", run.text());
    let logs = run.text();
    // Had mailbridge bound the address itself, it would have failed: the
    // inherited socket holds it.
    assert!(
        logs.contains("listening on a socket from systemd") && logs.contains("socket=imap"),
        "{logs}"
    );
    // The socket no listener wants is closed, with a warning.
    assert!(
        logs.contains("matches no [[listener]]") && logs.contains("socket=spare"),
        "{logs}"
    );
    assert!(
        std::net::TcpStream::connect(spare).is_err(),
        "the unused socket was closed"
    );
    run.signal("-TERM");
    let status = run.exit_within(WAIT).await;
    assert!(status.success(), "{status:?}\n{}", run.text());
}

/// `mailbridge run` started by a shell that moves `socket` (handed to it
/// as standard input) to descriptor 3 and sets `LISTEN_FDS=1` and
/// `LISTEN_PID` to `listen_pid` (`$$` is the shell, which `exec` turns
/// into mailbridge): socket activation as sd_listen_fds(3) describes it,
/// with no unsafe code in the test.
fn run_with_fd3(w: &World, socket: std::net::TcpListener, listen_pid: &str) -> Running {
    let script = format!(
        r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID={listen_pid} LISTEN_FDNAMES=mailbridge.socket exec "$0" run --config "$1""#
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &script, BIN, w.config.to_str().unwrap()])
        .env("MAILBRIDGE_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(socket)));
    Running::spawn(sh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_fds_are_used_when_listen_pid_is_ours_only() {
    let w = World::new("listen-fds").await;
    let socket = std::net::TcpListener::bind(w.addr).unwrap();
    let mut run = run_with_fd3(&w, socket, "$$");
    // Queued by the kernel until mailbridge accepts on the socket it got.
    let reply = login(w.addr).await;
    assert!(reply.starts_with("a1 OK"), "{reply}\n{}", run.text());
    let logs = run.text();
    assert!(
        logs.contains("listening on a socket from systemd")
            && logs.contains("socket=mailbridge.socket"),
        "{logs}"
    );
    run.signal("-TERM");
    let status = run.exit_within(WAIT).await;
    assert!(status.success(), "{status:?}\n{}", run.text());

    // LISTEN_PID names another process: the descriptor is not taken, so
    // mailbridge binds the address itself, which the socket still holds.
    let socket = std::net::TcpListener::bind(w.addr).unwrap();
    let mut run = run_with_fd3(&w, socket, "1");
    let status = run.exit_within(WAIT).await;
    let logs = run.text();
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("cannot listen on"), "{logs}");
    assert!(!logs.contains("from systemd"), "{logs}");
}
