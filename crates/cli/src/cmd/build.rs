//! `ctr-img build [FLAGS] [CONTEXT]`: reads the Dockerfile here, sends the build, and prints
//! the daemon's log as it streams. Ctrl+C (or any failure of either call) drops both calls,
//! which cancels the build on the daemon.

use super::Client;
use anyhow::{bail, Context as _, Result};
use isula_api::v1::{BuildRequest, BuildStatic, StatusRequest};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The largest Dockerfile the client sends (the manual's 1 MiB).
const DOCKERFILE_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Build-time variables (NAME=VALUE)
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Static build: 'build-time=YYYY-MM-DD HH:MM:SS' gives reproducible images
    #[arg(long = "build-static")]
    pub build_static: Option<String>,
    /// Path of the Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "filename")]
    pub filename: Option<String>,
    /// Write the image ID to this file
    #[arg(long = "iidfile")]
    pub iidfile: Option<String>,
    /// Where to export the image: docker-archive:PATH[:IMAGE:TAG], oci-archive:PATH[:IMAGE:TAG],
    /// docker-daemon:IMAGE:TAG, isulad:IMAGE:TAG, docker://REGISTRY/REPO:TAG,
    /// oci://REGISTRY/REPO:TAG (pushed with an OCI manifest)
    #[arg(short = 'o', long = "output")]
    pub output: Option<String>,
    /// supply chain: sign what -o docker://... pushes
    #[command(flatten)]
    pub sign: super::sign::SignArgs,
    /// Pass the proxy variables of the daemon's environment to RUN
    #[arg(long = "proxy", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub proxy: bool,
    /// Tag for the built image
    #[arg(short = 't', long = "tag")]
    pub tag: Option<String>,
    /// Capabilities RUN steps get in addition to the defaults
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Security options for RUN steps: seccomp=unconfined drops their seccomp filter
    #[arg(long = "security-opt")]
    pub security_opt: Vec<String>,
    /// Image format: docker (the default) or oci
    #[arg(long = "format", value_parser = ["docker", "oci"])]
    pub format: Option<String>,
    /// Layer compression of -o docker://... and --cache-to: gzip, zstd (OCI manifests
    /// only) or zstd:chunked (not supported yet); default: the daemon's (gzip)
    #[arg(long = "compression")]
    pub compression: Option<String>,
    /// Its level: gzip 1-9, zstd 1-22
    #[arg(long = "compression-level", allow_negative_numbers = true)]
    pub compression_level: Option<i32>,
    /// Build up to this stage
    #[arg(long = "target")]
    pub target: Option<String>,
    /// Run every step: reuse nothing from the build cache (the steps are still recorded
    /// for later builds)
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// Reuse build-cache records exported to this registry reference (repeatable;
    /// REGISTRY/REPO:TAG or type=registry,ref=REGISTRY/REPO:TAG). A source that cannot be
    /// read is reported and the build goes on without it
    #[arg(long = "cache-from", value_parser = cache_ref)]
    pub cache_from: Vec<String>,
    /// Export this build's cache records and snapshots to this registry tag
    /// (REGISTRY/REPO:TAG or type=registry,ref=REGISTRY/REPO:TAG)
    #[arg(long = "cache-to", value_parser = cache_ref)]
    pub cache_to: Option<String>,
    /// With --cache-to, also export the contents of the RUN --mount=type=cache
    /// directories the build used; with --cache-from, seed cache mounts this daemon does
    /// not have yet from what a source exported
    #[arg(long = "cache-mounts")]
    pub cache_mounts: bool,
    /// Attach an SPDX 2.3 SBOM of the image's packages (read from its dpkg, rpm and apk
    /// databases) as an in-toto attestation
    #[arg(long = "sbom")]
    pub sbom: bool,
    /// Attach a SLSA v1 provenance as an in-toto attestation: mode=min (the default, what
    /// varies between runs left out) or mode=max
    #[arg(long = "provenance", num_args = 0..=1, default_missing_value = "mode=min", value_name = "mode=min|max")]
    pub provenance: Option<String>,
    /// A secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (repeatable;
    /// read here, sealed for the daemon, never stored in the image)
    #[arg(long = "secret")]
    pub secret: Vec<String>,
    /// An SSH agent for RUN --mount=type=ssh: default (SSH_AUTH_SOCK), or ID=SOCKET, or
    /// ID=KEY[,KEY] (loaded into an ssh-agent for the build) (repeatable)
    #[arg(long = "ssh")]
    pub ssh: Vec<String>,
    /// The network of RUN steps: host (the default, as isula-build) or none (loopback only);
    /// a RUN --network overrides it
    #[arg(long = "network", value_parser = ["default", "host", "none"])]
    pub network: Option<String>,
    /// Set metadata on the image (NAME=VALUE, repeatable)
    #[arg(long = "label")]
    pub label: Vec<String>,
    /// Add a HOST:IP line to /etc/hosts of RUN steps (repeatable)
    #[arg(long = "add-host")]
    pub add_host: Vec<String>,
    /// The platform to build for: os/arch[/variant] (linux/arm64); RUN for another
    /// architecture runs under QEMU (qemu-user-static)
    #[arg(long = "platform")]
    pub platform: Option<String>,
    /// A named context: NAME=DIR or NAME=docker-image://REF, used by FROM NAME,
    /// COPY --from=NAME and RUN --mount=from=NAME (over a stage of that name; repeatable)
    #[arg(long = "build-context")]
    pub build_context: Vec<String>,
    /// Memory limit of RUN steps (1g, 512m; at least 6m)
    #[arg(short = 'm', long = "memory", value_parser = size_arg)]
    pub memory: Option<i64>,
    /// CPU shares of RUN steps (relative weight)
    #[arg(short = 'c', long = "cpu-shares")]
    pub cpu_shares: Option<u64>,
    /// CPU CFS quota of RUN steps, in microseconds per period
    #[arg(long = "cpu-quota")]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period of RUN steps, in microseconds
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    /// CPUs RUN steps may use (0-3, 0,1)
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    /// Most processes and threads in one RUN step (-1: unlimited)
    #[arg(long = "pids-limit", allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Size of /dev/shm in RUN steps (64m)
    #[arg(long = "shm-size", value_parser = size_arg)]
    pub shm_size: Option<i64>,
    /// Ulimit of RUN steps: NAME=SOFT[:HARD] (nofile=1024:2048; repeatable)
    #[arg(long = "ulimit")]
    pub ulimit: Vec<String>,
    /// Build context directory
    #[arg(default_value = ".")]
    pub context: String,
    /// fleet: the placement key the fleet client sends (cmd/fleet.rs).
    #[arg(skip)]
    pub fleet_key: Option<String>,
    /// fleet: platforms other builders made (PLATFORM=REF), for the list this build makes.
    #[arg(skip)]
    pub fleet_parts: Vec<String>,
}

