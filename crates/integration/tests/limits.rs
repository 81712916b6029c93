//! What an archive may take: unpacked bytes and entries are capped (configurable), and the
//! data root's file system keeps its configured free space; past any of these an import or
//! load fails with a clear error and the store is as it was.

use isula_integration::registry::{Registry, RegistryOptions};
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
    if !require_root()
        || !require_tool("mkfs.ext4")
        || !require_tool("runc")
        || !require_tool("docker-registry")
    {
        return;
    }
    // A 120 MiB image in a registry, pushed by a daemon with room.
    let reg = Registry::start(RegistryOptions::default());
    let remote = format!("{}/full/big:1", reg.host());
    {
        let roomy = Daemon::for_registries(&[&reg.host()]);
        let input = roomy.dir.path().join("big.tar");
        std::fs::write(&input, big_rootfs(120)).expect("big");
        roomy.ok(&["ctr-img", "import", input.to_str().expect("utf8"), &remote]);
        roomy.ok(&["ctr-img", "push", &remote]);
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
        &[
            ("configuration.toml", "min_free_space = \"16MB\"\n"),
            ("registries.toml", &insecure_registries(&[&reg.host()])),
        ],
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
    // A pull that does not fit.
    let err = d.fails(&["ctr-img", "pull", &remote]);
    assert!(
        err.contains("no space left") || err.contains("No space left"),
        "{err}"
    );
    assert!(d.images().is_empty());
    // Nothing half-done is left, the store checks out, and a small import works.
    d.stop_and_check_store();
    d.restart();
    let small = work.path().join("small.tar");
    std::fs::write(&small, busybox_rootfs(&[])).expect("small");
    d.ok(&[
        "ctr-img",
        "import",
        small.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    assert_eq!(d.images().len(), 1);
    // Builds whose RUN or COPY fills the file system fail, naming the step; nothing is
    // left, and a build that fits then works.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(ctx.join("big.bin"), noise(120, 7)).expect("big");
    for (df, want) in [
        (
            "FROM busybox\nRUN dd if=/dev/zero of=/fill bs=1M count=200\n",
            "RUN",
        ),
        ("FROM busybox\nCOPY big.bin /big.bin\n", "space"),
    ] {
        std::fs::write(ctx.join("Dockerfile"), df).expect("df");
        let err = d.fails(&[
            "ctr-img",
            "build",
            "-t",
            "full:1",
            ctx.to_str().expect("ctx"),
        ]);
        eprintln!("full data root, {df:?}: {err}");
        assert!(err.contains(want), "{df:?}: {err}");
        assert_eq!(d.images().len(), 1, "{df:?}: an image was stored");
        assert!(d.leftovers().is_empty(), "{df:?}: {:?}", d.leftovers());
    }
    std::fs::remove_file(ctx.join("big.bin")).expect("rm");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo fits > /fits\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "fits:1",
        ctx.to_str().expect("ctx"),
    ]);
    d.stop_and_check_store();
    d.restart();
    assert_eq!(d.images().len(), 2);
    d.stop();
    drop(unmount);
}
