//! The store's one durability rule, kept in one place: a record (an image, a layer, a
//! cache record, a name, a layer's "unpacked" state) is written only after the data it
//! points at is on the disk. Blobs are fsynced by their writer (`content`) and records by
//! `metadata`; layer directories are made durable here. A layer kept packed is durable
//! through its blob; its directory becomes the layer's source of truth only once it is
//! durable: written back all at once (one `syncfs`, which writes back the file system's
//! dirty files and directories and commits its journal: a layer of thousands of files
//! costs one journal commit, not one fsync each), renamed into `layers/` and then recorded
//! in `metadata.json`'s `dirs`, in the same write that drops its packed mark. A directory
//! under `layers/` that has no record is a commit a power cut interrupted: start-up
//! removes it, and a packed layer is unpacked again from its blob.
//!
//! It also checks what it promises (`--check-store`): every recorded directory must make
//! again the tar digest recorded for it (a built layer's is its diff ID, taken at commit;
//! an imported or unpacked one's is taken in idle time, and until then, as for a directory
//! of an older store, the directory is compared with a fresh unpack of its blob); one that
//! does not, or is gone, is made again from a stored blob holding the layer (verified
//! against the diff ID as it is read), and named with the images that use it when no blob
//! holds it.

use crate::diff::{self, DiffOptions};
use crate::error::{Result, StoreError};
use crate::metadata::LayerDir;
use crate::{compression, content, phase, ImageRecord, Lease, StagedLayer, Store};
use isula_types::{ChainId, DiffId, Digest};
use std::collections::BTreeSet;
use std::fs;

/// What `--check-store` verified, repaired and found wrong.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Blobs re-hashed.
    pub blobs: usize,
    /// Layer directories re-hashed.
    pub layers: usize,
    /// Bytes hashed, blobs and layer tars together.
    pub bytes: u64,
    /// Damaged layer directories made again from a blob, one line each.
    pub repaired: Vec<String>,
    /// What could not be verified or repaired (empty when the store is sound).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Nothing was wrong: no problem, nothing repaired.
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty() && self.repaired.is_empty()
    }
}

/// What one layer directory was found to be.
enum Verdict {
    Sound,
    /// Sound (a built layer's files make its diff ID), and now known to make this tar.
    Learned(LayerDir),
    /// Not what was committed: why.
    Damaged(String),
    /// No digest recorded (not hashed yet, or from an older store) and not a built layer:
    /// only its blob can say.
    Unknown,
}

/// What repairing a layer directory did.
enum Repair {
    /// Made again from this blob, in place of what was there (which differed so).
    MadeFrom(Digest, String),
    /// What was there (no digest recorded) holds the same files as its blob: kept, and its
    /// digest recorded.
    Confirmed,
    /// No stored blob holds the layer.
    NoBlob,
}

impl Store {
    /// Whether layer `chain` has a durable, recorded directory.
    pub fn layer_unpacked(&self, chain: &ChainId) -> bool {
        self.meta().dirs.contains_key(chain)
    }

    /// Makes a staged layer durable and moves it into place as `chain`; a copy is discarded
    /// when the layer has a directory already. The lease keeps it until an image names it.
    pub fn commit_layer(&self, staged: StagedLayer, chain: &ChainId, lease: &Lease) -> Result<()> {
        lease.layer(chain);
        if self.layer_unpacked(chain) {
            return Ok(()); // staged is dropped and removed
        }
        // Only the sync waits. The tar digest `--check-store` compares with is taken when
        // the daemon is idle, and only if no stored blob holds the layer: else the check
        // compares the directory with that blob (once; it records the digest then).
        staged.remove_work()?;
        {
            let _sync = phase::Phase::start("commit: sync the layer's files");
            staged.sync()?;
        }
        crate::failpoint::hit("commit.layer-durable");
        let rec = LayerDir {
            tree: None,
            clamp_mtime: None,
            unhashed: true,
        };
        self.place_layer(staged, chain, rec, false)?;
        self.queue_job(crate::Job::Hash(chain.clone()));
        Ok(())
    }

