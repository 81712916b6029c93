//! Cache keys of build steps, BuildKit-style: each key hashes its parent's key, the
//! instruction after expansion and what the step depends on (the base image's ID for FROM,
//! the selected sources' content for COPY/ADD, the environment, user and working directory
//! for RUN). Proxy values never enter a key. Also the stat-keyed record of a build
//! context's content hashes, so an unchanged context is never read again.
//!
//! It must not decide whether a key hits (the stage does) nor touch a rootfs.

use crate::copy::{self, Source};
use isula_types::Digest;
use rustix::fs::{FileType, Mode, OFlags};
use serde::Serialize;
use sha2::Digest as _;
use std::io::{Read, Write};
use std::os::fd::AsFd;

/// Bumped whenever what goes into a key changes, so old records simply miss.
const KEY_VERSION: &str = "isula-build-cache-v1";

/// Builds one key from named, length-prefixed fields.
pub struct KeyBuilder(sha2::Sha256);

impl KeyBuilder {
    pub fn new(kind: &str, parent: Option<&Digest>) -> KeyBuilder {
        let mut k = KeyBuilder(sha2::Sha256::new());
        k.field("version", KEY_VERSION.as_bytes());
        k.field("kind", kind.as_bytes());
        if let Some(p) = parent {
            k.field("parent", p.as_str().as_bytes());
        }
        k
    }

    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn json<T: Serialize>(&mut self, name: &str, value: &T) -> &mut Self {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.field(name, &bytes)
    }

    pub fn finish(self) -> Digest {
        let hex = hex::encode(self.0.finalize());
        // A hex SHA-256 always parses.
        Digest::from_hex(&hex).unwrap_or_else(|_| Digest::of_bytes(hex.as_bytes()))
    }
}

/// What a stat says about a file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatKey {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl StatKey {
    fn of(st: &rustix::fs::Stat) -> StatKey {
        StatKey {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        }
    }

    /// The key as the record keeps it: 128 bits of the SHA-256 of its fields (without the
    /// ctime for a tree whose files never change in place: see [`ContextHashes::stable`]).
    fn id(&self, stable: bool) -> Id {
        let mut h = sha2::Sha256::new();
        for v in [self.ino, self.size] {
            h.update(v.to_le_bytes());
        }
        let ctime = if stable { (0, 0) } else { self.ctime };
        for v in [self.mtime.0, self.mtime.1, ctime.0, ctime.1] {
            h.update(v.to_le_bytes());
        }
        short(h)
    }
}

/// 128 bits of a SHA-256: how the record names a path and a stat key (a file's entry is
/// used only when both match, so a collision of one alone changes nothing).
type Id = [u8; 16];

fn short(h: sha2::Sha256) -> Id {
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize()[..16]);
    id
}

fn path_id(rel: &str) -> Id {
    short(sha2::Sha256::new_with_prefix(rel.as_bytes()))
}

/// A SHA-256, kept as bytes and written as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sha(pub [u8; 32]);

impl Sha {
    fn hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(self.0, &mut out);
        out
    }
}

impl Serialize for Sha {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Sha {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sha, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(Sha(out))
    }
}

/// The record's file: this magic (with its version), the entry count (u64, little
/// endian), then per file its path's ID, its stat key's ID and its content's SHA-256.
const RECORD_MAGIC: &[u8; 8] = b"ISBCTX01";
const ENTRY: usize = 16 + 16 + 32;

/// The record in memory: 64 bytes and a hash table slot per file, whatever its path's
/// length (a context of 100,000 files takes about 8 MB).
#[derive(Default)]
struct HashRecord {
    files: std::collections::HashMap<Id, (Id, Sha)>,
}

impl HashRecord {
    /// The record at `p`; None when it is missing, of another version or damaged.
    fn read(p: &std::path::Path) -> Option<HashRecord> {
        let f = std::fs::File::open(p).ok()?;
        let len = f.metadata().ok()?.len();
        let mut r = std::io::BufReader::with_capacity(64 << 10, f);
        let mut head = [0u8; 16];
        r.read_exact(&mut head).ok()?;
        let (magic, count) = head.split_at(8);
        let count = u64::from_le_bytes(count.try_into().ok()?);
        if magic != RECORD_MAGIC || Some(len) != count.checked_mul(ENTRY as u64)?.checked_add(16) {
            return None;
        }
        let mut files = std::collections::HashMap::with_capacity(usize::try_from(count).ok()?);
        let mut e = [0u8; ENTRY];
        for _ in 0..count {
            r.read_exact(&mut e).ok()?;
            let (path, rest) = e.split_at(16);
            let (stat, sum) = rest.split_at(16);
            files.insert(
                path.try_into().ok()?,
                (stat.try_into().ok()?, Sha(sum.try_into().ok()?)),
            );
        }
        Some(HashRecord { files })
    }

