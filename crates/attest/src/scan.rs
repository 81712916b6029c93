//! Reads what a rootfs says it holds: the packages of each package database found (dpkg,
//! rpm in any of its three formats, apk), the files they own, and the files none owns.
//! The rootfs is a read-only mount the caller owns; every path inside it is opened
//! relative to it (symlinks resolved inside it, the database files themselves never
//! through one), so an image cannot make us read the host's files.

use crate::{AttestError, Ecosystem, Package, Result};
use isula_sys::{Resolve, Root};
use rustix::fs::{Mode, OFlags};
use sha1::Digest as _;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where rpm keeps its database, newest first (rpm 4.17+ moved it; `/var/lib/rpm` is then
/// a symlink to it).
const RPM_DIRS: &[&str] = &["usr/lib/sysimage/rpm", "var/lib/rpm"];

/// A file of the image no package owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnownedFile {
    /// Absolute inside the image.
    pub path: String,
    /// Lower-case hex of its content (a symlink: of its target).
    pub sha1: String,
    pub sha256: String,
}

/// What the rootfs holds.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// By ecosystem, in database order.
    pub packages: Vec<(Ecosystem, Package)>,
    /// The databases read, as paths inside the image.
    pub databases: Vec<String>,
    /// Sorted by path.
    pub unowned: Vec<UnownedFile>,
    /// `/etc/os-release`'s `ID` and `VERSION_ID`.
    pub distro: Option<String>,
    pub distro_version: Option<String>,
}

fn open_in(root: &Root, rel: &str, flags: OFlags) -> Option<OwnedFd> {
    root.open_at(
        Path::new(rel),
        Resolve::InRoot,
        // Never blocks on a FIFO nor takes a terminal; callers check what they opened.
        flags | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )
    .ok()
}

/// A regular file named `name` in the directory `dir`, never through a symlink. Anything
/// else is not opened at all: an image's FIFO would block the open, and its device node
/// is the host's device.
fn open_file_at(dir: &OwnedFd, name: &str) -> Option<std::fs::File> {
    let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )
    .ok()?;
    let f = std::fs::File::from(fd);
    f.metadata().ok().filter(|m| m.is_file())?;
    Some(f)
}

