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

type Job = (Vec<u8>, bool, SyncSender<io::Result<Vec<u8>>>);

pub struct ParallelGzip<W: Write + Send + 'static> {
    buf: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    order: Option<SyncSender<Receiver<io::Result<Vec<u8>>>>>,
    workers: Vec<JoinHandle<()>>,
    collector: Option<JoinHandle<io::Result<W>>>,
    crc: flate2::Crc,
}

fn deflate_chunk(data: &[u8], last: bool, level: flate2::Compression) -> io::Result<Vec<u8>> {
    let mut enc =
        flate2::write::DeflateEncoder::new(Vec::with_capacity(data.len() / 2 + 64), level);
    enc.write_all(data)?;
    if last {
        return enc.finish();
    }
    // A sync flush ends the piece on a byte boundary without a final block; the encoder's
    // own finish on drop then writes into the emptied vector, which is discarded.
    enc.flush()?;
    Ok(std::mem::take(enc.get_mut()))
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
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((data, last, reply)) = job else { return };
                        let _ = reply.send(deflate_chunk(&data, last, level));
                    })?,
            );
        }
        let (order_tx, order_rx) = sync_channel::<Receiver<io::Result<Vec<u8>>>>(IN_FLIGHT);
        let collector = std::thread::Builder::new()
            .name("gzip-collect".into())
            .spawn(move || {
                for piece in order_rx {
                    let bytes = piece
                        .recv()
                        .map_err(|_| io::Error::other("a gzip worker stopped"))??;
                    out.write_all(&bytes)?;
                }
                Ok(out)
            })?;
        Ok(ParallelGzip {
            buf: Vec::with_capacity(CHUNK),
            jobs: Some(jobs_tx),
            order: Some(order_tx),
            workers,
            collector: Some(collector),
            crc: flate2::Crc::new(),
        })
    }

    fn send(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { CHUNK }),
        );
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
        out.write_all(&self.crc.sum().to_le_bytes())?;
        out.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(out)
    }
}

impl<W: Write + Send + 'static> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.crc.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let n = (CHUNK - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == CHUNK {
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
