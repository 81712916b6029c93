//! One stage: its base, its mounted rootfs, the instructions in order, and its commit.

mod commit;
mod copy_step;
pub mod mounts;
mod remote;
mod run;
mod snapshot;

pub use commit::commit_image;

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
use isula_store::{LayerRecord, Lease, NewImage, StagedLayer};
use isula_sys::mount::{mount_overlay, mount_overlay_ro, MountGuard};
use isula_sys::{Resolve, Root};
use isula_types::image::{
    host_architecture, ContainerConfig, Descriptor, HealthConfig, History, ImageConfig, Manifest,
    RootFs,
};
use isula_types::{limits, media, Digest, ImageId, Reference};
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
    /// The ids of the cache mounts the build's RUN steps used.
    pub used_cache_mounts: &'c std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// What the build fetched (base images, ADD URLs and commits), for its provenance.
    pub materials: &'c std::sync::Mutex<Vec<isula_attest::slsa::Material>>,
    /// Prints a `STEP n: ...` line for stage `index` (the number is given where the
    /// stage's lines are put in order).
    pub step_line: &'c (dyn Fn(usize, &str) + Sync),
    /// Per stage: a later stage of the build uses it (FROM, COPY --from, a RUN mount).
    pub used_later: &'c [bool],
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
    used_cache_mounts: &'c std::sync::Mutex<std::collections::BTreeSet<String>>,
    materials: &'c std::sync::Mutex<Vec<isula_attest::slsa::Material>>,
    /// The base's layer directories, top first.
    base_lowers: Vec<PathBuf>,
    /// The stage's platform (`FROM --platform`, else the build's).
    platform: isula_types::platform::BuildPlatform,
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
    /// The running COPY's lineage (its key without its sources) and its plan of files to
    /// link from the previous version, applied once the step is unmounted.
    step_lineage: Option<Digest>,
    reuse_plan: Option<crate::reuse::Plan>,
    /// The remote sources of the ADD being copied, fetched.
    add_fetched: Vec<remote::Fetched>,
    /// A step after the running one changes files (RUN, COPY, ADD, WORKDIR).
    files_after: bool,
    /// A later stage of the build uses this one's files.
    used_later: bool,
}

/// One step's own changes: a cache snapshot, (cache off) a staged directory that goes
/// away with the build, a `--cache-from` record not fetched yet (it is fetched only
/// when a later step or the commit needs its files), or a layer the step wrote as a tar
/// (a COPY that was its stage's last step to change files, see `copy_step`): its
/// directory is made only if a later step or the commit needs its files.
struct Snapshot {
    dir: PathBuf,
    /// A snapshot of this build's own (not the cache's): removed with it.
    staged: Option<StagedLayer>,
    remote: Option<Digest>,
    packed: Option<PackedStep>,
}

/// The layer a step wrote as a tar, on the stage's base.
#[derive(Clone)]
struct PackedStep {
    layer: LayerRecord,
    /// Its blob: the tar itself, or (a record imported from a registry) its gzip.
    blob: Digest,
    /// The step's cache record holds the layer (and counts its size).
    recorded: bool,
}

impl Snapshot {
    fn local(dir: PathBuf, staged: Option<StagedLayer>) -> Snapshot {
        Snapshot {
            dir,
            staged,
            remote: None,
            packed: None,
        }
    }

