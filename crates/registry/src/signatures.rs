//! Signatures on the wire and on disk, for `isula_trust` to judge: a pull gathers the
//! signatures policy.json asks for (simple signing from the lookaside storage
//! `registries.d` names, `file://` or `http(s)://`; sigstore from the `sha256-<hex>.sig`
//! attachment when `use-sigstore-attachments` is set, or from the lookaside) and has them
//! evaluated after the manifest is fetched and before anything is stored. A push stores the
//! signatures its client made: simple signing in the lookaside staging directory, sigstore
//! as an attachment. Registry credentials never go to a lookaside server.

use crate::client::{Client, Endpoint, Req};
use crate::error::{RegistryError, Result};
use crate::pull::{self, Fetched};
use crate::push;
use crate::Context;
use isula_trust::policy::{self, Requirement, Signatures, SigstoreSignature};
use isula_trust::{sigstore, SIGNATURES_MAX, SIGNATURE_MAX};
use isula_types::image::{Descriptor, Manifest};
use isula_types::{media, Digest, Reference};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use std::io::Read;

/// A lookaside blob starting with 0 is in containers/image's tagged format; this tag says
/// a sigstore signature follows as JSON.
const SIGSTORE_BLOB_PREFIX: &[u8] = b"\x00sigstore-json\n";

fn config_error(reason: String) -> RegistryError {
    RegistryError::Config(format!("registries.d: {reason}"))
}

/// Checks `name` (as pulled) against policy.json with the signatures found for its
/// top-level manifest `top`, fetched from `client`'s `repo`. Nothing is stored yet.
pub fn verify_pull(
    ctx: &Context,
    client: &Client,
    repo: &str,
    name: &Reference,
    top: &Fetched,
) -> Result<()> {
    let Some(policy) = &ctx.policy else {
        return Ok(());
    };
    let (reqs, scope) = policy.for_docker(name);
    if reqs
        .iter()
        .all(|r| matches!(r, Requirement::InsecureAcceptAnything))
    {
        return Ok(());
    }
    let digest = top.digest.to_string();
    let mut sigs = Signatures::default();
    if reqs.iter().any(Requirement::wants_signatures) {
        // A lookaside that does not answer is said with the rule that sent us there.
        read_lookaside(ctx, name, &digest, &mut sigs).map_err(|e| match e {
            RegistryError::Http {
                registry,
                what,
                reason,
            } => RegistryError::Http {
                registry,
                what: format!("{what} (which policy.json's scope {scope} requires)"),
                reason,
            },
            e => e,
        })?;
        let sigstore_wanted = reqs
            .iter()
            .any(|r| matches!(r, Requirement::SigstoreSigned { .. }));
        if sigstore_wanted && ctx.registries_d.use_sigstore_attachments(name) {
            read_attachments(client, repo, &digest, &mut sigs)?;
        }
    }
    let image = policy::Image {
        reference: name,
        manifest_digest: &digest,
    };
    policy::evaluate(reqs, &scope, &image, &sigs)?;
    if reqs.iter().any(Requirement::wants_signatures) {
        tracing::info!(image = %name, manifest = %digest, %scope, "signatures verified");
    }
    Ok(())
}

fn too_large(what: &str) -> RegistryError {
    RegistryError::BadContent {
        registry: "lookaside".into(),
        what: what.to_string(),
        reason: format!("signature larger than the limit of {SIGNATURE_MAX} bytes"),
    }
}

