//! COPY and ADD as steps: their cache key (the content of what they select) and the copy
//! into the step's rootfs, from the context, another stage or an image.

use super::*;

impl StageRun<'_, '_> {
    pub(super) fn copy(
        &mut self,
        n: usize,
        step: &Step,
        c: isula_dockerfile::instructions::CopyArgs,
        is_add: bool,
    ) -> Result<(), BuildError> {
        // A named context (--build-context) wins over a stage of that name.
        let named = c
            .from
            .as_deref()
            .and_then(|f| self.opts.named_context(f))
            .cloned();
        let named_dir = match &named {
            Some(crate::NamedContext::Dir(d)) => Some(d.clone()),
            _ => None,
        };
        // An image named by --from is found (or pulled) before the rootfs is borrowed.
        let from_result = match (&c.from, &named) {
            (Some(_), Some(crate::NamedContext::Dir(_))) | (None, _) => None,
            (Some(_), Some(crate::NamedContext::Image(r))) => Some(
                image_base(self.ctx, r, &self.platform.clone(), self.materials)
                    .map_err(|e| in_step(n, step, e))?,
            ),
            (Some(from), None) => Some(match self.stage_result(from) {
                Some(r) => r.clone(),
                None => image_base(self.ctx, from, &self.platform.clone(), self.materials)
                    .map_err(|e| in_step(n, step, e))?,
            }),
        };
        let cwd = self.working_dir();
        let remotes: Vec<remote::Remote> = if c.from.is_none() {
            c.sources
                .iter()
                .filter_map(|s| remote::classify(s))
                .collect()
        } else {
            Vec::new()
        };
        if !remotes.is_empty() && !is_add {
            return Err(step_err(
                n,
                step,
                "a URL or git repository can be a source of ADD, not of COPY",
            ));
        }
        let locals: Vec<String> = c
            .sources
            .iter()
            .filter(|s| c.from.is_some() || remote::classify(s).is_none())
            .cloned()
            .collect();
        let excludes = exclude_matcher(&c.exclude).map_err(|e| step_err(n, step, e))?;
        let checksum = c
            .checksum
            .as_deref()
            .map(remote::parse_checksum)
            .transpose()
            .map_err(|e| step_err(n, step, e))?;
        let (remote_keys, prefetched) = if remotes.is_empty() {
            if checksum.is_some() {
                return Err(step_err(
                    n,
                    step,
                    "--checksum needs a URL or git repository source",
                ));
            }
            (Vec::new(), Vec::new())
        } else {
            self.remote_keys(n, step, &c, &remotes, checksum.as_deref())?
        };
        // The build context, opened once for the key and the copy.
        let ctx_root =
            match (&c.from, &named_dir, locals.is_empty()) {
                (_, Some(dir), false) => Some(Root::open(dir).map_err(|e| {
                    step_err(n, step, format!("build context {}: {e}", dir.display()))
                })?),
                (None, None, false) => Some(
                    Root::open(&self.opts.context).map_err(|e| step_err(n, step, e.to_string()))?,
                ),
                _ => None,
            };
        // The content of a directory's sources (the context, or a named directory: hashed
        // afresh, the context's records being the context's, no .dockerignore).
        let (ignore, context_hashes) = (self.ignore, self.hashes);
        let named_sources = named_dir.is_some();
        let key_sources = locals.clone();
        let hash_dir = |root: &Root| -> Result<Digest, BuildError> {
            let mut src = Source::local(root, if named_sources { None } else { ignore });
            src.exclude = excludes.as_ref();
            if named_sources {
                let mut hashes = crate::cache_key::ContextHashes::load(None);
                return hash_sources(&src, &key_sources, &mut hashes)
                    .map_err(|e| step_err(n, step, e));
            }
            let mut hashes = context_hashes.lock().unwrap_or_else(|p| p.into_inner());
            let t = std::time::Instant::now();
            let _phase = isula_store::phase::Phase::start("copy: hash the sources (key)");
            let h =
                hash_sources(&src, &key_sources, &mut hashes).map_err(|e| step_err(n, step, e))?;
            tracing::debug!(elapsed = ?t.elapsed(), read = hashes.hashed, "COPY sources hashed");
            Ok(h)
        };
        // What the sources are: their content (context), or the key of the stage or image;
        // Err(root): hashed while the files are copied, as no cache lookup waits for the
        // key (--no-cache, or a step after a miss).
        let sources = match (&from_result, &ctx_root) {
            // Never looked up: the stage's key says it (no files read).
            (Some(r), _) if self.opts.cache == CacheMode::Off => Ok(r.key.clone()),
            // What the copy reads, by content (BuildKit's early cutoff: a stage that ran
            // again and made the same files changes nothing after it).
            (Some(r), _) => Ok(self.content_key(n, step, r, &locals, &c.exclude)?),
            // The daemon's cache is off: the key is never looked up nor recorded, so the
            // sources are not read for it (the copy reads them once). This build's stage
            // directory and the step number keep it the step's own.
            (None, Some(_)) if self.opts.cache == CacheMode::Off => {
                let mut k = KeyBuilder::new("uncached-sources", None);
                k.field("stage", self.dir.as_os_str().as_encoded_bytes())
                    .field("step", &n.to_le_bytes());
                Ok(k.finish())
            }
            (None, Some(root)) if !self.hitting => Err(root),
            (None, Some(root)) => Ok(hash_dir(root)?),
            (None, None) => Ok(KeyBuilder::new("no-sources", None).finish()),
        };
        let mut key = KeyBuilder::new(if is_add { "add" } else { "copy" }, Some(&self.key));
        key.json("instruction", &c).field("cwd", cwd.as_bytes());
        let finish_key = |mut key: KeyBuilder, sources: &Digest| {
            key.field("sources", sources.as_str().as_bytes());
            if !remote_keys.is_empty() {
                key.json("remote", &remote_keys);
            }
            key.finish()
        };
        let key = match sources {
            Ok(sources) => {
                let key = finish_key(key, &sources);
                if self.try_cache(&key)? {
                    self.key = key;
                    return Ok(());
                }
                Ok(key)
            }
            Err(root) => Err((key, root)),
        };
        if c.from.is_none() && !c.sources.is_empty() && self.opts.cache != CacheMode::Off {
            let mut lineage = KeyBuilder::new(
                if is_add {
                    "add-lineage"
                } else {
                    "copy-lineage"
                },
                Some(&self.key),
            );
            lineage.json("instruction", &c).field("cwd", cwd.as_bytes());
            self.step_lineage = Some(lineage.finish());
        }
        self.add_fetched = if remotes.is_empty() {
            Vec::new()
        } else {
            self.fetch_remotes(n, step, &c, &remotes, prefetched, checksum.as_deref())?
        };
        let mut c = c;
        c.sources = locals;
        let mut packed = None;
        if self.copies_to_a_new_name(&c, is_add)? {
            packed = match &ctx_root {
                Some(root) => self.packs_its_layer(&c, root),
                None => None,
            };
            if packed.is_some() {
                tracing::debug!(dest = %c.dest, "COPY writes its layer as a tar (a new top-level name, the stage's last step to change files)");
            } else {
                tracing::debug!(dest = %c.dest, "COPY writes its upper directly (a new top-level name)");
                self.stage_upper_direct()?;
            }
        } else {
            self.mount_step()?;
        }
        let t = std::time::Instant::now();
        let phase = isula_store::phase::Phase::start("copy: the files");
        let copy = move |this: &mut Self, root: Option<&Root>| match (&packed, root) {
            (Some(rel), Some(root)) => this.write_packed(n, step, &c, rel, root).map(Some),
            _ => this
                .copy_into(n, step, c, is_add, from_result, root)
                .map(|()| None),
        };
        let (copied, key) = match key {
            Ok(key) => (copy(self, ctx_root.as_ref()), Ok(key)),
            // The key's reading of the sources runs beside the copy's (the two cores).
            Err((partial, root)) => std::thread::scope(|s| {
                let hashing = s.spawn(|| hash_dir(root));
                let copied = copy(self, Some(root));
                let hashed = hashing
                    .join()
                    .unwrap_or_else(|_| Err(step_err(n, step, "the source hash stopped")));
                (copied, hashed.map(|h| finish_key(partial, &h)))
            }),
        };
        let _ = isula_sys::rooted::remove_tree(&self.dir.join(format!("add-{n}")));
        // The hash's error first: it is what the copy met, said as before.
        let key = key?;
        let layer = copied?;
        drop(phase);
        tracing::debug!(elapsed = ?t.elapsed(), "COPY copied");
        let t = std::time::Instant::now();
        let phase = isula_store::phase::Phase::start("step: record the snapshot");
        match layer {
            Some(layer) => self.finish_packed_step(&key, &step.original, layer)?,
            None => self.finish_step(&key, &step.original)?,
        }
        drop(phase);
        tracing::debug!(elapsed = ?t.elapsed(), "COPY step recorded");
        self.key = key;
        Ok(())
    }

