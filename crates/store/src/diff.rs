//! An overlay upper directory → a Docker layer tar, streamed: 0:0 character devices become
//! `.wh.NAME` files, the opaque xattr becomes `.wh..wh..opq`, hard links within the layer
//! become link entries. Entries are sorted by name and, for reproducible builds, mtimes can
//! be clamped; paths the build's own machinery created (mount points) are left out.

use crate::error::{Result, StoreError};
use isula_types::Digest;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Clamp every mtime to at most this (seconds since the epoch).
    pub clamp_mtime: Option<i64>,
    /// Paths (relative to the upper dir) left out with everything under them.
    pub exclude: HashSet<PathBuf>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::io(op, path, e)
}

struct Walk<'a, W: Write> {
    root: &'a Path,
    tar: tar::Builder<W>,
    opts: &'a DiffOptions,
    inodes: HashMap<(u64, u64), PathBuf>,
    /// What files are read through: a file of up to its size in one read (the tar
    /// crate's copy reads 8 KiB at a time: four reads for a 20 KB file).
    buf: Vec<u8>,
    /// Each entry's name and stamp, hashed in walk order, when asked for (see
    /// [`TreeStamp`]).
    stamps: Option<Tracer>,
    /// How many directories deep the walk is.
    depth: usize,
}

/// How deep a layer's directories may nest: each level holds a directory handle and a
/// frame of the walk's stack (a layer deeper than this is refused, not walked into an
/// overflow). The path limit stopped walks by path at about this depth for names of
/// a few characters.
pub const MAX_DEPTH: usize = 1024;

/// The stack of the thread that walks a layer for a reader: enough for [`MAX_DEPTH`]
/// levels (reserved, not used, until a walk goes that deep).
const WALK_STACK: usize = 16 << 20;

/// What a layer directory's files were when the tar they make was read: each entry's
/// name and the stamp of its inode (device, inode, mode, owner, links, size, device
/// number, modification and change times; a regular file's taken before and after its
/// data was read, a directory's before and after all under it was), with the extended
/// attributes the tar holds, hashed in the tar's order. Any change through the file
/// system to an entry, or an entry added, removed or replaced, moves it: every write,
/// truncation, change of mode, owner or extended attribute moves the change time, and no
/// call sets that back. What it cannot see is what [`crate::content::Stamp`] cannot: a
/// change below the file system, and before kernel 6.13 (coarse timestamps) a rewrite
/// within the clock tick of the file's last change. A read that finds it moved only where
/// link counts moved (with their change times) read the same files (see
/// [`Vouch::verdict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeStamp(std::sync::Arc<Trace>);

/// One stamp's change time and link count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Links {
    ctime: (i64, i64),
    nlink: u64,
}

/// What a walk read (its [`TreeStamp`] in two parts): each entry's name, the rest of each
/// stamp (not its change time nor its link count) and the extended attributes the tar
/// holds, hashed in the tar's order; and beside it, in the same order, each stamp's change
/// time and link count.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trace {
    fixed: [u8; 32],
    links: Vec<Links>,
}

impl Trace {
    fn stamp(self) -> TreeStamp {
        TreeStamp(std::sync::Arc::new(self))
    }

    /// Whether `other` read the same as this, but for link counts that moved: the same
    /// entries with the same fixed stamps and extended attributes, and every change time
    /// the same unless the link count moved with it (a hard link to the file made or
    /// removed elsewhere, as a build context's or a cache snapshot's files are).
    fn same_but_links(&self, other: &Trace) -> bool {
        self.fixed == other.fixed
            && self.links.len() == other.links.len()
            && self
                .links
                .iter()
                .zip(&other.links)
                .all(|(a, b)| a == b || a.nlink != b.nlink)
    }
}

/// A [`Trace`] being made.
#[derive(Default)]
struct Tracer {
    fixed: sha2::Sha256,
    links: Vec<Links>,
}

/// The size of [`Walk::buf`].
const READ_BUFFER: usize = 256 << 10;

/// Which side of a copy failed: reading the file, or writing the tar.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Read,
    Write,
}

/// Writes `size` bytes of `f` to `out` through `buf`, then the zeros that pad them to a
/// tar block. A file that ends sooner fails (its header says `size`); one that grew is
/// cut at `size`.
fn copy_padded(
    f: &mut std::fs::File,
    out: &mut impl Write,
    size: u64,
    buf: &mut [u8],
) -> std::result::Result<(), (Side, std::io::Error)> {
    use std::io::Read;
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => {
                return Err((
                    Side::Read,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ended {left} bytes before its size ({size}) while it \
                             was read"
                        ),
                    ),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((Side::Read, e)),
        };
        out.write_all(&buf[..n]).map_err(|e| (Side::Write, e))?;
        left -= n as u64;
    }
    let pad = (512 - size % 512) % 512;
    out.write_all(&[0u8; 512][..pad as usize])
        .map_err(|e| (Side::Write, e))
}

/// Extended attribute `key` of the file open as `fd` (None if it has none).
fn xattr(fd: BorrowedFd<'_>, key: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::fgetxattr(fd, key, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

/// What the walk needs of an inode (from `stat`, whose field types differ between
/// architectures).
#[derive(Clone, Copy)]
struct Meta {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    rdev: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Meta {
    #[allow(clippy::unnecessary_cast)]
    fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            nlink: st.st_nlink as u64,
            size: st.st_size as u64,
            rdev: st.st_rdev as u64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime: st.st_ctime as i64,
            ctime_nsec: st.st_ctime_nsec as i64,
        }
    }

    fn kind(&self) -> rustix::fs::FileType {
        rustix::fs::FileType::from_raw_mode(self.mode as rustix::fs::RawMode)
    }
}

/// What a layer tar entry says of its inode: permission bits (set-id and sticky bits
/// too), owner and modification time (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

