//! Runs a parsed Dockerfile. The daemon hands in the store, the runtime and the options;
//! this crate never constructs them. Each needed stage is executed on an overlay of its
//! base image's layers with a fresh upper directory: config instructions change the image
//! config, RUN goes through runc, COPY/ADD write through the rootfs handle, and the stage
//! ends with one commit (the manual: one commit per stage) whose layer is the upper
//! directory itself. Progress lines (`STEP  N: ...`, RUN output, the copy lines, the
//! result) go to the caller as they happen.

mod attest;
pub mod cache_key;
pub mod copy;
pub mod reuse;
mod schedule;
pub mod stage;
pub mod user;

use isula_dockerfile::ignore::{Matcher, DOCKERIGNORE_MAX};
use isula_dockerfile::instructions::{parse_dockerfile, Dockerfile, Instruction};
use isula_dockerfile::lex::Lexer;
use isula_runtime::{CancelFlag, Runtime};
use isula_store::{LayerRecord, Store, StoreError};
use isula_types::image::ImageConfig;
use isula_types::{Digest, ImageId, Reference};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

pub use isula_types::PROXY_ARGS;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Parse(#[from] isula_dockerfile::parser::ParseError),
    #[error("invalid build: {0}")]
    Invalid(String),
    #[error("STEP {step} (line {line}) {instruction}: {message}")]
    Step {
        step: usize,
        line: usize,
        instruction: String,
        message: String,
        /// What kind of failure it was (a failed pull keeps the registry's kind).
        kind: isula_store::ErrorKind,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something outside failed (a pull), with its kind.
    #[error("{1}")]
    External(isula_store::ErrorKind, String),
    /// A `--cache-from` source failed while the build fetched from it.
    #[error("{0}")]
    CacheSource(String),
    #[error("build cancelled")]
    Cancelled,
}

impl BuildError {
    /// The error with its step number counted from the build's first step (a stage
    /// counts its own steps from 1).
    fn renumbered(self, offset: usize) -> BuildError {
        match self {
            BuildError::Step {
                step,
                line,
                instruction,
                message,
                kind,
            } => BuildError::Step {
                step: step + offset,
                line,
                instruction,
                message,
                kind,
            },
            e => e,
        }
    }

    pub fn kind(&self) -> isula_store::ErrorKind {
        use isula_store::ErrorKind as K;
        match self {
            BuildError::Parse(_) | BuildError::Invalid(_) => K::InvalidArgument,
            BuildError::Step { kind, .. } => *kind,
            BuildError::Store(e) => e.kind(),
            BuildError::External(kind, _) => *kind,
            BuildError::CacheSource(_) => K::Unavailable,
            BuildError::Cancelled => K::Unavailable,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub build_id: String,
    pub dockerfile: String,
    pub context: PathBuf,
    /// The context is a tree the daemon synced from a client (SyncContext), whose files are
    /// never written nor changed in place: a COPY may hard-link them into its layer where
    /// the layer's file would have the same owner, mode and mtime, and their content hashes
    /// are kept by inode, size and mtime (a link changes the ctime).
    pub synced_context: bool,
    pub build_args: Vec<(String, String)>,
    pub tags: Vec<Reference>,
    /// Normalised capability names.
    pub cap_add: Vec<String>,
    /// RUN without the seccomp filter.
    pub seccomp_unconfined: bool,
    /// Pass the daemon's proxy variables to RUN.
    pub proxy: bool,
    /// `--build-static` build time (seconds since the epoch).
    pub build_time: Option<i64>,
    pub target: Option<String>,
    /// A private directory for this build's mounts and bundles (removed at the end).
    pub work_dir: PathBuf,
    pub mount_options: Vec<String>,
    /// `--format oci`: OCI media types for the image's manifest and config.
    pub oci: bool,
    /// The daemon's own proxy environment (for `--proxy`).
    pub host_proxy_env: Vec<(String, String)>,
    /// How this build uses the build cache.
    pub cache: CacheMode,
    /// The cache's size cap in bytes (None: no cap): least recently used records go
    /// after the build.
    pub cache_max: Option<u64>,
    /// Bytes of the data root's file system the cache leaves free (None: no floor):
    /// least recently used records go after the build while less is free.
    pub cache_keep_free: Option<u64>,
    /// `--secret` values for `RUN --mount=type=secret`.
    pub secrets: Secrets,
    /// The network of RUN steps that name none (`--network`).
    pub network: Network,
    /// `--label` additions to the image config, after the Dockerfile's.
    pub labels: Vec<(String, String)>,
    /// `--add-host` lines (host, address) for RUN steps' /etc/hosts.
    pub add_hosts: Vec<(String, String)>,
    /// `RUN --security=insecure` is allowed (the daemon's `--allow-insecure`).
    pub allow_insecure: bool,
    /// Resource limits of every RUN step (`--memory`, `--cpu-*`, `--pids-limit`, ...).
    pub limits: isula_runtime::Limits,
    /// Named contexts (`--build-context`), lower-case names: they win over stages of
    /// the same name.
    pub contexts: Vec<(String, NamedContext)>,
    /// The platform built for (`--platform`; None: this machine's).
    pub platform: Option<isula_types::platform::BuildPlatform>,
    /// `--sbom`: attach an SPDX document of the image's packages.
    pub sbom: bool,
    /// `--provenance`: attach a SLSA v1 provenance in this mode.
    pub provenance: Option<isula_attest::slsa::Mode>,
    /// The builder's version, as the attestations name it.
    pub version: String,
}

/// What a `--build-context NAME=...` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// A directory of the client's machine (absolute).
    Dir(PathBuf),
    /// An image (`docker-image://REF`), found or pulled as FROM does.
    Image(String),
}

impl BuildOptions {
    /// The platform built for.
    pub fn target_platform(&self) -> isula_types::platform::BuildPlatform {
        self.platform
            .clone()
            .unwrap_or_else(isula_types::platform::BuildPlatform::host)
    }

    /// The named context `name` (case-insensitive), if the build has one.
    pub fn named_context(&self, name: &str) -> Option<&NamedContext> {
        let lower = name.to_ascii_lowercase();
        self.contexts
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, c)| c)
    }
}

