//! Daemon settings: the files in the config directory (configuration.toml, storage.toml,
//! registries.toml, policy.json), then the command-line flags over them. Every file is
//! checked before use: at most 1 MiB, a regular file owned by root (or us), not writable
//! by group or others, and well-formed; a bad file stops the start with a message naming it.

use anyhow::{bail, Context, Result};
use clap::Parser;
use isula_registry::{Policy, Registries};
use isula_types::limits::CONFIG_FILE_MAX;
use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_DIR: &str = "/etc/isula-build";
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/isula-build";
pub const DEFAULT_RUN_ROOT: &str = "/var/run/isula-build";
const LOG_LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

#[derive(Debug, Parser)]
#[command(
    name = "isula-builder",
    version,
    about = "isula-builder is the daemon of isula-build, the container image builder"
)]
pub struct Flags {
    /// Open debug mode
    #[arg(short = 'D', long, num_args = 0..=1, default_missing_value = "true")]
    pub debug: Option<bool>,
    /// Log level: "debug", "info", "warn" or "error"
    #[arg(long = "log-level")]
    pub log_level: Option<String>,
    /// Persistent dir [default: /var/lib/isula-build]
    #[arg(long)]
    pub dataroot: Option<PathBuf>,
    /// Runtime dir [default: /var/run/isula-build]
    #[arg(long)]
    pub runroot: Option<PathBuf>,
    /// Storage driver
    #[arg(long = "storage-driver")]
    pub storage_driver: Option<String>,
    /// Storage driver option (repeatable), e.g. overlay.mountopt=nodev
    #[arg(long = "storage-opt")]
    pub storage_opt: Vec<String>,
    /// Group of the control socket [default: isula]
    #[arg(long)]
    pub group: Option<String>,
    /// Enable experimental features
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub experimental: Option<bool>,
    /// Allow `RUN --security=insecure` (every capability, no seccomp filter, writable /sys)
    #[arg(long = "allow-insecure", num_args = 0..=1, default_missing_value = "true")]
    pub allow_insecure: Option<bool>,
    /// Directory of the configuration files
    #[arg(long = "config-dir", default_value = DEFAULT_CONFIG_DIR)]
    pub config_dir: PathBuf,
    /// Where to listen (repeatable): unix:///path, or tcp://ADDR:PORT with mutual TLS
    /// [default: unix:///var/run/isula_build.sock]
    #[arg(long, env = isula_api::HOST_ENV)]
    pub host: Vec<String>,
    /// Require mutual TLS on TCP listeners: clients need a certificate the CA signed
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub tlsverify: Option<bool>,
    /// The CA that signs client certificates (PEM)
    #[arg(long)]
    pub tlscacert: Option<PathBuf>,
    /// The daemon's certificate (PEM)
    #[arg(long)]
    pub tlscert: Option<PathBuf>,
    /// The daemon's private key (PEM)
    #[arg(long)]
    pub tlskey: Option<PathBuf>,
    /// Allow a TCP listener without TLS, on a loopback address only (for tests)
    #[arg(long = "insecure-tcp", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_tcp: Option<bool>,
    /// Serve one daemonless client command (started by `isula-build --daemonless`)
    #[arg(long, hide = true)]
    pub daemonless: bool,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (fleet)
    #[arg(long = "metrics-addr")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve only the grpc.health.v1 service, plain TCP, on ADDR:PORT (Kubernetes probes)
    #[arg(long = "health-addr")]
    pub health_addr: Option<std::net::SocketAddr>,
    /// Re-hash every blob and every layer directory, make a damaged directory again from
    /// its blob, check every image record; print what was repaired or is wrong and exit
    #[arg(long = "check-store")]
    pub check_store: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Generate a shell completion script
    #[command(hide = true)]
    Completion {
        /// bash (the default), zsh, fish, elvish or powershell
        shell: Option<clap_complete::Shell>,
    },
}

/// The keys `configuration.toml` knows (others are reported and ignored: a newer
/// isula-build's key must not stop this daemon).
const CONFIGURATION_KEYS: [&str; 28] = [
    "debug",
    "loglevel",
    "group",
    "run_root",
    "data_root",
    "runtime",
    "experimental",
    "build_cache",
    "build_cache_max_size",
    "build_cache_keep_free",
    "max_layer_size",
    "max_layer_entries",
    "min_free_space",
    "registry_stall_timeout",
    "allow_insecure",
    "hosts",
    "tlsverify",
    "tlscacert",
    "tlscert",
    "tlskey",
    "insecure_tcp",
    "roles",
    "compression",
    "compression_level",
    // fleet
    "metrics_addr",
    "native_platforms",
    "cache_registry",
    "health_addr",
];

