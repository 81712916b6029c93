//! Golden files: `testdata/<case>/Dockerfile` beside `expected.json` (the parsed stages)
//! or `expected-error.txt` (the error). `UPDATE_GOLDEN=1` rewrites them; review the diff.

use isula_dockerfile::instructions::parse_dockerfile;
use std::path::Path;

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "golden cases are missing");
    let mut failures = Vec::new();
    for case in cases {
        let text = std::fs::read_to_string(case.join("Dockerfile")).expect("Dockerfile");
        let name = case
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let (file, actual) = match parse_dockerfile(&text) {
            Ok(df) => (
                "expected.json",
                serde_json::to_string_pretty(&df).expect("json") + "\n",
            ),
            Err(e) => ("expected-error.txt", format!("{e}\n")),
        };
        let path = case.join(file);
        if update {
            let _ = std::fs::remove_file(case.join("expected.json"));
            let _ = std::fs::remove_file(case.join("expected-error.txt"));
            std::fs::write(&path, &actual).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{name}: {file} differs\n--- expected\n{expected}\n--- actual\n{actual}"
            )),
            Err(_) => failures.push(format!("{name}: no {file}; got:\n{actual}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
