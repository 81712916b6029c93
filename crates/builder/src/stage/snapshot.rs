//! A stage's step snapshots: mounting a step's rootfs over them, keeping a step's changes
//! in the cache, and finding steps there (locally, or from a `--cache-from` source).

use super::*;

impl StageRun<'_, '_> {
    /// Fetches the `--cache-from` snapshots stacked so far that are not local yet, and
    /// makes the directories of layers steps wrote as tars.
    pub(super) fn fetch_pending(&mut self) -> Result<(), BuildError> {
        let store = self.ctx.store;
        for i in 0..self.snaps.len() {
            if let (Some(p), true) = (
                &self.snaps[i].packed,
                self.snaps[i].dir.as_os_str().is_empty(),
            ) {
                self.snaps[i].dir = store.layer_diff(&p.layer.chain_id, self.lease)?;
                continue;
            }
            let Some(key) = self.snaps[i].remote.clone() else {
                continue;
            };
            let remote = self
                .ctx
                .remote
                .ok_or_else(|| BuildError::Invalid("no cache source to fetch from".into()))?;
            if store.cache().get(&key, self.lease).is_none() {
                remote
                    .import(&key, self.lease)
                    .map_err(BuildError::CacheSource)?;
            }
            let dir = store
                .cache()
                .get(&key, self.lease)
                .and_then(|r| r.snapshot)
                .map(|id| store.cache().snapshot_dir(&id))
                .filter(|d| d.is_dir())
                .ok_or_else(|| {
                    BuildError::Invalid(format!("cache record {key} came without its snapshot"))
                })?;
            self.snaps[i] = Snapshot::local(dir, None);
        }
        Ok(())
    }

    /// Mounts the rootfs for a step that changes files: the base, this stage's snapshots,
    /// and a fresh upper directory for the step's own changes.
    pub(super) fn mount_step(&mut self) -> Result<(), BuildError> {
        self.fetch_pending()?;
        let store = self.ctx.store;
        let target = self.dir.join("rootfs");
        std::fs::create_dir_all(&target)
            .map_err(|e| isula_store::StoreError::io("create", &self.dir, e))?;
        let upper = store.stage_layer()?;
        let work = upper.work_dir()?;
        let mut lowers: Vec<PathBuf> = self.snaps.iter().rev().map(|s| s.dir.clone()).collect();
        lowers.extend(self.base_lowers.iter().cloned());
        if lowers.is_empty() {
            let empty = self.dir.join("empty");
            std::fs::create_dir_all(&empty)
                .map_err(|e| isula_store::StoreError::io("create", &empty, e))?;
            lowers.push(empty);
        }
        let guard = mount_overlay(
            &lowers,
            &upper.diff_dir(),
            &work,
            &target,
            &self.opts.mount_options,
        )
        .map_err(|e| BuildError::Invalid(format!("mounting the stage rootfs: {e}")))?;
        self.rootfs = Some(Root::open(&target).map_err(|e| BuildError::Invalid(e.to_string()))?);
        self.mount = Some(guard);
        self.upper = Some(upper);
        Ok(())
    }

    /// For a COPY that only makes new top-level names (`copies_to_a_new_name`): a fresh
    /// upper directory as the step's rootfs, written directly, with no overlay mounted.
    /// [`StageRun::finish_step`] keeps it as it keeps a mounted step's upper.
    pub(super) fn stage_upper_direct(&mut self) -> Result<(), BuildError> {
        let upper = self.ctx.store.stage_layer()?;
        self.rootfs =
            Some(Root::open(&upper.diff_dir()).map_err(|e| BuildError::Invalid(e.to_string()))?);
        self.upper = Some(upper);
        Ok(())
    }

