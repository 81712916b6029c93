//! SyncContext: a build context sent over the connection, for clients whose files the
//! daemon cannot see (remote builds). The daemon keeps each client's last context, by the
//! client's identity (certificate common name, or uid on the socket) and a key the client
//! derives from its host name and the context's path (as BuildKit's shared key); the
//! client lists its entries with their stat, the daemon asks only for the files that
//! differ, and every file that arrives is checked against the SHA-256 the client sends.
//!
//! ```text
//! <dataroot>/contexts/<hex>/         one per client and key (hex: SHA-256 of both)
//! ├── owner                          who may use it
//! ├── <generation>/tree/             a complete context, never written again
//! ├── <generation>/boot              the boot that wrote it (see [`trusted`])
//! ├── <generation>/manifest.json     its entries: path, mode, size, mtime, SHA-256
//! └── <generation>/lock              shared by each build that reads it, held
//!                                    exclusively by the sync that makes it
//! ```
//!
//! A new generation is made beside the last one (unchanged files are hard links to it) and
//! takes its place only when complete: a client that goes away or sends a file that changed
//! leaves the last one as it was and nothing else. Files arrive many to a message and are
//! made by a few threads ([`writers`]). No file of a tree is ever written or changed in
//! place once made (a changed file is a new inode in the next generation), so a build may
//! hard-link them into a COPY's layer (`BuildOptions::synced_context`). Older generations go when no build reads
//! them. At most [`CONTEXTS_MAX`] contexts are kept (the least recently synced go first);
//! `builder du` shows them and `builder prune` removes them.

use crate::state::State;
use isula_api::v1::{ContextEntry, ContextReply, ContextUpload};
use isula_sys::rooted::{self, Resolve, Root};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::Status;

mod writers;

/// Contexts kept, at most: past it the least recently synced one goes.
pub const CONTEXTS_MAX: usize = 64;
/// Entries one context may have.
pub const ENTRIES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Kept {
    mode: u32,
    size: i64,
    mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

fn dir(state: &State) -> PathBuf {
    state.settings.data_root.join("contexts")
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A relative, '/'-separated path with no empty, `.` or `..` component.
fn check_path(p: &str) -> Result<(), Status> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || p.contains('\0')
    {
        return Err(bad(format!("context entry {p:?} is not a relative path")));
    }
    Ok(())
}

fn parent_of(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(d, _)| d)
}

/// The context directory `id` ("<hex>/<generation>") names, if `owner` may use it: its
/// tree, and a shared lock held while a build reads it.
pub fn open(
    state: &State,
    id: &str,
    owner: &str,
) -> Result<(PathBuf, isula_sys::lock::FileLock), Status> {
    let (hex, generation) = id
        .split_once('/')
        .filter(|(h, g)| {
            h.len() == 64
                && h.bytes().all(|b| b.is_ascii_hexdigit())
                && !g.is_empty()
                && g.bytes().all(|b| b.is_ascii_digit())
        })
        .ok_or_else(|| bad(format!("context {id:?} is not a context this daemon made")))?;
    let base = dir(state).join(hex);
    let kept_owner = std::fs::read_to_string(base.join("owner")).unwrap_or_default();
    if kept_owner != owner {
        return Err(Status::not_found(format!("no context {id} of yours")));
    }
    let gen_dir = base.join(generation);
    let lock = isula_sys::lock::FileLock::try_shared(&gen_dir.join("lock"))
        .map_err(|_| Status::not_found(format!("context {id} is gone (sync it again)")))?;
    if !trusted(&gen_dir) {
        return Err(Status::not_found(format!(
            "context {id} was synced before this machine restarted (sync it again)"
        )));
    }
    Ok((gen_dir.join("tree"), lock))
}

