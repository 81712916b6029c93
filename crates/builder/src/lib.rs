//! Runs a parsed Dockerfile. The daemon hands in the store, the runtime and the options;
//! this crate never constructs them. Each needed stage is executed on an overlay of its
//! base image's layers with a fresh upper directory: config instructions change the image
//! config, RUN goes through runc, COPY/ADD write through the rootfs handle, and the stage
//! ends with one commit (the manual: one commit per stage) whose layer is the upper
//! directory itself. Progress lines (`STEP  N: ...`, RUN output, the copy lines, the
//! result) go to the caller as they happen.

pub mod cache_key;
pub mod copy;
pub mod stage;
pub mod user;

use isula_dockerfile::ignore::{Matcher, DOCKERIGNORE_MAX};
use isula_dockerfile::instructions::{parse_dockerfile, Dockerfile, Instruction};
use isula_dockerfile::lex::Lexer;
use isula_runtime::{CancelFlag, Runc};
use isula_store::{LayerRecord, Store, StoreError};
use isula_types::image::ImageConfig;
use isula_types::{Digest, ImageId, Reference};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

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
    #[error("{1}")]
    Pulled(isula_store::ErrorKind, String),
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
            BuildError::Pulled(kind, _) => *kind,
            BuildError::Cancelled => K::Unavailable,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub build_id: String,
    pub dockerfile: String,
    pub context: PathBuf,
    pub build_args: Vec<(String, String)>,
    pub tags: Vec<Reference>,
    /// Normalised capability names.
    pub cap_add: Vec<String>,
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
pub type Puller =
    dyn Fn(&str, &mut dyn FnMut(String)) -> Result<isula_types::ImageId, PullFailure> + Sync;

/// Why a pull for FROM or `COPY --from` failed.
#[derive(Debug, Clone)]
pub struct PullFailure {
    pub kind: isula_store::ErrorKind,
    pub message: String,
}

pub struct Context<'a> {
    pub store: &'a Store,
    pub runc: &'a Runc,
    pub cancel: CancelFlag,
    pub log: &'a mut (dyn FnMut(String) + Send),
    /// How FROM and `COPY --from` get images missing from the store (none: they fail).
    pub pull: Option<&'a Puller>,
    /// Records to import when the local cache lacks them (`--cache-from`).
    pub remote: Option<&'a dyn RemoteCache>,
}

impl Context<'_> {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
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

/// The stages stage `i` uses (FROM <stage> and COPY --from=<stage>), all before it.
fn stage_deps(df: &Dockerfile, i: usize, meta: &[(String, String)], lexer: &Lexer) -> Vec<usize> {
    let find = |name: &str| -> Option<usize> {
        let lower = name.to_ascii_lowercase();
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
        if let Instruction::Copy(c) = &step.instruction {
            if let Some(from) = &c.from {
                deps.extend(find(from));
            }
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
) -> Vec<(usize, Vec<usize>)> {
    let mut need = vec![false; df.stages.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if need[i] {
            continue;
        }
        need[i] = true;
        stack.extend(stage_deps(df, i, meta, lexer));
    }
    (0..df.stages.len())
        .filter(|i| need[*i])
        .map(|i| (i, stage_deps(df, i, meta, lexer)))
        .collect()
}

/// Builds the image and records it in the store under `opts.tags`.
pub fn build(ctx: &mut Context<'_>, opts: &BuildOptions) -> Result<Built, BuildError> {
    let df = parse_dockerfile(&opts.dockerfile)?;
    for w in &df.warnings {
        (ctx.log)(format!("[Warning] {w}\n"));
    }
    let lexer = Lexer::new(df.escape);
    let ignore = read_dockerignore(&opts.context)?;

    // Global ARGs (before the first FROM), with build-arg overrides.
    let mut meta: Vec<(String, String)> = Vec::new();
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
    let stages = needed_stages(&df, target, &meta, &lexer);

    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| StoreError::io("create", &opts.work_dir, e))?;
    let _work = WorkDirGuard(opts.work_dir.clone());
    let lease = ctx.store.lease();
    let hashes = std::sync::Mutex::new(cache_key::ContextHashes::load(
        (opts.cache != CacheMode::Off).then(|| ctx.store.cache().context_record(&opts.context)),
    ));
    let result = build_stages(
        ctx,
        opts,
        &df,
        &meta,
        &lexer,
        ignore.as_ref(),
        &stages,
        target,
        &lease,
        &hashes,
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
    let (id, cache_keys) = result?;
    if let Err(e) = ctx.store.gc() {
        tracing::warn!(error = %e, "collecting intermediate stages");
    }
    Ok(Built { id, cache_keys })
}

/// Puts the lines of stages that run at once in the order a one-by-one run prints them:
/// the first unfinished stage (in Dockerfile order) prints as it goes, the others are held
/// until every stage before them has finished. Step numbers are given here, so they are
/// those of a one-by-one run. After a failed stage, later stages print nothing (one by
/// one, they would not have run).
struct Emitter<'l> {
    state: Mutex<EmitState<'l>>,
}

enum Event {
    Step(String),
    Line(String),
}

struct EmitState<'l> {
    sink: &'l mut (dyn FnMut(String) + Send),
    /// Stage indexes in run order; `head` is the position of the one printing now.
    order: Vec<usize>,
    head: usize,
    held: HashMap<usize, Vec<Event>>,
    finished: HashMap<usize, bool>,
    /// Steps printed so far.
    steps: usize,
    /// Steps printed before each stage that has started printing.
    offsets: HashMap<usize, usize>,
    closed: bool,
}

