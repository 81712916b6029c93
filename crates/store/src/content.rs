//! Content store: blobs by digest under `blobs/sha256/<hex>`. A blob is written to
//! `ingest/<random>` while being hashed, fsynced, verified against the expected digest and
//! size, then renamed into place and made read-only. Readers only ever see complete blobs.

use crate::error::{Result, StoreError};
use isula_types::Digest;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    /// The blobs whose every byte this process hashed (as it wrote them, or in a full
    /// read), with the stamp their file had then.
    verified: Vouched,
}

/// Blobs this process hashed whole, each with its file's stamp then (shared by the store
/// and its writers).
#[derive(Debug, Clone, Default)]
struct Vouched(Arc<Mutex<HashMap<Digest, Stamp>>>);

impl Vouched {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Stamp>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `d` was hashed whole while its file had stamp `now`; a record that no
    /// longer matches is forgotten.
    fn matches(&self, d: &Digest, now: Stamp) -> bool {
        let mut map = self.map();
        match map.get(d) {
            Some(then) if *then == now => true,
            Some(_) => {
                map.remove(d);
                false
            }
            None => false,
        }
    }

    fn record(&self, d: &Digest, stamp: Stamp) {
        self.map().insert(d.clone(), stamp);
    }

    fn forget(&self, d: &Digest) {
        self.map().remove(d);
    }

    /// Whether `path`, blob `d`'s file, is the one this process hashed whole and has not
    /// changed since (a file gone or unreadable is forgotten).
    fn intact(&self, d: &Digest, path: &Path) -> bool {
        match fs::metadata(path) {
            Ok(m) => self.matches(d, Stamp::of(&m)),
            Err(_) => {
                self.forget(d);
                false
            }
        }
    }
}

