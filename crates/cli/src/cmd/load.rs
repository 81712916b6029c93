//! `ctr-img load -i FILE`: images from a docker-archive or oci-archive; and separated
//! images: `ctr-img load -i APP -d DIR [-b BASE] [-l LIB] [--no-check]` (isula-build's
//! checks, in its order, before the daemon is called).

use super::{op_id, Client};
use crate::output::print_events;
use anyhow::{bail, Result};
use isula_api::v1::{LoadRequest, SeparatorLoad};

/// The largest base or lib tarball accepted (isula-build's limit).
const TARBALL_MAX: u64 = 50 << 30;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path of the archive to load (separated images: the app image's name)
    #[arg(short = 'i', long = "input")]
    pub input: Option<String>,
    /// Separated images: the directory holding them and their manifest
    #[arg(short = 'd', long = "dir")]
    pub dir: Option<String>,
    /// Separated images: a base tarball to use instead of the directory's
    #[arg(short = 'b', long = "base")]
    pub base: Option<String>,
    /// Separated images: a lib tarball to use instead of the directory's
    #[arg(short = 'l', long = "lib")]
    pub lib: Option<String>,
    /// Separated images: skip the tarballs' checksum check
    #[arg(long = "no-check")]
    pub no_check: bool,
}

/// A base or lib tarball named by the client: absolute, a regular non-empty file.
fn tarball(which: &str, p: &str) -> Result<String> {
    let path = crate::absolute(p)?;
    let check = || -> Result<()> {
        let m = std::fs::metadata(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if !m.is_file() {
            bail!("file {name} is not a regular file");
        }
        if m.len() == 0 {
            bail!("file {name} is empty");
        }
        if m.len() > TARBALL_MAX {
            bail!("file {name} is over 50 GiB");
        }
        Ok(())
    };
    check().map_err(|e| anyhow::anyhow!("resolve {which} tarball path failed: {e}"))?;
    Ok(path.display().to_string())
}

fn request(args: &Args) -> Result<LoadRequest> {
    let get = |v: &Option<String>| v.clone().unwrap_or_default();
    let (input, dir, base, lib) = (
        get(&args.input),
        get(&args.dir),
        get(&args.base),
        get(&args.lib),
    );
    let fail = |m: String| anyhow::anyhow!("check load options failed: {m}");
    if dir.is_empty() && base.is_empty() && lib.is_empty() {
        if input.is_empty() {
            return Err(fail("tarball path should not be empty".into()));
        }
        let path = crate::absolute(&input)?;
        std::fs::metadata(&path).map_err(|e| fail(format!("stat {}: {e}", path.display())))?;
        return Ok(LoadRequest {
            path: path.display().to_string(),
            load_id: op_id(),
            sep: None,
            progress: crate::progress::wanted(),
        });
    }
    if input.is_empty() {
        return Err(fail("app image name(-i) should not be empty".into()));
    }
    if dir.is_empty() {
        return Err(fail("image tarball directory should not be empty".into()));
    }
    if !base.is_empty() && base == lib {
        return Err(fail("base and lib tarballs are the same".into()));
    }
    if isula_types::Reference::parse(&input).is_err() {
        return Err(fail(format!("invalid image name: {input}")));
    }
    let base = match base.as_str() {
        "" => String::new(),
        b => tarball("base", b).map_err(|e| fail(e.to_string()))?,
    };
    let lib = match lib.as_str() {
        "" => String::new(),
        l => tarball("lib", l).map_err(|e| fail(e.to_string()))?,
    };
    let dir = crate::absolute(&dir)?;
    if !dir.exists() {
        return Err(fail(format!(
            "image tarball directory {:?} is not exist",
            dir.display().to_string()
        )));
    }
    Ok(LoadRequest {
        path: input.clone(),
        load_id: op_id(),
        sep: Some(SeparatorLoad {
            app: input,
            dir: dir.display().to_string(),
            base,
            lib,
            skip_check: args.no_check,
            enabled: true,
        }),
        progress: crate::progress::wanted(),
    })
}

pub async fn run(client: &mut Client, args: Args) -> Result<()> {
    let mut req = request(&args)?;
    // A remote daemon reads what this client sends it first.
    if super::remote_files::is_remote() {
        use super::remote_files::{upload_dir, upload_file};
        use std::path::Path;
        match req.sep.as_mut() {
            None => req.path = upload_file(client, Path::new(&req.path)).await?,
            Some(sep) => {
                sep.dir = upload_dir(client, Path::new(&sep.dir)).await?;
                if !sep.base.is_empty() {
                    sep.base = upload_file(client, Path::new(&sep.base)).await?;
                }
                if !sep.lib.is_empty() {
                    sep.lib = upload_file(client, Path::new(&sep.lib)).await?;
                }
            }
        }
    }
    let live = req.progress;
    let stream = client.load(req).await?.into_inner();
    print_events(stream, |r| (r.log, r.progress), live).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(i: &str, d: &str, b: &str, l: &str) -> Args {
        let o = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Args {
            input: o(i),
            dir: o(d),
            base: o(b),
            lib: o(l),
            no_check: false,
        }
    }

    fn err(a: Args) -> String {
        request(&a).expect_err("refused").to_string()
    }

    #[test]
    fn separated_checks_in_isula_builds_order() {
        let p = "check load options failed: ";
        assert_eq!(
            err(args("", "d", "", "")),
            format!("{p}app image name(-i) should not be empty")
        );
        assert_eq!(
            err(args("app1", "", "b.tar.gz", "")),
            format!("{p}image tarball directory should not be empty")
        );
        assert_eq!(
            err(args("app1", "d", "x", "x")),
            format!("{p}base and lib tarballs are the same")
        );
        assert_eq!(
            err(args("invalid:app:name", "d", "", "")),
            format!("{p}invalid image name: invalid:app:name")
        );
        let dir = tempfile::tempdir().expect("tmp");
        let empty = dir.path().join("empty.tar.gz");
        std::fs::write(&empty, b"").expect("empty");
        assert_eq!(
            err(args("app1", "d", empty.to_str().expect("p"), "")),
            format!("{p}resolve base tarball path failed: file empty.tar.gz is empty")
        );
        let missing = dir.path().join("nope").display().to_string();
        assert_eq!(
            err(args("app1", &missing, "", "")),
            format!("{p}image tarball directory {missing:?} is not exist")
        );
        let ok = request(&args("app1", dir.path().to_str().expect("p"), "", "")).expect("ok");
        let sep = ok.sep.expect("separated");
        assert!(sep.enabled && sep.app == "app1" && ok.path == "app1");
    }
}