impl EmitState<'_> {
    fn write(&mut self, e: Event) {
        if self.closed {
            return;
        }
        match e {
            Event::Step(text) => {
                self.steps += 1;
                (self.sink)(format!("STEP {:>2}: {text}\n", self.steps));
            }
            Event::Line(l) => (self.sink)(l),
        }
    }

    /// Moves the head past finished stages, printing what each held.
    fn advance(&mut self) {
        while let Some(&stage) = self.order.get(self.head) {
            self.offsets.entry(stage).or_insert(self.steps);
            for e in self.held.remove(&stage).unwrap_or_default() {
                self.write(e);
            }
            match self.finished.get(&stage) {
                Some(ok) => {
                    if !ok {
                        self.closed = true;
                    }
                    self.head += 1;
                }
                None => break,
            }
        }
    }
}

impl<'l> Emitter<'l> {
    fn new(sink: &'l mut (dyn FnMut(String) + Send), order: Vec<usize>) -> Self {
        let mut st = EmitState {
            sink,
            order,
            head: 0,
            held: HashMap::new(),
            finished: HashMap::new(),
            steps: 0,
            offsets: HashMap::new(),
            closed: false,
        };
        st.advance();
        Emitter {
            state: Mutex::new(st),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EmitState<'l>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, stage: usize, e: Event) {
        let mut st = self.lock();
        if st.order.get(st.head) == Some(&stage) {
            st.write(e);
        } else {
            st.held.entry(stage).or_default().push(e);
        }
    }

    fn finish(&self, stage: usize, ok: bool) {
        let mut st = self.lock();
        st.finished.insert(stage, ok);
        st.advance();
    }

    /// Steps printed before `stage` (known once every stage before it has finished).
    fn offset(&self, stage: usize) -> usize {
        self.lock().offsets.get(&stage).copied().unwrap_or(0)
    }
}

/// Where each stage of a build stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Waiting,
    Running,
    Done,
    Failed,
}

struct Schedule {
    runs: Vec<Run>,
    results: Vec<Option<StageResult>>,
    /// The first failure (by run order) so far: stages after it are not started.
    failed_at: Option<usize>,
    errors: Vec<(usize, BuildError)>,
    used_args: Vec<Vec<String>>,
    cache_keys: Vec<Vec<Digest>>,
}

