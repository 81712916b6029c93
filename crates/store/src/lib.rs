//! The image store, after containerd's model: a content store of blobs, overlay-ready layer
//! snapshots keyed by chain ID, and image metadata written atomically. Synchronous; the
//! daemon calls it from blocking tasks. It owns the data root's on-disk layout and must not
//! know about archives, registries or builds (the transport and builder crates do).
//!
//! ```text
//! <dataroot>/
//! ├── store.lock               flock held by the one daemon using this data root
//! ├── metadata.json            images, layers, durable layer directories (`dirs`), schema
//! │                           version; replaced atomically
//! ├── blobs/sha256/<hex>       committed blobs (layers, configs, manifests), read-only
//! ├── ingest/<random>          blobs being written (swept at start-up)
//! ├── layers/<chain-hex>/diff  unpacked layer in overlay form (whiteouts = 0:0 char devs);
//! │                           a loaded or pulled layer is "packed" (its blob alone, named
//! │                           in metadata.json) until a build needs it or the store idles;
//! │                           a built layer's blob is its tar, never written: made from
//! │                           these files when read (see `tree`)
//! ├── cache/                   the build cache (see `cache`)
//! └── tmp/<random>/            layers being unpacked, archives being staged (swept); tmp/
//!                              is marked a top directory (`chattr +T`) so that each layer
//!                              gets block groups of its own (see `isula_sys::mark_top_dir`)
//! ```
//!
//! Crash safety: blobs and layer directories are written and made durable first and only
//! become part of an image when the metadata naming them is renamed into place (the rule
//! and the layer directories' `syncfs` live in `durable`: a power cut loses nothing a
//! record names). At start-up, `ingest/` and `tmp/` are emptied, layer directories without
//! a record are removed, and a garbage collection removes blobs and layers no image refers
//! to. While an operation is between those steps, a [`Lease`] keeps its blobs and layers
//! safe from a concurrent collection.

pub mod apply;
pub mod cache;
pub mod compression;
pub mod content;
pub mod diff;
mod durable;
pub mod error;
pub mod failpoint;
pub mod metadata;
pub mod pgzip;
pub mod phase;
pub mod squash;
mod tree;
pub mod zstd_chunked;

pub use content::{BlobWriter, ContentStore, HashingReader, TeeReader};
pub use durable::CheckReport;
pub use error::{ErrorKind, Result, StoreError};
pub use metadata::{AttestationRecord, CompressedBlob, ImageRecord, LayerRecord};
pub use pgzip::Side;

use isula_types::compression::{Codec, LayerCompression};
use isula_types::{ChainId, Digest, ImageId, Reference};
use metadata::Metadata;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What start-up found and cleaned.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub swept_ingest: usize,
    pub swept_tmp: usize,
    pub gc: GcReport,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: usize,
    /// The layers deleted (a directory whose name is no chain ID counts as `None`).
    pub layers: Vec<Option<ChainId>>,
}

/// One line of what a removal did. Names are as the caller gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveEvent {
    /// The name went; the image stays under its other names.
    Untagged(String),
    /// A layer no image or cache record uses any more was deleted.
    DeletedLayer(ChainId),
    /// The image went, with all its names.
    Deleted { name: String, id: ImageId },
}

pub struct Store {
    root: PathBuf,
    content: ContentStore,
    meta: Mutex<Metadata>,
    leases: Arc<Mutex<LeaseTable>>,
    activity: Arc<Activity>,
    compressor: Compressor,
    cache: cache::Cache,
    /// Held while a layer directory is moved into place and recorded (see `durable`).
    placing: Mutex<()>,
    /// Built layers this process hashed, and their files' stamps then (see `tree`).
    vouched_trees: tree::VouchedTrees,
    _lock: isula_sys::FileLock,
}

/// The store's background work (see [`Store::run_compressor`]), and the compressions a
/// push or export is making now.
#[derive(Default)]
struct Compressor {
    queue: Mutex<std::collections::VecDeque<Job>>,
    /// Held while a packed layer is unpacked (one at a time, foreground or background).
    unpacking: Mutex<()>,
    /// Held while a background job runs: `remove` waits for it (the job stops at its next
    /// read once an operation runs), so that what it held goes with the image.
    working: Mutex<()>,
    wake: std::sync::Condvar,
    /// Blobs being compressed right now, and the signal when one finishes.
    busy: Mutex<HashSet<(Digest, Codec)>>,
    done: std::sync::Condvar,
    stopping: std::sync::atomic::AtomicBool,
    /// Times it had a layer to do and found an operation running, so waited.
    deferred: std::sync::atomic::AtomicU64,
}

/// Background work, done only while the store is quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Job {
    /// Make the directory of this packed layer.
    Unpack(ChainId),
    /// Record the tar digest of this layer directory (committed without it; see `durable`).
    Hash(ChainId),
}

/// How long the store must have had no operation before the background work starts a
/// job (an unpack, a directory's digest): long enough that a script's next
/// command (a client starting and connecting: 10-30 ms here) comes first, short enough
/// that the daemon is soon idle (2 s, as before, left a load's unpack waiting longer than
/// it took; 300 ms was a fifth of a 1.5 s load-and-unpack). A job started meanwhile stops
/// at its next read when an operation starts, and `remove` waits for that.
const QUIET_BEFORE_COMPRESSING: std::time::Duration = std::time::Duration::from_millis(100);

/// How much of a layer is read between two syncs of its unpack.
const SYNC_EVERY: u64 = 64 << 20;

/// A reader that asks for a sync (a message on `tick`, dropped when one is pending) each
/// time `every` more bytes were read.
struct Ticking<R> {
    inner: R,
    tick: std::sync::mpsc::SyncSender<()>,
    every: u64,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for Ticking<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) if left > 0 => self.left = left,
            _ => {
                self.left = self.every;
                let _ = self.tick.try_send(());
            }
        }
        Ok(n)
    }
}

/// Reads until the compressor is told to stop, or (background work) until an operation
/// starts, which the compressor then leaves the machine to.
struct StopReader<'a, R> {
    inner: R,
    stop: &'a std::sync::atomic::AtomicBool,
    yield_to: Option<(&'a Activity, &'a std::cell::Cell<bool>)>,
}

impl<R: std::io::Read> std::io::Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("the store is shutting down"));
        }
        if let Some((activity, yielded)) = self.yield_to {
            if activity.busy() {
                yielded.set(true);
                return Err(std::io::Error::other("an operation started"));
            }
        }
        self.inner.read(buf)
    }
}

