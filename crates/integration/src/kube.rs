//! Reading what the manifests in contrib/kubernetes/ say, in the narrow form they are
//! written in (no YAML library: the tests need lists of scalars and of `key: value` maps),
//! so tests can run the pods' containers in Docker as a kubelet would.

/// The items of the YAML list under `key:` (one level deeper than it), as written in
/// contrib/kubernetes/ (statefulset.yaml, build-job.yaml): `- "..."` scalars or
/// `- name:`/`value:` pairs; nested keys of an item are flattened into it.
pub fn yaml_list(text: &str, key: &str) -> Vec<Vec<(String, String)>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}:"));
    let Some(head) = lines.next() else {
        panic!("no {key}: in the manifest")
    };
    let indent = head.len() - head.trim_start().len();
    let mut items: Vec<Vec<(String, String)>> = Vec::new();
    for l in lines {
        let t = l.trim_start();
        let i = l.len() - t.len();
        // A trailing comment is no part of the value.
        let t = t.split(" #").next().unwrap_or(t).trim_end();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if i <= indent && !(i == indent && t.starts_with("- ")) {
            break;
        }
        let (new, t) = match t.strip_prefix("- ") {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        if new {
            items.push(Vec::new());
        }
        let Some(item) = items.last_mut() else {
            continue;
        };
        let unquote = |s: &str| s.trim().trim_matches('"').to_string();
        match t.split_once(": ") {
            Some((k, v)) if !t.starts_with("--") => item.push((k.trim().into(), unquote(v))),
            _ => item.push((String::new(), unquote(t.trim_end_matches(':')))),
        }
    }
    items
}

/// The value of `key` in a list item.
pub fn field<'a>(item: &'a [(String, String)], key: &str) -> Option<&'a str> {
    item.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The value of the first `key: value` line (unquoted, a trailing comment dropped).
pub fn yaml_scalar(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let t = l.trim_start();
        if t.starts_with('#') {
            return None;
        }
        let t = t.trim_start_matches("- ");
        let v = t.strip_prefix(key)?.strip_prefix(':')?;
        let v = v.split(" #").next().unwrap_or(v).trim();
        (!v.is_empty()).then(|| v.trim_matches('"').to_string())
    })
}
