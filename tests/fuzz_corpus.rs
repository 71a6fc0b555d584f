//! Replays the fuzz targets' committed inputs (fuzz/corpus/TARGET: seeds;
//! fuzz/regressions/TARGET: inputs that once crashed a target, kept as
//! regression tests) through the same target bodies libFuzzer runs
//! (fuzz/src/lib.rs), so `cargo test` checks them on every toolchain.
//! The fuzzing itself is `cargo fuzz run TARGET` in fuzz/ (see
//! docs/ARCHITECTURE.md); CI runs each target briefly where it can.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

/// A target's name (its folder under fuzz/corpus) and body.
type Target = (&'static str, fn(&[u8]));

const TARGETS: &[Target] = &[
    ("client_imap", targets::client_imap),
    ("client_pop3", targets::client_pop3),
    ("client_smtp", targets::client_smtp),
    ("upstream_imap", targets::upstream_imap),
    ("upstream_pop3", targets::upstream_pop3),
    ("upstream_smtp", targets::upstream_smtp),
    ("sasl", targets::sasl),
    ("config", targets::config),
    ("proxy_header", targets::proxy_header),
    ("trace", targets::trace),
];

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_fuzz_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, run) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seed inputs");
        let regressions = inputs(&root.join("regressions").join(name));
        for file in seeds.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("read fuzz input");
            run(&data);
        }
        println!(
            "{name}: {} seeds and {} regression inputs replayed",
            seeds.len(),
            regressions.len()
        );
        total += seeds.len() + regressions.len();
    }
    // Every target is listed in fuzz/Cargo.toml and here alike.
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let declared = manifest.matches("[[bin]]").count();
    assert_eq!(
        declared,
        TARGETS.len(),
        "fuzz/Cargo.toml declares {declared} targets"
    );
    println!("{total} fuzz inputs replayed");
}
