//! The build cache shared through a registry: `--cache-to` exports the records of a
//! build's steps with their snapshots, `--cache-from` lets another daemon import the
//! records it needs, one at a time, fetching only the blobs of those.
//!
//! The format (ours; documented in the README) is one OCI image manifest under a tag:
//!
//! ```text
//! manifest  application/vnd.oci.image.manifest.v1+json
//! ├── config  application/vnd.isula-build.cache.config.v1+json
//! │           {"schema":1,"records":[{key, parent, description,
//! │                                   snapshot?: {digest, size},
//! │                                   stage?: {config: "<exact config JSON>",
//! │                                            layers: [{diff_id, blob, size}]}}]}
//! └── layers  every snapshot and stage layer, as gzip tars in OCI form
//!             (application/vnd.oci.image.layer.v1.tar+gzip), or zstd ones
//!             (application/vnd.oci.image.layer.v1.tar+zstd) when the export asks for
//!             zstd (`--compression zstd`, or the daemon's `compression`); an import reads
//!             either, whatever the records say, by the blob's first bytes
//! ```
//!
//! A step's snapshot goes as a layer tar of its own changes (overlay whiteouts become
//! `.wh.` entries and come back as whiteouts). A stage record carries its image config
//! verbatim (so an imported full hit gives the same image ID) and the blobs of all its
//! layers. Auth, TLS, mirrors and `insecure` come from the registry configuration, as for
//! pull and push.

use crate::client::Client;
use crate::error::{RegistryError, Result};
use crate::pull::{fetch_blob, fetch_unpacked, get_manifest};
use crate::push::{put_manifest, send_blob};
use crate::{resolve, Context};
use isula_store::cache::{Record, StageRecord};
use isula_store::compression::{Compression, ZSTD_LEVEL};
use isula_store::diff::{write_layer, DiffOptions};
use isula_store::{LayerRecord, Lease, Store};
use isula_transport::{Cancel, Progress};
use isula_types::compression::{Codec, LayerCompression};
use isula_types::image::{Descriptor, Manifest};
use isula_types::{limits, media, ChainId, DiffId, Digest, Reference};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// The media type of the records blob (the manifest's config).
pub const CONFIG_TYPE: &str = "application/vnd.isula-build.cache.config.v1+json";
/// The export's schema: 2 once it holds a step written as a tar (`written_as_tar`), which
/// a reader of schema 1 would take for a step that changed no files (it refuses the cache
/// instead); 1 otherwise. Both are read.
const SCHEMA: u32 = 2;
const SCHEMA_WITHOUT_TARS: u32 = 1;
/// The records blob is read into memory: at most this big.
const CONFIG_MAX: u64 = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Exported {
    schema: u32,
    records: Vec<Entry>,
    /// `RUN --mount=type=cache` contents (`--cache-to REF --cache-mounts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<MountEntry>,
}

/// One exported cache mount: its id and its files as a gzip tar.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MountEntry {
    id: String,
    blob: Blob,
}

/// The most bytes (on disk, before compression) of cache mounts one export takes: a mount
/// that would go past it is left out, and the output says so.
pub const CACHE_MOUNTS_EXPORT_MAX: u64 = 4 << 30;

/// A cache mount a build used: its id and its directory (`<dataroot>/cache-mounts/<hex>`,
/// holding `data/` and the `lock` builds take).
pub struct MountDir {
    pub id: String,
    pub dir: std::path::PathBuf,
}

/// One exported record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    key: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<Digest>,
    description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stage: Option<Stage>,
    /// A step that wrote its layer as a tar: `stage` holds it (see
    /// `isula_store::cache::TarWritten`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    written_as_tar: Option<isula_store::cache::TarWritten>,
}

