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
use crate::metadata::{write_atomic, LayerRecord};
use isula_types::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

pub const SCHEMA_VERSION: u32 = 1;

/// The result of a whole stage, reused as is on a full hit (same config, same image ID).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stage's image config, a blob in the content store.
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    pub blobs: Vec<Digest>,
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
    /// Bytes on disk this record alone holds (its snapshot, or its stage's own layer).
    pub size: u64,
    /// Seconds since the epoch.
    pub created: i64,
    pub last_used: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    schema: u32,
    records: BTreeMap<Digest, Record>,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub records: usize,
    pub bytes: u64,
}

/// Totals for `builder du` and `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub records: usize,
    pub snapshots: usize,
    pub bytes: u64,
}

pub struct Cache {
    dir: PathBuf,
    index: std::sync::Mutex<Index>,
    /// Records added or touched since the last persist.
    dirty: std::sync::atomic::AtomicBool,
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
        let index = match fs::read(&path) {
            Ok(bytes) => {
                let index: Index =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptMetadata {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if index.schema != SCHEMA_VERSION {
                    return Err(StoreError::CorruptMetadata {
                        path,
                        reason: format!(
                            "schema {} (this build reads {SCHEMA_VERSION})",
                            index.schema
                        ),
                    });
                }
                index
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index {
                schema: SCHEMA_VERSION,
                records: BTreeMap::new(),
            },
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        Ok(Cache {
            dir,
            index: std::sync::Mutex::new(index),
            dirty: Default::default(),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a build context's stat-keyed hash record lives.
    pub fn context_record(&self, context: &Path) -> PathBuf {
        let h = Digest::of_bytes(context.as_os_str().as_encoded_bytes());
        self.dir.join("context").join(format!("{}.json", h.hex()))
    }

    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(id).join("diff")
    }

    /// Drops records whose parts are gone (`present` says whether a stage's layers and
    /// blobs are still there) and removes snapshots no record names. Returns how many
    /// records and snapshots went.
    pub(crate) fn sweep(&self, present: &dyn Fn(&StageRecord) -> bool) -> Result<(usize, usize)> {
        let mut index = self.index();
        let before = index.records.len();
        let snapshots = self.dir.join("snapshots");
        index.records.retain(|_, r| {
            r.snapshot
                .as_ref()
                .is_none_or(|s| snapshots.join(s).join("diff").is_dir())
                && r.stage.as_ref().is_none_or(present)
        });
        let dropped = before - index.records.len();
        let named: HashSet<&str> = index
            .records
            .values()
            .filter_map(|r| r.snapshot.as_deref())
            .collect();
        let mut removed = 0;
        for ent in fs::read_dir(&snapshots).map_err(|e| StoreError::io("read", &snapshots, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &snapshots, e))?;
            let name = ent.file_name().to_string_lossy().to_string();
            if !named.contains(name.as_str()) {
                isula_sys::rooted::remove_tree(&ent.path())?;
                removed += 1;
            }
        }
        if dropped > 0 {
            let data = serde_json::to_vec(&*index)
                .map_err(|e| StoreError::io("encode", &self.dir, std::io::Error::other(e)))?;
            write_atomic(&self.dir.join("index.json"), &data)?;
        }
        Ok((dropped, removed))
    }

    /// The record for `key`, marked as used now.
    pub fn get(&self, key: &Digest) -> Option<Record> {
        let mut index = self.index();
        let r = index.records.get_mut(key)?;
        r.last_used = now();
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
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

    /// Records `key` (kept in memory until [`Cache::persist`]). An existing record for
    /// the key wins (a concurrent build made the same step); then `false` is returned and
    /// the caller's snapshot, if any, is removed.
    pub fn put(&self, key: &Digest, mut record: Record) -> Result<bool> {
        let mut index = self.index();
        if let Some(existing) = index.records.get_mut(key) {
            // A stage result can be added to a step record made earlier.
            if existing.stage.is_none() && record.stage.is_some() && record.snapshot.is_none() {
                existing.stage = record.stage.take();
                existing.size += record.size;
                self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
                return Ok(true);
            }
            drop(index);
            if let Some(s) = record.snapshot {
                isula_sys::rooted::remove_tree(&self.dir.join("snapshots").join(s))?;
            }
            return Ok(false);
        }
        let t = now();
        record.created = t;
        record.last_used = t;
        index.records.insert(key.clone(), record);
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }

    /// Makes every record so far durable: the file system is flushed first, so no record
    /// can name a snapshot whose data has not reached the disk.
    pub fn persist(&self) -> Result<()> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let dirfd = fs::File::open(&self.dir).map_err(|e| StoreError::io("open", &self.dir, e))?;
        rustix::fs::syncfs(&dirfd)
            .map_err(|e| StoreError::io("syncfs", &self.dir, std::io::Error::from(e)))?;
        let index = self.index();
        let data = serde_json::to_vec(&*index)
            .map_err(|e| StoreError::io("encode", &self.dir, std::io::Error::other(e)))?;
        write_atomic(&self.dir.join("index.json"), &data)
    }

    /// Layers and blobs the stage records keep alive.
    pub(crate) fn roots(&self) -> (HashSet<isula_types::ChainId>, HashSet<Digest>) {
        let index = self.index();
        let mut layers = HashSet::new();
        let mut blobs = HashSet::new();
        for s in index.records.values().filter_map(|r| r.stage.as_ref()) {
            layers.extend(s.layers.iter().map(|l| l.chain_id.clone()));
            blobs.extend(s.blobs.iter().cloned());
            blobs.insert(s.config.clone());
        }
        (layers, blobs)
    }

    /// Layer records of the stage records (so the store keeps their metadata).
    pub(crate) fn layer_records(&self) -> Vec<LayerRecord> {
        let index = self.index();
        index
            .records
            .values()
            .filter_map(|r| r.stage.as_ref())
            .flat_map(|s| s.layers.iter().cloned())
            .collect()
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

    /// Removes least recently used records until at most `keep` bytes remain (`keep` 0:
    /// everything), never one whose snapshot `in_use` names. A record goes with every
    /// record below it (their snapshots stack on its own). Persists the result.
    pub fn prune(&self, keep: u64, in_use: &dyn Fn(&str) -> bool) -> Result<Pruned> {
        let mut out = Pruned::default();
        let mut doomed_snapshots = Vec::new();
        {
            let mut index = self.index();
            let mut total: u64 = index.records.values().map(|r| r.size).sum();
            while total > keep || (keep == 0 && !index.records.is_empty()) {
                let mut order: Vec<(&Digest, &Record)> = index.records.iter().collect();
                order.sort_by_key(|(_, r)| (r.last_used, r.created));
                let victim = order.iter().map(|(k, _)| (*k).clone()).find(|k| {
                    !subtree(&index.records, k)
                        .iter()
                        .any(|d| index.records[d].snapshot.as_deref().is_some_and(in_use))
                });
                let Some(victim) = victim else { break };
                for k in subtree(&index.records, &victim) {
                    if let Some(r) = index.records.remove(&k) {
                        total = total.saturating_sub(r.size);
                        out.records += 1;
                        out.bytes += r.size;
                        doomed_snapshots.extend(r.snapshot);
                    }
                }
                if keep == 0 && index.records.is_empty() {
                    break;
                }
            }
            if out.records > 0 {
                let data = serde_json::to_vec(&*index)
                    .map_err(|e| StoreError::io("encode", &self.dir, std::io::Error::other(e)))?;
                write_atomic(&self.dir.join("index.json"), &data)?;
            }
        }
        // The index no longer names them: removing now is safe at any point of a crash.
        for s in doomed_snapshots {
            isula_sys::rooted::remove_tree(&self.dir.join("snapshots").join(s))?;
        }
        Ok(out)
    }

    /// Problems for `--check-store`: records naming missing snapshots, parents that do not
    /// exist.
    pub fn check(&self) -> Vec<String> {
        let index = self.index();
        let mut problems = Vec::new();
        for (k, r) in &index.records {
            if let Some(s) = &r.snapshot {
                if !self.snapshot_dir(s).is_dir() {
                    problems.push(format!("cache record {k}: snapshot {s} is missing"));
                }
            }
        }
        problems
    }
}

/// `key` and every record whose parent chain reaches it.
fn subtree(records: &BTreeMap<Digest, Record>, key: &Digest) -> Vec<Digest> {
    let mut out = vec![key.clone()];
    let mut i = 0;
    while i < out.len() {
        let k = out[i].clone();
        for (ck, r) in records {
            if r.parent.as_ref() == Some(&k) && !out.contains(ck) {
                out.push(ck.clone());
            }
        }
        i += 1;
    }
    out
}
