//! ADD of remote sources, as BuildKit reads them:
//! - `http(s)://...`: one file, downloaded through the daemon's HTTP stack (the
//!   [`crate::Downloader`]), named after the URL's last path component (`__unnamed__`
//!   without one), mode 0600, its mtime the `Last-Modified` time (else the epoch), never
//!   unpacked; `--checksum=sha256:...` is verified, and then also keys the step, so a cached
//!   step downloads nothing.
//! - git repositories (`https://host/repo.git#ref:subdir`, `git://`, `ssh://`,
//!   `git@host:repo.git`): the ref (a branch, a tag or a commit; default HEAD) resolved to
//!   its commit with `git ls-remote`, which keys the step; the tree (or `subdir`) checked
//!   out with the `git` binary, without `.git` unless `--keep-git-dir`, every file's mtime
//!   the commit's time (BuildKit's `mtime=commit`, so a build is reproducible).

use super::*;
use std::process::{Command as Proc, Stdio};

/// A remote source as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Remote {
    Http {
        url: String,
        filename: String,
    },
    Git {
        remote: String,
        reference: Option<String>,
        subdir: Option<String>,
    },
}

/// What keying a remote source found: fetched already (a download, to hash it), or what
/// fetching it needs (a download verified by the checksum, a checkout of the commit).
pub(super) enum Pending {
    Fetched(Fetched),
    Download,
    Checkout { commit: String },
}

/// How a remote source is found again and copied from.
pub(super) struct Fetched {
    /// The directory the copy reads from, and the source inside it.
    pub root: PathBuf,
    pub rel: String,
}

/// What `src` is, if remote.
pub(super) fn classify(src: &str) -> Option<Remote> {
    let (body, fragment) = match src.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (src, None),
    };
    let lower = body.to_ascii_lowercase();
    let path_part = lower.split('?').next().unwrap_or_default();
    let is_git = lower.starts_with("git://")
        || lower.starts_with("ssh://")
        || (lower.starts_with("git@") && lower.contains(':'))
        || ((lower.starts_with("http://") || lower.starts_with("https://"))
            && path_part.trim_end_matches('/').ends_with(".git"));
    if is_git {
        let (reference, subdir) = match fragment {
            Some(f) => match f.split_once(':') {
                Some((r, d)) => (Some(r.to_string()), Some(d.to_string())),
                None => (Some(f.to_string()), None),
            },
            None => (None, None),
        };
        return Some(Remote::Git {
            remote: body.to_string(),
            reference: reference.filter(|r| !r.is_empty()),
            subdir: subdir.filter(|d| !d.is_empty()),
        });
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let path = body
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.split_once('/'))
            .map(|(_, p)| p.split('?').next().unwrap_or_default())
            .unwrap_or_default();
        let base = path.rsplit('/').next().unwrap_or_default();
        let filename = if base.is_empty() || base == "." || base == ".." {
            "__unnamed__".to_string()
        } else {
            base.to_string()
        };
        return Some(Remote::Http {
            url: src.to_string(),
            filename,
        });
    }
    None
}

