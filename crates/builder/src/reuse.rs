//! A COPY that misses the cache usually changes few files: the files it would write exactly
//! as the previous version of the same step wrote them (same destination, content, mode,
//! owner and mtime) are hard links to that version's snapshot instead of new copies.
//! Snapshots are never written once recorded, so sharing their inodes is safe.
//!
//! During the copy (through the step's overlay) such a file is left out; once the overlay
//! is unmounted, a link to the old one is made in its place and its directory's mtime put
//! back, so the step's upper directory is exactly what a full copy makes. Each COPY snapshot keeps a note of what it wrote (`copied.json`) for the next
//! version.
//!
//! A COPY from a context the daemon synced (whose files are never written nor changed in
//! place: `BuildOptions::synced_context`) links the context's own file the same way where
//! the layer's file would be exactly it: same owner, mode and mtime (a link shares the
//! inode's metadata), and in no layer yet (a link count of one), so that no two paths of a
//! layer, nor of the squash of a stage's steps, share an inode a copy would not share. A
//! changed context file is a new inode in a new tree, so the layer never changes with it.

use crate::cache_key::{ContextHashes, Sha};
use isula_sys::rooted::{Resolve, Root};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The note beside a COPY snapshot's diff.
pub const NOTE: &str = "copied.json";

/// What a COPY wrote at one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    sha256: Sha,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    size: u64,
}

type R<T> = Result<T, String>;

/// Planning during one COPY.
pub struct Reuse<'a> {
    hashes: &'a ContextHashes,
    /// The previous version's diff directory and what it wrote.
    old: Option<(Root, HashMap<String, Fact>)>,
    /// The synced context the files come from, whose files may be linked.
    context: Option<Root>,
    /// The step's rootfs mount (its real path), to name destinations in the upper directory.
    mount: PathBuf,
    /// The destination directory last named, and its path under `mount` (None: not under
    /// it): a directory's files come one after another, so it is asked of the kernel once.
    last_dir: Option<(Arc<OwnedFd>, Option<PathBuf>)>,
    plan: Plan,
}

/// What to do once the step's overlay is unmounted.
#[derive(Default)]
pub struct Plan {
    old: Option<Root>,
    context: Option<Root>,
    facts: BTreeMap<String, Fact>,
    /// Each destination to link, and from where.
    links: BTreeMap<String, LinkFrom>,
    /// The inodes (device, inode) linked: each at one destination only.
    inodes: std::collections::HashSet<(u64, u64)>,
}

/// Where a planned link comes from.
enum LinkFrom {
    /// The previous version's file at the same destination.
    Old,
    /// The context's file at this path, which must still be this inode.
    Context(String, (u64, u64)),
}

