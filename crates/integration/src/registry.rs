//! A real Distribution registry (Debian's `docker-registry`) for the tests, on 127.0.0.1
//! with a fresh storage directory, optionally with htpasswd auth, TLS from a CA made by the
//! test, or `auth: token` backed by [`TokenIssuer`]. Plus [`FaultProxy`], a tiny HTTP proxy
//! in front of a registry that corrupts blobs or kills the registry mid-transfer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it (openssl).
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A self-signed certificate (and its key) for `subject`.
fn self_signed(key: impl AsRef<Path>, cert: impl AsRef<Path>, subject: &str) {
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
        ])
        .arg("-keyout")
        .arg(key.as_ref())
        .arg("-out")
        .arg(cert.as_ref()));
}

/// A key and a certificate for `subject` signed by the CA in `dir`, with `ext` extensions.
fn signed_cert(dir: &Path, name: &str, subject: &str, ext: &str) -> (PathBuf, PathBuf) {
    let p = |n: String| dir.join(n);
    let (key, csr, cert, extfile) = (
        p(format!("{name}.key")),
        p(format!("{name}.csr")),
        p(format!("{name}.cert")),
        p(format!("{name}-ext.cnf")),
    );
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    std::fs::write(&extfile, format!("{ext}\n")).expect("ext");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-extfile")
        .arg(&extfile)
        .arg("-out")
        .arg(&cert));
    (cert, key)
}

pub fn make_certs(dir: &Path) -> Certs {
    self_signed(dir.join("ca.key"), dir.join("ca.crt"), "/CN=isula-test-ca");
    let (cert, key) = signed_cert(
        dir,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    );
    // A client certificate for registries that require one.
    let (client_cert, client_key) = signed_cert(
        dir,
        "client",
        "/CN=isula-test-client",
        "extendedKeyUsage=clientAuth",
    );
    Certs {
        ca: dir.join("ca.crt"),
        cert,
        key,
        client_cert,
        client_key,
    }
}

#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// Basic auth through an htpasswd file with this user.
    pub htpasswd: Option<(String, String)>,
    pub tls: bool,
    /// With `tls`: require a client certificate signed by the test CA.
    pub client_certs: bool,
    /// `auth: token` with this issuer.
    pub token: Option<(String, PathBuf)>,
}

pub struct Registry {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    pub certs: Option<Certs>,
    pid: Arc<AtomicI32>,
}

impl Registry {
    pub fn start(opts: RegistryOptions) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("isula-registry-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let certs = opts.tls.then(|| make_certs(dir.path()));
        if let Some(c) = &certs {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.cert.display(),
                c.key.display()
            ));
            if opts.client_certs {
                config.push_str(&format!("    clientcas:\n      - {}\n", c.ca.display()));
            }
        }
        if let Some((user, pass)) = &opts.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, &out.stdout).expect("htpasswd file");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: isula-test\n    path: {}\n",
                f.display()
            ));
        }
        if let Some((realm, cert)) = &opts.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: isula-test-registry\n    issuer: isula-test-issuer\n    rootcertbundle: {}\n",
                cert.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("config");
        let mut r = Registry {
            dir,
            child: None,
            port,
            certs,
            pid: Arc::new(AtomicI32::new(0)),
        };
        r.restart();
        r
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Requests the registry served whose method and URI match (from its access log).
    pub fn count_requests(&self, method: &str, uri_part: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(uri_part))
            .count()
    }

    pub fn pid_handle(&self) -> Arc<AtomicI32> {
        self.pid.clone()
    }

    pub fn restart(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        self.pid.store(child.id() as i32, Ordering::SeqCst);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_head(s: &mut BufReader<TcpStream>) -> Option<(String, Vec<String>)> {
    let mut line = String::new();
    if s.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let request = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if s.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end().to_string();
        if h.is_empty() {
            break;
        }
        headers.push(h);
    }
    Some((request, headers))
}

