//! What of the build context a Dockerfile can read, so that a remote build sends only that:
//! the sources of COPY and ADD and the sources of `RUN --mount=type=bind` that name no
//! stage, image or named context. The answer errs on the side of sending more: a source
//! with a wildcard reaches its whole literal directory, and anything the client cannot know
//! here (a source or mount with a variable, a base image's ONBUILD triggers, which the
//! caller checks) reaches the whole context.

use isula_dockerfile::instructions::{Dockerfile, Instruction};
use isula_dockerfile::mounts::MountKind;

/// What a Dockerfile reads of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Any of it.
    All,
    /// Only these relative paths (and what is below them): directories as a source or
    /// mount bring their whole tree.
    Paths(Vec<String>),
}

impl Reach {
    /// Whether the context entry `path` is to be sent, and whether a directory there is to
    /// be walked (it is on the way to, or below, a reached path).
    pub fn wants(&self, path: &str) -> (bool, bool) {
        match self {
            Reach::All => (true, true),
            Reach::Paths(ps) => {
                let below = ps
                    .iter()
                    .any(|p| path == p || path.starts_with(&format!("{p}/")));
                let above = ps.iter().any(|p| p.starts_with(&format!("{path}/")));
                (below || above, below || above)
            }
        }
    }
}

/// The literal directory part of a context source (before any wildcard), cleaned:
/// `None` when that is the whole context.
fn literal_prefix(source: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in source.split('/') {
        if c.contains(['*', '?', '[', '\\']) {
            break;
        }
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// What `df` reads of the context, and the base images whose ONBUILD triggers could read
/// more (the caller must find that they have none, else send everything).
pub fn reach(df: &Dockerfile) -> (Reach, Vec<String>) {
    let mut paths: Vec<String> = Vec::new();
    let mut bases: Vec<String> = Vec::new();
    let stage_names: Vec<String> = df.stages.iter().filter_map(|s| s.name.clone()).collect();
    let mut add = |source: &str| -> bool {
        if source.contains('$') {
            return false;
        }
        match literal_prefix(source) {
            Some(p) => {
                if !paths.contains(&p) {
                    paths.push(p);
                }
                true
            }
            None => false,
        }
    };
    for (i, stage) in df.stages.iter().enumerate() {
        if let Instruction::From { image, .. } = &stage.from.instruction {
            let lower = image.to_ascii_lowercase();
            let earlier_stage = stage_names[..]
                .iter()
                .any(|n| *n == lower && df.stages[..i].iter().any(|s| s.name.as_ref() == Some(n)))
                || lower.parse::<usize>().is_ok_and(|n| n < i);
            if image.contains('$') {
                return (Reach::All, Vec::new());
            }
            if !earlier_stage && lower != "scratch" && !bases.contains(image) {
                bases.push(image.clone());
            }
        }
        for step in &stage.steps {
            match &step.instruction {
                Instruction::Copy(c) | Instruction::Add(c) => {
                    if c.from.is_some() {
                        continue;
                    }
                    for s in &c.sources {
                        let is_add = matches!(step.instruction, Instruction::Add(_));
                        let remote = is_add && (s.contains("://") || s.starts_with("git@"));
                        let heredoc = c.heredocs.iter().any(|h| {
                            s.trim_start_matches("<<")
                                .trim_start_matches('-')
                                .trim_matches(|ch| ch == '"' || ch == '\'')
                                == h.name
                        }) || s.starts_with("<<");
                        if remote || heredoc {
                            continue;
                        }
                        if !add(s) {
                            return (Reach::All, Vec::new());
                        }
                    }
                }
                Instruction::Run { mounts, .. } => {
                    for m in mounts {
                        if m.contains('$') {
                            return (Reach::All, Vec::new());
                        }
                        let Ok(mount) = isula_dockerfile::mounts::parse_mount(m) else {
                            // The build reports it; nothing is decided here.
                            return (Reach::All, Vec::new());
                        };
                        if mount.kind != MountKind::Bind || mount.from.is_some() {
                            continue;
                        }
                        if !add(mount.source.as_deref().unwrap_or(".")) {
                            return (Reach::All, Vec::new());
                        }
                    }
                }
                // A trigger of this Dockerfile runs in a child image's build, not here.
                _ => {}
            }
        }
    }
    (Reach::Paths(paths), bases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> (Reach, Vec<String>) {
        reach(&isula_dockerfile::instructions::parse_dockerfile(text).expect("parse"))
    }

    fn paths(v: &[&str]) -> Reach {
        Reach::Paths(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn sources_bind_mounts_and_their_directories() {
        let (r, bases) = of(
            "FROM busybox AS b\nCOPY app/ /app/\nADD ./conf/x.toml /etc/\n\
             COPY --from=b /bin/sh /sh\nADD https://example.com/a.tgz /\n\
             RUN --mount=type=bind,source=tools,target=/t true\n\
             RUN --mount=type=bind,from=b,target=/b true\n\
             RUN --mount=type=cache,target=/c true\n\
             FROM b\nCOPY src/*.go /go/\nCOPY a/../lib /lib\n",
        );
        assert_eq!(r, paths(&["app", "conf/x.toml", "tools", "src", "lib"]));
        assert_eq!(bases, ["busybox"]);
        assert_eq!(r.wants("app"), (true, true));
        assert_eq!(r.wants("app/x/y"), (true, true));
        assert_eq!(r.wants("conf"), (true, true));
        assert_eq!(r.wants("conf/other.toml"), (false, false));
        assert_eq!(r.wants("big.iso"), (false, false));
        assert_eq!(r.wants("application"), (false, false));
    }

    #[test]
    fn what_cannot_be_known_here_reaches_everything() {
        for text in [
            "FROM busybox\nCOPY . /c/\n",
            "FROM busybox\nCOPY *.txt /c/\n",
            "FROM busybox\nARG D=x\nCOPY $D /c/\n",
            "FROM busybox\nRUN --mount=type=bind,target=/ctx true\n",
            "FROM busybox\nARG S=a\nRUN --mount=type=bind,source=$S,target=/x true\n",
            "ARG BASE=busybox\nFROM $BASE\nCOPY a /a\n",
        ] {
            assert_eq!(of(text).0, Reach::All, "{text}");
        }
        // A heredoc is no context file.
        let (r, _) = of("FROM busybox\nCOPY <<EOF /x\nhello\nEOF\n");
        assert_eq!(r, paths(&[]));
        assert_eq!(of("FROM scratch\nCOPY a /a\n").1, Vec::<String>::new());
    }
}
