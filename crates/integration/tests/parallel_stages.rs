//! Independent stages run at once (bounded by the CPU count), and the build is the one a
//! one-by-one run gives: same image, same output, same first error.

use isula_integration::*;
use std::path::{Path, PathBuf};

/// The same base on every daemon.
fn load_base(d: &Daemon) {
    d.load_fixed_busybox("base:1");
}

fn context(d: &Daemon, dockerfile: &str) -> PathBuf {
    let dir = d.dir.path().join("ctx");
    std::fs::create_dir_all(&dir).expect("ctx");
    std::fs::write(dir.join("Dockerfile"), dockerfile).expect("Dockerfile");
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("path")
}

const FOUR_STAGES: &str = "FROM base:1 AS one\n\
RUN echo one > /one && echo built one\n\
FROM base:1 AS broken\n\
RUN echo never && exit 3\n\
FROM base:1 AS two\n\
RUN echo two > /two && echo built two\n\
FROM base:1 AS three\n\
COPY --from=one /one /one\n\
RUN echo three > /three && cat /one\n\
FROM base:1 AS four\n\
RUN echo four > /four && echo built four\n\
FROM base:1\n\
COPY --from=one /one /r/\n\
COPY --from=two /two /r/\n\
COPY --from=three /three /one /r/\n\
COPY --from=four /four /r/\n\
RUN ls /r\n";

const STATIC: &str = "--build-static=build-time=2024-01-02 03:04:05";

#[test]
fn stages_run_at_once_and_give_what_one_by_one_gives() {
    if !require_root() {
        return;
    }
    let all = Daemon::start();
    let one_cpu = Daemon::start_on_cpus("0");
    let mut outputs = Vec::new();
    for d in [&all, &one_cpu] {
        load_base(d);
        let ctx = context(d, FOUR_STAGES);
        let out = d.ok(&["ctr-img", "build", STATIC, "--no-cache", path(&ctx)]);
        assert!(!out.contains("never"), "the unused stage ran: {out}");
        outputs.push(out);
    }
    // Same lines in the same order (step numbers included), so the same image.
    assert_eq!(outputs[0], outputs[1]);
    let steps: Vec<&str> = outputs[0]
        .lines()
        .filter(|l| l.starts_with("STEP"))
        .collect();
    assert_eq!(steps.len(), 15, "{}", outputs[0]);
    assert!(steps[14].starts_with("STEP 15: RUN ls /r"), "{steps:?}");

    // A failure: one by one, the first failing stage in order is the error, and nothing
    // of the stages after it is printed.
    let failing = "FROM base:1 AS a\nRUN echo a-ran\nFROM base:1 AS b\nRUN exit 4\n\
FROM base:1 AS c\nRUN echo c-ran && exit 5\nFROM base:1\nCOPY --from=a / /a\n\
COPY --from=b / /b\nCOPY --from=c / /c\n";
    let mut errors = Vec::new();
    for d in [&all, &one_cpu] {
        let ctx = context(d, failing);
        let o = d.cli(&["ctr-img", "build", "--no-cache", path(&ctx)]);
        assert!(!o.status.success());
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(err.contains("STEP 4 (line 4) RUN exit 4"), "{err}");
        assert!(out.contains("a-ran") && !out.contains("c-ran"), "{out}");
        errors.push((out, err));
    }
    assert_eq!(errors[0], errors[1]);
}

#[test]
fn independent_stages_overlap() {
    if !require_root() {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have at least 2 CPUs for this test"
        );
        eprintln!("skipping: one CPU, stages run one by one (outside CI)");
        return;
    }
    let d = Daemon::start();
    load_base(&d);
    // Each stage notes when its RUN started and ended around a 5 s sleep: one by one, the
    // second starts when the first has ended; at once, each starts before the other ends.
    let ctx = context(
        &d,
        "FROM base:1 AS one\n\
         RUN date +%s > /start && sleep 5 && date +%s > /end && echo one\n\
         FROM base:1 AS two\n\
         RUN date +%s > /start && sleep 5 && date +%s > /end && echo two\n\
         FROM base:1\n\
         COPY --from=one /start /end /one/\n\
         COPY --from=two /start /end /two/\n\
         RUN test $(cat /one/start) -lt $(cat /two/end) && test $(cat /two/start) -lt $(cat /one/end) && echo overlapped\n",
    );
    let out = d.ok(&["ctr-img", "build", "--no-cache", path(&ctx)]);
    assert!(out.lines().any(|l| l == "overlapped"), "{out}");
}
