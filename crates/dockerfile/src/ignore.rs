//! `.dockerignore` with Docker's rules (moby/patternmatcher): one pattern per line, `#`
//! comments, blank lines skipped, `!` re-includes, patterns cleaned like paths and a leading
//! `/` dropped; `*` and `?` never cross `/`, `**` does, `[...]` classes and `\` escapes; a
//! path is excluded when it or any parent directory matches, and the last matching pattern
//! wins.

/// The largest .dockerignore accepted (the manual's 1 MiB).
pub const DOCKERIGNORE_MAX: usize = 1 << 20;
/// The longest single pattern (PATH_MAX): matching costs pattern × path length.
pub const PATTERN_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    #[error(".dockerignore is {0} bytes, over the limit of {DOCKERIGNORE_MAX} bytes")]
    TooLarge(usize),
    #[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
    BadPattern {
        line: usize,
        pattern: String,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    Star,
    /// `**` (anything, across `/`).
    DoubleStar,
    /// `**/` (nothing, or anything ending in `/`).
    DoubleStarSlash,
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub text: String,
    pub exclusion: bool,
    tokens: Vec<Token>,
}

/// Cleans a path like Go's `filepath.Clean`, with `/` separators.
pub fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if matches!(out.last(), Some(&l) if l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

fn compile(text: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                while chars.get(i) == Some(&'*') {
                    i += 1;
                }
                if chars.get(i) == Some(&'/') {
                    tokens.push(Token::DoubleStarSlash);
                    i += 1;
                } else {
                    tokens.push(Token::DoubleStar);
                }
            }
            '*' => {
                tokens.push(Token::Star);
                i += 1;
            }
            '?' => {
                tokens.push(Token::Any);
                i += 1;
            }
            '\\' => {
                let c = *chars.get(i + 1).ok_or("trailing backslash")?;
                tokens.push(Token::Char(c));
                i += 2;
            }
            '[' => {
                let mut j = i + 1;
                let negated = matches!(chars.get(j), Some('^') | Some('!'));
                if negated {
                    j += 1;
                }
                let mut items = Vec::new();
                let mut first = true;
                loop {
                    let c = *chars.get(j).ok_or("unterminated character class")?;
                    if c == ']' && !first {
                        j += 1;
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        j += 1;
                        *chars.get(j).ok_or("unterminated character class")?
                    } else {
                        c
                    };
                    j += 1;
                    if chars.get(j) == Some(&'-') && chars.get(j + 1).is_some_and(|c| *c != ']') {
                        let hi = chars[j + 1];
                        if hi < lo {
                            return Err("character range out of order");
                        }
                        items.push((lo, hi));
                        j += 2;
                    } else {
                        items.push((lo, lo));
                    }
                }
                tokens.push(Token::Class { negated, items });
                i = j;
            }
            c => {
                tokens.push(Token::Char(c));
                i += 1;
            }
        }
    }
    Ok(tokens)
}

/// Whether `tokens` match all of `s`.
fn matches(tokens: &[Token], s: &[char]) -> bool {
    run_dp(tokens, s, |j| j == s.len())
}

/// Whether `tokens` match `s` or one of its parent directories (a prefix ending before a
/// `/`), in one pass.
fn matches_or_parent(tokens: &[Token], s: &[char]) -> bool {
    run_dp(tokens, s, |j| j == s.len() || (j > 0 && s[j] == '/'))
}

