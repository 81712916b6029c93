//! What a daemon tells and does for a fleet of builders: the platforms it runs natively
//! (`native_platforms` in configuration.toml, else this machine's) and those it emulates
//! (binfmt_misc `qemu-*` entries that are enabled), for `info`; and the shared cache
//! registry (`cache_registry = "REGISTRY/REPO"`) every build imports from and exports to,
//! one tag per project. Placement itself is the client's (it sees every builder); nothing
//! here knows of other daemons.

use anyhow::{bail, Result};
use isula_types::platform::BuildPlatform;
use isula_types::reference::Reference;
use sha2::Digest;

/// Where binfmt_misc lists its handlers.
const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub native: Vec<BuildPlatform>,
    /// The repository (no tag) of the shared cache.
    pub cache_registry: Option<String>,
}

impl FleetSettings {
    pub fn new(native: Option<&[String]>, cache_registry: Option<&str>) -> Result<Self> {
        let native = match native {
            None => vec![BuildPlatform::host()],
            Some([]) => bail!("native_platforms in configuration.toml is empty: name at least one platform, or leave the key out"),
            Some(list) => list
                .iter()
                .map(|p| {
                    BuildPlatform::parse(p).map_err(|e| {
                        anyhow::anyhow!("native_platforms in configuration.toml: {e}")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let cache_registry = match cache_registry.map(str::trim) {
            None | Some("") => None,
            Some(repo) => {
                let r = Reference::parse(repo).map_err(|e| {
                    anyhow::anyhow!("cache_registry {repo:?} in configuration.toml: {e}")
                })?;
                if r.digest().is_some() || repo.rsplit('/').next().is_some_and(|l| l.contains(':'))
                {
                    bail!("cache_registry {repo:?} in configuration.toml: name a repository (REGISTRY/REPO), without a tag or digest");
                }
                Some(r.name())
            }
        };
        Ok(FleetSettings {
            native,
            cache_registry,
        })
    }

    /// The platforms `info` reports as native.
    pub fn native_texts(&self) -> Vec<String> {
        self.native.iter().map(ToString::to_string).collect()
    }

    /// The tag of the shared cache for a build: the client's placement key, else one made
    /// of what the daemon knows of the project (its context and platforms).
    pub fn cache_ref(&self, fleet_key: &str, context: &str, platform: &str) -> Option<String> {
        let repo = self.cache_registry.as_ref()?;
        let key = if !fleet_key.is_empty() && fleet_key.bytes().all(|b| b.is_ascii_hexdigit()) {
            fleet_key.to_ascii_lowercase()
        } else {
            // A synced context is `context:ID/GENERATION`: the generation changes with
            // every change of its files, the project does not.
            let project = match context.strip_prefix("context:") {
                Some(id) => id.split('/').next().unwrap_or(id),
                None => context,
            };
            hex::encode(sha2::Sha256::digest(
                format!("{project}\0{platform}").as_bytes(),
            ))
        };
        Some(format!("{repo}:fleet-{}", &key[..key.len().min(32)]))
    }
}

/// A build's `--cache-from` and `--cache-to`, with the shared cache registry's tag for it
/// added (when the build uses the build cache): imported from always, exported to when
/// the build names no `--cache-to` and is for one platform (a list's builds export none).
pub fn with_shared_cache(
    settings: &crate::config::Settings,
    req: &isula_api::v1::BuildRequest,
    platforms: usize,
) -> (Vec<String>, Option<String>) {
    let mut from = req.cache_from.clone();
    let mut to = Some(req.cache_to.clone()).filter(|r| !r.is_empty());
    if !settings.build_cache || req.no_cache {
        return (from, to);
    }
    let Some(shared) = settings
        .fleet
        .cache_ref(&req.fleet_key, &req.context_dir, &req.platform)
    else {
        return (from, to);
    };
    if !from.contains(&shared) {
        from.push(shared.clone());
    }
    if to.is_none() && platforms <= 1 {
        to = Some(shared);
    }
    (from, to)
}

/// The platforms of a build for several that other builders of a fleet made
/// (`fleetParts`: `PLATFORM=REF`), checked: each a platform of the build, named once.
pub fn parts(
    req: &isula_api::v1::BuildRequest,
    platforms: &[BuildPlatform],
) -> Result<std::collections::HashMap<BuildPlatform, String>, tonic::Status> {
    let mut out = std::collections::HashMap::new();
    if req.fleet_parts.is_empty() {
        return Ok(out);
    }
    if platforms.len() < 2 {
        return Err(crate::error::invalid(
            "images made elsewhere (fleetParts) go into a build for several platforms",
        ));
    }
    for part in &req.fleet_parts {
        let (p, r) = part.split_once('=').ok_or_else(|| {
            crate::error::invalid(format!("fleet part {part:?}: expected PLATFORM=REFERENCE"))
        })?;
        let p = BuildPlatform::parse(p)
            .map_err(|e| crate::error::invalid(format!("fleet part {part:?}: {e}")))?;
        Reference::parse(r)
            .map_err(|e| crate::error::invalid(format!("fleet part {part:?}: {e}")))?;
        if !platforms.contains(&p) {
            return Err(crate::error::invalid(format!(
                "fleet part {part:?}: {p} is not a platform of this build"
            )));
        }
        if out.insert(p.clone(), r.to_string()).is_some() {
            return Err(crate::error::invalid(format!(
                "fleet part {part:?}: {p} is named twice"
            )));
        }
    }
    Ok(out)
}

/// The image another builder made for `platform`, from `reference` (pulled unless the store
/// has it): its ID, for the list.
pub fn take_part(
    state: &crate::state::State,
    reference: &str,
    platform: &BuildPlatform,
    cancel: &isula_transport::Cancel,
    out: &mut dyn FnMut(String),
) -> Result<String, tonic::Status> {
    out(format!(
        "Taking {platform} from {reference} (built by another builder)\n"
    ));
    crate::rpc::registry::resolve_or_pull(state, reference, platform, cancel, out)
        .map(|id| id.hex().to_string())
        .map_err(|e| {
            crate::error::status(
                e.kind,
                format!("taking {platform} from {reference}: {}", e.message),
            )
        })
}

/// The platforms the kernel runs through QEMU (enabled `qemu-*` binfmt_misc entries), less
/// the native ones.
pub fn emulated(native: &[BuildPlatform]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(BINFMT_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let arch = name.strip_prefix("qemu-")?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            if text.lines().next() != Some("enabled") {
                return None;
            }
            let p = platform_of_qemu(arch)?;
            (!native.contains(&p)).then(|| p.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The platform a QEMU user-mode emulator runs (the names Debian's qemu-user-static
/// registers), for the architectures images are made for.
fn platform_of_qemu(name: &str) -> Option<BuildPlatform> {
    let arch = match name {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm/v7",
        "i386" => "386",
        "riscv64" => "riscv64",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "loongarch64" => "loong64",
        "mips64el" => "mips64le",
        _ => return None,
    };
    BuildPlatform::parse(&format!("linux/{arch}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_platforms_default_to_this_machine_and_are_checked() {
        let s = FleetSettings::new(None, None).expect("defaults");
        assert_eq!(s.native, vec![BuildPlatform::host()]);
        let s = FleetSettings::new(Some(&["linux/aarch64".into()]), None).expect("one");
        assert_eq!(s.native_texts(), ["linux/arm64"]);
        assert!(FleetSettings::new(Some(&[]), None).is_err());
        assert!(FleetSettings::new(Some(&["windows/amd64".into()]), None).is_err());
    }

    #[test]
    fn the_cache_registry_is_a_repository_and_each_project_has_its_tag() {
        for bad in ["reg:5000/cache:1", "reg:5000/cache@sha256:0000000000000000000000000000000000000000000000000000000000000000", "Bad Name"] {
            assert!(FleetSettings::new(None, Some(bad)).is_err(), "{bad}");
        }
        let s = FleetSettings::new(None, Some("reg:5000/team/cache")).expect("repo");
        let a = s.cache_ref("ab12", "/ctx", "").expect("ref");
        assert_eq!(a, "reg:5000/team/cache:fleet-ab12");
        let b = s.cache_ref("", "/ctx", "linux/arm64").expect("ref");
        assert_eq!(
            s.cache_ref("", "context:abc/1", ""),
            s.cache_ref("", "context:abc/7", ""),
            "a synced context's generation is not the project"
        );
        assert_ne!(b, s.cache_ref("", "/other", "linux/arm64").expect("ref"));
        assert!(
            b.starts_with("reg:5000/team/cache:fleet-")
                && b.len() == "reg:5000/team/cache:fleet-".len() + 32
        );
        let none = FleetSettings::new(None, None).expect("none");
        assert_eq!(none.cache_ref("ab", "/ctx", ""), None);
    }

    #[test]
    fn parts_name_platforms_of_the_build_once() {
        let two: Vec<BuildPlatform> = ["linux/amd64", "linux/arm64"]
            .iter()
            .map(|p| BuildPlatform::parse(p).expect("platform"))
            .collect();
        let req = |parts: &[&str]| isula_api::v1::BuildRequest {
            fleet_parts: parts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let ok =
            parts(&req(&["linux/aarch64=reg:5000/app:1-linux-arm64"]), &two).expect("one part");
        assert_eq!(
            ok.get(&two[1]).map(String::as_str),
            Some("reg:5000/app:1-linux-arm64")
        );
        assert!(parts(&req(&[]), &two).expect("none").is_empty());
        for bad in [
            vec!["linux/riscv64=reg/app:1"],
            vec!["linux/arm64"],
            vec!["linux/arm64=Not A Ref"],
            vec!["linux/arm64=reg/a:1", "linux/aarch64=reg/b:1"],
        ] {
            let e = parts(&req(&bad), &two).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        // Only a build for several platforms takes parts.
        assert!(parts(&req(&["linux/arm64=reg/a:1"]), &two[1..]).is_err());
    }

    #[test]
    fn qemu_names_map_to_platforms() {
        assert_eq!(
            platform_of_qemu("aarch64")
                .map(|p| p.to_string())
                .as_deref(),
            Some("linux/arm64")
        );
        assert_eq!(
            platform_of_qemu("arm").map(|p| p.to_string()).as_deref(),
            Some("linux/arm/v7")
        );
        assert_eq!(platform_of_qemu("xtensa"), None);
    }
}