fn header<'a>(headers: &'a [String], name: &str) -> Option<&'a str> {
    headers.iter().find_map(|h| {
        let (k, v) = h.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A token server for the registry's `auth: token` mode: it checks HTTP basic credentials
/// and issues RS256 JWTs (with the signing certificate in `x5c`) granting the scopes asked.
pub struct TokenIssuer {
    pub port: u16,
    pub cert: PathBuf,
    pub issued: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenIssuer {
    pub fn start(user: &str, pass: &str) -> TokenIssuer {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_pem = dir.path().join("token.key");
        let cert = dir.path().join("token.crt");
        self_signed(&key_pem, &cert, "/CN=isula-test-issuer");
        let pem_body = |p: &Path| -> Vec<u8> {
            use base64::Engine as _;
            let text = std::fs::read_to_string(p).expect("pem");
            let b: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .expect("pem base64")
        };
        let key =
            aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&pem_body(&key_pem)).expect("pkcs8 key");
        let cert_der = pem_body(&cert);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (iss, refd) = (issued.clone(), refused.clone());
        let want = format!("{user}:{pass}");
        let key = Arc::new(key);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let key = key.clone();
                let (iss, refd, want, cert_der) =
                    (iss.clone(), refd.clone(), want.clone(), cert_der.clone());
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().expect("clone");
                    let mut r = BufReader::new(conn);
                    let Some((req, headers)) = read_head(&mut r) else {
                        return;
                    };
                    let target = req.split(' ').nth(1).unwrap_or_default().to_string();
                    let query = target.split_once('?').map(|x| x.1).unwrap_or_default();
                    let mut scopes = Vec::new();
                    for kv in query.split('&') {
                        if let Some(v) = kv.strip_prefix("scope=") {
                            scopes.push(percent_decode(v));
                        }
                    }
                    let user = header(&headers, "authorization")
                        .and_then(|a| a.strip_prefix("Basic "))
                        .and_then(|b| {
                            use base64::Engine as _;
                            base64::engine::general_purpose::STANDARD.decode(b).ok()
                        })
                        .map(|b| String::from_utf8_lossy(&b).to_string());
                    let ok = user.as_deref() == Some(want.as_str());
                    if !ok {
                        refd.fetch_add(1, Ordering::SeqCst);
                        let _ = w.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        return;
                    }
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let access: Vec<serde_json::Value> = scopes.iter().filter_map(|s| {
                        let mut p = s.splitn(3, ':');
                        let (t, n, a) = (p.next()?, p.next()?, p.next()?);
                        Some(serde_json::json!({"type": t, "name": n, "actions": a.split(',').collect::<Vec<_>>()}))
                    }).collect();
                    let x5c = {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.encode(&cert_der)
                    };
                    let header_json =
                        serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
                    let claims = serde_json::json!({"iss": "isula-test-issuer", "sub": "tester", "aud": "isula-test-registry", "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{}", rand_id()), "access": access});
                    let signing = format!(
                        "{}.{}",
                        b64url(header_json.to_string().as_bytes()),
                        b64url(claims.to_string().as_bytes())
                    );
                    let mut sig = vec![0u8; key.public_modulus_len()];
                    key.sign(
                        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                        &aws_lc_rs::rand::SystemRandom::new(),
                        signing.as_bytes(),
                        &mut sig,
                    )
                    .expect("sign");
                    let token = format!("{signing}.{}", b64url(&sig));
                    iss.fetch_add(1, Ordering::SeqCst);
                    let body = serde_json::json!({"token": token, "expires_in": 600}).to_string();
                    let _ = w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes());
                });
            }
        });
        TokenIssuer {
            port,
            cert,
            issued,
            refused,
            _dir: dir,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

fn rand_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (std::process::id() as u64).rotate_left(32)
}

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything untouched.
    None,
    /// Flip a byte in every blob a GET returns.
    CorruptBlobs,
    /// Kill the registry half-way through the first blob GET.
    KillDuringBlobGet,
    /// Kill the registry half-way through the first blob upload (PUT or PATCH).
    KillDuringUpload,
    /// Answer blob GETs with a redirect to `http://127.0.0.2:PORT/blob/<hex>` (another host).
    RedirectBlobs(u16),
    /// Refuse uploads in a single PUT with 405 (registries that want PATCH).
    RefuseMonolithic,
    /// Answer this many requests with 503 (then pass everything).
    ServerErrors(u32),
    /// Pass this many blob GETs, then answer every later one with 503.
    FailBlobGetsAfter(u32),
    /// Reset (RST) the connection half-way through this many blob uploads, then pass.
    ResetUploads(u32),
    /// Stop reading half-way through this many blob uploads, holding the connection open
    /// until the client gives up (a registry that hangs), then pass.
    StallUploads(u32),
    /// Send half of this many blob GET answers, then hang (as above), then pass.
    StallBlobGets(u32),
    /// Refuse manifest PUTs that list zstd layers with 400 MANIFEST_INVALID, as a
    /// registry that knows no zstd does.
    RefuseZstdManifests,
}

