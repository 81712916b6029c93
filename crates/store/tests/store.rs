//! Store behaviour without any archive format: names, lookups, removal, leases and gc,
//! metadata surviving a reopen.

use isula_store::{LayerRecord, NewImage, RemoveEvent, Store, StoreError};
use isula_types::{ChainId, DiffId, ImageId, Reference};

/// Records an image with one layer: a file whose content is `tag` (its blob the tar of it).
fn add(store: &Store, tag: &str, names: &[&str]) -> ImageId {
    let lease = store.lease();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(tag.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "file", tag.as_bytes())
        .expect("append");
    let tar = b.into_inner().expect("tar");
    let layer_blob = store.content().put(&tar).expect("blob");
    let diff = DiffId(layer_blob.clone());
    let chain = ChainId::next(None, &diff);
    let staged = store.stage_layer().expect("stage");
    isula_store::apply::apply_layer(&tar[..], &staged.diff_dir()).expect("unpack");
    store
        .commit_layer(staged, &chain, &lease)
        .expect("commit layer");
    let config = store
        .content()
        .put(format!("config {tag}").as_bytes())
        .expect("config");
    let manifest = store
        .content()
        .put(format!("manifest {tag}").as_bytes())
        .expect("manifest");
    let id = ImageId(config);
    store
        .add_image(NewImage {
            id: id.clone(),
            manifest,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            blobs: vec![layer_blob],
            layers: vec![LayerRecord {
                chain_id: chain,
                diff_id: diff,
                parent: None,
                size: 10,
            }],
            created: Some("2020-01-01T00:00:00Z".into()),
            names: names
                .iter()
                .map(|n| Reference::parse(n).expect("ref"))
                .collect(),
        })
        .expect("add");
    id
}

#[test]
fn names_move_and_resolve() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let a = add(&store, "a", &["app:1", "app:latest"]);
    let b = add(&store, "b", &["app:1"]);
    assert_eq!(
        store.resolve("app:1").expect("app:1").id,
        b,
        "the name moved to b"
    );
    assert_eq!(store.resolve("app").expect("app").id, a);
    assert_eq!(
        store
            .resolve("docker.io/library/app:latest")
            .expect("full")
            .id,
        a
    );
    assert_eq!(store.resolve(a.digest().as_str()).expect("full id").id, a);
    assert_eq!(store.resolve(&a.hex()[..12]).expect("short id").id, a);
    assert!(matches!(
        store.resolve("nope"),
        Err(StoreError::ImageNotFound(_))
    ));
    // Among 17 images two share a first hex digit (pigeonhole): that prefix is ambiguous.
    let mut ids = vec![a.clone(), b.clone()];
    for i in 0..15 {
        ids.push(add(&store, &format!("extra{i}"), &[]));
    }
    let first = |id: &ImageId| id.hex()[..1].to_string();
    let shared = ids
        .iter()
        .find(|x| ids.iter().filter(|y| first(y) == first(x)).count() > 1)
        .map(first)
        .expect("pigeonhole");
    assert!(matches!(
        store.resolve(&shared),
        Err(StoreError::AmbiguousImage { .. })
    ));
    store
        .tag(&b, &Reference::parse("other/app:2").expect("ref"))
        .expect("tag");
    assert_eq!(store.image(&b).expect("b").names.len(), 2);
}

fn layer_of(store: &Store, id: &ImageId) -> ChainId {
    store.image(id).expect("image").layers[0].clone()
}

#[test]
fn remove_untags_then_deletes_and_collects() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let a = add(&store, "a", &["x:1", "x:2"]);
    let layer = layer_of(&store, &a);
    assert_eq!(
        store.remove("x:1").expect("rm"),
        vec![RemoveEvent::Untagged("x:1".into())]
    );
    assert_eq!(
        store.remove("x:2").expect("rm"),
        vec![
            RemoveEvent::DeletedLayer(layer),
            RemoveEvent::Deleted {
                name: "x:2".into(),
                id: a.clone()
            }
        ]
    );
    assert!(store.images().is_empty());
    assert!(store.content().list().expect("blobs").is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("layers"))
            .expect("layers")
            .count(),
        0
    );
}

#[test]
fn leases_protect_unreferenced_work_from_gc() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let lease = store.lease();
    let blob = store.content().put(b"in flight").expect("put");
    lease.blob(&blob);
    assert_eq!(store.gc().expect("gc").blobs, 0);
    assert!(store.content().contains(&blob));
    drop(lease);
    assert_eq!(store.gc().expect("gc").blobs, 1);
    assert!(!store.content().contains(&blob));
}

