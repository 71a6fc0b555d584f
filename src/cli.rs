//! The command line: `run`, `check-config`, `account import|list|remove`,
//! `queue`, `doctor`, `trace` and `demo`. Errors are reported with anyhow
//! here, at the edge.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::clock::unix_now;
use crate::config::Settings;
use crate::store::seal::GrantData;
use crate::store::{AccountMeta, SledStore, TokenStore};

/// Let password-only mail clients use OAuth2 mailboxes.
#[derive(Parser, Debug)]
#[command(name = "mailbridge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct ConfigArgs {
    /// The configuration file.
    #[arg(
        long,
        short,
        default_value = "/etc/mailbridge/config.toml",
        env = "MAILBRIDGE_CONFIG"
    )]
    config: PathBuf,
    /// Where grants are stored (overrides `state_dir` in the config;
    /// default: $STATE_DIRECTORY, else ~/.local/share/mailbridge).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the configured listeners until SIGINT or SIGTERM (which drain
    /// sessions first); SIGHUP reloads accounts and providers.
    Run(ConfigArgs),
    /// Check the configuration file and exit.
    CheckConfig(ConfigArgs),
    /// Make the running service read its configuration again, as SIGHUP
    /// does, and wait until it has: exit status 0 when the new
    /// configuration is in force, 1 with the reason when it is refused
    /// (the previous one then stays in force). The systemd units'
    /// ExecReload=, so that `systemctl reload` reports a refused
    /// configuration.
    Reload(ConfigArgs),
    /// Manage stored grants.
    #[command(subcommand)]
    Account(AccountCommand),
    /// The spool of messages from devices: list, retry, delete (also while
    /// the service runs: its delivery task reads the queue every few
    /// seconds).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Move the token store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Check what a login needs, step by step: the config, each mail
    /// server (DNS, TCP, TLS, greeting, mechanisms), the grant, a token
    /// refresh, Microsoft's token claims, a real login per protocol, the
    /// clock. Exit status 0 only when every check passes.
    Doctor(DoctorArgs),
    /// Show the pre-auth and login dialogue of an account's new sessions,
    /// both sides (client and mailbridge, mailbridge and the server), with
    /// passwords, tokens and SASL responses redacted, from the running
    /// service (through its control socket) until Ctrl-C.
    Trace(TraceArgs),
    /// Shell completions and man pages, for packagers.
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
    /// Run a self-contained demo: a sandbox OAuth2 provider, sandbox IMAP,
    /// POP3 and SMTP servers and mailbridge in front of them, all on loopback.
    Demo {
        /// Port for mailbridge's IMAP listener on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 1143)]
        imap_port: u16,
        /// Port for mailbridge's POP3 listener on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 1110)]
        pop3_port: u16,
        /// Port for mailbridge's SMTP listener on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 1587)]
        smtp_port: u16,
        /// Port for the status page on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 1880)]
        status_port: u16,
    },
}

/// `mailbridge doctor`'s arguments.
#[derive(clap::Args, Debug)]
struct DoctorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The account to check (a login name); all accounts when omitted.
    account: Option<String>,
    /// Print one JSON document with every step instead of text.
    #[arg(long)]
    json: bool,
    /// Read the local password of each password-mode account from a line
    /// of standard input (in the order checked) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy every account (sealed grant and metadata, as they are: no
    /// password is needed and none is asked) from the sled store in the
    /// state directory to a PostgreSQL database, then say what to put in
    /// the config. Stop mailbridge first. Accounts the database already
    /// holds are left alone (the same record) or reported (another one).
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
        /// The database (postgres://user@host:port/database); its password
        /// from `store_password_file`, `$MAILBRIDGE_STORE_PASSWORD` or
        /// `$PGPASSWORD`, as for `store`.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
