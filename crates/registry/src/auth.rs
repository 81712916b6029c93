//! Stored credentials: `auth.json` in the containers-auth.json shape
//! (`{"auths": {"host": {"auth": base64("user:password")}}}`), written atomically with mode
//! 0600. Passwords never appear in `Debug` output.

use crate::error::{RegistryError, Result};
use base64::Engine as _;
use serde_json::{Map, Value};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `Authorization: Basic` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The key auth.json uses for a registry: its host[:port], without scheme or path.
pub fn normalize_server(server: &str) -> Result<String> {
    let s = server.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or_default();
    let host = if host == "index.docker.io" || host == "registry-1.docker.io" {
        "docker.io"
    } else {
        host
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return Err(RegistryError::Invalid(format!(
            "registry server {server:?} is not a valid host[:port]"
        )));
    }
    Ok(host.to_string())
}

/// The auth file at a fixed path. Every operation re-reads it, so edits by hand are seen.
#[derive(Debug, Clone)]
pub struct AuthFile {
    path: PathBuf,
}

impl AuthFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AuthFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Map<String, Value>> {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
            Err(e) => {
                return Err(RegistryError::Config(format!(
                    "read {}: {e}",
                    self.path.display()
                )))
            }
        };
        let v: Value = serde_json::from_slice(&text).map_err(|e| {
            RegistryError::Config(format!("{}: not valid JSON: {e}", self.path.display()))
        })?;
        match v {
            Value::Object(m) => Ok(m),
            _ => Err(RegistryError::Config(format!(
                "{}: not a JSON object",
                self.path.display()
            ))),
        }
    }

    fn write(&self, doc: &Map<String, Value>) -> Result<()> {
        let err = |op: &str, e: std::io::Error| {
            RegistryError::Config(format!("{op} {}: {e}", self.path.display()))
        };
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).map_err(|e| err("create directory for", e))?;
        let tmp = dir.join(format!(".auth.json.{:016x}", rand::random::<u64>()));
        let body = serde_json::to_vec_pretty(&Value::Object(doc.clone()))
            .map_err(|e| err("encode", std::io::Error::other(e)))?;
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| err("write", e))?;
        isula_sys::fsync_dir(dir).map_err(|e| RegistryError::Config(e.to_string()))?;
        Ok(())
    }

    /// Credentials stored for `server` (host[:port]).
    pub fn get(&self, server: &str) -> Result<Option<Credentials>> {
        let doc = self.read()?;
        let Some(entry) = doc.get("auths").and_then(|a| a.get(server)) else {
            return Ok(None);
        };
        let Some(encoded) = entry.get("auth").and_then(Value::as_str) else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                RegistryError::Config(format!(
                    "{}: the entry for {server} is not base64 of user:password",
                    self.path.display()
                ))
            })?;
        let (user, pass) = raw.split_once(':').ok_or_else(|| {
            RegistryError::Config(format!(
                "{}: the entry for {server} is not user:password",
                self.path.display()
            ))
        })?;
        Ok(Some(Credentials {
            username: user.to_string(),
            password: pass.to_string(),
        }))
    }

    pub fn set(&self, server: &str, creds: &Credentials) -> Result<()> {
        let mut doc = self.read()?;
        let auths = doc
            .entry("auths")
            .or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            *auths = Value::Object(Map::new());
        }
        let raw = format!("{}:{}", creds.username, creds.password);
        if let Some(m) = auths.as_object_mut() {
            m.insert(
                server.to_string(),
                serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode(raw)}),
            );
        }
        self.write(&doc)
    }

    /// Removes `server`'s entry. Returns whether there was one.
    pub fn remove(&self, server: &str) -> Result<bool> {
        let mut doc = self.read()?;
        let removed = doc
            .get_mut("auths")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.remove(server))
            .is_some();
        if removed {
            self.write(&doc)?;
        }
        Ok(removed)
    }

    /// Removes every entry. Returns how many there were.
    pub fn clear(&self) -> Result<usize> {
        let mut doc = self.read()?;
        let n = doc
            .get("auths")
            .and_then(Value::as_object)
            .map_or(0, |m| m.len());
        doc.insert("auths".into(), Value::Object(Map::new()));
        if n > 0 || self.path.exists() {
            self.write(&doc)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_mode_and_redaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = AuthFile::new(dir.path().join("auth.json"));
        assert_eq!(f.get("r.io").expect("get"), None);
        let c = Credentials {
            username: "u".into(),
            password: "p:w".into(),
        };
        f.set("r.io", &c).expect("set");
        f.set("s.io:5000", &c).expect("set");
        assert_eq!(f.get("r.io").expect("get"), Some(c.clone()));
        let mode = fs::metadata(f.path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{c:?}").contains("p:w"));
        assert!(f.remove("r.io").expect("remove"));
        assert!(!f.remove("r.io").expect("remove"));
        assert_eq!(f.clear().expect("clear"), 1);
        assert_eq!(f.get("s.io:5000").expect("get"), None);
    }

    #[test]
    fn server_names() {
        assert_eq!(
            normalize_server("https://r.io:5000/v2/").expect("ok"),
            "r.io:5000"
        );
        assert_eq!(
            normalize_server("index.docker.io").expect("ok"),
            "docker.io"
        );
        assert!(normalize_server("").is_err());
        assert!(normalize_server("a b").is_err());
    }
}
