//! Image and layer records, kept in one JSON document (`metadata.json`) that is replaced
//! atomically (temp file, fsync, rename, fsync dir) on every change, so a crash leaves
//! either the old or the new state and an image is listed only once it is complete.

use crate::error::{Result, StoreError};
use isula_types::compression::Codec;
use isula_types::{ChainId, DiffId, Digest, ImageId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 1;

/// One unpacked layer (`layers/<chain>/diff`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub chain_id: ChainId,
    pub diff_id: DiffId,
    pub parent: Option<ChainId>,
    /// Size of the uncompressed layer tar.
    pub size: u64,
}

/// One image: its config digest is its ID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    /// Full, normalised references (`docker.io/library/busybox:latest`).
    pub names: Vec<String>,
    pub manifest: Digest,
    pub manifest_media_type: String,
    /// Layer blobs in manifest order.
    pub blobs: Vec<Digest>,
    /// Chain IDs, bottom first.
    pub layers: Vec<ChainId>,
    /// `created` from the config (RFC 3339), if it had one.
    pub created: Option<String>,
    /// Sum of the uncompressed layer tar sizes.
    pub size: u64,
}

/// One attestation of an image (`build --sbom`, `--provenance`, or pulled with it): the
/// predicate's JSON, kept as a blob. Its in-toto statement is made when the image leaves
/// the store (push, oci-archive), over the manifest as it leaves (a push may change it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttestationRecord {
    pub predicate_type: String,
    pub blob: Digest,
    pub size: u64,
}

/// One compressed form (gzip or zstd) of a stored layer blob, made once (gzip at commit or
/// first push, zstd at the first push that asks for it) and kept so pushes never compress
/// the same layer the same way twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressedBlob {
    pub digest: Digest,
    pub size: u64,
    /// What the layer's descriptor must carry (a zstd:chunked form's table positions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A built layer's blob, never written: its tar is made again from the layer's files
/// (the same bytes each time, verified against the digest) whenever it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeBlob {
    /// Size of the tar.
    pub size: u64,
    /// Layers whose files make the tar, each with the mtime clamp it was made with.
    pub sources: Vec<TreeSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeSource {
    pub chain: ChainId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamp_mtime: Option<i64>,
}

/// A layer directory the store trusts: its files and directories reached the disk before
/// this record was written (see `durable`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDir {
    /// The digest of the tar the directory makes (`diff::hash_layer` with `clamp_mtime`),
    /// which `--check-store` makes again: a built layer's diff ID, or taken in idle time
    /// after the commit. None: not taken yet (`unhashed`), or a directory kept from a store
    /// older than these records; checked against its diff ID or its blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamp_mtime: Option<i64>,
    /// Committed (durable) without its tar digest. Idle time records it if no stored blob
    /// holds the layer; until then `--check-store` compares the directory with its blob, as
    /// a directory of an older store, and records it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unhashed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Metadata {
    pub schema: u32,
    pub images: BTreeMap<ImageId, ImageRecord>,
    pub layers: BTreeMap<ChainId, LayerRecord>,
    /// Uncompressed layer blob → its gzip blob.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compressed: BTreeMap<Digest, CompressedBlob>,
    /// Stored layer blob (uncompressed, or gzip) → its zstd blob, kept beside the gzip one
    /// and collected with it. Absent from stores written before zstd pushes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compressed_zstd: BTreeMap<Digest, CompressedBlob>,
    /// Stored layer blob → its zstd:chunked blob (with its annotations), kept beside the
    /// others and collected with them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compressed_zstd_chunked: BTreeMap<Digest, CompressedBlob>,
    /// Layers kept as their blob alone for now (loaded ones), with that blob: the
    /// directory is made when a build first needs it, or when the machine is idle.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packed: BTreeMap<ChainId, Digest>,
    /// Built layers' blobs kept as the layers' files alone (no tar on disk).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tree_blobs: BTreeMap<Digest, TreeBlob>,
    /// Layer directories made durable before they were named here: the only ones the
    /// store uses. A directory under `layers/` without a record is a commit a crash
    /// interrupted, removed at start-up (a packed layer is then unpacked again).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dirs: BTreeMap<ChainId, LayerDir>,
    /// Each image's attestations (absent from stores written before them). They live and
    /// go with their image.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attestations: BTreeMap<ImageId, Vec<AttestationRecord>>,
    /// Whether `dirs` is kept: false in a store written before it, whose directories are
    /// made durable and recorded when it is opened.
    #[serde(default)]
    pub dirs_recorded: bool,
}

impl Metadata {
    pub fn load(path: &Path) -> Result<Metadata> {
        Ok(
            load_versioned(path, SCHEMA_VERSION, |m: &Metadata| m.schema)?.unwrap_or(Metadata {
                schema: SCHEMA_VERSION,
                dirs_recorded: true,
                ..Default::default()
            }),
        )
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_json(path, self)
    }

    /// The forms of each codec: stored layer blob → its blob in that codec.
    pub fn forms(&self, codec: Codec) -> &BTreeMap<Digest, CompressedBlob> {
        match codec {
            Codec::Gzip => &self.compressed,
            Codec::Zstd => &self.compressed_zstd,
            Codec::ZstdChunked => &self.compressed_zstd_chunked,
        }
    }

    pub fn forms_mut(&mut self, codec: Codec) -> &mut BTreeMap<Digest, CompressedBlob> {
        match codec {
            Codec::Gzip => &mut self.compressed,
            Codec::Zstd => &mut self.compressed_zstd,
            Codec::ZstdChunked => &mut self.compressed_zstd_chunked,
        }
    }

    /// The image a full reference names.
    pub fn image_by_name(&self, name: &str) -> Option<&ImageRecord> {
        self.images
            .values()
            .find(|i| i.names.iter().any(|n| n == name))
    }
}

/// Reads a JSON document that carries a schema version (`schema_of` reads it): None when
/// the file does not exist, an error naming the file when it is malformed or of another
/// schema.
pub(crate) fn load_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    schema: u32,
    schema_of: impl Fn(&T) -> u32,
) -> Result<Option<T>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    let corrupt = |reason: String| StoreError::CorruptMetadata {
        path: path.to_path_buf(),
        reason,
    };
    let value: T = serde_json::from_slice(&data).map_err(|e| corrupt(e.to_string()))?;
    let found = schema_of(&value);
    if found != schema {
        return Err(corrupt(format!("schema version {found} is not {schema}")));
    }
    Ok(Some(value))
}

/// Replaces `path` with `value` as JSON, atomically and durably.
pub(crate) fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec(value).map_err(|e| StoreError::io("encode", path, e.into()))?,
    )
}

/// Replaces `path` with `data` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_with(path, &mut |w| w.write_all(data))
}

/// [`write_atomic`] for data written as it is made (a large record is never whole in
/// memory).
pub fn write_atomic_with(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    replace_file(path, write, true)
}

/// Replaces `path` by a rename, without waiting for the disk: for records that only save
/// time (a crash may lose the newest version, never leave a torn one in its place, and a
/// record that does not parse is treated as absent).
pub fn replace_unsynced(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    replace_file(path, write, false)
}

fn replace_file(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    durable: bool,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{:08x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u32>()
    ));
    let result = (|| {
        let f = fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
        write(&mut w).map_err(|e| StoreError::io("write", &tmp, e))?;
        let f = w
            .into_inner()
            .map_err(|e| StoreError::io("write", &tmp, e.into_error()))?;
        if durable {
            f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
        }
        fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
        if durable {
            isula_sys::fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