fn add_lookaside_blob(what: &str, blob: Vec<u8>, sigs: &mut Signatures) -> Result<()> {
    match blob.strip_prefix(SIGSTORE_BLOB_PREFIX) {
        Some(json) => {
            #[derive(serde::Deserialize)]
            struct Stored {
                payload: String,
                #[serde(default)]
                annotations: std::collections::BTreeMap<String, String>,
            }
            let s: Stored =
                serde_json::from_slice(json).map_err(|e| RegistryError::BadContent {
                    registry: "lookaside".into(),
                    what: what.to_string(),
                    reason: format!("sigstore signature: {e}"),
                })?;
            use base64::Engine as _;
            let payload = base64::engine::general_purpose::STANDARD
                .decode(&s.payload)
                .map_err(|e| RegistryError::BadContent {
                    registry: "lookaside".into(),
                    what: what.to_string(),
                    reason: format!("sigstore signature payload: {e}"),
                })?;
            sigs.sigstore.push(SigstoreSignature {
                payload,
                signature_b64: s
                    .annotations
                    .get(sigstore::SIGNATURE_ANNOTATION)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        // Another tagged format containers/image may add: not ours to read.
        None if blob.first() == Some(&0) => {}
        None => sigs.simple.push(blob),
    }
    Ok(())
}

/// Reads `signature-1`, `signature-2`, … of `name`'s lookaside until one is missing.
fn read_lookaside(
    ctx: &Context,
    name: &Reference,
    digest: &str,
    sigs: &mut Signatures,
) -> Result<()> {
    let loc = ctx.registries_d.lookaside(name).map_err(config_error)?;
    let at = loc.signature(name.path(), digest);
    match &loc {
        isula_trust::registries_d::Location::Dir(_) => {
            for i in 1..=SIGNATURES_MAX {
                let path = at(i);
                let file = std::path::Path::new(&path);
                let unreadable =
                    |e: String| RegistryError::Config(format!("lookaside signature {path}: {e}"));
                // The first missing index ends the list, as in containers/image.
                let size = match std::fs::metadata(file) {
                    Ok(m) => m.len(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(unreadable(e.to_string())),
                };
                if size > SIGNATURE_MAX {
                    return Err(too_large(&path));
                }
                let blob = isula_trust::read_capped(file, SIGNATURE_MAX).map_err(unreadable)?;
                add_lookaside_blob(&path, blob, sigs)?;
            }
        }
        isula_trust::registries_d::Location::Http(_) => {
            let mut client: Option<Client> = None;
            for i in 1..=SIGNATURES_MAX {
                let url = at(i);
                let parsed = reqwest::Url::parse(&url)
                    .map_err(|e| config_error(format!("lookaside URL {url:?}: {e}")))?;
                let host = match (parsed.host_str(), parsed.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_string(),
                    _ => return Err(config_error(format!("lookaside URL {url:?} has no host"))),
                };
                if client.is_none() {
                    // No credentials: the lookaside is not the registry.
                    client = Some(Client::new(
                        Endpoint {
                            host,
                            insecure: false,
                        },
                        None,
                        &ctx.certs_dir,
                        ctx.stall_timeout,
                    )?);
                }
                let Some(c) = &client else { break };
                let what = format!("signature {url}");
                let resp = c.send(
                    &Req::retryable(Method::GET, url.clone(), &[], what.clone()),
                    &Ok,
                )?;
                if resp.status() == StatusCode::NOT_FOUND {
                    break;
                }
                if !resp.status().is_success() {
                    return Err(c.status_error(&what, resp));
                }
                let mut blob = Vec::new();
                resp.take(SIGNATURE_MAX + 1)
                    .read_to_end(&mut blob)
                    .map_err(|e| c.http_error(&what, c.describe_io(&e)))?;
                if blob.len() as u64 > SIGNATURE_MAX {
                    return Err(too_large(&url));
                }
                add_lookaside_blob(&url, blob, sigs)?;
            }
        }
    }
    Ok(())
}

/// Reads the sigstore attachment of `digest` in `repo` (none: no signatures).
fn read_attachments(
    client: &Client,
    repo: &str,
    digest: &str,
    sigs: &mut Signatures,
) -> Result<()> {
    let tag = sigstore::attachment_tag(digest);
    let fetched = match pull::get_manifest(client, repo, &tag) {
        Ok(f) => f,
        Err(RegistryError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let what = format!("signature attachment {repo}:{tag}");
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: what.clone(),
        reason,
    };
    let m: Manifest = serde_json::from_slice(&fetched.bytes).map_err(|e| bad(e.to_string()))?;
    for layer in m
        .layers
        .iter()
        .filter(|l| l.media_type == sigstore::LAYER_MEDIA_TYPE)
        .take(SIGNATURES_MAX)
    {
        if layer.size > SIGNATURE_MAX {
            return Err(bad(format!(
                "payload {} larger than the limit of {SIGNATURE_MAX} bytes",
                layer.digest
            )));
        }
        let resp = pull::get_blob(client, repo, layer)?;
        let mut payload = Vec::new();
        resp.take(SIGNATURE_MAX + 1)
            .read_to_end(&mut payload)
            .map_err(|e| client.http_error(&what, client.describe_io(&e)))?;
        if Digest::of_bytes(&payload) != layer.digest {
            return Err(bad(format!(
                "payload {} does not match its digest",
                layer.digest
            )));
        }
        let signature_b64 = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(sigstore::SIGNATURE_ANNOTATION))
            .cloned()
            .unwrap_or_default();
        sigs.sigstore.push(SigstoreSignature {
            payload,
            signature_b64,
        });
    }
    Ok(())
}

/// The manifests a signed push of `digest` to `dest` signs: each image of a list and the
/// list itself (as `skopeo copy --all --sign-by` does, since a pull checks the image it
/// takes), or the one image.
pub fn digests_to_sign(ctx: &Context, dest: &Reference, digest: &Digest) -> Result<Vec<Digest>> {
    let endpoint = crate::resolve::push_endpoint(&ctx.registries, dest)?;
    let client = ctx.client(endpoint)?;
    let fetched = pull::get_manifest(&client, dest.path(), digest.as_str())?;
    let mut out = Vec::new();
    if media::manifest_kind(&fetched.media_type) == media::ManifestKind::List {
        let index: isula_types::image::Index =
            serde_json::from_slice(&fetched.bytes).map_err(|e| RegistryError::BadContent {
                registry: client.host().to_string(),
                what: format!("manifest list {}@{digest}", dest.path()),
                reason: e.to_string(),
            })?;
        out.extend(index.manifests.iter().map(|d| d.digest.clone()));
    }
    out.push(digest.clone());
    Ok(out)
}

/// A signature a client made for a push.
#[derive(Debug, Clone)]
pub enum NewSignature {
    /// An OpenPGP signed message.
    Simple(Vec<u8>),
    /// A sigstore payload and its base64 signature.
    Sigstore {
        payload: Vec<u8>,
        signature_b64: String,
    },
}

/// Before a signed push: refuses a destination with nowhere to put the signatures
/// (sigstore without `use-sigstore-attachments`, a staging URL that is not `file://`).
pub fn check_destination(
    ctx: &Context,
    dest: &Reference,
    simple: bool,
    sigstore: bool,
) -> Result<()> {
    if simple {
        ctx.registries_d.staging(dest).map_err(config_error)?;
    }
    if sigstore && !ctx.registries_d.use_sigstore_attachments(dest) {
        return Err(config_error(format!(
            "sigstore signatures of {dest} can only be stored as attachments: set use-sigstore-attachments: true for it"
        )));
    }
    Ok(())
}

/// Stores the signatures of `digest` pushed as `dest`: simple signing as `signature-1…`
/// in the staging directory (replacing what was there, as containers/image writes an
/// image's signatures), sigstore appended to the attachment.
pub fn store(ctx: &Context, dest: &Reference, digest: &Digest, new: &[NewSignature]) -> Result<()> {
    let simple: Vec<&Vec<u8>> = new
        .iter()
        .filter_map(|s| match s {
            NewSignature::Simple(b) => Some(b),
            NewSignature::Sigstore { .. } => None,
        })
        .collect();
    if !simple.is_empty() {
        let dir = ctx.registries_d.staging(dest).map_err(config_error)?;
        let loc = isula_trust::registries_d::Location::Dir(dir);
        let at = loc.signature(dest.path(), digest.as_str());
        for (i, blob) in simple.iter().enumerate() {
            write_atomic(std::path::Path::new(&at(i + 1)), blob)?;
        }
        let mut i = simple.len() + 1;
        while std::fs::remove_file(at(i)).is_ok() {
            i += 1;
        }
    }
    let sigstore: Vec<(&Vec<u8>, &String)> = new
        .iter()
        .filter_map(|s| match s {
            NewSignature::Sigstore {
                payload,
                signature_b64,
            } => Some((payload, signature_b64)),
            NewSignature::Simple(_) => None,
        })
        .collect();
    if !sigstore.is_empty() {
        check_destination(ctx, dest, false, true)?;
        let endpoint = crate::resolve::push_endpoint(&ctx.registries, dest)?;
        let client = ctx.client(endpoint)?;
        put_attachment(&client, dest.path(), digest, &sigstore)?;
    }
    Ok(())
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let fail = |e: std::io::Error| {
        RegistryError::Config(format!("writing signature {}: {e}", path.display()))
    };
    let dir = path
        .parent()
        .ok_or_else(|| RegistryError::Config(format!("signature path {}", path.display())))?;
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Uploads a small blob from memory (a signature payload, the attachment's config).
fn put_small_blob(client: &Client, repo: &str, bytes: &[u8]) -> Result<Digest> {
    let digest = Digest::of_bytes(bytes);
    let scopes = [push::scope_push(repo)];
    let what = format!("blob {digest} to {repo}");
    let head = client.send(
        &Req::retryable(
            Method::HEAD,
            format!("/v2/{repo}/blobs/{digest}"),
            &scopes,
            what.clone(),
        ),
        &Ok,
    )?;
    if head.status().is_success() {
        return Ok(digest);
    }
    let start = client.send(
        &Req::retryable(
            Method::POST,
            format!("/v2/{repo}/blobs/uploads/"),
            &scopes,
            what.clone(),
        ),
        &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
    )?;
    if start.status() != StatusCode::ACCEPTED {
        return Err(client.status_error(&what, start));
    }
    let url = push::with_digest(&push::location(client, &start, &what)?, &digest);
    let resp = client.send(&Req::once(Method::PUT, url, &scopes, what.clone()), &|rb| {
        Ok(rb
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec()))
    })?;
    if resp.status() != StatusCode::CREATED {
        return Err(client.status_error(&what, resp));
    }
    Ok(digest)
}

/// Adds signatures to the `sha256-<hex>.sig` attachment of `digest` (made if missing).
fn put_attachment(
    client: &Client,
    repo: &str,
    digest: &Digest,
    new: &[(&Vec<u8>, &String)],
) -> Result<()> {
    let tag = sigstore::attachment_tag(digest.as_str());
    let mut layers: Vec<Descriptor> = match pull::get_manifest(client, repo, &tag) {
        // An attachment we cannot read is not overwritten (its signatures would be lost).
        Ok(f) => serde_json::from_slice::<Manifest>(&f.bytes)
            .map(|m| m.layers)
            .map_err(|e| RegistryError::BadContent {
                registry: client.host().to_string(),
                what: format!("signature attachment {repo}:{tag}"),
                reason: format!("not an image manifest, left as it is: {e}"),
            })?,
        Err(RegistryError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    for (payload, sig) in new {
        let d = put_small_blob(client, repo, payload)?;
        let mut desc = Descriptor::new(sigstore::LAYER_MEDIA_TYPE, d, payload.len() as u64);
        desc.annotations = Some(
            [(sigstore::SIGNATURE_ANNOTATION.to_string(), (*sig).clone())]
                .into_iter()
                .collect(),
        );
        if !layers.contains(&desc) {
            layers.push(desc);
        }
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    let config = serde_json::json!({
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes();
    let config_digest = put_small_blob(client, repo, &config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_string()),
        config: Descriptor::new(media::OCI_CONFIG, config_digest, config.len() as u64),
        layers,
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| RegistryError::Invalid(format!("attachment manifest: {e}")))?;
    push::put_manifest(client, repo, &tag, &bytes, media::OCI_MANIFEST)?;
    Ok(())
}
