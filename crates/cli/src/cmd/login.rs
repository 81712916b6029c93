//! `login SERVER [-u USER] [-p]` and `logout [SERVER] [-a]`. The password goes to the daemon
//! RSA-encrypted with its public key (control-api.md); with no credentials the daemon first
//! tries the ones it has stored, and only if they fail are they asked for.

use super::Client;
use anyhow::{bail, Context, Result};
use isula_api::v1::{LoginRequest, LogoutRequest};
use std::io::{BufRead, Write};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// Registry server, e.g. mydockerhub.io or localhost:5000
    pub server: String,
    /// Read password from stdin
    #[arg(short = 'p', long = "password-stdin")]
    pub password_stdin: bool,
    /// Username to access registry
    #[arg(short = 'u', long)]
    pub username: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// Registry server
    pub server: Option<String>,
    /// Logout all registries
    #[arg(short = 'a', long)]
    pub all: bool,
}

/// The daemon's public key: `$ISULABUILD_KEY_FILE`, or isula-build.pub in the daemon's
/// config directory (/etc/isula-build, or $XDG_CONFIG_HOME/isula-build for a user).
pub fn public_key() -> Result<isula_api::secret::PublicKey> {
    let path = crate::daemonless::key_file()
        .map(|p| p.display().to_string())
        .map_or_else(|| std::env::var("ISULABUILD_KEY_FILE"), Ok)
        .unwrap_or_else(|_| {
            crate::daemonless::default_config_dir()
                .join(isula_api::secret::PUBLIC_KEY_FILE)
                .display()
                .to_string()
        });
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading the daemon's public key {path} (is the isula-builder running?)")
    })?;
    isula_api::secret::PublicKey::from_pem(&text).with_context(|| format!("public key {path}"))
}

/// isula-build's limit on a username or password.
const MAX_INPUT: usize = 128;
const LOGIN_FAILED: &str = "\nLogin Failed\n";
const LOGOUT_FAILED: &str = "\nLogout Failed\n";

fn prompt(label: &str) -> Result<String> {
    let mut out = std::io::stdout();
    write!(out, "{label}")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("could not read username from terminal")?;
    Ok(line.trim().to_string())
}

/// `--password-stdin`: every line of stdin, joined without their line ends (isula-build's
/// reading), at most 128 bytes.
fn password_from(reader: impl BufRead) -> Result<String> {
    let mut p = String::new();
    for line in reader.lines() {
        p.push_str(
            line.context("reading the password from stdin")?
                .trim_end_matches('\r'),
        );
        if p.len() > MAX_INPUT {
            bail!("length of input exceeded");
        }
    }
    if p.is_empty() {
        bail!("auth info can not be empty");
    }
    Ok(p)
}

fn read_password(from_stdin: bool) -> Result<String> {
    let p = if from_stdin {
        password_from(std::io::stdin().lock())?
    } else {
        rpassword::prompt_password("Password: ").context("could not read password from terminal")?
    };
    if p.len() > MAX_INPUT {
        bail!("length of input exceeded");
    }
    if p.is_empty() {
        bail!("auth info can not be empty");
    }
    Ok(p)
}

/// Prints what isula-build prints after a login or logout attempt: the daemon's answer, or
/// the failure banner (the error itself goes to stderr).
fn outcome(
    r: std::result::Result<tonic::Response<String>, tonic::Status>,
    failed: &str,
) -> Result<()> {
    match r {
        Ok(r) => {
            println!("{}", r.into_inner());
            Ok(())
        }
        Err(s) => {
            println!("{failed}");
            Err(s.into())
        }
    }
}

pub async fn login(client: &mut Client, args: LoginArgs) -> Result<()> {
    if args.server.trim().is_empty() {
        bail!("empty registry found, please input one registry");
    }
    if args.password_stdin && args.username.is_none() {
        bail!("must provides --password-stdin with --username");
    }
    if args.username.is_none() {
        // Try what the daemon has stored first.
        println!("try to login with existing credentials...\n");
        let req = LoginRequest {
            server: args.server.clone(),
            username: String::new(),
            password: String::new(),
        };
        match client.login(req).await {
            Ok(r) => return outcome(Ok(r.map(|r| r.content)), LOGIN_FAILED),
            Err(s)
                if s.message()
                    .contains("Failed to authenticate existing credentials") =>
            {
                println!(
                    "Failed to authenticate existing credentials, please input auth info directly\n"
                );
            }
            Err(s) => return outcome(Err(s), LOGIN_FAILED),
        }
    }
    let username = match args.username {
        Some(u) => u.trim().to_string(),
        None => prompt("Username: ")?,
    };
    if username.is_empty() {
        bail!("username can not be empty");
    }
    if username.len() > MAX_INPUT {
        bail!("length of input exceeded");
    }
    let password = read_password(args.password_stdin)?;
    let key = super::remote_files::public_key(client).await?;
    let req = LoginRequest {
        server: args.server,
        username,
        password: key
            .encrypt_hex(&password)
            .context("encrypting the password")?,
    };
    let r = client.login(req).await.map(|r| r.map(|r| r.content));
    outcome(r, LOGIN_FAILED)
}

pub async fn logout(client: &mut Client, args: LogoutArgs) -> Result<()> {
    // As isula-build: with --all a server is ignored.
    let server = match (&args.server, args.all) {
        (_, true) => String::new(),
        (None, false) => bail!("empty registry found, please input one registry"),
        (Some(s), false) => s.clone(),
    };
    let r = client
        .logout(LogoutRequest {
            server,
            all: args.all,
        })
        .await
        .map(|r| r.map(|r| r.result));
    outcome(r, LOGOUT_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_password_joins_lines_and_is_capped() {
        assert_eq!(password_from(&b"ab\ncd\n"[..]).expect("pw"), "abcd");
        assert_eq!(password_from(&b"ab\r\n"[..]).expect("pw"), "ab");
        assert!(password_from(&b""[..]).is_err());
        assert!(password_from(&b"\n\n"[..]).is_err());
        let long = "x".repeat(MAX_INPUT + 1);
        assert!(password_from(long.as_bytes()).is_err());
        assert!(password_from("x".repeat(MAX_INPUT).as_bytes()).is_ok());
    }
}