#[derive(Debug, Default, Deserialize)]
struct ConfigurationFile {
    debug: Option<bool>,
    loglevel: Option<String>,
    group: Option<String>,
    run_root: Option<PathBuf>,
    data_root: Option<PathBuf>,
    runtime: Option<String>,
    experimental: Option<bool>,
    /// Ours: allow `RUN --security=insecure` (default off).
    allow_insecure: Option<bool>,
    /// Ours: the build cache (default on).
    build_cache: Option<bool>,
    /// Ours: the build cache's size cap ("20GB"; default: a fifth of the data root's free
    /// space plus what the cache holds).
    build_cache_max_size: Option<String>,
    /// Ours: what the build cache leaves free on the data root's file system, as a share
    /// ("10%") or a size ("20GB"): checked after every build and when idle (default: none).
    build_cache_keep_free: Option<String>,
    /// Ours: the most file bytes one layer or archive may unpack to ("64GB").
    max_layer_size: Option<String>,
    /// Ours: the most entries one layer or archive may have.
    max_layer_entries: Option<u64>,
    /// Ours: what must stay free on the data root's file system ("256MB").
    min_free_space: Option<String>,
    /// Ours: how long a registry transfer may make no progress before it fails ("60s").
    registry_stall_timeout: Option<String>,
    /// Ours: the layer compression of pushes, `-o docker://` and `--cache-to` when the
    /// request names none ("gzip", the default, or "zstd").
    compression: Option<String>,
    /// Ours: its level (gzip 1-9, zstd 1-22; default: the codec's level for a push).
    compression_level: Option<i32>,
    /// Ours: where to listen, as `--host` (unix:///path, tcp://ADDR:PORT).
    hosts: Option<Vec<String>>,
    /// Ours: TCP listeners need mutual TLS with these files (as the flags).
    tlsverify: Option<bool>,
    tlscacert: Option<PathBuf>,
    tlscert: Option<PathBuf>,
    tlskey: Option<PathBuf>,
    /// Ours: a TCP listener without TLS on a loopback address.
    insecure_tcp: Option<bool>,
    /// Ours: certificate common names per role, for TCP clients.
    roles: Option<Roles>,
    /// Ours (fleet): where Prometheus metrics are served, as `--metrics-addr`.
    metrics_addr: Option<std::net::SocketAddr>,
    /// Ours (fleet): the platforms this daemon runs natively, as `info` tells clients
    /// (default: this machine's).
    native_platforms: Option<Vec<String>>,
    /// Ours (fleet): "REGISTRY/REPO" every build imports its cache from and exports to.
    cache_registry: Option<String>,
    /// Ours (fleet): plain TCP serving only grpc.health.v1, as `--health-addr`.
    health_addr: Option<std::net::SocketAddr>,
}

/// Who may do what over TCP: certificate common names per role. A name in no list is
/// refused; the unix socket is not concerned (its peers are checked as always).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Everything.
    #[serde(default)]
    pub admin: Vec<String>,
    /// Build, pull, push, save, list and inspect.
    #[serde(default)]
    pub builder: Vec<String>,
    /// List, inspect, info and version.
    #[serde(default)]
    pub reader: Vec<String>,
}

/// What a TCP client may do, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Builder,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Builder => "builder",
            Role::Admin => "admin",
        }
    }
}

impl Roles {
    /// The highest role `cn` is listed under.
    pub fn of(&self, cn: &str) -> Option<Role> {
        [
            (Role::Admin, &self.admin),
            (Role::Builder, &self.builder),
            (Role::Reader, &self.reader),
        ]
        .into_iter()
        .find(|(_, names)| names.iter().any(|n| n == cn))
        .map(|(r, _)| r)
    }
}

/// The files of mutual TLS (PEM).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TCP listener: its address and, unless it is an `--insecure-tcp` loopback one, TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpListen {
    pub addr: std::net::SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Default, Deserialize)]
struct StorageFile {
    #[serde(default)]
    storage: StorageTable,
}

#[derive(Debug, Default, Deserialize)]
struct StorageTable {
    driver: Option<String>,
    /// containers/storage's data root (configuration.toml's `data_root` wins over it).
    graphroot: Option<PathBuf>,
    /// containers/storage's run root (configuration.toml's `run_root` wins over it).
    runroot: Option<PathBuf>,
    #[serde(default)]
    options: StorageOptions,
}

#[derive(Debug, Default, Deserialize)]
struct StorageOptions {
    mountopt: Option<String>,
    #[serde(default)]
    overlay: OverlayOptions,
}

#[derive(Debug, Default, Deserialize)]
struct OverlayOptions {
    mountopt: Option<String>,
}

