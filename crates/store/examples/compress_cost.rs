//! What each stage of a push that compresses as it uploads costs on this machine: reads a
//! layer tar (argument 1) and runs, alone, the parallel gzip (level 1 and 2), the parallel
//! zstd (levels 1 and 3), zstd:chunked (level 1), the gunzip of level 1's output, sha256
//! and gzip's CRC-32 (zlib-rs's and crc-fast's), printing wall seconds, CPU seconds (this
//! process, all threads) and output bytes (the CRC rows: the value, in millions).
//! `cargo run --release -p isula-store --example compress_cost -- LAYER.tar`: the numbers
//! behind README's "zstd" measurements.

use std::io::{Read, Write};
use std::time::Instant;

fn cpu_seconds() -> f64 {
    // utime + stime of every thread of this process, from /proc (no unsafe here).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// Counts what is written.
struct Count(u64);
impl Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn measure(name: &str, data: &[u8], run: impl FnOnce(&[u8]) -> std::io::Result<u64>) {
    let (t, c) = (Instant::now(), cpu_seconds());
    match run(data) {
        Ok(out) => println!(
            "{name:<24} {:6.2} s wall {:6.2} s CPU {:8.1} MB out",
            t.elapsed().as_secs_f64(),
            cpu_seconds() - c,
            out as f64 / 1e6
        ),
        Err(e) => println!("{name:<24} failed: {e}"),
    }
}

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: compress_cost LAYER.tar"))?;
    let mut data = Vec::new();
    std::fs::File::open(&path)?.read_to_end(&mut data)?;
    println!("{path}: {:.1} MB", data.len() as f64 / 1e6);
    for level in [1, 2] {
        measure(&format!("gzip level {level}"), &data, |d| {
            let mut gz =
                isula_store::pgzip::ParallelGzip::new(Count(0), flate2::Compression::new(level))?;
            gz.write_all(d)?;
            Ok(gz.finish()?.0)
        });
    }
    // What a pull or an unpack of a gzip layer pays to read it: the inflate.
    let mut gz = isula_store::pgzip::ParallelGzip::new(Vec::new(), flate2::Compression::new(1))?;
    gz.write_all(&data)?;
    let gzipped = gz.finish()?;
    measure("gunzip (level 1's)", &gzipped, |d| {
        std::io::copy(&mut flate2::read::MultiGzDecoder::new(d), &mut Count(0))
    });
    drop(gzipped);
    for level in [1, 3] {
        measure(&format!("zstd level {level}"), &data, |d| {
            let mut z = isula_store::compression::parallel_zstd(Count(0), level)?;
            z.write_all(d)?;
            Ok(z.finish()?.0)
        });
    }
    measure("zstd:chunked level 1", &data, |d| {
        let mut out = Count(0);
        isula_store::zstd_chunked::write(d, &mut out, 1)?;
        Ok(out.0)
    });
    measure("sha256", &data, |d| {
        use sha2::Digest;
        let h = sha2::Sha256::digest(d);
        Ok(h.len() as u64)
    });
    // gzip's CRC-32 of the input, in 1 MiB pieces as the push reads them: flate2's
    // (zlib-rs, 128-bit carry-less multiplication) and crc-fast's (512-bit where the CPU has
    // VPCLMULQDQ).
    measure("crc32 flate2", &data, |d| {
        let mut c = flate2::Crc::new();
        d.chunks(1 << 20).for_each(|p| c.update(p));
        Ok(u64::from(c.sum()))
    });
    measure("crc32 crc-fast", &data, |d| {
        let mut c = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32IsoHdlc);
        d.chunks(1 << 20).for_each(|p| c.update(p));
        Ok(c.finalize())
    });
    Ok(())
}
