//! `-o docker-daemon:IMAGE:TAG`: streams a docker-archive of the image to the Docker Engine
//! API (`POST /images/load` on its unix socket) as it is written, with chunked transfer
//! encoding: no temporary file, no whole archive in memory.

use crate::save::SaveItem;
use crate::{docker_archive, Cancel, Result, TransportError};
use isula_store::Store;
use isula_types::Reference;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The Docker socket: `DOCKER_HOST=unix://...` if set, else the default.
pub fn socket() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// HTTP/1.1 chunked encoding over a writer.
struct Chunked<W: Write>(W);

impl<W: Write> crate::ArchiveSink for Chunked<W> {}

impl<W: Write> Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn engine_err(socket: &Path, e: impl std::fmt::Display) -> TransportError {
    TransportError::Invalid(format!("docker daemon at {}: {e}", socket.display()))
}

/// Loads the store image `id` into the Docker daemon as `name`.
pub fn load_into_docker(
    store: &Store,
    id: &isula_types::ImageId,
    name: &Reference,
    socket_path: &Path,
    cancel: &Cancel,
) -> Result<String> {
    let image = store.image(id)?;
    let stream = UnixStream::connect(socket_path).map_err(|e| {
        engine_err(
            socket_path,
            format!("cannot connect ({e}): is dockerd running?"),
        )
    })?;
    let mut w = std::io::BufWriter::with_capacity(
        1 << 20,
        stream.try_clone().map_err(|e| engine_err(socket_path, e))?,
    );
    write!(
        w,
        "POST /images/load?quiet=1 HTTP/1.1\r\nHost: docker\r\nUser-Agent: isula-build\r\nContent-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .map_err(|e| engine_err(socket_path, e))?;
    let items = [SaveItem {
        image,
        tags: vec![name.clone()],
    }];
    let chunked = docker_archive::write(store, &items, Chunked(w), cancel)?;
    let mut w = chunked.0;
    w.write_all(b"0\r\n\r\n")
        .map_err(|e| engine_err(socket_path, e))?;
    w.flush().map_err(|e| engine_err(socket_path, e))?;
    // The reply: a status line, headers, and a small JSON body.
    let mut r = BufReader::new(stream);
    let mut status = String::new();
    r.read_line(&mut status)
        .map_err(|e| engine_err(socket_path, e))?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut chunked_body = false;
    let mut length: Option<usize> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)
            .map_err(|e| engine_err(socket_path, e))?
            == 0
            || h == "\r\n"
        {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked_body = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
    let mut body = Vec::new();
    if chunked_body {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)
                .map_err(|e| engine_err(socket_path, e))?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n.min(1 << 20)];
            r.read_exact(&mut chunk)
                .map_err(|e| engine_err(socket_path, e))?;
            body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)
                .map_err(|e| engine_err(socket_path, e))?;
        }
    } else if let Some(n) = length {
        let mut b = vec![0u8; n.min(1 << 20)];
        r.read_exact(&mut b)
            .map_err(|e| engine_err(socket_path, e))?;
        body = b;
    }
    let text = String::from_utf8_lossy(&body).to_string();
    if code != 200 || text.contains("\"error\"") {
        return Err(engine_err(
            socket_path,
            format!("load failed (HTTP {code}): {}", text.trim()),
        ));
    }
    Ok(text)
}
