#![no_main]
//! .dockerignore parsing and matching never panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (patterns, path) = text.split_once('\0').unwrap_or((text, "a/b/c.txt"));
        if let Ok(m) = isula_dockerfile::ignore::Matcher::parse(patterns) {
            let _ = m.excluded(path);
        }
    }
});
