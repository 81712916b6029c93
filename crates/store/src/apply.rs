//! Unpacks a layer tar into an empty directory in overlayfs form: `.wh.NAME` becomes a 0:0
//! character device, `.wh..wh..opq` the `trusted.overlay.opaque` xattr on its directory.
//!
//! We run as root on untrusted layers, so every entry is checked (STYLE.md §3): names with
//! `..` are refused; nothing is written through a symlink (every parent is resolved with
//! `RESOLVE_NO_SYMLINKS` inside the layer directory); hard links must point at an earlier
//! entry of the same layer; device nodes are not created (reported and skipped: a build
//! container gets its devices from the runtime); overlay's own `trusted.overlay.*` xattrs in
//! the tar are dropped, as they would forge whiteouts or redirects.

use crate::error::{Result, StoreError};
use isula_sys::rooted::{self, Resolve, Root};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// The opaque mark of overlay directories here (`user.overlay.opaque` in a user namespace).
pub fn opaque_xattr() -> &'static str {
    isula_sys::mount::opaque_xattr()
}

/// What an unpack did that the user may want to know.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub entries: u64,
    pub skipped_devices: Vec<String>,
}

fn unsafe_entry(entry: &Path, reason: &'static str) -> StoreError {
    StoreError::UnsafeEntry {
        entry: entry.display().to_string(),
        reason,
    }
}

/// Normalises a tar entry name to a relative path inside the layer. Refuses `..`.
fn entry_path(raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err(unsafe_entry(raw, "path contains '..'")),
            Component::Prefix(_) => return Err(unsafe_entry(raw, "invalid path")),
        }
    }
    Ok(out)
}

fn sys_at(entry: &Path, e: isula_sys::SysError) -> StoreError {
    if e.errno() == Some(rustix::io::Errno::LOOP.raw_os_error())
        || e.errno() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
        || e.errno() == Some(rustix::io::Errno::XDEV.raw_os_error())
    {
        return unsafe_entry(entry, "path goes through a symlink or a non-directory");
    }
    StoreError::Sys(isula_sys::SysError {
        path: entry.to_path_buf(),
        ..e
    })
}

/// Unpacks `layer` (an uncompressed tar stream) into the empty directory `dest`.
pub fn apply_layer<R: Read>(layer: R, dest: &Path) -> Result<ApplyReport> {
    unpack(layer, dest, true, Resolve::NoSymlinks)
}

/// Extracts a plain tar archive (ADD of a local archive) into the existing directory
/// `dest`. Like Docker's chrooted untar, symlinks already there are followed, but only
/// within `dest` (`RESOLVE_IN_ROOT`); `.wh.` names are ordinary files here.
pub fn extract_into<R: Read>(archive: R, dest: &Path) -> Result<ApplyReport> {
    unpack(archive, dest, false, Resolve::InRoot)
}

/// What one unpack may take: file bytes and entries, and the free space it must leave on
/// the file system it writes to. Set once by the daemon (`set_limits`, from
/// configuration.toml); the defaults let any ordinary image through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub min_free: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 10_000_000,
            min_free: 256 << 20,
        }
    }
}

impl Limits {
    pub(crate) fn check_entries(&self, entries: u64, at: &Path) -> Result<()> {
        if entries > self.max_entries {
            return Err(StoreError::TooLarge {
                what: format!(
                    "the archive's number of entries (max_layer_entries in configuration.toml) at {}",
                    at.display()
                ),
                limit: self.max_entries,
            });
        }
        Ok(())
    }

    pub(crate) fn check_bytes(&self, bytes: u64, at: &Path) -> Result<()> {
        if bytes > self.max_bytes {
            return Err(StoreError::TooLarge {
                what: format!(
                    "the archive's unpacked files (max_layer_size in configuration.toml) at {}",
                    at.display()
                ),
                limit: self.max_bytes,
            });
        }
        Ok(())
    }
}

static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();

/// Sets the unpack limits for this process (the first call wins).
pub fn set_limits(l: Limits) {
    let _ = LIMITS.set(l);
}

pub fn limits() -> Limits {
    LIMITS.get().copied().unwrap_or_default()
}

/// How often (in bytes written) an unpack checks the free space.
const SPACE_CHECK_EVERY: u64 = 64 << 20;

