//! "Run it unattended", point 1: the status page, `/metrics` and
//! `/healthz` over HTTP on loopback, and the page as a person sees it in
//! headless Chromium.

mod common;

use std::time::Duration;

use common::*;

/// mailbridge with `[status]` on a free loopback port.
async fn harness(extra: &str) -> Harness {
    Harness::start(Options {
        server_extra: format!("\n[status]\nbind = \"127.0.0.1:0\"\n{extra}\n"),
        ..Options::default()
    })
    .await
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(url).timeout(WAIT);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn the_page_metrics_and_health_say_what_happened() {
    let h = harness("").await;
    let base = format!("http://{}", h.status_addr.expect("status listener"));
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let (_c2, bad) = h.login("wrong").await;
    assert!(bad.starts_with("a1 NO"), "{bad}");

    let (code, body) = get(&format!("{base}/healthz"), None).await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let (code, metrics) = get(&format!("{base}/metrics"), None).await;
    assert_eq!(code, 200);
    println!("{metrics}");
    for line in [
        "mailbridge_logins_total{protocol=\"imap\",result=\"ok\"} 1",
        "mailbridge_logins_total{protocol=\"imap\",result=\"bad_credentials\"} 1",
        "mailbridge_connections_total{protocol=\"imap\"} 2",
        "mailbridge_upstream_login_seconds_count{protocol=\"imap\"} 2",
        "mailbridge_token_refreshes_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}");
    }
    assert!(metrics.contains("# TYPE mailbridge_sessions gauge"));
    for secret in [PASSWORD, &h.refresh_token, USER] {
        assert!(
            !metrics.contains(secret),
            "no secret or account name in /metrics"
        );
    }

    let (code, page) = get(&format!("{base}/"), None).await;
    assert_eq!(code, 200);
    assert!(page.contains("http-equiv=\"refresh\""), "refreshes itself");
    assert!(!page.contains("<script"), "no JavaScript");
    assert!(page.contains("All is well."), "{page}");
    assert!(
        page.contains(&format!(
            "<td>{USER}</td><td>sandbox</td><td class=\"state\">fine</td>"
        )),
        "{page}"
    );
    // The login's refresh, then the login, in their columns.
    assert!(
        page.contains("<th>Access token</th><th>Last refresh</th><th>Last login</th>"),
        "{page}"
    );
    let row = page
        .split("<tr")
        .find(|r| r.contains(&format!("<td>{USER}</td>")))
        .unwrap_or_default();
    let cells: Vec<&str> = row.split("<td").collect();
    assert!(
        cells.get(5).is_some_and(|c| c.ends_with(" s ago</td>")),
        "{row}"
    );
    assert!(!page.contains(PASSWORD) && !page.contains(&h.refresh_token));
    h.stop().await;
}

#[tokio::test]
async fn a_refused_grant_is_a_banner_and_a_row_that_says_so() {
    let h = harness("").await;
    let base = format!("http://{}", h.status_addr.unwrap());
    h.provider.revoke_user(USER);
    let (_c, reply) = h.login(PASSWORD).await;
    assert!(reply.starts_with("a1 NO"), "{reply}");
    let (_, page) = get(&format!("{base}/"), None).await;
    assert!(page.contains("Needs a person"), "{page}");
    assert!(page.contains("refused: re-authorize"), "{page}");
    let (_, metrics) = get(&format!("{base}/metrics"), None).await;
    assert!(
        metrics.contains("mailbridge_alerts_total{event=\"grant_refused\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn with_a_token_the_page_and_metrics_need_it_and_health_does_not() {
    let dir = temp_dir("status-token");
    let token_file = dir.join("status-token");
    std::fs::write(&token_file, "s3cret-status-token\n").unwrap();
    let h = harness(&format!("token_file = \"{}\"", token_file.display())).await;
    let base = format!("http://{}", h.status_addr.unwrap());
    assert_eq!(get(&format!("{base}/metrics"), None).await.0, 401);
    assert_eq!(get(&format!("{base}/"), Some("wrong")).await.0, 401);
    assert_eq!(
        get(&format!("{base}/metrics"), Some("s3cret-status-token"))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&format!("{base}/?token=s3cret-status-token"), None)
            .await
            .0,
        200
    );
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200);
    h.stop().await;
}

#[tokio::test]
async fn a_person_sees_the_account_and_its_state_in_chromium() {
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(chromium) = chromium else {
        println!("SKIPPED: no chromium on this machine (.ci/run installs Debian's)");
        return;
    };
    let h = harness("").await;
    let (_c, ok) = h.login(PASSWORD).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let url = format!("http://{}/", h.status_addr.unwrap());
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let profile = temp_dir("chromium-profile");
    let run = |args: Vec<String>| {
        let url = url.clone();
        let profile = profile.clone();
        let chromium = chromium.to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(args)
                .arg(url)
                .output()
                .unwrap()
        })
    };
    let dom = tokio::time::timeout(Duration::from_secs(60), run(vec!["--dump-dom".into()]))
        .await
        .expect("chromium answered")
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    // What a person sees: the account's row with its state.
    assert!(dom.contains("<td>alice@example.com</td>"), "{dom}");
    assert!(dom.contains("<td class=\"state\">fine</td>"), "{dom}");
    assert!(dom.contains("All is well."), "{dom}");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        run(vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1100,700".into(),
        ]),
    )
    .await
    .expect("chromium answered")
    .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    println!(
        "screenshot {} ({size} bytes); chromium said: {}",
        shot.display(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    assert!(size > 1000, "a screenshot was written");
    h.stop().await;
}
