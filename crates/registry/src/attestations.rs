//! Attestations in and out of a registry, in BuildKit's layout: a push of an image that
//! has attestations sends the image manifest by digest, then one attestation manifest
//! (its statements made now, over the manifest as pushed), then an OCI image index of
//! both under the tag; a pull that picks an image from an index also takes the
//! attestation manifest the index has for it, keeping each statement's predicate.

use crate::client::Client;
use crate::error::{RegistryError, Result};
use crate::push::{put_manifest, send_blob, Pushed};
use isula_attest::intoto::{self, Predicate};
use isula_store::{AttestationRecord, ImageRecord, Store};
use isula_transport::{Cancel, Progress};
use isula_types::image::{Descriptor, ImageConfig, Index, Manifest, Platform};
use isula_types::{limits, media, Digest, ImageId, Reference};

/// The platform of a stored image, from its config.
pub fn platform_of(store: &Store, image: &ImageRecord) -> Result<Platform> {
    let raw = store
        .content()
        .read_small(image.id.digest(), limits::MANIFEST_MAX)?;
    let config: ImageConfig = serde_json::from_slice(&raw)
        .map_err(|e| RegistryError::Invalid(format!("config of image {}: {e}", image.id)))?;
    Ok(Platform {
        architecture: config.architecture,
        os: config.os,
        os_version: None,
        os_features: Vec::new(),
        variant: config.variant.filter(|v| !v.is_empty()),
    })
}

/// The stored predicates of an image.
pub fn predicates(store: &Store, id: &ImageId) -> Result<Vec<Predicate>> {
    store
        .attestations(id)
        .into_iter()
        .map(|a| {
            Ok(Predicate {
                predicate_type: a.predicate_type,
                body: store
                    .content()
                    .read_small(&a.blob, isula_attest::PREDICATE_MAX)?,
            })
        })
        .collect()
}

/// The package URLs a statement names the image by.
pub fn subject_names(dest: &Reference, platform: &Platform) -> Vec<String> {
    let text = crate::manifest_list::platform_text(platform);
    vec![intoto::image_purl(dest, &text)]
}

/// Sends the attestation manifest of `image` (pushed as `pushed`) to `repo`, by digest.
/// Returns its index entry, or None when the image has no attestations.
#[allow(clippy::too_many_arguments)]
pub fn push_attestations(
    store: &Store,
    client: &Client,
    image: &ImageRecord,
    pushed: &Pushed,
    names: &[String],
    repo: &str,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Option<Descriptor>> {
    let preds = predicates(store, &image.id)?;
    if preds.is_empty() {
        return Ok(None);
    }
    let att = intoto::attestation_manifest(&preds, names, &pushed.digest)
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    // The statements and config go through the content store, as every pushed blob does
    // (unnamed, they are collected after the push).
    let lease = store.lease();
    for (d, bytes) in att.statements.iter().chain([&att.config]) {
        lease.put_blob(store.content(), bytes)?;
        progress(format!("Copying attestation blob {}\n", d.digest));
        send_blob(client, store, repo, &d.digest, &[], cancel)?;
    }
    progress(format!("Writing attestation manifest {}\n", att.digest));
    put_manifest(
        client,
        repo,
        att.digest.as_str(),
        &att.manifest,
        media::OCI_MANIFEST,
    )?;
    drop(lease);
    Ok(Some(att.index_entry(&pushed.digest)))
}

/// An OCI image index of `images` (each with its platform) and then `attestations`.
pub fn index_bytes(images: Vec<Descriptor>, attestations: Vec<Descriptor>) -> Result<Vec<u8>> {
    let idx = Index {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_string()),
        manifests: images.into_iter().chain(attestations).collect(),
        annotations: None,
    };
    serde_json::to_vec_pretty(&idx)
        .map_err(|e| RegistryError::Invalid(format!("encoding image index: {e}")))
}

/// Fetches the attestation manifest `entry` (of the image manifest just pulled as image
/// `id`) and records its statements' predicates with the image. Returns how many.
#[allow(clippy::too_many_arguments)]
pub fn pull_attestations(
    store: &Store,
    client: &Client,
    repo: &str,
    entry: &Descriptor,
    subject: &Digest,
    id: &ImageId,
    cancel: &Cancel,
) -> Result<usize> {
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: format!("attestation manifest {repo}@{}", entry.digest),
        reason,
    };
    let fetched = crate::pull::get_manifest(client, repo, entry.digest.as_str())?;
    let manifest: Manifest =
        serde_json::from_slice(&fetched.bytes).map_err(|e| bad(e.to_string()))?;
    let lease = store.lease();
    let mut records = Vec::new();
    for layer in &manifest.layers {
        // Other attestation kinds are skipped, as BuildKit's layout says.
        if layer.media_type != intoto::IN_TOTO_MEDIA_TYPE {
            continue;
        }
        if layer.size > isula_attest::PREDICATE_MAX {
            return Err(bad(format!(
                "statement {} of {} bytes is over the limit of {}",
                layer.digest,
                layer.size,
                isula_attest::PREDICATE_MAX
            )));
        }
        crate::pull::fetch_blob(client, repo, layer, store, &lease, cancel)?;
        let bytes = store
            .content()
            .read_small(&layer.digest, isula_attest::PREDICATE_MAX)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("statement {}: {e}", layer.digest)))?;
        // A statement about another manifest is not this image's.
        let about = v["subject"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["digest"]["sha256"].as_str() == Some(subject.hex()));
        if !about {
            return Err(bad(format!(
                "statement {} is not about manifest {subject}",
                layer.digest
            )));
        }
        let p = intoto::predicate_of(&bytes).map_err(|e| bad(e.to_string()))?;
        let blob = lease.put_blob(store.content(), &p.body)?;
        records.push(AttestationRecord {
            predicate_type: p.predicate_type,
            size: p.body.len() as u64,
            blob,
        });
    }
    let n = records.len();
    // An attestation manifest with no statement of ours says nothing: what the store
    // already keeps for the image (say, from its build here) stays.
    if n > 0 {
        store.set_attestations(id, records)?;
    }
    drop(lease);
    Ok(n)
}
