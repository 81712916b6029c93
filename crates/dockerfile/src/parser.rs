//! Text → instruction nodes. Handles parser directives (`# syntax=`, `# escape=`,
//! `# check=`), line continuations with the escape character, comment and blank lines
//! inside continuations, leading `--flags`, and heredocs (`RUN <<EOF`, `COPY <<EOF /x`).
//! No expansion and no meaning here: that is `instructions`.

use std::fmt;

/// The largest Dockerfile accepted (the manual's 1 MiB).
pub const DOCKERFILE_MAX: usize = 1 << 20;

pub const KEYWORDS: [&str; 18] = [
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "dockerfile parse error: {}", self.message)
        } else {
            write!(
                f,
                "dockerfile parse error on line {}: {}",
                self.line, self.message
            )
        }
    }
}

pub(crate) fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Directives {
    pub escape: char,
    pub syntax: Option<String>,
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Heredoc {
    pub name: String,
    pub content: String,
    /// An unquoted delimiter: `$var` inside is expanded.
    pub expand: bool,
    /// `<<-`: leading tabs were stripped.
    pub chomp: bool,
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// Lower case (`run`).
    pub keyword: String,
    /// Leading `--name[=value]` flags, raw.
    pub flags: Vec<String>,
    /// The arguments after the flags, continuation lines joined.
    pub rest: String,
    /// The instruction as the user wrote it, continuations joined (shown in `STEP` lines).
    pub original: String,
    pub start_line: usize,
    pub end_line: usize,
    pub heredocs: Vec<Heredoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Parsed {
    pub directives: Directives,
    pub nodes: Vec<Node>,
    pub warnings: Vec<String>,
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// `# key=value` as a parser directive.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?;
    let (k, v) = body.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((k.to_ascii_lowercase(), v.trim().to_string()))
}

/// `# syntax=IMAGE` names a frontend image; we are the Dockerfile frontend ourselves and
/// fetch nothing, so only the images of the `docker/dockerfile` syntax are accepted: tags
/// `1`, `1.N`, `1.N.M`, each optionally `-labs`, and `labs`, `latest`, `master` (upstream),
/// with an optional `@sha256:` digest.
fn check_syntax(image: &str) -> Result<(), String> {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("syntax directive {image:?}: invalid digest {d:?}"));
        }
    }
    let (repo, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (name, "latest"),
    };
    let repo = repo
        .strip_prefix("docker.io/")
        .or_else(|| repo.strip_prefix("index.docker.io/"))
        .unwrap_or(repo);
    let known_repo = matches!(repo, "docker/dockerfile" | "docker/dockerfile-upstream");
    let version = tag.strip_suffix("-labs").unwrap_or(tag);
    let parts: Vec<&str> = version.split('.').collect();
    let known_tag = matches!(tag, "labs" | "latest" | "master")
        || (parts.len() <= 3
            && parts[0] == "1"
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
    if known_repo && known_tag {
        return Ok(());
    }
    Err(format!(
        "syntax directive names the frontend {image:?}, which this builder cannot run: it is \
         its own Dockerfile frontend and fetches none; use docker/dockerfile:1 (or 1.N, \
         1.N.M, -labs) or remove the directive"
    ))
}

/// Strips a trailing escape character (and whitespace after it); Some if it continues.
fn continues(line: &str, escape: char) -> Option<&str> {
    let t = line.trim_end();
    t.strip_suffix(escape)
}

/// Leading `--flag[=value]` words; returns them and the rest.
pub(crate) fn split_flags(rest: &str) -> (Vec<String>, String) {
    let mut flags = Vec::new();
    let mut s = rest.trim_start();
    while s.starts_with("--") {
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let word = &s[..end];
        if word == "--" {
            break;
        }
        flags.push(word.to_string());
        s = s[end..].trim_start();
    }
    (flags, s.to_string())
}

