//! `ctr-img save IMAGE... -o FILE [-f docker|oci]`, and separated images:
//! `ctr-img save -b BASE [-l LIB] [-r RENAME] [-d DEST] APP...` (isula-build's checks, in
//! its order; the daemon does the file work).

use super::{op_id, Client};
use crate::output::print_events;
use anyhow::{bail, Result};
use isula_api::v1::{SaveRequest, SeparatorSave};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to save, by name or ID (separated: the app images, by name)
    pub images: Vec<String>,
    /// Path of the archive to write (must not exist)
    #[arg(short = 'o', long = "output")]
    pub output: Option<String>,
    /// Archive format: docker (docker-archive) or oci (oci-archive, one image)
    #[arg(short = 'f', long = "format", default_value = "docker", value_parser = ["docker", "oci"])]
    pub format: String,
    /// Separated images: the base image (one layer) the apps are built on
    #[arg(short = 'b', long = "base")]
    pub base: Option<String>,
    /// Separated images: the lib image between base and apps
    #[arg(short = 'l', long = "lib")]
    pub lib: Option<String>,
    /// Separated images: a JSON file renaming the tarballs ([{"name": ..., "rename": ...}])
    #[arg(short = 'r', long = "rename")]
    pub rename: Option<String>,
    /// Separated images: the directory to create for them (default ./Images)
    #[arg(short = 'd', long = "dest")]
    pub dest: Option<String>,
    /// The platform to save (os/arch[/variant]): a manifest list's image for it, or a check
    /// that each image is for it
    #[arg(long = "platform")]
    pub platform: Option<String>,
}

fn given(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or_default()
}

/// A docker reference usable as a separated image's name (no digest).
fn valid_name(name: &str) -> bool {
    !name.contains('@') && isula_types::Reference::parse(name).is_ok()
}

