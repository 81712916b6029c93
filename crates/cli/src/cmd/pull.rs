//! `ctr-img pull NAME`: fetches an image from a registry into the store.

use super::{op_id, Client};
use crate::output::print_events;
use anyhow::Result;
use isula_api::v1::PullRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to pull, e.g. registry.example.com/app:1.0 (short names use the search registries)
    pub name: String,
    /// The platform to pull from a manifest list: os/arch[/variant] (default: this machine's)
    #[arg(long = "platform")]
    pub platform: Option<String>,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let req = PullRequest {
        pull_id: op_id(),
        image_name: args.name.clone(),
        progress: crate::progress::wanted(),
        platform: args.platform.clone().unwrap_or_default(),
    };
    let live = req.progress;
    let stream = client.pull(req).await?.into_inner();
    print_events(stream, |r| (r.response, r.progress), live).await?;
    println!("Pull success with image: {}", args.name);
    Ok(())
}
