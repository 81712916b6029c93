//! The build cache: what each build step produced, found again by the step's key. It owns
//! `cache/` in the data root and must not know how keys are made (the builder does) or
//! what a Dockerfile is.
//!
//! ```text
//! <dataroot>/cache/
//! ├── index.json              every record (key → parent, snapshot, stage result, size,
//! │                           last use), replaced atomically
//! ├── snapshots/<id>/diff     a step's own changes in overlay form (its upper directory),
//! │                           never written again once recorded
//! └── context/<hash>.json     per build context: stat-keyed content hashes (builder-owned)
//! ```
//!
//! A step record may carry a snapshot (the step changed files) and a stage record the
//! committed result of a whole stage (its config blob, layers and layer blobs, which the
//! store's collection keeps alive while the record exists, whatever happens to images).
//!
//! Crash safety: a snapshot is written in `tmp/` and renamed into `snapshots/` complete;
//! new records live in memory until [`Cache::persist`] flushes the file system (`syncfs`)
//! and then writes the index, so the index never names a snapshot whose files may be
//! partial. At start-up, snapshots no record names are removed, and records whose snapshot,
//! layers or blobs are gone are dropped.

use crate::error::{Result, StoreError};
use crate::metadata::{load_versioned, save_json, LayerRecord};
use crate::Lease;
use isula_types::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The index's schema: 2 once it holds a step written as a tar ([`TarWritten`]), which a
/// reader of schema 1 would take for a step that changed no files (such a reader sets the
/// index aside instead); 1 otherwise. Both are read.
pub const SCHEMA_VERSION: u32 = 2;
const SCHEMA_WITHOUT_TARS: u32 = 1;

/// A step whose record holds the layer it wrote as a tar (its `stage` is the stage as it
/// stood after the step: the layer is the top one), and the modification-time clamp that
/// tar was written with: a build with another clamp makes another tar, and does not use
/// the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarWritten {
    pub clamp_mtime: Option<i64>,
}

/// The result of a whole stage, reused as is on a full hit (same config, same image ID).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stage's image config, a blob in the content store.
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    pub blobs: Vec<Digest>,
}

impl StageRecord {
    fn all_blobs(&self) -> impl Iterator<Item = &Digest> {
        self.blobs.iter().chain([&self.config])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub parent: Option<Digest>,
    /// What the step was (for `builder du`).
    pub description: String,
    /// The step's own changes (`snapshots/<id>/diff`), when it changed files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageRecord>,
    /// Steps with the same lineage are versions of one another (the same COPY on the same
    /// parent, with other sources): a new version may reuse an old one's unchanged files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Digest>,
    /// Bytes on disk this record alone holds (its snapshot, or its stage's own layer).
    pub size: u64,
    /// A step that wrote its layer as a tar (see [`TarWritten`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_as_tar: Option<TarWritten>,
    /// Seconds since the epoch (set by [`Cache::put`]).
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub last_used: i64,
}

impl Record {
    /// A record to [`Cache::put`]: its times are set then.
    pub fn new(parent: &Digest, description: &str) -> Record {
        Record::under(Some(parent.clone()), description)
    }

