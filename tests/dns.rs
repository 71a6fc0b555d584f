//! "Performance", point 5: the upstream connect resolves a server's name
//! once within a short cache time, and tries its addresses happy-eyeballs
//! style, so an address that never answers costs the attempt delay
//! (250 ms) rather than the connect timeout. End to end: an upstream
//! login (TCP, implicit TLS, XOAUTH2) against the sandbox IMAP server,
//! whose name "resolves" (an injected resolver) to a silent address first
//! and to the server second. The silent address is never dialled: the
//! injected connector holds it pending, so nothing leaves loopback.

mod common;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use mailbridge::config::schema::UpstreamTls;
use mailbridge::net::dial::{BoxFuture, Connect, Dialer, Resolve};
use mailbridge::net::upstream::{self, Target, Tokens};
use mailbridge_proto::imap::{ImapUpstreamLogin, UpstreamOptions};
use mailbridge_sandbox::{ImapServer, ImapServerOptions, Provider, ProviderOptions, TestPki};
use secrecy::SecretString;

/// The IPv6-less stand-in for an unreachable address: 127.0.0.2, which
/// [`Silent`] never connects to.
const SILENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Resolves every name to the silent address, then the server; counts.
struct TwoAddresses {
    port: u16,
    lookups: AtomicU64,
}

impl Resolve for TwoAddresses {
    fn resolve<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let port = self.port;
        Box::pin(async move {
            Ok(vec![
                SocketAddr::from((SILENT, port)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            ])
        })
    }
}

/// Connects for real, except to [`SILENT`], which never answers (like an
/// address whose SYNs are dropped).
struct Silent {
    attempts: AtomicU64,
}

impl Connect for Silent {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<tokio::net::TcpStream>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if addr.ip() == SILENT {
            Box::pin(std::future::pending())
        } else {
            Box::pin(tokio::net::TcpStream::connect(addr))
        }
    }
}

/// A token issued by the sandbox provider, always the same.
struct OneToken(String);

#[derive(Debug, thiserror::Error)]
#[error("no token")]
struct NoToken;

impl Tokens for OneToken {
    type Error = NoToken;
    async fn token(&self) -> Result<SecretString, NoToken> {
        Ok(SecretString::from(self.0.clone()))
    }
    async fn fresh_token(&self) -> Result<SecretString, NoToken> {
        Err(NoToken)
    }
    fn last_was_cached(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn a_silent_first_address_costs_the_attempt_delay_not_the_timeout() {
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let imap = ImapServer::start(ImapServerOptions::default(), provider.validator(), &pki)
        .await
        .unwrap();
    let dir = temp_dir("dns");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let tls = mailbridge::net::tls::client_config(Some(&ca)).unwrap();
    let resolver = Arc::new(TwoAddresses {
        port: imap.addr().port(),
        lookups: AtomicU64::new(0),
    });
    let connector = Arc::new(Silent {
        attempts: AtomicU64::new(0),
    });
    let dialer = Dialer::new(resolver.clone(), connector.clone());
    let tokens = OneToken(provider.issue_access_token(USER, "mail", Duration::from_secs(600)));
    let target = Target {
        host: "localhost",
        port: imap.addr().port(),
        tls: UpstreamTls::Implicit,
        user: USER,
    };
    // Far longer than the test may take: reaching it would mean the
    // silent address held the login.
    let connect_timeout = Duration::from_secs(60);
    for round in 1..=3 {
        let started = Instant::now();
        let conn = upstream::login_via(
            &dialer,
            &target,
            tls.clone(),
            connect_timeout,
            Box::new(ImapUpstreamLogin::new(UpstreamOptions::default())),
            &tokens,
        )
        .await
        .unwrap_or_else(|e| panic!("login {round}: {e}"));
        println!(
            "login {round}: connected and logged in in {:?} (the silent address first: {})",
            started.elapsed(),
            round == 1
        );
        drop(conn);
    }
    assert_eq!(imap.logins(), 3);
    // One lookup for the three logins; the silent address was tried once,
    // then the address that answered went first.
    assert_eq!(resolver.lookups.load(Ordering::SeqCst), 1);
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 4);
    imap.shutdown();
    provider.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
