//! The log of `mailbridge run` as people and collectors read it: no colour
//! codes in a pipe, one JSON object per line with `log_format = "json"`,
//! syslog priorities under the journal, and no warning for a client that
//! connects to an IP address and sends it as SNI. A session's events name
//! its client and protocol.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaper, temp_dir};

const BIN: &str = env!("CARGO_BIN_EXE_mailbridge");

/// A config serving IMAP with implicit TLS (a generated certificate) on a
/// free port; no account is needed to start.
fn config(tag: &str, server_extra: &str) -> (std::path::PathBuf, SocketAddr) {
    let dir = temp_dir(tag);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let path = dir.join("mailbridge.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
state_dir = "{state}"
{server_extra}

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{port}"
tls = "implicit"

[providers.p]
preset = "custom"
client_id = "x"
token_url = "http://127.0.0.1:9/token"
imap = {{ host = "127.0.0.1", port = 9 }}
"#,
            state = dir.join("state").display(),
        ),
    )
    .unwrap();
    (path, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Runs `mailbridge run` with `env` and standard error to a pipe, calls
/// `meanwhile` once it listens, stops it and returns what it logged.
fn run_logs(
    config: &std::path::Path,
    addr: SocketAddr,
    env: &[(&str, &str)],
    meanwhile: impl FnOnce(),
) -> String {
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("MAILBRIDGE_LOG")
        .env_remove("MAILBRIDGE_LOG_FORMAT")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut server = Reaper(command.spawn().unwrap());
    let mut stderr = server.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs);
        logs
    });
    let mut up = false;
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if up {
        meanwhile();
        // Let the service log what the connection caused.
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    for _ in 0..100 {
        if server.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    let logs = reader.join().unwrap();
    assert!(up, "mailbridge run did not start listening:\n{logs}");
    logs
}

#[test]
fn a_log_in_a_pipe_has_no_colour_codes() {
    let (config, addr) = config("logs-plain", "");
    let logs = run_logs(&config, addr, &[], || {});
    assert!(logs.contains("INFO"), "{logs}");
    assert!(!logs.contains("\x1b["), "colour codes in a pipe:\n{logs:?}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let (config, addr) = config("logs-json", "log_format = \"json\"");
    let logs = run_logs(&config, addr, &[], || {});
    let mut lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string() && v["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "{logs}");
    assert!(!logs.contains("\x1b["), "{logs:?}");

    // The environment wins over the file.
    let logs = run_logs(&config, addr, &[("MAILBRIDGE_LOG_FORMAT", "text")], || {});
    assert!(!logs.trim_start().starts_with('{'), "{logs}");
}

#[test]
fn under_the_journal_lines_carry_a_syslog_priority_and_no_time() {
    let (config, addr) = config("logs-journal", "");
    let logs = run_logs(&config, addr, &[("JOURNAL_STREAM", "8:12345")], || {});
    assert!(logs.lines().any(|l| l.starts_with("<6>")), "{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let rest = line
            .strip_prefix(|c| c == '<')
            .and_then(|r| r.split_once('>'))
            .filter(|(p, _)| ["3", "4", "6", "7"].contains(p))
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("no <N> priority: {line}"));
        // No timestamp: the level comes first.
        let first = rest.split_whitespace().next().unwrap_or("");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&first),
            "{line}"
        );
    }
}

