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

/// Bytes received and not yet written, at most: the receiving side runs this far ahead of
/// the writers (a directory's files go to one writer, so it must get past a directory to
/// keep the others busy).
const IN_FLIGHT: usize = 32 << 20;

/// What the receiving side and the writers share: the bytes in flight, and the first
/// failure.
#[derive(Default)]
struct Flow {
    state: Mutex<FlowState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct FlowState {
    bytes: usize,
    failed: Option<Status>,
}

impl Flow {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `n` more bytes may be in flight (or something failed: false).
    fn reserve(&self, n: usize) -> bool {
        let mut st = self.lock();
        while st.failed.is_none() && st.bytes > 0 && st.bytes + n > IN_FLIGHT {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.bytes += n;
        st.failed.is_none()
    }

    fn release(&self, n: usize) {
        let mut st = self.lock();
        st.bytes = st.bytes.saturating_sub(n);
        self.changed.notify_all();
    }

    fn fail(&self, e: Status) {
        let mut st = self.lock();
        st.failed.get_or_insert(e);
        self.changed.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    fn first_failure(&self) -> Status {
        self.lock()
            .failed
            .take()
            .unwrap_or_else(|| Status::internal("a context writer stopped"))
    }
}

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
    next: impl FnMut() -> Result<ContextUpload, Status>,
) -> Result<Received, Status> {
    receive_with(root, need, entries, next, write_lane)
}

/// What a writer thread returns: each finished file's index and SHA-256.
type LaneResult = Result<Vec<(usize, String)>, Status>;

/// Fails the flow if its writer thread panics: the feed may be waiting for bytes that
/// writer will never release, and would wait forever.
struct FailOnPanic<'a>(&'a Flow);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail(Status::internal("a context writer thread panicked"));
        }
    }
}

/// [`receive_files`], each writer thread running `lane` ([`write_lane`], or in tests one
/// that fails as the test needs).
fn receive_with(
    root: &Root,
    need: &[String],
    entries: &HashMap<&str, &ContextEntry>,
    mut next: impl FnMut() -> Result<ContextUpload, Status>,
    lane: impl Fn(&Root, &[String], std::sync::mpsc::Receiver<Job>, &Flow) -> LaneResult + Sync,
) -> Result<Received, Status> {
    let flow = Flow::default();
    let flow = &flow;
    let lane = &lane;
    std::thread::scope(|s| {
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for i in 0..writers() {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("context-write-{i}"))
                .spawn_scoped(s, move || {
                    let _guard = FailOnPanic(flow);
                    lane(root, need, rx, flow).map_err(|e| flow.fail(e))
                });
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
        let fed = feed(need, entries, &mut next, &lanes, flow);
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
                    flow.fail(Status::internal("a context writer thread panicked"));
                    stopped = true;
                }
            }
        }
        // A writer's error first: a chunk it could not take is why the feed stopped.
        if stopped {
            return Err(flow.first_failure());
        }
        let bytes = fed?;
        Ok(Received { bytes, sums })
    })
}

/// The receiving side: every chunk checked against what was asked, handed to a writer
/// (the files of a directory to the same one, directories in turn). Returns the bytes received.
fn feed(
    need: &[String],
    entries: &HashMap<&str, &ContextEntry>,
    next: &mut impl FnMut() -> Result<ContextUpload, Status>,
    lanes: &[std::sync::mpsc::Sender<Job>],
    flow: &Flow,
) -> Result<u64, Status> {
    let stopped = || Status::internal("a context writer stopped");
    let mut received = 0u64;
    let mut idx = 0usize;
    // The file being received: its size so far, and its writer.
    let mut open: Option<(i64, usize)> = None;
    let mut lane_next = 0usize;
    let mut lane_dir = "";
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
                // A directory's files to one writer: making files in one directory takes
                // its lock, so writers sharing one would only wait on each other.
                let dir = want.rsplit_once('/').map_or("", |(d, _)| d);
                if dir != lane_dir {
                    lane_dir = dir;
                    lane_next = (lane_next + 1) % lanes.len();
                }
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
                last: c.done.then_some({
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
            if !flow.reserve(job.data.len()) {
                return Err(stopped());
            }
            lanes[lane].send(job).map_err(|_| stopped())?;
        }
        if flow.failed() {
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
    flow: &Flow,
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
        flow.release(job.data.len());
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

#[cfg(test)]
mod tests {
    use super::*;
    use isula_api::v1::ContextChunk;

    /// A writer that panics on its first chunk: the feed, waiting for room its bytes take,
    /// must stop with the panic as its error, not wait forever.
    #[test]
    fn a_writer_that_panics_fails_the_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        // Not scoped: if the sync waits forever, the test still fails, after the timeout.
        std::thread::spawn(move || {
            let root = Root::open(&path).expect("root");
            let need = vec!["big".to_string()];
            let entry = ContextEntry {
                path: "big".into(),
                mode: 0o100644,
                size: IN_FLIGHT as i64 + 1,
                ..Default::default()
            };
            let entries: HashMap<&str, &ContextEntry> = [("big", &entry)].into_iter().collect();
            // All the room in flight, then one byte more: the feed waits for the writer.
            let mut chunks = vec![vec![0u8; IN_FLIGHT], vec![0u8; 1]].into_iter();
            let next = move || {
                let data = chunks.next().expect("asked past the file");
                Ok(ContextUpload {
                    chunks: vec![ContextChunk {
                        path: "big".into(),
                        done: data.len() == 1,
                        data,
                        sha256: String::new(),
                    }],
                    ..Default::default()
                })
            };
            let panics = |_: &Root,
                          _: &[String],
                          jobs: std::sync::mpsc::Receiver<Job>,
                          _: &Flow| match jobs.recv() {
                Ok(_) => panic!("injected writer panic"),
                Err(_) => Ok(Vec::new()),
            };
            let r = receive_with(&root, &need, &entries, next, panics);
            let _ = tx.send(r.map(|_| ()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the sync must end when a writer panics, not wait");
        let e = r.expect_err("a writer panicked");
        assert!(e.message().contains("writer thread panicked"), "{e:?}");
    }
}