/// What `builder du` shows: each context, its owner, size and last sync.
pub fn usage(state: &State) -> Vec<(String, String, u64, i64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir(state))
        .into_iter()
        .flatten()
        .flatten()
    {
        let owner = std::fs::read_to_string(e.path().join("owner")).unwrap_or_default();
        let size = isula_store::cache::disk_usage(&e.path());
        let synced = std::fs::metadata(e.path().join("owner"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        out.push((
            e.file_name().to_string_lossy().to_string(),
            owner,
            size,
            synced,
        ));
    }
    out
}

/// Removes every context no build reads now; returns the bytes freed.
pub fn prune(state: &State) -> u64 {
    let mut freed = 0;
    for e in std::fs::read_dir(dir(state))
        .into_iter()
        .flatten()
        .flatten()
    {
        // Held while a sync of this context runs (it may be making a generation).
        let idle = isula_sys::lock::FileLock::try_exclusive(&e.path().join(SYNC_LOCK)).ok();
        freed += remove_unused(&e.path(), None, Some(&state.store), idle.is_none());
        // The whole context once no generation is left, and no sync is under way.
        let left = std::fs::read_dir(e.path())
            .into_iter()
            .flatten()
            .flatten()
            .any(|g| g.path().is_dir());
        if !left && idle.is_some() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    freed
}

/// Removes the generations of context directory `base` but `keep` that no build reads
/// and no sync is making. `syncing`: a sync of this context (not the caller) may be under
/// way, so a generation without its `lock` may be one it has only just begun; otherwise
/// such a generation is what a sync that died left, and goes.
fn remove_unused(
    base: &Path,
    keep: Option<&str>,
    store: Option<&isula_store::Store>,
    syncing: bool,
) -> u64 {
    let mut freed = 0;
    for g in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = g.file_name().to_string_lossy().to_string();
        if !g.path().is_dir() || Some(name.as_str()) == keep {
            continue;
        }
        let lock = g.path().join("lock");
        if syncing && !lock.exists() {
            continue;
        }
        // Not while a build reads it or a sync makes it (its lock is then taken elsewhere).
        let Ok(_l) = isula_sys::lock::FileLock::try_exclusive(&lock) else {
            continue;
        };
        let size = isula_store::cache::disk_usage(&g.path());
        if isula_sys::rooted::remove_tree(&g.path()).is_ok() {
            freed += size;
            if let Some(store) = store {
                let _ = std::fs::remove_file(store.cache().context_record(&g.path().join("tree")));
            }
        }
    }
    freed
}

/// The client's messages, as the blocking worker reads them.
type Inbox = std::cell::RefCell<tokio::sync::mpsc::Receiver<Result<ContextUpload, Status>>>;
type Outbox = tokio::sync::mpsc::Sender<Result<ContextReply, Status>>;

/// Serves one SyncContext call: the stream is read on the async side and handed to a
/// thread that does the file work; its replies go back on `out`.
pub fn serve(
    state: Arc<State>,
    owner: String,
    mut stream: tonic::Streaming<ContextUpload>,
) -> tokio::sync::mpsc::Receiver<Result<ContextReply, Status>> {
    let (out, rx) = tokio::sync::mpsc::channel(16);
    // A few chunks in flight: the network waits for the disk, never the other way round.
    let (tx_in, inbox) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let m = match stream.message().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let end = m.is_err();
            if tx_in.send(m).await.is_err() || end {
                break;
            }
        }
    });
    let inbox = std::cell::RefCell::new(inbox);
    let reply = out.clone();
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let result = receive(&state, &owner, &inbox, &out);
        match result {
            Ok((id, sent, files)) => {
                crate::metrics::METRICS.received(sent);
                tracing::info!(owner = %owner, context = %id, files, bytes = sent, elapsed = ?started.elapsed(), "context synced");
                let _ = reply.blocking_send(Ok(ContextReply {
                    context_id: id,
                    ..Default::default()
                }));
            }
            Err(e) => {
                tracing::info!(owner = %owner, error = %e.message(), "context sync failed");
                let _ = reply.blocking_send(Err(e));
            }
        }
    });
    rx
}

fn next(inbox: &Inbox) -> Result<ContextUpload, Status> {
    inbox
        .borrow_mut()
        .blocking_recv()
        .ok_or_else(|| Status::cancelled("the client went away before the context was sent"))?
}

