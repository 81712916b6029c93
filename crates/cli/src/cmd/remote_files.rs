//! The files a command names, for a daemon reached over TCP: it never opens a path of this
//! machine. Inputs are sent ahead (Upload) and named in the request by where the daemon
//! keeps them; outputs are named by a place the daemon writes for this client, and fetched
//! afterwards (Download) into the paths the user gave, with this user's rights, complete or
//! not at all.

use super::Client;
use anyhow::{bail, Context, Result};
use isula_api::v1::{DownloadRequest, UploadChunk};
use sha2::Digest as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The prefix of the paths a request uses for this client's files (the daemon's
/// `remote_files::PREFIX`).
pub const PREFIX: &str = "/.isula-remote";
const CHUNK: usize = 1 << 20;

static REMOTE: AtomicBool = AtomicBool::new(false);

/// Whether the daemon is reached over TCP (set once, when the command connects).
pub fn is_remote() -> bool {
    REMOTE.load(Ordering::Relaxed)
}

pub fn set_remote(remote: bool) {
    REMOTE.store(remote, Ordering::Relaxed);
}

fn token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Sends `files` (each a plain name and the local file) in one upload; returns its ID.
pub async fn upload(client: &mut Client, files: &[(String, PathBuf)]) -> Result<String> {
    for (_, path) in files {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(4);
    let list: Vec<(String, PathBuf)> = files.to_vec();
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        for (name, path) in list {
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut hash = sha2::Sha256::new();
            let mut first = true;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", path.display()))?;
                buf.truncate(n);
                hash.update(&buf);
                let done = n == 0;
                let chunk = UploadChunk {
                    name: if first { name.clone() } else { String::new() },
                    data: buf,
                    done,
                    sha256: if done {
                        hex::encode(std::mem::take(&mut hash).finalize())
                    } else {
                        String::new()
                    },
                };
                first = false;
                if tx.blocking_send(chunk).is_err() {
                    // The call ended: its error says why.
                    return Ok(());
                }
                if done {
                    break;
                }
            }
        }
        Ok(())
    });
    let sent = client
        .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader.await.context("the reading thread stopped")??;
    let id = sent
        .map_err(|s| anyhow::anyhow!("sending files to the daemon: {}", s.message()))?
        .into_inner()
        .id;
    Ok(id)
}

/// Sends one file; returns the path that names it in a request.
pub async fn upload_file(client: &mut Client, path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .filter(|n| !n.is_empty() && n != "..")
        .unwrap_or_else(|| "file".into());
    let id = upload(client, &[(name.clone(), path.to_path_buf())]).await?;
    Ok(format!("{PREFIX}/in/{id}/{name}"))
}

/// Sends the regular files directly in `dir` (a separated image's directory); returns the
/// path that names the directory in a request.
pub async fn upload_dir(client: &mut Client, dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            files.push((e.file_name().to_string_lossy().to_string(), e.path()));
        }
    }
    if files.is_empty() {
        bail!("{} holds no file to send", dir.display());
    }
    let id = upload(client, &files).await?;
    Ok(format!("{PREFIX}/in/{id}"))
}

/// The outputs of one request: where the daemon writes each, and where it goes here.
#[derive(Debug)]
pub struct Outputs {
    token: String,
    /// (the daemon-side name under the token, the local path, a directory)
    items: Vec<(String, PathBuf, bool)>,
}

impl Default for Outputs {
    fn default() -> Self {
        Outputs {
            token: token(),
            items: Vec::new(),
        }
    }
}

impl Outputs {
    /// The path naming, in the request, the file `local` (which must not exist yet).
    pub fn file(&mut self, local: &Path) -> String {
        let slot = format!("f{}", self.items.len());
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .filter(|n| !n.is_empty() && n != "..")
            .unwrap_or_else(|| "output".into());
        self.items
            .push((format!("{slot}/{name}"), local.to_path_buf(), false));
        format!("{PREFIX}/out/{}/{slot}/{name}", self.token)
    }

    /// The path naming, in the request, the directory `local` (which must not exist yet).
    pub fn dir(&mut self, local: &Path) -> String {
        let slot = format!("d{}", self.items.len());
        self.items.push((slot.clone(), local.to_path_buf(), true));
        format!("{PREFIX}/out/{}/{slot}", self.token)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The local path for a downloaded file `rel` (under the token).
    fn local_for(&self, rel: &str) -> Result<PathBuf> {
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("the daemon sent a file named {rel:?}");
        }
        for (slot, local, dir) in &self.items {
            if *dir {
                if let Some(rest) = rel.strip_prefix(&format!("{slot}/")) {
                    return Ok(local.join(rest));
                }
            } else if rel == slot {
                return Ok(local.clone());
            }
        }
        bail!("the daemon sent {rel:?}, which this command did not ask for")
    }