    fn packed(layer: LayerRecord, blob: Digest, recorded: bool) -> Snapshot {
        Snapshot {
            dir: PathBuf::new(),
            staged: None,
            remote: None,
            packed: Some(PackedStep {
                layer,
                blob,
                recorded,
            }),
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

/// A platform as keys name it (the architecture alone for this machine's, as always).
fn platform_key(p: &isula_types::platform::BuildPlatform) -> String {
    if p.is_host() {
        host_architecture().to_string()
    } else {
        p.to_string()
    }
}

/// Loads an image of the store as a stage base.
/// With a puller (the daemon's), a name missing from the store is pulled first.
/// The image must be for `platform` (a local image of another platform is an error, never
/// a silent mix).
fn image_base(
    ctx: &mut Context<'_>,
    name: &str,
    platform: &isula_types::platform::BuildPlatform,
    materials: &std::sync::Mutex<Vec<isula_attest::slsa::Material>>,
) -> Result<StageResult, BuildError> {
    let store = ctx.store;
    let img = match (store.resolve(name), ctx.pull) {
        // Another platform's image of that name: the daemon finds or pulls this
        // platform's, which joins it under the name.
        (Ok(img), Some(pull)) if !image_fits(store, &img, platform) => {
            let id = pull(name, platform, &mut *ctx.log)
                .map_err(|f| BuildError::External(f.kind, f.message))?;
            store.image(&id)?
        }
        (Ok(img), _) => img,
        (Err(isula_store::StoreError::ImageNotFound(_)), Some(pull)) => {
            let id = pull(name, platform, &mut *ctx.log)
                .map_err(|f| BuildError::External(f.kind, f.message))?;
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
    if !config.architecture.is_empty()
        && !platform.matches(&config.os, &config.architecture, config.variant.as_deref())
    {
        let have = match config.variant.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => format!("{}/{}/{v}", config.os, config.architecture),
            None => format!("{}/{}", config.os, config.architecture),
        };
        return Err(BuildError::Invalid(format!(
            "image {name} is for {have}, not {platform}: pull or load its {platform} image (ctr-img pull --platform {platform})"
        )));
    }
    let layers = img
        .layers
        .iter()
        .map(|c| store.layer(c))
        .collect::<Result<Vec<_>, _>>()?;
    let purl = match Reference::parse(name) {
        Ok(r) => isula_attest::intoto::image_purl(&r, &platform.to_string()),
        // An image named by its ID: a local one.
        Err(_) => format!("pkg:oci/{}", isula_attest::purl_escape(name)),
    };
    materials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(isula_attest::slsa::Material::Image {
            purl,
            manifest: img.manifest.to_string(),
        });
    let mut key = KeyBuilder::new("image", None);
    key.field("id", img.id.digest().as_str().as_bytes());
    Ok(StageResult {
        config,
        layers,
        blobs: img.blobs.clone(),
        key: key.finish(),
    })
}

/// Whether the stored image is for `platform` (one whose config names no architecture,
/// or cannot be read here, is taken as is: the caller checks it).
fn image_fits(
    store: &isula_store::Store,
    img: &isula_store::ImageRecord,
    platform: &isula_types::platform::BuildPlatform,
) -> bool {
    let Ok(raw) = store
        .content()
        .read_small(img.id.digest(), limits::MANIFEST_MAX)
    else {
        return true;
    };
    let Ok(config) = serde_json::from_slice::<ImageConfig>(&raw) else {
        return true;
    };
    config.architecture.is_empty()
        || platform.matches(&config.os, &config.architecture, config.variant.as_deref())
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
            used_cache_mounts: shared.used_cache_mounts,
            materials: shared.materials,
            base_lowers: Vec::new(),
            platform: shared.opts.target_platform(),
            key: KeyBuilder::new("none", None).finish(),
            hitting: opts.cache == CacheMode::On,
            dir: opts.work_dir.join(format!("stage-{index}")),
            rootfs: None,
            mount: None,
            upper: None,
            snaps: Vec::new(),
            cache_keys: Vec::new(),
            step_lineage: None,
            reuse_plan: None,
            add_fetched: Vec::new(),
            files_after: true,
            used_later: shared.used_later.get(index).copied().unwrap_or(true),
        }
    }

    /// The cache keys this stage hit or recorded, in order.
    pub fn take_cache_keys(&mut self) -> Vec<Digest> {
        std::mem::take(&mut self.cache_keys)
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
        if let Some(p) = platform.filter(|p| !p.is_empty()) {
            self.platform = isula_types::platform::BuildPlatform::parse(&p)
                .map_err(|e| step_err(*step_no, &from, format!("--platform: {e}")))?;
        }
        let stage_platform = self.platform.clone();
        let base = if image.eq_ignore_ascii_case("scratch") {
            StageResult {
                config: ImageConfig {
                    architecture: stage_platform.architecture.clone(),
                    os: stage_platform.os.clone(),
                    variant: stage_platform.variant.clone(),
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
        } else if let Some(named) = self.opts.named_context(&image) {
            match named {
                crate::NamedContext::Image(r) => {
                    let r = r.clone();
                    image_base(self.ctx, &r, &stage_platform, self.materials)
                        .map_err(|e| in_step(*step_no, &from, e))?
                }
                crate::NamedContext::Dir(d) => {
                    return Err(step_err(
                        *step_no,
                        &from,
                        format!(
                            "FROM {image}: the build context {image} is a directory ({}); FROM takes an image (--build-context {image}=docker-image://REF)",
                            d.display()
                        ),
                    ))
                }
            }
        } else if let Some(r) = self.stage_result(&image) {
            r.clone()
        } else {
            image_base(self.ctx, &image, &stage_platform, self.materials)
                .map_err(|e| in_step(*step_no, &from, e))?
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
            .map(|l| self.ctx.store.layer_diff(&l.chain_id, self.lease))
            .collect::<Result<_, _>>()?;
        let mut key = KeyBuilder::new("from", None);
        key.field("base", base.key.as_str().as_bytes())
            .field("platform", platform_key(&stage_platform).as_bytes());
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
        let last_files = steps.iter().rposition(|s| {
            matches!(
                s.instruction,
                Instruction::Run { .. }
                    | Instruction::Copy(_)
                    | Instruction::Add(_)
                    | Instruction::Workdir(_)
            )
        });
        for (i, step) in steps.iter().enumerate() {
            if self.ctx.cancelled() {
                return Err(BuildError::Cancelled);
            }
            self.files_after = last_files.is_some_and(|l| l > i);
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
                command,
                heredocs,
                mounts,
                network,
                security,
            } => {
                let flags = run::RunFlags {
                    heredocs: &heredocs,
                    mounts: &mounts,
                    network: network.as_deref(),
                    security: security.as_deref(),
                };
                self.run(n, step, command, flags)?;
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
