//! `registries.d/*.yaml` (containers-registries.d(5)) beside `policy.json`: where the
//! signatures of images in a registry live. Per scope under `docker:` (the same scopes as
//! policy.json, most specific first) and `default-docker:`, each field falling back on its
//! own: `lookaside` (or `sigstore`, as older files spell it) to read, `lookaside-staging`
//! (or `sigstore-staging`) to write, and `use-sigstore-attachments`. With no lookaside
//! configured anywhere, containers/image's default directory applies.

use crate::TrustError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// containers/image's built-in lookaside for root.
pub const DEFAULT_LOOKASIDE: &str = "file:///var/lib/containers/sigstore";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub lookaside: Option<String>,
    #[serde(default, rename = "lookaside-staging")]
    pub lookaside_staging: Option<String>,
    #[serde(default)]
    pub sigstore: Option<String>,
    #[serde(default, rename = "sigstore-staging")]
    pub sigstore_staging: Option<String>,
    #[serde(default, rename = "use-sigstore-attachments")]
    pub use_sigstore_attachments: Option<bool>,
}

impl Entry {
    fn read(&self) -> Option<&str> {
        self.lookaside.as_deref().or(self.sigstore.as_deref())
    }

    fn write(&self) -> Option<&str> {
        self.lookaside_staging
            .as_deref()
            .or(self.sigstore_staging.as_deref())
            .or_else(|| self.read())
    }
}

#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(default, rename = "default-docker")]
    default_docker: Option<Entry>,
    #[serde(default)]
    docker: BTreeMap<String, Entry>,
}

/// Every file of the directory merged (a scope, or `default-docker`, in two files is an
/// error, as in containers/image).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesD {
    pub default_docker: Option<Entry>,
    pub docker: BTreeMap<String, Entry>,
}

/// A lookaside location: a local directory or an HTTP(S) base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    Http(String),
}

impl Location {
    fn parse(what: &str, url: &str) -> Result<Location, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{what} {url:?}: a file:// URL needs an absolute path"
                ));
            }
            return Ok(Location::Dir(PathBuf::from(path)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(Location::Http(url.trim_end_matches('/').to_string()));
        }
        Err(format!(
            "{what} {url:?}: only file://, http:// and https:// are supported"
        ))
    }

    /// Where signature `index` (from 1) of `repo_path` (`ns/app`) at `digest` is.
    pub fn signature(&self, repo_path: &str, digest: &str) -> impl Fn(usize) -> String + '_ {
        let tail = format!("{repo_path}@{}", digest.replacen(':', "=", 1));
        move |index| match self {
            Location::Dir(d) => format!("{}/{tail}/signature-{index}", d.display()),
            Location::Http(base) => format!("{base}/{tail}/signature-{index}"),
        }
    }
}

