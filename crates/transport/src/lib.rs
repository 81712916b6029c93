//! Moving images in and out of the store: `import` of a rootfs tarball, `load` of a
//! docker-archive or oci-archive, `save` to either. Each format is one module. Everything
//! streams: archives are read once, layers are hashed while they are written, and no layer
//! or archive is ever held in memory.

pub mod archive;
pub mod docker_archive;
pub mod docker_daemon;
pub mod import;
pub mod isulad;
pub mod load;
pub mod migrate;
pub mod oci_archive;
pub mod progress;
pub mod save;
pub mod separated;

use isula_store::StoreError;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where an archive is written. A sink that is a file may take a stored blob's bytes
/// straight from the blob's file ([`ArchiveSink::copy_from`]); any other copies them
/// through memory.
pub trait ArchiveSink: io::Write {
    /// Appends `len` bytes of `src` from `offset`, everything written before first. Returns
    /// false, having written nothing, when this sink cannot (the caller copies).
    fn copy_from(&mut self, src: &File, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (src, offset, len);
        Ok(false)
    }
}

impl<S: ArchiveSink + ?Sized> ArchiveSink for &mut S {
    fn copy_from(&mut self, src: &File, offset: u64, len: u64) -> io::Result<bool> {
        (**self).copy_from(src, offset, len)
    }
}

impl<W: io::Write> ArchiveSink for io::BufWriter<W> {}
impl<W: io::Write> ArchiveSink for flate2::write::GzEncoder<W> {}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadArchive { path: PathBuf, reason: String },
    #[error("{} is {size} bytes, over the limit of {limit} bytes", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: file exists", .0.display())]
    Exists(PathBuf),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("operation cancelled")]
    Cancelled,
}

impl TransportError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        if is_cancelled(&source) {
            return TransportError::Cancelled;
        }
        TransportError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn bad(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        TransportError::BadArchive {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn kind(&self) -> isula_store::ErrorKind {
        use isula_store::ErrorKind as K;
        match self {
            TransportError::Store(e) => e.kind(),
            TransportError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                K::NotFound
            }
            TransportError::Io { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                K::FailedPrecondition
            }
            TransportError::Io { .. } => K::Internal,
            TransportError::BadArchive { .. } | TransportError::Invalid(_) => K::InvalidArgument,
            TransportError::TooLarge { .. } => K::ResourceExhausted,
            TransportError::Exists(_) => K::AlreadyExists,
            TransportError::Cancelled => K::Unavailable,
        }
    }
}

pub type Result<T> = std::result::Result<T, TransportError>;

/// How files named by the client are opened and created. The daemon runs as root but must
/// not be a confused deputy: for a client that is not root it does this with the client's
/// own rights. [`AsDaemon`] is the direct form (root clients, tests).
pub trait ClientFiles: Send + Sync {
    /// Opens a regular file for reading (anything else is refused at once: `open_regular`).
    fn open(&self, path: &Path) -> io::Result<File>;
    fn exists(&self, path: &Path) -> bool;
    /// Writes (replacing) a small file, such as an --iidfile.
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Creates the directory `path` (its parent must exist; `path` must not), mode 0700.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    fn create_pending(
        &self,
        dir: &Path,
    ) -> std::result::Result<isula_sys::PendingFile, isula_sys::SysError>;
    fn persist(
        &self,
        file: isula_sys::PendingFile,
        dest: &Path,
    ) -> std::result::Result<(), isula_sys::SysError>;
}

/// Opens client paths with the daemon's own rights.
pub struct AsDaemon;

/// Opens a client's input file: a regular file only. The open never blocks (a FIFO, a
/// device or a socket is refused at once, before anything is read) and follows no magic
/// link; the handle then reads as usual.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    let kind = f.metadata()?.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}: a regular file is needed", path.display()),
        ));
    }
    let flags = rustix::fs::fcntl_getfl(&f)?;
    rustix::fs::fcntl_setfl(&f, flags - OFlags::NONBLOCK)?;
    Ok(f)
}

impl ClientFiles for AsDaemon {
    fn open(&self, path: &Path) -> io::Result<File> {
        open_regular(path)
    }
    fn exists(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        std::fs::write(path, data)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(path)
    }
    fn create_pending(
        &self,
        dir: &Path,
    ) -> std::result::Result<isula_sys::PendingFile, isula_sys::SysError> {
        isula_sys::PendingFile::new_in(dir)
    }
    fn persist(
        &self,
        file: isula_sys::PendingFile,
        dest: &Path,
    ) -> std::result::Result<(), isula_sys::SysError> {
        file.persist_noreplace(dest)
    }
}

/// Lines for the client, each ending in a newline.
pub type Progress<'a> = &'a mut dyn FnMut(String);

/// The error a cancelled operation's readers fail with. Not `ErrorKind::Interrupted`: std's
/// copy loops retry on that, forever.
#[derive(Debug, thiserror::Error)]
#[error("operation cancelled")]
pub struct CancelledError;

/// Whether an I/O error (possibly wrapped by a decompressor or tar) is a cancellation.
pub fn is_cancelled(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(err) = cur {
        if err.is::<CancelledError>() {
            return true;
        }
        if let Some(inner) = err.downcast_ref::<io::Error>() {
            if is_cancelled(inner) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Set when the client goes away: every reader and writer of the operation then fails.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A cancel that sets (and is set by) an existing flag, such as a build's.
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        Cancel(flag)
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn check(&self) -> io::Result<()> {
        if self.is_cancelled() {
            Err(io::Error::other(CancelledError))
        } else {
            Ok(())
        }
    }
}

/// A reader that stops with an error once cancelled, or after `limit` bytes.
pub struct Guarded<R> {
    pub inner: R,
    pub cancel: Cancel,
    pub remaining: u64,
}

impl<R: Read> Read for Guarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancel.check()?;
        if self.remaining == 0 {
            // One more byte would be over the limit: probe for it.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    "input is over the size limit",
                )),
            };
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The standard progress lines around copying an image's blobs.
pub(crate) fn copy_lines(
    progress: Progress<'_>,
    blobs: &[isula_types::Digest],
    config: &isula_types::Digest,
) {
    progress("Getting image source signatures\n".into());
    for b in blobs {
        progress(format!("Copying blob {b}\n"));
    }
    progress(format!("Copying config {config}\n"));
    progress("Writing manifest to image destination\n".into());
    progress("Storing signatures\n".into());
}
