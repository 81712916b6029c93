//! The client on the other end of the socket (SO_PEERCRED), and opening the paths it names
//! with its rights: root clients get the daemon's own access; anyone else (a member of the
//! socket's group) has every open, create and link done under their own uid and groups, so
//! the daemon never reads or writes a file for a client that could not have done so itself.

use isula_sys::{with_credentials, Credentials, PendingFile, SysError};
use isula_transport::{AsDaemon, ClientFiles};
use std::fs::File;
use std::io;
use std::path::Path;
use tonic::{Request, Status};

pub struct AsPeer(Credentials);

fn flatten<T>(r: io::Result<io::Result<T>>) -> io::Result<T> {
    r.and_then(|x| x)
}

fn flatten_sys<T>(path: &Path, r: io::Result<Result<T, SysError>>) -> Result<T, SysError> {
    r.map_err(|e| SysError::io("switch to the client's identity for", path, e))
        .and_then(|x| x)
}

impl ClientFiles for AsPeer {
    fn open(&self, path: &Path) -> io::Result<File> {
        flatten(with_credentials(&self.0, || {
            isula_transport::open_regular(path)
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        with_credentials(&self.0, || std::fs::symlink_metadata(path).is_ok()).unwrap_or(false)
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        flatten(with_credentials(&self.0, || std::fs::write(path, data)))
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        flatten(with_credentials(&self.0, || AsDaemon.create_dir(path)))
    }
    fn create_pending(&self, dir: &Path) -> Result<PendingFile, SysError> {
        flatten_sys(dir, with_credentials(&self.0, || PendingFile::new_in(dir)))
    }
    fn persist(&self, file: PendingFile, dest: &Path) -> Result<(), SysError> {
        flatten_sys(
            dest,
            with_credentials(&self.0, move || file.persist_noreplace(dest)),
        )
    }
}

/// Who is at the other end of a connection, as the kernel recorded it at connect time
/// (SO_PEERCRED and SO_PEERGROUPS), kept with the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// An accepted connection and its peer.
pub struct PeerStream {
    inner: tokio::net::UnixStream,
    info: Option<PeerInfo>,
}

impl PeerStream {
    pub fn new(inner: tokio::net::UnixStream) -> PeerStream {
        use std::os::fd::AsFd;
        let info = match (inner.peer_cred(), isula_sys::peer_groups(inner.as_fd())) {
            (Ok(c), Ok(groups)) => Some(PeerInfo {
                uid: c.uid(),
                gid: c.gid(),
                groups,
            }),
            (c, g) => {
                tracing::warn!(cred = ?c.err(), groups = ?g.err(), "cannot identify a client");
                None
            }
        };
        PeerStream { inner, info }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Option<PeerInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Who sent a request, by the connection it came on.
pub enum Caller {
    /// The unix socket (its peer credentials, if the kernel gave them, are the request's).
    Local,
    /// A TCP client with a certificate: its common name (an error when it has none).
    Remote(Result<String, Status>),
    /// A TCP client without TLS (an `--insecure-tcp` loopback listener).
    InsecureTcp,
}

pub fn caller<T>(req: &Request<T>) -> Caller {
    if req.extensions().get::<Option<PeerInfo>>().is_some() {
        return Caller::Local;
    }
    match req.peer_certs() {
        Some(certs) => Caller::Remote(
            certs
                .first()
                .ok_or_else(|| Status::unauthenticated("no client certificate"))
                .and_then(|c| common_name(c.as_ref())),
        ),
        None => Caller::InsecureTcp,
    }
}

/// Who the caller is, for what the daemon keeps per client (synced contexts): the
/// certificate's common name over TCP, the uid on the socket.
pub fn owner<T>(req: &Request<T>) -> String {
    match caller(req) {
        Caller::Local => format!("uid:{}", peer(req).map_or(u32::MAX, |p| p.uid)),
        Caller::Remote(Ok(cn)) => format!("cn:{cn}"),
        Caller::Remote(Err(_)) => "cn:".into(),
        Caller::InsecureTcp => "tcp".into(),
    }
}

/// Whether the request came over TCP.
pub fn is_remote<T>(req: &Request<T>) -> bool {
    !matches!(caller(req), Caller::Local)
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Result<String, Status> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.ok_or_else(|| Status::unauthenticated("the client certificate has no common name"))
}

fn peer<T>(req: &Request<T>) -> Option<&PeerInfo> {
    req.extensions()
        .get::<Option<PeerInfo>>()
        .and_then(|p| p.as_ref())
}

/// How the files of this request's client are to be opened.
pub fn files<T>(req: &Request<T>) -> Result<Box<dyn ClientFiles>, Status> {
    if is_remote(req) {
        // A path a TCP client names is on its machine, never this one's.
        return Ok(Box::new(Refused));
    }
    local_files(req)
}

/// A TCP client's files: on its machine, never opened here.
struct Refused;

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "this names a file on the client's machine, which a daemon reached over TCP does not open",
    )
}

impl ClientFiles for Refused {
    fn open(&self, _: &Path) -> io::Result<File> {
        Err(refused())
    }
    fn exists(&self, _: &Path) -> bool {
        false
    }
    fn write_file(&self, _: &Path, _: &[u8]) -> io::Result<()> {
        Err(refused())
    }
    fn create_dir(&self, _: &Path) -> io::Result<()> {
        Err(refused())
    }
    fn create_pending(&self, dir: &Path) -> Result<PendingFile, SysError> {
        Err(SysError::io("create a file in", dir, refused()))
    }
    fn persist(&self, _: PendingFile, dest: &Path) -> Result<(), SysError> {
        Err(SysError::io("write", dest, refused()))
    }
}

/// Files of a client on the unix socket, opened with its rights.
fn local_files<T>(req: &Request<T>) -> Result<Box<dyn ClientFiles>, Status> {
    let p = peer(req).ok_or_else(|| {
        Status::permission_denied("cannot identify the client (no peer credentials)")
    })?;
    let creds = Credentials::of_socket_peer(p.uid, p.gid, p.groups.clone());
    if creds.is_root() {
        Ok(Box::new(AsDaemon))
    } else {
        tracing::debug!(
            uid = creds.uid,
            gid = creds.gid,
            "client paths opened with the client's rights"
        );
        Ok(Box::new(AsPeer(creds)))
    }
}

/// Whether the request comes from root.
pub fn is_root<T>(req: &Request<T>) -> bool {
    peer(req).is_some_and(|p| p.uid == 0)
}
