//! Built layers keep no tar: a build's layer is committed as its directory alone, with the
//! digest and size of the tar that directory makes (hashed, never written). Whoever reads
//! the blob (a save, the gzip for a push, a cache export) gets that tar made again from the
//! files as it reads, verified against the digest; so each built layer is written to disk
//! once, not twice.
//!
//! The directory is the blob's only copy, so it is made durable (one syncfs) before the
//! metadata names it, and the layer it belongs to is kept as long as the blob is used
//! (every image or cache record naming the blob names the layer too).

use crate::compression::Compression;
use crate::diff::{self, DiffOptions};
use crate::error::{Result, StoreError};
use crate::metadata::{LayerDir, TreeBlob, TreeSource};
use crate::{Lease, StagedLayer, Store};
use isula_types::{ChainId, DiffId, Digest};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Built layers whose tar this process hashed at their commit, with their files' stamp
/// then: a read of such a tar (a push's compression, a save) checks each file's stamp as
/// it reads instead of hashing the tar again, as a blob this process hashed is not hashed
/// again while its file's stamp holds (see [`crate::content::Stamp`]); when one moved,
/// the files are hashed again at the read's end ([`diff::TreeTar::spawn_vouched`]). Kept
/// in memory only: after a restart every read hashes, and a directory put in place some
/// other way (a repair, a layer removed and made again) is not the one recorded, so is
/// hashed too.
#[derive(Default, Clone)]
pub(crate) struct VouchedTrees {
    /// The one record kept: the newest commit's (its blob and what vouches for it).
    slot: Arc<Mutex<Option<(Digest, Vouched)>>>,
    /// How many built layers' tars were read checked by stamps, and by their hash.
    by_stamps: Arc<AtomicU64>,
    by_hash: Arc<AtomicU64>,
    /// Moved by each [`VouchedTrees::forget_all`]: a read's stamp taken before it is not
    /// recorded after it.
    generation: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Vouched {
    chain: ChainId,
    dir: DirId,
    stamp: diff::TreeStamp,
}

/// Which directory a layer's `diff/` is: its device, inode and change time (a directory
/// made again has another, or at least a later change time).
#[derive(Clone, Copy, PartialEq, Eq)]
struct DirId(u64, u64, i64, i64);

impl DirId {
    fn of(dir: &Path) -> Option<DirId> {
        let m = std::fs::symlink_metadata(dir).ok()?;
        Some(DirId(m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
    }
}

impl VouchedTrees {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(Digest, Vouched)>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stamp blob `d`'s files had when hashed, if `dir` (layer `chain`'s) is the
    /// directory that was hashed (and which one that is).
    fn stamp(&self, d: &Digest, chain: &ChainId, dir: &Path) -> Option<(diff::TreeStamp, DirId)> {
        let v = match &*self.slot() {
            Some((blob, v)) if blob == d => v.clone(),
            _ => return None,
        };
        (v.chain == *chain && DirId::of(dir) == Some(v.dir)).then_some((v.stamp, v.dir))
    }

    /// Records that blob `d` is what directory `dir` (layer `chain`'s) made when its files
    /// had `stamp`, unless everything was forgotten since `generation`.
    fn record(
        &self,
        d: &Digest,
        chain: ChainId,
        dir: DirId,
        stamp: diff::TreeStamp,
        generation: u64,
    ) {
        let mut slot = self.slot();
        if self.generation.load(Ordering::SeqCst) == generation {
            *slot = Some((d.clone(), Vouched { chain, dir, stamp }));
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn count(&self, by_stamps: bool) {
        let n = if by_stamps {
            &self.by_stamps
        } else {
            &self.by_hash
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets blob `d`'s stamp (its files changed).
    fn forget(&self, d: &Digest) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|(blob, _)| blob == d) {
            *slot = None;
        }
    }

    /// Forgets every stamp (a new commit's is recorded next). Reads hash again until a
    /// commit records anew.
    pub(crate) fn forget_all(&self) {
        let mut slot = self.slot();
        self.generation.fetch_add(1, Ordering::SeqCst);
        *slot = None;
    }
}

impl Store {
    /// Commits a built layer (a staged directory whose parent layer is `parent`): hashes
    /// the tar it makes (mtimes clamped to `clamp_mtime`), makes it durable and moves it
    /// into place. Returns its diff ID, chain ID and tar size; the lease keeps both the
    /// layer and its blob until an image names them.
    pub fn commit_built_layer(
        &self,
        staged: StagedLayer,
        parent: Option<&ChainId>,
        clamp_mtime: Option<i64>,
        lease: &Lease,
    ) -> Result<(DiffId, ChainId, u64)> {
        let opts = DiffOptions {
            clamp_mtime,
            exclude: Default::default(),
        };
        // The files are written back while they are hashed (the hash reads them from the
        // page cache): the tar digest is the layer's diff ID, and the one syncfs makes the
        // directory durable before anything names it (see `durable`).
        let (digest, size, stamp) = self.make_durable_sized(&staged, clamp_mtime, true)?;
        lease.blob(&digest);
        crate::failpoint::hit("commit.layer-hashed");
        let diff_id = DiffId(digest.clone());
        let chain = ChainId::next(parent, &diff_id);
        let source = TreeSource {
            chain: chain.clone(),
            clamp_mtime,
        };
        let stored = self.content.contains(&digest);
        let exists = self.layer_unpacked(&chain);
        let sourced = self
            .meta()
            .tree_blobs
            .get(&digest)
            .is_some_and(|t| t.sources.contains(&source));
        if !stored && exists && !sourced {
            // The layer exists already, made some other way (unpacked from a blob since
            // removed): its files are not known to make this tar with this clamp, so the
            // tar is written from the staged copy, as it was before built layers kept none.
            // Walked on a thread of its own (a walking thread's stack); the blob's commit
            // checks what was written against the digest.
            let mut w = std::io::BufWriter::with_capacity(1 << 20, self.content.writer()?);
            let mut tar = diff::TreeTar::unchecked(staged.diff_dir(), opts.clone())?;
            std::io::copy(&mut tar, &mut w)
                .map_err(|e| StoreError::io("write", staged.diff_dir(), e))?;
            let w = w
                .into_inner()
                .map_err(|e| StoreError::io("write", staged.diff_dir(), e.into_error()))?;
            lease.commit_blob(w, Some((&digest, Some(size))))?;
        }
        crate::failpoint::hit("commit.layer-written");
        lease.layer(&chain);
        let rec = LayerDir {
            tree: Some(digest.clone()),
            clamp_mtime,
            unhashed: false,
        };
        // Whether the staged directory is the one placed (a layer there already wins).
        let staged_id = DirId::of(&staged.diff_dir());
        self.place_layer(staged, &chain, rec, false)?;
        crate::failpoint::hit("commit.layer-moved");
        let placed = self.layer_dir(&chain).join("diff");
        // Only the newest commit stays vouched (a record holds a stamp per entry: one
        // layer's worth of them is kept); the others are hashed when read, as before they
        // were vouched.
        self.vouched_trees.forget_all();
        if let (Some(stamp), Some(id)) = (stamp, staged_id) {
            if DirId::of(&placed) == Some(id) {
                let generation = self.vouched_trees.generation();
                self.vouched_trees
                    .record(&digest, chain.clone(), id, stamp, generation);
            }
        }
        if !self.content.contains(&digest) {
            let mut meta = self.meta();
            let mut next = meta.clone();
            let rec = next
                .tree_blobs
                .entry(digest.clone())
                .or_insert_with(|| TreeBlob {
                    size,
                    sources: Vec::new(),
                });
            if !rec.sources.contains(&source) {
                rec.sources.push(source);
                self.save(&next)?;
                *meta = next;
            }
        }
        crate::failpoint::hit("commit.layer-committed");
        Ok((diff_id, chain, size))
    }

    /// How many reads of built layers' tars this store began checked by their files'
    /// stamps (the daemon hashed them at their commit; those whose stamps moved were hashed
    /// again at their end), and how many checked by their hash as they went.
    pub fn tree_reads(&self) -> (u64, u64) {
        (
            self.vouched_trees.by_stamps.load(Ordering::Relaxed),
            self.vouched_trees.by_hash.load(Ordering::Relaxed),
        )
    }

    /// Whether blob `d` can be read: stored, or made from a built layer's files.
    pub fn blob_present(&self, d: &Digest) -> bool {
        self.content.contains(d) || self.tree_source(d).is_some()
    }

    /// Whether blob `d` is a built layer's tar that exists only as the layer's files.
    pub fn blob_in_tree(&self, d: &Digest) -> bool {
        !self.content.contains(d) && self.tree_source(d).is_some()
    }

    /// The size of blob `d`, stored or made from files.
    pub fn blob_size(&self, d: &Digest) -> Result<u64> {
        match self.content.size(d) {
            Err(StoreError::BlobNotFound(_)) => match self.tree_source(d) {
                Some((t, _)) => Ok(t.size),
                None => Err(StoreError::BlobNotFound(d.clone())),
            },
            other => other,
        }
    }

    /// How blob `d` is compressed (a tar made from files is not).
    pub fn blob_compression(&self, d: &Digest) -> Result<Compression> {
        match self.content.open(d) {
            Ok(mut f) => {
                let mut head = [0u8; 8];
                let n = f
                    .read(&mut head)
                    .map_err(|e| StoreError::io("read", self.content.path(d), e))?;
                Ok(Compression::sniff(&head[..n]))
            }
            Err(StoreError::BlobNotFound(_)) if self.tree_source(d).is_some() => {
                Ok(Compression::None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads blob `d`: the stored file, or the tar made from its layer's files (verified
    /// at its end). The layer must stay while it is read: `lease` keeps it, or the caller
    /// holds the image's layers already.
    pub fn open_blob(&self, d: &Digest, lease: Option<&Lease>) -> Result<Box<dyn Read + Send>> {
        match self.content.open(d) {
            Ok(f) => Ok(Box::new(f)),
            Err(StoreError::BlobNotFound(_)) => {
                let (rec, source) = self
                    .tree_source(d)
                    .ok_or_else(|| StoreError::BlobNotFound(d.clone()))?;
                if let Some(lease) = lease {
                    lease.layer(&source.chain);
                    lease.blob(d);
                }
                let dir = self.layer_dir(&source.chain).join("diff");
                let opts = DiffOptions {
                    clamp_mtime: source.clamp_mtime,
                    exclude: Default::default(),
                };
                let tar = match self.vouched_trees.stamp(d, &source.chain, &dir) {
                    Some((stamp, id)) => {
                        self.vouched_trees.count(true);
                        let vouched = self.vouched_trees.clone();
                        let generation = vouched.generation();
                        let (digest, chain) = (d.clone(), source.chain.clone());
                        diff::TreeTar::spawn_vouched(
                            dir,
                            opts,
                            d.clone(),
                            rec.size,
                            stamp,
                            Box::new(move |now| match now {
                                // Hashed again and still the blob: vouched with the
                                // stamp the files have now.
                                Some(stamp) => {
                                    vouched.record(&digest, chain, id, stamp, generation)
                                }
                                None => vouched.forget(&digest),
                            }),
                        )?
                    }
                    None => {
                        self.vouched_trees.count(false);
                        diff::TreeTar::spawn(dir, opts, d.clone(), rec.size)?
                    }
                };
                Ok(Box::new(tar))
            }
            Err(e) => Err(e),
        }
    }

    /// The record of tree blob `d` and a source whose directory is there.
    fn tree_source(&self, d: &Digest) -> Option<(TreeBlob, TreeSource)> {
        let rec = self.meta().tree_blobs.get(d).cloned()?;
        let source = rec
            .sources
            .iter()
            .find(|s| self.layer_unpacked(&s.chain))?
            .clone();
        Some((rec, source))
    }
}