/// The names in the directory `dir`.
fn names_in(dir: &OwnedFd) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let d = rustix::fs::Dir::read_from(dir.as_fd())
        .map_err(|e| AttestError::io("read", "a database directory", e.into()))?;
    for ent in d {
        let ent = ent.map_err(|e| AttestError::io("read", "a database directory", e.into()))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the package databases and walks the files of the rootfs at `rootfs`. `scratch`
/// is an empty directory of the caller's where an sqlite database is copied to be read.
pub fn scan(rootfs: &Path, scratch: &Path) -> Result<Inventory> {
    let root = Root::open(rootfs).map_err(|e| AttestError::io("open", rootfs, e.source))?;
    let mut inv = Inventory::default();
    let mut owned: HashSet<String> = HashSet::new();
    read_os_release(&root, &mut inv);
    read_dpkg(&root, &mut inv, &mut owned)?;
    read_rpm(&root, scratch, &mut inv, &mut owned)?;
    read_apk(&root, &mut inv, &mut owned)?;
    inv.unowned = unowned_files(&root, rootfs, &owned)?;
    Ok(inv)
}

fn read_os_release(root: &Root, inv: &mut Inventory) {
    for p in ["etc/os-release", "usr/lib/os-release"] {
        let Some(fd) = open_in(root, p, OFlags::RDONLY) else {
            continue;
        };
        let f = std::fs::File::from(fd);
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut text = String::new();
        if f.take(64 << 10).read_to_string(&mut text).is_err() {
            continue;
        }
        for line in text.lines() {
            let unquote = |v: &str| v.trim().trim_matches(['"', '\'']).to_string();
            if let Some(v) = line.strip_prefix("ID=") {
                inv.distro = Some(unquote(v));
            } else if let Some(v) = line.strip_prefix("VERSION_ID=") {
                inv.distro_version = Some(unquote(v));
            }
        }
        return;
    }
}

fn read_dpkg(root: &Root, inv: &mut Inventory, owned: &mut HashSet<String>) -> Result<()> {
    let Some(dir) = open_in(root, "var/lib/dpkg", OFlags::RDONLY | OFlags::DIRECTORY) else {
        return Ok(());
    };
    let mut pkgs = Vec::new();
    if let Some(f) = open_file_at(&dir, "status") {
        let path = Path::new("/var/lib/dpkg/status");
        crate::dpkg::parse_status(BufReader::new(f), path, true, &mut pkgs)?;
        inv.databases.push(path.display().to_string());
    }
    if let Ok(sd) = rustix::fs::openat(
        &dir,
        "status.d",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        for name in names_in(&sd)? {
            let Some(f) = open_file_at(&sd, &name) else {
                continue;
            };
            let path = PathBuf::from(format!("/var/lib/dpkg/status.d/{name}"));
            if name.ends_with(".md5sums") {
                crate::dpkg::parse_md5sums(BufReader::new(f), &path, owned)?;
            } else {
                crate::dpkg::parse_status(BufReader::new(f), &path, false, &mut pkgs)?;
                inv.databases.push(path.display().to_string());
            }
        }
    }
    if let Ok(info) = rustix::fs::openat(
        &dir,
        "info",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        for name in names_in(&info)? {
            if !name.ends_with(".list") {
                continue;
            }
            if let Some(f) = open_file_at(&info, &name) {
                let path = PathBuf::from(format!("/var/lib/dpkg/info/{name}"));
                crate::dpkg::parse_list(BufReader::new(f), &path, owned)?;
            }
        }
    }
    inv.packages
        .extend(pkgs.into_iter().map(|p| (Ecosystem::Deb, p)));
    Ok(())
}

fn read_rpm(
    root: &Root,
    scratch: &Path,
    inv: &mut Inventory,
    owned: &mut HashSet<String>,
) -> Result<()> {
    for rel in RPM_DIRS {
        let Some(dir) = open_in(root, rel, OFlags::RDONLY | OFlags::DIRECTORY) else {
            continue;
        };
        let mut pkgs = Vec::new();
        let shown = PathBuf::from(format!("/{rel}"));
        if let Some(mut f) = open_file_at(&dir, "rpmdb.sqlite") {
            // sqlite reads its write-ahead log beside the database: both are copied.
            let copy = scratch.join("rpmdb.sqlite");
            copy_file(&mut f, &copy)?;
            if let Some(mut wal) = open_file_at(&dir, "rpmdb.sqlite-wal") {
                copy_file(&mut wal, &scratch.join("rpmdb.sqlite-wal"))?;
            }
            let db = shown.join("rpmdb.sqlite");
            crate::rpm::collect(
                &db,
                |each| {
                    crate::rpm::sqlite::for_each_header(&copy, each)
                        .map_err(|e| rename_db(e, &copy, &db))
                },
                &mut pkgs,
                owned,
            )?;
            inv.databases.push(db.display().to_string());
        } else if let Some(f) = open_file_at(&dir, "Packages.db") {
            let db = shown.join("Packages.db");
            crate::rpm::collect(
                &db,
                |each| crate::rpm::ndb::for_each_header_in(f, &db, each),
                &mut pkgs,
                owned,
            )?;
            inv.databases.push(db.display().to_string());
        } else if let Some(f) = open_file_at(&dir, "Packages") {
            let db = shown.join("Packages");
            crate::rpm::collect(
                &db,
                |each| crate::rpm::bdb::for_each_header_in(f, &db, each),
                &mut pkgs,
                owned,
            )?;
            inv.databases.push(db.display().to_string());
        } else {
            continue;
        }
        inv.packages
            .extend(pkgs.into_iter().map(|p| (Ecosystem::Rpm, p)));
        // One database: /var/lib/rpm is often a link to the other.
        break;
    }
    Ok(())
}

/// An error about the scratch copy, said of the image's database.
fn rename_db(e: AttestError, copy: &Path, db: &Path) -> AttestError {
    match e {
        AttestError::BadDatabase { path, reason } if path == copy => AttestError::BadDatabase {
            path: db.to_path_buf(),
            reason,
        },
        e => e,
    }
}

fn copy_file(from: &mut std::fs::File, to: &Path) -> Result<()> {
    let mut out = std::fs::File::create(to).map_err(|e| AttestError::io("create", to, e))?;
    std::io::copy(from, &mut out).map_err(|e| AttestError::io("copy to", to, e))?;
    Ok(())
}

fn read_apk(root: &Root, inv: &mut Inventory, owned: &mut HashSet<String>) -> Result<()> {
    let Some(dir) = open_in(root, "lib/apk/db", OFlags::RDONLY | OFlags::DIRECTORY) else {
        return Ok(());
    };
    let Some(f) = open_file_at(&dir, "installed") else {
        return Ok(());
    };
    let path = Path::new("/lib/apk/db/installed");
    let mut pkgs = Vec::new();
    crate::apk::parse_installed(BufReader::new(f), path, &mut pkgs, owned)?;
    inv.databases.push(path.display().to_string());
    inv.packages
        .extend(pkgs.into_iter().map(|p| (Ecosystem::Apk, p)));
    Ok(())
}

/// The top-level symlinks to directories (`/bin -> usr/bin` of a merged /usr), as
/// absolute prefixes: a package that lists `/bin/ls` owns `/usr/bin/ls`.
fn top_links(rootfs: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(rootfs) else {
        return out;
    };
    for ent in rd.flatten() {
        let Ok(ft) = ent.file_type() else { continue };
        if !ft.is_symlink() {
            continue;
        }
        let Ok(target) = std::fs::read_link(ent.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let t = t.trim_start_matches('/').trim_end_matches('/');
        if t.is_empty() || t.split('/').any(|c| c == "..") {
            continue;
        }
        out.insert(
            format!("/{}", ent.file_name().to_string_lossy()),
            format!("/{t}"),
        );
    }
    out
}

fn unowned_files(root: &Root, rootfs: &Path, owned: &HashSet<String>) -> Result<Vec<UnownedFile>> {
    let links = top_links(rootfs);
    // Each owned path also under what its top directory links to.
    let mut all: HashSet<String> = owned.clone();
    for p in owned {
        for (link, target) in &links {
            if let Some(rest) = p.strip_prefix(link.as_str()) {
                if rest.starts_with('/') {
                    all.insert(format!("{target}{rest}"));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut stack: Vec<String> = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let host = rootfs.join(dir.trim_start_matches('/'));
        let rd = std::fs::read_dir(&host).map_err(|e| AttestError::io("read", &host, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| AttestError::io("read", &host, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = format!("{dir}/{name}");
            let ft = ent
                .file_type()
                .map_err(|e| AttestError::io("stat", ent.path(), e))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            if !(ft.is_file() || ft.is_symlink()) || all.contains(&path) {
                continue;
            }
            // A top-level link itself (`/bin`) is a directory to the packages.
            if links.contains_key(&path) {
                continue;
            }
            let (sha1, sha256) = if ft.is_symlink() {
                let t = std::fs::read_link(ent.path())
                    .map_err(|e| AttestError::io("read link", ent.path(), e))?;
                hashes(t.to_string_lossy().as_bytes())
            } else {
                let fd = root
                    .open_at(
                        Path::new(path.trim_start_matches('/')),
                        Resolve::NoSymlinks,
                        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
                        Mode::empty(),
                    )
                    .map_err(|e| AttestError::io("open", &path, e.source))?;
                let f = std::fs::File::from(fd);
                if !f.metadata().is_ok_and(|m| m.is_file()) {
                    continue;
                }
                hash_reader(f, &path)?
            };
            out.push(UnownedFile { path, sha1, sha256 });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn hashes(data: &[u8]) -> (String, String) {
    (
        hex::encode(sha1::Sha1::digest(data)),
        hex::encode(sha2::Sha256::digest(data)),
    )
}

fn hash_reader(mut r: impl Read, path: &str) -> Result<(String, String)> {
    let mut s1 = sha1::Sha1::new();
    let mut s2 = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| AttestError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        s1.update(&buf[..n]);
        s2.update(&buf[..n]);
    }
    Ok((hex::encode(s1.finalize()), hex::encode(s2.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rootfs_of_each_kind() {
        let dir = tempfile::tempdir().expect("tmp");
        let r = dir.path().join("root");
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        for d in ["var/lib/dpkg/info", "lib/apk/db", "usr/bin", "etc"] {
            std::fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).expect("link");
        std::fs::write(
            r.join("var/lib/dpkg/status"),
            "Package: coreutils\nStatus: install ok installed\nVersion: 9.1-1\nArchitecture: amd64\n",
        )
        .expect("status");
        std::fs::write(
            r.join("var/lib/dpkg/info/coreutils.list"),
            "/.\n/bin\n/bin/ls\n",
        )
        .expect("list");
        std::fs::write(
            r.join("lib/apk/db/installed"),
            "P:musl\nV:1.2\nA:x86_64\nF:etc\nR:apkfile\n",
        )
        .expect("apk");
        std::fs::write(r.join("usr/bin/ls"), "ls").expect("ls");
        std::fs::write(r.join("etc/apkfile"), "a").expect("a");
        std::fs::write(r.join("etc/stray"), "stray").expect("stray");
        std::fs::write(r.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").expect("os");
        let inv = scan(&r, &scratch).expect("scan");
        let names: Vec<_> = inv
            .packages
            .iter()
            .map(|(e, p)| (*e, p.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [(Ecosystem::Deb, "coreutils"), (Ecosystem::Apk, "musl")]
        );
        assert_eq!(inv.distro.as_deref(), Some("debian"));
        assert_eq!(inv.distro_version.as_deref(), Some("12"));
        let unowned: Vec<_> = inv.unowned.iter().map(|f| f.path.as_str()).collect();
        // /usr/bin/ls is owned through /bin -> usr/bin; the databases themselves are not.
        assert!(unowned.contains(&"/etc/stray"), "{unowned:?}");
        assert!(!unowned.contains(&"/usr/bin/ls"), "{unowned:?}");
        assert!(!unowned.contains(&"/etc/apkfile"), "{unowned:?}");
        let stray = inv
            .unowned
            .iter()
            .find(|f| f.path == "/etc/stray")
            .expect("stray");
        assert_eq!(stray.sha256, hex::encode(sha2::Sha256::digest(b"stray")));
    }

    #[test]
    fn a_database_symlinked_out_of_the_root_is_not_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = dir.path().join("outside");
        std::fs::write(
            &outside,
            "Package: host-secret\nStatus: install ok installed\nVersion: 1\n",
        )
        .expect("outside");
        let r = dir.path().join("root");
        std::fs::create_dir_all(r.join("var/lib/dpkg")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, r.join("var/lib/dpkg/status")).expect("link");
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        let inv = scan(&r, &scratch).expect("scan");
        assert!(inv.packages.is_empty(), "{:?}", inv.packages);
        // Positive control: the same file inside the root is read.
        std::fs::remove_file(r.join("var/lib/dpkg/status")).expect("rm");
        std::fs::copy(&outside, r.join("var/lib/dpkg/status")).expect("copy");
        assert_eq!(scan(&r, &scratch).expect("scan").packages.len(), 1);
    }

    #[test]
    fn fifos_where_databases_and_files_go_are_neither_waited_on_nor_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let r = dir.path().join("root");
        for d in ["var/lib/dpkg", "etc", "data"] {
            std::fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        // A FIFO nobody writes: an open for reading that waited would wait forever.
        for f in ["var/lib/dpkg/status", "etc/os-release", "data/pipe"] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                r.join(f),
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .expect("mkfifo");
        }
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        let (tx, rx) = std::sync::mpsc::channel();
        let (root, s2) = (r.clone(), scratch.clone());
        std::thread::spawn(move || {
            let _ = tx.send(scan(&root, &s2).map(|i| (i.packages.len(), i.unowned.len())));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the scan waited on a FIFO");
        assert_eq!(got.expect("scan"), (0, 0));
        // Positive control: a regular status file in the same place is read.
        std::fs::remove_file(r.join("var/lib/dpkg/status")).expect("rm");
        std::fs::write(
            r.join("var/lib/dpkg/status"),
            "Package: a\nStatus: install ok installed\nVersion: 1\n",
        )
        .expect("status");
        assert_eq!(scan(&r, &scratch).expect("scan").packages.len(), 1);
    }
}
