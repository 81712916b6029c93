//! The client on the other end of the socket (SO_PEERCRED), and opening the paths it names
//! with its rights: root clients get the daemon's own access; anyone else (a member of the
//! socket's group) has every open, create and link done under their own uid and groups, so
//! the daemon never reads or writes a file for a client that could not have done so itself.

use isula_sys::{with_credentials, Credentials, PendingFile, SysError};
use isula_transport::{AsDaemon, ClientFiles};
use std::fs::File;
use std::io;
use std::path::Path;
use tonic::transport::server::UdsConnectInfo;
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
        flatten(with_credentials(&self.0, || File::open(path)))
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

/// How the files of this request's client are to be opened.
pub fn files<T>(req: &Request<T>) -> Result<Box<dyn ClientFiles>, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied("cannot identify the client (no peer credentials)")
        })?;
    let creds = Credentials::of_peer(cred.pid(), cred.uid(), cred.gid());
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
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .is_some_and(|c| c.uid() == 0)
}