    fn write(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut w = std::io::BufWriter::with_capacity(64 << 10, w);
        w.write_all(RECORD_MAGIC)?;
        w.write_all(&(self.files.len() as u64).to_le_bytes())?;
        for (path, (stat, sum)) in &self.files {
            w.write_all(path)?;
            w.write_all(stat)?;
            w.write_all(&sum.0)?;
        }
        w.flush()
    }
}

/// Content hashes of a build context's files, reused while a file's inode, size, mtime and
/// ctime are unchanged (ctime changes on every write, even one that restores the mtime).
/// Entries of files not looked at in a build stay.
pub struct ContextHashes {
    record_path: Option<std::path::PathBuf>,
    record: HashRecord,
    /// The context is a tree the daemon synced from a client: its files are never written
    /// nor changed in place (a changed file is a new inode in a new tree, with a record of
    /// its own), so a file's inode, size and mtime say its content, and its ctime, which a
    /// hard link to it changes (a COPY's layer sharing it), is left out.
    stable: bool,
    /// Files read and hashed this build (for tests and benchmarks).
    pub hashed: usize,
}

impl ContextHashes {
    /// Loads the record at `record_path` (none: hash everything, keep nothing).
    pub fn load(record_path: Option<std::path::PathBuf>) -> ContextHashes {
        let record = record_path
            .as_deref()
            .and_then(HashRecord::read)
            .unwrap_or_default();
        ContextHashes {
            record_path,
            record,
            stable: false,
            hashed: 0,
        }
    }

    /// The record of a tree the daemon synced (see [`ContextHashes::stable`]); `fresh`: the
    /// tree was just made, and what a record at its path says is of an earlier one.
    pub fn for_synced_tree(record_path: std::path::PathBuf, fresh: bool) -> ContextHashes {
        let mut h = if fresh {
            ContextHashes {
                record_path: Some(record_path),
                record: HashRecord::default(),
                stable: false,
                hashed: 0,
            }
        } else {
            ContextHashes::load(Some(record_path))
        };
        h.stable = true;
        h
    }

    /// Writes the record back when a file had to be read (else it says nothing new).
    pub fn save(&mut self) {
        let Some(p) = &self.record_path else { return };
        if self.hashed == 0 {
            return;
        }
        let record = &self.record;
        // Only a time saver: no need to wait for the disk.
        if let Err(e) = isula_store::metadata::replace_unsynced(p, &mut |w| record.write(w)) {
            tracing::warn!(path = %p.display(), error = %e, "saving the context hash record");
        }
        // An earlier version's record (JSON), replaced by this one.
        if p.extension().is_some_and(|e| e != "json") {
            let _ = std::fs::remove_file(p.with_extension("json"));
        }
        self.hashed = 0;
    }

    /// The content hash of `rel` as recorded, if its stat still matches.
    pub fn known(&self, rel: &str, st: &rustix::fs::Stat) -> Option<Sha> {
        let (k, h) = self.record.files.get(&path_id(rel))?;
        (*k == StatKey::of(st).id(self.stable)).then_some(*h)
    }

    /// Records that `rel`, with the stat `st` now, holds content of SHA-256 `sum`, known
    /// some other way (a remote context's files, checked as they arrived).
    pub fn seed(&mut self, rel: &str, st: &rustix::fs::Stat, sum: [u8; 32]) {
        self.note(rel, Some(&StatKey::of(st)), Sha(sum));
    }

    /// Records what `rel` holds, read while its stat was `key` (None: it changed while it
    /// was read, so it has no record and is read again next time).
    fn note(&mut self, rel: &str, key: Option<&StatKey>, sum: Sha) {
        self.hashed += 1;
        match key {
            Some(k) => self
                .record
                .files
                .insert(path_id(rel), (k.id(self.stable), sum)),
            None => self.record.files.remove(&path_id(rel)),
        };
    }
}

