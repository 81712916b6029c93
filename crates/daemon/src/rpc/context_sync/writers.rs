//! The files of one context sync, made while the connection goes on: the receiving thread
//! checks each chunk against what was asked (order, path, size) and hands it to one of a
//! few writer threads, which create the file, write it, hash it and check the SHA-256 the
//! client gave. The client sends many small files to a message, so neither side waits for
//! the other per file; the kernel's work of making inodes and copying pages is spread
//! over the cores.
//!
//! Nothing here fsyncs: a synced context is a cache the daemon can always ask for again.
//! Its generation counts only once its manifest is written, and a manifest is trusted only
//! in the boot that wrote it (see `mod.rs`): a power cut, the one thing that can lose
//! written pages, changes the boot, so no half-written file is ever used.
//!
//! What this must not do: write outside the generation's tree (every file is made under a
//! directory handle resolved in it, by name, `O_EXCL`), or keep a thread running after it
//! returns (the threads are scoped: on any error the caller removes the whole tree).

use isula_api::v1::{ContextEntry, ContextUpload};
use isula_sys::rooted::{self, Resolve, Root};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use tonic::Status;

/// Chunks waiting for each writer, at most (a chunk is at most the client's 1 MiB).
const LANE_JOBS: usize = 32;

/// Writer threads: two at least (one makes a file while the other hashes), four at most.
fn writers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// One chunk of a file, for its writer.
struct Job {
    /// The file's index in what was asked.
    idx: usize,
    /// The first chunk: the file is made.
    first: bool,
    data: Vec<u8>,
    /// The last chunk: the file as listed, and the SHA-256 the client gave.
    last: Option<(Listed, String)>,
}

#[derive(Clone, Copy)]
struct Listed {
    size: i64,
    mode: u32,
    mtime_ns: i64,
}

/// What arrived: bytes, and the SHA-256 of each file asked for (in the order asked).
pub(super) struct Received {
    pub bytes: u64,
    pub sums: Vec<String>,
}

/// Receives the content of the files `need` (paths of `entries`, in the order asked) from
/// `next`, into `root` (their directories made already). Fails, with every thread ended,
/// on the first chunk out of order, file over its size, hash that differs or write that
/// fails.
pub(super) fn receive_files(
    root: &Root,
    need: &[String],
    entries: &HashMap<&str, &ContextEntry>,
    mut next: impl FnMut() -> Result<ContextUpload, Status>,
) -> Result<Received, Status> {
    let failed: Mutex<Option<Status>> = Mutex::new(None);
    let fail = |e: Status| {
        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    };
    let first_failure = || {
        failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Status::internal("a context writer stopped"))
    };
    std::thread::scope(|s| {
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for i in 0..writers() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(LANE_JOBS);
            let spawned = std::thread::Builder::new()
                .name(format!("context-write-{i}"))
                .spawn_scoped(s, move || write_lane(root, need, rx).map_err(fail));
            match spawned {
                Ok(t) => {
                    lanes.push(tx);
                    threads.push(t);
                }
                Err(e) if lanes.is_empty() => {
                    return Err(Status::internal(format!("starting a context writer: {e}")))
                }
                Err(_) => break,
            }
        }
        let fed = feed(need, entries, &mut next, &lanes, &failed);
        drop(lanes);
        let mut sums = vec![String::new(); need.len()];
        let mut stopped = false;
        for t in threads {
            match t.join() {
                Ok(Ok(done)) => {
                    for (idx, sum) in done {
                        sums[idx] = sum;
                    }
                }
                Ok(Err(())) => stopped = true,
                Err(_) => {
                    fail(Status::internal("a context writer panicked"));
                    stopped = true;
                }
            }
        }
        // A writer's error first: a chunk it could not take is why the feed stopped.
        if stopped {
            return Err(first_failure());
        }
        let bytes = fed?;
        Ok(Received { bytes, sums })
    })
}

