//! The registry client's error type. Every variant names the registry, and where it applies
//! the repository and blob, so a failed pull or push says what it was talking to.

use isula_store::{ErrorKind, StoreError};
use isula_transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{registry}: {what}: {reason}")]
    Http {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{registry}: {what}: authentication required (run `isula-build login {registry}`)")]
    Unauthorized { registry: String, what: String },
    #[error("{registry}: {what}: not found")]
    NotFound { registry: String, what: String },
    #[error("{registry}: {what}: {reason}")]
    BadContent {
        registry: String,
        what: String,
        reason: String,
    },
    /// Well-formed content this builder does not handle (schema 1, artifacts, encrypted
    /// layers): named by its media type.
    #[error("{registry}: {what}: {reason}")]
    Unsupported {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{name}: no registry could provide it: {errors}")]
    AllSourcesFailed {
        name: String,
        /// Every source said it did not have it.
        missing: bool,
        errors: String,
    },
    #[error("registry {0} is blocked in registries.toml")]
    Blocked(String),
    #[error("policy.json rejects {0}")]
    Rejected(String),
    /// supply chain: policy.json refused the image (signatures), or a key it names is
    /// unusable.
    #[error(transparent)]
    Trust(#[from] isula_trust::TrustError),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0}")]
    Config(String),
    #[error("operation cancelled")]
    Cancelled,
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::Store(e) => e.kind(),
            RegistryError::Transport(e) => e.kind(),
            RegistryError::Http { .. } => ErrorKind::Unavailable,
            RegistryError::Unauthorized { .. } => ErrorKind::FailedPrecondition,
            RegistryError::NotFound { .. } => ErrorKind::NotFound,
            RegistryError::AllSourcesFailed { missing: true, .. } => ErrorKind::NotFound,
            RegistryError::AllSourcesFailed { .. } => ErrorKind::Unavailable,
            RegistryError::BadContent { .. } => ErrorKind::DataLoss,
            RegistryError::Unsupported { .. } => ErrorKind::FailedPrecondition,
            RegistryError::Blocked(_) | RegistryError::Rejected(_) => ErrorKind::FailedPrecondition,
            RegistryError::Trust(e) => match e.kind() {
                isula_trust::TrustErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                _ => ErrorKind::FailedPrecondition,
            },
            RegistryError::Invalid(_) => ErrorKind::InvalidArgument,
            RegistryError::Config(_) => ErrorKind::FailedPrecondition,
            RegistryError::Cancelled => ErrorKind::Unavailable,
        }
    }
}

pub type Result<T> = std::result::Result<T, RegistryError>;
