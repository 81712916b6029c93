//! Image signatures as containers/image defines them, without network or store: the
//! `policy.json` requirements and their evaluation (`policy`), where signatures live
//! (`registries_d`), the signed payloads (`payload`), OpenPGP simple signing (`gpg`) and
//! sigstore (cosign) keys and signatures (`sigstore`). The registry client fetches and
//! stores the bytes; this crate only says whether they are good, or makes them. The CLI
//! links it for signing, so it must never depend on the store.

pub mod gpg;
pub mod payload;
pub mod policy;
pub mod registries_d;
pub mod sigstore;

pub use policy::{Policy, Requirement};
pub use registries_d::RegistriesD;

/// The largest signature (or sigstore payload) read from anywhere, as containers/image's
/// limit for signature bodies.
pub const SIGNATURE_MAX: u64 = 4 << 20;
/// The most signatures read for one image from lookaside storage or attachments.
pub const SIGNATURES_MAX: usize = 128;
/// The largest key file or passphrase file read.
pub const KEY_FILE_MAX: u64 = 1 << 20;

/// What kind of failure a [`TrustError`] is, for the daemon's mapping to gRPC codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustErrorKind {
    InvalidArgument,
    FailedPrecondition,
    PermissionDenied,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `policy.json` is malformed or names something unsupported.
    #[error("{file}: {reason}")]
    Policy { file: String, reason: String },
    /// A `registries.d` file is malformed.
    #[error("{file}: {reason}")]
    RegistriesD { file: String, reason: String },
    /// A key the policy names cannot be used (missing, unreadable, not a key).
    #[error("policy.json requirement {requirement}: key {key}: {reason}")]
    Key {
        requirement: &'static str,
        key: String,
        reason: String,
    },
    /// The policy refuses the image: no signature, or none that verifies and matches.
    #[error("image {image} refused: policy.json requirement {requirement}: {reason}")]
    Refused {
        image: String,
        requirement: String,
        reason: String,
    },
    /// A signing key or its passphrase is unusable.
    #[error("{what}: {reason}")]
    SigningKey { what: String, reason: String },
    /// A signature or payload is malformed (when storing or making one).
    #[error("signature: {0}")]
    Signature(String),
}

impl TrustError {
    pub fn kind(&self) -> TrustErrorKind {
        match self {
            TrustError::Policy { .. } | TrustError::RegistriesD { .. } => {
                TrustErrorKind::FailedPrecondition
            }
            TrustError::Key { .. } => TrustErrorKind::FailedPrecondition,
            TrustError::Refused { .. } => TrustErrorKind::PermissionDenied,
            TrustError::SigningKey { .. } | TrustError::Signature(_) => {
                TrustErrorKind::InvalidArgument
            }
        }
    }
}

/// Reads at most `max` bytes of `path`, refusing a larger file (named in the error).
pub fn read_capped(path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 > max {
        return Err(format!("larger than the limit of {max} bytes"));
    }
    Ok(out)
}
