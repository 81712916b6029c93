//! zstd:chunked (containers/storage's layer format): a zstd stream that any decoder reads
//! as the layer's tar, made of many frames so that a reader can fetch one file's content
//! alone. Every non-empty regular file's content is a frame of its own; the tar headers
//! and padding between them are frames too. After the last one come three skippable
//! frames: the table of contents (the "manifest": every entry with its metadata, and for
//! file contents the digest and the frame's offsets), the tar-split stream (the raw tar
//! headers, so the exact tar can be made again from the files), and a 64-byte footer with
//! the positions of both. The same positions and digests go on the layer's descriptor as
//! annotations.
//!
//! The tar is read block by block (headers are kept byte for byte, PAX and GNU long-name
//! records included), so the decompressed stream is exactly the tar that was given.

use base64::Engine as _;
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// The annotation keys a zstd:chunked layer's descriptor carries.
pub const MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
pub const MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
pub const TARSPLIT_CHECKSUM: &str = "io.github.containers.zstd-chunked.tarsplit-checksum";
pub const TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";

const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const FOOTER_MAGIC: u64 = 0x7855_6e49_6c55_4e47; // "GNUlInUx", little-endian
const MANIFEST_TYPE: u64 = 1;
/// A header record (PAX, GNU long name) larger than this is refused.
const RECORD_MAX: u64 = 1 << 20;

struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// CRC-64 with the ISO polynomial, as Go's `hash/crc64` computes it (tar-split's file
/// checksums), by carry-less multiplication where the CPU has it (crc-fast): eight bytes a
/// step from tables cost 0.2 CPU seconds per 430 MB layer, on the thread that feeds the
/// compressors.
struct Crc64(crc_fast::Digest);

impl Crc64 {
    fn new() -> Crc64 {
        Crc64(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64GoIso))
    }
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    fn sum(&self) -> [u8; 8] {
        self.0.finalize().to_be_bytes()
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A numeric tar field: octal, or base-256 when its first byte has the high bit.
fn number(field: &[u8]) -> io::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| bad("a tar number field overflows"))?;
        }
        return Ok(v);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let t = text.trim();
    if t.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(t, 8).map_err(|_| bad(format!("a tar number field reads {t:?}")))
}

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// What PAX and GNU records say of the next entry.
#[derive(Default)]
struct Pending {
    path: Option<String>,
    link: Option<String>,
    size: Option<u64>,
    mtime: Option<i64>,
    uid: Option<u64>,
    gid: Option<u64>,
    uname: Option<String>,
    gname: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn parse_pax(data: &[u8], p: &mut Pending) -> io::Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("a PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l: &usize| l > sp + 1 && l <= rest.len())
            .ok_or_else(|| bad("a PAX record with a bad length"))?;
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("a PAX record without '='"))?;
        let key = String::from_utf8_lossy(&record[..eq]).into_owned();
        let value = &record[eq + 1..];
        let s = || String::from_utf8_lossy(value).into_owned();
        match key.as_str() {
            "path" => p.path = Some(s()),
            "linkpath" => p.link = Some(s()),
            "size" => p.size = s().parse().ok(),
            "uid" => p.uid = s().parse().ok(),
            "gid" => p.gid = s().parse().ok(),
            "uname" => p.uname = Some(s()),
            "gname" => p.gname = Some(s()),
            "mtime" => p.mtime = s().split('.').next().and_then(|t| t.parse().ok()),
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    p.xattrs.insert(name.to_string(), value.to_vec());
                }
            }
        }
    }
    Ok(())
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An entry of the table of contents, its keys in the order containers/storage writes
/// them (typed: a map per entry cost a tenth of a layer's compression time in allocation
/// and hashing, on the thread that reads the tar).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    #[serde(rename = "type")]
    kind: &'static str,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_name: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(rename = "modtime")]
    mod_time: String,
    #[serde(rename = "accesstime")]
    access_time: &'static str,
    #[serde(rename = "changetime")]
    change_time: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_offset: Option<u64>,
}

/// The table of contents.
#[derive(serde::Serialize)]
struct Toc<'a> {
    version: u32,
    entries: &'a [TocEntry],
}

/// A line of the tar-split stream: raw bytes (type 2, base64) or a file's place (type 1,
/// its content's CRC-64 in base64, or null for content kept with the headers).
#[derive(serde::Serialize)]
struct SplitLine<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    payload: Option<String>,
    position: u64,
}

