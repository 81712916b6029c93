//! The 28 steps isula-build 0.9.6 was recorded doing (`testdata/transcripts/`), replayed
//! against our daemon twice: with our client, and with a minimal client that prints only
//! what the original client prints (each stream's text verbatim plus the lines the original
//! client adds by itself), which proves that the daemon streams no client line (else the
//! original client would print it twice). Stdout is compared line for line after the
//! transcripts' normalisation, the exit status as zero or non-zero, and a failing step's
//! stderr must name the object the original's names.
//!
//! Deliberate differences, each the transcripts' own notes or the store's nature:
//! - `tag-missing`: the original prints "succeed" for a tag that failed; we print nothing.
//! - `unknown-command`: a usage error on stderr with a non-zero exit is accepted too.
//! - `Deleted layer: sha256:<ID>` lines say which layers the removal freed. Which ones that
//!   is depends on how a store shares layers (containers/storage gives a pulled layer its own
//!   ID, and keeps a base whose layer a failed build's leftover container still uses), so
//!   they are compared apart: every one is well formed and comes before the `Deleted image:`
//!   line of the image that freed it, and after the last removal the store holds no layer.

use isula_api::v1::{self, control_client::ControlClient};
use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use regex::Regex;
use std::path::Path;
use std::process::Stdio;
use tonic::transport::Channel;

struct Step {
    name: String,
    command: String,
    exit_zero: bool,
    stdout: Vec<String>,
}

fn steps() -> Vec<Step> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/transcripts/isula-build-0.9.6.json");
    let text = std::fs::read_to_string(&path).expect("transcript");
    let json: serde_json::Value = serde_json::from_str(&text).expect("transcript JSON");
    let lines = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("lines")
            .iter()
            .map(|l| l.as_str().expect("line").to_string())
            .collect()
    };
    json.as_array()
        .expect("steps")
        .iter()
        .map(|s| Step {
            name: s["step"].as_str().expect("step").to_string(),
            command: s["command"].as_str().expect("command").to_string(),
            exit_zero: s["exit"] == "zero",
            stdout: lines(&s["stdout"]),
        })
        .collect()
}

/// What a failing step's stderr must mention (placeholders as in the commands).
fn must_mention(step: &str) -> &'static [&'static str] {
    match step {
        "tag-missing" | "images-missing" | "save-missing" => &["ts/none:1"],
        "rm-missing" => &["remove"],
        "build-bad-instruction" => &["FROBNICATE"],
        "build-run-fails" => &["RUN", "3"],
        "build-missing-base" => &["localhost:5000/ts/nothing-here:1"],
        "save-exists" => &["<W>/save.tar"],
        "load-missing" => &["<W>/nothing.tar"],
        "load-garbage" => &["<W>/ctx/Dockerfile"],
        "pull-missing" => &["localhost:5000/ts/none:1"],
        "logout-not-logged" => &["localhost:5000"],
        "import-missing" => &["<W>/none.tar"],
        "unknown-command" => &["frobnicate"],
        _ => &[],
    }
}

struct Normaliser {
    work: String,
    registry: String,
    id: Regex,
    short: Regex,
    date: Regex,
    size: Regex,
    spaces: Regex,
    dashes: Regex,
}