/// Hashes what a COPY/ADD of `sources` from `src` selects: every entry's path, type, mode,
/// link target and content, in the order the copy visits them. Files the copy would not
/// select (ignored, or outside every source) never enter the hash. Files whose content is
/// not known from the record are read on other threads while the walk goes on; the key
/// takes each entry in order as soon as it is complete, so memory stays bounded however
/// many files the sources hold.
pub fn hash_sources(
    src: &Source<'_>,
    sources: &[String],
    hashes: &mut ContextHashes,
) -> Result<Digest, String> {
    let mut key = KeyBuilder::new("sources", None);
    let jobs = std::sync::Mutex::new(std::collections::VecDeque::<Job>::new());
    let ready = std::sync::Condvar::new();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (results, received) = std::sync::mpsc::channel::<ReadResult>();
    let root = src.root;
    std::thread::scope(|s| {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4);
        let queue = Readers {
            jobs: &jobs,
            ready: &ready,
            done: &done,
        };
        for _ in 0..workers {
            let results = results.clone();
            s.spawn(move || {
                // One buffer per reading thread: a fresh one per file was a mapping of its
                // own (past the daemon's mmap threshold), faulted in and unmapped for each
                // of a context's files.
                let mut buf = vec![0u8; READ_BUFFER];
                while let Some(job) = queue.next() {
                    let r = read_file(root, &job.rel, &job.raw, &job.key, &mut buf);
                    if results.send((job.seq, r)).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the readers hold senders: if they all ended, the walk's wait ends too.
        drop(results);
        let mut feed = Feed {
            key: &mut key,
            hashes,
            readers: queue,
            results: &received,
            items: std::collections::VecDeque::new(),
            first: 0,
        };
        let walked = (|| {
            for pattern in sources {
                feed.push(Item {
                    rel: String::new(),
                    mode: 0,
                    owner: None,
                    what: What::Pattern(pattern.clone()),
                })?;
                for rel in copy::expand_source(src, pattern)? {
                    let src = &src.scoped(&rel);
                    let (fd, st) = copy::open_source(src, &rel)?;
                    let mut raw = rel.as_bytes().to_vec();
                    collect(src, &rel, &mut raw, fd.as_fd(), &st, &mut feed)?;
                }
            }
            feed.finish()
        })();
        // The readers stop (those still reading finish their file) whatever happened.
        queue.stop();
        walked
    })?;
    Ok(key.finish())
}

/// One entry of what a copy selects, in the order it visits them.
struct Item {
    rel: String,
    mode: u32,
    /// The owner, for files a copy keeps the owner of (a stage's or image's).
    owner: Option<(u32, u32)>,
    what: What,
}

enum What {
    /// A source pattern begins.
    Pattern(String),
    /// A regular file: its stat, and its content hash once known.
    File(StatKey, Option<Sha>),
    Link(Vec<u8>),
    Dir,
    Other(u64),
}

/// A file read: the item number, and its content hash and whether it stayed unchanged.
type ReadResult = (u64, Result<(Sha, bool), String>);

/// A file to read: the item `seq` of the walk.
struct Job {
    seq: u64,
    rel: String,
    /// Its path as the file system has it (names need not be UTF-8).
    raw: Vec<u8>,
    key: StatKey,
}

/// The queue of files to read, shared by the walk and the reading threads.
#[derive(Clone, Copy)]
struct Readers<'a> {
    jobs: &'a std::sync::Mutex<std::collections::VecDeque<Job>>,
    ready: &'a std::sync::Condvar,
    done: &'a std::sync::atomic::AtomicBool,
}

impl Readers<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) {
        self.lock().push_back(job);
        self.ready.notify_one();
    }

    /// The next file to read; None once the walk is over (or failed) and nothing waits.
    fn next(&self) -> Option<Job> {
        use std::sync::atomic::Ordering;
        let mut q = self.lock();
        loop {
            if let Some(job) = q.pop_front() {
                return Some(job);
            }
            if self.done.load(Ordering::SeqCst) {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more files: what waits is dropped (the walk is over or failed), and every
    /// reading thread ends after its current file.
    fn stop(&self) {
        let mut q = self.lock();
        q.clear();
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(q);
        self.ready.notify_all();
    }
}

/// Entries (files, directories, links) at most between the first one the key still waits
/// for and the last one walked: the walk waits for reads beyond this.
const ITEMS_PENDING: usize = 4096;

/// The walk's entries on their way into the key, in order.
struct Feed<'a> {
    key: &'a mut KeyBuilder,
    hashes: &'a mut ContextHashes,
    readers: Readers<'a>,
    results: &'a std::sync::mpsc::Receiver<ReadResult>,
    /// Entries walked and not yet in the key; the first is item number `first`.
    items: std::collections::VecDeque<Item>,
    first: u64,
}

impl Feed<'_> {
    /// Takes the next entry of the walk (a file not known from the record is handed to the
    /// readers, its path as `raw`).
    fn push_entry(&mut self, item: Item, raw: &[u8]) -> Result<(), String> {
        if let What::File(key, None) = &item.what {
            self.readers.push(Job {
                seq: self.first + self.items.len() as u64,
                rel: item.rel.clone(),
                raw: raw.to_vec(),
                key: key.clone(),
            });
        }
        self.items.push_back(item);
        self.drain();
        while self.items.len() >= ITEMS_PENDING {
            self.receive()?;
        }
        Ok(())
    }

    fn push(&mut self, item: Item) -> Result<(), String> {
        self.push_entry(item, &[])
    }

    /// Every entry walked, once its file is read, into the key.
    fn finish(&mut self) -> Result<(), String> {
        while !self.items.is_empty() {
            self.receive()?;
        }
        Ok(())
    }

    /// Waits for one file read and records it; then the key takes what is complete.
    fn receive(&mut self) -> Result<(), String> {
        let (seq, r) = self
            .results
            .recv()
            .map_err(|_| "reading the build context stopped early".to_string())?;
        let (sum, unchanged) = r?;
        let item = seq
            .checked_sub(self.first)
            .and_then(|i| self.items.get_mut(i as usize))
            .ok_or("reading the build context: a read that was not asked for")?;
        let What::File(key, slot @ None) = &mut item.what else {
            return Err(format!("{}: read twice", item.rel));
        };
        *slot = Some(sum);
        self.hashes.note(&item.rel, unchanged.then_some(&*key), sum);
        self.drain();
        Ok(())
    }

    /// The complete entries at the front, into the key.
    fn drain(&mut self) {
        while let Some(item) = self.items.front() {
            let k = &mut *self.key;
            match &item.what {
                What::File(_, None) => return,
                What::Pattern(p) => {
                    k.field("pattern", p.as_bytes());
                }
                what => {
                    k.field("path", item.rel.as_bytes());
                    k.field("mode", &item.mode.to_le_bytes());
                    if let Some((uid, gid)) = item.owner {
                        k.field("owner", &[uid.to_le_bytes(), gid.to_le_bytes()].concat());
                    }
                    match what {
                        What::File(_, Some(sum)) => {
                            k.field("sha256", &sum.hex());
                        }
                        What::Link(target) => {
                            k.field("link", target);
                        }
                        What::Other(rdev) => {
                            k.field("rdev", &rdev.to_le_bytes());
                        }
                        What::Dir | What::File(_, None) | What::Pattern(_) => {}
                    }
                }
            }
            self.items.pop_front();
            self.first += 1;
        }
    }
}

fn collect(
    src: &Source<'_>,
    rel: &str,
    raw: &mut Vec<u8>,
    fd: std::os::fd::BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    feed: &mut Feed<'_>,
) -> Result<(), String> {
    let kind = FileType::from_raw_mode(st.st_mode);
    if src.local == Some(copy::ClientFiles::Copied) && kind == FileType::Fifo {
        // Not part of what a copy of the client's files makes (see `ClientFiles`).
        return Ok(());
    }
    let what = match kind {
        FileType::RegularFile => What::File(StatKey::of(st), feed.hashes.known(rel, st)),
        FileType::Symlink => What::Link(
            rustix::fs::readlinkat(fd, "", Vec::new())
                .map_err(|e| format!("{rel}: {e}"))?
                .into_bytes(),
        ),
        FileType::Directory => What::Dir,
        _ => What::Other(st.st_rdev),
    };
    feed.push_entry(
        Item {
            rel: rel.to_string(),
            mode: st.st_mode,
            owner: src.local.is_none().then_some((st.st_uid, st.st_gid)),
            what,
        },
        raw,
    )?;
    if kind == FileType::Directory {
        copy::for_each_selected(src, rel, fd, |child_rel, name, cfd, cst| {
            let len = raw.len();
            if len > 0 {
                raw.push(b'/');
            }
            raw.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name));
            let r = collect(src, child_rel, raw, cfd, cst, feed);
            raw.truncate(len);
            r
        })?;
    }
    Ok(())
}