/// Everything the daemon runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub debug: bool,
    pub log_level: String,
    pub group: String,
    pub data_root: PathBuf,
    pub run_root: PathBuf,
    pub runtime: String,
    pub experimental: bool,
    /// `RUN --security=insecure` is allowed (`--allow-insecure`, `allow_insecure`).
    pub allow_insecure: bool,
    /// Reuse and record build steps (configuration.toml `build_cache`).
    pub build_cache: bool,
    /// The cap in bytes, when configured (`build_cache_max_size`).
    pub build_cache_max: Option<u64>,
    /// What the cache leaves free on the data root's file system (`build_cache_keep_free`).
    pub build_cache_keep_free: Option<KeepFree>,
    /// What one unpack may take (`max_layer_size`, `max_layer_entries`, `min_free_space`).
    pub unpack_limits: isula_store::apply::Limits,
    /// How long a registry transfer may stall (`registry_stall_timeout`).
    pub registry_stall_timeout: std::time::Duration,
    /// The layer compression of a push that names none (`compression`,
    /// `compression_level`).
    pub compression: isula_types::compression::LayerCompression,
    pub storage_driver: String,
    pub mount_options: Vec<String>,
    pub registries: Registries,
    pub policy: Option<Policy>,
    /// supply chain: `registries.d/*.yaml` beside policy.json.
    pub registries_d: isula_trust::RegistriesD,
    /// The unix socket (None: only TCP listeners were asked for).
    pub socket: Option<PathBuf>,
    /// TCP listeners.
    pub tcp: Vec<TcpListen>,
    /// Who may do what over TCP.
    pub roles: Roles,
    /// Where the config files, `auth.json`, `certs.d/` and the public key live.
    pub config_dir: PathBuf,
    /// What in the files was ignored (unknown keys), for the log once it is set up.
    pub warnings: Vec<String>,
    /// Where Prometheus metrics are served (fleet).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Native platforms and the shared cache registry (fleet).
    pub fleet: crate::fleet::FleetSettings,
    /// Where grpc.health.v1 alone is served, plain TCP (fleet).
    pub health_addr: Option<std::net::SocketAddr>,
}

/// The keys of `table` (at `prefix`) not in `known`, as dotted names.
fn unknown_keys(table: &toml::Table, prefix: &str, known: &[&str]) -> Vec<String> {
    table
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("{prefix}{k}"))
        .collect()
}

/// Unknown keys of a storage.toml (containers/storage has many that do not apply here).
fn unknown_storage_keys(table: &toml::Table) -> Vec<String> {
    let mut out = unknown_keys(table, "", &["storage"]);
    let sub = |t: &toml::Table, k: &str| t.get(k).and_then(|v| v.as_table()).cloned();
    if let Some(st) = sub(table, "storage") {
        out.extend(unknown_keys(
            &st,
            "storage.",
            &["driver", "graphroot", "runroot", "options"],
        ));
        if let Some(opts) = sub(&st, "options") {
            out.extend(unknown_keys(
                &opts,
                "storage.options.",
                &["mountopt", "overlay"],
            ));
            if let Some(ov) = sub(&opts, "overlay") {
                out.extend(unknown_keys(&ov, "storage.options.overlay.", &["mountopt"]));
            }
        }
    }
    out
}

/// A string setting where isula-build's files say "" for "the default".
fn set(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
}

fn set_path(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|v| !v.as_os_str().is_empty())
}

/// Reads a config file if it exists, refusing oversized, unsafe or unreadable ones.
pub fn read_config_file(path: &Path) -> Result<Option<String>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("config file {}", path.display())),
    };
    if !meta.is_file() {
        bail!("config file {}: not a regular file", path.display());
    }
    if meta.len() > CONFIG_FILE_MAX {
        bail!(
            "config file {}: {} bytes is over the limit of {} bytes",
            path.display(),
            meta.len(),
            CONFIG_FILE_MAX
        );
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        bail!(
            "config file {}: owned by uid {}, must be owned by root",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "config file {}: permissions {:04o} are too open, it must not be writable by group or others",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("config file {}", path.display()))?;
    Ok(Some(text))
}

fn check_log_level(level: &str, source: &str) -> Result<()> {
    if !LOG_LEVELS.contains(&level) {
        bail!("{source}: invalid log level {level:?}: expected one of debug, info, warn, error");
    }
    Ok(())
}

fn check_mount_option(opt: &str) -> Result<()> {
    const OK: [&str; 8] = [
        "nodev",
        "nosuid",
        "noexec",
        "noatime",
        "relatime",
        "metacopy=on",
        "metacopy=off",
        "volatile",
    ];
    for o in opt.split(',').filter(|o| !o.is_empty()) {
        if !OK.contains(&o) {
            bail!(
                "invalid overlay mount option {o:?}: supported are {}",
                OK.join(", ")
            );
        }
    }
    Ok(())
}

