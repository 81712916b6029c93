//! `isula-build`: the command-line client. It speaks only the control API (it links neither
//! the store nor the builder): one file per command under `cmd/`.

mod cmd;
mod daemonless;
mod output;
mod progress;

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "isula-build",
    version,
    disable_version_flag = true,
    about = "isula-build is the client of isula-builder, the container image builder"
)]
pub struct Cli {
    /// Print the client's version (as isula-build's -v/--version)
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    pub version: Option<bool>,
    /// Open debug mode
    #[arg(short = 'D', long, global = true)]
    pub debug: bool,
    /// Log level to be used. Either "debug", "info", "warn" or "error"
    #[arg(long = "log-level", global = true, default_value = "error")]
    pub log_level: String,
    /// Timeout for connecting to daemon (100ms to 120s; default 20s)
    #[arg(long, global = true)]
    pub timeout: Option<String>,
    /// Daemon to connect to: unix:///path, or tcp://HOST:PORT (mutual TLS); else
    /// $ISULA_BUILD_HOST, $ISULABUILD_HOST, or unix:///var/run/isula_build.sock (not root:
    /// unix://$XDG_RUNTIME_DIR/isula_build.sock, the user's rootless daemon). Several
    /// (repeated, or comma-separated) make a fleet: each build goes to one of them
    #[arg(long, global = true)]
    pub host: Vec<String>,
    /// Use mutual TLS with a tcp:// daemon (implied by the other --tls* flags and by
    /// $ISULA_BUILD_CERT_PATH)
    #[arg(long, global = true)]
    pub tlsverify: bool,
    /// The CA that signed the daemon's certificate [default: $ISULA_BUILD_CERT_PATH/ca.pem]
    #[arg(long, global = true)]
    pub tlscacert: Option<std::path::PathBuf>,
    /// This client's certificate [default: $ISULA_BUILD_CERT_PATH/cert.pem]
    #[arg(long, global = true)]
    pub tlscert: Option<std::path::PathBuf>,
    /// This client's private key [default: $ISULA_BUILD_CERT_PATH/key.pem]
    #[arg(long, global = true)]
    pub tlskey: Option<std::path::PathBuf>,
    /// Run the builder in this command's own process tree, without a daemon (as root or
    /// rootless) [env: ISULA_BUILD_DAEMONLESS=1]
    #[arg(long, global = true, env = "ISULA_BUILD_DAEMONLESS", value_parser = clap::builder::FalseyValueParser::new())]
    pub daemonless: bool,
    /// With --daemonless: the data root [default: the daemon's]
    #[arg(long, global = true, requires = "daemonless")]
    pub dataroot: Option<PathBuf>,
    /// With --daemonless: the run root [default: the daemon's]
    #[arg(long, global = true, requires = "daemonless")]
    pub runroot: Option<PathBuf>,
    /// With --daemonless: the configuration directory [default: the daemon's]
    #[arg(long = "config-dir", global = true, requires = "daemonless")]
    pub config_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Container image operations
    #[command(name = "ctr-img", subcommand)]
    CtrImg(CtrImg),
    /// Manage the build cache (du, prune)
    #[command(subcommand)]
    Builder(cmd::builder::Builder),
    /// Show isula-build system information
    Info(cmd::info::Args),
    /// Login to a remote registry
    Login(cmd::login::LoginArgs),
    /// Logout from a remote registry
    Logout(cmd::login::LogoutArgs),
    /// Manage manifest lists (experimental: the daemon needs --experimental)
    #[command(subcommand)]
    Manifest(cmd::manifest::Manifest),
    /// Show the isula-build version information
    Version,
    /// Generate a shell completion script
    #[command(hide = true)]
    Completion {
        /// bash (the default), zsh, fish, elvish or powershell
        shell: Option<clap_complete::Shell>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CtrImg {
    /// Build a container image from a Dockerfile
    Build(Box<cmd::build::Args>),
    /// List locally stored images
    Images(cmd::images::Args),
    /// Show an image's ID, names, manifest and config as JSON
    Inspect(cmd::inspect::InspectArgs),
    /// Show the history of an image
    History(cmd::inspect::HistoryArgs),
    /// Import the base image from a tarball to the image store
    Import(cmd::import::Args),
    /// Load images
    Load(cmd::load::Args),
    /// Pull image from remote repository
    Pull(cmd::pull::Args),
    /// Push image to remote repository
    Push(cmd::push::Args),
    /// Remove one or more locally stored images
    Rm(cmd::rm::Args),
    /// Save image to tarball
    Save(cmd::save::Args),
    /// Create a tag for source image
    Tag(cmd::tag::Args),
}

/// Makes a client path absolute against the current directory (the daemon has another one).
pub fn absolute(p: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        return Ok(path);
    }
    Ok(std::env::current_dir()?.join(path))
}

fn main() {
    // Output to a closed pipe (`isula-build images | head -1`) ends the command quietly, as
    // isula-build's Go client does (it dies by SIGPIPE on a write to stdout or stderr): the
    // standard library's print macros panic on it. The gRPC connection keeps SIGPIPE
    // ignored, so a daemon going away is still an error message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if text.starts_with("failed printing to std") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    // Usage errors exit 1, as isula-build's do; help and version exit 0, and so does a
    // command group named alone (`ctr-img`: its help on stdout, as the original).
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        use clap::error::ErrorKind;
        if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            print!("{}", e.render());
            std::process::exit(0);
        }
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    });
    if let Command::Completion { shell } = &cli.command {
        clap_complete::generate(
            shell.unwrap_or(clap_complete::Shell::Bash),
            &mut Cli::command(),
            "isula-build",
            &mut std::io::stdout(),
        );
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            r = cmd::run(cli) => match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("Error: {}", output::error_message(&e));
                    1
                }
            },
            _ = tokio::signal::ctrl_c() => {
                // Dropping the call cancels the operation on the daemon.
                eprintln!("Error: interrupted");
                130
            }
        }
    });
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn isula_build_0_9_6_spellings() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["isula-build", "ctr-img", "build", "-t", "a:1", "."])
            .expect("-t is --tag");
        match cli.command {
            super::Command::CtrImg(super::CtrImg::Build(b)) => {
                assert_eq!(b.tag.as_deref(), Some("a:1"))
            }
            other => panic!("{other:?}"),
        }
        let cli = super::Cli::try_parse_from(["isula-build", "completion"])
            .expect("completion without a shell");
        assert!(matches!(
            cli.command,
            super::Command::Completion { shell: None }
        ));
        let e = super::Cli::try_parse_from(["isula-build", "-v"]).expect_err("prints the version");
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
    }
}
