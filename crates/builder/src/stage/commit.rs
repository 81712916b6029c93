//! The end of a stage: its one layer (the squash of its step snapshots) or the recorded
//! result of an earlier identical stage, and the final image.

use super::*;

impl StageRun<'_, '_> {
    /// Unmounts and turns the upper directory into the stage's layer.
    /// The stage's committed result recorded under `key`, if every part is still there.
    pub(super) fn cached_stage(&mut self, key: &Digest) -> Result<Option<StageResult>, BuildError> {
        let store = self.ctx.store;
        let mut found = store.cache().get(key, self.lease);
        if found.is_none() {
            if let Some(remote) = self.ctx.remote {
                if remote.lookup(key).is_some_and(|r| r.stage) {
                    remote
                        .import(key, self.lease)
                        .map_err(BuildError::CacheSource)?;
                    found = store.cache().get(key, self.lease);
                }
            }
        }
        let Some(stage) = found.and_then(|r| r.stage) else {
            return Ok(None);
        };
        // Damage from outside (a layer directory deleted by hand): build it again.
        if !store.cache_stage_whole(&stage) {
            return Ok(None);
        }
        let raw = store
            .content()
            .read_small(&stage.config, limits::MANIFEST_MAX)?;
        let config: ImageConfig = serde_json::from_slice(&raw).map_err(|e| {
            BuildError::Invalid(format!("cached stage config {}: {e}", stage.config))
        })?;
        self.cache_keys.push(key.clone());
        Ok(Some(StageResult {
            config,
            layers: stage.layers,
            blobs: stage.blobs,
            key: key.clone(),
        }))
    }

    /// Squashes the stage's step snapshots into its one layer (the manual: one commit per
    /// stage), or reuses the recorded result when every step came from the cache.
    pub(super) fn commit(&mut self) -> Result<StageResult, BuildError> {
        self.rootfs = None;
        if let Some(m) = self.mount.take() {
            m.unmount()
                .map_err(|e| BuildError::Invalid(format!("unmounting the stage rootfs: {e}")))?;
        }
        let mut k = KeyBuilder::new("commit", Some(&self.key));
        k.json("build_time", &self.opts.build_time);
        let key = k.finish();
        if self.hitting {
            if let Some(r) = self.cached_stage(&key)? {
                return Ok(r);
            }
        }
        let store = self.ctx.store;
        let mut layers = self.base_layers.clone();
        let mut blobs = self.base_blobs.clone();
        let mut config = self.config.clone();
        let mut new_layer_size = 0;
        // One step wrote the stage's layer as a tar: that is the layer.
        if let [Snapshot {
            packed: Some(p), ..
        }] = self.snaps.as_slice()
        {
            let p = p.clone();
            if !p.recorded {
                new_layer_size = p.layer.size;
            }
            self.add_layer(&mut layers, &mut blobs, &mut config, p.layer, p.blob);
            return self.finish_commit(key, config, layers, blobs, new_layer_size);
        }
        self.fetch_pending()?;
        let upper = if self.snaps.is_empty() {
            None
        } else {
            // Whiteouts and opaque markers only stay where the base has the path.
            let view = self.dir.join("base-view");
            let empty_dir = self.dir.join("base-view-empty");
            for d in [&view, &empty_dir] {
                std::fs::create_dir_all(d)
                    .map_err(|e| isula_store::StoreError::io("create", d, e))?;
            }
            let guard = if self.base_lowers.is_empty() {
                None
            } else {
                Some(
                    mount_overlay_ro(&self.base_lowers, &view, &empty_dir).map_err(|e| {
                        BuildError::Invalid(format!("mounting the stage base: {e}"))
                    })?,
                )
            };
            let t = std::time::Instant::now();
            let phase = isula_store::phase::Phase::start("commit: squash the step snapshots");
            let base = guard.as_ref().map(|_| view.as_path());
            let count = self.snaps.len();
            // One snapshot of this build's own (not the cache's) is the layer itself.
            let own = match self.snaps.as_mut_slice() {
                [one] => one.staged.take(),
                _ => None,
            };
            let staged = match own {
                Some(own) => store.squash_one(own, base)?,
                None => {
                    let stack: Vec<&Path> =
                        self.snaps.iter().rev().map(|s| s.dir.as_path()).collect();
                    store.squash(&stack, base)?
                }
            };
            drop(phase);
            tracing::debug!(elapsed = ?t.elapsed(), snapshots = count, "stage squashed");
            drop(guard);
            isula_store::failpoint::hit("commit.squashed");
            Some(staged)
        };
        let empty = upper.as_ref().is_none_or(|u| {
            std::fs::read_dir(u.diff_dir())
                .map(|mut d| d.next().is_none())
                .unwrap_or(true)
        });
        if let (false, Some(upper)) = (empty, upper) {
            let t = std::time::Instant::now();
            let (diff, chain, size) = store.commit_built_layer(
                upper,
                layers.last().map(|l| &l.chain_id),
                self.opts.build_time,
                self.lease,
            )?;
            tracing::debug!(elapsed = ?t.elapsed(), size, "stage layer committed");
            new_layer_size = size;
            let blob = diff.0.clone();
            let layer = LayerRecord {
                parent: layers.last().map(|l| l.chain_id.clone()),
                chain_id: chain,
                diff_id: diff,
                size,
            };
            self.add_layer(&mut layers, &mut blobs, &mut config, layer, blob);
        }
        self.finish_commit(key, config, layers, blobs, new_layer_size)
    }

