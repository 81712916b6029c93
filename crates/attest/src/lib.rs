//! Attestations of a built image: what is in it (an SPDX 2.3 document of the packages its
//! own package databases list, and of the files no package owns) and how it was made (a
//! SLSA v1 provenance), each wrapped in an in-toto statement and carried in BuildKit's
//! layout (an attestation manifest beside the image manifest in an image index).
//!
//! This crate is pure: it reads a rootfs the caller has mounted read-only, and builds JSON
//! documents. It does not touch the store, the network or the registry; the builder asks
//! it "attest that", the registry and transport crates lay its statements out.
//!
//! Package databases are read with bounded memory: dpkg and apk databases line by line,
//! an rpm database one header at a time (sqlite rows, Berkeley DB hash pages, ndb blobs).

pub mod apk;
pub mod dpkg;
pub mod intoto;
pub mod rpm;
pub mod scan;
pub mod slsa;
pub mod spdx;

use std::path::{Path, PathBuf};

/// The in-toto predicate type of an SPDX document.
pub const SPDX_PREDICATE: &str = "https://spdx.dev/Document";
/// The in-toto predicate type of a SLSA v1 provenance.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";

/// The largest predicate a statement may carry (BuildKit's cap on an attestation file).
pub const PREDICATE_MAX: u64 = 40 << 20;

/// The most paths the package databases of one image may say they own (a large Fedora
/// install owns about half a million): past it the SBOM is refused, not grown without
/// bound by a database an image made up.
pub const OWNED_MAX: usize = 1 << 22;
/// The longest path a package database may name (Linux's PATH_MAX).
pub const OWNED_PATH_MAX: usize = 4096;

/// Records that a package owns `path`, within [`OWNED_MAX`] and [`OWNED_PATH_MAX`].
pub(crate) fn own(
    owned: &mut std::collections::HashSet<String>,
    path: String,
) -> std::result::Result<(), String> {
    if path.len() > OWNED_PATH_MAX {
        return Err(format!(
            "a file path of {} bytes, over the limit of {OWNED_PATH_MAX}",
            path.len()
        ));
    }
    if owned.len() >= OWNED_MAX && !owned.contains(&path) {
        return Err(format!(
            "packages own more than {OWNED_MAX} files, the limit"
        ));
    }
    owned.insert(path);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A package database that does not parse.
    #[error("package database {path}: {reason}")]
    BadDatabase { path: PathBuf, reason: String },
    /// An attestation (statement, manifest) that does not parse.
    #[error("attestation: {0}")]
    BadAttestation(String),
}

impl AttestError {
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> AttestError {
        AttestError::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn bad_db(path: impl AsRef<Path>, reason: impl Into<String>) -> AttestError {
        AttestError::BadDatabase {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = AttestError> = std::result::Result<T, E>;

/// Which package manager a package is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ecosystem {
    Deb,
    Rpm,
    Apk,
}

impl Ecosystem {
    /// The purl type.
    pub fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Rpm => "rpm",
            Ecosystem::Apk => "apk",
        }
    }
}

/// One installed package, as its database lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Package {
    pub name: String,
    /// As the package tool prints it: dpkg's `Version`, rpm's `[EPOCH:]VERSION-RELEASE`,
    /// apk's `V:`.
    pub version: String,
    pub arch: String,
    /// The license the database gives (rpm `LICENSE`, apk `L:`; dpkg keeps none).
    pub license: Option<String>,
    /// The source package (dpkg `Source`, rpm `SOURCERPM`, apk `o:`).
    pub source: Option<String>,
    /// dpkg `Maintainer`, rpm `VENDOR`, apk `m:`.
    pub supplier: Option<String>,
    /// rpm only: the epoch, for the purl's qualifier.
    pub epoch: Option<u32>,
}

/// Percent-encodes `s` for a purl component: unreserved characters, and those the purl
/// spec leaves as they are in a version (`:` `+`), stay.
pub fn purl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'+') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Package {
    /// The package URL: `pkg:deb/debian/NAME@VERSION?arch=ARCH`, `pkg:rpm/...`, `pkg:apk/...`
    /// (`namespace`: the distribution, `/etc/os-release`'s `ID`).
    pub fn purl(&self, eco: Ecosystem, namespace: Option<&str>) -> String {
        let mut s = format!("pkg:{}/", eco.purl_type());
        if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
            s.push_str(&purl_escape(&ns.to_ascii_lowercase()));
            s.push('/');
        }
        s.push_str(&purl_escape(&self.name));
        // rpm's epoch goes in a qualifier, the version without it.
        let version = match (eco, self.epoch) {
            (Ecosystem::Rpm, Some(_)) => self
                .version
                .split_once(':')
                .map(|(_, v)| v)
                .unwrap_or(&self.version),
            _ => &self.version,
        };
        if !version.is_empty() {
            s.push('@');
            s.push_str(&purl_escape(version));
        }
        let mut q: Vec<String> = Vec::new();
        if !self.arch.is_empty() {
            q.push(format!("arch={}", purl_escape(&self.arch)));
        }
        if let (Ecosystem::Rpm, Some(e)) = (eco, self.epoch) {
            q.push(format!("epoch={e}"));
        }
        if let Some(src) = self.source.as_deref().filter(|s| !s.is_empty()) {
            if eco != Ecosystem::Rpm {
                q.push(format!("upstream={}", purl_escape(src)));
            }
        }
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q.join("&"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls() {
        let p = Package {
            name: "libc6".into(),
            version: "2.36-9+deb12u4".into(),
            arch: "amd64".into(),
            ..Default::default()
        };
        assert_eq!(
            p.purl(Ecosystem::Deb, Some("debian")),
            "pkg:deb/debian/libc6@2.36-9+deb12u4?arch=amd64"
        );
        let r = Package {
            name: "bash".into(),
            version: "1:5.1-2.oe2203".into(),
            arch: "x86_64".into(),
            epoch: Some(1),
            ..Default::default()
        };
        assert_eq!(
            r.purl(Ecosystem::Rpm, Some("openEuler")),
            "pkg:rpm/openeuler/bash@5.1-2.oe2203?arch=x86_64&epoch=1"
        );
        let a = Package {
            name: "musl".into(),
            version: "1.2.4-r2".into(),
            arch: "x86_64".into(),
            source: Some("musl".into()),
            ..Default::default()
        };
        assert_eq!(
            a.purl(Ecosystem::Apk, Some("alpine")),
            "pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64&upstream=musl"
        );
        assert_eq!(purl_escape("a b/c"), "a%20b%2Fc");
    }
}
