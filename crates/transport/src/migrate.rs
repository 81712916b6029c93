//! Migration from isula-build 0.9.x: its images live in a containers/storage overlay store
//! (`<data_root>/storage`: `overlay-images/images.json`, `overlay-layers/layers.json`,
//! `overlay/<layer>/diff`). Each image comes across with its names and the same image ID:
//! every layer's exact tar is put together again from the layer's tar-split record
//! (`overlay-layers/<layer>.tar-split.gz`: the tar's headers and padding verbatim, with the
//! file contents taken from `diff/`), so its digest is the diff ID the config lists.
//!
//! The old store is only read, never changed. One image that cannot come across is reported
//! with the reason and the others go on.

use crate::archive::unpack_stream;
use crate::{Result, TransportError};
use isula_store::{LayerRecord, Lease, NewImage, Store, TeeReader};
use isula_sys::{Resolve, Root};
use isula_types::image::{Descriptor, ImageConfig, Manifest};
use isula_types::{limits, media, ChainId, DiffId, Digest, ImageId, Reference};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Where a containers/storage overlay store is under `data_root`, if there is one:
/// `<data_root>/storage` (isula-build's default), or the data root itself when a
/// storage.toml pointed the graph root there.
pub fn find_old_store(data_root: &Path) -> Option<PathBuf> {
    [data_root.join("storage"), data_root.to_path_buf()]
        .into_iter()
        .find(|d| d.join("overlay-images/images.json").is_file())
}

#[derive(Debug, Deserialize)]
struct OldImage {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    layer: String,
    #[serde(default, rename = "big-data-names")]
    big_data_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct OldLayer {
    id: String,
    #[serde(default)]
    parent: String,
    #[serde(default, rename = "diff-digest")]
    diff_digest: Option<String>,
}

/// What one image's migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Now in the store (its ID, and the names that came with it).
    Migrated { id: ImageId, names: Vec<String> },
    /// It could not come across.
    Failed { error: String },
}

/// One image of the old store and what happened to it.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The old store's image ID.
    pub old_id: String,
    pub names: Vec<String>,
    pub outcome: Outcome,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let f = File::open(path).map_err(|e| TransportError::io("open", path, e))?;
    if f.metadata()
        .map_err(|e| TransportError::io("stat", path, e))?
        .len()
        > limits::MANIFEST_MAX * 64
    {
        return Err(TransportError::bad(path, "too large"));
    }
    serde_json::from_reader(BufReader::new(f)).map_err(|e| TransportError::bad(path, e.to_string()))
}

/// containers/storage's file name for a big-data key: the key itself when it is made of
/// `[.0-9a-z]` only, else `=` and its base64.
fn big_data_file(key: &str) -> String {
    use base64::Engine;
    if key
        .bytes()
        .all(|b| b == b'.' || b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        key.to_string()
    } else {
        format!("={}", base64::engine::general_purpose::STANDARD.encode(key))
    }
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| TransportError::io("open", path, e))?;
    let mut data = Vec::new();
    f.take(limits::MANIFEST_MAX + 1)
        .read_to_end(&mut data)
        .map_err(|e| TransportError::io("read", path, e))?;
    if data.len() as u64 > limits::MANIFEST_MAX {
        return Err(TransportError::bad(path, "too large"));
    }
    Ok(data)
}

/// Brings every image of the containers/storage store at `old` into `store`.
pub fn migrate(store: &Store, old: &Path) -> Result<Vec<Migrated>> {
    let images: Vec<OldImage> = read_json(&old.join("overlay-images/images.json"))?;
    let layers_json = old.join("overlay-layers/layers.json");
    let layers: Vec<OldLayer> = if layers_json.is_file() {
        read_json(&layers_json)?
    } else {
        Vec::new()
    };
    let layers: HashMap<String, OldLayer> = layers.into_iter().map(|l| (l.id.clone(), l)).collect();
    let mut out = Vec::new();
    for img in images {
        let lease = store.lease();
        let outcome = match migrate_one(store, old, &img, &layers, &lease) {
            Ok((id, names)) => Outcome::Migrated { id, names },
            Err(e) => Outcome::Failed {
                error: e.to_string(),
            },
        };
        drop(lease);
        out.push(Migrated {
            old_id: img.id.clone(),
            names: img.names.clone(),
            outcome,
        });
    }
    // A failed image may have left layers or blobs that nothing names.
    if out
        .iter()
        .any(|m| matches!(m.outcome, Outcome::Failed { .. }))
    {
        if let Err(e) = store.gc() {
            tracing::warn!(error = %e, "collecting after a failed migration");
        }
    }
    Ok(out)
}

