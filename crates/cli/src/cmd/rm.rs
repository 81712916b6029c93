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

/// The combinations the original refuses.
fn check(args: &Args) -> Result<()> {
    if args.all && args.prune {
        bail!("--all and --prune cannot be used together");
    }
    if (args.all || args.prune) && !args.images.is_empty() {
        bail!("image names cannot be given with --all or --prune");
    }
    if !args.all && !args.prune && args.images.is_empty() {
        bail!("rm requires at least one image, or --all or --prune");
    }
    Ok(())
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    check(&args)?;
    let stream = client
        .remove(RemoveRequest {
            image_id: args.images,
            all: args.all,
            prune: args.prune,
        })
        .await?
        .into_inner();
    // One event per message, each without its newline (isula-build's wire form).
    print_stream(stream, |r| r.layer_message + "\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(images: &[&str], all: bool, prune: bool) -> Args {
        Args {
            images: images.iter().map(|s| s.to_string()).collect(),
            all,
            prune,
        }
    }

    #[test]
    fn refused_combinations() {
        assert!(check(&args(&[], true, true)).is_err());
        assert!(check(&args(&["a"], true, false)).is_err());
        assert!(check(&args(&[], false, false)).is_err());
        assert!(check(&args(&["a"], false, false)).is_ok());
        assert!(check(&args(&[], true, false)).is_ok());
        assert!(check(&args(&[], false, true)).is_ok());
    }
}
