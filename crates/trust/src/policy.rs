//! `policy.json` (containers-policy.json(5)): a default requirement list and per-transport,
//! per-scope lists, and their evaluation for one image against the signatures found for
//! it. The most specific scope wins (`host/repo:tag` or `host/repo@digest`, `host/repo`,
//! its parent namespaces, `host`, `*.domain` wildcards from the most specific, the
//! transport's `""`), then `default`; every requirement of the chosen list must accept.
//! Keys are read when a requirement is evaluated (as containers/image does), so a missing
//! key file fails the pulls it governs, naming it.

use crate::payload::{self, Claims, Format};
use crate::{gpg, sigstore, TrustError};
use base64::Engine as _;
use isula_types::Reference;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where a requirement's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    Paths(Vec<PathBuf>),
    Data(Vec<u8>),
}

/// `signedIdentity`: which signed references an image's reference accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    ExactReference(String),
    ExactRepository(String),
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    SignedBy {
        keys: Keys,
        identity: Identity,
    },
    SigstoreSigned {
        keys: Keys,
        identity: Identity,
    },
    /// Not implemented by containers/image either: it refuses what it governs.
    SignedBaseLayer,
}

impl Requirement {
    pub fn type_name(&self) -> &'static str {
        match self {
            Requirement::InsecureAcceptAnything => "insecureAcceptAnything",
            Requirement::Reject => "reject",
            Requirement::SignedBy { .. } => "signedBy",
            Requirement::SigstoreSigned { .. } => "sigstoreSigned",
            Requirement::SignedBaseLayer => "signedBaseLayer",
        }
    }

    /// Whether it needs signatures (and so a look for them).
    pub fn wants_signatures(&self) -> bool {
        matches!(
            self,
            Requirement::SignedBy { .. } | Requirement::SigstoreSigned { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Vec<Requirement>,
    pub transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// The requirement types this policy reader knows.
pub const TYPES: [&str; 5] = [
    "insecureAcceptAnything",
    "reject",
    "signedBy",
    "sigstoreSigned",
    "signedBaseLayer",
];

fn only_keys(o: &Map<String, Value>, what: &str, allowed: &[&str]) -> Result<(), String> {
    for k in o.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("{what}: unknown field {k:?}"));
        }
    }
    Ok(())
}

fn str_field<'a>(
    o: &'a Map<String, Value>,
    k: &str,
    what: &str,
) -> Result<Option<&'a str>, String> {
    match o.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{what}: {k:?} must be a string")),
    }
}

