//! `RUN --mount`: each mount read (its values expanded with the stage's variables), what
//! it adds to the step's cache key, and what is set up for the run, as BuildKit does:
//! - `bind` (read-only unless `rw`): a path of the build context (what `.dockerignore`
//!   leaves), of an earlier stage or of an image; writes to an `rw` one are discarded.
//! - `cache`: a directory kept in the data root across builds and restarts, by `id`
//!   (default: the target), created with `mode`/`uid`/`gid`, optionally seeded from `from`;
//!   its content never enters a layer or a key. `sharing=shared` lets every build write at
//!   once, `locked` makes builds wait for each other, `private` gives a build that finds it
//!   in use a throwaway one.
//! - `tmpfs`: a fresh tmpfs (`size`).
//! - `secret`: a `--secret` value as a read-only file (default `/run/secrets/<id>`, mode
//!   0400) and/or an environment variable (`env`); `ssh`: a socket forwarding one of the
//!   client's SSH agents (default id `default`, target `/run/buildkit/ssh_agent.<N>`, and
//!   `SSH_AUTH_SOCK` then points at it). Both live in a tmpfs of the step, never on disk,
//!   and only their ids and options enter the key. One the build was not given is left
//!   out, or fails the step when `required`.
//!
//! Mount targets that do not exist are created (directories, 0755) and stay in the layer,
//! as BuildKit leaves them. Paths inside a stage, an image or the context are resolved in
//! their root; nothing a build wrote can point a mount outside it.

use super::*;
use isula_dockerfile::mounts::{parse_mount_with, MountKind, RunMount, Sharing};
use std::os::fd::AsRawFd;

/// One `--mount` read and resolved for a RUN.
pub(super) struct Planned {
    spec: RunMount,
    /// The absolute target in the RUN's filesystem.
    target: String,
    /// What `from=` names, once built or found.
    from: Option<StageResult>,
    /// An ssh mount at its default target: `SSH_AUTH_SOCK` points at it.
    default_agent: bool,
    /// `from=` names a directory context (`--build-context NAME=DIR`).
    from_dir: Option<PathBuf>,
}

/// What the step's mounts hold until the step ends (views, locks, scratch copies); the
/// views unmount when this drops.
#[derive(Default)]
pub(super) struct Held {
    views: Vec<MountGuard>,
    _locks: Vec<isula_sys::lock::FileLock>,
    /// Forwarded agents (they stop before their sockets' tmpfs goes).
    agents: Vec<Box<dyn Send>>,
    /// The step's tmpfs for secrets and sockets, and its mount point.
    memory: Option<(MountGuard, PathBuf)>,
    /// Variables the mounts add to the run (secrets with `env`, `SSH_AUTH_SOCK`).
    pub env: Vec<(String, zeroize::Zeroizing<String>)>,
}

impl Held {
    /// The step's tmpfs, if a secret or an agent needed one.
    pub(super) fn memory_dir(&self) -> Option<&Path> {
        self.memory.as_ref().map(|(_, d)| d.as_path())
    }

