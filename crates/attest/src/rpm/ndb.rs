//! rpm's ndb database (`Packages.db`, rpm's own format, SUSE's default): a header page
//! (`RpmP` magic, version 0, generation, the number of slot pages), slot pages of 16-byte
//! slots (`Slot` magic, package index, block offset, block count; offset 0 is a free slot),
//! then blobs at `offset * 16`: a 16-byte head (`BlbS` magic, package index, generation,
//! length), the header blob, a tail. All little-endian. Read slot by slot, one blob at a
//! time.

use crate::{AttestError, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const PAGE_SIZE: u64 = 4096;
const SLOT_SIZE: u64 = 16;
const BLK_SIZE: u64 = 16;
const HEADER_SIZE: u64 = 32;
const DB_MAGIC: u32 = u32::from_le_bytes(*b"RpmP");
const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"Slot");
const BLOB_MAGIC: u32 = u32::from_le_bytes(*b"BlbS");
/// More slot pages than this (a million packages) is no real database.
const SLOT_PAGES_MAX: u32 = 1 << 16;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Hands each header of the ndb database at `db` to `each`.
pub fn for_each_header(db: &Path, each: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let f = std::fs::File::open(db).map_err(|e| AttestError::io("open", db, e))?;
    for_each_header_in(f, db, each)
}

/// [`for_each_header`] of an open file (`db` names it in messages).
pub fn for_each_header_in(
    mut f: std::fs::File,
    db: &Path,
    each: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let bad = |reason: String| AttestError::bad_db(db, reason);
    let len = f
        .metadata()
        .map_err(|e| AttestError::io("stat", db, e))?
        .len();
    let mut head = [0u8; HEADER_SIZE as usize];
    f.read_exact(&mut head)
        .map_err(|_| bad("shorter than its header".into()))?;
    if le32(&head, 0) != DB_MAGIC {
        return Err(bad("no RpmP magic: not an ndb database".into()));
    }
    if le32(&head, 4) != 0 {
        return Err(bad(format!("ndb version {} is not 0", le32(&head, 4))));
    }
    let slot_pages = le32(&head, 12);
    if slot_pages == 0 || slot_pages > SLOT_PAGES_MAX {
        return Err(bad(format!("{slot_pages} slot pages")));
    }
    let slots_end = slot_pages as u64 * PAGE_SIZE;
    if slots_end > len {
        return Err(bad("truncated slot pages".into()));
    }
    let mut slots = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in 0..slot_pages as u64 {
        f.seek(SeekFrom::Start(p * PAGE_SIZE))
            .and_then(|_| f.read_exact(&mut page))
            .map_err(|e| AttestError::io("read", db, e))?;
        let first = if p == 0 { HEADER_SIZE } else { 0 };
        for at in (first..PAGE_SIZE).step_by(SLOT_SIZE as usize) {
            let s = &page[at as usize..(at + SLOT_SIZE) as usize];
            if le32(s, 0) != SLOT_MAGIC {
                return Err(bad(format!(
                    "slot at {} has no Slot magic",
                    p * PAGE_SIZE + at
                )));
            }
            let (idx, off, cnt) = (le32(s, 4), le32(s, 8), le32(s, 12));
            if off == 0 {
                continue;
            }
            slots.push((idx, off, cnt));
        }
    }
    // In file order, as the blobs lie.
    slots.sort_by_key(|s| s.1);
    let mut blob = Vec::new();
    for (idx, off, cnt) in slots {
        let start = off as u64 * BLK_SIZE;
        let span = cnt as u64 * BLK_SIZE;
        if start < slots_end || start.saturating_add(span) > len {
            return Err(bad(format!("package {idx}: blob outside the file")));
        }
        let mut bh = [0u8; 16];
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut bh))
            .map_err(|e| AttestError::io("read", db, e))?;
        if le32(&bh, 0) != BLOB_MAGIC || le32(&bh, 4) != idx {
            return Err(bad(format!("package {idx}: bad blob head")));
        }
        let n = le32(&bh, 12) as u64;
        if n > super::HEADER_MAX as u64 || 16 + n > span {
            return Err(bad(format!("package {idx}: blob of {n} bytes")));
        }
        blob.resize(n as usize, 0);
        f.read_exact(&mut blob)
            .map_err(|e| AttestError::io("read", db, e))?;
        each(&blob)?;
    }
    Ok(())
}

/// Writes an ndb database of `headers` (our own writer, for tests: no tool on this machine
/// writes ndb).
#[cfg(test)]
pub(crate) fn write_fixture(path: &Path, headers: &[Vec<u8>]) {
    let mut out = vec![0u8; PAGE_SIZE as usize];
    out[0..4].copy_from_slice(&DB_MAGIC.to_le_bytes());
    out[12..16].copy_from_slice(&1u32.to_le_bytes());
    out[16..20].copy_from_slice(&(headers.len() as u32 + 1).to_le_bytes());
    for at in (HEADER_SIZE..PAGE_SIZE).step_by(SLOT_SIZE as usize) {
        out[at as usize..at as usize + 4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    }
    for (i, h) in headers.iter().enumerate() {
        let off = out.len() as u64 / BLK_SIZE;
        let idx = i as u32 + 1;
        let mut blob = Vec::new();
        blob.extend_from_slice(&BLOB_MAGIC.to_le_bytes());
        blob.extend_from_slice(&idx.to_le_bytes());
        blob.extend_from_slice(&1u32.to_le_bytes());
        blob.extend_from_slice(&(h.len() as u32).to_le_bytes());
        blob.extend_from_slice(h);
        blob.extend_from_slice(&[0u8; 12]);
        while blob.len() as u64 & (BLK_SIZE - 1) != 0 {
            blob.push(0);
        }
        let cnt = blob.len() as u64 / BLK_SIZE;
        let slot = (HEADER_SIZE + i as u64 * SLOT_SIZE) as usize;
        out[slot + 4..slot + 8].copy_from_slice(&idx.to_le_bytes());
        out[slot + 8..slot + 12].copy_from_slice(&(off as u32).to_le_bytes());
        out[slot + 12..slot + 16].copy_from_slice(&(cnt as u32).to_le_bytes());
        out.extend_from_slice(&blob);
    }
    std::fs::write(path, out).expect("write ndb");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpm::fixture::header;

    #[test]
    fn reads_what_the_layout_says() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("Packages.db");
        write_fixture(
            &db,
            &[
                header("zlib", "1.2.13", "1", None),
                header("bash", "5.2", "2", Some(1)),
            ],
        );
        let mut out = Vec::new();
        let mut owned = Default::default();
        crate::rpm::collect(&db, |f| for_each_header(&db, f), &mut out, &mut owned).expect("read");
        let got: Vec<_> = out
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(got, [("zlib", "1.2.13-1"), ("bash", "1:5.2-2")]);
    }

    #[test]
    fn damage_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("Packages.db");
        write_fixture(&db, &[header("zlib", "1.2.13", "1", None)]);
        let good = std::fs::read(&db).expect("read");
        for (what, at, byte) in [
            ("magic", 0usize, b'X'),
            ("slot", 40, b'X'),
            ("blob", 4096, b'X'),
        ] {
            let mut bad = good.clone();
            bad[at] = byte;
            std::fs::write(&db, &bad).expect("w");
            let err = for_each_header(&db, &mut |_| Ok(())).expect_err(what);
            assert!(err.to_string().contains("Packages.db"), "{what}: {err}");
        }
        std::fs::write(&db, &good[..good.len() - 40]).expect("w");
        assert!(for_each_header(&db, &mut |_| Ok(())).is_err(), "truncated");
    }
}
