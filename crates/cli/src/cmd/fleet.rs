//! Several builders (`--host` repeated, or `$ISULA_BUILD_HOST` with commas): where each
//! build goes. Builds are placed by rendezvous hashing of (context key, Dockerfile path,
//! target platforms) over the builders' addresses, so a project's rebuilds go where its
//! cache is, and adding or losing a builder moves only the projects it takes or held. A
//! builder that is down, refuses the connection or whose certificate this client does not
//! trust is skipped (with a warning) for the next in that order. A `--platform` build goes
//! to the first builder in that order that runs the platform natively (`info`), and a
//! build for several platforms is split across such builders, each pushing its platform's
//! image, one of them then assembling and pushing the list. Other commands use the first
//! builder that answers.

use super::{build, connect, Client, Target};
use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::path::Path;
use std::time::Duration;

/// The builders the flags and environment name, in the order given: every `--host` (each
/// may hold several, comma-separated), else `$ISULA_BUILD_HOST`, else `$ISULABUILD_HOST`,
/// else the default socket.
pub fn hosts(flags: &[String]) -> Vec<String> {
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect()
    };
    let from_flags: Vec<String> = flags.iter().flat_map(|h| split(h)).collect();
    if !from_flags.is_empty() {
        return from_flags;
    }
    for var in ["ISULA_BUILD_HOST", isula_api::HOST_ENV] {
        if let Ok(v) = std::env::var(var) {
            let hosts = split(&v);
            if !hosts.is_empty() {
                return hosts;
            }
        }
    }
    vec![format!(
        "unix://{}",
        crate::daemonless::default_socket().display()
    )]
}

/// A build's placement key: what names its project (hex SHA-256).
pub fn placement_key(context: &Path, dockerfile: &Path, platforms: &[String]) -> String {
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    hex::encode(sha2::Sha256::digest(
        format!(
            "{node}\0{}\0{}\0{}",
            context.display(),
            dockerfile.display(),
            platforms.join(",")
        )
        .as_bytes(),
    ))
}

/// The placement key of the build `args` describes (its context made absolute): the same
/// whether one builder or a fleet takes it, so a shared cache registry finds its tag.
pub fn key_for(args: &build::Args, context: &Path) -> Result<String> {
    let dockerfile = build::dockerfile_path(args, context)?;
    Ok(placement_key(context, &dockerfile, &platforms_of(args)))
}

/// `--platform`'s list, normalised.
fn platforms_of(args: &build::Args) -> Vec<String> {
    args.platform
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(normal)
        .collect()
}

