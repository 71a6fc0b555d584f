//! `mailbridge doctor` through the binary, against the sandbox provider
//! and the sandbox IMAP, POP3 and SMTP servers on loopback: a good account
//! (every step ok, twice, so the rotated refresh token was saved), a
//! Microsoft token for Graph and one without the POP permission, a revoked
//! grant, an unreachable server, a server without XOAUTH2, the JSON
//! document; no password or token in any output.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use mailbridge::config::Settings;
use mailbridge::store::seal::GrantData;
use mailbridge::store::{AccountMeta, SledStore, TokenStore};
use mailbridge_proto::sasl::Mechanism;
use mailbridge_sandbox::{
    ImapServer, ImapServerOptions, Pop3Server, Pop3ServerOptions, Provider, ProviderOptions,
    SandboxTls, SmtpServer, SmtpServerOptions, TestPki,
};
use secrecy::SecretString;
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");
const GRAPH: &str = "00000003-0000-0000-c000-000000000000";
const MS_SCOPES: &str = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";

#[derive(Default)]
struct Spec {
    /// `preset = "microsoft"` with these scopes (None: `custom`).
    microsoft: Option<&'static str>,
    provider: ProviderOptions,
    imap: ImapServerOptions,
    smtp: SmtpServerOptions,
    /// The IMAP endpoint's port, instead of the sandbox server's.
    imap_port: Option<u16>,
    /// `mechanisms = [...]` on the IMAP endpoint.
    imap_mechanisms: Option<&'static str>,
    /// `key_mode = "service"` with a key file.
    service: bool,
    /// The token endpoint, if not the sandbox's.
    token_url: Option<String>,
    /// The IMAP endpoint is the sandbox POP3 server (a wrong port).
    imap_at_pop3: bool,
}

struct World {
    provider: Provider,
    imap: ImapServer,
    smtp: SmtpServer,
    pop3: Pop3Server,
    dir: PathBuf,
    config: PathBuf,
}