impl Normaliser {
    fn new(work: &Path, registry: &str) -> Normaliser {
        let re = |s: &str| Regex::new(s).expect("regex");
        Normaliser {
            work: work.display().to_string(),
            registry: registry.to_string(),
            id: re(r"[0-9a-f]{64}"),
            short: re(r"\b[0-9a-f]{12}\b"),
            date: re(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"),
            size: re(r"\b\d+(\.\d+)? ?(B|kB|KB|MB|GB|TB)\b"),
            spaces: re(r" +"),
            dashes: re(r"-{2,}"),
        }
    }

    fn line(&self, l: &str) -> String {
        let l = l
            .replace(&self.work, "<W>")
            .replace(&self.registry, "localhost:5000");
        let l = self.id.replace_all(&l, "<ID>");
        let l = self.short.replace_all(&l, "<SHORT>");
        let l = self.date.replace_all(&l, "<DATE>");
        let l = self.size.replace_all(&l, "<SIZE>");
        let l = self.spaces.replace_all(&l, " ");
        let l = self.dashes.replace_all(&l, "---");
        l.trim().to_string()
    }

    fn text(&self, t: &str) -> Vec<String> {
        t.lines().map(|l| self.line(l)).collect()
    }
}

/// The scripted run's inputs, as the transcripts' README describes them.
struct Setup {
    work: tempfile::TempDir,
    registry: Registry,
    daemon: Daemon,
}

impl Setup {
    fn new() -> Setup {
        let registry = Registry::start(RegistryOptions::default());
        let host = format!("localhost:{}", registry.port);
        // isula-build 0.9.6 has no build cache: each build runs every step and makes a new
        // image (build-iidfile's image is the one rm-prune deletes). Our cache would reuse
        // the first build's steps and image, so the run is made with it off; what it
        // changes when on is documented in the README ("Upgrading from isula-build").
        let daemon = Daemon::start_configured(
            &[
                (
                    "registries.toml",
                    &format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
                ),
                ("configuration.toml", "build_cache = false\n"),
            ],
            &[],
            &[],
        );
        let work = tempfile::Builder::new()
            .prefix("isula-transcript-")
            .tempdir()
            .expect("tmp");
        let ctx = work.path().join("ctx");
        std::fs::create_dir(&ctx).expect("ctx");
        std::fs::write(ctx.join("hello.txt"), "hello\n").expect("hello");
        for (name, text) in [
            (
                "Dockerfile",
                "FROM ts/app:base\nLABEL foo=bar\nCOPY ./* /home/dir1/\nRUN cat /home/dir1/hello.txt\n",
            ),
            ("Dockerfile.bad", "FROM ts/app:base\nFROBNICATE x\n"),
            ("Dockerfile.fail", "FROM ts/app:base\nRUN exit 3\n"),
            (
                "Dockerfile.nobase",
                &format!("FROM {host}/ts/nothing-here:1\nRUN true\n"),
            ),
        ] {
            std::fs::write(ctx.join(name), text).expect("dockerfile");
        }
        std::fs::write(work.path().join("rootfs.tar"), busybox_rootfs(&[])).expect("rootfs");
        Setup {
            work,
            registry,
            daemon,
        }
    }

    fn host(&self) -> String {
        format!("localhost:{}", self.registry.port)
    }

