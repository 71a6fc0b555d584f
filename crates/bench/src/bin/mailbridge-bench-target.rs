//! The mailbridge binary as the benchmark runs it: the same `cli::main`
//! that src/main.rs calls, built in this package so that the benchmark can
//! name its path (`CARGO_BIN_EXE_...` is only set for a package's own
//! binaries).

fn main() -> std::process::ExitCode {
    mailbridge::cli::main()
}