/// A RUN step's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's network (isula-build's only one, and our default).
    #[default]
    Host,
    /// A network namespace of its own with only a loopback device.
    None,
}

impl Network {
    /// `host`, `none`, or `default` (= `build_default`), as BuildKit names them.
    pub fn parse(text: &str, build_default: Network) -> Result<Network, String> {
        match text {
            "" | "default" => Ok(build_default),
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            other => Err(format!(
                "network {other:?} is not supported: use default, none or host"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Network::Host => "host",
            Network::None => "none",
        }
    }
}

/// A build's secret values by id. Their bytes never show in `Debug` output and are zeroed
/// when the last copy goes.
#[derive(Clone, Default)]
pub struct Secrets(std::collections::BTreeMap<String, std::sync::Arc<zeroize::Zeroizing<Vec<u8>>>>);

impl Secrets {
    pub fn insert(&mut self, id: String, value: Vec<u8>) {
        self.0
            .insert(id, std::sync::Arc::new(zeroize::Zeroizing::new(value)));
    }

    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(|v| v.as_slice())
    }

    /// The ids of the values (what a provenance may name).
    pub fn ids(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// The total size of the values.
    pub fn total_len(&self) -> usize {
        self.0.values().map(|v| v.len()).sum()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Secrets")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Downloads for `ADD http(s)://...` (the daemon's HTTP stack).
pub trait Downloader: Send + Sync {
    /// Downloads `url` into the new file `dest`.
    fn download(
        &self,
        url: &str,
        dest: &std::path::Path,
        cancel: &CancelFlag,
    ) -> Result<Downloaded, String>;
}

/// What a download gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// sha256 of the bytes, lower-case hex.
    pub sha256: String,
    /// `Last-Modified`, seconds since the epoch.
    pub last_modified: Option<i64>,
}

/// Forwards the client's SSH agents (`--ssh`) into RUN steps.
pub trait SshForward: Send + Sync {
    /// The ids the client forwards.
    fn ids(&self) -> Vec<String>;
    /// Serves agent `id` on a new unix socket at `path` until the returned guard drops.
    fn serve(&self, id: &str, path: &std::path::Path) -> Result<Box<dyn Send>, String>;
}

/// How a build uses the build cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Reuse what matches, record what ran.
    #[default]
    On,
    /// `--no-cache`: run every step, still record them for later builds.
    Refresh,
    /// The daemon's cache is off: neither reuse nor record.
    Off,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    pub id: ImageId,
    /// The cache keys of the build's steps and stage results (what `--cache-to` exports),
    /// in the order the build met them.
    pub cache_keys: Vec<Digest>,
    /// The ids of the `RUN --mount=type=cache` directories the build used, sorted.
    pub cache_mounts: Vec<String>,
    /// Build args no step used (proxy variables aside), sorted. isula-build warns about
    /// them after its last line.
    pub unused_args: Vec<String>,
}

/// The warning isula-build prints for `unused` build args, after the build's last line.
pub fn unused_args_warning(unused: &[String]) -> Option<String> {
    (!unused.is_empty()).then(|| {
        format!(
            "[Warning] One or more build-args [{}] were not consumed\n",
            unused.join(" ")
        )
    })
}

/// What a `--cache-from` source holds for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRecord {
    /// The step changed files: its snapshot must be fetched before it is used.
    pub snapshot: bool,
    /// The record is a stage's committed result.
    pub stage: bool,
}

/// Build-cache records a build may import from elsewhere (`--cache-from`).
pub trait RemoteCache: Sync {
    /// What a source holds for `key`, if any.
    fn lookup(&self, key: &Digest) -> Option<RemoteRecord>;
    /// Copies the record `key` into the local cache (fetching its blobs).
    fn import(&self, key: &Digest, lease: &isula_store::Lease) -> Result<(), String>;
    /// Fills the new, empty directory `into` with what a source exported of the cache
    /// mount `id` (`--cache-from REF --cache-mounts`). Returns whether one had it.
    fn seed_mount(&self, _id: &str, _into: &std::path::Path) -> Result<bool, String> {
        Ok(false)
    }
}

/// A committed stage: what later stages and the final image use.
#[derive(Debug, Clone)]
pub struct StageResult {
    pub config: ImageConfig,
    pub layers: Vec<LayerRecord>,
    pub blobs: Vec<Digest>,
    /// The cache key of the stage's result (what later stages' keys build on).
    pub key: Digest,
}

/// Finds an image by name, pulling it when the store lacks it; writes progress lines to the
/// log. Returns the image's ID, or what kind of failure it was and a message saying what
/// failed.
pub type Puller = dyn Fn(
        &str,
        &isula_types::platform::BuildPlatform,
        &mut dyn FnMut(String),
    ) -> Result<isula_types::ImageId, PullFailure>
    + Sync;

/// Why a pull for FROM or `COPY --from` failed.
#[derive(Debug, Clone)]
pub struct PullFailure {
    pub kind: isula_store::ErrorKind,
    pub message: String,
}

pub struct Context<'a> {
    pub store: &'a Store,
    /// Runs RUN steps (runc in the daemon).
    pub runc: &'a dyn Runtime,
    pub cancel: CancelFlag,
    pub log: &'a mut (dyn FnMut(String) + Send),
    /// How FROM and `COPY --from` get images missing from the store (none: they fail).
    pub pull: Option<&'a Puller>,
    /// Records to import when the local cache lacks them (`--cache-from`).
    pub remote: Option<&'a dyn RemoteCache>,
    /// The client's SSH agents (`--ssh`; none: `RUN --mount=type=ssh` finds no agent).
    pub ssh: Option<&'a dyn SshForward>,
    /// How `ADD http(s)://` downloads (none: it fails saying so).
    pub download: Option<&'a dyn Downloader>,
}

