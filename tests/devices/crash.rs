//! Point 2 through the binary: `kill -9` after the `250` and during
//! delivery; `mailbridge queue list | retry | delete` while it runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Client, PASSWORD, USER, temp_dir};
use mailbridge::config::Settings;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SledStore, TokenStore};
use mailbridge_sandbox::{Provider, ProviderOptions, SmtpServer, SmtpServerOptions, TestPki};
use secrecy::SecretString;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");

struct World {
    provider: Provider,
    smtp: SmtpServer,
    _pki: TestPki,
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
}

/// Kills the child when dropped (a failing test leaves no process).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl World {
    async fn new(tag: &str) -> World {
        use std::os::unix::fs::PermissionsExt;
        let pki = TestPki::generate();
        let provider = Provider::start(ProviderOptions::default()).await.unwrap();
        let smtp = SmtpServer::start(SmtpServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let dir = temp_dir(tag);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let key = dir.join("service.key");
        std::fs::write(&key, [9u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("mailbridge.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
state_dir = "{state}"
key_mode = "service"
key_file = "{key}"
kdf_memory_kib = 256
kdf_iterations = 1

[spool]
retry_base_secs = 1
retry_max_secs = 1

[[listener]]
protocol = "smtp"
bind = "127.0.0.1:{port}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
smtp = {{ host = "localhost", port = {smtp_port}, tls = "starttls" }}

[[account]]
user = "{USER}"
provider = "sandbox"

[[device]]
name = "mfp"
from = ["127.0.0.2"]
account = "{USER}"
"#,
                state = dir.join("state").display(),
                key = key.display(),
                token_url = provider.token_url(),
                ca = ca.display(),
                smtp_port = smtp.addr().port(),
            ),
        )
        .unwrap();
        let w = World {
            provider,
            smtp,
            _pki: pki,
            dir,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let settings = Settings::load(&w.config).unwrap();
        let store: Arc<dyn TokenStore> =
            Arc::new(SledStore::open(&settings.server.state_dir()).unwrap());
        let vault = mailbridge::server::vault_for(&settings, store).unwrap();
        vault
            .create(
                USER,
                &SecretString::from(PASSWORD),
                GrantData {
                    refresh_token: Some(SecretString::from(
                        w.provider.issue_refresh_token(USER, "mail"),
                    )),
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
        w
    }

    /// Starts `mailbridge run` and returns once it listens and its
    /// start-up refresh (service key mode) has saved the rotated refresh
    /// token. A `kill -9` between the provider's rotation and that save
    /// is the window nobody can close (tests/grant_survival.rs measures
    /// it); these tests are about the spool, so their kills come after.
    async fn start(&self) -> Running {
        let log = self.dir.join("run.log");
        let refreshes_before = self.log_count("background refresh done");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("MAILBRIDGE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let running = Running(child);
        let t0 = Instant::now();
        let mut listening = false;
        while t0.elapsed() < Duration::from_secs(20) {
            listening = listening || tokio::net::TcpStream::connect(self.addr).await.is_ok();
            if listening && self.log_count("background refresh done") > refreshes_before {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "mailbridge run did not start (listening: {listening}); its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Lines of the service's log (all runs) that contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(self.dir.join("run.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn queue(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("queue")
            .args(args)
            .args(["--config", self.config.to_str().unwrap()])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "queue {args:?}: {text}");
        text
    }

    fn spool(&self) -> PathBuf {
        self.dir.join("state").join("spool")
    }

    /// Sends one message as the device; the queue id from the `250`.
    async fn send(&self, subject: &str) -> String {
        let reply = Client::device_message("127.0.0.2", self.addr, USER, subject).await;
        assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
        reply.rsplit(' ').next().unwrap().to_string()
    }

    fn subjects(&self) -> Vec<String> {
        crate::common::subjects(&self.smtp)
    }

    async fn wait_delivered(&self, n: usize, limit: Duration) {
        let t0 = Instant::now();
        while self.smtp.message_count() < n && t0.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cleanup(&self) {
        self.smtp.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_250_loses_nothing_and_the_queue_is_managed_live() {
    let w = World::new("dev-kill").await;
    w.smtp.set_down(true);
    let mut running = w.start().await;
    let first = w.send("first").await;
    // kill -9 right after the 250.
    drop(running);
    assert_eq!(
        files(&w.spool().join("queue")),
        2,
        "envelope and content on disk"
    );

    running = w.start().await;
    // While it runs (the server still down): list, retry, delete.
    let second = w.send("second").await;
    let list = w.queue(&["list"]);
    println!("{list}");
    assert!(list.contains(&first) && list.contains(&second), "{list}");
    assert!(list.contains("queued"), "{list}");
    println!("{}", w.queue(&["delete", &second]));
    assert!(!w.queue(&["list"]).contains(&second));
    w.smtp.set_down(false);
    println!("{}", w.queue(&["retry", &first]));
    w.wait_delivered(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        w.subjects(),
        ["first"],
        "delivered once; the deleted one never"
    );
    assert!(w.queue(&["list"]).contains("the spool is empty"));
    drop(running);
    w.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_sends_each_message_at_least_once() {
    let w = World::new("dev-kill-loop").await;
    w.smtp.set_down(true);
    let running = w.start().await;
    let n = 12;
    for i in 0..n {
        w.send(&format!("m{i}")).await;
    }
    drop(running);
    w.smtp.set_down(false);
    // Restart and kill at varying moments while the queue drains.
    let mut kills = 0;
    for round in 0..8u64 {
        if w.smtp.message_count() >= n {
            break;
        }
        let running = w.start().await;
        tokio::time::sleep(Duration::from_millis(40 + 60 * round)).await;
        drop(running);
        kills += 1;
    }
    let running = w.start().await;
    let t0 = Instant::now();
    let mut unique;
    loop {
        let mut s = w.subjects();
        s.sort();
        s.dedup();
        unique = s.len();
        if unique >= n || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = w.subjects();
    let duplicates = all.len() - unique;
    println!(
        "{n} messages, {kills} kill -9 during delivery: {} deliveries, {unique} distinct, {duplicates} sent twice (a kill between the server's 250 and the spool's update)",
        all.len()
    );
    assert_eq!(unique, n, "every message arrived: {all:?}");
    assert_eq!(files(&w.spool().join("queue")), 0);
    drop(running);
    w.cleanup();
}
