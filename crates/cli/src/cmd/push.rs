//! `ctr-img push NAME [-f docker|oci]`: sends a stored image to the registry its name says.

use super::{op_id, Client};
use crate::output::print_events;
use anyhow::{bail, Result};
use isula_api::v1::PushRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to push, named by its registry: registry.example.com/app:1.0
    pub name: String,
    /// Manifest format: docker or oci
    #[arg(short = 'f', long, default_value = "docker")]
    pub format: String,
    /// Of a name standing for several platforms, push only this platform's image
    /// (os/arch[/variant]); without it the whole list goes
    #[arg(long)]
    pub platform: Option<String>,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    if args.format != "docker" && args.format != "oci" {
        bail!("invalid --format {:?}: use docker or oci", args.format);
    }
    let req = PushRequest {
        push_id: op_id(),
        image_name: args.name.clone(),
        format: args.format,
        progress: crate::progress::wanted(),
        platform: args.platform.unwrap_or_default(),
    };
    let live = req.progress;
    let stream = client.push(req).await?.into_inner();
    print_events(stream, |r| (r.response, r.progress), live).await?;
    println!("Push success with image: {}", args.name);
    Ok(())
}