/// Reads `n` bytes (a header record, at most [`RECORD_MAX`]) and its padding.
fn read_record(r: &mut impl Read, n: u64) -> io::Result<(Vec<u8>, Vec<u8>)> {
    if n > RECORD_MAX {
        return Err(bad(format!(
            "a tar header record of {n} bytes is over 1 MiB"
        )));
    }
    let padded = n.div_ceil(512) * 512;
    let mut all = vec![0u8; padded as usize];
    r.read_exact(&mut all)?;
    let data = all[..n as usize].to_vec();
    Ok((data, all))
}

/// Where a frame belongs: between files (headers, padding), the whole content of the
/// entry at an index (its digest taken by the worker that compresses it), the first frame
/// of a content in several, or a further frame of the same content.
#[derive(Clone, Copy)]
enum Mark {
    Between,
    Whole(usize),
    Starts(usize),
    Continues,
}

type Submit<'a> = dyn FnMut(Vec<u8>, Mark) -> io::Result<()> + 'a;

/// An entry's content in the blob: its index, its first byte, the byte past its end.
type Span = (usize, u64, u64);

/// A file's content goes in frames of at most this many bytes.
const CHUNK_MAX: u64 = 4 << 20;
/// Batches of frames being compressed or waiting to be written, at most.
const IN_FLIGHT: usize = 8;
/// Pieces go to the workers in batches of about this many bytes.
const BATCH_BYTES: usize = 1 << 20;

