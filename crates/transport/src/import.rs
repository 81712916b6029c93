//! `ctr-img import`: a rootfs tarball (plain, gzip, bzip2, xz or zstd; at most 1 GiB as
//! given) becomes a one-layer image. The uncompressed tar is stored as the layer blob and
//! unpacked in the same pass.

use crate::archive::unpack_stream;
use crate::{copy_lines, Cancel, Guarded, Progress, Result, TransportError};
use isula_store::{LayerRecord, NewImage, Store, TeeReader};
use isula_types::image::{host_architecture, Descriptor, History, ImageConfig, Manifest, RootFs};
use isula_types::{limits, media, ChainId, DiffId, ImageId, Reference};
use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;

/// Imports the tarball at `source` as an image, tagged `reference` if given.
pub fn import(
    store: &Store,
    files: &dyn crate::ClientFiles,
    source: &Path,
    reference: Option<&Reference>,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<ImageId> {
    let file = files
        .open(source)
        .map_err(|e| TransportError::io("open", source, e))?;
    let meta = file
        .metadata()
        .map_err(|e| TransportError::io("stat", source, e))?;
    if !meta.is_file() {
        return Err(TransportError::bad(source, "not a regular file"));
    }
    if meta.len() > limits::IMPORT_MAX {
        return Err(TransportError::TooLarge {
            path: source.to_path_buf(),
            size: meta.len(),
            limit: limits::IMPORT_MAX,
        });
    }
    let lease = store.lease();
    let result = import_leased(store, file, source, reference, cancel, progress, &lease);
    drop(lease);
    if result.is_err() {
        // Whatever a failed import committed is garbage now.
        if let Err(e) = store.gc() {
            tracing::warn!(error = %e, "collecting after a failed import");
        }
    }
    result
}

fn import_leased(
    store: &Store,
    file: File,
    source: &Path,
    reference: Option<&Reference>,
    cancel: &Cancel,
    progress: Progress<'_>,
    lease: &isula_store::Lease,
) -> Result<ImageId> {
    let input = Guarded {
        inner: BufReader::with_capacity(1 << 20, file),
        cancel: cancel.clone(),
        remaining: limits::IMPORT_MAX,
    };
    let (_, plain) = isula_store::compression::decompress(input)
        .map_err(|e| TransportError::io("read", source, e))?;
    let mut writer = store.content().writer()?;
    let unpacked = {
        let mut tee = TeeReader {
            inner: plain,
            sink: &mut writer,
        };
        // The blob is the uncompressed tar: its digest, hashed by the writer, is the diff ID.
        let unpacked = unpack_stream(store, &mut tee, false);
        if cancel.is_cancelled() {
            return Err(TransportError::Cancelled);
        }
        let unpacked = unpacked.map_err(|e| TransportError::bad(source, e))?;
        io::copy(&mut tee, &mut io::sink()).map_err(|e| TransportError::io("read", source, e))?;
        unpacked
    };
    let (blob, blob_size) = lease.commit_blob(writer, None)?;
    // No gzip form now: the push that needs one makes it while it uploads, and keeps it
    // (see `Store::gzip_blob_streaming`).
    let unpacked = unpacked.with_diff_id(&blob);
    for dev in &unpacked.skipped_devices {
        progress(format!(
            "Skipped device node {dev}: devices are provided by the runtime\n"
        ));
    }
    let diff_id = DiffId(blob.clone());
    let chain = ChainId::next(None, &diff_id);
    if let Some(staged) = unpacked.staged {
        store.commit_layer(staged, &chain, lease)?;
    }
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let source_name = source
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let config = ImageConfig {
        created: Some(created.clone()),
        architecture: host_architecture().to_string(),
        os: "linux".to_string(),
        rootfs: RootFs {
            kind: "layers".to_string(),
            diff_ids: vec![diff_id.clone()],
        },
        history: vec![History {
            created: Some(created.clone()),
            created_by: Some("isula-build ctr-img import".to_string()),
            comment: Some(format!("imported from {source_name}")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let config_bytes =
        serde_json::to_vec(&config).map_err(|e| TransportError::Invalid(e.to_string()))?;
    let config_digest = lease.put_blob(store.content(), &config_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::DOCKER_MANIFEST.to_string()),
        config: Descriptor::new(
            media::DOCKER_CONFIG,
            config_digest.clone(),
            config_bytes.len() as u64,
        ),
        layers: vec![Descriptor::new(
            media::DOCKER_LAYER,
            blob.clone(),
            blob_size,
        )],
        annotations: None,
    };
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| TransportError::Invalid(e.to_string()))?;
    let manifest_digest = lease.put_blob(store.content(), &manifest_bytes)?;
    let id = ImageId(config_digest);
    cancel
        .check()
        .map_err(|e| TransportError::io("import", source, e))?;
    copy_lines(progress, std::slice::from_ref(&blob), id.digest());
    store.add_image(NewImage {
        id: id.clone(),
        manifest: manifest_digest,
        manifest_media_type: media::DOCKER_MANIFEST.to_string(),
        blobs: vec![blob],
        layers: vec![LayerRecord {
            chain_id: chain,
            diff_id,
            parent: None,
            size: blob_size,
        }],
        created: Some(created),
        names: reference.into_iter().cloned().collect(),
    })?;
    progress(format!("Import success with image id: \"{}\"\n", id.hex()));
    Ok(id)
}
