//! USER and --chown names resolved from the image's own /etc/passwd and /etc/group (read
//! inside the rootfs, never the host's), as Docker does.

use isula_sys::rooted::{Resolve, Root};
use rustix::fs::{Mode, OFlags};
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// A regular file of the rootfs, at most 4 MiB. The open does not block (an earlier RUN may
/// have left a FIFO there) and anything but a regular file counts as missing.
fn read_in_root(root: &Root, path: &str) -> Option<String> {
    let fd = root
        .open_at(
            Path::new(path),
            Resolve::InRoot,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
        .ok()?;
    let f = std::fs::File::from(fd);
    if !f.metadata().ok()?.is_file() {
        tracing::warn!(path, "not a regular file in the image: ignored");
        return None;
    }
    let mut s = String::new();
    f.take(4 << 20).read_to_string(&mut s).ok()?;
    Some(s)
}

/// (name, uid, primary gid) entries of /etc/passwd.
fn passwd(root: &Root) -> Vec<(String, u32, u32)> {
    read_in_root(root, "/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((
                f.first()?.to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
            ))
        })
        .collect()
}

/// (name, gid, members) entries of /etc/group.
fn groups(root: &Root) -> Vec<(String, u32, Vec<String>)> {
    read_in_root(root, "/etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
        })
        .collect()
}

/// Resolves `user[:group]` (names or numbers). For RUN (`with_supplementary`) a missing
/// group is the user's primary group and the user's other groups are added; for --chown a
/// missing group is the user's own number, as Docker does.
pub fn resolve(root: &Root, spec: &str, with_supplementary: bool) -> Result<Ids, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(format!("invalid user {spec:?}"));
    }
    let users = passwd(root);
    let (uid, primary, name) = match user.parse::<u32>() {
        Ok(uid) => {
            let entry = users.iter().find(|(_, u, _)| *u == uid);
            (uid, entry.map_or(0, |e| e.2), entry.map(|e| e.0.clone()))
        }
        Err(_) => {
            let e = users.iter().find(|(n, _, _)| n == user).ok_or_else(|| {
                format!("unable to find user {user}: no matching entries in passwd file")
            })?;
            (e.1, e.2, Some(e.0.clone()))
        }
    };
    let all_groups = groups(root);
    let gid = match group {
        // --chown with a user alone: Docker uses the same number as the group.
        None if !with_supplementary => uid,
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|e| e.1)
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
    };
    let mut additional_gids = Vec::new();
    if with_supplementary && group.is_none() {
        if let Some(name) = name {
            for (_, g, members) in &all_groups {
                if members.contains(&name) && *g != gid && !additional_gids.contains(g) {
                    additional_gids.push(*g);
                }
            }
        }
    }
    Ok(Ids {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_for_etc_passwd_neither_blocks_nor_counts() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("etc/passwd"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        std::fs::write(dir.path().join("etc/group"), "staff:x:50:\n").expect("group");
        let root = Root::open(dir.path()).expect("root");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(resolve(&root, "someone", true));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("resolve returned instead of blocking on the FIFO");
        assert!(r
            .expect_err("no passwd")
            .contains("unable to find user someone"));
    }
}
