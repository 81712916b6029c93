#![no_main]
//! Applying arbitrary bytes as a layer never panics and never writes outside its directory
//! (run as root, like the daemon: the checks are the ones that matter then).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(outer) = tempfile::tempdir() else { return };
    let dest = outer.path().join("layer");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    let _ = isula_store::apply::apply_layer(data, &dest);
    let entries: Vec<_> = std::fs::read_dir(outer.path()).map(|r| r.flatten().collect()).unwrap_or_default();
    assert_eq!(entries.len(), 1, "something was written beside the layer directory");
});
