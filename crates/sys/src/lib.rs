//! The only crate that talks to the kernel directly. It owns rooted path resolution
//! (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, with a component walk for kernels
//! without openat2), the `*at` file operations used to build layer trees and rootfs
//! contents (whiteouts, xattrs, ownership, times), and file locks. Nothing here decides
//! policy: callers say how a path must be resolved, this crate makes sure it is.

pub mod lock;
pub mod memory;
pub mod mount;
pub mod priority;
pub mod rooted;
pub mod userns;
pub mod writeback;

pub use lock::FileLock;
pub use rooted::{Resolve, Root};
pub use writeback::WriteBehind;

use std::path::PathBuf;

/// A failed system call, with what it was doing and on what.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct SysError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl SysError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, errno: rustix::io::Errno) -> Self {
        SysError {
            op,
            path: path.into(),
            source: errno.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SysError {
            op,
            path: path.into(),
            source,
        }
    }

    /// The raw errno, when there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T> = std::result::Result<T, SysError>;

/// A directory opened for syncing.
fn open_dir(path: &std::path::Path) -> Result<std::os::fd::OwnedFd> {
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| SysError::new("open", path, e))
}

/// fsync a directory so that a rename or create inside it is durable.
pub fn fsync_dir(path: &std::path::Path) -> Result<()> {
    rustix::fs::fsync(&open_dir(path)?).map_err(|e| SysError::new("fsync", path, e))
}

/// Marks directory `path` as the top of separate trees (FS_TOPDIR_FL, `chattr +T`): ext4
/// then places each new directory made in it in a block group of its own, as it does for
/// directories made in `/`, instead of beside its siblings. A layer made there does not
/// land in the group whose inodes an earlier layer just freed: on ext4 without a journal,
/// making a file in such a group scans every recently freed inode of it, which made a
/// 20,000-file COPY right after a discarded one ten times slower. Whether the file system
/// took the mark; one that knows no such flag is left as it is.
pub fn mark_top_dir(path: &std::path::Path) -> Result<bool> {
    use rustix::fs::IFlags;
    let dir = open_dir(path)?;
    let flags = match rustix::fs::ioctl_getflags(&dir) {
        Ok(f) => f,
        Err(rustix::io::Errno::NOTTY | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
            return Ok(false)
        }
        Err(e) => return Err(SysError::new("get flags of", path, e)),
    };
    if flags.contains(IFlags::TOPDIR) {
        return Ok(true);
    }
    match rustix::fs::ioctl_setflags(&dir, flags | IFlags::TOPDIR) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOTTY | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
            Ok(false)
        }
        Err(e) => Err(SysError::new("set flags of", path, e)),
    }
}

/// Writes back everything of the file system holding `path` (one syncfs: the way to make
/// a whole directory tree durable without an fsync per file).
pub fn syncfs(path: &std::path::Path) -> Result<()> {
    rustix::fs::syncfs(&open_dir(path)?).map_err(|e| SysError::new("syncfs", path, e))
}

/// A handle on the file system holding a directory, taken before anything is written
/// there. Its [`FsSync::sync`] reports every writeback error the file system had since the
/// handle was opened: `syncfs` through a handle opened later misses an error that came
/// before it (the kernel samples the file system's error sequence at open).
#[derive(Debug)]
pub struct FsSync {
    fd: std::os::fd::OwnedFd,
    path: std::path::PathBuf,
}

