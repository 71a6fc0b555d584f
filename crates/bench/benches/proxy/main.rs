//! The mailbridge benchmark: every figure through mailbridge and, in the
//! same run, with the same client straight to the upstream.
//!
//!     cargo bench --bench proxy              # the full run, about half a minute
//!     cargo bench --bench proxy -- --quick   # smaller counts, to try it
//!
//! Three processes, as in real use: this one runs the sandbox OAuth2
//! provider and the sandbox IMAP (implicit TLS) and SMTP (STARTTLS)
//! servers; `mailbridge run` runs apart, so its memory is its own (its
//! grants sealed beforehand with `mailbridge account import`); and the
//! clients run in a third process (this executable with
//! `--client-worker`). Two more copies of this executable with
//! `--forwarder` are bare TCP relays for the floor table. Clients talk to mailbridge in plain text on loopback
//! and mailbridge talks TLS upstream; the direct client talks TLS and
//! XOAUTH2 itself. The table goes to standard output
//! and to `target/mailbridge-bench.md` (or `--out FILE`). See
//! docs/PERFORMANCE.md for what each figure means.

mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mailbridge_bench::procfs::AnonSplit;
use mailbridge_bench::report::{Row, Target, markdown};
use mailbridge_bench::stats::{median, percentile};
use mailbridge_bench::worker::{Job, Reply, RouteSpec};
use mailbridge_sandbox::{
    ImapServer, ImapServerOptions, Provider, ProviderOptions, SmtpServer, SmtpServerOptions,
    TestPki,
};

use mailbridge_sandbox::SandboxTls;
use process::{Clients, Forwarder, Haproxy, Mailbridge, free_port, import};

const ALICE: &str = "alice@example.com";
/// The account of the refresh scenario, so revoking its tokens leaves the
/// other scenarios alone.
const BOB: &str = "bob@example.com";
const PASSWORD: &str = "bench local password";
const CLIENT_ID: &str = "mailbridge-bench";