enum GenerateCommand {
    /// Print the completion script for SHELL on standard output.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write a man page for mailbridge and each of its commands into DIR.
    Man {
        /// An existing directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct TraceArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The account: an [[account]]'s user, or a name a catch-all account
    /// takes.
    account: String,
    /// Stop after this many sessions (each ends at the byte relay or when
    /// it closes).
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long = "for", value_name = "SECS")]
    for_secs: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Every message queued or failed, oldest first.
    List(ConfigArgs),
    /// Send a message again: a failed one goes back to the queue, a queued
    /// one is due at once.
    Retry {
        #[command(flatten)]
        config: ConfigArgs,
        /// The message's id, as `queue list` shows it.
        id: String,
    },
    /// Remove a message for good.
    Delete {
        #[command(flatten)]
        config: ConfigArgs,
        /// The message's id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Seal an existing refresh token for an account configured in the
    /// config file, under a local password.
    Import {
        #[command(flatten)]
        config: ConfigArgs,
        /// The login name, as configured in an [[account]] table.
        user: String,
        /// Read the refresh token from the first line of standard input.
        #[arg(long, required = true)]
        refresh_token_stdin: bool,
        /// Read the local password from the next line of standard input
        /// instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Replace a grant already stored for this account.
        #[arg(long)]
        replace: bool,
    },
    /// Authorize an account configured in the config file with its
    /// provider (the flow follows the account's `grant`), then seal the
    /// grant under a local password.
    Add {
        #[command(flatten)]
        config: ConfigArgs,
        /// The login name, as configured in an [[account]] table.
        user: String,
        #[command(flatten)]
        flow: FlowArgs,
        /// Read the local password from the first line of standard input
        /// instead of prompting.
        #[arg(long, conflicts_with = "generate_password")]
        password_stdin: bool,
        /// Generate a random local password and print it once.
        #[arg(long)]
        generate_password: bool,
        /// Replace a grant already stored for this account.
        #[arg(long)]
        replace: bool,
    },
    /// Authorize an account again (e.g. after its grant was revoked or
    /// expired), keeping its local password.
    Reauthorize {
        #[command(flatten)]
        config: ConfigArgs,
        /// The login name.
        user: String,
        #[command(flatten)]
        flow: FlowArgs,
        /// Read the current local password from the first line of standard
        /// input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change an account's local password (the old one is required).
    Passwd {
        #[command(flatten)]
        config: ConfigArgs,
        /// The login name.
        user: String,
        /// Read the old and the new password from the first two lines of
        /// standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List stored grants: provider, flow, access-token expiry, last login,
    /// last error.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Delete an account's stored grant.
    Remove {
        #[command(flatten)]
        config: ConfigArgs,
        /// The login name.
        user: String,
    },
}

/// How `account add` / `reauthorize` talk to the person.
#[derive(clap::Args, Debug)]
struct FlowArgs {
    /// Do not listen for the browser's redirect: print the URL and read the
    /// address the browser was sent to back from the terminal (headless
    /// boxes, SSH sessions).
    #[arg(long, conflicts_with = "device")]
    no_browser: bool,
    /// Use the device-code flow: enter a code on any device.
    #[arg(long)]
    device: bool,
    /// Seconds to wait for the authorization.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// For grant = "password": read the upstream account's password from
    /// the next line of standard input instead of prompting.
    #[arg(long)]
    upstream_password_stdin: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = config_path(&cli.command)
        .map(crate::logging::configured_format)
        .unwrap_or_default();
    match cli.command {
        Command::Doctor(_) => crate::logging::init_with_default(format, "error"),
        _ => crate::logging::init(format),
    }
    // Taken before the runtime's threads exist: it changes the environment.
    let inherited = match cli.command {
        Command::Run(_) => crate::net::systemd::Inherited::from_env(),
        _ => crate::net::systemd::Inherited::none(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailbridge: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config file a command reads, if any: its `[server] log_format`
/// shapes the log from the first line.
fn config_path(command: &Command) -> Option<&std::path::Path> {
    let args = match command {
        Command::Run(a) | Command::CheckConfig(a) | Command::Reload(a) => a,
        Command::Doctor(d) => &d.config,
        Command::Account(
            AccountCommand::Import { config, .. }
            | AccountCommand::Add { config, .. }
            | AccountCommand::Reauthorize { config, .. }
            | AccountCommand::Passwd { config, .. }
            | AccountCommand::List { config }
            | AccountCommand::Remove { config, .. },
        ) => config,
        Command::Queue(
            QueueCommand::List(config)
            | QueueCommand::Retry { config, .. }
            | QueueCommand::Delete { config, .. },
        ) => config,
        Command::Store(StoreCommand::Migrate { config, .. }) => config,
        Command::Trace(t) => &t.config,
        Command::Demo { .. } | Command::Generate(_) => return None,
    };
    Some(&args.config)
}

fn load(args: &ConfigArgs) -> Result<Settings, crate::config::ConfigError> {
    let mut settings = Settings::load(&args.config)?;
    if let Some(dir) = &args.state_dir {
        settings.server.state_dir = Some(dir.clone());
    }
    Ok(settings)
}

/// [`load`], then the endpoints of `oidc` / `open` providers from their
/// issuers (needed before a flow runs).
async fn load_discovered(args: &ConfigArgs) -> anyhow::Result<Settings> {
    let mut settings = load(args)?;
    settings
        .discover(&crate::oauth::TokenSource::http_client()?)
        .await?;
    Ok(settings)
}

/// The store: opened here, or, while `mailbridge run` holds it, the
/// running service's through its control socket.
fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn TokenStore>> {
    // A shared database: opened here whether instances run or not.
    if let Some(url) = &settings.server.store {
        let options = crate::store::postgres::PgOptions::from_server(&settings.server)?;
        let store = crate::store::PgStore::open(url, options)
            .with_context(|| format!("opening the token store database {url}"))?;
        return Ok(Arc::new(store));
    }
    let dir = settings.server.state_dir();
    match SledStore::open(&dir) {
        Ok(store) => Ok(Arc::new(store)),
        #[cfg(unix)]
        Err(locked @ crate::store::StoreError::Locked { .. }) => {
            match crate::net::control::RemoteStore::connect(&dir) {
                Ok(remote) => {
                    eprintln!(
                        "mailbridge: the running service holds the store in {}; working through its control socket",
                        dir.display()
                    );
                    Ok(Arc::new(remote))
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Err(crate::store::StoreError::Denied {
                        path: dir.join(crate::store::control::SOCKET_NAME),
                    }
                    .into())
                }
                Err(e) => Err(anyhow::anyhow!(
                    "{locked} (it does not answer on {}: {e})",
                    dir.join(crate::store::control::SOCKET_NAME).display()
                )),
            }
        }
        Err(e) => Err(e).with_context(|| format!("opening the token store in {}", dir.display())),
    }
}

/// `mailbridge store migrate`: every account of the sled store to the
/// database at `to`, records copied sealed.
fn migrate_store(args: &ConfigArgs, to: &str) -> anyhow::Result<()> {
    let settings = load(args)?;
    let url = crate::store::StoreUrl::parse(to).map_err(|e| anyhow::anyhow!(e))?;
    let dir = settings.server.state_dir();
    let from = SledStore::open(&dir).map_err(|e| match e {
        crate::store::StoreError::Locked { .. } => anyhow::anyhow!(
            "mailbridge is running on the store in {}: stop it first, so that no refresh token rotates during the move",
            dir.display()
        ),
        e => anyhow::Error::new(e).context(format!("opening the token store in {}", dir.display())),
    })?;
    let options = crate::store::postgres::PgOptions::from_server(&settings.server)?;
    let target = crate::store::PgStore::open(&url, options)
        .with_context(|| format!("opening the database {url}"))?;
    let (mut copied, mut same, mut conflicts) = (0usize, 0usize, Vec::new());
    for account in from.accounts()? {
        if let Some(meta) = from.load_meta(&account)? {
            target.save_meta(&account, &meta)?;
        }
        let Some(grant) = from.load_grant(&account)? else {
            continue;
        };
        match target.load_grant(&account)? {
            Some(there) if there == grant => same += 1,
            Some(_) => conflicts.push(account),
            None => {
                if target.swap_grant(&account, None, &grant)? {
                    copied += 1;
                } else {
                    conflicts.push(account);
                }
            }
        }
    }
    println!(
        "copied {copied} grant(s) from {} to {url}; {same} already there",
        dir.display()
    );
    if !conflicts.is_empty() {
        anyhow::bail!(
            "the database already holds other grants for {}: left alone there (remove them with `mailbridge account remove` against the database, then migrate again, or keep them)",
            conflicts.join(", ")
        );
    }
    println!(
        "now set `store = \"{url}\"` in [server] of {} and start mailbridge; the sled store in {} is no longer read (keep it until the database is backed up)",
        args.config.display(),
        dir.display()
    );
    Ok(())
}

/// Carries out `command`; `inherited` holds the sockets systemd passed
/// (socket activation), for `run`.
async fn dispatch(
    command: Command,
    inherited: crate::net::systemd::Inherited,
) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let settings = load(&args)?;
            let reread = args.clone();
            let reloader = Box::new(move || load(&reread));
            crate::server::run(settings, shutdown_signal(), reloader, inherited).await?;
            Ok(())
        }
        Command::CheckConfig(args) => {
            let s = load(&args)?;
            // The service key, where this shell can see it: readable, long
            // enough, private.
            if s.server.key_mode == crate::config::KeyMode::Service
                && (s.server.key_file.is_some()
                    || std::env::var_os("CREDENTIALS_DIRECTORY").is_some())
            {
                crate::server::service_secret(&s)?;
            }
            // The webhook's CA and secret files, read as `run` reads them.
            crate::alerts::Alerts::new(&s.alerts)?;
            println!(
                "{}: OK ({} listener(s), {} provider(s), {} account(s))",
                args.config.display(),
                s.listeners.len(),
                s.providers.len(),
                s.accounts.len()
            );
            for note in s.notes() {
                println!("note: {note}");
            }
            Ok(())
        }
        Command::Account(cmd) => account(cmd).await,
        Command::Queue(cmd) => queue(cmd),
        Command::Store(StoreCommand::Migrate { config, to }) => migrate_store(&config, &to),
        Command::Doctor(args) => doctor(args).await,
        #[cfg(unix)]
        Command::Trace(args) => trace(args).await,
        #[cfg(unix)]
        Command::Reload(args) => {
            // A file that does not load is refused here as the service
            // would refuse it; the service is not asked.
            let settings = load(&args).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; the running service keeps the configuration in force",
                    args.config.display()
                )
            })?;
            let result = crate::net::control::request_reload(&settings.server.state_dir())
                .await
                .map_err(|e| match e {
                    // The service's own words, or why none answered.
                    crate::store::StoreError::Remote { reason } => anyhow::anyhow!(reason),
                    e => e.into(),
                })?;
            println!("configuration reloaded: {result}");
            Ok(())
        }
        #[cfg(not(unix))]
        Command::Reload(_) => bail!("reload needs the control socket, a Unix socket; send SIGHUP"),
        #[cfg(not(unix))]
        Command::Trace(_) => bail!("traces need the control socket, a Unix socket"),
        Command::Generate(GenerateCommand::Completions { shell }) => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mailbridge", &mut script);
            std::io::stdout().write_all(&script)?;
            Ok(())
        }
        Command::Generate(GenerateCommand::Man { dir }) => {
            use clap::CommandFactory;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))
        }
        Command::Demo {
            imap_port,
            pop3_port,
            smtp_port,
            status_port,
        } => {
            let ports = crate::demo::DemoPorts {
                imap: imap_port,
                pop3: pop3_port,
                smtp: smtp_port,
                status: status_port,
            };
            crate::demo::run(ports, shutdown_signal()).await
        }
    }
}

