//! Runs the stages a build needs: independent ones at once (up to the CPU count), each as
//! soon as the stages it uses are done, with their output put in one-by-one order.

use crate::{cache_key, stage, BuildError, BuildOptions, Context, StageResult, PROXY_ARGS};
use isula_dockerfile::ignore::Matcher;
use isula_dockerfile::instructions::Dockerfile;
use isula_dockerfile::lex::Lexer;
use isula_runtime::CancelFlag;
use isula_types::{Digest, ImageId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Puts the lines of stages that run at once in the order a one-by-one run prints them:
/// the first unfinished stage (in Dockerfile order) prints as it goes, the others are held
/// until every stage before them has finished. Step numbers are given here, so they are
/// those of a one-by-one run. After a failed stage, later stages print nothing (one by
/// one, they would not have run).
struct Emitter<'l> {
    state: Mutex<EmitState<'l>>,
}

enum Event {
    Step(String),
    Line(String),
}

struct EmitState<'l> {
    sink: &'l mut (dyn FnMut(String) + Send),
    /// Stage indexes in run order; `head` is the position of the one printing now.
    order: Vec<usize>,
    head: usize,
    held: HashMap<usize, Vec<Event>>,
    finished: HashMap<usize, bool>,
    /// Steps printed so far.
    steps: usize,
    /// Steps printed before each stage that has started printing.
    offsets: HashMap<usize, usize>,
    closed: bool,
}

impl EmitState<'_> {
    fn write(&mut self, e: Event) {
        if self.closed {
            return;
        }
        match e {
            Event::Step(text) => {
                self.steps += 1;
                (self.sink)(format!("STEP {:>2}: {text}\n", self.steps));
            }
            Event::Line(l) => (self.sink)(l),
        }
    }

    /// Moves the head past finished stages, printing what each held.
    fn advance(&mut self) {
        while let Some(&stage) = self.order.get(self.head) {
            self.offsets.entry(stage).or_insert(self.steps);
            for e in self.held.remove(&stage).unwrap_or_default() {
                self.write(e);
            }
            match self.finished.get(&stage) {
                Some(ok) => {
                    if !ok {
                        self.closed = true;
                    }
                    self.head += 1;
                }
                None => break,
            }
        }
    }
}

impl<'l> Emitter<'l> {
    fn new(sink: &'l mut (dyn FnMut(String) + Send), order: Vec<usize>) -> Self {
        let mut st = EmitState {
            sink,
            order,
            head: 0,
            held: HashMap::new(),
            finished: HashMap::new(),
            steps: 0,
            offsets: HashMap::new(),
            closed: false,
        };
        st.advance();
        Emitter {
            state: Mutex::new(st),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EmitState<'l>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, stage: usize, e: Event) {
        let mut st = self.lock();
        if st.order.get(st.head) == Some(&stage) {
            st.write(e);
        } else {
            st.held.entry(stage).or_default().push(e);
        }
    }

    fn finish(&self, stage: usize, ok: bool) {
        let mut st = self.lock();
        st.finished.insert(stage, ok);
        st.advance();
    }

    /// `stage` starts over: what it held is dropped, and if it is printing, `why` is
    /// printed and its steps are counted again from its first.
    fn restart(&self, stage: usize, why: String) {
        let mut st = self.lock();
        st.held.remove(&stage);
        if st.order.get(st.head) == Some(&stage) {
            st.write(Event::Line(why));
            st.steps = st.offsets.get(&stage).copied().unwrap_or(st.steps);
        } else {
            st.held.entry(stage).or_default().push(Event::Line(why));
        }
    }

    /// Steps printed before `stage` (known once every stage before it has finished).
    fn offset(&self, stage: usize) -> usize {
        self.lock().offsets.get(&stage).copied().unwrap_or(0)
    }
}

/// Where each stage of a build stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Waiting,
    Running,
    Done,
    Failed,
}

struct Schedule {
    runs: Vec<Run>,
    results: Vec<Option<StageResult>>,
    /// The first failure (by run order) so far: stages after it are not started.
    failed_at: Option<usize>,
    errors: Vec<(usize, BuildError)>,
    used_args: Vec<Vec<String>>,
    cache_keys: Vec<Vec<Digest>>,
}

