//! A writer that hands its bytes to a thread of its own, in chunks, so that what produces
//! them (a layer's tar walk, an unpack) and what consumes them (hashing and writing a blob)
//! run on two cores at once. Memory stays bounded: a few chunks in flight at most.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes gathered before a chunk is handed over.
const CHUNK: usize = 1 << 20;
/// Chunks waiting for the consumer before a write blocks.
const IN_FLIGHT: usize = 2;

pub struct ThreadedWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<(W, io::Result<()>)>>,
}

impl<W: Write + Send + 'static> ThreadedWriter<W> {
    pub fn new(inner: W) -> io::Result<ThreadedWriter<W>> {
        let (tx, rx) = sync_channel::<Vec<u8>>(IN_FLIGHT);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let handle = std::thread::Builder::new()
            .name("blob-writer".into())
            .spawn(move || {
                let mut inner = inner;
                let mut result = Ok(());
                for chunk in rx {
                    if result.is_ok() {
                        if let Err(e) = inner.write_all(&chunk) {
                            flag.store(true, Ordering::SeqCst);
                            result = Err(e);
                        }
                    }
                }
                if result.is_ok() {
                    result = inner.flush();
                }
                (inner, result)
            })?;
        Ok(ThreadedWriter {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            failed,
            handle: Some(handle),
        })
    }

    /// The consumer's own error, once it has stopped.
    fn consumer_error(&mut self) -> io::Error {
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok((_, Err(e)))) => e,
            Some(Err(_)) => io::Error::other("the blob writer thread stopped unexpectedly"),
            _ => io::Error::other("the blob writer has stopped"),
        }
    }

    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.consumer_error()),
        }
    }

    /// Waits until every byte is written; returns the inner writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.hand_over()?;
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok((w, Ok(())))) => Ok(w),
            Some(Ok((_, Err(e)))) => Err(e),
            Some(Err(_)) => Err(io::Error::other(
                "the blob writer thread stopped unexpectedly",
            )),
            None => Err(io::Error::other("the blob writer has stopped")),
        }
    }
}

impl<W: Write + Send + 'static> Write for ThreadedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.consumer_error());
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }

    /// Bytes are handed over in chunks; `into_inner` is what waits for them.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for ThreadedWriter<W> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_every_byte_in_order() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = ThreadedWriter::new(Vec::new()).expect("writer");
        for piece in data.chunks(777) {
            w.write_all(piece).expect("write");
        }
        assert!(w.into_inner().expect("inner") == data);
    }

    struct FailsAfter(usize);

    impl Write for FailsAfter {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.0 < b.len() {
                return Err(io::Error::other("disk full"));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_consumers_error_reaches_the_producer() {
        let mut w = ThreadedWriter::new(FailsAfter(3 << 20)).expect("writer");
        let piece = vec![0u8; 64 << 10];
        let mut err = None;
        for _ in 0..1000 {
            if let Err(e) = w.write_all(&piece) {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => e,
            None => w.into_inner().err().expect("an error at the end"),
        };
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
