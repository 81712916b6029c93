#![no_main]
//! Word processing and expansion never panic, with either escape character.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let vars = vec![("a".to_string(), "x y".to_string()), ("e".to_string(), String::new())];
        for escape in ['\\', '`'] {
            let l = isula_dockerfile::lex::Lexer::new(escape);
            let _ = l.process_word(text, &vars);
            let _ = l.process_words(text, &vars);
            let _ = l.expand_only(text, &vars);
        }
    }
});
