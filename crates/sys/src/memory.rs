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
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// The allocation size from which the daemon's allocator maps each block on its own (see
/// [`limit_malloc_arenas`]): a buffer this big taken once per item (a file, a frame) is
/// mapped, faulted in page by page and unmapped each time, so such buffers come from the
/// pool ([`take_sized`]) or are kept by their thread.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// An empty buffer with room for `len` bytes for one item: a pooled piece from
/// [`MMAP_THRESHOLD`] up, a heap one below it (where a piece would hold a MiB for a few
/// KiB). Give it back with [`give_piece`] (which keeps only pieces).
pub fn take_sized(len: usize) -> Vec<u8> {
    if len >= MMAP_THRESHOLD {
        take_piece(len)
    } else {
        Vec::with_capacity(len)
    }
}

/// [`take_sized`], `len` bytes long, to be read into (its contents unspecified).
pub fn take_sized_filled(len: usize) -> Vec<u8> {
    if len >= MMAP_THRESHOLD {
        take_filled(len)
    } else {
        vec![0u8; len]
    }
}

/// Buffers of [`PIECE`] to twice that many bytes kept for reuse, at most [`PIECES_KEPT`]
/// of them.
static PIECES: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// The size of a pooled piece: what layers move in (an upload's pieces, a compressed
/// stream's). With the fixed mmap threshold above, a fresh buffer of this size is mapped
/// and page-faulted in every time (0.1-0.17 CPU seconds per 430 MB push or pull): pooled
/// ones are faulted in once.
pub const PIECE: usize = 1 << 20;
/// Pieces the pool keeps (what a few transfers at once have in flight).
pub const PIECES_KEPT: usize = 16;

/// An empty buffer with room for at least `len` bytes: a pooled one when `len` is at most
/// two pieces (grown if it must be: a compressor's output may outgrow its input), else a
/// new one.
pub fn take_piece(len: usize) -> Vec<u8> {
    let mut v = pooled_or_new(len, false);
    v.clear();
    v.reserve(len);
    v
}

/// A pooled buffer (as it was given back) when `len` is at most two pieces, else a new one
/// with room for `len`. A piece's length is how much of it is known written: `filled` takes
/// the longest one (it is zeroed only past that length), an empty one to be written from
/// the start takes the shortest (a push's copies of compressed pieces come back half full,
/// and a read of a MiB into one of them zeroed the other half: 0.05 CPU s per 430 MB).
fn pooled_or_new(len: usize, filled: bool) -> Vec<u8> {
    let pooled = if len <= 2 * PIECE {
        let mut pool = PIECES.lock().unwrap_or_else(|p| p.into_inner());
        let pick = if filled {
            pool.iter().enumerate().max_by_key(|(_, v)| v.len())
        } else {
            pool.iter().enumerate().min_by_key(|(_, v)| v.len())
        }
        .map(|(i, _)| i);
        pick.map(|i| pool.swap_remove(i))
    } else {
        None
    };
    pooled.unwrap_or_else(|| Vec::with_capacity(len.max(PIECE)))
}

/// A buffer of exactly `len` bytes whose contents are unspecified (zeros, or what a pooled
/// piece held before): for code that writes into a slice (a `read`, a compressor's output)
/// and keeps count of what it filled. A pooled piece keeps its length when given back, so
/// its bytes are written again only past that length, instead of being zeroed for every
/// use (what `resize` on an emptied piece costs: a memset of each MiB moved).
pub fn take_filled(len: usize) -> Vec<u8> {
    let mut v = pooled_or_new(len, true);
    if v.len() >= len {
        v.truncate(len);
    } else {
        // Grown to the size asked, not doubled: a piece stays within what the pool keeps.
        v.reserve_exact(len - v.len());
        v.resize(len, 0);
    }
    v
}

/// Gives a buffer back to the pool (kept if it came from it, at most two pieces big, and
/// the pool has room).
pub fn give_piece(v: Vec<u8>) {
    if !(PIECE..=2 * PIECE).contains(&v.capacity()) {
        return;
    }
    let mut pool = PIECES.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < PIECES_KEPT {
        pool.push(v);
    }
}

