//! Bounded key derivation: every Argon2id run of the process (unlocking a
//! grant, checking a password hash, hashing a new password, the dummy
//! verification an unknown user pays) goes through one [`KdfGate`].
//!
//! Each run takes 19 MiB (by default) for some tens of milliseconds. With
//! no bound, N concurrent wrong passwords cost N times that at once, and
//! glibc kept the memory afterwards: 200 first logins took RSS to 3.5 GiB
//! and left it there, 1,000 wrong passwords were OOM-killed. So:
//!
//! - **A cap.** At most `cap` runs at once; the others wait in a FIFO
//!   (tokio's semaphore is fair), so a burst costs time, queued in arrival
//!   order, not memory. A waiter that gives up (its login timed out, its
//!   client left) leaves the queue. The permit moves into the blocking
//!   task, so a run whose caller was cancelled still counts until its
//!   memory is freed.
//! - **Memory that goes back.** Argon2's own allocation (`hash_password_into`)
//!   is a 19 MiB `malloc`; glibc serves the first from a fresh `mmap`, but
//!   freeing it raises the dynamic mmap threshold to 19 MiB, so every later
//!   run is carved out of the blocking thread's arena and stays in the
//!   process after `free`. [`Blocks`] instead asks for *more than glibc's
//!   largest dynamic threshold* (32 MiB on 64-bit): such a request is always
//!   a mapping of its own, and `free` always unmaps it (a freed mapping that
//!   large never raises the threshold either). Only the pages Argon2
//!   touches (its `m_cost` KiB) become resident; the rest of the mapping is
//!   address space, never memory. No `unsafe`, no allocator tuning, and
//!   musl and other allocators that map large blocks behave the same.
//!   While runs are running or waiting, a finished run's buffer is kept
//!   for the next (at most `cap` of them), so a storm maps and faults in
//!   its memory once per permit rather than once per run; the last run out
//!   drops them all. `tests/hostile` measures it through the binary: with
//!   the cap alone (Argon2 allocating), 1,000 wrong passwords still peaked
//!   at 903 MiB and kept it; with these buffers, 103 MiB, back to 67.
//!
//! The default cap follows the machine: `min(CPUs, budget / kdf memory)`,
//! at least 1, where the budget is `min(256 MiB, RAM / 8)` (RAM: the
//! smaller of /proc/meminfo's MemTotal and a cgroup v2 `memory.max`).
//! `[server] kdf_concurrency` overrides it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::fmt;

use argon2::Block;
use tokio::sync::Semaphore;
use zeroize::Zeroize;

/// Largest memory budget the automatic cap spends on concurrent KDF runs.
const MAX_BUDGET: u64 = 256 * 1024 * 1024;

/// glibc's ceiling on its dynamic mmap threshold on 64-bit systems
/// (`DEFAULT_MMAP_THRESHOLD_MAX`, 4 MiB * sizeof(long)); on 32-bit it is
/// smaller, so this is above it there too.
const GLIBC_MMAP_THRESHOLD_MAX: usize = 32 * 1024 * 1024;

/// Why a KDF run did not produce its result.
#[derive(Debug, thiserror::Error)]
pub enum KdfGateError {
    /// The blocking task panicked or was cancelled at shutdown.
    #[error("the key derivation task stopped unexpectedly")]
    Stopped,
}

/// Caps concurrent Argon2 runs and runs them on the blocking pool. One per
/// process, shared by the vault (and through it the login path).
#[derive(Debug)]
pub struct KdfGate {
    /// One permit per run allowed at once; FIFO-fair.
    permits: Arc<Semaphore>,
    /// The cap, for the log and the tests.
    cap: usize,
    /// Working memory between runs while the gate is busy, emptied (and
    /// so unmapped) when it goes quiet.
    pool: Arc<Pool>,
}

/// Working memory kept for the next run while runs are running or
/// waiting: a storm pays for mapping and faulting in 19 MiB once per
/// permit, not once per run; a quiet gate holds none.
#[derive(Debug, Default)]
struct Pool {
    /// Runs running or waiting.
    busy: AtomicUsize,
    free: Mutex<Vec<Blocks>>,
}