    /// The step's command with our paths and registry in place of the placeholders.
    fn command(&self, c: &str) -> String {
        c.replace(
            "<ROOTFS>",
            &self.work.path().join("rootfs.tar").display().to_string(),
        )
        .replace("<W>", &self.work.path().display().to_string())
        .replace("localhost:5000", &self.host())
    }
}

struct Outcome {
    stdout: String,
    stderr: String,
    ok: bool,
}

/// Runs each `&&`-joined command until one fails, as `sh` would.
fn run_chain(command: &str, mut one: impl FnMut(&[String]) -> Outcome) -> Outcome {
    let mut all = Outcome {
        stdout: String::new(),
        stderr: String::new(),
        ok: true,
    };
    for part in command.split(" && ") {
        let argv: Vec<String> = part.split_whitespace().map(str::to_string).collect();
        assert_eq!(argv[0], "isula-build", "{part}");
        let o = one(&argv[1..]);
        all.stdout.push_str(&o.stdout);
        all.stderr.push_str(&o.stderr);
        if !o.ok {
            all.ok = false;
            break;
        }
    }
    all
}

fn check_step(step: &Step, out: &Outcome, norm: &Normaliser, client: &str) -> Result<(), String> {
    let fail = |what: String| {
        Err(format!(
            "[{client}] step {}: {what}\n--- stdout\n{}--- stderr\n{}",
            step.name, out.stdout, out.stderr
        ))
    };
    let got = norm.text(&out.stdout);
    let (want, want_zero) = match step.name.as_str() {
        "tag-missing" => (Vec::new(), false),
        "unknown-command" if !out.ok => {
            if !got.is_empty() {
                return fail("a usage error prints no help on stdout".into());
            }
            (Vec::new(), false)
        }
        _ => (step.stdout.clone(), step.exit_zero),
    };
    if out.ok != want_zero {
        return fail(format!(
            "exit status: success is {}, expected {want_zero}",
            out.ok
        ));
    }
    let is_layer = |l: &String| l.starts_with("Deleted layer:");
    let got_main: Vec<&String> = got.iter().filter(|l| !is_layer(l)).collect();
    let want_main: Vec<&String> = want.iter().filter(|l| !is_layer(l)).collect();
    if got_main != want_main {
        return fail(format!("stdout\n  got: {got_main:?}\n want: {want_main:?}"));
    }
    for (i, l) in got.iter().enumerate().filter(|(_, l)| is_layer(l)) {
        if l != "Deleted layer: sha256:<ID>" {
            return fail(format!("malformed layer line {l:?}"));
        }
        if !got[i..].iter().any(|l| l.starts_with("Deleted image:")) {
            return fail("a layer line comes after its image's line".into());
        }
    }
    if !out.ok {
        let err = norm.text(&out.stderr).join("\n");
        if err.trim().is_empty() {
            return fail("no error on stderr".into());
        }
        for word in must_mention(&step.name) {
            if !err.contains(word) {
                return fail(format!("stderr does not name {word}"));
            }
        }
    }
    Ok(())
}

fn replay(client: &str, mut one: impl FnMut(&Setup, &[String]) -> Outcome) {
    if !require_root() || !require_tool("runc") || !require_tool("docker-registry") {
        return;
    }
    let setup = Setup::new();
    let norm = Normaliser::new(setup.work.path(), &setup.host());
    // Every step runs, so that one report shows every difference.
    let mut failures = Vec::new();
    for step in steps() {
        let out = run_chain(&setup.command(&step.command), |argv| one(&setup, argv));
        if let Err(e) = check_step(&step, &out, &norm, client) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Every image was removed by the last steps: no layer may be left behind.
    assert!(setup.daemon.images().is_empty(), "[{client}] images left");
    let layers = setup.daemon.data().join("layers");
    if layers.is_dir() {
        let left: Vec<_> = std::fs::read_dir(&layers)
            .expect("layers")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "[{client}] layers left: {left:?}");
    }
}

#[test]
fn our_client_prints_what_isula_build_0_9_6_prints() {
    replay("isula-build", |setup, argv| {
        let o = setup
            .daemon
            .cli_command(&argv.iter().map(String::as_str).collect::<Vec<_>>())
            .stdin(Stdio::null())
            .output()
            .expect("isula-build");
        Outcome {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            ok: o.status.success(),
        }
    });
}

#[test]
fn a_client_printing_only_what_the_original_prints_sees_each_line_once() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    replay("minimal client", |setup, argv| {
        let mut out = String::new();
        let result = rt.block_on(minimal_client(&setup.daemon.socket(), argv, &mut out));
        Outcome {
            stdout: out,
            stderr: result.as_ref().err().cloned().unwrap_or_default(),
            ok: result.is_ok(),
        }
    });
}

type Client = ControlClient<Channel>;

fn op_id() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

