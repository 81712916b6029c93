//! `ctr-img images [NAME]`: the table of local images.

use super::Client;
use crate::output::table;
use anyhow::Result;
use isula_api::v1::ListRequest;

/// What isula-build prints for an empty list, verbatim.
const EMPTY: &str = "-----------   ----   ---------   --------\nREPOSITORY    TAG    IMAGE ID    CREATED\n-----------   ----   ---------   --------";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only images of this repository, reference or ID
    pub name: Option<String>,
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let resp = client
        .list(ListRequest {
            image_name: args.name.unwrap_or_default(),
        })
        .await?
        .into_inner();
    // A PLATFORM column only when an image is for another platform than this machine's
    // (so the table stays isula-build's otherwise).
    let host = isula_types::platform::BuildPlatform::host().to_string();
    let foreign = resp
        .images
        .iter()
        .any(|i| !i.platform.is_empty() && i.platform != host);
    let rows: Vec<Vec<String>> = resp
        .images
        .into_iter()
        .map(|i| {
            let id = i.id.get(..12).unwrap_or(&i.id).to_string();
            let mut row = vec![i.repository, i.tag, id, i.created, i.size];
            if foreign {
                row.push(i.platform);
            }
            row
        })
        .collect();
    if rows.is_empty() {
        // isula-build prints this head (without SIZE) when nothing is listed.
        println!("{EMPTY}");
        return Ok(());
    }
    let (heads, widths): (&[&str], &[usize]) = if foreign {
        (
            &[
                "REPOSITORY",
                "TAG",
                "IMAGE ID",
                "CREATED",
                "SIZE",
                "PLATFORM",
            ],
            &[46, 11, 17, 26, 12, 16],
        )
    } else {
        (
            &["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
            &[46, 11, 17, 26, 12],
        )
    };
    print!("{}", table(heads, widths, &rows));
    Ok(())
}