    /// [`Record::new`] for a parent that may be absent (a record read from elsewhere).
    pub fn under(parent: Option<Digest>, description: &str) -> Record {
        Record {
            parent,
            description: description.to_string(),
            snapshot: None,
            stage: None,
            lineage: None,
            size: 0,
            written_as_tar: None,
            created: 0,
            last_used: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    schema: u32,
    records: BTreeMap<Digest, Record>,
    /// Content digests the builder took of files in immutable layers, by a key naming
    /// the layers and the selection (see [`Cache::content_digest`]), with their last use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    content: BTreeMap<Digest, (Digest, i64)>,
}

/// Content digests kept, at most (the least recently used go first): each saves reading
/// the files of one `COPY --from` selection again.
pub const CONTENT_DIGESTS: usize = 4096;

impl Index {
    /// `keys` and every record whose parent chain reaches one of them.
    fn subtrees(&self, keys: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let mut children: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
        for (k, r) in &self.records {
            if let Some(p) = &r.parent {
                children.entry(p).or_default().push(k);
            }
        }
        let mut out: Vec<Digest> = keys.into_iter().collect();
        let mut seen: HashSet<Digest> = out.iter().cloned().collect();
        let mut i = 0;
        while i < out.len() {
            for c in children.get(&out[i]).into_iter().flatten() {
                if seen.insert((*c).clone()) {
                    out.push((*c).clone());
                }
            }
            i += 1;
        }
        out
    }
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pruned {
    pub records: usize,
    pub bytes: u64,
    /// The removed records, as they were.
    pub removed: Vec<(Digest, Record)>,
}

/// Which records a prune may take.
pub struct PruneFilter<'a> {
    /// Keep at most this many bytes (0: take every candidate).
    pub keep: u64,
    /// Only records last used before this time (Unix seconds), with every record stacked
    /// on them unused since then too (`builder prune --filter until=`).
    pub unused_since: Option<i64>,
    /// A snapshot a running build uses (asked under the index lock).
    pub in_use: &'a dyn Fn(&str) -> bool,
    /// Records never taken (with everything below them).
    pub spare: &'a dyn Fn(&Digest) -> bool,
}

/// Totals for `builder du` and `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub records: usize,
    pub snapshots: usize,
    pub bytes: u64,
}

/// What the records' snapshots hold on disk, each block counted once: a step that reused
/// files of its previous version holds hard links to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniqueUsage {
    /// Every record's bytes, counted once however many records link them.
    pub bytes: u64,
    /// Per record: the bytes of its snapshot that other records' snapshots hold too.
    pub shared: HashMap<Digest, u64>,
}

/// What of `stage` is missing from `store`, one line each.
pub(crate) fn missing(store: &crate::Store, stage: &StageRecord) -> Vec<String> {
    let layers = stage
        .layers
        .iter()
        .filter(|l| !store.layer_present(&l.chain_id))
        .map(|l| format!("layer directory {} is missing", l.chain_id));
    let blobs = stage
        .all_blobs()
        .filter(|b| !store.blob_present(b))
        .map(|b| format!("blob {b} is missing"));
    layers.chain(blobs).collect()
}

pub struct Cache {
    dir: PathBuf,
    index: std::sync::Mutex<Index>,
    /// Records were added since the last persist.
    added: AtomicBool,
    /// Records with snapshots were added (the file system must be flushed first).
    added_snapshots: AtomicBool,
    /// Records were used since the last persist (their last use should be saved).
    touched: AtomicBool,
    /// Opened with the cache: a flush through it reports any writeback error since then
    /// (a handle opened at the flush would miss one that came before it).
    fs: isula_sys::FsSync,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Bytes a directory tree takes on disk.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    let mut seen = HashSet::new();
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

impl Cache {
    pub(crate) fn open(root: &Path) -> Result<Cache> {
        let dir = root.join("cache");
        for d in ["snapshots", "context"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(|e| StoreError::io("create", &p, e))?;
        }
        let path = dir.join("index.json");
        // A cache only saves time: an index that cannot be read is set aside (for a look)
        // and the cache starts empty; the sweep then removes what it named.
        let loaded = match load_versioned(&path, SCHEMA_VERSION, |i: &Index| {
            // Schema 1 is schema 2 without steps written as tars.
            if i.schema == SCHEMA_WITHOUT_TARS {
                SCHEMA_VERSION
            } else {
                i.schema
            }
        }) {
            Err(e @ StoreError::CorruptMetadata { .. }) => {
                let aside = dir.join(format!("index.json.unreadable-{}", now()));
                tracing::warn!(error = %e, aside = %aside.display(), "build cache index set aside; the cache starts empty");
                fs::rename(&path, &aside).map_err(|e| StoreError::io("rename", &path, e))?;
                None
            }
            other => other?,
        };
        let index = loaded.unwrap_or(Index {
            schema: SCHEMA_VERSION,
            ..Default::default()
        });
        let fs = isula_sys::FsSync::open(&dir)?;
        Ok(Cache {
            fs,
            dir,
            index: std::sync::Mutex::new(index),
            added: AtomicBool::new(false),
            added_snapshots: AtomicBool::new(false),
            touched: AtomicBool::new(false),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, index: &Index) -> Result<()> {
        // Schema 1 while no step is written as a tar: a reader of schema 1 still reads it.
        let schema = if index.records.values().any(|r| r.written_as_tar.is_some()) {
            SCHEMA_VERSION
        } else {
            SCHEMA_WITHOUT_TARS
        };
        let path = self.dir.join("index.json");
        if index.schema == schema {
            return save_json(&path, index);
        }
        let mut labelled = index.clone();
        labelled.schema = schema;
        save_json(&path, &labelled)
    }

    /// Where a build context's stat-keyed hash record lives (a `.json` beside it is an
    /// earlier version's, which its first save removes).
    pub fn context_record(&self, context: &Path) -> PathBuf {
        let h = Digest::of_bytes(context.as_os_str().as_encoded_bytes());
        self.dir.join("context").join(format!("{}.hashes", h.hex()))
    }

    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(id).join("diff")
    }

    /// A note kept beside a snapshot's diff (see [`crate::StagedLayer::note_path`]).
    pub fn snapshot_note(&self, id: &str, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(id).join(name)
    }

    /// The snapshot of the most recent record of `lineage`, leased (so no prune takes it
    /// while the caller reads it).
    pub fn latest_of_lineage(&self, lineage: &Digest, lease: &Lease) -> Option<String> {
        let index = self.index();
        let (_, r) = index
            .records
            .iter()
            .filter(|(_, r)| r.lineage.as_ref() == Some(lineage) && r.snapshot.is_some())
            .max_by_key(|(_, r)| (r.created, r.last_used))?;
        let id = r.snapshot.clone()?;
        lease.snapshot(&id);
        Some(id)
    }

    /// Whether any record (a snapshot or a tar written) is a version of `lineage`.
    pub fn has_lineage(&self, lineage: &Digest) -> bool {
        self.index()
            .records
            .values()
            .any(|r| r.lineage.as_ref() == Some(lineage))
    }

    /// Drops records whose parts are gone (with the records stacked on them) and removes
    /// snapshots no record names. Returns how many records and snapshots went.
    pub(crate) fn sweep(&self, store: &crate::Store) -> Result<(usize, usize)> {
        let mut index = self.index();
        let broken: Vec<Digest> = index
            .records
            .iter()
            .filter(|(_, r)| {
                r.snapshot
                    .as_ref()
                    .is_some_and(|s| !self.snapshot_dir(s).is_dir())
                    || r.stage
                        .as_ref()
                        .is_some_and(|s| !missing(store, s).is_empty())
            })
            .map(|(k, _)| k.clone())
            .collect();
        let doomed = index.subtrees(broken);
        for k in &doomed {
            index.records.remove(k);
        }
        let named: HashSet<&str> = index
            .records
            .values()
            .filter_map(|r| r.snapshot.as_deref())
            .collect();
        let snapshots = self.dir.join("snapshots");
        let mut removed = 0;
        for ent in fs::read_dir(&snapshots).map_err(|e| StoreError::io("read", &snapshots, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &snapshots, e))?;
            if !named.contains(ent.file_name().to_string_lossy().as_ref()) {
                isula_sys::rooted::remove_tree(&ent.path())?;
                removed += 1;
            }
        }
        if !doomed.is_empty() {
            self.save(&index)?;
        }
        Ok((doomed.len(), removed))
    }