    /// Layer directories committed without their tar digest that no stored blob holds.
    pub(crate) fn dirs_to_hash(&self) -> Vec<ChainId> {
        let unhashed: Vec<ChainId> = self
            .meta()
            .dirs
            .iter()
            .filter(|(_, r)| r.unhashed)
            .map(|(c, _)| c.clone())
            .collect();
        unhashed
            .into_iter()
            .filter(|c| !self.held_by_a_blob(c))
            .collect()
    }

    /// Whether a stored blob holds layer `chain`: then its directory needs no tar digest of
    /// its own (taking one reads every file again: 0.8 s of CPU per 400 MB). `--check-store`
    /// compares such a directory with the blob, once, and records the digest then.
    fn held_by_a_blob(&self, chain: &ChainId) -> bool {
        self.diff_id_of(chain)
            .is_some_and(|d| !self.blobs_holding(chain, &d).is_empty())
    }

    /// Records the tar digest of a directory committed without it (background work).
    pub(crate) fn hash_in_background(&self, chain: &ChainId) {
        let lease = self.background_lease();
        lease.layer(chain);
        let unhashed = self.meta().dirs.get(chain).is_some_and(|r| r.unhashed);
        if !unhashed || self.held_by_a_blob(chain) {
            return;
        }
        let _phase = phase::Phase::start("idle: hash a layer directory");
        let dir = self.layer_dir(chain).join("diff");
        match diff::hash_layer(&dir, &DiffOptions::default()) {
            Ok((tree, _)) => {
                let mut meta = self.meta();
                if !meta.dirs.get(chain).is_some_and(|r| r.unhashed) {
                    return;
                }
                let mut next = meta.clone();
                next.dirs.insert(
                    chain.clone(),
                    LayerDir {
                        tree: Some(tree),
                        clamp_mtime: None,
                        unhashed: false,
                    },
                );
                match self.save(&next) {
                    Ok(()) => *meta = next,
                    Err(e) => {
                        tracing::warn!(layer = %chain, error = %e, "recording a layer's tar digest")
                    }
                }
            }
            // Gone meanwhile (its image removed), or unreadable: the check will say.
            Err(e) => tracing::debug!(layer = %chain, error = %e, "hashing a layer directory"),
        }
    }

    /// Writes a staged layer's files and directories back to the disk and meanwhile (they
    /// are read from the page cache) hashes the tar they make with `clamp`: the digest
    /// `--check-store` makes again. Returns that digest, the tar's size and, with `stamp`,
    /// the files' stamp as they were hashed.
    pub(crate) fn make_durable_sized(
        &self,
        staged: &StagedLayer,
        clamp: Option<i64>,
        stamp: bool,
    ) -> Result<(Digest, u64, Option<diff::TreeStamp>)> {
        staged.remove_work()?;
        let opts = DiffOptions {
            clamp_mtime: clamp,
            exclude: Default::default(),
        };
        let diff_dir = staged.diff_dir();
        let (hashed, synced) = std::thread::scope(|s| {
            let sync = s.spawn(|| {
                let _sync = phase::Phase::start("commit: sync the layer's files");
                staged.sync()
            });
            let mut hashing = phase::Phase::start("commit: hash the layer tar");
            let hashed = if stamp {
                diff::hash_layer_stamped(&diff_dir, &opts).map(|(d, n, s)| (d, n, Some(s)))
            } else {
                diff::hash_layer(&diff_dir, &opts).map(|(d, n)| (d, n, None))
            };
            if let Ok((_, size, _)) = &hashed {
                hashing.add_bytes(*size);
            }
            drop(hashing);
            let synced = sync.join().unwrap_or_else(|_| {
                Err(StoreError::from(isula_sys::SysError::io(
                    "syncfs",
                    &diff_dir,
                    std::io::Error::other("the syncing thread panicked"),
                )))
            });
            (hashed, synced)
        });
        let hashed = hashed?;
        synced?;
        Ok(hashed)
    }

    fn make_durable(&self, staged: &StagedLayer) -> Result<Digest> {
        self.make_durable_sized(staged, None, false)
            .map(|(d, _, _)| d)
    }

