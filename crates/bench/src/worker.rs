//! The client process. The benchmark runs its clients in a process of their
//! own, apart from the sandbox servers and from mailbridge, so that a
//! direct connection crosses process boundaries as a real client's does,
//! and so no process needs more than one socket per session (10,000 idle
//! sessions fit under a 20,000 open-files limit).
//!
//! The runner writes one [`Job`] per line (JSON) to the worker's standard
//! input; the worker answers each with one [`Reply`] line on standard
//! output. Sessions opened by [`Job::Burst`] stay open in the worker until
//! [`Job::CloseAll`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use super::client::{Imap, Route, message_wire};
use super::scenario;

/// A [`Route`] as it travels to the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RouteSpec {
    /// Straight to the upstream with TLS and XOAUTH2.
    Direct {
        /// The upstream server.
        addr: SocketAddr,
        /// The CA the client trusts (PEM).
        ca_pem: String,
        /// The name checked in the certificate.
        name: String,
        /// The mailbox.
        user: String,
        /// A live access token.
        token: String,
    },
    /// Plain text to a relay that does TLS upstream (haproxy), XOAUTH2.
    Relay {
        /// The relay's listener.
        addr: SocketAddr,
        /// The mailbox.
        user: String,
        /// A live access token.
        token: String,
    },
    /// Through mailbridge with the local password.
    Proxy {
        /// mailbridge's listener.
        addr: SocketAddr,
        /// The account.
        user: String,
        /// The local password.
        password: String,
    },
}

/// What the worker should do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Job {
    /// [`scenario::login_latency_all`] over `a`, `b` and `more`.
    LoginLatency {
        /// First route.
        a: RouteSpec,
        /// Second route.
        b: RouteSpec,
        /// Further routes, in the same interleaving.
        #[serde(default)]
        more: Vec<RouteSpec>,
        /// Logins per route.
        total: usize,
        /// Logins per block.
        block: usize,
    },
    /// [`scenario::fetch`].
    Fetch {
        /// Where.
        route: RouteSpec,
        /// The sequence set.
        set: String,
    },
    /// [`scenario::smtp`] with messages of `size` bytes.
    Smtp {
        /// Where.
        route: RouteSpec,
        /// Sessions at once.
        sessions: usize,
        /// Messages over all sessions.
        messages: usize,
        /// Bytes per message.
        size: usize,
        /// MAIL FROM (default `bench@example.com`; a real server may want
        /// the logged-in address).
        #[serde(default)]
        from: Option<String>,
        /// RCPT TO (default `rcpt@example.com`).
        #[serde(default)]
        to: Option<String>,
    },
    /// [`scenario::append`]: fills a mailbox.
    Append {
        /// Where.
        route: RouteSpec,
        /// The mailbox.
        mailbox: String,
        /// Messages.
        count: usize,
        /// Bytes each.
        size: usize,
    },
    /// [`scenario::concurrent_logins`].
    ConcurrentLogins {
        /// Where.
        route: RouteSpec,
        /// How many at once.
        n: usize,
    },
    /// A direct client's refresh (one POST to the token endpoint), then
    /// `n` concurrent logins with the new token; timed together.
    RefreshThenLogins {
        /// The provider's token endpoint.
        token_url: String,
        /// The OAuth2 client.
        client_id: String,
        /// The refresh token to use.
        refresh_token: String,
        /// Where to log in (its token is replaced).
        route: RouteSpec,
        /// How many at once.
        n: usize,
    },
    /// [`scenario::burst`]; the sessions stay open.
    Burst {
        /// Where.
        route: RouteSpec,
        /// How many at once.
        n: usize,
    },
    /// A NOOP on every open session; those that fail are closed.
    NoopAll,
    /// Closes every open session.
    CloseAll,
}

