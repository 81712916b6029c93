//! Nodes → typed instructions and stages, with each instruction's argument form (JSON or
//! shell, key=value pairs, word lists) as Docker parses it, and the expansion step that the
//! builder applies at run time (`expand`), for exactly the instructions Docker expands.

use crate::lex::{Lexer, Vars};
use crate::parser::{self, err, Heredoc, Node, ParseError};
use serde::Serialize;

/// Stage names: the manual allows a leading digit and up to 64 characters.
pub const STAGE_NAME_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Command {
    /// Shell form: run by the stage's SHELL.
    Shell(String),
    /// Exec (JSON) form.
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", "..."]`, as stored in the config.
    pub test: Vec<String>,
    pub interval: Option<i64>,
    pub timeout: Option<i64>,
    pub start_period: Option<i64>,
    pub start_interval: Option<i64>,
    pub retries: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyArgs {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    /// `--parents`: the source's path (below a `/./` pivot, if any) is kept under dest.
    pub parents: bool,
    /// `--exclude` patterns, relative to each source.
    pub exclude: Vec<String>,
    /// `ADD --checksum=sha256:...` of a URL source.
    pub checksum: Option<String>,
    /// `ADD --keep-git-dir` of a git source.
    pub keep_git_dir: bool,
    pub heredocs: Vec<Heredoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Instruction {
    From {
        image: String,
        name: Option<String>,
        platform: Option<String>,
    },
    Run {
        command: Command,
        network: Option<String>,
        /// `--security=sandbox|insecure`.
        security: Option<String>,
        /// `--mount` values as written (expanded and read by `mounts::parse_mount` when
        /// the step runs, with the stage's variables, as BuildKit does).
        mounts: Vec<String>,
        heredocs: Vec<Heredoc>,
    },
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    Label(Vec<(String, String)>),
    Maintainer(String),
    Expose(Vec<String>),
    Env(Vec<(String, String)>),
    Add(CopyArgs),
    Copy(CopyArgs),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    Arg(Vec<(String, Option<String>)>),
    Onbuild(String),
    StopSignal(String),
    Healthcheck(Option<Health>),
}

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub original: String,
    pub line: usize,
    pub instruction: Instruction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// Lower-cased `AS` name.
    pub name: Option<String>,
    /// The FROM step (its image still unexpanded).
    pub from: Step,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    pub escape: char,
    /// ARGs before the first FROM.
    pub meta_args: Vec<Step>,
    pub stages: Vec<Stage>,
    pub warnings: Vec<String>,
}

fn json_array(rest: &str) -> Option<Vec<String>> {
    let t = rest.trim();
    if !t.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(t).ok()
}

fn command(rest: &str) -> Command {
    match json_array(rest) {
        Some(v) => Command::Exec(v),
        None => Command::Shell(rest.to_string()),
    }
}

/// Splits on unquoted whitespace, keeping quotes and escapes in the words (they are
/// processed at expansion), as BuildKit's `parseWords`.
pub fn split_words(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            None => {
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// `k=v k2=v2` or the legacy `k v...` (one pair, the value is the rest of the line).
fn name_values(node: &Node, escape: char) -> Result<Vec<(String, String)>, ParseError> {
    let what = node.keyword.to_uppercase();
    let words = split_words(&node.rest, escape);
    if words.is_empty() {
        return Err(err(
            node.start_line,
            format!("{what} requires at least one argument"),
        ));
    }
    if !words[0].contains('=') {
        // Legacy form.
        let key = words[0].clone();
        let value = node.rest.trim()[key.len()..].trim().to_string();
        if value.is_empty() && node.keyword == "env" {
            return Err(err(node.start_line, "ENV must have two arguments"));
        }
        return Ok(vec![(key, value)]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(err(
                node.start_line,
                format!("{what} names can not be blank and must be in key=value form: {w:?}"),
            )),
        })
        .collect()
}

/// Go-style durations for HEALTHCHECK flags (`30s`, `1m30s`, `500ms`), in nanoseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    isula_types::parse_go_duration(s)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
}

struct Flags<'a> {
    node: &'a Node,
    values: Vec<(String, Option<String>)>,
}

impl<'a> Flags<'a> {
    fn new(node: &'a Node, allowed: &[&str]) -> Result<Self, ParseError> {
        let mut values = Vec::new();
        for f in &node.flags {
            let body = &f[2..];
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !allowed.contains(&name.as_str()) {
                return Err(err(
                    node.start_line,
                    format!("unknown flag: --{name} for {}", node.keyword.to_uppercase()),
                ));
            }
            // Flags BuildKit takes more than once.
            let repeatable = ["mount", "exclude"].contains(&name.as_str());
            if !repeatable && values.iter().any(|(n, _)| n == &name) {
                return Err(err(
                    node.start_line,
                    format!("duplicate flag specified: --{name}"),
                ));
            }
            values.push((name, value));
        }
        Ok(Flags { node, values })
    }

    fn string(&self, name: &str) -> Result<Option<String>, ParseError> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) => Ok(Some(v.clone())),
            Some((_, None)) => Err(err(
                self.node.start_line,
                format!("missing a value on flag: --{name}"),
            )),
        }
    }

    fn boolean(&self, name: &str) -> Result<bool, ParseError> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(false),
            Some((_, None)) => Ok(true),
            Some((_, Some(v))) => match v.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(err(
                    self.node.start_line,
                    format!("expecting boolean value for flag --{name}, not: {v}"),
                )),
            },
        }
    }

    fn duration(&self, name: &str) -> Result<Option<i64>, ParseError> {
        match self.string(name)? {
            None => Ok(None),
            Some(v) => match parse_duration(&v) {
                Some(d) if d >= 0 => Ok(Some(d)),
                _ => Err(err(
                    self.node.start_line,
                    format!("invalid duration {v:?} for --{name}"),
                )),
            },
        }
    }
}