    fn memory(&mut self, at: PathBuf, size: u64) -> Result<PathBuf, String> {
        if let Some((_, d)) = &self.memory {
            return Ok(d.clone());
        }
        std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        let guard = isula_sys::mount::mount_tmpfs(&at, size).map_err(|e| e.to_string())?;
        self.memory = Some((guard, at.clone()));
        Ok(at)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.agents.clear();
        if let Some((guard, dir)) = self.memory.take() {
            if let Err(e) = guard.unmount() {
                tracing::warn!(dir = %dir.display(), error = %e, "unmounting a step's secrets");
            } else {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

/// How long a `sharing=locked` cache mount is waited for between checks of cancellation.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(50);

fn absolute(cwd: &str, target: &str) -> String {
    let joined = if target.starts_with('/') {
        PathBuf::from(target)
    } else {
        Path::new("/").join(cwd).join(target)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            std::path::Component::Normal(p) => out.push(p),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.to_string_lossy().into_owned()
}

/// The real path of a handle (the kernel's name for what a rooted lookup found).
fn real_path(fd: &std::os::fd::OwnedFd) -> Result<PathBuf, String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| e.to_string())
}

impl StageRun<'_, '_> {
    /// Reads the step's `--mount` values and finds what their `from=` names.
    pub(super) fn plan_mounts(
        &mut self,
        n: usize,
        step: &Step,
        raw: &[String],
    ) -> Result<Vec<Planned>, BuildError> {
        let vars = self.vars();
        let cwd = self.working_dir();
        let mut out: Vec<Planned> = Vec::new();
        for r in raw {
            let lexer = self.lexer;
            let spec = parse_mount_with(r, &mut |v| {
                lexer.process_word(v, &vars).map_err(|e| e.to_string())
            })
            .map_err(|e| step_err(n, step, format!("--mount={r}: {e}")))?;
            let mut spec = spec;
            let mut default_agent = false;
            let target = match spec.kind {
                MountKind::Secret => {
                    // BuildKit: the id defaults to the target's file name.
                    let id = spec.id.clone().or_else(|| {
                        spec.target
                            .as_deref()
                            .and_then(|t| Path::new(t).file_name())
                            .map(|f| f.to_string_lossy().into_owned())
                    });
                    let Some(id) = id else {
                        return Err(step_err(
                            n,
                            step,
                            format!("--mount={r}: a secret mount needs an id or a target"),
                        ));
                    };
                    if self.opts.secrets.get(&id).is_none() {
                        if spec.required {
                            return Err(step_err(
                                n,
                                step,
                                format!(
                                    "--mount={r}: secret {id} is required, and the build was \
                                     given none with that id (--secret id={id},src=FILE)"
                                ),
                            ));
                        }
                        continue;
                    }
                    spec.id = Some(id.clone());
                    match (&spec.target, &spec.env) {
                        // Only a variable.
                        (None, Some(_)) => String::new(),
                        (t, _) => {
                            absolute(&cwd, t.as_deref().unwrap_or(&format!("/run/secrets/{id}")))
                        }
                    }
                }
                MountKind::Ssh => {
                    let id = spec.id.clone().unwrap_or_else(|| "default".into());
                    let given = self.ctx.ssh.is_some_and(|s| s.ids().contains(&id));
                    if !given {
                        if spec.required {
                            return Err(step_err(
                                n,
                                step,
                                format!(
                                    "--mount={r}: SSH agent {id} is required, and the build was \
                                     given none with that id (--ssh {id}[=SOCKET|KEY])"
                                ),
                            ));
                        }
                        continue;
                    }
                    spec.id = Some(id);
                    let index = out.iter().filter(|p| p.spec.kind == MountKind::Ssh).count();
                    default_agent = spec.target.is_none() && index == 0;
                    absolute(
                        &cwd,
                        spec.target
                            .as_deref()
                            .unwrap_or(&format!("/run/buildkit/ssh_agent.{index}")),
                    )
                }
                _ => absolute(&cwd, spec.target.as_deref().unwrap_or_default()),
            };
            if spec.kind == MountKind::Secret && target.is_empty() {
                out.push(Planned {
                    spec,
                    target,
                    from: None,
                    default_agent,
                    from_dir: None,
                });
                continue;
            }
            if target == "/" {
                return Err(step_err(
                    n,
                    step,
                    format!("--mount={r}: cannot mount over the root"),
                ));
            }
            if out.iter().any(|p| p.target == target) {
                return Err(step_err(
                    n,
                    step,
                    format!("--mount={r}: {target} is mounted twice"),
                ));
            }
            let named = spec
                .from
                .as_deref()
                .and_then(|f| self.opts.named_context(f))
                .cloned();
            let from_dir = match &named {
                Some(crate::NamedContext::Dir(d)) if spec.kind == MountKind::Bind => {
                    Some(d.clone())
                }
                Some(crate::NamedContext::Dir(_)) => {
                    return Err(step_err(
                        n,
                        step,
                        format!(
                            "--mount={r}: from= a directory context works for bind mounts only"
                        ),
                    ))
                }
                _ => None,
            };
            if let (Some(f), None) = (&spec.from, &named) {
                let lower = f.to_ascii_lowercase();
                if self.df.stages[self.index..]
                    .iter()
                    .any(|s| s.name.as_deref() == Some(lower.as_str()))
                {
                    return Err(step_err(
                        n,
                        step,
                        format!("--mount={r}: from={f} names this stage or a later one"),
                    ));
                }
            }
            let from = match (&spec.from, &named) {
                (None, _) | (_, Some(crate::NamedContext::Dir(_))) => None,
                (Some(_), Some(crate::NamedContext::Image(image))) => Some(
                    image_base(self.ctx, image, &self.platform.clone(), self.materials)
                        .map_err(|e| in_step(n, step, e))?,
                ),
                (Some(f), None) => Some(match self.stage_result(f) {
                    Some(r) => r.clone(),
                    None => image_base(self.ctx, f, &self.platform.clone(), self.materials)
                        .map_err(|e| {
                            in_step(
                                n,
                                step,
                                match e {
                                    BuildError::Invalid(m) => BuildError::Invalid(format!(
                                        "--mount from={f}: no earlier stage has that name, and {m}"
                                    )),
                                    e => e,
                                },
                            )
                        })?,
                }),
            };
            out.push(Planned {
                spec,
                target,
                from,
                default_agent,
                from_dir,
            });
        }
        Ok(out)
    }

    /// What the mounts add to the step's key: their options, and for a bind what it shows
    /// (the content of the context path, or the key of the stage or image). A cache
    /// mount's content never enters it, as in BuildKit.
    pub(super) fn mounts_key(
        &self,
        n: usize,
        step: &Step,
        planned: &[Planned],
    ) -> Result<Vec<serde_json::Value>, BuildError> {
        let mut out = Vec::new();
        for p in planned {
            let m = &p.spec;
            if m.kind == MountKind::Cache {
                // Used by this build even when the step comes from the cache (what
                // `--cache-to --cache-mounts` exports).
                let id = m.id.clone().unwrap_or_else(|| p.target.clone());
                self.used_cache_mounts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
            }
            let shows = match (m.kind, &p.from, &p.from_dir) {
                (MountKind::Bind, None, Some(dir)) => {
                    let root = Root::open(dir).map_err(|e| step_err(n, step, e.to_string()))?;
                    // Keyed by what the bind shows (FIFOs too: see `ClientFiles`).
                    let src = Source {
                        local: Some(crate::copy::ClientFiles::Viewed),
                        ..Source::new(&root, None)
                    };
                    let mut hashes = crate::cache_key::ContextHashes::load(None);
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    hash_sources(&src, &[source], &mut hashes)
                        .map_err(|e| step_err(n, step, e))?
                        .to_string()
                }
                (MountKind::Bind, None, None) => {
                    let root = Root::open(&self.opts.context)
                        .map_err(|e| step_err(n, step, e.to_string()))?;
                    let src = Source {
                        local: Some(crate::copy::ClientFiles::Viewed),
                        ..Source::new(&root, self.ignore)
                    };
                    let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    hash_sources(&src, &[source], &mut hashes)
                        .map_err(|e| step_err(n, step, e))?
                        .to_string()
                }
                // A bind shows the content of its source in the stage or image (as a
                // COPY --from reads it: see `content_key`).
                (MountKind::Bind, Some(r), _) if self.opts.cache != CacheMode::Off => {
                    let source = m.source.clone().unwrap_or_else(|| "/".into());
                    self.content_key(n, step, r, &[source], &[])?.to_string()
                }
                (_, Some(r), _) => r.key.to_string(),
                _ => String::new(),
            };
            out.push(serde_json::json!({
                "type": m.kind.name(),
                "target": p.target,
                "source": m.source,
                "from": shows,
                "readonly": m.readonly,
                "id": m.id,
                "sharing": m.sharing,
                "mode": m.mode,
                "uid": m.uid,
                "gid": m.gid,
                "size": m.size,
                "env": m.env,
                "required": m.required,
            }));
        }
        Ok(out)
    }

    /// Sets the mounts up for the run: what runc mounts, and what holds them.
    pub(super) fn prepare_mounts(
        &mut self,
        n: usize,
        step: &Step,
        planned: Vec<Planned>,
    ) -> Result<(Vec<isula_runtime::Mount>, Held), BuildError> {
        let mut held = Held::default();
        let mut mounts = Vec::new();
        for (i, p) in planned.into_iter().enumerate() {
            let e = |m: String| step_err(n, step, format!("--mount target={}: {m}", p.target));
            let scratch = self.dir.join(format!("mount-{n}-{i}"));
            std::fs::create_dir_all(&scratch).map_err(|x| e(x.to_string()))?;
            let (source, options): (PathBuf, Vec<String>) = match p.spec.kind {
                MountKind::Tmpfs => {
                    let mut o = vec!["nosuid".to_string(), "nodev".to_string()];
                    if let Some(size) = p.spec.size {
                        o.push(format!("size={size}"));
                    }
                    mounts.push(isula_runtime::Mount {
                        destination: p.target.clone(),
                        kind: "tmpfs".into(),
                        source: "tmpfs".into(),
                        options: o,
                    });
                    continue;
                }
                MountKind::Bind => {
                    let path = match &p.from {
                        None => match &p.from_dir {
                            Some(d) => self.context_copy(d, None, &p.spec, &scratch).map_err(e)?,
                            None => self
                                .context_copy(&self.opts.context, self.ignore, &p.spec, &scratch)
                                .map_err(e)?,
                        },
                        Some(r) => {
                            let view = self.view(r, &scratch, !p.spec.readonly, &mut held)?;
                            let source = p.spec.source.clone().unwrap_or_else(|| "/".into());
                            let root = Root::open(&view).map_err(|x| e(x.to_string()))?;
                            let fd = root
                                .open_at(
                                    Path::new(&source),
                                    Resolve::InRoot,
                                    OFlags::PATH,
                                    Mode::empty(),
                                )
                                .map_err(|x| e(format!("source {source}: {x}")))?;
                            real_path(&fd).map_err(e)?
                        }
                    };
                    (path, bind_options(p.spec.readonly))
                }
                MountKind::Cache => {
                    let dir = match self.cache_mount(&p, &scratch, &mut held) {
                        Ok(d) => d,
                        // Given up waiting for a locked cache: the build was cancelled.
                        Err(_) if self.ctx.cancelled() => return Err(BuildError::Cancelled),
                        Err(m) => return Err(e(m)),
                    };
                    (dir, bind_options(p.spec.readonly))
                }
                MountKind::Secret => {
                    let id = p.spec.id.clone().unwrap_or_default();
                    let value = self.opts.secrets.get(&id).unwrap_or_default();
                    if let Some(var) = &p.spec.env {
                        let text = std::str::from_utf8(value).map_err(|_| {
                            e(format!(
                                "secret {id} is not UTF-8 text, so it cannot be the variable {var}"
                            ))
                        })?;
                        held.env
                            .push((var.clone(), zeroize::Zeroizing::new(text.to_string())));
                    }
                    if p.target.is_empty() {
                        continue;
                    }
                    let dir = held
                        .memory(self.memory_at(n), self.memory_size())
                        .map_err(e)?;
                    let file = dir.join(format!("secret-{i}"));
                    write_private(&file, value, p.spec.mode.unwrap_or(0o400), &p.spec)
                        .map_err(e)?;
                    (file, bind_options(true))
                }
                MountKind::Ssh => {
                    let id = p.spec.id.clone().unwrap_or_default();
                    let dir = held
                        .memory(self.memory_at(n), self.memory_size())
                        .map_err(e)?;
                    let sock = dir.join(format!("ssh-{i}"));
                    let Some(ssh) = self.ctx.ssh else {
                        return Err(e(format!("SSH agent {id}: not forwarded")));
                    };
                    held.agents.push(
                        ssh.serve(&id, &sock)
                            .map_err(|m| e(format!("SSH agent {id}: {m}")))?,
                    );
                    set_owner_mode(&sock, p.spec.mode.unwrap_or(0o600), &p.spec).map_err(e)?;
                    if p.default_agent {
                        held.env.push((
                            "SSH_AUTH_SOCK".into(),
                            zeroize::Zeroizing::new(p.target.clone()),
                        ));
                    }
                    (sock, bind_options(false))
                }
            };
            mounts.push(isula_runtime::Mount {
                destination: p.target.clone(),
                kind: "bind".into(),
                source,
                options,
            });
        }
        Ok((mounts, held))
    }

    /// Where the step's tmpfs for secrets and sockets is mounted.
    fn memory_at(&self, n: usize) -> PathBuf {
        self.dir.join(format!("memory-{n}"))
    }

    /// Room for every secret of the build, and the bundle.
    fn memory_size(&self) -> u64 {
        self.opts.secrets.total_len() as u64 + (4 << 20)
    }

    /// A copy of a context path (what `.dockerignore` leaves, as the context BuildKit
    /// receives): a bind shows it, and writes to an `rw` one go with the copy.
    fn context_copy(
        &self,
        dir: &Path,
        ignore: Option<&Matcher>,
        spec: &RunMount,
        scratch: &Path,
    ) -> Result<PathBuf, String> {
        let ctx = Root::open(dir).map_err(|e| e.to_string())?;
        let source = spec.source.clone().unwrap_or_else(|| ".".into());
        let fd = ctx
            .open_at(
                Path::new(&source),
                Resolve::InRoot,
                OFlags::PATH,
                Mode::empty(),
            )
            .map_err(|e| format!("source {source} in the build context: {e}"))?;
        let is_dir = rustix::fs::fstat(&fd)
            .map(|st| isula_sys::rooted::is_dir(&st))
            .map_err(|e| e.to_string())?;
        let data = scratch.join("data");
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let into = Root::open(&data).map_err(|e| e.to_string())?;
        let src = Source {
            local: Some(crate::copy::ClientFiles::Viewed),
            ..Source::new(&ctx, ignore)
        };
        let dest = if is_dir { "/" } else { "/file" };
        copy::copy(&src, &[source], &into, dest, &CopyOptions::default(), None)?;
        Ok(if is_dir { data } else { data.join("file") })
    }

    /// A view of a stage's or image's filesystem: read-only, or over a scratch upper
    /// directory whose writes are thrown away.
    fn view(
        &self,
        r: &StageResult,
        scratch: &Path,
        writable: bool,
        held: &mut Held,
    ) -> Result<PathBuf, BuildError> {
        let view = scratch.join("view");
        let empty = scratch.join("empty");
        for d in [&view, &empty] {
            std::fs::create_dir_all(d).map_err(|e| isula_store::StoreError::io("create", d, e))?;
        }
        let mut lowers: Vec<PathBuf> = r
            .layers
            .iter()
            .rev()
            .map(|l| self.ctx.store.layer_diff(&l.chain_id, self.lease))
            .collect::<Result<_, _>>()?;
        if lowers.is_empty() {
            lowers.push(empty.clone());
        }
        let guard = if writable {
            let upper = scratch.join("upper");
            let work = scratch.join("work");
            for d in [&upper, &work] {
                std::fs::create_dir_all(d)
                    .map_err(|e| isula_store::StoreError::io("create", d, e))?;
            }
            mount_overlay(&lowers, &upper, &work, &view, &[])
        } else {
            mount_overlay_ro(&lowers, &view, &empty)
        }
        .map_err(|e| BuildError::Invalid(format!("mounting a --mount from: {e}")))?;
        held.views.push(guard);
        Ok(view)
    }

    /// The cache mount's directory, created (and seeded from `from`) the first time, and
    /// locked as its `sharing` says.
    fn cache_mount(&self, p: &Planned, scratch: &Path, held: &mut Held) -> Result<PathBuf, String> {
        let id = p.spec.id.clone().unwrap_or_else(|| p.target.clone());
        self.used_cache_mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
        let hex = isula_types::Digest::of_bytes(id.as_bytes())
            .hex()
            .to_string();
        let dir = self
            .ctx
            .store
            .root()
            .join(isula_store::CACHE_MOUNTS_DIR)
            .join(hex);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !dir.join("id").exists() {
            std::fs::write(dir.join("id"), &id).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let lock = dir.join("lock");
        let taken = match p.spec.sharing {
            Sharing::Shared => Some(isula_sys::lock::FileLock::try_shared(&lock).or_else(|_| {
                // A `locked` user has it: a shared user waits like one.
                self.wait_lock(&lock, false)
            })),
            Sharing::Locked => Some(self.wait_lock(&lock, true)),
            Sharing::Private => match isula_sys::lock::FileLock::try_exclusive(&lock) {
                Ok(l) => Some(Ok(l)),
                Err(e) if isula_sys::lock::is_held_elsewhere(&e) => None,
                Err(e) => Some(Err(e.to_string())),
            },
        };
        let data = match taken {
            Some(l) => {
                held._locks.push(l?);
                // Its last use, for `builder du`.
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&lock)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                dir.join("data")
            }
            // In use: this build gets a throwaway one.
            None => scratch.join("private"),
        };
        if !data.exists() {
            // Made beside where it goes (the data root and the run root are often other
            // file systems: a rename cannot cross them).
            let fresh = data.with_file_name(format!(
                ".fresh-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            let made = self.make_cache_mount_dir(p, &id, scratch, &fresh);
            let moved = made.and_then(|()| {
                // Never over one a build sharing it made first (a plain rename would replace
                // it while still empty, and that build would go on in an orphaned directory).
                isula_sys::rename_noreplace(&fresh, &data).or_else(|e| {
                    // A build sharing it made it first.
                    if data.is_dir() {
                        Ok(())
                    } else {
                        Err(format!("{}: {e}", data.display()))
                    }
                })
            });
            if fresh.exists() {
                if let Err(e) = isula_sys::rooted::remove_tree(&fresh) {
                    tracing::warn!(dir = %fresh.display(), error = %e, "removing an unused cache mount directory");
                }
            }
            moved?;
        }
        Ok(data)
    }

    /// A new cache mount directory at `fresh`, seeded from `from` when the mount says so,
    /// else from what a `--cache-from` source exported of it (`--cache-mounts`).
    fn make_cache_mount_dir(
        &self,
        p: &Planned,
        id: &str,
        scratch: &Path,
        fresh: &Path,
    ) -> Result<(), String> {
        {
            std::fs::create_dir_all(fresh).map_err(|e| e.to_string())?;
            if p.from.is_none() {
                if let Some(remote) = self.ctx.remote {
                    if remote.seed_mount(id, fresh)? {
                        tracing::info!(id, "cache mount seeded from the registry cache");
                    }
                }
            }
            if let Some(r) = &p.from {
                let mut seeded = Held::default();
                let view = self
                    .view(r, &scratch.join("seed"), false, &mut seeded)
                    .map_err(|e| e.to_string())?;
                let src_root = Root::open(&view).map_err(|e| e.to_string())?;
                let into = Root::open(fresh).map_err(|e| e.to_string())?;
                let src = Source::new(&src_root, None);
                let source = p.spec.source.clone().unwrap_or_else(|| "/".into());
                copy::copy(&src, &[source], &into, "/", &CopyOptions::default(), None)?;
            }
            let mode = p.spec.mode.unwrap_or(0o755);
            rustix::fs::chmod(fresh, Mode::from_raw_mode(mode)).map_err(|e| e.to_string())?;
            rustix::fs::chown(
                fresh,
                Some(rustix::fs::Uid::from_raw(p.spec.uid.unwrap_or(0))),
                Some(rustix::fs::Gid::from_raw(p.spec.gid.unwrap_or(0))),
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Waits for the lock, checking for cancellation in between.
    fn wait_lock(&self, lock: &Path, exclusive: bool) -> Result<isula_sys::lock::FileLock, String> {
        loop {
            let r = if exclusive {
                isula_sys::lock::FileLock::try_exclusive(lock)
            } else {
                isula_sys::lock::FileLock::try_shared(lock)
            };
            match r {
                Ok(l) => return Ok(l),
                Err(e) if isula_sys::lock::is_held_elsewhere(&e) => {
                    if self.ctx.cancelled() {
                        return Err("build cancelled".into());
                    }
                    std::thread::sleep(LOCK_POLL);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Writes a secret's file (only its owner's from the start).
fn write_private(path: &Path, value: &[u8], mode: u32, spec: &RunMount) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    f.write_all(value).map_err(|e| e.to_string())?;
    drop(f);
    set_owner_mode(path, mode, spec)
}

fn set_owner_mode(path: &Path, mode: u32, spec: &RunMount) -> Result<(), String> {
    rustix::fs::chown(
        path,
        Some(rustix::fs::Uid::from_raw(spec.uid.unwrap_or(0))),
        Some(rustix::fs::Gid::from_raw(spec.gid.unwrap_or(0))),
    )
    .map_err(|e| e.to_string())?;
    rustix::fs::chmod(path, Mode::from_raw_mode(mode)).map_err(|e| e.to_string())
}

fn bind_options(readonly: bool) -> Vec<String> {
    let mut o = vec![
        "rbind".to_string(),
        "nosuid".to_string(),
        "nodev".to_string(),
    ];
    if readonly {
        o.push("ro".into());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::absolute;

    #[test]
    fn targets_are_absolute_and_clean() {
        assert_eq!(absolute("/app", "cache"), "/app/cache");
        assert_eq!(absolute("", "cache"), "/cache");
        assert_eq!(absolute("/app", "/root/.cache/"), "/root/.cache");
        assert_eq!(absolute("/app", "../x/./y"), "/x/y");
        assert_eq!(absolute("/", "/../.."), "/");
    }
}
