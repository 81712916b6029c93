//! Files a remote client names: a daemon reached over TCP never opens a path of the
//! client's machine. The client sends its input files ahead (Upload) and names them in the
//! request as `/.isula-remote/in/ID/NAME`; it names its outputs `/.isula-remote/out/TOKEN/…`,
//! which the request writes here, and fetches them afterwards (Download) to write them on
//! its own disk with its own rights. Every other path a remote request names is refused.
//!
//! ```text
//! <dataroot>/remote-files/<owner>/      one per client identity (hex of its SHA-256)
//! ├── in/<id>/<name>                    uploaded inputs, deleted when the request ends
//! └── out/<token>/…                     outputs waiting for Download, deleted when sent
//! ```
//!
//! Nothing here outlives a daemon: the directory is emptied at start, and what a client
//! uploaded or left behind (it went away before its download) goes after [`MAX_AGE`].

use crate::state::State;
use isula_api::v1::{DownloadChunk, UploadChunk, UploadReply};
use isula_sys::{PendingFile, SysError};
use isula_transport::ClientFiles;
use sha2::Digest as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Status;

/// The prefix of the paths a remote request uses for the client's files.
pub const PREFIX: &str = "/.isula-remote";
/// How long an upload or an undelivered output is kept.
pub const MAX_AGE: Duration = Duration::from_secs(3600);
/// Files one upload may hold (a separated image's directory and tarballs).
pub const FILES_MAX: usize = 1000;
/// Uploads one client may have waiting at once (each ends with its command, or after
/// [`MAX_AGE`]).
pub const UPLOADS_MAX: usize = 16;
/// Bytes one upload may hold (isula-build's limit on a loaded tarball).
pub const UPLOAD_MAX: u64 = 50 << 30;
const CHUNK: usize = 1 << 20;

fn root(state: &State) -> PathBuf {
    state.settings.data_root.join("remote-files")
}

/// Empties what an earlier daemon left (called at start).
pub fn reset(data_root: &Path) {
    let dir = data_root.join("remote-files");
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "emptying the remote files");
        }
    }
}

fn owner_dir(state: &State, owner: &str) -> PathBuf {
    root(state).join(&hex::encode(sha2::Sha256::digest(owner.as_bytes()))[..32])
}

fn is_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A plain file name: no separator, not `.` or `..`, at most 255 bytes.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.contains(['/', '\0']) && s != "." && s != ".."
}

/// Removes uploads and outputs older than [`MAX_AGE`], of every client.
fn sweep(state: &State) {
    let old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > MAX_AGE)
    };
    for owner in std::fs::read_dir(root(state))
        .into_iter()
        .flatten()
        .flatten()
    {
        for kind in ["in", "out"] {
            for e in std::fs::read_dir(owner.path().join(kind))
                .into_iter()
                .flatten()
                .flatten()
            {
                if old(&e.path()) {
                    let _ = isula_sys::rooted::remove_tree(&e.path());
                }
            }
        }
    }
}

/// A remote client's files, as the request names them.
pub struct RemoteFiles {
    base: PathBuf,
    /// Upload directories this request read: deleted when it ends.
    used: Mutex<Vec<PathBuf>>,
}

impl RemoteFiles {
    pub fn new(state: &State, owner: &str) -> RemoteFiles {
        RemoteFiles {
            base: owner_dir(state, owner),
            used: Mutex::new(Vec::new()),
        }
    }

    /// Where the client's path `p` is kept here: `in` or `out`, and the path.
    fn map(&self, p: &Path) -> io::Result<(&'static str, PathBuf)> {
        let refused = || {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} names a file on the client's machine, which a daemon reached over TCP does not open (a current client sends it over the connection)",
                    p.display()
                ),
            )
        };
        let rest = p.strip_prefix(PREFIX).map_err(|_| refused())?;
        let mut parts = Vec::new();
        for c in rest.components() {
            match c {
                Component::Normal(n) => parts.push(n.to_str().ok_or_else(refused)?),
                _ => return Err(refused()),
            }
        }
        let (kind, token, tail) = match parts.as_slice() {
            [kind @ ("in" | "out"), token, tail @ ..] if is_token(token) => {
                (if *kind == "in" { "in" } else { "out" }, *token, tail)
            }
            _ => return Err(refused()),
        };
        if kind == "in" && tail.len() != 1 {
            return Err(refused());
        }
        let mut path = self.base.join(kind).join(token);
        for t in tail {
            path.push(t);
        }
        Ok((kind, path))
    }

    /// The output path `p` names here; its token's directory is made if it is missing.
    fn output(&self, p: &Path) -> io::Result<PathBuf> {
        match self.map(p)? {
            ("out", path) => {
                let token_dir: PathBuf = path
                    .strip_prefix(self.base.join("out"))
                    .ok()
                    .and_then(|r| r.components().next())
                    .map(|t| self.base.join("out").join(t))
                    .unwrap_or_else(|| path.clone());
                if token_dir != path {
                    std::fs::create_dir_all(&token_dir)?;
                }
                Ok(path)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is an input, not a place to write", p.display()),
            )),
        }
    }
}

