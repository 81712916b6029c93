//! Parallel gzip (the pigz technique): the input is cut into 1 MiB chunks, each deflated on
//! a worker thread with a sync flush so it ends on a byte boundary, and the pieces are
//! written in order as one deflate stream between a gzip header and trailer (CRC-32 and
//! length of the whole input). The result is a single ordinary gzip member that any
//! decoder reads. At most `IN_FLIGHT` chunks are queued, so memory stays bounded.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 8;

type Job = (Vec<u8>, bool, SyncSender<io::Result<Out>>);

pub struct ParallelGzip<W: Write + Send + 'static> {
    /// The chunk being filled: always [`CHUNK`] bytes long, of which `filled` are input.
    buf: Vec<u8>,
    filled: usize,
    jobs: Option<SyncSender<Job>>,
    order: Option<SyncSender<Receiver<io::Result<Out>>>>,
    workers: Vec<JoinHandle<()>>,
    collector: Option<JoinHandle<io::Result<W>>>,
    /// The CRC-32 of the input and its length (crc-fast: 512-bit carry-less
    /// multiplication where the CPU has it, twice zlib-rs's speed here).
    crc: crc_fast::Digest,
}

/// The probe size of [`deflate_chunk`]'s test for data deflate cannot shrink: a tar block,
/// so a file's content is told apart from its neighbours' to within a block or two.
const PROBE: usize = 512;

/// The shortest flat run stored rather than deflated (see [`deflate_chunk`]).
const MIN_STORED: usize = 4 * PROBE;

/// Whether `block` looks like data deflate cannot shrink (compressed or encrypted content,
/// random bytes): its byte histogram is as flat as that of random data, no more and no
/// less. `Σ count²` of `n` uniform random bytes averages `n + n(n-1)/256` (1534 for a
/// 512-byte block), with a spread of about 3%; text, code and machine code score several
/// times that, base64 four times, half a block of text about twice; a block flatter than
/// chance (a ramp, a table of every byte value: patterns deflate shrinks well) scores
/// less, down to `n²/256`. A flat histogram is the test a filesystem's compression
/// heuristic uses too, and far cheaper than letting deflate search for matches that are
/// not there.
fn incompressible(block: &[u8]) -> bool {
    if block.len() < PROBE {
        return false;
    }
    // Counted as equal pairs: `Σ count² = n + 2·pairs`, and each byte adds to `pairs` the
    // count its value had so far. No pass over the 256 counts at the end, and the sum only
    // grows, so a block that has passed the upper bound (text and code pass it within a
    // quarter of a block) is done. Counts of a probe fit in 16 bits.
    debug_assert!(block.len() <= usize::from(u16::MAX));
    let n = block.len() as u64;
    let uniform = n + n * (n - 1) / 256;
    let (low, high) = (uniform * 85, uniform * 115);
    let mut counts = [0u16; 256];
    let mut pairs: u64 = 0;
    for piece in block.chunks(64) {
        for &b in piece {
            let c = &mut counts[usize::from(b)];
            pairs += u64::from(*c);
            *c += 1;
        }
        if (n + 2 * pairs) * 100 > high {
            return false;
        }
    }
    (n + 2 * pairs) * 100 >= low
}

/// A compressed chunk: the first `len` bytes of `buf`. `buf` keeps its full length (it is a
/// pooled piece, written through slices), so going round it is never zeroed again.
struct Out {
    buf: Vec<u8>,
    len: usize,
}

impl Out {
    fn new(room: usize) -> Out {
        Out {
            buf: isula_sys::memory::take_filled(room),
            len: 0,
        }
    }

