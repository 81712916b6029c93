//! A small HTTP/1.1 file server on 127.0.0.1 for `ADD http://` and git (dumb HTTP) tests:
//! files of a directory with a fixed `Last-Modified`, plus misbehaving routes:
//! `/redirect-loop`, `/stall` (a body that stops after a few bytes and is held until the
//! client hangs up), `/huge` (a `Content-Length` of 1 TiB), `/endless` (a body with no
//! length that never ends). Every request path is recorded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `Last-Modified` of every file served: 2023-11-14 22:13:20 UTC.
pub const LAST_MODIFIED: i64 = 1_700_000_000;
const LAST_MODIFIED_TEXT: &str = "Tue, 14 Nov 2023 22:13:20 GMT";

pub struct HttpFiles {
    pub port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl HttpFiles {
    /// Serves `dir` until the process ends.
    pub fn serve(dir: &Path) -> HttpFiles {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (root, seen) = (dir.to_path_buf(), hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (root, seen) = (root.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = answer(conn, &root, &seen);
                });
            }
        });
        HttpFiles { port, hits }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// The paths requested so far.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn answer(conn: TcpStream, root: &Path, hits: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let path = target.split('?').next().unwrap_or("/").to_string();
    hits.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.clone());
    let mut out = conn;
    match path.as_str() {
        "/redirect-loop" => write!(
            out,
            "HTTP/1.1 302 Found\r\nLocation: /redirect-loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        "/stall" => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\nsome bytes")?;
            out.flush()?;
            // Held, sending nothing, until the client gives up.
            let mut sink = [0u8; 64];
            let mut r = out.try_clone()?;
            while r.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
            Ok(())
        }
        "/huge" => write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\nConnection: close\r\n\r\n"
        ),
        "/endless" => {
            write!(out, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            let chunk = vec![b'x'; 64 * 1024];
            loop {
                out.write_all(&chunk)?;
            }
        }
        p => {
            let file: PathBuf = root.join(p.trim_start_matches('/'));
            match std::fs::read(&file) {
                Ok(body) if file.starts_with(root) => {
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: {LAST_MODIFIED_TEXT}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )?;
                    out.write_all(&body)
                }
                _ => write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
            }
        }
    }
}
