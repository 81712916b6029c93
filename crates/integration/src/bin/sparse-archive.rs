//! Writes a docker-archive whose one layer holds `GIB` gibibytes of zero-filled files, as a
//! sparse file: the archive takes almost no disk, yet a load reads, hashes, stores and
//! unpacks every byte. For the big-load part of `scripts/soak.sh`.
//!
//!     sparse-archive GIB OUT.tar REPO:TAG

use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};

const FILE_BYTES: u64 = 1 << 30;

fn header(path: &str, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).expect("path");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    out
}

/// The layer: (header, zero bytes after it) per file, then the two end blocks.
fn layer_plan(total: u64) -> Vec<([u8; 512], u64)> {
    let mut plan = Vec::new();
    let mut left = total;
    let mut i = 0;
    while left > 0 {
        let n = left.min(FILE_BYTES);
        plan.push((header(&format!("data/zero-{i:03}.bin"), n), n));
        left -= n;
        i += 1;
    }
    plan
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, gib, out, repo_tag] = &args[..] else {
        eprintln!("usage: sparse-archive GIB OUT.tar REPO:TAG");
        std::process::exit(2);
    };
    let gib: u64 = gib.parse().expect("GIB: a whole number");
    let plan = layer_plan(gib << 30);
    let layer_size: u64 = plan.iter().map(|(_, n)| 512 + n).sum::<u64>() + 1024;

    // The layer's digest: every byte of it, zeros included.
    let zeros = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    for (head, n) in &plan {
        h.update(head);
        let mut left = *n;
        while left > 0 {
            let k = left.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            left -= k as u64;
        }
    }
    h.update([0u8; 1024]);
    let layer_hex = hex::encode(h.finalize());

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": isula_integration::host_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
    }))
    .expect("config");
    let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
    let layer_name = format!("{layer_hex}/layer.tar");
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [repo_tag],
        "Layers": [layer_name],
    }]))
    .expect("manifest");

    let mut f = std::fs::File::create(out).expect("create the archive");
    let small = |f: &mut std::fs::File, name: &str, data: &[u8]| {
        f.write_all(&header(name, data.len() as u64))
            .expect("write");
        f.write_all(data).expect("write");
        let pad = (512 - data.len() % 512) % 512;
        f.write_all(&vec![0u8; pad]).expect("write");
    };
    small(&mut f, &config_name, &config);
    f.write_all(&header(&layer_name, layer_size))
        .expect("write");
    for (head, n) in &plan {
        f.write_all(head).expect("write");
        // A hole reads as zeros.
        f.seek(SeekFrom::Current(*n as i64)).expect("seek");
    }
    f.seek(SeekFrom::Current(1024)).expect("seek");
    small(&mut f, "manifest.json", &manifest);
    let end = f.stream_position().expect("pos") + 1024;
    f.set_len(end).expect("length");
    println!("{out}: {gib} GiB layer sha256:{layer_hex}");
}