    /// The record for `key`, marked as used now. Its snapshot, layers and blobs are leased
    /// under the index lock, so no prune or collection can take them from under the caller.
    pub fn get(&self, key: &Digest, lease: &Lease) -> Option<Record> {
        let mut index = self.index();
        let r = index.records.get_mut(key)?;
        r.last_used = now();
        if let Some(s) = &r.snapshot {
            lease.snapshot(s);
        }
        if let Some(s) = &r.stage {
            for l in &s.layers {
                lease.layer(&l.chain_id);
            }
            for b in s.all_blobs() {
                lease.blob(b);
            }
        }
        self.touched.store(true, Ordering::SeqCst);
        Some(r.clone())
    }

    /// Moves a finished step's upper directory (`tmp/<x>/diff`, its work directory already
    /// gone) into `snapshots/`, returning its ID.
    pub(crate) fn adopt_snapshot(&self, staged_dir: &Path) -> Result<String> {
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let dest = self.dir.join("snapshots").join(&id);
        fs::rename(staged_dir, &dest).map_err(|e| StoreError::io("rename", &dest, e))?;
        Ok(id)
    }

    /// A content digest noted under `key` by [`Cache::note_content_digest`]. The builder
    /// keys it by what never changes under it (the chain ID of the layers read, and what
    /// was selected in them), so it is never stale.
    pub fn content_digest(&self, key: &Digest) -> Option<Digest> {
        let mut index = self.index();
        let (digest, used) = index.content.get_mut(key)?;
        *used = now();
        self.touched.store(true, Ordering::SeqCst);
        Some(digest.clone())
    }