impl<'a> Reuse<'a> {
    /// `old_diff`/`old_note`: the previous version's snapshot and its note, when there is
    /// one; `mount`: where the step's rootfs is mounted; `context`: the synced context the
    /// files come from, whose files may be linked (None: a context the client may change).
    pub fn new(
        hashes: &'a ContextHashes,
        old: Option<(PathBuf, PathBuf)>,
        mount: &Path,
        context: Option<&Path>,
    ) -> Reuse<'a> {
        let old = old.and_then(|(diff, note)| {
            let facts: HashMap<String, Fact> = std::fs::File::open(&note)
                .ok()
                .and_then(|f| serde_json::from_reader(std::io::BufReader::new(f)).ok())?;
            Some((Root::open(&diff).ok()?, facts))
        });
        Reuse {
            hashes,
            old,
            context: context.and_then(|c| Root::open(c).ok()),
            mount: std::fs::canonicalize(mount).unwrap_or_else(|_| mount.to_path_buf()),
            last_dir: None,
            plan: Plan::default(),
        }
    }

    /// The destination of `name` in `pdir`, relative to the rootfs: the directory's path is
    /// asked of the kernel (inode numbers in an overlay are no safe key), once per handle.
    /// The handle is held while it is the last one asked about, so its number cannot name
    /// another directory meanwhile; and the copy renames no directory.
    fn dest_rel(&mut self, pdir: &Arc<OwnedFd>, name: &OsStr) -> Option<String> {
        let known = matches!(&self.last_dir, Some((d, _)) if Arc::ptr_eq(d, pdir));
        if !known {
            let dir = std::fs::read_link(format!("/proc/self/fd/{}", pdir.as_raw_fd()))
                .ok()
                .and_then(|d| d.strip_prefix(&self.mount).ok().map(Path::to_path_buf));
            self.last_dir = Some((pdir.clone(), dir));
        }
        let dir = self.last_dir.as_ref()?.1.as_ref()?;
        Some(dir.join(name).to_str()?.to_string())
    }

    /// Something else is written at `name` in `pdir`: a link planned there is dropped.
    pub(crate) fn unplan(&mut self, pdir: &Arc<OwnedFd>, name: &OsStr) {
        if self.plan.links.is_empty() {
            return;
        }
        if let Some(dest) = self.dest_rel(pdir, name) {
            self.plan.links.remove(&dest);
            self.plan.facts.remove(&dest);
        }
    }

    /// The directory at `name` in `pdir` is about to be removed (a later source writes
    /// something else there): what was planned below it goes with it (its links would be
    /// made in a directory that is no longer there). Not for a directory a later source's
    /// directory merges into: what is planned in it stays.
    pub(crate) fn unplan_below(&mut self, pdir: &Arc<OwnedFd>, name: &OsStr) {
        if self.plan.links.is_empty() && self.plan.facts.is_empty() {
            return;
        }
        if let Some(dest) = self.dest_rel(pdir, name) {
            let under = format!("{dest}/");
            let mut below = keys_under(&self.plan.facts, &under);
            below.extend(keys_under(&self.plan.links, &under));
            for k in &below {
                self.plan.links.remove(k);
                self.plan.facts.remove(k);
            }
        }
    }

    /// A regular file the copy is about to write: notes what it will be, and says whether
    /// the previous version or the synced context has exactly it (then the caller leaves
    /// it to [`Plan::finish`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_file(
        &mut self,
        src_rel: &str,
        st: &rustix::fs::Stat,
        pdir: &Arc<OwnedFd>,
        name: &OsStr,
        mode: u32,
        owner: (u32, u32),
        mtime: (i64, u32),
    ) -> bool {
        let sum = self.hashes.known(src_rel, st);
        // The context's file is what the layer's would be, and in no layer yet.
        let context_has_it = self.context.is_some()
            && st.st_nlink == 1
            && (st.st_uid, st.st_gid) == owner
            && st.st_mode & 0o7777 == mode
            && (st.st_mtime, st.st_mtime_nsec as u32) == mtime;
        if sum.is_none() && !context_has_it {
            return false;
        }
        let Some(dest) = self.dest_rel(pdir, name) else {
            return false;
        };
        if let Some(sum) = sum {
            let fact = Fact {
                sha256: sum,
                mode,
                uid: owner.0,
                gid: owner.1,
                mtime,
                size: st.st_size as u64,
            };
            let old_inode = self.old.as_ref().and_then(|(root, facts)| {
                (facts.get(&dest) == Some(&fact))
                    .then(|| old_file(root, &dest, fact.size))
                    .flatten()
            });
            self.plan.facts.insert(dest.clone(), fact);
            if let Some(ino) = old_inode {
                if self.plan.inodes.insert(ino) {
                    self.plan.links.insert(dest, LinkFrom::Old);
                    return true;
                }
            }
        }
        let ino = (st.st_dev, st.st_ino);
        if context_has_it && self.plan.inodes.insert(ino) {
            self.plan
                .links
                .insert(dest, LinkFrom::Context(src_rel.to_string(), ino));
            return true;
        }
        false
    }

    pub fn into_plan(mut self) -> Plan {
        self.plan.old = self.old.map(|(root, _)| root);
        self.plan.context = self.context;
        self.plan
    }
}

