#![no_main]
//! Manifests, indexes and image configs from a registry or an archive: read or refused,
//! never a panic; an index's platform pick and a config's layer chain too.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use isula_types::image::{ImageConfig, Index, Manifest};
    let _ = serde_json::from_slice::<Manifest>(data);
    if let Ok(index) = serde_json::from_slice::<Index>(data) {
        let _ = isula_registry::pull::pick_platform(&index, "fuzz");
    }
    if let Ok(config) = serde_json::from_slice::<ImageConfig>(data) {
        let chains = isula_types::ChainId::chain(&config.rootfs.diff_ids);
        assert_eq!(chains.len(), config.rootfs.diff_ids.len());
    }
});
