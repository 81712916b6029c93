//! `RUN --mount=...` specifications, read as BuildKit reads them
//! (`frontend/dockerfile/instructions/commands_runmount.go`): comma-separated fields, each
//! `key=value` or a bare boolean key; each value is expanded (by the caller's expander,
//! with the stage's ARGs and ENV, as BuildKit does), keys never are. Pure: what the mount
//! means is the builder's business.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountKind {
    pub fn name(self) -> &'static str {
        match self {
            MountKind::Bind => "bind",
            MountKind::Cache => "cache",
            MountKind::Tmpfs => "tmpfs",
            MountKind::Secret => "secret",
            MountKind::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share one cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Every writer at once (the default).
    Shared,
    /// A writer that finds the cache in use gets a fresh one of its own.
    Private,
    /// Writers wait for each other.
    Locked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunMount {
    pub kind: MountKind,
    /// Where it appears in the RUN's filesystem (as written: may be relative to WORKDIR).
    pub target: Option<String>,
    /// The path inside `from` (or the build context) to mount.
    pub source: Option<String>,
    /// A stage name or index, or an image (bind and cache).
    pub from: Option<String>,
    pub readonly: bool,
    /// Cache, secret and ssh id.
    pub id: Option<String>,
    pub sharing: Sharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// tmpfs size in bytes.
    pub size: Option<u64>,
    pub required: bool,
    /// Secret as an environment variable.
    pub env: Option<String>,
}

/// Docker's `units.RAMInBytes`: a number with an optional binary unit (`64m`, `1GiB`, `512k`).
pub fn ram_in_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size: {text:?}"))?;
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(format!("invalid size: {text:?}")),
    };
    Ok((value * (1u64 << shift) as f64) as u64)
}

fn boolean(key: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err(format!("invalid value {value:?} for {key}: not a boolean")),
    }
}

/// Splits the flag's value on commas outside double quotes (Go's csv reader, one record).
fn fields(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '"' if quoted => {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                }
            }
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                at_start = true;
            }
            c => {
                cur.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err(format!("unterminated quote in mount {text:?}"));
    }
    out.push(cur);
    Ok(out)
}

/// Reads one `--mount` value whose values need no expansion.
pub fn parse_mount(text: &str) -> Result<RunMount, String> {
    parse_mount_with(text, &mut |v| Ok(v.to_string()))
}