/// Holds a stalled connection, reading nothing, until the client closes its end (or ten
/// minutes pass): a registry that hangs. Waits in poll(2) for the hang-up, not in a timer.
fn hold_until_client_leaves(client: &TcpStream) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let cap = Timespec {
        tv_sec: 600,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::new(client, PollFlags::RDHUP)];
    let _ = poll(&mut fds, Some(&cap));
}

/// Takes one use of a counted fault: true when this request gets it.
fn take_one(fault: &Mutex<Fault>, which: fn(Fault) -> Option<u32>, make: fn(u32) -> Fault) -> bool {
    let Ok(mut f) = fault.lock() else {
        return false;
    };
    match which(*f) {
        Some(n) if n > 0 => {
            *f = if n > 1 { make(n - 1) } else { Fault::None };
            true
        }
        _ => false,
    }
}

/// Passes a request body from `from` to `to`: `len` bytes, or a chunked body as it is
/// (its framing included), stopping after `limit` bytes of data when given.
fn forward_body(
    from: &mut BufReader<TcpStream>,
    to: &mut dyn Write,
    len: u64,
    chunked: bool,
    limit: Option<u64>,
) -> std::io::Result<()> {
    if !chunked {
        let n = limit.map_or(len, |l| l.min(len));
        std::io::copy(&mut from.take(n), to)?;
        return Ok(());
    }
    let mut passed = 0u64;
    loop {
        let mut line = String::new();
        if from.read_line(&mut line)? == 0 {
            return Ok(());
        }
        to.write_all(line.as_bytes())?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk line {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut t = String::new();
                if from.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    to.write_all(t.as_bytes())?;
                    return Ok(());
                }
                to.write_all(t.as_bytes())?;
            }
        }
        let take = limit.map_or(size, |l| size.min(l.saturating_sub(passed)));
        std::io::copy(&mut from.take(take), to)?;
        passed += take;
        if take < size {
            return Ok(());
        }
        let mut crlf = [0u8; 2];
        from.read_exact(&mut crlf)?;
        to.write_all(&crlf)?;
    }
}

/// A one-request-per-connection HTTP proxy in front of a registry.
pub struct FaultProxy {
    pub port: u16,
    pub fault: Arc<Mutex<Fault>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, registry_pid: Arc<AtomicI32>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let f = fault.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let f = f.clone();
                let pid = registry_pid.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, upstream, &f, &pid);
                });
            }
        });
        FaultProxy { port, fault }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault") = fault;
    }
}