/// The keys of `map` that start with `prefix` (they sort together).
fn keys_under<V>(map: &BTreeMap<String, V>, prefix: &str) -> Vec<String> {
    map.range(prefix.to_string()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

/// The inode (device, inode) of the regular file of `size` bytes the old snapshot still
/// holds at `rel`, if it does.
fn old_file(root: &Root, rel: &str, size: u64) -> Option<(u64, u64)> {
    root.open_at(
        Path::new(rel),
        Resolve::InRoot,
        OFlags::PATH | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .ok()
    .and_then(|fd| rustix::fs::fstat(&fd).ok())
    .filter(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_size as u64 == size
    })
    .map(|st| (st.st_dev, st.st_ino))
}

impl Plan {
    /// How many files came from the previous version.
    pub fn linked(&self) -> usize {
        self.links.len()
    }

    /// Links the previous version's files into `upper` (the unmounted step's diff) where
    /// the copy left them out, keeps the mtimes of their directories, and writes the note
    /// of what this copy wrote to `note`.
    pub fn finish(self, upper: &Path, note: &Path) -> R<()> {
        if !self.links.is_empty() {
            let up = Root::open(upper).map_err(|e| format!("{}: {e}", upper.display()))?;
            let mut by_dir: BTreeMap<&str, Vec<(&str, &LinkFrom)>> = BTreeMap::new();
            for (rel, from) in &self.links {
                let (dir, _) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
                by_dir.entry(dir).or_default().push((rel.as_str(), from));
            }
            for (dir, files) in by_dir {
                let dir_path = if dir.is_empty() { "." } else { dir };
                let dfd = up
                    .dir(Path::new(dir_path), Resolve::InRoot, false)
                    .map_err(|e| format!("{dir_path}: {e}"))?;
                let before = rustix::fs::fstat(&dfd).map_err(|e| format!("{dir_path}: {e}"))?;
                for (rel, from) in files {
                    let src = match from {
                        LinkFrom::Old => self.old.as_ref().map(|old| (old, rel, None)),
                        LinkFrom::Context(src_rel, ino) => self
                            .context
                            .as_ref()
                            .map(|c| (c, src_rel.as_str(), Some(*ino))),
                    };
                    let (root, src_rel, ino) =
                        src.ok_or_else(|| format!("{rel}: nothing to link it from"))?;
                    link_one(root, src_rel, ino, &dfd, rel)?;
                }
                let times = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: before.st_atime,
                        tv_nsec: before.st_atime_nsec as _,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: before.st_mtime,
                        tv_nsec: before.st_mtime_nsec as _,
                    },
                };
                rustix::fs::utimensat(&dfd, ".", &times, AtFlags::empty())
                    .map_err(|e| format!("{dir_path}: {e}"))?;
            }
        }
        let f = std::fs::File::create(note).map_err(|e| format!("{}: {e}", note.display()))?;
        let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
        serde_json::to_writer(&mut w, &self.facts)
            .map_err(|e| format!("{}: {e}", note.display()))?;
        std::io::Write::flush(&mut w).map_err(|e| format!("{}: {e}", note.display()))
    }
}

/// Links `src_rel` of `from` (which must be inode `ino`, when given) as `rel` into `dir`,
/// its directory (over a whiteout the copy left there).
fn link_one(
    from: &Root,
    src_rel: &str,
    ino: Option<(u64, u64)>,
    dir: &std::os::fd::OwnedFd,
    rel: &str,
) -> R<()> {
    let name = Path::new(rel)
        .file_name()
        .ok_or_else(|| format!("{rel}: no file name"))?;
    let src = from
        .open_at(
            Path::new(src_rel),
            Resolve::InRoot,
            OFlags::PATH | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| format!("{src_rel}: {e}"))?;
    if let Some(ino) = ino {
        let st = rustix::fs::fstat(&src).map_err(|e| format!("{src_rel}: {e}"))?;
        if (st.st_dev, st.st_ino) != ino
            || rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
        {
            return Err(format!("{src_rel}: the source changed while it was copied"));
        }
    }
    match rustix::fs::linkat(&src, "", dir.as_fd(), name, AtFlags::EMPTY_PATH) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(format!("{rel}: linking the unchanged file: {e}")),
    }
    let mut tmp = b".isula-link.".to_vec();
    tmp.extend_from_slice(name.as_bytes());
    let tmp = OsStr::from_bytes(&tmp);
    let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
    rustix::fs::linkat(&src, "", dir.as_fd(), tmp, AtFlags::EMPTY_PATH)
        .map_err(|e| format!("{rel}: linking the unchanged file: {e}"))?;
    rustix::fs::renameat(dir, tmp, dir, name).map_err(|e| format!("{rel}: {e}"))
}
