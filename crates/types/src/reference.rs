//! Image references with Docker's grammar and normalisation (`busybox` is
//! `docker.io/library/busybox:latest` inside, and shown short again outside).

use crate::digest::Digest;
use std::fmt;

pub const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
pub const DEFAULT_TAG: &str = "latest";
const NAME_MAX: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("invalid reference format {reference:?}: {reason}")]
    Invalid {
        reference: String,
        reason: &'static str,
    },
}

/// A normalised image reference: domain, repository path, and a tag and/or digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

fn invalid(reference: &str, reason: &'static str) -> ReferenceError {
    ReferenceError::Invalid {
        reference: reference.to_string(),
        reason,
    }
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// path-component := [a-z0-9]+ (separator [a-z0-9]+)*, separator := [_.] | __ | -+
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // A separator run, followed by an alphanumeric (the last byte is alphanumeric).
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "_" || sep == "." || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        // [ipv6]:port
        match rest.split_once(']') {
            Some((ip6, tail)) => {
                if ip6.is_empty() || !ip6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                    return false;
                }
                (
                    None,
                    tail.strip_prefix(':')
                        .map(Some)
                        .unwrap_or(if tail.is_empty() { None } else { Some("") }),
                )
            }
            None => return false,
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    match host {
        None => true,
        Some(h) => {
            !h.is_empty()
                && h.split('.').all(|c| {
                    let b = c.as_bytes();
                    !b.is_empty()
                        && b[0].is_ascii_alphanumeric()
                        && b[b.len() - 1].is_ascii_alphanumeric()
                        && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
                })
        }
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

impl Reference {
    /// Parses and normalises a reference the way `docker` does.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(invalid(s, "empty reference"));
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(s, "cannot specify 64-byte hexadecimal strings"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|_| invalid(s, "invalid digest"))?),
            ),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                let tag = &rest[i + 1..];
                if !valid_tag(tag) {
                    return Err(invalid(s, "invalid tag"));
                }
                (&rest[..i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(invalid(s, "empty repository name"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.to_lowercase() != first =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        };
        let domain = if domain == LEGACY_DOMAIN {
            DEFAULT_DOMAIN.to_string()
        } else {
            domain
        };
        if !valid_domain(&domain) {
            return Err(invalid(s, "invalid registry host"));
        }
        if path.to_lowercase() != path {
            return Err(invalid(s, "repository name must be lowercase"));
        }
        if !path.split('/').all(valid_path_component) {
            return Err(invalid(s, "invalid repository name"));
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path
        };
        if domain.len() + 1 + path.len() > NAME_MAX {
            return Err(invalid(
                s,
                "repository name must not be more than 255 characters",
            ));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Full repository name (`docker.io/library/busybox`).
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// Repository name as users write it (`busybox`, `localhost:5000/x`).
    pub fn familiar_name(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix(OFFICIAL_PREFIX) {
                Some(short) if !short.contains('/') => short.to_string(),
                _ => self.path.clone(),
            }
        } else {
            self.name()
        }
    }

    /// `name:tag` (and/or `@digest`) in the short form.
    pub fn familiar(&self) -> String {
        self.render(&self.familiar_name())
    }

    fn render(&self, name: &str) -> String {
        let mut s = name.to_string();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d.as_str());
        }
        s
    }
}

impl fmt::Display for Reference {
    /// The full, normalised form (`docker.io/library/busybox:latest`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&self.name()))
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let cases = [
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            ("user/app", "docker.io/user/app:latest", "user/app:latest"),
            (
                "index.docker.io/library/x",
                "docker.io/library/x:latest",
                "x:latest",
            ),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
            ),
            (
                "127.0.0.1:5000/a",
                "127.0.0.1:5000/a:latest",
                "127.0.0.1:5000/a:latest",
            ),
            (
                "openeuler:20.03",
                "docker.io/library/openeuler:20.03",
                "openeuler:20.03",
            ),
            (
                "a__b/c-d--e/f.g_h",
                "docker.io/a__b/c-d--e/f.g_h:latest",
                "a__b/c-d--e/f.g_h:latest",
            ),
            (
                "Registry.Example.com/x",
                "Registry.Example.com/x:latest",
                "Registry.Example.com/x:latest",
            ),
            ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000/x:latest"),
        ];
        for (input, full, short) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), full, "{input}");
            assert_eq!(r.familiar(), short, "{input}");
        }
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = Reference::parse(&format!("busybox@{d}")).expect("digest ref");
        assert_eq!(r.tag(), None);
        assert_eq!(r.familiar(), format!("busybox@{d}"));
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            "",
            ":tag",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "bu$ybox",
            "a//b",
            "a/",
            "/a",
            "a..b",
            "a-",
            "_a",
            "a:b:c",
            "busybox@sha256:abc",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "host:port/x",
            "../etc",
        ] {
            assert!(Reference::parse(bad).is_err(), "accepted {bad:?}");
        }
        let long = "a".repeat(300);
        assert!(Reference::parse(&long).is_err());
        let tag = format!("x:{}", "t".repeat(129));
        assert!(Reference::parse(&tag).is_err());
    }
}