/// The whole exchange; returns the context ID, the bytes received and the files sent.
fn receive(
    state: &State,
    owner: &str,
    inbox: &Inbox,
    out: &Outbox,
) -> Result<(String, u64, usize), Status> {
    // The entries.
    let mut key = String::new();
    let mut entries: Vec<ContextEntry> = Vec::new();
    loop {
        let m = next(inbox)?;
        if key.is_empty() {
            key = m.key.clone();
            if key.is_empty() || key.len() > 128 {
                return Err(bad(
                    "a context sync starts with its key (1 to 128 characters)",
                ));
            }
        }
        entries.extend(m.entries);
        if entries.len() > ENTRIES_MAX {
            return Err(bad(format!(
                "the context has more than {ENTRIES_MAX} entries"
            )));
        }
        if m.listed {
            break;
        }
    }
    // A context is bounded as one layer is (`max_layer_size`).
    let total: u64 = entries.iter().map(|e| e.size.max(0) as u64).sum();
    let max = state.settings.unpack_limits.max_bytes;
    if total > max {
        return Err(Status::resource_exhausted(format!(
            "the build context holds {total} bytes, over the limit of {max} (max_layer_size)"
        )));
    }
    let hex = hex::encode(sha2::Sha256::digest(format!("{owner}\0{key}").as_bytes()));
    let base = dir(state).join(&hex);
    std::fs::create_dir_all(&base).map_err(|e| io("create", &base, e))?;
    // One sync of a context at a time: a second (another target built from the same
    // directory at once) waits, then finds everything unchanged.
    let _one = wait_exclusive(&base.join(SYNC_LOCK))?;
    // The last complete generation, and what it holds.
    let last = last_generation(&base);
    let prev: BTreeMap<String, Kept> = last
        .as_ref()
        .and_then(|(_, g)| std::fs::read(g.join("manifest.json")).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // Check every entry and what the daemon needs.
    let mut seen: HashMap<&str, u32> = HashMap::new();
    let mut need = Vec::new();
    for e in &entries {
        check_path(&e.path)?;
        if let Some(p) = parent_of(&e.path) {
            match seen.get(p) {
                Some(m) if m & 0o170000 == 0o040000 => {}
                _ => {
                    return Err(bad(format!(
                        "context entry {:?} comes before its directory",
                        e.path
                    )))
                }
            }
        }
        if seen.insert(&e.path, e.mode).is_some() {
            return Err(bad(format!("context entry {:?} is listed twice", e.path)));
        }
        let is_file = e.mode & 0o170000 == 0o100000;
        let same = prev.get(&e.path).is_some_and(|k| {
            k.mode == e.mode && k.size == e.size && k.mtime_ns == e.mtime_ns && k.sha256.is_some()
        });
        if is_file && !same {
            need.push(e.path.clone());
        }
    }
    // Nothing changed since the last sync: its generation is this one.
    if let Some((n, _)) = &last {
        let unchanged = need.is_empty()
            && entries.len() == prev.len()
            && entries.iter().all(|e| {
                prev.get(&e.path).is_some_and(|k| {
                    k.mode == e.mode
                        && k.size == e.size
                        && k.mtime_ns == e.mtime_ns
                        && k.link.as_deref().unwrap_or_default() == e.link_target
                })
            });
        if unchanged {
            send(
                out,
                ContextReply {
                    need_listed: true,
                    ..Default::default()
                },
            )?;
            let _ = std::fs::write(base.join("owner"), owner);
            return Ok((format!("{hex}/{n}"), 0, 0));
        }
    }
    for chunk in need.chunks(4096) {
        send(
            out,
            ContextReply {
                need: chunk.to_vec(),
                ..Default::default()
            },
        )?;
    }
    send(
        out,
        ContextReply {
            need_listed: true,
            ..Default::default()
        },
    )?;
    // A new generation beside the last.
    let phase = isula_store::phase::Phase::start("context sync: make the tree");
    // Past every generation there is, used or not (one of another boot stays until no
    // build reads it).
    let generation = std::fs::read_dir(&base)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|g| g.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .map_or(1, |n| n + 1);
    let gen_dir = base.join(generation.to_string());
    // Held until the generation is complete: no prune takes it while it is being made.
    let making = match begin_generation(&gen_dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = isula_sys::rooted::remove_tree(&gen_dir);
            return Err(e);
        }
    };
    let result = (|| {
        let tree = gen_dir.join("tree");
        std::fs::create_dir_all(&tree).map_err(|e| io("create", &tree, e))?;
        let root = Root::open(&tree).map_err(|e| Status::internal(e.to_string()))?;
        let last_root = last
            .as_ref()
            .and_then(|(_, g)| Root::open(&g.join("tree")).ok());
        let mut kept: BTreeMap<String, Kept> = BTreeMap::new();
        let needed: std::collections::HashSet<&str> = need.iter().map(String::as_str).collect();
        // Directories get their times once everything in them is made.
        let mut dir_times = Vec::new();
        // The directory of the last entry, here and in the last generation (entries of a
        // directory come together): resolved once for all of them.
        let mut dirs = Dirs::default();
        for e in &entries {
            let mtime = (
                e.mtime_ns.div_euclid(1_000_000_000),
                e.mtime_ns.rem_euclid(1_000_000_000) as u32,
            );
            let mut k = Kept {
                mode: e.mode,
                size: e.size,
                mtime_ns: e.mtime_ns,
                sha256: None,
                link: None,
            };
            let name = OsStr::new(e.path.rsplit_once('/').map_or(e.path.as_str(), |(_, n)| n));
            match e.mode & 0o170000 {
                // Made as its content arrives.
                0o100000 if needed.contains(e.path.as_str()) => {}
                0o040000 => {
                    let pdir = dirs.here(&root, &e.path)?;
                    rooted::mkdir(pdir, name, 0o700)
                        .map_err(|err| Status::internal(err.to_string()))?;
                    dir_times.push((e.path.clone(), e.mode & 0o7777, mtime));
                }
                0o120000 => {
                    let pdir = dirs.here(&root, &e.path)?;
                    rooted::symlink(OsStr::new(&e.link_target), pdir, name)
                        .map_err(|err| Status::internal(err.to_string()))?;
                    let _ = rooted::set_times(pdir, name, mtime);
                    k.link = Some(e.link_target.clone());
                }
                0o100000 => {
                    // Unchanged since the last sync: the same file.
                    let (Some(lr), Some(old)) = (&last_root, prev.get(&e.path)) else {
                        return Err(Status::internal(format!(
                            "{}: not in the last context",
                            e.path
                        )));
                    };
                    let (pdir, lpdir) = dirs.both(&root, lr, &e.path)?;
                    rooted::hardlink(lpdir, name, pdir, name)
                        .map_err(|err| Status::internal(format!("{}: {err}", e.path)))?;
                    k.sha256 = old.sha256.clone();
                }
                0o010000 => {
                    let pdir = dirs.here(&root, &e.path)?;
                    rooted::mkfifo(pdir, name, e.mode)
                        .map_err(|err| Status::internal(err.to_string()))?;
                }
                // A socket or device node: an empty file (what a COPY makes of it).
                _ => {
                    let pdir = dirs.here(&root, &e.path)?;
                    let f = rooted::create_file(pdir, name, 0o600)
                        .map_err(|err| Status::internal(err.to_string()))?;
                    rooted::set_owner_mode_times(&f, (0, 0), e.mode & 0o7777, mtime)
                        .map_err(|err| Status::internal(err.to_string()))?;
                }
            }
            kept.insert(e.path.clone(), k);
        }
        drop(dirs);
        drop(phase);
        // The files asked for, as they arrive.
        let mut phase = isula_store::phase::Phase::start("context sync: receive the files");
        let by_path: HashMap<&str, &ContextEntry> =
            entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let got = writers::receive_files(&root, &need, &by_path, || next(inbox))?;
        for (path, sum) in need.iter().zip(got.sums) {
            if let Some(k) = kept.get_mut(path) {
                k.sha256 = Some(sum);
            }
        }
        let (received, files) = (got.bytes, need.len());
        phase.add_bytes(received);
        drop(phase);
        let _phase = isula_store::phase::Phase::start("context sync: record the tree");
        for (path, mode, mtime) in dir_times.into_iter().rev() {
            let (pdir, name) = root
                .parent(Path::new(&path), Resolve::InRoot, false)
                .map_err(|err| Status::internal(format!("{path}: {err}")))?;
            let pdir = std::os::fd::AsFd::as_fd(&pdir);
            rooted::chmod(pdir, &name, mode).map_err(|err| Status::internal(err.to_string()))?;
            let _ = rooted::set_times(pdir, &name, mtime);
        }
        // Trusted in this boot only (see `trusted`): written before the manifest.
        std::fs::write(gen_dir.join(BOOT), boot_id()).map_err(|e| io("write", &gen_dir, e))?;
        let manifest = serde_json::to_vec(&kept).map_err(|e| Status::internal(e.to_string()))?;
        // Unsynced as the files are: it counts in this boot only.
        isula_store::metadata::replace_unsynced(&gen_dir.join("manifest.json"), &mut |w| {
            w.write_all(&manifest)
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok((received, files, kept))
    })();
    let (received, files, kept) = match result {
        Ok(r) => r,
        Err(e) => {
            // Nothing of a sync that failed stays; the last context is as it was.
            let _ = isula_sys::rooted::remove_tree(&gen_dir);
            return Err(e);
        }
    };
    // Complete: its lock now only keeps builds that read it, as any generation's.
    drop(making);
    std::fs::write(base.join("owner"), owner).map_err(|e| io("write", &base, e))?;
    let phase = isula_store::phase::Phase::start("context sync: remove the last tree");
    // This sync holds the context's sync lock: no other generation is being made.
    remove_unused(
        &base,
        Some(&generation.to_string()),
        Some(&state.store),
        false,
    );
    drop(phase);
    let _phase = isula_store::phase::Phase::start("context sync: seed the content hashes");
    // Its own record, keyed by inode, size and mtime (a synced tree's files never change).
    seed_hashes(state, &gen_dir.join("tree"), &kept);
    bound(state, &hex);
    Ok((format!("{hex}/{generation}"), received, files))
}

/// The directory of the last entry resolved, in the new generation and in the last one.
#[derive(Default)]
struct Dirs {
    here: Option<(String, std::os::fd::OwnedFd)>,
    last: Option<(String, std::os::fd::OwnedFd)>,
}

impl Dirs {
    fn resolve<'a>(
        slot: &'a mut Option<(String, std::os::fd::OwnedFd)>,
        root: &Root,
        path: &str,
    ) -> Result<std::os::fd::BorrowedFd<'a>, Status> {
        let parent = parent_of(path).unwrap_or("");
        if slot.as_ref().is_none_or(|(d, _)| d != parent) {
            let fd = if parent.is_empty() {
                rustix::io::fcntl_dupfd_cloexec(root.fd(), 0).map_err(|e| e.to_string())
            } else {
                root.dir(Path::new(parent), Resolve::InRoot, false)
                    .map_err(|e| e.to_string())
            }
            .map_err(|e| Status::internal(format!("{path}: {e}")))?;
            *slot = Some((parent.to_string(), fd));
        }
        slot.as_ref()
            .map(|(_, fd)| std::os::fd::AsFd::as_fd(fd))
            .ok_or_else(|| Status::internal(format!("{path}: no directory")))
    }

    /// The directory `path` is in, in the new generation.
    fn here(&mut self, root: &Root, path: &str) -> Result<std::os::fd::BorrowedFd<'_>, Status> {
        Self::resolve(&mut self.here, root, path)
    }

    /// The same, and in the last generation.
    fn both(
        &mut self,
        root: &Root,
        last: &Root,
        path: &str,
    ) -> Result<(std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>), Status> {
        let here = Self::resolve(&mut self.here, root, path)?;
        let there = Self::resolve(&mut self.last, last, path)?;
        Ok((here, there))
    }
}