#[test]
fn reopen_sweeps_and_keeps_images() {
    let dir = tempfile::tempdir().expect("tmp");
    let id = {
        let (store, _) = Store::open(dir.path()).expect("open");
        let id = add(&store, "a", &["keep:1"]);
        // Leftovers of a crash: an ingest file, a staged layer, an orphan blob.
        std::fs::write(dir.path().join("ingest/partial"), b"half").expect("ingest");
        std::mem::forget(store.stage_layer().expect("stage"));
        store.content().put(b"orphan").expect("orphan");
        // The lock: a second open fails while this one lives.
        assert!(Store::open(dir.path()).is_err());
        id
    };
    let (store, report) = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        (report.swept_ingest, report.swept_tmp, report.gc.blobs),
        (1, 1, 1)
    );
    assert_eq!(store.resolve("keep:1").expect("kept").id, id);
    assert!(store.check().expect("check").is_sound());
    // Corruption is found by check.
    let blob = store.image(&id).expect("img").blobs[0].clone();
    let path = store.content().path(&blob);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    std::fs::write(&path, b"tampered").expect("tamper");
    let problems = store.check().expect("check").problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(blob.as_str()) && problems[0].contains("digest mismatch"));
    // It names the image that uses the blob.
    assert!(
        problems[0].contains("used by image(s) keep:1"),
        "{problems:?}"
    );
}

const EXT4_SUPER_MAGIC: i64 = 0xEF53;

fn is_ext4(path: &std::path::Path) -> bool {
    rustix::fs::statfs(path).expect("statfs").f_type as i64 == EXT4_SUPER_MAGIC
}

/// A small ext4 file system on a loop device (a sparse image file), for a test that needs
/// ext4 where the machine has none at hand; unmounted (which frees the loop device) and
/// removed when dropped.
struct LoopExt4 {
    /// Holds the image and the mount point.
    dir: tempfile::TempDir,
}

impl LoopExt4 {
    /// None where it cannot be made: without root or mkfs.ext4, outside CI (saying so). In
    /// CI those fail the test, as does any other failure anywhere.
    fn mount() -> Option<LoopExt4> {
        let missing = if !rustix::process::geteuid().is_root() {
            Some("root")
        } else if !std::process::Command::new("sh")
            .args(["-c", "command -v mkfs.ext4"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            Some("mkfs.ext4")
        } else {
            None
        };
        if let Some(missing) = missing {
            assert!(
                std::env::var_os("CI").is_none(),
                "making an ext4 on a loop device needs {missing} in CI"
            );
            eprintln!("skipping: no ext4 at hand, and making one needs {missing} (outside CI)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let image = dir.path().join("ext4.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().expect("run");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image));
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        let fs = LoopExt4 { dir };
        assert!(is_ext4(&fs.path()), "the loop mount is no ext4");
        Some(fs)
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        // mount -o loop set the device to free itself at the unmount.
        let mnt = self.path();
        if let Err(e) = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()) {
            eprintln!("unmounting {}: {e}; detaching it", mnt.display());
            let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

#[test]
fn staged_layers_are_made_under_a_top_directory_on_ext4() {
    // /var/tmp is on the disk on the machines the tests run on; where it is no ext4, one
    // on a loop device stands in. Dropped after the store in it.
    let loop_fs;
    let parent = if is_ext4(std::path::Path::new("/var/tmp")) {
        std::path::PathBuf::from("/var/tmp")
    } else {
        let Some(fs) = LoopExt4::mount() else {
            return;
        };
        loop_fs = fs;
        loop_fs.path()
    };
    let dir = tempfile::tempdir_in(&parent).expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let tmp = rustix::fs::open(
        dir.path().join("tmp"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open tmp");
    assert_eq!(
        rustix::fs::fstatfs(&tmp).expect("statfs").f_type as i64,
        EXT4_SUPER_MAGIC
    );
    let flags = rustix::fs::ioctl_getflags(&tmp).expect("flags");
    assert!(
        flags.contains(rustix::fs::IFlags::TOPDIR),
        "the store's tmp/ is not marked a top directory: {flags:?}"
    );
    let staged = store.stage_layer().expect("stage");
    assert!(staged.diff_dir().starts_with(dir.path().join("tmp")));
}

/// Records an image named `name` of `blobs` and `layers` under `lease` (its config and
/// manifest are placeholders naming it): the set-up the image tests share.
fn add_named_image(
    store: &Store,
    lease: &isula_store::Lease,
    name: &str,
    blobs: Vec<isula_types::Digest>,
    layers: Vec<LayerRecord>,
) -> ImageId {
    let config = lease
        .put_blob(store.content(), format!("config of {name}").as_bytes())
        .expect("config");
    let manifest = lease
        .put_blob(store.content(), format!("manifest of {name}").as_bytes())
        .expect("manifest");
    let id = ImageId(config);
    store
        .add_image(NewImage {
            id: id.clone(),
            manifest,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            blobs,
            layers,
            created: None,
            names: vec![Reference::parse(name).expect("ref")],
        })
        .expect("add");
    id
}

/// Records an image named `name` whose one layer blob is `data` (no layer directory: the
/// compressor needs the blob alone).
fn add_blob_image(store: &Store, name: &str, data: &[u8]) -> (ImageId, isula_types::Digest) {
    let lease = store.lease();
    let blob = lease.put_blob(store.content(), data).expect("put");
    let id = add_named_image(store, &lease, name, vec![blob.clone()], Vec::new());
    (id, blob)
}

/// Polls `done` (the background worker has no signal to wait on) for at most 30 s.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn no_layer_is_gzipped_in_idle_time_and_a_push_makes_and_keeps_its_gzip() {
    let dir = tempfile::tempdir().expect("tmp");
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 89) as u8).collect();
    let (built, plain, gz_blob) = {
        let (store, _) = Store::open(dir.path()).expect("open");
        // A built layer: its blob is its files' tar, kept as the files alone.
        let lease = store.lease();
        let staged = store.stage_layer().expect("stage");
        std::fs::write(staged.diff_dir().join("data"), &data).expect("write");
        let (diff, chain, size) = store
            .commit_built_layer(staged, None, None, &lease)
            .expect("commit");
        let config = lease
            .put_blob(store.content(), b"config built")
            .expect("config");
        store
            .add_image(NewImage {
                id: ImageId(config.clone()),
                manifest: config,
                manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                blobs: vec![diff.0.clone()],
                layers: vec![LayerRecord {
                    chain_id: chain,
                    diff_id: diff.clone(),
                    parent: None,
                    size,
                }],
                created: None,
                names: vec![Reference::parse("built:1").expect("ref")],
            })
            .expect("add");
        drop(lease);
        // A stored plain layer (imported or loaded): gzipped only by a push that needs it.
        let (_, plain) = add_blob_image(&store, "a:1", &data);
        // A layer stored gzipped already needs no gzip.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &data).expect("gz");
        let (_, gz_blob) = add_blob_image(&store, "b:1", &enc.finish().expect("gz"));
        // The daemon stopped before the quiet spell came.
        (diff.0, plain, gz_blob)
    };
    let (store, _) = Store::open(dir.path()).expect("reopen");
    std::thread::scope(|s| {
        let worker = s.spawn(|| store.run_compressor());
        // Every job the worker had or was given is done: nothing was compressed.
        background_done(&store, "marker");
        for (what, blob) in [("built", &built), ("plain", &plain), ("gzip", &gz_blob)] {
            assert!(
                store.compressed(blob).is_none(),
                "the {what} layer was gzipped in idle time"
            );
        }
        let ingest = dir.path().join("ingest");
        assert!(std::fs::read_dir(&ingest).is_ok_and(|mut d| d.next().is_none()));
        store.stop_compressor();
        worker.join().expect("compressor thread");
    });
    // The control: a push's gzip of the built layer is made from its files, and kept.
    drop(store);
    let (store, _) = Store::open(dir.path()).expect("reopen");
    let lease = store.lease();
    let (gz, _) = store.gzip_blob(&built, &lease).expect("gzip");
    drop(lease);
    assert_eq!(store.compressed(&built).map(|c| c.digest), Some(gz.clone()));
    let mut back = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(
        store.content().open(&gz).expect("open"),
    ));
    for e in tar.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.path().expect("path").to_str() == Some("data") {
            std::io::Read::read_to_end(&mut e, &mut back).expect("read");
        }
    }
    assert!(back == data, "the gzip holds the built layer's file");
}

