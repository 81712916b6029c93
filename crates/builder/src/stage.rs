//! One stage: its base, its mounted rootfs, the instructions in order, and its commit.

use crate::cache_key::{hash_sources, ContextHashes, KeyBuilder};
use crate::copy::{self, CopyOptions, Source};
use crate::{
    user, BuildError, BuildOptions, CacheMode, Context, StageResult, DEFAULT_PATH, PROXY_ARGS,
};
use isula_dockerfile::ignore::{clean, Matcher};
use isula_dockerfile::instructions::{Command, Dockerfile, Instruction, Step};
use isula_dockerfile::lex::Lexer;
use isula_runtime::Process;
use isula_store::cache::{Record, StageRecord};
use isula_store::diff::{write_layer, DiffOptions};
use isula_store::{LayerRecord, Lease, NewImage, StagedLayer};
use isula_sys::mount::{mount_overlay, mount_overlay_ro, MountGuard};
use isula_sys::{Resolve, Root};
use isula_types::image::{
    host_architecture, ContainerConfig, Descriptor, HealthConfig, History, ImageConfig, Manifest,
    RootFs,
};
use isula_types::{limits, media, ChainId, DiffId, Digest, ImageId, Reference};
use rustix::fs::{Mode, OFlags};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// RUN output without a newline is forwarded once this much has gathered.
const RUN_OUTPUT_PIECE: usize = 64 << 10;

/// What every stage of one build shares (read-only, or locked).
pub struct Shared<'c> {
    pub opts: &'c BuildOptions,
    pub df: &'c Dockerfile,
    pub meta: &'c [(String, String)],
    pub lexer: &'c Lexer,
    pub ignore: Option<&'c Matcher>,
    pub lease: &'c Lease,
    pub hashes: &'c std::sync::Mutex<ContextHashes>,
    /// Prints a `STEP n: ...` line for stage `index` (the number is given where the
    /// stage's lines are put in order).
    pub step_line: &'c (dyn Fn(usize, &str) + Sync),
}

pub struct StageRun<'c, 'a> {
    ctx: &'c mut Context<'a>,
    step_line: &'c (dyn Fn(usize, &str) + Sync),
    opts: &'c BuildOptions,
    df: &'c Dockerfile,
    index: usize,
    lexer: &'c Lexer,
    ignore: Option<&'c Matcher>,
    results: &'c [Option<StageResult>],
    lease: &'c Lease,
    meta: &'c [(String, String)],
    config: ImageConfig,
    base_layers: Vec<LayerRecord>,
    base_blobs: Vec<isula_types::Digest>,
    args: Vec<(String, String)>,
    cmd_from_base: bool,
    history: Vec<History>,
    last_fs_step: Option<usize>,
    hashes: &'c std::sync::Mutex<ContextHashes>,
    /// The base's layer directories, top first.
    base_lowers: Vec<PathBuf>,
    /// The key of the last step (the chain every next key builds on).
    key: Digest,
    /// Every step so far came from the cache.
    hitting: bool,
    dir: PathBuf,
    // While a step that changes files runs: its rootfs handle, mount and upper directory.
    // Fields drop in order: the handle is closed and the overlay unmounted before its upper
    // directory and the snapshots under it (staged ones, cache off) are removed.
    rootfs: Option<Root>,
    mount: Option<MountGuard>,
    upper: Option<StagedLayer>,
    /// This stage's step snapshots so far, bottom first.
    snaps: Vec<Snapshot>,
    /// The cache keys this stage hit or recorded, in order (for `--cache-to`).
    cache_keys: Vec<Digest>,
}

/// One step's own changes: a cache snapshot, (cache off) a staged directory that goes
/// away with the build, or a `--cache-from` record not fetched yet (it is fetched only
/// when a later step or the commit needs its files).
struct Snapshot {
    dir: PathBuf,
    _staged: Option<StagedLayer>,
    remote: Option<Digest>,
}

impl Snapshot {
    fn local(dir: PathBuf, staged: Option<StagedLayer>) -> Snapshot {
        Snapshot {
            dir,
            _staged: staged,
            remote: None,
        }
    }
}