/// The file of a generation naming the boot that wrote it.
const BOOT: &str = "boot";

/// This boot of the machine (the kernel's random boot ID).
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Whether generation directory `g` may be used: written whole (its manifest) in this
/// boot. Its files were never fsynced (a context is a cache, asked for again at no cost
/// but the wire): a daemon that stops or crashes loses no written page, a power cut or a
/// kernel crash may, and that is a new boot. A generation of another boot is never used
/// nor built from; the next sync sends every file again.
fn trusted(g: &Path) -> bool {
    let id = boot_id();
    !id.is_empty()
        && g.join("manifest.json").is_file()
        && std::fs::read_to_string(g.join(BOOT)).is_ok_and(|b| b == id)
}

/// The builder's record of the tree's content hashes, from the SHA-256 each file was
/// checked against (or had before): a build of it reads no file to make its keys.
fn seed_hashes(state: &State, tree: &Path, kept: &BTreeMap<String, Kept>) {
    let record = state.store.cache().context_record(tree);
    // A new tree: whatever a record at its path says is of another tree.
    let mut hashes = isula_builder_core::cache_key::ContextHashes::for_synced_tree(record, true);
    for (path, k) in kept {
        let Some(sum) = k.sha256.as_deref() else {
            continue;
        };
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(sum, &mut bytes).is_err() {
            continue;
        }
        if let Ok(st) = rustix::fs::lstat(tree.join(path)) {
            hashes.seed(path, &st, bytes);
        }
    }
    hashes.save();
}