/// How many pieces the pool holds now.
pub fn pieces_kept() -> usize {
    PIECES.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// A pooled piece as the owner of a `bytes::Bytes`-like buffer: back to the pool on drop.
#[derive(Debug, Default)]
pub struct Piece(Vec<u8>);

impl Piece {
    /// A piece holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Piece {
        let mut v = take_piece(data.len());
        v.extend_from_slice(data);
        Piece(v)
    }

    /// A piece made of `v` (taken from [`take_piece`]).
    pub fn from_vec(v: Vec<u8>) -> Piece {
        Piece(v)
    }
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        give_piece(std::mem::take(&mut self.0));
    }
}

/// Gives the free memory the allocator keeps back to the system (glibc's `malloc_trim`; a
/// no-op elsewhere), the pooled pieces with it: the daemon calls it when its last operation
/// ends, so that an idle daemon holds what is live, not its last peak.
pub fn release_free() {
    PIECES.lock().unwrap_or_else(|p| p.into_inner()).clear();
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
    fn pieces_go_round_and_idle_time_frees_them() {
        super::release_free();
        let a = super::Piece::copy_of(b"first");
        let at = a.as_ref().as_ptr();
        assert_eq!(a.as_ref(), b"first");
        drop(a);
        assert_eq!(super::pieces_kept(), 1);
        // The same buffer again, emptied.
        let b = super::take_piece(10);
        assert_eq!((b.as_ptr(), b.len()), (at, 0));
        // A buffer that is not a piece is not kept, nor one over two pieces.
        super::give_piece(Vec::with_capacity(10));
        super::give_piece(Vec::with_capacity(2 * super::PIECE + 1));
        assert_eq!(super::pieces_kept(), 0);
        super::give_piece(b);
        assert_eq!(super::pieces_kept(), 1);
        // A piece grown for a bigger output goes round too.
        let mut c = super::take_piece(super::PIECE + 100);
        assert!(c.capacity() >= super::PIECE + 100);
        c.push(1);
        super::give_piece(c);
        assert_eq!(super::pieces_kept(), 1);
        // A filled piece keeps what it held: only its growth is written.
        super::release_free();
        let mut d = super::take_filled(100);
        assert_eq!(d.len(), 100);
        d.fill(7);
        let at = d.as_ptr();
        super::give_piece(d);
        let e = super::take_filled(50);
        assert_eq!((e.as_ptr(), e.len()), (at, 50));
        assert!(
            e.iter().all(|&b| b == 7),
            "the piece's bytes were rewritten"
        );
        super::give_piece(e);
        let f = super::take_filled(80);
        assert_eq!((f.as_ptr(), f.len()), (at, 80));
        assert!(f[..50].iter().all(|&b| b == 7) && f[50..].iter().all(|&b| b == 0));
        super::give_piece(f);
        assert_eq!(super::take_piece(10).len(), 0);
        super::release_free();
        assert_eq!(super::pieces_kept(), 0);
        // Of a full piece and a short one, a read takes the full one (nothing to zero) and
        // a push-style writer the short one, in either order of giving back.
        for full_first in [true, false] {
            let mut full = super::take_filled(super::PIECE);
            full.fill(1);
            let mut short = super::take_piece(super::PIECE);
            short.extend_from_slice(b"half");
            let (full_at, short_at) = (full.as_ptr(), short.as_ptr());
            if full_first {
                super::give_piece(full);
                super::give_piece(short);
            } else {
                super::give_piece(short);
                super::give_piece(full);
            }
            let read = super::take_filled(super::PIECE);
            assert_eq!(read.as_ptr(), full_at, "full first: {full_first}");
            assert!(read.iter().all(|&b| b == 1));
            super::give_piece(read);
            let written = super::take_piece(100);
            assert_eq!(written.as_ptr(), short_at, "full first: {full_first}");
            super::release_free();
        }
        // A big request is not a piece.
        assert!(super::take_piece(2 * super::PIECE + 1).capacity() > 2 * super::PIECE);
    }

    #[test]
    fn allocator_stats_see_an_allocation() {
        let Some(before) = super::allocator_stats() else {
            return;
        };
        // black_box: an optimized build would elide an allocation nothing reads.
        let big = std::hint::black_box(vec![1u8; 8 << 20]);
        let during = super::allocator_stats().expect("stats");
        assert!(
            during.allocated >= before.allocated + (8 << 20) - 4096,
            "{before:?} {during:?}"
        );
        assert!(during.obtained >= during.allocated);
        drop(big);
    }
}
