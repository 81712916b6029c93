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
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::Read;
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl<'de> Deserialize<'de> for Sha {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sha, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(Sha(out))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct HashRecord {
    files: BTreeMap<String, (StatKey, Sha)>,
}

/// Content hashes of a build context's files, reused while a file's inode, size, mtime and
/// ctime are unchanged (ctime changes on every write, even one that restores the mtime).
/// Entries of files not looked at in a build stay.
pub struct ContextHashes {
    record_path: Option<std::path::PathBuf>,
    record: HashRecord,
    /// Files read and hashed this build (for tests and benchmarks).
    pub hashed: usize,
}

impl ContextHashes {
    /// Loads the record at `record_path` (none: hash everything, keep nothing).
    pub fn load(record_path: Option<std::path::PathBuf>) -> ContextHashes {
        let record = record_path
            .as_ref()
            .and_then(|p| std::fs::File::open(p).ok())
            .and_then(|f| serde_json::from_reader(std::io::BufReader::new(f)).ok())
            .unwrap_or_default();
        ContextHashes {
            record_path,
            record,
            hashed: 0,
        }
    }

    /// Writes the record back when a file had to be read (else it says nothing new).
    pub fn save(&mut self) {
        let Some(p) = &self.record_path else { return };
        if self.hashed == 0 {
            return;
        }
        let record = &self.record;
        // Only a time saver: no need to wait for the disk.
        if let Err(e) = isula_store::metadata::replace_unsynced(p, &mut |w| {
            serde_json::to_writer(w, record).map_err(std::io::Error::other)
        }) {
            tracing::warn!(path = %p.display(), error = %e, "saving the context hash record");
        }
        self.hashed = 0;
    }

    /// The content hash of `rel` as recorded, if its stat still matches.
    pub fn known(&self, rel: &str, st: &rustix::fs::Stat) -> Option<Sha> {
        let (k, h) = self.record.files.get(rel)?;
        (*k == StatKey::of(st)).then_some(*h)
    }
}

/// Hashes what a COPY/ADD of `sources` from `src` selects: every entry's path, type, mode,
/// link target and content, in the order the copy visits them. Files the copy would not
/// select (ignored, or outside every source) never enter the hash. Files whose content is
/// not known from the record are read on several threads at once.
pub fn hash_sources(
    src: &Source<'_>,
    sources: &[String],
    hashes: &mut ContextHashes,
) -> Result<Digest, String> {
    let mut items = Vec::new();
    for pattern in sources {
        items.push(Item {
            rel: String::new(),
            raw: Vec::new(),
            what: What::Pattern(pattern.clone()),
            mode: 0,
        });
        for rel in copy::expand_source(src, pattern)? {
            let src = &src.scoped(&rel);
            let (fd, st) = copy::open_source(src, &rel)?;
            let mut raw = rel.as_bytes().to_vec();
            collect(src, &rel, &mut raw, fd.as_fd(), &st, hashes, &mut items)?;
        }
    }
    read_pending(src, &mut items, hashes)?;
    let mut k = KeyBuilder::new("sources", None);
    for item in &items {
        if let What::Pattern(p) = &item.what {
            k.field("pattern", p.as_bytes());
            continue;
        }
        k.field("path", item.rel.as_bytes());
        k.field("mode", &item.mode.to_le_bytes());
        match &item.what {
            What::File(_, Some(sum)) => {
                k.field("sha256", &sum.hex());
            }
            What::File(_, None) => return Err(format!("{}: not read", item.rel)),
            What::Link(target) => {
                k.field("link", target);
            }
            What::Other(rdev) => {
                k.field("rdev", &rdev.to_le_bytes());
            }
            What::Dir | What::Pattern(_) => {}
        }
    }
    Ok(k.finish())
}

/// One entry of what a copy selects, in the order it visits them.
struct Item {
    rel: String,
    /// For a file still to be read: its path as the file system has it (names need not
    /// be UTF-8).
    raw: Vec<u8>,
    mode: u32,
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

fn collect(
    src: &Source<'_>,
    rel: &str,
    raw: &mut Vec<u8>,
    fd: std::os::fd::BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    hashes: &ContextHashes,
    items: &mut Vec<Item>,
) -> Result<(), String> {
    let kind = FileType::from_raw_mode(st.st_mode);
    let what = match kind {
        FileType::RegularFile => What::File(StatKey::of(st), hashes.known(rel, st)),
        FileType::Symlink => What::Link(
            rustix::fs::readlinkat(fd, "", Vec::new())
                .map_err(|e| format!("{rel}: {e}"))?
                .into_bytes(),
        ),
        FileType::Directory => What::Dir,
        _ => What::Other(st.st_rdev),
    };
    let pending = matches!(what, What::File(_, None));
    items.push(Item {
        rel: rel.to_string(),
        raw: if pending { raw.clone() } else { Vec::new() },
        mode: st.st_mode,
        what,
    });
    if kind == FileType::Directory {
        copy::for_each_selected(src, rel, fd, |child_rel, name, cfd, cst| {
            let len = raw.len();
            if len > 0 {
                raw.push(b'/');
            }
            raw.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name));
            let r = collect(src, child_rel, raw, cfd, cst, hashes, items);
            raw.truncate(len);
            r
        })?;
    }
    Ok(())
}

/// Reads the files whose content is not known yet, on up to one thread per CPU (at most
/// four), and records what they hold.
fn read_pending(
    src: &Source<'_>,
    items: &mut [Item],
    hashes: &mut ContextHashes,
) -> Result<(), String> {
    let pending: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| matches!(it.what, What::File(_, None)))
        .map(|(i, _)| i)
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(pending.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let read: &[Item] = items;
    type Read = (usize, Result<(Sha, bool), String>);
    let results: Vec<Vec<Read>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(&i) = pending.get(n) else { break };
                        let it = &read[i];
                        let What::File(key, _) = &it.what else {
                            continue;
                        };
                        out.push((i, read_file(src, &it.rel, &it.raw, key)));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut done = 0;
    for (i, r) in results.into_iter().flatten() {
        let (sum, unchanged) = r?;
        let item = &mut items[i];
        if let What::File(key, slot) = &mut item.what {
            *slot = Some(sum);
            hashes.hashed += 1;
            // A file that changed while it was read gets no record (read again next time).
            if unchanged {
                hashes
                    .record
                    .files
                    .insert(item.rel.clone(), (key.clone(), sum));
            } else {
                hashes.record.files.remove(&item.rel);
            }
            done += 1;
        }
    }
    if done != pending.len() {
        return Err("reading the build context stopped early".into());
    }
    Ok(())
}

/// The content hash of the file at `rel`, and whether its stat was `key` before and after.
fn read_file(
    src: &Source<'_>,
    rel: &str,
    raw: &[u8],
    key: &StatKey,
) -> Result<(Sha, bool), String> {
    let path = if raw.is_empty() { b".".as_slice() } else { raw };
    let fd = src
        .root
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
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{rel}: {e}"))?;
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
}