/// Every event of a client's session names that client and the protocol;
/// events outside a session do not.
#[test]
fn a_sessions_events_name_its_client_and_protocol() {
    let debug = [("MAILBRIDGE_LOG", "debug,rustls=error")];
    let connect = |addr: SocketAddr| {
        let c = TcpStream::connect(addr).unwrap();
        let me = c.local_addr().unwrap();
        drop(c);
        me
    };

    let (text_config, addr) = config("logs-session-text", "");
    let mut client = None;
    let logs = run_logs(&text_config, addr, &debug, || client = Some(connect(addr)));
    let client = client.unwrap();
    let context = format!("conn{{peer={client} protocol=\"imap\"}}: ");
    // (run_logs's own probe connected first, from another port.)
    assert!(
        logs.lines()
            .any(|l| l.contains(&context) && l.ends_with("mailbridge::server: connected")),
        "no `connected` event with {context}:\n{logs}"
    );
    let listening = logs.lines().find(|l| l.contains("listening")).unwrap();
    assert!(!listening.contains("conn{"), "{listening}");

    let (config, addr) = config("logs-session-json", "log_format = \"json\"");
    let mut client = None;
    let logs = run_logs(&config, addr, &debug, || client = Some(connect(addr)));
    let client = client.unwrap();
    let events: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let connected = events
        .iter()
        .find(|v| v["message"] == "connected" && v["span"]["peer"] == client.to_string())
        .unwrap_or_else(|| panic!("no `connected` event from {client}:\n{logs}"));
    assert_eq!(connected["span"]["name"], "conn", "{connected}");
    assert_eq!(connected["span"]["protocol"], "imap", "{connected}");
    assert_eq!(connected["target"], "mailbridge::server", "{connected}");
    let listening = events.iter().find(|v| v["message"] == "listening").unwrap();
    assert!(listening.get("span").is_none(), "{listening}");
    // Fields keep their types.
    let limits = events
        .iter()
        .find(|v| v["message"] == "connection limits")
        .unwrap();
    assert!(limits["max_connections"].is_u64(), "{limits}");
}

/// After a crowd of sessions ends, mailbridge offers the memory they
/// freed back to the system (glibc's `malloc_trim`) and says so at debug
/// level. How much comes back is the benchmark's to measure
/// (docs/PERFORMANCE.md).
#[test]
fn after_a_crowd_leaves_freed_memory_is_offered_back() {
    let (config, addr) = config("logs-heap", "");
    let logs = run_logs(
        &config,
        addr,
        &[("MAILBRIDGE_LOG", "info,mailbridge::server=debug")],
        || {
            let crowd: Vec<TcpStream> =
                (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
            // Admitted and counted; the crowd comes and goes between two
            // of the checks (every 5 s), which must still see it.
            std::thread::sleep(Duration::from_millis(500));
            drop(crowd);
            std::thread::sleep(Duration::from_secs(7));
        },
    );
    let offered = logs
        .lines()
        .find(|l| l.contains("freed heap memory offered back to the system"))
        .unwrap_or_else(|| panic!("no give-back after 64 sessions ended:\n{logs}"));
    println!("{offered}");
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    assert!(
        offered.contains("outcome=Released") || offered.contains("outcome=NothingFree"),
        "{offered}"
    );
}

/// A TLS 1.3 ClientHello that names `host` in its SNI extension, as some
/// clients do with an IP address (which RFC 6066 forbids).
fn client_hello_with_sni(host: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
    }
    let mut name = vec![0u8];
    name.extend((host.len() as u16).to_be_bytes());
    name.extend(host.as_bytes());
    let mut sni = (name.len() as u16).to_be_bytes().to_vec();
    sni.extend(name);
    let mut share = vec![0x00, 0x1d, 0x00, 0x20, 9];
    share.extend([0u8; 31]);
    let mut shares = (share.len() as u16).to_be_bytes().to_vec();
    shares.extend(share);
    let mut exts = Vec::new();
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x000a, &[0, 2, 0x00, 0x1d]);
    ext(
        &mut exts,
        0x000d,
        &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x08, 0x07],
    );
    ext(&mut exts, 0x002b, &[2, 0x03, 0x04]);
    ext(&mut exts, 0x0033, &shares);
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01]);
    body.extend([1, 0]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

fn hello_by_ip(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&client_hello_with_sni("127.0.0.1")).unwrap();
    // The ServerHello: the server took the hello.
    let mut header = [0u8; 5];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x16, "a handshake record");
}

#[test]
fn a_client_connecting_by_ip_address_causes_no_sni_warning() {
    let (config, addr) = config("logs-sni", "");
    let logs = run_logs(&config, addr, &[], || hello_by_ip(addr));
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("WARN") && l.contains("SNI")),
        "{logs}"
    );
    // The hello does provoke rustls, which a person can still see on
    // request.
    let logs = run_logs(
        &config,
        addr,
        &[("MAILBRIDGE_LOG", "info,rustls=warn")],
        || hello_by_ip(addr),
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("ignoring IP address presented as hostname")),
        "{logs}"
    );
}
