//! The `mailbridge` binary end to end: check-config, account import, run
//! (a real process serving a real login), account commands while it runs
//! (through its control socket), account list and remove.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";

fn mailbridge(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_example_and_names_the_bad_line() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let (ok, out, err) = mailbridge(&["check-config", "--config", example], "");
    assert!(ok, "{err}");
    assert!(out.contains("OK"), "{out}");

    let dir = temp_dir("cli-bad");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\ntsl = \"none\"\n",
    )
    .unwrap();
    let (ok, _, err) = mailbridge(&["check-config", "--config", bad.to_str().unwrap()], "");
    assert!(!ok);
    assert!(err.contains("line 4") && err.contains("tsl"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `run` would fail on, or quietly get wrong, is refused by
/// `check-config` with the field and its line.
#[test]
fn check_config_refuses_what_run_would_fail_on() {
    let dir = temp_dir("cli-refused");
    let good_ca = dir.join("ca.pem");
    std::fs::write(&good_ca, TestPki::generate().ca_pem).unwrap();
    let no_cert = dir.join("no-cert.pem");
    std::fs::write(&no_cert, "# the CA goes here\n").unwrap();
    let base = |server: &str, extra: &str, ca: &std::path::Path| {
        format!(
            "[server]\n{server}\n\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\n{extra}\n[providers.p]\npreset = \"custom\"\nclient_id = \"x\"\ntoken_url = \"https://login.example/token\"\nca_file = \"{}\"\nimap = {{ host = \"imap.example\", port = 993 }}\n",
            ca.display()
        )
    };
    let second_listener = "\n[[listener]]\nprotocol = \"pop3\"\nbind = \"0.0.0.0:1143\"\n";
    let cases: [(&str, String, &str, &str); 6] = [
        (
            "two listeners",
            base("", second_listener, &good_ca),
            "listener.bind",
            "line 8",
        ),
        (
            "ca_file",
            base("", "", &no_cert),
            "providers.p.ca_file",
            "line 12",
        ),
        (
            "login timeout",
            base("login_timeout_secs = 0", "", &good_ca),
            "server.login_timeout_secs",
            "line 2",
        ),
        ("empty", String::new(), "listener", "line 1"),
        (
            "kdf memory",
            base("kdf_memory_kib = 1", "", &good_ca),
            "server.kdf_memory_kib",
            "line 2",
        ),
        (
            "connections",
            base("max_connections = 0", "", &good_ca),
            "server.max_connections",
            "line 2",
        ),
    ];
    let good = dir.join("good.toml");
    std::fs::write(&good, base("", "", &good_ca)).unwrap();
    let (ok, out, err) = mailbridge(&["check-config", "--config", good.to_str().unwrap()], "");
    assert!(ok && out.contains("OK"), "{out}{err}");
    for (what, text, field, line) in cases {
        let file = dir.join("refused.toml");
        std::fs::write(&file, text).unwrap();
        let (ok, _, err) = mailbridge(&["check-config", "--config", file.to_str().unwrap()], "");
        assert!(!ok, "{what}: accepted");
        assert!(
            err.contains(&format!("{line}: {field}:")),
            "{what}: wants {line} and {field}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A command run as someone who may not use the service's state
/// directory says so and who to run as (needs root to act as another
/// user; skipped otherwise).
#[test]
fn a_command_without_permission_says_so() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!("skipped: needs root to run a command as another user");
        return;
    }
    let dir = temp_dir("cli-denied");
    let config = dir.join("mailbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nstate_dir = \"{}\"\n\n[[listener]]\nprotocol = \"smtp\"\nbind = \"127.0.0.1:1587\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // The service's user (root here) creates the private state directory.
    let (ok, _, err) = mailbridge(&["account", "list", "--config", cfg], "");
    assert!(ok, "{err}");
    let out = Command::new(BIN)
        .args(["account", "list", "--config", cfg])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "permission denied on {}",
            dir.join("state").display()
        )) && err.contains("run as the service's user (e.g. sudo -u mailbridge")
            && !err.contains("free space"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_run_login_list_remove() {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
        .await
        .unwrap();
    imap.append(USER, "INBOX", MESSAGE.to_vec());
    imap.append(BOB, "INBOX", MESSAGE.to_vec());
    imap.append(CAROL, "INBOX", MESSAGE.to_vec());
    let dir = temp_dir("cli");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join("mailbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
state_dir = "{state}"
kdf_memory_kib = 1024
kdf_iterations = 1
backoff_base_ms = 1

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

[[account]]
user = "{BOB}"
provider = "sandbox"
"#,
            state = dir.join("state").display(),
            token_url = provider.token_url(),
            ca = ca.display(),
            imap_port = imap.addr().port(),
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let refresh = provider.issue_refresh_token(USER, "mail");

    let (ok, out, err) = mailbridge(
        &[
            "account",
            "import",
            USER,
            "--config",
            cfg,
            "--refresh-token-stdin",
            "--password-stdin",
        ],
        &format!("{refresh}\n{PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("sealed the grant"), "{out}");
    // Importing again without --replace is refused; the grant stays.
    let (ok, _, err) = mailbridge(
        &[
            "account",
            "import",
            USER,
            "--config",
            cfg,
            "--refresh-token-stdin",
            "--password-stdin",
        ],
        "other-token\nother-password\n",
    );
    assert!(!ok && err.contains(USER), "{err}");

    let (ok, out, _) = mailbridge(&["account", "list", "--config", cfg], "");
    assert!(ok && out.contains(USER) && out.contains("never"), "{out}");

    let mut server = Reaper(
        Command::new(BIN)
            .args(["run", "--config", cfg])
            .env("MAILBRIDGE_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Drain the logs as they come, or the pipe fills and the server blocks.
    let mut stderr = server.stderr.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut logs);
        logs
    });
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "mailbridge run did not start listening");

    // The running service holds the store; account commands go through
    // its control socket, which only its user (or root) may use.
    let socket = dir.join("state").join("control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (ok, out, err) = mailbridge(&["account", "list", "--config", cfg], "");
    assert!(ok && out.contains(USER), "{out}{err}");
    assert!(err.contains("control socket"), "{err}");

    let login = |user: &'static str, password: &'static str| async move {
        let mut c = Client::plain(addr).await;
        assert!(c.line().await.starts_with("* OK"));
        let r = c
            .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
            .await;
        let reply = r.last().unwrap().clone();
        if reply.starts_with("a1 OK") {
            c.cmd("s1", "SELECT INBOX").await;
            assert_eq!(c.fetch_body("f1", 1).await, MESSAGE);
            c.cmd("z", "LOGOUT").await;
        }
        reply
    };
    assert!(login(USER, PASSWORD).await.starts_with("a1 OK"));

    // A grant added while it runs is used at once, without a restart.
    assert!(
        login(BOB, "bob's password")
            .await
            .contains("no stored authorization")
    );
    let bob_refresh = provider.issue_refresh_token(BOB, "mail");
    let (ok, out, err) = mailbridge(
        &[
            "account",
            "import",
            BOB,
            "--config",
            cfg,
            "--refresh-token-stdin",
            "--password-stdin",
        ],
        &format!("{bob_refresh}\nbob's password\n"),
    );
    assert!(ok && out.contains("sealed the grant"), "{out}{err}");
    assert!(login(BOB, "bob's password").await.starts_with("a1 OK"));

    // A password changed while it runs: the old one stops working at once.
    let (ok, out, err) = mailbridge(
        &[
            "account",
            "passwd",
            BOB,
            "--config",
            cfg,
            "--password-stdin",
        ],
        "bob's password\nbob's new password\n",
    );
    assert!(ok, "{out}{err}");
    let new = login(BOB, "bob's new password").await;
    assert!(new.starts_with("a1 OK"), "{new}");
    let old = login(BOB, "bob's password").await;
    assert!(old.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{old}");
    tokio::time::sleep(Duration::from_millis(50)).await; // past the 1 ms backoff

    // Removed while it runs: refused from then on.
    let (ok, out, err) = mailbridge(&["account", "remove", BOB, "--config", cfg], "");
    assert!(ok && out.contains("removed"), "{out}{err}");
    assert!(
        login(BOB, "bob's new password")
            .await
            .contains("no stored authorization")
    );

    // A new account: into the config, its grant through the socket, then
    // SIGHUP makes the running service take it on.
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{original}\n[[account]]\nuser = \"{CAROL}\"\nprovider = \"sandbox\"\n"),
    )
    .unwrap();
    let carol_refresh = provider.issue_refresh_token(CAROL, "mail");
    let (ok, out, err) = mailbridge(
        &[
            "account",
            "import",
            CAROL,
            "--config",
            cfg,
            "--refresh-token-stdin",
            "--password-stdin",
        ],
        &format!("{carol_refresh}\ncarol's password\n"),
    );
    assert!(ok, "{out}{err}");
    assert!(
        login(CAROL, "carol's password")
            .await
            .contains("no account")
    );
    let hup = |pid: u32| {
        let sent = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    hup(server.id());
    let mut reply = String::new();
    for _ in 0..100 {
        reply = login(CAROL, "carol's password").await;
        if reply.starts_with("a1 OK") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reply.starts_with("a1 OK"), "after SIGHUP: {reply}");
    // The provider did not change: the cached token is still used.
    let refreshes = provider.refresh_requests();
    assert!(login(USER, PASSWORD).await.starts_with("a1 OK"));
    assert_eq!(provider.refresh_requests(), refreshes);

    // A broken config on reload changes nothing.
    std::fs::write(&config, format!("{original}\n[[account]]\nuser = 3\n")).unwrap();
    hup(server.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(login(CAROL, "carol's password").await.starts_with("a1 OK"));
    assert!(login(USER, PASSWORD).await.starts_with("a1 OK"));
    // `[server]` changes are reported as needing a restart; the
    // provider's new scopes apply, so its cached token is dropped.
    std::fs::write(
        &config,
        original
            .replace("kdf_iterations = 1", "kdf_iterations = 2")
            .replace(
                "client_id = \"mailbridge-test\"",
                "client_id = \"mailbridge-test\"\nscopes = [\"mail\"]",
            ),
    )
    .unwrap();
    hup(server.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refreshes = provider.refresh_requests();
    assert!(login(USER, PASSWORD).await.starts_with("a1 OK"));
    assert_eq!(provider.refresh_requests(), refreshes + 1);
    std::fs::write(&config, &original).unwrap();

    // `mailbridge reload` (the units' ExecReload=) waits for the outcome:
    // status 0 and what is in force...
    let (ok, out, err) = mailbridge(&["reload", "--config", cfg], "");
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with("configuration reloaded: ") && out.contains("provider(s) in force"),
        "{out}"
    );
    // ...status 1 and the service's reason when it refuses the file (a
    // provider whose issuer does not answer: the command reads the file,
    // only the service discovers), the previous configuration serving on.
    std::fs::write(
        &config,
        format!(
            "{original}\n[providers.gone]\npreset = \"oidc\"\nissuer = \"https://127.0.0.1:9/realms/mail\"\nclient_id = \"x\"\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = mailbridge(&["reload", "--config", cfg], "");
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("configuration not reloaded; the previous one stays in force")
            && err.contains("127.0.0.1:9"),
        "{err}"
    );
    println!("`mailbridge reload` of a refused file: {}", err.trim());
    assert!(login(USER, PASSWORD).await.starts_with("a1 OK"));
    // A file that does not load is refused by the command itself.
    std::fs::write(&config, format!("{original}\n[[account]]\nuser = 3\n")).unwrap();
    let (ok, out, err) = mailbridge(&["reload", "--config", cfg], "");
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(cfg) && err.contains("the running service keeps the configuration in force"),
        "{err}"
    );
    std::fs::write(&config, &original).unwrap();

    // SIGTERM: a clean exit.
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = server.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = server.kill();
        panic!("mailbridge run did not stop on SIGTERM")
    });
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the control socket is removed at exit");
    let (ok, out, err) = mailbridge(&["reload", "--config", cfg], "");
    assert!(
        !ok && err.contains("no mailbridge is running"),
        "{out}{err}"
    );
    let logs = log_reader.join().unwrap();
    assert!(logs.contains("logged in; relaying"), "{logs}");
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(logs.contains("configuration not reloaded"), "{logs}");
    assert!(
        logs.contains("changes to [server] take effect only at a restart"),
        "{logs}"
    );
    for secret in [
        PASSWORD.to_string(),
        refresh.clone(),
        bob_refresh.clone(),
        carol_refresh.clone(),
        "bob's new password".to_string(),
        "carol's password".to_string(),
    ]
    .into_iter()
    .chain(provider.issued_tokens())
    {
        assert!(!logs.contains(&secret), "a secret appeared in the run logs");
    }

    let (ok, out, _) = mailbridge(&["account", "list", "--config", cfg], "");
    assert!(
        ok && out.contains(USER) && !out.contains("never"),
        "last login shown: {out}"
    );
    // The last refresh, which the service's start goes by.
    let header = out.lines().next().unwrap_or_default();
    let column = header
        .find("LAST REFRESH (UTC)")
        .expect("a last-refresh column");
    let alice = out
        .lines()
        .find(|l| l.starts_with(USER))
        .unwrap_or_default();
    assert!(
        alice
            .get(column..column + 4)
            .is_some_and(|year| year.starts_with("20")),
        "{out}"
    );

    for user in [USER, CAROL] {
        let (ok, out, err) = mailbridge(&["account", "remove", user, "--config", cfg], "");
        assert!(ok && out.contains("removed"), "{out}{err}");
    }
    let (ok, out, _) = mailbridge(&["account", "list", "--config", cfg], "");
    assert!(ok && out.contains("no stored grants"), "{out}");

    imap.shutdown();
    provider.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn demo_serves_a_password_login() {
    let mut demo = Reaper(
        Command::new(BIN)
            .args([
                "demo",
                "--imap-port",
                "0",
                "--pop3-port",
                "0",
                "--smtp-port",
                "0",
                "--status-port",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut addrs: Vec<std::net::SocketAddr> = Vec::new();
    let mut printed = String::new();
    for _ in 0..100 {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("mailbridge:") {
            // "IMAP a:p, POP3 a:p, SMTP a:p (plain password logins)"
            addrs = rest
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter_map(|w| w.parse().ok())
                .collect();
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    assert_eq!(
        addrs.len(),
        3,
        "three addresses in the demo's output: {printed}"
    );
    let (addr, pop3_addr, smtp_addr) = (addrs[0], addrs[1], addrs[2]);
    assert!(printed.contains("curl 'imap://"), "{printed}");
    // The status page, at the address the demo printed.
    let status = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("status page:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no status page in {printed}"))
        .to_string();
    let health = reqwest::get(format!("{status}healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let mut c = Client::plain(addr).await;
    assert!(c.line().await.starts_with("* OK"));
    let r = c
        .cmd(
            "a1",
            &format!(
                "LOGIN {} {}",
                mailbridge::demo::DEMO_USER,
                mailbridge::demo::DEMO_PASSWORD
            ),
        )
        .await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    c.cmd("s1", "SELECT INBOX").await;
    let body = c.fetch_body("f1", 1).await;
    assert!(String::from_utf8_lossy(&body).contains("Hello through mailbridge"));
    // The printed curl commands work as printed, where curl is installed
    // (CI installs it).
    if Command::new("curl").arg("--version").output().is_ok() {
        let user = format!(
            "{}:{}",
            mailbridge::demo::DEMO_USER,
            mailbridge::demo::DEMO_PASSWORD
        );
        let curl = |args: &[&str], stdin: &str| {
            let mut child = Command::new("curl")
                .args(["-sS", "--max-time", "20", "--user", &user])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let listing = curl(
            &[
                &format!("imap://{addr}/INBOX"),
                "-X",
                "FETCH 1:* (UID FLAGS RFC822.SIZE)",
            ],
            "",
        );
        assert!(listing.contains("1 FETCH"), "{listing}");
        let message = curl(&[&format!("pop3://{pop3_addr}/1")], "");
        assert!(message.contains("Hello through mailbridge"), "{message}");
        curl(
            &[
                &format!("smtp://{smtp_addr}"),
                "--mail-from",
                mailbridge::demo::DEMO_USER,
                "--mail-rcpt",
                "friend@example.org",
                "--upload-file",
                "-",
            ],
            "Subject: hello\r\n\r\nsent through mailbridge\r\n",
        );
        let mut confirmed = String::new();
        for _ in 0..20 {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
                break;
            }
            if line.contains("sandbox SMTP server received a message") {
                confirmed = line;
                break;
            }
        }
        assert!(
            confirmed.contains("<friend@example.org>"),
            "the demo reports the delivery: {confirmed}"
        );
    }
    let _ = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status();
    for _ in 0..100 {
        if demo.try_wait().unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = demo.kill();
    panic!("the demo did not stop on Ctrl-C");
}

/// The packaged completions and man pages come from the CLI itself
/// (`mailbridge generate`, hidden): each names every command.
#[test]
fn completions_and_man_pages_name_every_command() {
    let commands = [
        "run",
        "check-config",
        "account",
        "queue",
        "doctor",
        "trace",
        "demo",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script, err) = mailbridge(&["generate", "completions", shell], "");
        assert!(ok, "{shell}: {err}");
        for c in commands {
            assert!(script.contains(c), "{shell} completions lack {c}");
        }
        assert!(script.contains("count"), "{shell}: trace's options");
    }
    let dir = temp_dir("cli-man");
    let (ok, _, err) = mailbridge(&["generate", "man", dir.to_str().unwrap()], "");
    assert!(ok, "{err}");
    // (roff escapes hyphens)
    let main = std::fs::read_to_string(dir.join("mailbridge.1"))
        .unwrap()
        .replace("\\-", "-");
    assert!(
        main.starts_with(".ie") || main.contains(".TH mailbridge 1"),
        "{main}"
    );
    for c in commands {
        assert!(main.contains(c), "mailbridge.1 lacks {c}");
        assert!(
            dir.join(format!("mailbridge-{c}.1")).exists(),
            "no page for {c}"
        );
    }
    assert!(dir.join("mailbridge-account-add.1").exists());
    // The hidden command has no page and is not listed.
    assert!(!dir.join("mailbridge-generate.1").exists());
    assert!(!main.contains("generate"), "{main}");
    // A directory that does not exist is an error, not a panic.
    let (ok, _, err) = mailbridge(&["generate", "man", "/nonexistent/man"], "");
    assert!(
        !ok && err.contains("writing man pages into /nonexistent/man"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The configuration the .deb installs as /etc/mailbridge/config.toml
/// passes check-config (CI checks it again once installed).
#[test]
fn the_packaged_configuration_is_accepted() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.toml");
    let (ok, out, err) = mailbridge(&["check-config", "--config", path], "");
    assert!(ok, "{err}");
    assert!(out.contains("OK (4 listener(s)"), "{out}");
}
