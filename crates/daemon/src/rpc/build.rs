//! Build and Status: a build is two calls with one buildID. `Build` carries the request and
//! returns the image ID; `Status` streams the log. Whichever comes first creates the
//! build's log channel; lines wait in it until `Status` reads them. If either call goes
//! away, the build is cancelled (its RUN container killed, mounts and temp files removed).

use crate::error;
use crate::state::State;
use isula_api::v1::{BuildRequest, BuildResponse, StatusResponse};
use isula_builder_core::{build, BuildOptions, CacheMode, Context};
use isula_transport::save::{self, Format};
use isula_transport::ClientFiles;
use isula_types::{limits, Reference};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tonic::Status;

/// Log lines held for a Status reader; past this (nobody reading) lines are dropped and
/// counted, so a build's memory never grows with its output.
const LOG_BUFFER_LINES: usize = 4096;

/// The sending half of a build's log (used from the build's blocking thread).
#[derive(Clone, Debug)]
pub struct LogSender {
    tx: mpsc::Sender<String>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// A Status call reads this log: wait for it rather than drop lines.
    attached: Arc<AtomicBool>,
    /// The build asked for progress events; without, they are dropped here.
    events: Arc<AtomicBool>,
    /// What the lines tell the metrics (steps, cache hits, bytes pulled and pushed).
    tap: Arc<std::sync::Mutex<crate::metrics::Tap>>,
}

impl LogSender {
    fn send(&self, line: String) {
        if let Ok(mut tap) = self.tap.lock() {
            tap.line(&line);
        }
        if isula_transport::progress::is_event(&line) && !self.events.load(Ordering::SeqCst) {
            return;
        }
        if self.attached.load(Ordering::SeqCst) {
            // A reader that went away has cancelled the build; nothing to keep then.
            let _ = self.tx.blocking_send(line);
            return;
        }
        let missed = self.dropped.swap(0, Ordering::SeqCst);
        if missed > 0
            && self
                .tx
                .try_send(format!(
                    "[{missed} log lines dropped: nobody was reading the build status]\n"
                ))
                .is_err()
        {
            self.dropped.fetch_add(missed, Ordering::SeqCst);
        }
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// How long a Status call waits for its Build to start.
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
pub struct Builds {
    inner: Mutex<HashMap<String, Channel>>,
}

struct Channel {
    tx: Option<LogSender>,
    rx: Option<mpsc::Receiver<String>>,
    cancel: Arc<AtomicBool>,
    started: bool,
    /// The running build's entity ID (`<Dockerfile digest>:<build time>`), if it sent one.
    entity: Option<String>,
    /// Set when the build ended before anyone read its log (kept for a late Status).
    finished: Option<std::time::Instant>,
}

/// How long the log of a finished build waits for a late Status call.
const UNREAD_LOG_KEEP: std::time::Duration = std::time::Duration::from_secs(300);

impl Channel {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(LOG_BUFFER_LINES);
        let tx = LogSender {
            tx,
            dropped: Arc::default(),
            attached: Arc::default(),
            events: Arc::default(),
            tap: Arc::default(),
        };
        Channel {
            tx: Some(tx),
            rx: Some(rx),
            cancel: Arc::new(AtomicBool::new(false)),
            started: false,
            entity: None,
            finished: None,
        }
    }
}

impl Builds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a starting build; fails if the ID is in use, the limit is reached, or (as
    /// isula-build) a build with the same entity ID runs: the same Dockerfile with the same
    /// `--build-static` time.
    fn start(
        &self,
        id: &str,
        entity: &str,
        events: bool,
    ) -> Result<(LogSender, Arc<AtomicBool>), Status> {
        let mut m = self.lock();
        m.retain(|_, c| c.finished.is_none_or(|t| t.elapsed() < UNREAD_LOG_KEEP));
        if m.get(id).is_some_and(|c| c.started || c.tx.is_none()) {
            return Err(Status::already_exists(format!(
                "build {id} is already running"
            )));
        }
        if !entity.is_empty() {
            if let Some((other, _)) = m
                .iter()
                .find(|(_, c)| c.started && c.entity.as_deref() == Some(entity))
            {
                return Err(Status::already_exists(format!(
                    "the dockerfile is already on building with static build mode by buildID: {other}"
                )));
            }
        }
        let running = m.values().filter(|c| c.started).count();
        if running >= limits::CONCURRENT_BUILDS_MAX {
            return Err(Status::resource_exhausted(format!(
                "the number of concurrent builds has reached the limit of {}",
                limits::CONCURRENT_BUILDS_MAX
            )));
        }
        let ch = m.entry(id.to_string()).or_insert_with(Channel::new);
        let tx = ch
            .tx
            .clone()
            .ok_or_else(|| Status::already_exists(format!("build {id} has already run")))?;
        ch.started = true;
        ch.entity = Some(entity.to_string()).filter(|e| !e.is_empty());
        tx.events.store(events, Ordering::SeqCst);
        Ok((tx, ch.cancel.clone()))
    }

    /// A Build call that failed before starting: drop a log channel a Status call made.
    fn abandon(&self, id: &str) {
        let mut m = self.lock();
        if m.get(id)
            .is_some_and(|c| !c.started && c.finished.is_none())
        {
            m.remove(id);
        }
    }

    fn finish(&self, id: &str) {
        let mut m = self.lock();
        let unread = m.get(id).is_some_and(|c| c.rx.is_some());
        if unread {
            if let Some(c) = m.get_mut(id) {
                c.tx = None;
                c.started = false;
                c.entity = None;
                c.finished = Some(std::time::Instant::now());
            }
        } else {
            m.remove(id);
        }
    }

    /// The log of build `id` (created if the build has not started yet).
    fn subscribe(&self, id: &str) -> Result<(mpsc::Receiver<String>, Arc<AtomicBool>), Status> {
        let mut m = self.lock();
        let ch = m.entry(id.to_string()).or_insert_with(Channel::new);
        let rx = ch.rx.take().ok_or_else(|| {
            Status::already_exists(format!("the status of build {id} is already being read"))
        })?;
        let cancel = ch.cancel.clone();
        if let Some(tx) = &ch.tx {
            tx.attached.store(true, Ordering::SeqCst);
        }
        if ch.finished.is_some() {
            m.remove(id);
        }
        Ok((rx, cancel))
    }

    pub fn running(&self) -> usize {
        self.lock().values().filter(|c| c.started).count()
    }
}

/// Cancels the build when the Build call is dropped (the client went away).
struct CancelOnDrop(Arc<AtomicBool>, bool);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

enum Output {
    Store,
    Archive {
        path: PathBuf,
        format: Format,
        name: Option<Reference>,
    },
    DockerDaemon(Reference),
    Isulad(Reference),
    /// A registry push; `oci://` (isula-build's spelling) pushes an OCI manifest.
    Registry(Reference, bool),
}

/// `IMAGE:TAG` of a docker-daemon or isulad output: the tag is required (the manual).
fn engine_name(spec: &str, kind: &str, rest: &str) -> Result<Reference, Status> {
    let last = rest.rsplit('/').next().unwrap_or(rest);
    if !last.contains(':') || rest.contains('@') {
        return Err(error::invalid(format!(
            "output {spec:?}: {kind} needs IMAGE:TAG (a tag is required)"
        )));
    }
    Reference::parse(rest).map_err(|e| error::invalid(format!("output {spec:?}: {e}")))
}

fn parse_output(spec: &str) -> Result<Output, Status> {
    if spec.is_empty() {
        return Ok(Output::Store);
    }
    let (kind, rest) = spec.split_once(':').ok_or_else(|| {
        error::invalid(format!(
            "invalid output {spec:?}: expected TYPE:DESTINATION"
        ))
    })?;
    match kind {
        "docker-archive" | "oci-archive" => {
            let (path, name) = match rest.split_once(':') {
                Some((p, n)) => (p, Some(Reference::parse(n).map_err(|e| error::invalid(format!("output {spec:?}: {e}")))?)),
                None => (rest, None),
            };
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(error::invalid(format!("output path {} must be absolute", path.display())));
            }
            let format = if kind == "docker-archive" { Format::Docker } else { Format::Oci };
            Ok(Output::Archive { path, format, name })
        }
        "docker-daemon" => Ok(Output::DockerDaemon(engine_name(spec, kind, rest)?)),
        "isulad" => Ok(Output::Isulad(engine_name(spec, kind, rest)?)),
        "docker" | "oci" => {
            let name = rest.strip_prefix("//").ok_or_else(|| {
                error::invalid(format!("output {spec:?}: expected {kind}://REGISTRY/REPO:TAG"))
            })?;
            let r = Reference::parse(name)
                .map_err(|e| error::invalid(format!("output {spec:?}: {e}")))?;
            if r.digest().is_some() {
                return Err(error::invalid(format!("output {spec:?}: push to a tag, not a digest")));
            }
            Ok(Output::Registry(r, kind == "oci"))
        }
        other => Err(error::invalid(format!("invalid output type {other:?}: expected docker-archive, oci-archive, docker-daemon, isulad, docker or oci"))),
    }
}

