//! "Performance", point 3: a login with a cached token writes nothing to
//! the store. Its metadata (last login, last error) is kept in memory,
//! shown from there, and written every few seconds and at shutdown.

mod common;

use std::time::Duration;

use common::*;

async fn status_page(h: &Harness) -> String {
    let url = format!("http://{}/", h.status_addr.expect("status listener"));
    reqwest::Client::new()
        .get(url)
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn last_login_in_store(h: &Harness) -> Option<u64> {
    h.store
        .load_meta(USER)
        .unwrap()
        .and_then(|m| m.last_login_at)
}

#[tokio::test]
async fn a_login_writes_no_metadata_until_shutdown_and_shutdown_keeps_it() {
    let mut h = Harness::start(Options {
        server_extra: "\n[status]\nbind = \"127.0.0.1:0\"\n".into(),
        // Longer than the test: only shutdown writes.
        meta_flush_every: Some(Duration::from_secs(3600)),
        ..Options::default()
    })
    .await;
    assert_eq!(last_login_in_store(&h), None, "no login yet");
    for _ in 0..3 {
        let (mut c, ok) = h.login(PASSWORD).await;
        assert!(ok.starts_with("a1 OK"), "{ok}");
        let bye = c.cmd("a2", "LOGOUT").await;
        assert!(bye.last().unwrap().starts_with("a2 OK"), "{bye:?}");
    }
    // The logins are over (their OK came after the login path's
    // bookkeeping): the store underneath has not been written...
    assert_eq!(
        last_login_in_store(&h),
        None,
        "the login's metadata went to the store at once"
    );
    // ...but the status page, which reads through the server's store,
    // shows the login.
    let page = status_page(&h).await;
    assert!(
        page.contains(" s ago</td>") && !page.contains("<td>never</td>"),
        "{page}"
    );

    // A clean shutdown writes it.
    h.begin_shutdown();
    assert!(h.server_finished_within(WAIT).await, "server stopped");
    let at = last_login_in_store(&h).expect("written at shutdown");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(at <= now && now - at < 600, "{at} vs {now}");
    h.stop().await;
}

#[tokio::test]
async fn metadata_reaches_the_store_within_the_flush_interval() {
    let h = Harness::start(Options {
        meta_flush_every: Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let mut written = false;
    for _ in 0..200 {
        if last_login_in_store(&h).is_some() {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written, "the periodic write did not come");
    println!(
        "last_login_at in the store {} ms after the login started (flush every 200 ms)",
        started.elapsed().as_millis()
    );
    h.stop().await;
}
