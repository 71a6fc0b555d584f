//! Point 3: backoff that stops attackers, not owners.

use std::time::{Duration, Instant};

use crate::common::{Client, Harness, Options, PASSWORD, USER, quote};

const BOB: &str = "bob@example.com";
const BOB_PW: &str = "bob's own password";
const CAROL: &str = "carol@example.com";
const CAROL_PW: &str = "carol's own password";

async fn harness(backoff: (u64, u64)) -> Harness {
    Harness::start(Options {
        extra_accounts: vec![(BOB, BOB_PW), (CAROL, CAROL_PW)],
        backoff,
        // Each test's own logins are what is measured, not the
        // per-connection allowance.
        server_extra: "preauth_max_failed_logins = 100\n".into(),
        ..Options::default()
    })
    .await
}

/// One LOGIN from `from` on a new connection: the tagged reply and the
/// time it took.
async fn login(h: &Harness, from: &str, user: &str, password: &str) -> (String, Duration) {
    let mut c = Client::plain_from(from, h.addr).await;
    let g = c.line().await;
    assert!(g.starts_with("* OK"), "{g}");
    let started = Instant::now();
    let reply = c
        .cmd("a1", &format!("LOGIN {user} {}", quote(password)))
        .await;
    (reply.last().cloned().unwrap_or_default(), started.elapsed())
}

fn ok(reply: &str) -> bool {
    reply.starts_with("a1 OK")
}

fn throttled(reply: &str) -> bool {
    reply.starts_with("a1 NO [UNAVAILABLE] too many failed logins; try again in")
}

#[tokio::test]
async fn a_stale_password_on_the_desktop_delays_no_other_account() {
    // (a) Every desktop client is 127.0.0.1.
    let h = harness((60_000, 300)).await;
    let (first, _) = login(&h, "127.0.0.1", USER, "stale password").await;
    assert!(first.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{first}");
    for _ in 0..5 {
        let (again, _) = login(&h, "127.0.0.1", USER, "stale password").await;
        assert!(throttled(&again), "{again}");
    }
    let (bob, took) = login(&h, "127.0.0.1", BOB, BOB_PW).await;
    println!(
        "bob from 127.0.0.1 while alice's stale client retries there: {bob} ({:.1} ms)",
        took.as_secs_f64() * 1000.0
    );
    assert!(ok(&bob), "{bob}");
    let (carol, _) = login(&h, "127.0.0.1", CAROL, CAROL_PW).await;
    assert!(ok(&carol), "{carol}");
    h.stop().await;
}

#[tokio::test]
async fn an_attacker_on_the_lan_cannot_lock_the_owner_out() {
    // (b) 127.0.0.2 fails on purpose against alice; alice logs in from
    // 127.0.0.3.
    let h = harness((60_000, 300)).await;
    let mut refused = 0;
    for _ in 0..10 {
        let (r, _) = login(&h, "127.0.0.2", USER, "guess").await;
        assert!(r.starts_with("a1 NO"), "{r}");
        refused += 1;
    }
    let (owner, took) = login(&h, "127.0.0.3", USER, PASSWORD).await;
    println!(
        "after {refused} failures from 127.0.0.2, alice from 127.0.0.3: {owner} ({:.1} ms)",
        took.as_secs_f64() * 1000.0
    );
    assert!(ok(&owner), "{owner}");
    // The attacker is still held.
    let (r, _) = login(&h, "127.0.0.2", USER, PASSWORD).await;
    assert!(throttled(&r), "{r}");
    h.stop().await;
}

#[tokio::test]
async fn spraying_many_names_slows_the_sprayer_and_only_it() {
    // (c) Five different names (known or not) failed from one address:
    // that address waits, whatever name it tries next.
    let h = harness((30_000, 300)).await;
    let names = [
        "nobody1@example.com",
        BOB,
        "nobody2@example.com",
        CAROL,
        "nobody3@example.com",
    ];
    for name in names {
        let (r, _) = login(&h, "127.0.0.2", name, "Winter2026!").await;
        assert!(
            r.starts_with("a1 NO [AUTHENTICATIONFAILED] wrong user name or password"),
            "{name}: {r}"
        );
    }
    let (next, _) = login(&h, "127.0.0.2", USER, PASSWORD).await;
    println!("the sprayer's sixth try, alice's right password: {next}");
    assert!(throttled(&next), "{next}");
    let (unknown, _) = login(&h, "127.0.0.2", "nobody4@example.com", "x").await;
    assert!(throttled(&unknown), "{unknown}");
    // The sprayed accounts' owners are not slowed elsewhere.
    let (bob, _) = login(&h, "127.0.0.3", BOB, BOB_PW).await;
    assert!(ok(&bob), "{bob}");
    h.stop().await;
}

#[tokio::test]
async fn a_success_resets_only_what_it_proves() {
    // (d) With a 2 s base: 127.0.0.2 fails for alice once and for bob
    // twice; alice's right password after 2 s clears alice's record for
    // that address only.
    let h = harness((2_000, 60)).await;
    let (r, _) = login(&h, "127.0.0.2", USER, "wrong").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    let (r, _) = login(&h, "127.0.0.2", BOB, "wrong").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Bob's second failure from here: 4 s from now.
    let (r, _) = login(&h, "127.0.0.2", BOB, "wrong again").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    let (alice, _) = login(&h, "127.0.0.2", USER, PASSWORD).await;
    assert!(ok(&alice), "{alice}");
    // Bob's record from this address stands...
    let (bob, _) = login(&h, "127.0.0.2", BOB, BOB_PW).await;
    println!("after alice's success from 127.0.0.2, bob from there: {bob}");
    assert!(throttled(&bob), "{bob}");
    // ...and alice's was reset: a new failure starts again at 2 s.
    let (r, _) = login(&h, "127.0.0.2", USER, "wrong").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    let (r, _) = login(&h, "127.0.0.2", USER, PASSWORD).await;
    println!("alice's next failure from there gives: {r}");
    assert_eq!(
        r,
        "a1 NO [UNAVAILABLE] too many failed logins; try again in 2 s"
    );
    h.stop().await;
}
