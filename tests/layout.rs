//! The layout keeps the design honest: the protocol crate cannot touch a
//! socket because nothing in its dependency graph can name one.

use std::process::Command;

/// Crates that would let protocol code do I/O: an async runtime, sockets,
/// TLS, HTTP.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "rustls",
    "tokio-rustls",
    "hyper",
    "reqwest",
    "h2",
    "http",
    "axum",
    "async-std",
    "smol",
    "openssl",
];

#[test]
fn protocol_crate_graph_has_no_io() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "mailbridge-proto",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"mailbridge-proto") && names.contains(&"imap-codec"),
        "unexpected cargo tree output:\n{tree}"
    );
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| names.contains(f)).collect();
    assert!(
        found.is_empty(),
        "mailbridge-proto's normal dependency graph has I/O crates {found:?}:\n{tree}"
    );
    println!(
        "mailbridge-proto depends on {} crates, none of them I/O",
        names.len() - 1
    );
}