/// The builders' indexes, best first: highest SHA-256(key, host) first (rendezvous hashing).
pub fn order(key: &str, hosts: &[String]) -> Vec<usize> {
    let mut scored: Vec<([u8; 32], usize)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            (
                sha2::Sha256::digest(format!("{key}\0{h}").as_bytes()).into(),
                i,
            )
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The first of `targets` (in `order`) that answers; each one skipped is warned about.
pub async fn connect_in_order<'a>(
    targets: &'a [Target],
    order: &[usize],
    timeout: Duration,
) -> Result<(Client, &'a Target)> {
    let mut last = None;
    for &i in order {
        let t = &targets[i];
        match connect(t, per_builder(timeout, targets.len())).await {
            Ok(c) => return Ok((c, t)),
            Err(e) if targets.len() > 1 => {
                warn_skipped(&t.host, &e);
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no builder to connect to")))
        .context("no builder of the fleet answered")
}

/// With several builders, one that does not answer must not hold the others up for the
/// whole timeout.
fn per_builder(timeout: Duration, builders: usize) -> Duration {
    if builders > 1 {
        timeout.min(Duration::from_secs(5))
    } else {
        timeout
    }
}

fn warn_skipped(host: &str, e: &anyhow::Error) {
    let why = format!("{e:#}");
    let why = why
        .lines()
        .nth(1)
        .unwrap_or(&why)
        .trim_start_matches("Error: ");
    let trust = if why.contains("certificate") || why.contains("UnknownIssuer") {
        " (its certificate is not trusted by this client's CA)"
    } else {
        ""
    };
    eprintln!("[Warning] skipping builder {host}{trust}: {why}");
}

/// A builder that answered, with the platforms it runs natively.
struct Reached {
    client: Client,
    host: String,
    native: Vec<String>,
}

/// Every builder that answers, in `order`, with its `info`.
async fn reach_all(targets: &[Target], order: &[usize], timeout: Duration) -> Vec<Reached> {
    let mut out = Vec::new();
    for &i in order {
        let t = &targets[i];
        let mut client = match connect(t, per_builder(timeout, targets.len())).await {
            Ok(c) => c,
            Err(e) => {
                warn_skipped(&t.host, &e);
                continue;
            }
        };
        match client.info(isula_api::v1::InfoRequest::default()).await {
            Ok(info) => out.push(Reached {
                client,
                host: t.host.clone(),
                native: info.into_inner().native_platforms,
            }),
            Err(e) => eprintln!(
                "[Warning] skipping builder {}: info failed: {}",
                t.host,
                e.message()
            ),
        }
    }
    out
}

/// A platform as builders write it (`linux/aarch64` is `linux/arm64`).
fn normal(platform: &str) -> String {
    isula_types::platform::BuildPlatform::parse(platform)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| platform.to_string())
}

/// Runs one build on the fleet `targets`.
pub async fn build(targets: &[Target], mut args: build::Args, timeout: Duration) -> Result<()> {
    let context = crate::absolute(&args.context)?;
    let platforms = platforms_of(&args);
    let key = key_for(&args, &context)?;
    args.fleet_key = Some(key.clone());
    let hosts: Vec<String> = targets.iter().map(|t| t.host.clone()).collect();
    let order = order(&key, &hosts);
    if platforms.is_empty() {
        let (mut client, target) = connect_in_order(targets, &order, timeout).await?;
        println!("Building on {}", target.host);
        return build::run(&mut client, args, target.host.starts_with("tcp://")).await;
    }
    let mut reached = reach_all(targets, &order, timeout).await;
    if reached.is_empty() {
        bail!("no builder of the fleet answered: {}", hosts.join(", "));
    }
    // Each platform to the first builder (in this build's order) that runs it natively,
    // else to the first builder (under emulation).
    let mut assigned: Vec<(usize, Vec<String>)> = Vec::new();
    for p in &platforms {
        let at = reached
            .iter()
            .position(|r| r.native.iter().any(|n| normal(n) == *p))
            .unwrap_or(0);
        match assigned.iter_mut().find(|(i, _)| *i == at) {
            Some((_, ps)) => ps.push(p.clone()),
            None => assigned.push((at, vec![p.clone()])),
        }
    }
    let list_ref = args
        .output
        .as_deref()
        .and_then(|o| o.strip_prefix("docker://"))
        .map(str::to_string);
    let Some(list_ref) = list_ref.filter(|_| assigned.len() > 1) else {
        let at = assigned[0].0;
        if assigned.len() > 1 {
            eprintln!(
                "[Warning] the platforms {} have native builders apart, but a split build needs -o docker://NAME (its list is assembled in the registry): building them all on {}",
                platforms.join(","),
                reached[at].host
            );
        }
        let r = &mut reached[at];
        println!("Building on {}", r.host);
        return build::run(&mut r.client, args, r.host.starts_with("tcp://")).await;
    };
    split_build(&mut reached, &assigned, args, &list_ref).await
}

/// The per-platform tag a split build pushes before the list is assembled.
fn part_ref(list_ref: &str, platform: &str) -> String {
    let slug = platform.replace('/', "-");
    match list_ref.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
        Some((repo, tag)) => format!("{repo}:{tag}-{slug}"),
        None => format!("{list_ref}:latest-{slug}"),
    }
}

/// Builds each platform on its builder (builders in parallel), each pushing its image
/// under a per-platform tag; then the first builder makes the build for every platform,
/// taking each from its tag (pulled, unless it made it), and makes and pushes the list as
/// for any build for several platforms.
async fn split_build(
    reached: &mut [Reached],
    assigned: &[(usize, Vec<String>)],
    args: build::Args,
    list_ref: &str,
) -> Result<()> {
    let mut jobs = Vec::new();
    for (at, platforms) in assigned {
        let r = &reached[*at];
        println!("Building {} on {}", platforms.join(","), r.host);
        let mut client = r.client.clone();
        let host = r.host.clone();
        let platforms = platforms.clone();
        let args = args.clone();
        let list_ref = list_ref.to_string();
        jobs.push(tokio::spawn(async move {
            for p in &platforms {
                let mut a = args.clone();
                a.platform = Some(p.clone());
                a.tag = None;
                a.iidfile = None;
                a.output = Some(format!("docker://{}", part_ref(&list_ref, p)));
                build::run(&mut client, a, host.starts_with("tcp://"))
                    .await
                    .with_context(|| format!("building {p} on {host}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for job in jobs {
        job.await.context("a platform's build task")??;
    }
    let assembler = &mut reached[assigned[0].0];
    println!("Assembling the list {list_ref} on {}", assembler.host);
    let mut args = args;
    args.fleet_parts = assigned
        .iter()
        .flat_map(|(_, ps)| ps.iter())
        .map(|p| format!("{p}={}", part_ref(list_ref, p)))
        .collect();
    let remote = assembler.host.starts_with("tcp://");
    build::run(&mut assembler.client, args, remote).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_flags_split_on_commas() {
        assert_eq!(
            hosts(&["tcp://a:1,tcp://b:2".into(), " tcp://c:3 ".into()]),
            ["tcp://a:1", "tcp://b:2", "tcp://c:3"]
        );
    }

    #[test]
    fn rendezvous_keeps_a_key_on_its_builder_when_another_goes() {
        let hosts: Vec<String> = (0..5).map(|i| format!("tcp://10.0.0.{i}:2376")).collect();
        let mut moved = 0;
        for k in 0..200 {
            let key = format!("project-{k}");
            let all = order(&key, &hosts);
            assert_eq!(order(&key, &hosts), all, "stable");
            // Without the second builder: every key keeps its first choice unless that was it.
            let fewer: Vec<String> = hosts.iter().filter(|h| **h != hosts[1]).cloned().collect();
            let first = &hosts[all[0]];
            let now = &fewer[order(&key, &fewer)[0]];
            if first == &hosts[1] {
                moved += 1;
                assert_eq!(now, &hosts[all[1]], "to the next in its order");
            } else {
                assert_eq!(now, first);
            }
        }
        // About a fifth of the projects were on the builder that went.
        assert!((20..=70).contains(&moved), "{moved}");
    }

    #[test]
    fn part_tags_name_the_platform() {
        assert_eq!(
            part_ref("r:5000/app:1", "linux/arm64"),
            "r:5000/app:1-linux-arm64"
        );
        assert_eq!(
            part_ref("r:5000/app", "linux/arm/v7"),
            "r:5000/app:latest-linux-arm-v7"
        );
    }
}
