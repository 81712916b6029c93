//! COPY and ADD: Docker's source and destination rules, with every path resolved inside its
//! root. Sources are looked up in the build context (minus .dockerignore) or another
//! stage's rootfs, following symlinks only within that root; destinations are written
//! through the rootfs handle, so neither a context symlink nor a link made by an earlier RUN
//! can lead outside.

use isula_dockerfile::ignore::{clean, component_match, has_wildcards, Matcher};
use isula_sys::rooted::{self, Resolve, Root};
use rustix::fs::{FileType, Mode, OFlags};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where sources come from.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub root: &'a Root,
    /// The context's .dockerignore (None for a stage or image).
    pub ignore: Option<&'a Matcher>,
    /// `COPY --exclude` patterns: matched, as BuildKit does, against paths relative to
    /// the source being copied (`base`), never against the source itself.
    pub exclude: Option<&'a Matcher>,
    /// The source (relative to the root) being copied, once one is.
    pub base: &'a str,
    /// Some: a directory of the client's (the build context or a `--build-context`
    /// directory), whose special files are taken as BuildKit takes them from its file
    /// sync; None: a stage's or image's files, copied as they are.
    pub local: Option<ClientFiles>,
}

/// What becomes of a client directory's special files (as BuildKit 0.x with Docker 20.10
/// does, checked side by side): a socket arrives as an empty regular file with its
/// permission bits; a FIFO and a device node arrive as they are, and a COPY then leaves
/// the FIFO out (even when named) and makes the device node an empty file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClientFiles {
    /// COPY or ADD of them.
    Copied,
    /// The files as received (what a bind mount of the context shows).
    Viewed,
}

impl<'a> Source<'a> {
    pub fn new(root: &'a Root, ignore: Option<&'a Matcher>) -> Source<'a> {
        Source {
            root,
            ignore,
            exclude: None,
            base: "",
            local: None,
        }
    }

    /// The build context (with its `.dockerignore`) or a directory context, copied.
    pub fn local(root: &'a Root, ignore: Option<&'a Matcher>) -> Source<'a> {
        Source {
            local: Some(ClientFiles::Copied),
            ..Source::new(root, ignore)
        }
    }

    /// The same, copying the source at `base`.
    pub fn scoped<'b>(&self, base: &'b str) -> Source<'b>
    where
        'a: 'b,
    {
        Source { base, ..*self }
    }

    /// `rel` relative to the source being copied (None: the source itself or outside it).
    fn under_base<'r>(&self, rel: &'r str) -> Option<&'r str> {
        let sub = match self.base {
            "" | "." => rel,
            b => rel.strip_prefix(b)?.strip_prefix('/')?,
        };
        (!sub.is_empty()).then_some(sub)
    }
}

#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    pub owner: Option<(u32, u32)>,
    pub chmod: Option<u32>,
    /// ADD: local tar archives are extracted into the destination.
    pub extract: bool,
    /// `COPY --parents`: each source keeps its path (below a `/./` pivot) under dest,
    /// its parent directories copied with their metadata.
    pub parents: bool,
}

type R<T> = Result<T, String>;

/// Regular files are made and filled by a few threads while the walk goes on: for a big
/// COPY that is most of the time, and it is the kernel's work (allocating inodes and pages),
/// so it scales with the cores. Each directory's files go to one thread (making files in
/// one directory takes its lock, so threads sharing one would only wait on each other),
/// and directories get their own metadata once every file is made ([`Files::finish`]), so
/// the result is the same as one thread's.
struct Files {
    workers: std::cell::OnceCell<Workers>,
    state: std::sync::Arc<(std::sync::Mutex<Pending>, std::sync::Condvar)>,
    lanes: std::cell::Cell<usize>,
    dirs: std::cell::RefCell<Vec<DirMeta>>,
}