    /// Replaces the daemon-side names in `text` (an error message) with the local paths.
    pub fn explain(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (slot, local, _) in &self.items {
            out = out.replace(
                &format!("{PREFIX}/out/{}/{slot}", self.token),
                &local.display().to_string(),
            );
        }
        out
    }

    /// Fetches the outputs and writes them here: each file appears complete or not at all,
    /// and nothing existing is replaced.
    pub async fn fetch(self, client: &mut Client) -> Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let mut stream = client
            .download(DownloadRequest {
                token: self.token.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("receiving the output: {}", s.message()))?
            .into_inner();
        for (_, local, dir) in &self.items {
            if *dir {
                std::fs::create_dir(local)
                    .with_context(|| format!("creating {}", local.display()))?;
            }
        }
        let mut current: Option<(String, PathBuf, tempfile::NamedTempFile, sha2::Sha256)> = None;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("receiving the output: {}", s.message()))?
        {
            if current.as_ref().is_none_or(|(rel, ..)| *rel != chunk.path) {
                if let Some((rel, ..)) = &current {
                    bail!("the daemon's file {rel:?} ended without its last chunk");
                }
                let dest = self.local_for(&chunk.path)?;
                let dir = dest
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let tmp = tempfile::Builder::new()
                    .prefix(".isula-download-")
                    .tempfile_in(dir)
                    .with_context(|| format!("creating a file in {}", dir.display()))?;
                current = Some((chunk.path.clone(), dest, tmp, sha2::Sha256::new()));
            }
            let Some((_, dest, tmp, hash)) = current.as_mut() else {
                continue;
            };
            hash.update(&chunk.data);
            tmp.write_all(&chunk.data)
                .with_context(|| format!("writing {}", dest.display()))?;
            if chunk.done {
                let Some((_, dest, tmp, hash)) = current.take() else {
                    continue;
                };
                let got = hex::encode(hash.finalize());
                if got != chunk.sha256 {
                    bail!(
                        "{} arrived with SHA-256 {got}, not the {} the daemon sent",
                        dest.display(),
                        chunk.sha256
                    );
                }
                use std::os::unix::fs::PermissionsExt;
                let mode = if chunk.mode == 0 {
                    0o644
                } else {
                    chunk.mode & 0o777
                };
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("writing {}", dest.display()))?;
                tmp.as_file()
                    .sync_all()
                    .with_context(|| format!("writing {}", dest.display()))?;
                tmp.persist_noclobber(&dest)
                    .map_err(|e| anyhow::anyhow!("writing {}: {}", dest.display(), e.error))?;
            }
        }
        if let Some((rel, ..)) = current {
            bail!("the output {rel:?} ended early");
        }
        Ok(())
    }
}

/// The daemon's public key, which seals passwords, proxy build args and secrets: from the
/// daemon itself when it is remote, else from its file on this machine.
pub async fn public_key(client: &mut Client) -> Result<isula_api::secret::PublicKey> {
    if !is_remote() {
        return super::login::public_key();
    }
    let pem = client
        .public_key(())
        .await
        .map_err(|s| anyhow::anyhow!("asking the daemon for its public key: {}", s.message()))?
        .into_inner()
        .pem;
    isula_api::secret::PublicKey::from_pem(&pem).context("the daemon's public key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_land_only_where_the_command_asked() {
        let mut o = Outputs::default();
        let f = o.file(Path::new("/home/u/out.tar"));
        let d = o.dir(Path::new("/home/u/Images"));
        assert!(f.starts_with(PREFIX) && f.ends_with("/f0/out.tar"));
        assert!(d.ends_with("/d1"));
        assert_eq!(
            o.local_for("f0/out.tar").expect("file"),
            PathBuf::from("/home/u/out.tar")
        );
        assert_eq!(
            o.local_for("d1/app.tar.gz").expect("in dir"),
            PathBuf::from("/home/u/Images/app.tar.gz")
        );
        for bad in ["f0/other", "d1/../x", "d1/a//b", "x", "d1", "f0"] {
            assert!(o.local_for(bad).is_err(), "{bad}");
        }
        assert_eq!(o.explain(&format!("{f} exists")), "/home/u/out.tar exists");
    }
}
