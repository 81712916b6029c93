#![no_main]
//! References, digests and manifests parse or fail cleanly; parsed references round-trip.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = isula_types::Reference::parse(text) {
            assert_eq!(isula_types::Reference::parse(&r.to_string()).ok(), Some(r));
        }
        let _ = isula_types::Digest::parse(text);
        let _ = serde_json::from_str::<isula_types::image::Manifest>(text);
        let _ = serde_json::from_str::<isula_types::image::ImageConfig>(text);
    }
});