#[test]
fn background_work_waits_for_quiet_and_while_an_operation_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let chain = record_packed(&store, "a:1", "later");
    std::thread::scope(|s| {
        // While an operation runs, the background work leaves the machine to it: it sees
        // the operation, waits, and has started nothing.
        let op = store.lease();
        let worker = s.spawn(|| store.run_compressor());
        let _stop = StopCompressor(&store);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while store.compression_deferred() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the background work never looked"
            );
            std::thread::yield_now();
        }
        assert!(
            !store.layer_unpacked(&chain),
            "unpacked during an operation"
        );
        let tmp = dir.path().join("tmp");
        assert!(std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_none()));
        drop(op);
        wait_for("unpacked", || store.layer_unpacked(&chain));
        // No tar digest is taken, then or later: the blob it came from stays, and the
        // check compares the directory with it (once, recording the digest then).
        background_done(&store, "marker");
        let rec = dir_record(dir.path(), &chain);
        assert!(
            rec.get("tree").is_none() && rec["unhashed"] == true,
            "{rec}"
        );
        assert!(store.check().expect("check").is_sound());
        let rec = dir_record(dir.path(), &chain);
        assert!(
            rec["tree"].is_string() && rec.get("unhashed").is_none(),
            "the check records the digest: {rec}"
        );
        store.stop_compressor();
        worker.join().expect("compressor thread");
    });
    // Once nothing holds the layer, its directory and blob go with the image.
    store.remove("a:1").expect("rm");
    assert!(!store.layer_dir(&chain).exists());
    for marker in ["marker0:1", "marker1:1"] {
        store.remove(marker).expect("rm");
    }
    assert!(store.content().list().expect("list").is_empty());
}

