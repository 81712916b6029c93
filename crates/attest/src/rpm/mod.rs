//! rpm's database in its three formats (sqlite `rpmdb.sqlite`, Berkeley DB hash
//! `Packages`, ndb `Packages.db`), each a store of header blobs, one per installed
//! package; and the header blob format itself (an index of tags over a data area), parsed
//! here with bounds checks on every offset. Each reader hands one header at a time to its
//! caller: a database of hundreds of megabytes is never in memory.

pub mod bdb;
pub mod ndb;
pub mod sqlite;

use crate::{AttestError, Package, Result};
use std::collections::HashSet;
use std::path::Path;

/// The largest header blob accepted (rpm's own limit on a header's data is 256 MiB; no
/// real header is near it).
pub const HEADER_MAX: usize = 64 << 20;

const TAG_NAME: u32 = 1000;
const TAG_VERSION: u32 = 1001;
const TAG_RELEASE: u32 = 1002;
const TAG_EPOCH: u32 = 1003;
const TAG_VENDOR: u32 = 1011;
const TAG_LICENSE: u32 = 1014;
const TAG_ARCH: u32 = 1022;
const TAG_OLDFILENAMES: u32 = 1027;
const TAG_SOURCERPM: u32 = 1044;
const TAG_DIRINDEXES: u32 = 1116;
const TAG_BASENAMES: u32 = 1117;
const TAG_DIRNAMES: u32 = 1118;

const TYPE_INT32: u32 = 4;
const TYPE_STRING: u32 = 6;
const TYPE_STRING_ARRAY: u32 = 8;
const TYPE_I18NSTRING: u32 = 9;

