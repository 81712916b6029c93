//! `ctr-img tag SRC DST`.

use super::Client;
use anyhow::Result;
use isula_api::v1::TagRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source image, by name or ID
    pub image: String,
    /// New name, e.g. registry.example.com/repo:tag
    pub tag: String,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    client
        .tag(TagRequest {
            image: args.image.clone(),
            tag: args.tag.clone(),
        })
        .await?;
    println!("Tag {} to image {} succeed", args.tag, args.image);
    Ok(())
}