#[derive(Default)]
struct LeaseTable {
    next: u64,
    held: HashMap<u64, HashSet<String>>,
}

/// Whether operations are running on the store (each holds a lease while it runs), and
/// since when none has.
struct Activity {
    active: std::sync::atomic::AtomicUsize,
    quiet_since: Mutex<std::time::Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            active: Default::default(),
            quiet_since: Mutex::new(std::time::Instant::now()),
        }
    }

    fn busy(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// How long no operation has run (none: one runs now).
    fn quiet_for(&self) -> Option<std::time::Duration> {
        let since = self.quiet_since.lock().unwrap_or_else(|p| p.into_inner());
        (!self.busy()).then(|| since.elapsed())
    }
}

/// Protects blobs and layers that an operation has written but no image names yet.
pub struct Lease {
    id: u64,
    table: Arc<Mutex<LeaseTable>>,
    /// The operations counter this lease counts in (none: the background compressor's).
    activity: Option<Arc<Activity>>,
}

impl Lease {
    /// Commits a blob under this lease. The lease is taken before the blob appears, so no
    /// concurrent collection can remove it in between.
    pub fn commit_blob(
        &self,
        w: BlobWriter,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<(Digest, u64)> {
        if let Some(d) = w.digest().or_else(|| expected.map(|(d, _)| d.clone())) {
            self.blob(&d);
        }
        w.commit(expected)
    }

    /// Stores a small blob under this lease (see `commit_blob`).
    pub fn put_blob(&self, content: &ContentStore, data: &[u8]) -> Result<Digest> {
        self.blob(&Digest::of_bytes(data));
        content.put(data)
    }

    pub fn blob(&self, d: &Digest) {
        self.add(format!("blob:{}", d.hex()));
    }
    pub fn layer(&self, c: &ChainId) {
        self.add(format!("layer:{}", c.hex()));
    }
    /// A build-cache snapshot in use (a lower layer of a running step): never pruned.
    pub fn snapshot(&self, id: &str) {
        self.add(format!("snap:{id}"));
    }
    fn add(&self, key: String) {
        if let Ok(mut t) = self.table.lock() {
            t.held.entry(self.id).or_default().insert(key);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            t.held.remove(&self.id);
        }
        if let Some(a) = &self.activity {
            let mut since = a.quiet_since.lock().unwrap_or_else(|p| p.into_inner());
            if a.active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                *since = std::time::Instant::now();
            }
        }
    }
}

/// A layer directory being unpacked: removed on drop unless committed.
pub struct StagedLayer {
    dir: PathBuf,
    committed: bool,
    /// Opened when the directory was made: a sync through it reports any writeback error
    /// since then.
    fs: isula_sys::FsSync,
}

impl StagedLayer {
    /// Writes back the file system the layer is on (its files and directories included),
    /// failing on any writeback error since the layer was staged.
    pub(crate) fn sync(&self) -> Result<()> {
        if crate::failpoint::fails("layer.sync-eio") {
            // As FsSync says a failed syncfs.
            return Err(isula_sys::SysError::new(
                "syncfs",
                self.dir.join("diff"),
                rustix::io::Errno::IO,
            )
            .into());
        }
        Ok(self.fs.sync()?)
    }

    /// Where the layer's files go.
    pub fn diff_dir(&self) -> PathBuf {
        self.dir.join("diff")
    }

    /// A file kept beside the diff (a snapshot's notes, such as what a COPY put where).
    pub fn note_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes the overlay work directory, if one was made.
    pub(crate) fn remove_work(&self) -> Result<()> {
        let work = self.dir.join("work");
        if work.exists() {
            isula_sys::rooted::remove_tree(&work)?;
        }
        Ok(())
    }

    /// An overlay work directory beside the diff (same file system), for using the staged
    /// layer as an overlay upper. Removed again at commit.
    pub fn work_dir(&self) -> Result<PathBuf> {
        let w = self.dir.join("work");
        if !w.is_dir() {
            fs::create_dir(&w).map_err(|e| StoreError::io("create", &w, e))?;
        }
        Ok(w)
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = isula_sys::rooted::remove_tree(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing staged layer");
            }
        }
    }
}

/// An image to record, with the layers it needs (already committed with `commit_layer`).
pub struct NewImage {
    pub id: ImageId,
    pub manifest: Digest,
    pub manifest_media_type: String,
    pub blobs: Vec<Digest>,
    pub layers: Vec<LayerRecord>,
    pub created: Option<String>,
    pub names: Vec<Reference>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, takes its lock, sweeps what a crash
    /// may have left, and collects garbage.
    pub fn open(root: &Path) -> Result<(Store, OpenReport)> {
        fs::create_dir_all(root).map_err(|e| StoreError::io("create", root, e))?;
        let lock = isula_sys::FileLock::try_exclusive(&root.join("store.lock"))?;
        for d in ["layers", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| StoreError::io("create", &p, e))?;
        }
        let content = ContentStore::new(root)?;
        let meta = Metadata::load(&root.join("metadata.json"))?;
        let cache = cache::Cache::open(root)?;
        let store = Store {
            root: root.to_path_buf(),
            content,
            meta: Mutex::new(meta),
            leases: Arc::default(),
            activity: Arc::new(Activity::new()),
            compressor: Compressor::default(),
            cache,
            placing: Mutex::new(()),
            vouched_trees: Default::default(),
            _lock: lock,
        };
        let mut report = OpenReport {
            swept_ingest: store.content.sweep_ingest()?,
            swept_tmp: content::sweep_dir(&root.join("tmp"))?,
            ..Default::default()
        };
        // Each layer staged in tmp/ is a tree of its own for the file system's allocator.
        let tmp = root.join("tmp");
        match isula_sys::mark_top_dir(&tmp) {
            Ok(marked) => tracing::debug!(marked, dir = %tmp.display(), "top directory mark"),
            Err(e) => tracing::warn!(error = %e, "marking tmp/ as a top directory"),
        }
        let older = store.record_older_dirs()?;
        if older > 0 {
            tracing::info!(
                layers = older,
                "layer directories of an older store made durable and recorded"
            );
        }
        let (dropped, snapshots) = store.cache.sweep(&store)?;
        if dropped + snapshots > 0 {
            tracing::info!(
                records = dropped,
                snapshots,
                "build cache: dropped what a crash left incomplete"
            );
        }
        report.gc = store.gc()?;
        Ok((store, report))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    pub fn cache(&self) -> &cache::Cache {
        &self.cache
    }

