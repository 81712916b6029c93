//! What an archive may take: unpacked bytes and entries are capped (configurable), and the
//! data root's file system keeps its configured free space; past any of these an import or
//! load fails with a clear error and the store is as it was.

use isula_integration::*;
use std::process::Command;

/// A gzip'd tar holding one file of `mb` MiB of zeros (a few KiB compressed).
fn zero_bomb(mb: usize) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut tar = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_size((mb as u64) << 20);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, "zeros", std::io::repeat(0).take((mb as u64) << 20))
            .expect("append");
        tar.finish().expect("finish");
    }
    gz.finish().expect("gzip")
}

use std::io::Read;

#[test]
fn unpacked_bytes_and_entries_are_capped() {
    if !require_root() {
        return;
    }
    let d = Daemon::start_configured(
        &[(
            "configuration.toml",
            "max_layer_size = \"64MB\"\nmax_layer_entries = 100\n",
        )],
        &[],
        &[],
    );
    let work = tempfile::tempdir().expect("tmp");
    let bomb = work.path().join("bomb.tar.gz");
    std::fs::write(&bomb, zero_bomb(100)).expect("bomb");
    assert!(std::fs::metadata(&bomb).expect("stat").len() < 1 << 20);
    let before = d.store_snapshot();
    let err = d.fails(&["ctr-img", "import", bomb.to_str().expect("utf8"), "bomb:1"]);
    assert!(err.contains("max_layer_size"), "{err}");
    let many: Vec<(String, Vec<u8>)> = (0..150).map(|i| (format!("f{i}"), vec![b'x'])).collect();
    let refs: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let wide = work.path().join("wide.tar");
    std::fs::write(&wide, files_tar(&refs)).expect("wide");
    let err = d.fails(&["ctr-img", "import", wide.to_str().expect("utf8"), "wide:1"]);
    assert!(err.contains("max_layer_entries"), "{err}");
    assert_eq!(
        d.store_snapshot(),
        before,
        "a refused import changed the store"
    );
    // Within the caps it works.
    let small = work.path().join("small.tar.gz");
    std::fs::write(&small, zero_bomb(8)).expect("small");
    d.ok(&[
        "ctr-img",
        "import",
        small.to_str().expect("utf8"),
        "small:1",
    ]);
}

#[test]
fn a_full_data_root_fails_cleanly_and_the_next_operation_works() {
    if !require_root() || !require_tool("mkfs.ext4") {
        return;
    }
    // A 96 MiB ext4 file system as the data root.
    let work = tempfile::tempdir().expect("tmp");
    let img = work.path().join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(96 << 20))
        .expect("image");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    // Mounted over the data root of a stopped daemon: it starts on an empty store there.
    let mut d = Daemon::start_configured(
        &[("configuration.toml", "min_free_space = \"16MB\"\n")],
        &[],
        &[],
    );
    d.stop();
    let mnt = d.data();
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let unmount = Unmount(mnt.clone());
    d.restart();
    let input = work.path().join("big.tar");
    // Random data: 120 MiB cannot fit (the blob and the unpacked tree both need room).
    std::fs::write(&input, big_rootfs(120)).expect("big");
    let err = d.fails(&["ctr-img", "import", input.to_str().expect("utf8"), "big:1"]);
    assert!(
        err.contains("no space left") || err.contains("No space left"),
        "{err}"
    );
    assert!(d.images().is_empty());
    // A load that does not fit either.
    let archive = work.path().join("big-archive.tar");
    std::fs::write(&archive, docker_archive(&[big_rootfs(120)], "big:2")).expect("archive");
    let err = d.fails(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    assert!(
        err.contains("no space left") || err.contains("No space left"),
        "{err}"
    );
    // Nothing half-done is left, the store checks out, and a small import works.
    d.stop_and_check_store();
    d.restart();
    let small = work.path().join("small.tar");
    std::fs::write(&small, busybox_rootfs(&[])).expect("small");
    d.ok(&[
        "ctr-img",
        "import",
        small.to_str().expect("utf8"),
        "small:1",
    ]);
    assert_eq!(d.images().len(), 1);
    d.stop();
    drop(unmount);
}