fn copy_args(node: &Node, escape: char, is_add: bool) -> Result<CopyArgs, ParseError> {
    let allowed: &[&str] = if is_add {
        &[
            "chown",
            "chmod",
            "link",
            "checksum",
            "keep-git-dir",
            "exclude",
        ]
    } else {
        &["chown", "chmod", "from", "link", "parents", "exclude"]
    };
    let flags = Flags::new(node, allowed)?;
    let mut words = match json_array(&node.rest) {
        Some(v) => v,
        None => split_words(&node.rest, escape),
    };
    let what = node.keyword.to_uppercase();
    if words.is_empty() || (words.len() < 2 && node.heredocs.is_empty()) {
        return Err(err(
            node.start_line,
            format!(
                "{what} requires at least two arguments, but only {} provided",
                words.len()
            ),
        ));
    }
    let dest = words.pop().unwrap_or_default();
    // Heredoc markers stand for their documents; they are not paths.
    let sources = words.into_iter().filter(|w| !w.starts_with("<<")).collect();
    Ok(CopyArgs {
        sources,
        dest,
        from: flags.string("from")?,
        chown: flags.string("chown")?,
        chmod: flags.string("chmod")?,
        link: flags.boolean("link")?,
        parents: flags.boolean("parents")?,
        checksum: flags.string("checksum")?,
        keep_git_dir: flags.boolean("keep-git-dir")?,
        exclude: flags
            .values
            .iter()
            .filter(|(n, _)| n == "exclude")
            .map(|(_, v)| {
                v.clone()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| err(node.start_line, "missing a value on flag: --exclude"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        heredocs: node.heredocs.clone(),
    })
}

/// Validates a stage name (lower-cased): letters, digits, `_`, `-`, `.`, at most 64.
pub fn valid_stage_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= STAGE_NAME_MAX
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(c))
}

/// One node → its typed instruction.
pub fn instruction(node: &Node, escape: char) -> Result<Instruction, ParseError> {
    let line = node.start_line;
    let what = node.keyword.to_uppercase();
    let no_flags = |node: &Node| Flags::new(node, &[]).map(|_| ());
    let needs_arg = |node: &Node| {
        if node.rest.trim().is_empty() {
            Err(err(line, format!("{what} requires at least one argument")))
        } else {
            Ok(())
        }
    };
    Ok(match node.keyword.as_str() {
        "from" => {
            let flags = Flags::new(node, &["platform"])?;
            let words: Vec<&str> = node.rest.split_whitespace().collect();
            let (image, name) = match words.as_slice() {
                [image] => (image.to_string(), None),
                [image, kw, name] if kw.eq_ignore_ascii_case("as") => {
                    let name = name.to_ascii_lowercase();
                    if !valid_stage_name(&name) {
                        return Err(err(
                            line,
                            format!("invalid name for build stage: {name:?}, name can only contain letters, digits, '_', '-' and '.' and be at most {STAGE_NAME_MAX} characters"),
                        ));
                    }
                    (image.to_string(), Some(name))
                }
                _ => return Err(err(line, "FROM requires either one or three arguments")),
            };
            Instruction::From {
                image,
                name,
                platform: flags.string("platform")?,
            }
        }
        "run" => {
            let flags = Flags::new(node, &["network", "mount", "security"])?;
            let security = flags.string("security")?;
            if let Some(v) = &security {
                if v != "insecure" && v != "sandbox" {
                    return Err(err(
                        line,
                        format!("RUN --security={v}: expected sandbox or insecure"),
                    ));
                }
            }
            let mut mounts = Vec::new();
            for (n, v) in flags.values.iter().filter(|(n, _)| n == "mount") {
                let Some(v) = v else {
                    return Err(err(line, format!("missing a value on flag: --{n}")));
                };
                // What needs no variables is checked now; the rest when the step runs.
                if !v.contains('$') {
                    crate::mounts::parse_mount(v)
                        .map_err(|e| err(line, format!("--mount={v}: {e}")))?;
                }
                mounts.push(v.clone());
            }
            let network = flags.string("network")?;
            if let Some(n) = &network {
                if !["host", "default", "none"].contains(&n.as_str()) {
                    return Err(err(
                        line,
                        format!("RUN --network={n} is not supported: use default, none or host"),
                    ));
                }
            }
            needs_arg(node)?;
            Instruction::Run {
                command: command(&node.rest),
                network,
                security,
                mounts,
                heredocs: node.heredocs.clone(),
            }
        }
        "cmd" => {
            no_flags(node)?;
            Instruction::Cmd(command(&node.rest))
        }
        "entrypoint" => {
            no_flags(node)?;
            Instruction::Entrypoint(command(&node.rest))
        }
        "shell" => {
            no_flags(node)?;
            match json_array(&node.rest) {
                Some(v) if !v.is_empty() => Instruction::Shell(v),
                _ => return Err(err(line, "SHELL requires the arguments to be in JSON form")),
            }
        }
        "label" => {
            no_flags(node)?;
            Instruction::Label(name_values(node, escape)?)
        }
        "env" => {
            no_flags(node)?;
            Instruction::Env(name_values(node, escape)?)
        }
        "maintainer" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::Maintainer(node.rest.clone())
        }
        "expose" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::Expose(split_words(&node.rest, escape))
        }
        "add" => Instruction::Add(copy_args(node, escape, true)?),
        "copy" => Instruction::Copy(copy_args(node, escape, false)?),
        "volume" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::Volume(
                json_array(&node.rest).unwrap_or_else(|| split_words(&node.rest, escape)),
            )
        }
        "user" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::User(node.rest.clone())
        }
        "workdir" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::Workdir(node.rest.clone())
        }
        "stopsignal" => {
            no_flags(node)?;
            needs_arg(node)?;
            Instruction::StopSignal(node.rest.clone())
        }
        "arg" => {
            no_flags(node)?;
            let words = split_words(&node.rest, escape);
            if words.is_empty() {
                return Err(err(line, "ARG requires at least one argument"));
            }
            Instruction::Arg(
                words
                    .into_iter()
                    .map(|w| match w.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (w, None),
                    })
                    .collect(),
            )
        }
        "onbuild" => {
            no_flags(node)?;
            needs_arg(node)?;
            let trigger = node.rest.trim();
            let kw = trigger
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            match kw.as_str() {
                "onbuild" => {
                    return Err(err(
                        line,
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ))
                }
                "from" | "maintainer" => {
                    return Err(err(
                        line,
                        format!("{} isn't allowed as an ONBUILD trigger", kw.to_uppercase()),
                    ))
                }
                _ => {}
            }
            // The trigger must itself parse.
            let nested = parser::parse(trigger)
                .map_err(|e| err(line, format!("ONBUILD trigger: {}", e.message)))?;
            for n in &nested.nodes {
                instruction(n, escape)
                    .map_err(|e| err(line, format!("ONBUILD trigger: {}", e.message)))?;
            }
            Instruction::Onbuild(trigger.to_string())
        }
        "healthcheck" => {
            let flags = Flags::new(
                node,
                &[
                    "interval",
                    "timeout",
                    "start-period",
                    "start-interval",
                    "retries",
                ],
            )?;
            let rest = node.rest.trim();
            let (first, args) = match rest.find(char::is_whitespace) {
                Some(p) => (&rest[..p], rest[p..].trim()),
                None => (rest, ""),
            };
            match first.to_ascii_uppercase().as_str() {
                "NONE" => {
                    if !args.is_empty() || !node.flags.is_empty() {
                        return Err(err(line, "HEALTHCHECK NONE takes no arguments"));
                    }
                    Instruction::Healthcheck(None)
                }
                "CMD" => {
                    if args.is_empty() {
                        return Err(err(line, "Missing command after HEALTHCHECK CMD"));
                    }
                    let test = match command(args) {
                        Command::Exec(v) => [vec!["CMD".to_string()], v].concat(),
                        Command::Shell(s) => vec!["CMD-SHELL".to_string(), s],
                    };
                    let retries = match flags.string("retries")? {
                        None => None,
                        Some(r) => match r.parse::<i64>() {
                            Ok(n) if n >= 0 => Some(n),
                            _ => {
                                return Err(err(
                                    line,
                                    format!("--retries must be a non-negative integer, got {r:?}"),
                                ))
                            }
                        },
                    };
                    Instruction::Healthcheck(Some(Health {
                        test,
                        interval: flags.duration("interval")?,
                        timeout: flags.duration("timeout")?,
                        start_period: flags.duration("start-period")?,
                        start_interval: flags.duration("start-interval")?,
                        retries,
                    }))
                }
                _ => {
                    return Err(err(
                        line,
                        "Unknown type for healthcheck; must be CMD or NONE",
                    ))
                }
            }
        }
        other => {
            return Err(err(
                line,
                format!("unknown instruction: {}", other.to_uppercase()),
            ))
        }
    })
}