fn parse_args(args: &[String]) -> Result<Vec<(String, String)>, Status> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            // `--build-arg NAME` takes the value from the client's environment in Docker;
            // here the client has already done that, so a bare name is empty.
            None if !a.is_empty() => Ok((a.clone(), String::new())),
            _ => Err(error::invalid(format!(
                "invalid build arg {a:?}: expected NAME=VALUE"
            ))),
        })
        .collect()
}

/// Runs one build to the end.
/// Who asks for a build: their identity (whose synced contexts they may use), and whether
/// they are remote (a TCP client: no path of theirs is opened here).
pub struct Caller {
    pub owner: String,
    pub remote: bool,
}

pub async fn run(
    state: Arc<State>,
    files: Box<dyn ClientFiles>,
    caller: Caller,
    req: BuildRequest,
) -> Result<BuildResponse, Status> {
    let id = req.build_id.clone();
    let result = run_inner(state.clone(), files, caller, req).await;
    if result.is_err() {
        state.builds.abandon(&id);
    }
    result
}

async fn run_inner(
    state: Arc<State>,
    files: Box<dyn ClientFiles>,
    caller: Caller,
    req: BuildRequest,
) -> Result<BuildResponse, Status> {
    if !req.build_type.is_empty() && req.build_type != "ctr-img" {
        return Err(error::invalid(format!(
            "unsupported build type {:?}",
            req.build_type
        )));
    }
    if req.build_id.is_empty()
        || req.build_id.len() > 128
        || !req.build_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(error::invalid("buildID must be 1 to 128 letters or digits"));
    }
    if req.file_content.len() > isula_dockerfile::parser::DOCKERFILE_MAX {
        return Err(error::invalid("the Dockerfile is over the limit of 1 MiB"));
    }
    // A context sent over the connection (SyncContext), held while the build reads it; or
    // a directory of this machine, for a local client.
    let synced_context = req.context_dir.starts_with("context:");
    let (context, context_lock) = match req.context_dir.strip_prefix("context:") {
        Some(id) => {
            let (dir, lock) = crate::rpc::context_sync::open(&state, id, &caller.owner)?;
            (dir, Some(lock))
        }
        None if caller.remote => {
            return Err(Status::failed_precondition(
                "a remote build sends its context over the connection (SyncContext): this daemon does not open a path a TCP client names",
            ))
        }
        None => (PathBuf::from(&req.context_dir), None),
    };
    if !context.is_absolute() || !context.is_dir() {
        return Err(error::invalid(format!(
            "build context {:?} must be an existing absolute directory",
            req.context_dir
        )));
    }
    if caller.remote {
        // The client's files travel over the connection: an archive is written for the
        // client to download (Download), a directory --build-context is synced as the
        // context is (SyncContext), and the client writes its --iidfile itself.
        let archive_here = match parse_output(&req.output)? {
            Output::Archive { path, .. } => !path.starts_with(crate::rpc::remote_files::PREFIX),
            _ => false,
        };
        for (named, what) in [
            (!req.iidfile.is_empty(), "--iidfile"),
            (
                archive_here,
                "an archive output (-o docker-archive: or oci-archive:)",
            ),
            (
                req.build_contexts.iter().any(|c| {
                    let value = c.split_once('=').map_or("", |(_, v)| v);
                    !value.starts_with("docker-image://") && !value.starts_with("context:")
                }),
                "a directory --build-context",
            ),
        ] {
            if named {
                return Err(Status::failed_precondition(format!(
                    "{what} names files on the client's machine, which a daemon reached over TCP does not open: use a current isula-build client, which sends them over the connection"
                )));
            }
        }
    }
    let output = parse_output(&req.output)?;
    let mut tags = Vec::new();
    if !req.additional_tag.is_empty() {
        tags.push(
            Reference::parse(&req.additional_tag)
                .map_err(|e| error::invalid(format!("--tag: {e}")))?,
        );
    }
    match &output {
        Output::Archive { name: Some(n), .. }
        | Output::DockerDaemon(n)
        | Output::Isulad(n)
        | Output::Registry(n, _) => tags.push(n.clone()),
        _ => {}
    }
    let cap_add = req
        .cap_add_list
        .iter()
        .map(|c| isula_runtime::normalize_cap(c).map_err(|e| error::invalid(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let build_time = req
        .build_static
        .as_ref()
        .and_then(|s| s.build_time.as_ref())
        .map(|t| t.seconds);
    let oci = match req.format.as_str() {
        "" | "docker" => false,
        "oci" => true,
        f => {
            return Err(error::invalid(format!(
                "invalid format {f:?}: expected docker or oci"
            )))
        }
    };
    let runc = state.runc.clone().map_err(Status::failed_precondition)?;
    let build_args = if req.encrypted {
        // Each entry is hex RSA-OAEP of NAME=VALUE (control-api.md); never logged.
        let plain = req
            .build_args
            .iter()
            .map(|a| {
                state
                    .key
                    .decrypt_hex(a)
                    .map_err(|e| error::invalid(format!("encrypted build arg: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        parse_args(&plain)?
    } else {
        parse_args(&req.build_args)?
    };
    for r in req
        .cache_from
        .iter()
        .chain(Some(&req.cache_to).filter(|r| !r.is_empty()))
    {
        Reference::parse(r).map_err(|e| error::invalid(format!("cache reference {r:?}: {e}")))?;
    }
    if Reference::parse(&req.cache_to).is_ok_and(|r| r.digest().is_some()) {
        return Err(error::invalid(format!(
            "--cache-to {:?}: export to a tag, not a digest",
            req.cache_to
        )));
    }
    // supply chain: a signed build pushes (-o docker://), somewhere signatures can go.
    let sign = crate::rpc::sign::Wanted {
        simple: req.sign_simple,
        sigstore: req.sign_sigstore,
    };
    match &output {
        Output::Registry(dest, _) => {
            crate::rpc::sign::check_before_push(&state, &dest.to_string(), sign)?;
        }
        _ if sign.any() => {
            return Err(error::invalid(
                "--sign-by and --sign-by-sigstore-private-key sign a push: use -o docker://REGISTRY/REPO:TAG",
            ))
        }
        _ => {}
    }
    let pushed = Arc::new(std::sync::Mutex::new(None));
    let (push_opts, push_note) = match &output {
        Output::Registry(_, kind_oci) => crate::rpc::registry::push_options(
            if *kind_oci || oci { "oci" } else { &req.format },
            &req.compression,
            req.compression_level,
            state.settings.compression,
        )?,
        _ => {
            if !req.cache_to.is_empty() {
                // Checked here, before the build, as for a registry output.
                isula_registry::push::LayerCompression::parse(
                    &req.compression,
                    req.compression_level,
                    state.settings.compression,
                )
                .map_err(|e| error::invalid(e.to_string()))?;
            } else if !req.compression.is_empty() || req.compression_level.is_some() {
                return Err(error::invalid(
                    "--compression and --compression-level apply to -o docker://... and \
                     --cache-to only",
                ));
            }
            (
                isula_registry::push::PushOptions {
                    format: isula_registry::push::Format::Oci,
                    compression: Default::default(),
                },
                None,
            )
        }
    };
    // The build cache export is always OCI, so zstd needs no switch there.
    let cache_compression = isula_registry::push::LayerCompression::parse(
        &req.compression,
        req.compression_level,
        state.settings.compression,
    )
    .map_err(|e| error::invalid(e.to_string()))?;
    let wants_registry_cache = !req.cache_from.is_empty() || !req.cache_to.is_empty();
    if req.cache_mounts && !wants_registry_cache {
        return Err(error::invalid(
            "--cache-mounts goes with --cache-to (export them) or --cache-from (seed them)",
        ));
    }
    if wants_registry_cache && !state.settings.build_cache {
        return Err(Status::failed_precondition(
            "--cache-from and --cache-to need the build cache, which is off (build_cache = false)",
        ));
    }
    let provenance = if req.provenance.trim().is_empty() {
        None
    } else {
        isula_attest::slsa::Mode::parse(&req.provenance).map_err(error::invalid)?
    };
    let mut context_locks: Vec<isula_sys::lock::FileLock> = context_lock.into_iter().collect();
    let extras = extras(&state, &req, &caller.owner, &mut context_locks)?;
    let (tx, cancel) = state
        .builds
        .start(&req.build_id, &req.entity_id, req.progress)?;
    let opts = BuildOptions {
        build_id: req.build_id.clone(),
        dockerfile: req.file_content.clone(),
        context,
        synced_context,
        build_args,
        tags,
        cap_add,
        seccomp_unconfined: req.seccomp_unconfined,
        proxy: req.proxy,
        build_time,
        target: Some(req.target.clone()).filter(|t| !t.is_empty()),
        work_dir: state.settings.run_root.join("builds").join(&req.build_id),
        mount_options: state.settings.mount_options.clone(),
        oci,
        host_proxy_env: isula_builder_core::PROXY_ARGS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect(),
        cache: match (state.settings.build_cache, req.no_cache) {
            (false, _) => CacheMode::Off,
            (true, true) => CacheMode::Refresh,
            (true, false) => CacheMode::On,
        },
        cache_max: Some(cache_cap(&state)),
        cache_keep_free: cache_keep_free(&state),
        secrets: extras.secrets,
        network: extras.network,
        labels: extras.labels,
        add_hosts: extras.add_hosts,
        allow_insecure: state.settings.allow_insecure,
        limits: extras.limits,
        contexts: extras.contexts,
        platform: (extras.platforms.len() == 1).then(|| extras.platforms[0].clone()),
        sbom: req.sbom,
        provenance,
        version: isula_api::build_info::VERSION.to_string(),
    };
    if extras.platforms.len() > 1 {
        check_several_platforms(&output, &opts, &req)?;
    }
    // fleet: the shared cache registry, imported from and (one platform) exported to.
    let (cache_from, cache_to) =
        crate::fleet::with_shared_cache(&state.settings, &req, extras.platforms.len());
    let fleet_parts = crate::fleet::parts(&req, &extras.platforms)?;
    let job = Job {
        fleet_parts,
        platforms: extras.platforms,
        ssh_ids: req.ssh_ids.clone(),
        runtime: tokio::runtime::Handle::current(),
        state: state.clone(),
        files,
        runc,
        opts,
        output,
        cache_from,
        cache_to,
        cache_mounts: req.cache_mounts,
        push_opts,
        push_note,
        cache_compression,
        iidfile: req.iidfile.clone(),
        tx,
        cancel: cancel.clone(),
        _context_locks: context_locks,
        pushed: pushed.clone(),
    };
    // The build runs in its own task: if this call is dropped (the client went away) the
    // guard cancels it, and the task still cleans up and releases the build's slot.
    let build_id = req.build_id.clone();
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        let timer = crate::metrics::METRICS.build_started();
        let result = tokio::task::spawn_blocking(move || job.run())
            .await
            .unwrap_or_else(|e| Err(error::internal(format!("build task: {e}"))));
        timer.end(result.is_ok());
        task_state.builds.finish(&build_id);
        match &result {
            Ok(id) => tracing::info!(build = %build_id, image = %id, "build succeeded"),
            Err(status) => {
                tracing::info!(build = %build_id, error = %status.message(), "build failed")
            }
        }
        result
    });
    let mut guard = CancelOnDrop(cancel, false);
    let result = task
        .await
        .unwrap_or_else(|e| Err(error::internal(format!("build task: {e}"))));
    guard.1 = true;
    let image_id = result?;
    let pushed = pushed.lock().unwrap_or_else(|p| p.into_inner()).take();
    // The registry client blocks: off the async threads.
    let sign_requests = match pushed {
        Some((dest, digest)) if sign.any() => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || {
                crate::rpc::sign::ask_later(&state, &dest, &digest, sign)
            })
            .await
            .unwrap_or_else(|e| Err(error::internal(format!("signing task: {e}"))))?
        }
        _ => Vec::new(),
    };
    Ok(BuildResponse {
        image_id,
        sign_requests,
    })
}

/// `ADD http(s)://` through the daemon's HTTP stack (certs.d, proxies, retries, the stall
/// timeout), capped at `max_layer_size`.
struct Downloads {
    certs_dir: PathBuf,
    stall: std::time::Duration,
    max_bytes: u64,
}

impl isula_builder_core::Downloader for Downloads {
    fn download(
        &self,
        url: &str,
        dest: &std::path::Path,
        cancel: &isula_runtime::CancelFlag,
    ) -> Result<isula_builder_core::Downloaded, String> {
        let cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
        let got = isula_registry::http_source::download(
            url,
            dest,
            &isula_registry::http_source::Fetch {
                certs_dir: &self.certs_dir,
                stall: self.stall,
                max_bytes: self.max_bytes,
                cancelled: &cancelled,
            },
        )?;
        Ok(isula_builder_core::Downloaded {
            sha256: got.sha256,
            last_modified: got.last_modified,
        })
    }
}

/// What the request adds beyond the original API, checked.
struct Extras {
    secrets: isula_builder_core::Secrets,
    network: isula_builder_core::Network,
    labels: Vec<(String, String)>,
    add_hosts: Vec<(String, String)>,
    limits: isula_runtime::Limits,
    contexts: Vec<(String, isula_builder_core::NamedContext)>,
    platforms: Vec<isula_types::platform::BuildPlatform>,
}

/// The most secrets, SSH agents, labels or hosts one build may name.
const EXTRAS_MAX: usize = 256;

fn extras(
    state: &State,
    req: &BuildRequest,
    owner: &str,
    locks: &mut Vec<isula_sys::lock::FileLock>,
) -> Result<Extras, Status> {
    if req.secrets.len() > EXTRAS_MAX
        || req.build_contexts.len() > EXTRAS_MAX
        || req.ssh_ids.len() > EXTRAS_MAX
        || req.labels.len() > EXTRAS_MAX
        || req.add_hosts.len() > EXTRAS_MAX
    {
        return Err(error::invalid(format!(
            "at most {EXTRAS_MAX} each of --secret, --ssh, --label and --add-host"
        )));
    }
    let plain_id = |what: &str, id: &str| {
        if id.is_empty()
            || id.len() > 255
            || id == ".."
            || id.contains('/')
            || id.contains(char::is_control)
        {
            Err(error::invalid(format!(
                "{what} id {id:?}: must be a plain name (no '/', not '..')"
            )))
        } else {
            Ok(())
        }
    };
    let mut secrets = isula_builder_core::Secrets::default();
    let mut total = 0usize;
    for s in &req.secrets {
        plain_id("--secret", &s.id)?;
        // The value is never named in an error, only the id.
        let value = state
            .key
            .unseal(&isula_api::secret::Sealed {
                key: s.key.clone(),
                nonce: s.nonce.clone(),
                ciphertext: s.ciphertext.clone(),
            })
            .map_err(|e| error::invalid(format!("--secret id={}: {e}", s.id)))?;
        total += value.len();
        if total > 16 * isula_api::secret::SEALED_MAX {
            return Err(error::invalid(format!(
                "--secret: the secrets come to over {} bytes",
                16 * isula_api::secret::SEALED_MAX
            )));
        }
        secrets.insert(s.id.clone(), value);
    }
    for id in &req.ssh_ids {
        plain_id("--ssh", id)?;
    }
    let network = isula_builder_core::Network::parse(&req.network, Default::default())
        .map_err(|e| error::invalid(format!("--network: {e}")))?;
    let labels = req
        .labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            None if !l.is_empty() => Ok((l.clone(), String::new())),
            _ => Err(error::invalid(format!(
                "--label {l:?}: expected NAME=VALUE"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let add_hosts = req
        .add_hosts
        .iter()
        .map(|h| parse_add_host(h).map_err(|e| error::invalid(format!("--add-host {h:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Extras {
        secrets,
        network,
        labels,
        add_hosts,
        limits: limits(req.limits.as_ref())
            .and_then(crate::rootless::check_limits)
            .map_err(error::invalid)?,
        contexts: named_contexts(&req.build_contexts, &mut |id| {
            let (dir, lock) = crate::rpc::context_sync::open(state, id, owner)?;
            locks.push(lock);
            Ok(dir)
        })?,
        platforms: build_platforms(&req.platform).map_err(error::invalid)?,
    })
}

/// `--platform P[,P...]` (none: this machine's), each once.
fn build_platforms(text: &str) -> Result<Vec<isula_types::platform::BuildPlatform>, String> {
    let mut out: Vec<isula_types::platform::BuildPlatform> = Vec::new();
    for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = isula_types::platform::BuildPlatform::parse(p)
            .map_err(|e| format!("--platform: {e}"))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// `--build-context NAME=DIR|docker-image://REF`, checked (DIR absolute and existing).
/// `--build-context NAME=VALUE`s: a directory, `docker-image://REF`, or `context:ID` (a
/// directory a remote client synced, which `synced` opens and holds for the build).
fn named_contexts(
    specs: &[String],
    synced: &mut dyn FnMut(&str) -> Result<PathBuf, Status>,
) -> Result<Vec<(String, isula_builder_core::NamedContext)>, Status> {
    let mut out: Vec<(String, isula_builder_core::NamedContext)> = Vec::new();
    for spec in specs {
        let (name, value) = spec.split_once('=').unwrap_or((spec, ""));
        if let Some(id) = value.strip_prefix("context:") {
            let name = name.trim().to_ascii_lowercase();
            let dir = synced(id)?;
            let mut one = named_context_specs(&[format!("{name}={}", dir.display())])
                .map_err(error::invalid)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(error::invalid(format!(
                    "--build-context {name} is given twice"
                )));
            }
            out.append(&mut one);
            continue;
        }
        let mut one = named_context_specs(std::slice::from_ref(spec)).map_err(error::invalid)?;
        if let Some((n, _)) = one.first() {
            if out.iter().any(|(o, _)| o == n) {
                return Err(error::invalid(format!(
                    "--build-context {n} is given twice"
                )));
            }
        }
        out.append(&mut one);
    }
    Ok(out)
}

fn named_context_specs(
    specs: &[String],
) -> Result<Vec<(String, isula_builder_core::NamedContext)>, String> {
    let mut out: Vec<(String, isula_builder_core::NamedContext)> = Vec::new();
    for spec in specs {
        let (name, value) = spec.split_once('=').ok_or_else(|| {
            format!("--build-context {spec:?}: expected NAME=DIR or NAME=docker-image://REF")
        })?;
        let name = name.trim().to_ascii_lowercase();
        if !isula_dockerfile::instructions::valid_stage_name(&name) {
            return Err(format!(
                "--build-context {spec:?}: {name:?} is not a valid name (letters, digits, _ - .)"
            ));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(format!("--build-context {name} is given twice"));
        }
        let ctx = if let Some(r) = value.strip_prefix("docker-image://") {
            Reference::parse(r).map_err(|e| format!("--build-context {name}={value}: {e}"))?;
            isula_builder_core::NamedContext::Image(r.to_string())
        } else if value.contains("://") {
            return Err(format!(
                "--build-context {name}={value}: only a directory or docker-image://REF is supported"
            ));
        } else {
            let dir = PathBuf::from(value);
            if !dir.is_absolute() || !dir.is_dir() {
                return Err(format!(
                    "--build-context {name}={value}: not an existing directory"
                ));
            }
            isula_builder_core::NamedContext::Dir(dir)
        };
        out.push((name, ctx));
    }
    Ok(out)
}

/// The smallest memory limit a build may set (Docker's).
const MEMORY_MIN: i64 = 6 << 20;

/// `--memory`, `--cpu-*`, `--pids-limit`, `--shm-size` and `--ulimit`, checked.
fn limits(l: Option<&isula_api::v1::BuildLimits>) -> Result<isula_runtime::Limits, String> {
    let Some(l) = l else {
        return Ok(Default::default());
    };
    let set = |v: i64| (v != 0).then_some(v);
    let memory = set(l.memory);
    if memory.is_some_and(|m| m < MEMORY_MIN) {
        return Err(format!(
            "--memory {}: the minimum is 6MB ({MEMORY_MIN} bytes)",
            l.memory
        ));
    }
    let cpu_quota = set(l.cpu_quota);
    if cpu_quota.is_some_and(|q| q < 1000) {
        return Err(format!(
            "--cpu-quota {}: the minimum is 1000 (1ms)",
            l.cpu_quota
        ));
    }
    let cpu_period = (l.cpu_period != 0).then_some(l.cpu_period);
    if cpu_period.is_some_and(|p| !(1000..=1_000_000).contains(&p)) {
        return Err(format!(
            "--cpu-period {}: must be 1000 to 1000000 (1ms to 1s)",
            l.cpu_period
        ));
    }
    let cpuset = Some(l.cpuset_cpus.trim().to_string()).filter(|c| !c.is_empty());
    if let Some(c) = &cpuset {
        let ok = c.split(',').all(|part| {
            let mut ends = part.splitn(2, '-');
            let num = |s: Option<&str>| {
                s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            };
            let first = ends.next();
            match ends.next() {
                None => num(first),
                Some(last) => num(first) && num(Some(last)),
            }
        });
        if !ok {
            return Err(format!(
                "--cpuset-cpus {c:?}: expected CPU numbers and ranges (0-3,5)"
            ));
        }
    }
    let pids = set(l.pids_limit);
    if pids.is_some_and(|p| p < -1) {
        return Err(format!(
            "--pids-limit {}: expected a positive number or -1",
            l.pids_limit
        ));
    }
    let shm_size = match l.shm_size {
        0 => None,
        s if s < 0 => return Err(format!("--shm-size {s}: must be positive")),
        s => Some(s as u64),
    };
    let rlimits = l
        .ulimits
        .iter()
        .map(|u| isula_runtime::parse_ulimit(u))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(isula_runtime::Limits {
        memory,
        cpu_shares: (l.cpu_shares != 0).then_some(l.cpu_shares),
        cpu_quota,
        cpu_period,
        cpuset_cpus: cpuset,
        pids,
        shm_size,
        rlimits,
    })
}

/// `HOST:IP` (or `HOST=IP`; the address may be IPv6) as docker build reads it.
pub fn parse_add_host(text: &str) -> Result<(String, String), String> {
    let (host, ip) = text
        .split_once('=')
        .or_else(|| text.split_once(':'))
        .ok_or("expected HOST:IP")?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("invalid host name {host:?}"));
    }
    if ip == "host-gateway" {
        return Err(
            "host-gateway needs a bridge network; builds use the host's, give an address".into(),
        );
    }
    ip.parse::<std::net::IpAddr>()
        .map_err(|_| format!("invalid IP address {ip:?}"))?;
    Ok((host.to_string(), ip.to_string()))
}

/// A build for several platforms makes one image per platform and a manifest list under
/// its tag, kept locally or pushed (`-o docker://`); the other outputs take one image.
fn check_several_platforms(
    output: &Output,
    opts: &BuildOptions,
    req: &BuildRequest,
) -> Result<(), Status> {
    match output {
        Output::Store
        | Output::Registry(..)
        | Output::Archive {
            format: Format::Oci,
            ..
        } => {}
        _ => {
            return Err(error::invalid(format!(
                "-o {}: this output takes one image; build with one --platform for it (oci-archive: and docker:// take several)",
                req.output
            )))
        }
    }
    if list_name(opts, output).is_none() {
        return Err(error::invalid(
            "a build for several platforms needs a name for its manifest list (-t NAME, -o docker://NAME or -o oci-archive:PATH:NAME)",
        ));
    }
    if !req.cache_to.is_empty() {
        return Err(error::invalid("--cache-to takes a build for one platform"));
    }
    Ok(())
}

/// The name of the manifest list a build for several platforms makes: its first tag, else
/// the name of its oci-archive.
fn list_name(opts: &BuildOptions, output: &Output) -> Option<Reference> {
    opts.tags.first().cloned().or_else(|| match output {
        Output::Archive { name, .. } => name.clone(),
        _ => None,
    })
}

/// Everything one build needs on its blocking thread.
struct Job {
    /// `--platform` with several: one build each, then a manifest list.
    platforms: Vec<isula_types::platform::BuildPlatform>,
    /// fleet: platforms other builders made, taken from these references.
    fleet_parts: HashMap<isula_types::platform::BuildPlatform, String>,
    /// The SSH agents the client forwards (`--ssh`).
    ssh_ids: Vec<String>,
    runtime: tokio::runtime::Handle,
    state: Arc<State>,
    files: Box<dyn ClientFiles>,
    runc: isula_runtime::Runc,
    opts: BuildOptions,
    output: Output,
    iidfile: String,
    tx: LogSender,
    cancel: Arc<AtomicBool>,
    cache_from: Vec<String>,
    cache_to: Option<String>,
    /// `--cache-mounts`: cache mounts go with `--cache-to` and come from `--cache-from`.
    cache_mounts: bool,
    /// Synced contexts (the build's, and named ones) stay while the build reads them.
    _context_locks: Vec<isula_sys::lock::FileLock>,
    /// How `-o docker://` sends the image (format and layer compression).
    push_opts: isula_registry::push::PushOptions,
    /// Said before that push when zstd moved it to the OCI format.
    push_note: Option<String>,
    /// The layer compression of `--cache-to`.
    cache_compression: isula_registry::push::LayerCompression,
    /// supply chain: what `-o docker://` pushed (for signing).
    pushed: Arc<std::sync::Mutex<Option<(Reference, isula_types::Digest)>>>,
}

/// The `--cache-from` sources of one build, as the builder sees them.
struct RemoteSources<'a> {
    sources: Vec<isula_registry::cache::Source>,
    store: &'a isula_store::Store,
    cancel: isula_transport::Cancel,
    /// Seed new cache mounts from the sources (`--cache-mounts`).
    mounts: bool,
}

impl isula_builder_core::RemoteCache for RemoteSources<'_> {
    fn lookup(&self, key: &isula_types::Digest) -> Option<isula_builder_core::RemoteRecord> {
        self.sources.iter().find_map(|s| {
            s.entry(key).map(|e| isula_builder_core::RemoteRecord {
                snapshot: e.has_snapshot(),
                stage: e.has_stage(),
            })
        })
    }

    fn import(&self, key: &isula_types::Digest, lease: &isula_store::Lease) -> Result<(), String> {
        let source = self
            .sources
            .iter()
            .find(|s| s.entry(key).is_some())
            .ok_or_else(|| format!("no cache source has the record {key}"))?;
        source
            .import(self.store, key, lease, &self.cancel)
            .map_err(|e| {
                format!(
                    "importing the cached step {} from {}: {e}",
                    &key.hex()[..12],
                    source.name()
                )
            })
    }

    fn seed_mount(&self, id: &str, into: &std::path::Path) -> Result<bool, String> {
        if !self.mounts {
            return Ok(false);
        }
        let Some(source) = self.sources.iter().find(|s| s.has_mount(id)) else {
            return Ok(false);
        };
        source
            .seed_mount(self.store, id, into, &self.cancel)
            .map_err(|e| format!("seeding cache mount id={id} from {}: {e}", source.name()))
    }
}

impl Job {
    /// Reads every `--cache-from` source; one that cannot be read is reported and left out.
    fn open_cache_sources(&self) -> Vec<isula_registry::cache::Source> {
        let cancel = isula_transport::Cancel::from_flag(self.cancel.clone());
        let mut out = Vec::new();
        for name in &self.cache_from {
            self.tx
                .send(format!("Importing cache manifest from {name}\n"));
            match isula_registry::cache::open(
                &self.state.registry,
                &self.state.store,
                name,
                &cancel,
            ) {
                Ok(s) => {
                    self.tx.send(format!("Cache {name}: {} records\n", s.len()));
                    out.push(s);
                }
                Err(e) => {
                    tracing::info!(cache = %name, error = %e, "cache source unusable");
                    self.tx.send(format!(
                        "[Warning] the build cache {name} cannot be used, building without it: {e}\n"
                    ));
                }
            }
        }
        out
    }

    /// The build's last line: the ID, or where `--iidfile` wrote it (with the caller's
    /// rights), as isula-build says them.
    fn report_id(&self, hex: &str) -> Result<(), Status> {
        if self.iidfile.is_empty() {
            self.tx
                .send(format!("Build success with image id: {hex}\n"));
            return Ok(());
        }
        self.files
            .write_file(std::path::Path::new(&self.iidfile), hex.as_bytes())
            .map_err(|e| {
                Status::failed_precondition(format!("writing --iidfile {}: {e}", self.iidfile))
            })?;
        self.tx.send(format!(
            "Write image ID [{hex}] to file: {}\n",
            self.iidfile
        ));
        Ok(())
    }

    /// The builds of a build for several platforms, at once (up to the CPU count), their
    /// logs in platform order. The first to fail stops the others. Returns the image IDs,
    /// in platform order.
    fn build_each_platform(&self, ctx: &mut Context<'_>) -> Result<Vec<String>, Status> {
        let parts = ctx.parts();
        let n = self.platforms.len();
        let log = super::ordered_log::OrderedLog::new(
            &mut *ctx.log,
            self.platforms.iter().map(|p| p.to_string()).collect(),
        );
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<String, Status>>>> =
            Mutex::new((0..n).map(|_| None).collect());
        let workers = std::thread::available_parallelism()
            .map(|w| w.get())
            .unwrap_or(1)
            .min(n);
        let worker = || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(p) = self.platforms.get(i) else {
                break;
            };
            let result = if self.cancel.load(Ordering::SeqCst) {
                Err(Status::cancelled("build cancelled"))
            } else if let Some(r) = self.fleet_parts.get(p) {
                let mut line = |l: String| log.line(i, l);
                crate::fleet::take_part(
                    &self.state,
                    r,
                    p,
                    &isula_transport::Cancel::from_flag(self.cancel.clone()),
                    &mut line,
                )
            } else {
                let mut line = |l: String| log.line(i, l);
                line(format!("Building for {p}\n"));
                let mut pctx = parts.context(self.cancel.clone(), &mut line);
                let opts = BuildOptions {
                    platform: Some(p.clone()),
                    tags: Vec::new(),
                    work_dir: self.opts.work_dir.join(format!("platform-{i}")),
                    ..self.opts.clone()
                };
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    build(&mut pctx, &opts)
                }));
                match built {
                    Ok(Ok(b)) => Ok(b.id.hex().to_string()),
                    Ok(Err(isula_builder_core::BuildError::Cancelled)) => {
                        Err(Status::cancelled("build cancelled"))
                    }
                    Ok(Err(e)) => Err(error::status(e.kind(), format!("building for {p}: {e}"))),
                    Err(_) => Err(Status::internal(format!(
                        "building for {p}: internal error: the build stopped unexpectedly"
                    ))),
                }
            };
            if result.is_err() {
                // One platform failed: the list cannot be made, so the others stop.
                self.cancel.store(true, Ordering::SeqCst);
            }
            log.finish(i);
            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
            for h in handles {
                let _ = h.join();
            }
        });
        let _ = std::fs::remove_dir(&self.opts.work_dir);
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut ids = Vec::new();
        let mut cancelled = None;
        for r in results {
            match r {
                Some(Ok(id)) => ids.push(id),
                // The one that failed, not those it stopped.
                Some(Err(e)) if e.code() == tonic::Code::Cancelled => {
                    cancelled.get_or_insert(e);
                }
                Some(Err(e)) => return Err(e),
                None => {
                    cancelled.get_or_insert(Status::cancelled("build cancelled"));
                }
            }
        }
        match cancelled {
            Some(e) => Err(e),
            None => Ok(ids),
        }
    }

    /// One build per platform (untagged), then the manifest list under the tag, pushed
    /// with `-o docker://`. Returns the list's ID.
    fn build_platforms(&self, ctx: &mut Context<'_>) -> Result<String, Status> {
        let list_ref = list_name(&self.opts, &self.output)
            .ok_or_else(|| error::invalid("a build for several platforms needs a name"))?;
        let name = list_ref.to_string();
        let ids = self.build_each_platform(ctx)?;
        let list = self
            .state
            .lists
            .replace(&self.state.store, &name, &ids, self.opts.oci)
            .map_err(crate::rpc::registry::status)?;
        self.tx.send(format!(
            "Manifest list {} of {} images: {}\n",
            list_ref.familiar(),
            ids.len(),
            list.hex()
        ));
        if let Output::Archive {
            path, name: saved, ..
        } = &self.output
        {
            let members = self
                .state
                .lists
                .members(&name)
                .map_err(crate::rpc::registry::status)?;
            let mut images = Vec::new();
            for m in members {
                let rec = self
                    .state
                    .store
                    .image(&m.image)
                    .map_err(|e| error::status(e.kind(), e.to_string()))?;
                images.push((rec, m.platform));
            }
            let tx = self.tx.clone();
            save::save_index(
                &self.state.store,
                self.files.as_ref(),
                &images,
                Some(saved.as_ref().unwrap_or(&list_ref)),
                path,
                &isula_transport::Cancel::from_flag(self.cancel.clone()),
                &mut |l| {
                    tx.send(l);
                },
            )
            .map_err(error::transport)?;
        }
        if let Output::Registry(dest, _) = &self.output {
            let tx = self.tx.clone();
            let digest = self
                .state
                .lists
                .push(
                    &self.state.registry,
                    &self.state.store,
                    &name,
                    &dest.to_string(),
                    self.push_opts.compression,
                    &isula_transport::Cancel::from_flag(self.cancel.clone()),
                    &mut |l| {
                        tx.send(l);
                    },
                )
                .map_err(crate::rpc::registry::status)?;
            *self.pushed.lock().unwrap_or_else(|p| p.into_inner()) = Some((dest.clone(), digest));
        }
        let hex = list.hex().to_string();
        self.report_id(&hex)?;
        Ok(hex)
    }

    fn run(self) -> Result<String, Status> {
        // Registered with the build's own flag: shutdown cancels the build directly.
        let op = self
            .state
            .begin_with(isula_transport::Cancel::from_flag(self.cancel.clone()));
        let tx = self.tx.clone();
        let mut log = move |line: String| {
            tx.send(line);
        };
        let pull_state = self.state.clone();
        let pull_cancel = isula_transport::Cancel::from_flag(self.cancel.clone());
        let puller = move |name: &str,
                           platform: &isula_types::platform::BuildPlatform,
                           out: &mut dyn FnMut(String)| {
            crate::rpc::registry::resolve_or_pull(&pull_state, name, platform, &pull_cancel, out)
        };
        let downloads = Downloads {
            certs_dir: self.state.registry.certs_dir.clone(),
            stall: self.state.settings.registry_stall_timeout,
            max_bytes: self.state.settings.unpack_limits.max_bytes,
        };
        let forwarder = super::session::Forwarder {
            state: self.state.clone(),
            build: self.opts.build_id.clone(),
            ids: self.ssh_ids.clone(),
            runtime: self.runtime.clone(),
        };
        let remote = RemoteSources {
            sources: self.open_cache_sources(),
            store: &self.state.store,
            cancel: isula_transport::Cancel::from_flag(self.cancel.clone()),
            mounts: self.cache_mounts,
        };
        let mut ctx = Context {
            store: &self.state.store,
            runc: &self.runc,
            cancel: self.cancel.clone(),
            log: &mut log,
            pull: Some(&puller),
            remote: (!remote.sources.is_empty()).then_some(&remote as _),
            ssh: (!self.ssh_ids.is_empty()).then_some(&forwarder as _),
            download: Some(&downloads),
        };
        if self.platforms.len() > 1 {
            let r = self.build_platforms(&mut ctx);
            drop(op);
            return r;
        }
        // What the tags stand for before: an image of another platform keeps its place
        // under the name (see `local_index`).
        let before = crate::rpc::local_index::holders(&self.state, &self.opts.tags);
        let tags: Vec<String> = self.opts.tags.iter().map(|t| t.to_string()).collect();
        let _moves =
            crate::rpc::local_index::note_moves(&self.state, &tags).map_err(error::store)?;
        let built = build(&mut ctx, &self.opts);
        drop(op);
        let built = built.map_err(|e| error::status(e.kind(), e.to_string()))?;
        let hex = built.id.hex().to_string();
        if let Output::Archive { path, format, name } = &self.output {
            // Saved under the output's name (it goes into RepoTags), else by ID.
            let saved = name
                .as_ref()
                .map(|n| n.to_string())
                .unwrap_or_else(|| hex.clone());
            let tx = self.tx.clone();
            save::save(
                &self.state.store,
                self.files.as_ref(),
                std::slice::from_ref(&saved),
                path,
                *format,
                &Default::default(),
                &mut |l| {
                    tx.send(l);
                },
            )
            .map_err(error::transport)?;
        }
        match &self.output {
            Output::DockerDaemon(name) => {
                let socket = isula_transport::docker_daemon::socket();
                isula_transport::docker_daemon::load_into_docker(
                    &self.state.store,
                    &built.id,
                    name,
                    &socket,
                    &Default::default(),
                )
                .map_err(error::transport)?;
                self.tx.send(format!(
                    "Loaded image {} into the Docker daemon\n",
                    name.familiar()
                ));
            }
            Output::Registry(name, _) => {
                let tx = self.tx.clone();
                if let Some(note) = &self.push_note {
                    self.tx.send(note.clone());
                }
                let digest = isula_registry::push::push(
                    &self.state.registry,
                    &self.state.store,
                    &hex,
                    Some(&name.to_string()),
                    self.push_opts,
                    &isula_transport::Cancel::from_flag(self.cancel.clone()),
                    &mut |l| {
                        tx.send(l);
                    },
                )
                .map_err(crate::rpc::registry::status)?;
                *self.pushed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((name.clone(), digest));
            }
            Output::Isulad(name) => {
                isula_transport::isulad::load_into_isulad(
                    &self.state.store,
                    &built.id,
                    name,
                    std::path::Path::new(isula_transport::isulad::STAGING_DIR),
                    &self.opts.build_id,
                    &Default::default(),
                )
                .map_err(error::transport)?;
                self.tx
                    .send(format!("Loaded image {} into iSulad\n", name.familiar()));
            }
            _ => {}
        }
        for tag in &self.opts.tags {
            let full = tag.to_string();
            let prev = before.iter().find(|(n, _)| *n == full).map(|(_, id)| id);
            crate::rpc::local_index::adopt(&self.state, &full, &built.id, prev)
                .map_err(crate::rpc::registry::status)?;
        }
        if let Some(dest) = &self.cache_to {
            let tx = self.tx.clone();
            let mounts: Vec<isula_registry::cache::MountDir> = if self.cache_mounts {
                built
                    .cache_mounts
                    .iter()
                    .map(|id| isula_registry::cache::MountDir {
                        id: id.clone(),
                        dir: self.state.store.cache_mount_dir(id),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let report = isula_registry::cache::export(
                &self.state.registry,
                &self.state.store,
                &built.cache_keys,
                &mounts,
                dest,
                self.cache_compression,
                &isula_transport::Cancel::from_flag(self.cancel.clone()),
                &mut |l| {
                    tx.send(l);
                },
            )
            .map_err(|e| {
                let s = crate::rpc::registry::status(e);
                Status::new(
                    s.code(),
                    format!(
                        "the image {hex} was built, but exporting its build cache to {dest} failed: {}",
                        s.message()
                    ),
                )
            })?;
            self.tx.send(format!(
                "Build cache exported to {dest}: {} records, {} blobs\n",
                report.records, report.blobs
            ));
            // The snapshot blobs made for the export are not kept.
            if let Err(e) = self.state.store.gc() {
                tracing::warn!(error = %e, "collecting after the cache export");
            }
        }
        self.report_id(&hex)?;
        if let Some(w) = isula_builder_core::unused_args_warning(&built.unused_args) {
            self.tx.send(w);
        }
        Ok(hex)
    }
}

/// A log line as a Status message: text, or a progress event the build asked for.
fn status_line(line: String) -> StatusResponse {
    match isula_transport::progress::parse(&line) {
        Some(e) => StatusResponse {
            content: String::new(),
            progress: Some(crate::state::progress_message(e)),
        },
        None => StatusResponse {
            content: line,
            progress: None,
        },
    }
}

/// Streams the log of a build until it ends.
pub async fn status(
    state: Arc<State>,
    build_id: String,
) -> Result<tokio_stream::wrappers::ReceiverStream<Result<StatusResponse, Status>>, Status> {
    let (mut rx, cancel) = state.builds.subscribe(&build_id)?;
    let (out_tx, out_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut seen = false;
        loop {
            let next = if seen {
                rx.recv().await
            } else {
                match tokio::time::timeout(STATUS_WAIT, rx.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        let _ = out_tx
                            .send(Err(Status::not_found(format!(
                                "build {build_id} did not start"
                            ))))
                            .await;
                        state.builds.finish(&build_id);
                        return;
                    }
                }
            };
            seen = true;
            match next {
                Some(line) => {
                    if out_tx.send(Ok(status_line(line))).await.is_err() {
                        // The client stopped reading: cancel the build.
                        cancel.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                None => return,
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(out_rx))
}

/// The build cache's size cap: as configured, else a fifth of the data root's free space
/// plus what the cache already holds (so the cap does not shrink as the cache grows).
fn cache_cap(state: &State) -> u64 {
    if let Some(max) = state.settings.build_cache_max {
        return max;
    }
    let free = rustix::fs::statvfs(&state.settings.data_root)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    let held = state.store.cache().usage().bytes;
    ((free.saturating_add(held)) / 5).max(1 << 30)
}

/// What the cache leaves free on the data root's file system, in bytes, if configured.
pub(crate) fn cache_keep_free(state: &State) -> Option<u64> {
    let keep = state.settings.build_cache_keep_free?;
    let size = state.store.free_space().map(|(_, size)| size).unwrap_or(0);
    Some(keep.bytes(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_101st_build_is_refused_and_slots_come_back() {
        let b = Builds::default();
        for i in 0..limits::CONCURRENT_BUILDS_MAX {
            b.start(&format!("b{i}"), "", false)
                .expect("within the limit");
        }
        let e = b
            .start("one-too-many", "", false)
            .expect_err("over the limit");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("limit of 100"), "{}", e.message());
        assert_eq!(b.running(), 100);
        b.finish("b0");
        b.start("one-too-many", "", false)
            .expect("a slot was freed");
        // A build ID cannot run twice at once.
        assert_eq!(
            b.start("b1", "", false).expect_err("duplicate").code(),
            tonic::Code::AlreadyExists
        );
    }

    #[test]
    fn an_unread_log_is_bounded_and_says_what_it_dropped() {
        let b = Builds::default();
        let (tx, _) = b.start("quiet", "", false).expect("start");
        for i in 0..(LOG_BUFFER_LINES + 100) {
            tx.send(format!("line {i}\n"));
        }
        tx.send("last\n".into());
        let (mut rx, _) = b.subscribe("quiet").expect("subscribe");
        let mut got = Vec::new();
        while let Ok(l) = rx.try_recv() {
            got.push(l);
        }
        assert_eq!(got.len(), LOG_BUFFER_LINES);
        assert_eq!(got[0], "line 0\n");
        assert_eq!(
            tx.dropped.load(Ordering::SeqCst),
            101,
            "the 100 lines over the buffer and the last one"
        );
    }

    #[test]
    fn outputs_are_checked() {
        assert!(matches!(parse_output(""), Ok(Output::Store)));
        assert!(matches!(
            parse_output("docker-archive:/x.tar:app:1"),
            Ok(Output::Archive { .. })
        ));
        assert!(matches!(
            parse_output("docker-daemon:app:1"),
            Ok(Output::DockerDaemon(_))
        ));
        assert!(matches!(
            parse_output("isulad:busybox:2.0"),
            Ok(Output::Isulad(_))
        ));
        assert!(parse_output("isulad:busybox").is_err(), "a tag is required");
        assert!(parse_output("docker-archive:relative.tar").is_err());
        assert!(parse_output("ftp:x").is_err());
        assert!(matches!(
            parse_output("docker://localhost:5000/a:b"),
            Ok(Output::Registry(r, false)) if r.to_string() == "localhost:5000/a:b"
        ));
        assert!(matches!(
            parse_output("oci://localhost:5000/a:b"),
            Ok(Output::Registry(_, true))
        ));
        assert!(parse_output("docker:localhost:5000/a:b").is_err());
        assert!(parse_output("docker://localhost:5000/a@sha256:0000000000000000000000000000000000000000000000000000000000000000").is_err());
    }

    #[test]
    fn a_second_build_of_the_same_entity_is_refused_while_the_first_runs() {
        let b = Builds::default();
        let _first = b
            .start("b1", "digest:2020-01-01 00:00:00", false)
            .expect("first");
        let Err(e) = b.start("b2", "digest:2020-01-01 00:00:00", false) else {
            panic!("a second build of the same entity was accepted");
        };
        assert!(e.message().contains("by buildID: b1"), "{}", e.message());
        assert!(b.start("b3", "digest:2021-01-01 00:00:00", false).is_ok());
        assert!(b.start("b4", "", false).is_ok() && b.start("b5", "", false).is_ok());
        b.finish("b1");
        assert!(b.start("b6", "digest:2020-01-01 00:00:00", false).is_ok());
    }
}
