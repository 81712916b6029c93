//! Build secrets and SSH agents end to end, with real runc: `--secret` values reach the
//! RUN steps that mount them (as files with their mode and owner, or as variables) and
//! nothing else: not a layer, the config, the history, the store, the cache, the daemon's
//! log or its run directory. `--ssh` forwards an agent (the caller's `SSH_AUTH_SOCK`, or
//! one the client starts for key files) that `ssh-add -l` in the step can list. Missing or
//! bad ones fail naming the flag or the line, and leave nothing.

use isula_integration::*;
use std::path::Path;

/// A value no file holds by chance (the time, the process and a counter, hashed).
fn marker() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    format!("isula-secret-marker-{}", &sha256_hex(seed.as_bytes())[..24])
}

/// Whether `needle` is in any file under `dir` (every byte; symlinks not followed).
fn found_under(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                if let Ok(data) = std::fs::read(&p) {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        hits.push(p.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

fn sha256_of(data: &[u8]) -> String {
    sha256_hex(data)
}

/// The files of every layer of a saved image, path → content, and the archive's bytes.
fn saved(d: &Daemon, image: &str) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let (entries, bytes) = d.layer_entries(image);
    (
        entries.into_iter().map(|e| (e.path, e.content)).collect(),
        bytes,
    )
}

fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    files
        .iter()
        .rev()
        .find(|(p, _)| p == name)
        .map(|(_, c)| std::str::from_utf8(c).unwrap_or("<binary>").trim())
}

#[test]
fn secrets_reach_their_steps_and_nothing_else() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    let (file_secret, env_secret) = (marker(), marker());
    let secret_path = work.path().join("token");
    std::fs::write(&secret_path, &file_secret).expect("secret");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /sum && stat -c '%a %u %g' /run/secrets/tok > /stat\n\
         RUN --mount=type=secret,id=tok,target=/opt/x/tok,mode=0440,uid=7,gid=8 stat -c '%a %u %g' /opt/x/tok > /stat2\n\
         RUN --mount=type=secret,id=pw,env=PW printf %s \"$PW\" | sha256sum | cut -d' ' -f1 > /envsum && test ! -e /run/secrets/pw\n\
         RUN --mount=type=secret,id=absent if test -e /run/secrets/absent; then echo there; else echo absent; fi > /absent\n\
         RUN env > /env-after\n",
    )
    .expect("df");
    let build = |tag: &str, extra: &[&str]| {
        let mut c = d.cli_command(&["ctr-img", "build", "-t", tag]);
        c.args(["--secret", &format!("id=tok,src={}", secret_path.display())])
            .args(["--secret", "id=pw,env=ISULA_TEST_PW"])
            .args(extra)
            .arg(&ctx)
            .env("ISULA_TEST_PW", &env_secret);
        let o = c.output().expect("build");
        assert!(
            o.status.success(),
            "build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let out = build("s:1", &[]);
    let (files, archive) = saved(&d, "s:1");
    assert_eq!(
        file(&files, "sum"),
        Some(sha256_of(file_secret.as_bytes()).as_str())
    );
    assert_eq!(file(&files, "stat"), Some("400 0 0"));
    assert_eq!(file(&files, "stat2"), Some("440 7 8"));
    assert_eq!(
        file(&files, "envsum"),
        Some(sha256_of(env_secret.as_bytes()).as_str())
    );
    assert_eq!(file(&files, "absent"), Some("absent"));
    assert!(
        !file(&files, "env-after")
            .unwrap_or_default()
            .contains("PW="),
        "a secret variable outlived its step"
    );
    // As BuildKit: the directories made as mount points stay, the secret files do not.
    assert!(files
        .iter()
        .any(|(p, _)| p.trim_end_matches('/') == "run/secrets"));
    for f in ["run/secrets/tok", "opt/x/tok", "run/secrets/pw"] {
        assert!(
            !files.iter().any(|(p, _)| p == f),
            "{f} is in a layer: {:?}",
            files.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    }
    // Not a byte of either value anywhere.
    for secret in [&file_secret, &env_secret] {
        let s = secret.as_bytes();
        assert!(
            !archive.windows(s.len()).any(|w| w == s),
            "in the saved image"
        );
        assert!(!out.contains(secret.as_str()), "in the build output");
        assert!(!d.log().contains(secret.as_str()), "in the daemon log");
        for dir in [d.data(), d.run_root()] {
            let hits = found_under(&dir, s);
            assert!(hits.is_empty(), "in {}: {hits:?}", dir.display());
        }
    }
    let inspect = d.ok(&["ctr-img", "inspect", "s:1"]);
    assert!(!inspect.contains(&file_secret) && !inspect.contains(&env_secret));
    // The key holds the id, not the value: a new value reuses the steps, as in BuildKit.
    std::fs::write(&secret_path, marker()).expect("secret");
    let again = build("s:2", &[]);
    assert!(
        again.matches("Using cache").count() >= 5,
        "steps ran again for a new secret value:\n{again}"
    );
    // The step's tmpfs is gone.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root = d.dir.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&root)),
        "mounts left under the daemon's directories"
    );
}

#[test]
fn bad_secrets_and_agents_fail_naming_them_and_leave_nothing() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    let big = work.path().join("big");
    std::fs::write(&big, vec![b'x'; 600 * 1024]).expect("big");
    let missing = work.path().join("missing").display().to_string();
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            "RUN --mount=type=secret,id=tok,required cat /run/secrets/tok".into(),
            vec![],
            "secret tok is required",
        ),
        (
            "RUN --mount=type=ssh,required true".into(),
            vec![],
            "SSH agent default is required",
        ),
        (
            "RUN true".into(),
            vec!["--secret".into(), format!("id=tok,src={missing}")],
            "id=tok: reading",
        ),
        (
            "RUN true".into(),
            vec!["--secret".into(), "id=tok,env=ISULA_SURELY_UNSET".into()],
            "the variable ISULA_SURELY_UNSET is not set",
        ),
        (
            "RUN true".into(),
            vec!["--secret".into(), format!("id=tok,src={}", big.display())],
            "over the limit",
        ),
        (
            "RUN true".into(),
            vec!["--ssh".into(), format!("default={missing}")],
            "--ssh default",
        ),
        (
            "RUN --mount=type=secret,id=a/b true".into(),
            vec![],
            "plain name",
        ),
        (
            "RUN --security=insecure true".into(),
            vec![],
            "--allow-insecure",
        ),
        (
            "RUN --network=bridge true".into(),
            vec![],
            "--network=bridge is not supported",
        ),
        (
            "RUN true".into(),
            vec!["--add-host".into(), "db:not-an-ip".into()],
            "invalid IP address",
        ),
    ];
    for (run, flags, want) in &cases {
        std::fs::write(ctx.join("Dockerfile"), format!("FROM busybox\n{run}\n")).expect("df");
        let before = d.images();
        let mut args = vec!["ctr-img", "build"];
        args.extend(flags.iter().map(String::as_str));
        let c = ctx.display().to_string();
        args.push(&c);
        let err = d.fails(&args);
        assert!(err.contains(want), "{run} {flags:?}: {err}");
        if flags.is_empty() {
            assert!(err.contains("line 2"), "{run}: {err}");
        }
        assert_eq!(d.images(), before, "{run}: the images changed");
        d.assert_no_build_work(run);
    }
}