/// What to run.
#[derive(Clone)]
struct Plan {
    quick: bool,
    out: Option<PathBuf>,
    logins: usize,
    /// Logins each way over the long-distance link (`wan`).
    wan_logins: usize,
    login_block: usize,
    mailbox_messages: usize,
    message_size: usize,
    fetch_rounds: usize,
    /// FETCH rounds against the real servers: Dovecot is the bottleneck
    /// there and single rounds vary by +-20 %, so the medians need more
    /// of them than the sandbox's to compare two forwarders.
    real_fetch_rounds: usize,
    /// SMTP rounds against the real servers, for the same reason: Postfix
    /// sets the pace, and the forwarders differ by a few percent at most.
    real_smtp_rounds: usize,
    smtp_messages: usize,
    smtp_size: usize,
    smtp_rounds: usize,
    sessions: Vec<usize>,
    refresh_logins: usize,
    refresh_rounds: usize,
    /// Scenarios to run (all when empty).
    only: Vec<String>,
    /// Keep the temporary directory (config, store, mailbridge's log).
    keep: bool,
    /// Also measure against the interop suite's real servers when they
    /// can run here.
    real: bool,
    /// Also measure through haproxy when it is installed.
    haproxy: bool,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            quick: false,
            out: None,
            logins: 500,
            login_block: 25,
            wan_logins: 100,
            mailbox_messages: 50,
            message_size: 1024 * 1024,
            fetch_rounds: 9,
            real_fetch_rounds: 25,
            real_smtp_rounds: 11,
            smtp_messages: 200,
            smtp_size: 100 * 1024,
            smtp_rounds: 7,
            sessions: vec![1_000, 10_000],
            refresh_logins: 50,
            refresh_rounds: 5,
            only: Vec::new(),
            keep: false,
            real: true,
            haproxy: true,
        }
    }

    fn quick() -> Plan {
        Plan {
            quick: true,
            logins: 100,
            wan_logins: 20,
            mailbox_messages: 10,
            fetch_rounds: 3,
            real_fetch_rounds: 3,
            real_smtp_rounds: 3,
            smtp_messages: 40,
            smtp_rounds: 3,
            sessions: vec![1_000],
            refresh_rounds: 2,
            ..Plan::full()
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench proxy [-- [--quick] [--out FILE] \
                     [--sessions N,N] [--logins N] [--only login,wan,fetch,smtp,refresh,idle] [--keep] [--no-real] [--no-haproxy]]";
const SCENARIOS: [&str; 6] = ["login", "wan", "fetch", "smtp", "refresh", "idle"];

fn parse_args() -> Result<Option<Plan>, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not, and
    // then there is nothing to do.
    if !args.iter().any(|a| a == "--bench") {
        return Ok(None);
    }
    let mut plan = if args.iter().any(|a| a == "--quick") {
        Plan::quick()
    } else {
        Plan::full()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" | "--quick" => {}
            "--keep" => plan.keep = true,
            "--no-real" => plan.real = false,
            "--no-haproxy" => plan.haproxy = false,
            "--only" => {
                plan.only = it
                    .next()
                    .ok_or(USAGE)?
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = plan.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    return Err(format!("unknown scenario {bad}\n{USAGE}"));
                }
            }
            "--out" => plan.out = Some(it.next().ok_or(USAGE)?.into()),
            "--logins" => {
                plan.logins = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n: &usize| n >= plan.login_block)
                    .ok_or(USAGE)?;
            }
            "--sessions" => {
                plan.sessions = it
                    .next()
                    .ok_or(USAGE)?
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|_| USAGE.to_string()))
                    .collect::<Result<_, _>>()?;
            }
            // Filters cargo may pass along; this benchmark has no filters.
            _ if !a.starts_with("--") => {}
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(Some(plan))
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--client-worker") => return client_worker(),
        Some("--forwarder") => {
            return process::forwarder(std::env::args().nth(2), std::env::args().nth(3));
        }
        _ => {}
    }
    let plan = match parse_args() {
        Ok(Some(p)) => p,
        Ok(None) => {
            println!("mailbridge benchmark: run it with `cargo bench --bench proxy`");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The client process: jobs on standard input, replies on standard output.
fn client_worker() -> ExitCode {
    mailbridge::server::raise_open_files_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let served = runtime.block_on(mailbridge_bench::worker::serve(
        tokio::io::BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
    ));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client process: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the scenarios share.
struct Env {
    provider: Provider,
    imap: ImapServer,
    smtp: SmtpServer,
    clients: Clients,
    direct_imap: RouteSpec,
    direct_smtp: RouteSpec,
    proxy_imap: RouteSpec,
    proxy_smtp: RouteSpec,
    /// Bob's routes and refresh token (for the direct client's refresh).
    bob_direct: RouteSpec,
    bob_proxy: RouteSpec,
    bob_refresh: String,
    /// The direct routes through a bare TCP forwarder (the floor table).
    fwd_imap: Option<RouteSpec>,
    fwd_smtp: Option<RouteSpec>,
    /// The routes through haproxy, when it runs: plain text to it,
    /// XOAUTH2 with a live token; its SMTP goes to `smtp_tls`.
    haproxy_imap: Option<RouteSpec>,
    haproxy_smtp: Option<RouteSpec>,
    /// haproxy's process, for its CPU time.
    haproxy_pid: Option<u32>,
    /// A second sandbox SMTP server with implicit TLS, for haproxy (which
    /// cannot do STARTTLS); same code as `smtp`.
    smtp_tls: SmtpServer,
    notes: Vec<String>,
}

impl Env {
    /// New access tokens for `user` on every route that holds one (the
    /// direct, forwarder and haproxy routes), after its tokens were
    /// revoked at the provider.
    fn renew_tokens(&mut self, user: &str) {
        let provider = &self.provider;
        let routes = [
            Some(&mut self.direct_imap),
            Some(&mut self.direct_smtp),
            Some(&mut self.bob_direct),
            self.fwd_imap.as_mut(),
            self.fwd_smtp.as_mut(),
            self.haproxy_imap.as_mut(),
            self.haproxy_smtp.as_mut(),
        ];
        for route in routes.into_iter().flatten() {
            if let RouteSpec::Direct { user: u, token, .. }
            | RouteSpec::Relay { user: u, token, .. } = route
                && u == user
            {
                *token = provider.issue_access_token(user, "mail", Duration::from_secs(4 * 3600));
            }
        }
    }

    fn call(&mut self, job: Job) -> anyhow::Result<Reply> {
        self.clients.call(&job)
    }

    fn elapsed(&mut self, job: Job) -> anyhow::Result<Duration> {
        match self.call(job)? {
            Reply::Elapsed { elapsed_us } => Ok(Duration::from_micros(elapsed_us)),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// haproxy's CPU time so far, when it runs.
    fn haproxy_cpu(&self) -> Option<Duration> {
        self.haproxy_pid
            .and_then(|pid| mailbridge_bench::procfs::cpu_time(pid).ok())
    }

    fn login(&mut self, route: &RouteSpec) -> anyhow::Result<()> {
        self.elapsed(Job::ConcurrentLogins {
            route: route.clone(),
            n: 1,
        })
        .map(drop)
    }
}

fn say(what: &str) {
    eprintln!("[{}] {what}", time_of_day());
}

fn time_of_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions {
        client_id: CLIENT_ID.into(),
        ..ProviderOptions::default()
    })
    .await?;
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki).await?;
    let smtp = SmtpServer::start(SmtpServerOptions::default(), provider.validator(), &pki).await?;

    let dir = std::env::temp_dir().join(format!("mailbridge-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let mb_imap: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mb_smtp: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let max_sessions = plan.sessions.iter().copied().max().unwrap_or(0);
    let real = if plan.real {
        say("starting the interop suite's real servers (Dovecot, Postfix, oidc-provider)");
        RealStack::start(&dir.join("interop"))
    } else {
        Err("not asked for (--no-real)".to_string())
    };
    let real_config = match &real {
        Ok(r) => r.config(),
        Err(why) => {
            say(&format!("no real-server table: {why}"));
            String::new()
        }
    };
    let config = format!(
        r#"# Generated by the mailbridge benchmark.
[server]
state_dir = "{state}"
max_connections = {max_connections}
max_connections_per_address = {max_connections}
preauth_max_failed_logins = 1000
preauth_timeout_secs = 300
preauth_deadline_secs = 600
login_timeout_secs = 300
connect_timeout_secs = 120

[[listener]]
protocol = "imap"
bind = "{mb_imap}"

[[listener]]
protocol = "smtp"
bind = "{mb_smtp}"

[providers.sandbox]
preset = "custom"
client_id = "{CLIENT_ID}"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "127.0.0.1", port = {imap_port}, tls = "implicit" }}
smtp = {{ host = "127.0.0.1", port = {smtp_port}, tls = "starttls" }}

[[account]]
user = "{ALICE}"
provider = "sandbox"

[[account]]
user = "{BOB}"
provider = "sandbox"
{real_config}"#,
        state = dir.join("state").display(),
        max_connections = (max_sessions + 1000).max(1000),
        token_url = provider.token_url(),
        ca = ca.display(),
        imap_port = imap.addr().port(),
        smtp_port = smtp.addr().port(),
    );
    let config_path = dir.join("mailbridge.toml");
    std::fs::write(&config_path, config)?;
    say("sealing the grants with `mailbridge account import`");
    import(
        &config_path,
        ALICE,
        &provider.issue_refresh_token(ALICE, "mail"),
        PASSWORD,
    )?;
    import(
        &config_path,
        BOB,
        &provider.issue_refresh_token(BOB, "mail"),
        PASSWORD,
    )?;
    if let Ok(r) = &real {
        import(&config_path, &r.user, &r.refresh_token, PASSWORD)?;
    }
    let log = dir.join("mailbridge.log");
    say("starting `mailbridge run`");
    let mut mb = Mailbridge::start(&config_path, &log, mb_imap, mb_smtp).await?;

    // mailbridge was started with this process's limits and raises its
    // own; so does the client process. This one holds the sandbox servers'
    // end of every session.
    let mut notes = Vec::new();
    let unit_env = process::unit_environment();
    notes.push(if unit_env.is_empty() {
        "mailbridge runs with no environment from systemd/mailbridge.service (none, or all \
         overridden by this process's environment)"
            .to_string()
    } else {
        let list: Vec<String> = unit_env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        format!(
            "mailbridge runs with the environment systemd/mailbridge.service gives it: {}",
            list.join(", ")
        )
    });
    let wanted = max_sessions as u64 + 1024;
    let limit = mailbridge::server::raise_open_files_limit(wanted);
    let mut plan = plan;
    if limit.now < wanted {
        let fit = limit.now.saturating_sub(1024) as usize;
        let msg = format!(
            "the open-files limit is {} but {} sessions need {wanted}: raise it first \
             (`ulimit -n {wanted}`, as root `ulimit -Hn {wanted}` before); session counts \
             above {fit} were lowered to {fit}",
            limit.now, max_sessions
        );
        say(&msg);
        notes.push(msg);
        for n in &mut plan.sessions {
            *n = (*n).min(fit);
        }
    }

    let direct = |addr, user: &str| RouteSpec::Direct {
        addr,
        ca_pem: pki.ca_pem.clone(),
        name: "127.0.0.1".into(),
        user: user.to_string(),
        token: provider.issue_access_token(user, "mail", Duration::from_secs(4 * 3600)),
    };
    let proxy = |addr, user: &str| RouteSpec::Proxy {
        addr,
        user: user.to_string(),
        password: PASSWORD.to_string(),
    };
    let clients = Clients::start()?;
    let fwd_imap = Forwarder::start(imap.addr())?;
    let fwd_smtp = Forwarder::start(smtp.addr())?;
    let smtp_tls = SmtpServer::start(
        SmtpServerOptions {
            tls: SandboxTls::Implicit,
            ..SmtpServerOptions::default()
        },
        provider.validator(),
        &pki,
    )
    .await?;
    let haproxy = if plan.haproxy {
        say("starting haproxy (TCP mode, TLS to the servers)");
        Haproxy::start(&dir, &ca, "localhost", imap.addr(), Some(smtp_tls.addr())).await
    } else {
        Err("not asked for (--no-haproxy)".to_string())
    };
    let relay = |addr, user: &str| RouteSpec::Relay {
        addr,
        user: user.to_string(),
        token: provider.issue_access_token(user, "mail", Duration::from_secs(4 * 3600)),
    };
    let (haproxy_imap, haproxy_smtp, haproxy_pid) = match &haproxy {
        Ok(h) => (
            Some(relay(h.imap, ALICE)),
            h.smtp.map(|a| relay(a, ALICE)),
            Some(h.pid()),
        ),
        Err(why) => {
            let msg = format!("no haproxy column: {why}");
            say(&msg);
            notes.push(msg);
            (None, None, None)
        }
    };
    let mut env = Env {
        fwd_imap: Some(direct(fwd_imap.addr, ALICE)),
        fwd_smtp: Some(direct(fwd_smtp.addr, ALICE)),
        direct_imap: direct(imap.addr(), ALICE),
        direct_smtp: direct(smtp.addr(), ALICE),
        proxy_imap: proxy(mb_imap, ALICE),
        proxy_smtp: proxy(mb_smtp, ALICE),
        bob_direct: direct(imap.addr(), BOB),
        bob_proxy: proxy(mb_imap, BOB),
        bob_refresh: provider.issue_refresh_token(BOB, "mail"),
        haproxy_imap,
        haproxy_smtp,
        haproxy_pid,
        smtp_tls,
        clients,
        provider,
        imap,
        smtp,
        notes,
    };

    // Warm up: the first login pays Argon2 and a token refresh.
    say("warming up");
    let (p, d) = (env.proxy_imap.clone(), env.direct_imap.clone());
    env.call(Job::LoginLatency {
        a: p,
        b: d,
        more: env.haproxy_imap.clone().into_iter().collect(),
        total: 20,
        block: 5,
    })?;
    let bob = env.bob_proxy.clone();
    env.login(&bob)?;

    let mut rows = Vec::new();
    let wants = |s: &str| plan.only.is_empty() || plan.only.iter().any(|o| o == s);
    let cpu = |pid: u32| mailbridge_bench::procfs::cpu_time(pid).unwrap_or_default();
    let mut floor = Vec::new();
    if wants("login") {
        say(&format!(
            "login latency: {} sequential logins each way, interleaved",
            plan.logins
        ));
        let (p, d) = (env.proxy_imap.clone(), env.direct_imap.clone());
        let routes = with_haproxy(&[p, d.clone()], &env.haproxy_imap);
        let before = cpu(mb.pid());
        let h_before = env.haproxy_cpu();
        let s = login_samples(&mut env, &routes, &plan)?;
        let used = cpu(mb.pid()) - before;
        let per_login = used.as_secs_f64() * 1e3 / plan.logins as f64;
        env.notes.push(format!(
            "mailbridge CPU time per login: {:.0} us (user + system, all threads; target <= 300 us: {})",
            per_login * 1e3,
            if per_login <= 0.3 { "met" } else { "**not met**" }
        ));
        if let (Some(b), Some(a)) = (h_before, env.haproxy_cpu()) {
            env.notes.push(format!(
                "for scale, haproxy's CPU time per login it relayed (TCP, TLS to the server): {:.0} us",
                (a - b).as_secs_f64() * 1e6 / plan.logins as f64
            ));
        }
        rows.extend(login_rows(&plan, &s));
        // For scale: what the same login costs the direct client itself.
        let client_pid = env.clients.pid();
        let before = mailbridge_bench::procfs::cpu_time(client_pid).unwrap_or_default();
        let n = (plan.logins / 2).max(1);
        env.call(Job::LoginLatency {
            a: d.clone(),
            b: d.clone(),
            more: Vec::new(),
            total: n,
            block: n,
        })?;
        let used = mailbridge_bench::procfs::cpu_time(client_pid).unwrap_or_default() - before;
        env.notes.push(format!(
            "for scale, the direct client's CPU time per login (TLS handshake, XOAUTH2, \
             LOGOUT): {:.0} us",
            used.as_secs_f64() * 1e6 / (2 * n) as f64
        ));
        if let Some(fwd) = &env.fwd_imap {
            let (f, d) = (fwd.clone(), env.direct_imap.clone());
            let before = cpu(fwd_imap.pid());
            floor.extend(login_rows(&plan, &login_samples(&mut env, &[f, d], &plan)?));
            env.notes.push(format!(
                "for scale, the floor's bare TCP forwarder's CPU time per login it relayed \
                 (no TLS termination, no login; two sockets): {:.0} us",
                (cpu(fwd_imap.pid()) - before).as_secs_f64() * 1e6 / plan.logins as f64
            ));
        }
    }
    let mut wan = Vec::new();
    if wants("wan") {
        wan = wan_logins(&mut env, &dir, &ca, &plan).await?;
    }
    if wants("fetch") {
        say(&format!(
            "FETCH: {} messages of {} KiB, {} rounds each way",
            plan.mailbox_messages,
            plan.message_size / 1024,
            plan.fetch_rounds
        ));
        fill_mailbox(&env, &plan);
        let (p, d) = (env.proxy_imap.clone(), env.direct_imap.clone());
        let routes = with_haproxy(&[p, d], &env.haproxy_imap);
        let before = cpu(mb.pid());
        let h_before = env.haproxy_cpu();
        let s = fetch_samples(&mut env, &routes, &plan)?;
        let used = cpu(mb.pid()) - before;
        let mb_moved = (plan.fetch_rounds * plan.mailbox_messages * plan.message_size) as f64 / 1e6;
        let per_mb = used.as_secs_f64() * 1e3 / mb_moved;
        env.notes.push(format!(
            "mailbridge CPU time per MB fetched: {per_mb:.2} ms (target <= 0.6 ms: {})",
            if per_mb <= 0.6 { "met" } else { "**not met**" }
        ));
        if let (Some(b), Some(a)) = (h_before, env.haproxy_cpu()) {
            env.notes.push(format!(
                "for scale, haproxy's CPU time per MB it relayed: {:.2} ms",
                (a - b).as_secs_f64() * 1e3 / mb_moved
            ));
        }
        rows.push(fetch_row(&plan, &s));
        if let Some(fwd) = &env.fwd_imap {
            let (f, d) = (fwd.clone(), env.direct_imap.clone());
            let before = cpu(fwd_imap.pid());
            floor.push(fetch_row(&plan, &fetch_samples(&mut env, &[f, d], &plan)?));
            env.notes.push(format!(
                "for scale, the floor's bare TCP forwarder's CPU time per MB it relayed \
                 (TLS records passed through undecrypted): {:.2} ms",
                (cpu(fwd_imap.pid()) - before).as_secs_f64() * 1e3 / mb_moved
            ));
        }
    }
    if wants("smtp") {
        for sessions in [1, 20] {
            say(&format!(
                "SMTP: {} messages of {} KiB over {sessions} session(s), {} rounds each way",
                plan.smtp_messages,
                plan.smtp_size / 1024,
                plan.smtp_rounds
            ));
            let (p, d) = (env.proxy_smtp.clone(), env.direct_smtp.clone());
            let routes = with_haproxy(&[p, d], &env.haproxy_smtp);
            let before = cpu(mb.pid());
            let h_before = env.haproxy_cpu();
            let s = smtp_samples(&mut env, &routes, sessions, &plan)?;
            let used = cpu(mb.pid()) - before;
            let sent = (plan.smtp_rounds * plan.smtp_messages) as f64;
            env.notes.push(format!(
                "mailbridge CPU time per SMTP message ({sessions} session(s)): {:.0} us",
                used.as_secs_f64() * 1e6 / sent
            ));
            if let (Some(b), Some(a)) = (h_before, env.haproxy_cpu()) {
                env.notes.push(format!(
                    "for scale, haproxy's CPU time per SMTP message ({sessions} session(s)): {:.0} us",
                    (a - b).as_secs_f64() * 1e6 / sent
                ));
            }
            rows.push(smtp_row(&plan, sessions, &s));
            if let Some(fwd) = &env.fwd_smtp {
                let (f, d) = (fwd.clone(), env.direct_smtp.clone());
                let s = smtp_samples(&mut env, &[f, d], sessions, &plan)?;
                floor.push(smtp_row(&plan, sessions, &s));
            }
        }
    }
    let mut real_rows = Vec::new();
    let real_why = match &real {
        Ok(r) => {
            real_rows = real_servers(&mut env, &plan, r, mb_imap, mb_smtp, &wants, &dir).await?;
            None
        }
        Err(why) => Some(why.clone()),
    };
    // Stops Dovecot, Postfix and the OAuth2 server (also on any early
    // return, through Drop).
    drop(real);
    if wants("refresh") {
        rows.extend(refresh(&mut env, &plan).await?);
    }
    if wants("idle") {
        for &n in &plan.sessions.clone() {
            mb = mb.restart().await?;
            rows.extend(idle_sessions(&mut env, &mb, n).await?);
        }
    }
    let mb_limit = mb.open_files_limit();
    mb.stop().await?;
    drop(haproxy);
    env.imap.shutdown();
    env.smtp.shutdown();
    env.smtp_tls.shutdown();
    env.provider.shutdown();

    drop((fwd_imap, fwd_smtp));
    let mut table = markdown(&rows);
    if !real_rows.is_empty() {
        table.push_str(
            "\nAgainst the interop suite's real servers (Dovecot IMAP with implicit TLS, \
             Postfix submission with STARTTLS and SASL through Dovecot, every token \
             introspected at oidc-provider), same client, mailbridge against direct:\n\n",
        );
        table.push_str(&markdown(&real_rows));
    } else if let Some(why) = &real_why {
        env.notes
            .push(format!("no real-server table (Dovecot, Postfix): {why}"));
    }
    if !wan.is_empty() {
        table.push_str(&format!(
            "\nLogin with the server {} ms away (a forwarder holding every byte {} ms each \
             way, in front of the sandbox IMAP server; the TCP handshake itself is not \
             delayed, which favours the direct client), mailbridge on loopback with the \
             client, against the client going there directly:\n\n",
            2 * WAN_DELAY.as_millis(),
            WAN_DELAY.as_millis()
        ));
        table.push_str(&markdown(&untargeted(wan)));
    }
    if !floor.is_empty() {
        table.push_str(
            "\nThe floor: the same direct client through a bare TCP forwarder process \
             (no TLS termination, no login, just one more hop), against direct:\n\n",
        );
        table
            .push_str(&markdown(&untargeted(floor)).replace("| mailbridge |", "| via forwarder |"));
    }
    let mut report = format!(
        "mailbridge benchmark, {} run ({}), {} s on {} CPU(s), {}.\n\n{table}\n",
        match (plan.quick, plan.only.is_empty()) {
            (false, true) => "full".to_string(),
            (true, true) => "quick".to_string(),
            (q, false) => format!(
                "{}partial ({})",
                if q { "quick, " } else { "" },
                plan.only.join(", ")
            ),
        },
        time_of_day_utc_date(),
        started.elapsed().as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel(),
    );
    let mb_wanted = mailbridge::server::open_files_wanted((max_sessions + 1000).max(1000));
    let short = match mb_limit {
        Some(l) if l < mb_wanted => format!(
            ", below the {mb_wanted} its max_connections needs{}",
            if can_raise_hard_limit() {
                ""
            } else {
                ": this machine does not let a process raise its hard limit \
                 (no CAP_SYS_RESOURCE)"
            }
        ),
        _ => String::new(),
    };
    env.notes.push(format!(
        "open-files limits: mailbridge {} (started with {}; it raises its own at start{short}), \
         sandbox process {}, client process {}",
        mb_limit.map_or("?".into(), |l| l.to_string()),
        limit.before,
        limit.now,
        process::open_files_limit(env.clients.pid()).map_or("?".into(), |l| l.to_string()),
    ));
    for n in &env.notes {
        report.push_str(&format!("- {n}\n"));
    }
    println!("\n{report}");
    let out = plan.out.clone().unwrap_or_else(default_out);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("written to {}", out.display());
    if plan.keep {
        eprintln!("kept {} (config, store, mailbridge.log)", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// `target/mailbridge-bench.md`: the benchmark runs from
/// `target/release/deps/`.
fn default_out() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("mailbridge-bench.md")
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff), which
/// raising a hard limit needs.
fn can_raise_hard_limit() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| std::env::consts::OS.to_string())
}

fn time_of_day_utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// `routes` and, when haproxy runs, its route last.
fn with_haproxy(routes: &[RouteSpec], haproxy: &Option<RouteSpec>) -> Vec<RouteSpec> {
    routes.iter().chain(haproxy).cloned().collect()
}

/// Sequential login timings (ms) over each of `routes` (at least two),
/// interleaved; in the order of `routes`.
fn login_samples(
    env: &mut Env,
    routes: &[RouteSpec],
    plan: &Plan,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let job = Job::LoginLatency {
        a: routes[0].clone(),
        b: routes[1].clone(),
        more: routes[2..].to_vec(),
        total: plan.logins,
        block: plan.login_block,
    };
    let Reply::Timings { a, b, more } = env.call(job)? else {
        bail!("unexpected reply to LoginLatency");
    };
    let ms = |v: Vec<u64>| -> Vec<f64> { v.into_iter().map(|u| u as f64 / 1000.0).collect() };
    Ok([a, b].into_iter().chain(more).map(ms).collect())
}

/// To make mailbridge refresh on its next login: its cached token is
/// issued with this lifetime, and after [`STALE_AFTER`] less than half of
/// it is left, which no login accepts (the freshness floor adapts to
/// short-lived tokens: min(floor, half the lifetime)).
const STALE_SOON: Duration = Duration::from_secs(4);
/// See [`STALE_SOON`].
const STALE_AFTER: Duration = Duration::from_millis(2500);

/// One-way delay of the long-distance link in the `wan` scenario.
const WAN_DELAY: Duration = Duration::from_millis(5);

/// Login latency over a long-distance link to the server, as deployed (the
/// client next to mailbridge, the provider far away): a second mailbridge
/// whose IMAP server is a delaying forwarder in front of the sandbox; the
/// direct client goes through the same forwarder.
async fn wan_logins(
    env: &mut Env,
    dir: &std::path::Path,
    ca: &std::path::Path,
    plan: &Plan,
) -> anyhow::Result<Vec<Row>> {
    let logins = plan.wan_logins;
    say(&format!(
        "login over a {} ms round trip: {logins} logins each way",
        2 * WAN_DELAY.as_millis()
    ));
    let fwd = Forwarder::start_delayed(env.imap.addr(), WAN_DELAY)?;
    let imap: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = format!(
        r#"# Generated by the mailbridge benchmark (wan scenario).
[server]
state_dir = "{state}"

[[listener]]
protocol = "imap"
bind = "{imap}"

[[listener]]
protocol = "smtp"
bind = "{smtp}"

[providers.sandbox]
preset = "custom"
client_id = "{CLIENT_ID}"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "127.0.0.1", port = {port}, tls = "implicit" }}
smtp = {{ host = "127.0.0.1", port = {smtp_port}, tls = "starttls" }}

[[account]]
user = "{ALICE}"
provider = "sandbox"
"#,
        state = dir.join("wan-state").display(),
        token_url = env.provider.token_url(),
        ca = ca.display(),
        port = fwd.addr.port(),
        smtp_port = env.smtp.addr().port(),
    );
    let path = dir.join("mailbridge-wan.toml");
    std::fs::write(&path, config)?;
    import(
        &path,
        ALICE,
        &env.provider.issue_refresh_token(ALICE, "mail"),
        PASSWORD,
    )?;
    let mb = Mailbridge::start(&path, &dir.join("mailbridge-wan.log"), imap, smtp).await?;
    // The direct client's route, through the forwarder.
    let mut direct = env.direct_imap.clone();
    if let RouteSpec::Direct { addr, .. } = &mut direct {
        *addr = fwd.addr;
    }
    let proxy = RouteSpec::Proxy {
        addr: imap,
        user: ALICE.to_string(),
        password: PASSWORD.to_string(),
    };
    let wan_plan = Plan {
        logins,
        login_block: plan.login_block.min(logins / 4).max(1),
        ..plan.clone()
    };
    // The first login pays Argon2 and the token refresh.
    env.login(&proxy)?;
    let s = login_samples(env, &[proxy.clone(), direct.clone()], &wan_plan)?;
    let cold = cold_token_logins(env, &proxy, &direct, (logins / 10).max(3)).await;
    // The cold-token logins revoked alice's access tokens, the ones the
    // direct and haproxy routes hold too: give them new ones.
    env.renew_tokens(ALICE);
    mb.stop().await?;
    drop(fwd);
    let row = |what: &str, p: f64| Row {
        what: format!("IMAP connect + login + logout, {what} of {logins} (ms)"),
        proxy: percentile(&s[0], p),
        direct: percentile(&s[1], p),
        decimals: 2,
        haproxy: None,
        vs_haproxy: Target::None,
        target: Target::None,
    };
    let mut rows = vec![row("median", 50.0), row("p95", 95.0)];
    rows.extend(cold?);
    Ok(rows)
}

