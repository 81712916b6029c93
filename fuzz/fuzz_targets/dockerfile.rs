#![no_main]
//! The Dockerfile parser never panics, whatever the text.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = isula_dockerfile::instructions::parse_dockerfile(text);
    }
});