impl Settings {
    pub fn load(flags: &Flags) -> Result<Settings> {
        // A rootless daemon's defaults are the user's (see rootless.rs).
        let user = crate::rootless::user_defaults()?;
        let dir = match &user {
            Some(u) if flags.config_dir == Path::new(DEFAULT_CONFIG_DIR) => &u.config_dir,
            _ => &flags.config_dir,
        };
        let conf_path = dir.join("configuration.toml");
        let mut warnings = Vec::new();
        let conf: ConfigurationFile = match read_config_file(&conf_path)? {
            Some(t) => {
                let table: toml::Table = toml::from_str(&t)
                    .with_context(|| format!("config file {}: malformed", conf_path.display()))?;
                for k in unknown_keys(&table, "", &CONFIGURATION_KEYS) {
                    warnings.push(format!(
                        "config file {}: unknown key {k:?} ignored",
                        conf_path.display()
                    ));
                }
                table
                    .try_into()
                    .with_context(|| format!("config file {}: malformed", conf_path.display()))?
            }
            None => ConfigurationFile::default(),
        };
        let conf = ConfigurationFile {
            loglevel: set(conf.loglevel),
            group: set(conf.group),
            runtime: set(conf.runtime),
            run_root: set_path(conf.run_root),
            data_root: set_path(conf.data_root),
            ..conf
        };
        if let Some(l) = &conf.loglevel {
            check_log_level(l, &conf_path.display().to_string())?;
        }
        let build_cache_max = conf
            .build_cache_max_size
            .as_deref()
            .map(isula_types::parse_size)
            .transpose()
            .map_err(|e| {
                anyhow::anyhow!(
                    "config file {}: build_cache_max_size: {e}",
                    conf_path.display()
                )
            })?;
        let build_cache_keep_free = conf
            .build_cache_keep_free
            .as_deref()
            .map(KeepFree::parse)
            .transpose()
            .map_err(|e| {
                anyhow::anyhow!(
                    "config file {}: build_cache_keep_free: {e}",
                    conf_path.display()
                )
            })?;
        let size_key = |key: &str, v: &Option<String>| {
            v.as_deref()
                .map(isula_types::parse_size)
                .transpose()
                .map_err(|e| anyhow::anyhow!("config file {}: {key}: {e}", conf_path.display()))
        };
        let defaults = isula_store::apply::Limits::default();
        let unpack_limits = isula_store::apply::Limits {
            max_bytes: size_key("max_layer_size", &conf.max_layer_size)?
                .unwrap_or(defaults.max_bytes),
            max_entries: conf.max_layer_entries.unwrap_or(defaults.max_entries),
            min_free: size_key("min_free_space", &conf.min_free_space)?
                .unwrap_or(defaults.min_free),
        };
        let registry_stall_timeout = match conf.registry_stall_timeout.as_deref() {
            None => isula_registry::client::STALL_TIMEOUT,
            Some(text) => {
                let d = isula_types::parse_go_duration(text).map_err(|e| {
                    anyhow::anyhow!(
                        "config file {}: registry_stall_timeout: {e}",
                        conf_path.display()
                    )
                })?;
                if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600)
                {
                    anyhow::bail!(
                        "config file {}: registry_stall_timeout: {text:?} is out of range [1s, 1h]",
                        conf_path.display()
                    );
                }
                d
            }
        };
        let compression = isula_types::compression::LayerCompression::parse(
            conf.compression.as_deref().unwrap_or(""),
            conf.compression_level,
            Default::default(),
        )
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", conf_path.display()))?;
        let storage_path = dir.join("storage.toml");
        let storage: StorageFile = match read_config_file(&storage_path)? {
            Some(t) => {
                let table: toml::Table = toml::from_str(&t).with_context(|| {
                    format!("config file {}: malformed", storage_path.display())
                })?;
                for k in unknown_storage_keys(&table) {
                    warnings.push(format!(
                        "config file {}: key {k:?} does not apply here and is ignored",
                        storage_path.display()
                    ));
                }
                table
                    .try_into()
                    .with_context(|| format!("config file {}: malformed", storage_path.display()))?
            }
            None => StorageFile::default(),
        };
        let storage_graphroot = set_path(storage.storage.graphroot.clone());
        let storage_runroot = set_path(storage.storage.runroot.clone());
        let reg_path = dir.join("registries.toml");
        let registries = match read_config_file(&reg_path)? {
            Some(t) => Registries::parse(&reg_path.display().to_string(), &t)?,
            None => Registries::default(),
        };
        let policy_path = dir.join("policy.json");
        let policy = match read_config_file(&policy_path)? {
            Some(t) => Some(Policy::parse(&policy_path.display().to_string(), &t)?),
            None => None,
        };
        // supply chain
        let registries_d = isula_trust::RegistriesD::load(&dir.join("registries.d"))?;