fn migrate_one(
    store: &Store,
    old: &Path,
    img: &OldImage,
    layers: &HashMap<String, OldLayer>,
    lease: &Lease,
) -> Result<(ImageId, Vec<String>)> {
    let dir = old.join("overlay-images").join(&img.id);
    // The config is the big-data item named by its digest.
    let key = img
        .big_data_names
        .iter()
        .find(|k| k.strip_prefix("sha256:") == Some(img.id.as_str()))
        .or_else(|| img.big_data_names.iter().find(|k| k.starts_with("sha256:")))
        .ok_or_else(|| TransportError::bad(&dir, "the image has no config"))?;
    let config_path = dir.join(big_data_file(key));
    let config_bytes = read_small(&config_path)?;
    let config_digest = Digest::of_bytes(&config_bytes);
    if config_digest.to_string() != *key {
        return Err(TransportError::bad(
            &config_path,
            format!("its digest is {config_digest}, not {key}"),
        ));
    }
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| TransportError::bad(&config_path, format!("image config: {e}")))?;

    // The layer chain, bottom first.
    let mut chain_ids = Vec::new();
    let mut at = img.layer.clone();
    while !at.is_empty() {
        // containers/storage allows at most 127 layers; a longer chain is a loop.
        if chain_ids.len() > 500 {
            return Err(TransportError::bad(&dir, "the layer chain does not end"));
        }
        let l = layers.get(&at).ok_or_else(|| {
            TransportError::bad(&dir, format!("layer {at} is not in layers.json"))
        })?;
        chain_ids.push(l);
        at = l.parent.clone();
    }
    chain_ids.reverse();
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != chain_ids.len() {
        return Err(TransportError::bad(
            &config_path,
            format!(
                "the config lists {} layers, the store {}",
                diff_ids.len(),
                chain_ids.len()
            ),
        ));
    }
    let chains = ChainId::chain(diff_ids);
    let mut records = Vec::new();
    let mut blobs = Vec::new();
    for (i, l) in chain_ids.iter().enumerate() {
        let want = &diff_ids[i];
        if l.diff_digest.as_deref() != Some(want.to_string().as_str()) {
            return Err(TransportError::bad(
                old.join("overlay-layers/layers.json"),
                format!(
                    "layer {}: its diff digest {:?} is not the config's {want}",
                    l.id, l.diff_digest
                ),
            ));
        }
        lease.layer(&chains[i]);
        lease.blob(want.digest());
        let size = if store.layer_present(&chains[i]) && store.content().contains(want.digest()) {
            store.content().size(want.digest())?
        } else {
            migrate_layer(store, old, &l.id, want, &chains[i], lease)?
        };
        records.push(LayerRecord {
            chain_id: chains[i].clone(),
            diff_id: want.clone(),
            parent: i.checked_sub(1).map(|p| chains[p].clone()),
            size,
        });
        blobs.push(want.digest().clone());
    }
    let config_blob = lease.put_blob(store.content(), &config_bytes)?;
    let id = ImageId(config_blob.clone());
    let (manifest_bytes, manifest_type) =
        manifest_for(&dir, &config_blob, &config_bytes, &blobs, store)?;
    let manifest = lease.put_blob(store.content(), &manifest_bytes)?;
    let mut names = Vec::new();
    let mut refs = Vec::new();
    for n in &img.names {
        match Reference::parse(n) {
            Ok(r) => {
                names.push(n.clone());
                refs.push(r);
            }
            Err(e) => {
                tracing::warn!(image = %img.id, name = %n, error = %e, "a name that is not a valid reference stays behind")
            }
        }
    }
    store.add_image(NewImage {
        id: id.clone(),
        manifest,
        manifest_media_type: manifest_type,
        blobs,
        layers: records,
        created: config.created.clone(),
        names: refs,
    })?;
    Ok((id, names))
}

/// The old manifest when it describes exactly the blobs we now hold (a committed image's
/// uncompressed layers), else a new one over them (a pulled image's manifest names
/// compressed blobs that containers/storage did not keep).
fn manifest_for(
    dir: &Path,
    config: &Digest,
    config_bytes: &[u8],
    blobs: &[Digest],
    store: &Store,
) -> Result<(Vec<u8>, String)> {
    let path = dir.join("manifest");
    if let Ok(bytes) = read_small(&path) {
        if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
            let same = m.config.digest == *config
                && m.layers.len() == blobs.len()
                && m.layers.iter().zip(blobs).all(|(d, b)| d.digest == *b);
            if same {
                let media_type = m
                    .media_type
                    .clone()
                    .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
                return Ok((bytes, media_type));
            }
        }
    }
    let mut layers = Vec::new();
    for b in blobs {
        layers.push(Descriptor::new(
            media::DOCKER_LAYER,
            b.clone(),
            store.content().size(b)?,
        ));
    }
    let m = Manifest {
        schema_version: 2,
        media_type: Some(media::DOCKER_MANIFEST.to_string()),
        config: Descriptor::new(
            media::DOCKER_CONFIG,
            config.clone(),
            config_bytes.len() as u64,
        ),
        layers,
        annotations: None,
    };
    let bytes = serde_json::to_vec(&m).map_err(|e| TransportError::bad(dir, e.to_string()))?;
    Ok((bytes, media::DOCKER_MANIFEST.to_string()))
}

