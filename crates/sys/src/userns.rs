//! User namespaces: the kernel side of a rootless daemon. A process started by an ordinary
//! user moves itself into a new user and mount namespace (`unshare`), where it is root over
//! the ids its parent maps with `newuidmap`/`newgidmap`; this module makes that move, tells
//! whether the current process is in such a namespace, and reads its id maps. It decides
//! nothing: which ids to map and when is the daemon's business.

use crate::{Result, SysError};
use std::path::Path;
use std::sync::OnceLock;

/// One line of `/proc/self/uid_map` (or `gid_map`): `count` ids from `inside` in this
/// namespace are `outside` and on in the parent namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

impl IdRange {
    /// The last id inside the namespace this range maps.
    pub fn last_inside(&self) -> u32 {
        self.inside.saturating_add(self.count.saturating_sub(1))
    }
}

/// Parses a uid_map/gid_map text.
pub fn parse_id_map(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some(IdRange {
                inside: f.next()??,
                outside: f.next()??,
                count: f.next()??,
            })
        })
        .collect()
}

fn read_map(kind: &str) -> Vec<IdRange> {
    std::fs::read_to_string(format!("/proc/self/{kind}_map"))
        .map(|t| parse_id_map(&t))
        .unwrap_or_default()
}

/// The uid map of this process's user namespace.
pub fn uid_map() -> &'static [IdRange] {
    static MAP: OnceLock<Vec<IdRange>> = OnceLock::new();
    MAP.get_or_init(|| read_map("uid"))
}

/// The gid map of this process's user namespace.
pub fn gid_map() -> &'static [IdRange] {
    static MAP: OnceLock<Vec<IdRange>> = OnceLock::new();
    MAP.get_or_init(|| read_map("gid"))
}

/// Whether this process runs in a user namespace other than the initial one (whose map is
/// the identity over every id). There, overlayfs keeps its metadata in `user.overlay.*`
/// xattrs (`userxattr`), devices cannot be made and runc must not touch cgroups it was not
/// given. Read once: a process moves at most once, before it reads this.
pub fn in_user_namespace() -> bool {
    static IN: OnceLock<bool> = OnceLock::new();
    *IN.get_or_init(|| {
        let map = uid_map();
        !(map.is_empty()
            || map
                == [IdRange {
                    inside: 0,
                    outside: 0,
                    count: u32::MAX,
                }])
    })
}

/// Whether `id` is mapped in `map`.
pub fn is_mapped(map: &[IdRange], id: u32) -> bool {
    map.iter()
        .any(|r| id >= r.inside && id - r.inside < r.count)
}

/// The inside ids `map` covers, as "0-65536" (contiguous) or "0, 1-65536" pieces.
pub fn describe_map(map: &[IdRange]) -> String {
    let mut pieces: Vec<(u32, u32)> = map.iter().map(|r| (r.inside, r.last_inside())).collect();
    pieces.sort();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (a, b) in pieces {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Moves this process into a new user namespace and a new mount namespace (owned by the
/// new user namespace). Must be called while the process has a single thread (the kernel
/// refuses a multi-threaded process). Until a parent writes its id maps the process is
/// nobody there.
pub fn unshare_user_and_mount() -> Result<()> {
    use rustix::thread::UnshareFlags;
    // SAFETY: neither flag is CLONE_FILES: no file descriptor table is split between
    // threads (and the caller has a single thread).
    #[allow(unsafe_code)]
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNS) }
        .map_err(|e| SysError::new("unshare a user namespace", "/proc/self/ns/user", e))
}

/// After the maps are written: drop the supplementary groups (unmapped ones would show as
/// nobody to every file check) and stop mount events from travelling to or from the
/// parent's mount namespace.
pub fn settle_in_namespace() -> Result<()> {
    rustix::thread::set_thread_groups(&[])
        .map_err(|e| SysError::new("setgroups", "/proc/self/setgroups", e))?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .map_err(|e| SysError::new("make mounts private", "/", e))
}

/// Asks the kernel to send `TERM` to this process when its parent (the thread that
/// started it) ends: the rootless daemon's parent holds its place for the service
/// manager, a daemonless builder serves one client command; without it, it must stop too.
/// Returns false when the parent is already gone.
pub fn die_with_parent(expected_parent: u32) -> Result<bool> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
        .map_err(|e| SysError::new("prctl PR_SET_PDEATHSIG", "/proc/self", e))?;
    Ok(
        rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
            == Some(expected_parent),
    )
}

/// Takes ownership of pipe end `fd`, which this process inherited from the parent that
/// started it (and named it). Refuses the standard streams and anything not a pipe.
pub fn inherited_pipe(fd: i32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let path = format!("/proc/self/fd/{fd}");
    if fd < 3 {
        return Err(SysError::new(
            "take inherited pipe",
            path,
            rustix::io::Errno::BADF,
        ));
    }
    let meta = std::fs::metadata(&path).map_err(|e| SysError::io("stat", path.clone(), e))?;
    if !std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
        return Err(SysError::new(
            "take inherited pipe",
            path,
            rustix::io::Errno::BADF,
        ));
    }
    // SAFETY: `fd` is open (its /proc entry exists) and is a pipe this process inherited
    // for this purpose; nothing else in the process holds it, and it is taken once.
    #[allow(unsafe_code)]
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The kernel's limit on user namespaces (`user.max_user_namespaces`), when readable.
pub fn max_user_namespaces() -> Option<u64> {
    std::fs::read_to_string(Path::new("/proc/sys/user/max_user_namespaces"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse_and_describe() {
        let m =
            parse_id_map("         0       1000          1\n         1     100000      65536\n");
        assert_eq!(m.len(), 2);
        assert!(is_mapped(&m, 0) && is_mapped(&m, 65536) && !is_mapped(&m, 65537));
        assert_eq!(describe_map(&m), "0-65536");
        let gap = parse_id_map("0 1000 1\n5 100000 10\n");
        assert_eq!(describe_map(&gap), "0-0, 5-14");
        assert!(!is_mapped(&gap, 3));
        assert!(parse_id_map("garbage\n").is_empty());
    }

    #[test]
    fn the_test_process_is_in_the_initial_namespace() {
        // Tests run as root on the host (or as a user outside any namespace of ours).
        let initial = uid_map()
            == [IdRange {
                inside: 0,
                outside: 0,
                count: u32::MAX,
            }];
        assert_eq!(in_user_namespace(), !initial);
    }
}