/// The header of an entry of `kind` (size 0): the one header every layer tar this store
/// makes uses, from files ([`write_layer`]) or entry by entry ([`LayerTarWriter`]).
fn entry_header(m: &EntryMeta, kind: tar::EntryType, clamp_mtime: Option<i64>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode & 0o7777);
    h.set_uid(u64::from(m.uid));
    h.set_gid(u64::from(m.gid));
    let mtime = match clamp_mtime {
        Some(c) => m.mtime.min(c),
        None => m.mtime,
    };
    h.set_mtime(mtime.max(0) as u64);
    h.set_size(0);
    h
}

/// A layer tar written entry by entry, byte for byte the tar [`write_layer`] makes of a
/// directory holding those entries (the same headers, names and padding), for a caller
/// that knows the entries without making them (a COPY into a new directory). The caller
/// gives the entries in the walk's order: each directory before what it holds, the
/// names of one directory sorted by their bytes.
/// It refuses what the unpack of the tar would (the entries and file bytes past
/// `max_layer_entries` and `max_layer_size`), so that no layer is kept that cannot be
/// unpacked.
pub struct LayerTarWriter<W: Write> {
    tar: tar::Builder<W>,
    clamp_mtime: Option<i64>,
    buf: Vec<u8>,
    limits: crate::apply::Limits,
    entries: u64,
    bytes: u64,
}

impl<W: Write> LayerTarWriter<W> {
    pub fn new(out: W, clamp_mtime: Option<i64>) -> LayerTarWriter<W> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        LayerTarWriter {
            tar,
            clamp_mtime,
            buf: vec![0u8; READ_BUFFER],
            limits: crate::apply::limits(),
            entries: 0,
            bytes: 0,
        }
    }

    /// Counts an entry of `size` file bytes at `rel` against the unpack's limits.
    fn count(&mut self, rel: &Path, size: u64) -> std::io::Result<()> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        let checked = self
            .limits
            .check_entries(self.entries, rel)
            .and_then(|()| self.limits.check_bytes(self.bytes, rel));
        checked.map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Directory `rel` (written as `rel/`).
    pub fn dir(&mut self, rel: &Path, m: &EntryMeta) -> std::io::Result<()> {
        self.count(rel, 0)?;
        let mut h = entry_header(m, tar::EntryType::Directory, self.clamp_mtime);
        let mut name = rel.as_os_str().as_bytes().to_vec();
        name.push(b'/');
        self.tar
            .append_data(&mut h, std::ffi::OsStr::from_bytes(&name), std::io::empty())
    }

    /// Regular file `rel`: `size` bytes read from `f` (one that ends sooner fails, one
    /// that grew is cut at `size`).
    pub fn file(
        &mut self,
        rel: &Path,
        m: &EntryMeta,
        f: &mut std::fs::File,
        size: u64,
    ) -> std::io::Result<()> {
        self.count(rel, size)?;
        let mut h = entry_header(m, tar::EntryType::Regular, self.clamp_mtime);
        h.set_size(size);
        self.tar.append_data(&mut h, rel, std::io::empty())?;
        copy_padded(f, self.tar.get_mut(), size, &mut self.buf).map_err(|(_, e)| e)
    }

    /// Symlink `rel` to `target`.
    pub fn symlink(&mut self, rel: &Path, m: &EntryMeta, target: &Path) -> std::io::Result<()> {
        self.count(rel, 0)?;
        let mut h = entry_header(m, tar::EntryType::Symlink, self.clamp_mtime);
        self.tar.append_link(&mut h, rel, target)
    }

    /// Ends the tar (its two zero blocks) and returns the writer.
    pub fn finish(self) -> std::io::Result<W> {
        self.tar.into_inner()
    }
}