    /// Moves a durable staged layer into place as `chain` and records its directory, in the
    /// same write that drops a packed mark (the directory is the layer's source of truth
    /// from now on). With `replace` (a repair) a directory already there goes; otherwise a
    /// recorded one wins and the staged copy is discarded. A directory there without a
    /// record is never trusted: it goes too.
    pub(crate) fn place_layer(
        &self,
        mut staged: StagedLayer,
        chain: &ChainId,
        rec: LayerDir,
        replace: bool,
    ) -> Result<()> {
        let _one = self.placing.lock().unwrap_or_else(|p| p.into_inner());
        if !replace && self.layer_unpacked(chain) {
            return Ok(());
        }
        let _phase = phase::Phase::start("layer commit");
        let dest = self.layer_dir(chain);
        let layers = self.root.join("layers");
        let old = if fs::symlink_metadata(&dest).is_ok() {
            let trash = self.temp_dir()?;
            let to = trash.join("old");
            fs::rename(&dest, &to).map_err(|e| StoreError::io("rename", &dest, e))?;
            Some(trash)
        } else {
            None
        };
        if let Err(e) = fs::rename(&staged.dir, &dest) {
            // What was there goes back (a repair that cannot be put in place loses nothing).
            if let Some(old) = &old {
                if let Err(back) = fs::rename(old.join("old"), &dest) {
                    tracing::warn!(dir = %dest.display(), error = %back, "putting a layer directory back");
                }
            }
            return Err(StoreError::io("rename", &dest, e));
        }
        staged.committed = true;
        isula_sys::fsync_dir(&layers)?;
        crate::failpoint::hit("commit.layer-placed");
        {
            let mut meta = self.meta();
            let mut next = meta.clone();
            next.dirs.insert(chain.clone(), rec);
            next.packed.remove(chain);
            self.save(&next)?;
            *meta = next;
        }
        if let Some(old) = old {
            if let Err(e) = isula_sys::rooted::remove_tree(&old) {
                tracing::warn!(dir = %old.display(), error = %e, "removing a replaced layer directory");
            }
        }
        Ok(())
    }

