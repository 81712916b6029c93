//! One pass over an image archive (docker-archive or oci-archive, not yet known which).
//! Each regular file is classified by its first bytes: a tar or compressed stream is a
//! candidate layer, written to the content store and checked as an unpack would check it
//! at the same time (hashing both the blob and the uncompressed diff as they stream); small
//! files (manifests, configs, index.json) are kept in memory within a fixed budget;
//! anything else is skipped. Which files really are layers is only known from the manifest
//! at the end; the layers then stay packed (their blobs, leased) until a build needs their
//! directories.

use crate::{Result, TransportError};
use isula_store::apply::{apply_layer, validate_layer};
use isula_store::compression::{decompress, Compression};
use isula_store::{HashingReader, Lease, StagedLayer, Store, TeeReader};
use isula_types::{DiffId, Digest};
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Small non-layer files kept in memory: each at most this big...
pub const SMALL_FILE_MAX: u64 = isula_types::limits::MANIFEST_MAX;
/// ...and all of them together at most this much.
pub const SMALL_TOTAL_MAX: u64 = 64 << 20;

pub struct Unpacked {
    pub diff_id: DiffId,
    pub size: u64,
    pub staged: Option<StagedLayer>,
    pub skipped_devices: Vec<String>,
}

pub struct LayerEntry {
    pub blob: Digest,
    pub blob_size: u64,
    pub compression: Compression,
    /// The unpacked layer, or why it could not be unpacked.
    pub unpacked: std::result::Result<Unpacked, String>,
}

pub enum Entry {
    Small(Vec<u8>),
    Layer(LayerEntry),
    Other,
}

pub struct Scanned {
    pub source: PathBuf,
    entries: HashMap<String, Entry>,
    links: HashMap<String, String>,
}