impl Pool {
    fn take(&self) -> Blocks {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    fn give_back(&self, blocks: Blocks) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(blocks);
    }
}

/// Counts a run as busy from the moment it asks for a permit until its
/// work ended (or it stopped waiting); the last one out empties the pool.
/// Every buffer is given back before its run's guard drops, so once the
/// count reaches zero nothing stays in the pool.
struct Busy(Arc<Pool>);

impl Busy {
    fn new(pool: &Arc<Pool>) -> Busy {
        pool.busy.fetch_add(1, Ordering::SeqCst);
        Busy(pool.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let freed =
                std::mem::take(&mut *self.0.free.lock().unwrap_or_else(PoisonError::into_inner));
            drop(freed);
        }
    }
}

impl KdfGate {
    /// A gate letting `cap` runs (at least 1) proceed at once.
    pub fn new(cap: usize) -> KdfGate {
        let cap = cap.max(1);
        KdfGate {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            pool: Arc::default(),
        }
    }

    /// The gate for a configuration: `configured` runs at once, or when it
    /// is 0 the automatic cap for `kdf_memory_kib` on this machine.
    pub fn for_config(configured: usize, kdf_memory_kib: u32) -> KdfGate {
        KdfGate::new(if configured == 0 {
            automatic_cap(kdf_memory_kib)
        } else {
            configured
        })
    }

    /// How many runs may proceed at once.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Runs `work` with working memory for Argon2 on the blocking pool
    /// once a permit is free (waiting in arrival order). The permit is held
    /// until `work` returns, even if the caller stops waiting.
    pub async fn run<T, F>(&self, work: F) -> Result<T, KdfGateError>
    where
        F: FnOnce(&mut Blocks) -> T + Send + 'static,
        T: Send + 'static,
    {
        let busy = Busy::new(&self.pool);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| KdfGateError::Stopped)?;
        tokio::task::spawn_blocking(move || {
            let mut blocks = busy.0.take();
            let result = work(&mut blocks);
            busy.0.give_back(blocks);
            drop(permit);
            drop(busy);
            result
        })
        .await
        .map_err(|_| KdfGateError::Stopped)
    }

    /// Working memory held for the next run (for tests).
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.pool.free.lock().unwrap().len()
    }
}

/// The automatic cap for runs of `kdf_memory_kib` each on this machine:
/// `min(CPUs, min(256 MiB, RAM / 8) / kdf memory)`, at least 1.
pub fn automatic_cap(kdf_memory_kib: u32) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cap_for(cpus, total_memory(), kdf_memory_kib)
}

/// [`automatic_cap`] for given CPUs and memory (bytes; None: unknown, and
/// the budget is the largest one).
pub fn cap_for(cpus: usize, memory: Option<u64>, kdf_memory_kib: u32) -> usize {
    let budget = memory.map_or(MAX_BUDGET, |m| (m / 8).min(MAX_BUDGET));
    let per_run = u64::from(kdf_memory_kib.max(1)) * 1024;
    let by_memory = usize::try_from(budget / per_run).unwrap_or(usize::MAX);
    cpus.min(by_memory).max(1)
}

/// The memory this process may use: MemTotal, or a smaller cgroup v2
/// limit. None if neither can be read.
fn total_memory() -> Option<u64> {
    let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            // cgroup v2: the single line "0::/path".
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| p.trim().to_owned())
        })
        .and_then(|path| std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok()); // "max" does not parse: no limit
    match (mem_total, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Argon2's working memory, allocated so that dropping it returns it to
/// the operating system (see the module documentation), and wiped before
/// that. Argon2 writes every block before reading it, so a buffer is
/// reused between runs as it is.
#[derive(Default)]
pub struct Blocks(Vec<Block>);

impl fmt::Debug for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blocks({} KiB)", self.0.len())
    }
}