/// Writes `tar` to `out` as zstd:chunked at `level`, the frames compressed on every core
/// (at most 8 threads) and written in order; returns the annotations of the layer's
/// descriptor.
pub fn write<R: Read, W: Write + Send>(
    tar: R,
    out: W,
    level: i32,
) -> io::Result<BTreeMap<String, String>> {
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
    // A job is a batch of pieces, each compressed into a frame of its own: most files are
    // small, and a hand-over per frame cost more than compressing it.
    type Batch = Vec<(Vec<u8>, Mark)>;
    type Packed = io::Result<Vec<(Vec<u8>, Mark, Option<[u8; 32]>)>>;
    type Job = (Batch, SyncSender<Packed>);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let (mut out, spans, digests, parsed) = std::thread::scope(|scope| {
        let (job_tx, job_rx) = sync_channel::<Job>(IN_FLIGHT);
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        for _ in 0..threads {
            let rx = job_rx.clone();
            scope.spawn(move || {
                let mut bulk = zstd::bulk::Compressor::new(level)
                    .and_then(|mut c| {
                        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                        Ok(c)
                    })
                    .ok();
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok((batch, reply)) = job else { return };
                    let packed = match bulk.as_mut() {
                        // A file's digest (the table's) is taken here, beside its
                        // compression, instead of on the thread that reads the tar.
                        Some(c) => batch
                            .into_iter()
                            .map(|(data, mark)| {
                                let digest = matches!(mark, Mark::Whole(_))
                                    .then(|| sha2::Sha256::digest(&data).into());
                                let mut packed = isula_sys::memory::take_sized(
                                    zstd::zstd_safe::compress_bound(data.len()),
                                );
                                let r = c.compress_to_buffer(&data, &mut packed);
                                isula_sys::memory::give_piece(data);
                                r.map(|_| (packed, mark, digest))
                            })
                            .collect(),
                        None => Err(io::Error::other("cannot make a zstd compressor")),
                    };
                    let _ = reply.send(packed);
                }
            });
        }
        let (order_tx, order_rx) = sync_channel::<Receiver<Packed>>(IN_FLIGHT);
        type Collected<W> = (Counted<W>, Vec<Span>, Vec<(usize, [u8; 32])>);
        let collector = scope.spawn(move || -> io::Result<Collected<W>> {
            let mut out = Counted { inner: out, n: 0 };
            let mut spans: Vec<Span> = Vec::new();
            let mut digests = Vec::new();
            for rx in order_rx {
                let batch = rx
                    .recv()
                    .map_err(|_| io::Error::other("a zstd worker stopped"))??;
                for (packed, mark, digest) in batch {
                    let at = out.n;
                    out.write_all(&packed)?;
                    isula_sys::memory::give_piece(packed);
                    match mark {
                        Mark::Between => {}
                        Mark::Whole(i) => {
                            spans.push((i, at, out.n));
                            digests.extend(digest.map(|d| (i, d)));
                        }
                        Mark::Starts(i) => spans.push((i, at, out.n)),
                        Mark::Continues => {
                            if let Some(last) = spans.last_mut() {
                                last.2 = out.n;
                            }
                        }
                    }
                }
            }
            Ok((out, spans, digests))
        });
        let mut batch: Batch = Vec::new();
        let mut batched = 0usize;
        let send = |batch: Batch| -> io::Result<()> {
            let (tx, rx) = sync_channel(1);
            let stopped = || io::Error::other("the zstd writer stopped");
            job_tx.send((batch, tx)).map_err(|_| stopped())?;
            order_tx.send(rx).map_err(|_| stopped())
        };
        let mut submit = |data: Vec<u8>, mark: Mark| -> io::Result<()> {
            batched += data.len();
            batch.push((data, mark));
            if batched >= BATCH_BYTES {
                batched = 0;
                send(std::mem::take(&mut batch))?;
            }
            Ok(())
        };
        let parsed = frames(tar, &mut submit);
        let parsed = match parsed {
            Ok(p) if !batch.is_empty() => send(std::mem::take(&mut batch)).map(|()| p),
            other => other,
        };
        drop(job_tx);
        drop(order_tx);
        let collected = collector
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the zstd writer panicked")));
        // The writer's own error first: a failed send only says that it stopped.
        let (out, spans, digests) = collected?;
        io::Result::Ok((out, spans, digests, parsed?))
    })?;
    let (mut entries, tarsplit) = parsed;
    // Each key in the order the table has it elsewhere: the digest, then the offsets.
    for (i, digest) in digests {
        if let Some(e) = entries.get_mut(i) {
            e.digest = Some(format!("sha256:{}", hex::encode(digest)));
        }
    }
    for (i, start, end) in spans {
        if let Some(e) = entries.get_mut(i) {
            e.offset = Some(start);
            e.end_offset = Some(end);
        }
    }
    let mut bulk = zstd::bulk::Compressor::new(level)?;
    bulk.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    let manifest = serde_json::to_vec(&Toc {
        version: 1,
        entries: &entries,
    })
    .map_err(io::Error::other)?;
    let mut skippable = |out: &mut Counted<W>, raw: &[u8]| -> io::Result<(u64, u64, String)> {
        let packed = bulk.compress(raw)?;
        let len = u32::try_from(packed.len()).map_err(|_| bad("a table over 4 GiB"))?;
        out.write_all(&SKIPPABLE_MAGIC.to_le_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        let at = out.n;
        out.write_all(&packed)?;
        Ok((
            at,
            packed.len() as u64,
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&packed))),
        ))
    };
    let (m_at, m_len, m_sum) = skippable(&mut out, &manifest)?;
    let (t_at, t_len, t_sum) = skippable(&mut out, &tarsplit)?;
    let mut footer = Vec::with_capacity(72);
    footer.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    footer.extend_from_slice(&64u32.to_le_bytes());
    for v in [
        m_at,
        m_len,
        manifest.len() as u64,
        MANIFEST_TYPE,
        t_at,
        t_len,
        tarsplit.len() as u64,
        FOOTER_MAGIC,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    out.write_all(&footer)?;
    out.flush()?;
    Ok(BTreeMap::from([
        (MANIFEST_CHECKSUM.to_string(), m_sum),
        (
            MANIFEST_POSITION.to_string(),
            format!("{m_at}:{m_len}:{}:{MANIFEST_TYPE}", manifest.len()),
        ),
        (TARSPLIT_CHECKSUM.to_string(), t_sum),
        (
            TARSPLIT_POSITION.to_string(),
            format!("{t_at}:{t_len}:{}", tarsplit.len()),
        ),
    ]))
}