/// `mailbridge doctor`: the report on standard output (text or JSON);
/// an error, so a non-zero exit status, when a check failed.
async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let loaded = load(&args.config);
    let stdin = args.password_stdin;
    let mut passwords = move |account: &str| -> Result<SecretString, String> {
        if stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            let p = line.trim_end_matches(['\r', '\n']).to_string();
            if p.is_empty() {
                return Err(format!(
                    "no line on standard input for the local password of `{account}`"
                ));
            }
            Ok(SecretString::from(p))
        } else if std::io::stdin().is_terminal() || std::io::stderr().is_terminal() {
            rpassword::prompt_password(format!("local password of {account}: "))
                .map(SecretString::from)
                .map_err(|e| format!("cannot read the password: {e}"))
        } else {
            Err("no terminal to ask for the local password".into())
        }
    };
    let report = crate::doctor::run(
        &args.config.config,
        loaded,
        args.account.as_deref(),
        Box::new(|s: &Settings| open_store(s).map_err(|e| format!("{e:#}"))),
        &mut passwords,
    )
    .await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    if report.ok {
        Ok(())
    } else {
        bail!("{} check(s) failed", report.failures())
    }
}

/// `mailbridge trace`: prints the running service's trace of an account
/// until Ctrl-C, `--count` sessions or `--for` seconds.
#[cfg(unix)]
async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let settings = load(&args.config)?;
    let dir = settings.server.state_dir();
    let (account, mut stream) =
        crate::net::control::TraceStream::start(&dir, &args.account).await?;
    eprintln!(
        "mailbridge: tracing `{account}`: its new sessions' pre-auth and login dialogue, until {}",
        match (args.count, args.for_secs) {
            (Some(n), _) => format!("{n} session(s) have been shown (or Ctrl-C)"),
            (None, Some(s)) => format!("{s} s have passed (or Ctrl-C)"),
            (None, None) => "Ctrl-C".to_string(),
        }
    );
    eprintln!("mailbridge: {}", crate::trace::LEGEND);
    let until = args
        .for_secs
        .map(|s| tokio::time::Instant::now() + std::time::Duration::from_secs(s));
    let stop = async {
        match until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let interrupted = shutdown_signal();
    tokio::pin!(interrupted);
    let mut ended = 0;
    let mut out = std::io::stdout();
    loop {
        let event = tokio::select! {
            e = stream.next() => e?,
            () = &mut stop => return Ok(()),
            () = &mut interrupted => return Ok(()),
        };
        let Some(event) = event else {
            bail!("the service ended the trace (did it stop?)");
        };
        writeln!(out, "{event}")?;
        out.flush()?;
        if matches!(event.what, crate::trace::What::End { .. }) {
            ended += 1;
            if args.count.is_some_and(|n| ended >= n) {
                return Ok(());
            }
        }
    }
}

