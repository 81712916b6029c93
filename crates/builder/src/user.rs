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

fn read_in_root(root: &Root, path: &str) -> Option<String> {
    let fd = root
        .open_at(
            Path::new(path),
            Resolve::InRoot,
            OFlags::RDONLY,
            Mode::empty(),
        )
        .ok()?;
    let mut s = String::new();
    std::fs::File::from(fd)
        .take(4 << 20)
        .read_to_string(&mut s)
        .ok()?;
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
