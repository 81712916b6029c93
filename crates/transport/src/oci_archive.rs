//! oci-archive: a tar of an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`).
//! We write one image per archive, or the images of a manifest list as one image index;
//! we read every manifest its index lists (for an index of platforms, the one for this
//! machine).

use crate::archive::Scanned;
use crate::load::ImagePlan;
use crate::save::{append_blob, append_bytes, SaveItem};
use crate::{Cancel, Result, TransportError};
use isula_store::{ImageRecord, Store};
use isula_types::image::{host_architecture, Descriptor, Index, Manifest, Platform};
use isula_types::{limits, media, Digest, Reference};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// A small blob of the layout, checked against its descriptor.
fn small_blob<'a>(scanned: &'a Scanned, d: &Descriptor) -> Result<&'a [u8]> {
    let src = &scanned.source;
    let data = scanned
        .small(&blob_path(&d.digest))
        .ok_or_else(|| TransportError::bad(src, format!("blob {} is missing", d.digest)))?;
    let actual = Digest::of_bytes(data);
    if actual != d.digest || data.len() as u64 != d.size {
        return Err(TransportError::bad(
            src,
            format!(
                "blob {} does not match its descriptor (digest {actual}, {} bytes)",
                d.digest,
                data.len()
            ),
        ));
    }
    Ok(data)
}

fn names_of(d: &Descriptor) -> Vec<Reference> {
    let ann = d.annotations.clone().unwrap_or_default();
    ann.get(CONTAINERD_NAME)
        .or_else(|| ann.get(REF_NAME))
        .and_then(|n| {
            Reference::parse(n)
                .ok()
                .filter(|_| n.contains(':') || n.contains('/'))
        })
        .into_iter()
        .collect()
}

pub fn plans(scanned: &Scanned) -> Result<Vec<ImagePlan>> {
    let src = &scanned.source;
    let raw = scanned.small("index.json").ok_or_else(|| {
        TransportError::bad(
            src,
            format!(
                "index.json is over the limit of {} bytes",
                limits::MANIFEST_MAX
            ),
        )
    })?;
    let index: Index = serde_json::from_slice(raw)
        .map_err(|e| TransportError::bad(src, format!("index.json: {e}")))?;
    let mut plans = Vec::new();
    let mut attestations = attestations_of(scanned, &index.manifests)?;
    for desc in &index.manifests {
        // An attestation manifest (BuildKit's layout, what our builds with --sbom or
        // --provenance write beside the image) is no image to load.
        if isula_attest::intoto::attestation_target(desc).is_some() {
            continue;
        }
        let mut desc = desc.clone();
        let mut names = names_of(&desc);
        if desc.media_type == media::OCI_INDEX || desc.media_type == media::DOCKER_MANIFEST_LIST {
            let nested: Index = serde_json::from_slice(small_blob(scanned, &desc)?)
                .map_err(|e| TransportError::bad(src, format!("index {}: {e}", desc.digest)))?;
            let arch = host_architecture();
            let pick = nested
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or_else(|| {
                    TransportError::bad(
                        src,
                        format!("index {} has no linux/{arch} image", desc.digest),
                    )
                })?;
            desc = pick.clone();
            names.extend(names_of(&desc));
            attestations.extend(attestations_of(scanned, &nested.manifests)?);
        }
        let manifest_bytes = small_blob(scanned, &desc)?.to_vec();
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| TransportError::bad(src, format!("manifest {}: {e}", desc.digest)))?;
        let config = small_blob(scanned, &manifest.config)?.to_vec();
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let path = blob_path(&l.digest);
            let entry = scanned.layer(&path).ok_or_else(|| {
                TransportError::bad(src, format!("layer {} is missing", l.digest))
            })?;
            if entry.blob != l.digest || entry.blob_size != l.size {
                return Err(TransportError::bad(
                    src,
                    format!(
                        "layer {} does not match its descriptor (digest {}, {} bytes)",
                        l.digest, entry.blob, entry.blob_size
                    ),
                ));
            }
            layers.push(path);
        }
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| desc.media_type.clone());
        plans.push(ImagePlan {
            config,
            manifest: Some((manifest_bytes, media_type)),
            layers,
            names,
            attestations: attestations.remove(&desc.digest).unwrap_or_default(),
        });
    }
    Ok(plans)
}

