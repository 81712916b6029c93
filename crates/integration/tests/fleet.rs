//! Build fleets: several daemons on 127.0.0.1 with certificates from a test CA, one client
//! naming them all. A project's rebuild lands on the same builder and hits its cache; a
//! killed builder sends the next build to the next builder in the project's order (and a
//! builder left running keeps its project); a two-platform build is split across two
//! builders that each declare one platform native, and the list in the registry holds
//! both; two builders sharing a cache registry (the second builds from the first's cache,
//! a third without it does not); a builder whose certificate the client does not trust, or
//! that refuses the client's certificate, is skipped with a warning, never used; `info`
//! reports native and emulated platforms; `$ISULA_BUILD_HOST` takes the hosts with commas.

use isula_integration::pki::{Pki, CLIENT_EXT};
use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use sha2::Digest;
use std::path::Path;
use std::process::Output;

const ROLES: &str = "[roles]\nadmin = [\"ci\"]\n";

fn pki() -> Pki {
    let p = Pki::new();
    p.sign("ca", "ci", "ci", CLIENT_EXT);
    p
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `isula-build` with every host in `hosts` and the `ci` certificate.
fn fleet(any: &Daemon, pki: &Pki, hosts: &[&str], args: &[&str]) -> Output {
    let mut c = any.cli_command(&[]);
    for h in hosts {
        c.arg("--host").arg(h);
    }
    c.args(pki.client("ci")).args(args);
    c.env_remove("ISULA_BUILD_CERT_PATH")
        .env_remove("ISULA_BUILD_HOST");
    c.output().expect("isula-build")
}

/// The builder a build says it ran on.
fn ran_on(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Building on "))
        .unwrap_or_else(|| panic!("no builder named in {out}"))
        .to_string()
}

/// The client's order of `hosts` for a build of `ctx` (its Dockerfile, no platform):
/// the same rendezvous hashing, so the test knows which builder comes next.
fn order(ctx: &Path, hosts: &[&str]) -> Vec<String> {
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let key = hex::encode(sha2::Sha256::digest(
        format!(
            "{node}\0{}\0{}\0",
            ctx.display(),
            ctx.join("Dockerfile").display()
        )
        .as_bytes(),
    ));
    let mut scored: Vec<([u8; 32], &str)> = hosts
        .iter()
        .map(|h| {
            (
                sha2::Sha256::digest(format!("{key}\0{h}").as_bytes()).into(),
                *h,
            )
        })
        .collect();
    scored.sort_by_key(|s| std::cmp::Reverse(s.0));
    scored.into_iter().map(|(_, h)| h.to_string()).collect()
}

fn project(dir: &Path, name: &str) -> std::path::PathBuf {
    project_on(dir, name, "busybox")
}

fn project_on(dir: &Path, name: &str, base: &str) -> std::path::PathBuf {
    let ctx = dir.join(name);
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("file"), format!("{name}\n")).expect("file");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nCOPY file /file\nRUN cat /file > /copied\n"),
    )
    .expect("Dockerfile");
    ctx
}