/// Cold-token logins over the long-distance link, with the provider as far
/// away as the server: each login through mailbridge must refresh first
/// (its cached token is made one with under ten minutes left, as in the
/// refresh scenario), which it does while it connects; the direct
/// counterpart refreshes, then logs in. `rounds` of each.
async fn cold_token_logins(
    env: &mut Env,
    proxy: &RouteSpec,
    direct: &RouteSpec,
    rounds: usize,
) -> anyhow::Result<Vec<Row>> {
    say(&format!(
        "cold-token login, provider {} ms away: {rounds} logins each way",
        2 * WAN_DELAY.as_millis()
    ));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut refreshes = Vec::new();
    let mut direct_refresh = env.provider.issue_refresh_token(ALICE, "mail");
    env.provider.set_token_delay(2 * WAN_DELAY);
    let result: anyhow::Result<()> = async {
        for _ in 0..rounds {
            env.provider.set_access_token_lifetime(STALE_SOON);
            env.provider.revoke_access_tokens(ALICE);
            env.login(proxy)?;
            env.provider
                .set_access_token_lifetime(Duration::from_secs(3600));
            tokio::time::sleep(STALE_AFTER).await;
            let before = env.provider.refresh_requests();
            samples[0].push(ms(env.elapsed(Job::ConcurrentLogins {
                route: proxy.clone(),
                n: 1,
            })?));
            refreshes.push(env.provider.refresh_requests() - before);
            let reply = env.call(Job::RefreshThenLogins {
                token_url: env.provider.token_url(),
                client_id: CLIENT_ID.into(),
                refresh_token: direct_refresh.clone(),
                route: direct.clone(),
                n: 1,
            })?;
            let Reply::Refreshed {
                elapsed_us,
                refresh_token,
            } = reply
            else {
                bail!("unexpected reply to RefreshThenLogins");
            };
            if let Some(rt) = refresh_token {
                direct_refresh = rt;
            }
            samples[1].push(elapsed_us as f64 / 1000.0);
        }
        Ok(())
    }
    .await;
    env.provider.set_token_delay(Duration::ZERO);
    env.provider
        .set_access_token_lifetime(Duration::from_secs(3600));
    result?;
    let one_each = refreshes.iter().all(|&r| r == 1);
    Ok(vec![
        Row {
            what: format!(
                "IMAP cold-token login (refresh {} ms away, then connect + login + logout; mailbridge overlaps them), median of {rounds} (ms)",
                2 * WAN_DELAY.as_millis()
            ),
            proxy: median(&samples[0]),
            direct: median(&samples[1]),
            decimals: 2,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::None,
        },
        Row {
            what: "token refreshes per cold-token login through mailbridge (most seen)".into(),
            proxy: refreshes.iter().copied().max().map(|m| m as f64),
            direct: Some(1.0),
            decimals: 0,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::Check("exactly 1", one_each),
        },
    ])
}