/// The predicates of the attestation manifests among `entries`, by the manifest each is
/// about. A statement too big to be read as a small blob (over 4 MiB) is left out.
fn attestations_of(
    scanned: &Scanned,
    entries: &[Descriptor],
) -> Result<std::collections::HashMap<Digest, Vec<isula_attest::intoto::Predicate>>> {
    let src = &scanned.source;
    let mut out: std::collections::HashMap<Digest, Vec<_>> = Default::default();
    for e in entries {
        let Some(target) = isula_attest::intoto::attestation_target(e) else {
            continue;
        };
        let manifest: Manifest =
            serde_json::from_slice(small_blob(scanned, e)?).map_err(|err| {
                TransportError::bad(src, format!("attestation manifest {}: {err}", e.digest))
            })?;
        for l in &manifest.layers {
            if l.media_type != isula_attest::intoto::IN_TOTO_MEDIA_TYPE
                || scanned.small(&blob_path(&l.digest)).is_none()
            {
                continue;
            }
            let p = isula_attest::intoto::predicate_of(small_blob(scanned, l)?).map_err(|err| {
                TransportError::bad(src, format!("statement {}: {err}", l.digest))
            })?;
            out.entry(target.clone()).or_default().push(p);
        }
    }
    Ok(out)
}

fn oci_type(docker: &str) -> &str {
    match docker {
        media::DOCKER_CONFIG => media::OCI_CONFIG,
        media::DOCKER_LAYER => media::OCI_LAYER,
        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_GZIP,
        other => other,
    }
}

/// The image's manifest as an OCI manifest (converted from a Docker one), and its digest.
fn oci_manifest(store: &Store, img: &ImageRecord) -> Result<(Vec<u8>, Digest)> {
    let stored = store
        .content()
        .read_small(&img.manifest, limits::MANIFEST_MAX)?;
    let bytes = if img.manifest_media_type == media::OCI_MANIFEST {
        stored
    } else {
        let mut m: Manifest = serde_json::from_slice(&stored).map_err(|e| {
            TransportError::Invalid(format!("stored manifest {}: {e}", img.manifest))
        })?;
        m.media_type = Some(media::OCI_MANIFEST.to_string());
        m.config.media_type = oci_type(&m.config.media_type).to_string();
        for l in &mut m.layers {
            l.media_type = oci_type(&l.media_type).to_string();
        }
        serde_json::to_vec(&m).map_err(|e| TransportError::Invalid(e.to_string()))?
    };
    let digest = Digest::of_bytes(&bytes);
    Ok((bytes, digest))
}

/// Appends the image's layers, config and OCI manifest (what `seen` lacks; it gains them).
/// Returns the manifest's descriptor.
fn append_image<W: crate::ArchiveSink>(
    store: &Store,
    tar: &mut tar::Builder<W>,
    img: &ImageRecord,
    seen: &mut HashSet<Digest>,
    cancel: &Cancel,
) -> Result<Descriptor> {
    let (manifest_bytes, manifest_digest) = oci_manifest(store, img)?;
    for blob in &img.blobs {
        if seen.insert(blob.clone()) {
            append_blob(store, tar, &blob_path(blob), blob, None, cancel, 0)?;
        }
    }
    if seen.insert(img.id.digest().clone()) {
        let config = store
            .content()
            .read_small(img.id.digest(), limits::MANIFEST_MAX)?;
        append_bytes(tar, &blob_path(img.id.digest()), &config, 0)?;
    }
    if seen.insert(manifest_digest.clone()) {
        append_bytes(tar, &blob_path(&manifest_digest), &manifest_bytes, 0)?;
    }
    Ok(Descriptor::new(
        media::OCI_MANIFEST,
        manifest_digest,
        manifest_bytes.len() as u64,
    ))
}

/// The annotations that name an image (or index) in `index.json`.
fn name_annotations(tag: &Reference) -> BTreeMap<String, String> {
    let mut ann = BTreeMap::new();
    ann.insert(CONTAINERD_NAME.to_string(), tag.to_string());
    ann.insert(
        REF_NAME.to_string(),
        tag.tag().unwrap_or("latest").to_string(),
    );
    ann
}

/// An OCI image index over `manifests`, encoded.
fn index_bytes(manifests: Vec<Descriptor>) -> Result<Vec<u8>> {
    let index = Index {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_string()),
        manifests,
        annotations: None,
    };
    serde_json::to_vec(&index).map_err(|e| TransportError::Invalid(e.to_string()))
}

fn finish<W: Write>(mut tar: tar::Builder<W>, manifests: Vec<Descriptor>) -> Result<W> {
    append_bytes(&mut tar, "index.json", &index_bytes(manifests)?, 0)?;
    tar.into_inner()
        .map_err(|e| TransportError::io("write", "archive", e))
}

fn start<W: Write>(out: W) -> Result<tar::Builder<W>> {
    let mut tar = tar::Builder::new(out);
    append_bytes(
        &mut tar,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0,
    )?;
    Ok(tar)
}

