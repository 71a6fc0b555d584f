//! Who waits after failed logins.
//!
//! Failures are counted per (client address, login name) pair, so a
//! client retrying a stale password delays only itself for that name: not
//! the other accounts used from the same address (on a desktop every
//! client is 127.0.0.1), and not the account's owner logging in from
//! elsewhere. Two wider rules catch what pairs alone would let through:
//!
//! - **Spraying.** An address that fails for [`SPRAY_NAMES`] different
//!   names within [`SPRAY_WINDOW`] is delayed for every name, its delay
//!   doubling with each further failure. Unknown names count like known
//!   ones, so guessing names is slowed as much as guessing passwords.
//! - **Many addresses, one account.** Once two or more addresses fail
//!   for one account, an account-wide delay grows with their number
//!   (doubling per address) and applies only to addresses that have
//!   themselves failed for that account: a botnet gets one try per
//!   address per delay, the owner from a clean address none.
//!
//! A success resets only what it proves: the pair's failures, and the
//! address's place among the account's failing addresses (the client
//! knows that account's password), not the address's spraying record nor
//! the account's failures from elsewhere.
//!
//! Addresses are counted as [`PeerGroup`]s (IPv6 by /64); names by a keyed
//! hash, so the tables hold no login names. Every table is bounded.
//! Records are forgotten [`FORGET_AFTER`] after their delay ended.
//!
//! **Several instances** on one shared store ([`Backoff::with_shared`]):
//! the pair's failures and the account's failing addresses are also
//! counted in the store ([`SharedCounters`], keyed by hashes), so a
//! password spray spread over the instances meets the delays it would meet
//! at one; a login waits for the longer of the local and the shared delay.
//! The spraying record stays per instance. A store that cannot be reached
//! leaves the local tables in force (logins must not fail because the
//! counters cannot be read).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::net::listener::PeerGroup;
use crate::store::{CounterRule, SharedCounters, TokenStore};

/// How long failed logins lock out further attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Lockout after the first failure.
    pub base: Duration,
    /// Longest lockout.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// One second, doubling up to five minutes.
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// The lockout after `failures` consecutive failures (0 for none).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Different names an address may fail for within [`SPRAY_WINDOW`] before
/// it is delayed for all of them.
pub const SPRAY_NAMES: usize = 5;
/// See [`SPRAY_NAMES`].
pub const SPRAY_WINDOW: Duration = Duration::from_secs(600);
/// A record is dropped this long after its delay ended.
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Bound on each table.
const MAX_ENTRIES: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    until: Instant,
}

impl Failures {
    fn forgotten(&self, now: Instant) -> bool {
        now > self.until + FORGET_AFTER
    }
}

/// Consecutive failures per key, bounded in size.
struct FailureMap<K> {
    map: HashMap<K, Failures>,
}

impl<K: Hash + Eq + Clone> FailureMap<K> {
    fn new() -> Self {
        FailureMap {
            map: HashMap::new(),
        }
    }

    fn known(&self, key: &K, now: Instant) -> bool {
        self.map.get(key).is_some_and(|f| !f.forgotten(now))
    }