impl<'a> Context<'a> {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// What this context shares with the contexts of work it runs at once (all but its
    /// log and cancel flag), free of its borrow of the log.
    pub fn parts(&self) -> ContextParts<'a> {
        ContextParts {
            store: self.store,
            runc: self.runc,
            pull: self.pull,
            remote: self.remote,
            ssh: self.ssh,
            download: self.download,
        }
    }
}

/// A [`Context`] without its log and cancel flag (see [`Context::parts`]).
#[derive(Clone, Copy)]
pub struct ContextParts<'a> {
    pub store: &'a Store,
    pub runc: &'a dyn Runtime,
    pub pull: Option<&'a Puller>,
    pub remote: Option<&'a dyn RemoteCache>,
    pub ssh: Option<&'a dyn SshForward>,
    pub download: Option<&'a dyn Downloader>,
}

impl<'a> ContextParts<'a> {
    /// A context over these parts with its own `cancel` flag and `log`.
    pub fn context<'b>(
        self,
        cancel: CancelFlag,
        log: &'b mut (dyn FnMut(String) + Send),
    ) -> Context<'b>
    where
        'a: 'b,
    {
        Context {
            store: self.store,
            runc: self.runc,
            cancel,
            log,
            pull: self.pull,
            remote: self.remote,
            ssh: self.ssh,
            download: self.download,
        }
    }
}

/// Removes the build's private directory (mount targets, bundles) when the build ends.
struct WorkDirGuard(PathBuf);

