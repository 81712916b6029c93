//! How the process's allocator holds memory. glibc gives every thread that allocates its
//! own arena (up to eight per CPU) and keeps what each arena freed: a daemon whose build,
//! compression and RPC threads take turns at large transient maps ends up holding several
//! copies of its peak. Two arenas keep contention low and the resident size close to what
//! is live.

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
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}
