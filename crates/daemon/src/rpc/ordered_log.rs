//! The log of builds that run at once (one per platform), in the order one-by-one builds
//! print it: the first unfinished build prints as it goes, the others are held until every
//! build before them has finished. What a build holds is bounded: its first and last lines
//! are kept, and a note says how many between were not shown.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Bytes of held lines a build keeps at its start, and again at its end.
const HELD_HALF: usize = 4 << 20;

#[derive(Default)]
struct Held {
    head: Vec<String>,
    head_bytes: usize,
    tail: VecDeque<String>,
    tail_bytes: usize,
    dropped: u64,
}

impl Held {
    fn push(&mut self, line: String) {
        if self.dropped == 0 && self.tail.is_empty() && self.head_bytes + line.len() <= HELD_HALF {
            self.head_bytes += line.len();
            self.head.push(line);
            return;
        }
        self.tail_bytes += line.len();
        self.tail.push_back(line);
        while self.tail_bytes > HELD_HALF {
            let Some(old) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= old.len();
            self.dropped += 1;
        }
    }

    fn drain(self, label: &str, sink: &mut dyn FnMut(String)) {
        for l in self.head {
            sink(l);
        }
        if self.dropped > 0 {
            sink(format!(
                "[{} lines of the build {label} not shown: it ran while another printed]\n",
                self.dropped
            ));
        }
        for l in self.tail {
            sink(l);
        }
    }
}

struct State<'s> {
    sink: &'s mut (dyn FnMut(String) + Send),
    labels: Vec<String>,
    /// The build printing now; those before it have finished.
    head: usize,
    held: Vec<Held>,
    finished: Vec<bool>,
}

impl State<'_> {
    fn advance(&mut self) {
        while self.head < self.finished.len() && self.finished[self.head] {
            self.head += 1;
            if let Some(h) = self.held.get_mut(self.head) {
                let h = std::mem::take(h);
                h.drain(&self.labels[self.head], &mut *self.sink);
            }
        }
    }
}

pub struct OrderedLog<'s> {
    state: Mutex<State<'s>>,
}

impl<'s> OrderedLog<'s> {
    /// A log for builds named by `labels` (in the order they print), written to `sink`.
    pub fn new(sink: &'s mut (dyn FnMut(String) + Send), labels: Vec<String>) -> Self {
        let n = labels.len();
        OrderedLog {
            state: Mutex::new(State {
                sink,
                labels,
                head: 0,
                held: (0..n).map(|_| Held::default()).collect(),
                finished: vec![false; n],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<'s>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A line of build `i`.
    pub fn line(&self, i: usize, line: String) {
        let mut st = self.lock();
        if st.head == i {
            (st.sink)(line);
        } else if let Some(h) = st.held.get_mut(i) {
            h.push(line);
        }
    }

    /// Build `i` has ended: the next one's held lines follow.
    pub fn finish(&self, i: usize) {
        let mut st = self.lock();
        if let Some(f) = st.finished.get_mut(i) {
            *f = true;
        }
        st.advance();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_builds_print_after_earlier_ones_finish() {
        let mut out = Vec::new();
        {
            let mut sink = |l: String| out.push(l);
            let log = OrderedLog::new(&mut sink, vec!["a".into(), "b".into(), "c".into()]);
            log.line(1, "b1".into());
            log.line(0, "a1".into());
            log.line(2, "c1".into());
            log.finish(2);
            log.line(1, "b2".into());
            log.line(0, "a2".into());
            log.finish(0);
            log.line(1, "b3".into());
            log.finish(1);
        }
        assert_eq!(out, ["a1", "a2", "b1", "b2", "b3", "c1"]);
    }

    #[test]
    fn held_lines_are_bounded_keeping_both_ends() {
        let mut out = Vec::new();
        let line = "x".repeat(1023) + "\n";
        let n = 2 * HELD_HALF / line.len() + 100;
        {
            let mut sink = |l: String| out.push(l);
            let log = OrderedLog::new(&mut sink, vec!["linux/amd64".into(), "linux/arm64".into()]);
            log.line(1, "first\n".into());
            for _ in 0..n {
                log.line(1, line.clone());
            }
            log.line(1, "last\n".into());
            log.finish(0);
        }
        assert_eq!(out.first().map(String::as_str), Some("first\n"));
        assert_eq!(out.last().map(String::as_str), Some("last\n"));
        let note = out
            .iter()
            .find(|l| l.starts_with('['))
            .expect("a note of the lines not shown");
        assert!(
            note.contains("of the build linux/arm64 not shown"),
            "{note}"
        );
        let kept: usize = out.iter().map(String::len).sum();
        assert!(kept <= 2 * HELD_HALF + 200, "{kept}");
    }
}