    /// Notes a content digest (kept with the records; a crash may lose it, which only
    /// means the files are read again).
    pub fn note_content_digest(&self, key: Digest, digest: Digest) {
        let mut index = self.index();
        index.content.insert(key, (digest, now()));
        if index.content.len() > CONTENT_DIGESTS {
            let oldest = index
                .content
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                index.content.remove(&k);
            }
        }
        self.added.store(true, Ordering::SeqCst);
    }

    /// Whether there is a record for `key`.
    pub fn contains(&self, key: &Digest) -> bool {
        self.index().records.contains_key(key)
    }

    /// Records `key` (kept in memory until [`Cache::persist`]). An existing record for
    /// the key wins (a concurrent build made the same step): then `false` is returned and
    /// the caller's snapshot, if any, is removed.
    pub fn put(&self, key: &Digest, mut record: Record) -> Result<bool> {
        let mut index = self.index();
        if index.records.contains_key(key) {
            drop(index);
            if let Some(s) = record.snapshot {
                isula_sys::rooted::remove_tree(&self.dir.join("snapshots").join(s))?;
            }
            return Ok(false);
        }
        let t = now();
        record.created = t;
        record.last_used = t;
        if record.snapshot.is_some() {
            self.added_snapshots.store(true, Ordering::SeqCst);
        }
        index.records.insert(key.clone(), record);
        self.added.store(true, Ordering::SeqCst);
        Ok(true)
    }

    /// Makes every record so far durable. When records with snapshots were added the file
    /// system is flushed first, so no record can name a snapshot whose data has not
    /// reached the disk (records without one name only layers and blobs, which the store
    /// keeps as it keeps an image's); when records were only used, their last use is
    /// written.
    pub fn persist(&self) -> Result<()> {
        let added = self.added.swap(false, Ordering::SeqCst);
        let snapshots = self.added_snapshots.swap(false, Ordering::SeqCst);
        let touched = self.touched.swap(false, Ordering::SeqCst);
        if snapshots {
            self.fs.sync()?;
        }
        if added || touched {
            self.save(&self.index())?;
        }
        Ok(())
    }

    /// The layers (with their records) and blobs the stage records keep alive.
    pub(crate) fn roots(&self) -> (Vec<LayerRecord>, HashSet<Digest>) {
        let index = self.index();
        let mut layers = Vec::new();
        let mut blobs = HashSet::new();
        for s in index.records.values().filter_map(|r| r.stage.as_ref()) {
            layers.extend(s.layers.iter().cloned());
            blobs.extend(s.all_blobs().cloned());
        }
        (layers, blobs)
    }

