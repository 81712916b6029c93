//! `ctr-img load`: reads a docker-archive or oci-archive (told apart by its contents) in
//! one pass and records every image in it. Every digest and diff ID is verified; nothing is
//! recorded unless all of it checks out.

use crate::archive::{self, Scanned};
use crate::{
    copy_lines, docker_archive, oci_archive, Cancel, Guarded, Progress, Result, TransportError,
};
use isula_store::compression::Compression;
use isula_store::{LayerRecord, Lease, NewImage, Store, StoreError};
use isula_types::image::{Descriptor, ImageConfig, Manifest};
use isula_types::{limits, media, ChainId, Digest, ImageId, Reference};
use std::io::BufReader;
use std::path::Path;

/// One image found in an archive, before it is committed.
pub struct ImagePlan {
    pub config: Vec<u8>,
    /// An OCI archive's manifest, kept verbatim (docker-archives have none: we write one).
    pub manifest: Option<(Vec<u8>, String)>,
    /// Archive member names of the layers, bottom first.
    pub layers: Vec<String>,
    pub names: Vec<Reference>,
    /// The predicates of the attestation manifest an OCI archive has for the image.
    pub attestations: Vec<isula_attest::intoto::Predicate>,
}

pub struct Loaded {
    pub id: ImageId,
    pub names: Vec<Reference>,
}

/// Loads every image of the archive at `path`.
pub fn load(
    store: &Store,
    files: &dyn crate::ClientFiles,
    path: &Path,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Vec<Loaded>> {
    let file = files
        .open(path)
        .map_err(|e| TransportError::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| TransportError::io("stat", path, e))?
        .len();
    if size > limits::LOAD_MAX {
        return Err(TransportError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: limits::LOAD_MAX,
        });
    }
    // The archive's bytes as live progress, beside the text lines.
    let sink = std::cell::RefCell::new(progress);
    let mut events = |l: String| (*sink.borrow_mut())(l);
    let mut text = |l: String| (*sink.borrow_mut())(l);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let reader = crate::progress::Reporting::new(
        BufReader::with_capacity(1 << 20, file),
        &mut events,
        &name,
        "Loading",
        size,
    );
    load_stream(store, reader, path, cancel, &mut text)
}

/// Loads every image of the archive `reader` yields (`path` names it in errors).
pub fn load_stream<R: std::io::Read>(
    store: &Store,
    reader: R,
    path: &Path,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Vec<Loaded>> {
    let lease = store.lease();
    let result = load_leased(store, reader, path, cancel, progress, &lease);
    drop(lease);
    // Collect archive members that were not layers, or everything of a failed load.
    if let Err(e) = store.gc() {
        tracing::warn!(error = %e, "collecting after load");
    }
    result
}

fn load_leased<R: std::io::Read>(
    store: &Store,
    reader: R,
    path: &Path,
    cancel: &Cancel,
    progress: Progress<'_>,
    lease: &Lease,
) -> Result<Vec<Loaded>> {
    let reader = Guarded {
        inner: reader,
        cancel: cancel.clone(),
        remaining: limits::LOAD_MAX,
    };
    let phase = isula_store::phase::Phase::start("load: read, store and unpack the archive");
    let mut scanned = archive::scan(store, reader, path, lease)?;
    drop(phase);
    let plans = if scanned.contains("manifest.json") {
        docker_archive::plans(&scanned)?
    } else if scanned.contains("index.json") && scanned.contains("oci-layout") {
        oci_archive::plans(&scanned)?
    } else {
        return Err(TransportError::bad(
            path,
            "neither a docker-archive (no manifest.json) nor an oci-archive (no index.json and oci-layout)",
        ));
    };
    if plans.is_empty() {
        return Err(TransportError::bad(path, "archive holds no image"));
    }
    // Verify everything before recording anything.
    let _phase = isula_store::phase::Phase::start("load: verify and record");
    let mut ready = Vec::new();
    for mut plan in plans {
        let attestations = std::mem::take(&mut plan.attestations);
        ready.push((prepare(store, &mut scanned, plan, lease)?, attestations));
    }
    for dev in scanned.skipped_devices() {
        progress(format!(
            "Skipped device node {dev}: devices are provided by the runtime\n"
        ));
    }
    let mut out = Vec::new();
    for ((new, blobs), attestations) in ready {
        cancel
            .check()
            .map_err(|e| TransportError::io("load", path, e))?;
        copy_lines(progress, &blobs, new.id.digest());
        let loaded = Loaded {
            id: new.id.clone(),
            names: new.names.clone(),
        };
        let chains: Vec<ChainId> = new.layers.iter().map(|l| l.chain_id.clone()).collect();
        store.add_image(new)?;
        if !attestations.is_empty() {
            let mut records = Vec::new();
            for p in &attestations {
                records.push(isula_store::AttestationRecord {
                    predicate_type: p.predicate_type.clone(),
                    blob: lease.put_blob(store.content(), &p.body)?,
                    size: p.body.len() as u64,
                });
            }
            store.set_attestations(&loaded.id, records)?;
            progress(format!(
                "Loaded {} attestations of {}\n",
                attestations.len(),
                loaded.id.hex()
            ));
        }
        // When the machine is idle: the directories a build needs. No gzip form: a loaded
        // image is seldom pushed, and a push makes it while it uploads.
        for c in &chains {
            if !store.layer_unpacked(c) {
                store.queue_unpack(c);
            }
        }
        progress(format!("Loaded image as {}\n", loaded.id.hex()));
        out.push(loaded);
    }
    Ok(out)
}

fn layer_media_type(c: Compression, oci: bool) -> &'static str {
    match (c, oci) {
        (Compression::Gzip, false) => media::DOCKER_LAYER_GZIP,
        (Compression::Gzip, true) => media::OCI_LAYER_GZIP,
        (Compression::Zstd, _) => media::OCI_LAYER_ZSTD,
        (_, false) => media::DOCKER_LAYER,
        (_, true) => media::OCI_LAYER,
    }
}

