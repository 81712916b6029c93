//! Random and mutated inputs never panic the parser, the expander or the ignore matcher
//! (a stable-toolchain complement to the cargo-fuzz targets in `fuzz/`).

use isula_dockerfile::ignore::Matcher;
use isula_dockerfile::instructions::parse_dockerfile;
use isula_dockerfile::lex::Lexer;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

const PIECES: [&str; 40] = [
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ENV ",
    "ARG ",
    "LABEL ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "SHELL ",
    "busybox",
    " AS ",
    "x",
    "=",
    "\"",
    "'",
    "\\",
    "`",
    "$",
    "${",
    "}",
    ":-",
    ":+",
    ":?",
    "[",
    "]",
    "\n",
    " ",
    "\t",
    "#",
    "# escape=`\n",
    "<<EOF",
    "EOF",
    "<<-",
    "--from=",
    "--chown=",
    ",",
    "*",
    "?",
    "\u{e9}",
];

#[test]
fn random_dockerfiles_and_words_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let vars = vec![("x".to_string(), "1".to_string())];
    for _ in 0..20_000 {
        let n = (rng.next() % 40) as usize;
        let text: String = (0..n).map(|_| rng.pick(&PIECES)).collect();
        let _ = parse_dockerfile(&text);
        let _ = parse_dockerfile(&format!("FROM busybox\n{text}"));
        for escape in ['\\', '`'] {
            let l = Lexer::new(escape);
            let _ = l.process_word(&text, &vars);
            let _ = l.process_words(&text, &vars);
            let _ = l.expand_only(&text, &vars);
        }
        if let Ok(m) = Matcher::parse(&text) {
            let _ = m.excluded(&text);
            let _ = m.excluded("a/b/c");
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..5_000 {
        let n = (rng.next() % 200) as usize;
        let bytes: Vec<u8> = (0..n).map(|_| (rng.next() & 0xff) as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_dockerfile(&text);
        let _ = Lexer::default().process_word(&text, &Vec::new());
        let _ = Matcher::parse(&text);
    }
}