/// Reads `tar` entry by entry: hands its frames to `submit` in order, and returns the
/// table's entries (without the offsets, which only the writer knows) and the tar-split
/// stream.
fn frames<R: Read>(mut tar: R, submit: &mut Submit<'_>) -> io::Result<(Vec<TocEntry>, Vec<u8>)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // Raw bytes not yet in a frame, and not yet in a tar-split segment.
    let mut frame: Vec<u8> = Vec::new();
    let mut segment: Vec<u8> = Vec::new();
    let mut entries: Vec<TocEntry> = Vec::new();
    let mut tarsplit: Vec<u8> = Vec::new();
    let mut position = 0u64;
    let mut pending = Pending::default();

    let flush_frame = |frame: &mut Vec<u8>, submit: &mut Submit<'_>| -> io::Result<()> {
        if !frame.is_empty() {
            submit(std::mem::take(frame), Mark::Between)?;
        }
        Ok(())
    };
    let line = |tarsplit: &mut Vec<u8>, v: SplitLine<'_>| -> io::Result<()> {
        serde_json::to_writer(&mut *tarsplit, &v).map_err(io::Error::other)?;
        tarsplit.push(b'\n');
        Ok(())
    };
    let flush_segment =
        |segment: &mut Vec<u8>, tarsplit: &mut Vec<u8>, position: &mut u64| -> io::Result<()> {
            if !segment.is_empty() {
                line(
                    tarsplit,
                    SplitLine {
                        kind: 2,
                        name: None,
                        size: None,
                        payload: Some(b64.encode(&segment[..])),
                        position: *position,
                    },
                )?;
                *position += 1;
                segment.clear();
            }
            Ok(())
        };

    loop {
        let mut hdr = [0u8; 512];
        match tar.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(bad("the tar ends in the middle of a header"))
            }
            Err(e) => return Err(e),
        }
        if hdr.iter().all(|&b| b == 0) {
            // The end: this block and whatever follows (the second zero block, padding).
            frame.extend_from_slice(&hdr);
            segment.extend_from_slice(&hdr);
            let mut rest = Vec::new();
            (&mut tar).take(RECORD_MAX + 1).read_to_end(&mut rest)?;
            if rest.len() as u64 > RECORD_MAX {
                return Err(bad("more than 1 MiB after the tar's end"));
            }
            frame.extend_from_slice(&rest);
            segment.extend_from_slice(&rest);
            break;
        }
        let kind = hdr[156];
        let size = number(&hdr[124..136])?;
        match kind {
            b'x' | b'g' | b'L' | b'K' => {
                let (data, all) = read_record(&mut tar, size)?;
                frame.extend_from_slice(&hdr);
                frame.extend_from_slice(&all);
                segment.extend_from_slice(&hdr);
                segment.extend_from_slice(&all);
                match kind {
                    b'x' => parse_pax(&data, &mut pending)?,
                    b'L' => pending.path = Some(text(&data)),
                    b'K' => pending.link = Some(text(&data)),
                    _ => {}
                }
                continue;
            }
            _ => {}
        }
        let p = std::mem::take(&mut pending);
        let ustar = &hdr[257..262] == b"ustar";
        let name = p.path.unwrap_or_else(|| {
            let n = text(&hdr[0..100]);
            let prefix = if ustar {
                text(&hdr[345..500])
            } else {
                String::new()
            };
            if prefix.is_empty() {
                n
            } else {
                format!("{prefix}/{n}")
            }
        });
        let link = p.link.unwrap_or_else(|| text(&hdr[157..257]));
        let size = p.size.unwrap_or(size);
        let type_name = match kind {
            b'0' | 0 | b'7' => "reg",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            other => {
                return Err(bad(format!(
                    "tar entry {name:?} has type {:?}",
                    other as char
                )))
            }
        };
        let (dev_major, dev_minor) = if matches!(kind, b'3' | b'4') {
            (number(&hdr[329..337])?, number(&hdr[337..345])?)
        } else {
            (0, 0)
        };
        let mut e = TocEntry {
            kind: type_name,
            name: name.clone(),
            link_name: (!link.is_empty() && matches!(kind, b'1' | b'2')).then_some(link),
            mode: number(&hdr[100..108])? & 0o7777,
            size: if type_name == "reg" { size } else { 0 },
            uid: p.uid.unwrap_or(number(&hdr[108..116])?),
            gid: p.gid.unwrap_or(number(&hdr[116..124])?),
            user_name: p.uname.unwrap_or_else(|| text(&hdr[265..297])),
            group_name: p.gname.unwrap_or_else(|| text(&hdr[297..329])),
            mod_time: rfc3339(p.mtime.unwrap_or(number(&hdr[136..148])? as i64)),
            access_time: "0001-01-01T00:00:00Z",
            change_time: "0001-01-01T00:00:00Z",
            dev_major,
            dev_minor,
            xattrs: p
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), b64.encode(v)))
                .collect(),
            digest: None,
            offset: None,
            end_offset: None,
        };
        frame.extend_from_slice(&hdr);
        segment.extend_from_slice(&hdr);
        flush_segment(&mut segment, &mut tarsplit, &mut position)?;
        // The content: a frame of its own (reg), else raw bytes beside the headers.
        let mut crc = Crc64::new();
        if type_name == "reg" && size > 0 {
            flush_frame(&mut frame, submit)?;
            let index = entries.len();
            if size <= CHUNK_MAX {
                // One frame: its digest is taken by the worker that compresses it.
                let mut data = isula_sys::memory::take_sized_filled(size as usize);
                tar.read_exact(&mut data)?;
                crc.update(&data);
                submit(data, Mark::Whole(index))?;
            } else {
                // In frames of at most CHUNK_MAX bytes, compressed on every core: the entry's
                // offsets span them all.
                let mut sha = sha2::Sha256::new();
                let mut left = size;
                let mut first = true;
                while left > 0 {
                    let n = left.min(CHUNK_MAX);
                    let mut data = isula_sys::memory::take_sized_filled(n as usize);
                    tar.read_exact(&mut data)?;
                    sha.update(&data);
                    crc.update(&data);
                    submit(
                        data,
                        if first {
                            Mark::Starts(index)
                        } else {
                            Mark::Continues
                        },
                    )?;
                    first = false;
                    left -= n;
                }
                e.digest = Some(format!("sha256:{}", hex::encode(sha.finalize())));
            }
            line(
                &mut tarsplit,
                SplitLine {
                    kind: 1,
                    name: Some(&name),
                    size: Some(size),
                    payload: Some(b64.encode(crc.sum())),
                    position,
                },
            )?;
        } else {
            // Content of another entry (rare: a hard link with data): kept with the headers.
            let mut data = vec![0u8; size.min(RECORD_MAX + 1) as usize];
            if size > RECORD_MAX {
                return Err(bad(format!(
                    "tar entry {name:?} ({type_name}) carries {size} bytes"
                )));
            }
            tar.read_exact(&mut data)?;
            frame.extend_from_slice(&data);
            segment.extend_from_slice(&data);
            line(
                &mut tarsplit,
                SplitLine {
                    kind: 1,
                    name: Some(&name),
                    size: None,
                    payload: None,
                    position,
                },
            )?;
        }
        position += 1;
        entries.push(e);
        let pad = ((512 - size % 512) % 512) as usize;
        if pad > 0 {
            let mut p = vec![0u8; pad];
            tar.read_exact(&mut p)?;
            frame.extend_from_slice(&p);
            segment.extend_from_slice(&p);
        }
    }
    flush_frame(&mut frame, submit)?;
    flush_segment(&mut segment, &mut tarsplit, &mut position)?;
    Ok((entries, tarsplit))
}