#[test]
fn the_zstd_form_is_kept_beside_the_gzip_reused_and_collected_with_its_layer() {
    use isula_types::compression::{Codec, LayerCompression};
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let data = mixed_layer(3_000_000);
    let (_, blob) = add_blob_image(&store, "a:1", &data);
    let zstd = LayerCompression {
        codec: Codec::Zstd,
        level: None,
    };
    let lease = store.lease();
    let (gz, _) = store.gzip_blob(&blob, &lease).expect("gzip");
    // Positive control: no zstd form until one is asked for.
    assert!(store.compressed_form(&blob, Codec::Zstd).is_none());
    let (zs, size, made) = store
        .compressed_blob_streaming(&blob, zstd, &lease, None)
        .expect("zstd");
    assert!(made);
    assert_ne!(zs, gz);
    assert_eq!(store.content().size(&zs).expect("size"), size);
    let back = zstd::decode_all(store.content().open(&zs).expect("open")).expect("unzstd");
    assert!(back == data, "the zstd holds the layer");
    // Both forms are recorded; asking again (at another level) reuses the kept one.
    assert_eq!(store.compressed(&blob).map(|c| c.digest), Some(gz.clone()));
    let (again, _, made) = store
        .compressed_blob_streaming(
            &blob,
            LayerCompression {
                codec: Codec::Zstd,
                level: Some(19),
            },
            &lease,
            None,
        )
        .expect("zstd again");
    assert_eq!((again, made), (zs.clone(), false));
    drop(lease);
    // The record survives a reopen (metadata.json keeps compressed_zstd).
    drop(store);
    let (store, _) = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        store.compressed_form(&blob, Codec::Zstd).map(|c| c.digest),
        Some(zs.clone())
    );
    // A gc while the image stays keeps both; once it is removed, both go.
    store.gc().expect("gc");
    assert!(store.content().contains(&zs) && store.content().contains(&gz));
    store.remove("a:1").expect("rm");
    store.gc().expect("gc");
    for d in [&blob, &gz, &zs] {
        assert!(!store.content().contains(d), "{d} outlived its layer");
    }
    assert!(store.compressed_form(&blob, Codec::Zstd).is_none());
}

#[test]
fn metadata_without_zstd_forms_loads() {
    // A metadata.json written before zstd forms (no compressed_zstd key) loads as before.
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("metadata.json"),
        r#"{"schema":1,"images":{},"layers":{},"compressed":{},"dirs_recorded":true}"#,
    )
    .expect("write");
    let meta = isula_store::metadata::Metadata::load(&dir.path().join("metadata.json"))
        .expect("an older metadata.json loads");
    assert!(meta.compressed_zstd.is_empty());
}

/// What the layers of real images hold, roughly: stretches of incompressible bytes (a
/// xorshift stream) between stretches of text.
fn mixed_layer(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        for _ in 0..1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        for i in 0..400 {
            out.extend_from_slice(format!("line {i} of a text file in a layer\n").as_bytes());
        }
    }
    out.truncate(len);
    out
}

#[test]
fn a_push_gzip_stores_what_deflate_cannot_shrink_and_gnu_gzip_reads_it() {
    // Files of noise and text, the text of each its own (as the bench's): what stops a
    // deflated stretch from referring back past a stored one costs nothing here.
    let mut data = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for f in 0..200 {
        for _ in 0..1400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        let line = format!("isula-build file {f:05} ");
        while data.len() % 20_480 != 0 {
            data.push(line.as_bytes()[data.len() % line.len()]);
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let (_, blob) = add_blob_image(&store, "a:1", &data);
    let lease = store.lease();
    let (gz, size) = store.gzip_blob(&blob, &lease).expect("gzip");
    drop(lease);
    // Another implementation (GNU gzip, as registries' clients would) reads it back whole.
    let out = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(store.content().path(&gz))
        .output()
        .expect("run gzip");
    assert!(out.status.success(), "gzip -dc: {out:?}");
    assert!(out.stdout == data, "gzip -dc gives back the layer");
    // The control: plain level 1 (fixed codes) grows the random stretches by ~6%; stored,
    // they cost their size.
    let mut plain = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    std::io::Write::write_all(&mut plain, &data).expect("gz");
    let control = plain.finish().expect("gz").len() as u64;
    assert!(
        size * 100 < control * 97,
        "push gzip {size} bytes, plain level 1 {control} bytes"
    );
}

#[test]
fn background_unpack_stops_when_an_operation_starts_and_resumes_after() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    // Enough files to be caught half way.
    let chain = record_packed_tar(&store, "big:1", &many_files_tar(20_000));
    let staging = || staged_files(dir.path());
    std::thread::scope(|s| {
        let _stop = StopCompressor(&store);
        let worker = s.spawn(|| store.run_compressor());
        catch_unpacking(&store, dir.path(), &chain);
        let op = store.lease();
        // It stops, and what it wrote so far goes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while staging() {
            assert!(std::time::Instant::now() < deadline, "it did not stop");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            !store.layer_unpacked(&chain),
            "it finished with an operation running"
        );
        drop(op);
        wait_for("unpacked", || store.layer_unpacked(&chain));
        drop(_stop);
        worker.join().expect("compressor thread");
    });
    assert!(store.check().expect("check").is_sound());
}

