//! Progress on stderr for long work: shown only when stderr is a terminal and not `-q`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How chatty the tool is, from `-q` / `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verbosity {
    Quiet,
    #[default]
    Normal,
    Verbose,
}

/// A progress bar on stderr, or nothing (quiet, or stderr not a terminal); cleared when
/// finished or dropped.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    fn drawn(verbosity: Verbosity, what: &str, total: Option<u64>, template: &str) -> Self {
        if verbosity == Verbosity::Quiet || !std::io::stderr().is_terminal() {
            return Bar { bar: None };
        }
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar: Some(bar) }
    }

    /// A bar for `total` bytes labelled `what`.
    pub fn new(verbosity: Verbosity, what: &str, total: u64) -> Self {
        let template = "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}";
        Bar::drawn(verbosity, what, Some(total), template)
    }

    /// A bar of items labelled `what` (entries of an archive whose byte size says little);
    /// its total is given with each update ([`Bar::set_of`]).
    pub fn counting(verbosity: Verbosity, what: &str) -> Self {
        Bar::drawn(
            verbosity,
            what,
            None,
            "{msg} [{bar:30}] {pos}/{len} ETA {eta}",
        )
    }

    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    /// `done` of `total` items.
    pub fn set_of(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A reader that moves a byte-count [`Bar`] as it is read.
pub struct Reading<'a, R> {
    inner: R,
    bar: &'a Bar,
    done: u64,
}

impl<'a, R> Reading<'a, R> {
    pub fn new(inner: R, bar: &'a Bar) -> Self {
        Reading {
            inner,
            bar,
            done: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Reading<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.bar.set(self.done);
        Ok(n)
    }
}

/// Bytes as a short human size (binary units).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
