//! `ctr-img rm IMAGE... [-a] [-p]`.

use super::Client;
use crate::output::print_stream;
use anyhow::{bail, Result};
use isula_api::v1::RemoveRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to remove, by name, ID or unique ID prefix
    pub images: Vec<String>,
    /// Remove all images
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Remove all untagged images
    #[arg(short = 'p', long = "prune")]
    pub prune: bool,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    if (args.all || args.prune) && !args.images.is_empty() {
        bail!("image names cannot be given with --all or --prune");
    }
    if !args.all && !args.prune && args.images.is_empty() {
        bail!("rm requires at least one image, or --all or --prune");
    }
    let stream = client
        .remove(RemoveRequest {
            image_id: args.images,
            all: args.all,
            prune: args.prune,
        })
        .await?
        .into_inner();
    print_stream(stream, |r| r.layer_message).await
}
