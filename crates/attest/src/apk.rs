//! apk's database, `/lib/apk/db/installed`: one paragraph per package of `X:value` lines
//! (`P` name, `V` version, `A` architecture, `L` license, `o` origin, `m` maintainer), with
//! its files as `F:` (a directory) followed by `R:` (a file in it). Read line by line.

use crate::dpkg::next_line;
use crate::{AttestError, Package, Result};
use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

/// Adds the packages of an `installed` file, and the files they own.
pub fn parse_installed<R: BufRead>(
    mut r: R,
    path: &Path,
    out: &mut Vec<Package>,
    owned: &mut HashSet<String>,
) -> Result<()> {
    let mut line = String::new();
    let mut cur = Package::default();
    let mut dir = String::new();
    let finish = |cur: &mut Package, out: &mut Vec<Package>| {
        let p = std::mem::take(cur);
        if !p.name.is_empty() {
            out.push(p);
        }
    };
    while next_line(&mut r, &mut line, path)? {
        let l = line.trim_end_matches(['\n', '\r']);
        if l.is_empty() {
            finish(&mut cur, out);
            dir.clear();
            continue;
        }
        let Some((key, value)) = l.split_once(':') else {
            return Err(AttestError::bad_db(
                path,
                format!("line {l:?} is no \"X:value\""),
            ));
        };
        if key.len() != 1 {
            return Err(AttestError::bad_db(
                path,
                format!("line {l:?}: a field is one letter"),
            ));
        }
        let value = value.to_string();
        match key {
            "P" => cur.name = value,
            "V" => cur.version = value,
            "A" => cur.arch = value,
            "L" => cur.license = Some(value).filter(|v| !v.is_empty()),
            "o" => cur.source = Some(value).filter(|v| !v.is_empty()),
            "m" => cur.supplier = Some(value).filter(|v| !v.is_empty()),
            "F" => {
                dir = value;
                crate::own(owned, format!("/{}", dir.trim_matches('/')))
                    .map_err(|e| AttestError::bad_db(path, e))?;
            }
            "R" => {
                let d = dir.trim_matches('/');
                let file = if d.is_empty() {
                    format!("/{value}")
                } else {
                    format!("/{d}/{value}")
                };
                crate::own(owned, file).map_err(|e| AttestError::bad_db(path, e))?;
            }
            _ => {}
        }
    }
    finish(&mut cur, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by hand after an Alpine 3.19 image's database (no apk tool here to make one).
    const INSTALLED: &str = "C:Q1abc=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:407278
I:663552
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT
o:musl
m:Timo Teräs <timo.teras@iki.fi>
t:1705508946
F:lib
R:ld-musl-x86_64.so.1
a:0:0:755
Z:Q1abc=
R:libc.musl-x86_64.so.1

C:Q1def=
P:busybox
V:1.36.1-r15
A:x86_64
L:GPL-2.0-only
o:busybox
F:bin
R:busybox
F:etc
R:securetty
";

    #[test]
    fn packages_and_files() {
        let mut out = Vec::new();
        let mut owned = HashSet::new();
        parse_installed(
            INSTALLED.as_bytes(),
            Path::new("installed"),
            &mut out,
            &mut owned,
        )
        .expect("parse");
        let got: Vec<_> = out
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str(), p.license.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("musl", "1.2.4_git20230717-r4", Some("MIT")),
                ("busybox", "1.36.1-r15", Some("GPL-2.0-only"))
            ]
        );
        for f in [
            "/lib/ld-musl-x86_64.so.1",
            "/bin/busybox",
            "/etc/securetty",
            "/lib",
        ] {
            assert!(owned.contains(f), "{f}");
        }
    }

    #[test]
    fn bad_lines_are_named() {
        let err = parse_installed(
            "P:a\nwhat\n".as_bytes(),
            Path::new("/lib/apk/db/installed"),
            &mut Vec::new(),
            &mut HashSet::new(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("what"), "{err}");
    }
}
