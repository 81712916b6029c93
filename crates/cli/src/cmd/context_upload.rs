//! Sending a build context to a remote daemon (SyncContext): the context's entries with
//! their stat, less what `.dockerignore` excludes; the daemon asks for the files that
//! differ from this client's last context there, which go in chunks with their SHA-256.
//! A file that changes while it is sent fails the sync (the daemon keeps nothing of it).

use super::Client;
use anyhow::{bail, Context as _, Result};
use isula_api::v1::{ContextChunk, ContextEntry, ContextUpload};
use sha2::Digest as _;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Entries per message of the list.
const BATCH: usize = 2000;
/// Bytes per chunk of a large file.
const CHUNK: usize = 1 << 20;
/// Content bytes per message, about: small files go many to a message (one message and one
/// round of the daemon's work per file made the first sync of many small files slow).
const MESSAGE_BYTES: usize = 1 << 20;
/// Files per message, at most (empty files cost the daemon a file each, and no bytes).
const MESSAGE_FILES: usize = 1024;

/// What a sync sent.
pub struct Synced {
    pub id: String,
    pub files: usize,
    pub sent_files: usize,
    pub sent_bytes: u64,
}

/// The key of a context: its absolute path on this host (BuildKit's shared key).
fn key(context: &Path) -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    hex::encode(sha2::Sha256::digest(
        format!("{host}\0{}", context.display()).as_bytes(),
    ))
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec()
}

