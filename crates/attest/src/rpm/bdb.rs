//! rpm's Berkeley DB database (`Packages`, a BDB hash: CentOS 7/8, openEuler 20.03, older
//! Fedora). Read page by page without libdb: the metadata page (magic 0x061561, page
//! size, last page), then every hash page's key/data pairs; a data item is the header
//! blob, inline (`H_KEYDATA`) or on a chain of overflow pages (`H_OFFPAGE`). Key 0 is
//! rpm's own counter, not a package. Either byte order (the writer's).

use crate::{AttestError, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const HASH_MAGIC: u32 = 0x061561;
const P_HASH_UNSORTED: u8 = 2;
const P_OVERFLOW: u8 = 7;
const P_HASHMETA: u8 = 8;
const P_HASH: u8 = 13;
const H_KEYDATA: u8 = 1;
const H_OFFPAGE: u8 = 3;
const PAGE_HEADER: usize = 26;
const PAGE_SIZE_MAX: u32 = 64 << 10;

struct Db<'a> {
    f: std::fs::File,
    path: &'a Path,
    page_size: u32,
    last_page: u32,
    big_endian: bool,
    /// Bytes before a page's item offsets (more with page checksums).
    overhead: usize,
}

impl Db<'_> {
    fn u32(&self, b: &[u8], at: usize) -> u32 {
        let a = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn u16(&self, b: &[u8], at: usize) -> u16 {
        let a = [b[at], b[at + 1]];
        if self.big_endian {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }
    }

    fn bad(&self, reason: String) -> AttestError {
        AttestError::bad_db(self.path, reason)
    }

    fn read_page(&mut self, no: u32, buf: &mut [u8]) -> Result<()> {
        if no > self.last_page {
            return Err(self.bad(format!("page {no} past the last page {}", self.last_page)));
        }
        let path = self.path;
        self.f
            .seek(SeekFrom::Start(no as u64 * self.page_size as u64))
            .and_then(|_| self.f.read_exact(buf))
            .map_err(|e| AttestError::io("read", path, e))
    }

    /// The data of an overflow chain starting at page `first`, `len` bytes.
    fn overflow(&mut self, first: u32, len: u32, out: &mut Vec<u8>) -> Result<()> {
        if len as usize > super::HEADER_MAX {
            return Err(self.bad(format!("an item of {len} bytes")));
        }
        out.clear();
        let mut page = vec![0u8; self.page_size as usize];
        let mut no = first;
        let mut hops = 0u32;
        while out.len() < len as usize {
            if no == 0 || hops > self.last_page {
                return Err(self.bad(format!("overflow chain from page {first} ends early")));
            }
            self.read_page(no, &mut page)?;
            if page[25] != P_OVERFLOW {
                return Err(self.bad(format!("page {no} is not an overflow page")));
            }
            let here = self.u16(&page, 22) as usize;
            let data = page
                .get(self.overhead..self.overhead + here)
                .ok_or_else(|| self.bad(format!("overflow page {no} says {here} bytes")))?;
            out.extend_from_slice(data);
            no = self.u32(&page, 16);
            hops += 1;
        }
        out.truncate(len as usize);
        Ok(())
    }
}

/// Hands each header of the Berkeley DB hash database at `db` to `each`.
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
    let mut meta = [0u8; 72];
    f.read_exact(&mut meta)
        .map_err(|_| AttestError::bad_db(db, "shorter than its metadata page"))?;
    let le = u32::from_le_bytes([meta[12], meta[13], meta[14], meta[15]]);
    let be = u32::from_be_bytes([meta[12], meta[13], meta[14], meta[15]]);
    let big_endian = match (le, be) {
        (HASH_MAGIC, _) => false,
        (_, HASH_MAGIC) => true,
        _ => {
            return Err(AttestError::bad_db(
                db,
                "no Berkeley DB hash magic: not a hash database",
            ))
        }
    };
    let mut d = Db {
        f,
        path: db,
        page_size: 0,
        last_page: 0,
        big_endian,
        overhead: PAGE_HEADER,
    };
    if meta[25] != P_HASHMETA {
        return Err(d.bad(format!("page 0 is of type {}, not hash metadata", meta[25])));
    }
    if meta[24] != 0 {
        return Err(d.bad("encrypted".into()));
    }
    d.page_size = d.u32(&meta, 20);
    if !(512..=PAGE_SIZE_MAX).contains(&d.page_size) || !d.page_size.is_power_of_two() {
        return Err(d.bad(format!("page size {}", d.page_size)));
    }
    d.last_page = d.u32(&meta, 32);
    let len =
        d.f.metadata()
            .map_err(|e| AttestError::io("stat", db, e))?
            .len();
    if (d.last_page as u64 + 1) * d.page_size as u64 > len {
        return Err(d.bad(format!(
            "{} pages of {} bytes, the file has {len} bytes",
            d.last_page as u64 + 1,
            d.page_size
        )));
    }
    // Page checksums (metaflags bit 0) take 4 bytes (aligned: 6) after the page header.
    if meta[26] & 1 != 0 {
        d.overhead = 32;
    }
    let ps = d.page_size as usize;
    let mut page = vec![0u8; ps];
    let mut value = Vec::new();
    for no in 1..=d.last_page {
        d.read_page(no, &mut page)?;
        if !matches!(page[25], P_HASH | P_HASH_UNSORTED) {
            continue;
        }
        let entries = d.u16(&page, 20) as usize;
        if d.overhead + entries * 2 > ps {
            return Err(d.bad(format!("page {no} says {entries} items")));
        }
        let offs: Vec<usize> = (0..entries)
            .map(|i| d.u16(&page, d.overhead + i * 2) as usize)
            .collect();
        // An item ends where the one before it (in index order) starts.
        let end = |i: usize| if i == 0 { ps } else { offs[i - 1] };
        for pair in (0..entries.saturating_sub(1)).step_by(2) {
            let (k, v) = (pair, pair + 1);
            let (ks, ke, vs, ve) = (offs[k], end(k), offs[v], end(v));
            if ks >= ke || ke > ps || vs >= ve || ve > ps {
                return Err(d.bad(format!("page {no}: item {k} out of the page")));
            }
            let key = &page[ks..ke];
            // rpm's record 0 (the next instance number) is no package.
            if key[0] == H_KEYDATA && key.len() == 5 && key[1..].iter().all(|b| *b == 0) {
                continue;
            }
            let item = &page[vs..ve];
            match item[0] {
                H_KEYDATA => each(&item[1..])?,
                H_OFFPAGE => {
                    if item.len() < 12 {
                        return Err(d.bad(format!("page {no}: short off-page item")));
                    }
                    let (first, tlen) = (d.u32(item, 4), d.u32(item, 8));
                    d.overflow(first, tlen, &mut value)?;
                    each(&value)?;
                }
                t => return Err(d.bad(format!("page {no}: item of type {t}"))),
            }
        }
    }
    Ok(())
}