impl<W: Write> Walk<'_, W> {
    /// The error of `op` on entry `rel`, naming its path.
    fn sys(&self, op: &'static str, rel: &Path, e: rustix::io::Errno) -> StoreError {
        StoreError::io(op, self.root.join(rel), e.into())
    }

    /// Opens entry `name` of the directory open as `parent` (at `rel`) to read, with
    /// `flags`, never through a symlink put there since its stat.
    fn open(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        rel: &Path,
        flags: OFlags,
    ) -> Result<OwnedFd> {
        rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | flags,
            Mode::empty(),
        )
        .map_err(|e| self.sys("open", rel, e))
    }

    /// Adds entry `rel`, whose inode's stamp is in `m`, to the stamps (when asked for).
    fn fold(&mut self, rel: &Path, m: &Meta) {
        let Some(t) = &mut self.stamps else { return };
        use sha2::Digest as _;
        // A name has no NUL in it: the NUL ends it, and the fields after it are fixed.
        t.fixed.update(rel.as_os_str().as_bytes());
        t.fixed.update([0u8]);
        for v in [
            m.dev,
            m.ino,
            u64::from(m.mode),
            u64::from(m.uid),
            u64::from(m.gid),
            m.size,
            m.rdev,
            m.mtime as u64,
            m.mtime_nsec as u64,
        ] {
            t.fixed.update(v.to_le_bytes());
        }
        t.links.push(Links {
            ctime: (m.ctime, m.ctime_nsec),
            nlink: m.nlink,
        });
    }

    /// Adds extended attribute `key` of the entry last folded, as read for the tar (None:
    /// it has none), to the stamps (when asked for).
    fn fold_xattr(&mut self, key: &str, value: Option<&[u8]>) {
        let Some(t) = &mut self.stamps else { return };
        use sha2::Digest as _;
        t.fixed.update(key.as_bytes());
        match value {
            None => t.fixed.update([0u8]),
            Some(v) => {
                t.fixed.update([1u8]);
                t.fixed.update((v.len() as u64).to_le_bytes());
                t.fixed.update(v);
            }
        }
    }

    fn header(&self, meta: &Meta, kind: tar::EntryType) -> tar::Header {
        let m = EntryMeta {
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
        };
        entry_header(&m, kind, self.opts.clamp_mtime)
    }

    fn pax_xattrs(&mut self, fd: BorrowedFd<'_>, rel: &Path) -> Result<()> {
        let mut exts: Vec<(String, Vec<u8>)> = Vec::new();
        let cap = xattr(fd, "security.capability");
        self.fold_xattr("security.capability", cap.as_deref());
        if let Some(v) = cap {
            exts.push(("SCHILY.xattr.security.capability".into(), v));
        }
        if !exts.is_empty() {
            self.tar
                .append_pax_extensions(exts.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io("write", rel))?;
        }
        Ok(())
    }

    /// Entry `name` of the directory open as `parent`, at `rel` in the layer: every call
    /// is relative to that directory (a lookup of one name, not of the whole path).
    fn entry(&mut self, parent: BorrowedFd<'_>, name: &CStr, rel: &Path) -> Result<()> {
        if self.opts.exclude.contains(rel) {
            return Ok(());
        }
        let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.sys("stat", rel, e))?;
        let meta = Meta::of(&st);
        let ft = meta.kind();
        if ft == FileType::CharacterDevice && meta.rdev == 0 {
            // Overlay whiteout.
            self.fold(rel, &meta);
            let name = rel
                .file_name()
                .map(|n| n.as_bytes().to_vec())
                .unwrap_or_default();
            let mut wh = b".wh.".to_vec();
            wh.extend_from_slice(&name);
            let wh_path = rel.with_file_name(std::ffi::OsStr::from_bytes(&wh));
            let mut h = self.header(&meta, tar::EntryType::Regular);
            h.set_mode(0o600);
            h.set_uid(0);
            h.set_gid(0);
            self.tar
                .append_data(&mut h, &wh_path, std::io::empty())
                .map_err(io("write", rel))?;
            return Ok(());
        }
        if ft == FileType::Directory {
            self.fold(rel, &meta);
            let dir = self.open(parent, name, rel, OFlags::DIRECTORY)?;
            let mut h = self.header(&meta, tar::EntryType::Directory);
            self.pax_xattrs(dir.as_fd(), rel)?;
            let mut dir_name = rel.as_os_str().as_bytes().to_vec();
            dir_name.push(b'/');
            self.tar
                .append_data(
                    &mut h,
                    std::ffi::OsStr::from_bytes(&dir_name),
                    std::io::empty(),
                )
                .map_err(io("write", rel))?;
            let opaque = xattr(dir.as_fd(), crate::apply::opaque_xattr());
            self.fold_xattr(crate::apply::opaque_xattr(), opaque.as_deref());
            if opaque.as_deref() == Some(b"y") {
                let mut h = self.header(&meta, tar::EntryType::Regular);
                h.set_mode(0o600);
                self.tar
                    .append_data(
                        &mut h,
                        rel.join(crate::apply::OPAQUE_WHITEOUT),
                        std::io::empty(),
                    )
                    .map_err(io("write", rel))?;
            }
            if self.depth >= MAX_DEPTH {
                return Err(StoreError::io(
                    "walk",
                    self.root.join(rel),
                    std::io::Error::other(format!(
                        "directories nest more than {MAX_DEPTH} deep in this layer"
                    )),
                ));
            }
            self.depth += 1;
            let walked = self.children(dir, rel);
            self.depth -= 1;
            return walked;
        }
        if ft == FileType::Symlink {
            self.fold(rel, &meta);
            let target = rustix::fs::readlinkat(parent, name, Vec::new())
                .map_err(|e| self.sys("readlink", rel, e))?;
            let target = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()));
            let mut h = self.header(&meta, tar::EntryType::Symlink);
            self.tar
                .append_link(&mut h, rel, target)
                .map_err(io("write", rel))?;
            return Ok(());
        }
        if ft == FileType::RegularFile {
            if meta.nlink > 1 {
                let key = (meta.dev, meta.ino);
                if let Some(first) = self.inodes.get(&key).cloned() {
                    self.fold(rel, &meta);
                    let mut h = self.header(&meta, tar::EntryType::Link);
                    self.tar
                        .append_link(&mut h, rel, &first)
                        .map_err(io("write", rel))?;
                    return Ok(());
                }
                self.inodes.insert(key, rel.to_path_buf());
            }
            // The stamp the header is made from, and below the one after the read.
            self.fold(rel, &meta);
            let mut h = self.header(&meta, tar::EntryType::Regular);
            h.set_size(meta.size);
            // Non-blocking: a FIFO put there since the stat is not waited on.
            let fd = self.open(parent, name, rel, OFlags::NONBLOCK)?;
            self.pax_xattrs(fd.as_fd(), rel)?;
            let mut f = std::fs::File::from(fd);
            // The header (and any long-name records) with no data after it, then the
            // data and its padding, read through the walk's buffer.
            self.tar
                .append_data(&mut h, rel, std::io::empty())
                .map_err(io("write", rel))?;
            copy_padded(&mut f, self.tar.get_mut(), meta.size, &mut self.buf).map_err(
                |(side, e)| match side {
                    Side::Read => StoreError::io("read", self.root.join(rel), e),
                    Side::Write => StoreError::io("write", rel, e),
                },
            )?;
            if self.stamps.is_some() {
                // Taken after the read: a write that began before it ended has moved the
                // modification and change times by now.
                let after = rustix::fs::fstat(&f).map_err(|e| self.sys("stat", rel, e))?;
                self.fold(rel, &Meta::of(&after));
            }
            return Ok(());
        }
        let kind = match ft {
            FileType::Fifo => tar::EntryType::Fifo,
            FileType::CharacterDevice => tar::EntryType::Char,
            FileType::BlockDevice => tar::EntryType::Block,
            _ => return Ok(()), // sockets are not part of images
        };
        self.fold(rel, &meta);
        let mut h = self.header(&meta, kind);
        if kind != tar::EntryType::Fifo {
            let dev = meta.rdev;
            h.set_device_major(rustix::fs::major(dev))
                .map_err(io("write", rel))?;
            h.set_device_minor(rustix::fs::minor(dev))
                .map_err(io("write", rel))?;
        }
        self.tar
            .append_data(&mut h, rel, std::io::empty())
            .map_err(io("write", rel))?;
        Ok(())
    }

    /// The entries of the directory open as `dir` (at `rel`), by name.
    fn children(&mut self, dir: OwnedFd, rel: &Path) -> Result<()> {
        let mut names: Vec<CString> = Vec::new();
        let mut list = rustix::fs::Dir::new(dir).map_err(|e| self.sys("read", rel, e))?;
        while let Some(ent) = list.read() {
            let ent = ent.map_err(|e| self.sys("read", rel, e))?;
            let n = ent.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                names.push(n.to_owned());
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let fd = list.fd().map_err(|e| self.sys("read", rel, e))?;
        for n in &names {
            self.entry(fd, n, &rel.join(std::ffi::OsStr::from_bytes(n.to_bytes())))?;
        }
        if self.stamps.is_some() {
            // The directory's stamp again, once all under it was read: an entry of it
            // unlinked, made or renamed since its first stamp (a symlink made again
            // between its stat and its readlinkat, say), or an extended attribute of it
            // set, moves it. "NAME/" names no entry (a name has no slash in it).
            let after = rustix::fs::fstat(fd).map_err(|e| self.sys("stat", rel, e))?;
            let mut end = rel.as_os_str().as_bytes().to_vec();
            end.push(b'/');
            self.fold(
                Path::new(std::ffi::OsStr::from_bytes(&end)),
                &Meta::of(&after),
            );
        }
        Ok(())
    }
}

