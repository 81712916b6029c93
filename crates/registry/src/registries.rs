//! `registries.toml`. v1: `[registries.search|insecure|block] registries = [...]`.
//! v2: `unqualified-search-registries = [...]` and `[[registry]]` tables with prefix,
//! location, insecure, blocked and `[[registry.mirror]]`. Mixing the two is refused, as
//! containers/image does.

use crate::ConfigError;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    pub location: String,
    pub insecure: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// What references this entry applies to (defaults to `location`).
    pub prefix: String,
    /// Where to go instead (empty: the prefix itself).
    pub location: String,
    pub insecure: bool,
    pub blocked: bool,
    pub mirrors: Vec<Mirror>,
}

/// The parsed configuration in one shape, whichever form the file used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    pub search: Vec<String>,
    pub registries: Vec<Registry>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct V1List {
    #[serde(default)]
    registries: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct V1Tables {
    #[serde(default)]
    search: V1List,
    #[serde(default)]
    insecure: V1List,
    #[serde(default)]
    block: V1List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Mirror {
    location: String,
    #[serde(default)]
    insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Registry {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror: Vec<V2Mirror>,
    #[serde(default, rename = "mirror-by-digest-only")]
    _mirror_by_digest_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    registries: Option<V1Tables>,
    #[serde(rename = "unqualified-search-registries")]
    unqualified: Option<Vec<String>>,
    registry: Option<Vec<V2Registry>>,
    #[serde(rename = "short-name-mode")]
    _short_name_mode: Option<String>,
}

fn check_host(file: &str, what: &str, host: &str) -> Result<(), ConfigError> {
    let ok = !host.is_empty()
        && !host.contains("://")
        && !host.chars().any(|c| c.is_whitespace())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:/[]*@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            format!("invalid {what} {host:?}"),
        ))
    }
}

impl Registries {
    pub fn parse(file: &str, text: &str) -> Result<Registries, ConfigError> {
        let f: File =
            toml::from_str(text).map_err(|e| ConfigError::invalid(file, e.to_string()))?;
        let v2 = f.unqualified.is_some() || f.registry.is_some();
        if v2 && f.registries.is_some() {
            return Err(ConfigError::invalid(
                file,
                "mixes the v1 [registries.*] tables with v2 unqualified-search-registries/[[registry]]",
            ));
        }
        let mut out = Registries::default();
        if let Some(v1) = f.registries {
            out.search = v1.search.registries;
            let mut add = |host: &String, insecure: bool, blocked: bool| match out
                .registries
                .iter_mut()
                .find(|r| &r.prefix == host)
            {
                Some(r) => {
                    r.insecure |= insecure;
                    r.blocked |= blocked;
                }
                None => out.registries.push(Registry {
                    prefix: host.clone(),
                    location: host.clone(),
                    insecure,
                    blocked,
                    mirrors: Vec::new(),
                }),
            };
            for h in &v1.insecure.registries {
                add(h, true, false);
            }
            for h in &v1.block.registries {
                add(h, false, true);
            }
        } else {
            out.search = f.unqualified.unwrap_or_default();
            for r in f.registry.unwrap_or_default() {
                if r.prefix.is_empty() && r.location.is_empty() {
                    return Err(ConfigError::invalid(
                        file,
                        "[[registry]] needs a prefix or a location",
                    ));
                }
                let prefix = if r.prefix.is_empty() {
                    r.location.clone()
                } else {
                    r.prefix
                };
                let location = if r.location.is_empty() {
                    prefix.clone()
                } else {
                    r.location
                };
                check_host(file, "registry prefix", &prefix)?;
                check_host(file, "registry location", &location)?;
                let mirrors = r
                    .mirror
                    .into_iter()
                    .map(|m| {
                        check_host(file, "mirror location", &m.location)?;
                        Ok(Mirror {
                            location: m.location,
                            insecure: m.insecure,
                        })
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()?;
                out.registries.push(Registry {
                    prefix,
                    location,
                    insecure: r.insecure,
                    blocked: r.blocked,
                    mirrors,
                });
            }
        }
        for s in &out.search {
            check_host(file, "search registry", s)?;
        }
        for r in &out.registries {
            check_host(file, "registry", &r.prefix)?;
        }
        Ok(out)
    }

    pub fn insecure(&self) -> Vec<String> {
        self.registries
            .iter()
            .filter(|r| r.insecure)
            .map(|r| r.prefix.clone())
            .collect()
    }

    pub fn blocked(&self) -> Vec<String> {
        self.registries
            .iter()
            .filter(|r| r.blocked)
            .map(|r| r.prefix.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tables() {
        let r = Registries::parse(
            "registries.toml",
            r#"
[registries.search]
registries = ["oepkgs.net"]
[registries.insecure]
registries = ["localhost:5000", "oepkgs.net"]
[registries.block]
registries = ["bad.example.com"]
"#,
        )
        .expect("parse");
        assert_eq!(r.search, vec!["oepkgs.net"]);
        assert_eq!(r.insecure(), vec!["localhost:5000", "oepkgs.net"]);
        assert_eq!(r.blocked(), vec!["bad.example.com"]);
    }

    #[test]
    fn v2_form() {
        let r = Registries::parse(
            "registries.toml",
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "docker.io"
location = "mirror.local:5000"
insecure = true
[[registry.mirror]]
location = "127.0.0.1:5001"
"#,
        )
        .expect("parse");
        assert_eq!(r.search, vec!["docker.io"]);
        assert_eq!(r.registries[0].location, "mirror.local:5000");
        assert_eq!(r.registries[0].mirrors[0].location, "127.0.0.1:5001");
    }

    #[test]
    fn refuses_bad_files() {
        for bad in [
            "[registries.search\nregistries = [",
            "[registries.search]\nregistries = \"x\"",
            "[registries.serch]\nregistries = []",
            "unqualified-search-registries = [\"a\"]\n[registries.search]\nregistries=[]",
            "[[registry]]\ninsecure = true",
            "unqualified-search-registries = [\"http://x\"]",
        ] {
            let e = Registries::parse("registries.toml", bad).expect_err(bad);
            assert!(e.to_string().starts_with("registries.toml: "), "{e}");
        }
    }
}