    fn remaining(&self, key: &K, now: Instant) -> Option<Duration> {
        self.map
            .get(key)
            .map(|f| f.until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Record a failure; returns the new count.
    fn fail(&mut self, key: &K, now: Instant, policy: &BackoffPolicy) -> u32 {
        make_room(&mut self.map, key, |f| f.until, |f| f.forgotten(now));
        let entry = self.map.entry(key.clone()).or_insert(Failures {
            count: 0,
            until: now,
        });
        if entry.forgotten(now) {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.until = now + policy.delay(entry.count);
        entry.count
    }

    fn reset(&mut self, key: &K) {
        self.map.remove(key);
    }
}

/// Before inserting `key` into a full map: drop forgotten entries, and if
/// it is still full, the one whose delay ends first.
fn make_room<K: Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    key: &K,
    until: impl Fn(&V) -> Instant,
    forgotten: impl Fn(&V) -> bool,
) {
    if map.contains_key(key) || map.len() < MAX_ENTRIES {
        return;
    }
    map.retain(|_, v| !forgotten(v));
    if map.len() >= MAX_ENTRIES {
        let first = map
            .iter()
            .min_by_key(|(_, v)| until(v))
            .map(|(k, _)| k.clone());
        if let Some(k) = first {
            map.remove(&k);
        }
    }
}

/// One address's failures across names.
struct Spray {
    /// Different names failed for in the window (hashes), at most
    /// [`SPRAY_NAMES`].
    names: Vec<u64>,
    window_start: Instant,
    /// Failures since the address crossed the line, and the delay they
    /// earned.
    over: Failures,
}

impl Spray {
    fn forgotten(&self, now: Instant) -> bool {
        now > self.window_start + SPRAY_WINDOW && now > self.over.until + FORGET_AFTER
    }
}

/// The addresses failing for one account.
struct AccountFailures {
    /// Different addresses that failed (at most [`ACCOUNT_PEERS`]).
    peers: Vec<PeerGroup>,
    until: Instant,
}

impl AccountFailures {
    fn forgotten(&self, now: Instant) -> bool {
        now > self.until + FORGET_AFTER
    }
}

/// Failing addresses remembered per account (beyond it, the delay is at
/// its longest anyway).
const ACCOUNT_PEERS: usize = 32;

struct Tables {
    /// Shared pair counters seen by a check (so a success clears them
    /// without a write when there is nothing to clear). Bounded.
    shared_pairs: std::collections::HashSet<String>,
    pairs: FailureMap<(PeerGroup, u64)>,
    accounts: HashMap<u64, AccountFailures>,
    sprays: HashMap<PeerGroup, Spray>,
}

/// The failed-login bookkeeping of one process.
pub struct Backoff {
    policy: BackoffPolicy,
    names: std::collections::hash_map::RandomState,
    tables: Mutex<Tables>,
    /// A store shared with other instances, whose counters count too.
    shared: Option<Arc<dyn TokenStore>>,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What one failure added up to, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Consecutive failures of this address for this name.
    pub pair: u32,
    /// Different addresses failing for this name lately.
    pub addresses: usize,
    /// Different names this address failed for lately.
    pub names: usize,
}

impl Backoff {
    /// Delays under `policy`.
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            names: std::collections::hash_map::RandomState::new(),
            tables: Mutex::new(Tables {
                shared_pairs: std::collections::HashSet::new(),
                pairs: FailureMap::new(),
                accounts: HashMap::new(),
                sprays: HashMap::new(),
            }),
            shared: None,
        }
    }

    /// The same bookkeeping, also counting in `store`'s shared counters
    /// when it has them (a store shared by several instances).
    pub fn with_shared(mut self, store: Arc<dyn TokenStore>) -> Backoff {
        if store.shared_counters().is_some() {
            self.shared = Some(store);
        }
        self
    }

    fn counters(&self) -> Option<&dyn SharedCounters> {
        self.shared.as_deref().and_then(|s| s.shared_counters())
    }