/// Writes the layer tar of `upper` to `out` and returns `out`.
pub fn write_layer<W: Write>(upper: &Path, out: W, opts: &DiffOptions) -> Result<W> {
    walk_layer(upper, out, opts, false).map(|(out, _)| out)
}

/// Writes the layer tar of `upper` to `out`; returns `out`, and with `stamp` what the
/// walk read (the [`Trace`] of the files' stamps).
fn walk_layer<W: Write>(
    upper: &Path,
    out: W,
    opts: &DiffOptions,
    stamp: bool,
) -> Result<(W, Option<Trace>)> {
    let mut walk = Walk {
        root: upper,
        tar: tar::Builder::new(out),
        opts,
        inodes: HashMap::new(),
        buf: vec![0u8; READ_BUFFER],
        stamps: stamp.then(Tracer::default),
        depth: 0,
    };
    walk.tar.mode(tar::HeaderMode::Complete);
    let root = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| StoreError::io("open", upper, e.into()))?;
    walk.children(root, Path::new(""))?;
    let stamps = walk.stamps.take().map(|t| Trace {
        fixed: sha2::Digest::finalize(t.fixed).into(),
        links: t.links,
    });
    let out = walk.tar.into_inner().map_err(io("write", upper))?;
    Ok((out, stamps))
}

/// Hashes (sha256) and counts what is written to it, keeping nothing.
#[derive(Default)]
pub struct HashSink {
    hash: sha2::Sha256,
    size: u64,
}

impl HashSink {
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_sha256(self.hash), self.size)
    }
}

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(&mut self.hash, buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The digest and size of the layer tar of `upper`, without writing it anywhere: one
/// thread walks and reads the files, this one hashes.
pub fn hash_layer(upper: &Path, opts: &DiffOptions) -> Result<(Digest, u64)> {
    hash_layer_with(upper, opts, false).map(|(d, n, _)| (d, n))
}

/// [`hash_layer`], and the files' [`TreeStamp`] as they were read: with it, a later read
/// of the same files by this process ([`TreeTar::spawn_vouched`]) needs no hash.
pub fn hash_layer_stamped(upper: &Path, opts: &DiffOptions) -> Result<(Digest, u64, TreeStamp)> {
    hash_layer_traced(upper, opts).map(|(d, n, trace)| (d, n, trace.stamp()))
}

/// [`hash_layer_stamped`], with the whole [`Trace`].
fn hash_layer_traced(upper: &Path, opts: &DiffOptions) -> Result<(Digest, u64, Trace)> {
    let (d, n, trace) = hash_layer_with(upper, opts, true)?;
    let trace = trace.ok_or_else(|| {
        StoreError::io(
            "stamp",
            upper,
            std::io::Error::other("the walk gave no stamp"),
        )
    })?;
    Ok((d, n, trace))
}

fn hash_layer_with(
    upper: &Path,
    opts: &DiffOptions,
    stamp: bool,
) -> Result<(Digest, u64, Option<Trace>)> {
    let mut tar = TreeTar::spawn_with(upper.to_path_buf(), opts.clone(), None, stamp)?;
    let mut hash = HashSink::default();
    loop {
        match tar.next_piece() {
            Ok(Some(piece)) => hash
                .write_all(piece.as_ref().as_ref())
                .map_err(|e| StoreError::io("hash", upper, e))?,
            Ok(None) => {
                let (d, n) = hash.finish();
                return Ok((d, n, tar.stamp));
            }
            Err(e) => return Err(StoreError::io("read", upper, e)),
        }
    }
}

/// How much of a tar made from files goes to the reader at a time (a pooled piece, faulted
/// in once, where a fresh one was mapped and faulted in page by page each time), and how
/// many such pieces may wait for the reader, and for the hash.
const TREE_PIECE: usize = isula_sys::memory::PIECE;
const TREE_PIECES_WAITING: usize = 4;

/// A piece of the tar, shared by the reader and the thread that hashes it: back to the
/// pool when both are done with it.
type Shared = std::sync::Arc<isula_sys::memory::Piece>;

enum Piece {
    Data(Shared),
    /// The end, with what the walk read when it was asked for.
    End(Option<Trace>),
    Failed(std::io::Error),
}

/// What a vouched read calls when the files' stamp moved and they were hashed again: with
/// their stamp now when they still make the blob, with None when not.
pub type Changed = Box<dyn FnOnce(Option<TreeStamp>) + Send>;

/// How a tar made from files is checked at its end.
enum Check {
    /// Hashed as it is read (on a thread of its own): it must have this digest and size.
    Hash(Digest, u64),
    /// This process hashed these files when they had a stamp: they must still have it,
    /// or be hashed again (see [`Vouch::verdict`]).
    Stamp(Vouch),
}

/// Files this process hashed (as blob `digest`, of `size` bytes) when they had `stamp`.
struct Vouch {
    digest: Digest,
    size: u64,
    stamp: TreeStamp,
    changed: Changed,
}

/// What the stream must hash to (its digest and size), hashed on a thread of its own as
/// the reader reads: the thread that walks the files is the one every reader waits for.
struct Verify {
    tx: std::sync::mpsc::SyncSender<Shared>,
    hashing: std::thread::JoinHandle<(Digest, u64)>,
    expected: Digest,
    size: u64,
}

impl Verify {
    fn spawn(expected: Digest, size: u64) -> std::io::Result<Verify> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Shared>(TREE_PIECES_WAITING);
        let hashing = std::thread::Builder::new()
            .name("layer-tar-hash".into())
            .spawn(move || {
                let mut h = HashSink::default();
                for piece in rx {
                    // A HashSink's write cannot fail.
                    let _ = h.write_all(piece.as_ref().as_ref());
                }
                h.finish()
            })?;
        Ok(Verify {
            tx,
            hashing,
            expected,
            size,
        })
    }

    /// The stream's end: whether it hashed to what it must.
    fn finish(self, dir: &Path) -> std::io::Result<()> {
        drop(self.tx);
        let (digest, n) = self.hashing.join().map_err(|_| {
            std::io::Error::other(format!(
                "hashing the layer tar of {} panicked",
                dir.display()
            ))
        })?;
        let (expected, size) = (self.expected, self.size);
        if digest == expected && n == size {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the files of {} no longer make layer blob {expected} ({size} bytes): they \
                 make {digest} ({n} bytes)",
                dir.display()
            )))
        }
    }
}

