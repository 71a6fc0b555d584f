//! Wall-clock time as stored and shown: whole seconds since the Unix
//! epoch. Durations and deadlines use `Instant`; this is only for values
//! that outlive the process (grant and metadata timestamps) or go on the
//! wire (JWT claims).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is set before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (spool ids, ordered by arrival).
pub fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Milliseconds since the Unix epoch of a time read elsewhere (a
/// server's HTTP `Date`), negative before it.
pub fn unix_millis_of(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_now_is_after_2023() {
        assert!(super::unix_now() > 1_700_000_000);
    }
}
