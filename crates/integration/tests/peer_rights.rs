//! A client that is not root (a member of the socket's group) cannot make the daemon read
//! or write files it could not itself: client paths are opened with the client's identity.

use isula_integration::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

const NOBODY: u32 = 65534;

#[test]
fn group_members_get_their_own_rights_not_the_daemons() {
    if !require_root() {
        return;
    }
    // The socket is root:nogroup 0660, so uid nobody (group nogroup) may connect.
    let d = Daemon::start_with(&["--group", "nogroup"]);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let meta = std::fs::metadata(d.socket()).expect("socket");
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOBODY));

    let work = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret_dir = work.path().join("root-only");
    std::fs::create_dir(&secret_dir).expect("mkdir");
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let secret = secret_dir.join("rootfs.tar");
    std::fs::write(&secret, busybox_rootfs(&[])).expect("write");
    let public = work.path().join("public.tar");
    std::fs::write(&public, busybox_rootfs(&[("etc/msg", b"public")])).expect("write");
    let mine = work.path().join("nobody-owned");
    std::fs::create_dir(&mine).expect("mkdir");
    std::os::unix::fs::chown(&mine, Some(NOBODY), Some(NOBODY)).expect("chown");

    let as_nobody = |args: &[&str]| {
        d.cli_command(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run as nobody")
    };
    let before = d.store_snapshot();
    let o = as_nobody(&[
        "ctr-img",
        "import",
        secret.to_str().expect("utf8"),
        "stolen:1",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = as_nobody(&["ctr-img", "load", "-i", secret.to_str().expect("utf8")]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
    assert_eq!(d.store_snapshot(), before);

    // What nobody can read, nobody can import.
    let o = as_nobody(&[
        "ctr-img",
        "import",
        public.to_str().expect("utf8"),
        "public:1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Saving into a directory nobody cannot write is refused; into its own it works, and
    // the archive belongs to nobody.
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        secret_dir.join("x.tar").to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        work.path().join("x.tar").to_str().expect("utf8"),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
    assert!(!work.path().join("x.tar").exists());
    let out = mine.join("saved.tar");
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).expect("saved").uid(), NOBODY);
    // Root still reads and writes anywhere.
    d.ok(&[
        "ctr-img",
        "import",
        secret.to_str().expect("utf8"),
        "root:1",
    ]);
}