/// A layer tar of `n` files of 2 KiB.
fn many_files_tar(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let body = vec![b'x'; 2048];
    for i in 0..n {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i:05}"), &body[..])
            .expect("append");
    }
    b.into_inner().expect("tar")
}

/// Waits, polling every millisecond (an unpack of `many_files_tar(20_000)` lasts a few
/// hundred), until the background unpack of `chain` has files staged and is not done.
fn catch_unpacking(store: &Store, root: &std::path::Path, chain: &ChainId) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !staged_files(root) {
        assert!(!store.layer_unpacked(chain), "the unpack ended unseen");
        assert!(std::time::Instant::now() < deadline, "no unpack started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Returns once every job the running background worker had is done. It does two small
/// unpacks, each recorded and queued after the one before is done: the first proves the
/// worker has run its start-up scan (it queues what is left from before), the second,
/// queued behind everything since, that the worker has taken up every job before it
/// (it does them one at a time, in order; a job that stopped goes back to the front).
fn background_done(store: &Store, prefix: &str) {
    for i in 0..2 {
        let chain = record_packed(store, &format!("{prefix}{i}:1"), &format!("{prefix} {i}"));
        store.queue_unpack(&chain);
        wait_for("the marker unpacked", || store.layer_unpacked(&chain));
    }
}

/// The record of layer `chain`'s directory in the store's metadata.
fn dir_record(root: &std::path::Path, chain: &ChainId) -> serde_json::Value {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("metadata.json")).expect("metadata"))
            .expect("json");
    meta["dirs"]
        .as_object()
        .and_then(|d| d.iter().find(|(k, _)| k.contains(chain.hex())))
        .map(|(_, v)| v.clone())
        .expect("the directory's record")
}

/// Whether an unpack has files staged under the store's `tmp/`.
fn staged_files(root: &std::path::Path) -> bool {
    std::fs::read_dir(root.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_dir(e.path().join("diff")).is_ok_and(|mut d| d.next().is_some()))
}

/// Stops the background work however a test ends (a failed assertion must not leave its
/// scope waiting for the worker).
struct StopCompressor<'a>(&'a Store);

impl Drop for StopCompressor<'_> {
    fn drop(&mut self) {
        self.0.stop_compressor();
    }
}

/// A layer tar of one file, `hello`, holding `text`.
fn hello_tar(text: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(text.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "hello", text.as_bytes())
        .expect("append");
    b.into_inner().expect("tar")
}

/// Records image `name` whose one layer ([`hello_tar`] of `text`) is kept packed, as a
/// load keeps it; returns the layer's chain ID.
fn record_packed(store: &Store, name: &str, text: &str) -> ChainId {
    record_packed_tar(store, name, &hello_tar(text))
}

/// Records image `name` whose one layer, `tar`, is kept packed; returns its chain ID.
fn record_packed_tar(store: &Store, name: &str, tar: &[u8]) -> ChainId {
    let lease = store.lease();
    let blob = lease.put_blob(store.content(), tar).expect("blob");
    let diff = DiffId(blob.clone());
    let chain = ChainId::next(None, &diff);
    store
        .commit_packed_layer(&chain, &blob, &lease)
        .expect("packed");
    let config = lease
        .put_blob(store.content(), format!("config {name}").as_bytes())
        .expect("config");
    store
        .add_image(NewImage {
            id: ImageId(config.clone()),
            manifest: config,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            blobs: vec![blob],
            layers: vec![LayerRecord {
                chain_id: chain.clone(),
                diff_id: diff,
                parent: None,
                size: tar.len() as u64,
            }],
            created: None,
            names: vec![Reference::parse(name).expect("ref")],
        })
        .expect("add");
    chain
}