/// What a reading thread reads a file through.
const READ_BUFFER: usize = 256 << 10;

/// The content hash of the file at `rel` (read through `buf`), and whether its stat was
/// `key` before and after.
fn read_file(
    root: &isula_sys::Root,
    rel: &str,
    raw: &[u8],
    key: &StatKey,
    buf: &mut [u8],
) -> Result<(Sha, bool), String> {
    let path = if raw.is_empty() { b".".as_slice() } else { raw };
    let fd = root
        .open_at(
            std::path::Path::new(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path),
            ),
            isula_sys::Resolve::InRoot,
            // Never blocks: a file swapped for a FIFO since it was listed is refused below.
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| format!("{rel}: {e}"))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("{rel}: {e}"))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!(
            "{rel}: changed from a regular file while the context was read"
        ));
    }
    let before = Some(StatKey::of(&st));
    let mut f = std::fs::File::from(fd);
    let mut h = sha2::Sha256::new();
    loop {
        let n = f.read(buf).map_err(|e| format!("{rel}: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let after = rustix::fs::fstat(&f).map(|s| StatKey::of(&s)).ok();
    let unchanged = before.as_ref() == Some(key) && after.as_ref() == Some(key);
    Ok((Sha(h.finalize().into()), unchanged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_field_and_its_boundaries() {
        let p = Digest::of_bytes(b"parent");
        let key = |a: &str, b: &str| {
            let mut k = KeyBuilder::new("run", Some(&p));
            k.field("a", a.as_bytes()).field("b", b.as_bytes());
            k.finish()
        };
        assert_eq!(key("x", "y"), key("x", "y"));
        assert_ne!(key("x", "y"), key("xy", ""));
        assert_ne!(key("x", "y"), key("x", "z"));
        assert_ne!(
            KeyBuilder::new("run", Some(&p)).finish(),
            KeyBuilder::new("run", None).finish()
        );
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let d = tempfile::tempdir().expect("tmp");
        let ctx = d.path().join("ctx");
        std::fs::create_dir_all(ctx.join("sub")).expect("mkdir");
        std::fs::write(ctx.join("a"), "a").expect("a");
        std::fs::write(ctx.join("sub/b"), "b").expect("b");
        std::fs::write(ctx.join("ignored"), "i").expect("i");
        let matcher = isula_dockerfile::ignore::Matcher::parse("ignored\n").expect("ignore");
        let root = isula_sys::Root::open(&ctx).expect("root");
        let src = Source::new(&root, Some(&matcher));
        let record = d.path().join("record.json");
        let mut h = ContextHashes::load(Some(record.clone()));
        let first = hash_sources(&src, &[".".into()], &mut h).expect("hash");
        assert_eq!(h.hashed, 2);
        h.save();

        let mut h = ContextHashes::load(Some(record.clone()));
        assert_eq!(
            hash_sources(&src, &[".".into()], &mut h).expect("hash"),
            first
        );
        assert_eq!(h.hashed, 0, "nothing changed: nothing read");
        h.save();

        // An ignored file changes nothing; a selected one changes the key and is the only
        // one read.
        std::fs::write(ctx.join("ignored"), "changed").expect("i");
        let mut h = ContextHashes::load(Some(record.clone()));
        assert_eq!(
            hash_sources(&src, &[".".into()], &mut h).expect("hash"),
            first
        );
        std::fs::write(ctx.join("sub/b"), "B").expect("b");
        let second = hash_sources(&src, &[".".into()], &mut h).expect("hash");
        assert_ne!(second, first);
        assert_eq!(h.hashed, 1);
        // Only the mtime: same content, same key.
        h.save();
        let t = std::fs::File::options()
            .write(true)
            .open(ctx.join("a"))
            .expect("open");
        t.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .expect("mtime");
        let mut h = ContextHashes::load(Some(record));
        assert_eq!(
            hash_sources(&src, &[".".into()], &mut h).expect("hash"),
            second
        );
        // A name that is not UTF-8 is read like any other (and changes the key).
        let odd =
            ctx.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"sub/odd\xff"));
        std::fs::write(&odd, "o").expect("odd name");
        let third = hash_sources(&src, &[".".into()], &mut h).expect("hash a non-UTF-8 name");
        assert_ne!(third, second);
        std::fs::remove_file(&odd).expect("rm");
        // A source pattern that selects less is a different key.
        assert_ne!(
            hash_sources(&src, &["sub".into()], &mut h).expect("hash"),
            second
        );
    }

    /// One build's use of the record at `record`: loaded, the sources of `.` hashed, saved.
    /// The key, and how many files had to be read.
    fn build(src: &Source<'_>, record: &std::path::Path) -> (Digest, usize) {
        let mut h = ContextHashes::load(Some(record.to_path_buf()));
        let key = hash_sources(src, &[".".into()], &mut h).expect("hash");
        let read = h.hashed;
        h.save();
        (key, read)
    }

    /// Entries past the window of entries in flight, read and known ones interleaved in
    /// every proportion, give one key: the key takes the walk's order, not the order the
    /// reads finish in.
    #[test]
    fn keys_keep_the_walk_order_past_the_window() {
        let d = tempfile::tempdir().expect("tmp");
        let ctx = d.path().join("ctx");
        let files = ITEMS_PENDING + 900;
        for i in 0..files {
            let dir = ctx.join(format!("d{:02}", i % 37));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join(format!("f{i}")), format!("file {i}")).expect("write");
        }
        std::os::unix::fs::symlink("d00/f0", ctx.join("link")).expect("symlink");
        let root = isula_sys::Root::open(&ctx).expect("root");
        let src = Source::new(&root, None);
        let record = d.path().join("record.hashes");

        let (cold, read) = build(&src, &record);
        assert_eq!(read, files);
        assert_eq!(build(&src, &record), (cold.clone(), 0), "all known");

        // Every third file rewritten with its own content: read again, same key.
        for i in (0..files).step_by(3) {
            let f = ctx.join(format!("d{:02}/f{i}", i % 37));
            std::fs::write(&f, format!("file {i}")).expect("rewrite");
        }
        assert_eq!(build(&src, &record), (cold.clone(), files.div_ceil(3)));

        // One byte of one file late in the walk: another key.
        std::fs::write(ctx.join("d36/f4994"), "file 4994!").expect("change");
        let (changed, read) = build(&src, &record);
        assert_ne!(changed, cold);
        assert_eq!(read, 1);
    }

    #[test]
    fn a_damaged_or_foreign_record_is_read_as_empty() {
        let d = tempfile::tempdir().expect("tmp");
        let ctx = d.path().join("ctx");
        std::fs::create_dir_all(&ctx).expect("mkdir");
        std::fs::write(ctx.join("a"), "a").expect("a");
        std::fs::write(ctx.join("b"), "b").expect("b");
        let root = isula_sys::Root::open(&ctx).expect("root");
        let src = Source::new(&root, None);
        let record = d.path().join("record.hashes");
        let (key, _) = build(&src, &record);
        let good = std::fs::read(&record).expect("record");
        assert_eq!(good.len(), 16 + 2 * ENTRY);

        let legacy = record.with_extension("json");
        for bad in [
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0u8; ENTRY]].concat(),
            [b"ISBCTX00".as_slice(), &good[8..]].concat(),
            br#"{"files":{}}"#.to_vec(),
            Vec::new(),
        ] {
            std::fs::write(&record, &bad).expect("damage");
            std::fs::write(&legacy, b"{}").expect("legacy record");
            assert_eq!(
                build(&src, &record),
                (key.clone(), 2),
                "a record of {} bytes was trusted",
                bad.len()
            );
            assert!(!legacy.exists(), "the earlier version's record stays");
            // Rewritten whole: the next build reads nothing.
            assert_eq!(build(&src, &record), (key.clone(), 0));
        }
    }
}