/// The receiving side: every chunk checked against what was asked, handed to a writer
/// (all chunks of a file to the same one, files in turn). Returns the bytes received.
fn feed(
    need: &[String],
    entries: &HashMap<&str, &ContextEntry>,
    next: &mut impl FnMut() -> Result<ContextUpload, Status>,
    lanes: &[std::sync::mpsc::SyncSender<Job>],
    failed: &Mutex<Option<Status>>,
) -> Result<u64, Status> {
    let stopped = || Status::internal("a context writer stopped");
    let mut received = 0u64;
    let mut idx = 0usize;
    // The file being received: its size so far, and its writer.
    let mut open: Option<(i64, usize)> = None;
    let mut lane_next = 0usize;
    while idx < need.len() {
        let m = next()?;
        if !m.entries.is_empty() || m.listed || !m.key.is_empty() {
            return Err(bad("context entries after the list was complete"));
        }
        if m.chunks.is_empty() {
            return Err(bad(format!(
                "expected the content of {:?}, got a message without any",
                need[idx]
            )));
        }
        for c in m.chunks {
            let Some(want) = need.get(idx) else {
                return Err(bad(format!(
                    "{:?}: content after every file asked for",
                    c.path
                )));
            };
            if c.path != *want {
                return Err(bad(format!(
                    "expected the content of {want:?}, got {:?}",
                    c.path
                )));
            }
            let e = entries
                .get(want.as_str())
                .ok_or_else(|| Status::internal(format!("{want}: asked for, not listed")))?;
            let (size, lane) = open.unwrap_or_else(|| {
                lane_next = (lane_next + 1) % lanes.len();
                (0, lane_next)
            });
            let size = size + c.data.len() as i64;
            if size > e.size {
                return Err(bad(format!("{want}: more bytes than its size {}", e.size)));
            }
            received += c.data.len() as u64;
            let job = Job {
                idx,
                first: open.is_none(),
                data: c.data,
                last: c.done.then(|| {
                    (
                        Listed {
                            size: e.size,
                            mode: e.mode,
                            mtime_ns: e.mtime_ns,
                        },
                        c.sha256,
                    )
                }),
            };
            if job.last.is_some() {
                open = None;
                idx += 1;
            } else {
                open = Some((size, lane));
            }
            lanes[lane].send(job).map_err(|_| stopped())?;
        }
        if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Err(stopped());
        }
    }
    Ok(received)
}

/// A writer: makes, fills, checks and finishes the files of its chunks, in the order they
/// come. Returns each finished file's index and SHA-256.
fn write_lane(
    root: &Root,
    need: &[String],
    jobs: std::sync::mpsc::Receiver<Job>,
) -> Result<Vec<(usize, String)>, Status> {
    let mut done = Vec::new();
    // The directory of the last file made (files of a directory come together).
    let mut dir: Option<(String, OwnedFd)> = None;
    let mut file: Option<(std::fs::File, sha2::Sha256, i64)> = None;
    for job in jobs {
        let path = &need[job.idx];
        if job.first {
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", path.as_str()),
            };
            if dir.as_ref().is_none_or(|(d, _)| d != parent) {
                let fd = if parent.is_empty() {
                    rustix::io::fcntl_dupfd_cloexec(root.fd(), 0).map_err(|e| e.to_string())
                } else {
                    root.dir(Path::new(parent), Resolve::InRoot, false)
                        .map_err(|e| e.to_string())
                }
                .map_err(|e| Status::internal(format!("{path}: {e}")))?;
                dir = Some((parent.to_string(), fd));
            }
            let pdir = dir
                .as_ref()
                .map(|(_, fd)| fd.as_fd())
                .ok_or_else(|| Status::internal(format!("{path}: no directory")))?;
            let f = rooted::create_file(pdir, std::ffi::OsStr::new(name), 0o600)
                .map_err(|e| Status::internal(format!("{path}: {e}")))?;
            file = Some((f, sha2::Sha256::new(), 0));
        }
        let (f, h, size) = file
            .as_mut()
            .ok_or_else(|| Status::internal(format!("{path}: a chunk of no file")))?;
        h.update(&job.data);
        f.write_all(&job.data)
            .map_err(|e| Status::internal(format!("write {path}: {e}")))?;
        *size += job.data.len() as i64;
        if let Some((listed, claimed)) = job.last {
            let (f, h, size) = file
                .take()
                .ok_or_else(|| Status::internal(format!("{path}: a chunk of no file")))?;
            let got = hex::encode(h.finalize());
            if got != claimed || size != listed.size {
                return Err(bad(format!(
                    "{path} arrived as {size} bytes with SHA-256 {got}, the client said {} bytes, {claimed}",
                    listed.size
                )));
            }
            let mtime = (
                listed.mtime_ns.div_euclid(1_000_000_000),
                listed.mtime_ns.rem_euclid(1_000_000_000) as u32,
            );
            rooted::set_owner_mode_times(&f, (0, 0), listed.mode & 0o7777, mtime)
                .map_err(|e| Status::internal(format!("{path}: {e}")))?;
            done.push((job.idx, got));
        }
    }
    Ok(done)
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}