#[test]
fn a_packed_layer_is_unpacked_on_demand_or_by_a_later_compressor_and_goes_with_its_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b) = {
        let (store, _) = Store::open(dir.path()).expect("open");
        let a = record_packed(&store, "a:1", "on demand");
        let b = record_packed(&store, "b:1", "later");
        // Packed: no directory, and the store is sound.
        assert!(!store.layer_dir(&a).exists() && !store.layer_dir(&b).exists());
        assert!(store.check().expect("check").is_sound());
        // Needed now: made now.
        let lease = store.lease();
        let diff = store.layer_diff(&a, &lease).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(diff.join("hello")).expect("file"),
            "on demand"
        );
        (a, b)
    };
    // The daemon stopped with b still packed: the next one's background work unpacks it.
    let (store, _) = Store::open(dir.path()).expect("reopen");
    std::thread::scope(|s| {
        let worker = s.spawn(|| store.run_compressor());
        wait_for("unpacked", || {
            store.layer_dir(&b).join("diff/hello").exists()
        });
        store.stop_compressor();
        worker.join().expect("compressor thread");
    });
    assert_eq!(
        std::fs::read_to_string(store.layer_dir(&b).join("diff/hello")).expect("file"),
        "later"
    );
    assert!(store.check().expect("check").is_sound());
    // Removed with its image, packed or not.
    let events = store.remove("a:1").expect("rm a");
    assert!(
        events.contains(&RemoveEvent::DeletedLayer(a.clone())),
        "{events:?}"
    );
    store.remove("b:1").expect("rm b");
    assert!(!store.layer_dir(&a).exists() && !store.layer_dir(&b).exists());
    assert!(!store.has_layer(&a) && !store.has_layer(&b));
}

/// An `rm` while the idle-time unpack of the image's layer runs: the unpack stops, and the
/// rm takes everything with it (no staged files, layer directory or blob left for a later
/// collection); the unpack is not taken up again.
#[test]
fn an_rm_during_the_idle_unpack_stops_it_and_takes_everything() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    // Enough files that the unpack takes a while.
    let chain = record_packed_tar(&store, "big:1", &many_files_tar(20_000));
    let staged = || staged_files(dir.path());
    std::thread::scope(|s| {
        let stop = StopCompressor(&store);
        let worker = s.spawn(|| store.run_compressor());
        // The control: the unpack is under way (files staged, the layer not yet made).
        catch_unpacking(&store, dir.path(), &chain);
        assert!(!store.layer_unpacked(&chain), "the unpack ended too soon");
        store.remove("big:1").expect("rm");
        // At once: nothing the unpack held is left.
        assert!(!staged(), "staged files left");
        assert!(!store.layer_dir(&chain).exists(), "a layer directory left");
        assert_eq!(store.content().list().expect("list"), vec![], "blobs left");
        assert!(!store.has_layer(&chain));
        // And the job, taken up again (it went back to the front of the queue), finds
        // nothing to do: once a later job is done, still nothing of it is there.
        background_done(&store, "marker");
        assert!(!store.layer_dir(&chain).exists() && !staged());
        assert!(!store.has_layer(&chain));
        // The markers' layer and config blobs alone.
        assert_eq!(store.content().list().expect("list").len(), 4, "blobs left");
        drop(stop);
        worker.join().expect("compressor thread");
    });
}

/// Records an image `name` of the one built layer `diff` (`chain`, `size` bytes).
fn name_built_layer(
    store: &Store,
    lease: &isula_store::Lease,
    name: &str,
    diff: DiffId,
    chain: &ChainId,
    size: u64,
) {
    let layer = LayerRecord {
        chain_id: chain.clone(),
        diff_id: diff.clone(),
        parent: None,
        size,
    };
    add_named_image(store, lease, name, vec![diff.0], vec![layer]);
}

/// A built layer: its tar is hashed, never written; reading the blob makes it again from
/// the files (the same bytes as a written tar), a change to the files is caught when read,
/// the record survives a reopen, the gzip is made from the files, and everything goes
/// with the image.
#[test]
fn a_built_layer_keeps_only_its_files_and_its_tar_is_made_from_them_when_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let reference = tempfile::tempdir().expect("tmp");
    let (blob, chain, written) = {
        let (store, _) = Store::open(dir.path()).expect("open");
        let lease = store.lease();
        let staged = store.stage_layer().expect("stage");
        let make = |root: &std::path::Path| {
            std::fs::create_dir_all(root.join("app/sub")).expect("mkdir");
            let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(root.join("app/big.bin"), &data).expect("write");
            std::fs::write(root.join("app/sub/small"), b"small\n").expect("write");
            std::os::unix::fs::symlink("big.bin", root.join("app/link")).expect("symlink");
            for p in ["app/big.bin", "app/sub/small", "app/sub", "app"] {
                let t = std::fs::FileTimes::new()
                    .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5000));
                std::fs::File::open(root.join(p))
                    .and_then(|f| f.set_times(t))
                    .expect("times");
            }
        };
        make(&staged.diff_dir());
        make(reference.path());
        let (diff, chain, size) = store
            .commit_built_layer(staged, None, Some(4000), &lease)
            .expect("commit");
        let blob = diff.0.clone();
        // What a written tar of the same files would be, byte for byte.
        let opts = isula_store::diff::DiffOptions {
            clamp_mtime: Some(4000),
            exclude: Default::default(),
        };
        let written =
            isula_store::diff::write_layer(reference.path(), Vec::new(), &opts).expect("tar");
        assert_eq!(size, written.len() as u64);
        assert_eq!(blob, isula_types::Digest::of_bytes(&written));
        assert!(
            !store.content().contains(&blob),
            "the built tar was written"
        );
        assert!(store.blob_present(&blob) && store.blob_in_tree(&blob));
        assert_eq!(store.blob_size(&blob).expect("size"), size);
        name_built_layer(&store, &lease, "built:1", diff, &chain, size);
        drop(lease);
        (blob, chain, written)
    };
    let (store, _) = Store::open(dir.path()).expect("reopen");
    assert!(store.check().expect("check").is_sound());
    let read = |store: &Store| {
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut store.open_blob(&blob, None).expect("open"), &mut back)
            .map(|_| back)
    };
    assert!(read(&store).expect("read") == written, "not the same tar");
    // Its gzip, from the files.
    let lease = store.lease();
    let (gz, _) = store.gzip_blob(&blob, &lease).expect("gzip");
    drop(lease);
    let mut back = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(store.content().open(&gz).expect("open")),
        &mut back,
    )
    .expect("gunzip");
    assert!(back == written, "the gzip holds the tar");
    // Files changed behind the store's back: the read fails, naming the blob.
    let small = store.layer_dir(&chain).join("diff/app/sub/small");
    std::fs::write(&small, b"SMALL\n").expect("write");
    let e = read(&store).expect_err("a changed layer read as the blob");
    assert!(e.to_string().contains(blob.as_str()), "{e}");
    // Gone with its image.
    store.remove("built:1").expect("rm");
    store.gc().expect("gc");
    assert!(!store.blob_present(&blob) && !store.layer_dir(&chain).exists());
    assert!(!store.content().contains(&gz));
    let meta = std::fs::read_to_string(dir.path().join("metadata.json")).expect("meta");
    assert!(!meta.contains(blob.hex()), "{meta}");
}

