//! Keys and files (issue 12, point 7), through the `mailbridge` binary: a
//! service key other users can read is refused by `check-config` and
//! `run` with the `chmod` that fixes it; a state directory open to others
//! is repaired to 0700 (its files to 0600) at start, with a warning.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mailbridge-hostile-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A config for `mailbridge run` with `server_extra` in `[server]`, an
/// IMAP listener on `port` and one account (never logged in to).
fn config(dir: &Path, state: &Path, port: u16, server_extra: &str) -> PathBuf {
    let config = dir.join("mailbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
state_dir = "{state}"
{server_extra}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{port}"

[providers.nowhere]
preset = "custom"
client_id = "mailbridge-test"
token_url = "https://127.0.0.1:9/token"
imap = {{ host = "127.0.0.1", port = 9, tls = "implicit" }}

[[account]]
user = "alice@example.com"
provider = "nowhere"
"#,
            state = state.display(),
        ),
    )
    .unwrap();
    config
}

/// Runs the binary to completion (bounded): success and stderr.
fn mailbridge(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    let dir = temp_dir("key-mode");
    let key = dir.join("service.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    set_mode(&key, 0o644);
    let extra = format!("key_mode = \"service\"\nkey_file = \"{}\"", key.display());
    let cfg = config(&dir, &dir.join("state"), free_port(), &extra);
    let cfg = cfg.to_str().unwrap();
    let fix = format!("chmod 600 {}", key.display());

    let t0 = Instant::now();
    let (ok, err) = mailbridge(&["check-config", "--config", cfg]);
    assert!(!ok, "check-config accepted a 0644 key");
    assert!(err.contains(&fix) && err.contains("0644"), "{err}");
    println!("check-config refuses a 0644 key: {}", err.trim());

    // `run` refuses it too, before listening.
    let (ok, err) = mailbridge(&["run", "--config", cfg]);
    assert!(!ok, "run started with a 0644 key");
    assert!(err.contains(&fix), "{err}");

    // Fixed as told: accepted.
    set_mode(&key, 0o600);
    let (ok, err) = mailbridge(&["check-config", "--config", cfg]);
    assert!(ok, "{err}");
    println!(
        "refused and accepted in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_open_state_directory_is_repaired_at_start() {
    let dir = temp_dir("state-mode");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let stray = state.join("notes.txt");
    std::fs::write(&stray, b"left here by someone").unwrap();
    set_mode(&state, 0o755);
    set_mode(&stray, 0o644);
    let port = free_port();
    let cfg = config(&dir, &state, port, "");

    let t0 = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("MAILBRIDGE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = false;
    while t0.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(up, "mailbridge run did not start:\n{logs}");
    let took = t0.elapsed();

    assert_eq!(mode(&state), 0o700, "{logs}");
    assert_eq!(mode(&stray), 0o600, "{logs}");
    let warned = |path: &Path, from: &str, to: &str| {
        logs.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&path.display().to_string())
                && l.contains(&format!("changed mode {from} to {to}"))
        })
    };
    assert!(warned(&state, "0755", "0700"), "{logs}");
    assert!(warned(&stray, "0644", "0600"), "{logs}");
    println!(
        "state directory 0755 -> 0700 and a file 0644 -> 0600 at start, warned; up in {:.2} s",
        took.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