/// How many stages run at once: the CPU count.
fn parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn build_stages(
    ctx: &mut Context<'_>,
    opts: &BuildOptions,
    df: &Dockerfile,
    meta: &[(String, String)],
    lexer: &Lexer,
    ignore: Option<&Matcher>,
    stages: &[(usize, Vec<usize>)],
    target: usize,
    lease: &isula_store::Lease,
    (hashes, used_cache_mounts, materials): (
        &std::sync::Mutex<cache_key::ContextHashes>,
        &std::sync::Mutex<std::collections::BTreeSet<String>>,
        &std::sync::Mutex<Vec<isula_attest::slsa::Material>>,
    ),
) -> Result<(ImageId, Vec<Digest>, Vec<String>), BuildError> {
    let n = df.stages.len();
    let parts = ctx.parts();
    let global_cancel = ctx.cancel.clone();
    let stage_cancel: Vec<CancelFlag> = (0..n).map(|_| CancelFlag::default()).collect();
    let order: Vec<usize> = stages.iter().map(|(i, _)| *i).collect();
    let position = |i: usize| order.iter().position(|o| *o == i).unwrap_or(usize::MAX);
    let emitter = Emitter::new(&mut *ctx.log, order.clone());
    let step_line = |stage: usize, text: &str| emitter.emit(stage, Event::Step(text.to_string()));
    let used_later: Vec<bool> = (0..n)
        .map(|i| stages.iter().any(|(_, deps)| deps.contains(&i)))
        .collect();
    let shared = stage::Shared {
        opts,
        df,
        meta,
        lexer,
        ignore,
        lease,
        hashes,
        used_cache_mounts,
        materials,
        step_line: &step_line,
        used_later: &used_later,
    };
    let schedule = Mutex::new(Schedule {
        runs: vec![Run::Waiting; n],
        results: vec![None; n],
        failed_at: None,
        errors: Vec::new(),
        used_args: vec![Vec::new(); n],
        cache_keys: vec![Vec::new(); n],
    });
    let changed = std::sync::Condvar::new();
    let lock = || schedule.lock().unwrap_or_else(|p| p.into_inner());
    // The next stage to run: the first waiting one (in run order) whose stages are done.
    // None when nothing is left to start (Some(None): wait for a running stage).
    let next = |s: &mut Schedule| -> Option<Option<usize>> {
        let mut running = false;
        for (i, deps) in stages {
            match s.runs[*i] {
                Run::Running => running = true,
                Run::Waiting => {
                    if s.failed_at.is_some_and(|f| position(*i) > f)
                        || global_cancel.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    if deps.iter().all(|d| s.runs[*d] == Run::Done) {
                        s.runs[*i] = Run::Running;
                        return Some(Some(*i));
                    }
                    if deps.iter().any(|d| s.runs[*d] == Run::Failed) {
                        continue;
                    }
                    running = true; // waits for a stage still to come
                }
                _ => {}
            }
        }
        running.then_some(None)
    };
    let worker = || loop {
        let i = {
            let mut s = lock();
            loop {
                match next(&mut s) {
                    Some(Some(i)) => break Some(i),
                    Some(None) => {
                        s = changed
                            .wait_timeout(s, std::time::Duration::from_millis(100))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    None => break None,
                }
            }
        };
        let Some(i) = i else { break };
        let results = lock().results.clone();
        // A stage that panics (a bug) fails the build instead of leaving the others
        // waiting for it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let attempt = |remote| {
                let mut log = |line: String| emitter.emit(i, Event::Line(line));
                let mut sctx = parts.context(stage_cancel[i].clone(), &mut log);
                sctx.remote = remote;
                let mut run = stage::StageRun::new(&mut sctx, &shared, i, &results);
                let mut step_no = 0;
                let mut used = Vec::new();
                let outcome = run.execute(&mut step_no, &mut used);
                (outcome, used, run.take_cache_keys())
            };
            match attempt(parts.remote) {
                // A cache source that fails half way costs time, not the build: the stage
                // runs again without it.
                (Err(BuildError::CacheSource(why)), _, _) => {
                    emitter.restart(
                        i,
                        format!(
                            "[Warning] {why}; running the stage again without the registry cache\n"
                        ),
                    );
                    attempt(None)
                }
                other => other,
            }
        }));
        let (outcome, used, keys) = ran.unwrap_or_else(|_| {
            (
                Err(BuildError::Invalid(format!(
                    "internal error: stage {i} stopped unexpectedly"
                ))),
                Vec::new(),
                Vec::new(),
            )
        });
        let mut s = lock();
        s.used_args[i] = used;
        s.cache_keys[i] = keys;
        match outcome {
            Ok(r) => {
                s.results[i] = Some(r);
                s.runs[i] = Run::Done;
                emitter.finish(i, true);
            }
            Err(e) => {
                s.runs[i] = Run::Failed;
                s.errors.push((i, e));
                let at = position(i);
                if s.failed_at.is_none_or(|f| at < f) {
                    s.failed_at = Some(at);
                }
                // Stages after it would not have run one by one: stop them.
                for (j, _) in stages {
                    if position(*j) > at {
                        stage_cancel[*j].store(true, Ordering::SeqCst);
                    }
                }
                emitter.finish(i, false);
            }
        }
        changed.notify_all();
    };
    let workers = parallelism().min(stages.len()).max(1);
    let all_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The build's cancel reaches every stage. The daemon's flag has no notifier, so
        // it is looked at every 20 ms; the end of the build wakes this at once.
        scope.spawn(|| {
            let mut s = lock();
            while !all_done.load(Ordering::SeqCst) {
                if global_cancel.load(Ordering::SeqCst) {
                    for c in &stage_cancel {
                        c.store(true, Ordering::SeqCst);
                    }
                    changed.notify_all();
                }
                s = changed
                    .wait_timeout(s, std::time::Duration::from_millis(20))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        });
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
        for h in handles {
            let _ = h.join();
        }
        {
            let _s = lock();
            all_done.store(true, Ordering::SeqCst);
        }
        changed.notify_all();
    });
    let mut s = schedule.into_inner().unwrap_or_else(|p| p.into_inner());
    if global_cancel.load(Ordering::SeqCst) {
        return Err(BuildError::Cancelled);
    }
    // The error a one-by-one run would have met first.
    s.errors.sort_by_key(|(i, _)| position(*i));
    if let Some((i, e)) = s.errors.into_iter().next() {
        return Err(e.renumbered(emitter.offset(i)));
    }
    if s.runs[target] != Run::Done {
        return Err(BuildError::Invalid("the target stage did not run".into()));
    }
    drop(emitter);
    let mut used_args: Vec<String> = meta.iter().map(|(k, _)| k.clone()).collect();
    let mut cache_keys = Vec::new();
    for i in &order {
        used_args.append(&mut s.used_args[*i]);
        cache_keys.append(&mut s.cache_keys[*i]);
    }
    let mut unused: Vec<String> = opts
        .build_args
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| {
            !used_args.contains(k) && !PROXY_ARGS.contains(&k.as_str()) && k != "SOURCE_DATE_EPOCH"
        })
        .collect();
    unused.sort();
    unused.dedup();
    let mut last = s.results[target]
        .take()
        .ok_or_else(|| BuildError::Invalid("the target stage produced nothing".into()))?;
    // `--label`: on the image built, after (over) the Dockerfile's, as docker build does.
    if !opts.labels.is_empty() {
        let labels = last
            .config
            .config
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default);
        for (k, v) in &opts.labels {
            labels.insert(k.clone(), v.clone());
        }
    }
    let id = stage::commit_image(ctx, &last, &opts.tags, opts.oci, lease)?;
    // isula-build names a stage by its AS name, else by its index.
    let name = df.stages[target]
        .name
        .clone()
        .unwrap_or_else(|| target.to_string());
    (ctx.log)(format!("Committed stage {name} with ID: {}\n", id.hex()));
    Ok((id, cache_keys, unused))
}
