//! RUN: the process (command, environment, user, working directory), its cache key, and
//! the run itself through the build's runtime.

use super::*;

/// A RUN's flags as written.
pub(super) struct RunFlags<'a> {
    pub heredocs: &'a [isula_dockerfile::parser::Heredoc],
    pub mounts: &'a [String],
    pub network: Option<&'a str>,
    pub security: Option<&'a str>,
}

impl StageRun<'_, '_> {
    pub(super) fn run(
        &mut self,
        n: usize,
        step: &Step,
        command: Command,
        flags: RunFlags<'_>,
    ) -> Result<(), BuildError> {
        let heredocs = flags.heredocs;
        let network = crate::Network::parse(flags.network.unwrap_or_default(), self.opts.network)
            .map_err(|e| step_err(n, step, format!("--network: {e}")))?;
        let insecure = flags.security == Some("insecure");
        if insecure && !self.opts.allow_insecure {
            return Err(step_err(
                n,
                step,
                "RUN --security=insecure needs the daemon started with --allow-insecure \
                 (every capability, no seccomp filter, writable /sys)",
            ));
        }
        isula_runtime::can_run(
            &self.platform.architecture,
            self.platform.qemu_name(),
            isula_types::image::host_architecture(),
        )
        .map_err(|e| step_err(n, step, e))?;
        // Mounts first: an image named by from= is found (or pulled) before anything else.
        let planned = self.plan_mounts(n, step, flags.mounts)?;
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
            .field("network", network.name().as_bytes());
        if insecure {
            key.field("security", b"insecure");
        }
        if !self.opts.add_hosts.is_empty() {
            key.json("add_hosts", &self.opts.add_hosts);
        }
        if !planned.is_empty() {
            key.json("mounts", &self.mounts_key(n, step, &planned)?);
        }
        let key = key.finish();
        if self.try_cache(&key)? {
            self.key = key;
            return Ok(());
        }
        self.mount_step()?;
        let scratch_dirs: Vec<PathBuf> = (0..planned.len())
            .map(|i| self.dir.join(format!("mount-{n}-{i}")))
            .collect();
        let (mounts, mut held) = self.prepare_mounts(n, step, planned)?;
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
        // Secrets as variables and the agent socket: in this run only, never in the key.
        for (k, v) in std::mem::take(&mut held.env) {
            if k != "SSH_AUTH_SOCK" || !set(&env, &k) {
                env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
                env.push(format!("{k}={}", v.as_str()));
            }
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
        // A file runc creates to mount a file on goes again afterwards (BuildKit leaves the
        // directories it creates as mount points, not the files).
        let new_file_targets: Vec<String> = mounts
            .iter()
            .filter(|m| m.kind == "bind" && !m.source.is_dir())
            .map(|m| m.destination.clone())
            .filter(|d| {
                root.open_at(Path::new(d), Resolve::InRoot, OFlags::PATH, Mode::empty())
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
            seccomp_unconfined: self.opts.seccomp_unconfined,
            mounts,
            network_none: network == crate::Network::None,
            insecure,
            hosts_file: self.hosts_file().map_err(|e| step_err(n, step, e))?,
            limits: self.opts.limits.clone(),
        };
        // With secrets in its environment the bundle lives in the step's tmpfs, off disk.
        let bundle = match held.memory_dir() {
            Some(dir) => dir.join("bundle"),
            None => self.dir.join(format!("bundle-{n}")),
        };
        std::fs::create_dir_all(&bundle)
            .map_err(|e| isula_store::StoreError::io("create", &bundle, e))?;
        let rootfs_path = self.dir.join("rootfs");
        let mut pending = Vec::new();
        let cancel = self.ctx.cancel.clone();
        let log = &mut *self.ctx.log;
        let phase = isula_store::phase::Phase::start("run: the container (runc)");
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
        drop(phase);
        if !pending.is_empty() {
            (self.ctx.log)(format!("{}\n", String::from_utf8_lossy(&pending)));
        }
        let _ = std::fs::remove_dir_all(&bundle);
        drop(process);
        // The views unmount and the cache locks go before anything else happens.
        drop(held);
        for d in &scratch_dirs {
            if let Err(e) = isula_sys::rooted::remove_tree(d) {
                tracing::warn!(dir = %d.display(), error = %e, "removing a mount's scratch directory");
            }
        }
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
        for t in &new_file_targets {
            if let Ok((pfd, name)) = root.parent(Path::new(t), Resolve::InRoot, false) {
                if let Ok(Some(st)) =
                    isula_sys::rooted::lstat(std::os::fd::AsFd::as_fd(&pfd), &name)
                {
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::RegularFile
                        && st.st_size == 0
                    {
                        let _ = rustix::fs::unlinkat(&pfd, &name, rustix::fs::AtFlags::empty());
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

    /// The build's /etc/hosts for RUN with the `--add-host` lines (None: the host's as
    /// is). Written once per build, in full before it is renamed into place.
    fn hosts_file(&self) -> Result<Option<PathBuf>, String> {
        if self.opts.add_hosts.is_empty() {
            return Ok(None);
        }
        let path = self.opts.work_dir.join("hosts");
        if path.exists() {
            return Ok(Some(path));
        }
        let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for (host, ip) in &self.opts.add_hosts {
            text.push_str(&format!("{ip}\t{host}\n"));
        }
        std::fs::create_dir_all(&self.opts.work_dir).map_err(|e| e.to_string())?;
        let tmp = self.opts.work_dir.join(format!("hosts.{}", self.index));
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(path))
    }
}