    /// Puts the stage's own layer on its base: its blob, its diff ID in the config, and
    /// its history entry (the last step that changed files) says it made a layer.
    fn add_layer(
        &mut self,
        layers: &mut Vec<LayerRecord>,
        blobs: &mut Vec<Digest>,
        config: &mut ImageConfig,
        layer: LayerRecord,
        blob: Digest,
    ) {
        blobs.push(blob);
        config.rootfs.kind = "layers".into();
        config.rootfs.diff_ids.push(layer.diff_id.clone());
        layers.push(layer);
        let at = self
            .last_fs_step
            .unwrap_or(self.history.len().saturating_sub(1));
        if let Some(h) = self.history.get_mut(at) {
            h.empty_layer = false;
        }
    }

    /// The stage's config completed (time, platform, history) and its result recorded
    /// under `key` (cache on).
    fn finish_commit(
        &mut self,
        key: Digest,
        mut config: ImageConfig,
        layers: Vec<LayerRecord>,
        blobs: Vec<Digest>,
        new_layer_size: u64,
    ) -> Result<StageResult, BuildError> {
        let store = self.ctx.store;
        config.created = Some(now_rfc3339(self.opts.build_time));
        if config.architecture.is_empty() {
            config.architecture = self.platform.architecture.clone();
            config.variant = self.platform.variant.clone();
        }
        if config.os.is_empty() {
            config.os = "linux".into();
        }
        config.history = self.history.clone();
        if self.opts.cache != CacheMode::Off {
            let bytes =
                serde_json::to_vec(&config).map_err(|e| BuildError::Invalid(e.to_string()))?;
            let config_blob = self.lease.put_blob(store.content(), &bytes)?;
            let record = Record {
                stage: Some(StageRecord {
                    config: config_blob,
                    layers: layers.clone(),
                    blobs: blobs.clone(),
                }),
                size: new_layer_size,
                ..Record::new(&self.key, &format!("stage {} result", self.index))
            };
            store.cache().put(&key, record)?;
            isula_store::failpoint::hit("commit.recorded");
            self.cache_keys.push(key.clone());
        }
        Ok(StageResult {
            config,
            layers,
            blobs,
            key,
        })
    }
}

/// Records the final stage as an image.
pub fn commit_image(
    ctx: &mut Context<'_>,
    result: &StageResult,
    tags: &[Reference],
    oci: bool,
    lease: &Lease,
) -> Result<ImageId, BuildError> {
    let (manifest_type, config_type, layer_type) = if oci {
        (media::OCI_MANIFEST, media::OCI_CONFIG, media::OCI_LAYER)
    } else {
        (
            media::DOCKER_MANIFEST,
            media::DOCKER_CONFIG,
            media::DOCKER_LAYER,
        )
    };
    let store = ctx.store;
    let config_bytes =
        serde_json::to_vec(&result.config).map_err(|e| BuildError::Invalid(e.to_string()))?;
    let config_digest = lease.put_blob(store.content(), &config_bytes)?;
    let layer_descs = result
        .blobs
        .iter()
        .map(|b| {
            // Base layers keep the compression they came with (a pulled gzip layer).
            let media_type = match (store.blob_compression(b)?, oci) {
                (isula_store::compression::Compression::Gzip, false) => media::DOCKER_LAYER_GZIP,
                (isula_store::compression::Compression::Gzip, true) => media::OCI_LAYER_GZIP,
                (isula_store::compression::Compression::Zstd, _) => media::OCI_LAYER_ZSTD,
                _ => layer_type,
            };
            Ok(Descriptor::new(media_type, b.clone(), store.blob_size(b)?))
        })
        .collect::<Result<Vec<_>, isula_store::StoreError>>()?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(manifest_type.into()),
        config: Descriptor::new(
            config_type,
            config_digest.clone(),
            config_bytes.len() as u64,
        ),
        layers: layer_descs,
        annotations: None,
    };
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| BuildError::Invalid(e.to_string()))?;
    let manifest_digest = lease.put_blob(store.content(), &manifest_bytes)?;
    let id = ImageId(config_digest);
    (ctx.log)("Getting image source signatures\n".into());
    for b in &result.blobs {
        (ctx.log)(format!("Copying blob {b}\n"));
    }
    (ctx.log)(format!("Copying config {}\n", id.digest()));
    (ctx.log)("Writing manifest to image destination\n".into());
    (ctx.log)("Storing signatures\n".into());
    isula_store::failpoint::hit("commit.image-blobs-written");
    store.add_image(NewImage {
        id: id.clone(),
        manifest: manifest_digest,
        manifest_media_type: manifest_type.into(),
        blobs: result.blobs.clone(),
        layers: result.layers.clone(),
        created: result.config.created.clone(),
        names: tags.to_vec(),
    })?;
    Ok(id)
}
