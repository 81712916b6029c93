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

/// The daemon's public key: `$ISULABUILD_KEY_FILE` or /etc/isula-build/isula-build.pub.
pub fn public_key() -> Result<isula_api::secret::PublicKey> {
    let path = std::env::var("ISULABUILD_KEY_FILE")
        .unwrap_or_else(|_| format!("/etc/isula-build/{}", isula_api::secret::PUBLIC_KEY_FILE));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading the daemon's public key {path} (is the isula-builder running?)")
    })?;
    isula_api::secret::PublicKey::from_pem(&text).with_context(|| format!("public key {path}"))
}

fn prompt(label: &str) -> Result<String> {
    let mut out = std::io::stderr();
    write!(out, "{label}")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_password(from_stdin: bool) -> Result<String> {
    let p = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        rpassword::prompt_password("Password: ").context("reading the password")?
    };
    if p.is_empty() {
        bail!("the password is empty");
    }
    Ok(p)
}

pub async fn login(client: &mut Client, args: LoginArgs) -> Result<()> {
    if args.server.trim().is_empty() {
        bail!("login needs a registry server");
    }
    if args.password_stdin && args.username.is_none() {
        bail!("--password-stdin needs --username");
    }
    if args.username.is_none() && !args.password_stdin {
        // Try what the daemon has stored first.
        let req = LoginRequest {
            server: args.server.clone(),
            username: String::new(),
            password: String::new(),
        };
        match client.login(req).await {
            Ok(r) => {
                println!("{}", r.into_inner().content);
                return Ok(());
            }
            Err(s)
                if s.message()
                    .contains("Failed to authenticate existing credentials") => {}
            Err(s) => return Err(s.into()),
        }
    }
    let username = match args.username {
        Some(u) => u,
        None => prompt("Username: ")?,
    };
    if username.is_empty() {
        bail!("the username is empty");
    }
    let password = read_password(args.password_stdin)?;
    let key = public_key()?;
    let req = LoginRequest {
        server: args.server,
        username,
        password: key
            .encrypt_hex(&password)
            .context("encrypting the password")?,
    };
    let r = client.login(req).await?;
    println!("{}", r.into_inner().content);
    Ok(())
}

pub async fn logout(client: &mut Client, args: LogoutArgs) -> Result<()> {
    let server = match (&args.server, args.all) {
        (Some(_), true) => bail!("give either a registry server or --all, not both"),
        (None, false) => bail!("logout needs a registry server, or --all"),
        (s, _) => s.clone().unwrap_or_default(),
    };
    let r = client
        .logout(LogoutRequest {
            server,
            all: args.all,
        })
        .await?;
    println!("{}", r.into_inner().result);
    Ok(())
}