/// Parses a whole Dockerfile into stages.
pub fn parse_dockerfile(text: &str) -> Result<Dockerfile, ParseError> {
    let parsed = parser::parse(text)?;
    let escape = parsed.directives.escape;
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for node in &parsed.nodes {
        let step = Step {
            original: node.original.clone(),
            line: node.start_line,
            instruction: instruction(node, escape)?,
        };
        match (&step.instruction, stages.last_mut()) {
            (Instruction::From { name, .. }, _) => {
                if let Some(n) = name {
                    if stages.iter().any(|s| s.name.as_ref() == Some(n)) {
                        return Err(err(
                            node.start_line,
                            format!("duplicate name {n:?} for build stage"),
                        ));
                    }
                }
                stages.push(Stage {
                    name: name.clone(),
                    from: step,
                    steps: Vec::new(),
                });
            }
            (Instruction::Arg(_), None) => meta_args.push(step),
            (_, None) => {
                return Err(err(
                    node.start_line,
                    format!(
                        "{} found before the first FROM: only ARG may come before FROM",
                        node.keyword.to_uppercase()
                    ),
                ))
            }
            (_, Some(stage)) => stage.steps.push(step),
        }
    }
    if stages.is_empty() {
        return Err(err(0, "the Dockerfile has no FROM instruction"));
    }
    Ok(Dockerfile {
        escape,
        meta_args,
        stages,
        warnings: parsed.warnings,
    })
}