/// The worker's answer to one [`Job`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply")]
pub enum Reply {
    /// Per-login timings in microseconds, for `a`, `b` and `more`.
    Timings {
        /// Route `a`.
        a: Vec<u64>,
        /// Route `b`.
        b: Vec<u64>,
        /// The further routes, in order.
        #[serde(default)]
        more: Vec<Vec<u64>>,
    },
    /// A FETCH.
    Fetched {
        /// Microseconds.
        elapsed_us: u64,
        /// Messages.
        messages: u32,
        /// Bytes of message data.
        bytes: u64,
    },
    /// A timed run.
    Elapsed {
        /// Microseconds.
        elapsed_us: u64,
    },
    /// A refresh and the logins after it.
    Refreshed {
        /// Microseconds.
        elapsed_us: u64,
        /// The rotated refresh token, if the provider sent one.
        refresh_token: Option<String>,
    },
    /// A burst.
    Burst {
        /// Sessions logged in.
        ok: usize,
        /// Sessions that failed.
        failed: usize,
        /// Microseconds to open them all.
        elapsed_us: u64,
        /// The first failure.
        first_error: Option<String>,
    },
    /// Sessions open after a NOOP round or a close.
    Open {
        /// How many.
        sessions: usize,
    },
    /// The job failed.
    Failed {
        /// Why.
        error: String,
    },
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The worker's state: TLS configs by CA (one per CA, so TLS sessions
/// resume across jobs as they do inside mailbridge) and open sessions.
#[derive(Default)]
pub struct Worker {
    tls: HashMap<String, Arc<rustls::ClientConfig>>,
    sessions: Vec<Imap>,
    http: Option<reqwest::Client>,
}

impl Worker {
    /// A [`Route`] for `spec`.
    pub fn route(&mut self, spec: &RouteSpec) -> io::Result<Route> {
        Ok(match spec {
            RouteSpec::Direct {
                addr,
                ca_pem,
                name,
                user,
                token,
            } => {
                let tls = match self.tls.get(ca_pem) {
                    Some(c) => c.clone(),
                    None => {
                        let c = client_config(ca_pem)?;
                        self.tls.insert(ca_pem.clone(), c.clone());
                        c
                    }
                };
                Route::Direct {
                    addr: *addr,
                    tls,
                    name: ServerName::try_from(name.clone())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                    user: user.clone(),
                    token: token.clone(),
                }
            }
            RouteSpec::Relay { addr, user, token } => Route::Relay {
                addr: *addr,
                user: user.clone(),
                token: token.clone(),
            },
            RouteSpec::Proxy {
                addr,
                user,
                password,
            } => Route::Proxy {
                addr: *addr,
                user: user.clone(),
                password: password.clone(),
            },
        })
    }

    /// Runs one job.
    pub async fn run(&mut self, job: Job) -> Reply {
        match self.try_run(job).await {
            Ok(r) => r,
            Err(e) => Reply::Failed {
                error: e.to_string(),
            },
        }
    }

