//! docker-archive: the `docker save` format. A `manifest.json` listing, per image, its
//! config file, `RepoTags` and layer tars (uncompressed, as `docker load` expects).

use crate::archive::Scanned;
use crate::load::ImagePlan;
use crate::save::{append_blob, append_bytes, SaveItem};
use crate::{Cancel, Result, TransportError};
use isula_store::Store;
use isula_types::{limits, Reference};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The images a scanned docker-archive describes.
pub fn plans(scanned: &Scanned) -> Result<Vec<ImagePlan>> {
    let src = &scanned.source;
    let raw = scanned
        .small("manifest.json")
        .filter(|m| m.len() as u64 <= limits::ARCHIVE_MANIFEST_MAX);
    let Some(raw) = raw else {
        return Err(TransportError::bad(
            src,
            format!(
                "manifest.json is over the limit of {} bytes",
                limits::ARCHIVE_MANIFEST_MAX
            ),
        ));
    };
    let entries: Vec<ManifestEntry> = serde_json::from_slice(raw)
        .map_err(|e| TransportError::bad(src, format!("manifest.json: {e}")))?;
    let mut plans = Vec::new();
    for e in entries {
        let config = scanned
            .small(&e.config)
            .ok_or_else(|| TransportError::bad(src, format!("config {} is missing", e.config)))?
            .to_vec();
        let names = e
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| {
                Reference::parse(t)
                    .map_err(|err| TransportError::bad(src, format!("RepoTags: {err}")))
            })
            .collect::<Result<Vec<_>>>()?;
        plans.push(ImagePlan {
            config,
            manifest: None,
            layers: e.layers,
            names,
            attestations: Vec::new(),
        });
    }
    Ok(plans)
}

/// Writes a docker-archive of `items` (layers shared between images are written once).
pub fn write<W: crate::ArchiveSink>(
    store: &Store,
    items: &[SaveItem],
    out: W,
    cancel: &Cancel,
) -> Result<W> {
    let mut tar = tar::Builder::new(out);
    let mut written: HashSet<String> = HashSet::new();
    let mut manifest = Vec::new();
    for item in items {
        let img = &item.image;
        let config_name = format!("{}.json", img.id.hex());
        if written.insert(config_name.clone()) {
            let config = store
                .content()
                .read_small(img.id.digest(), limits::MANIFEST_MAX)?;
            append_bytes(&mut tar, &config_name, &config, 0)?;
        }
        let mut layers = Vec::new();
        for (chain, blob) in img.layers.iter().zip(&img.blobs) {
            let layer = store.layer(chain)?;
            let name = format!("{}.tar", layer.diff_id.hex());
            if written.insert(name.clone()) {
                append_blob(store, &mut tar, &name, blob, Some(&layer), cancel, 0)?;
            }
            layers.push(name);
        }
        manifest.push(ManifestEntry {
            config: config_name,
            repo_tags: Some(item.tags.iter().map(|t| t.familiar()).collect()),
            layers,
        });
    }
    let data = serde_json::to_vec(&manifest).map_err(|e| TransportError::Invalid(e.to_string()))?;
    append_bytes(&mut tar, "manifest.json", &data, 0)?;
    tar.into_inner()
        .map_err(|e| TransportError::io("write", "archive", e))
}