/// Fails when the file system of `dir` has less than `min_free` bytes left.
pub fn check_free_space(dir: &Path, min_free: u64) -> Result<()> {
    let st = match rustix::fs::statvfs(dir) {
        Ok(st) => st,
        Err(_) => return Ok(()),
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < min_free {
        return Err(StoreError::NoSpace(format!(
            "no space left for this: the file system of {} has {} free and at least {} must stay free (min_free_space in configuration.toml)",
            dir.display(),
            isula_types::human_size(free),
            isula_types::human_size(min_free)
        )));
    }
    Ok(())
}

/// In a user namespace (a rootless daemon) an owner the namespace does not map cannot be
/// set: refused naming the entry and the mapped range, never left to chown as nobody.
fn check_owner(rel: &Path, uid: u32, gid: u32) -> Result<()> {
    use isula_sys::userns;
    if !userns::in_user_namespace() {
        return Ok(());
    }
    for (which, id, map) in [
        ("uid", uid, userns::uid_map()),
        ("gid", gid, userns::gid_map()),
    ] {
        if !userns::is_mapped(map, id) {
            return Err(StoreError::UnmappedOwner {
                entry: rel.display().to_string(),
                which,
                id,
                mapped: userns::describe_map(map),
                needed: u64::from(id),
            });
        }
    }
    Ok(())
}

/// Handles (`O_PATH`) of the directories entries were last written into, by their path in
/// the layer: a layer's entries come a directory at a time, or round a few directories, and
/// each resolve is an `openat2` walk. A handle is good for as long as nothing on its path
/// was removed or replaced, which only this unpack does: every removal marks the cache
/// stale, and it is emptied before the next entry.
struct Parents {
    map: std::collections::HashMap<PathBuf, std::rc::Rc<std::os::fd::OwnedFd>>,
    stale: bool,
}

/// At most this many handles are kept (then the cache starts again): an unpack holds no
/// more descriptors than this, as several run at once (a pull unpacks three layers) under
/// a soft limit that may be 1024.
const PARENTS_KEPT: usize = 128;

impl Parents {
    fn new() -> Self {
        Parents {
            map: std::collections::HashMap::new(),
            stale: false,
        }
    }

    /// The directory `rel` (created when missing), resolved as `how` says.
    fn dir(
        &mut self,
        root: &Root,
        rel: &Path,
        how: Resolve,
    ) -> isula_sys::Result<std::rc::Rc<std::os::fd::OwnedFd>> {
        if self.stale || self.map.len() >= PARENTS_KEPT {
            self.map.clear();
            self.stale = false;
        }
        if let Some(fd) = self.map.get(rel) {
            return Ok(fd.clone());
        }
        let fd = std::rc::Rc::new(root.dir(rel, how, true)?);
        self.map.insert(rel.to_path_buf(), fd.clone());
        Ok(fd)
    }
}

/// Whether `e` says something is there already.
fn exists(e: &isula_sys::SysError) -> bool {
    e.errno() == Some(rustix::io::Errno::EXIST.raw_os_error())
}

/// Copies what is left of `entry` into `f`, `buf` at a time (one write for a small file).
fn write_entry<R: Read>(entry: &mut R, f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<()> {
    use std::io::Write;
    loop {
        let filled = crate::content::read_full(entry, buf)?;
        if filled == 0 {
            return Ok(());
        }
        f.write_all(&buf[..filled])?;
        if filled < buf.len() {
            return Ok(());
        }
    }
}

fn times_of(mtime: (i64, u32)) -> rustix::fs::Timestamps {
    let ts = rustix::fs::Timespec {
        tv_sec: mtime.0,
        tv_nsec: mtime.1 as _,
    };
    rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

/// What a regular file is written through, a piece at a time.
const WRITE_PIECE: usize = 256 << 10;

fn unpack<R: Read>(
    layer: R,
    dest: &Path,
    whiteouts: bool,
    resolve: Resolve,
) -> Result<ApplyReport> {
    let limits = limits();
    check_free_space(dest, limits.min_free)?;
    let mut bytes: u64 = 0;
    let mut next_space_check = SPACE_CHECK_EVERY;
    let root = Root::open(dest)?;
    let mut parents = Parents::new();
    let mut buf = vec![0u8; WRITE_PIECE];
    let mut archive = tar::Archive::new(layer);
    let mut report = ApplyReport::default();
    let mut dir_times: Vec<(PathBuf, (i64, u32))> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| StoreError::BadTar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| StoreError::BadTar(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| StoreError::BadTar(e.to_string()))?
            .into_owned();
        let rel = entry_path(&raw)?;
        report.entries += 1;
        limits.check_entries(report.entries, &rel)?;
        if rel.as_os_str().is_empty() {
            continue; // the layer root itself ("./")
        }
        let header = entry.header().clone();
        let kind = header.entry_type();
        let name = rel.file_name().unwrap_or_default().to_os_string();
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if whiteouts && name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let pfd = parents
                .dir(&root, parent, resolve)
                .map_err(|e| sys_at(&rel, e))?;
            if name_bytes == OPAQUE_WHITEOUT.as_bytes() {
                rooted::set_xattr(
                    pfd.as_fd(),
                    OsStr::new("."),
                    OsStr::new(opaque_xattr()),
                    b"y",
                )
                .map_err(|e| sys_at(&rel, e))?;
            } else if name_bytes.starts_with(b".wh..wh.") {
                // aufs metadata (.wh..wh.plnk, ...): meaningless for overlay.
            } else {
                let target = OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
                if target.is_empty() || target == ".." || target == "." {
                    return Err(unsafe_entry(&rel, "invalid whiteout name"));
                }
                parents.stale = true;
                rooted::remove_all(pfd.as_fd(), target).map_err(|e| sys_at(&rel, e))?;
                rooted::mknod_whiteout(pfd.as_fd(), target).map_err(|e| sys_at(&rel, e))?;
            }
            continue;
        }

        let parent_fd = parents
            .dir(&root, rel.parent().unwrap_or(Path::new("")), resolve)
            .map_err(|e| sys_at(&rel, e))?;
        let pfd = parent_fd.as_fd();
        // A later entry replaces an earlier one, except dir over dir (merged). A regular
        // file or directory is made at once and looked at only if something is there.
        let fast = matches!(
            kind,
            tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse
                | tar::EntryType::Directory
        );
        if !fast
            && rooted::lstat(pfd, &name)
                .map_err(|e| sys_at(&rel, e))?
                .is_some()
        {
            parents.stale = true;
            rooted::remove_all(pfd, &name).map_err(|e| sys_at(&rel, e))?;
        }
        let mode = header
            .mode()
            .map_err(|e| StoreError::BadTar(e.to_string()))?;
        let uid = header
            .uid()
            .map_err(|e| StoreError::BadTar(e.to_string()))? as u32;
        let gid = header
            .gid()
            .map_err(|e| StoreError::BadTar(e.to_string()))? as u32;
        check_owner(&rel, uid, gid)?;
        let mtime = (header.mtime().unwrap_or(0) as i64, 0u32);
        let mut set_meta = true;
        // A regular file's owner and mode go on through the handle it was written with.
        let mut created: Option<std::fs::File> = None;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                bytes = bytes.saturating_add(entry.size());
                limits.check_bytes(bytes, &rel)?;
                if bytes >= next_space_check {
                    check_free_space(dest, limits.min_free.saturating_add(entry.size()))?;
                    next_space_check = bytes + SPACE_CHECK_EVERY;
                }
                let mut f = match rooted::create_file(pfd, &name, 0o600) {
                    Err(e) if exists(&e) => {
                        parents.stale = true;
                        rooted::remove_all(pfd, &name).map_err(|e| sys_at(&rel, e))?;
                        rooted::create_file(pfd, &name, 0o600)
                    }
                    made => made,
                }
                .map_err(|e| sys_at(&rel, e))?;
                write_entry(&mut entry, &mut f, &mut buf)
                    .map_err(|e| StoreError::io("write", dest.join(&rel), e))?;
                created = Some(f);
            }
            tar::EntryType::Directory => {
                match rooted::mkdir(pfd, &name, 0o700) {
                    Err(e) if exists(&e) => {
                        let st = rooted::lstat(pfd, &name).map_err(|e| sys_at(&rel, e))?;
                        if st.as_ref().is_none_or(|st| !rooted::is_dir(st)) {
                            parents.stale = true;
                            rooted::remove_all(pfd, &name).map_err(|e| sys_at(&rel, e))?;
                            rooted::mkdir(pfd, &name, 0o700)
                        } else {
                            Ok(())
                        }
                    }
                    made => made,
                }
                .map_err(|e| sys_at(&rel, e))?;
                dir_times.push((rel.clone(), mtime));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| StoreError::BadTar(e.to_string()))?
                    .ok_or_else(|| unsafe_entry(&rel, "symlink without target"))?;
                rooted::symlink(target.as_os_str(), pfd, &name).map_err(|e| sys_at(&rel, e))?;
                rooted::lchown(pfd, &name, uid, gid).map_err(|e| sys_at(&rel, e))?;
                rooted::set_times(pfd, &name, mtime).map_err(|e| sys_at(&rel, e))?;
                set_meta = false;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| StoreError::BadTar(e.to_string()))?
                    .ok_or_else(|| unsafe_entry(&rel, "hard link without target"))?;
                let target = entry_path(&target)
                    .map_err(|_| unsafe_entry(&rel, "hard link target contains '..'"))?;
                let (tfd, tname) = root.parent(&target, resolve, false).map_err(|_| {
                    unsafe_entry(
                        &rel,
                        "hard link target is not an earlier entry of this layer",
                    )
                })?;
                if rooted::lstat(tfd.as_fd(), &tname)
                    .map_err(|e| sys_at(&rel, e))?
                    .is_none()
                {
                    return Err(unsafe_entry(
                        &rel,
                        "hard link target is not an earlier entry of this layer",
                    ));
                }
                rooted::hardlink(tfd.as_fd(), &tname, pfd, &name).map_err(|e| sys_at(&rel, e))?;
                set_meta = false; // shares the target's inode and metadata
            }
            tar::EntryType::Fifo => {
                rooted::mkfifo(pfd, &name, 0o600).map_err(|e| sys_at(&rel, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                report.skipped_devices.push(rel.display().to_string());
                continue;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => return Err(unsafe_entry(&rel, "unsupported tar entry type")),
        }
        if set_meta {
            // chown clears set-id bits, so the mode goes on after it.
            match &created {
                Some(f) => {
                    rustix::fs::fchown(
                        f,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(|e| {
                        sys_at(&rel, isula_sys::SysError::new("chown", dest.join(&rel), e))
                    })?;
                    rustix::fs::fchmod(f, rustix::fs::Mode::from_raw_mode(mode & 0o7777)).map_err(
                        |e| sys_at(&rel, isula_sys::SysError::new("chmod", dest.join(&rel), e)),
                    )?;
                }
                None => {
                    rooted::lchown(pfd, &name, uid, gid).map_err(|e| sys_at(&rel, e))?;
                    rooted::chmod(pfd, &name, mode).map_err(|e| sys_at(&rel, e))?;
                }
            }
            if let Some(exts) = entry
                .pax_extensions()
                .map_err(|e| StoreError::BadTar(e.to_string()))?
            {
                for ext in exts {
                    let ext = ext.map_err(|e| StoreError::BadTar(e.to_string()))?;
                    if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        if xattr_allowed(key) {
                            let key: OsString = OsStr::from_bytes(key).to_os_string();
                            if let Err(e) = rooted::set_xattr(pfd, &name, &key, ext.value_bytes()) {
                                tracing::warn!(entry = %rel.display(), error = %e, "xattr not applied");
                            }
                        }
                    }
                }
            }
            match &created {
                Some(f) => rustix::fs::futimens(f, &times_of(mtime)).map_err(|e| {
                    sys_at(&rel, isula_sys::SysError::new("utimes", dest.join(&rel), e))
                })?,
                None if kind != tar::EntryType::Directory => {
                    rooted::set_times(pfd, &name, mtime).map_err(|e| sys_at(&rel, e))?
                }
                None => {}
            }
        }
    }
    // Directory times last: creating their children changed them.
    for (rel, mtime) in dir_times.into_iter().rev() {
        if let Ok((pfd, name)) = root.parent(&rel, resolve, false) {
            rooted::set_times(pfd.as_fd(), &name, mtime).map_err(|e| sys_at(&rel, e))?;
        }
    }
    Ok(report)
}