/// The newest complete generation of a context directory (one with its manifest, written
/// in this boot: see [`trusted`]).
fn last_generation(base: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(base)
        .ok()?
        .flatten()
        .filter_map(|g| {
            let n: u64 = g.file_name().to_str()?.parse().ok()?;
            trusted(&g.path()).then(|| (n, g.path()))
        })
        .max_by_key(|(n, _)| *n)
}

/// Keeps at most CONTEXTS_MAX contexts: the least recently synced go (not `keep`).
fn bound(state: &State, keep: &str) {
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir(state))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != keep)
        .filter_map(|e| {
            let t = std::fs::metadata(e.path().join("owner"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((t, e.path()))
        })
        .collect();
    if all.len() < CONTEXTS_MAX {
        return;
    }
    all.sort();
    for (_, p) in all.iter().take(all.len() + 1 - CONTEXTS_MAX) {
        let idle = isula_sys::lock::FileLock::try_exclusive(&p.join(SYNC_LOCK)).ok();
        remove_unused(p, None, Some(&state.store), idle.is_none());
    }
}

/// A context's lock, held by the one sync of it that runs.
const SYNC_LOCK: &str = "sync.lock";

/// Makes generation directory `gen_dir` with its `lock` held exclusively, for the sync to
/// hold until the generation is complete. The lock is taken under another name and then
/// renamed, so whoever finds `lock` in a generation being made finds it held.
fn begin_generation(gen_dir: &Path) -> Result<isula_sys::lock::FileLock, Status> {
    std::fs::create_dir_all(gen_dir).map_err(|e| io("create", gen_dir, e))?;
    let taking = gen_dir.join("lock.new");
    let lock = isula_sys::lock::FileLock::try_exclusive(&taking)
        .map_err(|e| Status::internal(format!("lock the new context generation: {e}")))?;
    std::fs::rename(&taking, gen_dir.join("lock")).map_err(|e| io("rename", &taking, e))?;
    Ok(lock)
}

/// How long a sync waits for another sync of the same context.
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

fn wait_exclusive(path: &Path) -> Result<isula_sys::lock::FileLock, Status> {
    let until = std::time::Instant::now() + SYNC_WAIT;
    loop {
        match isula_sys::lock::FileLock::try_exclusive(path) {
            Ok(l) => return Ok(l),
            Err(e)
                if isula_sys::lock::is_held_elsewhere(&e) && std::time::Instant::now() < until =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "another sync of this build context did not finish: {e}"
                )))
            }
        }
    }
}