/// The writer end: pieces go to the reader, and to the hash when there is one.
struct PieceSink {
    tx: std::sync::mpsc::SyncSender<Piece>,
    piece: Vec<u8>,
    verify: Option<Verify>,
    /// The bytes written so far.
    written: u64,
}

impl PieceSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.piece, isula_sys::memory::take_piece(TREE_PIECE));
        let full: Shared = std::sync::Arc::new(isula_sys::memory::Piece::from_vec(full));
        if let Some(v) = &self.verify {
            v.tx.send(full.clone())
                .map_err(|_| std::io::Error::other("hashing the layer tar stopped"))?;
        }
        self.tx
            .send(Piece::Data(full))
            .map_err(|_| std::io::Error::other("the reader went away"))
    }
}

impl Drop for PieceSink {
    /// The piece being filled goes back to the pool (the last one is always a fresh one).
    fn drop(&mut self) {
        isula_sys::memory::give_piece(std::mem::take(&mut self.piece));
    }
}

impl Write for PieceSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(TREE_PIECE - self.piece.len());
        self.piece.extend_from_slice(&buf[..n]);
        self.written += n as u64;
        if self.piece.len() == TREE_PIECE {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A layer tar made from a layer's files as it is read (by a thread of its own, a few
/// pieces ahead). It must be `expected` (digest and size): if the files no longer make
/// those bytes, the read that would end the stream fails instead (checked by a hash as
/// it is read, or for files this process hashed by their stamps, see
/// [`TreeTar::spawn_vouched`]).
pub struct TreeTar {
    rx: std::sync::mpsc::Receiver<Piece>,
    piece: Option<Shared>,
    at: usize,
    ended: bool,
    /// What the walk read, once the stream has ended (when it was asked for).
    stamp: Option<Trace>,
}

impl TreeTar {
    /// The tar `upper` makes, hashed as it is read: it must be `expected`, `size` bytes.
    pub fn spawn(
        upper: PathBuf,
        opts: DiffOptions,
        expected: Digest,
        size: u64,
    ) -> Result<TreeTar> {
        TreeTar::spawn_with(upper, opts, Some(Check::Hash(expected, size)), false)
    }

    /// The tar `upper` makes, unchecked (for a caller that checks what it read).
    pub fn unchecked(upper: PathBuf, opts: DiffOptions) -> Result<TreeTar> {
        TreeTar::spawn_with(upper, opts, None, false)
    }

    /// The tar `upper` makes, files this process hashed as `expected` (`size` bytes) when
    /// they had `stamp` ([`hash_layer_stamped`]): not hashed again while every entry's
    /// stamp, taken as it is read, is what it was then. If one is not, the files are
    /// hashed again at the stream's end and `changed` learns the outcome: the read that
    /// ends the stream fails unless they still make `expected` and that hash read what the
    /// stream did, but for link counts that moved (see [`Vouch::verdict`]).
    pub fn spawn_vouched(
        upper: PathBuf,
        opts: DiffOptions,
        expected: Digest,
        size: u64,
        stamp: TreeStamp,
        changed: Changed,
    ) -> Result<TreeTar> {
        let check = Check::Stamp(Vouch {
            digest: expected,
            size,
            stamp,
            changed,
        });
        TreeTar::spawn_with(upper, opts, Some(check), false)
    }

    fn spawn_with(
        upper: PathBuf,
        opts: DiffOptions,
        check: Option<Check>,
        want_stamp: bool,
    ) -> Result<TreeTar> {
        let (tx, rx) = std::sync::mpsc::sync_channel(TREE_PIECES_WAITING);
        let dir = upper.clone();
        let (verify, vouched) = match check {
            Some(Check::Hash(d, n)) => (
                Some(
                    Verify::spawn(d, n)
                        .map_err(|e| StoreError::io("spawn a thread for", &upper, e))?,
                ),
                None,
            ),
            Some(Check::Stamp(vouch)) => (None, Some(vouch)),
            None => (None, None),
        };
        let stamping = want_stamp || vouched.is_some();
        std::thread::Builder::new()
            .name("layer-tar".into())
            .stack_size(WALK_STACK)
            .spawn(move || {
                let sink = PieceSink {
                    tx: tx.clone(),
                    piece: isula_sys::memory::take_piece(TREE_PIECE),
                    verify,
                    written: 0,
                };
                let last = match walk_layer(&dir, sink, &opts, stamping) {
                    Ok((mut sink, stamp)) => match sink.send() {
                        Err(_) => return, // the reader went away
                        Ok(()) => {
                            let verdict = match (sink.verify.take(), vouched) {
                                (Some(v), _) => v.finish(&dir),
                                (None, Some(vouch)) => {
                                    vouch.verdict(stamp.as_ref(), sink.written, &dir, &opts)
                                }
                                (None, None) => Ok(()),
                            };
                            match verdict {
                                Ok(()) => Piece::End(stamp),
                                Err(e) => Piece::Failed(e),
                            }
                        }
                    },
                    Err(e) => Piece::Failed(std::io::Error::other(e.to_string())),
                };
                let _ = tx.send(last);
            })
            .map_err(|e| StoreError::io("spawn a thread for", &upper, e))?;
        Ok(TreeTar {
            rx,
            piece: None,
            at: 0,
            ended: false,
            stamp: None,
        })
    }
}

impl Vouch {
    /// The end of a vouched stream: whether the files read had the stamp (and made as
    /// many bytes) they had when they were hashed, but for link counts that moved (a hard
    /// link to a file made or removed elsewhere, as a build context's or a cache
    /// snapshot's are, moves its link count and change time, not what the tar holds). If
    /// not, they are hashed again now: the stream passes if they still make the blob and
    /// the hash read what the stream read, but for link counts that moved.
    fn verdict(
        self,
        now: Option<&Trace>,
        written: u64,
        dir: &Path,
        opts: &DiffOptions,
    ) -> std::io::Result<()> {
        let Vouch {
            digest,
            size,
            stamp,
            changed,
        } = self;
        if now.is_some_and(|now| stamp.0.same_but_links(now)) && written == size {
            return Ok(());
        }
        let (verdict, record) = match hash_layer_traced(dir, opts) {
            // They make the blob: vouched for from now on with the stamp this hash took.
            Ok((d, n, then)) if d == digest && n == size => {
                let read_the_same = now.is_some_and(|now| now.same_but_links(&then));
                let verdict = if read_the_same && written == size {
                    Ok(())
                } else {
                    Err(format!(
                        "the files of {} changed while they were read as layer blob {digest}: \
                         read it again",
                        dir.display()
                    ))
                };
                (verdict, Some(then.stamp()))
            }
            Ok((d, n, _)) => (
                Err(format!(
                    "the files of {} no longer make layer blob {digest} ({size} bytes): they \
                     make {d} ({n} bytes)",
                    dir.display()
                )),
                None,
            ),
            Err(e) => (
                Err(format!(
                    "the files of {} changed since they were hashed as layer blob {digest}, and \
                     hashing them again failed: {e}",
                    dir.display()
                )),
                None,
            ),
        };
        changed(record);
        verdict.map_err(std::io::Error::other)
    }
}

impl TreeTar {
    /// The next piece as the thread made it (None at the end).
    fn next_piece(&mut self) -> std::io::Result<Option<Shared>> {
        if self.ended {
            return Ok(None);
        }
        match self.rx.recv() {
            Ok(Piece::Data(p)) => Ok(Some(p)),
            Ok(Piece::End(stamp)) => {
                self.ended = true;
                self.stamp = stamp;
                Ok(None)
            }
            Ok(Piece::Failed(e)) => {
                self.ended = true;
                Err(e)
            }
            Err(_) => {
                self.ended = true;
                Err(std::io::Error::other("making the layer tar stopped"))
            }
        }
    }
}

impl std::io::Read for TreeTar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(p) = &self.piece {
                let data: &[u8] = p.as_ref().as_ref();
                if self.at < data.len() {
                    let n = buf.len().min(data.len() - self.at);
                    buf[..n].copy_from_slice(&data[self.at..self.at + n]);
                    self.at += n;
                    return Ok(n);
                }
            }
            // Done with this piece (the pool has it back once the hash is done too).
            self.piece = None;
            match self.next_piece()? {
                Some(p) => {
                    self.piece = Some(p);
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn a_tree_tar_is_the_layer_tar_verified_at_its_end_and_may_be_dropped_early() {
        use std::io::Read;
        let d = tempfile::tempdir().expect("tmp");
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("d")).expect("mkdir");
        // More pieces than the channels hold (so the walker waits on the reader and the
        // hash), with a zero-size file and a name past 100 bytes.
        for i in 0..12u8 {
            std::fs::write(upper.join(format!("d/f{i}")), vec![i; (1 << 20) + 333]).expect("write");
        }
        std::fs::write(upper.join("d/empty"), b"").expect("write");
        std::fs::write(upper.join(format!("d/{}", "n".repeat(150))), b"long").expect("write");
        let opts = DiffOptions::default();
        let tar = write_layer(&upper, Vec::new(), &opts).expect("tar");
        let (digest, size) = hash_layer(&upper, &opts).expect("hash");
        assert_eq!((digest.clone(), size), {
            let mut h = HashSink::default();
            h.write_all(&tar).expect("hash");
            h.finish()
        });
        let read = |expected: Digest, size: u64| {
            let mut out = Vec::new();
            TreeTar::spawn(upper.clone(), opts.clone(), expected, size)
                .expect("spawn")
                .read_to_end(&mut out)
                .map(|_| out)
        };
        assert!(
            read(digest.clone(), size).expect("read") == tar,
            "not the layer tar"
        );
        // Bytes that are not the expected blob: the read that ends the stream fails.
        let other = Digest::from_sha256(sha2::Sha256::default());
        let e = read(other.clone(), size).expect_err("another digest");
        assert!(e.to_string().contains("no longer make layer blob"), "{e}");
        assert!(e.to_string().contains(other.as_str()), "{e}");
        // A reader that stops early: the walker and the hash end on their own (a hang
        // here would be a walker left waiting on a channel).
        for _ in 0..20 {
            let mut t =
                TreeTar::spawn(upper.clone(), opts.clone(), digest.clone(), size).expect("spawn");
            let mut first = vec![0u8; 4096];
            t.read_exact(&mut first).expect("read");
            drop(t);
        }
    }

    #[test]
    fn a_vouched_tree_is_not_hashed_while_its_stamp_holds_and_is_hashed_again_once_it_moves() {
        use std::io::Read;
        use std::sync::{Arc, Mutex};
        let d = tempfile::tempdir().expect("tmp");
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("d/e")).expect("mkdir");
        std::fs::write(upper.join("d/big"), vec![7u8; (3 << 20) + 5]).expect("write");
        std::fs::write(upper.join("d/e/small"), b"small").expect("write");
        std::fs::hard_link(upper.join("d/e/small"), upper.join("d/again")).expect("link");
        std::os::unix::fs::symlink("big", upper.join("d/link")).expect("symlink");
        // Times clamped: whether a change alters the tar does not hang on the clock.
        let opts = DiffOptions {
            clamp_mtime: Some(1000),
            exclude: Default::default(),
        };
        let (digest, size, stamp) = hash_layer_stamped(&upper, &opts).expect("hash");
        assert_eq!(
            (digest.clone(), size),
            hash_layer(&upper, &opts).expect("hash")
        );
        let tar = write_layer(&upper, Vec::new(), &opts).expect("tar");
        // A vouched read, and what `changed` was told: not called (None), or called.
        type Told = Option<Option<TreeStamp>>;
        let read = |stamp: TreeStamp, size: u64| -> (std::io::Result<Vec<u8>>, Told) {
            let told = Arc::new(Mutex::new(None));
            let to = told.clone();
            let mut out = Vec::new();
            let r = TreeTar::spawn_vouched(
                upper.clone(),
                opts.clone(),
                digest.clone(),
                size,
                stamp,
                Box::new(move |now| *to.lock().expect("lock") = Some(now)),
            )
            .expect("spawn")
            .read_to_end(&mut out)
            .map(|_| out);
            let told = told.lock().expect("lock").clone();
            (r, told)
        };
        // Nothing moved: the tar, and no second hash (`changed` not called).
        let (r, told) = read(stamp.clone(), size);
        assert!(r.expect("vouched read") == tar, "not the tar");
        assert_eq!(told, None);
        assert_eq!(hash_layer_stamped(&upper, &opts).expect("again").2, stamp);
        // A hard link to a file made elsewhere (as a build context's or a cache
        // snapshot's): only a link count and its change time moved, so the read passes
        // unhashed too. Removed again, the link count is what it was but the change time
        // is not: that read is hashed again at its end (and passes).
        let elsewhere = d.path().join("elsewhere");
        std::fs::hard_link(upper.join("d/e/small"), &elsewhere).expect("link");
        let (r, told) = read(stamp.clone(), size);
        assert!(r.expect("a link made elsewhere") == tar && told.is_none());
        std::fs::remove_file(&elsewhere).expect("unlink");
        let (r, told) = read(stamp.clone(), size);
        assert!(r.expect("a link removed elsewhere") == tar);
        assert!(matches!(told, Some(Some(_))), "not hashed again");
        // The stamp holds but the size is not the blob's: hashed again, refused.
        let (r, told) = read(stamp.clone(), size + 512);
        let e = r.expect_err("another size");
        assert!(e.to_string().contains("no longer make layer blob"), "{e}");
        assert_eq!(told, Some(None));
        // Each change moves the stamp. The read then hashes the files again at its end:
        // it passes, and `changed` gets their stamp now, when they still make the blob
        // (a mode set to what it was, bytes written again as they were, a file added then
        // removed, a symlink made again); it fails when they do not.
        let small = upper.join("d/e/small");
        let set_mtime = |p: &Path, t: std::time::SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(t)))
                .expect("times");
        };
        let changes: [(&str, bool, &dyn Fn()); 6] = [
            ("mode set again", true, &|| {
                let m = std::fs::metadata(&small).expect("stat").permissions();
                std::fs::set_permissions(&small, m).expect("chmod");
            }),
            ("bytes written again", true, &|| {
                let big = upper.join("d/big");
                let t = std::fs::metadata(&big)
                    .and_then(|m| m.modified())
                    .expect("mtime");
                std::fs::write(&big, vec![7u8; (3 << 20) + 5]).expect("write");
                set_mtime(&big, t);
            }),
            ("a file added", false, &|| {
                std::fs::write(upper.join("d/e/new"), b"").expect("write")
            }),
            ("the file removed", true, &|| {
                std::fs::remove_file(upper.join("d/e/new")).expect("rm")
            }),
            ("a symlink made again", true, &|| {
                std::fs::remove_file(upper.join("d/link")).expect("rm");
                std::os::unix::fs::symlink("big", upper.join("d/link")).expect("symlink");
            }),
            ("other bytes of the same size", false, &|| {
                std::fs::write(&small, b"SMALL").expect("write")
            }),
        ];
        let mut now = stamp;
        for (what, same, change) in changes {
            change();
            let (r, told) = read(now.clone(), size);
            let (_, _, next) = hash_layer_stamped(&upper, &opts).expect("hash");
            assert_ne!(next, now, "{what}: the stamp did not move");
            if same {
                assert!(r.expect(what) == tar, "{what}: not the tar");
                assert_eq!(told, Some(Some(next.clone())), "{what}");
                now = next;
            } else {
                let e = r.expect_err(what);
                assert!(
                    e.to_string().contains("no longer make layer blob"),
                    "{what}: {e}"
                );
                assert_eq!(told, Some(None), "{what}");
            }
        }
    }

    #[test]
    fn a_link_count_moved_elsewhere_moves_the_stamp_but_reads_the_same_and_a_mode_does_not() {
        let d = tempfile::tempdir().expect("tmp");
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("d")).expect("mkdir");
        std::fs::write(upper.join("d/f"), b"f").expect("write");
        let opts = DiffOptions::default();
        let (_, _, before) = hash_layer_traced(&upper, &opts).expect("hash");
        // A hard link to the file made elsewhere (as a build context's is): the link
        // count and change time moved, nothing the tar holds did.
        std::fs::hard_link(upper.join("d/f"), d.path().join("elsewhere")).expect("link");
        let (_, _, linked) = hash_layer_traced(&upper, &opts).expect("hash");
        assert_ne!(linked.clone().stamp(), before.clone().stamp());
        assert!(before.same_but_links(&linked) && linked.same_but_links(&before));
        std::fs::remove_file(d.path().join("elsewhere")).expect("unlink");
        let (_, _, unlinked) = hash_layer_traced(&upper, &opts).expect("hash");
        assert!(linked.same_but_links(&unlinked));
        // The control: a mode set to what it was moves the change time alone (the link
        // count stays): not the same.
        let f = upper.join("d/f");
        let m = std::fs::metadata(&f).expect("stat").permissions();
        std::fs::set_permissions(&f, m).expect("chmod");
        let (_, _, chmodded) = hash_layer_traced(&upper, &opts).expect("hash");
        assert!(!unlinked.same_but_links(&chmodded));
        // Nor an extended attribute the tar holds (the change time moves with it).
        rustix::fs::setxattr(
            &f,
            "security.capability",
            &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setxattr");
        let (_, _, capped) = hash_layer_traced(&upper, &opts).expect("hash");
        assert_ne!(
            capped.fixed, chmodded.fixed,
            "the xattr is not in the stamp"
        );
    }

    #[test]
    fn directories_nesting_deeper_than_the_limit_are_refused_and_the_limit_itself_walks() {
        let d = tempfile::tempdir().expect("tmp");
        let upper = d.path().join("upper");
        let chain = |n: usize| {
            let mut p = upper.clone();
            for _ in 0..n {
                p.push("d");
            }
            p
        };
        std::fs::create_dir_all(chain(MAX_DEPTH)).expect("mkdir");
        std::fs::write(chain(MAX_DEPTH).join("f"), b"deep").expect("write");
        let opts = DiffOptions::default();
        // On a thread with a walking thread's stack (every walk of the store's runs on
        // one: a commit's hash and a reader's tar).
        let walk = |upper: PathBuf, opts: DiffOptions| {
            std::thread::Builder::new()
                .stack_size(WALK_STACK)
                .spawn(move || write_layer(&upper, Vec::new(), &opts).map(|t| t.len()))
                .expect("spawn")
                .join()
                .expect("the walk panicked")
        };
        let n = walk(upper.clone(), opts.clone()).expect("the limit itself");
        let (_, size) = hash_layer(&upper, &opts).expect("hash");
        assert_eq!(n as u64, size);
        // One more level: refused, naming the directory.
        std::fs::create_dir(chain(MAX_DEPTH + 1)).expect("mkdir");
        let e = walk(upper.clone(), opts.clone()).expect_err("one level more");
        assert!(e.to_string().contains("nest more than 1024 deep"), "{e}");
        let e = hash_layer(&upper, &opts).expect_err("one level more");
        assert!(e.to_string().contains("nest more than 1024 deep"), "{e}");
    }

    #[test]
    fn a_file_is_copied_to_its_size_and_padded_and_one_that_ends_sooner_fails() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 1000]).expect("write");
        // Through a buffer smaller than the file: several reads.
        let mut buf = vec![0u8; 300];
        let copy = |size: u64, buf: &mut [u8]| {
            let mut out = Vec::new();
            let mut f = std::fs::File::open(&p).expect("open");
            copy_padded(&mut f, &mut out, size, buf).map(|()| out)
        };
        let out = copy(1000, &mut buf).expect("copy");
        assert_eq!(out.len(), 1024);
        assert!(out[..1000].iter().all(|&b| b == 7) && out[1000..].iter().all(|&b| b == 0));
        // A file grown past the size its header says is cut there.
        let out = copy(512, &mut buf).expect("copy");
        assert_eq!(out, vec![7u8; 512]);
        // One shorter than its header says fails, naming what is missing.
        let (side, e) = copy(1500, &mut buf).expect_err("ended early");
        assert_eq!(side, Side::Read);
        assert!(
            e.to_string().contains("500 bytes before its size (1500)"),
            "{e}"
        );
        // A failing write is said to be the write's.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut f = std::fs::File::open(&p).expect("open");
        let (side, _) = copy_padded(&mut f, &mut Full, 1000, &mut buf).expect_err("full");
        assert_eq!(side, Side::Write);
    }

    #[test]
    fn round_trips_through_apply() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: whiteouts need root");
            return;
        }
        let d = tempfile::tempdir().expect("tmp");
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/opq")).expect("mkdir");
        std::fs::write(upper.join("etc/file"), b"data").expect("write");
        std::fs::hard_link(upper.join("etc/file"), upper.join("etc/link")).expect("link");
        std::os::unix::fs::symlink("/etc/file", upper.join("sym")).expect("symlink");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            upper.join("gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .expect("whiteout");
        rustix::fs::setxattr(
            upper.join("etc/opq"),
            crate::apply::opaque_xattr(),
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("opaque");
        std::fs::create_dir(upper.join("proc")).expect("mkdir");
        let opts = DiffOptions {
            clamp_mtime: Some(1000),
            exclude: [PathBuf::from("proc")].into_iter().collect(),
        };
        let tar = write_layer(&upper, Vec::new(), &opts).expect("diff");
        let mut names = Vec::new();
        for e in tar::Archive::new(&tar[..]).entries().expect("entries") {
            let e = e.expect("entry");
            assert!(e.header().mtime().expect("mtime") <= 1000);
            names.push((
                e.path().expect("path").display().to_string(),
                e.header().entry_type(),
            ));
        }
        let just: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            just,
            vec![
                "etc/",
                "etc/file",
                "etc/link",
                "etc/opq/",
                "etc/opq/.wh..wh..opq",
                ".wh.gone",
                "sym"
            ]
        );
        assert_eq!(names[2].1, tar::EntryType::Link);
        // Same input, same bytes.
        assert_eq!(write_layer(&upper, Vec::new(), &opts).expect("again"), tar);
        // And back: apply gives the overlay form again.
        let back = d.path().join("back");
        std::fs::create_dir(&back).expect("mkdir");
        crate::apply::apply_layer(&tar[..], &back).expect("apply");
        assert_eq!(std::fs::read(back.join("etc/link")).expect("link"), b"data");
        assert!(std::fs::symlink_metadata(back.join("gone"))
            .expect("wh")
            .file_type()
            .is_char_device());
        assert!(!back.join("proc").exists());
    }
}
