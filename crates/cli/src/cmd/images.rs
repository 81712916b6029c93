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
    let rows: Vec<Vec<String>> = resp
        .images
        .into_iter()
        .map(|i| {
            let id = i.id.get(..12).unwrap_or(&i.id).to_string();
            vec![i.repository, i.tag, id, i.created, i.size]
        })
        .collect();
    if rows.is_empty() {
        // isula-build prints this head (without SIZE) when nothing is listed.
        println!("{EMPTY}");
        return Ok(());
    }
    print!(
        "{}",
        table(
            &["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
            &[46, 11, 17, 26, 12],
            &rows
        )
    );
    Ok(())
}
