//! Word processing with Docker's shell-like rules (BuildKit's `shell/lex.go` is the
//! reference): quotes, the escape character, and `$v`, `${v}`, `${v:-w}`, `${v-w}`,
//! `${v:+w}`, `${v+w}`, `${v:?msg}`, `${v?msg}`. Pure: variables come from a lookup.

use std::iter::Peekable;
use std::str::Chars;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unexpected end of statement while looking for matching {0}")]
    Unterminated(&'static str),
    #[error("missing '}}' in variable substitution")]
    MissingBrace,
    #[error("invalid variable name in substitution {0:?}")]
    BadName(String),
    #[error("unsupported modifier {0:?} in substitution")]
    BadModifier(String),
    #[error("{name}: {message}")]
    Required { name: String, message: String },
}

/// Variables visible to an expansion.
pub trait Vars {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Vars for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Vars for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Vars::get(self.as_slice(), name)
    }
}

pub struct Lexer {
    pub escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer { escape: '\\' }
    }
}

/// A piece of output and whether it came from inside quotes (for word splitting).
struct Out {
    words: Vec<String>,
    cur: String,
    /// The current word exists even if empty (it had quotes).
    started: bool,
}

impl Out {
    fn new() -> Self {
        Out {
            words: Vec::new(),
            cur: String::new(),
            started: false,
        }
    }
    fn push(&mut self, c: char) {
        self.cur.push(c);
        self.started = true;
    }
    fn push_str(&mut self, s: &str) {
        self.cur.push_str(s);
        self.started = true;
    }
    fn split(&mut self) {
        if self.started {
            self.words.push(std::mem::take(&mut self.cur));
            self.started = false;
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A variable name at the front of `it` (possibly empty).
fn read_name(it: &mut Peekable<Chars<'_>>) -> String {
    let mut name = String::new();
    while let Some(&c) = it.peek() {
        if !is_name_char(c) {
            break;
        }
        name.push(c);
        it.next();
    }
    name
}

impl Lexer {
    pub fn new(escape: char) -> Self {
        Lexer { escape }
    }

    /// Processes one word: quotes removed, escapes applied, variables expanded.
    pub fn process_word(&self, input: &str, vars: &dyn Vars) -> Result<String, LexError> {
        let mut out = Out::new();
        self.run(input, vars, &mut out, false)?;
        Ok(out.cur)
    }

    /// Expands variables only, leaving quotes as they are (heredoc bodies): `\$` keeps a
    /// literal `$`.
    pub fn expand_only(&self, input: &str, vars: &dyn Vars) -> Result<String, LexError> {
        let mut out = String::new();
        let mut it = input.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                c if c == self.escape && it.peek() == Some(&'$') => {
                    it.next();
                    out.push('$');
                }
                '$' => out.push_str(&self.dollar(&mut it, vars)?),
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// Processes and splits into words on unquoted whitespace (for EXPOSE, VOLUME, ...).
    /// Whitespace coming from a variable's value splits too, as in Docker.
    pub fn process_words(&self, input: &str, vars: &dyn Vars) -> Result<Vec<String>, LexError> {
        let mut out = Out::new();
        self.run(input, vars, &mut out, true)?;
        out.split();
        Ok(out.words)
    }

    fn run(
        &self,
        input: &str,
        vars: &dyn Vars,
        out: &mut Out,
        split: bool,
    ) -> Result<(), LexError> {
        let mut it = input.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                c if c == self.escape => match it.next() {
                    Some(n) => out.push(n),
                    None => out.push(c),
                },
                '\'' => {
                    out.started = true;
                    loop {
                        match it.next() {
                            Some('\'') => break,
                            Some(ch) => out.push(ch),
                            None => return Err(LexError::Unterminated("single-quote")),
                        }
                    }
                }
                '"' => {
                    out.started = true;
                    loop {
                        match it.next() {
                            Some('"') => break,
                            Some('$') => {
                                let v = self.dollar(&mut it, vars)?;
                                out.push_str(&v);
                            }
                            Some(ch) if ch == self.escape => match it.peek().copied() {
                                Some(n) if n == '"' || n == '$' || n == self.escape => {
                                    it.next();
                                    out.push(n);
                                }
                                Some(_) => out.push(ch),
                                None => return Err(LexError::Unterminated("double-quote")),
                            },
                            Some(ch) => out.push(ch),
                            None => return Err(LexError::Unterminated("double-quote")),
                        }
                    }
                }
                '$' => {
                    let v = self.dollar(&mut it, vars)?;
                    if split {
                        // Unquoted expansion results are split on whitespace.
                        for (i, part) in v.split(|c: char| c.is_whitespace()).enumerate() {
                            if i > 0 {
                                out.split();
                            }
                            if !part.is_empty() {
                                out.push_str(part);
                            }
                        }
                    } else {
                        out.cur.push_str(&v);
                        if !v.is_empty() {
                            out.started = true;
                        }
                    }
                }
                c if split && c.is_whitespace() => out.split(),
                c => out.push(c),
            }
        }
        Ok(())
    }

    /// After a `$`: the expansion (or a literal `$`).
    fn dollar(&self, it: &mut Peekable<Chars<'_>>, vars: &dyn Vars) -> Result<String, LexError> {
        match it.peek().copied() {
            Some('{') => {
                it.next();
                self.braced(it, vars)
            }
            Some(c) if is_name_char(c) => {
                let name = read_name(it);
                Ok(vars.get(&name).unwrap_or("").to_string())
            }
            _ => Ok("$".to_string()),
        }
    }

    fn braced(&self, it: &mut Peekable<Chars<'_>>, vars: &dyn Vars) -> Result<String, LexError> {
        let name = read_name(it);
        if name.is_empty() {
            let rest: String = it.take_while(|c| *c != '}').collect();
            return Err(LexError::BadName(format!("${{{rest}}}")));
        }
        let value = vars.get(&name);
        match it.next() {
            Some('}') => Ok(value.unwrap_or("").to_string()),
            Some(m) if m == ':' || m == '-' || m == '+' || m == '?' => {
                let (colon, op) = if m == ':' {
                    match it.next() {
                        Some(op @ ('-' | '+' | '?')) => (true, op),
                        Some(other) => return Err(LexError::BadModifier(format!(":{other}"))),
                        None => return Err(LexError::MissingBrace),
                    }
                } else {
                    (false, m)
                };
                let word = self.until_brace(it, vars)?;
                // With a colon, empty counts as unset.
                let set = match value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                match op {
                    '-' => Ok(if set {
                        value.unwrap_or("").to_string()
                    } else {
                        word
                    }),
                    '+' => Ok(if set { word } else { String::new() }),
                    _ => {
                        if set {
                            Ok(value.unwrap_or("").to_string())
                        } else {
                            let message = if word.is_empty() {
                                "is not allowed to be unset".to_string()
                            } else {
                                word
                            };
                            Err(LexError::Required { name, message })
                        }
                    }
                }
            }
            Some(other) => Err(LexError::BadModifier(other.to_string())),
            None => Err(LexError::MissingBrace),
        }
    }

    /// The word of a `${v:-word}` up to the closing brace, itself processed.
    fn until_brace(
        &self,
        it: &mut Peekable<Chars<'_>>,
        vars: &dyn Vars,
    ) -> Result<String, LexError> {
        let mut raw = String::new();
        let mut depth = 0;
        loop {
            match it.next() {
                Some('}') if depth == 0 => break,
                Some(c) if c == self.escape => {
                    raw.push(c);
                    if let Some(n) = it.next() {
                        raw.push(n);
                    }
                }
                Some('{') => {
                    depth += 1;
                    raw.push('{');
                }
                Some('}') => {
                    depth -= 1;
                    raw.push('}');
                }
                Some(c) => raw.push(c),
                None => return Err(LexError::MissingBrace),
            }
        }
        self.process_word(&raw, vars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("a".into(), "A".into()),
            ("empty".into(), String::new()),
            ("sp".into(), "x  y".into()),
        ]
    }

    #[test]
    fn expansions() {
        let l = Lexer::default();
        let v = vars();
        let cases = [
            ("$a", "A"),
            ("${a}", "A"),
            ("pre${a}post", "preApost"),
            ("$nope", ""),
            ("${nope:-dflt}", "dflt"),
            ("${empty:-dflt}", "dflt"),
            ("${empty-dflt}", ""),
            ("${nope-dflt}", "dflt"),
            ("${a:+alt}", "alt"),
            ("${empty:+alt}", ""),
            ("${empty+alt}", "alt"),
            ("${nope:-$a}", "A"),
            ("${nope:-${a}x}", "Ax"),
            ("'$a'", "$a"),
            ("\"$a\"", "A"),
            ("\\$a", "$a"),
            ("\"\\$a\"", "$a"),
            ("\"a\\nb\"", "a\\nb"),
            ("a\\ b", "a b"),
            ("$", "$"),
            ("$-x", "$-x"),
            ("\"it's\"", "it's"),
            ("'say \"hi\"'", "say \"hi\""),
        ];
        for (input, want) in cases {
            assert_eq!(l.process_word(input, &v).as_deref(), Ok(want), "{input}");
        }
        assert_eq!(
            l.expand_only("echo \"$a\" '$a' \\$a", &v).as_deref(),
            Ok("echo \"A\" 'A' $a")
        );
        let bt = Lexer::new('`');
        assert_eq!(bt.process_word("a`$b", &v).as_deref(), Ok("a$b"));
        assert_eq!(bt.process_word("c:\\dir", &v).as_deref(), Ok("c:\\dir"));
    }

    #[test]
    fn words_and_errors() {
        let l = Lexer::default();
        let v = vars();
        assert_eq!(
            l.process_words("80 443/tcp  '8 0'", &v),
            Ok(vec!["80".into(), "443/tcp".into(), "8 0".into()])
        );
        assert_eq!(l.process_words("$sp", &v), Ok(vec!["x".into(), "y".into()]));
        assert_eq!(l.process_words("\"$sp\"", &v), Ok(vec!["x  y".into()]));
        assert!(matches!(
            l.process_word("'abc", &v),
            Err(LexError::Unterminated(_))
        ));
        assert!(matches!(
            l.process_word("\"abc", &v),
            Err(LexError::Unterminated(_))
        ));
        assert!(matches!(
            l.process_word("${a", &v),
            Err(LexError::MissingBrace)
        ));
        assert!(matches!(
            l.process_word("${a:=x}", &v),
            Err(LexError::BadModifier(_))
        ));
        assert!(matches!(
            l.process_word("${}", &v),
            Err(LexError::BadName(_))
        ));
        assert_eq!(
            l.process_word("${nope:?must be set}", &v),
            Err(LexError::Required {
                name: "nope".into(),
                message: "must be set".into()
            })
        );
    }
}
