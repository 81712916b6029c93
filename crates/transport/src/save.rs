//! `ctr-img save`: writes images to a docker-archive or oci-archive. The archive is written
//! to a temporary file beside the destination and renamed into place without replacing
//! anything, so the file appears complete or not at all.

use crate::{
    copy_lines, docker_archive, oci_archive, Cancel, Guarded, Progress, Result, TransportError,
};
use isula_store::compression::decompress;
use isula_store::content::Stamp;
use isula_store::{ImageRecord, LayerRecord, Store, StoreError};
use isula_types::{DiffId, Digest, Reference};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "" | "docker" => Ok(Format::Docker),
            "oci" => Ok(Format::Oci),
            other => Err(TransportError::Invalid(format!(
                "wrong image format {other:?} provided: expected docker or oci"
            ))),
        }
    }
}

/// One image to save and the tags it is saved under.
pub struct SaveItem {
    pub image: ImageRecord,
    pub tags: Vec<Reference>,
}

/// Saves `names` (references or IDs) to `dest`.
pub fn save(
    store: &Store,
    files: &dyn crate::ClientFiles,
    names: &[String],
    dest: &Path,
    format: Format,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<()> {
    let mut items: Vec<SaveItem> = Vec::new();
    for name in names {
        let image = store.resolve(name)?;
        let tag = Reference::parse(name)
            .ok()
            .filter(|r| image.names.contains(&r.to_string()));
        add_item(&mut items, image, tag);
    }
    save_items(store, files, items, dest, format, cancel, progress)
}

/// Adds `image` to `items` under `tag`: once per image, with all its tags.
pub fn add_item(items: &mut Vec<SaveItem>, image: ImageRecord, tag: Option<Reference>) {
    match items.iter_mut().find(|i| i.image.id == image.id) {
        Some(item) => item.tags.extend(tag),
        None => items.push(SaveItem {
            image,
            tags: tag.into_iter().collect(),
        }),
    }
}

/// Saves `items` (each under its tags) to `dest`.
pub fn save_items(
    store: &Store,
    files: &dyn crate::ClientFiles,
    items: Vec<SaveItem>,
    dest: &Path,
    format: Format,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<()> {
    if items.is_empty() {
        return Err(TransportError::Invalid(
            "save needs at least one image".into(),
        ));
    }
    if files.exists(dest) {
        return Err(TransportError::Exists(dest.to_path_buf()));
    }
    if format == Format::Oci && items.len() > 1 {
        return Err(TransportError::Invalid(
            "an oci-archive holds one image only: save the images one by one, or use -f docker"
                .into(),
        ));
    }
    let records: Vec<&ImageRecord> = items.iter().map(|i| &i.image).collect();
    write_archive(store, files, &records, dest, progress, |store, out| {
        match format {
            Format::Docker => docker_archive::write(store, &items, out, cancel),
            Format::Oci => oci_archive::write(store, &items[0], out, cancel),
        }
        .map(|_| ())
    })?;
    // "Save success with image: [NAMES]" is the client's line (isula-build's client prints it).
    Ok(())
}

/// Saves the images of a manifest list as one oci-archive whose index names the list (an
/// OCI image index with each image's platform), as BuildKit's OCI exporter writes one.
pub fn save_index(
    store: &Store,
    files: &dyn crate::ClientFiles,
    images: &[(ImageRecord, isula_types::image::Platform)],
    name: Option<&Reference>,
    dest: &Path,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<()> {
    if files.exists(dest) {
        return Err(TransportError::Exists(dest.to_path_buf()));
    }
    let records: Vec<&ImageRecord> = images.iter().map(|(i, _)| i).collect();
    write_archive(store, files, &records, dest, progress, |store, out| {
        oci_archive::write_index(store, images, name, out, cancel).map(|_| ())
    })
}

/// Writes an archive of `images` to `dest` with `write`: the images are leased while it
/// runs, and the file appears complete or not at all.
fn write_archive(
    store: &Store,
    files: &dyn crate::ClientFiles,
    images: &[&ImageRecord],
    dest: &Path,
    progress: Progress<'_>,
    write: impl FnOnce(&Store, &mut dyn crate::ArchiveSink) -> Result<()>,
) -> Result<()> {
    let lease = store.lease();
    for image in images {
        for b in image
            .blobs
            .iter()
            .chain([&image.manifest, image.id.digest()])
        {
            lease.blob(b);
        }
        for l in &image.layers {
            lease.layer(l);
        }
    }
    // An image could have been removed between resolve and lease.
    for image in images {
        store.image(&image.id)?;
    }
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let sys = |op: &'static str, e: isula_sys::SysError| {
        if e.errno() == Some(17) {
            TransportError::Exists(dest.to_path_buf())
        } else {
            TransportError::io(op, dest, e.source)
        }
    };
    // Nameless until complete: a crash or cancel leaves no partial file behind.
    let mut pending = files.create_pending(dir).map_err(|e| sys("create", e))?;
    {
        // The archive's bytes as live progress (layers uncompressed: about their sum).
        let mut seen = std::collections::HashSet::new();
        let total: u64 = images
            .iter()
            .flat_map(|i| &i.layers)
            .filter(|l| seen.insert(*l))
            .filter_map(|l| store.layer(l).ok())
            .map(|l| l.size)
            .sum();
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        // Written behind: the fsync before the archive gets its name waits only for the
        // last few MiB.
        let file = isula_sys::WriteBehind::new(pending.file());
        let mut reporting =
            crate::progress::Reporting::new(file, &mut *progress, &name, "Saving", total);
        {
            let mut out = FileSink {
                out: BufWriter::with_capacity(1 << 20, &mut reporting),
            };
            let phase = isula_store::phase::Phase::start("save: write the archive");
            write(store, &mut out)?;
            drop(phase);
            let FileSink { out } = out;
            out.into_inner()
                .map_err(|e| TransportError::io("write", dest, e.into_error()))?;
        }
        reporting.finish();
    }
    // Linked into place with the caller's identity: the destination path is resolved again
    // here, and a caller must never get root to resolve it (a swapped parent directory
    // would put the archive wherever root can write).
    files.persist(pending, dest).map_err(|e| sys("save", e))?;
    for image in images {
        copy_lines(progress, &image.blobs, image.id.digest());
    }
    Ok(())
}

/// The archive file a save writes: written through a buffer, or (a stored blob's bytes)
/// copied into it by the kernel from the blob's file.
struct FileSink<'r, 'f, 'p> {
    out: BufWriter<
        &'r mut crate::progress::Reporting<'p, isula_sys::WriteBehind<&'f mut std::fs::File>>,
    >,
}

impl Write for FileSink<'_, '_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl crate::ArchiveSink for FileSink<'_, '_, '_> {
    fn copy_from(&mut self, src: &std::fs::File, offset: u64, len: u64) -> io::Result<bool> {
        self.out.flush()?;
        let reporting = self.out.get_mut();
        if !reporting.inner.copy_from(src, offset, len)? {
            return Ok(false);
        }
        reporting.count(usize::try_from(len).unwrap_or(usize::MAX));
        Ok(true)
    }
}

