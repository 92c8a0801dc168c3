//! A progress bar on stderr for `vlmserve eval`: redrawn in place on a terminal, a line every
//! tenth of the run otherwise (so logs of CI runs show progress without thousands of lines).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const WIDTH: usize = 30;
const REDRAW_EVERY: Duration = Duration::from_millis(100);

pub struct Progress {
    total: usize,
    done: usize,
    start: Instant,
    last_draw: Option<Instant>,
    terminal: bool,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self { total, done: 0, start: Instant::now(), last_draw: None, terminal: std::io::stderr().is_terminal() }
    }

    /// One more item done; `status` is shown after the counts (e.g. the running accuracy).
    pub fn tick(&mut self, status: &str) {
        self.done += 1;
        if self.terminal {
            let due = self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW_EVERY) || self.done == self.total;
            if due {
                self.last_draw = Some(Instant::now());
                eprint!("\r\x1b[2K{}", self.line(status));
            }
        } else if self.total > 0 && (self.done * 10 / self.total) > ((self.done - 1) * 10 / self.total) {
            eprintln!("{}", self.line(status));
        }
        let _ = std::io::stderr().flush();
    }

    /// Print a message above the bar (a terminal bar is cleared and redrawn on the next tick).
    pub fn message(&self, text: &str) {
        if self.terminal {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{text}");
    }

    /// End the bar's line.
    pub fn finish(&self) {
        if self.terminal && self.done > 0 {
            eprintln!();
        }
    }

    fn line(&self, status: &str) -> String {
        let filled = (self.done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if self.done > 0 { elapsed / self.done as f64 * (self.total - self.done) as f64 } else { 0.0 };
        format!(
            "[{}{}] {}/{} {elapsed:.0}s elapsed, {eta:.0}s left  {status}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.done,
            self.total
        )
    }
}