/// A built layer read by the process that committed it: its tar is not hashed again while
/// every file's stamp holds. When one moved, the files are hashed again at the read's end:
/// a link made and removed elsewhere, or the same bytes written again, pass; other bytes
/// fail, and the next read hashes as it goes. A reopened store (a restart) hashes.
#[test]
fn a_built_layer_read_by_the_process_that_hashed_it_is_checked_by_stamps_or_hashed_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let lease = store.lease();
    let staged = store.stage_layer().expect("stage");
    let root = staged.diff_dir();
    std::fs::create_dir_all(root.join("app")).expect("mkdir");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.join("app/big.bin"), &data).expect("write");
    std::fs::write(root.join("app/small"), b"small\n").expect("write");
    let at_5000 = |p: &std::path::Path| {
        let t = std::fs::FileTimes::new()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5000));
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_times(t))
            .expect("times");
    };
    at_5000(&root.join("app/small"));
    let (diff, chain, size) = store
        .commit_built_layer(staged, None, None, &lease)
        .expect("commit");
    let blob = diff.0.clone();
    // An image names it, so that it stays over the reopen below.
    name_built_layer(&store, &lease, "stamped:1", diff, &chain, size);
    let read = |store: &Store| {
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut store.open_blob(&blob, None).expect("open"), &mut back)
            .map(|_| back)
    };
    let tar = read(&store).expect("read");
    assert_eq!(isula_types::Digest::of_bytes(&tar), blob);
    assert_eq!(read(&store).expect("read again"), tar);
    assert_eq!(store.tree_reads(), (2, 0), "(by stamps, by hash)");
    // A hard link to one of its files made and removed elsewhere (as a pruned cache
    // record's snapshot does), and the same bytes and time written again: the stamps
    // moved, the files still make the blob. Each read passes (hashed again at its end).
    let small = store.layer_dir(&chain).join("diff/app/small");
    let elsewhere = dir.path().join("tmp/elsewhere");
    std::fs::hard_link(&small, &elsewhere).expect("link");
    std::fs::remove_file(&elsewhere).expect("unlink");
    assert_eq!(read(&store).expect("a link came and went"), tar);
    std::fs::write(&small, b"small\n").expect("write");
    at_5000(&small);
    assert_eq!(read(&store).expect("the same bytes again"), tar);
    assert_eq!(store.tree_reads(), (4, 0));
    // Other bytes of the same size and time: refused by the hash again at the end; and
    // the next read, no longer vouched, hashes as it goes and refuses too.
    std::fs::write(&small, b"SMALL\n").expect("write");
    at_5000(&small);
    for n in [(5, 0), (5, 1)] {
        let e = read(&store).expect_err("other bytes");
        assert!(e.to_string().contains("no longer make layer blob"), "{e}");
        assert!(e.to_string().contains(blob.as_str()), "{e}");
        assert_eq!(store.tree_reads(), n);
    }
    // Back to the blob's bytes: a new process (a restart) knows no stamps, so it hashes.
    std::fs::write(&small, b"small\n").expect("write");
    at_5000(&small);
    drop(lease);
    drop(store);
    let (store, _) = Store::open(dir.path()).expect("reopen");
    assert_eq!(read(&store).expect("read after a restart"), tar);
    assert_eq!(store.tree_reads(), (0, 1));
    // Only the newest commit is vouched for: a layer committed is read by its stamps, and
    // once another is committed, by its hash.
    let lease = store.lease();
    let commit = |name: &str| {
        let staged = store.stage_layer().expect("stage");
        std::fs::write(staged.diff_dir().join(name), name).expect("write");
        let (d, _, _) = store
            .commit_built_layer(staged, None, None, &lease)
            .expect("commit");
        d.0
    };
    let read_blob = |d: &isula_types::Digest| {
        let mut back = Vec::new();
        std::io::Read::read_to_end(
            &mut store.open_blob(d, Some(&lease)).expect("open"),
            &mut back,
        )
        .expect("read");
        assert_eq!(isula_types::Digest::of_bytes(&back), *d);
    };
    let second = commit("second");
    read_blob(&second);
    assert_eq!(store.tree_reads(), (1, 1));
    let third = commit("third");
    read_blob(&second);
    assert_eq!(store.tree_reads(), (1, 2));
    read_blob(&third);
    assert_eq!(store.tree_reads(), (2, 2));
}