/// A rootfs directory holding `ssh-add` and the libraries it loads (the host's), to COPY
/// into a busybox image.
fn ssh_add_tree(into: &Path) {
    let bin = Path::new("/usr/bin/ssh-add");
    let mut files = vec![bin.to_path_buf()];
    let ldd = std::process::Command::new("ldd")
        .arg(bin)
        .output()
        .expect("ldd");
    for l in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = l
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push(p.into());
        }
    }
    for f in files {
        let dest = into.join(f.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("dir");
        std::fs::copy(&f, &dest).expect("copy");
    }
}

#[test]
fn ssh_agents_are_forwarded_into_the_step_only() {
    if !require_root()
        || !require_tool("runc")
        || !require_tool("ssh-agent")
        || !require_tool("ssh-add")
        || !require_tool("ssh-keygen")
    {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(ctx.join("tools")).expect("ctx");
    ssh_add_tree(&ctx.join("tools"));
    let key = work.path().join("id_ed25519");
    run_ok(std::process::Command::new("ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "isula-forwarded-key",
        "-f",
        key.to_str().expect("utf8"),
    ]));
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY tools/ /\n\
         RUN --mount=type=ssh /usr/bin/ssh-add -l > /keys; echo \"$SSH_AUTH_SOCK\" > /sock\n\
         RUN --mount=type=ssh,id=work,target=/agent ls -l /agent > /agent-ls && SSH_AUTH_SOCK=/agent /usr/bin/ssh-add -l > /work-keys\n\
         RUN if [ -n \"$SSH_AUTH_SOCK\" ]; then echo set; else echo unset; fi > /after\n",
    )
    .expect("df");
    // `default`: the caller's agent; `work`: key files, loaded into an agent the client
    // starts (and stops) for the build.
    let agent_dir = tempfile::tempdir().expect("agent");
    let sock = agent_dir.path().join("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    wait_until(
        "the test's ssh-agent socket",
        std::time::Duration::from_secs(10),
        || sock.exists(),
    );
    run_ok(
        std::process::Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &sock),
    );
    let mut c = d.cli_command(&["ctr-img", "build", "-t", "ssh:1", "--ssh", "default"]);
    c.args(["--ssh", &format!("work={}", key.display())])
        .arg(&ctx)
        .env("SSH_AUTH_SOCK", &sock);
    let o = c.output().expect("build");
    assert!(
        o.status.success(),
        "build failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let (files, _) = saved(&d, "ssh:1");
    let keys = file(&files, "keys").unwrap_or_default();
    assert!(
        keys.contains("isula-forwarded-key") && keys.contains("ED25519"),
        "{keys}"
    );
    assert_eq!(file(&files, "sock"), Some("/run/buildkit/ssh_agent.0"));
    assert!(file(&files, "agent-ls")
        .unwrap_or_default()
        .starts_with("srw-------"));
    assert!(file(&files, "work-keys")
        .unwrap_or_default()
        .contains("isula-forwarded-key"));
    assert_eq!(file(&files, "after"), Some("unset"));
    for f in ["run/buildkit/ssh_agent.0", "agent"] {
        assert!(!files.iter().any(|(p, _)| p == f), "{f} is in a layer");
    }
    // The agent the client started for the key files is gone with the build.
    let leftover = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("isula-build-ssh-")
        })
        .count();
    assert_eq!(leftover, 0, "the client's ssh-agent directory is left");
    // Without --ssh the optional mount is left out: the step sees no agent.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY tools/ /\nRUN --mount=type=ssh if /usr/bin/ssh-add -l; then echo agent; else echo none; fi > /keys\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "ssh:2",
        ctx.to_str().expect("utf8"),
    ]);
    let (files, _) = saved(&d, "ssh:2");
    assert_eq!(file(&files, "keys"), Some("none"));
}