    pub(super) fn copy_into(
        &mut self,
        n: usize,
        step: &Step,
        c: isula_dockerfile::instructions::CopyArgs,
        is_add: bool,
        from_result: Option<StageResult>,
        ctx_root: Option<&Root>,
    ) -> Result<(), BuildError> {
        let cwd = self.working_dir();
        let fetched = std::mem::take(&mut self.add_fetched);
        let root = self.rootfs()?;
        let owner = match &c.chown {
            None => None,
            Some(spec) => {
                let ids = user::resolve(root, spec, false).map_err(|e| step_err(n, step, e))?;
                Some((ids.uid, ids.gid))
            }
        };
        let chmod = parse_chmod(c.chmod.as_deref()).map_err(|e| step_err(n, step, e))?;
        let dest = copy_dest(&cwd, &c.dest);
        let opts = CopyOptions {
            owner,
            chmod,
            extract: is_add,
            parents: c.parents,
        };
        let excludes = exclude_matcher(&c.exclude).map_err(|e| step_err(n, step, e))?;
        if c.link {
            let mtime = self
                .opts
                .build_time
                .unwrap_or_else(|| chrono::Utc::now().timestamp());
            link_dest(root, &dest, owner.unwrap_or((0, 0)), mtime)
                .map_err(|e| step_err(n, step, format!("--link: {e}")))?;
        }
        // Heredoc documents become files.
        for h in &c.heredocs {
            let target = if dest.ends_with('/') {
                format!("{dest}{}", h.name)
            } else {
                dest.clone()
            };
            let (pfd, name) = root
                .parent(Path::new(&target), Resolve::InRoot, true)
                .map_err(|e| step_err(n, step, e.to_string()))?;
            let pfd = std::os::fd::AsFd::as_fd(&pfd);
            let _ = isula_sys::rooted::remove_all(pfd, &name);
            let mut f = isula_sys::rooted::create_file(pfd, &name, 0o644)
                .map_err(|e| step_err(n, step, e.to_string()))?;
            std::io::Write::write_all(&mut f, h.content.as_bytes())
                .map_err(|e| step_err(n, step, e.to_string()))?;
            let (uid, gid) = owner.unwrap_or((0, 0));
            isula_sys::rooted::lchown(pfd, &name, uid, gid)
                .map_err(|e| step_err(n, step, e.to_string()))?;
            isula_sys::rooted::chmod(pfd, &name, chmod.unwrap_or(0o644))
                .map_err(|e| step_err(n, step, e.to_string()))?;
        }
        // Remote sources (ADD): never unpacked. With several sources of any kind, dest is a
        // directory.
        let dest = if c.sources.len() + fetched.len() > 1 && !dest.ends_with('/') {
            format!("{dest}/")
        } else {
            dest
        };
        for f in &fetched {
            let froot = Root::open(&f.root).map_err(|e| step_err(n, step, e.to_string()))?;
            let mut src = Source::new(&froot, None);
            src.exclude = excludes.as_ref();
            let ropts = CopyOptions {
                extract: false,
                ..opts.clone()
            };
            copy::copy(
                &src,
                std::slice::from_ref(&f.rel),
                root,
                &dest,
                &ropts,
                None,
            )
            .map_err(|e| step_err(n, step, e))?;
        }
        if c.sources.is_empty() {
            return Ok(());
        }
        if let Some(crate::NamedContext::Dir(_)) =
            c.from.as_deref().and_then(|f| self.opts.named_context(f))
        {
            let dir_root =
                ctx_root.ok_or_else(|| step_err(n, step, "the build context is not open"))?;
            let mut src = Source::local(dir_root, None);
            src.exclude = excludes.as_ref();
            return copy::copy(&src, &c.sources, root, &dest, &opts, None)
                .map_err(|e| step_err(n, step, e));
        }
        match &c.from {
            None => {
                let ctx_root =
                    ctx_root.ok_or_else(|| step_err(n, step, "the build context is not open"))?;
                let mut src = Source::local(ctx_root, self.ignore);
                src.exclude = excludes.as_ref();
                let Some(lineage) = &self.step_lineage else {
                    return copy::copy(&src, &c.sources, root, &dest, &opts, None)
                        .map_err(|e| step_err(n, step, e));
                };
                // Files the previous version of this step wrote exactly so are linked;
                // with --no-cache nothing of it is reused, but what this copy wrote is noted.
                let cache = self.ctx.store.cache();
                let reuse_old = self.opts.cache == CacheMode::On;
                let old = reuse_old.then(|| cache.latest_of_lineage(lineage, self.lease));
                let old = old.flatten().map(|id| {
                    (
                        cache.snapshot_dir(&id),
                        cache.snapshot_note(&id, crate::reuse::NOTE),
                    )
                });
                let hashes = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
                // A synced context's files may be linked too.
                let synced = self
                    .opts
                    .synced_context
                    .then_some(self.opts.context.as_path());
                let mut reuse = crate::reuse::Reuse::new(&hashes, old, root.path(), synced);
                copy::copy(&src, &c.sources, root, &dest, &opts, Some(&mut reuse))
                    .map_err(|e| step_err(n, step, e))?;
                let plan = reuse.into_plan();
                drop(hashes);
                self.reuse_plan = Some(plan);
                Ok(())
            }
            Some(from) => {
                let result = from_result
                    .ok_or_else(|| step_err(n, step, format!("image or stage {from} not found")))?;
                let view = self.dir.join(format!("from-{n}"));
                let empty = self.dir.join(format!("from-{n}-empty"));
                for d in [&view, &empty] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| isula_store::StoreError::io("create", d, e))?;
                }
                let lowers: Vec<PathBuf> = result
                    .layers
                    .iter()
                    .rev()
                    .map(|l| self.ctx.store.layer_diff(&l.chain_id, self.lease))
                    .collect::<Result<_, _>>()?;
                let guard = if lowers.is_empty() {
                    None
                } else {
                    Some(
                        mount_overlay_ro(&lowers, &view, &empty)
                            .map_err(|e| step_err(n, step, format!("mounting {from}: {e}")))?,
                    )
                };
                let src_root = Root::open(&view).map_err(|e| step_err(n, step, e.to_string()))?;
                let mut src = Source::new(&src_root, None);
                src.exclude = excludes.as_ref();
                let r = copy::copy(&src, &c.sources, root, &dest, &opts, None)
                    .map_err(|e| step_err(n, step, e));
                drop(src_root);
                drop(guard);
                r
            }
        }
    }
}

