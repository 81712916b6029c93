//! A COPY that misses the cache usually changes few files: the files it would write exactly
//! as the previous version of the same step wrote them (same destination, content, mode,
//! owner and mtime) are hard links to that version's snapshot instead of new copies.
//! Snapshots are never written once recorded, so sharing their inodes is safe.
//!
//! During the copy (through the step's overlay) such a file is left out; once the overlay
//! is unmounted, a link to the old one is made in its place and its directory's mtime put
//! back, so the step's upper directory is exactly what a full copy makes. Each COPY snapshot keeps a note of what it wrote (`copied.json`) for the next
//! version.

use crate::cache_key::{ContextHashes, Sha};
use isula_sys::rooted::{Resolve, Root};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    /// The step's rootfs mount (its real path), to name destinations in the upper directory.
    mount: PathBuf,
    plan: Plan,
}

/// What to do once the step's overlay is unmounted.
#[derive(Default)]
pub struct Plan {
    old: Option<Root>,
    facts: BTreeMap<String, Fact>,
    links: std::collections::BTreeSet<String>,
}

impl<'a> Reuse<'a> {
    /// `old_diff`/`old_note`: the previous version's snapshot and its note, when there is
    /// one; `mount`: where the step's rootfs is mounted.
    pub fn new(
        hashes: &'a ContextHashes,
        old: Option<(PathBuf, PathBuf)>,
        mount: &Path,
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
            mount: std::fs::canonicalize(mount).unwrap_or_else(|_| mount.to_path_buf()),
            plan: Plan::default(),
        }
    }

    /// The destination of `name` in `pdir`, relative to the rootfs (asked of the kernel
    /// each time: inode numbers in an overlay are no safe key).
    fn dest_rel(&self, pdir: BorrowedFd<'_>, name: &OsStr) -> Option<String> {
        let dir = std::fs::read_link(format!("/proc/self/fd/{}", pdir.as_raw_fd())).ok()?;
        let joined = dir.strip_prefix(&self.mount).ok()?.join(name);
        Some(joined.to_str()?.to_string())
    }

    /// Something else is written at `name` in `pdir`: a link planned there is dropped.
    pub(crate) fn unplan(&mut self, pdir: BorrowedFd<'_>, name: &OsStr) {
        if self.plan.links.is_empty() {
            return;
        }
        if let Some(dest) = self.dest_rel(pdir, name) {
            self.plan.links.remove(&dest);
            self.plan.facts.remove(&dest);
        }
    }

    /// A regular file the copy is about to write: notes what it will be, and says whether
    /// the previous version has exactly it (then the caller leaves it to [`Plan::finish`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_file(
        &mut self,
        src_rel: &str,
        st: &rustix::fs::Stat,
        pdir: BorrowedFd<'_>,
        name: &OsStr,
        mode: u32,
        owner: (u32, u32),
        mtime: (i64, u32),
    ) -> bool {
        let Some(sum) = self.hashes.known(src_rel, st) else {
            return false;
        };
        let Some(dest) = self.dest_rel(pdir, name) else {
            return false;
        };
        let fact = Fact {
            sha256: sum,
            mode,
            uid: owner.0,
            gid: owner.1,
            mtime,
            size: st.st_size as u64,
        };
        let same = self.old.as_ref().is_some_and(|(root, facts)| {
            facts.get(&dest) == Some(&fact) && old_file_is(root, &dest, fact.size)
        });
        if same {
            self.plan.links.insert(dest.clone());
        }
        self.plan.facts.insert(dest, fact);
        same
    }

    pub fn into_plan(mut self) -> Plan {
        self.plan.old = self.old.map(|(root, _)| root);
        self.plan
    }
}

/// The old snapshot still holds a regular file of `size` bytes at `rel`.
fn old_file_is(root: &Root, rel: &str, size: u64) -> bool {
    root.open_at(
        Path::new(rel),
        Resolve::InRoot,
        OFlags::PATH | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .ok()
    .and_then(|fd| rustix::fs::fstat(&fd).ok())
    .is_some_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_size as u64 == size
    })
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
        if let Some(old) = &self.old {
            let up = Root::open(upper).map_err(|e| format!("{}: {e}", upper.display()))?;
            let mut by_dir: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for rel in &self.links {
                let (dir, _) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
                by_dir.entry(dir).or_default().push(rel);
            }
            for (dir, files) in by_dir {
                let dir_path = if dir.is_empty() { "." } else { dir };
                let dfd = up
                    .dir(Path::new(dir_path), Resolve::InRoot, false)
                    .map_err(|e| format!("{dir_path}: {e}"))?;
                let before = rustix::fs::fstat(&dfd).map_err(|e| format!("{dir_path}: {e}"))?;
                for rel in files {
                    link_one(old, &dfd, rel)?;
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

/// Links the old snapshot's `rel` into `dir` (over a whiteout the copy left there).
fn link_one(old: &Root, dir: &std::os::fd::OwnedFd, rel: &str) -> R<()> {
    let name = Path::new(rel)
        .file_name()
        .ok_or_else(|| format!("{rel}: no file name"))?;
    let src = old
        .open_at(
            Path::new(rel),
            Resolve::InRoot,
            OFlags::PATH | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| format!("{rel}: {e}"))?;
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