    /// Whether every layer and blob of a cached stage result is here.
    pub fn cache_stage_whole(&self, stage: &cache::StageRecord) -> bool {
        cache::missing(self, stage).is_empty()
    }

    fn leased(&self, key: &str) -> bool {
        let t = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        t.held.values().any(|h| h.contains(key))
    }

    /// Moves a finished build step's upper directory into the cache as a snapshot (its
    /// work directory removed). Returns the snapshot ID and its size on disk; the lease
    /// keeps it from a concurrent prune.
    pub fn adopt_snapshot(&self, mut staged: StagedLayer, lease: &Lease) -> Result<(String, u64)> {
        staged.remove_work()?;
        let size = cache::disk_usage(&staged.diff_dir());
        let id = self.cache.adopt_snapshot(&staged.dir)?;
        lease.snapshot(&id);
        staged.committed = true;
        Ok((id, size))
    }

    /// A staged layer holding the squash of `stack` (snapshot diff directories, top first)
    /// over `base` (a read-only view of what lies below, None for nothing).
    pub fn squash(&self, stack: &[&Path], base: Option<&Path>) -> Result<StagedLayer> {
        let staged = self.stage_layer()?;
        squash::squash(stack, base, &staged.diff_dir())?;
        Ok(staged)
    }

    /// [`Store::squash`] of a stack of one snapshot that nothing else uses (a step's own
    /// staged layer): trimmed where it is, and returned as the layer to commit.
    pub fn squash_one(&self, staged: StagedLayer, base: Option<&Path>) -> Result<StagedLayer> {
        squash::trim_in_place(&staged.diff_dir(), base)?;
        Ok(staged)
    }

    /// Trims the build cache to `cap` bytes when it holds more.
    pub fn prune_cache_over(&self, cap: u64) -> Result<cache::Pruned> {
        if self.cache.usage().bytes <= cap {
            return Ok(cache::Pruned::default());
        }
        self.prune_cache(true, cap, None)
    }