    pub fn usage(&self) -> Usage {
        let index = self.index();
        Usage {
            records: index.records.len(),
            snapshots: index
                .records
                .values()
                .filter(|r| r.snapshot.is_some())
                .count(),
            bytes: index.records.values().map(|r| r.size).sum(),
        }
    }

    /// Every record, for `builder du`.
    pub fn records(&self) -> Vec<(Digest, Record)> {
        let index = self.index();
        index
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    /// [`UniqueUsage`]: walks every snapshot (what `builder du` shows; not for hot paths).
    pub fn unique_usage(&self) -> UniqueUsage {
        use std::os::unix::fs::MetadataExt;
        let records: Vec<(Digest, Record)> = self.records();
        // Each linked inode: its blocks and the records holding it.
        let mut linked: HashMap<(u64, u64), (u64, Vec<usize>)> = HashMap::new();
        let mut own = vec![0u64; records.len()];
        let layers = self.dir.parent().map(|root| root.join("layers"));
        for (i, (_, r)) in records.iter().enumerate() {
            // A step's snapshot, or a stage's own (top) layer, whose files are mostly
            // links to its steps' snapshots.
            let dir = match (&r.snapshot, &r.stage, &layers) {
                (Some(id), _, _) => self.snapshot_dir(id),
                (None, Some(st), Some(layers)) if r.size > 0 => match st.layers.last() {
                    Some(top) => layers.join(top.chain_id.hex()).join("diff"),
                    None => continue,
                },
                _ => continue,
            };
            let mut stack = vec![dir];
            let mut seen = HashSet::new();
            while let Some(p) = stack.pop() {
                let Ok(meta) = fs::symlink_metadata(&p) else {
                    continue;
                };
                let bytes = meta.blocks() * 512;
                if meta.nlink() > 1 && !meta.is_dir() {
                    if seen.insert((meta.dev(), meta.ino())) {
                        let e = linked
                            .entry((meta.dev(), meta.ino()))
                            .or_insert((bytes, Vec::new()));
                        e.1.push(i);
                    }
                    continue;
                }
                own[i] += bytes;
                if meta.is_dir() {
                    if let Ok(rd) = fs::read_dir(&p) {
                        stack.extend(rd.flatten().map(|e| e.path()));
                    }
                }
            }
        }
        let mut out = UniqueUsage {
            bytes: own.iter().sum(),
            shared: HashMap::new(),
        };
        for (bytes, holders) in linked.values() {
            out.bytes += bytes;
            if holders.len() > 1 {
                for &i in holders {
                    *out.shared.entry(records[i].0.clone()).or_default() += bytes;
                }
            }
        }
        out
    }

    /// Removes the builder's per-context records and noted content digests (what
    /// `prune --all` also clears).
    pub fn clear_context_records(&self) -> Result<usize> {
        {
            let mut index = self.index();
            if !index.content.is_empty() {
                index.content.clear();
                self.save(&index)?;
            }
        }
        let dir = self.dir.join("context");
        let mut n = 0;
        for ent in fs::read_dir(&dir).map_err(|e| StoreError::io("read", &dir, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &dir, e))?;
            fs::remove_file(ent.path()).map_err(|e| StoreError::io("remove", ent.path(), e))?;
            n += 1;
        }
        Ok(n)
    }

    /// The keys of `roots` and of every record below them (their parent chains).
    pub fn ancestors(&self, roots: impl IntoIterator<Item = Digest>) -> HashSet<Digest> {
        let index = self.index();
        let mut out = HashSet::new();
        for mut k in roots {
            while index.records.contains_key(&k) && out.insert(k.clone()) {
                match index.records.get(&k).and_then(|r| r.parent.clone()) {
                    Some(p) => k = p,
                    None => break,
                }
            }
        }
        out
    }

