//! `manifest create|annotate|inspect|push`: manifest lists (the daemon must run with
//! --experimental).

use super::Client;
use crate::output::print_stream;
use anyhow::{Context, Result};
use isula_api::v1::{
    ManifestAnnotateRequest, ManifestCreateRequest, ManifestInspectRequest, ManifestPushRequest,
};

#[derive(Debug, clap::Subcommand)]
pub enum Manifest {
    /// Create a local manifest list over images of the store
    Create {
        /// Name of the manifest list
        list: String,
        /// Images to list (none: an empty list, filled later)
        images: Vec<String>,
    },
    /// Set the platform of an image in a manifest list
    Annotate {
        /// Name of the manifest list
        list: String,
        /// Image in the list
        image: String,
        /// Architecture, e.g. arm64
        #[arg(long)]
        arch: Option<String>,
        /// Operating system, e.g. linux
        #[arg(long)]
        os: Option<String>,
        /// Operating system features (repeatable)
        #[arg(long = "os-features")]
        os_features: Vec<String>,
        /// Architecture variant, e.g. v8
        #[arg(long)]
        variant: Option<String>,
    },
    /// Show a manifest list
    Inspect {
        /// Name of the manifest list
        list: String,
    },
    /// Push a manifest list and its images to a registry
    Push {
        /// Name of the manifest list
        list: String,
        /// Destination, e.g. registry.example.com/app:1.0
        dest: String,
        /// Layer compression of every image of the list: gzip, zstd or zstd:chunked (zstd
        /// makes the list an OCI index); default: the daemon's (gzip)
        #[arg(long = "compression")]
        compression: Option<String>,
        /// Its level: gzip 1-9, zstd 1-22
        #[arg(long = "compression-level", allow_negative_numbers = true)]
        compression_level: Option<i32>,
        #[command(flatten)]
        sign: super::sign::SignArgs,
    },
}

pub async fn run(client: &mut Client, m: Manifest) -> Result<()> {
    match m {
        Manifest::Create { list, images } => {
            let r = client
                .manifest_create(ManifestCreateRequest {
                    manifest_list: list,
                    manifests: images,
                })
                .await?;
            println!("{}", r.into_inner().image_id);
        }
        Manifest::Annotate {
            list,
            image,
            arch,
            os,
            os_features,
            variant,
        } => {
            client
                .manifest_annotate(ManifestAnnotateRequest {
                    manifest_list: list,
                    manifest: image,
                    arch: arch.unwrap_or_default(),
                    os: os.unwrap_or_default(),
                    os_features,
                    variant: variant.unwrap_or_default(),
                })
                .await?;
            println!("Annotate manifest succeed");
        }
        Manifest::Inspect { list } => {
            let r = client
                .manifest_inspect(ManifestInspectRequest {
                    manifest_list: list,
                })
                .await?;
            println!("{}", indent4(&r.into_inner().data)?);
        }
        Manifest::Push {
            list,
            dest,
            compression,
            compression_level,
            sign,
        } => {
            // supply chain: keys checked before anything is pushed.
            let signer = sign.signer()?;
            let stream = client
                .manifest_push(ManifestPushRequest {
                    manifest_list: list.clone(),
                    dest: dest.clone(),
                    compression: compression.unwrap_or_default(),
                    compression_level,
                    sign_simple: signer.as_ref().is_some_and(|s| s.wants_simple()),
                    sign_sigstore: signer.as_ref().is_some_and(|s| s.wants_sigstore()),
                })
                .await?
                .into_inner();
            match &signer {
                Some(signer) => {
                    super::sign::follow(
                        client,
                        signer,
                        stream,
                        |r| (r.result, r.sign_request),
                        &dest,
                    )
                    .await?
                }
                None => print_stream(stream, |r| r.result).await?,
            }
            println!("Push manifest list {list} succeed");
        }
    }
    Ok(())
}

/// The list's JSON indented by four spaces, as isula-build shows it.
fn indent4(data: &[u8]) -> Result<String> {
    use serde::Serialize;
    let value: serde_json::Value =
        serde_json::from_slice(data).context("the daemon sent a manifest list that is not JSON")?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"    "),
    );
    value.serialize(&mut ser)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn inspect_indents_by_four() {
        let s = super::indent4(br#"{"a":[1],"b":{}}"#).expect("json");
        assert_eq!(s, "{\n    \"a\": [\n        1\n    ],\n    \"b\": {}\n}");
    }
}
