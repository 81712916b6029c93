//! `ctr-img import TARBALL [REFERENCE]`: a rootfs tarball becomes a base image.

use super::{op_id, Client};
use crate::output::print_stream;
use anyhow::Result;
use isula_api::v1::ImportRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rootfs tarball (tar, tar.gz, tar.bz2, tar.xz, tar.zst), at most 1 GiB
    pub source: String,
    /// Name for the image, e.g. openeuler:20.03
    pub reference: Option<String>,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let source = crate::absolute(&args.source)?;
    // A remote daemon reads what this client sends it first.
    let source = if super::remote_files::is_remote() {
        super::remote_files::upload_file(client, &source).await?
    } else {
        source.display().to_string()
    };
    let req = ImportRequest {
        import_id: op_id(),
        source,
        reference: args.reference.unwrap_or_default(),
    };
    let stream = client.import(req).await?.into_inner();
    print_stream(stream, |r| r.log).await
}