    /// A store written before directories were recorded: makes every layer directory it
    /// has durable now (one syncfs) and records it, its tar digest unknown until
    /// `--check-store` learns it. Returns how many were recorded.
    pub(crate) fn record_older_dirs(&self) -> Result<usize> {
        if self.meta().dirs_recorded {
            return Ok(0);
        }
        isula_sys::syncfs(&self.root)?;
        let layers = self.root.join("layers");
        let mut found = Vec::new();
        for ent in fs::read_dir(&layers).map_err(|e| StoreError::io("read", &layers, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &layers, e))?;
            let chain = ent
                .file_name()
                .to_str()
                .and_then(|h| Digest::from_hex(h).ok())
                .map(ChainId);
            if let Some(chain) = chain {
                if ent.path().join("diff").is_dir() {
                    found.push(chain);
                }
            }
        }
        let mut meta = self.meta();
        let mut next = meta.clone();
        for chain in &found {
            next.dirs.insert(
                chain.clone(),
                LayerDir {
                    tree: None,
                    clamp_mtime: None,
                    unhashed: false,
                },
            );
        }
        next.dirs_recorded = true;
        self.save(&next)?;
        *meta = next;
        Ok(found.len())
    }

    /// Re-verifies every blob's digest and every layer directory against what was committed,
    /// makes a damaged directory again from a blob holding its layer, and checks that every
    /// image's blobs and layers are present. The daemon runs it for `--check-store`, while
    /// no operation runs.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for d in self.content.list()? {
            report.blobs += 1;
            report.bytes += self.content.size(&d).unwrap_or(0);
            if let Err(e) = self.content.verify(&d) {
                report
                    .problems
                    .push(format!("blob {d}: {e}; used by {}", self.blob_users(&d)));
            }
        }
        let lease = self.lease();
        for (chain, why) in self.check_layer_dirs(&mut report)? {
            lease.layer(&chain);
            match self.repair_layer(&chain, &lease) {
                Ok(Repair::MadeFrom(blob, differs)) => report.repaired.push(format!(
                    "layer {chain}: {why} ({differs}); made again from blob {blob}"
                )),
                Ok(Repair::Confirmed) => {}
                Ok(Repair::NoBlob) => report.problems.push(format!(
                    "layer {chain}: {why}, and no stored blob holds it to repair it from; used by {}",
                    self.users_of(&chain)
                )),
                Err(e) => report.problems.push(format!(
                    "layer {chain}: {why}; repairing it from its blob failed: {e}; used by {}",
                    self.users_of(&chain)
                )),
            }
        }
        drop(lease);
        let meta = self.meta().clone();
        for img in meta.images.values() {
            for b in &img.blobs {
                if !self.blob_present(b) {
                    report
                        .problems
                        .push(format!("image {}: blob {b} is missing", img.id));
                }
            }
            for b in [&img.manifest, img.id.digest()] {
                if !self.content.contains(b) {
                    report
                        .problems
                        .push(format!("image {}: blob {b} is missing", img.id));
                }
            }
            for l in &img.layers {
                if !meta.layers.contains_key(l) {
                    report
                        .problems
                        .push(format!("image {}: layer record {l} is missing", img.id));
                }
            }
            for a in meta.attestations.get(&img.id).into_iter().flatten() {
                if !self.content.contains(&a.blob) {
                    report.problems.push(format!(
                        "image {}: {} attestation blob {} is missing",
                        img.id, a.predicate_type, a.blob
                    ));
                }
            }
        }
        report.problems.extend(self.cache.check(self));
        Ok(report)
    }

    /// Re-hashes every recorded layer directory; returns the damaged ones (and layers an
    /// image or cache record needs that have neither a directory nor a packed blob), each
    /// with what is wrong.
    fn check_layer_dirs(&self, report: &mut CheckReport) -> Result<Vec<(ChainId, String)>> {
        let _phase = phase::Phase::start("check: layer directories");
        let (dirs, needed) = {
            let meta = self.meta();
            let (cache_layers, _) = self.cache.roots();
            let needed: BTreeSet<ChainId> = meta
                .images
                .values()
                .flat_map(|i| i.layers.iter().cloned())
                .chain(cache_layers.into_iter().map(|l| l.chain_id))
                .collect();
            (meta.dirs.clone(), needed)
        };
        let mut damaged = Vec::new();
        for (chain, rec) in &dirs {
            report.layers += 1;
            match self.verify_dir(chain, rec, &mut report.bytes) {
                Verdict::Sound => {}
                Verdict::Learned(rec) => self.record_dir(chain, rec)?,
                Verdict::Damaged(why) => damaged.push((chain.clone(), why)),
                Verdict::Unknown => {
                    // Made again from its blob and compared; replaced if it differs.
                    let what = if rec.unhashed {
                        "not hashed yet, compared with its blob"
                    } else {
                        "a directory from an older store, compared with its blob"
                    };
                    damaged.push((chain.clone(), what.to_string()))
                }
            }
        }
        for chain in needed {
            if dirs.contains_key(&chain) {
                continue;
            }
            let packed = self.meta().packed.get(&chain).cloned();
            match packed {
                Some(b) if self.content.contains(&b) => {}
                _ => damaged.push((chain, "its directory is missing".to_string())),
            }
        }
        Ok(damaged)
    }

    fn verify_dir(&self, chain: &ChainId, rec: &LayerDir, bytes: &mut u64) -> Verdict {
        let diff_dir = self.layer_dir(chain).join("diff");
        if !diff_dir.is_dir() {
            return Verdict::Damaged("its directory is missing".to_string());
        }
        let hash = |clamp: Option<i64>, bytes: &mut u64| {
            let opts = DiffOptions {
                clamp_mtime: clamp,
                exclude: Default::default(),
            };
            diff::hash_layer(&diff_dir, &opts).map(|(d, size)| {
                *bytes += size;
                d
            })
        };
        match &rec.tree {
            Some(tree) => match hash(rec.clamp_mtime, bytes) {
                Ok(d) if &d == tree => Verdict::Sound,
                Ok(d) => Verdict::Damaged(format!(
                    "its files make tar {d}, not {tree} as when it was committed"
                )),
                Err(e) => Verdict::Damaged(format!("reading its files: {e}")),
            },
            None => {
                // A built layer's files make its diff ID, with the clamp it was made with.
                let Some(diff_id) = self.diff_id_of(chain) else {
                    return Verdict::Unknown;
                };
                let mut clamps = vec![None];
                if let Some(t) = self.meta().tree_blobs.get(diff_id.digest()) {
                    clamps.extend(
                        t.sources
                            .iter()
                            .filter(|s| &s.chain == chain && s.clamp_mtime.is_some())
                            .map(|s| s.clamp_mtime),
                    );
                }
                for clamp in clamps {
                    match hash(clamp, bytes) {
                        Ok(d) if &d == diff_id.digest() => {
                            return Verdict::Learned(LayerDir {
                                tree: Some(d),
                                clamp_mtime: clamp,
                                unhashed: false,
                            })
                        }
                        Ok(_) => {}
                        Err(e) => return Verdict::Damaged(format!("reading its files: {e}")),
                    }
                }
                Verdict::Unknown
            }
        }
    }

    fn record_dir(&self, chain: &ChainId, rec: LayerDir) -> Result<()> {
        let mut meta = self.meta();
        let mut next = meta.clone();
        next.dirs.insert(chain.clone(), rec);
        self.save(&next)?;
        *meta = next;
        Ok(())
    }

    /// The diff ID of layer `chain`, from its image record or a cache stage record.
    fn diff_id_of(&self, chain: &ChainId) -> Option<DiffId> {
        if let Some(l) = self.meta().layers.get(chain) {
            return Some(l.diff_id.clone());
        }
        let (cache_layers, _) = self.cache.roots();
        cache_layers
            .into_iter()
            .find(|l| &l.chain_id == chain)
            .map(|l| l.diff_id)
    }

    /// Stored blobs that may hold layer `chain` (diff ID `diff_id`): its uncompressed tar,
    /// that tar's gzip and zstd, its packed blob, and the layer blobs images and cache records
    /// name beside it.
    fn blobs_holding(&self, chain: &ChainId, diff_id: &DiffId) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::new();
        {
            let meta = self.meta();
            out.push(diff_id.digest().clone());
            for forms in [
                &meta.compressed,
                &meta.compressed_zstd,
                &meta.compressed_zstd_chunked,
            ] {
                if let Some(form) = forms.get(diff_id.digest()) {
                    out.push(form.digest.clone());
                }
            }
            if let Some(b) = meta.packed.get(chain) {
                out.push(b.clone());
            }
            for img in meta.images.values() {
                for (i, c) in img.layers.iter().enumerate() {
                    if c == chain {
                        out.extend(img.blobs.get(i).cloned());
                    }
                }
            }
        }
        for (_, r) in self.cache.records() {
            if let Some(s) = r.stage {
                for (i, l) in s.layers.iter().enumerate() {
                    if &l.chain_id == chain {
                        out.extend(s.blobs.get(i).cloned());
                    }
                }
            }
        }
        let mut seen = BTreeSet::new();
        out.retain(|d| seen.insert(d.clone()) && self.content.contains(d));
        out
    }

    /// Makes layer `chain` again from a stored blob that holds it (its tar verified against
    /// the diff ID as it is unpacked) and puts it in place of what is there, unless what is
    /// there makes the same tar.
    fn repair_layer(&self, chain: &ChainId, lease: &Lease) -> Result<Repair> {
        let Some(diff_id) = self.diff_id_of(chain) else {
            return Ok(Repair::NoBlob);
        };
        for blob in self.blobs_holding(chain, &diff_id) {
            lease.blob(&blob);
            let staged = self.stage_layer()?;
            match self.unpack_verified(&blob, &diff_id, &staged) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(layer = %chain, %blob, error = %e, "a blob that should hold the layer does not");
                    continue;
                }
            }
            let tree = self.make_durable(&staged)?;
            let rec = LayerDir {
                tree: Some(tree.clone()),
                clamp_mtime: None,
                unhashed: false,
            };
            // A directory from an older store holding the same files is sound after all.
            // Directories the tar does not list are made at unpack time, so their mtimes
            // differ from one unpack to the next: those are not compared, and what the
            // directory makes is recorded as it is.
            let there = self.layer_dir(chain).join("diff");
            let differs = if there.is_dir() {
                first_difference(&there, &staged.diff_dir(), std::path::Path::new(""))
            } else {
                Some("it is missing".to_string())
            };
            let older = self
                .meta()
                .dirs
                .get(chain)
                .is_some_and(|r| r.tree.is_none());
            if differs.is_none() && older {
                let (tree, _) = diff::hash_layer(&there, &DiffOptions::default())?;
                let rec = LayerDir {
                    tree: Some(tree),
                    clamp_mtime: None,
                    unhashed: false,
                };
                self.record_dir(chain, rec)?;
                return Ok(Repair::Confirmed);
            }
            let differs = differs.unwrap_or_else(|| "it was not recorded".to_string());
            self.place_layer(staged, chain, rec, true)?;
            return Ok(Repair::MadeFrom(blob, differs));
        }
        Ok(Repair::NoBlob)
    }

    /// Unpacks `blob` into `staged`, failing unless its tar is `diff_id`.
    fn unpack_verified(&self, blob: &Digest, diff_id: &DiffId, staged: &StagedLayer) -> Result<()> {
        let path = self.content.path(blob);
        let (_, plain) = compression::decompress(std::io::BufReader::with_capacity(
            1 << 20,
            self.content.open(blob)?,
        ))
        .map_err(|e| StoreError::io("read", &path, e))?;
        let mut hashing = content::HashingReader::new(plain);
        crate::apply::apply_layer(&mut hashing, &staged.diff_dir())?;
        let (actual, _) = hashing
            .finish()
            .map_err(|e| StoreError::io("read", &path, e))?;
        if &actual != diff_id.digest() {
            return Err(StoreError::DiffIdMismatch {
                expected: diff_id.clone(),
                actual: DiffId(actual),
            });
        }
        Ok(())
    }

    /// The images that use layer `chain`, by name (or ID when unnamed), for a message.
    fn users_of(&self, chain: &ChainId) -> String {
        self.images_that(
            |i| i.layers.contains(chain),
            "no image (a build cache record)",
        )
    }

    /// The images that use blob `d` (as a layer, manifest or config), for a problem report.
    fn blob_users(&self, d: &Digest) -> String {
        self.images_that(
            |i| i.blobs.contains(d) || i.manifest == *d || i.id.digest() == d,
            "no image",
        )
    }

    fn images_that(&self, uses: impl Fn(&ImageRecord) -> bool, none: &str) -> String {
        let meta = self.meta();
        let users: Vec<String> = meta
            .images
            .values()
            .filter(|i| uses(i))
            .map(|i| {
                i.names
                    .first()
                    .map(|n| crate::familiar(n))
                    .unwrap_or_else(|| i.id.to_string())
            })
            .collect();
        if users.is_empty() {
            none.to_string()
        } else {
            format!("image(s) {}", users.join(", "))
        }
    }
}

