//! Giving freed heap memory back to the system.
//!
//! mailbridge uses the C library's allocator. glibc's malloc returns the
//! top of its main heap on its own, but the pages freed in the middle of
//! an arena (every tokio worker allocates from an arena of its own) stay
//! resident until `malloc_trim(3)` walks the arenas and gives back each
//! whole free page. After a crowd of sessions leaves, that is most of what
//! the crowd took; see docs/PERFORMANCE.md ("Memory after 10,000 sessions
//! close").
//!
//! On other C libraries [`give_back`] does nothing and says so.
//!
//! The one foreign call of the project lives here, allowed on that one
//! function, so that every other crate keeps `#![forbid(unsafe_code)]`.
#![deny(unsafe_code)]

/// What a call to [`give_back`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveBack {
    /// Some memory went back to the system.
    Released,
    /// The allocator had nothing whole to give back.
    NothingFree,
    /// This C library has no way to ask (not glibc).
    Unsupported,
}

/// Asks the allocator to give every whole free page of every arena back
/// to the system. It takes each arena's lock in turn, so other threads'
/// allocations wait for it: call it from a blocking thread, after a fall
/// in load, not per request.
pub fn give_back() -> GiveBack {
    imp::give_back()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::GiveBack;

    #[allow(unsafe_code)]
    pub fn give_back() -> GiveBack {
        // SAFETY: malloc_trim(3) takes a padding size and has no other
        // precondition; it is safe to call from any thread at any time
        // (it takes the arenas' own locks). A pad of 0 keeps nothing
        // spare at the top of the heap.
        let released = unsafe { libc::malloc_trim(0) };
        if released == 1 {
            GiveBack::Released
        } else {
            GiveBack::NothingFree
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::GiveBack;

    pub fn give_back() -> GiveBack {
        GiveBack::Unsupported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_pages_go_back_on_glibc() {
        // Allocations below the mmap threshold come from the heap, so
        // freeing them leaves 16 MB of whole free pages behind; the block
        // allocated after them keeps that space off the top of the heap.
        let blocks: Vec<Vec<u8>> = (0..2_000).map(|i| vec![i as u8; 8 * 1024]).collect();
        let keep = vec![1u8; 8 * 1024];
        drop(blocks);
        assert_eq!(give_back(), GiveBack::Released);
        drop(keep);
    }

    #[test]
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn elsewhere_it_says_it_cannot() {
        assert_eq!(give_back(), GiveBack::Unsupported);
    }
}
