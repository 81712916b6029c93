//! supply chain: signing in the client for `push --sign-by FINGERPRINT` (simple signing:
//! the caller's own `gpg` signs, with the caller's keys and agent) and
//! `--sign-by-sigstore-private-key PATH [--sign-passphrase-file F]` (cosign's encrypted
//! key format, decrypted and used here). Keys are checked before anything is pushed; the
//! daemon sends the payloads once the manifest is pushed and gets only signatures back.

use super::Client;
use anyhow::{bail, Context as _, Result};
use isula_api::v1::{PutSignaturesRequest, SignRequest};
use isula_trust::sigstore::{self, PrivateKey};
use std::io::Write;
use std::process::{Command, Stdio};

/// The signing flags of a push.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SignArgs {
    /// Sign the pushed image with this GnuPG key (simple signing; your own gpg signs)
    #[arg(long = "sign-by", value_name = "FINGERPRINT")]
    pub sign_by: Option<String>,
    /// Sign the pushed image with this sigstore (cosign) private key
    #[arg(long = "sign-by-sigstore-private-key", value_name = "PATH")]
    pub sigstore_key: Option<String>,
    /// The sigstore key's passphrase: the first line of this file (default: ask)
    #[arg(long = "sign-passphrase-file", value_name = "PATH")]
    pub passphrase_file: Option<String>,
}

pub struct Signer {
    fingerprint: Option<String>,
    sigstore: Option<PrivateKey>,
}

impl SignArgs {
    /// The signer these flags ask for (None: an unsigned push), its keys checked now.
    pub fn signer(&self) -> Result<Option<Signer>> {
        if self.passphrase_file.is_some() && self.sigstore_key.is_none() {
            bail!("--sign-passphrase-file needs --sign-by-sigstore-private-key");
        }
        if self.sign_by.is_none() && self.sigstore_key.is_none() {
            return Ok(None);
        }
        if let Some(fpr) = &self.sign_by {
            check_gpg_key(fpr)?;
        }
        let sigstore = match &self.sigstore_key {
            None => None,
            Some(path) => {
                let pem =
                    isula_trust::read_capped(std::path::Path::new(path), isula_trust::KEY_FILE_MAX)
                        .map_err(|e| {
                            anyhow::anyhow!("--sign-by-sigstore-private-key {path}: {e}")
                        })?;
                let pass = match &self.passphrase_file {
                    Some(f) => sigstore::passphrase_from_file(
                        &isula_trust::read_capped(std::path::Path::new(f), isula_trust::KEY_FILE_MAX)
                            .map_err(|e| anyhow::anyhow!("--sign-passphrase-file {f}: {e}"))?,
                    ),
                    None => rpassword::prompt_password(format!("Passphrase for key {path}: "))
                        .context("could not read the passphrase from the terminal (use --sign-passphrase-file)")?
                        .into_bytes(),
                };
                let what = match &self.passphrase_file {
                    Some(f) => {
                        format!("--sign-by-sigstore-private-key {path} (passphrase from {f})")
                    }
                    None => format!("--sign-by-sigstore-private-key {path}"),
                };
                Some(PrivateKey::decrypt(&what, &pem, &pass)?)
            }
        };
        Ok(Some(Signer {
            fingerprint: self.sign_by.clone(),
            sigstore,
        }))
    }
}

fn gpg() -> String {
    std::env::var("ISULA_BUILD_GPG").unwrap_or_else(|_| "gpg".into())
}

fn check_gpg_key(fpr: &str) -> Result<()> {
    let out = Command::new(gpg())
        .args(["--batch", "--list-secret-keys", "--with-colons", "--", fpr])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("--sign-by {fpr}: running gpg (install gnupg)"))?;
    if !out.status.success() {
        bail!(
            "--sign-by {fpr}: no such secret key in your GnuPG keyring: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn gpg_sign(fpr: &str, payload: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(gpg())
        .args(["--sign", "--local-user", fpr, "--output", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("--sign-by {fpr}: running gpg"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(payload)
            .context("writing the payload to gpg")?;
    }
    let out = child.wait_with_output().context("waiting for gpg")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "--sign-by {fpr}: gpg could not sign: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

impl Signer {
    pub fn wants_simple(&self) -> bool {
        self.fingerprint.is_some()
    }

    pub fn wants_sigstore(&self) -> bool {
        self.sigstore.is_some()
    }

    /// Signs what the daemon asked for and sends the signatures back.
    pub async fn answer(&self, client: &Client, req: SignRequest) -> Result<()> {
        let mut put = PutSignaturesRequest {
            token: req.token.clone(),
            ..Default::default()
        };
        if let Some(fpr) = &self.fingerprint {
            if req.simple_payload.is_empty() {
                bail!("the daemon asked for no simple-signing signature");
            }
            put.simple_signature = gpg_sign(fpr, &req.simple_payload)?;
        }
        if let Some(k) = &self.sigstore {
            if req.sigstore_payload.is_empty() {
                bail!("the daemon asked for no sigstore signature");
            }
            put.sigstore_signature = k.sign(&req.sigstore_payload)?;
        }
        client
            .clone()
            .put_signatures(put)
            .await
            .with_context(|| format!("storing the signatures of {}", req.docker_reference))?;
        Ok(())
    }
}

/// Prints a signed push's stream (text only) and answers its sign request; fails when the
/// daemon never asks (a daemon without signing pushes unsigned).
pub async fn follow<T>(
    client: &Client,
    signer: &Signer,
    mut stream: tonic::Streaming<T>,
    split: fn(T) -> (String, Option<SignRequest>),
    what: &str,
) -> Result<()> {
    let mut asked = false;
    while let Some(m) = stream.message().await? {
        match split(m) {
            (_, Some(sr)) => {
                asked = true;
                signer.answer(client, sr).await?;
            }
            (text, None) => {
                let mut out = std::io::stdout();
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
        }
    }
    if !asked {
        bail!("pushed {what}, but the daemon did not ask for signatures (does it support signing?): it is not signed");
    }
    Ok(())
}

/// Answers the sign requests a unary call (a build) returned.
pub async fn answer_all(
    client: &Client,
    signer: &Signer,
    requests: Vec<SignRequest>,
) -> Result<()> {
    if requests.is_empty() {
        bail!("the image was pushed, but the daemon did not ask for signatures (does it support signing?): it is not signed");
    }
    for r in requests {
        let reference = r.docker_reference.clone();
        signer.answer(client, r).await?;
        println!("Signed {reference}");
    }
    Ok(())
}
