//! `ctr-img save IMAGE... -o FILE [-f docker|oci]`.

use super::{op_id, Client};
use crate::output::print_stream;
use anyhow::{bail, Result};
use isula_api::v1::SaveRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to save, by name or ID
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Path of the archive to write (must not exist)
    #[arg(short = 'o', long = "output", required = true)]
    pub output: String,
    /// Archive format: docker (docker-archive) or oci (oci-archive, one image)
    #[arg(short = 'f', long = "format", default_value = "docker", value_parser = ["docker", "oci"])]
    pub format: String,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let path = crate::absolute(&args.output)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        bail!(
            "output file already exist: {:?}, try to remove existing tarball or rename output file",
            path.display().to_string()
        );
    }
    let req = SaveRequest {
        save_id: op_id(),
        images: args.images.clone(),
        path: path.display().to_string(),
        format: args.format,
        sep: None,
    };
    let stream = client.save(req).await?.into_inner();
    print_stream(stream, |r| r.log).await?;
    // As isula-build prints it: the names as given, in Go's list format.
    println!("Save success with image: [{}]", args.images.join(" "));
    Ok(())
}
