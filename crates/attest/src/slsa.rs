//! The SLSA v1 provenance predicate of a build, laid out as BuildKit writes it
//! (`buildDefinition` with BuildKit's `buildType`, `externalParameters.configSource` and
//! `.request`, `internalParameters`, `resolvedDependencies`; `runDetails`). `mode=min`
//! leaves out what varies from one run of the same build to the next (the invocation ID
//! and the start and finish times, which the SLSA spec says are not reproducible); `max`
//! adds them and the Dockerfile itself. Build args named as secrets or proxies never go in.

use serde_json::{json, Map, Value};

/// BuildKit's build type for SLSA v1 (what tools reading Docker's provenance look for).
pub const BUILD_TYPE: &str =
    "https://github.com/moby/buildkit/blob/master/docs/attestations/slsa-definitions.md";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Min,
    Max,
}

impl Mode {
    /// `--provenance` as BuildKit spells it: empty (= `mode=min`), `mode=min`, `mode=max`,
    /// and `true`/`1` (= min). Other `key=value` options are refused.
    pub fn parse(text: &str) -> Result<Option<Mode>, String> {
        let mut mode = Some(Mode::Min);
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("mode", "min")) => mode = Some(Mode::Min),
                Some(("mode", "max")) => mode = Some(Mode::Max),
                Some(("mode", m)) => {
                    return Err(format!(
                        "--provenance mode={m}: expected mode=min or mode=max"
                    ))
                }
                None if matches!(part, "true" | "1") => mode = Some(Mode::Min),
                None if matches!(part, "false" | "0") => mode = None,
                _ => {
                    return Err(format!(
                        "--provenance {part:?}: expected mode=min or mode=max"
                    ))
                }
            }
        }
        Ok(mode)
    }
}

/// Something the build fetched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Material {
    /// A base image (FROM, COPY --from, RUN --mount=from): its package URL and manifest.
    Image { purl: String, manifest: String },
    /// An `ADD` URL and the sha256 of what it gave.
    Http { url: String, sha256: String },
    /// An `ADD` git repository and the commit it resolved to.
    Git { url: String, commit: String },
}

/// What the provenance says.
pub struct BuildInfo<'a> {
    pub mode: Mode,
    /// The Dockerfile's bytes (its digest goes in; in max mode, its text too).
    pub dockerfile: &'a [u8],
    /// The Dockerfile's name in the context (`Dockerfile`).
    pub dockerfile_name: &'a str,
    /// Build args as given (filtered here).
    pub build_args: &'a [(String, String)],
    /// The target stage, the platform, labels: BuildKit's other frontend args.
    pub target: Option<&'a str>,
    pub platform: Option<&'a str>,
    /// The ids of the secrets and SSH agents the build was given (never their values).
    pub secrets: Vec<String>,
    pub ssh: Vec<String>,
    pub materials: Vec<Material>,
    /// This builder (`isula-builder`) and its version.
    pub builder_id: &'a str,
    pub version: &'a str,
    /// The build machine's platform (`linux/amd64`).
    pub builder_platform: &'a str,
    /// max only: the build's ID and its start and finish (RFC 3339).
    pub invocation_id: &'a str,
    pub started_on: &'a str,
    pub finished_on: &'a str,
}

/// Build args that never go into a provenance: proxies (their values may hold
/// passwords) and anything named like a secret.
pub fn is_withheld_arg(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    isula_types::PROXY_ARGS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
        || [
            "SECRET",
            "PASSWORD",
            "PASSWD",
            "TOKEN",
            "CREDENTIAL",
            "PRIVATE_KEY",
            "API_KEY",
        ]
        .iter()
        .any(|w| upper.contains(w))
}

