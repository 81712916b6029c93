//! The registry side of isula-build: configuration (`registries.toml`, `policy.json`),
//! stored credentials (`auth.json`), and our own distribution client (Docker Registry HTTP
//! API v2 / OCI distribution) for pull, push, login and manifest lists.

pub mod attestations;
pub mod auth;
pub mod cache;
pub mod client;
pub mod error;
pub mod http_source;
pub mod manifest_list;
pub mod policy;
pub mod pull;
pub mod push;
pub mod registries;
pub mod resolve;
pub mod signatures;
pub mod upload;

pub use auth::{AuthFile, Credentials};
pub use client::{Client, Endpoint};
pub use error::{RegistryError, Result};
pub use policy::Policy;
pub use registries::Registries;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

impl ConfigError {
    pub(crate) fn invalid(file: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_string(),
            reason: reason.into(),
        }
    }
}

/// What every registry operation needs from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct Context {
    pub registries: Registries,
    pub policy: Option<Policy>,
    /// supply chain: `registries.d/*.yaml`, where signatures are read and written.
    pub registries_d: isula_trust::RegistriesD,
    /// `certs.d`: per-host `ca.crt` and client `*.cert`/`*.key`.
    pub certs_dir: PathBuf,
    pub auth: AuthFile,
    /// How long a transfer may make no progress before it fails (`client::STALL_TIMEOUT`
    /// unless configured).
    pub stall_timeout: std::time::Duration,
}

impl Context {
    /// A client for `endpoint` with the credentials stored for it, if any.
    pub fn client(&self, endpoint: Endpoint) -> Result<Client> {
        let creds = self.auth.get(&endpoint.host)?;
        Client::new(endpoint, creds, &self.certs_dir, self.stall_timeout)
    }

    /// A client for `server` with the given credentials (for login).
    pub fn client_with(&self, server: &str, creds: Option<Credentials>) -> Result<Client> {
        let r = isula_types::Reference::parse(&format!("{server}/x"))
            .map_err(|e| RegistryError::Invalid(format!("registry server {server:?}: {e}")))?;
        let endpoint = resolve::push_endpoint(&self.registries, &r)?;
        Client::new(endpoint, creds, &self.certs_dir, self.stall_timeout)
    }
}