impl FsSync {
    pub fn open(path: &std::path::Path) -> Result<FsSync> {
        Ok(FsSync {
            fd: open_dir(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Writes back everything of the file system (one syncfs).
    pub fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.fd).map_err(|e| SysError::new("syncfs", &self.path, e))
    }
}

/// Shuts the ext4 (or XFS) file system holding `path` down at once, dropping everything
/// not yet durable, journal included (`EXT4_IOC_SHUTDOWN` with
/// `EXT4_GOING_FLAGS_NOLOGFLUSH`): what a power cut leaves on the disk. Every later access
/// fails until it is unmounted and mounted again. For crash tests; needs CAP_SYS_ADMIN.
pub fn shutdown_fs_without_flush(path: &std::path::Path) -> Result<()> {
    // _IOR('X', 125, __u32): the kernel reads the flags from the pointer it is given.
    const SHUTDOWN: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<u32>(b'X', 125);
    const GOING_FLAGS_NOLOGFLUSH: u32 = 2;
    let dir = open_dir(path)?;
    // SAFETY: the opcode is EXT4_IOC_SHUTDOWN (XFS_IOC_GOINGDOWN), whose argument is a
    // pointer to a u32 the kernel only reads; Setter passes a pointer to that u32.
    #[allow(unsafe_code)]
    let shutdown = unsafe { rustix::ioctl::Setter::<SHUTDOWN, u32>::new(GOING_FLAGS_NOLOGFLUSH) };
    // SAFETY: as above; the descriptor is an open directory of the file system.
    #[allow(unsafe_code)]
    unsafe { rustix::ioctl::ioctl(&dir, shutdown) }
        .map_err(|e| SysError::new("shut down the file system of", path, e))
}

/// Renames `from` to `to`, failing with EEXIST if `to` exists (never overwrites).
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| SysError::new("rename", to, e))
}

/// Mount points at or under `prefix` listed in /proc/self/mountinfo (for leak checks).
pub fn mounts_under(prefix: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(prefix))
        .collect())
}

/// A file that has no name until it is complete: created with O_TMPFILE in the directory
/// it will live in (so a crash leaves nothing behind), then linked to its name without
/// replacing anything. Where the file system lacks O_TMPFILE, a hidden named temp file is
/// used instead and removed on drop.
pub struct PendingFile {
    file: std::fs::File,
    named: Option<PathBuf>,
}

impl PendingFile {
    pub fn new_in(dir: &std::path::Path) -> Result<PendingFile> {
        use rustix::fs::{Mode, OFlags};
        let mode = Mode::from_raw_mode(0o644);
        match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => Ok(PendingFile {
                file: std::fs::File::from(fd),
                named: None,
            }),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::ISDIR) => {
                let name = dir.join(format!(".isula-tmp-{:016x}", rand_u64()));
                let fd = rustix::fs::open(
                    &name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    mode,
                )
                .map_err(|e| SysError::new("create", &name, e))?;
                Ok(PendingFile {
                    file: std::fs::File::from(fd),
                    named: Some(name),
                })
            }
            Err(e) => Err(SysError::new("create temporary file in", dir, e)),
        }
    }

    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// fsyncs the data and gives the file its name; fails with EEXIST if `dest` exists.
    pub fn persist_noreplace(mut self, dest: &std::path::Path) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| SysError::io("fsync", dest, e))?;
        match self.named.take() {
            None => {
                let proc = format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&self.file)
                );
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc.as_str(),
                    rustix::fs::CWD,
                    dest,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(|e| SysError::new("link", dest, e))?;
            }
            Some(name) => {
                let result = rename_noreplace(&name, dest);
                if result.is_err() {
                    let _ = std::fs::remove_file(&name);
                }
                result?;
            }
        }
        if let Some(dir) = dest.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(name) = &self.named {
            let _ = std::fs::remove_file(name);
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_ne_bytes(b) ^ u64::from(std::process::id())
}

#[cfg(test)]
mod pending_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn appears_complete_and_never_replaces() {
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("out.tar");
        let mut p = PendingFile::new_in(dir.path()).expect("pending");
        p.file().write_all(b"data").expect("write");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        p.persist_noreplace(&dest).expect("persist");
        assert_eq!(std::fs::read(&dest).expect("read"), b"data");
        let mut q = PendingFile::new_in(dir.path()).expect("pending");
        q.file().write_all(b"other").expect("write");
        let e = q.persist_noreplace(&dest).expect_err("must not replace");
        assert_eq!(e.errno(), Some(17));
        assert_eq!(std::fs::read(&dest).expect("read"), b"data");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}

