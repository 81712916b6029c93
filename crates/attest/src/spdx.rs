//! The SPDX 2.3 JSON document of an image: one package for the image itself, which the
//! document describes and which contains one package per installed package (name,
//! version, architecture in the purl, supplier, declared license where the database gives
//! one) and one file per file no package owns (its SHA-1, as SPDX requires, and SHA-256,
//! with a comment saying so). Everything is sorted: the same image gives the same bytes.

use crate::scan::Inventory;
use crate::{Ecosystem, Package};
use serde_json::{json, Value};
use sha2::Digest as _;

/// What the document says of itself.
pub struct DocumentInfo<'a> {
    /// The image's name (or ID).
    pub name: &'a str,
    /// What makes the namespace unique (the image ID).
    pub id: &'a str,
    /// RFC 3339 (`SOURCE_DATE_EPOCH` when given, so two builds agree).
    pub created: &'a str,
    /// `isula-build-<version>`.
    pub tool: &'a str,
}

/// An SPDX ID: letters, digits, `.` and `-` only.
fn spdx_id(prefix: &str, name: &str, unique: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let h = hex::encode(sha2::Sha256::digest(unique.as_bytes()));
    format!("SPDXRef-{prefix}-{clean}-{}", &h[..16])
}

fn package(eco: Ecosystem, p: &Package, namespace: Option<&str>) -> Value {
    let purl = p.purl(eco, namespace);
    let mut v = json!({
        "name": p.name,
        "SPDXID": spdx_id(&format!("Package-{}", eco.purl_type()), &p.name, &purl),
        "versionInfo": p.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": purl,
        }],
    });
    if let Some(l) = &p.license {
        // A database's license text is not always an SPDX expression: it goes in as
        // declared only when it reads as one, else as a comment.
        if is_spdx_expression(l) {
            v["licenseDeclared"] = json!(l);
        } else {
            v["licenseComments"] = json!(format!("license as the package database gives it: {l}"));
        }
    }
    if let Some(s) = &p.supplier {
        v["supplier"] = json!(format!("Organization: {s}"));
    }
    if let Some(s) = &p.source {
        v["sourceInfo"] = json!(format!("built from source package {s}"));
    }
    v
}

/// Whether `l` looks like an SPDX license expression (identifiers, `AND`/`OR`/`WITH`,
/// parentheses).
fn is_spdx_expression(l: &str) -> bool {
    !l.trim().is_empty()
        && l.split_whitespace().all(|w| {
            let w = w.trim_matches(['(', ')']);
            if w.is_empty() || matches!(w, "AND" | "OR" | "WITH") {
                return true;
            }
            // Operators are upper-case: "zlib and Boost" is prose, not an expression.
            !["and", "or", "with"]
                .iter()
                .any(|op| w.eq_ignore_ascii_case(op))
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | ':'))
        })
}

/// The document, as compact JSON bytes.
pub fn document(inv: &Inventory, info: &DocumentInfo<'_>) -> Vec<u8> {
    let image_id = spdx_id("Image", info.name, info.id);
    let ns = inv.distro.as_deref();
    let mut pkgs: Vec<(&Ecosystem, &Package)> = inv.packages.iter().map(|(e, p)| (e, p)).collect();
    pkgs.sort_by(|a, b| {
        (a.0, &a.1.name, &a.1.version, &a.1.arch).cmp(&(b.0, &b.1.name, &b.1.version, &b.1.arch))
    });
    let mut packages = vec![json!({
        "name": info.name,
        "SPDXID": image_id,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
        "comment": format!("the image; package databases read: {}",
            if inv.databases.is_empty() { "none".to_string() } else { inv.databases.join(", ") }),
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    let mut seen = std::collections::HashSet::new();
    for (eco, p) in pkgs {
        let v = package(*eco, p, ns);
        let id = v["SPDXID"].as_str().unwrap_or_default().to_string();
        // Two identical entries (a database listing one package twice) are one package.
        if !seen.insert(id.clone()) {
            continue;
        }
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        packages.push(v);
    }
    let files: Vec<Value> = inv
        .unowned
        .iter()
        .map(|f| {
            let id = spdx_id("File", f.path.rsplit('/').next().unwrap_or(""), &f.path);
            relationships.push(json!({
                "spdxElementId": image_id,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
            json!({
                "fileName": f.path,
                "SPDXID": id,
                "checksums": [
                    {"algorithm": "SHA1", "checksumValue": f.sha1},
                    {"algorithm": "SHA256", "checksumValue": f.sha256},
                ],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "comment": "owned by no package",
            })
        })
        .collect();
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": info.name,
        "documentNamespace": format!("https://openeuler.org/isula-build/spdx/{}", info.id),
        "creationInfo": {
            "creators": [format!("Tool: {}", info.tool)],
            "created": info.created,
        },
        "packages": packages,
        "files": files,
        "relationships": relationships,
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The `(name, version)` of each installed package an SPDX document lists (the image's
/// own package left out), sorted: what a test compares with the package tool's list.
pub fn package_versions(doc: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = doc["packages"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|p| p["primaryPackagePurpose"] != "CONTAINER")
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["versionInfo"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::UnownedFile;

    fn inv() -> Inventory {
        Inventory {
            packages: vec![
                (
                    Ecosystem::Rpm,
                    Package {
                        name: "zlib".into(),
                        version: "1.2.13-1".into(),
                        arch: "x86_64".into(),
                        license: Some("zlib and Boost".into()),
                        ..Default::default()
                    },
                ),
                (
                    Ecosystem::Deb,
                    Package {
                        name: "bash".into(),
                        version: "5.2-1".into(),
                        arch: "amd64".into(),
                        license: Some("GPL-3.0-or-later".into()),
                        ..Default::default()
                    },
                ),
            ],
            databases: vec!["/var/lib/dpkg/status".into()],
            unowned: vec![UnownedFile {
                path: "/etc/stray".into(),
                sha1: "a".repeat(40),
                sha256: "b".repeat(64),
            }],
            distro: Some("debian".into()),
            distro_version: None,
        }
    }

    #[test]
    fn document_shape() {
        let info = DocumentInfo {
            name: "app:1",
            id: "abc",
            created: "2020-09-13T12:26:40Z",
            tool: "isula-build-0.1.0",
        };
        let bytes = document(&inv(), &info);
        assert_eq!(bytes, document(&inv(), &info), "the same bytes each time");
        let doc: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(
            package_versions(&doc),
            [
                ("bash".to_string(), "5.2-1".to_string()),
                ("zlib".into(), "1.2.13-1".into())
            ]
        );
        let bash = &doc["packages"][1];
        assert_eq!(bash["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(
            bash["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/bash@5.2-1?arch=amd64"
        );
        // "zlib and Boost" is no SPDX expression (lower-case "and"): a comment.
        assert_eq!(doc["packages"][2]["licenseDeclared"], "NOASSERTION");
        assert_eq!(doc["files"][0]["fileName"], "/etc/stray");
        assert_eq!(doc["files"][0]["comment"], "owned by no package");
        // Every package and file is contained by the image, which the document describes.
        assert_eq!(doc["relationships"].as_array().map(Vec::len), Some(4));
    }
}