impl Drop for WorkDirGuard {
    fn drop(&mut self) {
        if let Err(e) = isula_sys::rooted::remove_tree(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "removing build directory");
        }
    }
}

/// BuildKit's automatic platform ARGs (`TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`,
/// `TARGETVARIANT` for the platform built for, and the same for `BUILD`, this machine).
pub fn platform_args(target: &isula_types::platform::BuildPlatform) -> Vec<(String, String)> {
    let build = isula_types::platform::BuildPlatform::host();
    let mut out = Vec::new();
    for (p, platform) in [("TARGET", target), ("BUILD", &build)] {
        out.push((format!("{p}PLATFORM"), platform.to_string()));
        out.push((format!("{p}OS"), platform.os.clone()));
        out.push((format!("{p}ARCH"), platform.architecture.clone()));
        out.push((format!("{p}VARIANT"), platform.variant_str().to_string()));
    }
    out
}

/// The `SOURCE_DATE_EPOCH` build arg: seconds since the epoch (empty: not set).
pub fn source_date_epoch(args: &[(String, String)]) -> Result<Option<i64>, BuildError> {
    match args.iter().rev().find(|(k, _)| k == "SOURCE_DATE_EPOCH") {
        None => Ok(None),
        Some((_, v)) if v.trim().is_empty() => Ok(None),
        Some((_, v)) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .map(Some)
            .ok_or_else(|| {
                BuildError::Invalid(format!(
                    "--build-arg SOURCE_DATE_EPOCH={v}: expected seconds since the epoch"
                ))
            }),
    }
}

/// The stages stage `i` uses (FROM <stage>, COPY --from=<stage>, RUN --mount=from=<stage>),
/// all before it.
fn stage_deps(
    df: &Dockerfile,
    i: usize,
    meta: &[(String, String)],
    lexer: &Lexer,
    named: &[String],
) -> Vec<usize> {
    let find = |name: &str| -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        // A named context wins over a stage of that name.
        if named.contains(&lower) {
            return None;
        }
        df.stages[..i]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
            .or_else(|| name.parse::<usize>().ok().filter(|j| *j < i))
    };
    let mut deps = Vec::new();
    if let Instruction::From { image, .. } = &df.stages[i].from.instruction {
        let image = lexer
            .process_word(image, &meta.to_vec())
            .unwrap_or_else(|_| image.clone());
        deps.extend(find(&image));
    }
    for step in &df.stages[i].steps {
        match &step.instruction {
            Instruction::Copy(c) => {
                if let Some(from) = &c.from {
                    deps.extend(find(from));
                }
            }
            Instruction::Run { mounts, .. } => {
                for m in mounts {
                    let from = isula_dockerfile::mounts::parse_mount_with(m, &mut |v| {
                        Ok(lexer
                            .process_word(v, &meta.to_vec())
                            .unwrap_or_else(|_| v.to_string()))
                    })
                    .ok()
                    .and_then(|m| m.from);
                    if let Some(from) = from {
                        deps.extend(find(&from));
                    }
                }
            }
            _ => {}
        }
    }
    deps.sort_unstable();
    deps.dedup();
    deps
}

/// Which stages the target needs, in order, with the stages each one uses.
fn needed_stages(
    df: &Dockerfile,
    target: usize,
    meta: &[(String, String)],
    lexer: &Lexer,
    named: &[String],
) -> Vec<(usize, Vec<usize>)> {
    let mut need = vec![false; df.stages.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if need[i] {
            continue;
        }
        need[i] = true;
        stack.extend(stage_deps(df, i, meta, lexer, named));
    }
    (0..df.stages.len())
        .filter(|i| need[*i])
        .map(|i| (i, stage_deps(df, i, meta, lexer, named)))
        .collect()
}

