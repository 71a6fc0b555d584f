//! A process's resident memory and open files, read from `/proc` (Linux).

use std::io;

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    vm_rss(&status).ok_or_else(|| io::Error::other("no VmRSS line in /proc/PID/status"))
}

/// Anonymous resident memory (`RssAnon`: the heap and stacks, not the
/// binary's pages), KiB.
pub fn rss_anon_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_kib(&status, "RssAnon:")
        .ok_or_else(|| io::Error::other("no RssAnon line in /proc/PID/status"))
}

/// The `VmRSS:` value of a `/proc/PID/status` text, in KiB.
pub fn vm_rss(status: &str) -> Option<u64> {
    field_kib(status, "VmRSS:")
}

/// A `NAME: <n> kB` value of a `/proc/PID/status` text.
fn field_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// How many file descriptors process `pid` has open.
pub fn open_files(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// CPU time process `pid` has used so far, all threads together (from
/// `/proc/PID/task/*/schedstat`, nanoseconds on the CPU). Threads that
/// already ended are not counted, which is fine for a long-lived server.
pub fn cpu_time(pid: u32) -> io::Result<std::time::Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(std::time::Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tmailbridge\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss(status), Some(12345));
        assert_eq!(vm_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(open_files(pid).unwrap() >= 3);
        let before = cpu_time(pid).unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_time(pid).unwrap() > before);
    }
}