impl World {
    async fn start(spec: Spec) -> World {
        let pki = TestPki::generate();
        let tls_name = |t: SandboxTls| match t {
            SandboxTls::StartTls => "starttls",
            _ => "implicit",
        };
        let (imap_tls, smtp_tls) = (tls_name(spec.imap.tls), tls_name(spec.smtp.tls));
        let pop3_tls = tls_name(Pop3ServerOptions::default().tls);
        let provider = Provider::start(spec.provider).await.unwrap();
        let imap = ImapServer::start(spec.imap, provider.validator(), &pki)
            .await
            .unwrap();
        let smtp = SmtpServer::start(spec.smtp, provider.validator(), &pki)
            .await
            .unwrap();
        let pop3 = Pop3Server::start(Pop3ServerOptions::default(), provider.validator(), &pki)
            .await
            .unwrap();
        let dir = temp_dir("doctor");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let (preset, scopes) = match spec.microsoft {
            Some(scopes) => (
                "microsoft",
                format!(
                    "scopes = [{}]",
                    scopes
                        .split(' ')
                        .map(|s| format!("\"{s}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            None => ("custom", String::new()),
        };
        let mechanisms = spec
            .imap_mechanisms
            .map(|m| format!(", mechanisms = {m}"))
            .unwrap_or_default();
        let text = format!(
            r#"
[server]
kdf_memory_kib = 256
kdf_iterations = 1
state_dir = {state}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:0"

[[listener]]
protocol = "pop3"
bind = "127.0.0.1:0"

[[listener]]
protocol = "smtp"
bind = "127.0.0.1:0"

[providers.sandbox]
preset = "{preset}"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = {ca}
{scopes}
imap = {{ host = "localhost", port = {imap_port}, tls = "{imap_tls}"{mechanisms} }}
pop3 = {{ host = "localhost", port = {pop3_port}, tls = "{pop3_tls}" }}
smtp = {{ host = "localhost", port = {smtp_port}, tls = "{smtp_tls}" }}

[[account]]
user = "{USER}"
provider = "sandbox"
"#,
            state = quote(&dir.join("state").display().to_string()),
            token_url = spec
                .token_url
                .clone()
                .unwrap_or_else(|| provider.token_url()),
            ca = quote(&ca.display().to_string()),
            imap_port = if spec.imap_at_pop3 {
                pop3.addr().port()
            } else {
                spec.imap_port.unwrap_or(imap.addr().port())
            },
            pop3_port = pop3.addr().port(),
            smtp_port = smtp.addr().port(),
        );
        let text = if spec.service {
            let key = dir.join("service.key");
            std::fs::write(&key, [7u8; 32]).unwrap();
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            text.replacen(
                "[server]\n",
                &format!(
                    "[server]\nkey_mode = \"service\"\nkey_file = {}\n",
                    quote(&key.display().to_string())
                ),
                1,
            )
        } else {
            text
        };
        let config = dir.join("config.toml");
        std::fs::write(&config, &text).unwrap();
        let settings = Settings::load(&config).unwrap();
        {
            let store: std::sync::Arc<dyn TokenStore> =
                std::sync::Arc::new(SledStore::open(&dir.join("state")).unwrap());
            let vault = mailbridge::server::vault_for(&settings, store).unwrap();
            let scope = spec.microsoft.unwrap_or("mail");
            vault
                .create(
                    USER,
                    &SecretString::from(PASSWORD.to_string()),
                    GrantData {
                        refresh_token: Some(SecretString::from(
                            provider.issue_refresh_token(USER, scope),
                        )),
                        obtained_at: mailbridge::clock::unix_now(),
                        client_id: None,
                        shared_access: None,
                    },
                    AccountMeta {
                        provider: "sandbox".into(),
                        upstream_user: USER.into(),
                        flow: Some("import".into()),
                        ..AccountMeta::default()
                    },
                    false,
                )
                .await
                .unwrap();
        }
        World {
            provider,
            imap,
            smtp,
            pop3,
            dir,
            config,
        }
    }

    /// `mailbridge doctor --password-stdin [extra]` with the password on
    /// standard input: (success, stdout, stderr), stdout printed. Every
    /// output is checked for secrets.
    async fn doctor(&self, extra: &[&str]) -> (bool, String, String) {
        self.doctor_with(&["--password-stdin"], extra).await
    }

    async fn doctor_with(&self, flags: &[&str], extra: &[&str]) -> (bool, String, String) {
        self.doctor_logged(flags, extra, None).await
    }

    /// [`World::doctor_with`], with `MAILBRIDGE_LOG` set to `log`.
    async fn doctor_logged(
        &self,
        flags: &[&str],
        extra: &[&str],
        log: Option<&str>,
    ) -> (bool, String, String) {
        let mut command = tokio::process::Command::new(BIN);
        command.env_remove("MAILBRIDGE_LOG");
        if let Some(filter) = log {
            command.env("MAILBRIDGE_LOG", filter);
        }
        let mut child = command
            .arg("doctor")
            .arg("--config")
            .arg(&self.config)
            .args(flags)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = tokio::time::timeout(WAIT * 3, child.wait_with_output())
            .await
            .expect("doctor finishes")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        println!("--- doctor {extra:?}: {}\n{stdout}{stderr}", out.status);
        self.assert_no_secret(&stdout);
        self.assert_no_secret(&stderr);
        (out.status.success(), stdout, stderr)
    }

    /// The local password, and every refresh and access token the
    /// provider issued, are nowhere in `text`.
    fn assert_no_secret(&self, text: &str) {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
        let tokens = self.provider.issued_tokens();
        assert!(!tokens.is_empty());
        for t in tokens {
            // A JWT-shaped token's payload is no secret by itself; the
            // whole token and its random part are.
            let secret_part = t.rsplit('.').next().unwrap_or(&t);
            assert!(
                !text.contains(&t) && !text.contains(secret_part),
                "a token leaked: {text}"
            );
        }
    }

    async fn stop(self) {
        self.imap.shutdown();
        self.smtp.shutdown();
        self.pop3.shutdown();
        self.provider.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The step lines of a human report: (verdict, step name, rest).
fn lines(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let verdict = words.next().unwrap_or_default().to_string();
            let mut name = words.next().unwrap_or_default().to_string();
            if name == "imap" || name == "pop3" || name == "smtp" {
                name = format!("{name} {}", words.next().unwrap_or_default());
            }
            (verdict, name, words.collect::<Vec<_>>().join(" "))
        })
        .collect()
}

/// The line of step `name` under the heading that contains `heading`.
fn line_of(out: &str, heading: &str, name: &str) -> String {
    let mut under = false;
    for l in out.lines() {
        if !l.starts_with(' ') && !l.is_empty() {
            under = l.contains(heading);
            continue;
        }
        if under && l.starts_with("  ") && !l.starts_with("    ") {
            let rest = l[2..]
                .split_once(' ')
                .map(|x| x.1)
                .unwrap_or("")
                .trim_start();
            if rest.starts_with(&format!("{name} ")) {
                return l.to_string();
            }
        }
    }
    panic!("no step {name} under {heading}: {out}")
}

/// The cause and fix lines right after the step line `line`.
fn why(out: &str, line: &str) -> (String, String) {
    let mut it = out.lines().skip_while(|l| *l != line).skip(1);
    let cause = it.next().unwrap_or_default().trim().to_string();
    let fix = it.next().unwrap_or_default().trim().to_string();
    assert!(cause.starts_with("cause: "), "{line}: {cause}");
    assert!(fix.starts_with("fix: "), "{line}: {fix}");
    (cause, fix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_account_passes_every_step() {
    let w = World::start(Spec::default()).await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(ok, "exit status");
    let steps = lines(&out);
    for (verdict, name, rest) in &steps {
        assert_eq!(verdict, "ok", "{name}: {rest}");
    }
    let names: Vec<&str> = steps.iter().map(|(_, n, _)| n.as_str()).collect();
    for wanted in [
        "config",
        "store",
        "dns",
        "tcp",
        "tls",
        "greeting",
        "capabilities",
        "grant",
        "refresh",
        "imap auth",
        "pop3 auth",
        "smtp auth",
        "clock",
    ] {
        assert!(names.contains(&wanted), "no {wanted}: {out}");
    }
    // A server section per protocol, each with its five checks.
    for protocol in ["imap", "pop3", "smtp"] {
        for check in ["dns", "tcp", "tls", "greeting", "capabilities"] {
            line_of(&out, &format!("{protocol} server localhost:"), check);
        }
    }
    let tls = line_of(&out, "imap server", "tls");
    assert!(
        tls.contains("chain and name verified") && tls.contains("days left"),
        "{tls}"
    );
    let caps = line_of(&out, "imap server", "capabilities");
    assert!(
        caps.contains("XOAUTH2") && caps.contains("mailbridge will use XOAUTH2"),
        "{caps}"
    );
    assert!(line_of(&out, "account alice", "imap").contains("logged out"));
    assert!(
        out.ends_with("all checks passed: 23 ok, 0 warn, 0 failed, 0 skipped\n"),
        "{out}"
    );
    // One real login per protocol (the probes stop before AUTH).
    assert_eq!(
        (w.imap.logins(), w.pop3.logins(), w.smtp.logins()),
        (1, 1, 1)
    );

    // Again, as JSON: the refresh token the first run rotated was saved,
    // or this run's refresh would be refused.
    let (ok, json, _) = w.doctor(&["--json"]).await;
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(doc["ok"], true);
    assert!(doc["config"].as_str().unwrap().ends_with("config.toml"));
    let steps = doc["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 23);
    for s in steps {
        assert_eq!(s["verdict"], "ok", "{s}");
        assert!(s["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s}");
        assert!(s["cause"].is_null() && s["fix"].is_null(), "{s}");
        for key in ["check", "account", "provider", "protocol", "server"] {
            assert!(s.get(key).is_some(), "{key} missing: {s}");
        }
    }
    let auth: Vec<&serde_json::Value> = steps.iter().filter(|s| s["check"] == "auth").collect();
    assert_eq!(auth.len(), 3);
    assert!(
        auth.iter().all(
            |s| s["account"] == USER && s["server"].as_str().unwrap().starts_with("localhost:")
        )
    );
    assert_eq!(w.provider.refresh_token_replays(), 0);
    assert_eq!(w.provider.refresh_requests(), 2);

    // With the log at trace level on standard error: still no secret
    // (checked by `doctor_logged`), and the log is there.
    let (ok, _, log) = w
        .doctor_logged(&["--password-stdin"], &[], Some("trace"))
        .await;
    assert!(ok);
    assert!(log.contains("access token refreshed"), "{log}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microsoft_token_for_graph_or_without_a_permission_fails_the_token_check() {
    // Entra ID issuing a Graph token: the refresh passes, the token check
    // fails with the cause and the fix, no login is tried.
    let w = World::start(Spec {
        microsoft: Some(MS_SCOPES),
        provider: ProviderOptions {
            access_token_audience: Some(GRAPH.into()),
            ..ProviderOptions::default()
        },
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok, "exit status");
    assert!(
        line_of(&out, "account alice", "refresh")
            .trim_start()
            .starts_with("ok")
    );
    let token = line_of(&out, "account alice", "token");
    assert!(
        token.trim_start().starts_with("FAIL") && token.contains(&format!("aud is {GRAPH}")),
        "{token}"
    );
    let (cause, fix) = why(&out, &token);
    assert!(cause.contains("refuse it"), "{cause}");
    assert!(
        fix.contains("https://outlook.office.com/IMAP.AccessAsUser.All first")
            && fix.contains("mailbridge account reauthorize alice@example.com"),
        "{fix}"
    );
    assert!(
        line_of(&out, "account alice", "imap")
            .trim_start()
            .starts_with("skip")
    );
    assert_eq!(w.imap.logins(), 0);

    // An Outlook token: the check reads `aud` and `scp`, and the logins pass.
    w.provider
        .set_access_token_audience(Some("https://outlook.office.com".into()));
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(ok, "exit status");
    let token = line_of(&out, "account alice", "token");
    assert!(
        token.contains("aud is https://outlook.office.com (Outlook)")
            && token.contains("POP.AccessAsUser.All"),
        "{token}"
    );
    w.stop().await;

    // Scopes without POP while a POP3 listener is configured.
    let w = World::start(Spec {
        microsoft: Some(
            "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access",
        ),
        provider: ProviderOptions {
            access_token_audience: Some("https://outlook.office.com".into()),
            ..ProviderOptions::default()
        },
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok);
    let token = line_of(&out, "account alice", "token");
    assert!(token.trim_start().starts_with("FAIL"), "{token}");
    let (cause, fix) = why(&out, &token);
    assert!(cause.contains("lacks POP.AccessAsUser.All"), "{cause}");
    assert!(
        fix.contains("add https://outlook.office.com/POP.AccessAsUser.All"),
        "{fix}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_fails_the_refresh_with_cause_and_fix() {
    let w = World::start(Spec::default()).await;
    w.provider.revoke_user(USER);
    let (ok, out, stderr) = w.doctor(&[]).await;
    assert!(!ok, "exit status");
    assert!(stderr.contains("check(s) failed"), "{stderr}");
    assert!(
        line_of(&out, "account alice", "grant")
            .trim_start()
            .starts_with("ok")
    );
    let refresh = line_of(&out, "account alice", "refresh");
    assert!(
        refresh.trim_start().starts_with("FAIL") && refresh.contains("invalid_grant"),
        "{refresh}"
    );
    let (cause, fix) = why(&out, &refresh);
    assert!(cause.len() > "cause: ".len(), "{cause}");
    assert!(
        fix.contains("mailbridge account reauthorize alice@example.com"),
        "{fix}"
    );
    for p in ["imap", "pop3", "smtp"] {
        assert!(
            line_of(&out, "account alice", p)
                .trim_start()
                .starts_with("skip")
        );
    }
    // The servers themselves are fine.
    assert!(
        line_of(&out, "imap server", "capabilities")
            .trim_start()
            .starts_with("ok")
    );

    // JSON: the same verdicts.
    let (ok, json, _) = w.doctor(&["--json"]).await;
    assert!(!ok);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["ok"], false);
    let refresh = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["check"] == "refresh")
        .unwrap();
    assert_eq!(refresh["verdict"], "fail");
    assert!(refresh["fix"].as_str().unwrap().contains("reauthorize"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_resolves_but_fails_tcp() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let w = World::start(Spec {
        imap_port: Some(port),
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok, "exit status");
    let heading = format!("imap server localhost:{port}");
    assert!(line_of(&out, &heading, "dns").contains("localhost resolves to"));
    let tcp = line_of(&out, &heading, "tcp");
    assert!(tcp.trim_start().starts_with("FAIL"), "{tcp}");
    let (cause, fix) = why(&out, &tcp);
    assert!(cause.contains("connection refused"), "{cause}");
    assert!(fix.contains(&format!("port {port}")), "{fix}");
    for check in ["tls", "greeting", "capabilities"] {
        assert!(
            line_of(&out, &heading, check)
                .trim_start()
                .starts_with("skip")
        );
    }
    assert!(
        line_of(&out, "account alice", "imap")
            .trim_start()
            .starts_with("skip")
    );
    // The rest still works: POP3 and SMTP log in.
    assert!(
        line_of(&out, "account alice", "pop3")
            .trim_start()
            .starts_with("ok")
    );
    assert!(
        line_of(&out, "account alice", "smtp")
            .trim_start()
            .starts_with("ok")
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_xoauth2_fails_the_capabilities_check() {
    // IMAP offers OAUTHBEARER only while the config allows XOAUTH2 only
    // (as for Microsoft); SMTP offers no bearer mechanism at all.
    let w = World::start(Spec {
        imap: ImapServerOptions {
            mechanisms: vec![Mechanism::Oauthbearer],
            ..ImapServerOptions::default()
        },
        imap_mechanisms: Some("[\"xoauth2\"]"),
        smtp: SmtpServerOptions {
            mechanisms: vec![],
            ..SmtpServerOptions::default()
        },
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok, "exit status");
    let caps = line_of(&out, "imap server", "capabilities");
    assert!(
        caps.trim_start().starts_with("FAIL") && caps.contains("OAUTHBEARER"),
        "{caps}"
    );
    let (cause, fix) = why(&out, &caps);
    assert!(cause.contains("may use only XOAUTH2"), "{cause}");
    assert!(fix.contains("mechanisms = [\"oauthbearer\"]"), "{fix}");
    let caps = line_of(&out, "smtp server", "capabilities");
    assert!(caps.trim_start().starts_with("FAIL"), "{caps}");
    let (cause, fix) = why(&out, &caps);
    assert!(cause.contains("neither XOAUTH2 nor OAUTHBEARER"), "{cause}");
    assert!(fix.contains("enable XOAUTH2 or OAUTHBEARER"), "{fix}");
    assert!(
        line_of(&out, "account alice", "imap")
            .trim_start()
            .starts_with("skip")
    );
    assert!(
        line_of(&out, "account alice", "smtp")
            .trim_start()
            .starts_with("skip")
    );
    assert!(
        line_of(&out, "account alice", "pop3")
            .trim_start()
            .starts_with("ok")
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_or_an_unknown_account_fails_at_once() {
    let w = World::start(Spec::default()).await;
    let (ok, out, _) = w.doctor(&["bob@example.com"]).await;
    assert!(!ok);
    let account = line_of(&out, "configuration", "account");
    assert!(
        account.contains("`bob@example.com` matches no [[account]]"),
        "{account}"
    );
    std::fs::write(
        &w.config,
        "[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:0\"\ntsl = \"none\"\n",
    )
    .unwrap();
    let (ok, json, _) = w.doctor(&["--json"]).await;
    assert!(!ok);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let steps = doc["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["check"], "config");
    assert_eq!(steps[0]["verdict"], "fail");
    assert!(
        steps[0]["cause"].as_str().unwrap().contains("line 4"),
        "{}",
        steps[0]
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_key_mode_needs_no_password() {
    let w = World::start(Spec {
        service: true,
        ..Spec::default()
    })
    .await;
    // No --password-stdin, no terminal: the service key opens the grant.
    let (ok, out, _) = w.doctor_with(&[], &[USER]).await;
    assert!(ok, "exit status");
    assert!(line_of(&out, "account alice", "grant").contains("with the service key"));
    for p in ["imap", "pop3", "smtp"] {
        assert!(line_of(&out, "account alice", p).contains("logged out"));
    }
    w.stop().await;

    // In password mode without a terminal nor --password-stdin, the grant
    // step says how to give the password.
    let w = World::start(Spec::default()).await;
    let (ok, out, _) = w.doctor_with(&[], &[]).await;
    assert!(!ok);
    let grant = line_of(&out, "account alice", "grant");
    let (_, fix) = why(&out, &grant);
    assert!(fix.contains("--password-stdin"), "{fix}");
    w.stop().await;
}

/// A token endpoint that answers every request with `status` and `body`
/// (JSON) and no `Date` header: its address.
async fn fixed_token_endpoint(status: u16, body: String) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // One request: its head, and a form body that fits one read.
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = 0;
                while got < buf.len() {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                    let text = String::from_utf8_lossy(&buf[..got]);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if got >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_microsoft_refusal_is_explained_from_the_table() {
    // Microsoft's answer to a refresh token unused for 90 days: the cause
    // and fix come from diagnose's table, as in logins and alerts; the
    // provider's trace ids stay out.
    let body = serde_json::json!({
        "error": "invalid_grant",
        "error_description": "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T08:00:00.0000000Z and was inactive for 90.00:00:00. Trace ID: 0b7c7d5e-1c2f-4a57-9f1e-5c4b0d1a2b00 Correlation ID: 7f0a3c1e-8d2b-4e6f-9a1b-2c3d4e5f6a7b Timestamp: 2026-11-27 10:11:12Z",
        "error_codes": [700082]
    })
    .to_string();
    let w = World::start(Spec {
        microsoft: Some(MS_SCOPES),
        token_url: Some(fixed_token_endpoint(400, body).await),
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok);
    let refresh = line_of(&out, "account alice", "refresh");
    assert!(
        refresh.trim_start().starts_with("FAIL")
            && refresh.contains("invalid_grant (AADSTS700082)"),
        "{refresh}"
    );
    let (cause, fix) = why(&out, &refresh);
    assert!(cause.contains("90 days without use"), "{cause}");
    assert!(
        fix.contains("key_mode = \"service\"")
            && fix.contains("mailbridge account reauthorize alice@example.com"),
        "{fix}"
    );
    assert!(!out.contains("Trace ID"), "{out}");
    // The endpoint sent no Date: the clock is not compared, which warns.
    let clock = line_of(&out, "provider sandbox", "clock");
    assert!(clock.trim_start().starts_with("warn"), "{clock}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_protocol_fails_the_greeting() {
    // The IMAP endpoint points at the POP3 server: TLS passes, the
    // greeting is not IMAP's.
    let w = World::start(Spec {
        imap_at_pop3: true,
        ..Spec::default()
    })
    .await;
    let (ok, out, _) = w.doctor(&[]).await;
    assert!(!ok);
    assert!(
        line_of(&out, "imap server", "tls")
            .trim_start()
            .starts_with("ok")
    );
    let greeting = line_of(&out, "imap server", "greeting");
    assert!(greeting.trim_start().starts_with("FAIL"), "{greeting}");
    let (cause, fix) = why(&out, &greeting);
    assert!(cause.contains("not an IMAP greeting"), "{cause}");
    assert!(fix.contains("is the IMAP port"), "{fix}");
    assert!(
        line_of(&out, "imap server", "capabilities")
            .trim_start()
            .starts_with("skip")
    );
    w.stop().await;
}

/// `mailbridge doctor` while `mailbridge run` holds the store (sled: the
/// command works through the control socket) and refreshes the same grant
/// at start: the two take the service's refresh lock in turn, so the
/// provider (rotation with reuse detection) never sees one refresh token
/// twice, and the grant stored at the end is the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_the_running_service_never_refresh_one_grant_at_once() {
    let w = World::start(Spec {
        service: true,
        ..Spec::default()
    })
    .await;
    // Every token request takes 3 s: the service's start-up refresh is
    // still under way when doctor wants its own.
    w.provider
        .set_token_delay(std::time::Duration::from_secs(3));
    let log = w.dir.join("run.log");
    let mut service = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&w.config)
        .env("MAILBRIDGE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = w.dir.join("state").join("control.sock");
    for _ in 0..500 {
        // Counted as requests arrive (refreshes are counted when answered).
        if socket.exists() && w.provider.token_requests() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        (w.provider.token_requests(), w.provider.refresh_requests()),
        (1, 0),
        "the service's start-up refresh is under way"
    );
    let (ok, out, err) = w.doctor_with(&[], &[USER]).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ok, "{out}{err}\n{}", log_text());
    assert!(
        err.contains("working through its control socket"),
        "doctor went through the service: {err}"
    );
    assert_eq!(
        w.provider.refresh_token_replays(),
        0,
        "a refresh token presented twice\n{}",
        log_text()
    );
    assert_eq!(w.provider.refresh_requests(), 2);
    // The service stops; the grant it leaves in the store is the one
    // doctor's refresh rotated to: a doctor with the store to itself
    // refreshes with it.
    let pid = service.id().unwrap().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(WAIT * 2, service.wait()).await;
    w.provider.set_token_delay(std::time::Duration::ZERO);
    let (ok, out, err) = w.doctor_with(&[], &[USER]).await;
    assert!(ok, "{out}{err}\n{}", log_text());
    assert_eq!(w.provider.refresh_token_replays(), 0);
    assert!(!log_text().contains("refresh token already used"));
    w.stop().await;
}
