//! Live progress: bytes moved per item (a layer, an archive), carried inside an operation's
//! text stream as machine lines that start with `MARK`. The daemon turns them into typed
//! progress messages for a client that asked for them and drops them for any other, so the
//! text a client prints is never changed by them.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first character of an event line (ASCII record separator: never in text output).
pub const MARK: char = '\u{1e}';

/// How often events are sent at most, per reporter.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// One progress event: `current` of `total` bytes of `id` done, doing `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub action: String,
    pub current: u64,
    pub total: u64,
}

/// The event line for `id`.
pub fn event(id: &str, action: &str, current: u64, total: u64) -> String {
    format!("{MARK}{action}\t{id}\t{current}\t{total}")
}

/// The event an event line carries (None for ordinary text).
pub fn parse(line: &str) -> Option<Event> {
    let rest = line.strip_prefix(MARK)?;
    let mut f = rest.trim_end_matches('\n').split('\t');
    let action = f.next()?.to_string();
    let id = f.next()?.to_string();
    let current = f.next()?.parse().ok()?;
    let total = f.next()?.parse().ok()?;
    Some(Event {
        id,
        action,
        current,
        total,
    })
}

/// Whether a stream line is an event (not text).
pub fn is_event(line: &str) -> bool {
    line.starts_with(MARK)
}

/// A short name for a digest (`sha256:abc...` → its first 12 hex digits).
pub fn short(digest: &str) -> String {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    hex.chars().take(12).collect()
}

/// Says when the next event is due.
#[derive(Default)]
pub struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < INTERVAL) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// A reader or writer that reports the bytes through it as events.
pub struct Reporting<'a, T> {
    pub inner: T,
    progress: &'a mut dyn FnMut(String),
    id: String,
    action: &'static str,
    total: u64,
    done: u64,
    throttle: Throttle,
}

impl<'a, T> Reporting<'a, T> {
    pub fn new(
        inner: T,
        progress: &'a mut dyn FnMut(String),
        id: &str,
        action: &'static str,
        total: u64,
    ) -> Self {
        Reporting {
            inner,
            progress,
            id: id.to_string(),
            action,
            total,
            done: 0,
            throttle: Throttle::default(),
        }
    }

    pub(crate) fn count(&mut self, n: usize) {
        self.done += n as u64;
        if n == 0 || self.throttle.due() {
            (self.progress)(event(
                &self.id,
                self.action,
                self.done,
                self.total.max(self.done),
            ));
        }
    }

    /// Reports where it stands now (the end of the item).
    pub fn finish(&mut self) {
        (self.progress)(event(
            &self.id,
            self.action,
            self.done,
            self.total.max(self.done),
        ));
    }
}

impl<T: Read> Read for Reporting<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

impl<T: Write> Write for Reporting<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if n > 0 {
            self.count(n);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that adds what it reads to a counter another thread reports.
pub struct Counted<R> {
    pub inner: R,
    pub count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_are_told_from_text() {
        let line = event("abc", "Downloading", 5, 10);
        assert!(is_event(&line) && !is_event("STEP 1: FROM x\n"));
        assert_eq!(
            parse(&line),
            Some(Event {
                id: "abc".into(),
                action: "Downloading".into(),
                current: 5,
                total: 10
            })
        );
        assert_eq!(parse("plain text\n"), None);
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn a_reporting_reader_reports_the_end() {
        let mut lines = Vec::new();
        let mut sink = |l: String| lines.push(l);
        let mut r = Reporting::new(&b"hello"[..], &mut sink, "x", "Reading", 5);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        drop(r);
        let last = parse(lines.last().expect("an event")).expect("event");
        assert_eq!((last.current, last.total), (5, 5));
    }
}
