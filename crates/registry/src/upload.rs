//! How big uploads (layer blobs) are sent: through an async reqwest client on a runtime of
//! their own, the body handed to the connection in the pieces it comes in (1 MiB read from
//! a file, or each piece a compressor makes). The blocking client hands its connection
//! 8 KiB at a time, each a round of thread wake-ups between the caller and reqwest's
//! runtime: about half a CPU second per 236 MB layer, on a machine where a push right after
//! a build also compresses and the registry hashes. What to send and what the answers mean
//! stay in `push`; auth and errors are the [`Client`]'s.

use crate::client::{Client, Req};
use crate::error::{RegistryError, Result};
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

/// How much of a file one piece of its upload holds.
const FILE_PIECE: usize = 1 << 20;
/// Pieces waiting for the connection, per upload (each up to 1 MiB: two keep the
/// connection fed, and the daemon's peak within its 64 MB while it pushes).
const QUEUED: usize = 2;
/// How much of an answer's body is kept (the registry's error message).
const ANSWER_MAX: usize = 4096;

static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The runtime the upload client's connections live on: a thread per core, at most four
/// (its work is moving pieces into sockets, and encrypting them for TLS).
pub(crate) fn runtime() -> std::result::Result<&'static tokio::runtime::Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 4);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("registry-upload")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the upload runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The body of an upload: the pieces a producer sends, in order; `size`, when known, is
/// checked by the connection (fewer or more bytes fail the request).
pub struct Pieces {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    size: Option<u64>,
}

/// The producing end of [`Pieces`].
#[derive(Clone)]
pub struct PieceSender {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    count: Arc<AtomicU64>,
}

/// A body of `size` bytes (None: unknown) and its sender, which counts what it sends into
/// `count`.
pub fn pieces(size: Option<u64>, count: Arc<AtomicU64>) -> (PieceSender, Pieces) {
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUED);
    (PieceSender { tx, count }, Pieces { rx, size })
}

impl PieceSender {
    /// Sends `piece` once the connection has room for it (call it from a thread that is
    /// no runtime's). False when the request is gone: nothing more is wanted.
    pub fn send(&self, piece: Bytes) -> bool {
        let n = piece.len() as u64;
        let sent = self.tx.blocking_send(Ok(piece)).is_ok();
        if sent {
            self.count.fetch_add(n, Ordering::Relaxed);
        }
        sent
    }

    /// Fails the request with `e` (a read error of the source).
    pub fn fail(&self, e: io::Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|p| p.map(|r| r.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.size {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

/// The file at `path` (`size` bytes) as an upload body, read 1 MiB at a time on a thread
/// of its own, which stops when the request goes away.
pub fn file_body(path: &std::path::Path, size: u64, count: &Arc<AtomicU64>) -> Result<Pieces> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| RegistryError::Config(format!("open {}: {e}", path.display())))?;
    count.store(0, Ordering::Relaxed);
    let (tx, body) = pieces(Some(size), count.clone());
    std::thread::Builder::new()
        .name("upload-read".into())
        .spawn(move || loop {
            // Pooled pieces: each goes back to the pool once the connection has sent it.
            let mut piece = isula_sys::memory::take_piece(FILE_PIECE);
            match (&mut f).take(FILE_PIECE as u64).read_to_end(&mut piece) {
                Ok(0) => return,
                Ok(_) => {
                    let piece = isula_sys::memory::Piece::from_vec(piece);
                    if !tx.send(Bytes::from_owner(piece)) {
                        return;
                    }
                }
                Err(e) => return tx.fail(e),
            }
        })
        .map_err(|e| {
            RegistryError::Config(format!("starting a reader for {}: {e}", path.display()))
        })?;
    Ok(body)
}

/// What an upload request got back: the status, the headers, the URL that answered
/// (Locations are relative to it) and the start of the body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub url: reqwest::Url,
    pub body: String,
}

impl Client {
    /// Sends `req` once with the body `body` makes (`content_type`, `headers` beside it),
    /// allowing `timeout` for the whole request. A 401 is answered (a token fetched) and
    /// the request made again with a body made anew; `body` fails when it cannot make one
    /// (a stream already consumed). Returns any other answer; the caller judges it.
    pub fn send_upload(
        &self,
        req: &Req<'_>,
        headers: &[(HeaderName, String)],
        timeout: Duration,
        body: &dyn Fn() -> Result<Pieces>,
    ) -> Result<Answer> {
        let url = self.url(&req.url)?;
        let http = self.upload_http()?;
        let rt = runtime().map_err(|e| self.http_error(&req.what, e))?;
        for attempt in 0..2 {
            let mut rb = http
                .request(req.method.clone(), &url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .timeout(timeout);
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            if let Some(a) = self.authorization_for(&url, req.scopes) {
                rb = rb.header(AUTHORIZATION, a);
            }
            let rb = rb.body(reqwest::Body::wrap(body()?));
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                let _ = tx.send(answer(rb).await);
            });
            let got = rx
                .recv()
                .map_err(|_| self.http_error(&req.what, "the upload stopped"))?
                .map_err(|e| self.http_error(&req.what, self.describe(&e)))?;
            if got.status != StatusCode::UNAUTHORIZED {
                return Ok(got);
            }
            if attempt == 0 {
                self.answer_challenge(&got.headers, req)?;
            }
        }
        Err(RegistryError::Unauthorized {
            registry: self.host().to_string(),
            what: req.what.clone(),
        })
    }
}

async fn answer(rb: reqwest::RequestBuilder) -> std::result::Result<Answer, reqwest::Error> {
    let mut resp = rb.send().await?;
    let (status, headers, url) = (resp.status(), resp.headers().clone(), resp.url().clone());
    let mut body = Vec::new();
    while body.len() < ANSWER_MAX {
        match resp.chunk().await? {
            Some(c) => body.extend_from_slice(&c[..c.len().min(ANSWER_MAX - body.len())]),
            None => break,
        }
    }
    Ok(Answer {
        status,
        headers,
        url,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_body_holds_the_file_in_big_pieces() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        let data: Vec<u8> = (0..(FILE_PIECE * 2 + 77))
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).expect("write");
        let count = Arc::new(AtomicU64::new(9));
        let mut body = file_body(f.path(), data.len() as u64, &count).expect("body");
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(Ok(p)) = body.rx.blocking_recv() {
            sizes.push(p.len());
            got.extend_from_slice(&p);
        }
        assert_eq!(got, data);
        assert_eq!(sizes, vec![FILE_PIECE, FILE_PIECE, 77]);
        assert_eq!(count.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(data.len() as u64)
        );
        // A missing file is an error naming it.
        let gone = f.path().with_extension("gone");
        let e = file_body(&gone, 1, &count).err().expect("missing file");
        assert!(e.to_string().contains(&gone.display().to_string()), "{e}");
    }
}