    /// The shared counters' keys: of the pair, and of the account.
    fn shared_keys(peer: IpAddr, name: &str) -> (String, String) {
        let name = name.trim().to_lowercase();
        let key = |parts: &[&[u8]]| {
            let mut h = Sha256::new();
            for p in parts {
                h.update(p);
                h.update([0u8]);
            }
            h.finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let group = PeerGroup::of(peer).to_string();
        (
            key(&[
                b"mailbridge backoff pair",
                group.as_bytes(),
                name.as_bytes(),
            ]),
            key(&[b"mailbridge backoff account", name.as_bytes()]),
        )
    }

    /// The shared delay for `peer` trying `name` (zero: none), and
    /// whether the store knows the pair's failures.
    fn shared_check(&self, peer: IpAddr, name: &str) -> Option<Duration> {
        let counters = self.counters()?;
        let (pair, account) = Self::shared_keys(peer, name);
        match counters.counters(&[pair.clone(), account.clone()], FORGET_AFTER) {
            Ok(found) => {
                let left = |k: &str| found.iter().find(|(f, _)| f == k).map(|(_, d)| *d);
                if left(&pair).is_some() {
                    let mut t = self.lock();
                    if t.shared_pairs.len() >= MAX_ENTRIES {
                        t.shared_pairs.clear();
                    }
                    t.shared_pairs.insert(pair.clone());
                }
                // The account's delay binds only addresses that failed
                // for it themselves, as in the local tables.
                let wait = match left(&pair) {
                    Some(p) => p.max(left(&account).unwrap_or(Duration::ZERO)),
                    None => Duration::ZERO,
                };
                (!wait.is_zero()).then_some(wait)
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared login-failure counters unreadable; local ones apply");
                None
            }
        }
    }

    fn shared_failed(&self, peer: IpAddr, name: &str) -> Option<(u32, u32)> {
        let counters = self.counters()?;
        let (pair, account) = Self::shared_keys(peer, name);
        let rule = CounterRule {
            base: self.policy.base,
            max: self.policy.max,
            offset: 0,
            forget: FORGET_AFTER,
        };
        let result = counters.count_failure(&pair, rule).and_then(|(n, _)| {
            // A new failing address for the account: one more.
            let addresses = if n == 1 {
                counters
                    .count_failure(&account, CounterRule { offset: 1, ..rule })?
                    .0
            } else {
                0
            };
            Ok((n, addresses))
        });
        match result {
            Ok(counts) => {
                self.lock().shared_pairs.insert(pair);
                Some(counts)
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared login-failure counters unwritable; local ones apply");
                None
            }
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> BackoffPolicy {
        self.policy
    }

    fn name(&self, name: &str) -> u64 {
        self.names.hash_one(name.trim().to_lowercase())
    }

    /// How long `peer` must still wait before trying `name`, if at all.
    pub fn check(&self, peer: IpAddr, name: &str) -> Option<Duration> {
        let local = self.check_at(peer, name, Instant::now());
        match self.shared_check(peer, name) {
            Some(shared) => Some(local.map_or(shared, |l| l.max(shared))),
            None => local,
        }
    }

    /// Record a failed login of `peer` as `name` (a wrong password, or a
    /// name with no account).
    pub fn failed(&self, peer: IpAddr, name: &str) -> Tally {
        let mut tally = self.failed_at(peer, name, Instant::now());
        if let Some((pair, addresses)) = self.shared_failed(peer, name) {
            tally.pair = tally.pair.max(pair);
            tally.addresses = tally.addresses.max(addresses as usize);
        }
        tally
    }

    /// Record that `peer` proved it knows `name`'s password.
    pub fn succeeded(&self, peer: IpAddr, name: &str) {
        if let Some(counters) = self.counters() {
            let (pair, _) = Self::shared_keys(peer, name);
            let seen = self.lock().shared_pairs.remove(&pair);
            if seen && let Err(e) = counters.clear_counters(&[pair]) {
                tracing::debug!(error = %e, "shared login-failure counters unwritable");
            }
        }
        let group = PeerGroup::of(peer);
        let name = self.name(name);
        let mut t = self.lock();
        t.pairs.reset(&(group, name));
        if let Some(a) = t.accounts.get_mut(&name) {
            a.peers.retain(|p| *p != group);
            if a.peers.is_empty() {
                t.accounts.remove(&name);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_at(&self, peer: IpAddr, name: &str, now: Instant) -> Option<Duration> {
        let group = PeerGroup::of(peer);
        let name = self.name(name);
        let t = self.lock();
        let pair = (group, name);
        let mut wait = t.pairs.remaining(&pair, now);
        if t.pairs.known(&pair, now)
            && let Some(a) = t.accounts.get(&name)
        {
            let left = a.until.saturating_duration_since(now);
            if !left.is_zero() {
                wait = wait.max(Some(left));
            }
        }
        if let Some(spray) = t.sprays.get(&group) {
            let left = spray.over.until.saturating_duration_since(now);
            if !left.is_zero() {
                wait = wait.max(Some(left));
            }
        }
        wait
    }

    fn failed_at(&self, peer: IpAddr, name: &str, now: Instant) -> Tally {
        let group = PeerGroup::of(peer);
        let name = self.name(name);
        let policy = self.policy;
        let mut t = self.lock();
        let pair = t.pairs.fail(&(group, name), now, &policy);
        make_room(&mut t.accounts, &name, |a| a.until, |a| a.forgotten(now));
        let account = t.accounts.entry(name).or_insert_with(|| AccountFailures {
            peers: Vec::new(),
            until: now,
        });
        if account.forgotten(now) {
            account.peers.clear();
        }
        if !account.peers.contains(&group) && account.peers.len() < ACCOUNT_PEERS {
            account.peers.push(group);
        }
        let addresses = account.peers.len();
        // One address alone is the pair's business.
        let delay = policy.delay(u32::try_from(addresses.saturating_sub(1)).unwrap_or(u32::MAX));
        account.until = account.until.max(now + delay);
        make_room(
            &mut t.sprays,
            &group,
            |s| s.over.until,
            |s| s.forgotten(now),
        );
        let spray = t.sprays.entry(group).or_insert_with(|| Spray {
            names: Vec::new(),
            window_start: now,
            over: Failures {
                count: 0,
                until: now,
            },
        });
        if spray.forgotten(now)
            || (now > spray.window_start + SPRAY_WINDOW && spray.over.until <= now)
        {
            // A new window; an address past the line stays there until
            // its delay ended and the window passed.
            spray.names.clear();
            spray.window_start = now;
            spray.over = Failures {
                count: 0,
                until: now,
            };
        }
        if !spray.names.contains(&name) && spray.names.len() < SPRAY_NAMES {
            spray.names.push(name);
        }
        if spray.names.len() >= SPRAY_NAMES {
            spray.over.count = spray.over.count.saturating_add(1);
            spray.over.until = now + policy.delay(spray.over.count);
        }
        Tally {
            pair,
            addresses,
            names: spray.names.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn backoff() -> Backoff {
        Backoff::new(BackoffPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
        })
    }

    #[test]
    fn a_stale_password_delays_only_its_own_account_from_that_address() {
        let b = backoff();
        let now = Instant::now();
        let desktop = ip("127.0.0.1");
        for i in 0..6 {
            b.failed_at(desktop, "alice", now + S * i);
        }
        let later = now + S * 6;
        assert!(b.check_at(desktop, "alice", later).is_some());
        assert_eq!(b.check_at(desktop, "bob", later), None);
        assert_eq!(b.check_at(desktop, "carol", later), None);
    }

    #[test]
    fn an_attacker_does_not_lock_the_owner_out() {
        let b = backoff();
        let now = Instant::now();
        for i in 0..50 {
            b.failed_at(ip("127.0.0.2"), "alice", now + S * i);
        }
        let later = now + S * 50;
        assert!(b.check_at(ip("127.0.0.2"), "alice", later).is_some());
        assert_eq!(b.check_at(ip("127.0.0.3"), "alice", later), None);
    }

    #[test]
    fn spraying_names_slows_the_address_for_every_name() {
        let b = backoff();
        let now = Instant::now();
        let sprayer = ip("127.0.0.2");
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            b.failed_at(sprayer, name, now);
            assert_eq!(b.check_at(sprayer, "zed", now), None, "after {}", i + 1);
        }
        let t = b.failed_at(sprayer, "e", now);
        assert_eq!(t.names, SPRAY_NAMES);
        assert_eq!(
            b.check_at(sprayer, "zed", now),
            Some(Duration::from_secs(10))
        );
        // Each further failure doubles it.
        b.failed_at(sprayer, "f", now + Duration::from_secs(10));
        assert_eq!(
            b.check_at(sprayer, "zed", now + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
        // Others are not slowed.
        assert_eq!(b.check_at(ip("127.0.0.3"), "zed", now), None);
    }

    #[test]
    fn many_addresses_against_one_account_meet_its_delay_only_if_they_failed() {
        let b = backoff();
        let now = Instant::now();
        for i in 0..8u8 {
            b.failed_at(IpAddr::from([10, 0, 0, i]), "alice", now);
        }
        // Address 10.0.0.0's own pair delay is 10 s; the account's, with
        // 8 addresses failing, 10 s * 2^6 = 640 s capped at 300 s, and it
        // applies to every one of them.
        let at = now + Duration::from_secs(11);
        assert_eq!(
            b.check_at(ip("10.0.0.0"), "alice", at),
            Some(Duration::from_secs(289))
        );
        // The owner proves the password from 10.0.0.7: that address is
        // free, the others are not.
        b.succeeded(ip("10.0.0.7"), "alice");
        assert_eq!(b.check_at(ip("10.0.0.7"), "alice", at), None);
        assert!(b.check_at(ip("10.0.0.1"), "alice", at).is_some());
        // A clean address is not touched by it.
        assert_eq!(b.check_at(ip("10.0.0.99"), "alice", at), None);
    }

    #[test]
    fn a_success_resets_only_what_it_proves() {
        let b = backoff();
        let now = Instant::now();
        let p = ip("127.0.0.2");
        for name in ["a", "b", "c", "d", "e"] {
            b.failed_at(p, name, now);
        }
        b.failed_at(ip("127.0.0.3"), "a", now);
        b.succeeded(p, "a");
        // The pair is cleared, the spraying record is not.
        assert!(b.check_at(p, "a", now).is_some());
        let after_spray = now + Duration::from_secs(11);
        assert_eq!(b.check_at(p, "a", after_spray), None);
        assert!(b.check_at(p, "b", now + S).is_some());
        // Another address's failures for `a` stand.
        assert!(b.check_at(ip("127.0.0.3"), "a", now + S).is_some());
    }

    #[test]
    fn records_are_forgotten_and_tables_bounded() {
        let b = backoff();
        let now = Instant::now();
        b.failed_at(ip("127.0.0.2"), "alice", now);
        b.failed_at(ip("127.0.0.2"), "alice", now);
        // Long after, a failure starts again at the base delay.
        let much_later = now + Duration::from_secs(3600);
        assert_eq!(b.failed_at(ip("127.0.0.2"), "alice", much_later).pair, 1);
        for i in 0..(MAX_ENTRIES as u32 + 500) {
            b.failed_at(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                "x",
                now,
            );
        }
        let t = b.lock();
        assert!(t.pairs.map.len() <= MAX_ENTRIES);
        assert!(t.sprays.len() <= MAX_ENTRIES);
    }

    #[test]
    fn names_are_compared_without_case_and_ipv6_by_64() {
        let b = backoff();
        let now = Instant::now();
        b.failed_at(ip("2001:db8::1"), "Alice@Example.com", now);
        assert!(
            b.check_at(ip("2001:db8::2"), "alice@example.com", now)
                .is_some()
        );
        assert_eq!(
            b.check_at(ip("2001:db8:0:1::2"), "alice@example.com", now),
            None
        );
    }
}