    /// Unmounts after a step and keeps its changes: as a cache snapshot recorded under
    /// `key`, or (cache off) as a staged directory for this build only.
    pub(super) fn finish_step(
        &mut self,
        key: &Digest,
        description: &str,
    ) -> Result<(), BuildError> {
        self.rootfs = None;
        if let Some(m) = self.mount.take() {
            m.unmount()
                .map_err(|e| BuildError::Invalid(format!("unmounting the stage rootfs: {e}")))?;
        }
        let upper = self
            .upper
            .take()
            .ok_or_else(|| BuildError::Invalid("no upper directory".into()))?;
        let lineage = self.step_lineage.take();
        if let Some(plan) = self.reuse_plan.take() {
            let linked = plan.linked();
            plan.finish(&upper.diff_dir(), &upper.note_path(crate::reuse::NOTE))
                .map_err(|e| BuildError::Invalid(format!("reusing unchanged files: {e}")))?;
            tracing::debug!(linked, "files linked from the previous version of the step");
        }
        let empty = std::fs::read_dir(upper.diff_dir())
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        let store = self.ctx.store;
        // With --no-cache, a step already recorded keeps its record, and this build goes on
        // with its own fresh changes, not the recorded ones.
        let private = match self.opts.cache {
            CacheMode::Off => true,
            CacheMode::Refresh => store.cache().contains(key),
            CacheMode::On => false,
        };
        if private {
            if !empty {
                self.snaps
                    .push(Snapshot::local(upper.diff_dir(), Some(upper)));
            }
            if self.opts.cache != CacheMode::Off {
                self.cache_keys.push(key.clone());
            }
            return Ok(());
        }
        // Recorded already: by a concurrent build, or as a tar written with another clamp
        // (see `use_local_record`). Its record if this build can use it, else this build's
        // own changes, unrecorded.
        if store.cache().contains(key) {
            if !self.use_record(key)? {
                if !empty {
                    self.snaps
                        .push(Snapshot::local(upper.diff_dir(), Some(upper)));
                }
                self.cache_keys.push(key.clone());
            }
            return Ok(());
        }
        let (snapshot, size) = if empty {
            (None, 0)
        } else {
            let (id, size) = store.adopt_snapshot(upper, self.lease)?;
            (Some(id), size)
        };
        isula_store::failpoint::hit("step.snapshot-adopted");
        let record = Record {
            snapshot: snapshot.clone(),
            size,
            lineage,
            ..Record::new(&self.key, description)
        };
        let kept = store.cache().put(key, record)?;
        self.cache_keys.push(key.clone());
        if let Some(id) = snapshot {
            if kept {
                self.snaps
                    .push(Snapshot::local(store.cache().snapshot_dir(&id), None));
            } else if !self.use_record(key)? {
                // Recorded meanwhile, unusable here, and this build's snapshot went with
                // the refused record: the step's changes are lost, so is the build.
                return Err(BuildError::Invalid(format!(
                    "step {key} was recorded by another build meanwhile in a form this build cannot use; build again"
                )));
            }
        }
        Ok(())
    }

    /// Records a step that changes no files (config only).
    pub(super) fn record_config_step(
        &mut self,
        key: &Digest,
        description: &str,
    ) -> Result<(), BuildError> {
        if self.opts.cache == CacheMode::Off {
            return Ok(());
        }
        self.ctx
            .store
            .cache()
            .put(key, Record::new(&self.key, description))?;
        self.cache_keys.push(key.clone());
        Ok(())
    }

    /// Stacks the snapshot of the recorded step `key`, if it has one: from the local
    /// cache, else (not fetched yet) from a `--cache-from` source.
    pub(super) fn use_record(&mut self, key: &Digest) -> Result<bool, BuildError> {
        let store = self.ctx.store;
        let Some(r) = store.cache().get(key, self.lease) else {
            let Some(remote) = self.ctx.remote else {
                return Ok(false);
            };
            let Some(found) = remote.lookup(key) else {
                return Ok(false);
            };
            if found.snapshot {
                self.snaps.push(Snapshot {
                    dir: PathBuf::new(),
                    staged: None,
                    remote: Some(key.clone()),
                    packed: None,
                });
            } else {
                // No snapshot: the record itself (and any layer it keeps) is all there is
                // to import.
                remote
                    .import(key, self.lease)
                    .map_err(BuildError::CacheSource)?;
                if let Some(r) = store.cache().get(key, self.lease) {
                    return self.use_local_record(key, &r);
                }
            }
            self.cache_keys.push(key.clone());
            return Ok(true);
        };
        self.use_local_record(key, &r)
    }