/// Dynamic programming over (token, position), so a hostile pattern like `**/**/**/...`
/// costs O(tokens × length), never exponential time. `end(j)`: the match may stop at `j`.
fn run_dp(tokens: &[Token], s: &[char], end: impl Fn(usize) -> bool) -> bool {
    let m = s.len();
    // next[j]: tokens[i+1..] match s[j..] up to an allowed end; starts as "no tokens left".
    let mut next: Vec<bool> = (0..=m).map(&end).collect();
    let mut cur = vec![false; m + 1];
    for token in tokens.iter().rev() {
        match token {
            Token::Char(c) => {
                for j in 0..=m {
                    cur[j] = j < m && s[j] == *c && next[j + 1];
                }
            }
            Token::Any => {
                for j in 0..=m {
                    cur[j] = j < m && s[j] != '/' && next[j + 1];
                }
            }
            Token::Class { negated, items } => {
                for j in 0..=m {
                    cur[j] = j < m
                        && s[j] != '/'
                        && items.iter().any(|(lo, hi)| (*lo..=*hi).contains(&s[j])) != *negated
                        && next[j + 1];
                }
            }
            Token::Star => {
                cur[m] = next[m];
                for j in (0..m).rev() {
                    cur[j] = next[j] || (s[j] != '/' && cur[j + 1]);
                }
            }
            Token::DoubleStar => {
                cur[m] = next[m];
                for j in (0..m).rev() {
                    cur[j] = next[j] || cur[j + 1];
                }
            }
            Token::DoubleStarSlash => {
                // Nothing, or anything that ends in '/'.
                let mut after_slash = false;
                cur[m] = next[m];
                for j in (0..m).rev() {
                    after_slash = after_slash || (s[j] == '/' && next[j + 1]);
                    cur[j] = next[j] || after_slash;
                }
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

/// Go's `filepath.Match` for one path component (COPY wildcards): `*`, `?`, `[...]`, `\`.
pub fn component_match(pattern: &str, name: &str) -> Result<bool, &'static str> {
    let tokens = compile(pattern)?;
    let chars: Vec<char> = name.chars().collect();
    Ok(matches(&tokens, &chars))
}

/// Whether a source path has wildcard characters.
pub fn has_wildcards(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

impl Pattern {
    fn matches_or_parent(&self, path: &[char]) -> bool {
        matches_or_parent(&self.tokens, path)
    }
}

/// The patterns of a `.dockerignore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub patterns: Vec<Pattern>,
}

impl Matcher {
    pub fn parse(text: &str) -> Result<Matcher, IgnoreError> {
        if text.len() > DOCKERIGNORE_MAX {
            return Err(IgnoreError::TooLarge(text.len()));
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let mut p = raw.trim();
            if p.is_empty() {
                continue;
            }
            let exclusion = p.starts_with('!');
            if exclusion {
                p = p[1..].trim();
            }
            if p.is_empty() {
                continue;
            }
            let mut text = clean(p);
            if text.len() > 1 && text.starts_with('/') {
                text.remove(0);
            }
            if text.len() > PATTERN_MAX {
                return Err(IgnoreError::BadPattern {
                    line: n + 1,
                    pattern: raw.chars().take(64).collect(),
                    reason: "pattern is longer than 4096 bytes",
                });
            }
            let tokens = compile(&text).map_err(|reason| IgnoreError::BadPattern {
                line: n + 1,
                pattern: raw.to_string(),
                reason,
            })?;
            patterns.push(Pattern {
                text,
                exclusion,
                tokens,
            });
        }
        Ok(Matcher { patterns })
    }

    /// Whether `path` (relative to the context, `/`-separated) is excluded.
    pub fn excluded(&self, path: &str) -> bool {
        let path = clean(path);
        let path: Vec<char> = path.trim_start_matches('/').chars().collect();
        let mut excluded = false;
        for p in &self.patterns {
            if p.matches_or_parent(&path) {
                excluded = !p.exclusion;
            }
        }
        excluded
    }

    /// Whether some exclusion pattern could re-include a path under the excluded directory
    /// `dir` (then the walk must descend into it).
    pub fn may_reinclude_under(&self, dir: &str) -> bool {
        let dir = clean(dir);
        self.patterns.iter().any(|p| {
            p.exclusion
                && (p.text.starts_with(&format!("{dir}/"))
                    || p.text.contains('*')
                    || p.text.contains('?')
                    || p.text.contains('['))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules() {
        let m = Matcher::parse(
            "# comment\n\n*.md\n!README.md\n/build\ndocs/**/*.tmp\n**/secret\n?.txt\n[ab]c.log\n  vendor  \n!vendor/keep\n",
        )
        .expect("parse");
        let cases = [
            ("notes.md", true),
            ("README.md", false),
            ("sub/notes.md", false),
            ("build", true),
            ("build/out/x", true),
            ("src/build", false),
            ("docs/x.tmp", true),
            ("docs/a/b/x.tmp", true),
            ("docs/x.txt", false),
            ("secret", true),
            ("a/b/secret", true),
            ("a/b/secret/inner", true),
            ("x.txt", true),
            ("xy.txt", false),
            ("ac.log", true),
            ("cc.log", false),
            ("vendor/lib", true),
            ("vendor/keep", false),
            ("Dockerfile", false),
        ];
        for (path, want) in cases {
            assert_eq!(m.excluded(path), want, "{path}");
        }
        assert!(m.may_reinclude_under("vendor"));
    }

    #[test]
    fn cleaning_and_errors() {
        assert_eq!(clean("./a//b/../c/"), "a/c");
        assert_eq!(clean("/../x"), "/x");
        assert_eq!(clean(""), ".");
        let m = Matcher::parse("./foo/\n/bar/../baz\n").expect("parse");
        assert_eq!(m.patterns[0].text, "foo");
        assert_eq!(m.patterns[1].text, "baz");
        assert!(matches!(
            Matcher::parse("a[b"),
            Err(IgnoreError::BadPattern { line: 1, .. })
        ));
        assert!(matches!(
            Matcher::parse("x\\"),
            Err(IgnoreError::BadPattern { .. })
        ));
        assert!(matches!(
            Matcher::parse(&"a".repeat(DOCKERIGNORE_MAX + 1)),
            Err(IgnoreError::TooLarge(_))
        ));
        let hostile = format!("{}x", "**/".repeat(1300));
        let m = Matcher::parse(&hostile).expect("parse");
        let path = "a/".repeat(1000) + "y";
        let start = std::time::Instant::now();
        assert!(!m.excluded(&path));
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "matching must not be exponential"
        );
        assert!(matches!(
            Matcher::parse(&"a".repeat(PATTERN_MAX + 1)),
            Err(IgnoreError::BadPattern { .. })
        ));
        let all = Matcher::parse("*\n!keep\n").expect("parse");
        assert!(all.excluded("anything") && all.excluded("dir/file") && !all.excluded("keep"));
    }
}
