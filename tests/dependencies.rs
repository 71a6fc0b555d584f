//! Dependencies inside the mailbridge crate run one way; these checks
//! read the sources so that a reach back fails here rather than in review.
//!
//! - `config::schema` depends on nothing else in the crate;
//! - `provider` depends on the schema only (settings build on provider);
//! - `oauth` never names `authorize` (authorize runs oauth's flows);
//! - `net::upstream` knows nothing of tokens' origin: no oauth, vault,
//!   store, provider or login;
//! - the wall clock is read in `clock` only.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The `crate::...` paths a file names in code (comments skipped).
fn crate_paths(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut paths = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(after.len());
            paths.push(after[..end].trim_end_matches(':').to_string());
            rest = &after[end..];
        }
    }
    paths
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_config_schema_depends_on_nothing_in_the_crate() {
    let paths = crate_paths(&root().join("config/schema.rs"));
    assert!(paths.is_empty(), "config::schema names {paths:?}");
}

#[test]
fn provider_depends_on_the_schema_only() {
    let paths = crate_paths(&root().join("provider.rs"));
    let other: Vec<&String> = paths
        .iter()
        .filter(|p| !p.starts_with("config::schema"))
        .collect();
    assert!(other.is_empty(), "provider names {other:?}");
}

#[test]
fn oauth_never_reaches_back_into_authorize() {
    for file in rust_files(&root().join("oauth")) {
        let paths = crate_paths(&file);
        assert!(
            !paths.iter().any(|p| p.starts_with("authorize")),
            "{} names {paths:?}",
            file.display()
        );
    }
}

#[test]
fn the_upstream_connector_knows_nothing_of_where_tokens_come_from() {
    let paths = crate_paths(&root().join("net/upstream.rs"));
    let forbidden = ["oauth", "vault", "store", "provider", "login", "authorize"];
    let found: Vec<&String> = paths
        .iter()
        .filter(|p| forbidden.iter().any(|f| p.starts_with(f)))
        .collect();
    assert!(found.is_empty(), "net::upstream names {found:?}");
}

#[test]
fn the_wall_clock_is_read_in_one_place() {
    for file in rust_files(&root()) {
        if file.ends_with("clock.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("UNIX_EPOCH") && !text.contains("fn unix_now"),
            "{} reads the wall clock itself; use crate::clock::unix_now",
            file.display()
        );
    }
}
