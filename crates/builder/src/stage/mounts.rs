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
}

/// What the step's mounts hold until the step ends (views, locks, scratch copies); the
/// views unmount when this drops.
#[derive(Default)]
pub(super) struct Held {
    views: Vec<MountGuard>,
    _locks: Vec<isula_sys::lock::FileLock>,
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
            if matches!(spec.kind, MountKind::Secret | MountKind::Ssh) {
                return Err(step_err(
                    n,
                    step,
                    format!(
                        "--mount={r}: type={} mounts are not supported yet",
                        spec.kind.name()
                    ),
                ));
            }
            let target = absolute(&cwd, spec.target.as_deref().unwrap_or_default());
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
            if let Some(f) = &spec.from {
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
            let from = match &spec.from {
                None => None,
                Some(f) => Some(match self.stage_result(f) {
                    Some(r) => r.clone(),
                    None => image_base(self.ctx, f).map_err(|e| {
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
            out.push(Planned { spec, target, from });
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
            let shows = match (m.kind, &p.from) {
                (MountKind::Bind, None) => {
                    let root = Root::open(&self.opts.context)
                        .map_err(|e| step_err(n, step, e.to_string()))?;
                    let src = Source {
                        root: &root,
                        ignore: self.ignore,
                    };
                    let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    hash_sources(&src, &[source], &mut hashes)
                        .map_err(|e| step_err(n, step, e))?
                        .to_string()
                }
                (_, Some(r)) => r.key.to_string(),
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
                        None => self.context_copy(&p.spec, &scratch).map_err(e)?,
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
                MountKind::Secret | MountKind::Ssh => continue,
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

    /// A copy of a context path (what `.dockerignore` leaves, as the context BuildKit
    /// receives): a bind shows it, and writes to an `rw` one go with the copy.
    fn context_copy(&self, spec: &RunMount, scratch: &Path) -> Result<PathBuf, String> {
        let ctx = Root::open(&self.opts.context).map_err(|e| e.to_string())?;
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
            root: &ctx,
            ignore: self.ignore,
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
            .map(|l| self.ctx.store.layer_dir(&l.chain_id).join("diff"))
            .collect();
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
            let fresh = scratch.join("fresh");
            std::fs::create_dir_all(&fresh).map_err(|e| e.to_string())?;
            if let Some(r) = &p.from {
                let mut seeded = Held::default();
                let view = self
                    .view(r, &scratch.join("seed"), false, &mut seeded)
                    .map_err(|e| e.to_string())?;
                let src_root = Root::open(&view).map_err(|e| e.to_string())?;
                let into = Root::open(&fresh).map_err(|e| e.to_string())?;
                let src = Source {
                    root: &src_root,
                    ignore: None,
                };
                let source = p.spec.source.clone().unwrap_or_else(|| "/".into());
                copy::copy(&src, &[source], &into, "/", &CopyOptions::default(), None)?;
            }
            let mode = p.spec.mode.unwrap_or(0o755);
            rustix::fs::chmod(&fresh, Mode::from_raw_mode(mode)).map_err(|e| e.to_string())?;
            rustix::fs::chown(
                &fresh,
                Some(rustix::fs::Uid::from_raw(p.spec.uid.unwrap_or(0))),
                Some(rustix::fs::Gid::from_raw(p.spec.gid.unwrap_or(0))),
            )
            .map_err(|e| e.to_string())?;
            if let Err(e) = std::fs::rename(&fresh, &data) {
                // A build sharing it made it first.
                if !data.is_dir() {
                    return Err(format!("{}: {e}", data.display()));
                }
            }
        }
        Ok(data)
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