/// How many stages run at once: the CPU count.
fn parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[allow(clippy::too_many_arguments)]
fn build_stages(
    ctx: &mut Context<'_>,
    opts: &BuildOptions,
    df: &Dockerfile,
    meta: &[(String, String)],
    lexer: &Lexer,
    ignore: Option<&Matcher>,
    stages: &[(usize, Vec<usize>)],
    target: usize,
    lease: &isula_store::Lease,
    hashes: &std::sync::Mutex<cache_key::ContextHashes>,
) -> Result<(ImageId, Vec<Digest>), BuildError> {
    let n = df.stages.len();
    let (store, runc, pull, remote) = (ctx.store, ctx.runc, ctx.pull, ctx.remote);
    let global_cancel = ctx.cancel.clone();
    let stage_cancel: Vec<CancelFlag> = (0..n).map(|_| CancelFlag::default()).collect();
    let order: Vec<usize> = stages.iter().map(|(i, _)| *i).collect();
    let position = |i: usize| order.iter().position(|o| *o == i).unwrap_or(usize::MAX);
    let emitter = Emitter::new(&mut *ctx.log, order.clone());
    let step_line = |stage: usize, text: &str| emitter.emit(stage, Event::Step(text.to_string()));
    let shared = stage::Shared {
        opts,
        df,
        meta,
        lexer,
        ignore,
        lease,
        hashes,
        step_line: &step_line,
    };
    let schedule = Mutex::new(Schedule {
        runs: vec![Run::Waiting; n],
        results: vec![None; n],
        failed_at: None,
        errors: Vec::new(),
        used_args: vec![Vec::new(); n],
        cache_keys: vec![Vec::new(); n],
    });
    let changed = std::sync::Condvar::new();
    let lock = || schedule.lock().unwrap_or_else(|p| p.into_inner());
    // The next stage to run: the first waiting one (in run order) whose stages are done.
    // None when nothing is left to start (Some(None): wait for a running stage).
    let next = |s: &mut Schedule| -> Option<Option<usize>> {
        let mut running = false;
        for (i, deps) in stages {
            match s.runs[*i] {
                Run::Running => running = true,
                Run::Waiting => {
                    if s.failed_at.is_some_and(|f| position(*i) > f)
                        || global_cancel.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    if deps.iter().all(|d| s.runs[*d] == Run::Done) {
                        s.runs[*i] = Run::Running;
                        return Some(Some(*i));
                    }
                    if deps.iter().any(|d| s.runs[*d] == Run::Failed) {
                        continue;
                    }
                    running = true; // waits for a stage still to come
                }
                _ => {}
            }
        }
        running.then_some(None)
    };
    let worker = || loop {
        let i = {
            let mut s = lock();
            loop {
                match next(&mut s) {
                    Some(Some(i)) => break Some(i),
                    Some(None) => {
                        s = changed
                            .wait_timeout(s, std::time::Duration::from_millis(100))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    None => break None,
                }
            }
        };
        let Some(i) = i else { break };
        let results = lock().results.clone();
        let mut log = |line: String| emitter.emit(i, Event::Line(line));
        let mut sctx = Context {
            store,
            runc,
            cancel: stage_cancel[i].clone(),
            log: &mut log,
            pull,
            remote,
        };
        let mut run = stage::StageRun::new(&mut sctx, &shared, i, &results);
        let mut step_no = 0;
        let mut used = Vec::new();
        let outcome = run.execute(&mut step_no, &mut used);
        let keys = run.take_cache_keys();
        drop(run);
        let mut s = lock();
        s.used_args[i] = used;
        s.cache_keys[i] = keys;
        match outcome {
            Ok(r) => {
                s.results[i] = Some(r);
                s.runs[i] = Run::Done;
                emitter.finish(i, true);
            }
            Err(e) => {
                s.runs[i] = Run::Failed;
                s.errors.push((i, e));
                let at = position(i);
                if s.failed_at.is_none_or(|f| at < f) {
                    s.failed_at = Some(at);
                }
                // Stages after it would not have run one by one: stop them.
                for (j, _) in stages {
                    if position(*j) > at {
                        stage_cancel[*j].store(true, Ordering::SeqCst);
                    }
                }
                emitter.finish(i, false);
            }
        }
        changed.notify_all();
    };
    let workers = parallelism().min(stages.len()).max(1);
    let all_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The build's cancel reaches every stage.
        scope.spawn(|| {
            while !all_done.load(Ordering::SeqCst) {
                if global_cancel.load(Ordering::SeqCst) {
                    for c in &stage_cancel {
                        c.store(true, Ordering::SeqCst);
                    }
                    changed.notify_all();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
        for h in handles {
            let _ = h.join();
        }
        all_done.store(true, Ordering::SeqCst);
    });
    let mut s = schedule.into_inner().unwrap_or_else(|p| p.into_inner());
    if global_cancel.load(Ordering::SeqCst) {
        return Err(BuildError::Cancelled);
    }
    // The error a one-by-one run would have met first.
    s.errors.sort_by_key(|(i, _)| position(*i));
    if let Some((i, e)) = s.errors.into_iter().next() {
        return Err(e.renumbered(emitter.offset(i)));
    }
    if s.runs[target] != Run::Done {
        return Err(BuildError::Invalid("the target stage did not run".into()));
    }
    drop(emitter);
    let mut used_args: Vec<String> = meta.iter().map(|(k, _)| k.clone()).collect();
    let mut cache_keys = Vec::new();
    for i in &order {
        used_args.append(&mut s.used_args[*i]);
        cache_keys.append(&mut s.cache_keys[*i]);
    }
    let unused: Vec<&str> = opts
        .build_args
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !used_args.iter().any(|u| u == k) && !PROXY_ARGS.contains(k))
        .collect();
    if !unused.is_empty() {
        (ctx.log)(format!(
            "[Warning] one or more build args were not consumed: {unused:?}\n"
        ));
    }
    let last = s.results[target]
        .take()
        .ok_or_else(|| BuildError::Invalid("the target stage produced nothing".into()))?;
    let id = stage::commit_image(ctx, &last, &opts.tags, opts.oci, lease)?;
    Ok((id, cache_keys))
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
