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

/// A process's anonymous resident memory split by what holds it, from
/// `/proc/PID/smaps`, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AnonSplit {
    /// Thread stacks: the main thread's `[stack]` and every anonymous
    /// mapping right above a `---p` guard of at most [`GUARD_MAX`] (how
    /// glibc lays out a thread's stack; the inaccessible rest of one of
    /// malloc's 64 MiB arena heaps, which the next heap may follow, is
    /// larger).
    pub stacks: u64,
    /// How many such thread stacks are mapped (live threads and the ones
    /// glibc keeps for reuse).
    pub thread_stacks: u64,
    /// The rest of the anonymous memory: the allocator's pages (`[heap]`,
    /// the brk heap; malloc's other arenas and its large blocks are
    /// mappings of their own) and anything else mapped privately.
    pub heap: u64,
}

/// The largest inaccessible mapping counted as a thread's guard page.
pub const GUARD_MAX: u64 = 64 * 1024;

/// [`AnonSplit`] of process `pid`.
pub fn anon_split(pid: u32) -> io::Result<AnonSplit> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(split_smaps(&smaps))
}

/// [`AnonSplit`] of a `/proc/PID/smaps` text.
pub fn split_smaps(smaps: &str) -> AnonSplit {
    let mut split = AnonSplit::default();
    // The previous mapping's end and whether it was an inaccessible guard.
    let mut guard_end: Option<u64> = None;
    let mut current: Option<(bool, bool)> = None; // (a stack, the main one)
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) {
            let perms = words.next().unwrap_or("");
            let path = words.nth(3).unwrap_or("");
            let main = path == "[stack]";
            let thread = path.is_empty() && perms.starts_with("rw") && guard_end == Some(start);
            if thread {
                split.thread_stacks += 1;
            }
            current = Some((main || thread, main));
            guard_end = (perms.starts_with("---") && path.is_empty() && end - start <= GUARD_MAX)
                .then_some(end);
            continue;
        }
        if first == "Anonymous:"
            && let Some((stack, _)) = current
            && let Some(kib) = words.next().and_then(|v| v.parse::<u64>().ok())
        {
            if stack {
                split.stacks += kib;
            } else {
                split.heap += kib;
            }
        }
    }
    split
}

/// Threads of process `pid`.
pub fn threads(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Threads:"))
        .ok_or_else(|| io::Error::other("no Threads line in /proc/PID/status"))?;
    line["Threads:".len()..]
        .trim()
        .parse()
        .map_err(|_| io::Error::other("bad Threads line in /proc/PID/status"))
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
    fn splits_anonymous_memory_into_stacks_and_heap() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 fd:00 123 /usr/bin/mailbridge
Rss:                 800 kB
Anonymous:             0 kB
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Rss:                4096 kB
Anonymous:          4096 kB
7f0000200000-7f0000201000 ---p 00000000 00:00 0 
Anonymous:             0 kB
7f0000201000-7f0000401000 rw-p 00000000 00:00 0 
Anonymous:            24 kB
7f0000401000-7f0000402000 ---p 00000000 00:00 0 
Anonymous:             0 kB
7f0000402000-7f0000602000 rw-p 00000000 00:00 0 
Anonymous:            16 kB
7f0000700000-7f0000800000 rw-p 00000000 00:00 0 
Anonymous:           100 kB
7f0004000000-7f0004100000 rw-p 00000000 00:00 0 
Anonymous:           512 kB
7f0004100000-7f0008000000 ---p 00000000 00:00 0 
Anonymous:             0 kB
7f0008000000-7f0008200000 rw-p 00000000 00:00 0 
Anonymous:           256 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Anonymous:           132 kB
";
        assert_eq!(
            split_smaps(smaps),
            AnonSplit {
                stacks: 24 + 16 + 132,
                thread_stacks: 2,
                // The two arena heaps, the second right above the first's
                // inaccessible rest, are heap.
                heap: 4096 + 100 + 512 + 256,
            }
        );
    }

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(open_files(pid).unwrap() >= 3);
        assert!(threads(pid).unwrap() >= 1);
        let split = anon_split(pid).unwrap();
        assert!(split.stacks > 0 && split.heap > 0, "{split:?}");
        // CPU time moves in clock ticks (10 ms): work until it does, for
        // at most two seconds of wall time (a release build's loop is fast).
        let before = cpu_time(pid).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_time(pid).unwrap() <= before && started.elapsed().as_secs() < 2 {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(cpu_time(pid).unwrap() > before);
    }
}