impl StageRun<'_, '_> {
    /// Whether this COPY may write its step's upper directory directly instead of through
    /// the overlay (a file made through overlayfs costs about twice what it costs on the
    /// upper's own file system: 1.5 s against 0.9 s for 20,000 files here). It may when
    /// all it makes lies under a top-level name that no layer below has (no file,
    /// directory, symlink or whiteout of that name in the base or in this stage's
    /// snapshots): the merged view there is then the upper's own entries, with nothing to
    /// copy up, hide or follow, and the upper's files come out as the overlay would leave
    /// them (the layer's tar is the same byte for byte; only the overlay's own marks on the
    /// upper's root, such as its uuid, which no tar carries, are missing).
    /// Only sources from the build context qualify, without --chown (its names are looked
    /// up in the rootfs's /etc/passwd), --link, --parents or heredocs, and never with ".."
    /// in the destination (which could climb back into a name the base has).
    fn copies_to_a_new_name(
        &mut self,
        c: &isula_dockerfile::instructions::CopyArgs,
        is_add: bool,
    ) -> Result<bool, BuildError> {
        if is_add
            || c.from.is_some()
            || c.chown.is_some()
            || c.link
            || c.parents
            || !c.heredocs.is_empty()
            || c.sources.is_empty()
        {
            return Ok(false);
        }
        let dest = copy_dest(&self.working_dir(), &c.dest);
        let mut parts = dest.split('/').filter(|p| !p.is_empty() && *p != ".");
        if dest.split('/').any(|p| p == "..") {
            return Ok(false);
        }
        let Some(top) = parts.next() else {
            return Ok(false);
        };
        self.fetch_pending()?;
        for lower in self.snaps.iter().map(|s| &s.dir).chain(&self.base_lowers) {
            // A lower that cannot be opened as a directory (which the mount would refuse)
            // is left to the overlay path, which says what is wrong with it.
            let Ok(dir) = rustix::fs::open(
                lower,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                return Ok(false);
            };
            match isula_sys::rooted::lstat(
                std::os::fd::AsFd::as_fd(&dir),
                std::ffi::OsStr::new(top),
            ) {
                Ok(None) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Whether this COPY (one that `copies_to_a_new_name`) writes its layer as a tar, and
    /// of which source path: when its stage has no snapshot yet and no later step of it
    /// changes files, the stage's layer is exactly what the copy makes (on the base), so it
    /// is written as the tar of that layer, hashed and stored as it is written, with no
    /// file made (the layer's directory is made in idle time, or when a build needs it).
    /// A copy of one source path only (several may write the same names: the files are
    /// made), never one that would fail (the files path says why), and not in a stage a
    /// later stage uses (that one would wait for the layer's directory at once). Only the
    /// first version of a step the cache keeps: once it holds a version, the next ones
    /// make files, which the versions after them link where unchanged (a tar shares no
    /// file with another version, and is not linked from).
    fn packs_its_layer(
        &self,
        c: &isula_dockerfile::instructions::CopyArgs,
        root: &Root,
    ) -> Option<String> {
        if self.files_after
            || self.used_later
            || !self.snaps.is_empty()
            || parse_chmod(c.chmod.as_deref()).is_err()
        {
            return None;
        }
        let versioned = self
            .step_lineage
            .as_ref()
            .is_some_and(|l| self.ctx.store.cache().has_lineage(l));
        if self.opts.cache == CacheMode::On && versioned {
            return None;
        }
        let src = Source::local(root, self.ignore);
        let mut paths = Vec::new();
        for s in &c.sources {
            paths.extend(copy::expand_source(&src, s).ok()?);
        }
        let [one] = paths.as_slice() else {
            return None;
        };
        // A FIFO alone makes nothing at a destination of one name (the files path then
        // has no layer at all).
        let (_, st) = copy::open_source(&src.scoped(one), one).ok()?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo {
            return None;
        }
        Some(one.clone())
    }

    /// The layer tar of a COPY that [`StageRun::packs_its_layer`] (of source path `rel` of
    /// the build context `root`), written as a blob while the context is read, and
    /// recorded as a packed layer on the stage's base (its directory made later).
    fn write_packed(
        &mut self,
        n: usize,
        step: &Step,
        c: &isula_dockerfile::instructions::CopyArgs,
        rel: &str,
        root: &Root,
    ) -> Result<LayerRecord, BuildError> {
        let store = self.ctx.store;
        let dest = copy_dest(&self.working_dir(), &c.dest);
        let chmod = parse_chmod(c.chmod.as_deref()).map_err(|e| step_err(n, step, e))?;
        let excludes = exclude_matcher(&c.exclude).map_err(|e| step_err(n, step, e))?;
        let mut src = Source::local(root, self.ignore);
        src.exclude = excludes.as_ref();
        let opts = CopyOptions {
            owner: None,
            chmod,
            extract: false,
            parents: false,
        };
        let now = chrono::Utc::now().timestamp();
        let clamp = self.opts.build_time;
        // One thread reads the context into the tar and hashes it; this one stores it (the
        // copy into the page cache costs about what the read and the hash do together).
        let mut blob = store.content().writer_hashed_by_caller()?;
        let (written, made) = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PACK_PIECES_WAITING);
            let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
            let src = &src;
            let (dest, opts) = (&dest, &opts);
            // A stack for the context's deepest directories (reserved, not used, until the
            // walk goes that deep), as the walk of a layer has.
            let making = std::thread::Builder::new()
                .name("copy-tar".into())
                .stack_size(16 << 20)
                .spawn_scoped(s, move || -> Result<(Digest, u64), String> {
                    let sink = Pieces {
                        tx,
                        spare,
                        piece: Vec::with_capacity(PACK_PIECE),
                        hash: Default::default(),
                        size: 0,
                    };
                    let mut tar = isula_store::diff::LayerTarWriter::new(sink, clamp);
                    copy::copy_to_tar(src, rel, dest, opts, now, &mut tar)?;
                    let mut sink = tar.finish().map_err(|e| e.to_string())?;
                    sink.send().map_err(|e| e.to_string())?;
                    Ok((Digest::from_sha256(sink.hash), sink.size))
                });
            let mut written = Ok(());
            for piece in rx {
                if let Err(e) = std::io::Write::write_all(&mut blob, &piece) {
                    written = Err(e);
                    break;
                }
                let _ = back.send(piece);
            }
            // A thread that did not start dropped its end of the channel: nothing came.
            let made = match making {
                Ok(t) => t
                    .join()
                    .unwrap_or_else(|_| Err("the thread writing the layer stopped".into())),
                Err(e) => Err(format!("starting the thread that writes the layer: {e}")),
            };
            (written, made)
        });
        // The store's error first: the copy it stopped only met a broken pipe.
        written
            .map_err(|e| BuildError::Store(isula_store::StoreError::io("write", blob.path(), e)))?;
        let (digest, size) = made.map_err(|e| step_err(n, step, e))?;
        let (digest, size) = self.lease.commit_blob(blob, Some((&digest, Some(size))))?;
        let diff_id = isula_types::DiffId(digest.clone());
        let parent = self.base_layers.last().map(|l| l.chain_id.clone());
        let chain = isula_types::ChainId::next(parent.as_ref(), &diff_id);
        store.commit_packed_layer(&chain, &digest, self.lease)?;
        store.queue_unpack(&chain);
        Ok(LayerRecord {
            parent,
            chain_id: chain,
            diff_id,
            size,
        })
    }