/// A parsed header blob: its index entries over its data area.
pub struct Header<'a> {
    entries: Vec<(u32, u32, u32, u32)>,
    data: &'a [u8],
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'a> Header<'a> {
    /// Parses a header blob as the databases keep it (no lead, no magic: the index
    /// length, the data length, the index, the data).
    pub fn parse(blob: &'a [u8]) -> std::result::Result<Header<'a>, String> {
        let il = be32(blob, 0).ok_or("shorter than 8 bytes")? as usize;
        let dl = be32(blob, 4).ok_or("shorter than 8 bytes")? as usize;
        if il == 0 || il > 0xffff {
            return Err(format!("{il} index entries"));
        }
        if dl > HEADER_MAX {
            return Err(format!("{dl} bytes of data"));
        }
        let data_at = 8 + il * 16;
        if blob.len() < data_at + dl {
            return Err(format!(
                "{} bytes, the header says {}",
                blob.len(),
                data_at + dl
            ));
        }
        let mut entries = Vec::with_capacity(il);
        for i in 0..il {
            let at = 8 + i * 16;
            let (Some(tag), Some(ty), Some(off), Some(count)) = (
                be32(blob, at),
                be32(blob, at + 4),
                be32(blob, at + 8),
                be32(blob, at + 12),
            ) else {
                return Err("truncated index".into());
            };
            entries.push((tag, ty, off, count));
        }
        Ok(Header {
            entries,
            data: &blob[data_at..data_at + dl],
        })
    }

    fn entry(&self, tag: u32) -> Option<(u32, usize, usize)> {
        self.entries
            .iter()
            .find(|e| e.0 == tag)
            .map(|e| (e.1, e.2 as usize, e.3 as usize))
    }

    /// The strings at `off` (`count` of them, NUL-terminated).
    fn strings_at(&self, off: usize, count: usize) -> std::result::Result<Vec<String>, String> {
        let mut out = Vec::with_capacity(count.min(1 << 16));
        let mut at = off;
        for _ in 0..count {
            let rest = self.data.get(at..).ok_or("a string past the data")?;
            let end = rest
                .iter()
                .position(|b| *b == 0)
                .ok_or("a string without its end")?;
            out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            at += end + 1;
        }
        Ok(out)
    }

    /// A string tag (the first of an array or an i18n string).
    pub fn string(&self, tag: u32) -> std::result::Result<Option<String>, String> {
        match self.entry(tag) {
            None => Ok(None),
            Some((TYPE_STRING | TYPE_STRING_ARRAY | TYPE_I18NSTRING, off, _)) => {
                Ok(self.strings_at(off, 1)?.pop())
            }
            Some((ty, ..)) => Err(format!("tag {tag} is of type {ty}, not a string")),
        }
    }

    pub fn strings(&self, tag: u32) -> std::result::Result<Vec<String>, String> {
        match self.entry(tag) {
            None => Ok(Vec::new()),
            Some((TYPE_STRING_ARRAY | TYPE_STRING | TYPE_I18NSTRING, off, count)) => {
                if count > self.data.len() || count > STRINGS_MAX {
                    return Err(format!(
                        "tag {tag} has {count} strings (the limit is {STRINGS_MAX})"
                    ));
                }
                self.strings_at(off, count)
            }
            Some((ty, ..)) => Err(format!("tag {tag} is of type {ty}, not strings")),
        }
    }

    pub fn int32s(&self, tag: u32) -> std::result::Result<Vec<u32>, String> {
        match self.entry(tag) {
            None => Ok(Vec::new()),
            Some((TYPE_INT32, off, count)) => {
                let bytes = count.checked_mul(4).ok_or("too many integers")?;
                let s = self
                    .data
                    .get(off..off.saturating_add(bytes))
                    .ok_or_else(|| format!("tag {tag} runs past the data"))?;
                Ok(s.chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            }
            Some((ty, ..)) => Err(format!("tag {tag} is of type {ty}, not int32")),
        }
    }
}

/// The most strings one tag of a header may hold (a package of a million files is far
/// beyond any real one; each string costs its allocation, whatever its length).
const STRINGS_MAX: usize = 1 << 20;

/// The package a header describes, adding the files it owns to `owned`. None: a
/// `gpg-pubkey` pseudo-package (an imported key, not software).
pub fn package_of(
    blob: &[u8],
    owned: &mut HashSet<String>,
) -> std::result::Result<Option<Package>, String> {
    let h = Header::parse(blob)?;
    let name = h.string(TAG_NAME)?.ok_or("no NAME")?;
    if name == "gpg-pubkey" {
        return Ok(None);
    }
    let version = h.string(TAG_VERSION)?.unwrap_or_default();
    let release = h.string(TAG_RELEASE)?.unwrap_or_default();
    let epoch = h.int32s(TAG_EPOCH)?.first().copied();
    let mut evr = match epoch {
        Some(e) => format!("{e}:{version}"),
        None => version,
    };
    if !release.is_empty() {
        evr.push('-');
        evr.push_str(&release);
    }
    let dirs = h.strings(TAG_DIRNAMES)?;
    let bases = h.strings(TAG_BASENAMES)?;
    let idx = h.int32s(TAG_DIRINDEXES)?;
    if bases.len() != idx.len() {
        return Err(format!(
            "{} BASENAMES, {} DIRINDEXES",
            bases.len(),
            idx.len()
        ));
    }
    for (b, i) in bases.iter().zip(&idx) {
        let d = dirs
            .get(*i as usize)
            .ok_or_else(|| format!("DIRINDEXES names directory {i} of {}", dirs.len()))?;
        // Measured before it is made: a long directory name named by every file.
        if d.len() + b.len() > crate::OWNED_PATH_MAX {
            return Err(format!(
                "{name}: a file path of {} bytes, over the limit of {}",
                d.len() + b.len(),
                crate::OWNED_PATH_MAX
            ));
        }
        crate::own(owned, format!("{d}{b}").trim_end_matches('/').to_string())
            .map_err(|e| format!("{name}: {e}"))?;
    }
    for f in h.strings(TAG_OLDFILENAMES)? {
        crate::own(owned, f.trim_end_matches('/').to_string())
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(Some(Package {
        name,
        version: evr,
        arch: h.string(TAG_ARCH)?.unwrap_or_default(),
        license: h.string(TAG_LICENSE)?.filter(|l| !l.is_empty()),
        source: h.string(TAG_SOURCERPM)?.filter(|l| !l.is_empty()),
        supplier: h.string(TAG_VENDOR)?.filter(|l| !l.is_empty()),
        epoch,
    }))
}

/// Adds the packages of the headers `each` hands over (`db`: the database, for messages).
pub fn collect(
    db: &Path,
    each: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    out: &mut Vec<Package>,
    owned: &mut HashSet<String>,
) -> Result<()> {
    each(&mut |blob: &[u8]| {
        if let Some(p) = package_of(blob, owned)
            .map_err(|e| AttestError::bad_db(db, format!("a package header: {e}")))?
        {
            out.push(p);
        }
        Ok(())
    })
}

/// Test fixtures: header blobs made by our own writer (the parser's counterpart), for the
/// formats no tool on this machine writes.
#[cfg(test)]
pub(crate) mod fixture {
    /// A header blob with these string tags (and EPOCH when given), files under `/usr/bin`.
    pub fn header(name: &str, version: &str, release: &str, epoch: Option<u32>) -> Vec<u8> {
        let mut index: Vec<[u32; 4]> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let mut string = |tag: u32, ty: u32, values: &[&str], index: &mut Vec<[u32; 4]>| {
            index.push([tag, ty, data.len() as u32, values.len() as u32]);
            for v in values {
                data.extend_from_slice(v.as_bytes());
                data.push(0);
            }
        };
        string(1000, 6, &[name], &mut index);
        string(1001, 6, &[version], &mut index);
        string(1002, 6, &[release], &mut index);
        string(1022, 6, &["x86_64"], &mut index);
        string(1014, 6, &["MIT"], &mut index);
        string(1118, 8, &["/usr/bin/"], &mut index);
        string(1117, 8, &[name], &mut index);
        while data.len() & 3 != 0 {
            data.push(0);
        }
        index.push([1116, 4, data.len() as u32, 1]);
        data.extend_from_slice(&0u32.to_be_bytes());
        if let Some(e) = epoch {
            index.push([1003, 4, data.len() as u32, 1]);
            data.extend_from_slice(&e.to_be_bytes());
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&(index.len() as u32).to_be_bytes());
        blob.extend_from_slice(&(data.len() as u32).to_be_bytes());
        for e in &index {
            for v in e {
                blob.extend_from_slice(&v.to_be_bytes());
            }
        }
        blob.extend_from_slice(&data);
        blob
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_gives_package_and_files() {
        let blob = fixture::header("hello", "2.12", "1.oe2203", Some(3));
        let mut owned = HashSet::new();
        let p = package_of(&blob, &mut owned)
            .expect("parse")
            .expect("a package");
        assert_eq!(p.name, "hello");
        assert_eq!(p.version, "3:2.12-1.oe2203");
        assert_eq!(p.arch, "x86_64");
        assert_eq!(p.license.as_deref(), Some("MIT"));
        assert!(owned.contains("/usr/bin/hello"));
    }

    #[test]
    fn damaged_headers_are_refused() {
        let blob = fixture::header("hello", "1", "1", None);
        let mut owned = HashSet::new();
        for cut in [0, 4, 8, 20, blob.len() - 1] {
            assert!(
                package_of(&blob[..cut], &mut owned).is_err(),
                "cut at {cut}"
            );
        }
        // An offset past the data.
        let mut bad = blob.clone();
        bad[8 + 8..8 + 12].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(package_of(&bad, &mut owned).is_err());
        // A huge index count.
        let mut bad = blob;
        bad[0..4].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
        assert!(package_of(&bad, &mut owned).is_err());
    }
}
