//! `ctr-img load -i FILE`: images from a docker-archive or oci-archive.

use super::{op_id, Client};
use crate::output::print_stream;
use anyhow::Result;
use isula_api::v1::LoadRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path of the archive to load
    #[arg(short = 'i', long = "input", required = true)]
    pub input: String,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let req = LoadRequest {
        path: crate::absolute(&args.input)?.display().to_string(),
        load_id: op_id(),
        sep: None,
    };
    let stream = client.load(req).await?.into_inner();
    print_stream(stream, |r| r.log).await
}