/// What a validated layer holds so far: directories and symlinks by path, every other
/// entry by a hash of its path.
#[derive(Default)]
struct Seen {
    tree: std::collections::BTreeMap<PathBuf, Kind>,
    others: std::collections::HashSet<u128>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Symlink,
    Other,
}

fn path_hash(p: &Path) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        p.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

impl Seen {
    fn get(&self, p: &Path) -> Option<Kind> {
        match self.tree.get(p) {
            Some(k) => Some(*k),
            None => self.others.contains(&path_hash(p)).then_some(Kind::Other),
        }
    }

    /// Removes `p` and the directories and symlinks under it (other entries under it are
    /// unreachable anyway once `p` is something else).
    fn remove(&mut self, p: &Path) {
        let under: Vec<PathBuf> = self
            .tree
            .range(p.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(p))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.tree.remove(&k);
        }
        self.others.remove(&path_hash(p));
    }

    fn insert(&mut self, p: PathBuf, k: Kind) {
        match k {
            Kind::Other => {
                self.others.insert(path_hash(&p));
            }
            _ => {
                self.tree.insert(p, k);
            }
        }
    }

    /// Every parent of `rel` is (or, with `create`, becomes) a directory; none may be a
    /// symlink or a file. False when one is missing and `create` is not set.
    fn parents(&mut self, rel: &Path, create: bool) -> Result<bool> {
        let mut at = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            at.push(c);
            match self.get(&at) {
                Some(Kind::Dir) => {}
                Some(Kind::Symlink | Kind::Other) => {
                    return Err(unsafe_entry(
                        rel,
                        "path goes through a symlink or a non-directory",
                    ))
                }
                None if create => self.insert(at.clone(), Kind::Dir),
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// Checks a layer tar as [`apply_layer`] would unpack it, without writing anything: the
/// same limits and refusals (`..`, paths through a symlink or a non-directory, hard links
/// that are no earlier entry, bad whiteouts, unsupported entry types, unparsable header
/// fields), for a layer that is stored now and unpacked later. Reads the whole stream.
/// Memory stays small: directories and symlinks are kept by path, other entries only as a
/// 128-bit hash of their path. (Anything this misses, the unpack still refuses.)
pub fn validate_layer<R: Read>(layer: R) -> Result<ApplyReport> {
    let limits = limits();
    let bad = |e: io::Error| StoreError::BadTar(e.to_string());
    let mut archive = tar::Archive::new(layer);
    let mut report = ApplyReport::default();
    let mut seen = Seen::default();
    let mut bytes: u64 = 0;
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.into_owned();
        let rel = entry_path(&raw)?;
        report.entries += 1;
        limits.check_entries(report.entries, &rel)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        let name_bytes = rel.file_name().unwrap_or_default().as_bytes().to_vec();
        seen.parents(&rel, true)?;
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            if name_bytes == OPAQUE_WHITEOUT.as_bytes() || name_bytes.starts_with(b".wh..wh.") {
                continue;
            }
            let target = OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
            if target.is_empty() || target == ".." || target == "." {
                return Err(unsafe_entry(&rel, "invalid whiteout name"));
            }
            let at = rel.with_file_name(target);
            seen.remove(&at);
            seen.insert(at, Kind::Other);
            continue;
        }
        let existing = seen.get(&rel);
        if !(kind == tar::EntryType::Directory && existing == Some(Kind::Dir)) {
            seen.remove(&rel);
        }
        // The fields the unpack reads must parse.
        let header = entry.header();
        header.mode().map_err(bad)?;
        let uid = header.uid().map_err(bad)? as u32;
        let gid = header.gid().map_err(bad)? as u32;
        if !matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            check_owner(&rel, uid, gid)?;
        }
        let now = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                bytes = bytes.saturating_add(entry.size());
                limits.check_bytes(bytes, &rel)?;
                Kind::Other
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => {
                entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| unsafe_entry(&rel, "symlink without target"))?;
                Kind::Symlink
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| unsafe_entry(&rel, "hard link without target"))?;
                let target = entry_path(&target)
                    .map_err(|_| unsafe_entry(&rel, "hard link target contains '..'"))?;
                let earlier = seen.parents(&target, false).unwrap_or(false)
                    && seen.get(&target).is_some_and(|k| k != Kind::Dir);
                if !earlier {
                    return Err(unsafe_entry(
                        &rel,
                        "hard link target is not an earlier entry of this layer",
                    ));
                }
                Kind::Other
            }
            tar::EntryType::Fifo => Kind::Other,
            tar::EntryType::Char | tar::EntryType::Block => {
                report.skipped_devices.push(rel.display().to_string());
                continue;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => return Err(unsafe_entry(&rel, "unsupported tar entry type")),
        };
        seen.insert(rel, now);
    }
    Ok(report)
}

