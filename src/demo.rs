//! `mailbridge demo`: the sandbox provider, sandbox IMAP, POP3 and SMTP
//! servers with a message waiting, and mailbridge in front, all on
//! loopback, with commands to try. Needs no account anywhere.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use secrecy::SecretString;

use crate::config::Settings;
use crate::server::Server;
use crate::store::seal::GrantData;
use crate::store::{AccountMeta, SledStore, TokenStore};
use mailbridge_sandbox::{
    ImapServer, ImapServerOptions, Pop3Server, Pop3ServerOptions, Provider, ProviderOptions,
    SmtpServer, SmtpServerOptions, TestPki,
};

/// The demo's login name.
pub const DEMO_USER: &str = "demo@example.com";
/// The demo's local password (printed; this is a demo).
pub const DEMO_PASSWORD: &str = "demo-password";

const WELCOME: &str = "From: mailbridge demo <demo@example.com>\r\n\
To: demo@example.com\r\n\
Subject: Hello through mailbridge\r\n\
Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n\
Message-ID: <welcome@demo.mailbridge>\r\n\
\r\n\
This message was fetched from a sandbox IMAP server that only accepts\r\n\
OAuth2 bearer tokens. You logged in with a plain password.\r\n";

/// Ports of the demo's mailbridge listeners on 127.0.0.1 (0: any free one).
#[derive(Debug, Clone, Copy)]
pub struct DemoPorts {
    /// IMAP listener.
    pub imap: u16,
    /// POP3 listener.
    pub pop3: u16,
    /// SMTP listener.
    pub smtp: u16,
    /// The status page.
    pub status: u16,
}

/// Runs the demo until `shutdown` completes.
pub async fn run(ports: DemoPorts, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default())
        .await
        .context("starting the sandbox OAuth2 provider")?;
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
        .await
        .context("starting the sandbox IMAP server")?;
    imap.append(DEMO_USER, "INBOX", WELCOME.as_bytes().to_vec());
    let pop3 = Pop3Server::start(Pop3ServerOptions::default(), provider.validator(), &pki)
        .await
        .context("starting the sandbox POP3 server")?;
    pop3.append(DEMO_USER, WELCOME.as_bytes().to_vec());
    let smtp = SmtpServer::start(SmtpServerOptions::default(), provider.validator(), &pki)
        .await
        .context("starting the sandbox SMTP server")?;

    let dir = std::env::temp_dir().join(format!("mailbridge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = dir.join("sandbox-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).with_context(|| format!("writing {}", ca.display()))?;

    let config = format!(
        r#"
[server]
# Cheap sealing for a throwaway demo store.
kdf_memory_kib = 1024
kdf_iterations = 1

[status]
bind = "127.0.0.1:{status_port}"

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{imap_port}"

[[listener]]
protocol = "pop3"
bind = "127.0.0.1:{pop3_port}"

[[listener]]
protocol = "smtp"
bind = "127.0.0.1:{smtp_port}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "localhost", port = {upstream_port}, tls = "implicit" }}
pop3 = {{ host = "localhost", port = {pop3_upstream}, tls = "implicit" }}
smtp = {{ host = "localhost", port = {smtp_upstream}, tls = "starttls" }}

[[account]]
user = "{DEMO_USER}"
provider = "sandbox"
"#,
        token_url = provider.token_url(),
        ca = ca.display(),
        upstream_port = imap.addr().port(),
        pop3_upstream = pop3.addr().port(),
        smtp_upstream = smtp.addr().port(),
        imap_port = ports.imap,
        pop3_port = ports.pop3,
        smtp_port = ports.smtp,
        status_port = ports.status,
    );
    let settings = Settings::parse(&config, "demo config").context("building the demo config")?;
    let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary()?);
    let vault = crate::server::vault_for(&settings, store.clone())?;
    let refresh = provider.issue_refresh_token(DEMO_USER, "mail");
    vault
        .create(
            DEMO_USER,
            &SecretString::from(DEMO_PASSWORD.to_string()),
            GrantData {
                refresh_token: Some(SecretString::from(refresh)),
                obtained_at: 0,
                client_id: None,
                shared_access: None,
            },
            AccountMeta {
                provider: "sandbox".into(),
                upstream_user: DEMO_USER.into(),
                ..AccountMeta::default()
            },
            false,
        )
        .await?;
    drop(vault);

    let server = Server::bind(settings, store).await.context(
        "starting mailbridge (is a port in use? try --imap-port 0 --pop3-port 0 --smtp-port 0)",
    )?;
    let addrs = server.local_addrs();
    let (addr, pop3_addr, smtp_addr) = (addrs[0], addrs[1], addrs[2]);
    let status = server
        .status_addr()
        .map(|a| format!("http://{a}/ (metrics: http://{a}/metrics)"))
        .unwrap_or_default();
    let login = format!("{DEMO_USER}:{DEMO_PASSWORD}");
    println!(
        "\nmailbridge demo is running.\n\n\
         sandbox OAuth2 provider: {provider_url}\n\
         sandbox mail servers:    IMAP {imap_up} and POP3 {pop3_up} (implicit TLS), SMTP {smtp_up} (STARTTLS);\n\
         \x20                        they accept OAuth2 bearer tokens only\n\
         mailbridge:              IMAP {addr}, POP3 {pop3_addr}, SMTP {smtp_addr} (plain password logins)\n\
         status page:             {status}\n\n\
         List INBOX over IMAP, logging in with a password:\n  \
         curl 'imap://{addr}/INBOX' -X 'FETCH 1:* (UID FLAGS RFC822.SIZE)' --user '{login}'\n\n\
         Fetch the first message over IMAP (add -v to watch the dialogue):\n  \
         curl 'imap://{addr}/INBOX;UID=1' --user '{login}'\n\n\
         Fetch it over POP3:\n  \
         curl 'pop3://{pop3_addr}/1' --user '{login}'\n\n\
         Send a message over SMTP:\n  \
         printf 'Subject: hello\\r\\n\\r\\nsent through mailbridge\\r\\n' | curl 'smtp://{smtp_addr}' --mail-from {DEMO_USER} --mail-rcpt friend@example.org --upload-file - --user '{login}'\n\n\
         Or point any mail client at these ports (no TLS) with that user and password.\n\
         Press Ctrl-C to stop.\n",
        provider_url = provider.base_url(),
        imap_up = imap.addr(),
        pop3_up = pop3.addr(),
        smtp_up = smtp.addr(),
    );
    // Say when the sandbox SMTP server accepts a message sent through us.
    let watcher = {
        let smtp = smtp.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let messages = smtp.messages();
                for m in messages.iter().skip(seen) {
                    println!(
                        "sandbox SMTP server received a message from <{}> to {} ({} bytes), authenticated as {}",
                        m.from,
                        m.to.iter()
                            .map(|t| format!("<{t}>"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        m.data.len(),
                        m.user
                    );
                }
                seen = messages.len();
            }
        })
    };
    server.run(shutdown).await;
    watcher.abort();
    smtp.shutdown();
    pop3.shutdown();
    imap.shutdown();
    provider.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