    /// Removes least recently used records until at most `f.keep` bytes remain (`keep` 0:
    /// every candidate), never one whose snapshot `f.in_use` names (asked under the index
    /// lock, where [`Cache::get`] leases) nor one `f.spare` keeps. A record goes with every
    /// record stacked on it. Persists the result.
    pub fn prune(&self, f: &PruneFilter<'_>) -> Result<Pruned> {
        let keep = f.keep;
        let mut out = Pruned::default();
        let mut doomed_snapshots = Vec::new();
        {
            let mut index = self.index();
            let mut total: u64 = index.records.values().map(|r| r.size).sum();
            let mut order: Vec<(i64, i64, Digest)> = index
                .records
                .iter()
                .map(|(k, r)| (r.last_used, r.created, k.clone()))
                .collect();
            order.sort();
            let all = keep == 0;
            for (_, _, victim) in order {
                if !all && total <= keep {
                    break;
                }
                if !index.records.contains_key(&victim) {
                    continue; // went with an earlier victim's subtree
                }
                let tree = index.subtrees([victim]);
                let busy = tree.iter().any(|k| {
                    f.unused_since
                        .is_some_and(|t| index.records[k].last_used >= t)
                        || (f.spare)(k)
                        || index.records[k]
                            .snapshot
                            .as_deref()
                            .is_some_and(|s| (f.in_use)(s))
                });
                if busy {
                    continue;
                }
                for k in tree {
                    if let Some(r) = index.records.remove(&k) {
                        total = total.saturating_sub(r.size);
                        out.records += 1;
                        out.bytes += r.size;
                        doomed_snapshots.extend(r.snapshot.clone());
                        out.removed.push((k, r));
                    }
                }
            }
            if out.records > 0 {
                self.save(&index)?;
            }
        }
        // The index no longer names them: removing now is safe at any point of a crash.
        for s in doomed_snapshots {
            isula_sys::rooted::remove_tree(&self.dir.join("snapshots").join(s))?;
        }
        Ok(out)
    }