/// Builds the image and records it in the store under `opts.tags`.
pub fn build(ctx: &mut Context<'_>, opts: &BuildOptions) -> Result<Built, BuildError> {
    let started = chrono::Utc::now();
    // SOURCE_DATE_EPOCH as a build arg means what it means to BuildKit: the build's time,
    // as --build-static gives it (which wins when both are given).
    let with_epoch;
    let opts = match source_date_epoch(&opts.build_args)? {
        Some(t) if opts.build_time.is_none() => {
            with_epoch = BuildOptions {
                build_time: Some(t),
                ..opts.clone()
            };
            &with_epoch
        }
        _ => opts,
    };
    let df = parse_dockerfile(&opts.dockerfile)?;
    for w in &df.warnings {
        (ctx.log)(format!("[Warning] {w}\n"));
    }
    let lexer = Lexer::new(df.escape);
    let ignore = read_dockerignore(&opts.context)?;

    // Global ARGs (before the first FROM), with build-arg overrides. BuildKit's automatic
    // platform ARGs come first: in scope for FROM, and for a stage that declares them; a
    // global ARG of the same name without a value hides one (empty), as in BuildKit.
    let mut meta: Vec<(String, String)> = platform_args(&opts.target_platform());
    for step in &df.meta_args {
        if let Instruction::Arg(pairs) = &step.instruction {
            for (k, default) in pairs {
                let value = match opts.build_args.iter().rev().find(|(n, _)| n == k) {
                    Some((_, v)) => Some(v.clone()),
                    None => default
                        .as_ref()
                        .map(|d| lexer.process_word(d, &meta))
                        .transpose()
                        .map_err(|e| isula_dockerfile::instructions::expand_err(step, e))?,
                };
                meta.push((k.clone(), value.unwrap_or_default()));
            }
        }
    }
    let target = match &opts.target {
        None => df.stages.len() - 1,
        Some(t) => df
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str()))
            .ok_or_else(|| BuildError::Invalid(format!("target stage {t:?} could not be found")))?,
    };
    let named: Vec<String> = opts.contexts.iter().map(|(n, _)| n.clone()).collect();
    let stages = needed_stages(&df, target, &meta, &lexer, &named);

    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| StoreError::io("create", &opts.work_dir, e))?;
    let _work = WorkDirGuard(opts.work_dir.clone());
    let lease = ctx.store.lease();
    let record =
        (opts.cache != CacheMode::Off).then(|| ctx.store.cache().context_record(&opts.context));
    let hashes = std::sync::Mutex::new(match record {
        Some(r) if opts.synced_context => cache_key::ContextHashes::for_synced_tree(r, false),
        r => cache_key::ContextHashes::load(r),
    });
    let used_cache_mounts = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let materials = std::sync::Mutex::new(Vec::new());
    let result = schedule::build_stages(
        ctx,
        opts,
        &df,
        &meta,
        &lexer,
        ignore.as_ref(),
        &stages,
        target,
        &lease,
        (&hashes, &used_cache_mounts, &materials),
    );
    hashes.lock().unwrap_or_else(|p| p.into_inner()).save();
    if opts.cache != CacheMode::Off {
        // Records of the steps that ran are kept even when the build failed.
        if let Err(e) = ctx.store.cache().persist() {
            tracing::warn!(error = %e, "saving the build cache");
        }
    }
    // The image (if any) now holds what it needs; the lease held this build's snapshots.
    drop(lease);
    if let (true, Some(cap)) = (opts.cache != CacheMode::Off, opts.cache_max) {
        if let Err(e) = ctx.store.prune_cache_over(cap) {
            tracing::warn!(error = %e, "trimming the build cache");
        }
    }
    if let (true, Some(free)) = (opts.cache != CacheMode::Off, opts.cache_keep_free) {
        if let Err(e) = ctx.store.prune_cache_for_free(free) {
            tracing::warn!(error = %e, "trimming the build cache for free space");
        }
    }
    let (id, cache_keys, unused_args) = result?;
    if opts.sbom || opts.provenance.is_some() {
        let materials = materials.into_inner().unwrap_or_else(|p| p.into_inner());
        attest::attach(ctx, opts, &id, materials, started)?;
    }
    let cache_mounts = used_cache_mounts
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .collect();
    if let Err(e) = ctx.store.gc() {
        tracing::warn!(error = %e, "collecting intermediate stages");
    }
    Ok(Built {
        id,
        cache_keys,
        cache_mounts,
        unused_args,
    })
}

fn read_dockerignore(context: &std::path::Path) -> Result<Option<Matcher>, BuildError> {
    let root = isula_sys::Root::open(context)
        .map_err(|e| BuildError::Invalid(format!("build context {}: {e}", context.display())))?;
    let fd = match root.open_at(
        std::path::Path::new(".dockerignore"),
        isula_sys::Resolve::InRoot,
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(_) => return Ok(None),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::from(fd), DOCKERIGNORE_MAX as u64 + 1),
        &mut text,
    )
    .map_err(|e| BuildError::Invalid(format!(".dockerignore: {e}")))?;
    Matcher::parse(&text)
        .map(Some)
        .map_err(|e| BuildError::Invalid(e.to_string()))
}
