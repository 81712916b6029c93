//! Live progress on a terminal: the daemon's text lines print as always, and below them a
//! block of lines (one per layer or archive, and the running build step) is redrawn in
//! place with bytes, rate and elapsed time. Nothing of this is used when stdout is not a
//! terminal: then the output is exactly isula-build's lines.

use isula_api::v1::Progress;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Whether stdout is a terminal (live progress is asked for only then).
pub fn wanted() -> bool {
    std::io::stdout().is_terminal()
}

struct Item {
    id: String,
    action: String,
    current: u64,
    total: u64,
    started: Instant,
    updated: Instant,
}

/// The block of live lines under the text.
pub struct Live {
    items: Vec<Item>,
    step: Option<(String, Instant)>,
    drawn: usize,
}

fn human(n: u64) -> String {
    isula_types::human_size(n)
}

fn bar(current: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    let filled = (current.min(total) * WIDTH).checked_div(total).unwrap_or(0) as usize;
    let mut s = "=".repeat(filled);
    if (filled as u64) < WIDTH {
        s.push('>');
        s.push_str(&" ".repeat(WIDTH as usize - filled - 1));
    }
    format!("[{s}]")
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

impl Live {
    pub fn new() -> Live {
        Live {
            items: Vec::new(),
            step: None,
            drawn: 0,
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .items
            .iter()
            .map(|i| {
                let secs = i.updated.duration_since(i.started).as_secs_f64();
                let rate = if secs > 0.05 {
                    format!("{}/s", human((i.current as f64 / secs) as u64))
                } else {
                    String::new()
                };
                if i.total > 0 && i.current >= i.total {
                    format!(
                        "{} {}: done {} in {:.1}s {}",
                        i.action,
                        i.id,
                        human(i.total),
                        secs,
                        rate
                    )
                } else {
                    format!(
                        "{} {}: {} {} / {} {}",
                        i.action,
                        i.id,
                        bar(i.current, i.total),
                        human(i.current),
                        human(i.total),
                        rate
                    )
                }
            })
            .collect();
        if let Some((text, started)) = &self.step {
            out.push(format!("{text} ({:.1}s)", started.elapsed().as_secs_f64()));
        }
        out
    }

    fn erase(&mut self, out: &mut impl Write) {
        for _ in 0..self.drawn {
            let _ = write!(out, "\x1b[1A\x1b[2K");
        }
        self.drawn = 0;
    }

    fn draw(&mut self, out: &mut impl Write) {
        let lines = self.lines();
        for l in &lines {
            let _ = writeln!(out, "\x1b[2m{l}\x1b[0m");
        }
        self.drawn = lines.len();
    }

    /// Prints daemon text above the block.
    pub fn text(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        self.erase(&mut out);
        let _ = out.write_all(text.as_bytes());
        if !text.is_empty() && !text.ends_with('\n') {
            let _ = out.write_all(b"\n");
        }
        self.draw(&mut out);
        let _ = out.flush();
    }

    /// Takes a progress event and redraws.
    pub fn event(&mut self, p: Progress) {
        let now = Instant::now();
        let (current, total) = (p.current.max(0) as u64, p.total.max(0) as u64);
        match self
            .items
            .iter_mut()
            .find(|i| i.id == p.id && i.action == p.action)
        {
            Some(i) => {
                i.current = current;
                i.total = total;
                i.updated = now;
            }
            None => self.items.push(Item {
                id: p.id,
                action: p.action,
                current,
                total,
                started: now,
                updated: now,
            }),
        }
        self.redraw();
    }

    /// A build step started (`text` is its STEP line); returns how long the previous one took.
    pub fn step(&mut self, text: &str) -> Option<(String, Duration)> {
        let prev = self.step.take().map(|(t, started)| (t, started.elapsed()));
        self.step = Some((text.trim().to_string(), Instant::now()));
        prev
    }

    /// The running step ended; returns it and its time.
    pub fn end_step(&mut self) -> Option<(String, Duration)> {
        self.step.take().map(|(t, started)| (t, started.elapsed()))
    }

    pub fn redraw(&mut self) {
        let mut out = std::io::stdout().lock();
        self.erase(&mut out);
        self.draw(&mut out);
        let _ = out.flush();
    }

    /// Leaves the block as it stands (every item at its last value).
    pub fn finish(&mut self) {
        self.step = None;
        self.redraw();
        self.drawn = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_bytes_and_completion() {
        let mut l = Live::new();
        l.items.push(Item {
            id: "abc".into(),
            action: "Downloading".into(),
            current: 50,
            total: 100,
            started: Instant::now(),
            updated: Instant::now(),
        });
        let lines = l.lines();
        assert!(
            lines[0].starts_with("Downloading abc: [==========>"),
            "{lines:?}"
        );
        l.items[0].current = 100;
        assert!(l.lines()[0].contains("done"), "{:?}", l.lines());
        assert_eq!(bar(0, 0).len(), 22);
    }
}
