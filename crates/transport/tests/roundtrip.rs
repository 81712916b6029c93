//! Import, save and load through real stores in temp dirs (needs root for chown and
//! whiteout device nodes; skipped with a message otherwise, except in CI).

use isula_store::Store;
use isula_transport::save::Format;
use isula_transport::{import, load, save, AsDaemon, Cancel, TransportError};
use isula_types::Reference;
use std::io::Write;
use std::path::Path;

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "these tests must run as root in CI"
    );
    eprintln!("skipping: needs root (outside CI)");
    false
}

fn rootfs_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("bin/sh", &b"#!fake shell"[..]), ("etc/hostname", b"box\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gz");
    e.finish().expect("gz")
}

fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs/sha256", "layers", "ingest", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd.flatten() {
                out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    out.push(std::fs::read_to_string(dir.join("metadata.json")).unwrap_or_default());
    out.sort();
    out
}

fn save_busybox(store: &Store, out: &Path, format: Format) -> Result<(), TransportError> {
    save::save(
        store,
        &AsDaemon,
        &["busybox".into()],
        out,
        format,
        &Cancel::default(),
        &mut |_| {},
    )
}

#[test]
fn import_save_load_round_trip() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(&tmp.path().join("a")).expect("store");
    let src = tmp.path().join("rootfs.tar.gz");
    std::fs::write(&src, gz(&rootfs_tar())).expect("write");
    let r = Reference::parse("busybox:latest").expect("ref");
    let mut lines = Vec::new();
    let id = import::import(
        &store,
        &AsDaemon,
        &src,
        Some(&r),
        &Cancel::default(),
        &mut |l| lines.push(l),
    )
    .expect("import");
    assert!(lines
        .last()
        .expect("lines")
        .starts_with("Import success with image id: "));
    assert_eq!(store.resolve("busybox").expect("resolve").id, id);
    assert_eq!(store.resolve(&id.hex()[..6]).expect("prefix").id, id);

    for format in [Format::Docker, Format::Oci] {
        let out = tmp.path().join(format!("{format:?}.tar"));
        save_busybox(&store, &out, format).expect("save");
        // Refuses to overwrite.
        let again = save_busybox(&store, &out, format);
        assert!(matches!(again, Err(TransportError::Exists(_))), "{again:?}");
        let dir = tmp.path().join(format!("store-{format:?}"));
        let (other, _) = Store::open(&dir).expect("store");
        let loaded =
            load::load(&other, &AsDaemon, &out, &Cancel::default(), &mut |_| {}).expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, id);
        let img = other.resolve("busybox:latest").expect("tag survived");
        assert_eq!(img.id, id);
        // The loaded layer stays packed (its blob alone) until something needs it.
        assert!(
            !other.layer_dir(&img.layers[0]).exists(),
            "unpacked at load"
        );
        assert!(other.check().expect("check").is_sound());
        let lease = other.lease();
        let diff = other.layer_diff(&img.layers[0], &lease).expect("unpack");
        drop(lease);
        assert_eq!(diff, other.layer_dir(&img.layers[0]).join("diff"));
        assert_eq!(
            std::fs::read(diff.join("etc/hostname")).expect("file"),
            b"box\n"
        );
        assert!(other.check().expect("check").is_sound());
        // Saving again from the loaded store gives the same bytes.
        let out2 = tmp.path().join(format!("{format:?}-2.tar"));
        save_busybox(&other, &out2, format).expect("save");
        assert_eq!(
            std::fs::read(&out).expect("a"),
            std::fs::read(&out2).expect("b")
        );
    }
}

#[test]
fn bad_inputs_leave_store_unchanged() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("s");
    let (store, _) = Store::open(&dir).expect("store");
    let good = tmp.path().join("good.tar");
    std::fs::write(&good, rootfs_tar()).expect("write");
    import::import(
        &store,
        &AsDaemon,
        &good,
        None,
        &Cancel::default(),
        &mut |_| {},
    )
    .expect("import");
    let before = snapshot(&dir);

    // ../ entry
    let mut raw = rootfs_tar();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b""[..]).expect("append");
    let evil = b.into_inner().expect("tar");
    let dotdot = tmp.path().join("dotdot.tar");
    std::fs::write(&dotdot, &evil).expect("write");
    let e = import::import(
        &store,
        &AsDaemon,
        &dotdot,
        None,
        &Cancel::default(),
        &mut |_| {},
    )
    .expect_err("dotdot");
    assert!(e.to_string().contains("'..'"), "{e}");

    // truncated gzip
    raw = gz(&raw);
    let trunc = tmp.path().join("trunc.tar.gz");
    std::fs::write(&trunc, &raw[..raw.len() / 2]).expect("write");
    let e = import::import(
        &store,
        &AsDaemon,
        &trunc,
        None,
        &Cancel::default(),
        &mut |_| {},
    )
    .expect_err("truncated");
    assert!(!e.to_string().is_empty());

    // over the import limit (sparse file)
    let big = tmp.path().join("big.tar");
    std::fs::File::create(&big)
        .expect("create")
        .set_len(isula_types::limits::IMPORT_MAX + 1)
        .expect("len");
    let e = import::import(
        &store,
        &AsDaemon,
        &big,
        None,
        &Cancel::default(),
        &mut |_| {},
    )
    .expect_err("big");
    assert!(matches!(e, TransportError::TooLarge { .. }), "{e}");

    assert_eq!(snapshot(&dir), before);
}