/// Samples `[mailbridge, direct, haproxy if measured]`: the haproxy
/// figure, when there is one, with its target.
fn haproxy_of(
    s: &[Vec<f64>],
    f: impl Fn(&[f64]) -> Option<f64>,
    target: Target,
) -> (Option<f64>, Target) {
    match s.get(2) {
        Some(h) => (f(h), target),
        None => (None, Target::None),
    }
}

fn login_rows(plan: &Plan, s: &[Vec<f64>]) -> Vec<Row> {
    let (h_median, vs_median) = haproxy_of(s, median, Target::AtMost(1.05));
    let (h_p95, _) = haproxy_of(s, |v| percentile(v, 95.0), Target::None);
    vec![
        Row {
            what: format!(
                "IMAP connect + login + logout, median of {} (ms)",
                plan.logins
            ),
            proxy: median(&s[0]),
            direct: median(&s[1]),
            decimals: 3,
            haproxy: h_median,
            vs_haproxy: vs_median,
            target: Target::AtMost(1.2),
        },
        Row {
            what: format!("IMAP connect + login + logout, p95 of {} (ms)", plan.logins),
            proxy: percentile(&s[0], 95.0),
            direct: percentile(&s[1], 95.0),
            decimals: 3,
            haproxy: h_p95,
            vs_haproxy: Target::None,
            target: Target::AtMost(1.2),
        },
    ]
}