/// The spool the configuration names: in the database (whether an
/// instance runs or not), or the directory as it is.
fn open_spool(args: &ConfigArgs) -> anyhow::Result<crate::spool::Spool> {
    let settings = load(args)?;
    if settings.spool_in_database() {
        return crate::server::open_spool(&settings, false)
            .context("opening the spool in the database");
    }
    let dir = settings
        .spool
        .dir
        .clone()
        .unwrap_or_else(|| settings.server.state_dir().join("spool"));
    if !dir.exists() {
        anyhow::bail!(
            "there is no spool at {} (it is created when mailbridge runs with a [[device]])",
            dir.display()
        );
    }
    Ok(crate::spool::Spool::open_existing(&dir)?)
}

fn queue(cmd: QueueCommand) -> anyhow::Result<()> {
    use crate::spool::Area;
    match cmd {
        QueueCommand::List(args) => {
            let spool = open_spool(&args)?;
            let mut any = false;
            for area in [Area::Queue, Area::Failed] {
                for e in spool.list(area)? {
                    any = true;
                    let when = time::OffsetDateTime::from_unix_timestamp(e.received_at as i64)
                        .map(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .unwrap_or_default()
                        })
                        .unwrap_or_default();
                    println!(
                        "{id}  {state:<6}  {when}  {size:>9} B  {account}  from {from} ({device})  to {to}  attempts {attempts}{err}",
                        id = e.id,
                        state = area.name(),
                        size = e.size,
                        account = e.account,
                        from = if e.from.is_empty() {
                            "<>"
                        } else {
                            e.from.as_str()
                        },
                        device = e.device,
                        to = e
                            .recipients
                            .iter()
                            .chain(e.failed_recipients.iter().map(|(r, _)| r))
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(","),
                        attempts = e.attempts,
                        err = e
                            .last_error
                            .as_deref()
                            .map(|s| format!("  last error: {s}"))
                            .unwrap_or_default(),
                    );
                    for (r, why) in &e.failed_recipients {
                        println!("    refused {r}: {why}");
                    }
                }
            }
            if !any {
                println!("the spool is empty");
            }
            Ok(())
        }
        QueueCommand::Retry { config, id } => {
            let e = open_spool(&config)?.retry(&id)?;
            println!("{id}: queued for delivery to {}", e.recipients.join(", "));
            Ok(())
        }
        QueueCommand::Delete { config, id } => {
            let area = open_spool(&config)?.delete(&id)?;
            println!("{id}: deleted (it was {})", area.name());
            Ok(())
        }
    }
}