/// The request for `args`, after the checks isula-build makes before calling the daemon.
fn request(args: &Args) -> Result<SaveRequest> {
    if args.images.is_empty() {
        bail!("save accepts at least one image");
    }
    let output = given(&args.output);
    if output.contains(':') || given(&args.dest).contains(':') {
        bail!("colon in path {output:?} is not supported");
    }
    let separated = [&args.base, &args.lib, &args.rename, &args.dest]
        .iter()
        .any(|v| !given(v).is_empty());
    if separated {
        if !output.is_empty() {
            bail!("conflict flags between -o and [-b -l -r -d]");
        }
        let base = given(&args.base);
        if base.is_empty() {
            bail!("base image name(-b) must be provided");
        }
        if !valid_name(base) {
            bail!("invalid base image name {base}");
        }
        let lib = given(&args.lib);
        if !lib.is_empty() {
            if lib == base {
                bail!("base and lib images are the same");
            }
            if !valid_name(lib) {
                bail!("invalid lib image name {lib}");
            }
        }
        let dest = match given(&args.dest) {
            "" => "Images",
            d => d,
        };
        let dest = crate::absolute(dest)?;
        match std::fs::symlink_metadata(&dest) {
            Ok(_) => bail!(
                "dest path already exist: {:?}, try to remove or rename it",
                dest.display().to_string()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("check dest path failed: {e}"),
        }
        let rename = match given(&args.rename) {
            "" => String::new(),
            r => crate::absolute(r)?.display().to_string(),
        };
        return Ok(SaveRequest {
            save_id: op_id(),
            images: args.images.clone(),
            path: String::new(),
            format: "docker".into(),
            sep: Some(SeparatorSave {
                base: base.to_string(),
                lib: lib.to_string(),
                rename,
                dest: dest.display().to_string(),
                enabled: true,
            }),
            progress: crate::progress::wanted(),
            platform: String::new(),
        });
    }
    if output.is_empty() {
        bail!("output path(-o) should not be empty");
    }
    if args.format == "oci" && args.images.len() > 1 {
        bail!("oci image format now only supports saving single image");
    }
    let path = crate::absolute(output)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        bail!(
            "output file already exist: {:?}, try to remove existing tarball or rename output file",
            path.display().to_string()
        );
    }
    Ok(SaveRequest {
        save_id: op_id(),
        images: args.images.clone(),
        path: path.display().to_string(),
        format: args.format.clone(),
        sep: None,
        progress: crate::progress::wanted(),
        platform: given(&args.platform).to_string(),
    })
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let mut req = request(&args)?;
    // A remote daemon writes for this client; the files are fetched when it is done.
    let mut outputs = super::remote_files::Outputs::default();
    if super::remote_files::is_remote() {
        if !req.path.is_empty() {
            req.path = outputs.file(std::path::Path::new(&req.path));
        }
        if let Some(sep) = req.sep.as_mut() {
            sep.dest = outputs.dir(std::path::Path::new(&sep.dest));
            if !sep.rename.is_empty() {
                sep.rename =
                    super::remote_files::upload_file(client, std::path::Path::new(&sep.rename))
                        .await?;
            }
        }
    }
    let live = req.progress;
    let stream = client.save(req).await?.into_inner();
    print_events(stream, |r| (r.log, r.progress), live)
        .await
        .map_err(|e| {
            if outputs.is_empty() {
                e
            } else {
                // Named by the user's paths, not the daemon's places for them.
                anyhow::anyhow!(outputs.explain(&format!("{e:#}")))
            }
        })?;
    outputs.fetch(client).await?;
    // As isula-build prints it: the names as given, in Go's list format.
    println!("Save success with image: [{}]", args.images.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(images: &[&str], flags: &[(&str, &str)]) -> Args {
        let get = |k: &str| {
            flags
                .iter()
                .find(|(f, _)| *f == k)
                .map(|(_, v)| v.to_string())
        };
        Args {
            images: images.iter().map(|s| s.to_string()).collect(),
            output: get("o"),
            format: get("f").unwrap_or_else(|| "docker".into()),
            base: get("b"),
            lib: get("l"),
            rename: get("r"),
            dest: get("d"),
            platform: get("platform"),
        }
    }

    fn err(a: Args) -> String {
        request(&a).expect_err("refused").to_string()
    }

    #[test]
    fn separated_checks_in_isula_builds_order() {
        assert_eq!(
            err(args(&[], &[("b", "x")])),
            "save accepts at least one image"
        );
        assert_eq!(
            err(args(&["a"], &[("d", "x:y"), ("b", "b")])),
            "colon in path \"\" is not supported"
        );
        assert_eq!(
            err(args(&["a"], &[("o", "/tmp/o.tar"), ("b", "b")])),
            "conflict flags between -o and [-b -l -r -d]"
        );
        assert_eq!(
            err(args(&["a"], &[("l", "lib")])),
            "base image name(-b) must be provided"
        );
        assert_eq!(
            err(args(&["a"], &[("b", "in:valid:base:name")])),
            "invalid base image name in:valid:base:name"
        );
        assert_eq!(
            err(args(&["a"], &[("b", "same"), ("l", "same")])),
            "base and lib images are the same"
        );
        assert_eq!(
            err(args(&["a"], &[("b", "b"), ("l", "in:valid:lib")])),
            "invalid lib image name in:valid:lib"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display().to_string();
        assert!(err(args(&["a"], &[("b", "b"), ("d", &d)])).starts_with("dest path already exist"));
        let fresh = dir.path().join("out").display().to_string();
        let r = request(&args(&["a"], &[("b", "b"), ("d", &fresh)])).expect("ok");
        let sep = r.sep.expect("separated");
        assert!(sep.enabled && sep.dest == fresh && sep.lib.is_empty());
        assert_eq!(r.format, "docker");
    }

    #[test]
    fn archive_checks() {
        assert_eq!(
            err(args(&["a"], &[])),
            "output path(-o) should not be empty"
        );
        assert_eq!(
            err(args(&["a", "b"], &[("o", "/tmp/x.tar"), ("f", "oci")])),
            "oci image format now only supports saving single image"
        );
    }
}