fn fill_mailbox(env: &Env, plan: &Plan) {
    let message = mailbridge_bench::client::message_wire(plan.message_size, "a@x", "b@x");
    let body = message[..message.len() - 3].to_vec();
    for _ in 0..plan.mailbox_messages {
        env.imap.append(ALICE, "INBOX", body.clone());
    }
}

/// FETCH rates (MB/s) over each of `routes`, rotating which goes first.
fn fetch_samples(
    env: &mut Env,
    routes: &[RouteSpec],
    plan: &Plan,
) -> anyhow::Result<Vec<Vec<f64>>> {
    fetch_samples_n(env, routes, plan, plan.fetch_rounds)
}

fn fetch_samples_n(
    env: &mut Env,
    routes: &[RouteSpec],
    plan: &Plan,
    rounds: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let total = plan.mailbox_messages * plan.message_size;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for round in 0..rounds {
        for i in 0..routes.len() {
            let which = (i + round) % routes.len();
            let route = routes[which].clone();
            let reply = env.call(Job::Fetch {
                route,
                set: "1:*".into(),
            })?;
            let Reply::Fetched {
                elapsed_us,
                messages,
                bytes,
            } = reply
            else {
                bail!("unexpected reply to Fetch");
            };
            if bytes != total as u64 || messages as usize != plan.mailbox_messages {
                bail!("FETCH ({which}) returned {messages} messages, {bytes} bytes");
            }
            rates[which].push(total as f64 / (elapsed_us as f64 / 1e6) / 1e6);
        }
    }
    Ok(rates)
}

