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
    use std::io::Read;

    /// Dirty pages the kernel has not started writing back, in KiB (/proc/meminfo's
    /// system-wide count): read around a write of ours, it moves by what that write left
    /// dirty.
    fn dirty_kib() -> u64 {
        let mut s = String::new();
        std::fs::File::open("/proc/meminfo")
            .and_then(|mut f| f.read_to_string(&mut s))
            .expect("meminfo");
        s.lines()
            .find_map(|l| l.strip_prefix("Dirty:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("Dirty: line")
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
    fn writeback_starts_before_the_end() {
        // 128 MiB through the writer: all but the last window is under writeback (or
        // written) when the writes return, where plain writes would leave all 128 MiB dirty.
        // Other processes' dirty pages move the system count too: the margin is wide, and
        // a writer elsewhere that dirties 64 MiB in the same instant three times over is
        // not this code's failure (without the writeback, every attempt fails). Beside the
        // test binary, not in /tmp: a tmpfs has no writeback to start, nor dirty pages.
        let exe = std::env::current_exe().expect("test binary");
        let dir = tempfile::tempdir_in(exe.parent().expect("its directory")).expect("tmp");
        let mut seen = Vec::new();
        for attempt in 0..3 {
            let file =
                std::fs::File::create(dir.path().join(format!("f{attempt}"))).expect("create");
            let before = dirty_kib();
            let mut w = WriteBehind::new(file);
            let piece = vec![7u8; 1 << 20];
            for _ in 0..128 {
                w.write_all(&piece).expect("write");
            }
            let after = dirty_kib();
            w.get_ref().sync_all().expect("fsync");
            if after < before + 64 * 1024 {
                return;
            }
            seen.push(format!("before {before} KiB, after {after} KiB"));
        }
        panic!("writeback did not start: dirty {seen:?}");
    }
}