/// Extended attributes a layer may carry. `trusted.*` (overlay's own metadata among them)
/// and `security.selinux` labels from elsewhere are dropped.
/// `user.overlay.*` is overlay's own metadata in a user namespace (`userxattr`): dropped
/// everywhere, so a layer forges no whiteout there and root and rootless stores agree.
fn xattr_allowed(key: &[u8]) -> bool {
    (key.starts_with(b"user.") && !key.starts_with(b"user.overlay."))
        || key == b"security.capability"
        || key.starts_with(b"system.posix_acl_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o4755
            });
            h.set_uid(1000);
            h.set_gid(1001);
            h.set_mtime(1_600_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link");
            }
            // set_path refuses `..`; write names raw to test our own checks.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    /// Later entries replace earlier ones at the same path, and a directory written into
    /// before is not written into after it was replaced (its handle is remembered).
    #[test]
    fn replacements_never_write_into_a_directory_that_was_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![7u8; WRITE_PIECE * 2 + 5];
        let tar = tar_of(&[
            ("a/", tar::EntryType::Directory, b"", None),
            ("a/x", tar::EntryType::Regular, b"old x", None),
            ("a", tar::EntryType::Regular, b"a file now", None),
            ("a/", tar::EntryType::Directory, b"", None),
            ("a/y", tar::EntryType::Regular, b"y", None),
            ("b/c/", tar::EntryType::Directory, b"", None),
            ("b/c/f", tar::EntryType::Regular, b"f", None),
            ("b/.wh.c", tar::EntryType::Regular, b"", None),
            ("b/c/", tar::EntryType::Directory, b"", None),
            ("b/c/g", tar::EntryType::Regular, b"g", None),
            ("f", tar::EntryType::Regular, b"first", None),
            ("f", tar::EntryType::Regular, &big, None),
            ("l", tar::EntryType::Regular, b"target", None),
            ("m", tar::EntryType::Link, b"", Some("l")),
            ("l", tar::EntryType::Regular, b"new", None),
            ("s/", tar::EntryType::Directory, b"", None),
            ("s/in", tar::EntryType::Regular, b"in", None),
            ("s", tar::EntryType::Symlink, b"", Some("t")),
        ]);
        apply_layer(&tar[..], dir.path()).expect("apply");
        let d = dir.path();
        let names = |p: &str| {
            let mut n: Vec<String> = std::fs::read_dir(d.join(p))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names("a"), ["y"]);
        // The whiteout removed c and its f; the later c holds g (and the whiteout's mark
        // went with the directory it stood for).
        assert_eq!(names("b/c"), ["g"]);
        assert_eq!(std::fs::read(d.join("f")).expect("f"), big);
        // A replaced file is a new inode: the hard link keeps the old contents.
        assert_eq!(std::fs::read(d.join("m")).expect("m"), b"target");
        assert_eq!(std::fs::read(d.join("l")).expect("l"), b"new");
        assert_eq!(
            std::fs::read_link(d.join("s")).expect("s").to_str(),
            Some("t")
        );
    }

    #[test]
    fn unpacks_with_overlay_whiteouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar = tar_of(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/passwd", tar::EntryType::Regular, b"root:x:0:0", None),
            ("etc/link", tar::EntryType::Link, b"", Some("etc/passwd")),
            ("etc/sym", tar::EntryType::Symlink, b"", Some("/etc/passwd")),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", None),
            ("opq/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            ("dev/null", tar::EntryType::Char, b"", None),
        ]);
        let checked = validate_layer(&tar[..]).expect("validate");
        let report = apply_layer(&tar[..], dir.path()).expect("apply");
        assert_eq!(checked.entries, report.entries);
        assert_eq!(checked.skipped_devices, report.skipped_devices);
        let d = dir.path();
        assert_eq!(
            std::fs::read(d.join("etc/passwd")).expect("read"),
            b"root:x:0:0"
        );
        let m = std::fs::metadata(d.join("etc/passwd")).expect("stat");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o4755));
        assert_eq!(m.nlink(), 2);
        assert_eq!(
            std::fs::read_link(d.join("etc/sym"))
                .expect("link")
                .to_str(),
            Some("/etc/passwd")
        );
        let wh = std::fs::symlink_metadata(d.join("etc/gone")).expect("whiteout");
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        let mut v = [0u8; 4];
        let n =
            rustix::fs::lgetxattr(d.join("opq").as_path(), opaque_xattr(), &mut v).expect("opaque");
        assert_eq!(&v[..n], b"y");
        assert_eq!(report.skipped_devices, vec!["dev/null".to_string()]);
        assert!(!d.join("dev/null").exists());
        assert_eq!(
            std::fs::metadata(d.join("etc")).expect("dir").mtime(),
            1_600_000_000
        );
    }

    #[test]
    fn validation_follows_replacements_whiteouts_and_links_as_the_unpack_does() {
        let ok = [
            // A file replaced by a directory, then written into.
            tar_of(&[
                ("a", tar::EntryType::Regular, b"x", None),
                ("a/", tar::EntryType::Directory, b"", None),
                ("a/b", tar::EntryType::Regular, b"y", None),
            ]),
            // A link to a file whose parent was made implicitly; a symlink replaced by a
            // directory.
            tar_of(&[
                ("d/e/f", tar::EntryType::Regular, b"z", None),
                ("g", tar::EntryType::Link, b"", Some("d/e/f")),
                ("s", tar::EntryType::Symlink, b"", Some("d")),
                ("s/", tar::EntryType::Directory, b"", None),
                ("s/t", tar::EntryType::Regular, b"", None),
            ]),
        ];
        for (i, t) in ok.iter().enumerate() {
            validate_layer(&t[..]).unwrap_or_else(|e| panic!("ok case {i}: {e}"));
            let dest = tempfile::tempdir().expect("tempdir");
            apply_layer(&t[..], dest.path()).unwrap_or_else(|e| panic!("ok case {i}: {e}"));
        }
        let refused = [
            // Into a file.
            tar_of(&[
                ("a", tar::EntryType::Regular, b"x", None),
                ("a/b", tar::EntryType::Regular, b"y", None),
            ]),
            // Through a symlink made earlier in the layer.
            tar_of(&[
                ("d/", tar::EntryType::Directory, b"", None),
                ("s", tar::EntryType::Symlink, b"", Some("d")),
                ("s/x", tar::EntryType::Regular, b"y", None),
            ]),
            // A link to a later entry.
            tar_of(&[
                ("g", tar::EntryType::Link, b"", Some("f")),
                ("f", tar::EntryType::Regular, b"x", None),
            ]),
        ];
        // A header field the unpack cannot parse (an empty uid).
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"x"[..]).expect("append");
        let refused: Vec<Vec<u8>> = refused
            .into_iter()
            .chain([b.into_inner().expect("tar")])
            .collect();
        for (i, t) in refused.iter().enumerate() {
            let dest = tempfile::tempdir().expect("tempdir");
            apply_layer(&t[..], dest.path()).expect_err(&format!("refused case {i}: apply"));
            validate_layer(&t[..]).expect_err(&format!("refused case {i}: validate"));
        }
    }

    #[test]
    fn refuses_escapes() {
        let outside = tempfile::tempdir().expect("tempdir");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"host").expect("write");
        let victim_s = victim.to_str().expect("utf8").to_string();
        let dir_s = outside.path().to_str().expect("utf8").to_string();
        let cases: Vec<Vec<u8>> = vec![
            tar_of(&[("../escape", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[("a/../../escape", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[
                ("out", tar::EntryType::Symlink, b"", Some(&dir_s)),
                ("out/victim", tar::EntryType::Regular, b"pwned", None),
            ]),
            tar_of(&[
                (
                    "out",
                    tar::EntryType::Symlink,
                    b"",
                    Some("../../../../../../"),
                ),
                ("out/x", tar::EntryType::Regular, b"pwned", None),
            ]),
            tar_of(&[("h", tar::EntryType::Link, b"", Some(&victim_s))]),
            tar_of(&[("h", tar::EntryType::Link, b"", Some("../victim"))]),
            tar_of(&[
                ("out", tar::EntryType::Symlink, b"", Some(&dir_s)),
                ("out/.wh.victim", tar::EntryType::Regular, b"", None),
            ]),
        ];
        for (i, t) in cases.iter().enumerate() {
            // Refused by the check of a layer kept packed, too.
            let err = validate_layer(&t[..]).expect_err(&format!("case {i}: validate must fail"));
            assert!(
                matches!(err, StoreError::UnsafeEntry { .. }),
                "case {i}: {err}"
            );
            let dest = tempfile::tempdir().expect("tempdir");
            let err = apply_layer(&t[..], dest.path()).expect_err(&format!("case {i} must fail"));
            assert!(
                matches!(err, StoreError::UnsafeEntry { .. }),
                "case {i}: {err}"
            );
            assert_eq!(std::fs::read(&victim).expect("victim"), b"host", "case {i}");
            assert!(!outside.path().join("x").exists());
        }
    }
}
