//! One file per command. Each builds its request, calls the daemon, and prints.

pub mod build;
pub mod build_session;
pub mod builder;
pub mod context_reach;
pub mod context_upload;
pub mod fleet;
pub mod images;
pub mod import;
pub mod info;
pub mod inspect;
pub mod load;
pub mod login;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod remote_files;
pub mod rm;
pub mod save;
pub mod sign;
pub mod tag;
pub mod version;

use crate::{Cli, Command, CtrImg};
use anyhow::{Context as _, Result};
use isula_api::v1::control_client::ControlClient;
use std::time::Duration;
use tonic::transport::Channel;

pub type Client = ControlClient<Channel>;

/// How long to wait for the daemon to answer its health check (isula-build's
/// `--timeout`: a Go duration from 100ms to 120s; 20s when not given).
pub fn start_timeout(given: Option<&str>) -> Result<Duration> {
    let Some(text) = given.filter(|t| !t.is_empty()) else {
        return Ok(Duration::from_secs(20));
    };
    let d = isula_types::parse_go_duration(text).map_err(anyhow::Error::msg)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(120) {
        anyhow::bail!("invalid timeout value: {text}, supported range [100ms, 2m0s]");
    }
    Ok(d)
}

/// logrus's level names, as isula-build's `--log-level` accepts them.
fn check_log_level(level: &str) -> Result<()> {
    match level.to_ascii_lowercase().as_str() {
        "panic" | "fatal" | "error" | "warn" | "warning" | "info" | "debug" | "trace" => Ok(()),
        _ => anyhow::bail!("unable to parse log level: not a valid logrus Level: {level:?}"),
    }
}

/// Where the daemon is and how to reach it.
pub struct Target {
    pub host: String,
    /// Mutual TLS, for a tcp:// host.
    pub tls: Option<isula_api::ClientTls>,
}

/// The daemon at `host`, for a tcp:// host with mutual TLS when `--tlsverify`, a `--tls*`
/// file or `$ISULA_BUILD_CERT_PATH` (Docker's layout: ca.pem, cert.pem, key.pem) says so.
/// The hosts themselves come from `fleet::hosts` (one, or a fleet).
pub fn target(cli: &Cli, host: String) -> Result<Target> {
    let cert_path = std::env::var_os("ISULA_BUILD_CERT_PATH").map(std::path::PathBuf::from);
    let wants_tls = cli.tlsverify
        || cli.tlscacert.is_some()
        || cli.tlscert.is_some()
        || cli.tlskey.is_some()
        || cert_path.is_some();
    if !host.starts_with("tcp://") {
        if wants_tls {
            anyhow::bail!("--tlsverify and the --tls* files are for a tcp:// host, not {host}");
        }
        return Ok(Target { host, tls: None });
    }
    if !wants_tls {
        return Ok(Target { host, tls: None });
    }
    let file = |flag: &Option<std::path::PathBuf>, name: &str, what: &str| -> Result<Vec<u8>> {
        let path = flag
            .clone()
            .or_else(|| cert_path.as_ref().map(|d| d.join(name)))
            .ok_or_else(|| {
                anyhow::anyhow!("--tlsverify needs --{what} (or $ISULA_BUILD_CERT_PATH/{name})")
            })?;
        std::fs::read(&path).with_context(|| format!("reading --{what} {}", path.display()))
    };
    Ok(Target {
        tls: Some(isula_api::ClientTls {
            ca: file(&cli.tlscacert, "ca.pem", "tlscacert")?,
            cert: file(&cli.tlscert, "cert.pem", "tlscert")?,
            key: file(&cli.tlskey, "key.pem", "tlskey")?,
        }),
        host,
    })
}

/// Connects and waits (at most `timeout`) for the daemon's health check to say it serves.
pub async fn connect(target: &Target, timeout: Duration) -> Result<Client> {
    let host = &target.host;
    // Over mutual TLS a refused certificate shows only as a broken connection.
    let hint = if target.tls.is_some() {
        "\n(over mutual TLS the daemon refuses a certificate its CA did not sign, an expired one, or none: its log says which)"
    } else {
        ""
    };
    let cannot = |e: String| {
        anyhow::anyhow!(
            "Cannot connect to the isula-builder at {host}. Is the isula-builder running?\nError: {e}{hint}"
        )
    };
    let attempt = async {
        let mut client = match host.strip_prefix("tcp://") {
            Some(addr) => isula_api::connect_tcp(addr, target.tls.as_ref())
                .await
                .map_err(|e| cannot(error_chain(&e)))?,
            None => {
                let socket = isula_api::socket_path_from_host(host).map_err(anyhow::Error::msg)?;
                isula_api::connect(&socket)
                    .await
                    .map_err(|e| cannot(format!("{e}: {}", socket.display())))?
            }
        };
        let status = client
            .health_check(())
            .await
            .map_err(|e| cannot(e.message().to_string()))?
            .into_inner()
            .status;
        if status != isula_api::v1::health_check_response::ServingStatus::Serving as i32 {
            return Err(cannot("the isula-builder is not serving".into()));
        }
        Ok(client)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| cannot(format!("no answer within {timeout:?}")))?
}