        let debug = flags.debug.or(conf.debug).unwrap_or(false);
        let log_level = match &flags.log_level {
            Some(l) => {
                check_log_level(l, "--log-level")?;
                l.clone()
            }
            None if debug => "debug".into(),
            None => conf.loglevel.unwrap_or_else(|| "info".into()),
        };
        let (driver, driver_source) = match (&flags.storage_driver, set(storage.storage.driver)) {
            (Some(d), _) => (d.clone(), "--storage-driver".to_string()),
            (None, Some(d)) => (d, format!("config file {}", storage_path.display())),
            (None, None) => ("overlay".to_string(), String::new()),
        };
        let driver = match driver.as_str() {
            "overlay" | "overlay2" => "overlay".to_string(),
            other => bail!("{driver_source}: unsupported storage driver {other:?}: only overlay (overlay2) is supported"),
        };
        let mut mount_options = Vec::new();
        for m in [
            storage.storage.options.mountopt,
            storage.storage.options.overlay.mountopt,
        ]
        .into_iter()
        .flatten()
        {
            check_mount_option(&m)
                .with_context(|| format!("config file {}", storage_path.display()))?;
            mount_options.push(m);
        }
        for opt in &flags.storage_opt {
            let value = opt
                .strip_prefix("overlay.mountopt=")
                .or_else(|| opt.strip_prefix("overlay2.mountopt="))
                .with_context(|| {
                    format!("--storage-opt {opt:?}: supported is overlay.mountopt=OPTIONS")
                })?;
            check_mount_option(value).with_context(|| format!("--storage-opt {opt:?}"))?;
            mount_options.push(value.to_string());
        }
        let absolute = |p: PathBuf, what: &str| -> Result<PathBuf> {
            if !p.is_absolute() {
                bail!("{what} {} must be an absolute path", p.display());
            }
            Ok(p)
        };
        let hosts: Vec<String> = if !flags.host.is_empty() {
            flags.host.clone()
        } else {
            conf.hosts.clone().unwrap_or_default()
        };
        let tls = match flags.tlsverify.or(conf.tlsverify).unwrap_or(false) {
            false => None,
            true => {
                let file = |what: &str, flag: &Option<PathBuf>, key: &Option<PathBuf>| {
                    flag.clone().or_else(|| key.clone()).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--tlsverify needs --{what} (or {what} in configuration.toml)"
                        )
                    })
                };
                Some(TlsFiles {
                    ca: file("tlscacert", &flags.tlscacert, &conf.tlscacert)?,
                    cert: file("tlscert", &flags.tlscert, &conf.tlscert)?,
                    key: file("tlskey", &flags.tlskey, &conf.tlskey)?,
                })
            }
        };
        let insecure_tcp = flags.insecure_tcp.or(conf.insecure_tcp).unwrap_or(false);
        let (mut socket, tcp) = listeners(&hosts, tls.as_ref(), insecure_tcp)?;
        if let (Some(u), true) = (&user, hosts.is_empty()) {
            socket = Some(u.socket.clone());
        }
        let roles = conf.roles.clone().unwrap_or_default();
        let metrics_addr = flags.metrics_addr.or(conf.metrics_addr);
        let fleet = crate::fleet::FleetSettings::new(
            conf.native_platforms.as_deref(),
            conf.cache_registry.as_deref(),
        )?;
        Ok(Settings {
            metrics_addr,
            health_addr: flags.health_addr.or(conf.health_addr),
            fleet,
            debug,
            log_level,
            group: flags
                .group
                .clone()
                .or(conf.group)
                .unwrap_or_else(|| "isula".into()),
            data_root: absolute(
                flags
                    .dataroot
                    .clone()
                    .or(conf.data_root)
                    .or(storage_graphroot)
                    .or_else(|| user.as_ref().map(|u| u.data_root.clone()))
                    .unwrap_or_else(|| DEFAULT_DATA_ROOT.into()),
                "data root",
            )?,
            run_root: absolute(
                flags
                    .runroot
                    .clone()
                    .or(conf.run_root)
                    .or(storage_runroot)
                    .or_else(|| user.as_ref().map(|u| u.run_root.clone()))
                    .unwrap_or_else(|| DEFAULT_RUN_ROOT.into()),
                "run root",
            )?,
            runtime: conf.runtime.unwrap_or_else(|| "runc".into()),
            experimental: flags.experimental.or(conf.experimental).unwrap_or(false),
            allow_insecure: flags
                .allow_insecure
                .or(conf.allow_insecure)
                .unwrap_or(false),
            build_cache: conf.build_cache.unwrap_or(true),
            build_cache_max,
            build_cache_keep_free,
            unpack_limits,
            registry_stall_timeout,
            compression,
            storage_driver: driver,
            mount_options,
            registries,
            policy,
            registries_d,
            config_dir: dir.clone(),
            socket,
            tcp,
            roles,
            warnings,
        })
    }
}