    async fn try_run(&mut self, job: Job) -> io::Result<Reply> {
        Ok(match job {
            Job::LoginLatency {
                a,
                b,
                more,
                total,
                block,
            } => {
                let mut routes = vec![self.route(&a)?, self.route(&b)?];
                for r in &more {
                    routes.push(self.route(r)?);
                }
                let mut times = scenario::login_latency_all(&routes, total, block)
                    .await?
                    .into_iter()
                    .map(|t| t.into_iter().map(us).collect::<Vec<u64>>());
                Reply::Timings {
                    a: times.next().unwrap_or_default(),
                    b: times.next().unwrap_or_default(),
                    more: times.collect(),
                }
            }
            Job::Fetch { route, set } => {
                let route = self.route(&route)?;
                let (elapsed, got) = scenario::fetch(&route, &set).await?;
                Reply::Fetched {
                    elapsed_us: us(elapsed),
                    messages: got.messages,
                    bytes: got.bytes,
                }
            }
            Job::Smtp {
                route,
                sessions,
                messages,
                size,
                from,
                to,
            } => {
                let route = self.route(&route)?;
                let from = from.unwrap_or_else(|| "bench@example.com".into());
                let to = to.unwrap_or_else(|| "rcpt@example.com".into());
                let wire = Arc::new(message_wire(size, &from, &to));
                let elapsed =
                    scenario::smtp(&route, sessions, messages, wire, (&from, &to)).await?;
                Reply::Elapsed {
                    elapsed_us: us(elapsed),
                }
            }
            Job::Append {
                route,
                mailbox,
                count,
                size,
            } => {
                let route = self.route(&route)?;
                scenario::append(&route, &mailbox, count, size).await?;
                Reply::Open { sessions: 0 }
            }
            Job::ConcurrentLogins { route, n } => {
                let route = self.route(&route)?;
                Reply::Elapsed {
                    elapsed_us: us(scenario::concurrent_logins(&route, n).await?),
                }
            }
            Job::RefreshThenLogins {
                token_url,
                client_id,
                refresh_token,
                route,
                n,
            } => {
                let route = self.route(&route)?;
                let http = match &self.http {
                    Some(http) => http.clone(),
                    None => {
                        // No fallback to a default client: it would follow
                        // redirects with the refresh token.
                        let http = reqwest::Client::builder()
                            .redirect(reqwest::redirect::Policy::none())
                            .build()
                            .map_err(io::Error::other)?;
                        self.http.insert(http).clone()
                    }
                };
                let started = Instant::now();
                let (token, rotated) =
                    refresh(&http, &token_url, &client_id, &refresh_token).await?;
                scenario::concurrent_logins(&route.with_token(&token), n).await?;
                Reply::Refreshed {
                    elapsed_us: us(started.elapsed()),
                    refresh_token: rotated,
                }
            }
            Job::Burst { route, n } => {
                let route = self.route(&route)?;
                let burst = scenario::burst(&route, n).await;
                let ok = burst.sessions.len();
                self.sessions.extend(burst.sessions);
                Reply::Burst {
                    ok,
                    failed: burst.failed,
                    elapsed_us: us(burst.elapsed),
                    first_error: burst.first_error,
                }
            }
            Job::NoopAll => {
                let sessions = std::mem::take(&mut self.sessions);
                self.sessions = scenario::noop_all(sessions).await;
                Reply::Open {
                    sessions: self.sessions.len(),
                }
            }
            Job::CloseAll => {
                self.sessions.clear();
                Reply::Open { sessions: 0 }
            }
        })
    }
}

fn client_config(ca_pem: &str) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(mailbridge::net::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `grant_type=refresh_token` at `token_url`: the access token and the
/// rotated refresh token, if any.
async fn refresh(
    http: &reqwest::Client,
    token_url: &str,
    client_id: &str,
    refresh_token: &str,
) -> io::Result<(String, Option<String>)> {
    let body = format!(
        "grant_type=refresh_token&refresh_token={}&client_id={}",
        form_escape(refresh_token),
        form_escape(client_id)
    );
    let resp = http
        .post(token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(io::Error::other)?;
    let status = resp.status();
    let json: serde_json::Value = resp.json().await.map_err(io::Error::other)?;
    if !status.is_success() {
        return Err(io::Error::other(format!("refresh refused: {json}")));
    }
    let access = json["access_token"]
        .as_str()
        .ok_or_else(|| io::Error::other("no access_token in the token response"))?;
    Ok((
        access.to_string(),
        json["refresh_token"].as_str().map(str::to_string),
    ))
}

/// `application/x-www-form-urlencoded` escaping.
pub fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The worker loop: one JSON [`Job`] per input line, one JSON [`Reply`]
/// per output line, until end of input.
pub async fn serve<R, W>(input: R, mut output: W) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut worker = Worker::default();
    let mut lines = input.lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Job>(&line) {
            Ok(job) => worker.run(job).await,
            Err(e) => Reply::Failed {
                error: format!("bad job: {e}"),
            },
        };
        let mut text = serde_json::to_string(&reply).map_err(io::Error::other)?;
        text.push('\n');
        output.write_all(text.as_bytes()).await?;
        output.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_form_values() {
        assert_eq!(form_escape("a b+c/=~"), "a%20b%2Bc%2F%3D~");
    }

    #[tokio::test]
    async fn answers_bad_jobs_and_closes() {
        let input: &[u8] = b"{\"op\":\"CloseAll\"}\nnot json\n";
        let mut out = Vec::new();
        serve(input, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let replies: Vec<Reply> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(matches!(replies[0], Reply::Open { sessions: 0 }));
        assert!(matches!(&replies[1], Reply::Failed { error } if error.starts_with("bad job")));
    }
}
