//! From a name the user typed to the places to fetch it from: short names expanded over the
//! search registries, `[[registry]]` prefix → location rewriting, mirrors first, blocked
//! registries refused, and policy.json consulted.

use crate::client::Endpoint;
use crate::error::{RegistryError, Result};
use crate::policy::{Policy, Requirement};
use crate::registries::{Registries, Registry};
use isula_types::Reference;

/// Whether `input` names no registry (its first component is not a host), so the search
/// registries apply.
pub fn is_short_name(input: &str) -> bool {
    match input.split_once('/') {
        None => true,
        Some((first, _)) => {
            !(first.contains(['.', ':']) || first == "localhost" || first.to_lowercase() != first)
        }
    }
}

/// The references a user's name may mean, in the order to try them.
pub fn candidates(regs: &Registries, input: &str) -> Result<Vec<Reference>> {
    let parse = |s: &str| {
        Reference::parse(s).map_err(|e| RegistryError::Invalid(format!("{input:?}: {e}")))
    };
    if !is_short_name(input) || regs.search.is_empty() {
        return Ok(vec![parse(input)?]);
    }
    let mut out = Vec::new();
    for host in &regs.search {
        out.push(parse(&format!("{host}/{input}"))?);
    }
    Ok(out)
}

fn prefix_matches(prefix: &str, name: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = name.split('/').next().unwrap_or_default();
        let host = host.split(':').next().unwrap_or_default();
        return host.ends_with(&format!(".{domain}"));
    }
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with(['/', ':', '@']))
}

/// The `[[registry]]` entry for a reference: the longest matching prefix.
pub fn registry_for<'a>(regs: &'a Registries, r: &Reference) -> Option<&'a Registry> {
    let full = r.to_string();
    regs.registries
        .iter()
        .filter(|e| prefix_matches(&e.prefix, &full))
        .max_by_key(|e| e.prefix.len())
}

/// One place to pull from: a registry host and the reference as that host names it.
#[derive(Debug, Clone)]
pub struct Source {
    pub endpoint: Endpoint,
    pub reference: Reference,
    pub mirror: bool,
}

fn rewrite(r: &Reference, prefix: &str, location: &str) -> Result<Reference> {
    let full = r.to_string();
    if prefix.starts_with("*.") || prefix == location {
        return Ok(r.clone());
    }
    let rest = full.strip_prefix(prefix).unwrap_or_default();
    Reference::parse(&format!("{location}{rest}")).map_err(|e| {
        RegistryError::Config(format!(
            "registries.toml: rewriting {full} with location {location:?}: {e}"
        ))
    })
}

fn host_insecure(regs: &Registries, host: &str) -> bool {
    regs.registries
        .iter()
        .any(|e| e.insecure && (e.prefix == host || e.location == host))
}

/// Where to pull `r` from, mirrors first.
pub fn pull_sources(regs: &Registries, r: &Reference) -> Result<Vec<Source>> {
    let Some(entry) = registry_for(regs, r) else {
        return Ok(vec![Source {
            endpoint: Endpoint {
                host: r.domain().to_string(),
                insecure: host_insecure(regs, r.domain()),
            },
            reference: r.clone(),
            mirror: false,
        }]);
    };
    if entry.blocked {
        return Err(RegistryError::Blocked(r.domain().to_string()));
    }
    let mut out = Vec::new();
    for m in &entry.mirrors {
        let reference = rewrite(r, &entry.prefix, &m.location)?;
        out.push(Source {
            endpoint: Endpoint {
                host: reference.domain().to_string(),
                insecure: m.insecure,
            },
            reference,
            mirror: true,
        });
    }
    let reference = rewrite(r, &entry.prefix, &entry.location)?;
    out.push(Source {
        endpoint: Endpoint {
            host: reference.domain().to_string(),
            insecure: entry.insecure,
        },
        reference,
        mirror: false,
    });
    Ok(out)
}

/// Where to push `r` (no mirrors, no rewriting: a push goes where the name says).
pub fn push_endpoint(regs: &Registries, r: &Reference) -> Result<Endpoint> {
    if let Some(entry) = registry_for(regs, r) {
        if entry.blocked {
            return Err(RegistryError::Blocked(r.domain().to_string()));
        }
        return Ok(Endpoint {
            host: r.domain().to_string(),
            insecure: entry.insecure || host_insecure(regs, r.domain()),
        });
    }
    Ok(Endpoint {
        host: r.domain().to_string(),
        insecure: host_insecure(regs, r.domain()),
    })
}

