//! `ADD http(s)://...`: one file downloaded with the daemon's HTTP stack, as a registry
//! transfer is (system roots plus `certs.d/<host[:port]>/`, `HTTPS_PROXY`/`NO_PROXY`,
//! retries with backoff on connection errors, 429 and 5xx, the stall timeout), streamed to
//! disk and hashed as it is written, up to a size cap. No credentials are sent. Errors name
//! the URL without its query (which may hold a token).

use crate::client::describe;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// What a download gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// sha256 of the bytes, lower-case hex.
    pub sha256: String,
    pub size: u64,
    /// `Last-Modified`, in seconds since the epoch.
    pub last_modified: Option<i64>,
}

/// How a download is made.
pub struct Fetch<'a> {
    pub certs_dir: &'a Path,
    pub stall: Duration,
    /// The most bytes accepted.
    pub max_bytes: u64,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

const ATTEMPTS: u32 = 3;

/// The URL as errors show it: no query, no user info.
pub fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => url.split('?').next().unwrap_or_default().to_string(),
    }
}

fn client(url: &reqwest::Url, f: &Fetch<'_>) -> Result<reqwest::blocking::Client, String> {
    let mut b = reqwest::blocking::Client::builder()
        .user_agent(concat!("isula-build/", env!("CARGO_PKG_VERSION")))
        .timeout(f.stall)
        .connect_timeout(Duration::from_secs(30).min(f.stall))
        .tcp_user_timeout(f.stall)
        .redirect(reqwest::redirect::Policy::limited(10));
    if let Some(host) = url.host_str() {
        let dir = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        b = crate::client::read_certs_dir(&f.certs_dir.join(dir), b).map_err(|e| e.to_string())?;
    }
    b.build().map_err(|e| e.to_string())
}

/// Downloads `url` into the new file `dest`.
pub fn download(url: &str, dest: &Path, f: &Fetch<'_>) -> Result<Downloaded, String> {
    let name = shown(url);
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{name}: invalid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{name}: only http and https URLs can be downloaded"
        ));
    }
    let http = client(&parsed, f).map_err(|e| format!("{name}: {e}"))?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if (f.cancelled)() {
            return Err("cancelled".into());
        }
        match once(&http, &parsed, dest, f) {
            Ok(d) => return Ok(d),
            Err((retry, e)) if retry && attempt < ATTEMPTS => {
                tracing::info!(url = %name, attempt, error = %e, "ADD download failed; trying again");
                let _ = std::fs::remove_file(dest);
                // The registry client's backoff (cancellation is checked before each try).
                crate::client::backoff(attempt, None);
            }
            Err((_, e)) => {
                let _ = std::fs::remove_file(dest);
                return Err(format!("{name}: {e}"));
            }
        }
    }
}

/// One attempt; the error says whether another may succeed.
fn once(
    http: &reqwest::blocking::Client,
    url: &reqwest::Url,
    dest: &Path,
    f: &Fetch<'_>,
) -> Result<Downloaded, (bool, String)> {
    let resp = http.get(url.clone()).send().map_err(|e| {
        let too_many = e.is_redirect();
        let mut s = describe(&e);
        if too_many {
            s = "too many redirects (a redirect loop?)".into();
        } else if e.is_timeout() {
            s.push_str(&format!(" (no progress for {}s)", f.stall.as_secs()));
        }
        (
            !too_many && (e.is_connect() || e.is_timeout() || e.is_request()),
            s,
        )
    })?;
    let status = resp.status();
    if !status.is_success() {
        let retry = status.is_server_error() || status.as_u16() == 429;
        return Err((retry, format!("HTTP {status}")));
    }
    if let Some(len) = resp.content_length() {
        if len > f.max_bytes {
            return Err((
                false,
                format!(
                    "it is {len} bytes, over the limit of {} (max_layer_size)",
                    f.max_bytes
                ),
            ));
        }
    }
    let last_modified = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| chrono::DateTime::parse_from_rfc2822(v.trim()).ok())
        .map(|t| t.timestamp());
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| (false, format!("{}: {e}", dest.display())))?;
    let mut body = resp;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut size = 0u64;
    loop {
        if (f.cancelled)() {
            return Err((false, "cancelled".into()));
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err((true, broken(&e, f.stall))),
        };
        size += n as u64;
        if size > f.max_bytes {
            return Err((
                false,
                format!(
                    "it is over the limit of {} bytes (max_layer_size)",
                    f.max_bytes
                ),
            ));
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| (false, format!("{}: {e}", dest.display())))?;
    }
    out.sync_all()
        .map_err(|e| (false, format!("{}: {e}", dest.display())))?;
    Ok(Downloaded {
        sha256: hex::encode(sha2::Digest::finalize(hasher)),
        size,
        last_modified,
    })
}

/// Why a body read failed: a stall (nothing for the stall timeout) or a broken transfer.
fn broken(e: &std::io::Error, stall: Duration) -> String {
    let mut inner: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
    while let Some(i) = inner {
        if let Some(r) = i.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                break;
            }
            return format!("the transfer broke: {}", describe(r));
        }
        inner = i.source();
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return "the server closed the connection before the end of the body".into();
    }
    format!(
        "the server sent nothing for {}s (stalled), or the transfer broke: {e}",
        stall.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn shown_urls_lose_their_secrets() {
        assert_eq!(
            shown("https://user:pw@example.com/a/b.tar?token=s3cret#frag"),
            "https://example.com/a/b.tar#frag"
        );
        assert_eq!(shown("not a url?x=1"), "not a url");
    }
}