/// Imports `layer` (a tar, plain or gzipped) as busybox:latest into a store under `tmp/a`,
/// saves it as a docker-archive (which holds the layer as a plain tar) and loads that into
/// a store at `root`. Returns that store, the layer's blob there and the archive.
fn loaded_copy(
    tmp: &Path,
    layer: &[u8],
    root: &Path,
) -> (Store, isula_types::Digest, std::path::PathBuf) {
    let (a, _) = Store::open(&tmp.join("a")).expect("store");
    let src = tmp.join("layer.tar");
    std::fs::write(&src, layer).expect("write");
    let r = Reference::parse("busybox:latest").expect("ref");
    import::import(
        &a,
        &AsDaemon,
        &src,
        Some(&r),
        &Cancel::default(),
        &mut |_| {},
    )
    .expect("import");
    let archive = tmp.join("a.tar");
    save_busybox(&a, &archive, Format::Docker).expect("save");
    let (b, _) = Store::open(root).expect("store");
    load::load(&b, &AsDaemon, &archive, &Cancel::default(), &mut |_| {}).expect("load");
    let blob = b.resolve("busybox:latest").expect("loaded").blobs[0].clone();
    (b, blob, archive)
}

/// Writes `data` over the read-only file at `path`, in place (its inode stays).
fn rewrite_in_place(path: &Path, data: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .expect("rewrite");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
}

/// A blob this daemon wrote is copied into an archive without being hashed again, but only
/// while its file is the one it wrote: a blob changed behind the store's back is hashed,
/// refused, and leaves no archive; after a restart every blob is hashed once more.
#[test]
fn save_hashes_again_a_blob_whose_file_changed_or_that_another_run_wrote() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("b");
    let (b, blob, archive) = loaded_copy(tmp.path(), &gz(&rootfs_tar()), &root);
    let img = b.resolve("busybox:latest").expect("loaded");
    assert_eq!(b.layer(&img.layers[0]).expect("layer").diff_id.0, blob);
    assert!(
        b.content().known_intact(&blob),
        "the load wrote and hashed it"
    );
    let out = tmp.path().join("b1.tar");
    save_busybox(&b, &out, Format::Docker).expect("save");
    assert_eq!(
        std::fs::read(&out).expect("b1"),
        std::fs::read(&archive).expect("a")
    );

    // Another run of the daemon on the same store: nothing is known, the save hashes the
    // blob and vouches for it after.
    drop(b);
    let (b, _) = Store::open(&root).expect("reopen");
    assert!(!b.content().known_intact(&blob), "a new run knows no blob");
    let out = tmp.path().join("b2.tar");
    save_busybox(&b, &out, Format::Docker).expect("save after a restart");
    assert!(b.content().known_intact(&blob), "hashed whole by the save");

    // The same bytes written over the blob (same size and content, a new change time)
    // still count as a change; so does one byte flipped.
    let path = b.content().path(&blob);
    let bytes = std::fs::read(&path).expect("blob");
    let rewrite = |data: &[u8]| rewrite_in_place(&path, data);
    rewrite(&bytes);
    assert!(!b.content().known_intact(&blob), "rewritten in place");
    let mut bad = bytes.clone();
    let mid = bad.len() / 3;
    bad[mid] ^= 0x20;
    rewrite(&bad);
    let out = tmp.path().join("b3.tar");
    let e = save_busybox(&b, &out, Format::Docker).expect_err("a damaged blob");
    assert!(e.to_string().contains("digest"), "{e}");
    assert!(!out.exists(), "no archive from a damaged blob");
    assert!(!b.content().known_intact(&blob));
    // Put right, it is hashed and saved again.
    rewrite(&bytes);
    save_busybox(&b, &out, Format::Docker).expect("save of the mended blob");
    assert!(b.content().known_intact(&blob));
}

/// A blob copied without a new hash must be the same file, unchanged, from the first byte
/// read to the last: one rewritten (with the very same bytes) while the save copies it
/// fails the save, and the next save hashes it again.
#[test]
fn a_blob_changed_while_a_save_copies_it_fails_the_save() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // A layer of a few MiB, so the save reports progress before the copy ends.
    let mut b = tar::Builder::new(Vec::new());
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 7 % 253) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "big.bin", &data[..]).expect("append");
    let (b, blob, archive) = loaded_copy(
        tmp.path(),
        &b.into_inner().expect("tar"),
        &tmp.path().join("b"),
    );
    assert!(b.content().known_intact(&blob));
    let path = b.content().path(&blob);
    let bytes = std::fs::read(&path).expect("blob");
    assert!(bytes.len() > 2 << 20);

    let out = tmp.path().join("b.tar");
    let mut rewritten = false;
    let mut progress = |_line: String| {
        if !rewritten {
            rewritten = true;
            // In place, as the same bytes: the handle the save reads sees the change.
            rewrite_in_place(&path, &bytes);
        }
    };
    let e = save::save(
        &b,
        &AsDaemon,
        &["busybox".into()],
        &out,
        Format::Docker,
        &Cancel::default(),
        &mut progress,
    )
    .expect_err("changed during the copy");
    assert!(rewritten, "the save reported progress during the copy");
    assert!(e.to_string().contains("changed while it was copied"), "{e}");
    assert!(!out.exists(), "no archive");
    assert!(!b.content().known_intact(&blob));
    // The next save hashes it (the bytes are right) and vouches for it again.
    save_busybox(&b, &out, Format::Docker).expect("save");
    assert_eq!(
        std::fs::read(&out).expect("b"),
        std::fs::read(&archive).expect("a")
    );
    assert!(b.content().known_intact(&blob));
}