/// `NAME=DIR` with DIR made absolute (and checked here, where it is), or `NAME=URL`.
fn build_context(spec: &str) -> Result<String> {
    let Some((name, value)) = spec.split_once('=') else {
        bail!("invalid --build-context {spec:?}: expected NAME=DIR or NAME=docker-image://REF");
    };
    if name.trim().is_empty() {
        bail!("--build-context {spec:?}: the name is empty, so it is not a valid name");
    }
    if value.contains("://") {
        return Ok(spec.to_string());
    }
    let dir = crate::absolute(value)?;
    if !dir.is_dir() {
        bail!(
            "--build-context {name}={value}: {} is not a directory",
            dir.display()
        );
    }
    Ok(format!("{name}={}", dir.display()))
}

/// Docker's size units (`512m`, `1g`, `100k`, bytes without a unit).
fn size_arg(text: &str) -> Result<i64, String> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number with b, k, m or g"))?;
    let shift = match unit.trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => {
            return Err(format!(
                "invalid size {text:?}: expected a number with b, k, m or g"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// A cache reference as given: `REF`, or BuildKit's `type=registry,ref=REF[,mode=max]`.
fn cache_ref(spec: &str) -> Result<String, String> {
    if !spec.contains('=') {
        if spec.trim().is_empty() {
            return Err("a registry reference is needed".into());
        }
        return Ok(spec.trim().to_string());
    }
    let mut reference = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("type", "registry")) => {}
            Some(("type", other)) => {
                return Err(format!(
                    "cache type {other:?} is not supported: only registry"
                ))
            }
            Some(("ref", r)) if !r.is_empty() => reference = Some(r.to_string()),
            // Every step and its files are exported: BuildKit's mode=max.
            Some(("mode", "max")) => {}
            _ => return Err(format!("unknown cache option {part:?}")),
        }
    }
    reference.ok_or_else(|| format!("{spec:?} names no ref=REGISTRY/REPO:TAG"))
}

