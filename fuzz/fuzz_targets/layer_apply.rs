#![no_main]
//! Applying arbitrary bytes as a layer never panics and never reaches outside its directory
//! (run as root, like the daemon: the checks are the ones that matter then). The oracle: a
//! sibling directory with a file and a symlink must be exactly as it was (content, mode,
//! owner, times), nothing may appear beside the layer, and no file of the layer may be a
//! hard link to the sibling's file. Run it in a private mount namespace, so that even a
//! mount could not leak to the host: `unshare -m --propagation private cargo fuzz run ...`.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map(|r| r.flatten().collect::<Vec<_>>()).unwrap_or_default() {
        let m = match std::fs::symlink_metadata(e.path()) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let content = if m.is_file() {
            std::fs::read(e.path()).unwrap_or_default()
        } else {
            Vec::new()
        };
        let link = std::fs::read_link(e.path()).map(|l| l.display().to_string()).unwrap_or_default();
        out.push(format!(
            "{:?} {:o} {}:{} {} {} {:?} {}",
            e.file_name(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.ino(),
            content,
            link
        ));
    }
    out.sort();
    out
}

fn files_under(dir: &Path, out: &mut Vec<std::fs::Metadata>) {
    for e in std::fs::read_dir(dir).map(|r| r.flatten().collect::<Vec<_>>()).unwrap_or_default() {
        if let Ok(m) = std::fs::symlink_metadata(e.path()) {
            if m.is_dir() {
                files_under(&e.path(), out);
            } else {
                out.push(m);
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(outer) = tempfile::tempdir() else { return };
    let dest = outer.path().join("layer");
    let outside = outer.path().join("outside");
    if std::fs::create_dir(&dest).is_err() || std::fs::create_dir(&outside).is_err() {
        return;
    }
    let _ = std::fs::write(outside.join("secret"), b"keep");
    let _ = std::os::unix::fs::symlink("secret", outside.join("link"));
    let before = snapshot(&outside);
    let secret_ino = std::fs::metadata(outside.join("secret")).map(|m| m.ino()).unwrap_or(0);
    let _ = isula_store::apply::apply_layer(data, &dest);
    let entries: Vec<_> = std::fs::read_dir(outer.path()).map(|r| r.flatten().collect()).unwrap_or_default();
    assert_eq!(entries.len(), 2, "something was written beside the layer directory");
    assert_eq!(snapshot(&outside), before, "the directory beside the layer changed");
    let mut files = Vec::new();
    files_under(&dest, &mut files);
    assert!(
        files.iter().all(|m| m.ino() != secret_ino || m.dev() != std::fs::metadata(outside.join("secret")).map(|s| s.dev()).unwrap_or(0)),
        "a file of the layer is a hard link to a file outside it"
    );
});