/// Whether policy.json lets images named `r` move through the `docker` transport at all,
/// before anything is fetched: the scope `Policy::for_docker` chooses, and any `reject` in
/// it refuses. Signature requirements are checked once the manifest is fetched
/// (`signatures::verify_pull`); pushes store signatures, they are not judged by them.
pub fn check_policy(policy: Option<&Policy>, r: &Reference) -> Result<()> {
    let Some(p) = policy else { return Ok(()) };
    let (list, _) = p.for_docker(r);
    if list.contains(&Requirement::Reject) {
        return Err(RegistryError::Rejected(r.to_string()));
    }
    Ok(())
}

/// supply chain: for what no signature covers (build-cache records read by
/// `--cache-from`): refused where policy.json rejects, and where it asks for signatures.
pub fn check_policy_unsigned(policy: Option<&Policy>, r: &Reference) -> Result<()> {
    check_policy(policy, r)?;
    let Some(p) = policy else { return Ok(()) };
    let (list, scope) = p.for_docker(r);
    if let Some(req) = list
        .iter()
        .find(|q| !matches!(q, Requirement::InsecureAcceptAnything | Requirement::Reject))
    {
        return Err(RegistryError::Config(format!(
            "policy.json requires a {} signature for {r} (scope {scope}); build-cache records are not signed images, so they are not read from there",
            req.type_name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(text: &str) -> Registries {
        Registries::parse("registries.toml", text).expect("parse")
    }

    #[test]
    fn short_names_and_search() {
        let r = regs("unqualified-search-registries = [\"a.io\", \"b.io:5000\"]\n");
        let c = candidates(&r, "busybox").expect("ok");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].to_string(), "a.io/busybox:latest");
        assert_eq!(c[1].to_string(), "b.io:5000/busybox:latest");
        assert_eq!(
            candidates(&r, "x.io/y").expect("ok")[0].to_string(),
            "x.io/y:latest"
        );
        assert_eq!(
            candidates(&Registries::default(), "busybox").expect("ok")[0].to_string(),
            "docker.io/library/busybox:latest"
        );
        assert!(is_short_name("library/busybox"));
        assert!(!is_short_name("localhost/busybox"));
    }

    #[test]
    fn mirrors_rewrite_and_block() {
        let r = regs(
            r#"
[[registry]]
prefix = "example.io/team"
location = "internal.io:5000/mirror/team"
insecure = true
[[registry.mirror]]
location = "m.io/cache"
[[registry]]
location = "bad.io"
blocked = true
"#,
        );
        let refr = Reference::parse("example.io/team/app:1").expect("ref");
        let s = pull_sources(&r, &refr).expect("sources");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].reference.to_string(), "m.io/cache/app:1");
        assert!(s[0].mirror && !s[0].endpoint.insecure);
        assert_eq!(
            s[1].reference.to_string(),
            "internal.io:5000/mirror/team/app:1"
        );
        assert!(s[1].endpoint.insecure);
        // A prefix only matches at a boundary.
        let other = Reference::parse("example.io/teamx/app").expect("ref");
        assert_eq!(pull_sources(&r, &other).expect("ok")[0].reference, other);
        let bad = Reference::parse("bad.io/x").expect("ref");
        assert!(matches!(
            pull_sources(&r, &bad),
            Err(RegistryError::Blocked(_))
        ));
        assert!(matches!(
            push_endpoint(&r, &bad),
            Err(RegistryError::Blocked(_))
        ));
    }

    #[test]
    fn policy_scopes() {
        let p = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"r.io/secret":[{"type":"reject"}]}}}"#,
        )
        .expect("policy");
        let no = Reference::parse("r.io/secret/x:1").expect("ref");
        let yes = Reference::parse("r.io/open:1").expect("ref");
        assert!(check_policy(Some(&p), &no).is_err());
        assert!(check_policy(Some(&p), &yes).is_ok());
        let signed = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k"}]}"#,
        )
        .expect("p");
        // Signatures are checked once fetched; a cache source is refused up front.
        assert!(check_policy(Some(&signed), &yes).is_ok());
        assert!(check_policy_unsigned(Some(&signed), &yes).is_err());
        assert!(check_policy_unsigned(Some(&p), &yes).is_ok());
        let all = Policy::parse("policy.json", r#"{"default":[{"type":"reject"}]}"#).expect("p");
        assert!(check_policy(Some(&all), &yes).is_err());
        assert!(check_policy(None, &yes).is_ok());
    }
}
