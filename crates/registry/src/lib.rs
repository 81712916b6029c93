//! Registry configuration: `registries.toml` (both the v1 tables and the v2
//! `[[registry]]` form of containers-registries.conf) and `policy.json` (the
//! containers-policy.json shape). Parsing and validation only; the distribution client
//! that uses them is built on top of this crate.

pub mod policy;
pub mod registries;

pub use policy::Policy;
pub use registries::Registries;

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