#[test]
fn a_project_rebuilds_on_its_builder_and_a_killed_builder_sends_it_to_the_next() {
    if !require_root() || !require_tool("openssl") || !require_tool("runc") {
        return;
    }
    let pki = pki();
    let mut daemons = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..3 {
        let (d, h) = pki.daemon("server", &[("configuration.toml", ROLES)], &[]);
        d.import_busybox("busybox:latest", &[]);
        daemons.push(d);
        hosts.push(h);
    }
    let hosts_ref: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let work = tempfile::tempdir().expect("work");
    let ctx = project(work.path(), "app");
    let want = order(&ctx, &hosts_ref);
    let c = ctx.to_str().expect("utf8");

    let o = fleet(&daemons[0], &pki, &hosts_ref, &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[0], "{}", text(&o));
    assert!(cached_steps(&text(&o)).is_empty(), "{}", text(&o));
    // The rebuild: the same builder, its steps from that builder's cache.
    let o = fleet(&daemons[0], &pki, &hosts_ref, &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[0]);
    assert_eq!(cached_steps(&text(&o)).len(), 2, "{}", text(&o));
    // The hosts given in another order, through $ISULA_BUILD_HOST with commas, place it
    // the same.
    let reversed: Vec<&str> = hosts_ref.iter().rev().copied().collect();
    let o = daemons[0]
        .cli_command(&[])
        .args(pki.client("ci"))
        .args(["ctr-img", "build", c])
        .env("ISULA_BUILD_HOST", reversed.join(","))
        .env_remove("ISULA_BUILD_CERT_PATH")
        .output()
        .expect("isula-build");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[0]);

    // Its builder killed in the middle of a build (a RUN that sleeps): that build fails;
    // the next goes to the next builder in its order, with a warning.
    let first = hosts.iter().position(|h| *h == want[0]).expect("a host");
    let dockerfile = std::fs::read_to_string(ctx.join("Dockerfile")).expect("Dockerfile");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("{dockerfile}RUN sleep 120\n"),
    )
    .expect("slow Dockerfile");
    let mut slow = daemons[0].cli_command(&[]);
    for h in &hosts_ref {
        slow.arg("--host").arg(h);
    }
    let slow = slow
        .args(pki.client("ci"))
        .args(["ctr-img", "build", c])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slow build");
    let runc_root = daemons[first].run_root().join("runc");
    wait_until(
        "the slow build's RUN on its builder",
        std::time::Duration::from_secs(60),
        || !runc_containers(&runc_root).is_empty(),
    );
    daemons[first].kill();
    let o = slow.wait_with_output().expect("slow build");
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[0]);
    std::fs::write(ctx.join("Dockerfile"), &dockerfile).expect("Dockerfile");
    let any = hosts.iter().position(|h| *h != want[0]).expect("another");
    let o = fleet(&daemons[any], &pki, &hosts_ref, &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[1], "{}", text(&o));
    assert!(
        text(&o).contains(&format!("[Warning] skipping builder {}", want[0])),
        "{}",
        text(&o)
    );
    // Only that builder's projects move: one whose first choice is alive stays there.
    let other = (0..40)
        .map(|i| project(work.path(), &format!("other-{i}")))
        .find(|p| order(p, &hosts_ref)[0] != want[0])
        .expect("a project placed elsewhere");
    let o = fleet(
        &daemons[any],
        &pki,
        &hosts_ref,
        &["ctr-img", "build", other.to_str().expect("utf8")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), order(&other, &hosts_ref)[0]);
    assert!(!text(&o).contains("[Warning]"), "{}", text(&o));
    // Back up (its start removes the killed build's container): the project comes back.
    daemons[first].restart();
    assert!(runc_containers(&runc_root).is_empty());
    let o = fleet(&daemons[0], &pki, &hosts_ref, &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), want[0]);
}

