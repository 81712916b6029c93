//! Sniffing and streaming decompression of layer and archive data (gzip, bzip2, xz, zstd),
//! all in-process: no decompressor binary ever runs, least of all inside a rootfs.

use std::io::{self, BufRead, BufReader, Read};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    /// Recognises the format from the first bytes of a stream.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// The gzip level for layers compressed for a push or cache export (no level asked): level
/// 1, the fastest, on every core while the upload goes. Its deflated blocks use fixed
/// Huffman codes only, so typical layers come out bigger than at the default level (a
/// 984 MB tar of shared libraries, docs and translations: 461 MB, 390 MB at level 2 for
/// 1.6 times the CPU; ask with `--compression-level`); data deflate cannot shrink is
/// stored as it is (`pgzip`).
pub const GZIP_LEVEL: flate2::Compression = flate2::Compression::new(1);

/// The gzip level a push asked for (`--compression-level`, 1-9), else [`GZIP_LEVEL`].
pub fn gzip_level(asked: Option<i32>) -> flate2::Compression {
    asked.map_or(GZIP_LEVEL, |l| {
        flate2::Compression::new(l.clamp(0, 9) as u32)
    })
}

/// The zstd level for layers compressed for a push (or cache export) that asked for zstd
/// without a level, while it waits: level 1, the fastest, as [`GZIP_LEVEL`] for gzip.
/// Measured on the bench's half-random 430 MB layer: 0.43 CPU seconds for 236 MB, against
/// 0.73 for 232 MB at zstd's own default of 3 (what skopeo and buildah use; ask for it
/// with `--compression-level 3`), which a push right after a build shares two cores with
/// the registry's hashing (`crates/store/examples/compress_cost.rs`).
pub const ZSTD_LEVEL: i32 = 1;

/// A zstd encoder into `w` that compresses on every core (zstd's own worker threads, at
/// most 8): `w` receives the frame as the workers finish its blocks, in order, so memory
/// stays bounded by the workers' windows. Call `finish` to end the frame.
pub fn parallel_zstd<W: io::Write>(
    w: W,
    level: i32,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(w, level)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8) as u32;
    if threads > 1 {
        enc.multithread(threads)?;
    }
    // A checksum of the content in the frame, as the zstd tool writes by default: a
    // decoder then catches a corrupt blob itself.
    enc.include_checksum(true)?;
    Ok(enc)
}

/// How many full pieces a [`ThreadWriter`] holds for its thread.
const BEHIND_PIECES: usize = 4;

/// A writer that gathers what it is given into 1 MiB pooled pieces and writes each full
/// one to `inner` on a thread of its own: a compressor's thread (zstd's hands its output on
/// 32 KiB at a time) goes on compressing while its output is hashed, stored and copied to a
/// push, as the gzip writer's collector does. [`ThreadWriter::finish`] writes the rest
/// and gives `inner` back; an error of `inner` comes out of the next write or the finish.
pub struct ThreadWriter<W: io::Write + Send + 'static> {
    piece: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<io::Result<W>>>,
}

impl<W: io::Write + Send + 'static> ThreadWriter<W> {
    pub fn new(mut inner: W) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BEHIND_PIECES);
        let thread = std::thread::Builder::new()
            .name("compress-write".into())
            .spawn(move || {
                for piece in rx {
                    inner.write_all(&piece)?;
                    isula_sys::memory::give_piece(piece);
                }
                Ok(inner)
            })?;
        Ok(ThreadWriter {
            piece: isula_sys::memory::take_piece(isula_sys::memory::PIECE),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands the gathered piece to the thread (a new one takes its place unless `last`).
    fn send(&mut self, last: bool) -> io::Result<()> {
        let next = if last {
            Vec::new()
        } else {
            isula_sys::memory::take_piece(isula_sys::memory::PIECE)
        };
        let piece = std::mem::replace(&mut self.piece, next);
        let sent = match &self.tx {
            Some(tx) if !piece.is_empty() => tx.send(piece).is_ok(),
            Some(_) => true,
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped: its error says why.
            self.tx = None;
            Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the writing thread stopped")))
        }
    }

    fn join(&mut self) -> io::Result<W> {
        self.tx = None;
        self.thread
            .take()
            .ok_or_else(|| io::Error::other("the writing thread stopped"))?
            .join()
            .map_err(|_| io::Error::other("the writing thread panicked"))?
    }

    /// Writes what is left and returns `inner`.
    pub fn finish(mut self) -> io::Result<W> {
        self.send(true)?;
        self.join()
    }
}

impl<W: io::Write + Send + 'static> io::Write for ThreadWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = isula_sys::memory::PIECE - self.piece.len();
        let n = room.min(data.len());
        self.piece.extend_from_slice(&data[..n]);
        if self.piece.len() == isula_sys::memory::PIECE {
            self.send(false)?;
        }
        Ok(n)
    }

    /// Nothing to do: pieces go to the thread as they fill, and the rest at `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: io::Write + Send + 'static> Drop for ThreadWriter<W> {
    fn drop(&mut self) {
        // Unfinished (an error on the way): the thread ends with its channel, and what it
        // wrote is dropped with `inner`.
        let _ = self.join();
    }
}

/// How much [`read_ahead`] reads at a time, and how many of those it keeps ready.
const AHEAD_PIECE: usize = 1 << 20;
const AHEAD_PIECES: usize = 4;