/// Who a client is, for opening the paths it names with its rights rather than ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The credentials of a connected process (from SO_PEERCRED), with its supplementary
    /// groups read from /proc. If they cannot be read the process gets its primary group only.
    /// The identity of a socket's peer: its uid and gid with the supplementary groups the
    /// kernel gave for the socket (`peer_groups`).
    pub fn of_socket_peer(uid: u32, gid: u32, groups: Vec<u32>) -> Credentials {
        Credentials { uid, gid, groups }
    }

    pub fn of_peer(pid: Option<i32>, uid: u32, gid: u32) -> Credentials {
        let groups = pid
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Groups:").map(|g| {
                        g.split_whitespace()
                            .filter_map(|x| x.parse().ok())
                            .collect::<Vec<u32>>()
                    })
                })
            })
            .unwrap_or_else(|| vec![gid]);
        Credentials { uid, gid, groups }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Runs `f` on a fresh thread whose file-system identity is `creds` (per-thread
/// setresuid/setresgid/setgroups), so every open, create and link inside is checked against
/// the client's rights. The thread ends with `f`; no other thread's identity changes.
pub fn with_credentials<R: Send>(
    creds: &Credentials,
    f: impl FnOnce() -> R + Send,
) -> std::io::Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<R> {
            let groups: Vec<rustix::process::Gid> = creds
                .groups
                .iter()
                .map(|g| rustix::process::Gid::from_raw(*g))
                .collect();
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_res_gid(
                None,
                rustix::process::Gid::from_raw(creds.gid),
                None,
            )?;
            rustix::thread::set_thread_res_uid(
                None,
                rustix::process::Uid::from_raw(creds.uid),
                None,
            )?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("credential thread panicked")))
    })
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn opens_with_the_callers_rights() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: needs root to switch identities");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only").expect("write");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let nobody = Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let denied = with_credentials(&nobody, || std::fs::File::open(&secret)).expect("thread");
        assert_eq!(
            denied.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::PermissionDenied)
        );
        let created = with_credentials(&nobody, || std::fs::File::create(dir.path().join("new")))
            .expect("thread");
        assert!(
            created.is_err(),
            "nobody cannot write a root-owned 0755 dir"
        );
        // This thread is still root.
        assert!(std::fs::File::open(&secret).is_ok());
        let root = Credentials {
            uid: 0,
            gid: 0,
            groups: vec![0],
        };
        assert!(with_credentials(&root, || std::fs::File::open(&secret))
            .expect("thread")
            .is_ok());
    }
}

/// The supplementary groups of the process at the other end of a unix socket, as the kernel
/// recorded them when it connected (SO_PEERGROUPS): no later change of that process, and no
/// reuse of its PID, can alter them.
pub fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable gid_t storage owned by `groups`, and
        // `len` is passed by a valid pointer; the kernel writes at most `len` bytes and sets
        // `len` to the size it wrote or needs.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(e);
    }
}

#[cfg(test)]
mod peer_group_tests {
    #[test]
    fn a_socket_pair_shows_our_own_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        use std::os::fd::AsFd;
        let groups = super::peer_groups(a.as_fd()).expect("SO_PEERGROUPS");
        let mine = rustix::process::getgroups().expect("getgroups");
        let mut mine: Vec<u32> = mine.iter().map(|g| g.as_raw()).collect();
        let mut got = groups.clone();
        mine.sort();
        got.sort();
        assert_eq!(got, mine);
    }
}

#[cfg(test)]
mod top_dir_tests {
    /// ext4's magic number in statfs.
    const EXT4_MAGIC: i64 = 0xEF53;

    #[test]
    fn an_ext4_directory_takes_the_top_mark() {
        // The owner may set this flag: no root needed. /var/tmp is on the disk (never
        // tmpfs) on the machines the tests run on.
        let d = tempfile::tempdir_in("/var/tmp").expect("tmp");
        let dir = rustix::fs::open(
            d.path(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
        let ext4 = rustix::fs::fstatfs(&dir).expect("statfs").f_type as i64 == EXT4_MAGIC;
        let marked = super::mark_top_dir(d.path()).expect("mark");
        let flags = rustix::fs::ioctl_getflags(&dir);
        if ext4 {
            assert!(marked, "ext4 takes FS_TOPDIR_FL");
            assert!(flags.expect("flags").contains(rustix::fs::IFlags::TOPDIR));
            // Marking again is no error and keeps the mark.
            assert!(super::mark_top_dir(d.path()).expect("again"));
        } else if marked {
            assert!(flags.expect("flags").contains(rustix::fs::IFlags::TOPDIR));
        }
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let e = super::mark_top_dir(std::path::Path::new("/nonexistent/isula-top"))
            .expect_err("no such directory");
        assert!(e.to_string().contains("/nonexistent/isula-top"), "{e}");
    }
}