    /// The content key of what `sources` (less `excludes`) select in the filesystem of a
    /// stage or image: paths, types, modes, owners, link targets and file contents, never
    /// times. Taken once per selection of the same layers (the cache keeps it by their
    /// chain ID), so an unchanged rebuild reads nothing.
    pub(super) fn content_key(
        &self,
        n: usize,
        step: &Step,
        r: &StageResult,
        sources: &[String],
        excludes: &[String],
    ) -> Result<Digest, BuildError> {
        let Some(top) = r.layers.last() else {
            // No layers: nothing to select (the copy says what is missing).
            let mut k = KeyBuilder::new("no-layers", None);
            k.json("sources", &sources);
            return Ok(k.finish());
        };
        let mut memo = KeyBuilder::new("content-of", None);
        memo.field("chain", top.chain_id.to_string().as_bytes())
            .json("sources", &sources)
            .json("exclude", &excludes);
        let memo = memo.finish();
        let cache = self.ctx.store.cache();
        if let Some(d) = cache.content_digest(&memo) {
            return Ok(d);
        }
        let _phase = isula_store::phase::Phase::start("copy: hash the stage's sources (key)");
        let scratch = self.dir.join(format!("content-{n}"));
        let (view, empty) = (scratch.join("view"), scratch.join("empty"));
        for d in [&view, &empty] {
            std::fs::create_dir_all(d).map_err(|e| isula_store::StoreError::io("create", d, e))?;
        }
        let lowers: Vec<PathBuf> = r
            .layers
            .iter()
            .rev()
            .map(|l| self.ctx.store.layer_diff(&l.chain_id, self.lease))
            .collect::<Result<_, _>>()?;
        let hashed = (|| {
            let guard = mount_overlay_ro(&lowers, &view, &empty)
                .map_err(|e| step_err(n, step, format!("mounting the source: {e}")))?;
            let root = Root::open(&view).map_err(|e| step_err(n, step, e.to_string()))?;
            let matcher = exclude_matcher(excludes).map_err(|e| step_err(n, step, e))?;
            let mut src = Source::new(&root, None);
            src.exclude = matcher.as_ref();
            let mut hashes = ContextHashes::load(None);
            let h = hash_sources(&src, sources, &mut hashes).map_err(|e| step_err(n, step, e));
            drop(root);
            drop(guard);
            h
        })();
        let _ = isula_sys::rooted::remove_tree(&scratch);
        let d = hashed?;
        cache.note_content_digest(memo, d.clone());
        Ok(d)
    }
}

