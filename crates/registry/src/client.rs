//! One registry host: a reqwest client with that host's TLS settings (system roots plus
//! `certs.d/<host>/`), its credentials, and the auth handshake (anonymous, HTTP basic, or
//! bearer tokens from the `WWW-Authenticate` challenge, cached per scope and refreshed on
//! 401). Idempotent requests are retried with backoff on connection errors, 429 and 5xx.
//! Credentials go only to this host: reqwest drops `Authorization` on a redirect to
//! another host, and token requests carry them only to the realm the registry named.
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` in the daemon's environment apply, as in dockerd.

use crate::auth::Credentials;
use crate::error::{RegistryError, Result};
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// How long a transfer may make no progress before the request fails, unless configured
/// (`registry_stall_timeout`): a read that waits this long, a send whose data the registry
/// leaves unacknowledged or unread (TCP_USER_TIMEOUT covers a zero window too), or an answer
/// that does not come.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts for an idempotent request (the first try included).
const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// host[:port] as in references.
    pub host: String,
    /// Plain HTTP allowed and certificate errors ignored (registries.toml `insecure`).
    pub insecure: bool,
}

impl Endpoint {
    /// Where the v2 API of a reference's domain lives (`docker.io` → its registry host).
    pub fn api_host(&self) -> &str {
        if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

pub struct Client {
    http: Http,
    /// The client of big uploads, made when the first one starts (see [`crate::upload`]).
    uploads: std::sync::OnceLock<std::result::Result<reqwest::Client, String>>,
    /// This host's TLS files, for that client.
    tls: TlsFiles,
    /// See [`STALL_TIMEOUT`].
    stall: Duration,
    endpoint: Endpoint,
    creds: Option<Credentials>,
    /// `https` or, for an insecure registry that does not speak TLS, `http`.
    scheme: Mutex<Option<&'static str>>,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<String, String>>,
}

/// Options every request may carry.
pub struct Req<'a> {
    pub method: Method,
    /// Path and query after the host (`/v2/...`), or an absolute URL on the same host.
    pub url: String,
    /// Token scopes (`repository:x:pull`).
    pub scopes: &'a [String],
    /// Safe to send again after a failure (false for uploads with a consumed body).
    pub idempotent: bool,
    /// What the request is about, for errors (`manifest latest`, `blob sha256:...`).
    pub what: String,
}

impl<'a> Req<'a> {
    /// A request that may be sent again after a failure.
    pub fn retryable(method: Method, url: String, scopes: &'a [String], what: String) -> Self {
        Req {
            method,
            url,
            scopes,
            idempotent: true,
            what,
        }
    }

    /// A request sent once (its body is a stream that a failure consumed).
    pub fn once(method: Method, url: String, scopes: &'a [String], what: String) -> Self {
        Req {
            idempotent: false,
            ..Req::retryable(method, url, scopes, what)
        }
    }
}

/// A `WWW-Authenticate` value as a challenge we can answer (None for others or malformed).
pub fn parse_challenge(v: &str) -> Option<Challenge> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(k, val);
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
    })
}

/// The TLS files of a `certs.d/<host>/` directory: CA bundles (`*.crt`) and the client
/// identity (a `*.cert` with its `*.key`; the last one wins).
#[derive(Clone, Default)]
pub(crate) struct TlsFiles {
    pub(crate) certs: Vec<reqwest::Certificate>,
    pub(crate) identity: Option<reqwest::Identity>,
}

pub(crate) fn read_tls_files(dir: &Path) -> Result<TlsFiles> {
    let mut out = TlsFiles::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => return Ok(out),
    };
    let bad =
        |p: &Path, e: String| RegistryError::Config(format!("certificate {}: {e}", p.display()));
    let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".crt") {
            let pem = std::fs::read(&p).map_err(|e| bad(&p, e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&p, e.to_string()))?;
            out.certs.extend(certs);
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = p.with_file_name(format!("{stem}.key"));
            let mut pem = std::fs::read(&p).map_err(|e| bad(&p, e.to_string()))?;
            let k = std::fs::read(&key)
                .map_err(|e| bad(&key, format!("client key for {name}: {e}")))?;
            pem.extend_from_slice(b"\n");
            pem.extend_from_slice(&k);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| bad(&p, e.to_string()))?;
            out.identity = Some(id);
        }
    }
    Ok(out)
}

pub(crate) fn read_certs_dir(
    dir: &Path,
    mut b: reqwest::blocking::ClientBuilder,
) -> Result<reqwest::blocking::ClientBuilder> {
    let files = read_tls_files(dir)?;
    if !files.certs.is_empty() {
        b = b.tls_certs_merge(files.certs);
    }
    if let Some(id) = files.identity {
        b = b.identity(id);
    }
    Ok(b)
}

/// The settings of every registry client, blocking or async (the same methods on both
/// builders): agent, timeouts, redirects, the host's TLS files, `insecure`.
macro_rules! configure {
    ($builder:expr, $stall:expr, $tls:expr, $insecure:expr) => {{
        let mut b = $builder
            .user_agent(concat!("isula-build/", env!("CARGO_PKG_VERSION")))
            .timeout($stall)
            .connect_timeout(CONNECT_TIMEOUT.min($stall))
            .tcp_keepalive(Duration::from_secs(30).min($stall))
            .tcp_user_timeout($stall)
            .redirect(reqwest::redirect::Policy::limited(10));
        let tls: &TlsFiles = $tls;
        if !tls.certs.is_empty() {
            b = b.tls_certs_merge(tls.certs.iter().cloned());
        }
        if let Some(id) = &tls.identity {
            b = b.identity(id.clone());
        }
        if $insecure {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        b
    }};
}

impl Client {
    pub fn new(
        endpoint: Endpoint,
        creds: Option<Credentials>,
        certs_dir: &Path,
        stall: Duration,
    ) -> Result<Client> {
        let tls = read_tls_files(&certs_dir.join(&endpoint.host))?;
        let http = configure!(Http::builder(), stall, &tls, endpoint.insecure)
            .build()
            .map_err(|e| RegistryError::Http {
                registry: endpoint.host.clone(),
                what: "client".into(),
                reason: e.to_string(),
            })?;
        Ok(Client {
            http,
            uploads: std::sync::OnceLock::new(),
            tls,
            stall,
            endpoint,
            creds,
            scheme: Mutex::new(None),
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    /// The whole time an upload of `size` bytes may take: the stall timeout plus the time
    /// the bytes take at 64 KiB/s (a slow but moving upload is not a stall; a stalled one
    /// fails sooner, through TCP_USER_TIMEOUT).
    pub fn upload_timeout(&self, size: u64) -> Duration {
        self.stall + Duration::from_secs(size / (64 << 10))
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// The async client that big uploads go through, with the same settings as
    /// [`Client::http`]; it lives on [`crate::upload`]'s runtime.
    pub(crate) fn upload_http(&self) -> Result<&reqwest::Client> {
        self.uploads
            .get_or_init(|| {
                // Built inside the runtime: its connections are that runtime's.
                let _in = crate::upload::runtime()?.enter();
                configure!(
                    reqwest::Client::builder(),
                    self.stall,
                    &self.tls,
                    self.endpoint.insecure
                )
                .build()
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| self.http_error("upload client", e))
    }

    /// The `Authorization` value for `scopes` when `url` is this registry's.
    pub(crate) fn authorization_for(&self, url: &str, scopes: &[String]) -> Option<HeaderValue> {
        let ours = reqwest::Url::parse(url)
            .ok()
            .is_some_and(|u| self.is_our_host(&u));
        let a = self.authorization(scopes).filter(|_| ours)?;
        let mut v = HeaderValue::from_str(&a).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Answers a 401's challenge (`headers`) for `req`: fetches a token for its scopes, or
    /// notes that basic credentials go along. Fails when there is nothing to answer with.
    pub(crate) fn answer_challenge(
        &self,
        headers: &reqwest::header::HeaderMap,
        req: &Req<'_>,
    ) -> Result<()> {
        let unauthorized = || RegistryError::Unauthorized {
            registry: self.endpoint.host.clone(),
            what: req.what.clone(),
        };
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge)
            .ok_or_else(unauthorized)?;
        if let Challenge::Bearer { realm, service } = &challenge {
            self.fetch_token(realm, service.as_deref(), req.scopes)?;
        } else if self.creds.is_none() {
            return Err(unauthorized());
        }
        *Self::lock(&self.challenge) = Some(challenge);
        Ok(())
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`describe`], saying what a timeout or a broken body means here.
    pub fn describe(&self, e: &reqwest::Error) -> String {
        let mut s = describe(e);
        if e.is_timeout() || e.is_body() {
            s.push_str(&format!(
                " (the registry cut the connection or made no progress for {}s)",
                self.stall.as_secs()
            ));
        }
        s
    }

    /// A read or write error of a transfer: [`Client::describe`] when reqwest is under it.
    pub fn describe_io(&self, e: &std::io::Error) -> String {
        let mut inner: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
        while let Some(i) = inner {
            if let Some(r) = i.downcast_ref::<reqwest::Error>() {
                return self.describe(r);
            }
            inner = i.source();
        }
        e.to_string()
    }

    pub fn http_error(&self, what: &str, reason: impl std::fmt::Display) -> RegistryError {
        RegistryError::Http {
            registry: self.endpoint.host.clone(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    /// `https://host` (or `http://host` for an insecure registry without TLS).
    fn base(&self) -> Result<String> {
        if let Some(s) = *Self::lock(&self.scheme) {
            return Ok(format!("{s}://{}", self.endpoint.api_host()));
        }
        let https = format!("https://{}/v2/", self.endpoint.api_host());
        let http = format!("http://{}/v2/", self.endpoint.api_host());
        let mut attempt = 0;
        let scheme = loop {
            attempt += 1;
            let err = match self.http.get(&https).send() {
                Ok(_) => break "https",
                Err(e) => e,
            };
            if self.endpoint.insecure && self.http.get(&http).send().is_ok() {
                break "http";
            }
            // A TLS failure will not go away; a refused or reset connection may.
            if !err.is_connect() || attempt >= ATTEMPTS {
                return Err(self.http_error("ping", self.describe(&err)));
            }
            tracing::debug!(registry = %self.endpoint.host, error = %describe(&err), attempt, "retrying");
            backoff(attempt, None);
        };
        *Self::lock(&self.scheme) = Some(scheme);
        Ok(format!("{scheme}://{}", self.endpoint.api_host()))
    }

    /// Whether `u` is this registry (same host, same port, the scheme's default standing in
    /// for a missing one).
    fn is_our_host(&self, u: &reqwest::Url) -> bool {
        let Ok(ours) =
            reqwest::Url::parse(&format!("{}://{}/", u.scheme(), self.endpoint.api_host()))
        else {
            return false;
        };
        u.host_str() == ours.host_str() && u.port_or_known_default() == ours.port_or_known_default()
    }

    pub fn url(&self, path: &str) -> Result<String> {
        if path.starts_with("http://") || path.starts_with("https://") {
            return Ok(path.to_string());
        }
        Ok(format!("{}{path}", self.base()?))
    }

    fn authorization(&self, scopes: &[String]) -> Option<String> {
        match Self::lock(&self.challenge).clone()? {
            Challenge::Basic => self.creds.as_ref().map(Credentials::basic),
            Challenge::Bearer { .. } => Self::lock(&self.tokens)
                .get(&scopes.join(" "))
                .map(|t| format!("Bearer {t}")),
        }
    }

    /// Asks the realm for a token covering `scopes`, with the credentials if there are any.
    fn fetch_token(&self, realm: &str, service: Option<&str>, scopes: &[String]) -> Result<()> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| self.http_error("token", format!("realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        if self.creds.is_some() && url.scheme() != "https" && !self.endpoint.insecure {
            return Err(self.http_error(
                "token",
                format!("refusing to send credentials to the plain-HTTP token realm {realm}"),
            ));
        }
        let mut rb = self.http.get(url);
        if let Some(c) = &self.creds {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        let resp = rb
            .send()
            .map_err(|e| self.http_error("token", self.describe(&e)))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.endpoint.host.clone(),
                what: format!("token for {}", scopes.join(" ")),
            });
        }
        if !status.is_success() {
            return Err(self.http_error("token", format!("token server answered {status}")));
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(resp, 1 << 20), &mut raw)
            .map_err(|e| self.http_error("token", format!("token response: {e}")))?;
        let body: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| self.http_error("token", format!("token response: {e}")))?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.http_error("token", "token response has no token"))?;
        Self::lock(&self.tokens).insert(scopes.join(" "), token.to_string());
        Ok(())
    }

    /// Sends a request built by `build` (called again for every attempt), handling auth
    /// challenges and retrying what may be retried. Returns any response that is not a 401;
    /// the caller judges the status.
    pub fn send(
        &self,
        req: &Req<'_>,
        build: &dyn Fn(RequestBuilder) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let url = self.url(&req.url)?;
        let mut attempt = 0;
        let mut authed_retry = false;
        loop {
            attempt += 1;
            let mut rb = build(self.http.request(req.method.clone(), &url))?;
            // Credentials only for this registry: an upload Location on another host
            // (object storage) gets none.
            if let Some(v) = self.authorization_for(&url, req.scopes) {
                rb = rb.header(AUTHORIZATION, v);
            }
            let result = rb.send();
            let retryable = req.idempotent && attempt < ATTEMPTS;
            match result {
                Err(e) if retryable && !e.is_builder() => {
                    tracing::debug!(registry = %self.endpoint.host, what = %req.what, error = %describe(&e), attempt, "retrying");
                    backoff(attempt, None);
                }
                Err(e) => return Err(self.http_error(&req.what, self.describe(&e))),
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if authed_retry {
                        return Err(RegistryError::Unauthorized {
                            registry: self.endpoint.host.clone(),
                            what: req.what.clone(),
                        });
                    }
                    authed_retry = true;
                    self.answer_challenge(resp.headers(), req)?;
                    // A request that cannot be resent still gets this one more try: its
                    // body is rebuilt by `build`.
                    attempt -= 1;
                }
                Ok(resp)
                    if retryable
                        && (resp.status() == StatusCode::TOO_MANY_REQUESTS
                            || resp.status().is_server_error()) =>
                {
                    let after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    tracing::debug!(registry = %self.endpoint.host, what = %req.what, status = %resp.status(), attempt, "retrying");
                    backoff(attempt, after);
                }
                Ok(resp) => return Ok(resp),
            }
        }
    }

    /// Checks that the registry accepts the credentials: a `/v2/` ping, through the token
    /// flow if the registry uses one.
    pub fn check_login(&self) -> Result<()> {
        let resp = self.send(
            &Req::retryable(Method::GET, "/v2/".into(), &[], "login".into()),
            &Ok,
        )?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.http_error("login", format!("registry answered {}", resp.status())))
        }
    }

    /// Turns an unexpected status into an error naming the request, with the registry's
    /// own error message when it sent one.
    pub fn status_error(&self, what: &str, resp: Response) -> RegistryError {
        let status = resp.status();
        let host = self.endpoint.host.clone();
        if status == StatusCode::NOT_FOUND {
            return RegistryError::NotFound {
                registry: host,
                what: what.to_string(),
            };
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Unauthorized {
                registry: host,
                what: what.to_string(),
            };
        }
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::Read::take(resp, 4096), &mut body);
        self.answer_error(what, status, &body)
    }

    /// [`Client::status_error`] of an answer read already: its status and (the start of)
    /// its body.
    pub(crate) fn answer_error(&self, what: &str, status: StatusCode, body: &str) -> RegistryError {
        let host = self.endpoint.host.clone();
        if status == StatusCode::NOT_FOUND {
            return RegistryError::NotFound {
                registry: host,
                what: what.to_string(),
            };
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Unauthorized {
                registry: host,
                what: what.to_string(),
            };
        }
        let detail = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["errors"][0]["message"].as_str().map(|m| format!(": {m}")))
            .unwrap_or_default();
        self.http_error(what, format!("{ANSWERED} {status}{detail}"))
    }
}