    /// Bytes free on the data root's file system (for an unprivileged user, as `df`
    /// shows), and its size.
    pub fn free_space(&self) -> Result<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| StoreError::io("statvfs", &self.root, e.into()))?;
        Ok((
            st.f_bavail.saturating_mul(st.f_frsize),
            st.f_blocks.saturating_mul(st.f_frsize),
        ))
    }

    /// Takes least recently used build-cache records (any, as the size cap does) until
    /// `keep_free` bytes of the data root's file system are free, or nothing more can go
    /// (what the cache does not hold is not its to free). Returns what went.
    pub fn prune_cache_for_free(&self, keep_free: u64) -> Result<cache::Pruned> {
        let mut out = cache::Pruned::default();
        // A record may hold less than its size alone (files linked from another), so the
        // space is looked at again after each pass.
        for _ in 0..8 {
            let (free, _) = self.free_space()?;
            let deficit = keep_free.saturating_sub(free);
            if deficit == 0 {
                break;
            }
            let held = self.cache.usage().bytes;
            if held == 0 {
                break;
            }
            let keep = held.saturating_sub(deficit);
            // keep 0 means "everything" to prune; one byte left is as good.
            let p = self.prune_cache(true, keep.max(1), None)?;
            if p.records == 0 {
                break;
            }
            out.records += p.records;
            out.bytes += p.bytes;
            out.removed.extend(p.removed);
        }
        if out.records > 0 {
            tracing::info!(
                records = out.records,
                bytes = out.bytes,
                keep_free,
                "build cache trimmed to keep the data root's file system free"
            );
        }
        Ok(out)
    }

    /// Removes least recently used build-cache records until at most `keep` bytes remain
    /// (0: every candidate), then collects the layers only they kept. Candidates are every
    /// record (`all`), or only the dangling ones: those no image in the store was built
    /// from (see [`Store::cache_kept_by_images`]); with `unused_since`, only those unused
    /// since that time (Unix seconds). Records a running build uses stay.
    pub fn prune_cache(
        &self,
        all: bool,
        keep: u64,
        unused_since: Option<i64>,
    ) -> Result<cache::Pruned> {
        let kept = if all {
            HashSet::new()
        } else {
            self.cache_kept_by_images()
        };
        let pruned = self.cache.prune(&cache::PruneFilter {
            keep,
            unused_since,
            in_use: &|id| self.leased(&format!("snap:{id}")),
            spare: &|k| kept.contains(k),
        })?;
        if pruned.records > 0 {
            self.gc()?;
        }
        if all && keep == 0 && unused_since.is_none() {
            // Everything goes: the context records too (the next build reads its context
            // again, as the first one did).
            self.cache.clear_context_records()?;
        }
        Ok(pruned)
    }

    /// The records images in the store were built from: a stage record whose config is an
    /// image's config, and every step below it.
    pub fn cache_kept_by_images(&self) -> HashSet<Digest> {
        let ids: HashSet<Digest> = self
            .meta()
            .images
            .keys()
            .map(|id| id.digest().clone())
            .collect();
        let roots = self
            .cache
            .records()
            .into_iter()
            .filter(|(_, r)| r.stage.as_ref().is_some_and(|s| ids.contains(&s.config)))
            .map(|(k, _)| k);
        self.cache.ancestors(roots)
    }

    /// Whether a running build uses the record (its snapshot is leased).
    pub fn cache_record_in_use(&self, record: &cache::Record) -> bool {
        record
            .snapshot
            .as_ref()
            .is_some_and(|id| self.leased(&format!("snap:{id}")))
    }

    fn meta(&self) -> MutexGuard<'_, Metadata> {
        // A panic while holding the lock cannot leave the on-disk state torn (it is only
        // written by rename), so recover the in-memory copy.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, meta: &Metadata) -> Result<()> {
        meta.save(&self.root.join("metadata.json"))
    }

    pub fn lease(&self) -> Lease {
        self.activity
            .active
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut lease = self.background_lease();
        lease.activity = Some(self.activity.clone());
        lease
    }

    /// A lease that does not count as an operation (the background compressor's).
    fn background_lease(&self) -> Lease {
        let mut t = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        t.next += 1;
        Lease {
            id: t.next,
            table: self.leases.clone(),
            activity: None,
        }
    }

    /// A private scratch directory under `tmp/` (swept at start-up).
    pub fn temp_dir(&self) -> Result<PathBuf> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()));
        fs::create_dir(&p).map_err(|e| StoreError::io("create", &p, e))?;
        Ok(p)
    }

    /// A new, empty layer directory to unpack into.
    pub fn stage_layer(&self) -> Result<StagedLayer> {
        let dir = self.temp_dir()?;
        let diff = dir.join("diff");
        let made = fs::create_dir(&diff).map_err(|e| StoreError::io("create", &diff, e));
        let fs = made.and_then(|()| Ok(isula_sys::FsSync::open(&diff)?));
        match fs {
            Ok(fs) => Ok(StagedLayer {
                dir,
                committed: false,
                fs,
            }),
            Err(e) => {
                let _ = isula_sys::rooted::remove_tree(&dir);
                Err(e)
            }
        }
    }

    pub fn layer_dir(&self, chain: &ChainId) -> PathBuf {
        self.root.join("layers").join(chain.hex())
    }

    pub fn has_layer(&self, chain: &ChainId) -> bool {
        let meta = self.meta();
        meta.layers.contains_key(chain)
            || meta.packed.contains_key(chain)
            || meta.dirs.contains_key(chain)
    }

    /// Whether layer `chain` can be used: its directory is there, or it is packed and its
    /// blob is.
    pub fn layer_present(&self, chain: &ChainId) -> bool {
        let meta = self.meta();
        meta.dirs.contains_key(chain)
            || meta
                .packed
                .get(chain)
                .is_some_and(|b| self.content.contains(b))
    }

    /// Records layer `chain` as kept packed, as its (stored, verified) blob `blob`, whose
    /// tar was checked as the unpack would check it. The lease keeps it until an image
    /// names it; [`Store::layer_diff`] makes its directory when it is needed.
    pub fn commit_packed_layer(&self, chain: &ChainId, blob: &Digest, lease: &Lease) -> Result<()> {
        lease.layer(chain);
        lease.blob(blob);
        let mut meta = self.meta();
        if meta.dirs.contains_key(chain) || meta.packed.get(chain) == Some(blob) {
            return Ok(());
        }
        let mut next = meta.clone();
        next.packed.insert(chain.clone(), blob.clone());
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// The directory (`diff`) of layer `chain`, made now from its blob if it is packed.
    pub fn layer_diff(&self, chain: &ChainId, lease: &Lease) -> Result<PathBuf> {
        lease.layer(chain);
        let diff = self.layer_dir(chain).join("diff");
        if self.layer_unpacked(chain) {
            return Ok(diff);
        }
        let _one = self
            .compressor
            .unpacking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.layer_unpacked(chain) {
            return Ok(diff);
        }
        let blob = self
            .meta()
            .packed
            .get(chain)
            .cloned()
            .ok_or_else(|| StoreError::LayerNotFound(chain.clone()))?;
        self.unpack_packed(chain, &blob, lease, None)?;
        Ok(diff)
    }

    /// Unpacks packed layer `chain` from `blob` and commits its directory; with `yielded`,
    /// as background work that stops when an operation starts.
    fn unpack_packed(
        &self,
        chain: &ChainId,
        blob: &Digest,
        lease: &Lease,
        yielded: Option<&std::cell::Cell<bool>>,
    ) -> Result<()> {
        let _phase = phase::Phase::start("unpack a packed layer");
        lease.blob(blob);
        let never = std::sync::atomic::AtomicBool::new(false);
        let file = self.content.open(blob)?;
        let staged = self.stage_layer()?;
        // The blob is read and decompressed on a thread of its own, a few MiB ahead of the
        // files being written (a gzip layer of 400 MB: 0.8 s of inflate off this thread).
        // Writeback starts while the files are written: every 64 MiB read, a thread of its
        // own syncs the file system, so the commit's sync waits for the last few only.
        let (tick, ticks) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::scope(|scope| {
            let staged = &staged;
            let syncer = scope.spawn(move || -> Result<()> {
                while ticks.recv().is_ok() {
                    staged.sync()?;
                }
                Ok(())
            });
            let ahead = compression::read_ahead(scope, move || {
                compression::decompress(file).map(|(_, r)| Ticking {
                    inner: r,
                    tick,
                    every: SYNC_EVERY,
                    left: SYNC_EVERY,
                })
            });
            let plain = StopReader {
                inner: ahead,
                stop: if yielded.is_some() {
                    &self.compressor.stopping
                } else {
                    &never
                },
                yield_to: yielded.map(|y| (&*self.activity, y)),
            };
            let applied = apply::apply_layer(plain, &staged.diff_dir());
            let synced = syncer.join().unwrap_or_else(|_| {
                Err(StoreError::from(isula_sys::SysError::io(
                    "syncfs",
                    staged.diff_dir(),
                    std::io::Error::other("the syncing thread panicked"),
                )))
            });
            applied.and_then(|r| synced.map(|()| r))
        })?;
        // The packed mark goes in the same write that records the durable directory. Its
        // tar digest is not taken: the blob it was made from stays, and is what the check
        // compares it with.
        self.commit_layer(staged, chain, lease)
    }

    /// Asks for packed layer `chain` to be unpacked in the background.
    pub fn queue_unpack(&self, chain: &ChainId) {
        self.queue_job(Job::Unpack(chain.clone()));
    }

    fn queue_job(&self, job: Job) {
        let c = &self.compressor;
        c.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        c.wake.notify_one();
    }

    /// [`Store::layer_diff`] as background work (the foreground may be doing it already).
    fn unpack_in_background(&self, chain: &ChainId) {
        let lease = self.background_lease();
        lease.layer(chain);
        let Some(blob) = self.meta().packed.get(chain).cloned() else {
            return;
        };
        let Ok(_one) = self.compressor.unpacking.try_lock() else {
            // An operation unpacks a layer right now: this one waits for the next spell.
            self.compressor
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(Job::Unpack(chain.clone()));
            return;
        };
        if self.layer_unpacked(chain) {
            return;
        }
        let yielded = std::cell::Cell::new(false);
        match self.unpack_packed(chain, &blob, &lease, Some(&yielded)) {
            Ok(()) => tracing::debug!(layer = %chain, "packed layer unpacked"),
            Err(_) if yielded.get() => {
                tracing::debug!(layer = %chain, "unpacking left for a quiet spell");
                self.compressor
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_front(Job::Unpack(chain.clone()));
            }
            Err(e) => tracing::warn!(layer = %chain, error = %e, "unpacking a packed layer"),
        }
        drop(lease);
        // Its image may have gone meanwhile: then the new directory is garbage.
        if !self
            .meta()
            .images
            .values()
            .any(|i| i.layers.contains(chain))
        {
            if let Err(e) = self.gc() {
                tracing::warn!(error = %e, "collecting after an unpack");
            }
        }
    }

    /// Records an image (atomically). Names move from any image that had them. Returns the
    /// names that moved away from another image.
    pub fn add_image(&self, new: NewImage) -> Result<Vec<String>> {
        for l in &new.layers {
            if !self.layer_present(&l.chain_id) {
                return Err(StoreError::LayerNotFound(l.chain_id.clone()));
            }
        }
        for b in &new.blobs {
            if !self.blob_present(b) {
                return Err(StoreError::BlobNotFound(b.clone()));
            }
        }
        for b in [&new.manifest, new.id.digest()] {
            if !self.content.contains(b) {
                return Err(StoreError::BlobNotFound(b.clone()));
            }
        }
        let mut meta = self.meta();
        let mut next = meta.clone();
        for l in &new.layers {
            next.layers
                .entry(l.chain_id.clone())
                .or_insert_with(|| l.clone());
        }
        let size = new.layers.iter().map(|l| l.size).sum();
        let names: Vec<String> = new.names.iter().map(|r| r.to_string()).collect();
        let moved = take_names(&mut next, &names, &new.id);
        let rec = next
            .images
            .entry(new.id.clone())
            .or_insert_with(|| ImageRecord {
                id: new.id.clone(),
                names: Vec::new(),
                manifest: new.manifest.clone(),
                manifest_media_type: new.manifest_media_type.clone(),
                blobs: new.blobs.clone(),
                layers: new.layers.iter().map(|l| l.chain_id.clone()).collect(),
                created: new.created.clone(),
                size,
            });
        for n in names {
            if !rec.names.contains(&n) {
                rec.names.push(n);
            }
        }
        self.save(&next)?;
        *meta = next;
        Ok(moved)
    }

    /// The gzip blob recorded for an uncompressed layer blob, if it is still present.
    pub fn compressed(&self, blob: &Digest) -> Option<CompressedBlob> {
        self.compressed_form(blob, Codec::Gzip)
    }

    /// The `codec` form recorded for the stored layer blob `blob`, if it is still present.
    pub fn compressed_form(&self, blob: &Digest, codec: Codec) -> Option<CompressedBlob> {
        let c = self.meta().forms(codec).get(blob).cloned()?;
        self.content.contains(&c.digest).then_some(c)
    }

    /// Records `gz` as the gzip form of `blob` (both should be leased or named).
    pub fn record_compressed(&self, blob: &Digest, gz: CompressedBlob) -> Result<()> {
        self.record_compressed_form(blob, Codec::Gzip, gz)
    }

    /// Records `form` as the `codec` form of `blob` (both should be leased or named).
    pub fn record_compressed_form(
        &self,
        blob: &Digest,
        codec: Codec,
        form: CompressedBlob,
    ) -> Result<()> {
        let mut meta = self.meta();
        let mut next = meta.clone();
        next.forms_mut(codec).insert(blob.clone(), form);
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// The gzip form of the layer blob `blob` (uncompressed, or compressed another way):
    /// the recorded one, the one being made in the background (waited for), or made now
    /// and recorded.
    pub fn gzip_blob(&self, blob: &Digest, lease: &Lease) -> Result<(Digest, u64)> {
        self.compressed_blob_streaming(blob, LayerCompression::default(), lease, None)
            .map(|(d, size, _)| (d, size))
    }

    /// [`Store::gzip_blob`] for any codec and level: the recorded form of that codec
    /// (whatever level made it), or one made now (on every core) and recorded.
    pub fn compressed_blob(
        &self,
        blob: &Digest,
        how: LayerCompression,
        lease: &Lease,
    ) -> Result<(Digest, u64)> {
        self.compressed_blob_streaming(blob, how, lease, None)
            .map(|(d, size, _)| (d, size))
    }

    /// [`Store::gzip_blob`], also sending each piece of the gzip to `side` as it is made
    /// (a push uploads it meanwhile). The last value says whether the gzip was made here
    /// and so sent whole to `side`; when it already existed nothing is sent. A `side`
    /// that goes away only stops the sending: the stored gzip is finished all the same.
    pub fn gzip_blob_streaming(
        &self,
        blob: &Digest,
        lease: &Lease,
        side: Option<Side>,
    ) -> Result<(Digest, u64, bool)> {
        self.compressed_blob_streaming(blob, LayerCompression::default(), lease, side)
    }

    /// [`Store::gzip_blob_streaming`] for any codec: the form `how.codec` of `blob`, made
    /// at `how.level` (else the codec's level for a push) when none is recorded.
    pub fn compressed_blob_streaming(
        &self,
        blob: &Digest,
        how: LayerCompression,
        lease: &Lease,
        side: Option<Side>,
    ) -> Result<(Digest, u64, bool)> {
        let c = &self.compressor;
        let key = (blob.clone(), how.codec);
        loop {
            if let Some(done) = self.compressed_form(blob, how.codec) {
                lease.blob(&done.digest);
                return Ok((done.digest, done.size, false));
            }
            let mut busy = c.busy.lock().unwrap_or_else(|p| p.into_inner());
            if busy.contains(&key) {
                drop(c.done.wait(busy).unwrap_or_else(|p| p.into_inner()));
                continue;
            }
            busy.insert(key.clone());
            break;
        }
        let phase = phase::Phase::start(match how.codec {
            Codec::Gzip => "gzip (for a push)",
            Codec::Zstd => "zstd (for a push)",
            Codec::ZstdChunked => "zstd:chunked (for a push)",
        });
        let result = self.compress_now(blob, how, lease, side);
        drop(phase);
        c.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        c.done.notify_all();
        result.map(|(d, size)| (d, size, true))
    }

    /// Compresses `blob` as `how` says, for someone who waits (a push or a cache export).
    fn compress_now(
        &self,
        blob: &Digest,
        how: LayerCompression,
        lease: &Lease,
        side: Option<Side>,
    ) -> Result<(Digest, u64)> {
        let path = self.content.path(blob);
        let io = |e| StoreError::io("compress", &path, e);
        let src = self.open_blob(blob, Some(lease))?;
        // What the blob is: a built layer's tar, or what a stored blob's first bytes say
        // (kept in the buffer for the reader).
        let mut src = std::io::BufReader::with_capacity(256 << 10, src);
        let kind = if self.blob_in_tree(blob) {
            compression::Compression::None
        } else {
            compression::Compression::sniff(std::io::BufRead::fill_buf(&mut src).map_err(io)?)
        };
        let stop = &self.compressor.stopping;
        let w = std::thread::scope(|scope| -> Result<_> {
            // A tar (a stored one, or one a built layer's files make on a thread of their
            // own) is read straight into the encoder's chunks. A blob stored compressed
            // some other way (a pulled zstd or gzip layer) is compressed again from its
            // tar, for registries and formats that take only that: decompressed on a
            // thread of its own, a few MiB ahead of the encoder. The encoder's own thread
            // hashes and writes what its workers compress.
            let mut plain: Box<dyn std::io::Read> = if kind == compression::Compression::None {
                Box::new(StopReader {
                    inner: src,
                    stop,
                    yield_to: None,
                })
            } else {
                Box::new(compression::read_ahead(scope, move || {
                    let src = StopReader {
                        inner: src,
                        stop,
                        yield_to: None,
                    };
                    compression::decompress(src).map(|(_, r)| r)
                }))
            };
            let w = pgzip::Tee {
                inner: self.content.writer()?,
                side,
            };
            Ok(match how.codec {
                Codec::Gzip => {
                    let level = compression::gzip_level(how.level);
                    let mut enc = pgzip::ParallelGzip::new(w, level).map_err(io)?;
                    enc.read_from(&mut plain).map_err(io)?;
                    (enc.finish().map_err(io)?, Default::default())
                }
                // zstd's writer hands on what it made 32 KiB at a time, and zstd:chunked
                // a frame per file: gathered into 1 MiB pieces, the blob is written, hashed
                // and copied to a push in large pieces (each piece a push is given is a
                // wake-up of its connection), on a thread of their own, as gzip's are: the
                // thread that feeds the compressor does not stop to hash.
                Codec::Zstd => {
                    let level = how.level.unwrap_or(compression::ZSTD_LEVEL);
                    let w = compression::ThreadWriter::new(w).map_err(io)?;
                    let mut enc = compression::parallel_zstd(w, level).map_err(io)?;
                    compression::pump(&mut plain, &mut enc).map_err(io)?;
                    let w = enc.finish().map_err(io)?;
                    (w.finish().map_err(io)?, Default::default())
                }
                // A frame per file, and the table of contents that finds them.
                Codec::ZstdChunked => {
                    let level = how.level.unwrap_or(compression::ZSTD_LEVEL);
                    let mut w = compression::ThreadWriter::new(w).map_err(io)?;
                    let annotations = zstd_chunked::write(&mut plain, &mut w, level).map_err(io)?;
                    (w.finish().map_err(io)?, annotations)
                }
            })
        })?;
        let (pgzip::Tee { inner, side }, annotations) = w;
        // The copies end here: a push's upload of them ends while the blob is synced.
        drop(side);
        let (digest, size) = lease.commit_blob(inner, None)?;
        self.record_compressed_form(
            blob,
            how.codec,
            CompressedBlob {
                digest: digest.clone(),
                size,
                annotations,
            },
        )?;
        Ok((digest, size))
    }

    /// Runs the store's background work until `stop_compressor` (the daemon gives it a
    /// thread, at a low priority): the directories of packed layers, and the tar digests of
    /// directories committed without one. It works only while no operation runs: it starts
    /// a job once the store has been quiet for a moment, and an operation that starts
    /// meanwhile stops it (the job waits for the next quiet spell; a build that needs the
    /// layer unpacks it then). No layer is compressed in idle time: a push compresses what
    /// it sends, on every core while it uploads, and keeps it (see README, "Durability").
    pub fn run_compressor(&self) {
        use std::sync::atomic::Ordering;
        let c = &self.compressor;
        // What an earlier run left to do (its queue was in memory).
        let packed: Vec<ChainId> = self.meta().packed.keys().cloned().collect();
        for chain in packed {
            self.queue_unpack(&chain);
        }
        for chain in self.dirs_to_hash() {
            self.queue_job(Job::Hash(chain));
        }
        loop {
            let next = {
                let mut q = c.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if c.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let wait = match (q.is_empty(), self.activity.quiet_for()) {
                        (true, _) => None,
                        (false, Some(quiet)) if quiet >= QUIET_BEFORE_COMPRESSING => {
                            if let Some(d) = q.pop_front() {
                                break d;
                            }
                            None
                        }
                        (false, Some(quiet)) => Some(QUIET_BEFORE_COMPRESSING - quiet),
                        (false, None) => {
                            c.deferred.fetch_add(1, Ordering::SeqCst);
                            Some(std::time::Duration::from_millis(200))
                        }
                    };
                    q = match wait {
                        None => c.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            c.wake
                                .wait_timeout(q, d)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                    };
                }
            };
            let _working = c.working.lock().unwrap_or_else(|p| p.into_inner());
            // An operation may have started while this waited for the lock (an `rm` holds
            // it while it collects): the job waits for the next quiet spell.
            if self.activity.busy() {
                c.queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_front(next);
                continue;
            }
            match next {
                Job::Unpack(chain) => self.unpack_in_background(&chain),
                Job::Hash(chain) => self.hash_in_background(&chain),
            }
        }
    }

    /// How many times the background work had a job to do and left it because an operation
    /// was running.
    pub fn compression_deferred(&self) -> u64 {
        self.compressor
            .deferred
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the background work (an unfinished unpack is discarded).
    pub fn stop_compressor(&self) {
        let c = &self.compressor;
        c.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let _q = c.queue.lock().unwrap_or_else(|p| p.into_inner());
        c.wake.notify_all();
    }

    pub fn images(&self) -> Vec<ImageRecord> {
        self.meta().images.values().cloned().collect()
    }

    pub fn image(&self, id: &ImageId) -> Result<ImageRecord> {
        self.meta()
            .images
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::ImageNotFound(id.to_string()))
    }

    pub fn layer(&self, chain: &ChainId) -> Result<LayerRecord> {
        self.meta()
            .layers
            .get(chain)
            .cloned()
            .ok_or_else(|| StoreError::LayerNotFound(chain.clone()))
    }

    /// The record of layer `chain`: an image's, else a build cache record's (a layer a
    /// stage or step record brought, which no image names yet).
    pub fn layer_known(&self, chain: &ChainId) -> Result<LayerRecord> {
        self.layer(chain).or_else(|e| {
            self.cache
                .roots()
                .0
                .into_iter()
                .find(|l| &l.chain_id == chain)
                .ok_or(e)
        })
    }

    /// Finds an image by name (normalised), full ID (with or without `sha256:`), or a
    /// unique ID prefix.
    pub fn resolve(&self, name: &str) -> Result<ImageRecord> {
        let meta = self.meta();
        if let Ok(r) = Reference::parse(name) {
            if let Some(img) = meta.image_by_name(&r.to_string()) {
                return Ok(img.clone());
            }
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let found: Vec<&ImageRecord> = meta
                .images
                .values()
                .filter(|i| i.id.hex().starts_with(&hex))
                .collect();
            match found.len() {
                1 => return Ok(found[0].clone()),
                0 => {}
                count => {
                    return Err(StoreError::AmbiguousImage {
                        name: name.to_string(),
                        count,
                    })
                }
            }
        }
        Err(StoreError::ImageNotFound(name.to_string()))
    }

    /// Adds a name to an image; the name moves if another image had it.
    pub fn tag(&self, id: &ImageId, name: &Reference) -> Result<()> {
        let mut meta = self.meta();
        let mut next = meta.clone();
        if !next.images.contains_key(id) {
            return Err(StoreError::ImageNotFound(id.to_string()));
        }
        let full = name.to_string();
        take_names(&mut next, std::slice::from_ref(&full), id);
        if let Some(img) = next.images.get_mut(id) {
            if !img.names.contains(&full) {
                img.names.push(full);
            }
        }
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// The image that holds exactly the full name `full` (no ID prefixes, no search).
    pub fn image_named(&self, full: &str) -> Option<ImageRecord> {
        self.meta().image_by_name(full).cloned()
    }

    /// Takes the full name `full` off image `id`, which stays in the store even with no
    /// name left (a local manifest list names it now).
    pub fn untag(&self, id: &ImageId, full: &str) -> Result<()> {
        let mut meta = self.meta();
        let mut next = meta.clone();
        let Some(img) = next.images.get_mut(id) else {
            return Err(StoreError::ImageNotFound(id.to_string()));
        };
        if !img.names.iter().any(|n| n == full) {
            return Ok(());
        }
        img.names.retain(|n| n != full);
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// Removes what `name` designates: a name of an image with other names is only
    /// untagged; otherwise (an ID, or the last name) the image goes with all its names, and
    /// so do the layers nothing else uses.
    pub fn remove(&self, name: &str) -> Result<Vec<RemoveEvent>> {
        // An operation: a background job running now stops at its next read.
        let _op = self.lease();
        let img = self.resolve(name)?;
        let by_name = Reference::parse(name)
            .ok()
            .map(|r| r.to_string())
            .filter(|full| img.names.contains(full));
        let deleted = {
            let mut meta = self.meta();
            let mut next = meta.clone();
            let deleted = match by_name {
                Some(full) if img.names.len() > 1 => {
                    if let Some(rec) = next.images.get_mut(&img.id) {
                        rec.names.retain(|n| n != &full);
                    }
                    false
                }
                _ => {
                    next.images.remove(&img.id);
                    next.attestations.remove(&img.id);
                    true
                }
            };
            self.save(&next)?;
            *meta = next;
            deleted
        };
        if !deleted {
            return Ok(vec![RemoveEvent::Untagged(name.to_string())]);
        }
        // A background job (an unpack or a directory's digest of this image's layer) holds
        // what it works on until it stops (an unpack stops at its next read, this being an
        // operation): wait for it, and keep the next one from starting before the
        // collection below has taken everything.
        let working = self
            .compressor
            .working
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let collected = self.gc();
        drop(working);
        let mut events: Vec<RemoveEvent> = collected?
            .layers
            .into_iter()
            .flatten()
            .map(RemoveEvent::DeletedLayer)
            .collect();
        events.push(RemoveEvent::Deleted {
            name: name.to_string(),
            id: img.id,
        });
        Ok(events)
    }

    /// Records `records` as the attestations of image `id` (replacing any it had). Their
    /// blobs must be in the store (written under the caller's lease).
    pub fn set_attestations(&self, id: &ImageId, records: Vec<AttestationRecord>) -> Result<()> {
        for r in &records {
            if !self.content.contains(&r.blob) {
                return Err(StoreError::BlobNotFound(r.blob.clone()));
            }
        }
        let mut meta = self.meta();
        if !meta.images.contains_key(id) {
            return Err(StoreError::ImageNotFound(id.hex().to_string()));
        }
        let mut next = meta.clone();
        if records.is_empty() {
            next.attestations.remove(id);
        } else {
            next.attestations.insert(id.clone(), records);
        }
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// The attestations of image `id` (none: it has none).
    pub fn attestations(&self, id: &ImageId) -> Vec<AttestationRecord> {
        self.meta()
            .attestations
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Deletes blobs and layers that no image and no lease refers to.
    pub fn gc(&self) -> Result<GcReport> {
        // List what is on disk first. Leases are always taken before a blob or layer
        // appears, so anything listed here that is in flight is in the lease snapshot taken
        // below.
        let layers_dir = self.root.join("layers");
        let mut layer_dirs = Vec::new();
        for ent in fs::read_dir(&layers_dir).map_err(|e| StoreError::io("read", &layers_dir, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &layers_dir, e))?;
            let chain = ent
                .file_name()
                .to_str()
                .and_then(|h| Digest::from_hex(h).ok())
                .map(ChainId);
            layer_dirs.push((ent.path(), chain));
        }
        let blobs = self.content.list()?;
        // The cache's roots before the leases: a record pruned in between had its parts
        // leased by whoever used it, and one made in between is leased by its build.
        let (cache_layers, mut live_blobs) = self.cache.roots();
        let mut live_layers: HashSet<ChainId> =
            cache_layers.into_iter().map(|l| l.chain_id).collect();
        let mut meta = self.meta();
        let leased: HashSet<String> = {
            let t = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            t.held.values().flatten().cloned().collect()
        };
        for (id, atts) in &meta.attestations {
            if meta.images.contains_key(id) {
                live_blobs.extend(atts.iter().map(|a| a.blob.clone()));
            }
        }
        for img in meta.images.values() {
            live_layers.extend(img.layers.iter().cloned());
            live_blobs.extend(img.blobs.iter().cloned());
            live_blobs.insert(img.manifest.clone());
            live_blobs.insert(img.id.digest().clone());
        }
        let blob_leased = |d: &Digest| leased.contains(&format!("blob:{}", d.hex()));
        for (src, form) in meta
            .compressed
            .iter()
            .chain(&meta.compressed_zstd)
            .chain(&meta.compressed_zstd_chunked)
        {
            if live_blobs.contains(src) || blob_leased(src) {
                live_blobs.insert(form.digest.clone());
            }
        }
        let layer_leased = |c: &ChainId| leased.contains(&format!("layer:{}", c.hex()));
        let mut report = GcReport::default();
        let sources = |m: &Metadata| {
            m.tree_blobs
                .values()
                .map(|t| t.sources.len())
                .sum::<usize>()
        };
        let before = (
            meta.layers.len(),
            meta.compressed.len() + meta.compressed_zstd.len() + meta.compressed_zstd_chunked.len(),
            meta.packed.len(),
            sources(&meta),
        );
        let mut next = meta.clone();
        let attested_before = next.attestations.len();
        let images = &meta.images;
        next.attestations.retain(|id, _| images.contains_key(id));
        next.layers
            .retain(|c, _| live_layers.contains(c) || layer_leased(c));
        // A packed layer keeps its blob; once its directory is made it is packed no more.
        // One that goes is a deleted layer as a directory would be.
        next.dirs
            .retain(|c, _| live_layers.contains(c) || layer_leased(c));
        let dirs_before = meta.dirs.len();
        let unpacked_now = next.dirs.clone();
        next.packed.retain(|c, _| {
            let live = live_layers.contains(c) || layer_leased(c);
            let unpacked = unpacked_now.contains_key(c);
            if !live && !unpacked {
                report.layers.push(Some(c.clone()));
            }
            live && !unpacked
        });
        for b in next.packed.values() {
            live_blobs.insert(b.clone());
        }
        // A tree blob lives while it is used and one of its layers stays; it is written
        // for real once stored (a pull of the same layer), and then needs no record.
        let layer_stays = |c: &ChainId| live_layers.contains(c) || layer_leased(c);
        next.tree_blobs.retain(|d, t| {
            t.sources.retain(|s| layer_stays(&s.chain));
            !t.sources.is_empty()
                && (live_blobs.contains(d) || blob_leased(d))
                && !blobs.contains(d)
        });
        for codec in [Codec::Gzip, Codec::Zstd, Codec::ZstdChunked] {
            next.forms_mut(codec).retain(|src, form| {
                live_blobs.contains(src) || blob_leased(src) || blob_leased(&form.digest)
            });
        }
        let after = (
            next.layers.len(),
            next.compressed.len() + next.compressed_zstd.len() + next.compressed_zstd_chunked.len(),
            next.packed.len(),
            sources(&next),
        );
        let recorded: HashSet<ChainId> = next.dirs.keys().cloned().collect();
        if after != before
            || next.dirs.len() != dirs_before
            || next.attestations.len() != attested_before
        {
            self.save(&next)?;
            *meta = next;
        }
        // A directory without a record is not trusted (a commit a crash interrupted) unless
        // an operation is committing it right now.
        for (path, chain) in layer_dirs {
            let keep = chain.as_ref().is_some_and(|c| {
                layer_leased(c) || (live_layers.contains(c) && recorded.contains(c))
            });
            if !keep {
                isula_sys::rooted::remove_tree(&path)?;
                report.layers.push(chain);
            }
        }
        for d in blobs {
            if !live_blobs.contains(&d) && !blob_leased(&d) {
                self.content.remove(&d)?;
                report.blobs += 1;
            }
        }
        drop(meta);
        // A directory left unhashed because a blob held its layer may have lost that blob:
        // its tar digest is taken now (the check has nothing else to compare it with).
        if report.blobs > 0 {
            for chain in self.dirs_to_hash() {
                self.queue_job(Job::Hash(chain));
            }
        }
        Ok(report)
    }
}

/// Removes `names` from every image but `keep`; returns the names that moved.
fn take_names(meta: &mut Metadata, names: &[String], keep: &ImageId) -> Vec<String> {
    let mut moved = Vec::new();
    for (id, img) in meta.images.iter_mut() {
        if id == keep {
            continue;
        }
        img.names.retain(|n| {
            let hit = names.contains(n);
            if hit {
                moved.push(n.clone());
            }
            !hit
        });
    }
    moved
}

/// The short form of a stored full name.
pub fn familiar(full: &str) -> String {
    Reference::parse(full)
        .map(|r| r.familiar())
        .unwrap_or_else(|_| full.to_string())
}

/// Where `RUN --mount=type=cache` directories live under the data root: one directory per
/// id (`<sha256 of the id>/`) holding `data/`, a `lock` file (shared while a build uses it,
/// exclusive for `sharing=locked` and for removal) and `id` (the id, for `builder du`).
pub const CACHE_MOUNTS_DIR: &str = "cache-mounts";

/// One cache mount, as `builder du` shows it.
#[derive(Debug, Clone)]
pub struct CacheMount {
    pub id: String,
    pub dir: PathBuf,
    pub size: u64,
    /// Creation and last use, Unix seconds.
    pub created: i64,
    pub last_used: i64,
    pub in_use: bool,
}

fn mtime_secs(p: &Path) -> i64 {
    fs::metadata(p)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

impl Store {
    /// The directory of the cache mount `id` (whether or not it exists).
    pub fn cache_mount_dir(&self, id: &str) -> PathBuf {
        self.root
            .join(CACHE_MOUNTS_DIR)
            .join(Digest::of_bytes(id.as_bytes()).hex())
    }

    /// Every cache mount, with its size and whether a build holds it now.
    pub fn cache_mounts(&self) -> Vec<CacheMount> {
        let root = self.root.join(CACHE_MOUNTS_DIR);
        let mut out = Vec::new();
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let dir = e.path();
            let lock = dir.join("lock");
            let in_use = match isula_sys::lock::FileLock::try_exclusive(&lock) {
                Ok(_) => false,
                Err(e) => isula_sys::lock::is_held_elsewhere(&e),
            };
            out.push(CacheMount {
                id: fs::read_to_string(dir.join("id")).unwrap_or_default(),
                size: cache::disk_usage(&dir.join("data")),
                created: mtime_secs(&dir.join("id")),
                last_used: mtime_secs(&lock),
                in_use,
                dir,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes the cache mounts no build holds (with `unused_since`, only those last used
    /// before that time, Unix seconds); returns those removed.
    pub fn prune_cache_mounts(&self, unused_since: Option<i64>) -> Result<Vec<CacheMount>> {
        let mut removed = Vec::new();
        for m in self
            .cache_mounts()
            .into_iter()
            .filter(|m| !m.in_use && unused_since.is_none_or(|t| m.last_used < t))
        {
            // Held while it goes, so that no build starts on a half-removed one.
            let Ok(_lock) = isula_sys::lock::FileLock::try_exclusive(&m.dir.join("lock")) else {
                continue;
            };
            // Never through a link a RUN left in it.
            isula_sys::rooted::remove_tree(&m.dir)?;
            removed.push(m);
        }
        Ok(removed)
    }
}