/// Checks one image against what the scan found, commits its layers and small blobs
/// (leased), and returns the record to add plus the layer blobs for the progress lines.
fn prepare(
    store: &Store,
    scanned: &mut Scanned,
    plan: ImagePlan,
    lease: &Lease,
) -> Result<(NewImage, Vec<Digest>)> {
    let src = scanned.source.clone();
    let config: ImageConfig = serde_json::from_slice(&plan.config)
        .map_err(|e| TransportError::bad(&src, format!("image config: {e}")))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != plan.layers.len() {
        return Err(TransportError::bad(
            &src,
            format!(
                "config lists {} layers, manifest {}",
                diff_ids.len(),
                plan.layers.len()
            ),
        ));
    }
    let chains = ChainId::chain(diff_ids);
    let mut records = Vec::new();
    let mut blobs = Vec::new();
    let mut descriptors = Vec::new();
    let oci_manifest = plan.manifest.is_some()
        || plan.layers.iter().any(|l| {
            scanned
                .layer(l)
                .is_some_and(|e| e.compression == Compression::Zstd)
        });
    for (i, path) in plan.layers.iter().enumerate() {
        let entry = scanned.layer(path).ok_or_else(|| {
            TransportError::bad(
                &src,
                format!("layer {path} is missing or not a tar archive"),
            )
        })?;
        let unpacked = entry
            .unpacked
            .as_ref()
            .map_err(|reason| TransportError::bad(&src, format!("layer {path}: {reason}")))?;
        if unpacked.diff_id != diff_ids[i] {
            return Err(StoreError::DiffIdMismatch {
                expected: diff_ids[i].clone(),
                actual: unpacked.diff_id.clone(),
            }
            .into());
        }
        let (blob, blob_size, compression, size) = (
            entry.blob.clone(),
            entry.blob_size,
            entry.compression,
            unpacked.size,
        );
        let chain = &chains[i];
        // Leased before it is looked at: a collection running now either sees the lease or
        // has finished before the look (a layer found, then collected, fails the load).
        lease.layer(chain);
        if !store.layer_present(chain) {
            // Checked and stored, not unpacked: a build makes its directory.
            store.commit_packed_layer(chain, &blob, lease)?;
        }
        records.push(LayerRecord {
            chain_id: chain.clone(),
            diff_id: diff_ids[i].clone(),
            parent: i.checked_sub(1).map(|p| chains[p].clone()),
            size,
        });
        descriptors.push(Descriptor::new(
            layer_media_type(compression, oci_manifest),
            blob.clone(),
            blob_size,
        ));
        blobs.push(blob);
    }
    let config_digest = lease.put_blob(store.content(), &plan.config)?;
    let id = ImageId(config_digest.clone());
    let (manifest_bytes, manifest_type) = match plan.manifest {
        Some((bytes, media_type)) => (bytes, media_type),
        None => {
            let media_type = if oci_manifest {
                media::OCI_MANIFEST
            } else {
                media::DOCKER_MANIFEST
            };
            let config_type = if oci_manifest {
                media::OCI_CONFIG
            } else {
                media::DOCKER_CONFIG
            };
            let m = Manifest {
                schema_version: 2,
                media_type: Some(media_type.to_string()),
                config: Descriptor::new(config_type, config_digest, plan.config.len() as u64),
                layers: descriptors,
                annotations: None,
            };
            let bytes =
                serde_json::to_vec(&m).map_err(|e| TransportError::bad(&src, e.to_string()))?;
            (bytes, media_type.to_string())
        }
    };
    let manifest = lease.put_blob(store.content(), &manifest_bytes)?;
    Ok((
        NewImage {
            id,
            manifest,
            manifest_media_type: manifest_type,
            blobs: blobs.clone(),
            layers: records,
            created: config.created.clone(),
            names: plan.names,
        },
        blobs,
    ))
}
