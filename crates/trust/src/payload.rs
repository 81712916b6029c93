//! The JSON a signature signs: `{"critical":{"identity":{"docker-reference":…},"image":
//! {"docker-manifest-digest":…},"type":…},"optional":{…}}`. Simple signing (OpenPGP) and
//! sigstore (cosign) use the same shape with different `type` strings. Parsing is strict
//! in `critical` (an unknown key there refuses the signature, as containers/image does)
//! and lenient in `optional`.

use serde_json::{json, Map, Value};

/// Which signature format a payload belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenPGP "simple signing" (`skopeo copy --sign-by`).
    SimpleSigning,
    /// Sigstore / cosign (`skopeo copy --sign-by-sigstore-private-key`).
    Sigstore,
}

impl Format {
    pub fn type_name(self) -> &'static str {
        match self {
            Format::SimpleSigning => "atomic container signature",
            Format::Sigstore => "cosign container image signature",
        }
    }
}

/// What a signature claims, once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub docker_reference: String,
    pub manifest_digest: String,
}

/// The payload to sign for `reference` (a full docker reference) and `digest`.
pub fn make(format: Format, reference: &str, digest: &str, timestamp: i64) -> Vec<u8> {
    let optional = json!({
        "creator": concat!("isula-build ", env!("CARGO_PKG_VERSION")),
        "timestamp": timestamp,
    });
    let v = json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": format.type_name(),
        },
        "optional": optional,
    });
    v.to_string().into_bytes()
}

fn exact_object<'a>(
    v: &'a Value,
    what: &str,
    keys: &[&str],
) -> Result<&'a Map<String, Value>, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{what} is not a JSON object"))?;
    for k in o.keys() {
        if !keys.contains(&k.as_str()) {
            return Err(format!("{what} has an unknown field {k:?}"));
        }
    }
    for k in keys {
        if !o.contains_key(*k) {
            return Err(format!("{what} lacks the field {k:?}"));
        }
    }
    Ok(o)
}

fn string<'a>(o: &'a Map<String, Value>, k: &str, what: &str) -> Result<&'a str, String> {
    o.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{what}.{k} is not a string"))
}

/// Reads a payload of `format`, refusing any other shape or type.
pub fn parse(format: Format, bytes: &[u8]) -> Result<Claims, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
    let top = v
        .as_object()
        .ok_or_else(|| "payload is not a JSON object".to_string())?;
    for k in top.keys() {
        if k != "critical" && k != "optional" {
            return Err(format!("payload has an unknown field {k:?}"));
        }
    }
    let critical = exact_object(
        top.get("critical").unwrap_or(&Value::Null),
        "critical",
        &["identity", "image", "type"],
    )?;
    let kind = string(critical, "type", "critical")?;
    if kind != format.type_name() {
        return Err(format!(
            "payload type {kind:?} is not {:?}",
            format.type_name()
        ));
    }
    let identity = exact_object(
        &critical["identity"],
        "critical.identity",
        &["docker-reference"],
    )?;
    let image = exact_object(
        &critical["image"],
        "critical.image",
        &["docker-manifest-digest"],
    )?;
    match top.get("optional") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => return Err("optional is not a JSON object".into()),
    }
    Ok(Claims {
        docker_reference: string(identity, "docker-reference", "critical.identity")?.to_string(),
        manifest_digest: string(image, "docker-manifest-digest", "critical.image")?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let p = make(Format::SimpleSigning, "r.io/a:1", "sha256:ab", 5);
        let c = parse(Format::SimpleSigning, &p).expect("parse");
        assert_eq!(c.docker_reference, "r.io/a:1");
        assert_eq!(c.manifest_digest, "sha256:ab");
        assert!(parse(Format::Sigstore, &p).is_err(), "type is checked");
        for bad in [
            r#"{"critical":{"identity":{"docker-reference":"a"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature","x":1}}"#,
            r#"{"critical":{"identity":{"docker-reference":"a"},"type":"atomic container signature"}}"#,
            r#"{"critical":{"identity":{"docker-reference":1},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"}}"#,
            r#"[]"#,
        ] {
            assert!(
                parse(Format::SimpleSigning, bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }
}