/// The unix socket and the TCP listeners `hosts` ask for (none: the default socket). A
/// TCP listener needs mutual TLS, unless it is on a loopback address and `insecure_tcp`.
fn listeners(
    hosts: &[String],
    tls: Option<&TlsFiles>,
    insecure_tcp: bool,
) -> Result<(Option<PathBuf>, Vec<TcpListen>)> {
    if hosts.is_empty() {
        return Ok((Some(PathBuf::from(isula_api::DEFAULT_SOCKET)), Vec::new()));
    }
    let mut socket = None;
    let mut tcp = Vec::new();
    for h in hosts {
        if let Some(addr) = h.strip_prefix("tcp://") {
            let addr: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| anyhow::anyhow!("invalid host {h:?}: expected tcp://ADDR:PORT"))?;
            let tls = match (tls, insecure_tcp) {
                (Some(t), _) => Some(t.clone()),
                (None, true) if addr.ip().is_loopback() => None,
                (None, true) => bail!(
                    "host {h}: --insecure-tcp serves only a loopback address; {} is not one (use --tlsverify)",
                    addr.ip()
                ),
                (None, false) => bail!(
                    "host {h}: a TCP listener needs mutual TLS (--tlsverify --tlscacert CA --tlscert CERT --tlskey KEY); a plain one is allowed only on a loopback address with --insecure-tcp"
                ),
            };
            tcp.push(TcpListen { addr, tls });
        } else {
            if socket.is_some() {
                bail!("host {h}: only one unix socket can be served");
            }
            socket = Some(isula_api::socket_path_from_host(h).map_err(anyhow::Error::msg)?);
        }
    }
    Ok((socket, tcp))
}

/// Free space the build cache leaves on the data root's file system.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepFree {
    /// A share of the file system's size, in percent (0 < p < 100).
    Percent(f64),
    Bytes(u64),
}

