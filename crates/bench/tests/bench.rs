//! The benchmark's clients, scenarios and worker, end to end but tiny:
//! every job once through mailbridge and once directly, against the
//! in-process harness. (The benchmark itself: `cargo bench --bench proxy`.)

// The end-to-end harness of mailbridge's own tests (tests/common).
#[path = "../../../tests/common/mod.rs"]
mod common;

use common::*;
use mailbridge_bench::worker::{Job, Reply, RouteSpec, Worker};

fn routes(h: &Harness) -> (RouteSpec, RouteSpec, RouteSpec, RouteSpec) {
    let direct = |addr| RouteSpec::Direct {
        addr,
        ca_pem: h.pki.ca_pem.clone(),
        name: "localhost".into(),
        user: USER.into(),
        token: h
            .provider
            .issue_access_token(USER, "mail", std::time::Duration::from_secs(3600)),
    };
    let proxy = |addr| RouteSpec::Proxy {
        addr,
        user: USER.into(),
        password: PASSWORD.into(),
    };
    (
        proxy(h.addr),
        direct(h.imap.addr()),
        proxy(h.smtp_addr),
        direct(h.smtp.addr()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_both_ways() {
    let h = Harness::start(Options::default()).await;
    let (imap_proxy, imap_direct, smtp_proxy, smtp_direct) = routes(&h);
    let mut w = Worker::default();
    let reply = w
        .run(Job::Append {
            route: imap_direct.clone(),
            mailbox: "INBOX".into(),
            count: 2,
            size: 70_000,
        })
        .await;
    assert!(matches!(reply, Reply::Open { .. }), "{reply:?}");
    h.imap.append(USER, "INBOX", vec![b'x'; 70_000]);
    assert_eq!(h.imap.messages(USER, "INBOX").len(), 3);

    let reply = w
        .run(Job::LoginLatency {
            a: imap_proxy.clone(),
            b: imap_direct.clone(),
            more: vec![imap_direct.clone()],
            total: 3,
            block: 2,
        })
        .await;
    match reply {
        Reply::Timings { a, b, more } => {
            assert_eq!((a.len(), b.len()), (3, 3));
            assert_eq!(more.iter().map(Vec::len).collect::<Vec<_>>(), [3]);
        }
        other => panic!("{other:?}"),
    }

    for route in [&imap_proxy, &imap_direct] {
        let reply = w
            .run(Job::Fetch {
                route: route.clone(),
                set: "1:*".into(),
            })
            .await;
        match reply {
            Reply::Fetched {
                messages, bytes, ..
            } => assert_eq!((messages, bytes), (3, 210_000)),
            other => panic!("{other:?}"),
        }
    }

    for route in [&smtp_proxy, &smtp_direct] {
        h.smtp.clear_messages();
        let reply = w
            .run(Job::Smtp {
                route: route.clone(),
                sessions: 2,
                messages: 3,
                size: 20_000,
                from: None,
                to: Some("someone@example.com".into()),
            })
            .await;
        assert!(matches!(reply, Reply::Elapsed { .. }), "{reply:?}");
        let got = h.smtp.messages();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|m| m.data.len() == 20_000));
        assert!(got.iter().all(|m| m.to == ["someone@example.com"]));
    }

    for route in [&imap_proxy, &imap_direct] {
        let reply = w
            .run(Job::ConcurrentLogins {
                route: route.clone(),
                n: 4,
            })
            .await;
        assert!(matches!(reply, Reply::Elapsed { .. }), "{reply:?}");
        let reply = w
            .run(Job::Burst {
                route: route.clone(),
                n: 5,
            })
            .await;
        assert!(
            matches!(
                reply,
                Reply::Burst {
                    ok: 5,
                    failed: 0,
                    ..
                }
            ),
            "{reply:?}"
        );
        assert!(matches!(
            w.run(Job::NoopAll).await,
            Reply::Open { sessions: 5 }
        ));
        assert!(matches!(
            w.run(Job::CloseAll).await,
            Reply::Open { sessions: 0 }
        ));
    }

    // A wrong password is a failed job with the server's words, not a hang.
    let bad = RouteSpec::Proxy {
        addr: h.addr,
        user: USER.into(),
        password: "wrong".into(),
    };
    match w.run(Job::ConcurrentLogins { route: bad, n: 1 }).await {
        Reply::Failed { error } => assert!(error.contains("NO"), "{error}"),
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_refreshes_then_logs_in() {
    let h = Harness::start(Options::default()).await;
    let (_, imap_direct, _, _) = routes(&h);
    let refresh = h.provider.issue_refresh_token(USER, "mail");
    let before = h.provider.refresh_requests();
    let mut w = Worker::default();
    let reply = w
        .run(Job::RefreshThenLogins {
            token_url: h.provider.token_url(),
            client_id: "mailbridge-test".into(),
            refresh_token: refresh.clone(),
            route: imap_direct,
            n: 3,
        })
        .await;
    match reply {
        Reply::Refreshed { refresh_token, .. } => {
            // The sandbox rotates refresh tokens.
            assert!(refresh_token.is_some_and(|r| r != refresh));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.refresh_requests() - before, 1);
    h.stop().await;
}

/// The relay route (plain text and XOAUTH2, as through haproxy), against
/// sandbox servers that take authentication in plain text, so no TLS
/// relay is needed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_route_logs_in_fetches_and_sends_with_xoauth2() {
    use mailbridge_sandbox::{
        ImapServer, ImapServerOptions, Provider, ProviderOptions, SandboxTls, SmtpServer,
        SmtpServerOptions, TestPki,
    };
    let pki = TestPki::generate();
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let imap = ImapServer::start(
        ImapServerOptions {
            tls: SandboxTls::Plain,
            ..ImapServerOptions::default()
        },
        provider.validator(),
        &pki,
    )
    .await
    .unwrap();
    let smtp = SmtpServer::start(
        SmtpServerOptions {
            tls: SandboxTls::Plain,
            ..SmtpServerOptions::default()
        },
        provider.validator(),
        &pki,
    )
    .await
    .unwrap();
    let relay = |addr| RouteSpec::Relay {
        addr,
        user: USER.into(),
        token: provider.issue_access_token(USER, "mail", std::time::Duration::from_secs(3600)),
    };
    imap.append(USER, "INBOX", vec![b'x'; 5_000]);
    let mut w = Worker::default();
    match w
        .run(Job::Fetch {
            route: relay(imap.addr()),
            set: "1:*".into(),
        })
        .await
    {
        Reply::Fetched {
            messages, bytes, ..
        } => assert_eq!((messages, bytes), (1, 5_000)),
        other => panic!("{other:?}"),
    }
    let reply = w
        .run(Job::Smtp {
            route: relay(smtp.addr()),
            sessions: 1,
            messages: 2,
            size: 10_000,
            from: None,
            to: None,
        })
        .await;
    assert!(matches!(reply, Reply::Elapsed { .. }), "{reply:?}");
    assert_eq!(smtp.message_count(), 2);
    assert_eq!(imap.logins(), 1);
    imap.shutdown();
    smtp.shutdown();
    provider.shutdown();
}