    /// At least `n` bytes of room after what was written.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.len + n {
            self.buf.resize(self.len + n, 0);
        }
        &mut self.buf[self.len..]
    }

    fn put(&mut self, data: &[u8]) {
        self.room(data.len())[..data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Appends `data` as stored deflate blocks (not final): the output is byte-aligned here.
fn store_blocks(data: &[u8], out: &mut Out) {
    for piece in data.chunks(u16::MAX as usize) {
        // BFINAL 0, BTYPE 00, padded to the byte; then LEN and its complement.
        let len = piece.len() as u16;
        out.put(&[0]);
        out.put(&len.to_le_bytes());
        out.put(&(!len).to_le_bytes());
        out.put(piece);
    }
}

/// Deflates `src` into `out` ending with a sync flush (byte-aligned, no final block).
/// flate2's `compress_vec` zeroes the vector's spare room on every call; this writes into
/// the slice of a piece that was zeroed once.
fn deflate_sync(c: &mut flate2::Compress, src: &[u8], out: &mut Out) -> io::Result<()> {
    let start = c.total_in();
    loop {
        let done = (c.total_in() - start) as usize;
        // Sync flush output: at most the input plus block overhead (level 1's fixed codes
        // grow incompressible bytes by ~6%), so a few calls at most.
        let room = out.room((src.len() - done) / 8 + src.len() - done + 1024);
        let room_len = room.len();
        let before_out = c.total_out();
        c.compress(&src[done..], room, flate2::FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let wrote = (c.total_out() - before_out) as usize;
        out.len += wrote;
        let consumed = (c.total_in() - start) as usize;
        // Done when all input is in and the flush fitted (spare room left over).
        if consumed == src.len() && wrote < room_len {
            return Ok(());
        }
        if consumed == done && wrote == 0 {
            return Err(io::Error::other("deflate made no progress"));
        }
    }
}

/// Deflates one chunk as a run of byte-aligned, non-final deflate blocks (a final empty
/// block after the last chunk). Runs of at least four 512-byte blocks that [`incompressible`] finds flat are
/// written as stored blocks, at memcpy speed and without level 1's ~6% growth of such
/// data; the rest is deflated at `level`, the compressor starting afresh after each stored
/// run (its window would otherwise miss the stored bytes the decoder has seen). Each
/// chunk stands alone, so the result depends on the input only, never on thread timing.
/// Deflates one chunk with `c` (a worker's compressor, made on first use and reset for
/// each chunk: making one allocates its window and tables anew). The output buffer is a
/// pooled piece.
fn deflate_chunk(
    data: &[u8],
    last: bool,
    level: flate2::Compression,
    c: &mut Option<flate2::Compress>,
) -> io::Result<Out> {
    let mut out = Out::new(data.len() + data.len() / 8 + 1024);
    let mut fresh = true;
    let mut i = 0;
    while i < data.len() {
        let stored = incompressible(&data[i..(i + PROBE).min(data.len())]);
        let mut j = (i + PROBE).min(data.len());
        while j < data.len() && incompressible(&data[j..(j + PROBE).min(data.len())]) == stored {
            j = (j + PROBE).min(data.len());
        }
        // A short flat run (a small compressed file between text) is deflated with its
        // neighbours: storing it would cost a fresh start of the compressor.
        if stored && j - i >= MIN_STORED {
            store_blocks(&data[i..j], &mut out);
            fresh = true;
        } else {
            let c = c.get_or_insert_with(|| flate2::Compress::new(level, false));
            if fresh && c.total_in() > 0 {
                c.reset();
            }
            fresh = false;
            deflate_sync(c, &data[i..j], &mut out)?;
        }
        i = j;
    }
    if last {
        // An empty final stored block ends the deflate stream.
        out.put(&[1, 0, 0, 0xff, 0xff]);
    }
    Ok(out)
}

impl<W: Write + Send + 'static> ParallelGzip<W> {
    pub fn new(mut out: W, level: flate2::Compression) -> io::Result<Self> {
        // Header: magic, deflate, no flags, no mtime, no extra flags, OS unknown.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(IN_FLIGHT);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut workers = Vec::new();
        for i in 0..threads {
            let rx = jobs_rx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("gzip-{i}"))
                    .spawn(move || {
                        let mut compress = None;
                        loop {
                            let job = match rx.lock() {
                                Ok(r) => r.recv(),
                                Err(_) => return,
                            };
                            let Ok((data, last, reply)) = job else { return };
                            let _ = reply.send(deflate_chunk(&data, last, level, &mut compress));
                            isula_sys::memory::give_piece(data);
                        }
                    })?,
            );
        }
        let (order_tx, order_rx) = sync_channel::<Receiver<io::Result<Out>>>(IN_FLIGHT);
        let collector = std::thread::Builder::new()
            .name("gzip-collect".into())
            .spawn(move || {
                for piece in order_rx {
                    let bytes = piece
                        .recv()
                        .map_err(|_| io::Error::other("a gzip worker stopped"))??;
                    out.write_all(bytes.bytes())?;
                    isula_sys::memory::give_piece(bytes.buf);
                }
                Ok(out)
            })?;
        Ok(ParallelGzip {
            buf: isula_sys::memory::take_filled(CHUNK),
            filled: 0,
            jobs: Some(jobs_tx),
            order: Some(order_tx),
            workers,
            collector: Some(collector),
            crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32IsoHdlc),
        })
    }

    fn send(&mut self, last: bool) -> io::Result<()> {
        let mut data = std::mem::replace(
            &mut self.buf,
            if last {
                Vec::new()
            } else {
                isula_sys::memory::take_filled(CHUNK)
            },
        );
        data.truncate(self.filled);
        self.filled = 0;
        let (reply_tx, reply_rx) = sync_channel(1);
        let stopped = || io::Error::other("the gzip writer stopped");
        self.order
            .as_ref()
            .ok_or_else(stopped)?
            .send(reply_rx)
            .map_err(|_| stopped())?;
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send((data, last, reply_tx))
            .map_err(|_| stopped())
    }

    /// Compresses what is left, writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.send(true)?;
        drop(self.jobs.take());
        drop(self.order.take());
        let mut out = self
            .collector
            .take()
            .ok_or_else(|| io::Error::other("gzip writer finished twice"))?
            .join()
            .map_err(|_| io::Error::other("the gzip collector panicked"))??;
        // The trailer: CRC-32 and the input's length modulo 2^32 (RFC 1952).
        out.write_all(&(self.crc.finalize() as u32).to_le_bytes())?;
        out.write_all(&(self.crc.get_amount() as u32).to_le_bytes())?;
        Ok(out)
    }
}

