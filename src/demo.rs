//! `mailbridge demo`: the sandbox provider, a sandbox IMAP server with a
//! message in it, and mailbridge in front, all on loopback, with commands
//! to try. Needs no account anywhere.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use secrecy::SecretString;

use crate::config::Settings;
use crate::sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use crate::server::Server;
use crate::store::seal::GrantData;
use crate::store::{AccountMeta, SledStore, TokenStore};

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

/// Runs the demo until `shutdown` completes.
pub async fn run(imap_port: u16, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default())
        .await
        .context("starting the sandbox OAuth2 provider")?;
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
        .await
        .context("starting the sandbox IMAP server")?;
    imap.append(DEMO_USER, "INBOX", WELCOME.as_bytes().to_vec());

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

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{imap_port}"

[providers.sandbox]
preset = "custom"
client_id = "mailbridge-test"
token_url = "{token_url}"
ca_file = "{ca}"
imap = {{ host = "127.0.0.1", port = {upstream_port}, tls = "implicit" }}

[[account]]
user = "{DEMO_USER}"
provider = "sandbox"
"#,
        token_url = provider.token_url(),
        ca = ca.display(),
        upstream_port = imap.addr().port(),
    );
    let settings = Settings::parse(&config, "demo config").context("building the demo config")?;
    let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary()?);
    let vault = crate::server::vault_for(&settings, store.clone());
    let refresh = provider.issue_refresh_token(DEMO_USER, "mail");
    vault
        .create(
            DEMO_USER,
            &SecretString::from(DEMO_PASSWORD.to_string()),
            GrantData {
                refresh_token: Some(SecretString::from(refresh)),
                obtained_at: 0,
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

    let server = Server::bind(settings, store)
        .await
        .context("starting mailbridge (is the port in use? try --imap-port 0)")?;
    let addr = server.local_addrs()[0];
    println!(
        "\nmailbridge demo is running.\n\n\
         sandbox OAuth2 provider: {}\n\
         sandbox IMAP server:     {} (implicit TLS, bearer tokens only)\n\
         mailbridge IMAP:         {addr} (plain password logins)\n\n\
         List INBOX, logging in with a password:\n  \
         curl 'imap://{addr}/INBOX' -X 'FETCH 1:* (UID FLAGS RFC822.SIZE)' --user '{DEMO_USER}:{DEMO_PASSWORD}'\n\n\
         Fetch the first message of INBOX (add -v to watch the IMAP dialogue):\n  \
         curl 'imap://{addr}/INBOX;UID=1' --user '{DEMO_USER}:{DEMO_PASSWORD}'\n\n\
         Or point any IMAP client at {addr} (no TLS) with that user and password.\n\
         Press Ctrl-C to stop.\n",
        provider.base_url(),
        imap.addr(),
    );
    server.run(shutdown).await;
    imap.shutdown();
    provider.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