/// `sha256:<64 hex>`.
pub(super) fn parse_checksum(text: &str) -> Result<String, String> {
    let hex = text
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("--checksum={text}: expected sha256:<64 hex digits>"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--checksum={text}: expected sha256:<64 hex digits>"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// A git command with no prompts and no terminal, in `dir` if given, waited for with
/// cancellation checks.
fn git(
    args: &[&str],
    dir: Option<&Path>,
    cancel: &isula_runtime::CancelFlag,
) -> Result<String, String> {
    let mut c = Proc::new("git");
    if let Some(d) = dir {
        c.arg("-C").arg(d);
    }
    c.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/true")
        .env("SSH_ASKPASS", "/bin/true")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c
        .spawn()
        .map_err(|e| format!("running git (is git installed?): {e}"))?;
    let pid = child.id();
    // The output is read on a thread so a cancel can stop a hanging fetch.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(r) => break r.map_err(|e| format!("git: {e}"))?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                    return Err("cancelled".into());
                }
            }
            Err(_) => return Err("git: lost the process".into()),
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim()
            .to_string();
        return Err(last);
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn is_commit(r: &str) -> bool {
    (r.len() == 40 || r.len() == 64) && r.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit `reference` names in `remote` (ls-remote; peeled tags first).
fn resolve(
    remote: &str,
    reference: Option<&str>,
    cancel: &isula_runtime::CancelFlag,
) -> Result<String, String> {
    if let Some(r) = reference.filter(|r| is_commit(r)) {
        return Ok(r.to_ascii_lowercase());
    }
    let r = reference.unwrap_or("HEAD");
    let out = git(
        &["ls-remote", "--", remote, r, &format!("{r}^{{}}")],
        None,
        cancel,
    )
    .map_err(|e| format!("git ls-remote {}: {e}", shown(remote)))?;
    let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
    let pick = |name: &str| {
        refs.iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| c.to_string())
    };
    let found = if r == "HEAD" {
        pick("HEAD")
    } else {
        pick(&format!("refs/tags/{r}^{{}}"))
            .or_else(|| pick(&format!("refs/tags/{r}")))
            .or_else(|| pick(&format!("refs/heads/{r}")))
            .or_else(|| pick(&format!("{r}^{{}}")))
            .or_else(|| pick(r))
    };
    found.ok_or_else(|| format!("unknown git ref {r:?} in {}", shown(remote)))
}

/// A git checkout: the commit the step's key names.
struct Checkout<'a> {
    remote: &'a str,
    /// The ref as written (what to fetch when the server serves no bare commit).
    reference: Option<&'a str>,
    commit: &'a str,
    subdir: Option<&'a str>,
    keep_git_dir: bool,
}

/// A remote as errors show it (no user info or query).
fn shown(remote: &str) -> String {
    url_shown(remote)
}

