#![no_main]
//! A registry's WWW-Authenticate header, whatever it says: a challenge or None, no panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = isula_registry::client::parse_challenge(text);
    }
});
