//! dpkg's database: `/var/lib/dpkg/status` (one paragraph per package, `Status: install ok
//! installed` for those installed), the `status.d/` directory distroless images keep
//! instead (one file per package, no `Status`), and the file lists
//! (`info/<package>[:<arch>].list`, or distroless's `status.d/<package>.md5sums`).
//! Read line by line: a paragraph at a time is in memory, never the file.

use crate::{AttestError, Package, Result};
use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

/// A line longer than this is not a dpkg database's.
const LINE_MAX: usize = 1 << 20;

/// Reads the lines of `r` into `line`, refusing one longer than [`LINE_MAX`]. Returns
/// false at the end.
pub(crate) fn next_line<R: BufRead>(r: &mut R, line: &mut String, path: &Path) -> Result<bool> {
    line.clear();
    let mut limited = std::io::Read::take(&mut *r, LINE_MAX as u64 + 1);
    let n = limited
        .read_line(line)
        .map_err(|e| AttestError::io("read", path, e))?;
    if n > LINE_MAX {
        return Err(AttestError::bad_db(
            path,
            format!("a line is longer than {LINE_MAX} bytes"),
        ));
    }
    Ok(n > 0)
}

/// Whether a `Status` value says the package is on disk (dpkg-query lists it).
fn installed(status: &str) -> bool {
    let state = status.split_whitespace().nth(2).unwrap_or("");
    !matches!(state, "" | "not-installed" | "config-files")
}

/// One paragraph's fields that make a package.
#[derive(Default)]
struct Para {
    package: Option<String>,
    version: Option<String>,
    arch: Option<String>,
    source: Option<String>,
    maintainer: Option<String>,
    status: Option<String>,
}

impl Para {
    fn finish(self, require_status: bool, out: &mut Vec<Package>) {
        let Para {
            package: Some(name),
            version,
            arch,
            source,
            maintainer,
            status,
        } = self
        else {
            return;
        };
        match status {
            Some(s) if !installed(&s) => return,
            None if require_status => return,
            _ => {}
        }
        // `Source: name (version)` names the source package and its version.
        let source = source.map(|s| s.split_whitespace().next().unwrap_or("").to_string());
        out.push(Package {
            name,
            version: version.unwrap_or_default(),
            arch: arch.unwrap_or_default(),
            license: None,
            source: source.filter(|s| !s.is_empty()),
            supplier: maintainer,
            epoch: None,
        });
    }
}

/// Adds the installed packages of a status file (`require_status`: a paragraph without a
/// `Status` field is left out, as dpkg does in `status`; distroless's `status.d/` files
/// have none and are all installed).
pub fn parse_status<R: BufRead>(
    mut r: R,
    path: &Path,
    require_status: bool,
    out: &mut Vec<Package>,
) -> Result<()> {
    let mut line = String::new();
    let mut para = Para::default();
    let mut any = false;
    while next_line(&mut r, &mut line, path)? {
        let l = line.trim_end_matches(['\n', '\r']);
        if l.trim().is_empty() {
            if any {
                std::mem::take(&mut para).finish(require_status, out);
                any = false;
            }
            continue;
        }
        if l.starts_with([' ', '\t']) {
            // A continuation (Description, Conffiles): nothing we keep.
            continue;
        }
        let Some((key, value)) = l.split_once(':') else {
            return Err(AttestError::bad_db(
                path,
                format!("line {l:?} is no \"Field: value\""),
            ));
        };
        any = true;
        let value = value.trim().to_string();
        match key.to_ascii_lowercase().as_str() {
            "package" => para.package = Some(value),
            "version" => para.version = Some(value),
            "architecture" => para.arch = Some(value),
            "source" => para.source = Some(value),
            "maintainer" => para.maintainer = Some(value),
            "status" => para.status = Some(value),
            _ => {}
        }
    }
    if any {
        para.finish(require_status, out);
    }
    Ok(())
}

/// Adds the paths of a `.list` file (one absolute path a line; `/.` is the root).
pub fn parse_list<R: BufRead>(mut r: R, path: &Path, owned: &mut HashSet<String>) -> Result<()> {
    let mut line = String::new();
    while next_line(&mut r, &mut line, path)? {
        let p = line.trim_end_matches(['\n', '\r']);
        if p.starts_with('/') && p != "/." {
            crate::own(owned, p.trim_end_matches('/').to_string())
                .map_err(|e| AttestError::bad_db(path, e))?;
        }
    }
    Ok(())
}

/// Adds the paths of an `.md5sums` file (`<md5>  <path relative to />`).
pub fn parse_md5sums<R: BufRead>(mut r: R, path: &Path, owned: &mut HashSet<String>) -> Result<()> {
    let mut line = String::new();
    while next_line(&mut r, &mut line, path)? {
        let l = line.trim_end_matches(['\n', '\r']);
        if let Some((_, p)) = l.split_once("  ") {
            crate::own(owned, format!("/{}", p.trim_start_matches('/')))
                .map_err(|e| AttestError::bad_db(path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: base-files
Status: install ok installed
Priority: required
Architecture: amd64
Version: 12.4+deb12u5
Description: Debian base system miscellaneous files
 This package contains the basic filesystem hierarchy.

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Source: glibc (2.36-9+deb12u4)
Version: 2.36-9+deb12u4
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab

Package: removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
";

    #[test]
    fn status_lists_installed_packages() {
        let mut out = Vec::new();
        parse_status(STATUS.as_bytes(), Path::new("status"), true, &mut out).expect("parse");
        let names: Vec<_> = out
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(
            names,
            [("base-files", "12.4+deb12u5"), ("libc6", "2.36-9+deb12u4")]
        );
        assert_eq!(out[1].source.as_deref(), Some("glibc"));
        assert_eq!(out[1].arch, "amd64");
    }

    #[test]
    fn distroless_paragraphs_have_no_status() {
        let mut out = Vec::new();
        let text = "Package: tzdata\nVersion: 2024a-0+deb12u1\nArchitecture: all\n";
        parse_status(text.as_bytes(), Path::new("s"), false, &mut out).expect("parse");
        assert_eq!(out.len(), 1);
        // The same paragraph in `status` (where dpkg always writes Status) is not listed.
        let mut strict = Vec::new();
        parse_status(text.as_bytes(), Path::new("s"), true, &mut strict).expect("parse");
        assert!(strict.is_empty());
    }

    #[test]
    fn bad_lines_are_named() {
        let mut out = Vec::new();
        let err = parse_status(
            "Package: a\nnonsense\n".as_bytes(),
            Path::new("/var/lib/dpkg/status"),
            true,
            &mut out,
        )
        .expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("/var/lib/dpkg/status") && msg.contains("nonsense"),
            "{msg}"
        );
        let long = format!("Package: {}\n", "a".repeat(LINE_MAX + 10));
        assert!(parse_status(long.as_bytes(), Path::new("s"), true, &mut out).is_err());
    }

    #[test]
    fn file_lists() {
        let mut owned = HashSet::new();
        parse_list("/.\n/bin\n/bin/ls\n".as_bytes(), Path::new("l"), &mut owned).expect("list");
        parse_md5sums(
            "d41d8cd98f00b204e9800998ecf8427e  usr/share/zoneinfo/UTC\n".as_bytes(),
            Path::new("m"),
            &mut owned,
        )
        .expect("md5sums");
        assert!(owned.contains("/bin/ls") && owned.contains("/usr/share/zoneinfo/UTC"));
        assert!(!owned.contains("/."));
    }
}