fn fetch_row(plan: &Plan, s: &[Vec<f64>]) -> Row {
    let (haproxy, vs_haproxy) = haproxy_of(s, median, Target::AtLeast(1.0));
    Row {
        what: format!(
            "IMAP FETCH of a {} MB mailbox, median of {} (MB/s)",
            plan.mailbox_messages * plan.message_size / 1_000_000,
            plan.fetch_rounds
        ),
        proxy: median(&s[0]),
        direct: median(&s[1]),
        decimals: 1,
        haproxy,
        vs_haproxy,
        target: Target::AtLeast(0.9),
    }
}

/// SMTP rates (messages/s) over each of `routes`, rotating which goes
/// first.
fn smtp_samples(
    env: &mut Env,
    routes: &[RouteSpec],
    sessions: usize,
    plan: &Plan,
) -> anyhow::Result<Vec<Vec<f64>>> {
    smtp_samples_to(env, routes, sessions, plan, plan.smtp_rounds, None)
}

/// As [`smtp_samples`]; `envelope` (from, to) for a real server, which
/// delivers later, so nothing is counted at its end.
fn smtp_samples_to(
    env: &mut Env,
    routes: &[RouteSpec],
    sessions: usize,
    plan: &Plan,
    rounds: usize,
    envelope: Option<(&str, &str)>,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for round in 0..rounds {
        for i in 0..routes.len() {
            let which = (i + round) % routes.len();
            let route = routes[which].clone();
            env.smtp.clear_messages();
            env.smtp_tls.clear_messages();
            let elapsed = env.elapsed(Job::Smtp {
                route,
                sessions,
                messages: plan.smtp_messages,
                size: plan.smtp_size,
                from: envelope.map(|e| e.0.to_string()),
                to: envelope.map(|e| e.1.to_string()),
            })?;
            let got = env.smtp.message_count() + env.smtp_tls.message_count();
            if envelope.is_none() && got != plan.smtp_messages {
                bail!("SMTP ({which}): {got} messages arrived");
            }
            rates[which].push(plan.smtp_messages as f64 / elapsed.as_secs_f64());
        }
    }
    env.smtp.clear_messages();
    env.smtp_tls.clear_messages();
    Ok(rates)
}

fn smtp_row(plan: &Plan, sessions: usize, s: &[Vec<f64>]) -> Row {
    let (haproxy, vs_haproxy) = haproxy_of(s, median, Target::AtLeast(1.0));
    Row {
        what: format!(
            "SMTP {} x {} KiB over {sessions} session{}, median of {} (messages/s)",
            plan.smtp_messages,
            plan.smtp_size / 1024,
            if sessions == 1 { "" } else { "s" },
            plan.smtp_rounds
        ),
        proxy: median(&s[0]),
        direct: median(&s[1]),
        decimals: 1,
        haproxy,
        vs_haproxy,
        target: Target::AtLeast(0.9),
    }
}

/// The same rows with a route other than mailbridge in the first column
/// and no targets (the floor table).
fn untargeted(rows: Vec<Row>) -> Vec<Row> {
    rows.into_iter()
        .map(|r| Row {
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::None,
            ..r
        })
        .collect()
}

async fn refresh(env: &mut Env, plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let n = plan.refresh_logins;
    say(&format!(
        "token refresh: {n} concurrent logins, {} rounds each way",
        plan.refresh_rounds
    ));
    let mut cached: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut refreshed: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut refreshes: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (bob_proxy, bob_direct) = (env.bob_proxy.clone(), env.bob_direct.clone());
    for _ in 0..plan.refresh_rounds {
        // Cached token, both ways (the direct client's token is fresh).
        let direct_now = match &bob_direct {
            RouteSpec::Direct { .. } => with_token(
                &bob_direct,
                &env.provider
                    .issue_access_token(BOB, "mail", Duration::from_secs(3600)),
            ),
            other => other.clone(),
        };
        let t = env.elapsed(Job::ConcurrentLogins {
            route: bob_proxy.clone(),
            n,
        })?;
        cached[0].push(ms(t));
        let t = env.elapsed(Job::ConcurrentLogins {
            route: direct_now,
            n,
        })?;
        cached[1].push(ms(t));

        // mailbridge: make its cached token one past half its life, so the
        // next login must refresh.
        env.provider.set_access_token_lifetime(STALE_SOON);
        env.provider.revoke_access_tokens(BOB);
        env.login(&bob_proxy)?;
        env.provider
            .set_access_token_lifetime(Duration::from_secs(3600));
        tokio::time::sleep(STALE_AFTER).await;
        let before = env.provider.refresh_requests();
        let t = env.elapsed(Job::ConcurrentLogins {
            route: bob_proxy.clone(),
            n,
        })?;
        refreshed[0].push(ms(t));
        refreshes[0].push(env.provider.refresh_requests() - before);

        // Direct: the client refreshes once itself, then logs in n times.
        let before = env.provider.refresh_requests();
        let reply = env.call(Job::RefreshThenLogins {
            token_url: env.provider.token_url(),
            client_id: CLIENT_ID.into(),
            refresh_token: env.bob_refresh.clone(),
            route: bob_direct.clone(),
            n,
        })?;
        let Reply::Refreshed {
            elapsed_us,
            refresh_token,
        } = reply
        else {
            bail!("unexpected reply to RefreshThenLogins");
        };
        if let Some(rt) = refresh_token {
            env.bob_refresh = rt;
        }
        refreshed[1].push(elapsed_us as f64 / 1000.0);
        refreshes[1].push(env.provider.refresh_requests() - before);
    }
    let one_each = refreshes.iter().flatten().all(|&r| r == 1);
    let max_refreshes = |i: usize| refreshes[i].iter().copied().max().map(|m| m as f64);
    Ok(vec![
        Row {
            what: format!("{n} concurrent logins, cached token, median wall (ms)"),
            proxy: median(&cached[0]),
            direct: median(&cached[1]),
            decimals: 2,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::None,
        },
        Row {
            what: format!("{n} concurrent logins sharing one token refresh, median wall (ms)"),
            proxy: median(&refreshed[0]),
            direct: median(&refreshed[1]),
            decimals: 2,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::None,
        },
        Row {
            what: format!("token refreshes per burst of {n} (most seen)"),
            proxy: max_refreshes(0),
            direct: max_refreshes(1),
            decimals: 0,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::Check("exactly 1", one_each),
        },
    ])
}

