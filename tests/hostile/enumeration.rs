//! Point 4: nothing learned from a refusal.

use std::time::{Duration, Instant};

use crate::common::{Client, Harness, Options, PASSWORD, USER, quote};

const NOGRANT: &str = "dave@example.com";

/// One LOGIN from `from` on a new connection: the tagged reply and the
/// time from command to reply.
async fn login(h: &Harness, from: &str, user: &str, password: &str) -> (String, Duration) {
    let mut c = Client::plain_from(from, h.addr).await;
    assert!(c.line().await.starts_with("* OK"));
    let started = Instant::now();
    let reply = c
        .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
        .await;
    (reply.last().cloned().unwrap_or_default(), started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn unknown_names_and_wrong_passwords_look_the_same_from_the_lan() {
    // The real KDF cost, so the timing means something.
    let h = Harness::start(Options {
        kdf_memory_kib: 19 * 1024,
        extra_accounts: vec![(NOGRANT, "")],
        ..Options::default()
    })
    .await;
    // One address per try, so no backoff gets in the way.
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    let mut no_grant = Vec::new();
    let mut replies = std::collections::BTreeSet::new();
    for i in 0..5 {
        let (r, t) = login(
            &h,
            &format!("127.0.1.{}", 10 + i),
            "nobody@example.com",
            "pw",
        )
        .await;
        replies.insert(r);
        unknown.push(t);
        let (r, t) = login(&h, &format!("127.0.2.{}", 10 + i), USER, "wrong").await;
        replies.insert(r);
        wrong.push(t);
        let (r, t) = login(&h, &format!("127.0.3.{}", 10 + i), NOGRANT, "pw").await;
        replies.insert(r);
        no_grant.push(t);
    }
    let (unknown, wrong, no_grant) = (median(unknown), median(wrong), median(no_grant));
    println!(
        "from the LAN, medians of 5: unknown name {:.1} ms, wrong password {:.1} ms, account without a grant {:.1} ms; replies: {replies:?}",
        unknown.as_secs_f64() * 1000.0,
        wrong.as_secs_f64() * 1000.0,
        no_grant.as_secs_f64() * 1000.0
    );
    assert_eq!(
        replies.into_iter().collect::<Vec<_>>(),
        ["a1 NO [AUTHENTICATIONFAILED] wrong user name or password (the mailbridge log says more)"]
    );
    // The unknown name pays for a verification too (without it: well
    // under a tenth of a wrong password's time).
    assert!(
        unknown * 3 >= wrong,
        "unknown {unknown:?} vs wrong {wrong:?}"
    );
    assert!(
        no_grant * 3 >= wrong,
        "no grant {no_grant:?} vs wrong {wrong:?}"
    );

    // The machine's own user is told exactly what is wrong.
    let (r, _) = login(&h, "127.0.0.1", "nobody@example.com", "pw").await;
    assert!(
        r.starts_with(
            "a1 NO [AUTHENTICATIONFAILED] mailbridge has no account for `nobody@example.com`"
        ),
        "{r}"
    );
    let (r, _) = login(&h, "127.0.0.1", USER, "wrong").await;
    assert!(
        r.starts_with("a1 NO [AUTHENTICATIONFAILED] wrong password for"),
        "{r}"
    );
    let (r, _) = login(&h, "127.0.0.1", NOGRANT, "pw").await;
    assert!(r.contains("mailbridge account add dave@example.com"), "{r}");
    // And a proven password hears the details from anywhere.
    let (r, _) = login(&h, "127.0.2.99", USER, PASSWORD).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    h.stop().await;
}

#[tokio::test]
async fn guessing_names_backs_off_like_guessing_passwords() {
    let h = Harness::start(Options {
        backoff: (30_000, 300),
        ..Options::default()
    })
    .await;
    // On one connection: three failed logins, then the connection ends.
    let mut c = Client::plain_from("127.0.0.2", h.addr).await;
    c.line().await;
    let mut answered = 0;
    for n in 0..100 {
        let reply = c
            .cmd(&format!("u{n}"), &format!("LOGIN user{n}@example.com x"))
            .await;
        if reply
            .last()
            .is_some_and(|l| l.starts_with(&format!("u{n} NO")))
        {
            answered += 1;
        }
        if reply.iter().any(|l| l.starts_with("* BYE") || l == "<EOF>") {
            break;
        }
    }
    println!("unknown names tried on one connection before it was closed: {answered}");
    assert_eq!(answered, 3);
    // Across connections: the fifth name puts the address on hold.
    let mut last = String::new();
    for n in 3..8 {
        (last, _) = login(&h, "127.0.0.2", &format!("user{n}@example.com"), "x").await;
    }
    println!("the eighth unknown name from 127.0.0.2: {last}");
    assert!(
        last.starts_with("a1 NO [UNAVAILABLE] too many failed logins; try again in"),
        "{last}"
    );
    h.stop().await;
}

#[tokio::test]
async fn authorize_on_login_acts_only_for_local_clients() {
    // An account that authorizes on first login: a client from the LAN
    // must not start the authorization (the grant would be sealed under
    // that client's password).
    let h = Harness::start(Options {
        extra_accounts: vec![(NOGRANT, "")],
        authorize_on_login: true,
        ..Options::default()
    })
    .await;
    let (r, took) = login(&h, "127.0.0.2", NOGRANT, "pw").await;
    println!(
        "an account without a grant, from the LAN: {r} ({:.1} ms)",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(
        r,
        "a1 NO [AUTHENTICATIONFAILED] wrong user name or password (the mailbridge log says more)"
    );
    assert!(h.store.load_grant(NOGRANT).unwrap().is_none());
    // From this machine it is started (the sandbox provider has no
    // authorization endpoint, so it cannot complete; that it was tried
    // is the point).
    let (r, _) = login(&h, "127.0.0.1", NOGRANT, "pw").await;
    println!("the same from 127.0.0.1: {r}");
    assert!(
        r.contains("is not authorized yet and the authorization did not complete"),
        "{r}"
    );
    h.stop().await;
}