impl Drop for RemoteFiles {
    fn drop(&mut self) {
        for dir in self
            .used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing an upload");
            }
        }
    }
}

impl ClientFiles for RemoteFiles {
    fn open(&self, p: &Path) -> io::Result<File> {
        match self.map(p)? {
            ("in", path) => {
                let f = isula_transport::open_regular(&path).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{} was not uploaded (or is gone)", p.display()),
                        )
                    } else {
                        e
                    }
                })?;
                if let Some(dir) = path.parent() {
                    let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
                    if !used.iter().any(|d| d == dir) {
                        used.push(dir.to_path_buf());
                    }
                }
                Ok(f)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is an output, not an input", p.display()),
            )),
        }
    }
    fn exists(&self, p: &Path) -> bool {
        self.map(p)
            .is_ok_and(|(_, path)| std::fs::symlink_metadata(path).is_ok())
    }
    fn write_file(&self, p: &Path, data: &[u8]) -> io::Result<()> {
        std::fs::write(self.output(p)?, data)
    }
    fn create_dir(&self, p: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let path = self.output(p)?;
        std::fs::create_dir_all(self.base.join("out"))?;
        std::fs::DirBuilder::new().mode(0o700).create(path)
    }
    fn create_pending(&self, dir: &Path) -> Result<PendingFile, SysError> {
        let path = self
            .output(dir)
            .map_err(|e| SysError::io("create", dir, e))?;
        std::fs::create_dir_all(&path).map_err(|e| SysError::io("create", dir, e))?;
        PendingFile::new_in(&path)
    }
    fn persist(&self, file: PendingFile, dest: &Path) -> Result<(), SysError> {
        let path = self
            .output(dest)
            .map_err(|e| SysError::io("write", dest, e))?;
        file.persist_noreplace(&path)
    }
}