/// Every file under `dir`, gunzipped when it is gzip: whether `needle` is in any.
fn found_under_unzipped(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = found_under(dir, needle);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Ok(data) = std::fs::read(&p) else {
                continue;
            };
            if data.starts_with(&[0x1f, 0x8b]) {
                let mut plain = Vec::new();
                if std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(&data[..]),
                    &mut plain,
                )
                .is_ok()
                    && plain.windows(needle.len()).any(|w| w == needle)
                {
                    hits.push(format!("{} (gunzipped)", p.display()));
                }
            }
        }
    }
    hits
}

#[test]
fn secrets_stay_out_of_pushed_images_and_the_registry_cache() {
    if !require_root() || !require_tool("runc") || !require_tool("docker-registry") {
        return;
    }
    let reg = isula_integration::registry::Registry::start(Default::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    let secret = marker();
    let file = work.path().join("s");
    std::fs::write(&file, &secret).expect("secret");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN --mount=type=secret,id=s,env=S,target=/run/secrets/s sh -c 'test -n \"$S\" && test -s /run/secrets/s && wc -c < /run/secrets/s > /n'\n",
    )
    .expect("df");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--secret",
        &format!("id=s,src={}", file.display()),
        "--cache-to",
        &format!("{host}/cache:1"),
        "-o",
        &format!("docker://{host}/app:1"),
        ctx.to_str().expect("utf8"),
    ]);
    assert!(out.contains("Build cache exported"), "{out}");
    let hits = found_under_unzipped(&reg.dir.path().join("data"), secret.as_bytes());
    assert!(hits.is_empty(), "the secret reached the registry: {hits:?}");
    assert!(!reg.log().contains(&secret));
}