impl<W: Write + Send + 'static> ParallelGzip<W> {
    /// Compresses what `r` reads, to its end, read straight into the chunks (no copy
    /// between). Returns how many bytes it read.
    pub fn read_from(&mut self, r: &mut dyn io::Read) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.crc.update(&self.buf[self.filled..self.filled + n]);
            self.filled += n;
            total += n as u64;
            if self.filled == CHUNK {
                self.send(false)?;
            }
        }
    }
}

impl<W: Write + Send + 'static> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.crc.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let n = (CHUNK - self.filled).min(rest.len());
            self.buf[self.filled..self.filled + n].copy_from_slice(&rest[..n]);
            self.filled += n;
            rest = &rest[n..];
            if self.filled == CHUNK {
                self.send(false)?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        drop(self.order.take());
        if let Some(c) = self.collector.take() {
            let _ = c.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Where a copy of each piece written goes (a push uploads it meanwhile): false when the
/// receiver is gone and wants no more.
pub type Side = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// A writer that also gives a copy of what it writes to `side`, while `side` takes them:
/// a side that stops taking stops the copies, never the writing.
pub struct Tee<W> {
    pub inner: W,
    pub side: Option<Side>,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(side) = &mut self.side {
            if !side(&data[..n]) {
                self.side = None;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A [`Side`] that sends each piece down `tx`.
pub fn side_channel(tx: SyncSender<Vec<u8>>) -> Side {
    Box::new(move |piece: &[u8]| tx.send(piece.to_vec()).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn one_member_any_decoder_reads() {
        for size in [0usize, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345] {
            let data: Vec<u8> = (0..size)
                .map(|i| (i * 7 % 251) as u8 ^ (i >> 13) as u8)
                .collect();
            let mut gz = ParallelGzip::new(Vec::new(), flate2::Compression::new(1)).expect("new");
            for piece in data.chunks(70_000) {
                gz.write_all(piece).expect("write");
            }
            let out = gz.finish().expect("finish");
            // The single-member decoder must see everything (no concatenated members).
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .expect("decode");
            assert_eq!(back, data, "size {size}");
        }
    }

    /// Pseudo-random bytes (xorshift), as flat as compressed data.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    fn gzip_all(data: &[u8]) -> Vec<u8> {
        let mut gz = ParallelGzip::new(Vec::new(), flate2::Compression::new(1)).expect("new");
        for piece in data.chunks(100_003) {
            gz.write_all(piece).expect("write");
        }
        gz.finish().expect("finish")
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut back)
            .expect("decode");
        back
    }

    #[test]
    fn flat_data_is_stored_and_the_rest_deflated() {
        // Random data: stored blocks, a few bytes per 64 KiB over the input. Level 1's
        // fixed codes (the control) grow it by ~6%, so a miss of the test shows here.
        let random = noise(3 * CHUNK + 777, 1);
        let out = gzip_all(&random);
        assert_eq!(gunzip(&out), random);
        assert!(
            out.len() < random.len() + random.len() / 1000,
            "random data stored: {} -> {}",
            random.len(),
            out.len()
        );
        let mut plain = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        plain.write_all(&random).expect("write");
        let control = plain.finish().expect("finish");
        assert!(
            control.len() > random.len() + random.len() / 50,
            "control: plain level 1 grows random data ({} -> {})",
            random.len(),
            control.len()
        );

        // Text alone still shrinks as much as plain deflate makes it.
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i} of a text file\n").into_bytes())
            .collect();
        let out = gzip_all(&text);
        assert_eq!(gunzip(&out), text);
        assert!(out.len() * 5 < text.len(), "text deflated: {}", out.len());

        // Files of half noise, half text (the bench's shape), cut at every odd size:
        // stored and deflated runs alternate inside each chunk, and a deflated run after a
        // stored one must not refer back past it (the decoder would read the stored bytes).
        let (mut mixed, mut noisy) = (Vec::new(), 0);
        for f in 0..300u64 {
            let n = 11_000 + (f as usize * 37) % 5000;
            noisy += n;
            mixed.extend(noise(n, f + 2));
            let line = format!("isula-build file {f:05} ");
            while mixed.len() % 20_480 != 0 {
                mixed.push(line.as_bytes()[mixed.len() % line.len()]);
            }
        }
        let out = gzip_all(&mixed);
        assert_eq!(gunzip(&out), mixed);
        // The noise costs its size, the text a fraction of its own.
        let text_len = mixed.len() - noisy;
        assert!(
            out.len() < noisy + noisy / 100 + text_len / 4,
            "mixed: {} ({noisy} noise) -> {}",
            mixed.len(),
            out.len()
        );
    }

    /// A reader that gives at most `step` bytes a read, and an interruption now and then.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn reading_gives_the_gzip_writing_gives() {
        // Pieces that went round hold earlier bytes: what they held must never leak out.
        let earlier = gzip_all(&noise(5 * CHUNK, 11));
        assert!(!earlier.is_empty());
        for size in [0usize, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 4321] {
            let mut data = noise(size, size as u64 + 1);
            for (i, b) in data.iter_mut().enumerate() {
                if (i / 3000) % 2 == 0 {
                    *b = b'a' + (i % 7) as u8;
                }
            }
            let written = gzip_all(&data);
            for step in [1000, 300_001, 4 * CHUNK] {
                let mut gz =
                    ParallelGzip::new(Vec::new(), flate2::Compression::new(1)).expect("new");
                let mut r = Trickle {
                    data: &data,
                    step,
                    calls: 0,
                };
                assert_eq!(gz.read_from(&mut r).expect("read"), size as u64);
                let read = gz.finish().expect("finish");
                assert_eq!(read, written, "size {size}, {step} bytes a read");
            }
            assert_eq!(gunzip(&written), data, "size {size}");
        }
        // A read error comes out, naming nothing else.
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut gz = ParallelGzip::new(Vec::new(), flate2::Compression::new(1)).expect("new");
        let e = gz.read_from(&mut Broken).expect_err("the error");
        assert_eq!(e.to_string(), "disk on fire");
    }

    /// The flatness test as first written (a histogram, then the sum of its squares): the
    /// counting by pairs must decide every block alike.
    fn incompressible_by_histogram(block: &[u8]) -> bool {
        if block.len() < PROBE {
            return false;
        }
        let mut counts = [0u32; 256];
        for b in block {
            counts[usize::from(*b)] += 1;
        }
        let n = block.len() as u64;
        let sum_sq: u64 = counts.iter().map(|&c| u64::from(c) * u64::from(c)).sum();
        let uniform = n + n * (n - 1) / 256;
        sum_sq * 100 <= uniform * 115 && sum_sq * 100 >= uniform * 85
    }

    #[test]
    fn counting_pairs_decides_as_the_histogram_does() {
        // Blocks on both sides of each bound and near them: noise mixed with a growing
        // share of text, of one repeated byte and of a ramp, and noise of few values.
        let text: Vec<u8> = b"isula-build bench 00042 fn main() { println!(\"hi\"); }\n"
            .iter()
            .cycle()
            .take(PROBE)
            .copied()
            .collect();
        let ramp: Vec<u8> = (0..PROBE).map(|i| (i * 7) as u8).collect();
        let (mut flat, mut not) = (0, 0);
        for seed in 0..400u64 {
            let noise = noise(PROBE, seed + 1);
            for other in [&text, &ramp, &vec![b' '; PROBE]] {
                for share in [0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512] {
                    let mut block = noise.clone();
                    let at = (seed as usize * 13) % (PROBE - share + 1);
                    block[at..at + share].copy_from_slice(&other[..share]);
                    let want = incompressible_by_histogram(&block);
                    assert_eq!(incompressible(&block), want, "seed {seed} share {share}");
                    if want {
                        flat += 1;
                    } else {
                        not += 1;
                    }
                }
            }
            // Noise of 64 to 250 values: fuller than chance, on and off the lower bound.
            for values in [64u64, 128, 200, 230, 250] {
                let block: Vec<u8> = noise
                    .iter()
                    .map(|&b| (u64::from(b) * values / 256) as u8)
                    .collect();
                assert_eq!(incompressible(&block), incompressible_by_histogram(&block));
            }
        }
        // Both answers were given many times (the comparison is not one-sided).
        assert!(flat > 1000 && not > 1000, "flat {flat}, not {not}");
    }

    #[test]
    fn the_flatness_test_tells_noise_from_text_and_code() {
        assert!(incompressible(&noise(PROBE, 9)));
        assert!(!incompressible(&[0u8; PROBE]));
        // Flatter than chance: a ramp through every byte value, which deflate shrinks.
        let ramp: Vec<u8> = (0..PROBE).map(|i| i as u8).collect();
        assert!(!incompressible(&ramp));
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n"
            .iter()
            .cycle()
            .take(PROBE)
            .copied()
            .collect();
        assert!(!incompressible(&text));
        // Half noise, half text: deflated.
        let mut half = noise(PROBE / 2, 3);
        half.extend_from_slice(&text[..PROBE / 2]);
        assert!(!incompressible(&half));
        // A short tail is always deflated.
        assert!(!incompressible(&noise(PROBE - 1, 4)));
        // Every random block of a long run is recognised (the 3% spread is well inside
        // the 15% margin).
        let long = noise(PROBE * 2000, 5);
        assert!(long.chunks(PROBE).all(incompressible));
    }

    #[test]
    fn tee_copies_everything_until_its_receiver_goes() {
        let (tx, rx) = sync_channel(64);
        let mut gz = ParallelGzip::new(
            Tee {
                inner: Vec::new(),
                side: Some(side_channel(tx)),
            },
            flate2::Compression::new(1),
        )
        .expect("new");
        let data = vec![7u8; 3 * CHUNK + 5];
        gz.write_all(&data).expect("write");
        let out = gz.finish().expect("finish");
        drop(out.side);
        let copied: Vec<u8> = rx.iter().flatten().collect();
        assert_eq!(copied, out.inner, "the side saw the whole gzip");

        let (tx, rx) = sync_channel(1);
        drop(rx);
        let mut tee = Tee {
            inner: Vec::new(),
            side: Some(side_channel(tx)),
        };
        tee.write_all(b"abc").expect("a gone receiver is no error");
        tee.write_all(b"def").expect("write");
        assert_eq!(tee.inner, b"abcdef");
        assert!(tee.side.is_none());
    }
}