impl KeepFree {
    /// "10%", "2.5%" or a size ("20GB", "512MiB").
    pub fn parse(s: &str) -> Result<KeepFree, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage such as \"10%\""))?;
            if !(v > 0.0 && v < 100.0) {
                return Err(format!("{s:?}: the share must be above 0% and below 100%"));
            }
            return Ok(KeepFree::Percent(v));
        }
        isula_types::parse_size(t)
            .map(KeepFree::Bytes)
            .map_err(|e| format!("{s:?}: expected a share (\"10%\") or a size (\"20GB\"): {e}"))
    }

    /// In bytes, for a file system of `size` bytes.
    pub fn bytes(self, size: u64) -> u64 {
        match self {
            KeepFree::Bytes(b) => b,
            KeepFree::Percent(p) => (size as f64 * p / 100.0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keep_free_takes_a_share_or_a_size_and_names_what_is_wrong() {
        assert_eq!(KeepFree::parse("10%"), Ok(KeepFree::Percent(10.0)));
        assert_eq!(KeepFree::parse(" 2.5% "), Ok(KeepFree::Percent(2.5)));
        assert_eq!(KeepFree::parse("1KB").map(|k| k.bytes(0)), Ok(1000));
        assert_eq!(KeepFree::Percent(10.0).bytes(1000), 100);
        for bad in ["0%", "100%", "-5%", "ten%", "lots", ""] {
            let e = KeepFree::parse(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    fn flags(dir: &Path, extra: &[&str]) -> Flags {
        let mut args = vec![
            "isula-builder",
            "--config-dir",
            dir.to_str().unwrap_or_default(),
        ];
        args.extend_from_slice(extra);
        Flags::parse_from(args)
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn hosts_tls_and_roles_from_the_file_and_flags_over_them() {
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            "configuration.toml",
            "hosts = [\"unix:///run/a.sock\", \"tcp://127.0.0.1:7070\"]\n\
             tlsverify = true\ntlscacert = \"/c/ca.pem\"\ntlscert = \"/c/cert.pem\"\n\
             tlskey = \"/c/key.pem\"\n[roles]\nadmin = [\"ops\"]\nreader = [\"ci\", \"ops\"]\n",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("load");
        assert_eq!(s.socket.as_deref(), Some(Path::new("/run/a.sock")));
        assert_eq!(s.tcp.len(), 1);
        assert_eq!(s.tcp[0].addr.to_string(), "127.0.0.1:7070");
        assert_eq!(
            s.tcp[0].tls.as_ref().map(|t| t.ca.clone()),
            Some(PathBuf::from("/c/ca.pem"))
        );
        // The highest role a name has; a name in none has none.
        assert_eq!(s.roles.of("ops"), Some(Role::Admin));
        assert_eq!(s.roles.of("ci"), Some(Role::Reader));
        assert_eq!(s.roles.of("stranger"), None);
        // --host replaces the file's hosts: only TCP, no unix socket.
        let s =
            Settings::load(&flags(d.path(), &["--host", "tcp://127.0.0.1:7171"])).expect("load");
        assert_eq!(s.socket, None);
        assert_eq!(s.tcp[0].addr.port(), 7171);
        // No hosts anywhere: the default socket alone.
        let e = tempfile::tempdir().expect("tmp");
        let s = Settings::load(&flags(e.path(), &[])).expect("load");
        assert_eq!(
            s.socket.as_deref(),
            Some(Path::new(isula_api::DEFAULT_SOCKET))
        );
        assert!(s.tcp.is_empty());
        // Refusals, each naming what is wrong.
        for (extra, want) in [
            (vec!["--host", "tcp://127.0.0.1:1"], "needs mutual TLS"),
            (
                vec!["--host", "tcp://10.0.0.1:1", "--insecure-tcp"],
                "only a loopback address",
            ),
            (vec!["--host", "tcp://nowhere"], "expected tcp://ADDR:PORT"),
            (
                vec!["--host", "tcp://127.0.0.1:1", "--tlsverify"],
                "--tlsverify needs --tlscacert",
            ),
            (
                vec!["--host", "unix:///a.sock", "--host", "unix:///b.sock"],
                "only one unix socket",
            ),
        ] {
            let err = Settings::load(&flags(e.path(), &extra)).expect_err(want);
            assert!(format!("{err:#}").contains(want), "{extra:?}: {err:#}");
        }
        let ok = Settings::load(&flags(
            e.path(),
            &["--host", "tcp://127.0.0.1:1", "--insecure-tcp"],
        ))
        .expect("loopback without TLS");
        assert_eq!(ok.tcp[0].tls, None);
        write(
            e.path(),
            "configuration.toml",
            "[roles]\nadmins = [\"x\"]\n",
            0o600,
        );
        let err = Settings::load(&flags(e.path(), &[])).expect_err("unknown role");
        assert!(format!("{err:#}").contains("admins"), "{err:#}");
    }

    #[test]
    fn flag_definition_is_consistent() {
        <Flags as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn shipped_config_files_are_valid() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let d = tempfile::tempdir().expect("tmp");
        for f in [
            "configuration.toml",
            "storage.toml",
            "registries.toml",
            "policy.json",
        ] {
            let text = std::fs::read_to_string(shipped.join(f)).expect("shipped file");
            write(d.path(), f, &text, 0o600);
        }
        let s = Settings::load(&flags(d.path(), &[])).expect("shipped config loads");
        assert_eq!(s.data_root, Path::new("/var/lib/isula-build/"));
        assert_eq!(s.mount_options, vec!["nodev".to_string()]);
        assert!(s.policy.is_some());
        assert!(s.build_cache);
        assert_eq!(s.build_cache_max, None);
        assert_eq!(
            s.registry_stall_timeout,
            isula_registry::client::STALL_TIMEOUT
        );
        write(
            d.path(),
            "configuration.toml",
            "registry_stall_timeout = \"1m30s\"\n",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("stall timeout set");
        assert_eq!(s.registry_stall_timeout, std::time::Duration::from_secs(90));
        // Pushes compress with gzip unless configured otherwise.
        assert_eq!(s.compression, Default::default());
        write(
            d.path(),
            "configuration.toml",
            "compression = \"zstd\"\ncompression_level = 19\n",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("compression set");
        assert_eq!(
            s.compression,
            isula_types::compression::LayerCompression {
                codec: isula_types::compression::Codec::Zstd,
                level: Some(19)
            }
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn flags_beat_files() {
        let d = tempfile::tempdir().expect("tmp");
        write(d.path(), "configuration.toml", "debug = false\nloglevel = \"warn\"\ndata_root = \"/a\"\nrun_root = \"/b\"\ngroup = \"g\"\nruntime = \"runc\"\nexperimental = true\n", 0o600);
        let s = Settings::load(&flags(d.path(), &[])).expect("load");
        assert_eq!(
            (s.log_level.as_str(), s.data_root.as_path(), s.experimental),
            ("warn", Path::new("/a"), true)
        );
        let s = Settings::load(&flags(
            d.path(),
            &[
                "--dataroot",
                "/x",
                "--log-level",
                "error",
                "--experimental=false",
            ],
        ))
        .expect("load");
        assert_eq!(
            (s.log_level.as_str(), s.data_root.as_path(), s.experimental),
            ("error", Path::new("/x"), false)
        );
        let s = Settings::load(&flags(d.path(), &["-D"])).expect("load");
        assert_eq!(s.log_level, "debug");
    }

    #[test]
    fn isula_build_0_9_6_default_files_start_the_daemon() {
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            "configuration.toml",
            "debug = false\nloglevel = \"\"\ngroup = \"isula\"\nrun_root = \"/var/run/isula-build/\"\ndata_root = \"/var/lib/isula-build/\"\nruntime = \"\"\n",
            0o600,
        );
        write(
            d.path(),
            "storage.toml",
            "[storage]\ndriver = \"overlay\"\n\n[storage.options.overlay]\nmountopt = \"nodev\"\n",
            0o600,
        );
        write(
            d.path(),
            "policy.json",
            "{\"default\": [{\"type\": \"insecureAcceptAnything\"}]}",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("0.9.6 defaults load");
        assert_eq!(s.log_level, "info");
        assert_eq!(s.runtime, "runc");
        assert_eq!(s.group, "isula");
        assert_eq!(s.data_root, Path::new("/var/lib/isula-build/"));
        assert_eq!(s.run_root, Path::new("/var/run/isula-build/"));
        assert_eq!(s.mount_options, vec!["nodev".to_string()]);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);

        // storage.toml's roots apply where configuration.toml leaves them unset or empty;
        // configuration.toml's win where it sets them; flags win over both.
        write(
            d.path(),
            "storage.toml",
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"/g\"\nrunroot = \"/r\"\nrootless_storage_path = \"x\"\n[storage.options]\nsize = \"\"\n",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("load");
        assert_eq!(s.data_root, Path::new("/var/lib/isula-build/"));
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
        assert!(
            s.warnings[0].contains("rootless_storage_path"),
            "{:?}",
            s.warnings
        );
        write(
            d.path(),
            "configuration.toml",
            "data_root = \"\"\nloglevel = \"warn\"\nnewer_key = 1\n",
            0o600,
        );
        let s = Settings::load(&flags(d.path(), &[])).expect("load");
        assert_eq!(
            (s.data_root.as_path(), s.run_root.as_path()),
            (Path::new("/g"), Path::new("/r"))
        );
        assert_eq!(s.log_level, "warn");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("\"newer_key\"") && w.contains("configuration.toml")),
            "{:?}",
            s.warnings
        );
        let s = Settings::load(&flags(d.path(), &["--dataroot", "/f"])).expect("load");
        assert_eq!(s.data_root, Path::new("/f"));
    }

    #[test]
    fn refuses_bad_files() {
        let cases: [(&str, &str, u32, &str); 14] = [
            ("configuration.toml", "debug = ", 0o600, "malformed"),
            (
                "configuration.toml",
                "build_cache_keep_free = \"lots\"",
                0o600,
                "build_cache_keep_free: \"lots\": expected a share",
            ),
            (
                "configuration.toml",
                "compression = \"lz4\"",
                0o600,
                "invalid compression \"lz4\": use gzip, zstd or zstd:chunked",
            ),
            (
                "configuration.toml",
                "compression = \"gzip\"\ncompression_level = 10",
                0o600,
                "compression level 10 is out of range for gzip: use 1 to 9",
            ),
            (
                "configuration.toml",
                "compression = \"zstd:chunked\"\ncompression_level = 23",
                0o600,
                "compression level 23 is out of range for zstd:chunked: use 1 to 22",
            ),
            (
                "configuration.toml",
                "registry_stall_timeout = \"soon\"",
                0o600,
                "registry_stall_timeout: time: invalid duration",
            ),
            (
                "configuration.toml",
                "registry_stall_timeout = \"100ms\"",
                0o600,
                "out of range [1s, 1h]",
            ),
            (
                "configuration.toml",
                "build_cache_max_size = \"lots\"",
                0o600,
                "build_cache_max_size",
            ),
            (
                "configuration.toml",
                "loglevel = \"loud\"",
                0o600,
                "invalid log level",
            ),
            ("configuration.toml", "debug = \"yes\"", 0o600, "malformed"),
            ("configuration.toml", "debug = true", 0o666, "too open"),
            (
                "storage.toml",
                "[storage]\ndriver = \"btrfs\"",
                0o600,
                "unsupported storage driver",
            ),
            (
                "registries.toml",
                "[registries.search\n",
                0o600,
                "registries.toml",
            ),
            ("policy.json", "{\"default\": [", 0o600, "policy.json"),
        ];
        for (name, text, mode, want) in cases {
            let d = tempfile::tempdir().expect("tmp");
            write(d.path(), name, text, mode);
            let e = Settings::load(&flags(d.path(), &[])).expect_err(name);
            let msg = format!("{e:#}");
            assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
        }
        let d = tempfile::tempdir().expect("tmp");
        write(
            d.path(),
            "registries.toml",
            &"#".repeat(CONFIG_FILE_MAX as usize + 1),
            0o600,
        );
        let e = Settings::load(&flags(d.path(), &[])).expect_err("big");
        assert!(format!("{e:#}").contains("over the limit"), "{e:#}");
    }
}