/// Reads one `--mount` value, each field's value expanded by `expand` (keys never are).
pub fn parse_mount_with(
    text: &str,
    expand: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<RunMount, String> {
    let mut m = RunMount {
        kind: MountKind::Bind,
        target: None,
        source: None,
        from: None,
        readonly: true,
        id: None,
        sharing: Sharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: false,
        env: None,
    };
    let mut ro_given = false;
    let mut sharing_given = false;
    let secretish = |m: &RunMount| matches!(m.kind, MountKind::Secret | MountKind::Ssh);
    for field in fields(text)? {
        if field.is_empty() {
            continue;
        }
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(expand(v)?)),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(value) = value else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_given = true;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_given = true;
                }
                "required" if secretish(&m) => m.required = true,
                "required" => {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        m.kind.name()
                    ))
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        let number = |base: u32| {
            u32::from_str_radix(&value, base)
                .map_err(|_| format!("invalid value {value} for {key}"))
        };
        match key.as_str() {
            "type" => {
                m.kind = match value.to_ascii_lowercase().as_str() {
                    "bind" => MountKind::Bind,
                    "cache" => MountKind::Cache,
                    "tmpfs" => MountKind::Tmpfs,
                    "secret" => MountKind::Secret,
                    "ssh" => MountKind::Ssh,
                    _ => return Err(format!("unsupported mount type {value:?}")),
                }
            }
            "from" => m.from = Some(value),
            "source" | "src" => m.source = Some(value),
            "target" | "dst" | "destination" => m.target = Some(value),
            "readonly" | "ro" => {
                m.readonly = boolean(&key, &value)?;
                ro_given = true;
            }
            "readwrite" | "rw" => {
                m.readonly = !boolean(&key, &value)?;
                ro_given = true;
            }
            "required" if secretish(&m) => m.required = boolean(&key, &value)?,
            "sharing" => {
                m.sharing = match value.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(format!("unsupported sharing value {value:?}")),
                };
                sharing_given = true;
            }
            "mode" => m.mode = Some(number(8)?),
            "uid" => m.uid = Some(number(10)?),
            "gid" => m.gid = Some(number(10)?),
            "id" => m.id = Some(value),
            "size" if m.kind == MountKind::Tmpfs => m.size = Some(ram_in_bytes(&value)?),
            "env" if m.kind == MountKind::Secret => m.env = Some(value),
            "required" | "size" | "env" => {
                return Err(format!(
                    "unexpected key '{key}' for mount type '{}'",
                    m.kind.name()
                ))
            }
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
    }
    let kind = m.kind.name();
    if !matches!(
        m.kind,
        MountKind::Secret | MountKind::Ssh | MountKind::Cache
    ) && (m.mode.is_some() || m.uid.is_some() || m.gid.is_some())
    {
        return Err(format!(
            "mode, uid and gid are not allowed for {kind:?} type mounts"
        ));
    }
    if sharing_given && m.kind != MountKind::Cache {
        return Err(format!("invalid cache sharing set for {kind} mount"));
    }
    if m.from.is_some() && !matches!(m.kind, MountKind::Bind | MountKind::Cache) {
        return Err(format!("{kind} mounts cannot have a from"));
    }
    if !ro_given {
        m.readonly = m.kind == MountKind::Bind;
    }
    match m.kind {
        MountKind::Secret | MountKind::Ssh => {}
        _ => {
            let Some(t) = m.target.as_deref().filter(|t| !t.is_empty()) else {
                return Err(format!("mount type {kind} requires a target"));
            };
            if t.split('/').all(|c| c.is_empty() || c == ".") {
                return Err(format!("mount target {t:?}: cannot mount over the root"));
            }
        }
    }
    if let Some(id) = &m.id {
        if id.is_empty() || id.contains('/') || id.split('/').any(|c| c == "..") {
            return Err(format!(
                "mount id {id:?}: must be a plain name (no '/', not '..')"
            ));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_defaults_and_spellings() {
        let m = parse_mount("type=cache,target=/root/.cache").expect("cache");
        assert_eq!(
            (m.kind, m.readonly, m.sharing, m.target.as_deref()),
            (
                MountKind::Cache,
                false,
                Sharing::Shared,
                Some("/root/.cache")
            )
        );
        let m = parse_mount("target=/src").expect("bind");
        assert_eq!((m.kind, m.readonly), (MountKind::Bind, true));
        let m = parse_mount("type=bind,src=a,dst=/b,rw").expect("rw");
        assert_eq!(
            (m.source.as_deref(), m.target.as_deref(), m.readonly),
            (Some("a"), Some("/b"), false)
        );
        let m = parse_mount("type=bind,destination=/b,readwrite=true,from=build").expect("from");
        assert_eq!((m.from.as_deref(), m.readonly), (Some("build"), false));
        let m = parse_mount("type=tmpfs,target=/t,size=64m").expect("tmpfs");
        assert_eq!((m.size, m.readonly), (Some(64 << 20), false));
        let m =
            parse_mount("type=cache,id=go,target=/go,sharing=locked,mode=0700,uid=1000,gid=100")
                .expect("cache opts");
        assert_eq!(
            (m.id.as_deref(), m.sharing, m.mode, m.uid, m.gid),
            (
                Some("go"),
                Sharing::Locked,
                Some(0o700),
                Some(1000),
                Some(100)
            )
        );
        let m = parse_mount("type=secret,id=tok,required").expect("secret");
        assert!(m.required && m.target.is_none());
        let m = parse_mount("\"type=cache\",\"target=/a,b\"").expect("quoted");
        assert_eq!(m.target.as_deref(), Some("/a,b"));
        assert_eq!(
            parse_mount("TYPE=CACHE,Target=/x").expect("case").kind,
            MountKind::Cache
        );
    }

    #[test]
    fn bad_mounts_are_named() {
        for (text, want) in [
            ("type=volume,target=/x", "unsupported mount type"),
            ("type=cache", "requires a target"),
            ("type=bind,target=/", "cannot mount over the root"),
            ("type=cache,target=/x,id=a/b", "plain name"),
            ("type=cache,target=/x,id=..", "plain name"),
            (
                "type=cache,target=/x,sharing=sometimes",
                "unsupported sharing value",
            ),
            (
                "type=bind,target=/x,sharing=locked",
                "invalid cache sharing",
            ),
            ("type=bind,target=/x,mode=0700", "not allowed"),
            ("type=cache,target=/x,mode=9", "invalid value 9 for mode"),
            ("type=cache,target=/x,uid=me", "invalid value me for uid"),
            ("type=tmpfs,target=/x,from=a", "cannot have a from"),
            ("type=bind,target=/x,size=1m", "unexpected key 'size'"),
            ("type=tmpfs,target=/x,size=lots", "invalid size"),
            ("type=bind,target=/x,required", "unexpected key 'required'"),
            ("type=bind,target=/x,colour=blue", "unexpected key 'colour'"),
            ("type=bind,target=/x,bogus", "must be a key=value pair"),
            ("type=bind,target=/x,ro=maybe", "not a boolean"),
            ("\"type=bind", "unterminated quote"),
        ] {
            let e = parse_mount(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