    /// [`StageRun::use_record`] of a record found in the local cache.
    fn use_local_record(&mut self, key: &Digest, r: &Record) -> Result<bool, BuildError> {
        let store = self.ctx.store;
        if let Some(id) = &r.snapshot {
            let dir = store.cache().snapshot_dir(id);
            if !dir.is_dir() {
                return Ok(false);
            }
            self.snaps.push(Snapshot::local(dir, None));
        } else if let Some(stage) = &r.stage {
            // A step that wrote its layer as a tar: the stage as it stood after it, whose
            // top layer is the step's own; written with this build's clamp, or it is not
            // the layer this build's copy makes.
            let clamp = isula_store::cache::TarWritten {
                clamp_mtime: self.opts.build_time,
            };
            let (Some(top), Some(blob)) = (stage.layers.last(), stage.blobs.last()) else {
                return Ok(false);
            };
            if r.written_as_tar != Some(clamp) || !store.cache_stage_whole(stage) {
                return Ok(false);
            }
            self.lease.layer(&top.chain_id);
            self.lease.blob(blob);
            self.snaps
                .push(Snapshot::packed(top.clone(), blob.clone(), true));
        }
        self.cache_keys.push(key.clone());
        Ok(true)
    }

    /// Keeps the layer a step wrote as a tar (`layer`, on the stage's base): recorded
    /// under `key` as the stage stands after the step (its layers, and a config that names
    /// them), which keeps the layer as a stage result keeps its layers; or (cache off, or
    /// `--no-cache` of a recorded step) for this build only.
    pub(super) fn finish_packed_step(
        &mut self,
        key: &Digest,
        description: &str,
        layer: LayerRecord,
    ) -> Result<(), BuildError> {
        // Kept in the record: the next version of the step makes files (see
        // `packs_its_layer`), with nothing of this one to link.
        let lineage = self.step_lineage.take();
        let store = self.ctx.store;
        let private = match self.opts.cache {
            CacheMode::Off => true,
            CacheMode::Refresh => store.cache().contains(key),
            CacheMode::On => false,
        };
        let blob = layer.diff_id.0.clone();
        if private {
            self.snaps.push(Snapshot::packed(layer, blob, false));
            if self.opts.cache != CacheMode::Off {
                self.cache_keys.push(key.clone());
            }
            return Ok(());
        }
        let mut config = self.config.clone();
        config.rootfs.kind = "layers".into();
        config.rootfs.diff_ids.push(layer.diff_id.clone());
        let bytes = serde_json::to_vec(&config).map_err(|e| BuildError::Invalid(e.to_string()))?;
        let config_blob = self.lease.put_blob(store.content(), &bytes)?;
        let mut layers = self.base_layers.clone();
        layers.push(layer.clone());
        let mut blobs = self.base_blobs.clone();
        blobs.push(blob.clone());
        let record = Record {
            stage: Some(StageRecord {
                config: config_blob,
                layers,
                blobs,
            }),
            size: layer.size,
            lineage,
            written_as_tar: Some(isula_store::cache::TarWritten {
                clamp_mtime: self.opts.build_time,
            }),
            ..Record::new(&self.key, description)
        };
        let kept = store.cache().put(key, record)?;
        isula_store::failpoint::hit("step.snapshot-adopted");
        self.cache_keys.push(key.clone());
        // A concurrent build recorded the same step first: its record, if this build can
        // use it (one written with another clamp it cannot), else this build's own layer.
        if kept || !self.use_record(key)? {
            self.snaps.push(Snapshot::packed(layer, blob, kept));
        }
        Ok(())
    }

    /// Whether step `key` comes from the cache (then its snapshot is stacked and the line
    /// says so); once one step misses, every later one runs.
    pub(super) fn try_cache(&mut self, key: &Digest) -> Result<bool, BuildError> {
        if !self.hitting {
            return Ok(false);
        }
        if self.use_record(key)? {
            self.log(format!("Using cache {}\n", &key.hex()[..12]));
            return Ok(true);
        }
        self.hitting = false;
        Ok(false)
    }
}