struct Workers {
    txs: Vec<std::sync::mpsc::Sender<FileJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Pending {
    count: usize,
    error: Option<String>,
}

/// Files handed over and not yet made, at most.
const FILES_PENDING: usize = 1024;

/// Copied directories whose metadata waits, at most: each holds its parent open, so past
/// this many every file is waited for and their metadata set.
const DIRS_PENDING: usize = 128;

/// Where a file job reads from.
enum Input {
    /// Opened already (a single file named as a source).
    Open(std::fs::File),
    /// The entry of the job's name in this source directory, opened by the thread that
    /// copies it (so waiting files hold no descriptor of their own); it must still be the
    /// regular file the walk saw (device and inode).
    At {
        dir: std::sync::Arc<OwnedFd>,
        ino: (u64, u64),
    },
}

struct FileJob {
    input: Input,
    dir: std::sync::Arc<OwnedFd>,
    name: std::ffi::OsString,
    rel: String,
    owner: (u32, u32),
    mode: u32,
    mtime: (i64, u32),
}

/// A copied directory's own metadata, set after everything in it is made.
struct DirMeta {
    parent: std::sync::Arc<OwnedFd>,
    name: std::ffi::OsString,
    owner: (u32, u32),
    mode: u32,
    mtime: (i64, u32),
}

/// What a copying thread reads a file into: one read and one write for most files.
const COPY_BUFFER: usize = 256 << 10;

/// Copies `input` to `out` to its end through `buf`. `io::copy` would stat both files,
/// try `copy_file_range` (which fails across an overlay and the context's file system)
/// and then `sendfile` twice: five calls for a 20 KB file where this makes three.
fn copy_data(
    input: &mut std::fs::File,
    out: &mut std::fs::File,
    buf: &mut [u8],
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    loop {
        let n = match input.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
    }
}

impl FileJob {
    fn run(self, buf: &mut [u8]) -> R<()> {
        let mut input = match self.input {
            Input::Open(f) => f,
            Input::At { dir, ino } => {
                let fd = rustix::fs::openat(
                    &dir,
                    &self.name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("{}: {e}", self.rel))?;
                let st = stat_fd(fd.as_fd())?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
                    || (st.st_dev, st.st_ino) != ino
                {
                    return Err(format!(
                        "{}: the source changed while it was copied",
                        self.rel
                    ));
                }
                std::fs::File::from(fd)
            }
        };
        // Made with its permission bits (set-id bits come after its owner, which a chown
        // would clear them for): most files then need no chmod. The umask may take bits
        // away; the metadata step below puts them back.
        let mut out = rooted::create_file(self.dir.as_fd(), &self.name, self.mode & 0o777)
            .map_err(|e| e.to_string())?;
        copy_data(&mut input, &mut out, buf).map_err(|e| format!("{}: {e}", self.rel))?;
        // On the handle of the file just made: no lookups (owner before mode, as a chown
        // clears set-id bits; only what differs is changed).
        rooted::set_owner_mode_times(&out, self.owner, self.mode, self.mtime)
            .map_err(|e| format!("{}: {e}", self.rel))
    }
}

impl Files {
    fn new() -> Files {
        Files {
            workers: std::cell::OnceCell::new(),
            state: Default::default(),
            lanes: std::cell::Cell::new(0),
            dirs: Default::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane of a directory about to be filled: its files all go to one thread.
    fn lane(&self) -> usize {
        let l = self.lanes.get();
        self.lanes.set(l.wrapping_add(1));
        l
    }

    /// Hands a file to the thread of `lane` (threads start with the first file), once
    /// fewer than [`FILES_PENDING`] wait. Fails with the first error a thread met.
    fn submit(&self, job: FileJob, lane: usize) -> R<()> {
        {
            let (_, cv) = &*self.state;
            let mut p = self.pending();
            while p.count >= FILES_PENDING && p.error.is_none() {
                p = cv.wait(p).unwrap_or_else(|p| p.into_inner());
            }
            if let Some(e) = &p.error {
                return Err(e.clone());
            }
            p.count += 1;
        }
        let workers = self.workers.get_or_init(|| self.start());
        let sent = match workers.txs.len() {
            0 => None,
            n => Some(workers.txs[lane % n].send(job)),
        };
        if !matches!(sent, Some(Ok(()))) {
            let mut p = self.pending();
            p.count -= 1;
            return Err(p
                .error
                .clone()
                .unwrap_or_else(|| "the copying threads stopped".into()));
        }
        Ok(())
    }

    fn start(&self) -> Workers {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let mut txs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel::<FileJob>();
            let state = self.state.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("copy-{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; COPY_BUFFER];
                    for job in rx {
                        let done = job.run(&mut buf);
                        let (m, cv) = &*state;
                        let mut p = m.lock().unwrap_or_else(|p| p.into_inner());
                        if let Err(e) = done {
                            p.error.get_or_insert(e);
                        }
                        p.count -= 1;
                        cv.notify_all();
                    }
                });
            if let Ok(t) = spawned {
                txs.push(tx);
                threads.push(t);
            }
        }
        Workers { txs, threads }
    }

    /// Sets `name`'s metadata (a directory in `parent`) once everything is made.
    fn dir_done(&self, meta: DirMeta) -> R<()> {
        let full = {
            let mut dirs = self.dirs.borrow_mut();
            dirs.push(meta);
            dirs.len() >= DIRS_PENDING
        };
        if full {
            self.finish()?;
        }
        Ok(())
    }