/// The original client's behaviour for the commands of the transcripts: stream text printed
/// as it comes, plus its own lines; nothing else.
async fn minimal_client(socket: &Path, argv: &[String], out: &mut String) -> Result<(), String> {
    let mut c: Client = isula_api::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let status = |e: tonic::Status| e.message().to_string();
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1))
            .map(|s| s.to_string())
    };
    match args.as_slice() {
        ["ctr-img", "import", src, reference] => {
            let mut s = c
                .import(v1::ImportRequest {
                    import_id: op_id(),
                    source: src.to_string(),
                    reference: reference.to_string(),
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(m) = s.message().await.map_err(status)? {
                out.push_str(&m.log);
            }
        }
        ["ctr-img", "tag", src, dst] => {
            c.tag(v1::TagRequest {
                image: src.to_string(),
                tag: dst.to_string(),
            })
            .await
            .map_err(status)?;
            out.push_str(&format!("Tag {dst} to image {src} succeed\n"));
        }
        ["ctr-img", "build", ..] => {
            let file = flag("-f").ok_or("no -f")?;
            let context = args.last().ok_or("no context")?.to_string();
            let build_id = op_id();
            let req = v1::BuildRequest {
                build_id: build_id.clone(),
                build_type: "ctr-img".into(),
                context_dir: context,
                file_content: std::fs::read_to_string(&file).map_err(|e| e.to_string())?,
                output: flag("-o").unwrap_or_default(),
                iidfile: flag("--iidfile").unwrap_or_default(),
                additional_tag: flag("--tag").unwrap_or_default(),
                entity_id: format!("{build_id}:0"),
                ..Default::default()
            };
            let mut status_client = c.clone();
            let printer = async move {
                let mut text = String::new();
                if let Ok(s) = status_client.status(v1::StatusRequest { build_id }).await {
                    let mut s = s.into_inner();
                    while let Ok(Some(m)) = s.message().await {
                        text.push_str(&m.content);
                    }
                }
                text
            };
            let (built, text) = tokio::join!(c.build(req), printer);
            out.push_str(&text);
            built.map_err(status)?;
        }
        ["ctr-img", "images", name] => {
            let resp = c
                .list(v1::ListRequest {
                    image_name: name.to_string(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let rule = "---------- --- -------- ------- ----\n";
            out.push_str(rule);
            out.push_str("REPOSITORY TAG IMAGE ID CREATED SIZE\n");
            out.push_str(rule);
            for i in resp.images {
                let id = i.id.get(..12).unwrap_or(&i.id).to_string();
                out.push_str(&format!(
                    "{} {} {} {} {}\n",
                    i.repository, i.tag, id, i.created, i.size
                ));
            }
            out.push_str(rule);
        }
        ["ctr-img", "save", image, "-o", path] => {
            if Path::new(path).exists() {
                return Err(format!("output file already exist: {path:?}"));
            }
            let mut s = c
                .save(v1::SaveRequest {
                    save_id: op_id(),
                    images: vec![image.to_string()],
                    path: path.to_string(),
                    format: "docker".into(),
                    sep: None,
                    progress: false,
                    platform: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(m) = s.message().await.map_err(status)? {
                out.push_str(&m.log);
            }
            out.push_str(&format!("Save success with image: [{image}]\n"));
        }
        ["ctr-img", "rm", rest @ ..] => {
            let prune = rest.contains(&"-p");
            let names = rest.iter().filter(|a| !a.starts_with('-'));
            let mut s = c
                .remove(v1::RemoveRequest {
                    image_id: names.map(|n| n.to_string()).collect(),
                    all: false,
                    prune,
                })
                .await
                .map_err(status)?
                .into_inner();
            loop {
                match s.message().await {
                    Ok(Some(m)) => out.push_str(&format!("{}\n", m.layer_message)),
                    Ok(None) => break,
                    Err(e) => return Err(status(e)),
                }
            }
        }
        ["ctr-img", "load", "-i", path] => {
            if !Path::new(path).exists() {
                return Err(format!("check load options failed: stat {path}"));
            }
            let mut s = c
                .load(v1::LoadRequest {
                    path: path.to_string(),
                    load_id: op_id(),
                    sep: None,
                    progress: false,
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(m) = s.message().await.map_err(status)? {
                out.push_str(&m.log);
            }
        }
        ["ctr-img", "push", name] => {
            let mut s = c
                .push(v1::PushRequest {
                    push_id: op_id(),
                    image_name: name.to_string(),
                    format: String::new(),
                    progress: false,
                    // What an isula-build 0.9.6 client sends: no compression fields.
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(m) = s.message().await.map_err(status)? {
                out.push_str(&m.response);
            }
            out.push_str(&format!("Push success with image: {name}\n"));
        }
        ["ctr-img", "pull", name] => {
            let mut s = c
                .pull(v1::PullRequest {
                    pull_id: op_id(),
                    image_name: name.to_string(),
                    progress: false,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(m) = s
                .message()
                .await
                .map_err(|e| format!("pull {name}: {}", status(e)))?
            {
                out.push_str(&m.response);
            }
            out.push_str(&format!("Pull success with image: {name}\n"));
        }
        ["logout", rest @ ..] => {
            let all = rest.contains(&"-a");
            let server = rest.iter().find(|a| !a.starts_with('-'));
            let r = c
                .logout(v1::LogoutRequest {
                    server: if all {
                        String::new()
                    } else {
                        server.map(|s| s.to_string()).unwrap_or_default()
                    },
                    all,
                })
                .await;
            match r {
                Ok(r) => out.push_str(&format!("{}\n", r.into_inner().result)),
                Err(e) => {
                    out.push_str("\nLogout Failed\n\n");
                    return Err(format!(
                        "{}: {}",
                        server.map(|s| s.to_string()).unwrap_or_default(),
                        status(e)
                    ));
                }
            }
        }
        _ => return Err(format!("unknown command {:?} (frobnicate)", args)),
    }
    Ok(())
}