async fn account(cmd: AccountCommand) -> anyhow::Result<()> {
    match cmd {
        AccountCommand::Import {
            config,
            user,
            refresh_token_stdin: _,
            password_stdin,
            replace,
        } => {
            let settings = load(&config)?;
            let (account, _) = configured(&settings, &user, &config)?;
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            let token = lines
                .next()
                .transpose()?
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .context("expected the refresh token on the first line of standard input")?;
            let password = if password_stdin {
                let p = lines
                    .next()
                    .transpose()?
                    .map(|l| l.trim_end_matches(['\r', '\n']).to_string())
                    .filter(|l| !l.is_empty())
                    .context("expected the local password on the second line of standard input")?;
                SecretString::from(p)
            } else {
                prompt_new_password()?
            };
            drop(lines);
            let store = open_store(&settings)?;
            let vault = crate::server::vault_for(&settings, store)?;
            let meta = AccountMeta {
                provider: account.provider.clone(),
                upstream_user: account.upstream_user.clone(),
                created_at: unix_now(),
                flow: Some("import".into()),
                ..AccountMeta::default()
            };
            let grant = GrantData {
                refresh_token: Some(SecretString::from(token)),
                obtained_at: unix_now(),
                client_id: None,
                shared_access: None,
            };
            vault
                .create(&account.name, &password, grant, meta, replace)
                .await?;
            println!(
                "sealed the grant for `{}` (provider `{}`, upstream login `{}`)",
                account.name, account.provider, account.upstream_user
            );
            Ok(())
        }
        AccountCommand::Add {
            config,
            user,
            flow,
            password_stdin,
            generate_password,
            replace,
        } => {
            let settings = load_discovered(&config).await?;
            let (account, provider) = configured(&settings, &user, &config)?;
            let store = open_store(&settings)?;
            // Fail on an unusable key before anyone types or signs in.
            let vault = crate::server::vault_for(&settings, store.clone())?;
            if !replace && store.load_grant(&account.name)?.is_some() {
                bail!(
                    "`{}` already has a grant; use `account reauthorize` to renew it, or --replace",
                    account.name
                );
            }
            let (password, generated) = if generate_password {
                let p = random_password();
                (SecretString::from(p.clone()), Some(p))
            } else if password_stdin {
                (read_secret_line("the local password")?, None)
            } else {
                (prompt_new_password()?, None)
            };
            let authorized = run_flow(&account, provider, &flow).await?;
            let meta = AccountMeta {
                provider: account.provider.clone(),
                upstream_user: account.upstream_user.clone(),
                created_at: unix_now(),
                flow: Some(authorized.flow.to_string()),
                ..AccountMeta::default()
            };
            vault
                .create(&account.name, &password, authorized.grant, meta, replace)
                .await?;
            println!(
                "authorized `{}` ({}, upstream login `{}`) and sealed the grant",
                account.name, authorized.flow, account.upstream_user
            );
            if let Some(p) = generated {
                println!("local password (shown once; configure it in the mail client): {p}");
            }
            Ok(())
        }
        AccountCommand::Reauthorize {
            config,
            user,
            flow,
            password_stdin,
        } => {
            let settings = load_discovered(&config).await?;
            let (account, provider) = configured(&settings, &user, &config)?;
            let store = open_store(&settings)?;
            let vault = crate::server::vault_for(&settings, store)?;
            let password = if password_stdin {
                read_secret_line("the local password")?
            } else {
                SecretString::from(rpassword::prompt_password("current local password: ")?)
            };
            // Check the password before anyone signs in anywhere.
            vault
                .unlock(
                    &account.name,
                    &password,
                    std::net::Ipv6Addr::LOCALHOST.into(),
                )
                .await?;
            let authorized = run_flow(&account, provider, &flow).await?;
            let mut meta = vault.store().load_meta(&account.name)?.unwrap_or_default();
            meta.flow = Some(authorized.flow.to_string());
            meta.last_error = None;
            meta.access_expires_at = None;
            vault
                .create(&account.name, &password, authorized.grant, meta, true)
                .await?;
            println!("re-authorized `{}` ({})", account.name, authorized.flow);
            Ok(())
        }
        AccountCommand::Passwd {
            config,
            user,
            password_stdin,
        } => {
            let settings = load(&config)?;
            let key = settings
                .account_for(&user)
                .map(|a| a.name)
                .unwrap_or_else(|| user.to_lowercase());
            let store = open_store(&settings)?;
            let vault = crate::server::vault_for(&settings, store)?;
            let (old, new) = if password_stdin {
                (
                    read_secret_line("the old password")?,
                    read_secret_line("the new password")?,
                )
            } else {
                let old =
                    SecretString::from(rpassword::prompt_password("current local password: ")?);
                (old, prompt_new_password()?)
            };
            vault.change_password(&key, &old, &new).await?;
            println!("changed the local password of `{key}`; update it in the mail client");
            Ok(())
        }
        AccountCommand::List { config } => {
            let settings = load(&config)?;
            let store = open_store(&settings)?;
            let accounts = store.accounts()?;
            if accounts.is_empty() {
                println!(
                    "no stored grants in {}",
                    settings.server.state_dir().display()
                );
                return Ok(());
            }
            println!(
                "{:<32} {:<12} {:<19} {:<8} {:<20} {:<20} {:<20} LAST ERROR",
                "ACCOUNT",
                "PROVIDER",
                "FLOW",
                "KEY",
                "TOKEN EXPIRES (UTC)",
                "LAST REFRESH (UTC)",
                "LAST LOGIN (UTC)"
            );
            for name in accounts {
                let m = store.load_meta(&name)?.unwrap_or_default();
                let key_mode = match store.load_grant(&name)? {
                    Some(g) if g.password_hash.is_some() => "service",
                    Some(_) => "password",
                    None => "-",
                };
                println!(
                    "{:<32} {:<12} {:<19} {:<8} {:<20} {:<20} {:<20} {}",
                    name,
                    m.provider,
                    m.flow.as_deref().unwrap_or("-"),
                    key_mode,
                    m.access_expires_at
                        .map(fmt_time)
                        .unwrap_or_else(|| "-".into()),
                    m.refreshed_at.map(fmt_time).unwrap_or_else(|| "-".into()),
                    m.last_login_at
                        .map(fmt_time)
                        .unwrap_or_else(|| "never".into()),
                    m.last_error.unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        AccountCommand::Remove { config, user } => {
            let settings = load(&config)?;
            let store = open_store(&settings)?;
            let key = settings
                .account_for(&user)
                .map(|a| a.name)
                .unwrap_or_else(|| user.to_lowercase());
            if store.remove(&key)? {
                println!("removed the grant of `{key}`");
                Ok(())
            } else {
                bail!("no grant stored for `{key}`")
            }
        }
    }
}

/// The account and provider a login name maps to.
fn configured<'a>(
    settings: &'a Settings,
    user: &str,
    config: &ConfigArgs,
) -> anyhow::Result<(crate::config::Account, &'a crate::provider::Provider)> {
    let Some(account) = settings.account_for(user) else {
        bail!(
            "`{user}` matches no [[account]] in {}; add one first",
            config.config.display()
        );
    };
    let provider = settings
        .providers
        .get(&account.provider)
        .context("the account's provider is not configured")?;
    Ok((account, provider))
}

/// Runs the account's authorization flow with the terminal as interface.
async fn run_flow(
    account: &crate::config::Account,
    provider: &crate::provider::Provider,
    flow: &FlowArgs,
) -> anyhow::Result<crate::authorize::Authorized> {
    use crate::authorize::{AuthorizeOptions, Interaction};
    let upstream_password = if account.grant == crate::config::GrantKind::Password {
        Some(if flow.upstream_password_stdin {
            read_secret_line("the upstream password")?
        } else {
            SecretString::from(rpassword::prompt_password(format!(
                "password of {} at the provider: ",
                account.upstream_user
            ))?)
        })
    } else {
        None
    };
    let opts = AuthorizeOptions {
        interaction: if flow.device {
            Interaction::Device
        } else if flow.no_browser {
            Interaction::Paste
        } else {
            Interaction::Browser
        },
        timeout: std::time::Duration::from_secs(flow.timeout.max(1)),
        upstream_password,
    };
    let ui = TerminalUi::default();
    let http = crate::oauth::TokenSource::http_client()?;
    let result = crate::authorize::obtain(provider, account, &opts, &http, &ui).await;
    ui.stop_spinner();
    Ok(result?)
}

/// The terminal side of the flows: prints URLs and codes, opens a browser
/// when there is a desktop session, reads a pasted address.
#[derive(Default)]
struct TerminalUi {
    spinner: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TerminalUi {
    fn stop_spinner(&self) {
        if let Some(h) = self
            .spinner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
            eprint!("\r\x1b[K");
        }
    }
}

impl crate::oauth::flows::FlowUi for TerminalUi {
    fn show_url(&self, url: &str) {
        println!("\nTo authorize, open this address in a browser and sign in:\n\n  {url}\n");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }

    fn open_browser(&self, url: &str) -> bool {
        let opened = crate::authorize::open_browser(url);
        if opened {
            println!("(a browser window was opened; waiting for you to finish there)");
        } else {
            println!(
                "(no browser could be opened here: open the address on any machine that can reach this one's 127.0.0.1, e.g. through an SSH tunnel, or run again with --no-browser)"
            );
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        opened
    }

    async fn read_line(&self, prompt: &str) -> std::io::Result<String> {
        println!("{prompt}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    fn show_device_code(
        &self,
        verification_uri: &str,
        user_code: &str,
        complete_uri: Option<&str>,
    ) {
        println!("\nOn any device, open {verification_uri} and enter the code {user_code}");
        if let Some(c) = complete_uri {
            println!("(or open {c})");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        if std::io::stderr().is_terminal() {
            let handle = tokio::spawn(async {
                let frames = ['|', '/', '-', '\\'];
                for i in 0usize.. {
                    eprint!("\r{} waiting for the approval...", frames[i % frames.len()]);
                    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                }
            });
            *self.spinner.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        }
    }
}

/// One line of standard input as a secret (for --*-stdin flags).
fn read_secret_line(what: &str) -> anyhow::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let value = line.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() {
        bail!("expected {what} on a line of standard input");
    }
    Ok(SecretString::from(value))
}

/// A random local password: 20 characters from an unambiguous alphabet
/// (about 110 bits).
fn random_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn prompt_new_password() -> anyhow::Result<SecretString> {
    if !std::io::stdin().is_terminal() && !std::io::stderr().is_terminal() {
        bail!(
            "no terminal to ask for the local password; pass --password-stdin and give it on the second line"
        );
    }
    let first = rpassword::prompt_password("local password for this account: ")?;
    if first.is_empty() {
        bail!("the password must not be empty");
    }
    let second = rpassword::prompt_password("again: ")?;
    if first != second {
        bail!("the passwords differ");
    }
    let p = SecretString::from(first);
    debug_assert!(!p.expose_secret().is_empty());
    Ok(p)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// UTC date and time of a Unix timestamp, `YYYY-MM-DD HH:MM:SS`.
fn fmt_time(secs: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::fmt_time(1_700_000_000), "2023-11-14 22:13:20");
    }
}