fn with_token(route: &RouteSpec, new: &str) -> RouteSpec {
    let mut r = route.clone();
    if let RouteSpec::Direct { token, .. } = &mut r {
        *token = new.to_string();
    }
    r
}

/// Opens `n` sessions at once in the client process and keeps them.
fn burst(
    env: &mut Env,
    route: &RouteSpec,
    n: usize,
    who: &str,
) -> anyhow::Result<(usize, Duration)> {
    let reply = env.call(Job::Burst {
        route: route.clone(),
        n,
    })?;
    let Reply::Burst {
        ok,
        failed,
        elapsed_us,
        first_error,
    } = reply
    else {
        bail!("unexpected reply to Burst");
    };
    if let Some(e) = first_error {
        env.notes.push(format!(
            "{n} sessions {who}: {failed} failed, the first: {e}"
        ));
    }
    Ok((ok, Duration::from_micros(elapsed_us)))
}

fn open_sessions(reply: Reply) -> anyhow::Result<usize> {
    match reply {
        Reply::Open { sessions } => Ok(sessions),
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn idle_sessions(env: &mut Env, mb: &Mailbridge, n: usize) -> anyhow::Result<Vec<Row>> {
    say(&format!("idle sessions: {n} at once through mailbridge"));
    // A fresh process: warm it (Argon2, token), then let it settle.
    let proxy = env.proxy_imap.clone();
    env.login(&proxy)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let files = mb.open_files();
    let rss_before = mb.rss_kib()?;
    let anon_before = mb.rss_anon_kib()?;
    let split_before = mb.anon_split()?;
    let threads_before = mb.threads()?;
    let (opened, proxy_time) = burst(env, &proxy, n, "through mailbridge")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_login = mb.rss_kib()?;
    let split_peak = mb.anon_split()?;
    let threads_peak = mb.threads()?;
    let proxy_alive = open_sessions(env.call(Job::NoopAll)?)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_noop = mb.rss_kib()?;
    open_sessions(env.call(Job::CloseAll)?)?;
    let closed = Instant::now();
    if !mb.settle(files + 16, Duration::from_secs(60)).await {
        env.notes.push(format!(
            "{n} sessions: mailbridge still had {} files open a minute after the clients left",
            mb.open_files()
        ));
    }
    // Memory given back: RSS after the sessions closed, 1 and 2 s later
    // and then every 5 s up to a minute; the goal is within 20 % of the
    // idle baseline by then.
    let rss_peak = rss_login.max(rss_noop);
    let goal = rss_before + rss_before / 5;
    let mut after_close = Vec::new();
    let mut returned_at = None;
    let mut rss_last = rss_peak;
    for at in [1u64, 2].into_iter().chain((5..=60).step_by(5)) {
        let due = closed + Duration::from_secs(at);
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
        rss_last = mb.rss_kib()?;
        after_close.push(format!("{at} s: {rss_last}"));
        if rss_last <= goal {
            returned_at.get_or_insert(at);
        } else {
            returned_at = None;
        }
    }
    let anon_last = mb.rss_anon_kib()?;
    let split_last = mb.anon_split()?;
    let threads_last = mb.threads()?;

    say(&format!("idle sessions: {n} at once, direct"));
    let direct = env.direct_imap.clone();
    let (direct_opened, direct_time) = burst(env, &direct, n, "direct")?;
    let direct_alive = open_sessions(env.call(Job::NoopAll)?)?;
    open_sessions(env.call(Job::CloseAll)?)?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let per = |after: u64| (after.saturating_sub(rss_before)) as f64 / opened.max(1) as f64;
    let rss_target = if n >= 10_000 {
        Target::Check("<= 64 KiB", per(rss_login) <= 64.0 && per(rss_noop) <= 64.0)
    } else {
        Target::None
    };
    env.notes.push(format!(
        "{n} sessions: mailbridge RSS {rss_before} KiB before, {rss_login} KiB with all \
         logged in, {rss_noop} KiB after a NOOP on each; {proxy_alive} (mailbridge) and \
         {direct_alive} (direct) answered that NOOP"
    ));
    env.notes.push(format!(
        "{n} sessions closed: mailbridge RSS (KiB) {}; idle baseline {rss_before}, peak \
         {rss_peak}, goal <= {goal} (baseline + 20 %): {}",
        after_close.join(", "),
        match returned_at {
            Some(at) => format!("reached at {at} s and held to 60 s"),
            None => "**not within the goal at 60 s**".to_string(),
        }
    ));
    let split = |s: AnonSplit, threads: u64| {
        format!(
            "heap {} KiB, thread stacks {} KiB ({} mapped, {threads} threads)",
            s.heap, s.stacks, s.thread_stacks
        )
    };
    env.notes.push(format!(
        "{n} sessions: anonymous memory (RssAnon) {anon_before} KiB before, {anon_last} KiB \
         at 60 s after close (the rest of RSS is the binary's pages); from smaps: before {}; \
         all logged in {}; 60 s after close {}",
        split(split_before, threads_before),
        split(split_peak, threads_peak),
        split(split_last, threads_last),
    ));
    Ok(vec![
        Row {
            what: format!("{n} idle IMAP sessions opened at once: logged in"),
            proxy: Some(opened as f64),
            direct: Some(direct_opened as f64),
            decimals: 0,
            haproxy: None,
            vs_haproxy: Target::None,
            target: if n >= 10_000 {
                Target::Check("all", opened == n && proxy_alive == n)
            } else {
                Target::None
            },
        },
        Row {
            what: format!("{n} idle IMAP sessions: time to open all (s)"),
            proxy: Some(proxy_time.as_secs_f64()),
            direct: Some(direct_time.as_secs_f64()),
            decimals: 2,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::None,
        },
        Row {
            what: format!("{n} idle IMAP sessions: mailbridge RSS per session (KiB)"),
            proxy: Some(per(rss_login)),
            direct: None,
            decimals: 1,
            haproxy: None,
            vs_haproxy: Target::None,
            target: rss_target,
        },
        Row {
            what: format!(
                "{n} idle IMAP sessions closed: mailbridge RSS over its idle baseline 60 s later (%)"
            ),
            proxy: Some((rss_last as f64 - rss_before as f64) * 100.0 / rss_before.max(1) as f64),
            direct: None,
            decimals: 0,
            haproxy: None,
            vs_haproxy: Target::None,
            target: Target::Check("<= 20 % within 60 s", returned_at.is_some()),
        },
        Row {
            what: format!("{n} idle IMAP sessions, after one NOOP each: RSS per session (KiB)"),
            proxy: Some(per(rss_noop)),
            direct: None,
            decimals: 1,
            haproxy: None,
            vs_haproxy: Target::None,
            target: rss_target,
        },
    ])
}

/// The interop suite's servers (tests/interop), started through
/// `benches/proxy/interop.py`.
struct RealStack {
    dir: PathBuf,
    ports: std::collections::HashMap<String, u16>,
    ca: PathBuf,
    token_url: String,
    client_id: String,
    user: String,
    refresh_token: String,
}

impl RealStack {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/proxy/interop.py")
    }

    /// Starts the servers, or says why not.
    fn start(dir: &std::path::Path) -> Result<RealStack, String> {
        let out = std::process::Command::new("python3")
            .arg(Self::script())
            .arg("start")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .map_err(|_| format!("unexpected output from interop.py: {text}"))?;
        if let Some(why) = json["skip"].as_str() {
            return Err(why.to_string());
        }
        let s = |k: &str| {
            json[k]
                .as_str()
                .map(str::to_string)
                .ok_or(format!("no {k}"))
        };
        let ports = json["ports"]
            .as_object()
            .ok_or("no ports")?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), u16::try_from(v.as_u64()?).ok()?)))
            .collect();
        Ok(RealStack {
            dir: dir.to_path_buf(),
            ports,
            ca: PathBuf::from(s("ca")?),
            token_url: s("token_url")?,
            client_id: s("client_id")?,
            user: s("user")?,
            refresh_token: s("refresh_token")?,
        })
    }

    fn port(&self, name: &str) -> u16 {
        self.ports.get(name).copied().unwrap_or(0)
    }

    /// A new access token for the direct client (the provider's live a
    /// minute: the one from `start` is gone by the time its table runs).
    fn fresh_access_token(&self) -> anyhow::Result<String> {
        let out = std::process::Command::new("python3")
            .arg(Self::script())
            .arg("token")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .map_err(|_| anyhow::anyhow!("unexpected output from interop.py token: {text}"))?;
        json["access_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("interop.py token gave no access token: {text}"))
    }

    /// The provider and account mailbridge needs, for its config.
    fn config(&self) -> String {
        format!(
            r#"
[providers.interop]
preset = "custom"
client_id = "{client_id}"
token_url = "{token_url}"
scopes = ["mail", "offline_access"]
ca_file = "{ca}"
imap = {{ host = "127.0.0.1", port = {imaps}, tls = "implicit" }}
smtp = {{ host = "127.0.0.1", port = {submission}, tls = "starttls" }}

[[account]]
user = "{user}"
provider = "interop"
"#,
            client_id = self.client_id,
            token_url = self.token_url,
            ca = self.ca.display(),
            imaps = self.port("imaps"),
            submission = self.port("submission"),
            user = self.user,
        )
    }
}

