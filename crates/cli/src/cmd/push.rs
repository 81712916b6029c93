//! `ctr-img push NAME [-f docker|oci] [--compression gzip|zstd] [--compression-level N]`:
//! sends a stored image to the registry its name says. The daemon checks the compression
//! and its level (its `compression` key is the default).

use super::{op_id, Client};
use crate::output::print_events;
use anyhow::{bail, Result};
use isula_api::v1::PushRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to push, named by its registry: registry.example.com/app:1.0
    pub name: String,
    /// Manifest format: docker (the default; oci with zstd) or oci
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Layer compression: gzip, zstd or zstd:chunked (both zstd in OCI manifests only);
    /// default: the daemon's (gzip)
    #[arg(long = "compression")]
    pub compression: Option<String>,
    /// Its level: gzip 1-9, zstd 1-22
    #[arg(long = "compression-level", allow_negative_numbers = true)]
    pub compression_level: Option<i32>,
    /// Of a name standing for several platforms, push only this platform's image
    /// (os/arch[/variant]); without it the whole list goes
    #[arg(long)]
    pub platform: Option<String>,
    #[command(flatten)]
    pub sign: super::sign::SignArgs,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    // Without -f, "docker" as isula-build always sent (a daemon of 0.9.6 wants one), except
    // beside --compression: then none, so the daemon may move a zstd push to OCI, which it
    // refuses when docker was named.
    let format = match args.format {
        Some(f) => f,
        None if args.compression.is_some() => String::new(),
        None => "docker".to_string(),
    };
    if !format.is_empty() && format != "docker" && format != "oci" {
        bail!("invalid --format {format:?}: use docker or oci");
    }
    // supply chain: keys checked before anything is pushed.
    let signer = args.sign.signer()?;
    let req = PushRequest {
        push_id: op_id(),
        image_name: args.name.clone(),
        format,
        progress: crate::progress::wanted(),
        compression: args.compression.unwrap_or_default(),
        compression_level: args.compression_level,
        platform: args.platform.unwrap_or_default(),
        sign_simple: signer.as_ref().is_some_and(|s| s.wants_simple()),
        sign_sigstore: signer.as_ref().is_some_and(|s| s.wants_sigstore()),
    };
    let Some(signer) = signer else {
        let live = req.progress;
        let stream = client.push(req).await?.into_inner();
        print_events(stream, |r| (r.response, r.progress), live).await?;
        println!("Push success with image: {}", args.name);
        return Ok(());
    };
    // A signed push: text only, and the sign request answered when it comes.
    let req = PushRequest {
        progress: false,
        ..req
    };
    let stream = client.push(req).await?.into_inner();
    super::sign::follow(
        client,
        &signer,
        stream,
        |m| (m.response, m.sign_request),
        &args.name,
    )
    .await?;
    println!("Push success with image: {}", args.name);
    Ok(())
}