impl Entry {
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }
    pub fn has_stage(&self) -> bool {
        self.stage.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Blob {
    digest: Digest,
    size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stage {
    /// The stage's image config, byte for byte.
    config: String,
    layers: Vec<Layer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layer {
    diff_id: DiffId,
    blob: Digest,
    size: u64,
}

fn gzip_desc(digest: &Digest, size: u64) -> Descriptor {
    Descriptor::new(media::OCI_LAYER_GZIP, digest.clone(), size)
}

/// The form of a stored layer blob in the asked compression (itself when it is stored so
/// already), made and kept beside the layer's other forms when there is none.
fn compressed_form(
    store: &Store,
    blob: &Digest,
    how: LayerCompression,
    lease: &Lease,
) -> Result<(Digest, u64)> {
    let stored = match how.codec {
        Codec::Gzip => Compression::Gzip,
        Codec::Zstd | Codec::ZstdChunked => Compression::Zstd,
    };
    if store.blob_compression(blob)? == stored {
        lease.blob(blob);
        return Ok((blob.clone(), store.content().size(blob)?));
    }
    Ok(store.compressed_blob(blob, how, lease)?)
}

fn layer_desc(codec: Codec, digest: &Digest, size: u64) -> Descriptor {
    let media_type = match codec {
        Codec::Gzip => media::OCI_LAYER_GZIP,
        Codec::Zstd | Codec::ZstdChunked => media::OCI_LAYER_ZSTD,
    };
    Descriptor::new(media_type, digest.clone(), size)
}

/// A snapshot directory as a compressed layer blob in the content store (leased).
fn snapshot_blob(
    store: &Store,
    dir: &std::path::Path,
    how: LayerCompression,
    lease: &Lease,
) -> Result<(Digest, u64)> {
    let io = |e: std::io::Error| isula_store::StoreError::io("compress", dir, e);
    let w = store.content().writer()?;
    let w = match how.codec {
        Codec::Gzip => {
            let level = isula_store::compression::gzip_level(how.level);
            let gz = isula_store::pgzip::ParallelGzip::new(w, level).map_err(io)?;
            let buffered = std::io::BufWriter::with_capacity(1 << 20, gz);
            let buffered = write_layer(dir, buffered, &DiffOptions::default())?;
            let gz = buffered.into_inner().map_err(|e| io(e.into_error()))?;
            gz.finish().map_err(io)?
        }
        // The cache's snapshots go as plain zstd (no reader fetches a cache layer's files
        // one by one).
        Codec::Zstd | Codec::ZstdChunked => {
            let enc = isula_store::compression::parallel_zstd(w, how.level.unwrap_or(ZSTD_LEVEL))
                .map_err(io)?;
            let buffered = std::io::BufWriter::with_capacity(1 << 20, enc);
            let buffered = write_layer(dir, buffered, &DiffOptions::default())?;
            let enc = buffered.into_inner().map_err(|e| io(e.into_error()))?;
            enc.finish().map_err(io)?
        }
    };
    Ok(lease.commit_blob(w, None)?)
}

fn parse_ref(name: &str) -> Result<Reference> {
    Reference::parse(name).map_err(|e| RegistryError::Invalid(format!("cache {name:?}: {e}")))
}

/// What an export sent.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub digest: Digest,
    pub records: usize,
    pub blobs: usize,
}

/// Exports the records `keys` (a build's steps and stage results, in order; keys the
/// local cache does not have are left out), and the contents of the cache mounts
/// `mounts`, to the tag `dest`, their layers compressed as `how` says.
#[allow(clippy::too_many_arguments)]
pub fn export(
    ctx: &Context,
    store: &Store,
    keys: &[Digest],
    mounts: &[MountDir],
    dest: &str,
    how: LayerCompression,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<ExportReport> {
    let r = parse_ref(dest)?;
    if r.digest().is_some() {
        return Err(RegistryError::Invalid(format!(
            "cache {dest:?}: export to a tag, not a digest"
        )));
    }
    resolve::check_policy(ctx.policy.as_ref(), &r)?;
    let client = ctx.client(resolve::push_endpoint(&ctx.registries, &r)?)?;
    let repo = r.path().to_string();
    let tag = r.tag().unwrap_or("latest").to_string();
    let lease = store.lease();
    let mut entries = Vec::new();
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut seen_keys = HashSet::new();
    for key in keys {
        if !seen_keys.insert(key.clone()) {
            continue;
        }
        cancel.check().map_err(|_| RegistryError::Cancelled)?;
        let Some(rec) = store.cache().get(key, &lease) else {
            continue;
        };
        let snapshot = match &rec.snapshot {
            Some(id) => {
                let (digest, size) =
                    snapshot_blob(store, &store.cache().snapshot_dir(id), how, &lease)?;
                blobs.push((digest.clone(), size));
                Some(Blob { digest, size })
            }
            None => None,
        };
        let stage = match &rec.stage {
            Some(s) => {
                let raw = store
                    .content()
                    .read_small(&s.config, limits::MANIFEST_MAX)?;
                let config = String::from_utf8(raw).map_err(|_| {
                    RegistryError::Invalid(format!("stage config {} is not UTF-8", s.config))
                })?;
                let mut layers = Vec::new();
                for (l, b) in s.layers.iter().zip(&s.blobs) {
                    let (blob, size) = compressed_form(store, b, how, &lease)?;
                    blobs.push((blob.clone(), size));
                    layers.push(Layer {
                        diff_id: l.diff_id.clone(),
                        blob,
                        size,
                    });
                }
                Some(Stage { config, layers })
            }
            None => None,
        };
        entries.push(Entry {
            key: key.clone(),
            parent: rec.parent.clone(),
            description: rec.description.clone(),
            snapshot,
            stage,
            written_as_tar: rec.written_as_tar,
        });
    }
    let records = entries.len();
    let exported_mounts = export_mounts(store, mounts, how, &lease, &mut blobs, cancel, progress)?;
    let mut unique = HashSet::new();
    blobs.retain(|(d, _)| unique.insert(d.clone()));
    progress(format!("Exporting build cache to {dest}\n"));
    for (d, _) in &blobs {
        cancel.check().map_err(|_| RegistryError::Cancelled)?;
        progress(format!("Copying blob {d}\n"));
        send_blob(&client, store, &repo, d, &[], cancel)?;
    }
    let schema = if entries.iter().any(|e| e.written_as_tar.is_some()) {
        SCHEMA
    } else {
        SCHEMA_WITHOUT_TARS
    };
    let config = serde_json::to_vec(&Exported {
        schema,
        records: entries,
        mounts: exported_mounts,
    })
    .map_err(|e| RegistryError::Invalid(format!("encoding the cache records: {e}")))?;
    let config_digest = lease.put_blob(store.content(), &config)?;
    progress(format!("Copying config {config_digest}\n"));
    send_blob(&client, store, &repo, &config_digest, &[], cancel)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        config: Descriptor::new(CONFIG_TYPE, config_digest, config.len() as u64),
        layers: blobs
            .iter()
            .map(|(d, s)| layer_desc(how.codec, d, *s))
            .collect(),
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| RegistryError::Invalid(format!("encoding the cache manifest: {e}")))?;
    progress("Writing manifest to image destination\n".into());
    let digest = put_manifest(&client, &repo, &tag, &bytes, media::OCI_MANIFEST)
        .map_err(|e| crate::push::refused_zstd(&client, &bytes, e))?;
    Ok(ExportReport {
        digest,
        records,
        blobs: blobs.len(),
    })
}

/// The cache mounts as gzip tars (leased, added to `blobs`): each while no build holds it
/// (its lock taken), within [`CACHE_MOUNTS_EXPORT_MAX`] in all.
fn export_mounts(
    store: &Store,
    mounts: &[MountDir],
    how: LayerCompression,
    lease: &Lease,
    blobs: &mut Vec<(Digest, u64)>,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Vec<MountEntry>> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for m in mounts {
        cancel.check().map_err(|_| RegistryError::Cancelled)?;
        let data = m.dir.join("data");
        if !data.is_dir() {
            continue;
        }
        // Held while it is read: no build writes it meanwhile.
        let _lock = match isula_sys::lock::FileLock::try_exclusive(&m.dir.join("lock")) {
            Ok(l) => l,
            Err(e) if isula_sys::lock::is_held_elsewhere(&e) => {
                progress(format!(
                    "Not exporting cache mount id={}: another build is using it\n",
                    m.id
                ));
                continue;
            }
            Err(e) => {
                return Err(RegistryError::Invalid(format!(
                    "cache mount id={}: {e}",
                    m.id
                )))
            }
        };
        let size = isula_store::cache::disk_usage(&data);
        if total.saturating_add(size) > CACHE_MOUNTS_EXPORT_MAX {
            progress(format!(
                "Not exporting cache mount id={} ({}): over the {} cap of an export\n",
                m.id,
                isula_types::human_size(size),
                isula_types::human_size(CACHE_MOUNTS_EXPORT_MAX)
            ));
            continue;
        }
        total += size;
        progress(format!("Exporting cache mount id={}\n", m.id));
        let (digest, size) = snapshot_blob(store, &data, how, lease)?;
        blobs.push((digest.clone(), size));
        out.push(MountEntry {
            id: m.id.clone(),
            blob: Blob { digest, size },
        });
    }
    Ok(out)
}

/// One `--cache-from` source: its records, read once; blobs are fetched on import.
pub struct Source {
    name: String,
    client: Client,
    repo: String,
    records: HashMap<Digest, Entry>,
    mounts: HashMap<String, Blob>,
}

/// Reads the records of the cache `name` (mirrors first, as for pull).
pub fn open(ctx: &Context, store: &Store, name: &str, cancel: &Cancel) -> Result<Source> {
    let r = parse_ref(name)?;
    resolve::check_policy_unsigned(ctx.policy.as_ref(), &r)?;
    let wanted = match r.digest() {
        Some(d) => d.to_string(),
        None => r.tag().unwrap_or("latest").to_string(),
    };
    let mut last = None;
    for source in resolve::pull_sources(&ctx.registries, &r)? {
        let attempt = (|| {
            let client = ctx.client(source.endpoint.clone())?;
            let repo = source.reference.path().to_string();
            let fetched = get_manifest(&client, &repo, &wanted)?;
            read_records(store, client, repo, name, &fetched.bytes, cancel)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e @ RegistryError::Cancelled) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| RegistryError::Invalid(format!("cache {name:?}: no source"))))
}

fn read_records(
    store: &Store,
    client: Client,
    repo: String,
    name: &str,
    manifest: &[u8],
    cancel: &Cancel,
) -> Result<Source> {
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: format!("build cache {name}"),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(manifest).map_err(|e| bad(e.to_string()))?;
    if manifest.config.media_type != CONFIG_TYPE {
        return Err(RegistryError::Unsupported {
            registry: client.host().to_string(),
            what: name.to_string(),
            reason: format!(
                "not an isula-build cache (its config is {})",
                manifest.config.media_type
            ),
        });
    }
    if manifest.config.size > CONFIG_MAX {
        return Err(bad(format!(
            "records of {} bytes are over the limit",
            manifest.config.size
        )));
    }
    let lease = store.lease();
    fetch_blob(&client, &repo, &manifest.config, store, &lease, cancel)?;
    let raw = store
        .content()
        .read_small(&manifest.config.digest, CONFIG_MAX)?;
    let exported: Exported = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    if exported.schema != SCHEMA && exported.schema != SCHEMA_WITHOUT_TARS {
        return Err(bad(format!(
            "schema {} (this isula-builder reads {SCHEMA})",
            exported.schema
        )));
    }
    Ok(Source {
        name: name.to_string(),
        client,
        repo,
        records: exported
            .records
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect(),
        mounts: exported
            .mounts
            .into_iter()
            .map(|m| (m.id, m.blob))
            .collect(),
    })
}

impl Source {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn entry(&self, key: &Digest) -> Option<&Entry> {
        self.records.get(key)
    }

    /// Whether the source exported the cache mount `id`.
    pub fn has_mount(&self, id: &str) -> bool {
        self.mounts.contains_key(id)
    }

    /// Unpacks what the source exported of the cache mount `id` into the directory `into`
    /// (new and empty). Returns whether it had one.
    pub fn seed_mount(
        &self,
        store: &Store,
        id: &str,
        into: &std::path::Path,
        cancel: &Cancel,
    ) -> Result<bool> {
        let Some(b) = self.mounts.get(id) else {
            return Ok(false);
        };
        let lease = store.lease();
        let desc = gzip_desc(&b.digest, b.size);
        if !store.content().contains(&b.digest) {
            fetch_blob(&self.client, &self.repo, &desc, store, &lease, cancel)?;
        }
        lease.blob(&b.digest);
        let blob = store.open_blob(&b.digest, Some(&lease))?;
        let (_, plain) = isula_store::compression::decompress(std::io::BufReader::new(blob))
            .map_err(|e| isula_store::StoreError::io("read", into, e))?;
        isula_store::apply::extract_into(plain, into)?;
        Ok(true)
    }

    /// Makes the record `key` local: its snapshot downloaded and unpacked, or its stage's
    /// config stored and missing layers downloaded and unpacked; then recorded in the local
    /// cache (kept in memory until the cache persists, like any new record).
    pub fn import(
        &self,
        store: &Store,
        key: &Digest,
        lease: &Lease,
        cancel: &Cancel,
    ) -> Result<()> {
        let Some(e) = self.records.get(key) else {
            return Err(RegistryError::Invalid(format!(
                "cache {} has no record {key}",
                self.name
            )));
        };
        let started = std::time::Instant::now();
        let mut record = Record::under(e.parent.clone(), &e.description);
        record.written_as_tar = e.written_as_tar;
        if let Some(b) = &e.snapshot {
            let unpacked = fetch_unpacked(
                store,
                &self.client,
                &self.repo,
                &gzip_desc(&b.digest, b.size),
                lease,
                cancel,
            )?;
            let staged = unpacked.staged.ok_or_else(|| {
                RegistryError::Invalid(format!("snapshot {} unpacked to nothing", b.digest))
            })?;
            let (id, size) = store.adopt_snapshot(staged, lease)?;
            record.snapshot = Some(id);
            record.size = size;
        }
        if let Some(s) = &e.stage {
            let diff_ids: Vec<DiffId> = s.layers.iter().map(|l| l.diff_id.clone()).collect();
            // The config must describe the layers the record brings (it becomes an image's).
            let parsed: isula_types::image::ImageConfig =
                serde_json::from_str(&s.config).map_err(|err| RegistryError::BadContent {
                    registry: self.client.host().to_string(),
                    what: format!("build cache {}", self.name),
                    reason: format!("stage config of {key}: {err}"),
                })?;
            if parsed.rootfs.diff_ids != diff_ids {
                return Err(RegistryError::BadContent {
                    registry: self.client.host().to_string(),
                    what: format!("build cache {}", self.name),
                    reason: format!("stage config of {key} lists other layers than its record"),
                });
            }
            let config = lease.put_blob(store.content(), s.config.as_bytes())?;
            let chains = ChainId::chain(&diff_ids);
            let mut layers = Vec::new();
            for (i, l) in s.layers.iter().enumerate() {
                cancel.check().map_err(|_| RegistryError::Cancelled)?;
                let desc = gzip_desc(&l.blob, l.size);
                lease.layer(&chains[i]);
                lease.blob(&l.blob);
                let size = if store.has_layer(&chains[i]) {
                    if !store.content().contains(&l.blob) {
                        fetch_blob(&self.client, &self.repo, &desc, store, lease, cancel)?;
                    }
                    store.layer_known(&chains[i])?.size
                } else {
                    let u = fetch_unpacked(store, &self.client, &self.repo, &desc, lease, cancel)?;
                    if u.diff_id != l.diff_id {
                        return Err(RegistryError::BadContent {
                            registry: self.client.host().to_string(),
                            what: format!("build cache {}", self.name),
                            reason: format!(
                                "layer {} is {}, the record says {}",
                                l.blob, u.diff_id, l.diff_id
                            ),
                        });
                    }
                    let size = u.size;
                    if let Some(staged) = u.staged {
                        store.commit_layer(staged, &chains[i], lease)?;
                    }
                    if i + 1 == s.layers.len() {
                        record.size = size;
                    }
                    size
                };
                layers.push(LayerRecord {
                    parent: i.checked_sub(1).map(|p| chains[p].clone()),
                    chain_id: chains[i].clone(),
                    diff_id: l.diff_id.clone(),
                    size,
                });
            }
            record.stage = Some(StageRecord {
                config,
                layers,
                blobs: s.layers.iter().map(|l| l.blob.clone()).collect(),
            });
        }
        store.cache().put(key, record)?;
        tracing::debug!(cache = %self.name, %key, elapsed = ?started.elapsed(), "cache record imported");
        Ok(())
    }
}