    /// Problems for `--check-store`: records naming missing snapshots, layers or blobs.
    pub(crate) fn check(&self, store: &crate::Store) -> Vec<String> {
        let index = self.index();
        let mut problems = Vec::new();
        for (k, r) in &index.records {
            if let Some(s) = &r.snapshot {
                if !self.snapshot_dir(s).is_dir() {
                    problems.push(format!("cache record {k}: snapshot {s} is missing"));
                }
            }
            for m in r.stage.iter().flat_map(|s| missing(store, s)) {
                problems.push(format!("cache record {k}: {m}"));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(cache: &Cache, root: &Path, name: &str) -> String {
        let staged = root.join("tmp").join(name);
        fs::create_dir_all(staged.join("diff")).expect("staged");
        fs::write(staged.join("diff/f"), name).expect("file");
        cache.adopt_snapshot(&staged).expect("adopt")
    }

    /// The index says schema 1 (which the previous version reads) until it holds a step
    /// written as a tar, then 2 (which that version sets aside rather than take such a step
    /// for one that changed no files); both are read back.
    #[test]
    fn the_index_says_schema_2_only_once_it_holds_a_step_written_as_a_tar() {
        let d = tempfile::tempdir().expect("tmp");
        let schema = |dir: &Path| -> u64 {
            let raw = fs::read(dir.join("cache/index.json")).expect("index");
            let v: serde_json::Value = serde_json::from_slice(&raw).expect("json");
            v["schema"].as_u64().expect("schema")
        };
        let key = |s: &str| Digest::of_bytes(s.as_bytes());
        let cache = Cache::open(d.path()).expect("open");
        assert!(cache
            .put(&key("plain"), Record::new(&key("root"), "ENV X=1"))
            .expect("put"));
        cache.persist().expect("persist");
        assert_eq!(schema(d.path()), 1);
        drop(cache);
        let cache = Cache::open(d.path()).expect("open schema 1");
        assert!(cache.contains(&key("plain")));
        let tar = Record {
            written_as_tar: Some(TarWritten {
                clamp_mtime: Some(1000),
            }),
            ..Record::new(&key("root"), "COPY . /app/")
        };
        assert!(cache.put(&key("tar"), tar).expect("put"));
        cache.persist().expect("persist");
        assert_eq!(schema(d.path()), 2);
        drop(cache);
        let cache = Cache::open(d.path()).expect("open schema 2");
        assert!(cache.contains(&key("plain")) && cache.contains(&key("tar")));
        assert_eq!(
            cache
                .records()
                .iter()
                .find(|(k, _)| *k == key("tar"))
                .and_then(|(_, r)| r.written_as_tar),
            Some(TarWritten {
                clamp_mtime: Some(1000)
            })
        );
        // A schema this version does not know: set aside, the cache starts empty.
        let path = d.path().join("cache/index.json");
        let raw = fs::read_to_string(&path).expect("index");
        fs::write(&path, raw.replace("\"schema\":2", "\"schema\":3")).expect("write");
        drop(cache);
        let cache = Cache::open(d.path()).expect("open schema 3");
        assert!(!cache.contains(&key("plain")));
    }

    #[test]
    fn prune_takes_least_recent_first_with_what_stacks_on_it_and_spares_what_is_in_use() {
        let d = tempfile::tempdir().expect("tmp");
        let cache = Cache::open(d.path()).expect("open");
        let key = |s: &str| Digest::of_bytes(s.as_bytes());
        let root = key("root");
        // a → b → c, and d beside them; a is the least recently used.
        let mut ids = HashMap::new();
        for (name, parent) in [
            ("a", &root),
            ("b", &key("a")),
            ("c", &key("b")),
            ("d", &root),
        ] {
            let id = snapshot(&cache, d.path(), name);
            ids.insert(name, id.clone());
            let r = Record {
                snapshot: Some(id),
                size: 10,
                ..Record::new(parent, name)
            };
            assert!(cache.put(&key(name), r).expect("put"));
        }
        {
            let mut index = cache.index();
            for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
                if let Some(r) = index.records.get_mut(&key(name)) {
                    r.last_used = i as i64;
                }
            }
        }
        // c is in use: a and b (below it) must stay too; d goes.
        let busy = ids["c"].clone();
        let pruned = cache
            .prune(&PruneFilter {
                keep: 0,
                unused_since: None,
                in_use: &|s| s == busy,
                spare: &|_| false,
            })
            .expect("prune");
        assert_eq!((pruned.records, pruned.bytes), (1, 10));
        assert_eq!(pruned.removed[0].0, key("d"));
        assert!(cache.snapshot_dir(&ids["c"]).is_dir());
        assert!(!cache.snapshot_dir(&ids["d"]).exists());
        // Nothing in use: trimming to 15 bytes takes a first, and b and c with it.
        let pruned = cache
            .prune(&PruneFilter {
                keep: 15,
                unused_since: None,
                in_use: &|_| false,
                spare: &|_| false,
            })
            .expect("prune");
        assert_eq!(pruned.records, 3);
        assert_eq!(cache.usage(), Usage::default());
        for n in ["a", "b", "c"] {
            assert!(!cache.snapshot_dir(&ids[n]).exists(), "{n}");
        }
        // The index on disk says the same.
        let again = Cache::open(d.path()).expect("reopen");
        assert_eq!(again.usage().records, 0);
    }

    #[test]
    fn an_unreadable_index_is_set_aside_not_fatal() {
        let d = tempfile::tempdir().expect("tmp");
        let cache = Cache::open(d.path()).expect("open");
        let id = snapshot(&cache, d.path(), "x");
        let key = Digest::of_bytes(b"x");
        let r = Record {
            snapshot: Some(id.clone()),
            ..Record::new(&key, "x")
        };
        cache.put(&key, r).expect("put");
        cache.persist().expect("persist");
        drop(cache);
        fs::write(d.path().join("cache/index.json"), b"{not json").expect("damage");
        let (store, _) =
            crate::Store::open(d.path()).expect("a damaged index does not stop the store");
        let cache = store.cache();
        assert_eq!(cache.usage().records, 0);
        let aside: Vec<String> = fs::read_dir(d.path().join("cache"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("index.json.unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        // What it named no record names now: swept like any leftover.
        assert!(!cache.snapshot_dir(&id).exists());
    }
}