impl Blocks {
    /// `count` blocks of 1 KiB, for `Argon2::hash_password_into_with_memory`
    /// (allocated anew if this holds another number).
    pub fn get(&mut self, count: usize) -> &mut [Block] {
        if self.0.len() != count {
            *self = Blocks::default();
            let floor = GLIBC_MMAP_THRESHOLD_MAX / std::mem::size_of::<Block>() + 64;
            let mut blocks = Vec::with_capacity(count.max(floor));
            // Only these pages are touched; the spare capacity stays
            // untouched address space.
            blocks.resize(count, Block::default());
            self.0 = blocks;
        }
        &mut self.0
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        // The slice only: `Vec::zeroize` would also write the spare
        // capacity and make it resident.
        for block in &mut self.0 {
            block.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn automatic_cap_follows_cpus_and_memory() {
        // 19 MiB runs: a budget of 256 MiB fits 13.
        assert_eq!(cap_for(2, Some(24 * 1024 * MIB), 19 * 1024), 2);
        assert_eq!(cap_for(64, Some(24 * 1024 * MIB), 19 * 1024), 13);
        // A 512 MiB box: 64 MiB budget, 3 runs.
        assert_eq!(cap_for(8, Some(512 * MIB), 19 * 1024), 3);
        // Never below one, whatever the sizes.
        assert_eq!(cap_for(8, Some(64 * MIB), 1024 * 1024), 1);
        assert_eq!(cap_for(0, None, 19 * 1024), 1);
        // Unknown memory: the largest budget.
        assert_eq!(cap_for(64, None, 19 * 1024), 13);
        assert_eq!(cap_for(4, None, 0), 4);
    }

    #[test]
    fn configured_cap_wins() {
        assert_eq!(KdfGate::for_config(5, 19 * 1024).cap(), 5);
        assert!(KdfGate::for_config(0, 19 * 1024).cap() >= 1);
        assert_eq!(KdfGate::new(0).cap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_cap_runs_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = Arc::new(KdfGate::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..12 {
            let (gate, running, most) = (gate.clone(), running.clone(), most.clone());
            tasks.spawn(async move {
                gate.run(move |_| {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
                .unwrap();
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_served_in_arrival_order() {
        let gate = Arc::new(KdfGate::new(1));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        // The first run holds the only permit until told.
        let first = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.run(move |_| hold_rx.recv().ok()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (gate, order) = (gate.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                gate.run(move |_| order.lock().unwrap().push(i)).await
            }));
            // Queued one after the other.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        hold_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_caller_keeps_the_permit_until_the_work_ends() {
        let gate = Arc::new(KdfGate::new(1));
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let caller = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.run(move |_| {
                    let _ = started_tx.send(());
                    hold_rx.recv().ok()
                })
                .await
            })
        };
        started_rx.await.unwrap();
        caller.abort();
        let _ = caller.await;
        // The work still runs: no permit for anyone else yet.
        assert_eq!(gate.permits.available_permits(), 0);
        hold_tx.send(()).unwrap();
        gate.run(|_| ()).await.unwrap();
        assert_eq!(gate.permits.available_permits(), 1);
    }

    #[test]
    fn blocks_hold_what_was_asked() {
        let mut b = Blocks::default();
        assert_eq!(b.get(19 * 1024).len(), 19 * 1024);
        assert_eq!(b.get(19 * 1024).len(), 19 * 1024);
        assert_eq!(b.get(64 * 1024).len(), 64 * 1024);
        assert_eq!(b.get(8).len(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_is_kept_only_while_busy() {
        let gate = Arc::new(KdfGate::new(2));
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let long = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.run(move |b| {
                    b.get(1024);
                    let _ = started_tx.send(());
                    hold_rx.recv().ok()
                })
                .await
            })
        };
        started_rx.await.unwrap();
        // Another run ends while the first still runs: its memory is kept.
        gate.run(|b| b.get(1024).len()).await.unwrap();
        assert_eq!(gate.pooled(), 1);
        hold_tx.send(()).unwrap();
        long.await.unwrap().unwrap();
        // Quiet: nothing kept.
        assert_eq!(gate.pooled(), 0);
    }
}