/// What tells a blob's file apart from any other file, or from itself changed: its inode,
/// size, and modification and change times. Any write, truncation, change of mode or
/// replacement through the file system moves one of them (the change time moves on every
/// change, and no call sets it back). What it cannot see: a change below the file system
/// (bit rot, a write to the block device), and, on kernels before 6.13 (coarse
/// timestamps), a rewrite of the same size within the clock tick (a few ms) of the file's
/// last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl ContentStore {
    pub(crate) fn new(root: &Path) -> Result<Self> {
        let cs = ContentStore {
            blobs: root.join("blobs/sha256"),
            ingest: root.join("ingest"),
            verified: Vouched::default(),
        };
        for d in [&cs.blobs, &cs.ingest] {
            fs::create_dir_all(d).map_err(|e| StoreError::io("create", d, e))?;
        }
        Ok(cs)
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    pub fn size(&self, d: &Digest) -> Result<u64> {
        let p = self.path(d);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::BlobNotFound(d.clone()))
            }
            Err(e) => Err(StoreError::io("stat", p, e)),
        }
    }

    /// The stamp of blob `d`'s file now.
    pub fn stamp(&self, d: &Digest) -> Result<Stamp> {
        let p = self.path(d);
        match fs::metadata(&p) {
            Ok(m) => Ok(Stamp::of(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::BlobNotFound(d.clone()))
            }
            Err(e) => Err(StoreError::io("stat", p, e)),
        }
    }

    /// Whether every byte of blob `d` was hashed by this process (written here, or read
    /// whole and compared with its name) and its file has not changed since: a reader may
    /// then copy it without hashing it again. Kept in memory only, so after a restart
    /// (a crash, a power cut) every blob is hashed again the first time it is read whole.
    pub fn known_intact(&self, d: &Digest) -> bool {
        self.verified.intact(d, &self.path(d))
    }

    /// [`known_intact`](Self::known_intact) for a file whose stamp `now` the caller took
    /// from the handle it reads (so no other file can take its place in between). A
    /// stamp that no longer matches is forgotten.
    pub fn known_as(&self, d: &Digest, now: Stamp) -> bool {
        self.verified.matches(d, now)
    }

    /// Records that blob `d` was read whole and matched its name, its file's stamp taken
    /// before the read began (a change during the read moves the stamp, so the record
    /// never vouches for bytes that were not read).
    pub fn mark_verified(&self, d: &Digest, before: Stamp) {
        self.verified.record(d, before);
    }

    pub fn open(&self, d: &Digest) -> Result<File> {
        let p = self.path(d);
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobNotFound(d.clone()),
            _ => StoreError::io("open", p, e),
        })
    }

    /// Reads a small blob whole (configs, manifests), refusing anything over `limit`.
    pub fn read_small(&self, d: &Digest, limit: u64) -> Result<Vec<u8>> {
        let size = self.size(d)?;
        if size > limit {
            return Err(StoreError::TooLarge {
                what: format!("blob {d}"),
                limit,
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.open(d)?
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read", self.path(d), e))?;
        Ok(buf)
    }

    /// Starts a new blob, hashed as it is written.
    pub fn writer(&self) -> Result<BlobWriter> {
        self.new_writer(true)
    }

    /// Starts a new blob whose bytes the caller hashes (a pipeline that hashes what it
    /// writes on another thread): its commit must be given that digest and size, and takes
    /// the digest on the caller's word (the size is counted).
    pub fn writer_hashed_by_caller(&self) -> Result<BlobWriter> {
        self.new_writer(false)
    }

    fn new_writer(&self, hashing: bool) -> Result<BlobWriter> {
        let path = self.ingest.join(format!("{:016x}", rand::random::<u64>()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io("create", &path, e))?;
        Ok(BlobWriter {
            file: Some(isula_sys::WriteBehind::new(file)),
            path,
            hash: hashing.then(Sha256::new),
            size: 0,
            blobs: self.blobs.clone(),
            verified: self.verified.clone(),
        })
    }

    /// Stores `data` as a blob.
    pub fn put(&self, data: &[u8]) -> Result<Digest> {
        let mut w = self.writer()?;
        w.write_all(data)
            .map_err(|e| StoreError::io("write", &w.path, e))?;
        Ok(w.commit(None)?.0)
    }

    pub(crate) fn remove(&self, d: &Digest) -> Result<()> {
        self.verified.forget(d);
        let p = self.path(d);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", p, e)),
        }
    }

    /// Every blob digest present on disk.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(&self.blobs).map_err(|e| StoreError::io("read", &self.blobs, e))? {
            let ent = ent.map_err(|e| StoreError::io("read", &self.blobs, e))?;
            match ent.file_name().to_str().map(Digest::from_hex) {
                Some(Ok(d)) => out.push(d),
                _ => tracing::warn!(path = %ent.path().display(), "stray file in blob store"),
            }
        }
        Ok(out)
    }

    /// Re-hashes a blob and compares it to its name.
    pub fn verify(&self, d: &Digest) -> Result<()> {
        let mut f = self.open(d)?;
        let before = f
            .metadata()
            .map_err(|e| StoreError::io("stat", self.path(d), e))?;
        let mut h = Sha256::new();
        io::copy(&mut f, &mut HashWriter(&mut h))
            .map_err(|e| StoreError::io("read", self.path(d), e))?;
        let actual = Digest::from_sha256(h);
        if &actual != d {
            self.verified.forget(d);
            return Err(StoreError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        self.mark_verified(d, Stamp::of(&before));
        Ok(())
    }

    pub(crate) fn sweep_ingest(&self) -> Result<usize> {
        sweep_dir(&self.ingest)
    }
}

pub(crate) fn sweep_dir(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for ent in fs::read_dir(dir).map_err(|e| StoreError::io("read", dir, e))? {
        let ent = ent.map_err(|e| StoreError::io("read", dir, e))?;
        isula_sys::rooted::remove_tree(&ent.path())?;
        n += 1;
    }
    Ok(n)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blob being written. Dropped without `commit`, it leaves nothing behind.
pub struct BlobWriter {
    /// Written behind: the commit's fsync waits only for the last few MiB.
    file: Option<isula_sys::WriteBehind<File>>,
    path: PathBuf,
    /// None: the caller hashes (see [`ContentStore::writer_hashed_by_caller`]).
    hash: Option<Sha256>,
    size: u64,
    blobs: PathBuf,
    verified: Vouched,
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the blob is written until its commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The digest of what was written so far (None: the caller hashes).
    pub fn digest(&self) -> Option<Digest> {
        self.hash.clone().map(Digest::from_sha256)
    }

    /// fsyncs, verifies against `expected` (digest and size) if given, and moves the blob into
    /// place. Returns its digest and size. Committing content that is already present is fine.
    pub fn commit(mut self, expected: Option<(&Digest, Option<u64>)>) -> Result<(Digest, u64)> {
        let digest = match (self.digest(), expected) {
            (Some(d), _) => d,
            (None, Some((d, Some(_)))) => d.clone(),
            (None, _) => {
                return Err(StoreError::io(
                    "commit",
                    &self.path,
                    io::Error::other("a blob its caller hashes needs the caller's digest and size"),
                ))
            }
        };
        if let Some((want, size)) = expected {
            if want != &digest {
                return Err(StoreError::DigestMismatch {
                    expected: want.clone(),
                    actual: digest,
                });
            }
            if let Some(size) = size {
                if size != self.size {
                    return Err(StoreError::SizeMismatch {
                        digest,
                        expected: size,
                        actual: self.size,
                    });
                }
            }
        }
        let mut phase = crate::phase::Phase::start("blob fsync");
        phase.add_bytes(self.size);
        // Synced through the writer, which (if this fails) still removes the file on drop.
        if let Some(f) = self.file.as_ref().map(isula_sys::WriteBehind::get_ref) {
            f.sync_all()
                .map_err(|e| StoreError::io("fsync", &self.path, e))?;
            f.set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(|e| StoreError::io("chmod", &self.path, e))?;
        }
        drop(self.file.take());
        let dest = self.blobs.join(digest.hex());
        // A blob that is there already and that this process hashed whole, unchanged since,
        // stays: a reader copying it on the strength of that (a save) would take the
        // unlink of a replaced file, which moves its change time, for a change. Any other
        // is replaced by what was just hashed (a damaged blob is mended by storing its
        // content again).
        let placed = match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.path,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) if self.verified.intact(&digest, &dest) => {
                let _ = fs::remove_file(&self.path);
                false
            }
            Err(_) => {
                fs::rename(&self.path, &dest).map_err(|e| StoreError::io("rename", &dest, e))?;
                true
            }
        };
        isula_sys::fsync_dir(&self.blobs)?;
        // Hashed as it was written: its stamp now (after the rename, which moves the
        // change time) vouches for it until the file changes. A blob that was there
        // already is vouched for only if this process hashed that one.
        if placed {
            if let Ok(m) = fs::metadata(&dest) {
                self.verified.record(&digest, Stamp::of(&m));
            }
        }
        Ok((digest, self.size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let n = f.write(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (tar padding after the end marker counts too) and
    /// returns the digest and byte count of everything read.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_sha256(self.hash), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Copies `r` to `w` to its end, hashing on a thread of its own what the copy moves (the
/// hash costs no time on the copy's thread), and returns the digest and byte count.
pub fn copy_hashing(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<(Digest, u64)> {
    const PIECE: usize = 1 << 20;
    std::thread::scope(|s| {
        let (to_hash, pieces) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(2);
        let (give_back, returned) = std::sync::mpsc::sync_channel::<Vec<u8>>(3);
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            for (piece, n) in pieces {
                h.update(&piece[..n]);
                let _ = give_back.send(piece);
            }
            Digest::from_sha256(h)
        });
        let mut spare: Vec<Vec<u8>> = (0..3).map(|_| vec![0u8; PIECE]).collect();
        let mut total = 0u64;
        let copied = (|| loop {
            let mut buf = match spare.pop() {
                Some(b) => b,
                None => returned
                    .recv()
                    .map_err(|_| io::Error::other("the hashing thread stopped"))?,
            };
            let n = read_full(r, &mut buf[..PIECE])?;
            if n == 0 {
                return Ok(());
            }
            w.write_all(&buf[..n])?;
            total += n as u64;
            to_hash
                .send((buf, n))
                .map_err(|_| io::Error::other("the hashing thread stopped"))?;
        })();
        drop(to_hash);
        let digest = hasher
            .join()
            .map_err(|_| io::Error::other("the hashing thread failed"))?;
        copied.map(|()| (digest, total))
    })
}

/// A reader that copies what passes through it into a writer (the blob being stored).
pub struct TeeReader<R, W> {
    pub inner: R,
    pub sink: W,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Reads from `r` until `buf` is full or the stream ends; how many bytes were read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn rewrite(path: &Path, data: &[u8]) {
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(path, data).expect("rewrite");
        fs::set_permissions(path, fs::Permissions::from_mode(0o444)).expect("chmod");
    }

    #[test]
    fn a_blob_is_known_intact_only_while_its_file_is_the_one_hashed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cs = ContentStore::new(tmp.path()).expect("store");
        let d = cs.put(b"layer bytes").expect("put");
        assert!(cs.known_intact(&d), "hashed as it was written");
        let before = cs.stamp(&d).expect("stamp");
        assert!(cs.known_as(&d, before));

        // The same content stored again leaves the file that is there (a reader of it
        // sees no change), still vouched for.
        let before_ino = fs::metadata(cs.path(&d)).expect("stat").ino();
        assert_eq!(cs.put(b"layer bytes").expect("again"), d);
        assert_eq!(fs::metadata(cs.path(&d)).expect("stat").ino(), before_ino);
        assert!(cs.known_as(&d, before), "the stamp did not move");
        assert!(fs::read_dir(&cs.ingest).expect("ingest").next().is_none());

        // Another run on the same store knows nothing until it hashes the blob whole: a
        // damaged blob it is given again is mended, not kept.
        let other = ContentStore::new(tmp.path()).expect("again");
        assert!(!other.known_intact(&d));
        rewrite(&cs.path(&d), b"layer bytez");
        assert_eq!(other.put(b"layer bytes").expect("mend"), d);
        assert_eq!(fs::read(other.path(&d)).expect("read"), b"layer bytes");
        assert!(
            other.known_intact(&d),
            "the mended blob was hashed as it was written"
        );
        let before = cs.stamp(&d).expect("stamp");
        assert!(
            !cs.known_intact(&d),
            "the first run's stamp is of the damaged file"
        );
        cs.verify(&d).expect("verify");
        assert!(cs.known_as(&d, before));
        other.verify(&d).expect("verify");
        assert!(other.known_intact(&d), "verified whole");

        // The same bytes written again: a change all the same, and forgotten. (The stamp
        // was read above; since Linux 6.13 a change time that was read is followed by a
        // finer-grained one, so even a rewrite within the same clock tick moves it. Older
        // kernels keep coarse change times: the README says what a stamp cannot see.)
        rewrite(&cs.path(&d), b"layer bytes");
        assert!(!cs.known_intact(&d));
        assert!(!cs.known_as(&d, before), "forgotten once it did not match");
        // A damaged blob fails verification and is not vouched for.
        rewrite(&cs.path(&d), b"layer bytez");
        assert!(matches!(
            cs.verify(&d),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!cs.known_intact(&d));
        // Mended and verified, it is known again; removed, it is forgotten.
        rewrite(&cs.path(&d), b"layer bytes");
        cs.verify(&d).expect("verify");
        assert!(cs.known_intact(&d));
        cs.remove(&d).expect("remove");
        assert!(!cs.known_intact(&d));
        assert!(cs.verified.map().is_empty());
    }
}