/// Normalises an archive member name: no leading `./` or `/`, no `.` components. `..` is kept
/// so that lookups of such names simply fail.
pub fn normalize(name: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl Scanned {
    fn resolve(&self, name: &str) -> Option<String> {
        let mut n = normalize(name);
        for _ in 0..8 {
            if self.entries.contains_key(&n) {
                return Some(n);
            }
            n = self.links.get(&n)?.clone();
        }
        None
    }

    pub fn small(&self, name: &str) -> Option<&[u8]> {
        match self.entries.get(&self.resolve(name)?)? {
            Entry::Small(b) => Some(b),
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// How the layer member stored as `blob` was compressed, if one was.
    pub fn blob_compression(&self, blob: &Digest) -> Option<Compression> {
        self.entries.values().find_map(|e| match e {
            Entry::Layer(l) if &l.blob == blob => Some(l.compression),
            _ => None,
        })
    }

    pub fn layer(&self, name: &str) -> Option<&LayerEntry> {
        match self.entries.get(&self.resolve(name)?)? {
            Entry::Layer(l) => Some(l),
            _ => None,
        }
    }

    /// Lines of devices skipped while unpacking, for the user.
    pub fn skipped_devices(&self) -> Vec<String> {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::Layer(LayerEntry {
                    unpacked: Ok(u), ..
                }) => Some(u.skipped_devices.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// Reads the whole archive once. Layer-like members become blobs (leased) and staged layers.
pub fn scan<R: Read>(store: &Store, reader: R, source: &Path, lease: &Lease) -> Result<Scanned> {
    let mut scanned = Scanned {
        source: source.to_path_buf(),
        entries: HashMap::new(),
        links: HashMap::new(),
    };
    let mut small_total = 0u64;
    let mut archive = tar::Archive::new(reader);
    let bad = |e: io::Error| -> TransportError {
        if crate::is_cancelled(&e) || e.kind() == io::ErrorKind::FileTooLarge {
            TransportError::io("read", source, e)
        } else {
            TransportError::bad(source, format!("not a valid tar archive: {e}"))
        }
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::Symlink || kind == tar::EntryType::Link {
            if let Ok(Some(target)) = entry.link_name() {
                let target = target.to_string_lossy().to_string();
                let resolved = if kind == tar::EntryType::Symlink && !target.starts_with('/') {
                    let dir = Path::new(&name)
                        .parent()
                        .map(|p| p.to_string_lossy().to_string())
                        .unwrap_or_default();
                    normalize(&format!("{dir}/{target}"))
                } else {
                    normalize(&target)
                };
                scanned.links.insert(name, resolved);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let mut head = vec![0u8; size.min(512) as usize];
        entry.read_exact(&mut head).map_err(bad)?;
        let compression = Compression::sniff(&head);
        let looks_tar =
            head.len() == 512 && (&head[257..262] == b"ustar" || head.iter().all(|b| *b == 0));
        if compression != Compression::None || looks_tar {
            let layer = scan_layer(
                store,
                io::Cursor::new(head).chain(&mut entry),
                compression,
                lease,
            )
            .map_err(|e| TransportError::io("read", source.join(&name), e))?;
            scanned.entries.insert(name, Entry::Layer(layer));
        } else if size <= SMALL_FILE_MAX {
            small_total += size;
            if small_total > SMALL_TOTAL_MAX {
                return Err(TransportError::bad(
                    source,
                    "too many small files in archive",
                ));
            }
            let mut data = head;
            entry.read_to_end(&mut data).map_err(bad)?;
            scanned.entries.insert(name, Entry::Small(data));
        } else {
            scanned.entries.insert(name, Entry::Other);
        }
    }
    Ok(scanned)
}

/// Stores one candidate layer as a blob while unpacking it. I/O errors on the archive
/// itself are returned; a member that is not a usable layer is recorded, not an error.
fn scan_layer<R: Read>(
    store: &Store,
    raw: R,
    compression: Compression,
    lease: &Lease,
) -> io::Result<LayerEntry> {
    let mut writer = store.content().writer().map_err(io::Error::other)?;
    let mut tee = TeeReader {
        inner: raw,
        sink: &mut writer,
    };
    // An uncompressed layer's blob digest is its diff ID: the blob writer's hash serves both.
    // Nothing is unpacked yet: a loaded layer stays packed until a build needs it or the
    // machine is idle.
    let unpacked = match compression {
        Compression::None => check_stream(&mut tee, false),
        Compression::Gzip | Compression::Zstd => check_stream(&mut tee, true),
        other => Err(format!(
            "{} compressed layers are not supported",
            other.name()
        )),
    };
    // Whatever the unpack did not read still belongs to the blob.
    io::copy(&mut tee, &mut io::sink())?;
    let (blob, blob_size) = lease.commit_blob(writer, None).map_err(io::Error::other)?;
    let unpacked = unpacked.map(|u| u.with_diff_id(&blob));
    Ok(LayerEntry {
        blob,
        blob_size,
        compression,
        unpacked,
    })
}

/// A layer unpacked from a stream whose diff ID may still be pending (see `unpack_stream`).
pub struct UnpackedStream {
    diff_id: Option<DiffId>,
    size: u64,
    /// None when the layer was only checked (it stays packed).
    staged: Option<StagedLayer>,
    skipped_devices: Vec<String>,
}

impl UnpackedStream {
    /// Completes the record; `blob` is the digest of the uncompressed stream when the
    /// unpack did not hash it itself.
    pub fn with_diff_id(self, blob: &Digest) -> Unpacked {
        Unpacked {
            diff_id: self.diff_id.unwrap_or_else(|| DiffId(blob.clone())),
            size: self.size,
            staged: self.staged,
            skipped_devices: self.skipped_devices,
        }
    }
}

/// Counts the bytes that pass, and drains the rest on `finish` (tar padding counts too).
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads a (possibly compressed) layer stream through `take` (an unpack or a check) and to
/// its end. With `hash`, the uncompressed stream is hashed for the diff ID; without, the
/// caller already hashes exactly that stream (an uncompressed blob being stored) and
/// supplies it.
fn consume_layer<R: Read>(
    raw: R,
    hash: bool,
    staged: Option<StagedLayer>,
    take: impl FnOnce(&mut dyn Read) -> isula_store::Result<isula_store::apply::ApplyReport>,
) -> std::result::Result<UnpackedStream, String> {
    let (_, plain) = decompress(raw).map_err(|e| e.to_string())?;
    let layer_err = |e: io::Error| format!("layer data: {e}");
    let (diff_id, size, report) = if hash {
        let mut hashing = HashingReader::new(plain);
        let report = take(&mut hashing).map_err(|e| e.to_string())?;
        io::copy(&mut hashing, &mut io::sink()).map_err(layer_err)?;
        let (digest, size) = hashing.finish().map_err(layer_err)?;
        (Some(DiffId(digest)), size, report)
    } else {
        let mut counting = Counting {
            inner: plain,
            count: 0,
        };
        let report = take(&mut counting).map_err(|e| e.to_string())?;
        io::copy(&mut counting, &mut io::sink()).map_err(layer_err)?;
        (None, counting.count, report)
    };
    Ok(UnpackedStream {
        diff_id,
        size,
        staged,
        skipped_devices: report.skipped_devices,
    })
}

/// Unpacks a (possibly compressed) layer stream into a new staged layer (`hash` as in
/// [`consume_layer`]).
pub fn unpack_stream<R: Read>(
    store: &Store,
    raw: R,
    hash: bool,
) -> std::result::Result<UnpackedStream, String> {
    let staged = store.stage_layer().map_err(|e| e.to_string())?;
    let dest = staged.diff_dir();
    consume_layer(raw, hash, Some(staged), |r| apply_layer(r, &dest))
}

/// [`unpack_stream`] without the unpack: the layer is checked as the unpack would check
/// it, hashed (with `hash`) and counted, and nothing is written; it stays packed.
pub fn check_stream<R: Read>(raw: R, hash: bool) -> std::result::Result<UnpackedStream, String> {
    consume_layer(raw, hash, None, |r| validate_layer(r))
}

/// A stored layer blob read again: checked (`unpack` false) or unpacked.
fn reread_blob(store: &Store, blob: &Digest, unpack: bool) -> Result<Unpacked> {
    let f = io::BufReader::new(store.content().open(blob)?);
    let read = if unpack {
        unpack_stream(store, f, true)
    } else {
        check_stream(f, true)
    };
    read.map(|u| u.with_diff_id(blob))
        .map_err(|e| TransportError::bad(store.content().path(blob), e))
}

/// Checks and hashes a stored layer blob as [`check_stream`] does (nothing unpacked).
pub fn check_blob(store: &Store, blob: &Digest) -> Result<Unpacked> {
    reread_blob(store, blob, false)
}

/// Unpacks a stored blob again (when one archive member backs two different chains).
pub fn unpack_blob(store: &Store, blob: &Digest) -> Result<Unpacked> {
    reread_blob(store, blob, true)
}
