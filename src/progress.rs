//! How far long work is, on stderr: a bar with its rate and time left on a terminal
//! (`indicatif`), and a plain line every 10 s otherwise (a log file, CI), so that a long run
//! always says where it is without filling a log. stdout stays for reports (`--json`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{
    HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle,
};

/// Lines when stderr is not a terminal: one per this.
const LINE_EVERY: Duration = Duration::from_secs(10);
/// The bar's message is rebuilt at most this often (building it formats numbers).
const MESSAGE_EVERY: Duration = Duration::from_millis(100);

/// Progress of one piece of work counted in `unit`s, of a total known or not.
pub(crate) struct Progress {
    unit: &'static str,
    /// On a terminal: the bar. Elsewhere: none, and lines instead.
    bar: Option<ProgressBar>,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
    last_message: Option<Instant>,
}

impl Progress {
    /// Progress counted in `unit`s (`rows`, `records`, `impressions`).
    pub(crate) fn new(unit: &'static str) -> Self {
        Self::with_target(unit, std::io::stderr().is_terminal())
    }

    fn with_target(unit: &'static str, tty: bool) -> Self {
        let bar = tty.then(new_bar);
        let p = Self {
            unit,
            bar,
            total: None,
            started: Instant::now(),
            last_line: Instant::now(),
            last_message: None,
        };
        p.style();
        p
    }

    fn style(&self) {
        let Some(bar) = &self.bar else { return };
        let unit = self.unit;
        let template = match self.total {
            Some(_) => format!(
                "{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}, {{rate}}, {{eta}} left"
            ),
            None => format!("{{spinner}} {{msg}} {{human_pos}} {unit}, {{rate}}"),
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            let rate = move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{} {unit}/s", HumanCount(s.per_sec() as u64));
            };
            bar.set_style(style.progress_chars("=> ").with_key("rate", rate));
        }
    }

    /// `at` of `total` done (a total may grow, as a log being read does); `msg` says what,
    /// and is called only when it is shown.
    pub(crate) fn update(&mut self, at: u64, total: Option<u64>, msg: &dyn Fn() -> String) {
        if total != self.total {
            let restyle = total.is_some() != self.total.is_some();
            self.total = total;
            if let Some(bar) = &self.bar {
                match total {
                    Some(n) => bar.set_length(n),
                    None => bar.unset_length(),
                }
                if restyle {
                    self.style();
                }
            }
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(at);
                if self
                    .last_message
                    .is_none_or(|t| t.elapsed() >= MESSAGE_EVERY)
                {
                    self.last_message = Some(Instant::now());
                    bar.set_message(msg());
                }
            }
            None => {
                if self.last_line.elapsed() >= LINE_EVERY {
                    self.last_line = Instant::now();
                    eprintln!("{}", self.line(at, &msg()));
                }
            }
        }
    }

    /// The plain line: `msg: 1,200 of 10,000 rows (12%), 250/s, 35s left`.
    fn line(&self, at: u64, msg: &str) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { at as f64 / secs } else { 0.0 };
        let unit = self.unit;
        let mut l = format!("{msg}: {}", HumanCount(at));
        if let Some(n) = self.total {
            l.push_str(&format!(
                " of {} {unit} ({:.0}%)",
                HumanCount(n),
                100.0 * at as f64 / n.max(1) as f64
            ));
        } else {
            l.push_str(&format!(" {unit}"));
        }
        l.push_str(&format!(", {} {unit}/s", HumanCount(rate.round() as u64)));
        if let Some(n) = self.total.filter(|_| rate > 0.0) {
            let left = n.saturating_sub(at) as f64 / rate;
            l.push_str(&format!(
                ", {} left",
                HumanDuration(Duration::from_secs_f64(left))
            ));
        }
        l
    }

    /// A phase finished: its line stays, and the next phase counts afresh.
    pub(crate) fn done(&mut self, msg: &str) {
        self.started = Instant::now();
        self.last_message = None;
        match &self.bar {
            Some(bar) => {
                bar.finish_and_clear();
                eprintln!("{msg}");
                // The next phase draws a bar of its own.
                self.bar = Some(new_bar());
                self.total = None;
                self.style();
            }
            None => eprintln!("{msg}"),
        }
    }

    /// A one-off line, above the bar.
    pub(crate) fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
}

/// A bar on stderr, redrawn 4 times a second even when nothing advances (its rate and time
/// left still change).
fn new_bar() -> ProgressBar {
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    b.enable_steady_tick(Duration::from_millis(250));
    b
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl freshet_actors::training::offline::Progress for Progress {
    fn tick(&mut self, at: u64, total: Option<u64>, msg: &dyn Fn() -> String) {
        self.update(at, total, msg)
    }

    fn done(&mut self, msg: &str) {
        Progress::done(self, msg)
    }

    fn note(&mut self, msg: &str) {
        Progress::note(self, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_says_how_far_how_fast_and_how_long_is_left() {
        let mut p = Progress::with_target("rows", false);
        p.started = Instant::now() - Duration::from_secs(10);
        p.total = Some(10_000);
        let l = p.line(2_500, "epoch 1/2");
        assert!(
            l.starts_with("epoch 1/2: 2,500 of 10,000 rows (25%), 250 rows/s, "),
            "{l}"
        );
        assert!(l.ends_with("left"), "{l}");
        // Unknown total: count and rate, no time left.
        p.total = None;
        let l = p.line(2_500, "reading");
        assert!(l.starts_with("reading: 2,500 rows, 250 rows/s"), "{l}");
        assert!(!l.contains("left"), "{l}");
        // Nothing done yet: no rate to divide by.
        p.total = Some(5);
        p.started = Instant::now();
        assert!(!p.line(0, "x").contains("left"));
    }

    #[test]
    fn a_total_may_grow_within_a_phase_and_done_starts_the_next() {
        let mut p = Progress::with_target("records", false);
        p.update(5, Some(10), &|| "a".into());
        let first = p.started;
        p.update(6, Some(12), &|| "a".into());
        assert_eq!((p.started, p.total), (first, Some(12)));
        std::thread::sleep(Duration::from_millis(2));
        p.done("a finished");
        assert!(p.started > first);
        assert_eq!(p.total, Some(12), "kept until the next phase names its own");
    }
}