fn now_rfc3339(build_time: Option<i64>) -> String {
    let t = match build_time {
        Some(s) => chrono::DateTime::from_timestamp(s, 0).unwrap_or_default(),
        None => chrono::Utc::now(),
    };
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Loads an image of the store as a stage base.
/// With a puller (the daemon's), a name missing from the store is pulled first.
fn image_base(ctx: &mut Context<'_>, name: &str) -> Result<StageResult, BuildError> {
    let store = ctx.store;
    let img = match (store.resolve(name), ctx.pull) {
        (Ok(img), _) => img,
        (Err(isula_store::StoreError::ImageNotFound(_)), Some(pull)) => {
            let id =
                pull(name, &mut *ctx.log).map_err(|f| BuildError::Pulled(f.kind, f.message))?;
            store.image(&id)?
        }
        (Err(isula_store::StoreError::ImageNotFound(_)), None) => {
            return Err(BuildError::Invalid(format!(
                "image {name} is not in the local store (import, load or pull it first)"
            )))
        }
        (Err(e), _) => return Err(e.into()),
    };
    let raw = store
        .content()
        .read_small(img.id.digest(), limits::MANIFEST_MAX)?;
    let config: ImageConfig = serde_json::from_slice(&raw)
        .map_err(|e| BuildError::Invalid(format!("config of {name}: {e}")))?;
    let layers = img
        .layers
        .iter()
        .map(|c| store.layer(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut key = KeyBuilder::new("image", None);
    key.field("id", img.id.digest().as_str().as_bytes());
    Ok(StageResult {
        config,
        layers,
        blobs: img.blobs.clone(),
        key: key.finish(),
    })
}

fn step_err(step_no: usize, step: &Step, message: impl Into<String>) -> BuildError {
    BuildError::Step {
        step: step_no,
        line: step.line,
        instruction: step.original.clone(),
        message: message.into(),
        kind: isula_store::ErrorKind::FailedPrecondition,
    }
}

/// `e` as the failure of a step, keeping its kind (a pull that found nothing stays
/// NotFound; a registry that is down stays Unavailable).
fn in_step(step_no: usize, step: &Step, e: BuildError) -> BuildError {
    match e {
        BuildError::Cancelled => BuildError::Cancelled,
        e => BuildError::Step {
            step: step_no,
            line: step.line,
            instruction: step.original.clone(),
            kind: e.kind(),
            message: e.to_string(),
        },
    }
}

impl<'c, 'a> StageRun<'c, 'a> {
    pub fn new(
        ctx: &'c mut Context<'a>,
        shared: &Shared<'c>,
        index: usize,
        results: &'c [Option<StageResult>],
    ) -> Self {
        let opts = shared.opts;
        StageRun {
            ctx,
            step_line: shared.step_line,
            opts,
            df: shared.df,
            index,
            lexer: shared.lexer,
            ignore: shared.ignore,
            results,
            lease: shared.lease,
            meta: shared.meta,
            config: ImageConfig::default(),
            base_layers: Vec::new(),
            base_blobs: Vec::new(),
            args: Vec::new(),
            cmd_from_base: false,
            history: Vec::new(),
            last_fs_step: None,
            hashes: shared.hashes,
            base_lowers: Vec::new(),
            key: KeyBuilder::new("none", None).finish(),
            hitting: opts.cache == CacheMode::On,
            dir: opts.work_dir.join(format!("stage-{index}")),
            rootfs: None,
            mount: None,
            upper: None,
            snaps: Vec::new(),
            cache_keys: Vec::new(),
        }
    }

    /// The cache keys this stage hit or recorded, in order.
    pub fn take_cache_keys(&mut self) -> Vec<Digest> {
        std::mem::take(&mut self.cache_keys)
    }

    /// Fetches the `--cache-from` snapshots stacked so far that are not local yet.
    fn fetch_pending(&mut self) -> Result<(), BuildError> {
        let store = self.ctx.store;
        for i in 0..self.snaps.len() {
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
                    .map_err(BuildError::Invalid)?;
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

    fn log(&mut self, line: String) {
        (self.ctx.log)(line);
    }

    /// A stage named or numbered `name` that is already built.
    fn stage_result(&self, name: &str) -> Option<&StageResult> {
        let lower = name.to_ascii_lowercase();
        let idx = self.df.stages[..self.index]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
            .or_else(|| name.parse::<usize>().ok().filter(|i| *i < self.index))?;
        self.results[idx].as_ref()
    }

    /// Variables for expansion: ARGs in scope, then ENV (which wins).
    fn vars(&self) -> Vec<(String, String)> {
        let mut v = self.args.clone();
        for e in self
            .config
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
        {
            if let Some((k, val)) = e.split_once('=') {
                v.push((k.to_string(), val.to_string()));
            }
        }
        v
    }

    /// WORKDIR so far ("" when none was set).
    fn working_dir(&self) -> String {
        self.config
            .config
            .as_ref()
            .map(|c| c.working_dir.clone())
            .unwrap_or_default()
    }

    fn cc(&mut self) -> &mut ContainerConfig {
        self.config
            .config
            .get_or_insert_with(ContainerConfig::default)
    }

    fn rootfs(&self) -> Result<&Root, BuildError> {
        self.rootfs
            .as_ref()
            .ok_or_else(|| BuildError::Invalid("the stage rootfs is not mounted".into()))
    }

    /// Mounts the rootfs for a step that changes files: the base, this stage's snapshots,
    /// and a fresh upper directory for the step's own changes.
    fn mount_step(&mut self) -> Result<(), BuildError> {
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

    /// Unmounts after a step and keeps its changes: as a cache snapshot recorded under
    /// `key`, or (cache off) as a staged directory for this build only.
    fn finish_step(&mut self, key: &Digest, description: &str) -> Result<(), BuildError> {
        self.rootfs = None;
        if let Some(m) = self.mount.take() {
            m.unmount()
                .map_err(|e| BuildError::Invalid(format!("unmounting the stage rootfs: {e}")))?;
        }
        let upper = self
            .upper
            .take()
            .ok_or_else(|| BuildError::Invalid("no upper directory".into()))?;
        let empty = std::fs::read_dir(upper.diff_dir())
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        let store = self.ctx.store;
        if self.opts.cache == CacheMode::Off {
            if !empty {
                self.snaps
                    .push(Snapshot::local(upper.diff_dir(), Some(upper)));
            }
            return Ok(());
        }
        let (snapshot, size) = if empty {
            (None, 0)
        } else {
            let (id, size) = store.adopt_snapshot(upper, self.lease)?;
            (Some(id), size)
        };
        let record = Record {
            snapshot: snapshot.clone(),
            size,
            ..Record::new(&self.key, description)
        };
        let kept = store.cache().put(key, record)?;
        self.cache_keys.push(key.clone());
        if let Some(id) = snapshot {
            if kept {
                self.snaps
                    .push(Snapshot::local(store.cache().snapshot_dir(&id), None));
            } else {
                // A concurrent build recorded the same step first: use its snapshot.
                self.use_record(key)?;
            }
        }
        Ok(())
    }

    /// Records a step that changes no files (config only).
    fn record_config_step(&mut self, key: &Digest, description: &str) -> Result<(), BuildError> {
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
    fn use_record(&mut self, key: &Digest) -> Result<bool, BuildError> {
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
                    _staged: None,
                    remote: Some(key.clone()),
                });
            } else {
                // No files: the record itself is all there is to import.
                remote
                    .import(key, self.lease)
                    .map_err(BuildError::Invalid)?;
            }
            self.cache_keys.push(key.clone());
            return Ok(true);
        };
        if let Some(id) = &r.snapshot {
            let dir = store.cache().snapshot_dir(id);
            if !dir.is_dir() {
                return Ok(false);
            }
            self.snaps.push(Snapshot::local(dir, None));
        }
        self.cache_keys.push(key.clone());
        Ok(true)
    }

    /// Whether step `key` comes from the cache (then its snapshot is stacked and the line
    /// says so); once one step misses, every later one runs.
    fn try_cache(&mut self, key: &Digest) -> Result<bool, BuildError> {
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

    pub fn execute(
        &mut self,
        step_no: &mut usize,
        used_args: &mut Vec<String>,
    ) -> Result<StageResult, BuildError> {
        let stage = &self.df.stages[self.index];
        let from = stage.from.clone();
        *step_no += 1;
        (self.step_line)(self.index, &from.original);
        let expanded = from
            .instruction
            .expand(self.lexer, &self.meta.to_vec())
            .map_err(|e| step_err(*step_no, &from, e.to_string()))?;
        let Instruction::From {
            image, platform, ..
        } = expanded
        else {
            return Err(step_err(*step_no, &from, "not a FROM"));
        };
        if let Some(p) = platform {
            let want = format!("linux/{}", host_architecture());
            if p != want {
                return Err(step_err(
                    *step_no,
                    &from,
                    format!("platform {p} is not supported: this builder builds {want}"),
                ));
            }
        }
        let base = if image.eq_ignore_ascii_case("scratch") {
            StageResult {
                config: ImageConfig {
                    architecture: host_architecture().into(),
                    os: "linux".into(),
                    rootfs: RootFs {
                        kind: "layers".into(),
                        diff_ids: Vec::new(),
                    },
                    ..Default::default()
                },
                layers: Vec::new(),
                blobs: Vec::new(),
                key: KeyBuilder::new("scratch", None).finish(),
            }
        } else if let Some(r) = self.stage_result(&image) {
            r.clone()
        } else {
            image_base(self.ctx, &image).map_err(|e| in_step(*step_no, &from, e))?
        };
        for l in &base.layers {
            self.lease.layer(&l.chain_id);
        }
        for b in &base.blobs {
            self.lease.blob(b);
        }
        self.config = base.config.clone();
        self.config.history.clear();
        self.history = base.config.history.clone();
        self.base_layers = base.layers.clone();
        self.base_blobs = base.blobs.clone();
        self.base_lowers = base
            .layers
            .iter()
            .rev()
            .map(|l| self.ctx.store.layer_dir(&l.chain_id).join("diff"))
            .collect();
        let mut key = KeyBuilder::new("from", None);
        key.field("base", base.key.as_str().as_bytes())
            .field("platform", host_architecture().as_bytes());
        self.key = key.finish();
        self.cmd_from_base = self.config.config.as_ref().is_some_and(|c| c.cmd.is_some());
        if self.config.config.as_ref().is_none_or(|c| c.env.is_none()) {
            self.cc().env = Some(vec![format!("PATH={DEFAULT_PATH}")]);
        }
        // ONBUILD triggers of the base run first, then are cleared.
        let triggers = self.cc().on_build.take().unwrap_or_default();
        let mut steps: Vec<Step> = Vec::new();
        for t in triggers {
            let parsed =
                isula_dockerfile::instructions::parse_dockerfile(&format!("FROM scratch\n{t}\n"))
                    .map_err(|e| step_err(*step_no, &from, format!("ONBUILD trigger {t:?}: {e}")))?;
            for mut s in parsed.stages.into_iter().flat_map(|s| s.steps) {
                s.line = from.line;
                steps.push(s);
            }
        }
        steps.extend(stage.steps.iter().cloned());
        for step in &steps {
            if self.ctx.cancelled() {
                return Err(BuildError::Cancelled);
            }
            *step_no += 1;
            (self.step_line)(self.index, &step.original);
            self.step(*step_no, step, used_args)?;
        }
        self.commit()
    }

    fn history_entry(&mut self, step: &Step) {
        self.history.push(History {
            created: Some(now_rfc3339(self.opts.build_time)),
            created_by: Some(step.original.clone()),
            comment: Some("isula-build".into()),
            empty_layer: true,
            ..Default::default()
        });
    }

    fn step(
        &mut self,
        n: usize,
        step: &Step,
        used_args: &mut Vec<String>,
    ) -> Result<(), BuildError> {
        let vars = self.vars();
        let ins = step
            .instruction
            .expand(self.lexer, &vars)
            .map_err(|e| step_err(n, step, e.to_string()))?;
        // Config-only steps are keyed by what they say after expansion (an ARG by its name:
        // its value enters the keys of the steps that use it).
        let changes_files = matches!(
            ins,
            Instruction::Run { .. }
                | Instruction::Copy(_)
                | Instruction::Add(_)
                | Instruction::Workdir(_)
        );
        let config_key = (!changes_files).then(|| {
            let mut k = KeyBuilder::new("config", Some(&self.key));
            match &ins {
                Instruction::Arg(pairs) => {
                    let names: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
                    k.json("arg", &names);
                }
                other => {
                    k.json("instruction", other);
                }
            }
            k.finish()
        });
        match ins {
            Instruction::From { .. } => return Err(step_err(n, step, "FROM inside a stage")),
            Instruction::Arg(pairs) => {
                for (k, default) in pairs {
                    used_args.push(k.clone());
                    let value = self
                        .opts
                        .build_args
                        .iter()
                        .rev()
                        .find(|(name, _)| name == &k)
                        .map(|(_, v)| v.clone())
                        .or(default)
                        .or_else(|| {
                            self.meta
                                .iter()
                                .rev()
                                .find(|(name, _)| name == &k)
                                .map(|(_, v)| v.clone())
                        });
                    let value = value.unwrap_or_default();
                    // Re-declaring an ARG replaces it (its new value is what RUN sees).
                    match self.args.iter_mut().find(|(name, _)| *name == k) {
                        Some(existing) => existing.1 = value,
                        None => self.args.push((k, value)),
                    }
                }
            }
            Instruction::Env(pairs) => {
                let env = self.cc().env.get_or_insert_with(Vec::new);
                for (k, v) in pairs {
                    let entry = format!("{k}={v}");
                    match env
                        .iter_mut()
                        .find(|e| e.split_once('=').map(|(n, _)| n) == Some(k.as_str()))
                    {
                        Some(e) => *e = entry,
                        None => env.push(entry),
                    }
                }
            }
            Instruction::Label(pairs) => {
                let labels = self.cc().labels.get_or_insert_with(BTreeMap::new);
                for (k, v) in pairs {
                    labels.insert(k, v);
                }
            }
            Instruction::Maintainer(m) => self.config.author = Some(m),
            Instruction::Expose(ports) => {
                let mut expanded = Vec::new();
                for p in ports {
                    expanded.extend(expand_port(&p).map_err(|e| step_err(n, step, e))?);
                }
                let map = self.cc().exposed_ports.get_or_insert_with(BTreeMap::new);
                for p in expanded {
                    map.insert(p, serde_json::json!({}));
                }
            }
            Instruction::Volume(vols) => {
                if vols.iter().any(|v| v.trim().is_empty()) {
                    return Err(step_err(
                        n,
                        step,
                        "VOLUME specified can not be an empty string",
                    ));
                }
                let map = self.cc().volumes.get_or_insert_with(BTreeMap::new);
                for v in vols {
                    map.insert(v, serde_json::json!({}));
                }
            }
            Instruction::User(u) => self.cc().user = u,
            Instruction::Workdir(w) => {
                let cur = self.cc().working_dir.clone();
                let path = if w.starts_with('/') {
                    clean(&w)
                } else {
                    clean(&format!("/{cur}/{w}"))
                };
                // BuildKit: missing directories are made 0755 and owned by the USER.
                let user_spec = self.cc().user.clone();
                let mut k = KeyBuilder::new("workdir", Some(&self.key));
                k.field("path", path.as_bytes())
                    .field("user", user_spec.as_bytes());
                let key = k.finish();
                if !self.try_cache(&key)? {
                    self.mount_step()?;
                    let made = (|| {
                        let root = self.rootfs()?;
                        let owner = if user_spec.is_empty() {
                            None
                        } else {
                            let ids = user::resolve(root, &user_spec, true)
                                .map_err(|e| step_err(n, step, e))?;
                            Some((ids.uid, ids.gid))
                        };
                        copy::mkdir_all_owned(root, &path, owner)
                            .map_err(|e| step_err(n, step, format!("creating {path}: {e}")))
                    })();
                    made?;
                    self.finish_step(&key, &step.original)?;
                }
                self.key = key;
                self.cc().working_dir = path;
            }
            Instruction::StopSignal(s) => self.cc().stop_signal = s,
            Instruction::Shell(s) => self.cc().shell = Some(s),
            Instruction::Cmd(c) => {
                let v = self.command_args(c);
                self.cc().cmd = Some(v);
                self.cmd_from_base = false;
            }
            Instruction::Entrypoint(c) => {
                let v = self.command_args(c);
                self.cc().entrypoint = Some(v);
                if self.cmd_from_base {
                    // Docker: a new ENTRYPOINT resets an inherited CMD.
                    self.cc().cmd = None;
                    self.cmd_from_base = false;
                }
            }
            Instruction::Healthcheck(h) => {
                self.cc().healthcheck = Some(match h {
                    None => HealthConfig {
                        test: Some(vec!["NONE".into()]),
                        ..Default::default()
                    },
                    Some(h) => HealthConfig {
                        test: Some(h.test),
                        interval: h.interval,
                        timeout: h.timeout,
                        start_period: h.start_period,
                        start_interval: h.start_interval,
                        retries: h.retries,
                    },
                });
            }
            Instruction::Onbuild(t) => self.cc().on_build.get_or_insert_with(Vec::new).push(t),
            Instruction::Run {
                command, heredocs, ..
            } => {
                self.run(n, step, command, &heredocs)?;
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                let is_add = matches!(step.instruction, Instruction::Add(_));
                self.copy(n, step, c, is_add)?;
            }
        }
        if let Some(key) = config_key {
            if !self.try_cache(&key)? {
                self.record_config_step(&key, &step.original)?;
            }
            self.key = key;
        }
        self.history_entry(step);
        if changes_files {
            self.last_fs_step = Some(self.history.len() - 1);
        }
        Ok(())
    }

    fn shell(&self) -> Vec<String> {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.shell.clone())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    fn command_args(&self, c: Command) -> Vec<String> {
        match c {
            Command::Exec(v) => v,
            Command::Shell(s) => [self.shell(), vec![s]].concat(),
        }
    }

    fn run(
        &mut self,
        n: usize,
        step: &Step,
        command: Command,
        heredocs: &[isula_dockerfile::parser::Heredoc],
    ) -> Result<(), BuildError> {
        let args = match command {
            Command::Exec(v) => v,
            Command::Shell(s) => {
                let trimmed = s.trim();
                let script = match heredocs.first() {
                    // `RUN <<EOF`: the document is the script.
                    Some(h)
                        if heredocs.len() == 1
                            && trimmed
                                .trim_start_matches("<<")
                                .trim_start_matches('-')
                                .trim_matches(['"', '\''])
                                == h.name =>
                    {
                        h.content.clone()
                    }
                    // Otherwise the shell reads the documents itself.
                    Some(_) => {
                        let mut s = format!("{s}\n");
                        for h in heredocs {
                            s.push_str(&h.content);
                            s.push_str(&h.name);
                            s.push('\n');
                        }
                        s
                    }
                    None => s,
                };
                [self.shell(), vec![script]].concat()
            }
        };
        if args.is_empty() {
            return Err(step_err(n, step, "RUN needs a command"));
        }
        let user_spec = self
            .config
            .config
            .as_ref()
            .map(|c| c.user.clone())
            .unwrap_or_default();
        let cwd = Some(self.working_dir())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        // Environment: image ENV, then ARGs in scope (proxies come later: never in a key).
        let mut env: Vec<String> = self
            .config
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let set = |env: &Vec<String>, k: &str| {
            env.iter()
                .any(|e| e.split_once('=').map(|(n, _)| n) == Some(k))
        };
        for (k, v) in &self.args {
            if !set(&env, k) && !PROXY_ARGS.contains(&k.as_str()) {
                env.push(format!("{k}={v}"));
            }
        }
        let mut key = KeyBuilder::new("run", Some(&self.key));
        key.json("args", &args)
            .json("env", &env)
            .field("user", user_spec.as_bytes())
            .field("cwd", cwd.as_bytes())
            .json("cap_add", &self.opts.cap_add)
            .field("network", b"host");
        let key = key.finish();
        if self.try_cache(&key)? {
            self.key = key;
            return Ok(());
        }
        self.mount_step()?;
        let root = self.rootfs()?;
        let ids = if user_spec.is_empty() {
            user::Ids {
                uid: 0,
                gid: 0,
                additional_gids: Vec::new(),
            }
        } else {
            user::resolve(root, &user_spec, true).map_err(|e| step_err(n, step, e))?
        };
        root.dir(Path::new(&cwd), Resolve::InRoot, true)
            .map_err(|e| step_err(n, step, format!("working directory {cwd}: {e}")))?;
        for p in PROXY_ARGS {
            if set(&env, p) {
                continue;
            }
            if let Some((_, v)) = self.opts.build_args.iter().rev().find(|(k, _)| k == p) {
                env.push(format!("{p}={v}"));
            } else if let Some((_, v)) = self.args.iter().find(|(k, _)| k == p) {
                env.push(format!("{p}={v}"));
            } else if self.opts.proxy {
                if let Some((_, v)) = self.opts.host_proxy_env.iter().find(|(k, _)| k == p) {
                    env.push(format!("{p}={v}"));
                }
            }
        }
        if !set(&env, "PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        // Mount points runc creates must not end up in the layer.
        let mount_points = [
            "/proc",
            "/dev",
            "/sys",
            "/etc",
            "/etc/hosts",
            "/etc/resolv.conf",
        ];
        let missing: Vec<&str> = mount_points
            .iter()
            .copied()
            .filter(|p| {
                root.open_at(Path::new(p), Resolve::InRoot, OFlags::PATH, Mode::empty())
                    .is_err()
            })
            .collect();
        let process = Process {
            args,
            env,
            cwd,
            uid: ids.uid,
            gid: ids.gid,
            additional_gids: ids.additional_gids,
            cap_add: self.opts.cap_add.clone(),
        };
        let bundle = self.dir.join(format!("bundle-{n}"));
        std::fs::create_dir_all(&bundle)
            .map_err(|e| isula_store::StoreError::io("create", &bundle, e))?;
        let rootfs_path = self.dir.join("rootfs");
        let mut pending = Vec::new();
        let cancel = self.ctx.cancel.clone();
        let log = &mut *self.ctx.log;
        let result = self
            .ctx
            .runc
            .run(&bundle, &rootfs_path, &process, &cancel, &mut |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    log(String::from_utf8_lossy(&line).to_string());
                }
                // Output without newlines is passed on in pieces, not held.
                if pending.len() >= RUN_OUTPUT_PIECE {
                    log(String::from_utf8_lossy(&pending).to_string());
                    pending.clear();
                }
            });
        if !pending.is_empty() {
            (self.ctx.log)(format!("{}\n", String::from_utf8_lossy(&pending)));
        }
        let _ = std::fs::remove_dir_all(&bundle);
        let root = self.rootfs()?;
        for p in missing.iter().rev() {
            if let Ok((pfd, name)) = root.parent(Path::new(p), Resolve::InRoot, false) {
                if let Ok(Some(st)) =
                    isula_sys::rooted::lstat(std::os::fd::AsFd::as_fd(&pfd), &name)
                {
                    let empty_file = rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::RegularFile
                        && st.st_size == 0;
                    if empty_file {
                        let _ = rustix::fs::unlinkat(&pfd, &name, rustix::fs::AtFlags::empty());
                    } else if isula_sys::rooted::is_dir(&st) {
                        // Only if runc left it empty.
                        let _ = rustix::fs::unlinkat(&pfd, &name, rustix::fs::AtFlags::REMOVEDIR);
                    }
                }
            }
        }
        match result {
            Ok(0) => {
                self.finish_step(&key, &step.original)?;
                self.key = key;
                Ok(())
            }
            Ok(code) => Err(step_err(
                n,
                step,
                format!("the command returned a non-zero code: {code}"),
            )),
            Err(isula_runtime::RuntimeError::Cancelled) => Err(BuildError::Cancelled),
            Err(e) => Err(step_err(n, step, e.to_string())),
        }
    }

    fn copy(
        &mut self,
        n: usize,
        step: &Step,
        c: isula_dockerfile::instructions::CopyArgs,
        is_add: bool,
    ) -> Result<(), BuildError> {
        // An image named by --from is found (or pulled) before the rootfs is borrowed.
        let from_result = match &c.from {
            Some(from) => Some(match self.stage_result(from) {
                Some(r) => r.clone(),
                None => image_base(self.ctx, from).map_err(|e| in_step(n, step, e))?,
            }),
            None => None,
        };
        let cwd = self.working_dir();
        copy::refuse_remote(&c.sources, is_add).map_err(|e| step_err(n, step, e))?;
        // The build context, opened once for the key and the copy.
        let ctx_root = match (&c.from, c.sources.is_empty()) {
            (None, false) => {
                Some(Root::open(&self.opts.context).map_err(|e| step_err(n, step, e.to_string()))?)
            }
            _ => None,
        };
        // What the sources are: their content (context), or the key of the stage or image.
        let sources = match (&from_result, &ctx_root) {
            (Some(r), _) => r.key.clone(),
            (None, Some(root)) => {
                let src = Source {
                    root,
                    ignore: self.ignore,
                };
                let mut hashes = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
                hash_sources(&src, &c.sources, &mut hashes).map_err(|e| step_err(n, step, e))?
            }
            (None, None) => KeyBuilder::new("no-sources", None).finish(),
        };
        let mut key = KeyBuilder::new(if is_add { "add" } else { "copy" }, Some(&self.key));
        key.json("instruction", &c)
            .field("cwd", cwd.as_bytes())
            .field("sources", sources.as_str().as_bytes());
        let key = key.finish();
        if self.try_cache(&key)? {
            self.key = key;
            return Ok(());
        }
        self.mount_step()?;
        self.copy_into(n, step, c, is_add, from_result, ctx_root.as_ref())?;
        self.finish_step(&key, &step.original)?;
        self.key = key;
        Ok(())
    }

    fn copy_into(
        &mut self,
        n: usize,
        step: &Step,
        c: isula_dockerfile::instructions::CopyArgs,
        is_add: bool,
        from_result: Option<StageResult>,
        ctx_root: Option<&Root>,
    ) -> Result<(), BuildError> {
        let cwd = self.working_dir();
        let root = self.rootfs()?;
        let owner = match &c.chown {
            None => None,
            Some(spec) => {
                let ids = user::resolve(root, spec, false).map_err(|e| step_err(n, step, e))?;
                Some((ids.uid, ids.gid))
            }
        };
        let chmod = match &c.chmod {
            None => None,
            Some(m) => Some(
                u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        step_err(
                            n,
                            step,
                            format!("invalid --chmod {m:?}: expected an octal mode"),
                        )
                    })?,
            ),
        };
        let dest = if c.dest.starts_with('/') {
            c.dest.clone()
        } else {
            let joined = format!("/{cwd}/{}", c.dest);
            let mut d = clean(&joined);
            if c.dest.ends_with('/') || c.dest == "." || c.dest.ends_with("/.") {
                d.push('/');
            }
            d
        };
        let opts = CopyOptions {
            owner,
            chmod,
            extract: is_add,
        };
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
        if c.sources.is_empty() {
            return Ok(());
        }
        match &c.from {
            None => {
                let ctx_root =
                    ctx_root.ok_or_else(|| step_err(n, step, "the build context is not open"))?;
                let src = Source {
                    root: ctx_root,
                    ignore: self.ignore,
                };
                copy::copy(&src, &c.sources, root, &dest, &opts).map_err(|e| step_err(n, step, e))
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
                    .map(|l| self.ctx.store.layer_dir(&l.chain_id).join("diff"))
                    .collect();
                let guard = if lowers.is_empty() {
                    None
                } else {
                    Some(
                        mount_overlay_ro(&lowers, &view, &empty)
                            .map_err(|e| step_err(n, step, format!("mounting {from}: {e}")))?,
                    )
                };
                let src_root = Root::open(&view).map_err(|e| step_err(n, step, e.to_string()))?;
                let src = Source {
                    root: &src_root,
                    ignore: None,
                };
                let r = copy::copy(&src, &c.sources, root, &dest, &opts)
                    .map_err(|e| step_err(n, step, e));
                drop(src_root);
                drop(guard);
                r
            }
        }
    }

    /// Unmounts and turns the upper directory into the stage's layer.
    /// The stage's committed result recorded under `key`, if every part is still there.
    fn cached_stage(&mut self, key: &Digest) -> Result<Option<StageResult>, BuildError> {
        let store = self.ctx.store;
        let mut found = store.cache().get(key, self.lease);
        if found.is_none() {
            if let Some(remote) = self.ctx.remote {
                if remote.lookup(key).is_some_and(|r| r.stage) {
                    remote
                        .import(key, self.lease)
                        .map_err(BuildError::Invalid)?;
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
    fn commit(&mut self) -> Result<StageResult, BuildError> {
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
            let stack: Vec<&Path> = self.snaps.iter().rev().map(|s| s.dir.as_path()).collect();
            let staged = store.squash(&stack, guard.as_ref().map(|_| view.as_path()))?;
            drop(guard);
            Some(staged)
        };
        let empty = upper.as_ref().is_none_or(|u| {
            std::fs::read_dir(u.diff_dir())
                .map(|mut d| d.next().is_none())
                .unwrap_or(true)
        });
        let mut new_layer_size = 0;
        if let (false, Some(upper)) = (empty, upper) {
            let opts = DiffOptions {
                clamp_mtime: self.opts.build_time,
                exclude: Default::default(),
            };
            let writer = store.content().writer()?;
            let writer = write_layer(
                &upper.diff_dir(),
                std::io::BufWriter::with_capacity(1 << 20, writer),
                &opts,
            )?;
            let writer = writer.into_inner().map_err(|e| {
                isula_store::StoreError::io("write", upper.diff_dir(), e.into_error())
            })?;
            let (blob, size) = self.lease.commit_blob(writer, None)?;
            // Its gzip form, for pushing, is made in the background.
            store.queue_compression(&blob);
            let diff = DiffId(blob.clone());
            let chain = ChainId::next(layers.last().map(|l| &l.chain_id), &diff);
            store.commit_layer(upper, &chain, self.lease)?;
            new_layer_size = size;
            layers.push(LayerRecord {
                parent: layers.last().map(|l| l.chain_id.clone()),
                chain_id: chain,
                diff_id: diff.clone(),
                size,
            });
            blobs.push(blob);
            config.rootfs.kind = "layers".into();
            config.rootfs.diff_ids.push(diff);
            let at = self
                .last_fs_step
                .unwrap_or(self.history.len().saturating_sub(1));
            if let Some(h) = self.history.get_mut(at) {
                h.empty_layer = false;
            }
        }
        config.created = Some(now_rfc3339(self.opts.build_time));
        if config.architecture.is_empty() {
            config.architecture = host_architecture().into();
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

/// `8000-8002/udp` → each port; the protocol defaults to tcp.
pub fn expand_port(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let parse = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("invalid port {spec:?}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(ports)?, parse(ports)?),
    };
    if hi < lo {
        return Err(format!("invalid port range {spec:?}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
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
            let mut head = [0u8; 8];
            let n = std::io::Read::read(&mut store.content().open(b)?, &mut head).unwrap_or(0);
            let media_type = match (
                isula_store::compression::Compression::sniff(&head[..n]),
                oci,
            ) {
                (isula_store::compression::Compression::Gzip, false) => media::DOCKER_LAYER_GZIP,
                (isula_store::compression::Compression::Gzip, true) => media::OCI_LAYER_GZIP,
                (isula_store::compression::Compression::Zstd, _) => media::OCI_LAYER_ZSTD,
                _ => layer_type,
            };
            Ok(Descriptor::new(
                media_type,
                b.clone(),
                store.content().size(b)?,
            ))
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

#[cfg(test)]
mod tests {
    use super::expand_port;

    #[test]
    fn ports() {
        assert_eq!(expand_port("80"), Ok(vec!["80/tcp".to_string()]));
        assert_eq!(expand_port("8000-8002/UDP").map(|v| v.len()), Ok(3));
        assert!(expand_port("x").is_err());
        assert!(expand_port("80/foo").is_err());
        assert!(expand_port("9-3").is_err());
    }
}
