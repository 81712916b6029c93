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
        let (digest, size) = self.make_durable_sized(&staged, clamp_mtime)?;
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
            let w = self.content.writer()?;
            let w = diff::write_layer(
                &staged.diff_dir(),
                std::io::BufWriter::with_capacity(1 << 20, w),
                &opts,
            )?;
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
        self.place_layer(staged, &chain, rec, false)?;
        crate::failpoint::hit("commit.layer-moved");
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
                Ok(Box::new(diff::TreeTar::spawn(
                    dir,
                    opts,
                    d.clone(),
                    rec.size,
                )?))
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
