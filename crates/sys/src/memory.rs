//! How the process's allocator holds memory. glibc gives every thread that allocates its
//! own arena (up to eight per CPU) and keeps what each arena freed: a daemon whose build,
//! compression and RPC threads take turns at large transient maps ends up holding several
//! copies of its peak. The daemon keeps one arena: `malloc_trim` gives back the free top of
//! the main arena only (a thread arena's top stays resident: 4 MB of an idle daemon's 24
//! were one), and the daemon's threads allocate big buffers seldom enough that one lock
//! costs nothing measurable.

/// Limits the allocator to `arenas` arenas (glibc only; a no-op elsewhere). Call it first
/// thing in `main`, before threads start.
pub fn limit_malloc_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; it takes no pointers and is
        // called before any other thread exists.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        if ok != 1 {
            tracing::debug!(arenas, "mallopt(M_ARENA_MAX) was refused");
        }
        // A fixed mmap threshold: blocks of 256 KiB and more (the 1 MiB pieces of layers
        // in flight) are mapped and unmapped, never left behind in the heap. glibc's own
        // threshold rises to the size of the last such block freed, after which those
        // pieces come from the heap and its fragments stay resident.
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Gives the free memory the allocator keeps back to the system (glibc's `malloc_trim`; a
/// no-op elsewhere): the daemon calls it when its last operation ends, so that an idle
/// daemon holds what is live, not its last peak.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; glibc locks each arena while it trims.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// What the allocator holds, from glibc's `mallinfo2` (summed over every arena).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes obtained from the system: the arenas plus chunks mapped on their own.
    pub obtained: u64,
    /// Bytes in allocated chunks (live data and its chunk headers).
    pub allocated: u64,
    /// Bytes in free chunks the allocator keeps for reuse.
    pub free: u64,
    /// Bytes at the top of the main arena that a trim would give back to the system.
    pub releasable: u64,
}

/// The allocator's statistics; None where they cannot be read (not glibc).
pub fn allocator_stats() -> Option<AllocatorStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only
        // reads the allocator's own bookkeeping under its locks.
        #[allow(unsafe_code)]
        let m = unsafe { libc::mallinfo2() };
        let (arena, mapped) = (m.arena as u64, m.hblkhd as u64);
        Some(AllocatorStats {
            obtained: arena + mapped,
            allocated: m.uordblks as u64 + mapped,
            free: m.fordblks as u64,
            releasable: m.keepcost as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn allocator_stats_see_an_allocation() {
        let Some(before) = super::allocator_stats() else {
            return;
        };
        let big = vec![1u8; 8 << 20];
        let during = super::allocator_stats().expect("stats");
        assert!(
            during.allocated >= before.allocated + (8 << 20) - 4096,
            "{before:?} {during:?}"
        );
        assert!(during.obtained >= during.allocated);
        drop(big);
    }
}