#[test]
fn an_untrusted_builder_is_skipped_with_a_warning() {
    if !require_root() || !require_tool("openssl") || !require_tool("runc") {
        return;
    }
    let pki = pki();
    let (good, good_host) = pki.daemon("server", &[("configuration.toml", ROLES)], &[]);
    good.import_busybox("busybox:latest", &[]);
    // Its certificate comes from a CA the client does not trust.
    let (rogue, rogue_host) = pki.daemon("rogue-server", &[("configuration.toml", ROLES)], &[]);
    rogue.import_busybox("busybox:latest", &[]);
    // And one that refuses this client: its certificate has no role there.
    let (norole, norole_host) = pki.daemon(
        "server",
        &[(
            "configuration.toml",
            "[roles]\nadmin = [\"someone-else\"]\n",
        )],
        &[],
    );
    let hosts = [rogue_host.as_str(), good_host.as_str()];
    // Alone, each is refused (the refusals the fleet turns into skips).
    let o = fleet(&good, &pki, &[&rogue_host], &["ctr-img", "images"]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = fleet(&good, &pki, &[&norole_host], &["ctr-img", "images"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("has no role"), "{}", text(&o));
    let o = fleet(
        &good,
        &pki,
        &[&norole_host, &good_host],
        &["ctr-img", "images"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("[Warning] skipping builder {norole_host}"))
            && text(&o).contains("has no role"),
        "{}",
        text(&o)
    );
    drop(norole);
    // Other commands take the first builder that answers: the rogue one is skipped.
    let o = fleet(&good, &pki, &hosts, &["ctr-img", "images"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("[Warning] skipping builder {rogue_host}"))
            && t.contains("certificate"),
        "{t}"
    );
    // A project whose first choice is the rogue builder is built on the trusted one.
    let work = tempfile::tempdir().expect("work");
    let ctx = (0..40)
        .map(|i| project(work.path(), &format!("p-{i}")))
        .find(|p| order(p, &hosts)[0] == rogue_host)
        .expect("a project placed on the rogue builder first");
    let o = fleet(
        &good,
        &pki,
        &hosts,
        &[
            "ctr-img",
            "build",
            "-t",
            "placed:1",
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), good_host);
    assert!(
        text(&o).contains(&format!("[Warning] skipping builder {rogue_host}")),
        "{}",
        text(&o)
    );
    assert!(good.images().iter().any(|(r, _, _)| r == "placed"));
    assert!(!rogue.images().iter().any(|(r, _, _)| r == "placed"));
    assert!(!rogue.log().contains("build succeeded"), "{}", rogue.log());
}

#[test]
fn two_builders_share_a_cache_registry() {
    if !require_root()
        || !require_tool("openssl")
        || !require_tool("runc")
        || !require_tool("docker-registry")
    {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let pki = pki();
    // configuration.toml's [roles] table comes last: the key goes before it.
    let shared = format!("cache_registry = \"{}/fleet/cache\"\n{ROLES}", reg.host());
    let registries = insecure_registries(&[&reg.host()]);
    let files = [
        ("configuration.toml", shared.as_str()),
        ("registries.toml", registries.as_str()),
    ];
    let mut builders = Vec::new();
    for _ in 0..2 {
        let (d, h) = pki.daemon("server", &files, &[]);
        d.import_busybox("busybox:latest", &[]);
        builders.push((d, h));
    }
    let (alone, alone_host) = pki.daemon(
        "server",
        &[
            ("configuration.toml", ROLES),
            ("registries.toml", &registries),
        ],
        &[],
    );
    alone.import_busybox("busybox:latest", &[]);
    // One base for all, from the registry (a cache key starts from the base's ID).
    let base = format!("{}/fleet/base:1", reg.host());
    let (a, a_host) = &builders[0];
    a.ok(&["ctr-img", "tag", "busybox:latest", &base]);
    a.ok(&["ctr-img", "push", &base]);
    let work = tempfile::tempdir().expect("work");
    let ctx = project_on(work.path(), "shared", &base);
    let c = ctx.to_str().expect("utf8");
    let (_, b_host) = &builders[1];
    let o = fleet(a, &pki, &[a_host], &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(cached_steps(&text(&o)).is_empty(), "{}", text(&o));
    assert!(text(&o).contains("Build cache exported to"), "{}", text(&o));
    // The second builder has never built it: its steps come from the registry.
    let o = fleet(a, &pki, &[b_host], &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cached_steps(&text(&o)).len(), 2, "{}", text(&o));
    // A builder without the cache registry runs them.
    let o = fleet(a, &pki, &[&alone_host], &["ctr-img", "build", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(cached_steps(&text(&o)).is_empty(), "{}", text(&o));
    // A cache_registry with a tag is refused at start.
    let etc = tempfile::tempdir().expect("etc");
    std::fs::write(
        etc.path().join("configuration.toml"),
        "cache_registry = \"127.0.0.1:5000/cache:1\"\n",
    )
    .expect("config");
    let o = std::process::Command::new(bin("isula-builder"))
        .arg("--config-dir")
        .arg(etc.path())
        .arg("--dataroot")
        .arg(etc.path().join("data"))
        .arg("--runroot")
        .arg(etc.path().join("run"))
        .arg("--host")
        .arg(format!("unix://{}", etc.path().join("s.sock").display()))
        .env_remove("ISULABUILD_HOST")
        .output()
        .expect("isula-builder");
    assert!(!o.status.success());
    assert!(text(&o).contains("without a tag or digest"), "{}", text(&o));
}

#[test]
fn a_two_platform_build_is_split_across_native_builders() {
    if !require_root()
        || !require_tool("openssl")
        || !require_tool("runc")
        || !require_tool("docker-registry")
        || !require_tool("skopeo")
    {
        return;
    }
    let Some(arm64) = arm64_busybox() else {
        return;
    };
    let reg = Registry::start(RegistryOptions::default());
    let pki = pki();
    let registries = insecure_registries(&[&reg.host()]);
    let host_platform = format!("linux/{}", host_arch());
    let mut builders = Vec::new();
    for native in [host_platform.as_str(), "linux/arm64"] {
        let config = format!("native_platforms = [\"{native}\"]\n{ROLES}");
        let (d, h) = pki.daemon(
            "server",
            &[
                ("configuration.toml", config.as_str()),
                ("registries.toml", registries.as_str()),
            ],
            &[],
        );
        // Both bases on both builders: only the placement decides who builds what.
        let dir = tempfile::tempdir().expect("tmp");
        for (arch, binary) in [(host_arch(), None), ("arm64", Some(&arm64))] {
            let rootfs = match binary {
                Some(b) => busybox_rootfs_with(b, &[]),
                None => busybox_rootfs(&[]),
            };
            let a = dir.path().join(format!("{arch}.tar"));
            std::fs::write(
                &a,
                docker_archive_for(&[rootfs], &format!("busybox-{arch}:1"), arch),
            )
            .expect("archive");
            d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
        }
        builders.push((d, h, native.to_string()));
    }
    // info tells each builder's native platform, and the emulated ones besides.
    for (d, h, native) in &builders {
        let o = fleet(d, &pki, &[h], &["info"]);
        assert!(o.status.success(), "{}", text(&o));
        let t = text(&o);
        let line = |name: &str| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {t}"))
        };
        assert_eq!(line("Native Platforms:"), *native);
        assert!(
            !line("Emulated Platforms:").contains(native.as_str()),
            "{t}"
        );
    }
    let work = tempfile::tempdir().expect("work");
    let ctx = work.path().join("multi");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("f"), "x\n").expect("f");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox-$TARGETARCH:1\nCOPY f /f\n",
    )
    .expect("Dockerfile");
    let list = format!("{}/fleet/multi:1", reg.host());
    let hosts: Vec<&str> = builders.iter().map(|(_, h, _)| h.as_str()).collect();
    let platforms = format!("{host_platform},linux/arm64");
    let o = fleet(
        &builders[0].0,
        &pki,
        &hosts,
        &[
            "ctr-img",
            "build",
            "--platform",
            &platforms,
            "-o",
            &format!("docker://{list}"),
            ctx.to_str().expect("utf8"),
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // Each platform on the builder that declares it native.
    for (_, h, native) in &builders {
        assert!(t.contains(&format!("Building {native} on {h}")), "{t}");
    }
    for (d, _, native) in &builders {
        let log = d.log();
        assert!(log.contains("build succeeded"), "{native}: {log}");
    }
    // The first builder makes the list, taking each platform from its part's tag.
    assert!(
        t.contains(&format!("Assembling the list {list} on {}", builders[0].1)),
        "{t}"
    );
    assert!(
        t.contains(&format!("Taking linux/arm64 from {list}-linux-arm64")),
        "{t}"
    );
    // The list in the registry holds both platforms.
    let raw = run_ok(
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{list}")),
    );
    let index: serde_json::Value = serde_json::from_str(&raw).expect("index");
    let mut archs: Vec<String> = index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {raw}"))
        .iter()
        .map(|m| {
            m["platform"]["architecture"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    archs.sort();
    let mut want = vec![host_arch().to_string(), "arm64".to_string()];
    want.sort();
    assert_eq!(archs, want, "{raw}");
    // Without -o docker:// the parts would have nowhere to meet: one builder makes both,
    // saying so.
    let o = fleet(
        &builders[0].0,
        &pki,
        &hosts,
        &[
            "ctr-img",
            "build",
            "--platform",
            &platforms,
            "-t",
            "both-here:1",
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("a split build needs -o docker://NAME"),
        "{}",
        text(&o)
    );
    assert_eq!(ran_on(&text(&o)), builders[0].1);
    // A single --platform build goes to its native builder, whatever the order says.
    let o = fleet(
        &builders[0].0,
        &pki,
        &hosts,
        &[
            "ctr-img",
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            "one-arm:1",
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), builders[1].1);
    let o = fleet(
        &builders[0].0,
        &pki,
        &hosts,
        &[
            "ctr-img",
            "build",
            "--platform",
            &host_platform,
            "-t",
            "one-host:1",
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ran_on(&text(&o)), builders[0].1);
}