/// Every entry of the context, parents first, names sorted; files `.dockerignore`
/// excludes are left out (directories stay: the daemon applies the file again).
fn list(context: &Path, reach: &super::context_reach::Reach) -> Result<Vec<ContextEntry>> {
    let ignore = match std::fs::read_to_string(context.join(".dockerignore")) {
        Ok(t) => Some(
            isula_dockerfile::ignore::Matcher::parse(&t)
                .map_err(|e| anyhow::anyhow!("{}: {e}", context.join(".dockerignore").display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading .dockerignore"),
    };
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            context.to_path_buf()
        } else {
            context.join(&rel)
        };
        let mut names: Vec<String> = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                bail!("{}: a name that is not UTF-8", e.path().display());
            };
            names.push(name);
        }
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let (wanted, walk) = reach.wants(&path);
            if !wanted {
                continue;
            }
            let full = context.join(&path);
            let m = std::fs::symlink_metadata(&full)
                .with_context(|| format!("reading {}", full.display()))?;
            let is_dir = m.is_dir();
            if !is_dir
                && path != ".dockerignore"
                && ignore.as_ref().is_some_and(|i| i.excluded(&path))
            {
                continue;
            }
            let link_target = if m.file_type().is_symlink() {
                std::fs::read_link(&full)
                    .with_context(|| format!("reading {}", full.display()))?
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            };
            out.push(ContextEntry {
                path: path.clone(),
                mode: m.mode(),
                size: if m.is_file() { m.len() as i64 } else { 0 },
                mtime_ns: mtime_ns(&m),
                link_target,
            });
            if is_dir && walk {
                subdirs.push(path);
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

/// Sends the files `need` of `context` (with the size and mtime they were listed with), in
/// the order asked: many small files to a message (up to [`MESSAGE_BYTES`] of content), a
/// large one in chunks of [`CHUNK`]; each file's last chunk carries its SHA-256. Returns
/// the bytes sent.
fn send_files(
    context: &Path,
    need: &[String],
    listed: &std::collections::HashMap<String, (i64, i64)>,
    tx: &tokio::sync::mpsc::Sender<ContextUpload>,
) -> Result<u64> {
    let mut sent_bytes = 0u64;
    let mut batch = Batch::default();
    for path in need {
        let (size, mtime) = *listed.get(path).ok_or_else(|| {
            anyhow::anyhow!("the daemon asked for {path:?}, which was not listed")
        })?;
        let full = context.join(path);
        let mut f =
            std::fs::File::open(&full).with_context(|| format!("opening {}", full.display()))?;
        let changed = || {
            anyhow::anyhow!(
                "{} changed while the build context was sent",
                full.display()
            )
        };
        let same = |m: &std::fs::Metadata| m.len() as i64 == size && mtime_ns(m) == mtime;
        if !same(&f.metadata()?) {
            return Err(changed());
        }
        let mut h = sha2::Sha256::new();
        let mut read = 0i64;
        loop {
            // The file's next chunk: up to CHUNK bytes, all of a small file, read in full
            // (one byte past the listed size tells a file that grew).
            let want = ((size - read).max(0) as usize).min(CHUNK);
            let mut data = vec![0u8; want + usize::from(want < CHUNK)];
            let mut n = 0;
            while n < data.len() {
                let got = f
                    .read(&mut data[n..])
                    .with_context(|| format!("reading {}", full.display()))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n != want {
                // Longer or shorter than listed.
                return Err(changed());
            }
            data.truncate(n);
            h.update(&data);
            read += n as i64;
            sent_bytes += n as u64;
            let last = read >= size;
            let mut chunk = ContextChunk {
                path: path.clone(),
                data,
                ..Default::default()
            };
            if last {
                if !same(&f.metadata()?) {
                    return Err(changed());
                }
                chunk.done = true;
                chunk.sha256 = hex::encode(std::mem::take(&mut h).finalize());
            }
            if !batch.push(chunk, tx) {
                // The daemon ended the call: its reply says why.
                return Ok(sent_bytes);
            }
            if last {
                break;
            }
        }
    }
    batch.flush(tx);
    Ok(sent_bytes)
}

/// Chunks gathered into one message.
#[derive(Default)]
struct Batch {
    chunks: Vec<ContextChunk>,
    bytes: usize,
}

impl Batch {
    /// Adds `chunk`, sending the message once it holds enough; false if the daemon ended
    /// the call.
    fn push(&mut self, chunk: ContextChunk, tx: &tokio::sync::mpsc::Sender<ContextUpload>) -> bool {
        self.bytes += chunk.data.len() + chunk.path.len() + 80;
        self.chunks.push(chunk);
        if self.bytes >= MESSAGE_BYTES || self.chunks.len() >= MESSAGE_FILES {
            return self.flush(tx);
        }
        true
    }

    fn flush(&mut self, tx: &tokio::sync::mpsc::Sender<ContextUpload>) -> bool {
        if self.chunks.is_empty() {
            return true;
        }
        self.bytes = 0;
        let m = ContextUpload {
            chunks: std::mem::take(&mut self.chunks),
            ..Default::default()
        };
        tx.blocking_send(m).is_ok()
    }
}

/// Sends `context` (absolute) to the daemon; returns the context's ID there.
pub async fn sync(
    client: &mut Client,
    context: &Path,
    reach: &super::context_reach::Reach,
) -> Result<Synced> {
    let mut entries = list(context, reach)?;
    if let super::context_reach::Reach::Paths(paths) = reach {
        // A reached path through a symbolic link would need the link's target too.
        let linked = entries.iter().any(|e| {
            e.mode & 0o170000 == 0o120000
                && paths
                    .iter()
                    .any(|p| *p == e.path || p.starts_with(&format!("{}/", e.path)))
        });
        if linked {
            entries = list(context, &super::context_reach::Reach::All)?;
        }
    }
    let files = entries
        .iter()
        .filter(|e| e.mode & 0o170000 == 0o100000)
        .count();
    let (tx, rx) = tokio::sync::mpsc::channel::<ContextUpload>(8);
    let mut replies = client
        .sync_context(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("sending the build context")?
        .into_inner();
    let k = key(context);
    let batches: Vec<&[ContextEntry]> = if entries.is_empty() {
        vec![&[]]
    } else {
        entries.chunks(BATCH).collect()
    };
    let n = batches.len();
    for (i, b) in batches.into_iter().enumerate() {
        let m = ContextUpload {
            key: k.clone(),
            entries: b.to_vec(),
            listed: i + 1 == n,
            ..Default::default()
        };
        if tx.send(m).await.is_err() {
            break;
        }
    }
    let gone = |e: tonic::Status| anyhow::anyhow!("sending the build context: {}", e.message());
    let mut need = Vec::new();
    loop {
        let Some(r) = replies.message().await.map_err(gone)? else {
            bail!("sending the build context: the daemon ended the call");
        };
        need.extend(r.need);
        if r.need_listed {
            break;
        }
    }
    // The files are read on a blocking thread, a few chunks ahead of the connection.
    let reader = {
        let tx = tx.clone();
        let need = need.clone();
        let context = context.to_path_buf();
        let sizes: std::collections::HashMap<String, (i64, i64)> = entries
            .iter()
            .map(|e| (e.path.clone(), (e.size, e.mtime_ns)))
            .collect();
        tokio::task::spawn_blocking(move || send_files(&context, &need, &sizes, &tx))
    };
    drop(tx);
    // Awaited, never joined: the connection must go on sending what the thread reads.
    let sent_bytes = match reader.await {
        Ok(r) => r?,
        Err(_) => bail!("reading the build context stopped unexpectedly"),
    };
    loop {
        let Some(r) = replies.message().await.map_err(gone)? else {
            bail!(
                "sending the build context: the daemon ended the call without naming the context"
            );
        };
        if !r.context_id.is_empty() {
            return Ok(Synced {
                id: r.context_id,
                files,
                sent_files: need.len(),
                sent_bytes,
            });
        }
    }
}