/// Copies `r` to `w` to its end in pieces of up to 1 MiB (a pooled piece, never zeroed
/// again): an encoder is called once per MiB instead of once per 8 KiB as `io::copy` would.
/// Returns how many bytes it copied.
pub fn pump(r: &mut dyn Read, w: &mut dyn io::Write) -> io::Result<u64> {
    let mut piece = isula_sys::memory::take_filled(isula_sys::memory::PIECE);
    let mut total = 0u64;
    let copied = loop {
        match r.read(&mut piece) {
            Ok(0) => break Ok(total),
            Ok(n) => {
                if let Err(e) = w.write_all(&piece[..n]) {
                    break Err(e);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    isula_sys::memory::give_piece(piece);
    copied
}

/// Reads the stream `open` makes on a thread of `scope`, up to 4 MiB ahead of the
/// returned reader, so making a tar (or decompressing one) and compressing it run at once.
/// An error, in `open` or while reading, comes out of the returned reader; dropping the
/// reader stops the thread at its next piece.
pub fn read_ahead<'scope, 'env, F, R>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    open: F,
) -> AheadReader
where
    F: FnOnce() -> io::Result<R> + Send + 'scope,
    R: Read,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(AHEAD_PIECES);
    // Read pieces come back to be filled again: the same few buffers go round, instead of
    // a fresh mapping (and its page faults) for every MiB.
    let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(AHEAD_PIECES + 2);
    scope.spawn(move || {
        let mut r = match open() {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        loop {
            let mut piece = back_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(AHEAD_PIECE));
            piece.clear();
            match (&mut r).take(AHEAD_PIECE as u64).read_to_end(&mut piece) {
                Ok(0) => return,
                Ok(_) => {
                    if tx.send(Ok(piece)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    AheadReader {
        rx,
        back: back_tx,
        piece: Vec::new(),
        at: 0,
    }
}

/// The reading end of [`read_ahead`].
pub struct AheadReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    back: std::sync::mpsc::SyncSender<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl Read for AheadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            match self.rx.recv() {
                Ok(p) => {
                    let used = std::mem::replace(&mut self.piece, p?);
                    if used.capacity() > 0 {
                        // The reading thread may be gone, or have enough: then it is freed.
                        let _ = self.back.try_send(used);
                    }
                    self.at = 0;
                }
                // The thread ended without an error: the stream is done.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Wraps `r` in the decompressor its first bytes call for. Returns the format found.
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut br = BufReader::with_capacity(256 << 10, r);
    let head = br.fill_buf()?;
    let kind = Compression::sniff(head);
    let out: Box<dyn Read + 'a> = match kind {
        Compression::None => Box::new(br),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(br)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(br, true)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
    };
    Ok((kind, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writing_behind_on_a_thread_keeps_every_byte_in_order() {
        let data: Vec<u8> = (0..(5 << 20) + 12_345u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut w = ThreadWriter::new(Vec::new()).expect("new");
        for piece in data.chunks(32 * 1024 + 7) {
            w.write_all(piece).expect("write");
        }
        assert_eq!(w.finish().expect("finish"), data);
        // Nothing written: nothing comes out.
        let w = ThreadWriter::new(Vec::new()).expect("new");
        assert!(w.finish().expect("finish").is_empty());
    }

    #[test]
    fn writing_behind_on_a_thread_reports_the_writers_error() {
        /// Takes 2 MiB, then fails.
        struct Full(usize);
        impl io::Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 + b.len() > 2 << 20 {
                    return Err(io::Error::other("disk on fire"));
                }
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // Failing during the writes (the thread stops, the next hand-over says why), and
        // failing with the last piece, at the finish.
        for size in [64usize << 20, (2 << 20) + 10] {
            let mut w = ThreadWriter::new(Full(0)).expect("new");
            let piece = vec![7u8; 100_000];
            let mut wrote = 0;
            let mut err = None;
            while wrote < size {
                let n = piece.len().min(size - wrote);
                if let Err(e) = w.write_all(&piece[..n]) {
                    err = Some(e);
                    break;
                }
                wrote += n;
            }
            let e = match err {
                Some(e) => e,
                None => w.finish().err().expect("the finish fails"),
            };
            assert_eq!(e.to_string(), "disk on fire", "size {size}");
        }
    }

    #[test]
    fn round_trips_every_format() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).expect("gz");
        let gz = gz.finish().expect("gz");
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&data).expect("bz");
        let bz = bz.finish().expect("bz");
        let mut xz =
            lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::default()).expect("xz");
        xz.write_all(&data).expect("xz");
        let xz = xz.finish().expect("xz");
        let zs = zstd::encode_all(&data[..], 1).expect("zstd");
        for (kind, blob) in [
            (Compression::None, data.clone()),
            (Compression::Gzip, gz.clone()),
            (Compression::Bzip2, bz),
            (Compression::Xz, xz),
            (Compression::Zstd, zs),
        ] {
            let (found, mut r) = decompress(&blob[..]).expect("open");
            assert_eq!(found, kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).expect("read");
            assert_eq!(out, data, "{kind:?}");
        }
        // The parallel zstd encoder makes one ordinary frame any decoder reads.
        let mut enc = parallel_zstd(Vec::new(), ZSTD_LEVEL).expect("zstd");
        for piece in data.chunks(70_000) {
            enc.write_all(piece).expect("write");
        }
        let zs = enc.finish().expect("finish");
        assert!(zs.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
        assert_eq!(zstd::decode_all(&zs[..]).expect("decode"), data);
        // Read ahead on another thread: the same bytes, and an error comes through.
        std::thread::scope(|s| {
            let mut back = Vec::new();
            read_ahead(s, || decompress(&zs[..]).map(|(_, r)| r))
                .read_to_end(&mut back)
                .expect("read ahead");
            assert_eq!(back, data);
            let truncated = &zs[..zs.len() / 2];
            let mut r = read_ahead(s, move || decompress(truncated).map(|(_, r)| r));
            assert!(r.read_to_end(&mut Vec::new()).is_err());
        });
        // A truncated gzip is an error, not a short read.
        let (_, mut r) = decompress(&gz[..gz.len() / 2]).expect("open");
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