fn parse_keys(o: &Map<String, Value>, what: &str, paths_allowed: bool) -> Result<Keys, String> {
    let path = str_field(o, "keyPath", what)?;
    let paths = match o.get("keyPaths") {
        None => None,
        Some(Value::Array(a)) if paths_allowed => Some(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(PathBuf::from)
                        .ok_or_else(|| format!("{what}: \"keyPaths\" must list strings"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(format!("{what}: \"keyPaths\" must be a list of paths")),
    };
    let data = str_field(o, "keyData", what)?;
    match (path, paths, data) {
        (Some(p), None, None) => Ok(Keys::Paths(vec![PathBuf::from(p)])),
        (None, Some(p), None) if !p.is_empty() => Ok(Keys::Paths(p)),
        (None, None, Some(d)) => base64::engine::general_purpose::STANDARD
            .decode(d)
            .map(Keys::Data)
            .map_err(|e| format!("{what}: \"keyData\" is not base64: {e}")),
        _ => Err(format!(
            "{what}: exactly one of {} must be given",
            if paths_allowed {
                "\"keyPath\", \"keyPaths\" and \"keyData\""
            } else {
                "\"keyPath\" and \"keyData\""
            }
        )),
    }
}

fn parse_identity(v: Option<&Value>, what: &str) -> Result<Identity, String> {
    let Some(v) = v else {
        return Ok(Identity::MatchRepoDigestOrExact);
    };
    let what = format!("{what}: signedIdentity");
    let o = v
        .as_object()
        .ok_or_else(|| format!("{what} must be an object"))?;
    let kind = str_field(o, "type", &what)?.ok_or_else(|| format!("{what} needs a \"type\""))?;
    let named = |k: &str| -> Result<String, String> {
        str_field(o, k, &what)?
            .map(str::to_string)
            .ok_or_else(|| format!("{what} {kind} needs {k:?}"))
    };
    match kind {
        "matchExact" | "matchRepoDigestOrExact" | "matchRepository" => {
            only_keys(o, &what, &["type"])?;
            Ok(match kind {
                "matchExact" => Identity::MatchExact,
                "matchRepository" => Identity::MatchRepository,
                _ => Identity::MatchRepoDigestOrExact,
            })
        }
        "exactReference" => {
            only_keys(o, &what, &["type", "dockerReference"])?;
            let r = named("dockerReference")?;
            let n = Named::parse(&r).ok_or_else(|| format!("{what}: {r:?} is not a reference"))?;
            if !n.tagged && !n.digested {
                return Err(format!("{what}: {r:?} names no tag or digest"));
            }
            Ok(Identity::ExactReference(r))
        }
        "exactRepository" => {
            only_keys(o, &what, &["type", "dockerRepository"])?;
            let r = named("dockerRepository")?;
            let n = Named::parse(&r).ok_or_else(|| format!("{what}: {r:?} is not a repository"))?;
            if n.tagged || n.digested {
                return Err(format!("{what}: {r:?} must name a repository alone"));
            }
            Ok(Identity::ExactRepository(r))
        }
        "remapIdentity" => {
            only_keys(o, &what, &["type", "prefix", "signedPrefix"])?;
            Ok(Identity::RemapIdentity {
                prefix: named("prefix")?,
                signed_prefix: named("signedPrefix")?,
            })
        }
        other => Err(format!("{what}: unknown type {other:?}")),
    }
}

fn parse_requirement(v: &Value, what: &str) -> Result<Requirement, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{what}: a requirement must be an object"))?;
    let kind = str_field(o, "type", what)?
        .ok_or_else(|| format!("{what}: a requirement without \"type\""))?;
    let what = format!("{what}: {kind}");
    match kind {
        "insecureAcceptAnything" | "reject" => {
            only_keys(o, &what, &["type"])?;
            Ok(if kind == "reject" {
                Requirement::Reject
            } else {
                Requirement::InsecureAcceptAnything
            })
        }
        "signedBy" => {
            only_keys(
                o,
                &what,
                &[
                    "type",
                    "keyType",
                    "keyPath",
                    "keyPaths",
                    "keyData",
                    "signedIdentity",
                ],
            )?;
            match str_field(o, "keyType", &what)? {
                Some("GPGKeys") => {}
                Some(t) => {
                    return Err(format!(
                        "{what}: keyType {t:?} is not supported (only \"GPGKeys\")"
                    ))
                }
                None => return Err(format!("{what}: needs \"keyType\": \"GPGKeys\"")),
            }
            Ok(Requirement::SignedBy {
                keys: parse_keys(o, &what, true)?,
                identity: parse_identity(o.get("signedIdentity"), &what)?,
            })
        }
        "sigstoreSigned" => {
            for k in o.keys() {
                if k.starts_with("fulcio") || k.starts_with("rekor") {
                    return Err(format!(
                        "{what}: {k:?} is not supported (public keys only: \"keyPath\" or \"keyData\")"
                    ));
                }
            }
            only_keys(o, &what, &["type", "keyPath", "keyData", "signedIdentity"])?;
            Ok(Requirement::SigstoreSigned {
                keys: parse_keys(o, &what, false)?,
                identity: parse_identity(o.get("signedIdentity"), &what)?,
            })
        }
        "signedBaseLayer" => Ok(Requirement::SignedBaseLayer),
        other => Err(format!(
            "requirement type {other:?} is not supported (one of: {})",
            TYPES.join(", ")
        )),
    }
}

fn parse_list(v: &Value, what: &str) -> Result<Vec<Requirement>, String> {
    let a = v
        .as_array()
        .ok_or_else(|| format!("{what} must be a list of requirements"))?;
    if a.is_empty() {
        return Err(format!("{what} must list at least one requirement"));
    }
    a.iter().map(|r| parse_requirement(r, what)).collect()
}

impl Policy {
    pub fn parse(file: &str, text: &str) -> Result<Policy, TrustError> {
        let err = |reason: String| TrustError::Policy {
            file: file.to_string(),
            reason,
        };
        let raw: Value = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let top = raw
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        only_keys(top, "policy", &["default", "transports"]).map_err(err)?;
        let default = parse_list(
            top.get("default")
                .ok_or_else(|| err("\"default\" is missing".into()))?,
            "\"default\"",
        )
        .map_err(err)?;
        let mut transports = BTreeMap::new();
        if let Some(t) = top.get("transports") {
            let t = t
                .as_object()
                .ok_or_else(|| err("\"transports\" must be an object".into()))?;
            for (name, scopes) in t {
                let scopes = scopes
                    .as_object()
                    .ok_or_else(|| err(format!("transport {name:?} must be an object")))?;
                let mut out = BTreeMap::new();
                for (scope, list) in scopes {
                    let what = format!("transports.{name}.{scope:?}");
                    out.insert(scope.clone(), parse_list(list, &what).map_err(err)?);
                }
                transports.insert(name.clone(), out);
            }
        }
        Ok(Policy {
            default,
            transports,
        })
    }

    /// The requirements for `r` moving through the `docker` transport, and the scope that
    /// chose them (`""` for the transport's default, `default` for the policy's).
    pub fn for_docker(&self, r: &Reference) -> (&[Requirement], String) {
        if let Some(t) = self.transports.get("docker") {
            for scope in docker_scopes(r) {
                if let Some(list) = t.get(&scope) {
                    return (list, scope);
                }
            }
            if let Some(list) = t.get("") {
                return (list, "docker \"\"".into());
            }
        }
        (&self.default, "default".into())
    }
}

/// A reference's scopes from the most specific: `host/repo:tag` (or `@digest`),
/// `host/repo`, parent namespaces, `host`, then `*.domain` wildcards.
pub fn docker_scopes(r: &Reference) -> Vec<String> {
    let mut scopes = vec![r.to_string(), r.name()];
    let mut name = r.name();
    while let Some(i) = name.rfind('/') {
        name.truncate(i);
        scopes.push(name.clone());
    }
    let host = r.domain().split(':').next().unwrap_or_default();
    let mut rest = host;
    while let Some(i) = rest.find('.') {
        rest = &rest[i + 1..];
        scopes.push(format!("*.{rest}"));
    }
    scopes
}

/// A reference as written in a signature or policy: whether it named a tag or digest
/// (`Reference::parse` would add `latest`).
#[derive(Debug, Clone)]
pub struct Named {
    pub r: Reference,
    pub tagged: bool,
    pub digested: bool,
}

impl Named {
    pub fn parse(s: &str) -> Option<Named> {
        let r = Reference::parse(s).ok()?;
        let digested = s.contains('@');
        let name_part = s.split('@').next().unwrap_or_default();
        let last = name_part.rfind('/').map_or(0, |i| i + 1);
        let tagged = name_part[last..].contains(':');
        Some(Named {
            r,
            tagged,
            digested,
        })
    }

    fn of(r: &Reference) -> Named {
        Named {
            r: r.clone(),
            tagged: r.tag().is_some(),
            digested: r.digest().is_some(),
        }
    }
}

fn match_exact(image: &Named, signed: &Named) -> bool {
    (image.tagged || image.digested)
        && (signed.tagged || signed.digested)
        && image.r.to_string() == signed.r.to_string()
}

fn match_repo_digest_or_exact(image: &Named, signed: &Named) -> bool {
    if image.digested && !image.tagged {
        image.r.name() == signed.r.name()
    } else {
        match_exact(image, signed)
    }
}

fn prefix_at_boundary(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', ':', '@']))
}

impl Identity {
    /// Whether a signature claiming `signed` is good for an image pulled as `image`.
    pub fn accepts(&self, image: &Reference, signed: &str) -> bool {
        let Some(signed) = Named::parse(signed) else {
            return false;
        };
        let img = Named::of(image);
        match self {
            Identity::MatchExact => match_exact(&img, &signed),
            Identity::MatchRepoDigestOrExact => match_repo_digest_or_exact(&img, &signed),
            Identity::MatchRepository => img.r.name() == signed.r.name(),
            Identity::ExactReference(want) => {
                Named::parse(want).is_some_and(|w| match_exact(&w, &signed))
            }
            Identity::ExactRepository(want) => {
                Named::parse(want).is_some_and(|w| w.r.name() == signed.r.name())
            }
            Identity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                let full = img.r.to_string();
                let remapped = if prefix_at_boundary(&full, prefix) {
                    let rest = &full[prefix.len()..];
                    match Reference::parse(&format!("{signed_prefix}{rest}")) {
                        Ok(r) => Named::of(&r),
                        Err(_) => return false,
                    }
                } else {
                    img
                };
                match_repo_digest_or_exact(&remapped, &signed)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Identity::MatchExact => "matchExact".into(),
            Identity::MatchRepoDigestOrExact => "matchRepoDigestOrExact".into(),
            Identity::MatchRepository => "matchRepository".into(),
            Identity::ExactReference(r) => format!("exactReference {r}"),
            Identity::ExactRepository(r) => format!("exactRepository {r}"),
            Identity::RemapIdentity {
                prefix,
                signed_prefix,
            } => format!("remapIdentity {prefix} -> {signed_prefix}"),
        }
    }
}

/// One sigstore signature as stored: the payload and its base64 signature.
#[derive(Debug, Clone)]
pub struct SigstoreSignature {
    pub payload: Vec<u8>,
    pub signature_b64: String,
}

/// The signatures found for one image.
#[derive(Debug, Clone, Default)]
pub struct Signatures {
    /// Simple-signing (OpenPGP) signatures, as stored.
    pub simple: Vec<Vec<u8>>,
    pub sigstore: Vec<SigstoreSignature>,
}

/// What evaluation needs of the image: its reference as pulled and its manifest digest
/// (sha256 of the top-level manifest bytes as fetched).
pub struct Image<'a> {
    pub reference: &'a Reference,
    pub manifest_digest: &'a str,
}

fn read_keys(requirement: &'static str, keys: &Keys) -> Result<Vec<(String, Vec<u8>)>, TrustError> {
    match keys {
        Keys::Data(d) => Ok(vec![("keyData".to_string(), d.clone())]),
        Keys::Paths(paths) => paths
            .iter()
            .map(|p| {
                crate::read_capped(p, crate::KEY_FILE_MAX)
                    .map(|b| (p.display().to_string(), b))
                    .map_err(|reason| TrustError::Key {
                        requirement,
                        key: p.display().to_string(),
                        reason,
                    })
            })
            .collect(),
    }
}

/// Checks a signature's claims against the image and the identity rule.
fn check_claims(c: &Claims, image: &Image<'_>, identity: &Identity) -> Result<(), String> {
    if c.manifest_digest != image.manifest_digest {
        return Err(format!(
            "signature is for manifest {}, not {}",
            c.manifest_digest, image.manifest_digest
        ));
    }
    if !identity.accepts(image.reference, &c.docker_reference) {
        return Err(format!(
            "signature is for {}, which {} does not accept for {}",
            c.docker_reference,
            identity.describe(),
            image.reference
        ));
    }
    Ok(())
}

/// Evaluates `requirements` (as [`Policy::for_docker`] chose them under `scope`) for
/// `image` with the signatures found for it. Every requirement must accept.
pub fn evaluate(
    requirements: &[Requirement],
    scope: &str,
    image: &Image<'_>,
    signatures: &Signatures,
) -> Result<(), TrustError> {
    let refused = |req: &Requirement, reason: String| TrustError::Refused {
        image: image.reference.to_string(),
        requirement: format!("{} (scope {scope})", req.type_name()),
        reason,
    };
    for req in requirements {
        match req {
            Requirement::InsecureAcceptAnything => {}
            Requirement::Reject => {
                return Err(refused(req, "the policy rejects this image".into()))
            }
            Requirement::SignedBaseLayer => {
                return Err(refused(
                    req,
                    "signedBaseLayer is not implemented (as in containers/image)".into(),
                ))
            }
            Requirement::SignedBy { keys, identity } => {
                let keyring = gpg::Keyring::load(&read_keys("signedBy", keys)?).map_err(
                    |(key, reason)| TrustError::Key {
                        requirement: "signedBy",
                        key,
                        reason,
                    },
                )?;
                if signatures.simple.is_empty() {
                    return Err(refused(
                        req,
                        "a signature was required, but no simple-signing signature exists".into(),
                    ));
                }
                let mut reasons = Vec::new();
                let mut ok = false;
                for (i, sig) in signatures.simple.iter().enumerate() {
                    let r = keyring
                        .verify(sig)
                        .and_then(|p| payload::parse(Format::SimpleSigning, &p))
                        .and_then(|c| check_claims(&c, image, identity));
                    match r {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(e) => reasons.push(format!("signature {}: {e}", i + 1)),
                    }
                }
                if !ok {
                    return Err(refused(req, reasons.join("; ")));
                }
            }
            Requirement::SigstoreSigned { keys, identity } => {
                let mut public = Vec::new();
                for (name, bytes) in read_keys("sigstoreSigned", keys)? {
                    public.push(sigstore::PublicKey::from_pem(&bytes).map_err(|reason| {
                        TrustError::Key {
                            requirement: "sigstoreSigned",
                            key: name.clone(),
                            reason,
                        }
                    })?);
                }
                if signatures.sigstore.is_empty() {
                    return Err(refused(
                        req,
                        "a signature was required, but no sigstore signature exists".into(),
                    ));
                }
                let mut reasons = Vec::new();
                let mut ok = false;
                for (i, sig) in signatures.sigstore.iter().enumerate() {
                    let r = public
                        .iter()
                        .find_map(|k| k.verify(&sig.payload, &sig.signature_b64).ok())
                        .ok_or_else(|| {
                            "does not verify with any key the policy names (another key, or altered)"
                                .to_string()
                        })
                        .and_then(|()| payload::parse(Format::Sigstore, &sig.payload))
                        .and_then(|c| check_claims(&c, image, identity));
                    match r {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(e) => reasons.push(format!("sigstore signature {}: {e}", i + 1)),
                    }
                }
                if !ok {
                    return Err(refused(req, reasons.join("; ")));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).expect("ref")
    }

    #[test]
    fn parses_and_refuses() {
        let p = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"signed.io":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k.gpg"}],"*.example.com":[{"type":"reject"}]}}}"#,
        )
        .expect("parse");
        let (list, scope) = p.for_docker(&r("signed.io/a/b:1"));
        assert_eq!(scope, "signed.io");
        assert_eq!(list[0].type_name(), "signedBy");
        let (list, scope) = p.for_docker(&r("x.example.com/a:1"));
        assert_eq!(
            (list[0].type_name(), scope.as_str()),
            ("reject", "*.example.com")
        );
        assert_eq!(p.for_docker(&r("other.io/a")).1, "default");
        // The transport's "" scope comes before the policy's default.
        let q = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"reject"}],"transports":{"docker":{"":[{"type":"insecureAcceptAnything"}],"a.io/x:1":[{"type":"reject"}]}}}"#,
        )
        .expect("parse");
        assert_eq!(
            q.for_docker(&r("b.io/y")).0,
            [Requirement::InsecureAcceptAnything]
        );
        assert_eq!(q.for_docker(&r("a.io/x:1")).1, "a.io/x:1");
        assert_eq!(q.for_docker(&r("a.io/x:2")).1, "docker \"\"");
        for bad in [
            "{",
            r#"{"default":[]}"#,
            r#"{"default":[{"type":"madeUp"}]}"#,
            r#"{"default":[{"type":"reject"}],"extra":1}"#,
            r#"{"default":[{"type":"signedBy","keyType":"GPGKeys"}]}"#,
            r#"{"default":[{"type":"signedBy","keyType":"X509Certificates","keyPath":"/k"}]}"#,
            r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k","keyData":"AA=="}]}"#,
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"/k","signedIdentity":{"type":"exactReference","dockerReference":"a.io/b"}}]}"#,
            r#"{"default":[{"type":"sigstoreSigned","fulcio":{}}]}"#,
        ] {
            assert!(Policy::parse("policy.json", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identities() {
        let tagged = r("r.io/ns/app:1");
        let by_digest = r(&format!("r.io/ns/app@sha256:{}", "a".repeat(64)));
        use Identity::*;
        assert!(MatchExact.accepts(&tagged, "r.io/ns/app:1"));
        assert!(!MatchExact.accepts(&tagged, "r.io/ns/app:2"));
        assert!(!MatchExact.accepts(&tagged, "r.io/ns/app"));
        assert!(MatchRepoDigestOrExact.accepts(&by_digest, "r.io/ns/app:any"));
        assert!(!MatchRepoDigestOrExact.accepts(&tagged, "r.io/ns/app:2"));
        assert!(MatchRepository.accepts(&tagged, "r.io/ns/app:9"));
        assert!(!MatchRepository.accepts(&tagged, "r.io/ns/other:1"));
        assert!(ExactReference("q.io/x:2".into()).accepts(&tagged, "q.io/x:2"));
        assert!(!ExactReference("q.io/x:2".into()).accepts(&tagged, "r.io/ns/app:1"));
        assert!(ExactRepository("q.io/x".into()).accepts(&tagged, "q.io/x:7"));
        let remap = RemapIdentity {
            prefix: "r.io/ns".into(),
            signed_prefix: "upstream.io/team".into(),
        };
        assert!(remap.accepts(&tagged, "upstream.io/team/app:1"));
        assert!(!remap.accepts(&tagged, "r.io/ns/app:1"));
        assert!(!remap.accepts(&r("r.io/nsx/app:1"), "upstream.io/team/app:1"));
    }
}