/// An error of expansion, with the line.
pub fn expand_err(step: &Step, e: crate::lex::LexError) -> ParseError {
    err(step.line, format!("{}: {e}", step.original))
}

impl Instruction {
    /// The instruction with its words expanded against `vars` (Docker expands ADD, COPY,
    /// ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR and ARG; never RUN, CMD,
    /// ENTRYPOINT, SHELL, ONBUILD, HEALTHCHECK).
    pub fn expand(
        &self,
        lexer: &Lexer,
        vars: &dyn Vars,
    ) -> Result<Instruction, crate::lex::LexError> {
        let w = |s: &String| lexer.process_word(s, vars);
        let words = |v: &Vec<String>| -> Result<Vec<String>, crate::lex::LexError> {
            let mut out = Vec::new();
            for s in v {
                out.extend(lexer.process_words(s, vars)?);
            }
            Ok(out)
        };
        Ok(match self {
            Instruction::From {
                image,
                name,
                platform,
            } => Instruction::From {
                image: w(image)?,
                name: name.clone(),
                platform: platform.as_ref().map(w).transpose()?,
            },
            Instruction::Label(kv) => Instruction::Label(
                kv.iter()
                    .map(|(k, v)| Ok((w(k)?, w(v)?)))
                    .collect::<Result<_, _>>()?,
            ),
            Instruction::Env(kv) => Instruction::Env(
                kv.iter()
                    .map(|(k, v)| Ok((w(k)?, w(v)?)))
                    .collect::<Result<_, _>>()?,
            ),
            Instruction::Arg(kv) => Instruction::Arg(
                kv.iter()
                    .map(|(k, v)| Ok((k.clone(), v.as_ref().map(w).transpose()?)))
                    .collect::<Result<_, _>>()?,
            ),
            Instruction::Expose(v) => Instruction::Expose(words(v)?),
            Instruction::Volume(v) => {
                Instruction::Volume(v.iter().map(w).collect::<Result<_, _>>()?)
            }
            Instruction::User(s) => Instruction::User(w(s)?),
            Instruction::Workdir(s) => Instruction::Workdir(w(s)?),
            Instruction::StopSignal(s) => Instruction::StopSignal(w(s)?),
            Instruction::Add(c) | Instruction::Copy(c) => {
                let mut heredocs = c.heredocs.clone();
                for h in heredocs.iter_mut().filter(|h| h.expand) {
                    h.content = lexer.expand_only(&h.content, vars)?;
                }
                let args = CopyArgs {
                    sources: c.sources.iter().map(w).collect::<Result<_, _>>()?,
                    dest: w(&c.dest)?,
                    from: c.from.as_ref().map(w).transpose()?,
                    chown: c.chown.as_ref().map(w).transpose()?,
                    chmod: c.chmod.as_ref().map(w).transpose()?,
                    link: c.link,
                    parents: c.parents,
                    exclude: c.exclude.iter().map(w).collect::<Result<_, _>>()?,
                    checksum: c.checksum.as_ref().map(w).transpose()?,
                    keep_git_dir: c.keep_git_dir,
                    heredocs,
                };
                if matches!(self, Instruction::Add(_)) {
                    Instruction::Add(args)
                } else {
                    Instruction::Copy(args)
                }
            }
            other => other.clone(),
        })
    }
}
