//! mailbridge as a process of its own: the generated config, the sealed
//! grants (through `mailbridge account import`), `mailbridge run`, its
//! memory and open files, and stopping it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mailbridge_bench::worker::{Job, Reply};

/// The binary cargo built for this benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_mailbridge-bench-target");

/// A running `mailbridge run`.
pub struct Mailbridge {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    /// Its IMAP listener.
    pub imap: SocketAddr,
    /// Its SMTP listener.
    pub smtp: SocketAddr,
}

/// The soft open-files limit of process `pid`.
pub fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A free loopback port (bound and released; good enough on a quiet box).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Seals `refresh_token` for `user` under `password` with the real CLI.
pub fn import(
    config: &Path,
    user: &str,
    refresh_token: &str,
    password: &str,
) -> anyhow::Result<()> {
    let mut child = Command::new(BIN)
        .args(["account", "import", user, "--config"])
        .arg(config)
        .args(["--refresh-token-stdin", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {BIN}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(format!("{refresh_token}\n{password}\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "mailbridge account import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The shipped unit, systemd/mailbridge.service, whose `Environment=`
/// lines the benchmark gives mailbridge too: it measures mailbridge as a
/// gateway runs it (the allocator's settings are there; see
/// docs/PERFORMANCE.md, "Memory after 10,000 sessions close").
pub const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../systemd/mailbridge.service"
);

/// The unit's `Environment=KEY=VALUE` assignments, except those this
/// process's own environment sets (so that an experiment can override
/// them: `GLIBC_TUNABLES=... cargo bench ...`).
pub fn unit_environment() -> Vec<(String, String)> {
    let unit = std::fs::read_to_string(UNIT).unwrap_or_default();
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix("Environment="))
        .filter_map(|assignment| {
            let (key, value) = assignment.split_once('=')?;
            Some((key.trim().to_string(), value.trim().to_string()))
        })
        .filter(|(key, _)| std::env::var_os(key).is_none())
        .collect()
}

impl Mailbridge {
    /// Starts `mailbridge run --config config`, logging to `log`, and waits
    /// until its IMAP listener answers.
    pub async fn start(
        config: &Path,
        log: &Path,
        imap: SocketAddr,
        smtp: SocketAddr,
    ) -> anyhow::Result<Mailbridge> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .envs(unit_environment())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {BIN}"))?;
        let mut mb = Mailbridge {
            child,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            imap,
            smtp,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(imap).await.is_ok() {
                return Ok(mb);
            }
            if let Some(status) = mb.child.try_wait()? {
                bail!(
                    "mailbridge run exited ({status}); its log is {}",
                    mb.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("mailbridge run did not listen on {imap} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        Ok(mailbridge_bench::procfs::rss_kib(self.pid())?)
    }

    /// Anonymous resident memory (heap and stacks), KiB.
    pub fn rss_anon_kib(&self) -> anyhow::Result<u64> {
        Ok(mailbridge_bench::procfs::rss_anon_kib(self.pid())?)
    }

    /// Anonymous memory split into heap and thread stacks.
    pub fn anon_split(&self) -> anyhow::Result<mailbridge_bench::procfs::AnonSplit> {
        Ok(mailbridge_bench::procfs::anon_split(self.pid())?)
    }

    /// Threads.
    pub fn threads(&self) -> anyhow::Result<u64> {
        Ok(mailbridge_bench::procfs::threads(self.pid())?)
    }

    /// Open file descriptors.
    pub fn open_files(&self) -> usize {
        mailbridge_bench::procfs::open_files(self.pid()).unwrap_or(0)
    }

    /// The soft open-files limit the process runs with.
    pub fn open_files_limit(&self) -> Option<u64> {
        open_files_limit(self.pid())
    }

    /// Waits until at most `files` descriptors are open (sessions closed).
    pub async fn settle(&self, files: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.open_files() <= files {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// A fresh process on the same config and store.
    pub async fn restart(self) -> anyhow::Result<Mailbridge> {
        let (config, log, imap, smtp) =
            (self.config.clone(), self.log.clone(), self.imap, self.smtp);
        self.stop().await?;
        Mailbridge::start(&config, &log, imap, smtp).await
    }
}

impl Drop for Mailbridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The client process: this benchmark's own executable with
/// `--client-worker`, driven with JSON lines (see `mailbridge_bench::worker`).
pub struct Clients {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Clients {
    /// Starts the worker.
    pub fn start() -> anyhow::Result<Clients> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("--client-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the client process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("worker stdout")?);
        Ok(Clients {
            child,
            stdin,
            stdout,
        })
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one job and waits for its reply. The wait blocks this thread
    /// only: the sandbox servers keep running on the others.
    pub fn call(&mut self, job: &Job) -> anyhow::Result<Reply> {
        use std::io::BufRead;
        tokio::task::block_in_place(|| {
            let mut line = serde_json::to_string(job)?;
            line.push('\n');
            self.stdin.write_all(line.as_bytes())?;
            self.stdin.flush()?;
            let mut answer = String::new();
            if self.stdout.read_line(&mut answer)? == 0 {
                bail!("the client process exited");
            }
            match serde_json::from_str(&answer)? {
                Reply::Failed { error } => bail!("client process: {error}"),
                reply => Ok(reply),
            }
        })
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare TCP forwarder in a process of its own (this executable with
/// `--forwarder HOST:PORT [DELAY_MS]`): the cost of one more hop and
/// nothing else, or, with a delay, a long-distance link.
pub struct Forwarder {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Forwarder {
    /// Starts a forwarder to `target` and reads its port.
    pub fn start(target: SocketAddr) -> anyhow::Result<Forwarder> {
        Forwarder::start_delayed(target, Duration::ZERO)
    }

    /// Starts a forwarder to `target` that holds every byte for `delay`
    /// in each direction (a round trip of twice that), and reads its port.
    pub fn start_delayed(target: SocketAddr, delay: Duration) -> anyhow::Result<Forwarder> {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--forwarder")
            .arg(target.to_string())
            .arg(delay.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the forwarder")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("forwarder stdout")?)
            .read_line(&mut line)?;
        let addr = line.trim().parse().context("the forwarder's address")?;
        Ok(Forwarder { child, addr })
    }

    /// The forwarder's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The forwarder process: prints its address, then copies every
/// connection to `target` and back until standard input closes, holding
/// each byte `delay_ms` in each direction if given.
pub fn forwarder(target: Option<String>, delay_ms: Option<String>) -> std::process::ExitCode {
    let Some(target) = target.and_then(|t| t.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: --forwarder HOST:PORT [DELAY_MS]");
        return std::process::ExitCode::FAILURE;
    };
    let delay = Duration::from_millis(delay_ms.and_then(|d| d.parse().ok()).unwrap_or(0));
    mailbridge::server::raise_open_files_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match mailbridge::server::listen("127.0.0.1:0".parse().expect("addr")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("forwarder: {e}");
                return;
            }
        };
        if let Ok(addr) = listener.local_addr() {
            println!("{addr}");
        }
        // Ends when the benchmark closes our standard input (or dies).
        let stop = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        });
        let serve = async {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if delay.is_zero() {
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut client,
                            &mut upstream,
                            64 * 1024,
                            64 * 1024,
                        )
                        .await;
                    } else {
                        let (cr, cw) = client.into_split();
                        let (ur, uw) = upstream.into_split();
                        tokio::join!(delay_line(cr, uw, delay), delay_line(ur, cw, delay));
                    }
                });
            }
        };
        tokio::select! {
            _ = stop => {}
            () = serve => {}
        }
    });
    std::process::ExitCode::SUCCESS
}

/// Copies `from` to `to`, each chunk written `delay` after it was read
/// (reading goes on meanwhile, so the delay adds latency, not a pause per
/// chunk); the end of `from` reaches `to` with the same delay.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let due = tokio::time::Instant::now() + delay;
            // An empty chunk is the end of the stream.
            if tx.send((due, buf[..n].to_vec())).is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// haproxy in TCP mode, the reference relay: the client talks plain text
/// to it, it talks TLS to the server (certificate checked against the
/// sandbox CA, SNI `localhost`), one frontend per protocol. What many
/// would put where mailbridge sits, minus the OAuth2 part.
pub struct Haproxy {
    child: Child,
    /// Its IMAP frontend.
    pub imap: SocketAddr,
    /// Its SMTP frontend, when an implicit-TLS SMTP server was given
    /// (haproxy cannot do STARTTLS).
    pub smtp: Option<SocketAddr>,
}

/// The TLS 1.3 suites offered to the server, in mailbridge's order
/// (`net::tls::provider`: AES-128-GCM first), so both relays negotiate
/// the same cipher.
const HAPROXY_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

impl Haproxy {
    /// Starts `haproxy` (from `PATH`) in front of `imap` and `smtp`
    /// (both implicit TLS), or says why it cannot.
    pub async fn start(
        dir: &Path,
        ca: &Path,
        name: &str,
        imap: SocketAddr,
        smtp: Option<SocketAddr>,
    ) -> Result<Haproxy, String> {
        let version = Command::new("haproxy")
            .arg("-v")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("haproxy is not installed ({e}); `apt-get install haproxy`"))?;
        if !version.status.success() {
            return Err("`haproxy -v` failed".into());
        }
        let port =
            |what: &str| free_port().map_err(|e| format!("a port for haproxy's {what}: {e}"));
        let front_imap = SocketAddr::from(([127, 0, 0, 1], port("IMAP")?));
        let front_smtp = match smtp {
            Some(_) => Some(SocketAddr::from(([127, 0, 0, 1], port("SMTP")?))),
            None => None,
        };
        let server = |to: SocketAddr| {
            format!(
                "    server s1 {to} ssl verify required ca-file {} sni str({name}) ssl-min-ver TLSv1.2\n",
                ca.display()
            )
        };
        let mut cfg = format!(
            "# Generated by the mailbridge benchmark.\n\
             global\n    maxconn 4000\n    ssl-default-server-ciphersuites {HAPROXY_SUITES}\n\n\
             defaults\n    mode tcp\n    timeout connect 20s\n    timeout client 600s\n    timeout server 600s\n\n\
             frontend imap\n    bind {front_imap}\n    default_backend imap_up\n\n\
             backend imap_up\n{}",
            server(imap)
        );
        if let (Some(front), Some(to)) = (front_smtp, smtp) {
            cfg.push_str(&format!(
                "\nfrontend smtp\n    bind {front}\n    default_backend smtp_up\n\nbackend smtp_up\n{}",
                server(to)
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("haproxy -c: {e}"))?;
        if !check.status.success() {
            return Err(format!(
                "haproxy refused its config: {}",
                String::from_utf8_lossy(&check.stderr).trim()
            ));
        }
        let log = std::fs::File::create(dir.join("haproxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting haproxy: {e}"))?;
        let mut h = Haproxy {
            child,
            imap: front_imap,
            smtp: front_smtp,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(front_imap).await.is_ok() {
                return Ok(h);
            }
            if let Ok(Some(status)) = h.child.try_wait() {
                return Err(format!(
                    "haproxy exited ({status}); see {}",
                    dir.join("haproxy.log").display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "haproxy did not listen on {front_imap} within 10 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id (haproxy -db runs in the foreground: one process,
    /// its threads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