impl RegistriesD {
    /// Reads `dir/*.yaml` (a missing directory is no configuration).
    pub fn load(dir: &Path) -> Result<RegistriesD, TrustError> {
        let mut out = RegistriesD::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(TrustError::RegistriesD {
                    file: dir.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for path in files {
            let file = path.display().to_string();
            let err = |reason: String| TrustError::RegistriesD {
                file: file.clone(),
                reason,
            };
            let text = crate::read_capped(&path, crate::KEY_FILE_MAX).map_err(err)?;
            let f: File = if text.iter().all(|b| b.is_ascii_whitespace()) {
                File::default()
            } else {
                serde_norway::from_slice(&text).map_err(|e| err(e.to_string()))?
            };
            if let Some(d) = f.default_docker {
                if out.default_docker.is_some() {
                    return Err(err("default-docker is set in another file too".into()));
                }
                check_entry(&d, "default-docker").map_err(err)?;
                out.default_docker = Some(d);
            }
            for (scope, e) in f.docker {
                check_entry(&e, &format!("docker {scope:?}")).map_err(err)?;
                if out.docker.insert(scope.clone(), e).is_some() {
                    return Err(err(format!(
                        "docker scope {scope:?} is set in another file too"
                    )));
                }
            }
        }
        Ok(out)
    }

    fn entries(&self, r: &isula_types::Reference) -> Vec<&Entry> {
        let mut out: Vec<&Entry> = crate::policy::docker_scopes(r)
            .iter()
            .filter_map(|s| self.docker.get(s))
            .collect();
        out.extend(self.default_docker.as_ref());
        out
    }

    /// Where to read the signatures of `r`.
    pub fn lookaside(&self, r: &isula_types::Reference) -> Result<Location, String> {
        let url = self
            .entries(r)
            .iter()
            .find_map(|e| e.read())
            .unwrap_or(DEFAULT_LOOKASIDE);
        Location::parse("lookaside", url)
    }

    /// Where to write new signatures of `r`: a directory (only `file://` can be written).
    pub fn staging(&self, r: &isula_types::Reference) -> Result<PathBuf, String> {
        let url = self
            .entries(r)
            .iter()
            .find_map(|e| e.write())
            .unwrap_or(DEFAULT_LOOKASIDE);
        match Location::parse("lookaside-staging", url)? {
            Location::Dir(d) => Ok(d),
            Location::Http(u) => Err(format!(
                "lookaside-staging {u:?}: signatures can only be written to a file:// location"
            )),
        }
    }

    /// Whether sigstore signatures of `r` are read from and written as attachments.
    pub fn use_sigstore_attachments(&self, r: &isula_types::Reference) -> bool {
        self.entries(r)
            .iter()
            .find_map(|e| e.use_sigstore_attachments)
            .unwrap_or(false)
    }
}

fn check_entry(e: &Entry, what: &str) -> Result<(), String> {
    if e.lookaside.is_some() && e.sigstore.is_some() {
        return Err(format!("{what}: both lookaside and sigstore are set"));
    }
    if e.lookaside_staging.is_some() && e.sigstore_staging.is_some() {
        return Err(format!(
            "{what}: both lookaside-staging and sigstore-staging are set"
        ));
    }
    for url in [
        &e.lookaside,
        &e.sigstore,
        &e.lookaside_staging,
        &e.sigstore_staging,
    ]
    .into_iter()
    .flatten()
    {
        Location::parse(what, url)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use isula_types::Reference;

    #[test]
    fn scopes_fall_back_per_field() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("a.yaml"),
            "default-docker:\n  lookaside: https://sigs.example.com/base/\n  sigstore-staging: file:///stage\ndocker:\n  r.io/team:\n    sigstore: file:///team\n    use-sigstore-attachments: true\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("ignored.txt"), "x: [").expect("write");
        let d = RegistriesD::load(dir.path()).expect("load");
        let team = Reference::parse("r.io/team/app:1").expect("ref");
        let other = Reference::parse("q.io/app:1").expect("ref");
        assert_eq!(d.lookaside(&team), Ok(Location::Dir("/team".into())));
        assert_eq!(
            d.lookaside(&other),
            Ok(Location::Http("https://sigs.example.com/base".into()))
        );
        // An entry's own lookaside wins over a less specific entry's staging.
        assert_eq!(d.staging(&team), Ok(PathBuf::from("/team")));
        assert_eq!(d.staging(&other), Ok(PathBuf::from("/stage")));
        assert!(d.use_sigstore_attachments(&team));
        assert!(!d.use_sigstore_attachments(&other));
        let loc = d.lookaside(&team).expect("loc");
        assert_eq!(
            loc.signature("team/app", "sha256:ab")(1),
            "/team/team/app@sha256=ab/signature-1"
        );
        std::fs::write(
            dir.path().join("b.yaml"),
            "default-docker:\n  lookaside: file:///x\n",
        )
        .expect("write");
        assert!(RegistriesD::load(dir.path()).is_err(), "two defaults");
        std::fs::write(
            dir.path().join("b.yaml"),
            "docker:\n  q.io:\n    lookaside: ftp://x\n",
        )
        .expect("write");
        assert!(RegistriesD::load(dir.path()).is_err(), "ftp");
    }
}