    /// Waits for every file handed over so far; fails with the first error met.
    fn drain(&self) -> R<()> {
        let (_, cv) = &*self.state;
        let mut p = self.pending();
        while p.count > 0 {
            p = cv.wait(p).unwrap_or_else(|p| p.into_inner());
        }
        match p.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Files::drain`], then every copied directory's metadata (inner ones first, as they
    /// were finished; none of it changes another directory's times).
    fn finish(&self) -> R<()> {
        self.drain()?;
        let dirs = std::mem::take(&mut *self.dirs.borrow_mut());
        for d in dirs {
            let dir = d.parent.as_fd();
            rooted::lchown(dir, &d.name, d.owner.0, d.owner.1).map_err(|e| e.to_string())?;
            rooted::chmod(dir, &d.name, d.mode).map_err(|e| e.to_string())?;
            rooted::set_times(dir, &d.name, d.mtime).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        if let Some(mut w) = self.workers.take() {
            w.txs.clear();
            for t in w.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// A directory handle the file threads can hold.
fn shared_dir(dir: BorrowedFd<'_>) -> R<std::sync::Arc<OwnedFd>> {
    rustix::io::fcntl_dupfd_cloexec(dir, 0)
        .map(std::sync::Arc::new)
        .map_err(|e| e.to_string())
}

pub(crate) fn excluded(src: &Source<'_>, rel: &str) -> bool {
    src.ignore.is_some_and(|m| m.excluded(rel))
        || src
            .exclude
            .is_some_and(|m| src.under_base(rel).is_some_and(|sub| m.excluded(sub)))
}

/// Whether an excluded directory at `rel` may hold paths an exception re-includes.
fn may_reinclude(src: &Source<'_>, rel: &str) -> bool {
    let ignored = src.ignore.is_some_and(|m| m.excluded(rel));
    let by_exclude = src
        .exclude
        .is_some_and(|m| src.under_base(rel).is_some_and(|sub| m.excluded(sub)));
    (!ignored || src.ignore.is_some_and(|m| m.may_reinclude_under(rel)))
        && (!by_exclude
            || src.exclude.is_some_and(|m| {
                src.under_base(rel)
                    .is_some_and(|sub| m.may_reinclude_under(sub))
            }))
}

fn stat_fd(fd: BorrowedFd<'_>) -> R<rustix::fs::Stat> {
    rustix::fs::fstat(fd).map_err(|e| e.to_string())
}

/// Expands one source (wildcards included) to relative paths that exist and are not
/// ignored.
pub(crate) fn expand_source(src: &Source<'_>, pattern: &str) -> R<Vec<String>> {
    let rel = clean(&format!("/{pattern}"));
    let rel = rel.trim_start_matches('/').to_string();
    if !has_wildcards(&rel) {
        let path = if rel.is_empty() {
            ".".to_string()
        } else {
            rel.clone()
        };
        let exists = src
            .root
            .open_at(
                Path::new(&path),
                Resolve::InRoot,
                OFlags::PATH,
                Mode::empty(),
            )
            .is_ok();
        if !exists || (!rel.is_empty() && src.ignore.is_some_and(|m| m.excluded(&rel))) {
            return Err(format!("{pattern}: no such file or directory"));
        }
        return Ok(vec![rel]);
    }
    // Walk component by component, matching wildcard components against directory entries.
    let mut found = vec![String::new()];
    for comp in rel.split('/') {
        let mut next = Vec::new();
        for base in &found {
            if !has_wildcards(comp) {
                next.push(if base.is_empty() {
                    comp.to_string()
                } else {
                    format!("{base}/{comp}")
                });
                continue;
            }
            let dir = if base.is_empty() { "." } else { base.as_str() };
            let Ok(fd) = src.root.open_at(
                Path::new(dir),
                Resolve::InRoot,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            ) else {
                continue;
            };
            let mut names: Vec<String> = Vec::new();
            let entries = rustix::fs::Dir::read_from(&fd).map_err(|e| e.to_string())?;
            for ent in entries {
                let ent = ent.map_err(|e| e.to_string())?;
                let n = String::from_utf8_lossy(ent.file_name().to_bytes()).to_string();
                if n == "." || n == ".." {
                    continue;
                }
                if component_match(comp, &n).map_err(|e| format!("{pattern}: {e}"))? {
                    names.push(n);
                }
            }
            names.sort();
            for n in names {
                next.push(if base.is_empty() {
                    n
                } else {
                    format!("{base}/{n}")
                });
            }
        }
        found = next;
    }
    // A source itself is never excluded by --exclude (BuildKit), only by .dockerignore.
    let found: Vec<String> = found
        .into_iter()
        .filter(|p| !src.ignore.is_some_and(|m| m.excluded(p)))
        .filter(|p| {
            src.root
                .open_at(Path::new(p), Resolve::InRoot, OFlags::PATH, Mode::empty())
                .is_ok()
        })
        .collect();
    if found.is_empty() {
        return Err(format!(
            "{pattern}: no source files were specified (no match)"
        ));
    }
    Ok(found)
}

fn is_archive(fd: BorrowedFd<'_>) -> bool {
    let Ok(f) = open_to_read(fd, "") else {
        return false;
    };
    let mut head = [0u8; 512];
    let n = rustix::io::read(&f, &mut head).unwrap_or(0);
    let c = isula_store::compression::Compression::sniff(&head[..n]);
    c != isula_store::compression::Compression::None || (n == 512 && &head[257..262] == b"ustar")
}

/// A selected source path (from `expand_source`), followed if it is a symlink (within the
/// root, as Docker does for top-level sources): its O_PATH handle and stat.
pub(crate) fn open_source(src: &Source<'_>, rel: &str) -> R<(OwnedFd, rustix::fs::Stat)> {
    let path = if rel.is_empty() { "." } else { rel };
    let fd = src
        .root
        .open_at(
            Path::new(path),
            Resolve::InRoot,
            OFlags::PATH,
            Mode::empty(),
        )
        .map_err(|e| e.to_string())?;
    let st = stat_fd(fd.as_fd())?;
    Ok((fd, st))
}

/// Copies `sources` to `dest` (absolute in the rootfs, WORKDIR already applied).
/// With `reuse`, files the previous version of the step wrote exactly so are planned as
/// links (see [`crate::reuse`]).
pub fn copy(
    src: &Source<'_>,
    sources: &[String],
    rootfs: &Root,
    dest: &str,
    opts: &CopyOptions,
    mut reuse: Option<&mut crate::reuse::Reuse<'_>>,
) -> R<()> {
    let files = Files::new();
    if opts.parents {
        return copy_with_parents(src, sources, rootfs, dest, opts, reuse, &files);
    }
    let mut paths = Vec::new();
    for s in sources {
        paths.extend(expand_source(src, s)?);
    }
    let dest_is_dir = dest.ends_with('/') || paths.len() > 1;
    for rel in &paths {
        let src = &src.scoped(rel);
        let (fd, st) = open_source(src, rel)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let name = Path::new(rel)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        if kind == FileType::Directory {
            // A directory's contents go into dest.
            let dfd = ensure_dir(rootfs, dest, opts, Some(&st))?;
            copy_dir_contents(
                src,
                rel,
                &fd,
                dfd.as_fd(),
                opts,
                reuse.as_deref_mut(),
                &files,
                false,
            )?;
        } else if opts.extract && kind == FileType::RegularFile && is_archive(fd.as_fd()) {
            let dfd = ensure_dir(rootfs, dest, opts, None)?;
            extract(fd.as_fd(), rel, dfd.as_fd())?;
        } else {
            // Into the directory, or as the file dest names.
            let target_is_dir = dest_is_dir
                || rootfs
                    .open_at(
                        Path::new(dest),
                        Resolve::InRoot,
                        OFlags::PATH | OFlags::DIRECTORY,
                        Mode::empty(),
                    )
                    .is_ok();
            let (pfd, fname) = if target_is_dir {
                (ensure_dir(rootfs, dest, opts, None)?, name)
            } else {
                parent_owned(rootfs, dest, opts.owner)?
            };
            copy_entry(
                src,
                rel,
                fd.as_fd(),
                &st,
                &shared_dir(pfd.as_fd())?,
                &fname,
                opts,
                reuse.as_deref_mut(),
                &files,
                (files.lane(), None, false),
            )?;
        }
        // A later source may write the same names.
        files.finish()?;
    }
    Ok(())
}

/// `COPY --parents`: as BuildKit, a source `a/b/c` lands at `dest/a/b/c` (or, with a
/// pivot, `x/./a/b` at `dest/a/b`), the directories between copied from the source with
/// their mode and times (owned as the copy says).
fn copy_with_parents(
    src: &Source<'_>,
    sources: &[String],
    rootfs: &Root,
    dest: &str,
    opts: &CopyOptions,
    mut reuse: Option<&mut crate::reuse::Reuse<'_>>,
    files: &Files,
) -> R<()> {
    let dest = format!("{}/", dest.trim_end_matches('/'));
    let (uid, gid) = opts.owner.unwrap_or((0, 0));
    // Parent directories get their times once everything under them is written.
    let mut made: Vec<(String, (i64, u32))> = Vec::new();
    for s in sources {
        let pivot = match s.split_once("/./") {
            Some((p, _)) => clean(&format!("/{p}")).trim_start_matches('/').to_string(),
            None => String::new(),
        };
        for rel in expand_source(src, s)? {
            let under = match pivot.as_str() {
                "" => rel.as_str(),
                p => rel
                    .strip_prefix(p)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(rel.as_str()),
            };
            let parent = Path::new(under)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut at = dest.clone();
            let mut src_dir = pivot.clone();
            for comp in parent.split('/').filter(|c| !c.is_empty()) {
                src_dir = if src_dir.is_empty() {
                    comp.to_string()
                } else {
                    format!("{src_dir}/{comp}")
                };
                at.push_str(comp);
                let (_, st) = open_source(src, &src_dir)?;
                let dfd = ensure_dir(rootfs, &at, opts, Some(&st))?;
                drop(dfd);
                let (pfd, name) = rootfs
                    .parent(Path::new(&at), Resolve::InRoot, false)
                    .map_err(|e| format!("{at}: {e}"))?;
                rooted::lchown(pfd.as_fd(), &name, uid, gid).map_err(|e| e.to_string())?;
                rooted::chmod(
                    pfd.as_fd(),
                    &name,
                    opts.chmod.unwrap_or(st.st_mode & 0o7777),
                )
                .map_err(|e| e.to_string())?;
                made.push((at.clone(), (st.st_mtime, st.st_mtime_nsec as u32)));
                at.push('/');
            }
            let scoped = src.scoped(&rel);
            let (fd, st) = open_source(&scoped, &rel)?;
            if under.is_empty() {
                // The pivot (or the root) itself: its contents go into dest.
                let dfd = ensure_dir(rootfs, &dest, opts, Some(&st))?;
                copy_dir_contents(
                    &scoped,
                    &rel,
                    &fd,
                    dfd.as_fd(),
                    opts,
                    reuse.as_deref_mut(),
                    files,
                    false,
                )?;
                files.finish()?;
                continue;
            }
            let name = Path::new(&rel)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let pfd = ensure_dir(rootfs, &at, opts, None)?;
            copy_entry(
                &scoped,
                &rel,
                fd.as_fd(),
                &st,
                &shared_dir(pfd.as_fd())?,
                &name,
                opts,
                reuse.as_deref_mut(),
                files,
                (files.lane(), None, false),
            )?;
            files.finish()?;
        }
    }
    for (path, mtime) in made.iter().rev() {
        let (pfd, name) = rootfs
            .parent(Path::new(path), Resolve::InRoot, false)
            .map_err(|e| format!("{path}: {e}"))?;
        rooted::set_times(pfd.as_fd(), &name, *mtime).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Creates `path` and its missing parents (0755) inside the rootfs, owned by `owner` (root
/// when None), as BuildKit does for COPY destinations and WORKDIR; existing directories are
/// left as they are.
pub fn mkdir_all_owned(root: &Root, path: &str, owner: Option<(u32, u32)>) -> R<()> {
    let mut built = String::new();
    for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        built.push('/');
        built.push_str(comp);
        let p = Path::new(&built);
        if root
            .open_at(
                p,
                Resolve::InRoot,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .is_ok()
        {
            continue;
        }
        let (pfd, name) = root
            .parent(p, Resolve::InRoot, false)
            .map_err(|e| format!("{built}: {e}"))?;
        rooted::mkdir(pfd.as_fd(), &name, 0o755).map_err(|e| format!("{built}: {e}"))?;
        let (uid, gid) = owner.unwrap_or((0, 0));
        rooted::lchown(pfd.as_fd(), &name, uid, gid).map_err(|e| e.to_string())?;
        rooted::chmod(pfd.as_fd(), &name, 0o755).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The parent directory of `dest` (its missing directories made for `owner`) and the name.
fn parent_owned(
    rootfs: &Root,
    dest: &str,
    owner: Option<(u32, u32)>,
) -> R<(OwnedFd, std::ffi::OsString)> {
    let parent = Path::new(dest)
        .parent()
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    mkdir_all_owned(rootfs, &parent, owner)?;
    rootfs
        .parent(Path::new(dest), Resolve::InRoot, false)
        .map_err(|e| format!("{dest}: {e}"))
}

/// Opens (creating if needed) the destination directory. A newly made final directory
/// takes the source directory's mode, and the --chown owner.
fn ensure_dir(
    rootfs: &Root,
    dest: &str,
    opts: &CopyOptions,
    like: Option<&rustix::fs::Stat>,
) -> R<OwnedFd> {
    if let Ok(fd) = rootfs.open_at(
        Path::new(dest),
        Resolve::InRoot,
        OFlags::PATH | OFlags::DIRECTORY,
        Mode::empty(),
    ) {
        return Ok(fd);
    }
    let (pfd, name) = parent_owned(rootfs, dest, opts.owner)?;
    if name.is_empty() {
        return rootfs
            .dir(Path::new("/"), Resolve::InRoot, false)
            .map_err(|e| e.to_string());
    }
    let mode = like.map_or(0o755, |st| st.st_mode & 0o7777);
    match rooted::mkdir(pfd.as_fd(), &name, 0o755) {
        Ok(()) => {
            let (uid, gid) = opts.owner.unwrap_or((0, 0));
            rooted::lchown(pfd.as_fd(), &name, uid, gid).map_err(|e| e.to_string())?;
            rooted::chmod(pfd.as_fd(), &name, mode).map_err(|e| e.to_string())?;
        }
        Err(e) if e.errno() == Some(rustix::io::Errno::EXIST.raw_os_error()) => {}
        Err(e) => return Err(format!("{dest}: {e}")),
    }
    rustix::fs::openat(
        pfd.as_fd(),
        &name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{dest}: {e} (not a directory)"))
}

/// Visits the entries of source directory `dir` (at `rel`) that a copy selects, in name
/// order: ignored files are left out, ignored directories stay only when they may hold
/// re-included paths. `visit` gets the entry's relative path, name, O_PATH handle and stat.
pub(crate) fn for_each_selected(
    src: &Source<'_>,
    rel: &str,
    dir: BorrowedFd<'_>,
    mut visit: impl FnMut(&str, &OsStr, BorrowedFd<'_>, &rustix::fs::Stat) -> R<()>,
) -> R<()> {
    let rd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&rd).map_err(|e| e.to_string())? {
        let ent = ent.map_err(|e| e.to_string())?;
        let n = ent.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    names.sort();
    for n in names {
        let name = OsStr::from_bytes(&n);
        let child_rel = if rel.is_empty() {
            name.to_string_lossy().to_string()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let ignored = excluded(src, &child_rel);
        // An excluded directory may still hold re-included paths.
        if ignored && !may_reinclude(src, &child_rel) {
            continue;
        }
        let cfd = rustix::fs::openat(
            &rd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| e.to_string())?;
        let st = stat_fd(cfd.as_fd())?;
        // An ignored directory is copied only for what it holds that is re-included (as
        // BuildKit: an excluded directory with nothing selected inside is not created).
        if ignored
            && (FileType::from_raw_mode(st.st_mode) != FileType::Directory
                || !holds_selected(src, &child_rel, cfd.as_fd())?)
        {
            continue;
        }
        visit(&child_rel, name, cfd.as_fd(), &st)?;
    }
    Ok(())
}

/// Whether the walk selects anything under directory `dir` (at `rel`).
fn holds_selected(src: &Source<'_>, rel: &str, dir: BorrowedFd<'_>) -> R<bool> {
    let mut found = false;
    // for_each_selected already applies this rule to every ignored directory below, so
    // any entry it visits is selected or holds something selected.
    for_each_selected(src, rel, dir, |_, _, _, _| {
        found = true;
        Err(String::new())
    })
    .or_else(|e| if found { Ok(()) } else { Err(e) })?;
    Ok(found)
}

/// Copies the entries of source directory `dir` into `dest`. `fresh`: `dest` was just made
/// by this copy for this one source directory, so it holds nothing the entries could meet
/// (the names of one listing are distinct), and no entry is looked for before it is made.
#[allow(clippy::too_many_arguments)]
fn copy_dir_contents(
    src: &Source<'_>,
    rel: &str,
    dir: &OwnedFd,
    dest: BorrowedFd<'_>,
    opts: &CopyOptions,
    mut reuse: Option<&mut crate::reuse::Reuse<'_>>,
    files: &Files,
    fresh: bool,
) -> R<()> {
    let dest = shared_dir(dest)?;
    let from = shared_dir(dir.as_fd())?;
    let lane = files.lane();
    for_each_selected(src, rel, dir.as_fd(), |child_rel, name, fd, st| {
        copy_entry(
            src,
            child_rel,
            fd,
            st,
            &dest,
            name,
            opts,
            reuse.as_deref_mut(),
            files,
            (lane, Some(&from), fresh),
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn copy_entry(
    src: &Source<'_>,
    rel: &str,
    fd: BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    shared_pdir: &std::sync::Arc<OwnedFd>,
    name: &OsStr,
    opts: &CopyOptions,
    mut reuse: Option<&mut crate::reuse::Reuse<'_>>,
    files: &Files,
    (lane, from, fresh_parent): (usize, Option<&std::sync::Arc<OwnedFd>>, bool),
) -> R<()> {
    let pdir = shared_pdir.as_fd();
    let kind = FileType::from_raw_mode(st.st_mode);
    if src.local == Some(ClientFiles::Copied) && kind == FileType::Fifo {
        return Ok(());
    }
    if let Some(r) = reuse.as_deref_mut() {
        r.unplan(shared_pdir, name);
    }
    let existing = if fresh_parent {
        None
    } else {
        rooted::lstat(pdir, name).map_err(|e| e.to_string())?
    };
    if let Some(ex) = &existing {
        if !(kind == FileType::Directory && rooted::is_dir(ex)) {
            if let (Some(r), true) = (reuse.as_deref_mut(), rooted::is_dir(ex)) {
                r.unplan_below(shared_pdir, name);
            }
            rooted::remove_all(pdir, name).map_err(|e| e.to_string())?;
        }
    }
    // Without --chown, the client's files become root's and a stage's or image's keep
    // their owners (as BuildKit copies them).
    let (uid, gid) = opts.owner.unwrap_or(if src.local.is_some() {
        (0, 0)
    } else {
        (st.st_uid, st.st_gid)
    });
    let mode = opts.chmod.unwrap_or(st.st_mode & 0o7777);
    let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
    // A regular file of the copy, made and filled by the file threads.
    let submit = |input: Input| {
        files.submit(
            FileJob {
                input,
                dir: shared_pdir.clone(),
                name: name.to_os_string(),
                rel: rel.to_string(),
                owner: (uid, gid),
                mode,
                mtime,
            },
            lane,
        )
    };
    match kind {
        FileType::Directory => {
            if existing.as_ref().is_none_or(|e| !rooted::is_dir(e)) {
                rooted::mkdir(pdir, name, 0o700).map_err(|e| e.to_string())?;
            }
            let sub = rustix::fs::openat(
                pdir,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| e.to_string())?;
            let dir = rustix::fs::openat(
                fd,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| e.to_string())?;
            let made = existing.is_none();
            copy_dir_contents(src, rel, &dir, sub.as_fd(), opts, reuse, files, made)?;
            // Its metadata once nothing more is made in it.
            files.dir_done(DirMeta {
                parent: shared_pdir.clone(),
                name: name.to_os_string(),
                owner: (uid, gid),
                mode,
                mtime,
            })?;
        }
        FileType::RegularFile => {
            let linked_later = reuse
                .is_some_and(|r| r.plan_file(rel, st, shared_pdir, name, mode, (uid, gid), mtime));
            if linked_later {
                // The previous version's file takes this place once the step is unmounted.
                return Ok(());
            }
            let input = match from {
                Some(dir) => Input::At {
                    dir: dir.clone(),
                    ino: (st.st_dev, st.st_ino),
                },
                None => Input::Open(open_to_read(fd, rel)?),
            };
            submit(input)?;
        }
        FileType::Symlink => {
            // Nested links are copied as links (the top-level source was followed).
            let target =
                rustix::fs::readlinkat(fd, "", Vec::new()).map_err(|e| format!("{rel}: {e}"))?;
            rooted::symlink(OsStr::from_bytes(target.as_bytes()), pdir, name)
                .map_err(|e| e.to_string())?;
            rooted::lchown(pdir, name, uid, gid).map_err(|e| e.to_string())?;
            rooted::set_times(pdir, name, mtime).map_err(|e| e.to_string())?;
        }
        FileType::Fifo => {
            rooted::mkfifo(pdir, name, mode).map_err(|e| e.to_string())?;
            rooted::lchown(pdir, name, uid, gid).map_err(|e| e.to_string())?;
        }
        FileType::CharacterDevice | FileType::BlockDevice
            if src.local == Some(ClientFiles::Viewed) =>
        {
            // Shown through a `nodev` bind only: never usable as a device.
            rooted::mknod_device(pdir, name, kind, mode, st.st_rdev).map_err(|e| e.to_string())?;
            rooted::lchown(pdir, name, uid, gid).map_err(|e| e.to_string())?;
            rooted::set_times(pdir, name, mtime).map_err(|e| e.to_string())?;
        }
        FileType::Socket | FileType::CharacterDevice | FileType::BlockDevice
            if src.local.is_some() =>
        {
            let empty = std::fs::File::open("/dev/null").map_err(|e| format!("{rel}: {e}"))?;
            submit(Input::Open(empty))?;
        }
        _ => return Err(format!("{rel}: cannot copy device nodes or sockets")),
    }
    Ok(())
}

/// The file an O_PATH handle `fd` (source `rel`) names, opened to read (through
/// `/proc/self/fd`: the handle itself cannot be read).
fn open_to_read(fd: BorrowedFd<'_>, rel: &str) -> R<std::fs::File> {
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::open(
        proc.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(std::fs::File::from)
    .map_err(|e| format!("{rel}: {e}"))
}

/// ADD of a local archive: unpacked into the destination directory.
fn extract(archive: BorrowedFd<'_>, rel: &str, dest: BorrowedFd<'_>) -> R<()> {
    let f = open_to_read(archive, rel)?;
    let (_, plain) = isula_store::compression::decompress(std::io::BufReader::new(f))
        .map_err(|e| e.to_string())?;
    let dest_path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dest)
    ));
    isula_store::apply::extract_into(plain, &dest_path)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The layer tar of a COPY whose destination lies under a top-level name that nothing
/// below has (so the step's upper directory would hold exactly what the copy makes), of
/// one source path `rel` (expanded: [`expand_source`]) with no `--chown`, `--parents` or
/// archive extraction: the tar a walk of that upper directory makes (see
/// [`isula_store::diff::LayerTarWriter`]), written without making a file. The copy's rules
/// are [`copy`]'s: the destination's missing parents are made 0755 and root's, the
/// destination directory (for a directory source) takes the source's mode, and both have
/// the time the copy made them (`now`; the files path leaves each the time its last entry
/// was made, which only a build without a clamp can tell apart); entries keep their modes
/// (or `--chmod`'s) and times and become root's; a FIFO of the client's is left out, and
/// its sockets and device nodes become empty files.
pub fn copy_to_tar<W: std::io::Write>(
    src: &Source<'_>,
    rel: &str,
    dest: &str,
    opts: &CopyOptions,
    now: i64,
    out: &mut isula_store::diff::LayerTarWriter<W>,
) -> R<()> {
    use isula_store::diff::EntryMeta;
    if opts.owner.is_some() || opts.parents || opts.extract {
        return Err("a copy with --chown, --parents or extraction makes its files".into());
    }
    let src = &src.scoped(rel);
    let (fd, st) = open_source(src, rel)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let comps: Vec<&str> = dest
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let made = |mode: u32| EntryMeta {
        mode,
        uid: 0,
        gid: 0,
        mtime: now,
    };
    let dir_entry = |at: &Path, m: &EntryMeta, out: &mut isula_store::diff::LayerTarWriter<W>| {
        out.dir(at, m).map_err(|e| format!("{}: {e}", at.display()))
    };
    let Some((last, parents)) = comps.split_last() else {
        return Err(format!("{dest}: the destination names no new directory"));
    };
    let mut at = PathBuf::new();
    for c in parents {
        at.push(c);
        dir_entry(&at, &made(0o755), out)?;
    }
    at.push(last);
    if kind == FileType::Directory {
        // As `ensure_dir`: the source directory's mode (never --chmod's).
        dir_entry(&at, &made(st.st_mode & 0o7777), out)?;
        return tar_dir_contents(src, rel, &fd, &at, opts, out, comps.len());
    }
    if dest.ends_with('/') {
        dir_entry(&at, &made(0o755), out)?;
        at.push(Path::new(rel).file_name().unwrap_or_default());
    }
    let depth = comps.len();
    let file = || {
        let f = open_to_read(fd.as_fd(), rel)?;
        let size = stat_fd(f.as_fd())?.st_size;
        Ok((f, size))
    };
    tar_entry(src, rel, fd.as_fd(), &st, &at, opts, file, out, depth)
}

/// [`copy_to_tar`] of the entries of source directory `dir` (at `rel`, `depth`
/// directories deep in the layer), as `at/...`. A layer nests directories no deeper than
/// its walk goes ([`isula_store::diff::MAX_DEPTH`]), which refuses it as the files path's
/// commit does.
fn tar_dir_contents<W: std::io::Write>(
    src: &Source<'_>,
    rel: &str,
    dir: &OwnedFd,
    at: &Path,
    opts: &CopyOptions,
    out: &mut isula_store::diff::LayerTarWriter<W>,
    depth: usize,
) -> R<()> {
    if depth > isula_store::diff::MAX_DEPTH {
        return Err(format!(
            "{}: directories nest more than {} deep in this layer",
            at.display(),
            isula_store::diff::MAX_DEPTH
        ));
    }
    for_each_selected(src, rel, dir.as_fd(), |child_rel, name, fd, st| {
        // A file is opened by name in its directory, and must still be what the walk saw.
        let file = || {
            let f = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("{child_rel}: {e}"))?;
            let now = stat_fd(f.as_fd())?;
            if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile
                || (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
            {
                return Err(format!(
                    "{child_rel}: the source changed while it was copied"
                ));
            }
            Ok((std::fs::File::from(f), now.st_size))
        };
        tar_entry(
            src,
            child_rel,
            fd,
            st,
            &at.join(name),
            opts,
            file,
            out,
            depth,
        )
    })
}

/// One entry of [`copy_to_tar`] (source `rel`, whose O_PATH handle is `fd`), as `at`;
/// `open` opens a regular file to read, with its size now (it may have changed since the
/// walk's stat).
#[allow(clippy::too_many_arguments)]
fn tar_entry<W: std::io::Write>(
    src: &Source<'_>,
    rel: &str,
    fd: BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    at: &Path,
    opts: &CopyOptions,
    open: impl FnOnce() -> R<(std::fs::File, i64)>,
    out: &mut isula_store::diff::LayerTarWriter<W>,
    depth: usize,
) -> R<()> {
    let kind = FileType::from_raw_mode(st.st_mode);
    let local = src.local == Some(ClientFiles::Copied);
    if local && kind == FileType::Fifo {
        return Ok(());
    }
    // As `copy_entry`: the client's files become root's, a stage's keep their owners.
    let (uid, gid) = if src.local.is_some() {
        (0, 0)
    } else {
        (st.st_uid, st.st_gid)
    };
    let meta = isula_store::diff::EntryMeta {
        mode: opts.chmod.unwrap_or(st.st_mode & 0o7777),
        uid,
        gid,
        mtime: st.st_mtime,
    };
    let named = |e: std::io::Error| format!("{}: {e}", at.display());
    match kind {
        FileType::Directory => {
            out.dir(at, &meta).map_err(named)?;
            let dir = rustix::fs::openat(
                fd,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("{rel}: {e}"))?;
            tar_dir_contents(src, rel, &dir, at, opts, out, depth + 1)
        }
        FileType::RegularFile => {
            let (mut f, size) = open()?;
            let size = u64::try_from(size).map_err(|_| format!("{rel}: a negative size"))?;
            out.file(at, &meta, &mut f, size)
                .map_err(|e| format!("{rel}: {e}"))
        }
        FileType::Symlink => {
            let target =
                rustix::fs::readlinkat(fd, "", Vec::new()).map_err(|e| format!("{rel}: {e}"))?;
            // A symlink's own permission bits are always 0777.
            let m = isula_store::diff::EntryMeta {
                mode: 0o777,
                ..meta
            };
            out.symlink(at, &m, Path::new(OsStr::from_bytes(target.as_bytes())))
                .map_err(named)
        }
        FileType::Socket | FileType::CharacterDevice | FileType::BlockDevice if local => {
            let mut empty = std::fs::File::open("/dev/null").map_err(|e| format!("{rel}: {e}"))?;
            out.file(at, &meta, &mut empty, 0).map_err(named)
        }
        _ => Err(format!("{rel}: cannot copy device nodes or sockets")),
    }
}