/// The first difference between two layer directories (`a` as found, `b` as its blob makes
/// it) under `rel`, in the order a layer tar lists them: what a repair says it repaired.
/// Directory mtimes are not compared (an unpack sets those the tar does not list to now).
fn first_difference(
    a: &std::path::Path,
    b: &std::path::Path,
    rel: &std::path::Path,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let names = |d: &std::path::Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = fs::read_dir(d.join(rel))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    if let Some(n) = nb.iter().find(|n| !na.contains(n)) {
        return Some(format!("{} is missing", rel.join(n).display()));
    }
    if let Some(n) = na.iter().find(|n| !nb.contains(n)) {
        return Some(format!("{} should not be there", rel.join(n).display()));
    }
    for n in &na {
        let r = rel.join(n);
        let (pa, pb) = (a.join(&r), b.join(&r));
        let (Ok(ma), Ok(mb)) = (fs::symlink_metadata(&pa), fs::symlink_metadata(&pb)) else {
            return Some(format!("{} cannot be read", r.display()));
        };
        let what = if ma.file_type() != mb.file_type() {
            Some("its type")
        } else if ma.mode() != mb.mode() {
            Some("its mode")
        } else if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            Some("its owner")
        } else if !ma.is_dir() && ma.mtime() != mb.mtime() {
            Some("its mtime")
        } else if ma.is_file() && ma.len() != mb.len() {
            Some("its size")
        } else if ma.is_file() && fs::read(&pa).ok() != fs::read(&pb).ok() {
            Some("its content")
        } else if ma.file_type().is_symlink() && fs::read_link(&pa).ok() != fs::read_link(&pb).ok()
        {
            Some("its target")
        } else {
            None
        };
        if let Some(what) = what {
            return Some(format!("{}: {what} differs", r.display()));
        }
        if ma.is_dir() {
            if let Some(d) = first_difference(a, b, &r) {
                return Some(d);
            }
        }
    }
    None
}
