//! in-toto statements and BuildKit's layout for them: each attestation is a statement
//! (`_type`, `subject` = the image manifest by digest under the image's package URLs,
//! `predicateType`, `predicate`), a layer (`application/vnd.in-toto+json`, annotated with
//! its predicate type) of one attestation manifest per image manifest, which the image
//! index lists after the images with platform `unknown/unknown` and the annotations
//! `vnd.docker.reference.type: attestation-manifest` and `vnd.docker.reference.digest`.
//! The manifest's config is the image config BuildKit writes for it (unknown platform,
//! the statements as its layers), so registries and tools that expect an image take it.

use crate::{AttestError, Result};
use isula_types::image::{Descriptor, Manifest, Platform};
use isula_types::{media, Digest};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";

/// One stored attestation: its predicate type and the predicate's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    pub predicate_type: String,
    pub body: Vec<u8>,
}

/// The package URL an image goes by in a statement's subject (as BuildKit names it):
/// `pkg:docker/NAMESPACE/NAME@TAG?platform=OS%2FARCH`.
pub fn image_purl(reference: &isula_types::Reference, platform: &str) -> String {
    let path = reference.familiar_name();
    let version = match reference.digest() {
        Some(d) => d.to_string(),
        None => reference.tag().unwrap_or("latest").to_string(),
    };
    let path: Vec<String> = path.split('/').map(crate::purl_escape).collect();
    format!(
        "pkg:docker/{}@{}?platform={}",
        path.join("/"),
        crate::purl_escape(&version),
        crate::purl_escape(platform)
    )
}

/// A statement over the image manifest `subject` (`names`: the image's package URLs; none
/// gives BuildKit's `_`).
pub fn statement(predicate: &Predicate, names: &[String], subject: &Digest) -> Result<Vec<u8>> {
    let body: Value = serde_json::from_slice(&predicate.body)
        .map_err(|e| AttestError::BadAttestation(format!("predicate: {e}")))?;
    let names: Vec<&str> = if names.is_empty() {
        vec!["_"]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let subjects: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "digest": {"sha256": subject.hex()}}))
        .collect();
    let v = json!({
        "_type": STATEMENT_TYPE,
        "predicateType": predicate.predicate_type,
        "subject": subjects,
        "predicate": body,
    });
    serde_json::to_vec(&v).map_err(|e| AttestError::BadAttestation(e.to_string()))
}

/// The predicate of a statement (its type and its JSON, compact).
pub fn predicate_of(statement: &[u8]) -> Result<Predicate> {
    let v: Value = serde_json::from_slice(statement)
        .map_err(|e| AttestError::BadAttestation(format!("statement: {e}")))?;
    let ty = v["predicateType"]
        .as_str()
        .ok_or_else(|| AttestError::BadAttestation("statement without predicateType".into()))?;
    if v.get("predicate").is_none() {
        return Err(AttestError::BadAttestation(format!(
            "{ty} statement without a predicate"
        )));
    }
    Ok(Predicate {
        predicate_type: ty.to_string(),
        body: serde_json::to_vec(&v["predicate"])
            .map_err(|e| AttestError::BadAttestation(e.to_string()))?,
    })
}

/// The blobs of an attestation manifest: the statements, the config, the manifest itself.
pub struct AttestationManifest {
    pub statements: Vec<(Descriptor, Vec<u8>)>,
    pub config: (Descriptor, Vec<u8>),
    pub manifest: Vec<u8>,
    pub digest: Digest,
}

/// The attestation manifest of `predicates` for the image manifest `subject`.
pub fn attestation_manifest(
    predicates: &[Predicate],
    names: &[String],
    subject: &Digest,
) -> Result<AttestationManifest> {
    let mut statements = Vec::new();
    for p in predicates {
        let bytes = statement(p, names, subject)?;
        let mut d = Descriptor::new(
            IN_TOTO_MEDIA_TYPE,
            Digest::of_bytes(&bytes),
            bytes.len() as u64,
        );
        d.annotations = Some(BTreeMap::from([(
            PREDICATE_TYPE_ANNOTATION.to_string(),
            p.predicate_type.clone(),
        )]));
        statements.push((d, bytes));
    }
    let diff_ids: Vec<&str> = statements.iter().map(|(d, _)| d.digest.as_str()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .map_err(|e| AttestError::BadAttestation(e.to_string()))?;
    let config_desc = Descriptor::new(
        media::OCI_CONFIG,
        Digest::of_bytes(&config),
        config.len() as u64,
    );
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_string()),
        config: config_desc.clone(),
        layers: statements.iter().map(|(d, _)| d.clone()).collect(),
        annotations: None,
    };
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| AttestError::BadAttestation(e.to_string()))?;
    Ok(AttestationManifest {
        statements,
        config: (config_desc, config),
        digest: Digest::of_bytes(&bytes),
        manifest: bytes,
    })
}

impl AttestationManifest {
    /// Its entry in an image index, after the image `subject`'s.
    pub fn index_entry(&self, subject: &Digest) -> Descriptor {
        let mut d = Descriptor::new(
            media::OCI_MANIFEST,
            self.digest.clone(),
            self.manifest.len() as u64,
        );
        d.annotations = Some(BTreeMap::from([
            (REFERENCE_DIGEST.to_string(), subject.to_string()),
            (REFERENCE_TYPE.to_string(), ATTESTATION_MANIFEST.to_string()),
        ]));
        d.platform = Some(Platform {
            architecture: "unknown".into(),
            os: "unknown".into(),
            os_version: None,
            os_features: Vec::new(),
            variant: None,
        });
        d
    }
}

/// Whether an index entry is an attestation manifest, and of which manifest.
pub fn attestation_target(d: &Descriptor) -> Option<Digest> {
    let a = d.annotations.as_ref()?;
    if a.get(REFERENCE_TYPE).map(String::as_str) != Some(ATTESTATION_MANIFEST) {
        return None;
    }
    Digest::parse(a.get(REFERENCE_DIGEST)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_round_trip() {
        let p = Predicate {
            predicate_type: crate::SPDX_PREDICATE.into(),
            body: br#"{"spdxVersion":"SPDX-2.3","packages":[]}"#.to_vec(),
        };
        let subject = Digest::of_bytes(b"manifest");
        let r = isula_types::Reference::parse("localhost:5000/app:1").expect("ref");
        let names = vec![image_purl(&r, "linux/amd64")];
        assert_eq!(
            names[0],
            "pkg:docker/localhost:5000/app@1?platform=linux%2Famd64"
        );
        let m = attestation_manifest(std::slice::from_ref(&p), &names, &subject).expect("make");
        let (d, bytes) = &m.statements[0];
        assert_eq!(d.media_type, IN_TOTO_MEDIA_TYPE);
        let v: Value = serde_json::from_slice(bytes).expect("json");
        assert_eq!(v["subject"][0]["digest"]["sha256"], subject.hex());
        assert_eq!(predicate_of(bytes).expect("parse"), p);
        let e = m.index_entry(&subject);
        assert_eq!(attestation_target(&e), Some(subject));
        assert_eq!(e.platform.as_ref().map(|p| p.os.as_str()), Some("unknown"));
        assert!(predicate_of(b"{\"predicateType\":\"x\"}").is_err());
        assert!(predicate_of(b"nonsense").is_err());
    }
}