/// The platform a stored image's config names.
fn platform_of(store: &Store, img: &ImageRecord) -> Result<Platform> {
    let raw = store
        .content()
        .read_small(img.id.digest(), limits::MANIFEST_MAX)?;
    let config: isula_types::image::ImageConfig = serde_json::from_slice(&raw)
        .map_err(|e| TransportError::Invalid(format!("config of image {}: {e}", img.id)))?;
    Ok(Platform {
        architecture: config.architecture,
        os: config.os,
        os_version: None,
        os_features: Vec::new(),
        variant: config.variant.filter(|v| !v.is_empty()),
    })
}

/// Appends the attestation manifest of `img` (whose manifest in the archive is
/// `subject`) and its blobs. Returns its index entry, None when the image has none.
fn append_attestations<W: Write>(
    store: &Store,
    tar: &mut tar::Builder<W>,
    img: &ImageRecord,
    subject: &Digest,
    names: &[Reference],
    platform: &Platform,
    seen: &mut HashSet<Digest>,
) -> Result<Option<Descriptor>> {
    let records = store.attestations(&img.id);
    if records.is_empty() {
        return Ok(None);
    }
    let mut preds = Vec::new();
    for r in records {
        preds.push(isula_attest::intoto::Predicate {
            predicate_type: r.predicate_type,
            body: store
                .content()
                .read_small(&r.blob, isula_attest::PREDICATE_MAX)?,
        });
    }
    let text = isula_types::image::platform_string(
        &platform.os,
        &platform.architecture,
        platform.variant.as_deref(),
    );
    let purls: Vec<String> = names
        .iter()
        .map(|n| isula_attest::intoto::image_purl(n, &text))
        .collect();
    let att = isula_attest::intoto::attestation_manifest(&preds, &purls, subject)
        .map_err(|e| TransportError::Invalid(e.to_string()))?;
    for (d, bytes) in att.statements.iter().chain([&att.config]) {
        if seen.insert(d.digest.clone()) {
            append_bytes(tar, &blob_path(&d.digest), bytes, 0)?;
        }
    }
    if seen.insert(att.digest.clone()) {
        append_bytes(tar, &blob_path(&att.digest), &att.manifest, 0)?;
    }
    Ok(Some(att.index_entry(subject)))
}

/// Writes an oci-archive of one image. Its attestations (if any) follow it in
/// `index.json` as BuildKit lays them out in an index (platform `unknown/unknown`,
/// `vnd.docker.reference.*` annotations, no ref name: tools that open the archive by its
/// ref name find the image alone).
pub fn write<W: crate::ArchiveSink>(
    store: &Store,
    item: &SaveItem,
    out: W,
    cancel: &Cancel,
) -> Result<W> {
    let mut tar = start(out)?;
    let mut seen = HashSet::new();
    let mut desc = append_image(store, &mut tar, &item.image, &mut seen, cancel)?;
    let mut manifests = Vec::new();
    if !store.attestations(&item.image.id).is_empty() {
        let platform = platform_of(store, &item.image)?;
        manifests.extend(append_attestations(
            store,
            &mut tar,
            &item.image,
            &desc.digest,
            &item.tags,
            &platform,
            &mut seen,
        )?);
        desc.platform = Some(platform);
    }
    if let Some(tag) = item.tags.first() {
        desc.annotations = Some(name_annotations(tag));
    }
    manifests.insert(0, desc);
    finish(tar, manifests)
}

/// Writes an oci-archive of several images as one OCI image index (a blob, with each
/// image's platform), which `index.json` names.
pub fn write_index<W: crate::ArchiveSink>(
    store: &Store,
    images: &[(ImageRecord, Platform)],
    name: Option<&Reference>,
    out: W,
    cancel: &Cancel,
) -> Result<W> {
    let mut tar = start(out)?;
    let mut seen = HashSet::new();
    let mut manifests = Vec::new();
    let mut attestations = Vec::new();
    let names: Vec<Reference> = name.cloned().into_iter().collect();
    for (img, platform) in images {
        let mut d = append_image(store, &mut tar, img, &mut seen, cancel)?;
        d.platform = Some(platform.clone());
        attestations.extend(append_attestations(
            store, &mut tar, img, &d.digest, &names, platform, &mut seen,
        )?);
        manifests.push(d);
    }
    // After every image, as BuildKit lists them.
    manifests.extend(attestations);
    let bytes = index_bytes(manifests)?;
    let digest = Digest::of_bytes(&bytes);
    append_bytes(&mut tar, &blob_path(&digest), &bytes, 0)?;
    let mut desc = Descriptor::new(media::OCI_INDEX, digest, bytes.len() as u64);
    if let Some(tag) = name {
        desc.annotations = Some(name_annotations(tag));
    }
    finish(tar, vec![desc])
}