fn read_dockerfile(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading Dockerfile {}", path.display()))?;
    if !meta.is_file() {
        bail!("Dockerfile {} is not a regular file", path.display());
    }
    if meta.len() > DOCKERFILE_MAX {
        bail!(
            "Dockerfile {} is {} bytes, over the limit of {DOCKERFILE_MAX} bytes",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("reading Dockerfile {}", path.display()))
}

pub(super) fn dockerfile_path(args: &Args, context: &Path) -> Result<PathBuf> {
    if let Some(f) = &args.filename {
        return crate::absolute(f);
    }
    for name in ["Dockerfile", "dockerfile"] {
        let p = context.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("no Dockerfile in {}: use -f to name one", context.display())
}

/// Makes the output's path absolute and checks what the client can check.
fn output_spec(output: &str) -> Result<String> {
    let Some((kind, rest)) = output.split_once(':') else {
        bail!("invalid output {output:?}: expected TYPE:DESTINATION");
    };
    match kind {
        "docker-archive" | "oci-archive" => {
            let (path, image) = match rest.split_once(':') {
                Some((p, i)) => (p, Some(i)),
                None => (rest, None),
            };
            if path.is_empty() {
                bail!("output {output:?} needs a path");
            }
            let abs = crate::absolute(path)?;
            if std::fs::symlink_metadata(&abs).is_ok() {
                bail!("output file already exists: {}", abs.display());
            }
            Ok(match image {
                Some(i) => format!("{kind}:{}:{i}", abs.display()),
                None => format!("{kind}:{}", abs.display()),
            })
        }
        "docker-daemon" | "isulad" => {
            if !rest.contains(':') || rest.ends_with(':') {
                bail!("output {output:?} needs IMAGE:TAG (a tag is required for {kind})");
            }
            Ok(output.to_string())
        }
        "docker" | "oci" => Ok(output.to_string()),
        other => bail!("invalid output type {other:?}: expected docker-archive, oci-archive, docker-daemon, isulad, docker or oci"),
    }
}

/// `--security-opt` values: only `seccomp=unconfined` is known.
fn seccomp_unconfined(opts: &[String]) -> Result<bool> {
    let mut unconfined = false;
    for o in opts {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => unconfined = true,
            other => {
                bail!("invalid --security-opt {other:?}: the one supported is seccomp=unconfined")
            }
        }
    }
    Ok(unconfined)
}

fn build_static(spec: &str) -> Result<BuildStatic> {
    let value = spec.strip_prefix("build-time=").with_context(|| {
        format!("invalid --build-static {spec:?}: expected 'build-time=YYYY-MM-DD HH:MM:SS'")
    })?;
    let t = chrono::NaiveDateTime::parse_from_str(value.trim(), "%Y-%m-%d %H:%M:%S")
        .with_context(|| format!("invalid build-time {value:?}: expected YYYY-MM-DD HH:MM:SS"))?;
    Ok(BuildStatic {
        build_time: Some(prost_types::Timestamp {
            seconds: t.and_utc().timestamp(),
            nanos: 0,
        }),
    })
}

/// When any build arg is a proxy variable, every one is RSA-encrypted for the daemon.
fn needs_protection(args: &[String]) -> bool {
    args.iter()
        .any(|a| isula_types::PROXY_ARGS.contains(&a.split('=').next().unwrap_or_default()))
}

fn protect_build_args(
    args: Vec<String>,
    key: Option<&isula_api::secret::PublicKey>,
) -> Result<(Vec<String>, bool)> {
    let Some(key) = key.filter(|_| needs_protection(&args)) else {
        return Ok((args, false));
    };
    let out = args
        .iter()
        .map(|a| {
            let name = a.split('=').next().unwrap_or_default();
            key.encrypt_hex(a)
                .with_context(|| format!("encrypting --build-arg {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, true))
}

/// `SOURCE_DATE_EPOCH` from the client's environment becomes the build arg, as BuildKit's
/// client passes it, unless a `--build-arg SOURCE_DATE_EPOCH=...` is given.
fn with_source_date_epoch(mut args: Vec<String>) -> Vec<String> {
    let given = args
        .iter()
        .any(|a| a.split('=').next() == Some("SOURCE_DATE_EPOCH"));
    if !given {
        if let Some(v) = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            args.push(format!("SOURCE_DATE_EPOCH={v}"));
        }
    }
    args
}

pub async fn run(client: &mut Client, args: Args, remote: bool) -> Result<()> {
    super::remote_files::set_remote(remote);
    let context = crate::absolute(&args.context)?;
    if !context.is_dir() {
        bail!("build context {} is not a directory", context.display());
    }
    let dockerfile = read_dockerfile(&dockerfile_path(&args, &context)?)?;
    // A remote daemon gets the context over the connection: what the Dockerfile reads of
    // it, and of that what changed since the last build.
    let context_dir = if remote {
        let reach = reach_of(client, &dockerfile).await;
        let synced = super::context_upload::sync(client, &context, &reach).await?;
        println!(
            "Sent the build context: {} of {} files, {} bytes (the rest unchanged since the last build)",
            synced.sent_files, synced.files, synced.sent_bytes
        );
        format!("context:{}", synced.id)
    } else {
        context.display().to_string()
    };
    // fleet: the project's key, for a builder's shared cache registry.
    let fleet_key = super::fleet::key_for(&args, &context)?;
    let output = args
        .output
        .as_deref()
        .map(output_spec)
        .transpose()?
        .unwrap_or_default();
    let static_time = args.build_static.as_deref().map(build_static).transpose()?;
    let build_id = hex::encode(rand::random::<[u8; 6]>());
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(dockerfile.as_bytes()))
    };
    // As isula-build: the static build time, else now (so that only static builds of one
    // Dockerfile with one time are refused while another runs).
    let entity_time = static_time
        .as_ref()
        .and_then(|s| s.build_time.as_ref())
        .map(|t| t.seconds.to_string())
        .unwrap_or_else(|| chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true));
    // The daemon's key seals proxy build args and secrets (a remote daemon sends it).
    let key = if needs_protection(&args.build_args) || !args.secret.is_empty() {
        Some(super::remote_files::public_key(client).await?)
    } else {
        None
    };
    let (build_args, encrypted) =
        protect_build_args(with_source_date_epoch(args.build_args), key.as_ref())?;
    for h in &args.add_host {
        if !h.contains(':') && !h.contains('=') {
            bail!("invalid --add-host {h:?}: expected HOST:IP");
        }
    }
    let secrets = super::build_session::seal_secrets(&args.secret, key.as_ref())?;
    let mut build_contexts = args
        .build_context
        .iter()
        .map(|spec| build_context(spec))
        .collect::<Result<Vec<_>>>()?;
    // What the daemon writes for this client, fetched when the build ends (remote).
    let mut outputs = super::remote_files::Outputs::default();
    let mut output = output;
    let mut iidfile = args.iidfile.as_deref().map(crate::absolute).transpose()?;
    let mut local_iidfile = None;
    if remote {
        // A directory --build-context is synced as the context is.
        for spec in &mut build_contexts {
            let Some((name, value)) = spec.split_once('=') else {
                continue;
            };
            if value.contains("://") {
                continue;
            }
            let synced = super::context_upload::sync(
                client,
                Path::new(value),
                &super::context_reach::Reach::All,
            )
            .await
            .with_context(|| format!("sending --build-context {name}={value}"))?;
            *spec = format!("{name}=context:{}", synced.id);
        }
        if let Some((kind, rest)) = output.split_once(':') {
            if kind == "docker-archive" || kind == "oci-archive" {
                let (path, image) = match rest.split_once(':') {
                    Some((p, i)) => (p, Some(i)),
                    None => (rest, None),
                };
                let there = outputs.file(Path::new(path));
                output = match image {
                    Some(i) => format!("{kind}:{there}:{i}"),
                    None => format!("{kind}:{there}"),
                };
            }
        }
        // Written here when the build ends, from the image ID it returns.
        local_iidfile = iidfile.take();
    }
    let agents = super::build_session::agents(&args.ssh)?;
    // supply chain: keys checked before the build starts.
    let signer = args.sign.signer()?;
    let req = BuildRequest {
        build_id: build_id.clone(),
        build_type: "ctr-img".into(),
        context_dir,
        file_content: dockerfile,
        output,
        build_args,
        proxy: args.proxy,
        iidfile: iidfile.map(|p| p.display().to_string()).unwrap_or_default(),
        build_static: static_time,
        additional_tag: args.tag.unwrap_or_default(),
        cap_add_list: args.cap_add,
        seccomp_unconfined: seccomp_unconfined(&args.security_opt)?,
        entity_id: format!("{digest}:{entity_time}"),
        encrypted,
        // Without --format, "docker" as isula-build always sent, except beside --compression
        // (see `push`).
        format: match args.format {
            Some(f) => f,
            None if args.compression.is_some() => String::new(),
            None => "docker".to_string(),
        },
        compression: args.compression.unwrap_or_default(),
        compression_level: args.compression_level,
        target: args.target.unwrap_or_default(),
        no_cache: args.no_cache,
        cache_from: args.cache_from,
        cache_to: args.cache_to.unwrap_or_default(),
        cache_mounts: args.cache_mounts,
        sign_simple: signer.as_ref().is_some_and(|s| s.wants_simple()),
        sign_sigstore: signer.as_ref().is_some_and(|s| s.wants_sigstore()),
        progress: crate::progress::wanted(),
        secrets,
        ssh_ids: agents.ids(),
        network: args.network.filter(|n| n != "default").unwrap_or_default(),
        labels: args.label,
        add_hosts: args.add_host,
        build_contexts,
        platform: args.platform.unwrap_or_default(),
        fleet_key: match args.fleet_key {
            Some(k) => k,
            None => fleet_key,
        },
        fleet_parts: args.fleet_parts,
        sbom: args.sbom,
        provenance: args.provenance.unwrap_or_default(),
        limits: Some(isula_api::v1::BuildLimits {
            memory: args.memory.unwrap_or(0),
            cpu_shares: args.cpu_shares.unwrap_or(0),
            cpu_quota: args.cpu_quota.unwrap_or(0),
            cpu_period: args.cpu_period.unwrap_or(0),
            cpuset_cpus: args.cpuset_cpus.unwrap_or_default(),
            pids_limit: args.pids_limit.unwrap_or(0),
            shm_size: args.shm_size.unwrap_or(0),
            ulimits: args.ulimit,
        }),
    };
    // The agents are served over the build's session while it runs.
    let session = if args.ssh.is_empty() {
        None
    } else {
        Some(super::build_session::serve(client, build_id.clone(), &agents).await?)
    };
    let live = req.progress;
    let mut status_client = client.clone();
    let status = async move {
        let mut stream = status_client
            .status(StatusRequest { build_id })
            .await?
            .into_inner();
        if !live {
            let mut out = std::io::stdout();
            while let Some(item) = stream.message().await? {
                out.write_all(item.content.as_bytes())?;
                out.flush()?;
            }
            return anyhow::Ok(());
        }
        // On a terminal: the same lines, each step's time after it, and a live block with
        // the running step and any download.
        let mut block = crate::progress::Live::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        let timing =
            |d: std::time::Duration| format!("\x1b[2m ---> {:.2}s\x1b[0m\n", d.as_secs_f64());
        let result = loop {
            tokio::select! {
                item = stream.message() => {
                    let item = match item {
                        Ok(Some(i)) => i,
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    };
                    if let Some(p) = item.progress {
                        block.event(p);
                        continue;
                    }
                    if item.content.starts_with("STEP ") {
                        if let Some((_, d)) = block.step(&item.content) {
                            block.text(&timing(d));
                        }
                    } else if item.content.starts_with("Getting image source signatures") {
                        if let Some((_, d)) = block.end_step() {
                            block.text(&timing(d));
                        }
                    }
                    block.text(&item.content);
                }
                _ = tick.tick() => block.redraw(),
            }
        };
        if let Some((_, d)) = block.end_step() {
            block.text(&timing(d));
        }
        block.finish();
        result?;
        anyhow::Ok(())
    };
    let printer = tokio::spawn(status);
    // If the build fails, its log may still be streaming: stop it (dropping the call), as a
    // failed log would stop the build.
    let mut result = match client.build(req).await {
        Ok(resp) => {
            let printed = printer.await.context("log printer")?;
            let resp = resp.into_inner();
            let id = resp.image_id;
            match (&signer, printed) {
                (Some(signer), Ok(())) => {
                    super::sign::answer_all(client, signer, resp.sign_requests)
                        .await
                        .map(|()| id)
                }
                (_, r) => r.map(|()| id),
            }
        }
        Err(e) => {
            printer.abort();
            if outputs.is_empty() {
                Err(e.into())
            } else {
                // Named by the user's paths, not the daemon's places for them.
                Err(anyhow::anyhow!(outputs.explain(e.message())))
            }
        }
    };
    if let Ok(id) = result.as_ref().map(String::clone) {
        if !outputs.is_empty() {
            let mut fetch_client = client.clone();
            if let Err(e) = outputs.fetch(&mut fetch_client).await {
                result = Err(e);
            }
        }
        if let (Some(path), true) = (&local_iidfile, result.is_ok()) {
            if let Err(e) = write_iidfile(path, &id) {
                result = Err(e);
            }
        }
    }
    let result = result.map(|_| ());
    if let Some(s) = session {
        s.abort();
    }
    drop(agents);
    result
}

/// What of the context the Dockerfile reads (all of it when that cannot be known here: an
/// unparsable Dockerfile, which the daemon then reports, or a base image the daemon does
/// not hold or whose ONBUILD triggers could read any of it).
async fn reach_of(client: &mut Client, dockerfile: &str) -> super::context_reach::Reach {
    use super::context_reach::{reach, Reach};
    let Ok(df) = isula_dockerfile::instructions::parse_dockerfile(dockerfile) else {
        return Reach::All;
    };
    let (r, bases) = reach(&df);
    if r == Reach::All {
        return r;
    }
    for base in bases {
        let inspected = client
            .image_inspect(isula_api::v1::ImageInspectRequest {
                image: base,
                ..Default::default()
            })
            .await;
        let Ok(found) = inspected else {
            return Reach::All;
        };
        let config: serde_json::Value =
            serde_json::from_slice(&found.into_inner().config).unwrap_or_default();
        let triggers = config["config"]["OnBuild"]
            .as_array()
            .is_some_and(|t| !t.is_empty());
        if triggers {
            return Reach::All;
        }
    }
    r
}

/// Writes the image ID as the daemon writes an --iidfile (the hex ID, no newline).
fn write_iidfile(path: &Path, id: &str) -> Result<()> {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    std::fs::write(path, id).with_context(|| format!("writing --iidfile {}", path.display()))
}

#[cfg(test)]
mod cache_ref_tests {
    use super::cache_ref;

    #[test]
    fn plain_and_buildkit_forms() {
        assert_eq!(cache_ref("reg:5000/c:1"), Ok("reg:5000/c:1".into()));
        assert_eq!(
            cache_ref("type=registry,ref=reg:5000/c:1,mode=max"),
            Ok("reg:5000/c:1".into())
        );
        assert!(cache_ref("type=local,dest=/x").is_err_and(|e| e.contains("local")));
        assert!(cache_ref("type=registry").is_err_and(|e| e.contains("ref=")));
        assert!(cache_ref("type=registry,ref=r/c:1,mode=min").is_err());
        assert!(cache_ref(" ").is_err());
    }
}