/// A layer directory under `layers/` that has no record (a commit a power cut interrupted
/// between the rename and the record) is not trusted: start-up removes it, and the packed
/// layer is unpacked again from its blob. A recorded one stays (the control).
#[test]
fn a_layer_directory_without_its_record_is_removed_at_start_and_made_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let (packed, kept) = {
        let (store, _) = Store::open(dir.path()).expect("open");
        let packed = record_packed(&store, "p:1", "from the blob");
        let kept = record_packed(&store, "k:1", "kept");
        // k:1 is unpacked for real (durable, recorded).
        let lease = store.lease();
        store.layer_diff(&kept, &lease).expect("unpack");
        (packed, kept)
    };
    // p:1's directory appears with torn contents and no record, as after a cut.
    let torn = dir.path().join("layers").join(packed.hex()).join("diff");
    std::fs::create_dir_all(&torn).expect("dir");
    std::fs::write(torn.join("hello"), "").expect("torn file");
    let (store, report) = Store::open(dir.path()).expect("reopen");
    assert!(
        report.gc.layers.contains(&Some(packed.clone())),
        "{:?}",
        report.gc
    );
    assert!(
        !store.layer_dir(&packed).exists(),
        "the torn directory went"
    );
    assert!(store.layer_present(&packed) && !store.layer_unpacked(&packed));
    assert!(store.layer_unpacked(&kept), "the recorded directory stays");
    assert!(store.check().expect("check").is_sound());
    let lease = store.lease();
    let diff = store.layer_diff(&packed, &lease).expect("unpack again");
    assert_eq!(
        std::fs::read_to_string(diff.join("hello")).expect("file"),
        "from the blob"
    );
    assert_eq!(
        std::fs::read_to_string(store.layer_dir(&kept).join("diff/hello")).expect("file"),
        "kept"
    );
}

#[test]
fn attestations_live_and_go_with_their_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let a = add(&store, "att", &["att:1"]);
    let lease = store.lease();
    let blob = lease
        .put_blob(store.content(), br#"{"spdxVersion":"SPDX-2.3"}"#)
        .expect("predicate");
    let record = isula_store::AttestationRecord {
        predicate_type: "https://spdx.dev/Document".into(),
        blob: blob.clone(),
        size: 26,
    };
    // Refused for an image that is not there, and for a blob that is not there.
    let missing = ImageId(isula_types::Digest::of_bytes(b"no such config"));
    assert!(matches!(
        store.set_attestations(&missing, vec![record.clone()]),
        Err(StoreError::ImageNotFound(_))
    ));
    let mut no_blob = record.clone();
    no_blob.blob = isula_types::Digest::of_bytes(b"never stored");
    assert!(matches!(
        store.set_attestations(&a, vec![no_blob]),
        Err(StoreError::BlobNotFound(_))
    ));
    assert!(store.attestations(&a).is_empty());
    store
        .set_attestations(&a, vec![record.clone()])
        .expect("set");
    drop(lease);
    // A collection keeps them while the image lives, and a reopen finds them.
    store.gc().expect("gc");
    assert!(store.content().contains(&blob));
    drop(store);
    let (store, _) = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.attestations(&a), vec![record]);
    assert!(store.check().expect("check").problems.is_empty());
    // --check-store says when one's blob went missing behind the store's back.
    std::fs::remove_file(store.content().path(&blob)).expect("rm blob");
    let problems = store.check().expect("check").problems;
    assert!(
        problems.iter().any(|p| p.contains("attestation blob")),
        "{problems:?}"
    );
    // They go with the image.
    store.remove("att:1").expect("rm");
    assert!(store.attestations(&a).is_empty());
    assert!(!store.content().contains(&blob));
}