/// Puts layer `id`'s tar together again, stores it as the blob `want` and unpacks it as
/// the layer `chain`. Returns the tar's size.
fn migrate_layer(
    store: &Store,
    old: &Path,
    id: &str,
    want: &DiffId,
    chain: &ChainId,
    lease: &Lease,
) -> Result<u64> {
    let split_path = old
        .join("overlay-layers")
        .join(format!("{id}.tar-split.gz"));
    let diff = old.join("overlay").join(id).join("diff");
    let reader = TarSplit::open(&split_path, &diff)?;
    let mut writer = store.content().writer()?;
    let unpacked = {
        let mut tee = TeeReader {
            inner: reader,
            sink: &mut writer,
        };
        let unpacked =
            unpack_stream(store, &mut tee, false).map_err(|e| TransportError::bad(&diff, e))?;
        io::copy(&mut tee, &mut io::sink()).map_err(|e| TransportError::io("read", &diff, e))?;
        unpacked
    };
    let (blob, size) = lease.commit_blob(writer, None)?;
    if blob != *want.digest() {
        return Err(TransportError::bad(
            &split_path,
            format!("layer {id} put together again is {blob}, not {want}"),
        ));
    }
    let unpacked = unpacked.with_diff_id(&blob);
    if let Some(staged) = unpacked.staged {
        store.commit_layer(staged, chain, lease)?;
    }
    Ok(size)
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    payload: Option<String>,
}

/// The tar stream a tar-split record describes: segments verbatim, file contents read from
/// the layer's diff directory (opened beneath it, never through a symlink).
struct TarSplit {
    lines: BufReader<flate2::read::GzDecoder<File>>,
    root: Root,
    diff: PathBuf,
    line: String,
    pending: io::Cursor<Vec<u8>>,
    /// The file being read, and its path for errors.
    file: Option<(io::Take<File>, PathBuf)>,
}

impl TarSplit {
    fn open(split: &Path, diff: &Path) -> Result<TarSplit> {
        let f = File::open(split).map_err(|e| TransportError::io("open", split, e))?;
        let root = Root::open(diff)
            .map_err(|e| TransportError::io("open", diff, io::Error::other(e.to_string())))?;
        Ok(TarSplit {
            lines: BufReader::new(flate2::read::GzDecoder::new(f)),
            root,
            diff: diff.to_path_buf(),
            line: String::new(),
            pending: io::Cursor::new(Vec::new()),
            file: None,
        })
    }

    /// Loads the next entry; false at the end of the record.
    fn next_entry(&mut self) -> io::Result<bool> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        loop {
            self.line.clear();
            if self.lines.read_line(&mut self.line)? == 0 {
                return Ok(false);
            }
            if self.line.trim().is_empty() {
                continue;
            }
            let e: Entry = serde_json::from_str(&self.line).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("tar-split: {e}"))
            })?;
            match e.kind {
                2 => {
                    let raw = b64.decode(e.payload.unwrap_or_default()).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("tar-split: {e}"))
                    })?;
                    self.pending = io::Cursor::new(raw);
                    return Ok(true);
                }
                1 if e.size == 0 => continue,
                1 => {
                    let name: Vec<u8> = match (e.name_raw, e.name) {
                        (Some(raw), _) => b64.decode(raw).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("tar-split: {e}"))
                        })?,
                        (None, Some(n)) => n.into_bytes(),
                        (None, None) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "tar-split: a file entry without a name",
                            ))
                        }
                    };
                    use std::os::unix::ffi::OsStrExt;
                    let rel = Path::new(std::ffi::OsStr::from_bytes(&name));
                    let fd = self
                        .root
                        .open_at(
                            rel,
                            Resolve::NoSymlinks,
                            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK,
                            rustix::fs::Mode::empty(),
                        )
                        .map_err(|err| {
                            io::Error::other(format!("{}: {err}", self.diff.join(rel).display()))
                        })?;
                    let f = File::from(fd);
                    if !f.metadata()?.is_file() {
                        return Err(io::Error::other(format!(
                            "{}: not a regular file",
                            self.diff.join(rel).display()
                        )));
                    }
                    self.file = Some((f.take(e.size), self.diff.join(rel)));
                    // A file shorter than its header says is caught in read().
                    self.pending = io::Cursor::new(Vec::new());
                    return Ok(true);
                }
                k => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("tar-split: unknown entry type {k}"),
                    ))
                }
            }
        }
    }
}

impl Read for TarSplit {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((f, path)) = self.file.as_mut() {
                let want = f.limit();
                let n = f.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if want > 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} is shorter than the layer's tar-split record says",
                            path.display()
                        ),
                    ));
                }
                self.file = None;
            }
            let n = self.pending.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if !self.next_entry()? {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_data_names_as_containers_storage_spells_them() {
        assert_eq!(big_data_file("manifest"), "manifest");
        assert_eq!(
            big_data_file("sha256:ab"),
            format!("={}", {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode("sha256:ab")
            })
        );
    }
}
