//! Write-behind: a large file that will be fsynced at its end has its writeback started
//! as it is written, window by window, so that the disk works while the writer does, and
//! the final fsync waits only for the last window (and the metadata). The fsync is still
//! what makes the file durable, and still the call that reports a write error.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};

/// How much is written between two starts of writeback.
const WINDOW: u64 = 8 << 20;

/// A writer to a file that starts the writeback of every full window it wrote
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: asynchronous, it waits for nothing). Writes
/// are taken to go to the end of what was written before, from the start of the file.
pub struct WriteBehind<W> {
    inner: W,
    /// The file offset up to which writeback was started.
    started: u64,
    /// The file offset after the last write.
    written: u64,
}

impl<W: Write + AsFd> WriteBehind<W> {
    /// Writes to `inner`, whose next write lands at the start of the file.
    pub fn new(inner: W) -> Self {
        WriteBehind {
            inner,
            started: 0,
            written: 0,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write + AsFd> WriteBehind<W> {
    /// Appends `len` bytes of `src` from `offset` at the file's position, copied inside the
    /// kernel (`copy_file_range`: page cache to page cache, never through this process's
    /// memory), written behind as writes are. What was written before must be in the file
    /// already (flushed). Returns false, having copied nothing, where the kernel cannot copy
    /// between these files (the caller then copies through memory).
    pub fn copy_from(&mut self, src: &impl AsFd, mut offset: u64, len: u64) -> io::Result<bool> {
        use rustix::io::Errno;
        let mut left = len;
        while left > 0 {
            let chunk = usize::try_from(left.min(WINDOW)).unwrap_or(WINDOW as usize);
            match rustix::fs::copy_file_range(src, Some(&mut offset), &self.inner, None, chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the source is shorter than the copy",
                    ))
                }
                Ok(n) => {
                    left -= n as u64;
                    self.written += n as u64;
                    if self.written - self.started >= WINDOW {
                        start_writeback(&self.inner, self.started, self.written - self.started);
                        self.started = self.written;
                    }
                }
                Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS)
                    if left == len =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

impl<W: Write + AsFd> Write for WriteBehind<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WINDOW {
            start_writeback(&self.inner, self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Starts the writeback of `len` bytes of `file` from `offset`. Advisory: where the file
/// system cannot, nothing happens, and the fsync that follows does all the work (and
/// reports any error).
pub fn start_writeback(file: &impl AsFd, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is borrowed, so open
    // for the length of the call.
    #[allow(unsafe_code)]
    let _ = unsafe {
        libc::sync_file_range(
            file.as_fd().as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::Path;

    /// What cachestat(2) (Linux 6.5) tells of a file's pages in the page cache.
    #[repr(C)]
    #[derive(Debug, Default)]
    struct CacheStat {
        nr_cache: u64,
        /// Written by the process, not yet sent to the disk.
        nr_dirty: u64,
        /// Sent to the disk, not yet acknowledged by it.
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }

    #[repr(C)]
    struct CacheStatRange {
        off: u64,
        /// 0: to the end of the file.
        len: u64,
    }

    /// The page-cache state of `file`'s own pages. Unlike /proc/meminfo's `Dirty:` it is
    /// this file's alone, so no other writer moves it; and unlike /proc/self/io's
    /// `write_bytes` (which the kernel counts when a page is dirtied, so plain writes grow
    /// it just as much) it tells a dirty page from one sent to the disk.
    fn cache_stat(file: &File) -> CacheStat {
        // The same number on every architecture (the unified table); libc lacks it.
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = CacheStatRange { off: 0, len: 0 };
        let mut stat = CacheStat::default();
        // SAFETY: the kernel reads `range` and writes one `struct cachestat` into `stat`,
        // both laid out as in <linux/mman.h> and alive for the call; the descriptor is
        // borrowed, so open.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const CacheStatRange,
                &mut stat as *mut CacheStat,
                0 as libc::c_uint,
            )
        };
        assert_eq!(
            r,
            0,
            "cachestat (Linux 6.5): {}",
            io::Error::last_os_error()
        );
        stat
    }

    fn page_size() -> u64 {
        // SAFETY: sysconf reads no memory of ours.
        #[allow(unsafe_code)]
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).expect("page size")
    }

    /// Whether `dir` is on a file system with a disk behind it (tmpfs and ramfs have no
    /// writeback to start, and cachestat counts none of their pages dirty, whatever the
    /// writer does).
    fn on_a_disk(dir: &Path) -> Result<(), String> {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        let f_type = rustix::fs::statfs(dir).expect("statfs").f_type as i64;
        match f_type {
            TMPFS_MAGIC => Err(format!("{} is on tmpfs", dir.display())),
            RAMFS_MAGIC => Err(format!("{} is on ramfs", dir.display())),
            _ => Ok(()),
        }
    }

    #[test]
    fn everything_written_arrives_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).expect("create");
        let mut w = WriteBehind::new(file);
        let mut expect = Vec::new();
        for i in 0..40u32 {
            let piece = vec![(i % 251) as u8; 1 << 20 | i as usize];
            w.write_all(&piece).expect("write");
            expect.extend_from_slice(&piece);
        }
        w.flush().expect("flush");
        w.get_ref().sync_all().expect("fsync");
        assert_eq!(std::fs::read(&path).expect("read"), expect);
    }

    #[test]
    fn copy_from_appends_in_the_kernel_between_writes() {
        let dir = tempfile::tempdir().expect("tmp");
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src_path, &data).expect("src");
        let src = File::open(&src_path).expect("open");
        let path = dir.path().join("out");
        let file = File::create(&path).expect("create");
        let mut w = WriteBehind::new(&file);
        w.write_all(b"head").expect("write");
        // From an offset, across more than one window, then writes again after it.
        let copied = w.copy_from(&src, 5, 18 << 20).expect("copy");
        w.write_all(b"tail").expect("write");
        file.sync_all().expect("fsync");
        let mut expect = b"head".to_vec();
        if copied {
            expect.extend_from_slice(&data[5..5 + (18 << 20)]);
        }
        expect.extend_from_slice(b"tail");
        assert_eq!(std::fs::read(&path).expect("read"), expect);
        // A disk file system here copies in the kernel (tmpfs and ext4 both can).
        assert!(copied, "copy_file_range was refused");
        // A source shorter than asked fails (never a short archive entry).
        let short = w.copy_from(&src, (20 << 20) - 10, 100);
        assert!(short.is_err(), "{short:?}");
    }

    #[test]
    fn writeback_starts_before_the_end() {
        // 128 MiB through the writer: when the writes return, before the fsync, all but
        // the last two windows of the file have been sent to the disk (under writeback or
        // written). Beside the test binary, not in /tmp, which may be a tmpfs (no
        // writeback there, nor dirty pages: the control below would fail).
        const TOTAL: u64 = 128 << 20;
        let exe = std::env::current_exe().expect("test binary");
        let dir = tempfile::tempdir_in(exe.parent().expect("its directory")).expect("tmp");
        if let Err(why) = on_a_disk(dir.path()) {
            assert!(
                std::env::var_os("CI").is_none(),
                "writeback needs a disk file system in CI: {why}"
            );
            eprintln!("skipping: {why}, which has no writeback (outside CI)");
            return;
        }
        let page = page_size();
        let piece = vec![7u8; 1 << 20];
        let mut inconclusive = Vec::new();
        for attempt in 0..5 {
            // The control: plain writes of the same size leave (at least half of) the file
            // dirty, so the measure can tell. And as nothing but writeback cleans its pages,
            // none of them cleaned while the write-behind ran shows that nobody flushed the
            // file system then (a sync, the kernel's background writeback), which would
            // have cleaned the write-behind's pages too and passed this test without it.
            let plain_path = dir.path().join(format!("plain{attempt}"));
            let behind_path = dir.path().join(format!("behind{attempt}"));
            let mut plain = File::create(&plain_path).expect("create");
            for _ in 0..TOTAL >> 20 {
                plain.write_all(&piece).expect("write");
            }
            let control_before = cache_stat(&plain);
            let mut w = WriteBehind::new(File::create(&behind_path).expect("create"));
            for _ in 0..TOTAL >> 20 {
                w.write_all(&piece).expect("write");
            }
            let behind = cache_stat(w.get_ref());
            let control_after = cache_stat(&plain);
            w.get_ref().sync_all().expect("fsync");
            plain.sync_all().expect("fsync");
            drop((w, plain));
            std::fs::remove_file(&plain_path).expect("remove");
            std::fs::remove_file(&behind_path).expect("remove");
            // Nobody else writes to this file and nothing but writeback cleans it: more
            // dirty than two windows is a failure whatever the control says.
            let left_dirty = behind.nr_dirty * page;
            assert!(
                left_dirty <= 2 * WINDOW,
                "writeback did not start: {} MiB of {} MiB still dirty before the fsync \
                 ({behind:?}; plain writes: {control_after:?})",
                left_dirty >> 20,
                TOTAL >> 20,
            );
            let before = control_before.nr_dirty * page;
            let after = control_after.nr_dirty * page;
            if before >= TOTAL / 2 && after == before {
                return;
            }
            inconclusive.push(if before < TOTAL / 2 {
                format!(
                    "plain writes left only {} MiB dirty (a file system that keeps no \
                     dirty pages, or one flushed meanwhile)",
                    before >> 20
                )
            } else {
                format!(
                    "the plain file went from {} to {} MiB dirty while the write-behind \
                     ran (flushed by others)",
                    before >> 20,
                    after >> 20
                )
            });
        }
        panic!("no attempt could tell whether writeback started: {inconclusive:?}");
    }
}