/// Receives an upload: files one after the other into a new directory of the caller's,
/// each checked against the SHA-256 the client sends. A stream that fails or ends early
/// leaves nothing behind.
pub async fn upload(
    state: Arc<State>,
    owner: String,
    mut stream: tonic::Streaming<UploadChunk>,
) -> Result<UploadReply, Status> {
    {
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || sweep(&state)).await;
    }
    let waiting = std::fs::read_dir(owner_dir(&state, &owner).join("in"))
        .map(|d| d.count())
        .unwrap_or(0);
    if waiting >= UPLOADS_MAX {
        return Err(Status::resource_exhausted(format!(
            "{waiting} uploads of this client wait to be used (at most {UPLOADS_MAX}): each goes when its command ends, or after an hour"
        )));
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let dir = owner_dir(&state, &owner).join("in").join(&id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
    let result = receive(&dir, &mut stream).await;
    match result {
        Ok(()) => Ok(UploadReply { id }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

async fn receive(dir: &Path, stream: &mut tonic::Streaming<UploadChunk>) -> Result<(), Status> {
    let mut files = 0usize;
    let mut total = 0u64;
    let mut current: Option<(String, File, sha2::Sha256)> = None;
    while let Some(chunk) = stream.message().await? {
        if current.is_none() {
            if !is_plain_name(&chunk.name) {
                return Err(Status::invalid_argument(format!(
                    "an uploaded file must be named by a plain file name, not {:?}",
                    chunk.name
                )));
            }
            files += 1;
            if files > FILES_MAX {
                return Err(Status::invalid_argument(format!(
                    "an upload holds at most {FILES_MAX} files"
                )));
            }
            let path = dir.join(&chunk.name);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| {
                    Status::invalid_argument(format!("uploaded file {:?}: {e}", chunk.name))
                })?;
            current = Some((chunk.name.clone(), f, sha2::Sha256::new()));
        }
        let Some((name, f, hash)) = current.as_mut() else {
            continue;
        };
        if !chunk.name.is_empty() && chunk.name != *name {
            return Err(Status::invalid_argument(format!(
                "uploaded file {name:?} ended without `done` before {:?} began",
                chunk.name
            )));
        }
        total += chunk.data.len() as u64;
        if total > UPLOAD_MAX {
            return Err(Status::resource_exhausted(format!(
                "an upload holds at most {} GiB",
                UPLOAD_MAX >> 30
            )));
        }
        hash.update(&chunk.data);
        f.write_all(&chunk.data)
            .map_err(|e| Status::internal(format!("writing uploaded file {name:?}: {e}")))?;
        if chunk.done {
            let got = hex::encode(std::mem::take(hash).finalize());
            if got != chunk.sha256 {
                return Err(Status::data_loss(format!(
                    "uploaded file {name:?} arrived with SHA-256 {got}, not the {:?} the client sent",
                    chunk.sha256
                )));
            }
            current = None;
        }
    }
    if let Some((name, ..)) = current {
        return Err(Status::aborted(format!(
            "the upload ended in the middle of {name:?}"
        )));
    }
    if files == 0 {
        return Err(Status::invalid_argument("an upload holds no file"));
    }
    Ok(())
}

/// Sends the outputs under the caller's `token`, then deletes them.
pub fn download(
    state: &State,
    owner: &str,
    token: &str,
) -> Result<tokio::sync::mpsc::Receiver<Result<DownloadChunk, Status>>, Status> {
    if !is_token(token) {
        return Err(Status::invalid_argument(format!(
            "{token:?} is not a download token (32 lower-case hex digits)"
        )));
    }
    let dir = owner_dir(state, owner).join("out").join(token);
    if !dir.is_dir() {
        return Err(Status::not_found(format!(
            "nothing to download under {token} (the request wrote nothing, or it was sent)"
        )));
    }
    let mut found = Vec::new();
    list_files(&dir, "", &mut found)
        .map_err(|e| Status::internal(format!("listing {}: {e}", dir.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("download".into())
        .spawn(move || {
            if let Err(e) = send_files(&dir, &found, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a sent output");
            }
        })
        .map_err(|e| Status::internal(format!("starting a download: {e}")))?;
    Ok(rx)
}

/// The regular files under `dir`, by '/'-separated relative path, in order.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = e.file_type()?;
        if kind.is_dir() {
            list_files(&e.path(), &rel, out)?;
        } else if kind.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

fn send_files(
    dir: &Path,
    files: &[String],
    tx: &tokio::sync::mpsc::Sender<Result<DownloadChunk, Status>>,
) -> Result<(), Status> {
    use std::os::unix::fs::PermissionsExt;
    let gone = || Status::cancelled("the client went away");
    for rel in files {
        let path = dir.join(rel);
        let mut f = File::open(&path)
            .map_err(|e| Status::internal(format!("opening {}: {e}", path.display())))?;
        let mode = f
            .metadata()
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644);
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Status::internal(format!("reading {}: {e}", path.display())))?;
            hash.update(&buf[..n]);
            let done = n == 0;
            let chunk = DownloadChunk {
                path: rel.clone(),
                data: buf[..n].to_vec(),
                done,
                sha256: if done {
                    hex::encode(std::mem::take(&mut hash).finalize())
                } else {
                    String::new()
                },
                mode: if done { mode } else { 0 },
            };
            tx.blocking_send(Ok(chunk)).map_err(|_| gone())?;
            if done {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> RemoteFiles {
        RemoteFiles {
            base: PathBuf::from("/data/remote-files/o"),
            used: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn only_the_prefixed_paths_of_the_callers_own_directory_are_mapped() {
        let f = files();
        let t = "0123456789abcdef0123456789abcdef";
        let (k, p) = f
            .map(Path::new(&format!("{PREFIX}/in/{t}/app.tar")))
            .expect("input");
        assert_eq!(
            (k, p),
            (
                "in",
                PathBuf::from(format!("/data/remote-files/o/in/{t}/app.tar"))
            )
        );
        let (k, p) = f
            .map(Path::new(&format!("{PREFIX}/out/{t}/dir/a.tar.gz")))
            .expect("output");
        assert_eq!(
            (k, p),
            (
                "out",
                PathBuf::from(format!("/data/remote-files/o/out/{t}/dir/a.tar.gz"))
            )
        );
        for bad in [
            "/etc/passwd".to_string(),
            format!("{PREFIX}/in/{t}"),
            format!("{PREFIX}/in/{t}/a/b"),
            format!("{PREFIX}/in/{t}/../x"),
            format!("{PREFIX}/out/{t}/../../in/x"),
            format!("{PREFIX}/out/notatoken/x"),
            format!("{PREFIX}/other/{t}/x"),
            format!("{PREFIX}/out/{}/x", t.to_uppercase()),
        ] {
            let e = f.map(Path::new(&bad)).expect_err(&bad);
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{bad}");
        }
        assert!(!f.exists(Path::new("/etc/passwd")));
        assert!(f.open(Path::new(&format!("{PREFIX}/out/{t}/x"))).is_err());
    }

    #[test]
    fn names_of_uploaded_files_are_plain() {
        assert!(is_plain_name("app.tar.gz"));
        for bad in ["", ".", "..", "a/b", "/a", "a\0b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        assert!(!is_plain_name(&"x".repeat(256)));
    }
}