/// How [`Client::status_error`] starts the reason of an answer it did not expect, followed
/// by the status code: a push tells a refusal (4xx) from a server error by it.
pub(crate) const ANSWERED: &str = "registry answered";

/// Waits before another try: `Retry-After` (at most 30 s), else 250 ms doubled per attempt.
pub(crate) fn backoff(attempt: u32, retry_after: Option<u64>) {
    let ms = retry_after
        .map(|s| s.min(30) * 1000)
        .unwrap_or(250u64 << attempt.min(5));
    std::thread::sleep(Duration::from_millis(ms));
}

/// A reqwest error with its causes (reqwest's own Display is only the outermost), its URL
/// without the query (an upload's state token or an object store's signature stays out of
/// errors and logs).
pub fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url().filter(|u| u.query().is_some()) {
        let mut bare = u.clone();
        bare.set_query(None);
        s = s.replace(u.as_str(), bare.as_str());
    }
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_on_the_registry_host() {
        let c = |host: &str| {
            Client::new(
                Endpoint {
                    host: host.into(),
                    insecure: false,
                },
                None,
                Path::new("/nonexistent"),
                STALL_TIMEOUT,
            )
            .expect("client")
        };
        let u = |s: &str| reqwest::Url::parse(s).expect("url");
        let r = c("r.io:5000");
        assert!(r.is_our_host(&u("http://r.io:5000/v2/x/blobs/uploads/1")));
        assert!(!r.is_our_host(&u("https://r.io/v2/")));
        assert!(!r.is_our_host(&u("https://bucket.s3.example/upload?sig=1")));
        let d = c("r.io");
        assert!(d.is_our_host(&u("https://r.io:443/v2/")));
        assert!(!d.is_our_host(&u("https://r.io:444/v2/")));
        assert!(!d.is_our_host(&u("https://r.io.evil/v2/")));
        let hub = c("docker.io");
        assert!(hub.is_our_host(&u("https://registry-1.docker.io/v2/")));
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.io/token".into(),
                service: Some("registry.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(
            parse_challenge("bearer realm=http://t/x, service=s"),
            Some(Challenge::Bearer {
                realm: "http://t/x".into(),
                service: Some("s".into())
            })
        );
    }
}