/// The table of contents and tar-split stream of a zstd:chunked blob, found by its
/// footer (for checks: `--check-store` and the tests).
pub fn read_tables(blob: &[u8]) -> io::Result<(serde_json::Value, Vec<u8>)> {
    if blob.len() < 72 {
        return Err(bad("too short for a zstd:chunked footer"));
    }
    let f = &blob[blob.len() - 72..];
    let u32_at = |i: usize| u32::from_le_bytes(f[i..i + 4].try_into().unwrap_or_default());
    if u32_at(0) != SKIPPABLE_MAGIC || u32_at(4) != 64 {
        return Err(bad("no zstd:chunked footer"));
    }
    let v: Vec<u64> = (0..8)
        .map(|i| u64::from_le_bytes(f[8 + i * 8..16 + i * 8].try_into().unwrap_or_default()))
        .collect();
    if v[7] != FOOTER_MAGIC || v[3] != MANIFEST_TYPE {
        return Err(bad("a footer without the zstd:chunked magic"));
    }
    let slice = |at: u64, len: u64| -> io::Result<&[u8]> {
        blob.get(at as usize..(at + len) as usize)
            .ok_or_else(|| bad("a footer position outside the blob"))
    };
    let manifest = zstd::bulk::decompress(slice(v[0], v[1])?, v[2] as usize)?;
    let tarsplit = zstd::bulk::decompress(slice(v[4], v[5])?, v[6] as usize)?;
    let manifest = serde_json::from_slice(&manifest).map_err(|e| bad(e.to_string()))?;
    Ok((manifest, tarsplit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            if let Some(l) = link {
                b.append_link(&mut h, path, l).expect("link");
            } else {
                b.append_data(&mut h, path, data).expect("append");
            }
        };
        add("etc/", tar::EntryType::Directory, b"", None);
        add(
            "etc/hosts",
            tar::EntryType::Regular,
            b"127.0.0.1 localhost\n",
            None,
        );
        add("etc/empty", tar::EntryType::Regular, b"", None);
        let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
        add("big.bin", tar::EntryType::Regular, &big, None);
        let long = format!("deep/{}/file.txt", "d".repeat(150));
        add(&long, tar::EntryType::Regular, b"long name\n", None);
        add(
            "etc/hosts.link",
            tar::EntryType::Symlink,
            b"",
            Some("hosts"),
        );
        add(
            "etc/hosts.hard",
            tar::EntryType::Link,
            b"",
            Some("etc/hosts"),
        );
        b.into_inner().expect("tar")
    }

    #[test]
    fn decodes_to_the_same_tar_and_its_table_finds_every_file() {
        let tar = sample_tar();
        let mut blob = Vec::new();
        let ann = write(&tar[..], &mut blob, 3).expect("write");
        // Any zstd decoder reads the tar back, byte for byte.
        assert_eq!(zstd::stream::decode_all(&blob[..]).expect("decode"), tar);
        let (manifest, tarsplit) = read_tables(&blob).expect("tables");
        // The annotations say what the footer says.
        let pos: Vec<u64> = ann[MANIFEST_POSITION]
            .split(':')
            .map(|s| s.parse().expect("n"))
            .collect();
        let packed = &blob[pos[0] as usize..(pos[0] + pos[1]) as usize];
        assert_eq!(
            ann[MANIFEST_CHECKSUM],
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(packed)))
        );
        let entries = manifest["entries"].as_array().expect("entries");
        let names: Vec<&str> = entries
            .iter()
            .map(|e| e["name"].as_str().unwrap_or(""))
            .collect();
        assert!(
            names.contains(&"etc/") && names.contains(&"big.bin"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.len() > 150),
            "the long name: {names:?}"
        );
        let mut files = BTreeMap::new();
        for e in entries {
            if e["type"] == "reg" && e["size"].as_u64().unwrap_or(0) > 0 {
                let (a, b) = (
                    e["offset"].as_u64().expect("offset") as usize,
                    e["endOffset"].as_u64().expect("end") as usize,
                );
                let data = zstd::stream::decode_all(&blob[a..b]).expect("frame");
                assert_eq!(data.len() as u64, e["size"].as_u64().expect("size"));
                assert_eq!(
                    e["digest"].as_str().expect("digest"),
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
                );
                files.insert(e["name"].as_str().expect("name").to_string(), data);
            }
        }
        assert_eq!(files.len(), 3);
        let hard = entries
            .iter()
            .find(|e| e["name"] == "etc/hosts.hard")
            .expect("hard");
        assert_eq!(
            (hard["type"].as_str(), hard["linkName"].as_str()),
            (Some("hardlink"), Some("etc/hosts"))
        );
        assert_eq!(entries[1]["uid"], 1000);
        // tar-split makes the tar again from its segments and the files' contents, each
        // checked by its CRC-64.
        let mut again = Vec::new();
        let b64 = base64::engine::general_purpose::STANDARD;
        for l in tarsplit.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(l).expect("line");
            match v["type"].as_u64() {
                Some(2) => {
                    again.extend(b64.decode(v["payload"].as_str().expect("p")).expect("b64"))
                }
                Some(1) if v["size"].as_u64().unwrap_or(0) > 0 => {
                    let data = &files[v["name"].as_str().expect("name")];
                    let mut c = Crc64::new();
                    c.update(data);
                    assert_eq!(v["payload"].as_str(), Some(b64.encode(c.sum()).as_str()));
                    again.extend(data);
                }
                _ => {}
            }
        }
        assert_eq!(again, tar);
    }

    /// The table's and the tar-split's JSON, key for key and in containers/storage's
    /// order, with what is zero or empty left out (pinned: the structs must write what
    /// the JSON maps they replaced wrote).
    #[test]
    fn table_entries_and_tar_split_lines_keep_their_keys_and_order() {
        let full = TocEntry {
            kind: "char",
            name: "dev/x".into(),
            link_name: Some("y".into()),
            mode: 0o644,
            size: 5,
            uid: 1,
            gid: 2,
            user_name: "u".into(),
            group_name: "g".into(),
            mod_time: rfc3339(86400),
            access_time: "0001-01-01T00:00:00Z",
            change_time: "0001-01-01T00:00:00Z",
            dev_major: 1,
            dev_minor: 3,
            xattrs: BTreeMap::from([
                ("b".to_string(), "Yg==".to_string()),
                ("a".into(), "YQ==".into()),
            ]),
            digest: Some("sha256:00".into()),
            offset: Some(10),
            end_offset: Some(20),
        };
        assert_eq!(
            serde_json::to_string(&full).expect("json"),
            r#"{"type":"char","name":"dev/x","linkName":"y","mode":420,"size":5,"uid":1,"gid":2,"userName":"u","groupName":"g","modtime":"1970-01-02T00:00:00Z","accesstime":"0001-01-01T00:00:00Z","changetime":"0001-01-01T00:00:00Z","devMajor":1,"devMinor":3,"xattrs":{"a":"YQ==","b":"Yg=="},"digest":"sha256:00","offset":10,"endOffset":20}"#
        );
        let bare = TocEntry {
            kind: "dir",
            name: "d".into(),
            link_name: None,
            mode: 0,
            size: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mod_time: rfc3339(0),
            access_time: "0001-01-01T00:00:00Z",
            change_time: "0001-01-01T00:00:00Z",
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            offset: None,
            end_offset: None,
        };
        assert_eq!(
            serde_json::to_string(&Toc {
                version: 1,
                entries: &[bare]
            })
            .expect("json"),
            r#"{"version":1,"entries":[{"type":"dir","name":"d","modtime":"1970-01-01T00:00:00Z","accesstime":"0001-01-01T00:00:00Z","changetime":"0001-01-01T00:00:00Z"}]}"#
        );
        let line = |l: SplitLine<'_>| serde_json::to_string(&l).expect("json");
        assert_eq!(
            line(SplitLine {
                kind: 2,
                name: None,
                size: None,
                payload: Some("AA==".into()),
                position: 0
            }),
            r#"{"type":2,"payload":"AA==","position":0}"#
        );
        assert_eq!(
            line(SplitLine {
                kind: 1,
                name: Some("f"),
                size: Some(5),
                payload: Some("AQ==".into()),
                position: 1
            }),
            r#"{"type":1,"name":"f","size":5,"payload":"AQ==","position":1}"#
        );
        assert_eq!(
            line(SplitLine {
                kind: 1,
                name: Some("h"),
                size: None,
                payload: None,
                position: 2
            }),
            r#"{"type":1,"name":"h","payload":null,"position":2}"#
        );
    }

    #[test]
    fn crc64_is_gos_iso_table() {
        // Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO))
        let mut c = Crc64::new();
        c.update(b"123456789");
        assert_eq!(u64::from_be_bytes(c.sum()), 0xb909_56c7_75a4_1001);
        // Agrees with Go's definition a bit at a time (the reflected ISO polynomial), for
        // every length and split.
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        for len in [
            0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 999, 5000,
        ] {
            let mut slow = !0u64;
            for &b in &data[..len] {
                slow ^= u64::from(b);
                for _ in 0..8 {
                    slow = if slow & 1 == 1 {
                        (slow >> 1) ^ 0xD800_0000_0000_0000
                    } else {
                        slow >> 1
                    };
                }
            }
            let mut fast = Crc64::new();
            let (a, b) = data[..len].split_at(len / 3);
            fast.update(a);
            fast.update(b);
            assert_eq!(fast.sum(), (!slow).to_be_bytes(), "length {len}");
        }
    }

    #[test]
    fn a_truncated_tar_is_refused() {
        let tar = sample_tar();
        let mut blob = Vec::new();
        assert!(write(&tar[..700], &mut blob, 3).is_err());
        assert!(read_tables(b"short").is_err());
    }
}