/// `--chmod`'s octal mode.
fn parse_chmod(m: Option<&str>) -> Result<Option<u32>, String> {
    m.map(|m| {
        u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| format!("invalid --chmod {m:?}: expected an octal mode"))
    })
    .transpose()
}

/// COPY's destination `dest` as an absolute path, a relative one taken from the working
/// directory `cwd` (a trailing "/" or "." keeps saying "a directory").
fn copy_dest(cwd: &str, dest: &str) -> String {
    if dest.starts_with('/') {
        return dest.to_string();
    }
    let joined = format!("/{cwd}/{dest}");
    let mut d = clean(&joined);
    if dest.ends_with('/') || dest == "." || dest.ends_with("/.") {
        d.push('/');
    }
    d
}

/// `--exclude` patterns as one matcher (the .dockerignore rules, `!` exceptions too).
fn exclude_matcher(patterns: &[String]) -> Result<Option<Matcher>, String> {
    if patterns.is_empty() {
        return Ok(None);
    }
    Matcher::parse(&patterns.join("\n"))
        .map(Some)
        .map_err(|e| format!("--exclude: {e}"))
}

/// `COPY --link`: BuildKit copies into an empty directory and lays the result over the
/// stage, so the destination's directories are its own: each one (DEST itself when it
/// names a directory) is a directory of mode 0755 owned by the copy's owner with the
/// copy's time, whatever the stage had there; a symlink or file in the way is replaced,
/// never followed, and what a directory already held stays.
fn link_dest(root: &Root, dest: &str, owner: (u32, u32), mtime: i64) -> Result<(), String> {
    let dir_part = if dest.ends_with('/') {
        dest.to_string()
    } else {
        match dest.rsplit_once('/') {
            Some((d, _)) => d.to_string(),
            None => String::new(),
        }
    };
    let mut at = String::new();
    for comp in dir_part.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let parent = if at.is_empty() {
            "/".to_string()
        } else {
            at.clone()
        };
        let pfd = root
            .dir(Path::new(&parent), Resolve::InRoot, false)
            .map_err(|e| format!("{parent}: {e}"))?;
        let name = std::ffi::OsStr::new(comp);
        let pfd = std::os::fd::AsFd::as_fd(&pfd);
        match isula_sys::rooted::lstat(pfd, name).map_err(|e| e.to_string())? {
            Some(st) if isula_sys::rooted::is_dir(&st) => {}
            Some(_) => {
                isula_sys::rooted::remove_all(pfd, name).map_err(|e| e.to_string())?;
                isula_sys::rooted::mkdir(pfd, name, 0o755).map_err(|e| e.to_string())?;
            }
            None => isula_sys::rooted::mkdir(pfd, name, 0o755).map_err(|e| e.to_string())?,
        }
        isula_sys::rooted::lchown(pfd, name, owner.0, owner.1).map_err(|e| e.to_string())?;
        isula_sys::rooted::chmod(pfd, name, 0o755).map_err(|e| e.to_string())?;
        isula_sys::rooted::set_times(pfd, name, (mtime, 0)).map_err(|e| e.to_string())?;
        at = format!("{}/{comp}", at.trim_end_matches('/'));
    }
    Ok(())
}

/// The pieces of a layer tar on their way from the thread that makes it to the one that
/// stores it, and how many may wait (a few MiB in flight, each piece used again).
const PACK_PIECE: usize = 1 << 20;
const PACK_PIECES_WAITING: usize = 4;

/// Sends what is written in pieces of [`PACK_PIECE`], reusing the pieces sent back, and
/// hashes and counts what it sends.
struct Pieces {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    hash: sha2::Sha256,
    size: u64,
}

impl Pieces {
    /// Sends the piece being filled (if anything is in it).
    fn send(&mut self) -> std::io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let next = match self.spare.try_recv() {
            Ok(mut p) => {
                p.clear();
                p
            }
            Err(_) => Vec::with_capacity(PACK_PIECE),
        };
        let full = std::mem::replace(&mut self.piece, next);
        sha2::Digest::update(&mut self.hash, &full);
        self.size += full.len() as u64;
        self.tx.send(full).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the layer's store stopped")
        })
    }
}

impl std::io::Write for Pieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(PACK_PIECE - self.piece.len());
        self.piece.extend_from_slice(&buf[..n]);
        if self.piece.len() == PACK_PIECE {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