/// Heredoc markers in an instruction line, outside quotes: (name, quoted, chomp).
fn heredoc_markers(rest: &str, escape: char) -> Vec<(String, bool, bool)> {
    let chars: Vec<char> = rest.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == escape && q == '"' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == escape {
            i += 2;
            continue;
        }
        if c == '"' || c == '\'' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if c == '<' && chars.get(i + 1) == Some(&'<') && chars.get(i + 2) != Some(&'<') {
            let mut j = i + 2;
            let chomp = chars.get(j) == Some(&'-');
            if chomp {
                j += 1;
            }
            let q = match chars.get(j) {
                Some(&q @ ('"' | '\'')) => {
                    j += 1;
                    Some(q)
                }
                _ => None,
            };
            let start = j;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || "_-.".contains(chars[j]))
            {
                j += 1;
            }
            let name: String = chars[start..j].iter().collect();
            if let Some(q) = q {
                if chars.get(j) != Some(&q) {
                    i += 2;
                    continue;
                }
                j += 1;
            }
            if !name.is_empty() {
                out.push((name, q.is_some(), chomp));
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Parses a Dockerfile's text.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    if text.len() > DOCKERFILE_MAX {
        return Err(err(
            0,
            format!(
                "the Dockerfile is {} bytes, over the limit of {DOCKERFILE_MAX} bytes",
                text.len()
            ),
        ));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut directives = Directives::default();
    let mut seen = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((k, v)) = directive(lines[i]) else {
            break;
        };
        if !["syntax", "escape", "check"].contains(&k.as_str()) {
            break;
        }
        if seen.contains(&k) {
            return Err(err(
                i + 1,
                format!("only one {k} parser directive can be used"),
            ));
        }
        match k.as_str() {
            "escape" => {
                directives.escape = match v.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return Err(err(
                            i + 1,
                            format!("invalid escape token '{other}' does not match ` or \\"),
                        ))
                    }
                }
            }
            "syntax" => {
                check_syntax(&v).map_err(|m| err(i + 1, m))?;
                directives.syntax = Some(v)
            }
            _ => directives.check = Some(v),
        }
        seen.push(k);
        i += 1;
    }
    let escape = directives.escape;
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() || is_comment(line) {
            i += 1;
            continue;
        }
        let start_line = i + 1;
        let mut joined = String::new();
        let mut current = line.trim_start().to_string();
        let mut end_line = start_line;
        loop {
            match continues(&current, escape) {
                Some(head) => {
                    joined.push_str(head);
                    // Next non-comment, non-blank line continues it.
                    i += 1;
                    let mut next = None;
                    while i < lines.len() {
                        let l = lines[i];
                        if is_comment(l) {
                            i += 1;
                            continue;
                        }
                        if l.trim().is_empty() {
                            warnings.push(format!("line {}: empty continuation line", i + 1));
                            i += 1;
                            continue;
                        }
                        next = Some(l);
                        break;
                    }
                    match next {
                        Some(l) => {
                            current = l.to_string();
                            end_line = i + 1;
                        }
                        None => break, // a continuation at the end of the file
                    }
                }
                None => {
                    joined.push_str(&current);
                    break;
                }
            }
        }
        i += 1;
        let joined = joined.trim().to_string();
        let (word, rest) = match joined.find(char::is_whitespace) {
            Some(p) => (&joined[..p], joined[p..].trim_start()),
            None => (joined.as_str(), ""),
        };
        let keyword = word.to_ascii_lowercase();
        if !KEYWORDS.contains(&keyword.as_str()) {
            return Err(err(
                start_line,
                format!("unknown instruction: {}", word.to_uppercase()),
            ));
        }
        let (flags, rest) = split_flags(rest);
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "run" | "copy" | "add") {
            for (name, quoted, chomp) in heredoc_markers(&rest, escape) {
                let mut content = String::new();
                let mut closed = false;
                while i < lines.len() {
                    let l = lines[i];
                    i += 1;
                    let l = if chomp { l.trim_start_matches('\t') } else { l };
                    if l == name {
                        closed = true;
                        break;
                    }
                    content.push_str(l);
                    content.push('\n');
                }
                if !closed {
                    return Err(err(start_line, format!("unterminated heredoc {name}")));
                }
                end_line = i;
                heredocs.push(Heredoc {
                    name,
                    content,
                    expand: !quoted,
                    chomp,
                });
            }
        }
        nodes.push(Node {
            keyword,
            flags,
            rest,
            original: joined.clone(),
            start_line,
            end_line,
            heredocs,
        });
    }
    Ok(Parsed {
        directives,
        nodes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_comments_and_directives() {
        let p = parse(
            "# syntax=docker/dockerfile:1\n# escape=`\n\nFROM busybox\nRUN echo a `\n# a comment\n\n    b\nlabel x=1\n",
        )
        .expect("parse");
        assert_eq!(p.directives.escape, '`');
        assert_eq!(p.directives.syntax.as_deref(), Some("docker/dockerfile:1"));
        assert_eq!(p.nodes.len(), 3);
        assert_eq!(p.nodes[1].rest, "echo a     b");
        assert_eq!((p.nodes[1].start_line, p.nodes[1].end_line), (5, 8));
        assert_eq!(p.nodes[2].keyword, "label");
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn syntax_directive_names_our_own_frontend_or_fails() {
        let digest = format!("docker/dockerfile:1.4@sha256:{}", "ab".repeat(32));
        for ok in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7",
            "docker/dockerfile:1.7.1",
            "docker/dockerfile:1-labs",
            "docker/dockerfile:1.7-labs",
            "docker.io/docker/dockerfile:1",
            "docker/dockerfile",
            "docker/dockerfile:labs",
            "docker/dockerfile-upstream:master",
            digest.as_str(),
        ] {
            let p = parse(&format!("# syntax={ok}\n# check=skip=all\nFROM x\n"))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(p.directives.syntax.as_deref(), Some(ok));
            assert_eq!(p.directives.check.as_deref(), Some("skip=all"));
        }
        for bad in [
            "example.com/my/frontend:1",
            "docker/dockerfile:2",
            "docker/dockerfile:1.x",
            "docker/dockerfile:1@sha256:12",
            "tonistiigi/dockerfile:runmount",
        ] {
            let e = parse(&format!("# syntax={bad}\nFROM x\n")).expect_err(bad);
            assert_eq!(e.line, 1, "{bad}");
            assert!(
                e.message.contains(bad) && e.message.contains("frontend")
                    || e.message.contains("digest"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn flags_and_heredocs() {
        let p = parse("FROM x\nCOPY --from=a --chown=1:2 <<EOF /x\nhello\nEOF\nRUN <<-'END' cat\n\techo $x\n\tEND\n").expect("parse");
        assert_eq!(p.nodes[1].flags, vec!["--from=a", "--chown=1:2"]);
        assert_eq!(p.nodes[1].heredocs[0].content, "hello\n");
        assert!(p.nodes[1].heredocs[0].expand);
        let h = &p.nodes[2].heredocs[0];
        assert_eq!(
            (h.name.as_str(), h.content.as_str(), h.expand, h.chomp),
            ("END", "echo $x\n", false, true)
        );
        assert_eq!(p.nodes[2].end_line, 7);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("FROM x\nFROB y\n").expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "dockerfile parse error on line 2: unknown instruction: FROB"
        );
        let e = parse("FROM x\nRUN <<EOF\nnever closed\n").expect_err("heredoc");
        assert_eq!(e.line, 2);
        let e = parse("# escape=x\nFROM a\n").expect_err("escape");
        assert!(e.message.contains("invalid escape token"));
        let e = parse("# escape=`\n# escape=\\\nFROM a\n").expect_err("dup");
        assert!(e.message.contains("only one escape"));
        let big = "#".repeat(DOCKERFILE_MAX + 1);
        assert!(parse(&big).is_err());
    }
}