fn header(name: &str, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    // Names here are short and ASCII (digests), so set_path cannot fail on length.
    let _ = h.set_path(name);
    h.set_cksum();
    h
}

pub(crate) fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
    mtime: u64,
) -> Result<()> {
    tar.append(&header(name, data.len() as u64, mtime), data)
        .map_err(|e| TransportError::io("write", name, e))
}

/// Copies `size` bytes of `src` into `out` by [`crate::ArchiveSink::copy_from`], 64 MiB at a
/// time with `cancel` checked between. False, having written nothing, if `out` cannot.
fn splice<W: crate::ArchiveSink>(
    out: &mut W,
    src: &std::fs::File,
    size: u64,
    cancel: &Cancel,
) -> io::Result<bool> {
    const PIECE: u64 = 64 << 20;
    let mut done = 0;
    while done < size {
        cancel.check()?;
        let n = PIECE.min(size - done);
        if !out.copy_from(src, done, n)? {
            if done == 0 {
                return Ok(false);
            }
            return Err(io::Error::other("the archive stopped taking copies"));
        }
        done += n;
    }
    Ok(true)
}

/// A reader that yields exactly `size` bytes of `inner`, failing if it has more or fewer.
struct Exact<R> {
    inner: R,
    left: u64,
    what: String,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is longer than recorded", self.what),
                )),
            };
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than recorded", self.what),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Streams a stored blob into the archive. With `layer`, the blob is written uncompressed
/// and its diff ID verified while it streams; without, it is copied as stored and its
/// digest verified (unless this daemon hashed all of it before and its file has not
/// changed since: `ContentStore::known_intact`).
pub(crate) fn append_blob<W: crate::ArchiveSink>(
    store: &Store,
    tar: &mut tar::Builder<W>,
    name: &str,
    blob: &Digest,
    layer: Option<&LayerRecord>,
    cancel: &Cancel,
    mtime: u64,
) -> Result<()> {
    let path = store.content().path(blob);
    let io_err = |e| TransportError::io("read", &path, e);
    // A built layer's tar is made from its files and verifies itself as it ends. A stored
    // blob is read through one handle, whose stamp is taken before the read and again
    // after it: copied as it is stored, a blob whose every byte this daemon hashed (it
    // wrote it, or read it whole before) and whose file still has that stamp is copied
    // without hashing it again (the hash was the save's longest part: 0.22 s of 0.24 s
    // for 430 MB), and the copy fails if the stamp moved while it was read. Any other blob
    // is hashed here as it streams, and vouched for if it matches and did not change.
    let as_stored = layer.is_none_or(|l| &l.diff_id.0 == blob);
    let (source, stored): (Box<dyn Read + Send>, Option<(std::fs::File, Stamp)>) =
        if store.blob_in_tree(blob) {
            (store.open_blob(blob, None)?, None)
        } else {
            let f = store.content().open(blob)?;
            let before = Stamp::of(&f.metadata().map_err(io_err)?);
            (Box::new(f.try_clone().map_err(io_err)?), Some((f, before)))
        };
    let verifies_itself = match &stored {
        None => true,
        Some((_, before)) => as_stored && store.content().known_as(blob, *before),
    };
    // The images' layers are leased for the whole save (a built layer's tar is made
    // from its files as it streams).
    let file = io::BufReader::with_capacity(1 << 20, source);
    let guarded = Guarded {
        inner: file,
        cancel: cancel.clone(),
        remaining: u64::MAX,
    };
    let (size, mut reader): (u64, Box<dyn Read>) = match layer {
        Some(l) => (
            l.size,
            decompress(guarded)
                .map_err(|e| TransportError::io("read", &path, e))?
                .1,
        ),
        None => (store.blob_size(blob)?, Box::new(guarded)),
    };
    let mut exact = Exact {
        inner: &mut reader,
        left: size,
        what: format!("blob {blob}"),
    };
    // The entry written by hand (header, data, padding), as tar::Builder::append would,
    // so the data goes in large pieces with its hash on another thread.
    let out = tar.get_mut();
    out.write_all(header(name, size, mtime).as_bytes())
        .map_err(|e| TransportError::io("write", &path, e))?;
    // A plain blob file of exactly the entry's bytes, copied as stored and vouched for:
    // copied by the kernel when the sink can (in pieces, the cancel checked between).
    let spliced = match &stored {
        Some((f, _))
            if verifies_itself && as_stored && f.metadata().map_err(io_err)?.len() == size =>
        {
            splice(out, f, size, cancel).map_err(|e| TransportError::io("write", &path, e))?
        }
        _ => false,
    };
    let digest = if spliced {
        None
    } else if verifies_itself {
        io::copy(&mut exact, out).map_err(|e| TransportError::io("read", &path, e))?;
        None
    } else {
        let (d, _) = isula_store::content::copy_hashing(&mut exact, out)
            .map_err(|e| TransportError::io("read", &path, e))?;
        Some(d)
    };
    let pad = ((512 - size % 512) % 512) as usize;
    out.write_all(&[0u8; 512][..pad])
        .map_err(|e| TransportError::io("write", &path, e))?;
    let unchanged = match &stored {
        None => true,
        Some((f, before)) => Stamp::of(&f.metadata().map_err(io_err)?) == *before,
    };
    let Some(digest) = digest else {
        if !unchanged {
            return Err(io_err(io::Error::other(
                "the blob changed while it was copied: save again",
            )));
        }
        return Ok(());
    };
    let expected = match layer {
        Some(l) => l.diff_id.clone(),
        None => DiffId(blob.clone()),
    };
    if digest != expected.0 {
        return Err(StoreError::DigestMismatch {
            expected: expected.0,
            actual: digest,
        }
        .into());
    }
    if let Some((_, before)) = stored.filter(|_| as_stored && unchanged) {
        store.content().mark_verified(blob, before);
    }
    Ok(())
}
