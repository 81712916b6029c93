//! `ctr-img inspect IMAGE` (the image's ID, names, manifest and config as JSON, as Docker
//! users expect from `docker image inspect`) and `ctr-img history IMAGE` (its config's
//! history, newest first, with the size each layer-making step added). Neither is in
//! isula-build 0.9.6; both read one ImageInspect call.

use super::Client;
use crate::output::table;
use anyhow::{Context, Result};
use isula_api::v1::ImageInspectRequest;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Image, by name or ID
    pub image: String,
    /// Print the image's SBOM attestation (its SPDX document) instead
    #[arg(long = "sbom", conflicts_with = "provenance")]
    pub sbom: bool,
    /// Print the image's SLSA provenance attestation (its predicate) instead
    #[arg(long = "provenance")]
    pub provenance: bool,
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Image, by name or ID
    pub image: String,
    /// Show the whole CREATED BY text
    #[arg(long = "no-trunc")]
    pub no_trunc: bool,
    /// Print sizes in bytes
    #[arg(short = 'H', long = "human", default_value_t = true, action = clap::ArgAction::Set)]
    pub human: bool,
}

fn json(bytes: &[u8], what: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes)
        .with_context(|| format!("the daemon sent a {what} that is not JSON"))
}

fn pretty(v: &serde_json::Value) -> Result<String> {
    use serde::Serialize;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"    "),
    );
    v.serialize(&mut ser)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub async fn inspect(client: &mut Client, args: InspectArgs) -> Result<()> {
    let predicate_type = if args.sbom {
        "https://spdx.dev/Document"
    } else if args.provenance {
        "https://slsa.dev/provenance/v1"
    } else {
        ""
    };
    let r = client
        .image_inspect(ImageInspectRequest {
            image: args.image,
            predicate_type: predicate_type.to_string(),
        })
        .await?
        .into_inner();
    if !predicate_type.is_empty() {
        println!("{}", pretty(&json(&r.predicate, "predicate")?)?);
        return Ok(());
    }
    let config = json(&r.config, "config")?;
    let doc = serde_json::json!([{
        "Id": format!("sha256:{}", r.id),
        "RepoTags": r.names,
        "Created": config["created"],
        "Architecture": config["architecture"],
        "Os": config["os"],
        "Size": r.layer_sizes.iter().sum::<i64>(),
        "ManifestMediaType": r.manifest_media_type,
        "Manifest": json(&r.manifest, "manifest")?,
        "Config": config,
    }]);
    println!("{}", pretty(&doc)?);
    Ok(())
}

/// One history row: (created, created by, size, comment, makes a layer).
fn rows(config: &serde_json::Value, sizes: &[i64]) -> Vec<(String, String, i64, String, bool)> {
    let history: Vec<&serde_json::Value> =
        config["history"].as_array().into_iter().flatten().collect();
    // Steps that made layers take the top layers: a base made without history (an import
    // by another tool) keeps its lower layers out of the steps' sizes.
    let making = history
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .count();
    let mut layer = sizes.len().saturating_sub(making);
    let mut out = Vec::new();
    for h in history {
        let empty = h["empty_layer"].as_bool().unwrap_or(false);
        let size = if empty {
            0
        } else {
            let s = sizes.get(layer).copied().unwrap_or(0);
            layer += 1;
            s
        };
        let created = h["created"]
            .as_str()
            .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_else(|| "<unknown>".into());
        out.push((
            created,
            h["created_by"].as_str().unwrap_or_default().to_string(),
            size,
            h["comment"].as_str().unwrap_or_default().to_string(),
            !empty,
        ));
    }
    out.reverse();
    out
}

pub async fn history(client: &mut Client, args: HistoryArgs) -> Result<()> {
    let r = client
        .image_inspect(ImageInspectRequest {
            image: args.image,
            ..Default::default()
        })
        .await?
        .into_inner();
    let config = json(&r.config, "config")?;
    let table_rows: Vec<Vec<String>> = rows(&config, &r.layer_sizes)
        .into_iter()
        .enumerate()
        .map(|(i, (created, by, size, comment, _))| {
            let by = by.replace('\t', " ");
            let by = if !args.no_trunc && by.chars().count() > 45 {
                format!("{}...", by.chars().take(42).collect::<String>())
            } else {
                by
            };
            let size = if args.human {
                isula_types::human_size(size.max(0) as u64)
            } else {
                size.to_string()
            };
            // As Docker: the image's ID on the top row, the others have none of their own.
            let id = if i == 0 {
                r.id.get(..12).unwrap_or(&r.id).to_string()
            } else {
                "<missing>".into()
            };
            vec![id, created, by, size, comment]
        })
        .collect();
    print!(
        "{}",
        table(
            &["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
            &[14, 21, 47, 10, 9],
            &table_rows
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn history_rows_newest_first_with_layer_sizes() {
        let config = serde_json::json!({"history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs"},
            {"created": "2024-01-02T00:00:00Z", "created_by": "LABEL a=b", "empty_layer": true},
            {"created": "2024-01-03T00:00:00Z", "created_by": "RUN x", "comment": "c"}
        ]});
        let rows = super::rows(&config, &[100, 7]);
        let got: Vec<(&str, i64, bool)> = rows.iter().map(|r| (r.1.as_str(), r.2, r.4)).collect();
        assert_eq!(
            got,
            vec![
                ("RUN x", 7, true),
                ("LABEL a=b", 0, false),
                ("ADD rootfs", 100, true)
            ]
        );
        assert_eq!(rows[0].3, "c");
    }
}