fn send(out: &Outbox, r: ContextReply) -> Result<(), Status> {
    out.blocking_send(Ok(r))
        .map_err(|_| Status::cancelled("the client went away"))
}

fn io(op: &str, p: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("{op} {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished generation: its tree and an unheld lock.
    fn finished(base: &Path, n: &str) -> PathBuf {
        let g = base.join(n);
        std::fs::create_dir_all(g.join("tree")).expect("tree");
        std::fs::write(g.join("tree/file"), b"x").expect("file");
        std::fs::write(g.join("lock"), b"").expect("lock");
        g
    }

    #[test]
    fn remove_unused_spares_a_generation_being_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        let old = finished(base, "1");
        let making = base.join("2");
        let lock = begin_generation(&making).expect("begin");
        std::fs::create_dir_all(making.join("tree")).expect("tree");
        std::fs::write(making.join("tree/half"), b"x").expect("file");
        remove_unused(base, None, None, false);
        // The positive control: a finished generation no build reads goes.
        assert!(!old.exists(), "the unused generation stayed");
        assert!(
            making.join("tree/half").is_file(),
            "the generation being made was removed"
        );
        drop(lock);
        remove_unused(base, None, None, false);
        assert!(!making.exists(), "a complete, unused generation stayed");
    }

    #[test]
    fn a_generation_without_its_lock_stays_while_a_sync_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        // Just made by a sync that has not taken its lock yet, or left by one that died.
        let bare = base.join("3");
        std::fs::create_dir_all(bare.join("tree")).expect("tree");
        remove_unused(base, None, None, true);
        assert!(bare.is_dir(), "removed while a sync may be making it");
        assert!(!bare.join("lock").exists(), "a lock was made in it");
        remove_unused(base, None, None, false);
        assert!(!bare.exists(), "a dead sync's generation stayed");
    }

    #[test]
    fn a_read_generation_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = finished(dir.path(), "4");
        let read = isula_sys::lock::FileLock::try_shared(&g.join("lock")).expect("shared");
        remove_unused(dir.path(), None, None, false);
        assert!(
            g.join("tree/file").is_file(),
            "removed while a build reads it"
        );
        drop(read);
    }
}