impl Drop for RealStack {
    fn drop(&mut self) {
        let _ = std::process::Command::new("python3")
            .arg(Self::script())
            .arg("stop")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Login, FETCH and SMTP against Dovecot and Postfix, each way (and
/// through haproxy, to Dovecot's implicit-TLS IMAP and Postfix's
/// submissions port, when it runs).
async fn real_servers(
    env: &mut Env,
    plan: &Plan,
    r: &RealStack,
    mb_imap: SocketAddr,
    mb_smtp: SocketAddr,
    wants: &dyn Fn(&str) -> bool,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Row>> {
    let ca_pem = std::fs::read_to_string(&r.ca)?;
    // Access tokens live a minute at this provider: each phase below takes
    // a new one for the direct and haproxy routes (`renew`).
    let mut access_token = r.fresh_access_token()?;
    let direct = |port: u16, access_token: &str| RouteSpec::Direct {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ca_pem: ca_pem.clone(),
        name: "127.0.0.1".into(),
        user: r.user.clone(),
        token: access_token.to_string(),
    };
    let proxy = |addr| RouteSpec::Proxy {
        addr,
        user: r.user.clone(),
        password: PASSWORD.to_string(),
    };
    let (mut d_imap, mut d_smtp) = (
        direct(r.port("imaps"), &access_token),
        direct(r.port("submission"), &access_token),
    );
    let (p_imap, p_smtp) = (proxy(mb_imap), proxy(mb_smtp));
    let haproxy = if env.haproxy_pid.is_some() {
        let h_dir = dir.join("haproxy-real");
        std::fs::create_dir_all(&h_dir)?;
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        match Haproxy::start(
            &h_dir,
            &r.ca,
            "localhost",
            at(r.port("imaps")),
            (r.port("submissions") != 0).then(|| at(r.port("submissions"))),
        )
        .await
        {
            Ok(h) => Some(h),
            Err(why) => {
                env.notes
                    .push(format!("no haproxy column against the real servers: {why}"));
                None
            }
        }
    } else {
        None
    };
    let relay = |addr: SocketAddr, access_token: &str| RouteSpec::Relay {
        addr,
        user: r.user.clone(),
        token: access_token.to_string(),
    };
    let mut h_imap: Option<RouteSpec> = haproxy.as_ref().map(|h| relay(h.imap, &access_token));
    let mut h_smtp: Option<RouteSpec> = haproxy
        .as_ref()
        .and_then(|h| h.smtp)
        .map(|a| relay(a, &access_token));
    let mut renew = |d_imap: &mut RouteSpec,
                     d_smtp: &mut RouteSpec,
                     h_imap: &mut Option<RouteSpec>,
                     h_smtp: &mut Option<RouteSpec>|
     -> anyhow::Result<()> {
        access_token = r.fresh_access_token()?;
        *d_imap = direct(r.port("imaps"), &access_token);
        *d_smtp = direct(r.port("submission"), &access_token);
        if let Some(h) = &haproxy {
            *h_imap = Some(relay(h.imap, &access_token));
            *h_smtp = h.smtp.map(|a| relay(a, &access_token));
        }
        Ok(())
    };
    // Warm up: mailbridge's first login pays Argon2 and a refresh.
    env.call(Job::LoginLatency {
        a: p_imap.clone(),
        b: d_imap.clone(),
        more: h_imap.clone().into_iter().collect(),
        total: 10,
        block: 5,
    })?;
    let mut rows = Vec::new();
    let rounds = plan.real_fetch_rounds;
    if wants("login") {
        say("real servers: login latency");
        renew(&mut d_imap, &mut d_smtp, &mut h_imap, &mut h_smtp)?;
        let routes = with_haproxy(&[p_imap.clone(), d_imap.clone()], &h_imap);
        rows.extend(login_rows(plan, &login_samples(env, &routes, plan)?));
    }
    if wants("fetch") {
        say("real servers: filling the mailbox over IMAP, then FETCH");
        renew(&mut d_imap, &mut d_smtp, &mut h_imap, &mut h_smtp)?;
        env.call(Job::Append {
            route: d_imap.clone(),
            mailbox: "INBOX".into(),
            count: plan.mailbox_messages,
            size: plan.message_size,
        })?;
        let routes = with_haproxy(&[p_imap.clone(), d_imap.clone()], &h_imap);
        let s = fetch_samples_n(env, &routes, plan, rounds)?;
        let row = fetch_row(plan, &s);
        rows.push(Row {
            what: row.what.replace(
                &format!("median of {}", plan.fetch_rounds),
                &format!("median of {rounds}"),
            ),
            ..row
        });
    }
    if wants("smtp") {
        let rounds = plan.real_smtp_rounds;
        for sessions in [1, 20] {
            say(&format!("real servers: SMTP over {sessions} session(s)"));
            renew(&mut d_imap, &mut d_smtp, &mut h_imap, &mut h_smtp)?;
            let routes = with_haproxy(&[p_smtp.clone(), d_smtp.clone()], &h_smtp);
            let s = smtp_samples_to(
                env,
                &routes,
                sessions,
                plan,
                rounds,
                Some((&r.user, &r.user)),
            )?;
            let row = smtp_row(plan, sessions, &s);
            rows.push(Row {
                what: row.what.replace(
                    &format!("median of {}", plan.smtp_rounds),
                    &format!("median of {rounds}"),
                ),
                ..row
            });
        }
    }
    Ok(rows)
}