/// An error and its causes, one line (a TLS refusal is in the causes).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A random operation ID, as the API's *ID fields expect.
pub fn op_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub async fn run(cli: Cli) -> Result<()> {
    check_log_level(&cli.log_level)?;
    let timeout = start_timeout(cli.timeout.as_deref())?;
    if !cli.daemonless {
        let targets = fleet::hosts(&cli.host)
            .into_iter()
            .map(|h| target(&cli, h))
            .collect::<Result<Vec<_>>>()?;
        return run_on(cli, targets, timeout).await;
    }
    // Daemonless: a builder of this command's own, stopped when the command is done.
    let builder = crate::daemonless::start_for(&cli, timeout).await?;
    let targets = vec![Target {
        host: builder.host(),
        tls: None,
    }];
    let result = run_on(cli, targets, timeout).await;
    // Stopped off this thread, so the runtime can close the connection the builder's
    // shutdown waits for.
    let stopped = tokio::task::spawn_blocking(move || builder.stop())
        .await
        .map_err(|e| anyhow::anyhow!("daemonless: stopping the builder: {e}"))
        .and_then(|r| r);
    match (result, stopped) {
        (Ok(()), stopped) => stopped,
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(s)) => Err(e.context(format!("and then {s:#}"))),
    }
}

async fn run_on(cli: Cli, targets: Vec<Target>, timeout: Duration) -> Result<()> {
    let in_order: Vec<usize> = (0..targets.len()).collect();
    let connect = || async {
        fleet::connect_in_order(&targets, &in_order, timeout)
            .await
            .map(|(c, t)| {
                remote_files::set_remote(t.host.starts_with("tcp://"));
                c
            })
    };
    match cli.command {
        Command::CtrImg(CtrImg::Build(a)) if targets.len() > 1 => {
            fleet::build(&targets, *a, timeout).await
        }
        Command::CtrImg(c) => {
            let (mut client, target) =
                fleet::connect_in_order(&targets, &in_order, timeout).await?;
            remote_files::set_remote(target.host.starts_with("tcp://"));
            match c {
                CtrImg::Build(a) => {
                    build::run(&mut client, *a, target.host.starts_with("tcp://")).await
                }
                CtrImg::Images(a) => images::run(&mut client, a).await,
                CtrImg::Inspect(a) => inspect::inspect(&mut client, a).await,
                CtrImg::History(a) => inspect::history(&mut client, a).await,
                CtrImg::Import(a) => import::run(&mut client, a).await,
                CtrImg::Load(a) => load::run(&mut client, a).await,
                CtrImg::Pull(a) => pull::run(&mut client, a).await,
                CtrImg::Push(a) => push::run(&mut client, a).await,
                CtrImg::Rm(a) => rm::run(&mut client, a).await,
                CtrImg::Save(a) => save::run(&mut client, a).await,
                CtrImg::Tag(a) => tag::run(&mut client, a).await,
            }
        }
        Command::Builder(b) => builder::run(&mut connect().await?, b).await,
        Command::Info(a) => info::run(&mut connect().await?, a).await,
        Command::Login(a) => login::login(&mut connect().await?, a).await,
        Command::Logout(a) => login::logout(&mut connect().await?, a).await,
        Command::Manifest(m) => manifest::run(&mut connect().await?, m).await,
        Command::Version => version::run(connect()).await,
        Command::Completion { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_as_isula_build_reads_them() {
        assert_eq!(
            start_timeout(None).expect("default"),
            Duration::from_secs(20)
        );
        assert_eq!(
            start_timeout(Some("500ms")).expect("ms"),
            Duration::from_millis(500)
        );
        assert_eq!(
            start_timeout(Some("1m30s")).expect("m s"),
            Duration::from_secs(90)
        );
        assert_eq!(
            start_timeout(Some("1.5s")).expect("frac"),
            Duration::from_millis(1500)
        );
        assert!(start_timeout(Some("50ms")).is_err());
        assert!(start_timeout(Some("3m")).is_err());
        assert!(start_timeout(Some("10")).is_err());
        assert!(start_timeout(Some("x")).is_err());
        assert!(check_log_level("debug").is_ok() && check_log_level("loud").is_err());
    }
}