/// Sets the mtime of everything under `dir` (not following links), deepest first.
fn set_mtimes(dir: &Path, secs: i64) -> Result<(), String> {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    let mut stack = vec![(dir.to_path_buf(), false)];
    while let Some((p, visited)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() && !visited {
            stack.push((p.clone(), true));
            for e in std::fs::read_dir(&p).map_err(|e| format!("{}: {e}", p.display()))? {
                let e = e.map_err(|e| e.to_string())?;
                stack.push((e.path(), false));
            }
            continue;
        }
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &p,
            &ts,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

impl StageRun<'_, '_> {
    /// The key of each remote source, downloading or resolving what the key needs
    /// (`checksum`: the parsed `--checksum`), and what fetching each one still needs.
    pub(super) fn remote_keys(
        &mut self,
        n: usize,
        step: &Step,
        c: &isula_dockerfile::instructions::CopyArgs,
        remotes: &[Remote],
        checksum: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, Vec<Pending>), BuildError> {
        if checksum.is_some() && (c.sources.len() != 1 || remotes.len() != 1) {
            return Err(step_err(
                n,
                step,
                "--checksum needs exactly one source, a URL or a git repository",
            ));
        }
        let mut keys = Vec::new();
        let mut pending = Vec::new();
        for (i, r) in remotes.iter().enumerate() {
            match r {
                Remote::Http { url, filename } => {
                    if let Some(sum) = checksum {
                        self.materials
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(isula_attest::slsa::Material::Http {
                                url: url.clone(),
                                sha256: sum.to_string(),
                            });
                        // The checksum keys it: nothing to download for a cached step.
                        keys.push(serde_json::json!({"url": url, "sha256": sum}));
                        pending.push(Pending::Download);
                        continue;
                    }
                    let (f, got) = self.download(n, step, i, url, filename, None)?;
                    self.materials
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(isula_attest::slsa::Material::Http {
                            url: url.clone(),
                            sha256: got.sha256.clone(),
                        });
                    keys.push(serde_json::json!({
                        "url": url, "filename": filename, "sha256": got.sha256,
                        "mtime": got.last_modified,
                    }));
                    pending.push(Pending::Fetched(f));
                }
                Remote::Git {
                    remote,
                    reference,
                    subdir,
                } => {
                    let commit = resolve(remote, reference.as_deref(), &self.ctx.cancel)
                        .map_err(|e| step_err(n, step, e))?;
                    if let Some(sum) = checksum {
                        if !commit.starts_with(sum) {
                            return Err(step_err(
                                n,
                                step,
                                format!(
                                    "--checksum: {} is at commit {commit}, not {sum}",
                                    shown(remote)
                                ),
                            ));
                        }
                    }
                    self.materials
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(isula_attest::slsa::Material::Git {
                            url: remote.clone(),
                            commit: commit.clone(),
                        });
                    keys.push(serde_json::json!({
                        "git": remote, "commit": commit, "subdir": subdir,
                        "keep_git_dir": c.keep_git_dir,
                    }));
                    pending.push(Pending::Checkout { commit });
                }
            }
        }
        Ok((keys, pending))
    }

    /// Everything the copy reads, fetched (what `remote_keys` left).
    pub(super) fn fetch_remotes(
        &mut self,
        n: usize,
        step: &Step,
        c: &isula_dockerfile::instructions::CopyArgs,
        remotes: &[Remote],
        pending: Vec<Pending>,
        checksum: Option<&str>,
    ) -> Result<Vec<Fetched>, BuildError> {
        let mut out = Vec::new();
        for (i, (r, p)) in remotes.iter().zip(pending).enumerate() {
            match (r, p) {
                (_, Pending::Fetched(f)) => out.push(f),
                (Remote::Http { url, filename }, _) => {
                    let (f, _) = self.download(n, step, i, url, filename, checksum)?;
                    out.push(f);
                }
                (
                    Remote::Git {
                        remote,
                        reference,
                        subdir,
                    },
                    Pending::Checkout { commit },
                ) => {
                    let at = Checkout {
                        remote,
                        reference: reference.as_deref(),
                        commit: &commit,
                        subdir: subdir.as_deref(),
                        keep_git_dir: c.keep_git_dir,
                    };
                    out.push(self.checkout(n, step, i, at)?)
                }
                (Remote::Git { remote, .. }, Pending::Download) => {
                    return Err(step_err(
                        n,
                        step,
                        format!("git {}: not resolved", shown(remote)),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn scratch(&self, n: usize, i: usize) -> Result<PathBuf, BuildError> {
        let dir = self.dir.join(format!("add-{n}")).join(i.to_string());
        if dir.exists() {
            isula_sys::rooted::remove_tree(&dir).map_err(|e| BuildError::Invalid(e.to_string()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| isula_store::StoreError::io("create", &dir, e))?;
        Ok(dir)
    }

    fn download(
        &mut self,
        n: usize,
        step: &Step,
        i: usize,
        url: &str,
        filename: &str,
        checksum: Option<&str>,
    ) -> Result<(Fetched, crate::Downloaded), BuildError> {
        let Some(d) = self.ctx.download else {
            return Err(step_err(
                n,
                step,
                "ADD of a URL: this builder has no HTTP client",
            ));
        };
        let dir = self.scratch(n, i)?;
        let path = dir.join(filename);
        (self.ctx.log)(format!("Downloading {}\n", url_shown(url)));
        let got = match d.download(url, &path, &self.ctx.cancel) {
            Ok(g) => g,
            Err(_) if self.ctx.cancelled() => return Err(BuildError::Cancelled),
            Err(e) => return Err(step_err(n, step, format!("ADD {e}"))),
        };
        if let Some(want) = checksum {
            if got.sha256 != want {
                let _ = std::fs::remove_file(&path);
                return Err(step_err(
                    n,
                    step,
                    format!(
                        "--checksum: {} has sha256:{}, not sha256:{want}",
                        url_shown(url),
                        got.sha256
                    ),
                ));
            }
        }
        let e = |x: std::io::Error| step_err(n, step, format!("{}: {x}", path.display()));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(e)?;
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(got.last_modified.unwrap_or(0).max(0) as u64);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .map_err(|x| step_err(n, step, format!("{}: {x}", path.display())))?;
        Ok((
            Fetched {
                root: dir,
                rel: filename.to_string(),
            },
            got,
        ))
    }

    fn checkout(
        &mut self,
        n: usize,
        step: &Step,
        i: usize,
        at: Checkout<'_>,
    ) -> Result<Fetched, BuildError> {
        let Checkout {
            remote,
            reference,
            commit,
            subdir,
            keep_git_dir,
        } = at;
        let cancel = self.ctx.cancel.clone();
        let dir = self.scratch(n, i)?;
        let repo = dir.join("repo");
        let fail = |e: String| {
            if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                BuildError::Cancelled
            } else {
                step_err(n, step, format!("git {}: {e}", shown(remote)))
            }
        };
        (self.ctx.log)(format!("Fetching {} at {commit}\n", shown(remote)));
        let repo_s = repo.to_string_lossy().to_string();
        git(&["init", "-q", &repo_s], None, &cancel).map_err(fail)?;
        // The commit itself, shallow, where the server serves one by its hash; else the
        // ref, shallow; else everything (dumb HTTP cannot do shallow fetches).
        let shallow = |what: &str| {
            git(
                &["fetch", "-q", "--depth=1", "--", remote, what],
                Some(&repo),
                &cancel,
            )
        };
        let fetched = shallow(commit).or_else(|_| shallow(reference.unwrap_or("HEAD")));
        if fetched.is_err() {
            git(
                &[
                    "fetch",
                    "-q",
                    "--tags",
                    "--",
                    remote,
                    "+refs/heads/*:refs/remotes/origin/*",
                ],
                Some(&repo),
                &cancel,
            )
            .map_err(fail)?;
        }
        git(
            &["checkout", "-q", "--detach", commit],
            Some(&repo),
            &cancel,
        )
        .map_err(fail)?;
        let time: i64 = git(&["log", "-1", "--format=%ct", commit], Some(&repo), &cancel)
            .map_err(fail)?
            .trim()
            .parse()
            .map_err(|_| fail("no commit time".into()))?;
        if !keep_git_dir {
            isula_sys::rooted::remove_tree(&repo.join(".git"))
                .map_err(|e| step_err(n, step, e.to_string()))?;
        }
        set_mtimes(&repo, time).map_err(|e| step_err(n, step, e))?;
        let rel = match subdir {
            Some(d) => {
                let d = clean(&format!("/{d}")).trim_start_matches('/').to_string();
                let root = Root::open(&repo).map_err(|e| step_err(n, step, e.to_string()))?;
                root.open_at(
                    Path::new(if d.is_empty() { "." } else { &d }),
                    Resolve::InRoot,
                    OFlags::PATH | OFlags::DIRECTORY,
                    Mode::empty(),
                )
                .map_err(|e| {
                    step_err(
                        n,
                        step,
                        format!("git {}: subdirectory {d}: {e}", shown(remote)),
                    )
                })?;
                if d.is_empty() {
                    ".".to_string()
                } else {
                    d
                }
            }
            None => ".".to_string(),
        };
        Ok(Fetched { root: repo, rel })
    }
}

/// A URL as progress lines and errors show it (no query, no user info).
fn url_shown(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            if path.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => no_query.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_sources_as_buildkit_reads_them() {
        assert_eq!(
            classify("https://example.com/dl/tool.tar.gz?sig=1"),
            Some(Remote::Http {
                url: "https://example.com/dl/tool.tar.gz?sig=1".into(),
                filename: "tool.tar.gz".into()
            })
        );
        assert_eq!(
            classify("http://example.com/"),
            Some(Remote::Http {
                url: "http://example.com/".into(),
                filename: "__unnamed__".into()
            })
        );
        assert_eq!(
            classify("https://example.com/repo.git#v1.2:docs"),
            Some(Remote::Git {
                remote: "https://example.com/repo.git".into(),
                reference: Some("v1.2".into()),
                subdir: Some("docs".into())
            })
        );
        assert_eq!(
            classify("git@example.com:team/repo.git#main"),
            Some(Remote::Git {
                remote: "git@example.com:team/repo.git".into(),
                reference: Some("main".into()),
                subdir: None
            })
        );
        assert!(matches!(
            classify("git://127.0.0.1/r"),
            Some(Remote::Git { .. })
        ));
        assert_eq!(classify("local/file.txt"), None);
        assert_eq!(classify("./git@x"), None);
        assert!(parse_checksum(&format!("sha256:{}", "A".repeat(64))).is_ok());
        for bad in ["sha256:12", "md5:00", &"a".repeat(64)] {
            assert!(parse_checksum(bad).is_err(), "{bad}");
        }
        assert_eq!(
            url_shown("https://u:p@example.com/a?token=x"),
            "https://example.com/a"
        );
        assert_eq!(
            shown("https://u:p@example.com/r.git?x=1"),
            "https://example.com/r.git"
        );
    }
}