fn kill_registry(pid: &AtomicI32) {
    let p = pid.load(Ordering::SeqCst);
    if let Some(p) = rustix::process::Pid::from_raw(p) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

fn proxy_one(
    client: TcpStream,
    upstream: u16,
    fault: &Mutex<Fault>,
    pid: &AtomicI32,
) -> std::io::Result<()> {
    let mut cw = client.try_clone()?;
    let mut cr = BufReader::new(client);
    let Some((req, headers)) = read_head(&mut cr) else {
        return Ok(());
    };
    let mut parts = req.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let len: u64 = header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // A streamed body (a push that sends a gzip as it is made) comes in chunks.
    let chunked =
        header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = format!("{req}\r\n");
    for h in headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("connection:"))
    {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    let current = *fault.lock().map_err(|_| std::io::Error::other("lock"))?;
    if let Fault::ServerErrors(n) = current {
        if let Ok(mut f) = fault.lock() {
            *f = if n > 1 {
                Fault::ServerErrors(n - 1)
            } else {
                Fault::None
            };
        }
        forward_body(&mut cr, &mut std::io::sink(), len, chunked, None)?;
        cw.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    if let (Fault::FailBlobGetsAfter(n), true) =
        (current, method == "GET" && path.contains("/blobs/sha256:"))
    {
        if n > 0 {
            if let Ok(mut f) = fault.lock() {
                *f = Fault::FailBlobGetsAfter(n - 1);
            }
        } else {
            cw.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
    }
    if let (Fault::RedirectBlobs(port), true) =
        (current, method == "GET" && path.contains("/blobs/sha256:"))
    {
        let hex = path.rsplit("sha256:").next().unwrap_or_default();
        cw.write_all(
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:{port}/blob/{hex}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        return Ok(());
    }
    let upload = (method == "PUT" || method == "PATCH")
        && path.contains("/blobs/uploads/")
        && (len > 0 || chunked);
    // Where a broken upload breaks: half of a sized body, 64 KiB into a streamed one.
    let part = |of: u64| if chunked { 64 << 10 } else { len / of };
    if upload && method == "PUT" && current == Fault::RefuseMonolithic {
        forward_body(&mut cr, &mut std::io::sink(), len, chunked, None)?;
        cw.write_all(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    if upload
        && take_one(
            fault,
            |f| match f {
                Fault::ResetUploads(n) => Some(n),
                _ => None,
            },
            Fault::ResetUploads,
        )
    {
        forward_body(&mut cr, &mut up, len, chunked, Some(part(2)))?;
        // A zero linger time makes close send RST instead of FIN.
        rustix::net::sockopt::set_socket_linger(&cw, Some(std::time::Duration::ZERO))?;
        return Ok(());
    }
    if upload
        && take_one(
            fault,
            |f| match f {
                Fault::StallUploads(n) => Some(n),
                _ => None,
            },
            Fault::StallUploads,
        )
    {
        forward_body(&mut cr, &mut up, len, chunked, Some(part(4)))?;
        hold_until_client_leaves(&cw);
        return Ok(());
    }
    if current == Fault::RefuseZstdManifests
        && method == "PUT"
        && path.contains("/manifests/")
        && !chunked
    {
        let mut body = Vec::new();
        forward_body(&mut cr, &mut body, len, false, None)?;
        if String::from_utf8_lossy(&body).contains("tar+zstd") {
            let answer = r#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid","detail":"unknown layer media type"}]}"#;
            cw.write_all(
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .as_bytes(),
            )?;
            return Ok(());
        }
        up.write_all(&body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        cw.write_all(&resp)?;
        return Ok(());
    }
    if upload && current == Fault::KillDuringUpload {
        forward_body(&mut cr, &mut up, len, chunked, Some(part(2)))?;
        kill_registry(pid);
        if let Ok(mut f) = fault.lock() {
            *f = Fault::None;
        }
        return Ok(()); // both connections close
    }
    forward_body(&mut cr, &mut up, len, chunked, None)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let blob_get = method == "GET" && path.contains("/blobs/sha256:");
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    if blob_get
        && body_at < resp.len()
        && take_one(
            fault,
            |f| match f {
                Fault::StallBlobGets(n) => Some(n),
                _ => None,
            },
            Fault::StallBlobGets,
        )
    {
        let half = body_at + (resp.len() - body_at) / 2;
        cw.write_all(&resp[..half])?;
        cw.flush()?;
        hold_until_client_leaves(&cw);
        return Ok(());
    }
    if blob_get && body_at < resp.len() {
        match current {
            Fault::CorruptBlobs => {
                let i = body_at + (resp.len() - body_at) / 2;
                resp[i] ^= 0xff;
            }
            Fault::KillDuringBlobGet => {
                let half = body_at + (resp.len() - body_at) / 2;
                cw.write_all(&resp[..half])?;
                cw.flush()?;
                kill_registry(pid);
                if let Ok(mut f) = fault.lock() {
                    *f = Fault::None;
                }
                return Ok(());
            }
            _ => {}
        }
    }
    cw.write_all(&resp)?;
    Ok(())
}
