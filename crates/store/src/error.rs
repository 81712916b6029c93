//! The store's one error type. Every variant names what it was about; `kind()` is what the
//! daemon maps to a gRPC code.

use isula_types::{ChainId, DiffId, Digest};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    DataLoss,
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] isula_sys::SysError),
    #[error("blob {0} not found")]
    BlobNotFound(Digest),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("layer {0} not found")]
    LayerNotFound(ChainId),
    #[error("no such image: {0}")]
    ImageNotFound(String),
    #[error("image name {name:?} is ambiguous: matches {count} images")]
    AmbiguousImage { name: String, count: usize },
    #[error("image {image} is in use: {reason}")]
    ImageInUse { image: String, reason: String },
    #[error("layer entry {entry:?}: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },
    #[error("layer is not a valid tar archive: {0}")]
    BadTar(String),
    #[error("layer diff ID mismatch: config says {expected}, layer is {actual}")]
    DiffIdMismatch { expected: DiffId, actual: DiffId },
    #[error("metadata {}: {reason}", path.display())]
    CorruptMetadata { path: PathBuf, reason: String },
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("{0}")]
    NoSpace(String),
    #[error("operation cancelled")]
    Cancelled,
    #[error("layer entry {entry:?} is owned by {which} {id}, which this rootless daemon's user namespace cannot map (it maps {which}s {mapped}): give the user a subordinate range of at least {needed} ids in /etc/sub{which} (usermod --add-sub{which}s START-END USER) and restart the daemon")]
    UnmappedOwner {
        entry: String,
        which: &'static str,
        id: u32,
        mapped: String,
        needed: u64,
    },
}

impl StoreError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        use StoreError::*;
        match self {
            Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Io { source, .. } if source.raw_os_error() == Some(28) => ErrorKind::ResourceExhausted,
            Io { .. } | Sys(_) => ErrorKind::Internal,
            BlobNotFound(_) | LayerNotFound(_) | ImageNotFound(_) => ErrorKind::NotFound,
            DigestMismatch { .. } | SizeMismatch { .. } | DiffIdMismatch { .. } => {
                ErrorKind::DataLoss
            }
            AmbiguousImage { .. } | UnsafeEntry { .. } | BadTar(_) => ErrorKind::InvalidArgument,
            ImageInUse { .. } | UnmappedOwner { .. } => ErrorKind::FailedPrecondition,
            CorruptMetadata { .. } => ErrorKind::DataLoss,
            TooLarge { .. } | NoSpace(_) => ErrorKind::ResourceExhausted,
            Cancelled => ErrorKind::Unavailable,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