/// The predicate, as compact JSON bytes.
pub fn predicate(info: &BuildInfo<'_>) -> Vec<u8> {
    use sha2::Digest as _;
    let df_digest = hex::encode(sha2::Sha256::digest(info.dockerfile));
    let mut args = Map::new();
    let mut sorted: Vec<&(String, String)> = info.build_args.iter().collect();
    sorted.sort();
    for (k, v) in sorted {
        if !is_withheld_arg(k) {
            args.insert(format!("build-arg:{k}"), json!(v));
        }
    }
    if let Some(t) = info.target.filter(|t| !t.is_empty()) {
        args.insert("target".into(), json!(t));
    }
    if let Some(p) = info.platform.filter(|p| !p.is_empty()) {
        args.insert("platform".into(), json!(p));
    }
    let mut request = json!({
        "frontend": "dockerfile.v0",
        "args": args,
        "locals": [{"name": "context"}, {"name": "dockerfile"}],
    });
    if !info.secrets.is_empty() {
        request["secrets"] = info
            .secrets
            .iter()
            .map(|id| json!({"id": id}))
            .collect::<Vec<_>>()
            .into();
    }
    if !info.ssh.is_empty() {
        request["ssh"] = info
            .ssh
            .iter()
            .map(|id| json!({"id": id}))
            .collect::<Vec<_>>()
            .into();
    }
    let mut materials = info.materials.clone();
    materials.sort();
    materials.dedup();
    let deps: Vec<Value> = materials
        .iter()
        .map(|m| match m {
            Material::Image { purl, manifest } => {
                let hex = manifest.strip_prefix("sha256:").unwrap_or(manifest);
                json!({"uri": purl, "digest": {"sha256": hex}})
            }
            Material::Http { url, sha256 } => {
                json!({"uri": redact(url), "digest": {"sha256": sha256}})
            }
            Material::Git { url, commit } => {
                let algo = if commit.len() == 64 { "sha256" } else { "sha1" };
                let mut digest = Map::new();
                digest.insert(algo.to_string(), json!(commit));
                json!({"uri": redact(url), "digest": digest})
            }
        })
        .collect();
    let mut internal = json!({"builderPlatform": info.builder_platform});
    let mut metadata = json!({
        "buildkit_completeness": {"request": true, "resolvedDependencies": false},
        "buildkit_reproducible": false,
    });
    if info.mode == Mode::Max {
        metadata["invocationId"] = json!(info.invocation_id);
        metadata["startedOn"] = json!(info.started_on);
        metadata["finishedOn"] = json!(info.finished_on);
        internal["buildConfig"] = json!({
            "dockerfile": String::from_utf8_lossy(info.dockerfile),
        });
    }
    let v = json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "configSource": {
                    "digest": {"sha256": df_digest},
                    "path": info.dockerfile_name,
                },
                "request": request,
            },
            "internalParameters": internal,
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {
                "id": info.builder_id,
                "version": {"isula-build": info.version},
            },
            "metadata": metadata,
        },
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// A URL without its user information (a password in `https://user:pw@host/`).
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, tail) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match auth.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{host}{tail}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(mode: Mode, started: &'static str) -> BuildInfo<'static> {
        static ARGS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
        let args = ARGS.get_or_init(|| {
            vec![
                ("VERSION".into(), "1.2".into()),
                ("http_proxy".into(), "http://user:pw@proxy:3128".into()),
                ("DB_PASSWORD".into(), "hunter2".into()),
            ]
        });
        BuildInfo {
            mode,
            dockerfile: b"FROM busybox\n",
            dockerfile_name: "Dockerfile",
            build_args: args,
            target: None,
            platform: Some("linux/amd64"),
            secrets: vec!["npmrc".into()],
            ssh: Vec::new(),
            materials: vec![
                Material::Http {
                    url: "https://u:p@example.test/f.tgz".into(),
                    sha256: "ab".repeat(32),
                },
                Material::Image {
                    purl: "pkg:docker/busybox@latest?platform=linux%2Famd64".into(),
                    manifest: format!("sha256:{}", "cd".repeat(32)),
                },
            ],
            builder_id: "isula-builder",
            version: "0.1.0",
            builder_platform: "linux/amd64",
            invocation_id: "build-1",
            started_on: started,
            finished_on: started,
        }
    }

    #[test]
    fn min_is_the_same_for_two_runs_and_max_is_not() {
        let a = predicate(&info(Mode::Min, "2026-01-01T00:00:00Z"));
        let b = predicate(&info(Mode::Min, "2026-01-02T00:00:00Z"));
        assert_eq!(a, b);
        let c = predicate(&info(Mode::Max, "2026-01-01T00:00:00Z"));
        let d = predicate(&info(Mode::Max, "2026-01-02T00:00:00Z"));
        assert_ne!(c, d);
        let v: Value = serde_json::from_slice(&c).expect("json");
        assert_eq!(v["runDetails"]["metadata"]["invocationId"], "build-1");
        let text = String::from_utf8_lossy(&a);
        for secret in ["hunter2", "proxy:3128", "u:p@", "DB_PASSWORD"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let v: Value = serde_json::from_slice(&a).expect("json");
        let ext = &v["buildDefinition"]["externalParameters"];
        assert_eq!(ext["request"]["args"]["build-arg:VERSION"], "1.2");
        assert_eq!(ext["request"]["secrets"][0]["id"], "npmrc");
        let deps = v["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .expect("deps");
        assert_eq!(deps.len(), 2);
        assert!(v["runDetails"]["metadata"].get("startedOn").is_none());
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse(""), Ok(Some(Mode::Min)));
        assert_eq!(Mode::parse("mode=max"), Ok(Some(Mode::Max)));
        assert_eq!(Mode::parse("mode=min"), Ok(Some(Mode::Min)));
        assert_eq!(Mode::parse("false"), Ok(None));
        let err = Mode::parse("mode=full").expect_err("refused");
        assert!(err.contains("mode=full"), "{err}");
        assert!(Mode::parse("level=3").is_err());
    }
}
